//! The systemd unit: `systemd-analyze verify` finds nothing to say about it, its sandboxing
//! keeps the exposure score low, and the restart policy matches the daemon's exit status.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn unit_text() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/hapaird.service"))
        .unwrap()
}

/// The unit with ExecStart pointing at the hapaird this build made (verify checks that the
/// executable exists).
fn installed(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("hapaird.service");
    std::fs::write(
        &p,
        text.replace("/usr/bin/hapaird", env!("CARGO_BIN_EXE_hapaird")),
    )
    .unwrap();
    p
}

fn analyze(args: &[&str], unit: &Path) -> Output {
    Command::new("systemd-analyze")
        .args(args)
        .arg(unit)
        .output()
        .expect("systemd-analyze is not installed: apt-get install systemd (tools/install-test-deps.sh)")
}

#[test]
fn verify_is_silent() {
    let dir = tempfile::tempdir().unwrap();
    let unit = installed(dir.path(), &unit_text());
    let o = analyze(&["verify"], &unit);
    let err = String::from_utf8_lossy(&o.stderr);
    let ours: Vec<&str> = err.lines().filter(|l| l.contains("hapaird")).collect();
    assert!(
        o.status.success() && ours.is_empty(),
        "systemd-analyze verify:\n{err}"
    );
    // The check is real: a typo is reported.
    let broken = installed(
        dir.path(),
        &unit_text().replace("Type=notify", "Type=notifyy"),
    );
    let o = analyze(&["verify"], &broken);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("Failed to parse service type"), "{err}");
}

#[test]
fn sandbox_exposure_is_low() {
    let dir = tempfile::tempdir().unwrap();
    let unit = installed(dir.path(), &unit_text());
    // Exits non-zero above the threshold (3.5 of 10).
    let o = analyze(
        &["security", "--offline=yes", "--threshold=35", "--no-pager"],
        &unit,
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "exposure too high:\n{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.contains("Overall exposure level for hapaird.service"),
        "{out}"
    );
}

#[test]
fn restart_policy_and_privileges_match_the_daemon() {
    let t = unit_text();
    let get = |key: &str| -> Vec<String> {
        t.lines()
            .filter_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(get("Type"), ["notify"]);
    assert_eq!(get("Restart"), ["on-failure"]);
    assert_eq!(
        get("RestartPreventExitStatus"),
        [hapair::daemon::ha::EXIT_HALTED.to_string()]
    );
    // The watchdog must kill a hung loop before the partner's default mailbox timeout.
    let wd: u64 = get("WatchdogSec")[0].trim_end_matches('s').parse().unwrap();
    let mailbox_timeout_ms =
        hapair::core::takeover::Config::new(hapair::core::takeover::NodeId::A).mailbox_timeout_ms;
    assert!(
        wd * 1000 * 2 <= mailbox_timeout_ms,
        "WatchdogSec {wd}s vs mailbox timeout {mailbox_timeout_ms} ms"
    );
    let caps: Vec<String> = get("CapabilityBoundingSet")[0]
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert_eq!(
        caps,
        [
            "CAP_SYS_RAWIO",
            "CAP_NET_ADMIN",
            "CAP_NET_RAW",
            "CAP_IPC_LOCK"
        ]
    );
    assert!(get("ExecStart")[0].ends_with("hapaird run --config /etc/hapair/hapaird.toml"));
    assert!(get("ExecStopPost")[0]
        .ends_with("hapaird release-addresses --config /etc/hapair/hapaird.toml"));
    // The control socket's default lives in the unit's RuntimeDirectory.
    let cfg = hapair::config::Config::parse(
        "node = \"a\"\n[pair]\npartner = \"b\"\npartner_interconnect = [\"192.0.2.2:7700\"]\nkey_file = \"/k\"\n\
         [[aggregate]]\nname = \"x\"\nhome = \"a\"\ndata = [\"/d0\"]\nparity = \"/p0\"\nnvram = \"/n0\"\n\
         [[aggregate]]\nname = \"y\"\nhome = \"b\"\ndata = [\"/d1\"]\nparity = \"/p1\"\nnvram = \"/n1\"\n",
        std::path::Path::new("unit-test.toml"),
    )
    .unwrap();
    assert_eq!(
        cfg.pair.unwrap().control_socket,
        std::path::PathBuf::from("/run/hapair/hapaird.sock")
    );
    assert_eq!(get("RuntimeDirectory"), ["hapair"]);
}

//! The systemd unit: `systemd-analyze verify` finds nothing to say about it, its sandboxing
//! keeps the exposure score low, and the restart policy and watchdog match the daemon.

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
    // hapaird has no exit status of its own for a halt (it stays up, taken over): the unit
    // must not pretend otherwise.
    assert_eq!(get("RestartPreventExitStatus"), Vec::<String>::new());
    assert!(!t.contains("exits 75"), "the unit claims an exit status");
    let cfg = hapair::config::Config::parse(
        "node = \"a\"\n[pair]\npartner = \"b\"\npartner_interconnect = [\"192.0.2.2:7700\"]\nkey_file = \"/k\"\n\
         [[aggregate]]\nname = \"x\"\nhome = \"a\"\ndata = [\"/d0\"]\nparity = \"/p0\"\nnvram = \"/n0\"\n\
         [[aggregate]]\nname = \"y\"\nhome = \"b\"\ndata = [\"/d1\"]\nparity = \"/p1\"\nnvram = \"/n1\"\n",
        std::path::Path::new("unit-test.toml"),
    )
    .unwrap();
    let pair = cfg.pair.clone().unwrap();
    // The watchdog must kill a hung loop well before the partner's mailbox timeout, as the
    // daemon configures it by default (the [pair] default, not the state machine's).
    let wd = &get("WatchdogSec")[0];
    let wd_ms: u64 = match wd.strip_suffix("ms") {
        Some(ms) => ms.parse().unwrap(),
        None => wd.trim_end_matches('s').parse::<u64>().unwrap() * 1000,
    };
    assert!(
        wd_ms * 2 <= pair.mailbox_timeout_ms,
        "WatchdogSec {wd} vs default mailbox_timeout_ms {}",
        pair.mailbox_timeout_ms
    );
    assert!(
        t.contains(&format!("{} ms by", pair.mailbox_timeout_ms)),
        "the unit's comment names the default mailbox timeout"
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
    assert_eq!(
        pair.control_socket,
        std::path::PathBuf::from("/run/hapair/hapaird.sock")
    );
    assert_eq!(get("RuntimeDirectory"), ["hapair"]);
}

/// A pair configuration whose files need not exist (`hapaird run` refuses before it opens
/// anything when the watchdog does not fit).
fn pair_config(dir: &Path, heartbeat_ms: u64, mailbox_timeout_ms: u64) -> PathBuf {
    let p = dir.join("a.toml");
    std::fs::write(
        &p,
        format!(
            "node = \"a\"\n[pair]\npartner = \"b\"\npartner_interconnect = [\"192.0.2.2:7700\"]\nkey_file = \"{k}\"\n\
             control_socket = \"{s}\"\nheartbeat_ms = {heartbeat_ms}\ninterconnect_timeout_ms = {ic}\nmailbox_timeout_ms = {mailbox_timeout_ms}\n\
             [[aggregate]]\nname = \"x\"\nhome = \"a\"\ndata = [\"{d}/d0\"]\nparity = \"{d}/p0\"\nnvram = \"{d}/n0\"\n\
             [[aggregate]]\nname = \"y\"\nhome = \"b\"\ndata = [\"{d}/d1\"]\nparity = \"{d}/p1\"\nnvram = \"{d}/n1\"\n\
             [[export]]\nname = \"x\"\naggregate = \"x\"\nlisten = \"127.0.0.1:0\"\n",
            k = dir.join("key").display(),
            s = dir.join("a.sock").display(),
            d = dir.display(),
            ic = 2 * heartbeat_ms,
        ),
    )
    .unwrap();
    p
}

fn hapaird(args: &[&str], cfg: &Path, watchdog_usec: Option<&str>) -> (bool, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hapaird"));
    c.args(args).arg("--config").arg(cfg);
    c.env_remove("WATCHDOG_USEC").env_remove("WATCHDOG_PID");
    c.env_remove("NOTIFY_SOCKET");
    if let Some(u) = watchdog_usec {
        c.env("WATCHDOG_USEC", u);
    }
    let o = c.output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn hapaird_refuses_a_watchdog_that_does_not_fit_the_mailbox_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = pair_config(dir.path(), 200, 3000);
    // WatchdogSec=5s against a self-fence bound of 1.5 s: refused at start, naming both and
    // the fix.
    let (ok, _, err) = hapaird(&["run"], &cfg, Some("5000000"));
    assert!(!ok, "{err}");
    assert!(
        err.contains("WatchdogSec=5000ms")
            && err.contains("self-fence bound of 1500 ms")
            && err.contains("pair.mailbox_timeout_ms = 3000 ms")
            && err.contains("Set WatchdogSec=1500ms or less"),
        "{err}"
    );
    // Too short for the heartbeat: refused too.
    let (ok, _, err) = hapaird(&["run"], &cfg, Some("300000"));
    assert!(!ok);
    assert!(
        err.contains("WatchdogSec=300ms") && err.contains("2 x pair.heartbeat_ms (400 ms)"),
        "{err}"
    );
    // A fitting one passes the check (and the start then fails on the missing files).
    let (ok, _, err) = hapaird(&["run"], &cfg, Some("1500000"));
    assert!(!ok);
    assert!(!err.contains("WatchdogSec"), "{err}");

    // check-config: the same from the environment, or from the unit file.
    let (ok, out, err) = hapaird(&["check-config"], &cfg, Some("5000000"));
    assert!(!ok, "{out}");
    assert!(
        err.contains("WatchdogSec=5000ms") && err.contains("$WATCHDOG_USEC"),
        "{err}"
    );
    let unit = dir.path().join("hapaird.service");
    std::fs::write(
        &unit,
        unit_text().replace("WatchdogSec=1500ms", "WatchdogSec=4s"),
    )
    .unwrap();
    let u = unit.to_str().unwrap();
    let (ok, _, err) = hapaird(&["check-config", "--unit", u], &cfg, None);
    assert!(!ok);
    assert!(
        err.contains("WatchdogSec=4000ms") && err.contains("hapaird.service"),
        "{err}"
    );
    // The shipped unit fits the default timers.
    std::fs::write(&unit, unit_text()).unwrap();
    let (ok, out, err) = hapaird(&["check-config", "--unit", u], &cfg, None);
    assert!(ok, "{err}");
    assert!(out.contains("watchdog 1500 ms"), "{out}");
}

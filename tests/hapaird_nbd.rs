//! The real daemon on real loop devices, driven by real NBD clients (fio, nbdinfo, nbdcopy,
//! qemu-img), and the demo as a newcomer runs it.

mod common;

use common::*;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn write_config(dir: &Path, loops: &[LoopDev], port: u16) -> PathBuf {
    let q = |p: &Path| format!("\"{}\"", p.display());
    let text = format!(
        "node = \"a\"\n[io]\nworkers = 8\narena_mib = 32\n[[aggregate]]\nname = \"aggr0\"\nhome = \"a\"\n\
         data = [{}]\nparity = {}\nchunk_kib = 64\n[[export]]\nname = \"aggr0\"\naggregate = \"aggr0\"\n\
         listen = \"127.0.0.1:{port}\"\nunix = {}\n",
        loops[..4].iter().map(|l| q(&l.dev)).collect::<Vec<_>>().join(", "),
        q(&loops[4].dev),
        q(&dir.join("aggr0.sock")),
    );
    let p = dir.join("a.toml");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn daemon_on_loop_devices_serves_real_clients() {
    for t in ["fio", "nbdinfo", "nbdcopy", "qemu-img"] {
        require_tool(t);
    }
    let dir = scratch_dir();
    let loops: Vec<LoopDev> = (0..5)
        .map(|i| LoopDev::new(dir.path(), &format!("m{i}.img"), 48 << 20))
        .collect();
    let port = free_port();
    let cfg = write_config(dir.path(), &loops, port);
    let cfg_s = cfg.to_str().unwrap();
    let out = run(Command::new(HAPAIRD).args(["format", "--config", cfg_s]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("formatted aggregate aggr0"));
    // A second format is refused, naming the members, and exits non-zero.
    let out = Command::new(HAPAIRD)
        .args(["format", "--config", cfg_s])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--force") && err.contains(&loops[0].dev.display().to_string()),
        "{err}"
    );

    let daemon = Daemon::spawn(&["run", "--config", cfg_s]);
    wait_for_port(port);
    let uri = format!("nbd://127.0.0.1:{port}/aggr0");
    let size: u64 = 4 * (47 << 20);

    // nbdinfo: size and block sizes as the aggregate has them.
    let out = run(Command::new("nbdinfo").args(["--json", &uri]));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let e = &info["exports"][0];
    assert_eq!(e["export-size"].as_u64(), Some(size));
    assert_eq!(e["block_size_minimum"].as_u64(), Some(4096));
    assert_eq!(e["block_size_preferred"].as_u64(), Some(4 * 65536));
    assert_eq!(e["block_size_maximum"].as_u64(), Some(4 << 20));
    assert_eq!(e["can_multi_conn"].as_bool(), Some(true));
    assert_eq!(e["can_fua"].as_bool(), Some(true));

    // fio with crc32c verify: block sizes x queue depths, 4 jobs = 4 connections at once.
    for (bs, qd) in [
        ("4k", "1"),
        ("4k", "32"),
        ("64k", "8"),
        ("1m", "4"),
        ("12k", "16"),
    ] {
        let out = run(Command::new("fio").args([
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            &format!("--bs={bs}"),
            &format!("--iodepth={qd}"),
            "--numjobs=4",
            "--size=16m",
            "--offset_increment=40m",
            "--verify=crc32c",
            "--verify_state_save=0",
            "--do_verify=1",
            "--verify_fatal=1",
            "--output-format=json",
        ]));
        // fio may print notes before its JSON document.
        let text = String::from_utf8_lossy(&out.stdout);
        let start = text
            .find("{\n")
            .unwrap_or_else(|| panic!("no JSON from fio: {text}"));
        let j: serde_json::Value =
            serde_json::from_str(&text[start..]).unwrap_or_else(|e| panic!("{e}: {text}"));
        for job in j["jobs"].as_array().unwrap() {
            assert_eq!(job["error"].as_i64(), Some(0), "bs={bs} qd={qd}: {job}");
            let (w, r) = (
                job["write"]["io_bytes"].as_u64().unwrap(),
                job["read"]["io_bytes"].as_u64().unwrap(),
            );
            assert!(w > (15 << 20) && r == w, "bs={bs}: wrote {w}, verified {r}");
        }
    }

    // nbdcopy round trip of a random image (4 connections), then qemu-img compare.
    let img = dir.path().join("random.img");
    std::fs::write(&img, pattern(size as usize, 42)).unwrap();
    run(Command::new("nbdcopy").args(["--connections=4", img.to_str().unwrap(), &uri]));
    let back = dir.path().join("back.img");
    run(Command::new("nbdcopy").args([&uri, back.to_str().unwrap()]));
    assert!(
        std::fs::read(&back).unwrap() == std::fs::read(&img).unwrap(),
        "nbdcopy round trip differs"
    );
    run(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        img.to_str().unwrap(),
        &uri,
    ]));
    // The Unix socket serves the same bytes.
    let unix_uri = format!(
        "nbd+unix:///aggr0?socket={}",
        dir.path().join("aggr0.sock").display()
    );
    run(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        img.to_str().unwrap(),
        &unix_uri,
    ]));

    // SIGTERM: drain, close cleanly, exit 0.
    let out = daemon.stop(libc::SIGTERM);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "hapaird exited with {:?}: {err}",
        out.status
    );
    assert!(err.contains("closed cleanly"), "{err}");
    // The data is on the members: reassemble in-process and compare.
    let agg_cfg = hapair::config::Config::load(&cfg).unwrap();
    let agg =
        hapair::daemon::setup::open(&agg_cfg.aggregate[0], &agg_cfg.io, &mut |_, _| {}).unwrap();
    let mut buf = hapair::io::buf::IoBuf::new(size as usize);
    agg.read(0, &mut buf).unwrap();
    assert!(
        buf[..] == std::fs::read(&img).unwrap()[..],
        "members do not hold what was written"
    );
}

#[test]
fn demo_runs_a_pair_and_stops_cleanly() {
    require_tool("nbdinfo");
    let dir = scratch_dir();
    let d = dir.path().join("demo");
    let daemon = Daemon::spawn(&[
        "demo",
        "--dir",
        d.to_str().unwrap(),
        "--member-mib",
        "16",
        "--port",
        "0",
    ]);
    let json = d.join("demo.json");
    let end = Instant::now() + Duration::from_secs(90);
    while !json.exists() {
        assert!(Instant::now() < end, "demo.json not written within 90 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let nodes = doc["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2);
    let mut uris = Vec::new();
    for (node, name) in nodes.iter().zip(["a", "b"]) {
        assert_eq!(node["name"], name);
        assert!(node["pid"].as_u64().unwrap() > 0);
        assert!(std::path::Path::new(node["control_socket"].as_str().unwrap()).exists());
        let uri = node["exports"][0]["uri"].as_str().unwrap().to_string();
        let out = run(Command::new("nbdinfo").args(["--size", &uri]));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            ((4u64 * 15) << 20).to_string(),
            "{uri}"
        );
        uris.push(uri);
    }
    // A takeover through a's control socket: b's export answers at the same URI, served by a.
    let sock = nodes[0]["control_socket"].as_str().unwrap();
    let ask = |req: &str| -> serde_json::Value {
        use std::io::{BufRead, Write};
        let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
        s.write_all(format!("{req}\n").as_bytes()).unwrap();
        let mut line = String::new();
        std::io::BufReader::new(&s).read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    };
    // Until b serves with its log mirrored here a takeover is refused, and says why. (While b
    // boots, its log is mirrored if the mailbox says so; once b opens it, a new mirror session
    // copies it first: "mirrored" before b is Normal can go back to "not yet".)
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let st = ask(r#"{"v":1,"cmd":"status"}"#);
        if st["status"]["nodes"][1]["state"] == "Normal"
            && st["status"]["mirror"]["partner_log_mirrored"] == true
        {
            break;
        }
        assert!(
            Instant::now() < end,
            "b never served with its log mirrored on a: {st}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let reply = ask(r#"{"v":1,"cmd":"takeover","of":"b"}"#);
    assert_eq!(reply["outcome"]["result"], "completed", "{reply}");
    run(Command::new("nbdinfo").args(["--size", &uris[1]]));
    let out = daemon.stop(libc::SIGINT);
    assert!(
        out.status.success(),
        "demo exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut stdout = String::new();
    out.stdout.as_slice().read_to_string(&mut stdout).unwrap();
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        uris,
        "the demo prints its URIs"
    );
    assert!(!json.exists(), "demo.json removed on a clean stop");
}

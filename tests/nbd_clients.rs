//! Real NBD clients (libnbd's nbdinfo and nbdcopy, qemu-img, fio's nbd engine) against the
//! server, over TCP and a Unix socket, backed by files in /var/tmp.

#[path = "nbd_common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use common::*;
use hapair::daemon::nbd_server::{Export, NbdServer, ServerConfig};

const SIZE: u64 = 64 << 20;

struct Setup {
    srv: NbdServer,
    backend: Arc<FileBackend>,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

fn setup() -> Setup {
    let dir = tempfile::Builder::new()
        .prefix("hapair-nbd-sock")
        .tempdir_in("/var/tmp")
        .unwrap();
    let sock = dir.path().join("nbd.sock");
    let backend = Arc::new(FileBackend::new(SIZE, sizes(512, 4096, 32 << 20)));
    let small = Arc::new(FileBackend::new(4 << 20, sizes(4096, 4096, 1 << 20)));
    let cfg = ServerConfig {
        tcp: Some("127.0.0.1:0".parse().unwrap()),
        unix: Some(sock.clone()),
        workers: 4,
        ..Default::default()
    };
    let srv = NbdServer::start(
        cfg,
        vec![
            Export {
                name: "vol0".into(),
                description: "first volume".into(),
                backend: backend.clone(),
                read_only: false,
            },
            Export {
                name: "ro".into(),
                description: String::new(),
                backend: small,
                read_only: true,
            },
        ],
    )
    .unwrap();
    Setup {
        srv,
        backend,
        sock,
        _dir: dir,
    }
}

impl Setup {
    fn tcp_uri(&self, export: &str) -> String {
        format!("nbd://{}/{}", self.srv.local_addr().unwrap(), export)
    }
    fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{}?socket={}", export, self.sock.display())
    }
}

/// Run a command; fail with its output when it fails.
fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn nbdinfo_json(uri: &str) -> serde_json::Value {
    let out = run(Command::new(need("nbdinfo")).args(["--json", uri]));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("nbdinfo JSON: {e}: {out}"))
}

#[test]
fn nbdinfo_reports_size_block_sizes_and_flags() {
    let s = setup();
    for uri in [s.tcp_uri("vol0"), s.unix_uri("vol0"), s.tcp_uri("")] {
        let j = nbdinfo_json(&uri);
        let e = &j["exports"][0];
        assert_eq!(e["export-size"], SIZE, "{uri}: {j}");
        assert_eq!(e["block_size_minimum"], 512, "{j}");
        assert_eq!(e["block_size_preferred"], 4096, "{j}");
        assert_eq!(e["block_size_maximum"], 32 << 20, "{j}");
        assert_eq!(e["is_read_only"], false, "{j}");
        assert_eq!(e["can_flush"], true, "{j}");
        assert_eq!(e["can_fua"], true, "{j}");
        assert_eq!(e["can_trim"], true, "{j}");
        assert_eq!(e["can_zero"], true, "{j}");
        assert_eq!(e["can_multi_conn"], true, "{j}");
        assert_eq!(e["can_df"], true, "{j}");
        assert_eq!(j["protocol"], "newstyle-fixed", "{j}");
    }
    let j = nbdinfo_json(&s.tcp_uri("ro"));
    let e = &j["exports"][0];
    assert_eq!(e["export-size"], 4 << 20, "{j}");
    assert_eq!(e["is_read_only"], true, "{j}");
    assert_eq!(e["can_trim"], false, "{j}");
    assert_eq!(e["block_size_minimum"], 4096, "{j}");
    assert_eq!(e["block_size_maximum"], 1 << 20, "{j}");
    // --list sees both exports with their descriptions.
    let out = run(Command::new(need("nbdinfo")).args(["--json", "--list", &s.tcp_uri("")]));
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    let names: Vec<&str> = j["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["vol0", "ro"], "{j}");
    assert_eq!(j["exports"][0]["description"], "first volume", "{j}");
    // An unknown export is refused.
    let st = Command::new(need("nbdinfo"))
        .arg(s.tcp_uri("nope"))
        .output()
        .unwrap();
    assert!(!st.status.success());
}

fn write_file(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap();
}

#[test]
fn nbdcopy_round_trip_and_qemu_img_compare() {
    let s = setup();
    let dir = tempfile::Builder::new()
        .prefix("hapair-nbdcopy")
        .tempdir_in("/var/tmp")
        .unwrap();
    let img = dir.path().join("in.img");
    let back = dir.path().join("out.img");
    let mut data = random_bytes(SIZE as usize, 42);
    // A zero region in the middle exercises nbdcopy's zeroing path.
    data[(8 << 20)..(24 << 20)].fill(0);
    write_file(&img, &data);
    // Dirty the target so that zeroes must really be written.
    s.backend.fill(&vec![0xEEu8; SIZE as usize]);

    // In over TCP with several connections (multi-conn) and a deep queue.
    run(Command::new(need("nbdcopy"))
        .args(["--connections=4", "--requests=32", "--flush"])
        .arg(&img)
        .arg(s.tcp_uri("vol0")));
    assert!(
        s.backend.contents() == data,
        "export differs from the image after nbdcopy"
    );
    // Back out over the Unix socket.
    run(Command::new(need("nbdcopy"))
        .args(["--connections=2"])
        .arg(s.unix_uri("vol0"))
        .arg(&back));
    assert!(std::fs::read(&back).unwrap() == data, "copy back differs");
    // qemu's NBD client agrees byte for byte.
    let out = run(Command::new(need("qemu-img"))
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&img)
        .arg(s.tcp_uri("vol0")));
    assert!(out.contains("identical"), "{out}");
    // And notices a difference.
    let mut other = data.clone();
    other[12345] ^= 1;
    write_file(&img, &other);
    let st = Command::new(need("qemu-img"))
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&img)
        .arg(s.tcp_uri("vol0"))
        .output()
        .unwrap();
    assert_eq!(
        st.status.code(),
        Some(1),
        "qemu-img compare must see the flipped bit"
    );
}

/// fio's nbd engine: random writes then verified reads (crc32c), several jobs (one connection
/// each) at several block sizes and queue depths.
#[test]
fn fio_verify_random_io_many_connections() {
    let s = setup();
    let fio = need("fio");
    for (bs, depth) in [("4k", 1), ("4k", 32), ("64k", 16), ("1m", 4), ("512", 8)] {
        let out = run(Command::new(&fio).args([
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={}", s.tcp_uri("vol0")),
            "--rw=randwrite",
            &format!("--bs={bs}"),
            &format!("--iodepth={depth}"),
            "--numjobs=4",
            "--size=4m",
            "--offset_increment=16m",
            "--verify=crc32c",
            "--verify_state_save=0",
            "--do_verify=1",
            "--verify_fatal=1",
            "--group_reporting=0",
            "--output-format=json",
        ]));
        let j: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..])
            .unwrap_or_else(|e| panic!("fio JSON: {e}: {out}"));
        let jobs = j["jobs"].as_array().unwrap();
        assert_eq!(jobs.len(), 4, "{out}");
        for job in jobs {
            assert_eq!(job["error"], 0, "bs={bs} depth={depth}: {job}");
            assert_eq!(job["write"]["io_bytes"], 4 << 20, "bs={bs} depth={depth}");
            // The verify pass read everything back.
            assert_eq!(job["read"]["io_bytes"], 4 << 20, "bs={bs} depth={depth}");
        }
    }
    assert!(s.srv.stats().connections_accepted >= 20);
    assert_eq!(s.srv.stats().errors, 0);
}

/// fio over the Unix socket with mixed reads and writes and many connections at once.
#[test]
fn fio_mixed_over_unix_socket() {
    let s = setup();
    let out = run(Command::new(need("fio")).args([
        "--name=mixed",
        "--ioengine=nbd",
        &format!("--uri={}", s.unix_uri("vol0")),
        "--rw=randrw",
        "--bsrange=4k-128k",
        "--iodepth=16",
        "--numjobs=8",
        "--size=2m",
        "--offset_increment=8m",
        "--verify=crc32c",
        "--verify_state_save=0",
        "--output-format=json",
    ]));
    let j: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    for job in j["jobs"].as_array().unwrap() {
        assert_eq!(job["error"], 0, "{job}");
    }
    assert_eq!(s.srv.stats().errors, 0);
}

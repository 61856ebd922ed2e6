//! Graceful drain (takeover): every request read is answered with its real result, nothing
//! read after the drain began is answered, then the connection closes; new connections are
//! refused. Past the deadline, connections are closed abruptly.

#[path = "nbd_common/mod.rs"]
mod common;

use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use hapair::core::nbd::*;
use hapair::daemon::nbd_server::{DrainReport, Export, NbdServer, ServerConfig};

const SIZE: u64 = 16 << 20;

fn gated_server(dir: &std::path::Path) -> (NbdServer, Arc<GatedBackend<FileBackend>>, Vec<u8>) {
    gated_server_with(dir, false)
}

/// `batching`: writes take the fast path (`start_write`) and pipelined reads are grouped
/// (`batches_reads`), as with the NVRAM log; otherwise every request goes to a worker alone.
fn gated_server_with(
    dir: &std::path::Path,
    batching: bool,
) -> (NbdServer, Arc<GatedBackend<FileBackend>>, Vec<u8>) {
    let inner = FileBackend::new(SIZE, sizes(4096, 4096, 1 << 20));
    let data = random_bytes(SIZE as usize, 11);
    inner.fill(&data);
    let gated = Arc::new(GatedBackend {
        starts_writes: batching,
        batches_reads: batching,
        ..GatedBackend::new(inner)
    });
    (serve_gated(dir, gated.clone()), gated, data)
}

/// A server (TCP, and a Unix socket in `dir`) exporting `gated` as "g", with 4 workers.
fn serve_gated(dir: &std::path::Path, gated: Arc<GatedBackend<FileBackend>>) -> NbdServer {
    let cfg = ServerConfig {
        tcp: Some("127.0.0.1:0".parse().unwrap()),
        unix: Some(dir.join("s.sock")),
        workers: 4,
        ..Default::default()
    };
    let exports = vec![Export {
        name: "g".into(),
        description: String::new(),
        backend: gated,
        read_only: false,
    }];
    NbdServer::start(cfg, exports).unwrap()
}

/// Start a drain (deadline 30 s) on another thread and wait until the server's TCP listener
/// refuses connections.
fn start_drain(srv: &Arc<NbdServer>) -> std::thread::JoinHandle<DrainReport> {
    let addr = srv.local_addr().unwrap();
    let s2 = srv.clone();
    let drain = std::thread::spawn(move || s2.drain(Instant::now() + Duration::from_secs(30)));
    wait_until(10, "the TCP listener to close", || {
        TcpStream::connect(addr).is_err()
    });
    drain
}

#[test]
fn drain_answers_every_request_read_then_closes() {
    drain_answers_every_request_read(false);
}

/// The same with writes started on the reader thread and acknowledged by the connection's
/// acknowledger, and pipelined reads grouped (the NVRAM log's fast paths).
#[test]
fn drain_answers_every_started_write_then_closes() {
    drain_answers_every_request_read(true);
}

fn drain_answers_every_request_read(batching: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (srv, gated, data) = gated_server_with(dir.path(), batching);
    let srv = Arc::new(srv);
    let addr = srv.local_addr().unwrap();
    let (mut c, _, _) = RawClient::open(addr, "g", true);
    // An idle second client, and one still in the handshake.
    let (mut idle, _, _) = RawClient::open(addr, "g", false);
    let mut handshaking = RawClient::connect(addr);
    handshaking.greet(CLIENT_FLAG_FIXED_NEWSTYLE);

    // 32 reads and 32 writes (plus a flush) in flight, disjoint regions; all held by the gate.
    let wdata: Vec<Vec<u8>> = (0..32).map(|i| random_bytes(4096, 100 + i)).collect();
    for i in 0..32u64 {
        c.request(CMD_READ, 0, i, i * 4096, 4096, &[]);
        c.request(
            CMD_WRITE,
            CMD_FLAG_FUA,
            1000 + i,
            (1 << 20) + i * 4096,
            4096,
            &wdata[i as usize],
        );
    }
    c.request(CMD_FLUSH, 0, 5000, 0, 0, &[]);
    wait_until(10, "the server to read all 65 requests", || {
        srv.stats().requests == 65
    });

    // New connections are refused once the drain has begun.
    let drain = start_drain(&srv);
    let sock = dir.path().join("s.sock");
    wait_until(10, "the Unix listener to close", || {
        UnixStream::connect(&sock).is_err()
    });
    // A request sent after the drain began is not read, so not answered.
    c.request(CMD_READ, 0, 9999, 0, 4096, &[]);
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !drain.is_finished(),
        "drain must wait for requests in flight"
    );
    gated.open();

    let mut reads = 0;
    let mut writes = 0;
    let mut flush = 0;
    for _ in 0..65 {
        match c.reply() {
            Reply::Chunk(ch) => {
                assert_eq!(
                    (ch.flags, ch.ty),
                    (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA),
                    "{ch:?}"
                );
                assert!(ch.handle < 32, "only reads 0..32 were read: {ch:?}");
                let off = ch.handle as usize * 4096;
                assert_eq!(be64(&ch.payload[0..8]), off as u64);
                assert_eq!(&ch.payload[8..], &data[off..off + 4096]);
                reads += 1;
            }
            Reply::Simple { errno, handle } => {
                assert_eq!(
                    errno, 0,
                    "drained requests get their real result, never ESHUTDOWN"
                );
                if handle == 5000 {
                    flush += 1;
                } else {
                    assert!((1000..1032).contains(&handle));
                    writes += 1;
                }
            }
        }
    }
    assert_eq!((reads, writes, flush), (32, 32, 1));
    assert!(c.closed(), "connection must close after the last answer");
    assert!(idle.closed());
    assert!(handshaking.closed());
    let report = drain.join().unwrap();
    assert!(!report.deadline_hit, "{report:?}");
    assert_eq!(report.requests_completed, 65, "{report:?}");
    // The three above, and any of this test's own connect probes (waiting for the listener to
    // close) that the server had taken before the drain began.
    assert!(report.connections_closed >= 3, "{report:?}");
    assert_eq!(report.connections_aborted, 0, "{report:?}");
    // The acknowledged writes are on the device.
    let contents = gated.inner.contents();
    for (i, w) in wdata.iter().enumerate() {
        let off = (1 << 20) + i * 4096;
        assert_eq!(&contents[off..off + 4096], &w[..], "write {i}");
    }
    assert_eq!(srv.stats().connections_active, 0);
    assert!(TcpStream::connect(addr).is_err());
    if batching {
        assert_eq!(
            gated.writes_started.load(Ordering::SeqCst),
            32,
            "writes took the fast path"
        );
        assert_eq!(gated.finished_upto.load(Ordering::SeqCst), 32);
    } else {
        assert_eq!(gated.writes_started.load(Ordering::SeqCst), 0);
    }
}

/// Reads sent back to back are grouped by the reader (one `read_batch`, one socket write for
/// their replies), with simple and with structured replies, each answered with its own data.
#[test]
fn pipelined_reads_are_grouped_and_each_answered() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, gated, data) = gated_server_with(dir.path(), true);
    // A failed check must not leave workers waiting at the gate (the server's drop would hang).
    struct OpenOnPanic(Arc<GatedBackend<FileBackend>>);
    impl Drop for OpenOnPanic {
        fn drop(&mut self) {
            self.0.open();
        }
    }
    let _open = OpenOnPanic(gated.clone());
    let addr = srv.local_addr().unwrap();
    for structured in [false, true] {
        let before = gated.grouped_reads.load(Ordering::SeqCst);
        let (mut c, _, _) = RawClient::open(addr, "g", structured);
        // One write of all the requests, so that the server finds them buffered together.
        let mut all = Vec::new();
        for i in 0..48u64 {
            let h = RequestHeader {
                flags: 0,
                kind: CMD_READ,
                handle: i,
                offset: (i * 7 % 64) * 8192,
                length: 8192,
            };
            all.extend_from_slice(&encode_request_header(&h));
        }
        let n0 = srv.stats().requests;
        c.send(&all);
        wait_until(10, "the server to read the 48 reads", || {
            srv.stats().requests >= n0 + 48
        });
        gated.open();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..48 {
            let (handle, payload) = match c.reply() {
                Reply::Simple { errno, handle } => {
                    assert!(!structured);
                    assert_eq!(errno, 0);
                    (handle, c.read_n(8192))
                }
                Reply::Chunk(ch) => {
                    assert!(structured);
                    assert_eq!((ch.flags, ch.ty), (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA));
                    let off = (ch.handle * 7 % 64) * 8192;
                    assert_eq!(be64(&ch.payload[0..8]), off);
                    (ch.handle, ch.payload[8..].to_vec())
                }
            };
            let off = ((handle * 7 % 64) * 8192) as usize;
            assert_eq!(payload, &data[off..off + 8192], "read {handle}");
            assert!(seen.insert(handle), "answered twice: {handle}");
        }
        assert!(
            gated.grouped_reads.load(Ordering::SeqCst) > before,
            "48 buffered reads were not grouped"
        );
        gated.close();
    }
}

/// Writes sent back to back to a backend that writes in batches (the RAID-4 aggregate without
/// a log) are grouped (one `write_batch`, one socket write for their replies), each answered,
/// and the data lands; a request of another kind in between ends the group.
#[test]
fn pipelined_writes_are_grouped_and_each_answered() {
    let inner = FileBackend::new(SIZE, sizes(4096, 4096, 1 << 20));
    inner.fill(&random_bytes(SIZE as usize, 11));
    let gated = Arc::new(GatedBackend {
        batches_writes: true,
        ..GatedBackend::new(inner)
    });
    gated.open();
    let dir = tempfile::tempdir().unwrap();
    let srv = serve_gated(dir.path(), gated.clone());
    let (mut c, _, _) = RawClient::open(srv.local_addr().unwrap(), "g", true);
    let wdata: Vec<Vec<u8>> = (0..40).map(|i| random_bytes(8192, 500 + i)).collect();
    let mut all = Vec::new();
    for i in 0..40u64 {
        let h = RequestHeader {
            flags: if i == 5 { CMD_FLAG_FUA } else { 0 },
            kind: if i == 20 { CMD_FLUSH } else { CMD_WRITE },
            handle: i,
            offset: if i == 20 { 0 } else { i * 8192 },
            length: if i == 20 { 0 } else { 8192 },
        };
        all.extend_from_slice(&encode_request_header(&h));
        if i != 20 {
            all.extend_from_slice(&wdata[i as usize]);
        }
    }
    c.send(&all);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..40 {
        let (errno, handle) = c.simple();
        assert_eq!(errno, 0, "request {handle}");
        assert!(seen.insert(handle), "answered twice: {handle}");
    }
    let contents = gated.inner.contents();
    for i in (0..40usize).filter(|i| *i != 20) {
        assert_eq!(
            &contents[i * 8192..(i + 1) * 8192],
            &wdata[i][..],
            "write {i}"
        );
    }
    assert!(
        gated.grouped_writes.load(Ordering::SeqCst) > 0,
        "40 buffered writes were not grouped"
    );
}

/// Started writes that the backend cannot finish are answered with EIO (never acknowledged),
/// and the connection goes on serving.
#[test]
fn started_writes_that_fail_to_finish_are_answered_with_eio() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, gated, _) = gated_server_with(dir.path(), true);
    gated.open();
    let addr = srv.local_addr().unwrap();
    for structured in [false, true] {
        let (mut c, _, _) = RawClient::open(addr, "g", structured);
        gated.fail_finish.store(true, Ordering::SeqCst);
        let w = random_bytes(8192, 7);
        for i in 0..8u64 {
            c.request(CMD_WRITE, 0, i, i * 8192, 8192, &w);
        }
        for _ in 0..8 {
            match c.reply() {
                Reply::Simple { errno, handle } => {
                    assert!(!structured);
                    assert_eq!(errno, NBD_EIO, "write {handle}");
                }
                Reply::Chunk(ch) => {
                    assert!(structured);
                    assert_eq!(ch.ty, REPLY_TYPE_ERROR, "{ch:?}");
                    assert_eq!(be32(&ch.payload[0..4]), NBD_EIO, "{ch:?}");
                }
            }
        }
        gated.fail_finish.store(false, Ordering::SeqCst);
        c.request(CMD_WRITE, CMD_FLAG_FUA, 100, 0, 8192, &w);
        match c.reply() {
            Reply::Simple { errno, handle } => assert_eq!((errno, handle), (0, 100)),
            Reply::Chunk(ch) => panic!("a write succeeds with a simple reply: {ch:?}"),
        }
        assert_eq!(&gated.inner.contents()[..8192], &w[..]);
    }
    assert!(gated.writes_started.load(Ordering::SeqCst) >= 18);
}

#[test]
fn drain_past_deadline_closes_abruptly() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, gated, _) = gated_server(dir.path());
    let (mut c, _, _) = RawClient::open(srv.local_addr().unwrap(), "g", false);
    for i in 0..8u64 {
        c.request(CMD_READ, 0, i, i * 4096, 4096, &[]);
    }
    wait_until(10, "requests to reach the backend", || {
        gated.started.load(Ordering::SeqCst) >= 4
    });
    let t0 = Instant::now();
    let report = srv.drain(Instant::now() + Duration::from_millis(300));
    assert!(t0.elapsed() >= Duration::from_millis(290));
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(report.deadline_hit, "{report:?}");
    assert_eq!(report.connections_aborted, 1, "{report:?}");
    assert_eq!(report.requests_completed, 0, "{report:?}");
    // The client sees the connection go without answers (qemu would reconnect and re-send).
    assert!(c.closed());
    gated.open();
}

#[test]
fn remove_export_drains_only_its_connections() {
    let a = Arc::new(FileBackend::new(1 << 20, sizes(512, 4096, 1 << 20)));
    let b = Arc::new(FileBackend::new(2 << 20, sizes(512, 4096, 1 << 20)));
    let cfg = ServerConfig {
        tcp: Some("127.0.0.1:0".parse().unwrap()),
        workers: 2,
        ..Default::default()
    };
    let srv = NbdServer::start(
        cfg,
        vec![Export {
            name: "a".into(),
            description: String::new(),
            backend: a,
            read_only: false,
        }],
    )
    .unwrap();
    let addr = srv.local_addr().unwrap();
    // Takeover: the partner's export joins the running server.
    srv.add_export(Export {
        name: "b".into(),
        description: String::new(),
        backend: b.clone(),
        read_only: false,
    })
    .unwrap();
    assert!(srv
        .add_export(Export {
            name: "b".into(),
            description: String::new(),
            backend: b,
            read_only: false
        })
        .is_err());
    let (mut ca, _, _) = RawClient::open(addr, "a", false);
    let (mut cb, size_b, _) = RawClient::open(addr, "b", false);
    assert_eq!(size_b, 2 << 20);
    assert_eq!(srv.exports(), ["a", "b"]);

    // Giveback: "b" goes away; its client is closed, "a"'s is untouched.
    let report = srv
        .remove_export("b", Instant::now() + Duration::from_secs(10))
        .unwrap();
    assert_eq!(
        (report.connections_closed, report.deadline_hit),
        (1, false),
        "{report:?}"
    );
    assert!(cb.closed());
    ca.request(CMD_READ, 0, 1, 0, 512, &[]);
    assert_eq!(ca.simple(), (0, 1));
    ca.read_n(512);
    assert!(srv.remove_export("b", Instant::now()).is_none());
    let mut c = RawClient::connect(addr);
    c.greet(CLIENT_FLAG_FIXED_NEWSTYLE);
    assert_eq!(c.info(OPT_GO, "b", &[]).1, REP_ERR_UNKNOWN);
}

/// The takeover path end to end with qemu's NBD client: drain the server in the middle of a
/// write benchmark, start another server on the same address over the same device, and qemu
/// (with reconnect-delay) completes every request without an error.
#[test]
fn qemu_rides_through_drain_and_restart() {
    let qemu_img = need("qemu-img");
    let backend = Arc::new(FileBackend::new(SIZE, sizes(512, 4096, 1 << 20)));
    let start = |addr: std::net::SocketAddr| {
        let cfg = ServerConfig {
            tcp: Some(addr),
            workers: 2,
            ..Default::default()
        };
        let e = Export {
            name: String::new(),
            description: String::new(),
            backend: backend.clone(),
            read_only: false,
        };
        NbdServer::start(cfg, vec![e]).unwrap()
    };
    let first = start("127.0.0.1:0".parse().unwrap());
    let addr = first.local_addr().unwrap();
    let child = std::process::Command::new(qemu_img)
        .args([
            "bench",
            "-w",
            "-c",
            "40000",
            "-d",
            "16",
            "-s",
            "4k",
            "--image-opts",
        ])
        .arg(format!(
            "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},reconnect-delay=20",
            addr.port()
        ))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Killed and reaped if the test fails before it exits.
    let mut child = KillOnDrop(Some(child));
    wait_until(60, "qemu-img to get going", || {
        first.stats().requests > 2000
    });
    let report = first.drain(Instant::now() + Duration::from_secs(10));
    assert!(!report.deadline_hit, "{report:?}");
    assert_eq!(report.connections_closed, 1, "{report:?}");
    let served_first = first.stats().requests;
    drop(first);
    let second = start(addr);
    let status = loop {
        if let Some(st) = child.0.as_mut().unwrap().try_wait().unwrap() {
            break st;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.0.take().unwrap().wait_with_output().unwrap();
    assert!(
        status.success(),
        "qemu-img bench failed across the drain: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(served_first < 40000, "the drain must have happened mid-run");
    assert!(
        second.stats().requests > 0,
        "qemu reconnected to the new server"
    );
    assert_eq!(second.stats().errors, 0);
}

struct KillOnDrop(Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A drained connection's last answers reach a client that reads them slowly, although the
/// client sent one more request after the drain began (left unread by the server). Closing a
/// TCP socket with unread input sends a reset, and a reset throws away whatever the socket had
/// not yet sent: the server must not close before the client has every answer.
#[test]
fn drain_answers_reach_a_slow_reader() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, gated, data) = gated_server(dir.path());
    let srv = Arc::new(srv);
    let addr = srv.local_addr().unwrap();
    let (mut c, _, _) = RawClient::open(addr, "g", false);
    // 16 reads of 1 MiB: far more than the sockets' buffers hold.
    for i in 0..16u64 {
        c.request(CMD_READ, 0, i, i << 20, 1 << 20, &[]);
    }
    wait_until(10, "the server to read all 16 requests", || {
        srv.stats().requests == 16
    });
    let drain = start_drain(&srv);
    // Unread by the server: its socket closes with input pending.
    c.request(CMD_READ, 0, 9999, 0, 4096, &[]);
    gated.open();
    let mut seen = [false; 16];
    for n in 0..16 {
        // Slowly: the server finishes its writes into the socket long before the client has
        // read them.
        if n % 4 == 0 {
            std::thread::sleep(Duration::from_millis(150));
        }
        let (errno, handle) = c.simple();
        assert_eq!(errno, 0);
        assert!(handle < 16, "only reads 0..16 were read: {handle}");
        let payload = c.read_n(1 << 20);
        let off = (handle as usize) << 20;
        assert!(
            payload == data[off..off + (1 << 20)],
            "read {handle}'s data"
        );
        seen[handle as usize] = true;
    }
    assert!(seen.iter().all(|s| *s));
    assert!(c.closed(), "connection must close after the last answer");
    let report = drain.join().unwrap();
    assert!(!report.deadline_hit, "{report:?}");
    assert_eq!(report.requests_completed, 16, "{report:?}");
}

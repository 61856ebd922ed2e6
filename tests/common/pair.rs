//! A pair of real hapaird daemons on shared loop devices (interconnect and service addresses on
//! loopback), and a verifying client that reconnects to a service address: shared by the pair
//! tests and the takeover benchmark. Include with `#[path = ".../common/pair.rs"] mod pair;`
//! after `mod common;`.
#![allow(dead_code)]

use super::common::*;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BLOCK: usize = 4096;

pub struct Pair {
    pub dir: tempfile::TempDir,
    _loops: Vec<LoopDev>,
    cfgs: [PathBuf; 2],
    socks: [PathBuf; 2],
    procs: [Option<Child>; 2],
    pub svc: [SocketAddr; 2],
}

fn node_idx(n: &str) -> usize {
    usize::from(n == "b")
}

impl Pair {
    pub fn new(countdown_ms: u64) -> Pair {
        // The mailbox timeout bounds self-fencing (half of it): generous enough for slow disk
        // writes on a busy CI machine.
        Pair::with(countdown_ms, 5000, 300, 8)
    }

    /// A pair with these timings and NVRAM size.
    pub fn with(
        countdown_ms: u64,
        mailbox_timeout_ms: u64,
        cp_interval_ms: u64,
        nvram_mib: u64,
    ) -> Pair {
        let dir = scratch_dir();
        let loops: Vec<LoopDev> = (0..10)
            .map(|i| LoopDev::new(dir.path(), &format!("m{i}.img"), 24 << 20))
            .collect();
        let ic = free_port();
        let port = free_port();
        // Each test its own loopback service addresses.
        let net: u8 = rand::thread_rng().gen_range(20..250);
        let svc = [
            SocketAddr::from(([127, 0, net, 10], port)),
            SocketAddr::from(([127, 0, net, 11], port)),
        ];
        let key = dir.path().join("ic.key");
        std::fs::write(&key, "pair-test-key-0123456789abcdef").unwrap();
        let q = |p: &Path| format!("\"{}\"", p.display());
        let mut cfgs = Vec::new();
        let mut socks = Vec::new();
        for (node, partner) in [("a", "b"), ("b", "a")] {
            let sock = dir.path().join(format!("{node}.sock"));
            let mut t = format!(
                "node = \"{node}\"\n[io]\nworkers = 8\narena_mib = 16\n[pair]\npartner = \"{partner}\"\n\
                 interconnect_listen = \"127.0.0.1:{ic}\"\npartner_interconnect = [\"127.0.0.1:{ic}\"]\nkey_file = {}\n\
                 control_socket = {}\nheartbeat_ms = 100\ninterconnect_timeout_ms = 1000\nmailbox_timeout_ms = {mailbox_timeout_ms}\n\
                 countdown_ms = {countdown_ms}\nholddown_ms = 8000\n",
                q(&key),
                q(&sock)
            );
            for (k, owner) in ["a", "b"].iter().enumerate() {
                let m = &loops[k * 5..k * 5 + 5];
                let log = if *owner == node { "log" } else { "mirror" };
                t += &format!(
                    "[[aggregate]]\nname = \"aggr-{owner}\"\nhome = \"{owner}\"\ndata = [{}]\nparity = {}\nchunk_kib = 64\n\
                     nvram = {}\nnvram_mib = {nvram_mib}\ncp_interval_ms = {cp_interval_ms}\n\
                     [[export]]\nname = \"aggr-{owner}\"\naggregate = \"aggr-{owner}\"\nlisten = \"{}\"\nservice_addrs = [\"{}/32\"]\nservice_interface = \"lo\"\n",
                    m[..4].iter().map(|l| q(&l.dev)).collect::<Vec<_>>().join(", "),
                    q(&m[4].dev),
                    q(&dir.path().join(format!("{node}-aggr-{owner}.{log}"))),
                    svc[k],
                    svc[k].ip(),
                );
            }
            let p = dir.path().join(format!("{node}.toml"));
            std::fs::write(&p, t).unwrap();
            cfgs.push(p);
            socks.push(sock);
        }
        run(Command::new(HAPAIRD).args(["format", "--config", cfgs[0].to_str().unwrap()]));
        let mut pair = Pair {
            dir,
            _loops: loops,
            cfgs: [cfgs[0].clone(), cfgs[1].clone()],
            socks: [socks[0].clone(), socks[1].clone()],
            procs: [None, None],
            svc,
        };
        pair.start("a");
        pair.start("b");
        for n in ["a", "b"] {
            pair.wait_state(n, "Normal", 30);
        }
        for n in ["a", "b"] {
            pair.wait_mirrored(n, 30);
        }
        pair
    }

    /// Wait until `node` reports its partner serving with its log mirrored (a takeover is
    /// refused before). Not "mirrored" alone: what a booting partner says of its log, from
    /// its mailbox flag, holds only until it opens the log and copies it in a new session.
    pub fn wait_mirrored(&self, node: &str, secs: u64) {
        let end = Instant::now() + Duration::from_secs(secs);
        loop {
            let st = self.ctl(node, r#"{"v":1,"cmd":"status"}"#);
            let partner_normal = st["status"]["nodes"].as_array().is_some_and(|v| {
                v.iter()
                    .any(|n| n["local"] == false && n["state"] == "Normal")
            });
            if partner_normal && st["status"]["mirror"]["partner_log_mirrored"] == true {
                return;
            }
            assert!(
                Instant::now() < end,
                "{node}: partner log not mirrored after {secs} s: {}",
                st["status"]["mirror"]
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn start(&mut self, node: &str) {
        let i = node_idx(node);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{node}.log")))
            .unwrap();
        let child = Command::new(HAPAIRD)
            .args(["run", "--config", self.cfgs[i].to_str().unwrap()])
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.procs[i] = Some(child);
    }

    pub fn signal(&mut self, node: &str, sig: i32) {
        let c = self.procs[node_idx(node)].as_ref().expect("running");
        // SAFETY: a pid we spawned.
        unsafe { libc::kill(c.id() as i32, sig) };
        if sig == libc::SIGKILL {
            let mut c = self.procs[node_idx(node)].take().unwrap();
            let _ = c.wait();
        }
    }

    pub fn log(&self, node: &str) -> String {
        let raw = std::fs::read_to_string(self.dir.path().join(format!("{node}.log")))
            .unwrap_or_default();
        // Strip colour codes.
        let mut out = String::with_capacity(raw.len());
        let mut esc = false;
        for ch in raw.chars() {
            match (esc, ch) {
                (false, '\u{1b}') => esc = true,
                (true, 'm') => esc = false,
                (true, _) => {}
                (false, c) => out.push(c),
            }
        }
        out
    }

    /// One request on the control socket.
    pub fn ctl(&self, node: &str, req: &str) -> serde_json::Value {
        let path = &self.socks[node_idx(node)];
        let end = Instant::now() + Duration::from_secs(30);
        let mut s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > end => {
                    panic!("control socket of {node}: {e}\n{}", tail(&self.log(node)))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.write_all(format!("{req}\n").as_bytes()).unwrap();
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        loop {
            match s.read(&mut b) {
                Ok(1) if b[0] != b'\n' => line.push(b[0]),
                Ok(_) => break,
                // A signal to this process (a child exiting) interrupts the read: read again.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => panic!(
                    "no reply from {node} to {req}: {e}\n--- a.log\n{}\n--- b.log\n{}",
                    tail(&self.log("a")),
                    tail(&self.log("b"))
                ),
            }
        }
        serde_json::from_slice(&line)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&line)))
    }

    pub fn state(&self, node: &str) -> String {
        let st = self.ctl(node, r#"{"v":1,"cmd":"status"}"#);
        st["status"]["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["local"] == true)
            .unwrap()["state"]
            .as_str()
            .unwrap()
            .to_string()
    }

    pub fn wait_state(&self, node: &str, want: &str, secs: u64) {
        let end = Instant::now() + Duration::from_secs(secs);
        loop {
            let st = self.state(node);
            if st == want {
                return;
            }
            assert!(
                Instant::now() < end,
                "node {node} is {st}, not {want}, after {secs} s\n--- a.log\n{}\n--- b.log\n{}",
                tail(&self.log("a")),
                tail(&self.log("b"))
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Pair {
    /// Wait until `observer` sees `node` in state `want` (its status' `nodes` list: what it
    /// learnt over the interconnect or from the node's mailbox slot), e.g. before asking the
    /// observer for a giveback that needs the node to be waiting for it.
    pub fn wait_seen_as(&self, observer: &str, node: &str, want: &str, secs: u64) {
        let end = Instant::now() + Duration::from_secs(secs);
        loop {
            let st = self.ctl(observer, r#"{"v":1,"cmd":"status"}"#);
            let seen = st["status"]["nodes"]
                .as_array()
                .and_then(|ns| ns.iter().find(|n| n["name"] == node))
                .map(|n| n["state"].as_str().unwrap_or("").to_string())
                .unwrap_or_default();
            if seen == want {
                return;
            }
            assert!(
                Instant::now() < end,
                "{observer} sees {node} as {seen:?}, not {want}, after {secs} s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

pub fn tail(s: &str) -> String {
    s.lines()
        .rev()
        .take(40)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n")
}

impl Drop for Pair {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- a.log (tail)\n{}\n--- b.log (tail)\n{}",
                tail(&self.log("a")),
                tail(&self.log("b"))
            );
        }
        // A graceful stop releases the service addresses; kill what does not stop.
        for c in self.procs.iter().flatten() {
            // SAFETY: pids we spawned.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        let end = Instant::now() + Duration::from_secs(10);
        for c in self.procs.iter_mut().flatten() {
            while c.try_wait().ok().flatten().is_none() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // And whatever a killed node left on lo.
        for a in &self.svc {
            let _ = Command::new("ip")
                .args(["addr", "del", &format!("{}/32", a.ip()), "dev", "lo"])
                .stderr(Stdio::null())
                .status();
        }
    }
}

pub fn block_data(block: u64, gen: u64) -> Vec<u8> {
    let mut v = pattern(BLOCK, block.wrapping_mul(7_919) ^ gen);
    v[..8].copy_from_slice(&block.to_le_bytes());
    v[8..16].copy_from_slice(&gen.to_le_bytes());
    v
}

/// A client that keeps writing blocks through one service address, reconnecting whenever the
/// connection drops, and remembers exactly which writes were acknowledged.
pub struct Writer {
    pub acked: Arc<Mutex<HashMap<u64, u64>>>,
    /// Writes whose outcome is unknown (the connection died with them in flight).
    pub unknown: Arc<Mutex<HashMap<u64, Vec<u64>>>>,
    pub stop: Arc<AtomicBool>,
    pub pause: Arc<AtomicBool>,
    /// Set by the writer while paused with nothing in flight.
    pub idle: Arc<AtomicBool>,
    pub completed: Arc<AtomicU64>,
    pub max_gap_ms: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

pub fn nbd_connect(addr: SocketAddr, name: &str) -> Option<TcpStream> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.set_nodelay(true).ok()?;
    let mut g = [0u8; 18];
    s.read_exact(&mut g).ok()?;
    if &g[..8] != b"NBDMAGIC" {
        return None;
    }
    s.write_all(&3u32.to_be_bytes()).ok()?; // FIXED_NEWSTYLE | NO_ZEROES
    let mut opt = Vec::new();
    opt.extend_from_slice(b"IHAVEOPT");
    opt.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
    opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
    opt.extend_from_slice(name.as_bytes());
    s.write_all(&opt).ok()?;
    let mut r = [0u8; 10];
    s.read_exact(&mut r).ok()?;
    Some(s)
}

impl Writer {
    pub fn start(addr: SocketAddr, name: &'static str, blocks: u64, seed: u64) -> Writer {
        let w = Writer {
            acked: Arc::default(),
            unknown: Arc::default(),
            stop: Arc::default(),
            pause: Arc::default(),
            idle: Arc::default(),
            completed: Arc::default(),
            max_gap_ms: Arc::default(),
            thread: None,
        };
        let (acked, unknown, stop, pause, completed, gap) = (
            w.acked.clone(),
            w.unknown.clone(),
            w.stop.clone(),
            w.pause.clone(),
            w.completed.clone(),
            w.max_gap_ms.clone(),
        );
        let idle = w.idle.clone();
        let t = std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut gen = 0u64;
            let mut last_done = Instant::now();
            while !stop.load(Ordering::Acquire) {
                if pause.load(Ordering::Acquire) {
                    idle.store(true, Ordering::Release);
                    std::thread::sleep(Duration::from_millis(10));
                    last_done = Instant::now();
                    continue;
                }
                idle.store(false, Ordering::Release);
                let Some(mut s) = nbd_connect(addr, name) else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                // Up to 8 in flight, one per block.
                let mut inflight: HashMap<u64, (u64, u64)> = HashMap::new();
                let mut reader = s.try_clone().unwrap();
                'conn: loop {
                    while inflight.len() < 8
                        && !stop.load(Ordering::Acquire)
                        && !pause.load(Ordering::Acquire)
                    {
                        let mut block = rng.gen_range(0..blocks);
                        while inflight.values().any(|(b, _)| *b == block) {
                            block = rng.gen_range(0..blocks);
                        }
                        gen += 1;
                        let mut req = Vec::with_capacity(28 + BLOCK);
                        req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
                        req.extend_from_slice(&0u16.to_be_bytes());
                        req.extend_from_slice(&1u16.to_be_bytes());
                        req.extend_from_slice(&gen.to_be_bytes());
                        req.extend_from_slice(&(block * BLOCK as u64).to_be_bytes());
                        req.extend_from_slice(&(BLOCK as u32).to_be_bytes());
                        req.extend_from_slice(&block_data(block, gen));
                        inflight.insert(gen, (block, gen));
                        if s.write_all(&req).is_err() {
                            break 'conn;
                        }
                    }
                    if inflight.is_empty() {
                        break 'conn;
                    }
                    let mut h = [0u8; 16];
                    if reader.read_exact(&mut h).is_err() {
                        break 'conn;
                    }
                    let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
                    let handle = u64::from_be_bytes(h[8..16].try_into().unwrap());
                    let (block, g) = inflight
                        .remove(&handle)
                        .expect("reply to a request we sent");
                    assert_eq!(err, 0, "write of block {block} failed with NBD error {err}: a takeover must never fail a request");
                    acked.lock().unwrap().insert(block, g);
                    unknown.lock().unwrap().remove(&block);
                    completed.fetch_add(1, Ordering::Relaxed);
                    let now = Instant::now();
                    gap.fetch_max((now - last_done).as_millis() as u64, Ordering::Relaxed);
                    last_done = now;
                }
                // The connection died (or we stopped): what was in flight may or may not land.
                for (_, (block, g)) in inflight.drain() {
                    unknown.lock().unwrap().entry(block).or_default().push(g);
                }
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        });
        Writer {
            thread: Some(t),
            ..w
        }
    }

    /// Pause writing, then read every block written through `addr` and check it.
    pub fn verify(&self, addr: SocketAddr, name: &str, what: &str) -> usize {
        self.pause.store(true, Ordering::Release);
        let end = Instant::now() + Duration::from_secs(30);
        while !self.idle.load(Ordering::Acquire) {
            assert!(
                Instant::now() < end,
                "{what}: the writer's requests did not complete within 30 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut s = None;
        for _ in 0..200 {
            s = nbd_connect(addr, name);
            if s.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut s = s.unwrap_or_else(|| panic!("{what}: cannot reach {addr}"));
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let acked = self.acked.lock().unwrap().clone();
        let mut unknown = self.unknown.lock().unwrap();
        let mut landed = Vec::new();
        for (&block, &gen) in &acked {
            let mut req = Vec::new();
            req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
            req.extend_from_slice(&0u16.to_be_bytes());
            req.extend_from_slice(&0u16.to_be_bytes());
            req.extend_from_slice(&block.to_be_bytes());
            req.extend_from_slice(&(block * BLOCK as u64).to_be_bytes());
            req.extend_from_slice(&(BLOCK as u32).to_be_bytes());
            let mut h = [0u8; 16];
            let mut got = vec![0u8; BLOCK];
            let mut tries = 0;
            loop {
                let r = s
                    .write_all(&req)
                    .and_then(|_| s.read_exact(&mut h))
                    .and_then(|_| s.read_exact(&mut got));
                match r {
                    Ok(()) => break,
                    // A verifying read is idempotent: on a busy machine a connection can time out;
                    // read again on a new one (data, not connections, is what is checked).
                    Err(e) if tries < 3 => {
                        tries += 1;
                        eprintln!(
                            "{what}: verify read of block {block} failed ({e}); reconnecting"
                        );
                        s = nbd_connect(addr, name)
                            .unwrap_or_else(|| panic!("{what}: cannot reconnect to {addr}"));
                        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                    }
                    Err(e) => panic!("{what}: verify read of block {block} keeps failing: {e}"),
                }
            }
            assert_eq!(u32::from_be_bytes(h[4..8].try_into().unwrap()), 0);
            let read_gen = u64::from_le_bytes(got[8..16].try_into().unwrap());
            let later_unknown = unknown
                .get(&block)
                .is_some_and(|g| g.contains(&read_gen) && read_gen > gen);
            assert!(
                got == block_data(block, gen) || (later_unknown && got == block_data(block, read_gen)),
                "{what}: ACKNOWLEDGED WRITE LOST: block {block} acked gen {gen}, read gen {read_gen}"
            );
            if later_unknown {
                // That write landed after all: it is what the block holds from now on.
                unknown.remove(&block);
                landed.push((block, read_gen));
            }
        }
        drop(unknown);
        self.acked.lock().unwrap().extend(landed);
        self.idle.store(false, Ordering::Release);
        self.pause.store(false, Ordering::Release);
        acked.len()
    }

    pub fn finish(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.join().expect("writer thread");
        }
    }
}

pub fn outcome(reply: &serde_json::Value) -> String {
    reply["outcome"]["result"]
        .as_str()
        .unwrap_or("?")
        .to_string()
}

pub fn phases(reply: &serde_json::Value) -> String {
    reply["outcome"]["report"]["phases"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .map(|p| {
                    format!(
                        "{}={}ms",
                        p["step"].as_str().unwrap_or("?"),
                        p["elapsed_ms"]
                    )
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

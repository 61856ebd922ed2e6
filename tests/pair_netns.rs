//! Identity takeover end to end (issue 7): two `hapaird` processes, each in its own network
//! namespace, a client in a third, all on one bridge (in a fourth namespace); the shared disks
//! are loop devices on the host that both daemons open. A client in its namespace writes
//! through node a's service IP with a tracking NBD client (every acknowledged write is
//! remembered; a connection that drops is reopened to the same service IP and the writes that
//! were in flight are sent again, as qemu's `reconnect-delay` does), while the service moves:
//!
//! 1. graceful takeover of a by b (operator command on b's control socket), then giveback;
//! 2. hard takeover: a's daemon is killed with SIGKILL and its machine's network goes silent
//!    (see `hard_takeover` for why both), b fences through the mailbox and serves a's export.
//!
//! After each move every acknowledged write reads back through the same service IP, the
//! client's neighbour entry for that IP names the new holder's MAC (the gratuitous ARP did it,
//! long before a neighbour timeout could have), the TCP connection ends in the new holder's
//! namespace, and the client-visible pause (longest gap between completed requests) is printed.
//!
//! Everything the test makes (namespaces with their veths and bridge, loop devices, daemons) is
//! removed by Drop guards, also when it fails. Only documentation addresses are used.
//!
//! Measured on the 2-core dev VM (debug build, four runs): client pause 0.95-1.1 s for the
//! graceful takeover (b's TakePartnerIdentity alone is ~0.82 s: 3 ARP probes 100 ms apart,
//! 200 ms of listening, 3 announcement rounds), 1.07-1.30 s for giveback (a's TakeOwnIps the
//! same ~0.83 s), 4.0-4.3 s for the hard takeover (interconnect and mailbox silence, then
//! Fence waits the 1.5 s self-fence bound for a dead partner, replay, then the same ~0.82 s of
//! identity). The whole test takes ~16 s.
//!
//! Run as root: `cargo test --test pair_netns -- --nocapture`.

mod common;

use common::{pattern, require_root, require_tool, scratch_dir, LoopDev, HAPAIRD};
use hapair::core::nbd::*;
use hapair::io::netns::NetNs;
use rand::{Rng, SeedableRng};
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MAC_A: &str = "02:00:00:00:00:0a";
const MAC_B: &str = "02:00:00:00:00:0b";
const MAC_C: &str = "02:00:00:00:00:0c";
const NODE_A: &str = "192.0.2.1";
const NODE_B: &str = "192.0.2.2";
const CLIENT: &str = "192.0.2.100";
const SVC_A: &str = "192.0.2.10";
const SVC_B: &str = "192.0.2.11";
const NBD_PORT: u16 = 10809;
const IC_PORT: u16 = 7700;
const BLOCK: usize = 4096;
/// The client writes inside the first 16 MiB of the export.
const BLOCKS: u64 = 4096;
/// Requests the client keeps in flight.
const DEPTH: usize = 8;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Run `ip ARGS`, panicking with its stderr if it fails.
fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The namespaces: bridge, node a, node b, client. Deleted on drop (veths and bridge go too).
struct Topo {
    br: String,
    a: String,
    b: String,
    c: String,
    made: Vec<String>,
}

impl Topo {
    fn new() -> Topo {
        let id = format!(
            "hpn{}n{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let mut t = Topo {
            br: format!("{id}-br"),
            a: format!("{id}-a"),
            b: format!("{id}-b"),
            c: format!("{id}-c"),
            made: Vec::new(),
        };
        for ns in [t.br.clone(), t.a.clone(), t.b.clone(), t.c.clone()] {
            ip(&["netns", "add", &ns]);
            t.made.push(ns);
        }
        let br = t.br.clone();
        ip(&[
            "-n",
            &br,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ]);
        ip(&["-n", &br, "link", "set", "br0", "up"]);
        for (ns, port, mac, v4) in [
            (t.a.clone(), "p-a", MAC_A, NODE_A),
            (t.b.clone(), "p-b", MAC_B, NODE_B),
            (t.c.clone(), "p-c", MAC_C, CLIENT),
        ] {
            ip(&[
                "-n", &br, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ]);
            ip(&["-n", &br, "link", "set", port, "master", "br0", "up"]);
            ip(&["-n", &ns, "link", "set", "eth0", "address", mac]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "addr", "add", &format!("{v4}/24"), "dev", "eth0"]);
        }
        t
    }
}

impl Drop for Topo {
    fn drop(&mut self) {
        for ns in self.made.iter().rev() {
            match Command::new("ip").args(["netns", "del", ns]).output() {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!(
                    "cleanup: ip netns del {ns}: {}",
                    String::from_utf8_lossy(&o.stderr)
                ),
                Err(e) => eprintln!("cleanup: ip netns del {ns}: {e}"),
            }
        }
    }
}

/// One `hapaird run` inside a namespace (`ip netns exec` execs it: the pid is hapaird's).
/// Killed on drop if still running.
struct NodeProc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl NodeProc {
    fn spawn(name: &str, ns: &str, cfg: &Path, log: PathBuf) -> NodeProc {
        let f = std::fs::File::create(&log).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns, HAPAIRD, "run", "--config"])
            .arg(cfg)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .expect("spawn ip netns exec hapaird");
        NodeProc {
            name: name.into(),
            child: Some(child),
            log,
        }
    }

    /// Send `sig` and wait for the process to end; returns its exit status.
    fn signal_and_wait(&mut self, sig: i32) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        // SAFETY: kill() on the pid of a child we spawned and have not yet reaped.
        let rc = unsafe { libc::kill(c.id() as i32, sig) };
        assert_eq!(
            rc,
            0,
            "kill {}: {}",
            self.name,
            std::io::Error::last_os_error()
        );
        c.wait().unwrap()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Everything the test made; fields drop in order: daemons, namespaces, loop devices, files.
struct World {
    nodes: Vec<NodeProc>,
    topo: Topo,
    _loops: Vec<LoopDev>,
    dir: tempfile::TempDir,
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for n in &self.nodes {
                let text = n.log_text();
                let lines: Vec<&str> = text.lines().collect();
                eprintln!(
                    "---- last lines of node {} log ({}) ----",
                    n.name,
                    n.log.display()
                );
                for l in &lines[lines.len().saturating_sub(60)..] {
                    eprintln!("{l}");
                }
            }
        }
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                // SAFETY: kill() on a child we spawned and have not reaped.
                unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
                let _ = c.wait();
            }
        }
    }
}

impl World {
    fn node(&mut self, name: &str) -> &mut NodeProc {
        self.nodes.iter_mut().find(|n| n.name == name).unwrap()
    }
    fn sock(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.sock"))
    }
}

/// The two configurations: each node lists both aggregates (2 data + 1 parity loop devices
/// each), its own log or its mirror of the partner's, the interconnect on the node addresses,
/// and each export on its service IP on eth0.
fn write_configs(dir: &Path, loops: &[LoopDev]) -> [PathBuf; 2] {
    let key = dir.join("interconnect.key");
    std::fs::write(&key, "00112233445566778899aabbccddeeff").unwrap();
    let q = |p: &Path| format!("\"{}\"", p.display());
    let members = |owner: &str| {
        let l = if owner == "a" {
            &loops[0..3]
        } else {
            &loops[3..6]
        };
        (format!("{}, {}", q(&l[0].dev), q(&l[1].dev)), q(&l[2].dev))
    };
    let mut out = Vec::new();
    for (node, partner, me, other) in [("a", "b", NODE_A, NODE_B), ("b", "a", NODE_B, NODE_A)] {
        std::fs::create_dir_all(dir.join(node)).unwrap();
        let mut text = format!(
            "node = \"{node}\"\n[io]\nengine = \"io_uring\"\narena_mib = 16\nworkers = 4\n\n[pair]\npartner = \"{partner}\"\n\
             interconnect_listen = \"{me}:{IC_PORT}\"\npartner_interconnect = [\"{other}:{IC_PORT}\"]\nkey_file = {}\n\
             control_socket = {}\nheartbeat_ms = 100\ninterconnect_timeout_ms = 1000\nmailbox_timeout_ms = 1500\ncountdown_ms = 10000\n",
            q(&key),
            q(&dir.join(format!("{node}.sock")))
        );
        for (owner, svc) in [("a", SVC_A), ("b", SVC_B)] {
            let (d, p) = members(owner);
            let log = if owner == node {
                format!("aggr-{owner}.nvlog")
            } else {
                format!("aggr-{owner}.mirror")
            };
            text += &format!(
                "\n[[aggregate]]\nname = \"aggr-{owner}\"\nhome = \"{owner}\"\ndata = [{d}]\nparity = {p}\nchunk_kib = 64\n\
                 nvram = {}\nnvram_mib = 16\ncp_interval_ms = 500\n\n[[export]]\nname = \"aggr-{owner}\"\naggregate = \"aggr-{owner}\"\n\
                 listen = \"{svc}:{NBD_PORT}\"\nservice_addrs = [\"{svc}/24\"]\nservice_interface = \"eth0\"\n",
                q(&dir.join(node).join(log))
            );
        }
        let path = dir.join(format!("{node}.toml"));
        std::fs::write(&path, text).unwrap();
        out.push(path);
    }
    [out[0].clone(), out[1].clone()]
}

/// One operator command on a control socket; the reply as JSON.
fn control(sock: &Path, req: &str) -> serde_json::Value {
    let mut s =
        UnixStream::connect(sock).unwrap_or_else(|e| panic!("connect {}: {e}", sock.display()));
    s.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
    s.write_all(format!("{req}\n").as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .unwrap_or_else(|e| panic!("{req}: no reply: {e}"));
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{req}: bad reply {line:?}: {e}"))
}

/// The node's last `n` HA steps with their durations, oldest first ("Step=ms").
fn step_times(sock: &Path, n: usize) -> String {
    let st = control(sock, r#"{"v":1,"cmd":"status"}"#);
    let steps = st["status"]["extra"]["step_times_ms"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut v: Vec<String> = steps
        .iter()
        .take(n)
        .map(|s| format!("{}={}", s[0].as_str().unwrap_or("?"), s[1]))
        .collect();
    v.reverse();
    v.join(" ")
}

fn headline(sock: &Path) -> String {
    control(sock, r#"{"v":1,"cmd":"status"}"#)["status"]["headline"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// Does namespace `ns` hold `addr` on eth0?
fn holds(ns: &str, addr: &str) -> bool {
    ip(&["-n", ns, "-4", "addr", "show", "dev", "eth0"]).contains(&format!("inet {addr}/"))
}

/// The client's neighbour entry for `addr` on eth0: its MAC, if it has one.
fn neigh_mac(ns: &str, addr: &str) -> Option<String> {
    let out = ip(&["-n", ns, "neigh", "show", "to", addr, "dev", "eth0"]);
    let words: Vec<&str> = out.split_whitespace().collect();
    let i = words.iter().position(|w| *w == "lladdr")?;
    words.get(i + 1).map(|s| s.to_string())
}

/// Established TCP connections in `ns` whose local end is `addr`:NBD_PORT.
fn nbd_conns_in(ns: &str, addr: &str) -> usize {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "ss", "-Htn", "state", "established"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ss in {ns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter(|l| l.contains(&format!("{addr}:{NBD_PORT}")) && l.contains(CLIENT))
        .count()
}

/// Watches the client's neighbour entry for `addr` from now on and records when it first
/// names `mac`.
struct NeighWatch {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Option<Duration>>>,
    thread: Option<std::thread::JoinHandle<()>>,
    start: Instant,
}

impl NeighWatch {
    fn start(ns: &str, addr: &str, mac: &str) -> NeighWatch {
        let (stop, seen) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(None)));
        let start = Instant::now();
        let (ns, addr, mac, st, se) = (
            ns.to_string(),
            addr.to_string(),
            mac.to_string(),
            stop.clone(),
            seen.clone(),
        );
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Acquire) {
                if neigh_mac(&ns, &addr).as_deref() == Some(mac.as_str()) {
                    *se.lock().unwrap() = Some(start.elapsed());
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        NeighWatch {
            stop,
            seen,
            thread: Some(thread),
            start,
        }
    }

    /// When the entry first named the MAC (since `start`), waiting at most `within` more.
    fn finish(mut self, within: Duration) -> Option<Duration> {
        let end = Instant::now() + within;
        while self.seen.lock().unwrap().is_none() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.stop.store(true, Ordering::Release);
        self.thread.take().unwrap().join().unwrap();
        let s = *self.seen.lock().unwrap();
        let _ = self.start;
        s
    }
}

// ------------------------------------------------------------------------------------------
// The client: a minimal NBD client whose sockets live in the client's namespace.
// ------------------------------------------------------------------------------------------

struct Nbd {
    s: TcpStream,
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

fn io_err(m: String) -> std::io::Error {
    std::io::Error::other(m)
}

impl Nbd {
    /// Connect from namespace `ns` to `addr` and open `export` (fixed newstyle, NBD_OPT_GO,
    /// simple replies).
    fn open(ns: &NetNs, addr: SocketAddr, export: &str) -> std::io::Result<Nbd> {
        let s = ns.run(|| TcpStream::connect_timeout(&addr, Duration::from_millis(300)))??;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.set_write_timeout(Some(Duration::from_secs(10)))?;
        let mut c = Nbd { s };
        let g = c.read_n(18)?;
        if be64(&g[0..8]) != NBDMAGIC || be64(&g[8..16]) != IHAVEOPT {
            return Err(io_err("bad greeting".into()));
        }
        c.s.write_all(&(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES).to_be_bytes())?;
        let mut data = (export.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&OPT_GO.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(&data);
        c.s.write_all(&m)?;
        loop {
            let h = c.read_n(20)?;
            if be64(&h[0..8]) != OPTION_REPLY_MAGIC {
                return Err(io_err("bad option reply magic".into()));
            }
            let ty = be32(&h[12..16]);
            let _ = c.read_n(be32(&h[16..20]) as usize)?;
            match ty {
                REP_ACK => return Ok(c),
                REP_INFO => {}
                t => return Err(io_err(format!("NBD_OPT_GO refused: reply type {t:#x}"))),
            }
        }
    }

    fn read_n(&mut self, n: usize) -> std::io::Result<Vec<u8>> {
        let mut v = vec![0u8; n];
        self.s.read_exact(&mut v)?;
        Ok(v)
    }

    fn send(
        &mut self,
        kind: u16,
        handle: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> std::io::Result<()> {
        let mut m = Vec::with_capacity(28 + payload.len());
        m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        m.extend_from_slice(&0u16.to_be_bytes());
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&handle.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(payload);
        self.s.write_all(&m)
    }

    /// One simple reply: (errno, handle).
    fn reply(&mut self) -> std::io::Result<(u32, u64)> {
        let h = self.read_n(16)?;
        if be32(&h[0..4]) != SIMPLE_REPLY_MAGIC {
            return Err(io_err(format!("bad reply magic {:#x}", be32(&h[0..4]))));
        }
        Ok((be32(&h[4..8]), be64(&h[8..16])))
    }

    fn read_block(&mut self, block: u64) -> std::io::Result<Vec<u8>> {
        self.send(CMD_READ, block, block * BLOCK as u64, BLOCK as u32, &[])?;
        let (err, h) = self.reply()?;
        if err != 0 || h != block {
            return Err(io_err(format!(
                "read of block {block}: errno {err}, handle {h}"
            )));
        }
        self.read_n(BLOCK)
    }
}

/// Content of `block` as written by write number `gen`: a read tells which write it came from.
fn block_data(block: u64, gen: u64) -> Vec<u8> {
    let mut v = pattern(BLOCK, block.wrapping_mul(1_000_003) ^ gen);
    v[..8].copy_from_slice(&block.to_le_bytes());
    v[8..16].copy_from_slice(&gen.to_le_bytes());
    v
}

/// What the client knows across moves: the last acknowledged write of every block.
struct Tracker {
    acked: HashMap<u64, u64>,
    next_gen: u64,
    rng: rand::rngs::StdRng,
}

/// What one run of the workload saw.
#[derive(Debug, Default)]
struct RunStats {
    completed: u64,
    reconnects: u32,
    resent: u32,
    /// Longest time between two completed requests, and when it ended (since the run began).
    longest_gap: Duration,
    gap_end: Duration,
    /// Replies with an error: a client like qemu fails those requests.
    errors: Vec<String>,
}

/// Write random blocks with DEPTH requests in flight through `addr` until `stop`, then wait
/// for every write in flight to be acknowledged. A connection that drops is reopened to the
/// same address and the writes in flight are sent again.
fn workload(
    ns: &NetNs,
    addr: SocketAddr,
    export: &str,
    tr: &mut Tracker,
    stop: &AtomicBool,
    give_up: Duration,
) -> RunStats {
    let t0 = Instant::now();
    let mut st = RunStats::default();
    let mut last = t0;
    // Writes sent and not yet acknowledged, in order: (gen = handle, block).
    let mut pending: VecDeque<(u64, u64)> = VecDeque::new();
    let mut busy: HashSet<u64> = HashSet::new();
    let mut conn: Option<Nbd> = None;
    let mut lost_at: Option<Instant> = None;
    loop {
        let stopping = stop.load(Ordering::Acquire);
        if stopping && pending.is_empty() {
            break;
        }
        let c = match conn.as_mut() {
            Some(c) => c,
            None => {
                if let Some(at) = lost_at {
                    assert!(
                        at.elapsed() < give_up,
                        "client could not reconnect to {addr} within {give_up:?}"
                    );
                }
                match Nbd::open(ns, addr, export) {
                    Ok(mut c) => {
                        let mut ok = true;
                        for &(gen, block) in &pending {
                            if c.send(
                                CMD_WRITE,
                                gen,
                                block * BLOCK as u64,
                                BLOCK as u32,
                                &block_data(block, gen),
                            )
                            .is_err()
                            {
                                ok = false;
                                break;
                            }
                            st.resent += 1;
                        }
                        if ok {
                            lost_at = None;
                            conn = Some(c);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
                continue;
            }
        };
        let mut broken = false;
        while !stopping && pending.len() < DEPTH {
            let mut block = tr.rng.gen_range(0..BLOCKS);
            while busy.contains(&block) {
                block = tr.rng.gen_range(0..BLOCKS);
            }
            tr.next_gen += 1;
            let gen = tr.next_gen;
            pending.push_back((gen, block));
            busy.insert(block);
            if c.send(
                CMD_WRITE,
                gen,
                block * BLOCK as u64,
                BLOCK as u32,
                &block_data(block, gen),
            )
            .is_err()
            {
                broken = true;
                break;
            }
        }
        if !broken {
            match c.reply() {
                Ok((err, handle)) => {
                    let i = pending
                        .iter()
                        .position(|&(g, _)| g == handle)
                        .unwrap_or_else(|| panic!("reply to unknown handle {handle}"));
                    let (gen, block) = pending.remove(i).unwrap();
                    if err != 0 {
                        // Counted as a failed request (qemu fails it); the block stays as it was.
                        st.errors.push(format!(
                            "write gen {gen} block {block}: errno {err} at {:?}",
                            t0.elapsed()
                        ));
                    } else {
                        tr.acked.insert(block, gen);
                    }
                    busy.remove(&block);
                    st.completed += 1;
                    let now = Instant::now();
                    if now - last > st.longest_gap {
                        st.longest_gap = now - last;
                        st.gap_end = now - t0;
                    }
                    last = now;
                }
                Err(_) => broken = true,
            }
        }
        if broken {
            conn = None;
            st.reconnects += 1;
            lost_at = Some(Instant::now());
        }
    }
    st
}

/// Read back every acknowledged block through `addr` on a new connection; panics on the first
/// mismatch. Returns how many blocks were checked.
fn verify_all(ns: &NetNs, addr: SocketAddr, export: &str, tr: &Tracker, when: &str) -> usize {
    let mut c = Nbd::open(ns, addr, export).unwrap_or_else(|e| panic!("{when}: open {addr}: {e}"));
    let mut blocks: Vec<(&u64, &u64)> = tr.acked.iter().collect();
    blocks.sort();
    for (&block, &gen) in &blocks {
        let got = c
            .read_block(block)
            .unwrap_or_else(|e| panic!("{when}: {e}"));
        assert!(
            got == block_data(block, gen),
            "{when}: ACKNOWLEDGED WRITE LOST: block {block} should hold write {gen}, reads as write {} of block {}",
            u64::from_le_bytes(got[8..16].try_into().unwrap()),
            u64::from_le_bytes(got[0..8].try_into().unwrap())
        );
    }
    blocks.len()
}

/// A workload running on its own thread while the test moves the service.
struct Running {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(Tracker, RunStats)>,
}

fn start_workload(client_ns: &str, addr: SocketAddr, export: &str, tr: Tracker) -> Running {
    let stop = Arc::new(AtomicBool::new(false));
    let (s, ns, export) = (
        stop.clone(),
        NetNs::by_name(client_ns).unwrap(),
        export.to_string(),
    );
    let thread = std::thread::spawn(move || {
        let mut tr = tr;
        let st = workload(&ns, addr, &export, &mut tr, &s, Duration::from_secs(30));
        (tr, st)
    });
    Running { stop, thread }
}

impl Running {
    fn finish(self) -> (Tracker, RunStats) {
        self.stop.store(true, Ordering::Release);
        self.thread
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    }
}

fn wait_until(within: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    t0.elapsed()
}

/// `outcome.result` of an operator command's reply.
fn outcome_of(reply: &serde_json::Value) -> String {
    reply["outcome"]["result"]
        .as_str()
        .unwrap_or("?")
        .to_string()
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

#[test]
fn identity_moves_with_the_export_and_no_acknowledged_write_is_lost() {
    require_root();
    for t in ["ip", "ss", "losetup"] {
        require_tool(t);
    }
    let test_start = Instant::now();
    let dir = scratch_dir();
    let loops: Vec<LoopDev> = (0..6)
        .map(|i| LoopDev::new(dir.path(), &format!("m{i}.img"), 40 << 20))
        .collect();
    let [cfg_a, cfg_b] = write_configs(dir.path(), &loops);
    let topo = Topo::new();
    let mut w = World {
        nodes: Vec::new(),
        topo,
        _loops: loops,
        dir,
    };
    let out = Command::new(HAPAIRD)
        .args(["format", "--config"])
        .arg(&cfg_a)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "format: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ns_a, ns_b, ns_c) = (w.topo.a.clone(), w.topo.b.clone(), w.topo.c.clone());
    let log_a = w.dir.path().join("a.log");
    let log_b = w.dir.path().join("b.log");
    w.nodes
        .push(NodeProc::spawn("a", &ns_a, &cfg_a, log_a.clone()));
    w.nodes
        .push(NodeProc::spawn("b", &ns_b, &cfg_b, log_b.clone()));
    let (sock_a, sock_b) = (w.sock("a"), w.sock("b"));
    let client = NetNs::by_name(&ns_c).unwrap();
    let svc_a: SocketAddr = format!("{SVC_A}:{NBD_PORT}").parse().unwrap();
    let svc_b: SocketAddr = format!("{SVC_B}:{NBD_PORT}").parse().unwrap();
    let up = wait_until(
        Duration::from_secs(60),
        "both exports reachable from the client",
        || {
            Nbd::open(&client, svc_a, "aggr-a").is_ok()
                && Nbd::open(&client, svc_b, "aggr-b").is_ok()
        },
    );
    eprintln!(
        "pair up, both exports reachable from the client namespace after {} ms",
        ms(up)
    );
    assert!(
        holds(&ns_a, SVC_A) && !holds(&ns_b, SVC_A),
        "a holds its service address"
    );
    assert!(
        holds(&ns_b, SVC_B) && !holds(&ns_a, SVC_B),
        "b holds its service address"
    );

    // ---- 1. The client writes and verifies through a's service IP. ----
    let mut tr = Tracker {
        acked: HashMap::new(),
        next_gen: 0,
        rng: rand::rngs::StdRng::seed_from_u64(7),
    };
    let run = start_workload(&ns_c, svc_a, "aggr-a", tr);
    std::thread::sleep(Duration::from_millis(1000));
    let (t, st) = run.finish();
    tr = t;
    assert!(
        st.errors.is_empty() && st.reconnects == 0,
        "steady state: {st:?}"
    );
    assert!(st.completed > 50, "the client wrote too little: {st:?}");
    let n = verify_all(&client, svc_a, "aggr-a", &tr, "before takeover");
    assert_eq!(
        neigh_mac(&ns_c, SVC_A).as_deref(),
        Some(MAC_A),
        "client reaches a's service IP at a's MAC"
    );
    eprintln!("steady state: {} writes acknowledged by a, {n} blocks verified; client's entry {SVC_A} -> {MAC_A}", st.completed);

    // ---- 2. Graceful takeover of a by b, under the workload. ----
    let run = start_workload(&ns_c, svc_a, "aggr-a", tr);
    std::thread::sleep(Duration::from_millis(500));
    let watch = NeighWatch::start(&ns_c, SVC_A, MAC_B);
    let t0 = Instant::now();
    let r = control(
        &sock_b,
        r#"{"v":1,"cmd":"takeover","of":"a","countdown_ms":10000,"timeout_ms":30000}"#,
    );
    let cmd_ms = t0.elapsed();
    assert_eq!(outcome_of(&r), "completed", "takeover of a: {r}");
    let neigh = watch
        .finish(Duration::from_secs(5))
        .expect("client's neighbour entry for a's service IP never named b's MAC");
    // The client is served by b through a's address: a connection in b's namespace ends there.
    wait_until(
        Duration::from_secs(10),
        "client connection to a's service IP established in b's namespace",
        || nbd_conns_in(&ns_b, SVC_A) >= 1,
    );
    std::thread::sleep(Duration::from_millis(500));
    let (t, st_to) = run.finish();
    tr = t;
    assert!(
        st_to.errors.is_empty(),
        "graceful takeover failed requests: {:?}",
        st_to.errors
    );
    assert!(
        st_to.reconnects >= 1,
        "the client's connection must have moved: {st_to:?}"
    );
    assert!(
        holds(&ns_b, SVC_A) && !holds(&ns_a, SVC_A),
        "a's service address moved to b"
    );
    assert_eq!(
        nbd_conns_in(&ns_a, SVC_A),
        0,
        "nothing served by a any more"
    );
    let n = verify_all(&client, svc_a, "aggr-a", &tr, "after graceful takeover");
    assert_eq!(neigh_mac(&ns_c, SVC_A).as_deref(), Some(MAC_B));
    eprintln!(
        "GRACEFUL TAKEOVER: command {} ms; client pause {} ms (longest gap between completions, {} reconnect(s), {} write(s) resent); \
         client's entry {SVC_A} -> {MAC_B} {} ms after the command was sent; {n} blocks verified through {SVC_A} served by b; b: {}",
        ms(cmd_ms), ms(st_to.longest_gap), st_to.reconnects, st_to.resent, ms(neigh), headline(&sock_b)
    );
    eprintln!("  b's steps (ms): {}", step_times(&sock_b, 5));
    // b's own export was not disturbed.
    assert!(Nbd::open(&client, svc_b, "aggr-b").is_ok());

    // ---- 3. Giveback, under the workload. ----
    let run = start_workload(&ns_c, svc_a, "aggr-a", tr);
    std::thread::sleep(Duration::from_millis(500));
    let watch = NeighWatch::start(&ns_c, SVC_A, MAC_A);
    let t0 = Instant::now();
    let r = control(&sock_b, r#"{"v":1,"cmd":"giveback","timeout_ms":30000}"#);
    let cmd_ms = t0.elapsed();
    assert_eq!(outcome_of(&r), "completed", "giveback: {r}");
    let neigh = watch
        .finish(Duration::from_secs(10))
        .expect("client's neighbour entry for a's service IP never named a's MAC again");
    wait_until(
        Duration::from_secs(10),
        "client connection to a's service IP established in a's namespace",
        || nbd_conns_in(&ns_a, SVC_A) >= 1,
    );
    std::thread::sleep(Duration::from_millis(500));
    let (t, st_gb) = run.finish();
    tr = t;
    assert!(
        st_gb.errors.is_empty(),
        "giveback failed requests: {:?}",
        st_gb.errors
    );
    assert!(st_gb.reconnects >= 1, "{st_gb:?}");
    assert!(
        holds(&ns_a, SVC_A) && !holds(&ns_b, SVC_A),
        "a's service address is back on a"
    );
    let n = verify_all(&client, svc_a, "aggr-a", &tr, "after giveback");
    eprintln!(
        "  b's steps (ms): {}; a's steps (ms): {}",
        step_times(&sock_b, 4),
        step_times(&sock_a, 5)
    );
    assert_eq!(neigh_mac(&ns_c, SVC_A).as_deref(), Some(MAC_A));
    eprintln!(
        "GIVEBACK: command {} ms; client pause {} ms ({} reconnect(s), {} resent); client's entry {SVC_A} -> {MAC_A} {} ms after the command \
         was sent; {n} blocks verified through {SVC_A} served by a; a: {}",
        ms(cmd_ms), ms(st_gb.longest_gap), st_gb.reconnects, st_gb.resent, ms(neigh), headline(&sock_a)
    );

    // ---- 4. Hard takeover: a dies under the workload. ----
    let run = start_workload(&ns_c, svc_a, "aggr-a", tr);
    std::thread::sleep(Duration::from_millis(700));
    let watch = NeighWatch::start(&ns_c, SVC_A, MAC_B);
    let t0 = Instant::now();
    let status = w.node("a").signal_and_wait(libc::SIGKILL);
    assert_eq!(status.code(), None, "a was killed");
    hard_takeover_node_silence(&ns_a);
    let neigh = watch
        .finish(Duration::from_secs(20))
        .expect("client's neighbour entry for a's service IP never named b's MAC");
    wait_until(
        Duration::from_secs(20),
        "client connection to a's service IP in b's namespace",
        || nbd_conns_in(&ns_b, SVC_A) >= 1,
    );
    let served = t0.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let (t, st_hd) = run.finish();
    tr = t;
    assert!(
        st_hd.errors.is_empty(),
        "hard takeover failed requests: {:?}",
        st_hd.errors
    );
    assert!(holds(&ns_b, SVC_A), "b holds a's service address");
    let n = verify_all(&client, svc_a, "aggr-a", &tr, "after hard takeover");
    let hb = headline(&sock_b);
    eprintln!(
        "HARD TAKEOVER: client pause {} ms ({} reconnect(s), {} resent); client's entry {SVC_A} -> {MAC_B} {} ms after SIGKILL; client \
         connected to b {} ms after SIGKILL; {n} blocks verified; b: {hb}",
        ms(st_hd.longest_gap), st_hd.reconnects, st_hd.resent, ms(neigh), ms(served)
    );
    eprintln!("  b's steps (ms): {}", step_times(&sock_b, 5));
    let log = w.node("b").log_text();
    assert!(
        log.contains("Fence"),
        "b fenced a before taking over:\n{log}"
    );

    // b stops cleanly.
    let status = w.node("b").signal_and_wait(libc::SIGTERM);
    assert!(status.success(), "b stopped: {status:?}");
    eprintln!(
        "SUMMARY pauses: graceful takeover {} ms, giveback {} ms, hard takeover {} ms; whole test {} ms",
        ms(st_to.longest_gap), ms(st_gb.longest_gap), ms(st_hd.longest_gap), ms(test_start.elapsed())
    );
    drop(w);
}

/// Node a's machine dies: its daemon is already gone (SIGKILL, reaped: its sockets were closed
/// by a's kernel, so the client saw its connection end), and now its network goes silent.
///
/// Why not the SIGKILL alone: a's kernel lives on in its namespace and keeps a's service
/// address on eth0 (nothing removes it once the daemon is dead), so it answers b's ARP probe
/// for that address. b's TakePartnerIdentity then takes it anyway after
/// `conflict_override_ms` (the partner is fenced; see `identity::take_fenced`, tested in
/// tests/ip_takeover.rs), but a would still answer clients that re-resolve the address: the
/// daemon-crash-on-a-live-host case. A dead machine answers nothing, which is what this models.
fn hard_takeover_node_silence(ns_a: &str) {
    ip(&["-n", ns_a, "link", "set", "eth0", "down"]);
}

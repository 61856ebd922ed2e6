//! Takeover benchmark, run by hand: `cargo bench --bench takeover`.
//!
//! What a client sees while an aggregate moves between the nodes of a real pair (two `hapaird`
//! release daemons on shared loop devices, interconnect and service addresses on loopback: the
//! fixture of `tests/pair.rs`). One verifying client (`Writer`: 4 KiB writes, 8 in flight, one
//! NBD connection to b's service address, reconnecting whenever it drops) writes to b's
//! aggregate the whole time. Each round makes these moves of b's aggregate, in this order:
//!
//! 1. graceful takeover asked at the partner (`takeover of b` at a),
//! 2. giveback (at a),
//! 3. graceful takeover asked at the node itself (`takeover` at b),
//! 4. giveback,
//! 5. hard takeover: SIGKILL of b, a takes over when the interconnect and b's mailbox fall
//!    silent (the kill is the command; the move ends when a is `InTakeover`),
//! 6. b restarted (waits as `TakenOver`, not measured), then giveback.
//!
//! For each move: the client's longest gap between two completed writes (reset right before the
//! move; read once the client has completed writes again for a while), the operator command's
//! wall time, the `total_ms` and per-phase times of the procedure report, and the state
//! transitions of both nodes on one timeline. After each move every acknowledged block is read
//! back and checked (outside the timing). An operator takeover refused for the hold-down after a
//! giveback (the fixture's `holddown_ms` is 8000) is retried every 250 ms and not counted.
//!
//! Environment: `HAPAIR_BENCH_ROUNDS` (5), `HAPAIR_BENCH_OUT` (bench/RESULTS-takeover.md; a
//! hand-written "## Notes" section there is kept). Needs root (loop devices, addresses on lo).

#[path = "common/mod.rs"]
mod bcommon;
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/common/pair.rs"]
mod pair;

use bcommon::{check_interrupt, env_u64, interrupted_flag, machine_description, median};
use pair::{Pair, Writer};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

macro_rules! progress {
    ($($arg:tt)*) => {{ eprintln!("[{:>6.1}s] {}", bcommon::since_start(), format!($($arg)*)); }};
}

const EXPORT_B: &str = "aggr-b";
const BLOCKS: u64 = 2048;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Move {
    TakeoverAtPartner,
    TakeoverAtNode,
    HardTakeover,
    Giveback,
    GivebackAfterHard,
}

impl Move {
    fn label(self) -> &'static str {
        match self {
            Move::TakeoverAtPartner => "graceful takeover, asked at the partner (a)",
            Move::TakeoverAtNode => "graceful takeover, asked at the node (b)",
            Move::HardTakeover => "hard takeover (SIGKILL of b)",
            Move::Giveback => "giveback (after a graceful takeover)",
            Move::GivebackAfterHard => "giveback (to the restarted b)",
        }
    }
    fn command(self) -> &'static str {
        match self {
            Move::TakeoverAtPartner => "`takeover of b` at a",
            Move::TakeoverAtNode => "`takeover` at b",
            Move::HardTakeover => "SIGKILL b, until a is InTakeover",
            Move::Giveback | Move::GivebackAfterHard => "`giveback` at a",
        }
    }
}

/// What one move measured.
#[derive(Clone, Debug)]
struct Sample {
    round: usize,
    mv: Move,
    /// Longest gap between two completed client writes, ms.
    gap_ms: u64,
    /// Wall time of the operator command (for the hard takeover: kill to InTakeover), ms.
    cmd_ms: u64,
    /// The procedure report's total, ms (None when there was no report).
    total_ms: Option<u64>,
    /// (step, elapsed ms) from the report.
    phases: Vec<(String, u64)>,
    /// Both nodes' state transitions during the move: (ms after its start, "node: From->To").
    timeline: Vec<(u64, String)>,
    /// b's own steps ("step done" lines of b's log during the move): its graceful shutdown for a
    /// takeover, its resume for a giveback. Not in the procedure report, which is a's.
    home_steps: Vec<(String, u64)>,
    /// Writes the client completed during the move and its settle window.
    writes: u64,
    /// Blocks verified afterwards.
    verified: usize,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The Writer, finished (stopped and joined) on drop, also when the bench fails.
struct WriterGuard(Option<Writer>);

impl WriterGuard {
    fn w(&self) -> &Writer {
        self.0.as_ref().unwrap()
    }
}

impl Drop for WriterGuard {
    fn drop(&mut self) {
        if let Some(w) = self.0.take() {
            w.finish();
        }
    }
}

fn main() {
    let r = std::panic::catch_unwind(bench);
    match r {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            eprintln!("takeover bench failed: {e}");
            std::process::exit(1);
        }
        Err(_) => {
            eprintln!("takeover bench failed (panic above); everything it made was cleaned up");
            std::process::exit(1);
        }
    }
}

/// Poll `node`'s state until `want`, checking for Ctrl-C. Returns when it got there.
fn wait_state(
    p: &Pair,
    node: &str,
    want: &str,
    secs: u64,
    poll_ms: u64,
) -> Result<Instant, String> {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        check_interrupt()?;
        let st = p.state(node);
        if st == want {
            return Ok(Instant::now());
        }
        if Instant::now() > end {
            return Err(format!(
                "node {node} is {st}, not {want}, after {secs} s\n--- a.log\n{}\n--- b.log\n{}",
                pair::tail(&p.log("a")),
                pair::tail(&p.log("b"))
            ));
        }
        std::thread::sleep(Duration::from_millis(poll_ms));
    }
}

/// Wait until the client has completed writes again: at least `n` after `since` and for at
/// least `min_ms` after `t_done`. Its longest gap then covers the whole disruption.
fn wait_client(w: &Writer, since: u64, n: u64, t_done: Instant, min_ms: u64) -> Result<(), String> {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        check_interrupt()?;
        if w.completed.load(Ordering::Relaxed) >= since + n
            && t_done.elapsed() >= Duration::from_millis(min_ms)
        {
            return Ok(());
        }
        if Instant::now() > end {
            return Err(format!(
                "the client completed no writes for 30 s after the move (completed {})",
                w.completed.load(Ordering::Relaxed)
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn report_of(v: &Value) -> (Option<u64>, Vec<(String, u64)>) {
    let total = v["total_ms"].as_u64();
    let phases = v["phases"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .map(|p| {
                    (
                        p["step"].as_str().unwrap_or("?").to_string(),
                        p["elapsed_ms"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    (total, phases)
}

/// Transitions of `node` at or after `t0_unix_ms`: (ms after it, "node: From->To").
fn transitions_since(p: &Pair, node: &str, t0_unix_ms: u64) -> Vec<(u64, String)> {
    let st = p.ctl(node, r#"{"v":1,"cmd":"status"}"#);
    let s = &st["status"];
    let (Some(now_unix), Some(now_ha)) = (s["now_unix_ms"].as_u64(), s["ha"]["now_ms"].as_u64())
    else {
        return Vec::new();
    };
    let origin = now_unix.saturating_sub(now_ha);
    s["ha"]["transitions"]
        .as_array()
        .map(|ts| {
            ts.iter()
                .filter_map(|t| {
                    let at = origin + t["at_ms"].as_u64()?;
                    (at + 2 >= t0_unix_ms).then(|| {
                        (
                            at.saturating_sub(t0_unix_ms),
                            format!(
                                "{node}: {}->{}",
                                t["from"].as_str().unwrap_or("?"),
                                t["to"].as_str().unwrap_or("?")
                            ),
                        )
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

fn timeline(p: &Pair, t0_unix_ms: u64, nodes: &[&str]) -> Vec<(u64, String)> {
    let mut all: Vec<(u64, String)> = nodes
        .iter()
        .flat_map(|n| transitions_since(p, n, t0_unix_ms))
        .collect();
    all.sort();
    all
}

/// Run an operator command at `node`, retrying while it is refused for the hold-down. Returns
/// the completed reply, its wall time and when it was sent (Unix ms).
fn operator(p: &Pair, w: &Writer, node: &str, req: &str) -> Result<(Value, u64, u64, u64), String> {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        check_interrupt()?;
        let c0 = w.completed.load(Ordering::Relaxed);
        w.max_gap_ms.store(0, Ordering::Relaxed);
        let t0_unix = unix_ms();
        let t0 = Instant::now();
        let r = p.ctl(node, req);
        let ms = t0.elapsed().as_millis() as u64;
        match pair::outcome(&r).as_str() {
            "completed" => return Ok((r, ms, t0_unix, c0)),
            "refused" if Instant::now() < end => {
                let text = r["outcome"]["text"].to_string();
                if !(text.contains("hold") || text.contains("giveback")) {
                    return Err(format!("{req} at {node} refused: {text}"));
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            _ => return Err(format!("{req} at {node}: {r}")),
        }
    }
}

/// Pause the client, read back every block it wrote and check it; like `Writer::verify`, except
/// that a write whose outcome was unknown (in flight on a connection that died) and that is
/// found on disk is promoted to acknowledged. `Writer::verify` forgets such a write once it has
/// seen it, so the next verification reports the block as lost although nothing changed
/// (seen on this bench's first 5-round run: "block 227 acked gen 7406, read gen 11259").
/// Returns (blocks checked, unknown writes found landed).
fn verify(w: &Writer, addr: std::net::SocketAddr, what: &str) -> Result<(usize, usize), String> {
    use std::io::{Read, Write};
    w.pause.store(true, Ordering::Release);
    let end = Instant::now() + Duration::from_secs(30);
    while !w.idle.load(Ordering::Acquire) {
        if Instant::now() > end {
            return Err(format!(
                "{what}: the client's requests did not complete within 30 s"
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut s = None;
    for _ in 0..200 {
        s = pair::nbd_connect(addr, EXPORT_B);
        if s.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut s = s.ok_or_else(|| format!("{what}: cannot reach {addr}"))?;
    let mut acked = w.acked.lock().unwrap();
    let mut unknown = w.unknown.lock().unwrap();
    let mut landed = 0;
    let blocks: Vec<(u64, u64)> = acked.iter().map(|(b, g)| (*b, *g)).collect();
    for &(block, gen) in &blocks {
        let mut req = Vec::new();
        req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&block.to_be_bytes());
        req.extend_from_slice(&(block * 4096).to_be_bytes());
        req.extend_from_slice(&4096u32.to_be_bytes());
        let mut h = [0u8; 16];
        let mut got = vec![0u8; 4096];
        s.write_all(&req)
            .and_then(|_| s.read_exact(&mut h))
            .and_then(|_| s.read_exact(&mut got))
            .map_err(|e| format!("{what}: read of block {block}: {e}"))?;
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
        if err != 0 {
            return Err(format!(
                "{what}: read of block {block} failed with NBD error {err}"
            ));
        }
        let read_gen = u64::from_le_bytes(got[8..16].try_into().unwrap());
        if got == pair::block_data(block, gen) {
            continue;
        }
        let later_unknown =
            unknown.get(&block).is_some_and(|g| g.contains(&read_gen)) && read_gen > gen;
        if later_unknown && got == pair::block_data(block, read_gen) {
            acked.insert(block, read_gen);
            unknown.remove(&block);
            landed += 1;
            continue;
        }
        w.pause.store(false, Ordering::Release);
        return Err(format!(
            "{what}: ACKNOWLEDGED WRITE LOST: block {block} acked gen {gen}, read gen {read_gen}"
        ));
    }
    drop((acked, unknown));
    w.idle.store(false, Ordering::Release);
    w.pause.store(false, Ordering::Release);
    Ok((blocks.len(), landed))
}

/// "step done" lines (step, ms) in `log` after byte `from`.
fn steps_done(log: &str, from: usize) -> Vec<(String, u64)> {
    log.get(from..)
        .unwrap_or("")
        .lines()
        .filter(|l| l.contains("step done"))
        .filter_map(|l| {
            let field = |k: &str| {
                l.split_whitespace()
                    .find_map(|t| t.strip_prefix(k))
                    .map(str::to_string)
            };
            Some((field("step=")?, field("ms=")?.parse().ok()?))
        })
        .collect()
}

fn bench() -> Result<(), String> {
    let _ = interrupted_flag();
    common::require_root();
    for t in ["losetup", "ip"] {
        common::require_tool(t);
    }
    let rounds = env_u64("HAPAIR_BENCH_ROUNDS", 5) as usize;
    progress!("starting the pair (10 loop devices of 24 MiB, two release hapaird, countdown 10 s)");
    let mut p = Pair::new(10_000);
    let machine = machine_description(p.dir.path());
    let svc = p.svc[1];
    progress!("pair Normal; client writing to {EXPORT_B} at {svc}");
    let wg = WriterGuard(Some(Writer::start(svc, EXPORT_B, BLOCKS, 42)));
    std::thread::sleep(Duration::from_millis(1000));
    let (n0, _) = verify(wg.w(), svc, "before the first move")?;
    progress!("client running ({n0} blocks verified)");

    let mut samples: Vec<Sample> = Vec::new();
    let mut landed_total = 0;
    for round in 1..=rounds {
        for mv in [
            Move::TakeoverAtPartner,
            Move::Giveback,
            Move::TakeoverAtNode,
            Move::Giveback,
            Move::HardTakeover,
            Move::GivebackAfterHard,
        ] {
            check_interrupt()?;
            let w = wg.w();
            let b_log_from = p.log("b").len();
            let (reply, cmd_ms, t0_unix, c0, t_done, (total_ms, phases)) = match mv {
                Move::TakeoverAtPartner => {
                    let (r, ms, t0u, c0) = operator(
                        &p,
                        w,
                        "a",
                        r#"{"v":1,"cmd":"takeover","of":"b","countdown_ms":10000}"#,
                    )?;
                    let t = wait_state(&p, "b", "TakenOver", 20, 20)?;
                    let rep = report_of(&r["outcome"]["report"]);
                    (Some(r), ms, t0u, c0, t, rep)
                }
                Move::TakeoverAtNode => {
                    let (r, ms, t0u, c0) = operator(&p, w, "b", r#"{"v":1,"cmd":"takeover"}"#)?;
                    let t = wait_state(&p, "a", "InTakeover", 20, 20)?;
                    // The reply at b (sent once b is TakenOver) carries no report; a's
                    // takeover report is in a's status.
                    let st = p.ctl("a", r#"{"v":1,"cmd":"status"}"#);
                    let rep = report_of(&st["status"]["last_takeover"]);
                    (Some(r), ms, t0u, c0, t, rep)
                }
                Move::Giveback | Move::GivebackAfterHard => {
                    let (r, ms, t0u, c0) = operator(&p, w, "a", r#"{"v":1,"cmd":"giveback"}"#)?;
                    let t = wait_state(&p, "b", "Normal", 30, 20)?;
                    let rep = report_of(&r["outcome"]["report"]);
                    (Some(r), ms, t0u, c0, t, rep)
                }
                Move::HardTakeover => {
                    let c0 = w.completed.load(Ordering::Relaxed);
                    w.max_gap_ms.store(0, Ordering::Relaxed);
                    let t0_unix = unix_ms();
                    let t0 = Instant::now();
                    p.signal("b", libc::SIGKILL);
                    let t = wait_state(&p, "a", "InTakeover", 30, 10)?;
                    let ms = t0.elapsed().as_millis() as u64;
                    let st = p.ctl("a", r#"{"v":1,"cmd":"status"}"#);
                    let rep = report_of(&st["status"]["last_takeover"]);
                    (None, ms, t0_unix, c0, t, rep)
                }
            };
            wait_client(w, c0, 200, t_done, 500)?;
            let gap_ms = w.max_gap_ms.load(Ordering::Relaxed);
            let writes = w.completed.load(Ordering::Relaxed) - c0;
            let nodes: &[&str] = if mv == Move::HardTakeover {
                &["a"]
            } else {
                &["a", "b"]
            };
            let tl = timeline(&p, t0_unix, nodes);
            let home_steps = if mv == Move::HardTakeover {
                Vec::new()
            } else {
                steps_done(&p.log("b"), b_log_from)
            };
            let (verified, landed) = verify(w, svc, mv.label())?;
            landed_total += landed;
            let kind = reply
                .as_ref()
                .and_then(|r| r["outcome"]["report"]["kind"].as_str().map(str::to_string))
                .unwrap_or_default();
            progress!(
                "round {round}/{rounds} {:<40} client gap {:>5} ms  command {:>5} ms  report {:>5} ms  [{}] {}",
                mv.label(),
                gap_ms,
                cmd_ms,
                total_ms.map_or("-".into(), |t| t.to_string()),
                phases.iter().map(|(s, m)| format!("{s}={m}")).collect::<Vec<_>>().join(" "),
                kind
            );
            samples.push(Sample {
                round,
                mv,
                gap_ms,
                cmd_ms,
                total_ms,
                phases,
                home_steps,
                timeline: tl,
                writes,
                verified,
            });
            if mv == Move::HardTakeover {
                // b reboots: it finds please-die and waits for giveback (not measured).
                let t = Instant::now();
                p.start("b");
                wait_state(&p, "b", "TakenOver", 60, 50)?;
                progress!(
                    "b restarted and waits as TakenOver ({} ms)",
                    t.elapsed().as_millis()
                );
            }
        }
    }
    let w = wg.0.as_ref().unwrap();
    let total_writes = w.completed.load(Ordering::Relaxed);
    let (verified, landed) = verify(w, svc, "at the end")?;
    landed_total += landed;
    drop(wg);
    progress!("done: {total_writes} writes acknowledged, {verified} blocks verified at the end; stopping the pair");
    let (a_log, b_log) = (p.log("a"), p.log("b"));
    drop(p);

    // Tables.
    let kinds = [
        Move::TakeoverAtPartner,
        Move::TakeoverAtNode,
        Move::HardTakeover,
        Move::Giveback,
        Move::GivebackAfterHard,
    ];
    let stat = |v: Vec<f64>| -> String {
        if v.is_empty() {
            return "-".into();
        }
        let max = v.iter().cloned().fold(f64::MIN, f64::max);
        format!("{:.0} / {:.0}", median(&v), max)
    };
    let mut t = String::new();
    writeln!(t, "| move | command | n | client's longest gap (ms) | command wall time (ms) | report total (ms) |").unwrap();
    writeln!(t, "|---|---|---:|---:|---:|---:|").unwrap();
    for k in kinds {
        let s: Vec<&Sample> = samples.iter().filter(|s| s.mv == k).collect();
        writeln!(
            t,
            "| {} | {} | {} | {} | {} | {} |",
            k.label(),
            k.command(),
            s.len(),
            stat(s.iter().map(|x| x.gap_ms as f64).collect()),
            stat(s.iter().map(|x| x.cmd_ms as f64).collect()),
            stat(
                s.iter()
                    .filter_map(|x| x.total_ms.map(|v| v as f64))
                    .collect()
            )
        )
        .unwrap();
    }
    let mut ph = String::new();
    for k in kinds {
        let s: Vec<&Sample> = samples.iter().filter(|s| s.mv == k).collect();
        // Steps in the order they ran (first sample), then any others.
        let mut order: Vec<String> = Vec::new();
        let mut vals: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for x in &s {
            let own = x.phases.iter().map(|(st, ms)| (format!("a: {st}"), *ms));
            let home = x
                .home_steps
                .iter()
                .map(|(st, ms)| (format!("b: {st}"), *ms));
            for (step, ms) in own.chain(home) {
                if !order.contains(&step) {
                    order.push(step.clone());
                }
                vals.entry(step).or_default().push(ms as f64);
            }
        }
        if order.is_empty() {
            continue;
        }
        writeln!(
            ph,
            "\n**{}** ({}):\n\n| phase | median / max (ms) | n |\n|---|---:|---:|",
            k.label(),
            k.command()
        )
        .unwrap();
        for step in &order {
            writeln!(
                ph,
                "| {step} | {} | {} |",
                stat(vals[step].clone()),
                vals[step].len()
            )
            .unwrap();
        }
    }
    let mut tl = String::new();
    for k in kinds {
        let s: Vec<&Sample> = samples.iter().filter(|s| s.mv == k).collect();
        let mut order: Vec<String> = Vec::new();
        let mut vals: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for x in &s {
            for (ms, tr) in &x.timeline {
                if !order.contains(tr) {
                    order.push(tr.clone());
                }
                vals.entry(tr.clone()).or_default().push(*ms as f64);
            }
        }
        if order.is_empty() {
            continue;
        }
        writeln!(tl, "\n**{}** ({}):\n\n| transition | ms after the command, median / max | n |\n|---|---:|---:|", k.label(), k.command()).unwrap();
        for tr in &order {
            writeln!(
                tl,
                "| {tr} | {} | {} |",
                stat(vals[tr].clone()),
                vals[tr].len()
            )
            .unwrap();
        }
    }
    let mut every = String::new();
    for s in &samples {
        writeln!(
            every,
            "- round {} — {}: gap {} ms, command {} ms, report {} ms, {} writes, {} blocks verified; phases: {}; b's steps: {}; transitions: {}",
            s.round,
            s.mv.label(),
            s.gap_ms,
            s.cmd_ms,
            s.total_ms.map_or("-".into(), |t| t.to_string()),
            s.writes,
            s.verified,
            s.phases.iter().map(|(st, m)| format!("{st} {m}")).collect::<Vec<_>>().join(", "),
            s.home_steps.iter().map(|(st, m)| format!("{st} {m}")).collect::<Vec<_>>().join(", "),
            s.timeline.iter().map(|(ms, x)| format!("{x} +{ms}")).collect::<Vec<_>>().join(", ")
        )
        .unwrap();
    }
    println!("\n{t}\nPhases:\n{ph}\nState transitions:\n{tl}");
    let warnings: Vec<String> = [("a", &a_log), ("b", &b_log)]
        .iter()
        .flat_map(|(n, l)| {
            l.lines()
                .filter(|x| x.contains("WARN") || x.contains("ERROR"))
                .take(8)
                .map(move |x| format!("{n}: {x}"))
        })
        .collect();
    let body = format!(
        "# Takeover benchmark: what a client sees\n\nGenerated by `cargo bench --bench takeover` (settings: \
         `HAPAIR_BENCH_ROUNDS={rounds}`). {rounds} rounds; each round moves b's aggregate six times, in this order: \
         graceful takeover asked at the partner, giveback, graceful takeover asked at the node, giveback, SIGKILL of b \
         (hard takeover), restart of b (not measured) and giveback. Cells are **median / max** over the rounds.\n\n\
         ## Machine\n{machine}\n## Setup\n\
         - The pair fixture of `tests/pair.rs` (`tests/common/pair.rs`): two release `hapaird`, each aggregate RAID-4 4+1 \
         of 24 MiB loop devices, NVRAM log (8 MiB, file on ext4, O_DIRECT) mirrored over a TCP interconnect on 127.0.0.1; \
         service addresses 127.0.0.x/32 on `lo`; heartbeat 100 ms, interconnect timeout 1000 ms, mailbox timeout 5000 ms (the fixture's, generous for a busy CI machine), \
         countdown 10 s, hold-down 8 s, CP every 300 ms, 8 NBD workers.\n\
         - Client: the verifying `Writer` of the pair tests: one NBD connection to b's service address, 4 KiB writes to \
         {BLOCKS} blocks, 8 in flight, reconnecting every 20 ms while it cannot connect. **Client's longest gap** is the \
         longest time between two completed writes, reset right before the move and read once the client has completed \
         200 more writes and at least 500 ms have passed since the move ended. After every move all acknowledged blocks \
         are read back and checked: none was ever lost ({total_writes} writes acknowledged in all; the run stops at the \
         first lost write). A write in flight on a connection that closed has an unknown outcome; when it is found on \
         disk it counts as acknowledged from then on ({landed_total} such writes found landed).\n\
         - **Command wall time**: the control-socket request until its reply (the reply comes when the procedure has \
         completed). For the hard takeover: from the SIGKILL until a reports `InTakeover` (polled every 10 ms). \
         **Report total** and phases: `outcome.report` of the reply (for the hard takeover: a's `status.last_takeover`). \
         For the takeover asked at b, the reply at b comes once b is `TakenOver` and carries no report; its phases are a's \
         `status.last_takeover`. An operator takeover refused for the hold-down after \
         a giveback is retried every 250 ms; only the accepted request is timed.\n\n\
         ## Results\n{t}\n### Phases: a's from the procedure report, b's from the `step done` lines of b's log\n{ph}\n### State transitions of both nodes (from `status.ha.transitions`)\n{tl}\n### Every move\n{every}\n{}",
        if warnings.is_empty() { String::new() } else { format!("Daemon log warnings (first 8 per node):\n```\n{}\n```\n", warnings.join("\n")) }
    );
    let path = match std::env::var("HAPAIR_BENCH_OUT") {
        Ok(p) => std::path::PathBuf::from(p),
        Err(_) => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("bench")
            .join("RESULTS-takeover.md"),
    };
    let notes = std::fs::read_to_string(&path)
        .ok()
        .and_then(|old| old.find("\n## Notes").map(|i| old[i..].to_string()))
        .unwrap_or_default();
    std::fs::write(&path, format!("{body}{notes}"))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    progress!("wrote {}", path.display());
    Ok(())
}

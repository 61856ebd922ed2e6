//! Crash tests: hapaird killed with SIGKILL at random moments under a verifying fio workload on
//! real loop devices, restarted, its NVRAM log replayed, and fio's verify of every write it saw
//! completed passes; the same with a torn record appended at the log's tail at a random length,
//! as a crash in the middle of an append leaves it.

mod common;

use common::*;
use hapair::core::nvlog::{scan, Expect, RecordHeader, RecordKind, RegionHeader};
use hapair::io::buf::{IoBuf, IO_ALIGN};
use rand::{Rng, SeedableRng};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const NVRAM_MIB: u64 = 16;

fn config(dir: &Path, loops: &[LoopDev], port: u16) -> std::path::PathBuf {
    let q = |p: &Path| format!("\"{}\"", p.display());
    let text = format!(
        "node = \"a\"\n[io]\nworkers = 16\narena_mib = 32\n[[aggregate]]\nname = \"aggr0\"\nhome = \"a\"\n\
         data = [{}]\nparity = {}\nchunk_kib = 64\nnvram = {}\nnvram_mib = {NVRAM_MIB}\ncp_interval_ms = 200\n\
         [[export]]\nname = \"aggr0\"\naggregate = \"aggr0\"\nlisten = \"127.0.0.1:{port}\"\n",
        loops[..4].iter().map(|l| q(&l.dev)).collect::<Vec<_>>().join(", "),
        q(&loops[4].dev),
        q(&dir.join("aggr0.nvlog")),
    );
    let p = dir.join("a.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// One fio job per round, on its own region of the export so rounds never overwrite each other;
/// iodepth 1, so at most one write is unacknowledged when the server dies.
fn fio_args(uri: &str, round: u64) -> Vec<String> {
    [
        "--name=crash",
        "--ioengine=nbd",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=1",
        "--size=24m",
        "--verify=crc32c",
        "--randrepeat=1",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        format!("--uri={uri}"),
        format!("--randseed={}", round + 1),
        format!("--offset={}m", round * 24),
    ])
    .collect()
}

/// Append the first `keep` bytes of a well-formed next record at the log's tail: what a crash
/// during an append leaves behind. Returns false when the log's tail leaves no room.
fn tear_tail(nvlog: &Path, keep: usize, rng: &mut impl Rng) -> bool {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(nvlog)
        .unwrap();
    let region = settled_log(&f);
    let header = RegionHeader::decode(region[..64].try_into().unwrap()).unwrap();
    let replay = scan(
        &region,
        &Expect {
            aggregate: header.aggregate,
            generation: header.generation,
        },
    )
    .expect("the log of a killed daemon scans cleanly");
    let payload: Vec<u8> = (0..4096).map(|_| rng.gen()).collect();
    let rec = RecordHeader {
        kind: RecordKind::Write,
        acked_delta: 0,
        seq: replay.report.last_seq + 1,
        aggregate: header.aggregate,
        generation: header.generation,
        epoch: header.epoch,
        offset: 0,
        length: 4096,
    };
    let mut bytes = rec.encode(&payload).to_vec();
    bytes.extend_from_slice(&payload);
    let at = replay.tail_offset;
    let keep = keep.min(region.len() - at);
    if keep < 8 {
        return false;
    }
    // Through O_DIRECT as the daemon writes it: whole blocks, patched.
    let lo = at / IO_ALIGN * IO_ALIGN;
    let hi = (at + keep).div_ceil(IO_ALIGN) * IO_ALIGN;
    let mut buf = IoBuf::new(hi - lo);
    buf.copy_from_slice(&region[lo..hi]);
    buf[at - lo..at - lo + keep].copy_from_slice(&bytes[..keep]);
    f.write_all_at(&buf, lo as u64).unwrap();
    f.sync_all().unwrap();
    true
}

/// The log as the device holds it (read with O_DIRECT as the daemon writes it, not through
/// the page cache, which this test's earlier buffered tears had filled), once two reads 50 ms
/// apart agree. Seen under load on a shared machine: the tail this test tore was where the
/// restarted daemon then found an acknowledged record, with later records proving it (the
/// daemon refused to start). The tear had been placed from a picture older than the device's;
/// which cache served it was not pinned down.
fn settled_log(f: &std::fs::File) -> Vec<u8> {
    let len = f.metadata().unwrap().len() as usize;
    let read = || {
        let mut buf = IoBuf::new(len);
        f.read_exact_at(&mut buf, 0).unwrap();
        buf.to_vec()
    };
    let mut last = read();
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(50));
        let now = read();
        if now == last {
            return now;
        }
        last = now;
    }
    panic!("the NVRAM log of a killed daemon still changes after 5 s");
}

/// What both crash tests start from: a seed (from HAPAIR_CRASH_SEED, else random, printed so
/// that a failure can be replayed), five loop devices of `member_bytes`, a config and a format.
struct Rig {
    seed: u64,
    rng: rand::rngs::StdRng,
    dir: tempfile::TempDir,
    _loops: Vec<LoopDev>,
    port: u16,
    cfg: std::path::PathBuf,
}

impl Rig {
    fn formatted(member_bytes: u64) -> Rig {
        let seed: u64 = std::env::var("HAPAIR_CRASH_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random);
        eprintln!("crash test seed {seed} (HAPAIR_CRASH_SEED={seed} replays the kill times)");
        let dir = scratch_dir();
        let loops: Vec<LoopDev> = (0..5)
            .map(|i| LoopDev::new(dir.path(), &format!("m{i}.img"), member_bytes))
            .collect();
        let port = free_port();
        let cfg = config(dir.path(), &loops, port);
        run(Command::new(HAPAIRD).args(["format", "--config", cfg.to_str().unwrap()]));
        Rig {
            seed,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            dir,
            _loops: loops,
            port,
            cfg,
        }
    }
}

#[test]
fn sigkill_under_fio_verify_then_replay_loses_nothing() {
    require_tool("fio");
    let Rig {
        seed: _,
        mut rng,
        dir,
        _loops,
        port,
        cfg,
    } = Rig::formatted(48 << 20);
    let cfg_s = cfg.to_str().unwrap();
    let uri = format!("nbd://127.0.0.1:{port}/aggr0");
    let mut torn_rounds = 0;
    for round in 0..6u64 {
        let work = dir.path().join(format!("round{round}"));
        std::fs::create_dir(&work).unwrap();
        let daemon = Daemon::spawn(&["run", "--config", cfg_s]);
        wait_for_port(port);
        let fio = Command::new("fio")
            .args(fio_args(&uri, round))
            .args(["--do_verify=0", "--verify_state_save=1"])
            .current_dir(&work)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Kill at a random time after fio's writes began reaching the log (on a loaded machine
        // fio may take longer than the shortest wait to connect: it then saves no state).
        wait_for_writes(daemon.pid());
        std::thread::sleep(Duration::from_millis(rng.gen_range(100..1300)));
        let killed = daemon.stop(libc::SIGKILL);
        assert_eq!(
            killed.status.code(),
            None,
            "round {round}: the daemon was killed, not stopped"
        );
        let fio_out = fio.wait_with_output().unwrap();
        let state = work.join("local-crash-0-verify.state");
        assert!(
            state.exists(),
            "round {round}: fio saved no verify state: {}",
            String::from_utf8_lossy(&fio_out.stdout)
        );
        let tear = round % 2 == 1;
        if tear
            && tear_tail(
                &dir.path().join("aggr0.nvlog"),
                rng.gen_range(8..4096 + 64),
                &mut rng,
            )
        {
            torn_rounds += 1;
        }
        // Restart: the log is replayed before the export listens.
        let daemon = Daemon::spawn(&["run", "--config", cfg_s]);
        wait_for_port(port);
        let out = Command::new("fio")
            .args(fio_args(&uri, round))
            .args([
                "--verify_only",
                "--verify_state_load=1",
                "--verify_fatal=0",
                "--output-format=json",
            ])
            .current_dir(&work)
            .output()
            .unwrap();
        // fio counts the write that was in flight when the server died as written: it was never
        // acknowledged, so it may or may not have landed (a never-written block reads as zeros,
        // "bad magic header 0"). Anything else bad is a lost acknowledged write.
        let text = String::from_utf8_lossy(&out.stdout);
        let all = format!("{text}{}", String::from_utf8_lossy(&out.stderr));
        let bad = all.matches("verify: bad").count();
        let unwritten = all.matches("verify: bad magic header 0,").count();
        assert!(
            bad <= 1 && bad == unwritten,
            "round {round}: ACKNOWLEDGED WRITE LOST ({bad} bad blocks, iodepth 1):\n{all}"
        );
        let start = text
            .find("{\n")
            .unwrap_or_else(|| panic!("no JSON from fio: {text}"));
        let j: serde_json::Value = serde_json::from_str(&text[start..]).unwrap();
        let job = &j["jobs"][0];
        let verified = job["read"]["io_bytes"].as_u64().unwrap();
        assert!(
            verified > (bad as u64 + 1) * 4096,
            "round {round}: fio verified nothing (killed before any write?)"
        );
        let stopped = daemon.stop(libc::SIGTERM);
        let err = String::from_utf8_lossy(&stopped.stderr);
        assert!(stopped.status.success(), "round {round}: {err}");
        assert!(
            err.contains("NVRAM log replayed"),
            "round {round}: no replay at restart:\n{err}"
        );
        if tear {
            assert!(
                err.contains("discarded_torn\u{1b}[0m\u{1b}[2m=\u{1b}[0m1")
                    || err.contains("discarded_torn=1"),
                "round {round}: the torn record was not discarded:\n{err}"
            );
        }
        eprintln!(
            "round {round}: verified {} KiB after SIGKILL{}",
            verified >> 10,
            if tear { " and a torn tail" } else { "" }
        );
    }
    assert!(
        torn_rounds >= 2,
        "the tear was applied in {torn_rounds} rounds"
    );
}

#[path = "nbd_common/mod.rs"]
#[allow(unused_imports)]
mod nbdc;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::{Arc, Condvar, Mutex};

/// Block size of the exact-ack tests: 4 KiB writes go through the log; whole 256 KiB stripes
/// (64 KiB chunks x 4 data members) go to the members directly, with a Stripes record logged.
const SMALL: usize = 4096;
const STRIPE: usize = 256 * 1024;

/// Content of `block` as written by write number `gen`: self-describing, so a read tells which
/// write (if any) it came from.
fn block_data(bs: usize, block: u64, gen: u64) -> Vec<u8> {
    let mut v = pattern(bs, block.wrapping_mul(1_000_003) ^ gen);
    v[..8].copy_from_slice(&block.to_le_bytes());
    v[8..16].copy_from_slice(&gen.to_le_bytes());
    v
}

#[derive(Default)]
struct Track {
    /// Last acknowledged write per block.
    acked: HashMap<u64, u64>,
    /// Write in flight per block (at most one: the client never overlaps writes to a block).
    inflight: HashMap<u64, u64>,
    by_handle: HashMap<u64, (u64, u64)>,
    dead: bool,
}

/// Write random blocks with up to `depth` requests in flight until the server dies; every reply
/// moves its write from in flight to acknowledged.
fn tracked_writes(
    bs: usize,
    port: u16,
    blocks: u64,
    depth: usize,
    next_gen: &mut u64,
    track: &Arc<(Mutex<Track>, Condvar)>,
    rng: &mut impl Rng,
) {
    let (client, _size, _flags) =
        nbdc::RawClient::open(([127, 0, 0, 1], port).into(), "aggr0", false);
    let mut tx = client.s.try_clone().unwrap();
    let mut rx = client.s;
    rx.set_read_timeout(None).unwrap();
    let t2 = track.clone();
    let reader = std::thread::spawn(move || {
        let mut h = [0u8; 16];
        loop {
            if rx.read_exact(&mut h).is_err() {
                break;
            }
            let magic = u32::from_be_bytes(h[0..4].try_into().unwrap());
            let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
            let handle = u64::from_be_bytes(h[8..16].try_into().unwrap());
            assert_eq!(magic, hapair::core::nbd::SIMPLE_REPLY_MAGIC);
            let (m, cv) = &*t2;
            let mut t = m.lock().unwrap();
            let (block, gen) = t
                .by_handle
                .remove(&handle)
                .expect("reply to a request we sent");
            t.inflight.remove(&block);
            if err == 0 {
                t.acked.insert(block, gen);
            }
            cv.notify_all();
        }
        let (m, cv) = &*t2;
        m.lock().unwrap().dead = true;
        cv.notify_all();
    });
    loop {
        let (block, gen) = {
            let (m, cv) = &**track;
            let mut t = m.lock().unwrap();
            while t.by_handle.len() >= depth && !t.dead {
                t = cv.wait(t).unwrap();
            }
            if t.dead {
                break;
            }
            let mut block = rng.gen_range(0..blocks);
            while t.inflight.contains_key(&block) {
                block = rng.gen_range(0..blocks);
            }
            *next_gen += 1;
            t.inflight.insert(block, *next_gen);
            t.by_handle.insert(*next_gen, (block, *next_gen));
            (block, *next_gen)
        };
        let mut req = Vec::with_capacity(28 + bs);
        req.extend_from_slice(&hapair::core::nbd::REQUEST_MAGIC.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&hapair::core::nbd::CMD_WRITE.to_be_bytes());
        req.extend_from_slice(&gen.to_be_bytes());
        req.extend_from_slice(&(block * bs as u64).to_be_bytes());
        req.extend_from_slice(&(bs as u32).to_be_bytes());
        req.extend_from_slice(&block_data(bs, block, gen));
        if tx.write_all(&req).is_err() {
            break;
        }
    }
    let _ = tx.shutdown(std::net::Shutdown::Both);
    reader.join().unwrap();
}

/// SIGKILL at random moments under a tracking client that knows exactly which writes were
/// acknowledged: after replay every acknowledged write reads back (a write in flight at the
/// kill may or may not have landed), also when a torn record was left at the log's tail.
#[test]
fn sigkill_with_exact_ack_tracking_and_torn_tails() {
    exact_ack_rounds(SMALL);
}

/// The same with whole-stripe writes, which skip the log: a write in flight at the kill may
/// have been torn across the members; replay recomputes the parity of the stripes its Stripes
/// record names, and no acknowledged write is lost.
#[test]
fn sigkill_with_exact_ack_tracking_of_direct_whole_stripe_writes() {
    exact_ack_rounds(STRIPE);
}

fn exact_ack_rounds(bs: usize) {
    let Rig {
        seed,
        mut rng,
        dir,
        _loops,
        port,
        cfg,
    } = Rig::formatted(24 << 20);
    let cfg_s = cfg.to_str().unwrap();
    let blocks = 4 * (23 << 20) / bs as u64;
    let track = Arc::new((Mutex::new(Track::default()), Condvar::new()));
    let mut next_gen = 0u64;
    let mut torn = 0;
    let mut stripe_resyncs = 0u64;
    for round in 0..6 {
        let daemon = Daemon::spawn(&["run", "--config", cfg_s]);
        wait_for_port(port);
        let kill_after = Duration::from_millis(rng.gen_range(200..1200));
        let pid = daemon_pid(&daemon);
        let killer = std::thread::spawn(move || {
            std::thread::sleep(kill_after);
            // SAFETY: kill a pid we spawned.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        });
        {
            let mut t = track.0.lock().unwrap();
            t.dead = false;
        }
        tracked_writes(bs, port, blocks, 16, &mut next_gen, &track, &mut rng);
        killer.join().unwrap();
        let killed = daemon.stop(libc::SIGKILL);
        assert_eq!(killed.status.code(), None);
        let tear = round % 2 == 1
            && tear_tail(
                &dir.path().join("aggr0.nvlog"),
                rng.gen_range(8..SMALL + 64),
                &mut rng,
            );
        torn += tear as u32;
        let daemon = Daemon::spawn(&["run", "--config", cfg_s]);
        wait_for_port(port);
        // Read every block ever written and check it.
        let (mut c, _, _) = nbdc::RawClient::open(([127, 0, 0, 1], port).into(), "aggr0", false);
        let t = track.0.lock().unwrap();
        let mut checked = 0;
        let mut landed_inflight = 0;
        let mut keys: Vec<u64> = t.acked.keys().chain(t.inflight.keys()).copied().collect();
        keys.sort();
        keys.dedup();
        for block in keys {
            c.request(
                hapair::core::nbd::CMD_READ,
                0,
                block,
                block * bs as u64,
                bs as u32,
                &[],
            );
            let (err, h) = c.simple();
            assert_eq!((err, h), (0, block));
            let got = c.read_n(bs);
            let acked = t.acked.get(&block).copied();
            let inflight = t.inflight.get(&block).copied();
            let ok_acked = acked.is_some_and(|g| got == block_data(bs, block, g));
            let ok_inflight = inflight.is_some_and(|g| got == block_data(bs, block, g));
            let ok_never = acked.is_none() && got.iter().all(|&b| b == 0);
            assert!(
                ok_acked || ok_inflight || ok_never,
                "round {round} (seed {seed}): block {block}: ACKNOWLEDGED WRITE LOST: acked gen {acked:?}, in flight {inflight:?}, read gen {}",
                u64::from_le_bytes(got[8..16].try_into().unwrap())
            );
            landed_inflight += ok_inflight as u32;
            checked += 1;
        }
        let acked_total = t.acked.len();
        drop(t);
        // What landed becomes the truth for the next round.
        {
            let mut t = track.0.lock().unwrap();
            let inflight: Vec<(u64, u64)> = t.inflight.drain().collect();
            t.by_handle.clear();
            for (block, gen) in inflight {
                c.request(
                    hapair::core::nbd::CMD_READ,
                    0,
                    block,
                    block * bs as u64,
                    bs as u32,
                    &[],
                );
                let _ = c.simple();
                if c.read_n(bs) == block_data(bs, block, gen) {
                    t.acked.insert(block, gen);
                }
            }
        }
        drop(c);
        let out = daemon.stop(libc::SIGTERM);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        if tear {
            assert!(
                err.contains("discarded_torn\u{1b}[0m\u{1b}[2m=\u{1b}[0m1")
                    || err.contains("discarded_torn=1"),
                "round {round}: torn record not discarded:\n{err}"
            );
        }
        let resynced = logged_count(&err, "resynced_stripe_records");
        stripe_resyncs += resynced;
        eprintln!("round {round}: {checked} blocks checked ({acked_total} acknowledged, {landed_inflight} unacknowledged landed, {resynced} direct writes resynced at replay){}", if tear { ", torn tail" } else { "" });
        assert!(acked_total > 0);
    }
    assert!(torn >= 2, "torn tails applied in {torn} rounds");
    if bs == STRIPE {
        assert!(
            stripe_resyncs > 0,
            "the whole-stripe writes went through the log, not direct"
        );
    } else {
        assert_eq!(stripe_resyncs, 0, "4 KiB writes never go direct");
    }
}

/// The number logged as `key=N` (tracing's output, colours stripped); 0 when absent.
fn logged_count(log: &str, key: &str) -> u64 {
    let mut plain = String::with_capacity(log.len());
    let mut in_esc = false;
    for ch in log.chars() {
        match (in_esc, ch) {
            (false, '\u{1b}') => in_esc = true,
            (true, 'm') => in_esc = false,
            (true, _) => {}
            (false, c) => plain.push(c),
        }
    }
    plain
        .match_indices(&format!("{key}="))
        .filter_map(|(i, m)| {
            let rest = &plain[i + m.len()..];
            rest[..rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len())]
                .parse::<u64>()
                .ok()
        })
        .sum()
}

fn daemon_pid(d: &Daemon) -> i32 {
    d.pid()
}

/// Wait (up to 60 s) until process `pid` has written at least 64 KiB more than when asked:
/// the client's writes are arriving (`/proc/PID/io`: bytes written by syscalls, and bytes sent
/// to the block layer, which covers the log's O_DIRECT writes through io_uring).
fn wait_for_writes(pid: i32) {
    let written = || {
        std::fs::read_to_string(format!("/proc/{pid}/io"))
            .ok()
            .map(|t| {
                t.lines()
                    .filter_map(|l| {
                        let (k, v) = l.split_once(": ")?;
                        matches!(k, "wchar" | "write_bytes")
                            .then(|| v.trim().parse::<u64>().ok())?
                    })
                    .sum::<u64>()
            })
            .unwrap_or(0)
    };
    let start = written();
    let t0 = std::time::Instant::now();
    while written() < start + (64 << 10) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no writes reached the daemon"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

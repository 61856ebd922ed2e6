//! RAID-4 engine benchmark, run by hand: `cargo bench --bench raid`.
//!
//! Five real loop devices (4 data + 1 parity, direct I/O, backing files under /var/tmp), one
//! aggregate formatted on them (64 KiB chunks: a 256 KiB stripe), and, interleaved round by
//! round, the engine (`Aggregate::read`/`write` from N caller threads) against fio's io_uring
//! engine straight on the same loop devices:
//!
//! | workload | hapair engine | fio (direct=1, io_uring) |
//! | --- | --- | --- |
//! | seq write 1 MiB | 1 MiB writes = 4 full stripes, N callers | the bytes RAID-4 physically writes: 64 KiB sequential writes round-robin over the 5 devices, iodepth 20·N (one 1 MiB full-stripe write is 20 such ops) |
//! | rand read 4 KiB | N callers | 4 data devices, iodepth N |
//! | rand write 4 KiB | N callers (read-modify-write) | 4 data devices, iodepth N |
//!
//! plus `xor_into` throughput against memcpy. Environment: `HAPAIR_BENCH_MEMBER_MIB` (1024),
//! `HAPAIR_BENCH_SECS` per run (5), `HAPAIR_BENCH_ROUNDS` (3), `HAPAIR_BENCH_CALLERS` ("1,32"),
//! `HAPAIR_BENCH_DIR` (/var/tmp), `HAPAIR_BENCH_WORKLOADS` ("seqwrite,randread,randwrite"), `HAPAIR_BENCH_OUT` (results file). Results go to stdout and `bench/RESULTS-raid.md`.

#[macro_use]
mod common;

use common::*;
use hapair::config::{AggregateConfig, EngineKind, IoConfig};
use hapair::core::label::DATA_OFFSET_BYTES;
use hapair::core::raid4::xor_into;
use hapair::daemon::aggregate::Aggregate;
use hapair::daemon::backend::Backend;
use hapair::daemon::setup;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const SEQ_BYTES: usize = 1 << 20;
const RAMP: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, PartialEq, Debug)]
enum Work {
    SeqWrite,
    RandRead,
    RandWrite,
}

impl Work {
    fn label(self) -> &'static str {
        match self {
            Work::SeqWrite => "seq write 1 MiB",
            Work::RandRead => "rand read 4 KiB",
            Work::RandWrite => "rand write 4 KiB",
        }
    }
}

/// What one engine run measured.
#[derive(Clone, Copy, Default, Debug)]
struct Measured {
    iops: f64,
    /// Logical bytes per second (what callers asked for).
    bytes_per_sec: f64,
    lat_mean_us: f64,
    lat_p99_us: f64,
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Run `work` from `callers` threads for RAMP + `secs`; only the part after RAMP counts.
fn run_engine(agg: &Aggregate, work: Work, callers: usize, secs: u64) -> Result<Measured, String> {
    let size = agg.geometry().size_bytes();
    let cursor = AtomicU64::new(0);
    let start = Instant::now();
    let measure_from = start + RAMP;
    let end = measure_from + Duration::from_secs(secs);
    // Per caller: operations, bytes and latency samples (µs) in the measured window.
    type CallerResult = Result<(u64, u64, Vec<u32>), String>;
    let results: Vec<CallerResult> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..callers)
            .map(|t| {
                let cursor = &cursor;
                s.spawn(move || {
                    let bs = if work == Work::SeqWrite {
                        SEQ_BYTES
                    } else {
                        4096
                    };
                    let mut buf = agg.alloc(bs);
                    for (i, b) in buf.iter_mut().enumerate() {
                        *b = (i as u8) ^ (t as u8);
                    }
                    let mut rng =
                        0x9E37_79B9_7F4A_7C15u64 ^ ((t as u64 + 1) * 0xD1B5_4A32_D192_ED03);
                    let (mut ops, mut bytes) = (0u64, 0u64);
                    let mut lats: Vec<u32> = Vec::with_capacity(1 << 16);
                    loop {
                        let now = Instant::now();
                        if now >= end || interrupted() {
                            break;
                        }
                        let r = match work {
                            Work::SeqWrite => {
                                let off = cursor.fetch_add(bs as u64, Ordering::Relaxed)
                                    % (size / bs as u64 * bs as u64);
                                agg.write(off, &buf, false)
                            }
                            Work::RandRead => {
                                agg.read(xorshift(&mut rng) % (size / 4096) * 4096, &mut buf)
                            }
                            Work::RandWrite => {
                                agg.write(xorshift(&mut rng) % (size / 4096) * 4096, &buf, false)
                            }
                        };
                        r.map_err(|e| format!("{}: {e}", work.label()))?;
                        if now >= measure_from {
                            ops += 1;
                            bytes += bs as u64;
                            lats.push(now.elapsed().as_micros().min(u32::MAX as u128) as u32);
                        }
                    }
                    Ok((ops, bytes, lats))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("caller panicked".into())))
            .collect()
    });
    check_interrupt()?;
    let elapsed = secs as f64;
    let mut m = Measured::default();
    let mut all: Vec<u32> = Vec::new();
    for r in results {
        let (ops, bytes, lats) = r?;
        m.iops += ops as f64 / elapsed;
        m.bytes_per_sec += bytes as f64 / elapsed;
        all.extend(lats);
    }
    if !all.is_empty() {
        all.sort_unstable();
        m.lat_mean_us = all.iter().map(|&x| x as f64).sum::<f64>() / all.len() as f64;
        m.lat_p99_us = all[(all.len() * 99 / 100).min(all.len() - 1)] as f64;
    }
    Ok(m)
}

fn run_fio_raw(
    work: Work,
    callers: usize,
    secs: u64,
    loops: &[LoopDev],
) -> Result<FioResult, String> {
    let member_bytes = loops[0].bytes;
    let (devs, rw, bs, depth) = match work {
        Work::SeqWrite => (loops, "write", "64k", 20 * callers),
        Work::RandRead => (&loops[..4], "randread", "4k", callers),
        Work::RandWrite => (&loops[..4], "randwrite", "4k", callers),
    };
    let names: Vec<String> = devs.iter().map(|l| l.dev.display().to_string()).collect();
    let args: Vec<String> = vec![
        "--name=raw".into(),
        "--ioengine=io_uring".into(),
        "--direct=1".into(),
        format!("--filename={}", names.join(":")),
        format!("--rw={rw}"),
        format!("--bs={bs}"),
        format!("--iodepth={depth}"),
        // Stay clear of the labels and mailboxes: the same data area the aggregate uses.
        format!("--offset={DATA_OFFSET_BYTES}"),
        format!("--size={}", member_bytes - DATA_OFFSET_BYTES),
        "--time_based".into(),
        format!("--runtime={secs}"),
        format!("--ramp_time={}", RAMP.as_secs()),
        "--norandommap".into(),
        "--randrepeat=0".into(),
    ];
    run_fio(&args)
}

/// Bytes per second of `f` applied to 256 KiB (or `len`) buffers for about `ms` milliseconds.
fn mem_rate(len: usize, ms: u64, f: &mut dyn FnMut(&mut [u8], &[u8])) -> f64 {
    let src: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
    let mut dst = vec![0x5au8; len];
    for _ in 0..4 {
        f(&mut dst, &src);
    }
    let t0 = Instant::now();
    let mut bytes = 0u64;
    while t0.elapsed() < Duration::from_millis(ms) {
        for _ in 0..16 {
            f(std::hint::black_box(&mut dst), std::hint::black_box(&src));
            bytes += len as u64;
        }
    }
    std::hint::black_box(&dst);
    bytes as f64 / t0.elapsed().as_secs_f64()
}

struct Row {
    work: Work,
    callers: usize,
    engine: Vec<Measured>,
    fio: Vec<FioResult>,
}

fn main() {
    if let Err(e) = bench() {
        eprintln!("raid bench failed: {e}");
        std::process::exit(1);
    }
}

fn bench() -> Result<(), String> {
    // cargo bench passes `--bench`; nothing else is accepted.
    let _ = interrupted_flag();
    require_root();
    require_tool("fio");
    require_tool("losetup");
    let member_mib = env_u64("HAPAIR_BENCH_MEMBER_MIB", 1024);
    let secs = env_u64("HAPAIR_BENCH_SECS", 5);
    let rounds = env_u64("HAPAIR_BENCH_ROUNDS", 3) as usize;
    let callers_list: Vec<usize> = std::env::var("HAPAIR_BENCH_CALLERS")
        .unwrap_or_else(|_| "1,32".into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .expect("HAPAIR_BENCH_CALLERS: comma-separated numbers")
        })
        .collect();
    let base = std::env::var("HAPAIR_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let dir = tempfile::Builder::new()
        .prefix("hapair-bench-raid.")
        .tempdir_in(&base)
        .map_err(|e| e.to_string())?;
    let machine = machine_description(dir.path());
    progress!(
        "creating 5 loop devices of {member_mib} MiB in {}",
        dir.path().display()
    );
    let loops: Vec<LoopDev> = (0..5)
        .map(|i| LoopDev::new(dir.path(), &format!("m{i}.img"), member_mib << 20, true))
        .collect();
    let cfg = AggregateConfig {
        name: "bench0".into(),
        home: "a".into(),
        data: loops[..4].iter().map(|l| l.dev.clone()).collect(),
        parity: loops[4].dev.clone(),
        chunk_kib: 64,
        nvram: None,
        nvram_mib: 64,
        cp_interval_ms: 1000,
        nvram_flush: Default::default(),
    };
    let io = IoConfig {
        engine: EngineKind::IoUring,
        arena_mib: 256,
        ..IoConfig::default()
    };
    progress!("formatting (writes every byte of the members, so that no read hits a hole)");
    setup::format(&cfg, &io, true, &mut |_, _| {}).map_err(|e| e.to_string())?;
    let agg = setup::open(&cfg, &io, &mut |_, _| {}).map_err(|e| e.to_string())?;
    progress!("settling (sync, 5 s)");
    settle(5);
    let g = agg.geometry();
    progress!(
        "aggregate: {} data + parity, stripe {} KiB, {} MiB",
        g.data_members,
        g.stripe_bytes() >> 10,
        g.size_bytes() >> 20
    );
    check_interrupt()?;

    let only = std::env::var("HAPAIR_BENCH_WORKLOADS")
        .unwrap_or_else(|_| "seqwrite,randread,randwrite".into());
    let mut rows: Vec<Row> = Vec::new();
    for work in [Work::SeqWrite, Work::RandRead, Work::RandWrite] {
        let key = format!("{work:?}").to_lowercase();
        if !only.split(',').any(|w| w.trim() == key) {
            continue;
        }
        for &c in &callers_list {
            rows.push(Row {
                work,
                callers: c,
                engine: vec![],
                fio: vec![],
            });
        }
    }
    let (mut xor_small, mut cpy_small, mut xor_big, mut cpy_big) = (vec![], vec![], vec![], vec![]);
    let total = rounds * rows.len() * 2;
    let mut done = 0;
    for round in 0..rounds {
        // Alternate who goes first, so neither always runs on a "warmer" device.
        let engine_first = round % 2 == 0;
        for row in rows.iter_mut() {
            for k in 0..2 {
                let engine_turn = (k == 0) == engine_first;
                done += 1;
                if engine_turn {
                    let m = run_engine(&agg, row.work, row.callers, secs)?;
                    progress!(
                        "[{done}/{total}] round {} {:<17} callers {:>2}  hapair  {:>9.0} IOPS {:>8.1} MB/s  lat {:>7.0} us",
                        round + 1, row.work.label(), row.callers, m.iops, m.bytes_per_sec / 1e6, m.lat_mean_us
                    );
                    row.engine.push(m);
                } else {
                    let f = run_fio_raw(row.work, row.callers, secs, &loops)?;
                    progress!(
                        "[{done}/{total}] round {} {:<17} callers {:>2}  fio     {:>9.0} IOPS {:>8.1} MB/s  lat {:>7.0} us",
                        round + 1, row.work.label(), row.callers, f.iops, f.bytes_per_sec / 1e6, f.lat_mean_us
                    );
                    row.fio.push(f);
                }
            }
        }
        xor_small.push(mem_rate(256 << 10, 700, &mut |d, s| xor_into(d, s)));
        cpy_small.push(mem_rate(256 << 10, 700, &mut |d, s| d.copy_from_slice(s)));
        xor_big.push(mem_rate(64 << 20, 700, &mut |d, s| xor_into(d, s)));
        cpy_big.push(mem_rate(64 << 20, 700, &mut |d, s| d.copy_from_slice(s)));
        progress!(
            "round {} xor 256 KiB {:.1} GB/s, memcpy {:.1} GB/s; 64 MiB: xor {:.1}, memcpy {:.1}",
            round + 1,
            xor_small[round] / 1e9,
            cpy_small[round] / 1e9,
            xor_big[round] / 1e9,
            cpy_big[round] / 1e9
        );
    }
    let stats = format!(
        "full-stripe writes {}, read-modify-writes {}, reconstruct-writes {}, member errors {}",
        agg.stats.full_stripe_writes.load(Ordering::Relaxed),
        agg.stats.rmw_writes.load(Ordering::Relaxed),
        agg.stats.rcw_writes.load(Ordering::Relaxed),
        agg.stats.member_errors.load(Ordering::Relaxed)
    );
    agg.close().map_err(|e| e.to_string())?;
    drop(agg);

    // Report.
    let mut t = String::new();
    writeln!(t, "| workload | callers (QD) | hapair engine | fio raw | hapair / raw | hapair lat mean / p99 (us) | fio lat mean / p99 (us) |").unwrap();
    writeln!(t, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |").unwrap();
    for row in &rows {
        let e_iops = median(&row.engine.iter().map(|m| m.iops).collect::<Vec<_>>());
        let e_bw = median(
            &row.engine
                .iter()
                .map(|m| m.bytes_per_sec)
                .collect::<Vec<_>>(),
        );
        let f_iops = median(&row.fio.iter().map(|m| m.iops).collect::<Vec<_>>());
        let f_bw = median(&row.fio.iter().map(|m| m.bytes_per_sec).collect::<Vec<_>>());
        let e_lat = median(&row.engine.iter().map(|m| m.lat_mean_us).collect::<Vec<_>>());
        let e_p99 = median(&row.engine.iter().map(|m| m.lat_p99_us).collect::<Vec<_>>());
        let f_lat = median(&row.fio.iter().map(|m| m.lat_mean_us).collect::<Vec<_>>());
        let f_p99 = median(&row.fio.iter().map(|m| m.lat_p99_us).collect::<Vec<_>>());
        let (e, f, ratio) = match row.work {
            // Compare the bytes that reach the devices: the engine writes 5/4 of what it is given.
            Work::SeqWrite => (
                format!(
                    "{:.0} MB/s logical ({:.0} MB/s to devices)",
                    e_bw / 1e6,
                    e_bw * 1.25 / 1e6
                ),
                format!("{:.0} MB/s to devices", f_bw / 1e6),
                e_bw * 1.25 / f_bw,
            ),
            _ => (
                format!("{:.0} IOPS", e_iops),
                format!("{:.0} IOPS", f_iops),
                e_iops / f_iops,
            ),
        };
        writeln!(t, "| {} | {} | {e} | {f} | {ratio:.2} | {e_lat:.0} / {e_p99:.0} | {f_lat:.0} / {f_p99:.0} |", row.work.label(), row.callers)
            .unwrap();
    }
    let mut x = String::new();
    writeln!(x, "| buffer | xor_into | memcpy | xor / memcpy |").unwrap();
    writeln!(x, "| --- | ---: | ---: | ---: |").unwrap();
    for (name, xs, cs) in [
        ("256 KiB (cache-resident)", &xor_small, &cpy_small),
        ("64 MiB (memory-bound)", &xor_big, &cpy_big),
    ] {
        let (xm, cm) = (median(xs), median(cs));
        writeln!(
            x,
            "| {name} | {:.1} GB/s | {:.1} GB/s | {:.2} |",
            xm / 1e9,
            cm / 1e9,
            xm / cm
        )
        .unwrap();
    }
    println!("\n{t}\n{x}\nengine counters: {stats}");

    let cmd = "cargo bench --bench raid";
    let env_note = format!(
        "HAPAIR_BENCH_MEMBER_MIB={member_mib} HAPAIR_BENCH_SECS={secs} HAPAIR_BENCH_ROUNDS={rounds} HAPAIR_BENCH_CALLERS={}",
        callers_list.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(",")
    );
    let body = format!(
        "# RAID-4 engine benchmark\n\nGenerated by `{cmd}` (settings: `{env_note}`); medians of {rounds} interleaved rounds, \
         {secs} s per run after a 1 s ramp.\n\n## Machine\n{machine}\n\
         ## Setup\n5 loop devices of {member_mib} MiB (4 data + 1 parity), 64 KiB chunks (256 KiB stripes), io_uring engine. \
         The engine is driven through `Aggregate::read`/`write` from N caller threads (queue depth N requests). fio runs \
         `--ioengine=io_uring --direct=1` on the same loop devices' data areas: for sequential writes 64 KiB writes \
         round-robin over all 5 devices at iodepth 20·N (what N full-stripe 1 MiB writes put on the devices), for 4 KiB \
         random I/O on the 4 data devices at iodepth N. Random 4 KiB writes on RAID-4 are read-modify-writes (read old \
         data and old parity, write both: 4 device I/Os, 2 of them on the one parity device), so their ratio is \
         expected far below 1.\n\n## Results\n{t}\n### XOR\n{x}\nEngine counters over the whole run: {stats}.\n"
    );
    write_results("RESULTS-raid.md", &body)?;
    progress!("done; wrote bench/RESULTS-raid.md; detaching loop devices");
    drop(loops);
    Ok(())
}

/// Write `bench/NAME`, keeping any hand-written "## Notes" section of the existing file.
fn write_results(name: &str, body: &str) -> Result<(), String> {
    let path = match std::env::var("HAPAIR_BENCH_OUT") {
        Ok(p) => std::path::PathBuf::from(p),
        Err(_) => std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("bench")
            .join(name),
    };
    let notes = std::fs::read_to_string(&path)
        .ok()
        .and_then(|old| old.find("\n## Notes").map(|i| old[i..].to_string()))
        .unwrap_or_default();
    std::fs::write(&path, format!("{body}{notes}")).map_err(|e| format!("{}: {e}", path.display()))
}

//! NBD export benchmark, run by hand: `cargo bench --bench nbd`.
//!
//! fio's nbd engine (libnbd, one connection) against, interleaved round by round:
//! - `hapaird run` serving a 4+1 RAID-4 aggregate of loop devices (the release binary), in two
//!   configurations on two sets of loop devices: **write-through** (no NVRAM log: a write is
//!   acknowledged once on the members) and **NVRAM** (a single node's NVRAM log, a file in
//!   `HAPAIR_BENCH_NVRAM_DIR`, default /var/tmp: ext4, written with O_DIRECT; no partner, so no mirror:
//!   `cargo bench --bench mirror` measures that), and **NVRAM in RAM** (the log a file on tmpfs,
//!   `HAPAIR_BENCH_RAM_DIR`, default /dev/shm: acknowledged from RAM, as nbdkit cache=none is);
//! - `nbdkit file` serving one loop device of the same size on the same backing filesystem,
//!   with the page cache (`cache=default`, the plugin's default) and with `cache=none` (the
//!   plugin drops pages it read or wrote; nbdkit 1.32's file plugin has no O_DIRECT mode);
//! - fio's io_uring engine with `--direct=1` straight on the aggregate's 4 data loop devices
//!   (same block size and queue depth; no parity: the ceiling of the disks themselves).
//!
//! Environment: `HAPAIR_BENCH_MEMBER_MIB` (1024), `HAPAIR_BENCH_SECS` per run (6, after a 1 s
//! ramp), `HAPAIR_BENCH_ROUNDS` (3), `HAPAIR_BENCH_WORKLOADS` (all: randread1, randread32,
//! randwrite1, randwrite32, seqread, seqwrite), `HAPAIR_BENCH_CONTENDERS` (all: hapaird,
//! hapaird-nvram, hapaird-ram, nbdkit, nbdkit-nocache, raw), `HAPAIR_BENCH_WORKERS` (hapaird `io.workers`, default the
//! daemon's), `HAPAIR_BENCH_DIR` (/var/tmp). Results go to stdout and `bench/RESULTS.md` (or `HAPAIR_BENCH_OUT`)
//! (a hand-written "## Notes" section there is kept).

#[macro_use]
mod common;

use common::*;
use hapair::core::label::DATA_OFFSET_BYTES;
use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const EXPORT: &str = "bench0";

#[derive(Clone, Copy)]
struct Work {
    key: &'static str,
    label: &'static str,
    rw: &'static str,
    bs: &'static str,
    depth: usize,
    /// Report MB/s instead of IOPS.
    bandwidth: bool,
}

const WORKS: [Work; 6] = [
    Work {
        key: "randread1",
        label: "4 KiB rand read QD1",
        rw: "randread",
        bs: "4k",
        depth: 1,
        bandwidth: false,
    },
    Work {
        key: "randread32",
        label: "4 KiB rand read QD32",
        rw: "randread",
        bs: "4k",
        depth: 32,
        bandwidth: false,
    },
    Work {
        key: "randwrite1",
        label: "4 KiB rand write QD1",
        rw: "randwrite",
        bs: "4k",
        depth: 1,
        bandwidth: false,
    },
    Work {
        key: "randwrite32",
        label: "4 KiB rand write QD32",
        rw: "randwrite",
        bs: "4k",
        depth: 32,
        bandwidth: false,
    },
    Work {
        key: "seqread",
        label: "1 MiB seq read QD8",
        rw: "read",
        bs: "1m",
        depth: 8,
        bandwidth: true,
    },
    Work {
        key: "seqwrite",
        label: "1 MiB seq write QD8",
        rw: "write",
        bs: "1m",
        depth: 8,
        bandwidth: true,
    },
];

#[derive(Clone, Copy, PartialEq)]
enum Who {
    Hapaird,
    HapairdNvram,
    HapairdRam,
    Nbdkit,
    NbdkitNoCache,
    Raw,
}

impl Who {
    fn key(self) -> &'static str {
        match self {
            Who::Hapaird => "hapaird",
            Who::HapairdNvram => "hapaird-nvram",
            Who::HapairdRam => "hapaird-ram",
            Who::Nbdkit => "nbdkit",
            Who::NbdkitNoCache => "nbdkit-nocache",
            Who::Raw => "raw",
        }
    }
    fn label(self) -> &'static str {
        match self {
            Who::Hapaird => "hapaird write-through (no NVRAM)",
            Who::HapairdNvram => "hapaird NVRAM log (no partner)",
            Who::HapairdRam => "hapaird NVRAM log in RAM (tmpfs, no partner)",
            Who::Nbdkit => "nbdkit file",
            Who::NbdkitNoCache => "nbdkit file cache=none",
            Who::Raw => "raw io_uring (4 data devs)",
        }
    }
}

fn common_args(w: &Work, secs: u64) -> Vec<String> {
    vec![
        format!("--rw={}", w.rw),
        format!("--bs={}", w.bs),
        format!("--iodepth={}", w.depth),
        "--time_based".into(),
        format!("--runtime={secs}"),
        "--ramp_time=1".into(),
        "--norandommap".into(),
        "--randrepeat=0".into(),
    ]
}

fn nbd_fio(port: u16, w: &Work, secs: u64) -> Result<FioResult, String> {
    let mut args = vec![
        "--name=nbd".to_string(),
        "--ioengine=nbd".into(),
        format!("--uri=nbd://127.0.0.1:{port}/{EXPORT}"),
    ];
    args.extend(common_args(w, secs));
    run_fio(&args)
}

fn raw_fio(devs: &[LoopDev], w: &Work, secs: u64) -> Result<FioResult, String> {
    let names: Vec<String> = devs.iter().map(|l| l.dev.display().to_string()).collect();
    let mut args = vec![
        "--name=raw".to_string(),
        "--ioengine=io_uring".into(),
        "--direct=1".into(),
        format!("--filename={}", names.join(":")),
        // The aggregate's data area only: labels and mailboxes stay intact.
        format!("--offset={DATA_OFFSET_BYTES}"),
        format!("--size={}", devs[0].bytes - DATA_OFFSET_BYTES),
    ];
    args.extend(common_args(w, secs));
    run_fio(&args)
}

fn start_nbdkit(
    solo: &LoopDev,
    port: u16,
    nocache: bool,
    log: &Path,
) -> Result<ChildGuard, String> {
    let mut cmd = Command::new("nbdkit");
    cmd.args([
        "--exit-with-parent",
        "-f",
        "-p",
        &port.to_string(),
        "-i",
        "127.0.0.1",
        "file",
    ])
    .arg(&solo.dev);
    if nocache {
        cmd.arg("cache=none");
    }
    let logf = std::fs::File::create(log).map_err(|e| e.to_string())?;
    let child = cmd
        .stdout(Stdio::null())
        .stderr(logf)
        .spawn()
        .map_err(|e| format!("nbdkit: {e}"))?;
    let mut g = ChildGuard::new(
        if nocache {
            "nbdkit cache=none"
        } else {
            "nbdkit"
        },
        child,
    );
    wait_port(port, &mut g, Duration::from_secs(10))?;
    Ok(g)
}

fn main() {
    if let Err(e) = bench() {
        eprintln!("nbd bench failed: {e}");
        std::process::exit(1);
    }
}

fn list_env(name: &str, all: &[&str]) -> Vec<String> {
    match std::env::var(name) {
        Ok(v) => v
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
        Err(_) => all.iter().map(|s| s.to_string()).collect(),
    }
}

fn bench() -> Result<(), String> {
    let _ = interrupted_flag();
    require_root();
    for t in ["fio", "nbdkit", "losetup", "blockdev", "dd"] {
        require_tool(t);
    }
    let hapaird = env!("CARGO_BIN_EXE_hapaird");
    let member_mib = env_u64("HAPAIR_BENCH_MEMBER_MIB", 1024);
    let secs = env_u64("HAPAIR_BENCH_SECS", 6);
    let rounds = env_u64("HAPAIR_BENCH_ROUNDS", 3) as usize;
    let workers = std::env::var("HAPAIR_BENCH_WORKERS").ok();
    let work_keys = list_env(
        "HAPAIR_BENCH_WORKLOADS",
        &WORKS.iter().map(|w| w.key).collect::<Vec<_>>(),
    );
    let works: Vec<Work> = WORKS
        .iter()
        .copied()
        .filter(|w| work_keys.iter().any(|k| k == w.key))
        .collect();
    let all_who = [
        Who::Hapaird,
        Who::HapairdNvram,
        Who::HapairdRam,
        Who::Nbdkit,
        Who::NbdkitNoCache,
        Who::Raw,
    ];
    let nvram_dir = std::env::var("HAPAIR_BENCH_NVRAM_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let nvram_mib = env_u64("HAPAIR_BENCH_NVRAM_MIB", 64);
    let who_keys = list_env(
        "HAPAIR_BENCH_CONTENDERS",
        &all_who.iter().map(|w| w.key()).collect::<Vec<_>>(),
    );
    let whos: Vec<Who> = all_who
        .iter()
        .copied()
        .filter(|w| who_keys.iter().any(|k| k == w.key()))
        .collect();
    if works.is_empty() || whos.is_empty() {
        return Err(
            "nothing to run: check HAPAIR_BENCH_WORKLOADS / HAPAIR_BENCH_CONTENDERS".into(),
        );
    }
    let base = std::env::var("HAPAIR_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let dir = tempfile::Builder::new()
        .prefix("hapair-bench-nbd.")
        .tempdir_in(&base)
        .map_err(|e| e.to_string())?;
    let machine = machine_description(dir.path());
    let member_bytes = member_mib << 20;
    let export_bytes = 4 * (member_bytes - DATA_OFFSET_BYTES);

    // hapaird instances, each on its own 5 loop devices: write-through always (the raw rows
    // use its data devices), then those asked for; (who, NVRAM file).
    let ram_dir = std::env::var("HAPAIR_BENCH_RAM_DIR").unwrap_or_else(|_| "/dev/shm".into());
    let mut instances: Vec<(Who, Option<std::path::PathBuf>)> = vec![(Who::Hapaird, None)];
    let nvdir = tempfile::Builder::new()
        .prefix("hapair-bench-nbd-nvram.")
        .tempdir_in(&nvram_dir)
        .map_err(|e| e.to_string())?;
    let ramdir = tempfile::Builder::new()
        .prefix("hapair-bench-nbd-ram.")
        .tempdir_in(&ram_dir)
        .map_err(|e| format!("{ram_dir}: {e}"))?;
    if whos.contains(&Who::HapairdNvram) {
        instances.push((Who::HapairdNvram, Some(nvdir.path().join("bench0.nvlog"))));
    }
    if whos.contains(&Who::HapairdRam) {
        instances.push((Who::HapairdRam, Some(ramdir.path().join("bench1.nvlog"))));
    }
    let nloops = 5 * instances.len();
    progress!(
        "creating {nloops} loop devices of {member_mib} MiB and one of {} MiB (filled) in {}",
        export_bytes >> 20,
        dir.path().display()
    );
    let loops: Vec<LoopDev> = (0..nloops)
        .map(|i| LoopDev::new(dir.path(), &format!("m{i}.img"), member_bytes, true))
        .collect();
    check_interrupt()?;
    let solo = LoopDev::new(dir.path(), "solo.img", export_bytes, true);
    check_interrupt()?;

    let workers_line = workers
        .as_ref()
        .map(|w| format!("workers = {w}\n"))
        .unwrap_or_default();
    // Instance i on loops 5i..5i+5.
    let mut hports = Vec::new();
    let mut configs = Vec::new();
    let mut hlogs = Vec::new();
    for (i, (who, nvram)) in instances.iter().enumerate() {
        let port = free_port();
        let m = &loops[i * 5..i * 5 + 5];
        let nv_lines = match nvram {
            Some(p) => format!("nvram = \"{}\"\nnvram_mib = {nvram_mib}\n", p.display()),
            None => String::new(),
        };
        let toml = format!(
            "node = \"a\"\n\n[io]\nengine = \"io_uring\"\n{workers_line}\n[[aggregate]]\nname = \"{EXPORT}\"\nhome = \"a\"\n\
             data = [{}]\nparity = \"{}\"\nchunk_kib = 64\n{nv_lines}\n[[export]]\nname = \"{EXPORT}\"\naggregate = \"{EXPORT}\"\nlisten = \"127.0.0.1:{port}\"\n",
            m[..4].iter().map(|l| format!("\"{}\"", l.dev.display())).collect::<Vec<_>>().join(", "),
            m[4].dev.display()
        );
        let config = dir.path().join(format!("hapaird{i}.toml"));
        std::fs::write(&config, &toml).map_err(|e| e.to_string())?;
        progress!("hapaird format for {} (zeroes every member)", who.label());
        let st = Command::new(hapaird)
            .args(["format", "--force", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .status()
            .map_err(|e| e.to_string())?;
        if !st.success() {
            return Err(format!("hapaird format failed: {st}"));
        }
        check_interrupt()?;
        hports.push(port);
        configs.push(config);
        hlogs.push(dir.path().join(format!("hapaird{i}.log")));
    }
    let start_hapaird = |i: usize| -> Result<ChildGuard, String> {
        let child = Command::new(hapaird)
            .args(["run", "--config"])
            .arg(&configs[i])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&hlogs[i])
                    .map_err(|e| e.to_string())?,
            )
            .spawn()
            .map_err(|e| format!("hapaird run: {e}"))?;
        let mut g = ChildGuard::new(instances[i].0.label(), child);
        wait_port(hports[i], &mut g, Duration::from_secs(30))?;
        Ok(g)
    };
    let mut hguards = Vec::new();
    for i in 0..configs.len() {
        hguards.push(start_hapaird(i)?);
        progress!(
            "{} serving on 127.0.0.1:{} (pid {})",
            hguards[i].name,
            hports[i],
            hguards[i].pid()
        );
    }
    let mut restarts: Vec<String> = Vec::new();

    progress!("settling (sync, 5 s)");
    settle(5);
    let (kport, kport_nc) = (free_port(), free_port());
    let mut nbdkits = Vec::new();
    if whos.contains(&Who::Nbdkit) {
        nbdkits.push(start_nbdkit(
            &solo,
            kport,
            false,
            &dir.path().join("nbdkit.log"),
        )?);
    }
    if whos.contains(&Who::NbdkitNoCache) {
        nbdkits.push(start_nbdkit(
            &solo,
            kport_nc,
            true,
            &dir.path().join("nbdkit-nocache.log"),
        )?);
    }
    progress!(
        "nbdkit file {} on ports {kport} (cache=default) and {kport_nc} (cache=none)",
        solo.dev.display()
    );

    // results[work][who] = per-round results
    let mut results: Vec<Vec<Vec<FioResult>>> = vec![vec![Vec::new(); whos.len()]; works.len()];
    let total = rounds * works.len() * whos.len();
    let mut done = 0;
    for round in 0..rounds {
        for (wi, w) in works.iter().enumerate() {
            for k in 0..whos.len() {
                // Rotate the order each round so that no contender always follows the same one.
                let ci = (k + round + wi) % whos.len();
                let who = whos[ci];
                for (i, g) in hguards.iter_mut().enumerate() {
                    if !g.alive() {
                        // Seen twice on the shared dev VM: hapaird exited 0 while idle between
                        // runs, i.e. something outside this bench signalled it. Restart it and
                        // say so.
                        let st = g.stop();
                        let why = format!(
                            "before run {} {} was gone ({st:?}); restarted",
                            done + 1,
                            g.name
                        );
                        progress!("{why}");
                        restarts.push(why);
                        *g = start_hapaird(i)?;
                    }
                }
                // nbdkit opens the device buffered: start it from a cold, clean page cache.
                solo.flush_buffers();
                let r = match who {
                    Who::Hapaird | Who::HapairdNvram | Who::HapairdRam => {
                        let i = instances
                            .iter()
                            .position(|(x, _)| *x == who)
                            .expect("started");
                        nbd_fio(hports[i], w, secs)
                    }
                    Who::Nbdkit => nbd_fio(kport, w, secs),
                    Who::NbdkitNoCache => nbd_fio(kport_nc, w, secs),
                    Who::Raw => raw_fio(&loops[..4], w, secs),
                }?;
                // Write back what a buffered server left dirty before the next contender runs.
                solo.flush_buffers();
                done += 1;
                progress!(
                    "[{done}/{total}] round {} {:<22} {:<33} {:>9.0} IOPS {:>8.1} MB/s  lat p50 {:>6.0} us mean {:>6.0} us p99 {:>6.0} us",
                    round + 1, w.label, who.label(), r.iops, r.bytes_per_sec / 1e6, r.lat_p50_us, r.lat_mean_us, r.lat_p99_us
                );
                results[wi][ci].push(r);
            }
        }
    }

    progress!("stopping hapaird (SIGTERM: drain and clean close)");
    let mut exits = Vec::new();
    let mut warnings: Vec<String> = Vec::new();
    let mut nvram_line = String::new();
    let mut ram_line = String::new();
    for (i, g) in hguards.iter_mut().enumerate() {
        let st = g.stop();
        exits.push(match st {
            Some(s) if s.success() => format!("{} exited cleanly", g.name),
            other => format!("{} exit: {other:?} (see log)", g.name),
        });
        let text = std::fs::read_to_string(&hlogs[i]).unwrap_or_default();
        warnings.extend(
            text.lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .take(5)
                .map(|l| format!("{}: {l}", g.name)),
        );
        if let Some(l) = text.lines().find(|l| l.contains("NVRAM:")) {
            let line: String = l[l.find("NVRAM:").unwrap()..].chars().take(100).collect();
            match instances[i].0 {
                Who::HapairdRam => ram_line = line,
                _ => nvram_line = line,
            }
        }
    }
    let hapaird_exit = exits.join("; ");
    drop(nbdkits);

    // Tables.
    let idx = |who: Who| whos.iter().position(|&w| w == who);
    let med = |wi: usize, ci: usize, f: &dyn Fn(&FioResult) -> f64| {
        median(&results[wi][ci].iter().map(f).collect::<Vec<_>>())
    };
    let mut t = String::new();
    write!(t, "| workload |").unwrap();
    for w in &whos {
        write!(t, " {} |", w.label()).unwrap();
    }
    // (name, numerator, denominator)
    let ratio_cols: Vec<(&str, Who, Who)> = [
        ("NVRAM / write-through", Who::HapairdNvram, Who::Hapaird),
        (
            "write-through / nbdkit cache=none",
            Who::Hapaird,
            Who::NbdkitNoCache,
        ),
        (
            "NVRAM / nbdkit cache=none",
            Who::HapairdNvram,
            Who::NbdkitNoCache,
        ),
        (
            "NVRAM in RAM / nbdkit cache=none",
            Who::HapairdRam,
            Who::NbdkitNoCache,
        ),
        ("write-through / raw", Who::Hapaird, Who::Raw),
    ]
    .into_iter()
    .filter(|(_, a, b)| idx(*a).is_some() && idx(*b).is_some())
    .collect();
    for (name, _, _) in &ratio_cols {
        write!(t, " {name} |").unwrap();
    }
    writeln!(t).unwrap();
    writeln!(t, "|---|{}", "---:|".repeat(whos.len() + ratio_cols.len())).unwrap();
    let mut lat = String::new();
    write!(lat, "| workload |").unwrap();
    for w in &whos {
        write!(lat, " {} |", w.label()).unwrap();
    }
    writeln!(lat).unwrap();
    writeln!(lat, "|---|{}", "---:|".repeat(whos.len())).unwrap();
    for (wi, w) in works.iter().enumerate() {
        let metric = |r: &FioResult| if w.bandwidth { r.bytes_per_sec } else { r.iops };
        write!(t, "| {} |", w.label).unwrap();
        write!(lat, "| {} |", w.label).unwrap();
        for ci in 0..whos.len() {
            let v = med(wi, ci, &metric);
            if w.bandwidth {
                write!(t, " {:.0} MB/s |", v / 1e6).unwrap();
            } else {
                write!(t, " {:.0} IOPS |", v).unwrap();
            }
            write!(
                lat,
                " {:.0} / {:.0} |",
                med(wi, ci, &|r| r.lat_mean_us),
                med(wi, ci, &|r| r.lat_p99_us)
            )
            .unwrap();
        }
        for (_, num, den) in &ratio_cols {
            write!(
                t,
                " {:.2} |",
                med(wi, idx(*num).unwrap(), &metric) / med(wi, idx(*den).unwrap(), &metric)
            )
            .unwrap();
        }
        writeln!(t).unwrap();
        writeln!(lat).unwrap();
    }
    let mut spread = String::new();
    for (wi, w) in works.iter().enumerate() {
        for (ci, who) in whos.iter().enumerate() {
            let vals: Vec<String> = results[wi][ci]
                .iter()
                .map(|r| {
                    if w.bandwidth {
                        format!("{:.0}", r.bytes_per_sec / 1e6)
                    } else {
                        format!("{:.0}", r.iops)
                    }
                })
                .collect();
            writeln!(
                spread,
                "- {} / {}: {}",
                w.label,
                who.label(),
                vals.join(", ")
            )
            .unwrap();
        }
    }
    println!("\n{t}\nLatency, mean / p99 (us):\n\n{lat}");

    let settings = format!(
        "HAPAIR_BENCH_MEMBER_MIB={member_mib} HAPAIR_BENCH_SECS={secs} HAPAIR_BENCH_ROUNDS={rounds} HAPAIR_BENCH_NVRAM_DIR={nvram_dir} HAPAIR_BENCH_NVRAM_MIB={nvram_mib}{}",
        workers.as_ref().map(|w| format!(" HAPAIR_BENCH_WORKERS={w}")).unwrap_or_default()
    );
    let body = format!(
        "# NBD export benchmark\n\nGenerated by `cargo bench --bench nbd` (settings: `{settings}`). Medians of {rounds} \
         rounds; within a round the contenders take turns on each workload, in an order rotated every round. Each run is \
         fio for {secs} s after a 1 s ramp. 4 KiB rows are IOPS, 1 MiB rows MB/s (10^6 bytes/s).\n\n## Machine\n{machine}\n\
         ## Contenders\n\
         - **hapaird write-through (no NVRAM)**: `hapaird run`, release build, io_uring engine, {} NBD workers, serving a \
         RAID-4 aggregate of 5 loop devices of {member_mib} MiB (4 data + 1 parity, 64 KiB chunks, 256 KiB stripes; export \
         {} MiB), no `nvram` key: a write is acknowledged once it is on the members (RAID-4 read-modify-write for a small \
         write). Members opened O_DIRECT: no page cache anywhere on its path.\n\
         - **hapaird NVRAM log (no partner)**: the same on its own 5 loop devices, with `nvram` = a {nvram_mib} MiB file \
         in {nvram_dir} ({nvram_line}), default CP interval (1 s, or at 50 % full); single node, so no mirror. A write \
         is acknowledged once written to the log's device (O_DIRECT; the device cache is flushed on the client's \
         FLUSH or FUA, which fio does not send here, and before every CP), except whole aligned stripes (the 1 MiB \
         rows), which go to the members directly after a small flushed Stripes record; CPs write the log to the \
         members in the background.\n\
         - **hapaird NVRAM log in RAM (tmpfs, no partner)**: the same again on its own 5 loop devices, the log a \
         {nvram_mib} MiB file in {ram_dir} ({ram_line}): a write is acknowledged once it is in the log in RAM (it \
         survives a crash of hapaird, not a power loss; in a pair the partner's mirror holds it too, so it survives \
         the loss of one machine). That is what nbdkit cache=none gives at acknowledgement (below); it is not what \
         the two rows before give. \
         After the run: {hapaird_exit}.\n\
         - **nbdkit file**: `nbdkit --exit-with-parent -f -p PORT -i 127.0.0.1 file /dev/loopN` over one loop device \
         (direct I/O to its backing file) of the same size as the export, backing file fully written first. nbdkit \
         opens the device buffered, so reads can be served from and writes absorbed by the page cache; its page cache \
         is dropped (`blockdev --flushbufs`) before and after every run, so each run starts cold and a run's dirty \
         pages are written back outside the measured window.\n\
         - **nbdkit file cache=none**: the same with `cache=none` (nbdkit 1.32's way to stay out of the page cache: \
         fadvise DONTNEED after reads, sync_file_range + DONTNEED after writes; there is no O_DIRECT option). Its \
         writes are acknowledged from the page cache with their write-back started, not finished: its QD1 write \
         latency is below that of a direct write to the device itself (raw row). So at acknowledgement a write is in \
         RAM, as with hapaird's log in RAM; hapaird's write-through and disk-file NVRAM rows wait for the device.\n\
         - **raw**: fio `--ioengine=io_uring --direct=1` straight on the aggregate's 4 data loop devices (their data \
         area), same block size and iodepth, files round-robin. No parity: the ceiling the disks give.\n\n\
         All NBD clients are fio 3.33's `nbd` engine (libnbd, one TCP connection on 127.0.0.1).\n\n\
         hapaird restarts during the run (it was found exited, not by this bench): {}.\n\n## Results\n{t}\n### Latency, mean / p99 (us)\n{lat}\n### Every round\n{spread}\n{}",
        workers.clone().unwrap_or_else(|| "64 (the daemon's default)".into()),
        export_bytes >> 20,
        if restarts.is_empty() { "none".to_string() } else { restarts.join("; ") },
        if warnings.is_empty() { String::new() } else { format!("hapaird log warnings:\n```\n{}\n```\n", warnings.join("\n")) }
    );
    let path = match std::env::var("HAPAIR_BENCH_OUT") {
        Ok(p) => std::path::PathBuf::from(p),
        Err(_) => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("bench")
            .join("RESULTS.md"),
    };
    let notes = std::fs::read_to_string(&path)
        .ok()
        .and_then(|old| old.find("\n## Notes").map(|i| old[i..].to_string()))
        .unwrap_or_default();
    std::fs::write(&path, format!("{body}{notes}"))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    progress!("wrote {}; detaching loop devices", path.display());
    drop(solo);
    drop(loops);
    drop(nvdir);
    drop(ramdir);
    Ok(())
}

//! The cost of mirroring the NVRAM log, run by hand: `cargo bench --bench mirror`.
//!
//! fio's nbd engine, 4 KiB random writes at QD1 and QD32, against four release `hapaird`
//! setups that all run side by side for the whole bench (each on its own RAID-4 4+1 of loop
//! devices of the same size on the same ext4), interleaved round by round:
//! - **local, ext4**: one hapaird without `[pair]`, NVRAM log a file on /var/tmp (ext4, written with O_DIRECT):
//!   a write is acknowledged once it is in the local log (no partner);
//! - **mirrored, ext4**: a pair (node a serves the measured aggregate, node b holds the mirror
//!   of a's log), log and mirror files on /var/tmp; the interconnect is TCP on 127.0.0.1; a write
//!   is acknowledged once in a's log and in b's mirror;
//! - **local, tmpfs** and **mirrored, tmpfs**: the same with the log files on /dev/shm (the
//!   speed of a real NVDIMM; survives a process kill only, not a machine crash).
//!
//! Before the daemons start, the primitives the numbers are made of are timed in this process:
//! msync(MS_SYNC) of one dirty 4 KiB page of a mapped file on ext4 and on tmpfs, and a TCP
//! round trip on 127.0.0.1 carrying 4 KiB one way and 16 bytes back.
//!
//! Environment: `HAPAIR_BENCH_MEMBER_MIB` (256), `HAPAIR_BENCH_NVRAM_MIB` (64),
//! `HAPAIR_BENCH_SECS` per run (6, after a 1 s ramp), `HAPAIR_BENCH_ROUNDS` (3),
//! `HAPAIR_BENCH_SETTLE_SECS` after each run (2: the CP of what the run left in the log),
//! `HAPAIR_BENCH_OUT` (bench/RESULTS-mirror.md; a hand-written "## Notes" section is kept).

#[macro_use]
mod common;

use common::*;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const EXPORT: &str = "bench0";

#[derive(Clone, Copy)]
struct Work {
    label: &'static str,
    depth: usize,
}

const WORKS: [Work; 2] = [
    Work {
        label: "4 KiB rand write QD1",
        depth: 1,
    },
    Work {
        label: "4 KiB rand write QD32",
        depth: 32,
    },
];

#[derive(Clone, Copy, PartialEq)]
struct Who {
    key: &'static str,
    label: &'static str,
    mirrored: bool,
    shm: bool,
}

const WHOS: [Who; 4] = [
    Who {
        key: "local-ext4",
        label: "local only, log on ext4 (O_DIRECT)",
        mirrored: false,
        shm: false,
    },
    Who {
        key: "mirror-ext4",
        label: "mirrored, log + mirror on ext4 (O_DIRECT)",
        mirrored: true,
        shm: false,
    },
    Who {
        key: "local-shm",
        label: "local only, log on tmpfs",
        mirrored: false,
        shm: true,
    },
    Who {
        key: "mirror-shm",
        label: "mirrored, log + mirror on tmpfs",
        mirrored: true,
        shm: true,
    },
];

/// One running setup: its daemons, the port of the measured export, a's control socket.
struct Setup {
    who: Who,
    port: u16,
    ctl: Option<PathBuf>,
    logs: Vec<PathBuf>,
    // Dropped (stopped) before the loop devices.
    guards: Vec<ChildGuard>,
}

fn q(p: &Path) -> String {
    format!("\"{}\"", p.display())
}

fn run_ok(cmd: &mut Command, what: &str) -> Result<(), String> {
    let out = cmd
        .stdout(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

fn spawn_daemon(hapaird: &str, cfg: &Path, log: &Path, name: &str) -> Result<ChildGuard, String> {
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| e.to_string())?;
    let child = Command::new(hapaird)
        .args(["run", "--config"])
        .arg(cfg)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(logf)
        .spawn()
        .map_err(|e| format!("hapaird run: {e}"))?;
    Ok(ChildGuard::new(name, child))
}

/// One request on a control socket.
fn ctl(sock: &Path, req: &str) -> Result<serde_json::Value, String> {
    let mut s = UnixStream::connect(sock).map_err(|e| format!("{}: {e}", sock.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("{req}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut line = Vec::new();
    let mut b = [0u8; 4096];
    while !line.ends_with(b"\n") {
        let n = s.read(&mut b).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        line.extend_from_slice(&b[..n]);
    }
    serde_json::from_slice(&line).map_err(|e| format!("control reply: {e}"))
}

fn status(sock: &Path) -> Result<serde_json::Value, String> {
    Ok(ctl(sock, r#"{"v":1,"cmd":"status"}"#)?["status"].clone())
}

fn local_state(st: &serde_json::Value) -> String {
    st["nodes"]
        .as_array()
        .and_then(|ns| ns.iter().find(|n| n["local"] == true))
        .and_then(|n| n["state"].as_str())
        .unwrap_or("?")
        .to_string()
}

fn aggregate_toml(
    name: &str,
    home: &str,
    devs: &[LoopDev],
    nvram: &Path,
    nvram_mib: u64,
) -> String {
    format!(
        "[[aggregate]]\nname = \"{name}\"\nhome = \"{home}\"\ndata = [{}]\nparity = {}\nchunk_kib = 64\nnvram = {}\nnvram_mib = {nvram_mib}\n",
        devs[..devs.len() - 1].iter().map(|l| q(&l.dev)).collect::<Vec<_>>().join(", "),
        q(&devs[devs.len() - 1].dev),
        q(nvram)
    )
}

/// Make the loop devices, configs and daemons of one setup and wait until it serves.
fn start_setup(
    hapaird: &str,
    who: Who,
    dir: &Path,
    nvdir: &Path,
    member_bytes: u64,
    nvram_mib: u64,
    loops: &mut Vec<LoopDev>,
) -> Result<Setup, String> {
    let k = who.key;
    let first = loops.len();
    for i in 0..5 {
        loops.push(LoopDev::new(
            dir,
            &format!("{k}-m{i}.img"),
            member_bytes,
            false,
        ));
    }
    let port = free_port();
    let export = |aggr: &str, port: u16| {
        format!("[[export]]\nname = \"{EXPORT}\"\naggregate = \"{aggr}\"\nlisten = \"127.0.0.1:{port}\"\n")
    };
    let io = "[io]\nengine = \"io_uring\"\n";
    if !who.mirrored {
        let cfg = dir.join(format!("{k}.toml"));
        let text = format!(
            "node = \"a\"\n{io}{}{}",
            aggregate_toml(
                &format!("{k}-a"),
                "a",
                &loops[first..first + 5],
                &nvdir.join(format!("{k}-a.log")),
                nvram_mib
            ),
            export(&format!("{k}-a"), port)
        );
        std::fs::write(&cfg, text).map_err(|e| e.to_string())?;
        run_ok(
            Command::new(hapaird)
                .args(["format", "--force", "--config"])
                .arg(&cfg),
            "hapaird format",
        )?;
        let log = dir.join(format!("{k}.log"));
        let mut g = spawn_daemon(hapaird, &cfg, &log, k)?;
        wait_port(port, &mut g, Duration::from_secs(30))?;
        return Ok(Setup {
            who,
            port,
            ctl: None,
            logs: vec![log],
            guards: vec![g],
        });
    }
    // b's own aggregate (a pair needs one per node): small, never written by the bench.
    for i in 0..3 {
        loops.push(LoopDev::new(dir, &format!("{k}-b{i}.img"), 32 << 20, false));
    }
    let key = dir.join(format!("{k}.key"));
    std::fs::write(&key, "mirror-bench-key-0123456789abcdef").map_err(|e| e.to_string())?;
    let ic = free_port();
    let port_b = free_port();
    let mut cfgs = Vec::new();
    let mut socks = Vec::new();
    for (node, partner) in [("a", "b"), ("b", "a")] {
        let sock = dir.join(format!("{k}-{node}.sock"));
        let (la, lb) = if node == "a" {
            ("log", "mirror")
        } else {
            ("mirror", "log")
        };
        let text = format!(
            "node = \"{node}\"\n{io}[pair]\npartner = \"{partner}\"\ninterconnect_listen = \"127.0.0.1:{ic}\"\n\
             partner_interconnect = [\"127.0.0.1:{ic}\"]\nkey_file = {}\ncontrol_socket = {}\n{}{}{}\
             [[export]]\nname = \"{EXPORT}-b\"\naggregate = \"{k}-b\"\nlisten = \"127.0.0.1:{port_b}\"\n",
            q(&key),
            q(&sock),
            aggregate_toml(&format!("{k}-a"), "a", &loops[first..first + 5], &nvdir.join(format!("{k}-{node}-aggr-a.{la}")), nvram_mib),
            export(&format!("{k}-a"), port),
            aggregate_toml(&format!("{k}-b"), "b", &loops[first + 5..first + 8], &nvdir.join(format!("{k}-{node}-aggr-b.{lb}")), nvram_mib),
        );
        let cfg = dir.join(format!("{k}-{node}.toml"));
        std::fs::write(&cfg, text).map_err(|e| e.to_string())?;
        cfgs.push(cfg);
        socks.push(sock);
    }
    run_ok(
        Command::new(hapaird)
            .args(["format", "--force", "--config"])
            .arg(&cfgs[0]),
        "hapaird format (pair)",
    )?;
    let logs = vec![
        dir.join(format!("{k}-a.log")),
        dir.join(format!("{k}-b.log")),
    ];
    let mut guards = vec![
        spawn_daemon(hapaird, &cfgs[0], &logs[0], &format!("{k} a"))?,
        spawn_daemon(hapaird, &cfgs[1], &logs[1], &format!("{k} b"))?,
    ];
    wait_port(port, &mut guards[0], Duration::from_secs(30))?;
    // Both Normal and a's log mirrored before anything is measured.
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        check_interrupt()?;
        let ok = (|| -> Result<bool, String> {
            let sa = status(&socks[0])?;
            let sb = status(&socks[1])?;
            Ok(local_state(&sa) == "Normal"
                && local_state(&sb) == "Normal"
                && sa["mirror"]["summary"].as_str().is_some())
        })()
        .unwrap_or(false);
        if ok {
            break;
        }
        for g in guards.iter_mut() {
            if !g.alive() {
                return Err(format!(
                    "{} exited during start; see {}",
                    g.name,
                    dir.display()
                ));
            }
        }
        if Instant::now() > end {
            return Err(format!("pair {k} not Normal within 30 s"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(Setup {
        who,
        port,
        ctl: Some(socks[0].clone()),
        logs,
        guards,
    })
}

fn fio(port: u16, w: &Work, secs: u64) -> Result<FioResult, String> {
    run_fio(&[
        "--name=mirror".into(),
        "--ioengine=nbd".into(),
        format!("--uri=nbd://127.0.0.1:{port}/{EXPORT}"),
        "--rw=randwrite".into(),
        "--bs=4k".into(),
        format!("--iodepth={}", w.depth),
        "--time_based".into(),
        format!("--runtime={secs}"),
        "--ramp_time=1".into(),
        "--norandommap".into(),
        "--randrepeat=0".into(),
    ])
}

/// (median, p99) of `n` timings of `f`, microseconds.
fn time_us(n: usize, mut f: impl FnMut()) -> (f64, f64) {
    let mut v: Vec<f64> = (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (median(&v), v[(v.len() * 99 / 100).min(v.len() - 1)])
}

/// msync(MS_SYNC) of one freshly dirtied 4 KiB page of a mapped 16 MiB file in `dir`.
fn msync_cost(dir: &Path) -> Result<(f64, f64), String> {
    let path = dir.join("msync-probe");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(true)
        .open(&path)
        .map_err(|e| e.to_string())?;
    let bytes = 16usize << 20;
    // Write every block first, as the daemon does, so msync allocates nothing.
    fill_file(&f, bytes)?;
    // SAFETY: the file is ours (created above in our scratch directory) and nobody else maps
    // or truncates it while the map lives.
    let mut m = unsafe { memmap2::MmapMut::map_mut(&f) }.map_err(|e| e.to_string())?;
    let mut i = 0usize;
    let r = time_us(2000, || {
        let off = (i * 4096) % bytes;
        i += 1;
        m[off..off + 4096].fill(i as u8);
        m.flush_range(off, 4096).expect("msync");
    });
    drop(m);
    let _ = std::fs::remove_file(&path);
    Ok(r)
}

/// Write `bytes` zeroes from the start of `f` and sync them.
fn fill_file(mut f: &std::fs::File, bytes: usize) -> Result<(), String> {
    let chunk = vec![0u8; 1 << 20];
    for _ in 0..bytes / chunk.len() {
        f.write_all(&chunk).map_err(|e| e.to_string())?;
    }
    f.sync_all().map_err(|e| e.to_string())
}

/// A TCP round trip on 127.0.0.1: 4 KiB + a 32-byte header one way, 16 bytes back.
fn tcp_rtt() -> Result<(f64, f64), String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = l.local_addr().unwrap();
    let srv = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_nodelay(true).unwrap();
        let mut buf = vec![0u8; 4096 + 32];
        while s.read_exact(&mut buf).is_ok() {
            if s.write_all(&[0u8; 16]).is_err() {
                break;
            }
        }
    });
    let mut c = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    c.set_nodelay(true).map_err(|e| e.to_string())?;
    let msg = vec![7u8; 4096 + 32];
    let mut reply = [0u8; 16];
    for _ in 0..200 {
        c.write_all(&msg).unwrap();
        c.read_exact(&mut reply).unwrap();
    }
    let r = time_us(5000, || {
        c.write_all(&msg).unwrap();
        c.read_exact(&mut reply).unwrap();
    });
    drop(c);
    let _ = srv.join();
    Ok(r)
}

fn main() {
    if let Err(e) = bench() {
        eprintln!("mirror bench failed: {e}");
        std::process::exit(1);
    }
}

fn bench() -> Result<(), String> {
    let _ = interrupted_flag();
    require_root();
    for t in ["fio", "losetup"] {
        require_tool(t);
    }
    let hapaird = env!("CARGO_BIN_EXE_hapaird");
    let member_mib = env_u64("HAPAIR_BENCH_MEMBER_MIB", 256);
    let nvram_mib = env_u64("HAPAIR_BENCH_NVRAM_MIB", 64);
    let secs = env_u64("HAPAIR_BENCH_SECS", 6);
    let rounds = env_u64("HAPAIR_BENCH_ROUNDS", 3) as usize;
    let settle_secs = env_u64("HAPAIR_BENCH_SETTLE_SECS", 2);
    let dir = tempfile::Builder::new()
        .prefix("hapair-bench-mirror.")
        .tempdir_in("/var/tmp")
        .map_err(|e| e.to_string())?;
    let shm = tempfile::Builder::new()
        .prefix("hapair-bench-mirror.")
        .tempdir_in("/dev/shm")
        .map_err(|e| e.to_string())?;
    let machine = machine_description(dir.path());

    progress!(
        "timing the primitives: msync of 4 KiB on ext4 and tmpfs, TCP round trip on 127.0.0.1"
    );
    let ms_ext4 = msync_cost(dir.path())?;
    let ms_shm = msync_cost(shm.path())?;
    let rtt = tcp_rtt()?;
    progress!(
        "msync 4 KiB: ext4 {:.1} us (p99 {:.1}), tmpfs {:.1} us (p99 {:.1}); TCP 4 KiB round trip {:.1} us (p99 {:.1})",
        ms_ext4.0, ms_ext4.1, ms_shm.0, ms_shm.1, rtt.0, rtt.1
    );
    check_interrupt()?;

    let mut loops: Vec<LoopDev> = Vec::new();
    let mut setups: Vec<Setup> = Vec::new();
    // Loop devices are dropped after the setups (declared first, dropped last).
    // Per workload, per contender, per round: the fio results; and the runs whose mirror was
    // not current.
    type Runs = (Vec<Vec<Vec<FioResult>>>, Vec<String>);
    let result = (|| -> Result<Runs, String> {
        for who in WHOS {
            progress!(
                "starting {} ({} loop devices of {member_mib} MiB, format, daemons)",
                who.label,
                5
            );
            let nvdir = if who.shm { shm.path() } else { dir.path() };
            setups.push(start_setup(
                hapaird,
                who,
                dir.path(),
                nvdir,
                member_mib << 20,
                nvram_mib,
                &mut loops,
            )?);
            check_interrupt()?;
        }
        progress!("settling (sync, 3 s)");
        settle(3);
        let mut results: Vec<Vec<Vec<FioResult>>> = vec![vec![Vec::new(); WHOS.len()]; WORKS.len()];
        let mut checks: Vec<String> = Vec::new();
        let total = rounds * WORKS.len() * WHOS.len();
        let mut done = 0;
        for round in 0..rounds {
            for (wi, w) in WORKS.iter().enumerate() {
                for k in 0..WHOS.len() {
                    let ci = (k + round + wi) % WHOS.len();
                    let s = &mut setups[ci];
                    for g in s.guards.iter_mut() {
                        if !g.alive() {
                            return Err(format!("{} is gone before run {}", g.name, done + 1));
                        }
                    }
                    let r = fio(s.port, w, secs)?;
                    done += 1;
                    // The mirrored setups must still be mirrored: every write of the run was in
                    // both NVRAMs when acknowledged.
                    let mirror = match &s.ctl {
                        Some(sock) => {
                            let st = status(sock)?;
                            let m = st["mirror"]["summary"].as_str().unwrap_or("?").to_string();
                            let ack = st["mirror"]["ack_mode"].to_string();
                            if !m.starts_with("mirrored") {
                                checks.push(format!(
                                    "round {} {} {}: mirror {m:?}, ack mode {ack}",
                                    round + 1,
                                    w.label,
                                    s.who.label
                                ));
                            }
                            format!("mirror: {m}, ack {ack}")
                        }
                        None => "no partner".into(),
                    };
                    progress!(
                        "[{done}/{total}] round {} {:<22} {:<40} {:>7.0} IOPS  lat mean {:>6.0} us p50 {:>6.0} p99 {:>6.0} p99.9 {:>6.0}  ({mirror})",
                        round + 1, w.label, s.who.label, r.iops, r.lat_mean_us, r.lat_p50_us, r.lat_p99_us, r.lat_p999_us
                    );
                    results[wi][ci].push(r);
                    // Let the CP write back what this run left in the log before the next one.
                    std::thread::sleep(Duration::from_secs(settle_secs));
                }
            }
        }
        Ok((results, checks))
    })();
    // NVRAM kinds as the daemons saw them, and warnings.
    let mut nvram_lines = Vec::new();
    let mut warnings = Vec::new();
    for s in &setups {
        for log in &s.logs {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if let Some(l) = text.lines().find(|l| l.contains("NVRAM:")) {
                let i = l.find("NVRAM:").unwrap();
                nvram_lines.push(format!(
                    "{} ({}): {}",
                    s.who.label,
                    log.file_name().unwrap().to_string_lossy(),
                    l[i..].chars().take(100).collect::<String>()
                ));
            }
            warnings.extend(
                text.lines()
                    .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                    .take(4)
                    .map(|l| format!("{}: {l}", s.who.key)),
            );
        }
    }
    progress!("stopping the daemons (SIGTERM), detaching loop devices");
    drop(setups);
    drop(loops);
    let (results, checks) = result?;

    // Tables.
    let med = |wi: usize, ci: usize, f: &dyn Fn(&FioResult) -> f64| {
        median(&results[wi][ci].iter().map(f).collect::<Vec<_>>())
    };
    let mut t = String::new();
    writeln!(t, "| workload | log on | local only: IOPS | mirrored: IOPS | mirrored / local | local: mean / p50 / p99 (us) | mirrored: mean / p50 / p99 (us) | added by mirroring: mean / p50 / p99 (us) |").unwrap();
    writeln!(t, "|---|---|---:|---:|---:|---:|---:|---:|").unwrap();
    for (wi, w) in WORKS.iter().enumerate() {
        for (fs, li, mi) in [("ext4 (O_DIRECT)", 0, 1), ("tmpfs", 2, 3)] {
            let (li_iops, mi_iops) = (med(wi, li, &|r| r.iops), med(wi, mi, &|r| r.iops));
            let lat = |ci: usize| {
                (
                    med(wi, ci, &|r| r.lat_mean_us),
                    med(wi, ci, &|r| r.lat_p50_us),
                    med(wi, ci, &|r| r.lat_p99_us),
                )
            };
            let (l, m) = (lat(li), lat(mi));
            writeln!(
                t,
                "| {} | {fs} | {:.0} | {:.0} | {:.2} | {:.0} / {:.0} / {:.0} | {:.0} / {:.0} / {:.0} | {:+.0} / {:+.0} / {:+.0} |",
                w.label, li_iops, mi_iops, mi_iops / li_iops, l.0, l.1, l.2, m.0, m.1, m.2, m.0 - l.0, m.1 - l.1, m.2 - l.2
            )
            .unwrap();
        }
    }
    let mut spread = String::new();
    for (wi, w) in WORKS.iter().enumerate() {
        for (ci, who) in WHOS.iter().enumerate() {
            let vals: Vec<String> = results[wi][ci]
                .iter()
                .map(|r| {
                    format!(
                        "{:.0} ({:.0}/{:.0} us)",
                        r.iops, r.lat_mean_us, r.lat_p99_us
                    )
                })
                .collect();
            writeln!(spread, "- {} / {}: {}", w.label, who.label, vals.join(", ")).unwrap();
        }
    }
    let prim = format!(
        "| primitive | median (us) | p99 (us) |\n|---|---:|---:|\n\
         | msync(MS_SYNC) of one dirty 4 KiB page, file on ext4 (/var/tmp) | {:.1} | {:.1} |\n\
         | msync(MS_SYNC) of one dirty 4 KiB page, file on tmpfs (/dev/shm) | {:.1} | {:.1} |\n\
         | TCP round trip on 127.0.0.1, 4 KiB + 32 B there, 16 B back (TCP_NODELAY) | {:.1} | {:.1} |\n",
        ms_ext4.0, ms_ext4.1, ms_shm.0, ms_shm.1, rtt.0, rtt.1
    );
    println!("\n{prim}\n{t}");
    let settings = format!(
        "HAPAIR_BENCH_MEMBER_MIB={member_mib} HAPAIR_BENCH_NVRAM_MIB={nvram_mib} HAPAIR_BENCH_SECS={secs} HAPAIR_BENCH_ROUNDS={rounds} HAPAIR_BENCH_SETTLE_SECS={settle_secs}"
    );
    let body = format!(
        "# The cost of mirroring the NVRAM log\n\nGenerated by `cargo bench --bench mirror` (settings: `{settings}`). \
         Medians of {rounds} rounds; within a round the four setups take turns on each workload, in an order rotated \
         every round, {settle_secs} s apart (the CP of what a run left in the log). Each run is fio for {secs} s after \
         a 1 s ramp.\n\n## Machine\n{machine}\n\
         ## Setups\n\
         All four run side by side for the whole bench, each a release `hapaird` (io_uring engine, default 64 NBD \
         workers) serving a RAID-4 aggregate of 5 loop devices of {member_mib} MiB (4 data + 1 parity, 64 KiB chunks) \
         on the same ext4, with a {nvram_mib} MiB NVRAM log and the default CP interval (1 s; a CP also starts at 50 % \
         full). The client is fio 3.33's `nbd` engine (libnbd, one TCP connection on 127.0.0.1), `--rw=randwrite \
         --bs=4k --norandommap` over the whole export.\n\
         - **local only**: one `hapaird` without `[pair]`: a write is acknowledged once it is persisted in its own log \
         (status: no partner).\n\
         - **mirrored**: a pair on 127.0.0.1 (interconnect: authenticated TCP). Node a serves the measured aggregate; \
         node b holds the mirror of a's log (and a small aggregate of its own, never written). A write is acknowledged \
         once persisted in a's log and acknowledged durable by b. After every run a's status was checked to say \
         `mirrored` (exceptions: {}).\n\
         - **log on ext4**: the log and mirror files on /var/tmp (ext4 on the VM's virtio disk), persisted with \
         msync(MS_SYNC): survives a process kill and a machine crash.\n\
         - **log on tmpfs**: the files on /dev/shm. This models the speed of a real NVDIMM, but **survives a process \
         kill only**, not a machine crash or power loss.\n\n\
         As the daemons reported them:\n{}\n\n\
         ## The primitives (timed in the bench process before the daemons start)\n{prim}\n\
         ## Results\nIOPS, and completion latency as fio sees it (medians over the rounds of each run's mean, p50 and \
         p99). \"Added by mirroring\" is mirrored minus local.\n\n{t}\n### Every round (IOPS (mean/p99 us))\n{spread}\n{}",
        if checks.is_empty() { "none".to_string() } else { checks.join("; ") },
        nvram_lines.iter().map(|l| format!("- {l}")).collect::<Vec<_>>().join("\n"),
        if warnings.is_empty() { String::new() } else { format!("Daemon log warnings (first 4 per daemon):\n```\n{}\n```\n", warnings.join("\n")) }
    );
    let path = match std::env::var("HAPAIR_BENCH_OUT") {
        Ok(p) => PathBuf::from(p),
        Err(_) => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("bench")
            .join("RESULTS-mirror.md"),
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

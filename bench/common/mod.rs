//! Shared parts of the hand-run benchmarks: loop devices and child processes that are always
//! cleaned up (also on Ctrl-C), fio driven with JSON output, medians, and a machine description.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Set by SIGINT/SIGTERM. Child processes in our process group get the signal too and stop;
/// the bench loop checks this between runs and unwinds, so every guard's `Drop` runs.
pub fn interrupted_flag() -> Arc<AtomicBool> {
    static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    FLAG.get_or_init(|| {
        let f = Arc::new(AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register(sig, f.clone()).expect("register signal handler");
        }
        f
    })
    .clone()
}

pub fn interrupted() -> bool {
    interrupted_flag().load(Ordering::Relaxed)
}

/// Bail out of the benchmark (guards clean up) when the user pressed Ctrl-C.
pub fn check_interrupt() -> Result<(), String> {
    if interrupted() {
        Err("interrupted".into())
    } else {
        Ok(())
    }
}

pub fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

/// Fail loudly when the benchmark cannot run as it must.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "this benchmark needs root (loop devices)");
}

pub fn require_tool(name: &str) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{name} is not installed: run tools/install-test-deps.sh first"
    );
}

/// A loop device with direct I/O over a fully written (not sparse) backing file; detached and
/// the file removed on drop.
pub struct LoopDev {
    pub dev: PathBuf,
    pub backing: PathBuf,
    pub bytes: u64,
}

impl LoopDev {
    /// `fill`: write every byte of the backing file first (reads of holes never touch the disk,
    /// which would flatter every reader).
    pub fn new(dir: &Path, name: &str, bytes: u64, fill: bool) -> LoopDev {
        let backing = dir.join(name);
        if fill {
            let st = Command::new("dd")
                .args(["if=/dev/zero", "bs=4M", "oflag=direct", "status=none"])
                .arg(format!("of={}", backing.display()))
                .arg(format!("count={}", bytes.div_ceil(4 << 20)))
                .status()
                .expect("run dd");
            assert!(st.success(), "dd failed");
        }
        let f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&backing)
            .unwrap();
        f.set_len(bytes).unwrap();
        drop(f);
        let mut out = None;
        for attempt in 0..10 {
            let o = Command::new("losetup")
                .args(["-f", "--show", "--direct-io=on"])
                .arg(&backing)
                .output()
                .expect("run losetup");
            if o.status.success() {
                out = Some(o);
                break;
            }
            eprintln!(
                "losetup attempt {attempt}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            std::thread::sleep(Duration::from_millis(50 * (attempt + 1)));
        }
        let out = out.expect("losetup kept failing");
        let dev = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        LoopDev {
            dev,
            backing,
            bytes,
        }
    }

    /// Drop this device's clean page-cache pages (BLKFLSBUF), for users that open it buffered.
    pub fn flush_buffers(&self) {
        let _ = Command::new("blockdev")
            .arg("--flushbufs")
            .arg(&self.dev)
            .status();
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        for _ in 0..50 {
            let st = Command::new("losetup")
                .arg("-d")
                .arg(&self.dev)
                .stderr(Stdio::null())
                .status();
            if matches!(st, Ok(s) if s.success()) {
                let _ = std::fs::remove_file(&self.backing);
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("WARNING: could not detach {}", self.dev.display());
    }
}

/// A child process that is stopped (SIGTERM, then SIGKILL after `grace`) and reaped on drop.
pub struct ChildGuard {
    pub name: String,
    pub child: Option<Child>,
    pub grace: Duration,
}

impl ChildGuard {
    pub fn new(name: &str, child: Child) -> ChildGuard {
        ChildGuard {
            name: name.into(),
            child: Some(child),
            grace: Duration::from_secs(10),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Still running?
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL. Returns the exit status if it exited.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        if let Ok(Some(st)) = c.try_wait() {
            return Some(st);
        }
        // SAFETY: kill on the pid of our own unreaped child: it cannot be recycled yet.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        while t0.elapsed() < self.grace {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "WARNING: {} did not stop within {:?}; killing it",
            self.name, self.grace
        );
        let _ = c.kill();
        c.wait().ok()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Wait until a TCP port accepts connections.
pub fn wait_port(port: u16, guard: &mut ChildGuard, timeout: Duration) -> Result<(), String> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if !guard.alive() {
            return Err(format!(
                "{} exited before listening on port {port}",
                guard.name
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "{} did not listen on port {port} within {timeout:?}",
        guard.name
    ))
}

/// A free TCP port on 127.0.0.1 (bind to 0, read, close).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// What one fio run measured (summed over its jobs and both directions as fio reports them).
#[derive(Debug, Clone, Copy, Default)]
pub struct FioResult {
    pub iops: f64,
    pub bytes_per_sec: f64,
    /// Mean completion latency, microseconds.
    pub lat_mean_us: f64,
    /// 99th percentile completion latency, microseconds.
    pub lat_p99_us: f64,
    /// Median and 99.9th percentile completion latency, microseconds (the largest over the
    /// directions that ran).
    pub lat_p50_us: f64,
    pub lat_p999_us: f64,
}

/// Run fio with `args` plus JSON output; the fio child is killed if we are interrupted.
pub fn run_fio(args: &[String]) -> Result<FioResult, String> {
    let child = Command::new("fio")
        .args(args)
        .args(["--output-format=json", "--group_reporting"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run fio: {e}"))?;
    let out = child.wait_with_output().map_err(|e| format!("fio: {e}"))?;
    check_interrupt()?;
    if !out.status.success() {
        return Err(format!(
            "fio {} failed: {}\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // fio may print notes before the JSON object.
    let start = text
        .find('{')
        .ok_or_else(|| format!("no JSON from fio: {text}"))?;
    let v: serde_json::Value =
        serde_json::from_str(&text[start..]).map_err(|e| format!("fio JSON: {e}"))?;
    let job = &v["jobs"][0];
    if job["error"].as_i64().unwrap_or(0) != 0 {
        return Err(format!(
            "fio job error {}: {}",
            job["error"],
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let mut r = FioResult::default();
    let mut lat_w = 0.0;
    for dir in ["read", "write"] {
        let d = &job[dir];
        let iops = d["iops"].as_f64().unwrap_or(0.0);
        if iops <= 0.0 {
            continue;
        }
        r.iops += iops;
        r.bytes_per_sec += d["bw_bytes"].as_f64().unwrap_or(0.0);
        r.lat_mean_us += d["clat_ns"]["mean"].as_f64().unwrap_or(0.0) / 1000.0 * iops;
        lat_w += iops;
        let p99 = d["clat_ns"]["percentile"]["99.000000"]
            .as_f64()
            .unwrap_or(0.0)
            / 1000.0;
        r.lat_p99_us = r.lat_p99_us.max(p99);
        let pct = |k: &str| d["clat_ns"]["percentile"][k].as_f64().unwrap_or(0.0) / 1000.0;
        r.lat_p50_us = r.lat_p50_us.max(pct("50.000000"));
        r.lat_p999_us = r.lat_p999_us.max(pct("99.900000"));
    }
    if lat_w > 0.0 {
        r.lat_mean_us /= lat_w;
    }
    Ok(r)
}

pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn sh(cmd: &str) -> String {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// The machine, as lines of Markdown.
pub fn machine_description(backing_dir: &Path) -> String {
    let cpu = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2");
    let cores = sh("nproc");
    let kernel = sh("uname -sr");
    let mem = sh("free -g | awk '/Mem:/ {print $2 \" GiB\"}'");
    let fio = sh("fio --version");
    let nbdkit = sh("nbdkit --version");
    let fs = sh(&format!(
        "df -T {} | awk 'NR==2 {{print $2 \" on \" $1}}'",
        backing_dir.display()
    ));
    let date = sh("date -u '+%Y-%m-%d %H:%M UTC'");
    let commit = sh("git rev-parse --short HEAD 2>/dev/null");
    let load = sh("cut -d' ' -f1-3 /proc/loadavg");
    format!(
        "- CPU: {cpu}, {cores} cores (VM)\n- Memory: {mem}\n- Kernel: {kernel}\n- fio: {fio}; nbdkit: {nbdkit}\n\
         - Backing files: {} ({fs}), loop devices with `--direct-io=on`\n- Date: {date}; commit {commit}; load average at start {load}\n",
        backing_dir.display()
    )
}

/// Print a progress line at once (stderr is unbuffered; cargo shows it live).
#[macro_export]
macro_rules! progress {
    ($($arg:tt)*) => {{ eprintln!("[{:>6.1}s] {}", $crate::common::since_start(), format!($($arg)*)); }};
}

pub fn since_start() -> f64 {
    static T0: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    T0.get_or_init(Instant::now).elapsed().as_secs_f64()
}

/// Let the storage stack settle after bulk writes (setup): write back everything and wait, so
/// that the first measured run does not pay for the filesystem and host writing back setup.
pub fn settle(secs: u64) {
    let _ = Command::new("sync").status();
    std::thread::sleep(Duration::from_secs(secs));
}

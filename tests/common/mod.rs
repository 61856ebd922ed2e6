//! Shared helpers for privileged integration tests: loop devices that are always detached.
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Fail loudly (never skip) when the test cannot run as it must.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (loop devices); run the suite as root as CI does"
    );
}

/// Fail loudly when a tool the test drives is missing.
pub fn require_tool(name: &str) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{name} is not installed: run tools/install-test-deps.sh (README) first"
    );
}

/// A loop device with direct I/O over a backing file; detached on drop.
pub struct LoopDev {
    pub dev: PathBuf,
    pub backing: PathBuf,
}

impl LoopDev {
    /// A new loop device over a fresh backing file of `bytes` in `dir` (must be on a filesystem
    /// that takes O_DIRECT: /var/tmp, not tmpfs).
    pub fn new(dir: &Path, name: &str, bytes: u64) -> LoopDev {
        require_root();
        let backing = dir.join(name);
        let f = std::fs::File::create(&backing).unwrap();
        f.set_len(bytes).unwrap();
        drop(f);
        // Tests run in parallel: two `losetup -f` may race for one free device, so retry.
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
            std::thread::sleep(std::time::Duration::from_millis(50 * (attempt + 1)));
        }
        let out = out.expect("losetup kept failing");
        let dev = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        LoopDev { dev, backing }
    }

    /// Shrink the backing file and tell the loop driver: reads past the new end come back
    /// short and writes fail with ENOSPC, as a failing disk would.
    pub fn shrink(&self, bytes: u64) {
        // A write through the device in flight between the truncation and the capacity
        // change lands in the backing file and extends it again (the device then keeps the
        // block it wrote): repeat until the device has the new size.
        let name = self.dev.file_name().unwrap().to_string_lossy().into_owned();
        let sectors = || -> u64 {
            std::fs::read_to_string(format!("/sys/block/{name}/size"))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        for _ in 0..100 {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&self.backing)
                .unwrap();
            f.set_len(bytes).unwrap();
            drop(f);
            let st = Command::new("losetup")
                .arg("-c")
                .arg(&self.dev)
                .status()
                .unwrap();
            assert!(st.success(), "losetup -c failed");
            if sectors() == bytes / 512 {
                return;
            }
        }
        panic!(
            "{}: still {} sectors after shrinking to {bytes} bytes",
            self.dev.display(),
            sectors()
        );
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        for _ in 0..50 {
            let st = Command::new("losetup").arg("-d").arg(&self.dev).status();
            if matches!(st, Ok(s) if s.success()) {
                // A device still open somewhere is detached when its last user closes it: wait
                // for that, so no test leaves a device behind.
                let name = self.dev.file_name().unwrap().to_string_lossy().into_owned();
                let backing = format!("/sys/block/{name}/loop/backing_file");
                for _ in 0..100 {
                    if !std::path::Path::new(&backing).exists() {
                        return;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                eprintln!(
                    "WARNING: {} still attached 5 s after detach",
                    self.dev.display()
                );
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        eprintln!("WARNING: could not detach {}", self.dev.display());
    }
}

/// A scratch directory on a filesystem that takes O_DIRECT.
pub fn scratch_dir() -> tempfile::TempDir {
    tempfile::tempdir_in("/var/tmp").unwrap()
}

/// A deterministic pattern for block `block` of write `seed`.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub const HAPAIRD: &str = env!("CARGO_BIN_EXE_hapaird");

/// A daemon process, killed on drop if the test did not stop it.
pub struct Daemon {
    child: Option<Child>,
}

impl Daemon {
    pub fn spawn(args: &[&str]) -> Daemon {
        let child = Command::new(HAPAIRD)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn hapaird");
        Daemon { child: Some(child) }
    }

    /// Process id.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// Send `sig` and wait for the exit; returns the output.
    pub fn stop(mut self, sig: i32) -> Output {
        let child = self.child.take().unwrap();
        // SAFETY: kill with a pid we own.
        unsafe { libc::kill(child.id() as i32, sig) };
        child.wait_with_output().unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let out = c.wait_with_output();
            if let Ok(o) = out {
                eprintln!("daemon stderr:\n{}", String::from_utf8_lossy(&o.stderr));
            }
        }
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_for_port(port: u16) {
    let end = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < end,
            "hapaird did not listen on {port} within 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

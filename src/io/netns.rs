//! Network namespaces: run a closure on a thread that has entered a namespace, so that sockets
//! it opens belong there (a socket keeps its namespace for life, whichever thread uses it).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// An open network namespace file (`/var/run/netns/NAME`, `/proc/PID/ns/net`).
#[derive(Debug)]
pub struct NetNs {
    file: File,
    path: PathBuf,
}

impl NetNs {
    /// Open a namespace by path.
    pub fn open(path: &Path) -> io::Result<NetNs> {
        let file = File::open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("open netns {}: {e}", path.display())))?;
        Ok(NetNs {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Open a namespace made by `ip netns add NAME` (`/var/run/netns/NAME`).
    pub fn by_name(name: &str) -> io::Result<NetNs> {
        NetNs::open(&Path::new("/var/run/netns").join(name))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Run `f` on a new thread that has entered this namespace; the calling thread stays where
    /// it is.
    pub fn run<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> io::Result<T> {
        let fd = self.file.as_raw_fd();
        std::thread::scope(|s| {
            s.spawn(move || {
                // SAFETY: `fd` is an open namespace file descriptor owned by `self`, which
                // outlives this scoped thread; setns only changes this thread's namespace.
                let rc = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
                if rc != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

//! Stream sockets for the NBD server: TCP and Unix listeners with a bounded wait for accept,
//! and one stream type over both.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A listening socket.
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix stream socket; the path is removed when the listener is dropped.
    Unix(UnixListener, PathBuf),
}

/// Wait until `fd` is readable (or at end of stream) or `timeout` passes. Returns true when
/// readable. Leaves the file's flags alone: a zero timeout polls without O_NONBLOCK, which
/// would also apply to every other descriptor of the same open file.
pub fn wait_readable(fd: RawFd, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: `pfd` is a valid, initialised pollfd that lives across the call; nfds is 1.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(rc > 0)
}

impl Listener {
    /// Listen on a TCP address (port 0 picks a free port).
    pub fn bind_tcp(addr: SocketAddr) -> io::Result<Listener> {
        Ok(Listener::Tcp(TcpListener::bind(addr)?))
    }

    /// Listen on a Unix socket path. A stale socket file at the path is replaced; any other
    /// kind of file there is an error.
    pub fn bind_unix(path: &Path) -> io::Result<Listener> {
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(Listener::Unix(
            UnixListener::bind(path)?,
            path.to_path_buf(),
        ))
    }

    /// The TCP address, for a TCP listener.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix(..) => None,
        }
    }

    /// Accept one connection, waiting at most `timeout`. `Ok(None)` when none arrived.
    pub fn accept_timeout(&self, timeout: Duration) -> io::Result<Option<Stream>> {
        let fd = match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        };
        if !wait_readable(fd, timeout)? {
            return Ok(None);
        }
        let res = match self {
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                // Small replies must not wait for Nagle (proto.md recommends TCP_NODELAY).
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }),
            Listener::Unix(l, _) => l.accept().map(|(s, _)| Stream::Unix(s)),
        };
        match res {
            Ok(s) => Ok(Some(s)),
            // The connection may have gone between poll and accept.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::ConnectionAborted
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A connected stream socket.
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix.
    Unix(UnixStream),
}

impl Stream {
    /// A second handle to the same socket.
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    /// Shut down one or both directions. Shutting down reads wakes a thread blocked reading.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        let r = match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
        };
        match r {
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            other => other,
        }
    }

    /// Timeout for blocking reads (`None`: wait forever).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }

    /// Timeout for blocking writes (`None`: wait forever).
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
        }
    }

    fn raw_fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }

    /// Bytes written that the peer has not acknowledged yet (TCP's SIOCOUTQ); 0 once the
    /// connection is closed or reset. A Unix socket's writes are in the peer's queue as soon as
    /// they are written: always 0.
    pub fn unacked(&self) -> io::Result<usize> {
        match self {
            Stream::Unix(_) => Ok(0),
            Stream::Tcp(s) => {
                // A connection reset or closed keeps its count of unacknowledged bytes, which
                // will never be acknowledged now: nothing more can reach the peer.
                // SAFETY: tcp_info is plain integers, for which all-zero bytes are a value.
                let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
                let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
                // SAFETY: getsockopt writes at most `len` bytes into `info`, valid for the call.
                let rc = unsafe {
                    libc::getsockopt(
                        s.as_raw_fd(),
                        libc::IPPROTO_TCP,
                        libc::TCP_INFO,
                        (&mut info as *mut libc::tcp_info).cast(),
                        &mut len,
                    )
                };
                if rc < 0 {
                    return Err(io::Error::last_os_error());
                }
                // TCP_CLOSE in the kernel's numbering (include/net/tcp_states.h).
                const TCP_CLOSE: u8 = 7;
                if info.tcpi_state == TCP_CLOSE {
                    return Ok(0);
                }
                let mut n: libc::c_int = 0;
                // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one c_int through the pointer, which is
                // valid for the call; the fd is open for as long as `s` lives.
                let rc = unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
                if rc < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(n.max(0) as usize)
            }
        }
    }

    /// Read and throw away the input that is waiting, without blocking (also after reads were
    /// shut down). Returns how many bytes were thrown away.
    pub fn discard_input(&self) -> io::Result<usize> {
        let mut scratch = [0u8; 16 << 10];
        let mut total = 0;
        loop {
            // SAFETY: `scratch` is valid for writes of its length for the call.
            let n = unsafe {
                libc::recv(
                    self.raw_fd(),
                    scratch.as_mut_ptr().cast(),
                    scratch.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n > 0 {
                total += n as usize;
                continue;
            }
            if n == 0 {
                return Ok(total);
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(total),
                _ => return Err(e),
            }
        }
    }

    /// Close gently: send what is written, then an end of stream, and wait (until `give_up`
    /// says so, polled every few milliseconds) for the peer to acknowledge every byte, throwing
    /// away its input meanwhile. Closing a TCP socket with unread input sends a reset, and a
    /// reset drops whatever the socket has not delivered yet: the peer's last answers.
    pub fn close_gently(&self, give_up: impl Fn() -> bool) {
        let _ = self.shutdown(Shutdown::Write);
        // Sleeps, not a poll for input: once reading is shut down (or the peer has sent its
        // end of stream) the socket polls readable at once, and the wait would spin.
        let mut nap = Duration::from_millis(1);
        loop {
            let _ = self.discard_input();
            match self.unacked() {
                Ok(0) | Err(_) => break,
                Ok(_) if give_up() => break,
                Ok(_) => {}
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_millis(8));
        }
        let _ = self.discard_input();
        let _ = self.shutdown(Shutdown::Both);
    }

    /// The peer, for logs.
    pub fn peer(&self) -> String {
        match self {
            Stream::Tcp(s) => s
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "tcp:?".into()),
            Stream::Unix(_) => "unix".into(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Write all of `parts` as one gather write where the kernel takes it (one syscall for a reply
/// header and its data in the common case).
pub fn write_all_vectored(s: &mut Stream, parts: &[&[u8]]) -> io::Result<()> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut done = 0usize;
    while done < total {
        // Rebuild the slice list past what is already written.
        let mut skip = done;
        let mut slices = Vec::with_capacity(parts.len());
        for p in parts {
            if skip >= p.len() {
                skip -= p.len();
                continue;
            }
            slices.push(io::IoSlice::new(&p[skip..]));
            skip = 0;
        }
        match s.write_vectored(&slices) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "socket closed")),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_times_out_then_accepts() {
        let l = Listener::bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.tcp_addr().unwrap();
        assert!(l
            .accept_timeout(Duration::from_millis(20))
            .unwrap()
            .is_none());
        let mut c = TcpStream::connect(addr).unwrap();
        let mut s = l
            .accept_timeout(Duration::from_secs(5))
            .unwrap()
            .expect("accepted");
        write_all_vectored(&mut s, &[b"ab", b"", b"cde"]).unwrap();
        let mut got = [0u8; 5];
        c.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"abcde");
    }

    #[test]
    fn unix_listener_replaces_stale_socket_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.sock");
        drop(UnixListener::bind(&p).unwrap()); // leaves a stale socket file
        let l = Listener::bind_unix(&p).unwrap();
        let _c = UnixStream::connect(&p).unwrap();
        assert!(l.accept_timeout(Duration::from_secs(5)).unwrap().is_some());
        drop(l);
        assert!(!p.exists());
        std::fs::write(&p, b"x").unwrap();
        assert!(
            Listener::bind_unix(&p).is_err(),
            "must not remove a regular file"
        );
    }

    /// A reset (close with unread input) would drop the unsent tail: `close_gently` waits
    /// until the peer has all of it, then closes, and the peer reads every byte and then the
    /// end of the stream.
    #[test]
    fn close_gently_delivers_everything_despite_unread_input() {
        let l = Listener::bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut c = TcpStream::connect(l.tcp_addr().unwrap()).unwrap();
        let s = l.accept_timeout(Duration::from_secs(5)).unwrap().unwrap();
        c.write_all(b"never read by the server").unwrap();
        let data: Vec<u8> = (0..(8u32 << 20)).map(|i| (i % 251) as u8).collect();
        let mut w = s.try_clone().unwrap();
        let closer = std::thread::spawn(move || {
            w.write_all(&data).unwrap();
            let t0 = std::time::Instant::now();
            w.close_gently(|| t0.elapsed() > Duration::from_secs(20));
            drop(w);
            drop(s);
            data
        });
        // Read slowly at first, so that the server's close comes while data is still queued.
        std::thread::sleep(Duration::from_millis(200));
        let mut got = Vec::new();
        c.read_to_end(&mut got).expect("end of stream, not a reset");
        let data = closer.join().unwrap();
        assert_eq!(got.len(), data.len());
        assert!(got == data);
    }

    /// A connected pair whose server side has filled every buffer towards the client, which
    /// reads nothing.
    fn server_with_full_buffers() -> (TcpStream, Stream) {
        let l = Listener::bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let c = TcpStream::connect(l.tcp_addr().unwrap()).unwrap();
        let mut s = l.accept_timeout(Duration::from_secs(5)).unwrap().unwrap();
        let _ = s.set_write_timeout(Some(Duration::from_millis(300)));
        let chunk = vec![7u8; 1 << 20];
        while s.write_all(&chunk).is_ok() {}
        (c, s)
    }

    /// A peer that resets the connection ends the wait at once (its unacknowledged bytes
    /// will never be acknowledged).
    #[test]
    fn close_gently_does_not_wait_for_a_reset_peer() {
        // Fill the peer's buffers, then have it close with all that unread: a reset.
        let (c, s) = server_with_full_buffers();
        drop(c);
        let t0 = std::time::Instant::now();
        s.close_gently(|| t0.elapsed() > Duration::from_secs(20));
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    }

    /// Waiting for a peer that does not read costs no CPU, also once reading is shut down
    /// (the socket then polls readable at once: a poll-based wait would spin).
    #[test]
    fn close_gently_waits_without_spinning() {
        fn thread_cpu() -> Duration {
            // SAFETY: getrusage writes one rusage into `ru`, valid for the call.
            let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) }, 0);
            let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
            Duration::from_micros(us(ru.ru_utime) + us(ru.ru_stime))
        }
        let (_c, s) = server_with_full_buffers();
        s.shutdown(Shutdown::Read).unwrap();
        let (t0, cpu0) = (std::time::Instant::now(), thread_cpu());
        s.close_gently(|| t0.elapsed() > Duration::from_millis(500));
        let (wall, cpu) = (t0.elapsed(), thread_cpu() - cpu0);
        assert!(wall >= Duration::from_millis(500), "{wall:?}");
        assert!(
            cpu < Duration::from_millis(100),
            "{cpu:?} of CPU in {wall:?}"
        );
    }

    #[test]
    fn shutdown_read_wakes_blocked_reader() {
        let l = Listener::bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let _c = TcpStream::connect(l.tcp_addr().unwrap()).unwrap();
        let s = l.accept_timeout(Duration::from_secs(5)).unwrap().unwrap();
        let mut r = s.try_clone().unwrap();
        let t = std::thread::spawn(move || {
            let mut b = [0u8; 1];
            r.read(&mut b)
        });
        std::thread::sleep(Duration::from_millis(50));
        s.shutdown(Shutdown::Read).unwrap();
        assert_eq!(t.join().unwrap().unwrap(), 0);
    }
}

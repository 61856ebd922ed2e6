//! The control socket: a Unix stream socket speaking [`crate::core::control`] (newline-delimited
//! JSON, versioned, size-limited) on behalf of the HA loop.
//!
//! One thread accepts; each connection gets a thread (at most `max_clients`). The status is
//! built from the HA loop's snapshot, then handed to the node's [`StatusProvider`] to fill what
//! only the node knows (aggregate health, exports, NVRAM), on the connection's thread: the HA
//! loop never waits for the provider.

use crate::core::control::{
    describe_refusal, encode_reply, parse_request, ErrorKind, OpRequest, Outcome, PairStatus,
    ProtocolError, Reply, Request, MAX_LINE_BYTES,
};
use crate::daemon::ha::{HaCallError, HaHandle, OpOptions};
use crate::io::clock;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// What the node adds to the status. Called on a control connection's thread for every status
/// reply and every `watch` line; must be quick and must not call into the HA loop.
pub trait StatusProvider: Send + Sync {
    /// Fill `aggregates[].state` (and correct `served_by` from what is really open), `exports`,
    /// `nvram` and anything under `extra`. The HA fields are already set.
    fn fill(&self, status: &mut PairStatus);
}

/// A provider that adds nothing.
pub struct NoProvider;

impl StatusProvider for NoProvider {
    fn fill(&self, _status: &mut PairStatus) {}
}

/// Settings of the control server.
#[derive(Debug, Clone)]
pub struct ControlOptions {
    /// Connections served at once; more get a `busy` error.
    pub max_clients: usize,
    /// How long a takeover/giveback waits for completion when the request does not say.
    pub default_wait: Duration,
    /// An idle connection is closed after this long.
    pub idle_timeout: Duration,
    /// Mode of the socket file (0o660: root and the group of the runtime directory).
    pub mode: u32,
}

impl Default for ControlOptions {
    fn default() -> ControlOptions {
        ControlOptions {
            max_clients: 16,
            default_wait: Duration::from_secs(600),
            idle_timeout: Duration::from_secs(300),
            mode: 0o660,
        }
    }
}

/// Errors starting the control server.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}: another daemon is listening there")]
    InUse { path: PathBuf },
    #[error("control socket {path}: a {kind} is in the way (only a stale socket is replaced): move it or set pair.control_socket")]
    NotASocket { path: PathBuf, kind: &'static str },
    #[error("control socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the control thread: {0}")]
    Thread(std::io::Error),
}

/// The running control server; dropping it stops it and removes the socket.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    ha: HaHandle,
    provider: Arc<dyn StatusProvider>,
    opts: ControlOptions,
    clients: AtomicUsize,
    stop: Arc<AtomicBool>,
}

impl ControlServer {
    /// Listen on `path`. A stale socket left by a dead daemon is replaced; anything else at
    /// the path (a file, a directory, a symbolic link) is refused, never removed: a typo in
    /// `control_socket` must not delete a file.
    pub fn start(
        path: &Path,
        ha: HaHandle,
        provider: Arc<dyn StatusProvider>,
        opts: ControlOptions,
    ) -> Result<ControlServer, ControlError> {
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                if UnixStream::connect(path).is_ok() {
                    return Err(ControlError::InUse {
                        path: path.to_path_buf(),
                    });
                }
                std::fs::remove_file(path).map_err(|source| ControlError::Bind {
                    path: path.to_path_buf(),
                    source,
                })?;
            }
            Ok(m) => {
                let t = m.file_type();
                let kind = if t.is_dir() {
                    "directory"
                } else if t.is_symlink() {
                    "symbolic link"
                } else if t.is_file() {
                    "regular file"
                } else {
                    "non-socket file"
                };
                return Err(ControlError::NotASocket {
                    path: path.to_path_buf(),
                    kind,
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(ControlError::Bind {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
        let listener = UnixListener::bind(path).map_err(|source| ControlError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(opts.mode)).map_err(
            |source| ControlError::Bind {
                path: path.to_path_buf(),
                source,
            },
        )?;
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared {
            ha,
            provider,
            opts,
            clients: AtomicUsize::new(0),
            stop: stop.clone(),
        });
        let thread = std::thread::Builder::new()
            .name("control-accept".into())
            .spawn(move || accept_loop(listener, shared))
            .map_err(ControlError::Thread)?;
        tracing::info!(socket = %path.display(), "control socket listening");
        Ok(ControlServer {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stop accepting, remove the socket. Open connections end on their own.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stop.store(true, Ordering::SeqCst);
            let _ = t.join();
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

fn accept_loop(listener: UnixListener, shared: Arc<Shared>) {
    // Non-blocking accept polled every 50 ms: stopping must not depend on the socket file
    // still being there to connect to.
    if let Err(e) = listener.set_nonblocking(true) {
        tracing::error!("control socket: cannot poll: {e}");
        return;
    }
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let mut stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            Err(e) => {
                tracing::warn!("control accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if let Err(e) = stream.set_nonblocking(false) {
            tracing::warn!("control connection: {e}");
            continue;
        }
        if shared.clients.fetch_add(1, Ordering::SeqCst) >= shared.opts.max_clients {
            shared.clients.fetch_sub(1, Ordering::SeqCst);
            let _ = stream.write_all(&encode_reply(&Reply::Error {
                kind: ErrorKind::Busy,
                message: format!(
                    "too many control connections (limit {})",
                    shared.opts.max_clients
                ),
            }));
            continue;
        }
        let s = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("control-conn".into())
            .spawn(move || {
                if let Err(e) = serve(stream, &s) {
                    tracing::debug!("control connection: {e}");
                }
                s.clients.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            tracing::error!("control connection thread: {e}");
            shared.clients.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Reads one line of at most `MAX_LINE_BYTES`; `Ok(None)` at end of stream.
fn read_line(r: &mut impl BufRead) -> Result<Option<Vec<u8>>, ProtocolError> {
    let mut line = Vec::new();
    let n = r
        .take(MAX_LINE_BYTES as u64 + 1)
        .read_until(b'\n', &mut line)
        .map_err(|e| ProtocolError::new(ErrorKind::Malformed, format!("read: {e}")))?;
    if n == 0 {
        return Ok(None);
    }
    if line.len() > MAX_LINE_BYTES
        || (line.last() != Some(&b'\n') && line.len() == MAX_LINE_BYTES + 1)
    {
        return Err(ProtocolError::new(
            ErrorKind::TooLong,
            format!("request longer than {MAX_LINE_BYTES} bytes"),
        ));
    }
    Ok(Some(line))
}

fn serve(stream: UnixStream, sh: &Shared) -> std::io::Result<()> {
    stream.set_read_timeout(Some(sh.opts.idle_timeout))?;
    let mut w = stream.try_clone()?;
    let mut r = BufReader::new(stream);
    loop {
        let line = match read_line(&mut r) {
            Ok(Some(l)) => l,
            Ok(None) => return Ok(()),
            Err(e) => {
                // The rest of an over-long line cannot be framed reliably: answer and close.
                w.write_all(&encode_reply(&error_reply(e)))?;
                return Ok(());
            }
        };
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        match parse_request(&line) {
            Err(e) => w.write_all(&encode_reply(&error_reply(e)))?,
            Ok(Request::Watch) => return watch(&mut w, r.get_ref(), sh),
            Ok(req) => {
                let reply = dispatch(req, sh);
                w.write_all(&encode_reply(&reply))?;
            }
        }
    }
}

fn error_reply(e: ProtocolError) -> Reply {
    Reply::Error {
        kind: e.kind,
        message: e.message,
    }
}

fn call_error(e: HaCallError) -> Reply {
    let kind = match e {
        HaCallError::Busy => ErrorKind::Busy,
        HaCallError::Closed | HaCallError::Timeout(_) => ErrorKind::Unavailable,
    };
    Reply::Error {
        kind,
        message: e.to_string(),
    }
}

fn status_of(snap: &crate::core::control::HaSnapshot, sh: &Shared) -> PairStatus {
    let off = clock::local_utc_offset_s(clock::unix_ms());
    let mut s = PairStatus::from_snapshot(snap, off);
    sh.provider.fill(&mut s);
    s.headline = crate::core::control::headline(&s);
    s
}

fn dispatch(req: Request, sh: &Shared) -> Reply {
    let (op, check_only, wait, timeout_ms) = match req {
        Request::Status => {
            return match sh.ha.snapshot() {
                Ok(snap) => Reply::Status {
                    status: Box::new(status_of(&snap, sh)),
                },
                Err(e) => call_error(e),
            }
        }
        Request::Watch => unreachable!("handled by serve"),
        Request::AckAlarms { ids, all } => {
            return match sh.ha.ack_alarms((!all).then_some(ids)) {
                Ok(Ok(r)) => Reply::Acknowledged {
                    acknowledged: r.acknowledged,
                    already: r.already,
                    status: Box::new(status_of(&r.snapshot, sh)),
                },
                Ok(Err(e)) => Reply::Error {
                    kind: ErrorKind::UnknownAlarm,
                    message: format!(
                        "{e}; nothing acknowledged (`takeoverctl status` lists the alarms)"
                    ),
                },
                Err(e) => call_error(e),
            }
        }
        Request::Takeover {
            of,
            countdown_ms,
            immediate,
            check_only,
            wait,
            timeout_ms,
        } => {
            let snap = match sh.ha.snapshot() {
                Ok(s) => s,
                Err(e) => return call_error(e),
            };
            let op = match of.as_deref() {
                None => OpRequest::TakeoverSelf,
                Some(n) if n == snap.node_name => OpRequest::TakeoverSelf,
                Some(n) if n == snap.partner_name => OpRequest::TakeoverPartner {
                    countdown_ms,
                    immediate,
                },
                Some(n) => {
                    return Reply::Error {
                        kind: ErrorKind::UnknownNode,
                        message: format!(
                            "no node {n:?} in this pair (this node is {:?}, its partner {:?})",
                            snap.node_name, snap.partner_name
                        ),
                    }
                }
            };
            if op == OpRequest::TakeoverSelf && (countdown_ms.is_some() || immediate) {
                return Reply::Error {
                    kind: ErrorKind::InvalidArgument,
                    message: format!(
                        "countdown and immediate are chosen by the node that takes over: run `takeoverctl takeover --of {}` on {}",
                        snap.node_name, snap.partner_name
                    ),
                };
            }
            (op, check_only, wait, timeout_ms)
        }
        Request::Giveback { wait, timeout_ms } => (OpRequest::Giveback, false, wait, timeout_ms),
    };
    let opts = OpOptions {
        check_only,
        wait,
        timeout: timeout_ms.map_or(sh.opts.default_wait, Duration::from_millis),
    };
    match sh.ha.operator(op, opts) {
        Ok(r) => {
            let off = clock::local_utc_offset_s(clock::unix_ms());
            let mut outcome = r.outcome;
            if let Outcome::Refused { refusal, text, .. } = &mut outcome {
                *text = describe_refusal(refusal, &r.snapshot, off);
            }
            Reply::Outcome {
                outcome,
                status: Box::new(status_of(&r.snapshot, sh)),
            }
        }
        Err(e) => call_error(e),
    }
}

/// Stream status lines until the client goes away. Every line is written whole: the writer
/// blocks (up to `idle_timeout`: a watcher that stops reading that long is dropped) and the
/// reader is polled for the client's end of stream. Not O_NONBLOCK on the reader: that flag
/// belongs to the open file description `w` shares, and a full socket buffer would then cut a
/// line in half.
fn watch(w: &mut UnixStream, r: &UnixStream, sh: &Shared) -> std::io::Result<()> {
    let rx = match sh.ha.watch() {
        Ok(rx) => rx,
        Err(e) => return w.write_all(&encode_reply(&call_error(e))),
    };
    w.set_write_timeout(Some(sh.opts.idle_timeout))?;
    loop {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(snap) => {
                let line = encode_reply(&Reply::Status {
                    status: Box::new(status_of(&snap, sh)),
                });
                w.write_all(&line)?;
            }
            Err(RecvTimeoutError::Timeout) => {
                // Did the client go away? (Anything it sends while watching is ignored.)
                if crate::io::net::wait_readable(r.as_raw_fd(), Duration::ZERO)? {
                    let mut b = [0u8; 256];
                    match (&*r).read(&mut b) {
                        Ok(0) => return Ok(()),
                        Ok(_) => {}
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock
                                    | std::io::ErrorKind::TimedOut
                                    | std::io::ErrorKind::Interrupted
                            ) => {}
                        Err(e) => return Err(e),
                    }
                }
                if sh.stop.load(Ordering::SeqCst) {
                    return Ok(());
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                let reply = Reply::Error {
                    kind: ErrorKind::Unavailable,
                    message: "watch ended: the HA loop stopped or this watcher fell behind".into(),
                };
                return w.write_all(&encode_reply(&reply));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(path: &Path) -> Result<ControlServer, ControlError> {
        let (handle, _inbox) = crate::daemon::ha::channel(4);
        ControlServer::start(
            path,
            handle,
            Arc::new(NoProvider),
            ControlOptions::default(),
        )
    }

    #[test]
    fn only_a_stale_socket_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        // A regular file where the socket should go: refused, and left alone.
        let file = dir.path().join("hapaird.sock");
        std::fs::write(&file, b"precious").unwrap();
        let e = start(&file).err().expect("refused");
        assert!(
            matches!(
                e,
                ControlError::NotASocket {
                    kind: "regular file",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("hapaird.sock"), "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"precious");
        // A directory, and a symbolic link to a socket: refused too.
        let d = dir.path().join("d.sock");
        std::fs::create_dir(&d).unwrap();
        assert!(matches!(
            start(&d),
            Err(ControlError::NotASocket {
                kind: "directory",
                ..
            })
        ));
        // A stale socket (nobody listening) is replaced.
        let stale = dir.path().join("stale.sock");
        drop(UnixListener::bind(&stale).unwrap());
        assert!(stale.exists());
        let link = dir.path().join("link.sock");
        std::os::unix::fs::symlink(&stale, &link).unwrap();
        assert!(matches!(
            start(&link),
            Err(ControlError::NotASocket {
                kind: "symbolic link",
                ..
            })
        ));
        let server = start(&stale).expect("stale socket replaced");
        // A live one is not.
        assert!(matches!(start(&stale), Err(ControlError::InUse { .. })));
        server.stop();
        assert!(!stale.exists());
    }
}

//! The NBD export server: fixed newstyle handshake, then transmission with many requests in
//! flight per connection, served by a bounded pool of worker threads.
//!
//! Threads:
//! - one acceptor per listener (TCP and/or Unix), polling so that it can stop promptly;
//! - one reader per connection: it runs the handshake, then parses requests, validates them
//!   ([`crate::core::nbd::validate_request`]), answers bad ones itself and hands good ones to
//!   the worker pool;
//! - `workers` worker threads calling the [`Backend`] (which keeps one io_uring per calling
//!   thread) and writing each reply under the connection's writer lock, out of order, as soon
//!   as its request completes.
//!
//! Bounds: connections ([`ServerConfig::max_connections`]), requests in flight per connection
//! ([`ServerConfig::max_inflight_per_conn`]), payload bytes held for reads and writes in flight
//! per connection ([`ServerConfig::max_buffered_bytes_per_conn`]) and in all
//! ([`ServerConfig::max_buffered_bytes_total`]), the size of one request (the advertised
//! maximum block size, at most [`ServerConfig::max_request_bytes`], for clients that asked for
//! `NBD_INFO_BLOCK_SIZE`; [`UNAGREED_MAX_BYTES`] for the others), option count and option
//! size during the handshake, and how long a handshake read or a reply write may block. The
//! worker queue is bounded by connections × in-flight requests. A client that stops reading
//! its replies holds a worker for at most [`ServerConfig::send_timeout`], then is dropped.
//!
//! Drain ([`NbdServer::drain`]), used by takeover: stop accepting, stop reading requests,
//! answer every request already read with its real result (never `NBD_ESHUTDOWN`, which qemu
//! fails instead of retrying), then close. Past the deadline, connections are closed abruptly;
//! qemu re-sends what was in flight after it reconnects.

use std::collections::HashMap;
use std::io::{self, BufRead, Read};
use std::net::{Shutdown, SocketAddr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::core::nbd::{self as wire, Command, OptionRequest, Rejection, RequestLimits};
use crate::core::ratelimit::RateLimiter;
use crate::daemon::backend::{Backend, BackendError, BlockSizes};
use crate::io::buf::IoBuf;
use crate::io::net::{write_all_vectored, Listener, Stream};

/// Server settings. Every limit is a bound on memory or threads a client can make us use.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// TCP address to listen on (port 0 picks one; see [`NbdServer::local_addr`]).
    pub tcp: Option<SocketAddr>,
    /// Unix socket path to listen on.
    pub unix: Option<PathBuf>,
    /// Worker threads calling the backend.
    pub workers: usize,
    /// Connections served at once; further ones are closed right after accept.
    pub max_connections: usize,
    /// Requests in flight per connection before the reader stops reading.
    pub max_inflight_per_conn: usize,
    /// READ/WRITE payload bytes in flight per connection before the reader stops reading.
    pub max_buffered_bytes_per_conn: usize,
    /// READ/WRITE payload bytes in flight over all connections before readers stop reading.
    pub max_buffered_bytes_total: usize,
    /// Cap on the advertised maximum block size (the backend's may be lower).
    pub max_request_bytes: u32,
    /// Time a client may stay silent during the handshake (per read).
    pub handshake_timeout: Duration,
    /// Time one reply write may block before the connection is dropped.
    pub send_timeout: Duration,
    /// Refuse `NBD_OPT_GO` without an `NBD_INFO_BLOCK_SIZE` request
    /// (`NBD_REP_ERR_BLOCK_SIZE_REQD`) and `NBD_OPT_EXPORT_NAME` (hard disconnect). Off by
    /// default: such clients are served, misaligned requests get `NBD_EINVAL`, and READ/WRITE
    /// up to [`UNAGREED_MAX_BYTES`] are taken (split into pieces the backend takes).
    pub require_block_size: bool,
}

/// The largest READ or WRITE taken from a client that did not agree on block sizes (it used
/// `NBD_OPT_EXPORT_NAME`, or `NBD_OPT_GO` without asking for `NBD_INFO_BLOCK_SIZE`), when the
/// advertised maximum is smaller: the protocol's interoperability limit, 2^25 bytes (proto.md,
/// "Block size constraints": without agreed sizes a server SHOULD take requests of any length,
/// a client SHOULD keep READ and WRITE within 2^25). Such requests are served in pieces of the
/// advertised maximum. The Linux kernel's client is one: nbd-client (3.24) sends `NBD_OPT_GO`
/// with no information requests, and nbd.ko sends requests up to its `max_sectors_kb` (1280
/// KiB by default, up to 32 MiB), knowing nothing of the server's maximum.
pub const UNAGREED_MAX_BYTES: u32 = 1 << 25;

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            tcp: None,
            unix: None,
            workers: 4,
            max_connections: 256,
            max_inflight_per_conn: 128,
            max_buffered_bytes_per_conn: 64 << 20,
            max_buffered_bytes_total: 1 << 30,
            max_request_bytes: 32 << 20,
            handshake_timeout: Duration::from_secs(30),
            send_timeout: Duration::from_secs(30),
            require_block_size: false,
        }
    }
}

/// One export: a name clients ask for and the backend that serves it.
#[derive(Clone)]
pub struct Export {
    /// Export name ("" is reserved for the default export, which is the first one).
    pub name: String,
    /// Human-readable description (`NBD_INFO_DESCRIPTION`, `NBD_OPT_LIST`).
    pub description: String,
    /// The device.
    pub backend: Arc<dyn Backend>,
    /// Refuse writes, trims and zeroes with `NBD_EPERM`; advertise `NBD_FLAG_READ_ONLY`.
    pub read_only: bool,
}

/// Why an export cannot be added.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// An export with this name is already served.
    #[error("export {0:?} already exists")]
    Duplicate(String),
    /// The name is not a valid NBD string.
    #[error("export name {name:?}: {reason}")]
    BadName {
        /// The name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The backend's block sizes break the protocol's rules.
    #[error("export {name:?}: block sizes {sizes:?}: {reason}")]
    BadBlockSizes {
        /// The export.
        name: String,
        /// What the backend reported (after the server's cap).
        sizes: BlockSizes,
        /// The rule broken.
        reason: &'static str,
    },
}

/// Counters since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections accepted and admitted.
    pub connections_accepted: u64,
    /// Connections refused because of `max_connections` or a drain.
    pub connections_refused: u64,
    /// Connections open now.
    pub connections_active: u64,
    /// Transmission requests received (well-formed headers).
    pub requests: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// Connections dropped for a protocol violation (bad magic, unknown client flags, ...).
    pub protocol_errors: u64,
}

/// What a drain did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainReport {
    /// Requests answered while draining.
    pub requests_completed: u64,
    /// Connections closed after every request read on them was answered.
    pub connections_closed: usize,
    /// Connections closed abruptly at the deadline.
    pub connections_aborted: usize,
    /// True when the deadline passed before every connection was done.
    pub deadline_hit: bool,
}

/// An export as served: the export and its advertised block sizes.
struct ExportEntry {
    export: Export,
    sizes: BlockSizes,
    /// Writes hold it shared; a write that is not aligned to the minimum block size (from a
    /// client that did not agree on block sizes) holds it exclusively for its read-modify-write
    /// of the blocks it touches, so that no other write of those blocks slips in between.
    partial_writes: RwLock<()>,
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    refused: AtomicU64,
    requests: AtomicU64,
    errors: AtomicU64,
    protocol_errors: AtomicU64,
}

/// Payload bytes held by requests in flight over all connections.
struct ByteBudget {
    limit: usize,
    used: Mutex<usize>,
    cv: Condvar,
}

impl ByteBudget {
    fn acquire(&self, bytes: usize) {
        let mut used = self.used.lock().unwrap();
        // A request larger than the whole budget still runs, alone.
        while *used > 0 && *used + bytes > self.limit {
            used = self.cv.wait(used).unwrap();
        }
        *used += bytes;
    }

    fn try_acquire(&self, bytes: usize) -> bool {
        let mut used = self.used.lock().unwrap();
        if *used > 0 && *used + bytes > self.limit {
            return false;
        }
        *used += bytes;
        true
    }

    fn release(&self, bytes: usize) {
        *self.used.lock().unwrap() -= bytes;
        self.cv.notify_all();
    }
}

struct Registry {
    draining: bool,
    next_id: u64,
    conns: HashMap<u64, Arc<Conn>>,
}

struct Shared {
    cfg: ServerConfig,
    exports: RwLock<Vec<Arc<ExportEntry>>>,
    registry: Mutex<Registry>,
    registry_cv: Condvar,
    accepting: AtomicBool,
    jobs: Mutex<Option<JobSender>>,
    counters: Arc<Counters>,
    budget: Arc<ByteBudget>,
    limiter: Mutex<RateLimiter>,
    epoch: Instant,
}

#[derive(Default)]
struct Inflight {
    requests: usize,
    bytes: usize,
}

/// One client connection, shared by its reader, the workers serving it and the registry.
struct Conn {
    id: u64,
    peer: String,
    /// A handle used only to shut the socket down (wakes the reader, fails writes).
    control: Stream,
    writer: Mutex<Stream>,
    /// Set once the handshake chose an export.
    export: Mutex<Option<String>>,
    stop_reading: AtomicBool,
    broken: AtomicBool,
    inflight: Mutex<Inflight>,
    inflight_cv: Condvar,
    completed: AtomicU64,
    counters: Arc<Counters>,
    budget: Arc<ByteBudget>,
}

impl Conn {
    /// A request read from this connection has been answered: count it (and its failure) and
    /// give back the room it held.
    fn answered(&self, charge: usize, failed: bool) {
        if failed {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.completed.fetch_add(1, Ordering::Relaxed);
        self.release(charge);
    }

    /// Wait for room for one more request holding `bytes` of payload.
    fn acquire(&self, bytes: usize, max_requests: usize, max_bytes: usize) {
        let mut g = self.inflight.lock().unwrap();
        while !(g.requests < max_requests && (g.bytes + bytes <= max_bytes || g.requests == 0)) {
            g = self.inflight_cv.wait(g).unwrap();
        }
        g.requests += 1;
        g.bytes += bytes;
        drop(g);
        if bytes > 0 {
            self.budget.acquire(bytes);
        }
    }

    /// [`Conn::acquire`] where it would not wait.
    fn try_acquire(&self, bytes: usize, max_requests: usize, max_bytes: usize) -> bool {
        let mut g = self.inflight.lock().unwrap();
        if !(g.requests < max_requests && (g.bytes + bytes <= max_bytes || g.requests == 0)) {
            return false;
        }
        if bytes > 0 && !self.budget.try_acquire(bytes) {
            return false;
        }
        g.requests += 1;
        g.bytes += bytes;
        true
    }

    fn release(&self, bytes: usize) {
        if bytes > 0 {
            self.budget.release(bytes);
        }
        let mut g = self.inflight.lock().unwrap();
        g.requests -= 1;
        g.bytes -= bytes;
        self.inflight_cv.notify_all();
    }

    fn wait_idle(&self) {
        let mut g = self.inflight.lock().unwrap();
        while g.requests > 0 {
            g = self.inflight_cv.wait(g).unwrap();
        }
    }

    /// Send one reply; on failure the connection is dead and is shut down.
    fn send(&self, parts: &[&[u8]]) -> bool {
        let mut w = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        // Checked under the lock: a reply cut short by a failed write must never be followed
        // by another one, which the client would read as the rest of the first.
        if self.broken.load(Ordering::Acquire) {
            return false;
        }
        match write_all_vectored(&mut w, parts) {
            Ok(()) => true,
            Err(e) => {
                // Still holding the lock, so no other reply goes out after the partial one.
                self.kill();
                drop(w);
                tracing::debug!(conn = self.id, peer = %self.peer, error = %e, "reply write failed");
                false
            }
        }
    }

    fn kill(&self) {
        self.broken.store(true, Ordering::Release);
        self.stop_reading.store(true, Ordering::Release);
        let _ = self.control.shutdown(Shutdown::Both);
    }
}

/// A validated request handed to a worker.
struct Job {
    conn: Arc<Conn>,
    entry: Arc<ExportEntry>,
    backend: Arc<dyn Backend>,
    cmd: Command,
    handle: u64,
    structured: bool,
    payload: Option<IoBuf>,
    charge: usize,
    split_bytes: u64,
}

/// The NBD server. Dropping it shuts it down (see [`NbdServer::shutdown`]).
pub struct NbdServer {
    shared: Arc<Shared>,
    tcp_addr: Option<SocketAddr>,
    acceptors: Mutex<Vec<JoinHandle<()>>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

/// Aborts an [`NbdServer`] it does not own; does nothing once the server is gone.
#[derive(Clone)]
pub struct AbortHandle(std::sync::Weak<Shared>);

impl AbortHandle {
    /// The server it aborts no longer exists.
    pub fn is_gone(&self) -> bool {
        self.0.strong_count() == 0
    }

    /// Close every connection now, answering nothing more, and accept no new one (a node
    /// that halts: the partner takes over with what its mirror holds, so an answer sent after
    /// this could acknowledge a write it lacks; unanswered, the client sends the request
    /// again to whoever serves next). The server's threads are stopped later by
    /// [`NbdServer::shutdown`]. Returns the number of connections closed.
    pub fn abort(&self) -> usize {
        let Some(shared) = self.0.upgrade() else {
            return 0;
        };
        let conns: Vec<Arc<Conn>> = {
            let mut reg = shared.registry.lock().unwrap();
            reg.draining = true;
            reg.conns.values().cloned().collect()
        };
        shared.accepting.store(false, Ordering::Release);
        for c in &conns {
            c.kill();
        }
        tracing::warn!(
            connections = conns.len(),
            "NBD server aborted: connections closed unanswered"
        );
        conns.len()
    }
}

fn errno_of(e: &BackendError) -> u32 {
    match e {
        BackendError::Io(_) => wire::NBD_EIO,
        BackendError::Invalid(_) => wire::NBD_EINVAL,
        BackendError::NoSpace(_) => wire::NBD_ENOSPC,
        BackendError::NotPermitted(_) => wire::NBD_EPERM,
    }
}

fn invalid_input(e: impl std::error::Error + Send + Sync + 'static) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e)
}

impl NbdServer {
    /// Listen, start the workers and serve `exports`.
    pub fn start(cfg: ServerConfig, exports: Vec<Export>) -> io::Result<NbdServer> {
        if cfg.tcp.is_none() && cfg.unix.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no listener configured",
            ));
        }
        if cfg.workers == 0 || cfg.max_connections == 0 || cfg.max_inflight_per_conn == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "zero workers or limits",
            ));
        }
        // Many workers take jobs from one queue; idle ones sleep (no spinning: on a small
        // machine a spinning or yielding worker takes the CPU from the request it waits for).
        let (tx, rx) = job_queue();
        let shared = Arc::new(Shared {
            cfg: cfg.clone(),
            exports: RwLock::new(Vec::new()),
            registry: Mutex::new(Registry {
                draining: false,
                next_id: 1,
                conns: HashMap::new(),
            }),
            registry_cv: Condvar::new(),
            accepting: AtomicBool::new(true),
            jobs: Mutex::new(Some(tx)),
            counters: Arc::new(Counters::default()),
            budget: Arc::new(ByteBudget {
                limit: cfg.max_buffered_bytes_total,
                used: Mutex::new(0),
                cv: Condvar::new(),
            }),
            limiter: Mutex::new(RateLimiter::new(20, 5)),
            epoch: Instant::now(),
        });
        for e in exports {
            shared.add_export(e).map_err(invalid_input)?;
        }
        let mut listeners = Vec::new();
        if let Some(a) = cfg.tcp {
            listeners.push(Listener::bind_tcp(a)?);
        }
        if let Some(p) = &cfg.unix {
            listeners.push(Listener::bind_unix(p)?);
        }
        let tcp_addr = listeners.iter().find_map(Listener::tcp_addr);

        let mut workers = Vec::new();
        for i in 0..cfg.workers {
            let rx = rx.clone();
            workers.push(
                std::thread::Builder::new()
                    .name(format!("nbd-worker-{i}"))
                    .spawn(move || worker_loop(rx))?,
            );
        }
        let mut acceptors = Vec::new();
        for l in listeners {
            let sh = shared.clone();
            acceptors.push(
                std::thread::Builder::new()
                    .name("nbd-accept".into())
                    .spawn(move || sh.accept_loop(l))?,
            );
        }
        tracing::info!(tcp = ?tcp_addr, unix = ?cfg.unix, workers = cfg.workers, "NBD server started");
        Ok(NbdServer {
            shared,
            tcp_addr,
            acceptors: Mutex::new(acceptors),
            workers: Mutex::new(workers),
        })
    }

    /// A handle that aborts this server from another thread without owning it (see
    /// [`AbortHandle::abort`]).
    pub fn abort_handle(&self) -> AbortHandle {
        AbortHandle(Arc::downgrade(&self.shared))
    }

    /// The TCP address actually bound.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    /// Serve one more export (for takeover: the partner's exports on the same server).
    pub fn add_export(&self, export: Export) -> Result<(), ExportError> {
        self.shared.add_export(export)
    }

    /// Stop serving an export: new clients no longer find it, and its connections are
    /// drained as by [`NbdServer::drain`] with this deadline. `None` if there is no such export.
    pub fn remove_export(&self, name: &str, deadline: Instant) -> Option<DrainReport> {
        {
            let mut ex = self.shared.exports.write().unwrap();
            let pos = ex.iter().position(|e| e.export.name == name)?;
            ex.remove(pos);
        }
        let conns: Vec<Arc<Conn>> = {
            let reg = self.shared.registry.lock().unwrap();
            reg.conns
                .values()
                .filter(|c| c.export.lock().unwrap().as_deref() == Some(name))
                .cloned()
                .collect()
        };
        tracing::info!(export = name, connections = conns.len(), "export removed");
        let before = self.shared.stop_reading(&conns);
        Some(self.shared.drain_conns(conns, before, deadline))
    }

    /// Names of the exports served.
    pub fn exports(&self) -> Vec<String> {
        self.shared
            .exports
            .read()
            .unwrap()
            .iter()
            .map(|e| e.export.name.clone())
            .collect()
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        let c = &self.shared.counters;
        Stats {
            connections_accepted: c.accepted.load(Ordering::Relaxed),
            connections_refused: c.refused.load(Ordering::Relaxed),
            connections_active: self.shared.registry.lock().unwrap().conns.len() as u64,
            requests: c.requests.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            protocol_errors: c.protocol_errors.load(Ordering::Relaxed),
        }
    }

    /// Stop accepting connections and reading requests, answer every request already read
    /// with its real result, then close the connections. At `deadline`, close whatever is
    /// left abruptly. New connections are refused from the start of the drain on.
    pub fn drain(&self, deadline: Instant) -> DrainReport {
        // Refuse from now on, also what the acceptors pick up before they stop.
        self.shared.registry.lock().unwrap().draining = true;
        let conns: Vec<Arc<Conn>> = self
            .shared
            .registry
            .lock()
            .unwrap()
            .conns
            .values()
            .cloned()
            .collect();
        // Stop reading before the listeners close: once connects are refused, no connection
        // reads another request (a client that sees the listener gone and sends one more must
        // not have it read).
        let before = self.shared.stop_reading(&conns);
        self.stop_accepting();
        tracing::info!(connections = conns.len(), "draining NBD server");
        let report = self.shared.drain_conns(conns, before, deadline);
        tracing::info!(?report, "NBD server drained");
        report
    }

    fn stop_accepting(&self) {
        self.shared.accepting.store(false, Ordering::Release);
        // Joining makes sure the listeners are closed: connects are refused from here on.
        for h in self.acceptors.lock().unwrap().drain(..) {
            let _ = h.join();
        }
    }

    /// Drain with a short grace period (5 s), then stop the worker threads.
    pub fn shutdown(&self) {
        let busy = {
            let reg = self.shared.registry.lock().unwrap();
            !reg.draining || !reg.conns.is_empty()
        };
        if busy {
            self.drain(Instant::now() + Duration::from_secs(5));
        }
        // Readers hold clones of the sender; workers exit once the last one is gone.
        self.shared.jobs.lock().unwrap().take();
        let handles: Vec<_> = self.workers.lock().unwrap().drain(..).collect();
        for h in handles {
            let _ = h.join();
        }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// What a worker is handed: one request, or reads (or writes) of one connection to do together.
enum Work {
    One(Job),
    Group(Vec<Job>),
}

fn worker_loop(rx: JobReceiver) {
    while let Some(work) = rx.recv() {
        match work {
            Work::One(job) => run_job(job),
            Work::Group(jobs) if matches!(jobs[0].cmd, Command::Read { .. }) => run_reads(jobs),
            Work::Group(jobs) => run_writes(jobs),
        }
    }
}

/// Writes a connection's reader grouped (aligned, within the maximum): written together
/// (`Backend::write_batch`: one round of reads and one of writes for all their read-modify-
/// writes) and answered in one socket write. If the batch fails, each is written again alone
/// (same data, same place), so each gets its own result.
fn run_writes(jobs: Vec<Job>) {
    let b = jobs[0].backend.clone();
    let mut fua = false;
    let writes: Vec<(u64, &[u8])> = jobs
        .iter()
        .map(|j| match (j.cmd, &j.payload) {
            (Command::Write { offset, fua: f, .. }, Some(p)) => {
                fua |= f;
                (offset, &p[..])
            }
            _ => unreachable!("only writes with their payload are grouped"),
        })
        .collect();
    let r = {
        let _shared = jobs[0]
            .entry
            .partial_writes
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        catch_unwind(AssertUnwindSafe(|| b.write_batch(&writes, fua)))
    };
    drop(writes);
    if !matches!(r, Ok(Ok(()))) {
        jobs.into_iter().for_each(run_job);
        return;
    }
    let mut out = Vec::with_capacity(jobs.len() * wire::SIMPLE_REPLY_BYTES);
    for j in &jobs {
        out.extend_from_slice(&wire::encode_simple_reply(0, j.handle));
    }
    let conn = &jobs[0].conn;
    conn.send(&[&out]);
    for j in &jobs {
        conn.answered(j.charge, false);
    }
}

/// Reads a connection's reader grouped (aligned, within the maximum): read together
/// (`Backend::read_batch`, one round of member I/O) and answered in one socket write. If the
/// batch fails, each is done again alone, so each gets its own result.
fn run_reads(jobs: Vec<Job>) {
    let b = jobs[0].backend.clone();
    let at = |j: &Job| match j.cmd {
        Command::Read { offset, length } => (offset, length),
        _ => unreachable!("only reads are grouped"),
    };
    let mut bufs: Vec<IoBuf> = jobs.iter().map(|j| b.alloc(at(j).1 as usize)).collect();
    let r = {
        let mut reads: Vec<(u64, &mut [u8])> = jobs
            .iter()
            .zip(bufs.iter_mut())
            .map(|(j, buf)| (at(j).0, &mut buf[..]))
            .collect();
        catch_unwind(AssertUnwindSafe(|| b.read_batch(&mut reads)))
    };
    if !matches!(r, Ok(Ok(()))) {
        jobs.into_iter().for_each(run_job);
        return;
    }
    let hdrs: Vec<Vec<u8>> = jobs
        .iter()
        .map(|j| {
            let (offset, length) = at(j);
            if j.structured {
                wire::encode_offset_data_header(j.handle, offset, length, true).to_vec()
            } else {
                wire::encode_simple_reply(0, j.handle).to_vec()
            }
        })
        .collect();
    let parts: Vec<&[u8]> = hdrs
        .iter()
        .zip(&bufs)
        .flat_map(|(h, d)| [&h[..], &d[..]])
        .collect();
    let conn = &jobs[0].conn;
    conn.send(&parts);
    for j in &jobs {
        conn.answered(j.charge, false);
    }
}

/// Requests grouped into one [`Work::Group`] at most.
const GROUP_MAX: usize = 16;

/// A connection's way to the workers: reads (or writes) collected while more requests are
/// already in the reader's buffer go together; a request of another kind, or an empty buffer,
/// sends what is collected first. Dropping it sends what is left (every request read gets its
/// answer).
struct Dispatch {
    sender: JobSender,
    group: Vec<Job>,
}

impl Dispatch {
    fn send(&mut self, job: Job) {
        self.flush();
        self.sender.send(Work::One(job));
    }

    fn flush(&mut self) {
        match self.group.len() {
            0 => {}
            1 => self.sender.send(Work::One(self.group.pop().unwrap())),
            _ => self
                .sender
                .send(Work::Group(std::mem::take(&mut self.group))),
        }
    }

    /// Whether `cmd` may join the group being collected.
    fn same_kind(&self, cmd: &Command) -> bool {
        self.group.first().is_none_or(|j| {
            matches!(
                (j.cmd, cmd),
                (Command::Read { .. }, Command::Read { .. })
                    | (Command::Write { .. }, Command::Write { .. })
            )
        })
    }
}

impl Drop for Dispatch {
    fn drop(&mut self) {
        self.flush();
    }
}

/// The workers' queue: FIFO, a sleeping worker woken per job, closed when the last
/// [`JobSender`] is dropped (the workers drain what is queued, then exit).
struct JobQueue {
    state: Mutex<JobQueueState>,
    cv: Condvar,
}

struct JobQueueState {
    jobs: std::collections::VecDeque<Work>,
    senders: usize,
}

struct JobSender(Arc<JobQueue>);
#[derive(Clone)]
struct JobReceiver(Arc<JobQueue>);

fn job_queue() -> (JobSender, JobReceiver) {
    let q = Arc::new(JobQueue {
        state: Mutex::new(JobQueueState {
            jobs: std::collections::VecDeque::new(),
            senders: 1,
        }),
        cv: Condvar::new(),
    });
    (JobSender(q.clone()), JobReceiver(q))
}

impl JobSender {
    fn send(&self, job: Work) {
        self.0.state.lock().unwrap().jobs.push_back(job);
        self.0.cv.notify_one();
    }
}

impl Clone for JobSender {
    fn clone(&self) -> JobSender {
        self.0.state.lock().unwrap().senders += 1;
        JobSender(self.0.clone())
    }
}

impl Drop for JobSender {
    fn drop(&mut self) {
        let mut g = self.0.state.lock().unwrap();
        g.senders -= 1;
        if g.senders == 0 {
            self.0.cv.notify_all();
        }
    }
}

impl JobReceiver {
    /// The next job; `None` once every sender is gone and the queue is empty.
    fn recv(&self) -> Option<Work> {
        let mut g = self.0.state.lock().unwrap();
        loop {
            if let Some(j) = g.jobs.pop_front() {
                return Some(j);
            }
            if g.senders == 0 {
                return None;
            }
            g = self.0.cv.wait(g).unwrap();
        }
    }
}

fn in_pieces(
    offset: u64,
    length: u64,
    piece: u64,
    mut f: impl FnMut(u64, u64) -> Result<(), BackendError>,
) -> Result<(), BackendError> {
    let mut done = 0;
    while done < length {
        let n = (length - done).min(piece.max(1));
        f(offset + done, n)?;
        done += n;
    }
    Ok(())
}

fn execute(job: &mut Job) -> Result<Option<IoBuf>, BackendError> {
    let b = &job.backend;
    match job.cmd {
        // Longer than the advertised maximum only from a client that did not agree on block
        // sizes (UNAGREED_MAX_BYTES): served in pieces the backend takes.
        Command::Read { offset, length } => {
            // Not aligned (a client that did not agree on block sizes): read the blocks it
            // touches and hand back its part.
            let (a0, a1) = aligned_cover(offset, length as u64, job.entry.sizes.min_bytes);
            let cover = read_cover(job, a0, a1)?;
            if (a0, a1) == (offset, offset + length as u64) {
                return Ok(Some(cover));
            }
            let mut buf = b.alloc(length as usize);
            let at = (offset - a0) as usize;
            buf.copy_from_slice(&cover[at..at + length as usize]);
            Ok(Some(buf))
        }
        Command::Write {
            offset,
            length,
            fua,
        } => {
            let data = job.payload.as_ref().expect("write payload");
            let (a0, a1) = aligned_cover(offset, length as u64, job.entry.sizes.min_bytes);
            if (a0, a1) == (offset, offset + length as u64) {
                let _shared = job
                    .entry
                    .partial_writes
                    .read()
                    .unwrap_or_else(PoisonError::into_inner);
                write_range(job, offset, &data[..], fua)?;
            } else {
                write_partial(job, offset, Some(&data[..]), length as u64, fua)?;
            }
            Ok(None)
        }
        Command::Flush => b.flush().map(|_| None),
        Command::Trim {
            offset,
            length,
            fua,
        } => {
            // Advisory: only the whole blocks inside the range.
            let (t0, t1) = aligned_inside(offset, length as u64, job.entry.sizes.min_bytes);
            if t1 > t0 {
                in_pieces(t0, t1 - t0, job.split_bytes, |o, l| b.trim(o, l))?;
            }
            if fua {
                b.flush()?;
            }
            Ok(None)
        }
        Command::WriteZeroes {
            offset,
            length,
            fua,
        } => {
            let end = offset + length as u64;
            // Whole blocks inside the range directly; partial blocks at its ends (a client
            // that did not agree on block sizes) by read-modify-write.
            let (z0, z1) = aligned_inside(offset, length as u64, job.entry.sizes.min_bytes);
            if z1 > z0 {
                {
                    let _shared = job
                        .entry
                        .partial_writes
                        .read()
                        .unwrap_or_else(PoisonError::into_inner);
                    in_pieces(z0, z1 - z0, job.split_bytes, |o, l| {
                        b.write_zeroes(o, l, fua)
                    })?;
                }
                // (The shared hold is released: `write_partial` takes the lock exclusively.)
                if offset < z0 {
                    write_partial(job, offset, None, z0 - offset, fua)?;
                }
                if z1 < end {
                    write_partial(job, z1, None, end - z1, fua)?;
                }
            } else if length > 0 {
                write_partial(job, offset, None, length as u64, fua)?;
            }
            Ok(None)
        }
        Command::Disc => Ok(None),
    }
}

/// The block-aligned range covering `len` bytes at `offset`.
fn aligned_cover(offset: u64, len: u64, min: u32) -> (u64, u64) {
    let min = u64::from(min.max(1));
    (offset / min * min, (offset + len).div_ceil(min) * min)
}

/// The whole blocks inside `len` bytes at `offset` (empty when the end comes first).
fn aligned_inside(offset: u64, len: u64, min: u32) -> (u64, u64) {
    let min = u64::from(min.max(1));
    (offset.div_ceil(min) * min, (offset + len) / min * min)
}

/// Read the aligned range `a0..a1` (in pieces the backend takes).
fn read_cover(job: &Job, a0: u64, a1: u64) -> Result<IoBuf, BackendError> {
    let b = &job.backend;
    let mut cover = b.alloc((a1 - a0) as usize);
    in_pieces(a0, a1 - a0, job.split_bytes, |o, l| {
        let at = (o - a0) as usize;
        b.read(o, &mut cover[at..at + l as usize])
    })?;
    Ok(cover)
}

/// Write `len` bytes at an offset or length not aligned to the minimum block size (`data`, or
/// zeroes when `None`): read the blocks they touch, patch, write the blocks back, with every
/// other write of the export held off meanwhile.
fn write_partial(
    job: &Job,
    offset: u64,
    data: Option<&[u8]>,
    len: u64,
    fua: bool,
) -> Result<(), BackendError> {
    let _only = job
        .entry
        .partial_writes
        .write()
        .unwrap_or_else(PoisonError::into_inner);
    let (a0, a1) = aligned_cover(offset, len, job.entry.sizes.min_bytes);
    let mut cover = read_cover(job, a0, a1)?;
    let at = (offset - a0) as usize;
    match data {
        Some(d) => cover[at..at + d.len()].copy_from_slice(d),
        None => cover[at..at + len as usize].fill(0),
    }
    write_range(job, a0, &cover, fua)
}

/// Write `data` at `offset` (in pieces the backend takes).
fn write_range(job: &Job, offset: u64, data: &[u8], fua: bool) -> Result<(), BackendError> {
    let b = &job.backend;
    in_pieces(offset, data.len() as u64, job.split_bytes, |o, l| {
        let at = (o - offset) as usize;
        b.write(o, &data[at..at + l as usize], fua)
    })
}

fn run_job(mut job: Job) {
    let result = match catch_unwind(AssertUnwindSafe(|| execute(&mut job))) {
        Ok(r) => r,
        Err(_) => Err(BackendError::Io("backend panicked".into())),
    };
    job.payload = None;
    let conn = &job.conn;
    let h = job.handle;
    match result {
        Ok(Some(data)) => {
            let Command::Read { offset, length } = job.cmd else {
                unreachable!()
            };
            if job.structured {
                if length == 0 {
                    conn.send(&[&wire::encode_none_chunk(h)]);
                } else {
                    let hdr = wire::encode_offset_data_header(h, offset, length, true);
                    conn.send(&[&hdr, &data[..]]);
                }
            } else {
                conn.send(&[&wire::encode_simple_reply(0, h), &data[..]]);
            }
        }
        Ok(None) => {
            conn.send(&[&wire::encode_simple_reply(0, h)]);
        }
        Err(e) => {
            tracing::debug!(conn = conn.id, error = %e, "request failed");
            let mut out = Vec::new();
            encode_status(&mut out, job.structured, h, &Err(e));
            conn.send(&[&out]);
            conn.answered(job.charge, true);
            return;
        }
    }
    conn.answered(job.charge, false);
}

/// The reply to a request with no data (a write, flush, trim or zeroes), appended to `out`.
fn encode_status(out: &mut Vec<u8>, structured: bool, h: u64, r: &Result<(), BackendError>) {
    match r {
        Ok(()) => out.extend_from_slice(&wire::encode_simple_reply(0, h)),
        Err(e) if structured => {
            out.extend_from_slice(&wire::encode_error_chunk(h, errno_of(e), &e.to_string()))
        }
        Err(e) => out.extend_from_slice(&wire::encode_simple_reply(errno_of(e), h)),
    }
}

/// `Shared::start_write`: the request was refused and answered on the spot.
const ANSWERED: u64 = u64::MAX;

/// A write started on the reader thread (`Backend::start_write`), to acknowledge once its
/// backend says it may be.
struct StartedWrite {
    handle: u64,
    token: u64,
    fua: bool,
    charge: usize,
}

#[derive(Default)]
struct AckQueue {
    /// The writes waiting, and whether the reader has finished.
    st: Mutex<(Vec<StartedWrite>, bool)>,
    cv: Condvar,
}

/// A connection's acknowledger: it waits for the started writes in batches (one wait covers
/// every write started before it: group commit) and sends their replies in one socket write.
/// A worker per write, each woken to wait and woken again to reply, cost more CPU in context
/// switches than the writes themselves on a small machine.
struct Acker {
    q: Arc<AckQueue>,
    thread: Option<JoinHandle<()>>,
}

impl Acker {
    fn start(conn: Arc<Conn>, backend: Arc<dyn Backend>, structured: bool) -> io::Result<Acker> {
        let q = Arc::new(AckQueue::default());
        let q2 = q.clone();
        let thread = std::thread::Builder::new()
            .name(format!("nbd-ack-{}", conn.id))
            .spawn(move || ack_loop(&conn, &*backend, structured, &q2))?;
        Ok(Acker {
            q,
            thread: Some(thread),
        })
    }

    fn push(&self, w: StartedWrite) {
        self.q.st.lock().unwrap().0.push(w);
        self.q.cv.notify_one();
    }
}

impl Drop for Acker {
    /// Every started write is answered before the reader's connection ends.
    fn drop(&mut self) {
        self.q.st.lock().unwrap().1 = true;
        self.q.cv.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn ack_loop(conn: &Conn, backend: &dyn Backend, structured: bool, q: &AckQueue) {
    loop {
        let batch = {
            let mut g = q.st.lock().unwrap();
            while g.0.is_empty() && !g.1 {
                g = q.cv.wait(g).unwrap();
            }
            if g.0.is_empty() {
                return;
            }
            std::mem::take(&mut g.0)
        };
        answer_started(conn, backend, structured, batch);
    }
}

/// Wait until the started writes may be acknowledged (one wait for all: tokens increase) and
/// answer them in one socket write, each with the result.
fn answer_started(conn: &Conn, backend: &dyn Backend, structured: bool, batch: Vec<StartedWrite>) {
    let upto = batch.iter().map(|w| w.token).max().unwrap_or(0);
    let fua = batch.iter().any(|w| w.fua);
    let r = match catch_unwind(AssertUnwindSafe(|| backend.finish_writes(upto, fua))) {
        Ok(r) => r,
        Err(_) => Err(BackendError::Io("backend panicked".into())),
    };
    if let Err(e) = &r {
        tracing::debug!(conn = conn.id, error = %e, "started writes failed");
    }
    let mut out = Vec::with_capacity(batch.len() * wire::SIMPLE_REPLY_BYTES);
    for w in &batch {
        encode_status(&mut out, structured, w.handle, &r);
    }
    conn.send(&[&out]);
    for w in batch {
        conn.answered(w.charge, r.is_err());
    }
}

/// Why a connection ended other than by the client's own choice.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
}

/// What the handshake agreed on.
struct Session {
    entry: Arc<ExportEntry>,
    limits: RequestLimits,
    structured: bool,
}

/// Options a client may send before we call it a denial of service.
const MAX_OPTIONS: u32 = 1024;
/// Largest option data we parse; larger (up to [`MAX_OPTION_SKIP_BYTES`]) gets
/// `NBD_REP_ERR_TOO_BIG`.
const MAX_OPTION_BYTES: u32 = 64 << 10;
/// Largest option data we read and throw away before hanging up instead.
const MAX_OPTION_SKIP_BYTES: u32 = 16 << 20;

/// Read a write's payload: what the buffer holds already, then the rest straight from the
/// socket into `buf` (a large payload would otherwise pass through the buffer at its end).
fn read_payload<R: Read>(rd: &mut std::io::BufReader<R>, buf: &mut [u8]) -> io::Result<()> {
    let have = rd.buffer().len().min(buf.len());
    buf[..have].copy_from_slice(&rd.buffer()[..have]);
    rd.consume(have);
    if buf.len() - have >= rd.capacity() {
        rd.get_mut().read_exact(&mut buf[have..])
    } else {
        rd.read_exact(&mut buf[have..])
    }
}

fn discard(rd: &mut impl Read, mut n: u64) -> io::Result<()> {
    let mut scratch = [0u8; 16 << 10];
    while n > 0 {
        let k = n.min(scratch.len() as u64) as usize;
        rd.read_exact(&mut scratch[..k])?;
        n -= k as u64;
    }
    Ok(())
}

impl Shared {
    fn add_export(&self, export: Export) -> Result<(), ExportError> {
        if let Err(reason) = wire::parse_string(export.name.as_bytes()) {
            return Err(ExportError::BadName {
                name: export.name,
                reason,
            });
        }
        let b = export.backend.block_sizes();
        let min = b.min_bytes.max(1);
        let capped = b.max_bytes.min(self.cfg.max_request_bytes);
        let sizes = BlockSizes {
            min_bytes: min,
            preferred_bytes: b.preferred_bytes,
            max_bytes: capped - capped % min,
        };
        if let Err(reason) =
            wire::check_block_sizes(sizes.min_bytes, sizes.preferred_bytes, sizes.max_bytes)
        {
            return Err(ExportError::BadBlockSizes {
                name: export.name,
                sizes,
                reason,
            });
        }
        let size = export.backend.size_bytes();
        if size % sizes.min_bytes as u64 != 0 {
            tracing::warn!(export = %export.name, size, min = sizes.min_bytes,
                "export size is not a multiple of the minimum block size; its tail is unreachable");
        }
        let mut ex = self.exports.write().unwrap();
        if ex.iter().any(|e| e.export.name == export.name) {
            return Err(ExportError::Duplicate(export.name));
        }
        tracing::info!(export = %export.name, size, ?sizes, read_only = export.read_only, "export added");
        ex.push(Arc::new(ExportEntry {
            export,
            sizes,
            partial_writes: RwLock::new(()),
        }));
        Ok(())
    }

    fn find_export(&self, name: &str) -> Option<Arc<ExportEntry>> {
        let ex = self.exports.read().unwrap();
        if name.is_empty() {
            return ex.first().cloned();
        }
        ex.iter().find(|e| e.export.name == name).cloned()
    }

    /// A log line a client can trigger: rate-limited.
    fn client_warn(&self, peer: &str, what: &str, detail: &dyn std::fmt::Display) {
        let now = self.epoch.elapsed();
        if let Some(suppressed) = self.limiter.lock().unwrap().allow(now) {
            tracing::warn!(peer, suppressed, "{what}: {detail}");
        }
    }

    fn accept_loop(self: Arc<Self>, listener: Listener) {
        while self.accepting.load(Ordering::Acquire) {
            match listener.accept_timeout(Duration::from_millis(50)) {
                Ok(Some(s)) => self.admit(s),
                Ok(None) => {}
                Err(e) => {
                    self.client_warn("-", "accept failed", &e);
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        // Dropping the listener closes it (and removes a Unix socket path).
    }

    fn admit(self: &Arc<Self>, s: Stream) {
        let peer = s.peer();
        let parts = (|| -> io::Result<(Stream, Stream)> { Ok((s.try_clone()?, s.try_clone()?)) })();
        let (control, writer) = match parts {
            Ok(p) => p,
            Err(e) => return self.client_warn(&peer, "cannot clone socket", &e),
        };
        let conn = {
            let mut reg = self.registry.lock().unwrap();
            if reg.draining || reg.conns.len() >= self.cfg.max_connections {
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                drop(reg);
                return self.client_warn(
                    &peer,
                    "connection refused",
                    &"connection limit or draining",
                );
            }
            let id = reg.next_id;
            reg.next_id += 1;
            let conn = Arc::new(Conn {
                id,
                peer: peer.clone(),
                control,
                writer: Mutex::new(writer),
                export: Mutex::new(None),
                stop_reading: AtomicBool::new(false),
                broken: AtomicBool::new(false),
                inflight: Mutex::new(Inflight::default()),
                inflight_cv: Condvar::new(),
                completed: AtomicU64::new(0),
                counters: self.counters.clone(),
                budget: self.budget.clone(),
            });
            reg.conns.insert(id, conn.clone());
            conn
        };
        self.counters.accepted.fetch_add(1, Ordering::Relaxed);
        let sh = self.clone();
        let c2 = conn.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-conn-{}", conn.id))
            .spawn(move || sh.serve(c2, s));
        if let Err(e) = spawned {
            self.client_warn(&peer, "cannot start connection thread", &e);
            conn.kill();
            self.unregister(conn.id);
        }
    }

    fn unregister(&self, id: u64) {
        self.registry.lock().unwrap().conns.remove(&id);
        self.registry_cv.notify_all();
    }

    fn serve(self: Arc<Self>, conn: Arc<Conn>, mut rd: Stream) {
        tracing::debug!(conn = conn.id, peer = %conn.peer, "connection accepted");
        let _ = rd.set_read_timeout(Some(self.cfg.handshake_timeout));
        let _ = rd.set_write_timeout(Some(self.cfg.send_timeout));
        let outcome = match self.handshake(&conn, &mut rd) {
            Ok(Some(session)) => {
                let _ = rd.set_read_timeout(None);
                self.transmission(&conn, &mut rd, session)
            }
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) => {}
            Err(ConnError::Protocol(m)) => {
                self.counters
                    .protocol_errors
                    .fetch_add(1, Ordering::Relaxed);
                self.client_warn(&conn.peer, "hard disconnect", &m);
                conn.kill();
            }
            Err(ConnError::Io(e)) => {
                if !conn.stop_reading.load(Ordering::Acquire) {
                    tracing::debug!(conn = conn.id, peer = %conn.peer, error = %e, "client went away");
                }
            }
        }
        // Every request read gets its answer before the socket closes.
        conn.wait_idle();
        // ... and reaches the client: wait for it to acknowledge them (a drain's deadline or a
        // client that stops reading for the send timeout ends the wait).
        let since = Instant::now();
        let send_timeout = self.cfg.send_timeout;
        conn.control.close_gently(|| {
            conn.broken.load(Ordering::Acquire) || since.elapsed() >= send_timeout
        });
        tracing::debug!(conn = conn.id, peer = %conn.peer, "connection closed");
        self.unregister(conn.id);
    }

    fn reply(&self, conn: &Conn, out: &mut Vec<u8>) -> Result<(), ConnError> {
        let mut w = conn.writer.lock().unwrap();
        write_all_vectored(&mut w, &[out])?;
        out.clear();
        Ok(())
    }

    /// Record the export on the connection unless it was removed meanwhile.
    fn bind_export(&self, conn: &Conn, entry: &ExportEntry) -> bool {
        let _reg = self.registry.lock().unwrap();
        let still = self
            .exports
            .read()
            .unwrap()
            .iter()
            .any(|e| std::ptr::eq(Arc::as_ptr(e), entry as *const ExportEntry));
        if still {
            *conn.export.lock().unwrap() = Some(entry.export.name.clone());
        }
        still
    }

    /// `agreed`: the client asked for `NBD_INFO_BLOCK_SIZE`, and so must keep to the
    /// advertised maximum; others may send READ/WRITE up to [`UNAGREED_MAX_BYTES`].
    fn session(&self, entry: Arc<ExportEntry>, structured: bool, agreed: bool) -> Session {
        let max_bytes = if agreed {
            entry.sizes.max_bytes
        } else {
            let min = entry.sizes.min_bytes;
            entry
                .sizes
                .max_bytes
                .max(UNAGREED_MAX_BYTES - UNAGREED_MAX_BYTES % min)
        };
        let limits = RequestLimits {
            size_bytes: entry.export.backend.size_bytes(),
            // A client that did not agree on block sizes may send any alignment (proto.md: the
            // server SHOULD then take a minimum block size of 1); the server reads and writes
            // whole blocks for it (`write_partial`).
            min_bytes: if agreed { entry.sizes.min_bytes } else { 1 },
            max_bytes,
            read_only: entry.export.read_only,
            structured,
            max_discard_bytes: wire::DOS_FLOOR_BYTES,
        };
        Session {
            entry,
            limits,
            structured,
        }
    }

    fn flags(entry: &ExportEntry, structured: bool) -> u16 {
        wire::transmission_flags(
            entry.export.read_only,
            entry.export.backend.multi_conn_safe(),
            structured,
        )
    }

    fn handshake(&self, conn: &Conn, rd: &mut Stream) -> Result<Option<Session>, ConnError> {
        let mut out = wire::encode_greeting().to_vec();
        self.reply(conn, &mut out)?;
        let mut cf = [0u8; 4];
        rd.read_exact(&mut cf)?;
        let client =
            wire::decode_client_flags(cf).map_err(|e| ConnError::Protocol(e.to_string()))?;
        let mut structured = false;
        for _ in 0..MAX_OPTIONS {
            if conn.stop_reading.load(Ordering::Acquire) {
                return Ok(None);
            }
            let mut raw = [0u8; wire::OPTION_HEADER_BYTES];
            rd.read_exact(&mut raw)?;
            let hdr =
                wire::decode_option_header(&raw).map_err(|e| ConnError::Protocol(e.to_string()))?;
            let opt = hdr.option;
            if hdr.length > MAX_OPTION_BYTES {
                if hdr.length > MAX_OPTION_SKIP_BYTES || opt == wire::OPT_EXPORT_NAME {
                    return Err(ConnError::Protocol(format!(
                        "option {opt} of {} bytes",
                        hdr.length
                    )));
                }
                discard(rd, hdr.length as u64)?;
                wire::encode_option_error(
                    &mut out,
                    opt,
                    wire::REP_ERR_TOO_BIG,
                    "option data too large",
                );
                self.reply(conn, &mut out)?;
                continue;
            }
            let mut data = vec![0u8; hdr.length as usize];
            rd.read_exact(&mut data)?;
            let req = match wire::parse_option(opt, &data) {
                Ok(r) => r,
                Err(e) if opt == wire::OPT_EXPORT_NAME => {
                    return Err(ConnError::Protocol(e.to_string()))
                }
                Err(e) => {
                    self.client_warn(&conn.peer, "bad option", &e);
                    wire::encode_option_error(&mut out, opt, e.reply, &e.message);
                    self.reply(conn, &mut out)?;
                    continue;
                }
            };
            match req {
                OptionRequest::ExportName(name) => {
                    let Some(entry) = self.find_export(&name) else {
                        return Err(ConnError::Protocol(format!(
                            "NBD_OPT_EXPORT_NAME: no export {name:?}"
                        )));
                    };
                    if self.cfg.require_block_size {
                        return Err(ConnError::Protocol(
                            "NBD_OPT_EXPORT_NAME cannot agree on block sizes".into(),
                        ));
                    }
                    if !self.bind_export(conn, &entry) {
                        return Err(ConnError::Protocol(format!("export {name:?} went away")));
                    }
                    let s = self.session(entry, structured, false);
                    let flags = Self::flags(&s.entry, structured);
                    wire::encode_export_name_reply(
                        &mut out,
                        s.limits.size_bytes,
                        flags,
                        client.no_zeroes,
                    );
                    self.reply(conn, &mut out)?;
                    return Ok(Some(s));
                }
                OptionRequest::Abort => {
                    wire::encode_ack(&mut out, opt);
                    // The client may already be gone; that is fine.
                    let _ = self.reply(conn, &mut out);
                    return Ok(None);
                }
                OptionRequest::List => {
                    for e in self.exports.read().unwrap().iter() {
                        wire::encode_rep_server(
                            &mut out,
                            opt,
                            &e.export.name,
                            &e.export.description,
                        );
                    }
                    wire::encode_ack(&mut out, opt);
                }
                OptionRequest::StartTls => {
                    wire::encode_option_error(
                        &mut out,
                        opt,
                        wire::REP_ERR_UNSUP,
                        "TLS is not supported",
                    );
                }
                OptionRequest::ExtendedHeaders => {
                    wire::encode_option_error(
                        &mut out,
                        opt,
                        wire::REP_ERR_UNSUP,
                        "extended headers are not supported",
                    );
                }
                OptionRequest::Unknown(_) => {
                    wire::encode_option_error(&mut out, opt, wire::REP_ERR_UNSUP, "unknown option");
                }
                OptionRequest::StructuredReply => {
                    structured = true;
                    wire::encode_ack(&mut out, opt);
                }
                OptionRequest::ListMetaContext(r) | OptionRequest::SetMetaContext(r) => {
                    if !structured {
                        wire::encode_option_error(
                            &mut out,
                            opt,
                            wire::REP_ERR_INVALID,
                            "negotiate structured replies first",
                        );
                    } else if self.find_export(&r.name).is_none() {
                        wire::encode_option_error(
                            &mut out,
                            opt,
                            wire::REP_ERR_UNKNOWN,
                            "no such export",
                        );
                    } else {
                        // No metadata contexts are offered: none listed, none selected.
                        wire::encode_ack(&mut out, opt);
                    }
                }
                OptionRequest::Info(r) | OptionRequest::Go(r) => {
                    let go = opt == wire::OPT_GO;
                    let Some(entry) = self.find_export(&r.name) else {
                        wire::encode_option_error(
                            &mut out,
                            opt,
                            wire::REP_ERR_UNKNOWN,
                            &format!("no export named {:?}", r.name),
                        );
                        self.reply(conn, &mut out)?;
                        continue;
                    };
                    let size = entry.export.backend.size_bytes();
                    let flags = Self::flags(&entry, structured);
                    wire::encode_info_export(&mut out, opt, size, flags);
                    let s = entry.sizes;
                    // Always sent: the constraints are real (O_DIRECT, RAID stripes).
                    wire::encode_info_block_size(
                        &mut out,
                        opt,
                        s.min_bytes,
                        s.preferred_bytes,
                        s.max_bytes,
                    );
                    if r.requests.contains(&wire::INFO_NAME) {
                        wire::encode_info_name(&mut out, opt, &entry.export.name);
                    }
                    if r.requests.contains(&wire::INFO_DESCRIPTION)
                        && !entry.export.description.is_empty()
                    {
                        wire::encode_info_description(&mut out, opt, &entry.export.description);
                    }
                    if go && self.cfg.require_block_size && !r.wants_block_size() {
                        wire::encode_option_error(
                            &mut out,
                            opt,
                            wire::REP_ERR_BLOCK_SIZE_REQD,
                            "request NBD_INFO_BLOCK_SIZE and honour the block sizes",
                        );
                    } else if go {
                        if !self.bind_export(conn, &entry) {
                            out.clear();
                            wire::encode_option_error(
                                &mut out,
                                opt,
                                wire::REP_ERR_UNKNOWN,
                                "export went away",
                            );
                            self.reply(conn, &mut out)?;
                            continue;
                        }
                        wire::encode_ack(&mut out, opt);
                        self.reply(conn, &mut out)?;
                        return Ok(Some(self.session(entry, structured, r.wants_block_size())));
                    } else {
                        wire::encode_ack(&mut out, opt);
                    }
                }
            }
            self.reply(conn, &mut out)?;
        }
        Err(ConnError::Protocol(format!(
            "more than {MAX_OPTIONS} options"
        )))
    }

    fn reject(&self, conn: &Conn, s: &Session, handle: u64, errno: u32, reason: &str) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        if s.structured {
            conn.send(&[&wire::encode_error_chunk(handle, errno, reason)]);
        } else {
            conn.send(&[&wire::encode_simple_reply(errno, handle)]);
        }
    }

    fn transmission(&self, conn: &Arc<Conn>, rd: &mut Stream, s: Session) -> Result<(), ConnError> {
        let sender = match self.jobs.lock().unwrap().clone() {
            Some(tx) => tx,
            None => return Ok(()),
        };
        let mut dispatch = Dispatch {
            sender,
            group: Vec::new(),
        };
        let d = &mut dispatch;
        tracing::debug!(conn = conn.id, export = %s.entry.export.name, structured = s.structured,
            "transmission started");
        let max_requests = self.cfg.max_inflight_per_conn;
        let max_bytes = self.cfg.max_buffered_bytes_per_conn;
        // One read syscall brings in every request header the client has queued, not one each.
        // Requests buffered here but not yet taken when a drain starts count as unread.
        let mut rd = std::io::BufReader::with_capacity(64 * 1024, rd);
        let rd = &mut rd;
        // Started once the first write takes the fast path; dropped (answering every write it
        // holds) when this returns.
        let mut acker: Option<Acker> = None;
        let min = u64::from(s.entry.sizes.min_bytes.max(1));
        let group_reads = s.entry.export.backend.batches_reads();
        let group_writes = s.entry.export.backend.batches_writes();
        loop {
            if !d.group.is_empty()
                && (d.group.len() >= GROUP_MAX || rd.buffer().len() < wire::REQUEST_HEADER_BYTES)
            {
                d.flush();
            }
            if conn.stop_reading.load(Ordering::Acquire) {
                return Ok(());
            }
            let mut raw = [0u8; wire::REQUEST_HEADER_BYTES];
            rd.read_exact(&mut raw)?;
            // A drain may have begun while this read waited: what arrives after it began is
            // not read (the socket still takes data after its reading was shut down).
            if conn.stop_reading.load(Ordering::Acquire) {
                return Ok(());
            }
            let hdr = wire::decode_request_header(&raw)
                .map_err(|e| ConnError::Protocol(e.to_string()))?;
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            let cmd = match wire::validate_request(&hdr, &s.limits) {
                Ok(c) => c,
                Err(Rejection::Disconnect { reason }) => {
                    return Err(ConnError::Protocol(reason.into()))
                }
                Err(Rejection::Error {
                    errno,
                    reason,
                    discard_bytes,
                }) => {
                    self.client_warn(
                        &conn.peer,
                        "request refused",
                        &format_args!(
                            "{reason} (type {} flags {:#x} offset {} length {})",
                            hdr.kind, hdr.flags, hdr.offset, hdr.length
                        ),
                    );
                    // Discarding a payload may wait for the socket: nothing is held meanwhile.
                    d.flush();
                    discard(rd, discard_bytes as u64)?;
                    self.reject(conn, &s, hdr.handle, errno, reason);
                    continue;
                }
            };
            let charge = match cmd {
                Command::Disc => return Ok(()),
                Command::Read { length, .. } | Command::Write { length, .. } => length as usize,
                _ => 0,
            };
            let aligned = |offset: u64, length: u32| {
                length > 0
                    && offset % min == 0
                    && u64::from(length) % min == 0
                    && length <= s.entry.sizes.max_bytes
            };
            // A write joins only with its payload already buffered: reading it must not wait
            // while the group does.
            let groupable = match cmd {
                Command::Read { offset, length } => group_reads && aligned(offset, length),
                Command::Write { offset, length, .. } => {
                    group_writes && aligned(offset, length) && rd.buffer().len() >= length as usize
                }
                _ => false,
            };
            if !groupable || !d.same_kind(&cmd) {
                d.flush();
            }
            if !conn.try_acquire(charge, max_requests, max_bytes) {
                // Reads held here would never complete to make room.
                d.flush();
                conn.acquire(charge, max_requests, max_bytes);
            }
            let mut payload = None;
            if let Command::Write { length, .. } = cmd {
                let mut buf = s.entry.export.backend.alloc(length as usize);
                if let Err(e) = read_payload(rd, &mut buf[..]) {
                    // A truncated request is not answered; the client is gone or we drain.
                    conn.release(charge);
                    return Err(e.into());
                }
                payload = Some(buf);
            }
            if let (
                Command::Write {
                    offset,
                    length,
                    fua,
                },
                Some(data),
            ) = (cmd, &payload)
            {
                let started = self.start_write(conn, &s, hdr.handle, offset, length, data, charge);
                if let Some(token) = started {
                    if token == ANSWERED {
                        continue;
                    }
                    let w = StartedWrite {
                        handle: hdr.handle,
                        token,
                        fua,
                        charge,
                    };
                    if acker.is_none() {
                        match Acker::start(
                            conn.clone(),
                            s.entry.export.backend.clone(),
                            s.structured,
                        ) {
                            Ok(a) => acker = Some(a),
                            Err(e) => {
                                // No thread to spare: this one waits for it.
                                tracing::warn!(conn = conn.id, error = %e,
                                    "cannot start the connection's acknowledger");
                                answer_started(
                                    conn,
                                    &*s.entry.export.backend,
                                    s.structured,
                                    vec![w],
                                );
                                continue;
                            }
                        }
                    }
                    acker.as_ref().expect("started").push(w);
                    continue;
                }
            }
            let job = Job {
                conn: conn.clone(),
                entry: s.entry.clone(),
                backend: s.entry.export.backend.clone(),
                cmd,
                handle: hdr.handle,
                structured: s.structured,
                payload,
                charge,
                // The advertised maximum: what the backend takes in one call.
                split_bytes: s.entry.sizes.max_bytes as u64,
            };
            if groupable {
                d.group.push(job);
            } else {
                d.send(job);
            }
        }
    }

    /// The fast path of a write: started here on the reader thread when the backend can take it
    /// without waiting (`Backend::start_write`), acknowledged by the connection's [`Acker`].
    /// `Some(token)` when started, `Some(ANSWERED)` when refused (the error reply is sent),
    /// `None` for a worker to write it the blocking way.
    #[allow(clippy::too_many_arguments)]
    fn start_write(
        &self,
        conn: &Conn,
        s: &Session,
        handle: u64,
        offset: u64,
        length: u32,
        data: &[u8],
        charge: usize,
    ) -> Option<u64> {
        let min = u64::from(s.entry.sizes.min_bytes.max(1));
        if offset % min != 0 || u64::from(length) % min != 0 || length > s.entry.sizes.max_bytes {
            return None;
        }
        // A partial write's read-modify-write holds this exclusively: wait for it in a worker.
        let _shared = match s.entry.partial_writes.try_read() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        let b = &s.entry.export.backend;
        let r = match catch_unwind(AssertUnwindSafe(|| b.start_write(offset, data))) {
            Ok(r) => r,
            Err(_) => Err(BackendError::Io("backend panicked".into())),
        };
        match r {
            Ok(Some(token)) => {
                debug_assert_ne!(token, ANSWERED);
                Some(token)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::debug!(conn = conn.id, error = %e, "request failed");
                let mut out = Vec::new();
                encode_status(&mut out, s.structured, handle, &Err(e));
                conn.send(&[&out]);
                conn.answered(charge, true);
                Some(ANSWERED)
            }
        }
    }

    /// Stop `conns` reading requests; returns how many each had answered before (for the
    /// drain's report).
    fn stop_reading(&self, conns: &[Arc<Conn>]) -> Vec<u64> {
        let before = conns
            .iter()
            .map(|c| c.completed.load(Ordering::Acquire))
            .collect();
        for c in conns {
            c.stop_reading.store(true, Ordering::Release);
            // Wakes a reader blocked in read(); requests already read are still answered.
            let _ = c.control.shutdown(Shutdown::Read);
        }
        before
    }

    /// Wait until `conns` (stopped reading by [`Shared::stop_reading`], which counted
    /// `before`) have answered what they read and closed; at `deadline`, close the rest.
    fn drain_conns(
        &self,
        conns: Vec<Arc<Conn>>,
        before: Vec<u64>,
        deadline: Instant,
    ) -> DrainReport {
        let mut reg = self.registry.lock().unwrap();
        let mut deadline_hit = false;
        loop {
            let left = conns
                .iter()
                .filter(|c| reg.conns.contains_key(&c.id))
                .count();
            if left == 0 {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                deadline_hit = true;
                break;
            }
            reg = self
                .registry_cv
                .wait_timeout(reg, deadline - now)
                .unwrap()
                .0;
        }
        let mut aborted = 0;
        for c in &conns {
            if reg.conns.contains_key(&c.id) {
                aborted += 1;
                c.kill();
            }
        }
        drop(reg);
        let completed = conns
            .iter()
            .zip(before)
            .map(|(c, b)| c.completed.load(Ordering::Acquire) - b)
            .sum();
        DrainReport {
            requests_completed: completed,
            connections_closed: conns.len() - aborted,
            connections_aborted: aborted,
            deadline_hit,
        }
    }
}

//! The interconnect: one authenticated TCP session with the partner at a time, over the first
//! of its addresses that answers; heartbeats both ways; mirror traffic; HA messages.
//!
//! Node 0 of the pair dials, node 1 accepts (so there is never a race of two sessions). A
//! session that hears nothing for `timeout` is dropped, and node 0 dials again.

use crate::core::interconnect::{
    Decoded, Hello, LogRecords, Message, Session, StateSummary, NONCE_BYTES,
};
use crate::core::ratelimit::RateLimiter;
use crate::daemon::journal::MirrorLink;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// Interconnect settings.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// 0 or 1: which node of the pair this is (node 0 dials).
    pub node_id: u8,
    /// Where node 1 accepts the session.
    pub listen: Option<SocketAddr>,
    /// The partner's interconnect addresses, tried in order (node 0 dials them).
    pub peers: Vec<SocketAddr>,
    /// Pre-shared key, at least 16 bytes.
    pub key: Vec<u8>,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// Silence after which the session is dropped.
    pub timeout: Duration,
    /// `major << 16 | minor` of this build.
    pub software_version: u32,
}

/// What the link tells the rest of the node.
pub trait LinkHandler: Send + Sync {
    /// A session is up.
    fn on_up(&self, peer: &Hello);
    /// The session went down.
    fn on_down(&self, why: &str);
    /// Bytes for our mirror of the partner's log; returns the seq to acknowledge once durable.
    fn on_log_records(&self, records: &LogRecords) -> Result<u64, ApplyError>;
    /// Whether mirror updates would be applied now: after a [`ApplyError::Refused`], the
    /// link asks this (at every frame that arrives) to tell the partner to send again.
    fn accepts_mirror(&self) -> bool {
        true
    }
    /// Anything else: heartbeats, HA messages, trims.
    fn on_message(&self, msg: Message);
    /// What our heartbeats say.
    fn summary(&self) -> StateSummary;
}

/// Why a mirror update was not applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyError {
    /// This node keeps no mirror of the partner's log now (it serves the partner's aggregate
    /// after a takeover, say). The update and every later one of the session are refused, the
    /// partner is told once (it counts itself unmirrored and sends no more), and the session
    /// stays up for HA traffic. Updates resume, with a whole copy of the log, once
    /// [`LinkHandler::accepts_mirror`] says so. (Ending the session instead made the link
    /// flap: reconnect, resync, refused, drop, for as long as the partner kept writing.)
    Refused(String),
    /// The mirror could not be written: the session ends (a later update of the same commit
    /// must not be acknowledged on top of the hole) and the next one copies the whole log.
    Failed(String),
}

impl std::fmt::Display for ApplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApplyError::Refused(why) => write!(f, "refused: {why}"),
            ApplyError::Failed(why) => write!(f, "failed: {why}"),
        }
    }
}

struct Conn {
    id: u64,
    session: Session,
    stream: TcpStream,
}

struct Shared {
    cfg: LinkConfig,
    handler: Arc<dyn LinkHandler>,
    conn: Mutex<Option<Conn>>,
    next_id: AtomicU64,
    up: AtomicBool,
    /// The id of the established connection (the session), 0 while down.
    session: AtomicU64,
    /// Handshakes in progress (accepting side).
    handshakes: std::sync::atomic::AtomicUsize,
    /// Held while a mirror update is applied, and while a session is replaced: an old
    /// session's update still being applied must not land after the new session's resync.
    apply_lock: Mutex<()>,
    /// The partner's latest acknowledgement: (session it came in, log epoch, up to seq).
    acked: Mutex<(u64, u64, u64)>,
    /// The session in which the partner refuses our mirror updates, and why (see
    /// [`ApplyError::Refused`]): none are sent in it until the partner resumes them.
    mirror_refused: Mutex<Option<(u64, String)>>,
    /// Sessions established since start (a flapping link shows here).
    sessions: AtomicU64,
    /// The partner's mirror updates this side did not apply (it refused them).
    pub frames_refused: AtomicU64,
    acked_cv: Condvar,
    stop: AtomicBool,
    /// Clock origin for the rate limiter.
    epoch: Instant,
    down_since: Mutex<Option<SystemTime>>,
    rejected: Mutex<RateLimiter>,
    pub frames_in: AtomicU64,
    pub frames_out: AtomicU64,
    pub frames_rejected: AtomicU64,
}

/// What a connection's reader has for its ack thread to send, in this order.
#[derive(Default)]
struct Replies {
    /// The latest mirror acknowledgement (a maximum: a newer one replaces one not yet sent).
    ack: Option<(u64, u64)>,
    /// [`Message::LogRefused`] with this reason.
    refuse: Option<String>,
    /// [`Message::LogPaused`].
    paused: bool,
    /// [`Message::LogResume`].
    resume: bool,
}

impl Replies {
    fn is_empty(&self) -> bool {
        self.ack.is_none() && self.refuse.is_none() && !self.paused && !self.resume
    }
}

#[derive(Default)]
struct AckSlot {
    pending: Mutex<Replies>,
    cv: Condvar,
}

impl AckSlot {
    fn post(&self, f: impl FnOnce(&mut Replies)) {
        f(&mut self.pending.lock().unwrap());
        self.cv.notify_one();
    }
}

/// Where this side stands with the partner's mirror updates in one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inbound {
    Applying,
    /// Refused (see [`ApplyError::Refused`]); `paused`: the partner said it sends no more.
    Refusing {
        paused: bool,
    },
}

/// The running interconnect.
pub struct Link {
    shared: Arc<Shared>,
}

/// Counters for status.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LinkStatus {
    pub up: bool,
    pub down_since: Option<SystemTime>,
    pub frames_in: u64,
    pub frames_out: u64,
    pub frames_rejected: u64,
    /// Sessions established since start.
    pub sessions: u64,
    /// The partner refuses our mirror updates in this session, and why.
    pub partner_refuses_mirror: Option<String>,
    /// The partner's mirror updates this side did not apply (refused).
    pub frames_refused: u64,
}

fn nonce() -> [u8; NONCE_BYTES] {
    rand::random()
}

impl Link {
    /// Start the link's threads. Node 1 binds its listener before this returns.
    pub fn start(cfg: LinkConfig, handler: Arc<dyn LinkHandler>) -> io::Result<Link> {
        Session::new(&cfg.key, nonce())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let listener = match (cfg.node_id, cfg.listen) {
            (1, Some(a)) => Some(TcpListener::bind(a)?),
            (1, None) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "node 1 needs an interconnect listen address",
                ))
            }
            _ => None,
        };
        if cfg.node_id == 0 && cfg.peers.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "node 0 needs the partner's interconnect addresses",
            ));
        }
        let shared = Arc::new(Shared {
            cfg,
            handler,
            conn: Mutex::new(None),
            next_id: AtomicU64::new(1),
            up: AtomicBool::new(false),
            session: AtomicU64::new(0),
            handshakes: std::sync::atomic::AtomicUsize::new(0),
            apply_lock: Mutex::new(()),
            acked: Mutex::new((0, 0, 0)),
            mirror_refused: Mutex::new(None),
            sessions: AtomicU64::new(0),
            frames_refused: AtomicU64::new(0),
            acked_cv: Condvar::new(),
            stop: AtomicBool::new(false),
            epoch: Instant::now(),
            down_since: Mutex::new(Some(SystemTime::now())),
            rejected: Mutex::new(RateLimiter::new(5, 1)),
            frames_in: AtomicU64::new(0),
            frames_out: AtomicU64::new(0),
            frames_rejected: AtomicU64::new(0),
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name("hapair-link".into())
            .spawn(move || match listener {
                Some(l) => accept_loop(s, l),
                None => dial_loop(s),
            })?;
        let s = shared.clone();
        std::thread::Builder::new()
            .name("hapair-heartbeat".into())
            .spawn(move || heartbeat_loop(s))?;
        Ok(Link { shared })
    }

    /// Send a message (best effort: false if the link is down or the write failed).
    pub fn send(&self, msg: &Message) -> bool {
        self.shared.send(msg)
    }

    /// Link status.
    pub fn status(&self) -> LinkStatus {
        let s = &self.shared;
        LinkStatus {
            up: s.up.load(Ordering::Acquire),
            down_since: *s.down_since.lock().unwrap(),
            frames_in: s.frames_in.load(Ordering::Relaxed),
            frames_out: s.frames_out.load(Ordering::Relaxed),
            frames_rejected: s.frames_rejected.load(Ordering::Relaxed),
            sessions: s.sessions.load(Ordering::Relaxed),
            partner_refuses_mirror: s.refused_in(s.session.load(Ordering::Acquire)),
            frames_refused: s.frames_refused.load(Ordering::Relaxed),
        }
    }

    /// Stop the link: close the session, end the threads.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(c) = self.shared.conn.lock().unwrap().take() {
            let _ = c.stream.shutdown(Shutdown::Both);
        }
        if let (1, Some(a)) = (self.shared.cfg.node_id, self.shared.cfg.listen) {
            // Wake the accept loop.
            let _ = TcpStream::connect_timeout(&a, Duration::from_millis(200));
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.stop();
    }
}

impl MirrorLink for Link {
    fn is_up(&self) -> bool {
        self.shared.up.load(Ordering::Acquire)
    }
    /// None while the partner refuses our mirror updates in the session: the journal then
    /// acknowledges on local durability alone (and says so) without sending any.
    fn session(&self) -> Option<u64> {
        let s = &self.shared;
        Some(s.session.load(Ordering::Acquire)).filter(|&id| id != 0 && s.refused_in(id).is_none())
    }
    fn down_reason(&self) -> String {
        let s = &self.shared;
        match s.refused_in(s.session.load(Ordering::Acquire)) {
            Some(why) => format!("the partner refuses our mirror updates: {why}"),
            None => "interconnect down".into(),
        }
    }
    fn send_records(&self, session: u64, records: LogRecords) -> bool {
        self.shared
            .send_in(Some(session), &Message::LogRecords(records))
    }
    fn wait_ack(&self, session: u64, epoch: u64, seq: u64, timeout: Duration) -> bool {
        let s = &self.shared;
        let current =
            || s.session.load(Ordering::Acquire) == session && s.refused_in(session).is_none();
        let ok = |a: &(u64, u64, u64)| a.0 == session && a.1 == epoch && a.2 >= seq;
        let g = s.acked.lock().unwrap();
        let (g, _) = s
            .acked_cv
            .wait_timeout_while(g, timeout, |a| !ok(a) && current())
            .unwrap();
        ok(&g) && current()
    }
}

impl Shared {
    fn send(&self, msg: &Message) -> bool {
        self.send_in(None, msg)
    }

    /// Wake the commits waiting for an acknowledgement after a change they check outside
    /// `acked` (the session, a refusal): taking `acked` first, so that a waiter between its
    /// check and its wait cannot miss the wake-up and wait out its whole timeout.
    fn wake_ack_waiters(&self) {
        let _g = self.acked.lock().unwrap();
        self.acked_cv.notify_all();
    }

    /// Why the partner refuses our mirror updates in session `id`, if it does.
    fn refused_in(&self, id: u64) -> Option<String> {
        self.mirror_refused
            .lock()
            .unwrap()
            .as_ref()
            .filter(|(s, _)| *s == id && id != 0)
            .map(|(_, why)| why.clone())
    }

    /// Send on the established connection; with `Some(session)`, only if it is that one.
    fn send_in(&self, session: Option<u64>, msg: &Message) -> bool {
        let mut g = self.conn.lock().unwrap();
        let Some(c) = g.as_mut().filter(|c| session.is_none_or(|s| s == c.id)) else {
            return false;
        };
        // Checked under the connection's lock, which the LogPaused reply is sent under: the
        // partner gets no update after it.
        if matches!(msg, Message::LogRecords(_)) && self.refused_in(c.id).is_some() {
            return false;
        }
        let frame = match c.session.encode(msg) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(error = %e, kind = msg.kind(), "cannot encode interconnect message");
                return false;
            }
        };
        match c.stream.write_all(&frame) {
            Ok(()) => {
                self.frames_out.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(e) => {
                let id = c.id;
                drop(g);
                self.drop_conn(id, &format!("write failed: {e}"));
                false
            }
        }
    }

    fn drop_conn(&self, id: u64, why: &str) {
        let mut g = self.conn.lock().unwrap();
        if g.as_ref().is_some_and(|c| c.id == id) {
            if let Some(c) = g.take() {
                let _ = c.stream.shutdown(Shutdown::Both);
            }
            self.session.store(0, Ordering::Release);
            drop(g);
            let mut r = self.mirror_refused.lock().unwrap();
            if r.as_ref().is_some_and(|(s, _)| *s == id) {
                *r = None;
            }
            drop(r);
            if self.up.swap(false, Ordering::AcqRel) {
                *self.down_since.lock().unwrap() = Some(SystemTime::now());
                tracing::warn!(why, "interconnect down");
                self.handler.on_down(why);
            }
            self.wake_ack_waiters();
        }
    }

    /// Exchange Hellos on a fresh stream and install it as the session.
    fn establish(self: &Arc<Self>, mut stream: TcpStream) -> io::Result<()> {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(self.cfg.timeout))?;
        // Writes may wait behind a large mirror batch the partner is still making durable: give
        // them longer than the silence timeout, which the reader enforces.
        stream.set_write_timeout(Some((self.cfg.timeout * 5).max(Duration::from_secs(5))))?;
        let mut session =
            Session::new(&self.cfg.key, nonce()).map_err(|e| io::Error::other(e.to_string()))?;
        let hello = Hello {
            node_id: self.cfg.node_id,
            software_version: self.cfg.software_version,
            capabilities: 0,
            nonce: session.local_nonce(),
        };
        let frame = session
            .encode(&Message::Hello(hello))
            .map_err(|e| io::Error::other(e.to_string()))?;
        stream.write_all(&frame)?;
        // One deadline for the whole handshake: a peer (or anyone) trickling bytes cannot
        // hold it, and with it the acceptor, for longer.
        let deadline = Instant::now() + self.cfg.timeout * 2;
        let read_some = |stream: &mut TcpStream, buf: &mut Vec<u8>| -> io::Result<()> {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "handshake took too long",
                ));
            }
            stream.set_read_timeout(Some(left))?;
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed during the handshake",
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
            Ok(())
        };
        let mut buf = Vec::new();
        let (peer, rest) = loop {
            match session.decode(&buf) {
                Ok(Decoded::Frame {
                    message: Message::Hello(h),
                    consumed,
                    ..
                }) => break (h, buf[consumed..].to_vec()),
                Ok(Decoded::Frame { .. }) => {
                    return Err(io::Error::other("first frame is not a Hello"))
                }
                Ok(Decoded::NeedMore { .. }) => read_some(&mut stream, &mut buf)?,
                Err(e) => {
                    self.frames_rejected.fetch_add(1, Ordering::Relaxed);
                    return Err(io::Error::other(format!("bad Hello: {e}")));
                }
            }
        };
        if peer.node_id == self.cfg.node_id {
            return Err(io::Error::other(format!(
                "peer claims our own node id {}",
                peer.node_id
            )));
        }
        // A Hello carries no proof of freshness (it is signed before the nonces are
        // exchanged): one recorded earlier and replayed by someone without the key would get
        // this far. The peer's next frame is signed with the nonce we just sent: only a holder
        // of the key, now, can make it. Until it arrives the session in place stays.
        let proof = session
            .encode(&Message::Heartbeat {
                seq: 0,
                state: self.handler.summary(),
            })
            .map_err(|e| io::Error::other(e.to_string()))?;
        stream.write_all(&proof)?;
        let mut buf = rest;
        let rest = loop {
            match session.decode(&buf) {
                Ok(Decoded::Frame { consumed, .. }) => break buf[consumed..].to_vec(),
                Ok(Decoded::NeedMore { .. }) => read_some(&mut stream, &mut buf)?,
                Err(e) => {
                    self.frames_rejected.fetch_add(1, Ordering::Relaxed);
                    return Err(io::Error::other(format!(
                        "peer did not prove the key after its Hello: {e}"
                    )));
                }
            }
        };
        stream.set_read_timeout(Some(self.cfg.timeout))?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let reader = stream.try_clone()?;
        // The reader decodes with its own copy of the session (receive state only), so it
        // never waits for the writer's lock: a writer blocked on a full socket must not stop
        // this side reading, or two writers sending large frames at once wait on each other.
        let rx = session.clone();
        {
            let _applying = self.apply_lock.lock().unwrap();
            let mut g = self.conn.lock().unwrap();
            if let Some(old) = g.take() {
                let _ = old.stream.shutdown(Shutdown::Both);
            }
            *g = Some(Conn {
                id,
                session,
                stream,
            });
            self.session.store(id, Ordering::Release);
        }
        self.wake_ack_waiters();
        self.sessions.fetch_add(1, Ordering::Relaxed);
        self.up.store(true, Ordering::Release);
        *self.down_since.lock().unwrap() = None;
        tracing::info!(
            peer_node = peer.node_id,
            peer_version = peer.software_version,
            "interconnect up"
        );
        self.handler.on_up(&peer);
        let acks = Arc::new(AckSlot::default());
        let s = self.clone();
        let a = acks.clone();
        let spawned = std::thread::Builder::new()
            .name("hapair-link-ack".into())
            .spawn(move || s.ack_loop(id, a))
            .and_then(|_| {
                let s = self.clone();
                std::thread::Builder::new()
                    .name("hapair-link-rx".into())
                    .spawn(move || s.read_loop(id, reader, rest, rx, acks))
            });
        if let Err(e) = spawned {
            // Installed but unread: nothing would ever notice it dead. Down, and redialled.
            self.drop_conn(id, &format!("cannot start the link's threads: {e}"));
            return Err(e);
        }
        Ok(())
    }

    /// Sends the replies of connection `id`'s reader: the latest mirror acknowledgement
    /// (acknowledgements are a maximum: a newer one replaces one not yet sent), then the
    /// mirror flow control (refused, paused, resume). Off the reader thread, which must
    /// never block on a send.
    fn ack_loop(self: Arc<Self>, id: u64, slot: Arc<AckSlot>) {
        loop {
            let next = {
                let g = slot.pending.lock().unwrap();
                let (mut g, _) = slot
                    .cv
                    .wait_timeout_while(g, Duration::from_millis(200), |p| p.is_empty())
                    .unwrap();
                std::mem::take(&mut *g)
            };
            if self.session.load(Ordering::Acquire) != id || self.stop.load(Ordering::Acquire) {
                return;
            }
            if let Some((epoch, up_to_seq)) = next.ack {
                self.send_in(Some(id), &Message::LogAck { epoch, up_to_seq });
            }
            if let Some(reason) = next.refuse {
                self.send_in(Some(id), &Message::LogRefused { reason });
            }
            if next.paused {
                self.send_in(Some(id), &Message::LogPaused);
            }
            if next.resume {
                self.send_in(Some(id), &Message::LogResume);
            }
        }
    }

    fn read_loop(
        self: Arc<Self>,
        id: u64,
        mut stream: TcpStream,
        mut buf: Vec<u8>,
        mut rx: Session,
        acks: Arc<AckSlot>,
    ) {
        let mut chunk = vec![0u8; 256 * 1024];
        let mut inbound = Inbound::Applying;
        let why = loop {
            if self.stop.load(Ordering::Acquire) {
                break "stopping".to_string();
            }
            // Decode every whole frame buffered.
            loop {
                if self.session.load(Ordering::Acquire) != id {
                    return; // replaced or dropped
                }
                let decoded = rx.decode(&buf);
                match decoded {
                    Ok(Decoded::Frame {
                        message, consumed, ..
                    }) => {
                        buf.drain(..consumed);
                        self.frames_in.fetch_add(1, Ordering::Relaxed);
                        if !self.dispatch(id, message, &acks, &mut inbound) {
                            return;
                        }
                    }
                    Ok(Decoded::NeedMore { .. }) => break,
                    Err(e) => {
                        self.frames_rejected.fetch_add(1, Ordering::Relaxed);
                        if let Some(n) = self.rejected.lock().unwrap().allow(self.epoch.elapsed()) {
                            tracing::error!(error = %e, suppressed = n, "interconnect frame rejected; dropping the session");
                        }
                        self.drop_conn(id, &format!("rejected frame: {e}"));
                        return;
                    }
                }
            }
            // Refusing, and the partner stopped sending: resume once we can apply again (asked
            // at every frame, so at least every heartbeat).
            if inbound == (Inbound::Refusing { paused: true }) && self.handler.accepts_mirror() {
                inbound = Inbound::Applying;
                tracing::info!("mirror updates accepted again: the partner copies its log anew");
                acks.post(|r| r.resume = true);
            }
            match stream.read(&mut chunk) {
                Ok(0) => break "partner closed the connection".to_string(),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    break format!("partner silent for {:?}", self.cfg.timeout);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break format!("read failed: {e}"),
            }
        };
        self.drop_conn(id, &why);
    }

    /// Handle one frame of connection `id`; false when the connection was dropped.
    fn dispatch(&self, id: u64, msg: Message, acks: &AckSlot, inbound: &mut Inbound) -> bool {
        match msg {
            Message::LogRecords(_) if *inbound != Inbound::Applying => {
                // Sent before the partner heard of the refusal: not applied, not acknowledged.
                self.frames_refused.fetch_add(1, Ordering::Relaxed);
            }
            Message::LogRecords(r) => {
                let applied = {
                    let _applying = self.apply_lock.lock().unwrap();
                    if self.session.load(Ordering::Acquire) != id {
                        return false; // replaced meanwhile: the new session resyncs
                    }
                    self.handler.on_log_records(&r)
                };
                match applied {
                    Ok(seq) => {
                        // Every message is acknowledged, those a commit sends before its last
                        // with 0: that advances nothing (the acknowledgement is a maximum; a
                        // commit of a new epoch that waits for 0 is an empty log, one message).
                        acks.post(|p| {
                            p.ack = match p.ack {
                                Some((e, s)) if e == r.epoch => Some((e, s.max(seq))),
                                _ => Some((r.epoch, seq)),
                            }
                        });
                    }
                    Err(ApplyError::Refused(why)) => {
                        // Not acknowledged, and nothing later of this session is applied (a
                        // later message of the same commit must not be acknowledged on top of
                        // the hole) until the partner, told once, has stopped sending and we
                        // can apply again. The session stays: HA messages go on.
                        self.frames_refused.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(reason = %why, "partner's mirror update refused: it is told, and counts its writes unmirrored; the session stays for HA traffic");
                        *inbound = Inbound::Refusing { paused: false };
                        acks.post(|p| p.refuse = Some(why));
                    }
                    Err(ApplyError::Failed(e)) => {
                        // Not acknowledged, and the session ends: a later message of the same
                        // commit must not be applied and acknowledged on top of the hole (its
                        // acknowledgement would vouch for this one). The partner resyncs the
                        // whole log in the next session.
                        tracing::error!(error = %e, "mirror update refused; dropping the session");
                        self.drop_conn(id, &format!("mirror update failed: {e}"));
                        return false;
                    }
                }
            }
            Message::LogPaused => match *inbound {
                Inbound::Refusing { .. } => *inbound = Inbound::Refusing { paused: true },
                Inbound::Applying => tracing::warn!("LogPaused without a refusal: ignored"),
            },
            Message::LogRefused { reason } => {
                {
                    let g = self.conn.lock().unwrap();
                    if g.as_ref().is_none_or(|c| c.id != id) {
                        return false;
                    }
                    *self.mirror_refused.lock().unwrap() = Some((id, reason.clone()));
                }
                tracing::error!(reason = %reason, "the partner refuses our mirror updates: writes are acknowledged unmirrored until it accepts them again");
                // A commit waiting for an acknowledgement gets none: it stops waiting now.
                self.wake_ack_waiters();
                acks.post(|p| p.paused = true);
            }
            Message::LogResume => {
                let resumed = {
                    let mut m = self.mirror_refused.lock().unwrap();
                    let was = m.as_ref().is_some_and(|(s, _)| *s == id);
                    if was {
                        *m = None;
                    }
                    was
                };
                if resumed {
                    // Nothing acknowledged before counts: the journal copies the whole log.
                    *self.acked.lock().unwrap() = (id, 0, 0);
                    self.acked_cv.notify_all();
                    tracing::info!("the partner accepts our mirror updates again");
                } else {
                    tracing::warn!("LogResume without a refusal: ignored");
                }
            }
            Message::LogAck { epoch, up_to_seq } => {
                let mut a = self.acked.lock().unwrap();
                // A new session or a new epoch (the partner's log was formatted again) starts
                // counting afresh: an acknowledgement proves nothing outside its session.
                *a = if a.0 == id && a.1 == epoch {
                    (id, epoch, a.2.max(up_to_seq))
                } else {
                    (id, epoch, up_to_seq)
                };
                self.acked_cv.notify_all();
            }
            Message::Hello(_) => {
                tracing::warn!("second Hello on an established session ignored");
            }
            other => self.handler.on_message(other),
        }
        true
    }
}

fn dial_loop(s: Arc<Shared>) {
    let mut backoff = Duration::from_millis(50);
    while !s.stop.load(Ordering::Acquire) {
        if s.conn.lock().unwrap().is_some() {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let mut connected = false;
        for a in &s.cfg.peers {
            match TcpStream::connect_timeout(a, s.cfg.timeout) {
                Ok(stream) => match s.establish(stream) {
                    Ok(()) => {
                        connected = true;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(peer = %a, error = %e, "interconnect handshake failed")
                    }
                },
                Err(e) => tracing::debug!(peer = %a, error = %e, "interconnect dial failed"),
            }
        }
        if connected {
            backoff = Duration::from_millis(50);
        } else {
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }
}

/// Handshakes run at once at most: each is bounded in time, and a connection beyond these is
/// closed at once (someone opening many must not keep the partner out).
const MAX_HANDSHAKES: usize = 4;

fn accept_loop(s: Arc<Shared>, l: TcpListener) {
    for stream in l.incoming() {
        if s.stop.load(Ordering::Acquire) {
            return;
        }
        match stream {
            Ok(st) => {
                let peer = st.peer_addr().ok();
                if s.handshakes.fetch_add(1, Ordering::AcqRel) >= MAX_HANDSHAKES {
                    s.handshakes.fetch_sub(1, Ordering::AcqRel);
                    tracing::warn!(peer = ?peer, "interconnect: too many handshakes at once; connection closed");
                    continue;
                }
                let s2 = s.clone();
                let spawned = std::thread::Builder::new()
                    .name("hapair-link-hs".into())
                    .spawn(move || {
                        if let Err(e) = s2.establish(st) {
                            tracing::warn!(peer = ?peer, error = %e, "interconnect handshake failed");
                        }
                        s2.handshakes.fetch_sub(1, Ordering::AcqRel);
                    });
                if let Err(e) = spawned {
                    s.handshakes.fetch_sub(1, Ordering::AcqRel);
                    tracing::warn!(error = %e, "interconnect: cannot start a handshake thread");
                }
            }
            Err(e) => tracing::warn!(error = %e, "interconnect accept failed"),
        }
    }
}

fn heartbeat_loop(s: Arc<Shared>) {
    let mut seq = 0u64;
    while !s.stop.load(Ordering::Acquire) {
        std::thread::sleep(s.cfg.heartbeat);
        if s.up.load(Ordering::Acquire) {
            seq += 1;
            let summary = s.handler.summary();
            s.send(&Message::Heartbeat {
                seq,
                state: summary,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::nvlog::{scan, Expect};
    use crate::daemon::aggregate::tests::mem_aggregate;
    use crate::daemon::journal::{
        replay_region, Journal, JournalConfig, MirrorRegion, MirrorState, LOG_GENERATION,
    };
    use crate::io::buf::IoBuf;
    use crate::io::nvram::NvramRegion;

    const KEY: &[u8] = b"0123456789abcdef-test-key";

    /// Node 1's side for the test: keeps the mirror, records HA messages.
    struct Partner {
        mirror: MirrorRegion,
        msgs: Mutex<Vec<Message>>,
        ups: AtomicU64,
        downs: AtomicU64,
        /// This many of the next mirror updates fail (a mirror write error).
        fail_applies: AtomicU64,
    }

    impl Partner {
        fn new(mirror: NvramRegion) -> Arc<Partner> {
            Arc::new(Partner {
                mirror: MirrorRegion::new(mirror),
                msgs: Mutex::new(vec![]),
                ups: AtomicU64::new(0),
                downs: AtomicU64::new(0),
                fail_applies: AtomicU64::new(0),
            })
        }
    }

    impl LinkHandler for Partner {
        fn on_up(&self, _peer: &Hello) {
            self.ups.fetch_add(1, Ordering::Relaxed);
        }
        fn on_down(&self, _why: &str) {
            self.downs.fetch_add(1, Ordering::Relaxed);
        }
        fn on_log_records(&self, r: &LogRecords) -> Result<u64, ApplyError> {
            if self
                .fail_applies
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(ApplyError::Failed("injected mirror write failure".into()));
            }
            self.mirror
                .apply(r)
                .map_err(|e| ApplyError::Failed(e.to_string()))
        }
        fn on_message(&self, m: Message) {
            self.msgs.lock().unwrap().push(m);
        }
        fn summary(&self) -> StateSummary {
            StateSummary {
                ha_state: 1,
                flags: StateSummary::HEALTHY,
                aggregates_served: 1,
                log_last_seq: 0,
            }
        }
    }

    /// What a test handler that serves nothing reports in its Hello.
    fn idle_summary() -> StateSummary {
        StateSummary {
            ha_state: 1,
            flags: 0,
            aggregates_served: 0,
            log_last_seq: 0,
        }
    }

    fn cfg(node_id: u8, port: u16, key: &[u8]) -> LinkConfig {
        let a: SocketAddr = ([127, 0, 0, 1], port).into();
        LinkConfig {
            node_id,
            listen: (node_id == 1).then_some(a),
            peers: vec![a],
            key: key.to_vec(),
            heartbeat: Duration::from_millis(50),
            timeout: Duration::from_millis(400),
            software_version: 1,
        }
    }

    fn wait(what: &str, f: impl Fn() -> bool) {
        let end = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[test]
    fn journal_mirrors_over_tcp_through_partner_loss_and_return() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let port = free_port();
        let region = |n: &str| NvramRegion::open(&dir.path().join(n), 2 << 20).unwrap();
        let (agg, _d) = mem_aggregate(4, 4096, 32);
        let agg = Arc::new(agg);
        let partner = Partner::new(region("mirror"));
        let l1 = Link::start(cfg(1, port, KEY), partner.clone()).unwrap();
        let l0 = Arc::new(Link::start(cfg(0, port, KEY), partner_stub()).unwrap());
        wait("link up", || {
            l0.is_up() && partner.ups.load(Ordering::Relaxed) == 1
        });
        let (j, _) = Journal::open(
            agg.clone(),
            region("local"),
            JournalConfig {
                cp_interval: Duration::from_secs(3600),
                ..Default::default()
            },
        )
        .unwrap();
        j.set_mirror(Some(l0.clone()));
        let mut model = vec![0u8; agg.geometry().size_bytes() as usize];
        let mut write = |i: u64| {
            let off = (i * 17 % 120) * 4096;
            let d: Vec<u8> = (0..8192).map(|k| (k as u64 * 7 + i) as u8).collect();
            j.write(off, &d, false).unwrap();
            model[off as usize..off as usize + d.len()].copy_from_slice(&d);
        };
        for i in 0..30 {
            write(i);
        }
        assert_eq!(j.mirror_state(), MirrorState::Mirrored);
        // HA messages go through too.
        assert!(l0.send(&Message::Ha(b"hello".to_vec())));
        wait("HA message", || {
            partner
                .msgs
                .lock()
                .unwrap()
                .iter()
                .any(|m| *m == Message::Ha(b"hello".to_vec()))
        });
        wait("heartbeats arrive", || {
            partner
                .msgs
                .lock()
                .unwrap()
                .iter()
                .any(|m| matches!(m, Message::Heartbeat { .. }))
        });
        // The partner goes away: writes go on, acknowledged locally, and status says so.
        drop(l1);
        wait("link down", || !l0.is_up());
        for i in 30..40 {
            write(i);
        }
        assert!(matches!(j.mirror_state(), MirrorState::NotMirrored { .. }));
        // It comes back (its mirror file kept): the first commit resynchronises.
        let partner2 = Partner::new(region("mirror"));
        drop(partner);
        let _l1 = Link::start(cfg(1, port, KEY), partner2.clone()).unwrap();
        wait("link back", || l0.is_up());
        for i in 40..50 {
            write(i);
        }
        assert_eq!(j.mirror_state(), MirrorState::Mirrored);
        // The mirror alone gives back every acknowledged write.
        let snap = partner2.mirror.snapshot();
        let uuid = uuid::Uuid::parse_str(&agg.status().uuid).unwrap();
        scan(
            &snap,
            &Expect {
                aggregate: uuid,
                generation: LOG_GENERATION,
            },
        )
        .unwrap();
        replay_region(&agg, &snap).unwrap();
        let mut all = IoBuf::new(model.len());
        agg.read(0, &mut all).unwrap();
        assert!(all[..] == model[..]);
    }

    /// Check that `mirror`, replayed alone, gives back `model` on `agg`.
    fn mirror_holds(agg: &crate::daemon::aggregate::Aggregate, mirror: &[u8], model: &[u8]) {
        let uuid = uuid::Uuid::parse_str(&agg.status().uuid).unwrap();
        scan(
            mirror,
            &Expect {
                aggregate: uuid,
                generation: LOG_GENERATION,
            },
        )
        .unwrap();
        replay_region(agg, mirror).unwrap();
        let mut all = IoBuf::new(model.len());
        agg.read(0, &mut all).unwrap();
        assert!(all[..] == model[..], "the mirror lacks acknowledged writes");
    }

    /// The partner restarts with a mirror that lost what it had not flushed (here: nothing
    /// left at all), and we write nothing meanwhile. The mirror was "in sync" in the old
    /// session only: it is copied again, without waiting for a write, and not reported
    /// mirrored before that. (It used to stay "mirrored" with an empty mirror until the next
    /// write.)
    #[test]
    fn a_reconnect_resyncs_the_mirror_without_waiting_for_a_write() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let port = free_port();
        let region = |n: &str| NvramRegion::open(&dir.path().join(n), 2 << 20).unwrap();
        let (agg, _d) = mem_aggregate(4, 4096, 32);
        let agg = Arc::new(agg);
        let partner = Partner::new(region("mirror"));
        let l1 = Link::start(cfg(1, port, KEY), partner.clone()).unwrap();
        let l0 = Arc::new(Link::start(cfg(0, port, KEY), partner_stub()).unwrap());
        wait("link up", || l0.is_up());
        let (j, _) = Journal::open(agg.clone(), region("local"), JournalConfig::default()).unwrap();
        j.set_mirror(Some(l0.clone()));
        let mut model = vec![0u8; agg.geometry().size_bytes() as usize];
        for i in 0..20u64 {
            let off = (i * 5 % 100) * 4096;
            let d: Vec<u8> = (0..4096).map(|k| (k as u64 * 3 + i) as u8).collect();
            j.write(off, &d, false).unwrap();
            model[off as usize..off as usize + d.len()].copy_from_slice(&d);
        }
        assert_eq!(j.mirror_state(), MirrorState::Mirrored);
        drop(l1);
        wait("link down", || !l0.is_up());
        let partner2 = Partner::new(region("mirror2"));
        let _l1 = Link::start(cfg(1, port, KEY), partner2.clone()).unwrap();
        wait("link back", || l0.is_up());
        // At once: not mirrored (the new session has not been brought up to date).
        let st = j.mirror_state();
        assert!(
            matches!(st, MirrorState::NotMirrored { .. })
                || partner2.mirror.snapshot()[..64] != [0; 64],
            "reported mirrored in a new session before any copy: {st:?}"
        );
        wait("mirror resynchronised without a write", || {
            j.mirror_state() == MirrorState::Mirrored
        });
        mirror_holds(&agg, &partner2.mirror.snapshot(), &model);
    }

    /// A commit that takes several messages (here a resync of 6 MiB of log) whose first
    /// message the partner fails to apply: the session ends, nothing of it counts as
    /// acknowledged, and the next session copies the whole log again. (The partner used to
    /// go on applying and acknowledging the later messages, and the acknowledgement of the
    /// last one counted for the whole commit: "mirrored" with a hole in the mirror.)
    #[test]
    fn a_failed_mirror_update_ends_the_session_and_proves_nothing() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let port = free_port();
        let region = |n: &str| NvramRegion::open(&dir.path().join(n), 16 << 20).unwrap();
        let (agg, _d) = mem_aggregate(4, 65536, 64);
        let agg = Arc::new(agg);
        let l0 = Arc::new(Link::start(cfg(0, port, KEY), partner_stub()).unwrap());
        let (j, _) = Journal::open(
            agg.clone(),
            region("local"),
            JournalConfig {
                cp_interval: Duration::from_secs(600),
                cp_fill_percent: 95,
                ..Default::default()
            },
        )
        .unwrap();
        j.set_mirror(Some(l0.clone()));
        // The partner is away: 6 MiB of partial-stripe writes, acknowledged locally.
        let mut model = vec![0u8; agg.geometry().size_bytes() as usize];
        for i in 0..96u64 {
            let off = (i * 37 % 255) * 65536;
            let d: Vec<u8> = (0..65536).map(|k| (k as u64 * 13 + i) as u8).collect();
            j.write(off, &d, false).unwrap();
            model[off as usize..off as usize + d.len()].copy_from_slice(&d);
        }
        assert!(matches!(j.mirror_state(), MirrorState::NotMirrored { .. }));
        // It comes back, and its first mirror update fails.
        let partner = Partner::new(region("mirror"));
        partner.fail_applies.store(1, Ordering::SeqCst);
        let _l1 = Link::start(cfg(1, port, KEY), partner.clone()).unwrap();
        wait("mirror resynchronised", || {
            j.mirror_state() == MirrorState::Mirrored
        });
        assert_eq!(
            partner.fail_applies.load(Ordering::SeqCst),
            0,
            "the failure happened"
        );
        assert!(
            partner.ups.load(Ordering::SeqCst) >= 2,
            "the failed update ended its session"
        );
        mirror_holds(&agg, &partner.mirror.snapshot(), &model);
    }

    /// Both nodes send large mirror frames at once (both resynchronising after a flap, say):
    /// neither side's reader may wait for its own writer, which waits for the other side to
    /// read. (The reader used to decode and acknowledge under the writer's lock: both links
    /// stalled until the write timeout dropped them, and again after every reconnect.)
    #[test]
    fn both_sides_sending_large_frames_at_once_do_not_deadlock() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let port = free_port();
        let region = |n: &str| NvramRegion::open(&dir.path().join(n), 8 << 20).unwrap();
        let p0 = Partner::new(region("m0"));
        let p1 = Partner::new(region("m1"));
        // Silence timeout well above any pause a loaded test machine makes (a deadlock is
        // not a pause: it lasts until the write timeout, five times this).
        let patient = |n| LinkConfig {
            timeout: Duration::from_secs(2),
            ..cfg(n, port, KEY)
        };
        let l1 = Arc::new(Link::start(patient(1), p1.clone()).unwrap());
        let l0 = Arc::new(Link::start(patient(0), p0.clone()).unwrap());
        wait("link up", || l0.is_up() && l1.is_up());
        let (s0, s1) = (l0.session().unwrap(), l1.session().unwrap());
        let blast = |l: Arc<Link>, session: u64, fill: u8| {
            std::thread::spawn(move || {
                (1..=8u64).all(|i| {
                    l.send_records(
                        session,
                        LogRecords {
                            epoch: 1,
                            first_seq: i,
                            last_seq: i,
                            segments: vec![crate::core::interconnect::LogSegment {
                                region_offset: 0,
                                bytes: vec![fill.wrapping_add(i as u8); 4 << 20],
                            }],
                        },
                    )
                })
            })
        };
        let (a, b) = (blast(l0.clone(), s0, 1), blast(l1.clone(), s1, 100));
        assert!(
            a.join().unwrap() && b.join().unwrap(),
            "every send went out"
        );
        assert!(l0.wait_ack(s0, 1, 8, Duration::from_secs(10)));
        assert!(l1.wait_ack(s1, 1, 8, Duration::from_secs(10)));
        assert_eq!(
            p0.downs.load(Ordering::SeqCst) + p1.downs.load(Ordering::SeqCst),
            0
        );
        assert_eq!(
            (l0.session(), l1.session()),
            (Some(s0), Some(s1)),
            "same sessions"
        );
        assert_eq!(p1.mirror.snapshot()[4096], 9, "the last frame applied");
        assert_eq!(p0.mirror.snapshot()[4096], 108);
    }

    /// A mirror whose apply of the update with `first_seq` 1 waits at a gate (a slow
    /// NVRAM write, say) until released.
    struct Gated {
        mirror: MirrorRegion,
        /// (the gated apply entered, released, the gated apply done)
        gate: Mutex<(bool, bool, bool)>,
        cv: Condvar,
        /// Updates applied other than the gated one.
        others: AtomicU64,
    }

    impl Gated {
        fn wait(&self, timeout: Duration, f: impl Fn(&(bool, bool, bool)) -> bool) -> bool {
            let g = self.gate.lock().unwrap();
            let (g, _) = self.cv.wait_timeout_while(g, timeout, |s| !f(s)).unwrap();
            f(&g)
        }
    }

    impl LinkHandler for Gated {
        fn on_up(&self, _: &Hello) {}
        fn on_down(&self, _: &str) {}
        fn on_log_records(&self, r: &LogRecords) -> Result<u64, ApplyError> {
            let gated = r.first_seq == 1;
            if gated {
                self.gate.lock().unwrap().0 = true;
                self.cv.notify_all();
                let g = self.gate.lock().unwrap();
                drop(self.cv.wait_while(g, |s| !s.1).unwrap());
            }
            let seq = self
                .mirror
                .apply(r)
                .map_err(|e| ApplyError::Failed(e.to_string()));
            if gated {
                self.gate.lock().unwrap().2 = true;
            } else {
                self.others.fetch_add(1, Ordering::SeqCst);
            }
            self.cv.notify_all();
            seq
        }
        fn on_message(&self, _: Message) {}
        fn summary(&self) -> StateSummary {
            idle_summary()
        }
    }

    /// A session ends while its reader is still applying a mirror update (a slow NVRAM
    /// write); the next session brings the mirror up to date. The old update must not land
    /// after the new session's: it would put stale bytes back into a mirror reported current.
    /// (Before the apply lock, the old reader's update landed last.)
    #[test]
    fn an_old_sessions_late_update_does_not_land_after_the_new_sessions() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let port = free_port();
        let gated = Arc::new(Gated {
            mirror: MirrorRegion::new(NvramRegion::open(&dir.path().join("m"), 1 << 20).unwrap()),
            gate: Mutex::new((false, false, false)),
            cv: Condvar::new(),
            others: AtomicU64::new(0),
        });
        // Silence timeout well above the window below (node 0 hears nothing from node 1 in
        // the new session while node 1 waits to install it).
        let patient = |n| LinkConfig {
            timeout: Duration::from_secs(5),
            ..cfg(n, port, KEY)
        };
        let _l1 = Link::start(patient(1), gated.clone()).unwrap();
        let l0 = Link::start(patient(0), partner_stub()).unwrap();
        wait("link up", || l0.is_up());
        let update = |seq: u64, fill: u8| LogRecords {
            epoch: 1,
            first_seq: seq,
            last_seq: seq,
            segments: vec![crate::core::interconnect::LogSegment {
                region_offset: 8192,
                bytes: vec![fill; 4096],
            }],
        };
        let s0 = l0.session().unwrap();
        assert!(l0.send_records(s0, update(1, 0xaa)));
        assert!(
            gated.wait(Duration::from_secs(10), |s| s.0),
            "the old update is being applied"
        );
        // The session ends at node 0 (a write error, say) and node 0 dials again.
        l0.shared.drop_conn(s0, "test: the session ends");
        wait("a new session", || l0.session().is_some_and(|s| s != s0));
        let s1 = l0.session().unwrap();
        assert!(l0.send_records(s1, update(2, 0xbb)));
        // The window for the old update to land last: the new one is applied within it unless
        // the new session waits for the old apply to end.
        let end = Instant::now() + Duration::from_secs(1);
        while gated.others.load(Ordering::SeqCst) == 0 && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
        {
            gated.gate.lock().unwrap().1 = true;
            gated.cv.notify_all();
        }
        assert!(
            gated.wait(Duration::from_secs(10), |s| s.2),
            "the old update ended"
        );
        assert!(
            l0.wait_ack(s1, 1, 2, Duration::from_secs(10)),
            "the new session's update is acknowledged"
        );
        assert_eq!(
            gated.mirror.snapshot()[8192],
            0xbb,
            "the old session's update landed after the new session's"
        );
    }

    /// Set in the child process of [`a_session_whose_threads_did_not_start_is_dropped`]: the
    /// interconnect port and the pids cgroup to join.
    const SPAWN_CHILD_ENV: &str = "HAPAIR_TEST_LINK_SPAWN_CHILD";

    /// A pids cgroup for the child, removed (the child gone) on drop.
    struct PidsCgroup(std::path::PathBuf);

    impl PidsCgroup {
        fn new() -> PidsCgroup {
            let name = format!("hapair-link-test-{}", std::process::id());
            let v1 = std::path::Path::new("/sys/fs/cgroup/pids");
            let dir = if v1.is_dir() {
                v1.join(name)
            } else {
                // cgroup v2: the pids controller for the root's children.
                let root = std::path::Path::new("/sys/fs/cgroup");
                let _ = std::fs::write(root.join("cgroup.subtree_control"), "+pids");
                root.join(name)
            };
            std::fs::create_dir(&dir).unwrap_or_else(|e| {
                panic!(
                    "this test needs root and the pids cgroup controller: {}: {e}",
                    dir.display()
                )
            });
            PidsCgroup(dir)
        }
        fn set_max(&self, max: &str) {
            std::fs::write(self.0.join("pids.max"), max).unwrap();
        }
    }

    impl Drop for PidsCgroup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }

    /// The child: node 0 in a pids cgroup. It joins it, says how many tasks it has, and
    /// starts its link when told (by then the limit leaves room for the link's two threads
    /// and a session's first, not its reader); it ends when its stdin closes.
    fn spawn_failure_child(arg: &str) {
        use std::io::BufRead;
        let (port, cg) = arg.split_once(':').expect("port:cgroup");
        let cg = std::path::Path::new(cg);
        std::fs::write(cg.join("cgroup.procs"), std::process::id().to_string()).unwrap();
        let tasks = std::fs::read_to_string(cg.join("pids.current")).unwrap();
        // (On the line where the test harness named the test.)
        println!("child-tasks={}", tasks.trim());
        let mut lines = io::stdin().lock().lines();
        assert_eq!(lines.next().unwrap().unwrap(), "go");
        let _l0 = Link::start(cfg(0, port.parse().unwrap(), KEY), partner_stub()).unwrap();
        for _ in lines {}
    }

    /// A session is installed but its reader thread cannot start (here: the process is at
    /// its pids cgroup limit, as under a systemd TasksMax). Nothing would ever read it, nor
    /// notice it dead: the link drops it and dials again, and once threads can start, a
    /// session works. (Such a session used to stay installed, unread, for good: the partner
    /// kept hearing its heartbeats, and its mirror updates went unanswered.)
    #[test]
    fn a_session_whose_threads_did_not_start_is_dropped() {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        if let Ok(arg) = std::env::var(SPAWN_CHILD_ENV) {
            return spawn_failure_child(&arg);
        }
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let port = free_port();
        let partner = Partner::new(NvramRegion::open(&dir.path().join("m"), 1 << 20).unwrap());
        // Node 1 here, with a long silence timeout: its session ends when node 0 drops it,
        // not because node 0 stops reading.
        let l1 = Link::start(
            LinkConfig {
                timeout: Duration::from_secs(30),
                ..cfg(1, port, KEY)
            },
            partner.clone(),
        )
        .unwrap();
        let cg = PidsCgroup::new();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "daemon::link::tests::a_session_whose_threads_did_not_start_is_dropped",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(SPAWN_CHILD_ENV, format!("{port}:{}", cg.0.display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        struct Reap(std::process::Child);
        impl Drop for Reap {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let mut stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let _reap = Reap(child);
        let tasks: u64 = io::BufReader::new(stdout)
            .lines()
            .map(|l| l.unwrap())
            .find_map(|l| l.split("child-tasks=").nth(1).map(|n| n.parse().unwrap()))
            .expect("the child joined the cgroup");
        cg.set_max(&(tasks + 3).to_string());
        writeln!(stdin, "go").unwrap();
        wait("a session up", || partner.ups.load(Ordering::SeqCst) >= 1);
        wait("the unread session dropped by node 0", || {
            partner.downs.load(Ordering::SeqCst) >= 1
        });
        // Threads can start again: a session comes up whose reader answers. (Node 0 refuses
        // mirror updates: its answer, LogRefused, comes from its reader.)
        cg.set_max("max");
        wait("node 0's reader answers", || {
            if let Some(s) = l1.session() {
                l1.send_records(
                    s,
                    LogRecords {
                        epoch: 1,
                        first_seq: 1,
                        last_seq: 1,
                        segments: vec![],
                    },
                );
            }
            l1.status().partner_refuses_mirror.is_some()
        });
        drop(stdin);
    }

    fn partner_stub() -> Arc<dyn LinkHandler> {
        struct Stub;
        impl LinkHandler for Stub {
            fn on_up(&self, _: &Hello) {}
            fn on_down(&self, _: &str) {}
            fn on_log_records(&self, _: &LogRecords) -> Result<u64, ApplyError> {
                Err(ApplyError::Refused(
                    "node 0 keeps no mirror in this test".into(),
                ))
            }
            fn accepts_mirror(&self) -> bool {
                false
            }
            fn on_message(&self, _: Message) {}
            fn summary(&self) -> StateSummary {
                idle_summary()
            }
        }
        Arc::new(Stub)
    }

    #[test]
    fn forged_connections_are_rejected_and_change_nothing() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let port = free_port();
        let partner = Partner::new(NvramRegion::open(&dir.path().join("m"), 1 << 20).unwrap());
        let l1 = Link::start(cfg(1, port, KEY), partner.clone()).unwrap();
        let l0 = Link::start(cfg(0, port, KEY), partner_stub()).unwrap();
        wait("link up", || l0.is_up() && l1.status().up);
        let before = std::fs::read(dir.path().join("m")).unwrap();
        // 1: garbage. 2: a Hello under the wrong key. 3: a well-formed mirror frame from a
        // session under the wrong key, after a wrong-key Hello.
        let mut forger = Session::new(b"not-the-key-0123456789", nonce()).unwrap();
        let hello = forger
            .encode(&Message::Hello(Hello {
                node_id: 0,
                software_version: 1,
                capabilities: 0,
                nonce: forger.local_nonce(),
            }))
            .unwrap();
        for attempt in [b"GET / HTTP/1.0\r\n\r\n".to_vec(), hello.clone()] {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            let _ = s.write_all(&attempt);
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let mut b = [0u8; 256];
            // The server answers with its own Hello at most; then it closes on us.
            let mut total = 0;
            loop {
                match s.read(&mut b) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n,
                }
            }
            assert!(total < 256, "the server said more than a Hello to a forger");
        }
        wait("rejections counted", || l1.status().frames_rejected >= 2);
        // The real session survived every attempt, and no state changed.
        assert!(l0.is_up() && l1.status().up);
        assert_eq!(
            partner.ups.load(Ordering::Relaxed),
            1,
            "no forged session was installed"
        );
        assert_eq!(
            std::fs::read(dir.path().join("m")).unwrap(),
            before,
            "the mirror is untouched"
        );
        // 4: a Hello under the right key, as one recorded earlier and replayed (a Hello is
        // signed before any nonce is known, so any is as good as a recording), followed by
        // silence or by a frame signed for some other session's nonce. No proof of the key
        // for this session's nonce: the session in place stays. (It used to be replaced at
        // the Hello: anyone who had seen one Hello could keep the interconnect down.)
        let s0 = l0.session();
        let mut replayer = Session::new(KEY, nonce()).unwrap();
        let real_hello = replayer
            .encode(&Message::Hello(Hello {
                node_id: 0,
                software_version: 1,
                capabilities: 0,
                nonce: replayer.local_nonce(),
            }))
            .unwrap();
        let stale = {
            // A frame signed for a session whose peer nonce is not this one.
            let mut other = Session::new(KEY, nonce()).unwrap();
            let h = other
                .encode(&Message::Hello(Hello {
                    node_id: 1,
                    software_version: 1,
                    capabilities: 0,
                    nonce: other.local_nonce(),
                }))
                .unwrap();
            replayer.decode(&h).unwrap();
            replayer.encode(&Message::Ha(b"replayed".to_vec())).unwrap()
        };
        for tail in [Vec::new(), stale] {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.write_all(&real_hello).unwrap();
            let _ = s.write_all(&tail);
            std::thread::sleep(Duration::from_millis(1000));
            assert_eq!(l0.session(), s0, "the real session was replaced");
        }
        assert_eq!(
            partner.ups.load(Ordering::Relaxed),
            1,
            "no replayed session installed"
        );
        assert!(
            !partner
                .msgs
                .lock()
                .unwrap()
                .iter()
                .any(|m| *m == Message::Ha(b"replayed".to_vec())),
            "a replayed frame was delivered"
        );
        assert!(l0.send(&Message::Ha(b"still here".to_vec())));
        wait("real message after forgeries", || {
            partner
                .msgs
                .lock()
                .unwrap()
                .iter()
                .any(|m| *m == Message::Ha(b"still here".to_vec()))
        });
    }
}

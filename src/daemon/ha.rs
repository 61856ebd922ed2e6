//! The HA control loop: one thread owns [`takeover::Node`] and is fed by one bounded channel.
//!
//! ```text
//!  interconnect reader ──Message──┐
//!  mailbox driver ──MailboxRead───┤                   ┌─> HaExecutor (the node: interconnect
//!  step threads ──(completions)───┼──> [bounded] ──> loop ─> Node::step ─>   send, steps, halt,
//!  control socket ──Operator/Status/Watch─┤           │                     ack mode, alarms)
//!  node ──Health/OwnMirror/PartnerDisks/FencedOut─┘   ├─> MailboxSink (heartbeat, please-die)
//!  timer: recv_timeout(next tick) ── Tick ─────────────┘   watchdog (WATCHDOG=1 per tick)
//! ```
//!
//! The loop never blocks on I/O: long steps run off the loop thread and report back through a
//! [`StepDone`]. Completions go to a side queue that the loop drains after every input, so a
//! step completed inline inside [`HaExecutor::begin`] cannot deadlock on a full channel (at most
//! one step runs at a time, so that queue is bounded by construction).
//!
//! Every `Action` is executed in order; each `Begin` gets a sequence number and a completion is
//! applied only if it belongs to the latest `Begin` of the step the state machine still runs
//! (a retried or abandoned attempt reporting late is dropped).

use crate::core::control::{procedure_view, AggregateHome, HaSnapshot, OpRequest, Outcome};
use crate::core::mailbox::slot_index;
use crate::core::takeover::{
    self, AckMode, Action, Alarm, Event, MailboxView, Message, Node, NodeId, OperatorCmd,
    ProcedureReport, Refusal, RequestKind, State, Step, StepError,
};
use crate::io::sdnotify::Notifier;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Default capacity of the input channel.
pub const INPUT_CAPACITY: usize = 1024;
/// Capacity of one watcher's queue; a watcher that falls this far behind is dropped.
pub const WATCH_CAPACITY: usize = 64;
/// Upper bound on watchers (each is a control connection).
pub const MAX_WATCHERS: usize = 32;
/// Upper bound on operator commands waiting for completion.
pub const MAX_PENDING_OPS: usize = 16;
/// Upper bound on the partner's messages waiting for the loop, besides the latest one of each
/// kind the partner re-sends periodically (see [`HaHandle::partner_message`]).
pub const PARTNER_CAPACITY: usize = 64;

/// What the node must do for the HA loop. Implemented by the node (the lead's side) and, for
/// tests, by [`crate::daemon::ha_testing::RecordingExecutor`].
///
/// All methods are called on the loop thread, in the order the state machine emitted the
/// actions, and must return quickly: anything that touches a disk, waits for the network or
/// for clients belongs in a step, run elsewhere, completed through its [`StepDone`].
pub trait HaExecutor: Send {
    /// Send `msg` to the partner over the interconnect. Best effort and non-blocking: queue it
    /// (bounded) or drop it when the link is down; the state machine re-sends what matters.
    fn send(&mut self, msg: Message);

    /// Start `step` (see [`Step`] for what each must do) and complete it exactly once through
    /// `done`: [`StepDone::done`], [`StepDone::failed`] (a `ReservationConflict` when our own
    /// key is gone: it halts us), or for `RecheckMailbox` [`StepDone::mailbox_checked`].
    /// Dropping `done` unfinished reports a failure. Completing inline is allowed.
    ///
    /// Effects must be idempotent: a failed step is begun again after `step_retry_ms`. A step
    /// whose effect lands after a [`HaExecutor::halt_self`] must not take effect (check
    /// [`StepDone::is_current`] before an irreversible part, e.g. adding an IP).
    /// Mailbox parts: `Fence` first writes please-die through
    /// [`crate::daemon::mailbox::MailboxHandle::write_please_die_now`] (a failure fails the
    /// fence), then preempts the partner's key; `ReleaseFence` clears it likewise;
    /// `RecheckMailbox` and `MarkCleanShutdown` can use `MailboxHandle::run_step`.
    fn begin(&mut self, step: Step, done: StepDone);

    /// Stop serving everything *now*, synchronously, before returning: close client
    /// connections without answering, stop writing both aggregates, drop service IPs, abandon
    /// running steps. Cannot fail, and does not end the process: the node stays up in
    /// `TakenOver`, where a giveback can reach it (hapaird's executor waits a bounded time for
    /// the aggregates to stop; a loop stuck longer is killed by the systemd watchdog).
    fn halt_self(&mut self);

    /// From now on acknowledge writes per `mode` (`LocalOnly` only while the partner is
    /// fenced). Must take effect before the next write is acknowledged.
    fn set_ack_mode(&mut self, mode: AckMode);

    /// An alarm for the operator (already logged and kept in status): e.g. mail, SNMP, LED.
    fn alarm(&mut self, alarm: &Alarm) {
        let _ = alarm;
    }

    /// A refusal (already logged, kept in status and reported to a waiting operator).
    fn refusal(&mut self, refusal: &Refusal) {
        let _ = refusal;
    }
}

/// Where the loop sends mailbox actions: the mailbox driver
/// ([`crate::daemon::mailbox::MailboxHandle`]). Non-blocking.
pub trait MailboxSink: Send {
    /// Our heartbeat: write this into our slot at the next opportunity.
    fn beat(&mut self, counter: u64, state: State, clean_shutdown: bool);
    /// Set or clear please-die for the partner in our slot (epoch of our takeover).
    fn set_partner_please_die(&mut self, on: bool, epoch: u64);
    /// `Some(why)` when we must fence ourselves: our slot has not reached a majority of
    /// members for longer than the bound. Checked on every tick.
    fn self_fence_reason(&self) -> Option<String>;
}

/// How a step ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepOutcome {
    Done,
    Failed(StepError),
    /// `RecheckMailbox` only: done, and whether please-die is set for us.
    MailboxChecked {
        please_die: bool,
    },
}

struct Completions {
    queue: Mutex<VecDeque<(Step, u64, StepOutcome)>>,
    wake: SyncSender<Input>,
    current: Mutex<Option<(Step, u64)>>,
}

/// Completion handle of one begun step. Send it wherever the step runs.
pub struct StepDone {
    step: Step,
    seq: u64,
    sink: Option<Arc<Completions>>,
}

impl StepDone {
    /// The step this completes.
    pub fn step(&self) -> Step {
        self.step
    }

    /// Whether the loop still waits for this attempt (false after a halt or a newer attempt).
    pub fn is_current(&self) -> bool {
        self.sink
            .as_ref()
            .is_some_and(|s| *s.current.lock().unwrap() == Some((self.step, self.seq)))
    }

    /// The step succeeded.
    pub fn done(self) {
        self.finish(StepOutcome::Done)
    }

    /// The step failed.
    pub fn failed(self, error: StepError) {
        self.finish(StepOutcome::Failed(error))
    }

    /// `RecheckMailbox`: the mailbox was read; `please_die` set for us or not.
    pub fn mailbox_checked(self, please_die: bool) {
        self.finish(StepOutcome::MailboxChecked { please_die })
    }

    /// Report `outcome`.
    pub fn finish(mut self, outcome: StepOutcome) {
        self.report(outcome);
    }

    fn report(&mut self, outcome: StepOutcome) {
        if let Some(sink) = self.sink.take() {
            sink.queue
                .lock()
                .unwrap()
                .push_back((self.step, self.seq, outcome));
            // If the channel is full the loop is busy and drains the queue anyway.
            let _ = sink.wake.try_send(Input::Wake);
        }
    }
}

impl Drop for StepDone {
    fn drop(&mut self) {
        if self.sink.is_some() {
            tracing::error!(step = ?self.step, "step completion handle dropped unfinished");
            self.report(StepOutcome::Failed(StepError::Failed(
                "step abandoned: completion handle dropped".into(),
            )));
        }
    }
}

/// Options of an operator command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpOptions {
    /// Only run the checks.
    pub check_only: bool,
    /// Reply when done (true) or when started (false).
    pub wait: bool,
    /// Longest wait for completion.
    pub timeout: Duration,
}

/// The reply to an operator command.
#[derive(Debug, Clone)]
pub struct OpReply {
    pub outcome: Outcome,
    pub snapshot: HaSnapshot,
}

/// The answer to an alarm acknowledgement.
#[derive(Debug, Clone)]
pub struct AckReply {
    /// Acknowledged by this request.
    pub acknowledged: Vec<u64>,
    /// Named, and acknowledged before.
    pub already: Vec<u64>,
    pub snapshot: HaSnapshot,
}

/// An acknowledgement naming ids the history does not hold: nothing was acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no alarm {} on {node} (its alarms: {})", list(unknown), if known.is_empty() { "none".to_string() } else { list(known) })]
pub struct UnknownAlarms {
    pub node: String,
    pub unknown: Vec<u64>,
    pub known: Vec<u64>,
}

fn list(ids: &[u64]) -> String {
    ids.iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Inputs of the loop. Use [`HaHandle`] to send them.
pub enum Input {
    /// A message from the partner.
    Message(Message),
    /// A periodic mailbox read (`None`: no majority readable).
    MailboxRead(Option<MailboxView>),
    /// An operator command.
    Operator {
        req: OpRequest,
        opts: OpOptions,
        reply: Sender<OpReply>,
    },
    /// A status snapshot.
    Status { reply: Sender<HaSnapshot> },
    /// Acknowledge these alarms (None: every unacknowledged one).
    AckAlarms {
        ids: Option<Vec<u64>>,
        reply: Sender<Result<AckReply, UnknownAlarms>>,
    },
    /// Subscribe to snapshots on every change (the current one first).
    Watch { tx: SyncSender<HaSnapshot> },
    /// Our health.
    Health { healthy: bool, detail: String },
    /// Whether every write we acknowledged is in the partner's mirror.
    OwnMirror { in_sync: bool },
    /// How many of the partner's disks we see.
    PartnerDisks { visible: u32, expected: u32 },
    /// A write to our aggregate hit a reservation conflict.
    FencedOut,
    /// Step completions are waiting in the side queue.
    Wake,
    /// Stop the loop.
    Stop,
}

/// Errors calling into the loop.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HaCallError {
    #[error("the HA loop is busy (input queue full)")]
    Busy,
    #[error("the HA loop is not running")]
    Closed,
    #[error("the HA loop did not answer within {0:?}")]
    Timeout(Duration),
}

/// Errors starting the loop.
#[derive(Debug, thiserror::Error)]
pub enum HaError {
    #[error(transparent)]
    Config(#[from] takeover::TakeoverError),
    #[error("node name {0:?} must be 1..=31 bytes and differ from the partner's")]
    Names(String),
    #[error(transparent)]
    Mailbox(#[from] crate::daemon::mailbox::MailboxError),
    #[error("cannot start the HA loop thread: {0}")]
    Thread(std::io::Error),
}

/// Sends inputs to the loop. Cheap to clone.
#[derive(Clone)]
pub struct HaHandle {
    tx: SyncSender<Input>,
    closed: Arc<AtomicBool>,
    partner: Arc<PartnerQueue>,
}

/// The receiving side, handed to [`HaLoop::spawn`].
pub struct HaInbox {
    rx: Receiver<Input>,
    tx: SyncSender<Input>,
    closed: Arc<AtomicBool>,
    partner: Arc<PartnerQueue>,
}

/// The partner's messages on their way to the loop, beside the input channel: the link's
/// reader, which also applies the partner's mirror traffic and acknowledges it, must never
/// wait for a busy loop (it used to block on a full channel, and the partner's writes
/// stalled meanwhile). Order is kept, except that a message the partner re-sends
/// periodically replaces a queued one of its kind (see [`periodic`]).
#[derive(Default)]
struct PartnerQueue {
    msgs: Mutex<VecDeque<Message>>,
    /// Messages dropped because [`PARTNER_CAPACITY`] others were waiting.
    dropped: std::sync::atomic::AtomicU64,
}

/// The kind of a message the partner's state machine sends again and again while it
/// matters (on every heartbeat or please-die interval): the newest says all that a queued
/// older one does, and the receiver ignores duplicates.
fn periodic(m: &Message) -> Option<u8> {
    match m {
        Message::Heartbeat { .. } => Some(0),
        Message::PleaseShutdown { .. } => Some(1),
        Message::PleaseDie { .. } => Some(2),
        Message::Giveback { .. } => Some(3),
        _ => None,
    }
}

/// A bounded input channel for one loop.
pub fn channel(capacity: usize) -> (HaHandle, HaInbox) {
    let (tx, rx) = mpsc::sync_channel(capacity);
    let closed = Arc::new(AtomicBool::new(false));
    let partner = Arc::new(PartnerQueue::default());
    (
        HaHandle {
            tx: tx.clone(),
            closed: closed.clone(),
            partner: partner.clone(),
        },
        HaInbox {
            rx,
            tx,
            closed,
            partner,
        },
    )
}

impl HaHandle {
    fn send(&self, input: Input) -> Result<(), HaCallError> {
        if self.is_closed() {
            return Err(HaCallError::Closed);
        }
        self.tx.send(input).map_err(|_| HaCallError::Closed)
    }

    fn try_send(&self, input: Input) -> Result<(), HaCallError> {
        if self.is_closed() {
            return Err(HaCallError::Closed);
        }
        match self.tx.try_send(input) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(HaCallError::Busy),
            Err(TrySendError::Disconnected(_)) => Err(HaCallError::Closed),
        }
    }

    /// Whether the loop has stopped.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// A message from the partner (blocks while the queue is full). For callers that may
    /// wait; the interconnect uses [`HaHandle::partner_message`].
    pub fn message(&self, m: Message) -> Result<(), HaCallError> {
        self.send(Input::Message(m))
    }

    /// A message from the partner over the interconnect; never blocks. A message the partner
    /// re-sends periodically (heartbeat, please-shutdown, please-die, giveback) replaces a
    /// queued one of its kind. Any other waits in order; with [`PARTNER_CAPACITY`] of them
    /// waiting (the loop stuck through dozens of the partner's procedures) it is dropped
    /// with an error (`Busy`), which the caller logs: the partner's state machine times out
    /// an unanswered request, and fences before it takes over.
    pub fn partner_message(&self, m: Message) -> Result<(), HaCallError> {
        if self.is_closed() {
            return Err(HaCallError::Closed);
        }
        {
            let mut q = self.partner.msgs.lock().unwrap();
            match periodic(&m) {
                Some(k) => q.retain(|o| periodic(o) != Some(k)),
                None => {
                    let once = q.iter().filter(|o| periodic(o).is_none()).count();
                    if once >= PARTNER_CAPACITY {
                        self.partner.dropped.fetch_add(1, Ordering::Relaxed);
                        return Err(HaCallError::Busy);
                    }
                }
            }
            q.push_back(m);
        }
        // A full channel means the loop is busy: it drains this queue after every input.
        match self.tx.try_send(Input::Wake) {
            Ok(()) | Err(TrySendError::Full(_)) => Ok(()),
            Err(TrySendError::Disconnected(_)) => Err(HaCallError::Closed),
        }
    }

    /// The partner's messages dropped so far (see [`HaHandle::partner_message`]).
    pub fn partner_messages_dropped(&self) -> u64 {
        self.partner.dropped.load(Ordering::Relaxed)
    }

    /// A mailbox read; dropped (false) when the queue is full.
    pub fn try_mailbox_read(&self, view: Option<MailboxView>) -> bool {
        self.try_send(Input::MailboxRead(view)).is_ok()
    }

    /// Our health changed.
    pub fn health(&self, healthy: bool, detail: &str) -> Result<(), HaCallError> {
        self.send(Input::Health {
            healthy,
            detail: detail.to_string(),
        })
    }

    /// Every acknowledged write is (or is not) in the partner's mirror.
    pub fn own_mirror(&self, in_sync: bool) -> Result<(), HaCallError> {
        self.send(Input::OwnMirror { in_sync })
    }

    /// Disk discovery result.
    pub fn partner_disks(&self, visible: u32, expected: u32) -> Result<(), HaCallError> {
        self.send(Input::PartnerDisks { visible, expected })
    }

    /// A reservation conflict on our own aggregate.
    pub fn fenced_out(&self) -> Result<(), HaCallError> {
        self.send(Input::FencedOut)
    }

    /// Run an operator command; waits for its reply (at most `opts.timeout` plus a margin).
    pub fn operator(&self, req: OpRequest, opts: OpOptions) -> Result<OpReply, HaCallError> {
        let (reply, rx) = mpsc::channel();
        self.try_send(Input::Operator { req, opts, reply })?;
        let limit = opts.timeout + Duration::from_secs(5);
        rx.recv_timeout(limit).map_err(|e| match e {
            RecvTimeoutError::Timeout => HaCallError::Timeout(limit),
            RecvTimeoutError::Disconnected => HaCallError::Closed,
        })
    }

    /// Acknowledge alarms `ids` (None: all). Unknown ids acknowledge nothing.
    pub fn ack_alarms(
        &self,
        ids: Option<Vec<u64>>,
    ) -> Result<Result<AckReply, UnknownAlarms>, HaCallError> {
        let (reply, rx) = mpsc::channel();
        self.try_send(Input::AckAlarms { ids, reply })?;
        let limit = Duration::from_secs(5);
        rx.recv_timeout(limit).map_err(|e| match e {
            RecvTimeoutError::Timeout => HaCallError::Timeout(limit),
            RecvTimeoutError::Disconnected => HaCallError::Closed,
        })
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Result<HaSnapshot, HaCallError> {
        let (reply, rx) = mpsc::channel();
        self.try_send(Input::Status { reply })?;
        let limit = Duration::from_secs(5);
        rx.recv_timeout(limit).map_err(|e| match e {
            RecvTimeoutError::Timeout => HaCallError::Timeout(limit),
            RecvTimeoutError::Disconnected => HaCallError::Closed,
        })
    }

    /// Snapshots on every change, the current one first. The receiver disconnects when the
    /// loop stops or when the watcher falls [`WATCH_CAPACITY`] behind.
    pub fn watch(&self) -> Result<Receiver<HaSnapshot>, HaCallError> {
        let (tx, rx) = mpsc::sync_channel(WATCH_CAPACITY);
        self.try_send(Input::Watch { tx })?;
        Ok(rx)
    }

    /// Stop the loop (it finishes the input at hand; running steps are abandoned).
    pub fn stop(&self) {
        let _ = self.tx.send(Input::Stop);
    }
}

/// Settings of the loop.
#[derive(Debug, Clone)]
pub struct HaConfig {
    pub takeover: takeover::Config,
    pub node_name: String,
    pub partner_name: String,
    /// Tick period; at most half the heartbeat interval.
    pub tick: Duration,
    /// Aggregates and their homes, for status.
    pub aggregates: Vec<AggregateHome>,
    /// The mailbox self-fence bound (checked against `mailbox_timeout_ms`).
    pub self_fence_bound_ms: u64,
}

impl HaConfig {
    /// A config for `node` paired with `partner`; the node ids follow the mailbox slot order
    /// (the name that sorts first is `A`).
    pub fn new(node_name: &str, partner_name: &str) -> Result<HaConfig, HaError> {
        for n in [node_name, partner_name] {
            if n.is_empty() || n.len() > 31 || node_name == partner_name {
                return Err(HaError::Names(n.to_string()));
            }
        }
        let id = node_id(node_name, partner_name);
        let takeover = takeover::Config::new(id);
        let tick =
            Duration::from_millis(takeover.heartbeat_interval_ms / 4).max(Duration::from_millis(1));
        let self_fence_bound_ms = takeover.mailbox_timeout_ms / 2;
        Ok(HaConfig {
            takeover,
            node_name: node_name.to_string(),
            partner_name: partner_name.to_string(),
            tick,
            aggregates: Vec::new(),
            self_fence_bound_ms,
        })
    }
}

/// The node id of `node` in the pair (its mailbox slot index: 0 = `A`).
pub fn node_id(node: &str, partner: &str) -> NodeId {
    if slot_index(node, partner) == 0 {
        NodeId::A
    } else {
        NodeId::B
    }
}

/// The loop.
pub struct HaLoop {
    cfg: HaConfig,
    node: Node,
    origin: Instant,
    origin_unix_ms: u64,
    inbox: HaInbox,
    exec: Box<dyn HaExecutor>,
    mailbox: Box<dyn MailboxSink>,
    completions: Arc<Completions>,
    seq: u64,
    pending: Vec<PendingOp>,
    watchers: Vec<SyncSender<HaSnapshot>>,
    last_key: Option<WatchKey>,
    watchdog: Option<(Notifier, Duration, Instant)>,
    self_fence_logged: bool,
}

struct PendingOp {
    req: OpRequest,
    wait: bool,
    deadline: Instant,
    reply: Sender<OpReply>,
    accepted: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct WatchKey {
    state: State,
    partner_state: Option<State>,
    partner_reachable: bool,
    mirror_current: bool,
    mailbox_access: bool,
    ack_mode: AckMode,
    running: Option<(Step, usize, u32)>,
    refusal: Option<(u64, RequestKind)>,
    alarm: Option<(u64, u32)>,
    alarms: usize,
    open_alarms: usize,
    acked_alarms: usize,
    last_takeover: Option<(u64, Option<u64>)>,
    last_giveback: Option<(u64, Option<u64>)>,
    serves: (bool, bool),
    countdown: bool,
    auto_giveback: bool,
}

enum Progress {
    Waiting,
    Accepted,
    Completed(Option<ProcedureReport>),
    Failed(String),
}

impl HaLoop {
    /// Start the loop thread. `watchdog`: the systemd notifier and the `WATCHDOG=1` interval.
    pub fn spawn(
        cfg: HaConfig,
        inbox: HaInbox,
        exec: Box<dyn HaExecutor>,
        mailbox: Box<dyn MailboxSink>,
        watchdog: Option<(Notifier, Duration)>,
    ) -> Result<JoinHandle<()>, HaError> {
        cfg.takeover.validate()?;
        crate::daemon::mailbox::check_bound(
            cfg.self_fence_bound_ms,
            cfg.takeover.mailbox_timeout_ms,
        )?;
        if cfg.takeover.node != node_id(&cfg.node_name, &cfg.partner_name) {
            return Err(HaError::Names(cfg.node_name.clone()));
        }
        let mut node = Node::new(cfg.takeover.clone(), 0)?;
        let origin_unix_ms = crate::io::clock::unix_ms();
        node.set_epoch_origin(origin_unix_ms);
        let completions = Arc::new(Completions {
            queue: Mutex::new(VecDeque::new()),
            wake: inbox.tx.clone(),
            current: Mutex::new(None),
        });
        let name = format!("ha-{}", cfg.node_name);
        let mut l = HaLoop {
            cfg,
            node,
            origin: Instant::now(),
            origin_unix_ms,
            inbox,
            exec,
            mailbox,
            completions,
            seq: 0,
            pending: Vec::new(),
            watchers: Vec::new(),
            last_key: None,
            watchdog: watchdog.map(|(n, d)| (n, d, Instant::now())),
            self_fence_logged: false,
        };
        std::thread::Builder::new()
            .name(name)
            .spawn(move || l.run())
            .map_err(HaError::Thread)
    }

    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    fn run(&mut self) {
        tracing::info!(node = %self.cfg.node_name, partner = %self.cfg.partner_name, id = ?self.cfg.takeover.node, "HA loop started");
        let mut next_tick = Instant::now();
        loop {
            let now = Instant::now();
            match self
                .inbox
                .rx
                .recv_timeout(next_tick.saturating_duration_since(now))
            {
                Ok(Input::Stop) => break,
                Ok(input) => self.handle(input),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            self.drain_partner();
            self.drain_completions();
            let now = Instant::now();
            if now >= next_tick {
                self.tick();
                self.drain_completions();
                next_tick += self.cfg.tick;
                if next_tick < now {
                    next_tick = now + self.cfg.tick;
                }
            }
            self.publish();
        }
        self.inbox.closed.store(true, Ordering::SeqCst);
        *self.completions.current.lock().unwrap() = None;
        tracing::info!(node = %self.cfg.node_name, state = ?self.node.state(), "HA loop stopped");
        // Pending operators and watchers see their channels close.
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Message(m) => {
                let a = self.feed(Event::Message(m));
                self.settle(&a);
            }
            Input::MailboxRead(v) => {
                let a = self.feed(Event::MailboxRead(v));
                self.settle(&a);
            }
            Input::Operator { req, opts, reply } => self.operator(req, opts, reply),
            Input::Status { reply } => {
                let _ = reply.send(self.snapshot());
            }
            Input::AckAlarms { ids, reply } => {
                let r = self.ack_alarms(ids);
                let _ = reply.send(r);
            }
            Input::Watch { tx } => {
                if self.watchers.len() >= MAX_WATCHERS {
                    tracing::warn!("too many watchers; refusing one");
                    return; // dropping tx disconnects the watcher
                }
                if tx.try_send(self.snapshot()).is_ok() {
                    self.watchers.push(tx);
                }
            }
            Input::Health { healthy, detail } => {
                let a = self.feed(Event::Health { healthy, detail });
                self.settle(&a);
            }
            Input::OwnMirror { in_sync } => {
                let a = self.feed(Event::OwnMirror { in_sync });
                self.settle(&a);
            }
            Input::PartnerDisks { visible, expected } => {
                let a = self.feed(Event::PartnerDisks { visible, expected });
                self.settle(&a);
            }
            Input::FencedOut => {
                let a = self.feed(Event::FencedOut);
                self.settle(&a);
            }
            Input::Wake | Input::Stop => {}
        }
    }

    fn tick(&mut self) {
        let a = self.feed(Event::Tick);
        self.settle(&a);
        match self.mailbox.self_fence_reason() {
            Some(reason) => {
                if !matches!(self.node.state(), State::Booting | State::TakenOver) {
                    tracing::error!(node = %self.cfg.node_name, "self-fencing: {reason}");
                    let a = self.feed(Event::SelfFenced { reason });
                    self.settle(&a);
                } else if !self.self_fence_logged {
                    tracing::error!(node = %self.cfg.node_name, state = ?self.node.state(), "mailbox not writable to a majority (not serving): {reason}");
                }
                self.self_fence_logged = true;
            }
            None => self.self_fence_logged = false,
        }
        let now = Instant::now();
        let mut expired = Vec::new();
        for (i, p) in self.pending.iter().enumerate() {
            if now >= p.deadline {
                expired.push(i);
            }
        }
        for i in expired.into_iter().rev() {
            let p = self.pending.remove(i);
            let outcome = Outcome::TimedOut {
                state: self.node.state(),
                detail: self.progress(p.req),
            };
            let _ = p.reply.send(OpReply {
                outcome,
                snapshot: self.snapshot(),
            });
        }
        if let Some((n, every, last)) = self.watchdog.as_mut() {
            if now.duration_since(*last) >= *every {
                *last = now;
                if let Err(e) = n.watchdog() {
                    tracing::warn!("watchdog notify: {e}");
                }
            }
        }
    }

    /// Step the state machine and execute its actions.
    fn feed(&mut self, ev: Event) -> Vec<Action> {
        let now = self.now_ms();
        let actions = self.node.step(now, ev);
        for a in &actions {
            self.execute(a.clone());
        }
        actions
    }

    fn execute(&mut self, a: Action) {
        match a {
            Action::Send(m) => self.exec.send(m),
            Action::WriteMailbox {
                counter,
                state,
                clean_shutdown,
            } => self.mailbox.beat(counter, state, clean_shutdown),
            Action::SetPartnerPleaseDie(on) => {
                let epoch = self.node.takeover_epoch();
                self.mailbox.set_partner_please_die(on, epoch)
            }
            Action::Begin(step) => {
                self.seq += 1;
                *self.completions.current.lock().unwrap() = Some((step, self.seq));
                let done = StepDone {
                    step,
                    seq: self.seq,
                    sink: Some(self.completions.clone()),
                };
                tracing::info!(node = %self.cfg.node_name, ?step, seq = self.seq, "step begins");
                self.exec.begin(step, done);
            }
            Action::HaltSelf => {
                *self.completions.current.lock().unwrap() = None;
                tracing::error!(node = %self.cfg.node_name, "halting: stop serving everything now");
                self.exec.halt_self();
            }
            Action::SetAckMode(m) => {
                tracing::info!(node = %self.cfg.node_name, mode = ?m, "ack mode");
                self.exec.set_ack_mode(m)
            }
            Action::Alarm(al) => self.exec.alarm(&al),
            Action::ReportRefusal(r) => self.exec.refusal(&r),
        }
    }

    /// Feed the partner's messages (see [`HaHandle::partner_message`]), in order.
    fn drain_partner(&mut self) {
        loop {
            let next = self.inbox.partner.msgs.lock().unwrap().pop_front();
            let Some(m) = next else { return };
            let a = self.feed(Event::Message(m));
            self.settle(&a);
            self.drain_completions();
        }
    }

    fn drain_completions(&mut self) {
        loop {
            let next = self.completions.queue.lock().unwrap().pop_front();
            let Some((step, seq, outcome)) = next else {
                return;
            };
            let current = *self.completions.current.lock().unwrap();
            if current != Some((step, seq)) || self.node.running_step() != Some(step) {
                tracing::info!(node = %self.cfg.node_name, ?step, seq, ?outcome, "late completion dropped");
                continue;
            }
            *self.completions.current.lock().unwrap() = None;
            let ev = match outcome {
                StepOutcome::Done => Event::StepDone(step),
                StepOutcome::Failed(error) => {
                    tracing::warn!(node = %self.cfg.node_name, ?step, ?error, "step failed");
                    Event::StepFailed { step, error }
                }
                StepOutcome::MailboxChecked { please_die } if step == Step::RecheckMailbox => {
                    Event::MailboxChecked { please_die }
                }
                StepOutcome::MailboxChecked { .. } => Event::StepDone(step),
            };
            let a = self.feed(ev);
            self.settle(&a);
        }
    }

    fn snapshot(&self) -> HaSnapshot {
        HaSnapshot {
            node_name: self.cfg.node_name.clone(),
            partner_name: self.cfg.partner_name.clone(),
            origin_unix_ms: self.origin_unix_ms,
            status: {
                let mut s = self.node.status();
                // Status `now` is the last step's time; show the present.
                s.now_ms = s.now_ms.max(self.now_ms());
                s
            },
            serves_own: self.node.accepts_own(),
            serves_partner: self.node.accepts_partner(),
            aggregates: self.cfg.aggregates.clone(),
            partner_timeout_ms: self.cfg.takeover.interconnect_timeout_ms,
        }
    }

    // ---- operator commands -------------------------------------------------------------

    fn ack_alarms(&mut self, ids: Option<Vec<u64>>) -> Result<AckReply, UnknownAlarms> {
        let history = self.node.status().alarms;
        let (acknowledged, already) = match ids {
            Some(mut ids) => {
                ids.sort_unstable();
                ids.dedup();
                let unknown = self.node.unknown_alarm_ids(&ids);
                if !unknown.is_empty() {
                    return Err(UnknownAlarms {
                        node: self.cfg.node_name.clone(),
                        unknown,
                        known: history.iter().map(|e| e.id).collect(),
                    });
                }
                let (already, now): (Vec<u64>, Vec<u64>) = ids
                    .into_iter()
                    .partition(|i| history.iter().any(|e| e.id == *i && e.acked_ms.is_some()));
                for id in &now {
                    let a = self.feed(Event::Operator(OperatorCmd::AckAlarm(Some(*id))));
                    self.settle(&a);
                }
                (now, already)
            }
            None => {
                let now: Vec<u64> = history
                    .iter()
                    .filter(|e| e.acked_ms.is_none())
                    .map(|e| e.id)
                    .collect();
                let a = self.feed(Event::Operator(OperatorCmd::AckAlarm(None)));
                self.settle(&a);
                (now, Vec::new())
            }
        };
        Ok(AckReply {
            acknowledged,
            already,
            snapshot: self.snapshot(),
        })
    }

    fn operator(&mut self, req: OpRequest, opts: OpOptions, reply: Sender<OpReply>) {
        let kind = request_kind(req);
        if opts.check_only {
            let reasons = match req {
                OpRequest::TakeoverSelf => self.node.takeover_self_refusals(),
                OpRequest::TakeoverPartner { .. } => self.node.takeover_refusals(true, true),
                OpRequest::Giveback => Vec::new(),
            };
            let outcome = if reasons.is_empty() {
                Outcome::CheckPassed {
                    note: match req {
                        OpRequest::TakeoverSelf => {
                            "nothing here refuses it; the partner runs its own checks when asked"
                                .into()
                        }
                        OpRequest::TakeoverPartner { .. } => "all takeover checks pass".into(),
                        OpRequest::Giveback => "giveback checks run when it is asked".into(),
                    },
                }
            } else {
                let at_ms = self.now_ms();
                Outcome::Refused {
                    refusal: Refusal {
                        at_ms,
                        request: kind,
                        reasons,
                    },
                    refusal_at_unix_ms: self.origin_unix_ms + at_ms,
                    text: Vec::new(),
                }
            };
            let _ = reply.send(OpReply {
                outcome,
                snapshot: self.snapshot(),
            });
            return;
        }
        if self.pending.len() >= MAX_PENDING_OPS {
            let at_ms = self.now_ms();
            let _ = reply.send(OpReply {
                outcome: Outcome::Refused {
                    refusal: Refusal {
                        at_ms,
                        request: kind,
                        reasons: vec![takeover::RefusalReason::TakeoverInProgress],
                    },
                    refusal_at_unix_ms: self.origin_unix_ms + at_ms,
                    text: Vec::new(),
                },
                snapshot: self.snapshot(),
            });
            return;
        }
        let cmd = match req {
            OpRequest::TakeoverSelf => OperatorCmd::TakeoverSelf,
            OpRequest::TakeoverPartner {
                countdown_ms,
                immediate,
            } => OperatorCmd::TakeoverOfWith {
                node: self.cfg.takeover.node.partner(),
                countdown_ms,
                immediate,
            },
            OpRequest::Giveback => OperatorCmd::Giveback,
        };
        let actions = self.feed(Event::Operator(cmd));
        // Older pending commands see this step's effects too, except its own refusal.
        let mut op = PendingOp {
            req,
            wait: opts.wait,
            deadline: Instant::now() + opts.timeout,
            reply,
            accepted: false,
        };
        let own_refusal = actions.iter().find_map(|a| match a {
            Action::ReportRefusal(r) if r.request == kind => Some(r.clone()),
            _ => None,
        });
        let others: Vec<Action> = actions
            .iter()
            .filter(|a| !matches!(a, Action::ReportRefusal(r) if r.request == kind))
            .cloned()
            .collect();
        self.settle(&others);
        if let Some(r) = own_refusal {
            self.answer(op, refused(r, self.origin_unix_ms));
            return;
        }
        if !self.advance_op(&mut op, &[]) {
            self.pending.push(op);
        }
    }

    /// Re-evaluate pending commands after a step produced `actions`.
    fn settle(&mut self, actions: &[Action]) {
        if self.pending.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut self.pending);
        for mut op in pending {
            if !self.advance_op(&mut op, actions) {
                self.pending.push(op);
            }
        }
    }

    /// True when `op` was answered.
    fn advance_op(&mut self, op: &mut PendingOp, actions: &[Action]) -> bool {
        let kind = request_kind(op.req);
        if let Some(r) = actions.iter().find_map(|a| match a {
            Action::ReportRefusal(r) if r.request == kind => Some(r.clone()),
            _ => None,
        }) {
            let o = refused(r, self.origin_unix_ms);
            self.answer_ref(op, o);
            return true;
        }
        let state = self.node.state();
        let st = self.node.status();
        let reason = || {
            st.transitions.last().map_or(String::new(), |t| {
                format!("{:?} -> {:?}: {}", t.from, t.to, t.reason)
            })
        };
        let partner_reachable = st.partner_last_heard_ms.is_some_and(|t| {
            self.now_ms().saturating_sub(t) < self.cfg.takeover.interconnect_timeout_ms
        });
        let partner_is = |s: State| partner_reachable && st.partner_state == Some(s);
        let progress = match (op.req, state) {
            (OpRequest::TakeoverSelf, State::TakeoverRequested) => Progress::Waiting,
            (OpRequest::TakeoverSelf, State::ShuttingDown) => Progress::Accepted,
            // Down here is half of it: done once the partner serves our aggregate (it may
            // still refuse: that arrives as a refusal, above). The report is our shutdown's.
            (OpRequest::TakeoverSelf, State::TakenOver) if partner_is(State::InTakeover) => {
                Progress::Completed(st.last_shutdown.clone())
            }
            (OpRequest::TakeoverSelf, State::TakenOver) => Progress::Accepted,
            (OpRequest::TakeoverPartner { .. }, State::AwaitingShutdown | State::TakingOver) => {
                Progress::Accepted
            }
            (OpRequest::TakeoverPartner { .. }, State::InTakeover) => {
                Progress::Completed(st.last_takeover.clone())
            }
            (OpRequest::Giveback, State::GivingBack) => Progress::Accepted,
            // The state machine is Normal once the partner confirmed it resumes; the operator
            // hears "done" once it serves again (its heartbeat says Normal after `Resumed`).
            (OpRequest::Giveback, State::Normal) if partner_is(State::Normal) => {
                Progress::Completed(st.last_giveback.clone())
            }
            (OpRequest::Giveback, State::Normal) => Progress::Accepted,
            _ => Progress::Failed(reason()),
        };
        let outcome = match progress {
            Progress::Waiting => return false,
            Progress::Accepted if op.wait => {
                op.accepted = true;
                return false;
            }
            Progress::Accepted => Outcome::Accepted { state },
            Progress::Completed(report) => Outcome::Completed {
                state,
                report: report.map(|r| procedure_view(&r, &self.snapshot())),
            },
            Progress::Failed(detail) => Outcome::Failed { state, detail },
        };
        self.answer_ref(op, outcome);
        true
    }

    /// Where a pending command stands, for a reply that ends the wait before it completed.
    fn progress(&self, req: OpRequest) -> String {
        let st = self.node.status();
        let now = self.now_ms();
        let partner = &self.cfg.partner_name;
        let heard = match st.partner_last_heard_ms {
            Some(t) if now.saturating_sub(t) < self.cfg.takeover.interconnect_timeout_ms => {
                format!("{partner} is {:?}", st.partner_state)
            }
            Some(t) => format!(
                "{partner} not heard for {} ms (last state {:?})",
                now.saturating_sub(t),
                st.partner_state
            ),
            None => format!("{partner} never heard"),
        };
        if let Some(c) = st.running.as_ref().and_then(|p| p.current.as_ref()) {
            let mut d = format!(
                "in step {:?} for {} ms",
                c.step,
                now.saturating_sub(c.started_ms)
            );
            if c.failures > 0 {
                d += &format!(", {} failed attempts", c.failures);
            }
            if let Some(e) = &c.last_error {
                d += &format!(", last error: {}", crate::core::control::step_error_text(e));
            }
            return format!("{d}; {heard}");
        }
        let waiting = match (req, st.state) {
            (OpRequest::TakeoverSelf, State::TakenOver) => {
                format!("shut down; waiting for {partner} to serve this node's aggregates")
            }
            (OpRequest::TakeoverSelf, _) => format!("waiting for {partner} to answer"),
            (OpRequest::TakeoverPartner { .. }, State::AwaitingShutdown) => {
                format!("waiting for {partner} to shut down (countdown)")
            }
            (OpRequest::Giveback, State::GivingBack | State::Normal) => {
                format!("given back; waiting for {partner} to serve again")
            }
            _ => "waiting".to_string(),
        };
        format!("{waiting}; {heard}")
    }

    fn answer(&mut self, op: PendingOp, outcome: Outcome) {
        let mut op = op;
        self.answer_ref(&mut op, outcome);
    }

    fn answer_ref(&mut self, op: &mut PendingOp, outcome: Outcome) {
        tracing::info!(node = %self.cfg.node_name, req = ?op.req, ?outcome, "operator command answered");
        let _ = op.reply.send(OpReply {
            outcome,
            snapshot: self.snapshot(),
        });
    }

    // ---- watch -------------------------------------------------------------------------

    fn key(&self) -> WatchKey {
        let st = self.node.status();
        let now = self.now_ms();
        WatchKey {
            state: st.state,
            partner_state: st.partner_state,
            partner_reachable: st
                .partner_last_heard_ms
                .is_some_and(|t| now.saturating_sub(t) < self.cfg.takeover.interconnect_timeout_ms),
            mirror_current: st.mirror_current,
            mailbox_access: st.mailbox_access,
            ack_mode: st.ack_mode,
            running: st.running.as_ref().map(|p| {
                (
                    self.node.running_step().unwrap_or(Step::Fence),
                    p.phases.len(),
                    p.current.as_ref().map_or(0, |c| c.failures),
                )
            }),
            refusal: st.refusals.last().map(|r| (r.at_ms, r.request)),
            alarm: st.alarms.last().map(|e| (e.last_ms, e.count)),
            alarms: st.alarms.len(),
            open_alarms: st.open_alarms.len(),
            acked_alarms: st.alarms.iter().filter(|e| e.acked_ms.is_some()).count(),
            last_takeover: st
                .last_takeover
                .as_ref()
                .map(|p| (p.started_ms, p.finished_ms)),
            last_giveback: st
                .last_giveback
                .as_ref()
                .map(|p| (p.started_ms, p.finished_ms)),
            serves: (self.node.accepts_own(), self.node.accepts_partner()),
            countdown: st.countdown_remaining_ms.is_some(),
            auto_giveback: st.auto_giveback,
        }
    }

    fn publish(&mut self) {
        if self.watchers.is_empty() {
            self.last_key = None;
            return;
        }
        let key = self.key();
        if self.last_key.as_ref() == Some(&key) {
            return;
        }
        self.last_key = Some(key);
        let snap = self.snapshot();
        self.watchers.retain(|w| match w.try_send(snap.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                tracing::warn!("watcher fell behind; dropped");
                false
            }
            Err(TrySendError::Disconnected(_)) => false,
        });
    }
}

fn request_kind(req: OpRequest) -> RequestKind {
    match req {
        OpRequest::TakeoverSelf => RequestKind::TakeoverOfSelf,
        OpRequest::TakeoverPartner { .. } => RequestKind::TakeoverOfPartner,
        OpRequest::Giveback => RequestKind::Giveback,
    }
}

fn refused(r: Refusal, origin_unix_ms: u64) -> Outcome {
    Outcome::Refused {
        refusal_at_unix_ms: origin_unix_ms + r.at_ms,
        refusal: r,
        text: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(inbox: &HaInbox) -> Vec<Message> {
        inbox.partner.msgs.lock().unwrap().iter().cloned().collect()
    }

    fn heartbeat(state: State) -> Message {
        Message::Heartbeat {
            state,
            protocol_version: 1,
            mirror_in_sync: true,
        }
    }

    /// The partner's messages never wait for a full input queue; the periodic ones replace a
    /// queued one of their kind, the others keep their order, and past the bound they are
    /// dropped and counted (not silently, and not by blocking the link).
    #[test]
    fn partner_messages_never_block_and_are_bounded() {
        let (h, inbox) = channel(1);
        assert!(h.try_mailbox_read(None));
        assert!(!h.try_mailbox_read(None), "the input queue is full");
        h.partner_message(heartbeat(State::Booting)).unwrap();
        h.partner_message(Message::PleaseTakeover).unwrap();
        h.partner_message(Message::PleaseDie { epoch: 1 }).unwrap();
        h.partner_message(heartbeat(State::Normal)).unwrap();
        h.partner_message(Message::PleaseDie { epoch: 2 }).unwrap();
        assert_eq!(
            queued(&inbox),
            vec![
                Message::PleaseTakeover,
                heartbeat(State::Normal),
                Message::PleaseDie { epoch: 2 },
            ]
        );
        for _ in 1..PARTNER_CAPACITY {
            h.partner_message(Message::Resumed).unwrap();
        }
        assert_eq!(
            h.partner_message(Message::Takeover),
            Err(HaCallError::Busy),
            "past the bound"
        );
        assert_eq!(h.partner_messages_dropped(), 1);
        // Periodic ones still replace theirs.
        h.partner_message(heartbeat(State::TakenOver)).unwrap();
        let q = queued(&inbox);
        assert_eq!(q.len(), PARTNER_CAPACITY + 2);
        assert_eq!(q.last(), Some(&heartbeat(State::TakenOver)));
        assert!(!q.contains(&Message::Takeover));
    }
}

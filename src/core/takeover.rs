//! The takeover state machine of one node of an HA pair: pure, sans-io.
//!
//! `Node::step(now_ms, event) -> Vec<Action>` is the only way state changes. It reads no clock,
//! makes no syscall and does no I/O: the daemon feeds it timer ticks, interconnect messages,
//! mailbox reads, operator commands and the completion of the actions it asked for, and
//! executes the actions it returns. The deterministic simulation (`core::sim`) drives two of
//! them against a model of the disks, the interconnect, the NVRAM logs and the clock.
//!
//! The flow follows the operator-initiated graceful takeover of the seed
//! (`shared/seed/operator-initiated-graceful-takeover.txt`) and DESIGN.md:
//!
//! ```text
//!  home node (taken over)                    partner (taker)
//!  Normal ── takeover ──> TakeoverRequested ─ PleaseTakeover ─> Normal ── checks ──┐
//!                                             <── Refused{reasons} ── (refusal)    │
//!         <──────────────── PleaseShutdown{countdown} ──────── AwaitingShutdown <──┘
//!  ShuttingDown: StopAccepting, DrainInFlight,                 │ countdown expiry:
//!   FinalCp, ReleaseServiceIps, CloseClients,                  │  Takeover (forced)
//!   MarkCleanShutdown, StopHeartbeats                          ▼
//!  ── ShutdownComplete ──────────────────────────────> TakingOver: Fence, OpenPartnerAggregate,
//!  TakenOver <──── PleaseDie (interconnect + mailbox) ──   ReplayPartnerLog, TakePartnerIdentity,
//!                                                         ServePartnerExports ─> InTakeover
//!  Resuming <───────────── Giveback{epoch} ──────────── GivingBack: DrainPartnerExports,
//!  RegisterOwn, RecheckMailbox, OpenOwnAggregate,         CpPartnerAggregate, ReleasePartnerIps,
//!  Replay/DiscardOwnLog, TakeOwnIps, ServeOwnExports      ClosePartnerAggregate, ReleaseFence
//!  ─> Normal ── Resumed ─────────────────────────────> Normal (hold-down)
//! ```
//!
//! Hard takeover: a `Normal` node whose partner is silent on the interconnect *and* in the
//! mailbox goes straight to `TakingOver` (fence first). Interconnect silence with a live
//! mailbox raises [`Alarm::InterconnectDown`] and never takes over.
//!
//! Safety rules that the code keeps and the simulation checks:
//! - the partner's aggregate is never opened or served before a [`Event::StepDone`] of
//!   [`Step::Fence`] arrived (unless [`Config::unsafe_skip_fence`], a test-only switch);
//! - writes are acknowledged from the local NVRAM only ([`AckMode::LocalOnly`]) while the
//!   partner is fenced; otherwise every acknowledged write is in the partner's mirror, which is
//!   what makes a hard takeover lose nothing;
//! - a node that boots, or is given back, re-registers its key and then re-reads the mailbox
//!   before touching its aggregate, so a fence racing with a reboot cannot be missed.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// Upper bound on the refusal history kept for `status` (TIGER_STYLE: bound everything).
pub const MAX_REFUSALS: usize = 16;
/// Upper bound on the alarm history kept for `status`.
pub const MAX_ALARMS: usize = 16;
/// A fence failing this many times (other than by a conflict) abandons the takeover.
pub const MAX_FENCE_FAILURES: u32 = 3;
/// Upper bound on the transition history kept for `status`.
pub const MAX_TRANSITIONS: usize = 32;

/// One of the two nodes of the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum NodeId {
    A,
    B,
}

impl NodeId {
    /// The other node of the pair.
    pub fn partner(self) -> NodeId {
        match self {
            NodeId::A => NodeId::B,
            NodeId::B => NodeId::A,
        }
    }
}

/// The role a node is in. Only the transitions listed in [`check_transition`] are legal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum State {
    /// Just started; waiting for the first mailbox read to learn whether the partner has
    /// taken this node over (please-die) and whether this node had taken the partner over.
    Booting,
    /// Bringing its own aggregate up: register key, re-check mailbox, open, replay (or discard)
    /// the log, add service IPs, serve exports.
    Resuming,
    /// Serving its own aggregate; partner may be up or down.
    Normal,
    /// The operator asked, at this node, to be taken over; *please takeover* was sent and the
    /// node waits for *please shutdown* or a refusal. Still serving.
    TakeoverRequested,
    /// Graceful shutdown in progress after *please shutdown*: the shutdown steps run in order.
    ShuttingDown,
    /// Not serving anything; the partner serves this node's aggregate. Waits for giveback and
    /// honours *please die* (also after a reboot).
    TakenOver,
    /// This node sent *please shutdown* to the partner and runs the countdown.
    AwaitingShutdown,
    /// Taking the partner over: fence, open, replay, identity, serve.
    TakingOver,
    /// Serving its own and the partner's aggregate.
    InTakeover,
    /// Returning the partner's aggregate: drain, CP, release IPs, close, release fence,
    /// then *giveback*.
    GivingBack,
}

impl State {
    /// Every state, for exhaustive tests and tables.
    pub const ALL: [State; 10] = [
        State::Booting,
        State::Resuming,
        State::Normal,
        State::TakeoverRequested,
        State::ShuttingDown,
        State::TakenOver,
        State::AwaitingShutdown,
        State::TakingOver,
        State::InTakeover,
        State::GivingBack,
    ];

    /// The code of this state in a mailbox slot's `state` field (stable: on-disk format).
    pub fn code(self) -> u32 {
        match self {
            State::Booting => 1,
            State::Resuming => 2,
            State::Normal => 3,
            State::TakeoverRequested => 4,
            State::ShuttingDown => 5,
            State::TakenOver => 6,
            State::AwaitingShutdown => 7,
            State::TakingOver => 8,
            State::InTakeover => 9,
            State::GivingBack => 10,
        }
    }

    /// The state a mailbox slot code stands for; `None` for codes this version does not know.
    pub fn from_code(code: u32) -> Option<State> {
        State::ALL.into_iter().find(|s| s.code() == code)
    }
}

/// Says whether `from -> to` is a legal transition. The one place that says so.
pub fn check_transition(from: State, to: State) -> Result<(), TakeoverError> {
    use State::*;
    let legal = match (from, to) {
        // first mailbox read: no please-die -> bring own aggregate up; please-die -> wait.
        (Booting, Resuming) | (Booting, TakenOver) => true,
        (Booting, _) => false,
        // resumed; or the re-check found please-die / our key was preempted.
        (Resuming, Normal) | (Resuming, TakenOver) => true,
        (Resuming, _) => false,
        (Normal, TakeoverRequested) // operator `takeover` here
        | (Normal, ShuttingDown) // please shutdown from partner (takeover --of there)
        | (Normal, TakenOver) // forced takeover / please die / fenced out
        | (Normal, AwaitingShutdown) // please takeover accepted / takeover --of here
        | (Normal, TakingOver) => true, // hard takeover, or resuming a takeover after reboot
        (Normal, _) => false,
        (TakeoverRequested, Normal) // refused or no answer
        | (TakeoverRequested, ShuttingDown)
        | (TakeoverRequested, TakenOver) => true,
        (TakeoverRequested, _) => false,
        (ShuttingDown, TakenOver) => true,
        (ShuttingDown, _) => false,
        (TakenOver, Resuming) => true, // giveback
        (TakenOver, _) => false,
        (AwaitingShutdown, TakingOver) // shutdown complete or countdown expired
        | (AwaitingShutdown, Normal) // partner refused to shut down
        | (AwaitingShutdown, ShuttingDown) // both asked at once: lower node id wins
        | (AwaitingShutdown, TakenOver) => true, // the partner fenced us first
        (AwaitingShutdown, _) => false,
        (TakingOver, InTakeover) // all phases done
        | (TakingOver, Normal) // fence failed (not a conflict): abandon
        | (TakingOver, TakenOver) => true, // fence lost: the partner fenced us first
        (TakingOver, _) => false,
        (InTakeover, GivingBack) | (InTakeover, TakenOver) => true,
        (InTakeover, _) => false,
        (GivingBack, Normal) // the partner confirmed it resumes
        | (GivingBack, TakenOver) // fenced out
        | (GivingBack, TakingOver) => true, // the partner died before resuming

        (GivingBack, _) => false,
    };
    if legal {
        Ok(())
    } else {
        Err(TakeoverError::IllegalTransition { from, to })
    }
}

/// Errors of the takeover state machine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TakeoverError {
    #[error("illegal takeover state transition {from:?} -> {to:?}")]
    IllegalTransition { from: State, to: State },
    #[error("invalid takeover config: {0}")]
    InvalidConfig(&'static str),
}

/// Timers and options. All durations in milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// Which node this is.
    pub node: NodeId,
    /// Interconnect/HA protocol version; nodes with different versions refuse takeover.
    pub protocol_version: u32,
    /// Time the node to be taken over gets for a graceful shutdown.
    pub countdown_ms: u64,
    /// Interval of interconnect and mailbox heartbeats.
    pub heartbeat_interval_ms: u64,
    /// Interconnect silence after which the interconnect is considered down.
    pub interconnect_timeout_ms: u64,
    /// Mailbox heartbeat silence after which the partner is considered dead.
    pub mailbox_timeout_ms: u64,
    /// How long `TakeoverRequested` waits for an answer to *please takeover*.
    pub request_timeout_ms: u64,
    /// Interval of *please die* while the partner is taken over.
    pub please_die_interval_ms: u64,
    /// After a giveback, operator takeovers are refused for this long (ping-pong guard).
    pub holddown_ms: u64,
    /// Give back automatically once the partner waits for giveback. Off by default.
    pub auto_giveback: bool,
    /// How long the partner must wait for giveback before an automatic giveback.
    pub auto_giveback_delay_ms: u64,
    /// Delay before a failed takeover/giveback/resume step is retried.
    pub step_retry_ms: u64,
    /// TEST ONLY: take over without fencing. Breaks the safety argument; the simulation uses
    /// it to show that its invariants catch a missing fence.
    pub unsafe_skip_fence: bool,
}

impl Config {
    /// Defaults an operator would expect (30 s countdown, 1 s heartbeats).
    pub fn new(node: NodeId) -> Config {
        Config {
            node,
            protocol_version: 1,
            countdown_ms: 30_000,
            heartbeat_interval_ms: 1_000,
            interconnect_timeout_ms: 5_000,
            mailbox_timeout_ms: 10_000,
            request_timeout_ms: 10_000,
            please_die_interval_ms: 1_000,
            holddown_ms: 300_000,
            auto_giveback: false,
            auto_giveback_delay_ms: 60_000,
            step_retry_ms: 1_000,
            unsafe_skip_fence: false,
        }
    }

    /// Checks the relations between timers the safety argument relies on.
    pub fn validate(&self) -> Result<(), TakeoverError> {
        if self.heartbeat_interval_ms == 0 || self.please_die_interval_ms == 0 {
            return Err(TakeoverError::InvalidConfig("intervals must be > 0"));
        }
        if self.interconnect_timeout_ms <= self.heartbeat_interval_ms {
            return Err(TakeoverError::InvalidConfig(
                "interconnect_timeout_ms must exceed heartbeat_interval_ms",
            ));
        }
        if self.mailbox_timeout_ms <= self.heartbeat_interval_ms {
            return Err(TakeoverError::InvalidConfig(
                "mailbox_timeout_ms must exceed heartbeat_interval_ms",
            ));
        }
        if self.countdown_ms == 0 {
            return Err(TakeoverError::InvalidConfig("countdown_ms must be > 0"));
        }
        Ok(())
    }
}

/// One step of a procedure, executed by the I/O layer; each completes with
/// [`Event::StepDone`] or [`Event::StepFailed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Step {
    // Graceful shutdown of this node (after *please shutdown*).
    /// Stop accepting connections and reading new requests.
    StopAccepting,
    /// Complete every request already read (a write completes once in both NVRAMs).
    DrainInFlight,
    /// Try a final consistency point; failure is tolerated (the partner replays the mirror).
    FinalCp,
    /// Remove the service IPs of this node's exports.
    ReleaseServiceIps,
    /// Close client connections.
    CloseClients,
    /// Record a clean shutdown in this node's mailbox slot.
    MarkCleanShutdown,
    /// Stop the serving heartbeats (a `TakenOver` beacon continues; see `State::TakenOver`).
    StopHeartbeats,
    // Takeover of the partner.
    /// Set please-die in the partner's mailbox, then PREEMPT AND ABORT the partner's key on
    /// every shared disk. Fails with `ReservationConflict` if our own key was preempted.
    Fence,
    /// Open the partner's aggregate.
    OpenPartnerAggregate,
    /// Replay the partner's log from our mirror.
    ReplayPartnerLog,
    /// Add the partner's service IPs (gratuitous ARP / unsolicited NA) and identity.
    TakePartnerIdentity,
    /// Serve the partner's exports alongside ours.
    ServePartnerExports,
    // Giveback of the partner's aggregate.
    /// Drain the partner's exports the graceful way (answer what was read, read no more).
    DrainPartnerExports,
    /// CP the partner's aggregate so nothing of it is left only in our log.
    CpPartnerAggregate,
    /// Remove the partner's service IPs.
    ReleasePartnerIps,
    /// Close the partner's aggregate.
    ClosePartnerAggregate,
    /// Clear please-die in the partner's mailbox (the partner re-registers its key).
    ReleaseFence,
    // Bringing our own aggregate up.
    /// Register our key on the shared disks.
    RegisterOwn,
    /// Re-read please-die after registering; completes with [`Event::MailboxChecked`].
    RecheckMailbox,
    /// Open our own aggregate.
    OpenOwnAggregate,
    /// Replay our own log (boot without a takeover in between).
    ReplayOwnLog,
    /// Drop our own log: after a giveback the partner replayed and CP'd it.
    DiscardOwnLog,
    /// Add our service IPs.
    TakeOwnIps,
    /// Serve our exports.
    ServeOwnExports,
}

/// How a takeover started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TakeoverKind {
    /// The partner completed its graceful shutdown.
    Graceful,
    /// The countdown expired; the partner was told *takeover* and fenced.
    Forced,
    /// The partner was silent on the interconnect and in the mailbox.
    Hard,
    /// This node rebooted while it had the partner taken over and takes it over again.
    Continued,
    /// The partner reports it waits for giveback but nobody serves its aggregate (e.g. an
    /// abandoned takeover, or a giveback that died half-way): take it over properly so that
    /// its log is replayed, then give it back the normal way.
    Orphaned,
}

/// Why a takeover or giveback was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefusalReason {
    /// Our mirror of the partner's log is not current (never, or since `since_ms`).
    MirrorNotCurrent { since_ms: Option<u64> },
    /// We do not see all of the partner's disks.
    PartnerDisksNotVisible { visible: u32, expected: u32 },
    /// The partner runs an incompatible protocol version.
    IncompatibleVersion { ours: u32, theirs: u32 },
    /// We never heard the partner's version.
    PartnerVersionUnknown,
    /// This node is unhealthy.
    SelfUnhealthy { detail: String },
    /// The partner is already taken over by this node.
    AlreadyTakenOver,
    /// A takeover is already in progress (either direction).
    TakeoverInProgress,
    /// A giveback is in progress.
    GivebackInProgress,
    /// This node is itself taken over, shutting down or not yet up.
    SelfNotServing { state: State },
    /// Hold-down after a giveback (ping-pong guard).
    HoldDown { until_ms: u64 },
    /// The partner is not reachable on the interconnect (graceful takeover needs it).
    PartnerUnreachable { last_heard_ms: Option<u64> },
    /// The partner did not answer *please takeover* in time.
    NoAnswer,
    /// Giveback: this node has not taken the partner over.
    NotInTakeover,
    /// Giveback: the partner has not reported that it waits for giveback.
    PartnerNotReady { partner_state: Option<State> },
    /// The request came from the wrong node for this state (e.g. both asked at once).
    Conflict,
}

/// What was asked that got refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestKind {
    /// Operator `takeover` at this node (to be taken over); refused here or by the partner.
    TakeoverOfSelf,
    /// Operator `takeover --of PARTNER` at this node.
    TakeoverOfPartner,
    /// *please takeover* received from the partner.
    PleaseTakeover,
    /// *please shutdown* received from the partner.
    PleaseShutdown,
    /// Partner silent on both channels, but we may not take over.
    HardTakeover,
    /// Operator or automatic giveback.
    Giveback,
}

/// A refusal with its reasons, as shown by `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub at_ms: u64,
    pub request: RequestKind,
    pub reasons: Vec<RefusalReason>,
}

/// Failure of a step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepError {
    /// Our key is not registered / was preempted: the partner fenced us.
    ReservationConflict,
    /// Anything else; retried for takeover, giveback and resume steps.
    Failed(String),
}

/// Loud conditions for the operator; also kept in `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Alarm {
    /// Interconnect silent while the partner's mailbox heartbeat is alive: no takeover.
    InterconnectDown { since_ms: u64 },
    /// We cannot read the mailbox: we can neither confirm a dead partner nor see please-die.
    MailboxAccessLost,
    /// The partner is silent everywhere, but we may not take it over.
    PartnerDownCannotTakeOver { reasons: Vec<RefusalReason> },
    /// A step failed.
    StepFailed { step: Step, error: StepError },
    /// The state machine attempted an illegal transition (a bug).
    IllegalTransition { from: State, to: State },
    /// We were fenced by the partner and halted.
    FencedOut,
    /// We could not write our mailbox slot to a majority of members for longer than the
    /// self-fence bound and halted ourselves (the partner may take over after waiting).
    SelfFenced { reason: String },
}

/// An operator command from `takeoverctl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OperatorCmd {
    /// `takeoverctl takeover` at the node to be taken over: send *please takeover*.
    TakeoverSelf,
    /// `takeoverctl takeover --of NODE` at the node that takes over.
    TakeoverOf(NodeId),
    /// `takeoverctl giveback` at the node that has taken over.
    Giveback,
    /// Turn automatic giveback on or off.
    SetAutoGiveback(bool),
    /// `takeoverctl alarm ack ID` / `--all` (None): the operator has seen the alarm. It stays
    /// in the history, and in the headline while its condition holds; if the condition
    /// clears and comes back, it is raised again under a new id.
    AckAlarm(Option<u64>),
    /// `takeoverctl takeover --of NODE [--countdown DUR] [--immediate]`: like `TakeoverOf`,
    /// with this countdown instead of the configured one (`None`: configured), or with no
    /// graceful shutdown at all (`immediate`: the partner is told *takeover* and fenced now).
    TakeoverOfWith {
        node: NodeId,
        countdown_ms: Option<u64>,
        immediate: bool,
    },
}

/// Interconnect messages between the two state machines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Periodic liveness and state.
    Heartbeat {
        state: State,
        protocol_version: u32,
        /// Every write the sender acknowledged is in our mirror of its log.
        mirror_in_sync: bool,
    },
    /// "Please take me over."
    PleaseTakeover,
    /// "Shut down gracefully; you have `countdown_ms`."
    PleaseShutdown { countdown_ms: u64 },
    /// A refusal of *please takeover*, *please shutdown* or similar.
    Refused {
        request: RequestKind,
        reasons: Vec<RefusalReason>,
    },
    /// Graceful shutdown completed (completion report).
    ShutdownComplete { final_cp_ok: bool, elapsed_ms: u64 },
    /// The countdown expired: stop now, you are being taken over.
    Takeover,
    /// You are taken over (epoch = start of that takeover at the sender); do not serve.
    PleaseDie { epoch: u64 },
    /// Your aggregate is returned: resume. `epoch` names the takeover it ends.
    Giveback { epoch: u64 },
    /// The home node serves again after a giveback.
    Resumed,
}

/// The partner's slot in the disk mailbox, as read by us. Layout is defined by the io layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailboxSlot {
    /// Bumped by every heartbeat write; silence means this stops changing.
    pub counter: u64,
    pub state: State,
    pub clean_shutdown: bool,
    /// The partner acknowledges writes that our mirror of its log does not hold (its
    /// interconnect to us is down): a takeover from the mirror would lose them.
    #[serde(default)]
    pub unmirrored: bool,
}

/// One mailbox read: the partner's slot and the please-die flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailboxView {
    /// None if the partner never wrote a slot.
    pub partner_slot: Option<MailboxSlot>,
    /// The partner set please-die for us.
    pub please_die_for_me: bool,
    /// We set please-die for the partner (we had taken it over).
    pub please_die_for_partner: bool,
}

/// Inputs to [`Node::step`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Timer tick; the daemon ticks at least every `heartbeat_interval_ms / 2`.
    Tick,
    /// An operator command.
    Operator(OperatorCmd),
    /// A message from the partner over the interconnect.
    Message(Message),
    /// A periodic mailbox read; `None` when the mailbox disks could not be read.
    MailboxRead(Option<MailboxView>),
    /// Result of [`Step::RecheckMailbox`].
    MailboxChecked { please_die: bool },
    /// A step completed.
    StepDone(Step),
    /// A step failed.
    StepFailed { step: Step, error: StepError },
    /// The NVRAM layer: is every write we acknowledged in the partner's mirror?
    OwnMirror { in_sync: bool },
    /// Disk discovery: how many of the partner's disks we see.
    PartnerDisks { visible: u32, expected: u32 },
    /// Our own health (failover monitor).
    Health { healthy: bool, detail: String },
    /// A write to our own aggregate failed with a reservation conflict: we were fenced.
    FencedOut,
    /// The mailbox driver could not write our slot to a majority of members for longer than
    /// the self-fence bound: stop serving now (the partner will take over after its wait).
    SelfFenced { reason: String },
}

/// How the data plane may acknowledge writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AckMode {
    /// Ack only when durable in both NVRAMs.
    Mirrored,
    /// Ack when durable locally: only while the partner is fenced.
    LocalOnly,
}

/// Outputs of [`Node::step`], executed by the I/O layer in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send a message to the partner (best effort).
    Send(Message),
    /// Write our mailbox slot (heartbeat).
    WriteMailbox {
        counter: u64,
        state: State,
        clean_shutdown: bool,
    },
    /// Set or clear please-die in the partner's mailbox slot.
    SetPartnerPleaseDie(bool),
    /// Start a step; it completes with `StepDone`/`StepFailed`.
    Begin(Step),
    /// Stop everything now (forced takeover, please-die, fenced out): close clients, drop
    /// in-flight requests unanswered, release IPs, stop writing. Synchronous.
    HaltSelf,
    /// Change how the data plane acknowledges writes.
    SetAckMode(AckMode),
    /// Raise an alarm.
    Alarm(Alarm),
    /// Tell the operator a request was refused.
    ReportRefusal(Refusal),
}

/// Time spent in one phase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseTiming {
    pub step: Step,
    pub started_ms: u64,
    pub finished_ms: u64,
    /// Number of failed attempts before it completed.
    pub failures: u32,
}

impl PhaseTiming {
    pub fn elapsed_ms(&self) -> u64 {
        self.finished_ms - self.started_ms
    }
}

/// Which procedure a step sequence belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProcedureKind {
    Shutdown,
    Takeover(TakeoverKind),
    Giveback,
    Resume { after_giveback: bool },
}

/// A finished (or running) procedure with per-phase timings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcedureReport {
    pub kind: ProcedureKind,
    pub started_ms: u64,
    pub finished_ms: Option<u64>,
    pub phases: Vec<PhaseTiming>,
    /// Takeover only: did a fence complete before serving.
    pub fenced: bool,
    /// The step running when the report was taken: for a running procedure, the one it is
    /// in (a step that keeps failing shows here with its attempts and last error); for a
    /// finished one, the step a halt interrupted (None when every step ran).
    #[serde(default)]
    pub current: Option<RunningStep>,
    /// Giveback only: after its last step (the *giveback* message) the giveback waits for the
    /// partner to serve again; it finishes (`finished_ms`) when the partner's heartbeat says
    /// `Normal` or it sends *resumed*, not when it starts resuming.
    #[serde(default)]
    pub partner_resume: Option<PartnerResume>,
}

/// The last part of a giveback: the partner bringing its aggregate up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartnerResume {
    /// When the partner was told to resume (our last step done).
    pub started_ms: u64,
    /// When it confirmed it resumes (its heartbeat said `Resuming` or `Normal`).
    pub confirmed_ms: Option<u64>,
    /// Why the wait ended without the partner serving (it went down, or this node halted);
    /// None: it served at the report's `finished_ms`, or the wait goes on.
    pub abandoned: Option<String>,
}

/// The step a procedure is in, with its failed attempts so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningStep {
    pub step: Step,
    /// When its first attempt began.
    pub started_ms: u64,
    /// Failed attempts so far (the step is retried every `step_retry_ms`).
    pub failures: u32,
    /// The error of the latest failed attempt.
    pub last_error: Option<StepError>,
}

/// One entry of the alarm history. A repeat of an alarm already in the history (the same
/// step failing the same way on every retry, say) updates that entry instead of pushing the
/// others out of the bounded ring.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlarmEntry {
    /// Names it for `takeoverctl alarm ack` (counts from 1 since the daemon started; an
    /// alarm raised again after its acknowledgement gets a new one).
    #[serde(default)]
    pub id: u64,
    /// When the operator acknowledged it.
    #[serde(default)]
    pub acked_ms: Option<u64>,
    /// Its condition still holds (it is one of [`Status::open_alarms`]).
    #[serde(default)]
    pub open: bool,
    /// When it was first raised.
    pub first_ms: u64,
    /// When it was last raised (the entry's place in the history, newest last).
    pub last_ms: u64,
    /// How many times it was raised.
    pub count: u32,
    pub alarm: Alarm,
}

/// A state transition, as kept in the bounded history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    pub at_ms: u64,
    pub from: State,
    pub to: State,
    pub reason: String,
}

/// What `takeoverctl status` prints (also as JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub node: NodeId,
    pub now_ms: u64,
    pub state: State,
    pub state_since_ms: u64,
    pub partner_state: Option<State>,
    pub partner_last_heard_ms: Option<u64>,
    pub partner_mailbox_last_change_ms: Option<u64>,
    pub mailbox_access: bool,
    pub mirror_current: bool,
    pub mirror_not_current_since_ms: Option<u64>,
    pub ack_mode: AckMode,
    pub countdown_remaining_ms: Option<u64>,
    pub running: Option<ProcedureReport>,
    pub last_takeover: Option<ProcedureReport>,
    pub last_giveback: Option<ProcedureReport>,
    /// This node's last graceful shutdown (it was taken over), with its phase timings; a
    /// shutdown cut short by a halt shows the step it was in.
    #[serde(default)]
    pub last_shutdown: Option<ProcedureReport>,
    pub refusals: Vec<Refusal>,
    /// Newest last; repeats coalesced (see [`AlarmEntry`]).
    pub alarms: Vec<AlarmEntry>,
    /// Conditions raised as alarms that still hold now (interconnect down, mailbox
    /// unreadable, partner down and not taken over, the running step failing).
    #[serde(default)]
    pub open_alarms: Vec<Alarm>,
    pub auto_giveback: bool,
    pub holddown_until_ms: Option<u64>,
    pub transitions: Vec<Transition>,
}

#[derive(Debug, Clone)]
struct Procedure {
    kind: ProcedureKind,
    started_ms: u64,
    queue: VecDeque<Step>,
    current: Option<(Step, u64, u32)>,
    /// The error of the current step's latest failed attempt.
    last_error: Option<StepError>,
    retry_at_ms: Option<u64>,
    done: Vec<PhaseTiming>,
}

impl Procedure {
    fn new(kind: ProcedureKind, started_ms: u64, steps: &[Step]) -> Procedure {
        Procedure {
            kind,
            started_ms,
            queue: steps.iter().copied().collect(),
            current: None,
            last_error: None,
            retry_at_ms: None,
            done: Vec::new(),
        }
    }

    fn has_done(&self, step: Step) -> bool {
        self.done.iter().any(|p| p.step == step)
    }

    fn has_started(&self, step: Step) -> bool {
        self.has_done(step) || matches!(self.current, Some((s, _, _)) if s == step)
    }

    fn report(&self, finished_ms: Option<u64>, fenced: bool) -> ProcedureReport {
        ProcedureReport {
            kind: self.kind,
            started_ms: self.started_ms,
            finished_ms,
            phases: self.done.clone(),
            fenced,
            current: self
                .current
                .map(|(step, started_ms, failures)| RunningStep {
                    step,
                    started_ms,
                    failures,
                    last_error: self.last_error.clone(),
                }),
            partner_resume: None,
        }
    }
}

/// The takeover state machine of one node.
#[derive(Debug, Clone)]
pub struct Node {
    cfg: Config,
    now_ms: u64,
    boot_ms: u64,
    state: State,
    state_since_ms: u64,
    healthy: bool,
    health_detail: String,
    partner_disks: (u32, u32),
    own_mirror_in_sync: bool,
    /// Our final CP of a graceful shutdown succeeded: our log holds nothing the members lack
    /// (until we serve again), whatever the partner's mirror of it holds.
    own_log_settled: bool,
    // What we know about the partner.
    partner_state: Option<State>,
    partner_version: Option<u32>,
    partner_last_heard_ms: Option<u64>,
    mirror_current: bool,
    mirror_not_current_since_ms: Option<u64>,
    mailbox_access: bool,
    mailbox_last_counter: Option<u64>,
    mailbox_last_change_ms: Option<u64>,
    mailbox_partner_state: Option<State>,
    // Timers.
    next_heartbeat_ms: u64,
    next_please_die_ms: u64,
    countdown_deadline_ms: Option<u64>,
    request_deadline_ms: Option<u64>,
    holddown_until_ms: Option<u64>,
    /// The node that had taken over in the giveback that began the hold-down: the hold-down
    /// refuses only an operator takeover by that node again (ping-pong), not one the other
    /// way round (a rolling maintenance: b taken over and given back, then a).
    holddown_taker: Option<NodeId>,
    partner_ready_since_ms: Option<u64>,
    hb_counter: u64,
    // Procedures.
    proc: Option<Procedure>,
    fenced: bool,
    takeover_epoch: u64,
    /// Highest takeover epoch we were told to die for; stale givebacks are ignored.
    died_epoch: u64,
    /// Added to `now_ms` for a takeover's epoch: the wall clock at the daemon's start, so that
    /// epochs keep growing across restarts (the partner remembers the last one it died for).
    epoch_origin_ms: u64,
    /// Highest takeover epoch that was given back to us; stale please-dies are ignored.
    resumed_epoch: u64,
    continue_takeover: bool,
    /// GivingBack: all steps done, Giveback sent, waiting for the partner to resume.
    awaiting_resume: bool,
    fence_failures: u32,
    auto_giveback: bool,
    flapping: bool,
    last_giveback_done_ms: Option<u64>,
    ack_mode: AckMode,
    // Reporting.
    last_takeover: Option<ProcedureReport>,
    last_giveback: Option<ProcedureReport>,
    last_shutdown: Option<ProcedureReport>,
    refusals: VecDeque<Refusal>,
    alarms: VecDeque<AlarmEntry>,
    next_alarm_id: u64,
    transitions: VecDeque<Transition>,
    interconnect_alarm_raised: bool,
    hard_refusal_raised: bool,
    /// The partner waits taken over, nobody serves its aggregate, and we cannot take it.
    orphan_refusal_raised: bool,
    mailbox_alarm_raised: bool,
}

impl Node {
    /// A freshly started node in `Booting`.
    pub fn new(cfg: Config, now_ms: u64) -> Result<Node, TakeoverError> {
        cfg.validate()?;
        let auto_giveback = cfg.auto_giveback;
        Ok(Node {
            cfg,
            now_ms,
            boot_ms: now_ms,
            state: State::Booting,
            state_since_ms: now_ms,
            healthy: true,
            health_detail: String::new(),
            partner_disks: (0, 0),
            own_mirror_in_sync: false,
            own_log_settled: false,
            partner_state: None,
            partner_version: None,
            partner_last_heard_ms: None,
            mirror_current: false,
            mirror_not_current_since_ms: None,
            mailbox_access: true,
            mailbox_last_counter: None,
            mailbox_last_change_ms: None,
            mailbox_partner_state: None,
            next_heartbeat_ms: now_ms,
            next_please_die_ms: now_ms,
            countdown_deadline_ms: None,
            request_deadline_ms: None,
            holddown_until_ms: None,
            holddown_taker: None,
            partner_ready_since_ms: None,
            hb_counter: 0,
            proc: None,
            fenced: false,
            takeover_epoch: 0,
            died_epoch: 0,
            epoch_origin_ms: 0,
            resumed_epoch: 0,
            continue_takeover: false,
            awaiting_resume: false,
            fence_failures: 0,
            auto_giveback,
            flapping: false,
            last_giveback_done_ms: None,
            ack_mode: AckMode::Mirrored,
            last_takeover: None,
            last_giveback: None,
            last_shutdown: None,
            refusals: VecDeque::new(),
            alarms: VecDeque::new(),
            next_alarm_id: 1,
            transitions: VecDeque::new(),
            interconnect_alarm_raised: false,
            hard_refusal_raised: false,
            orphan_refusal_raised: false,
            mailbox_alarm_raised: false,
        })
    }

    pub fn id(&self) -> NodeId {
        self.cfg.node
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// How the data plane may acknowledge writes right now.
    pub fn ack_mode(&self) -> AckMode {
        self.ack_mode
    }

    /// The step the I/O layer is executing for us, if any. The I/O layer applies a step's
    /// effect only while it is still running here (a halt abandons it).
    pub fn running_step(&self) -> Option<Step> {
        self.proc
            .as_ref()
            .and_then(|p| p.current)
            .map(|(s, _, _)| s)
    }

    /// Count takeover epochs from `unix_ms` (the wall clock when `now_ms` was 0) rather than
    /// from 0: a restarted daemon's takeovers then still come after those the partner
    /// remembers, whose givebacks it would otherwise ignore as stale.
    pub fn set_epoch_origin(&mut self, unix_ms: u64) {
        self.epoch_origin_ms = unix_ms;
    }

    /// The epoch of the current (or last) takeover this node made; please-die carries it.
    pub fn takeover_epoch(&self) -> u64 {
        self.takeover_epoch
    }

    /// Can the operator ask, at this node, to be taken over? The partner checks the rest.
    pub fn takeover_self_refusals(&self) -> Vec<RefusalReason> {
        let mut reasons = Vec::new();
        if let Some(r) = self.state_refusal() {
            reasons.push(r);
        }
        if let Some(r) = self.holddown_refusal(self.cfg.node.partner()) {
            reasons.push(r);
        }
        if !self.interconnect_alive() {
            reasons.push(RefusalReason::PartnerUnreachable {
                last_heard_ms: self.partner_last_heard_ms,
            });
        }
        reasons
    }

    /// Whether a fence of the partner completed in the current takeover.
    pub fn partner_fenced(&self) -> bool {
        self.fenced
    }

    fn proc_has_done(&self, step: Step) -> bool {
        self.proc.as_ref().is_some_and(|p| p.has_done(step))
    }

    fn proc_has_started(&self, step: Step) -> bool {
        self.proc.as_ref().is_some_and(|p| p.has_started(step))
    }

    /// Whether this node accepts new client requests for its own aggregate.
    pub fn accepts_own(&self) -> bool {
        match self.state {
            State::Normal
            | State::TakeoverRequested
            | State::AwaitingShutdown
            | State::TakingOver
            | State::InTakeover
            | State::GivingBack => true,
            State::ShuttingDown => !self.proc_has_started(Step::StopAccepting),
            State::Booting | State::Resuming | State::TakenOver => false,
        }
    }

    /// Whether this node may write its own aggregate's disks (serving, draining or CP).
    pub fn writes_own(&self) -> bool {
        match self.state {
            State::ShuttingDown => !self.proc_has_done(Step::FinalCp),
            State::Resuming => self.proc_has_started(Step::OpenOwnAggregate),
            State::Booting | State::TakenOver => false,
            _ => true,
        }
    }

    /// Whether this node accepts new client requests for the partner's aggregate.
    pub fn accepts_partner(&self) -> bool {
        match self.state {
            State::InTakeover => true,
            State::GivingBack => {
                !self.awaiting_resume && !self.proc_has_started(Step::DrainPartnerExports)
            }
            _ => false,
        }
    }

    /// Whether this node may write the partner's aggregate's disks (replay, serve, CP).
    pub fn writes_partner(&self) -> bool {
        match self.state {
            State::TakingOver => self.proc_has_started(Step::OpenPartnerAggregate),
            State::InTakeover => true,
            State::GivingBack => {
                !self.awaiting_resume && !self.proc_has_done(Step::ClosePartnerAggregate)
            }
            _ => false,
        }
    }

    /// The snapshot printed by `takeoverctl status`.
    pub fn status(&self) -> Status {
        Status {
            node: self.cfg.node,
            now_ms: self.now_ms,
            state: self.state,
            state_since_ms: self.state_since_ms,
            partner_state: self.partner_state,
            partner_last_heard_ms: self.partner_last_heard_ms,
            partner_mailbox_last_change_ms: self.mailbox_last_change_ms,
            mailbox_access: self.mailbox_access,
            mirror_current: self.mirror_current,
            mirror_not_current_since_ms: self.mirror_not_current_since_ms,
            ack_mode: self.ack_mode,
            countdown_remaining_ms: self
                .countdown_deadline_ms
                .map(|d| d.saturating_sub(self.now_ms)),
            running: self.proc.as_ref().map(|p| p.report(None, self.fenced)),
            last_takeover: self.last_takeover.clone(),
            last_giveback: self.last_giveback.clone(),
            last_shutdown: self.last_shutdown.clone(),
            refusals: self.refusals.iter().cloned().collect(),
            alarms: self.alarms.iter().cloned().collect(),
            open_alarms: self.open_alarms(),
            auto_giveback: self.auto_giveback,
            holddown_until_ms: self.holddown_until_ms,
            transitions: self.transitions.iter().cloned().collect(),
        }
    }

    /// Feed one event; returns the actions to execute, in order.
    pub fn step(&mut self, now_ms: u64, event: Event) -> Vec<Action> {
        debug_assert!(now_ms >= self.now_ms, "time went backwards");
        self.now_ms = self.now_ms.max(now_ms);
        let mut out = Vec::new();
        match event {
            Event::Tick => self.on_tick(&mut out),
            Event::Operator(cmd) => self.on_operator(cmd, &mut out),
            Event::Message(m) => self.on_message(m, &mut out),
            Event::MailboxRead(view) => self.on_mailbox(view, &mut out),
            Event::MailboxChecked { please_die } => self.on_mailbox_checked(please_die, &mut out),
            Event::StepDone(step) => self.on_step_done(step, &mut out),
            Event::StepFailed { step, error } => self.on_step_failed(step, error, &mut out),
            Event::OwnMirror { in_sync } => self.own_mirror_in_sync = in_sync,
            Event::PartnerDisks { visible, expected } => self.partner_disks = (visible, expected),
            Event::Health { healthy, detail } => {
                self.healthy = healthy;
                self.health_detail = detail;
            }
            Event::FencedOut => self.on_fenced_out(&mut out),
            Event::SelfFenced { reason } => {
                if !matches!(self.state, State::Booting | State::TakenOver) {
                    self.alarm(
                        Alarm::SelfFenced {
                            reason: reason.clone(),
                        },
                        &mut out,
                    );
                    self.halt(&format!("self-fenced: {reason}"), &mut out);
                }
            }
        }
        self.update_ack_mode(&mut out);
        self.refresh_open_alarms();
        out
    }

    // ---- transitions -------------------------------------------------------------------

    fn transition(&mut self, to: State, reason: &str) {
        let from = self.state;
        if let Err(e) = check_transition(from, to) {
            tracing::error!(node = ?self.cfg.node, ?from, ?to, reason, "{e}");
            self.raise(Alarm::IllegalTransition { from, to });
            debug_assert!(false, "{e} ({reason})");
            return;
        }
        tracing::info!(node = ?self.cfg.node, "takeover state {from:?} -> {to:?}: {reason}");
        self.state = to;
        self.state_since_ms = self.now_ms;
        if self.transitions.len() == MAX_TRANSITIONS {
            self.transitions.pop_front();
        }
        self.transitions.push_back(Transition {
            at_ms: self.now_ms,
            from,
            to,
            reason: reason.to_string(),
        });
    }

    fn raise(&mut self, alarm: Alarm) {
        tracing::warn!(node = ?self.cfg.node, ?alarm, "takeover alarm");
        // A repeat (a step failing the same way on every retry) moves its entry to the end
        // with a count, rather than pushing other alarms out of the ring.
        if let Some(i) = self.alarms.iter().position(|e| e.alarm == alarm) {
            let mut e = self.alarms.remove(i).expect("position is in range");
            e.count = e.count.saturating_add(1);
            e.last_ms = self.now_ms;
            // `open` is as of the end of the previous step: acknowledged while it held, it
            // stays acknowledged (a retry failing the same way); acknowledged, then cleared,
            // and now back: a new alarm for the operator.
            if e.acked_ms.is_some() && !e.open {
                e.id = self.next_alarm_id;
                self.next_alarm_id += 1;
                e.acked_ms = None;
                e.count = 1;
                e.first_ms = self.now_ms;
            }
            self.alarms.push_back(e);
            return;
        }
        if self.alarms.len() == MAX_ALARMS {
            // Make room with the oldest acknowledged alarm that no longer holds, else the
            // oldest that no longer holds: a live condition keeps its entry (and its id).
            let i = self
                .alarms
                .iter()
                .position(|e| e.acked_ms.is_some() && !e.open)
                .or_else(|| self.alarms.iter().position(|e| !e.open))
                .unwrap_or(0);
            self.alarms.remove(i);
        }
        let id = self.next_alarm_id;
        self.next_alarm_id += 1;
        self.alarms.push_back(AlarmEntry {
            id,
            acked_ms: None,
            open: false,
            first_ms: self.now_ms,
            last_ms: self.now_ms,
            count: 1,
            alarm,
        });
    }

    /// Mark which history entries are open alarms now (see [`AlarmEntry::open`]).
    fn refresh_open_alarms(&mut self) {
        let open = self.open_alarms();
        for e in &mut self.alarms {
            e.open = open.contains(&e.alarm);
        }
    }

    /// Acknowledge alarm `id` (None: every unacknowledged one).
    fn ack_alarm(&mut self, id: Option<u64>) {
        let now = self.now_ms;
        for e in &mut self.alarms {
            if e.acked_ms.is_none() && id.is_none_or(|i| i == e.id) {
                e.acked_ms = Some(now);
                tracing::info!(node = ?self.cfg.node, id = e.id, alarm = ?e.alarm, open = e.open, "alarm acknowledged");
            }
        }
    }

    /// The ids of `ids` that name no alarm in the history (acknowledged ones included).
    pub fn unknown_alarm_ids(&self, ids: &[u64]) -> Vec<u64> {
        ids.iter()
            .copied()
            .filter(|i| !self.alarms.iter().any(|e| e.id == *i))
            .collect()
    }

    /// The alarm conditions that still hold (see [`Status::open_alarms`]).
    fn open_alarms(&self) -> Vec<Alarm> {
        let latest = |pred: &dyn Fn(&Alarm) -> bool| {
            self.alarms
                .iter()
                .rev()
                .find(|e| pred(&e.alarm))
                .map(|e| e.alarm.clone())
        };
        let mut open = Vec::new();
        if self.interconnect_alarm_raised {
            open.push(
                latest(&|a| matches!(a, Alarm::InterconnectDown { .. })).unwrap_or(
                    Alarm::InterconnectDown {
                        since_ms: self.partner_last_heard_ms.unwrap_or(self.boot_ms),
                    },
                ),
            );
        }
        if !self.mailbox_access {
            open.push(Alarm::MailboxAccessLost);
        }
        if self.hard_refusal_raised || self.orphan_refusal_raised {
            if let Some(a) = latest(&|a| matches!(a, Alarm::PartnerDownCannotTakeOver { .. })) {
                open.push(a);
            }
        }
        if let Some(p) = &self.proc {
            if let (Some((step, _, failures)), Some(error)) = (p.current, &p.last_error) {
                if failures > 0 {
                    open.push(Alarm::StepFailed {
                        step,
                        error: error.clone(),
                    });
                }
            }
        }
        open
    }

    fn alarm(&mut self, alarm: Alarm, out: &mut Vec<Action>) {
        self.raise(alarm.clone());
        out.push(Action::Alarm(alarm));
    }

    fn refuse(&mut self, request: RequestKind, reasons: Vec<RefusalReason>, out: &mut Vec<Action>) {
        let refusal = Refusal {
            at_ms: self.now_ms,
            request,
            reasons,
        };
        tracing::warn!(node = ?self.cfg.node, ?refusal, "request refused");
        if self.refusals.len() == MAX_REFUSALS {
            self.refusals.pop_front();
        }
        self.refusals.push_back(refusal.clone());
        out.push(Action::ReportRefusal(refusal));
    }

    fn update_ack_mode(&mut self, out: &mut Vec<Action>) {
        // LocalOnly only while the partner is fenced: then it cannot take us over with a
        // mirror that lacks these writes. It ends before the fence is released in giveback.
        let local = match self.state {
            State::TakingOver | State::InTakeover => self.fenced,
            State::GivingBack => self.fenced && !self.proc_has_started(Step::ReleaseFence),
            _ => false,
        };
        let mode = if local {
            AckMode::LocalOnly
        } else {
            AckMode::Mirrored
        };
        if mode != self.ack_mode {
            self.ack_mode = mode;
            out.push(Action::SetAckMode(mode));
        }
    }

    // ---- procedures --------------------------------------------------------------------

    fn start_procedure(&mut self, kind: ProcedureKind, steps: &[Step], out: &mut Vec<Action>) {
        debug_assert!(self.proc.is_none(), "procedure already running");
        self.proc = Some(Procedure::new(kind, self.now_ms, steps));
        self.advance(out);
    }

    /// Starts the next step, or finishes the procedure.
    fn advance(&mut self, out: &mut Vec<Action>) {
        let Some(p) = self.proc.as_mut() else { return };
        if p.current.is_some() {
            return;
        }
        match p.queue.pop_front() {
            Some(step) => {
                // Fencing is a precondition of touching the partner's aggregate.
                if matches!(
                    step,
                    Step::OpenPartnerAggregate
                        | Step::ReplayPartnerLog
                        | Step::TakePartnerIdentity
                        | Step::ServePartnerExports
                ) && !self.fenced
                    && !self.cfg.unsafe_skip_fence
                {
                    tracing::error!(node = ?self.cfg.node, ?step, "refusing step: partner not fenced");
                    debug_assert!(false, "takeover step {step:?} before fence");
                    p.queue.push_front(step);
                    return;
                }
                p.current = Some((step, self.now_ms, 0));
                p.last_error = None;
                out.push(Action::Begin(step));
            }
            None => {
                let p = self.proc.take().expect("checked above");
                self.finish_procedure(p, out);
            }
        }
    }

    fn finish_procedure(&mut self, p: Procedure, out: &mut Vec<Action>) {
        let report = p.report(Some(self.now_ms), self.fenced);
        match p.kind {
            ProcedureKind::Shutdown => {
                let final_cp_ok = p
                    .done
                    .iter()
                    .any(|t| t.step == Step::FinalCp && t.failures == 0);
                out.push(Action::Send(Message::ShutdownComplete {
                    final_cp_ok,
                    elapsed_ms: self.now_ms - p.started_ms,
                }));
                self.last_shutdown = Some(report);
                self.transition(State::TakenOver, "graceful shutdown complete");
                self.send_heartbeat(out);
            }
            ProcedureKind::Takeover(kind) => {
                self.last_takeover = Some(report);
                self.partner_ready_since_ms = None;
                self.next_please_die_ms = self.now_ms;
                self.transition(State::InTakeover, &format!("{kind:?} takeover complete"));
                self.send_please_die(out);
            }
            ProcedureKind::Giveback => {
                // Stay in GivingBack, re-sending Giveback, until the partner confirms. The
                // giveback itself is done when the partner serves again.
                let mut report = report;
                report.finished_ms = None;
                report.partner_resume = Some(PartnerResume {
                    started_ms: self.now_ms,
                    confirmed_ms: None,
                    abandoned: None,
                });
                self.last_giveback = Some(report);
                self.fenced = false;
                self.awaiting_resume = true;
                self.next_heartbeat_ms = self.now_ms;
                out.push(Action::Send(Message::Giveback {
                    epoch: self.takeover_epoch,
                }));
            }
            ProcedureKind::Resume { after_giveback } => {
                self.transition(State::Normal, "own aggregate serving");
                // The heartbeat first: the partner completes its giveback on "resumed" and
                // reports what it knows then, our state and our log's mirror included.
                self.send_heartbeat(out);
                if after_giveback {
                    self.holddown_until_ms = Some(self.now_ms + self.cfg.holddown_ms);
                    self.holddown_taker = Some(self.cfg.node.partner());
                    out.push(Action::Send(Message::Resumed));
                }
                if self.continue_takeover {
                    self.continue_takeover = false;
                    self.begin_takeover(TakeoverKind::Continued, out);
                }
            }
        }
    }

    fn on_step_done(&mut self, step: Step, out: &mut Vec<Action>) {
        let now = self.now_ms;
        let Some(p) = self.proc.as_mut() else {
            tracing::debug!(node = ?self.cfg.node, ?step, "stale step completion ignored");
            return;
        };
        match p.current {
            Some((s, started, failures)) if s == step => {
                p.current = None;
                p.last_error = None;
                p.retry_at_ms = None;
                p.done.push(PhaseTiming {
                    step,
                    started_ms: started,
                    finished_ms: now,
                    failures,
                });
                tracing::info!(node = ?self.cfg.node, ?step, elapsed_ms = now - started, "step done");
            }
            _ => {
                tracing::debug!(node = ?self.cfg.node, ?step, "completion of a step not running");
                return;
            }
        }
        if step == Step::Fence {
            self.fenced = true;
            self.next_please_die_ms = now;
        }
        if step == Step::FinalCp {
            self.own_log_settled = true;
        }
        if matches!(step, Step::ReplayOwnLog | Step::DiscardOwnLog) {
            // The log is open from here: whether it is mirrored is the journal's to say (what
            // was said before it opened, from the mailbox flag, no longer holds: a new log
            // session copies the whole log to the partner first).
            self.own_mirror_in_sync = false;
        }
        if step == Step::RecheckMailbox {
            // RecheckMailbox completes through MailboxChecked, which carries the flag.
            return;
        }
        self.advance(out);
    }

    fn on_mailbox_checked(&mut self, please_die: bool, out: &mut Vec<Action>) {
        let running = self
            .proc
            .as_ref()
            .and_then(|p| p.current)
            .is_some_and(|(s, _, _)| s == Step::RecheckMailbox);
        if !running {
            return;
        }
        self.on_step_done(Step::RecheckMailbox, out);
        if please_die {
            self.halt("please-die found after registering", out);
        } else {
            self.advance(out);
        }
    }

    fn on_step_failed(&mut self, step: Step, error: StepError, out: &mut Vec<Action>) {
        let running = self
            .proc
            .as_ref()
            .and_then(|p| p.current)
            .is_some_and(|(s, _, _)| s == step);
        if !running {
            return;
        }
        self.alarm(
            Alarm::StepFailed {
                step,
                error: error.clone(),
            },
            out,
        );
        let kind = self.proc.as_ref().map(|p| p.kind).expect("running");
        if error == StepError::ReservationConflict {
            // Our key is gone: the partner fenced us. Stop everything.
            self.halt(&format!("{step:?} hit a reservation conflict"), out);
            return;
        }
        match (kind, step) {
            // "Tries a final CP": a failed shutdown step does not stop the shutdown; the
            // partner replays the mirror and the countdown bounds the whole thing.
            (ProcedureKind::Shutdown, _) => {
                let now = self.now_ms;
                let p = self.proc.as_mut().expect("running");
                let (s, started, failures) = p.current.take().expect("running");
                p.last_error = None;
                p.done.push(PhaseTiming {
                    step: s,
                    started_ms: started,
                    finished_ms: now,
                    failures: failures + 1,
                });
                if s == Step::FinalCp {
                    // The log holds writes the members lack: the mailbox must not say "clean
                    // shutdown" (the partner takes that for "nothing to replay").
                    p.queue.retain(|q| *q != Step::MarkCleanShutdown);
                }
                self.advance(out);
            }
            // A fence that keeps failing for another reason: we cannot take over safely.
            (ProcedureKind::Takeover(_), Step::Fence)
                if self.fence_failures >= MAX_FENCE_FAILURES =>
            {
                self.proc = None;
                self.countdown_deadline_ms = None;
                self.transition(State::Normal, "fence failed: takeover abandoned");
            }
            (ProcedureKind::Resume { .. }, Step::RecheckMailbox) => {
                // Cannot prove we are not taken over: do not serve.
                self.halt("mailbox re-check failed", out);
            }
            // Everything else is retried: the partner is fenced (takeover), or the aggregate
            // must come back (giveback, resume); giving up would leave it unserved.
            _ => {
                if step == Step::Fence {
                    self.fence_failures += 1;
                }
                let at = self.now_ms + self.cfg.step_retry_ms;
                let p = self.proc.as_mut().expect("running");
                if let Some((_, _, failures)) = p.current.as_mut() {
                    *failures += 1;
                }
                p.last_error = Some(error);
                p.retry_at_ms = Some(at);
            }
        }
    }

    fn retry_due(&mut self, out: &mut Vec<Action>) {
        let now = self.now_ms;
        if let Some(p) = self.proc.as_mut() {
            if let (Some(at), Some((step, _, _))) = (p.retry_at_ms, p.current) {
                if now >= at {
                    p.retry_at_ms = None;
                    out.push(Action::Begin(step));
                }
            }
        }
    }

    /// Stop serving everything right now and wait for giveback.
    fn halt(&mut self, reason: &str, out: &mut Vec<Action>) {
        if self.state == State::TakenOver {
            return;
        }
        out.push(Action::HaltSelf);
        if let Some(p) = self.proc.take() {
            if p.kind == ProcedureKind::Shutdown {
                // Forced down mid-shutdown: keep what ran, and the step it was in.
                self.last_shutdown = Some(p.report(Some(self.now_ms), false));
            }
        }
        self.fenced = false;
        self.awaiting_resume = false;
        self.end_giveback_report(Some(&format!("this node halted ({reason})")));
        self.countdown_deadline_ms = None;
        self.request_deadline_ms = None;
        self.transition(State::TakenOver, reason);
        self.send_heartbeat(out);
    }

    // ---- checks ------------------------------------------------------------------------

    fn interconnect_alive(&self) -> bool {
        self.partner_last_heard_ms
            .is_some_and(|t| self.now_ms.saturating_sub(t) < self.cfg.interconnect_timeout_ms)
    }

    fn mailbox_silent(&self) -> bool {
        let since = self.mailbox_last_change_ms.unwrap_or(self.boot_ms);
        self.mailbox_access && self.now_ms.saturating_sub(since) >= self.cfg.mailbox_timeout_ms
    }

    fn interconnect_silent(&self) -> bool {
        let since = self.partner_last_heard_ms.unwrap_or(self.boot_ms);
        self.now_ms.saturating_sub(since) >= self.cfg.interconnect_timeout_ms
    }

    fn state_refusal(&self) -> Option<RefusalReason> {
        match self.state {
            State::Normal => None,
            State::AwaitingShutdown | State::TakingOver => Some(RefusalReason::TakeoverInProgress),
            State::InTakeover => Some(RefusalReason::AlreadyTakenOver),
            State::GivingBack => Some(RefusalReason::GivebackInProgress),
            s @ (State::Booting
            | State::Resuming
            | State::TakeoverRequested
            | State::ShuttingDown
            | State::TakenOver) => Some(RefusalReason::SelfNotServing { state: s }),
        }
    }

    /// The hold-down's refusal of an operator takeover by `taker`, if any: within the
    /// hold-down, and by the node that took over last time.
    fn holddown_refusal(&self, taker: NodeId) -> Option<RefusalReason> {
        let until = self.holddown_until_ms.filter(|u| self.now_ms < *u)?;
        self.holddown_taker
            .is_none_or(|t| t == taker)
            .then_some(RefusalReason::HoldDown { until_ms: until })
    }

    /// Can this node take the partner over? Returns every reason it cannot.
    /// `graceful` adds the checks that need a live partner; `operator` adds the hold-down.
    pub fn takeover_refusals(&self, graceful: bool, operator: bool) -> Vec<RefusalReason> {
        let mut reasons = Vec::new();
        if let Some(r) = self.state_refusal() {
            reasons.push(r);
        }
        if operator {
            if let Some(r) = self.holddown_refusal(self.cfg.node) {
                reasons.push(r);
            }
        }
        if !self.healthy {
            reasons.push(RefusalReason::SelfUnhealthy {
                detail: self.health_detail.clone(),
            });
        }
        let (visible, expected) = self.partner_disks;
        if expected == 0 || visible < expected {
            reasons.push(RefusalReason::PartnerDisksNotVisible { visible, expected });
        }
        match self.partner_version {
            None => reasons.push(RefusalReason::PartnerVersionUnknown),
            Some(v) if v != self.cfg.protocol_version => {
                reasons.push(RefusalReason::IncompatibleVersion {
                    ours: self.cfg.protocol_version,
                    theirs: v,
                })
            }
            Some(_) => {}
        }
        if !self.mirror_current {
            reasons.push(RefusalReason::MirrorNotCurrent {
                since_ms: self.mirror_not_current_since_ms,
            });
        }
        if graceful && !self.interconnect_alive() {
            reasons.push(RefusalReason::PartnerUnreachable {
                last_heard_ms: self.partner_last_heard_ms,
            });
        }
        reasons
    }

    // ---- operator ----------------------------------------------------------------------

    fn on_operator(&mut self, cmd: OperatorCmd, out: &mut Vec<Action>) {
        tracing::info!(node = ?self.cfg.node, ?cmd, "operator command");
        match cmd {
            OperatorCmd::TakeoverSelf => {
                let reasons = self.takeover_self_refusals();
                if !reasons.is_empty() {
                    self.refuse(RequestKind::TakeoverOfSelf, reasons, out);
                    return;
                }
                self.request_deadline_ms = Some(self.now_ms + self.cfg.request_timeout_ms);
                out.push(Action::Send(Message::PleaseTakeover));
                self.transition(State::TakeoverRequested, "operator: takeover of this node");
            }
            OperatorCmd::TakeoverOf(node) => self.operator_takeover_of(node, None, false, out),
            OperatorCmd::TakeoverOfWith {
                node,
                countdown_ms,
                immediate,
            } => self.operator_takeover_of(node, countdown_ms, immediate, out),
            OperatorCmd::Giveback => self.try_giveback(false, out),
            OperatorCmd::SetAutoGiveback(on) => self.auto_giveback = on,
            OperatorCmd::AckAlarm(id) => self.ack_alarm(id),
        }
    }

    fn operator_takeover_of(
        &mut self,
        node: NodeId,
        countdown_ms: Option<u64>,
        immediate: bool,
        out: &mut Vec<Action>,
    ) {
        if node != self.cfg.node.partner() {
            self.refuse(
                RequestKind::TakeoverOfPartner,
                vec![RefusalReason::Conflict],
                out,
            );
            return;
        }
        let reasons = self.takeover_refusals(true, true);
        if !reasons.is_empty() {
            self.refuse(RequestKind::TakeoverOfPartner, reasons, out);
            return;
        }
        if immediate {
            // No graceful shutdown: the partner is told to stop and is fenced now.
            out.push(Action::Send(Message::Takeover));
            self.begin_takeover(TakeoverKind::Forced, out);
            return;
        }
        let countdown_ms = countdown_ms.unwrap_or(self.cfg.countdown_ms).max(1);
        self.begin_countdown("operator: takeover --of partner", countdown_ms, out);
    }

    fn begin_countdown(&mut self, reason: &str, countdown_ms: u64, out: &mut Vec<Action>) {
        self.countdown_deadline_ms = Some(self.now_ms + countdown_ms);
        out.push(Action::Send(Message::PleaseShutdown { countdown_ms }));
        self.transition(State::AwaitingShutdown, reason);
    }

    fn begin_takeover(&mut self, kind: TakeoverKind, out: &mut Vec<Action>) {
        self.countdown_deadline_ms = None;
        self.takeover_epoch = (self.epoch_origin_ms + self.now_ms).max(self.takeover_epoch + 1);
        // Flapping: taken over again soon after a giveback -> no automatic giveback.
        self.flapping = self
            .last_giveback_done_ms
            .is_some_and(|t| self.now_ms.saturating_sub(t) < self.cfg.holddown_ms);
        self.fenced = false;
        self.fence_failures = 0;
        self.awaiting_resume = false;
        self.end_giveback_report(Some(&format!(
            "{kind:?} takeover of the partner began before it served"
        )));
        self.transition(State::TakingOver, &format!("{kind:?} takeover begins"));
        let mut steps = Vec::with_capacity(5);
        if !self.cfg.unsafe_skip_fence {
            steps.push(Step::Fence);
        }
        steps.extend([
            Step::OpenPartnerAggregate,
            Step::ReplayPartnerLog,
            Step::TakePartnerIdentity,
            Step::ServePartnerExports,
        ]);
        self.start_procedure(ProcedureKind::Takeover(kind), &steps, out);
    }

    fn try_giveback(&mut self, automatic: bool, out: &mut Vec<Action>) {
        let mut reasons = Vec::new();
        match self.state {
            State::InTakeover => {}
            State::GivingBack => reasons.push(RefusalReason::GivebackInProgress),
            State::AwaitingShutdown | State::TakingOver => {
                reasons.push(RefusalReason::TakeoverInProgress)
            }
            _ => reasons.push(RefusalReason::NotInTakeover),
        }
        if self.state == State::InTakeover {
            let ready = self.interconnect_alive() && self.partner_state == Some(State::TakenOver);
            if !ready {
                reasons.push(RefusalReason::PartnerNotReady {
                    partner_state: self.partner_state,
                });
            }
            if let Some(v) = self
                .partner_version
                .filter(|v| *v != self.cfg.protocol_version)
            {
                reasons.push(RefusalReason::IncompatibleVersion {
                    ours: self.cfg.protocol_version,
                    theirs: v,
                });
            }
        }
        if !reasons.is_empty() {
            if !automatic {
                self.refuse(RequestKind::Giveback, reasons, out);
            }
            return;
        }
        self.transition(
            State::GivingBack,
            if automatic {
                "automatic giveback"
            } else {
                "operator: giveback"
            },
        );
        self.start_procedure(
            ProcedureKind::Giveback,
            &[
                Step::DrainPartnerExports,
                Step::CpPartnerAggregate,
                Step::ReleasePartnerIps,
                Step::ClosePartnerAggregate,
                Step::ReleaseFence,
            ],
            out,
        );
    }

    // ---- messages ----------------------------------------------------------------------

    fn on_message(&mut self, msg: Message, out: &mut Vec<Action>) {
        self.partner_last_heard_ms = Some(self.now_ms);
        if self.interconnect_alarm_raised {
            self.interconnect_alarm_raised = false;
            tracing::info!(node = ?self.cfg.node, "interconnect back");
        }
        match msg {
            Message::Heartbeat {
                state,
                protocol_version,
                mirror_in_sync,
            } => {
                self.partner_state = Some(state);
                self.partner_version = Some(protocol_version);
                if mirror_in_sync {
                    self.mirror_current = true;
                    self.mirror_not_current_since_ms = None;
                } else if self.mirror_current || self.mirror_not_current_since_ms.is_none() {
                    self.mirror_current = false;
                    self.mirror_not_current_since_ms = Some(self.now_ms);
                }
                if state == State::TakenOver {
                    self.partner_ready_since_ms.get_or_insert(self.now_ms);
                } else {
                    self.partner_ready_since_ms = None;
                }
                if self.state == State::AwaitingShutdown && state == State::TakenOver {
                    // The heartbeat's mirror_in_sync (read above) covers a settled log.
                    self.partner_shut_down(false, "heartbeat", out);
                }
                if self.awaiting_resume && matches!(state, State::Resuming | State::Normal) {
                    self.giveback_confirmed(out);
                }
                if state == State::Normal {
                    self.end_giveback_report(None);
                }
            }
            Message::PleaseTakeover => {
                let reasons = self.takeover_refusals(true, true);
                if reasons.is_empty() {
                    self.begin_countdown(
                        "partner asked to be taken over",
                        self.cfg.countdown_ms,
                        out,
                    );
                } else {
                    out.push(Action::Send(Message::Refused {
                        request: RequestKind::PleaseTakeover,
                        reasons: reasons.clone(),
                    }));
                    self.refuse(RequestKind::PleaseTakeover, reasons, out);
                }
            }
            Message::PleaseShutdown { countdown_ms } => self.on_please_shutdown(countdown_ms, out),
            Message::Refused { request, reasons } => {
                if request == RequestKind::TakeoverOfPartner
                    && matches!(self.state, State::ShuttingDown | State::TakenOver)
                {
                    // We shut down for a takeover the partner then did not make (its mirror
                    // of our log fell behind): record it; an operator here waits for it. We
                    // stay down, as before: the partner or a restart brings the aggregate back.
                    self.refuse(RequestKind::TakeoverOfSelf, reasons, out);
                    return;
                }
                let ours = matches!(
                    (self.state, request),
                    (State::TakeoverRequested, RequestKind::PleaseTakeover)
                        | (State::AwaitingShutdown, RequestKind::PleaseShutdown)
                );
                if !ours {
                    return;
                }
                let kind = match request {
                    RequestKind::PleaseTakeover => RequestKind::TakeoverOfSelf,
                    _ => RequestKind::TakeoverOfPartner,
                };
                self.refuse(kind, reasons, out);
                self.request_deadline_ms = None;
                self.countdown_deadline_ms = None;
                self.transition(State::Normal, "partner refused");
            }
            Message::ShutdownComplete { final_cp_ok, .. } => {
                if self.state == State::AwaitingShutdown {
                    self.partner_shut_down(final_cp_ok, "shutdown complete", out);
                }
            }
            Message::Takeover => match self.state {
                State::Normal
                | State::TakeoverRequested
                | State::ShuttingDown
                | State::Resuming
                | State::AwaitingShutdown => self.halt("forced takeover by partner", out),
                // Before our fence completed the partner's fence decides; after, the partner
                // is fenced and its message is stale.
                State::TakingOver if !self.fenced => self.halt("forced takeover by partner", out),
                _ => {}
            },
            Message::PleaseDie { epoch } => {
                if epoch <= self.resumed_epoch {
                    return; // a delayed please-die of a takeover already given back
                }
                self.died_epoch = self.died_epoch.max(epoch);
                match self.state {
                    State::Normal
                    | State::TakeoverRequested
                    | State::ShuttingDown
                    | State::Resuming
                    | State::AwaitingShutdown => self.halt("please die from partner", out),
                    State::TakingOver if !self.fenced => self.halt("please die from partner", out),
                    State::Booting | State::TakenOver => {}
                    State::TakingOver | State::InTakeover | State::GivingBack => {
                        tracing::error!(node = ?self.cfg.node, "please die while we hold the partner fenced");
                    }
                }
            }
            Message::Giveback { epoch } => {
                if self.state != State::TakenOver || epoch < self.died_epoch {
                    return;
                }
                self.resumed_epoch = self.resumed_epoch.max(epoch);
                self.transition(State::Resuming, "giveback from partner");
                self.start_resume(true, out);
            }
            Message::Resumed => {
                if self.awaiting_resume {
                    self.giveback_confirmed(out);
                }
                self.end_giveback_report(None);
            }
        }
    }

    /// The partner reports it has shut down (it serves nothing now): take over gracefully if
    /// that cannot lose a write it acknowledged. Its final CP succeeded (`final_cp_ok`: the
    /// members have its whole log; its aggregate is then closed cleanly and the takeover does
    /// not replay our mirror), or our mirror of its log is current. Otherwise its log holds
    /// writes only it has: no takeover (an outage, rather than lost writes); the partner
    /// resumes with its own log when its hapaird restarts.
    fn partner_shut_down(&mut self, final_cp_ok: bool, how: &str, out: &mut Vec<Action>) {
        if final_cp_ok || self.mirror_current {
            self.begin_takeover(TakeoverKind::Graceful, out);
            return;
        }
        let reasons = vec![RefusalReason::MirrorNotCurrent {
            since_ms: self.mirror_not_current_since_ms,
        }];
        self.countdown_deadline_ms = None;
        // The partner's operator may be waiting for this takeover: tell it why not.
        out.push(Action::Send(Message::Refused {
            request: RequestKind::TakeoverOfPartner,
            reasons: reasons.clone(),
        }));
        self.refuse(RequestKind::TakeoverOfPartner, reasons.clone(), out);
        self.alarm(Alarm::PartnerDownCannotTakeOver { reasons }, out);
        self.transition(
            State::Normal,
            &format!("partner shut down ({how}) without a final CP and our mirror of its log is not current: no takeover"),
        );
    }

    fn giveback_confirmed(&mut self, _out: &mut [Action]) {
        self.awaiting_resume = false;
        self.last_giveback_done_ms = Some(self.now_ms);
        self.holddown_until_ms = Some(self.now_ms + self.cfg.holddown_ms);
        self.holddown_taker = Some(self.cfg.node);
        let now = self.now_ms;
        if let Some(r) = self
            .last_giveback
            .as_mut()
            .and_then(|g| g.partner_resume.as_mut())
        {
            r.confirmed_ms.get_or_insert(now);
        }
        self.transition(State::Normal, "giveback complete: partner resumes");
    }

    /// The giveback waiting for the partner to serve again ends: it served (`abandoned`
    /// None), or it never will in this giveback (why). A no-op when no giveback waits.
    fn end_giveback_report(&mut self, abandoned: Option<&str>) {
        let now = self.now_ms;
        let Some(g) = self.last_giveback.as_mut() else {
            return;
        };
        let Some(r) = g.partner_resume.as_mut() else {
            return;
        };
        if g.finished_ms.is_some() {
            return;
        }
        g.finished_ms = Some(now);
        r.abandoned = abandoned.map(str::to_string);
        tracing::info!(node = ?self.cfg.node, elapsed_ms = now - g.started_ms, ?abandoned, "giveback report finished");
    }

    fn on_please_shutdown(&mut self, _countdown_ms: u64, out: &mut Vec<Action>) {
        let accept = match self.state {
            State::Normal | State::TakeoverRequested => true,
            // Both sides asked at once: the lower node id keeps its takeover.
            State::AwaitingShutdown => self.cfg.node > self.cfg.node.partner(),
            State::ShuttingDown | State::TakenOver => return, // duplicate
            _ => false,
        };
        if !accept {
            let reason = self.state_refusal().unwrap_or(RefusalReason::Conflict);
            let reasons = vec![reason];
            out.push(Action::Send(Message::Refused {
                request: RequestKind::PleaseShutdown,
                reasons: reasons.clone(),
            }));
            self.refuse(RequestKind::PleaseShutdown, reasons, out);
            return;
        }
        self.request_deadline_ms = None;
        self.countdown_deadline_ms = None;
        self.own_log_settled = false;
        self.transition(State::ShuttingDown, "please shutdown from partner");
        self.start_procedure(
            ProcedureKind::Shutdown,
            &[
                Step::StopAccepting,
                Step::DrainInFlight,
                Step::FinalCp,
                Step::ReleaseServiceIps,
                Step::CloseClients,
                Step::MarkCleanShutdown,
                Step::StopHeartbeats,
            ],
            out,
        );
    }

    fn start_resume(&mut self, after_giveback: bool, out: &mut Vec<Action>) {
        // From the first write we acknowledge on, the log is no longer all on the members.
        self.own_log_settled = false;
        let log = if after_giveback {
            Step::DiscardOwnLog
        } else {
            Step::ReplayOwnLog
        };
        self.start_procedure(
            ProcedureKind::Resume { after_giveback },
            &[
                Step::RegisterOwn,
                Step::RecheckMailbox,
                Step::OpenOwnAggregate,
                log,
                Step::TakeOwnIps,
                Step::ServeOwnExports,
            ],
            out,
        );
    }

    fn on_fenced_out(&mut self, out: &mut Vec<Action>) {
        if matches!(self.state, State::Booting | State::TakenOver) {
            return;
        }
        self.alarm(Alarm::FencedOut, out);
        self.halt("fenced out by partner", out);
    }

    // ---- mailbox -----------------------------------------------------------------------

    fn on_mailbox(&mut self, view: Option<MailboxView>, out: &mut Vec<Action>) {
        let Some(view) = view else {
            self.mailbox_access = false;
            if !self.mailbox_alarm_raised {
                self.mailbox_alarm_raised = true;
                self.alarm(Alarm::MailboxAccessLost, out);
            }
            return;
        };
        if !self.mailbox_access {
            // Access came back: silence must be measured afresh.
            self.mailbox_last_change_ms = Some(self.now_ms);
        }
        self.mailbox_access = true;
        self.mailbox_alarm_raised = false;
        if let Some(slot) = view.partner_slot {
            // The mailbox is the channel that still works when the interconnect does not: a
            // partner acknowledging writes our mirror lacks says so here, before the first one.
            if slot.unmirrored && self.mirror_current {
                self.mirror_current = false;
                self.mirror_not_current_since_ms = Some(self.now_ms);
            }
            if self.mailbox_last_counter != Some(slot.counter) {
                self.mailbox_last_counter = Some(slot.counter);
                self.mailbox_last_change_ms = Some(self.now_ms);
            }
            self.mailbox_partner_state = Some(slot.state);
            if self.state == State::AwaitingShutdown
                && (slot.state == State::TakenOver || slot.clean_shutdown)
            {
                // Clean shutdown is marked only after a successful final CP.
                self.partner_shut_down(slot.clean_shutdown, "mailbox", out);
                return;
            }
        }
        match self.state {
            State::Booting => {
                if view.please_die_for_me {
                    self.transition(State::TakenOver, "please-die in mailbox at boot");
                    self.send_heartbeat(out);
                } else {
                    self.continue_takeover = view.please_die_for_partner;
                    self.transition(State::Resuming, "no please-die at boot");
                    self.start_resume(false, out);
                }
            }
            State::Normal
            | State::TakeoverRequested
            | State::Resuming
            | State::ShuttingDown
            | State::AwaitingShutdown
                if view.please_die_for_me =>
            {
                self.halt("please-die in mailbox", out);
            }
            _ => {}
        }
    }

    // ---- timers ------------------------------------------------------------------------

    fn send_heartbeat(&mut self, out: &mut Vec<Action>) {
        self.hb_counter += 1;
        self.next_heartbeat_ms = self.now_ms + self.cfg.heartbeat_interval_ms;
        out.push(Action::Send(Message::Heartbeat {
            state: self.state,
            protocol_version: self.cfg.protocol_version,
            // Not "acknowledges nothing, so nothing is missing": a node that stopped
            // serving may hold writes it acknowledged unmirrored. In sync is what the data
            // plane says, or a final CP put the whole log on the members.
            mirror_in_sync: self.own_mirror_in_sync || self.own_log_settled,
        }));
        out.push(Action::WriteMailbox {
            counter: self.hb_counter,
            state: self.state,
            clean_shutdown: self.state == State::TakenOver
                && self.proc_has_done(Step::MarkCleanShutdown),
        });
    }

    fn send_please_die(&mut self, out: &mut Vec<Action>) {
        self.next_please_die_ms = self.now_ms + self.cfg.please_die_interval_ms;
        out.push(Action::Send(Message::PleaseDie {
            epoch: self.takeover_epoch,
        }));
        out.push(Action::SetPartnerPleaseDie(true));
    }

    fn on_tick(&mut self, out: &mut Vec<Action>) {
        let now = self.now_ms;
        if self.state != State::Booting && now >= self.next_heartbeat_ms {
            self.send_heartbeat(out);
            match self.state {
                // Re-send what may have been lost; the receiver ignores duplicates.
                State::AwaitingShutdown => out.push(Action::Send(Message::PleaseShutdown {
                    countdown_ms: self
                        .countdown_deadline_ms
                        .map_or(0, |d| d.saturating_sub(now)),
                })),
                State::GivingBack if self.awaiting_resume => {
                    out.push(Action::Send(Message::Giveback {
                        epoch: self.takeover_epoch,
                    }));
                }
                _ => {}
            }
        }
        let holds_partner = matches!(self.state, State::TakingOver | State::InTakeover)
            || (self.state == State::GivingBack
                && !self.awaiting_resume
                && !self.proc_has_started(Step::ReleaseFence));
        if holds_partner && self.fenced && now >= self.next_please_die_ms {
            self.send_please_die(out);
        }
        self.retry_due(out);
        match self.state {
            State::TakeoverRequested if self.request_deadline_ms.is_some_and(|d| now >= d) => {
                self.request_deadline_ms = None;
                self.refuse(
                    RequestKind::TakeoverOfSelf,
                    vec![RefusalReason::NoAnswer],
                    out,
                );
                self.transition(State::Normal, "no answer to please takeover");
            }
            State::AwaitingShutdown
                if self.countdown_deadline_ms.is_some_and(|d| now >= d) && !self.mirror_current =>
            {
                // The partner acknowledged writes our mirror lacks since the countdown began
                // (*please shutdown* lost, say, and it served on): forcing would replay a stale
                // log over them. Refused, as a hard takeover would be.
                self.countdown_deadline_ms = None;
                let reasons = vec![RefusalReason::MirrorNotCurrent {
                    since_ms: self.mirror_not_current_since_ms,
                }];
                out.push(Action::Send(Message::Refused {
                    request: RequestKind::TakeoverOfPartner,
                    reasons: reasons.clone(),
                }));
                self.refuse(RequestKind::TakeoverOfPartner, reasons, out);
                self.transition(
                    State::Normal,
                    "countdown ran out with the mirror not current: no forced takeover",
                );
            }
            State::AwaitingShutdown if self.countdown_deadline_ms.is_some_and(|d| now >= d) => {
                out.push(Action::Send(Message::Takeover));
                self.begin_takeover(TakeoverKind::Forced, out);
            }
            State::Normal => {
                self.check_partner_liveness(out);
                self.check_orphaned_partner(out);
            }
            State::GivingBack if self.awaiting_resume => self.check_partner_liveness(out),
            State::InTakeover => {
                let waited = self
                    .partner_ready_since_ms
                    .is_some_and(|t| now.saturating_sub(t) >= self.cfg.auto_giveback_delay_ms);
                if self.auto_giveback && !self.flapping && waited && self.interconnect_alive() {
                    self.try_giveback(true, out);
                }
            }
            _ => {}
        }
    }

    /// The partner waits for giveback, yet we serve nothing of it: nobody serves its
    /// aggregate. Take it over properly (fence, replay) so that a giveback can follow; a
    /// blind "giveback" here could make it discard a log only we have replayed.
    fn check_orphaned_partner(&mut self, out: &mut Vec<Action>) {
        if self.state != State::Normal
            || self.partner_state != Some(State::TakenOver)
            || !self.interconnect_alive()
        {
            self.orphan_refusal_raised = false;
            return;
        }
        let reasons = self.takeover_refusals(true, true);
        if reasons.is_empty() {
            self.orphan_refusal_raised = false;
            self.begin_takeover(TakeoverKind::Orphaned, out);
        } else if !self.orphan_refusal_raised {
            // Nobody serves the partner's aggregate: say why, once (an operator must act,
            // e.g. restart hapaird on the partner so that it resumes with its own log).
            self.orphan_refusal_raised = true;
            self.refuse(RequestKind::TakeoverOfPartner, reasons.clone(), out);
            self.alarm(Alarm::PartnerDownCannotTakeOver { reasons }, out);
        }
    }

    fn check_partner_liveness(&mut self, out: &mut Vec<Action>) {
        if !self.interconnect_silent() {
            self.hard_refusal_raised = false;
            return;
        }
        if !self.mailbox_access {
            return; // MailboxAccessLost already raised: cannot tell a dead partner.
        }
        if !self.mailbox_silent() {
            if !self.interconnect_alarm_raised {
                self.interconnect_alarm_raised = true;
                let since = self.partner_last_heard_ms.unwrap_or(self.boot_ms);
                self.alarm(Alarm::InterconnectDown { since_ms: since }, out);
            }
            return;
        }
        // A partner known to be taken over serves nothing and is fenced already... by whom?
        // If it is silent everywhere it is dead: take it over as any dead partner.
        let mut reasons = self.takeover_refusals(false, false);
        if self.awaiting_resume {
            // Gave back, and the partner died before resuming: it is fenced out of nothing
            // it holds, and its aggregate is unserved.
            reasons.retain(|r| *r != RefusalReason::GivebackInProgress);
        }
        if reasons.is_empty() {
            self.begin_takeover(TakeoverKind::Hard, out);
        } else if !self.hard_refusal_raised {
            self.hard_refusal_raised = true;
            self.refuse(RequestKind::HardTakeover, reasons.clone(), out);
            self.alarm(Alarm::PartnerDownCannotTakeOver { reasons }, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn cfg(node: NodeId) -> Config {
        let mut c = Config::new(node);
        c.countdown_ms = 5_000;
        c.holddown_ms = 60_000;
        c
    }

    /// The transition list as the design states it, written independently of the match.
    const LEGAL: &[(State, State)] = &[
        (State::Booting, State::Resuming),
        (State::Booting, State::TakenOver),
        (State::Resuming, State::Normal),
        (State::Resuming, State::TakenOver),
        (State::Normal, State::TakeoverRequested),
        (State::Normal, State::ShuttingDown),
        (State::Normal, State::TakenOver),
        (State::Normal, State::AwaitingShutdown),
        (State::Normal, State::TakingOver),
        (State::TakeoverRequested, State::Normal),
        (State::TakeoverRequested, State::ShuttingDown),
        (State::TakeoverRequested, State::TakenOver),
        (State::ShuttingDown, State::TakenOver),
        (State::TakenOver, State::Resuming),
        (State::AwaitingShutdown, State::TakingOver),
        (State::AwaitingShutdown, State::Normal),
        (State::AwaitingShutdown, State::ShuttingDown),
        (State::AwaitingShutdown, State::TakenOver),
        (State::TakingOver, State::InTakeover),
        (State::TakingOver, State::Normal),
        (State::TakingOver, State::TakenOver),
        (State::InTakeover, State::GivingBack),
        (State::InTakeover, State::TakenOver),
        (State::GivingBack, State::Normal),
        (State::GivingBack, State::TakenOver),
        (State::GivingBack, State::TakingOver),
    ];

    #[test]
    fn transition_table_matches_design_and_rejects_the_rest() {
        let legal: BTreeSet<_> = LEGAL.iter().copied().collect();
        for from in State::ALL {
            for to in State::ALL {
                let r = check_transition(from, to);
                if legal.contains(&(from, to)) {
                    assert_eq!(r, Ok(()), "{from:?} -> {to:?} should be legal");
                } else {
                    assert_eq!(
                        r,
                        Err(TakeoverError::IllegalTransition { from, to }),
                        "{from:?} -> {to:?} should be illegal"
                    );
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "illegal takeover state transition")]
    fn illegal_transition_is_a_debug_assert() {
        let mut n = Node::new(cfg(NodeId::A), 0).unwrap();
        n.transition(State::InTakeover, "test");
    }

    /// A test harness: a node with a healthy, visible, in-sync partner.
    struct H {
        n: Node,
        t: u64,
    }

    impl H {
        fn booted(node: NodeId) -> H {
            H::booted_with(cfg(node))
        }

        fn booted_with(c: Config) -> H {
            let mut h = H {
                n: Node::new(c, 0).unwrap(),
                t: 0,
            };
            h.ev(Event::PartnerDisks {
                visible: 4,
                expected: 4,
            });
            h.ev(Event::OwnMirror { in_sync: true });
            h.ev(Event::MailboxRead(Some(h.view(1, State::Normal, false))));
            assert_eq!(h.n.state(), State::Resuming);
            h.finish_resume();
            assert_eq!(h.n.state(), State::Normal);
            // The journal opened by the resume reports its mirror current.
            h.ev(Event::OwnMirror { in_sync: true });
            h.hb(State::Normal, true);
            h
        }

        fn view(&self, counter: u64, state: State, pd: bool) -> MailboxView {
            MailboxView {
                partner_slot: Some(MailboxSlot {
                    counter,
                    state,
                    clean_shutdown: false,
                    unmirrored: false,
                }),
                please_die_for_me: pd,
                please_die_for_partner: false,
            }
        }

        fn ev(&mut self, e: Event) -> Vec<Action> {
            self.n.step(self.t, e)
        }

        fn at(&mut self, t: u64, e: Event) -> Vec<Action> {
            self.t = t;
            self.n.step(t, e)
        }

        fn hb(&mut self, state: State, in_sync: bool) -> Vec<Action> {
            self.ev(Event::Message(Message::Heartbeat {
                state,
                protocol_version: 1,
                mirror_in_sync: in_sync,
            }))
        }

        /// The last refusal was `request`, for a mirror not current since `since_ms`, and
        /// `actions` raised the alarm that the partner's aggregate goes unserved.
        fn refused_for_a_stale_mirror(
            &self,
            actions: &[Action],
            request: RequestKind,
            since_ms: u64,
        ) {
            let r = self.last_refusal();
            assert_eq!(r.request, request);
            assert_eq!(
                r.reasons,
                vec![RefusalReason::MirrorNotCurrent {
                    since_ms: Some(since_ms)
                }]
            );
            assert!(
                actions
                    .iter()
                    .any(|x| matches!(x, Action::Alarm(Alarm::PartnerDownCannotTakeOver { .. }))),
                "{actions:?}"
            );
        }

        fn msg(&mut self, m: Message) -> Vec<Action> {
            self.ev(Event::Message(m))
        }

        fn done(&mut self, s: Step) -> Vec<Action> {
            self.ev(Event::StepDone(s))
        }

        /// Complete the running steps in order, checking each is the expected one.
        fn run(&mut self, steps: &[Step]) -> Vec<Action> {
            let mut last = Vec::new();
            for s in steps {
                assert!(
                    self.n
                        .proc
                        .as_ref()
                        .and_then(|p| p.current)
                        .is_some_and(|c| c.0 == *s),
                    "expected {s:?} running, state {:?}",
                    self.n.state()
                );
                self.t += 10;
                last = if *s == Step::RecheckMailbox {
                    self.ev(Event::MailboxChecked { please_die: false })
                } else {
                    self.done(*s)
                };
            }
            last
        }

        fn finish_resume(&mut self) {
            let log = if self.n.proc.as_ref().is_some_and(|p| {
                p.kind
                    == ProcedureKind::Resume {
                        after_giveback: true,
                    }
            }) {
                Step::DiscardOwnLog
            } else {
                Step::ReplayOwnLog
            };
            self.run(&[
                Step::RegisterOwn,
                Step::RecheckMailbox,
                Step::OpenOwnAggregate,
                log,
                Step::TakeOwnIps,
                Step::ServeOwnExports,
            ]);
        }

        fn takeover_steps(&mut self) -> Vec<Action> {
            self.run(&[
                Step::Fence,
                Step::OpenPartnerAggregate,
                Step::ReplayPartnerLog,
                Step::TakePartnerIdentity,
                Step::ServePartnerExports,
            ])
        }

        fn in_takeover(node: NodeId) -> H {
            let mut h = H::booted(node);
            h.ev(Event::Operator(OperatorCmd::TakeoverOf(node.partner())));
            assert_eq!(h.n.state(), State::AwaitingShutdown);
            h.msg(Message::ShutdownComplete {
                final_cp_ok: true,
                elapsed_ms: 1,
            });
            h.takeover_steps();
            assert_eq!(h.n.state(), State::InTakeover);
            h
        }

        fn taken_over(node: NodeId) -> H {
            let mut h = H::booted(node);
            h.msg(Message::PleaseShutdown {
                countdown_ms: 5_000,
            });
            h.run(&SHUTDOWN);
            assert_eq!(h.n.state(), State::TakenOver);
            h.msg(Message::PleaseDie { epoch: 100 });
            h
        }

        fn last_refusal(&self) -> Refusal {
            self.n.refusals.back().cloned().expect("a refusal")
        }

        fn seen(&self) -> BTreeSet<(State, State)> {
            self.n.transitions.iter().map(|t| (t.from, t.to)).collect()
        }
    }

    const SHUTDOWN: [Step; 7] = [
        Step::StopAccepting,
        Step::DrainInFlight,
        Step::FinalCp,
        Step::ReleaseServiceIps,
        Step::CloseClients,
        Step::MarkCleanShutdown,
        Step::StopHeartbeats,
    ];

    const GIVEBACK: [Step; 5] = [
        Step::DrainPartnerExports,
        Step::CpPartnerAggregate,
        Step::ReleasePartnerIps,
        Step::ClosePartnerAggregate,
        Step::ReleaseFence,
    ];

    fn sends(actions: &[Action], pred: impl Fn(&Message) -> bool) -> bool {
        actions
            .iter()
            .any(|a| matches!(a, Action::Send(m) if pred(m)))
    }

    // ---- every legal transition, taken through `step` ----------------------------------

    fn all_scenarios() -> Vec<H> {
        let mut hs = Vec::new();
        // Booting -> Resuming -> Normal -> TakeoverRequested -> ShuttingDown -> TakenOver
        // -> Resuming (giveback) -> Normal
        let mut h = H::booted(NodeId::A);
        h.ev(Event::Operator(OperatorCmd::TakeoverSelf));
        h.msg(Message::PleaseShutdown {
            countdown_ms: 5_000,
        });
        h.run(&SHUTDOWN);
        h.msg(Message::Giveback { epoch: 7 });
        h.finish_resume();
        assert_eq!(h.n.state(), State::Normal);
        hs.push(h);
        // Booting -> TakenOver (please-die at boot)
        let mut h = H {
            n: Node::new(cfg(NodeId::B), 0).unwrap(),
            t: 0,
        };
        let v = h.view(1, State::InTakeover, true);
        h.ev(Event::MailboxRead(Some(v)));
        assert_eq!(h.n.state(), State::TakenOver);
        hs.push(h);
        // Resuming -> TakenOver (please-die found by re-check)
        let mut h = H {
            n: Node::new(cfg(NodeId::B), 0).unwrap(),
            t: 0,
        };
        let v = h.view(1, State::Normal, false);
        h.ev(Event::MailboxRead(Some(v)));
        h.done(Step::RegisterOwn);
        let a = h.ev(Event::MailboxChecked { please_die: true });
        assert!(a.contains(&Action::HaltSelf));
        assert_eq!(h.n.state(), State::TakenOver);
        hs.push(h);
        // Normal -> ShuttingDown -> TakenOver, Normal -> TakenOver (forced)
        hs.push(H::taken_over(NodeId::B));
        let mut h = H::booted(NodeId::B);
        h.msg(Message::Takeover);
        assert_eq!(h.n.state(), State::TakenOver);
        hs.push(h);
        // TakeoverRequested -> Normal (refusal), TakeoverRequested -> TakenOver (forced)
        let mut h = H::booted(NodeId::A);
        h.ev(Event::Operator(OperatorCmd::TakeoverSelf));
        h.msg(Message::Refused {
            request: RequestKind::PleaseTakeover,
            reasons: vec![RefusalReason::NoAnswer],
        });
        assert_eq!(h.n.state(), State::Normal);
        h.ev(Event::Operator(OperatorCmd::TakeoverSelf));
        h.msg(Message::Takeover);
        assert_eq!(h.n.state(), State::TakenOver);
        hs.push(h);
        // Normal -> AwaitingShutdown -> TakingOver -> InTakeover -> GivingBack -> Normal
        let mut h = H::in_takeover(NodeId::A);
        h.hb(State::TakenOver, true);
        h.ev(Event::Operator(OperatorCmd::Giveback));
        h.run(&GIVEBACK);
        assert_eq!(
            h.n.state(),
            State::GivingBack,
            "waits for the partner to resume"
        );
        h.hb(State::Resuming, true);
        assert_eq!(h.n.state(), State::Normal);
        hs.push(h);
        // GivingBack -> TakingOver: the partner dies before resuming.
        let mut h = H::in_takeover(NodeId::A);
        h.hb(State::TakenOver, true);
        h.ev(Event::Operator(OperatorCmd::Giveback));
        h.run(&GIVEBACK);
        assert!(!h.n.writes_partner() && !h.n.accepts_partner());
        let t = h.t;
        let a = h.at(t + 500, Event::Tick);
        assert!(
            sends(&a, |m| matches!(m, Message::Giveback { .. })),
            "re-sent until confirmed"
        );
        h.at(t + 11_000, Event::Tick);
        assert_eq!(h.n.state(), State::TakingOver);
        hs.push(h);
        // AwaitingShutdown -> Normal (refused), AwaitingShutdown -> ShuttingDown (tie-break)
        let mut h = H::booted(NodeId::B);
        h.ev(Event::Operator(OperatorCmd::TakeoverOf(NodeId::A)));
        h.msg(Message::Refused {
            request: RequestKind::PleaseShutdown,
            reasons: vec![RefusalReason::TakeoverInProgress],
        });
        assert_eq!(h.n.state(), State::Normal);
        h.ev(Event::Operator(OperatorCmd::TakeoverOf(NodeId::A)));
        h.msg(Message::PleaseShutdown {
            countdown_ms: 5_000,
        });
        assert_eq!(h.n.state(), State::ShuttingDown, "B yields to A");
        hs.push(h);
        // AwaitingShutdown -> TakenOver (please die: partner fenced us first)
        let mut h = H::booted(NodeId::B);
        h.ev(Event::Operator(OperatorCmd::TakeoverOf(NodeId::A)));
        h.msg(Message::PleaseDie { epoch: 3 });
        assert_eq!(h.n.state(), State::TakenOver);
        hs.push(h);
        // Normal -> TakingOver (hard), TakingOver -> Normal (fence keeps failing)
        let mut h = H::booted(NodeId::A);
        h.at(6_000, Event::Tick);
        h.at(11_000, Event::Tick);
        assert_eq!(h.n.state(), State::TakingOver);
        for k in 0..MAX_FENCE_FAILURES {
            h.ev(Event::StepFailed {
                step: Step::Fence,
                error: StepError::Failed("io".into()),
            });
            assert_eq!(h.n.state(), State::TakingOver, "retried");
            let t = h.t + 1_000;
            assert!(
                h.at(t, Event::Tick).contains(&Action::Begin(Step::Fence)),
                "retry {k}"
            );
        }
        h.ev(Event::StepFailed {
            step: Step::Fence,
            error: StepError::Failed("io".into()),
        });
        assert_eq!(h.n.state(), State::Normal);
        hs.push(h);
        // TakingOver -> TakenOver (fence lost)
        let mut h = H::booted(NodeId::B);
        h.ev(Event::Operator(OperatorCmd::TakeoverOf(NodeId::A)));
        h.t += 5_000;
        h.ev(Event::Tick);
        assert_eq!(h.n.state(), State::TakingOver);
        h.ev(Event::StepFailed {
            step: Step::Fence,
            error: StepError::ReservationConflict,
        });
        assert_eq!(h.n.state(), State::TakenOver);
        hs.push(h);
        // InTakeover -> TakenOver (fenced out)
        let mut h = H::in_takeover(NodeId::A);
        h.ev(Event::FencedOut);
        assert_eq!(h.n.state(), State::TakenOver);
        hs.push(h);
        // GivingBack -> TakenOver (fenced out during giveback)
        let mut h = H::in_takeover(NodeId::A);
        h.hb(State::TakenOver, true);
        h.ev(Event::Operator(OperatorCmd::Giveback));
        assert_eq!(h.n.state(), State::GivingBack);
        h.ev(Event::FencedOut);
        assert_eq!(h.n.state(), State::TakenOver);
        hs.push(h);
        hs
    }

    #[test]
    fn every_legal_transition_is_taken_by_some_scenario() {
        let mut seen = BTreeSet::new();
        for h in all_scenarios() {
            for (from, to) in h.seen() {
                assert!(check_transition(from, to).is_ok());
                seen.insert((from, to));
            }
            assert!(h
                .n
                .alarms
                .iter()
                .all(|e| !matches!(e.alarm, Alarm::IllegalTransition { .. })));
        }
        let legal: BTreeSet<_> = LEGAL.iter().copied().collect();
        let missing: Vec<_> = legal.difference(&seen).collect();
        assert!(
            missing.is_empty(),
            "legal transitions never taken: {missing:?}"
        );
    }

    // ---- the graceful flow, step by step -----------------------------------------------

    #[test]
    fn please_takeover_leads_to_please_shutdown_and_countdown() {
        let mut h = H::booted(NodeId::B);
        let a = h.msg(Message::PleaseTakeover);
        assert!(sends(&a, |m| matches!(
            m,
            Message::PleaseShutdown {
                countdown_ms: 5_000
            }
        )));
        assert_eq!(h.n.state(), State::AwaitingShutdown);
        assert_eq!(h.n.status().countdown_remaining_ms, Some(5_000));
        h.t += 2_000;
        h.ev(Event::Tick);
        assert_eq!(h.n.status().countdown_remaining_ms, Some(3_000));
    }

    #[test]
    fn shutdown_steps_run_in_order_and_report_completion() {
        let mut h = H::booted(NodeId::A);
        assert!(h.n.accepts_own());
        let a = h.msg(Message::PleaseShutdown {
            countdown_ms: 5_000,
        });
        assert_eq!(a, vec![Action::Begin(Step::StopAccepting)]);
        assert!(!h.n.accepts_own(), "stops accepting as the step begins");
        h.t += 1;
        let a = h.done(Step::StopAccepting);
        assert_eq!(a, vec![Action::Begin(Step::DrainInFlight)]);
        assert!(h.n.writes_own(), "drain and final CP still write");
        h.done(Step::DrainInFlight);
        // A failed final CP does not stop the shutdown.
        let a = h.ev(Event::StepFailed {
            step: Step::FinalCp,
            error: StepError::Failed("x".into()),
        });
        assert!(a.contains(&Action::Begin(Step::ReleaseServiceIps)));
        assert!(!h.n.writes_own());
        // ... but the mailbox is not told "clean shutdown": the log holds writes the members
        // lack.
        let a = h.run(&[
            Step::ReleaseServiceIps,
            Step::CloseClients,
            Step::StopHeartbeats,
        ]);
        assert!(sends(&a, |m| matches!(
            m,
            Message::ShutdownComplete {
                final_cp_ok: false,
                ..
            }
        )));
        assert_eq!(h.n.state(), State::TakenOver);
        assert!(sends(&a, |m| matches!(
            m,
            Message::Heartbeat {
                state: State::TakenOver,
                ..
            }
        )));
    }

    #[test]
    fn takeover_phases_are_timed_and_fence_comes_first() {
        let mut h = H::booted(NodeId::A);
        h.ev(Event::Operator(OperatorCmd::TakeoverOf(NodeId::B)));
        let a = h.msg(Message::ShutdownComplete {
            final_cp_ok: true,
            elapsed_ms: 3,
        });
        assert_eq!(a.last(), Some(&Action::Begin(Step::Fence)));
        assert!(!h.n.writes_partner());
        assert_eq!(h.n.ack_mode(), AckMode::Mirrored, "partner not fenced yet");
        h.t += 100;
        let a = h.done(Step::Fence);
        assert!(a.contains(&Action::SetAckMode(AckMode::LocalOnly)));
        assert!(h.n.partner_fenced());
        h.t += 200;
        h.done(Step::OpenPartnerAggregate);
        h.t += 300;
        h.done(Step::ReplayPartnerLog);
        h.t += 400;
        h.done(Step::TakePartnerIdentity);
        h.t += 500;
        let a = h.done(Step::ServePartnerExports);
        assert!(sends(&a, |m| matches!(m, Message::PleaseDie { .. })));
        assert!(a.contains(&Action::SetPartnerPleaseDie(true)));
        let st = h.n.status();
        let tk = st.last_takeover.expect("report");
        assert_eq!(tk.kind, ProcedureKind::Takeover(TakeoverKind::Graceful));
        assert!(tk.fenced);
        let ms: Vec<_> = tk.phases.iter().map(|p| (p.step, p.elapsed_ms())).collect();
        assert_eq!(
            ms,
            vec![
                (Step::Fence, 100),
                (Step::OpenPartnerAggregate, 200),
                (Step::ReplayPartnerLog, 300),
                (Step::TakePartnerIdentity, 400),
                (Step::ServePartnerExports, 500),
            ]
        );
        assert_eq!(tk.finished_ms.unwrap() - tk.started_ms, 1_500);
        assert!(h.n.accepts_partner() && h.n.writes_partner());
    }

    #[test]
    fn partner_steps_never_start_before_fenced() {
        let mut h = H::booted(NodeId::A);
        h.ev(Event::Operator(OperatorCmd::TakeoverOf(NodeId::B)));
        h.msg(Message::ShutdownComplete {
            final_cp_ok: true,
            elapsed_ms: 3,
        });
        // Completions of steps that were never started are ignored.
        for s in [Step::OpenPartnerAggregate, Step::ServePartnerExports] {
            let a = h.done(s);
            assert!(a.is_empty());
        }
        assert_eq!(h.n.state(), State::TakingOver);
        assert!(!h.n.writes_partner());
        // A failing fence (io) is retried, then abandoned, never skipped.
        for _ in 0..=MAX_FENCE_FAILURES {
            let a = h.ev(Event::StepFailed {
                step: Step::Fence,
                error: StepError::Failed("io".into()),
            });
            assert!(!a
                .iter()
                .any(|x| matches!(x, Action::Begin(Step::OpenPartnerAggregate))));
            h.t += 1_000;
            let a = h.ev(Event::Tick);
            assert!(!a
                .iter()
                .any(|x| matches!(x, Action::Begin(Step::OpenPartnerAggregate))));
            assert!(!h.n.writes_partner());
        }
        assert_eq!(h.n.state(), State::Normal);
    }

    #[test]
    fn unsafe_flag_skips_the_fence() {
        let mut c = cfg(NodeId::A);
        c.unsafe_skip_fence = true;
        let mut h = H::booted_with(c);
        h.ev(Event::Operator(OperatorCmd::TakeoverOf(NodeId::B)));
        let a = h.msg(Message::ShutdownComplete {
            final_cp_ok: true,
            elapsed_ms: 3,
        });
        assert_eq!(a.last(), Some(&Action::Begin(Step::OpenPartnerAggregate)));
        h.run(&[
            Step::OpenPartnerAggregate,
            Step::ReplayPartnerLog,
            Step::TakePartnerIdentity,
            Step::ServePartnerExports,
        ]);
        assert_eq!(h.n.state(), State::InTakeover);
        assert!(!h.n.status().last_takeover.unwrap().fenced);
        assert_eq!(
            h.n.ack_mode(),
            AckMode::Mirrored,
            "unfenced partner: never local-only"
        );
    }

    #[test]
    fn countdown_expiry_forces_takeover() {
        let mut h = H::booted(NodeId::A);
        h.ev(Event::Operator(OperatorCmd::TakeoverOf(NodeId::B)));
        let t0 = h.t;
        h.hb(State::ShuttingDown, true);
        h.at(t0 + 4_999, Event::Tick);
        assert_eq!(h.n.state(), State::AwaitingShutdown);
        let a = h.at(t0 + 5_000, Event::Tick);
        assert!(sends(&a, |m| *m == Message::Takeover));
        assert!(a.contains(&Action::Begin(Step::Fence)));
        assert_eq!(h.n.state(), State::TakingOver);
        h.takeover_steps();
        let tk = h.n.status().last_takeover.unwrap();
        assert_eq!(tk.kind, ProcedureKind::Takeover(TakeoverKind::Forced));
    }

    /// The countdown runs out after the partner said (in the mailbox) that it acknowledges
    /// writes our mirror lacks: no forced takeover, which would replay a stale log; refused
    /// with the reason, back to normal.
    #[test]
    fn countdown_expiry_with_a_stale_mirror_refuses() {
        let mut h = H::booted(NodeId::A);
        h.ev(Event::Operator(OperatorCmd::TakeoverOf(NodeId::B)));
        let t0 = h.t;
        assert_eq!(h.n.state(), State::AwaitingShutdown);
        let mut v = h.view(7, State::Normal, false);
        if let Some(s) = v.partner_slot.as_mut() {
            s.unmirrored = true;
        }
        h.at(t0 + 1_000, Event::MailboxRead(Some(v)));
        let a = h.at(t0 + 5_000, Event::Tick);
        assert!(!sends(&a, |m| *m == Message::Takeover));
        assert!(!a.contains(&Action::Begin(Step::Fence)));
        assert_eq!(h.n.state(), State::Normal);
        let r = h.last_refusal();
        assert_eq!(r.request, RequestKind::TakeoverOfPartner);
        assert!(
            matches!(
                r.reasons[..],
                [RefusalReason::MirrorNotCurrent { since_ms: Some(_) }]
            ),
            "{r:?}"
        );
    }

    #[test]
    fn takeover_starts_when_mailbox_or_heartbeat_says_shut_down() {
        let mut h = H::booted(NodeId::A);
        h.ev(Event::Operator(OperatorCmd::TakeoverOf(NodeId::B)));
        h.hb(State::TakenOver, true);
        assert_eq!(h.n.state(), State::TakingOver);
        let mut h = H::booted(NodeId::A);
        h.ev(Event::Operator(OperatorCmd::TakeoverOf(NodeId::B)));
        let mut v = h.view(9, State::ShuttingDown, false);
        v.partner_slot.as_mut().unwrap().clean_shutdown = true;
        h.ev(Event::MailboxRead(Some(v)));
        assert_eq!(h.n.state(), State::TakingOver);
    }

    #[test]
    fn forced_takeover_halts_a_shutting_down_node() {
        let mut h = H::booted(NodeId::B);
        h.msg(Message::PleaseShutdown {
            countdown_ms: 5_000,
        });
        h.done(Step::StopAccepting);
        let a = h.msg(Message::Takeover);
        assert_eq!(a.first(), Some(&Action::HaltSelf));
        assert_eq!(h.n.state(), State::TakenOver);
        // Late completions of the abandoned shutdown are ignored.
        assert!(h.done(Step::DrainInFlight).is_empty());
        assert!(!h.n.writes_own());
    }

    // ---- hard takeover and the interconnect alarm ---------------------------------------

    #[test]
    fn hard_takeover_only_when_interconnect_and_mailbox_are_silent() {
        let mut h = H::booted(NodeId::A);
        let v = h.view(2, State::Normal, false);
        h.at(1_000, Event::MailboxRead(Some(v)));
        // Interconnect silent from t=0, mailbox alive: alarm, no takeover.
        for t in (2_000..=30_000).step_by(1_000) {
            let v = h.view(t, State::Normal, false);
            h.at(t, Event::MailboxRead(Some(v)));
            h.at(t, Event::Tick);
        }
        assert_eq!(h.n.state(), State::Normal);
        let alarms: Vec<_> =
            h.n.alarms
                .iter()
                .filter(|e| matches!(e.alarm, Alarm::InterconnectDown { .. }))
                .collect();
        assert_eq!(alarms.len(), 1, "raised once, not per tick");
        // Now the mailbox stops too.
        h.at(39_999, Event::Tick);
        assert_eq!(h.n.state(), State::Normal);
        let a = h.at(40_000, Event::Tick);
        assert_eq!(h.n.state(), State::TakingOver);
        assert!(a.contains(&Action::Begin(Step::Fence)));
    }

    /// Takeover epochs count from the daemon's wall-clock start, not from 0: after the taker
    /// restarts, its next takeover's epoch is still above the one its partner last died for,
    /// so that the partner takes the giveback for the current takeover, not for a stale one.
    #[test]
    fn takeover_epochs_grow_across_restarts() {
        let hard_takeover = |origin: u64| {
            let mut h = H::booted(NodeId::A);
            h.n.set_epoch_origin(origin);
            let v = h.view(2, State::Normal, false);
            h.at(1_000, Event::MailboxRead(Some(v)));
            h.at(40_000, Event::Tick);
            assert_eq!(h.n.state(), State::TakingOver);
            h.n.takeover_epoch()
        };
        // The first incarnation, started at unix ms 1e12; the second a day later.
        let first = hard_takeover(1_000_000_000_000);
        let second = hard_takeover(1_000_000_000_000 + 86_400_000);
        assert_eq!(first, 1_000_000_040_000);
        assert!(second > first, "{second} after {first}");
        // The partner, told to die for the first, resumes on the second's giveback.
        let mut b = H::taken_over(NodeId::B);
        b.msg(Message::PleaseDie { epoch: first });
        b.msg(Message::Giveback { epoch: second });
        assert_eq!(b.n.state(), State::Resuming);
    }

    #[test]
    fn mailbox_access_loss_prevents_hard_takeover() {
        let mut h = H::booted(NodeId::A);
        let a = h.at(1_000, Event::MailboxRead(None));
        assert!(a.contains(&Action::Alarm(Alarm::MailboxAccessLost)));
        h.at(60_000, Event::Tick);
        assert_eq!(h.n.state(), State::Normal);
    }

    #[test]
    fn hard_takeover_refused_when_mirror_not_current() {
        let mut h = H::booted(NodeId::A);
        h.at(
            500,
            Event::Message(Message::Heartbeat {
                state: State::Normal,
                protocol_version: 1,
                mirror_in_sync: false,
            }),
        );
        let a = h.at(20_000, Event::Tick);
        assert_eq!(h.n.state(), State::Normal);
        h.refused_for_a_stale_mirror(&a, RequestKind::HardTakeover, 500);
        // Raised once per episode.
        let a = h.at(21_000, Event::Tick);
        assert!(!a.iter().any(|x| matches!(x, Action::Alarm(_))));
    }

    #[test]
    fn partner_unmirrored_in_the_mailbox_blocks_a_hard_takeover() {
        // The interconnect is down from the start (the partner's heartbeats said its log was
        // mirrored before that); the partner, acknowledging writes our mirror lacks, said so
        // in its mailbox slot; then it died. Taking over from our stale mirror would lose
        // those writes: refused, with the alarm.
        let mut h = H::booted(NodeId::A);
        h.at(
            100,
            Event::Message(Message::Heartbeat {
                state: State::Normal,
                protocol_version: 1,
                mirror_in_sync: true,
            }),
        );
        for t in (1_000..=3_000).step_by(1_000) {
            let mut v = h.view(t, State::Normal, false);
            v.partner_slot.as_mut().unwrap().unmirrored = t >= 2_000;
            h.at(t, Event::MailboxRead(Some(v)));
            h.at(t, Event::Tick);
        }
        let a = h.at(30_000, Event::Tick);
        assert_eq!(
            h.n.state(),
            State::Normal,
            "no takeover from a stale mirror"
        );
        h.refused_for_a_stale_mirror(&a, RequestKind::HardTakeover, 2_000);
    }

    fn heartbeat_in_sync(a: &[Action]) -> Option<bool> {
        a.iter().rev().find_map(|x| match x {
            Action::Send(Message::Heartbeat { mirror_in_sync, .. }) => Some(*mirror_in_sync),
            _ => None,
        })
    }

    #[test]
    fn a_node_that_stopped_serving_does_not_claim_its_mirror_in_sync() {
        // Acknowledging writes the partner's mirror lacks, then told to die: the log holds
        // them, and the heartbeat must not tell the partner its mirror is current (it used to:
        // "acknowledges nothing now, so nothing is missing").
        let mut h = H::booted(NodeId::A);
        h.ev(Event::OwnMirror { in_sync: false });
        let a = h.msg(Message::PleaseDie { epoch: 1 });
        assert_eq!(h.n.state(), State::TakenOver);
        assert_eq!(heartbeat_in_sync(&a), Some(false), "{a:?}");
        // A graceful shutdown whose final CP succeeded has its whole log on the members.
        let mut h = H::booted(NodeId::B);
        h.ev(Event::OwnMirror { in_sync: false });
        h.msg(Message::PleaseShutdown {
            countdown_ms: 5_000,
        });
        let a = h.run(&SHUTDOWN);
        assert_eq!(h.n.state(), State::TakenOver);
        assert_eq!(heartbeat_in_sync(&a), Some(true), "{a:?}");
        // ... and one whose final CP failed does not.
        let mut h = H::booted(NodeId::B);
        h.ev(Event::OwnMirror { in_sync: false });
        h.msg(Message::PleaseShutdown {
            countdown_ms: 5_000,
        });
        h.run(&SHUTDOWN[..2]);
        h.ev(Event::StepFailed {
            step: Step::FinalCp,
            error: StepError::Failed("x".into()),
        });
        let a = h.run(&[
            Step::ReleaseServiceIps,
            Step::CloseClients,
            Step::StopHeartbeats,
        ]);
        assert_eq!(h.n.state(), State::TakenOver);
        assert_eq!(heartbeat_in_sync(&a), Some(false), "{a:?}");
    }

    #[test]
    fn what_was_said_of_the_log_before_it_opened_does_not_outlive_the_opening() {
        // Booting with the mailbox flag clear: the log on disk is in the partner's mirror, and
        // the heartbeat says so (a crash now may be taken over from the mirror). Once the log
        // is opened, a new mirror session copies it first: until the journal says it is
        // mirrored, the heartbeat does not (it used to carry the boot-time "in sync" until the
        // monitor's next report, and a partner took the flap for a current mirror).
        let mut h = H {
            n: Node::new(cfg(NodeId::A), 0).unwrap(),
            t: 0,
        };
        h.ev(Event::OwnMirror { in_sync: true });
        h.ev(Event::MailboxRead(Some(h.view(1, State::Normal, false))));
        assert_eq!(h.n.state(), State::Resuming);
        h.run(&[
            Step::RegisterOwn,
            Step::RecheckMailbox,
            Step::OpenOwnAggregate,
        ]);
        let a = h.at(h.t + 1_000, Event::Tick);
        assert_eq!(heartbeat_in_sync(&a), Some(true), "{a:?}");
        h.run(&[Step::ReplayOwnLog, Step::TakeOwnIps, Step::ServeOwnExports]);
        assert_eq!(h.n.state(), State::Normal);
        let a = h.at(h.t + 1_000, Event::Tick);
        assert_eq!(heartbeat_in_sync(&a), Some(false), "{a:?}");
        h.ev(Event::OwnMirror { in_sync: true });
        let a = h.at(h.t + 1_000, Event::Tick);
        assert_eq!(heartbeat_in_sync(&a), Some(true), "{a:?}");
    }

    #[test]
    fn a_node_given_back_beats_before_it_says_resumed() {
        // The partner completes its giveback on "resumed" and reports what it knows then: our
        // heartbeat (Normal, the log mirrored) must be ahead of it, or the report says the
        // log is not mirrored and the node not yet serving.
        let mut h = H::booted(NodeId::B);
        h.msg(Message::PleaseShutdown {
            countdown_ms: 5_000,
        });
        h.run(&SHUTDOWN);
        assert_eq!(h.n.state(), State::TakenOver);
        h.msg(Message::Giveback { epoch: 7 });
        h.run(&[
            Step::RegisterOwn,
            Step::RecheckMailbox,
            Step::OpenOwnAggregate,
            Step::DiscardOwnLog,
            Step::TakeOwnIps,
        ]);
        h.ev(Event::OwnMirror { in_sync: true });
        let a = h.run(&[Step::ServeOwnExports]);
        assert_eq!(h.n.state(), State::Normal);
        let beat = a.iter().position(|x| {
            matches!(
                x,
                Action::Send(Message::Heartbeat {
                    state: State::Normal,
                    mirror_in_sync: true,
                    ..
                })
            )
        });
        let resumed = a
            .iter()
            .position(|x| matches!(x, Action::Send(Message::Resumed)));
        assert!(
            beat.is_some() && resumed.is_some() && beat < resumed,
            "{a:?}"
        );
    }

    /// A at `AwaitingShutdown` for B, whose mailbox slot then says it acknowledges writes our
    /// mirror lacks (the interconnect carried *please shutdown* but not its mirror traffic).
    fn awaiting_with_stale_mirror() -> H {
        let mut h = H::booted(NodeId::A);
        h.ev(Event::Operator(OperatorCmd::TakeoverOf(NodeId::B)));
        assert_eq!(h.n.state(), State::AwaitingShutdown);
        h.t = 500;
        let mut v = h.view(2, State::ShuttingDown, false);
        v.partner_slot.as_mut().unwrap().unmirrored = true;
        h.ev(Event::MailboxRead(Some(v)));
        assert_eq!(h.n.state(), State::AwaitingShutdown);
        h
    }

    #[test]
    fn graceful_takeover_needs_the_partners_final_cp_or_a_current_mirror() {
        // Final CP failed and the mirror is stale: replaying it would lose writes. Refused,
        // with the reason and the alarm; no fence.
        let mut h = awaiting_with_stale_mirror();
        let a = h.msg(Message::ShutdownComplete {
            final_cp_ok: false,
            elapsed_ms: 10,
        });
        assert!(!a.contains(&Action::Begin(Step::Fence)), "{a:?}");
        assert_eq!(h.n.state(), State::Normal);
        h.refused_for_a_stale_mirror(&a, RequestKind::TakeoverOfPartner, 500);
        // The partner's TakenOver heartbeat (its log not settled) does not start one either,
        // nor does the orphaned-partner check afterwards.
        let a = h.hb(State::TakenOver, false);
        h.t += 10_000;
        let b = h.ev(Event::Tick);
        assert!(
            !a.contains(&Action::Begin(Step::Fence)) && !b.contains(&Action::Begin(Step::Fence))
        );
        assert_eq!(h.n.state(), State::Normal);
        // ... which says, once, that nobody serves the partner's aggregate and why.
        let orphan_alarms = |a: &[Action]| {
            a.iter()
                .filter(|x| matches!(x, Action::Alarm(Alarm::PartnerDownCannotTakeOver { .. })))
                .count()
        };
        h.hb(State::TakenOver, false);
        h.t += 100;
        let c = h.ev(Event::Tick);
        assert_eq!(orphan_alarms(&c), 1, "{c:?}");
        assert_eq!(h.last_refusal().request, RequestKind::TakeoverOfPartner);
        h.hb(State::TakenOver, false);
        h.t += 100;
        assert_eq!(orphan_alarms(&h.ev(Event::Tick)), 0, "once");

        // Same, told by the heartbeat alone.
        let mut h = awaiting_with_stale_mirror();
        let a = h.hb(State::TakenOver, false);
        assert!(!a.contains(&Action::Begin(Step::Fence)), "{a:?}");
        assert_eq!(h.n.state(), State::Normal);

        // A successful final CP: the members have everything (the aggregate is closed cleanly
        // and its mirror is not replayed), so the takeover goes ahead despite the mirror.
        let mut h = awaiting_with_stale_mirror();
        let a = h.msg(Message::ShutdownComplete {
            final_cp_ok: true,
            elapsed_ms: 10,
        });
        assert_eq!(a.last(), Some(&Action::Begin(Step::Fence)), "{a:?}");
        let mut h = awaiting_with_stale_mirror();
        let a = h.hb(State::TakenOver, true);
        assert_eq!(a.last(), Some(&Action::Begin(Step::Fence)), "{a:?}");
        // The mailbox's clean-shutdown mark says the same.
        let mut h = awaiting_with_stale_mirror();
        let mut v = h.view(3, State::TakenOver, false);
        let slot = v.partner_slot.as_mut().unwrap();
        slot.unmirrored = true;
        slot.clean_shutdown = true;
        let a = h.ev(Event::MailboxRead(Some(v)));
        assert_eq!(a.last(), Some(&Action::Begin(Step::Fence)), "{a:?}");
    }

    // ---- refusals, one per reason ------------------------------------------------------

    fn refused_reasons(h: &mut H) -> Vec<RefusalReason> {
        let a = h.msg(Message::PleaseTakeover);
        assert_eq!(h.n.state(), State::Normal, "refusal keeps Normal");
        let sent = a.iter().find_map(|x| match x {
            Action::Send(Message::Refused {
                request: RequestKind::PleaseTakeover,
                reasons,
            }) => Some(reasons.clone()),
            _ => None,
        });
        let reasons = sent.expect("refusal sent to partner");
        let r = h.last_refusal();
        assert_eq!(r.reasons, reasons);
        assert_eq!(r.at_ms, h.t, "timestamped");
        reasons
    }

    #[test]
    fn refuses_when_mirror_not_current_since_t() {
        let mut h = H::booted(NodeId::B);
        h.at(
            700,
            Event::Message(Message::Heartbeat {
                state: State::Normal,
                protocol_version: 1,
                mirror_in_sync: false,
            }),
        );
        // The in-sync flag in this message would clear it; here we keep it stale.
        h.t = 900;
        let r = h.ev(Event::Message(Message::PleaseTakeover));
        let reasons = r
            .iter()
            .find_map(|x| match x {
                Action::Send(Message::Refused { reasons, .. }) => Some(reasons.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(
            reasons,
            vec![RefusalReason::MirrorNotCurrent {
                since_ms: Some(700)
            }]
        );
        // Never heard an in-sync heartbeat at all: "never".
        let mut h = H {
            n: Node::new(cfg(NodeId::B), 0).unwrap(),
            t: 0,
        };
        h.ev(Event::PartnerDisks {
            visible: 4,
            expected: 4,
        });
        let v = h.view(1, State::Normal, false);
        h.ev(Event::MailboxRead(Some(v)));
        h.finish_resume();
        h.hb(State::Normal, false);
        let reasons = refused_reasons(&mut h);
        assert_eq!(
            reasons,
            vec![RefusalReason::MirrorNotCurrent {
                since_ms: Some(h.t)
            }]
        );
    }

    #[test]
    fn refuses_when_partner_disks_not_visible() {
        let mut h = H::booted(NodeId::B);
        h.ev(Event::PartnerDisks {
            visible: 3,
            expected: 4,
        });
        assert_eq!(
            refused_reasons(&mut h),
            vec![RefusalReason::PartnerDisksNotVisible {
                visible: 3,
                expected: 4
            }]
        );
    }

    #[test]
    fn refuses_incompatible_version() {
        let mut h = H::booted(NodeId::B);
        h.ev(Event::Message(Message::Heartbeat {
            state: State::Normal,
            protocol_version: 2,
            mirror_in_sync: true,
        }));
        assert_eq!(
            refused_reasons(&mut h),
            vec![RefusalReason::IncompatibleVersion { ours: 1, theirs: 2 }]
        );
    }

    #[test]
    fn refuses_when_self_unhealthy() {
        let mut h = H::booted(NodeId::B);
        h.ev(Event::Health {
            healthy: false,
            detail: "nvram battery".into(),
        });
        assert_eq!(
            refused_reasons(&mut h),
            vec![RefusalReason::SelfUnhealthy {
                detail: "nvram battery".into()
            }]
        );
    }

    #[test]
    fn refuses_when_already_taken_over() {
        let mut h = H::in_takeover(NodeId::A);
        let a = h.msg(Message::PleaseTakeover);
        assert_eq!(h.n.state(), State::InTakeover);
        assert!(sends(&a, |m| matches!(m, Message::Refused { .. })));
        assert!(h
            .last_refusal()
            .reasons
            .contains(&RefusalReason::AlreadyTakenOver));
    }

    #[test]
    fn refuses_during_giveback_and_during_takeover() {
        let mut h = H::in_takeover(NodeId::A);
        h.hb(State::TakenOver, true);
        h.ev(Event::Operator(OperatorCmd::Giveback));
        h.ev(Event::Operator(OperatorCmd::TakeoverOf(NodeId::B)));
        assert!(h
            .last_refusal()
            .reasons
            .contains(&RefusalReason::GivebackInProgress));
        h.ev(Event::Operator(OperatorCmd::Giveback));
        assert_eq!(h.last_refusal().request, RequestKind::Giveback);
        assert!(h
            .last_refusal()
            .reasons
            .contains(&RefusalReason::GivebackInProgress));
        let mut h = H::booted(NodeId::A);
        h.ev(Event::Operator(OperatorCmd::TakeoverOf(NodeId::B)));
        h.ev(Event::Operator(OperatorCmd::TakeoverOf(NodeId::B)));
        assert!(h
            .last_refusal()
            .reasons
            .contains(&RefusalReason::TakeoverInProgress));
        assert_eq!(h.n.state(), State::AwaitingShutdown);
    }

    #[test]
    fn refuses_takeover_while_self_taken_over() {
        let mut h = H::taken_over(NodeId::B);
        h.hb(State::Normal, true);
        h.msg(Message::PleaseTakeover);
        assert_eq!(h.n.state(), State::TakenOver);
        assert_eq!(
            h.last_refusal().reasons,
            vec![RefusalReason::SelfNotServing {
                state: State::TakenOver
            }]
        );
        // And no hard takeover from TakenOver either, however silent the partner is.
        h.at(100_000, Event::Tick);
        assert_eq!(h.n.state(), State::TakenOver);
    }

    #[test]
    fn holddown_after_giveback_refuses_operator_takeover() {
        let mut h = H::in_takeover(NodeId::A);
        h.hb(State::TakenOver, true);
        h.ev(Event::Operator(OperatorCmd::Giveback));
        h.run(&GIVEBACK);
        let until = h.t + 60_000;
        h.hb(State::Normal, true);
        h.ev(Event::Operator(OperatorCmd::TakeoverOf(NodeId::B)));
        assert_eq!(
            h.last_refusal().reasons,
            vec![RefusalReason::HoldDown { until_ms: until }]
        );
        assert_eq!(h.n.state(), State::Normal);
        // b asking a to take it over again is the same ping-pong: refused here too.
        h.msg(Message::PleaseTakeover);
        assert_eq!(
            h.last_refusal().reasons,
            vec![RefusalReason::HoldDown { until_ms: until }]
        );
        assert_eq!(h.n.state(), State::Normal);
        h.t = until;
        h.hb(State::Normal, true);
        h.ev(Event::Operator(OperatorCmd::TakeoverOf(NodeId::B)));
        assert_eq!(h.n.state(), State::AwaitingShutdown);
    }

    #[test]
    fn holddown_lets_the_other_node_take_over_the_other_way_round() {
        // A rolling maintenance: b was taken over by a and given back; now a is to be
        // maintained. b's takeover of a (asked at b), or a asking b to take it over, is not a
        // ping-pong, and the hold-down does not refuse it.
        let mut b = H::booted(NodeId::B);
        b.msg(Message::PleaseShutdown {
            countdown_ms: 5_000,
        });
        b.run(&SHUTDOWN);
        b.msg(Message::Giveback { epoch: 7 });
        b.finish_resume();
        assert_eq!(b.n.state(), State::Normal);
        assert!(b.n.status().holddown_until_ms.is_some_and(|u| u > b.t));
        // b asking to be taken over by a again: the same direction, refused.
        b.hb(State::Normal, true);
        b.ev(Event::Operator(OperatorCmd::TakeoverSelf));
        assert!(matches!(
            b.last_refusal().reasons[..],
            [RefusalReason::HoldDown { .. }]
        ));
        // b taking a over: the other way round, begun.
        b.hb(State::Normal, true);
        b.ev(Event::Operator(OperatorCmd::TakeoverOf(NodeId::A)));
        assert_eq!(b.n.state(), State::AwaitingShutdown);

        // At a, the giver: a asking b to take it over is the other way round too.
        let mut a = H::in_takeover(NodeId::A);
        a.hb(State::TakenOver, true);
        a.ev(Event::Operator(OperatorCmd::Giveback));
        a.run(&GIVEBACK);
        a.hb(State::Normal, true);
        assert_eq!(a.n.state(), State::Normal);
        let acts = a.ev(Event::Operator(OperatorCmd::TakeoverSelf));
        assert!(sends(&acts, |m| *m == Message::PleaseTakeover), "{acts:?}");
        assert_eq!(a.n.state(), State::TakeoverRequested);
    }

    #[test]
    fn takeover_self_refused_when_partner_unreachable_and_times_out_without_answer() {
        let mut h = H::booted(NodeId::A);
        h.t = 6_000;
        h.ev(Event::Operator(OperatorCmd::TakeoverSelf));
        assert_eq!(h.n.state(), State::Normal);
        assert_eq!(
            h.last_refusal().reasons,
            vec![RefusalReason::PartnerUnreachable {
                last_heard_ms: Some(60)
            }]
        );
        h.hb(State::Normal, true);
        let a = h.ev(Event::Operator(OperatorCmd::TakeoverSelf));
        assert!(sends(&a, |m| *m == Message::PleaseTakeover));
        h.at(6_000 + 9_999, Event::Tick);
        assert_eq!(h.n.state(), State::TakeoverRequested);
        h.at(16_000, Event::Tick);
        assert_eq!(h.n.state(), State::Normal);
        assert_eq!(h.last_refusal().reasons, vec![RefusalReason::NoAnswer]);
    }

    #[test]
    fn giveback_refused_when_partner_not_ready_or_not_in_takeover() {
        let mut h = H::booted(NodeId::A);
        h.ev(Event::Operator(OperatorCmd::Giveback));
        assert_eq!(h.last_refusal().reasons, vec![RefusalReason::NotInTakeover]);
        let mut h = H::in_takeover(NodeId::A);
        // The partner never reported that it waits for giveback.
        h.ev(Event::Operator(OperatorCmd::Giveback));
        assert_eq!(
            h.last_refusal().reasons,
            vec![RefusalReason::PartnerNotReady {
                partner_state: Some(State::Normal)
            }]
        );
        assert_eq!(h.n.state(), State::InTakeover);
    }

    // ---- please die, giveback, resume --------------------------------------------------

    #[test]
    fn please_die_repeats_while_in_takeover_and_stops_at_release() {
        let mut h = H::in_takeover(NodeId::A);
        let t0 = h.t;
        let a = h.at(t0 + 1_000, Event::Tick);
        assert!(sends(&a, |m| matches!(m, Message::PleaseDie { .. })));
        assert!(a.contains(&Action::SetPartnerPleaseDie(true)));
        let a = h.at(t0 + 1_500, Event::Tick);
        assert!(!sends(&a, |m| matches!(m, Message::PleaseDie { .. })));
        h.hb(State::TakenOver, true);
        h.ev(Event::Operator(OperatorCmd::Giveback));
        h.run(&[Step::DrainPartnerExports, Step::CpPartnerAggregate]);
        assert_eq!(h.n.ack_mode(), AckMode::LocalOnly, "partner still fenced");
        let a = h.done(Step::ReleasePartnerIps);
        assert!(a.contains(&Action::Begin(Step::ClosePartnerAggregate)));
        // Mirrored again before the fence is released: the partner may resume after it.
        let a = h.done(Step::ClosePartnerAggregate);
        assert_eq!(
            a,
            vec![
                Action::Begin(Step::ReleaseFence),
                Action::SetAckMode(AckMode::Mirrored)
            ]
        );
        h.t += 5_000;
        let a = h.done(Step::ReleaseFence); // completes the giveback
        assert!(sends(&a, |m| matches!(m, Message::Giveback { .. })));
        let a = h.ev(Event::Tick);
        assert!(!sends(&a, |m| matches!(m, Message::PleaseDie { .. })));
    }

    #[test]
    fn taken_over_node_ignores_stale_giveback_and_resumes_on_current_one() {
        let mut h = H::taken_over(NodeId::B); // died for epoch 100
        h.msg(Message::Giveback { epoch: 50 });
        assert_eq!(h.n.state(), State::TakenOver);
        let a = h.msg(Message::Giveback { epoch: 100 });
        assert_eq!(a, vec![Action::Begin(Step::RegisterOwn)]);
        h.finish_resume();
        assert_eq!(h.n.state(), State::Normal);
        // A delayed please-die of that takeover does not halt us again.
        h.msg(Message::PleaseDie { epoch: 100 });
        assert_eq!(h.n.state(), State::Normal);
        // A newer one does.
        let a = h.msg(Message::PleaseDie { epoch: 101 });
        assert_eq!(a.first(), Some(&Action::HaltSelf));
    }

    #[test]
    fn resume_after_giveback_discards_own_log_and_boot_replays_it() {
        let mut h = H::taken_over(NodeId::B);
        h.msg(Message::Giveback { epoch: 100 });
        h.done(Step::RegisterOwn);
        h.ev(Event::MailboxChecked { please_die: false });
        let a = h.done(Step::OpenOwnAggregate);
        assert_eq!(a, vec![Action::Begin(Step::DiscardOwnLog)]);
        let mut n = Node::new(cfg(NodeId::B), 0).unwrap();
        n.step(
            0,
            Event::MailboxRead(Some(MailboxView {
                partner_slot: None,
                please_die_for_me: false,
                please_die_for_partner: false,
            })),
        );
        n.step(1, Event::StepDone(Step::RegisterOwn));
        n.step(2, Event::MailboxChecked { please_die: false });
        let a = n.step(3, Event::StepDone(Step::OpenOwnAggregate));
        assert_eq!(a, vec![Action::Begin(Step::ReplayOwnLog)]);
    }

    #[test]
    fn orphaned_partner_is_taken_over_not_blindly_given_back() {
        let mut h = H::booted(NodeId::A);
        h.hb(State::TakenOver, true);
        let a = h.ev(Event::Tick);
        assert!(!sends(&a, |m| matches!(m, Message::Giveback { .. })));
        assert_eq!(h.n.state(), State::TakingOver);
        h.takeover_steps();
        let tk = h.n.status().last_takeover.unwrap();
        assert_eq!(tk.kind, ProcedureKind::Takeover(TakeoverKind::Orphaned));
    }

    #[test]
    fn rebooted_taker_continues_its_takeover() {
        let mut h = H {
            n: Node::new(cfg(NodeId::A), 0).unwrap(),
            t: 0,
        };
        h.ev(Event::PartnerDisks {
            visible: 4,
            expected: 4,
        });
        h.ev(Event::MailboxRead(Some(MailboxView {
            partner_slot: Some(MailboxSlot {
                counter: 3,
                state: State::TakenOver,
                clean_shutdown: false,
                unmirrored: false,
            }),
            please_die_for_me: false,
            please_die_for_partner: true,
        })));
        h.finish_resume();
        assert_eq!(h.n.state(), State::TakingOver);
        h.takeover_steps();
        let tk = h.n.status().last_takeover.unwrap();
        assert_eq!(tk.kind, ProcedureKind::Takeover(TakeoverKind::Continued));
    }

    #[test]
    fn auto_giveback_is_off_by_default_and_works_when_on() {
        let mut h = H::in_takeover(NodeId::A);
        h.hb(State::TakenOver, true);
        let t0 = h.t;
        for t in (t0..t0 + 200_000).step_by(500) {
            h.at(
                t,
                Event::Message(Message::Heartbeat {
                    state: State::TakenOver,
                    protocol_version: 1,
                    mirror_in_sync: true,
                }),
            );
            h.at(t, Event::Tick);
        }
        assert_eq!(h.n.state(), State::InTakeover, "off by default");
        h.ev(Event::Operator(OperatorCmd::SetAutoGiveback(true)));
        h.ev(Event::Tick);
        assert_eq!(h.n.state(), State::GivingBack);
    }

    /// The giveback is done when the partner serves again, not when it starts resuming: its
    /// report's finish and total run to the partner's Normal heartbeat (or *resumed*).
    #[test]
    fn giveback_report_finishes_when_the_partner_serves_again() {
        let mut h = H::in_takeover(NodeId::A);
        h.hb(State::TakenOver, true);
        h.ev(Event::Operator(OperatorCmd::Giveback));
        assert_eq!(h.n.state(), State::GivingBack);
        let started = h.t;
        h.run(&GIVEBACK);
        let sent = h.t;
        let g = h.n.status().last_giveback.unwrap();
        assert_eq!(
            g.finished_ms, None,
            "steps done, the partner not serving yet"
        );
        // The partner starts resuming: we stop re-sending giveback, the giveback goes on.
        h.t += 100;
        h.hb(State::Resuming, true);
        assert_eq!(h.n.state(), State::Normal);
        let g = h.n.status().last_giveback.unwrap();
        assert_eq!(
            g.finished_ms, None,
            "finished while the partner was resuming"
        );
        let r = g.partner_resume.unwrap();
        assert_eq!((r.started_ms, r.confirmed_ms), (sent, Some(sent + 100)));
        // It serves 2.5 s later.
        h.t += 2_500;
        h.hb(State::Normal, true);
        let g = h.n.status().last_giveback.unwrap();
        assert_eq!(g.finished_ms, Some(sent + 2_600));
        assert_eq!(g.started_ms, started);
        assert_eq!(g.partner_resume.as_ref().unwrap().abandoned, None);
        // Later heartbeats do not move it.
        h.t += 1_000;
        h.hb(State::Normal, true);
        h.msg(Message::Resumed);
        assert_eq!(
            h.n.status().last_giveback.unwrap().finished_ms,
            Some(sent + 2_600)
        );

        // A partner that dies while resuming never serves: the giveback ends with the
        // takeover that follows, and says so.
        let mut h = H::in_takeover(NodeId::A);
        h.hb(State::TakenOver, true);
        h.ev(Event::Operator(OperatorCmd::Giveback));
        h.run(&GIVEBACK);
        h.hb(State::Resuming, true);
        let t = h.t;
        h.at(t + 11_000, Event::Tick);
        assert_eq!(h.n.state(), State::TakingOver);
        let g = h.n.status().last_giveback.unwrap();
        assert_eq!(g.finished_ms, Some(t + 11_000));
        let why = g.partner_resume.unwrap().abandoned.unwrap();
        assert!(why.contains("Hard takeover"), "{why}");
    }

    #[test]
    fn auto_giveback_suppressed_when_flapping() {
        let mut c = cfg(NodeId::A);
        c.auto_giveback = true;
        c.auto_giveback_delay_ms = 1_000;
        let mut h = H::booted_with(c);
        h.ev(Event::Operator(OperatorCmd::TakeoverOf(NodeId::B)));
        h.msg(Message::ShutdownComplete {
            final_cp_ok: true,
            elapsed_ms: 1,
        });
        h.takeover_steps();
        h.hb(State::TakenOver, true);
        h.t += 1_000;
        h.hb(State::TakenOver, true);
        h.ev(Event::Tick);
        assert_eq!(h.n.state(), State::GivingBack, "first one is automatic");
        h.run(&GIVEBACK);
        // The partner dies right away: hard takeover (not blocked by hold-down)...
        h.hb(State::Normal, true);
        let t = h.t;
        h.at(t + 11_000, Event::Tick);
        assert_eq!(h.n.state(), State::TakingOver);
        h.takeover_steps();
        // ...but no automatic giveback this time.
        for k in 0..10 {
            h.at(
                t + 12_000 + k * 1_000,
                Event::Message(Message::Heartbeat {
                    state: State::TakenOver,
                    protocol_version: 1,
                    mirror_in_sync: true,
                }),
            );
            h.ev(Event::Tick);
        }
        assert_eq!(h.n.state(), State::InTakeover);
    }

    #[test]
    fn failed_takeover_step_after_fence_is_retried() {
        let mut h = H::booted(NodeId::A);
        h.ev(Event::Operator(OperatorCmd::TakeoverOf(NodeId::B)));
        h.msg(Message::ShutdownComplete {
            final_cp_ok: true,
            elapsed_ms: 1,
        });
        h.done(Step::Fence);
        let a = h.ev(Event::StepFailed {
            step: Step::OpenPartnerAggregate,
            error: StepError::Failed("eio".into()),
        });
        assert!(!a.iter().any(|x| matches!(x, Action::Begin(_))));
        assert_eq!(h.n.state(), State::TakingOver);
        h.t += 999;
        assert!(!h
            .ev(Event::Tick)
            .contains(&Action::Begin(Step::OpenPartnerAggregate)));
        h.t += 1;
        assert!(h
            .ev(Event::Tick)
            .contains(&Action::Begin(Step::OpenPartnerAggregate)));
        h.run(&[
            Step::OpenPartnerAggregate,
            Step::ReplayPartnerLog,
            Step::TakePartnerIdentity,
            Step::ServePartnerExports,
        ]);
        let tk = h.n.status().last_takeover.unwrap();
        assert_eq!(tk.phases[1].failures, 1);
    }

    #[test]
    fn simultaneous_takeover_requests_lower_id_wins() {
        let mut a = H::booted(NodeId::A);
        a.ev(Event::Operator(OperatorCmd::TakeoverOf(NodeId::B)));
        let r = a.msg(Message::PleaseShutdown {
            countdown_ms: 5_000,
        });
        assert_eq!(a.n.state(), State::AwaitingShutdown, "A keeps its takeover");
        assert!(sends(&r, |m| matches!(
            m,
            Message::Refused {
                request: RequestKind::PleaseShutdown,
                ..
            }
        )));
    }

    #[test]
    fn status_serializes_round_trip() {
        let mut h = H::in_takeover(NodeId::A);
        h.ev(Event::Health {
            healthy: false,
            detail: "fan".into(),
        });
        h.msg(Message::PleaseTakeover);
        let st = h.n.status();
        let json = serde_json::to_string(&st).unwrap();
        assert!(json.contains("\"state\":\"InTakeover\""));
        assert!(json.contains("ServePartnerExports"));
        let back: Status = serde_json::from_str(&json).unwrap();
        assert_eq!(back, st);
        assert_eq!(back.refusals.len(), 1);
    }

    #[test]
    fn state_codes_round_trip_and_are_distinct() {
        let codes: BTreeSet<u32> = State::ALL.iter().map(|s| s.code()).collect();
        assert_eq!(codes.len(), State::ALL.len());
        for s in State::ALL {
            assert_eq!(State::from_code(s.code()), Some(s));
        }
        assert_eq!(State::from_code(0), None);
        assert_eq!(State::from_code(99), None);
    }

    #[test]
    fn immediate_takeover_forces_and_fences_without_countdown() {
        let mut h = H::booted(NodeId::A);
        let a = h.ev(Event::Operator(OperatorCmd::TakeoverOfWith {
            node: NodeId::B,
            countdown_ms: None,
            immediate: true,
        }));
        assert_eq!(h.n.state(), State::TakingOver);
        assert!(sends(&a, |m| *m == Message::Takeover));
        assert!(a.contains(&Action::Begin(Step::Fence)));
    }

    #[test]
    fn countdown_override_is_used() {
        let mut h = H::booted(NodeId::A);
        let a = h.ev(Event::Operator(OperatorCmd::TakeoverOfWith {
            node: NodeId::B,
            countdown_ms: Some(1_234),
            immediate: false,
        }));
        assert!(sends(&a, |m| *m
            == Message::PleaseShutdown {
                countdown_ms: 1_234
            }));
        assert_eq!(h.n.status().countdown_remaining_ms, Some(1_234));
    }

    #[test]
    fn self_fence_halts_a_serving_node_once() {
        let mut h = H::booted(NodeId::A);
        let a = h.ev(Event::SelfFenced {
            reason: "no majority".into(),
        });
        assert!(a.contains(&Action::HaltSelf));
        assert_eq!(h.n.state(), State::TakenOver);
        let a = h.ev(Event::SelfFenced {
            reason: "no majority".into(),
        });
        assert!(a.is_empty());
    }

    #[test]
    fn config_validation() {
        let mut c = Config::new(NodeId::A);
        assert!(c.validate().is_ok());
        c.interconnect_timeout_ms = c.heartbeat_interval_ms;
        assert!(Node::new(c, 0).is_err());
    }

    // ---- what the operator sees ------------------------------------------------------

    #[test]
    fn the_node_taken_over_keeps_its_shutdown_timings() {
        let mut h = H::booted(NodeId::B);
        h.msg(Message::PleaseShutdown {
            countdown_ms: 5_000,
        });
        assert_eq!(h.n.state(), State::ShuttingDown);
        h.run(&SHUTDOWN);
        assert_eq!(h.n.state(), State::TakenOver);
        let r = h.n.status().last_shutdown.expect("shutdown report kept");
        assert_eq!(r.kind, ProcedureKind::Shutdown);
        assert!(r.finished_ms.is_some());
        assert_eq!(
            r.phases.iter().map(|p| p.step).collect::<Vec<_>>(),
            SHUTDOWN
        );
        assert!(r.phases.iter().all(|p| p.elapsed_ms() == 10));
        assert_eq!(r.current, None);
    }

    #[test]
    fn a_shutdown_cut_short_by_a_forced_takeover_keeps_what_ran() {
        let mut h = H::booted(NodeId::B);
        h.msg(Message::PleaseShutdown {
            countdown_ms: 5_000,
        });
        h.run(&SHUTDOWN[..1]);
        h.t += 5_000;
        let a = h.msg(Message::Takeover);
        assert!(a.contains(&Action::HaltSelf));
        let r =
            h.n.status()
                .last_shutdown
                .expect("partial shutdown report kept");
        assert_eq!(r.phases.len(), 1);
        let cur = r.current.expect("the step it was in");
        assert_eq!(cur.step, Step::DrainInFlight);
        assert_eq!(r.finished_ms, Some(h.t));
    }

    /// An acknowledged alarm stays open while its condition holds, stays acknowledged across
    /// repeats of the same condition, and is raised again (new id) when it clears and recurs.
    #[test]
    fn acknowledged_alarms_stay_visible_while_they_hold_and_return_when_they_recur() {
        let mut h = H::booted(NodeId::A);
        let entry = |h: &H, a: &Alarm| -> AlarmEntry {
            h.n.status()
                .alarms
                .into_iter()
                .rev()
                .find(|e| e.alarm == *a)
                .expect("in the history")
        };
        let lost = Alarm::MailboxAccessLost;
        h.at(1_000, Event::MailboxRead(None));
        let e = entry(&h, &lost);
        assert!(e.open && e.acked_ms.is_none(), "{e:?}");
        let first_id = e.id;
        assert_eq!(h.n.unknown_alarm_ids(&[first_id, 99]), vec![99]);
        // Acknowledged while it holds: still open, still listed as open.
        h.at(
            1_500,
            Event::Operator(OperatorCmd::AckAlarm(Some(first_id))),
        );
        let e = entry(&h, &lost);
        assert_eq!((e.open, e.acked_ms), (true, Some(1_500)));
        assert_eq!(h.n.status().open_alarms, vec![lost.clone()]);
        // Still unreadable: no new raise; the acknowledgement stands.
        h.at(2_000, Event::MailboxRead(None));
        assert_eq!(entry(&h, &lost).acked_ms, Some(1_500));
        // It clears: no longer open, still acknowledged, same id.
        h.at(
            3_000,
            Event::MailboxRead(Some(h.view(5, State::Normal, false))),
        );
        let e = entry(&h, &lost);
        assert_eq!((e.id, e.open, e.acked_ms), (first_id, false, Some(1_500)));
        assert!(h.n.status().open_alarms.is_empty());
        // It comes back: raised again, not acknowledged, under a new id.
        h.at(4_000, Event::MailboxRead(None));
        let e = entry(&h, &lost);
        assert!(e.open && e.acked_ms.is_none() && e.id > first_id, "{e:?}");
        assert_eq!((e.first_ms, e.count), (4_000, 1));
        assert_eq!(
            h.n.unknown_alarm_ids(&[first_id]),
            vec![first_id],
            "old id gone"
        );

        // A step failing on every retry, acknowledged: later failures do not un-acknowledge
        // it; --all takes every one not acknowledged.
        h.at(
            4_100,
            Event::MailboxRead(Some(h.view(6, State::Normal, false))),
        );
        h.ev(Event::Operator(OperatorCmd::TakeoverOfWith {
            node: NodeId::B,
            countdown_ms: None,
            immediate: true,
        }));
        h.done(Step::Fence);
        let err = StepError::Failed("open: member 2: EIO".into());
        let failed = Alarm::StepFailed {
            step: Step::OpenPartnerAggregate,
            error: err.clone(),
        };
        let fail = |h: &mut H, t: u64| {
            h.at(
                t,
                Event::StepFailed {
                    step: Step::OpenPartnerAggregate,
                    error: err.clone(),
                },
            );
            h.ev(Event::Tick);
        };
        fail(&mut h, 5_000);
        h.at(5_100, Event::Operator(OperatorCmd::AckAlarm(None)));
        assert!(h.n.status().alarms.iter().all(|e| e.acked_ms.is_some()));
        fail(&mut h, 6_000);
        fail(&mut h, 7_000);
        let e = entry(&h, &failed);
        assert_eq!((e.open, e.acked_ms, e.count), (true, Some(5_100), 3));
    }

    #[test]
    fn a_step_that_keeps_failing_shows_in_the_running_report_and_one_alarm() {
        let mut h = H::booted(NodeId::A);
        // Something else first: it must survive in the ring.
        h.at(1_000, Event::MailboxRead(None));
        h.at(
            1_100,
            Event::MailboxRead(Some(h.view(5, State::Normal, false))),
        );
        h.ev(Event::Operator(OperatorCmd::TakeoverOfWith {
            node: NodeId::B,
            countdown_ms: None,
            immediate: true,
        }));
        assert_eq!(h.n.state(), State::TakingOver);
        h.done(Step::Fence);
        let err = StepError::Failed("open: member 2: EIO".into());
        for i in 0..(MAX_ALARMS as u64 + 4) {
            h.t = 2_000 + i * 1_000;
            h.ev(Event::StepFailed {
                step: Step::OpenPartnerAggregate,
                error: err.clone(),
            });
            h.ev(Event::Tick); // retry
        }
        let st = h.n.status();
        let cur = st.running.unwrap().current.expect("running step");
        assert_eq!(cur.step, Step::OpenPartnerAggregate);
        assert_eq!(cur.failures, MAX_ALARMS as u32 + 4);
        assert_eq!(cur.last_error, Some(err.clone()));
        let failed: Vec<&AlarmEntry> = st
            .alarms
            .iter()
            .filter(|e| matches!(e.alarm, Alarm::StepFailed { .. }))
            .collect();
        assert_eq!(failed.len(), 1, "{:?}", st.alarms);
        assert_eq!(failed[0].count, MAX_ALARMS as u32 + 4);
        assert_eq!(failed[0].first_ms, 2_000);
        assert_eq!(failed[0].last_ms, h.t);
        assert!(
            st.alarms
                .iter()
                .any(|e| e.alarm == Alarm::MailboxAccessLost),
            "older alarms not pushed out: {:?}",
            st.alarms
        );
        assert_eq!(st.alarms.last().unwrap().alarm, failed[0].alarm);
        assert_eq!(
            st.open_alarms,
            vec![Alarm::StepFailed {
                step: Step::OpenPartnerAggregate,
                error: err
            }]
        );
        // It completes: nothing open any more.
        h.done(Step::OpenPartnerAggregate);
        assert!(h.n.status().open_alarms.is_empty());
    }

    #[test]
    fn a_takeover_refused_after_the_shutdown_is_reported_to_the_node_shut_down() {
        // a refuses once b has shut down (its final CP failed, a's mirror of b's log is stale)
        // and tells b why; b's operator, waiting for the takeover it asked for, sees it.
        let mut a = awaiting_with_stale_mirror();
        let out = a.msg(Message::ShutdownComplete {
            final_cp_ok: false,
            elapsed_ms: 10,
        });
        let sent = out
            .iter()
            .find_map(|x| match x {
                Action::Send(m @ Message::Refused { .. }) => Some(m.clone()),
                _ => None,
            })
            .expect("refusal sent to the partner");
        let mut b = H::booted(NodeId::B);
        b.msg(Message::PleaseShutdown {
            countdown_ms: 5_000,
        });
        b.run(&SHUTDOWN);
        assert_eq!(b.n.state(), State::TakenOver);
        let out = b.msg(sent);
        assert_eq!(b.n.state(), State::TakenOver, "stays down");
        let r = out
            .iter()
            .find_map(|x| match x {
                Action::ReportRefusal(r) => Some(r.clone()),
                _ => None,
            })
            .expect("refusal reported");
        assert_eq!(r.request, RequestKind::TakeoverOfSelf);
        assert!(matches!(
            r.reasons[..],
            [RefusalReason::MirrorNotCurrent { .. }]
        ));
        // A stray one in Normal is ignored, as before.
        let mut c = H::booted(NodeId::B);
        let out = c.msg(Message::Refused {
            request: RequestKind::TakeoverOfPartner,
            reasons: vec![],
        });
        assert!(out.iter().all(|x| !matches!(x, Action::ReportRefusal(_))));
        assert_eq!(c.n.state(), State::Normal);
    }
}

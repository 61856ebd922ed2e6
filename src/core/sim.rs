//! Deterministic simulation of an HA pair, in the style of TigerBeetle's VOPR.
//!
//! Two [`takeover::Node`] state machines run against models of everything around them, all
//! driven by one seeded RNG and one virtual clock (no threads, no sleeps):
//! - the interconnect: HA messages and NVRAM mirror traffic, with loss, random delay (hence
//!   reordering) and partitions;
//! - the shared disks: per-aggregate data (a set of write ids), SCSI-3 PR registrations
//!   (writes from an unregistered node fail: "Write Exclusive, Registrants Only"), and the
//!   mailbox (heartbeat slots and please-die flags) with per-node access loss;
//! - the NVRAM logs, abstractly: each node's NVRAM holds write ids per aggregate and survives
//!   crashes; a client write is acknowledged only when durable in both NVRAMs or, in
//!   [`AckMode::LocalOnly`], in the local one; CPs flush a log to disk and trim both copies;
//! - crashes, restarts and pauses of nodes, operator commands, and step failures.
//!
//! Invariants checked after every event (`Sim::violation`):
//! 1. at most one node may write an aggregate (claims to write it and the disks accept it);
//! 2. a node never writes or serves its partner's aggregate unless it fenced the partner;
//! 3. every acknowledged write is on disk or in some NVRAM, and the node serving an aggregate
//!    at its service IP has every acknowledged write of it (on disk or in its own NVRAM).
//!
//! The world is sans-io too: it lives in `core` so that both the unit tests and
//! `tests/sim_takeover.rs` can drive it.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::core::takeover::{
    AckMode, Action, Config, Event, MailboxSlot, MailboxView, Message, Node, NodeId, OperatorCmd,
    State, Step, StepError,
};

/// Bound on queued simulation events (TIGER_STYLE: a limit on everything).
const MAX_QUEUE: usize = 100_000;

fn ix(n: NodeId) -> usize {
    match n {
        NodeId::A => 0,
        NodeId::B => 1,
    }
}

const NODES: [NodeId; 2] = [NodeId::A, NodeId::B];

/// Fault rates; all zero means a perfect world.
#[derive(Debug, Clone, PartialEq)]
pub struct Faults {
    /// Probability that one interconnect message is lost.
    pub msg_loss: f64,
    /// Maximum one-way delay; delays are uniform in `1..=max_delay_ms` (so they reorder).
    pub max_delay_ms: u64,
    /// Per chaos tick (100 ms): probability to start a partition of the interconnect.
    pub partition: f64,
    /// Per chaos tick: probability to crash a node (restarted 0.5-5 s later).
    pub crash: f64,
    /// Per chaos tick: probability to pause a node for 0.2-4 s (it then resumes stale).
    pub pause: f64,
    /// Per chaos tick: probability that a node loses mailbox access for a while.
    pub mailbox_loss: f64,
    /// Probability that a step fails with a transient error.
    pub step_failure: f64,
    /// Probability that a graceful shutdown's drain hangs (exercises the countdown).
    pub drain_hang: f64,
    /// Per chaos tick: probability of an operator command at a random node.
    pub operator: f64,
}

impl Faults {
    pub fn none() -> Faults {
        Faults {
            msg_loss: 0.0,
            max_delay_ms: 2,
            partition: 0.0,
            crash: 0.0,
            pause: 0.0,
            mailbox_loss: 0.0,
            step_failure: 0.0,
            drain_hang: 0.0,
            operator: 0.0,
        }
    }

    /// Random fault rates derived from the seed's RNG (a "swarm" of configurations).
    pub fn random(rng: &mut StdRng) -> Faults {
        let p = |rng: &mut StdRng, max: f64| {
            if rng.gen_bool(0.3) {
                0.0
            } else {
                rng.gen_range(0.0..max)
            }
        };
        Faults {
            msg_loss: p(rng, 0.2),
            max_delay_ms: rng.gen_range(1..=80),
            partition: p(rng, 0.02),
            crash: p(rng, 0.01),
            pause: p(rng, 0.01),
            mailbox_loss: p(rng, 0.01),
            step_failure: p(rng, 0.05),
            drain_hang: p(rng, 0.3),
            operator: rng.gen_range(0.01..0.1),
        }
    }
}

/// Simulation options.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    pub faults: Faults,
    /// Interval of client writes (per aggregate, on average).
    pub write_interval_ms: u64,
    /// Interval of CPs at each node.
    pub cp_interval_ms: u64,
    /// Both nodes' takeover configuration (node id is overwritten).
    pub node: Config,
}

impl SimConfig {
    /// Short timers so that many takeovers fit in a few simulated seconds.
    pub fn new(seed: u64) -> SimConfig {
        let mut node = Config::new(NodeId::A);
        node.countdown_ms = 2_000;
        node.heartbeat_interval_ms = 100;
        node.interconnect_timeout_ms = 500;
        node.mailbox_timeout_ms = 1_000;
        node.request_timeout_ms = 1_000;
        node.please_die_interval_ms = 200;
        node.holddown_ms = 5_000;
        node.auto_giveback_delay_ms = 3_000;
        node.step_retry_ms = 100;
        SimConfig {
            seed,
            faults: Faults::none(),
            write_interval_ms: 20,
            cp_interval_ms: 300,
            node,
        }
    }

    /// A seed's full configuration: random faults and options, all from the seed.
    pub fn swarm(seed: u64) -> SimConfig {
        let mut cfg = SimConfig::new(seed);
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_f00d);
        cfg.faults = Faults::random(&mut rng);
        cfg.node.auto_giveback = rng.gen_bool(0.3);
        cfg.write_interval_ms = rng.gen_range(5..50);
        cfg.cp_interval_ms = rng.gen_range(50..1_000);
        cfg
    }
}

#[derive(Debug, Clone)]
enum Payload {
    Ha(Message),
    Mirror { agg: NodeId, id: u64 },
    MirrorAck { agg: NodeId, id: u64 },
    Trim { agg: NodeId, ids: Vec<u64> },
}

#[derive(Debug, Clone)]
enum Ev {
    Tick(NodeId, u32),
    MailboxPoll(NodeId, u32),
    Cp(NodeId, u32),
    StepComplete { node: NodeId, inc: u32, step: Step },
    Deliver { to: NodeId, payload: Payload },
    ClientWrite,
    Chaos,
    Restart(NodeId),
    MailboxBack(NodeId),
    Operator(NodeId, OperatorCmd),
    Crash(NodeId),
}

struct Sched {
    at_ms: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Sched {
    fn eq(&self, o: &Self) -> bool {
        (self.at_ms, self.seq) == (o.at_ms, o.seq)
    }
}
impl Eq for Sched {}
impl PartialOrd for Sched {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Sched {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at_ms, self.seq).cmp(&(o.at_ms, o.seq))
    }
}

/// One simulated server.
struct SimNode {
    sm: Option<Node>,
    inc: u32,
    paused_until_ms: u64,
    /// NVRAM: write ids per aggregate (index = home node). Survives crashes.
    nvram: [BTreeSet<u64>; 2],
    /// Own-aggregate records known to be in the partner's mirror.
    mirrored: BTreeSet<u64>,
    /// Writes accepted and not yet acknowledged: id -> aggregate. Lost on crash.
    pending: BTreeMap<u64, NodeId>,
    /// Whether this node can read/write the mailbox.
    mailbox_ok: bool,
    drain_hangs: bool,
}

/// Counters for a run, for liveness assertions and for the summary line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub events: u64,
    pub writes_issued: u64,
    pub writes_acked: u64,
    pub takeovers: u64,
    pub givebacks: u64,
    pub crashes: u64,
    pub refusals: u64,
    pub alarms: u64,
    pub fenced_out: u64,
}

/// The simulated world.
pub struct Sim {
    cfg: SimConfig,
    rng: StdRng,
    now_ms: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<Sched>>,
    nodes: [SimNode; 2],
    disk: [BTreeSet<u64>; 2],
    registered: [BTreeSet<NodeId>; 2],
    /// Which node fenced the home node of each aggregate (from its Fence to its ReleaseFence).
    fenced_by: [Option<NodeId>; 2],
    slots: [Option<MailboxSlot>; 2],
    please_die: [bool; 2],
    /// Service IP of each aggregate: which node holds it.
    ips: [Option<NodeId>; 2],
    partitioned_until_ms: u64,
    next_write_id: u64,
    /// Acknowledged writes not (yet) on their aggregate's disk.
    acked_not_on_disk: [BTreeSet<u64>; 2],
    pub stats: Stats,
    violation: Option<String>,
    /// Something that the durability invariant depends on changed since the last full check
    /// (a log trimmed or discarded, a state change, an IP move, a crash). The full check is
    /// O(acknowledged writes not on disk), so it runs only then; acks are checked one by one.
    dirty: bool,
}

impl Sim {
    pub fn new(cfg: SimConfig) -> Sim {
        let rng = StdRng::seed_from_u64(cfg.seed);
        let mk = || SimNode {
            sm: None,
            inc: 0,
            paused_until_ms: 0,
            nvram: [BTreeSet::new(), BTreeSet::new()],
            mirrored: BTreeSet::new(),
            pending: BTreeMap::new(),
            mailbox_ok: true,
            drain_hangs: false,
        };
        let mut sim = Sim {
            cfg,
            rng,
            now_ms: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            nodes: [mk(), mk()],
            disk: [BTreeSet::new(), BTreeSet::new()],
            // Both keys registered on every shared disk, as after installation.
            registered: [NODES.into_iter().collect(), NODES.into_iter().collect()],
            fenced_by: [None, None],
            slots: [None, None],
            please_die: [false, false],
            ips: [None, None],
            partitioned_until_ms: 0,
            next_write_id: 1,
            acked_not_on_disk: [BTreeSet::new(), BTreeSet::new()],
            stats: Stats::default(),
            violation: None,
            dirty: true,
        };
        for n in NODES {
            sim.start_node(n);
        }
        sim.schedule(1, Ev::ClientWrite);
        sim.schedule(100, Ev::Chaos);
        sim
    }

    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// The node's state machine, if the node is up.
    pub fn node(&self, n: NodeId) -> Option<&Node> {
        self.nodes[ix(n)].sm.as_ref()
    }

    pub fn state(&self, n: NodeId) -> Option<State> {
        self.node(n).map(Node::state)
    }

    /// The first invariant violation seen, if any.
    pub fn violation(&self) -> Option<&str> {
        self.violation.as_deref()
    }

    /// Which node holds the service IP of `agg`.
    pub fn ip_holder(&self, agg: NodeId) -> Option<NodeId> {
        self.ips[ix(agg)]
    }

    /// Schedule an operator command.
    pub fn operator_at(&mut self, at_ms: u64, node: NodeId, cmd: OperatorCmd) {
        self.schedule_abs(at_ms, Ev::Operator(node, cmd));
    }

    /// Schedule a crash (restart follows after 0.5-5 s, unless `restart` is false).
    pub fn crash_at(&mut self, at_ms: u64, node: NodeId) {
        self.schedule_abs(at_ms, Ev::Crash(node));
    }

    /// Partition the interconnect over `[from_ms, until_ms)`.
    pub fn partition(&mut self, until_ms: u64) {
        self.partitioned_until_ms = until_ms;
    }

    /// Make every graceful drain at `node` hang (the countdown must force the takeover).
    pub fn hang_drain(&mut self, node: NodeId) {
        self.nodes[ix(node)].drain_hangs = true;
    }

    fn schedule(&mut self, delay_ms: u64, ev: Ev) {
        let at = self.now_ms + delay_ms;
        self.schedule_abs(at, ev);
    }

    fn schedule_abs(&mut self, at_ms: u64, ev: Ev) {
        assert!(self.queue.len() < MAX_QUEUE, "simulation queue overflow");
        self.seq += 1;
        self.queue.push(Reverse(Sched {
            at_ms,
            seq: self.seq,
            ev,
        }));
    }

    fn start_node(&mut self, n: NodeId) {
        let mut c = self.cfg.node.clone();
        c.node = n;
        let node = Node::new(c, self.now_ms).expect("valid sim config");
        let s = &mut self.nodes[ix(n)];
        s.inc += 1;
        s.sm = Some(node);
        s.pending.clear();
        s.paused_until_ms = 0;
        let inc = s.inc;
        self.feed(
            n,
            Event::PartnerDisks {
                visible: 4,
                expected: 4,
            },
        );
        let t = self.rng.gen_range(0..50);
        self.schedule(t, Ev::Tick(n, inc));
        let t = self.rng.gen_range(0..50);
        self.schedule(t, Ev::MailboxPoll(n, inc));
        let t = self.cfg.cp_interval_ms;
        self.schedule(t, Ev::Cp(n, inc));
    }

    fn up(&self, n: NodeId) -> bool {
        self.nodes[ix(n)].sm.is_some()
    }

    /// Run until `until_ms` or a violation; returns the violation.
    pub fn run_until(&mut self, until_ms: u64) -> Option<String> {
        while self.violation.is_none() {
            let Some(Reverse(next)) = self.queue.peek() else {
                break;
            };
            if next.at_ms > until_ms {
                break;
            }
            let Reverse(s) = self.queue.pop().expect("peeked");
            self.now_ms = s.at_ms;
            self.stats.events += 1;
            self.dispatch(s.ev);
            self.check_invariants();
            self.dirty = false;
        }
        self.now_ms = self.now_ms.max(until_ms);
        self.violation.clone()
    }

    /// Events for a paused node wait until it resumes.
    fn paused(&mut self, n: NodeId, ev: &Ev) -> bool {
        let until = self.nodes[ix(n)].paused_until_ms;
        if until > self.now_ms {
            self.schedule_abs(until, ev.clone());
            return true;
        }
        false
    }

    fn dispatch(&mut self, ev: Ev) {
        match ev {
            Ev::Tick(n, inc) => {
                if inc != self.nodes[ix(n)].inc || !self.up(n) || self.paused(n, &ev) {
                    return;
                }
                self.mirror_resync(n);
                let in_sync = {
                    let s = &self.nodes[ix(n)];
                    s.nvram[ix(n)].iter().all(|id| s.mirrored.contains(id))
                };
                self.feed(n, Event::OwnMirror { in_sync });
                self.feed(n, Event::Tick);
                self.ack_local_only(n);
                self.schedule(50, Ev::Tick(n, inc));
            }
            Ev::MailboxPoll(n, inc) => {
                if inc != self.nodes[ix(n)].inc || !self.up(n) || self.paused(n, &ev) {
                    return;
                }
                let p = n.partner();
                let view = self.nodes[ix(n)].mailbox_ok.then(|| MailboxView {
                    partner_slot: self.slots[ix(p)],
                    please_die_for_me: self.please_die[ix(n)],
                    please_die_for_partner: self.please_die[ix(p)],
                });
                self.feed(n, Event::MailboxRead(view));
                self.schedule(100, Ev::MailboxPoll(n, inc));
            }
            Ev::Cp(n, inc) => {
                if inc != self.nodes[ix(n)].inc || !self.up(n) || self.paused(n, &ev) {
                    return;
                }
                self.cp(n);
                let t = self.cfg.cp_interval_ms;
                self.schedule(t, Ev::Cp(n, inc));
            }
            Ev::StepComplete { node, inc, step } => {
                if inc != self.nodes[ix(node)].inc || !self.up(node) || self.paused(node, &ev) {
                    return;
                }
                self.complete_step(node, step);
            }
            Ev::Deliver { to, payload } => {
                if !self.up(to)
                    || self.paused(
                        to,
                        &Ev::Deliver {
                            to,
                            payload: payload.clone(),
                        },
                    )
                {
                    return;
                }
                self.deliver(to, payload);
            }
            Ev::ClientWrite => {
                self.client_write();
                let t = self.rng.gen_range(1..=2 * self.cfg.write_interval_ms);
                self.schedule(t, Ev::ClientWrite);
            }
            Ev::Chaos => {
                self.chaos();
                self.schedule(100, Ev::Chaos);
            }
            Ev::Restart(n) => {
                if !self.up(n) {
                    self.start_node(n);
                }
            }
            Ev::MailboxBack(n) => self.nodes[ix(n)].mailbox_ok = true,
            Ev::Operator(n, cmd) => {
                if self.up(n) && !self.paused(n, &ev) {
                    self.feed(n, Event::Operator(cmd));
                }
            }
            Ev::Crash(n) => self.crash(n),
        }
    }

    fn crash(&mut self, n: NodeId) {
        if !self.up(n) {
            return;
        }
        self.stats.crashes += 1;
        self.dirty = true;
        let s = &mut self.nodes[ix(n)];
        s.sm = None;
        s.pending.clear();
        s.inc += 1;
        // A dead node holds no IP.
        for ip in self.ips.iter_mut() {
            if *ip == Some(n) {
                *ip = None;
            }
        }
        let t = self.rng.gen_range(500..5_000);
        self.schedule(t, Ev::Restart(n));
    }

    fn chaos(&mut self) {
        let f = self.cfg.faults.clone();
        let now = self.now_ms;
        if f.partition > 0.0 && self.rng.gen_bool(f.partition) {
            self.partitioned_until_ms = now + self.rng.gen_range(200..5_000);
        }
        if f.crash > 0.0 && self.rng.gen_bool(f.crash) {
            let n = NODES[self.rng.gen_range(0..2)];
            self.crash(n);
        }
        if f.pause > 0.0 && self.rng.gen_bool(f.pause) {
            let n = NODES[self.rng.gen_range(0..2)];
            self.nodes[ix(n)].paused_until_ms = now + self.rng.gen_range(200..4_000);
        }
        if f.mailbox_loss > 0.0 && self.rng.gen_bool(f.mailbox_loss) {
            let n = NODES[self.rng.gen_range(0..2)];
            self.nodes[ix(n)].mailbox_ok = false;
            let t = self.rng.gen_range(100..3_000);
            self.schedule(t, Ev::MailboxBack(n));
        }
        if f.operator > 0.0 && self.rng.gen_bool(f.operator) {
            let n = NODES[self.rng.gen_range(0..2)];
            let cmd = match self.rng.gen_range(0..3) {
                0 => OperatorCmd::TakeoverSelf,
                1 => OperatorCmd::TakeoverOf(n.partner()),
                _ => OperatorCmd::Giveback,
            };
            self.schedule(0, Ev::Operator(n, cmd));
        }
        if f.drain_hang > 0.0 {
            for n in NODES {
                self.nodes[ix(n)].drain_hangs = self.rng.gen_bool(f.drain_hang);
            }
        }
    }

    // ---- the state machine and its actions ---------------------------------------------

    fn feed(&mut self, n: NodeId, event: Event) {
        let now = self.now_ms;
        let Some(sm) = self.nodes[ix(n)].sm.as_mut() else {
            return;
        };
        let was = sm.state();
        let actions = sm.step(now, event);
        let is = sm.state();
        if was != is {
            self.dirty = true;
            match (was, is) {
                (State::TakingOver, State::InTakeover) => self.stats.takeovers += 1,
                (State::GivingBack, State::Normal) => self.stats.givebacks += 1,
                _ => {}
            }
        }
        for a in actions {
            self.execute(n, a);
        }
    }

    fn send(&mut self, from: NodeId, payload: Payload) {
        let f = &self.cfg.faults;
        if self.now_ms < self.partitioned_until_ms {
            return;
        }
        if f.msg_loss > 0.0 && self.rng.gen_bool(f.msg_loss) {
            return;
        }
        let d = self.rng.gen_range(1..=f.max_delay_ms.max(1));
        self.schedule(
            d,
            Ev::Deliver {
                to: from.partner(),
                payload,
            },
        );
    }

    fn execute(&mut self, n: NodeId, a: Action) {
        let p = n.partner();
        match a {
            Action::Send(m) => self.send(n, Payload::Ha(m)),
            Action::WriteMailbox {
                counter,
                state,
                clean_shutdown,
            } => {
                if self.nodes[ix(n)].mailbox_ok {
                    self.slots[ix(n)] = Some(MailboxSlot {
                        counter,
                        state,
                        clean_shutdown,
                        // The simulated nodes acknowledge locally only while the partner is
                        // fenced, so they never run unmirrored.
                        unmirrored: false,
                    });
                }
            }
            Action::SetPartnerPleaseDie(v) => {
                if self.nodes[ix(n)].mailbox_ok {
                    self.please_die[ix(p)] = v;
                }
            }
            Action::Begin(step) => {
                let latency = match step {
                    Step::Fence | Step::ReplayPartnerLog | Step::ReplayOwnLog => {
                        self.rng.gen_range(5..150)
                    }
                    _ => self.rng.gen_range(1..30),
                };
                let inc = self.nodes[ix(n)].inc;
                self.schedule(latency, Ev::StepComplete { node: n, inc, step });
            }
            Action::HaltSelf => {
                self.nodes[ix(n)].pending.clear();
                for ip in self.ips.iter_mut() {
                    if *ip == Some(n) {
                        *ip = None;
                    }
                }
            }
            Action::SetAckMode(_) => {}
            Action::Alarm(alarm) => {
                self.stats.alarms += 1;
                if matches!(
                    alarm,
                    crate::core::takeover::Alarm::IllegalTransition { .. }
                ) {
                    self.fail(format!("{n:?}: illegal transition {alarm:?}"));
                }
            }
            Action::ReportRefusal(_) => self.stats.refusals += 1,
        }
    }

    fn fail(&mut self, msg: String) {
        if self.violation.is_none() {
            self.violation = Some(format!("t={}ms: {msg}", self.now_ms));
        }
    }

    /// Write `ids` to `agg`'s disks from node `n`. Fails if `n`'s key is not registered.
    fn disk_write(&mut self, n: NodeId, agg: NodeId, ids: &[u64]) -> Result<(), StepError> {
        if !self.registered[ix(agg)].contains(&n) {
            return Err(StepError::ReservationConflict);
        }
        let claims = {
            let sm = self.nodes[ix(n)].sm.as_ref().expect("up");
            if agg == n {
                sm.writes_own()
            } else {
                sm.writes_partner()
            }
        };
        if !claims {
            self.fail(format!("{n:?} wrote {agg:?}'s disks without claiming to"));
        }
        for id in ids {
            self.disk[ix(agg)].insert(*id);
            self.acked_not_on_disk[ix(agg)].remove(id);
        }
        Ok(())
    }

    /// Flush the node's log of `agg` to disk and trim it here and at the partner.
    fn flush(&mut self, n: NodeId, agg: NodeId) -> Result<(), StepError> {
        let ids: Vec<u64> = self.nodes[ix(n)].nvram[ix(agg)].iter().copied().collect();
        if ids.is_empty() {
            return Ok(());
        }
        self.disk_write(n, agg, &ids)?;
        for id in &ids {
            self.nodes[ix(n)].nvram[ix(agg)].remove(id);
        }
        self.dirty = true;
        self.send(n, Payload::Trim { agg, ids });
        Ok(())
    }

    fn cp(&mut self, n: NodeId) {
        let Some(sm) = self.nodes[ix(n)].sm.as_ref() else {
            return;
        };
        // A node mid-resume has not replayed (or discarded) its log yet: the data path CPs
        // only an aggregate it serves, or drains while shutting down.
        let own = sm.writes_own() && (sm.accepts_own() || sm.state() == State::ShuttingDown);
        let partner = sm.writes_partner();
        let mut conflict = false;
        if own && self.flush(n, n).is_err() {
            conflict = true;
        }
        if partner && self.flush(n, n.partner()).is_err() {
            conflict = true;
        }
        if conflict {
            self.stats.fenced_out += 1;
            self.feed(n, Event::FencedOut);
        }
    }

    fn complete_step(&mut self, n: NodeId, step: Step) {
        let running = self.nodes[ix(n)].sm.as_ref().and_then(Node::running_step);
        if running != Some(step) {
            return; // abandoned (halt) or a stale completion: its effect never happens
        }
        let p = n.partner();
        let f = self.cfg.faults.step_failure;
        if f > 0.0 && step != Step::RecheckMailbox && self.rng.gen_bool(f) {
            let error = StepError::Failed("injected".into());
            self.feed(n, Event::StepFailed { step, error });
            return;
        }
        let result: Result<(), StepError> = match step {
            Step::StopAccepting
            | Step::CloseClients
            | Step::MarkCleanShutdown
            | Step::StopHeartbeats
            | Step::ServeOwnExports
            | Step::ServePartnerExports
            | Step::ClosePartnerAggregate => Ok(()),
            Step::DrainInFlight | Step::DrainPartnerExports => {
                let agg = if step == Step::DrainInFlight { n } else { p };
                let busy = self.nodes[ix(n)].pending.values().any(|a| *a == agg);
                if (step == Step::DrainInFlight && self.nodes[ix(n)].drain_hangs) || busy {
                    // Not drained yet: look again later (the countdown bounds this).
                    let inc = self.nodes[ix(n)].inc;
                    self.schedule(10, Ev::StepComplete { node: n, inc, step });
                    return;
                }
                Ok(())
            }
            Step::FinalCp => self.flush(n, n),
            Step::CpPartnerAggregate => self.flush(n, p),
            Step::ReleaseServiceIps | Step::ReleasePartnerIps => {
                let agg = if step == Step::ReleaseServiceIps {
                    n
                } else {
                    p
                };
                if self.ips[ix(agg)] == Some(n) {
                    self.ips[ix(agg)] = None;
                }
                Ok(())
            }
            Step::TakeOwnIps => {
                self.dirty = true;
                self.ips[ix(n)] = Some(n);
                Ok(())
            }
            Step::TakePartnerIdentity => {
                self.dirty = true;
                self.ips[ix(p)] = Some(n);
                Ok(())
            }
            Step::Fence => {
                if !self.registered[ix(n)].contains(&n) {
                    Err(StepError::ReservationConflict)
                } else if !self.nodes[ix(n)].mailbox_ok {
                    // The poison pill is part of the fence: without it a rebooting partner
                    // would re-register and serve.
                    Err(StepError::Failed("mailbox unreachable".into()))
                } else {
                    self.please_die[ix(p)] = true;
                    for r in self.registered.iter_mut() {
                        r.remove(&p);
                    }
                    self.fenced_by[ix(p)] = Some(n);
                    Ok(())
                }
            }
            Step::OpenPartnerAggregate | Step::OpenOwnAggregate => {
                let agg = if step == Step::OpenOwnAggregate { n } else { p };
                if self.registered[ix(agg)].contains(&n) {
                    Ok(())
                } else {
                    Err(StepError::ReservationConflict)
                }
            }
            Step::ReplayPartnerLog | Step::ReplayOwnLog => {
                let agg = if step == Step::ReplayOwnLog { n } else { p };
                let ids: Vec<u64> = self.nodes[ix(n)].nvram[ix(agg)].iter().copied().collect();
                self.disk_write(n, agg, &ids)
            }
            Step::DiscardOwnLog => {
                self.dirty = true;
                self.nodes[ix(n)].nvram[ix(n)].clear();
                self.nodes[ix(n)].mirrored.clear();
                Ok(())
            }
            Step::ReleaseFence => {
                if self.nodes[ix(n)].mailbox_ok {
                    self.please_die[ix(p)] = false;
                    self.fenced_by[ix(p)] = None;
                    Ok(())
                } else {
                    Err(StepError::Failed("mailbox unreachable".into()))
                }
            }
            Step::RegisterOwn => {
                for r in self.registered.iter_mut() {
                    r.insert(n);
                }
                Ok(())
            }
            Step::RecheckMailbox => {
                if self.nodes[ix(n)].mailbox_ok {
                    let please_die = self.please_die[ix(n)];
                    self.feed(n, Event::MailboxChecked { please_die });
                    return;
                }
                Err(StepError::Failed("mailbox unreachable".into()))
            }
        };
        match result {
            Ok(()) => self.feed(n, Event::StepDone(step)),
            Err(error) => self.feed(n, Event::StepFailed { step, error }),
        }
    }

    // ---- data path ---------------------------------------------------------------------

    fn client_write(&mut self) {
        let agg = NODES[self.rng.gen_range(0..2)];
        let Some(s) = self.ips[ix(agg)] else { return };
        let Some(sm) = self.nodes[ix(s)].sm.as_ref() else {
            return;
        };
        if self.nodes[ix(s)].paused_until_ms > self.now_ms {
            return; // the connection stalls; a real client times out and retries
        }
        let accepts = if agg == s {
            sm.accepts_own()
        } else {
            sm.accepts_partner()
        };
        if !accepts {
            return;
        }
        let local_only = sm.ack_mode() == AckMode::LocalOnly;
        let id = self.next_write_id;
        self.next_write_id += 1;
        self.stats.writes_issued += 1;
        self.nodes[ix(s)].nvram[ix(agg)].insert(id);
        if local_only {
            self.ack(s, agg, id);
        } else {
            self.nodes[ix(s)].pending.insert(id, agg);
            self.send(s, Payload::Mirror { agg, id });
        }
    }

    fn ack(&mut self, s: NodeId, agg: NodeId, id: u64) {
        self.nodes[ix(s)].pending.remove(&id);
        self.stats.writes_acked += 1;
        if !self.disk[ix(agg)].contains(&id) {
            self.acked_not_on_disk[ix(agg)].insert(id);
            // The one new acknowledged write must be where the invariant says.
            if let Some(h) = self.ips[ix(agg)] {
                let serves = self.nodes[ix(h)].sm.as_ref().is_some_and(|sm| {
                    if agg == h {
                        sm.accepts_own()
                    } else {
                        sm.accepts_partner()
                    }
                });
                if serves && !self.nodes[ix(h)].nvram[ix(agg)].contains(&id) {
                    self.fail(format!(
                        "{h:?} serves {agg:?} without acknowledged write {id}"
                    ));
                }
            }
        }
    }

    /// In LocalOnly mode, writes waiting for a mirror ack are acknowledged from NVRAM.
    fn ack_local_only(&mut self, n: NodeId) {
        let local = self.nodes[ix(n)]
            .sm
            .as_ref()
            .is_some_and(|s| s.ack_mode() == AckMode::LocalOnly);
        if !local {
            return;
        }
        let pending: Vec<(u64, NodeId)> = self.nodes[ix(n)]
            .pending
            .iter()
            .map(|(i, a)| (*i, *a))
            .collect();
        for (id, agg) in pending {
            self.ack(n, agg, id);
        }
    }

    /// Re-send own-log records the partner has not confirmed (lost messages, or records
    /// acknowledged while the partner was fenced).
    fn mirror_resync(&mut self, n: NodeId) {
        let s = &self.nodes[ix(n)];
        if s.sm
            .as_ref()
            .is_none_or(|sm| sm.ack_mode() != AckMode::Mirrored)
        {
            return;
        }
        let missing: Vec<u64> = s.nvram[ix(n)]
            .iter()
            .filter(|id| !s.mirrored.contains(id))
            .take(64)
            .copied()
            .collect();
        for id in missing {
            self.send(n, Payload::Mirror { agg: n, id });
        }
    }

    fn deliver(&mut self, to: NodeId, payload: Payload) {
        match payload {
            Payload::Ha(m) => self.feed(to, Event::Message(m)),
            Payload::Mirror { agg, id } => {
                // We mirror only the partner's log, and stop once we write its aggregate
                // ourselves (a fenced partner's late records are never acknowledged).
                let sm = self.nodes[ix(to)].sm.as_ref().expect("up");
                if agg != to.partner() || sm.writes_partner() {
                    return;
                }
                self.nodes[ix(to)].nvram[ix(agg)].insert(id);
                self.send(to, Payload::MirrorAck { agg, id });
            }
            Payload::MirrorAck { agg, id } => {
                let s = &mut self.nodes[ix(to)];
                if agg == to && s.nvram[ix(agg)].contains(&id) {
                    s.mirrored.insert(id);
                }
                if s.pending.get(&id) == Some(&agg) {
                    self.ack(to, agg, id);
                }
            }
            Payload::Trim { agg, ids } => {
                self.dirty = true;
                for id in ids {
                    if self.disk[ix(agg)].contains(&id) {
                        self.nodes[ix(to)].nvram[ix(agg)].remove(&id);
                    }
                }
            }
        }
    }

    // ---- invariants --------------------------------------------------------------------

    fn check_invariants(&mut self) {
        if self.violation.is_some() {
            return;
        }
        let unsafe_mode = self.cfg.node.unsafe_skip_fence;
        for agg in NODES {
            let mut writers = Vec::new();
            for n in NODES {
                let Some(sm) = self.nodes[ix(n)].sm.as_ref() else {
                    continue;
                };
                let claims = if agg == n {
                    sm.writes_own()
                } else {
                    sm.writes_partner()
                };
                let serves = if agg == n {
                    sm.accepts_own()
                } else {
                    sm.accepts_partner()
                };
                if claims && self.registered[ix(agg)].contains(&n) {
                    writers.push(n);
                }
                // 2. Serving/writing the partner's aggregate requires that this node fenced
                // the partner. (A partner that re-registers while booting, racing with the
                // fence, is harmless as long as it does not write: invariant 1.)
                if agg != n && (claims || serves) && self.fenced_by[ix(agg)] != Some(n) {
                    self.fail(format!(
                        "{n:?} takes over {agg:?} ({:?}) but {agg:?} is not fenced",
                        sm.state()
                    ));
                    if !unsafe_mode {
                        return;
                    }
                }
                // 3b. The server clients reach (the service IP holder) has every acknowledged
                // write. A fenced zombie that resumes from a pause may still think it serves,
                // but its IP has moved and its disk writes fail.
                if self.dirty && serves && self.ips[ix(agg)] == Some(n) {
                    let nv = &self.nodes[ix(n)].nvram[ix(agg)];
                    if let Some(id) = self.acked_not_on_disk[ix(agg)]
                        .iter()
                        .find(|i| !nv.contains(i))
                    {
                        let id = *id;
                        self.fail(format!(
                            "{n:?} serves {agg:?} without acknowledged write {id} (not on disk, not in its NVRAM)"
                        ));
                        return;
                    }
                }
            }
            // 1. At most one writer.
            if writers.len() > 1 {
                self.fail(format!("two writers of {agg:?}: {writers:?}"));
                return;
            }
            // 3a. Every acknowledged write is on disk or in some NVRAM.
            if !self.dirty {
                continue;
            }
            for id in &self.acked_not_on_disk[ix(agg)] {
                if !NODES
                    .iter()
                    .any(|n| self.nodes[ix(*n)].nvram[ix(agg)].contains(id))
                {
                    let id = *id;
                    self.fail(format!("acknowledged write {id} of {agg:?} lost"));
                    return;
                }
            }
        }
    }
}

/// Run one seed of the swarm for `duration_ms` simulated milliseconds.
pub fn run_seed(seed: u64, duration_ms: u64) -> Result<Stats, String> {
    let mut sim = Sim::new(SimConfig::swarm(seed));
    match sim.run_until(duration_ms) {
        None => Ok(sim.stats.clone()),
        Some(v) => Err(v),
    }
}

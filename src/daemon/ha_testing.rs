//! Test doubles standing beside the real node: [`RecordingExecutor`] records every action the
//! HA loop asks for and completes steps per a plan, on real threads; [`Pair`] wires two loops
//! (an interconnect of channels that can be cut per direction, a shared mailbox store) so tests
//! drive real threads with a real clock.

use crate::core::control::AggregateHome;
use crate::core::takeover::{AckMode, Alarm, Message, NodeId, Refusal, State, Step, StepError};
use crate::daemon::ha::{self, HaConfig, HaExecutor, HaHandle, StepDone, StepOutcome};
use crate::daemon::mailbox::{MailboxConfig, MailboxDriver, MailboxHandle, MailboxStore};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One thing the loop asked the executor to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Sent(Message),
    Began(Step),
    Completed(Step, Result<(), StepError>),
    Halted,
    AckMode(AckMode),
    Alarm(Alarm),
    Refusal(Refusal),
}

/// How a step behaves.
#[derive(Debug, Clone, Default)]
pub struct StepPlan {
    /// Time the step takes.
    pub delay: Duration,
    /// Fail every attempt with this error.
    pub fail: Option<StepError>,
    /// Never complete until released with [`Recorder::release`].
    pub hold: bool,
}

/// The shared, inspectable side of a [`RecordingExecutor`].
#[derive(Clone, Default)]
pub struct Recorder {
    log: Arc<(Mutex<Vec<Record>>, Condvar)>,
    plans: Arc<Mutex<HashMap<Step, StepPlan>>>,
    released: Arc<(Mutex<Vec<Step>>, Condvar)>,
}

impl Recorder {
    fn push(&self, r: Record) {
        let (m, c) = &*self.log;
        m.lock().unwrap().push(r);
        c.notify_all();
    }

    /// Everything recorded so far.
    pub fn records(&self) -> Vec<Record> {
        self.log.0.lock().unwrap().clone()
    }

    /// Wait until a record matches (true) or `timeout` passes (false).
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&Record) -> bool) -> bool {
        let (m, c) = &*self.log;
        let deadline = Instant::now() + timeout;
        let mut g = m.lock().unwrap();
        loop {
            if g.iter().any(&pred) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = c.wait_timeout(g, deadline - now).unwrap().0;
        }
    }

    /// Count of records matching.
    pub fn count(&self, pred: impl Fn(&Record) -> bool) -> usize {
        self.log
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|r| pred(r))
            .count()
    }

    /// Set how `step` behaves from now on.
    pub fn plan(&self, step: Step, plan: StepPlan) {
        self.plans.lock().unwrap().insert(step, plan);
    }

    /// Let held attempts of `step` complete.
    pub fn release(&self, step: Step) {
        let (m, c) = &*self.released;
        m.lock().unwrap().push(step);
        c.notify_all();
    }
}

/// A recording executor: sends go to the partner's loop (unless the link is cut), steps run
/// on their own threads per the plan; mailbox parts of steps use the real mailbox driver.
pub struct RecordingExecutor {
    pub rec: Recorder,
    link: Option<HaHandle>,
    link_up: Arc<AtomicBool>,
    mailbox: Option<MailboxHandle>,
    /// This node's own handle: once a step opened its log, the log reports itself mirrored
    /// (as the daemon's journal does once its first session copied it), after that step's
    /// completion and before the next one's.
    own: Option<HaHandle>,
    own_report_pending: Arc<AtomicBool>,
}

impl RecordingExecutor {
    pub fn new(
        rec: Recorder,
        link: Option<HaHandle>,
        link_up: Arc<AtomicBool>,
        mailbox: Option<MailboxHandle>,
    ) -> Self {
        RecordingExecutor {
            rec,
            link,
            link_up,
            mailbox,
            own: None,
            own_report_pending: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Report "own log mirrored" to `own` after each step that opens the log.
    pub fn reporting_own_log_to(mut self, own: HaHandle) -> Self {
        self.own = Some(own);
        self
    }
}

impl HaExecutor for RecordingExecutor {
    fn send(&mut self, msg: Message) {
        self.rec.push(Record::Sent(msg.clone()));
        if let Some(l) = &self.link {
            if self.link_up.load(Ordering::SeqCst) {
                // Non-blocking, as the contract says: a full partner queue drops the message.
                let l = l.clone();
                std::thread::spawn(move || {
                    let _ = l.message(msg);
                });
            }
        }
    }

    fn begin(&mut self, step: Step, done: StepDone) {
        self.rec.push(Record::Began(step));
        let plan = self
            .rec
            .plans
            .lock()
            .unwrap()
            .get(&step)
            .cloned()
            .unwrap_or_default();
        let rec = self.rec.clone();
        let mailbox = self.mailbox.clone();
        let own = self.own.clone();
        let pending = self.own_report_pending.clone();
        std::thread::spawn(move || {
            std::thread::sleep(plan.delay);
            if plan.hold {
                let (m, c) = &*rec.released;
                let mut g = m.lock().unwrap();
                while !g.contains(&step) {
                    g = c.wait(g).unwrap();
                }
            }
            let outcome = if let Some(e) = plan.fail {
                StepOutcome::Failed(e)
            } else {
                match (&mailbox, step) {
                    (Some(mb), Step::Fence | Step::ReleaseFence) => {
                        // The poison pill is part of the fence (no PR disks here).
                        let on = step == Step::Fence;
                        match mb.write_please_die_now(on, 1) {
                            Ok(_) => StepOutcome::Done,
                            Err(e) => StepOutcome::Failed(StepError::Failed(e.to_string())),
                        }
                    }
                    (Some(mb), s) => mb.run_step(s).unwrap_or(StepOutcome::Done),
                    (None, Step::RecheckMailbox) => {
                        StepOutcome::MailboxChecked { please_die: false }
                    }
                    (None, _) => StepOutcome::Done,
                }
            };
            let r = match &outcome {
                StepOutcome::Failed(e) => Err(e.clone()),
                _ => Ok(()),
            };
            let opened_log = r.is_ok() && matches!(step, Step::ReplayOwnLog | Step::DiscardOwnLog);
            rec.push(Record::Completed(step, r));
            let report = |own: &Option<HaHandle>| {
                if let Some(own) = own
                    .as_ref()
                    .filter(|_| pending.swap(false, Ordering::SeqCst))
                {
                    let _ = own.own_mirror(true);
                }
            };
            if opened_log {
                pending.store(true, Ordering::SeqCst);
                done.finish(outcome);
                report(&own);
            } else {
                report(&own);
                done.finish(outcome);
            }
        });
    }

    fn halt_self(&mut self) {
        self.rec.push(Record::Halted);
    }

    fn set_ack_mode(&mut self, mode: AckMode) {
        self.rec.push(Record::AckMode(mode));
    }

    fn alarm(&mut self, alarm: &Alarm) {
        self.rec.push(Record::Alarm(alarm.clone()));
    }

    fn refusal(&mut self, refusal: &Refusal) {
        self.rec.push(Record::Refusal(refusal.clone()));
    }
}

/// Short timers for tests: 40 ms heartbeats, 250 ms interconnect timeout, 600 ms mailbox
/// timeout, 250 ms self-fence bound, 400 ms countdown.
pub fn fast_config(node: &str, partner: &str) -> HaConfig {
    let mut c = HaConfig::new(node, partner).expect("names");
    let t = &mut c.takeover;
    t.heartbeat_interval_ms = 40;
    t.interconnect_timeout_ms = 250;
    t.mailbox_timeout_ms = 600;
    t.request_timeout_ms = 1_000;
    t.please_die_interval_ms = 100;
    t.countdown_ms = 400;
    t.holddown_ms = 1_000;
    t.step_retry_ms = 50;
    c.tick = Duration::from_millis(10);
    c.self_fence_bound_ms = 250;
    let (a, b) = if node < partner {
        (node, partner)
    } else {
        (partner, node)
    };
    c.aggregates = vec![
        AggregateHome {
            name: format!("aggr-{a}"),
            home: NodeId::A,
        },
        AggregateHome {
            name: format!("aggr-{b}"),
            home: NodeId::B,
        },
    ];
    c
}

/// One node of a test pair.
pub struct TestNode {
    pub name: String,
    pub handle: HaHandle,
    pub rec: Recorder,
    pub link_up: Arc<AtomicBool>,
    pub mailbox: MailboxHandle,
    driver: Option<MailboxDriver>,
    thread: Option<JoinHandle<()>>,
}

impl TestNode {
    /// Start one node on `store`, sending to `link` (the partner's handle, if any).
    pub fn start(
        cfg: HaConfig,
        store: Arc<dyn MailboxStore>,
        inbox: ha::HaInbox,
        handle: HaHandle,
        link: Option<HaHandle>,
    ) -> TestNode {
        let rec = Recorder::default();
        let link_up = Arc::new(AtomicBool::new(true));
        let driver = MailboxDriver::spawn(
            store,
            MailboxConfig {
                node_name: cfg.node_name.clone(),
                partner_name: cfg.partner_name.clone(),
                interval: Duration::from_millis(cfg.takeover.heartbeat_interval_ms),
                self_fence_bound_ms: cfg.self_fence_bound_ms,
            },
            handle.clone(),
        )
        .expect("mailbox driver");
        let mailbox = driver.handle.clone();
        let exec =
            RecordingExecutor::new(rec.clone(), link, link_up.clone(), Some(mailbox.clone()))
                .reporting_own_log_to(handle.clone());
        let name = cfg.node_name.clone();
        let thread = ha::HaLoop::spawn(cfg, inbox, Box::new(exec), Box::new(mailbox.clone()), None)
            .expect("spawn loop");
        // What the node would report at start: it sees the partner's disks, its log mirrored.
        handle.partner_disks(4, 4).unwrap();
        handle.own_mirror(true).unwrap();
        TestNode {
            name,
            handle,
            rec,
            link_up,
            mailbox,
            driver: Some(driver),
            thread: Some(thread),
        }
    }

    /// The state machine's state now.
    pub fn state(&self) -> State {
        self.handle.snapshot().expect("snapshot").status.state
    }

    /// Wait until the state is `s` (true) or `timeout` passes.
    pub fn wait_state(&self, s: State, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.handle.snapshot().map(|x| x.status.state) == Ok(s) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    /// Stop the loop and the mailbox driver and wait for both threads.
    pub fn stop(&mut self) {
        self.handle.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(d) = self.driver.take() {
            d.stop();
        }
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Two in-process nodes wired by channels over one mailbox store.
pub struct Pair {
    pub a: TestNode,
    pub b: TestNode,
}

impl Pair {
    /// Start nodes named `a` and `b` with [`fast_config`] (adjusted by `tweak`) on `store`.
    pub fn start(store: Arc<dyn MailboxStore>, tweak: impl Fn(&mut HaConfig)) -> Pair {
        let (ha, ia) = ha::channel(ha::INPUT_CAPACITY);
        let (hb, ib) = ha::channel(ha::INPUT_CAPACITY);
        let mut ca = fast_config("a", "b");
        let mut cb = fast_config("b", "a");
        tweak(&mut ca);
        tweak(&mut cb);
        let a = TestNode::start(ca, store.clone(), ia, ha.clone(), Some(hb.clone()));
        let b = TestNode::start(cb, store, ib, hb, Some(ha));
        Pair { a, b }
    }

    /// Wait until both nodes are `Normal` and each heard the other.
    pub fn wait_normal(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let ok = [&self.a, &self.b].iter().all(|n| {
                n.handle.snapshot().is_ok_and(|s| {
                    s.status.state == State::Normal
                        && s.status.partner_state == Some(State::Normal)
                        && s.status.mirror_current
                })
            });
            if ok {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }
}

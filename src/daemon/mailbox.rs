//! The mailbox driver: one thread that writes this node's slot on every shared member and reads
//! both slots every heartbeat interval, feeding [`Input::MailboxRead`] to the HA loop.
//!
//! Division of work:
//! - the HA loop decides *what* the slot says (`Action::WriteMailbox`, `SetPartnerPleaseDie`)
//!   and hands it to [`MailboxHandle`] without blocking ([`MailboxSink`]);
//! - the driver thread does the I/O: a slot is written when its content changed (a new
//!   heartbeat counter, a please-die change), both slots are read every `interval`;
//! - steps that need the mailbox *now* (fence, release fence, re-check after registering, clean
//!   shutdown mark) call the synchronous methods of [`MailboxHandle`] from the step's thread.
//!
//! Self-fencing (like sbd): the last time a *new* heartbeat reached a majority of members is
//! kept in an atomic. The HA loop checks it on every tick ([`MailboxSink::self_fence_reason`]),
//! so a driver stuck in a hung disk write is caught as well as a failing one; a stuck HA loop
//! is caught by the systemd watchdog instead. The partner waits `2 * bound` of mailbox silence
//! before it takes over ([`SelfFence::partner_wait_ms`]); [`check_bound`] enforces that.

use crate::core::mailbox::{ha_view, slot_index, vote, SelfFence, Slot, SlotError, SlotVote};
use crate::core::takeover::{MailboxView, State, Step};
use crate::daemon::ha::{HaHandle, MailboxSink, StepOutcome};
use crate::io::mailbox::MailboxDisks;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Where slots live: the shared members ([`DiskStore`]) or memory ([`MemStore`], tests).
pub trait MailboxStore: Send + Sync + 'static {
    /// Number of members (the majority is counted over these).
    fn members(&self) -> usize;
    /// Write `slot` into slot `slot.slot_index` of every member we write; returns how many
    /// took it and a description of each failure.
    fn write_slot(&self, slot: &Slot) -> (usize, Vec<String>);
    /// Members we write our slot to (the self-fence majority counts over these). All of them,
    /// except under PR fencing, where a node may write only the members it holds.
    fn write_members(&self) -> usize {
        self.members()
    }
    /// Read slot `index` from every member and vote.
    fn read_slot(&self, index: usize) -> SlotVote;
}

/// The real store: the mailbox area of the shared members.
pub struct DiskStore {
    pub disks: MailboxDisks,
    /// Aggregate uuid written into the slot of member `i` (for people reading dumps).
    pub uuids: Vec<[u8; 16]>,
    /// `Some(n)`: write our slot to the first `n` members only (our own aggregate's, listed
    /// first). Under Write Exclusive reservations the others refuse our writes (EBADE): our
    /// heartbeat lives on the disks we hold, and the partner reads it there.
    pub write_first: Option<usize>,
}

impl MailboxStore for DiskStore {
    fn members(&self) -> usize {
        self.disks.len()
    }
    fn write_members(&self) -> usize {
        self.write_first
            .map_or(self.disks.len(), |n| n.min(self.disks.len()))
    }
    fn write_slot(&self, slot: &Slot) -> (usize, Vec<String>) {
        let n = self.write_members();
        let r = self
            .disks
            .write_slot_first(n, slot, |i| self.uuids.get(i).copied().unwrap_or([0; 16]));
        // Under PR fencing a member that refuses our slot with a reservation conflict (EBADE)
        // is held by the partner: the disk itself fences us off it, which is what a self-fence
        // would achieve. Counting it as a failure would make a fenced node (TakenOver, then
        // Resuming until its RESERVE) self-fence for the very condition the disk enforces.
        // Data writes refused that way report the fence to the HA loop (aggregate.rs).
        let pr = self.write_first.is_some();
        let mut written = r.written;
        let mut failed = Vec::new();
        for (p, e) in &r.failed {
            if pr && crate::daemon::aggregate::is_reservation_conflict(e) {
                written += 1;
            } else {
                failed.push(format!("{}: {e}", p.display()));
            }
        }
        (written, failed)
    }
    fn read_slot(&self, index: usize) -> SlotVote {
        self.disks.read_slot(index)
    }
}

/// An in-memory store shared by two drivers (both nodes of an in-process pair): a test double
/// standing beside [`DiskStore`]. Members can be made unwritable or unreadable.
#[derive(Clone)]
pub struct MemStore {
    inner: Arc<Mutex<MemInner>>,
}

struct MemInner {
    slots: Vec<[Option<Slot>; 2]>,
    broken: Vec<bool>,
}

impl MemStore {
    pub fn new(members: usize) -> MemStore {
        MemStore {
            inner: Arc::new(Mutex::new(MemInner {
                slots: vec![[None, None]; members],
                broken: vec![false; members],
            })),
        }
    }

    /// Member `i` fails every read and write from now on (or works again).
    pub fn set_broken(&self, i: usize, broken: bool) {
        self.inner.lock().unwrap().broken[i] = broken;
    }
}

impl MailboxStore for MemStore {
    fn members(&self) -> usize {
        self.inner.lock().unwrap().slots.len()
    }
    fn write_slot(&self, slot: &Slot) -> (usize, Vec<String>) {
        let mut g = self.inner.lock().unwrap();
        let mut written = 0;
        let mut failed = Vec::new();
        for i in 0..g.slots.len() {
            if g.broken[i] {
                failed.push(format!("mem{i}: broken"));
            } else {
                g.slots[i][slot.slot_index as usize] = Some(slot.clone());
                written += 1;
            }
        }
        (written, failed)
    }
    fn read_slot(&self, index: usize) -> SlotVote {
        let g = self.inner.lock().unwrap();
        let reads: Vec<Result<Slot, Option<SlotError>>> = (0..g.slots.len())
            .map(|i| {
                if g.broken[i] {
                    Err(None)
                } else {
                    g.slots[i][index].clone().ok_or(Some(SlotError::Empty))
                }
            })
            .collect();
        vote(&reads)
    }
}

/// Errors of the synchronous mailbox operations used by steps.
#[derive(Debug, thiserror::Error)]
pub enum MailboxError {
    #[error(
        "mailbox slot reached {written} of {members} members (a majority is needed): {failures:?}"
    )]
    NoMajorityWrite {
        written: usize,
        members: usize,
        failures: Vec<String>,
    },
    #[error(
        "partner's mailbox slot readable on {readable} of {members} members (a majority is needed)"
    )]
    NoMajorityRead { readable: usize, members: usize },
    #[error("self-fence bound {bound_ms} ms is too long for mailbox_timeout_ms {mailbox_timeout_ms}: the partner must wait at least twice the bound")]
    Bound {
        bound_ms: u64,
        mailbox_timeout_ms: u64,
    },
    #[error("cannot start the mailbox driver thread: {0}")]
    Thread(std::io::Error),
}

/// Driver settings.
#[derive(Debug, Clone)]
pub struct MailboxConfig {
    /// This node's name and the partner's (the slot index follows from their byte order).
    pub node_name: String,
    pub partner_name: String,
    /// How often both slots are read (the HA heartbeat interval).
    pub interval: Duration,
    /// Self-fence: halt when no new heartbeat reached a majority for longer than this.
    pub self_fence_bound_ms: u64,
}

/// The partner may declare us dead after `mailbox_timeout_ms` of mailbox silence; by then we
/// must have fenced ourselves: `2 * bound <= mailbox_timeout_ms`.
pub fn check_bound(bound_ms: u64, mailbox_timeout_ms: u64) -> Result<(), MailboxError> {
    if bound_ms == 0 || bound_ms.saturating_mul(2) > mailbox_timeout_ms {
        return Err(MailboxError::Bound {
            bound_ms,
            mailbox_timeout_ms,
        });
    }
    Ok(())
}

#[derive(Debug, Clone, Default)]
struct Desired {
    /// (counter, state, clean_shutdown) of the latest heartbeat the HA loop asked for.
    beat: Option<(u64, State, bool)>,
    please_die: bool,
    please_die_epoch: u64,
    /// We acknowledge writes the partner's mirror lacks.
    unmirrored: bool,
    /// MarkCleanShutdown ran: keep the flag while ShuttingDown / TakenOver.
    clean_marked: bool,
    /// Bumped on every change; the driver writes when it differs from what it wrote.
    version: u64,
}

struct Inner {
    store: Arc<dyn MailboxStore>,
    cfg: MailboxConfig,
    own_index: usize,
    origin: Instant,
    desired: Mutex<Desired>,
    wake: Condvar,
    /// Serialises slot writes (driver and step threads), so a stale copy never lands last.
    write_lock: Mutex<()>,
    /// ms since `origin` of the last majority write of a new heartbeat; u64::MAX = not armed.
    last_majority_ms: AtomicU64,
    last_failure: Mutex<String>,
    stop: AtomicBool,
    /// Called by the driver thread itself when the self-fence bound passes (see
    /// [`MailboxHandle::set_self_fence_hook`]).
    self_fence_hook: Mutex<Option<SelfFenceHook>>,
}

/// Stops this node's data plane (see [`MailboxHandle::set_self_fence_hook`]).
pub type SelfFenceHook = Box<dyn Fn(&str) + Send + Sync>;

/// Handle on the mailbox driver: non-blocking for the HA loop, synchronous for steps.
#[derive(Clone)]
pub struct MailboxHandle {
    inner: Arc<Inner>,
}

/// The running driver thread.
pub struct MailboxDriver {
    pub handle: MailboxHandle,
    thread: Option<JoinHandle<()>>,
}

impl MailboxDriver {
    /// Start the driver; mailbox reads go to `ha`.
    pub fn spawn(
        store: Arc<dyn MailboxStore>,
        cfg: MailboxConfig,
        ha: HaHandle,
    ) -> Result<MailboxDriver, MailboxError> {
        let own_index = slot_index(&cfg.node_name, &cfg.partner_name);
        // "Unmirrored" outlives the process that set it: its log may still hold writes the
        // partner's mirror lacks, and only the journal that resyncs the mirror clears it.
        let own = store.read_slot(own_index);
        let members = store.members();
        // Unknown (no majority of members read) counts as set: the journal clears it once
        // the mirror is resynced, and a clear flag would have our first heartbeat erase it.
        let unmirrored = own.newest.as_ref().is_some_and(|s| s.unmirrored)
            || (own.valid + own.empty) * 2 <= members;
        if unmirrored {
            tracing::warn!(node = %cfg.node_name, "mailbox: an earlier run acknowledged writes the partner's mirror lacks; the flag stays until the mirror is resynced");
        }
        let inner = Arc::new(Inner {
            store,
            cfg,
            own_index,
            origin: Instant::now(),
            desired: Mutex::new(Desired {
                unmirrored,
                ..Desired::default()
            }),
            wake: Condvar::new(),
            write_lock: Mutex::new(()),
            last_majority_ms: AtomicU64::new(u64::MAX),
            last_failure: Mutex::new(String::new()),
            stop: AtomicBool::new(false),
            self_fence_hook: Mutex::new(None),
        });
        let handle = MailboxHandle {
            inner: inner.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("ha-mailbox".into())
            .spawn(move || run(inner, ha))
            .map_err(MailboxError::Thread)?;
        Ok(MailboxDriver {
            handle,
            thread: Some(thread),
        })
    }

    /// Stop the thread and wait for it.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        self.handle.inner.stop.store(true, Ordering::SeqCst);
        self.handle.inner.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for MailboxDriver {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

fn run(inner: Arc<Inner>, ha: HaHandle) {
    let mut written_version = None;
    let mut next_read = Instant::now();
    let mut self_fenced = false;
    loop {
        // The HA loop halts the node when the bound passes, on its tick: a loop that hangs
        // (and so asks for no heartbeat: the bound passes) would leave the data plane
        // writing while the partner takes the silence for a fence. This thread checks too.
        match inner.self_fence_reason() {
            Some(why) if !self_fenced => {
                self_fenced = true;
                if let Some(h) = inner.self_fence_hook.lock().unwrap().as_ref() {
                    tracing::error!(node = %inner.cfg.node_name, "{why}: the mailbox driver stops the data plane");
                    h(&why);
                }
            }
            Some(_) => {}
            None => self_fenced = false,
        }
        let desired = {
            let mut g = inner.desired.lock().unwrap();
            loop {
                if inner.stop.load(Ordering::SeqCst) {
                    return;
                }
                let now = Instant::now();
                if Some(g.version) != written_version && g.beat.is_some() || now >= next_read {
                    break;
                }
                g = inner.wake.wait_timeout(g, next_read - now).unwrap().0;
            }
            g.clone()
        };
        if desired.beat.is_some() && Some(desired.version) != written_version {
            inner.write(&desired);
            written_version = Some(desired.version);
        }
        if Instant::now() >= next_read {
            next_read = Instant::now() + inner.cfg.interval;
            let view = inner.read_view();
            // A dropped read is harmless (the next one follows); a full queue must not stall
            // the heartbeat writes.
            if !ha.try_mailbox_read(view) && ha.is_closed() {
                return;
            }
        }
    }
}

impl Inner {
    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    fn self_fence_reason(&self) -> Option<String> {
        let last = self.last_majority_ms.load(Ordering::SeqCst);
        if last == u64::MAX {
            return None; // no heartbeat asked for yet: nothing served yet either
        }
        let now = self.now_ms();
        let fence = SelfFence {
            bound_ms: self.cfg.self_fence_bound_ms,
            last_majority_write_ms: last,
        };
        if !fence.must_fence(now) {
            return None;
        }
        let detail = self.last_failure.lock().unwrap().clone();
        Some(format!(
            "no heartbeat reached a majority of the {} mailbox members for {} ms (bound {} ms){}{}",
            self.store.write_members(),
            now.saturating_sub(last),
            self.cfg.self_fence_bound_ms,
            if detail.is_empty() { "" } else { "; last: " },
            detail
        ))
    }

    fn slot(&self, d: &Desired) -> Option<Slot> {
        let (counter, state, clean) = d.beat?;
        let clean_kept = d.clean_marked && matches!(state, State::ShuttingDown | State::TakenOver);
        Some(Slot {
            slot_index: self.own_index as u32,
            node_name: self.cfg.node_name.clone(),
            aggregate_uuid: [0; 16],
            counter,
            state: state.code(),
            clean_shutdown: clean || clean_kept,
            please_die_for_partner: d.please_die,
            unmirrored: d.unmirrored,
            please_die_epoch: d.please_die_epoch,
            writer_ms: self.now_ms(),
        })
    }

    /// Writes the slot for `d`; returns (written, members, failures).
    fn write(&self, d: &Desired) -> (usize, usize, Vec<String>) {
        let Some(slot) = self.slot(d) else {
            return (
                0,
                self.store.write_members(),
                vec!["no heartbeat yet".into()],
            );
        };
        let (written, failed) = {
            let _g = self.write_lock.lock().unwrap();
            self.store.write_slot(&slot)
        };
        let members = self.store.write_members();
        if written * 2 > members {
            self.last_majority_ms.store(self.now_ms(), Ordering::SeqCst);
        } else {
            let why = format!(
                "slot write (heartbeat {}) reached {written} of {members} members: {}",
                slot.counter,
                failed.join("; ")
            );
            tracing::warn!(node = %self.cfg.node_name, "{why}");
            *self.last_failure.lock().unwrap() = why;
        }
        (written, members, failed)
    }

    fn read_view(&self) -> Option<MailboxView> {
        let partner = self.store.read_slot(1 - self.own_index);
        let own = self.store.read_slot(self.own_index);
        ha_view(&own, &partner, self.store.members())
    }
}

impl MailboxHandle {
    /// Which slot this node writes.
    pub fn own_index(&self) -> usize {
        self.inner.own_index
    }

    fn update(&self, f: impl FnOnce(&mut Desired)) -> Desired {
        let mut g = self.inner.desired.lock().unwrap();
        f(&mut g);
        g.version += 1;
        let d = g.clone();
        drop(g);
        self.inner.wake.notify_all();
        d
    }

    /// Write the slot with please-die set or cleared *now* (fence, release fence). Fails
    /// unless a majority of members took it: a fence without the poison pill is no fence.
    pub fn write_please_die_now(&self, on: bool, epoch: u64) -> Result<usize, MailboxError> {
        let d = self.update(|d| {
            d.please_die = on;
            d.please_die_epoch = if on { epoch } else { 0 };
        });
        self.majority_write(&d)
    }

    /// Say in our slot *now* whether we acknowledge writes the partner's mirror lacks. Setting
    /// it must reach a majority before the first such write is acknowledged: it is how a
    /// partner that cannot hear the interconnect learns not to take over from a stale mirror.
    pub fn set_unmirrored_now(&self, on: bool) -> Result<usize, MailboxError> {
        let d = self.update(|d| d.unmirrored = on);
        self.majority_write(&d)
    }

    /// Have the driver thread call `hook` (once per episode) when no heartbeat reached a
    /// majority for longer than the bound, whatever the HA loop does: it stops the data plane
    /// (the node's halt), so that a hung HA loop cannot leave it writing past the time the
    /// partner relies on.
    pub fn set_self_fence_hook(&self, hook: Option<SelfFenceHook>) {
        *self.inner.self_fence_hook.lock().unwrap() = hook;
    }

    /// Whether our slot says we acknowledge (or an earlier run acknowledged) writes the
    /// partner's mirror lacks.
    pub fn unmirrored(&self) -> bool {
        self.inner.desired.lock().unwrap().unmirrored
    }

    /// Record a clean shutdown in our slot *now* (the `MarkCleanShutdown` step).
    pub fn mark_clean_shutdown_now(&self) -> Result<usize, MailboxError> {
        let d = self.update(|d| d.clean_marked = true);
        self.majority_write(&d)
    }

    fn majority_write(&self, d: &Desired) -> Result<usize, MailboxError> {
        let (written, members, failures) = self.inner.write(d);
        if written * 2 > members {
            Ok(written)
        } else {
            Err(MailboxError::NoMajorityWrite {
                written,
                members,
                failures,
            })
        }
    }

    /// Read the partner's slot *now*: did it leave please-die for us? (`RecheckMailbox`.)
    pub fn recheck(&self) -> Result<bool, MailboxError> {
        let members = self.inner.store.members();
        let partner = self.inner.store.read_slot(1 - self.inner.own_index);
        if (partner.valid + partner.empty) * 2 <= members {
            return Err(MailboxError::NoMajorityRead {
                readable: partner.valid + partner.empty,
                members,
            });
        }
        Ok(partner
            .newest
            .as_ref()
            .is_some_and(|s| s.please_die_for_partner))
    }

    /// A full mailbox view read now.
    pub fn read_view(&self) -> Option<MailboxView> {
        self.inner.read_view()
    }

    /// Run a step that only needs the mailbox; `None` for other steps. Executors call this for
    /// `RecheckMailbox` and `MarkCleanShutdown`, and write please-die as part of `Fence` and
    /// `ReleaseFence` with [`MailboxHandle::write_please_die_now`].
    pub fn run_step(&self, step: Step) -> Option<StepOutcome> {
        use crate::core::takeover::StepError;
        match step {
            Step::RecheckMailbox => Some(match self.recheck() {
                Ok(please_die) => StepOutcome::MailboxChecked { please_die },
                Err(e) => StepOutcome::Failed(StepError::Failed(e.to_string())),
            }),
            Step::MarkCleanShutdown => Some(match self.mark_clean_shutdown_now() {
                Ok(_) => StepOutcome::Done,
                Err(e) => StepOutcome::Failed(StepError::Failed(e.to_string())),
            }),
            _ => None,
        }
    }

    /// Members the store has.
    pub fn members(&self) -> usize {
        self.inner.store.members()
    }
}

impl MailboxSink for MailboxHandle {
    fn beat(&mut self, counter: u64, state: State, clean_shutdown: bool) {
        // The first heartbeat arms self-fencing; the bound counts from here.
        let _ = self.inner.last_majority_ms.compare_exchange(
            u64::MAX,
            self.inner.now_ms(),
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        self.update(|d| {
            d.beat = Some((counter, state, clean_shutdown));
            if !matches!(state, State::ShuttingDown | State::TakenOver) {
                d.clean_marked = false;
            }
        });
    }

    fn set_partner_please_die(&mut self, on: bool, epoch: u64) {
        let g = self.inner.desired.lock().unwrap();
        let same = g.please_die == on && (!on || g.please_die_epoch == epoch);
        drop(g);
        if !same {
            self.update(|d| {
                d.please_die = on;
                d.please_die_epoch = if on { epoch } else { 0 };
            });
        }
    }

    fn self_fence_reason(&self) -> Option<String> {
        self.inner.self_fence_reason()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::ha::{self, MailboxSink};

    fn driver(store: Arc<MemStore>, node: &str, partner: &str) -> (MailboxDriver, ha::HaInbox) {
        let (h, inbox) = ha::channel(ha::INPUT_CAPACITY);
        let d = MailboxDriver::spawn(
            store,
            MailboxConfig {
                node_name: node.into(),
                partner_name: partner.into(),
                interval: Duration::from_millis(20),
                self_fence_bound_ms: 150,
            },
            h,
        )
        .unwrap();
        (d, inbox)
    }

    /// Whether an earlier run left "unmirrored" in our slot is unknown when a majority of
    /// members cannot be read at start: it counts as set (the journal clears it once the
    /// mirror is resynced); counted as clear, the first heartbeat would have erased it.
    #[test]
    fn an_unreadable_own_slot_at_start_counts_as_unmirrored() {
        let store = Arc::new(MemStore::new(3));
        let (d, _inbox) = driver(store.clone(), "a", "b");
        assert!(
            !d.handle.unmirrored(),
            "an empty mailbox: nothing was unmirrored"
        );
        d.stop();
        store.set_broken(0, true);
        store.set_broken(1, true);
        let (d, _inbox) = driver(store, "a", "b");
        assert!(d.handle.unmirrored());
    }

    /// The HA loop asks for a heartbeat every interval; when it hangs, it asks for none, the
    /// bound passes, and nothing would stop the data plane until the loop came back (or the
    /// watchdog killed the process): the driver thread stops it itself.
    #[test]
    fn the_driver_stops_the_data_plane_when_the_ha_loop_hangs() {
        let store = Arc::new(MemStore::new(3));
        let (d, _inbox) = driver(store, "a", "b");
        let fired = Arc::new(AtomicU64::new(0));
        let f = fired.clone();
        d.handle.set_self_fence_hook(Some(Box::new(move |why| {
            assert!(why.contains("majority"), "{why}");
            f.fetch_add(1, Ordering::SeqCst);
        })));
        // Not armed before the first heartbeat: nothing is served yet.
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(fired.load(Ordering::SeqCst), 0);
        // A live HA loop: no halt.
        let mut sink = d.handle.clone();
        for c in 1..=25 {
            sink.beat(c, State::Normal, false);
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(fired.load(Ordering::SeqCst), 0, "halted while beating");
        // The loop hangs: within the bound and an interval or two, halted, once.
        let t0 = Instant::now();
        while fired.load(Ordering::SeqCst) == 0 {
            assert!(t0.elapsed() < Duration::from_secs(2), "not halted");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(fired.load(Ordering::SeqCst), 1, "once per episode");
    }
}

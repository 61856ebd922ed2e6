//! A RAID-4 aggregate at work: executes the plans of `core::raid4` through an I/O engine, keeps
//! parity right under concurrent writers (stripe locks), survives one failed member, and keeps
//! the labels up to date.

use crate::core::label::{self, Assembly, CleanState, Label, Role, LABEL_BYTES};
use crate::core::raid4::{xor_into, Geometry, Seg, StripeSpan, WriteMethod};
use crate::daemon::backend::{Backend, BackendError, BlockSizes};
use crate::io::buf::{BufArena, IoBuf};
use crate::io::engine::{Engine, IoOp, OpBuf};
use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Makes one engine per concurrently running caller.
pub type EngineFactory = Arc<dyn Fn() -> io::Result<Box<dyn Engine>> + Send + Sync>;

/// Errors of the aggregate.
#[derive(Debug, thiserror::Error)]
pub enum AggregateError {
    #[error("aggregate {name} is offline: {why}")]
    Offline { name: String, why: String },
    #[error("{0}")]
    Invalid(String),
    #[error("cannot create an I/O engine: {0}")]
    Engine(io::Error),
    #[error("aggregate {name}: {source}")]
    Assembly {
        name: String,
        source: label::AssemblyError,
    },
    #[error("member {index} ({path}): {source}")]
    Member {
        index: usize,
        path: String,
        source: io::Error,
    },
}

impl From<AggregateError> for BackendError {
    fn from(e: AggregateError) -> BackendError {
        match e {
            AggregateError::Invalid(s) => BackendError::Invalid(s),
            other => BackendError::Io(other.to_string()),
        }
    }
}

/// Counters, for status and benchmarks.
#[derive(Debug, Default)]
pub struct AggStats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub full_stripe_writes: AtomicU64,
    pub rmw_writes: AtomicU64,
    pub rcw_writes: AtomicU64,
    pub degraded_reads: AtomicU64,
    pub degraded_writes: AtomicU64,
    pub member_errors: AtomicU64,
    /// Pieces of a batch whose parity update joined another's in the same stripe
    /// ([`Aggregate::write_batch`]): one read-modify-write of the parity for both.
    pub parity_merges: AtomicU64,
}

#[derive(Debug, Clone)]
struct State {
    /// The label of member 0's shape at the current generation (per-member fields vary).
    label: Label,
    failed: Option<usize>,
    /// Set when two members failed: nothing is served.
    offline: Option<String>,
}

/// Range locks over stripes: writers (and degraded readers) hold every stripe they touch.
struct StripeLocks {
    held: Mutex<HashSet<u64>>,
    cv: Condvar,
}

struct StripeGuard<'a> {
    locks: &'a StripeLocks,
    first: u64,
    last: u64,
}

impl StripeLocks {
    fn lock(&self, first: u64, last: u64) -> StripeGuard<'_> {
        let mut held = self.held.lock().unwrap();
        while (first..=last).any(|s| held.contains(&s)) {
            held = self.cv.wait(held).unwrap();
        }
        held.extend(first..=last);
        StripeGuard {
            locks: self,
            first,
            last,
        }
    }
}

impl Drop for StripeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock().unwrap();
        for s in self.first..=self.last {
            held.remove(&s);
        }
        self.locks.cv.notify_all();
    }
}

/// Stripes held together (a batch of writes): taken all at once when none is held, so two
/// sets never wait for each other.
struct StripeSetGuard<'a> {
    locks: &'a StripeLocks,
    stripes: Vec<u64>,
}

impl StripeLocks {
    fn lock_set(&self, stripes: Vec<u64>) -> StripeSetGuard<'_> {
        let mut held = self.held.lock().unwrap();
        while stripes.iter().any(|s| held.contains(s)) {
            held = self.cv.wait(held).unwrap();
        }
        held.extend(stripes.iter().copied());
        StripeSetGuard {
            locks: self,
            stripes,
        }
    }
}

impl Drop for StripeSetGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock().unwrap();
        for s in &self.stripes {
            held.remove(s);
        }
        self.locks.cv.notify_all();
    }
}

/// Each member's path with its label, or why it has none.
pub type MemberLabels = Vec<(String, Result<Label, String>)>;

/// An assembled, serving RAID-4 aggregate.
pub struct Aggregate {
    name: String,
    geo: Geometry,
    data_offset: u64,
    /// Alignment every member offset and length must have (largest logical block size).
    align: u64,
    /// Largest request served in one piece.
    max_request_bytes: u32,
    paths: Vec<String>,
    engines: Mutex<Vec<Box<dyn Engine>>>,
    factory: EngineFactory,
    arena: Arc<BufArena>,
    state: RwLock<State>,
    locks: StripeLocks,
    /// Serialises label rewrites.
    label_lock: Mutex<()>,
    pub stats: AggStats,
    /// Called once when a member refuses our I/O with a reservation conflict.
    on_fenced: Mutex<Option<FencedHook>>,
    /// Set by [`Aggregate::halt`]: no member I/O is started any more.
    halted: AtomicBool,
    /// Member I/O batches started and not yet completed (what a halt waits for).
    in_flight: AtomicUsize,
    /// Unit tests: the next write round writes its data but not its parity, then the
    /// aggregate halts: a crash in the middle of a stripe write (the RAID write hole).
    #[cfg(test)]
    pub(crate) tear_next_write: AtomicBool,
}

/// Told that this node was fenced off the aggregate's disks (see [`Aggregate::set_on_fenced`]).
pub type FencedHook = Box<dyn Fn(&str) + Send + Sync>;

/// A member refused our I/O because another initiator holds its persistent reservation:
/// the block layer turns SCSI status RESERVATION CONFLICT into EBADE. Not a disk failure.
pub fn is_reservation_conflict(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EBADE)
}

/// Things an operator wants to see about an aggregate.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AggregateStatus {
    pub name: String,
    pub uuid: String,
    pub home_node: String,
    pub members: Vec<String>,
    pub data_members: usize,
    pub chunk_bytes: u64,
    pub size_bytes: u64,
    pub generation: u64,
    pub failed_member: Option<usize>,
    pub offline: Option<String>,
    pub engine: String,
}

/// Progress reports of long operations: (done, total).
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// Split `buf` into consecutive pieces of the given lengths.
/// True when two spans of one stripe touch no byte of the same member.
fn disjoint(a: &StripeSpan, b: &StripeSpan) -> bool {
    a.segs.iter().all(|x| {
        b.segs
            .iter()
            .all(|y| x.member != y.member || x.col + x.len <= y.col || y.col + y.len <= x.col)
    })
}

fn split_mut<'a>(mut buf: &'a mut [u8], lens: &[usize]) -> Vec<&'a mut [u8]> {
    let mut out = Vec::with_capacity(lens.len());
    for &l in lens {
        let (a, b) = std::mem::take(&mut buf).split_at_mut(l);
        out.push(a);
        buf = b;
    }
    out
}

/// Per-span scratch plan for a write.
struct SpanPlan {
    method: Method,
    lo: u64,
    hi: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Method {
    Full,
    Rmw,
    Rcw,
    /// The parity member is failed: write data only.
    DataOnly,
    /// Data member `f` is failed: read every surviving member over the columns, rebuild f's old
    /// content, overlay the new data, write the survivors and the new parity.
    Degraded(usize),
}

/// What `format` needs to know.
#[derive(Debug, Clone)]
pub struct FormatSpec {
    /// Aggregate name (1..=63 bytes).
    pub name: String,
    /// Home node name.
    pub home_node: String,
    /// Chunk size (power of two >= 4096).
    pub chunk_bytes: u64,
    /// Size of each member in bytes, in member order (data members, then parity).
    pub member_bytes: Vec<u64>,
    /// The new aggregate's identity.
    pub uuid: [u8; 16],
}

impl Aggregate {
    /// Initialise members as a new, clean aggregate: zero the label, mailbox and data areas (so
    /// that parity, the XOR of zeroes, is right from the start), then write the labels.
    pub fn format(
        factory: &EngineFactory,
        arena: &Arc<BufArena>,
        spec: &FormatSpec,
        progress: Progress,
    ) -> Result<Label, AggregateError> {
        let members = spec.member_bytes.len();
        if members < 2 {
            return Err(AggregateError::Invalid(
                "an aggregate needs at least one data member and one parity member".into(),
            ));
        }
        let smallest = *spec.member_bytes.iter().min().unwrap();
        let need = label::DATA_OFFSET_BYTES + spec.chunk_bytes;
        if smallest < need {
            return Err(AggregateError::Invalid(format!(
                "smallest member has {smallest} bytes; a member needs at least {need}"
            )));
        }
        let data_bytes =
            (smallest - label::DATA_OFFSET_BYTES) / spec.chunk_bytes * spec.chunk_bytes;
        Geometry::new(members - 1, spec.chunk_bytes, data_bytes)
            .map_err(|e| AggregateError::Invalid(e.to_string()))?;
        let label = Label {
            format_version: label::FORMAT_VERSION,
            aggregate_uuid: spec.uuid,
            aggregate_name: spec.name.clone(),
            member_index: 0,
            role: Role::Data,
            member_count: members as u32,
            chunk_bytes: spec.chunk_bytes as u32,
            data_offset_bytes: label::DATA_OFFSET_BYTES,
            data_bytes,
            home_node: spec.home_node.clone(),
            generation: 1,
            state: CleanState::Clean,
            failed_member: None,
            mailbox_offset_bytes: label::MAILBOX_OFFSET_BYTES,
            mailbox_bytes: label::MAILBOX_BYTES,
        };
        label
            .validate()
            .map_err(|e| AggregateError::Invalid(e.to_string()))?;
        let mut engine = factory().map_err(AggregateError::Engine)?;
        let step: u64 = 4 << 20;
        let mut zeros = arena.alloc(step as usize);
        zeros.fill(0);
        let end = label::DATA_OFFSET_BYTES + data_bytes;
        let mut pos = 0;
        while pos < end {
            let n = step.min(end - pos) as usize;
            let mut ops: Vec<IoOp> = (0..members)
                .map(|m| IoOp {
                    member: m,
                    offset: pos,
                    buf: OpBuf::Write(&zeros[..n]),
                    dsync: false,
                })
                .collect();
            for (m, r) in engine.run(&mut ops).into_iter().enumerate() {
                r.map_err(|source| AggregateError::Member {
                    index: m,
                    path: format!("member {m}"),
                    source,
                })?;
            }
            pos += n as u64;
            progress(pos, end);
        }
        for (m, r) in engine
            .flush(&(0..members).collect::<Vec<_>>())
            .into_iter()
            .enumerate()
        {
            r.map_err(|source| AggregateError::Member {
                index: m,
                path: format!("member {m}"),
                source,
            })?;
        }
        let errs = Self::write_labels(
            engine.as_mut(),
            arena,
            &label,
            &(0..members).collect::<Vec<_>>(),
        );
        if let Some((m, source)) = errs.into_iter().next() {
            return Err(AggregateError::Member {
                index: m,
                path: format!("member {m}"),
                source,
            });
        }
        Ok(label)
    }

    /// Read every member's label through a fresh engine: `Err(reason)` where a member cannot be
    /// read or has no valid label.
    pub fn read_labels(
        factory: &EngineFactory,
        paths: &[String],
        arena: &Arc<BufArena>,
    ) -> Result<MemberLabels, AggregateError> {
        let mut engine = factory().map_err(AggregateError::Engine)?;
        let mut bufs: Vec<IoBuf> = paths.iter().map(|_| arena.alloc(LABEL_BYTES)).collect();
        let mut ops: Vec<IoOp> = bufs
            .iter_mut()
            .enumerate()
            .map(|(m, b)| IoOp {
                member: m,
                offset: 0,
                buf: OpBuf::Read(&mut b[..]),
                dsync: false,
            })
            .collect();
        let res = engine.run(&mut ops);
        drop(ops);
        Ok(paths
            .iter()
            .zip(res)
            .zip(bufs.iter())
            .map(|((p, r), b)| {
                let l = match r {
                    Err(e) => Err(format!("cannot read label: {e}")),
                    Ok(()) => Label::decode(b).map_err(|e| e.to_string()),
                };
                (p.clone(), l)
            })
            .collect())
    }

    /// Write `label` (with each member's index and role filled in) to `members`; returns the
    /// members whose write failed.
    fn write_labels(
        engine: &mut dyn Engine,
        arena: &Arc<BufArena>,
        label: &Label,
        members: &[usize],
    ) -> Vec<(usize, io::Error)> {
        let mut bufs: Vec<IoBuf> = Vec::new();
        for &m in members {
            let mut l = label.clone();
            l.member_index = m as u32;
            l.role = if m as u32 + 1 == l.member_count {
                Role::Parity
            } else {
                Role::Data
            };
            let mut b = arena.alloc(LABEL_BYTES);
            b.copy_from_slice(&l.encode().expect("labels we build are valid"));
            bufs.push(b);
        }
        let mut ops: Vec<IoOp> = members
            .iter()
            .zip(bufs.iter())
            .map(|(&m, b)| IoOp {
                member: m,
                offset: 0,
                buf: OpBuf::Write(&b[..]),
                dsync: true,
            })
            .collect();
        let res = engine.run(&mut ops);
        members
            .iter()
            .zip(res)
            .filter_map(|(&m, r)| r.err().map(|e| (m, e)))
            .collect()
    }

    /// Assemble the aggregate from its members' labels, and mark it open (dirty) for writing.
    /// `needs_resync` in the result says the previous owner did not close it cleanly.
    pub fn assemble(
        paths: Vec<String>,
        factory: EngineFactory,
        arena: Arc<BufArena>,
        align: u64,
        max_request_bytes: u32,
    ) -> Result<(Aggregate, bool), AggregateError> {
        Self::assemble_with(
            paths,
            factory,
            arena,
            align,
            max_request_bytes,
            &mut |_, _| Ok(()),
        )
    }

    /// [`Aggregate::assemble`], calling `before_dirty(was_dirty, uuid)` after the labels were read
    /// and before they are marked dirty: what depends on "closed cleanly" (a log that is then
    /// stale) must be settled durably before a crash could leave the labels dirty without it.
    pub fn assemble_with(
        paths: Vec<String>,
        factory: EngineFactory,
        arena: Arc<BufArena>,
        align: u64,
        max_request_bytes: u32,
        before_dirty: &mut dyn FnMut(bool, [u8; 16]) -> Result<(), String>,
    ) -> Result<(Aggregate, bool), AggregateError> {
        let labels = Self::read_labels(&factory, &paths, &arena)?;
        let name_guess = labels
            .iter()
            .find_map(|(_, l)| l.as_ref().ok().map(|l| l.aggregate_name.clone()))
            .unwrap_or_else(|| "?".into());
        let Assembly {
            reference,
            failed_member,
            failure_is_new,
        } = label::assemble(&labels).map_err(|source| AggregateError::Assembly {
            name: name_guess,
            source,
        })?;
        let was_dirty = labels
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i as u32) != failed_member)
            .any(|(_, (_, l))| matches!(l, Ok(l) if l.state == CleanState::Dirty));
        let geo = Geometry::new(
            reference.member_count as usize - 1,
            reference.chunk_bytes as u64,
            reference.data_bytes,
        )
        .map_err(|e| AggregateError::Invalid(e.to_string()))?;
        let mut label = reference.clone();
        label.failed_member = failed_member;
        let agg = Aggregate {
            name: reference.aggregate_name.clone(),
            geo,
            data_offset: reference.data_offset_bytes,
            align: align.max(512),
            max_request_bytes,
            paths,
            engines: Mutex::new(Vec::new()),
            factory,
            arena,
            state: RwLock::new(State {
                label,
                failed: failed_member.map(|f| f as usize),
                offline: None,
            }),
            locks: StripeLocks {
                held: Mutex::new(HashSet::new()),
                cv: Condvar::new(),
            },
            label_lock: Mutex::new(()),
            stats: AggStats::default(),
            on_fenced: Mutex::new(None),
            halted: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            #[cfg(test)]
            tear_next_write: AtomicBool::new(false),
        };
        if failure_is_new {
            tracing::error!(aggregate = %agg.name, member = ?failed_member, "member unusable at assembly: serving degraded");
        }
        before_dirty(was_dirty, reference.aggregate_uuid).map_err(AggregateError::Invalid)?;
        agg.set_clean_state(CleanState::Dirty)?;
        Ok((agg, was_dirty))
    }

    /// Rewrite the labels of every surviving member at a new generation with `state`.
    pub fn set_clean_state(&self, state: CleanState) -> Result<(), AggregateError> {
        let _g = self.label_lock.lock().unwrap();
        let mut label = self.state.read().unwrap().label.clone();
        label.generation += 1;
        label.state = state;
        self.commit_label(label)
    }

    /// Write `label` to all surviving members and adopt it. A member that fails the write is
    /// failed in turn (and the labels rewritten once more).
    fn commit_label(&self, mut label: Label) -> Result<(), AggregateError> {
        let mut engine = self.take_engine()?;
        loop {
            let failed = label.failed_member.map(|f| f as usize);
            let members: Vec<usize> = (0..self.geo.members())
                .filter(|&m| Some(m) != failed)
                .collect();
            self.in_flight.fetch_add(1, Ordering::SeqCst);
            if self.halted.load(Ordering::SeqCst) {
                self.in_flight.fetch_sub(1, Ordering::SeqCst);
                self.put_engine(engine);
                return Err(AggregateError::Offline {
                    name: self.name.clone(),
                    why: "halted: no label is written".into(),
                });
            }
            let errs = Self::write_labels(engine.as_mut(), &self.arena, &label, &members);
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            if errs.is_empty() {
                let mut st = self.state.write().unwrap();
                st.failed = failed;
                st.label = label;
                drop(st);
                self.put_engine(engine);
                return Ok(());
            }
            if let Some((m, e)) = errs.iter().find(|(_, e)| is_reservation_conflict(e)) {
                let why = self.fenced(*m, e);
                self.put_engine(engine);
                return Err(AggregateError::Offline {
                    name: self.name.clone(),
                    why,
                });
            }
            let (m, e) = &errs[0];
            self.stats.member_errors.fetch_add(1, Ordering::Relaxed);
            if failed.is_some() || errs.len() > 1 {
                let why = format!(
                    "label write failed on member {m} ({}): {e} with another member already failed",
                    self.paths[*m]
                );
                self.state.write().unwrap().offline = Some(why.clone());
                self.put_engine(engine);
                return Err(AggregateError::Offline {
                    name: self.name.clone(),
                    why,
                });
            }
            tracing::error!(aggregate = %self.name, member = m, path = %self.paths[*m], error = %e, "label write failed: failing member");
            label.failed_member = Some(*m as u32);
            label.generation += 1;
        }
    }

    /// `f` is called (once, from the I/O path) when a member refuses our I/O with a
    /// reservation conflict: the partner fenced us, stop serving.
    pub fn set_on_fenced(&self, f: FencedHook) {
        *self.on_fenced.lock().unwrap() = Some(f);
    }

    /// A reservation conflict on member `m`: we are fenced. Nothing is written (labels
    /// included: the disks refuse us anyway), no member is failed, the aggregate goes
    /// offline and the hook is told. Returns the reason.
    fn fenced(&self, m: usize, err: &io::Error) -> String {
        let why = format!(
            "fenced: member {m} ({}) refused our I/O with a reservation conflict ({err})",
            self.paths[m]
        );
        let first = {
            let mut st = self.state.write().unwrap();
            let first = st.offline.is_none();
            if first {
                st.offline = Some(why.clone());
            }
            first
        };
        if first {
            tracing::error!(aggregate = %self.name, member = m, path = %self.paths[m], "{why}");
            if let Some(f) = self.on_fenced.lock().unwrap().as_ref() {
                f(&why);
            }
        }
        why
    }

    /// Stop touching the members, now: the aggregate goes offline (every request fails from
    /// here on, label writes included, so it stays dirty), nothing more is submitted, and
    /// this returns once the batches already submitted completed, or after `wait`. True if
    /// they did. Takes no lock a long operation holds (a CP or resync in progress fails out
    /// on its next batch): with a mailbox-only fence the partner starts writing these disks
    /// a bounded time after telling us to die, and we must be off them by then.
    pub fn halt(&self, why: &str, wait: Duration) -> bool {
        self.begin_halt(why);
        self.wait_halted(wait)
    }

    /// The first half of [`Aggregate::halt`]: nothing more is submitted (returns at once).
    pub fn begin_halt(&self, why: &str) {
        self.halted.store(true, Ordering::SeqCst);
        let mut st = self
            .state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if st.offline.is_none() {
            st.offline = Some(format!("halted: {why}"));
        }
    }

    /// The second half of [`Aggregate::halt`]: wait for the batches already submitted.
    pub fn wait_halted(&self, wait: Duration) -> bool {
        let end = Instant::now() + wait;
        loop {
            let n = self.in_flight.load(Ordering::SeqCst);
            if n == 0 {
                return true;
            }
            if Instant::now() >= end {
                tracing::error!(aggregate = %self.name, batches = n, "halt: member I/O still in flight");
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Run a batch on the members unless halted (then `None`, nothing submitted). The
    /// in-flight count goes up before the check: a halt that finds it zero knows that every
    /// later batch sees the flag.
    fn run_unless_halted(
        &self,
        engine: &mut dyn Engine,
        ops: &mut [IoOp<'_>],
    ) -> Option<Vec<io::Result<()>>> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let r = if self.halted.load(Ordering::SeqCst) {
            None
        } else {
            Some(engine.run(ops))
        };
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        r
    }

    /// Mark member `m` failed after an I/O error (no-op if it already is).
    fn fail_member(&self, m: usize, err: &io::Error) {
        if self.halted.load(Ordering::SeqCst) {
            return; // Offline already; and a halted node writes no label.
        }
        if is_reservation_conflict(err) {
            self.fenced(m, err);
            return;
        }
        let _g = self.label_lock.lock().unwrap();
        let st = self.state.read().unwrap().clone();
        if st.offline.is_some() || st.failed == Some(m) {
            return;
        }
        self.stats.member_errors.fetch_add(1, Ordering::Relaxed);
        if let Some(f) = st.failed {
            let why = format!(
                "member {m} ({}) failed ({err}) while member {f} ({}) was already failed",
                self.paths[m], self.paths[f]
            );
            tracing::error!(aggregate = %self.name, "{why}; refusing to serve");
            self.state.write().unwrap().offline = Some(why);
            return;
        }
        tracing::error!(aggregate = %self.name, member = m, path = %self.paths[m], error = %err, "member failed: serving degraded from parity");
        let mut label = st.label.clone();
        label.failed_member = Some(m as u32);
        label.generation += 1;
        if let Err(e) = self.commit_label(label) {
            // Serving on as if healthy would be wrong twice over: a retried read-modify-write
            // would read the member's old data again and count its change into parity twice,
            // and a restart would take the stale member for a good one. Stop instead.
            let why = format!(
                "member {m} ({}) failed ({err}) and the failure could not be recorded: {e}",
                self.paths[m]
            );
            tracing::error!(aggregate = %self.name, "{why}; refusing to serve");
            let mut st = self.state.write().unwrap();
            if st.offline.is_none() {
                st.offline = Some(why);
            }
        }
    }

    fn take_engine(&self) -> Result<Box<dyn Engine>, AggregateError> {
        if let Some(e) = self.engines.lock().unwrap().pop() {
            return Ok(e);
        }
        (self.factory)().map_err(AggregateError::Engine)
    }

    fn put_engine(&self, e: Box<dyn Engine>) {
        self.engines.lock().unwrap().push(e);
    }

    /// The geometry.
    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// Name of the aggregate.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Currently failed member, if any.
    pub fn failed_member(&self) -> Option<usize> {
        self.state.read().unwrap().failed
    }

    /// Status for operators.
    pub fn status(&self) -> AggregateStatus {
        let st = self.state.read().unwrap();
        AggregateStatus {
            name: self.name.clone(),
            uuid: label::uuid_string(&st.label.aggregate_uuid),
            home_node: st.label.home_node.clone(),
            members: self.paths.clone(),
            data_members: self.geo.data_members,
            chunk_bytes: self.geo.chunk_bytes,
            size_bytes: self.geo.size_bytes(),
            generation: st.label.generation,
            failed_member: st.failed,
            offline: st.offline.clone(),
            engine: self
                .engines
                .lock()
                .unwrap()
                .first()
                .map(|e| e.kind())
                .unwrap_or("-")
                .to_string(),
        }
    }

    /// Check a request's range and alignment.
    pub fn check(&self, offset: u64, len: u64) -> Result<(), AggregateError> {
        self.geo
            .check_range(offset, len)
            .map_err(|e| AggregateError::Invalid(e.to_string()))?;
        if offset % self.align != 0 || len % self.align != 0 {
            return Err(AggregateError::Invalid(format!(
                "offset {offset} and length {len} must be multiples of {} bytes",
                self.align
            )));
        }
        Ok(())
    }

    fn healthy_state(&self) -> Result<Option<usize>, AggregateError> {
        let st = self.state.read().unwrap();
        match &st.offline {
            Some(why) => Err(AggregateError::Offline {
                name: self.name.clone(),
                why: why.clone(),
            }),
            None => Ok(st.failed),
        }
    }

    fn moff(&self, stripe: u64, col: u64) -> u64 {
        self.data_offset + self.geo.member_offset(stripe, col)
    }

    /// Run a batch; on errors fail the members concerned and return false.
    fn run_batch(&self, engine: &mut dyn Engine, ops: &mut [IoOp<'_>]) -> bool {
        if ops.is_empty() {
            return true;
        }
        let Some(res) = self.run_unless_halted(engine, ops) else {
            return false;
        };
        let mut ok = true;
        for (op, r) in ops.iter().zip(res) {
            if let Err(e) = r {
                ok = false;
                self.fail_member(op.member, &e);
            }
        }
        ok
    }

    /// Read `buf.len()` bytes at logical `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), AggregateError> {
        self.check(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        if buf.as_ptr() as usize % crate::io::buf::IO_ALIGN != 0 {
            let mut bounce = self.arena.alloc(buf.len());
            self.read(offset, &mut bounce)?;
            buf.copy_from_slice(&bounce);
            return Ok(());
        }
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        let spans = self.geo.spans(offset, buf.len() as u64);
        let mut engine = self.take_engine()?;
        let r = self.read_spans(engine.as_mut(), &spans, buf);
        self.put_engine(engine);
        r
    }

    /// Several reads in one round of member I/O. Where a member has failed (or a read fails),
    /// they are read one by one, the way [`Aggregate::read`] rebuilds and retries.
    pub fn read_batch(&self, reads: &mut [(u64, &mut [u8])]) -> Result<(), AggregateError> {
        for (offset, buf) in reads.iter() {
            self.check(*offset, buf.len() as u64)?;
        }
        let aligned = reads
            .iter()
            .all(|(_, b)| b.as_ptr() as usize % crate::io::buf::IO_ALIGN == 0);
        let mut done = false;
        if aligned && reads.len() > 1 && self.healthy_state()?.is_none() {
            let mut engine = self.take_engine()?;
            let mut ops: Vec<IoOp> = Vec::new();
            for (offset, buf) in reads.iter_mut() {
                let spans = self.geo.spans(*offset, buf.len() as u64);
                ops.extend(self.read_ops(&spans, buf));
            }
            done = self.run_batch(engine.as_mut(), &mut ops);
            drop(ops);
            self.put_engine(engine);
            if done {
                self.stats
                    .reads
                    .fetch_add(reads.len() as u64, Ordering::Relaxed);
            }
        }
        if !done {
            for (offset, buf) in reads.iter_mut() {
                self.read(*offset, buf)?;
            }
        }
        Ok(())
    }

    /// One read per seg of `spans`, into consecutive pieces of `buf` (healthy members only).
    fn read_ops<'a>(&self, spans: &[StripeSpan], buf: &'a mut [u8]) -> Vec<IoOp<'a>> {
        let lens: Vec<usize> = spans
            .iter()
            .flat_map(|s| s.segs.iter().map(|g| g.len as usize))
            .collect();
        spans
            .iter()
            .flat_map(|s| s.segs.iter().map(move |g| (s.stripe, *g)))
            .zip(split_mut(buf, &lens))
            .map(|((stripe, g), p)| IoOp {
                member: g.member,
                offset: self.moff(stripe, g.col),
                buf: OpBuf::Read(p),
                dsync: false,
            })
            .collect()
    }

    fn read_spans(
        &self,
        engine: &mut dyn Engine,
        spans: &[StripeSpan],
        buf: &mut [u8],
    ) -> Result<(), AggregateError> {
        for _attempt in 0..4 {
            let failed = self.healthy_state()?;
            let lens: Vec<usize> = spans
                .iter()
                .flat_map(|s| s.segs.iter().map(|g| g.len as usize))
                .collect();
            let touches_failed =
                failed.is_some_and(|f| spans.iter().any(|s| s.seg_of(f).is_some()));
            if !touches_failed {
                let mut ops = self.read_ops(spans, buf);
                if self.run_batch(engine, &mut ops) {
                    return Ok(());
                }
                continue;
            }
            let f = failed.unwrap();
            self.stats.degraded_reads.fetch_add(1, Ordering::Relaxed);
            let _guard = self
                .locks
                .lock(spans[0].stripe, spans[spans.len() - 1].stripe);
            if self.healthy_state()? != failed {
                continue;
            }
            // Pieces on the failed member are rebuilt from every other member's same columns.
            let others: Vec<usize> = (0..self.geo.members()).filter(|&m| m != f).collect();
            let rebuild: Vec<(u64, u64, u64, u64)> = spans
                .iter()
                .filter_map(|s| s.seg_of(f).map(|g| (s.stripe, g.col, g.len, g.buf_off)))
                .collect();
            let scratch_len: u64 = rebuild.iter().map(|r| r.2).sum::<u64>() * others.len() as u64;
            let mut scratch = self.arena.alloc(scratch_len as usize);
            let scratch_lens: Vec<usize> = rebuild
                .iter()
                .flat_map(|r| others.iter().map(move |_| r.2 as usize))
                .collect();
            {
                let pieces = split_mut(buf, &lens);
                let mut ops: Vec<IoOp> = Vec::new();
                let mut bufs = split_mut(&mut scratch, &scratch_lens).into_iter();
                for ((stripe, g), p) in spans
                    .iter()
                    .flat_map(|s| s.segs.iter().map(move |g| (s.stripe, *g)))
                    .zip(pieces)
                {
                    if g.member != f {
                        ops.push(IoOp {
                            member: g.member,
                            offset: self.moff(stripe, g.col),
                            buf: OpBuf::Read(p),
                            dsync: false,
                        });
                    }
                }
                for &(stripe, col, _, _) in &rebuild {
                    for &m in &others {
                        ops.push(IoOp {
                            member: m,
                            offset: self.moff(stripe, col),
                            buf: OpBuf::Read(bufs.next().unwrap()),
                            dsync: false,
                        });
                    }
                }
                if !self.run_batch(engine, &mut ops) {
                    continue;
                }
            }
            let mut pos = 0usize;
            for &(_, _, len, buf_off) in &rebuild {
                let out = &mut buf[buf_off as usize..(buf_off + len) as usize];
                out.fill(0);
                for _ in &others {
                    xor_into(out, &scratch[pos..pos + len as usize]);
                    pos += len as usize;
                }
            }
            return Ok(());
        }
        Err(AggregateError::Offline {
            name: self.name.clone(),
            why: "member failures kept interrupting a read".into(),
        })
    }

    /// Write `data` at logical `offset`; with `fua`, durable on the members before returning.
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), AggregateError> {
        self.write_inner(offset, data, fua, false)
    }

    /// Write `data` and compute the parity of every column it touches from all the data
    /// (reconstruct-write), never from the old parity: replay uses this after a crash, when a
    /// stripe write may have been torn and the old parity cannot be trusted.
    pub fn write_repair(&self, offset: u64, data: &[u8]) -> Result<(), AggregateError> {
        self.write_inner(offset, data, false, true)
    }

    /// Write several ranges as one batch of device I/O: one round of reads (old data and
    /// parity, for the read-modify-writes) and one round of writes for all of them, instead of
    /// two rounds each. Ranges that share a stripe go in later rounds, in the order given (each
    /// computes its stripe's parity from the previous one), so where two overlap the later
    /// one wins. With `repair`, parity comes
    /// from all the data, as in [`Aggregate::write_repair`]. A consistency point writes the log
    /// this way.
    pub fn write_batch(&self, writes: &[(u64, &[u8])], repair: bool) -> Result<(), AggregateError> {
        let mut bounced: Vec<IoBuf> = Vec::new();
        let mut items: Vec<(StripeSpan, usize)> = Vec::new(); // (span, index into `bufs`)
        let mut bufs: Vec<&[u8]> = Vec::with_capacity(writes.len());
        for &(off, data) in writes {
            self.check(off, data.len() as u64)?;
            if data.as_ptr() as usize % crate::io::buf::IO_ALIGN != 0 {
                let mut b = self.arena.alloc(data.len());
                b.copy_from_slice(data);
                bounced.push(b);
            }
        }
        let mut bounce_it = bounced.iter();
        for &(off, data) in writes {
            let data: &[u8] = if data.as_ptr() as usize % crate::io::buf::IO_ALIGN != 0 {
                bounce_it.next().unwrap()
            } else {
                data
            };
            let i = bufs.len();
            bufs.push(data);
            items.extend(
                self.geo
                    .spans(off, data.len() as u64)
                    .into_iter()
                    .map(|s| (s, i)),
            );
            self.stats.writes.fetch_add(1, Ordering::Relaxed);
        }
        let mut engine = self.take_engine()?;
        let mut r = Ok(());
        let mut merge = !repair && self.healthy_state()?.is_none();
        while !items.is_empty() && r.is_ok() {
            // This round: the first span of each stripe and, with `merge`, the spans after it
            // that share no member bytes with those taken (their parity updates become one
            // read-modify-write of the stripe's parity). The rest wait for the next round, in
            // order: once a stripe's span waits, every later one of that stripe waits too.
            let mut groups: Vec<Vec<(StripeSpan, usize)>> = Vec::new();
            let mut group_of: HashMap<u64, usize> = HashMap::new();
            let mut waiting: HashSet<u64> = HashSet::new();
            let mut later = Vec::new();
            for (span, i) in items {
                if waiting.contains(&span.stripe) {
                    later.push((span, i));
                    continue;
                }
                match group_of.get(&span.stripe) {
                    None => {
                        group_of.insert(span.stripe, groups.len());
                        groups.push(vec![(span, i)]);
                    }
                    Some(&g) if merge && groups[g].iter().all(|(t, _)| disjoint(t, &span)) => {
                        groups[g].push((span, i))
                    }
                    Some(_) => {
                        waiting.insert(span.stripe);
                        later.push((span, i));
                    }
                }
            }
            items = later;
            let _guard = self.locks.lock_set(group_of.into_keys().collect());
            // A merged span's pieces come from several buffers: copy them into one.
            let mut joined: Vec<IoBuf> = Vec::new();
            let mut spans: Vec<StripeSpan> = Vec::with_capacity(groups.len());
            let mut merged: Vec<bool> = Vec::with_capacity(groups.len());
            for g in &groups {
                if g.len() == 1 {
                    spans.push(g[0].0.clone());
                    merged.push(false);
                    continue;
                }
                let total: u64 = g.iter().flat_map(|(s, _)| &s.segs).map(|x| x.len).sum();
                let mut buf = self.arena.alloc(total as usize);
                let mut segs = Vec::new();
                let mut at = 0u64;
                for (span, i) in g {
                    for x in &span.segs {
                        let src = &bufs[*i][x.buf_off as usize..(x.buf_off + x.len) as usize];
                        buf[at as usize..(at + x.len) as usize].copy_from_slice(src);
                        segs.push(Seg { buf_off: at, ..*x });
                        at += x.len;
                    }
                }
                self.stats
                    .parity_merges
                    .fetch_add(g.len() as u64 - 1, Ordering::Relaxed);
                spans.push(StripeSpan {
                    stripe: g[0].0.stripe,
                    segs,
                });
                merged.push(true);
                joined.push(buf);
            }
            let mut joined_it = joined.iter();
            let datas: Vec<&[u8]> = groups
                .iter()
                .map(|g| {
                    if g.len() == 1 {
                        bufs[g[0].1]
                    } else {
                        &joined_it.next().unwrap()[..]
                    }
                })
                .collect();
            match self.write_spans(engine.as_mut(), &spans, &datas, false, repair, &merged) {
                Ok(true) => {}
                // A member failed under merged spans, which are written healthy only: this
                // round again, one span per stripe and round, as a degraded write does.
                Ok(false) => {
                    merge = false;
                    items = groups.into_iter().flatten().chain(items).collect();
                }
                Err(e) => r = Err(e),
            }
        }
        self.put_engine(engine);
        r
    }

    fn write_inner(
        &self,
        offset: u64,
        data: &[u8],
        fua: bool,
        repair: bool,
    ) -> Result<(), AggregateError> {
        self.check(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        if data.as_ptr() as usize % crate::io::buf::IO_ALIGN != 0 {
            let mut bounce = self.arena.alloc(data.len());
            bounce.copy_from_slice(data);
            return self.write_inner(offset, &bounce, fua, repair);
        }
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        let spans = self.geo.spans(offset, data.len() as u64);
        let _guard = self
            .locks
            .lock(spans[0].stripe, spans[spans.len() - 1].stripe);
        let mut engine = self.take_engine()?;
        let datas = vec![data; spans.len()];
        let r = self
            .write_spans(engine.as_mut(), &spans, &datas, fua, repair, &[])
            .map(|_| ());
        self.put_engine(engine);
        r
    }

    fn plan(&self, span: &StripeSpan, failed: Option<usize>, repair: bool) -> SpanPlan {
        let (lo, hi) = span.columns();
        let method = match failed {
            Some(f) if f == self.geo.parity() => Method::DataOnly,
            Some(f) => Method::Degraded(f),
            None => match self.geo.write_method(span) {
                WriteMethod::FullStripe => Method::Full,
                WriteMethod::ReadModifyWrite if repair => Method::Rcw,
                WriteMethod::ReadModifyWrite => Method::Rmw,
                WriteMethod::ReconstructWrite => Method::Rcw,
            },
        };
        SpanPlan { method, lo, hi }
    }

    /// Scratch windows of one span, in order: for Rmw, old data per seg then old parity; for Rcw,
    /// the uncovered range per data member (present ones) then the parity window; for Full, the
    /// parity window; for Degraded(f), every data member's window [lo,hi) (f's included, rebuilt)
    /// then old parity.
    fn scratch_layout(&self, span: &StripeSpan, p: &SpanPlan) -> Vec<(usize, u64, u64)> {
        // (member, col, len) of each window; member = parity for the parity window.
        let w = p.hi - p.lo;
        let par = self.geo.parity();
        match p.method {
            Method::Full => vec![(par, 0, self.geo.chunk_bytes)],
            Method::Rmw => span
                .segs
                .iter()
                .map(|g| (g.member, g.col, g.len))
                .chain([(par, p.lo, w)])
                .collect(),
            Method::Rcw => (0..self.geo.data_members)
                .filter_map(|m| self.geo.uncovered(span, m).map(|(a, b)| (m, a, b - a)))
                .chain([(par, p.lo, w)])
                .collect(),
            Method::DataOnly => vec![],
            Method::Degraded(_) => (0..self.geo.data_members)
                .map(|m| (m, p.lo, w))
                .chain([(par, p.lo, w)])
                .collect(),
        }
    }

    /// Write `spans`, each with the buffer its `buf_off`s index (`datas[i]` for `spans[i]`), in two
    /// batches: every read the plans need, then every data and parity write. No two spans may
    /// share a stripe (each computes its stripe's parity from the old one), and the caller holds
    /// their stripe locks. `merged[i]` (or nothing, for none): span i holds pieces of several
    /// writes (any members, any columns, no two on the same member bytes), always written by
    /// read-modify-write; `Ok(false)` when a member has failed, since that needs one span per
    /// write (then nothing of a span may have been written, or all of it, as with any failure).
    fn write_spans(
        &self,
        engine: &mut dyn Engine,
        spans: &[StripeSpan],
        datas: &[&[u8]],
        fua: bool,
        repair: bool,
        merged: &[bool],
    ) -> Result<bool, AggregateError> {
        debug_assert_eq!(spans.len(), datas.len());
        let any_merged = merged.iter().any(|m| *m);
        for _attempt in 0..4 {
            let failed = self.healthy_state()?;
            if any_merged && failed.is_some() {
                return Ok(false);
            }
            let plans: Vec<SpanPlan> = spans
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    if merged.get(i).copied().unwrap_or(false) {
                        let (lo, hi) = s.columns();
                        SpanPlan {
                            method: Method::Rmw,
                            lo,
                            hi,
                        }
                    } else {
                        self.plan(s, failed, repair)
                    }
                })
                .collect();
            let layouts: Vec<Vec<(usize, u64, u64)>> = spans
                .iter()
                .zip(&plans)
                .map(|(s, p)| self.scratch_layout(s, p))
                .collect();
            let lens: Vec<usize> = layouts.iter().flatten().map(|w| w.2 as usize).collect();
            let mut scratch = self.arena.alloc(lens.iter().sum::<usize>());
            let mut windows = split_mut(&mut scratch, &lens);
            // Phase 1: reads.
            {
                let mut ops: Vec<IoOp> = Vec::new();
                let mut it = windows.iter_mut();
                for ((span, plan), layout) in spans.iter().zip(&plans).zip(&layouts) {
                    for &(m, col, _) in layout {
                        let win = it.next().unwrap();
                        let read = match plan.method {
                            Method::Full => false,
                            Method::Degraded(f) => m != f,
                            _ => true,
                        };
                        if read {
                            ops.push(IoOp {
                                member: m,
                                offset: self.moff(span.stripe, col),
                                buf: OpBuf::Read(&mut win[..]),
                                dsync: false,
                            });
                        }
                    }
                }
                if !self.run_batch(engine, &mut ops) {
                    continue;
                }
            }
            // Compute the new parity windows.
            let mut it = windows.iter_mut();
            let mut parity_windows: Vec<(u64, u64, usize)> = Vec::new(); // (stripe, col, index into windows)
            let mut idx = 0usize;
            for (((span, plan), layout), data) in spans.iter().zip(&plans).zip(&layouts).zip(datas)
            {
                let mut mine: Vec<&mut &mut [u8]> =
                    (0..layout.len()).map(|_| it.next().unwrap()).collect();
                let new_of = |m: usize| {
                    span.seg_of(m).map(|g| {
                        (
                            g.col,
                            &data[g.buf_off as usize..(g.buf_off + g.len) as usize],
                        )
                    })
                };
                match plan.method {
                    Method::DataOnly => {}
                    Method::Full => {
                        let p = &mut mine[0];
                        p.copy_from_slice(new_of(0).unwrap().1);
                        for m in 1..self.geo.data_members {
                            xor_into(p, new_of(m).unwrap().1);
                        }
                    }
                    Method::Rmw => {
                        // Each seg's own data (a merged span has several segs per member).
                        let (olds, par) = mine.split_at_mut(layout.len() - 1);
                        let par = &mut par[0];
                        for (k, g) in span.segs.iter().enumerate() {
                            let at = (g.col - plan.lo) as usize..(g.col - plan.lo + g.len) as usize;
                            xor_into(&mut par[at.clone()], olds[k]);
                            xor_into(
                                &mut par[at],
                                &data[g.buf_off as usize..(g.buf_off + g.len) as usize],
                            );
                        }
                    }
                    Method::Rcw => {
                        let (unc, par) = mine.split_at_mut(layout.len() - 1);
                        let par = &mut par[0];
                        par.fill(0);
                        for (k, &(_, col, len)) in layout[..layout.len() - 1].iter().enumerate() {
                            let at = (col - plan.lo) as usize..(col - plan.lo + len) as usize;
                            xor_into(&mut par[at], unc[k]);
                        }
                        for g in &span.segs {
                            let at = (g.col - plan.lo) as usize..(g.col - plan.lo + g.len) as usize;
                            xor_into(&mut par[at], new_of(g.member).unwrap().1);
                        }
                    }
                    Method::Degraded(f) => {
                        let n = self.geo.data_members;
                        let (dwin, par) = mine.split_at_mut(n);
                        let par = &mut par[0];
                        // f's old content = old parity ^ every other data member.
                        let mut f_old = par.to_vec();
                        for (m, w) in dwin.iter().enumerate().filter(|(m, _)| *m != f) {
                            debug_assert_ne!(m, f);
                            xor_into(&mut f_old, w);
                        }
                        dwin[f].copy_from_slice(&f_old);
                        // Overlay new data, then parity = xor of all new windows.
                        for g in &span.segs {
                            let at = (g.col - plan.lo) as usize..(g.col - plan.lo + g.len) as usize;
                            dwin[g.member][at].copy_from_slice(new_of(g.member).unwrap().1);
                        }
                        par.fill(0);
                        for w in dwin.iter() {
                            xor_into(par, w);
                        }
                    }
                }
                if plan.method != Method::DataOnly {
                    let pcol = if plan.method == Method::Full {
                        0
                    } else {
                        plan.lo
                    };
                    parity_windows.push((span.stripe, pcol, idx + layout.len() - 1));
                }
                idx += layout.len();
            }
            // Phase 2: data and parity writes.
            {
                let par = self.geo.parity();
                let mut ops: Vec<IoOp> = Vec::new();
                for ((span, plan), data) in spans.iter().zip(&plans).zip(datas) {
                    for g in &span.segs {
                        if plan.method == Method::Degraded(g.member) {
                            continue;
                        }
                        ops.push(IoOp {
                            member: g.member,
                            offset: self.moff(span.stripe, g.col),
                            buf: OpBuf::Write(
                                &data[g.buf_off as usize..(g.buf_off + g.len) as usize],
                            ),
                            dsync: fua,
                        });
                    }
                }
                for &(stripe, col, wi) in &parity_windows {
                    ops.push(IoOp {
                        member: par,
                        offset: self.moff(stripe, col),
                        buf: OpBuf::Write(&windows[wi][..]),
                        dsync: fua,
                    });
                }
                #[cfg(test)]
                if self.tear_next_write.swap(false, Ordering::SeqCst) {
                    ops.retain(|op| op.member != par);
                    self.run_batch(engine, &mut ops);
                    self.halt(
                        "test: crash after the data writes of a stripe, before its parity",
                        Duration::from_secs(5),
                    );
                    return Err(AggregateError::Offline {
                        name: self.name.clone(),
                        why: "test: torn stripe write".into(),
                    });
                }
                if !self.run_batch(engine, &mut ops) {
                    continue;
                }
            }
            for p in &plans {
                let c = match p.method {
                    Method::Full => &self.stats.full_stripe_writes,
                    Method::Rmw => &self.stats.rmw_writes,
                    Method::Rcw => &self.stats.rcw_writes,
                    Method::DataOnly | Method::Degraded(_) => &self.stats.degraded_writes,
                };
                c.fetch_add(1, Ordering::Relaxed);
            }
            return Ok(true);
        }
        Err(AggregateError::Offline {
            name: self.name.clone(),
            why: "member failures kept interrupting a write".into(),
        })
    }

    /// Write zeroes over a range, in pieces no larger than the largest request.
    pub fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), AggregateError> {
        self.check(offset, len)?;
        let piece = (self.max_request_bytes as u64).min(len.max(1));
        let zeros = IoBuf::new(piece as usize);
        let mut pos = offset;
        while pos < offset + len {
            let n = piece.min(offset + len - pos);
            self.write(pos, &zeros[..n as usize], fua)?;
            pos += n;
        }
        Ok(())
    }

    /// Make every completed write durable on every surviving member.
    pub fn flush(&self) -> Result<(), AggregateError> {
        let failed = self.healthy_state()?;
        let members: Vec<usize> = (0..self.geo.members())
            .filter(|&m| Some(m) != failed)
            .collect();
        let mut engine = self.take_engine()?;
        let res = engine.flush(&members);
        self.put_engine(engine);
        for (m, r) in members.iter().zip(res) {
            if let Err(e) = r {
                self.fail_member(*m, &e);
            }
        }
        self.healthy_state().map(|_| ())
    }

    /// Recompute parity of every stripe from the data (after an unclean shutdown). Shows progress.
    pub fn resync_parity(&self, progress: Progress) -> Result<(), AggregateError> {
        self.resync_stripes(0, self.geo.stripes, progress)
    }

    /// Recompute the parity of the whole stripes covering `len` bytes at `offset` from their
    /// data (replay of a direct full-stripe write that a crash may have torn).
    pub fn resync_range(&self, offset: u64, len: u64) -> Result<(), AggregateError> {
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if let Some(f) = self.healthy_state()? {
            // A torn degraded stripe cannot be told from a good one: there is nothing to
            // compare with. Only the unacknowledged write that tore it is affected.
            tracing::error!(aggregate = %self.name, failed_member = f, offset, len,
                "degraded: parity of directly written stripes cannot be checked");
            return Ok(());
        }
        let sb = self.geo.stripe_bytes();
        match self.resync_stripes(offset / sb, (offset + len).div_ceil(sb), &mut |_, _| {}) {
            // As above, once a member has failed meanwhile.
            Err(e) if matches!(self.healthy_state(), Ok(Some(_))) => {
                tracing::error!(aggregate = %self.name, error = %e, offset, len,
                    "degraded during the resync: parity of directly written stripes cannot be checked");
                Ok(())
            }
            r => r,
        }
    }

    fn resync_stripes(
        &self,
        first: u64,
        end: u64,
        progress: Progress,
    ) -> Result<(), AggregateError> {
        if self.healthy_state()?.is_some() {
            return Err(AggregateError::Invalid(
                "cannot resync parity with a failed member".into(),
            ));
        }
        let batch_stripes = (self.max_request_bytes as u64 / self.geo.stripe_bytes()).max(1);
        let total = end - first;
        let mut s = first;
        let mut engine = self.take_engine()?;
        while s < end {
            let n = batch_stripes.min(end - s);
            let bytes = (n * self.geo.stripe_bytes()) as usize;
            let mut buf = self.arena.alloc(bytes);
            let _g = self.locks.lock(s, s + n - 1);
            let off = s * self.geo.stripe_bytes();
            // A healthy read only (`read_spans` would go degraded after a member failure, and
            // take these stripes' locks again: held here, so it would wait for itself). Parity
            // cannot be recomputed without every member anyway.
            let spans = self.geo.spans(off, bytes as u64);
            let mut ops = self.read_ops(&spans, &mut buf);
            let read_ok = self.run_batch(engine.as_mut(), &mut ops);
            drop(ops);
            let r = if read_ok {
                Ok(())
            } else {
                Err(AggregateError::Invalid(
                    "a member failed during the parity resync".into(),
                ))
            };
            let r = r.and_then(|_| {
                let spans = self.geo.spans(off, bytes as u64);
                let datas = vec![&buf[..]; spans.len()];
                self.write_spans(engine.as_mut(), &spans, &datas, false, true, &[])
                    .map(|_| ())
            });
            if let Err(e) = r {
                self.put_engine(engine);
                return Err(e);
            }
            s += n;
            progress(s - first, total);
        }
        self.put_engine(engine);
        Ok(())
    }

    /// Flush and mark the labels clean: the aggregate was closed in order.
    pub fn close(&self) -> Result<(), AggregateError> {
        self.flush()?;
        self.set_clean_state(CleanState::Clean)?;
        // Closed is closed: a request still running after a drain's deadline must not write
        // under a clean label (nothing would repair the parity of a stripe it tore).
        let mut st = self.state.write().unwrap();
        if st.offline.is_none() {
            st.offline = Some("closed".into());
        }
        Ok(())
    }
}

impl Backend for Aggregate {
    fn size_bytes(&self) -> u64 {
        self.geo.size_bytes()
    }
    fn batches_reads(&self) -> bool {
        true
    }
    fn read_batch(&self, reads: &mut [(u64, &mut [u8])]) -> Result<(), BackendError> {
        Aggregate::read_batch(self, reads).map_err(Into::into)
    }
    fn batches_writes(&self) -> bool {
        true
    }
    fn write_batch(&self, writes: &[(u64, &[u8])], fua: bool) -> Result<(), BackendError> {
        Aggregate::write_batch(self, writes, false)?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }
    fn block_sizes(&self) -> BlockSizes {
        BlockSizes {
            min_bytes: self.align.max(4096) as u32,
            preferred_bytes: self.geo.stripe_bytes().min(self.max_request_bytes as u64) as u32,
            max_bytes: self.max_request_bytes,
        }
    }
    fn multi_conn_safe(&self) -> bool {
        true
    }
    fn alloc(&self, len: usize) -> IoBuf {
        self.arena.alloc(len)
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        Aggregate::read(self, offset, buf).map_err(Into::into)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BackendError> {
        Aggregate::write(self, offset, data, fua).map_err(Into::into)
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), BackendError> {
        Aggregate::write_zeroes(self, offset, len, fua).map_err(Into::into)
    }
    fn trim(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        // Advisory in NBD; discarding would break parity, so trim keeps the data.
        self.check(offset, len).map_err(BackendError::from)
    }
    fn flush(&self) -> Result<(), BackendError> {
        Aggregate::flush(self).map_err(Into::into)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// In-memory members with failure injection: a unit-test double that stands beside the real
    /// engines (the loop-device tests run the same aggregate on io_uring).
    pub struct MemDisks {
        pub data: Mutex<Vec<Vec<u8>>>,
        pub failed: Mutex<HashSet<usize>>,
        /// Members that refuse writes with EBADE (reservation conflict: held by another node).
        pub conflict: Mutex<HashSet<usize>>,
        /// New engines cannot be made (io_uring setup failing: ENOMEM, EMFILE).
        pub factory_fails: std::sync::atomic::AtomicBool,
        /// Every member cache flush takes this long (ms); flushes started and finished.
        pub flush_delay_ms: AtomicU64,
        pub flushes_started: AtomicU64,
        pub flushes_done: AtomicU64,
        /// Every batch takes this long (ms) before it touches the members.
        pub run_delay_ms: AtomicU64,
    }

    pub struct MemEngine(pub Arc<MemDisks>);

    impl Engine for MemEngine {
        fn run(&mut self, ops: &mut [IoOp<'_>]) -> Vec<io::Result<()>> {
            let delay = self.0.run_delay_ms.load(Ordering::SeqCst);
            if delay > 0 {
                std::thread::sleep(std::time::Duration::from_millis(delay));
            }
            let failed = self.0.failed.lock().unwrap().clone();
            let conflict = self.0.conflict.lock().unwrap().clone();
            let mut d = self.0.data.lock().unwrap();
            ops.iter_mut()
                .map(|op| {
                    if failed.contains(&op.member) {
                        return Err(io::Error::from_raw_os_error(libc::EIO));
                    }
                    if conflict.contains(&op.member) && matches!(op.buf, OpBuf::Write(_)) {
                        return Err(io::Error::from_raw_os_error(libc::EBADE));
                    }
                    let disk = &mut d[op.member];
                    let o = op.offset as usize;
                    match &mut op.buf {
                        OpBuf::Read(b) => b.copy_from_slice(&disk[o..o + b.len()]),
                        OpBuf::Write(b) => disk[o..o + b.len()].copy_from_slice(b),
                    }
                    Ok(())
                })
                .collect()
        }
        fn flush(&mut self, members: &[usize]) -> Vec<io::Result<()>> {
            self.0.flushes_started.fetch_add(1, Ordering::SeqCst);
            let delay = self.0.flush_delay_ms.load(Ordering::SeqCst);
            if delay > 0 {
                std::thread::sleep(std::time::Duration::from_millis(delay));
            }
            let failed = self.0.failed.lock().unwrap().clone();
            self.0.flushes_done.fetch_add(1, Ordering::SeqCst);
            members
                .iter()
                .map(|m| {
                    if failed.contains(m) {
                        Err(io::Error::from_raw_os_error(libc::EIO))
                    } else {
                        Ok(())
                    }
                })
                .collect()
        }
        fn kind(&self) -> &'static str {
            "mem"
        }
    }

    pub fn mem_aggregate(n: usize, chunk: u64, stripes: u64) -> (Aggregate, Arc<MemDisks>) {
        let member_bytes = label::DATA_OFFSET_BYTES + chunk * stripes;
        let disks = Arc::new(MemDisks {
            data: Mutex::new(vec![vec![0xAA; member_bytes as usize]; n + 1]),
            failed: Mutex::new(HashSet::new()),
            conflict: Mutex::new(HashSet::new()),
            factory_fails: std::sync::atomic::AtomicBool::new(false),
            flush_delay_ms: AtomicU64::new(0),
            flushes_started: AtomicU64::new(0),
            flushes_done: AtomicU64::new(0),
            run_delay_ms: AtomicU64::new(0),
        });
        let d2 = disks.clone();
        let factory: EngineFactory = Arc::new(move || {
            if d2.factory_fails.load(Ordering::SeqCst) {
                return Err(io::Error::from_raw_os_error(libc::EMFILE));
            }
            Ok(Box::new(MemEngine(d2.clone())) as Box<dyn Engine>)
        });
        let arena = BufArena::new(8 << 20);
        let spec = FormatSpec {
            name: "t".into(),
            home_node: "a".into(),
            chunk_bytes: chunk,
            member_bytes: vec![member_bytes; n + 1],
            uuid: [1; 16],
        };
        Aggregate::format(&factory, &arena, &spec, &mut |_, _| {}).unwrap();
        let paths = (0..=n).map(|i| format!("mem{i}")).collect();
        let (agg, dirty) = Aggregate::assemble(paths, factory, arena, 4096, 1 << 20).unwrap();
        assert!(!dirty);
        (agg, disks)
    }

    /// Parity equals the XOR of the data members everywhere.
    pub fn assert_parity(disks: &MemDisks, n: usize, data_bytes: usize) {
        let d = disks.data.lock().unwrap();
        let off = label::DATA_OFFSET_BYTES as usize;
        let mut x = vec![0u8; data_bytes];
        for m in 0..n {
            xor_into(&mut x, &d[m][off..off + data_bytes]);
        }
        assert!(
            x == d[n][off..off + data_bytes],
            "parity does not match data"
        );
    }

    /// A reservation conflict is a fence, not a disk failure: no member is failed, no label is
    /// written, the aggregate goes offline and the hook hears of it exactly once.
    #[test]
    fn reservation_conflict_fences_instead_of_failing_a_member() {
        let (agg, disks) = mem_aggregate(2, 4096, 64);
        let calls = Arc::new(Mutex::new(Vec::<String>::new()));
        let c2 = calls.clone();
        agg.set_on_fenced(Box::new(move |why| {
            c2.lock().unwrap().push(why.to_string())
        }));
        agg.write(0, &vec![7u8; 8192], false).unwrap();
        let gen = agg.status().generation;
        disks.conflict.lock().unwrap().insert(1);
        let e = agg.write(0, &vec![9u8; 8192], false).unwrap_err();
        assert!(
            e.to_string()
                .contains("fenced: member 1 (mem1) refused our I/O with a reservation conflict"),
            "{e}"
        );
        let st = agg.status();
        assert_eq!(st.failed_member, None, "no member failed");
        assert_eq!(st.generation, gen, "no label rewritten");
        assert!(
            st.offline
                .as_deref()
                .is_some_and(|o| o.starts_with("fenced")),
            "{st:?}"
        );
        assert!(agg.write(4096, &vec![1u8; 4096], false).is_err());
        assert!(agg.set_clean_state(CleanState::Clean).is_err());
        let calls = calls.lock().unwrap();
        assert_eq!(calls.len(), 1, "hook told once: {calls:?}");
        assert!(calls[0].contains("reservation conflict"));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write { block: u64, blocks: u64, seed: u8 },
        Read { block: u64, blocks: u64 },
        Fail { member: usize },
    }

    fn op_strategy(n: usize, total_blocks: u64) -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..total_blocks, 1u64..40, any::<u8>()).prop_map(move |(b, l, s)| Op::Write { block: b, blocks: l.min(total_blocks - b), seed: s }),
            3 => (0..total_blocks, 1u64..40).prop_map(move |(b, l)| Op::Read { block: b, blocks: l.min(total_blocks - b) }),
            1 => (0..=n).prop_map(|m| Op::Fail { member: m }),
        ]
    }

    fn pattern(len: usize, seed: u8, block: u64) -> Vec<u8> {
        (0..len)
            .map(|i| {
                (i as u64)
                    .wrapping_mul(31)
                    .wrapping_add(block * 7 + seed as u64) as u8
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        /// RAID-4 against a flat model: random reads and writes, with at most one member failed
        /// somewhere in the sequence (a second failure must take the aggregate offline).
        #[test]
        fn raid4_matches_flat_model(n in 1usize..5, chunk_shift in 12u32..15, ops in proptest::collection::vec(op_strategy(4, 96), 1..40)) {
            let chunk = 1u64 << chunk_shift;
            let stripes = 4;
            let (agg, disks) = mem_aggregate(n, chunk, stripes);
            let size = agg.geometry().size_bytes();
            let total_blocks = size / 4096;
            let mut model = vec![0u8; size as usize];
            let mut failed: Option<usize> = None;
            // Two members injected failed: requests may still succeed where they touch neither,
            // but once the aggregate has said "offline" it must keep refusing.
            let mut two_failed = false;
            let mut offline = false;
            for op in ops {
                match op {
                    Op::Fail { member } => {
                        let member = member % (n + 1);
                        disks.failed.lock().unwrap().insert(member);
                        if failed.is_some_and(|f| f != member) { two_failed = true; }
                        failed.get_or_insert(member);
                    }
                    Op::Write { block, blocks, seed } => {
                        let block = block % total_blocks;
                        let blocks = blocks.min(total_blocks - block).max(1);
                        let data = pattern((blocks * 4096) as usize, seed, block);
                        let r = agg.write(block * 4096, &data, seed % 2 == 0);
                        if offline { prop_assert!(r.is_err()); continue; }
                        if r.is_err() && two_failed { offline = true; continue; }
                        prop_assert!(r.is_ok(), "{:?}", r);
                        model[(block * 4096) as usize..((block + blocks) * 4096) as usize].copy_from_slice(&data);
                    }
                    Op::Read { block, blocks } => {
                        let block = block % total_blocks;
                        let blocks = blocks.min(total_blocks - block).max(1);
                        let mut buf = IoBuf::new((blocks * 4096) as usize);
                        let r = agg.read(block * 4096, &mut buf);
                        if offline { prop_assert!(r.is_err()); continue; }
                        if r.is_err() && two_failed { offline = true; continue; }
                        prop_assert!(r.is_ok(), "{:?}", r);
                        prop_assert!(buf[..] == model[(block * 4096) as usize..((block + blocks) * 4096) as usize]);
                    }
                }
            }
            if two_failed && !offline {
                prop_assert!(agg.flush().is_err(), "a flush touches every member: two failures must show");
                offline = true;
            }
            if !offline {
                let mut all = IoBuf::new(size as usize);
                agg.read(0, &mut all).unwrap();
                prop_assert!(all[..] == model[..]);
                // A flush touches every member, so any injected failure is found by now.
                prop_assert!(agg.flush().is_ok());
                prop_assert_eq!(agg.failed_member(), failed);
                if failed.is_none() {
                    assert_parity(&disks, n, (chunk * stripes) as usize);
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        /// A batch of writes (several in one stripe, some overlapping, with or without repair,
        /// with or without a failed member) leaves the same data and parity as writing them one
        /// by one in order.
        #[test]
        fn write_batch_matches_flat_model(n in 1usize..5, chunk_shift in 12u32..14, picks in proptest::collection::vec((0u64..64, 1u64..6, any::<u8>()), 1..24), repair: bool, fail in proptest::option::of(0usize..5)) {
            let chunk = 1u64 << chunk_shift;
            let stripes = 4;
            let (agg, disks) = mem_aggregate(n, chunk, stripes);
            let size = agg.geometry().size_bytes();
            let total_blocks = size / 4096;
            let fail = fail.map(|f| f % (n + 1));
            if let Some(f) = fail {
                disks.failed.lock().unwrap().insert(f);
            }
            let mut model = vec![0u8; size as usize];
            agg.read(0, &mut model).unwrap();
            let mut owned: Vec<(u64, Vec<u8>)> = Vec::new();
            for (block, blocks, seed) in picks {
                let block = block % total_blocks;
                let blocks = blocks.min(total_blocks - block);
                let data = pattern((blocks * 4096) as usize, seed, block);
                model[(block * 4096) as usize..((block + blocks) * 4096) as usize].copy_from_slice(&data);
                owned.push((block * 4096, data));
            }
            let writes: Vec<(u64, &[u8])> = owned.iter().map(|(o, d)| (*o, &d[..])).collect();
            agg.write_batch(&writes, repair).unwrap();
            let mut all = IoBuf::new(size as usize);
            agg.read(0, &mut all).unwrap();
            prop_assert!(all[..] == model[..]);
            prop_assert_eq!(agg.failed_member(), fail);
            if fail.is_none() {
                assert_parity(&disks, n, (chunk * stripes) as usize);
            }
        }
    }

    /// Pieces of one stripe on different member bytes share one parity read-modify-write;
    /// overlapping ones wait for the next round; the result is the same as writing in order.
    #[test]
    fn write_batch_merges_parity_updates_of_one_stripe() {
        for fail in [None, Some(1usize), Some(4)] {
            let (agg, disks) = mem_aggregate(4, 16384, 4);
            let size = agg.geometry().size_bytes() as usize;
            let mut model = vec![0u8; size];
            agg.read(0, &mut model).unwrap();
            if let Some(f) = fail {
                disks.failed.lock().unwrap().insert(f);
            }
            // Stripe 0 is 64 KiB: member 0 = [0,16K), 1 = [16K,32K), 2, 3.
            let ws: Vec<(u64, Vec<u8>)> = vec![
                (0, pattern(4096, 1, 0)),             // member 0, col 0
                (16384 + 8192, pattern(8192, 2, 1)),  // member 1, cols 8K..16K
                (4096, pattern(4096, 3, 2)),          // member 0, col 4K
                (0, pattern(8192, 4, 3)),             // member 0, cols 0..8K: overlaps two above
                (49152 + 12288, pattern(4096, 5, 4)), // member 3, col 12K
                (65536 + 4096, pattern(4096, 6, 5)),  // stripe 1
            ];
            for (o, d) in &ws {
                model[*o as usize..*o as usize + d.len()].copy_from_slice(d);
            }
            let writes: Vec<(u64, &[u8])> = ws.iter().map(|(o, d)| (*o, &d[..])).collect();
            agg.write_batch(&writes, false).unwrap();
            let mut all = IoBuf::new(size);
            agg.read(0, &mut all).unwrap();
            assert!(all[..] == model[..], "fail {fail:?}");
            let merges = agg.stats.parity_merges.load(Ordering::Relaxed);
            match fail {
                None => {
                    // The first four of stripe 0 that touch no byte already taken: 1, 2, 3 go
                    // with the first (3 merges); the overlapping one waits.
                    assert_eq!(merges, 3);
                    assert_parity(&disks, 4, 16384 * 4);
                }
                // A failed member: merged spans are not written degraded.
                Some(_) => assert_eq!(agg.failed_member(), fail),
            }
        }
    }

    /// A batch of reads returns what reading each alone returns, healthy or with a member
    /// failed (then read one by one, rebuilt from parity).
    #[test]
    fn read_batch_matches_single_reads() {
        for fail in [None, Some(0usize), Some(2), Some(4)] {
            let (agg, disks) = mem_aggregate(4, 4096, 8);
            let size = agg.geometry().size_bytes();
            let data = pattern(size as usize, 3, 0);
            let mut full = IoBuf::new(size as usize);
            full.copy_from_slice(&data);
            agg.write(0, &full, false).unwrap();
            if let Some(f) = fail {
                disks.failed.lock().unwrap().insert(f);
            }
            let ranges = [
                (0u64, 4096usize),
                (8192, 12288),
                (40960, 4096),
                (4096 * 30, 8192),
                (4096, 4096),
            ];
            let mut bufs: Vec<IoBuf> = ranges.iter().map(|r| IoBuf::new(r.1)).collect();
            let mut reads: Vec<(u64, &mut [u8])> = ranges
                .iter()
                .zip(bufs.iter_mut())
                .map(|(r, b)| (r.0, &mut b[..]))
                .collect();
            agg.read_batch(&mut reads).unwrap();
            for (r, b) in ranges.iter().zip(&bufs) {
                assert_eq!(
                    &b[..],
                    &data[r.0 as usize..r.0 as usize + r.1],
                    "{r:?} fail {fail:?}"
                );
            }
            if fail.is_some() {
                assert!(agg.stats.degraded_reads.load(Ordering::Relaxed) > 0 || fail == Some(4));
            }
        }
        // Out of range: refused before any I/O.
        let (agg, _) = mem_aggregate(2, 4096, 2);
        let mut b = IoBuf::new(4096);
        let mut reads = vec![(agg.geometry().size_bytes(), &mut b[..])];
        assert!(agg.read_batch(&mut reads).is_err());
    }

    #[test]
    fn every_single_member_failure_is_survived() {
        for n in [1usize, 2, 4] {
            for f in 0..=n {
                let (agg, disks) = mem_aggregate(n, 4096, 8);
                let size = agg.geometry().size_bytes() as usize;
                let before = pattern(size, 3, 0);
                agg.write(0, &before, false).unwrap();
                disks.failed.lock().unwrap().insert(f);
                let mut got = IoBuf::new(size);
                agg.read(0, &mut got).unwrap();
                assert!(got[..] == before[..], "n={n} f={f}: degraded read differs");
                if f < n {
                    assert_eq!(
                        agg.failed_member(),
                        Some(f),
                        "a degraded read found the failure"
                    );
                }
                // Writes in degraded mode, partial and whole, read back.
                let mut model = before.clone();
                for (off, len, seed) in [
                    (4096usize, 4096usize, 9u8),
                    (0, size, 11),
                    (8192, 3 * 4096, 12),
                ] {
                    let d = pattern(len, seed, off as u64);
                    agg.write(off as u64, &d, false).unwrap();
                    model[off..off + len].copy_from_slice(&d);
                    let mut got = IoBuf::new(size);
                    agg.read(0, &mut got).unwrap();
                    assert!(got[..] == model[..], "n={n} f={f} after write at {off}");
                }
                assert_eq!(agg.failed_member(), Some(f));
                // The failure is recorded in the surviving labels at a newer generation.
                let d = disks.data.lock().unwrap();
                let survivor = if f == 0 { 1 } else { 0 };
                let l = Label::decode(&d[survivor][..LABEL_BYTES]).unwrap();
                assert_eq!(l.failed_member, Some(f as u32));
                drop(d);
                // A second failure takes it offline with a clear error.
                disks
                    .failed
                    .lock()
                    .unwrap()
                    .insert(if f == 0 { 1 } else { 0 });
                let mut got = IoBuf::new(size);
                let e = agg.read(0, &mut got).unwrap_err();
                assert!(
                    e.to_string().contains("offline") || e.to_string().contains("failed"),
                    "{e}"
                );
                let e = agg.write(0, &before[..4096], false).unwrap_err();
                assert!(e.to_string().contains("offline"), "{e}");
            }
        }
    }

    #[test]
    fn write_methods_are_used_as_planned() {
        let (agg, disks) = mem_aggregate(4, 16384, 8);
        let sb = agg.geometry().stripe_bytes() as usize;
        agg.write(0, &pattern(sb, 1, 0), false).unwrap();
        assert_eq!(agg.stats.full_stripe_writes.load(Ordering::Relaxed), 1);
        agg.write(4096, &pattern(4096, 2, 1), false).unwrap();
        assert_eq!(agg.stats.rmw_writes.load(Ordering::Relaxed), 1);
        agg.write(0, &pattern(3 * 16384, 3, 0), false).unwrap();
        assert_eq!(agg.stats.rcw_writes.load(Ordering::Relaxed), 1);
        assert_parity(&disks, 4, 16384 * 8);
    }

    #[test]
    fn misaligned_and_out_of_range_requests_refused() {
        let (agg, _) = mem_aggregate(2, 4096, 4);
        let mut b = IoBuf::new(4096);
        assert!(matches!(
            agg.read(100, &mut b),
            Err(AggregateError::Invalid(_))
        ));
        assert!(matches!(
            agg.read(agg.geometry().size_bytes(), &mut b),
            Err(AggregateError::Invalid(_))
        ));
        assert!(matches!(
            agg.write(u64::MAX - 10, &b, false),
            Err(AggregateError::Invalid(_))
        ));
    }

    #[test]
    fn a_halt_stops_member_io_and_waits_for_the_batches_in_flight() {
        // A writer keeps the members busy (a CP, say), each batch 20 ms on the "device".
        let (agg, disks) = mem_aggregate(4, 4096, 64);
        let agg = Arc::new(agg);
        disks.run_delay_ms.store(20, Ordering::SeqCst);
        let a2 = agg.clone();
        let writer = std::thread::spawn(move || {
            let mut data = IoBuf::new(4096);
            data.fill(7);
            let mut ok = 0u64;
            for i in 0u64.. {
                match a2.write((i % 200) * 4096, &data, false) {
                    Ok(()) => ok += 1,
                    Err(AggregateError::Offline { why, .. }) => return (ok, why),
                    Err(e) => panic!("unexpected error: {e}"),
                }
            }
            unreachable!()
        });
        std::thread::sleep(Duration::from_millis(150));
        assert!(
            agg.halt("test", Duration::from_secs(2)),
            "in-flight batches completed"
        );
        let after_halt = disks.data.lock().unwrap().clone();
        let (ok, why) = writer.join().unwrap();
        assert!(ok > 0, "the writer wrote before the halt");
        assert!(why.contains("halted"), "{why}");
        std::thread::sleep(Duration::from_millis(60));
        // The close's flush and clean label are refused too: the aggregate stays dirty.
        assert!(agg.close().is_err());
        let mut nine = IoBuf::new(4096);
        nine.fill(9);
        assert!(agg.write(0, &nine, false).is_err());
        assert!(
            *disks.data.lock().unwrap() == after_halt,
            "nothing reached the members after the halt returned"
        );
        assert_eq!(agg.failed_member(), None, "a halt fails no member");
    }

    /// Closed is closed: a request still running after a drain's deadline must not write
    /// under the clean label (nothing would repair the parity of a stripe it tore).
    #[test]
    fn a_closed_aggregate_refuses_writes() {
        let (agg, disks) = mem_aggregate(3, 4096, 8);
        agg.write(0, &pattern(4096, 1, 0), false).unwrap();
        agg.close().unwrap();
        let before = disks.data.lock().unwrap().clone();
        let r = agg.write(4096, &pattern(4096, 2, 0), false);
        assert!(matches!(r, Err(AggregateError::Offline { .. })), "{r:?}");
        assert!(
            *disks.data.lock().unwrap() == before,
            "nothing written after the close"
        );
    }

    #[test]
    fn dirty_close_is_detected_and_resynced() {
        let (agg, disks) = mem_aggregate(3, 4096, 8);
        agg.write(0, &pattern(3 * 4096 * 8, 5, 0), false).unwrap();
        // Corrupt parity as a torn write would, then reopen without closing.
        {
            let mut d = disks.data.lock().unwrap();
            let off = label::DATA_OFFSET_BYTES as usize + 4096;
            d[3][off] ^= 0xff;
        }
        let factory: EngineFactory = {
            let d = disks.clone();
            Arc::new(move || Ok(Box::new(MemEngine(d.clone())) as Box<dyn Engine>))
        };
        drop(agg);
        let paths = (0..4).map(|i| format!("mem{i}")).collect();
        let (agg, dirty) = Aggregate::assemble(
            paths,
            factory.clone(),
            BufArena::new(1 << 20),
            4096,
            1 << 20,
        )
        .unwrap();
        assert!(
            dirty,
            "an aggregate that was not closed must be reported dirty"
        );
        let mut calls = 0;
        agg.resync_parity(&mut |d, t| {
            calls += 1;
            assert!(d <= t);
        })
        .unwrap();
        assert!(calls > 0);
        assert_parity(&disks, 3, 4096 * 8);
        agg.close().unwrap();
        drop(agg);
        let paths = (0..4).map(|i| format!("mem{i}")).collect();
        let (_agg, dirty) =
            Aggregate::assemble(paths, factory, BufArena::new(1 << 20), 4096, 1 << 20).unwrap();
        assert!(!dirty, "closed cleanly");
    }

    /// A member that fails during a parity resync ends it (degraded: nothing to recompute
    /// from) instead of the resync waiting forever for the stripe locks it holds itself.
    #[test]
    fn resync_with_a_member_failing_returns() {
        let (agg, disks) = mem_aggregate(3, 4096, 16);
        let agg = Arc::new(agg);
        agg.write(0, &vec![5u8; 3 * 4096], false).unwrap();
        disks.failed.lock().unwrap().insert(1);
        let (tx, rx) = std::sync::mpsc::channel();
        let a2 = agg.clone();
        std::thread::spawn(move || {
            tx.send((
                a2.resync_range(0, 3 * 4096).is_ok(),
                a2.resync_parity(&mut |_, _| {}),
            ))
            .unwrap();
        });
        let (range_ok, whole) = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("resync returned (no self-deadlock on its stripe locks)");
        assert!(range_ok, "replay's resync of a range goes on degraded");
        assert!(whole.is_err(), "a whole resync says it could not finish");
        assert!(matches!(agg.healthy_state(), Ok(Some(1))));
        // The data still reads back, degraded.
        let mut back = vec![0u8; 3 * 4096];
        agg.read(0, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 5));
    }

    /// A member failure that cannot be recorded (no engine for the label write) takes the
    /// aggregate offline: serving on would retry the read-modify-write against a parity
    /// already updated (counting the change twice) and forget the failure at a restart.
    #[test]
    fn unrecordable_member_failure_takes_the_aggregate_offline() {
        let (agg, disks) = mem_aggregate(3, 4096, 16);
        agg.write(0, &vec![5u8; 3 * 4096], false).unwrap();
        // Exactly one engine, taken by the write below; the label write would need another.
        {
            let mut pool = agg.engines.lock().unwrap();
            pool.truncate(1);
            assert_eq!(pool.len(), 1);
        }
        disks.factory_fails.store(true, Ordering::SeqCst);
        disks.failed.lock().unwrap().insert(1);
        let r = agg.write(4096, &[7u8; 4096], false);
        assert!(
            matches!(r, Err(AggregateError::Offline { .. })),
            "the write is refused: {r:?}"
        );
        assert!(matches!(
            agg.healthy_state(),
            Err(AggregateError::Offline { .. })
        ));
        let mut back = vec![0u8; 4096];
        assert!(
            agg.read(0, &mut back).is_err(),
            "offline: nothing is served"
        );
    }
}

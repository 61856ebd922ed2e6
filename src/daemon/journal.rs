//! The NVRAM journal: a write is acknowledged once it is durable in this node's log and in the
//! partner's mirror (or, with the partner away, in the log alone, and status says so); reads see
//! acknowledged writes that are still only in the log; consistency points put the log on the
//! aggregate in large writes and trim it; replay after a crash redoes what the log holds.
//!
//! Locking: `inner` (appender and region) is held only to append and to take a group commit;
//! the leader of a group commit persists and mirrors outside it, so writers keep appending
//! (group commit across concurrent requests). `cache` is a RwLock; a CP trims it only after
//! the data is on the members, and readers detect a trim that raced their member read with the
//! `trims` counter (a seqlock) and read again.

use crate::core::interconnect::{LogRecords, LogSegment, MAX_SEGMENTS};
use crate::core::nvlog::{
    scan, Expect, LogAppender, Replay, ReplayError, ReplayReport, WriteCache, CHECKPOINT_RESERVE,
};
use crate::core::raid4::Geometry;
use crate::daemon::aggregate::{Aggregate, AggregateError};
use crate::daemon::backend::{Backend, BackendError, BlockSizes};
use crate::io::buf::IoBuf;
use crate::io::nvram::{NvramError, NvramRegion, Persistence, Persister};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

/// The log generation every record carries. The aggregate UUID already changes when an
/// aggregate is re-created, so the generation stays 1 for this format.
pub const LOG_GENERATION: u64 = 1;

/// How long a group commit waits for the partner's acknowledgement before it declares the
/// mirror broken and acknowledges on local durability alone.
pub const MIRROR_ACK_TIMEOUT: Duration = Duration::from_millis(1000);

/// The partner's side of mirroring, as the journal sees it.
pub trait MirrorLink: Send + Sync {
    /// True while a session with the partner is established.
    fn is_up(&self) -> bool {
        self.session().is_some()
    }
    /// The session established now (a number never reused), if any. The partner's mirror is
    /// known to hold what this log sent and saw acknowledged *in this session*: after a
    /// reconnect it may have lost whatever it had not made durable (it was written back, not
    /// flushed), so the journal copies the whole log again.
    fn session(&self) -> Option<u64>;
    /// Send bytes of our log region for the partner's mirror in `session`. False if that
    /// session is gone (or the send failed).
    fn send_records(&self, session: u64, records: LogRecords) -> bool;
    /// Wait until the partner acknowledged, in `session`, `seq` of log epoch `epoch` durable,
    /// or `timeout`. True if acknowledged. Sequence numbers restart with every epoch (every
    /// format of the log): an acknowledgement of another epoch, or of another session, never
    /// counts.
    fn wait_ack(&self, session: u64, epoch: u64, seq: u64, timeout: Duration) -> bool;
    /// Why there is no session to mirror in (for status).
    fn down_reason(&self) -> String {
        "interconnect down".into()
    }
}

/// Largest segment and largest message (by segment bytes) the mirror traffic uses: well within
/// the interconnect's frame limit.
const MIRROR_SEGMENT_BYTES: usize = 1 << 20;
const MIRROR_MESSAGE_BYTES: usize = 4 << 20;

/// The messages that carry `segments` (in order) to the partner's mirror: segments cut to at
/// most 1 MiB, messages of at most 4 MiB and [`MAX_SEGMENTS`]. Only the last message carries
/// `last_seq` (the others 0, which the partner's acknowledgement of cannot advance anything):
/// an acknowledgement of the commit then proves every message of it was applied (the link
/// drops the session when an apply fails, and TCP keeps the order).
fn mirror_messages(
    epoch: u64,
    first_seq: u64,
    last_seq: u64,
    segments: Vec<LogSegment>,
) -> Vec<LogRecords> {
    let mut pieces = Vec::new();
    for s in segments {
        if s.bytes.len() <= MIRROR_SEGMENT_BYTES {
            pieces.push(s);
            continue;
        }
        for (i, c) in s.bytes.chunks(MIRROR_SEGMENT_BYTES).enumerate() {
            pieces.push(LogSegment {
                region_offset: s.region_offset + (i * MIRROR_SEGMENT_BYTES) as u64,
                bytes: c.to_vec(),
            });
        }
    }
    let mut out: Vec<LogRecords> = Vec::new();
    let mut cur: Vec<LogSegment> = Vec::new();
    let mut cur_bytes = 0;
    for p in pieces {
        if !cur.is_empty()
            && (cur_bytes + p.bytes.len() > MIRROR_MESSAGE_BYTES || cur.len() == MAX_SEGMENTS)
        {
            out.push(LogRecords {
                epoch,
                first_seq,
                last_seq: 0,
                segments: std::mem::take(&mut cur),
            });
            cur_bytes = 0;
        }
        cur_bytes += p.bytes.len();
        cur.push(p);
    }
    out.push(LogRecords {
        epoch,
        first_seq,
        last_seq,
        segments: cur,
    });
    out
}

/// See [`Journal::set_unmirrored_hook`].
pub type UnmirroredHook = Box<dyn Fn(bool) -> Result<(), String> + Send + Sync>;

/// Journal errors.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error(transparent)]
    Nvram(#[from] NvramError),
    #[error(
        "NVRAM log of aggregate {aggregate} cannot be replayed: {source}; refusing to serve it"
    )]
    Replay {
        aggregate: String,
        source: ReplayError,
    },
    #[error(transparent)]
    Aggregate(#[from] AggregateError),
    #[error("NVRAM log: {0}")]
    Log(String),
    /// The RAID write hole: see [`write_hole`].
    #[error(transparent)]
    WriteHole(Box<WriteHoleError>),
}

/// A replay refused because of the RAID write hole (see [`write_hole`]).
#[derive(Debug, thiserror::Error)]
#[error(
    "aggregate {aggregate}: a consistency point was writing {stripes} partly written stripe(s) in place \
     when the NVRAM log stopped, and member {member} ({path}) is missing ({when}): {bytes} bytes of it \
     that no logged write covers cannot be rebuilt from those stripes' parity (a crash may have torn \
     it), first aggregate bytes {first_offset}..{first_end}. Refusing to replay rather than serve \
     wrong data; the log is kept as it is. Those ranges need restoring from the member's disk or a \
     backup"
)]
pub struct WriteHoleError {
    pub aggregate: String,
    pub member: usize,
    pub path: String,
    pub stripes: usize,
    pub bytes: u64,
    pub first_offset: u64,
    pub first_end: u64,
    /// Whether the member was missing before replay or failed during it.
    pub when: &'static str,
}

/// Journal settings.
#[derive(Debug, Clone)]
pub struct JournalConfig {
    /// Start a CP when the log is this full (percent).
    pub cp_fill_percent: u32,
    /// Start a CP at least this often while there is anything to write.
    pub cp_interval: Duration,
    /// Flush the NVRAM device's write cache on every group commit, not only when a client asks
    /// (NBD FLUSH, FUA). Matters only for a page-cache file: DAX has no such cache.
    pub flush_every_commit: bool,
}

impl Default for JournalConfig {
    fn default() -> JournalConfig {
        JournalConfig {
            cp_fill_percent: 50,
            cp_interval: Duration::from_secs(1),
            flush_every_commit: false,
        }
    }
}

/// Where mirroring stands, for status.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum MirrorState {
    /// No partner configured: acknowledged on local durability.
    NoPartner,
    /// Every acknowledged write is in the partner's mirror.
    Mirrored,
    /// Writes since `since` are acknowledged on local durability only.
    NotMirrored { since: SystemTime, why: String },
}

/// Counters.
#[derive(Debug, Default, serde::Serialize)]
pub struct JournalStats {
    pub appended: AtomicU64,
    pub group_commits: AtomicU64,
    pub mirrored_commits: AtomicU64,
    pub local_only_commits: AtomicU64,
    pub cps: AtomicU64,
    pub cp_bytes: AtomicU64,
    pub full_waits: AtomicU64,
    pub read_retries: AtomicU64,
    /// Device cache flushes of the log (client FLUSH/FUA, and before each CP).
    pub device_flushes: AtomicU64,
    /// Whole-stripe writes that went to the members directly, not through the log.
    pub direct_writes: AtomicU64,
    pub direct_bytes: AtomicU64,
    /// Whole-stripe writes logged instead, because the log held data of the same stripes.
    pub direct_fallbacks: AtomicU64,
}

/// What replay did at open.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReplaySummary {
    /// No log was there (a new region).
    pub fresh: bool,
    pub replayed_records: u64,
    pub replayed_bytes: u64,
    pub discarded_torn: u64,
    pub discarded_unacked: u64,
    pub stale_ignored: u64,
    pub last_seq: u64,
    /// Direct whole-stripe writes whose parity replay recomputed.
    pub resynced_stripe_records: u64,
}

impl ReplaySummary {
    fn from_report(r: &ReplayReport, bytes: u64) -> ReplaySummary {
        ReplaySummary {
            fresh: false,
            replayed_records: r.replayed,
            replayed_bytes: bytes,
            discarded_torn: r.discarded_torn,
            discarded_unacked: r.discarded_unacked,
            stale_ignored: r.stale_ignored,
            last_seq: r.last_seq,
            resynced_stripe_records: 0,
        }
    }
}

struct Inner {
    region: NvramRegion,
    app: LogAppender,
    /// A group commit is being persisted/mirrored by some writer.
    committing: bool,
    /// Everything up to here is durable and may be acknowledged.
    durable: u64,
    /// The partner's mirror must be copied whole before incremental commits mean anything.
    mirror_needs_resync: bool,
    /// The link session in which the mirror was last brought up to date (0: none).
    mirror_session: u64,
    /// Direct whole-stripe writes in flight: (start, end, seq of their Stripes record).
    direct: Vec<(u64, u64, u64)>,
    /// A group commit's records could not be written to the NVRAM: they are not in the log,
    /// and no later commit may say they are (it would acknowledge them). Every write not yet
    /// durable fails from then on.
    log_failed: Option<String>,
    /// The Checkpoint record appended for a CP that has not completed yet: (its seq, the
    /// `upto` it names). A retried CP reuses it (and goes no further than it names) rather
    /// than appending another: a fault that fails CPs over and over must not use up the
    /// ring's reserve, or the log could never drain again.
    cp_mark: Option<(u64, u64)>,
    /// The seq of the newest record that puts data on the members (a Write, or the Stripes
    /// record of a direct write): a CP whose range holds none has nothing to write and needs
    /// no Checkpoint record (an idle log would otherwise run a CP, with a record, a mirrored
    /// commit and member flushes, at every interval: each CP's record making the next).
    last_data_seq: u64,
    /// Trim slots written by CPs that the partner's mirror has not been sent yet: they go in
    /// the next commit that carries new records (whose acknowledgement then proves the
    /// partner has them, together with the records that reuse the trimmed space).
    unsent_slots: Vec<Range<usize>>,
}

/// Refuse once the log has failed (see `Inner::log_failed`).
fn log_failed(g: &Inner) -> Result<(), JournalError> {
    match &g.log_failed {
        Some(e) => Err(JournalError::Log(format!(
            "not acknowledged: the NVRAM log is stopped ({e})"
        ))),
        None => Ok(()),
    }
}

fn overlaps_direct(direct: &[(u64, u64, u64)], offset: u64, len: u64) -> bool {
    direct
        .iter()
        .any(|&(a, b, _)| offset < b && a < offset + len)
}

/// A journaled aggregate: what the NBD export serves.
pub struct Journal {
    agg: Arc<Aggregate>,
    inner: Mutex<Inner>,
    persister: Persister,
    progress: Condvar,
    /// Everything up to here has survived a device cache flush (power-loss safe).
    flushed: AtomicU64,
    flush_lock: Mutex<()>,
    /// Direct writes (not FUA) finished on the members, counted; and how many of them the
    /// last member cache flush covers (held across that flush: concurrent FLUSHes wait for
    /// one that started after their writes, never return on another's flush in progress).
    member_writes: AtomicU64,
    members_flushed: Mutex<u64>,
    cache: RwLock<WriteCache>,
    trims: AtomicU64,
    mirror: RwLock<Option<Arc<dyn MirrorLink>>>,
    mirror_state: Mutex<MirrorState>,
    cp_lock: Mutex<()>,
    /// Records, durably and where the partner can read it without the interconnect, that we
    /// acknowledge writes its mirror lacks (true) or no longer do (false).
    unmirrored_hook: RwLock<Option<UnmirroredHook>>,
    unmirrored_flag: AtomicBool,
    cp_kick: (Mutex<Kick>, Condvar),
    stop: AtomicBool,
    /// Set by [`Journal::halt`]: nothing is acknowledged any more.
    halted: AtomicBool,
    /// A final CP failed: the CP thread makes no more CPs but keeps the partner's mirror of
    /// this log current (a takeover can then replay it).
    mirror_only: AtomicBool,
    /// The link session the mirror was last brought up to date in (0: none): "mirrored" is
    /// only true in that session.
    mirrored_session: AtomicU64,
    /// Unit tests: this many of the next group commits fail their NVRAM write (EIO).
    #[cfg(test)]
    fail_log_writes: AtomicU64,
    cfg: JournalConfig,
    region_bytes: usize,
    pub stats: JournalStats,
}

fn aggregate_uuid(agg: &Aggregate) -> uuid::Uuid {
    uuid::Uuid::parse_str(&agg.status().uuid).expect("aggregate uuid")
}

/// Make `region` an empty log of `aggregate`, durably: what it held is forgotten (a new
/// epoch: older records are not this log's). Unlike a zeroed region, which says "log lost",
/// this says "nothing to replay".
pub fn format_empty(region: &mut NvramRegion, aggregate: uuid::Uuid) -> Result<(), JournalError> {
    let mut app = LogAppender::format(
        region.bytes_mut(),
        aggregate,
        LOG_GENERATION,
        rand::random(),
    )
    .map_err(|e| JournalError::Log(e.to_string()))?;
    let c = app.commit();
    region.persist(&c.ranges)?;
    Ok(())
}

/// Replay a log region onto an aggregate: newest data per byte wins, parity of every touched
/// column recomputed from the data (the write hole). Returns what was done; the region is left
/// as it was (the caller formats it afresh).
pub fn replay_region(agg: &Aggregate, region: &[u8]) -> Result<ReplaySummary, JournalError> {
    replay_marked(agg, region, None)
}

/// [`replay_region`] of a log to which [`mark_replay`] appended a Checkpoint record: `(its
/// seq, the report of the scan before)`. That record says nothing about the state the members
/// were left in, and what is reported is what the log held before it.
fn replay_marked(
    agg: &Aggregate,
    region: &[u8],
    own_mark: Option<(u64, ReplayReport)>,
) -> Result<ReplaySummary, JournalError> {
    let expect = Expect {
        aggregate: aggregate_uuid(agg),
        generation: LOG_GENERATION,
    };
    match scan(region, &expect) {
        Err(ReplayError::NotFormatted) => Ok(ReplaySummary {
            fresh: true,
            ..Default::default()
        }),
        Err(source) => Err(JournalError::Replay {
            aggregate: agg.name().to_string(),
            source,
        }),
        Ok(mut replay) => {
            if let Some((seq, report)) = own_mark {
                replay.checkpoints.retain(|c| c.seq != seq);
                replay.report = report;
            }
            let failed_before = agg.failed_member();
            if let Some(f) = failed_before {
                write_hole_check(agg, f, &replay, "it was missing before the replay")?;
            }
            let cache = WriteCache::from_replay(region, &replay);
            // Directly written stripes first (their write may have been torn: recompute parity
            // from their data), then the logged writes, which are all newer than them.
            for st in &replay.stripes {
                agg.resync_range(st.offset, st.len)?;
            }
            let runs = runs_of(&cache, u64::MAX);
            let bytes: u64 = runs.iter().map(|(_, d)| d.len() as u64).sum();
            let written =
                write_runs_parallel(agg, &runs, true, CP_WRITERS_MAX).and_then(|()| agg.flush());
            // A member that failed during the replay: its blocks of the stripes the CP was
            // writing were rebuilt from parity the replay had not repaired yet.
            if let Some(f) = agg.failed_member().filter(|_| failed_before.is_none()) {
                write_hole_check(agg, f, &replay, "it failed during the replay")?;
            }
            written?;
            let mut s = ReplaySummary::from_report(&replay.report, bytes);
            s.resynced_stripe_records = replay.stripes.len() as u64;
            tracing::info!(aggregate = %agg.name(), replayed = s.replayed_records, bytes, discarded_torn = s.discarded_torn,
                discarded_unacked = s.discarded_unacked, stale = s.stale_ignored,
                resynced_stripe_records = s.resynced_stripe_records, "NVRAM log replayed");
            Ok(s)
        }
    }
}

/// The RAID write hole. A consistency point writes partial stripes in place: new data and new
/// parity on several members, not atomically. A crash in between leaves parity that may match
/// neither the old nor the new data at the columns written. Replay with every member present
/// rewrites the logged data and recomputes that parity from the data, which repairs it. With a
/// data member missing, its blocks are rebuilt from parity: a block the log covers is rewritten
/// from the log, but a block of such a column that no logged write covers (data written long
/// ago, by nobody now) would be rebuilt from the torn parity, silently wrong.
///
/// Returns those blocks of member `f` as `(stripe, lo, hi)` column ranges: in each stripe
/// written partly by records of the CP in flight ([`Replay::checkpoint_in_flight`]), the
/// columns another data member's record writes, less the columns of `f` any record of the
/// log covers. Empty when no CP was in flight, when `f` is the parity member, and for whole
/// stripes (every block is logged).
pub fn write_hole(geo: &Geometry, f: usize, replay: &Replay) -> Vec<(u64, u64, u64)> {
    use std::collections::BTreeMap;
    let Some(upto) = replay.checkpoint_in_flight() else {
        return Vec::new();
    };
    if f >= geo.data_members {
        return Vec::new();
    }
    // stripe -> (columns other members' CP records write, columns of f the log covers)
    type Cols = Vec<(u64, u64)>;
    let mut stripes: BTreeMap<u64, (Cols, Cols)> = BTreeMap::new();
    let len = |r: &crate::core::nvlog::ReplayRecord| (r.payload.end - r.payload.start) as u64;
    for r in replay.records.iter().filter(|r| r.seq <= upto) {
        for span in geo.spans(r.offset, len(r)) {
            for g in span.segs.iter().filter(|g| g.member != f) {
                let e = stripes.entry(span.stripe).or_default();
                e.0.push((g.col, g.col + g.len));
            }
        }
    }
    for r in &replay.records {
        for span in geo.spans(r.offset, len(r)) {
            if let (Some(e), Some(g)) = (stripes.get_mut(&span.stripe), span.seg_of(f)) {
                e.1.push((g.col, g.col + g.len));
            }
        }
    }
    let mut out = Vec::new();
    for (stripe, (mut written, mut covered)) in stripes {
        written.sort_unstable();
        covered.sort_unstable();
        // Walk the written columns, cutting out the covered ones.
        let mut pos = 0u64;
        for (a, b) in written {
            let mut a = a.max(pos);
            while a < b {
                match covered.iter().find(|&&(c, d)| d > a && c < b) {
                    Some(&(c, d)) if c <= a => a = d,
                    Some(&(c, _)) => {
                        push_range(&mut out, stripe, a, c);
                        a = c;
                    }
                    None => {
                        push_range(&mut out, stripe, a, b);
                        a = b;
                    }
                }
            }
            pos = pos.max(b);
        }
    }
    out
}

/// Append `[lo, hi)` of `stripe`, merging with the previous range where they touch.
fn push_range(out: &mut Vec<(u64, u64, u64)>, stripe: u64, lo: u64, hi: u64) {
    if lo >= hi {
        return;
    }
    match out.last_mut() {
        Some((s, _, h)) if *s == stripe && *h >= lo => *h = (*h).max(hi),
        _ => out.push((stripe, lo, hi)),
    }
}

/// Refuse a replay that [`write_hole`] says would rebuild blocks of missing member `f` from
/// parity a crash may have torn.
fn write_hole_check(
    agg: &Aggregate,
    f: usize,
    replay: &Replay,
    when: &'static str,
) -> Result<(), JournalError> {
    let geo = agg.geometry();
    let hole = write_hole(&geo, f, replay);
    let Some(&(stripe, lo, hi)) = hole.first() else {
        return Ok(());
    };
    let at = |s: u64, c: u64| s * geo.stripe_bytes() + f as u64 * geo.chunk_bytes + c;
    let mut stripes: Vec<u64> = hole.iter().map(|h| h.0).collect();
    stripes.dedup();
    let e = JournalError::WriteHole(Box::new(WriteHoleError {
        aggregate: agg.name().to_string(),
        member: f,
        path: agg.status().members.get(f).cloned().unwrap_or_default(),
        stripes: stripes.len(),
        bytes: hole.iter().map(|h| h.2 - h.1).sum(),
        first_offset: at(stripe, lo),
        first_end: at(stripe, hi),
        when,
    }));
    tracing::error!(aggregate = %agg.name(), member = f, stripes = stripes.len(), "{e}");
    Err(e)
}

/// A replay writes the log's stripes in place just as a CP does: say so in the log first, so
/// that a crash during the replay followed by the loss of a member is refused like a crash
/// during a CP (see [`write_hole`]). A log that does not scan is left to `replay_region`.
/// Returns the seq of the record appended and the report of the scan before.
fn mark_replay(
    agg: &Aggregate,
    region: &mut NvramRegion,
) -> Result<Option<(u64, ReplayReport)>, JournalError> {
    let expect = Expect {
        aggregate: aggregate_uuid(agg),
        generation: LOG_GENERATION,
    };
    let Ok(replay) = scan(region.bytes(), &expect) else {
        return Ok(None);
    };
    if replay.report.last_seq <= replay.report.trimmed_seq {
        return Ok(None);
    }
    match crate::core::nvlog::append_replay_checkpoint(region.bytes_mut(), &replay) {
        Some(r) => {
            region.persist(&[r])?;
            Ok(Some((replay.report.last_seq + 1, replay.report)))
        }
        None => {
            tracing::warn!(aggregate = %agg.name(), "no room in the NVRAM log to record that a replay starts: a crash during it followed by the loss of a member would go unnoticed");
            Ok(None)
        }
    }
}

/// The cache's extents with seq <= `up_to`, merged into contiguous runs (copied out).
fn runs_of(cache: &WriteCache, up_to: u64) -> Vec<(u64, Vec<u8>)> {
    let mut runs: Vec<(u64, Vec<u8>)> = Vec::new();
    for h in cache
        .lookup(0, u64::MAX)
        .into_iter()
        .filter(|h| h.seq <= up_to)
    {
        match runs.last_mut() {
            Some((off, data)) if *off + data.len() as u64 == h.offset => {
                data.extend_from_slice(h.data)
            }
            _ => runs.push((h.offset, h.data.to_vec())),
        }
    }
    runs
}

/// Writes a consistency point keeps in flight (the members see about this many requests at
/// once): from `CP_WRITERS_MIN` for a log that is nearly empty up to `CP_WRITERS_MAX` at the CP
/// fill mark, so that a routine CP does not queue the log's own writes behind a burst of member
/// I/O, and a CP under pressure (writers about to wait for log space) goes as fast as the
/// members allow.
const CP_WRITERS_MAX: usize = 64;
const CP_WRITERS_MIN: usize = 8;
/// Pieces per batch (`Aggregate::write_batch`: one round of reads and one of writes for all
/// of them). A thread per piece, each waiting twice per read-modify-write, cost more CPU in
/// context switches than the writes themselves on a small machine.
const CP_BATCH: usize = 16;

/// Write runs to the aggregate in batches from several threads (runs never overlap, so order
/// is free): `writers` pieces in flight in all.
fn write_runs_parallel(
    agg: &Aggregate,
    runs: &[(u64, Vec<u8>)],
    repair: bool,
    writers: usize,
) -> Result<(), AggregateError> {
    let pieces = pieces_of(agg, runs);
    let batches: Vec<&[(u64, &[u8])]> = pieces.chunks(CP_BATCH).collect();
    let threads = writers.div_ceil(CP_BATCH).max(1);
    let next = AtomicU64::new(0);
    let first_err: Mutex<Option<AggregateError>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads.min(batches.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= batches.len() || first_err.lock().unwrap().is_some() {
                    return;
                }
                if let Err(e) = agg.write_batch(batches[i], repair) {
                    first_err.lock().unwrap().get_or_insert(e);
                    return;
                }
            });
        }
    });
    match first_err.into_inner().unwrap() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Runs cut into pieces the aggregate takes, at stripe boundaries so full stripes stay full.
fn pieces_of<'a>(agg: &Aggregate, runs: &'a [(u64, Vec<u8>)]) -> Vec<(u64, &'a [u8])> {
    let max = agg.block_sizes().max_bytes as u64;
    let stripe = agg.geometry().stripe_bytes();
    let piece_max = (max / stripe).max(1) * stripe;
    let mut out = Vec::new();
    for (off, data) in runs {
        let mut pos = 0u64;
        while pos < data.len() as u64 {
            let at = off + pos;
            let to_boundary = piece_max - (at % stripe);
            let n = to_boundary.min(data.len() as u64 - pos).min(max) as usize;
            out.push((at, &data[pos as usize..pos as usize + n]));
            pos += n as u64;
        }
    }
    out
}

/// A direct write to the members, in pieces the aggregate takes (whole stripes each).
fn write_members(agg: &Aggregate, off: u64, data: &[u8], fua: bool) -> Result<(), AggregateError> {
    let stripe = agg.geometry().stripe_bytes() as usize;
    let piece = (agg.block_sizes().max_bytes as usize / stripe).max(1) * stripe;
    for (i, chunk) in data.chunks(piece).enumerate() {
        agg.write(off + (i * piece) as u64, chunk, fua)?;
    }
    Ok(())
}

impl Journal {
    /// Open this node's log for `agg`: replay what it holds onto the aggregate, then start a
    /// fresh log (new epoch). `region` is the mapped NVRAM region.
    pub fn open(
        agg: Arc<Aggregate>,
        mut region: NvramRegion,
        cfg: JournalConfig,
    ) -> Result<(Arc<Journal>, ReplaySummary), JournalError> {
        let own_mark = mark_replay(&agg, &mut region)?;
        let summary = replay_marked(&agg, region.bytes(), own_mark)?;
        let epoch: u64 = rand::random();
        let mut app = LogAppender::format(
            region.bytes_mut(),
            aggregate_uuid(&agg),
            LOG_GENERATION,
            epoch,
        )
        .map_err(|e| JournalError::Log(e.to_string()))?;
        app.set_reserve(CHECKPOINT_RESERVE);
        let c = app.commit();
        region.persist(&c.ranges)?;
        let persister = region.persister();
        let region_bytes = region.len();
        let j = Arc::new(Journal {
            agg,
            inner: Mutex::new(Inner {
                region,
                app,
                committing: false,
                durable: 0,
                mirror_needs_resync: true,
                mirror_session: 0,
                direct: Vec::new(),
                cp_mark: None,
                last_data_seq: 0,
                log_failed: None,
                unsent_slots: Vec::new(),
            }),
            persister,
            progress: Condvar::new(),
            flushed: AtomicU64::new(0),
            flush_lock: Mutex::new(()),
            member_writes: AtomicU64::new(0),
            members_flushed: Mutex::new(0),
            cache: RwLock::new(WriteCache::new()),
            trims: AtomicU64::new(0),
            mirror: RwLock::new(None),
            mirror_state: Mutex::new(MirrorState::NoPartner),
            cp_lock: Mutex::new(()),
            unmirrored_hook: RwLock::new(None),
            unmirrored_flag: AtomicBool::new(false),
            cp_kick: (Mutex::new(Kick::default()), Condvar::new()),
            stop: AtomicBool::new(false),
            halted: AtomicBool::new(false),
            mirror_only: AtomicBool::new(false),
            mirrored_session: AtomicU64::new(0),
            #[cfg(test)]
            fail_log_writes: AtomicU64::new(0),
            cfg,
            region_bytes,
            stats: JournalStats::default(),
        });
        let weak = Arc::downgrade(&j);
        std::thread::Builder::new()
            .name("hapair-cp".into())
            .spawn(move || cp_thread(weak))
            .expect("spawn CP thread");
        Ok((j, summary))
    }

    /// The aggregate underneath.
    pub fn aggregate(&self) -> &Arc<Aggregate> {
        &self.agg
    }

    /// Attach the partner link: from now on commits are mirrored (after a full resync).
    pub fn set_mirror(&self, link: Option<Arc<dyn MirrorLink>>) {
        let has = link.is_some();
        *self.mirror.write().unwrap() = link;
        self.inner.lock().unwrap().mirror_needs_resync = true;
        *self.mirror_state.lock().unwrap() = if has {
            MirrorState::NotMirrored {
                since: SystemTime::now(),
                why: "partner mirror not yet synchronised".into(),
            }
        } else {
            MirrorState::NoPartner
        };
        if has {
            self.kick_mirror();
        }
    }

    /// Install the hook that records "unmirrored" where the partner reads it (the disk
    /// mailbox). With a hook, no write is acknowledged on local durability alone before the
    /// hook said so durably: a partner that later finds this node dead and its interconnect
    /// silent then knows its mirror is stale and refuses to take over from it.
    pub fn set_unmirrored_hook(&self, hook: Option<UnmirroredHook>) {
        *self.unmirrored_hook.write().unwrap() = hook;
    }

    /// The mailbox already says "unmirrored" (left by an earlier process, whose writes this
    /// log may hold and the partner's mirror lack): clear it once the mirror is resynced,
    /// not before.
    pub fn note_unmirrored_flag(&self, on: bool) {
        self.unmirrored_flag.store(on, Ordering::Release);
    }

    /// Stop acknowledging, now (this node is halting: taken over, told to die, or fenced).
    /// No write, zeroing or flush is answered successfully from here on, those in progress
    /// included: the partner replays what its mirror held when it took over, and a write
    /// acknowledged after that could be missing there. The CP thread stops too.
    pub fn halt(&self, why: &str) {
        self.halted.store(true, Ordering::SeqCst);
        // Never waits for the log lock (held across a mailbox write, which may be what is
        // failing): the flag above is checked before every acknowledgement anyway.
        if let Ok(mut g) = self.inner.try_lock() {
            if g.log_failed.is_none() {
                g.log_failed = Some(format!("halted: {why}"));
            }
        }
        self.progress.notify_all();
        self.stop.store(true, Ordering::Release);
        self.kick_cp();
    }

    /// Bytes of the log region in use (records not yet trimmed by a CP, and the header), and
    /// the region's size.
    pub fn usage(&self) -> (u64, u64) {
        let free = self.inner.lock().unwrap().app.free_bytes();
        let total = self.region_bytes as u64;
        (total.saturating_sub(free as u64), total)
    }

    /// Whether the log may still acknowledge: not halted, no failed write.
    fn log_ok(&self, g: &Inner) -> Result<(), JournalError> {
        if self.halted.load(Ordering::SeqCst) {
            return Err(JournalError::Log(
                "not acknowledged: the node is halting (taken over)".into(),
            ));
        }
        log_failed(g)
    }

    /// Whether [`Journal::halt`] was called.
    pub fn is_halted(&self) -> bool {
        self.halted.load(Ordering::SeqCst)
    }

    /// The last check before an acknowledgement.
    fn not_halted(&self) -> Result<(), BackendError> {
        if self.halted.load(Ordering::SeqCst) {
            return Err(BackendError::Io(
                "not acknowledged: the node is halting (taken over)".into(),
            ));
        }
        Ok(())
    }

    /// True when every acknowledged write is in the partner's mirror *and* the mailbox no
    /// longer says otherwise (what the partner may rely on for a takeover).
    pub fn fully_mirrored(&self) -> bool {
        matches!(self.mirror_state(), MirrorState::Mirrored)
            && !self.unmirrored_flag.load(Ordering::Acquire)
    }

    /// Clear the mailbox's "unmirrored" flag once mirrored again (set synchronously by the
    /// commit that first acknowledges unmirrored; cleared here, from the CP thread).
    fn sync_unmirrored_flag(&self) {
        if !self.unmirrored_flag.load(Ordering::Acquire)
            || !matches!(self.mirror_state(), MirrorState::Mirrored)
        {
            return;
        }
        let hook = self.unmirrored_hook.read().unwrap();
        let Some(h) = hook.as_ref() else { return };
        // Under the inner lock, so no commit sets the flag between our check and the clear.
        let g = self.inner.lock().unwrap();
        if g.mirror_needs_resync || g.committing {
            return;
        }
        match h(false) {
            Ok(()) => {
                self.unmirrored_flag.store(false, Ordering::Release);
                tracing::info!("mailbox: writes are mirrored again");
            }
            Err(e) => tracing::warn!(error = %e, "could not clear the unmirrored flag; will retry"),
        }
        drop(g);
    }

    /// The interconnect session established now, if there is a link and it is up.
    fn link_session(&self) -> Option<u64> {
        self.mirror
            .read()
            .unwrap()
            .as_ref()
            .and_then(|l| l.session())
    }

    /// Mirroring state, for status.
    pub fn mirror_state(&self) -> MirrorState {
        let st = self.mirror_state.lock().unwrap().clone();
        if matches!(st, MirrorState::Mirrored)
            && self.link_session() != Some(self.mirrored_session.load(Ordering::Acquire))
        {
            // Reconnected (or down) since: until the log is copied again, the partner's
            // mirror may lack what it had not flushed when the session ended.
            return MirrorState::NotMirrored {
                since: SystemTime::now(),
                why: "interconnect session changed: mirror being resynchronised".into(),
            };
        }
        st
    }

    /// Persistence of the local region and when its device cache is flushed, for status
    /// ("NVRAM: file on ext4, device cache flushed on client FLUSH/FUA").
    pub fn persistence(&self) -> String {
        let p = self.inner.lock().unwrap().region.persistence();
        match p {
            Persistence::DiskFile { .. } if self.cfg.flush_every_commit => {
                format!("{p}, device cache flushed every commit")
            }
            Persistence::DiskFile { .. } => {
                format!("{p}, device cache flushed on client FLUSH/FUA")
            }
            _ => p.to_string(),
        }
    }

    /// Make every record up to `seq` (already durable) survive a power loss: one device cache
    /// flush covers every writer waiting for one.
    fn flush_log(&self, seq: u64) -> Result<(), JournalError> {
        if self.flushed.load(Ordering::Acquire) >= seq {
            return Ok(());
        }
        let _one = self.flush_lock.lock().unwrap();
        if self.flushed.load(Ordering::Acquire) >= seq {
            return Ok(());
        }
        // Everything durable now has been written back: the flush covers it.
        let target = self.inner.lock().unwrap().durable;
        self.persister.flush_device()?;
        self.flushed.fetch_max(target, Ordering::AcqRel);
        self.stats.device_flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Sequence number of the newest durable (acknowledgeable) record.
    pub fn durable_seq(&self) -> u64 {
        self.inner.lock().unwrap().durable
    }

    fn set_not_mirrored(&self, why: &str) {
        let mut st = self.mirror_state.lock().unwrap();
        match &mut *st {
            // Still not mirrored: status says the latest reason, since the first.
            MirrorState::NotMirrored { why: w, .. } => {
                if w != why {
                    *w = why.to_string();
                }
            }
            _ => {
                tracing::error!(why, "NVRAM NOT MIRRORED: writes are acknowledged on local durability only; takeover by the partner is unsafe until resynchronised");
                *st = MirrorState::NotMirrored {
                    since: SystemTime::now(),
                    why: why.to_string(),
                };
            }
        }
    }

    /// Copy the whole region to the partner's mirror. Called with `inner` locked so the region
    /// does not change while it is copied; returns the last seq the copy covers and the batches.
    fn resync_batches(inner: &mut Inner) -> (u64, Vec<Range<usize>>, Vec<LogRecords>) {
        let c = inner.app.commit();
        let epoch = inner.app.header().epoch;
        let live = inner.app.live_ranges();
        let bytes = inner.region.bytes();
        let segments = live
            .iter()
            .map(|r| LogSegment {
                region_offset: r.start as u64,
                bytes: bytes[r.clone()].to_vec(),
            })
            .collect();
        (
            c.last_seq,
            live,
            mirror_messages(epoch, 0, c.last_seq, segments),
        )
    }

    /// Make `seq` durable: become the group-commit leader if nobody is, else wait for one.
    fn wait_durable(&self, seq: u64) -> Result<(), JournalError> {
        self.commit_until(seq, false)
    }

    /// With the partner reachable and its mirror out of date, copy the log to it now rather
    /// than at the next write: the pair reports "mirrored" as soon as it is true.
    pub fn ensure_mirrored(&self) -> Result<(), JournalError> {
        let Some(session) = self.link_session() else {
            return Ok(());
        };
        let stale = {
            let g = self.inner.lock().unwrap();
            g.mirror_needs_resync || session != g.mirror_session
        };
        if stale {
            self.commit_until(0, true)?;
        }
        Ok(())
    }

    fn commit_until(&self, seq: u64, mut force: bool) -> Result<(), JournalError> {
        let mut g = self.inner.lock().unwrap();
        loop {
            if g.durable >= seq && !force {
                return Ok(());
            }
            self.log_ok(&g)?;
            if g.committing {
                g = self.progress.wait(g).unwrap();
                continue;
            }
            force = false;
            g.committing = true;
            let epoch = g.app.header().epoch;
            let link = self.mirror.read().unwrap().clone();
            let session = link.as_ref().and_then(|l| l.session()).unwrap_or(0);
            let link = link.filter(|_| session != 0);
            // A new session: the partner may have lost what it had not flushed. Everything.
            let resync = link.is_some() && (g.mirror_needs_resync || g.mirror_session != session);
            let (c_last, ranges, batches) = if resync {
                // The whole live region, trim slots included.
                g.unsent_slots.clear();
                Self::resync_batches(&mut g)
            } else {
                let c = g.app.commit();
                // Trim slots ride with new records only: an acknowledgement of a sequence
                // number already acknowledged would prove nothing. First, so that the mirror
                // has the slot before any of these records overwrites what it trimmed (a
                // commit may take several messages).
                let slots = if c.last_seq > g.durable {
                    std::mem::take(&mut g.unsent_slots)
                } else {
                    Vec::new()
                };
                let segs: Vec<LogSegment> = slots
                    .iter()
                    .chain(c.ranges.iter())
                    .map(|r| LogSegment {
                        region_offset: r.start as u64,
                        bytes: g.region.bytes()[r.clone()].to_vec(),
                    })
                    .collect();
                let batches = mirror_messages(epoch, c.first_seq, c.last_seq, segs);
                (c.last_seq, c.ranges, batches)
            };
            drop(g);
            // Send to the partner first, make the local copy durable while it does the same,
            // then wait for its acknowledgement: the cost is the larger of the two, not the sum.
            let sent = link
                .as_ref()
                .is_some_and(|l| batches.into_iter().all(|b| l.send_records(session, b)));
            // SAFETY: the region lives in `inner`, which lives as long as `self`.
            let persisted = unsafe {
                if self.cfg.flush_every_commit {
                    self.persister.persist(&ranges)
                } else {
                    self.persister.write_back(&ranges)
                }
            };
            #[cfg(test)]
            let persisted = persisted.and_then(|()| self.injected_log_failure());
            let mirrored = match (&link, &persisted) {
                (Some(l), Ok(())) => sent && l.wait_ack(session, epoch, c_last, MIRROR_ACK_TIMEOUT),
                _ => false,
            };
            g = self.inner.lock().unwrap();
            g.committing = false;
            if let Err(e) = persisted {
                // The commit took these records off the appender's dirty list: a later commit
                // would acknowledge them without their ever being written. Latch instead.
                tracing::error!(error = %e, first_unwritten_seq = g.durable + 1, "NVRAM log write failed: writes fail from now on");
                g.log_failed = Some(e.to_string());
                self.progress.notify_all();
                return Err(e.into());
            }
            if link.is_some() {
                if mirrored {
                    g.mirror_session = session;
                    self.mirrored_session.store(session, Ordering::Release);
                    if resync {
                        g.mirror_needs_resync = false;
                        tracing::info!(up_to_seq = c_last, "NVRAM mirror resynchronised: mirrored");
                    }
                    *self.mirror_state.lock().unwrap() = MirrorState::Mirrored;
                    self.stats.mirrored_commits.fetch_add(1, Ordering::Relaxed);
                } else {
                    g.mirror_needs_resync = true;
                    // The session ended or the partner refused the update meanwhile: say so.
                    let why = match link.as_ref().filter(|l| l.session() != Some(session)) {
                        Some(l) => l.down_reason(),
                        None => "partner did not acknowledge the mirror in time".into(),
                    };
                    self.set_not_mirrored(&why);
                    self.stats
                        .local_only_commits
                        .fetch_add(1, Ordering::Relaxed);
                }
            } else {
                if let Some(l) = self.mirror.read().unwrap().as_ref() {
                    g.mirror_needs_resync = true;
                    self.set_not_mirrored(&l.down_reason());
                }
                self.stats
                    .local_only_commits
                    .fetch_add(1, Ordering::Relaxed);
            }
            let local_only = self.mirror.read().unwrap().is_some() && !mirrored;
            let hook_set = self.unmirrored_hook.read().unwrap().is_some();
            if hook_set
                && local_only != self.unmirrored_flag.load(Ordering::Acquire)
                && (local_only || c_last > 0)
            {
                // Record the change before acknowledging (setting) or after catching up
                // (clearing). Outside the lock: it is a disk write.
                drop(g);
                let r = (self.unmirrored_hook.read().unwrap().as_ref().expect("hook"))(local_only);
                g = self.inner.lock().unwrap();
                match r {
                    Ok(()) => {
                        self.unmirrored_flag.store(local_only, Ordering::Release);
                        tracing::warn!(
                            unmirrored = local_only,
                            "recorded in the mailbox whether writes are acknowledged unmirrored"
                        );
                    }
                    Err(e) if local_only => {
                        // Durable here, but not acknowledged: the client sees an error rather
                        // than a write a takeover could lose.
                        g.committing = false;
                        self.progress.notify_all();
                        return Err(JournalError::Log(format!(
                            "partner unreachable and the mailbox cannot record that writes are unmirrored: {e}"
                        )));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "could not clear the unmirrored flag; will retry")
                    }
                }
            }
            g.app
                .mark_acked(c_last)
                .map_err(|e| JournalError::Log(e.to_string()))?;
            g.durable = g.durable.max(c_last);
            if self.cfg.flush_every_commit {
                self.flushed.fetch_max(c_last, Ordering::AcqRel);
            }
            self.stats.group_commits.fetch_add(1, Ordering::Relaxed);
            self.progress.notify_all();
        }
    }

    /// Append a write to the log and wait until it may be acknowledged: written to the
    /// NVRAM (and mirrored, with a partner), and with `fua` through the device's cache too.
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), JournalError> {
        self.agg.check(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let sb = self.agg.geometry().stripe_bytes();
        if offset % sb == 0
            && data.len() as u64 % sb == 0
            && self.write_direct(offset, data, fua)?
        {
            return Ok(());
        }
        let seq = self
            .append_logged(offset, data, true)?
            .expect("a blocking append returns a record");
        self.finish_writes(seq, fua)
    }

    /// The first half of a logged write, for a caller that acknowledges later without holding
    /// a thread (the NBD server's fast path): append the record (reads see the data from now
    /// on) and return its sequence number; [`Journal::finish_writes`] then waits until it may be
    /// acknowledged. `None` when the write would have to wait here (log full, a direct write of
    /// its stripes in flight) or goes to the members directly (whole stripes): the caller
    /// writes it with [`Journal::write`] instead.
    pub fn try_append(&self, offset: u64, data: &[u8]) -> Result<Option<u64>, JournalError> {
        self.agg.check(offset, data.len() as u64)?;
        let sb = self.agg.geometry().stripe_bytes();
        if data.is_empty() || (offset % sb == 0 && data.len() as u64 % sb == 0) {
            return Ok(None);
        }
        self.append_logged(offset, data, false)
    }

    /// Wait until every write appended up to `seq` may be acknowledged: durable in the NVRAM
    /// (and mirrored, with a partner); with `fua`, through the log device's cache too.
    pub fn finish_writes(&self, seq: u64, fua: bool) -> Result<(), JournalError> {
        self.wait_durable(seq)?;
        if fua {
            self.flush_log(seq)?;
        }
        Ok(())
    }

    /// Append a logged write; with `wait`, wait for room (or for a direct write of the same
    /// stripes), else return `None` where it would wait.
    fn append_logged(
        &self,
        offset: u64,
        data: &[u8],
        wait: bool,
    ) -> Result<Option<u64>, JournalError> {
        // The cache's copy, made before the lock that orders appends.
        let shared: Arc<[u8]> = Arc::from(data);
        let mut g = self.inner.lock().unwrap();
        let mut waited = false;
        let seq = loop {
            // A direct write of the same stripes in flight goes first: this record is newer.
            if overlaps_direct(&g.direct, offset, data.len() as u64) {
                if !wait {
                    return Ok(None);
                }
                g = self.progress.wait(g).unwrap();
                continue;
            }
            let inner = &mut *g;
            match inner.app.append(inner.region.bytes_mut(), offset, data) {
                Ok(seq) => {
                    inner.last_data_seq = seq;
                    break seq;
                }
                Err(e) if e.is_full() && !wait => {
                    self.kick_cp();
                    return Ok(None);
                }
                Err(e) if e.is_full() => {
                    self.log_ok(&g)?;
                    g = self.wait_for_space(g, &mut waited)
                }
                Err(e) => return Err(JournalError::Log(e.to_string())),
            }
        };
        self.cache.write().unwrap().insert(seq, offset, shared);
        if g.app.free_bytes() * 100 < (100 - self.cfg.cp_fill_percent as usize) * self.region_bytes
        {
            self.kick_cp();
        }
        drop(g);
        self.stats.appended.fetch_add(1, Ordering::Relaxed);
        Ok(Some(seq))
    }

    /// NBD FLUSH: every write acknowledged so far survives a power loss once this returns.
    pub fn flush(&self) -> Result<(), JournalError> {
        let durable = self.inner.lock().unwrap().durable;
        self.flush_log(durable)?;
        let want = self.member_writes.load(Ordering::Acquire);
        let mut flushed = self.members_flushed.lock().unwrap();
        if *flushed >= want {
            return Ok(());
        }
        // Every write counted up to `now` finished before this flush starts.
        let now = self.member_writes.load(Ordering::Acquire);
        self.agg.flush()?;
        *flushed = now;
        Ok(())
    }

    /// The log is full: count the wait (once per write), start a CP and wait for it to free
    /// space (or for a tick, to look again).
    fn wait_for_space<'a>(
        &self,
        g: std::sync::MutexGuard<'a, Inner>,
        waited: &mut bool,
    ) -> std::sync::MutexGuard<'a, Inner> {
        if !*waited {
            self.stats.full_waits.fetch_add(1, Ordering::Relaxed);
            *waited = true;
        }
        self.kick_cp();
        self.progress
            .wait_timeout(g, Duration::from_millis(100))
            .unwrap()
            .0
    }

    /// Whole stripes straight to the members, with only a Stripes record in the log (made
    /// durable first, so that replay after a crash recomputes their parity). `Ok(false)`: the
    /// log holds data of these stripes (a CP would write it over this), so log it instead.
    fn write_direct(&self, offset: u64, data: &[u8], fua: bool) -> Result<bool, JournalError> {
        let len = data.len() as u64;
        let seq = {
            let mut g = self.inner.lock().unwrap();
            let mut waited = false;
            loop {
                // Under the lock that orders appends: no logged write of these bytes can slip
                // in between this check and the record (a later one waits for us, above).
                if overlaps_direct(&g.direct, offset, len)
                    || !self.cache.read().unwrap().lookup(offset, len).is_empty()
                {
                    self.stats.direct_fallbacks.fetch_add(1, Ordering::Relaxed);
                    return Ok(false);
                }
                let inner = &mut *g;
                match inner
                    .app
                    .append_stripes(inner.region.bytes_mut(), offset, len)
                {
                    Ok(seq) => {
                        g.direct.push((offset, offset + len, seq));
                        g.last_data_seq = seq;
                        break seq;
                    }
                    Err(e) if e.is_full() => {
                        self.log_ok(&g)?;
                        g = self.wait_for_space(g, &mut waited)
                    }
                    Err(e) => return Err(JournalError::Log(e.to_string())),
                }
            }
        };
        let written = self
            .wait_durable(seq)
            // The record must outlive a power loss before any member changes.
            .and_then(|()| self.flush_log(seq))
            .and_then(|()| write_members(&self.agg, offset, data, fua).map_err(JournalError::from));
        {
            let mut g = self.inner.lock().unwrap();
            g.direct.retain(|d| d.2 != seq);
            self.progress.notify_all();
        }
        written?;
        if !fua {
            self.member_writes.fetch_add(1, Ordering::AcqRel);
        }
        self.stats.direct_writes.fetch_add(1, Ordering::Relaxed);
        self.stats.direct_bytes.fetch_add(len, Ordering::Relaxed);
        Ok(true)
    }

    /// Several reads at once (one round of member I/O), each seeing the log as [`Journal::read`].
    pub fn read_batch(&self, reads: &mut [(u64, &mut [u8])]) -> Result<(), JournalError> {
        loop {
            let before = self.trims.load(Ordering::Acquire);
            self.agg.read_batch(reads)?;
            let cache = self.cache.read().unwrap();
            if self.trims.load(Ordering::Acquire) != before {
                self.stats.read_retries.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            for (offset, buf) in reads.iter_mut() {
                cache.overlay(*offset, buf);
            }
            return Ok(());
        }
    }

    /// Read, seeing acknowledged writes still only in the log.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), JournalError> {
        loop {
            let before = self.trims.load(Ordering::Acquire);
            self.agg.read(offset, buf)?;
            let cache = self.cache.read().unwrap();
            if self.trims.load(Ordering::Acquire) != before {
                self.stats.read_retries.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            cache.overlay(offset, buf);
            return Ok(());
        }
    }

    #[cfg(test)]
    fn injected_log_failure(&self) -> Result<(), NvramError> {
        match self
            .fail_log_writes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        {
            Ok(_) => Err(NvramError::WriteBack {
                path: "injected".into(),
                start: 0,
                end: 0,
                source: std::io::Error::from_raw_os_error(libc::EIO),
            }),
            Err(_) => Ok(()),
        }
    }

    fn kick_cp(&self) {
        let (m, cv) = &self.cp_kick;
        m.lock().unwrap().cp = true;
        cv.notify_one();
    }

    /// Resynchronise the partner's mirror now rather than at the CP thread's next tick (a
    /// link attached, or a new interconnect session): the time the partner cannot take over
    /// from its mirror is the copy, not the copy and a wait.
    pub fn kick_mirror(&self) {
        let (m, cv) = &self.cp_kick;
        m.lock().unwrap().mirror = true;
        cv.notify_one();
    }

    /// Run a consistency point now: everything durable in the log goes to the aggregate, the
    /// members are flushed, the log is trimmed here and in the mirror. Returns the seq covered.
    pub fn checkpoint(&self) -> Result<u64, JournalError> {
        let _cp = self.cp_lock.lock().unwrap();
        let (upto, writers) = {
            let g = self.inner.lock().unwrap();
            let used = self.region_bytes.saturating_sub(g.app.free_bytes());
            let mark = (self.region_bytes * self.cfg.cp_fill_percent as usize / 100).max(1);
            let writers =
                CP_WRITERS_MIN + (CP_WRITERS_MAX - CP_WRITERS_MIN) * used.min(mark) / mark;
            // Never past the record of a direct write still in flight: it must survive until
            // the write is on the members (and flushed, below).
            let upto = match g.direct.iter().map(|d| d.2).min() {
                Some(first) => g.durable.min(first - 1),
                None => g.durable,
            };
            if upto <= g.app.trimmed_seq() {
                return Ok(upto);
            }
            (upto, writers)
        };
        // Say in the log (and its mirror) which records this CP writes in place, before it
        // changes a member: replay with a member missing must know which stripes may hold
        // parity a crash tore (see `write_hole`).
        let (upto, mark, data) = {
            let mut g = self.inner.lock().unwrap();
            if self.halted.load(Ordering::SeqCst) {
                return Err(JournalError::Log(
                    "no consistency point: the node is halting (taken over)".into(),
                ));
            }
            let trimmed = g.app.trimmed_seq();
            match g.cp_mark {
                // A CP that failed after its record: retried up to what the record names.
                Some((seq, named)) if seq > trimmed => {
                    let upto = upto.min(named);
                    (upto, Some(seq), g.last_data_seq > trimmed)
                }
                _ if g.last_data_seq <= trimmed => {
                    // Only Checkpoint records since the last trim: nothing for the members.
                    g.cp_mark = None;
                    (upto, None, false)
                }
                _ if g.log_failed.is_some() => {
                    // The log cannot take the record, but what it holds must still reach
                    // the members (it is durable, maybe nowhere else).
                    tracing::error!(aggregate = %self.agg.name(), "consistency point without its Checkpoint record (the NVRAM log failed): a crash during it followed by the loss of a member would go unnoticed");
                    g.cp_mark = None;
                    (upto, None, true)
                }
                _ => {
                    let inner = &mut *g;
                    let seq = inner
                        .app
                        .append_checkpoint(inner.region.bytes_mut(), upto)
                        .map_err(|e| JournalError::Log(format!("checkpoint record: {e}")))?;
                    inner.cp_mark = Some((seq, upto));
                    (upto, Some(seq), true)
                }
            }
        };
        if let Some(seq) = mark {
            self.wait_durable(seq)?;
        }
        if data {
            // The log guards the members against torn stripe writes: it must outlive a power
            // loss before the CP changes them.
            self.flush_log(mark.unwrap_or(upto))?;
        }
        let t0 = Instant::now();
        let runs = runs_of(&self.cache.read().unwrap(), upto);
        let bytes: u64 = runs.iter().map(|(_, d)| d.len() as u64).sum();
        if data {
            write_runs_parallel(&self.agg, &runs, false, writers)?;
            self.agg.flush()?;
        }
        let slot = {
            let mut g = self.inner.lock().unwrap();
            let inner = &mut *g;
            let slot = inner
                .app
                .trim(inner.region.bytes_mut(), upto)
                .map_err(|e| JournalError::Log(e.to_string()))?;
            // Done: the next CP names its own records.
            inner.cp_mark = None;
            slot
        };
        if let Some(r) = &slot {
            // Through the device's cache too: the space behind the old head is reused next,
            // and a slot still in the cache at a power loss would have the scan start at the
            // old head and find newer records there (the log then refuses to replay).
            // SAFETY: the region lives as long as `self`.
            if let Err(e) = unsafe { self.persister.persist(std::slice::from_ref(r)) } {
                // Trimmed in memory, not on the NVRAM: the space cannot be given back, and the
                // next CP would find nothing left to trim. Writers waiting for space fail.
                let mut g = self.inner.lock().unwrap();
                tracing::error!(error = %e, "NVRAM log trim slot write failed: writes fail from now on");
                g.log_failed = Some(format!("trim slot: {e}"));
                self.progress.notify_all();
                return Err(e.into());
            }
        }
        // The partner's mirror gets the new trim slot with the next commit of new records: the
        // first records that can reuse the trimmed space travel in the same message, so the
        // mirror never holds them without the slot that makes its scan start past the old
        // records, nor a slot whose delivery nobody checked (a trim sent on its own had only an
        // acknowledgement of a sequence number already acknowledged to wait for). Until then
        // the mirror holds the old slot and the old records, which a takeover would replay to
        // the same effect the CP had: nothing newer exists to be overwritten.
        {
            let mut g = self.inner.lock().unwrap();
            if let Some(r) = slot.clone() {
                if !g.unsent_slots.contains(&r) {
                    g.unsent_slots.push(r);
                }
            }
            g.app.trim_persisted();
            self.progress.notify_all();
        }
        {
            let mut c = self.cache.write().unwrap();
            self.trims.fetch_add(1, Ordering::AcqRel);
            c.trim(upto);
        }
        self.stats.cps.fetch_add(1, Ordering::Relaxed);
        self.stats.cp_bytes.fetch_add(bytes, Ordering::Relaxed);
        tracing::debug!(
            up_to_seq = upto,
            bytes,
            runs = runs.len(),
            ms = t0.elapsed().as_millis() as u64,
            "consistency point"
        );
        Ok(upto)
    }

    /// Stop the CP thread after a final CP: used by graceful shutdown and giveback.
    pub fn close(&self) -> Result<u64, JournalError> {
        let r = self.checkpoint();
        match &r {
            Ok(_) => self.stop.store(true, Ordering::Release),
            Err(e) => {
                // The log holds writes the members lack. Its CP thread goes on keeping the
                // partner's mirror of it current (no more CPs): the partner, which refuses to
                // take over from a stale mirror, then can. A retried close or a halt ends it.
                tracing::error!(error = %e, "final CP failed: the log stays, mirrored to the partner");
                self.mirror_only.store(true, Ordering::Release);
            }
        }
        self.kick_cp();
        r
    }
}

/// What the CP thread was woken for.
#[derive(Default)]
struct Kick {
    /// Run a consistency point.
    cp: bool,
    /// Resynchronise the mirror (it always checks; this only wakes it early).
    mirror: bool,
}

fn cp_thread(j: std::sync::Weak<Journal>) {
    let mut last_cp = Instant::now();
    loop {
        let Some(journal) = j.upgrade() else { return };
        if journal.stop.load(Ordering::Acquire) {
            return;
        }
        // Wake often enough to resynchronise a returning partner's mirror promptly, whatever
        // the CP interval.
        let tick = journal.cfg.cp_interval.min(Duration::from_millis(200));
        let kicked = {
            let (m, cv) = &journal.cp_kick;
            let g = m.lock().unwrap();
            let (mut g, _) = cv
                .wait_timeout_while(g, tick, |k| !k.cp && !k.mirror)
                .unwrap();
            std::mem::take(&mut *g).cp
        };
        if journal.stop.load(Ordering::Acquire) {
            return;
        }
        if let Err(e) = journal.ensure_mirrored() {
            tracing::warn!(error = %e, "mirror resync failed");
        }
        journal.sync_unmirrored_flag();
        if journal.mirror_only.load(Ordering::Acquire) {
            continue;
        }
        if !kicked && last_cp.elapsed() < journal.cfg.cp_interval {
            continue;
        }
        last_cp = Instant::now();
        if let Err(e) = journal.checkpoint() {
            tracing::error!(error = %e, "consistency point failed; retrying");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl From<JournalError> for BackendError {
    fn from(e: JournalError) -> BackendError {
        match e {
            JournalError::Aggregate(a) => a.into(),
            other => BackendError::Io(other.to_string()),
        }
    }
}

impl Backend for Journal {
    fn size_bytes(&self) -> u64 {
        self.agg.size_bytes()
    }
    fn block_sizes(&self) -> BlockSizes {
        let mut b = self.agg.block_sizes();
        // A record must fit the ring with room to spare.
        let cap = (self.region_bytes / 8).next_power_of_two() as u32 / 2;
        b.max_bytes = b.max_bytes.min(cap.max(b.min_bytes));
        b.preferred_bytes = b.preferred_bytes.min(b.max_bytes);
        b
    }
    fn multi_conn_safe(&self) -> bool {
        true
    }
    fn alloc(&self, len: usize) -> IoBuf {
        self.agg.alloc(len)
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        Journal::read(self, offset, buf).map_err(Into::into)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BackendError> {
        Journal::write(self, offset, data, fua)?;
        self.not_halted()
    }
    fn batches_reads(&self) -> bool {
        true
    }
    fn read_batch(&self, reads: &mut [(u64, &mut [u8])]) -> Result<(), BackendError> {
        Journal::read_batch(self, reads).map_err(Into::into)
    }
    fn start_write(&self, offset: u64, data: &[u8]) -> Result<Option<u64>, BackendError> {
        Journal::try_append(self, offset, data).map_err(Into::into)
    }
    fn finish_writes(&self, upto: u64, fua: bool) -> Result<(), BackendError> {
        Journal::finish_writes(self, upto, fua)?;
        self.not_halted()
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), BackendError> {
        self.agg.check(offset, len).map_err(BackendError::from)?;
        let piece = self.block_sizes().max_bytes as u64;
        let zeros = vec![0u8; piece.min(len) as usize];
        let mut pos = offset;
        while pos < offset + len {
            let n = piece.min(offset + len - pos);
            Backend::write(self, pos, &zeros[..n as usize], fua)?;
            pos += n;
        }
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.agg.check(offset, len).map_err(BackendError::from)
    }
    fn flush(&self) -> Result<(), BackendError> {
        Journal::flush(self)?;
        self.not_halted()
    }
}

/// The partner's log as this node keeps it: a byte copy, written back to the device before it is
/// acknowledged (no device cache flush: a client's FLUSH flushes the partner's own copy, and the
/// mirror matters while this node lives).
pub struct MirrorRegion {
    region: Mutex<NvramRegion>,
}

impl MirrorRegion {
    /// Wrap the mirror region.
    pub fn new(region: NvramRegion) -> MirrorRegion {
        MirrorRegion {
            region: Mutex::new(region),
        }
    }

    /// Apply a batch from the partner; returns the seq to acknowledge. A segment outside the
    /// region is refused and nothing of the batch is applied.
    pub fn apply(&self, recs: &LogRecords) -> Result<u64, JournalError> {
        let mut r = self.region.lock().unwrap();
        let len = r.len() as u64;
        if let Some(bad) = recs.segments.iter().find(|s| {
            s.region_offset
                .checked_add(s.bytes.len() as u64)
                .is_none_or(|e| e > len)
        }) {
            return Err(JournalError::Log(format!(
                "mirror segment at {} of {} bytes is outside the {len}-byte region",
                bad.region_offset,
                bad.bytes.len()
            )));
        }
        let mut ranges: Vec<Range<usize>> = Vec::new();
        for s in &recs.segments {
            let a = s.region_offset as usize;
            r.bytes_mut()[a..a + s.bytes.len()].copy_from_slice(&s.bytes);
            ranges.push(a..a + s.bytes.len());
        }
        r.write_back(&ranges)?;
        Ok(recs.last_seq)
    }

    /// Forget what the mirror holds, durably (an empty log of `aggregate` in its place): the
    /// partner's aggregate was closed cleanly, so the log has nothing the members lack and
    /// may hold older data.
    pub fn discard(&self, aggregate: uuid::Uuid) -> Result<(), JournalError> {
        format_empty(&mut self.region.lock().unwrap(), aggregate)
    }

    /// Give the region back (a takeover turns the mirror into the partner aggregate's log).
    pub fn into_region(self) -> NvramRegion {
        self.region.into_inner().unwrap()
    }

    /// A copy of the mirror's bytes (for replay at takeover).
    pub fn snapshot(&self) -> Vec<u8> {
        self.region.lock().unwrap().bytes().to_vec()
    }

    /// Persistence of the mirror region.
    pub fn persistence(&self) -> String {
        self.region.lock().unwrap().persistence().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::aggregate::tests::{assert_parity, mem_aggregate, MemDisks};
    use std::path::Path;

    /// A link to an in-process mirror: a test double beside the real TCP link.
    struct LocalLink {
        mirror: MirrorRegion,
        up: AtomicBool,
        /// Accept records but never apply or acknowledge them (a partner that went quiet).
        blackhole: AtomicBool,
        acked: Mutex<(u64, u64)>,
        cv: Condvar,
        /// The session number: a reconnect is a new one.
        session: AtomicU64,
    }

    impl LocalLink {
        /// Up, acknowledging, with its mirror region in `dir`.
        fn new(dir: &Path) -> Arc<LocalLink> {
            Arc::new(LocalLink {
                mirror: MirrorRegion::new(region(dir, "mirror")),
                up: AtomicBool::new(true),
                blackhole: AtomicBool::new(false),
                acked: Mutex::new((0, 0)),
                cv: Condvar::new(),
                session: AtomicU64::new(1),
            })
        }
    }

    impl MirrorLink for LocalLink {
        fn session(&self) -> Option<u64> {
            self.up
                .load(Ordering::Acquire)
                .then(|| self.session.load(Ordering::Acquire))
        }
        fn send_records(&self, session: u64, records: LogRecords) -> bool {
            if self.session() != Some(session) {
                return false;
            }
            if self.blackhole.load(Ordering::Acquire) {
                return true;
            }
            let seq = self.mirror.apply(&records).unwrap();
            let mut a = self.acked.lock().unwrap();
            *a = if a.0 == records.epoch {
                (a.0, a.1.max(seq))
            } else {
                (records.epoch, seq)
            };
            self.cv.notify_all();
            true
        }
        fn wait_ack(&self, session: u64, epoch: u64, seq: u64, timeout: Duration) -> bool {
            let a = self.acked.lock().unwrap();
            let ok = |a: &(u64, u64)| self.session() == Some(session) && a.0 == epoch && a.1 >= seq;
            let (a, _) = self
                .cv
                .wait_timeout_while(a, timeout, |a| !ok(a) && self.is_up())
                .unwrap();
            ok(&a)
        }
    }

    const REGION: u64 = 4 << 20;

    fn region(dir: &Path, name: &str) -> NvramRegion {
        NvramRegion::open(&dir.join(name), REGION).unwrap()
    }

    fn pattern(len: usize, seed: u64) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u64 * 131 + seed * 7919) as u8)
            .collect()
    }

    /// A journal (`slow_cp`) over an in-memory aggregate of `data` data members (4 KiB
    /// chunks, `stripes` stripes), its NVRAM region in the returned directory.
    fn slow_journal(
        data: usize,
        stripes: u64,
    ) -> (
        tempfile::TempDir,
        Arc<Aggregate>,
        Arc<MemDisks>,
        Arc<Journal>,
    ) {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let (agg, disks) = mem_aggregate(data, 4096, stripes);
        let agg = Arc::new(agg);
        let (j, _) = Journal::open(agg.clone(), region(dir.path(), "local"), slow_cp()).unwrap();
        (dir, agg, disks, j)
    }

    fn slow_cp() -> JournalConfig {
        JournalConfig {
            cp_fill_percent: 90,
            cp_interval: Duration::from_secs(3600),
            flush_every_commit: false,
        }
    }

    #[test]
    fn reads_see_the_log_then_the_aggregate_after_a_cp() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let (agg, disks) = mem_aggregate(4, 4096, 16);
        let agg = Arc::new(agg);
        let (j, s) = Journal::open(agg.clone(), region(dir.path(), "l"), slow_cp()).unwrap();
        assert!(s.fresh);
        let d = pattern(3 * 4096, 1);
        j.write(8192, &d, false).unwrap();
        let mut b = IoBuf::new(3 * 4096);
        j.read(8192, &mut b).unwrap();
        assert!(b[..] == d[..], "read through the journal sees the log");
        let mut raw = IoBuf::new(3 * 4096);
        agg.read(8192, &mut raw).unwrap();
        assert!(raw[..] != d[..], "not on the members before a CP");
        j.checkpoint().unwrap();
        agg.read(8192, &mut raw).unwrap();
        assert!(raw[..] == d[..], "on the members after a CP");
        j.read(8192, &mut b).unwrap();
        assert!(b[..] == d[..]);
        assert_parity(&disks, 4, 4096 * 16);
        assert_eq!(j.mirror_state(), MirrorState::NoPartner);
    }

    /// The log's file as the device holds it (O_DIRECT: past the page cache).
    fn log_on_device(dir: &Path, name: &str) -> Vec<u8> {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(dir.join(name))
            .unwrap();
        let len = f.metadata().unwrap().len() as usize;
        let mut b = IoBuf::new(len);
        f.read_exact(&mut b[..]).unwrap();
        b.to_vec()
    }

    #[test]
    fn writes_reach_the_log_device_before_the_ack_and_flush_or_fua_flush_its_cache() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let (agg, _disks) = mem_aggregate(4, 4096, 16);
        let (j, _) = Journal::open(Arc::new(agg), region(dir.path(), "l"), slow_cp()).unwrap();
        assert!(
            j.persistence()
                .ends_with("direct I/O, device cache flushed on client FLUSH/FUA"),
            "{}",
            j.persistence()
        );
        let d = pattern(4096, 42);
        let find = |hay: &[u8]| hay.windows(d.len()).any(|w| w == &d[..]);
        assert!(!find(&log_on_device(dir.path(), "l")));
        j.write(0, &d, false).unwrap();
        assert!(
            find(&log_on_device(dir.path(), "l")),
            "acknowledged means on the log's device"
        );
        assert_eq!(
            j.stats.device_flushes.load(Ordering::Relaxed),
            0,
            "no cache flush without FLUSH or FUA"
        );
        Backend::flush(&*j).unwrap();
        assert_eq!(j.stats.device_flushes.load(Ordering::Relaxed), 1);
        Backend::flush(&*j).unwrap();
        assert_eq!(
            j.stats.device_flushes.load(Ordering::Relaxed),
            1,
            "nothing new to flush"
        );
        j.write(4096, &pattern(4096, 43), true).unwrap();
        assert_eq!(
            j.stats.device_flushes.load(Ordering::Relaxed),
            2,
            "FUA flushes"
        );
        j.write(8192, &pattern(4096, 44), false).unwrap();
        Backend::flush(&*j).unwrap();
        assert_eq!(j.stats.device_flushes.load(Ordering::Relaxed), 3);
        drop(j);

        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let (agg, _disks) = mem_aggregate(4, 4096, 16);
        let cfg = JournalConfig {
            flush_every_commit: true,
            ..slow_cp()
        };
        let (j, _) = Journal::open(Arc::new(agg), region(dir.path(), "l"), cfg).unwrap();
        assert!(
            j.persistence()
                .ends_with("device cache flushed every commit"),
            "{}",
            j.persistence()
        );
        j.write(0, &d, true).unwrap();
        Backend::flush(&*j).unwrap();
        assert_eq!(
            j.stats.device_flushes.load(Ordering::Relaxed),
            0,
            "every commit was flushed already"
        );
        assert!(find(&log_on_device(dir.path(), "l")));
    }

    #[test]
    fn concurrent_writers_share_group_commits_and_a_full_log_waits_for_cps() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let (agg, disks) = mem_aggregate(4, 32768, 32);
        let agg = Arc::new(agg);
        // A small log: 64 KiB writes (half stripes: logged) fill it many times over.
        let r = NvramRegion::open(&dir.path().join("small"), 1 << 20).unwrap();
        let (j, _) = Journal::open(
            agg.clone(),
            r,
            JournalConfig {
                cp_fill_percent: 50,
                cp_interval: Duration::from_millis(50),
                flush_every_commit: false,
            },
        )
        .unwrap();
        let size = agg.geometry().size_bytes();
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let j = &j;
                s.spawn(move || {
                    let region = size / 8;
                    for i in 0..40u64 {
                        let off = t * region + (i * 65536) % (region - 65536);
                        j.write(off, &pattern(65536, t * 1000 + i), false).unwrap();
                    }
                });
            }
        });
        let appended = j.stats.appended.load(Ordering::Relaxed);
        let commits = j.stats.group_commits.load(Ordering::Relaxed);
        assert_eq!(appended, 320);
        assert!(
            commits < appended,
            "group commit: {commits} commits for {appended} writes"
        );
        assert!(
            j.stats.cps.load(Ordering::Relaxed) > 1,
            "the log filled and CPs freed it"
        );
        // Every thread's last write to each offset reads back.
        for t in 0..8u64 {
            let region = size / 8;
            let mut last = std::collections::BTreeMap::new();
            for i in 0..40u64 {
                last.insert(t * region + (i * 65536) % (region - 65536), t * 1000 + i);
            }
            for (off, seed) in last {
                let mut b = IoBuf::new(65536);
                j.read(off, &mut b).unwrap();
                assert!(b[..] == pattern(65536, seed)[..], "thread {t} offset {off}");
            }
        }
        j.close().unwrap();
        assert_parity(&disks, 4, 16384 * 64);
    }

    fn reopen(disks: &Arc<MemDisks>) -> Arc<Aggregate> {
        use crate::daemon::aggregate::tests::MemEngine;
        use crate::daemon::aggregate::EngineFactory;
        let d = disks.clone();
        let factory: EngineFactory = Arc::new(move || {
            Ok(Box::new(MemEngine(d.clone())) as Box<dyn crate::io::engine::Engine>)
        });
        let paths = (0..disks.data.lock().unwrap().len())
            .map(|i| format!("mem{i}"))
            .collect();
        Arc::new(
            Aggregate::assemble(
                paths,
                factory,
                crate::io::buf::BufArena::new(4 << 20),
                4096,
                1 << 20,
            )
            .unwrap()
            .0,
        )
    }

    #[test]
    fn replay_after_a_crash_redoes_the_log_and_repairs_parity() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let (agg, disks) = mem_aggregate(3, 4096, 16);
        let agg = Arc::new(agg);
        let mut model = vec![0u8; agg.geometry().size_bytes() as usize];
        {
            let (j, _) = Journal::open(agg.clone(), region(dir.path(), "l"), slow_cp()).unwrap();
            for i in 0..30u64 {
                let off = (i * 7 % 40) * 4096;
                let d = pattern(4096 * (1 + i as usize % 3), i);
                j.write(off, &d, false).unwrap();
                model[off as usize..off as usize + d.len()].copy_from_slice(&d);
            }
            // Crash: no CP, no close. The journal and aggregate are simply dropped.
        }
        drop(agg);
        // A torn stripe write: parity of stripe 2 no longer matches.
        {
            let mut d = disks.data.lock().unwrap();
            let off = crate::core::label::DATA_OFFSET_BYTES as usize + 2 * 4096 + 100;
            d[3][off] ^= 0x5a;
        }
        let agg = reopen(&disks);
        let (j, s) = Journal::open(agg.clone(), region(dir.path(), "l"), slow_cp()).unwrap();
        assert!(!s.fresh);
        assert_eq!(s.replayed_records, 30);
        assert_eq!(s.discarded_torn + s.discarded_unacked, 0);
        let mut all = IoBuf::new(model.len());
        agg.read(0, &mut all).unwrap();
        assert!(
            all[..] == model[..],
            "replay put every acknowledged write on the members"
        );
        assert_parity(&disks, 3, 4096 * 16);
        // The new log starts empty: a second reopen replays nothing.
        drop(j);
        let agg2 = reopen(&disks);
        let (_j, s) = Journal::open(agg2, region(dir.path(), "l"), slow_cp()).unwrap();
        assert_eq!(s.replayed_records, 0);
    }

    #[test]
    fn whole_stripe_writes_skip_the_log_unless_it_holds_their_stripes_and_replay_repairs_them() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let (agg, disks) = mem_aggregate(3, 4096, 16);
        let agg = Arc::new(agg);
        let sb = agg.geometry().stripe_bytes();
        let mut model = vec![0u8; agg.geometry().size_bytes() as usize];
        let put = |model: &mut Vec<u8>, off: u64, d: &[u8]| {
            model[off as usize..off as usize + d.len()].copy_from_slice(d)
        };
        {
            let (j, _) = Journal::open(agg.clone(), region(dir.path(), "l"), slow_cp()).unwrap();
            let small = pattern(4096, 1);
            j.write(5 * sb, &small, false).unwrap();
            put(&mut model, 5 * sb, &small);
            let big = pattern(2 * sb as usize, 2);
            j.write(sb, &big, false).unwrap();
            put(&mut model, sb, &big);
            assert_eq!(j.stats.direct_writes.load(Ordering::Relaxed), 1);
            assert_eq!(j.stats.direct_bytes.load(Ordering::Relaxed), 2 * sb);
            let log = log_on_device(dir.path(), "l");
            assert!(
                !log.windows(4096).any(|w| w == &big[..4096]),
                "its data is not in the log"
            );
            let mut b = IoBuf::new(big.len());
            agg.read(sb, &mut b).unwrap();
            assert!(b[..] == big[..], "on the members at once");
            // A whole stripe the log holds data of: logged, or a CP would undo it.
            let over = pattern(sb as usize, 3);
            j.write(5 * sb, &over, false).unwrap();
            put(&mut model, 5 * sb, &over);
            assert_eq!(j.stats.direct_fallbacks.load(Ordering::Relaxed), 1);
            assert_eq!(j.stats.direct_writes.load(Ordering::Relaxed), 1);
            let mut b = IoBuf::new(sb as usize);
            j.read(5 * sb, &mut b).unwrap();
            assert!(b[..] == over[..]);
            Backend::flush(&*j).unwrap();
            // Crash: no CP, no close.
        }
        drop(agg);
        // The direct write was torn: parity of stripe 1 no longer matches its data.
        {
            let mut d = disks.data.lock().unwrap();
            let off = crate::core::label::DATA_OFFSET_BYTES as usize + 4096 + 7;
            d[3][off] ^= 0xff;
        }
        let agg = reopen(&disks);
        let (_j, s) = Journal::open(agg.clone(), region(dir.path(), "l"), slow_cp()).unwrap();
        assert_eq!(s.resynced_stripe_records, 1);
        assert_eq!(s.replayed_records, 2);
        let mut all = IoBuf::new(model.len());
        agg.read(0, &mut all).unwrap();
        assert!(all[..] == model[..]);
        assert_parity(&disks, 3, 4096 * 16);
    }

    #[test]
    fn mirror_holds_every_acknowledged_write_and_replays_elsewhere() {
        let (dir, agg, _disks, j) = slow_journal(4, 32);
        let link = LocalLink::new(dir.path());
        j.set_mirror(Some(link.clone()));
        let mut model = vec![0u8; agg.geometry().size_bytes() as usize];
        let mut write = |i: u64| {
            let off = (i * 13 % 100) * 4096;
            let d = pattern(8192, i);
            j.write(off, &d, false).unwrap();
            model[off as usize..off as usize + 8192].copy_from_slice(&d);
        };
        for i in 0..20 {
            write(i);
        }
        assert_eq!(j.mirror_state(), MirrorState::Mirrored);
        // The partner goes away: writes continue, status says so.
        link.up.store(false, Ordering::Release);
        for i in 20..30 {
            write(i);
        }
        assert!(
            matches!(j.mirror_state(), MirrorState::NotMirrored { .. }),
            "{:?}",
            j.mirror_state()
        );
        // It comes back: the next commit resynchronises the whole log first.
        link.up.store(true, Ordering::Release);
        for i in 30..40 {
            write(i);
        }
        assert_eq!(j.mirror_state(), MirrorState::Mirrored);
        j.checkpoint().unwrap();
        for i in 40..50 {
            write(i);
        }
        // Takeover: the partner replays our log from its mirror onto the shared aggregate, as
        // it stands on the members (the CP put 0..40 there), and must see everything.
        let snap = link.mirror.snapshot();
        let s = replay_region(&agg, &snap).unwrap();
        assert_eq!(
            s.replayed_records, 10,
            "only what the mirror holds past the last trim"
        );
        let mut all = IoBuf::new(model.len());
        agg.read(0, &mut all).unwrap();
        assert!(
            all[..] == model[..],
            "the mirror held every acknowledged write"
        );
    }
    #[test]
    fn no_unmirrored_ack_before_the_mailbox_says_so() {
        let (dir, _agg, _disks, j) = slow_journal(2, 16);
        let link = LocalLink::new(dir.path());
        j.set_mirror(Some(link.clone()));
        // (value recorded, whether the recording succeeded)
        let calls: Arc<Mutex<Vec<(bool, bool)>>> = Arc::default();
        let fail = Arc::new(AtomicBool::new(false));
        {
            let (calls, fail) = (calls.clone(), fail.clone());
            j.set_unmirrored_hook(Some(Box::new(move |on| {
                let failing = fail.load(Ordering::Acquire);
                calls.lock().unwrap().push((on, !failing));
                if failing {
                    Err("mailbox unwritable".into())
                } else {
                    Ok(())
                }
            })));
        }
        j.write(0, &pattern(4096, 1), false).unwrap();
        assert!(
            calls.lock().unwrap().is_empty(),
            "mirrored: nothing to record"
        );
        // The partner goes away and the mailbox cannot record it: the write is refused.
        link.up.store(false, Ordering::Release);
        fail.store(true, Ordering::Release);
        assert!(
            j.write(4096, &pattern(4096, 2), false).is_err(),
            "no unmirrored acknowledgement without the mailbox flag"
        );
        // With the mailbox writable, the flag is recorded first, then writes go on.
        fail.store(false, Ordering::Release);
        j.write(8192, &pattern(4096, 3), false).unwrap();
        j.write(12288, &pattern(4096, 4), false).unwrap();
        // Failed attempts (the refused write's; the CP thread's resync may try too while the
        // mailbox fails), then one successful recording, not one per write.
        {
            let c = calls.lock().unwrap();
            assert!(c.iter().all(|&(on, _)| on), "{c:?}");
            assert!(!c[0].1, "the refused write's attempt failed: {c:?}");
            assert_eq!(c.iter().filter(|&&(_, ok)| ok).count(), 1, "{c:?}");
            assert!(c.last().unwrap().1, "{c:?}");
        }
        // Back, resynchronised: the flag is cleared.
        link.up.store(true, Ordering::Release);
        j.write(16384, &pattern(4096, 5), false).unwrap();
        assert_eq!(j.mirror_state(), MirrorState::Mirrored);
        assert_eq!(calls.lock().unwrap().last(), Some(&(false, true)));
    }

    #[test]
    fn an_acknowledgement_of_an_earlier_log_epoch_never_counts() {
        // A node's log restarts its sequence numbers at every format (a restart, a giveback).
        // The partner's acknowledgements of the old log must not acknowledge the new one.
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let (agg, _disks) = mem_aggregate(2, 4096, 16);
        let agg = Arc::new(agg);
        let link = LocalLink::new(dir.path());
        {
            let (j, _) =
                Journal::open(agg.clone(), region(dir.path(), "local"), slow_cp()).unwrap();
            j.set_mirror(Some(link.clone()));
            for i in 0..20 {
                j.write(i * 4096, &pattern(4096, i), false).unwrap();
            }
            assert_eq!(j.mirror_state(), MirrorState::Mirrored);
            j.close().unwrap();
        }
        // The partner now takes records without acknowledging them.
        link.blackhole.store(true, Ordering::Release);
        let (j, _) = Journal::open(agg.clone(), region(dir.path(), "local"), slow_cp()).unwrap();
        j.set_mirror(Some(link.clone()));
        j.write(0, &pattern(4096, 99), false).unwrap();
        assert!(
            matches!(j.mirror_state(), MirrorState::NotMirrored { .. }),
            "seq 1 of the new log was taken as mirrored on the strength of the old log's acks"
        );
    }

    /// One group commit can hold several large writes in one contiguous range: its mirror
    /// traffic is cut by bytes, not only by segment count (a 9 MiB segment used to make one
    /// message over the interconnect's frame limit: never sent, the mirror dropped out under
    /// sequential writes). Only the last message carries the commit's sequence number.
    #[test]
    fn mirror_messages_fit_the_frame_limit_and_only_the_last_vouches() {
        use crate::core::interconnect::{Message, Session};
        let big = LogSegment {
            region_offset: 4096,
            bytes: pattern(9 << 20, 1),
        };
        let small: Vec<LogSegment> = (0..100u64)
            .map(|i| LogSegment {
                region_offset: (16 << 20) + i * 8192,
                bytes: pattern(4096, i),
            })
            .collect();
        let input: Vec<LogSegment> = std::iter::once(big).chain(small).collect();
        let msgs = mirror_messages(7, 3, 99, input.clone());
        assert!(msgs.len() >= 4, "{}", msgs.len());
        let key = b"0123456789abcdef-test-key";
        let mut session = Session::new(key, [1; 16]).unwrap();
        let mut peer = Session::new(key, [2; 16]).unwrap();
        let hello = |n: u8, s: &Session| {
            Message::Hello(crate::core::interconnect::Hello {
                node_id: n,
                software_version: 1,
                capabilities: 0,
                nonce: s.local_nonce(),
            })
        };
        let h = peer.encode(&hello(1, &peer)).unwrap();
        session.decode(&h).unwrap();
        for (i, m) in msgs.iter().enumerate() {
            let bytes: usize = m.segments.iter().map(|s| s.bytes.len()).sum();
            assert!(bytes <= MIRROR_MESSAGE_BYTES && m.segments.len() <= MAX_SEGMENTS);
            assert_eq!(m.last_seq, if i + 1 == msgs.len() { 99 } else { 0 });
            assert_eq!((m.epoch, m.first_seq), (7, 3));
            session
                .encode(&Message::LogRecords(m.clone()))
                .expect("fits a frame");
        }
        // Together they carry exactly the input, in order.
        let mut flat: Vec<(u64, u8)> = Vec::new();
        for s in msgs.iter().flat_map(|m| &m.segments) {
            flat.extend(
                s.bytes
                    .iter()
                    .enumerate()
                    .map(|(k, b)| (s.region_offset + k as u64, *b)),
            );
        }
        let want: Vec<(u64, u8)> = input
            .iter()
            .flat_map(|s| {
                s.bytes
                    .iter()
                    .enumerate()
                    .map(move |(k, b)| (s.region_offset + k as u64, *b))
            })
            .collect();
        assert!(flat == want);
    }

    /// Status shows how much of the log is in use: it grows with writes and a CP gives the
    /// space back.
    #[test]
    fn usage_grows_with_writes_and_a_cp_gives_it_back() {
        let (_dir, _agg, _disks, j) = slow_journal(4, 32);
        let (empty, total) = j.usage();
        assert_eq!(total, REGION);
        for i in 0..8u64 {
            j.write(i * 8192, &pattern(8192, i), false).unwrap();
        }
        let (used, _) = j.usage();
        assert!(used >= empty + 8 * 8192, "{empty} -> {used}");
        j.checkpoint().unwrap();
        let (after, _) = j.usage();
        assert!(after < empty + 8192, "a CP trims: {used} -> {after}");
    }

    /// A final CP that fails leaves the log holding writes the members lack; the partner
    /// refuses to take over from a stale mirror, so the log goes on keeping the mirror
    /// current (no more CPs). It used to stop everything: the mirror never caught up and
    /// nobody could serve the aggregate until an operator restarted the node.
    #[test]
    fn a_failed_final_cp_keeps_the_mirror_current() {
        let (dir, _agg, disks, j) = slow_journal(4, 32);
        let link = LocalLink::new(dir.path());
        link.up.store(false, Ordering::SeqCst);
        j.set_mirror(Some(link.clone()));
        for i in 0..6u64 {
            j.write(i * 8192, &pattern(8192, i), false).unwrap(); // local only: link down
        }
        disks.failed.lock().unwrap().extend([0, 1]);
        assert!(j.close().is_err(), "two members gone: the final CP fails");
        link.up.store(true, Ordering::SeqCst);
        let t0 = Instant::now();
        while j.mirror_state() != MirrorState::Mirrored {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "{:?}",
                j.mirror_state()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The mirror alone has every write.
        let snap = link.mirror.snapshot();
        let (agg2, _) = mem_aggregate(4, 4096, 32);
        replay_region(&agg2, &snap).unwrap();
        for i in 0..6u64 {
            let mut b = IoBuf::new(8192);
            agg2.read(i * 8192, &mut b).unwrap();
            assert!(b[..] == pattern(8192, i)[..], "write {i}");
        }
    }

    /// A halting node acknowledges nothing more, not even a write whose commit was under way:
    /// the partner replays what its mirror held when it took over. Here the partner stopped
    /// acknowledging (it took the mirror for its replay): without the halt the write would be
    /// acknowledged on the local log alone after the mirror's timeout.
    #[test]
    fn a_halted_journal_acknowledges_nothing_more() {
        let (dir, agg, disks, j) = slow_journal(4, 32);
        let link = LocalLink::new(dir.path());
        j.set_mirror(Some(link.clone()));
        Backend::write(&*j, 0, &pattern(4096, 1), false).unwrap();
        link.blackhole.store(true, Ordering::Release);
        let j2 = j.clone();
        let writer =
            std::thread::spawn(move || Backend::write(&*j2, 4096, &pattern(4096, 2), false));
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            !writer.is_finished(),
            "waiting for the mirror's acknowledgement"
        );
        j.halt("test");
        let r = writer.join().unwrap();
        assert!(r.is_err(), "acknowledged after the halt: {r:?}");
        let r = Backend::write(&*j, 8192, &pattern(4096, 3), false);
        assert!(r.is_err(), "{r:?}");
        assert!(Backend::flush(&*j).is_err());
        assert!(j.is_halted());
        // The CP thread stopped and a CP writes nothing: the members keep what they had.
        agg.halt("test", Duration::from_secs(1));
        let before = disks.data.lock().unwrap().clone();
        assert!(j.checkpoint().is_err());
        assert!(*disks.data.lock().unwrap() == before);
    }

    /// A CP's trim reaches the partner's mirror with the next commit of new records, checked
    /// by that commit's acknowledgement. A trim message of its own, lost on the way while its
    /// "acknowledgement" (of a sequence number already acknowledged) said yes, left the mirror
    /// with the old records: a takeover replayed a logged write over the acknowledged direct
    /// write that followed it.
    #[test]
    fn a_trim_reaches_the_mirror_with_the_next_records() {
        let (dir, agg, _disks, j) = slow_journal(4, 32);
        let link = LocalLink::new(dir.path());
        j.set_mirror(Some(link.clone()));
        let sb = agg.geometry().stripe_bytes() as usize;
        let old = pattern(8192, 1);
        j.write(0, &old, false).unwrap(); // logged, mirrored
        assert_eq!(j.mirror_state(), MirrorState::Mirrored);
        // Whatever the CP sends the partner is lost (the link still says it was sent).
        link.blackhole.store(true, Ordering::Release);
        j.checkpoint().unwrap();
        link.blackhole.store(false, Ordering::Release);
        let new = pattern(sb, 2);
        j.write(0, &new, false).unwrap(); // a whole stripe: written directly
        assert_eq!(j.stats.direct_writes.load(Ordering::Relaxed), 1);
        assert_eq!(j.mirror_state(), MirrorState::Mirrored);
        // The node dies; the partner replays its mirror.
        let snap = link.mirror.snapshot();
        replay_region(&agg, &snap).unwrap();
        let mut b = IoBuf::new(sb);
        agg.read(0, &mut b).unwrap();
        assert!(
            b[..] == new[..],
            "the acknowledged direct write survives the takeover's replay"
        );
    }

    /// A group commit whose NVRAM write fails is not acknowledged, and neither is anything
    /// after it: its records were taken off the appender's list of what to write, so a later
    /// commit would have acknowledged them unwritten. Replay then finds every acknowledged
    /// record.
    #[test]
    fn a_failed_log_write_fails_every_later_write() {
        let (_dir, agg, _disks, j) = slow_journal(4, 32);
        j.write(0, &pattern(4096, 1), false).unwrap();
        j.fail_log_writes.store(1, Ordering::SeqCst);
        assert!(j.write(8192, &pattern(4096, 2), false).is_err());
        assert_eq!(
            j.fail_log_writes.load(Ordering::SeqCst),
            0,
            "the failure was used"
        );
        let later = j.write(3 * 4096, &pattern(4096, 3), false);
        assert!(
            later.is_err(),
            "a later write is not acknowledged over the unwritten record"
        );
        // A FLUSH still covers what was acknowledged (the first write): it may succeed.
        // What the log holds replays: the first write, acknowledged, is there.
        let snap = j.inner.lock().unwrap().region.bytes().to_vec();
        let s = replay_region(&agg, &snap).unwrap();
        assert!(s.replayed_records >= 1, "{s:?}");
        let mut b = IoBuf::new(4096);
        agg.read(0, &mut b).unwrap();
        assert!(b[..] == pattern(4096, 1)[..]);
    }

    /// After a log write failed, a CP still puts what the log acknowledged on the members
    /// (it is durable in the log and the cache, maybe nowhere else), without the Checkpoint
    /// record the failed log cannot take. (It refused, for the record, after the record was
    /// introduced.)
    #[test]
    fn a_failed_log_still_lets_a_cp_save_what_it_acknowledged() {
        let (_dir, agg, _disks, j) = slow_journal(4, 32);
        j.write(0, &pattern(4096, 1), false).unwrap();
        j.fail_log_writes.store(1, Ordering::SeqCst);
        assert!(j.write(8192, &pattern(4096, 2), false).is_err());
        j.checkpoint().unwrap();
        let mut b = IoBuf::new(4096);
        agg.read(0, &mut b).unwrap();
        assert!(
            b[..] == pattern(4096, 1)[..],
            "the acknowledged write is on the members"
        );
    }

    /// Two FLUSHes at once: the second returns only after a member flush that started after
    /// the direct write it covers, never while the first one's is still running.
    #[test]
    fn concurrent_flushes_each_wait_for_a_member_flush() {
        let (_dir, agg, disks, j) = slow_journal(4, 32);
        let sb = agg.geometry().stripe_bytes() as usize;
        j.write(0, &pattern(sb, 1), false).unwrap(); // a whole stripe, not FUA: direct
        assert_eq!(j.stats.direct_writes.load(Ordering::Relaxed), 1);
        disks.flush_delay_ms.store(400, Ordering::SeqCst);
        let before = disks.flushes_started.load(Ordering::SeqCst);
        std::thread::scope(|s| {
            let first = s.spawn(|| j.flush());
            // The first FLUSH is inside its member flush.
            let t0 = Instant::now();
            while disks.flushes_started.load(Ordering::SeqCst) == before {
                assert!(t0.elapsed() < Duration::from_secs(10));
                std::thread::sleep(Duration::from_millis(1));
            }
            let done_before = disks.flushes_done.load(Ordering::SeqCst);
            j.flush().unwrap();
            assert!(
                disks.flushes_done.load(Ordering::SeqCst) > done_before,
                "the second FLUSH returned while the members' caches were still being flushed"
            );
            first.join().unwrap().unwrap();
        });
    }

    /// `write_hole` row by row: which blocks of a missing member a CP in flight leaves
    /// unrecoverable.
    #[test]
    fn write_hole_names_unwritten_blocks_of_stripes_a_cp_in_flight_wrote_partly() {
        use crate::core::nvlog::{scan, Expect, LogAppender};
        let agg = uuid::Uuid::from_bytes([3; 16]);
        let geo = Geometry::new(4, 4096, 4096 * 16).unwrap();
        let sb = geo.stripe_bytes();
        let mut region = vec![0u8; 1 << 16];
        let mut log = LogAppender::format(&mut region, agg, 1, 9).unwrap();
        let replay = |region: &[u8]| {
            scan(
                region,
                &Expect {
                    aggregate: agg,
                    generation: 1,
                },
            )
            .unwrap()
        };
        // Member 0, columns 0..1024 of stripe 0; a whole stripe 1; member 2, columns
        // 2048..3072 of stripe 2.
        log.append(&mut region, 0, &[1; 1024]).unwrap();
        log.append(&mut region, sb, &vec![2; sb as usize]).unwrap();
        log.append(&mut region, 2 * sb + 2 * 4096 + 2048, &[3; 1024])
            .unwrap();
        log.commit();
        assert_eq!(
            write_hole(&geo, 1, &replay(&region)),
            vec![],
            "no CP in flight"
        );
        log.append_checkpoint(&mut region, 3).unwrap();
        // Written after the CP started: member 1, columns 512..1024 of stripe 0.
        log.append(&mut region, 4096 + 512, &[4; 512]).unwrap();
        log.commit();
        let r = replay(&region);
        assert_eq!(
            write_hole(&geo, 1, &r),
            vec![(0, 0, 512), (2, 2048, 3072)],
            "what the log covers of member 1 replays from the log; the whole stripe is logged"
        );
        assert_eq!(write_hole(&geo, 0, &r), vec![(2, 2048, 3072)]);
        assert_eq!(write_hole(&geo, 2, &r), vec![(0, 0, 1024)]);
        assert_eq!(write_hole(&geo, 4, &r), vec![], "the parity member");
    }

    /// Five loop devices with direct I/O over backing files in a directory of /var/tmp (4 data
    /// members and parity), detached on drop; their aggregate (64 KiB chunks) logs to an
    /// NVRAM file there.
    struct LoopRig {
        devs: Vec<String>,
        dir: tempfile::TempDir,
    }

    impl LoopRig {
        fn new() -> LoopRig {
            // SAFETY: geteuid has no preconditions.
            let euid = unsafe { libc::geteuid() };
            assert_eq!(euid, 0, "this test needs root (loop devices)");
            let dir = tempfile::tempdir_in("/var/tmp").unwrap();
            let mut rig = LoopRig {
                devs: Vec::new(),
                dir,
            };
            for i in 0..5 {
                let backing = rig.dir.path().join(format!("m{i}.img"));
                std::fs::File::create(&backing)
                    .unwrap()
                    .set_len(8 << 20)
                    .unwrap();
                let mut dev = None;
                // Tests run in parallel: two `losetup -f` may race for one device.
                for _ in 0..10 {
                    let o = std::process::Command::new("losetup")
                        .args(["-f", "--show", "--direct-io=on"])
                        .arg(&backing)
                        .output()
                        .expect("run losetup");
                    if o.status.success() {
                        dev = Some(String::from_utf8(o.stdout).unwrap().trim().to_string());
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                rig.devs.push(dev.expect("losetup kept failing"));
            }
            crate::daemon::setup::format(&rig.cfg(), &rig.io(), false, &mut |_, _| {}).unwrap();
            rig
        }

        fn cfg(&self) -> crate::config::AggregateConfig {
            crate::config::AggregateConfig {
                name: "hole0".into(),
                home: "a".into(),
                data: self.devs[..4].iter().map(Into::into).collect(),
                parity: self.devs[4].clone().into(),
                chunk_kib: 64,
                nvram: Some(self.dir.path().join("nvlog")),
                nvram_mib: 4,
                cp_interval_ms: 3_600_000,
                nvram_flush: Default::default(),
            }
        }

        fn io(&self) -> crate::config::IoConfig {
            crate::config::IoConfig {
                arena_mib: 16,
                ..crate::config::IoConfig::default()
            }
        }

        /// Assemble (degraded if a member's label is gone); the log is not touched.
        fn open(&self) -> Arc<Aggregate> {
            let cfg = self.cfg();
            Arc::new(crate::daemon::setup::open(&cfg, &self.io(), &mut |_, _| {}).unwrap())
        }

        fn region(&self) -> NvramRegion {
            NvramRegion::open(&self.dir.path().join("nvlog"), REGION).unwrap()
        }

        /// Member `m` is lost: its label (and so the aggregate's claim on it) is gone.
        fn lose_member(&self, m: usize) {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .open(&self.devs[m])
                .unwrap();
            f.write_all(&[0u8; crate::core::label::LABEL_BYTES])
                .unwrap();
            f.sync_all().unwrap();
        }
    }

    impl Drop for LoopRig {
        fn drop(&mut self) {
            for d in &self.devs {
                let _ = std::process::Command::new("losetup")
                    .arg("-d")
                    .arg(d)
                    .status();
            }
        }
    }

    fn aligned(data: &[u8]) -> IoBuf {
        let mut b = IoBuf::new(data.len());
        b.copy_from_slice(data);
        b
    }

    /// Stripe 3 everywhere old data (on the members after a CP), then a logged write of 8 KiB
    /// at the start of member 0's chunk of it. Returns the journal and the model.
    fn old_stripe_then_small_write(rig: &LoopRig) -> (Arc<Journal>, Arc<Aggregate>, Vec<u8>) {
        let agg = rig.open();
        let size = agg.geometry().size_bytes() as usize;
        let sb = agg.geometry().stripe_bytes();
        let (j, _) = Journal::open(agg.clone(), rig.region(), slow_cp()).unwrap();
        let mut model = vec![0u8; size];
        let old = pattern(4 * sb as usize, 11);
        j.write(2 * sb, &old, false).unwrap();
        model[2 * sb as usize..6 * sb as usize].copy_from_slice(&old);
        j.checkpoint().unwrap();
        let new = pattern(8192, 12);
        j.write(3 * sb, &aligned(&new), false).unwrap();
        model[3 * sb as usize..3 * sb as usize + 8192].copy_from_slice(&new);
        (j, agg, model)
    }

    /// The RAID write hole, on loop devices: a CP tears a stripe (member 0's new data on disk,
    /// the parity not), the node crashes, and member 1, which nobody wrote in that stripe, is
    /// lost. Its blocks at the columns member 0's write changed would be rebuilt from the torn
    /// parity. Replay must not serve them wrong: it refuses, naming the aggregate and the range
    /// (or, were it able to, rebuilds them right).
    #[test]
    fn a_torn_cp_then_a_lost_member_never_serves_unwritten_blocks_wrong() {
        let rig = LoopRig::new();
        let (j, agg, model) = old_stripe_then_small_write(&rig);
        // Crash in the middle of the CP: member 0's new data reaches its disk, the parity not.
        agg.tear_next_write.store(true, Ordering::SeqCst);
        let e = j.checkpoint().unwrap_err();
        assert!(e.to_string().contains("torn"), "{e}");
        drop(j);
        drop(agg);
        rig.lose_member(1);
        let agg = rig.open();
        assert_eq!(agg.failed_member(), Some(1));
        refused_or_right(&rig, &agg, &model);
    }

    /// A crash during the replay itself (its write of stripe 3 torn: member 0's data on disk,
    /// the parity not), then the loss of member 1: the log says a replay was writing, so the
    /// next replay refuses as after a torn CP.
    #[test]
    fn a_torn_replay_then_a_lost_member_never_serves_unwritten_blocks_wrong() {
        let rig = LoopRig::new();
        let (j, agg, model) = old_stripe_then_small_write(&rig);
        // Crash, no CP running.
        drop(j);
        drop(agg);
        let agg = rig.open();
        agg.tear_next_write.store(true, Ordering::SeqCst);
        let e = Journal::open(agg.clone(), rig.region(), slow_cp())
            .err()
            .expect("the replay was torn");
        assert!(e.to_string().contains("torn"), "{e}");
        drop(agg);
        rig.lose_member(1);
        let agg = rig.open();
        assert_eq!(agg.failed_member(), Some(1));
        refused_or_right(&rig, &agg, &model);
    }

    /// Open the journal of `agg` (member 1 missing, stripe 3 torn where member 0's 8 KiB write
    /// went): either it refuses with the write hole, naming the aggregate and member 1's range,
    /// and keeps refusing; or it serves, and then every byte is right.
    fn refused_or_right(rig: &LoopRig, agg: &Arc<Aggregate>, model: &[u8]) {
        let geo = agg.geometry();
        let sb = geo.stripe_bytes();
        match Journal::open(agg.clone(), rig.region(), slow_cp()) {
            Ok(_) => {
                // Only right if every byte is (a complete rebuild of the torn stripe).
                let mut all = IoBuf::new(model.len());
                agg.read(0, &mut all).unwrap();
                let m1 =
                    (3 * sb + geo.chunk_bytes) as usize..(3 * sb + 2 * geo.chunk_bytes) as usize;
                let wrong = all[m1.clone()]
                    .iter()
                    .zip(&model[m1])
                    .filter(|(a, b)| a != b)
                    .count();
                assert_eq!(
                    wrong, 0,
                    "replay served {wrong} bytes of member 1's chunk of stripe 3, which nobody wrote since the last CP, wrong (rebuilt from parity the crash tore)"
                );
                assert!(all[..] == model[..], "replay lost or changed data");
            }
            Err(e) => {
                let msg = e.to_string();
                match e {
                    JournalError::WriteHole(h) => {
                        let WriteHoleError {
                            aggregate,
                            member,
                            stripes,
                            bytes,
                            first_offset,
                            first_end,
                            ..
                        } = *h;
                        assert_eq!(aggregate, "hole0");
                        assert_eq!((member, stripes, bytes), (1, 1, 8192));
                        // Member 1's first 8 KiB of stripe 3: the columns member 0's write changed.
                        let at = 3 * sb + geo.chunk_bytes;
                        assert_eq!((first_offset, first_end), (at, at + 8192));
                        assert!(
                            msg.contains("hole0") && msg.contains(&format!("{at}..{}", at + 8192)),
                            "{msg}"
                        );
                    }
                    other => panic!("refused for another reason: {other}"),
                }
                // Refused for good: the log is kept, a second attempt says the same.
                let agg = rig.open();
                let e = Journal::open(agg, rig.region(), slow_cp())
                    .err()
                    .expect("refuses again");
                assert!(matches!(e, JournalError::WriteHole(_)), "{e}");
            }
        }
    }

    /// The same loss with no CP in flight at the crash: the parity on the members is whole, so
    /// the degraded replay rebuilds every block right and serves (no needless refusal).
    #[test]
    fn a_lost_member_after_a_crash_outside_a_cp_replays_degraded() {
        let rig = LoopRig::new();
        let (j, agg, model) = old_stripe_then_small_write(&rig);
        let sb = agg.geometry().stripe_bytes();
        // More logged writes, one in stripe 3 on member 1 itself; then the crash, no CP running.
        let more = pattern(4096, 13);
        let at = 3 * sb + agg.geometry().chunk_bytes + 16384;
        j.write(at, &aligned(&more), false).unwrap();
        let mut model = model;
        model[at as usize..at as usize + 4096].copy_from_slice(&more);
        drop(j);
        drop(agg);
        rig.lose_member(1);
        let agg = rig.open();
        assert_eq!(agg.failed_member(), Some(1));
        let (_j, s) = Journal::open(agg.clone(), rig.region(), slow_cp()).unwrap();
        assert_eq!(s.replayed_records, 2);
        let mut all = IoBuf::new(model.len());
        agg.read(0, &mut all).unwrap();
        assert!(
            all[..] == model[..],
            "degraded replay served what was written"
        );
    }

    /// An idle journal (one write, then nothing) stops running CPs once its
    /// writes are on the members.
    #[test]
    fn an_idle_journal_stops_running_cps() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let (agg, _disks) = mem_aggregate(2, 4096, 16);
        let agg = Arc::new(agg);
        let cfg = JournalConfig {
            cp_interval: Duration::from_millis(50),
            ..slow_cp()
        };
        let (j, _) = Journal::open(agg, region(dir.path(), "l"), cfg).unwrap();
        j.write(4096, &pattern(4096, 1), false).unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let snap = |j: &Journal| {
            (
                j.stats.cps.load(Ordering::Relaxed),
                j.stats.group_commits.load(Ordering::Relaxed),
                j.stats.device_flushes.load(Ordering::Relaxed),
            )
        };
        let a = snap(&j);
        std::thread::sleep(Duration::from_millis(1000));
        let b = snap(&j);
        assert_eq!(
            a, b,
            "idle for 1 s with no writes: (CPs, group commits, log device flushes) went {a:?} -> {b:?}"
        );
    }

    /// CPs that fail over and over (here: partner down and the mailbox unwritable, so the
    /// Checkpoint record cannot be made durable) at a full ring reuse their record: they used
    /// to append one per attempt until the ring's reserve was gone, and the CP then failed for
    /// good ("log full"), the fault long cleared, the log never draining.
    #[test]
    fn failed_cps_at_a_full_ring_do_not_wedge_the_log() {
        let (dir, _agg, _disks, j) = slow_journal(2, 16);
        // No CP thread: the test runs the CPs.
        j.stop.store(true, Ordering::Release);
        j.kick_cp();
        std::thread::sleep(Duration::from_millis(300));
        let link = LocalLink::new(dir.path());
        j.set_mirror(Some(link.clone()));
        let fail = Arc::new(AtomicBool::new(false));
        {
            let fail = fail.clone();
            j.set_unmirrored_hook(Some(Box::new(move |_on| {
                if fail.load(Ordering::Acquire) {
                    Err("mailbox unwritable".into())
                } else {
                    Ok(())
                }
            })));
        }
        // Fill the ring with acknowledged, mirrored writes (big ones, then small ones).
        let mut n = 0;
        for len in [4096usize] {
            let data = pattern(len, 1);
            while let Some(seq) = j.try_append(4096, &data).unwrap() {
                j.finish_writes(seq, false).unwrap();
                n += 1;
            }
        }
        assert!(n > 100, "{n}");
        assert_eq!(j.mirror_state(), MirrorState::Mirrored);
        // The partner goes down and the mailbox cannot be written for a while: CPs fail.
        link.up.store(false, Ordering::Release);
        fail.store(true, Ordering::Release);
        for i in 0..200 {
            let e = j.checkpoint().unwrap_err().to_string();
            assert!(!e.contains("checkpoint record"), "attempt {i}: {e}");
        }
        // The fault clears: partner back, mailbox writable.
        fail.store(false, Ordering::Release);
        link.up.store(true, Ordering::Release);
        j.ensure_mirrored().unwrap();
        let r = j.checkpoint();
        assert!(
            r.is_ok(),
            "after the fault cleared the CP still fails, so the full log never drains: {r:?}"
        );
    }
}

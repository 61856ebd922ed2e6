//! The NVRAM write log: its byte format, the appender, replay and the write-cache index.
//!
//! Sans-io: everything here works on a byte slice (`&[u8]` / `&mut [u8]`) that the I/O layer
//! maps (see `io::nvram`). Making bytes durable is the caller's job: every mutating call records
//! which byte ranges it changed and [`LogAppender::commit`] hands them back (group commit).
//!
//! # Region layout
//! ```text
//! 0        64        128       192                 4096                          region_bytes
//! | header | trim 0  | trim 1  |  zero             | record ring ...                         |
//! ```
//! - [`RegionHeader`] (64 bytes): written once by [`LogAppender::format`].
//! - two [`TrimSlot`]s (64 bytes each), written alternately by [`LogAppender::trim`], so a torn
//!   trim-slot write always leaves the other, older slot intact.
//! - the record ring from [`DATA_START`] to the end of the region: [`RecordHeader`]s each followed
//!   by their payload, padded to [`RECORD_ALIGN`]. Records are contiguous; a record never wraps:
//!   when one does not fit before the end of the ring a `Pad` record fills the rest and writing
//!   continues at [`DATA_START`].
//!
//! # Acknowledgement rule
//! A write is acknowledged in sequence order: when the caller calls [`LogAppender::mark_acked`]
//! with `seq`, every record up to `seq` is durable (here and in the partner's mirror). Each
//! record carries the acknowledged watermark at the time it was appended; replay uses it to
//! tell a torn group commit (never acknowledged: safe to discard) from a damaged acknowledged
//! record (refuse).
//!
//! # Replay decision table
//! Tested row by row in the tests below (`row_*`). `E` is the sequence number expected next.
//!
//! | what the scan finds | outcome |
//! | --- | --- |
//! | header all zero | refuse: [`ReplayError::NotFormatted`] |
//! | header bad magic/version/crc | refuse: [`ReplayError::HeaderCorrupt`] |
//! | header of another aggregate/generation than the label | refuse: `WrongAggregate` / `WrongGeneration` |
//! | both trim slots invalid | refuse: [`ReplayError::TrimSlotsCorrupt`] |
//! | formatted, no record (empty) | replay nothing |
//! | valid chain, then zeros or records of an older lap/format (clean) | replay all, discard 0 |
//! | valid chain, then one torn record, nothing later of this log (torn tail) | replay up to E-1, discard 1 |
//! | torn record, later records whose acked stamp is < E (torn group commit) | replay up to E-1, discard the torn one and the later ones |
//! | torn/missing record, a later record says E was acknowledged (checksum mismatch in the middle) | refuse: [`ReplayError::LostAcknowledged`] |
//! | valid record with seq > E where E should be (sequence gap) | refuse: [`ReplayError::SequenceGap`] |
//! | valid record of this format naming another aggregate | refuse: [`ReplayError::ForeignAggregate`] |
//! | valid record of this format naming another generation | refuse: [`ReplayError::ForeignGeneration`] |
//!
//! A record of another aggregate or generation that carries *this* format's epoch was written
//! by a confused writer into this region: replaying it would write to the wrong array, and
//! skipping it could lose acknowledged writes behind it, so an operator has to decide. Records
//! of an earlier format (other epoch) are simply old bytes and end the chain.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;
use std::sync::Arc;

use thiserror::Error;
use uuid::Uuid;

/// Magic at the start of the region header.
pub const REGION_MAGIC: [u8; 8] = *b"HAPNVLG1";
/// Magic at the start of each trim slot.
pub const TRIM_MAGIC: [u8; 8] = *b"HAPNVTRM";
/// Magic at the start of each record header (bytes `NVR1` read little-endian).
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"NVR1");
/// Format version this code writes. Version 2 added [`RecordKind::Checkpoint`]; version 1
/// logs (which never hold one) are still read: see [`Replay::checkpoint_in_flight`].
pub const LOG_VERSION: u32 = 2;
/// Oldest format version this code reads.
pub const LOG_VERSION_MIN: u32 = 1;
/// Byte offsets of the two trim slots.
pub const TRIM_SLOT_OFFSETS: [usize; 2] = [64, 128];
/// Where the record ring starts: a page, so records never share a page with the header.
pub const DATA_START: usize = 4096;
/// Every record starts on and is padded to this boundary (a cache line, the unit of NVRAM flush).
pub const RECORD_ALIGN: usize = 64;
/// Smallest record ring accepted by [`LogAppender::format`].
pub const MIN_RING_BYTES: usize = 4096;

/// The region header, at offset 0, 64 bytes, little-endian:
///
/// | bytes | field | meaning |
/// | --- | --- | --- |
/// | 0..8 | magic | [`REGION_MAGIC`] |
/// | 8..12 | version | [`LOG_VERSION`] (written); [`LOG_VERSION_MIN`]..=[`LOG_VERSION`] read |
/// | 12..16 | reserved | zero |
/// | 16..32 | aggregate | UUID of the aggregate whose writes this log holds |
/// | 32..40 | generation | the aggregate's generation (from its label); records of another generation do not apply |
/// | 40..48 | region_bytes | size of the whole region; must equal the mapped size |
/// | 48..56 | epoch | random at each format, so records left by an earlier format never continue this log |
/// | 56..60 | reserved | zero |
/// | 60..64 | crc | crc32c of bytes 0..60 |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionHeader {
    /// Format version the log was written in.
    pub version: u32,
    pub aggregate: Uuid,
    pub generation: u64,
    pub region_bytes: u64,
    pub epoch: u64,
}

/// A trim slot, 64 bytes, little-endian. The valid slot with the higher `counter` is current.
///
/// | bytes | field | meaning |
/// | --- | --- | --- |
/// | 0..8 | magic | [`TRIM_MAGIC`] |
/// | 8..16 | epoch | the header's epoch; a slot of another epoch is invalid |
/// | 16..24 | counter | bumped on every slot write |
/// | 24..32 | trimmed_seq | every record up to here is on the RAID members (0: none yet) |
/// | 32..40 | head_offset | region offset of record `trimmed_seq + 1` (or where it will be written) |
/// | 40..60 | reserved | zero |
/// | 60..64 | crc | crc32c of bytes 0..60 |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrimSlot {
    pub epoch: u64,
    pub counter: u64,
    pub trimmed_seq: u64,
    pub head_offset: u64,
}

/// What a record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    /// An acknowledged client write: `length` payload bytes for aggregate byte `offset`.
    Write = 1,
    /// Filler from here to the end of the ring; writing continues at [`DATA_START`].
    Pad = 2,
    /// Whole stripes written straight to the members (not through the log) from aggregate
    /// byte `offset`, for as many bytes as the 8-byte little-endian payload says. Made durable
    /// before the member writes start, so that replay after a crash recomputes the parity of
    /// those stripes (their write may have been torn) and knows no older record of the log
    /// covers them.
    Stripes = 3,
    /// A consistency point is about to write every record up to the seq in the 8-byte
    /// little-endian payload (and past the trim slot's `trimmed_seq`) to the members in place.
    /// Made durable (and mirrored) before the first member write of that CP, so that replay
    /// knows which stripes a crash may have left with parity that disagrees with their data:
    /// with a member missing, a block of such a stripe that nobody wrote cannot be rebuilt
    /// from that parity. (Format version 2 on.)
    Checkpoint = 4,
}

/// Payload bytes of a [`RecordKind::Stripes`] record.
pub const STRIPES_PAYLOAD: usize = 8;
/// Payload bytes of a [`RecordKind::Checkpoint`] record.
pub const CHECKPOINT_PAYLOAD: usize = 8;
/// Ring bytes that client records ([`LogAppender::append`], [`LogAppender::append_stripes`])
/// leave free once [`LogAppender::set_reserve`] asked for it: room for the
/// [`RecordKind::Checkpoint`] record of the CP that frees the ring when it is full.
pub const CHECKPOINT_RESERVE: usize = 2 * (RecordHeader::BYTES + RECORD_ALIGN);

/// A record header, 64 bytes, little-endian, followed by `length` payload bytes and zero
/// padding up to [`RECORD_ALIGN`]:
///
/// | bytes | field | meaning |
/// | --- | --- | --- |
/// | 0..4 | magic | [`RECORD_MAGIC`] |
/// | 4 | kind | [`RecordKind`] |
/// | 5 | reserved | zero |
/// | 6..8 | acked_delta | `seq - acked_seq` at append time (0: no claim, also when it does not fit) |
/// | 8..16 | seq | sequence number, +1 per record (pads included), from 1 after a format |
/// | 16..32 | aggregate | UUID of the aggregate (must equal the header's) |
/// | 32..40 | generation | aggregate generation (must equal the header's) |
/// | 40..48 | epoch | the header's epoch at append time |
/// | 48..56 | offset | byte offset of the write in the aggregate |
/// | 56..60 | length | payload bytes (0 for a pad) |
/// | 60..64 | crc | crc32c of bytes 0..60 followed by the payload |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: RecordKind,
    pub acked_delta: u16,
    pub seq: u64,
    pub aggregate: Uuid,
    pub generation: u64,
    pub epoch: u64,
    pub offset: u64,
    pub length: u32,
}

impl RegionHeader {
    pub const BYTES: usize = 64;
}
impl TrimSlot {
    pub const BYTES: usize = 64;
}
impl RecordHeader {
    pub const BYTES: usize = 64;
}

const CRC_AT: usize = 60;
const _: () = assert!(CRC_AT + 4 == RegionHeader::BYTES);
const _: () = assert!(CRC_AT + 4 == TrimSlot::BYTES);
const _: () = assert!(CRC_AT + 4 == RecordHeader::BYTES);
const _: () = assert!(RecordHeader::BYTES == RECORD_ALIGN);
const _: () = assert!(TRIM_SLOT_OFFSETS[0] >= RegionHeader::BYTES);
const _: () = assert!(TRIM_SLOT_OFFSETS[1] >= TRIM_SLOT_OFFSETS[0] + TrimSlot::BYTES);
const _: () = assert!(DATA_START >= TRIM_SLOT_OFFSETS[1] + TrimSlot::BYTES);
const _: () = assert!(DATA_START % RECORD_ALIGN == 0);

fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn get_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}
fn get_uuid(b: &[u8], at: usize) -> Uuid {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[at..at + 16]);
    Uuid::from_bytes(a)
}
fn put(b: &mut [u8], at: usize, v: &[u8]) {
    b[at..at + v.len()].copy_from_slice(v);
}

/// Bytes a record with `len` payload bytes occupies in the ring.
pub fn record_footprint(len: usize) -> usize {
    RecordHeader::BYTES + len.div_ceil(RECORD_ALIGN) * RECORD_ALIGN
}

/// Why a header or trim slot did not decode.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FormatError {
    #[error("bad magic")]
    BadMagic,
    #[error("unsupported version {0}")]
    BadVersion(u32),
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadChecksum { stored: u32, computed: u32 },
    #[error("reserved bytes are not zero")]
    ReservedNotZero,
    #[error("region of {0} bytes: need a multiple of {RECORD_ALIGN} of at least {min}", min = DATA_START + MIN_RING_BYTES)]
    BadRegionSize(usize),
}

fn check_crc(b: &[u8]) -> Result<(), FormatError> {
    let stored = get_u32(b, CRC_AT);
    let computed = crc32c::crc32c(&b[..CRC_AT]);
    if stored != computed {
        return Err(FormatError::BadChecksum { stored, computed });
    }
    Ok(())
}

impl RegionHeader {
    /// The 64 header bytes, crc included.
    pub fn encode(&self) -> [u8; 64] {
        let mut b = [0u8; 64];
        put(&mut b, 0, &REGION_MAGIC);
        put(&mut b, 8, &self.version.to_le_bytes());
        put(&mut b, 16, self.aggregate.as_bytes());
        put(&mut b, 32, &self.generation.to_le_bytes());
        put(&mut b, 40, &self.region_bytes.to_le_bytes());
        put(&mut b, 48, &self.epoch.to_le_bytes());
        let crc = crc32c::crc32c(&b[..CRC_AT]);
        put(&mut b, CRC_AT, &crc.to_le_bytes());
        b
    }

    /// Decode and check 64 header bytes.
    pub fn decode(b: &[u8; 64]) -> Result<RegionHeader, FormatError> {
        if b[0..8] != REGION_MAGIC {
            return Err(FormatError::BadMagic);
        }
        check_crc(b)?;
        let version = get_u32(b, 8);
        if !(LOG_VERSION_MIN..=LOG_VERSION).contains(&version) {
            return Err(FormatError::BadVersion(version));
        }
        if b[12..16].iter().chain(&b[56..60]).any(|&x| x != 0) {
            return Err(FormatError::ReservedNotZero);
        }
        Ok(RegionHeader {
            version,
            aggregate: get_uuid(b, 16),
            generation: get_u64(b, 32),
            region_bytes: get_u64(b, 40),
            epoch: get_u64(b, 48),
        })
    }
}

impl TrimSlot {
    /// The 64 slot bytes, crc included.
    pub fn encode(&self) -> [u8; 64] {
        let mut b = [0u8; 64];
        put(&mut b, 0, &TRIM_MAGIC);
        put(&mut b, 8, &self.epoch.to_le_bytes());
        put(&mut b, 16, &self.counter.to_le_bytes());
        put(&mut b, 24, &self.trimmed_seq.to_le_bytes());
        put(&mut b, 32, &self.head_offset.to_le_bytes());
        let crc = crc32c::crc32c(&b[..CRC_AT]);
        put(&mut b, CRC_AT, &crc.to_le_bytes());
        b
    }

    /// Decode and check 64 slot bytes.
    pub fn decode(b: &[u8; 64]) -> Result<TrimSlot, FormatError> {
        if b[0..8] != TRIM_MAGIC {
            return Err(FormatError::BadMagic);
        }
        check_crc(b)?;
        if b[40..60].iter().any(|&x| x != 0) {
            return Err(FormatError::ReservedNotZero);
        }
        Ok(TrimSlot {
            epoch: get_u64(b, 8),
            counter: get_u64(b, 16),
            trimmed_seq: get_u64(b, 24),
            head_offset: get_u64(b, 32),
        })
    }
}

impl RecordHeader {
    /// The 64 header bytes with the crc computed over them and `payload`.
    pub fn encode(&self, payload: &[u8]) -> [u8; 64] {
        debug_assert_eq!(payload.len(), self.length as usize);
        let mut b = [0u8; 64];
        put(&mut b, 0, &RECORD_MAGIC.to_le_bytes());
        b[4] = self.kind as u8;
        put(&mut b, 6, &self.acked_delta.to_le_bytes());
        put(&mut b, 8, &self.seq.to_le_bytes());
        put(&mut b, 16, self.aggregate.as_bytes());
        put(&mut b, 32, &self.generation.to_le_bytes());
        put(&mut b, 40, &self.epoch.to_le_bytes());
        put(&mut b, 48, &self.offset.to_le_bytes());
        put(&mut b, 56, &self.length.to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..CRC_AT]), payload);
        put(&mut b, CRC_AT, &crc.to_le_bytes());
        b
    }

    /// The acknowledged watermark this record claims (0: no claim).
    pub fn acked_seq(&self) -> u64 {
        if self.acked_delta == 0 {
            0
        } else {
            self.seq.saturating_sub(u64::from(self.acked_delta))
        }
    }
}

/// What sits at one position of the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Parsed {
    /// No record magic: zeros or payload bytes.
    NotRecord,
    /// Record magic, but the crc, kind or length is wrong: a torn or damaged record.
    Torn,
    /// A record whose crc matches; it may still belong to another lap, format or aggregate.
    Valid(RecordHeader),
}

/// Parse the record at `pos` of a ring that ends at `ring_end`, checking its crc.
fn parse_record(region: &[u8], pos: usize, ring_end: usize) -> Parsed {
    if pos + RecordHeader::BYTES > ring_end {
        return Parsed::NotRecord;
    }
    let b = &region[pos..pos + RecordHeader::BYTES];
    if get_u32(b, 0) != RECORD_MAGIC {
        return Parsed::NotRecord;
    }
    let kind = match b[4] {
        1 => RecordKind::Write,
        2 => RecordKind::Pad,
        3 => RecordKind::Stripes,
        4 => RecordKind::Checkpoint,
        _ => return Parsed::Torn,
    };
    let length = get_u32(b, 56);
    if b[5] != 0
        || (kind == RecordKind::Pad && length != 0)
        || (kind == RecordKind::Stripes && length as usize != STRIPES_PAYLOAD)
        || (kind == RecordKind::Checkpoint && length as usize != CHECKPOINT_PAYLOAD)
    {
        return Parsed::Torn;
    }
    let Some(end) = pos.checked_add(record_footprint(length as usize)) else {
        return Parsed::Torn;
    };
    if end > ring_end {
        return Parsed::Torn;
    }
    let payload = &region[pos + RecordHeader::BYTES..pos + RecordHeader::BYTES + length as usize];
    let computed = crc32c::crc32c_append(crc32c::crc32c(&b[..CRC_AT]), payload);
    if computed != get_u32(b, CRC_AT) {
        return Parsed::Torn;
    }
    Parsed::Valid(RecordHeader {
        kind,
        acked_delta: get_u16(b, 6),
        seq: get_u64(b, 8),
        aggregate: get_uuid(b, 16),
        generation: get_u64(b, 32),
        epoch: get_u64(b, 40),
        offset: get_u64(b, 48),
        length,
    })
}

fn check_region_size(len: usize) -> Result<(), FormatError> {
    if len < DATA_START + MIN_RING_BYTES || len % RECORD_ALIGN != 0 {
        return Err(FormatError::BadRegionSize(len));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Appender
// ---------------------------------------------------------------------------------------------

/// Why an append did not happen. Nothing was written in either case.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AppendError {
    /// The ring has no room until a consistency point trims it: the writer waits, it does not fail.
    #[error(
        "log full: {needed_bytes} bytes needed, {free_bytes} free; wait for a consistency point"
    )]
    Full {
        needed_bytes: usize,
        free_bytes: usize,
    },
    /// The record could never fit in this ring.
    #[error("record of {len} bytes can never fit a ring of {ring_bytes} bytes")]
    TooLarge { len: usize, ring_bytes: usize },
    #[error("region is {actual} bytes, the log was formatted for {expected}")]
    RegionChanged { expected: usize, actual: usize },
}

impl AppendError {
    /// True when waiting for a consistency point will make room.
    pub fn is_full(&self) -> bool {
        matches!(self, AppendError::Full { .. })
    }
}

/// Misuse of acknowledgement or trim.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TrimError {
    #[error("cannot acknowledge seq {seq}: only up to {committed} was committed")]
    AckBeyondCommitted { seq: u64, committed: u64 },
    #[error("cannot trim up to seq {seq}: only up to {acked} is acknowledged")]
    TrimBeyondAcked { seq: u64, acked: u64 },
    #[error("region is {actual} bytes, the log was formatted for {expected}")]
    RegionChanged { expected: usize, actual: usize },
}

/// A group commit: the records `first_seq..=last_seq` and the region byte ranges to make
/// durable (sorted, merged) before they may be acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    pub first_seq: u64,
    pub last_seq: u64,
    pub ranges: Vec<Range<usize>>,
}

#[derive(Debug, Clone, Copy)]
struct Live {
    seq: u64,
    at: usize,
    footprint: usize,
    kind: RecordKind,
}

/// Appends records to a formatted region, bounded by the ring; see the module docs.
#[derive(Debug)]
pub struct LogAppender {
    header: RegionHeader,
    region_bytes: usize,
    /// Region offset of the oldest live record (== `tail` when the ring is empty).
    head: usize,
    /// Region offset where the next record goes.
    tail: usize,
    used: usize,
    next_seq: u64,
    committed_seq: u64,
    acked_seq: u64,
    trimmed_seq: u64,
    slot_counter: u64,
    live: VecDeque<Live>,
    dirty: Vec<Range<usize>>,
    /// Trimmed but not yet known durable: `(new head, bytes freed)`. The space stays in use
    /// until [`LogAppender::trim_persisted`]: were it reused first, a crash could leave the old
    /// trim slot pointing into newer records.
    pending_trim: Option<(usize, usize)>,
    /// Bytes client records leave free (see [`CHECKPOINT_RESERVE`]).
    reserve: usize,
}

impl LogAppender {
    /// Format `region` for `aggregate`/`generation` with a fresh random `epoch` (from the
    /// caller: core draws no randomness) and return an appender at seq 1. The header block
    /// `0..DATA_START` is dirty: the first [`commit`](Self::commit) returns it.
    pub fn format(
        region: &mut [u8],
        aggregate: Uuid,
        generation: u64,
        epoch: u64,
    ) -> Result<LogAppender, FormatError> {
        check_region_size(region.len())?;
        let header = RegionHeader {
            version: LOG_VERSION,
            aggregate,
            generation,
            region_bytes: region.len() as u64,
            epoch,
        };
        region[..DATA_START].fill(0);
        put(region, 0, &header.encode());
        let slot = TrimSlot {
            epoch,
            counter: 1,
            trimmed_seq: 0,
            head_offset: DATA_START as u64,
        };
        put(region, TRIM_SLOT_OFFSETS[1], &slot.encode());
        Ok(LogAppender {
            header,
            region_bytes: region.len(),
            head: DATA_START,
            tail: DATA_START,
            used: 0,
            next_seq: 1,
            committed_seq: 0,
            acked_seq: 0,
            trimmed_seq: 0,
            slot_counter: 1,
            live: VecDeque::new(),
            dirty: std::iter::once(0..DATA_START).collect(),
            pending_trim: None,
            reserve: 0,
        })
    }

    pub fn header(&self) -> &RegionHeader {
        &self.header
    }
    fn ring_end(&self) -> usize {
        self.region_bytes
    }
    fn ring_bytes(&self) -> usize {
        self.region_bytes - DATA_START
    }
    /// Bytes free in the ring (not all of it may be usable at once: records do not wrap).
    pub fn free_bytes(&self) -> usize {
        self.ring_bytes() - self.used
    }
    /// Sequence number the next record gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }
    pub fn acked_seq(&self) -> u64 {
        self.acked_seq
    }
    pub fn trimmed_seq(&self) -> u64 {
        self.trimmed_seq
    }
    /// Largest payload one client record can carry in this ring.
    pub fn max_payload(&self) -> usize {
        // Leave room for a pad so the record fits after any wrap, and the reserve.
        self.ring_bytes() - 2 * RecordHeader::BYTES - self.reserve
    }

    /// From now on client records leave `bytes` of the ring free for
    /// [`append_checkpoint`](Self::append_checkpoint) (0: none, the default). At most a
    /// quarter of the ring.
    pub fn set_reserve(&mut self, bytes: usize) {
        self.reserve = bytes.min(self.ring_bytes() / 4);
    }

    fn check_region(&self, region: &[u8]) -> Result<(), (usize, usize)> {
        if region.len() != self.region_bytes {
            return Err((self.region_bytes, region.len()));
        }
        Ok(())
    }

    /// Where a record of `footprint` bytes goes: `(pad_at, at)`, or `None` when it does not fit.
    fn place(&self, footprint: usize) -> Option<(Option<usize>, usize)> {
        let end = self.ring_end();
        if self.used > 0 && self.tail <= self.head {
            // Free space is the gap tail..head.
            return (self.tail + footprint <= self.head).then_some((None, self.tail));
        }
        // Free space is tail..end and DATA_START..head.
        if self.tail + footprint <= end {
            return Some((None, self.tail));
        }
        // After the pad, the pad itself is the oldest live record if the ring was empty.
        let limit = if self.used == 0 { self.tail } else { self.head };
        (DATA_START + footprint <= limit).then_some((Some(self.tail), DATA_START))
    }

    fn write_record(
        &mut self,
        region: &mut [u8],
        at: usize,
        kind: RecordKind,
        offset: u64,
        data: &[u8],
    ) -> u64 {
        let seq = self.next_seq;
        let delta = seq - self.acked_seq;
        let acked_delta = if self.acked_seq == 0 || delta > u64::from(u16::MAX) {
            0
        } else {
            delta as u16
        };
        let hdr = RecordHeader {
            kind,
            acked_delta,
            seq,
            aggregate: self.header.aggregate,
            generation: self.header.generation,
            epoch: self.header.epoch,
            offset,
            length: data.len() as u32,
        };
        let footprint = match kind {
            RecordKind::Write | RecordKind::Stripes | RecordKind::Checkpoint => {
                record_footprint(data.len())
            }
            RecordKind::Pad => self.ring_end() - at,
        };
        put(region, at, &hdr.encode(data));
        let body = at + RecordHeader::BYTES;
        region[body..body + data.len()].copy_from_slice(data);
        let written_end = at + record_footprint(data.len());
        region[body + data.len()..written_end].fill(0);
        self.dirty.push(at..written_end);
        self.live.push_back(Live {
            seq,
            at,
            footprint,
            kind,
        });
        self.used += footprint;
        self.next_seq += 1;
        self.tail = at + footprint;
        if self.tail == self.ring_end() {
            self.tail = DATA_START;
        }
        seq
    }

    /// The bytes a byte-copy of this log needs to scan like the original: the header block and
    /// the live records (head to tail, wrapping). Everything else is stale to a scan.
    pub fn live_ranges(&self) -> Vec<Range<usize>> {
        let mut v = vec![0..DATA_START];
        if self.used > 0 {
            if self.head < self.tail {
                v.push(self.head..self.tail);
            } else {
                v.push(self.head..self.ring_end());
                if self.tail > DATA_START {
                    v.push(DATA_START..self.tail);
                }
            }
        }
        v
    }

    /// Append a write of `data` at aggregate byte `offset`; returns its sequence number.
    /// The record is durable only after the ranges of the next [`commit`](Self::commit) are.
    pub fn append(
        &mut self,
        region: &mut [u8],
        offset: u64,
        data: &[u8],
    ) -> Result<u64, AppendError> {
        self.append_kind(region, RecordKind::Write, offset, data)
    }

    /// Append a [`RecordKind::Stripes`] record: `len` bytes of whole stripes from `offset` are
    /// about to be written to the members directly.
    pub fn append_stripes(
        &mut self,
        region: &mut [u8],
        offset: u64,
        len: u64,
    ) -> Result<u64, AppendError> {
        self.append_kind(region, RecordKind::Stripes, offset, &len.to_le_bytes())
    }

    /// Append a [`RecordKind::Checkpoint`] record: a CP is about to write every record up to
    /// `upto` to the members in place. It may use the ring's reserve.
    pub fn append_checkpoint(&mut self, region: &mut [u8], upto: u64) -> Result<u64, AppendError> {
        self.append_kind(region, RecordKind::Checkpoint, 0, &upto.to_le_bytes())
    }

    fn append_kind(
        &mut self,
        region: &mut [u8],
        kind: RecordKind,
        offset: u64,
        data: &[u8],
    ) -> Result<u64, AppendError> {
        self.check_region(region)
            .map_err(|(expected, actual)| AppendError::RegionChanged { expected, actual })?;
        if data.len() > self.max_payload() {
            return Err(AppendError::TooLarge {
                len: data.len(),
                ring_bytes: self.ring_bytes(),
            });
        }
        let footprint = record_footprint(data.len());
        // Client records keep the reserve free behind them: the CP that makes room in a full
        // ring needs to log that it starts.
        let reserve = match kind {
            RecordKind::Checkpoint => 0,
            _ => self.reserve,
        };
        let Some((pad_at, at)) = self.place(footprint + reserve) else {
            return Err(AppendError::Full {
                needed_bytes: footprint + reserve,
                free_bytes: self.free_bytes(),
            });
        };
        if let Some(p) = pad_at {
            self.write_record(region, p, RecordKind::Pad, 0, &[]);
        }
        Ok(self.write_record(region, at, kind, offset, data))
    }

    /// End a group: the records appended since the last commit and the byte ranges that must
    /// be made durable (locally and in the mirror) before they are acknowledged.
    pub fn commit(&mut self) -> Commit {
        let first_seq = self.committed_seq + 1;
        let last_seq = self.next_seq - 1;
        self.committed_seq = last_seq;
        let mut ranges = std::mem::take(&mut self.dirty);
        ranges.sort_by_key(|r| r.start);
        let mut merged: Vec<Range<usize>> = Vec::with_capacity(ranges.len());
        for r in ranges {
            match merged.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => merged.push(r),
            }
        }
        Commit {
            first_seq,
            last_seq,
            ranges: merged,
        }
    }

    /// Every record up to `seq` is durable in both NVRAMs and acknowledged.
    pub fn mark_acked(&mut self, seq: u64) -> Result<(), TrimError> {
        if seq > self.committed_seq {
            return Err(TrimError::AckBeyondCommitted {
                seq,
                committed: self.committed_seq,
            });
        }
        self.acked_seq = self.acked_seq.max(seq);
        Ok(())
    }

    /// After a consistency point put every write up to `seq` on the members: drop their
    /// records and write the next trim slot. Returns the slot's byte range, or `None` when
    /// nothing was trimmed. The freed space becomes usable only after the caller made that
    /// range durable and called [`trim_persisted`](Self::trim_persisted).
    pub fn trim(&mut self, region: &mut [u8], seq: u64) -> Result<Option<Range<usize>>, TrimError> {
        self.check_region(region)
            .map_err(|(expected, actual)| TrimError::RegionChanged { expected, actual })?;
        if seq > self.acked_seq {
            return Err(TrimError::TrimBeyondAcked {
                seq,
                acked: self.acked_seq,
            });
        }
        let mut trimmed = None;
        let mut freed = 0;
        while let Some(front) = self.live.front().copied() {
            // Leading pads carry no data: trim them along once acknowledged.
            let pad_ok = front.kind == RecordKind::Pad && front.seq <= self.acked_seq;
            if front.seq > seq && !pad_ok {
                break;
            }
            self.live.pop_front();
            freed += front.footprint;
            trimmed = Some(front.seq);
        }
        let Some(trimmed_seq) = trimmed else {
            return Ok(None);
        };
        self.trimmed_seq = trimmed_seq;
        let new_head = self.live.front().map_or(self.tail, |l| l.at);
        let already = self.pending_trim.map_or(0, |(_, f)| f);
        self.pending_trim = Some((new_head, already + freed));
        self.slot_counter += 1;
        let slot = TrimSlot {
            epoch: self.header.epoch,
            counter: self.slot_counter,
            trimmed_seq,
            head_offset: new_head as u64,
        };
        let at = TRIM_SLOT_OFFSETS[(self.slot_counter % 2) as usize];
        put(region, at, &slot.encode());
        Ok(Some(at..at + TrimSlot::BYTES))
    }

    /// The trim slot range(s) returned by [`trim`](Self::trim) are durable: free the space.
    pub fn trim_persisted(&mut self) {
        if let Some((head, freed)) = self.pending_trim.take() {
            self.head = head;
            self.used -= freed;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Replay
// ---------------------------------------------------------------------------------------------

/// What replay expects the region to hold (from the aggregate's RAID label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expect {
    pub aggregate: Uuid,
    pub generation: u64,
}

/// How an acknowledged record came to be lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Damage {
    /// Record magic present, checksum (or length/kind) wrong.
    ChecksumMismatch,
    /// No record at all where it should be.
    Missing,
    /// An old record (older lap or format) where it should be.
    Stale,
}

/// Replay refused: the log cannot be trusted as it is. Nothing is replayed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ReplayError {
    #[error("NVRAM log region is not formatted (header is all zero)")]
    NotFormatted,
    #[error("NVRAM log header corrupt")]
    HeaderCorrupt(#[source] FormatError),
    #[error("NVRAM log header says {header} bytes, the region is {actual}")]
    RegionSizeMismatch { header: u64, actual: usize },
    #[error("NVRAM log belongs to aggregate {found}, expected {expected}")]
    WrongAggregate { expected: Uuid, found: Uuid },
    #[error("NVRAM log is for generation {found}, the aggregate is at {expected}")]
    WrongGeneration { expected: u64, found: u64 },
    #[error("both NVRAM log trim slots are corrupt")]
    TrimSlotsCorrupt,
    #[error("trim slot head offset {0} is outside the record ring or misaligned")]
    BadHeadOffset(u64),
    #[error("acknowledged record {seq} at region offset {region_offset} is lost ({damage:?}); record {proven_by_seq} says it was acknowledged")]
    LostAcknowledged {
        seq: u64,
        region_offset: usize,
        damage: Damage,
        proven_by_seq: u64,
    },
    #[error(
        "sequence gap at region offset {region_offset}: expected record {expected}, found {found}"
    )]
    SequenceGap {
        expected: u64,
        found: u64,
        region_offset: usize,
    },
    #[error("record {seq} at region offset {region_offset} belongs to aggregate {found}")]
    ForeignAggregate {
        seq: u64,
        found: Uuid,
        region_offset: usize,
    },
    #[error("record {seq} at region offset {region_offset} is of generation {found}, the log's is {expected}")]
    ForeignGeneration {
        seq: u64,
        found: u64,
        expected: u64,
        region_offset: usize,
    },
}

/// One write to replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayRecord {
    pub seq: u64,
    /// Aggregate byte offset.
    pub offset: u64,
    /// Where the payload lies in the region.
    pub payload: Range<usize>,
}

/// A [`RecordKind::Stripes`] record of the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StripesRecord {
    pub seq: u64,
    /// Aggregate byte offset (a stripe boundary).
    pub offset: u64,
    /// Bytes (whole stripes).
    pub len: u64,
}

/// A [`RecordKind::Checkpoint`] record of the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointRecord {
    pub seq: u64,
    /// The CP was writing every record up to this seq.
    pub upto: u64,
}

/// Counts of everything replay looked at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Write records to replay.
    pub replayed: u64,
    /// Pad records in the chain (nothing to replay).
    pub pads: u64,
    /// Torn records at the end of the chain, discarded (never acknowledged).
    pub discarded_torn: u64,
    /// Valid records after a torn one that no acknowledgement covers, discarded.
    pub discarded_unacked: u64,
    /// Valid records past the end of the chain from an older lap or format, ignored.
    pub stale_ignored: u64,
    /// Everything up to here is already on the members.
    pub trimmed_seq: u64,
    /// Last record of the chain (== trimmed_seq when nothing is to replay).
    pub last_seq: u64,
}

/// A successful scan: what to replay, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    pub header: RegionHeader,
    pub records: Vec<ReplayRecord>,
    /// Whole stripes written to the members directly, whose parity replay recomputes.
    pub stripes: Vec<StripesRecord>,
    /// Consistency points that started writing the log to the members.
    pub checkpoints: Vec<CheckpointRecord>,
    pub report: ReplayReport,
    /// Region offset just past the last record of the chain.
    pub tail_offset: usize,
    /// Region offset where the chain starts (the trim slot's head).
    pub head_offset: usize,
    /// Ring bytes the chain occupies.
    pub chain_bytes: usize,
}

impl Replay {
    /// Was a consistency point writing records of this log to the members in place when it
    /// stopped? `Some(upto)`: the records with seq in `(report.trimmed_seq, upto]` may have
    /// been, so the stripes they touch may hold parity that disagrees with their data. A log
    /// of format version 1 does not say: every record of it may have been.
    pub fn checkpoint_in_flight(&self) -> Option<u64> {
        let trimmed = self.report.trimmed_seq;
        if self.header.version < 2 {
            return (self.report.last_seq > trimmed).then_some(self.report.last_seq);
        }
        self.checkpoints
            .iter()
            .map(|c| c.upto)
            .filter(|&u| u > trimmed)
            .max()
    }

    /// Payload bytes of a record.
    pub fn payload<'a>(&self, region: &'a [u8], r: &ReplayRecord) -> &'a [u8] {
        &region[r.payload.clone()]
    }
}

fn read_slot(region: &[u8], i: usize, epoch: u64) -> Option<TrimSlot> {
    let at = TRIM_SLOT_OFFSETS[i];
    let b: &[u8; 64] = region[at..at + 64].try_into().ok()?;
    TrimSlot::decode(b).ok().filter(|s| s.epoch == epoch)
}

/// Scan a region and decide what to replay; see the decision table in the module docs.
/// Never panics on arbitrary bytes.
///
/// After replaying, the caller runs a consistency point and formats the region with a new
/// epoch before appending again: discarded records may still sit past the tail, and only a
/// new epoch guarantees that they never continue the new log.
pub fn scan(region: &[u8], expect: &Expect) -> Result<Replay, ReplayError> {
    if region.len() < DATA_START {
        return Err(ReplayError::RegionSizeMismatch {
            header: 0,
            actual: region.len(),
        });
    }
    let hb: &[u8; 64] = region[..64].try_into().expect("64 bytes");
    if hb.iter().all(|&b| b == 0) {
        return Err(ReplayError::NotFormatted);
    }
    let header = RegionHeader::decode(hb).map_err(ReplayError::HeaderCorrupt)?;
    if header.region_bytes != region.len() as u64 || check_region_size(region.len()).is_err() {
        return Err(ReplayError::RegionSizeMismatch {
            header: header.region_bytes,
            actual: region.len(),
        });
    }
    if header.aggregate != expect.aggregate {
        return Err(ReplayError::WrongAggregate {
            expected: expect.aggregate,
            found: header.aggregate,
        });
    }
    if header.generation != expect.generation {
        return Err(ReplayError::WrongGeneration {
            expected: expect.generation,
            found: header.generation,
        });
    }
    let slot = match (
        read_slot(region, 0, header.epoch),
        read_slot(region, 1, header.epoch),
    ) {
        (Some(a), Some(b)) => {
            if a.counter >= b.counter {
                a
            } else {
                b
            }
        }
        (Some(a), None) => a,
        (None, Some(b)) => b,
        (None, None) => return Err(ReplayError::TrimSlotsCorrupt),
    };
    let ring_end = region.len();
    let ring_bytes = ring_end - DATA_START;
    let head = slot.head_offset;
    if head < DATA_START as u64 || head >= ring_end as u64 || head % RECORD_ALIGN as u64 != 0 {
        return Err(ReplayError::BadHeadOffset(head));
    }

    let mut report = ReplayReport {
        trimmed_seq: slot.trimmed_seq,
        ..ReplayReport::default()
    };
    let mut records = Vec::new();
    let mut stripes = Vec::new();
    let mut checkpoints = Vec::new();
    let mut pos = head as usize;
    let mut walked = 0usize;
    let mut expected = slot.trimmed_seq + 1;
    // Why the chain ended, if not by walking the whole ring.
    let mut damage = None;
    loop {
        if pos == ring_end {
            pos = DATA_START;
        }
        if walked >= ring_bytes {
            break;
        }
        match parse_record(region, pos, ring_end) {
            Parsed::NotRecord => {
                damage = Some(Damage::Missing);
                break;
            }
            Parsed::Torn => {
                damage = Some(Damage::ChecksumMismatch);
                break;
            }
            Parsed::Valid(h) => {
                if h.epoch != header.epoch || h.seq < expected {
                    damage = Some(Damage::Stale);
                    break;
                }
                if h.aggregate != header.aggregate {
                    return Err(ReplayError::ForeignAggregate {
                        seq: h.seq,
                        found: h.aggregate,
                        region_offset: pos,
                    });
                }
                if h.generation != header.generation {
                    return Err(ReplayError::ForeignGeneration {
                        seq: h.seq,
                        found: h.generation,
                        expected: header.generation,
                        region_offset: pos,
                    });
                }
                if h.seq > expected {
                    return Err(ReplayError::SequenceGap {
                        expected,
                        found: h.seq,
                        region_offset: pos,
                    });
                }
                let footprint = match h.kind {
                    RecordKind::Pad => {
                        report.pads += 1;
                        ring_end - pos
                    }
                    RecordKind::Write => {
                        let body = pos + RecordHeader::BYTES;
                        records.push(ReplayRecord {
                            seq: h.seq,
                            offset: h.offset,
                            payload: body..body + h.length as usize,
                        });
                        report.replayed += 1;
                        record_footprint(h.length as usize)
                    }
                    RecordKind::Stripes => {
                        let body = pos + RecordHeader::BYTES;
                        let mut len = [0u8; STRIPES_PAYLOAD];
                        len.copy_from_slice(&region[body..body + STRIPES_PAYLOAD]);
                        stripes.push(StripesRecord {
                            seq: h.seq,
                            offset: h.offset,
                            len: u64::from_le_bytes(len),
                        });
                        record_footprint(h.length as usize)
                    }
                    RecordKind::Checkpoint => {
                        let body = pos + RecordHeader::BYTES;
                        let mut upto = [0u8; CHECKPOINT_PAYLOAD];
                        upto.copy_from_slice(&region[body..body + CHECKPOINT_PAYLOAD]);
                        checkpoints.push(CheckpointRecord {
                            seq: h.seq,
                            upto: u64::from_le_bytes(upto),
                        });
                        record_footprint(h.length as usize)
                    }
                };
                walked += footprint;
                pos += footprint;
                expected += 1;
            }
        }
    }
    let tail_offset = if pos == ring_end { DATA_START } else { pos };
    report.last_seq = expected - 1;

    if let Some(damage) = damage {
        // The chain broke at `pos`. Whatever of this log lies beyond it (up to the head) tells
        // whether the missing record `expected` had been acknowledged.
        let mut q = pos;
        let mut left = ring_bytes - walked;
        let mut unacked = 0u64;
        let mut stale = 0u64;
        while left > 0 {
            if q == ring_end {
                q = DATA_START;
            }
            let step = match parse_record(region, q, ring_end) {
                Parsed::Valid(h) => {
                    let ours = h.epoch == header.epoch
                        && h.aggregate == header.aggregate
                        && h.generation == header.generation;
                    if ours && h.seq >= expected {
                        if h.acked_seq() >= expected {
                            return Err(ReplayError::LostAcknowledged {
                                seq: expected,
                                region_offset: pos,
                                damage,
                                proven_by_seq: h.seq,
                            });
                        }
                        unacked += 1;
                    } else {
                        stale += 1;
                    }
                    match h.kind {
                        RecordKind::Pad => ring_end - q,
                        RecordKind::Write | RecordKind::Stripes | RecordKind::Checkpoint => {
                            record_footprint(h.length as usize)
                        }
                    }
                }
                _ => RECORD_ALIGN,
            };
            let step = step.min(left);
            q += step;
            left -= step;
        }
        if damage == Damage::ChecksumMismatch {
            report.discarded_torn = 1;
        }
        report.discarded_unacked = unacked;
        report.stale_ignored = stale;
    }
    Ok(Replay {
        header,
        records,
        stripes,
        checkpoints,
        report,
        tail_offset,
        head_offset: head as usize,
        chain_bytes: walked,
    })
}

/// Before a replay writes the records of a scanned log to the members in place: append, right
/// after the chain, a [`RecordKind::Checkpoint`] record naming all of them, so that a crash
/// during the replay leaves a log that says so (see [`Replay::checkpoint_in_flight`]). Returns
/// the bytes written (to be made durable before the replay writes), or `None` when there is
/// nothing to replay or no room right at the tail (the ring is full, or only a pad would
/// make room: the caller goes on without, and says so).
///
/// What lay past the tail (a torn record, the rest of a torn group commit, older laps) was
/// never acknowledged or is stale: the record overwrites the start of it, and the header slot
/// after the record is zeroed, so that no record of a torn group commit that happens to
/// start there continues the chain. The record is the new end of the chain; what a scan
/// discards after it changes accordingly (the caller reports the first scan's counts).
pub fn append_replay_checkpoint(region: &mut [u8], replay: &Replay) -> Option<Range<usize>> {
    let trimmed = replay.report.trimmed_seq;
    let last = replay.report.last_seq;
    if last <= trimmed || region.len() != replay.header.region_bytes as usize {
        return None;
    }
    let footprint = record_footprint(CHECKPOINT_PAYLOAD);
    // The record, then a zeroed header slot, both before the ring's end and the chain's head.
    let span = footprint + RecordHeader::BYTES;
    let (tail, head, ring_end) = (replay.tail_offset, replay.head_offset, region.len());
    let ring_bytes = ring_end - DATA_START;
    let fits = if replay.chain_bytes >= ring_bytes {
        false
    } else if tail >= head {
        tail + span <= ring_end
    } else {
        tail + span <= head
    };
    if !fits {
        return None;
    }
    let payload = last.to_le_bytes();
    let hdr = RecordHeader {
        kind: RecordKind::Checkpoint,
        acked_delta: 0,
        seq: last + 1,
        aggregate: replay.header.aggregate,
        generation: replay.header.generation,
        epoch: replay.header.epoch,
        offset: 0,
        length: CHECKPOINT_PAYLOAD as u32,
    };
    put(region, tail, &hdr.encode(&payload));
    let body = tail + RecordHeader::BYTES;
    region[body..body + CHECKPOINT_PAYLOAD].copy_from_slice(&payload);
    region[body + CHECKPOINT_PAYLOAD..tail + span].fill(0);
    Some(tail..tail + span)
}

// ---------------------------------------------------------------------------------------------
// Write cache
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Extent {
    end: u64,
    seq: u64,
    data: Arc<[u8]>,
    /// Index in `data` of the extent's first byte.
    data_off: usize,
}

/// One piece of a read that the log holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheHit<'a> {
    /// Aggregate byte offset of the piece.
    pub offset: u64,
    pub seq: u64,
    pub data: &'a [u8],
}

/// Which aggregate bytes the un-trimmed log holds, newest write winning, so that reads see
/// acknowledged writes that are only in the log. Extents never overlap.
#[derive(Debug, Clone, Default)]
pub struct WriteCache {
    extents: BTreeMap<u64, Extent>,
}

impl WriteCache {
    pub fn new() -> WriteCache {
        WriteCache::default()
    }

    /// The cache for everything a successful scan would replay.
    pub fn from_replay(region: &[u8], replay: &Replay) -> WriteCache {
        let mut c = WriteCache::new();
        for r in &replay.records {
            c.insert(r.seq, r.offset, Arc::from(replay.payload(region, r)));
        }
        c
    }

    /// Number of disjoint extents held.
    pub fn extent_count(&self) -> usize {
        self.extents.len()
    }

    /// Record that write `seq` put `data` at `offset`. Where it overlaps a newer write (higher
    /// seq) the newer one stays; elsewhere it replaces what was there.
    pub fn insert(&mut self, seq: u64, offset: u64, data: Arc<[u8]>) {
        if data.is_empty() {
            return;
        }
        let start = offset;
        let end = offset.saturating_add(data.len() as u64);
        // Extents overlapping [start, end): the one starting before `start`, plus those inside.
        let mut overlapping: Vec<u64> = Vec::new();
        if let Some((&k, e)) = self.extents.range(..start).next_back() {
            if e.end > start {
                overlapping.push(k);
            }
        }
        overlapping.extend(self.extents.range(start..end).map(|(&k, _)| k));
        let mut cursor = start;
        for k in overlapping {
            let e = self.extents.remove(&k).expect("present");
            if e.seq > seq {
                if cursor < k {
                    self.put_piece(cursor, k, seq, &data, start);
                }
                cursor = cursor.max(e.end);
                self.extents.insert(k, e);
                continue;
            }
            // Older: keep only what lies outside [start, end).
            if k < start {
                self.extents.insert(
                    k,
                    Extent {
                        end: start,
                        ..e.clone()
                    },
                );
            }
            if e.end > end {
                let skip = (end - k) as usize;
                self.extents.insert(
                    end,
                    Extent {
                        end: e.end,
                        seq: e.seq,
                        data: e.data,
                        data_off: e.data_off + skip,
                    },
                );
            }
        }
        if cursor < end {
            self.put_piece(cursor, end, seq, &data, start);
        }
    }

    fn put_piece(&mut self, from: u64, to: u64, seq: u64, data: &Arc<[u8]>, data_start: u64) {
        self.extents.insert(
            from,
            Extent {
                end: to,
                seq,
                data: Arc::clone(data),
                data_off: (from - data_start) as usize,
            },
        );
    }

    /// The pieces of `[offset, offset + len)` the log holds, in offset order.
    pub fn lookup(&self, offset: u64, len: u64) -> Vec<CacheHit<'_>> {
        let end = offset.saturating_add(len);
        let mut hits = Vec::new();
        let first = self
            .extents
            .range(..=offset)
            .next_back()
            .filter(|(_, e)| e.end > offset)
            .map(|(&k, _)| k)
            .unwrap_or(offset);
        for (&k, e) in self.extents.range(first..end) {
            let from = k.max(offset);
            let to = e.end.min(end);
            if from >= to {
                continue;
            }
            let a = e.data_off + (from - k) as usize;
            let b = a + (to - from) as usize;
            hits.push(CacheHit {
                offset: from,
                seq: e.seq,
                data: &e.data[a..b],
            });
        }
        hits
    }

    /// Copy what the log holds of `[offset, offset + buf.len())` over `buf` (which holds what
    /// the members returned); returns how many bytes came from the log.
    pub fn overlay(&self, offset: u64, buf: &mut [u8]) -> usize {
        let mut n = 0;
        for h in self.lookup(offset, buf.len() as u64) {
            let at = (h.offset - offset) as usize;
            buf[at..at + h.data.len()].copy_from_slice(h.data);
            n += h.data.len();
        }
        n
    }

    /// A consistency point put every write up to `seq` on the members: forget them.
    pub fn trim(&mut self, seq: u64) {
        self.extents.retain(|_, e| e.seq > seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const AGG: Uuid = Uuid::from_bytes([7; 16]);
    const OTHER: Uuid = Uuid::from_bytes([9; 16]);
    const GEN: u64 = 7;
    const EXPECT: Expect = Expect {
        aggregate: AGG,
        generation: GEN,
    };
    const REGION: usize = DATA_START + 16 * 1024;

    fn fresh(epoch: u64) -> (Vec<u8>, LogAppender) {
        let mut region = vec![0u8; REGION];
        let log = LogAppender::format(&mut region, AGG, GEN, epoch).unwrap();
        (region, log)
    }

    fn payload(seq: u64, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (seq.wrapping_mul(31).wrapping_add(i as u64)) as u8)
            .collect()
    }

    /// Append records `n` of `len` bytes at offsets `seq * 4096`, commit and acknowledge them.
    fn append_acked(region: &mut [u8], log: &mut LogAppender, n: usize, len: usize) -> Vec<u64> {
        let seqs = append_unacked(region, log, n, len);
        let c = log.commit();
        log.mark_acked(c.last_seq).unwrap();
        seqs
    }

    fn append_unacked(region: &mut [u8], log: &mut LogAppender, n: usize, len: usize) -> Vec<u64> {
        (0..n)
            .map(|_| {
                let seq = log.next_seq();
                log.append(region, seq * 4096, &payload(seq, len)).unwrap()
            })
            .collect()
    }

    /// Region offset of record `seq`, found by walking valid records from DATA_START.
    fn record_at(region: &[u8], seq: u64) -> usize {
        let mut pos = DATA_START;
        while pos < region.len() {
            match parse_record(region, pos, region.len()) {
                Parsed::Valid(h) if h.seq == seq => return pos,
                Parsed::Valid(h) => pos += record_footprint(h.length as usize),
                _ => pos += RECORD_ALIGN,
            }
        }
        panic!("record {seq} not found");
    }

    /// Rewrite record `seq`'s header with `f` applied, with a correct crc.
    fn rewrite(region: &mut [u8], seq: u64, f: impl FnOnce(&mut RecordHeader)) {
        let at = record_at(region, seq);
        let Parsed::Valid(mut h) = parse_record(region, at, region.len()) else {
            unreachable!()
        };
        f(&mut h);
        let body = at + RecordHeader::BYTES;
        let p = region[body..body + h.length as usize].to_vec();
        region[at..at + 64].copy_from_slice(&h.encode(&p));
    }

    fn seqs(r: &Replay) -> Vec<u64> {
        r.records.iter().map(|r| r.seq).collect()
    }

    #[test]
    fn checkpoint_records_say_which_records_a_cp_in_flight_writes() {
        let (mut region, mut log) = fresh(1);
        append_acked(&mut region, &mut log, 3, 100);
        assert_eq!(scan(&region, &EXPECT).unwrap().checkpoint_in_flight(), None);
        // A CP of 1..=3 starts (its record is seq 4), a write arrives meanwhile (seq 5).
        assert_eq!(log.append_checkpoint(&mut region, 3).unwrap(), 4);
        append_acked(&mut region, &mut log, 1, 100);
        let r = scan(&region, &EXPECT).unwrap();
        assert_eq!(r.checkpoints, vec![CheckpointRecord { seq: 4, upto: 3 }]);
        assert_eq!(
            seqs(&r),
            vec![1, 2, 3, 5],
            "a checkpoint record is no write"
        );
        assert_eq!(r.checkpoint_in_flight(), Some(3));
        // The CP completes: its own record stays (seq 4 > 3) but names nothing in flight.
        log.trim(&mut region, 3).unwrap();
        log.trim_persisted();
        let r = scan(&region, &EXPECT).unwrap();
        assert_eq!(r.checkpoints.len(), 1);
        assert_eq!(r.checkpoint_in_flight(), None);
    }

    #[test]
    fn a_replay_checkpoint_ends_the_chain_even_over_a_torn_group_commit() {
        let (mut region, mut log) = fresh(1);
        append_acked(&mut region, &mut log, 3, 100);
        // A torn group commit: record 4 (a checkpoint record's size) torn, record 5 valid
        // right behind it, never acknowledged.
        append_unacked(&mut region, &mut log, 2, 64);
        log.commit();
        let at4 = record_at(&region, 4);
        region[at4 + RecordHeader::BYTES] ^= 1;
        let before = scan(&region, &EXPECT).unwrap();
        assert_eq!(seqs(&before), vec![1, 2, 3]);
        assert_eq!(
            (
                before.report.discarded_torn,
                before.report.discarded_unacked
            ),
            (1, 1)
        );
        let r = append_replay_checkpoint(&mut region, &before).unwrap();
        assert_eq!(r.start, at4);
        let after = scan(&region, &EXPECT).unwrap();
        assert_eq!(
            seqs(&after),
            vec![1, 2, 3],
            "record 5 does not join the chain"
        );
        assert_eq!(
            after.checkpoints,
            vec![CheckpointRecord { seq: 4, upto: 3 }]
        );
        assert_eq!(after.checkpoint_in_flight(), Some(3));
        assert_eq!(
            after.report.discarded_unacked, 0,
            "its header slot was zeroed: it is gone"
        );
        // Nothing to replay: nothing to mark.
        let (mut empty, _log) = fresh(2);
        let r = scan(&empty, &EXPECT).unwrap();
        assert_eq!(append_replay_checkpoint(&mut empty, &r), None);
    }

    #[test]
    fn a_version_1_log_replays_and_may_have_had_a_cp_in_flight_anywhere() {
        let (mut region, mut log) = fresh(1);
        append_acked(&mut region, &mut log, 3, 100);
        let mut h = RegionHeader::decode(region[..64].try_into().unwrap()).unwrap();
        assert_eq!(h.version, LOG_VERSION);
        h.version = 1;
        region[..64].copy_from_slice(&h.encode());
        let r = scan(&region, &EXPECT).unwrap();
        assert_eq!(seqs(&r), vec![1, 2, 3]);
        assert_eq!(
            r.checkpoint_in_flight(),
            Some(3),
            "it does not say: all of it"
        );
        // A version this code does not know is refused, not guessed at.
        h.version = LOG_VERSION + 1;
        region[..64].copy_from_slice(&h.encode());
        assert_eq!(
            scan(&region, &EXPECT).unwrap_err(),
            ReplayError::HeaderCorrupt(FormatError::BadVersion(LOG_VERSION + 1))
        );
    }

    #[test]
    fn a_ring_full_of_client_records_still_takes_a_checkpoint_record() {
        let (mut region, mut log) = fresh(1);
        log.set_reserve(CHECKPOINT_RESERVE);
        let mut n = 0;
        loop {
            match log.append(&mut region, 0, &[1; 300]) {
                Ok(_) => n += 1,
                Err(e) => {
                    assert!(e.is_full(), "{e:?}");
                    break;
                }
            }
        }
        assert!(n > 10);
        let c = log.commit();
        log.mark_acked(c.last_seq).unwrap();
        let seq = log.append_checkpoint(&mut region, c.last_seq).unwrap();
        assert_eq!(seq, c.last_seq + 1);
        assert!(log.append(&mut region, 0, &[1; 300]).unwrap_err().is_full());
        log.commit();
        assert_eq!(
            scan(&region, &EXPECT).unwrap().checkpoint_in_flight(),
            Some(c.last_seq)
        );
    }

    #[test]
    fn row_empty() {
        let (region, _log) = fresh(1);
        let r = scan(&region, &EXPECT).unwrap();
        assert!(r.records.is_empty());
        assert_eq!(r.report, ReplayReport::default());
        assert_eq!(r.tail_offset, DATA_START);
    }

    #[test]
    fn row_clean() {
        let (mut region, mut log) = fresh(1);
        append_acked(&mut region, &mut log, 5, 100);
        let r = scan(&region, &EXPECT).unwrap();
        assert_eq!(seqs(&r), vec![1, 2, 3, 4, 5]);
        for rec in &r.records {
            assert_eq!(rec.offset, rec.seq * 4096);
            assert_eq!(r.payload(&region, rec), &payload(rec.seq, 100)[..]);
        }
        assert_eq!(r.report.replayed, 5);
        assert_eq!(r.report.last_seq, 5);
        assert_eq!(
            (r.report.discarded_torn, r.report.discarded_unacked),
            (0, 0)
        );
        assert_eq!(r.tail_offset, DATA_START + 5 * record_footprint(100));
    }

    #[test]
    fn stripes_records_scan_in_the_chain_and_a_bad_length_is_torn() {
        let (mut region, mut log) = fresh(1);
        append_acked(&mut region, &mut log, 2, 100);
        let s = log.append_stripes(&mut region, 1 << 20, 3 << 18).unwrap();
        append_acked(&mut region, &mut log, 1, 100);
        let r = scan(&region, &EXPECT).unwrap();
        assert_eq!(seqs(&r), vec![1, 2, 4], "write records only");
        assert_eq!(
            r.stripes,
            vec![StripesRecord {
                seq: s,
                offset: 1 << 20,
                len: 3 << 18
            }]
        );
        assert_eq!(r.report.last_seq, 4);
        assert_eq!(
            r.tail_offset,
            DATA_START + 3 * record_footprint(100) + record_footprint(STRIPES_PAYLOAD)
        );
        // A Stripes header claiming another payload length is damage, not a record.
        let at = record_at(&region, s);
        let Parsed::Valid(mut h) = parse_record(&region, at, region.len()) else {
            unreachable!()
        };
        h.length = 16;
        let p = region[at + 64..at + 80].to_vec();
        region[at..at + 64].copy_from_slice(&h.encode(&p));
        assert!(matches!(
            parse_record(&region, at, region.len()),
            Parsed::Torn
        ));
    }

    #[test]
    fn row_torn_tail_payload() {
        let (mut region, mut log) = fresh(1);
        append_acked(&mut region, &mut log, 4, 100);
        append_unacked(&mut region, &mut log, 1, 100);
        let at = record_at(&region, 5);
        region[at + 64 + 50] ^= 0xFF;
        let r = scan(&region, &EXPECT).unwrap();
        assert_eq!(seqs(&r), vec![1, 2, 3, 4]);
        assert_eq!(r.report.discarded_torn, 1);
        assert_eq!(r.report.discarded_unacked, 0);
        assert_eq!(r.report.last_seq, 4);
        assert_eq!(r.tail_offset, at);
    }

    #[test]
    fn row_torn_tail_half_header() {
        let (mut region, mut log) = fresh(1);
        append_acked(&mut region, &mut log, 4, 100);
        append_unacked(&mut region, &mut log, 1, 100);
        let at = record_at(&region, 5);
        // Only the first cache-line half reached NVRAM: the second half is zero.
        region[at + 32..at + 64].fill(0);
        let r = scan(&region, &EXPECT).unwrap();
        assert_eq!(seqs(&r), vec![1, 2, 3, 4]);
        assert_eq!(r.report.discarded_torn, 1);
    }

    #[test]
    fn row_torn_group_commit_discards_the_group() {
        let (mut region, mut log) = fresh(1);
        append_acked(&mut region, &mut log, 3, 100);
        append_unacked(&mut region, &mut log, 3, 100); // 4, 5, 6: one group, never acknowledged
        let at = record_at(&region, 4);
        region[at + 64] ^= 1;
        let r = scan(&region, &EXPECT).unwrap();
        assert_eq!(seqs(&r), vec![1, 2, 3]);
        assert_eq!(r.report.discarded_torn, 1);
        assert_eq!(r.report.discarded_unacked, 2);
    }

    #[test]
    fn row_checksum_mismatch_in_the_middle_refuses() {
        let (mut region, mut log) = fresh(1);
        append_acked(&mut region, &mut log, 3, 100);
        append_unacked(&mut region, &mut log, 2, 100); // 4 and 5 say "acked up to 3"
        let at = record_at(&region, 2);
        region[at + 64 + 10] ^= 0x40;
        let err = scan(&region, &EXPECT).unwrap_err();
        assert_eq!(
            err,
            ReplayError::LostAcknowledged {
                seq: 2,
                region_offset: at,
                damage: Damage::ChecksumMismatch,
                proven_by_seq: 4
            }
        );
    }

    #[test]
    fn row_missing_record_in_the_middle_refuses() {
        let (mut region, mut log) = fresh(1);
        append_acked(&mut region, &mut log, 3, 100);
        append_unacked(&mut region, &mut log, 1, 100);
        let at = record_at(&region, 3);
        region[at..at + 64].fill(0);
        let err = scan(&region, &EXPECT).unwrap_err();
        assert!(matches!(
            err,
            ReplayError::LostAcknowledged {
                seq: 3,
                damage: Damage::Missing,
                proven_by_seq: 4,
                ..
            }
        ));
    }

    #[test]
    fn row_sequence_gap_refuses() {
        let (mut region, mut log) = fresh(1);
        append_acked(&mut region, &mut log, 4, 100);
        let at = record_at(&region, 3);
        rewrite(&mut region, 3, |h| h.seq = 9);
        assert_eq!(
            scan(&region, &EXPECT).unwrap_err(),
            ReplayError::SequenceGap {
                expected: 3,
                found: 9,
                region_offset: at
            }
        );
    }

    #[test]
    fn row_record_of_another_aggregate_refuses() {
        let (mut region, mut log) = fresh(1);
        append_acked(&mut region, &mut log, 4, 100);
        rewrite(&mut region, 2, |h| h.aggregate = OTHER);
        let err = scan(&region, &EXPECT).unwrap_err();
        assert!(
            matches!(
                err,
                ReplayError::ForeignAggregate {
                    seq: 2,
                    found: OTHER,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn row_record_of_another_generation_refuses() {
        let (mut region, mut log) = fresh(1);
        append_acked(&mut region, &mut log, 4, 100);
        rewrite(&mut region, 4, |h| h.generation = GEN + 1);
        let err = scan(&region, &EXPECT).unwrap_err();
        assert!(
            matches!(
                err,
                ReplayError::ForeignGeneration {
                    seq: 4,
                    found: 8,
                    expected: GEN,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn row_records_of_an_earlier_format_end_the_log() {
        let (mut region, mut log) = fresh(1);
        append_acked(&mut region, &mut log, 5, 100);
        let mut log = LogAppender::format(&mut region, AGG, GEN, 2).unwrap();
        append_acked(&mut region, &mut log, 2, 100);
        let r = scan(&region, &EXPECT).unwrap();
        assert_eq!(seqs(&r), vec![1, 2]);
        assert_eq!(
            r.report.stale_ignored, 3,
            "old records 3..5 lie past the tail"
        );
        assert_eq!(r.report.discarded_torn + r.report.discarded_unacked, 0);
    }

    #[test]
    fn row_header_corrupt_refuses() {
        let (mut region, mut log) = fresh(1);
        append_acked(&mut region, &mut log, 2, 100);
        region[20] ^= 1;
        assert!(matches!(
            scan(&region, &EXPECT).unwrap_err(),
            ReplayError::HeaderCorrupt(FormatError::BadChecksum { .. })
        ));
        region[..8].copy_from_slice(b"NOTALOG!");
        assert_eq!(
            scan(&region, &EXPECT).unwrap_err(),
            ReplayError::HeaderCorrupt(FormatError::BadMagic)
        );
    }

    #[test]
    fn row_not_formatted_refuses() {
        let region = vec![0u8; REGION];
        assert_eq!(
            scan(&region, &EXPECT).unwrap_err(),
            ReplayError::NotFormatted
        );
    }

    #[test]
    fn row_header_of_another_aggregate_generation_or_size_refuses() {
        let (region, _log) = fresh(1);
        let other = Expect {
            aggregate: OTHER,
            generation: GEN,
        };
        assert_eq!(
            scan(&region, &other).unwrap_err(),
            ReplayError::WrongAggregate {
                expected: OTHER,
                found: AGG
            }
        );
        let newer = Expect {
            aggregate: AGG,
            generation: GEN + 1,
        };
        assert_eq!(
            scan(&region, &newer).unwrap_err(),
            ReplayError::WrongGeneration {
                expected: GEN + 1,
                found: GEN
            }
        );
        let mut longer = region.clone();
        longer.extend_from_slice(&[0; 64]);
        assert!(matches!(
            scan(&longer, &EXPECT).unwrap_err(),
            ReplayError::RegionSizeMismatch { .. }
        ));
    }

    #[test]
    fn row_trim_slots() {
        let (mut region, mut log) = fresh(1);
        append_acked(&mut region, &mut log, 4, 100);
        let slot = log.trim(&mut region, 2).unwrap().unwrap();
        log.trim_persisted();
        assert_eq!(seqs(&scan(&region, &EXPECT).unwrap()), vec![3, 4]);
        // A torn write of the newest slot falls back to the older one: 1..2 replay again,
        // which is harmless (the CP already wrote the same data in the same order).
        region[slot.start + 30] ^= 1;
        assert_eq!(seqs(&scan(&region, &EXPECT).unwrap()), vec![1, 2, 3, 4]);
        for at in TRIM_SLOT_OFFSETS {
            region[at] ^= 1;
        }
        assert_eq!(
            scan(&region, &EXPECT).unwrap_err(),
            ReplayError::TrimSlotsCorrupt
        );
    }

    #[test]
    fn header_and_slot_round_trip() {
        let h = RegionHeader {
            version: LOG_VERSION,
            aggregate: AGG,
            generation: 3,
            region_bytes: 1 << 20,
            epoch: 0xdead,
        };
        assert_eq!(RegionHeader::decode(&h.encode()).unwrap(), h);
        let s = TrimSlot {
            epoch: 5,
            counter: 9,
            trimmed_seq: 77,
            head_offset: 8192,
        };
        assert_eq!(TrimSlot::decode(&s.encode()).unwrap(), s);
        let mut b = h.encode();
        b[8] ^= 4;
        assert!(matches!(
            RegionHeader::decode(&b),
            Err(FormatError::BadChecksum { .. })
        ));
    }

    #[test]
    fn format_rejects_bad_sizes() {
        let mut small = vec![0u8; DATA_START + MIN_RING_BYTES - 64];
        assert!(LogAppender::format(&mut small, AGG, GEN, 1).is_err());
        let mut odd = vec![0u8; REGION + 1];
        assert!(LogAppender::format(&mut odd, AGG, GEN, 1).is_err());
    }

    #[test]
    fn group_commit_returns_merged_ranges_and_seqs() {
        let (mut region, mut log) = fresh(1);
        let c0 = log.commit();
        assert_eq!(c0.ranges, vec![0..DATA_START]);
        assert_eq!((c0.first_seq, c0.last_seq), (1, 0));
        append_unacked(&mut region, &mut log, 3, 10);
        let c = log.commit();
        assert_eq!((c.first_seq, c.last_seq), (1, 3));
        assert_eq!(c.ranges, vec![DATA_START..DATA_START + 3 * 128]);
        assert_eq!(log.commit().ranges, Vec::<Range<usize>>::new());
        assert_eq!(
            log.mark_acked(4),
            Err(TrimError::AckBeyondCommitted {
                seq: 4,
                committed: 3
            })
        );
        assert_eq!(
            log.trim(&mut region, 1),
            Err(TrimError::TrimBeyondAcked { seq: 1, acked: 0 })
        );
        log.mark_acked(3).unwrap();
        assert!(log.trim(&mut region, 3).unwrap().is_some());
    }

    #[test]
    fn full_until_trim_persisted_then_wraps_with_a_pad() {
        let (mut region, mut log) = fresh(1);
        let len = 1000; // footprint 1088: 15 fit in 16 KiB
        let n = (REGION - DATA_START) / record_footprint(len);
        append_acked(&mut region, &mut log, n, len);
        let err = log.append(&mut region, 0, &[1; 1000]).unwrap_err();
        assert!(err.is_full(), "{err:?}");
        log.trim(&mut region, 3).unwrap();
        // Not yet durable: the space is not reused.
        assert!(log
            .append(&mut region, 0, &[1; 1000])
            .unwrap_err()
            .is_full());
        log.trim_persisted();
        let s1 = log
            .append(&mut region, 1 << 20, &payload(100, len))
            .unwrap();
        // seq n+1 is the pad at the end of the ring.
        assert_eq!(s1, n as u64 + 2);
        let c = log.commit();
        assert_eq!(
            c.ranges.len(),
            2,
            "pad at the end and the record at the start: {:?}",
            c.ranges
        );
        log.mark_acked(c.last_seq).unwrap();
        let r = scan(&region, &EXPECT).unwrap();
        let mut want: Vec<u64> = (4..=n as u64).collect();
        want.push(s1);
        assert_eq!(seqs(&r), want);
        assert_eq!(r.report.pads, 1);
        assert_eq!(r.report.trimmed_seq, 3);
        let last = r.records.last().unwrap();
        assert_eq!(r.payload(&region, last), &payload(100, len)[..]);
        assert_eq!(last.payload.start, DATA_START + 64);
    }

    #[test]
    fn too_large_is_not_full() {
        let (mut region, mut log) = fresh(1);
        let err = log
            .append(&mut region, 0, &vec![0; log.max_payload() + 1])
            .unwrap_err();
        assert!(matches!(err, AppendError::TooLarge { .. }) && !err.is_full());
        log.append(&mut region, 0, &vec![0; log.max_payload()])
            .unwrap();
    }

    #[test]
    fn exactly_full_ring_replays_everything() {
        let (mut region, mut log) = fresh(1);
        let len = (REGION - DATA_START) / 4 - 64;
        append_acked(&mut region, &mut log, 4, len);
        assert_eq!(log.free_bytes(), 0);
        let r = scan(&region, &EXPECT).unwrap();
        assert_eq!(seqs(&r), vec![1, 2, 3, 4]);
    }

    #[test]
    fn write_cache_newest_wins_and_trims() {
        let mut c = WriteCache::new();
        c.insert(1, 100, Arc::from(&[1u8; 100][..]));
        c.insert(2, 150, Arc::from(&[2u8; 20][..]));
        c.insert(3, 90, Arc::from(&[3u8; 20][..]));
        let mut buf = [0u8; 120];
        assert_eq!(c.overlay(90, &mut buf), 110);
        assert_eq!(&buf[..20], &[3u8; 20]);
        assert_eq!(&buf[20..60], &[1u8; 40]);
        assert_eq!(&buf[60..80], &[2u8; 20]);
        assert_eq!(&buf[80..110], &[1u8; 30]);
        assert_eq!(&buf[110..], &[0u8; 10]);
        // An older write inserted late does not hide a newer one.
        c.insert(0, 140, Arc::from(&[9u8; 40][..]));
        assert_eq!(
            c.lookup(150, 20),
            vec![CacheHit {
                offset: 150,
                seq: 2,
                data: &[2u8; 20][..]
            }]
        );
        c.trim(2);
        let hits = c.lookup(0, 1000);
        assert_eq!(hits.len(), 1);
        assert_eq!(
            (hits[0].offset, hits[0].seq, hits[0].data.len()),
            (90, 3, 20)
        );
    }

    #[test]
    fn write_cache_from_replay() {
        let (mut region, mut log) = fresh(1);
        log.append(&mut region, 0, &[1; 300]).unwrap();
        log.append(&mut region, 100, &[2; 100]).unwrap();
        log.commit();
        let r = scan(&region, &EXPECT).unwrap();
        let c = WriteCache::from_replay(&region, &r);
        let mut buf = [0u8; 300];
        assert_eq!(c.overlay(0, &mut buf), 300);
        assert_eq!(&buf[..100], &[1; 100]);
        assert_eq!(&buf[100..200], &[2; 100]);
        assert_eq!(&buf[200..], &[1; 100]);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// The write cache against a flat byte model.
        #[test]
        fn write_cache_matches_flat_model(
            ops in proptest::collection::vec((0u64..500, 1usize..120, any::<u8>(), any::<bool>()), 1..40)
        ) {
            let mut cache = WriteCache::new();
            let mut model: Vec<Option<(u64, u8)>> = vec![None; 700];
            let mut seq = 0;
            for (off, len, byte, trim) in ops {
                if trim && seq > 0 {
                    let upto = seq / 2;
                    cache.trim(upto);
                    for m in model.iter_mut() {
                        if matches!(m, Some((s, _)) if *s <= upto) { *m = None; }
                    }
                    continue;
                }
                seq += 1;
                cache.insert(seq, off, Arc::from(vec![byte; len]));
                for m in &mut model[off as usize..off as usize + len] { *m = Some((seq, byte)); }
            }
            let mut buf = vec![0xEEu8; 700];
            let n = cache.overlay(0, &mut buf);
            prop_assert_eq!(n, model.iter().filter(|m| m.is_some()).count());
            for (i, m) in model.iter().enumerate() {
                prop_assert_eq!(buf[i], m.map_or(0xEE, |(_, b)| b), "byte {}", i);
            }
        }

        /// Random appends, group commits, acks and trims; at every step a crash that persists
        /// only some cache lines of the commit in flight must replay every acknowledged record,
        /// in order, with its data, and never refuse.
        #[test]
        fn crash_anywhere_keeps_every_acknowledged_write(
            ops in proptest::collection::vec((1usize..6, 0usize..900, any::<bool>(), any::<u64>()), 1..40)
        ) {
            let mut work = vec![0u8; REGION];
            let mut log = LogAppender::format(&mut work, AGG, GEN, 42).unwrap();
            let mut durable = vec![0u8; REGION];
            let persist = |durable: &mut Vec<u8>, work: &[u8], r: &Range<usize>| {
                durable[r.clone()].copy_from_slice(&work[r.clone()]);
            };
            for r in log.commit().ranges { persist(&mut durable, &work, &r); }
            let mut data: BTreeMap<u64, (u64, Vec<u8>)> = BTreeMap::new();
            for (n, len, do_trim, rnd) in ops {
                for _ in 0..n {
                    let seq = log.next_seq();
                    let p = payload(seq ^ rnd, len);
                    match log.append(&mut work, seq * 10, &p) {
                        Ok(s) => { data.insert(s, (seq * 10, p)); }
                        Err(e) => prop_assert!(e.is_full()),
                    }
                }
                let c = log.commit();
                // Crash image: some cache lines of this commit made it, chosen by `rnd`.
                let mut crashed = durable.clone();
                for (i, r) in c.ranges.iter().enumerate() {
                    for (j, line) in r.clone().step_by(64).enumerate() {
                        if (rnd >> ((i * 7 + j) % 64)) & 1 == 1 {
                            let e = (line + 64).min(r.end);
                            crashed[line..e].copy_from_slice(&work[line..e]);
                        }
                    }
                }
                let acked = log.acked_seq();
                let rep = scan(&crashed, &EXPECT);
                prop_assert!(rep.is_ok(), "crash refused: {:?}", rep);
                let rep = rep.unwrap();
                prop_assert!(rep.report.last_seq >= acked);
                for r in &rep.records {
                    let (off, p) = &data[&r.seq];
                    prop_assert_eq!(r.offset, *off);
                    prop_assert_eq!(rep.payload(&crashed, r), &p[..]);
                }
                let got: Vec<u64> = rep.records.iter().map(|r| r.seq).collect();
                let want: Vec<u64> = data.range(rep.report.trimmed_seq + 1..rep.report.last_seq + 1).map(|(s, _)| *s).collect();
                prop_assert_eq!(got, want);
                // The commit completes and is acknowledged.
                for r in &c.ranges { persist(&mut durable, &work, r); }
                log.mark_acked(c.last_seq).unwrap();
                if do_trim {
                    let upto = log.acked_seq() - (rnd % 3).min(log.acked_seq());
                    if let Some(r) = log.trim(&mut work, upto).unwrap() {
                        persist(&mut durable, &work, &r);
                        log.trim_persisted();
                    }
                    data.retain(|s, _| *s > log.trimmed_seq());
                }
                let rep = scan(&durable, &EXPECT).unwrap();
                let got: Vec<u64> = rep.records.iter().map(|r| r.seq).collect();
                let want: Vec<u64> = data.keys().copied().filter(|&s| s > log.trimmed_seq()).collect();
                prop_assert_eq!(got, want);
            }
        }

        /// Arbitrary bytes after a valid header never panic the scanner.
        #[test]
        fn scan_never_panics(junk in proptest::collection::vec(any::<u8>(), 0..REGION), at in 0usize..REGION) {
            let (mut region, mut log) = fresh(3);
            append_acked(&mut region, &mut log, 3, 200);
            let end = (at + junk.len()).min(REGION);
            region[at..end].copy_from_slice(&junk[..end - at]);
            let _ = scan(&region, &EXPECT);
            let _ = scan(&junk, &EXPECT);
        }
    }
}

//! The disk mailbox: per node a slot on every shared member, where the node beats and where it
//! tells its partner "please die". Each slot has exactly one writer (its node), so no two nodes
//! ever write the same block: "please die for my partner" is a flag in the *writer's* slot.
//!
//! Slot block (4096 bytes, little-endian, written with O_DIRECT at
//! `MAILBOX_OFFSET_BYTES + slot_index * 4096` on every member):
//!
//! | offset | size | field | meaning |
//! |---|---|---|---|
//! | 0 | 8 | magic | `HAPAIRMB` |
//! | 8 | 4 | version | [`MAILBOX_VERSION`] |
//! | 12 | 4 | slot_index | 0 or 1: which node of the pair wrote it |
//! | 16 | 32 | node_name | writer's node name, UTF-8, NUL padded |
//! | 48 | 16 | aggregate_uuid | aggregate of the member this slot is on |
//! | 64 | 8 | counter | heartbeat counter, bumped on every write; silence = it stops moving |
//! | 72 | 4 | state | the writer's HA state code (opaque here; the HA layer maps it) |
//! | 76 | 4 | flags | bit 0 clean shutdown, bit 1 please-die for the partner, bit 2 unmirrored: the writer acknowledges writes its partner's mirror does not hold |
//! | 80 | 8 | please_die_epoch | takeover epoch the please-die belongs to |
//! | 88 | 8 | writer_ms | writer's monotonic clock, for people reading dumps |
//! | 96 | 3996 | reserved | zero |
//! | 4092 | 4 | checksum | crc32c of bytes 0..4092 |

use crate::core::label::{MAILBOX_BYTES, MAILBOX_OFFSET_BYTES};
use crate::core::takeover::{MailboxSlot, MailboxView, State};

/// Size of one slot block.
pub const SLOT_BYTES: usize = 4096;
/// Slot magic.
pub const MAILBOX_MAGIC: [u8; 8] = *b"HAPAIRMB";
/// Slot format version.
pub const MAILBOX_VERSION: u32 = 1;
/// Slots in a mailbox: one per node of the pair.
pub const SLOTS: usize = 2;

const FLAG_CLEAN_SHUTDOWN: u32 = 1;
const FLAG_PLEASE_DIE: u32 = 2;
const FLAG_UNMIRRORED: u32 = 4;

const _: () = assert!((SLOTS * SLOT_BYTES) as u64 <= MAILBOX_BYTES);

/// Byte offset of slot `index` on a member.
pub fn slot_offset(index: usize) -> u64 {
    assert!(index < SLOTS, "slot index {index}");
    MAILBOX_OFFSET_BYTES + (index * SLOT_BYTES) as u64
}

/// Slot index of `node` in a pair of `node` and `partner`: the names in byte order.
pub fn slot_index(node: &str, partner: &str) -> usize {
    usize::from(node > partner)
}

/// A decoded slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub slot_index: u32,
    pub node_name: String,
    pub aggregate_uuid: [u8; 16],
    pub counter: u64,
    pub state: u32,
    pub clean_shutdown: bool,
    pub please_die_for_partner: bool,
    /// The writer acknowledges writes on local durability alone (its partner's mirror of its log
    /// is not current): a takeover from the mirror would lose them.
    pub unmirrored: bool,
    pub please_die_epoch: u64,
    pub writer_ms: u64,
}

/// Why a slot block was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    #[error("slot never written (no magic)")]
    Empty,
    #[error("slot checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("slot version {0} not supported")]
    Version(u32),
    #[error("slot field {0} invalid")]
    Field(&'static str),
}

impl Slot {
    /// Encode with checksum.
    pub fn encode(&self) -> Result<[u8; SLOT_BYTES], SlotError> {
        if self.slot_index as usize >= SLOTS {
            return Err(SlotError::Field("slot_index"));
        }
        if self.node_name.is_empty() || self.node_name.len() > 31 {
            return Err(SlotError::Field("node_name"));
        }
        let mut b = [0u8; SLOT_BYTES];
        b[0..8].copy_from_slice(&MAILBOX_MAGIC);
        b[8..12].copy_from_slice(&MAILBOX_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.slot_index.to_le_bytes());
        b[16..16 + self.node_name.len()].copy_from_slice(self.node_name.as_bytes());
        b[48..64].copy_from_slice(&self.aggregate_uuid);
        b[64..72].copy_from_slice(&self.counter.to_le_bytes());
        b[72..76].copy_from_slice(&self.state.to_le_bytes());
        let flags = if self.clean_shutdown {
            FLAG_CLEAN_SHUTDOWN
        } else {
            0
        } | if self.please_die_for_partner {
            FLAG_PLEASE_DIE
        } else {
            0
        } | if self.unmirrored { FLAG_UNMIRRORED } else { 0 };
        b[76..80].copy_from_slice(&flags.to_le_bytes());
        b[80..88].copy_from_slice(&self.please_die_epoch.to_le_bytes());
        b[88..96].copy_from_slice(&self.writer_ms.to_le_bytes());
        let crc = crc32c::crc32c(&b[..SLOT_BYTES - 4]);
        b[SLOT_BYTES - 4..].copy_from_slice(&crc.to_le_bytes());
        Ok(b)
    }

    /// Decode and verify.
    pub fn decode(b: &[u8]) -> Result<Slot, SlotError> {
        if b.len() != SLOT_BYTES {
            return Err(SlotError::Field("length"));
        }
        if b[0..8] != MAILBOX_MAGIC {
            return Err(SlotError::Empty);
        }
        let stored = u32::from_le_bytes(b[SLOT_BYTES - 4..].try_into().unwrap());
        let computed = crc32c::crc32c(&b[..SLOT_BYTES - 4]);
        if stored != computed {
            return Err(SlotError::Checksum { stored, computed });
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let version = u32_at(8);
        if version != MAILBOX_VERSION {
            return Err(SlotError::Version(version));
        }
        let slot_index = u32_at(12);
        if slot_index as usize >= SLOTS {
            return Err(SlotError::Field("slot_index"));
        }
        let name = &b[16..48];
        let end = name.iter().position(|&c| c == 0).unwrap_or(32);
        if end == 0 || name[end..].iter().any(|&c| c != 0) {
            return Err(SlotError::Field("node_name"));
        }
        let node_name = std::str::from_utf8(&name[..end])
            .map_err(|_| SlotError::Field("node_name"))?
            .to_string();
        let flags = u32_at(76);
        if flags & !(FLAG_CLEAN_SHUTDOWN | FLAG_PLEASE_DIE | FLAG_UNMIRRORED) != 0 {
            return Err(SlotError::Field("flags"));
        }
        if b[96..SLOT_BYTES - 4].iter().any(|&c| c != 0) {
            return Err(SlotError::Field("reserved"));
        }
        Ok(Slot {
            slot_index,
            node_name,
            aggregate_uuid: b[48..64].try_into().unwrap(),
            counter: u64_at(64),
            state: u32_at(72),
            clean_shutdown: flags & FLAG_CLEAN_SHUTDOWN != 0,
            please_die_for_partner: flags & FLAG_PLEASE_DIE != 0,
            unmirrored: flags & FLAG_UNMIRRORED != 0,
            please_die_epoch: u64_at(80),
            writer_ms: u64_at(88),
        })
    }
}

/// What the reads of one slot across all members say: the valid copy with the highest counter,
/// and how many members gave a valid copy, an empty slot, a damaged slot or an I/O error.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotVote {
    pub newest: Option<Slot>,
    pub valid: usize,
    pub empty: usize,
    pub damaged: Vec<(usize, SlotError)>,
    pub unreadable: usize,
}

/// Combine per-member reads of one slot (`Err(None)` = I/O error, `Err(Some(e))` = bad block).
pub fn vote(reads: &[Result<Slot, Option<SlotError>>]) -> SlotVote {
    let mut v = SlotVote::default();
    for (i, r) in reads.iter().enumerate() {
        match r {
            Ok(s) => {
                v.valid += 1;
                if v.newest.as_ref().is_none_or(|n| s.counter > n.counter) {
                    v.newest = Some(s.clone());
                }
            }
            Err(None) => v.unreadable += 1,
            Err(Some(SlotError::Empty)) => v.empty += 1,
            Err(Some(e)) => v.damaged.push((i, e.clone())),
        }
    }
    v
}

/// Self-fencing rule (like sbd's watchdog): a node that has not written its slot to a majority
/// of members for longer than `bound_ms` must stop writing. The partner, before taking over a
/// silent node, waits `2 * bound_ms` after the node's counter stopped moving, so that the node
/// has fenced itself by then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SelfFence {
    pub bound_ms: u64,
    /// Last time a write of our slot reached a majority of members.
    pub last_majority_write_ms: u64,
}

impl SelfFence {
    /// Record the outcome of one heartbeat write round.
    pub fn record(&mut self, now_ms: u64, written: usize, members: usize) {
        if written * 2 > members {
            self.last_majority_write_ms = now_ms;
        }
    }

    /// True when the node must fence itself now.
    pub fn must_fence(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.last_majority_write_ms) > self.bound_ms
    }

    /// How long the partner waits after the node's heartbeat stopped before fencing is assumed.
    pub fn partner_wait_ms(&self) -> u64 {
        2 * self.bound_ms
    }
}

/// The HA layer's view of one mailbox round ([`crate::core::takeover::MailboxView`]) from the
/// votes on our own slot and on the partner's slot across `members` members.
///
/// `None` (mailbox access lost) unless a majority of members answered for the partner's slot
/// with a valid or a never-written block: with less we can neither confirm a dead partner nor
/// be sure to see its please-die. A state code this version does not know is read as `Normal`:
/// the counter still proves liveness, and `Normal` triggers no takeover by itself.
pub fn ha_view(own: &SlotVote, partner: &SlotVote, members: usize) -> Option<MailboxView> {
    if members == 0 || (partner.valid + partner.empty) * 2 <= members {
        return None;
    }
    let partner_slot = partner.newest.as_ref().map(|s| MailboxSlot {
        counter: s.counter,
        state: State::from_code(s.state).unwrap_or(State::Normal),
        clean_shutdown: s.clean_shutdown,
        unmirrored: s.unmirrored,
    });
    Some(MailboxView {
        partner_slot,
        please_die_for_me: partner
            .newest
            .as_ref()
            .is_some_and(|s| s.please_die_for_partner),
        please_die_for_partner: own
            .newest
            .as_ref()
            .is_some_and(|s| s.please_die_for_partner),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(counter: u64) -> Slot {
        Slot {
            slot_index: 1,
            node_name: "b".into(),
            aggregate_uuid: [3; 16],
            counter,
            state: 7,
            clean_shutdown: true,
            please_die_for_partner: true,
            unmirrored: true,
            please_die_epoch: 9,
            writer_ms: 12345,
        }
    }

    #[test]
    fn round_trip_and_every_bit_flip_refused() {
        let s = slot(42);
        let b = s.encode().unwrap();
        assert_eq!(Slot::decode(&b).unwrap(), s);
        for byte in 0..SLOT_BYTES {
            let mut c = b;
            c[byte] ^= 0x10;
            assert!(Slot::decode(&c).is_err(), "flip at {byte} accepted");
        }
        assert_eq!(Slot::decode(&[0u8; SLOT_BYTES]), Err(SlotError::Empty));
    }

    #[test]
    fn slot_indices_are_distinct_and_inside_the_area() {
        assert_eq!(slot_index("a", "b"), 0);
        assert_eq!(slot_index("b", "a"), 1);
        assert!(slot_offset(1) + SLOT_BYTES as u64 <= MAILBOX_OFFSET_BYTES + MAILBOX_BYTES);
        assert_eq!(slot_offset(0) % 4096, 0);
    }

    #[test]
    fn vote_takes_newest_valid_and_counts_the_rest() {
        let v = vote(&[
            Ok(slot(5)),
            Ok(slot(9)),
            Err(None),
            Err(Some(SlotError::Empty)),
            Err(Some(SlotError::Field("x"))),
        ]);
        assert_eq!(v.newest.unwrap().counter, 9);
        assert_eq!(
            (v.valid, v.unreadable, v.empty, v.damaged.len()),
            (2, 1, 1, 1)
        );
        assert_eq!(v.damaged[0].0, 4);
    }

    #[test]
    fn self_fence_after_bound_without_majority() {
        let mut f = SelfFence {
            bound_ms: 1000,
            last_majority_write_ms: 0,
        };
        f.record(500, 3, 5);
        assert!(!f.must_fence(1400));
        f.record(1400, 2, 5); // minority: does not count
        assert!(!f.must_fence(1500));
        assert!(f.must_fence(1501));
        assert_eq!(f.partner_wait_ms(), 2000);
    }

    #[test]
    fn ha_view_needs_a_majority_and_maps_flags_and_state() {
        let mut p = slot(7);
        p.state = State::TakenOver.code();
        let own = vote(&[Ok(slot(1)), Ok(slot(1)), Ok(slot(1))]);
        let partner = vote(&[Ok(p.clone()), Err(None), Err(Some(SlotError::Empty))]);
        let v = ha_view(&own, &partner, 3).unwrap();
        let ps = v.partner_slot.unwrap();
        assert_eq!(
            (ps.counter, ps.state, ps.clean_shutdown),
            (7, State::TakenOver, true)
        );
        assert!(v.please_die_for_me && v.please_die_for_partner);
        // One of three answered: access lost.
        let partner = vote(&[Ok(p.clone()), Err(None), Err(None)]);
        assert_eq!(ha_view(&own, &partner, 3), None);
        // Never written anywhere: readable, no slot, no please-die.
        let empty = vote(&[Err(Some(SlotError::Empty)), Err(Some(SlotError::Empty))]);
        let v = ha_view(&empty, &empty, 2).unwrap();
        assert_eq!(v.partner_slot, None);
        assert!(!v.please_die_for_me && !v.please_die_for_partner);
        // Unknown state code: alive, read as Normal.
        p.state = 999;
        let v = ha_view(&own, &vote(&[Ok(p)]), 1).unwrap();
        assert_eq!(v.partner_slot.unwrap().state, State::Normal);
    }
}

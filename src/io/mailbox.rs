//! Reading and writing mailbox slots on the shared members (O_DIRECT | O_DSYNC, one block).

use crate::core::mailbox::{slot_offset, vote, Slot, SlotError, SlotVote, SLOT_BYTES};
use crate::io::buf::IoBuf;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The mailbox area of a set of members: every member of every aggregate the pair shares.
pub struct MailboxDisks {
    members: Vec<(PathBuf, File)>,
}

/// Result of writing our slot everywhere.
#[derive(Debug)]
pub struct WriteRound {
    pub written: usize,
    pub failed: Vec<(PathBuf, io::Error)>,
}

impl MailboxDisks {
    /// Open the members for mailbox I/O.
    pub fn open(paths: &[PathBuf]) -> io::Result<MailboxDisks> {
        let members = paths
            .iter()
            .map(|p| {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
                    .open(p)
                    .or_else(|e| {
                        // A member file on a filesystem without O_DIRECT: O_DSYNC alone.
                        if e.raw_os_error() == Some(libc::EINVAL) {
                            OpenOptions::new()
                                .read(true)
                                .write(true)
                                .custom_flags(libc::O_DSYNC)
                                .open(p)
                        } else {
                            Err(e)
                        }
                    })
                    .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))?;
                Ok((p.clone(), f))
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(MailboxDisks { members })
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// True when there are no members.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Paths of the members.
    pub fn paths(&self) -> Vec<&Path> {
        self.members.iter().map(|(p, _)| p.as_path()).collect()
    }

    /// Write `slot` (for each member with that member's aggregate uuid from `uuid_of`) into slot
    /// `slot.slot_index` of every member.
    pub fn write_slot(&self, slot: &Slot, uuid_of: impl Fn(usize) -> [u8; 16]) -> WriteRound {
        self.write_slot_first(self.members.len(), slot, uuid_of)
    }

    /// As [`MailboxDisks::write_slot`], on the first `n` members only (the members this node
    /// may write under Write Exclusive reservations: its own aggregate, listed first).
    pub fn write_slot_first(
        &self,
        n: usize,
        slot: &Slot,
        uuid_of: impl Fn(usize) -> [u8; 16],
    ) -> WriteRound {
        let mut buf = IoBuf::new(SLOT_BYTES);
        let mut round = WriteRound {
            written: 0,
            failed: Vec::new(),
        };
        for (i, (p, f)) in self.members.iter().enumerate().take(n) {
            let mut s = slot.clone();
            s.aggregate_uuid = uuid_of(i);
            match s.encode() {
                Ok(b) => buf.copy_from_slice(&b),
                Err(e) => {
                    round.failed.push((
                        p.clone(),
                        io::Error::new(io::ErrorKind::InvalidInput, e.to_string()),
                    ));
                    continue;
                }
            }
            match f.write_all_at(&buf, slot_offset(slot.slot_index as usize)) {
                Ok(()) => round.written += 1,
                Err(e) => round.failed.push((p.clone(), e)),
            }
        }
        round
    }

    /// Read slot `index` from every member and vote.
    pub fn read_slot(&self, index: usize) -> SlotVote {
        let mut buf = IoBuf::new(SLOT_BYTES);
        let reads: Vec<Result<Slot, Option<SlotError>>> = self
            .members
            .iter()
            .map(
                |(_, f)| match f.read_exact_at(&mut buf, slot_offset(index)) {
                    Ok(()) => Slot::decode(&buf).map_err(Some),
                    Err(_) => Err(None),
                },
            )
            .collect();
        vote(&reads)
    }
}

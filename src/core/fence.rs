//! Fencing with SCSI-3 persistent reservations: the pure parts.
//!
//! - [`node_key`]: the reservation key of a node, derived from its name.
//! - [`decide`]: PR fencing, mailbox-only fencing, or refusal, from the probe of every member.
//! - [`SimLun`]: a model of one logical unit's persistent-reservation state seen through
//!   several I_T nexuses (SPC-4 5.13), the test double the daemon's fencing steps run against.
//!
//! How hapair uses reservations (Write Exclusive, see `FENCING_TYPE` in hapair-prtest for why
//! not a registrants-only type):
//!
//! | step | members | commands |
//! | --- | --- | --- |
//! | `RegisterOwn` | both aggregates | REGISTER AND IGNORE EXISTING KEY (own key) |
//! |  | own aggregate | RESERVE Write Exclusive, unless we already hold it; fails (retried) while the partner holds it: we are still taken over |
//! | `Fence` | own aggregate | READ KEYS: own key missing → reservation conflict (we were fenced) |
//! |  | partner's | PREEMPT [AND ABORT] the partner's key, taking the reservation; RESERVE if there was none; conflict → we are not registered: fenced |
//! | `ReleaseFence` | partner's | RELEASE (after the partner's aggregate was closed here) |
//!
//! Giveback releases rather than letting the home node preempt: a home node that preempted at
//! `RegisterOwn` would steal its disks back from a partner that still serves them whenever it
//! rebooted during a takeover (`RegisterOwn` runs before the mailbox re-check). With RELEASE,
//! the taker stops writing (aggregate closed, final CP done) before it gives the reservation
//! up, and the home node writes only after its RESERVE succeeded: between the two nobody
//! writes, so "at most one writer" holds at every instant. The window without a reservation
//! is protected by the mailbox (please-die is cleared only after the release) and by the
//! home node reserving before it opens its aggregate.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Deserialize;

use crate::core::scsi::{ReservationKey, ReservationType};

/// The reservation type hapair fences with (see the module documentation).
pub const FENCING_TYPE: ReservationType = ReservationType::WriteExclusive;

/// How the taker removes the partner's registration at a fence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum PreemptAction {
    /// PREEMPT AND ABORT: also aborts the victim's queued commands (a write already queued at
    /// the target cannot land after the fence). The default on real disks.
    #[default]
    PreemptAndAbort,
    /// PREEMPT: for targets that cannot abort (LIO behind tcm_loop deadlocks on PREEMPT AND
    /// ABORT; LIO over iSCSI does not, see tests/vm/run.sh). Queued commands of the victim may
    /// still complete.
    Preempt,
}

impl fmt::Display for PreemptAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PreemptAction::PreemptAndAbort => "PREEMPT AND ABORT",
            PreemptAction::Preempt => "PREEMPT",
        })
    }
}

/// ASCII "hapair", the prefix of the keys of short node names.
const KEY_PREFIX_LONG: u64 = 0x6861_7061_6972 << 16;
/// ASCII "ha", the prefix of the keys of longer node names.
const KEY_PREFIX_SHORT: u64 = 0x6861 << 48;

/// The reservation key of node `name`.
///
/// - A name of 1 or 2 bytes: ASCII "hapair" then the name right-aligned in the last two
///   bytes (zero-padded): node "a" is `0x6861706169720061` ("hapair\0a"), readable in
///   `sg_persist` output, and the same keys hapair-prtest uses.
/// - A longer name: ASCII "ha" then the top 6 bytes of the 64-bit FNV-1a hash of the name.
///
/// Never 0 (0 means "unregister" in PR OUT). The two nodes of a pair must get different keys:
/// the configuration check refuses a pair whose names collide.
pub fn node_key(name: &str) -> ReservationKey {
    let b = name.as_bytes();
    if !b.is_empty() && b.len() <= 2 {
        let tail = b.iter().fold(0u64, |acc, &c| (acc << 8) | u64::from(c));
        return KEY_PREFIX_LONG | tail;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &c in b {
        h ^= u64::from(c);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    KEY_PREFIX_SHORT | (h >> 16)
}

/// What the probe of one member said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberProbe {
    /// Member path as configured.
    pub path: String,
    /// `None`: the member supports persistent reservations; `Some(why)` it does not.
    pub no_pr: Option<String>,
}

/// How the pair fences.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceMode {
    /// SCSI-3 PR on every member.
    Pr {
        /// Members of both aggregates.
        members: usize,
        /// Action used at takeover.
        action: PreemptAction,
    },
    /// Mailbox poison pill plus self-fencing: no member has PR.
    MailboxOnly {
        /// Why, naming the first member probed.
        why: String,
    },
}

impl FenceMode {
    /// One line for status and the startup log.
    pub fn describe(&self) -> String {
        match self {
            FenceMode::Pr { members, action } => format!(
                "SCSI-3 PR ({}) on {members} members, takeover by {action}",
                FENCING_TYPE.name()
            ),
            FenceMode::MailboxOnly { why } => format!("mailbox only (cooperative): {why}"),
        }
    }

    /// True for PR fencing.
    pub fn is_pr(&self) -> bool {
        matches!(self, FenceMode::Pr { .. })
    }
}

/// Some members have PR and others not: the pair refuses to start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "members differ in persistent-reservation support: fencing would protect only some \
     disks, refusing to start. With PR: {with:?}. Without: {without:?}"
)]
pub struct MixedMembers {
    /// Members with PR.
    pub with: Vec<String>,
    /// Members without PR, each with the reason.
    pub without: Vec<String>,
}

/// Decide how to fence from the probe of every member of both aggregates.
pub fn decide(probes: &[MemberProbe], action: PreemptAction) -> Result<FenceMode, MixedMembers> {
    let (with, without): (Vec<&MemberProbe>, Vec<&MemberProbe>) =
        probes.iter().partition(|p| p.no_pr.is_none());
    match (with.is_empty(), without.is_empty()) {
        (false, true) => Ok(FenceMode::Pr {
            members: with.len(),
            action,
        }),
        (true, _) => Ok(FenceMode::MailboxOnly {
            why: without
                .first()
                .map(|p| {
                    let more = if without.len() > 1 {
                        format!(" (and {} more members alike)", without.len() - 1)
                    } else {
                        String::new()
                    };
                    format!(
                        "{} has no PR support: {}{more}",
                        p.path,
                        p.no_pr.as_deref().unwrap_or("")
                    )
                })
                .unwrap_or_else(|| "no members".into()),
        }),
        (false, false) => Err(MixedMembers {
            with: with.iter().map(|p| p.path.clone()).collect(),
            without: without
                .iter()
                .map(|p| format!("{}: {}", p.path, p.no_pr.as_deref().unwrap_or("")))
                .collect(),
        }),
    }
}

/// Outcome of a command on a [`SimLun`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimStatus {
    /// GOOD.
    Good,
    /// RESERVATION CONFLICT.
    Conflict,
    /// CHECK CONDITION, UNIT ATTENTION 2A/05 (registrations preempted) or 2A/04 (reservations
    /// released): reported once, command not executed.
    UnitAttention,
}

/// One logical unit's persistent-reservation state (SPC-4 5.13), with `nexuses` I_T nexuses
/// numbered from 0. Only what hapair uses: registration, Write Exclusive, preempt, release,
/// and the write check. Used as the disk in tests of the fencing steps.
#[derive(Debug, Clone, Default)]
pub struct SimLun {
    /// Registered key of each nexus.
    pub registrations: BTreeMap<usize, ReservationKey>,
    /// Holder nexus, key and type.
    pub reservation: Option<(usize, ReservationKey, ReservationType)>,
    /// Nexuses with a pending unit attention.
    pub unit_attention: BTreeSet<usize>,
    /// PRGENERATION.
    pub generation: u32,
    /// Blocks written, with the nexus that wrote them last.
    pub written: BTreeMap<u64, usize>,
}

impl SimLun {
    fn ua(&mut self, n: usize) -> bool {
        self.unit_attention.remove(&n)
    }

    /// READ KEYS.
    pub fn read_keys(&mut self, n: usize) -> Result<Vec<ReservationKey>, SimStatus> {
        if self.ua(n) {
            return Err(SimStatus::UnitAttention);
        }
        Ok(self.registrations.values().copied().collect())
    }

    /// READ RESERVATION: (key, type) of the holder.
    pub fn read_reservation(
        &mut self,
        n: usize,
    ) -> Result<Option<(ReservationKey, ReservationType)>, SimStatus> {
        if self.ua(n) {
            return Err(SimStatus::UnitAttention);
        }
        Ok(self.reservation.map(|(_, k, t)| (k, t)))
    }

    /// REGISTER AND IGNORE EXISTING KEY.
    pub fn register_ignore(&mut self, n: usize, key: ReservationKey) -> SimStatus {
        if self.ua(n) {
            return SimStatus::UnitAttention;
        }
        if key == 0 {
            self.registrations.remove(&n);
            if self.reservation.is_some_and(|(h, _, _)| h == n) {
                self.reservation = None;
            }
        } else {
            self.registrations.insert(n, key);
            if let Some((h, _, t)) = self.reservation {
                if h == n {
                    self.reservation = Some((h, key, t));
                }
            }
        }
        self.generation += 1;
        SimStatus::Good
    }

    /// RESERVE.
    pub fn reserve(&mut self, n: usize, key: ReservationKey, t: ReservationType) -> SimStatus {
        if self.ua(n) {
            return SimStatus::UnitAttention;
        }
        if self.registrations.get(&n) != Some(&key) {
            return SimStatus::Conflict;
        }
        match self.reservation {
            None => {
                self.reservation = Some((n, key, t));
                SimStatus::Good
            }
            Some((h, _, ht)) if h == n && ht == t => SimStatus::Good,
            Some(_) => SimStatus::Conflict,
        }
    }

    /// RELEASE.
    pub fn release(&mut self, n: usize, key: ReservationKey, t: ReservationType) -> SimStatus {
        if self.ua(n) {
            return SimStatus::UnitAttention;
        }
        if self.registrations.get(&n) != Some(&key) {
            return SimStatus::Conflict;
        }
        match self.reservation {
            Some((h, _, _)) if h == n => {
                let _ = t;
                self.reservation = None;
                // Write Exclusive released: the other registrants are told (2A/04).
                for &o in self.registrations.keys() {
                    if o != n {
                        self.unit_attention.insert(o);
                    }
                }
                SimStatus::Good
            }
            _ => SimStatus::Good,
        }
    }

    /// PREEMPT (the abort part makes no difference to this model).
    pub fn preempt(
        &mut self,
        n: usize,
        key: ReservationKey,
        victim: ReservationKey,
        t: ReservationType,
    ) -> SimStatus {
        if self.ua(n) {
            return SimStatus::UnitAttention;
        }
        if self.registrations.get(&n) != Some(&key) {
            return SimStatus::Conflict;
        }
        let victims: Vec<usize> = self
            .registrations
            .iter()
            .filter(|(_, &k)| k == victim)
            .map(|(&i, _)| i)
            .collect();
        let holder_is_victim = self.reservation.is_some_and(|(_, k, _)| k == victim);
        if victims.is_empty() && !holder_is_victim {
            return SimStatus::Conflict;
        }
        for v in victims {
            if v != n {
                self.registrations.remove(&v);
                self.unit_attention.insert(v);
            }
        }
        if holder_is_victim {
            self.reservation = Some((n, key, t));
        }
        self.generation += 1;
        SimStatus::Good
    }

    /// WRITE of block `lba` through nexus `n`.
    pub fn write(&mut self, n: usize, lba: u64) -> SimStatus {
        if self.ua(n) {
            return SimStatus::UnitAttention;
        }
        match self.reservation {
            Some((h, _, ReservationType::WriteExclusive)) if h != n => SimStatus::Conflict,
            _ => {
                self.written.insert(lba, n);
                SimStatus::Good
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_readable_for_short_names_and_distinct() {
        assert_eq!(node_key("a"), 0x6861_7061_6972_0061);
        assert_eq!(node_key("b"), 0x6861_7061_6972_0062);
        assert_eq!(&node_key("a").to_be_bytes(), b"hapair\0a");
        assert_eq!(&node_key("n1").to_be_bytes(), b"hapairn1");
        let long = node_key("filer-east-1");
        assert_eq!(&long.to_be_bytes()[..2], b"ha");
        assert_ne!(long, node_key("filer-east-2"));
        assert_eq!(long, node_key("filer-east-1"), "stable");
        for n in ["a", "b", "ab", "node-a", "x".repeat(300).as_str(), ""] {
            assert_ne!(node_key(n), 0, "{n:?}");
        }
    }

    fn probe(path: &str, no: Option<&str>) -> MemberProbe {
        MemberProbe {
            path: path.into(),
            no_pr: no.map(String::from),
        }
    }

    #[test]
    fn decide_all_none_mixed() {
        let all = [probe("/dev/sda", None), probe("/dev/sdb", None)];
        let m = decide(&all, PreemptAction::Preempt).unwrap();
        assert_eq!(
            m.describe(),
            "SCSI-3 PR (Write Exclusive) on 2 members, takeover by PREEMPT"
        );
        assert!(m.is_pr());
        let none = [
            probe("/dev/loop3", Some("not a SCSI device")),
            probe("/dev/loop4", Some("not a SCSI device")),
        ];
        let m = decide(&none, PreemptAction::PreemptAndAbort).unwrap();
        assert_eq!(
            m.describe(),
            "mailbox only (cooperative): /dev/loop3 has no PR support: not a SCSI device \
             (and 1 more members alike)"
        );
        let mixed = [
            probe("/dev/sda", None),
            probe("/dev/loop3", Some("not SCSI")),
        ];
        let e = decide(&mixed, PreemptAction::Preempt).unwrap_err();
        assert_eq!(e.with, vec!["/dev/sda".to_string()]);
        assert_eq!(e.without, vec!["/dev/loop3: not SCSI".to_string()]);
        let s = e.to_string();
        assert!(
            s.contains("/dev/sda") && s.contains("/dev/loop3: not SCSI") && s.contains("refusing"),
            "{s}"
        );
    }

    #[test]
    fn sim_lun_write_exclusive_and_preempt() {
        let (a, b) = (node_key("a"), node_key("b"));
        let we = ReservationType::WriteExclusive;
        let mut l = SimLun::default();
        assert_eq!(l.reserve(0, a, we), SimStatus::Conflict, "unregistered");
        assert_eq!(l.register_ignore(0, a), SimStatus::Good);
        assert_eq!(l.register_ignore(1, b), SimStatus::Good);
        assert_eq!(l.reserve(0, a, we), SimStatus::Good);
        assert_eq!(l.write(1, 7), SimStatus::Conflict);
        assert_eq!(l.write(0, 7), SimStatus::Good);
        assert_eq!(l.preempt(1, b, a, we), SimStatus::Good);
        assert_eq!(l.write(0, 7), SimStatus::UnitAttention);
        assert_eq!(l.write(0, 7), SimStatus::Conflict);
        assert_eq!(l.write(1, 7), SimStatus::Good);
        assert_eq!(
            l.preempt(0, a, b, we),
            SimStatus::Conflict,
            "preempted a is unregistered"
        );
        assert_eq!(
            l.preempt(1, b, a, we),
            SimStatus::Conflict,
            "a's key is gone"
        );
    }
}

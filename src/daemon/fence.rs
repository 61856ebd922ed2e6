//! The fencing steps on the members' persistent reservations: `RegisterOwn`, `Fence` (the
//! reservation part, after the mailbox please-die) and `ReleaseFence`. What each step sends
//! and why giveback releases is documented in [`crate::core::fence`].
//!
//! The steps run against [`PrLun`]: [`PrDevice`] on real disks, [`SimNexus`] (a nexus of a
//! shared [`SimLun`]) in tests.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::core::fence::{
    decide, FenceMode, MemberProbe, MixedMembers, PreemptAction, SimLun, SimStatus, FENCING_TYPE,
};
use crate::core::scsi::{ReservationKey, ReservationType, ScsiError, Sense, SenseFormat, SenseKey};
use crate::io::sg::{probe, retry_unit_attention, NoPrReason, PrDevice, PrSupport, SgError};

/// Unit attentions tolerated in a row before a command must give its real answer (after a
/// preempt or a release each nexus gets one; a reset may add one).
const UA_ATTEMPTS: u32 = 4;

/// The persistent-reservation commands the fencing steps use, on one member through this
/// node's nexus.
pub trait PrLun: Send {
    fn path(&self) -> &Path;
    fn read_keys(&self) -> Result<Vec<ReservationKey>, SgError>;
    fn read_reservation(&self) -> Result<Option<(ReservationKey, ReservationType)>, SgError>;
    fn register_ignore(&self, key: ReservationKey) -> Result<(), SgError>;
    fn reserve(&self, key: ReservationKey, t: ReservationType) -> Result<(), SgError>;
    fn release(&self, key: ReservationKey, t: ReservationType) -> Result<(), SgError>;
    fn preempt(
        &self,
        key: ReservationKey,
        victim: ReservationKey,
        t: ReservationType,
        abort: bool,
    ) -> Result<(), SgError>;
}

impl PrLun for PrDevice {
    fn path(&self) -> &Path {
        PrDevice::path(self)
    }
    fn read_keys(&self) -> Result<Vec<ReservationKey>, SgError> {
        PrDevice::read_keys(self).map(|k| k.keys)
    }
    fn read_reservation(&self) -> Result<Option<(ReservationKey, ReservationType)>, SgError> {
        PrDevice::read_reservation(self).map(|s| s.reservation.map(|r| (r.key, r.rtype)))
    }
    fn register_ignore(&self, key: ReservationKey) -> Result<(), SgError> {
        PrDevice::register_ignore(self, key)
    }
    fn reserve(&self, key: ReservationKey, t: ReservationType) -> Result<(), SgError> {
        PrDevice::reserve(self, key, t)
    }
    fn release(&self, key: ReservationKey, t: ReservationType) -> Result<(), SgError> {
        PrDevice::release(self, key, t)
    }
    fn preempt(
        &self,
        key: ReservationKey,
        victim: ReservationKey,
        t: ReservationType,
        abort: bool,
    ) -> Result<(), SgError> {
        if abort {
            self.preempt_and_abort(key, victim, t)
        } else {
            PrDevice::preempt(self, key, victim, t)
        }
    }
}

/// Errors of the fencing steps.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// Our key is gone (the partner fenced us): the HA layer must halt this node.
    #[error("{path}: our key {key:#018x} is no longer registered: this node has been fenced")]
    Fenced { path: PathBuf, key: ReservationKey },
    /// `RegisterOwn` found our own member reserved by another key: still taken over.
    #[error("{path}: reserved by key {holder:#018x}, not ours: still taken over, not reserving")]
    HeldByOther {
        path: PathBuf,
        holder: ReservationKey,
    },
    /// A command failed for another reason.
    #[error("{0}")]
    Device(#[from] SgError),
}

impl FenceError {
    /// True when the HA layer must be told `ReservationConflict`.
    pub fn is_fenced(&self) -> bool {
        match self {
            FenceError::Fenced { .. } => true,
            FenceError::Device(e) => e.is_reservation_conflict(),
            FenceError::HeldByOther { .. } => false,
        }
    }
}

/// The PR side of fencing for one node: our nexus to every member of both aggregates.
pub struct PrFencer<L: PrLun> {
    pub own: Vec<L>,
    pub partner: Vec<L>,
    pub own_key: ReservationKey,
    pub partner_key: ReservationKey,
    pub action: PreemptAction,
}

fn ua<T>(lun: &dyn PrLun, f: impl FnMut() -> Result<T, SgError>) -> Result<T, SgError> {
    retry_unit_attention(
        UA_ATTEMPTS,
        |e| tracing::info!(member = %lun.path().display(), "unit attention (expected after a preempt or release): {e}"),
        f,
    )
}

impl<L: PrLun> PrFencer<L> {
    /// `RegisterOwn`: register our key on every member of both aggregates, then hold our own
    /// aggregate's members (Write Exclusive) unless we already do. Idempotent.
    pub fn register_own(&self) -> Result<(), FenceError> {
        for m in self.own.iter().chain(&self.partner) {
            ua(m, || m.register_ignore(self.own_key))?;
        }
        for m in &self.own {
            match ua(m, || m.read_reservation())? {
                Some((k, t)) if k == self.own_key && t == FENCING_TYPE => {}
                Some((k, _)) if k == self.own_key => {
                    // Ours with another type (an older setup): release and take it as WE.
                    ua(m, || m.release(self.own_key, FENCING_TYPE))?;
                    ua(m, || m.reserve(self.own_key, FENCING_TYPE))?;
                }
                Some((holder, _)) => {
                    return Err(FenceError::HeldByOther {
                        path: m.path().into(),
                        holder,
                    })
                }
                None => ua(m, || m.reserve(self.own_key, FENCING_TYPE))?,
            }
        }
        tracing::info!(
            key = format_args!("{:#018x}", self.own_key),
            registered = self.own.len() + self.partner.len(),
            reserved = self.own.len(),
            "registered on every member; own members reserved ({})",
            FENCING_TYPE.name()
        );
        Ok(())
    }

    /// The reservation part of `Fence`: check our own key is still registered on our own
    /// members (else we were fenced), then preempt the partner's key on every member of its
    /// aggregate, taking the reservation. Idempotent: a member we already hold without the
    /// partner registered is skipped.
    pub fn fence(&self) -> Result<(), FenceError> {
        for m in &self.own {
            let keys = ua(m, || m.read_keys())?;
            if !keys.contains(&self.own_key) {
                return Err(FenceError::Fenced {
                    path: m.path().into(),
                    key: self.own_key,
                });
            }
        }
        let abort = self.action == PreemptAction::PreemptAndAbort;
        for m in &self.partner {
            let keys = ua(m, || m.read_keys())?;
            let held = ua(m, || m.read_reservation())?;
            if !keys.contains(&self.own_key) {
                return Err(FenceError::Fenced {
                    path: m.path().into(),
                    key: self.own_key,
                });
            }
            let partner_registered = keys.contains(&self.partner_key);
            let held_by_partner = held.is_some_and(|(k, _)| k == self.partner_key);
            if partner_registered || held_by_partner {
                ua(m, || {
                    m.preempt(self.own_key, self.partner_key, FENCING_TYPE, abort)
                })?;
            }
            // PREEMPT takes the reservation only from a holder; with none, reserve.
            match ua(m, || m.read_reservation())? {
                Some((k, _)) if k == self.own_key => {}
                None => ua(m, || m.reserve(self.own_key, FENCING_TYPE))?,
                Some((holder, _)) => {
                    return Err(FenceError::HeldByOther {
                        path: m.path().into(),
                        holder,
                    })
                }
            }
        }
        tracing::warn!(
            victim = format_args!("{:#018x}", self.partner_key),
            members = self.partner.len(),
            "partner fenced: its key preempted ({}), its members reserved by us",
            self.action
        );
        Ok(())
    }

    /// `ReleaseFence`: release the partner's members (their aggregate is closed here). The
    /// home node reserves them at its `RegisterOwn`. Idempotent.
    pub fn release_fence(&self) -> Result<(), FenceError> {
        for m in &self.partner {
            if let Some((k, t)) = ua(m, || m.read_reservation())? {
                if k == self.own_key {
                    ua(m, || m.release(self.own_key, t))?;
                }
            }
        }
        tracing::info!(
            members = self.partner.len(),
            "partner's members released for giveback"
        );
        Ok(())
    }
}

impl PrFencer<PrDevice> {
    /// Open our nexus to every member.
    pub fn open(
        own: &[PathBuf],
        partner: &[PathBuf],
        own_key: ReservationKey,
        partner_key: ReservationKey,
        action: PreemptAction,
    ) -> Result<Self, SgError> {
        let open = |ps: &[PathBuf]| ps.iter().map(PrDevice::open).collect::<Result<Vec<_>, _>>();
        Ok(PrFencer {
            own: open(own)?,
            partner: open(partner)?,
            own_key,
            partner_key,
            action,
        })
    }
}

/// Why a member has no PR, in operator words.
fn no_pr_words(r: &NoPrReason) -> String {
    match r {
        NoPrReason::NotADevice(k) => format!("not a device ({k})"),
        NoPrReason::NoScsiPassthrough(k, errno) => format!(
            "not a SCSI device ({k}; SG_GET_VERSION_NUM: {})",
            std::io::Error::from_raw_os_error(*errno).kind()
        ),
        other => other.to_string(),
    }
}

/// Errors of [`probe_members`].
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// A probe failed in a way that says nothing about PR support (cannot open, not ready).
    #[error("probing {path} for persistent reservations: {source}")]
    Probe {
        path: PathBuf,
        #[source]
        source: SgError,
    },
    #[error(transparent)]
    Mixed(#[from] MixedMembers),
}

/// Probe every member and decide the fencing mode.
pub fn probe_members(members: &[PathBuf], action: PreemptAction) -> Result<FenceMode, ProbeError> {
    let mut probes = Vec::with_capacity(members.len());
    for p in members {
        let no_pr = match probe(p) {
            Ok(PrSupport::Supported { .. }) => None,
            Ok(PrSupport::Unsupported(r)) => Some(no_pr_words(&r)),
            Err(source) => {
                return Err(ProbeError::Probe {
                    path: p.clone(),
                    source,
                })
            }
        };
        probes.push(MemberProbe {
            path: p.display().to_string(),
            no_pr,
        });
    }
    Ok(decide(&probes, action)?)
}

/// One nexus of a shared [`SimLun`]: the test double of [`PrLun`].
#[derive(Clone)]
pub struct SimNexus {
    pub lun: Arc<Mutex<SimLun>>,
    pub nexus: usize,
    pub path: PathBuf,
}

fn sim(path: &Path, st: SimStatus) -> Result<(), SgError> {
    let source = match st {
        SimStatus::Good => return Ok(()),
        SimStatus::Conflict => ScsiError::ReservationConflict,
        SimStatus::UnitAttention => ScsiError::CheckCondition(Sense {
            format: SenseFormat::Fixed,
            current: true,
            key: SenseKey::UnitAttention,
            asc: 0x2a,
            ascq: 0x05,
        }),
    };
    Err(SgError::Scsi {
        path: path.into(),
        op: "sim",
        source,
    })
}

impl PrLun for SimNexus {
    fn path(&self) -> &Path {
        &self.path
    }
    fn read_keys(&self) -> Result<Vec<ReservationKey>, SgError> {
        let r = self.lun.lock().unwrap().read_keys(self.nexus);
        r.or_else(|s| sim(&self.path, s).map(|()| vec![]))
    }
    fn read_reservation(&self) -> Result<Option<(ReservationKey, ReservationType)>, SgError> {
        let r = self.lun.lock().unwrap().read_reservation(self.nexus);
        r.or_else(|s| sim(&self.path, s).map(|()| None))
    }
    fn register_ignore(&self, key: ReservationKey) -> Result<(), SgError> {
        let s = self.lun.lock().unwrap().register_ignore(self.nexus, key);
        sim(&self.path, s)
    }
    fn reserve(&self, key: ReservationKey, t: ReservationType) -> Result<(), SgError> {
        let s = self.lun.lock().unwrap().reserve(self.nexus, key, t);
        sim(&self.path, s)
    }
    fn release(&self, key: ReservationKey, t: ReservationType) -> Result<(), SgError> {
        let s = self.lun.lock().unwrap().release(self.nexus, key, t);
        sim(&self.path, s)
    }
    fn preempt(
        &self,
        key: ReservationKey,
        victim: ReservationKey,
        t: ReservationType,
        _abort: bool,
    ) -> Result<(), SgError> {
        let s = self.lun.lock().unwrap().preempt(self.nexus, key, victim, t);
        sim(&self.path, s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::fence::node_key;

    /// Two aggregates of two members each, seen by node a (nexus 0) and node b (nexus 1).
    struct Rig {
        luns: Vec<Arc<Mutex<SimLun>>>,
        a: PrFencer<SimNexus>,
        b: PrFencer<SimNexus>,
    }

    fn rig() -> Rig {
        let luns: Vec<_> = (0..4)
            .map(|_| Arc::new(Mutex::new(SimLun::default())))
            .collect();
        let nx = |i: usize, n: usize| SimNexus {
            lun: luns[i].clone(),
            nexus: n,
            path: format!("/dev/sim{i}-{n}").into(),
        };
        let fencer = |n: usize, own: [usize; 2], partner: [usize; 2], k: &str, pk: &str| PrFencer {
            own: own.iter().map(|&i| nx(i, n)).collect(),
            partner: partner.iter().map(|&i| nx(i, n)).collect(),
            own_key: node_key(k),
            partner_key: node_key(pk),
            action: PreemptAction::Preempt,
        };
        let a = fencer(0, [0, 1], [2, 3], "a", "b");
        let b = fencer(1, [2, 3], [0, 1], "b", "a");
        Rig { luns, a, b }
    }

    impl Rig {
        /// Who may write each LUN right now: nexus numbers accepted by a WRITE (consumes unit
        /// attentions like a real writer retrying).
        fn writers(&self) -> Vec<Vec<usize>> {
            self.luns
                .iter()
                .map(|l| {
                    let mut l = l.lock().unwrap();
                    (0..2)
                        .filter(|&n| {
                            let mut s = l.write(n, 1);
                            if s == SimStatus::UnitAttention {
                                s = l.write(n, 1);
                            }
                            s == SimStatus::Good
                        })
                        .collect()
                })
                .collect()
        }
        fn holder(&self, i: usize) -> Option<ReservationKey> {
            self.luns[i].lock().unwrap().reservation.map(|(_, k, _)| k)
        }
    }

    #[test]
    fn boot_takeover_giveback_keeps_one_writer_per_lun() {
        let r = rig();
        let (ka, kb) = (node_key("a"), node_key("b"));
        r.a.register_own().unwrap();
        r.b.register_own().unwrap();
        r.a.register_own().unwrap(); // idempotent
        for i in 0..4 {
            let mut keys = r.luns[i]
                .lock()
                .unwrap()
                .registrations
                .values()
                .copied()
                .collect::<Vec<_>>();
            keys.sort();
            assert_eq!(keys, vec![ka, kb], "lun {i}: both registered everywhere");
        }
        assert_eq!(
            r.writers(),
            vec![vec![0], vec![0], vec![1], vec![1]],
            "home nodes write"
        );
        // Takeover of b by a.
        r.a.fence().unwrap();
        r.a.fence().unwrap(); // a retried fence converges
        assert_eq!((r.holder(2), r.holder(3)), (Some(ka), Some(ka)));
        assert_eq!(
            r.writers(),
            vec![vec![0]; 4],
            "a writes everything, b nothing"
        );
        // b, fenced, cannot fence a back: its key is gone from its own members.
        let e = r.b.fence().unwrap_err();
        assert!(e.is_fenced(), "{e}");
        assert!(matches!(e, FenceError::Fenced { .. }), "{e}");
        // b reboots during the takeover: RegisterOwn registers but must not take its disks.
        let e = r.b.register_own().unwrap_err();
        assert!(
            matches!(e, FenceError::HeldByOther { holder, .. } if holder == ka),
            "{e}"
        );
        assert!(!e.is_fenced());
        assert_eq!(r.writers(), vec![vec![0]; 4], "still only a");
        // Giveback: a releases (nobody writes b's members in between), b reserves.
        r.a.release_fence().unwrap();
        r.a.release_fence().unwrap();
        assert_eq!((r.holder(2), r.holder(3)), (None, None));
        r.b.register_own().unwrap();
        assert_eq!(
            r.writers(),
            vec![vec![0], vec![0], vec![1], vec![1]],
            "back to the start"
        );
        // And a second takeover in the other direction works from there.
        r.b.fence().unwrap();
        assert_eq!(r.writers(), vec![vec![1]; 4]);
        assert!(r.a.fence().unwrap_err().is_fenced());
    }

    #[test]
    fn fence_reserves_when_partner_held_nothing() {
        let r = rig();
        r.a.register_own().unwrap();
        // b registered but never reserved (died between register and reserve).
        for m in &r.b.own {
            m.register_ignore(r.b.own_key).unwrap();
        }
        r.a.fence().unwrap();
        assert_eq!(
            (r.holder(2), r.holder(3)),
            (Some(node_key("a")), Some(node_key("a")))
        );
        // Hard takeover of a partner that never registered at all.
        let r = rig();
        r.a.register_own().unwrap();
        r.a.fence().unwrap();
        assert_eq!(r.writers(), vec![vec![0]; 4]);
    }

    #[test]
    fn unregistered_taker_is_fenced_not_retrying() {
        let r = rig();
        // a never registered: PREEMPT would be refused; the fence says so.
        r.b.register_own().unwrap();
        let e = r.a.fence().unwrap_err();
        assert!(e.is_fenced(), "{e}");
    }

    #[test]
    fn probe_loop_and_files_gives_mailbox_mode() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("m0.img");
        std::fs::write(&f, vec![0u8; 4096]).unwrap();
        let m = probe_members(std::slice::from_ref(&f), PreemptAction::PreemptAndAbort).unwrap();
        let FenceMode::MailboxOnly { why } = &m else {
            panic!("{m:?}")
        };
        assert!(
            why.starts_with(&format!("{} has no PR support: not a device", f.display())),
            "{why}"
        );
        let e = probe_members(&[d.path().join("missing")], PreemptAction::Preempt).unwrap_err();
        assert!(matches!(e, ProbeError::Probe { .. }), "{e}");
    }
}

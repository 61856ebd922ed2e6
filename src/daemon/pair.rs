//! A node of a pair: its own aggregate served through its NVRAM journal (mirrored to the
//! partner over the interconnect), the mirror of the partner's log, and every step of takeover,
//! giveback and boot that the HA state machine asks for, done for real.

use crate::config::{AggregateConfig, Config, ExportConfig, PairConfig};
use crate::core::arp::fmt_mac;
use crate::core::interconnect::{Hello, LogRecords, Message, StateSummary};
use crate::core::netlink::IpPrefix;
use crate::core::takeover::Step;
use crate::daemon::aggregate::Aggregate;
use crate::daemon::backend::Backend;
use crate::daemon::identity::{IdentityConfig, IdentityManager, ServiceAddr};
use crate::daemon::journal::{Journal, JournalConfig, MirrorLink, MirrorRegion, MirrorState};
use crate::daemon::link::{ApplyError, Link, LinkConfig, LinkHandler};
use crate::daemon::nbd_server::{AbortHandle, Export, NbdServer, ServerConfig};
use crate::daemon::node::Served;
use crate::daemon::setup;
use crate::io::nvram::NvramRegion;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// One side of the node: its own aggregate, or the partner's while taken over.
#[derive(Default)]
pub struct Side {
    pub aggregate: Option<Arc<Aggregate>>,
    /// The aggregate had not been closed cleanly when it was opened.
    pub was_dirty: bool,
    pub journal: Option<Arc<Journal>>,
    pub servers: Vec<Served>,
    /// The journal's final CP succeeded: the members hold its whole log (the aggregate may
    /// be closed cleanly). Only then.
    pub log_settled: bool,
    /// The aggregate was closed cleanly (what a retried close finds).
    pub closed_clean: bool,
}

/// A restore of our lost log from the partner's mirror, in progress.
struct Restore {
    bytes: Vec<u8>,
    /// Byte ranges received (a copy is complete only when they cover the region: a
    /// "done" that belongs to an earlier, timed-out request must not complete a later one).
    received: Vec<std::ops::Range<usize>>,
    done: bool,
}

impl Restore {
    fn covered(&self) -> bool {
        let mut r = self.received.clone();
        r.sort_by_key(|x| x.start);
        let mut end = 0;
        for x in r {
            if x.start > end {
                return false;
            }
            end = end.max(x.end);
        }
        end >= self.bytes.len()
    }
}

/// A copy of our log fetched from the partner's mirror must be this aggregate's log: one that
/// is empty (the partner never had our log) or not ours would otherwise have the journal
/// start an empty log and serve without the writes the lost one held.
fn restored_log_usable(bytes: &[u8], agg: &Aggregate) -> Result<(), String> {
    if bytes.len() < 64 || bytes[..64].iter().all(|&b| b == 0) {
        return Err(
            "is empty: not serving (the acknowledged writes of the lost log are nowhere)".into(),
        );
    }
    let uuid = uuid::Uuid::parse_str(&agg.status().uuid).map_err(|e| e.to_string())?;
    crate::core::nvlog::scan(
        bytes,
        &crate::core::nvlog::Expect {
            aggregate: uuid,
            generation: crate::daemon::journal::LOG_GENERATION,
        },
    )
    .map(|_| ())
    .map_err(|e| format!("is not a usable log of this aggregate: {e}"))
}

/// How this process left its own log when it let the journal go.
#[derive(Debug, Clone, Copy)]
enum OwnLogLeft {
    /// A final CP put it on the members.
    Settled,
    /// Halted while open: whether it was fully mirrored then, and in which link session.
    Open {
        mirrored: bool,
        session: Option<u64>,
    },
}

impl OwnLogLeft {
    /// Whether the partner's mirror holds every write of a log no journal has open now, left
    /// as `left` (None: not opened by this process), with the mailbox's "unmirrored" flag
    /// clear or not, and the link session now.
    fn mirrored(left: Option<OwnLogLeft>, flag_clear: bool, session_now: Option<u64>) -> bool {
        match left {
            // Its final CP put the whole log on the members.
            Some(OwnLogLeft::Settled) => true,
            // Halted with the log open: as mirrored as it was then, and only while the
            // session it was mirrored in lasts (a partner that reconnected since may have
            // lost what it had not flushed).
            Some(OwnLogLeft::Open { mirrored, session }) => {
                mirrored && flag_clear && session.is_some() && session == session_now
            }
            // Not opened by this process.
            None => flag_clear,
        }
    }
}

/// What a halt stops before it takes any side's lock (see [`PairNode::halt`]): weak, so a
/// closed aggregate or a stopped server is not kept alive by being listed.
#[derive(Default)]
struct HaltHandles {
    servers: Vec<AbortHandle>,
    journals: Vec<Weak<Journal>>,
    aggregates: Vec<Weak<Aggregate>>,
}

/// Which aggregate a step is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whose {
    Own,
    Partner,
}

/// Phase durations of the last procedure, as the node measured them (ms).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StepTimes {
    pub steps: Vec<(String, u64)>,
}

/// Hooks into the HA layer for what arrives over the interconnect.
pub trait HaInbound: Send + Sync {
    fn on_ha_message(&self, bytes: &[u8]);
    /// A write of ours was refused with a reservation conflict.
    fn fenced_out(&self);
    fn on_link(&self, up: bool);
    fn summary(&self) -> StateSummary;
}

/// The data plane of a pair node.
pub struct PairNode {
    pub config: Config,
    pub pair: PairConfig,
    pub own_cfg: AggregateConfig,
    pub partner_cfg: AggregateConfig,
    pub own: Mutex<Side>,
    pub partner: Mutex<Side>,
    /// Our copy of the partner's log, while the partner serves (None while we serve it: the
    /// region is then the log of the partner's aggregate here).
    pub mirror: Mutex<Option<MirrorRegion>>,
    pub link: Mutex<Option<Arc<Link>>>,
    identity: Mutex<Option<IdentityManager>>,
    ha: Mutex<Option<Arc<dyn HaInbound>>>,
    pub times: Mutex<StepTimes>,
    pub drain_deadline: Duration,
    mirror_applied: AtomicU64,
    /// The partner's mailbox counter and when it last moved (fed by the monitor thread).
    partner_beat: Mutex<Option<(u64, Instant)>>,
    /// A restore of our lost log from the partner's mirror in progress: (bytes, done).
    restore: Mutex<Option<Restore>>,
    restore_cv: std::sync::Condvar,
    /// The mailbox driver's handle (set once the runtime started it).
    pub mailbox: Mutex<Option<crate::daemon::mailbox::MailboxHandle>>,
    /// How this pair fences, decided from the probe of every member at startup.
    pub fence_mode: FenceMode,
    halt_handles: Mutex<HaltHandles>,
    /// Our mirror is being sent to the partner (it lost its log).
    copy_in_flight: Arc<std::sync::atomic::AtomicBool>,
    /// Set by [`PairNode::halt`], cleared by the next `RegisterOwn` (a resume): data-plane
    /// steps fail meanwhile.
    halted: std::sync::atomic::AtomicBool,
    own_log_left: Mutex<Option<OwnLogLeft>>,
    /// Held while "own log mirrored" is computed and sent to the HA loop, and while the own
    /// journal is opened: a value computed without the journal (what the mailbox flag says)
    /// never reaches the HA loop after the step that opened it (from then the journal says).
    own_mirror_report: Mutex<()>,
    /// Our nexus to every member, under PR fencing.
    pub pr: Option<Arc<PrFencer<PrDevice>>>,
}

impl PairNode {
    /// The data plane of `config` (which must have a `[pair]` section). Nothing is opened or
    /// served yet: the HA boot steps do that.
    pub fn new(config: Config) -> Result<Arc<PairNode>, String> {
        let pair = config
            .pair
            .clone()
            .ok_or("configuration has no [pair] section")?;
        let own_cfg = config
            .aggregate
            .iter()
            .find(|a| a.home == config.node)
            .cloned()
            .ok_or("no own aggregate")?;
        let partner_cfg = config
            .aggregate
            .iter()
            .find(|a| a.home == pair.partner)
            .cloned()
            .ok_or("no partner aggregate")?;
        // Fencing: SCSI-3 PR if every member has it, the mailbox alone if none has, and no
        // start at all for a mix (a fence that covers some disks only is no fence).
        let members: Vec<std::path::PathBuf> = own_cfg
            .members()
            .into_iter()
            .chain(partner_cfg.members())
            .collect();
        let fence_mode =
            probe_members(&members, pair.fence_preempt).map_err(|e| format!("fencing: {e}"))?;
        tracing::info!(node = %config.node, "fencing: {}", fence_mode.describe());
        let pr = if fence_mode.is_pr() {
            let (own_key, partner_key) = (node_key(&config.node), node_key(&pair.partner));
            tracing::info!(
                own_key = format_args!("{own_key:#018x}"),
                partner_key = format_args!("{partner_key:#018x}"),
                "reservation keys"
            );
            let f = PrFencer::open(
                &own_cfg.members(),
                &partner_cfg.members(),
                own_key,
                partner_key,
                pair.fence_preempt,
            )
            .map_err(|e| format!("fencing: {e}"))?;
            Some(Arc::new(f))
        } else {
            None
        };
        let mirror_path = partner_cfg.nvram.clone().expect("validated");
        let mirror = NvramRegion::open(&mirror_path, partner_cfg.nvram_mib << 20)
            .map_err(|e| e.to_string())?;
        tracing::info!(mirror = %mirror_path.display(), "partner log mirror: {}", mirror.persistence());
        let needs_identity = config.export.iter().any(|e| !e.service_addrs.is_empty());
        let identity = if needs_identity {
            let lo_only = config
                .export
                .iter()
                .all(|e| e.service_interface.as_deref().is_none_or(|i| i == "lo"));
            let cfg = if lo_only {
                // Loopback has no neighbours to probe or tell.
                IdentityConfig {
                    probe_count: 0,
                    announce_count: 0,
                    ipv6_dad: false,
                    ..IdentityConfig::default()
                }
            } else {
                // A takeover probes an address it has just fenced the holder of: a short probe
                // (two ARP probes, 100 ms of listening) catches a misconfiguration without
                // holding the clients for the ~7 s RFC 5227 allows a host joining a network.
                IdentityConfig {
                    probe_count: 2,
                    probe_interval_ms: 50,
                    probe_wait_ms: 100,
                    announce_count: 2,
                    announce_interval_ms: 100,
                    ..IdentityConfig::default()
                }
            };
            Some(IdentityManager::new(cfg).map_err(|e| format!("netlink: {e}"))?)
        } else {
            None
        };
        Ok(Arc::new(PairNode {
            config,
            pair,
            own_cfg,
            partner_cfg,
            own: Mutex::new(Side::default()),
            partner: Mutex::new(Side::default()),
            mirror: Mutex::new(Some(MirrorRegion::new(mirror))),
            link: Mutex::new(None),
            identity: Mutex::new(identity),
            ha: Mutex::new(None),
            times: Mutex::new(StepTimes::default()),
            drain_deadline: Duration::from_secs(10),
            mirror_applied: AtomicU64::new(0),
            partner_beat: Mutex::new(None),
            restore: Mutex::new(None),
            restore_cv: std::sync::Condvar::new(),
            mailbox: Mutex::new(None),
            fence_mode,
            pr,
            halt_handles: Mutex::new(HaltHandles::default()),
            copy_in_flight: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            halted: std::sync::atomic::AtomicBool::new(false),
            own_log_left: Mutex::new(None),
            own_mirror_report: Mutex::new(()),
        }))
    }

    /// This node's id in the pair (0 sorts first and dials the interconnect).
    pub fn node_id(&self) -> u8 {
        u8::from(self.config.node > self.pair.partner)
    }

    /// Start the interconnect.
    pub fn start_link(self: &Arc<Self>, ha: Arc<dyn HaInbound>) -> Result<Arc<Link>, String> {
        *self.ha.lock().unwrap() = Some(ha);
        let key = std::fs::read(&self.pair.key_file)
            .map_err(|e| format!("{}: {e}", self.pair.key_file.display()))?;
        let key: Vec<u8> = key.strip_suffix(b"\n").unwrap_or(&key).to_vec();
        let cfg = LinkConfig {
            node_id: self.node_id(),
            listen: self.pair.interconnect_listen,
            peers: self.pair.partner_interconnect.clone(),
            key,
            heartbeat: Duration::from_millis(self.pair.heartbeat_ms),
            timeout: Duration::from_millis(self.pair.interconnect_timeout_ms),
            software_version: 1 << 16,
        };
        let link =
            Arc::new(Link::start(cfg, self.clone()).map_err(|e| format!("interconnect: {e}"))?);
        *self.link.lock().unwrap() = Some(link.clone());
        Ok(link)
    }

    fn exports_of(&self, aggregate: &str) -> Vec<ExportConfig> {
        self.config
            .export
            .iter()
            .filter(|e| e.aggregate == aggregate)
            .cloned()
            .collect()
    }

    fn service_addrs(&self, whose: Whose) -> Vec<ServiceAddr> {
        let agg = match whose {
            Whose::Own => &self.own_cfg.name,
            Whose::Partner => &self.partner_cfg.name,
        };
        self.exports_of(agg)
            .iter()
            .flat_map(|e| {
                let ifname = e.service_interface.clone().unwrap_or_default();
                e.service_addrs.iter().map(move |a| {
                    ServiceAddr::new(&ifname, a.parse::<IpPrefix>().expect("validated"))
                })
            })
            .collect()
    }

    fn side(&self, whose: Whose) -> &Mutex<Side> {
        match whose {
            Whose::Own => &self.own,
            Whose::Partner => &self.partner,
        }
    }

    fn agg_cfg(&self, whose: Whose) -> &AggregateConfig {
        match whose {
            Whose::Own => &self.own_cfg,
            Whose::Partner => &self.partner_cfg,
        }
    }

    /// Run one HA step for real. Idempotent: a step retried after a failure converges.
    pub fn run_step(&self, step: Step) -> Result<(), String> {
        let t0 = Instant::now();
        let r = self.step_inner(step);
        let ms = t0.elapsed().as_millis() as u64;
        match &r {
            Ok(()) => tracing::info!(step = ?step, ms, "step done"),
            Err(e) => tracing::error!(step = ?step, ms, error = %e, "step failed"),
        }
        self.times
            .lock()
            .unwrap()
            .steps
            .push((format!("{step:?}"), ms));
        r
    }

    fn step_inner(&self, step: Step) -> Result<(), String> {
        if self.halted.load(Ordering::SeqCst) {
            return Err("this node halted: no data-plane step until it resumes".into());
        }
        match step {
            // Our own graceful shutdown.
            Step::StopAccepting | Step::DrainInFlight => self.drain(Whose::Own),
            Step::FinalCp => self.close_aggregate(Whose::Own),
            Step::ReleaseServiceIps => self.release_ips(Whose::Own),
            Step::CloseClients => {
                self.stop_servers(Whose::Own);
                Ok(())
            }
            // Mailbox steps are done by the HA layer's mailbox driver; heartbeats continue.
            Step::MarkCleanShutdown | Step::StopHeartbeats | Step::RecheckMailbox => Ok(()),
            // Fencing is done by the HA layer (mailbox) and `fence` below (reservations).
            Step::Fence | Step::ReleaseFence | Step::RegisterOwn => Ok(()),
            // Takeover of the partner.
            Step::OpenPartnerAggregate => self.open_aggregate(Whose::Partner),
            Step::ReplayPartnerLog => self.replay_partner(),
            Step::TakePartnerIdentity => self.take_ips(Whose::Partner),
            Step::ServePartnerExports => self.serve(Whose::Partner),
            // Giveback.
            Step::DrainPartnerExports => {
                self.drain(Whose::Partner)?;
                self.stop_servers(Whose::Partner);
                Ok(())
            }
            Step::CpPartnerAggregate => self.close_aggregate(Whose::Partner),
            Step::ReleasePartnerIps => self.release_ips(Whose::Partner),
            Step::ClosePartnerAggregate => self.close_partner(),
            // Our own boot.
            Step::OpenOwnAggregate => self.open_aggregate(Whose::Own),
            Step::ReplayOwnLog => self.open_own_journal(false),
            Step::DiscardOwnLog => self.open_own_journal(true),
            Step::TakeOwnIps => self.take_ips(Whose::Own),
            Step::ServeOwnExports => self.serve(Whose::Own),
        }
    }

    fn open_aggregate(&self, whose: Whose) -> Result<(), String> {
        let mut side = self.side(whose).lock().unwrap();
        if side.aggregate.is_some() {
            return Ok(());
        }
        let cfg = self.agg_cfg(whose);
        let mut p = crate::daemon::node::progress_printer(format!("parity resync of {}", cfg.name));
        // Only an aggregate left open (dirty) can need its log: every write a log acknowledged
        // came after an open, which marks the labels dirty, and a clean close comes only after
        // a final CP put the log on the members. The log of a clean aggregate is stale (the
        // partner may have served it and closed it since: its old records would overwrite
        // newer data). It is forgotten durably here, before the labels go dirty: a crash in
        // between must not leave dirty labels over a stale log.
        let mut discard_stale = |was_dirty: bool, uuid: [u8; 16]| -> Result<(), String> {
            if was_dirty {
                return Ok(());
            }
            let uuid = uuid::Uuid::from_bytes(uuid);
            match whose {
                Whose::Own => {
                    let path = cfg.nvram.clone().expect("validated");
                    let mut r =
                        NvramRegion::open(&path, cfg.nvram_mib << 20).map_err(|e| e.to_string())?;
                    tracing::info!(aggregate = %cfg.name, "closed cleanly: its log holds nothing to replay and starts empty");
                    crate::daemon::journal::format_empty(&mut r, uuid).map_err(|e| e.to_string())
                }
                Whose::Partner => match self.mirror.lock().unwrap().as_ref() {
                    Some(m) => {
                        tracing::info!(aggregate = %cfg.name, "partner aggregate closed cleanly: its log mirror is not replayed");
                        m.discard(uuid).map_err(|e| e.to_string())
                    }
                    None => Ok(()),
                },
            }
        };
        let (agg, dirty) =
            setup::open_with_state_and(cfg, &self.config.io, &mut p, &mut discard_stale)
                .map_err(|e| e.to_string())?;
        // A write of ours refused with a reservation conflict: the partner fenced us.
        if let Some(h) = self.ha.lock().unwrap().clone() {
            agg.set_on_fenced(Box::new(move |why| {
                tracing::error!("{why}: telling the HA loop we are fenced out");
                h.fenced_out();
            }));
        }
        let agg = Arc::new(agg);
        {
            let mut h = self.halt_handles.lock().unwrap();
            h.aggregates.retain(|w| w.strong_count() > 0);
            h.aggregates.push(Arc::downgrade(&agg));
        }
        side.aggregate = Some(agg);
        side.was_dirty = dirty;
        side.log_settled = false;
        side.closed_clean = false;
        Ok(())
    }

    /// Our journal: replay our log (normal boot) or start it empty (after a giveback, when the
    /// partner replayed it and put it on the members).
    fn open_own_journal(&self, discard: bool) -> Result<(), String> {
        let _report = self.own_mirror_report.lock().unwrap();
        let mut side = self.own.lock().unwrap();
        if side.journal.is_some() {
            return Ok(());
        }
        let agg = side.aggregate.clone().ok_or("own aggregate not open")?;
        let path = self.own_cfg.nvram.clone().expect("validated");
        let bytes = self.own_cfg.nvram_mib << 20;
        // (A log that was stale because the aggregate had been closed cleanly, by us or by the
        // partner at giveback, was made an empty log when the aggregate was opened.)
        if discard {
            // Zero the header: the replay below then finds an unformatted log.
            let mut r = NvramRegion::open(&path, bytes).map_err(|e| e.to_string())?;
            r.bytes_mut()[..4096].fill(0);
            r.persist(&[0..4096]).map_err(|e| e.to_string())?;
        }
        let mut region = NvramRegion::open(&path, bytes).map_err(|e| e.to_string())?;
        let unformatted = region.bytes()[..64].iter().all(|&b| b == 0);
        if !discard && unformatted && side.was_dirty {
            // The aggregate was not closed cleanly but there is no log: it was lost with this
            // node's NVRAM. Acknowledged writes may be only in the partner's mirror of it.
            self.restore_from_partner(&mut region, &agg)?;
        }
        let cfg = JournalConfig {
            cp_interval: Duration::from_millis(self.own_cfg.cp_interval_ms),
            flush_every_commit: self.own_cfg.nvram_flush == crate::config::NvramFlush::EveryCommit,
            ..JournalConfig::default()
        };
        let (j, summary) = Journal::open(agg, region, cfg).map_err(|e| e.to_string())?;
        tracing::info!(discard, "own log: {summary:?}");
        if let Some(link) = self.link.lock().unwrap().clone() {
            j.set_mirror(Some(link as Arc<dyn MirrorLink>));
        }
        if let Some(mb) = self.mailbox.lock().unwrap().clone() {
            j.note_unmirrored_flag(mb.unmirrored());
            j.set_unmirrored_hook(Some(Box::new(move |on| {
                mb.set_unmirrored_now(on)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })));
        }
        self.register_journal(&j);
        side.journal = Some(j);
        *self.own_log_left.lock().unwrap() = None;
        Ok(())
    }

    fn register_journal(&self, j: &Arc<Journal>) {
        let mut h = self.halt_handles.lock().unwrap();
        h.journals.retain(|w| w.strong_count() > 0);
        h.journals.push(Arc::downgrade(j));
    }

    /// Fetch the partner's mirror of our log into `region` over the interconnect.
    fn restore_from_partner(
        &self,
        region: &mut NvramRegion,
        agg: &Aggregate,
    ) -> Result<(), String> {
        let lost =
            "local NVRAM log lost (the aggregate was not closed cleanly) and the partner's mirror";
        let t0 = Instant::now();
        let link = loop {
            if let Some(l) = self.link.lock().unwrap().clone().filter(|l| l.is_up()) {
                break l;
            }
            if t0.elapsed() > Duration::from_secs(10) {
                return Err(format!(
                    "{lost} is unreachable: not serving until the partner answers"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if self
            .mailbox
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|mb| mb.unmirrored())
        {
            tracing::error!("{lost} lacks writes: the mailbox says this node acknowledged writes the partner's mirror did not get. Those are lost; restoring the rest");
        }
        *self.restore.lock().unwrap() = Some(Restore {
            bytes: vec![0u8; region.len()],
            received: Vec::new(),
            done: false,
        });
        if !link.send(&Message::MirrorFetch) {
            return Err(format!("{lost} could not be requested"));
        }
        let g = self.restore.lock().unwrap();
        let (mut g, _) = self
            .restore_cv
            .wait_timeout_while(g, Duration::from_secs(60), |r| {
                r.as_ref().is_some_and(|r| !r.done)
            })
            .unwrap();
        let r = g.take().ok_or("restore state vanished")?;
        if !r.done {
            return Err(format!("{lost} did not arrive within 60 s"));
        }
        let bytes = r.bytes;
        restored_log_usable(&bytes, agg).map_err(|e| format!("{lost} {e}"))?;
        region.bytes_mut().copy_from_slice(&bytes);
        region
            .persist(&[0..region.len()])
            .map_err(|e| e.to_string())?;
        tracing::warn!(
            bytes = bytes.len(),
            ms = t0.elapsed().as_millis() as u64,
            "NVRAM log restored from the partner's mirror"
        );
        Ok(())
    }

    /// Send our mirror of the partner's log back to it (it lost its own).
    fn send_mirror_copy(&self) {
        // One copy at a time: each is the whole region, twice over in memory.
        if self.copy_in_flight.swap(true, Ordering::AcqRel) {
            tracing::warn!("partner asked for its log again while a copy is being sent: ignored");
            return;
        }
        struct InFlight(Arc<std::sync::atomic::AtomicBool>);
        impl Drop for InFlight {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        let in_flight = InFlight(self.copy_in_flight.clone());
        let snap = match self.mirror.lock().unwrap().as_ref() {
            Some(m) => m.snapshot(),
            None => {
                tracing::error!(
                    "partner asked for its log, but we serve its aggregate: nothing sent"
                );
                return;
            }
        };
        let Some(link) = self.link.lock().unwrap().clone() else {
            return;
        };
        let seg = 1 << 20;
        let segments: Vec<crate::core::interconnect::LogSegment> = snap
            .chunks(seg)
            .enumerate()
            .map(|(i, c)| crate::core::interconnect::LogSegment {
                region_offset: (i * seg) as u64,
                bytes: c.to_vec(),
            })
            .collect();
        // Off the interconnect's reader thread: it must keep reading while we send.
        let total = snap.len() as u64;
        std::thread::spawn(move || {
            let _in_flight = in_flight;
            for batch in segments.chunks(4) {
                if !link.send(&Message::MirrorCopy(LogRecords {
                    epoch: 0,
                    first_seq: 0,
                    last_seq: 0,
                    segments: batch.to_vec(),
                })) {
                    return;
                }
            }
            link.send(&Message::MirrorCopyDone {
                region_bytes: total,
            });
            tracing::warn!(
                bytes = total,
                "sent our mirror of the partner's log to the partner (its own was lost)"
            );
        });
    }

    /// Replay the partner's log from our mirror onto its aggregate, and keep journaling its
    /// writes in that region while we serve it (acknowledged locally: the partner is fenced).
    fn replay_partner(&self) -> Result<(), String> {
        let mut side = self.partner.lock().unwrap();
        if side.journal.is_some() {
            return Ok(());
        }
        let agg = side.aggregate.clone().ok_or("partner aggregate not open")?;
        let mirror = self
            .mirror
            .lock()
            .unwrap()
            .take()
            .ok_or("no mirror region")?;
        // (Had the partner's aggregate been closed cleanly, the mirror was emptied when it
        // was opened: what it held was at best on the members already, at worst older.)
        let region = mirror.into_region();
        let cfg = JournalConfig {
            cp_interval: Duration::from_millis(self.partner_cfg.cp_interval_ms),
            flush_every_commit: self.partner_cfg.nvram_flush
                == crate::config::NvramFlush::EveryCommit,
            ..JournalConfig::default()
        };
        match Journal::open(agg, region, cfg) {
            Ok((j, summary)) => {
                tracing::info!("partner log replayed from the mirror: {summary:?}");
                self.register_journal(&j);
                side.journal = Some(j);
                Ok(())
            }
            Err(e) => {
                // Put the mirror back so a retry can replay it.
                let path = self.partner_cfg.nvram.clone().expect("validated");
                if let Ok(r) = NvramRegion::open(&path, self.partner_cfg.nvram_mib << 20) {
                    *self.mirror.lock().unwrap() = Some(MirrorRegion::new(r));
                }
                Err(e.to_string())
            }
        }
    }

    fn serve(&self, whose: Whose) -> Result<(), String> {
        let mut side = self.side(whose).lock().unwrap();
        let cfg = self.agg_cfg(whose);
        let backend: Arc<dyn Backend> = match (&side.journal, &side.aggregate) {
            (Some(j), _) => j.clone(),
            (None, Some(a)) => a.clone(),
            _ => return Err(format!("aggregate {} not open", cfg.name)),
        };
        for e in self.exports_of(&cfg.name) {
            // A retry after one export failed to start starts the rest, not none.
            if side.servers.iter().any(|s| s.export == e.name) {
                continue;
            }
            let sc = ServerConfig {
                tcp: e.listen,
                unix: e.unix.clone(),
                workers: self.config.io.workers,
                max_request_bytes: self.config.io.max_request_kib * 1024,
                ..ServerConfig::default()
            };
            if let Some(u) = &e.unix {
                let _ = std::fs::remove_file(u);
            }
            let export = Export {
                name: e.name.clone(),
                description: format!(
                    "hapair aggregate {} (home {}, served by {})",
                    cfg.name, cfg.home, self.config.node
                ),
                backend: backend.clone(),
                read_only: false,
            };
            let server = NbdServer::start(sc, vec![export])
                .map_err(|err| format!("export {}: {err}", e.name))?;
            {
                let mut h = self.halt_handles.lock().unwrap();
                h.servers.retain(|a| !a.is_gone());
                h.servers.push(server.abort_handle());
            }
            let s = Served {
                export: e.name.clone(),
                aggregate: cfg.name.clone(),
                tcp: server.local_addr(),
                unix: e.unix.clone(),
                server,
            };
            tracing::info!(export = %s.export, uri = %s.uri(), "serving");
            side.servers.push(s);
        }
        Ok(())
    }

    fn drain(&self, whose: Whose) -> Result<(), String> {
        let side = self.side(whose).lock().unwrap();
        let deadline = Instant::now() + self.drain_deadline;
        for s in &side.servers {
            let r = s.server.drain(deadline);
            tracing::info!(export = %s.export, report = ?r, "drained");
        }
        Ok(())
    }

    fn stop_servers(&self, whose: Whose) {
        let mut side = self.side(whose).lock().unwrap();
        for s in side.servers.drain(..) {
            s.server.shutdown();
        }
    }

    /// Final CP and clean close of an aggregate; the side keeps nothing open afterwards.
    fn close_aggregate(&self, whose: Whose) -> Result<(), String> {
        let mut side = self.side(whose).lock().unwrap();
        // Each is let go only once its close succeeded: a retry of a failed final CP must run
        // that CP again, not find the journal gone and close the aggregate clean without the
        // log's writes on it.
        if let Some(j) = &side.journal {
            j.close().map_err(|e| e.to_string())?;
            side.log_settled = true;
        }
        side.journal = None;
        if let Some(a) = side.aggregate.clone() {
            if !side.log_settled {
                // Opened, but its log never replayed (the replay or the restore failed, or
                // was never reached): a clean label would have the log forgotten as stale.
                // Left dirty: the next open replays it.
                side.aggregate = None;
                return Err(format!(
                    "aggregate {} not closed cleanly: its log was never replayed",
                    a.name()
                ));
            }
            a.close().map_err(|e| e.to_string())?;
            side.closed_clean = true;
            if whose == Whose::Own {
                *self.own_log_left.lock().unwrap() = Some(OwnLogLeft::Settled);
            }
        }
        side.aggregate = None;
        if !side.closed_clean {
            return Err("nothing was open: no final CP made".into());
        }
        Ok(())
    }

    /// After giveback: our copy of the partner's log becomes a mirror again.
    fn close_partner(&self) -> Result<(), String> {
        self.close_aggregate(Whose::Partner)?;
        let mut m = self.mirror.lock().unwrap();
        if m.is_none() {
            let path = self.partner_cfg.nvram.clone().expect("validated");
            let r = NvramRegion::open(&path, self.partner_cfg.nvram_mib << 20)
                .map_err(|e| e.to_string())?;
            *m = Some(MirrorRegion::new(r));
        }
        Ok(())
    }

    fn take_ips(&self, whose: Whose) -> Result<(), String> {
        let addrs = self.service_addrs(whose);
        if addrs.is_empty() {
            return Ok(());
        }
        let mut id = self.identity.lock().unwrap();
        let id = id.as_mut().ok_or("no identity manager")?;
        // The partner's addresses are taken only by TakePartnerIdentity, after the Fence step
        // succeeded: a fenced partner cannot legitimately keep serving, so an address it failed
        // to release (or a daemon killed on a live host left behind) must not block the
        // takeover for ever; take_fenced overrides such a holder after a bounded wait. Our own
        // addresses (TakeOwnIps at boot or resume) follow no fence: a holder there is refused.
        // Without a fence (the test-only unsafe_skip_fence) nothing justifies overriding.
        let fenced = whose == Whose::Partner && !self.pair.unsafe_skip_fence;
        let taken = if fenced {
            id.take_fenced(&addrs)
        } else {
            id.take(&addrs)
        };
        let reports = match taken {
            Ok(r) => r,
            // 127.0.0.0/8 is local on lo whether or not the address is listed: a demo without
            // CAP_NET_ADMIN still works, it just cannot show the address moving.
            Err(e) if addrs.iter().all(|a| a.ifname == "lo") => {
                tracing::warn!(error = %e, "cannot add loopback service addresses; serving on them anyway");
                return Ok(());
            }
            Err(e) => return Err(e.to_string()),
        };
        for r in reports {
            tracing::info!(addr = %r.addr.prefix, already = r.already_held, probe_ms = r.probe.as_millis() as u64,
                add_ms = r.add.as_millis() as u64, announce_ms = r.announce.as_millis() as u64, "service address taken");
            if let Some(c) = &r.took_over_conflict {
                let holder = c
                    .holder_mac
                    .map(|m| fmt_mac(&m))
                    .unwrap_or_else(|| "unknown".into());
                tracing::error!(whose = ?whose, addr = %r.addr, %holder, waited_ms = c.waited.as_millis() as u64,
                    "service address taken over from a host that still answered for it after the fence; \
                     remove it there (the partner's daemon does so when it starts)");
            }
        }
        Ok(())
    }

    /// Remove the service addresses of `whose` exports from this host.
    pub fn release_ips(&self, whose: Whose) -> Result<(), String> {
        let addrs = self.service_addrs(whose);
        if addrs.is_empty() {
            return Ok(());
        }
        let mut id = self.identity.lock().unwrap();
        let id = id.as_mut().ok_or("no identity manager")?;
        match id.release(&addrs) {
            Ok(_) => Ok(()),
            Err(e) if addrs.iter().all(|a| a.ifname == "lo") => {
                tracing::warn!(error = %e, "cannot remove loopback service addresses");
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Stop everything now: close clients unanswered, stop writing, drop addresses.
    ///
    /// The first part takes no side lock: a final CP or a takeover step can hold one for
    /// seconds, and a node told to die (with a mailbox-only fence, the partner starts on our
    /// disks a bounded time later) must be off them well before. Connections close first,
    /// unanswered, so that no client gets an error for a request that the next server will
    /// take again; then nothing is acknowledged any more, and no member is written.
    pub fn halt(&self) {
        // Until a resume registers us again, no data-plane step runs (a halt by the mailbox
        // driver comes before the state machine knows; its steps in flight must fail).
        self.halted.store(true, Ordering::SeqCst);
        let (servers, journals, aggregates) = {
            let h = self
                .halt_handles
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            (h.servers.clone(), h.journals.clone(), h.aggregates.clone())
        };
        for s in &servers {
            s.abort();
        }
        let aggregates: Vec<Arc<Aggregate>> = aggregates.iter().filter_map(Weak::upgrade).collect();
        for a in &aggregates {
            a.begin_halt("this node halts");
        }
        for j in journals.iter().filter_map(Weak::upgrade) {
            j.halt("this node halts");
        }
        for a in &aggregates {
            if !a.wait_halted(Duration::from_secs(2)) {
                tracing::error!(aggregate = %a.name(), "halt: member I/O still in flight after 2 s (a hung device?)");
            }
        }
        for whose in [Whose::Own, Whose::Partner] {
            let mut side = self
                .side(whose)
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for s in side.servers.drain(..) {
                s.server.shutdown();
            }
            if whose == Whose::Own {
                if let Some(j) = &side.journal {
                    *self.own_log_left.lock().unwrap() = Some(OwnLogLeft::Open {
                        mirrored: j.fully_mirrored(),
                        session: self.link_session(),
                    });
                }
            }
            side.journal = None;
            side.aggregate = None;
            drop(side);
            let _ = self.release_ips(whose);
        }
    }

    fn link_session(&self) -> Option<u64> {
        self.link
            .lock()
            .unwrap()
            .as_ref()
            .and_then(|l| MirrorLink::session(&**l))
    }

    /// Is every write we acknowledged in the partner's mirror?
    pub fn own_mirrored(&self) -> bool {
        let side = self.own.lock().unwrap();
        if let Some(j) = &side.journal {
            return j.fully_mirrored();
        }
        // No journal open (booting, resuming, taken over). What the mailbox says first: set
        // before the first write acknowledged unmirrored, kept across restarts, cleared only
        // by a journal that resynced the mirror. Without a mailbox nothing says so.
        let flag_clear = self
            .mailbox
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|mb| !mb.unmirrored());
        let left = *self.own_log_left.lock().unwrap();
        OwnLogLeft::mirrored(left, flag_clear, self.link_session())
    }

    /// Wait up to `limit` for our open log to be mirrored, while the interconnect is up.
    fn wait_own_mirrored(&self, limit: Duration) -> bool {
        let t0 = Instant::now();
        loop {
            let j = self.own.lock().unwrap().journal.clone();
            let Some(j) = j else { return false };
            if j.fully_mirrored() {
                return true;
            }
            if self.link_session().is_none() || t0.elapsed() >= limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Tell the HA loop whether our log is mirrored (see `own_mirror_report`).
    pub fn report_own_mirrored(&self, ha: &crate::daemon::ha::HaHandle) {
        let _report = self.own_mirror_report.lock().unwrap();
        let _ = ha.own_mirror(self.own_mirrored());
    }

    /// Mirror records applied since start (status).
    pub fn mirror_records_applied(&self) -> u64 {
        self.mirror_applied.load(Ordering::Relaxed)
    }
}

impl LinkHandler for PairNode {
    fn on_up(&self, _peer: &Hello) {
        if let Some(h) = self.ha.lock().unwrap().clone() {
            h.on_link(true);
        }
        // A new session: our log is copied to the partner now, not at the CP thread's next
        // tick. (Not waiting for a side lock a CP may hold: the tick comes anyway.)
        if let Ok(side) = self.own.try_lock() {
            if let Some(j) = &side.journal {
                j.kick_mirror();
            }
        }
    }
    fn on_down(&self, _why: &str) {
        if let Some(h) = self.ha.lock().unwrap().clone() {
            h.on_link(false);
        }
    }
    fn on_log_records(&self, records: &LogRecords) -> Result<u64, ApplyError> {
        let m = self.mirror.lock().unwrap();
        let m = m.as_ref().ok_or_else(|| {
            ApplyError::Refused(
                "not mirroring: the partner's aggregate is served here (its log region is that aggregate's log)".into(),
            )
        })?;
        let seq = m
            .apply(records)
            .map_err(|e| ApplyError::Failed(e.to_string()))?;
        self.mirror_applied.fetch_add(1, Ordering::Relaxed);
        Ok(seq)
    }
    fn accepts_mirror(&self) -> bool {
        self.mirror.lock().unwrap().is_some()
    }
    fn on_message(&self, msg: Message) {
        match msg {
            Message::Ha(bytes) => {
                if let Some(h) = self.ha.lock().unwrap().clone() {
                    h.on_ha_message(&bytes);
                }
            }
            Message::MirrorFetch => self.send_mirror_copy(),
            Message::MirrorCopy(r) => {
                let mut g = self.restore.lock().unwrap();
                match g.as_mut().filter(|x| !x.done) {
                    Some(x) => {
                        for s in &r.segments {
                            let a = s.region_offset as usize;
                            match a.checked_add(s.bytes.len()).filter(|&e| e <= x.bytes.len()) {
                                Some(e) => {
                                    x.bytes[a..e].copy_from_slice(&s.bytes);
                                    x.received.push(a..e);
                                }
                                None => tracing::error!(
                                    offset = a,
                                    "mirror copy segment outside our log region: ignored"
                                ),
                            }
                        }
                    }
                    None => tracing::warn!("mirror copy nobody asked for: ignored"),
                }
            }
            Message::MirrorCopyDone { region_bytes } => {
                let mut g = self.restore.lock().unwrap();
                if let Some(x) = g.as_mut() {
                    if region_bytes as usize != x.bytes.len() {
                        tracing::error!(
                            region_bytes,
                            ours = x.bytes.len(),
                            "partner's mirror has another size than our log: not restored"
                        );
                    } else if !x.covered() {
                        tracing::error!(
                            "mirror copy ended before all of it arrived (an earlier request's end?): waiting for the rest"
                        );
                    } else {
                        x.done = true;
                    }
                }
                self.restore_cv.notify_all();
            }
            _ => {}
        }
    }
    fn summary(&self) -> StateSummary {
        match self.ha.lock().unwrap().clone() {
            Some(h) => h.summary(),
            None => StateSummary {
                ha_state: 0,
                flags: 0,
                aggregates_served: 0,
                log_last_seq: 0,
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The HA wiring: the executor the HA loop drives, the inbound path, the runtime.
// ---------------------------------------------------------------------------------------------

use crate::core::control::{AggregateHome, ExportView, NvramView, PairStatus};
use crate::core::fence::{node_key, FenceMode};
use crate::core::takeover::{self, AckMode, Alarm, NodeId, StepError};
use crate::daemon::control::{ControlOptions, ControlServer, StatusProvider};
use crate::daemon::fence::{probe_members, FenceError, PrFencer};
use crate::daemon::ha::{
    self as ha, HaConfig, HaExecutor, HaHandle, HaLoop, StepDone, StepOutcome,
};
use crate::daemon::mailbox::{DiskStore, MailboxConfig, MailboxDriver, MailboxHandle};
use crate::io::mailbox::MailboxDisks;
use crate::io::sg::PrDevice;
use std::sync::mpsc::{sync_channel, SyncSender};

/// Executes the HA loop's actions on the pair node.
pub struct PairExecutor {
    node: Arc<PairNode>,
    mailbox: MailboxHandle,
    outbox: SyncSender<takeover::Message>,
    epoch: u64,
    /// How long a fence by mailbox alone waits for the partner to stop (twice the bound).
    msgwait: Duration,
    /// The loop's own handle: the steps after the log opened report its mirror state before
    /// they complete, so that the node is Normal with the journal's word, not the monitor's
    /// next one.
    ha: crate::daemon::ha::HaHandle,
}

impl PairExecutor {
    fn fence(
        node: &PairNode,
        mailbox: &MailboxHandle,
        epoch: u64,
        msgwait: Duration,
    ) -> Result<(), StepError> {
        mailbox
            .write_please_die_now(true, epoch)
            .map_err(|e| StepError::Failed(format!("please-die not written: {e}")))?;
        if let Some(pr) = &node.pr {
            // The reservation is the fence: once the partner's key is preempted its disks
            // refuse its writes, whatever it does. No waiting for its mailbox.
            return pr.fence().map_err(fence_step_error);
        }
        // A partner whose mailbox has been silent for 1.5 self-fence bounds (msgwait is two)
        // has stopped writing: it fences itself one bound after its last heartbeat write,
        // which came before we saw its counter move. No need to wait again.
        if node
            .partner_beat
            .lock()
            .unwrap()
            .is_some_and(|(_, t)| t.elapsed() >= msgwait * 3 / 4)
        {
            tracing::info!("partner's mailbox silent for longer than the self-fence wait: fenced");
            return Ok(());
        }
        // Mailbox-only fencing (no persistent reservations on these members): the partner stops
        // when it reads please-die, or has stopped by itself if it cannot read its mailbox.
        // Wait for its slot to say so, at most msgwait.
        // The bound only holds for a partner that stopped writing its heartbeat: one whose
        // counter still moves at the end is alive and has not obeyed (it cannot read the
        // please-die, say), and is not fenced. The step fails (and is retried, then the
        // takeover abandoned) rather than have two nodes write the same stripes.
        let t0 = Instant::now();
        let mut last: Option<(u64, Instant)> = None;
        loop {
            if let Some(v) = mailbox.read_view() {
                match v.partner_slot {
                    None => break,
                    Some(s) if s.clean_shutdown || s.state == takeover::State::TakenOver => break,
                    Some(s) => {
                        if last.is_none_or(|(c, _)| c != s.counter) {
                            last = Some((s.counter, Instant::now()));
                        }
                    }
                }
            }
            if t0.elapsed() >= msgwait {
                if let Some((counter, at)) = last.filter(|(_, at)| at.elapsed() < msgwait / 2) {
                    return Err(StepError::Failed(format!(
                        "partner still writes its mailbox heartbeat (counter {counter}, {} ms ago) \
                         but has not confirmed the please-die: not fenced",
                        at.elapsed().as_millis()
                    )));
                }
                tracing::warn!(
                    ms = msgwait.as_millis() as u64,
                    "partner did not confirm in its mailbox and its heartbeat stopped: fenced by the self-fence bound"
                );
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl HaExecutor for PairExecutor {
    fn send(&mut self, msg: takeover::Message) {
        if self.outbox.try_send(msg).is_err() {
            tracing::debug!(
                "interconnect outbox full: HA message dropped (the state machine resends)"
            );
        }
    }

    fn begin(&mut self, step: Step, done: StepDone) {
        if step == Step::Fence {
            self.epoch += 1;
        }
        let node = self.node.clone();
        let mailbox = self.mailbox.clone();
        let epoch = self.epoch;
        let msgwait = self.msgwait;
        let ha = self.ha.clone();
        std::thread::spawn(move || {
            let t0 = Instant::now();
            let outcome = match step {
                Step::Fence => match Self::fence(&node, &mailbox, epoch, msgwait) {
                    Ok(()) => StepOutcome::Done,
                    Err(e) => StepOutcome::Failed(e),
                },
                // Reservations first (the partner reserves at its RegisterOwn), then the
                // mailbox: the partner does not resume before please-die is gone.
                Step::ReleaseFence => match node
                    .pr
                    .as_ref()
                    .map_or(Ok(()), |pr| pr.release_fence().map_err(fence_step_error))
                {
                    Err(e) => StepOutcome::Failed(e),
                    Ok(()) => match mailbox.write_please_die_now(false, 0) {
                        Ok(_) => StepOutcome::Done,
                        Err(e) => StepOutcome::Failed(StepError::Failed(e.to_string())),
                    },
                },
                Step::RegisterOwn => match node
                    .pr
                    .as_ref()
                    .map_or(Ok(()), |pr| pr.register_own().map_err(fence_step_error))
                {
                    Ok(()) => {
                        // A resume begins: the data plane may run again.
                        node.halted.store(false, Ordering::SeqCst);
                        StepOutcome::Done
                    }
                    Err(e) => StepOutcome::Failed(e),
                },
                Step::RecheckMailbox | Step::MarkCleanShutdown => {
                    mailbox.run_step(step).unwrap_or(StepOutcome::Done)
                }
                other => {
                    if !done.is_current() {
                        return;
                    }
                    match node.run_step(other) {
                        Ok(()) => StepOutcome::Done,
                        Err(e) => StepOutcome::Failed(StepError::Failed(e)),
                    }
                }
            };
            if matches!(step, Step::TakeOwnIps | Step::ServeOwnExports) {
                if step == Step::ServeOwnExports {
                    // Resume with the log mirrored where the partner is there to take it (the
                    // copy of a freshly opened log takes milliseconds): the partner's status
                    // then says so when our resume completes, and a takeover can follow.
                    node.wait_own_mirrored(Duration::from_millis(500));
                }
                node.report_own_mirrored(&ha);
            }
            if matches!(
                step,
                Step::Fence
                    | Step::ReleaseFence
                    | Step::RegisterOwn
                    | Step::RecheckMailbox
                    | Step::MarkCleanShutdown
            ) {
                node.times
                    .lock()
                    .unwrap()
                    .steps
                    .push((format!("{step:?}"), t0.elapsed().as_millis() as u64));
            }
            done.finish(outcome);
        });
    }

    fn halt_self(&mut self) {
        tracing::error!("HALT: stopping all service now (taken over, please-die, or self-fenced)");
        self.node.halt();
    }

    fn set_ack_mode(&mut self, mode: AckMode) {
        tracing::info!(?mode, "acknowledgement mode");
    }

    fn alarm(&mut self, alarm: &Alarm) {
        tracing::error!(?alarm, "ALARM");
    }
}

/// A fencing step's error for the HA layer: a conflict (our key is gone) halts us, anything
/// else is retried.
fn fence_step_error(e: FenceError) -> StepError {
    if e.is_fenced() {
        StepError::ReservationConflict
    } else {
        StepError::Failed(e.to_string())
    }
}

/// What arrives over the interconnect for HA goes to the loop.
struct Inbound {
    ha: HaHandle,
    /// Rate limit of the log line of a dropped message.
    dropped: Mutex<crate::core::ratelimit::RateLimiter>,
    epoch: Instant,
}

impl Inbound {
    fn new(ha: HaHandle) -> Inbound {
        Inbound {
            ha,
            dropped: Mutex::new(crate::core::ratelimit::RateLimiter::new(5, 1)),
            epoch: Instant::now(),
        }
    }
}

impl HaInbound for Inbound {
    fn on_ha_message(&self, bytes: &[u8]) {
        match serde_json::from_slice::<takeover::Message>(bytes) {
            Ok(m) => {
                // Never waits for the loop: this runs on the link's reader, which also applies
                // the partner's mirror updates and acknowledges them.
                if let Err(e) = self.ha.partner_message(m) {
                    if let Some(n) = self.dropped.lock().unwrap().allow(self.epoch.elapsed()) {
                        tracing::error!(error = %e, dropped = self.ha.partner_messages_dropped(), suppressed = n, "HA message from the partner dropped: the HA loop is not taking its input");
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "undecodable HA message from an authenticated partner: ignored")
            }
        }
    }
    fn on_link(&self, _up: bool) {}
    fn fenced_out(&self) {
        let _ = self.ha.fenced_out();
    }
    fn summary(&self) -> StateSummary {
        StateSummary {
            ha_state: 0,
            flags: StateSummary::HEALTHY,
            aggregates_served: 0,
            log_last_seq: 0,
        }
    }
}

impl StatusProvider for PairNode {
    fn fill(&self, st: &mut PairStatus) {
        let mut exports = Vec::new();
        for (whose, name) in [
            (Whose::Own, &self.own_cfg.name),
            (Whose::Partner, &self.partner_cfg.name),
        ] {
            let side = self.side(whose).lock().unwrap();
            // Who serves the aggregate, as the HA state machine sees it (the partner's own
            // export is served there, not here).
            let ha_served_by = st
                .aggregates
                .iter()
                .find(|v| &v.name == name)
                .and_then(|v| v.served_by.clone());
            for e in self.exports_of(name) {
                let served = side.servers.iter().find(|s| s.export == e.name);
                exports.push(ExportView {
                    name: e.name.clone(),
                    aggregate: name.clone(),
                    address: e
                        .listen
                        .map(|a| a.to_string())
                        .or_else(|| e.unix.as_ref().map(|u| u.display().to_string()))
                        .unwrap_or_default(),
                    served_by: served
                        .map(|_| self.config.node.clone())
                        .or(ha_served_by.clone()),
                    connections: served.map(|s| s.server.stats().connections_active),
                });
            }
            if let Some(a) = &side.aggregate {
                let s = a.status();
                if let Some(v) = st.aggregates.iter_mut().find(|v| v.name == s.name) {
                    v.state = match (&s.offline, s.failed_member) {
                        (Some(why), _) => format!("offline: {why}"),
                        (None, Some(m)) => {
                            format!("degraded: member {m} ({}) failed", s.members[m])
                        }
                        (None, None) => "online".into(),
                    };
                }
            }
        }
        // Other nodes' exports we do not serve stay listed with served_by from the HA view.
        st.exports = exports;
        let own = self.own.lock().unwrap();
        let persistence = own
            .journal
            .as_ref()
            .map(|j| j.persistence().trim_start_matches("NVRAM: ").to_string())
            .unwrap_or_else(|| "own log not open".into());
        let mirror = own.journal.as_ref().map_or_else(
            || "not open".to_string(),
            |j| match j.mirror_state() {
                MirrorState::Mirrored => "mirrored".to_string(),
                MirrorState::NoPartner => "no partner link".to_string(),
                MirrorState::NotMirrored { since, why } => {
                    let ms = since
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64);
                    format!(
                        "NOT mirrored since {}: {why}",
                        crate::core::control::timestamp(ms, 0)
                    )
                }
            },
        );
        st.nvram = Some(NvramView {
            persistence,
            // Not open (taken over, booting): unknown, not "0%".
            used_bytes: own.journal.as_ref().map(|j| j.usage().0),
            capacity_bytes: self.own_cfg.nvram_mib << 20,
            detail: format!(
                "own log mirror: {mirror}; fencing: {}",
                self.fence_mode.describe()
            ),
        });
        st.extra.insert(
            "fencing".into(),
            serde_json::json!(self.fence_mode.describe()),
        );
        st.extra.insert(
            "step_times_ms".into(),
            serde_json::json!(self
                .times
                .lock()
                .unwrap()
                .steps
                .iter()
                .rev()
                .take(40)
                .collect::<Vec<_>>()),
        );
    }
}

/// A running pair node: the HA loop, the mailbox driver, the interconnect, the control socket.
pub struct PairRuntime {
    pub node: Arc<PairNode>,
    pub ha: HaHandle,
    pub control: Option<ControlServer>,
    pub mailbox: Option<MailboxDriver>,
    pub link: Arc<Link>,
    loop_thread: Option<std::thread::JoinHandle<()>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl PairRuntime {
    /// Bring the node up in its pair. The HA state machine then boots the node's own aggregate
    /// (or waits for giveback, if it finds itself taken over).
    pub fn start(config: Config) -> Result<PairRuntime, String> {
        // systemd's watchdog must kill a hung node before its partner may take it over, and
        // must not kill a healthy one: refuse to start rather than serve with either.
        if let (Some(p), Some(usec)) = (
            config.pair.as_ref(),
            crate::io::sdnotify::watchdog_usec_from_env(),
        ) {
            p.check_watchdog(usec)?;
        }
        let node = PairNode::new(config)?;
        let pair = node.pair.clone();
        // A daemon that is starting serves nothing: addresses a crashed predecessor left on the
        // interface would make the partner's takeover refuse them (they answer its ARP probe).
        let _ = node.release_ips(Whose::Own);
        let _ = node.release_ips(Whose::Partner);
        let mut hc = HaConfig::new(&node.config.node, &pair.partner).map_err(|e| e.to_string())?;
        let t = &mut hc.takeover;
        t.heartbeat_interval_ms = pair.heartbeat_ms;
        t.interconnect_timeout_ms = pair.interconnect_timeout_ms;
        t.mailbox_timeout_ms = pair.mailbox_timeout_ms;
        t.request_timeout_ms = (pair.countdown_ms + 5_000).max(t.request_timeout_ms);
        t.please_die_interval_ms = pair.heartbeat_ms * 2;
        t.countdown_ms = pair.countdown_ms;
        t.auto_giveback = pair.auto_giveback;
        t.holddown_ms = pair.holddown_ms;
        t.unsafe_skip_fence = pair.unsafe_skip_fence;
        t.step_retry_ms = 500;
        hc.tick = Duration::from_millis((pair.heartbeat_ms / 4).max(5));
        hc.self_fence_bound_ms = pair.self_fence_bound_ms();
        let home_id = |h: &str| {
            if ha::node_id(&node.config.node, &pair.partner) == NodeId::A {
                if h == node.config.node {
                    NodeId::A
                } else {
                    NodeId::B
                }
            } else if h == node.config.node {
                NodeId::B
            } else {
                NodeId::A
            }
        };
        hc.aggregates = node
            .config
            .aggregate
            .iter()
            .map(|a| AggregateHome {
                name: a.name.clone(),
                home: home_id(&a.home),
            })
            .collect();
        let (handle, inbox) = ha::channel(ha::INPUT_CAPACITY);
        // The mailbox on every shared member.
        let members: Vec<std::path::PathBuf> = node
            .own_cfg
            .members()
            .into_iter()
            .chain(node.partner_cfg.members())
            .collect();
        let disks = MailboxDisks::open(&members).map_err(|e| format!("mailbox: {e}"))?;
        // Under Write Exclusive reservations we may write only the members we hold: our slot
        // goes to our own aggregate's members (listed first), the partner reads it there.
        let write_first = node.pr.as_ref().map(|_| node.own_cfg.members().len());
        let store = Arc::new(DiskStore {
            disks,
            uuids: vec![[0; 16]; members.len()],
            write_first,
        });
        let mcfg = MailboxConfig {
            node_name: node.config.node.clone(),
            partner_name: pair.partner.clone(),
            interval: Duration::from_millis(pair.heartbeat_ms),
            self_fence_bound_ms: hc.self_fence_bound_ms,
        };
        let driver =
            MailboxDriver::spawn(store, mcfg, handle.clone()).map_err(|e| e.to_string())?;
        let mailbox = driver.handle.clone();
        *node.mailbox.lock().unwrap() = Some(mailbox.clone());
        {
            let weak = Arc::downgrade(&node);
            mailbox.set_self_fence_hook(Some(Box::new(move |_why| {
                if let Some(n) = weak.upgrade() {
                    n.halt();
                }
            })));
        }
        let link = node.start_link(Arc::new(Inbound::new(handle.clone())))?;
        // HA messages leave through one sender thread: the loop never blocks on a socket.
        let (out_tx, out_rx) = sync_channel::<takeover::Message>(256);
        {
            let link = link.clone();
            std::thread::Builder::new()
                .name("hapair-ha-out".into())
                .spawn(move || {
                    for m in out_rx {
                        match serde_json::to_vec(&m) {
                            Ok(b) => {
                                link.send(&Message::Ha(b));
                            }
                            Err(e) => tracing::error!(error = %e, "cannot encode HA message"),
                        }
                    }
                })
                .map_err(|e| e.to_string())?;
        }
        let mailbox_for_monitor = mailbox.clone();
        let exec = PairExecutor {
            node: node.clone(),
            mailbox: mailbox.clone(),
            outbox: out_tx,
            epoch: crate::io::clock::unix_ms(),
            msgwait: Duration::from_millis(2 * hc.self_fence_bound_ms),
            ha: handle.clone(),
        };
        let notifier = crate::io::sdnotify::Notifier::from_env().ok().flatten();
        let watchdog = match (notifier, crate::io::sdnotify::watchdog_interval_from_env()) {
            (Some(n), Some(d)) => Some((n, d)),
            _ => None,
        };
        let loop_thread = HaLoop::spawn(hc, inbox, Box::new(exec), Box::new(mailbox), watchdog)
            .map_err(|e| e.to_string())?;
        // A missing parent directory shows as the bind error below, with the path.
        if let Some(dir) = pair.control_socket.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let control = ControlServer::start(
            &pair.control_socket,
            handle.clone(),
            node.clone(),
            ControlOptions::default(),
        )
        .map_err(|e| e.to_string())?;
        // Feed health, mirror and disk visibility to the loop.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        {
            let node = node.clone();
            let h = handle.clone();
            let stop = stop.clone();
            let mb = mailbox_for_monitor;
            let every = Duration::from_millis(pair.heartbeat_ms);
            std::thread::Builder::new()
                .name("hapair-monitor".into())
                .spawn(move || {
                    while !stop.load(Ordering::Acquire) && !h.is_closed() {
                        if let Some(c) = mb
                            .read_view()
                            .and_then(|v| v.partner_slot)
                            .map(|s| s.counter)
                        {
                            let mut pb = node.partner_beat.lock().unwrap();
                            if pb.is_none_or(|(old, _)| old != c) {
                                *pb = Some((c, Instant::now()));
                            }
                        }
                        node.report_own_mirrored(&h);
                        let expected = node.partner_cfg.members().len() as u32;
                        let visible = node
                            .partner_cfg
                            .members()
                            .iter()
                            .filter(|p| std::fs::metadata(p).is_ok())
                            .count() as u32;
                        let _ = h.partner_disks(visible, expected);
                        let _ = h.health(true, "");
                        std::thread::sleep(every);
                    }
                })
                .map_err(|e| e.to_string())?;
        }
        if let Ok(Some(n)) = crate::io::sdnotify::Notifier::from_env() {
            let _ = n.ready(&format!(
                "node {} in pair with {}",
                node.config.node, pair.partner
            ));
        }
        Ok(PairRuntime {
            node,
            ha: handle,
            control: Some(control),
            mailbox: Some(driver),
            link,
            loop_thread: Some(loop_thread),
            stop,
        })
    }

    /// Stop the node gracefully where it can: drain what it serves, final CPs, close. (A stop
    /// is not a takeover: the partner sees the interconnect and the mailbox go quiet.)
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        for whose in [Whose::Partner, Whose::Own] {
            let _ = self.node.drain(whose);
            self.node.stop_servers(whose);
            if let Err(e) = self.node.close_aggregate(whose) {
                tracing::error!(error = %e, "close on stop failed");
            }
        }
        // Addresses go with the service: release what this node holds.
        let _ = self.node.release_ips(Whose::Partner);
        let _ = self.node.release_ips(Whose::Own);
        self.ha.stop();
        if let Some(t) = self.loop_thread.take() {
            let _ = t.join();
        }
        if let Some(c) = self.control.take() {
            c.stop();
        }
        if let Some(m) = self.mailbox.take() {
            m.stop();
        }
        self.link.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::buf::IoBuf;

    /// Both nodes' configurations for a pair on file-backed members in `dir` (5 of 16 MiB per
    /// aggregate, both aggregates formatted), CPs only when asked for.
    fn pair_configs(dir: &std::path::Path) -> [Config; 2] {
        let key = dir.join("ic.key");
        std::fs::write(&key, "pair-unit-test-key-0123456789abcdef").unwrap();
        let mut out = Vec::new();
        for (node, partner) in [("a", "b"), ("b", "a")] {
            let mut t = format!(
                "node = \"{node}\"\n[io]\nworkers = 2\narena_mib = 16\n[pair]\npartner = \"{partner}\"\n\
                 interconnect_listen = \"127.0.0.1:1\"\npartner_interconnect = [\"127.0.0.1:1\"]\n\
                 key_file = \"{}\"\ncontrol_socket = \"{}\"\n",
                key.display(),
                dir.join(format!("{node}.sock")).display()
            );
            for owner in ["a", "b"] {
                let m: Vec<String> = (0..5)
                    .map(|i| format!("\"{}\"", dir.join(format!("{owner}{i}.img")).display()))
                    .collect();
                let log = if owner == node { "log" } else { "mirror" };
                t += &format!(
                    "[[aggregate]]\nname = \"aggr-{owner}\"\nhome = \"{owner}\"\ndata = [{}]\nparity = {}\n\
                     chunk_kib = 64\nnvram = \"{}\"\nnvram_mib = 4\ncp_interval_ms = 600000\n",
                    m[..4].join(", "),
                    m[4],
                    dir.join(format!("{node}-aggr-{owner}.{log}")).display()
                );
            }
            out.push(Config::parse(&t, &dir.join(format!("{node}.toml"))).unwrap());
        }
        for owner in ["a", "b"] {
            for i in 0..5 {
                let f = std::fs::File::create(dir.join(format!("{owner}{i}.img"))).unwrap();
                f.set_len(16 << 20).unwrap();
            }
        }
        for a in &out[0].aggregate {
            setup::format(a, &out[0].io, false, &mut |_, _| {}).unwrap();
        }
        [out[0].clone(), out[1].clone()]
    }

    fn journal(n: &PairNode, whose: Whose) -> Arc<Journal> {
        n.side(whose)
            .lock()
            .unwrap()
            .journal
            .clone()
            .expect("journal")
    }

    fn block(fill: u8) -> IoBuf {
        let mut b = IoBuf::new(4096);
        b.fill(fill);
        b
    }

    /// A node of `cfg` serving its own aggregate (opened, its log replayed).
    fn serving(cfg: &Config) -> Arc<PairNode> {
        let n = PairNode::new(cfg.clone()).unwrap();
        n.run_step(Step::OpenOwnAggregate).unwrap();
        n.run_step(Step::ReplayOwnLog).unwrap();
        n
    }

    /// The node of `cfg` writes `fill` at `BLOCK_AT` and is killed: the write is in its log
    /// only, its aggregate dirty.
    fn killed_after_a_write(cfg: &Config, fill: u8) {
        let n = serving(cfg);
        journal(&n, Whose::Own)
            .write(BLOCK_AT, &block(fill), false)
            .unwrap();
    }

    /// The node of `cfg` takes its partner over (its mirror replayed), writes `fill` at
    /// `BLOCK_AT` and gives the aggregate back (final CP, clean close).
    fn takes_over_writes_and_gives_back(cfg: &Config, fill: u8) {
        let a = PairNode::new(cfg.clone()).unwrap();
        a.run_step(Step::OpenPartnerAggregate).unwrap();
        a.run_step(Step::ReplayPartnerLog).unwrap();
        journal(&a, Whose::Partner)
            .write(BLOCK_AT, &block(fill), false)
            .unwrap();
        a.run_step(Step::CpPartnerAggregate).unwrap();
        a.run_step(Step::ClosePartnerAggregate).unwrap();
    }

    const BLOCK_AT: u64 = 65536;

    fn read_block(j: &Journal, offset: u64) -> u8 {
        let mut b = IoBuf::new(4096);
        j.read(offset, &mut b).unwrap();
        assert!(
            b.iter().all(|&x| x == b[0]),
            "a block written whole reads whole"
        );
        b[0]
    }

    /// b dies with a write in its log; a takes over (replaying its mirror: empty here) and
    /// overwrites the block; a gives back (closing b's aggregate cleanly). If b restarts
    /// before it is told to discard its log (the giveback message lost with the restart), its
    /// own log is stale: replaying it put the old block back over a's.
    #[test]
    fn a_cleanly_closed_aggregate_does_not_replay_its_stale_log() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let [ca, cb] = pair_configs(dir.path());
        killed_after_a_write(&cb, 1);
        takes_over_writes_and_gives_back(&ca, 2);
        let b = PairNode::new(cb).unwrap();
        b.run_step(Step::OpenOwnAggregate).unwrap();
        assert!(!b.own.lock().unwrap().was_dirty);
        b.run_step(Step::ReplayOwnLog).unwrap();
        assert_eq!(
            read_block(&journal(&b, Whose::Own), BLOCK_AT),
            2,
            "the partner's write survives"
        );
    }

    /// A final CP (or a stop) of an aggregate whose log was never replayed must not mark it
    /// clean: the log would then be forgotten as stale at the next open. (It was: the
    /// aggregate closed cleanly with no journal open, e.g. a resume stuck on its replay and
    /// stopped.)
    #[test]
    fn an_aggregate_whose_log_was_not_replayed_stays_dirty() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let [_, cb] = pair_configs(dir.path());
        killed_after_a_write(&cb, 5);
        let b = PairNode::new(cb.clone()).unwrap();
        b.run_step(Step::OpenOwnAggregate).unwrap();
        let e = b.run_step(Step::FinalCp).unwrap_err();
        assert!(e.contains("never replayed"), "{e}");
        drop(b);
        let b = PairNode::new(cb).unwrap();
        b.run_step(Step::OpenOwnAggregate).unwrap();
        assert!(b.own.lock().unwrap().was_dirty, "left dirty");
        b.run_step(Step::ReplayOwnLog).unwrap();
        assert_eq!(read_block(&journal(&b, Whose::Own), BLOCK_AT), 5);
    }

    /// The decision "clean, so the log is stale" is made durable before the labels go dirty:
    /// b restarted after a's giveback and died between opening its aggregate and starting its
    /// log; at the next start the labels are dirty (its own open), and its old log must not
    /// be replayed over a's writes.
    #[test]
    fn a_stale_log_is_forgotten_before_the_labels_go_dirty() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let [ca, cb] = pair_configs(dir.path());
        killed_after_a_write(&cb, 1);
        takes_over_writes_and_gives_back(&ca, 2);
        let b = PairNode::new(cb.clone()).unwrap();
        b.run_step(Step::OpenOwnAggregate).unwrap();
        drop(b); // dies before its log step
        let b = PairNode::new(cb).unwrap();
        b.run_step(Step::OpenOwnAggregate).unwrap();
        assert!(b.own.lock().unwrap().was_dirty, "its own open marked it");
        b.run_step(Step::ReplayOwnLog).unwrap();
        assert_eq!(read_block(&journal(&b, Whose::Own), BLOCK_AT), 2);
    }

    /// After a halt, the log a node leaves open counts as mirrored only as it was at the halt,
    /// while the mailbox flag is clear, and within the interconnect session it was mirrored
    /// in: a partner that reconnected since may have lost what it had not yet flushed.
    #[test]
    fn a_halted_log_counts_as_mirrored_only_within_its_session() {
        let open = |mirrored, session| Some(OwnLogLeft::Open { mirrored, session });
        assert!(OwnLogLeft::mirrored(open(true, Some(7)), true, Some(7)));
        assert!(
            !OwnLogLeft::mirrored(open(true, Some(7)), true, Some(8)),
            "new session"
        );
        assert!(
            !OwnLogLeft::mirrored(open(true, Some(7)), true, None),
            "link down"
        );
        assert!(
            !OwnLogLeft::mirrored(open(true, None), true, None),
            "never linked"
        );
        assert!(
            !OwnLogLeft::mirrored(open(false, Some(7)), true, Some(7)),
            "behind at the halt"
        );
        assert!(
            !OwnLogLeft::mirrored(open(true, Some(7)), false, Some(7)),
            "flag set"
        );
        // A final CP settles it whatever the link does; a log not opened here is what the
        // mailbox says.
        assert!(OwnLogLeft::mirrored(Some(OwnLogLeft::Settled), false, None));
        assert!(OwnLogLeft::mirrored(None, true, None));
        assert!(!OwnLogLeft::mirrored(None, false, Some(3)));
    }

    /// b's mirror at a holds an older write of a block that b then overwrote while a's
    /// mirror was behind, before b's successful final CP. a's graceful takeover must not
    /// replay that mirror over the members.
    #[test]
    fn a_takeover_after_a_final_cp_does_not_replay_the_mirror() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let [ca, cb] = pair_configs(dir.path());
        let b = serving(&cb);
        journal(&b, Whose::Own)
            .write(BLOCK_AT, &block(1), false)
            .unwrap();
        // The mirror at a: b's log as it was then.
        std::fs::copy(
            dir.path().join("b-aggr-b.log"),
            dir.path().join("a-aggr-b.mirror"),
        )
        .unwrap();
        journal(&b, Whose::Own)
            .write(BLOCK_AT, &block(2), false)
            .unwrap();
        b.run_step(Step::FinalCp).unwrap();
        drop(b);
        let a = PairNode::new(ca).unwrap();
        a.run_step(Step::OpenPartnerAggregate).unwrap();
        assert!(!a.partner.lock().unwrap().was_dirty);
        a.run_step(Step::ReplayPartnerLog).unwrap();
        assert_eq!(read_block(&journal(&a, Whose::Partner), BLOCK_AT), 2);
    }

    /// A fence by mailbox alone trusts the self-fence bound only for a partner whose heartbeat
    /// stopped: one that goes on writing it without confirming the please-die is alive and
    /// would write the same stripes.
    #[test]
    fn a_mailbox_fence_fails_while_the_partner_still_beats() {
        use crate::core::takeover::State;
        use crate::daemon::ha::{self, MailboxSink};
        use crate::daemon::mailbox::{MailboxConfig, MailboxDriver, MemStore};
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let [ca, _] = pair_configs(dir.path());
        let a = PairNode::new(ca).unwrap();
        let store = Arc::new(MemStore::new(3));
        let mcfg = |n: &str, p: &str| MailboxConfig {
            node_name: n.into(),
            partner_name: p.into(),
            interval: Duration::from_millis(20),
            self_fence_bound_ms: 100,
        };
        let (ha_a, _inbox_a) = ha::channel(ha::INPUT_CAPACITY);
        let (ha_b, _inbox_b) = ha::channel(ha::INPUT_CAPACITY);
        let da = MailboxDriver::spawn(store.clone(), mcfg("a", "b"), ha_a).unwrap();
        let db = MailboxDriver::spawn(store, mcfg("b", "a"), ha_b).unwrap();
        // b beats on, never obeying the please-die.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (mut hb, stop2) = (db.handle.clone(), stop.clone());
        let beater = std::thread::spawn(move || {
            let mut c = 1;
            while !stop2.load(Ordering::Acquire) {
                hb.beat(c, State::Normal, false);
                c += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        da.handle.clone().beat(1, State::Normal, false);
        let t0 = Instant::now();
        while da.handle.read_view().and_then(|v| v.partner_slot).is_none() {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "b's slot never written"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let msgwait = Duration::from_millis(400);
        match PairExecutor::fence(&a, &da.handle, 1, msgwait) {
            Err(StepError::Failed(m)) => assert!(m.contains("still writes"), "{m}"),
            r => panic!("a live partner taken for fenced: {r:?}"),
        }
        // b dies: its counter stops, and the bound holds.
        stop.store(true, Ordering::Release);
        beater.join().unwrap();
        assert_eq!(PairExecutor::fence(&a, &da.handle, 2, msgwait), Ok(()));
    }

    /// A node that lost its NVRAM fetches its log from the partner's mirror. The copy counts
    /// as complete only when every byte arrived (an end-of-copy that belonged to an earlier,
    /// timed-out request must not complete a later one with holes), and it must be a log of
    /// this aggregate (an empty mirror would have the journal start an empty log).
    #[test]
    fn a_restored_log_must_be_whole_and_this_aggregates() {
        use crate::core::interconnect::LogSegment;
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let [ca, cb] = pair_configs(dir.path());
        let a = PairNode::new(ca).unwrap();
        let len = 4 << 20;
        *a.restore.lock().unwrap() = Some(Restore {
            bytes: vec![0; len],
            received: Vec::new(),
            done: false,
        });
        let copy = |offset: usize, n: usize| {
            Message::MirrorCopy(LogRecords {
                epoch: 0,
                first_seq: 0,
                last_seq: 0,
                segments: vec![LogSegment {
                    region_offset: offset as u64,
                    bytes: vec![7; n],
                }],
            })
        };
        let done = Message::MirrorCopyDone {
            region_bytes: len as u64,
        };
        let is_done = || a.restore.lock().unwrap().as_ref().unwrap().done;
        a.on_message(copy(0, 1 << 20));
        a.on_message(copy(2 << 20, 2 << 20));
        a.on_message(done.clone());
        assert!(!is_done(), "a MiB is missing");
        a.on_message(copy(1 << 20, 1 << 20));
        a.on_message(done);
        assert!(is_done());
        // What arrived is checked before it becomes our log.
        let agg = {
            let own = setup::open(&a.own_cfg, &a.config.io, &mut |_, _| {}).unwrap();
            Arc::new(own)
        };
        let e = restored_log_usable(&vec![0; len], &agg).unwrap_err();
        assert!(e.contains("empty"), "{e}");
        let e = restored_log_usable(&vec![7; len], &agg).unwrap_err();
        assert!(e.contains("not a usable log"), "{e}");
        // A real log of this aggregate passes; one of the other aggregate does not.
        let b = serving(&cb);
        journal(&b, Whose::Own).write(0, &block(3), false).unwrap();
        let b_log = std::fs::read(dir.path().join("b-aggr-b.log")).unwrap();
        assert!(
            restored_log_usable(&b_log, &agg).is_err(),
            "aggr-b's log is not aggr-a's"
        );
        let b_agg = b.own.lock().unwrap().aggregate.clone().unwrap();
        restored_log_usable(&b_log, &b_agg).unwrap();
    }

    /// A halt must not wait for the side lock (a final CP can hold it for seconds) before it
    /// stops acknowledging and writing: with a mailbox-only fence the partner starts on these
    /// disks a bounded time after telling us to die.
    #[test]
    fn a_halt_stops_io_while_a_side_lock_is_held() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let [ca, _] = pair_configs(dir.path());
        let a = serving(&ca);
        let j = journal(&a, Whose::Own);
        let agg = a.own.lock().unwrap().aggregate.clone().unwrap();
        j.write(0, &block(1), false).unwrap();
        let held = a.own.lock().unwrap(); // a slow final CP, say
        let a2 = a.clone();
        let halting = std::thread::spawn(move || a2.halt());
        let deadline = Instant::now() + Duration::from_secs(5);
        while !(j.is_halted() && agg.status().offline.is_some()) {
            assert!(
                Instant::now() < deadline,
                "the halt waited for the side lock before stopping I/O"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(Backend::write(&*j, 4096, &block(2), false).is_err());
        assert!(agg.write(8192, &block(3), false).is_err());
        assert!(!halting.is_finished(), "the rest waits for the lock");
        drop(held);
        halting.join().unwrap();
        assert!(a.own.lock().unwrap().journal.is_none());
        // No data-plane step runs again before a resume registers the node.
        let e = a.run_step(Step::OpenOwnAggregate).unwrap_err();
        assert!(e.contains("halted"), "{e}");
    }

    /// `ca` and `cb` (from [`pair_configs`]) talk over an interconnect on a free loopback
    /// port, with heartbeats every 50 ms and a 2 s silence timeout.
    fn linked(ca: &mut Config, cb: &mut Config) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
        for c in [ca, cb] {
            let p = c.pair.as_mut().unwrap();
            p.interconnect_listen = Some(addr);
            p.partner_interconnect = vec![addr];
            p.heartbeat_ms = 50;
            p.interconnect_timeout_ms = 2000;
        }
    }

    fn wait(what: &str, f: impl Fn() -> bool) {
        let end = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// An HA layer that keeps what arrives.
    #[derive(Default)]
    struct Heard {
        msgs: Mutex<Vec<Vec<u8>>>,
    }

    impl HaInbound for Heard {
        fn on_ha_message(&self, bytes: &[u8]) {
            self.msgs.lock().unwrap().push(bytes.to_vec());
        }
        fn fenced_out(&self) {}
        fn on_link(&self, _up: bool) {}
        fn summary(&self) -> StateSummary {
            StateSummary {
                ha_state: 0,
                flags: StateSummary::HEALTHY,
                aggregates_served: 0,
                log_last_seq: 0,
            }
        }
    }

    /// b's HA message reaches a while a's HA loop is stuck (its input queue full): a's link
    /// goes on applying and acknowledging b's mirror updates, and the message reaches a's
    /// loop once it runs. (The link's reader used to wait for room in the loop's queue: b's
    /// writes waited for acknowledgements that did not come, and went unmirrored.)
    #[test]
    fn a_stuck_ha_loop_does_not_stall_the_partners_mirror() {
        use crate::daemon::ha_testing::{fast_config, TestNode};
        use crate::daemon::mailbox::MemStore;
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let [mut ca, mut cb] = pair_configs(dir.path());
        linked(&mut ca, &mut cb);
        // a's HA loop is stuck: its queue is full and nothing takes from it.
        let (ha_a, inbox_a) = ha::channel(2);
        assert!(ha_a.try_mailbox_read(None) && ha_a.try_mailbox_read(None));
        assert!(!ha_a.try_mailbox_read(None), "a's HA queue is full");
        let a = PairNode::new(ca).unwrap();
        let la = a.start_link(Arc::new(Inbound::new(ha_a.clone()))).unwrap();
        let b = PairNode::new(cb).unwrap();
        let lb = b.start_link(Arc::new(Heard::default())).unwrap();
        wait("link up", || la.is_up() && lb.is_up());
        b.run_step(Step::OpenOwnAggregate).unwrap();
        b.run_step(Step::ReplayOwnLog).unwrap();
        let jb = journal(&b, Whose::Own);
        wait("b's log mirrored", || {
            jb.mirror_state() == crate::daemon::journal::MirrorState::Mirrored
        });
        // b says something to a's HA loop, then writes (the updates follow the message).
        let hb = takeover::Message::Heartbeat {
            state: takeover::State::Normal,
            protocol_version: fast_config("a", "b").takeover.protocol_version,
            mirror_in_sync: true,
        };
        assert!(lb.send(&Message::Ha(serde_json::to_vec(&hb).unwrap())));
        for i in 0..5u64 {
            jb.write(BLOCK_AT + i * 4096, &block(i as u8 + 1), false)
                .unwrap();
            assert_eq!(
                jb.mirror_state(),
                crate::daemon::journal::MirrorState::Mirrored,
                "write {i} of b was not mirrored while a's HA loop was stuck"
            );
        }
        // a's loop runs now: the message reaches it.
        let node = TestNode::start(
            fast_config("a", "b"),
            Arc::new(MemStore::new(4)),
            inbox_a,
            ha_a,
            None,
        );
        wait("the heartbeat reached a's HA loop", || {
            node.handle
                .snapshot()
                .is_ok_and(|s| s.status.partner_state == Some(takeover::State::Normal))
        });
        assert_eq!((la.status().sessions, lb.status().sessions), (1, 1));
    }

    /// a took b over: it serves b's aggregate, whose log is the region that was its mirror of
    /// b's log. b, fenced but not halted yet, still writes. Its mirror updates are refused,
    /// once, with the reason; the session stays (no reconnect, HA messages flow); b counts
    /// its writes unmirrored and sends no more updates. After the giveback a accepts them
    /// again and b's log is copied whole in the same session. (A refusal used to end the
    /// session: the link flapped, reconnect, resync, refused, drop, until b halted.)
    #[test]
    fn a_refused_mirror_keeps_the_link_and_the_partner_counts_itself_unmirrored() {
        use crate::daemon::journal::MirrorState;
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let [mut ca, mut cb] = pair_configs(dir.path());
        linked(&mut ca, &mut cb);
        let a = PairNode::new(ca).unwrap();
        let heard_a = Arc::new(Heard::default());
        let la = a.start_link(heard_a.clone()).unwrap();
        let b = PairNode::new(cb).unwrap();
        let lb = b.start_link(Arc::new(Heard::default())).unwrap();
        wait("link up", || la.is_up() && lb.is_up());
        b.run_step(Step::OpenOwnAggregate).unwrap();
        b.run_step(Step::ReplayOwnLog).unwrap();
        let jb = journal(&b, Whose::Own);
        wait("b's log mirrored", || {
            jb.mirror_state() == MirrorState::Mirrored
        });
        // a takes b over (the fence that would stop b's writes is not part of this test).
        a.run_step(Step::OpenPartnerAggregate).unwrap();
        a.run_step(Step::ReplayPartnerLog).unwrap();
        jb.write(BLOCK_AT, &block(1), false).unwrap();
        wait("b told its updates are refused", || {
            lb.status().partner_refuses_mirror.is_some()
        });
        // Two seconds of b's writes (each a chance to resync and be refused again).
        let end = Instant::now() + Duration::from_secs(2);
        let mut i = 0u64;
        while Instant::now() < end {
            jb.write(BLOCK_AT + (i % 8) * 4096, &block(i as u8), false)
                .unwrap();
            i += 1;
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(
            (la.status().sessions, lb.status().sessions),
            (1, 1),
            "the link reconnected"
        );
        assert!(la.is_up() && lb.is_up());
        match jb.mirror_state() {
            MirrorState::NotMirrored { why, .. } => {
                assert!(why.contains("refuses"), "b says why: {why}")
            }
            st => panic!("b counts itself mirrored: {st:?}"),
        }
        assert!(!b.own_mirrored(), "b reports its log mirrored");
        let refused = la.status().frames_refused;
        assert!(
            refused <= 2,
            "b kept sending refused updates: {refused} refused"
        );
        // HA messages flow meanwhile.
        assert!(lb.send(&Message::Ha(b"still here".to_vec())));
        wait("b's HA message at a", || {
            heard_a
                .msgs
                .lock()
                .unwrap()
                .iter()
                .any(|m| m == b"still here")
        });
        // Giveback: a keeps a mirror of b's log again, and b's log is copied to it.
        a.run_step(Step::CpPartnerAggregate).unwrap();
        a.run_step(Step::ClosePartnerAggregate).unwrap();
        wait("b's log mirrored again", || {
            jb.mirror_state() == MirrorState::Mirrored
        });
        assert!(b.own_mirrored());
        assert_eq!((la.status().sessions, lb.status().sessions), (1, 1));
        assert_eq!(lb.status().partner_refuses_mirror, None);
    }
}

//! A node of a pair: its own aggregate served through its NVRAM journal (mirrored to the
//! partner over the interconnect), the mirror of the partner's log, and every step of takeover,
//! giveback and boot that the HA state machine asks for, done for real.

use crate::config::{AggregateConfig, Config, ExportConfig, PairConfig};
use crate::core::interconnect::{Hello, LogRecords, Message, StateSummary};
use crate::core::netlink::IpPrefix;
use crate::core::takeover::Step;
use crate::daemon::aggregate::Aggregate;
use crate::daemon::backend::Backend;
use crate::daemon::identity::{IdentityConfig, IdentityManager, ServiceAddr};
use crate::daemon::journal::{Journal, JournalConfig, MirrorLink, MirrorRegion};
use crate::daemon::link::{Link, LinkConfig, LinkHandler};
use crate::daemon::nbd_server::{Export, NbdServer, ServerConfig};
use crate::daemon::node::Served;
use crate::daemon::setup;
use crate::io::nvram::NvramRegion;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One side of the node: its own aggregate, or the partner's while taken over.
#[derive(Default)]
pub struct Side {
    pub aggregate: Option<Arc<Aggregate>>,
    pub journal: Option<Arc<Journal>>,
    pub servers: Vec<Served>,
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
}

impl PairNode {
    /// The data plane of `config` (which must have a `[pair]` section). Nothing is opened or
    /// served yet: the HA boot steps do that.
    pub fn new(config: Config) -> Result<Arc<PairNode>, String> {
        let pair = config.pair.clone().ok_or("configuration has no [pair] section")?;
        let own_cfg = config.aggregate.iter().find(|a| a.home == config.node).cloned().ok_or("no own aggregate")?;
        let partner_cfg = config.aggregate.iter().find(|a| a.home == pair.partner).cloned().ok_or("no partner aggregate")?;
        let mirror_path = partner_cfg.nvram.clone().expect("validated");
        let mirror = NvramRegion::open(&mirror_path, partner_cfg.nvram_mib << 20).map_err(|e| e.to_string())?;
        tracing::info!(mirror = %mirror_path.display(), "partner log mirror: {}", mirror.persistence());
        let needs_identity = config.export.iter().any(|e| !e.service_addrs.is_empty());
        let identity = if needs_identity {
            let lo_only = config.export.iter().all(|e| e.service_interface.as_deref().is_none_or(|i| i == "lo"));
            let cfg = if lo_only {
                // Loopback has no neighbours to probe or tell.
                IdentityConfig { probe_count: 0, announce_count: 0, ipv6_dad: false, ..IdentityConfig::default() }
            } else {
                IdentityConfig::default()
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
        }))
    }

    /// This node's id in the pair (0 sorts first and dials the interconnect).
    pub fn node_id(&self) -> u8 {
        u8::from(self.config.node > self.pair.partner)
    }

    /// Start the interconnect.
    pub fn start_link(self: &Arc<Self>, ha: Arc<dyn HaInbound>) -> Result<Arc<Link>, String> {
        *self.ha.lock().unwrap() = Some(ha);
        let key = std::fs::read(&self.pair.key_file).map_err(|e| format!("{}: {e}", self.pair.key_file.display()))?;
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
        let link = Arc::new(Link::start(cfg, self.clone()).map_err(|e| format!("interconnect: {e}"))?);
        *self.link.lock().unwrap() = Some(link.clone());
        Ok(link)
    }

    fn exports_of(&self, aggregate: &str) -> Vec<ExportConfig> {
        self.config.export.iter().filter(|e| e.aggregate == aggregate).cloned().collect()
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
                e.service_addrs.iter().map(move |a| ServiceAddr::new(&ifname, a.parse::<IpPrefix>().expect("validated")))
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
        self.times.lock().unwrap().steps.push((format!("{step:?}"), ms));
        r
    }

    fn step_inner(&self, step: Step) -> Result<(), String> {
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
        let agg = setup::open(cfg, &self.config.io, &mut p).map_err(|e| e.to_string())?;
        side.aggregate = Some(Arc::new(agg));
        Ok(())
    }

    /// Our journal: replay our log (normal boot) or start it empty (after a giveback, when the
    /// partner replayed it and put it on the members).
    fn open_own_journal(&self, discard: bool) -> Result<(), String> {
        let mut side = self.own.lock().unwrap();
        if side.journal.is_some() {
            return Ok(());
        }
        let agg = side.aggregate.clone().ok_or("own aggregate not open")?;
        let path = self.own_cfg.nvram.clone().expect("validated");
        let bytes = self.own_cfg.nvram_mib << 20;
        if discard {
            // Zero the header: the replay below then finds an unformatted log.
            let mut r = NvramRegion::open(&path, bytes).map_err(|e| e.to_string())?;
            r.bytes_mut()[..4096].fill(0);
            r.persist(&[0..4096]).map_err(|e| e.to_string())?;
        }
        let region = NvramRegion::open(&path, bytes).map_err(|e| e.to_string())?;
        let cfg = JournalConfig { cp_interval: Duration::from_millis(self.own_cfg.cp_interval_ms), ..JournalConfig::default() };
        let (j, summary) = Journal::open(agg, region, cfg).map_err(|e| e.to_string())?;
        tracing::info!(discard, "own log: {summary:?}");
        if let Some(link) = self.link.lock().unwrap().clone() {
            j.set_mirror(Some(link as Arc<dyn MirrorLink>));
        }
        side.journal = Some(j);
        Ok(())
    }

    /// Replay the partner's log from our mirror onto its aggregate, and keep journaling its
    /// writes in that region while we serve it (acknowledged locally: the partner is fenced).
    fn replay_partner(&self) -> Result<(), String> {
        let mut side = self.partner.lock().unwrap();
        if side.journal.is_some() {
            return Ok(());
        }
        let agg = side.aggregate.clone().ok_or("partner aggregate not open")?;
        let mirror = self.mirror.lock().unwrap().take().ok_or("no mirror region")?;
        let region = mirror.into_region();
        let cfg = JournalConfig { cp_interval: Duration::from_millis(self.partner_cfg.cp_interval_ms), ..JournalConfig::default() };
        match Journal::open(agg, region, cfg) {
            Ok((j, summary)) => {
                tracing::info!("partner log replayed from the mirror: {summary:?}");
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
        if !side.servers.is_empty() {
            return Ok(());
        }
        let cfg = self.agg_cfg(whose);
        let backend: Arc<dyn Backend> = match (&side.journal, &side.aggregate) {
            (Some(j), _) => j.clone(),
            (None, Some(a)) => a.clone(),
            _ => return Err(format!("aggregate {} not open", cfg.name)),
        };
        for e in self.exports_of(&cfg.name) {
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
                description: format!("hapair aggregate {} (home {}, served by {})", cfg.name, cfg.home, self.config.node),
                backend: backend.clone(),
                read_only: false,
            };
            let server = NbdServer::start(sc, vec![export]).map_err(|err| format!("export {}: {err}", e.name))?;
            let s = Served { export: e.name.clone(), aggregate: cfg.name.clone(), tcp: server.local_addr(), unix: e.unix.clone(), server };
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
        if let Some(j) = side.journal.take() {
            j.close().map_err(|e| e.to_string())?;
        }
        if let Some(a) = side.aggregate.take() {
            a.close().map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// After giveback: our copy of the partner's log becomes a mirror again.
    fn close_partner(&self) -> Result<(), String> {
        self.close_aggregate(Whose::Partner)?;
        let mut m = self.mirror.lock().unwrap();
        if m.is_none() {
            let path = self.partner_cfg.nvram.clone().expect("validated");
            let r = NvramRegion::open(&path, self.partner_cfg.nvram_mib << 20).map_err(|e| e.to_string())?;
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
        let reports = id.take(&addrs).map_err(|e| e.to_string())?;
        for r in reports {
            tracing::info!(addr = %r.addr.prefix, already = r.already_held, probe_ms = r.probe.as_millis() as u64,
                add_ms = r.add.as_millis() as u64, announce_ms = r.announce.as_millis() as u64, "service address taken");
        }
        Ok(())
    }

    fn release_ips(&self, whose: Whose) -> Result<(), String> {
        let addrs = self.service_addrs(whose);
        if addrs.is_empty() {
            return Ok(());
        }
        let mut id = self.identity.lock().unwrap();
        let id = id.as_mut().ok_or("no identity manager")?;
        id.release(&addrs).map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Stop everything now: close clients unanswered, stop writing, drop addresses.
    pub fn halt(&self) {
        for whose in [Whose::Own, Whose::Partner] {
            let mut side = self.side(whose).lock().unwrap();
            for s in side.servers.drain(..) {
                s.server.shutdown();
            }
            side.journal = None;
            side.aggregate = None;
            drop(side);
            let _ = self.release_ips(whose);
        }
    }

    /// Is every write we acknowledged in the partner's mirror?
    pub fn own_mirrored(&self) -> bool {
        let side = self.own.lock().unwrap();
        side.journal.as_ref().is_none_or(|j| matches!(j.mirror_state(), crate::daemon::journal::MirrorState::Mirrored))
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
    }
    fn on_down(&self, _why: &str) {
        if let Some(h) = self.ha.lock().unwrap().clone() {
            h.on_link(false);
        }
    }
    fn on_log_records(&self, records: &LogRecords) -> Result<u64, String> {
        let m = self.mirror.lock().unwrap();
        let m = m.as_ref().ok_or("not mirroring: the partner's aggregate is served here")?;
        let seq = m.apply(records).map_err(|e| e.to_string())?;
        self.mirror_applied.fetch_add(1, Ordering::Relaxed);
        Ok(seq)
    }
    fn on_message(&self, msg: Message) {
        if let Message::Ha(bytes) = msg {
            if let Some(h) = self.ha.lock().unwrap().clone() {
                h.on_ha_message(&bytes);
            }
        }
    }
    fn summary(&self) -> StateSummary {
        match self.ha.lock().unwrap().clone() {
            Some(h) => h.summary(),
            None => StateSummary { ha_state: 0, flags: 0, aggregates_served: 0, log_last_seq: 0 },
        }
    }
}

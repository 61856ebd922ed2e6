//! Identity takeover: the service IP addresses a node serves, taken (checked for duplicates,
//! added, announced) and released with netlink.
//!
//! `take` for an IPv4 address: ARP probes (RFC 5227 2.1.1: sender IP 0.0.0.0) while listening
//! for any host that uses or probes for it; then RTM_NEWADDR; then gratuitous ARP. For IPv6:
//! RTM_NEWADDR *with* the kernel's DAD, waiting until the tentative flag clears (or DADFAILED),
//! then unsolicited neighbour advertisements (RFC 4861 7.2.6). Announcements go out in rounds
//! over all addresses of one call: `announce_count` rounds `announce_interval_ms` apart.
//!
//! Timing differs from RFC 5227 on purpose: its defaults (1 s random wait, 3 probes 1-2 s apart,
//! 2 s announce wait) cost ~7 s per takeover; a storage pair's clients are waiting. The partner
//! has already been fenced (or released the address itself) by the time we probe, so the probe
//! is a safety net against misconfiguration, and 3 probes 100 ms apart with 200 ms of listening
//! after the last one catch any live holder on a LAN. All of it is configurable.
//!
//! Calls block (probes, DAD, announcement intervals): run them from a worker of the control
//! plane, not from the HA state machine's loop.
//!
//! # A holder that keeps answering
//!
//! [`IdentityManager::take`] is strict: any host that answers for an address (ARP probe, DAD)
//! makes it fail, and nothing of the call stays configured. That is right wherever nobody has
//! been fenced: a node taking its own addresses at boot or after a giveback (`TakeOwnIps`)
//! must not steal an address a misconfigured neighbour holds.
//!
//! [`IdentityManager::take_fenced`] is for the partner's addresses after the partner has been
//! fenced (`TakePartnerIdentity` runs only after the Fence step succeeded). A partner whose
//! release failed (a tolerated shutdown step), whose daemon was killed on a live host, or whose
//! host is wedged in a way that still answers ARP keeps the address configured, and would
//! otherwise block the takeover for ever: the strict take fails, the step is retried, the
//! partner's exports are never served although it cannot write its disks any more. So a
//! fenced take probes as the strict one does, keeps probing while the holder answers (it may
//! be releasing right now: a forced shutdown races with the countdown), and once
//! `conflict_override_ms` have passed since the call began it adds the address anyway (IPv6:
//! the DAD-failed address is removed and re-added with IFA_F_NODAD), announces it like any
//! other (gratuitous ARP / unsolicited NA with the override flag, `announce_count` rounds) so
//! the neighbours' caches move to us, logs an error naming the holder's MAC and says so in
//! [`TakeReport::took_over_conflict`]. The cost, said loudly in that log: if the holder is
//! alive it still answers ARP/NS for the address (Linux does not defend an address), so a
//! client that re-resolves may flip back to it until its address is removed there (a
//! restarting `hapaird` releases its addresses first; an operator must remove it from a host
//! whose daemon is gone). A holder that is not the partner (a misconfiguration that also
//! answers) cannot be told apart by MAC here; the error log names it for the operator.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use crate::core::arp::{self, fmt_mac, ARPOP_REPLY, ARPOP_REQUEST, ETH_P_ARP};
use crate::core::ndp::{self, ETH_P_IPV6};
use crate::core::netlink::{AddrInfo, IpPrefix};
use crate::io::netlink::{check_usable, AddOptions, NetError, RtNetlink};
use crate::io::netns::NetNs;
use crate::io::packet::PacketSocket;

/// How often to re-read the address while the kernel's IPv6 DAD runs.
const DAD_POLL: Duration = Duration::from_millis(20);

/// A service address: where it lives and what it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAddr {
    pub ifname: String,
    pub prefix: IpPrefix,
    /// IPv4 only: address label (e.g. `eth0:svc`).
    pub label: Option<String>,
}

impl ServiceAddr {
    pub fn new(ifname: &str, prefix: IpPrefix) -> ServiceAddr {
        ServiceAddr {
            ifname: ifname.to_string(),
            prefix,
            label: None,
        }
    }
}

impl fmt::Display for ServiceAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} on {}", self.prefix, self.ifname)
    }
}

/// Probe, DAD and announcement settings.
#[derive(Clone, Debug)]
pub struct IdentityConfig {
    /// IPv4: ARP probes before adding (0 skips probing).
    pub probe_count: u32,
    pub probe_interval_ms: u64,
    /// IPv4: how long to keep listening after the last probe.
    pub probe_wait_ms: u64,
    /// Rounds of gratuitous ARP / unsolicited NA after adding (0: none).
    pub announce_count: u32,
    pub announce_interval_ms: u64,
    /// IPv6: let the kernel run DAD (false adds with IFA_F_NODAD).
    pub ipv6_dad: bool,
    /// IPv6: give up on DAD after this long (the kernel's DAD takes up to
    /// rtr_solicit_delay + dad_transmits * retrans_time: ~1-2 s by default).
    pub dad_timeout_ms: u64,
    /// [`IdentityManager::take_fenced`] only: from the start of the call, how long a host that
    /// answers for an address may keep doing so before the address is taken anyway. Probing
    /// (IPv4) or DAD (IPv6) is repeated every `probe_interval_ms` meanwhile, so a holder that
    /// is still releasing is waited for. Short: the partner's clients wait meanwhile. IPv6: a
    /// DAD run under way at the deadline finishes first (up to ~1-2 s more, see above).
    pub conflict_override_ms: u64,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            probe_count: 3,
            probe_interval_ms: 100,
            probe_wait_ms: 200,
            announce_count: 3,
            announce_interval_ms: 200,
            ipv6_dad: true,
            dad_timeout_ms: 5000,
            conflict_override_ms: 2000,
        }
    }
}

/// What `take` did for one address, with the time of each step.
#[derive(Clone, Debug)]
pub struct TakeReport {
    pub addr: ServiceAddr,
    /// The address was already on the interface (usable); nothing was added, it was announced.
    pub already_held: bool,
    pub probe: Duration,
    pub add: Duration,
    /// IPv6: time from adding until the kernel's DAD finished.
    pub dad: Duration,
    /// The announcement rounds (shared by all addresses of the call).
    pub announce: Duration,
    /// Frames sent for this address (IPv4: request and reply per round; IPv6: one NA).
    pub announcements_sent: u32,
    /// [`IdentityManager::take_fenced`]: another host kept answering for the address and it
    /// was taken anyway. Always `None` from [`IdentityManager::take`].
    pub took_over_conflict: Option<OverriddenConflict>,
}

/// A conflict that a fenced take overrode: the address is ours now, but the host named here
/// still had it configured when we took it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OverriddenConflict {
    /// The MAC that answered for the address (IPv6: `None` if its NA was not captured).
    pub holder_mac: Option<[u8; 6]>,
    /// Probe rounds (IPv4) or DAD runs (IPv6) that saw the holder.
    pub attempts: u32,
    /// From the first sighting of the holder until the address was added anyway.
    pub waited: Duration,
}

/// What a take does when another host answers for an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OnConflict {
    /// Fail ([`NetError::AddressInUse`]).
    Refuse,
    /// Keep checking until the deadline, then take the address anyway.
    OverrideAt(Instant),
}

/// How a kernel DAD run ended.
enum Dad {
    Done,
    /// The address is DAD-failed; the defender's MAC if its NA was seen.
    Failed(Option<[u8; 6]>),
}

/// Record `a` as added by this call (once), for the rollback.
fn note_added(added: &mut Vec<ServiceAddr>, a: &ServiceAddr) {
    if !added.contains(a) {
        added.push(a.clone());
    }
}

/// What `release` did for one address.
#[derive(Clone, Debug)]
pub struct ReleaseReport {
    pub addr: ServiceAddr,
    /// It was there and has been removed (false: nothing to do).
    pub was_held: bool,
    pub remove: Duration,
}

/// Takes and releases service addresses, optionally inside a network namespace.
pub struct IdentityManager {
    nl: RtNetlink,
    ns: Option<NetNs>,
    cfg: IdentityConfig,
}

struct Announcer {
    sock: PacketSocket,
    frames: Vec<Vec<u8>>,
    report: usize,
}

impl IdentityManager {
    /// Work in the calling thread's network namespace.
    pub fn new(cfg: IdentityConfig) -> Result<IdentityManager, NetError> {
        Ok(IdentityManager {
            nl: RtNetlink::open()?,
            ns: None,
            cfg,
        })
    }

    /// Work inside `ns`: every socket is opened there.
    pub fn new_in(ns: NetNs, cfg: IdentityConfig) -> Result<IdentityManager, NetError> {
        Ok(IdentityManager {
            nl: RtNetlink::open_in(&ns)?,
            ns: Some(ns),
            cfg,
        })
    }

    pub fn config(&self) -> &IdentityConfig {
        &self.cfg
    }

    pub fn config_mut(&mut self) -> &mut IdentityConfig {
        &mut self.cfg
    }

    /// The netlink socket, for queries (links, address lists).
    pub fn netlink(&mut self) -> &mut RtNetlink {
        &mut self.nl
    }

    fn packet(&self, ifindex: u32, ethertype: u16) -> Result<PacketSocket, NetError> {
        let op = || format!("packet socket on ifindex {ifindex}");
        match &self.ns {
            None => PacketSocket::open(ifindex, ethertype).map_err(|e| NetError::sys(op(), e)),
            Some(ns) => ns
                .run(|| PacketSocket::open(ifindex, ethertype))
                .map_err(|e| NetError::sys(format!("setns {}", ns.path().display()), e))?
                .map_err(|e| NetError::sys(op(), e)),
        }
    }

    /// Take `addrs`: all or nothing. Strict: an address another host answers for (ARP probe,
    /// IPv6 DAD) fails the call with [`NetError::AddressInUse`]. On any error, every address
    /// this call added is removed again, a DAD-failed or still tentative one included (ones
    /// that were already held stay). Idempotent: addresses already held are not probed or
    /// re-added, only announced again.
    pub fn take(&mut self, addrs: &[ServiceAddr]) -> Result<Vec<TakeReport>, NetError> {
        self.take_with(addrs, OnConflict::Refuse)
    }

    /// Take the addresses of a partner that has been fenced: as [`take`](Self::take), except
    /// that a host still answering for an address `conflict_override_ms` after the call began
    /// no longer stops it: the address is added anyway, announced, logged as an error and
    /// reported in [`TakeReport::took_over_conflict`] (see the module documentation for why and
    /// what it costs). Only for use after a fence: a fenced partner cannot legitimately serve.
    pub fn take_fenced(&mut self, addrs: &[ServiceAddr]) -> Result<Vec<TakeReport>, NetError> {
        let at = Instant::now() + Duration::from_millis(self.cfg.conflict_override_ms);
        self.take_with(addrs, OnConflict::OverrideAt(at))
    }

    fn take_with(
        &mut self,
        addrs: &[ServiceAddr],
        on_conflict: OnConflict,
    ) -> Result<Vec<TakeReport>, NetError> {
        let mut reports: Vec<TakeReport> = Vec::with_capacity(addrs.len());
        let mut added: Vec<ServiceAddr> = Vec::new();
        let result = self.take_all(addrs, on_conflict, &mut reports, &mut added);
        if result.is_err() {
            self.roll_back(&added);
        }
        result.map(|()| reports)
    }

    /// Remove every address in `added`, then check that none is left (a DAD-failed address
    /// stays on the interface until removed; the kernel keeps it there for good).
    fn roll_back(&mut self, added: &[ServiceAddr]) {
        for a in added {
            let left = self.remove_any_prefix(a).and_then(|_| {
                let link = self.nl.link_state(&a.ifname)?;
                match link {
                    Some(l) => self.find(l.ifindex, a.prefix.addr),
                    None => Ok(None),
                }
            });
            match left {
                Ok(None) => tracing::info!(addr = %a, "rolled back"),
                Ok(Some(i)) => {
                    tracing::error!(addr = %a, flags = i.flags, "rollback left the address configured")
                }
                Err(e) => {
                    tracing::error!(addr = %a, error = %e, "rollback of a taken address failed")
                }
            }
        }
    }

    fn take_all(
        &mut self,
        addrs: &[ServiceAddr],
        on_conflict: OnConflict,
        reports: &mut Vec<TakeReport>,
        added: &mut Vec<ServiceAddr>,
    ) -> Result<(), NetError> {
        for a in addrs {
            let r = self.take_one(a, on_conflict, added)?;
            tracing::info!(addr = %a, already_held = r.already_held, probe_ms = r.probe.as_millis() as u64,
                dad_ms = r.dad.as_millis() as u64, overridden = r.took_over_conflict.is_some(),
                "service address taken");
            reports.push(r);
        }
        self.announce(reports)
    }

    /// Take one address; every address added goes into `added` at once, so that an error
    /// anywhere later (in this function too) rolls it back.
    fn take_one(
        &mut self,
        a: &ServiceAddr,
        on_conflict: OnConflict,
        added: &mut Vec<ServiceAddr>,
    ) -> Result<TakeReport, NetError> {
        let mut rep = TakeReport {
            addr: a.clone(),
            already_held: false,
            probe: Duration::ZERO,
            add: Duration::ZERO,
            dad: Duration::ZERO,
            announce: Duration::ZERO,
            announcements_sent: 0,
            took_over_conflict: None,
        };
        let link = self.nl.link(&a.ifname)?;
        check_usable(&link)?;
        let mac = link.mac().ok_or_else(|| NetError::NoMac {
            ifname: a.ifname.clone(),
        })?;
        let present = self.find(link.ifindex, a.prefix.addr)?;
        if let Some(p) = present {
            if !p.is_dad_failed() && !p.is_tentative() && p.prefix.prefix_len == a.prefix.prefix_len
            {
                rep.already_held = true;
                return Ok(rep);
            }
            // A leftover of a failed DAD, an address still in DAD from an interrupted take, or
            // the wrong prefix length: start over.
            self.remove_any_prefix(a)?;
        }
        match a.prefix.addr {
            IpAddr::V4(v4) => {
                let t = Instant::now();
                rep.took_over_conflict =
                    self.probe_v4_until(link.ifindex, a, mac, v4, on_conflict)?;
                rep.probe = t.elapsed();
                let t = Instant::now();
                let opts = AddOptions {
                    label: a.label.clone(),
                    nodad: false,
                };
                self.nl.add_address(&a.ifname, &a.prefix, &opts)?;
                note_added(added, a);
                rep.add = t.elapsed();
            }
            IpAddr::V6(v6) => {
                let mut opts = AddOptions {
                    label: a.label.clone(),
                    nodad: !self.cfg.ipv6_dad,
                };
                // Listen before adding so the defender's NA is not missed: it names the MAC.
                let sniff = if self.cfg.ipv6_dad {
                    Some(self.packet(link.ifindex, ETH_P_IPV6)?)
                } else {
                    None
                };
                let t = Instant::now();
                self.nl.add_address(&a.ifname, &a.prefix, &opts)?;
                note_added(added, a);
                rep.add = t.elapsed();
                if let Some(sniff) = sniff {
                    let t = Instant::now();
                    // (first sighting, attempts, last defender MAC seen)
                    let mut seen: Option<(Instant, u32, Option<[u8; 6]>)> = None;
                    loop {
                        let defender = match self.wait_dad(link.ifindex, a, mac, v6, &sniff)? {
                            Dad::Done => break,
                            Dad::Failed(m) => m,
                        };
                        let (first, attempts, holder) =
                            seen.get_or_insert((Instant::now(), 0, None));
                        *attempts += 1;
                        *holder = defender.or(*holder);
                        let (first, attempts, holder) = (*first, *attempts, *holder);
                        let deadline = match on_conflict {
                            // The caller's rollback removes the DAD-failed address.
                            OnConflict::Refuse => return Err(in_use(a, holder)),
                            OnConflict::OverrideAt(at) => at,
                        };
                        if attempts == 1 {
                            warn_conflict(a, holder, deadline);
                        }
                        // A DAD-failed address is never usable and blocks a new add: remove
                        // it, then run DAD again, or after the deadline add without DAD.
                        self.remove_any_prefix(a)?;
                        let now = Instant::now();
                        let force = now >= deadline;
                        if !force {
                            std::thread::sleep(self.retry_pause().min(deadline - now));
                        }
                        opts.nodad = force;
                        self.nl.add_address(&a.ifname, &a.prefix, &opts)?;
                        if force {
                            let c = OverriddenConflict {
                                holder_mac: holder,
                                attempts,
                                waited: first.elapsed(),
                            };
                            error_overridden(a, &c);
                            rep.took_over_conflict = Some(c);
                            match self.find(link.ifindex, IpAddr::V6(v6))? {
                                Some(i) if !i.is_tentative() && !i.is_dad_failed() => break,
                                other => {
                                    return Err(NetError::Protocol(format!(
                                        "{a}: added without DAD but the kernel shows {:?}",
                                        other.map(|i| i.flags)
                                    )))
                                }
                            }
                        }
                    }
                    rep.dad = t.elapsed();
                }
            }
        }
        Ok(rep)
    }

    /// Pause between checks of an address another host answers for.
    fn retry_pause(&self) -> Duration {
        Duration::from_millis(self.cfg.probe_interval_ms.max(10))
    }

    fn find(&mut self, ifindex: u32, addr: IpAddr) -> Result<Option<AddrInfo>, NetError> {
        Ok(self
            .nl
            .list_addresses_index(ifindex)?
            .into_iter()
            .find(|i| i.prefix.addr == addr))
    }

    /// Remove `a.prefix.addr` from its interface whatever its prefix length there (IPv4 may
    /// carry the same address with several prefix lengths: all go). True if any was there.
    fn remove_any_prefix(&mut self, a: &ServiceAddr) -> Result<bool, NetError> {
        let link = match self.nl.link_state(&a.ifname)? {
            Some(l) => l,
            None => return Ok(false),
        };
        let mut removed = false;
        // Bounded: each round removes one entry or ends.
        for _ in 0..8 {
            match self.find(link.ifindex, a.prefix.addr)? {
                Some(p) => {
                    if !self.nl.remove_address(&a.ifname, &p.prefix)? {
                        break;
                    }
                    removed = true;
                }
                None => break,
            }
        }
        Ok(removed)
    }

    /// Probe `addr` with [`probe_v4`](Self::probe_v4) until nobody answers (`Ok(None)`), or,
    /// on a conflict: refuse, or keep probing until the deadline and then return the conflict
    /// being overridden.
    fn probe_v4_until(
        &self,
        ifindex: u32,
        a: &ServiceAddr,
        mac: [u8; 6],
        addr: Ipv4Addr,
        on_conflict: OnConflict,
    ) -> Result<Option<OverriddenConflict>, NetError> {
        let mut seen: Option<(Instant, u32)> = None;
        loop {
            let Some(holder) = self.probe_v4(ifindex, mac, addr)? else {
                if let Some((first, attempts)) = seen {
                    tracing::warn!(addr = %a, attempts, waited_ms = first.elapsed().as_millis() as u64,
                        "the host answering for the address went quiet; taking it normally");
                }
                return Ok(None);
            };
            let deadline = match on_conflict {
                OnConflict::Refuse => return Err(in_use(a, Some(holder))),
                OnConflict::OverrideAt(at) => at,
            };
            let (first, attempts) = seen.get_or_insert((Instant::now(), 0));
            *attempts += 1;
            let (first, attempts) = (*first, *attempts);
            if attempts == 1 {
                warn_conflict(a, Some(holder), deadline);
            }
            let now = Instant::now();
            if now >= deadline {
                let c = OverriddenConflict {
                    holder_mac: Some(holder),
                    attempts,
                    waited: first.elapsed(),
                };
                error_overridden(a, &c);
                return Ok(Some(c));
            }
            std::thread::sleep(self.retry_pause().min(deadline - now));
        }
    }

    /// One round of ARP probes (`probe_count` of them; none if 0). The MAC of the first host
    /// seen using or probing for `addr`, if any.
    fn probe_v4(
        &self,
        ifindex: u32,
        mac: [u8; 6],
        addr: Ipv4Addr,
    ) -> Result<Option<[u8; 6]>, NetError> {
        if self.cfg.probe_count == 0 {
            return Ok(None);
        }
        let sock = self.packet(ifindex, ETH_P_ARP)?;
        let probe = arp::probe(mac, addr);
        let mut buf = [0u8; 2048];
        for i in 0..self.cfg.probe_count {
            sock.send(&probe)
                .map_err(|e| NetError::sys(format!("ARP probe for {addr}"), e))?;
            let listen = if i + 1 == self.cfg.probe_count {
                self.cfg.probe_wait_ms
            } else {
                self.cfg.probe_interval_ms
            };
            let deadline = Instant::now() + Duration::from_millis(listen);
            while let Some(n) = sock
                .recv_until(&mut buf, deadline)
                .map_err(|e| NetError::sys(format!("ARP probe for {addr}: recv"), e))?
            {
                if let Some(p) = arp::parse(&buf[..n]) {
                    if let Some(other) = arp::probe_conflict(&p, addr, mac) {
                        return Ok(Some(other));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Wait for the kernel's DAD of `addr` to end. A DAD failure is an outcome, not an error:
    /// the caller decides; the DAD-failed address is left for it to remove.
    fn wait_dad(
        &mut self,
        ifindex: u32,
        a: &ServiceAddr,
        mac: [u8; 6],
        addr: Ipv6Addr,
        sniff: &PacketSocket,
    ) -> Result<Dad, NetError> {
        let start = Instant::now();
        let timeout = Duration::from_millis(self.cfg.dad_timeout_ms);
        let mut defender: Option<[u8; 6]> = None;
        let mut buf = [0u8; 2048];
        loop {
            match self.find(ifindex, IpAddr::V6(addr))? {
                Some(i) if i.is_dad_failed() => {
                    // The defender's NA normally arrives before the kernel marks the failure;
                    // give it a moment in case the frame is still queued.
                    let deadline = Instant::now() + DAD_POLL;
                    while defender.is_none() {
                        match sniff.recv_until(&mut buf, deadline) {
                            Ok(Some(n)) => defender = na_defender(&buf[..n], addr, mac),
                            _ => break,
                        }
                    }
                    return Ok(Dad::Failed(defender));
                }
                Some(i) if !i.is_tentative() => return Ok(Dad::Done),
                Some(_) => {}
                None => {
                    return Err(NetError::Protocol(format!(
                        "{a}: the address vanished during duplicate address detection"
                    )))
                }
            }
            if start.elapsed() >= timeout {
                return Err(NetError::DadTimeout {
                    addr: IpAddr::V6(addr),
                    ifname: a.ifname.clone(),
                    waited_ms: start.elapsed().as_millis() as u64,
                });
            }
            // Wait one poll interval, reading frames meanwhile to learn the defender's MAC.
            let deadline = Instant::now() + DAD_POLL;
            while let Ok(Some(n)) = sniff.recv_until(&mut buf, deadline) {
                if defender.is_none() {
                    defender = na_defender(&buf[..n], addr, mac);
                }
            }
        }
    }

    fn announce(&mut self, reports: &mut [TakeReport]) -> Result<(), NetError> {
        if self.cfg.announce_count == 0 || reports.is_empty() {
            return Ok(());
        }
        let mut ann = Vec::with_capacity(reports.len());
        for (i, r) in reports.iter().enumerate() {
            let link = self.nl.link(&r.addr.ifname)?;
            let mac = link.mac().ok_or_else(|| NetError::NoMac {
                ifname: link.name.clone(),
            })?;
            let (ethertype, frames) = match r.addr.prefix.addr {
                IpAddr::V4(v4) => (
                    ETH_P_ARP,
                    vec![
                        arp::announcement(mac, v4, ARPOP_REQUEST).to_vec(),
                        arp::announcement(mac, v4, ARPOP_REPLY).to_vec(),
                    ],
                ),
                IpAddr::V6(v6) => (ETH_P_IPV6, vec![ndp::unsolicited_na(mac, v6, v6).to_vec()]),
            };
            ann.push(Announcer {
                sock: self.packet(link.ifindex, ethertype)?,
                frames,
                report: i,
            });
        }
        let start = Instant::now();
        let interval = Duration::from_millis(self.cfg.announce_interval_ms);
        for round in 0..self.cfg.announce_count {
            if round > 0 {
                std::thread::sleep(interval);
            }
            for a in &ann {
                for f in &a.frames {
                    a.sock.send(f).map_err(|e| {
                        NetError::sys(format!("announce {}", reports[a.report].addr), e)
                    })?;
                    reports[a.report].announcements_sent += 1;
                }
            }
        }
        let took = start.elapsed();
        for r in reports.iter_mut() {
            r.announce = took;
        }
        Ok(())
    }

    /// Release `addrs`: remove each that is present (whatever its prefix length). Idempotent:
    /// absent addresses and missing interfaces are not errors. Tries every address; returns the
    /// first error after trying them all.
    pub fn release(&mut self, addrs: &[ServiceAddr]) -> Result<Vec<ReleaseReport>, NetError> {
        let mut out = Vec::with_capacity(addrs.len());
        let mut first_err = None;
        for a in addrs {
            let t = Instant::now();
            match self.remove_any_prefix(a) {
                Ok(was_held) => {
                    tracing::info!(addr = %a, was_held, "service address released");
                    out.push(ReleaseReport {
                        addr: a.clone(),
                        was_held,
                        remove: t.elapsed(),
                    })
                }
                Err(e) => {
                    tracing::warn!(addr = %a, error = %e, "release failed");
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }
}

/// The MAC of another host's NA for `target` (its answer to our DAD probe), if `frame` is one.
fn na_defender(frame: &[u8], target: Ipv6Addr, my_mac: [u8; 6]) -> Option<[u8; 6]> {
    let na = ndp::parse_na(frame)?;
    if na.target != target || na.eth_src == my_mac {
        return None;
    }
    Some(na.target_mac.unwrap_or(na.eth_src))
}

fn in_use(a: &ServiceAddr, holder: Option<[u8; 6]>) -> NetError {
    NetError::AddressInUse {
        addr: a.prefix.addr,
        ifname: a.ifname.clone(),
        mac: holder.map(|m| fmt_mac(&m)),
    }
}

fn warn_conflict(a: &ServiceAddr, holder: Option<[u8; 6]>, deadline: Instant) {
    tracing::warn!(addr = %a, holder = %holder.map(|m| fmt_mac(&m)).unwrap_or_else(|| "unknown".into()),
        override_in_ms = deadline.saturating_duration_since(Instant::now()).as_millis() as u64,
        "another host answers for the address of a fenced partner; checking again until it is taken anyway");
}

fn error_overridden(a: &ServiceAddr, c: &OverriddenConflict) {
    tracing::error!(addr = %a, holder = %c.holder_mac.map(|m| fmt_mac(&m)).unwrap_or_else(|| "unknown".into()),
        attempts = c.attempts, waited_ms = c.waited.as_millis() as u64,
        "TAKING A SERVICE ADDRESS ANOTHER HOST STILL ANSWERS FOR: the partner is fenced, so it must \
         not serve; until the address is removed there, clients that re-resolve it may reach that host");
}

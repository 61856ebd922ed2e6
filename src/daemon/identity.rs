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

    /// Take `addrs`: all or nothing. On an error, the addresses this call added are removed
    /// again (ones that were already held stay). Idempotent: addresses already held are not
    /// probed or re-added, only announced again.
    pub fn take(&mut self, addrs: &[ServiceAddr]) -> Result<Vec<TakeReport>, NetError> {
        let mut reports: Vec<TakeReport> = Vec::with_capacity(addrs.len());
        let result = self.take_all(addrs, &mut reports);
        if result.is_err() {
            for r in reports.iter().filter(|r| !r.already_held) {
                if let Err(e) = self.remove_any_prefix(&r.addr) {
                    tracing::warn!(addr = %r.addr, error = %e, "rollback of a taken address failed");
                }
            }
        }
        result.map(|()| reports)
    }

    fn take_all(
        &mut self,
        addrs: &[ServiceAddr],
        reports: &mut Vec<TakeReport>,
    ) -> Result<(), NetError> {
        for a in addrs {
            let r = self.take_one(a)?;
            tracing::info!(addr = %a, already_held = r.already_held, probe_ms = r.probe.as_millis() as u64,
                dad_ms = r.dad.as_millis() as u64, "service address taken");
            reports.push(r);
        }
        self.announce(reports)
    }

    fn take_one(&mut self, a: &ServiceAddr) -> Result<TakeReport, NetError> {
        let mut rep = TakeReport {
            addr: a.clone(),
            already_held: false,
            probe: Duration::ZERO,
            add: Duration::ZERO,
            dad: Duration::ZERO,
            announce: Duration::ZERO,
            announcements_sent: 0,
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
                self.probe_v4(link.ifindex, &a.ifname, mac, v4)?;
                rep.probe = t.elapsed();
                let t = Instant::now();
                let opts = AddOptions {
                    label: a.label.clone(),
                    nodad: false,
                };
                self.nl.add_address(&a.ifname, &a.prefix, &opts)?;
                rep.add = t.elapsed();
            }
            IpAddr::V6(v6) => {
                let opts = AddOptions {
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
                rep.add = t.elapsed();
                if let Some(sniff) = sniff {
                    let t = Instant::now();
                    let r = self.wait_dad(link.ifindex, a, mac, v6, &sniff);
                    rep.dad = t.elapsed();
                    if let Err(e) = r {
                        self.remove_any_prefix(a).ok();
                        return Err(e);
                    }
                }
            }
        }
        Ok(rep)
    }

    fn find(&mut self, ifindex: u32, addr: IpAddr) -> Result<Option<AddrInfo>, NetError> {
        Ok(self
            .nl
            .list_addresses_index(ifindex)?
            .into_iter()
            .find(|i| i.prefix.addr == addr))
    }

    /// Remove `a.prefix.addr` from its interface whatever its prefix length there.
    fn remove_any_prefix(&mut self, a: &ServiceAddr) -> Result<bool, NetError> {
        let link = match self.nl.link_state(&a.ifname)? {
            Some(l) => l,
            None => return Ok(false),
        };
        match self.find(link.ifindex, a.prefix.addr)? {
            Some(p) => self.nl.remove_address(&a.ifname, &p.prefix),
            None => Ok(false),
        }
    }

    fn probe_v4(
        &self,
        ifindex: u32,
        ifname: &str,
        mac: [u8; 6],
        addr: Ipv4Addr,
    ) -> Result<(), NetError> {
        if self.cfg.probe_count == 0 {
            return Ok(());
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
                        return Err(NetError::AddressInUse {
                            addr: IpAddr::V4(addr),
                            ifname: ifname.to_string(),
                            mac: Some(fmt_mac(&other)),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    fn wait_dad(
        &mut self,
        ifindex: u32,
        a: &ServiceAddr,
        mac: [u8; 6],
        addr: Ipv6Addr,
        sniff: &PacketSocket,
    ) -> Result<(), NetError> {
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
                    return Err(NetError::AddressInUse {
                        addr: IpAddr::V6(addr),
                        ifname: a.ifname.clone(),
                        mac: defender.map(|m| fmt_mac(&m)),
                    });
                }
                Some(i) if !i.is_tentative() => return Ok(()),
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

//! ARP frames for IPv4 address probing and announcement (RFC 826, RFC 5227), sans-io.
//!
//! Frame layout (all fields big-endian), as sent and received on an AF_PACKET SOCK_RAW socket:
//! ```text
//! Ethernet   dst[6] | src[6] | ethertype u16 = 0x0806
//! ARP (28)   htype u16 = 1 | ptype u16 = 0x0800 | hlen u8 = 6 | plen u8 = 4 | op u16 (1 request,
//!            2 reply) | sha[6] | spa[4] | tha[6] | tpa[4]
//! padding    zeros up to the 60-byte Ethernet minimum (the FCS is the NIC's)
//! ```
//! RFC 5227 words: an *ARP probe* is a request with spa = 0.0.0.0 and tpa = the address being
//! checked; an *ARP announcement* (gratuitous ARP) has spa = tpa = the address. Linux treats
//! spa == tpa as gratuitous and lets it override an existing neighbour entry at once (no
//! locktime); for a gratuitous *reply* it also wants tha == sha, so [`announcement`] builds the
//! reply that way.

use std::net::Ipv4Addr;

pub const ETH_P_ARP: u16 = 0x0806;
pub const ARPOP_REQUEST: u16 = 1;
pub const ARPOP_REPLY: u16 = 2;
pub const BROADCAST: [u8; 6] = [0xff; 6];
/// Ethernet header (14) + ARP for Ethernet/IPv4 (28).
pub const ARP_FRAME_LEN: usize = 42;
/// The shortest Ethernet frame without FCS; ARP frames are padded to it.
pub const ETH_MIN_FRAME: usize = 60;

/// A parsed ARP packet for Ethernet/IPv4.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArpPacket {
    /// The Ethernet source of the frame.
    pub eth_src: [u8; 6],
    pub op: u16,
    pub sha: [u8; 6],
    pub spa: Ipv4Addr,
    pub tha: [u8; 6],
    pub tpa: Ipv4Addr,
}

fn frame(dst: [u8; 6], p: &ArpPacket) -> [u8; ETH_MIN_FRAME] {
    let mut f = [0u8; ETH_MIN_FRAME];
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&p.eth_src);
    f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // ARPHRD_ETHER
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&p.op.to_be_bytes());
    f[22..28].copy_from_slice(&p.sha);
    f[28..32].copy_from_slice(&p.spa.octets());
    f[32..38].copy_from_slice(&p.tha);
    f[38..42].copy_from_slice(&p.tpa.octets());
    f
}

/// An ARP probe for `target` (RFC 5227 2.1.1): broadcast request, sender IP 0.0.0.0, target
/// hardware address zero.
pub fn probe(my_mac: [u8; 6], target: Ipv4Addr) -> [u8; ETH_MIN_FRAME] {
    frame(
        BROADCAST,
        &ArpPacket {
            eth_src: my_mac,
            op: ARPOP_REQUEST,
            sha: my_mac,
            spa: Ipv4Addr::UNSPECIFIED,
            tha: [0; 6],
            tpa: target,
        },
    )
}

/// A gratuitous ARP for `addr`, broadcast, sender IP = target IP = `addr`. `op` is
/// [`ARPOP_REQUEST`] (the RFC 5227 announcement, target MAC zero) or [`ARPOP_REPLY`] (target
/// MAC = our MAC, which Linux requires of a gratuitous reply).
pub fn announcement(my_mac: [u8; 6], addr: Ipv4Addr, op: u16) -> [u8; ETH_MIN_FRAME] {
    let tha = if op == ARPOP_REPLY { my_mac } else { [0; 6] };
    frame(
        BROADCAST,
        &ArpPacket {
            eth_src: my_mac,
            op,
            sha: my_mac,
            spa: addr,
            tha,
            tpa: addr,
        },
    )
}

/// Parse an Ethernet frame carrying ARP for Ethernet/IPv4; `None` for anything else.
pub fn parse(f: &[u8]) -> Option<ArpPacket> {
    if f.len() < ARP_FRAME_LEN
        || f[12..14] != ETH_P_ARP.to_be_bytes()
        || f[14..16] != 1u16.to_be_bytes()
        || f[16..18] != 0x0800u16.to_be_bytes()
        || f[18] != 6
        || f[19] != 4
    {
        return None;
    }
    let mac = |o: usize| <[u8; 6]>::try_from(&f[o..o + 6]).unwrap();
    let ip = |o: usize| Ipv4Addr::new(f[o], f[o + 1], f[o + 2], f[o + 3]);
    Some(ArpPacket {
        eth_src: mac(6),
        op: u16::from_be_bytes([f[20], f[21]]),
        sha: mac(22),
        spa: ip(28),
        tha: mac(32),
        tpa: ip(38),
    })
}

/// While probing `probed` from `my_mac`: does `p` show another host using or claiming the
/// address? RFC 5227 2.1.1: any ARP packet whose sender IP is the address, or another host's
/// probe for the same address. Returns that host's MAC. Our own frames (seen looped back) are
/// not conflicts.
pub fn probe_conflict(p: &ArpPacket, probed: Ipv4Addr, my_mac: [u8; 6]) -> Option<[u8; 6]> {
    if p.sha == my_mac {
        return None;
    }
    let uses = p.spa == probed;
    let probes_too = p.op == ARPOP_REQUEST && p.spa.is_unspecified() && p.tpa == probed;
    (uses || probes_too).then_some(p.sha)
}

/// `02:00:00:00:00:0a`.
pub fn fmt_mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];
    const OTHER: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];

    #[test]
    fn probe_bytes() {
        let f = probe(MAC, Ipv4Addr::new(192, 0, 2, 10));
        #[rustfmt::skip]
        let want: [u8; 42] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0, 0, 0, 0, 0x0b, 0x08, 0x06,
            0, 1, 0x08, 0, 6, 4, 0, 1,
            0x02, 0, 0, 0, 0, 0x0b, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 192, 0, 2, 10,
        ];
        assert_eq!(&f[..42], &want);
        assert!(f[42..].iter().all(|&b| b == 0));
        assert_eq!(f.len(), 60);
    }

    #[test]
    fn announcement_bytes() {
        let a = Ipv4Addr::new(192, 0, 2, 10);
        let req = announcement(MAC, a, ARPOP_REQUEST);
        assert_eq!(
            &req[20..42],
            &[0, 1, 0x02, 0, 0, 0, 0, 0x0b, 192, 0, 2, 10, 0, 0, 0, 0, 0, 0, 192, 0, 2, 10]
        );
        let rep = announcement(MAC, a, ARPOP_REPLY);
        assert_eq!(
            &rep[20..42],
            &[0, 2, 0x02, 0, 0, 0, 0, 0x0b, 192, 0, 2, 10, 0x02, 0, 0, 0, 0, 0x0b, 192, 0, 2, 10]
        );
        assert_eq!(&rep[0..6], &BROADCAST);
    }

    #[test]
    fn parse_roundtrip_and_rejects() {
        let a = Ipv4Addr::new(198, 51, 100, 7);
        let p = parse(&announcement(MAC, a, ARPOP_REPLY)).unwrap();
        assert_eq!(
            p,
            ArpPacket {
                eth_src: MAC,
                op: 2,
                sha: MAC,
                spa: a,
                tha: MAC,
                tpa: a
            }
        );
        // Unpadded 42-byte frames parse too.
        assert!(parse(&probe(MAC, a)[..42]).is_some());
        assert!(parse(&probe(MAC, a)[..41]).is_none());
        let mut ipv6 = probe(MAC, a);
        ipv6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
        assert!(parse(&ipv6).is_none());
        let mut bad_hlen = probe(MAC, a);
        bad_hlen[18] = 8;
        assert!(parse(&bad_hlen).is_none());
    }

    #[test]
    fn conflicts() {
        let a = Ipv4Addr::new(192, 0, 2, 10);
        // The kernel's answer to a probe: reply, sender IP = the address, target IP 0.0.0.0.
        let reply = ArpPacket {
            eth_src: OTHER,
            op: ARPOP_REPLY,
            sha: OTHER,
            spa: a,
            tha: MAC,
            tpa: Ipv4Addr::UNSPECIFIED,
        };
        assert_eq!(probe_conflict(&reply, a, MAC), Some(OTHER));
        // Another host's gratuitous ARP for it.
        let garp = parse(&announcement(OTHER, a, ARPOP_REQUEST)).unwrap();
        assert_eq!(probe_conflict(&garp, a, MAC), Some(OTHER));
        // Another host probing for the same address at the same time.
        let theirs = parse(&probe(OTHER, a)).unwrap();
        assert_eq!(probe_conflict(&theirs, a, MAC), Some(OTHER));
        // Our own probe, and traffic about other addresses, are not conflicts.
        assert_eq!(
            probe_conflict(&parse(&probe(MAC, a)).unwrap(), a, MAC),
            None
        );
        let other_ip = parse(&announcement(OTHER, Ipv4Addr::new(192, 0, 2, 11), 1)).unwrap();
        assert_eq!(probe_conflict(&other_ip, a, MAC), None);
        // A host asking *who has* the address (sender IP its own) is no conflict.
        let query = ArpPacket {
            spa: Ipv4Addr::new(192, 0, 2, 99),
            tpa: a,
            ..garp
        };
        assert_eq!(probe_conflict(&query, a, MAC), None);
        assert_eq!(fmt_mac(&OTHER), "02:00:00:00:00:0a");
    }
}

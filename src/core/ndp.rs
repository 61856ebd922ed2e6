//! IPv6 neighbour advertisements (RFC 4861 4.4, 7.2.6), sans-io: the unsolicited NA a node
//! sends after taking an address, and parsing of NAs seen while DAD runs.
//!
//! Frame layout (big-endian), as sent on an AF_PACKET SOCK_RAW socket:
//! ```text
//! Ethernet (14)  dst 33:33:00:00:00:01 (ff02::1) | src mac | ethertype 0x86dd
//! IPv6 (40)      0x6000_0000 (version 6, no class/flow) | payload len u16 = 32 |
//!                next header 58 (ICMPv6) | hop limit 255 (receivers drop anything else) |
//!                src[16] | dst[16] = ff02::1
//! ICMPv6 NA (24) type 136 | code 0 | checksum u16 | flags u32 (R 0x8000_0000, S 0x4000_0000,
//!                O 0x2000_0000; S must be 0 to a multicast destination) | target[16]
//! option (8)     type 2 (target link-layer address) | length 1 (units of 8 bytes) | mac[6]
//! ```
//! The checksum is the one's complement of the one's-complement sum over the pseudo-header
//! (src, dst, upper-layer length u32, three zero bytes, next header 58) and the ICMPv6 message.
//! With O set, Linux replaces the link-layer address of an existing neighbour entry at once.

use std::net::Ipv6Addr;

pub const ETH_P_IPV6: u16 = 0x86dd;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const ND_NEIGHBOR_ADVERT: u8 = 136;
pub const NA_FLAG_ROUTER: u32 = 0x8000_0000;
pub const NA_FLAG_SOLICITED: u32 = 0x4000_0000;
pub const NA_FLAG_OVERRIDE: u32 = 0x2000_0000;
pub const OPT_TARGET_LLADDR: u8 = 2;
/// 14 Ethernet + 40 IPv6 + 24 NA + 8 option.
pub const NA_FRAME_LEN: usize = 86;
pub const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

/// The Ethernet address an IPv6 multicast group maps to (RFC 2464 7): 33:33 + low 32 bits.
pub fn multicast_mac(group: Ipv6Addr) -> [u8; 6] {
    let o = group.octets();
    [0x33, 0x33, o[12], o[13], o[14], o[15]]
}

fn sum16(data: &[u8], mut acc: u32) -> u32 {
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            (c[0] as u16) << 8
        };
        acc += w as u32;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The ICMPv6 checksum of `msg` (with its checksum field zero) from `src` to `dst`.
pub fn icmpv6_checksum(src: Ipv6Addr, dst: Ipv6Addr, msg: &[u8]) -> u16 {
    let mut acc = sum16(&src.octets(), 0);
    acc = sum16(&dst.octets(), acc);
    acc = sum16(&(msg.len() as u32).to_be_bytes(), acc);
    acc = sum16(&[0, 0, 0, IPPROTO_ICMPV6], acc);
    acc = sum16(msg, acc);
    !fold(acc)
}

/// An unsolicited neighbour advertisement for `target` from `src` (an address of the sending
/// interface: the target itself once it is no longer tentative), to all nodes, with the
/// override flag and our MAC as the target link-layer address.
pub fn unsolicited_na(my_mac: [u8; 6], src: Ipv6Addr, target: Ipv6Addr) -> [u8; NA_FRAME_LEN] {
    let mut f = [0u8; NA_FRAME_LEN];
    f[0..6].copy_from_slice(&multicast_mac(ALL_NODES));
    f[6..12].copy_from_slice(&my_mac);
    f[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
    let ip = &mut f[14..54];
    ip[0..4].copy_from_slice(&0x6000_0000u32.to_be_bytes());
    ip[4..6].copy_from_slice(&32u16.to_be_bytes());
    ip[6] = IPPROTO_ICMPV6;
    ip[7] = 255;
    ip[8..24].copy_from_slice(&src.octets());
    ip[24..40].copy_from_slice(&ALL_NODES.octets());
    let icmp = &mut f[54..86];
    icmp[0] = ND_NEIGHBOR_ADVERT;
    icmp[4..8].copy_from_slice(&NA_FLAG_OVERRIDE.to_be_bytes());
    icmp[8..24].copy_from_slice(&target.octets());
    icmp[24] = OPT_TARGET_LLADDR;
    icmp[25] = 1;
    icmp[26..32].copy_from_slice(&my_mac);
    let ck = icmpv6_checksum(src, ALL_NODES, icmp);
    icmp[2..4].copy_from_slice(&ck.to_be_bytes());
    f
}

/// A parsed neighbour advertisement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NeighborAdvert {
    pub eth_src: [u8; 6],
    pub ip_src: Ipv6Addr,
    pub flags: u32,
    pub target: Ipv6Addr,
    /// The target link-layer address option, if present.
    pub target_mac: Option<[u8; 6]>,
}

/// Parse an Ethernet frame carrying an ICMPv6 neighbour advertisement directly after the IPv6
/// header (no extension headers), with hop limit 255, code 0 and a valid checksum; `None` for
/// anything else.
pub fn parse_na(f: &[u8]) -> Option<NeighborAdvert> {
    if f.len() < 14 + 40 + 24 || f[12..14] != ETH_P_IPV6.to_be_bytes() {
        return None;
    }
    let ip = &f[14..54];
    if ip[0] >> 4 != 6 || ip[6] != IPPROTO_ICMPV6 || ip[7] != 255 {
        return None;
    }
    let plen = u16::from_be_bytes([ip[4], ip[5]]) as usize;
    let icmp = f.get(54..54 + plen)?;
    if plen < 24 || icmp[0] != ND_NEIGHBOR_ADVERT || icmp[1] != 0 {
        return None;
    }
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap());
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap());
    let mut zeroed = icmp.to_vec();
    zeroed[2] = 0;
    zeroed[3] = 0;
    if icmpv6_checksum(src, dst, &zeroed) != u16::from_be_bytes([icmp[2], icmp[3]]) {
        return None;
    }
    let mut target_mac = None;
    let mut opts = &icmp[24..];
    while opts.len() >= 8 {
        let len = opts[1] as usize * 8;
        if len == 0 || len > opts.len() {
            return None; // RFC 4861 4.6: a zero-length option is invalid
        }
        if opts[0] == OPT_TARGET_LLADDR && len == 8 {
            target_mac = Some(<[u8; 6]>::try_from(&opts[2..8]).unwrap());
        }
        opts = &opts[len..];
    }
    Some(NeighborAdvert {
        eth_src: <[u8; 6]>::try_from(&f[6..12]).unwrap(),
        ip_src: src,
        flags: u32::from_be_bytes([icmp[4], icmp[5], icmp[6], icmp[7]]),
        target: Ipv6Addr::from(<[u8; 16]>::try_from(&icmp[8..24]).unwrap()),
        target_mac,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];

    #[test]
    fn na_bytes() {
        let t: Ipv6Addr = "2001:db8::10".parse().unwrap();
        let f = unsolicited_na(MAC, t, t);
        assert_eq!(
            &f[0..14],
            &[0x33, 0x33, 0, 0, 0, 1, 2, 0, 0, 0, 0, 0x0b, 0x86, 0xdd]
        );
        assert_eq!(&f[14..22], &[0x60, 0, 0, 0, 0, 32, 58, 255]);
        assert_eq!(&f[22..38], &t.octets());
        assert_eq!(&f[38..54], &ALL_NODES.octets());
        assert_eq!(f[54], 136);
        assert_eq!(f[55], 0);
        assert_eq!(
            &f[58..62],
            &[0x20, 0, 0, 0],
            "override only: not router, not solicited"
        );
        assert_eq!(&f[62..78], &t.octets());
        assert_eq!(&f[78..86], &[2, 1, 2, 0, 0, 0, 0, 0x0b]);
        // The one's-complement sum over pseudo-header and message, checksum included, is 0xffff.
        let mut acc = sum16(&t.octets(), 0);
        acc = sum16(&ALL_NODES.octets(), acc);
        acc = sum16(&32u32.to_be_bytes(), acc);
        acc = sum16(&[0, 0, 0, 58], acc);
        acc = sum16(&f[54..86], acc);
        assert_eq!(fold(acc), 0xffff);
    }

    #[test]
    fn checksum_known_value() {
        // Worked by hand: pseudo-header words for ::1 -> ::2, length 8, next header 58, plus
        // the message 0x8000 0x0000 0x0001 0x0002 (echo request id 1 seq 2):
        // 1 + 2 + 8 + 58 + 0x8000 + 1 + 2 = 0x8048; checksum = !0x8048 = 0x7fb7.
        let msg = [0x80, 0, 0, 0, 0, 1, 0, 2];
        assert_eq!(
            icmpv6_checksum(Ipv6Addr::LOCALHOST, "::2".parse().unwrap(), &msg),
            0x7fb7
        );
        // Odd length: the last byte is padded with zero.
        assert_eq!(
            icmpv6_checksum(Ipv6Addr::UNSPECIFIED, Ipv6Addr::UNSPECIFIED, &[1]),
            !(1u16 + 58 + 0x0100)
        );
    }

    #[test]
    fn parse_roundtrip_and_rejects() {
        let t: Ipv6Addr = "2001:db8::10".parse().unwrap();
        let f = unsolicited_na(MAC, t, t);
        let na = parse_na(&f).unwrap();
        assert_eq!(na.target, t);
        assert_eq!(na.target_mac, Some(MAC));
        assert_eq!(na.flags, NA_FLAG_OVERRIDE);
        assert_eq!(na.eth_src, MAC);
        let mut bad = f;
        bad[70] ^= 1;
        assert!(parse_na(&bad).is_none(), "checksum");
        let mut hop = f;
        hop[21] = 64;
        assert!(parse_na(&hop).is_none(), "hop limit must be 255");
        let mut zero_opt = f;
        zero_opt[79] = 0;
        // Fix the checksum so only the zero-length option is wrong.
        zero_opt[56] = 0;
        zero_opt[57] = 0;
        let ck = icmpv6_checksum(t, ALL_NODES, &zero_opt[54..86]);
        zero_opt[56..58].copy_from_slice(&ck.to_be_bytes());
        assert!(parse_na(&zero_opt).is_none(), "zero-length option");
        assert!(parse_na(&f[..60]).is_none());
        assert_eq!(
            multicast_mac("ff02::1:ff00:10".parse().unwrap()),
            [0x33, 0x33, 0xff, 0, 0, 0x10]
        );
    }
}

//! rtnetlink message building and parsing (sans-io): addresses and links.
//!
//! Layouts (netlink(7), rtnetlink(7), `linux/netlink.h`, `linux/if_addr.h`,
//! `linux/rtnetlink.h`); every integer is in host byte order except where noted:
//!
//! ```text
//! nlmsghdr (16 bytes)   u32 nlmsg_len (header + payload, unaligned) | u16 nlmsg_type
//!                       u16 nlmsg_flags | u32 nlmsg_seq | u32 nlmsg_pid
//! ifaddrmsg (8 bytes)   u8 family | u8 prefixlen | u8 flags | u8 scope | u32 index
//! ifinfomsg (16 bytes)  u8 family | u8 pad | u16 type | i32 index | u32 flags | u32 change
//! rtattr (4 bytes + payload, padded to 4)  u16 rta_len (header + payload) | u16 rta_type
//! nlmsgerr              i32 error (negative errno, 0 = ack) | the request's nlmsghdr
//!                       [+ request payload unless NLM_F_CAPPED] [+ TLVs if NLM_F_ACK_TLVS]
//! ```
//! Messages in one datagram follow each other at 4-byte aligned offsets. A dump answers with
//! messages flagged NLM_F_MULTI and ends with NLMSG_DONE (payload: i32 error).
//! Address attributes carry addresses in network byte order (4 or 16 bytes).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

// Message types.
pub const NLMSG_NOOP: u16 = 1;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLMSG_OVERRUN: u16 = 4;
pub const RTM_NEWLINK: u16 = 16;
pub const RTM_GETLINK: u16 = 18;
pub const RTM_NEWADDR: u16 = 20;
pub const RTM_DELADDR: u16 = 21;
pub const RTM_GETADDR: u16 = 22;

// nlmsg_flags.
pub const NLM_F_REQUEST: u16 = 0x01;
pub const NLM_F_MULTI: u16 = 0x02;
pub const NLM_F_ACK: u16 = 0x04;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLM_F_CREATE: u16 = 0x400;
/// On an NLMSG_ERROR: the request payload was not echoed.
pub const NLM_F_CAPPED: u16 = 0x100;
/// On an NLMSG_ERROR: extended-ack TLVs follow.
pub const NLM_F_ACK_TLVS: u16 = 0x200;
/// Extended ack attribute: a NUL-terminated error message.
pub const NLMSGERR_ATTR_MSG: u16 = 1;

// Address families.
pub const AF_UNSPEC: u8 = 0;
pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;

// Address attributes (IFA_*).
pub const IFA_ADDRESS: u16 = 1;
pub const IFA_LOCAL: u16 = 2;
pub const IFA_LABEL: u16 = 3;
pub const IFA_FLAGS: u16 = 8;

// Address flags (IFA_F_*).
pub const IFA_F_SECONDARY: u32 = 0x01;
pub const IFA_F_NODAD: u32 = 0x02;
pub const IFA_F_DADFAILED: u32 = 0x08;
pub const IFA_F_TENTATIVE: u32 = 0x40;
pub const IFA_F_PERMANENT: u32 = 0x80;

// Scopes.
pub const RT_SCOPE_UNIVERSE: u8 = 0;
pub const RT_SCOPE_LINK: u8 = 253;
pub const RT_SCOPE_HOST: u8 = 254;

// Link attributes (IFLA_*) and flags (IFF_*).
pub const IFLA_ADDRESS: u16 = 1;
pub const IFLA_IFNAME: u16 = 3;
pub const IFLA_MTU: u16 = 4;
pub const IFLA_OPERSTATE: u16 = 16;
pub const IFF_UP: u32 = 0x1;
pub const IFF_RUNNING: u32 = 0x40;
pub const IFF_LOWER_UP: u32 = 0x1_0000;

pub const NLMSG_HDRLEN: usize = 16;
const IFADDRMSG_LEN: usize = 8;
const IFINFOMSG_LEN: usize = 16;
/// Longest interface name, without the NUL (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;
/// Attribute type bits (the top two are NLA_F_NESTED and NLA_F_NET_BYTEORDER).
const NLA_TYPE_MASK: u16 = 0x3fff;

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// An address with its prefix length, e.g. `192.0.2.10/24` or `2001:db8::10/64`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IpPrefix {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl IpPrefix {
    /// Checks the prefix length against the family (32 for IPv4, 128 for IPv6).
    pub fn new(addr: IpAddr, prefix_len: u8) -> Result<IpPrefix, BuildError> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix_len > max {
            return Err(BuildError::PrefixLen { addr, prefix_len });
        }
        Ok(IpPrefix { addr, prefix_len })
    }

    /// AF_INET or AF_INET6.
    pub fn family(&self) -> u8 {
        family_of(&self.addr)
    }
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl FromStr for IpPrefix {
    type Err = BuildError;
    fn from_str(s: &str) -> Result<IpPrefix, BuildError> {
        let bad = || BuildError::Parse(s.to_string());
        let (a, p) = s.split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = a.parse().map_err(|_| bad())?;
        let prefix_len: u8 = p.parse().map_err(|_| bad())?;
        IpPrefix::new(addr, prefix_len)
    }
}

fn family_of(a: &IpAddr) -> u8 {
    match a {
        IpAddr::V4(_) => AF_INET,
        IpAddr::V6(_) => AF_INET6,
    }
}

fn addr_bytes(a: &IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    }
}

/// The scope the kernel expects for an address (IPv6 computes its own and ignores this).
fn scope_of(a: &IpAddr) -> u8 {
    match a {
        IpAddr::V4(v) if v.is_loopback() => RT_SCOPE_HOST,
        IpAddr::V6(v) if v.is_loopback() => RT_SCOPE_HOST,
        IpAddr::V6(v) if (v.segments()[0] & 0xffc0) == 0xfe80 => RT_SCOPE_LINK,
        _ => RT_SCOPE_UNIVERSE,
    }
}

/// A request that cannot be encoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BuildError {
    #[error("prefix length {prefix_len} is too long for {addr}")]
    PrefixLen { addr: IpAddr, prefix_len: u8 },
    #[error("not an address with prefix length (want e.g. 192.0.2.10/24): {0:?}")]
    Parse(String),
    #[error("interface name {0:?} is empty, too long (max 15 bytes) or contains NUL or '/'")]
    IfName(String),
    #[error("address label {label:?}: {why}")]
    Label { label: String, why: &'static str },
}

/// Check an interface name the way the kernel does (dev_valid_name).
pub fn check_ifname(name: &str) -> Result<(), BuildError> {
    let bad = name.is_empty()
        || name.len() > IFNAME_MAX
        || name == "."
        || name == ".."
        || name
            .bytes()
            .any(|b| b == 0 || b == b'/' || b == b':' || b.is_ascii_whitespace());
    if bad {
        return Err(BuildError::IfName(name.to_string()));
    }
    Ok(())
}

/// A message under construction: header, fixed part, attributes; `finish` fills the length.
struct MsgBuf(Vec<u8>);

impl MsgBuf {
    fn new(msg_type: u16, flags: u16, seq: u32) -> MsgBuf {
        let mut v = Vec::with_capacity(64);
        v.extend_from_slice(&0u32.to_ne_bytes()); // length, filled by finish
        v.extend_from_slice(&msg_type.to_ne_bytes());
        v.extend_from_slice(&flags.to_ne_bytes());
        v.extend_from_slice(&seq.to_ne_bytes());
        v.extend_from_slice(&0u32.to_ne_bytes()); // pid: 0, the kernel fills in ours
        MsgBuf(v)
    }

    fn ifaddrmsg(&mut self, family: u8, prefix_len: u8, flags: u8, scope: u8, index: u32) {
        self.0
            .extend_from_slice(&[family, prefix_len, flags, scope]);
        self.0.extend_from_slice(&index.to_ne_bytes());
    }

    fn ifinfomsg(&mut self, index: i32) {
        self.0.extend_from_slice(&[AF_UNSPEC, 0]);
        self.0.extend_from_slice(&0u16.to_ne_bytes()); // ifi_type
        self.0.extend_from_slice(&index.to_ne_bytes());
        self.0.extend_from_slice(&0u32.to_ne_bytes()); // ifi_flags
        self.0.extend_from_slice(&0u32.to_ne_bytes()); // ifi_change
    }

    fn attr(&mut self, ty: u16, payload: &[u8]) {
        let len = 4 + payload.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&ty.to_ne_bytes());
        self.0.extend_from_slice(payload);
        self.0.resize(align4(self.0.len()), 0);
    }

    fn attr_str(&mut self, ty: u16, s: &str) {
        let mut p = s.as_bytes().to_vec();
        p.push(0);
        self.attr(ty, &p);
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.0.len() as u32;
        self.0[0..4].copy_from_slice(&len.to_ne_bytes());
        self.0
    }
}

/// What to add with RTM_NEWADDR.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddrRequest {
    pub ifindex: u32,
    pub prefix: IpPrefix,
    /// IPv4 only: the address label (`eth0:svc`); the kernel uses the interface name if absent.
    pub label: Option<String>,
    /// IPv6 only: IFA_F_NODAD, skip duplicate address detection. Rejected for IPv4, where the
    /// kernel does no DAD (our ARP probe does it).
    pub nodad: bool,
}

/// RTM_NEWADDR with NLM_F_CREATE|NLM_F_EXCL (EEXIST if the address is there) and an ack.
/// Carries IFA_LOCAL and IFA_ADDRESS (equal: not point-to-point), IFA_LABEL if given, and
/// IFA_FLAGS when a flag is set.
pub fn new_addr(seq: u32, req: &AddrRequest) -> Result<Vec<u8>, BuildError> {
    let p = &req.prefix;
    let p = IpPrefix::new(p.addr, p.prefix_len)?;
    if let Some(label) = &req.label {
        if p.addr.is_ipv6() {
            return Err(BuildError::Label {
                label: label.clone(),
                why: "labels exist for IPv4 addresses only",
            });
        }
        if check_ifname(label.split(':').next().unwrap_or("")).is_err()
            || label.len() > IFNAME_MAX
            || label.contains('\0')
        {
            return Err(BuildError::Label {
                label: label.clone(),
                why: "must be at most 15 bytes, no NUL",
            });
        }
    }
    if req.nodad && p.addr.is_ipv4() {
        return Err(BuildError::Label {
            label: String::new(),
            why: "IFA_F_NODAD applies to IPv6 only",
        });
    }
    let flags: u32 = if req.nodad { IFA_F_NODAD } else { 0 };
    let mut m = MsgBuf::new(
        RTM_NEWADDR,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        seq,
    );
    m.ifaddrmsg(
        p.family(),
        p.prefix_len,
        flags as u8,
        scope_of(&p.addr),
        req.ifindex,
    );
    let a = addr_bytes(&p.addr);
    m.attr(IFA_LOCAL, &a);
    m.attr(IFA_ADDRESS, &a);
    if let Some(label) = &req.label {
        m.attr_str(IFA_LABEL, label);
    }
    if flags != 0 {
        m.attr(IFA_FLAGS, &flags.to_ne_bytes());
    }
    Ok(m.finish())
}

/// RTM_DELADDR with an ack; the kernel matches on family, prefix length, index and address
/// (IFA_LOCAL for IPv4, IFA_LOCAL or IFA_ADDRESS for IPv6: both are sent).
pub fn del_addr(seq: u32, ifindex: u32, p: &IpPrefix) -> Vec<u8> {
    let mut m = MsgBuf::new(RTM_DELADDR, NLM_F_REQUEST | NLM_F_ACK, seq);
    m.ifaddrmsg(p.family(), p.prefix_len, 0, scope_of(&p.addr), ifindex);
    let a = addr_bytes(&p.addr);
    m.attr(IFA_LOCAL, &a);
    m.attr(IFA_ADDRESS, &a);
    m.finish()
}

/// RTM_GETADDR dump of every address of `family` (AF_UNSPEC for both). The kernel filters by
/// index only with strict checking, so callers filter the answers themselves.
pub fn get_addr_dump(seq: u32, family: u8) -> Vec<u8> {
    let mut m = MsgBuf::new(RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, seq);
    m.ifaddrmsg(family, 0, 0, 0, 0);
    m.finish()
}

/// RTM_GETLINK for one interface by name (IFLA_IFNAME); the answer is one RTM_NEWLINK or an
/// NLMSG_ERROR (ENODEV).
pub fn get_link_by_name(seq: u32, name: &str) -> Result<Vec<u8>, BuildError> {
    check_ifname(name)?;
    let mut m = MsgBuf::new(RTM_GETLINK, NLM_F_REQUEST, seq);
    m.ifinfomsg(0);
    m.attr_str(IFLA_IFNAME, name);
    Ok(m.finish())
}

/// RTM_GETLINK for one interface by index.
pub fn get_link_by_index(seq: u32, ifindex: u32) -> Vec<u8> {
    let mut m = MsgBuf::new(RTM_GETLINK, NLM_F_REQUEST, seq);
    m.ifinfomsg(ifindex as i32);
    m.finish()
}

/// One address, from an RTM_NEWADDR answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddrInfo {
    pub ifindex: u32,
    pub prefix: IpPrefix,
    pub scope: u8,
    /// IFA_FLAGS if present (it carries the upper bits), else the 8-bit ifa_flags.
    pub flags: u32,
    pub label: Option<String>,
}

impl AddrInfo {
    /// DAD still running (IPv6): the address is not usable yet.
    pub fn is_tentative(&self) -> bool {
        self.flags & IFA_F_TENTATIVE != 0
    }
    /// DAD found the address in use elsewhere (IPv6).
    pub fn is_dad_failed(&self) -> bool {
        self.flags & IFA_F_DADFAILED != 0
    }
}

/// One link, from an RTM_NEWLINK answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub ifindex: u32,
    pub name: String,
    /// IFF_* flags.
    pub flags: u32,
    /// IFLA_ADDRESS (the MAC for Ethernet), if the link has one.
    pub hw_addr: Option<Vec<u8>>,
    pub mtu: Option<u32>,
    /// IFLA_OPERSTATE (RFC 2863: 6 = up, 2 = down, 7 = dormant, 5 = notpresent...).
    pub operstate: Option<u8>,
}

impl LinkInfo {
    /// Administratively up (IFF_UP).
    pub fn is_up(&self) -> bool {
        self.flags & IFF_UP != 0
    }
    /// Carrier present (IFF_LOWER_UP).
    pub fn has_carrier(&self) -> bool {
        self.flags & IFF_LOWER_UP != 0
    }
    /// The Ethernet MAC, if the hardware address is 6 bytes.
    pub fn mac(&self) -> Option<[u8; 6]> {
        self.hw_addr
            .as_ref()
            .and_then(|h| <[u8; 6]>::try_from(h.as_slice()).ok())
    }
}

/// One message from the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// NLMSG_ERROR with error 0.
    Ack {
        seq: u32,
    },
    /// NLMSG_ERROR with a negative errno; `errno` is positive here. `msg` is the extended-ack
    /// message when the kernel sent one.
    Error {
        seq: u32,
        errno: i32,
        msg: Option<String>,
    },
    /// NLMSG_DONE: the end of a dump (`errno` 0, or the dump's error, positive).
    Done {
        seq: u32,
        errno: i32,
    },
    Addr {
        seq: u32,
        info: AddrInfo,
    },
    Link {
        seq: u32,
        info: LinkInfo,
    },
    /// Anything else (NLMSG_NOOP, other RTM types): skipped by callers.
    Other {
        seq: u32,
        msg_type: u16,
    },
}

impl Reply {
    pub fn seq(&self) -> u32 {
        match self {
            Reply::Ack { seq }
            | Reply::Error { seq, .. }
            | Reply::Done { seq, .. }
            | Reply::Addr { seq, .. }
            | Reply::Link { seq, .. }
            | Reply::Other { seq, .. } => *seq,
        }
    }
}

/// Malformed bytes from the kernel.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("netlink message at offset {offset}: {why}")]
    Malformed { offset: usize, why: &'static str },
    #[error("netlink overrun: the kernel dropped messages")]
    Overrun,
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_ne_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// Iterate over rtattrs in `b`: (type without flag bits, payload).
fn attrs(b: &[u8], base: usize) -> Result<Vec<(u16, &[u8])>, ParseError> {
    let mut out = Vec::new();
    let mut o = 0;
    while o + 4 <= b.len() {
        let len = u16_at(b, o) as usize;
        let ty = u16_at(b, o + 2) & NLA_TYPE_MASK;
        if len < 4 || o + len > b.len() {
            return Err(ParseError::Malformed {
                offset: base + o,
                why: "attribute length",
            });
        }
        out.push((ty, &b[o + 4..o + len]));
        o += align4(len);
    }
    Ok(out)
}

fn cstr(p: &[u8]) -> String {
    let end = p.iter().position(|&c| c == 0).unwrap_or(p.len());
    String::from_utf8_lossy(&p[..end]).into_owned()
}

fn ip_from(family: u8, p: &[u8]) -> Option<IpAddr> {
    match (family, p.len()) {
        (AF_INET, 4) => Some(IpAddr::V4(Ipv4Addr::new(p[0], p[1], p[2], p[3]))),
        (AF_INET6, 16) => Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(p).ok()?))),
        _ => None,
    }
}

fn parse_addr(b: &[u8], base: usize) -> Result<AddrInfo, ParseError> {
    if b.len() < IFADDRMSG_LEN {
        return Err(ParseError::Malformed {
            offset: base,
            why: "short ifaddrmsg",
        });
    }
    let (family, prefix_len, flags8, scope) = (b[0], b[1], b[2], b[3]);
    let ifindex = u32_at(b, 4);
    let mut local = None;
    let mut address = None;
    let mut label = None;
    let mut flags = flags8 as u32;
    for (ty, p) in attrs(&b[IFADDRMSG_LEN..], base + IFADDRMSG_LEN)? {
        match ty {
            IFA_LOCAL => local = ip_from(family, p),
            IFA_ADDRESS => address = ip_from(family, p),
            IFA_LABEL => label = Some(cstr(p)),
            IFA_FLAGS if p.len() == 4 => flags = u32_at(p, 0),
            _ => {}
        }
    }
    // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer on point-to-point
    // links. IPv6 sends only IFA_ADDRESS unless there is a peer.
    let addr = local.or(address).ok_or(ParseError::Malformed {
        offset: base,
        why: "address message without IFA_LOCAL/IFA_ADDRESS",
    })?;
    Ok(AddrInfo {
        ifindex,
        prefix: IpPrefix { addr, prefix_len },
        scope,
        flags,
        label,
    })
}

fn parse_link(b: &[u8], base: usize) -> Result<LinkInfo, ParseError> {
    if b.len() < IFINFOMSG_LEN {
        return Err(ParseError::Malformed {
            offset: base,
            why: "short ifinfomsg",
        });
    }
    let ifindex = u32_at(b, 4);
    let flags = u32_at(b, 8);
    let mut info = LinkInfo {
        ifindex,
        name: String::new(),
        flags,
        hw_addr: None,
        mtu: None,
        operstate: None,
    };
    for (ty, p) in attrs(&b[IFINFOMSG_LEN..], base + IFINFOMSG_LEN)? {
        match ty {
            IFLA_IFNAME => info.name = cstr(p),
            IFLA_ADDRESS => info.hw_addr = Some(p.to_vec()),
            IFLA_MTU if p.len() == 4 => info.mtu = Some(u32_at(p, 0)),
            IFLA_OPERSTATE if p.len() == 1 => info.operstate = Some(p[0]),
            _ => {}
        }
    }
    Ok(info)
}

fn parse_error(b: &[u8], flags: u16, seq: u32, base: usize) -> Result<Reply, ParseError> {
    if b.len() < 4 {
        return Err(ParseError::Malformed {
            offset: base,
            why: "short nlmsgerr",
        });
    }
    let err = u32_at(b, 0) as i32;
    if err == 0 {
        return Ok(Reply::Ack { seq });
    }
    let mut msg = None;
    if flags & NLM_F_ACK_TLVS != 0 && b.len() >= 4 + NLMSG_HDRLEN {
        // The echoed request: its header always, its payload unless capped.
        let echoed = if flags & NLM_F_CAPPED != 0 {
            NLMSG_HDRLEN
        } else {
            align4(u32_at(b, 4) as usize)
        };
        if let Some(tlvs) = b.get(4 + echoed..) {
            for (ty, p) in attrs(tlvs, base + 4 + echoed)? {
                if ty == NLMSGERR_ATTR_MSG {
                    msg = Some(cstr(p));
                }
            }
        }
    }
    Ok(Reply::Error {
        seq,
        errno: -err,
        msg,
    })
}

/// Parse every message of one datagram from the kernel.
pub fn parse(buf: &[u8]) -> Result<Vec<Reply>, ParseError> {
    let mut out = Vec::new();
    let mut o = 0;
    while o + NLMSG_HDRLEN <= buf.len() {
        let len = u32_at(buf, o) as usize;
        if len < NLMSG_HDRLEN || o + len > buf.len() {
            return Err(ParseError::Malformed {
                offset: o,
                why: "message length",
            });
        }
        let ty = u16_at(buf, o + 4);
        let flags = u16_at(buf, o + 6);
        let seq = u32_at(buf, o + 8);
        let body = &buf[o + NLMSG_HDRLEN..o + len];
        let base = o + NLMSG_HDRLEN;
        out.push(match ty {
            NLMSG_ERROR => parse_error(body, flags, seq, base)?,
            NLMSG_DONE => {
                let errno = if body.len() >= 4 {
                    -(u32_at(body, 0) as i32)
                } else {
                    0
                };
                Reply::Done { seq, errno }
            }
            NLMSG_OVERRUN => return Err(ParseError::Overrun),
            RTM_NEWADDR => Reply::Addr {
                seq,
                info: parse_addr(body, base)?,
            },
            RTM_NEWLINK => Reply::Link {
                seq,
                info: parse_link(body, base)?,
            },
            other => Reply::Other {
                seq,
                msg_type: other,
            },
        });
        o += align4(len);
    }
    if o != buf.len() && o < buf.len() {
        return Err(ParseError::Malformed {
            offset: o,
            why: "trailing bytes",
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(len: u32, ty: u16, flags: u16, seq: u32) -> Vec<u8> {
        let mut v = len.to_ne_bytes().to_vec();
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(&flags.to_ne_bytes());
        v.extend_from_slice(&seq.to_ne_bytes());
        v.extend_from_slice(&0u32.to_ne_bytes());
        v
    }

    fn rta(ty: u16, p: &[u8]) -> Vec<u8> {
        let mut v = ((4 + p.len()) as u16).to_ne_bytes().to_vec();
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(p);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }

    #[test]
    fn new_addr_v4_layout() {
        let req = AddrRequest {
            ifindex: 7,
            prefix: "192.0.2.10/24".parse().unwrap(),
            label: Some("eth0:svc".into()),
            nodad: false,
        };
        let got = new_addr(42, &req).unwrap();
        // 16 header + 8 ifaddrmsg + 8 IFA_LOCAL + 8 IFA_ADDRESS + 4+9 -> 16 IFA_LABEL = 56.
        let mut want = hdr(56, RTM_NEWADDR, 0x01 | 0x04 | 0x400 | 0x200, 42);
        want.extend_from_slice(&[2, 24, 0, 0]);
        want.extend_from_slice(&7u32.to_ne_bytes());
        want.extend(rta(2, &[192, 0, 2, 10]));
        want.extend(rta(1, &[192, 0, 2, 10]));
        want.extend(rta(3, b"eth0:svc\0"));
        assert_eq!(got, want);
        assert_eq!(got.len(), 56);
        // The label attribute: length 13, 3 bytes of padding.
        assert_eq!(
            &got[40..44],
            &[13u16.to_ne_bytes(), 3u16.to_ne_bytes()].concat()[..]
        );
    }

    #[test]
    fn new_addr_v6_nodad_layout() {
        let req = AddrRequest {
            ifindex: 3,
            prefix: "2001:db8::10/64".parse().unwrap(),
            label: None,
            nodad: true,
        };
        let got = new_addr(1, &req).unwrap();
        let a: Ipv6Addr = "2001:db8::10".parse().unwrap();
        let mut want = hdr(16 + 8 + 20 + 20 + 8, RTM_NEWADDR, 0x605, 1);
        want.extend_from_slice(&[10, 64, 0x02, 0]);
        want.extend_from_slice(&3u32.to_ne_bytes());
        want.extend(rta(2, &a.octets()));
        want.extend(rta(1, &a.octets()));
        want.extend(rta(8, &0x02u32.to_ne_bytes()));
        assert_eq!(got, want);
    }

    #[test]
    fn new_addr_refusals() {
        let v4 = |label: Option<&str>, nodad| AddrRequest {
            ifindex: 1,
            prefix: "192.0.2.10/24".parse().unwrap(),
            label: label.map(String::from),
            nodad,
        };
        assert!(new_addr(1, &v4(None, true)).is_err(), "NODAD is IPv6 only");
        assert!(new_addr(1, &v4(Some("a-very-long-label"), false)).is_err());
        let mut v6 = v4(Some("eth0"), false);
        v6.prefix = "2001:db8::1/64".parse().unwrap();
        assert!(new_addr(1, &v6).is_err(), "no labels on IPv6");
        assert!("192.0.2.1/33".parse::<IpPrefix>().is_err());
        assert!("2001:db8::1/129".parse::<IpPrefix>().is_err());
        assert!("2001:db8::1".parse::<IpPrefix>().is_err());
        assert_eq!(
            "2001:db8::1/128".parse::<IpPrefix>().unwrap().to_string(),
            "2001:db8::1/128"
        );
    }

    #[test]
    fn del_and_dump_and_link_layouts() {
        let p: IpPrefix = "198.51.100.5/32".parse().unwrap();
        let got = del_addr(9, 4, &p);
        let mut want = hdr(40, RTM_DELADDR, 0x05, 9);
        want.extend_from_slice(&[2, 32, 0, 0]);
        want.extend_from_slice(&4u32.to_ne_bytes());
        want.extend(rta(2, &[198, 51, 100, 5]));
        want.extend(rta(1, &[198, 51, 100, 5]));
        assert_eq!(got, want);

        let mut want = hdr(24, RTM_GETADDR, 0x301, 5);
        want.extend_from_slice(&[0; 8]);
        assert_eq!(get_addr_dump(5, AF_UNSPEC), want);

        let got = get_link_by_name(6, "veth0").unwrap();
        let mut want = hdr(16 + 16 + 12, RTM_GETLINK, 0x01, 6);
        want.extend_from_slice(&[0; 16]);
        want.extend(rta(3, b"veth0\0"));
        assert_eq!(got, want);
        assert!(get_link_by_name(6, "").is_err());
        assert!(get_link_by_name(6, "sixteen-chars-xx").is_err());
        assert!(get_link_by_name(6, "a/b").is_err());

        let got = get_link_by_index(2, 12);
        assert_eq!(got.len(), 32);
        assert_eq!(&got[20..24], &12i32.to_ne_bytes());
    }

    #[test]
    fn parse_ack_error_with_ext_ack_and_capped() {
        // Ack: error 0 + the echoed request header (capped).
        let mut ack = hdr(36, NLMSG_ERROR, NLM_F_CAPPED, 3);
        ack.extend_from_slice(&0i32.to_ne_bytes());
        ack.extend(hdr(24, RTM_NEWADDR, 0x605, 3));
        // Error -EEXIST with an extended-ack message, request capped.
        let msg = rta(NLMSGERR_ATTR_MSG, b"Address already assigned\0");
        let mut err = hdr(
            (16 + 4 + 16 + msg.len()) as u32,
            NLMSG_ERROR,
            NLM_F_CAPPED | NLM_F_ACK_TLVS,
            4,
        );
        err.extend_from_slice(&(-17i32).to_ne_bytes());
        err.extend(hdr(56, RTM_NEWADDR, 0x605, 4));
        err.extend(msg);
        // Error -ENODEV, not capped: the whole request echoed, no TLVs.
        let req = get_link_by_name(5, "nope0").unwrap();
        let mut err2 = hdr((16 + 4 + req.len()) as u32, NLMSG_ERROR, 0, 5);
        err2.extend_from_slice(&(-19i32).to_ne_bytes());
        err2.extend(&req);
        let all = [ack, err, err2].concat();
        let r = parse(&all).unwrap();
        assert_eq!(
            r,
            vec![
                Reply::Ack { seq: 3 },
                Reply::Error {
                    seq: 4,
                    errno: 17,
                    msg: Some("Address already assigned".into())
                },
                Reply::Error {
                    seq: 5,
                    errno: 19,
                    msg: None
                },
            ]
        );
    }

    #[test]
    fn parse_multipart_addr_dump() {
        let mut m1body = vec![2, 24, 0x80, 0];
        m1body.extend_from_slice(&5u32.to_ne_bytes());
        m1body.extend(rta(IFA_ADDRESS, &[192, 0, 2, 10]));
        m1body.extend(rta(IFA_LOCAL, &[192, 0, 2, 10]));
        m1body.extend(rta(IFA_LABEL, b"veth-a\0"));
        m1body.extend(rta(IFA_FLAGS, &0x80u32.to_ne_bytes()));
        let mut m1 = hdr((16 + m1body.len()) as u32, RTM_NEWADDR, NLM_F_MULTI, 8);
        m1.extend(m1body);
        let a: Ipv6Addr = "2001:db8::10".parse().unwrap();
        let mut m2body = vec![10, 64, 0x40, 0];
        m2body.extend_from_slice(&5u32.to_ne_bytes());
        m2body.extend(rta(IFA_ADDRESS, &a.octets()));
        m2body.extend(rta(
            IFA_FLAGS,
            &(IFA_F_TENTATIVE | IFA_F_DADFAILED).to_ne_bytes(),
        ));
        m2body.extend(rta(0x8000 | 99, &[])); // unknown nested attribute: skipped
        let mut m2 = hdr((16 + m2body.len()) as u32, RTM_NEWADDR, NLM_F_MULTI, 8);
        m2.extend(m2body);
        let mut done = hdr(20, NLMSG_DONE, NLM_F_MULTI, 8);
        done.extend_from_slice(&0i32.to_ne_bytes());
        let r = parse(&[m1, m2, done].concat()).unwrap();
        assert_eq!(r.len(), 3);
        let Reply::Addr { info, .. } = &r[0] else {
            panic!("{r:?}")
        };
        assert_eq!(info.prefix.to_string(), "192.0.2.10/24");
        assert_eq!(info.label.as_deref(), Some("veth-a"));
        assert_eq!(info.ifindex, 5);
        assert!(!info.is_tentative());
        let Reply::Addr { info, .. } = &r[1] else {
            panic!("{r:?}")
        };
        assert_eq!(info.prefix.to_string(), "2001:db8::10/64");
        assert!(info.is_tentative() && info.is_dad_failed());
        assert_eq!(r[2], Reply::Done { seq: 8, errno: 0 });
    }

    #[test]
    fn parse_link() {
        let mut body = vec![0, 0];
        body.extend_from_slice(&1u16.to_ne_bytes()); // ARPHRD_ETHER
        body.extend_from_slice(&9i32.to_ne_bytes());
        body.extend_from_slice(&(IFF_UP | IFF_RUNNING | IFF_LOWER_UP).to_ne_bytes());
        body.extend_from_slice(&0u32.to_ne_bytes());
        body.extend(rta(IFLA_IFNAME, b"veth-b\0"));
        body.extend(rta(IFLA_MTU, &1500u32.to_ne_bytes()));
        body.extend(rta(IFLA_OPERSTATE, &[6]));
        body.extend(rta(IFLA_ADDRESS, &[2, 0, 0, 0, 0, 0xb]));
        let mut m = hdr((16 + body.len()) as u32, RTM_NEWLINK, 0, 2);
        m.extend(body);
        let r = parse(&m).unwrap();
        let Reply::Link { info, seq: 2 } = &r[0] else {
            panic!("{r:?}")
        };
        assert_eq!(info.name, "veth-b");
        assert_eq!(info.ifindex, 9);
        assert!(info.is_up() && info.has_carrier());
        assert_eq!(info.mac(), Some([2, 0, 0, 0, 0, 0xb]));
        assert_eq!(info.mtu, Some(1500));
        assert_eq!(info.operstate, Some(6));
    }

    #[test]
    fn parse_rejects_garbage() {
        assert!(
            parse(&hdr(8, NLMSG_DONE, 0, 1)).is_err(),
            "length below header"
        );
        assert!(
            parse(&hdr(400, NLMSG_DONE, 0, 1)).is_err(),
            "length past the buffer"
        );
        let mut m = hdr(24, RTM_NEWADDR, 0, 1);
        m.extend_from_slice(&[2, 24, 0, 0, 1, 0, 0, 0]);
        assert!(parse(&m).is_err(), "address message without an address");
        let mut m = hdr(28, RTM_NEWADDR, 0, 1);
        m.extend_from_slice(&[2, 24, 0, 0, 1, 0, 0, 0]);
        m.extend_from_slice(&[40, 0, 1, 0]); // attribute claims 40 bytes
        assert!(parse(&m).is_err());
        assert_eq!(
            parse(&hdr(16, NLMSG_OVERRUN, 0, 1)),
            Err(ParseError::Overrun)
        );
        assert_eq!(parse(&[]).unwrap(), vec![]);
    }
}

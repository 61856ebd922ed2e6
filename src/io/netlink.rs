//! A NETLINK_ROUTE socket: read links and addresses, add and remove addresses.
//!
//! The messages are built and parsed by [`crate::core::netlink`]; this file only moves bytes.
//! The socket belongs to the network namespace of the thread that opened it
//! ([`RtNetlink::open_in`] opens it inside a given namespace).

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use crate::core::netlink::{
    self as nl, AddrInfo, AddrRequest, BuildError, IpPrefix, LinkInfo, ParseError, Reply,
};
use crate::io::netns::NetNs;

/// How long to wait for the kernel's answer to one request.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// Receive buffer: large enough for any single rtnetlink datagram of a dump (the kernel sizes
/// dump datagrams to at most 32 KiB with the default settings).
const RECV_BUF_BYTES: usize = 64 * 1024;
const SOL_NETLINK: libc::c_int = 270;
const NETLINK_CAP_ACK: libc::c_int = 10;
const NETLINK_EXT_ACK: libc::c_int = 11;

/// Errors of address and link management (netlink, packet sockets, DAD).
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A syscall failed; the `io::Error` keeps the errno.
    #[error("{op}: {source}")]
    Sys {
        op: String,
        #[source]
        source: io::Error,
    },
    /// The kernel refused a netlink request; `source` carries the errno.
    #[error("{op}: {source}{}", .msg.as_ref().map(|m| format!(" ({m})")).unwrap_or_default())]
    Kernel {
        op: String,
        msg: Option<String>,
        #[source]
        source: io::Error,
    },
    #[error("no interface named {ifname}")]
    NoSuchInterface { ifname: String },
    #[error("interface {ifname} is {why}; bring it up before adding addresses")]
    InterfaceDown { ifname: String, why: &'static str },
    #[error("interface {ifname} has no Ethernet address")]
    NoMac { ifname: String },
    /// Another host on the segment answered for the address.
    #[error("{addr} is in use on {ifname} by {}", .mac.as_deref().unwrap_or("another host (MAC unknown)"))]
    AddressInUse {
        addr: IpAddr,
        ifname: String,
        mac: Option<String>,
    },
    #[error("duplicate address detection for {addr} on {ifname} did not finish in {waited_ms} ms")]
    DadTimeout {
        addr: IpAddr,
        ifname: String,
        waited_ms: u64,
    },
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("bad netlink answer: {0}")]
    Parse(#[from] ParseError),
    #[error("netlink: {0}")]
    Protocol(String),
}

impl NetError {
    /// The errno behind a syscall or kernel refusal.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetError::Sys { source, .. } | NetError::Kernel { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
    /// The address is held elsewhere on the segment.
    pub fn is_address_in_use(&self) -> bool {
        matches!(self, NetError::AddressInUse { .. })
    }
    pub fn is_interface_down(&self) -> bool {
        matches!(self, NetError::InterfaceDown { .. })
    }
    pub(crate) fn sys(op: impl Into<String>, source: io::Error) -> NetError {
        NetError::Sys {
            op: op.into(),
            source,
        }
    }
}

/// Options for [`RtNetlink::add_address`].
#[derive(Clone, Debug, Default)]
pub struct AddOptions {
    /// IPv4 address label.
    pub label: Option<String>,
    /// IPv6: skip the kernel's duplicate address detection (IFA_F_NODAD).
    pub nodad: bool,
}

/// A NETLINK_ROUTE socket.
#[derive(Debug)]
pub struct RtNetlink {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl RtNetlink {
    /// Open in the calling thread's network namespace.
    pub fn open() -> Result<RtNetlink, NetError> {
        // SAFETY: plain socket(2) call with constant arguments; the result is checked.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if raw < 0 {
            return Err(NetError::sys(
                "socket(AF_NETLINK)",
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: `raw` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_nl is plain old data; all-zero is valid (pid 0: the kernel assigns).
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: `sa` is a valid sockaddr_nl and the length passed is its size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sa as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(NetError::sys(
                "bind(AF_NETLINK)",
                io::Error::last_os_error(),
            ));
        }
        // Extended acks give the kernel's reason in words; capped acks keep them short. Both
        // are optional: an old kernel without them still works.
        for opt in [NETLINK_EXT_ACK, NETLINK_CAP_ACK] {
            set_int_opt(&fd, SOL_NETLINK, opt, 1).ok();
        }
        let tv = libc::timeval {
            tv_sec: REPLY_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: `tv` is a valid timeval and the length passed is its size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(NetError::sys(
                "setsockopt(SO_RCVTIMEO)",
                io::Error::last_os_error(),
            ));
        }
        Ok(RtNetlink {
            fd,
            seq: 1,
            buf: vec![0; RECV_BUF_BYTES],
        })
    }

    /// Open inside the network namespace `ns`.
    pub fn open_in(ns: &NetNs) -> Result<RtNetlink, NetError> {
        ns.run(RtNetlink::open)
            .map_err(|e| NetError::sys(format!("setns {}", ns.path().display()), e))?
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }

    fn send(&self, msg: &[u8], op: &str) -> Result<(), NetError> {
        // SAFETY: sockaddr_nl is plain old data; all-zero (pid 0) addresses the kernel.
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: `msg` is readable for its length, `sa` is a valid sockaddr_nl of that size.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                &sa as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(NetError::sys(
                format!("{op}: sendto(netlink)"),
                io::Error::last_os_error(),
            ));
        }
        if n as usize != msg.len() {
            return Err(NetError::Protocol(format!("{op}: short send")));
        }
        Ok(())
    }

    fn recv(&mut self, op: &str) -> Result<Vec<Reply>, NetError> {
        loop {
            // SAFETY: `self.buf` is writable for its length for the duration of the call.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    0,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(NetError::sys(format!("{op}: recv(netlink)"), e));
            }
            return Ok(nl::parse(&self.buf[..n as usize])?);
        }
    }

    /// Send `msg` (with sequence number `seq`) and collect the answers to it: for a request
    /// with an ack, up to the ack; for a dump, up to NLMSG_DONE; for a plain get, the first
    /// data message. Messages with other sequence numbers (stale answers) are skipped.
    fn transact(&mut self, seq: u32, msg: &[u8], op: &str) -> Result<Vec<Reply>, NetError> {
        self.send(msg, op)?;
        let mut out = Vec::new();
        loop {
            for r in self.recv(op)? {
                if r.seq() != seq {
                    continue;
                }
                match r {
                    Reply::Ack { .. } => return Ok(out),
                    Reply::Done { errno: 0, .. } => return Ok(out),
                    Reply::Error { errno, msg, .. } => {
                        return Err(NetError::Kernel {
                            op: op.to_string(),
                            msg,
                            source: io::Error::from_raw_os_error(errno),
                        })
                    }
                    Reply::Done { errno, .. } => {
                        return Err(NetError::Kernel {
                            op: op.to_string(),
                            msg: None,
                            source: io::Error::from_raw_os_error(errno),
                        })
                    }
                    Reply::Link { .. } => {
                        out.push(r);
                        return Ok(out);
                    }
                    Reply::Addr { .. } | Reply::Other { .. } => out.push(r),
                }
            }
        }
    }

    /// The link named `ifname`, or `None` if there is none.
    pub fn link_state(&mut self, ifname: &str) -> Result<Option<LinkInfo>, NetError> {
        let seq = self.next_seq();
        let msg = nl::get_link_by_name(seq, ifname)?;
        match self.transact(seq, &msg, &format!("get link {ifname}")) {
            Ok(rs) => Ok(rs.into_iter().find_map(|r| match r {
                Reply::Link { info, .. } => Some(info),
                _ => None,
            })),
            Err(e) if e.errno() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The link named `ifname`; [`NetError::NoSuchInterface`] if there is none.
    pub fn link(&mut self, ifname: &str) -> Result<LinkInfo, NetError> {
        self.link_state(ifname)?
            .ok_or_else(|| NetError::NoSuchInterface {
                ifname: ifname.into(),
            })
    }

    /// Every address on `ifname` (both families).
    pub fn list_addresses(&mut self, ifname: &str) -> Result<Vec<AddrInfo>, NetError> {
        let index = self.link(ifname)?.ifindex;
        self.list_addresses_index(index)
    }

    /// Every address on the interface with index `ifindex`.
    pub fn list_addresses_index(&mut self, ifindex: u32) -> Result<Vec<AddrInfo>, NetError> {
        let seq = self.next_seq();
        let msg = nl::get_addr_dump(seq, nl::AF_UNSPEC);
        let rs = self.transact(seq, &msg, "dump addresses")?;
        Ok(rs
            .into_iter()
            .filter_map(|r| match r {
                Reply::Addr { info, .. } if info.ifindex == ifindex => Some(info),
                _ => None,
            })
            .collect())
    }

    /// Add `prefix` to `ifname`. Refuses with [`NetError::InterfaceDown`] unless the interface
    /// is administratively up and has carrier; EEXIST from the kernel if already present.
    pub fn add_address(
        &mut self,
        ifname: &str,
        prefix: &IpPrefix,
        opts: &AddOptions,
    ) -> Result<(), NetError> {
        let link = self.link(ifname)?;
        check_usable(&link)?;
        let seq = self.next_seq();
        let req = AddrRequest {
            ifindex: link.ifindex,
            prefix: *prefix,
            label: opts.label.clone(),
            nodad: opts.nodad,
        };
        let msg = nl::new_addr(seq, &req)?;
        self.transact(seq, &msg, &format!("add {prefix} to {ifname}"))?;
        Ok(())
    }

    /// Remove `prefix` from `ifname`. Returns false if it was not there (EADDRNOTAVAIL).
    pub fn remove_address(&mut self, ifname: &str, prefix: &IpPrefix) -> Result<bool, NetError> {
        let index = self.link(ifname)?.ifindex;
        let seq = self.next_seq();
        let msg = nl::del_addr(seq, index, prefix);
        match self.transact(seq, &msg, &format!("remove {prefix} from {ifname}")) {
            Ok(_) => Ok(true),
            Err(e) if e.errno() == Some(libc::EADDRNOTAVAIL) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Refuse links that cannot carry a service address: administratively down, or no carrier.
pub fn check_usable(link: &LinkInfo) -> Result<(), NetError> {
    if !link.is_up() {
        return Err(NetError::InterfaceDown {
            ifname: link.name.clone(),
            why: "down",
        });
    }
    if !link.has_carrier() {
        return Err(NetError::InterfaceDown {
            ifname: link.name.clone(),
            why: "up but has no carrier",
        });
    }
    Ok(())
}

fn set_int_opt(
    fd: &OwnedFd,
    level: libc::c_int,
    opt: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `v` is a valid c_int and the length passed is its size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

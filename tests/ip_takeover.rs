//! Identity takeover on a real kernel: three network namespaces (node a, node b, a client)
//! joined by a bridge that lives in a fourth namespace, all made by the test with `ip` and all
//! deleted again by a Drop guard (also when a test fails). Nothing touches the host's own
//! network namespace; only documentation addresses are used.
//!
//! Client sysctls: none are changed. Linux replaces the MAC of an *existing* neighbour entry on
//! a gratuitous ARP (sender IP = target IP, a unicast address of the segment) at once, without
//! waiting out `locktime` (net/ipv4/arp.c: `override = ... || is_garp`); `arp_accept` only
//! decides whether such a frame may *create* an entry, and the client here already has one. For
//! IPv6, an unsolicited NA with the override flag replaces the link-layer address of an existing
//! entry (RFC 4861 7.2.5; `accept_untracked_na` only concerns creating entries). So the defaults
//! a real client has are what these tests run against.
//!
//! Run: `cargo test --test ip_takeover` as root.

mod common;

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use hapair::core::netlink::IpPrefix;
use hapair::daemon::identity::{IdentityConfig, IdentityManager, ServiceAddr};
use hapair::io::netlink::{AddOptions, NetError, RtNetlink};
use hapair::io::netns::NetNs;

const MAC_A: &str = "02:00:00:00:00:0a";
const MAC_B: &str = "02:00:00:00:00:0b";
const MAC_C: &str = "02:00:00:00:00:0c";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Run `ip ARGS`, panicking with its stderr if it fails.
fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The namespaces of one test; all deleted on drop (the veths and the bridge go with them).
struct Topo {
    br: String,
    a: String,
    b: String,
    c: String,
    made: Vec<String>,
}

impl Topo {
    fn new() -> Topo {
        common::require_root();
        common::require_tool("ip");
        let id = format!(
            "hpt{}n{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let mut t = Topo {
            br: format!("{id}-br"),
            a: format!("{id}-a"),
            b: format!("{id}-b"),
            c: format!("{id}-c"),
            made: Vec::new(),
        };
        for ns in [t.br.clone(), t.a.clone(), t.b.clone(), t.c.clone()] {
            ip(&["netns", "add", &ns]);
            t.made.push(ns);
        }
        let br = t.br.clone();
        // No multicast snooping: IPv6 DAD and NA multicast must reach every port at once,
        // without waiting for MLD state. No STP: ports forward immediately.
        ip(&[
            "-n",
            &br,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ]);
        ip(&["-n", &br, "link", "set", "br0", "up"]);
        for (node, port, mac, v4, v6) in [
            (t.a.clone(), "p-a", MAC_A, "192.0.2.1/24", "2001:db8::1/64"),
            (t.b.clone(), "p-b", MAC_B, "192.0.2.2/24", "2001:db8::2/64"),
            (t.c.clone(), "p-c", MAC_C, "192.0.2.3/24", "2001:db8::3/64"),
        ] {
            ip(&[
                "-n", &br, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns",
                &node,
            ]);
            ip(&["-n", &br, "link", "set", port, "master", "br0", "up"]);
            ip(&["-n", &node, "link", "set", "eth0", "address", mac]);
            ip(&["-n", &node, "link", "set", "lo", "up"]);
            ip(&["-n", &node, "link", "set", "eth0", "up"]);
            ip(&["-n", &node, "addr", "add", v4, "dev", "eth0"]);
            ip(&["-n", &node, "addr", "add", v6, "dev", "eth0", "nodad"]);
        }
        t
    }

    fn names(&self) -> Vec<String> {
        self.made.clone()
    }
}

impl Drop for Topo {
    fn drop(&mut self) {
        for ns in self.made.iter().rev() {
            let out = Command::new("ip").args(["netns", "del", ns]).output();
            match out {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!(
                    "cleanup: ip netns del {ns}: {}",
                    String::from_utf8_lossy(&o.stderr)
                ),
                Err(e) => eprintln!("cleanup: ip netns del {ns}: {e}"),
            }
        }
    }
}

fn fast_cfg() -> IdentityConfig {
    IdentityConfig {
        announce_count: 3,
        announce_interval_ms: 100,
        ..IdentityConfig::default()
    }
}

fn manager(ns: &str) -> IdentityManager {
    IdentityManager::new_in(NetNs::by_name(ns).unwrap(), fast_cfg()).unwrap()
}

/// The client's neighbour entry for `addr` on eth0: (lladdr, state).
fn neigh(ns: &str, addr: IpAddr) -> Option<(String, String)> {
    let out = ip(&[
        "-n",
        ns,
        "neigh",
        "show",
        "to",
        &addr.to_string(),
        "dev",
        "eth0",
    ]);
    let words: Vec<&str> = out.split_whitespace().collect();
    let i = words.iter().position(|w| *w == "lladdr")?;
    Some((words.get(i + 1)?.to_string(), words.last()?.to_string()))
}

/// Poll the neighbour entry until it names `mac`; returns how long that took.
fn wait_neigh(ns: &str, addr: IpAddr, mac: &str, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let e = neigh(ns, addr);
        if e.as_ref().map(|(m, _)| m == mac).unwrap_or(false) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "{ns}: neighbour entry for {addr} is {e:?}, wanted {mac} within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Send one UDP datagram from the client to `addr`: the client resolves the address (ARP or
/// NS) and so gets a neighbour entry for it.
fn poke(ns: &str, addr: IpAddr) {
    NetNs::by_name(ns)
        .unwrap()
        .run(|| {
            let bind: SocketAddr = if addr.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            }
            .parse()
            .unwrap();
            let s = UdpSocket::bind(bind).unwrap();
            s.send_to(b"hello", SocketAddr::new(addr, 9)).unwrap();
        })
        .unwrap();
}

/// A TCP connection from the client to `addr` is accepted in namespace `server`.
fn assert_tcp_reaches(client: &str, server: &str, addr: IpAddr) {
    let l = NetNs::by_name(server)
        .unwrap()
        .run(|| TcpListener::bind(SocketAddr::new(addr, 0)))
        .unwrap()
        .unwrap_or_else(|e| panic!("{server}: bind {addr}: {e}"));
    let target = l.local_addr().unwrap();
    let s = NetNs::by_name(client)
        .unwrap()
        .run(|| TcpStream::connect_timeout(&target, Duration::from_secs(3)))
        .unwrap()
        .unwrap_or_else(|e| panic!("{client}: connect {target}: {e}"));
    l.set_nonblocking(false).unwrap();
    let (_conn, peer) = l.accept().unwrap();
    assert_eq!(peer, s.local_addr().unwrap());
}

/// Addresses on eth0 of `ns` according to `ip -j`: ("addr/len", label).
fn kernel_addrs(ns: &str) -> Vec<(String, Option<String>)> {
    let out = ip(&["-n", ns, "-j", "addr", "show", "dev", "eth0"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut res = Vec::new();
    for i in v[0]["addr_info"].as_array().unwrap() {
        res.push((
            format!("{}/{}", i["local"].as_str().unwrap(), i["prefixlen"]),
            i["label"].as_str().map(String::from),
        ));
    }
    res
}

fn kernel_has(ns: &str, prefix: &str) -> bool {
    kernel_addrs(ns).iter().any(|(a, _)| a == prefix)
}

fn svc(p: &str) -> ServiceAddr {
    ServiceAddr::new("eth0", p.parse::<IpPrefix>().unwrap())
}

/// The common takeover flow for one service address.
fn takeover_flow(t: &Topo, s: ServiceAddr) {
    let addr = s.prefix.addr;
    let mut ma = manager(&t.a);
    let mut mb = manager(&t.b);

    // a takes the address.
    let r = ma.take(std::slice::from_ref(&s)).unwrap();
    assert_eq!(r.len(), 1);
    assert!(!r[0].already_held);
    let per_round = if addr.is_ipv4() { 2 } else { 1 };
    assert_eq!(r[0].announcements_sent, 3 * per_round);
    if addr.is_ipv4() {
        assert!(
            r[0].probe >= Duration::from_millis(300),
            "3 probes: {:?}",
            r[0].probe
        );
    } else {
        assert!(r[0].dad > Duration::ZERO, "IPv6 waits for the kernel's DAD");
    }
    eprintln!("a take: {:?}", r[0]);
    assert!(
        kernel_has(&t.a, &s.prefix.to_string()),
        "{:?}",
        kernel_addrs(&t.a)
    );
    // Taking again is idempotent: nothing re-added, announced again.
    let again = ma.take(std::slice::from_ref(&s)).unwrap();
    assert!(again[0].already_held);
    assert_eq!(
        kernel_addrs(&t.a)
            .iter()
            .filter(|(a, _)| *a == s.prefix.to_string())
            .count(),
        1
    );

    // The client talks to the address and so learns a's MAC.
    poke(&t.c, addr);
    wait_neigh(&t.c, addr, MAC_A, Duration::from_secs(3));
    assert_tcp_reaches(&t.c, &t.a, addr);
    eprintln!("client entry before takeover: {:?}", neigh(&t.c, addr));

    // Move: a releases, b takes without announcing. The client has no reason to ask again,
    // so its entry still points at a: only an announcement can move it.
    let rel = ma.release(std::slice::from_ref(&s)).unwrap();
    assert!(rel[0].was_held);
    assert!(!kernel_has(&t.a, &s.prefix.to_string()));
    assert!(
        !ma.release(std::slice::from_ref(&s)).unwrap()[0].was_held,
        "release is idempotent"
    );
    mb.config_mut().announce_count = 0;
    let rb = mb.take(std::slice::from_ref(&s)).unwrap();
    assert!(!rb[0].already_held);
    assert_eq!(rb[0].announcements_sent, 0);
    assert!(kernel_has(&t.b, &s.prefix.to_string()));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        neigh(&t.c, addr).unwrap().0,
        MAC_A,
        "without an announcement the client stays"
    );

    // b announces (take again: already held, so only the announcement happens).
    // A watcher polls the client's entry while the take runs, to time the move itself.
    mb.config_mut().announce_count = 3;
    let client = t.c.clone();
    let watcher =
        std::thread::spawn(move || wait_neigh(&client, addr, MAC_B, Duration::from_secs(1)));
    let start = Instant::now();
    let rb = mb.take(std::slice::from_ref(&s)).unwrap();
    let take_took = start.elapsed();
    assert!(rb[0].already_held);
    assert_eq!(rb[0].announcements_sent, 3 * per_round);
    let moved = watcher
        .join()
        .expect("client entry did not move to b within 1 s");
    eprintln!(
        "client entry moved to b {moved:?} after the announcing take began (take: {take_took:?}): {:?}",
        neigh(&t.c, addr)
    );
    assert!(moved < Duration::from_secs(1));
    assert_tcp_reaches(&t.c, &t.b, addr);
}

#[test]
fn ipv4_service_ip_moves_and_client_follows_gratuitous_arp() {
    let t = Topo::new();
    let mut s = svc("192.0.2.10/24");
    s.label = Some("eth0:svc".into());
    takeover_flow(&t, s);
    // The label reached the kernel (checked on b, which holds the address now).
    assert!(kernel_addrs(&t.b)
        .iter()
        .any(|(a, l)| a == "192.0.2.10/24" && l.as_deref() == Some("eth0:svc")));
}

#[test]
fn ipv6_service_ip_moves_and_client_follows_unsolicited_na() {
    let t = Topo::new();
    takeover_flow(&t, svc("2001:db8::10/64"));
}

#[test]
fn dad_refuses_an_address_the_partner_holds() {
    let t = Topo::new();
    let mut ma = manager(&t.a);
    let mut mb = manager(&t.b);
    let v4 = svc("192.0.2.10/24");
    let v6 = svc("2001:db8::10/64");
    ma.take(&[v4.clone(), v6.clone()]).unwrap();

    let e = mb.take(std::slice::from_ref(&v4)).unwrap_err();
    assert!(e.is_address_in_use(), "{e}");
    assert_eq!(
        e.to_string(),
        format!("192.0.2.10 is in use on eth0 by {MAC_A}")
    );
    assert!(!kernel_has(&t.b, "192.0.2.10/24"));

    let e = mb.take(std::slice::from_ref(&v6)).unwrap_err();
    assert!(e.is_address_in_use(), "{e}");
    eprintln!("IPv6 refusal: {e}");
    assert_eq!(
        e.to_string(),
        format!("2001:db8::10 is in use on eth0 by {MAC_A}")
    );
    // The kernel keeps a DAD-failed address around; take removes it again.
    assert!(!kernel_addrs(&t.b)
        .iter()
        .any(|(a, _)| a.starts_with("2001:db8::10/")));

    // All or nothing: a free address taken in the same call is rolled back.
    let free = svc("198.51.100.20/24");
    let e = mb.take(&[free.clone(), v4.clone()]).unwrap_err();
    assert!(e.is_address_in_use(), "{e}");
    assert!(
        !kernel_has(&t.b, "198.51.100.20/24"),
        "{:?}",
        kernel_addrs(&t.b)
    );

    // a was not disturbed.
    assert!(kernel_has(&t.a, "192.0.2.10/24") && kernel_has(&t.a, "2001:db8::10/64"));
    poke(&t.c, "192.0.2.10".parse().unwrap());
    wait_neigh(
        &t.c,
        "192.0.2.10".parse().unwrap(),
        MAC_A,
        Duration::from_secs(3),
    );
    assert_tcp_reaches(&t.c, &t.a, "2001:db8::10".parse().unwrap());

    // Once a releases, b takes both.
    ma.release(&[v4.clone(), v6.clone()]).unwrap();
    mb.take(&[v4, v6]).unwrap();
    assert!(kernel_has(&t.b, "192.0.2.10/24") && kernel_has(&t.b, "2001:db8::10/64"));
}

#[test]
fn refuses_an_interface_that_is_down_or_has_no_carrier() {
    let t = Topo::new();
    let mut mb = manager(&t.b);
    let s = svc("192.0.2.10/24");
    let mut nl = RtNetlink::open_in(&NetNs::by_name(&t.b).unwrap()).unwrap();

    ip(&["-n", &t.b, "link", "set", "eth0", "down"]);
    let e = mb.take(std::slice::from_ref(&s)).unwrap_err();
    assert!(e.is_interface_down(), "{e}");
    assert_eq!(
        e.to_string(),
        "interface eth0 is down; bring it up before adding addresses"
    );
    let e = nl
        .add_address("eth0", &s.prefix, &AddOptions::default())
        .unwrap_err();
    assert!(e.is_interface_down(), "{e}");
    assert!(!kernel_has(&t.b, "192.0.2.10/24"));

    ip(&["-n", &t.b, "link", "set", "eth0", "up"]);
    ip(&["-n", &t.br, "link", "set", "p-b", "down"]);
    let e = mb.take(std::slice::from_ref(&s)).unwrap_err();
    assert!(e.to_string().contains("has no carrier"), "{e}");

    ip(&["-n", &t.br, "link", "set", "p-b", "up"]);
    mb.take(&[s]).unwrap();
    assert!(kernel_has(&t.b, "192.0.2.10/24"));

    let e = mb
        .take(&[ServiceAddr::new("nope0", "192.0.2.11/24".parse().unwrap())])
        .unwrap_err();
    assert!(matches!(e, NetError::NoSuchInterface { .. }), "{e}");
}

#[test]
fn netlink_agrees_with_the_kernel() {
    let t = Topo::new();
    let mut nl = RtNetlink::open_in(&NetNs::by_name(&t.a).unwrap()).unwrap();

    let link = nl.link_state("eth0").unwrap().expect("eth0 exists");
    assert_eq!(link.name, "eth0");
    assert!(link.is_up() && link.has_carrier());
    assert_eq!(hapair::core::arp::fmt_mac(&link.mac().unwrap()), MAC_A);
    let j: serde_json::Value =
        serde_json::from_str(&ip(&["-n", &t.a, "-j", "link", "show", "dev", "eth0"])).unwrap();
    assert_eq!(j[0]["ifindex"].as_u64().unwrap(), link.ifindex as u64);
    assert_eq!(j[0]["mtu"].as_u64().unwrap(), link.mtu.unwrap() as u64);
    assert!(nl.link_state("nope0").unwrap().is_none());
    assert!(matches!(
        nl.list_addresses("nope0"),
        Err(NetError::NoSuchInterface { .. })
    ));

    let v4: IpPrefix = "203.0.113.5/28".parse().unwrap();
    let v6: IpPrefix = "2001:db8:1::5/96".parse().unwrap();
    nl.add_address(
        "eth0",
        &v4,
        &AddOptions {
            label: Some("eth0:x".into()),
            nodad: false,
        },
    )
    .unwrap();
    nl.add_address(
        "eth0",
        &v6,
        &AddOptions {
            label: None,
            nodad: true,
        },
    )
    .unwrap();

    // Our list equals the kernel's (as ip shows it), addresses and prefix lengths.
    let mut ours: Vec<String> = nl
        .list_addresses("eth0")
        .unwrap()
        .iter()
        .map(|a| a.prefix.to_string())
        .collect();
    let mut theirs: Vec<String> = kernel_addrs(&t.a).into_iter().map(|(a, _)| a).collect();
    ours.sort();
    theirs.sort();
    assert_eq!(ours, theirs);
    assert!(
        ours.contains(&"203.0.113.5/28".to_string())
            && ours.contains(&"2001:db8:1::5/96".to_string())
    );
    assert!(kernel_addrs(&t.a).contains(&("203.0.113.5/28".into(), Some("eth0:x".into()))));
    let a6 = nl
        .list_addresses("eth0")
        .unwrap()
        .into_iter()
        .find(|a| a.prefix == v6)
        .unwrap();
    assert!(!a6.is_tentative(), "added with NODAD: usable at once");

    // The kernel's refusals keep their errno.
    let e = nl
        .add_address("eth0", &v4, &AddOptions::default())
        .unwrap_err();
    assert_eq!(e.errno(), Some(libc::EEXIST), "{e}");
    assert!(nl.remove_address("eth0", &v4).unwrap());
    assert!(
        !nl.remove_address("eth0", &v4).unwrap(),
        "absent: false, not an error"
    );
    assert!(nl.remove_address("eth0", &v6).unwrap());
    assert!(!kernel_has(&t.a, "203.0.113.5/28") && !kernel_has(&t.a, "2001:db8:1::5/96"));
}

#[test]
fn namespaces_are_deleted_when_a_test_fails() {
    let mut names = Vec::new();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let t = Topo::new();
        names = t.names();
        assert!(ip(&["netns", "list"]).contains(&t.a));
        panic!("simulated test failure");
    }));
    assert!(r.is_err());
    assert_eq!(names.len(), 4);
    let list = ip(&["netns", "list"]);
    for n in names {
        assert!(!list.contains(&n), "{n} left behind: {list}");
    }
}

/// `ip -j` entry on eth0 of `ns` for `addr` (any prefix length, any flags), if there is one.
fn kernel_entry(ns: &str, addr: &str) -> Option<serde_json::Value> {
    let out = ip(&["-n", ns, "-j", "addr", "show", "dev", "eth0"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0]["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["local"].as_str() == Some(addr))
        .cloned()
}

fn fenced_cfg(override_ms: u64) -> IdentityConfig {
    IdentityConfig {
        conflict_override_ms: override_ms,
        ..fast_cfg()
    }
}

/// The partner (namespace a) was fenced but still has its service address configured (its
/// release failed, or its daemon died on a live host) and its kernel keeps answering ARP for
/// it. The strict take refuses, as it must without a fence; the fenced take probes, keeps
/// probing until `conflict_override_ms`, then takes the address, announces it so the client
/// moves to b, and reports the holder's MAC.
#[test]
fn fenced_take_overrides_a_holder_that_keeps_answering_arp() {
    let t = Topo::new();
    let s = svc("192.0.2.10/24");
    let addr = s.prefix.addr;
    ip(&["-n", &t.a, "addr", "add", "192.0.2.10/24", "dev", "eth0"]);
    poke(&t.c, addr);
    wait_neigh(&t.c, addr, MAC_A, Duration::from_secs(3));

    let override_ms = 1000;
    let mut mb =
        IdentityManager::new_in(NetNs::by_name(&t.b).unwrap(), fenced_cfg(override_ms)).unwrap();
    // Strict: refused, nothing left behind, the client still goes to a.
    let e = mb.take(std::slice::from_ref(&s)).unwrap_err();
    assert!(e.is_address_in_use(), "{e}");
    assert_eq!(
        e.to_string(),
        format!("192.0.2.10 is in use on eth0 by {MAC_A}")
    );
    assert!(kernel_entry(&t.b, "192.0.2.10").is_none());
    assert_eq!(neigh(&t.c, addr).unwrap().0, MAC_A);

    // Fenced: taken after the bound, despite a still answering.
    let start = Instant::now();
    let r = mb.take_fenced(std::slice::from_ref(&s)).unwrap();
    let took = start.elapsed();
    eprintln!("fenced take: {took:?} {:?}", r[0]);
    assert_eq!(r.len(), 1);
    assert!(!r[0].already_held);
    let c = r[0]
        .took_over_conflict
        .as_ref()
        .expect("the report names the overridden conflict");
    assert_eq!(
        c.holder_mac
            .map(|m| hapair::core::arp::fmt_mac(&m))
            .as_deref(),
        Some(MAC_A)
    );
    assert!(c.attempts >= 2, "kept probing while a answered: {c:?}");
    assert!(
        took >= Duration::from_millis(override_ms),
        "waited for the holder to go: {took:?}"
    );
    assert!(
        took < Duration::from_millis(override_ms + 2000),
        "bounded: {took:?}"
    );
    assert_eq!(r[0].announcements_sent, 3 * 2);
    assert!(
        kernel_has(&t.b, "192.0.2.10/24"),
        "{:?}",
        kernel_addrs(&t.b)
    );
    assert!(
        kernel_has(&t.a, "192.0.2.10/24"),
        "a still holds it (the model)"
    );
    // The gratuitous ARP moved the client's entry to b, and its connections land there.
    wait_neigh(&t.c, addr, MAC_B, Duration::from_millis(500));
    assert_tcp_reaches(&t.c, &t.b, addr);

    // Idempotent: taking again only announces.
    let again = mb.take_fenced(std::slice::from_ref(&s)).unwrap();
    assert!(again[0].already_held && again[0].took_over_conflict.is_none());
}

/// A partner that releases its address while the fenced take is probing: the take waits for
/// it rather than overriding, and reports no conflict.
#[test]
fn fenced_take_waits_for_a_holder_that_releases() {
    let t = Topo::new();
    let s = svc("192.0.2.10/24");
    ip(&["-n", &t.a, "addr", "add", "192.0.2.10/24", "dev", "eth0"]);
    let mut mb = IdentityManager::new_in(NetNs::by_name(&t.b).unwrap(), fenced_cfg(5000)).unwrap();
    let ns_a = t.a.clone();
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(400));
        ip(&["-n", &ns_a, "addr", "del", "192.0.2.10/24", "dev", "eth0"]);
    });
    let start = Instant::now();
    let r = mb.take_fenced(std::slice::from_ref(&s)).unwrap();
    let took = start.elapsed();
    releaser.join().unwrap();
    eprintln!("fenced take with a releasing holder: {took:?} {:?}", r[0]);
    assert!(r[0].took_over_conflict.is_none(), "{:?}", r[0]);
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_millis(3000),
        "waited for the release, not for the bound: {took:?}"
    );
    assert!(kernel_has(&t.b, "192.0.2.10/24"));
}

/// IPv6: a holds the address. A strict take fails DAD and leaves no trace of the address on
/// b (the kernel keeps a DAD-failed address configured until it is removed). A fenced take
/// re-runs DAD until the bound, then adds the address without DAD: configured, neither
/// tentative nor DAD-failed, announced so the client moves to b, the holder's MAC reported.
#[test]
fn ipv6_dad_failure_is_rolled_back_and_fenced_take_overrides() {
    let t = Topo::new();
    let s = svc("2001:db8::10/64");
    let addr = s.prefix.addr;
    ip(&[
        "-n",
        &t.a,
        "addr",
        "add",
        "2001:db8::10/64",
        "dev",
        "eth0",
        "nodad",
    ]);
    poke(&t.c, addr);
    wait_neigh(&t.c, addr, MAC_A, Duration::from_secs(3));

    let override_ms = 1000;
    let mut mb =
        IdentityManager::new_in(NetNs::by_name(&t.b).unwrap(), fenced_cfg(override_ms)).unwrap();
    let e = mb.take(std::slice::from_ref(&s)).unwrap_err();
    assert!(e.is_address_in_use(), "{e}");
    assert_eq!(
        e.to_string(),
        format!("2001:db8::10 is in use on eth0 by {MAC_A}")
    );
    assert_eq!(kernel_entry(&t.b, "2001:db8::10"), None, "ip -6 addr on b");
    assert!(!mb
        .netlink()
        .list_addresses("eth0")
        .unwrap()
        .iter()
        .any(|i| i.prefix.addr == addr));

    let start = Instant::now();
    let r = mb.take_fenced(std::slice::from_ref(&s)).unwrap();
    let took = start.elapsed();
    eprintln!("fenced IPv6 take: {took:?} {:?}", r[0]);
    let c = r[0]
        .took_over_conflict
        .as_ref()
        .expect("the report names the overridden conflict");
    assert_eq!(
        c.holder_mac
            .map(|m| hapair::core::arp::fmt_mac(&m))
            .as_deref(),
        Some(MAC_A)
    );
    assert!(took >= Duration::from_millis(override_ms), "{took:?}");
    assert!(took < Duration::from_millis(override_ms + 3000), "{took:?}");
    let info = mb
        .netlink()
        .list_addresses("eth0")
        .unwrap()
        .into_iter()
        .find(|i| i.prefix.addr == addr)
        .expect("the address is configured on b");
    assert!(
        !info.is_tentative() && !info.is_dad_failed(),
        "flags {:#x}",
        info.flags
    );
    let j = kernel_entry(&t.b, "2001:db8::10").expect("ip -6 addr shows it on b");
    assert_eq!(j["prefixlen"], 64);
    assert!(
        j.get("tentative").is_none() && j.get("dadfailed").is_none(),
        "{j}"
    );
    // The unsolicited NA moved the client's entry, and its connections land on b.
    wait_neigh(&t.c, addr, MAC_B, Duration::from_millis(500));
    assert_tcp_reaches(&t.c, &t.b, addr);
}

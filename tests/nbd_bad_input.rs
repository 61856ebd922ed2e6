//! Bad input against the NBD server, from a raw client: each gets the reply the protocol
//! prescribes (or the connection is closed), and other clients keep being served.

#[path = "nbd_common/mod.rs"]
mod common;

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use hapair::core::nbd::*;
use hapair::daemon::nbd_server::{Export, NbdServer, ServerConfig};

const SIZE: u64 = 8 << 20;
const MAX: u32 = 1 << 20;

fn server_with(cfg: ServerConfig, read_only: bool) -> (NbdServer, Arc<FileBackend>) {
    let b = Arc::new(FileBackend::new(SIZE, sizes(512, 4096, MAX)));
    let cfg = ServerConfig {
        tcp: Some("127.0.0.1:0".parse().unwrap()),
        workers: 2,
        ..cfg
    };
    let exports = vec![
        Export {
            name: "disk".into(),
            description: "test disk".into(),
            backend: b.clone(),
            read_only,
        },
        Export {
            name: "other".into(),
            description: String::new(),
            backend: Arc::new(FileBackend::new(1 << 20, sizes(4096, 4096, MAX))),
            read_only: true,
        },
    ];
    (NbdServer::start(cfg, exports).unwrap(), b)
}

fn server() -> (NbdServer, Arc<FileBackend>) {
    server_with(ServerConfig::default(), false)
}

/// A TCP server with `workers` workers exporting `backend` alone, as "disk".
fn serve_disk(backend: Arc<dyn hapair::daemon::backend::Backend>, workers: usize) -> NbdServer {
    let cfg = ServerConfig {
        tcp: Some("127.0.0.1:0".parse().unwrap()),
        workers,
        ..ServerConfig::default()
    };
    let exports = vec![Export {
        name: "disk".into(),
        description: String::new(),
        backend,
        read_only: false,
    }];
    NbdServer::start(cfg, exports).unwrap()
}

/// A client on "disk" that did not agree on block sizes (NBD_OPT_GO asking for none).
fn unagreed_client(addr: std::net::SocketAddr) -> RawClient {
    let mut c = RawClient::connect(addr);
    c.greet(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES);
    let (_, fin) = c.info(OPT_GO, "disk", &[]);
    assert_eq!(fin, REP_ACK);
    c
}

/// A good client on a fresh connection: write, read back, compare.
fn good_client_works(srv: &NbdServer, seed: u64) {
    let (mut c, size, _) = RawClient::open(srv.local_addr().unwrap(), "disk", true);
    assert_eq!(size, SIZE);
    let data = random_bytes(8192, seed);
    let off = 4096 * (seed % 100);
    c.request(CMD_WRITE, CMD_FLAG_FUA, 1, off, 8192, &data);
    assert_eq!(c.simple(), (0, 1));
    c.request(CMD_READ, 0, 2, off, 8192, &[]);
    let ch = c.chunk();
    assert_eq!(
        (ch.flags, ch.ty, ch.handle),
        (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 2)
    );
    assert_eq!(be64(&ch.payload[0..8]), off);
    assert_eq!(&ch.payload[8..], &data[..]);
    c.request(CMD_DISC, 0, 3, 0, 0, &[]);
    assert!(c.closed());
}

#[test]
fn handshake_violations_close_the_connection() {
    let (srv, _b) = server();
    let addr = srv.local_addr().unwrap();

    // Unknown client flags: the server must drop the connection.
    let mut c = RawClient::connect(addr);
    c.greet(0x8000_0001);
    assert!(c.closed());

    // Option with a wrong magic.
    let mut c = RawClient::connect(addr);
    c.greet(CLIENT_FLAG_FIXED_NEWSTYLE);
    c.send(b"IHAVEOPX\0\0\0\x03\0\0\0\0");
    assert!(c.closed());

    // NBD_OPT_EXPORT_NAME of an unknown export cannot be answered with an error: close.
    let mut c = RawClient::connect(addr);
    c.greet(CLIENT_FLAG_FIXED_NEWSTYLE);
    c.send_option(OPT_EXPORT_NAME, b"nope");
    assert!(c.closed());

    // Client vanishing in the middle of an option.
    let mut c = RawClient::connect(addr);
    c.greet(CLIENT_FLAG_FIXED_NEWSTYLE);
    c.send(b"IHAVEOPT\0\0\0\x07\0\0\0\x40abc");
    drop(c);

    // Option data over the limit is skipped and refused with TOO_BIG, then haggling goes on.
    let mut c = RawClient::connect(addr);
    c.greet(CLIENT_FLAG_FIXED_NEWSTYLE);
    c.send_option(OPT_LIST, &vec![0u8; 100 << 10]);
    let (o, ty, _) = c.option_reply();
    assert_eq!((o, ty), (OPT_LIST, REP_ERR_TOO_BIG));
    c.send_option(OPT_LIST, &[]);
    assert_eq!(c.option_reply().1, REP_SERVER);

    good_client_works(&srv, 1);
    assert!(srv.stats().protocol_errors >= 3, "{:?}", srv.stats());
}

#[test]
fn options_are_answered_per_spec() {
    let (srv, _b) = server();
    let addr = srv.local_addr().unwrap();
    let mut c = RawClient::connect(addr);
    c.greet(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES);

    for opt in [OPT_STARTTLS, OPT_EXTENDED_HEADERS, OPT_PEEK_EXPORT, 12345] {
        c.send_option(opt, &[]);
        let (o, ty, msg) = c.option_reply();
        assert_eq!((o, ty), (opt, REP_ERR_UNSUP), "option {opt}");
        assert!(!msg.is_empty());
    }
    // LIST must not carry data.
    c.send_option(OPT_LIST, b"x");
    assert_eq!(c.option_reply().1, REP_ERR_INVALID);
    // LIST: one SERVER per export, then ACK.
    c.send_option(OPT_LIST, &[]);
    let (_, ty, d) = c.option_reply();
    assert_eq!(ty, REP_SERVER);
    assert_eq!(be32(&d[0..4]), 4);
    assert_eq!(&d[4..], b"disktest disk");
    let (_, ty, d) = c.option_reply();
    assert_eq!((ty, &d[4..]), (REP_SERVER, &b"other"[..]));
    assert_eq!(c.option_reply(), (OPT_LIST, REP_ACK, vec![]));

    // Malformed INFO (name length past the data).
    c.send_option(OPT_INFO, &[0, 0, 0, 50, b'a']);
    assert_eq!(c.option_reply().1, REP_ERR_INVALID);
    // Unknown export.
    let (infos, fin) = c.info(OPT_INFO, "missing", &[]);
    assert!(infos.is_empty());
    assert_eq!(fin, REP_ERR_UNKNOWN);
    // Meta contexts need structured replies first.
    let mut q = 4u32.to_be_bytes().to_vec();
    q.extend_from_slice(b"disk");
    q.extend_from_slice(&1u32.to_be_bytes());
    q.extend_from_slice(&15u32.to_be_bytes());
    q.extend_from_slice(b"base:allocation");
    c.send_option(OPT_SET_META_CONTEXT, &q);
    assert_eq!(c.option_reply().1, REP_ERR_INVALID);
    c.send_option(OPT_STRUCTURED_REPLY, b"junk");
    assert_eq!(c.option_reply().1, REP_ERR_INVALID);
    c.send_option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.option_reply(), (OPT_STRUCTURED_REPLY, REP_ACK, vec![]));
    // Now: no contexts offered, so a bare ACK for both LIST and SET.
    c.send_option(OPT_LIST_META_CONTEXT, &q);
    assert_eq!(c.option_reply(), (OPT_LIST_META_CONTEXT, REP_ACK, vec![]));
    c.send_option(OPT_SET_META_CONTEXT, &q);
    assert_eq!(c.option_reply(), (OPT_SET_META_CONTEXT, REP_ACK, vec![]));
    // A truncated meta context query is invalid.
    c.send_option(OPT_SET_META_CONTEXT, &q[..q.len() - 2]);
    assert_eq!(c.option_reply().1, REP_ERR_INVALID);

    // INFO on the default export "": EXPORT, BLOCK_SIZE, NAME, DESCRIPTION.
    let (infos, fin) = c.info(
        OPT_INFO,
        "",
        &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE],
    );
    assert_eq!(fin, REP_ACK);
    let get = |t: u16| {
        infos
            .iter()
            .find(|(ty, _)| *ty == t)
            .map(|(_, d)| d.clone())
    };
    let exp = get(INFO_EXPORT).unwrap();
    assert_eq!(be64(&exp[0..8]), SIZE);
    let flags = be16(&exp[8..10]);
    assert_eq!(
        flags,
        TF_HAS_FLAGS
            | TF_SEND_FLUSH
            | TF_SEND_FUA
            | TF_SEND_TRIM
            | TF_SEND_WRITE_ZEROES
            | TF_SEND_DF
            | TF_CAN_MULTI_CONN
    );
    let bs = get(INFO_BLOCK_SIZE).unwrap();
    assert_eq!(
        (be32(&bs[0..4]), be32(&bs[4..8]), be32(&bs[8..12])),
        (512, 4096, MAX)
    );
    assert_eq!(get(INFO_NAME).unwrap(), b"disk");
    assert_eq!(get(INFO_DESCRIPTION).unwrap(), b"test disk");
    // The read-only export says so and offers no trim or zeroes.
    let (infos, _) = c.info(OPT_INFO, "other", &[]);
    let f = be16(&infos.iter().find(|(t, _)| *t == INFO_EXPORT).unwrap().1[8..10]);
    assert_eq!(
        f & (TF_READ_ONLY | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_CAN_MULTI_CONN),
        TF_READ_ONLY | TF_CAN_MULTI_CONN
    );

    // ABORT: ACK, then the server closes.
    c.send_option(OPT_ABORT, &[]);
    assert_eq!(c.option_reply(), (OPT_ABORT, REP_ACK, vec![]));
    assert!(c.closed());

    // EXPORT_NAME with and without NO_ZEROES.
    for (flags, len) in [
        (CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES, 10),
        (CLIENT_FLAG_FIXED_NEWSTYLE, 134),
    ] {
        let mut c = RawClient::connect(addr);
        c.greet(flags);
        c.send_option(OPT_EXPORT_NAME, b"disk");
        let r = c.read_n(len);
        assert_eq!(be64(&r[0..8]), SIZE);
        assert_eq!(
            be16(&r[8..10]) & TF_SEND_DF,
            0,
            "no DF without structured replies"
        );
        assert!(r[10..].iter().all(|&b| b == 0));
        c.request(CMD_READ, 0, 9, 0, 512, &[]);
        assert_eq!(c.simple(), (0, 9));
        assert_eq!(c.read_n(512), vec![0u8; 512]);
    }
}

#[test]
fn block_size_required_when_configured() {
    let cfg = ServerConfig {
        require_block_size: true,
        ..Default::default()
    };
    let (srv, _b) = server_with(cfg, false);
    let addr = srv.local_addr().unwrap();
    let mut c = RawClient::connect(addr);
    c.greet(CLIENT_FLAG_FIXED_NEWSTYLE);
    // GO without asking for block sizes: the sizes are sent, then BLOCK_SIZE_REQD.
    let (infos, fin) = c.info(OPT_GO, "disk", &[]);
    assert_eq!(fin, REP_ERR_BLOCK_SIZE_REQD);
    assert!(infos.iter().any(|(t, _)| *t == INFO_BLOCK_SIZE));
    // INFO is fine without it; GO with it enters transmission.
    assert_eq!(c.info(OPT_INFO, "disk", &[]).1, REP_ACK);
    assert_eq!(c.info(OPT_GO, "disk", &[INFO_BLOCK_SIZE]).1, REP_ACK);
    c.request(CMD_FLUSH, 0, 1, 0, 0, &[]);
    assert_eq!(c.simple(), (0, 1));
    // EXPORT_NAME cannot agree on block sizes: hard disconnect.
    let mut c = RawClient::connect(addr);
    c.greet(CLIENT_FLAG_FIXED_NEWSTYLE);
    c.send_option(OPT_EXPORT_NAME, b"disk");
    assert!(c.closed());
}

/// A client that did not agree on block sizes (NBD_OPT_GO without NBD_INFO_BLOCK_SIZE, as
/// Debian's nbd-client 3.24 sends for the kernel, or NBD_OPT_EXPORT_NAME) never learnt the
/// maximum: its READ and WRITE up to 2^25 bytes are served, in pieces the backend takes. The
/// kernel sends up to its max_sectors_kb (1280 KiB by default) and fails the I/O on EINVAL.
#[test]
fn clients_without_block_size_agreement_may_exceed_the_maximum() {
    let (srv, b) = server();
    let addr = srv.local_addr().unwrap();
    let len = 3 * MAX + 512;
    for (i, export_name) in [false, true].into_iter().enumerate() {
        let mut c = RawClient::connect(addr);
        c.greet(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES);
        if export_name {
            c.send_option(OPT_EXPORT_NAME, b"disk");
            let reply = c.read_n(10);
            assert_eq!(be64(&reply[0..8]), SIZE);
        } else {
            let (infos, fin) = c.info(OPT_GO, "disk", &[]);
            assert_eq!(fin, REP_ACK);
            // The sizes are sent all the same.
            assert!(infos.iter().any(|(t, _)| *t == INFO_BLOCK_SIZE));
        }
        let data = random_bytes(len as usize, 40 + i as u64);
        let off = 512 * (1 + i as u64);
        c.request(CMD_WRITE, CMD_FLAG_FUA, 1, off, len, &data);
        assert_eq!(
            c.simple(),
            (0, 1),
            "write of {len} bytes (export_name {export_name})"
        );
        assert_eq!(&b.contents()[off as usize..][..len as usize], &data[..]);
        c.request(CMD_READ, 0, 2, off, len, &[]);
        assert_eq!(c.simple(), (0, 2));
        assert_eq!(c.read_n(len as usize), data);
        // The backend never saw more than the advertised maximum at once.
        assert!(b.largest.load(std::sync::atomic::Ordering::Relaxed) <= MAX as u64);
        c.request(CMD_DISC, 0, 3, 0, 0, &[]);
        assert!(c.closed());
    }
    // A client that asked for the sizes keeps to them ("read over maximum" in
    // bad_requests_get_the_prescribed_errors).
    let (mut c, _, _) = RawClient::open(addr, "disk", false);
    c.request(CMD_READ, 0, 1, 0, MAX + 512, &[]);
    assert_eq!(c.simple(), (NBD_EINVAL, 1));
    assert_eq!(srv.stats().errors, 1);
}

/// A client that did not agree on block sizes may send any alignment (proto.md: the server
/// SHOULD take a minimum of 1 then; the kernel's client with `nbd-client -b 512` sends 512-byte
/// requests). The server reads and writes whole blocks for it: the backend (minimum 4096) only
/// ever sees aligned calls, and partial writes to the same blocks from two connections at once
/// lose nothing.
#[test]
fn clients_without_block_size_agreement_may_send_any_alignment() {
    let b = Arc::new(FileBackend::new(SIZE, sizes(4096, 4096, MAX)));
    let before = random_bytes(SIZE as usize, 77);
    b.fill(&before);
    let srv = serve_disk(b.clone(), 4);
    let addr = srv.local_addr().unwrap();
    let unagreed = || unagreed_client(addr);
    let mut model = before.clone();
    let mut c = unagreed();
    // A 512-byte write inside a block, one across a block boundary, a read of odd bytes.
    let d1 = random_bytes(512, 1);
    c.request(CMD_WRITE, 0, 1, 4096 + 512, 512, &d1);
    assert_eq!(c.simple(), (0, 1));
    model[4096 + 512..4096 + 1024].copy_from_slice(&d1);
    let d2 = random_bytes(3000, 2);
    c.request(CMD_WRITE, CMD_FLAG_FUA, 2, 3 * 4096 - 1000, 3000, &d2);
    assert_eq!(c.simple(), (0, 2));
    model[3 * 4096 - 1000..3 * 4096 + 2000].copy_from_slice(&d2);
    c.request(CMD_READ, 0, 3, 4096 + 500, 100, &[]);
    assert_eq!(c.simple(), (0, 3));
    assert_eq!(c.read_n(100), &model[4096 + 500..4096 + 600]);
    // Zeroes over a partial block, whole blocks and another partial block; a trim of odd bytes.
    c.request(CMD_WRITE_ZEROES, 0, 4, 5 * 4096 + 100, 2 * 4096, &[]);
    assert_eq!(c.simple(), (0, 4));
    model[5 * 4096 + 100..7 * 4096 + 100].fill(0);
    c.request(CMD_TRIM, 0, 5, 100, 5000, &[]);
    assert_eq!(c.simple(), (0, 5));
    assert!(b.contents() == model, "exactly the bytes asked for changed");

    // Both halves of the same blocks written by requests in flight together (pipelined on one
    // connection, so that two workers take them at once; a second connection does the same on
    // other blocks), with reads slowed down: read-modify-writes not kept apart lose halves.
    b.read_delay_us
        .store(2000, std::sync::atomic::Ordering::Relaxed);
    let blocks = 32u64;
    let mut c2 = unagreed();
    for (conn, first) in [(&mut c, 16u64), (&mut c2, 16 + blocks)] {
        for k in first..first + blocks {
            let lo = random_bytes(2048, 1000 + k);
            let hi = random_bytes(2048, 2000 + k);
            conn.request(CMD_WRITE, 0, 2 * k, k * 4096, 2048, &lo);
            conn.request(CMD_WRITE, 0, 2 * k + 1, k * 4096 + 2048, 2048, &hi);
            model[(k * 4096) as usize..][..2048].copy_from_slice(&lo);
            model[(k * 4096 + 2048) as usize..][..2048].copy_from_slice(&hi);
        }
    }
    for _ in 0..2 * blocks {
        assert_eq!(c.simple().0, 0);
        assert_eq!(c2.simple().0, 0);
    }
    assert!(
        b.contents() == model,
        "no half of a block was lost to the other's read-modify-write"
    );
    assert_eq!(
        b.misaligned.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "the backend saw whole blocks only"
    );
    // A client that asked for the sizes still gets EINVAL for a misaligned request.
    let (mut agreed, _, _) = RawClient::open(addr, "disk", false);
    agreed.request(CMD_READ, 0, 1, 512, 4096, &[]);
    assert_eq!(agreed.simple(), (NBD_EINVAL, 1));
}

/// A backend that panics in the middle of a read-modify-write (a partial write holds the
/// export's other writes off meanwhile) fails that request with EIO, and only that one: later
/// writes, single and grouped, still go through (the hold must not stay poisoned).
#[test]
fn a_backend_panic_during_a_partial_write_fails_only_that_request() {
    let inner = FileBackend::new(SIZE, sizes(4096, 4096, MAX));
    let before = random_bytes(SIZE as usize, 78);
    inner.fill(&before);
    let b = Arc::new(GatedBackend {
        batches_writes: true,
        ..GatedBackend::new(inner)
    });
    b.open();
    let srv = serve_disk(b.clone(), 2);
    let mut c = unagreed_client(srv.local_addr().unwrap());
    let mut model = before.clone();

    b.inner
        .panic_reads
        .store(1, std::sync::atomic::Ordering::SeqCst);
    c.request(CMD_WRITE, 0, 1, 4096 + 512, 512, &random_bytes(512, 3));
    assert_eq!(c.simple(), (NBD_EIO, 1), "the panicked read-modify-write");
    assert_eq!(
        b.inner
            .panic_reads
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );

    // A partial write, an aligned one, then 32 aligned writes sent together (grouped).
    let d = random_bytes(1000, 4);
    c.request(CMD_WRITE, 0, 2, 9 * 4096 + 100, 1000, &d);
    assert_eq!(c.simple(), (0, 2), "a later partial write");
    model[9 * 4096 + 100..9 * 4096 + 1100].copy_from_slice(&d);
    let d = random_bytes(4096, 5);
    c.request(CMD_WRITE, 0, 3, 12 * 4096, 4096, &d);
    assert_eq!(c.simple(), (0, 3), "a later aligned write");
    model[12 * 4096..13 * 4096].copy_from_slice(&d);
    let grouped_before = b.grouped_writes.load(std::sync::atomic::Ordering::SeqCst);
    let mut all = Vec::new();
    for i in 0..32u64 {
        let d = random_bytes(4096, 100 + i);
        let off = (64 + i) * 4096;
        model[off as usize..off as usize + 4096].copy_from_slice(&d);
        all.extend_from_slice(&encode_request_header(&RequestHeader {
            flags: 0,
            kind: CMD_WRITE,
            handle: 100 + i,
            offset: off,
            length: 4096,
        }));
        all.extend_from_slice(&d);
    }
    c.send(&all);
    let mut handles: Vec<u64> = (0..32)
        .map(|_| c.simple())
        .map(|(e, h)| {
            assert_eq!(e, 0, "grouped write {h}");
            h
        })
        .collect();
    handles.sort();
    assert_eq!(handles, (100..132).collect::<Vec<_>>());
    assert!(
        b.grouped_writes.load(std::sync::atomic::Ordering::SeqCst) > grouped_before,
        "some of the 32 were grouped"
    );
    assert!(b.inner.contents() == model, "every later write landed");
}

/// (what, kind, flags, offset, length, payload, expected errno)
type Case<'a> = (&'a str, u16, u16, u64, u32, &'a [u8], u32);

#[test]
fn bad_requests_get_the_prescribed_errors() {
    let (srv, b) = server();
    let addr = srv.local_addr().unwrap();
    let (mut c, _, _) = RawClient::open(addr, "disk", false);
    let payload = vec![0xAAu8; 2048];
    let cases: Vec<Case> = vec![
        ("unknown command", 42, 0, 0, 512, &[], NBD_EINVAL),
        (
            "block status without contexts",
            CMD_BLOCK_STATUS,
            0,
            0,
            512,
            &[],
            NBD_EINVAL,
        ),
        ("cache not offered", CMD_CACHE, 0, 0, 512, &[], NBD_EINVAL),
        (
            "unknown flag on read",
            CMD_READ,
            1 << 7,
            0,
            512,
            &[],
            NBD_EINVAL,
        ),
        (
            "NO_HOLE on write",
            CMD_WRITE,
            CMD_FLAG_NO_HOLE,
            0,
            512,
            &payload[..512],
            NBD_EINVAL,
        ),
        (
            "DF without structured replies",
            CMD_READ,
            CMD_FLAG_DF,
            0,
            512,
            &[],
            NBD_EINVAL,
        ),
        (
            "FAST_ZERO not offered",
            CMD_WRITE_ZEROES,
            CMD_FLAG_FAST_ZERO,
            0,
            512,
            &[],
            NBD_EINVAL,
        ),
        (
            "misaligned read offset",
            CMD_READ,
            0,
            100,
            512,
            &[],
            NBD_EINVAL,
        ),
        (
            "misaligned read length",
            CMD_READ,
            0,
            0,
            100,
            &[],
            NBD_EINVAL,
        ),
        (
            "misaligned write",
            CMD_WRITE,
            0,
            256,
            512,
            &payload[..512],
            NBD_EINVAL,
        ),
        (
            "read over maximum",
            CMD_READ,
            0,
            0,
            MAX + 512,
            &[],
            NBD_EINVAL,
        ),
        (
            "read past end",
            CMD_READ,
            0,
            SIZE - 512,
            1024,
            &[],
            NBD_EINVAL,
        ),
        ("read at end", CMD_READ, 0, SIZE, 512, &[], NBD_EINVAL),
        ("trim past end", CMD_TRIM, 0, SIZE, 512, &[], NBD_EINVAL),
        (
            "write past end",
            CMD_WRITE,
            0,
            SIZE - 1024,
            2048,
            &payload,
            NBD_ENOSPC,
        ),
        (
            "zeroes past end",
            CMD_WRITE_ZEROES,
            0,
            SIZE,
            4096,
            &[],
            NBD_ENOSPC,
        ),
        (
            "offset overflow",
            CMD_READ,
            0,
            u64::MAX - 511,
            1024,
            &[],
            NBD_EINVAL,
        ),
    ];
    for (i, (what, kind, flags, off, len, pl, errno)) in cases.iter().enumerate() {
        c.request(*kind, *flags, 100 + i as u64, *off, *len, pl);
        assert_eq!(c.simple(), (*errno, 100 + i as u64), "{what}");
    }
    // A write over the maximum: its payload is read and discarded, the stream stays in sync.
    let big = vec![0x55u8; (MAX + 4096) as usize];
    c.request(CMD_WRITE, 0, 200, 0, MAX + 4096, &big);
    assert_eq!(c.simple(), (NBD_EINVAL, 200));
    // Nothing of the refused writes reached the disk.
    assert!(b.contents().iter().all(|&x| x == 0));
    // The connection still works: zero-length ops, a real write and read.
    c.request(CMD_WRITE, 0, 300, 0, 0, &[]);
    assert_eq!(c.simple(), (0, 300));
    c.request(CMD_READ, 0, 301, 0, 0, &[]);
    assert_eq!(c.simple(), (0, 301));
    c.request(CMD_WRITE, 0, 302, 4096, 2048, &payload);
    assert_eq!(c.simple(), (0, 302));
    c.request(CMD_READ, 0, 303, 4096, 2048, &[]);
    assert_eq!(c.simple(), (0, 303));
    assert_eq!(c.read_n(2048), payload);
    // WRITE_ZEROES with NO_HOLE larger than the maximum block size is split, not refused.
    c.request(
        CMD_WRITE_ZEROES,
        CMD_FLAG_NO_HOLE | CMD_FLAG_FUA,
        304,
        0,
        2 * MAX,
        &[],
    );
    assert_eq!(c.simple(), (0, 304));
    assert!(b.contents().iter().all(|&x| x == 0));
    // FLUSH reaches the backend; FUA on a flush is accepted.
    let before = b.flushes.load(std::sync::atomic::Ordering::Relaxed);
    c.request(CMD_FLUSH, CMD_FLAG_FUA, 305, 0, 0, &[]);
    assert_eq!(c.simple(), (0, 305));
    assert!(b.flushes.load(std::sync::atomic::Ordering::Relaxed) > before);
    assert_eq!(srv.stats().errors, cases.len() as u64 + 1);
    good_client_works(&srv, 2);
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    let (srv, _b) = server_with(ServerConfig::default(), true);
    let (mut c, _, flags) = RawClient::open(srv.local_addr().unwrap(), "disk", false);
    assert_ne!(flags & TF_READ_ONLY, 0);
    c.request(CMD_WRITE, 0, 1, 0, 512, &[1u8; 512]);
    assert_eq!(c.simple(), (NBD_EPERM, 1));
    c.request(CMD_TRIM, 0, 2, 0, 512, &[]);
    assert_eq!(c.simple(), (NBD_EPERM, 2));
    c.request(CMD_WRITE_ZEROES, 0, 3, 0, 512, &[]);
    assert_eq!(c.simple(), (NBD_EPERM, 3));
    c.request(CMD_READ, 0, 4, 0, 512, &[]);
    assert_eq!(c.simple(), (0, 4));
    assert_eq!(c.read_n(512), vec![0u8; 512]);
}

#[test]
fn structured_replies_for_reads_and_errors() {
    let (srv, b) = server();
    let data = random_bytes(SIZE as usize, 7);
    b.fill(&data);
    let (mut c, _, flags) = RawClient::open(srv.local_addr().unwrap(), "", true);
    assert_ne!(flags & TF_SEND_DF, 0);
    c.request(CMD_READ, CMD_FLAG_DF, 1, 8192, 4096, &[]);
    let ch = c.chunk();
    assert_eq!(
        (ch.flags, ch.ty, ch.handle, ch.payload.len()),
        (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 1, 4104)
    );
    assert_eq!(be64(&ch.payload[0..8]), 8192);
    assert_eq!(&ch.payload[8..], &data[8192..12288]);
    // Errors on reads come as an ERROR chunk with a message, never a simple reply.
    c.request(CMD_READ, 0, 2, 0, 100, &[]);
    let ch = c.chunk();
    assert_eq!(
        (ch.flags, ch.ty, ch.handle),
        (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 2)
    );
    assert_eq!(be32(&ch.payload[0..4]), NBD_EINVAL);
    let mlen = be16(&ch.payload[4..6]) as usize;
    assert_eq!(ch.payload.len(), 6 + mlen);
    assert!(std::str::from_utf8(&ch.payload[6..])
        .unwrap()
        .contains("aligned"));
    // A zero-length read ends with a NONE chunk.
    c.request(CMD_READ, 0, 3, 0, 0, &[]);
    let ch = c.chunk();
    assert_eq!(
        (ch.flags, ch.ty, ch.handle, ch.payload.len()),
        (REPLY_FLAG_DONE, REPLY_TYPE_NONE, 3, 0)
    );
    // Non-read success is a simple reply.
    c.request(CMD_FLUSH, 0, 4, 0, 0, &[]);
    assert_eq!(c.simple(), (0, 4));
}

#[test]
fn stream_violations_close_only_that_connection() {
    let (srv, b) = server();
    let addr = srv.local_addr().unwrap();
    // A bystander with a connection open throughout.
    let (mut by, _, _) = RawClient::open(addr, "disk", false);

    // Wrong request magic: hard disconnect.
    let (mut c, _, _) = RawClient::open(addr, "disk", false);
    let mut raw = encode_request_header(&RequestHeader {
        flags: 0,
        kind: CMD_READ,
        handle: 1,
        offset: 0,
        length: 512,
    });
    raw[0] ^= 0xff;
    c.send(&raw);
    assert!(c.closed());

    // A write payload large enough to be a denial of service: hard disconnect.
    let (mut c, _, _) = RawClient::open(addr, "disk", false);
    c.request(CMD_WRITE, 0, 1, 0, u32::MAX - 511, &[]);
    assert!(c.closed());

    // Truncated header, then the client vanishes.
    let (mut c, _, _) = RawClient::open(addr, "disk", false);
    c.send(&raw[..10]);
    drop(c);

    // Write header with half its payload, then the client vanishes: nothing is written.
    let (mut c, _, _) = RawClient::open(addr, "disk", false);
    c.request(CMD_WRITE, 0, 1, 0, 4096, &[0x77u8; 2048]);
    c.s.flush().unwrap();
    drop(c);

    // Client vanishing with reads in flight.
    let (mut c, _, _) = RawClient::open(addr, "disk", false);
    for h in 0..32 {
        c.request(CMD_READ, 0, h, h * 4096, 4096, &[]);
    }
    drop(c);

    std::thread::sleep(Duration::from_millis(100));
    assert!(
        b.contents().iter().all(|&x| x == 0),
        "a truncated write must not reach the disk"
    );
    by.request(CMD_READ, 0, 5, 0, 512, &[]);
    assert_eq!(by.simple(), (0, 5));
    assert_eq!(by.read_n(512), vec![0u8; 512]);
    good_client_works(&srv, 3);
    wait_until(10, "dead connections to be reaped", || {
        srv.stats().connections_active == 1
    });
    assert!(srv.stats().protocol_errors >= 2);
}

#[test]
fn connection_limit_refuses_extra_clients() {
    let cfg = ServerConfig {
        max_connections: 2,
        ..Default::default()
    };
    let (srv, _b) = server_with(cfg, false);
    let addr = srv.local_addr().unwrap();
    let (_a, _, _) = RawClient::open(addr, "disk", false);
    let (_b2, _, _) = RawClient::open(addr, "disk", false);
    let mut third = RawClient::connect(addr);
    assert!(
        third.closed(),
        "third connection must be closed without a greeting"
    );
    assert_eq!(srv.stats().connections_refused, 1);
    drop(_a);
    wait_until(10, "a slot to free up", || {
        srv.stats().connections_active == 1
    });
    good_client_works(&srv, 4);
}

#[test]
fn disc_answers_outstanding_requests_first() {
    let inner = FileBackend::new(SIZE, sizes(512, 4096, MAX));
    let data = random_bytes(SIZE as usize, 9);
    inner.fill(&data);
    let gated = Arc::new(GatedBackend::new(inner));
    let cfg = ServerConfig {
        tcp: Some("127.0.0.1:0".parse().unwrap()),
        workers: 2,
        ..Default::default()
    };
    let srv = NbdServer::start(
        cfg,
        vec![Export {
            name: "g".into(),
            description: String::new(),
            backend: gated.clone(),
            read_only: false,
        }],
    )
    .unwrap();
    let (mut c, _, _) = RawClient::open(srv.local_addr().unwrap(), "g", false);
    for h in 0..8u64 {
        c.request(CMD_READ, 0, h, h * 4096, 4096, &[]);
    }
    c.request(CMD_DISC, 0, 99, 0, 0, &[]);
    wait_until(10, "requests to reach the backend", || {
        gated.started.load(std::sync::atomic::Ordering::SeqCst) >= 2
    });
    gated.open();
    let mut seen = Vec::new();
    for _ in 0..8 {
        let (errno, h) = c.simple();
        assert_eq!(errno, 0);
        let got = c.read_n(4096);
        assert_eq!(
            &got[..],
            &data[(h * 4096) as usize..(h * 4096 + 4096) as usize]
        );
        seen.push(h);
    }
    seen.sort();
    assert_eq!(seen, (0..8).collect::<Vec<_>>());
    assert!(c.closed());
}

#[test]
fn inflight_requests_and_buffered_bytes_are_bounded() {
    for (cfg, expect) in [
        // At most 3 requests in flight on the connection.
        (
            ServerConfig {
                max_inflight_per_conn: 3,
                ..Default::default()
            },
            3,
        ),
        // 64 KiB of payload in flight over all connections: two 32 KiB reads.
        (
            ServerConfig {
                max_buffered_bytes_total: 64 << 10,
                ..Default::default()
            },
            2,
        ),
        // 96 KiB per connection: three 32 KiB reads.
        (
            ServerConfig {
                max_buffered_bytes_per_conn: 96 << 10,
                ..Default::default()
            },
            3,
        ),
    ] {
        let gated = Arc::new(GatedBackend::new(FileBackend::new(
            SIZE,
            sizes(512, 4096, MAX),
        )));
        let cfg = ServerConfig {
            tcp: Some("127.0.0.1:0".parse().unwrap()),
            workers: 8,
            ..cfg
        };
        let e = Export {
            name: "g".into(),
            description: String::new(),
            backend: gated.clone(),
            read_only: false,
        };
        let srv = NbdServer::start(cfg, vec![e]).unwrap();
        let (mut c, _, _) = RawClient::open(srv.local_addr().unwrap(), "g", false);
        for h in 0..8u64 {
            c.request(CMD_READ, 0, h, h * 32768, 32768, &[]);
        }
        wait_until(10, "requests to reach the backend", || {
            gated.started.load(std::sync::atomic::Ordering::SeqCst) >= expect
        });
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            gated.started.load(std::sync::atomic::Ordering::SeqCst),
            expect
        );
        gated.open();
        for _ in 0..8 {
            assert_eq!(c.simple().0, 0);
            c.read_n(32768);
        }
    }
}

//! The real takeoverctl binary against the real control server, backed by two HA loops (the
//! recording executor standing in for the node) on real threads.

use hapair::core::control::{NvramView, PairStatus};
use hapair::core::takeover::State;
use hapair::daemon::control::{ControlOptions, ControlServer, StatusProvider};
use hapair::daemon::ha_testing::Pair;
use hapair::daemon::mailbox::MemStore;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(10);

/// What a node would add: its NVRAM line and an extra field.
struct Provider;

impl StatusProvider for Provider {
    fn fill(&self, s: &mut PairStatus) {
        s.nvram = Some(NvramView {
            persistence: "file /var/lib/hapair/nvram (fdatasync)".into(),
            used_bytes: Some(1 << 20),
            capacity_bytes: 8 << 20,
            detail: String::new(),
        });
        s.extra.insert("test".into(), serde_json::json!(true));
        for a in &mut s.aggregates {
            a.state = "online".into();
        }
    }
}

struct Setup {
    _servers: Vec<ControlServer>,
    pair: Pair,
    _dir: tempfile::TempDir,
    sock_a: PathBuf,
    sock_b: PathBuf,
}

fn setup() -> Setup {
    let pair = Pair::start(Arc::new(MemStore::new(3)), |_| {});
    assert!(pair.wait_normal(T));
    let dir = tempfile::tempdir().unwrap();
    let sock_a = dir.path().join("a.sock");
    let sock_b = dir.path().join("b.sock");
    let sa = ControlServer::start(
        &sock_a,
        pair.a.handle.clone(),
        Arc::new(Provider),
        ControlOptions::default(),
    )
    .unwrap();
    let sb = ControlServer::start(
        &sock_b,
        pair.b.handle.clone(),
        Arc::new(Provider),
        ControlOptions::default(),
    )
    .unwrap();
    Setup {
        pair,
        _dir: dir,
        sock_a,
        sock_b,
        _servers: vec![sa, sb],
    }
}

fn ctl(sock: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_takeoverctl"))
        .arg("--socket")
        .arg(sock)
        .args(args)
        .output()
        .expect("run takeoverctl")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// `2024-05-01 12:04:07Z` or `2024-05-01 12:04:07+02:00`: the date, the time and the zone.
fn is_timestamp(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| r.into_iter().all(|i| b[i].is_ascii_digit());
    let zone = &s[19..];
    s.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b' '
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && (zone == "Z"
            || (zone.len() == 6
                && (zone.starts_with('+') || zone.starts_with('-'))
                && zone.as_bytes()[3] == b':'))
}

#[test]
fn status_table_and_json() {
    let s = setup();
    let o = ctl(&s.sock_a, &["status"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        out.starts_with("OK: both nodes serve their own aggregates; partner log mirrored"),
        "{out}"
    );
    assert!(out.contains("partner log mirror: mirrored"), "{out}");
    assert!(
        out.contains("NVRAM: file /var/lib/hapair/nvram (fdatasync) -- 12% of 8 MiB used\n"),
        "{out}"
    );
    let row = out.lines().find(|l| l.starts_with("aggr-b")).expect(&out);
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cols, ["aggr-b", "b", "b", "online"], "{row}");
    let b_row = out.lines().find(|l| l.starts_with("b ")).expect(&out);
    assert!(
        b_row.contains("partner") && b_row.contains("Normal") && b_row.contains("heard"),
        "{b_row}"
    );

    let o = ctl(&s.sock_b, &["status", "--json"]);
    assert_eq!(o.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["node"], "b");
    assert_eq!(v["nodes"][0]["state"], "Normal");
    assert_eq!(v["nodes"][1]["name"], "a");
    assert_eq!(v["mirror"]["summary"], "mirrored");
    assert_eq!(v["nvram"]["capacity_bytes"], 8 << 20);
    assert_eq!(v["extra"]["test"], true);
    let st: PairStatus = serde_json::from_value(v).unwrap();
    assert_eq!(st.ha.state, State::Normal);
}

#[test]
fn takeover_refused_then_done_then_given_back_with_watch() {
    let s = setup();
    // Check only: nothing refuses it, nothing happens.
    let o = ctl(&s.sock_a, &["takeover", "--of", "b", "--check-only"]);
    assert_eq!(o.status.code(), Some(0), "{:?}", text(&o));
    assert!(text(&o).0.contains("takeover check passed"));
    assert_eq!(s.pair.a.state(), State::Normal);

    // b's log stops being mirrored: refused, with the reason and the time it started.
    s.pair.b.handle.own_mirror(false).unwrap();
    let deadline = Instant::now() + T;
    while s.pair.a.handle.snapshot().unwrap().status.mirror_current {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    let o = ctl(&s.sock_a, &["takeover", "--of", "b"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let msg = err.trim_end();
    let prefix = "cannot take over: partner log not mirrored since ";
    assert!(msg.starts_with(prefix), "{msg}");
    assert!(is_timestamp(&msg[prefix.len()..]), "{msg}");
    let o = ctl(&s.sock_a, &["takeover", "--of", "b", "--check-only"]);
    assert_eq!(o.status.code(), Some(1));
    let o = ctl(&s.sock_a, &["status"]);
    let out = text(&o).0;
    assert!(
        out.contains("partner log mirror: not mirrored since "),
        "{out}"
    );
    assert!(out.contains("refusals (newest last):"), "{out}");
    s.pair.b.handle.own_mirror(true).unwrap();
    let deadline = Instant::now() + T;
    while !s.pair.a.handle.snapshot().unwrap().status.mirror_current {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }

    // Follow it with watch at b while a takes b over.
    let mut watch = Command::new(env!("CARGO_BIN_EXE_takeoverctl"))
        .arg("--socket")
        .arg(&s.sock_b)
        .arg("watch")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let o = ctl(&s.sock_a, &["takeover", "--of", "b", "--countdown", "2s"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{err}");
    assert!(out.starts_with("takeover (graceful) complete at "), "{out}");
    for p in [
        "Fence",
        "OpenPartnerAggregate",
        "ReplayPartnerLog",
        "TakePartnerIdentity",
        "ServePartnerExports",
    ] {
        assert!(out.contains(p), "{out}");
    }
    assert!(
        out.contains("TAKEOVER: a serves b's aggregates; b waits for giveback"),
        "{out}"
    );
    let o = ctl(&s.sock_a, &["status"]);
    let out = text(&o).0;
    let row = out.lines().find(|l| l.starts_with("aggr-b")).expect(&out);
    assert!(row.contains(" a ") && row.contains("(taken over)"), "{row}");
    assert!(
        out.contains("last takeover: takeover (graceful) at "),
        "{out}"
    );
    assert!(
        out.contains("in local NVRAM only (partner fenced)"),
        "{out}"
    );
    // b acknowledges nothing while taken over, whatever its ack mode was.
    let out = text(&ctl(&s.sock_b, &["status"])).0;
    assert!(
        out.contains("writes acknowledged: none (this node serves nothing)"),
        "{out}"
    );
    // Takeover again: refused (already taken over).
    let o = ctl(&s.sock_a, &["takeover", "--of", "b"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).1.contains("b is already taken over"),
        "{:?}",
        text(&o)
    );

    let o = ctl(&s.sock_a, &["giveback", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{:?}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["type"], "outcome");
    assert_eq!(v["outcome"]["result"], "completed");
    assert_eq!(v["outcome"]["report"]["kind"], "giveback");
    assert!(s.pair.b.wait_state(State::Normal, T));

    // The watch saw b go down and come back.
    std::thread::sleep(Duration::from_millis(300));
    watch.kill().unwrap();
    let mut lines = String::new();
    watch
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut lines)
        .unwrap();
    let _ = watch.wait();
    // Short states (ShuttingDown, Resuming) can pass between two updates of a busy machine;
    // being taken over and coming back cannot.
    let order: Vec<&str> = ["b TakenOver", "b Normal"].to_vec();
    let mut at = 0;
    for l in lines.lines() {
        if at < order.len() && l.contains(order[at]) {
            at += 1;
        }
    }
    assert_eq!(at, order.len(), "watch output:\n{lines}");
}

#[test]
fn takeover_at_the_node_to_be_taken_over() {
    let s = setup();
    let o = ctl(&s.sock_b, &["takeover"]);
    assert_eq!(o.status.code(), Some(0), "{:?}", text(&o));
    let out = text(&o).0;
    assert!(
        out.contains("takeover complete: b is TakenOver, a serves its aggregates"),
        "{out}"
    );
    // Done means a serves: no waiting for it here.
    assert_eq!(s.pair.a.state(), State::InTakeover);
    // With b's shutdown, phase by phase; status keeps it.
    assert!(
        out.contains("shutdown took ") && out.contains("StopAccepting") && out.contains("FinalCp"),
        "{out}"
    );
    let st = text(&ctl(&s.sock_b, &["status"])).0;
    assert!(st.contains("last shutdown: shutdown at "), "{st}");
    // Giveback at the wrong node is refused with the reason.
    let o = ctl(&s.sock_b, &["giveback"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o)
            .1
            .starts_with("cannot give back: this node has not taken a over"),
        "{:?}",
        text(&o)
    );
    let o = ctl(&s.sock_a, &["giveback", "--no-wait"]);
    assert_eq!(o.status.code(), Some(0), "{:?}", text(&o));
    assert!(text(&o).0.starts_with("giveback started"), "{:?}", text(&o));
    assert!(s.pair.b.wait_state(State::Normal, T));
}

#[test]
fn usage_and_unreachable_exit_codes() {
    let s = setup();
    let o = ctl(&s.sock_a, &["takeover", "--of", "zz"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).1.contains("no node \"zz\""), "{:?}", text(&o));
    let o = ctl(&s.sock_a, &["takeover", "--countdown", "5x"]);
    assert_eq!(o.status.code(), Some(2));
    let o = ctl(
        &s.sock_a,
        &["takeover", "--countdown", "5s", "--immediate", "--of", "b"],
    );
    assert_eq!(o.status.code(), Some(2));
    let o = ctl(&s.sock_a, &["takeover", "--countdown", "5s"]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "countdown belongs to the taking node"
    );
    assert!(text(&o).1.contains("takeover --of a"), "{:?}", text(&o));
    let o = ctl(&s.sock_a, &["frobnicate"]);
    assert_eq!(o.status.code(), Some(2));
    let o = ctl(Path::new("/nonexistent/hapaird.sock"), &["status"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(
        text(&o)
            .1
            .contains("cannot reach hapaird at /nonexistent/hapaird.sock"),
        "{:?}",
        text(&o)
    );
    assert_eq!(s.pair.a.state(), State::Normal);
}

#[test]
fn raw_protocol_errors_are_clear() {
    let s = setup();
    let mut c = UnixStream::connect(&s.sock_a).unwrap();
    c.set_read_timeout(Some(T)).unwrap();
    let mut r = BufReader::new(c.try_clone().unwrap());
    let mut ask = |line: &[u8]| -> serde_json::Value {
        c.write_all(line).unwrap();
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        serde_json::from_str(&l).unwrap()
    };
    let v = ask(b"hello\n");
    assert_eq!(
        (v["type"].as_str(), v["kind"].as_str()),
        (Some("error"), Some("malformed"))
    );
    assert!(v["message"].as_str().unwrap().contains("not JSON"));
    let v = ask(b"{\"cmd\":\"status\"}\n");
    assert_eq!(v["kind"], "unsupported_version");
    let v = ask(b"{\"v\":1,\"cmd\":\"giveback\",\"wiat\":true}\n");
    assert_eq!(v["kind"], "malformed");
    assert!(v["message"].as_str().unwrap().contains("wiat"), "{v}");
    let v = ask(b"{\"v\":1,\"cmd\":\"status\"}\n");
    assert_eq!(
        (v["v"].as_u64(), v["type"].as_str()),
        (Some(1), Some("status"))
    );
    // An over-long line: answered, then the connection is closed.
    let mut long = vec![b'x'; 70 * 1024];
    long.push(b'\n');
    let v = ask(&long);
    assert_eq!(v["kind"], "too_long");
    let mut rest = String::new();
    assert_eq!(
        r.read_line(&mut rest).unwrap_or(0),
        0,
        "closed after too_long"
    );
    // The server still serves others.
    assert_eq!(ctl(&s.sock_a, &["status"]).status.code(), Some(0));
    // A second server on the same socket is refused.
    let e = ControlServer::start(
        &s.sock_a,
        s.pair.a.handle.clone(),
        Arc::new(Provider),
        ControlOptions::default(),
    );
    assert!(matches!(
        e,
        Err(hapair::daemon::control::ControlError::InUse { .. })
    ));
    let _ = &s.sock_b;
}

/// A watcher that does not read for a while still gets whole lines: the server blocks on a full
/// socket instead of cutting a line at the point the buffer filled (and closing).
#[test]
fn a_slow_watcher_gets_whole_lines() {
    let s = setup();
    let mut c = UnixStream::connect(&s.sock_a).unwrap();
    c.write_all(b"{\"v\":1,\"cmd\":\"watch\"}\n").unwrap();
    // Status changes while the watcher does not read: each is a line of a few KiB, enough of
    // them to fill the socket's buffers several times over.
    let mut sent = 0;
    let t0 = Instant::now();
    while sent < 200 && t0.elapsed() < Duration::from_secs(30) {
        s.pair.b.handle.own_mirror(sent % 2 == 1).unwrap();
        // Until a saw it (one status change each).
        let want = sent % 2 == 1;
        let deadline = Instant::now() + T;
        while s.pair.a.handle.snapshot().unwrap().status.mirror_current != want {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(1));
        }
        sent += 1;
    }
    // Now read everything there is.
    c.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let mut all = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(
        all.last(),
        Some(&b'\n'),
        "the stream ends in the middle of a line"
    );
    let mut lines = 0;
    for l in all.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let v: serde_json::Value = serde_json::from_slice(l)
            .unwrap_or_else(|e| panic!("line {lines} is not whole JSON: {e}"));
        assert!(v["type"] == "status" || v["type"] == "error", "{v}");
        lines += 1;
    }
    assert!(lines > 10, "{lines} lines");
    // The watcher fell behind for real (the server had to wait for it): it was told so, in a
    // whole line of its own, after every line queued for it.
    let last = all[..all.len() - 1].rsplit(|b| *b == b'\n').next().unwrap();
    let v: serde_json::Value = serde_json::from_slice(last).unwrap();
    assert_eq!(v["kind"], "unavailable", "{v}");
}

/// `status --json` of `sock`, polled until `pred` holds.
fn status_until(
    sock: &Path,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + T;
    loop {
        let o = ctl(sock, &["status", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        if pred(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "waiting for {what}: {v:#}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn cut_interconnect(s: &Setup, cut: bool) {
    s.pair
        .a
        .link_up
        .store(!cut, std::sync::atomic::Ordering::SeqCst);
    s.pair
        .b
        .link_up
        .store(!cut, std::sync::atomic::Ordering::SeqCst);
}

#[test]
fn alarms_are_acknowledged_by_id_or_all_and_a_live_one_stays_in_the_headline() {
    let s = setup();
    let open_ic = |v: &serde_json::Value| {
        v["open_alarms"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["alarm"].get("InterconnectDown").is_some())
    };
    // The interconnect goes down while the mailbox lives: an alarm, #1.
    cut_interconnect(&s, true);
    let v = status_until(&s.sock_a, "the interconnect alarm", open_ic);
    let id = v["open_alarms"][0]["id"].as_u64().unwrap();
    let (out, _) = text(&ctl(&s.sock_a, &["status"]));
    assert!(
        out.lines()
            .next()
            .unwrap()
            .contains("ALARM: interconnect to b down"),
        "{out}"
    );
    assert!(
        out.contains(&format!("#{id} ")) && out.contains("[HOLDS, not acknowledged]"),
        "{out}"
    );

    // Unknown ids: exit 2, nothing acknowledged, the known ids named.
    let o = ctl(&s.sock_a, &["alarm", "ack", &id.to_string(), "99"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("no alarm 99 on a (its alarms: {id})")),
        "{err}"
    );
    let o = ctl(&s.sock_a, &["alarm", "ack"]);
    assert_eq!(o.status.code(), Some(2), "an id or --all is required");
    let o = ctl(&s.sock_a, &["alarm", "ack", "x1"]);
    assert_eq!(o.status.code(), Some(2));

    // Acknowledged while it holds: it stays in the headline, marked.
    let o = ctl(&s.sock_a, &["alarm", "ack", &format!("#{id}")]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(out.contains(&format!("a: acknowledged #{id}")), "{out}");
    assert!(
        out.contains(&format!("#{id} still holds: interconnect to b down")),
        "{out}"
    );
    let (out, _) = text(&ctl(&s.sock_a, &["status"]));
    let head = out.lines().next().unwrap();
    assert!(
        head.contains("ALARM: interconnect to b down") && head.contains("(acknowledged)"),
        "{head}"
    );
    assert!(out.contains("[HOLDS, acknowledged "), "{out}");
    // Again: already acknowledged, still exit 0.
    let o = ctl(&s.sock_a, &["alarm", "ack", &id.to_string()]);
    assert_eq!(o.status.code(), Some(0));
    assert!(text(&o).0.contains(&format!("already acknowledged: #{id}")));

    // It clears: no alarm left, nothing to acknowledge.
    cut_interconnect(&s, false);
    let v = status_until(&s.sock_a, "the interconnect back", |v| {
        !open_ic(v) && v["partner_reachable"] == true
    });
    let h = v["headline"].as_str().unwrap();
    assert!(
        !h.contains("ALARM") && !h.contains("not acknowledged"),
        "{h}"
    );
    assert!(v["alarms"][0]["acknowledged_at_unix_ms"].is_u64(), "{v:#}");

    // It recurs: a new alarm, not acknowledged; once cleared the headline counts it until
    // `--all` acknowledges it.
    cut_interconnect(&s, true);
    let v = status_until(&s.sock_a, "the interconnect alarm again", open_ic);
    let id2 = v["open_alarms"][0]["id"].as_u64().unwrap();
    assert!(id2 > id);
    assert!(
        v["open_alarms"][0]["acknowledged_at_unix_ms"].is_null(),
        "{v:#}"
    );
    cut_interconnect(&s, false);
    let v = status_until(&s.sock_a, "the interconnect back again", |v| {
        !open_ic(v) && v["partner_reachable"] == true
    });
    let h = v["headline"].as_str().unwrap();
    assert!(
        h.ends_with("-- 1 past alarm not acknowledged (takeoverctl alarm ack)"),
        "{h}"
    );
    let o = ctl(&s.sock_a, &["alarm", "ack", "--all", "--json"]);
    assert_eq!(o.status.code(), Some(0));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["type"], "acknowledged");
    assert_eq!(r["acknowledged"], serde_json::json!([id2]));
    assert!(
        !r["status"]["headline"]
            .as_str()
            .unwrap()
            .contains("not acknowledged"),
        "{r:#}"
    );
    let o = ctl(&s.sock_a, &["alarm", "ack", "--all"]);
    assert!(
        text(&o).0.contains("a: no alarm to acknowledge"),
        "{:?}",
        text(&o)
    );
}

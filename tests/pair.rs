//! The HA pair for real: two hapaird daemons on shared loop devices, the interconnect and the
//! service addresses on loopback, a verifying client that reconnects to the service address
//! (and qemu with reconnect-delay), through graceful takeover from either side, countdown
//! expiry, giveback, SIGKILL (hard takeover) and a refused takeover.

mod common;
#[path = "common/pair.rs"]
mod pair;

use common::*;
use pair::*;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

#[test]
fn graceful_takeover_from_either_side_and_giveback_lose_nothing() {
    require_tool("qemu-img");
    let p = Pair::new(10_000);
    let blocks = 2048;
    let w = Writer::start(p.svc[1], "aggr-b", blocks, 1);
    // qemu rides through the moves on its own region (above the tracked blocks).
    let qemu_opts = format!("driver=nbd,server.type=inet,server.host={},server.port={},export=aggr-b,reconnect-delay=20", p.svc[1].ip(), p.svc[1].port());
    let qemu = Command::new("qemu-img")
        .args([
            "bench",
            "-w",
            "-c",
            "8000",
            "-d",
            "8",
            "-s",
            "4k",
            "-o",
            &(16u64 << 20).to_string(),
            "-S",
            "4096",
            "--pattern=90",
            "--image-opts",
            &qemu_opts,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let n0 = w.verify(p.svc[1], "aggr-b", "before takeover");
    // Loop devices have no persistent reservations: status says the fence is the mailbox's.
    for n in ["a", "b"] {
        let st = p.ctl(n, r#"{"v":1,"cmd":"status"}"#);
        let f = st["status"]["extra"]["fencing"]
            .as_str()
            .unwrap_or_else(|| panic!("no fencing in status: {st}"));
        assert!(
            f.starts_with("mailbox only (cooperative): /dev/loop")
                && f.contains("has no PR support: not a SCSI device"),
            "{f}"
        );
        let detail = st["status"]["nvram"]["detail"].as_str().unwrap();
        assert!(detail.contains(&format!("fencing: {f}")), "{detail}");
    }
    // 1: the operator at the partner takes b over.
    let r = p.ctl(
        "a",
        r#"{"v":1,"cmd":"takeover","of":"b","countdown_ms":10000}"#,
    );
    assert_eq!(outcome(&r), "completed", "{r}");
    assert_eq!(r["outcome"]["report"]["kind"], "takeover (graceful)", "{r}");
    eprintln!(
        "graceful takeover (asked at a): {} ms: {}",
        r["outcome"]["report"]["total_ms"],
        phases(&r)
    );
    p.wait_state("b", "TakenOver", 10);
    std::thread::sleep(Duration::from_millis(500));
    let n1 = w.verify(p.svc[1], "aggr-b", "after takeover asked at the partner");
    assert!(n1 > n0, "the client kept writing through the takeover");
    let st = p.ctl("a", r#"{"v":1,"cmd":"status"}"#);
    let aggs = st["status"]["aggregates"].as_array().unwrap();
    assert!(
        aggs.iter().all(|a| a["served_by"] == "a"),
        "a serves both: {st}"
    );
    // Giveback.
    let r = p.ctl("a", r#"{"v":1,"cmd":"giveback"}"#);
    assert_eq!(outcome(&r), "completed", "{r}");
    // b resumed with its log mirrored here, and a's report says so.
    assert_eq!(r["status"]["mirror"]["partner_log_mirrored"], true, "{r}");
    eprintln!(
        "giveback: {} ms: {}",
        r["outcome"]["report"]["total_ms"],
        phases(&r)
    );
    p.wait_state("b", "Normal", 20);
    std::thread::sleep(Duration::from_millis(500));
    let n2 = w.verify(p.svc[1], "aggr-b", "after giveback");
    assert!(n2 >= n1);
    // 2: within the hold-down an operator takeover is refused, with the reason.
    let r = p.ctl("b", r#"{"v":1,"cmd":"takeover"}"#);
    assert_eq!(outcome(&r), "refused", "{r}");
    let text = r["outcome"]["text"].to_string();
    assert!(
        text.contains("hold") || text.contains("giveback"),
        "refusal says why: {text}"
    );
    std::thread::sleep(Duration::from_millis(8200));
    // 3: the operator at the node to be taken over asks for it.
    let r = p.ctl("b", r#"{"v":1,"cmd":"takeover"}"#);
    assert_eq!(outcome(&r), "completed", "{r}");
    eprintln!("graceful takeover (asked at b): {}", r["outcome"]);
    p.wait_state("a", "InTakeover", 20);
    std::thread::sleep(Duration::from_millis(500));
    let n3 = w.verify(
        p.svc[1],
        "aggr-b",
        "after takeover asked at the node itself",
    );
    assert!(n3 >= n2);
    let r = p.ctl("a", r#"{"v":1,"cmd":"giveback"}"#);
    assert_eq!(outcome(&r), "completed", "{r}");
    p.wait_state("b", "Normal", 20);
    let gap = w.max_gap_ms.load(Ordering::Relaxed);
    let done = w.completed.load(Ordering::Relaxed);
    w.verify(p.svc[1], "aggr-b", "at the end");
    w.finish();
    let out = qemu.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img bench failed across the moves: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // qemu's writes all landed.
    let check = Command::new("qemu-io")
        .args([
            "--image-opts",
            &qemu_opts.replace(",reconnect-delay=20", ""),
            "-c",
            &format!("read -P 90 {} {}", 16u64 << 20, 8000u64 * 4096),
        ])
        .output()
        .unwrap();
    let txt = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success() && !txt.contains("Pattern verification failed"),
        "qemu's data: {txt}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    eprintln!("client: {done} writes acknowledged, longest gap between completions {gap} ms");
}

#[test]
fn countdown_expiry_forces_takeover_and_the_node_stays_down() {
    let p = Pair::new(10_000);
    let w = Writer::start(p.svc[1], "aggr-b", 1024, 2);
    std::thread::sleep(Duration::from_millis(600));
    w.verify(p.svc[1], "aggr-b", "before");
    // A countdown far shorter than b's graceful shutdown (drain, final CP): it runs out, a sends
    // *takeover*, b halts, and a forces the takeover (fenced by please-die).
    let r = p.ctl("a", r#"{"v":1,"cmd":"takeover","of":"b","countdown_ms":5}"#);
    assert_eq!(outcome(&r), "completed", "{r}");
    let kind = r["outcome"]["report"]["kind"].as_str().unwrap().to_string();
    // A 5 ms countdown expires long before b's drain and final CP finish, so this is a forced
    // takeover; on a machine so loaded that the countdown tick itself comes late it can still
    // be graceful, which the expiry tests of the HA loop (tests/ha_loop.rs) cover exactly.
    assert!(kind.contains("forced") || kind.contains("graceful"), "{r}");
    if !kind.contains("forced") {
        eprintln!("NOTE: the countdown did not expire first on this run ({kind})");
    }
    eprintln!("forced takeover: {}", phases(&r));
    // b found please-die and does not serve.
    p.wait_state("b", "TakenOver", 20);
    let n = w.verify(p.svc[1], "aggr-b", "after forced takeover");
    assert!(n > 0);
    let r = p.ctl("a", r#"{"v":1,"cmd":"giveback"}"#);
    assert_eq!(outcome(&r), "completed", "{r}");
    p.wait_state("b", "Normal", 20);
    w.verify(p.svc[1], "aggr-b", "after giveback");
    w.finish();
}

#[test]
fn sigkill_gives_hard_takeover_and_a_rebooted_node_waits_for_giveback() {
    let mut p = Pair::new(10_000);
    let w = Writer::start(p.svc[0], "aggr-a", 1024, 3);
    std::thread::sleep(Duration::from_millis(800));
    w.verify(p.svc[0], "aggr-a", "before");
    let t0 = Instant::now();
    p.signal("a", libc::SIGKILL);
    p.wait_state("b", "InTakeover", 30);
    eprintln!(
        "hard takeover done {} ms after SIGKILL",
        t0.elapsed().as_millis()
    );
    let n = w.verify(p.svc[0], "aggr-a", "after hard takeover");
    assert!(n > 0);
    // a reboots: it finds itself taken over and waits, serving nothing.
    p.start("a");
    p.wait_state("a", "TakenOver", 30);
    // b learns it from a's mailbox slot or the interconnect, a beat later: a giveback asked
    // before that is refused ("a is not waiting for giveback"), as it should be.
    p.wait_seen_as("b", "a", "TakenOver", 30);
    let st = p.ctl("b", r#"{"v":1,"cmd":"status"}"#);
    assert!(
        st["status"]["aggregates"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["served_by"] == "b"),
        "{st}"
    );
    let r = p.ctl("b", r#"{"v":1,"cmd":"giveback"}"#);
    assert_eq!(outcome(&r), "completed", "{r}");
    p.wait_state("a", "Normal", 30);
    w.verify(p.svc[0], "aggr-a", "after giveback to the rebooted node");
    w.finish();
}

#[test]
fn a_node_that_lost_its_nvram_restores_its_log_from_the_partners_mirror() {
    // Long CP interval and a large log: the writes below stay in the log (and the mirror) only.
    let mut p = Pair::with(10_000, 20_000, 600_000, 32);
    let w = Writer::start(p.svc[1], "aggr-b", 1024, 4);
    std::thread::sleep(Duration::from_millis(700));
    let n = w.verify(p.svc[1], "aggr-b", "before the crash");
    assert!(n > 100, "the client wrote ({n} blocks)");
    w.pause.store(true, Ordering::Release);
    while !w.idle.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(10));
    }
    // b dies with its NVRAM: the log file is gone. Its aggregate was not closed cleanly.
    p.signal("b", libc::SIGKILL);
    let log = p.dir.path().join("b-aggr-b.log");
    assert!(log.exists());
    std::fs::remove_file(&log).unwrap();
    p.start("b");
    p.wait_state("b", "Normal", 60);
    assert!(
        p.log("b")
            .contains("NVRAM log restored from the partner's mirror"),
        "{}",
        tail(&p.log("b"))
    );
    // Every acknowledged write is back, served by b from its own aggregate.
    let m = w.verify(
        p.svc[1],
        "aggr-b",
        "after restoring the log from the mirror",
    );
    assert_eq!(m, n);
    w.finish();
}

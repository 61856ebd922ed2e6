//! hapair-prtest: the fencing scenario on real SCSI devices.
//!
//! Takes two device paths that are two initiators ("hosts", I_T nexuses) to ONE logical unit,
//! e.g. the `/dev/sdX` of two iSCSI sessions with different initiator names to one LIO target,
//! or of two LIO tcm_loop targets over one backstore (tests/vm/run.sh builds either in a nested
//! VM). Path A plays the home node `a`, path B the partner `b`.
//!
//! Every step is printed; every expectation is checked; the exit status is non-zero on the
//! first failed expectation (after a best-effort CLEAR of what the run registered).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{anyhow, bail, ensure, Context, Result};
use clap::Parser;
use hapair::core::scsi::{ReservationKey, ReservationType};
use hapair::io::buf::IoBuf;
use hapair::io::sg::{probe, retry_unit_attention, PrDevice, PrSupport, SgError};

/// The reservation type hapair fences with: Write Exclusive (1h), not Write Exclusive –
/// Registrants Only (5h).
///
/// Why: both nodes stay registered on every member all the time, because PREEMPT (AND ABORT)
/// may only be sent by a registered I_T nexus, and a node that must register first at
/// takeover time would add a command to the critical path and could find itself refused.
/// With both nodes registered, WE-RO lets *every registrant* write, so the disks would let
/// the partner write the home node's aggregate: "at most one node writes" would rest on
/// software alone. Write Exclusive lets only the reservation holder write; a registered
/// non-holder, an unregistered initiator and a preempted node all get RESERVATION CONFLICT,
/// while everybody may still read (the partner needs to read mailboxes and, at takeover, the
/// log). A fenced node that reboots and registers again is still only a registrant, so it
/// still cannot write: the fence survives a restart of the victim. The scenario demonstrates
/// each of these facts, including WE-RO letting the registered partner write.
///
/// Consequences: a node can write only the members it holds, so a node's mailbox heartbeat
/// must live on disks it holds (its own aggregates) and be read by the partner; and the
/// holder is one I_T nexus, so a node reaching a disk through several paths would need
/// REGISTER AND MOVE or a registrants type plus software — hapair assumes one path per node.
const FENCING_TYPE: ReservationType = ReservationType::WriteExclusive;

/// Key of node a: ASCII "hapair" then 00 'a'.
const KEY_A: ReservationKey = 0x6861_7061_6972_0061;
/// Key of node b: ASCII "hapair" then 00 'b'.
const KEY_B: ReservationKey = 0x6861_7061_6972_0062;

/// Unit attentions tolerated in a row before a command must give its real answer.
const UA_ATTEMPTS: u32 = 4;

/// Run the SCSI-3 PR fencing scenario on two initiators to one LUN.
#[derive(Parser)]
struct Args {
    /// Device of the home node (node a), e.g. /dev/sda.
    #[arg(long)]
    node_a: PathBuf,
    /// Device of the partner (node b) for the SAME logical unit, e.g. /dev/sdb.
    #[arg(long)]
    node_b: PathBuf,
    /// How the partner fences at takeover: `preempt-and-abort` (hapair's fence) or `preempt`.
    /// Use `preempt` on LIO through tcm_loop, where PREEMPT AND ABORT deadlocks the target
    /// (Debian 6.1 and 6.12: core_tmr_lun_reset flushes the submission work it runs in); LIO
    /// over iSCSI takes PREEMPT AND ABORT.
    #[arg(long, value_enum, default_value_t = Fence::PreemptAndAbort)]
    fence: Fence,
    /// sg_persist binary used to show keys and reservation as an operator sees them.
    #[arg(long, default_value = "sg_persist")]
    sg_persist: PathBuf,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Fence {
    PreemptAndAbort,
    Preempt,
}

struct Node {
    name: &'static str,
    key: ReservationKey,
    dev: PrDevice,
}

struct Run {
    a: Node,
    b: Node,
    sg_persist: PathBuf,
    fence: Fence,
    block_len: u32,
    /// What each LBA we touched must contain (model of the LUN).
    model: BTreeMap<u32, Vec<u8>>,
    step: u32,
    writes: u32,
}

fn step(run: &mut Run, what: &str) {
    run.step += 1;
    println!("\n== step {}: {what}", run.step);
}

fn ok(what: impl AsRef<str>) {
    println!("   ok: {}", what.as_ref());
}

/// Retry through unit attentions, printing each one (they are expected after preemption).
fn ua<T>(node: &Node, f: impl FnMut() -> Result<T, SgError>) -> Result<T, SgError> {
    retry_unit_attention(
        UA_ATTEMPTS,
        |e| println!("   node {}: unit attention: {}", node.name, chain(e)),
        f,
    )
}

impl Run {
    fn node(&self, which: char) -> &Node {
        if which == 'a' {
            &self.a
        } else {
            &self.b
        }
    }

    fn pattern(&mut self, who: &str) -> Vec<u8> {
        self.writes += 1;
        let mut block = vec![(self.writes as u8).wrapping_mul(37) | 1; self.block_len as usize];
        let tag = format!("hapair-prtest write {} by node {who}", self.writes);
        block[..tag.len()].copy_from_slice(tag.as_bytes());
        block
    }

    /// Read `lba` through `which` and compare with the model.
    fn expect_content(&self, which: char, lba: u32) -> Result<()> {
        let node = self.node(which);
        let mut buf = IoBuf::new(self.block_len as usize);
        ua(node, || node.dev.read_blocks(lba, self.block_len, &mut buf))
            .with_context(|| format!("node {} READ(10) lba {lba}", node.name))?;
        let want = self
            .model
            .get(&lba)
            .cloned()
            .unwrap_or_else(|| vec![0; buf.len()]);
        ensure!(
            buf[..] == want[..],
            "node {} read lba {lba}: content differs from the last accepted write \
             (got {:?}..., want {:?}...)",
            node.name,
            String::from_utf8_lossy(&buf[..40]),
            String::from_utf8_lossy(&want[..40])
        );
        ok(format!(
            "node {} reads lba {lba}: content is the last accepted write",
            node.name
        ));
        Ok(())
    }

    fn expect_write_ok(&mut self, which: char, lba: u32) -> Result<()> {
        let name = self.node(which).name;
        let data = self.pattern(name);
        let mut buf = IoBuf::new(data.len());
        buf.copy_from_slice(&data);
        let node = self.node(which);
        ua(node, || {
            node.dev.write_blocks(lba, self.block_len, &buf, false)
        })
        .with_context(|| format!("node {name} WRITE(10) lba {lba} should succeed"))?;
        ok(format!("node {name} WRITE(10) lba {lba} accepted"));
        self.model.insert(lba, data);
        self.expect_content(which, lba)
    }

    fn expect_write_conflict(&mut self, which: char, lba: u32) -> Result<()> {
        let name = self.node(which).name;
        let data = self.pattern(name);
        let mut buf = IoBuf::new(data.len());
        buf.copy_from_slice(&data);
        let node = self.node(which);
        match ua(node, || {
            node.dev.write_blocks(lba, self.block_len, &buf, false)
        }) {
            Ok(()) => bail!("node {name} WRITE(10) lba {lba} was ACCEPTED; it must be fenced"),
            Err(e) if e.is_reservation_conflict() => ok(format!(
                "node {name} WRITE(10) lba {lba} refused: {}",
                chain(&e)
            )),
            Err(e) => {
                return Err(anyhow!(e)).context(format!(
                    "node {name} WRITE(10) lba {lba}: want RESERVATION CONFLICT"
                ))
            }
        }
        // The refused data must not have reached the medium: check through both paths.
        self.expect_content('a', lba)?;
        self.expect_content('b', lba)
    }

    fn expect_keys(&self, which: char, want: &[ReservationKey]) -> Result<u32> {
        let node = self.node(which);
        let keys = ua(node, || node.dev.read_keys())
            .with_context(|| format!("node {} READ KEYS", node.name))?;
        let mut got = keys.keys.clone();
        got.sort_unstable();
        let mut want = want.to_vec();
        want.sort_unstable();
        ensure!(
            got == want,
            "node {} READ KEYS: registered keys {} but want {}",
            node.name,
            fmt_keys(&got),
            fmt_keys(&want)
        );
        ok(format!(
            "node {} READ KEYS: generation {:#x}, keys {}",
            node.name,
            keys.generation,
            fmt_keys(&got)
        ));
        Ok(keys.generation)
    }

    fn expect_reservation(
        &self,
        which: char,
        want: Option<(ReservationKey, ReservationType)>,
    ) -> Result<()> {
        let node = self.node(which);
        let st = ua(node, || node.dev.read_reservation())
            .with_context(|| format!("node {} READ RESERVATION", node.name))?;
        let got = st.reservation.map(|r| (r.key, r.rtype));
        ensure!(
            got == want,
            "node {} READ RESERVATION: got {} want {}",
            node.name,
            fmt_res(got),
            fmt_res(want)
        );
        ok(format!(
            "node {} READ RESERVATION: {}",
            node.name,
            fmt_res(got)
        ));
        Ok(())
    }

    /// Show what an operator sees with sg_persist, and check that it agrees.
    fn sg_persist(
        &self,
        which: char,
        keys: &[ReservationKey],
        res: Option<(ReservationKey, ReservationType)>,
    ) -> Result<()> {
        let node = self.node(which);
        let path = node.dev.path();
        let run = |flag: &str| -> Result<String> {
            let mut text = String::new();
            // The first call on a nexus may consume a pending unit attention: retry once.
            for attempt in 0..2 {
                let out = Command::new(&self.sg_persist)
                    .args(["--in", flag])
                    .arg(path)
                    .output()
                    .with_context(|| format!("run {}", self.sg_persist.display()))?;
                text = String::from_utf8_lossy(&out.stdout).into_owned()
                    + &String::from_utf8_lossy(&out.stderr);
                if out.status.success() {
                    println!("   $ sg_persist --in {flag} {}", path.display());
                    for line in text.lines() {
                        println!("   | {line}");
                    }
                    return Ok(text);
                }
                if attempt == 0 {
                    println!(
                        "   (sg_persist {flag} exited {}; retrying once)",
                        out.status
                    );
                }
            }
            bail!("sg_persist --in {flag} {} failed:\n{text}", path.display())
        };
        let k = run("--read-keys")?;
        for key in keys {
            ensure!(
                k.contains(&format!("0x{key:x}")),
                "sg_persist does not list key {key:#x}"
            );
        }
        if keys.is_empty() {
            ensure!(
                k.to_lowercase().contains("no registered reservation keys"),
                "sg_persist lists keys"
            );
        }
        let r = run("--read-reservation")?;
        match res {
            Some((key, rtype)) => {
                ensure!(
                    r.contains(&format!("Key=0x{key:x}")),
                    "sg_persist shows another holder"
                );
                let type_line = r
                    .lines()
                    .find(|l| l.contains("scope:") && l.contains("type:"))
                    .ok_or_else(|| anyhow!("sg_persist shows no reservation type"))?;
                let shown = type_line.rsplit("type:").next().unwrap_or("").trim();
                ensure!(
                    shown.eq_ignore_ascii_case(rtype.name()),
                    "sg_persist shows type {shown:?}, want {:?}",
                    rtype.name()
                );
            }
            None => ensure!(
                r.to_lowercase().contains("no reservation"),
                "sg_persist shows a reservation"
            ),
        }
        ok(format!("sg_persist on node {} agrees", node.name));
        Ok(())
    }
}

/// An error with its causes, `outer: inner: ...`.
fn chain(e: &SgError) -> String {
    let mut s = e.to_string();
    let mut cur: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn fmt_keys(keys: &[ReservationKey]) -> String {
    let v: Vec<String> = keys.iter().map(|k| format!("{k:#018x}")).collect();
    format!("[{}]", v.join(", "))
}

fn fmt_res(r: Option<(ReservationKey, ReservationType)>) -> String {
    match r {
        Some((k, t)) => format!("held by {k:#018x}, type {t}"),
        None => "no reservation".into(),
    }
}

fn scenario(run: &mut Run) -> Result<()> {
    let (ka, kb) = (KEY_A, KEY_B);
    let a_holds = Some((ka, FENCING_TYPE));
    let b_holds = Some((kb, FENCING_TYPE));

    step(run, "both paths reach the same LUN with nothing registered");
    run.expect_keys('a', &[])?;
    run.expect_keys('b', &[])?;
    run.expect_reservation('a', None)?;
    // Give every block the scenario touches a known content (no reservation yet: both may
    // write), and check that b sees a's writes: one logical unit behind two nexuses.
    for lba in 0..4 {
        run.expect_write_ok('a', lba)?;
        run.expect_content('b', lba)?;
    }

    step(run, "each node registers its own key");
    ua(&run.a, || run.a.dev.register(0, ka)).context("node a REGISTER")?;
    ok("node a REGISTER");
    ua(&run.b, || run.b.dev.register(0, kb)).context("node b REGISTER")?;
    ok("node b REGISTER");
    // Registering the same key again through REGISTER would need the current key: a node
    // restarting without knowing its state uses REGISTER AND IGNORE EXISTING KEY.
    ua(&run.b, || run.b.dev.register_ignore(kb))
        .context("node b REGISTER AND IGNORE EXISTING KEY")?;
    ok("node b REGISTER AND IGNORE EXISTING KEY (idempotent re-registration)");
    let g0 = run.expect_keys('a', &[ka, kb])?;
    run.expect_keys('b', &[ka, kb])?;

    step(
        run,
        "why not Write Exclusive - Registrants Only: a registered partner can write",
    );
    let wero = ReservationType::WriteExclusiveRegistrantsOnly;
    ua(&run.a, || run.a.dev.reserve(ka, wero)).context("node a RESERVE WE-RO")?;
    run.expect_reservation('b', Some((ka, wero)))?;
    run.expect_write_ok('b', 1)?;
    println!("   => under WE-RO both registered nodes can write: not a fence between them");
    ua(&run.a, || run.a.dev.release(ka, wero)).context("node a RELEASE WE-RO")?;
    ok("node a RELEASE");
    run.expect_reservation('a', None)?;

    step(run, format!("home node a reserves {FENCING_TYPE}").as_str());
    ua(&run.a, || run.a.dev.reserve(ka, FENCING_TYPE)).context("node a RESERVE")?;
    ok("node a RESERVE");
    // RESERVE of what it already holds is not a conflict (SPC-4), so a retrying node is safe.
    ua(&run.a, || run.a.dev.reserve(ka, FENCING_TYPE)).context("node a RESERVE again")?;
    ok("node a RESERVE again (idempotent)");
    run.expect_reservation('a', a_holds)?;
    run.expect_reservation('b', a_holds)?;
    match ua(&run.b, || run.b.dev.reserve(kb, FENCING_TYPE)) {
        Err(e) if e.is_reservation_conflict() => {
            ok(format!("node b RESERVE refused: {}", chain(&e)))
        }
        other => bail!("node b RESERVE while a holds: want RESERVATION CONFLICT, got {other:?}"),
    }
    run.sg_persist('b', &[ka, kb], a_holds)?;

    step(
        run,
        "home node a writes; registered partner b cannot; b still reads",
    );
    run.expect_write_ok('a', 2)?;
    run.expect_write_conflict('b', 2)?;
    run.expect_write_conflict('b', 3)?;

    step(run, "an unregistered initiator cannot write either");
    ua(&run.b, || run.b.dev.register(kb, 0)).context("node b unregister")?;
    ok("node b REGISTER with new key 0 (unregister)");
    run.expect_keys('a', &[ka])?;
    run.expect_write_conflict('b', 2)?;
    ua(&run.b, || run.b.dev.register(0, kb)).context("node b re-register")?;
    ok("node b REGISTER again");
    run.expect_keys('b', &[ka, kb])?;

    match run.fence {
        Fence::PreemptAndAbort => {
            step(run, "takeover: partner b fences a with PREEMPT AND ABORT");
            ua(&run.b, || run.b.dev.preempt_and_abort(kb, ka, FENCING_TYPE))
                .context("node b PREEMPT AND ABORT")?;
            ok("node b PREEMPT AND ABORT of a's key");
        }
        Fence::Preempt => {
            step(
                run,
                "takeover: partner b fences a with PREEMPT (--fence preempt)",
            );
            ua(&run.b, || run.b.dev.preempt(kb, ka, FENCING_TYPE)).context("node b PREEMPT")?;
            ok("node b PREEMPT of a's key");
        }
    }
    let g1 = run.expect_keys('b', &[kb])?;
    ensure!(
        g1 > g0,
        "PR generation did not advance over the preemption ({g0:#x} -> {g1:#x})"
    );
    run.expect_reservation('b', b_holds)?;

    step(run, "fenced node a cannot write; new holder b can");
    // a's first command gets the unit attention REGISTRATIONS PREEMPTED, then conflicts.
    run.expect_write_conflict('a', 2)?;
    run.expect_write_ok('b', 2)?;
    run.expect_write_ok('b', 3)?;
    run.expect_write_conflict('a', 3)?;
    run.expect_reservation('a', b_holds)?;
    match ua(&run.a, || run.a.dev.reserve(ka, FENCING_TYPE)) {
        Err(e) if e.is_reservation_conflict() => {
            ok(format!("fenced node a RESERVE refused: {}", chain(&e)))
        }
        other => bail!("fenced node a RESERVE: want RESERVATION CONFLICT, got {other:?}"),
    }
    run.sg_persist('a', &[kb], b_holds)?;

    step(
        run,
        "fenced node a reboots and registers again: still cannot write",
    );
    ua(&run.a, || run.a.dev.register_ignore(ka))
        .context("node a REGISTER AND IGNORE EXISTING KEY")?;
    ok("node a REGISTER AND IGNORE EXISTING KEY");
    run.expect_keys('a', &[ka, kb])?;
    run.expect_write_conflict('a', 2)?;
    run.expect_write_ok('b', 1)?;

    step(
        run,
        "giveback: b has drained; a takes the reservation back with PREEMPT, b re-registers",
    );
    // Handing back with PREEMPT by the home node moves the reservation in one command: there
    // is never a moment without a reservation (RELEASE then RESERVE would leave one, in which
    // any initiator may write). Plain PREEMPT, not AND ABORT: b has drained and has nothing
    // in flight that needs aborting.
    ua(&run.a, || run.a.dev.preempt(ka, kb, FENCING_TYPE)).context("node a PREEMPT")?;
    ok("node a PREEMPT of b's key");
    run.expect_keys('a', &[ka])?;
    ua(&run.b, || run.b.dev.register_ignore(kb)).context("node b re-register after giveback")?;
    ok("node b REGISTER AND IGNORE EXISTING KEY");
    run.expect_keys('a', &[ka, kb])?;
    run.expect_reservation('b', a_holds)?;

    step(
        run,
        "after giveback: a writes, b is refused again (first state)",
    );
    run.expect_write_ok('a', 2)?;
    run.expect_write_conflict('b', 2)?;
    run.expect_write_conflict('b', 0)?;

    step(run, "READ FULL STATUS: two initiators, a holds");
    let fs = ua(&run.b, || run.b.dev.read_full_status()).context("node b READ FULL STATUS")?;
    for d in &fs.descriptors {
        println!(
            "   key {:#018x} holder={} type={} all_tg_pt={} rel_tgt_port={} transport_id={}",
            d.key,
            d.holder,
            d.rtype.map_or("-".into(), |t| t.to_string()),
            d.all_tg_pt,
            d.relative_target_port,
            d.transport_id
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        );
    }
    ensure!(
        fs.descriptors.len() == 2,
        "want 2 registrations, got {}",
        fs.descriptors.len()
    );
    let da = fs
        .descriptors
        .iter()
        .find(|d| d.key == ka)
        .ok_or_else(|| anyhow!("a's key missing"))?;
    let db = fs
        .descriptors
        .iter()
        .find(|d| d.key == kb)
        .ok_or_else(|| anyhow!("b's key missing"))?;
    ensure!(
        da.holder && da.rtype == Some(FENCING_TYPE),
        "a is not the {FENCING_TYPE} holder"
    );
    ensure!(!db.holder, "b is marked holder too");
    ensure!(
        da.transport_id != db.transport_id,
        "both registrations come from one initiator"
    );
    ok("a holds, b registered only, from two different initiator ports");
    run.sg_persist('a', &[ka, kb], a_holds)?;
    Ok(())
}

/// Leave the LUN as found: no registrations, no reservation. Any registered nexus may CLEAR.
fn cleanup(run: &Run) -> Result<()> {
    let a = &run.a;
    ua(a, || a.dev.register_ignore(a.key)).context("cleanup: node a REGISTER AND IGNORE")?;
    ua(a, || a.dev.clear(a.key)).context("cleanup: node a CLEAR")?;
    let keys = ua(&run.b, || run.b.dev.read_keys()).context("cleanup: READ KEYS")?;
    ensure!(
        keys.keys.is_empty(),
        "keys left after CLEAR: {}",
        fmt_keys(&keys.keys)
    );
    let res = ua(&run.b, || run.b.dev.read_reservation()).context("cleanup: READ RESERVATION")?;
    ensure!(res.reservation.is_none(), "reservation left after CLEAR");
    println!("\n== cleanup: CLEAR by node a; no keys and no reservation remain");
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match real_main(args) {
        Ok(()) => {
            println!("\nPASS: at most one node could write at every step");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("\nFAIL: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(args: Args) -> Result<()> {
    for (name, path) in [("a", &args.node_a), ("b", &args.node_b)] {
        match probe(path).with_context(|| format!("probe node {name} {}", path.display()))? {
            PrSupport::Supported { keys } => println!(
                "probe node {name} {}: persistent reservations supported (generation {:#x}, {} keys)",
                path.display(),
                keys.generation,
                keys.keys.len()
            ),
            PrSupport::Unsupported(why) => {
                bail!("node {name} {}: no persistent reservations: {why}", path.display())
            }
        }
    }
    let a = PrDevice::open(&args.node_a).context("open node a")?;
    let b = PrDevice::open(&args.node_b).context("open node b")?;
    let mut run = Run {
        a: Node {
            name: "a",
            key: KEY_A,
            dev: a,
        },
        b: Node {
            name: "b",
            key: KEY_B,
            dev: b,
        },
        sg_persist: args.sg_persist,
        fence: args.fence,
        block_len: 0,
        model: BTreeMap::new(),
        step: 0,
        writes: 0,
    };
    let cap = ua(&run.a, || run.a.dev.read_capacity()).context("READ CAPACITY")?;
    println!(
        "LUN: {} blocks of {} bytes",
        u64::from(cap.last_lba) + 1,
        cap.block_len
    );
    ensure!(cap.last_lba >= 4, "LUN too small for the scenario");
    ensure!(
        cap.block_len >= 64,
        "block length {} too small for the tags",
        cap.block_len
    );
    run.block_len = cap.block_len;
    // A LUN left registered by an earlier, interrupted run: start from a clean slate.
    let leftover = ua(&run.a, || run.a.dev.read_keys()).context("READ KEYS")?;
    if !leftover.keys.is_empty() {
        println!(
            "LUN has leftover keys {}: clearing first",
            fmt_keys(&leftover.keys)
        );
        cleanup(&run)?;
    }
    let result = scenario(&mut run);
    let clean = cleanup(&run);
    result?;
    clean
}

//! Deterministic simulation of the takeover state machines (see `hapair::core::sim`).
//!
//! `HAPAIR_SIM_SEED=1234 cargo test --test sim_takeover swarm` replays one seed (with logs if
//! `RUST_LOG` is set); `HAPAIR_SIM_SEEDS=N` changes how many seeds the swarm runs.

use hapair::core::sim::{run_seed, Faults, Sim, SimConfig};
use hapair::core::takeover::{NodeId, OperatorCmd, ProcedureKind, State, TakeoverKind};

const SWARM_MS: u64 = 10_000;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name)
        .ok()
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name}: not a number")))
}

/// Runs `count` seeds from `base` (overridable with HAPAIR_SIM_BASE / HAPAIR_SIM_SEEDS);
/// `HAPAIR_SIM_SEED` replays exactly one seed instead, with logs when `RUST_LOG` is set.
fn swarm(base: u64, count: u64) {
    if let Some(seed) = env_u64("HAPAIR_SIM_SEED") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        println!("replaying seed {seed}: {:?}", SimConfig::swarm(seed).faults);
        match run_seed(seed, SWARM_MS) {
            Ok(stats) => println!("seed {seed} ok: {stats:?}"),
            Err(v) => panic!("seed {seed} failed: {v}"),
        }
        return;
    }
    let count = env_u64("HAPAIR_SIM_SEEDS").unwrap_or(count);
    let base = env_u64("HAPAIR_SIM_BASE").map_or(base, |b| b + base);
    let (mut takeovers, mut givebacks, mut crashes, mut acked) = (0, 0, 0, 0);
    for seed in base..base + count {
        let replay = format!("replay: HAPAIR_SIM_SEED={seed} RUST_LOG=info cargo test --test sim_takeover swarm -- --nocapture");
        match std::panic::catch_unwind(|| run_seed(seed, SWARM_MS)) {
            Ok(Ok(s)) => {
                takeovers += s.takeovers;
                givebacks += s.givebacks;
                crashes += s.crashes;
                acked += s.writes_acked;
            }
            Ok(Err(v)) => panic!("seed {seed} violated an invariant: {v}\n{replay}"),
            Err(_) => panic!("seed {seed} panicked\n{replay}"),
        }
    }
    println!("seeds {base}..{}: {takeovers} takeovers, {givebacks} givebacks, {crashes} crashes, {acked} acked writes", base + count);
    // The swarm must actually exercise the interesting paths, or it proves nothing.
    assert!(takeovers > count / 4, "too few takeovers: {takeovers}");
    assert!(givebacks > count / 20, "too few givebacks: {givebacks}");
    assert!(
        crashes > 0 && acked > count * 100,
        "crashes {crashes}, acked {acked}"
    );
}

// Two halves so that the test harness runs them on both cores.
#[test]
fn swarm_first_half() {
    swarm(0, 1_000);
}

#[test]
fn swarm_second_half() {
    if env_u64("HAPAIR_SIM_SEED").is_some() {
        return; // the first half replays it
    }
    swarm(1_000, 1_000);
}

#[test]
fn same_seed_same_run() {
    for seed in [3, 77, 1_001] {
        let a = run_seed(seed, 10_000);
        let b = run_seed(seed, 10_000);
        assert_eq!(a, b, "seed {seed} is not deterministic");
    }
}

fn quiet(seed: u64) -> Sim {
    let mut c = SimConfig::new(seed);
    c.faults = Faults::none();
    Sim::new(c)
}

fn settle(sim: &mut Sim, t: u64) {
    assert_eq!(sim.run_until(t), None);
}

#[test]
fn boot_serves_both_aggregates() {
    let mut sim = quiet(1);
    settle(&mut sim, 2_000);
    assert_eq!(sim.state(NodeId::A), Some(State::Normal));
    assert_eq!(sim.state(NodeId::B), Some(State::Normal));
    assert_eq!(sim.ip_holder(NodeId::A), Some(NodeId::A));
    assert!(sim.stats.writes_acked > 50, "{:?}", sim.stats);
}

#[test]
fn operator_takeover_completes_then_giveback_completes() {
    let mut sim = quiet(2);
    sim.operator_at(2_000, NodeId::A, OperatorCmd::TakeoverSelf);
    settle(&mut sim, 4_000);
    assert_eq!(sim.state(NodeId::A), Some(State::TakenOver));
    assert_eq!(sim.state(NodeId::B), Some(State::InTakeover));
    assert_eq!(sim.ip_holder(NodeId::A), Some(NodeId::B));
    let tk = sim.node(NodeId::B).unwrap().status().last_takeover.unwrap();
    assert_eq!(tk.kind, ProcedureKind::Takeover(TakeoverKind::Graceful));
    assert!(tk.fenced && tk.phases.len() == 5);
    let acked = sim.stats.writes_acked;
    settle(&mut sim, 5_000);
    assert!(
        sim.stats.writes_acked > acked + 20,
        "writes continue at the partner"
    );

    sim.operator_at(5_000, NodeId::B, OperatorCmd::Giveback);
    settle(&mut sim, 7_000);
    assert_eq!(sim.state(NodeId::A), Some(State::Normal));
    assert_eq!(sim.state(NodeId::B), Some(State::Normal));
    assert_eq!(sim.ip_holder(NodeId::A), Some(NodeId::A));
    assert_eq!(sim.stats.givebacks, 1);
    // The giveback finished once A served again (here B first hears of A's resume when it
    // already serves).
    let a = sim.node(NodeId::A).unwrap().status();
    let gb = sim.node(NodeId::B).unwrap().status().last_giveback.unwrap();
    assert!(
        gb.finished_ms.unwrap() >= a.state_since_ms
            && gb.partner_resume.as_ref().unwrap().abandoned.is_none(),
        "A serving since {}: {gb:?}",
        a.state_since_ms
    );
    let acked = sim.stats.writes_acked;
    settle(&mut sim, 8_000);
    assert!(
        sim.stats.writes_acked > acked + 20,
        "writes continue after giveback"
    );
}

#[test]
fn takeover_of_partner_from_the_taker_completes() {
    let mut sim = quiet(3);
    sim.operator_at(2_000, NodeId::A, OperatorCmd::TakeoverOf(NodeId::B));
    settle(&mut sim, 4_000);
    assert_eq!(sim.state(NodeId::B), Some(State::TakenOver));
    assert_eq!(sim.state(NodeId::A), Some(State::InTakeover));
}

#[test]
fn countdown_expiry_forces_takeover() {
    let mut sim = quiet(4);
    sim.hang_drain(NodeId::A);
    sim.operator_at(2_000, NodeId::B, OperatorCmd::TakeoverOf(NodeId::A));
    settle(&mut sim, 3_900);
    assert_eq!(
        sim.state(NodeId::B),
        Some(State::AwaitingShutdown),
        "countdown is 2 s"
    );
    assert_eq!(sim.state(NodeId::A), Some(State::ShuttingDown));
    settle(&mut sim, 5_000);
    assert_eq!(sim.state(NodeId::A), Some(State::TakenOver));
    assert_eq!(sim.state(NodeId::B), Some(State::InTakeover));
    let tk = sim.node(NodeId::B).unwrap().status().last_takeover.unwrap();
    assert_eq!(tk.kind, ProcedureKind::Takeover(TakeoverKind::Forced));
}

#[test]
fn crash_leads_to_hard_takeover_and_reboot_waits_for_giveback() {
    let mut sim = quiet(5);
    sim.crash_at(2_000, NodeId::B);
    settle(&mut sim, 2_000 + 1_400);
    assert_eq!(sim.state(NodeId::A), Some(State::InTakeover));
    let tk = sim.node(NodeId::A).unwrap().status().last_takeover.unwrap();
    assert_eq!(tk.kind, ProcedureKind::Takeover(TakeoverKind::Hard));
    settle(&mut sim, 9_000); // B restarted (0.5-5 s) and honours please-die
    assert_eq!(sim.state(NodeId::B), Some(State::TakenOver));
    assert_eq!(sim.ip_holder(NodeId::B), Some(NodeId::A));
    sim.operator_at(9_000, NodeId::A, OperatorCmd::Giveback);
    settle(&mut sim, 11_000);
    assert_eq!(sim.state(NodeId::B), Some(State::Normal));
    assert_eq!(sim.ip_holder(NodeId::B), Some(NodeId::B));
}

#[test]
fn interconnect_partition_alone_never_takes_over() {
    let mut sim = quiet(6);
    settle(&mut sim, 1_000);
    sim.partition(10_000);
    settle(&mut sim, 10_000);
    assert_eq!(sim.state(NodeId::A), Some(State::Normal));
    assert_eq!(sim.state(NodeId::B), Some(State::Normal));
    assert_eq!(sim.stats.takeovers, 0);
    for n in [NodeId::A, NodeId::B] {
        let st = sim.node(n).unwrap().status();
        assert!(st.alarms.iter().any(|e| matches!(
            e.alarm,
            hapair::core::takeover::Alarm::InterconnectDown { .. }
        )));
    }
}

/// The invariants can fail: with the fence switched off, some seed breaks them.
#[test]
fn invariants_catch_a_takeover_without_fence() {
    let mut found = None;
    for seed in 0..300 {
        let mut c = SimConfig::swarm(seed);
        c.node.unsafe_skip_fence = true;
        let mut sim = Sim::new(c);
        if let Some(v) = sim.run_until(10_000) {
            found = Some((seed, v));
            break;
        }
    }
    let (seed, v) = found.expect("no seed caught the missing fence");
    println!("unsafe mode caught at seed {seed}: {v}");
    assert!(v.contains("not fenced") || v.contains("two writers"), "{v}");
}

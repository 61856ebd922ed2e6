//! The HA loop on real threads with a real clock: two in-process nodes connected by channels,
//! a shared in-memory mailbox, and the recording executor standing in for the node.

use hapair::core::control::{OpRequest, Outcome};
use hapair::core::takeover::{
    AckMode, Alarm, Message, ProcedureKind, RefusalReason, RequestKind, State, Step, StepError,
    TakeoverKind,
};
use hapair::daemon::ha::OpOptions;
use hapair::daemon::ha_testing::{Pair, Record, StepPlan};
use hapair::daemon::mailbox::MemStore;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(10);

fn wait() -> OpOptions {
    OpOptions {
        check_only: false,
        wait: true,
        timeout: T,
    }
}

fn pair() -> (Pair, MemStore) {
    let store = MemStore::new(3);
    let p = Pair::start(Arc::new(store.clone()), |_| {});
    assert!(p.wait_normal(T), "pair did not come up");
    (p, store)
}

const SHUTDOWN: [Step; 7] = [
    Step::StopAccepting,
    Step::DrainInFlight,
    Step::FinalCp,
    Step::ReleaseServiceIps,
    Step::CloseClients,
    Step::MarkCleanShutdown,
    Step::StopHeartbeats,
];

const TAKEOVER: [Step; 5] = [
    Step::Fence,
    Step::OpenPartnerAggregate,
    Step::ReplayPartnerLog,
    Step::TakePartnerIdentity,
    Step::ServePartnerExports,
];

fn began(recs: &[Record]) -> Vec<Step> {
    recs.iter()
        .filter_map(|r| match r {
            Record::Began(s) => Some(*s),
            _ => None,
        })
        .collect()
}

/// Wait until `n` has heard its partner in `state` (an operator request checks that view).
fn wait_partner_state(n: &hapair::daemon::ha_testing::TestNode, state: State) {
    let deadline = Instant::now() + T;
    while n.handle.snapshot().unwrap().status.partner_state != Some(state) {
        assert!(
            Instant::now() < deadline,
            "never heard the partner {state:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn takeover_from_the_partner_then_giveback() {
    let (p, _store) = pair();
    let r =
        p.a.handle
            .operator(
                OpRequest::TakeoverPartner {
                    countdown_ms: None,
                    immediate: false,
                },
                wait(),
            )
            .unwrap();
    let Outcome::Completed { state, report } = r.outcome else {
        panic!("{:?}", r.outcome)
    };
    assert_eq!(state, State::InTakeover);
    let report = report.expect("takeover report");
    assert_eq!(report.kind, "takeover (graceful)");
    let phases: Vec<&str> = report.phases.iter().map(|p| p.step.as_str()).collect();
    assert_eq!(
        phases,
        [
            "Fence",
            "OpenPartnerAggregate",
            "ReplayPartnerLog",
            "TakePartnerIdentity",
            "ServePartnerExports"
        ]
    );
    assert!(report.fenced);
    // b shut down gracefully, every step in order, and waits for giveback.
    assert!(p.b.wait_state(State::TakenOver, T));
    let b_steps = began(&p.b.rec.records());
    let tail: Vec<Step> = b_steps.iter().rev().take(7).rev().copied().collect();
    assert_eq!(tail, SHUTDOWN);
    // a acknowledges from its own NVRAM only while b is fenced, and tells b to stay down.
    assert!(p
        .a
        .rec
        .wait_for(T, |r| *r == Record::AckMode(AckMode::LocalOnly)));
    assert!(p
        .a
        .rec
        .wait_for(T, |r| matches!(r, Record::Sent(Message::PleaseDie { .. }))));
    // The mailbox says the same within a heartbeat or two.
    let deadline = Instant::now() + T;
    loop {
        let view = p.b.mailbox.read_view().unwrap();
        if view.please_die_for_me && view.partner_slot.unwrap().state == State::InTakeover {
            break;
        }
        assert!(Instant::now() < deadline, "{view:?}");
        std::thread::sleep(Duration::from_millis(5));
    }

    wait_partner_state(&p.a, State::TakenOver);
    let r = p.a.handle.operator(OpRequest::Giveback, wait()).unwrap();
    let Outcome::Completed { state, report } = r.outcome else {
        panic!("{:?}", r.outcome)
    };
    assert_eq!(state, State::Normal);
    let phases: Vec<String> = report.unwrap().phases.into_iter().map(|p| p.step).collect();
    assert_eq!(
        phases,
        [
            "DrainPartnerExports",
            "CpPartnerAggregate",
            "ReleasePartnerIps",
            "ClosePartnerAggregate",
            "ReleaseFence",
            // b bringing its aggregate up: the giveback is done when b serves.
            "PartnerResume"
        ]
    );
    assert!(p.b.wait_state(State::Normal, T));
    // b resumed without replaying the log a already replayed and checkpointed.
    let b_steps = began(&p.b.rec.records());
    assert!(
        b_steps.ends_with(&[
            Step::RegisterOwn,
            Step::RecheckMailbox,
            Step::OpenOwnAggregate,
            Step::DiscardOwnLog,
            Step::TakeOwnIps,
            Step::ServeOwnExports
        ]),
        "{b_steps:?}"
    );
    assert!(p
        .a
        .rec
        .wait_for(T, |r| *r == Record::AckMode(AckMode::Mirrored)));
    assert!(
        !p.b.mailbox.read_view().unwrap().please_die_for_me,
        "please-die cleared"
    );
    assert_eq!(
        p.b.rec.count(|r| *r == Record::Halted),
        0,
        "graceful: b never halted"
    );
}

#[test]
fn takeover_asked_at_the_node_to_be_taken_over() {
    let (p, _store) = pair();
    let r =
        p.b.handle
            .operator(OpRequest::TakeoverSelf, wait())
            .unwrap();
    assert!(
        matches!(
            r.outcome,
            Outcome::Completed {
                state: State::TakenOver,
                ..
            }
        ),
        "{:?}",
        r.outcome
    );
    assert!(p
        .b
        .rec
        .wait_for(T, |r| *r == Record::Sent(Message::PleaseTakeover)));
    assert!(p.a.wait_state(State::InTakeover, T));
    let st = p.a.handle.snapshot().unwrap().status;
    assert_eq!(
        st.last_takeover.unwrap().kind,
        ProcedureKind::Takeover(TakeoverKind::Graceful)
    );
    wait_partner_state(&p.a, State::TakenOver);
    // Not waiting: the reply comes as soon as the giveback started.
    let r =
        p.a.handle
            .operator(
                OpRequest::Giveback,
                OpOptions {
                    wait: false,
                    ..wait()
                },
            )
            .unwrap();
    assert!(
        matches!(
            r.outcome,
            Outcome::Accepted {
                state: State::GivingBack
            }
        ),
        "{:?}",
        r.outcome
    );
    assert!(p.a.wait_state(State::Normal, T));
    assert!(p.b.wait_state(State::Normal, T));
}

#[test]
fn countdown_expiry_forces_the_takeover() {
    let (p, _store) = pair();
    // b cannot finish draining: the countdown must end it.
    p.b.rec.plan(
        Step::DrainInFlight,
        StepPlan {
            hold: true,
            ..StepPlan::default()
        },
    );
    let t0 = Instant::now();
    let r =
        p.a.handle
            .operator(
                OpRequest::TakeoverPartner {
                    countdown_ms: Some(300),
                    immediate: false,
                },
                wait(),
            )
            .unwrap();
    assert!(
        matches!(
            r.outcome,
            Outcome::Completed {
                state: State::InTakeover,
                ..
            }
        ),
        "{:?}",
        r.outcome
    );
    assert!(
        t0.elapsed() >= Duration::from_millis(300),
        "not before the countdown"
    );
    assert!(p.a.rec.wait_for(T, |r| *r
        == Record::Sent(Message::PleaseShutdown { countdown_ms: 300 })));
    assert!(p
        .a
        .rec
        .wait_for(T, |r| *r == Record::Sent(Message::Takeover)));
    assert!(
        p.b.rec.wait_for(T, |r| *r == Record::Halted),
        "b forced down"
    );
    assert!(p.b.wait_state(State::TakenOver, T));
    let st = p.a.handle.snapshot().unwrap().status;
    assert_eq!(
        st.last_takeover.unwrap().kind,
        ProcedureKind::Takeover(TakeoverKind::Forced)
    );
    // The abandoned drain reports late: dropped, b stays down.
    p.b.rec.release(Step::DrainInFlight);
    assert!(p.b.rec.wait_for(T, |r| matches!(
        r,
        Record::Completed(Step::DrainInFlight, _)
    )));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(p.b.state(), State::TakenOver);
}

#[test]
fn refusals_reach_the_operator_with_reasons() {
    let (p, _store) = pair();
    // b's log stops being mirrored: a must refuse to take b over, and say why.
    p.b.handle.own_mirror(false).unwrap();
    let deadline = Instant::now() + T;
    while p.a.handle.snapshot().unwrap().status.mirror_current {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    // check_only tells the same without doing anything.
    let r =
        p.a.handle
            .operator(
                OpRequest::TakeoverPartner {
                    countdown_ms: None,
                    immediate: false,
                },
                OpOptions {
                    check_only: true,
                    ..wait()
                },
            )
            .unwrap();
    let Outcome::Refused { refusal, .. } = r.outcome else {
        panic!("{:?}", r.outcome)
    };
    assert!(
        matches!(
            refusal.reasons[..],
            [RefusalReason::MirrorNotCurrent { since_ms: Some(_) }]
        ),
        "{refusal:?}"
    );
    assert_eq!(
        p.a.rec.count(|r| matches!(r, Record::Refusal(_))),
        0,
        "check only"
    );
    let r =
        p.a.handle
            .operator(
                OpRequest::TakeoverPartner {
                    countdown_ms: None,
                    immediate: false,
                },
                wait(),
            )
            .unwrap();
    let Outcome::Refused { refusal, .. } = r.outcome else {
        panic!("{:?}", r.outcome)
    };
    assert_eq!(refusal.request, RequestKind::TakeoverOfPartner);
    assert!(matches!(
        refusal.reasons[..],
        [RefusalReason::MirrorNotCurrent { since_ms: Some(_) }]
    ));
    assert_eq!(p.a.state(), State::Normal);
    // The refusal of a please-takeover comes from the partner: a is unhealthy.
    p.b.handle.own_mirror(true).unwrap();
    p.a.handle.health(false, "nvram battery low").unwrap();
    let r =
        p.b.handle
            .operator(OpRequest::TakeoverSelf, wait())
            .unwrap();
    let Outcome::Refused { refusal, .. } = r.outcome else {
        panic!("{:?}", r.outcome)
    };
    assert_eq!(refusal.request, RequestKind::TakeoverOfSelf);
    assert!(
        refusal.reasons.contains(&RefusalReason::SelfUnhealthy {
            detail: "nvram battery low".into()
        }),
        "{refusal:?}"
    );
    assert_eq!(p.b.state(), State::Normal);
    // Giveback when nothing was taken over.
    let r = p.a.handle.operator(OpRequest::Giveback, wait()).unwrap();
    let Outcome::Refused { refusal, .. } = r.outcome else {
        panic!("{:?}", r.outcome)
    };
    assert_eq!(refusal.reasons, vec![RefusalReason::NotInTakeover]);
    // Refusals are in the status too.
    let st = p.a.handle.snapshot().unwrap().status;
    assert!(st
        .refusals
        .iter()
        .any(|r| r.request == RequestKind::Giveback));
}

#[test]
fn failed_fence_is_reported_to_the_waiting_operator() {
    let (p, _store) = pair();
    p.a.rec.plan(
        Step::Fence,
        StepPlan {
            fail: Some(StepError::Failed("sg_io: EIO".into())),
            ..StepPlan::default()
        },
    );
    let r =
        p.a.handle
            .operator(
                OpRequest::TakeoverPartner {
                    countdown_ms: None,
                    immediate: true,
                },
                wait(),
            )
            .unwrap();
    let Outcome::Failed { state, detail } = r.outcome else {
        panic!("{:?}", r.outcome)
    };
    assert_eq!(state, State::Normal);
    assert!(detail.contains("fence failed"), "{detail}");
    assert!(
        p.a.rec.count(|r| *r == Record::Began(Step::Fence)) >= 3,
        "retried before giving up"
    );
    assert_eq!(
        p.a.rec
            .count(|r| *r == Record::Began(Step::OpenPartnerAggregate)),
        0,
        "never opened unfenced"
    );
}

#[test]
fn self_fence_when_the_mailbox_loses_its_majority() {
    let (p, store) = pair();
    let t0 = Instant::now();
    store.set_broken(0, true);
    store.set_broken(1, true);
    assert!(p.a.rec.wait_for(T, |r| *r == Record::Halted));
    assert!(
        p.b.rec.wait_for(T, |r| *r == Record::Halted),
        "both lost the majority"
    );
    let took = t0.elapsed();
    // The bound counts from the last majority write, which came up to one heartbeat (40 ms)
    // before the disks broke.
    assert!(
        took >= Duration::from_millis(250 - 40),
        "not before the bound: {took:?}"
    );
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(p.a.rec.count(|r| matches!(r, Record::Alarm(Alarm::SelfFenced { reason }) if reason.contains("majority"))) >= 1);
    assert!(p.a.wait_state(State::TakenOver, T));
    assert!(p.b.wait_state(State::TakenOver, T));
    // Once the disks are back nothing resumes by itself: each waits for a giveback. (If b had
    // begun an orphan takeover of a before it self-fenced, its please-die stays in its slot,
    // so a restarted b continues that takeover and a restarted a waits: never both serving.)
    store.set_broken(0, false);
    store.set_broken(1, false);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(p.a.state(), State::TakenOver);
    assert_eq!(
        p.a.rec.count(|r| *r == Record::Halted),
        1,
        "halted once, not on every tick"
    );
    assert_eq!(p.b.state(), State::TakenOver);
}

#[test]
fn interconnect_cut_with_a_live_mailbox_alarms_and_never_takes_over() {
    let (p, _store) = pair();
    p.a.link_up.store(false, Ordering::SeqCst);
    p.b.link_up.store(false, Ordering::SeqCst);
    assert!(p.a.rec.wait_for(T, |r| matches!(
        r,
        Record::Alarm(Alarm::InterconnectDown { .. })
    )));
    assert!(p.b.rec.wait_for(T, |r| matches!(
        r,
        Record::Alarm(Alarm::InterconnectDown { .. })
    )));
    std::thread::sleep(Duration::from_millis(800)); // longer than the mailbox timeout
    assert_eq!(p.a.state(), State::Normal);
    assert_eq!(p.b.state(), State::Normal);
    assert_eq!(p.a.rec.count(|r| *r == Record::Began(Step::Fence)), 0);
    // A takeover needs the interconnect: refused with the reason.
    let r =
        p.a.handle
            .operator(
                OpRequest::TakeoverPartner {
                    countdown_ms: None,
                    immediate: false,
                },
                wait(),
            )
            .unwrap();
    let Outcome::Refused { refusal, .. } = r.outcome else {
        panic!("{:?}", r.outcome)
    };
    assert!(
        refusal
            .reasons
            .iter()
            .any(|r| matches!(r, RefusalReason::PartnerUnreachable { .. })),
        "{refusal:?}"
    );
}

#[test]
fn watch_streams_changes() {
    let (p, _store) = pair();
    let rx = p.a.handle.watch().unwrap();
    let first = rx.recv_timeout(T).unwrap();
    assert_eq!(first.status.state, State::Normal);
    let _ =
        p.a.handle
            .operator(
                OpRequest::TakeoverPartner {
                    countdown_ms: None,
                    immediate: false,
                },
                wait(),
            )
            .unwrap();
    let mut seen = vec![first.status.state];
    while let Ok(s) = rx.recv_timeout(Duration::from_millis(300)) {
        if seen.last() != Some(&s.status.state) {
            seen.push(s.status.state);
        }
    }
    assert_eq!(
        seen,
        [
            State::Normal,
            State::AwaitingShutdown,
            State::TakingOver,
            State::InTakeover
        ]
    );
    let _ = TAKEOVER;
}

/// Run an operator command on its own thread; its reply arrives on the returned channel.
fn ask(
    h: &hapair::daemon::ha::HaHandle,
    req: OpRequest,
    opts: OpOptions,
) -> std::sync::mpsc::Receiver<hapair::daemon::ha::OpReply> {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = h.clone();
    std::thread::spawn(move || {
        let _ = tx.send(h.operator(req, opts).unwrap());
    });
    rx
}

fn held() -> StepPlan {
    StepPlan {
        hold: true,
        ..StepPlan::default()
    }
}

#[test]
fn takeover_asked_here_completes_when_the_partner_serves_with_the_shutdown_timings() {
    let (p, _store) = pair();
    // a fences and opens b's aggregate but has not served it yet.
    p.a.rec.plan(Step::ServePartnerExports, held());
    let rx = ask(&p.b.handle, OpRequest::TakeoverSelf, wait());
    assert!(p.b.wait_state(State::TakenOver, T));
    assert!(p
        .a
        .rec
        .wait_for(T, |r| *r == Record::Began(Step::ServePartnerExports)));
    // b is down, a not serving yet: not done.
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        rx.try_recv().is_err(),
        "completed before the partner served"
    );
    p.a.rec.release(Step::ServePartnerExports);
    let r = rx.recv_timeout(T).unwrap();
    let Outcome::Completed { state, report } = r.outcome else {
        panic!("{:?}", r.outcome)
    };
    assert_eq!(state, State::TakenOver);
    assert_eq!(p.a.state(), State::InTakeover);
    // The report is b's graceful shutdown, phase by phase.
    let report = report.expect("shutdown report");
    assert_eq!(report.kind, "shutdown");
    let phases: Vec<String> = report.phases.into_iter().map(|p| p.step).collect();
    assert_eq!(phases, SHUTDOWN.map(|s| format!("{s:?}")));
    assert!(report.total_ms.is_some());
    // And the status of the node taken over keeps it.
    assert!(p
        .b
        .handle
        .snapshot()
        .unwrap()
        .status
        .last_shutdown
        .is_some());
}

#[test]
fn takeover_asked_here_fails_with_the_partners_refusal_after_the_shutdown() {
    let store = MemStore::new(3);
    let p = Pair::start(Arc::new(store), |c| c.takeover.countdown_ms = 10_000);
    assert!(p.wait_normal(T));
    // b shuts down, but its final CP fails and meanwhile a's mirror of its log fell behind:
    // a cannot take over without losing writes, and must say so to b's operator.
    p.b.rec.plan(Step::DrainInFlight, held());
    p.b.rec.plan(
        Step::FinalCp,
        StepPlan {
            fail: Some(StepError::Failed("member 1: EIO".into())),
            ..StepPlan::default()
        },
    );
    let rx = ask(&p.b.handle, OpRequest::TakeoverSelf, wait());
    assert!(p
        .b
        .rec
        .wait_for(T, |r| *r == Record::Began(Step::DrainInFlight)));
    p.b.handle.own_mirror(false).unwrap();
    let deadline = Instant::now() + T;
    while p.a.handle.snapshot().unwrap().status.mirror_current {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    p.b.rec.release(Step::DrainInFlight);
    let r = rx.recv_timeout(T).unwrap();
    let Outcome::Refused { refusal, .. } = r.outcome else {
        panic!("{:?}", r.outcome)
    };
    assert_eq!(refusal.request, RequestKind::TakeoverOfSelf);
    assert!(
        matches!(
            refusal.reasons[..],
            [RefusalReason::MirrorNotCurrent { .. }]
        ),
        "{refusal:?}"
    );
    assert_eq!(p.a.state(), State::Normal);
    assert_eq!(p.b.state(), State::TakenOver);
}

#[test]
fn giveback_completes_when_the_home_node_serves_again() {
    let (p, _store) = pair();
    let r =
        p.a.handle
            .operator(
                OpRequest::TakeoverPartner {
                    countdown_ms: None,
                    immediate: false,
                },
                wait(),
            )
            .unwrap();
    assert!(matches!(r.outcome, Outcome::Completed { .. }), "{r:?}");
    assert!(p.b.wait_state(State::TakenOver, T));
    // Giveback needs a to know b waits for it (b's heartbeat says TakenOver).
    wait_partner_state(&p.a, State::TakenOver);
    // b resumes up to its last step and stays there.
    p.b.rec.plan(Step::ServeOwnExports, held());
    let serves_before =
        p.b.rec
            .count(|r| *r == Record::Began(Step::ServeOwnExports));
    let rx = ask(&p.a.handle, OpRequest::Giveback, wait());
    let deadline = Instant::now() + T;
    while p
        .b
        .rec
        .count(|r| *r == Record::Began(Step::ServeOwnExports))
        == serves_before
    {
        assert!(Instant::now() < deadline, "b never began serving again");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        p.a.wait_state(State::Normal, T),
        "a is done with its part: {:?} {:?}",
        p.a.handle
            .snapshot()
            .map(|s| (s.status.state, s.status.partner_state, s.status.running)),
        p.a.rec
            .records()
            .iter()
            .filter(|r| !matches!(r, Record::Sent(_)))
            .collect::<Vec<_>>()
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        rx.try_recv().is_err(),
        "completed while b was still resuming"
    );
    p.b.rec.release(Step::ServeOwnExports);
    let r = rx.recv_timeout(T).unwrap();
    let Outcome::Completed { state, report } = r.outcome else {
        panic!("{:?}", r.outcome)
    };
    assert_eq!(state, State::Normal);
    let report = report.unwrap();
    assert_eq!(report.kind, "giveback");
    // The report's finish is b serving, not b starting to resume: its last phase covers the
    // 200 ms b was held in its last step.
    let last = report.phases.last().unwrap();
    assert_eq!(last.step, "PartnerResume", "{report:?}");
    assert!(last.elapsed_ms >= 200, "{report:?}");
    assert_eq!(
        report.total_ms,
        Some(report.finished_unix_ms.unwrap() - report.started_unix_ms)
    );
    assert!(report.total_ms.unwrap() >= report.phases.iter().map(|p| p.elapsed_ms).sum());
    assert_eq!(r.snapshot.status.partner_state, Some(State::Normal));
    assert_eq!(p.b.state(), State::Normal);
}

#[test]
fn a_step_that_keeps_failing_is_named_when_the_wait_ends() {
    let (p, _store) = pair();
    p.a.rec.plan(
        Step::OpenPartnerAggregate,
        StepPlan {
            fail: Some(StepError::Failed("member 3: EIO".into())),
            ..StepPlan::default()
        },
    );
    let r =
        p.a.handle
            .operator(
                OpRequest::TakeoverPartner {
                    countdown_ms: None,
                    immediate: true,
                },
                OpOptions {
                    timeout: Duration::from_millis(800),
                    ..wait()
                },
            )
            .unwrap();
    let Outcome::TimedOut { state, detail } = r.outcome else {
        panic!("{:?}", r.outcome)
    };
    assert_eq!(state, State::TakingOver);
    assert!(
        detail.starts_with("in step OpenPartnerAggregate for ")
            && detail.contains(" failed attempts, last error: member 3: EIO"),
        "{detail}"
    );
    // The status shows the same, and the retries are one alarm with a count.
    let st = p.a.handle.snapshot().unwrap().status;
    let cur = st.running.unwrap().current.unwrap();
    assert_eq!(cur.step, Step::OpenPartnerAggregate);
    assert!(cur.failures >= 3, "{cur:?}");
    let failed: Vec<_> = st
        .alarms
        .iter()
        .filter(|e| matches!(e.alarm, Alarm::StepFailed { .. }))
        .collect();
    assert_eq!(failed.len(), 1, "{:?}", st.alarms);
    assert!(failed[0].count >= 3);
}

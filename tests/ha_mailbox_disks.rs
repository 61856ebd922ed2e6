//! The HA loop with its mailbox on real loop devices: self-fencing when the slot can no longer
//! reach a majority of members, and please-die seen through the disks alone.

mod common;

use common::*;
use hapair::core::control::{OpRequest, Outcome};
use hapair::core::takeover::{Alarm, Message, State, Step};
use hapair::daemon::ha::{self, OpOptions};
use hapair::daemon::ha_testing::{fast_config, Record, TestNode};
use hapair::daemon::mailbox::DiskStore;
use hapair::io::mailbox::MailboxDisks;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(10);

fn store(loops: &[LoopDev]) -> Arc<DiskStore> {
    let paths: Vec<_> = loops.iter().map(|l| l.dev.clone()).collect();
    Arc::new(DiskStore {
        disks: MailboxDisks::open(&paths).unwrap(),
        uuids: vec![[7; 16]; paths.len()],
        write_first: None,
    })
}

#[test]
fn node_fences_itself_when_its_slot_cannot_reach_a_majority() {
    let dir = scratch_dir();
    let loops: Vec<LoopDev> = (0..3)
        .map(|i| LoopDev::new(dir.path(), &format!("sf{i}.img"), 4 << 20))
        .collect();
    let (h, inbox) = ha::channel(ha::INPUT_CAPACITY);
    let mut a = TestNode::start(fast_config("a", "b"), store(&loops), inbox, h, None);
    assert!(a.wait_state(State::Normal, T), "boots and resumes alone");
    // Our heartbeat is on the disks.
    let reader = MailboxDisks::open(&[loops[0].dev.clone()]).unwrap();
    let deadline = Instant::now() + T;
    loop {
        let own = reader.read_slot(a.mailbox.own_index()).newest;
        if own
            .as_ref()
            .is_some_and(|s| State::from_code(s.state) == Some(State::Normal))
        {
            break;
        }
        assert!(Instant::now() < deadline, "{own:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(reader);
    assert_eq!(a.rec.count(|r| *r == Record::Halted), 0);
    // Two of three members stop taking writes (the mailbox area is past their new end).
    let t0 = Instant::now();
    loops[0].shrink(64 << 10);
    loops[1].shrink(64 << 10);
    assert!(
        a.rec.wait_for(T, |r| *r == Record::Halted),
        "not self-fenced: {:?}; member sizes {:?}; {:?}",
        a.handle.snapshot().map(|s| s.status.state),
        loops
            .iter()
            .map(|l| std::fs::read_to_string(format!(
                "/sys/block/{}/size",
                l.dev.file_name().unwrap().to_string_lossy()
            )))
            .collect::<Vec<_>>(),
        a.rec
            .records()
            .iter()
            .filter(|r| !matches!(r, Record::Sent(_)))
            .collect::<Vec<_>>()
    );
    let took = t0.elapsed();
    // The bound (250 ms) counts from the last slot write that reached a majority, which may
    // be up to one heartbeat (40 ms) before the disks went.
    assert!(
        took >= Duration::from_millis(250 - 40) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!(a.wait_state(State::TakenOver, T));
    let dev0 = loops[0].dev.display().to_string();
    let recs = a.rec.records();
    let reason = recs
        .iter()
        .find_map(|r| match r {
            Record::Alarm(Alarm::SelfFenced { reason }) => Some(reason.clone()),
            _ => None,
        })
        .expect("self-fence alarm");
    assert!(
        reason.contains("1 of 3") && reason.contains(&dev0),
        "the log says why: {reason}"
    );
    let st = a.handle.snapshot().unwrap().status;
    assert!(
        st.transitions
            .last()
            .unwrap()
            .reason
            .starts_with("self-fenced"),
        "{:?}",
        st.transitions.last()
    );
    a.stop();
}

#[test]
fn please_die_through_the_disks_alone_halts_the_partner_and_holds_it_after_restart() {
    let dir = scratch_dir();
    let loops: Vec<LoopDev> = (0..3)
        .map(|i| LoopDev::new(dir.path(), &format!("pd{i}.img"), 4 << 20))
        .collect();
    let (ha_, ia) = ha::channel(ha::INPUT_CAPACITY);
    let (hb, ib) = ha::channel(ha::INPUT_CAPACITY);
    // Each node opens the shared members on its own, as two hosts would.
    let a = TestNode::start(
        fast_config("a", "b"),
        store(&loops),
        ia,
        ha_.clone(),
        Some(hb.clone()),
    );
    let mut b = TestNode::start(fast_config("b", "a"), store(&loops), ib, hb, Some(ha_));
    assert!(a.wait_state(State::Normal, T) && b.wait_state(State::Normal, T));
    let deadline = Instant::now() + T;
    while a.handle.snapshot().unwrap().status.partner_state != Some(State::Normal) {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    // Nothing a sends reaches b from now on: b can learn of the takeover only from the disks.
    a.link_up.store(false, Ordering::SeqCst);
    let r = a
        .handle
        .operator(
            OpRequest::TakeoverPartner {
                countdown_ms: None,
                immediate: true,
            },
            OpOptions {
                check_only: false,
                wait: true,
                timeout: T,
            },
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
        a.rec.wait_for(T, |r| *r == Record::Sent(Message::Takeover)),
        "sent, but dropped"
    );
    assert!(b.rec.wait_for(T, |r| *r == Record::Halted), "b halted");
    assert!(b.wait_state(State::TakenOver, T));
    let st = b.handle.snapshot().unwrap().status;
    let last = st.transitions.last().unwrap();
    assert_eq!(last.reason, "please-die in mailbox", "{last:?}");
    // b restarts (a new daemon on the same disks): it boots straight into waiting for giveback
    // and touches nothing of its own aggregate.
    b.stop();
    drop(b);
    let (hb2, ib2) = ha::channel(ha::INPUT_CAPACITY);
    let b2 = TestNode::start(fast_config("b", "a"), store(&loops), ib2, hb2, None);
    assert!(b2.wait_state(State::TakenOver, T));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(b2.state(), State::TakenOver);
    assert_eq!(
        b2.rec.count(|r| *r == Record::Began(Step::RegisterOwn)),
        0,
        "never registered its key"
    );
    let st = b2.handle.snapshot().unwrap().status;
    assert_eq!(st.transitions[0].reason, "please-die in mailbox at boot");
    drop(b2);
    drop(a);
}

/// "Unmirrored" in our slot outlives the process that set it: a restarted daemon (its log not
/// yet resynced to the partner, perhaps never: it may boot taken over) keeps saying so, where
/// it used to start with the flag clear and let the partner take over from a stale mirror.
#[test]
fn the_unmirrored_flag_survives_a_restart() {
    let dir = scratch_dir();
    let loops: Vec<LoopDev> = (0..3)
        .map(|i| LoopDev::new(dir.path(), &format!("um{i}.img"), 4 << 20))
        .collect();
    let slot_says = |idx: usize| {
        let reader =
            MailboxDisks::open(&loops.iter().map(|l| l.dev.clone()).collect::<Vec<_>>()).unwrap();
        reader.read_slot(idx).newest
    };
    let (h, inbox) = ha::channel(ha::INPUT_CAPACITY);
    let mut a = TestNode::start(fast_config("a", "b"), store(&loops), inbox, h, None);
    assert!(a.wait_state(State::Normal, T));
    assert!(!a.mailbox.unmirrored());
    a.mailbox.set_unmirrored_now(true).unwrap();
    let idx = a.mailbox.own_index();
    assert!(slot_says(idx).is_some_and(|s| s.unmirrored));
    a.stop();
    drop(a);
    // The next run: its heartbeats go on saying it.
    let (h, inbox) = ha::channel(ha::INPUT_CAPACITY);
    let a = TestNode::start(fast_config("a", "b"), store(&loops), inbox, h, None);
    assert!(a.mailbox.unmirrored(), "read back from the slot at start");
    assert!(a.wait_state(State::Normal, T));
    let start_counter = slot_says(idx).map(|s| s.counter);
    let deadline = Instant::now() + T;
    loop {
        let s = slot_says(idx).expect("slot");
        if Some(s.counter) != start_counter {
            assert!(s.unmirrored, "a new heartbeat cleared it: {s:?}");
            break;
        }
        assert!(Instant::now() < deadline, "no new heartbeat");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Cleared only when asked (the journal, once the mirror is resynced).
    a.mailbox.set_unmirrored_now(false).unwrap();
    assert!(slot_says(idx).is_some_and(|s| !s.unmirrored));
}

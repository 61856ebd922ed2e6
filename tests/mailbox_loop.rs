//! The disk mailbox on real loop devices: two nodes beat through the same shared members.

mod common;

use common::*;
use hapair::core::mailbox::{slot_index, slot_offset, Slot, SlotError, SLOT_BYTES};
use hapair::io::mailbox::MailboxDisks;
use std::os::unix::fs::FileExt;

fn slot(name: &str, partner: &str, counter: u64, please_die: bool) -> Slot {
    Slot {
        slot_index: slot_index(name, partner) as u32,
        node_name: name.into(),
        aggregate_uuid: [0; 16],
        counter,
        state: 3,
        clean_shutdown: false,
        please_die_for_partner: please_die,
        unmirrored: false,
        please_die_epoch: if please_die { 1 } else { 0 },
        writer_ms: counter * 100,
    }
}

#[test]
fn two_nodes_beat_and_see_each_other_and_damage_is_detected() {
    let dir = scratch_dir();
    let loops: Vec<LoopDev> = (0..3)
        .map(|i| LoopDev::new(dir.path(), &format!("mb{i}.img"), 4 << 20))
        .collect();
    let paths: Vec<_> = loops.iter().map(|l| l.dev.clone()).collect();
    // Each node opens the shared devices on its own, as two hosts would.
    let a = MailboxDisks::open(&paths).unwrap();
    let b = MailboxDisks::open(&paths).unwrap();
    let ia = slot_index("a", "b");
    let ib = slot_index("b", "a");
    // Never written: every member says empty.
    let v = a.read_slot(ib);
    assert!(v.newest.is_none());
    assert_eq!(v.empty, 3);
    for c in 1..=5 {
        let r = a.write_slot(&slot("a", "b", c, false), |i| [i as u8; 16]);
        assert_eq!(r.written, 3);
        let r = b.write_slot(&slot("b", "a", c * 10, c == 5), |i| [i as u8; 16]);
        assert_eq!(r.written, 3);
    }
    let seen_by_b = b.read_slot(ia).newest.unwrap();
    assert_eq!((seen_by_b.node_name.as_str(), seen_by_b.counter), ("a", 5));
    let seen_by_a = a.read_slot(ib).newest.unwrap();
    assert_eq!(seen_by_a.counter, 50);
    assert!(
        seen_by_a.please_die_for_partner,
        "a reads b's please-die for it"
    );
    // Slots do not overlap: a's writes never disturbed b's slot.
    assert_ne!(slot_offset(ia), slot_offset(ib));
    // Damage one member's copy of b's slot: detected and named; the others still vote.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&paths[1])
        .unwrap();
    f.write_all_at(&[0xEE; 16], slot_offset(ib) + 70).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let v = a.read_slot(ib);
    assert_eq!(v.valid, 2);
    assert_eq!(v.damaged.len(), 1);
    assert_eq!(v.damaged[0].0, 1);
    assert!(matches!(v.damaged[0].1, SlotError::Checksum { .. }));
    assert_eq!(v.newest.unwrap().counter, 50);
    // A member that stops taking writes shows in the write round.
    loops[2].shrink(1 << 16);
    let r = a.write_slot(&slot("a", "b", 6, false), |i| [i as u8; 16]);
    assert_eq!(r.written, 2);
    assert_eq!(r.failed.len(), 1);
    assert_eq!(r.failed[0].0, paths[2]);
    let v = b.read_slot(ia);
    assert_eq!(v.unreadable, 1);
    assert_eq!(v.newest.unwrap().counter, 6);
    let _ = SLOT_BYTES;
}

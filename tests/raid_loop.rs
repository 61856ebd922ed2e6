//! RAID-4 on real loop devices with direct I/O, through the io_uring engine.

mod common;

use common::*;
use hapair::config::{AggregateConfig, EngineKind, IoConfig};
use hapair::core::label::{Label, DATA_OFFSET_BYTES, LABEL_BYTES};
use hapair::daemon::setup::{self, SetupError};
use hapair::io::buf::IoBuf;
use rand::{Rng, SeedableRng};
use std::process::Command;

const MEMBER_BYTES: u64 = 64 << 20;

fn agg_config(loops: &[LoopDev]) -> AggregateConfig {
    AggregateConfig {
        name: "aggr0".into(),
        home: "a".into(),
        data: loops[..loops.len() - 1]
            .iter()
            .map(|l| l.dev.clone())
            .collect(),
        parity: loops[loops.len() - 1].dev.clone(),
        chunk_kib: 64,
        nvram: None,
        nvram_mib: 64,
        cp_interval_ms: 1000,
        nvram_flush: Default::default(),
    }
}

fn io(engine: EngineKind) -> IoConfig {
    IoConfig {
        engine,
        arena_mib: 32,
        ..IoConfig::default()
    }
}

fn five_loops(dir: &std::path::Path) -> Vec<LoopDev> {
    (0..5)
        .map(|i| LoopDev::new(dir, &format!("m{i}.img"), MEMBER_BYTES))
        .collect()
}

fn read_label(dev: &std::path::Path) -> Result<Label, String> {
    let b = std::fs::read(dev).map_err(|e| e.to_string())?;
    Label::decode(&b[..LABEL_BYTES]).map_err(|e| e.to_string())
}

/// Random writes and reads against a flat model, on io_uring and on the sync engine, across a
/// close and reopen; parity checked on the raw devices at the end.
#[test]
fn random_io_matches_model_and_survives_reopen() {
    let dir = scratch_dir();
    let loops = five_loops(dir.path());
    let cfg = agg_config(&loops);
    setup::format(&cfg, &io(EngineKind::IoUring), false, &mut |_, _| {}).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut model: Vec<u8>;
    {
        let agg = setup::open(&cfg, &io(EngineKind::IoUring), &mut |_, _| {}).unwrap();
        let size = agg.geometry().size_bytes();
        assert_eq!(size, 4 * (MEMBER_BYTES - DATA_OFFSET_BYTES));
        model = vec![0u8; size as usize];
        let threads = 4;
        // Disjoint regions per thread so the model stays exact under concurrency.
        let region = size / threads;
        std::thread::scope(|s| {
            for (t, part) in model.chunks_mut(region as usize).enumerate() {
                let agg = &agg;
                let mut rng = rand::rngs::StdRng::seed_from_u64(100 + t as u64);
                s.spawn(move || {
                    let base = t as u64 * region;
                    for i in 0..300 {
                        let blocks = *[1u64, 2, 16, 64, 128].get(rng.gen_range(0..5)).unwrap();
                        let block = rng.gen_range(0..region / 4096 - blocks);
                        let off = block * 4096;
                        if rng.gen_bool(0.6) {
                            let data = pattern((blocks * 4096) as usize, (t * 1000 + i) as u64);
                            let mut buf = IoBuf::new(data.len());
                            buf.copy_from_slice(&data);
                            agg.write(base + off, &buf, i % 7 == 0).unwrap();
                            part[off as usize..(off + blocks * 4096) as usize]
                                .copy_from_slice(&data);
                        } else {
                            let mut buf = IoBuf::new((blocks * 4096) as usize);
                            agg.read(base + off, &mut buf).unwrap();
                            assert!(
                                buf[..] == part[off as usize..(off + blocks * 4096) as usize],
                                "thread {t} op {i}: read differs"
                            );
                        }
                    }
                });
            }
        });
        agg.close().unwrap();
    }
    // Reopen with the other engine: same bytes.
    let agg = setup::open(&cfg, &io(EngineKind::Sync), &mut |_, _| {}).unwrap();
    let mut all = IoBuf::new(model.len());
    agg.read(0, &mut all).unwrap();
    assert!(all[..] == model[..], "data differs after reopen");
    // A few more writes through sync, then check parity on the raw devices.
    for _ in 0..20 {
        let off = rng.gen_range(0..(model.len() as u64 / 4096 - 8)) * 4096;
        let data = pattern(8 * 4096, off);
        let mut buf = IoBuf::new(data.len());
        buf.copy_from_slice(&data);
        agg.write(off, &buf, false).unwrap();
    }
    agg.close().unwrap();
    drop(agg);
    let raw: Vec<Vec<u8>> = loops
        .iter()
        .map(|l| std::fs::read(&l.dev).unwrap())
        .collect();
    let start = DATA_OFFSET_BYTES as usize;
    for pos in (start..raw[0].len()).step_by(4096) {
        let mut x = [0u8; 4096];
        for m in raw.iter().take(4) {
            for (a, b) in x.iter_mut().zip(&m[pos..pos + 4096]) {
                *a ^= b;
            }
        }
        assert!(
            x[..] == raw[4][pos..pos + 4096],
            "parity wrong at member offset {pos}"
        );
    }
    for (i, l) in loops.iter().enumerate() {
        let label = read_label(&l.dev).unwrap();
        assert_eq!(label.member_index as usize, i);
        assert_eq!(label.state, hapair::core::label::CleanState::Clean);
    }
}

/// A member that starts failing for real mid-run: the aggregate keeps serving every byte from
/// parity, records the failure in the surviving labels, and reassembles degraded.
#[test]
fn member_failing_mid_run_is_survived() {
    let dir = scratch_dir();
    let loops = five_loops(dir.path());
    let cfg = agg_config(&loops);
    setup::format(&cfg, &io(EngineKind::IoUring), false, &mut |_, _| {}).unwrap();
    let agg = setup::open(&cfg, &io(EngineKind::IoUring), &mut |_, _| {}).unwrap();
    let size = agg.geometry().size_bytes() as usize;
    let mut model = pattern(size, 1);
    let mut buf = IoBuf::new(size);
    buf.copy_from_slice(&model);
    agg.write(0, &buf, true).unwrap();
    // Member 2 now loses everything past its label area.
    loops[2].shrink(DATA_OFFSET_BYTES);
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    for i in 0..200 {
        let blocks = rng.gen_range(1..64u64);
        let off = rng.gen_range(0..(size as u64 / 4096 - blocks)) * 4096;
        let len = (blocks * 4096) as usize;
        if i % 2 == 0 {
            let data = pattern(len, 1000 + i);
            let mut b = IoBuf::new(len);
            b.copy_from_slice(&data);
            agg.write(off, &b, false)
                .unwrap_or_else(|e| panic!("write {i} failed: {e}"));
            model[off as usize..off as usize + len].copy_from_slice(&data);
        } else {
            let mut b = IoBuf::new(len);
            agg.read(off, &mut b)
                .unwrap_or_else(|e| panic!("read {i} failed: {e}"));
            assert!(
                b[..] == model[off as usize..off as usize + len],
                "read {i} differs"
            );
        }
    }
    assert_eq!(agg.failed_member(), Some(2));
    let mut all = IoBuf::new(size);
    agg.read(0, &mut all).unwrap();
    assert!(all[..] == model[..]);
    let g = agg.status().generation;
    agg.close().unwrap();
    drop(agg);
    for i in [0, 1, 3, 4] {
        let l = read_label(&loops[i].dev).unwrap();
        assert_eq!(l.failed_member, Some(2), "member {i} label");
        assert!(l.generation > g - 1);
    }
    // Reassembly: degraded, data intact.
    let agg = setup::open(&cfg, &io(EngineKind::IoUring), &mut |_, _| {}).unwrap();
    assert_eq!(agg.failed_member(), Some(2));
    let mut all = IoBuf::new(size);
    agg.read(0, &mut all).unwrap();
    assert!(all[..] == model[..]);
    // A second member failing takes the aggregate offline, with a message naming both.
    loops[0].shrink(DATA_OFFSET_BYTES);
    let mut b = IoBuf::new(4096);
    let e = agg.read(0, &mut b).unwrap_err().to_string();
    assert!(
        e.contains("offline") && e.contains("member 0") && e.contains("member 2"),
        "{e}"
    );
    let e = agg.write(4096 * 4, &b, false).unwrap_err().to_string();
    assert!(e.contains("offline"), "{e}");
}

/// Format refuses members that are labelled, mounted, or too small, saying which and why.
#[test]
fn format_refusals() {
    require_tool("mkfs.ext4");
    let dir = scratch_dir();
    let loops = five_loops(dir.path());
    let cfg = agg_config(&loops);
    setup::format(&cfg, &io(EngineKind::IoUring), false, &mut |_, _| {}).unwrap();
    let e = setup::format(&cfg, &io(EngineKind::IoUring), false, &mut |_, _| {}).unwrap_err();
    assert!(matches!(e, SetupError::Labelled { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&loops[0].dev.display().to_string())
            && msg.contains("aggregate aggr0")
            && msg.contains("--force"),
        "{msg}"
    );
    setup::format(&cfg, &io(EngineKind::IoUring), true, &mut |_, _| {}).unwrap();

    // A member of another aggregate is named at assembly.
    let other_loops: Vec<LoopDev> = (0..3)
        .map(|i| LoopDev::new(dir.path(), &format!("o{i}.img"), 8 << 20))
        .collect();
    let mut other = agg_config(&other_loops);
    other.name = "other".into();
    setup::format(&other, &io(EngineKind::IoUring), false, &mut |_, _| {}).unwrap();
    let mut mixed = cfg.clone();
    mixed.data[1] = other_loops[0].dev.clone();
    let e = setup::open(&mixed, &io(EngineKind::IoUring), &mut |_, _| {})
        .err()
        .expect("mixed members must not assemble")
        .to_string();
    assert!(
        e.contains(&format!("member 1 ({})", other_loops[0].dev.display()))
            && e.contains("different aggregate"),
        "{e}"
    );

    // Too small.
    let tiny = LoopDev::new(dir.path(), "tiny.img", 1 << 20);
    let mut small = cfg.clone();
    small.parity = tiny.dev.clone();
    let e = setup::format(&small, &io(EngineKind::IoUring), true, &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&tiny.dev.display().to_string()) && e.contains("too small"),
        "{e}"
    );

    // Mounted.
    let fsdev = LoopDev::new(dir.path(), "fs.img", 16 << 20);
    assert!(Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&fsdev.dev)
        .status()
        .unwrap()
        .success());
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    assert!(Command::new("mount")
        .arg(&fsdev.dev)
        .arg(&mnt)
        .status()
        .unwrap()
        .success());
    let mut mounted = cfg.clone();
    mounted.data[0] = fsdev.dev.clone();
    let r = setup::format(&mounted, &io(EngineKind::IoUring), true, &mut |_, _| {});
    let _ = Command::new("umount").arg(&mnt).status();
    let e = r.unwrap_err().to_string();
    assert!(
        e.contains(&fsdev.dev.display().to_string()) && e.contains("mounted at"),
        "{e}"
    );
}

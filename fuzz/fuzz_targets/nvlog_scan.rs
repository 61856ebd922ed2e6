//! Replay scan over arbitrary region bytes: must never panic, and whatever it accepts must
//! point inside the region.
#![no_main]

use hapair::core::nvlog::{scan, Expect, LogAppender, DATA_START, MIN_RING_BYTES};
use libfuzzer_sys::fuzz_target;
use uuid::Uuid;

const AGG: Uuid = Uuid::from_bytes([7; 16]);
const REGION: usize = DATA_START + MIN_RING_BYTES;

fuzz_target!(|data: &[u8]| {
    let expect = Expect { aggregate: AGG, generation: 1 };
    // Raw bytes as a whole region.
    let _ = scan(data, &expect);
    // A formatted region with a few records, its ring overwritten by the input: reaches the
    // record walk past the header checks.
    let mut region = vec![0u8; REGION];
    let mut log = LogAppender::format(&mut region, AGG, 1, 5).expect("format");
    for i in 0..3u64 {
        log.append(&mut region, i * 512, &[i as u8; 300]).expect("append");
    }
    log.commit();
    let n = data.len().min(REGION - DATA_START);
    let at = DATA_START + data.first().map_or(0, |&b| b as usize * 64) % (REGION - DATA_START - n + 1);
    region[at..at + n].copy_from_slice(&data[..n]);
    if let Ok(r) = scan(&region, &expect) {
        for rec in &r.records {
            assert!(rec.payload.end <= region.len());
        }
    }
});

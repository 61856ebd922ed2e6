//! Interconnect decoder over arbitrary bytes, both before and after the Hello exchange: must
//! never panic, and a rejected frame must leave the session as it was.
#![no_main]

use hapair::core::interconnect::{Decoded, Hello, Message, Session};
use libfuzzer_sys::fuzz_target;

const KEY: &[u8] = b"fuzzing key for the interconnect";

fuzz_target!(|data: &[u8]| {
    let mut fresh = Session::new(KEY, [1; 16]).expect("key");
    let _ = fresh.decode(data);

    let mut a = Session::new(KEY, [0xA; 16]).expect("key");
    let mut b = Session::new(KEY, [0xB; 16]).expect("key");
    let hello = |nonce| Message::Hello(Hello { node_id: 0, software_version: 1, capabilities: 0, nonce });
    let ha = a.encode(&hello([0xA; 16])).expect("hello");
    let hb = b.encode(&hello([0xB; 16])).expect("hello");
    b.decode_frame(&ha).expect("hello a");
    a.decode_frame(&hb).expect("hello b");
    let mut buf = data;
    loop {
        let before = b.rx_last_seq();
        match b.decode(buf) {
            Ok(Decoded::Frame { consumed, .. }) => buf = &buf[consumed..],
            Ok(Decoded::NeedMore { .. }) => break,
            Err(_) => {
                assert_eq!(b.rx_last_seq(), before);
                break;
            }
        }
    }
});

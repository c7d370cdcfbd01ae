//! Fuzz the replication frame decoder and verifier with arbitrary peer bytes, and the encoder
//! with arbitrary data.
//!
//! The first input byte is a mode. Bit 0 set: the rest is a message whose header checksum is
//! recomputed first, so the fuzzer's changes to header fields reach the checks behind the
//! checksum instead of all dying there. Bit 1 set: the rest is volume data, which must survive
//! encode → decode → verify unchanged at zstd level 1 + (mode >> 2) % 3. A panic anywhere, or a
//! round trip that changes the data, is a finding.

#![no_main]

use ferry_dataplane::replication::frame::{self, Content, Message};
use libfuzzer_sys::fuzz_target;

fn decode_and_verify(bytes: &[u8]) {
    if let Ok(Message::Data(f)) = frame::decode(bytes) {
        if let Ok(Content::Data(data)) = f.verify() {
            assert_eq!(
                data.len(),
                f.length as usize,
                "verified data of the wrong length"
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 2 != 0 {
        let level = 1 + i32::from(mode >> 2) % 3;
        let Ok(msg) = frame::encode_data("fuzz", 1, 2, 3, 4096, rest, level) else {
            assert!(rest.is_empty(), "encoding {} bytes failed", rest.len());
            return;
        };
        assert!(msg.len() <= frame::MAX_DATA_HEADER_LEN + rest.len());
        let Ok(Message::Data(f)) = frame::decode(&msg) else {
            panic!("an encoded frame does not decode");
        };
        let back = match f.verify().expect("an encoded frame verifies") {
            Content::Data(d) => d.into_owned(),
            Content::Zero => vec![0; f.length as usize],
            Content::Trim => panic!("data encoded as a trim frame"),
        };
        assert_eq!(back, rest, "round trip changed the data");
    } else if mode & 1 != 0 {
        let mut bytes = rest.to_vec();
        frame::reseal_for_fuzzing(&mut bytes);
        decode_and_verify(&bytes);
    } else {
        decode_and_verify(rest);
    }
});

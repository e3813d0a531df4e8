//! Idempotency parsers with arbitrary bytes: the key parser (an accepted key is 1..=max
//! visible ASCII), the stored-record decoder and the etcd gateway answers.
#![no_main]

use handoff::idempotency::{etcd, key::parse_key, record};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&[u8], u8)| {
    let (data, max) = input;
    let max = usize::from(max).max(1);
    if let Ok(k) = parse_key(data, max) {
        assert!(!k.is_empty() && k.len() <= max, "{k:?}");
        assert!(k.bytes().all(|b| (0x21..=0x7e).contains(&b)), "{k:?}");
    }
    let _ = record::decode_full(data);
    let _ = etcd::parse_txn(data);
    let _ = etcd::parse_lease(data);
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(bytes) = etcd::b64_decode(text) {
            assert_eq!(etcd::b64_decode(&etcd::b64_encode(&bytes)), Some(bytes));
        }
    }
});

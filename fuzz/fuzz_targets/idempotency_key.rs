//! Idempotency parsers with arbitrary bytes: the key parser (an accepted key is 1..=max
//! visible ASCII), the stored-record decoder, every etcd gateway answer parser and the rollout
//! record and counts decoders (they read values any etcd client may have written).
#![no_main]

use handoff::etcd::{self, Answer};
use handoff::idempotency::{key::parse_key, record};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&[u8], u8, u16)| {
    let (data, max, status) = input;
    let max = usize::from(max).max(1);
    if let Ok(k) = parse_key(data, max) {
        assert!(!k.is_empty() && k.len() <= max, "{k:?}");
        assert!(k.bytes().all(|b| (0x21..=0x7e).contains(&b)), "{k:?}");
    }
    let _ = record::decode_full(data);
    let status = (status % 600 >= 100).then_some(status % 600);
    let answer = Answer { status, body: data };
    let _ = etcd::parse_txn(&answer);
    let _ = etcd::parse_range(&answer);
    let _ = etcd::parse_lease_grant(&answer);
    let _ = etcd::parse_keepalive(&answer);
    let _ = etcd::parse_ok(&answer);
    let _ = etcd::parse_range_all(&answer);
    let _ = etcd::parse_txn_range(&answer);
    let _ = handoff::rollout::record::Record::decode(data);
    let _ = handoff::rollout::record::decode_counts(data);
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(bytes) = etcd::b64_decode(text) {
            assert_eq!(etcd::b64_decode(&etcd::b64_encode(&bytes)), Some(bytes));
        }
    }
});

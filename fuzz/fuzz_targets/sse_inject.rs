//! The drain SSE injector over arbitrary streams split into arbitrary chunks: no panic, the
//! event is inserted at most once, and removing it gives back the stream byte for byte.
#![no_main]

use handoff::drain::{reconnect_event, SseScanner};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (Vec<Vec<u8>>, u8, u32)| {
    let (chunks, inject_from, after_ms) = input;
    let event = reconnect_event(after_ms).into_bytes();
    let mut scanner = SseScanner::default();
    let mut out = Vec::new();
    let mut injected = false;
    for (i, chunk) in chunks.iter().enumerate() {
        if !injected && i >= inject_from as usize {
            if let Some(new) = scanner.inject(chunk, &event) {
                out.extend_from_slice(&new);
                injected = true;
                continue;
            }
        } else {
            scanner.observe(chunk);
        }
        out.extend_from_slice(chunk);
    }
    let original: Vec<u8> = chunks.concat();
    if injected {
        let at = out
            .windows(event.len())
            .position(|w| w == event.as_slice())
            .expect("the event is in the output");
        let mut without = out[..at].to_vec();
        without.extend_from_slice(&out[at + event.len()..]);
        assert_eq!(
            without, original,
            "stream changed beyond the injected event"
        );
    } else {
        assert_eq!(out, original);
    }
});

//! The drain's WebSocket frame scanner and connection edits over arbitrary bytes split into
//! arbitrary chunks: no panic; the frame ends found do not depend on the split; a stream the
//! scanner calls broken is passed through untouched; and during a drain the output is the input
//! with whole frames inserted (or, after handoff's Close, cut).
#![no_main]

use handoff::drain::websocket::{Connection, Direction, FrameScanner, Moment, Websocket};
use handoff::drain::{DrainSource, DrainState};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (Vec<u8>, Vec<u16>, bool, u32, u16)| {
    let (stream, cuts, masked, random, now) = input;
    let mut cuts: Vec<usize> = cuts.iter().map(|c| *c as usize % (stream.len() + 1)).collect();
    cuts.extend([0, stream.len()]);
    cuts.sort();
    cuts.dedup();
    let chunks: Vec<&[u8]> = cuts.windows(2).map(|w| &stream[w[0]..w[1]]).collect();

    let mut whole = FrameScanner::new(masked);
    let want = whole.scan(&stream);
    let mut split = FrameScanner::new(masked);
    let mut got = Vec::new();
    let mut offset = 0;
    for chunk in &chunks {
        got.extend(split.scan(chunk).into_iter().map(|b| (b.at + offset, b.opcode, b.message)));
        offset += chunk.len();
    }
    let want: Vec<_> = want.iter().map(|b| (b.at, b.opcode, b.message)).collect();
    assert_eq!(got, want, "frame ends depend on the split");
    assert_eq!(whole.broken(), split.broken());

    let config = Websocket {
        migration_prefix: Some("{\"type\":\"server_migration\"".to_string()),
        close_code: 1001,
        close_reason: "going away".to_string(),
    };
    let state = DrainState::serving(0)
        .start(DrainSource::Admin, 0, 10)
        .expect("a drain");
    let m = Moment {
        state: &state,
        now_ms: u64::from(now),
        jitter_ms: 5000,
        config: &config,
    };
    let dir = if masked { Direction::ToUpstream } else { Direction::ToClient };
    let mut conn = Connection::default();
    let mut out = Vec::new();
    let mut edited = false;
    for chunk in &chunks {
        let e = conn.on_chunk(dir, chunk, &m, &mut || random, &mut || [1, 2, 3, 4]);
        edited |= e.replace.is_some();
        out.extend(e.replace.unwrap_or_else(|| chunk.to_vec()));
    }
    if !edited {
        assert_eq!(out, stream);
    }
    let mut check = FrameScanner::new(masked);
    check.scan(&out);
    if !whole.broken() {
        assert!(!check.broken(), "an edit broke a valid stream");
    } else if want.is_empty() {
        // Broken before its first frame ended: every byte passes, after at most the migration
        // message inserted before the first chunk.
        assert!(out.ends_with(&stream), "a malformed stream was changed");
    }
});

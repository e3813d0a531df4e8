//! Server-sent events: where the event boundaries of a `text/event-stream` are, and the
//! `reconnect` event inserted at one of them while draining.

/// The SSE event that tells a client to reconnect after `after_ms`.
pub fn reconnect_event(after_ms: u32) -> String {
    format!("event: reconnect\ndata: {{\"after_ms\": {after_ms}}}\n\n")
}

/// Tracks where the event boundaries of a `text/event-stream` are, across chunks. An event
/// ends with a blank line; line terminators are `\n`, `\r\n` or `\r`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SseScanner {
    /// Consecutive line terminators just seen (2 means "after a blank line").
    newlines: u8,
    /// The last byte was `\r` (a following `\n` belongs to it).
    last_cr: bool,
}

impl Default for SseScanner {
    /// The start of a stream is a boundary.
    fn default() -> Self {
        SseScanner {
            newlines: 2,
            last_cr: false,
        }
    }
}

impl SseScanner {
    /// True when an event may be inserted before `next` (the next byte, if known).
    fn boundary_before(&self, next: Option<u8>) -> bool {
        if self.newlines < 2 {
            return false;
        }
        if !self.last_cr {
            return true;
        }
        // After `\r` the boundary is known only once the next byte is not its `\n`.
        matches!(next, Some(b) if b != b'\n')
    }

    fn feed(&mut self, b: u8) {
        match b {
            b'\r' => {
                self.newlines = self.newlines.saturating_add(1);
                self.last_cr = true;
            }
            b'\n' => {
                if !self.last_cr {
                    self.newlines = self.newlines.saturating_add(1);
                }
                self.last_cr = false;
            }
            _ => {
                self.newlines = 0;
                self.last_cr = false;
            }
        }
    }

    /// Follows a chunk that passes unchanged.
    pub fn observe(&mut self, chunk: &[u8]) {
        for &b in chunk {
            self.feed(b);
        }
    }

    /// Inserts `event` at the first event boundary within (or at the start of) `chunk`.
    /// Returns the new chunk, or `None` when the chunk has no boundary (try the next one).
    /// Either way the scanner has followed the whole chunk. `event` must itself be one whole
    /// event ending with a blank line, so the boundary state after it is unchanged.
    pub fn inject(&mut self, chunk: &[u8], event: &[u8]) -> Option<Vec<u8>> {
        for i in 0..chunk.len() {
            if self.boundary_before(Some(chunk[i])) {
                let mut out = Vec::with_capacity(chunk.len() + event.len());
                out.extend_from_slice(&chunk[..i]);
                out.extend_from_slice(event);
                out.extend_from_slice(&chunk[i..]);
                self.observe(&chunk[i..]);
                return Some(out);
            }
            self.feed(chunk[i]);
        }
        if !chunk.is_empty() && self.boundary_before(None) {
            let mut out = chunk.to_vec();
            out.extend_from_slice(event);
            return Some(out);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sse_injection_examples() {
        let ev = reconnect_event(42);
        assert_eq!(ev, "event: reconnect\ndata: {\"after_ms\": 42}\n\n");
        // At the start of a stream.
        let mut s = SseScanner::default();
        assert_eq!(
            s.inject(b"data: a\n\n", ev.as_bytes()).unwrap(),
            format!("{ev}data: a\n\n").into_bytes()
        );
        // Mid-event: after the end of the current event.
        let mut s = SseScanner::default();
        s.observe(b"data: a\n");
        assert_eq!(
            s.inject(b"data: b\n\ndata: c\n\n", ev.as_bytes()).unwrap(),
            format!("data: b\n\n{ev}data: c\n\n").into_bytes()
        );
        // A chunk that ends exactly at a boundary takes the event at its end.
        let mut s = SseScanner::default();
        s.observe(b"data: a");
        assert_eq!(
            s.inject(b"\n\n", ev.as_bytes()).unwrap(),
            format!("\n\n{ev}").into_bytes()
        );
        // No boundary in the chunk: nothing injected yet.
        let mut s = SseScanner::default();
        s.observe(b"data: a\n\ndata: b");
        assert!(s.inject(b"c\ndata: d\n", ev.as_bytes()).is_none());
        // CRLF: never between `\r` and `\n`.
        let mut s = SseScanner::default();
        s.observe(b"data: a\r\n\r");
        assert_eq!(
            s.inject(b"\ndata: b\r\n\r\n", ev.as_bytes()).unwrap(),
            format!("\n{ev}data: b\r\n\r\n").into_bytes()
        );
    }

    proptest! {

        /// Whatever the events and however the stream is cut into chunks, the reconnect event
        /// lands between two whole events: the output is the input with the event inserted at
        /// an event boundary, and parsing the output gives back every original event.
        #[test]
        fn sse_injection_never_splits_an_event(
            events in prop::collection::vec(
                (prop::collection::vec("[a-z0-9 :{}]{0,12}", 1..4), 0usize..3), 1..6),
            cuts in prop::collection::vec(0usize..200, 0..6),
            start_chunk in 0usize..7,
        ) {
            let eols = ["\n", "\r\n", "\r"];
            let mut stream = Vec::new();
            let mut boundaries = vec![0usize];
            for (lines, eol) in &events {
                let eol = eols[*eol];
                for l in lines {
                    // A line starting with a terminator char is impossible by the regex.
                    stream.extend_from_slice(format!("data: {l}{eol}").as_bytes());
                }
                stream.extend_from_slice(eol.as_bytes());
                boundaries.push(stream.len());
            }
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (stream.len() + 1)).collect();
            cuts.push(0);
            cuts.push(stream.len());
            cuts.sort();
            cuts.dedup();
            let chunks: Vec<&[u8]> = cuts.windows(2).map(|w| &stream[w[0]..w[1]]).collect();
            let ev = reconnect_event(7).into_bytes();
            let mut scanner = SseScanner::default();
            let mut out = Vec::new();
            let mut inserted_at = None;
            for (i, chunk) in chunks.iter().enumerate() {
                if i >= start_chunk && inserted_at.is_none() {
                    let before = out.len();
                    if let Some(new) = scanner.inject(chunk, &ev) {
                        let at = (0..=chunk.len())
                            .find(|k| new[..*k] == chunk[..*k] && new[*k..].starts_with(&ev)
                                && new[*k + ev.len()..] == chunk[*k..])
                            .expect("the chunk with the event inserted");
                        inserted_at = Some(before + at);
                        out.extend_from_slice(&new);
                        continue;
                    }
                } else {
                    scanner.observe(chunk);
                }
                out.extend_from_slice(chunk);
            }
            if let Some(at) = inserted_at {
                // The insertion point is an event boundary of the original stream: it is
                // never inside an event. (A lone `\r` boundary can only be confirmed by the next
                // byte, so a `\r`-terminated stream's end is not a boundary.)
                prop_assert!(boundaries.contains(&at), "inserted at {} of {:?}", at, boundaries);
                let mut expect = stream.clone();
                expect.splice(at..at, ev.iter().copied());
                prop_assert_eq!(out, expect);
            } else {
                prop_assert_eq!(out, stream);
            }
        }
    }
}

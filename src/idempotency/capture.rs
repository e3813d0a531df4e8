//! The upstream's response as it is captured for the store: which statuses are stored, how
//! much is kept (`max_response_bytes`), and when the body is held until the record is stored.

use super::machine::stores_status;
use super::record::StoredResponse;
use super::stored_header;

/// Largest response body held until its record is stored: Envoy's default per-connection
/// buffer limit (a held body beyond the connection's limit would reset the stream).
pub const HOLD_LIMIT: usize = 1024 * 1024;

/// A response being captured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capture {
    response: StoredResponse,
    max: usize,
    /// Grew past `max`: completed without a stored response (not replayable).
    oversized: bool,
    /// The response has a `content-length` (within `max_response_bytes`): its body is held
    /// until the record is stored. A client that counts bytes is done when the last byte
    /// arrives, before the end of the stream: releasing the body early would let its retry
    /// arrive while the key is still locked (a 409 instead of the replay).
    hold: bool,
    /// Bytes at the start of Envoy's response buffer that are already captured (the buffer
    /// grows while the body is held).
    held: usize,
}

impl Capture {
    /// Starts capturing a response with this status and headers (names lowercase, values as
    /// bytes); `None` when the status is not stored (the lock is released instead). Header
    /// values that are not UTF-8 and per-hop headers are not stored.
    pub fn start(
        status: u16,
        headers: Vec<(String, Vec<u8>)>,
        max_response_bytes: usize,
        store_5xx: bool,
    ) -> Option<Capture> {
        if !stores_status(status, store_5xx) {
            return None;
        }
        let content_length = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| std::str::from_utf8(v).ok()?.trim().parse::<usize>().ok());
        let hold = content_length.is_some_and(|len| len <= max_response_bytes.min(HOLD_LIMIT));
        let headers = headers
            .into_iter()
            .filter(|(n, _)| stored_header(n))
            .filter_map(|(n, v)| String::from_utf8(v).ok().map(|v| (n, v)))
            .collect();
        Some(Capture {
            response: StoredResponse {
                status,
                headers,
                body: Vec::new(),
            },
            max: max_response_bytes,
            oversized: false,
            hold,
            held: 0,
        })
    }

    /// The part of Envoy's body buffer (of `body_size` bytes) not captured yet, as (offset,
    /// length); `None` when nothing is to be read. While the body is held Envoy shows the
    /// whole buffer each time.
    pub fn unread(&self, body_size: usize) -> Option<(usize, usize)> {
        let from = if self.hold { self.held } else { 0 };
        let fresh = body_size.saturating_sub(from);
        (!self.oversized && fresh > 0).then_some((from, fresh))
    }

    /// Adds the bytes [`Capture::unread`] pointed at. Past `max_response_bytes` the capture
    /// stops, keeps nothing, and stops holding.
    pub fn append(&mut self, chunk: &[u8]) {
        if self.oversized {
            return;
        }
        if self.response.encoded_len() + chunk.len() > self.max {
            self.oversized = true;
            self.hold = false;
            self.response.body = Vec::new();
        } else {
            self.response.body.extend_from_slice(chunk);
        }
    }

    /// After a body callback that did not end the stream, with Envoy's buffer now `body_size`
    /// bytes: whether to hold it (pause).
    pub fn holds(&mut self, body_size: usize) -> bool {
        if self.hold {
            self.held = body_size;
        }
        self.hold
    }

    /// The response to store, `None` when it outgrew `max_response_bytes`.
    pub fn finish(self) -> Option<StoredResponse> {
        (!self.oversized).then_some(self.response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &[u8])]) -> Vec<(String, Vec<u8>)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_vec()))
            .collect()
    }

    #[test]
    fn statuses() {
        assert!(Capture::start(500, vec![], 100, false).is_none());
        assert!(Capture::start(503, vec![], 100, true).is_some());
        assert!(Capture::start(404, vec![], 100, false).is_some());
    }

    #[test]
    fn headers_kept_are_the_stored_ones() {
        let c = Capture::start(
            201,
            h(&[
                ("content-type", b"application/json"),
                ("content-length", b"3"),
                ("x-bad", b"\xff"),
                ("date", b"now"),
            ]),
            100,
            false,
        )
        .unwrap();
        let r = c.finish().unwrap();
        assert_eq!(
            r.headers,
            vec![("content-type".into(), "application/json".into())]
        );
    }

    #[test]
    fn a_counted_body_is_held_and_read_once() {
        let mut c = Capture::start(201, h(&[("content-length", b"6")]), 100, false).unwrap();
        assert_eq!(c.unread(3), Some((0, 3)));
        c.append(b"abc");
        assert!(c.holds(3));
        // Envoy shows the whole held buffer: only the new part is read.
        assert_eq!(c.unread(6), Some((3, 3)));
        c.append(b"def");
        assert_eq!(c.finish().unwrap().body, b"abcdef");
    }

    #[test]
    fn no_length_or_too_long_is_not_held() {
        let mut c = Capture::start(201, vec![], 100, false).unwrap();
        assert!(!c.holds(10));
        assert_eq!(c.unread(10), Some((0, 10)));
        let c = Capture::start(201, h(&[("content-length", b"1000")]), 100, false).unwrap();
        assert!(!c.clone().holds(1));
        let big = HOLD_LIMIT + 1;
        let c = Capture::start(
            201,
            h(&[("content-length", big.to_string().as_bytes())]),
            usize::MAX,
            false,
        )
        .unwrap();
        assert!(!c.clone().holds(1));
    }

    #[test]
    fn oversized_stops_capturing_and_holding() {
        let mut c = Capture::start(201, h(&[("content-length", b"20")]), 20, false).unwrap();
        c.append(&[0; 10]);
        assert!(c.holds(10));
        c.append(&[0; 10]);
        assert!(!c.holds(20), "released once it cannot be stored");
        assert_eq!(c.unread(30), None);
        assert_eq!(c.finish(), None);
    }
}

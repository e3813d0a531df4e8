//! WebSockets at a drain: where the RFC 6455 frame boundaries of an upgraded stream are, in
//! each direction, and what one connection inserts there: an optional migration message toward
//! the client at the first message boundary, then a Close (code and reason from the config)
//! toward each end once the connection's own delay has passed.
//!
//! The scanner follows the bytes the proxy passes, however they are split into chunks, and
//! never changes them. A stream that breaks the framing rules is counted and left alone from
//! then on: the connection then passes byte for byte, whatever the drain does.

use super::hint_ms;
use super::state::{DrainState, Phase};

/// RFC 6455 opcodes this module names.
const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;
const FIN: u8 = 0x80;
const MASK: u8 = 0x80;
/// The largest control frame payload (RFC 6455 section 5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;
/// The longest Close reason: the control payload less the two code bytes.
pub const MAX_CLOSE_REASON: usize = MAX_CONTROL_PAYLOAD - 2;

/// A frame end found by [`FrameScanner::scan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Boundary {
    /// Offset in the chunk just after the frame's last byte.
    pub at: usize,
    /// The opcode of the frame that ended.
    pub opcode: u8,
    /// No fragmented message is open here: a whole new message may be inserted.
    pub message: bool,
}

/// Follows the frames of one direction of a WebSocket stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameScanner {
    /// Frames in this direction must be masked (client to server) or must not (server to
    /// client).
    masked: bool,
    /// Header bytes of the current frame read so far (a header is at most 14 bytes).
    header: [u8; 14],
    have: usize,
    /// Payload bytes of the current frame still to come.
    remaining: u64,
    /// The opcode of the frame being read.
    opcode: u8,
    /// A data message was started without FIN and its last fragment has not come yet.
    fragmented: bool,
    broken: bool,
}

/// The header length once its first two bytes are known.
fn header_len(b0_b1: &[u8]) -> Option<usize> {
    let b1 = *b0_b1.get(1)?;
    let ext = match b1 & 0x7F {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    Some(2 + ext + if b1 & MASK != 0 { 4 } else { 0 })
}

impl FrameScanner {
    /// `masked`: the direction's frames are masked (client to server).
    pub fn new(masked: bool) -> FrameScanner {
        FrameScanner {
            masked,
            header: [0; 14],
            have: 0,
            remaining: 0,
            opcode: 0,
            fragmented: false,
            broken: false,
        }
    }

    /// Between two frames.
    pub fn at_boundary(&self) -> bool {
        !self.broken && self.have == 0 && self.remaining == 0
    }

    /// Between two messages (not inside a fragmented one).
    pub fn at_message_boundary(&self) -> bool {
        self.at_boundary() && !self.fragmented
    }

    /// The stream broke the framing rules: it is no longer followed.
    pub fn broken(&self) -> bool {
        self.broken
    }

    /// Follows `chunk` and returns the frame ends within it, in order. After a framing error
    /// the scanner is [`broken`](Self::broken) and reports nothing more.
    pub fn scan(&mut self, chunk: &[u8]) -> Vec<Boundary> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < chunk.len() && !self.broken {
            if self.remaining > 0 {
                let take = self.remaining.min((chunk.len() - i) as u64);
                i += take as usize;
                self.remaining -= take;
                if self.remaining == 0 {
                    out.push(self.frame_end(i));
                }
                continue;
            }
            self.header[self.have] = chunk[i];
            self.have += 1;
            i += 1;
            let Some(need) = header_len(&self.header[..self.have]) else {
                continue;
            };
            if self.have < need {
                continue;
            }
            match self.start_frame() {
                Some(0) => out.push(self.frame_end(i)),
                Some(len) => self.remaining = len,
                None => self.broken = true,
            }
            self.have = 0;
        }
        out
    }

    fn frame_end(&self, at: usize) -> Boundary {
        Boundary {
            at,
            opcode: self.opcode,
            message: !self.fragmented,
        }
    }

    /// Checks the complete header in `self.header` and returns the payload length, or `None`
    /// for a framing error.
    fn start_frame(&mut self) -> Option<u64> {
        let h = &self.header[..self.have];
        let (b0, b1) = (h[0], h[1]);
        let fin = b0 & FIN != 0;
        let opcode = b0 & 0x0F;
        if (b1 & MASK != 0) != self.masked {
            return None;
        }
        let len = match b1 & 0x7F {
            126 => u64::from(u16::from_be_bytes([h[2], h[3]])),
            127 => {
                let n = u64::from_be_bytes(h[2..10].try_into().ok()?);
                if n >> 63 != 0 {
                    return None;
                }
                n
            }
            n => u64::from(n),
        };
        match opcode {
            OP_CLOSE | OP_PING | OP_PONG => {
                if !fin || len > MAX_CONTROL_PAYLOAD as u64 {
                    return None;
                }
            }
            OP_TEXT | OP_BINARY => {
                if self.fragmented {
                    return None;
                }
                self.fragmented = !fin;
            }
            OP_CONTINUATION => {
                if !self.fragmented {
                    return None;
                }
                self.fragmented = !fin;
            }
            _ => return None,
        }
        self.opcode = opcode;
        Some(len)
    }
}

fn frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(FIN | opcode);
    let mask_bit = if mask.is_some() { MASK } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        None => out.extend_from_slice(payload),
        Some(key) => {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
    }
    out
}

/// One unmasked text frame (server to client).
pub fn text_frame(text: &str) -> Vec<u8> {
    frame(OP_TEXT, text.as_bytes(), None)
}

/// A Close frame: masked with `mask` toward the upstream, unmasked toward the client. The
/// reason is cut to [`MAX_CLOSE_REASON`] bytes at a character boundary (the config refuses a
/// longer one).
pub fn close_frame(code: u16, reason: &str, mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut cut = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(&reason.as_bytes()[..cut]);
    frame(OP_CLOSE, &payload, mask)
}

/// The validated `drain.websocket` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Websocket {
    /// The configured migration object rendered as JSON without its closing brace
    /// (`{"type":"server_migration"`), or `None` when no message is sent.
    pub migration_prefix: Option<String>,
    pub close_code: u16,
    pub close_reason: String,
}

impl Websocket {
    /// The migration message for a connection whose delay is `after_ms`.
    pub fn migration_message(&self, after_ms: u32) -> Option<String> {
        let prefix = self.migration_prefix.as_deref()?;
        let sep = if prefix == "{" { "" } else { "," };
        Some(format!("{prefix}{sep}\"reconnect_after_ms\":{after_ms}}}"))
    }
}

/// A direction of the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Server to client (response body): frames unmasked.
    ToClient,
    /// Client to server (request body): frames masked.
    ToUpstream,
}

/// What handoff did to one chunk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Edit {
    /// The bytes to pass instead of the chunk; `None` passes it unchanged.
    pub replace: Option<Vec<u8>>,
    /// The migration message was inserted.
    pub migrated: bool,
    /// A Close frame was inserted (this direction passes nothing more).
    pub closed: bool,
    /// The stream just broke the framing rules: counted once, then left alone.
    pub malformed: bool,
}

/// One upgraded connection at a drain.
#[derive(Debug, Clone)]
pub struct Connection {
    to_client: FrameScanner,
    to_upstream: FrameScanner,
    /// The drain generation the delay was drawn for.
    generation: Option<u32>,
    delay_ms: u32,
    migrated: bool,
    closed_to_client: bool,
    closed_to_upstream: bool,
}

impl Default for Connection {
    fn default() -> Self {
        Connection {
            to_client: FrameScanner::new(false),
            to_upstream: FrameScanner::new(true),
            generation: None,
            delay_ms: 0,
            migrated: false,
            closed_to_client: false,
            closed_to_upstream: false,
        }
    }
}

/// The drain as one chunk sees it.
pub struct Moment<'a> {
    pub state: &'a DrainState,
    pub now_ms: u64,
    pub jitter_ms: u32,
    pub config: &'a Websocket,
}

impl Connection {
    /// Handoff sent a Close in either direction.
    pub fn closing(&self) -> bool {
        self.closed_to_client || self.closed_to_upstream
    }

    /// The delay drawn for the current drain, if one is running.
    pub fn delay_ms(&self) -> Option<u32> {
        self.generation.map(|_| self.delay_ms)
    }

    fn broken(&self) -> bool {
        self.to_client.broken() || self.to_upstream.broken()
    }

    /// Follows one chunk of `dir` and says what to pass instead. `random` draws this
    /// connection's delay (once per drain); `mask` is a fresh masking key for a Close toward
    /// the upstream.
    pub fn on_chunk(
        &mut self,
        dir: Direction,
        chunk: &[u8],
        m: &Moment,
        random: &mut dyn FnMut() -> u32,
        mask: &mut dyn FnMut() -> [u8; 4],
    ) -> Edit {
        if self.broken() {
            return Edit::default();
        }
        let closed = match dir {
            Direction::ToClient => self.closed_to_client,
            Direction::ToUpstream => self.closed_to_upstream,
        };
        if closed {
            // After its Close, handoff passes nothing more this way (the peer's Close reply
            // included: this end already has handoff's).
            let replace = (!chunk.is_empty()).then(Vec::new);
            return Edit {
                replace,
                ..Edit::default()
            };
        }
        let scanner = match dir {
            Direction::ToClient => &mut self.to_client,
            Direction::ToUpstream => &mut self.to_upstream,
        };
        let (was_at_frame, was_at_message) = (scanner.at_boundary(), scanner.at_message_boundary());
        let bounds = scanner.scan(chunk);
        if scanner.broken() {
            return Edit {
                malformed: true,
                ..Edit::default()
            };
        }
        if chunk.is_empty() || m.state.source.is_none() {
            return Edit::default();
        }
        if self.generation != Some(m.state.generation) {
            self.generation = Some(m.state.generation);
            self.delay_ms = hint_ms(m.jitter_ms, random());
        }
        let due = m.now_ms >= m.state.since_ms.saturating_add(u64::from(self.delay_ms))
            || m.state.phase(m.now_ms) == Phase::Drained;
        let message = match (&m.config.migration_prefix, dir, self.migrated) {
            (Some(_), Direction::ToClient, false) => {
                if was_at_message {
                    Some(0)
                } else {
                    bounds.iter().find(|b| b.message).map(|b| b.at)
                }
            }
            _ => None,
        };
        // A Close goes after the first whole frame of the chunk, or in its place when that
        // frame is the peer's own Close (whole in this chunk: the frame is known to be one).
        let close = match bounds.first() {
            Some(b) if due && was_at_frame && b.opcode == OP_CLOSE => Some(0),
            Some(b) if due => Some(b.at),
            _ => None,
        };
        let mut edit = Edit::default();
        let mut out = Vec::with_capacity(chunk.len() + 256);
        let mut from = 0;
        if let Some(at) = message.filter(|at| close.map_or(true, |c| *at <= c)) {
            if let Some(text) = m.config.migration_message(self.delay_ms) {
                out.extend_from_slice(&chunk[..at]);
                out.extend_from_slice(&text_frame(&text));
                from = at;
                self.migrated = true;
                edit.migrated = true;
            }
        }
        match close {
            Some(at) => {
                out.extend_from_slice(&chunk[from..at]);
                let key = match dir {
                    Direction::ToClient => None,
                    Direction::ToUpstream => Some(mask()),
                };
                out.extend_from_slice(&close_frame(
                    m.config.close_code,
                    &m.config.close_reason,
                    key,
                ));
                match dir {
                    Direction::ToClient => self.closed_to_client = true,
                    Direction::ToUpstream => self.closed_to_upstream = true,
                }
                edit.closed = true;
            }
            None if edit.migrated => out.extend_from_slice(&chunk[from..]),
            None => return edit,
        }
        edit.replace = Some(out);
        edit
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drain::DrainSource;
    use proptest::prelude::*;

    /// A frame written by hand, for the scanner's own tests: FIN flag, opcode, payload length
    /// in the shortest form, an optional masking key (the payload is not masked: the scanner
    /// never reads it).
    fn raw(fin: bool, opcode: u8, len: usize, mask: bool) -> Vec<u8> {
        let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let m = if mask { 0x80 } else { 0 };
        if len < 126 {
            f.push(m | len as u8);
        } else if len <= 0xFFFF {
            f.push(m | 126);
            f.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            f.push(m | 127);
            f.extend_from_slice(&(len as u64).to_be_bytes());
        }
        if mask {
            f.extend_from_slice(&[1, 2, 3, 4]);
        }
        f.extend(std::iter::repeat(b'x').take(len));
        f
    }

    fn ends(s: &mut FrameScanner, chunk: &[u8]) -> Vec<usize> {
        s.scan(chunk).iter().map(|b| b.at).collect()
    }

    #[test]
    fn frame_ends_in_one_chunk() {
        let mut stream = raw(true, OP_TEXT, 0, false);
        stream.extend(raw(true, OP_BINARY, 125, false));
        stream.extend(raw(true, OP_TEXT, 126, false));
        stream.extend(raw(true, OP_BINARY, 70_000, false));
        let mut s = FrameScanner::new(false);
        assert_eq!(
            ends(&mut s, &stream),
            vec![2, 2 + 127, 2 + 127 + 130, stream.len()]
        );
        assert!(s.at_message_boundary());
    }

    #[test]
    fn a_fragmented_message_has_no_message_boundary_until_its_last_fragment() {
        let mut stream = raw(false, OP_TEXT, 3, true);
        stream.extend(raw(true, OP_PING, 1, true)); // control frames may come in between
        stream.extend(raw(false, OP_CONTINUATION, 2, true));
        stream.extend(raw(true, OP_CONTINUATION, 2, true));
        let mut s = FrameScanner::new(true);
        let b = s.scan(&stream);
        assert_eq!(
            b.iter().map(|b| (b.opcode, b.message)).collect::<Vec<_>>(),
            vec![
                (OP_TEXT, false),
                (OP_PING, false),
                (OP_CONTINUATION, false),
                (OP_CONTINUATION, true)
            ]
        );
    }

    #[test]
    fn framing_errors_break_the_scanner() {
        let cases: Vec<(bool, Vec<u8>)> = vec![
            (false, raw(true, 0x3, 0, false)),             // reserved opcode
            (false, raw(true, OP_CONTINUATION, 1, false)), // nothing to continue
            (false, raw(false, OP_PING, 0, false)),        // fragmented control frame
            (false, raw(true, OP_CLOSE, 126, false)),      // control frame too long
            (true, raw(true, OP_TEXT, 1, false)),          // unmasked from the client
            (false, raw(true, OP_TEXT, 1, true)),          // masked from the server
            (false, {
                let mut f = raw(false, OP_TEXT, 1, false);
                f.extend(raw(true, OP_TEXT, 1, false)); // a new message inside one
                f
            }),
            (false, {
                let mut f = vec![0x82, 127];
                f.extend_from_slice(&(1u64 << 63).to_be_bytes());
                f
            }),
        ];
        for (masked, bytes) in cases {
            let mut s = FrameScanner::new(masked);
            s.scan(&bytes);
            assert!(s.broken(), "{bytes:02x?}");
            assert!(s.scan(&raw(true, OP_TEXT, 0, masked)).is_empty());
        }
    }

    #[test]
    fn builders_make_frames_the_scanner_reads() {
        let mut s = FrameScanner::new(false);
        let f = text_frame(&"a".repeat(300));
        assert_eq!(ends(&mut s, &f), vec![f.len()]);
        let c = close_frame(1001, "going away", None);
        assert_eq!(c, [&[0x88u8, 12, 0x03, 0xE9][..], b"going away"].concat());
        let mut s = FrameScanner::new(true);
        let c = close_frame(4000, &"é".repeat(70), Some([9, 8, 7, 6]));
        assert_eq!(ends(&mut s, &c), vec![c.len()]);
        assert_eq!(
            c[1],
            0x80 | 124,
            "reason cut to 122 bytes at a character boundary"
        );
        let unmasked: Vec<u8> = c[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ [9, 8, 7, 6][i % 4])
            .collect();
        assert_eq!(&unmasked[..2], &4000u16.to_be_bytes());
    }

    fn config(migration: bool) -> Websocket {
        Websocket {
            migration_prefix: migration.then(|| "{\"type\":\"server_migration\"".to_string()),
            close_code: 1001,
            close_reason: "going away".to_string(),
        }
    }

    fn draining(since: u64) -> DrainState {
        DrainState::serving(0)
            .start(DrainSource::Admin, since, 60)
            .unwrap()
    }

    fn run(
        c: &mut Connection,
        dir: Direction,
        chunk: &[u8],
        state: &DrainState,
        now: u64,
        cfg: &Websocket,
    ) -> Edit {
        let m = Moment {
            state,
            now_ms: now,
            jitter_ms: 1000,
            config: cfg,
        };
        c.on_chunk(dir, chunk, &m, &mut || u32::MAX / 2, &mut || [1, 2, 3, 4])
    }

    #[test]
    fn no_drain_passes_everything() {
        let cfg = config(true);
        let mut c = Connection::default();
        let serving = DrainState::serving(0);
        let f = raw(true, OP_TEXT, 5, false);
        assert_eq!(
            run(&mut c, Direction::ToClient, &f, &serving, 0, &cfg),
            Edit::default()
        );
    }

    #[test]
    fn migration_then_close_at_boundaries() {
        let cfg = config(true);
        let mut c = Connection::default();
        let d = draining(1000);
        // Mid-fragment: the migration waits for the last fragment.
        let first = raw(false, OP_TEXT, 3, false);
        assert!(run(
            &mut c,
            Direction::ToClient,
            &first,
            &DrainState::serving(0),
            0,
            &cfg
        )
        .replace
        .is_none());
        let mut chunk = raw(true, OP_CONTINUATION, 3, false);
        let tail = raw(true, OP_TEXT, 2, false);
        chunk.extend(&tail);
        let e = run(&mut c, Direction::ToClient, &chunk, &d, 1000, &cfg);
        assert!(e.migrated && !e.closed);
        let out = e.replace.unwrap();
        let msg = text_frame("{\"type\":\"server_migration\",\"reconnect_after_ms\":500}");
        assert_eq!(out, [&chunk[..5], &msg[..], &tail[..]].concat());
        assert_eq!(c.delay_ms(), Some(500));
        // Sent once; the Close waits for the delay.
        let f = raw(true, OP_TEXT, 1, false);
        assert_eq!(
            run(&mut c, Direction::ToClient, &f, &d, 1499, &cfg),
            Edit::default()
        );
        let e = run(
            &mut c,
            Direction::ToClient,
            &[f.clone(), f.clone()].concat(),
            &d,
            1500,
            &cfg,
        );
        assert!(e.closed && !e.migrated);
        assert_eq!(
            e.replace.unwrap(),
            [&f[..], &close_frame(1001, "going away", None)].concat()
        );
        // Nothing more toward the client.
        assert_eq!(
            run(&mut c, Direction::ToClient, &f, &d, 1600, &cfg).replace,
            Some(vec![])
        );
        // The client's Close reply is replaced by handoff's masked Close.
        let reply = raw(true, OP_CLOSE, 2, true);
        let e = run(&mut c, Direction::ToUpstream, &reply, &d, 1600, &cfg);
        assert!(e.closed);
        assert_eq!(
            e.replace.unwrap(),
            close_frame(1001, "going away", Some([1, 2, 3, 4]))
        );
    }

    #[test]
    fn a_send_only_client_is_closed_from_its_own_frames() {
        let cfg = config(true);
        let mut c = Connection::default();
        let d = draining(0);
        let f = raw(true, OP_BINARY, 10, true);
        let e = run(&mut c, Direction::ToUpstream, &f, &d, 10_000, &cfg);
        assert!(e.closed);
        // The server's Close reply: the migration message and handoff's Close replace it.
        let e = run(
            &mut c,
            Direction::ToClient,
            &raw(true, OP_CLOSE, 2, false),
            &d,
            10_001,
            &cfg,
        );
        assert!(e.closed && e.migrated);
        let msg = text_frame("{\"type\":\"server_migration\",\"reconnect_after_ms\":500}");
        assert_eq!(
            e.replace.unwrap(),
            [msg, close_frame(1001, "going away", None)].concat()
        );
    }

    #[test]
    fn only_a_whole_close_frame_is_replaced() {
        let cfg = config(false);
        let d = draining(0);
        // A chunk that only starts like a Close: nothing is known yet, nothing changes.
        let mut c = Connection::default();
        let e = run(&mut c, Direction::ToClient, &[0x88], &d, 10_000, &cfg);
        assert_eq!(e, Edit::default());
        // The rest turns out malformed: passed through untouched.
        let e = run(
            &mut c,
            Direction::ToClient,
            &[0x80, 0, 0, 0, 0],
            &d,
            10_000,
            &cfg,
        ); // masked
        assert_eq!(
            e,
            Edit {
                malformed: true,
                ..Edit::default()
            }
        );
    }

    #[test]
    fn drained_closes_whatever_the_delay() {
        let cfg = config(false);
        let mut c = Connection::default();
        let d = DrainState::serving(0)
            .start(DrainSource::Admin, 0, 1)
            .unwrap();
        let m = Moment {
            state: &d,
            now_ms: 999,
            jitter_ms: 60_000,
            config: &cfg,
        };
        let f = raw(true, OP_TEXT, 1, false);
        let e = c.on_chunk(Direction::ToClient, &f, &m, &mut || u32::MAX, &mut || {
            [0; 4]
        });
        assert_eq!(e, Edit::default(), "delay of 60 s not over, grace not over");
        let m = Moment { now_ms: 1000, ..m };
        let e = c.on_chunk(Direction::ToClient, &f, &m, &mut || u32::MAX, &mut || {
            [0; 4]
        });
        assert!(e.closed);
    }

    #[test]
    fn a_malformed_stream_is_left_alone() {
        let cfg = config(true);
        let mut c = Connection::default();
        let d = draining(0);
        let bad = raw(true, 0x3, 0, false);
        let e = run(&mut c, Direction::ToClient, &bad, &d, 0, &cfg);
        assert_eq!(
            e,
            Edit {
                malformed: true,
                ..Edit::default()
            }
        );
        let f = raw(true, OP_TEXT, 1, true);
        assert_eq!(
            run(&mut c, Direction::ToUpstream, &f, &d, 99_999, &cfg),
            Edit::default()
        );
    }

    #[test]
    fn migration_message_json() {
        let mut cfg = config(true);
        assert_eq!(
            cfg.migration_message(7).unwrap(),
            "{\"type\":\"server_migration\",\"reconnect_after_ms\":7}"
        );
        cfg.migration_prefix = Some("{".to_string());
        assert_eq!(
            cfg.migration_message(0).unwrap(),
            "{\"reconnect_after_ms\":0}"
        );
        assert_eq!(config(false).migration_message(1), None);
    }

    /// A stream of valid frames, by (fin, opcode, length) with fragmentation kept valid.
    fn stream_of(masked: bool) -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec((any::<bool>(), 0usize..4, 0usize..300), 0..12).prop_map(
            move |frames| {
                let mut out = Vec::new();
                let mut open = false;
                for (fin, kind, len) in frames {
                    let (op, fin, len) = match kind {
                        0 => (OP_PING, true, len % 126),
                        1 => (OP_CLOSE, true, len % 126),
                        _ if open => (OP_CONTINUATION, fin, len),
                        2 => (OP_TEXT, fin, len),
                        _ => (OP_BINARY, fin, if len > 250 { 70_000 } else { len }),
                    };
                    if op == OP_TEXT || op == OP_BINARY || op == OP_CONTINUATION {
                        open = !fin;
                    }
                    out.extend(raw(fin, op, len, masked));
                }
                out
            },
        )
    }

    fn stream_strategy() -> impl Strategy<Value = (Vec<u8>, bool)> {
        any::<bool>().prop_flat_map(|m| stream_of(m).prop_map(move |s| (s, m)))
    }

    fn chunks_at(stream: &[u8], cuts: &[usize]) -> Vec<(usize, Vec<u8>)> {
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
        cuts.push(0);
        cuts.push(stream.len());
        cuts.sort();
        cuts.dedup();
        cuts.windows(2)
            .map(|w| (w[0], stream[w[0]..w[1]].to_vec()))
            .collect()
    }

    proptest! {
        /// Any split of a valid stream gives the same frame ends as the whole stream.
        #[test]
        fn any_split_gives_the_same_boundaries(
            (stream, masked) in stream_strategy(),
            cuts in prop::collection::vec(any::<usize>(), 0..8),
        ) {
            let mut whole = FrameScanner::new(masked);
            let want = whole.scan(&stream);
            prop_assert!(!whole.broken());
            prop_assert!(whole.at_boundary());
            let mut split = FrameScanner::new(masked);
            let mut got = Vec::new();
            for (offset, chunk) in chunks_at(&stream, &cuts) {
                got.extend(split.scan(&chunk).into_iter().map(|b| Boundary { at: b.at + offset, ..b }));
            }
            prop_assert_eq!(got, want);
        }

        /// Arbitrary bytes never panic, and a broken scanner stays broken and silent.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400), masked in any::<bool>()) {
            let mut s = FrameScanner::new(masked);
            let b = s.scan(&bytes);
            prop_assert!(b.iter().all(|b| b.at <= bytes.len()));
            if s.broken() {
                prop_assert!(s.scan(&bytes).is_empty());
            }
        }

        /// Without a drain nothing changes; during one, the output is the input with whole
        /// frames inserted at frame boundaries, and the migration message never inside a
        /// fragmented message.
        #[test]
        fn edits_only_insert_whole_frames_at_boundaries(
            stream in stream_of(false),
            cuts in prop::collection::vec(any::<usize>(), 0..8),
        ) {
            let cfg = config(true);
            let d = draining(0);
            let mut c = Connection::default();
            let mut out = Vec::new();
            for (_, chunk) in chunks_at(&stream, &cuts) {
                // Unmasked frames: the server-to-client direction.
                let e = run(&mut c, Direction::ToClient, &chunk, &d, 0, &cfg);
                prop_assert!(!e.malformed);
                out.extend(e.replace.unwrap_or(chunk));
            }
            // Delay 500 ms not reached at t=0: only the migration message may be inserted.
            let mut s = FrameScanner::new(false);
            let frames = s.scan(&out);
            prop_assert!(!s.broken());
            let msg = text_frame("{\"type\":\"server_migration\",\"reconnect_after_ms\":500}");
            match out.windows(msg.len()).position(|w| w == msg.as_slice()) {
                None => prop_assert_eq!(&out, &stream),
                Some(at) => {
                    let mut without = out[..at].to_vec();
                    without.extend_from_slice(&out[at + msg.len()..]);
                    prop_assert_eq!(&without, &stream);
                    prop_assert!(at == 0 || frames.iter().any(|b| b.at == at && b.message));
                }
            }
        }
    }
}

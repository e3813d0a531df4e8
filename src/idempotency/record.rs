//! The stored record of one key, in a compact binary encoding (big-endian integers).
//!
//! ```text
//! meta (90 bytes):  version u8 = 1 | state u8 | key [32] | fingerprint [32] | owner u64
//!                   | locked_at_ms u64 | expires_at_ms u64
//! response:         status u16 | header count u16 | (name len u16, name, value len u16,
//!                   value)* | body (the rest)
//! ```
//! The local store keeps the meta and the response in two shared-data entries (a lookup copies
//! only the 90-byte meta); etcd keeps `meta ++ response` in one value.

/// Where a key is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// A reusable slot (local store only): released or never used.
    Free = 0,
    /// The first request is being executed upstream.
    InFlight = 1,
    /// Executed; the response is stored and replayed to duplicates.
    Completed = 2,
    /// Executed, but the response was larger than `max_response_bytes`: duplicates get a
    /// problem response instead of a replay, and are never executed again.
    Unreplayable = 3,
}

impl State {
    fn from_u8(b: u8) -> Option<State> {
        Some(match b {
            0 => State::Free,
            1 => State::InFlight,
            2 => State::Completed,
            3 => State::Unreplayable,
            _ => return None,
        })
    }
}

pub const META_LEN: usize = 90;
const VERSION: u8 = 1;

/// What a lookup needs to decide, without the response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub state: State,
    /// The namespaced key (see [`super::store_key`]).
    pub key: [u8; 32],
    pub fingerprint: [u8; 32],
    /// A random id of the request that took the lock: only it may complete or release it.
    pub owner: u64,
    pub locked_at_ms: u64,
    /// In flight: when the lock counts as abandoned. Completed: when the record expires.
    pub expires_at_ms: u64,
}

impl Meta {
    pub fn free() -> Meta {
        Meta {
            state: State::Free,
            key: [0; 32],
            fingerprint: [0; 32],
            owner: 0,
            locked_at_ms: 0,
            expires_at_ms: 0,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(META_LEN);
        out.push(VERSION);
        out.push(self.state as u8);
        out.extend_from_slice(&self.key);
        out.extend_from_slice(&self.fingerprint);
        out.extend_from_slice(&self.owner.to_be_bytes());
        out.extend_from_slice(&self.locked_at_ms.to_be_bytes());
        out.extend_from_slice(&self.expires_at_ms.to_be_bytes());
        out
    }

    /// Decodes the meta at the start of `bytes` (anything after it is ignored).
    pub fn decode(bytes: &[u8]) -> Option<Meta> {
        if bytes.len() < META_LEN || bytes[0] != VERSION {
            return None;
        }
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[i..i + 8]);
            u64::from_be_bytes(b)
        };
        let mut key = [0u8; 32];
        key.copy_from_slice(&bytes[2..34]);
        let mut fingerprint = [0u8; 32];
        fingerprint.copy_from_slice(&bytes[34..66]);
        Some(Meta {
            state: State::from_u8(bytes[1])?,
            key,
            fingerprint,
            owner: u64_at(66),
            locked_at_ms: u64_at(74),
            expires_at_ms: u64_at(82),
        })
    }

    /// Holds a key that is still live at `now_ms` (an expired completion or an abandoned lock
    /// is not live).
    pub fn is_live(&self, now_ms: u64) -> bool {
        self.state != State::Free && now_ms < self.expires_at_ms
    }
}

/// The upstream's response as stored for replay.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoredResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl StoredResponse {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.extend_from_slice(&self.status.to_be_bytes());
        let n = self.headers.len().min(u16::MAX as usize);
        out.extend_from_slice(&(n as u16).to_be_bytes());
        for (name, value) in self.headers.iter().take(n) {
            for s in [name, value] {
                let b = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
                out.extend_from_slice(&(b.len() as u16).to_be_bytes());
                out.extend_from_slice(b);
            }
        }
        out.extend_from_slice(&self.body);
        out
    }

    /// The size of the encoding: what counts against `max_response_bytes`.
    pub fn encoded_len(&self) -> usize {
        4 + self
            .headers
            .iter()
            .map(|(n, v)| 4 + n.len() + v.len())
            .sum::<usize>()
            + self.body.len()
    }

    pub fn decode(bytes: &[u8]) -> Option<StoredResponse> {
        let mut r = Reader(bytes);
        let status = r.u16()?;
        let n = r.u16()?;
        let mut headers = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let name = r.string()?;
            let value = r.string()?;
            headers.push((name, value));
        }
        Some(StoredResponse {
            status,
            headers,
            body: r.0.to_vec(),
        })
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        let b = self.take(2)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }
    fn string(&mut self) -> Option<String> {
        let n = self.u16()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
}

/// A whole record (meta and, once completed, the response): the etcd value.
pub fn encode_full(meta: &Meta, response: Option<&StoredResponse>) -> Vec<u8> {
    let mut out = meta.encode();
    if let Some(r) = response {
        out.extend_from_slice(&r.encode());
    }
    out
}

pub fn decode_full(bytes: &[u8]) -> Option<(Meta, Option<StoredResponse>)> {
    let meta = Meta::decode(bytes)?;
    let rest = &bytes[META_LEN..];
    let response = if meta.state == State::Completed {
        Some(StoredResponse::decode(rest)?)
    } else {
        None
    };
    Some((meta, response))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn meta(state: State) -> Meta {
        Meta {
            state,
            key: [7; 32],
            fingerprint: [9; 32],
            owner: 0xdead_beef_0102_0304,
            locked_at_ms: 1_700_000_000_000,
            expires_at_ms: 1_700_000_030_000,
        }
    }

    #[test]
    fn meta_round_trips_and_has_a_fixed_size() {
        for s in [
            State::Free,
            State::InFlight,
            State::Completed,
            State::Unreplayable,
        ] {
            let m = meta(s);
            let b = m.encode();
            assert_eq!(b.len(), META_LEN);
            assert_eq!(Meta::decode(&b), Some(m));
        }
        assert_eq!(Meta::decode(&[1, 2, 3]), None);
        let mut bad = meta(State::InFlight).encode();
        bad[1] = 9;
        assert_eq!(Meta::decode(&bad), None);
        bad[0] = 2;
        assert_eq!(Meta::decode(&bad), None);
    }

    #[test]
    fn liveness() {
        let m = meta(State::InFlight);
        assert!(m.is_live(m.expires_at_ms - 1));
        assert!(!m.is_live(m.expires_at_ms));
        assert!(!Meta::free().is_live(0));
    }

    #[test]
    fn full_record_round_trips() {
        let r = StoredResponse {
            status: 201,
            headers: vec![("content-type".into(), "application/json".into())],
            body: b"{\"id\":1}".to_vec(),
        };
        let m = meta(State::Completed);
        assert_eq!(
            decode_full(&encode_full(&m, Some(&r))),
            Some((m.clone(), Some(r.clone())))
        );
        assert_eq!(r.encode().len(), r.encoded_len());
        let u = meta(State::Unreplayable);
        assert_eq!(decode_full(&encode_full(&u, None)), Some((u, None)));
    }

    proptest! {
        #[test]
        fn responses_round_trip(
            status in 100u16..600,
            headers in proptest::collection::vec(("[a-z-]{1,20}", "[ -~]{0,40}"), 0..8),
            body in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let r = StoredResponse { status, headers, body };
            prop_assert_eq!(StoredResponse::decode(&r.encode()), Some(r.clone()));
            prop_assert_eq!(r.encode().len(), r.encoded_len());
        }

        #[test]
        fn decoding_garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_full(&b);
            let _ = StoredResponse::decode(&b);
        }
    }
}

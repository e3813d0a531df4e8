//! A request's headers as one read: the proxy-wasm host's serialization of a header map (what
//! `proxy_get_header_map_pairs` returns), looked up by name, with the writes made since laid
//! over it. The filter takes one while the request headers' stages run, so that their header
//! reads cost one host call in all instead of one each.
//!
//! The serialization: a little-endian `u32` count N, then N pairs of `u32` lengths (name,
//! value), then each name and each value in that order, every one followed by a NUL byte.

/// One header map, read once, and what was written to it since.
#[derive(Debug, Default)]
pub struct HeaderSnapshot {
    raw: Vec<u8>,
    /// Where each (name, value) is in `raw`, in the host's order.
    entries: Vec<(Span, Span)>,
    /// Headers written since the read, the latest last: a value, or `None` when removed.
    writes: Vec<(String, Option<Vec<u8>>)>,
}

#[derive(Debug, Clone, Copy)]
struct Span {
    start: usize,
    len: usize,
}

fn u32_at(raw: &[u8], at: usize) -> Option<usize> {
    let b = raw.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
}

impl HeaderSnapshot {
    /// The map the host serialized into `raw` (empty: no headers); `None` when `raw` is not a
    /// well-formed serialization (the caller then reads header by header instead).
    pub fn parse(raw: Vec<u8>) -> Option<HeaderSnapshot> {
        if raw.is_empty() {
            return Some(HeaderSnapshot::default());
        }
        let count = u32_at(&raw, 0)?;
        let mut at = count.checked_mul(8)?.checked_add(4)?;
        if at > raw.len() {
            return None;
        }
        let mut entries = Vec::with_capacity(count);
        for i in 0..count {
            let mut span = |len: usize| -> Option<Span> {
                let start = at;
                let end = start.checked_add(len)?;
                // Each name and value ends with a NUL the lengths do not count.
                if raw.get(end) != Some(&0) {
                    return None;
                }
                at = end + 1;
                Some(Span { start, len })
            };
            let name = span(u32_at(&raw, 4 + i * 8)?)?;
            let value = span(u32_at(&raw, 8 + i * 8)?)?;
            entries.push((name, value));
        }
        Some(HeaderSnapshot {
            raw,
            entries,
            writes: Vec::new(),
        })
    }

    fn bytes(&self, s: Span) -> &[u8] {
        &self.raw[s.start..s.start + s.len]
    }

    /// The value of `name` (case-insensitive, as the host looks names up): the latest write,
    /// else the first value read, as the host's own lookup returns.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        let name = name.as_bytes();
        if let Some((_, v)) = self
            .writes
            .iter()
            .rev()
            .find(|(k, _)| k.as_bytes().eq_ignore_ascii_case(name))
        {
            return v.as_deref();
        }
        self.entries
            .iter()
            .find(|(k, _)| self.bytes(*k).eq_ignore_ascii_case(name))
            .map(|(_, v)| self.bytes(*v))
    }

    /// Records a write the filter made to the host's map: `Some` replaces every value of
    /// `name` with one, `None` removes them all.
    pub fn set(&mut self, name: &str, value: Option<&[u8]>) {
        self.writes.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        self.writes
            .push((name.to_string(), value.map(<[u8]>::to_vec)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The host's side of the format, for the tests.
    fn serialize(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut out = (pairs.len() as u32).to_le_bytes().to_vec();
        for (k, v) in pairs {
            out.extend_from_slice(&(k.len() as u32).to_le_bytes());
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        }
        for (k, v) in pairs {
            out.extend_from_slice(k);
            out.push(0);
            out.extend_from_slice(v);
            out.push(0);
        }
        out
    }

    #[test]
    fn finds_the_first_value_case_insensitively() {
        let raw = serialize(&[
            (b":method", b"POST"),
            (b"x-user-id", b"alice"),
            (b"x-user-id", b"bob"),
            (b"idempotency-key", b"\xff\xfe"),
        ]);
        let s = HeaderSnapshot::parse(raw).unwrap();
        assert_eq!(s.get(":method"), Some(&b"POST"[..]));
        assert_eq!(s.get("X-User-Id"), Some(&b"alice"[..]));
        assert_eq!(s.get("idempotency-key"), Some(&b"\xff\xfe"[..]));
        assert_eq!(s.get("x-user"), None);
        assert_eq!(s.get(""), None);
    }

    #[test]
    fn writes_lie_over_the_read() {
        let mut s = HeaderSnapshot::parse(serialize(&[(b"x-a", b"1"), (b"x-b", b"2")])).unwrap();
        s.set("x-a", Some(b"3"));
        s.set("X-B", None);
        s.set("x-c", Some(b"4"));
        assert_eq!(s.get("x-a"), Some(&b"3"[..]));
        assert_eq!(s.get("x-b"), None);
        assert_eq!(s.get("x-c"), Some(&b"4"[..]));
        s.set("x-b", Some(b"5"));
        assert_eq!(s.get("x-b"), Some(&b"5"[..]));
        s.set("x-c", None);
        assert_eq!(s.get("x-c"), None);
    }

    #[test]
    fn an_empty_answer_is_an_empty_map() {
        let s = HeaderSnapshot::parse(Vec::new()).unwrap();
        assert_eq!(s.get(":path"), None);
        let s = HeaderSnapshot::parse(serialize(&[])).unwrap();
        assert_eq!(s.get(":path"), None);
    }

    #[test]
    fn a_malformed_serialization_is_refused() {
        let good = serialize(&[(b"x-a", b"1"), (b"x-b", b"22")]);
        // Cut anywhere, a length pointing past the end, a missing NUL, a huge count.
        for cut in 1..good.len() {
            assert!(
                HeaderSnapshot::parse(good[..cut].to_vec()).is_none(),
                "cut {cut}"
            );
        }
        let mut long = good.clone();
        long[8] = 200;
        assert!(HeaderSnapshot::parse(long).is_none());
        let mut no_nul = good.clone();
        let last = no_nul.len() - 1;
        no_nul[last] = b'x';
        assert!(HeaderSnapshot::parse(no_nul).is_none());
        let mut huge = good;
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(HeaderSnapshot::parse(huge).is_none());
    }

    proptest! {
        /// Every lookup agrees with a plain scan of the pairs and writes (what the host's
        /// map would answer), and no input makes the parser panic.
        #[test]
        fn lookups_match_the_map(
            pairs in prop::collection::vec(("[a-cA-C:-]{0,3}", prop::collection::vec(any::<u8>(), 0..4)), 0..8),
            writes in prop::collection::vec(("[a-cA-C:-]{0,3}", prop::option::of(prop::collection::vec(any::<u8>(), 0..4))), 0..6),
            probe in "[a-cA-C:-]{0,3}",
        ) {
            let refs: Vec<(&[u8], &[u8])> = pairs.iter().map(|(k, v)| (k.as_bytes(), v.as_slice())).collect();
            let mut s = HeaderSnapshot::parse(serialize(&refs)).unwrap();
            for (k, v) in &writes {
                s.set(k, v.as_deref());
            }
            let written = writes.iter().rev().find(|(k, _)| k.eq_ignore_ascii_case(&probe));
            let expected: Option<&[u8]> = match written {
                Some((_, v)) => v.as_deref(),
                None => pairs.iter().find(|(k, _)| k.eq_ignore_ascii_case(&probe)).map(|(_, v)| v.as_slice()),
            };
            prop_assert_eq!(s.get(&probe), expected);
        }

        #[test]
        fn any_bytes_parse_or_are_refused(raw in prop::collection::vec(any::<u8>(), 0..64)) {
            if let Some(s) = HeaderSnapshot::parse(raw) {
                let _ = s.get("x");
            }
        }
    }
}

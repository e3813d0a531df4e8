//! The JSON Pointers (RFC 6901) of the mapping entries, extended with `*`.

use std::fmt;

/// Numeric pointer segments above this are rejected: writing one pads an array up to it.
const MAX_INDEX: usize = 1023;

/// A JSON Pointer (RFC 6901) extended with `*`, every element of an array.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pointer {
    pub text: String,
    pub segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// An object member.
    Key(String),
    /// One array element (or the member with this name, when the value is an object).
    Index(usize),
    /// Every element of an array.
    Each,
}

impl Pointer {
    pub fn parse(text: &str) -> Result<Pointer, String> {
        let Some(rest) = text.strip_prefix('/') else {
            return Err(format!(
                "expected a JSON Pointer starting with '/', such as \"/amount/value\", got {text:?}"
            ));
        };
        let mut segments = Vec::new();
        for raw in rest.split('/') {
            segments.push(parse_segment(raw).map_err(|m| format!("{m} in {text:?}"))?);
        }
        Ok(Pointer {
            text: text.to_string(),
            segments,
        })
    }

    pub fn wildcards(&self) -> usize {
        self.segments
            .iter()
            .filter(|s| **s == Segment::Each)
            .count()
    }

    /// True when writing through one pointer writes into (or over) what the other writes:
    /// equal, or one is a prefix of the other. `*` overlaps any index.
    pub(crate) fn overlaps(&self, other: &Pointer) -> bool {
        self.segments
            .iter()
            .zip(&other.segments)
            .all(|(a, b)| match (a, b) {
                (Segment::Each, Segment::Each | Segment::Index(_)) => true,
                (Segment::Index(_), Segment::Each) => true,
                _ => a == b,
            })
    }
}

impl fmt::Display for Pointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn parse_segment(raw: &str) -> Result<Segment, String> {
    if raw == "*" {
        return Ok(Segment::Each);
    }
    let is_index = !raw.is_empty()
        && raw.bytes().all(|b| b.is_ascii_digit())
        && (raw == "0" || !raw.starts_with('0'));
    if is_index {
        return match raw.parse::<usize>() {
            Ok(n) if n <= MAX_INDEX => Ok(Segment::Index(n)),
            _ => Err(format!("array index {raw} is above {MAX_INDEX}")),
        };
    }
    let mut key = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '~' {
            match chars.next() {
                Some('0') => key.push('~'),
                Some('1') => key.push('/'),
                _ => return Err("'~' must be followed by 0 or 1".to_string()),
            }
        } else {
            key.push(c);
        }
    }
    Ok(Segment::Key(key))
}

//! Parsing the `Idempotency-Key` header value.
//!
//! draft-ietf-httpapi-idempotency-key-header defines the value as an RFC 8941 structured-field
//! string: `"8e03978e-40d5-43e8-bc93-6894a57f9324"`. Many clients send the bare value without
//! quotes (Stripe's SDKs do), so both forms are accepted:
//! - quoted: `"…"` with `\"` and `\\` as the only escapes; the key is the unescaped content;
//! - bare: the whole value, which must not start with `"`.
//!
//! Either way the key must be 1 to `max_len` bytes of visible ASCII (0x21..=0x7E): spaces,
//! control characters and non-ASCII bytes are rejected, so a key is always printable and
//! unambiguous in logs.

/// Why a key was rejected; the detail of the 400 problem response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    Empty,
    TooLong { len: usize, max: usize },
    NotVisibleAscii,
    BadQuoting,
}

impl KeyError {
    pub fn detail(&self) -> String {
        match self {
            KeyError::Empty => "the idempotency key is empty".to_string(),
            KeyError::TooLong { len, max } => {
                format!("the idempotency key is {len} bytes long; at most {max} are accepted")
            }
            KeyError::NotVisibleAscii => {
                "the idempotency key must be visible ASCII characters only (no spaces, control \
                 characters or non-ASCII bytes)"
                    .to_string()
            }
            KeyError::BadQuoting => "the idempotency key is not a valid structured-field string \
                                     (unterminated quote or invalid escape)"
                .to_string(),
        }
    }
}

/// The key in a header value (raw bytes, as the host gives them).
pub fn parse_key(raw: &[u8], max_len: usize) -> Result<String, KeyError> {
    let raw = trim_ows(raw);
    let key: Vec<u8> = if raw.first() == Some(&b'"') {
        unquote(raw)?
    } else {
        raw.to_vec()
    };
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if !key.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(KeyError::NotVisibleAscii);
    }
    if key.len() > max_len {
        return Err(KeyError::TooLong {
            len: key.len(),
            max: max_len,
        });
    }
    // All bytes are ASCII, so this cannot fail.
    String::from_utf8(key).map_err(|_| KeyError::NotVisibleAscii)
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// RFC 8941 sf-string: DQUOTE *( unescaped / "\" ( DQUOTE / "\" ) ) DQUOTE, nothing after.
fn unquote(s: &[u8]) -> Result<Vec<u8>, KeyError> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 1;
    while i < s.len() {
        match s[i] {
            b'\\' => match s.get(i + 1) {
                Some(&c @ (b'"' | b'\\')) => {
                    out.push(c);
                    i += 2;
                }
                _ => return Err(KeyError::BadQuoting),
            },
            b'"' => {
                return if i + 1 == s.len() {
                    Ok(out)
                } else {
                    Err(KeyError::BadQuoting)
                };
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    Err(KeyError::BadQuoting)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bare_and_quoted_forms() {
        assert_eq!(parse_key(b"abc-123", 255).unwrap(), "abc-123");
        assert_eq!(parse_key(b"\"abc-123\"", 255).unwrap(), "abc-123");
        assert_eq!(parse_key(b"  abc  ", 255).unwrap(), "abc");
        assert_eq!(parse_key(br#""a\"b\\c""#, 255).unwrap(), r#"a"b\c"#);
    }

    #[test]
    fn rejections() {
        assert_eq!(parse_key(b"", 255), Err(KeyError::Empty));
        assert_eq!(parse_key(b"   ", 255), Err(KeyError::Empty));
        assert_eq!(parse_key(b"\"\"", 255), Err(KeyError::Empty));
        assert_eq!(parse_key(b"a b", 255), Err(KeyError::NotVisibleAscii));
        assert_eq!(parse_key(b"\"a b\"", 255), Err(KeyError::NotVisibleAscii));
        assert_eq!(parse_key(b"a\x01", 255), Err(KeyError::NotVisibleAscii));
        assert_eq!(
            parse_key("clé".as_bytes(), 255),
            Err(KeyError::NotVisibleAscii)
        );
        assert_eq!(
            parse_key(&[0xff, 0x41], 255),
            Err(KeyError::NotVisibleAscii)
        );
        assert_eq!(parse_key(b"\"abc", 255), Err(KeyError::BadQuoting));
        assert_eq!(parse_key(b"\"a\"b", 255), Err(KeyError::BadQuoting));
        assert_eq!(parse_key(b"\"a\\x\"", 255), Err(KeyError::BadQuoting));
        assert_eq!(
            parse_key(&[b'k'; 256], 255),
            Err(KeyError::TooLong { len: 256, max: 255 })
        );
        assert!(parse_key(&[b'k'; 255], 255).is_ok());
        for e in [
            KeyError::Empty,
            KeyError::NotVisibleAscii,
            KeyError::BadQuoting,
            KeyError::TooLong { len: 2, max: 1 },
        ] {
            assert!(!e.detail().is_empty());
        }
    }

    proptest! {
        #[test]
        fn quoting_a_visible_key_round_trips(key in "[!-~]{1,64}") {
            let quoted = format!("\"{}\"", key.replace('\\', "\\\\").replace('"', "\\\""));
            prop_assert_eq!(parse_key(quoted.as_bytes(), 255).unwrap(), key.clone());
            if !key.starts_with('"') {
                prop_assert_eq!(parse_key(key.as_bytes(), 255).unwrap(), key);
            }
        }

        #[test]
        fn accepted_keys_are_visible_ascii_within_the_limit(raw in proptest::collection::vec(any::<u8>(), 0..80)) {
            if let Ok(k) = parse_key(&raw, 40) {
                prop_assert!(!k.is_empty() && k.len() <= 40);
                prop_assert!(k.bytes().all(|b| (0x21..=0x7e).contains(&b)));
            }
        }
    }
}

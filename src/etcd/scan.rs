//! The gateway's answers are read with a small scanner instead of a JSON parser (which would
//! add a second serde_json instantiation to the wasm): etcd writes compact JSON where every
//! field read here is a number, a number-as-string or base64, never escaped.

/// What follows the first `"name":` in `body` (whitespace skipped). The name must not be the
/// tail of a longer name (`"revision"` does not match `"mod_revision"`).
pub fn field<'a>(body: &'a str, name: &str) -> Option<&'a str> {
    let quoted = format!("\"{name}\"");
    let mut from = 0;
    while let Some(i) = body[from..].find(&quoted) {
        let after = &body[from + i + quoted.len()..];
        if let Some(value) = after.trim_start().strip_prefix(':') {
            return Some(value.trim_start());
        }
        from += i + quoted.len();
    }
    None
}

/// The first `"name": "<text>"` in `body`.
pub fn string_field<'a>(body: &'a str, name: &str) -> Option<&'a str> {
    let rest = field(body, name)?.strip_prefix('"')?;
    Some(&rest[..rest.find('"')?])
}

/// The first `"name": "<int64>"` (protobuf's JSON mapping quotes 64-bit integers).
pub fn int_field(body: &str, name: &str) -> Option<i64> {
    string_field(body, name)?.parse().ok()
}

/// The first `"name": <number>` (unquoted, as the gateway writes an error's gRPC code).
pub fn number_field(body: &str, name: &str) -> Option<i64> {
    let rest = field(body, name)?;
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '-'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

//! The drain admin path: who may use it (loopback or a bearer token), what each method asks
//! for, the grace of a start, and the state it reports.

use sha2::{Digest, Sha256};

use super::config::MAX_GRACE_S;
use super::state::Phase;

/// How an admin request was let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminAuth {
    Loopback,
    Token,
    Denied,
}

/// True when `peer` (Envoy's `source.address`: `127.0.0.1:5555`, `[::1]:5555`, or a bare IP)
/// is a loopback address: 127.0.0.0/8, `::1`, or `::ffff:127.x.x.x`. Envoy prints addresses
/// canonically; anything unusual is treated as not loopback. (Parsed by hand: std's IPv6
/// parser costs the wasm ~10 KB.)
pub fn is_loopback_peer(peer: &str) -> bool {
    let host = if let Some(rest) = peer.strip_prefix('[') {
        match rest.split_once(']') {
            Some((h, _)) => h,
            None => return false,
        }
    } else if peer.matches(':').count() == 1 {
        peer.split(':').next().unwrap_or("")
    } else {
        peer
    };
    let host = host.to_ascii_lowercase();
    if host == "::1" || host == "0:0:0:0:0:0:0:1" {
        return true;
    }
    let v4 = host.strip_prefix("::ffff:").unwrap_or(&host);
    let octets: Vec<&str> = v4.split('.').collect();
    octets.len() == 4
        && octets[0] == "127"
        && octets
            .iter()
            .all(|o| !o.is_empty() && o.len() <= 3 && o.parse::<u8>().is_ok())
}

/// True when a request really comes from this host. Envoy's `source.address` is derived from
/// `x-forwarded-for` unless the connection manager sets `use_remote_address` (and from other
/// headers with `original_ip_detection_extensions`), so a client could claim `127.0.0.1` in a
/// header. A request is trusted as loopback only when its peer is loopback, it carries no
/// `x-forwarded-for`, and it arrived on a loopback local address: a remote client can reach
/// none of Envoy's loopback-bound sockets, whatever its headers say.
pub fn is_loopback_request(remote: Option<&str>, local: Option<&str>, forwarded: bool) -> bool {
    !forwarded && remote.is_some_and(is_loopback_peer) && local.is_some_and(is_loopback_peer)
}

/// Who may use the admin path: a loopback request (see [`is_loopback_request`]), or a bearer
/// token whose SHA-256 is the configured one (compared in constant time). No token configured
/// means loopback only.
pub fn authorize(
    loopback: bool,
    authorization: Option<&str>,
    token_sha256: Option<&[u8; 32]>,
) -> AdminAuth {
    if loopback {
        return AdminAuth::Loopback;
    }
    let (Some(want), Some(auth)) = (token_sha256, authorization) else {
        return AdminAuth::Denied;
    };
    let auth = auth.trim();
    let token = match auth.split_once(' ') {
        Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") => t.trim(),
        _ => return AdminAuth::Denied,
    };
    if token.is_empty() {
        return AdminAuth::Denied;
    }
    let got: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    if constant_time_eq(&got, want) {
        AdminAuth::Token
    } else {
        AdminAuth::Denied
    }
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a
        .iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// What an admin request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminAction {
    Report,
    Start,
    Cancel,
    /// Any other method: 405.
    NotAllowed,
}

pub fn admin_action(method: &str) -> AdminAction {
    match method {
        "GET" | "HEAD" => AdminAction::Report,
        "POST" => AdminAction::Start,
        "DELETE" => AdminAction::Cancel,
        _ => AdminAction::NotAllowed,
    }
}

/// True when `:path` (with or without a query string) is the admin path.
pub fn is_admin_path(request_path: &str, admin_path: &str) -> bool {
    let p = request_path.split(['?', '#']).next().unwrap_or("");
    p == admin_path
}

/// The grace of an admin `POST`: `{"grace_s": N}` in the body, else `?grace_s=N` on the admin
/// path, else (`None`) the configured one. `body` is `None` when the request has none.
///
/// proxy-wasm cannot hold request headers while a filter reads the body, so a `POST` with a
/// body is held by the hold filter after handoff (see `x-handoff-hold` in the shipped configs)
/// until handoff has read it and answered: the admin path still never reaches the app.
pub fn start_grace(request_path: &str, body: Option<&[u8]>) -> Result<Option<u32>, String> {
    let from_body = match body.filter(|b| !b.iter().all(u8::is_ascii_whitespace)) {
        None => None,
        Some(b) => grace_in_body(b)
            .map_err(|e| format!("expected a JSON body like {{\"grace_s\": 5}}: {e}"))?,
    };
    let value = from_body.or_else(|| crate::source::query_value(request_path, "grace_s"));
    match value {
        None => Ok(None),
        Some(v) => match v.parse::<u32>() {
            Ok(g) if g <= MAX_GRACE_S => Ok(Some(g)),
            _ => Err(format!(
                "grace_s must be a whole number of seconds from 0 to {MAX_GRACE_S}, got {v:?}"
            )),
        },
    }
}

/// `{"grace_s": N}` (or `{}`) read through a `Value`, not a derived `Deserialize`: a typed
/// serde_json deserializer would bring core's float formatting (kilobytes) into the wasm.
fn grace_in_body(body: &[u8]) -> Result<Option<String>, String> {
    let value = crate::json::value(body)?;
    let Some(fields) = value.as_object() else {
        return Err("expected a JSON object such as {\"grace_s\": 30}".to_string());
    };
    if let Some(k) = fields.keys().find(|k| *k != "grace_s") {
        return Err(format!("unknown field `{k}`, expected `grace_s`"));
    }
    match fields.get("grace_s") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(g) => match g.as_i64() {
            Some(n) => Ok(Some(n.to_string())),
            None => Err("grace_s is not a whole number of seconds".to_string()),
        },
    }
}

/// The admin `GET` answer: `{"state":"draining","since":1763800000000,"inflight":3}`.
pub fn status_json(phase: Phase, since_ms: u64, inflight: u64) -> String {
    format!(
        "{{\"state\":\"{}\",\"since\":{since_ms},\"inflight\":{inflight}}}",
        phase.as_str()
    )
}

#[cfg(test)]
mod tests {
    use super::super::DEFAULT_ADMIN_PATH;
    use super::*;
    use crate::config::drain::parse_sha256_hex;

    const TOKEN_HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn loopback_peers() {
        for p in [
            "127.0.0.1:5555",
            "127.9.0.1:1",
            "[::1]:8080",
            "::1",
            "127.0.0.1",
            "[::ffff:127.0.0.1]:80",
        ] {
            assert!(is_loopback_peer(p), "{p}");
        }
        for p in [
            "203.0.113.7:5555",
            "[2001:db8::1]:80",
            "10.0.0.1",
            "",
            "junk",
        ] {
            assert!(!is_loopback_peer(p), "{p}");
        }
    }

    #[test]
    fn authorization() {
        let want = parse_sha256_hex(TOKEN_HASH).unwrap(); // sha256("test")
        let remote = false;
        assert_eq!(authorize(true, None, None), AdminAuth::Loopback);
        assert_eq!(
            authorize(remote, Some("Bearer test"), Some(&want)),
            AdminAuth::Token
        );
        assert_eq!(
            authorize(remote, Some("bearer test"), Some(&want)),
            AdminAuth::Token
        );
        assert_eq!(
            authorize(remote, Some("Bearer wrong"), Some(&want)),
            AdminAuth::Denied
        );
        assert_eq!(authorize(remote, None, Some(&want)), AdminAuth::Denied);
        assert_eq!(
            authorize(remote, Some("Basic test"), Some(&want)),
            AdminAuth::Denied
        );
        assert_eq!(
            authorize(remote, Some("Bearer "), Some(&want)),
            AdminAuth::Denied
        );
        // No token configured: loopback only.
        assert_eq!(
            authorize(remote, Some("Bearer test"), None),
            AdminAuth::Denied
        );
        assert_eq!(authorize(false, None, None), AdminAuth::Denied);
    }

    #[test]
    fn loopback_requests() {
        let lo = Some("127.0.0.1:10000");
        assert!(is_loopback_request(Some("127.0.0.1:5555"), lo, false));
        assert!(is_loopback_request(
            Some("[::1]:5555"),
            Some("[::1]:10000"),
            false
        ));
        // A client-supplied x-forwarded-for may be where the loopback peer came from.
        assert!(!is_loopback_request(Some("127.0.0.1:0"), lo, true));
        // Reached on a non-loopback address: not a local caller, whatever the peer claims.
        assert!(!is_loopback_request(
            Some("127.0.0.1:0"),
            Some("10.0.0.5:8080"),
            false
        ));
        assert!(!is_loopback_request(Some("203.0.113.7:5555"), lo, false));
        assert!(!is_loopback_request(None, lo, false));
        assert!(!is_loopback_request(Some("127.0.0.1:1"), None, false));
    }

    #[test]
    fn admin_requests() {
        assert!(is_admin_path(
            "/.well-known/handoff/drain",
            DEFAULT_ADMIN_PATH
        ));
        assert!(is_admin_path(
            "/.well-known/handoff/drain?x",
            DEFAULT_ADMIN_PATH
        ));
        assert!(!is_admin_path(
            "/.well-known/handoff/drainx",
            DEFAULT_ADMIN_PATH
        ));
        assert_eq!(admin_action("POST"), AdminAction::Start);
        assert_eq!(admin_action("DELETE"), AdminAction::Cancel);
        assert_eq!(admin_action("GET"), AdminAction::Report);
        assert_eq!(admin_action("PUT"), AdminAction::NotAllowed);
        let p = DEFAULT_ADMIN_PATH;
        assert_eq!(start_grace(p, None), Ok(None));
        assert_eq!(start_grace(&format!("{p}?grace_s=3"), None), Ok(Some(3)));
        assert_eq!(
            start_grace(&format!("{p}?x=1&grace_s=0"), None),
            Ok(Some(0))
        );
        assert!(start_grace(&format!("{p}?grace_s=-1"), None).is_err());
        assert!(start_grace(&format!("{p}?grace_s=soon"), None).is_err());
        assert!(start_grace(&format!("{p}?grace_s=999999"), None).is_err());
        // The JSON body of the contract, which wins over the query.
        assert_eq!(start_grace(p, Some(br#"{"grace_s": 7}"#)), Ok(Some(7)));
        assert_eq!(
            start_grace(&format!("{p}?grace_s=3"), Some(br#"{"grace_s": 0}"#)),
            Ok(Some(0))
        );
        assert_eq!(start_grace(p, Some(b"{}")), Ok(None));
        assert_eq!(start_grace(p, Some(b" \n")), Ok(None));
        assert!(start_grace(p, Some(br#"{"grace_s": -2}"#)).is_err());
        assert!(start_grace(p, Some(br#"{"grace": 2}"#)).is_err());
        assert!(start_grace(p, Some(b"grace_s=2")).is_err());
        let v: serde_json::Value =
            serde_json::from_str(&status_json(Phase::Draining, 17, 3)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"state": "draining", "since": 17, "inflight": 3})
        );
    }
}

//! The `user_id` and `scope` sources (`{"header": "x-user-id"}`): their walk and their check.
//! [`Source`] is both the form written and the form the policy runs with.

use serde_json::Value;

use super::error::{check_header_name, ConfigError};
use super::walk::{boolean, error, string, variant};
use crate::source::Source;

#[inline(never)]
pub(super) fn walk(v: &Value) -> Result<Source, ConfigError> {
    const NAMES: &[&str] = &["header", "cookie", "query", "jwt_claim", "peer_principal"];
    let (i, content) = variant(v, NAMES)?;
    let Some(content) = content else {
        return Err(error(
            "invalid type: unit variant, expected newtype variant",
        ));
    };
    let source = match i {
        0 => string(content).map(Source::Header),
        1 => string(content).map(Source::Cookie),
        2 => string(content).map(Source::Query),
        3 => string(content).map(Source::JwtClaim),
        _ => boolean(content).map(Source::PeerPrincipal),
    };
    source.map_err(|e| e.within(NAMES[i]))
}

/// Checks the meaning of a parsed source; returns what is wrong.
pub(super) fn check(source: &Source) -> std::result::Result<(), String> {
    match source {
        Source::Header(n) | Source::Cookie(n) | Source::Query(n) | Source::JwtClaim(n)
            if n.is_empty() =>
        {
            Err("expected a non-empty name".to_string())
        }
        Source::Header(n) => check_header_name(n),
        Source::PeerPrincipal(false) => {
            Err("expected `true` (omit the source to disable it)".to_string())
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks() {
        assert!(check(&Source::Header("X-User".into())).is_err());
        assert!(check(&Source::Cookie(String::new())).is_err());
        assert!(check(&Source::PeerPrincipal(false)).is_err());
        assert!(check(&Source::Header("x-user".into())).is_ok());
    }
}

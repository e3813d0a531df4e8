//! Signed values the e2e tests send: HS256 JWTs (verified by the fixtures' jwt_authn with the
//! demo key) and canary override headers.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

/// The JOSE header the demo key verifies.
pub const HS256_HEADER: &str = r#"{"alg":"HS256","typ":"JWT","kid":"demo"}"#;

/// A JWT with this JOSE `header`, signed HS256 with `secret`.
pub fn jwt(secret: &[u8], header: &str, claims: &Value) -> String {
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any key length");
    mac.update(input.as_bytes());
    format!(
        "{input}.{}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    )
}

/// A canary override header value: `<variant>.<hex HMAC-SHA256(secret, variant:user)>`.
pub fn sign_override(secret: &str, variant: &str, user: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(format!("{variant}:{user}").as_bytes());
    format!("{variant}.{}", hex::encode(mac.finalize().into_bytes()))
}

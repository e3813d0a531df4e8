//! Sticky canary cohorts: which users see the new version.
//!
//! The assignment is a contract other tools recompute (`handoffctl cohort`, dashboards):
//! `bucket = murmur3_x86_32(salt + ":" + user_id, seed 0) mod 10000`, canary iff
//! `bucket < round(percent * 100)`. Because the bucket does not depend on the percent, raising
//! the percent only ever moves users from stable to canary.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::guard::Guard;
use crate::ids::IdSet;
use crate::source::{cookie_value, RequestView, Source};

pub const BUCKETS: u32 = 10_000;

pub use crate::cohort::Variant;

/// Why a user got its variant; each is a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    Hash,
    Allow,
    Deny,
    Override,
    Anonymous,
    Unidentified,
    /// The guard aborted the canary: stable for everyone but a signed override.
    Aborted,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Hash => "hash",
            Reason::Allow => "allow",
            Reason::Deny => "deny",
            Reason::Override => "override",
            Reason::Anonymous => "anonymous",
            Reason::Unidentified => "unidentified",
            Reason::Aborted => "aborted",
        }
    }

    pub const ALL: [Reason; 7] = [
        Reason::Hash,
        Reason::Allow,
        Reason::Deny,
        Reason::Override,
        Reason::Anonymous,
        Reason::Unidentified,
        Reason::Aborted,
    ];
}

/// The bucket of a user under a salt: the assignment contract, bit for bit.
pub fn bucket(salt: &str, user_id: &str) -> u32 {
    let mut input = Vec::with_capacity(salt.len() + 1 + user_id.len());
    input.extend_from_slice(salt.as_bytes());
    input.push(b':');
    input.extend_from_slice(user_id.as_bytes());
    // Reading from an in-memory slice cannot fail.
    let hash = murmur3::murmur3_32(&mut &input[..], 0).unwrap_or(0);
    hash % BUCKETS
}

/// `round(percent * 100)`: the number of buckets (of 10,000) that are canary.
pub fn threshold(percent: f64) -> u32 {
    (percent * 100.0).round().clamp(0.0, BUCKETS as f64) as u32
}

/// A validated canary section.
#[derive(Debug, Clone)]
pub struct Canary {
    pub salt: String,
    pub percent: f64,
    pub threshold: u32,
    pub user_id: Vec<Source>,
    pub route_header: String,
    pub allow: IdSet,
    pub deny: IdSet,
    pub anonymous_cookie: Option<AnonymousCookie>,
    pub override_: Option<Override>,
    pub response_header: bool,
    /// Judges the canary against stable and aborts it on a regression.
    pub guard: Option<Guard>,
    /// The fleet's rollout record in etcd (abort, resume, percent).
    pub control: Option<crate::rollout::EtcdControl>,
}

#[derive(Debug, Clone)]
pub struct AnonymousCookie {
    pub name: String,
    pub max_age_s: u64,
}

#[derive(Debug, Clone)]
pub struct Override {
    pub header: String,
    pub(crate) secret: Vec<u8>,
}

/// The outcome for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub variant: Variant,
    pub reason: Reason,
    /// The user's bucket, when a user id was found.
    pub bucket: Option<u32>,
    /// A `Set-Cookie` value to add to the response (a newly minted anonymous id).
    pub set_cookie: Option<String>,
    /// An override header was present but its signature did not verify.
    pub override_rejected: bool,
}

impl Assignment {
    /// The assignment once the guard aborted the canary: stable whatever the hash or the allow
    /// list; a signed override still holds (operators debug the canary with it), and a request
    /// without a user id keeps its reason.
    pub fn aborted(mut self) -> Assignment {
        if !matches!(self.reason, Reason::Override | Reason::Unidentified) {
            self.variant = Variant::Stable;
            self.reason = Reason::Aborted;
        }
        self
    }
}

impl Canary {
    /// Assigns the request's user. `mint_id` makes a fresh random id, called only when an
    /// anonymous cookie must be issued.
    pub fn assign(&self, req: &dyn RequestView, mint_id: impl FnOnce() -> String) -> Assignment {
        let found = self.user_id.iter().find_map(|s| s.read(req));
        let (user, anonymous, set_cookie) = match (found, &self.anonymous_cookie) {
            (Some(u), _) => (u, false, None),
            (None, Some(cookie)) => {
                let existing = req.header("cookie").and_then(|c| {
                    cookie_value(&c, &cookie.name)
                        .filter(|v| is_anonymous_id(v))
                        .map(str::to_string)
                });
                match existing {
                    Some(id) => (id, true, None),
                    None => {
                        let id = mint_id();
                        let set = format!(
                            "{}={}; Max-Age={}; Path=/; HttpOnly; SameSite=Lax",
                            cookie.name, id, cookie.max_age_s
                        );
                        (id, true, Some(set))
                    }
                }
            }
            (None, None) => {
                return Assignment {
                    variant: Variant::Stable,
                    reason: Reason::Unidentified,
                    bucket: None,
                    set_cookie: None,
                    override_rejected: false,
                }
            }
        };
        let bucket = bucket(&self.salt, &user);
        let mut out = Assignment {
            variant: Variant::Stable,
            reason: Reason::Hash,
            bucket: Some(bucket),
            set_cookie,
            override_rejected: false,
        };
        if let Some(ov) = &self.override_ {
            if let Some(value) = req.header(&ov.header) {
                match ov.verify(&value, &user) {
                    Some(v) => {
                        out.variant = v;
                        out.reason = Reason::Override;
                        return out;
                    }
                    None => out.override_rejected = true,
                }
            }
        }
        (out.variant, out.reason) = if self.deny.contains(&user) {
            (Variant::Stable, Reason::Deny)
        } else if self.allow.contains(&user) {
            (Variant::Canary, Reason::Allow)
        } else {
            let v = if bucket < self.threshold {
                Variant::Canary
            } else {
                Variant::Stable
            };
            (
                v,
                if anonymous {
                    Reason::Anonymous
                } else {
                    Reason::Hash
                },
            )
        };
        out
    }
}

/// An anonymous id as minted by [`new_anonymous_id`]: 32 lowercase hex digits. Anything else in
/// the cookie is ignored and replaced, so a client cannot pick an id of its choosing by shape.
pub fn is_anonymous_id(v: &str) -> bool {
    v.len() == 32 && v.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// 128 random bits as 32 hex digits.
pub fn new_anonymous_id(random: [u8; 16]) -> String {
    hex::encode(random)
}

impl Override {
    /// The signed value that forces `variant` for `user`: `<variant>.<hex hmac>`.
    pub fn sign(&self, variant: Variant, user: &str) -> String {
        format!(
            "{}.{}",
            variant.as_str(),
            hex::encode(self.mac(variant, user))
        )
    }

    /// The forced variant if `value` carries a valid signature for `user`.
    pub fn verify(&self, value: &str, user: &str) -> Option<Variant> {
        let (variant, sig) = value.split_once('.')?;
        let variant = Variant::parse(variant)?;
        let sig = hex::decode(sig).ok()?;
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.secret).ok()?;
        mac.update(variant.as_str().as_bytes());
        mac.update(b":");
        mac.update(user.as_bytes());
        // Constant-time comparison.
        mac.verify_slice(&sig).ok()?;
        Some(variant)
    }

    fn mac(&self, variant: Variant, user: &str) -> Vec<u8> {
        // HMAC accepts keys of any length.
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.secret).expect("any key length");
        mac.update(variant.as_str().as_bytes());
        mac.update(b":");
        mac.update(user.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::canary::RawCanary;
    use crate::source::fake::FakeRequest;
    use proptest::prelude::*;

    pub const GOLDEN: &[(&str, &str, u32)] = crate::canary::golden::VECTORS;

    fn canary(json: &str) -> Canary {
        serde_json::from_str::<RawCanary>(json)
            .unwrap()
            .validate()
            .unwrap()
    }

    fn base() -> Canary {
        canary(
            r#"{"salt":"checkout-2026-11","percent":12.5,
                "user_id":[{"header":"x-user-id"},{"cookie":"uid"},{"query":"uid"},{"jwt_claim":"sub"}],
                "allow":["u-1"],"deny":["u-2"],
                "override":{"header":"x-canary-override","secret":"change-me"}}"#,
        )
    }

    fn no_mint() -> String {
        panic!("no anonymous id expected")
    }

    #[test]
    fn golden_vectors() {
        for &(salt, user, b) in GOLDEN {
            assert_eq!(bucket(salt, user), b, "bucket({salt:?}, {user:?})");
        }
    }

    #[test]
    fn threshold_rounds_percent_times_100() {
        assert_eq!(threshold(12.5), 1250);
        assert_eq!(threshold(0.01), 1);
        assert_eq!(threshold(100.0), 10_000);
        assert_eq!(threshold(0.0), 0);
        assert_eq!(threshold(33.33), 3333);
    }

    #[test]
    fn percent_validation() {
        for bad in ["-1", "100.01", "12.345", "1e9"] {
            let json = format!(r#"{{"salt":"s","percent":{bad},"user_id":[{{"header":"x"}}]}}"#);
            let e = serde_json::from_str::<RawCanary>(&json)
                .unwrap()
                .validate()
                .unwrap_err();
            assert_eq!(e.path, "percent", "{bad}");
        }
        for good in ["0", "100", "12.5", "0.01", "99.99"] {
            let json = format!(r#"{{"salt":"s","percent":{good},"user_id":[{{"header":"x"}}]}}"#);
            serde_json::from_str::<RawCanary>(&json)
                .unwrap()
                .validate()
                .unwrap();
        }
    }

    #[test]
    fn config_rejections_name_their_field() {
        let cases = [
            (
                r#"{"salt":"","percent":1,"user_id":[{"header":"x"}]}"#,
                "salt",
            ),
            (r#"{"salt":"s","percent":1,"user_id":[]}"#, "user_id"),
            (
                r#"{"salt":"s","percent":1,"user_id":[{"header":""}]}"#,
                "user_id[0]",
            ),
            (
                r#"{"salt":"s","percent":1,"user_id":[{"header":"x"}],"route_header":"Bad Header"}"#,
                "route_header",
            ),
            (
                r#"{"salt":"s","percent":1,"user_id":[{"header":"x"}],"allow":["a",""]}"#,
                "allow[1]",
            ),
            (
                r#"{"salt":"s","percent":1,"user_id":[{"header":"x"}],"deny":[""]}"#,
                "deny[0]",
            ),
            (
                r#"{"salt":"s","percent":1,"anonymous_cookie":{"name":"a b"}}"#,
                "anonymous_cookie.name",
            ),
            (
                r#"{"salt":"s","percent":1,"anonymous_cookie":{"name":"a","max_age_s":0}}"#,
                "anonymous_cookie.max_age_s",
            ),
            (
                r#"{"salt":"s","percent":1,"user_id":[{"header":"x"}],"override":{"header":"o","secret":"short"}}"#,
                "override.secret",
            ),
            (
                r#"{"salt":"s","percent":1,"user_id":[{"header":"x"}],"override":{"header":"x-canary-variant","secret":"longenough"}}"#,
                "override.header",
            ),
        ];
        for (json, path) in cases {
            let e = serde_json::from_str::<RawCanary>(json)
                .unwrap()
                .validate()
                .unwrap_err();
            assert_eq!(e.path, path, "{json}: {e}");
        }
    }

    #[test]
    fn first_present_source_wins() {
        let c = base();
        let req = FakeRequest::default()
            .with_header("cookie", "uid=from-cookie")
            .with_path("/?uid=from-query")
            .with_claim("sub", "from-jwt");
        let a = c.assign(&req, no_mint);
        assert_eq!(a.bucket, Some(bucket("checkout-2026-11", "from-cookie")));
        let req = FakeRequest::default().with_claim("sub", "from-jwt");
        let a = c.assign(&req, no_mint);
        assert_eq!(a.bucket, Some(bucket("checkout-2026-11", "from-jwt")));
    }

    #[test]
    fn allow_deny_and_deny_wins() {
        let mut c = base();
        let a = c.assign(
            &FakeRequest::default().with_header("x-user-id", "u-1"),
            no_mint,
        );
        assert_eq!((a.variant, a.reason), (Variant::Canary, Reason::Allow));
        let a = c.assign(
            &FakeRequest::default().with_header("x-user-id", "u-2"),
            no_mint,
        );
        assert_eq!((a.variant, a.reason), (Variant::Stable, Reason::Deny));
        c.allow = ["u-1", "u-2"].into_iter().collect();
        let a = c.assign(
            &FakeRequest::default().with_header("x-user-id", "u-2"),
            no_mint,
        );
        assert_eq!(a.reason, Reason::Deny);
    }

    #[test]
    fn unidentified_is_stable_without_anonymous_cookie() {
        let a = base().assign(&FakeRequest::default(), no_mint);
        assert_eq!(
            (a.variant, a.reason, a.bucket),
            (Variant::Stable, Reason::Unidentified, None)
        );
    }

    #[test]
    fn anonymous_cookie_is_minted_then_reused() {
        let c = canary(
            r#"{"salt":"s","percent":50,"user_id":[{"header":"x-user-id"}],
                "anonymous_cookie":{"name":"hf_uid","max_age_s":60}}"#,
        );
        let id = new_anonymous_id([7; 16]);
        let a = c.assign(&FakeRequest::default(), || id.clone());
        assert_eq!(a.reason, Reason::Anonymous);
        let set = a.set_cookie.unwrap();
        assert_eq!(
            set,
            format!("hf_uid={id}; Max-Age=60; Path=/; HttpOnly; SameSite=Lax")
        );
        let back = FakeRequest::default().with_header("cookie", &format!("a=1; hf_uid={id}"));
        let b = c.assign(&back, no_mint);
        assert_eq!(
            (b.variant, b.bucket, b.set_cookie),
            (a.variant, a.bucket, None)
        );
        // A hand-written cookie value is not accepted as an id.
        let forged = FakeRequest::default().with_header("cookie", "hf_uid=alice");
        let f = c.assign(&forged, || id.clone());
        assert!(f.set_cookie.is_some());
    }

    #[test]
    fn override_must_be_signed_for_this_user() {
        let c = base();
        let ov = c.override_.clone().unwrap();
        // Pick a user that hashes to stable, then force canary.
        let user = (0..)
            .map(|i| format!("user-{i}"))
            .find(|u| bucket(&c.salt, u) >= c.threshold && !c.allow.contains(u))
            .unwrap();
        let signed = ov.sign(Variant::Canary, &user);
        let req = FakeRequest::default()
            .with_header("x-user-id", &user)
            .with_header("x-canary-override", &signed);
        let a = c.assign(&req, no_mint);
        assert_eq!(
            (a.variant, a.reason, a.override_rejected),
            (Variant::Canary, Reason::Override, false)
        );
        // The same signature for another user, a tampered variant, garbage: ignored.
        for (u, v) in [
            ("someone-else", signed.clone()),
            (user.as_str(), signed.replacen("canary", "stable", 1)),
            (user.as_str(), "canary.zz".to_string()),
            (user.as_str(), "canary".to_string()),
        ] {
            let req = FakeRequest::default()
                .with_header("x-user-id", u)
                .with_header("x-canary-override", &v);
            let a = c.assign(&req, no_mint);
            assert!(a.override_rejected, "{u} {v}");
            assert_ne!(a.reason, Reason::Override);
        }
    }

    proptest! {
        #[test]
        fn ramp_is_monotonic(user in ".{1,40}", salt in "[a-z0-9-]{1,20}", p1 in 0u32..=10000, p2 in 0u32..=10000) {
            let (lo, hi) = if p1 <= p2 { (p1, p2) } else { (p2, p1) };
            let b = bucket(&salt, &user);
            // canary at the lower percent implies canary at the higher one
            prop_assert!(b >= lo || b < hi);
        }

        #[test]
        fn assignment_is_deterministic(user in "[ -~]{1,60}") {
            let c = base();
            let req = FakeRequest::default().with_header("x-user-id", user.trim());
            prop_assume!(!user.trim().is_empty());
            prop_assert_eq!(c.assign(&req, no_mint), c.assign(&req, no_mint));
        }
    }

    /// Salt independence: the canary sets of two salts at 50% overlap like independent coin
    /// flips (about 25% of users in both), not like the same set.
    #[test]
    fn salts_are_independent() {
        let n = 20_000;
        let both = (0..n)
            .filter(|i| {
                let u = format!("user-{i}");
                bucket("exp-a", &u) < 5000 && bucket("exp-b", &u) < 5000
            })
            .count();
        let share = both as f64 / n as f64;
        assert!((share - 0.25).abs() < 0.02, "overlap {share}");
    }
}

pub mod golden {
    //! Golden vectors shared by the host tests and the wasm32 (wasm-bindgen-test) tests.
    //! Computed independently with Python's `mmh3.hash(salt + ":" + user, 0, signed=False) %
    //! 10000`, the reference murmur3_x86_32.
    pub const VECTORS: &[(&str, &str, u32)] = &[
        ("checkout-2026-11", "u-1", 9471),
        ("checkout-2026-11", "u-2", 7828),
        ("checkout-2026-11", "alice", 9333),
        ("checkout-2026-11", "bob", 4776),
        ("checkout-2026-11", "", 4356),
        ("s", "user-42", 3333),
        ("exp-a", "user-0", 8791),
        ("exp-b", "user-0", 9765),
        ("checkout-2026-11", "ユーザー", 430),
        ("salt with spaces", "id:with:colons", 6109),
        ("x", LONG_ONES, 886),
    ];
    const LONG_ONES: &str = "11111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111";
}

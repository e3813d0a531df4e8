//! Cohort assignment with arbitrary salts, user ids, percents and override headers: no panic,
//! buckets in range, the assignment deterministic, the ramp monotonic, and an override header
//! that was not signed with the secret never forces a variant.
#![no_main]

use handoff::canary::{bucket, threshold, Canary, Reason, Variant, BUCKETS};
use handoff::config::canary::RawCanary;
use handoff::source::RequestView;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

struct Req<'a> {
    user: &'a str,
    override_value: &'a str,
}

impl RequestView for Req<'_> {
    fn header(&self, name: &str) -> Option<String> {
        match name {
            "x-user-id" => Some(self.user.to_string()),
            "x-canary-override" => Some(self.override_value.to_string()),
            _ => None,
        }
    }
    fn path(&self) -> Option<String> {
        Some("/".to_string())
    }
    fn jwt_claim(&self, _: &str) -> Option<String> {
        None
    }
    fn peer_principal(&self) -> Option<String> {
        None
    }
}

fn base() -> &'static Canary {
    static BASE: OnceLock<Canary> = OnceLock::new();
    BASE.get_or_init(|| {
        let raw: RawCanary = serde_json::from_str(
            r#"{"salt":"s","percent":0,"user_id":[{"header":"x-user-id"}],
                "override":{"header":"x-canary-override","secret":"fuzz-secret"}}"#,
        )
        .expect("fuzz base config parses");
        raw.validate().expect("fuzz base config is valid")
    })
}

fuzz_target!(|input: (&str, &str, u16, u16, &str)| {
    let (salt, user, p1, p2, override_value) = input;
    let b = bucket(salt, user);
    assert!(b < BUCKETS);

    let (lo, hi) = (p1.min(p2) % 10_001, p1.max(p2) % 10_001);
    let (lo, hi) = (lo.min(hi), lo.max(hi));
    let (t_lo, t_hi) = (threshold(lo as f64 / 100.0), threshold(hi as f64 / 100.0));
    assert!(t_lo <= t_hi && t_hi <= BUCKETS);

    let at = |percent: u16| {
        let mut c = base().clone();
        c.salt = if salt.is_empty() {
            "s".to_string()
        } else {
            salt.to_string()
        };
        c.percent = percent as f64 / 100.0;
        c.threshold = threshold(c.percent);
        let req = Req {
            user,
            override_value,
        };
        let a = c.assign(&req, || unreachable!("no anonymous cookie configured"));
        assert_eq!(a, c.assign(&req, || unreachable!()), "not deterministic");
        a
    };
    let (a_lo, a_hi) = (at(lo), at(hi));
    // Random bytes are a valid signature with probability 2^-256: a fuzzer-made override never
    // forces a variant.
    assert_ne!(a_lo.reason, Reason::Override, "forged override accepted");
    if a_lo.reason == Reason::Hash && a_hi.reason == Reason::Hash {
        assert!(
            !(a_lo.variant == Variant::Canary && a_hi.variant == Variant::Stable),
            "user went back to stable when the percent rose"
        );
    }
});

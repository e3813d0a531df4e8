//! The two cohorts of a canary experiment. A leaf: the canary decides a request's cohort, the
//! guard counts per cohort, translation picks the backend version per cohort.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Variant {
    Stable,
    Canary,
}

impl Variant {
    pub fn as_str(self) -> &'static str {
        match self {
            Variant::Stable => "stable",
            Variant::Canary => "canary",
        }
    }

    pub fn parse(s: &str) -> Option<Variant> {
        match s {
            "stable" => Some(Variant::Stable),
            "canary" => Some(Variant::Canary),
            _ => None,
        }
    }

    pub const ALL: [Variant; 2] = [Variant::Stable, Variant::Canary];
}

//! The configuration's error type and the checks every section shares. A leaf: it uses nothing
//! else from the crate, so the policy modules and the section parsers can both depend on it.

use std::fmt;

/// A rejected configuration: the JSON path (`canary.user_id[0]`) and what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            path: path.into(),
            message: message.into(),
        }
    }

    /// Prefixes the path with the enclosing field: `percent` inside `canary` becomes
    /// `canary.percent`.
    pub fn within(mut self, parent: &str) -> ConfigError {
        self.path = if self.path.is_empty() {
            parent.to_string()
        } else if self.path.starts_with('[') {
            format!("{parent}{}", self.path)
        } else {
            format!("{parent}.{}", self.path)
        };
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = if self.path.is_empty() || self.path == "." {
            "(root)"
        } else {
            &self.path
        };
        write!(
            f,
            "invalid configuration at `{}`: {}",
            one_line(path),
            one_line(&self.message)
        )
    }
}

impl std::error::Error for ConfigError {}

/// Escapes control characters (a JSON key may hold a raw CR or LF), so a rejection stays one
/// log line and cannot forge further lines in Envoy's log. Found by the `config_parse` fuzz
/// target.
pub fn one_line(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

/// Checks a header name as configured: non-empty lowercase token characters, since Envoy
/// stores header names lowercase.
pub fn check_header_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.!#$%&'*+^`|~".contains(&b)
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "expected a lowercase HTTP header name (letters, digits, '-'), got {name:?}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_display_is_one_line_with_the_path() {
        let e = ConfigError::new("percent", "expected 0..=100").within("canary");
        assert_eq!(
            e.to_string(),
            "invalid configuration at `canary.percent`: expected 0..=100"
        );
        assert_eq!(
            ConfigError::new("[1]", "x").within("deny").path,
            "deny[1]".to_string()
        );
        let e = ConfigError::new("a\nb", "x\u{7}y");
        assert_eq!(e.to_string(), "invalid configuration at `a\\nb`: x\\u{7}y");
    }

    #[test]
    fn header_names() {
        assert!(check_header_name("x-canary-variant").is_ok());
        assert!(check_header_name("X-Canary").is_err());
        assert!(check_header_name("").is_err());
        assert!(check_header_name("a b").is_err());
    }
}

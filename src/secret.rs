//! A secret value (API key, bearer token) that never prints itself.

use std::fmt;

/// Holds a secret. `Debug` and `Display` show `***`; only [`Secret::expose`] gives the value,
/// so every place that sends a secret anywhere is easy to find.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Compares with `candidate` in time that does not depend on where they differ, so a
    /// token cannot be guessed byte by byte from response times.
    pub fn matches(&self, candidate: &str) -> bool {
        let a = self.0.as_bytes();
        let b = candidate.as_bytes();
        let mut diff = (a.len() ^ b.len()) as u8 | u8::from(a.len() != b.len());
        for (i, x) in a.iter().enumerate() {
            diff |= x ^ b.get(i).copied().unwrap_or(0);
        }
        diff == 0
    }

    /// Replaces every occurrence of this secret in `text` with `***`.
    pub fn redact(&self, text: &str) -> String {
        if self.0.is_empty() {
            return text.to_string();
        }
        text.replace(&self.0, "***")
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints_and_compares_exactly() {
        let s = Secret::new("sk-abc");
        assert_eq!(format!("{s} {s:?}"), "*** Secret(***)");
        assert!(s.matches("sk-abc"));
        assert!(!s.matches("sk-abd"));
        assert!(!s.matches("sk-ab"));
        assert!(!s.matches("sk-abcd"));
        assert!(!s.matches(""));
        assert_eq!(s.redact("key=sk-abc;"), "key=***;");
    }
}

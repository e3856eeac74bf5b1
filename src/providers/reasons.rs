//! Classification of free-text failure messages (apimall `error_message`) into the bounded
//! `reason` label (docs/providers.md §4).
//!
//! apimall has no reason enum and its wording is undocumented, so the mapping is a list of
//! regular expressions: the user's rules from the config first, then the built-in defaults;
//! the first rule that matches anywhere in the message wins, and no match means `other`.

use std::sync::LazyLock;

use regex::{Regex, RegexBuilder};

use crate::task::FailureReason;

/// Upper bound on one compiled pattern (and its lazy DFA cache): user patterns must not be
/// able to make the exporter allocate without limit.
const PATTERN_SIZE_LIMIT: usize = 1 << 20;

/// Built-in rules, most specific first: "insufficient credits" or "invalid request: insufficient
/// balance" must land in `insufficient_credits` before the loose `invalid|parameter` rule sees
/// them, and a moderation text that mentions a parameter is still moderation. The Chinese
/// words cover vendor messages passed through verbatim.
const DEFAULT_RULES: [(FailureReason, &str); 4] = [
    (
        FailureReason::InsufficientCredits,
        r"(?i)insufficient|credit|balance|余额|积分",
    ),
    (
        FailureReason::ContentModeration,
        r"(?i)moderat|nsfw|safety|policy|sensitive|content.?filter|审核|违规|敏感",
    ),
    (
        FailureReason::Timeout,
        r"(?i)time ?out|timed out|deadline|超时",
    ),
    (
        FailureReason::InvalidParameters,
        r"(?i)invalid|parameter|参数|无效",
    ),
];

static DEFAULTS: LazyLock<Vec<Rule>> = LazyLock::new(|| {
    DEFAULT_RULES
        .iter()
        .map(|&(reason, pattern)| Rule {
            reason,
            pattern: compile(pattern).expect("built-in failure reason patterns compile"),
        })
        .collect()
});

#[derive(Debug, Clone)]
struct Rule {
    reason: FailureReason,
    pattern: Regex,
}

/// An ordered list of (reason, pattern) rules; see the module documentation.
#[derive(Debug, Clone)]
pub struct FailureRules {
    rules: Vec<Rule>,
}

/// A user rule from the config that cannot be used. `index` is the rule's position in the
/// provider's `failure_reasons` list, counted from 0.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum RuleError {
    #[error(
        "failure_reasons[{index}]: unknown reason {reason:?}, expected one of {}",
        reason_labels()
    )]
    UnknownReason { index: usize, reason: String },
    #[error("failure_reasons[{index}]: pattern {pattern:?} is not a usable regular expression")]
    BadPattern {
        index: usize,
        pattern: String,
        #[source]
        source: regex::Error,
    },
}

fn reason_labels() -> String {
    FailureReason::ALL.map(FailureReason::as_str).join(", ")
}

fn compile(pattern: &str) -> Result<Regex, regex::Error> {
    RegexBuilder::new(pattern)
        .size_limit(PATTERN_SIZE_LIMIT)
        .dfa_size_limit(PATTERN_SIZE_LIMIT)
        .build()
}

impl FailureRules {
    /// The built-in rules only.
    pub fn defaults() -> Self {
        FailureRules {
            rules: DEFAULTS.clone(),
        }
    }

    /// `user_rules` are `(reason label, pattern)` pairs from the config, tried in order before
    /// the built-in rules. Any label of the `reason` label set is accepted.
    pub(crate) fn new(user_rules: &[(String, String)]) -> Result<Self, RuleError> {
        let mut rules = Vec::with_capacity(user_rules.len() + DEFAULT_RULES.len());
        for (index, (reason, pattern)) in user_rules.iter().enumerate() {
            let reason =
                FailureReason::parse(reason.trim()).ok_or_else(|| RuleError::UnknownReason {
                    index,
                    reason: reason.clone(),
                })?;
            let pattern = compile(pattern).map_err(|source| RuleError::BadPattern {
                index,
                pattern: pattern.clone(),
                source,
            })?;
            rules.push(Rule { reason, pattern });
        }
        rules.extend(DEFAULTS.iter().cloned());
        Ok(FailureRules { rules })
    }

    /// No message (or a blank one) is `unspecified`: the provider gave no reason. A message no
    /// rule recognizes is `other`.
    pub(crate) fn classify(&self, message: Option<&str>) -> FailureReason {
        let Some(message) = message.map(str::trim).filter(|m| !m.is_empty()) else {
            return FailureReason::Unspecified;
        };
        self.rules
            .iter()
            .find(|rule| rule.pattern.is_match(message))
            .map_or(FailureReason::Other, |rule| rule.reason)
    }
}

impl Default for FailureRules {
    fn default() -> Self {
        FailureRules::defaults()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use FailureReason::*;

    fn classify(message: &str) -> FailureReason {
        FailureRules::defaults().classify(Some(message))
    }

    fn rules(pairs: &[(&str, &str)]) -> Result<FailureRules, RuleError> {
        let owned: Vec<(String, String)> = pairs
            .iter()
            .map(|(r, p)| (r.to_string(), p.to_string()))
            .collect();
        FailureRules::new(&owned)
    }

    #[test]
    fn no_message_is_unspecified() {
        let rules = FailureRules::defaults();
        assert_eq!(rules.classify(None), Unspecified);
        assert_eq!(rules.classify(Some("")), Unspecified);
        assert_eq!(rules.classify(Some("  \n")), Unspecified);
    }

    #[test]
    fn moderation_wording() {
        for m in [
            "Content moderation failed",
            "NSFW content detected",
            "Blocked by safety system",
            "Prompt violates our usage policy",
            "Sensitive content",
            "内容审核未通过",
        ] {
            assert_eq!(classify(m), ContentModeration, "{m}");
        }
    }

    #[test]
    fn invalid_parameter_wording() {
        for m in [
            "Invalid aspect ratio",
            "parameter 'duration' out of range",
            "参数错误",
        ] {
            assert_eq!(classify(m), InvalidParameters, "{m}");
        }
    }

    #[test]
    fn insufficient_credit_wording() {
        for m in [
            "Insufficient credits",
            "Not enough credit",
            "Account balance too low",
            "余额不足",
        ] {
            assert_eq!(classify(m), InsufficientCredits, "{m}");
        }
    }

    #[test]
    fn timeout_wording() {
        for m in [
            "Generation timeout",
            "upstream time out",
            "Request timed out",
            "deadline exceeded",
            "生成超时",
        ] {
            assert_eq!(classify(m), Timeout, "{m}");
        }
    }

    #[test]
    fn insufficient_credits_is_not_swallowed_by_looser_rules() {
        assert_eq!(
            classify("Invalid request: insufficient credits"),
            InsufficientCredits
        );
        assert_eq!(
            classify("Invalid request: account balance too low"),
            InsufficientCredits
        );
        assert_eq!(
            classify("Invalid prompt: blocked by safety policy"),
            ContentModeration
        );
    }

    #[test]
    fn unmatched_message_is_other() {
        assert_eq!(classify("Internal server error"), Other);
        assert_eq!(classify("未知错误"), Other);
    }

    #[test]
    fn user_rules_come_before_defaults() {
        let rules = rules(&[
            ("timeout", "(?i)insufficient credits after retry"),
            ("other", "^Invalid$"),
            ("content_moderation", "(?i)face detected"),
        ])
        .unwrap();
        assert_eq!(
            rules.classify(Some("Insufficient credits after retry")),
            Timeout
        );
        assert_eq!(rules.classify(Some("Invalid")), Other);
        assert_eq!(rules.classify(Some("Invalid size")), InvalidParameters);
        assert_eq!(
            rules.classify(Some("Real face detected")),
            ContentModeration
        );
        assert_eq!(
            rules.classify(Some("Insufficient credits")),
            InsufficientCredits
        );
        assert_eq!(rules.classify(None), Unspecified);
    }

    #[test]
    fn first_matching_user_rule_wins() {
        let rules = rules(&[("invalid_parameters", "x"), ("timeout", "x")]).unwrap();
        assert_eq!(rules.classify(Some("x")), InvalidParameters);
    }

    #[test]
    fn no_user_rules_equals_defaults() {
        let rules = FailureRules::new(&[]).unwrap();
        assert_eq!(rules.classify(Some("NSFW")), ContentModeration);
        assert_eq!(rules.rules.len(), DEFAULT_RULES.len());
    }

    #[test]
    fn bad_regex_names_its_rule() {
        let err = rules(&[("timeout", "ok"), ("timeout", "(unclosed")]).unwrap_err();
        assert!(
            matches!(&err, RuleError::BadPattern { index: 1, pattern, .. } if pattern == "(unclosed"),
            "{err:?}"
        );
        assert!(err.to_string().starts_with("failure_reasons[1]: "), "{err}");
        assert!(std::error::Error::source(&err).is_some());
    }

    #[test]
    fn oversized_regex_is_rejected() {
        let err = rules(&[("timeout", r"\w{1000}{1000}")]).unwrap_err();
        assert!(
            matches!(err, RuleError::BadPattern { index: 0, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn unknown_reason_names_its_rule() {
        let err = rules(&[("timeout", "a"), ("nsfw", "b")]).unwrap_err();
        assert_eq!(
            err,
            RuleError::UnknownReason {
                index: 1,
                reason: "nsfw".into()
            }
        );
        let text = err.to_string();
        assert!(text.contains("failure_reasons[1]"), "{text}");
        assert!(text.contains("content_moderation"), "{text}");
    }

    #[test]
    fn every_reason_label_is_accepted() {
        for reason in FailureReason::ALL {
            let rules = rules(&[(reason.as_str(), "^zzz$")]).unwrap();
            assert_eq!(rules.classify(Some("zzz")), reason);
        }
    }
}

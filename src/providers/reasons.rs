//! Classification of free-text failure messages into the bounded `reason` label.
//! (Placeholder: replaced by the rule engine in the adapters change.)

use crate::task::FailureReason;

#[derive(Debug, Clone, Default)]
pub struct FailureRules {}

impl FailureRules {
    pub fn defaults() -> Self {
        FailureRules {}
    }

    pub fn new(_user_rules: &[(String, String)]) -> Result<Self, RuleError> {
        Ok(FailureRules {})
    }

    pub fn classify(&self, message: Option<&str>) -> FailureReason {
        match message {
            None => FailureReason::Unspecified,
            Some(_) => FailureReason::Other,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid rule")]
pub struct RuleError;

//! apimall.ai adapter (placeholder: replaced in the adapters change).

use super::{Balance, FailureClass, FailureRules, HistoryKind, HistoryPage, UpstreamFailure};
use crate::task::Observation;

pub const BALANCE_PATH: &str = "/api/v1/account/balances";

#[derive(Debug, Clone)]
pub struct Apimall {
    rules: FailureRules,
}

fn todo_failure() -> UpstreamFailure {
    UpstreamFailure {
        class: FailureClass::InvalidResponse,
        api_error: Some("invalid_response"),
        message: "not implemented".into(),
    }
}

impl Apimall {
    pub fn new(rules: FailureRules) -> Self {
        Apimall { rules }
    }

    pub fn task_path(&self, task_id: &str) -> String {
        let _ = &self.rules;
        format!("/api/v1/images/{task_id}")
    }

    pub fn parse_task(
        &self,
        _http_status: u16,
        _body: &[u8],
    ) -> Result<Observation, UpstreamFailure> {
        Err(todo_failure())
    }

    pub fn parse_webhook(&self, body: &[u8]) -> Result<Observation, UpstreamFailure> {
        self.parse_task(200, body)
    }

    pub fn history_path(&self, kind: HistoryKind, page: u32, limit: u32) -> String {
        format!(
            "/api/v1/{}/history?page={page}&limit={limit}",
            kind.as_str()
        )
    }

    pub fn parse_history(
        &self,
        _http_status: u16,
        _body: &[u8],
        _limit: u32,
    ) -> Result<HistoryPage, UpstreamFailure> {
        Err(todo_failure())
    }

    pub fn parse_balance(
        &self,
        _http_status: u16,
        _body: &[u8],
    ) -> Result<Balance, UpstreamFailure> {
        Err(todo_failure())
    }
}

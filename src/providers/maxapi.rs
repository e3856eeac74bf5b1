//! maxapi.io adapter (placeholder: replaced in the adapters change).

use super::{FailureClass, UpstreamFailure};
use crate::task::Observation;

#[derive(Debug, Clone, Default)]
pub struct Maxapi {}

impl Maxapi {
    pub fn new() -> Self {
        Maxapi {}
    }

    pub fn task_path(&self, task_id: &str) -> String {
        format!("/api/v1/task/{task_id}")
    }

    pub fn parse_task(
        &self,
        _http_status: u16,
        _body: &[u8],
    ) -> Result<Observation, UpstreamFailure> {
        Err(UpstreamFailure {
            class: FailureClass::InvalidResponse,
            api_error: Some("invalid_response"),
            message: "not implemented".into(),
        })
    }

    pub fn parse_webhook(&self, body: &[u8]) -> Result<Observation, UpstreamFailure> {
        self.parse_task(200, body)
    }
}

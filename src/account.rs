//! The provider account: its credit balance, read every `balance.interval`.

use std::sync::Arc;
use std::time::Duration;

use crate::metrics::Metrics;
use crate::providers::Adapter;
use crate::upstream::{Endpoint, Upstream};

/// Reads the account balance every `interval` into `genai_account_credits`. A failed read
/// leaves the last value (the upstream client counts the failure).
pub(crate) async fn poll_balance(
    interval: Duration,
    provider: String,
    upstream: Arc<Upstream>,
    adapter: Adapter,
    metrics: Arc<Metrics>,
) {
    let Some(path) = adapter.balance_path() else {
        return;
    };
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let answer = upstream
            .call(Endpoint::Balance, path, |status, body| {
                adapter.parse_balance(status, body)
            })
            .await;
        if let Ok(balance) = answer {
            metrics
                .account_credits
                .with_label_values(&[&provider, "credits"])
                .set(balance.credits);
            metrics
                .account_credits
                .with_label_values(&[&provider, "api_credits"])
                .set(balance.api_credits);
        }
    }
}

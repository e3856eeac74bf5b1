//! The exporter's [`ProxyObserver`]: what the application's traffic teaches the registry and
//! the metrics.
//!
//! Every callback runs on a spawned task after the application has its answer, takes the
//! registry's and the metrics' locks briefly and never awaits, so nothing here can delay or
//! change a proxied answer. Whatever goes wrong here (an answer the adapter cannot read, a
//! provider removed by a reload in the meantime, an id another shard owns) is dropped
//! quietly: the exporter's own polls still cover the task.

use std::sync::Arc;
use std::time::Duration;

use super::{
    ProxyCode, ProxyEndpoint, ProxyObserver, Refusal, RejectReason, Submission, TaskAnswer,
};
use crate::clock::Clock;
use crate::forward::Forwarder;
use crate::metrics::Metrics;
use crate::providers::Adapter;
use crate::registry::{ProviderTasks, Registry, TrackOutcome};
use crate::task::Observation;

/// Observes one provider's proxied traffic.
pub(crate) struct Traffic {
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    adapter: Adapter,
    clock: Clock,
    /// Hands ids to the replicas that must track them (`sharding.peer_url_template`).
    forwarder: Option<Arc<Forwarder>>,
}

impl Traffic {
    pub(crate) fn new(
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        adapter: Adapter,
        clock: Clock,
    ) -> Self {
        Traffic {
            registry,
            metrics,
            adapter,
            clock,
            forwarder: None,
        }
    }

    /// Ids this replica does not own go to their owner shard, and new ones it owns to its
    /// HA copies.
    pub(crate) fn with_forwarder(mut self, forwarder: Option<Arc<Forwarder>>) -> Self {
        self.forwarder = forwarder;
        self
    }

    /// Tracks an id the application's traffic named (`source="proxy"`). False when it is
    /// not tracked here: remembered as finished, owned by another shard, or not plausible.
    fn track(&self, provider: &str, tasks: &ProviderTasks, task_id: &str, now: i64) -> bool {
        let outcome = tasks.track_from_proxy(task_id, now);
        if let Some(forwarder) = &self.forwarder
            && matches!(outcome, TrackOutcome::New | TrackOutcome::NotOwned)
        {
            forwarder.forward_to_owner(provider, task_id);
        }
        match outcome {
            TrackOutcome::New | TrackOutcome::Known => true,
            TrackOutcome::Remembered | TrackOutcome::NotOwned | TrackOutcome::Invalid => false,
        }
    }

    /// Applies an answer the application received; a terminal outcome counted by it is
    /// timed from the task's completion (`via="proxy"`).
    fn apply(&self, provider: &str, tasks: &ProviderTasks, obs: &Observation, now: i64) {
        if tasks.record_application_poll(obs, now) != Some(true) {
            return;
        }
        if let Some(completed) = obs.completed_at.or(obs.updated_at)
            && now >= completed
        {
            let seconds = (now - completed) as f64 / 1000.0;
            self.metrics
                .observe_detection_delay(provider, "proxy", seconds);
        }
    }
}

impl ProxyObserver for Traffic {
    fn request_finished(
        &self,
        provider: &str,
        endpoint: ProxyEndpoint,
        code: ProxyCode,
        duration: Duration,
    ) {
        self.metrics.record_proxy_request(
            provider,
            endpoint.as_str(),
            &code.label(),
            duration.as_secs_f64(),
        );
    }

    /// Refusals are the proxy's own answers (400, 413): counted apart from the upstream's
    /// rejections by their own reasons, never as proxied requests.
    fn request_refused(&self, provider: &str, refusal: Refusal) {
        self.metrics
            .count_proxy_rejection(provider, refusal.as_str());
    }

    fn task_submitted(&self, provider: &str, submission: Submission) {
        if let Some(tasks) = self.registry.provider(provider) {
            self.track(
                provider,
                &tasks,
                &submission.task_id,
                self.clock.now_millis(),
            );
        }
    }

    fn submit_rejected(&self, provider: &str, reason: RejectReason) {
        self.metrics
            .count_proxy_rejection(provider, reason.as_str());
    }

    fn task_answer(&self, provider: &str, answer: TaskAnswer) {
        // Error answers (not found, throttled, the application's key refused) say nothing
        // about the task that our own polls would not learn better.
        let Ok(mut obs) = self.adapter.parse_task(answer.status, &answer.body) else {
            return;
        };
        // Trust the id the application asked for, not the one in the body.
        obs.task_id = answer.task_id;
        let Some(tasks) = self.registry.provider(provider) else {
            return;
        };
        let now = self.clock.now_millis();
        // A task submitted before the proxy was in the path is found by its first answer.
        if self.track(provider, &tasks, &obs.task_id, now) {
            self.apply(provider, &tasks, &obs, now);
        }
    }
}

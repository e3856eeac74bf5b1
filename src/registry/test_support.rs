//! Fixtures shared by the registry's unit tests.

use std::time::Duration;

use super::{Event, ProviderTasks};
use crate::config::{Polling, Shard};
use crate::task::{Observation, Status};

pub(super) fn polling() -> Polling {
    Polling {
        interval: Duration::from_secs(10),
        max_interval: Duration::from_secs(60),
        retention: Duration::from_secs(100),
        forget_after: Duration::from_secs(300),
        max_task_age: Duration::from_secs(1000),
        ..Polling::default()
    }
}

pub(super) fn tasks() -> ProviderTasks {
    ProviderTasks::new("p", &polling(), 3, Shard::default())
}

pub(super) fn obs(id: &str, status: Status) -> Observation {
    let mut o = Observation::new(id, status, "x");
    o.model = Some("m".into());
    o.created_at = Some(0);
    o.updated_at = Some(4_000);
    o
}

pub(super) fn completed(events: &[Event]) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, Event::Completed { .. }))
        .count()
}

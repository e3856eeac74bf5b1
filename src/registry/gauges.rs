//! Scrape-time gauges (`genai_tasks`, oldest in flight), kept as counts moved on every
//! transition so that a scrape costs O(models x statuses), not O(tasks).

use std::collections::BTreeMap;
use std::sync::Arc;

use super::table::{IN_FLIGHT, Inner, Task};
use crate::task::{Status, UnixMillis};

/// Gauge values of one provider, read at scrape time.
#[derive(Debug, Clone, Default)]
pub(crate) struct GaugeSnapshot {
    /// (model, status, count), only non-zero counts.
    pub(crate) tasks: Vec<(Arc<str>, Status, u64)>,
    /// Creation time of the oldest pending/running task.
    pub(crate) oldest_in_flight_ms: Option<UnixMillis>,
    pub(crate) tracked: u64,
}

impl Inner {
    /// Moves a task's gauge contribution to (`model`, `status`). `old_key` is where the task
    /// sits in `in_flight` when that differs from its current key (its creation time has
    /// just been learnt).
    pub(super) fn set_state(
        &mut self,
        slot: u32,
        model: u16,
        status: Status,
        old_key: Option<i64>,
    ) {
        let change = self.set_counted_state(slot, model, status);
        if change.was_in_flight {
            decrement(&mut self.in_flight, old_key.unwrap_or(change.key));
        }
        if change.in_flight {
            *self.in_flight.entry(change.key).or_insert(0) += 1;
        }
    }

    /// [`set_state`](Self::set_state) but for the `in_flight` map, which the caller updates
    /// (a restore collects the keys and builds the map once).
    pub(super) fn set_counted_state(
        &mut self,
        slot: u32,
        model: u16,
        status: Status,
    ) -> InFlightChange {
        let (old_model, old_status, was_in_flight, key) = {
            let t = self.task(slot);
            (t.model, t.status, t.has(IN_FLIGHT), t.in_flight_key())
        };
        self.counts[old_model as usize][old_status.index()] -= 1;
        while self.counts.len() <= model as usize {
            self.counts.push([0; 7]);
        }
        self.counts[model as usize][status.index()] += 1;
        let in_flight = status.is_in_flight();
        let t = self.task_mut(slot);
        t.model = model;
        t.status = status;
        t.set(IN_FLIGHT, in_flight);
        InFlightChange {
            was_in_flight,
            in_flight,
            key,
        }
    }

    /// Takes a task just removed from its slot out of the gauges.
    pub(super) fn forget_state(&mut self, task: &Task) {
        self.counts[task.model as usize][task.status.index()] -= 1;
        if task.has(IN_FLIGHT) {
            decrement(&mut self.in_flight, task.in_flight_key());
        }
    }

    pub(super) fn gauges(&self) -> GaugeSnapshot {
        let mut tasks = Vec::new();
        for (model, per_status) in self.counts.iter().enumerate() {
            for (s, &n) in per_status.iter().enumerate() {
                if n > 0 {
                    let status = Status::from_index(s).expect("status index");
                    tasks.push((self.models.name(model as u16).clone(), status, n));
                }
            }
        }
        GaugeSnapshot {
            tasks,
            oldest_in_flight_ms: self.in_flight.keys().next().copied(),
            tracked: self.index.len() as u64,
        }
    }
}

/// What a status change means for the `in_flight` map.
pub(super) struct InFlightChange {
    pub(super) was_in_flight: bool,
    pub(super) in_flight: bool,
    /// The task's key in the map ([`Task::in_flight_key`](super::table::Task::in_flight_key)).
    pub(super) key: i64,
}

fn decrement(map: &mut BTreeMap<i64, u32>, key: i64) {
    if let Some(n) = map.get_mut(&key) {
        *n -= 1;
        if *n == 0 {
            map.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::registry::Source;
    use crate::registry::test_support::{obs, tasks};
    use crate::task::Status;

    #[test]
    fn models_are_bounded() {
        let p = tasks();
        for (i, model) in ["a", "b", "c", "d", "e"].iter().enumerate() {
            let id = format!("t{i}");
            p.track(&id, Source::Api, 0);
            let mut o = obs(&id, Status::Running);
            o.model = Some(model.to_string());
            p.observe(&o, 1);
        }
        let mut models: Vec<(String, u64)> = p
            .gauges()
            .tasks
            .iter()
            .map(|(m, _, n)| (m.to_string(), *n))
            .collect();
        models.sort();
        let expected = [("a", 1), ("b", 1), ("c", 1), ("other", 2)];
        assert_eq!(models, expected.map(|(m, n)| (m.to_string(), n)));
    }
}

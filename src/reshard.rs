//! `reshard`: moves task records and tombstones between the stores of stopped shards after
//! the shard count changed, so that each task's history (and whether it was counted) lives
//! in the store of the shard that owns it under the new count.
//!
//! Counter totals stay where they are: they are what each shard has counted so far, and the
//! sum over shards (which dashboards and alerts show) is unchanged.

use std::path::PathBuf;

use crate::shard::shard_of;
use crate::store::{self, Batch, Store, StoreError};

/// What `reshard` moved.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReshardReport {
    pub tasks_moved: usize,
    pub tombstones_moved: usize,
    pub tasks_kept: usize,
}

/// Redistributes the stores in `dirs` (shard `i` at `dirs[i]`, `dirs.len() == count`;
/// directories of new shards may be empty or missing). Every shard must be stopped.
///
/// Records are written to their new store before they are deleted from the old one: after
/// a crash half-way a record may exist twice, and running `reshard` again finishes the job.
pub fn reshard(dirs: &[PathBuf], count: u32) -> Result<ReshardReport, StoreError> {
    assert_eq!(dirs.len(), count as usize, "one directory per shard");
    let stores: Vec<Store> = dirs
        .iter()
        .map(|d| Store::open(d))
        .collect::<Result<_, _>>()?;
    let mut incoming: Vec<Batch> = vec![Batch::default(); stores.len()];
    let mut outgoing: Vec<Batch> = vec![Batch::default(); stores.len()];
    let mut report = ReshardReport::default();
    for (index, store) in stores.iter().enumerate() {
        let snapshot = store.load()?;
        for (key, record) in snapshot.tasks {
            let Some(owner) = owner_of(&key, count) else {
                continue;
            };
            if owner == index {
                report.tasks_kept += 1;
                continue;
            }
            outgoing[index].delete_tasks.push(key.clone());
            incoming[owner].put_tasks.push((key, record));
            report.tasks_moved += 1;
        }
        for (key, last_seen) in snapshot.tombstones {
            let Some(owner) = owner_of(&key, count) else {
                continue;
            };
            if owner != index {
                outgoing[index].delete_tombstones.push(key.clone());
                incoming[owner].put_tombstones.push((key, last_seen));
                report.tombstones_moved += 1;
            }
        }
    }
    for (store, batch) in stores.iter().zip(&incoming) {
        store.commit(batch)?;
    }
    for (store, batch) in stores.iter().zip(&outgoing) {
        store.commit(batch)?;
    }
    Ok(report)
}

fn owner_of(key: &str, count: u32) -> Option<usize> {
    let (provider, id) = store::split_task_key(key)?;
    Some(shard_of(provider, id, count) as usize)
}

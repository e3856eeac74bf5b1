//! The embedded store: tracked tasks, tombstones of finished ones, and counter totals.
//!
//! redb (pure Rust, copy-on-write B-trees, ACID): a commit is atomic and durable when it
//! returns, and a `kill -9` at any moment leaves the last committed state. No C library to
//! build, one file on disk. The registry hands over batches ([`Batch`]); task state and the
//! counter totals it moved are committed in one transaction, which is what makes counting
//! exactly-once across restarts.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

/// Tracked tasks: `provider \0 task id` -> encoded task record (see `registry`).
const TASKS: TableDefinition<&str, &[u8]> = TableDefinition::new("tasks");
/// Ids that must not be tracked (and counted) again: `provider \0 task id` -> last mention, ms.
const TOMBSTONES: TableDefinition<&str, i64> = TableDefinition::new("tombstones");
/// Counter and histogram totals: series key -> encoded value (see `metrics`).
const COUNTERS: TableDefinition<&str, &[u8]> = TableDefinition::new("counters");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

const SCHEMA_VERSION: u64 = 1;
/// redb's own page cache (its default is 1 GiB). The operating system caches the file
/// anyway; redb's copy only needs the upper tree levels and the pages a commit touches.
/// Larger values buy nothing measurable here and cost resident memory: with the default,
/// a million tasks (a 500 MB file) cost 500 MB more RSS. See BENCHMARKS.md.
const CACHE_BYTES: usize = 32 * 1024 * 1024;
const DB_FILE: &str = "state.redb";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state directory {path}: {source}")]
    Directory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state store {path}: {message}")]
    Database { path: PathBuf, message: String },
    #[error(
        "state store {path}: schema version {found} is newer than this build knows ({SCHEMA_VERSION})"
    )]
    Schema { path: PathBuf, found: u64 },
}

/// Everything a batch changes, written in one transaction.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    pub put_tasks: Vec<(String, Vec<u8>)>,
    pub delete_tasks: Vec<String>,
    pub put_tombstones: Vec<(String, i64)>,
    pub delete_tombstones: Vec<String>,
    pub put_counters: Vec<(String, Vec<u8>)>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.put_tasks.is_empty()
            && self.delete_tasks.is_empty()
            && self.put_tombstones.is_empty()
            && self.delete_tombstones.is_empty()
            && self.put_counters.is_empty()
    }

    pub fn len(&self) -> usize {
        self.put_tasks.len()
            + self.delete_tasks.len()
            + self.put_tombstones.len()
            + self.delete_tombstones.len()
            + self.put_counters.len()
    }
}

/// The whole store, read at start-up.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub tasks: Vec<(String, Vec<u8>)>,
    pub tombstones: Vec<(String, i64)>,
    pub counters: Vec<(String, Vec<u8>)>,
}

/// Key of a task or tombstone: provider and id, joined by NUL (neither may contain one).
pub fn task_key(provider: &str, task_id: &str) -> String {
    let mut key = String::with_capacity(provider.len() + 1 + task_id.len());
    key.push_str(provider);
    key.push('\0');
    key.push_str(task_id);
    key
}

/// Bounds of the keys of `provider`'s rows: `provider \0 ...` up to `provider \1`.
fn provider_range(provider: &str) -> (String, String) {
    (format!("{provider}\0"), format!("{provider}\u{1}"))
}

/// Splits a key made by [`task_key`].
pub fn split_task_key(key: &str) -> Option<(&str, &str)> {
    key.split_once('\0')
}

pub struct Store {
    db: Database,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens (or creates) the store in directory `dir`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Directory {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join(DB_FILE);
        let err = |e: &dyn std::fmt::Display| StoreError::Database {
            path: path.clone(),
            message: e.to_string(),
        };
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|e| err(&e))?;
        let store = Store { db, path };
        store.init_schema()?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Database {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    fn init_schema(&self) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
            let found = meta
                .get("schema_version")
                .map_err(|e| self.err(e))?
                .map(|v| v.value());
            match found {
                Some(v) if v > SCHEMA_VERSION => {
                    return Err(StoreError::Schema {
                        path: self.path.clone(),
                        found: v,
                    });
                }
                Some(_) => {}
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION)
                        .map_err(|e| self.err(e))?;
                }
            }
            // Create the other tables so that reads of a fresh store find them.
            txn.open_table(TASKS).map_err(|e| self.err(e))?;
            txn.open_table(TOMBSTONES).map_err(|e| self.err(e))?;
            txn.open_table(COUNTERS).map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// Reads everything (start-up).
    pub fn load(&self) -> Result<Snapshot, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let mut snapshot = Snapshot::default();
        let tasks = txn.open_table(TASKS).map_err(|e| self.err(e))?;
        snapshot
            .tasks
            .reserve(tasks.len().map_err(|e| self.err(e))? as usize);
        for row in tasks.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            snapshot
                .tasks
                .push((k.value().to_string(), v.value().to_vec()));
        }
        let tombstones = txn.open_table(TOMBSTONES).map_err(|e| self.err(e))?;
        for row in tombstones.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            snapshot.tombstones.push((k.value().to_string(), v.value()));
        }
        let counters = txn.open_table(COUNTERS).map_err(|e| self.err(e))?;
        for row in counters.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            snapshot
                .counters
                .push((k.value().to_string(), v.value().to_vec()));
        }
        Ok(snapshot)
    }

    /// Reads the counter totals (start-up; tasks and tombstones are streamed with
    /// [`for_each_task`](Self::for_each_task) and [`for_each_tombstone`](Self::for_each_tombstone)).
    pub fn load_counters(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let counters = txn.open_table(COUNTERS).map_err(|e| self.err(e))?;
        let mut rows = Vec::new();
        for row in counters.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            rows.push((k.value().to_string(), v.value().to_vec()));
        }
        Ok(rows)
    }

    /// Calls `f(key, record)` for every task row of `provider`, in key order, without
    /// copying the rows (a million of them load in well under a second this way).
    pub fn for_each_task(
        &self,
        provider: &str,
        mut f: impl FnMut(&str, &[u8]),
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let tasks = txn.open_table(TASKS).map_err(|e| self.err(e))?;
        let (start, end) = provider_range(provider);
        for row in tasks
            .range(start.as_str()..end.as_str())
            .map_err(|e| self.err(e))?
        {
            let (k, v) = row.map_err(|e| self.err(e))?;
            f(k.value(), v.value());
        }
        Ok(())
    }

    /// Number of stored tasks, of every provider.
    pub fn task_count(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let tasks = txn.open_table(TASKS).map_err(|e| self.err(e))?;
        tasks.len().map_err(|e| self.err(e))
    }

    /// Calls `f(key)` for the key of every task and tombstone, of every provider.
    pub fn for_each_key(&self, mut f: impl FnMut(&str)) -> Result<(), StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let tasks = txn.open_table(TASKS).map_err(|e| self.err(e))?;
        for row in tasks.iter().map_err(|e| self.err(e))? {
            f(row.map_err(|e| self.err(e))?.0.value());
        }
        let tombstones = txn.open_table(TOMBSTONES).map_err(|e| self.err(e))?;
        for row in tombstones.iter().map_err(|e| self.err(e))? {
            f(row.map_err(|e| self.err(e))?.0.value());
        }
        Ok(())
    }

    /// Calls `f(key, last_seen)` for every tombstone of `provider`.
    pub fn for_each_tombstone(
        &self,
        provider: &str,
        mut f: impl FnMut(&str, i64),
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let tombstones = txn.open_table(TOMBSTONES).map_err(|e| self.err(e))?;
        let (start, end) = provider_range(provider);
        for row in tombstones
            .range(start.as_str()..end.as_str())
            .map_err(|e| self.err(e))?
        {
            let (k, v) = row.map_err(|e| self.err(e))?;
            f(k.value(), v.value());
        }
        Ok(())
    }

    /// Reads the tasks and tombstones of one provider (a provider added by reload).
    pub fn load_provider(&self, provider: &str) -> Result<Snapshot, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let (start, end) = provider_range(provider);
        let mut snapshot = Snapshot::default();
        let tasks = txn.open_table(TASKS).map_err(|e| self.err(e))?;
        for row in tasks
            .range(start.as_str()..end.as_str())
            .map_err(|e| self.err(e))?
        {
            let (k, v) = row.map_err(|e| self.err(e))?;
            snapshot
                .tasks
                .push((k.value().to_string(), v.value().to_vec()));
        }
        let tombstones = txn.open_table(TOMBSTONES).map_err(|e| self.err(e))?;
        for row in tombstones
            .range(start.as_str()..end.as_str())
            .map_err(|e| self.err(e))?
        {
            let (k, v) = row.map_err(|e| self.err(e))?;
            snapshot.tombstones.push((k.value().to_string(), v.value()));
        }
        Ok(snapshot)
    }

    /// Deletes tombstones last mentioned before `cutoff` (ms); returns how many.
    pub fn expire_tombstones(&self, cutoff: i64) -> Result<usize, StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        let expired = {
            let mut table = txn.open_table(TOMBSTONES).map_err(|e| self.err(e))?;
            let before = table.len().map_err(|e| self.err(e))?;
            table
                .retain(|_, last| last >= cutoff)
                .map_err(|e| self.err(e))?;
            before - table.len().map_err(|e| self.err(e))?
        };
        txn.commit().map_err(|e| self.err(e))?;
        Ok(expired as usize)
    }

    /// Writes a batch atomically and durably.
    pub fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut tasks = txn.open_table(TASKS).map_err(|e| self.err(e))?;
            for (k, v) in &batch.put_tasks {
                tasks
                    .insert(k.as_str(), v.as_slice())
                    .map_err(|e| self.err(e))?;
            }
            for k in &batch.delete_tasks {
                tasks.remove(k.as_str()).map_err(|e| self.err(e))?;
            }
            let mut tombstones = txn.open_table(TOMBSTONES).map_err(|e| self.err(e))?;
            for (k, v) in &batch.put_tombstones {
                tombstones.insert(k.as_str(), *v).map_err(|e| self.err(e))?;
            }
            for k in &batch.delete_tombstones {
                tombstones.remove(k.as_str()).map_err(|e| self.err(e))?;
            }
            let mut counters = txn.open_table(COUNTERS).map_err(|e| self.err(e))?;
            for (k, v) in &batch.put_counters {
                counters
                    .insert(k.as_str(), v.as_slice())
                    .map_err(|e| self.err(e))?;
            }
        }
        txn.commit().map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let batch = Batch {
                put_tasks: vec![
                    (task_key("mx", "a"), vec![1, 2]),
                    (task_key("mx", "b"), vec![3]),
                ],
                put_tombstones: vec![(task_key("mx", "z"), 42)],
                put_counters: vec![("c".into(), vec![9])],
                ..Batch::default()
            };
            store.commit(&batch).unwrap();
            store
                .commit(&Batch {
                    delete_tasks: vec![task_key("mx", "b")],
                    ..Batch::default()
                })
                .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let snap = store.load().unwrap();
        assert_eq!(snap.tasks, vec![(task_key("mx", "a"), vec![1, 2])]);
        assert_eq!(snap.tombstones, vec![(task_key("mx", "z"), 42)]);
        assert_eq!(snap.counters, vec![("c".to_string(), vec![9])]);
        assert_eq!(split_task_key(&snap.tasks[0].0), Some(("mx", "a")));
        let mut streamed = Vec::new();
        store
            .for_each_task("mx", |k, v| streamed.push((k.to_string(), v.to_vec())))
            .unwrap();
        assert_eq!(streamed, snap.tasks);
        let mut stones = Vec::new();
        store
            .for_each_tombstone("mx", |k, v| stones.push((k.to_string(), v)))
            .unwrap();
        assert_eq!(stones, snap.tombstones);
        store.for_each_task("m", |_, _| panic!("prefix")).unwrap();
        assert_eq!(store.load_counters().unwrap(), snap.counters);
        let other = store.load_provider("m").unwrap();
        assert!(other.tasks.is_empty(), "prefix of another provider's name");
        assert_eq!(store.load_provider("mx").unwrap().tasks.len(), 1);
        assert_eq!(store.expire_tombstones(41).unwrap(), 0);
        assert_eq!(store.expire_tombstones(43).unwrap(), 1);
        assert!(store.load().unwrap().tombstones.is_empty());
    }
}

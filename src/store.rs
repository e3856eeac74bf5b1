//! The embedded store: tracked tasks, tombstones of finished ones, counter totals, and the
//! completion times learnt per model.
//!
//! redb (pure Rust, copy-on-write B-trees, ACID): a commit is atomic and durable when it
//! returns, and a `kill -9` at any moment leaves the last committed state. No C library to
//! build, one file on disk. The registry hands over batches ([`Batch`]); task state and the
//! counter totals it moved are committed in one transaction, which is what makes counting
//! exactly-once across restarts.
//!
//! Faults: after any I/O error redb refuses every later operation until the database is
//! closed and opened again ([`Store::reopen`]); a file deleted under the running process is
//! noticed by its device and inode ([`Store::is_replaced`]) and written anew from the still
//! open one ([`Store::recreate`]). Every row carries a CRC-32 of its key and value: a flipped
//! byte is refused with an error naming the row, and a panic inside redb on a corrupt file
//! becomes an error too.

use std::os::unix::fs::MetadataExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

/// Tracked tasks: `provider \0 task id` -> encoded task record (see `registry`) + CRC.
const TASKS: TableDefinition<&str, &[u8]> = TableDefinition::new("tasks");
/// Ids that must not be tracked (and counted) again: `provider \0 task id` -> last mention,
/// ms (i64, little-endian) + CRC.
const TOMBSTONES: TableDefinition<&str, &[u8]> = TableDefinition::new("tombstones_v2");
/// Schema 1's tombstones, without checksums (migrated on open).
const TOMBSTONES_V1: TableDefinition<&str, i64> = TableDefinition::new("tombstones");
/// Counter and histogram totals: series key -> encoded value (see `metrics`) + CRC.
const COUNTERS: TableDefinition<&str, &[u8]> = TableDefinition::new("counters");
/// Completion times learnt per model (the schedule follows them): `provider \0 model` ->
/// encoded histogram (see `registry`) + CRC. Added in schema 2 without a version change: a
/// store without it gets it, empty, when opened.
const LATENCIES: TableDefinition<&str, &[u8]> = TableDefinition::new("latencies");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// 2: every row ends with a CRC-32 of its key and value.
const SCHEMA_VERSION: u64 = 2;
/// redb's own page cache (its default is 1 GiB). The operating system caches the file
/// anyway; redb's copy only needs the upper tree levels and the pages a commit touches.
/// Larger values buy nothing measurable here and cost resident memory: with the default,
/// a million tasks (a 500 MB file) cost 500 MB more RSS. See BENCHMARKS.md.
const CACHE_BYTES: usize = 32 * 1024 * 1024;
const DB_FILE: &str = "state.redb";

/// Set by `--state.start-fresh`: an empty or unreadable store is moved aside and a new one
/// started, instead of refusing to start.
static START_FRESH: AtomicBool = AtomicBool::new(false);

/// Lets [`Store::open`] start over when the store is empty or unreadable (the old file is
/// kept next to it, renamed).
pub fn set_start_fresh(allowed: bool) {
    START_FRESH.store(allowed, Ordering::SeqCst);
}

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
    #[error(
        "state store {path} is empty (0 bytes): refusing to start with every counter at zero; \
         restore the file, or pass --state.start-fresh to start over"
    )]
    Empty { path: PathBuf },
    #[error(
        "state store {path} is corrupt: {message}; restore the file, or pass --state.start-fresh \
         to start over (the file is kept, renamed)"
    )]
    Corrupt { path: PathBuf, message: String },
}

impl StoreError {
    /// Whether starting over (with `--state.start-fresh`) is the way out.
    fn is_unreadable(&self) -> bool {
        matches!(self, StoreError::Empty { .. } | StoreError::Corrupt { .. })
    }
}

/// CRC-32 (IEEE) of `parts` in a row. `crc32fast` uses the CPU's carry-less multiply where
/// there is one: start-up checks every row, and a bytewise table made a million-task restart
/// half a second slower (`BENCHMARKS.md`).
fn crc32(parts: &[&[u8]]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    for part in parts {
        hasher.update(part);
    }
    hasher.finalize()
}

/// `value` followed by the CRC-32 of `key` and `value`.
fn seal(key: &str, value: &[u8]) -> Vec<u8> {
    let mut row = Vec::with_capacity(value.len() + 4);
    row.extend_from_slice(value);
    row.extend_from_slice(&crc32(&[key.as_bytes(), value]).to_le_bytes());
    row
}

/// The value of a row made by [`seal`], or `None` when the checksum does not match.
fn unseal<'a>(key: &str, row: &'a [u8]) -> Option<&'a [u8]> {
    let split = row.len().checked_sub(4)?;
    let (value, crc) = row.split_at(split);
    (crc32(&[key.as_bytes(), value]).to_le_bytes() == crc).then_some(value)
}

fn unseal_tombstone(key: &str, row: &[u8]) -> Option<i64> {
    let value: [u8; 8] = unseal(key, row)?.try_into().ok()?;
    Some(i64::from_le_bytes(value))
}

/// The device and inode of a file: which file is open, whatever its name now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    fn of(meta: &std::fs::Metadata) -> FileId {
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

/// Everything a batch changes, written in one transaction.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    pub put_tasks: Vec<(String, Vec<u8>)>,
    pub(crate) delete_tasks: Vec<String>,
    pub put_tombstones: Vec<(String, i64)>,
    pub(crate) delete_tombstones: Vec<String>,
    pub put_counters: Vec<(String, Vec<u8>)>,
    /// Learnt completion times, by `task_key(provider, model)`.
    pub put_latencies: Vec<(String, Vec<u8>)>,
}

impl Batch {
    pub(crate) fn is_empty(&self) -> bool {
        self.put_tasks.is_empty()
            && self.delete_tasks.is_empty()
            && self.put_tombstones.is_empty()
            && self.delete_tombstones.is_empty()
            && self.put_counters.is_empty()
            && self.put_latencies.is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        self.put_tasks.len()
            + self.delete_tasks.len()
            + self.put_tombstones.len()
            + self.delete_tombstones.len()
            + self.put_counters.len()
            + self.put_latencies.len()
    }
}

/// The whole store, read at start-up.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub(crate) tasks: Vec<(String, Vec<u8>)>,
    pub(crate) tombstones: Vec<(String, i64)>,
    pub(crate) counters: Vec<(String, Vec<u8>)>,
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
pub(crate) fn split_task_key(key: &str) -> Option<(&str, &str)> {
    key.split_once('\0')
}

pub struct Store {
    /// `None` after a failed reopen: every operation fails until the next one succeeds.
    db: RwLock<Option<Arc<Database>>>,
    dir: PathBuf,
    path: PathBuf,
    /// The file this process has open (the path may since name another file, or none).
    opened: Mutex<Option<FileId>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

/// Drops a database; redb may panic while closing a corrupt file.
fn close(db: Option<Arc<Database>>) {
    if catch_unwind(AssertUnwindSafe(move || drop(db))).is_err() {
        tracing::warn!("the state store failed while closing");
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        close(self.db.get_mut().map(Option::take).unwrap_or_default());
    }
}

impl Store {
    /// Opens (or creates) the store in directory `dir`. An empty (0-byte) or corrupt file is
    /// refused, unless [`set_start_fresh`] allowed starting over.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let store = Store {
            db: RwLock::new(None),
            dir: dir.to_path_buf(),
            path: dir.join(DB_FILE),
            opened: Mutex::new(None),
        };
        let start_fresh = START_FRESH.load(Ordering::SeqCst);
        match store.open_db(start_fresh) {
            Err(e) if e.is_unreadable() && start_fresh => {
                let kept = store.move_aside()?;
                tracing::warn!(error = %e, kept = %kept.display(), "starting over with an empty state store (--state.start-fresh)");
                store.open_db(false)?;
                Ok(store)
            }
            Err(e) => Err(e),
            Ok(()) => Ok(store),
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, e: impl Into<redb::Error>) -> StoreError {
        match e.into() {
            redb::Error::Corrupted(message) => self.corrupt(message),
            e => StoreError::Database {
                path: self.path.clone(),
                message: e.to_string(),
            },
        }
    }

    fn corrupt(&self, message: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            message: message.into(),
        }
    }

    fn bad_row(&self, table: &str, key: &str) -> StoreError {
        self.corrupt(format!(
            "row \"{}\" of table {table} fails its checksum",
            key.escape_debug()
        ))
    }

    /// Runs `f`, turning a panic inside redb (a corrupt file can cause one) into an error.
    fn guard<T>(&self, f: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
        catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(self.corrupt(format!("the database library failed reading it ({what})")))
        })
    }

    /// The open database, or an error while it is closed (after a failed reopen).
    fn db(&self) -> Result<Arc<Database>, StoreError> {
        self.db
            .read()
            .expect("store lock")
            .clone()
            .ok_or_else(|| StoreError::Database {
                path: self.path.clone(),
                message: "closed after an earlier error; reopening".into(),
            })
    }

    fn open_db(&self, verify_rows: bool) -> Result<(), StoreError> {
        std::fs::create_dir_all(&self.dir).map_err(|source| StoreError::Directory {
            path: self.dir.clone(),
            source,
        })?;
        if std::fs::metadata(&self.path).is_ok_and(|m| m.len() == 0) {
            return Err(StoreError::Empty {
                path: self.path.clone(),
            });
        }
        let db = self.guard(|| {
            let db = Database::builder()
                .set_cache_size(CACHE_BYTES)
                .create(&self.path)
                .map_err(|e| self.err(e))?;
            self.init_schema(&db)?;
            if verify_rows {
                self.verify(&db)?;
            }
            Ok(db)
        })?;
        let id = std::fs::metadata(&self.path).map_err(|source| StoreError::Directory {
            path: self.path.clone(),
            source,
        })?;
        *self.opened.lock().expect("store lock") = Some(FileId::of(&id));
        *self.db.write().expect("store lock") = Some(Arc::new(db));
        Ok(())
    }

    /// Renames the file at the path out of the way (kept for the operator); returns its name.
    fn move_aside(&self) -> Result<PathBuf, StoreError> {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let kept = self.dir.join(format!("{DB_FILE}.{stamp}.old"));
        std::fs::rename(&self.path, &kept).map_err(|source| StoreError::Directory {
            path: self.path.clone(),
            source,
        })?;
        Ok(kept)
    }

    /// Closes the database and opens it again: after an I/O error (a full disk) redb refuses
    /// everything until then. Only the data of the last commit is read back, which is all
    /// that was ever acknowledged.
    pub(crate) fn reopen(&self) -> Result<(), StoreError> {
        // Dropped first: the file is locked while open.
        let old = self.db.write().expect("store lock").take();
        close(old);
        self.open_db(false)
    }

    /// Whether the file at the path is no longer the one open (deleted or replaced).
    pub(crate) fn is_replaced(&self) -> bool {
        let Some(opened) = *self.opened.lock().expect("store lock") else {
            return false;
        };
        match std::fs::metadata(&self.path) {
            Ok(meta) => FileId::of(&meta) != opened,
            Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        }
    }

    /// Writes a new file at the path with everything the open (deleted or replaced) one
    /// holds, and continues with it. A different file found at the path is kept, renamed.
    /// Returns how many rows were copied.
    pub(crate) fn recreate(&self) -> Result<usize, StoreError> {
        let old = self.db()?;
        std::fs::create_dir_all(&self.dir).map_err(|source| StoreError::Directory {
            path: self.dir.clone(),
            source,
        })?;
        if self.path.exists() {
            let kept = self.move_aside()?;
            tracing::warn!(kept = %kept.display(), "another file had replaced the state store; kept it, renamed");
        }
        let copied = self.guard(|| {
            let new = Database::builder()
                .set_cache_size(CACHE_BYTES)
                .create(&self.path)
                .map_err(|e| self.err(e))?;
            self.init_schema(&new)?;
            let copied = self.copy_rows(&old, &new)?;
            Ok((new, copied))
        });
        let (new, copied) = match copied {
            Ok(done) => done,
            Err(e) => {
                // No half-written store at the path: the next attempt starts clean.
                let _ = std::fs::remove_file(&self.path);
                return Err(e);
            }
        };
        let id = std::fs::metadata(&self.path).map_err(|source| StoreError::Directory {
            path: self.path.clone(),
            source,
        })?;
        *self.opened.lock().expect("store lock") = Some(FileId::of(&id));
        let old_handle = self.db.write().expect("store lock").replace(Arc::new(new));
        drop(old);
        close(old_handle);
        Ok(copied)
    }

    fn copy_rows(&self, from: &Database, to: &Database) -> Result<usize, StoreError> {
        let read = from.begin_read().map_err(|e| self.err(e))?;
        let write = to.begin_write().map_err(|e| self.err(e))?;
        let mut copied = 0;
        for table in [TASKS, TOMBSTONES, COUNTERS, LATENCIES] {
            let source = read.open_table(table).map_err(|e| self.err(e))?;
            let mut target = write.open_table(table).map_err(|e| self.err(e))?;
            for row in source.iter().map_err(|e| self.err(e))? {
                let (k, v) = row.map_err(|e| self.err(e))?;
                target
                    .insert(k.value(), v.value())
                    .map_err(|e| self.err(e))?;
                copied += 1;
            }
        }
        write.commit().map_err(|e| self.err(e))?;
        Ok(copied)
    }

    /// Creates the tables of a new store, or migrates an older one (schema 1 had no
    /// checksums: every row is rewritten with one).
    fn init_schema(&self, db: &Database) -> Result<(), StoreError> {
        let txn = db.begin_write().map_err(|e| self.err(e))?;
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
                Some(SCHEMA_VERSION) => {}
                Some(_) => {
                    let rows = self.migrate_from_v1(&txn)?;
                    tracing::info!(path = %self.path.display(), rows, "state store migrated to schema {SCHEMA_VERSION} (row checksums)");
                    meta.insert("schema_version", SCHEMA_VERSION)
                        .map_err(|e| self.err(e))?;
                }
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION)
                        .map_err(|e| self.err(e))?;
                }
            }
            // Create the other tables so that reads of a fresh store find them.
            txn.open_table(TASKS).map_err(|e| self.err(e))?;
            txn.open_table(TOMBSTONES).map_err(|e| self.err(e))?;
            txn.open_table(COUNTERS).map_err(|e| self.err(e))?;
            txn.open_table(LATENCIES).map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))
    }

    fn migrate_from_v1(&self, txn: &redb::WriteTransaction) -> Result<usize, StoreError> {
        let mut rows = 0;
        for table in [TASKS, COUNTERS] {
            let mut t = txn.open_table(table).map_err(|e| self.err(e))?;
            let mut old = Vec::new();
            for row in t.iter().map_err(|e| self.err(e))? {
                let (k, v) = row.map_err(|e| self.err(e))?;
                old.push((k.value().to_string(), v.value().to_vec()));
            }
            for (k, v) in &old {
                t.insert(k.as_str(), seal(k, v).as_slice())
                    .map_err(|e| self.err(e))?;
            }
            rows += old.len();
        }
        let mut stones = Vec::new();
        {
            let old = txn.open_table(TOMBSTONES_V1).map_err(|e| self.err(e))?;
            for row in old.iter().map_err(|e| self.err(e))? {
                let (k, v) = row.map_err(|e| self.err(e))?;
                stones.push((k.value().to_string(), v.value()));
            }
        }
        txn.delete_table(TOMBSTONES_V1).map_err(|e| self.err(e))?;
        let mut t = txn.open_table(TOMBSTONES).map_err(|e| self.err(e))?;
        for (k, last) in &stones {
            t.insert(k.as_str(), seal(k, &last.to_le_bytes()).as_slice())
                .map_err(|e| self.err(e))?;
        }
        Ok(rows + stones.len())
    }

    /// Checks every row's checksum (start-up with `--state.start-fresh`, which must decide
    /// before anything is loaded whether the store is readable).
    fn verify(&self, db: &Database) -> Result<(), StoreError> {
        let txn = db.begin_read().map_err(|e| self.err(e))?;
        for (name, table) in [
            ("tasks", TASKS),
            ("tombstones", TOMBSTONES),
            ("counters", COUNTERS),
            ("latencies", LATENCIES),
        ] {
            let t = txn.open_table(table).map_err(|e| self.err(e))?;
            for row in t.iter().map_err(|e| self.err(e))? {
                let (k, v) = row.map_err(|e| self.err(e))?;
                if unseal(k.value(), v.value()).is_none() {
                    return Err(self.bad_row(name, k.value()));
                }
            }
        }
        Ok(())
    }

    /// Calls `f(key, value)` for every row of `table` in `range` (all when `None`), checked.
    fn scan(
        &self,
        name: &str,
        table: TableDefinition<&str, &[u8]>,
        range: Option<(String, String)>,
        mut f: impl FnMut(&str, &[u8]),
    ) -> Result<(), StoreError> {
        self.guard(|| {
            let db = self.db()?;
            let txn = db.begin_read().map_err(|e| self.err(e))?;
            let t = txn.open_table(table).map_err(|e| self.err(e))?;
            let rows = match &range {
                Some((start, end)) => t.range(start.as_str()..end.as_str()),
                None => t.range::<&str>(..),
            }
            .map_err(|e| self.err(e))?;
            for row in rows {
                let (k, v) = row.map_err(|e| self.err(e))?;
                let Some(value) = unseal(k.value(), v.value()) else {
                    return Err(self.bad_row(name, k.value()));
                };
                f(k.value(), value);
            }
            Ok(())
        })
    }

    fn scan_tombstones(
        &self,
        range: Option<(String, String)>,
        mut f: impl FnMut(&str, i64),
    ) -> Result<(), StoreError> {
        self.scan("tombstones", TOMBSTONES, range, |k, v| {
            // `scan` checked the checksum; the length is the only thing left to check.
            if let Ok(last) = <[u8; 8]>::try_from(v) {
                f(k, i64::from_le_bytes(last));
            }
        })
    }

    /// Reads everything (start-up).
    pub fn load(&self) -> Result<Snapshot, StoreError> {
        let mut snapshot = Snapshot::default();
        self.scan("tasks", TASKS, None, |k, v| {
            snapshot.tasks.push((k.to_string(), v.to_vec()))
        })?;
        self.scan_tombstones(None, |k, v| snapshot.tombstones.push((k.to_string(), v)))?;
        snapshot.counters = self.load_counters()?;
        Ok(snapshot)
    }

    /// Reads the counter totals (start-up; tasks and tombstones are streamed with
    /// [`for_each_task`](Self::for_each_task) and [`for_each_tombstone`](Self::for_each_tombstone)).
    pub(crate) fn load_counters(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut rows = Vec::new();
        self.scan("counters", COUNTERS, None, |k, v| {
            rows.push((k.to_string(), v.to_vec()))
        })?;
        Ok(rows)
    }

    /// Calls `f(key, record)` for every task row of `provider`, in key order, without
    /// copying the rows (a million of them load in well under a second this way).
    pub(crate) fn for_each_task(
        &self,
        provider: &str,
        f: impl FnMut(&str, &[u8]),
    ) -> Result<(), StoreError> {
        self.scan("tasks", TASKS, Some(provider_range(provider)), f)
    }

    /// Number of stored tasks, of every provider.
    pub(crate) fn task_count(&self) -> Result<u64, StoreError> {
        self.guard(|| {
            let db = self.db()?;
            let txn = db.begin_read().map_err(|e| self.err(e))?;
            let tasks = txn.open_table(TASKS).map_err(|e| self.err(e))?;
            tasks.len().map_err(|e| self.err(e))
        })
    }

    /// Calls `f(key)` for the key of every task and tombstone, of every provider.
    pub fn for_each_key(&self, mut f: impl FnMut(&str)) -> Result<(), StoreError> {
        self.scan("tasks", TASKS, None, |k, _| f(k))?;
        self.scan("tombstones", TOMBSTONES, None, |k, _| f(k))
    }

    /// Calls `f(key, last_seen)` for every tombstone of `provider`.
    pub(crate) fn for_each_tombstone(
        &self,
        provider: &str,
        f: impl FnMut(&str, i64),
    ) -> Result<(), StoreError> {
        self.scan_tombstones(Some(provider_range(provider)), f)
    }

    /// Calls `f(model, row)` for every stored completion-time histogram of `provider`.
    pub fn for_each_latency(
        &self,
        provider: &str,
        mut f: impl FnMut(&str, &[u8]),
    ) -> Result<(), StoreError> {
        self.scan(
            "latencies",
            LATENCIES,
            Some(provider_range(provider)),
            |k, v| {
                if let Some((_, model)) = split_task_key(k) {
                    f(model, v);
                }
            },
        )
    }

    /// Reads the tasks and tombstones of one provider (a provider added by reload).
    pub fn load_provider(&self, provider: &str) -> Result<Snapshot, StoreError> {
        let mut snapshot = Snapshot::default();
        self.for_each_task(provider, |k, v| {
            snapshot.tasks.push((k.to_string(), v.to_vec()))
        })?;
        self.for_each_tombstone(provider, |k, v| {
            snapshot.tombstones.push((k.to_string(), v))
        })?;
        Ok(snapshot)
    }

    /// Deletes tombstones last mentioned before `cutoff` (ms); returns how many.
    pub(crate) fn expire_tombstones(&self, cutoff: i64) -> Result<usize, StoreError> {
        self.guard(|| {
            let db = self.db()?;
            let txn = db.begin_write().map_err(|e| self.err(e))?;
            let expired = {
                let mut table = txn.open_table(TOMBSTONES).map_err(|e| self.err(e))?;
                let before = table.len().map_err(|e| self.err(e))?;
                // A row failing its checksum is left for start-up to report.
                table
                    .retain(|k, v| unseal_tombstone(k, v).is_none_or(|last| last >= cutoff))
                    .map_err(|e| self.err(e))?;
                before - table.len().map_err(|e| self.err(e))?
            };
            txn.commit().map_err(|e| self.err(e))?;
            Ok(expired as usize)
        })
    }

    /// Writes a batch atomically and durably.
    pub fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.guard(|| {
            let db = self.db()?;
            let txn = db.begin_write().map_err(|e| self.err(e))?;
            {
                let mut tasks = txn.open_table(TASKS).map_err(|e| self.err(e))?;
                for (k, v) in &batch.put_tasks {
                    tasks
                        .insert(k.as_str(), seal(k, v).as_slice())
                        .map_err(|e| self.err(e))?;
                }
                for k in &batch.delete_tasks {
                    tasks.remove(k.as_str()).map_err(|e| self.err(e))?;
                }
                let mut tombstones = txn.open_table(TOMBSTONES).map_err(|e| self.err(e))?;
                for (k, v) in &batch.put_tombstones {
                    tombstones
                        .insert(k.as_str(), seal(k, &v.to_le_bytes()).as_slice())
                        .map_err(|e| self.err(e))?;
                }
                for k in &batch.delete_tombstones {
                    tombstones.remove(k.as_str()).map_err(|e| self.err(e))?;
                }
                let mut counters = txn.open_table(COUNTERS).map_err(|e| self.err(e))?;
                for (k, v) in &batch.put_counters {
                    counters
                        .insert(k.as_str(), seal(k, v).as_slice())
                        .map_err(|e| self.err(e))?;
                }
                let mut latencies = txn.open_table(LATENCIES).map_err(|e| self.err(e))?;
                for (k, v) in &batch.put_latencies {
                    latencies
                        .insert(k.as_str(), seal(k, v).as_slice())
                        .map_err(|e| self.err(e))?;
                }
            }
            txn.commit().map_err(|e| self.err(e))
        })
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
        assert_eq!(store.expire_tombstones(41).unwrap(), 0);
        assert_eq!(store.expire_tombstones(43).unwrap(), 1);
        assert!(store.load().unwrap().tombstones.is_empty());
    }

    #[test]
    fn schema_1_stores_are_migrated_with_checksums() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Database::create(dir.path().join(DB_FILE)).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut meta = txn.open_table(META).unwrap();
                meta.insert("schema_version", 1).unwrap();
                let mut tasks = txn.open_table(TASKS).unwrap();
                tasks
                    .insert(task_key("mx", "a").as_str(), [1u8, 2].as_slice())
                    .unwrap();
                let mut stones = txn.open_table(TOMBSTONES_V1).unwrap();
                stones.insert(task_key("mx", "z").as_str(), 42).unwrap();
                let mut counters = txn.open_table(COUNTERS).unwrap();
                counters.insert("c", [9u8].as_slice()).unwrap();
            }
            txn.commit().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let snap = store.load().unwrap();
        assert_eq!(snap.tasks, vec![(task_key("mx", "a"), vec![1, 2])]);
        assert_eq!(snap.tombstones, vec![(task_key("mx", "z"), 42)]);
        assert_eq!(snap.counters, vec![("c".to_string(), vec![9])]);
        drop(store);
        // Opened again: already schema 2, nothing rewritten twice.
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.load().unwrap().tasks.len(), 1);
    }

    #[test]
    fn a_row_failing_its_checksum_is_named() {
        assert_eq!(
            crc32(&[b"123456789"]),
            0xCBF4_3926,
            "the CRC-32 check value"
        );
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .commit(&Batch {
                put_counters: vec![("c\u{1f}mx".into(), 1.0f64.to_le_bytes().to_vec())],
                ..Batch::default()
            })
            .unwrap();
        {
            let db = store.db().unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut counters = txn.open_table(COUNTERS).unwrap();
                let mut row = seal("c\u{1f}mx", &1.0f64.to_le_bytes());
                row[6] ^= 0x01; // 1.0 becomes 1.0000000000000002 or so
                counters.insert("c\u{1f}mx", row.as_slice()).unwrap();
            }
            txn.commit().unwrap();
        }
        let err = store.load_counters().unwrap_err().to_string();
        assert!(
            err.contains("table counters") && err.contains("c\\u{1f}mx"),
            "{err}"
        );
        assert!(err.contains(&store.path().display().to_string()), "{err}");
    }

    #[test]
    fn learnt_latencies_are_kept_per_provider_and_copied_on_recreate() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .commit(&Batch {
                put_latencies: vec![
                    (task_key("mx", "veo"), vec![1, 2, 3]),
                    (task_key("m", "veo"), vec![4]),
                ],
                ..Batch::default()
            })
            .unwrap();
        std::fs::remove_dir_all(dir.path()).unwrap();
        assert_eq!(store.recreate().unwrap(), 2);
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        let mut rows = Vec::new();
        store
            .for_each_latency("mx", |model, row| {
                rows.push((model.to_string(), row.to_vec()))
            })
            .unwrap();
        assert_eq!(rows, vec![("veo".to_string(), vec![1, 2, 3])]);
    }

    #[test]
    fn an_empty_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(DB_FILE), b"").unwrap();
        let err = Store::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::Empty { .. }), "{err}");
        assert!(err.to_string().contains("state.redb"), "{err}");
    }

    #[test]
    fn a_deleted_file_is_noticed_and_recreated_from_the_open_copy() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .commit(&Batch {
                put_tasks: vec![(task_key("mx", "a"), vec![7])],
                put_tombstones: vec![(task_key("mx", "z"), 5)],
                ..Batch::default()
            })
            .unwrap();
        assert!(!store.is_replaced());
        std::fs::remove_dir_all(dir.path()).unwrap();
        assert!(store.is_replaced());
        assert_eq!(store.recreate().unwrap(), 2);
        assert!(!store.is_replaced());
        drop(store);
        let again = Store::open(dir.path()).unwrap().load().unwrap();
        assert_eq!(again.tasks, vec![(task_key("mx", "a"), vec![7])]);
        assert_eq!(again.tombstones, vec![(task_key("mx", "z"), 5)]);
    }
}

//! Discovery sources that run on their own: static ids, task files and apimall history.
//! (Webhooks and the registration API are HTTP routes in `http`.)

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::clock::Clock;
use crate::config::{HistorySettings, ProviderSettings};
use crate::metrics::Metrics;
use crate::providers::{Adapter, HistoryKind};
use crate::registry::{ProviderTasks, Source, TrackOutcome, remention_interval};
use crate::task::{Observation, Status};
use crate::upstream::{Endpoint, Upstream};

/// Page size of history requests (the documented maximum).
pub(crate) const HISTORY_PAGE_LIMIT: u32 = 50;
/// Task files larger than this are refused: one id per line makes this millions of ids.
const MAX_TASK_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// Tracks the static ids of the configuration.
pub(crate) fn track_static(tasks: &ProviderTasks, ids: &[String], clock: Clock) -> usize {
    let now = clock.now_millis();
    ids.iter()
        .filter(|id| tasks.track(id, Source::Static, now) == TrackOutcome::New)
        .count()
}

/// Mentions the static ids again every `interval` (they were tracked at start), which keeps
/// the tombstones of finished ones fresh (see `registry::remention_interval`).
pub(crate) async fn keep_static(
    tasks: Arc<ProviderTasks>,
    ids: Vec<String>,
    interval: Duration,
    clock: Clock,
) {
    let mut tick = tokio::time::interval(interval);
    tick.tick().await; // the first tick is immediate: start-up already tracked them
    loop {
        tick.tick().await;
        track_static(&tasks, &ids, clock);
    }
}

/// Parses a task file: one id per line, `#` starts a comment, blank lines ignored.
pub(crate) fn parse_task_file(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(|line| line.split('#').next().unwrap_or("").trim())
        .filter(|line| !line.is_empty())
}

/// Watches the task files of one provider: re-reads a file when its modification time or
/// size changes (polled every `interval`, so new ids are picked up within one interval).
pub(crate) async fn watch_task_files(
    settings: ProviderSettings,
    tasks: Arc<ProviderTasks>,
    metrics: Arc<Metrics>,
    clock: Clock,
) {
    let mut seen: HashMap<PathBuf, (SystemTime, u64)> = HashMap::new();
    let mut tick = tokio::time::interval(settings.polling.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_full_read = Instant::now();
    let remention = remention_interval(&settings.polling);
    loop {
        tick.tick().await;
        // Re-read unchanged files now and then too: mentioning their finished ids again keeps
        // their tombstones from expiring (see `registry::remention_interval`).
        if last_full_read.elapsed() >= remention {
            last_full_read = Instant::now();
            seen.clear();
        }
        let patterns = settings.task_files.clone();
        let files: Vec<PathBuf> = tokio::task::spawn_blocking(move || {
            patterns
                .iter()
                .filter_map(|p| glob::glob(p).ok())
                .flat_map(|paths| paths.filter_map(Result::ok))
                .collect()
        })
        .await
        .unwrap_or_default();
        for path in files {
            let meta = match tokio::fs::metadata(&path).await {
                Ok(m) if m.is_file() => m,
                Ok(_) => continue,
                Err(e) => {
                    file_error(&metrics, &settings.name, &path, &e.to_string());
                    continue;
                }
            };
            let stamp = (
                meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                meta.len(),
            );
            if seen.get(&path) == Some(&stamp) {
                continue;
            }
            if meta.len() > MAX_TASK_FILE_BYTES {
                file_error(&metrics, &settings.name, &path, "file larger than 64 MiB");
                seen.insert(path, stamp);
                continue;
            }
            match tokio::fs::read(&path).await {
                Ok(bytes) => {
                    seen.insert(path.clone(), stamp);
                    // A binary file's printable runs would pass for ids and be polled
                    // upstream with the provider's key: such a file is refused whole.
                    let text = match std::str::from_utf8(&bytes) {
                        Ok(text) if !text.contains('\0') => text,
                        _ => {
                            let error =
                                "not a text file (NUL bytes or invalid UTF-8): nothing tracked";
                            file_error(&metrics, &settings.name, &path, error);
                            continue;
                        }
                    };
                    let now = clock.now_millis();
                    let mut new = 0;
                    let mut invalid = 0;
                    for id in parse_task_file(text) {
                        match tasks.track(id, Source::File, now) {
                            TrackOutcome::New => new += 1,
                            TrackOutcome::Invalid => invalid += 1,
                            _ => {}
                        }
                    }
                    if invalid > 0 {
                        // One count per read: the lines themselves are not logged (they
                        // may hold anything).
                        tracing::warn!(provider = %settings.name, file = %path.display(), new, invalid, "task file lines that are not task ids were skipped");
                        metrics.count_discovery_error(&settings.name, "file");
                    } else if new > 0 {
                        tracing::info!(provider = %settings.name, file = %path.display(), new, "task file read");
                    }
                }
                Err(e) => file_error(&metrics, &settings.name, &path, &e.to_string()),
            }
        }
    }
}

fn file_error(metrics: &Metrics, provider: &str, path: &std::path::Path, error: &str) {
    tracing::warn!(provider, file = %path.display(), error, "cannot read task file");
    metrics.count_discovery_error(provider, "file");
}

/// Walks the history listings every `history.interval`. A history item is an observation
/// like a poll answer, applied through the same exactly-once rules: a completed item is
/// counted from the item itself (status, credits, `created_at`, `completed_at`) without a
/// get-task request. A failed item carries no `error_message` (docs/providers.md §2), so it
/// gets exactly one get-task request for its reason. In-flight items are tracked; the walks
/// see them finish, and their safety poll comes only when they are overdue.
///
/// Each walk is incremental: it stops at the first page that holds nothing new or changed,
/// unless a task seen in flight in an earlier walk has not been seen again yet. Paging deeper
/// is the cheaper way to cover those: one page (one request) shows up to 50 tasks, where
/// polling them costs one request per task and poll. `max_pages` caps a walk; a walk that
/// reaches it still wanting more is counted (`genai_exporter_history_truncated_total`) and
/// logged, since discovery may then miss tasks.
///
/// Every re-mention period one walk reads all `max_pages` pages however little changed: it mentions
/// the ids of finished tasks deeper down, which keeps their tombstones alive (see
/// `registry::remention_interval`), so a later deep walk never counts them again.
pub(crate) async fn poll_history(
    history: HistorySettings,
    provider: String,
    tasks: Arc<ProviderTasks>,
    upstream: Arc<Upstream>,
    adapter: Adapter,
    metrics: Arc<Metrics>,
    clock: Clock,
) {
    let mut tick = tokio::time::interval(history.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut walks: HashMap<HistoryKind, HistoryWalk> = HashMap::new();
    let mut last_truncation_log: Option<Instant> = None;
    loop {
        tick.tick().await;
        for &kind in &history.kinds {
            let walk = walks.entry(kind).or_default();
            let remention = tasks.remention_interval();
            let full = walk.last_full.is_none_or(|at| at.elapsed() >= remention);
            let outcome = walk
                .run(
                    kind, full, &history, &provider, &tasks, &upstream, &adapter, &metrics, clock,
                )
                .await;
            let Some(outcome) = outcome else {
                return; // no history listing for this provider
            };
            if outcome.truncated {
                metrics.count_history_truncated(&provider, kind.as_str());
                // Once a minute at most: a busy account truncates every walk.
                if last_truncation_log.is_none_or(|at| at.elapsed() >= TRUNCATION_LOG_EVERY) {
                    last_truncation_log = Some(Instant::now());
                    tracing::warn!(
                        provider,
                        kind = kind.as_str(),
                        max_pages = history.max_pages,
                        "history walk reached max_pages with pages still changing: discovery may be missing tasks; raise providers[].history.max_pages or shorten its interval"
                    );
                }
            }
            if outcome.new > 0 {
                tracing::debug!(
                    provider,
                    kind = kind.as_str(),
                    new = outcome.new,
                    pages = outcome.pages,
                    "history listed new tasks"
                );
            }
        }
    }
}

/// How often a truncated history walk is logged.
const TRUNCATION_LOG_EVERY: Duration = Duration::from_secs(60);

/// What one walk of one listing found.
#[derive(Debug, Default)]
struct WalkOutcome {
    new: usize,
    pages: u32,
    truncated: bool,
}

/// The memory of one listing between walks: the ids seen in flight, which the next walk
/// pages down to (as long as they are still in flight in the registry).
#[derive(Debug, Default)]
struct HistoryWalk {
    in_flight: HashSet<String>,
    /// When the last walk that read every page began.
    last_full: Option<Instant>,
}

impl HistoryWalk {
    /// One walk, `full` or incremental; `None` when the provider has no history listing.
    #[allow(clippy::too_many_arguments)]
    async fn run(
        &mut self,
        kind: HistoryKind,
        full: bool,
        history: &HistorySettings,
        provider: &str,
        tasks: &ProviderTasks,
        upstream: &Arc<Upstream>,
        adapter: &Adapter,
        metrics: &Metrics,
        clock: Clock,
    ) -> Option<WalkOutcome> {
        // Tasks finished by other means (a poll, a callback) or dropped need no covering.
        self.in_flight.retain(|id| tasks.is_in_flight(id));
        let mut unseen = self.in_flight.clone();
        let mut outcome = WalkOutcome::default();
        let started = Instant::now();
        let mut wants_more = false;
        for page_number in 1..=history.max_pages {
            let path = adapter.history_path(kind, page_number, HISTORY_PAGE_LIMIT)?;
            let answer = upstream
                .call(Endpoint::History, &path, |status, body| {
                    adapter.parse_history(status, body, HISTORY_PAGE_LIMIT)
                })
                .await;
            let Ok(page) = answer else {
                // Counted by the upstream client too; try again next interval.
                history_error(metrics, provider);
                return Some(outcome);
            };
            outcome.pages = page_number;
            let now = clock.now_millis();
            let mut page_news = false;
            for item in &page.items {
                unseen.remove(&item.task_id);
                let sighting = apply_item(tasks, metrics, provider, item, now);
                if sighting.new {
                    outcome.new += 1;
                }
                page_news |= sighting.new || sighting.changed;
                if sighting.in_flight {
                    self.in_flight.insert(item.task_id.clone());
                } else {
                    self.in_flight.remove(&item.task_id);
                }
            }
            if page.is_last {
                wants_more = false;
                break;
            }
            wants_more = page_news || !unseen.is_empty();
            if !wants_more && !full {
                return Some(outcome);
            }
        }
        if full {
            self.last_full = Some(started);
        }
        // Only a walk cut short with news still coming may be missing tasks.
        outcome.truncated = wants_more;
        Some(outcome)
    }
}

/// What a history item meant for the registry.
#[derive(Debug, Default)]
struct Sighting {
    /// First time this id was tracked.
    new: bool,
    /// It told something not known before (status, credits, timestamps).
    changed: bool,
    /// Tracked and still in flight after it.
    in_flight: bool,
}

/// Applies one history item: tracks it, and applies it as an observation. A failed item
/// has no reason in the listing: instead of counting it as `unspecified`, one get-task
/// request is asked for (the reason comes with its answer).
fn apply_item(
    tasks: &ProviderTasks,
    metrics: &Metrics,
    provider: &str,
    item: &Observation,
    now: i64,
) -> Sighting {
    let new = match tasks.track(&item.task_id, Source::History, now) {
        TrackOutcome::New => true,
        TrackOutcome::Known => false,
        // Finished long ago (a tombstone), another shard's, or not an id: nothing to learn.
        _ => return Sighting::default(),
    };
    if item.status == Status::Failed && item.failure_reason.is_none() {
        let asked = tasks.is_in_flight(&item.task_id);
        if asked {
            // Planned at once; once answered the task is finished and not asked again.
            tasks.poll_soon(&item.task_id, now);
        }
        return Sighting {
            new,
            changed: asked,
            in_flight: false,
        };
    }
    let applied = tasks.observe(item, now).unwrap_or_default();
    if applied.counted {
        metrics.record_detection(provider, "history", item, now);
    }
    Sighting {
        new,
        changed: applied.changed,
        in_flight: !item.status.is_terminal() && tasks.is_in_flight(&item.task_id),
    }
}

fn history_error(metrics: &Metrics, provider: &str) {
    metrics.count_discovery_error(provider, "history");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_files_skip_comments_and_blanks() {
        let text = "# header\nabc\n\n  def  # trailing comment\n#ghi\r\njkl\r\n";
        let ids: Vec<&str> = parse_task_file(text).collect();
        assert_eq!(ids, ["abc", "def", "jkl"]);
    }
}

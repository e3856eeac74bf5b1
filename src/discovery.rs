//! Discovery sources that run on their own: static ids, task files and apimall history.
//! (Webhooks and the registration API are HTTP routes in `http`.)

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::clock::Clock;
use crate::config::{HistorySettings, ProviderSettings};
use crate::metrics::Metrics;
use crate::providers::Adapter;
use crate::registry::{ProviderTasks, Source, TrackOutcome, remention_interval};
use crate::upstream::{Endpoint, Upstream};

/// Page size of history requests (the documented maximum).
pub const HISTORY_PAGE_LIMIT: u32 = 50;
/// Task files larger than this are refused: one id per line makes this millions of ids.
const MAX_TASK_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// Tracks the static ids of the configuration.
pub fn track_static(tasks: &ProviderTasks, ids: &[String], clock: Clock) -> usize {
    let now = clock.now_millis();
    ids.iter()
        .filter(|id| tasks.track(id, Source::Static, now) == TrackOutcome::New)
        .count()
}

/// Mentions the static ids again every `interval` (they were tracked at start), which keeps
/// the tombstones of finished ones fresh (see `registry::remention_interval`).
pub async fn keep_static(
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
pub fn parse_task_file(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(|line| line.split('#').next().unwrap_or("").trim())
        .filter(|line| !line.is_empty())
}

/// Watches the task files of one provider: re-reads a file when its modification time or
/// size changes (polled every `interval`, so new ids are picked up within one interval).
pub async fn watch_task_files(
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

/// Pages through the history listings every `history.interval` and tracks new ids. Their
/// state (and whether they are already finished) comes from the get-task poll that follows.
pub async fn poll_history(
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
    loop {
        tick.tick().await;
        for kind in &history.kinds {
            let mut new = 0;
            for page in 1..=history.max_pages {
                let Some(path) = adapter.history_path(*kind, page, HISTORY_PAGE_LIMIT) else {
                    return;
                };
                let answer = upstream
                    .call(Endpoint::History, &path, |status, body| {
                        adapter.parse_history(status, body, HISTORY_PAGE_LIMIT)
                    })
                    .await;
                let Ok(page) = answer else {
                    // Counted by the upstream client too; try again next interval.
                    history_error(&metrics, &provider);
                    break;
                };
                let now = clock.now_millis();
                for item in &page.items {
                    if tasks.track(&item.task_id, Source::History, now) == TrackOutcome::New {
                        new += 1;
                    }
                }
                if page.is_last {
                    break;
                }
            }
            if new > 0 {
                tracing::debug!(
                    provider,
                    kind = kind.as_str(),
                    new,
                    "history listed new tasks"
                );
            }
        }
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

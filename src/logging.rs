//! Logging set-up: `--log.level` and `--log.format logfmt|json`, like other exporters.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// A [`LogGate`] lets one line through per this many seconds.
const LOG_GATE_INTERVAL_SECS: u64 = 10;

/// Logs a kind of fault at most once per [`LOG_GATE_INTERVAL_SECS`], with the number of the
/// same faults left unlogged since: for faults whose frequency a client (or an attacker)
/// controls. Their metric still counts every one.
#[derive(Debug, Default)]
pub(crate) struct LogGate {
    next_second: AtomicU64,
    suppressed: AtomicU64,
}

impl LogGate {
    pub(crate) const fn new() -> LogGate {
        LogGate {
            next_second: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(suppressed count)` when a line may be logged now.
    pub(crate) fn open(&self) -> Option<u64> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let next = self.next_second.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_second
                .compare_exchange(
                    next,
                    now + LOG_GATE_INTERVAL_SECS,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Level {
    Error,
    Warn,
    Info,
    Debug,
}

impl Level {
    fn directive(self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Logfmt,
    Json,
}

/// Installs the global subscriber. Our own crate logs at `level`; dependencies only from
/// `warn` up unless debugging, so their chatter does not drown ours.
pub fn init(level: Level, format: Format) {
    let deps = if level == Level::Debug {
        "info"
    } else {
        "warn"
    };
    let filter = EnvFilter::new(format!("{deps},genai_task_exporter={}", level.directive()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        Format::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        Format::Logfmt => builder.event_format(Logfmt).try_init(),
    };
}

/// `ts=... level=info msg="..." key=value` lines.
struct Logfmt;

impl<S, N> FormatEvent<S, N> for Logfmt
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let ts = humantime::format_rfc3339_millis(std::time::SystemTime::now());
        write!(
            writer,
            "ts={ts} level={} target={}",
            meta.level().as_str().to_ascii_lowercase(),
            meta.target()
        )?;
        let mut visitor = LogfmtVisitor {
            message: None,
            fields: String::new(),
        };
        event.record(&mut visitor);
        if let Some(msg) = visitor.message {
            write!(writer, " msg={}", quote(&msg))?;
        }
        writeln!(writer, "{}", visitor.fields)
    }
}

struct LogfmtVisitor {
    message: Option<String>,
    fields: String,
}

impl Visit for LogfmtVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.record(field, value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.record(field, format!("{value:?}"));
    }
}

impl LogfmtVisitor {
    fn record(&mut self, field: &Field, value: String) {
        if field.name() == "message" {
            self.message = Some(value);
        } else {
            self.fields.push(' ');
            self.fields.push_str(field.name());
            self.fields.push('=');
            self.fields.push_str(&quote(&value));
        }
    }
}

/// Quotes a logfmt value when it needs it.
fn quote(value: &str) -> String {
    let plain = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_graphic() && c != '"' && c != '=' && c != '\\');
    if plain {
        value.to_string()
    } else {
        format!("{value:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_gate_lets_one_line_through_per_interval() {
        let gate = LogGate::new();
        assert_eq!(gate.open(), Some(0));
        assert_eq!(gate.open(), None);
        assert_eq!(gate.open(), None);
        gate.next_second.store(0, Ordering::Relaxed);
        assert_eq!(gate.open(), Some(2));
    }

    #[test]
    fn logfmt_values_are_quoted_when_needed() {
        assert_eq!(quote("abc"), "abc");
        assert_eq!(quote("a b"), "\"a b\"");
        assert_eq!(quote("a=b"), "\"a=b\"");
        assert_eq!(quote(""), "\"\"");
        assert_eq!(quote("say \"hi\"\n"), "\"say \\\"hi\\\"\\n\"");
    }
}

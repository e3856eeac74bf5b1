//! The YAML and problem reporting every configuration parser shares (the exporter's file,
//! the web configuration, the simulator's scenarios): typed parsing that names the key path,
//! line and column without quoting the file, humantime durations, and the error types.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::secret::{ReadError, read_bounded_text};

/// A humantime duration in the file (`15s`, `5m`, `6h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HumanDuration(pub(crate) Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        // The message does not repeat the value: it may be a secret pasted in the wrong place.
        humantime::parse_duration(&text)
            .map(HumanDuration)
            .map_err(|e| {
                serde::de::Error::custom(match e {
                    humantime::DurationError::NumberOverflow => "duration is too large",
                    _ => "invalid duration: use a number and a unit, e.g. 500ms, 15s, 5m, 6h",
                })
            })
    }
}

/// Largest configuration file read (a configuration is a few kilobytes).
const MAX_FILE_BYTES: u64 = 4 << 20;

/// Reads the YAML file at `path` into `T`; errors name the file and, for the content, the key
/// path, line and column (see [`parse_yaml`]).
pub(crate) fn load_yaml_file<T: serde::de::DeserializeOwned + Default>(
    path: &Path,
) -> Result<T, ConfigError> {
    let file = path.display().to_string();
    let text = read_bounded_text(path, MAX_FILE_BYTES).map_err(|source| ConfigError::Read {
        file: file.clone(),
        source,
    })?;
    parse_yaml(&text).map_err(|message| ConfigError::Parse { file, message })
}

/// One thing wrong with the configuration, at a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub(crate) path: String,
    pub(crate) message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: {source}")]
    Read {
        file: String,
        #[source]
        source: ReadError,
    },
    /// YAML syntax or a type/unknown-key error; the message carries line and column.
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error("{file}: {} problem(s):\n  {}", problems.len(), join_problems(problems))]
    Invalid {
        file: String,
        problems: Vec<Problem>,
    },
}

fn join_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join("\n  ")
}

/// Parser options for configuration files. Errors name the line and column but do not quote
/// the file: it may hold a secret by mistake (a `token: sk-...` typo must not reach logs or
/// the reload answer). Indentation is strict: a key indented one space short is a syntax
/// error at its own line, not folded into the previous value.
fn parser_options() -> serde_saphyr::Options {
    let mut options = serde_saphyr::Options::default();
    options.with_snippet = false;
    options.strict_indentation = true;
    options
}

/// Parses a YAML document into `T` (an empty one gives `T::default()`). The error names the
/// key path ("providers[1].polling.interval", from serde_path_to_error) and the line and
/// column (from saphyr), without quoting the file (see [`parser_options`]).
pub(crate) fn parse_yaml<T: serde::de::DeserializeOwned + Default>(
    text: &str,
) -> Result<T, String> {
    if text.trim().is_empty() {
        // An empty file is an empty mapping: every default applies.
        return Ok(T::default());
    }
    // The whole document's syntax first: the typed pass stops at the first missing field,
    // before the parser reaches a mis-indented line that is the real mistake.
    // Typed `f64` keys accept `.nan` and `.inf` and resolution refuses them with their key
    // path; this untyped pass lets them through to that.
    let mut syntax_only = parser_options();
    syntax_only.non_finite_float_policy = serde_saphyr::NonFiniteFloatPolicy::PassThrough;
    serde_saphyr::from_str_with_options::<serde::de::IgnoredAny>(text, syntax_only)
        .map_err(|e| located(&e))?;
    let mut key_path = String::new();
    let parsed =
        serde_saphyr::with_deserializer_from_str_with_options(text, parser_options(), |de| {
            serde_path_to_error::deserialize::<_, T>(de).map_err(|e| {
                key_path = e.path().to_string();
                e.into_inner()
            })
        });
    parsed.map_err(|e| {
        let message = located(&e);
        if key_path.is_empty() || key_path == "." {
            message
        } else {
            format!("{key_path}: {message}")
        }
    })
}

/// The error's text, with its line and column when the text lacks them.
fn located(e: &serde_saphyr::Error) -> String {
    let message = e.to_string();
    match e.location().filter(|_| !message.contains("line")) {
        Some(loc) => format!("line {} column {}: {message}", loc.line(), loc.column()),
        None => message,
    }
}

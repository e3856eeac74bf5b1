//! Configuration: the YAML file, its defaults, its validation, and the secrets it points at
//! (`token_env` / `token_file`, never inline).
//!
//! Loading is two steps, one module each. `file` is exactly the file (serde, unknown keys
//! refused). `resolve` turns it into [`Settings`] (`settings`), what the exporter runs on:
//! defaults applied, per-provider polling overrides folded in, every value checked (a value
//! that cannot be used is a problem with its key path, never a panic later), secrets read
//! (`secrets`). `yaml` is the parsing and problem reporting that every configuration parser
//! of the crate shares, the web configuration's and the simulator's too.

mod file;
mod resolve;
mod secrets;
mod settings;
mod yaml;

#[cfg(test)]
mod tests;

use std::path::Path;

pub use file::{DEFAULT_LATENCY_BUCKETS, FileConfig, ProviderType};
pub use resolve::resolve;
pub use settings::{HistorySettings, Polling, ProviderSettings, ProxySettings, Settings, Shard};
pub use yaml::{ConfigError, Problem};
pub(crate) use yaml::{HumanDuration, load_yaml_file, parse_yaml};

/// The task-id rule lives with the task (`crate::task`); re-exported for the callers that
/// take it from here.
pub(crate) use crate::task::is_valid_task_id;

/// Where secrets and environment come from; a trait so tests need not touch the real
/// process environment.
pub trait Environment {
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
pub struct ProcessEnv;

impl Environment for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl<F: Fn(&str) -> Option<String>> Environment for F {
    fn var(&self, name: &str) -> Option<String> {
        self(name)
    }
}

/// Command-line values that override the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen_address: Option<String>,
    pub shard_index: Option<u32>,
    pub shard_count: Option<u32>,
}

/// Reads, parses and validates the file at `path`.
pub fn load(
    path: &Path,
    overrides: &Overrides,
    env: &dyn Environment,
) -> Result<Settings, ConfigError> {
    let parsed: FileConfig = load_yaml_file(path)?;
    resolve(parsed, path, overrides, env).map_err(|problems| ConfigError::Invalid {
        file: path.display().to_string(),
        problems,
    })
}

/// Parses YAML text into the file structure. The error text names line and column.
pub fn parse(text: &str) -> Result<FileConfig, String> {
    parse_yaml(text)
}

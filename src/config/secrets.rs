//! Secrets named by the configuration: `<key>_env` or `<key>_file`, exactly one, never the
//! value itself.

use std::path::Path;

use super::Environment;
use super::yaml::Problem;
use crate::secret::Secret;

/// Reads a secret named by `<prefix>.<key>_env` or `<prefix>.<key>_file` (exactly one).
pub(super) fn load_secret(
    prefix: &str,
    key: &str,
    env_name: Option<&str>,
    file: Option<&Path>,
    required: bool,
    env: &dyn Environment,
) -> Result<Option<Secret>, Vec<Problem>> {
    let at = |suffix: &str| format!("{prefix}.{key}_{suffix}");
    match (env_name, file) {
        (Some(_), Some(_)) => Err(vec![Problem {
            path: at("env"),
            message: format!("set either {key}_env or {key}_file, not both"),
        }]),
        (None, None) if required => Err(vec![Problem {
            path: at("env"),
            message: format!("one of {key}_env or {key}_file is required"),
        }]),
        (None, None) => Ok(None),
        // Not a variable name: most likely the key itself, written here by mistake. Say so
        // without repeating it.
        (Some(var), None) if !is_env_name(var) => Err(vec![Problem {
            path: at("env"),
            message: "is not an environment variable name (letters, digits and '_'); \
                      name the variable that holds the secret, not the secret"
                .into(),
        }]),
        (Some(var), None) => match env.var(var).map(|v| v.trim().to_string()) {
            Some(value) if !value.is_empty() => Ok(Some(Secret::new(value))),
            Some(_) => Err(vec![Problem {
                path: at("env"),
                message: format!("variable {var} is empty"),
            }]),
            None => Err(vec![Problem {
                path: at("env"),
                message: format!("variable {var} is not set"),
            }]),
        },
        // Bounded and regular files only (see `Secret::from_file`); the file is named, its
        // content never is.
        (None, Some(path)) => Secret::from_file(path).map(Some).map_err(|e| {
            vec![Problem {
                path: at("file"),
                message: format!("{} {e}", path.display()),
            }]
        }),
    }
}

/// `[A-Za-z_][A-Za-z0-9_]*`, at most 128 characters.
fn is_env_name(name: &str) -> bool {
    name.len() <= 128
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

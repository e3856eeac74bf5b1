//! The web configuration file (`--web.config.file`), in the Prometheus exporter-toolkit
//! format: `tls_server_config`, `http_server_config`, `basic_auth_users` and `rate_limit`.
//!
//! Loading reads the file, refuses unknown keys, checks every value and reads the
//! certificates, so a file that loads is a file that serves. Relative paths are relative to
//! the file's own directory, as in the toolkit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::http::{HeaderName, HeaderValue};
use serde::Deserialize;

use super::tls::{self, ClientAuth, PemSource, TlsSettings};
use crate::config::{ConfigError, HumanDuration, Problem, load_yaml_file};
use crate::secret::Secret;

/// The file, key for key.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct WebFile {
    tls_server_config: Option<TlsFile>,
    http_server_config: Option<HttpFile>,
    rate_limit: Option<RateLimitFile>,
    basic_auth_users: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct TlsFile {
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    /// Inline PEM certificate chain (instead of `cert_file`).
    cert: Option<String>,
    /// Inline PEM private key (instead of `key_file`).
    key: Option<String>,
    client_auth_type: Option<String>,
    client_ca_file: Option<PathBuf>,
    /// Inline PEM client CA certificates (instead of `client_ca_file`).
    client_ca: Option<String>,
    min_version: Option<String>,
    max_version: Option<String>,
    cipher_suites: Option<Vec<String>>,
    curve_preferences: Option<Vec<String>>,
    prefer_server_cipher_suites: Option<bool>,
    client_allowed_sans: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct HttpFile {
    http2: bool,
    headers: Option<BTreeMap<String, String>>,
}

impl Default for HttpFile {
    fn default() -> Self {
        HttpFile {
            http2: true,
            headers: None,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RateLimitFile {
    burst: u32,
    interval: Option<HumanDuration>,
}

/// Requests allowed: `burst` at once, one more every `interval`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RateLimit {
    pub(crate) burst: u32,
    pub(crate) interval: Duration,
}

/// The loaded web configuration.
#[derive(Debug)]
pub struct WebConfig {
    /// The file it came from.
    pub(crate) source: PathBuf,
    /// The TLS server configuration; `None` serves plain HTTP (no `tls_server_config`, or one
    /// that names no certificate, as in the toolkit).
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
    /// Whether HTTP/2 is offered (`http_server_config.http2`, default true; TLS only).
    pub(crate) http2: bool,
    /// Headers added to every response.
    pub(crate) headers: Vec<(HeaderName, HeaderValue)>,
    /// User name to bcrypt hash; empty: no basic auth.
    pub(crate) users: BTreeMap<String, Secret>,
    pub(crate) rate_limit: Option<RateLimit>,
    /// Things accepted but not applied (cipher suites, curves), for the log.
    pub(crate) warnings: Vec<String>,
    /// The files read (this one, certificates, keys, CAs) and how they looked, to notice
    /// when they change.
    pub(crate) stamps: Vec<(PathBuf, Option<FileStamp>)>,
}

/// Modification time and length of a file, to notice a rewrite.
pub(crate) type FileStamp = (SystemTime, u64);

pub(crate) fn stamp(path: &Path) -> Option<FileStamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some((
        meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        meta.len(),
    ))
}

/// Headers that the file may not set: they frame or route the message (hop-by-hop and
/// length headers) or belong to authentication and sessions.
const FORBIDDEN_HEADERS: &[&str] = &[
    "authorization",
    "connection",
    "content-encoding",
    "content-length",
    "content-type",
    "cookie",
    "date",
    "host",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "set-cookie",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "www-authenticate",
];

/// Reads, parses and checks the web configuration at `path`, certificates included.
pub(crate) fn load(path: &Path) -> Result<WebConfig, ConfigError> {
    let file = path.display().to_string();
    let parsed: WebFile = load_yaml_file(path)?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut config =
        resolve(parsed, base).map_err(|problems| ConfigError::Invalid { file, problems })?;
    config.source = path.to_path_buf();
    config.stamps.insert(0, (path.to_path_buf(), stamp(path)));
    Ok(config)
}

/// Parses the YAML text; the error names the key path and the line.
fn parse(text: &str) -> Result<WebFile, String> {
    crate::config::parse_yaml(text)
}

/// Checks the YAML text alone (no files are read); for the fuzz driver and tests.
pub fn check_text(text: &str) -> Result<(), String> {
    parse(text).map(|_| ())
}

fn resolve(file: WebFile, base: &Path) -> Result<WebConfig, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let mut stamps = Vec::new();
    let problem = |problems: &mut Vec<Problem>, path: &str, message: String| {
        problems.push(Problem {
            path: path.to_string(),
            message,
        })
    };

    let http = file.http_server_config.unwrap_or_default();
    let mut headers = Vec::new();
    for (name, value) in http.headers.unwrap_or_default() {
        let at = format!("http_server_config.headers.{name}");
        match check_header(&name, &value) {
            Ok(h) => headers.push(h),
            Err(message) => problem(&mut problems, &at, message),
        }
    }

    let mut users = BTreeMap::new();
    for (user, hash) in file.basic_auth_users.unwrap_or_default() {
        let at = format!("basic_auth_users.{user}");
        if user.is_empty() || user.contains(':') {
            problem(
                &mut problems,
                &at,
                "a user name must be non-empty and without ':'".into(),
            );
        } else if hash.parse::<bcrypt::HashParts>().is_err() {
            // The value is not echoed: it may be a password written by mistake.
            problem(
                &mut problems,
                &at,
                "not a bcrypt hash (generate one with `htpasswd -nBC 10 \"\" | tr -d ':\\n'`)"
                    .into(),
            );
        } else {
            users.insert(user, Secret::new(hash));
        }
    }

    let rate_limit = match file.rate_limit {
        Some(RateLimitFile {
            burst,
            interval: Some(HumanDuration(interval)),
        }) if !interval.is_zero() => {
            if burst == 0 {
                problem(
                    &mut problems,
                    "rate_limit.burst",
                    "must be at least 1 when rate_limit.interval is set".into(),
                );
            }
            Some(RateLimit { burst, interval })
        }
        _ => None,
    };

    let tls = match file.tls_server_config {
        Some(t) if tls_enabled(&t) => match tls_settings(t, base, http.http2, &mut warnings) {
            Ok(settings) => {
                for path in settings.files() {
                    stamps.push((path.clone(), stamp(path)));
                }
                match tls::server_config(&settings) {
                    Ok(config) => Some(config),
                    Err(ps) => {
                        problems.extend(ps);
                        None
                    }
                }
            }
            Err(ps) => {
                problems.extend(ps);
                None
            }
        },
        _ => None,
    };

    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(WebConfig {
        source: PathBuf::new(),
        tls,
        http2: http.http2,
        headers,
        users,
        rate_limit,
        warnings,
        stamps,
    })
}

/// As in the toolkit: TLS is on when a certificate, key, client CA or client auth type is named.
fn tls_enabled(t: &TlsFile) -> bool {
    t.cert_file.is_some()
        || t.key_file.is_some()
        || t.cert.is_some()
        || t.key.is_some()
        || t.client_ca_file.is_some()
        || t.client_ca.is_some()
        || t.client_auth_type.as_deref().is_some_and(|s| !s.is_empty())
}

fn check_header(name: &str, value: &str) -> Result<(HeaderName, HeaderValue), String> {
    let header = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| "not a valid header name".to_string())?;
    if FORBIDDEN_HEADERS.contains(&header.as_str()) {
        return Err(format!(
            "{name} may not be set: it is set by the server or belongs to authentication"
        ));
    }
    // The toolkit's fixed choices for these two.
    let lower = value.to_ascii_lowercase();
    match header.as_str() {
        "x-content-type-options" if lower != "nosniff" => {
            return Err("the only allowed value is nosniff".into());
        }
        "x-frame-options" if lower != "deny" && lower != "sameorigin" => {
            return Err("allowed values are deny and sameorigin".into());
        }
        _ => {}
    }
    let value = HeaderValue::from_str(value)
        .map_err(|_| "not a valid header value (control characters?)".to_string())?;
    Ok((header, value))
}

fn tls_settings(
    t: TlsFile,
    base: &Path,
    http2: bool,
    warnings: &mut Vec<String>,
) -> Result<TlsSettings, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut problem = |path: &str, message: &str| {
        problems.push(Problem {
            path: format!("tls_server_config.{path}"),
            message: message.to_string(),
        })
    };
    let join = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
    let source = |file: Option<PathBuf>, inline: Option<String>, what: &str| match (file, inline) {
        (Some(f), None) if !f.as_os_str().is_empty() => Ok(Some(PemSource::File(join(f)))),
        (Some(_), None) => Err(format!("{what}_file: must not be empty")),
        (None, Some(text)) => Ok(Some(PemSource::Inline(Secret::new(text)))),
        (Some(_), Some(_)) => Err(format!(
            "{what}_file: set either {what} or {what}_file, not both"
        )),
        (None, None) => Ok(None),
    };
    let split = |e: String| -> (String, String) {
        let (key, message) = e.split_once(": ").expect("key: message");
        (key.to_string(), message.to_string())
    };

    let cert = match source(t.cert_file, t.cert, "cert") {
        Ok(Some(s)) => Some(s),
        Ok(None) => {
            problem("cert_file", "missing one of cert or cert_file");
            None
        }
        Err(e) => {
            let (k, m) = split(e);
            problem(&k, &m);
            None
        }
    };
    let key = match source(t.key_file, t.key, "key") {
        Ok(Some(s)) => Some(s),
        Ok(None) => {
            problem("key_file", "missing one of key or key_file");
            None
        }
        Err(e) => {
            let (k, m) = split(e);
            problem(&k, &m);
            None
        }
    };
    let client_ca = match source(t.client_ca_file, t.client_ca, "client_ca") {
        Ok(s) => s,
        Err(e) => {
            let (k, m) = split(e);
            problem(&k, &m);
            None
        }
    };
    let client_auth = match t.client_auth_type.as_deref().unwrap_or("") {
        "" | "NoClientCert" => Some(ClientAuth::None),
        "RequestClientCert" => Some(ClientAuth::Request),
        // "RequireClientCert" is the toolkit's old spelling.
        "RequireAnyClientCert" | "RequireClientCert" => Some(ClientAuth::RequireAny),
        "VerifyClientCertIfGiven" => Some(ClientAuth::VerifyIfGiven),
        "RequireAndVerifyClientCert" => Some(ClientAuth::RequireAndVerify),
        other => {
            problem(
                "client_auth_type",
                &format!(
                    "{other:?} is not one of NoClientCert, RequestClientCert, RequireAnyClientCert, VerifyClientCertIfGiven, RequireAndVerifyClientCert"
                ),
            );
            None
        }
    };
    match (&client_auth, &client_ca) {
        (Some(ClientAuth::None), Some(_)) => problem(
            "client_ca_file",
            "a client CA is configured without a client_auth_type that uses it",
        ),
        (Some(ClientAuth::VerifyIfGiven | ClientAuth::RequireAndVerify), None) => problem(
            "client_ca_file",
            "required by client_auth_type VerifyClientCertIfGiven and RequireAndVerifyClientCert",
        ),
        _ => {}
    }
    if t.client_allowed_sans.is_some() {
        problem(
            "client_allowed_sans",
            "is not supported; restrict clients with client_ca_file and RequireAndVerifyClientCert",
        );
    }

    let mut version = |key: &str, value: Option<&str>, default: u8| -> u8 {
        match value.unwrap_or("") {
            "" => default,
            "TLS13" => 13,
            "TLS12" => 12,
            "TLS10" | "TLS11" => 11,
            other => {
                problem(
                    key,
                    &format!("{other:?} is not one of TLS10, TLS11, TLS12, TLS13"),
                );
                default
            }
        }
    };
    let min = version("min_version", t.min_version.as_deref(), 12);
    let max = version("max_version", t.max_version.as_deref(), 13);
    if min == 11 {
        warnings.push(format!(
            "tls_server_config.min_version {}: TLS 1.0 and 1.1 are not offered; the minimum is TLS12",
            t.min_version.as_deref().unwrap_or("")
        ));
    }
    if max == 11 {
        problem(
            "max_version",
            "TLS 1.0 and 1.1 are not supported; use TLS12 or TLS13",
        );
    }
    if min > max {
        problem("min_version", "is above max_version");
    }
    if t.cipher_suites.as_ref().is_some_and(|c| !c.is_empty()) {
        warnings.push(
            "tls_server_config.cipher_suites is ignored: only the TLS library's modern AEAD suites are offered".into(),
        );
    }
    if t.curve_preferences.as_ref().is_some_and(|c| !c.is_empty()) {
        warnings.push(
            "tls_server_config.curve_preferences is ignored: X25519, P-256 and P-384 are offered"
                .into(),
        );
    }

    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(TlsSettings {
        cert: cert.expect("checked"),
        key: key.expect("checked"),
        client_ca,
        client_auth: client_auth.expect("checked"),
        tls12: min <= 12,
        tls13: max >= 13,
        http2,
        prefer_server_order: t.prefer_server_cipher_suites.unwrap_or(true),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web.yml");
        std::fs::write(&path, text).unwrap();
        match load(&path) {
            Ok(_) => vec![],
            Err(ConfigError::Invalid { problems, .. }) => {
                problems.iter().map(|p| p.to_string()).collect()
            }
            Err(e) => vec![e.to_string()],
        }
    }

    #[test]
    fn empty_file_is_plain_http_without_auth() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web.yml");
        std::fs::write(&path, "").unwrap();
        let c = load(&path).unwrap();
        assert!(c.tls.is_none() && c.users.is_empty() && c.headers.is_empty());
        assert!(c.http2);
    }

    #[test]
    fn unknown_keys_are_named() {
        let p = problems("tls_server_config:\n  cert_fle: a.pem\n");
        assert!(
            p[0].contains("tls_server_config") && p[0].contains("cert_fle"),
            "{p:?}"
        );
        let p = problems("basic_auth_user:\n  alice: x\n");
        assert!(p[0].contains("basic_auth_user"), "{p:?}");
    }

    #[test]
    fn bad_values_are_named_with_their_key() {
        let p = problems(
            "tls_server_config:\n  cert_file: missing.pem\n  client_auth_type: Sometimes\n  min_version: TLS14\n",
        );
        let text = p.join("\n");
        assert!(
            text.contains("tls_server_config.key_file: missing one of key or key_file"),
            "{text}"
        );
        assert!(
            text.contains("tls_server_config.client_auth_type: \"Sometimes\""),
            "{text}"
        );
        assert!(
            text.contains("tls_server_config.min_version: \"TLS14\""),
            "{text}"
        );

        let p = problems(
            "tls_server_config:\n  cert_file: c.pem\n  key_file: k.pem\n  client_auth_type: RequireAndVerifyClientCert\n",
        );
        assert!(
            p.join("\n")
                .contains("tls_server_config.client_ca_file: required"),
            "{p:?}"
        );

        let p = problems("tls_server_config:\n  cert_file: nowhere.pem\n  key_file: nowhere.key\n");
        assert!(
            p.join("\n").contains("tls_server_config.cert_file: ")
                && p.join("\n").contains("nowhere.pem: cannot be read"),
            "{p:?}"
        );

        let p = problems("basic_auth_users:\n  alice: hunter2\n");
        assert_eq!(p.len(), 1);
        assert!(
            p[0].starts_with("basic_auth_users.alice: not a bcrypt hash"),
            "{p:?}"
        );
        assert!(
            !p[0].contains("hunter2"),
            "the value must not be echoed: {p:?}"
        );
    }

    #[test]
    fn headers_are_checked_like_the_toolkit() {
        for (header, ok) in [
            ("Strict-Transport-Security: max-age=31536000", true),
            ("X-Content-Type-Options: nosniff", true),
            ("X-Content-Type-Options: sniff", false),
            ("X-Frame-Options: sameorigin", true),
            ("X-Frame-Options: allow", false),
            ("Content-Security-Policy: default-src 'self'", true),
            ("Cache-Control: no-store", true),
            ("WWW-Authenticate: None", false),
            ("Transfer-Encoding: chunked", false),
            ("Connection: close", false),
            ("Set-Cookie: a=b", false),
            ("Content-Length: 5", false),
        ] {
            let (name, value) = header.split_once(": ").unwrap();
            let p = problems(&format!(
                "http_server_config:\n  headers:\n    {name}: \"{value}\"\n"
            ));
            assert_eq!(p.is_empty(), ok, "{header}: {p:?}");
            if !ok {
                assert!(
                    p[0].starts_with(&format!("http_server_config.headers.{name}: ")),
                    "{p:?}"
                );
            }
        }
    }

    #[test]
    fn rate_limit_needs_a_burst() {
        let p = problems("rate_limit:\n  interval: 1s\n");
        assert!(p[0].starts_with("rate_limit.burst"), "{p:?}");
        assert!(problems("rate_limit:\n  interval: 1s\n  burst: 5\n").is_empty());
        assert!(problems("rate_limit:\n  burst: 5\n").is_empty());
    }
}

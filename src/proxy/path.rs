//! Which upstream URL a proxied request may go to.
//!
//! The application's path is appended to the configured `base_url` and nothing else decides
//! the destination: not the `Host` header, not an absolute URL or `//host` in the path. Any
//! path that an upstream server, a library or a middlebox could read as a different location
//! (`..` raw or percent-encoded, encoded slashes and backslashes, `@`, control characters) is
//! refused rather than normalized, and the URL we build is parsed again and its origin
//! compared with the base as a last check.

use reqwest::Url;

/// Why a request path or query cannot be forwarded. Bounded, for logs and the refusal count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PathError {
    /// The path is neither empty nor starts with `/`.
    NotAbsolute,
    /// `//` anywhere in the path (a `//host` authority once joined).
    EmptySegment,
    /// A segment that is `.` or `..`, raw or percent-encoded.
    DotSegment,
    /// A character outside RFC 3986 path characters: `\`, `@`, spaces, controls, non-ASCII.
    ForbiddenCharacter,
    /// A percent sequence that decodes to `/`, `\`, `@`, `%`, a control byte, or is malformed.
    ForbiddenEncoding,
    /// The query holds a control character (raw or encoded) or a fragment marker.
    BadQuery,
    /// The joined URL does not parse or does not keep the base's origin and path prefix.
    EscapesBase,
}

impl PathError {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            PathError::NotAbsolute => "not_absolute",
            PathError::EmptySegment => "empty_segment",
            PathError::DotSegment => "dot_segment",
            PathError::ForbiddenCharacter => "forbidden_character",
            PathError::ForbiddenEncoding => "forbidden_encoding",
            PathError::BadQuery => "bad_query",
            PathError::EscapesBase => "escapes_base",
        }
    }
}

/// Characters allowed raw in a path segment: RFC 3986 `pchar` minus `@` (userinfo tricks)
/// and minus `%`, which is checked separately.
fn is_path_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:".contains(&b)
}

/// Bytes that must not appear percent-encoded in a path: they change where the path points
/// (`/`, `\`), smuggle authority (`@`), allow double decoding (`%`), or split headers.
fn is_forbidden_decoded(b: u8) -> bool {
    matches!(b, b'/' | b'\\' | b'@' | b'%') || b.is_ascii_control()
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Percent-decodes `raw`, refusing malformed sequences and the bytes of
/// [`is_forbidden_decoded`].
fn decode(raw: &str, forbidden: fn(u8) -> bool) -> Result<Vec<u8>, PathError> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let decoded = bytes
                .get(i + 1)
                .and_then(|&h| hex(h))
                .zip(bytes.get(i + 2).and_then(|&l| hex(l)))
                .map(|(h, l)| h << 4 | l)
                .ok_or(PathError::ForbiddenEncoding)?;
            if forbidden(decoded) {
                return Err(PathError::ForbiddenEncoding);
            }
            out.push(decoded);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// Checks the application's path (what follows `/proxy/{provider}`, raw, still encoded) and
/// returns its decoded segments. The empty path stands for `/`.
pub(crate) fn check_path(raw: &str) -> Result<Vec<String>, PathError> {
    if raw.is_empty() || raw == "/" {
        return Ok(Vec::new());
    }
    let rest = raw.strip_prefix('/').ok_or(PathError::NotAbsolute)?;
    let mut segments = Vec::new();
    let count = rest.split('/').count();
    for (index, segment) in rest.split('/').enumerate() {
        if segment.is_empty() {
            // Only a trailing slash may leave an empty segment.
            if index + 1 == count {
                break;
            }
            return Err(PathError::EmptySegment);
        }
        if segment.bytes().any(|b| b != b'%' && !is_path_char(b)) {
            return Err(PathError::ForbiddenCharacter);
        }
        let decoded = decode(segment, is_forbidden_decoded)?;
        // `..;x` is `..` to some servers (path parameters), so compare what precedes `;`.
        let name = decoded.split(|&b| b == b';').next().unwrap_or(&[]);
        if name == b"." || name == b".." {
            return Err(PathError::DotSegment);
        }
        segments.push(String::from_utf8_lossy(&decoded).into_owned());
    }
    Ok(segments)
}

/// Checks the raw query: no fragment marker and no control character, raw or encoded. The
/// query cannot change the destination, but it is forwarded verbatim, so nothing in it may
/// split a request line or header on a less careful hop.
pub(crate) fn check_query(raw: &str) -> Result<(), PathError> {
    if raw
        .bytes()
        .any(|b| b == b'#' || b.is_ascii_control() || b == b' ')
    {
        return Err(PathError::BadQuery);
    }
    decode(raw, |b| b.is_ascii_control())
        .map(|_| ())
        .map_err(|_| PathError::BadQuery)
}

/// The configured destination: a base URL without query, fragment or userinfo.
#[derive(Debug, Clone)]
pub(crate) struct Base {
    url: Url,
    /// The base path without its trailing slash (`""` for the root).
    prefix: String,
}

impl Base {
    /// `None` when `base_url` cannot be used as a proxy destination.
    pub(crate) fn parse(base_url: &str) -> Option<Base> {
        let url = Url::parse(base_url).ok()?;
        let usable = matches!(url.scheme(), "http" | "https")
            && url.host_str().is_some()
            && url.username().is_empty()
            && url.password().is_none()
            && url.query().is_none()
            && url.fragment().is_none();
        if !usable {
            return None;
        }
        let prefix = url.path().trim_end_matches('/').to_string();
        Some(Base { url, prefix })
    }

    /// `{base_url}{path}?{query}`, for a path and query already checked by [`check_path`] and
    /// [`check_query`]. Parses the result and refuses it unless it keeps the base's scheme,
    /// host, port and path prefix, and unless the URL parser left the path as written (it
    /// would otherwise have normalized something we did not foresee).
    pub(crate) fn join(&self, raw_path: &str, raw_query: Option<&str>) -> Result<Url, PathError> {
        let path = if raw_path.is_empty() { "/" } else { raw_path };
        let mut text = String::with_capacity(self.url.as_str().len() + path.len() + 64);
        text.push_str(self.url.scheme());
        text.push_str("://");
        text.push_str(self.url.host_str().unwrap_or_default());
        if let Some(port) = self.url.port() {
            text.push(':');
            text.push_str(&port.to_string());
        }
        text.push_str(&self.prefix);
        text.push_str(path);
        if let Some(query) = raw_query {
            text.push('?');
            text.push_str(query);
        }
        let url = Url::parse(&text).map_err(|_| PathError::EscapesBase)?;
        let expected_path = format!("{}{}", self.prefix, path);
        let same = url.scheme() == self.url.scheme()
            && url.host() == self.url.host()
            && url.port_or_known_default() == self.url.port_or_known_default()
            && url.username().is_empty()
            && url.password().is_none()
            && url.path() == expected_path
            && url.query() == raw_query
            && url.fragment().is_none();
        if same {
            Ok(url)
        } else {
            Err(PathError::EscapesBase)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(path: &str) -> PathError {
        check_path(path).expect_err(path)
    }

    #[test]
    fn ordinary_paths_pass_and_decode() {
        assert_eq!(
            check_path("/api/v1/task/9db7d1ed-d1e5").unwrap(),
            ["api", "v1", "task", "9db7d1ed-d1e5"]
        );
        assert_eq!(check_path("/api/v1/x%20y").unwrap(), ["api", "v1", "x y"]);
        assert_eq!(check_path("/api/v1/").unwrap(), ["api", "v1"]);
        assert!(check_path("").unwrap().is_empty());
        assert!(check_path("/").unwrap().is_empty());
        assert_eq!(
            check_path("/v1/models/m:generate").unwrap()[2],
            "m:generate"
        );
    }

    #[test]
    fn dot_segments_are_refused_raw_and_encoded() {
        for path in [
            "/api/../x",
            "/api/./x",
            "/..",
            "/api/%2e%2e/x",
            "/api/%2E%2E/x",
            "/api/.%2e/x",
            "/api/%2e/x",
            "/api/..;/x",
            "/api/..%3b/x",
        ] {
            assert_eq!(refused(path), PathError::DotSegment, "{path}");
        }
        // Dots inside a name are fine.
        assert!(check_path("/api/v1.2/a..b/...").is_ok());
    }

    #[test]
    fn encoded_separators_and_escapes_are_refused() {
        for path in [
            "/api%2F..%2Fx",
            "/api/%2fetc",
            "/api/%5c..",
            "/api/%5C",
            "/api/%40evil",
            "/api/%252e%252e",
            "/api/%0d%0aHost:x",
            "/api/%00",
            "/api/%zz",
            "/api/%2",
        ] {
            assert_eq!(refused(path), PathError::ForbiddenEncoding, "{path}");
        }
    }

    #[test]
    fn authority_tricks_are_refused() {
        assert_eq!(refused("//evil.example/x"), PathError::EmptySegment);
        assert_eq!(refused("/http://evil/x"), PathError::EmptySegment);
        assert_eq!(refused("/api//x"), PathError::EmptySegment);
        assert_eq!(refused("http://evil/x"), PathError::NotAbsolute);
        assert_eq!(refused("evil"), PathError::NotAbsolute);
        assert_eq!(refused("/user@evil/x"), PathError::ForbiddenCharacter);
        assert_eq!(refused("/api\\..\\x"), PathError::ForbiddenCharacter);
        assert_eq!(refused("/a b"), PathError::ForbiddenCharacter);
        assert_eq!(refused("/a\r\nHost: x"), PathError::ForbiddenCharacter);
        assert_eq!(refused("/é"), PathError::ForbiddenCharacter);
    }

    #[test]
    fn queries_with_controls_are_refused() {
        assert!(check_query("page=1&limit=20").is_ok());
        assert!(check_query("q=a%20b&next=http%3A%2F%2Fx").is_ok());
        assert_eq!(check_query("a=%0d%0a"), Err(PathError::BadQuery));
        assert_eq!(check_query("a=%00"), Err(PathError::BadQuery));
        assert_eq!(check_query("a=b#frag"), Err(PathError::BadQuery));
        assert_eq!(check_query("a=%zz"), Err(PathError::BadQuery));
    }

    #[test]
    fn base_urls_without_a_usable_origin_are_refused() {
        assert!(Base::parse("https://api.maxapi.io").is_some());
        assert!(Base::parse("http://127.0.0.1:8080/prefix/").is_some());
        for bad in [
            "ftp://host",
            "https://user:pw@host",
            "https://host/?a=1",
            "https://host/#x",
            "not a url",
            "unix:/run/x",
        ] {
            assert!(Base::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn join_keeps_origin_and_prefix() {
        let base = Base::parse("http://127.0.0.1:8080/prefix/").unwrap();
        let url = base.join("/api/v1/task/abc", Some("x=1")).unwrap();
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:8080/prefix/api/v1/task/abc?x=1"
        );
        assert_eq!(
            base.join("", None).unwrap().as_str(),
            "http://127.0.0.1:8080/prefix/"
        );
        let root = Base::parse("https://api.maxapi.io").unwrap();
        assert_eq!(
            root.join("/api/v1/task/submit", None).unwrap().as_str(),
            "https://api.maxapi.io/api/v1/task/submit"
        );
        // Had a trick slipped past the checks, the parser's normalization is caught.
        assert_eq!(root.join("/a/../b", None), Err(PathError::EscapesBase));
        assert_eq!(root.join("/a\\b", None), Err(PathError::EscapesBase));
    }
}

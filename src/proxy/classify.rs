//! The bounded labels of a proxied request: which provider endpoint it is (`endpoint`) and
//! how the upstream answered (`code`).

use std::borrow::Cow;

use reqwest::Method;

/// The provider API a proxied request goes to (decides how endpoints and answers are read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    Maxapi,
    Apimall,
}

/// The `endpoint` label of `genai_proxy_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProxyEndpoint {
    Submit,
    Task,
    History,
    Balance,
    Other,
}

impl ProxyEndpoint {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ProxyEndpoint::Submit => "submit",
            ProxyEndpoint::Task => "task",
            ProxyEndpoint::History => "history",
            ProxyEndpoint::Balance => "balance",
            ProxyEndpoint::Other => "other",
        }
    }
}

/// apimall's task kinds, the second segment of its task paths (docs/providers.md §2).
const APIMALL_KINDS: [&str; 3] = ["images", "videos", "audio"];

/// Classifies a request by method and decoded path segments (docs/providers.md §1, §2). The task
/// id of a get-task request is returned with it, for the observer.
pub(crate) fn classify(
    kind: ProviderKind,
    method: &Method,
    segments: &[String],
) -> (ProxyEndpoint, Option<String>) {
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let post = method == Method::POST;
    let get = method == Method::GET;
    match (kind, segments.as_slice()) {
        (ProviderKind::Maxapi, ["api", "v1", "task", "submit"]) if post => {
            (ProxyEndpoint::Submit, None)
        }
        (ProviderKind::Maxapi, ["api", "v1", "task", id]) if get && *id != "submit" => {
            (ProxyEndpoint::Task, Some(id.to_string()))
        }
        (ProviderKind::Apimall, ["api", "v1", "account", "balances"]) if get => {
            (ProxyEndpoint::Balance, None)
        }
        (ProviderKind::Apimall, ["api", "v1", task_kind, rest])
            if APIMALL_KINDS.contains(task_kind) =>
        {
            match *rest {
                "generate" if post => (ProxyEndpoint::Submit, None),
                "history" if get => (ProxyEndpoint::History, None),
                "generate" | "history" => (ProxyEndpoint::Other, None),
                id if get => (ProxyEndpoint::Task, Some(id.to_string())),
                _ => (ProxyEndpoint::Other, None),
            }
        }
        _ => (ProxyEndpoint::Other, None),
    }
}

/// The `code` label: the upstream's HTTP status, or why there was none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyCode {
    Status(u16),
    /// No connection to the upstream (refused, DNS, TLS handshake).
    ConnectError,
    /// No answer within the proxy timeout.
    Timeout,
    /// The connection failed after it was made, before an answer's headers arrived.
    IoError,
}

impl ProxyCode {
    pub(crate) fn label(self) -> Cow<'static, str> {
        match self {
            ProxyCode::Status(status) => Cow::Owned(status.to_string()),
            ProxyCode::ConnectError => Cow::Borrowed("connect_error"),
            ProxyCode::Timeout => Cow::Borrowed("timeout"),
            ProxyCode::IoError => Cow::Borrowed("io_error"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ProviderKind::*;
    use ProxyEndpoint::*;

    fn of(kind: ProviderKind, method: Method, path: &str) -> (ProxyEndpoint, Option<String>) {
        let segments: Vec<String> = path
            .split('/')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        classify(kind, &method, &segments)
    }

    #[test]
    fn maxapi_endpoints() {
        assert_eq!(of(Maxapi, Method::POST, "/api/v1/task/submit").0, Submit);
        assert_eq!(
            of(Maxapi, Method::GET, "/api/v1/task/9db7d1ed"),
            (Task, Some("9db7d1ed".into()))
        );
        assert_eq!(of(Maxapi, Method::GET, "/api/v1/task/submit").0, Other);
        assert_eq!(of(Maxapi, Method::POST, "/api/v1/task/abc").0, Other);
        assert_eq!(of(Maxapi, Method::GET, "/api/v1/task/abc/x").0, Other);
        assert_eq!(of(Maxapi, Method::GET, "/api/v1/images/history").0, Other);
        assert_eq!(of(Maxapi, Method::GET, "/").0, Other);
    }

    #[test]
    fn apimall_endpoints() {
        for kind in APIMALL_KINDS {
            let base = format!("/api/v1/{kind}");
            assert_eq!(
                of(Apimall, Method::POST, &format!("{base}/generate")).0,
                Submit
            );
            assert_eq!(
                of(Apimall, Method::GET, &format!("{base}/history")).0,
                History
            );
            assert_eq!(
                of(Apimall, Method::GET, &format!("{base}/img_01")),
                (Task, Some("img_01".into()))
            );
            assert_eq!(
                of(Apimall, Method::GET, &format!("{base}/generate")).0,
                Other
            );
            assert_eq!(
                of(Apimall, Method::DELETE, &format!("{base}/img_01")).0,
                Other
            );
        }
        assert_eq!(
            of(Apimall, Method::GET, "/api/v1/account/balances").0,
            Balance
        );
        assert_eq!(of(Apimall, Method::GET, "/api/v1/music/generate").0, Other);
        assert_eq!(of(Apimall, Method::POST, "/api/v1/webhooks").0, Other);
        assert_eq!(of(Apimall, Method::POST, "/api/v1/task/submit").0, Other);
    }

    #[test]
    fn code_labels() {
        assert_eq!(ProxyCode::Status(429).label(), "429");
        assert_eq!(ProxyCode::ConnectError.label(), "connect_error");
        assert_eq!(ProxyCode::Timeout.label(), "timeout");
        assert_eq!(ProxyCode::IoError.label(), "io_error");
    }
}

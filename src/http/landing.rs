//! The landing page: version, links, and a status table per provider.

use std::fmt::Write as _;
use std::time::SystemTime;

use axum::extract::State;
use axum::response::Html;

use super::AppState;
use crate::metrics::{REVISION, VERSION};

/// Escapes text for HTML element content and attribute values.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn ago(t: Option<SystemTime>) -> String {
    match t.and_then(|t| SystemTime::now().duration_since(t).ok()) {
        Some(d) => format!("{}s ago", d.as_secs()),
        None => "never".to_string(),
    }
}

pub(crate) async fn page(State(app): State<AppState>) -> Html<String> {
    let settings = app.settings();
    let mut rows = String::new();
    for p in app.summaries() {
        let tasks = if p.tasks_by_status.is_empty() {
            "none".to_string()
        } else {
            p.tasks_by_status
                .iter()
                .map(|(s, n)| format!("{s}: {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        // Error texts come from providers; the provider's own key is redacted already,
        // and escaping keeps them inert.
        let error = p.upstream.last_error.as_deref().unwrap_or("");
        let _ = writeln!(
            rows,
            "<tr class=\"provider\" data-provider=\"{name}\"><td class=\"name\">{name}</td><td class=\"type\">{kind}</td>\
             <td class=\"up {upclass}\">{up}</td><td class=\"last-poll\">{last}</td><td class=\"tasks\">{tracked} ({tasks})</td>\
             <td class=\"last-error\">{error}</td></tr>",
            name = escape(&p.name),
            kind = p.kind,
            upclass = if p.upstream.up { "yes" } else { "no" },
            up = match (p.upstream.up, p.upstream.requests) {
                (true, _) => "up",
                (false, 0) => "no answer yet",
                (false, _) => "down",
            },
            last = ago(p.upstream.last_success),
            tracked = p.tracked,
            tasks = escape(&tasks),
            error = escape(error),
        );
    }
    Html(format!(
        r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>genai-task-exporter</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }}
td.up.yes {{ color: #176f2c; }} td.up.no {{ color: #b3261e; font-weight: bold; }}
td.last-error {{ max-width: 40em; overflow-wrap: anywhere; }}
</style>
</head>
<body>
<h1>genai-task-exporter</h1>
<p>Version {version} (revision {revision}), shard {shard_index} of {shard_count}.</p>
<ul>
<li><a href="metrics">Metrics</a></li>
<li><a href="api/v1/tasks">Tracked tasks (JSON)</a></li>
<li><a href="-/healthy">Health</a> and <a href="-/ready">readiness</a></li>
</ul>
<h2>Providers</h2>
<table id="providers">
<thead><tr><th>Provider</th><th>Type</th><th>Status</th><th>Last successful poll</th><th>Tracked tasks</th><th>Last error</th></tr></thead>
<tbody>
{rows}</tbody>
</table>
</body>
</html>
"#,
        version = VERSION,
        revision = escape(REVISION),
        shard_index = settings.shard.index,
        shard_count = settings.shard.count,
    ))
}

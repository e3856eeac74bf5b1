//! The landing page in a real browser: the exporter in demo mode (simulated providers), its `/`
//! loaded by headless Chromium (Debian package `chromium`), and the DOM the browser built checked
//! for the provider status table: one row per demo provider with its status cells.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use regex::Regex;

mod common;
use common::demo::Demo;

const CHROMIUM: &str = "/usr/bin/chromium";
const DEMO_PROVIDERS: &[&str] = &["maxapi", "apimall"];
const CELLS: &[&str] = &["name", "up", "last-poll", "tasks", "last-error"];

#[test]
fn landing_page_renders_a_row_per_provider_in_chromium() {
    let demo = Demo::start();
    let url = demo.landing_url.clone();

    // The table exists from the start; wait until every provider has been polled once, so the
    // rows show a real status (the demo needs a few seconds).
    let deadline = Instant::now() + Duration::from_secs(45);
    let rows = loop {
        let dom = dump_dom(&url);
        let table = providers_table(&dom).unwrap_or_else(|| {
            panic!("no <table id=\"providers\"> in the page Chromium rendered:\n{dom}")
        });
        let rows = provider_rows(table);
        let polled = rows.iter().all(|r| {
            r.cells
                .get("last-poll")
                .is_some_and(|c| !c.trim().is_empty() && !c.contains("never"))
        });
        if polled && rows.len() >= DEMO_PROVIDERS.len() {
            break rows;
        }
        assert!(
            Instant::now() < deadline,
            "providers not all polled after 45 s; rows: {rows:#?}"
        );
        std::thread::sleep(Duration::from_secs(2));
    };

    for name in DEMO_PROVIDERS {
        let matching: Vec<&Row> = rows.iter().filter(|r| r.provider == *name).collect();
        assert_eq!(
            matching.len(),
            1,
            "expected one row for provider {name}: {rows:#?}"
        );
        let row = matching[0];
        for cell in CELLS {
            assert!(
                row.cells.contains_key(*cell),
                "row {name} has no cell of class {cell}: {row:#?}"
            );
        }
        assert_eq!(row.cells["name"].trim(), *name, "name cell of row {name}");
        assert!(
            ["up", "down"].contains(&row.cells["up"].trim()),
            "up cell of row {name} says neither up nor down: {:?}",
            row.cells["up"]
        );
        assert!(
            row.cells["tasks"]
                .trim()
                .chars()
                .any(|c| c.is_ascii_digit()),
            "tasks cell of row {name} shows no count: {:?}",
            row.cells["tasks"]
        );
    }
    assert_eq!(
        rows.len(),
        DEMO_PROVIDERS.len(),
        "the demo has exactly the providers {DEMO_PROVIDERS:?}: {rows:#?}"
    );
    drop(demo);
}

#[derive(Debug)]
struct Row {
    provider: String,
    /// class -> text content (tags removed)
    cells: std::collections::BTreeMap<String, String>,
}

/// The inner HTML of `<table id="providers">`.
fn providers_table(dom: &str) -> Option<&str> {
    let open = Regex::new(r#"<table\b[^>]*\bid="providers"[^>]*>"#).expect("regex");
    let start = open.find(dom)?.end();
    let end = dom[start..].find("</table>")? + start;
    Some(&dom[start..end])
}

fn provider_rows(table: &str) -> Vec<Row> {
    let row_re = Regex::new(r#"(?s)<tr\b([^>]*)>(.*?)</tr>"#).expect("regex");
    let class_re = Regex::new(r#"\bclass="([^"]*)""#).expect("regex");
    let provider_re = Regex::new(r#"\bdata-provider="([^"]*)""#).expect("regex");
    let cell_re = Regex::new(r#"(?s)<td\b([^>]*)>(.*?)</td>"#).expect("regex");
    let tag_re = Regex::new(r"<[^>]*>").expect("regex");
    let mut rows = Vec::new();
    for row in row_re.captures_iter(table) {
        let attrs = &row[1];
        let is_provider = class_re
            .captures(attrs)
            .is_some_and(|c| c[1].split_whitespace().any(|class| class == "provider"));
        if !is_provider {
            continue;
        }
        let provider = provider_re
            .captures(attrs)
            .map(|c| unescape(&c[1]))
            .unwrap_or_default();
        let mut cells = std::collections::BTreeMap::new();
        for cell in cell_re.captures_iter(&row[2]) {
            let text = unescape(&tag_re.replace_all(&cell[2], ""));
            if let Some(classes) = class_re.captures(&cell[1]) {
                for class in classes[1].split_whitespace() {
                    cells.insert(class.to_string(), text.clone());
                }
            }
        }
        rows.push(Row { provider, cells });
    }
    rows
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&nbsp;", " ")
        .replace("&amp;", "&")
}

/// The DOM headless Chromium built for `url`, serialized.
fn dump_dom(url: &str) -> String {
    let profile = tempfile::tempdir().expect("temp dir");
    let mut child = Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {CHROMIUM} (Debian package chromium): {e}"));
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for chromium") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "chromium did not finish within 60 s: {}",
                err.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let dom = out.join().unwrap_or_default();
    let log = err.join().unwrap_or_default();
    assert!(status.success(), "chromium failed ({status}):\n{log}");
    assert!(!dom.trim().is_empty(), "chromium printed no DOM:\n{log}");
    dom
}

#[test]
fn provider_rows_are_read_from_the_table() {
    let dom = r#"<html><body><table id="providers"><thead><tr><th>provider</th></tr></thead><tbody>
<tr class="provider" data-provider="maxapi"><td class="name">maxapi</td><td class="up"><span>up</span></td>
<td class="last-poll">3 s ago</td><td class="tasks">12</td><td class="last-error"></td></tr>
<tr class="provider down" data-provider="a&amp;b"><td class="name">a&amp;b</td></tr>
</tbody></table></body></html>"#;
    let rows = provider_rows(providers_table(dom).expect("table"));
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].provider, "maxapi");
    assert_eq!(rows[0].cells["up"], "up");
    assert_eq!(rows[0].cells["tasks"], "12");
    assert_eq!(rows[0].cells["last-error"], "");
    assert_eq!(rows[1].provider, "a&b");
}

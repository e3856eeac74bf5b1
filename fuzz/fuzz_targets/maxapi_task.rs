//! Fuzz target: maxapi get-task answers (status byte + body).
//! Any input must give a value or an error: no panic, no runaway allocation.
#![no_main]

use genai_task_exporter::providers::maxapi::Maxapi;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&status, body)) = data.split_first() else {
        return;
    };
    let adapter = Maxapi::new();
    if let Ok(observation) = adapter.parse_task(status_of(status), body) {
        // Whatever id came back must make a request path.
        let _ = adapter.task_path(&observation.task_id);
    }
});

/// Spreads one byte over the HTTP statuses that matter (2xx, 4xx, 5xx, a redirect).
fn status_of(byte: u8) -> u16 {
    const STATUSES: [u16; 12] = [200, 201, 204, 400, 401, 403, 404, 429, 500, 502, 503, 302];
    STATUSES[usize::from(byte) % STATUSES.len()]
}

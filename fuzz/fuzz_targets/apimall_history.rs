//! Fuzz target: apimall history pages (status byte + limit byte + body).
//! Any input must give a value or an error: no panic, no runaway allocation.
#![no_main]

use genai_task_exporter::providers::FailureRules;
use genai_task_exporter::providers::apimall::Apimall;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [status, limit, body @ ..] = data else {
        return;
    };
    let adapter = Apimall::new(FailureRules::defaults());
    if let Ok(page) = adapter.parse_history(status_of(*status), body, u32::from(*limit)) {
        for observation in &page.items {
            let _ = adapter.task_path(&observation.task_id);
        }
    }
});

/// Spreads one byte over the HTTP statuses that matter (2xx, 4xx, 5xx, a redirect).
fn status_of(byte: u8) -> u16 {
    const STATUSES: [u16; 12] = [200, 201, 204, 400, 401, 403, 404, 429, 500, 502, 503, 302];
    STATUSES[usize::from(byte) % STATUSES.len()]
}

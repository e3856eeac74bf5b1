//! Fuzz target: maxapi callback bodies.
//! Any input must give a value or an error: no panic, no runaway allocation.
#![no_main]

use genai_task_exporter::providers::maxapi::Maxapi;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    let adapter = Maxapi::new();
    if let Ok(observation) = adapter.parse_webhook(body) {
        let _ = adapter.task_path(&observation.task_id);
    }
});

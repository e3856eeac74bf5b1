//! Fuzz target: the web configuration parser (YAML text).
//! Any input must give a value or an error: no panic, no runaway allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = genai_task_exporter::web::config::check_text(text);
    }
});

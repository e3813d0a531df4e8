//! The plugin configuration parser with arbitrary bytes: it must never panic, and a rejection
//! must stay the one log line docs/README.md promises (no line breaks smuggled in by a key).
#![no_main]

use handoff::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match Config::parse(data) {
        Ok(config) => {
            let summary = config.summary();
            assert!(!summary.contains('\n'), "summary spans lines: {summary:?}");
        }
        Err(e) => {
            let line = e.to_string();
            assert!(
                !line.contains('\n') && !line.contains('\r'),
                "error spans lines: {line:?}"
            );
        }
    }
});

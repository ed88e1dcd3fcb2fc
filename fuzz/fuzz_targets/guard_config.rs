//! Any text: the guard's config parser accepts or refuses with a message, never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;
use nodekeeper_guard::config::Config;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(c) = Config::parse(text) {
            assert!(c.boot.state_dir.is_absolute());
        } else if let Err(message) = Config::parse(text) {
            assert!(!message.is_empty());
        }
    }
});

//! Any text: `instance import`'s parser returns items or a line-numbered error, never panics;
//! every line number it reports exists in the input. Its domain XML is read for the size (a
//! policy's `vcpus` and `memory_mib`), its policy's group checked.
#![no_main]
use libfuzzer_sys::fuzz_target;
use nodekeeper_provisioner::admin::parse_jsonl;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let lines = text.lines().count().max(1);
    match parse_jsonl(text) {
        Ok(items) => {
            for (line, item, policy) in &items {
                assert!(*line >= 1 && *line <= lines);
                assert!(item.generation.0 >= 1);
                assert!(policy.anti_affinity.as_deref().is_none_or(nodekeeper_store::valid_group));
                assert_eq!(policy.relocations, 0);
            }
        }
        Err(e) => assert!(e.line >= 1 && e.line <= lines),
    }
});

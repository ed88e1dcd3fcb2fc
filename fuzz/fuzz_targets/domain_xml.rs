//! Any bytes: the domain XML reader returns a result, never panics, and what it accepts is
//! well-formed (a non-empty name, a UUID that round-trips through its canonical form).
#![no_main]
use libfuzzer_sys::fuzz_target;
use nodekeeper_guard::domain::parse_domain_xml;
use nodekeeper_store::InstanceId;

fuzz_target!(|data: &[u8]| {
    if let Ok(meta) = parse_domain_xml(data) {
        assert!(!meta.name.trim().is_empty());
        assert_eq!(meta.uuid.to_string().parse::<InstanceId>().ok(), Some(meta.uuid));
    }
});

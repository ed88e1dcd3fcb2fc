//! What an operator or a node hands the fencing levels: PDU outlet URLs (`host outlets`:
//! Redfish or SNMP, with OIDs and values in the query) and a guard's fencing profile (JSON, as
//! `PUT …/guard/fencing` takes it) — accepted or refused, never a panic; an accepted SNMP URL
//! names its outlet by number, and a profile that says nothing of a watchdog is never one
//! watchdog fencing accepts.
#![no_main]
use libfuzzer_sys::fuzz_target;
use nodekeeper_provisioner::bmc::pdu;
use nodekeeper_provisioner::recovery::watchdog;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if pdu::check_url(&text).is_ok() && text.starts_with("snmp://") {
        let path = text.trim_start_matches("snmp://").split('?').next().unwrap_or_default();
        let outlet = path.split_once('/').map(|(_, o)| o.trim_end_matches('/')).unwrap_or_default();
        assert!(!outlet.is_empty() && outlet.bytes().all(|b| b.is_ascii_digit()), "{text}");
    }
    if let Ok(p) = serde_json::from_slice::<nodekeeper_store::FencingProfile>(data) {
        let refused = watchdog::refusal(Some(&p));
        if p.watchdog_timeout_ms.is_none() || !p.self_fence || p.quorum_cell.as_ref().is_none_or(Vec::is_empty) {
            assert!(refused.is_some(), "{p:?}");
        }
    }
});

//! What the admin API takes from the network before any role is checked or anything is
//! written: bearer tokens, `[http.auth] metrics_from` networks, and the JSON bodies of the
//! admin calls — accepted or refused, never a panic; an accepted token names a valid token
//! name and a 64-hex secret; an accepted network contains its own address.
#![no_main]
use libfuzzer_sys::fuzz_target;
use nodekeeper_provisioner::admin;
use nodekeeper_provisioner::config::Cidr;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Some((name, secret)) = admin::split_admin_token(&text) {
        assert!(nodekeeper_store::valid_token_name(name), "{text}");
        assert!(secret.len() == 64 && secret.bytes().all(|b| b.is_ascii_hexdigit()), "{text}");
    }
    if let Ok(net) = text.parse::<Cidr>() {
        let addr: std::net::IpAddr = text.split('/').next().unwrap_or_default().parse().expect("parsed before");
        assert!(net.contains(addr), "{text}");
    }
    let _ = serde_json::from_slice::<admin::HostAdd>(data);
    let _ = serde_json::from_slice::<admin::HostSet>(data);
    let _ = serde_json::from_slice::<admin::Evacuate>(data);
    let _ = serde_json::from_slice::<admin::InstanceSet>(data);
    let _ = serde_json::from_slice::<admin::TokenCreate>(data);
    if let Ok(p) = serde_json::from_slice::<admin::Power>(data) {
        let _ = admin::power_action(&p.action);
    }
});

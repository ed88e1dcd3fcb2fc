//! What reaches the deploy agent from outside — its kernel command line, URLs, and a CA file
//! fetched over plain HTTP — is accepted or refused with a message, never a panic; a CA is
//! trusted only when its digest is the pinned one.
#![no_main]
use libfuzzer_sys::fuzz_target;
use nodekeeper_deploy::{split_url, Params, Tls};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(p) = Params::from_cmdline(&text) {
        assert!(!p.server.is_empty() && !p.token.is_empty());
        let _ = split_url(&p.image);
    }
    if let Ok(url) = split_url(&text) {
        assert!(url.authority.contains(':') && url.path.starts_with('/'));
        assert!(!url.host.is_empty());
    }
    // Anything as a CA file: refused unless it parses and matches the pin (a pin of zeros
    // never does).
    assert!(Tls::from_pinned_pem(data, &"0".repeat(64)).is_err());
});

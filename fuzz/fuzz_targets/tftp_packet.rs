//! Any datagram: the TFTP parser returns a packet or an error, never panics; a read request
//! it accepts has a mode and well-formed options.
#![no_main]
use libfuzzer_sys::fuzz_target;
use nodekeeper_provisioner::tftp::packet::{parse, ClientPacket};

fuzz_target!(|data: &[u8]| {
    if let Ok(ClientPacket::Read { mode, options, .. }) = parse(data) {
        assert_eq!(mode, mode.to_ascii_lowercase());
        assert!(options.iter().all(|(name, _)| *name == name.to_ascii_lowercase()));
    }
});

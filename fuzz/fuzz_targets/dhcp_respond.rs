//! Any datagram that dhcproto decodes: our responder decides without panicking, in both
//! modes, on both ports, and never offers an address outside the pool or the host's own.
//! Run with `-O` (release, as deployed): dhcproto has a `debug_assert!` on option 94 that
//! hostile input trips; the server catches it (`dhcp::decode`), libFuzzer's abort cannot.
#![no_main]
use std::collections::HashMap;
use std::net::Ipv4Addr;

use dhcproto::{Decodable, Decoder};
use dhcproto::v4::Message;
use libfuzzer_sys::fuzz_target;
use nodekeeper_provisioner::dhcp::logic::{respond, Decision, KnownHost, Settings};
use nodekeeper_provisioner::dhcp::pool::Pool;
use nodekeeper_store::MacAddr;

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = Message::decode(&mut Decoder::new(data)) else { return };
    let hosts: HashMap<MacAddr, KnownHost> = [(
        MacAddr([0x52, 0x54, 0, 0, 0, 1]),
        KnownHost { name: "node-a".parse().expect("name"), ip: Some(Ipv4Addr::new(10, 20, 0, 11)), secure_boot: false },
    )]
    .into_iter()
    .collect();
    for proxy in [false, true] {
        for allow_unknown in [false, true] {
            let settings = Settings {
                proxy,
                server_ip: Ipv4Addr::new(10, 20, 0, 1),
                netmask: Ipv4Addr::new(255, 255, 255, 0),
                router: None,
                dns: vec![],
                lease_secs: 3600,
                allow_unknown,
                public_url: "http://10.20.0.1:8080".into(),
                uefi_boot_file: "ipxe.efi".into(),
            };
            let mut pool = Pool::new(Ipv4Addr::new(10, 20, 0, 100), Ipv4Addr::new(10, 20, 0, 199));
            for port_4011 in [false, true] {
                if let Decision::Reply(reply, _) | Decision::Ack(reply, _, _) = respond(&msg, &settings, &hosts, &mut pool, 0, port_4011) {
                    let y = u32::from(reply.yiaddr());
                    let ok = y == 0 || (u32::from(Ipv4Addr::new(10, 20, 0, 100))..=u32::from(Ipv4Addr::new(10, 20, 0, 199))).contains(&y) || reply.yiaddr() == Ipv4Addr::new(10, 20, 0, 11);
                    assert!(ok, "offered {}", reply.yiaddr());
                }
            }
        }
    }
});

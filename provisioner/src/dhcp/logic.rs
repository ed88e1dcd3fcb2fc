//! What to answer to a DHCP packet: a pure function of the packet, the server's settings,
//! the known hosts and the pool. The socket code in `mod.rs` only moves bytes.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use dhcproto::v4::{DhcpOption, HType, Message, MessageType, Opcode, OptionCode};
use nodekeeper_store::{HostName, Lease, MacAddr};

use super::pool::{Pool, Refused};

/// Server settings, fixed for a run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Full DHCP or proxyDHCP.
    pub proxy: bool,
    /// This server's address (next-server, server identifier).
    pub server_ip: Ipv4Addr,
    /// Subnet mask of the provisioning network.
    pub netmask: Ipv4Addr,
    /// Default gateway.
    pub router: Option<Ipv4Addr>,
    /// DNS servers.
    pub dns: Vec<Ipv4Addr>,
    /// Lease time in seconds.
    pub lease_secs: u32,
    /// Answer MACs that are not in the host table.
    pub allow_unknown: bool,
    /// `http://SERVER:PORT`, for chaining iPXE to `/boot/MAC.ipxe`.
    pub public_url: String,
    /// What a UEFI x86-64 PXE ROM (option 93 types 7 and 9) loads: `ipxe.efi`, or
    /// `snponly.efi` (iPXE driving the NIC through the firmware's own driver).
    pub uefi_boot_file: String,
}

/// What a UEFI PXE ROM of a Secure Boot host loads: Debian's shim, signed by Microsoft's UEFI
/// CA; it loads `grubx64.efi` (Debian's signed GRUB) from the same server.
pub const SECURE_BOOT_FILE: &str = "shimx64.efi";

/// A known host's DHCP-relevant facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownHost {
    /// Its name (option 12).
    pub name: HostName,
    /// Its fixed address, if any.
    pub ip: Option<Ipv4Addr>,
    /// Its firmware enforces Secure Boot: UEFI PXE gets the signed chain, not iPXE.
    pub secure_boot: bool,
}

/// Where a reply goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    /// Limited broadcast on the interface (client has no address yet).
    Broadcast,
    /// Unicast to this address, port 68 (a client renewing with `ciaddr`).
    Client(Ipv4Addr),
    /// A relay agent (`giaddr`), port 67.
    Relay(Ipv4Addr),
}

/// The decision for one packet.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Send this reply.
    Reply(Box<Message>, Dest),
    /// Persist the lease, then send the ACK.
    Ack(Box<Message>, Dest, Lease),
    /// The client released its lease: forget it.
    Release(MacAddr),
    /// No answer, and why (counted as a drop).
    Drop(&'static str),
}

/// What a client's vendor class (option 60) says it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientKind {
    /// A PXE ROM (`PXEClient…`): a file name, loaded over TFTP from `siaddr`.
    Pxe,
    /// UEFI HTTP boot (`HTTPClient…`, UEFI 2.x §24.7): a full `http://` URL, and `HTTPClient`
    /// echoed in option 60, or the firmware ignores the offer.
    Http,
    /// Anything else (an OS's DHCP client, iPXE sending no class): an address only, unless
    /// it is iPXE (user class).
    Plain,
}

/// The kind of client `msg` comes from.
pub fn client_kind(msg: &Message) -> ClientKind {
    match msg.opts().get(OptionCode::ClassIdentifier) {
        Some(DhcpOption::ClassIdentifier(v)) if v.starts_with(b"PXEClient") => ClientKind::Pxe,
        Some(DhcpOption::ClassIdentifier(v)) if v.starts_with(b"HTTPClient") => ClientKind::Http,
        _ => ClientKind::Plain,
    }
}

/// Where the HTTP server serves the boot loaders of the TFTP root (for UEFI HTTP boot).
pub const LOADERS_PATH: &str = "/boot/loaders";

/// The boot file for a client: iPXE (user class `iPXE`) chains to its HTTP script; a PXE
/// ROM gets the iPXE binary for its architecture (option 93), or — a UEFI host whose record
/// says Secure Boot — the signed shim, since Debian ships no signed iPXE; a UEFI HTTP boot
/// client gets the same loader as a full URL on the HTTP server.
pub fn boot_file(msg: &Message, mac: MacAddr, host: Option<&KnownHost>, settings: &Settings) -> Option<String> {
    let public_url = settings.public_url.trim_end_matches('/');
    let user_class = match msg.opts().get(OptionCode::UserClass) {
        Some(DhcpOption::UserClass(uc)) => uc.clone(),
        _ => Vec::new(),
    };
    // RFC 3004 encodes user classes as length-prefixed strings; iPXE sends the raw "iPXE".
    if user_class == b"iPXE" || user_class.get(1..) == Some(b"iPXE".as_slice()) {
        // A Secure Boot host boots through shim and GRUB: an iPXE in its NIC's option ROM
        // (QEMU's, some vendors') gets nothing to boot and hands back to the firmware, whose
        // own PXE then asks as a UEFI client.
        if host.is_some_and(|h| h.secure_boot) {
            return None;
        }
        return Some(format!("{public_url}/boot/{mac}.ipxe"));
    }
    let kind = client_kind(msg);
    let Some(DhcpOption::ClientSystemArchitecture(arch)) = msg.opts().get(OptionCode::ClientSystemArchitecture) else {
        // Not a PXE client (a plain DHCP client): an address only.
        return None;
    };
    let secure = host.is_some_and(|h| h.secure_boot);
    // RFC 4578 and the IANA registry: 0 BIOS; 7 and 9 x64 UEFI; 11 arm64 UEFI; 16 x64 UEFI
    // HTTP; 19 arm64 UEFI HTTP. An HTTP client that sends a PXE architecture is taken by its
    // class; 32-bit UEFI (6, 15), BIOS over HTTP (20) and the rest have no loader here.
    let file = match (u16::from(*arch), kind) {
        (0, ClientKind::Pxe | ClientKind::Plain) => "undionly.kpxe",
        (7 | 9, ClientKind::Pxe | ClientKind::Plain) | (7 | 9 | 16, ClientKind::Http) if secure => SECURE_BOOT_FILE,
        (7 | 9, ClientKind::Pxe | ClientKind::Plain) | (7 | 9 | 16, ClientKind::Http) => &settings.uefi_boot_file,
        (11, ClientKind::Pxe | ClientKind::Plain) | (11 | 19, ClientKind::Http) => "ipxe-arm64.efi",
        _ => return None,
    };
    Some(match kind {
        ClientKind::Http => format!("{public_url}{LOADERS_PATH}/{file}"),
        ClientKind::Pxe | ClientKind::Plain => file.to_owned(),
    })
}

fn client_mac(msg: &Message) -> Option<MacAddr> {
    // Check hlen before touching chaddr: dhcproto 0.12's `chaddr()` slices `[..hlen]` of a
    // 16-byte array and panics on a packet claiming more (found by `make fuzz`).
    if msg.opcode() != Opcode::BootRequest || msg.htype() != HType::Eth || msg.hlen() != 6 {
        return None;
    }
    let c = msg.chaddr();
    (c.len() >= 6).then(|| MacAddr([c[0], c[1], c[2], c[3], c[4], c[5]]))
}

/// Decides what to answer. `port_4011` marks a packet that came in on the proxyDHCP port.
pub fn respond(
    msg: &Message,
    settings: &Settings,
    hosts: &HashMap<MacAddr, KnownHost>,
    pool: &mut Pool,
    now_ms: i64,
    port_4011: bool,
) -> Decision {
    let Some(mac) = client_mac(msg) else { return Decision::Drop("not an Ethernet BOOTREQUEST") };
    let Some(kind) = msg.opts().msg_type() else { return Decision::Drop("no message type") };
    let host = hosts.get(&mac);
    if host.is_none() && !settings.allow_unknown {
        return Decision::Drop("unknown MAC");
    }
    let requested = match msg.opts().get(OptionCode::RequestedIpAddress) {
        Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
        _ => None,
    };
    let server_id = match msg.opts().get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
        _ => None,
    };
    let fixed = host.and_then(|h| h.ip);
    let boot = boot_file(msg, mac, host, settings);

    if settings.proxy {
        // proxyDHCP: boot information only, to PXE clients; the other server gives addresses.
        // UEFI HTTP boot takes a proxy offer too (EDK2's HttpBootDxe pairs it with the
        // address offer); it asks for nothing on port 4011.
        if client_kind(msg) == ClientKind::Plain || boot.is_none() {
            return Decision::Drop("proxy: not a PXE or HTTP boot client");
        }
        let reply_type = match (kind, port_4011) {
            (MessageType::Discover, false) => MessageType::Offer,
            (MessageType::Request, true) => MessageType::Ack,
            _ => return Decision::Drop("proxy: not for us"),
        };
        let reply = build(msg, settings, reply_type, Ipv4Addr::UNSPECIFIED, host, boot.as_deref(), false);
        let dest =
            if port_4011 && !msg.ciaddr().is_unspecified() { Dest::Client(msg.ciaddr()) } else { destination(msg) };
        return Decision::Reply(Box::new(reply), dest);
    }
    if port_4011 {
        return Decision::Drop("full mode: nothing on port 4011");
    }

    match kind {
        MessageType::Discover => match pool.offer(mac, fixed, requested, now_ms) {
            Some(ip) => Decision::Reply(
                Box::new(build(msg, settings, MessageType::Offer, ip, host, boot.as_deref(), true)),
                destination(msg),
            ),
            None => Decision::Drop("no address available"),
        },
        MessageType::Request => {
            // Selecting another server's offer: let ours go.
            if server_id.is_some_and(|s| s != settings.server_ip) {
                if let Some(ip) = requested {
                    pool.release(mac, ip);
                }
                return Decision::Drop("client chose another server");
            }
            let ip = requested.or_else(|| (!msg.ciaddr().is_unspecified()).then_some(msg.ciaddr()));
            let Some(ip) = ip else { return Decision::Drop("REQUEST without an address") };
            match pool.bind(mac, ip, fixed, i64::from(settings.lease_secs) * 1000, now_ms) {
                Ok(lease) => {
                    let ack = build(msg, settings, MessageType::Ack, ip, host, boot.as_deref(), true);
                    Decision::Ack(Box::new(ack), destination(msg), lease)
                }
                Err(Refused::NotOurs | Refused::Taken) => {
                    // Authoritative for this network: tell the client to start over.
                    let mut nak = Message::default();
                    nak.set_opcode(Opcode::BootReply)
                        .set_htype(HType::Eth)
                        .set_xid(msg.xid())
                        .set_flags(msg.flags().set_broadcast())
                        .set_giaddr(msg.giaddr())
                        .set_chaddr(msg.chaddr());
                    nak.opts_mut().insert(DhcpOption::MessageType(MessageType::Nak));
                    nak.opts_mut().insert(DhcpOption::ServerIdentifier(settings.server_ip));
                    let dest = if msg.giaddr().is_unspecified() { Dest::Broadcast } else { Dest::Relay(msg.giaddr()) };
                    Decision::Reply(Box::new(nak), dest)
                }
            }
        }
        MessageType::Release => {
            if pool.release(mac, msg.ciaddr()) {
                Decision::Release(mac)
            } else {
                Decision::Drop("release of an address the client does not hold")
            }
        }
        MessageType::Decline => match requested {
            Some(ip) if pool.decline(mac, ip, now_ms) => Decision::Drop("decline recorded"),
            Some(_) => Decision::Drop("decline refused: not an address of this client's, or too many declines"),
            None => Decision::Drop("decline without an address"),
        },
        MessageType::Inform => {
            let reply = build(msg, settings, MessageType::Ack, Ipv4Addr::UNSPECIFIED, host, boot.as_deref(), false);
            Decision::Reply(Box::new(reply), Dest::Client(msg.ciaddr()))
        }
        _ => Decision::Drop("unexpected message type"),
    }
}

/// RFC 2131 §4.1: relay → giaddr; address already configured → unicast; else broadcast
/// (a client without an address cannot take a unicast without an ARP entry).
fn destination(msg: &Message) -> Dest {
    if !msg.giaddr().is_unspecified() {
        Dest::Relay(msg.giaddr())
    } else if !msg.ciaddr().is_unspecified() {
        Dest::Client(msg.ciaddr())
    } else {
        Dest::Broadcast
    }
}

fn build(
    req: &Message,
    s: &Settings,
    kind: MessageType,
    yiaddr: Ipv4Addr,
    host: Option<&KnownHost>,
    boot: Option<&str>,
    with_lease: bool,
) -> Message {
    let mut m = Message::default();
    m.set_opcode(Opcode::BootReply)
        .set_htype(HType::Eth)
        .set_xid(req.xid())
        .set_flags(req.flags())
        .set_ciaddr(req.ciaddr())
        .set_yiaddr(yiaddr)
        .set_siaddr(s.server_ip)
        .set_giaddr(req.giaddr())
        .set_chaddr(req.chaddr());
    let o = m.opts_mut();
    o.insert(DhcpOption::MessageType(kind));
    o.insert(DhcpOption::ServerIdentifier(s.server_ip));
    if with_lease {
        o.insert(DhcpOption::AddressLeaseTime(s.lease_secs));
        o.insert(DhcpOption::Renewal(s.lease_secs / 2));
        o.insert(DhcpOption::Rebinding(s.lease_secs / 8 * 7));
        o.insert(DhcpOption::SubnetMask(s.netmask));
        if let Some(r) = s.router {
            o.insert(DhcpOption::Router(vec![r]));
        }
        if !s.dns.is_empty() {
            o.insert(DhcpOption::DomainNameServer(s.dns.clone()));
        }
        if let Some(h) = host {
            o.insert(DhcpOption::Hostname(h.name.to_string()));
        }
    }
    if let Some(file) = boot {
        if file.len() < 128 {
            m.set_fname_str(file);
        }
        let o = m.opts_mut();
        o.insert(DhcpOption::BootfileName(file.as_bytes().to_vec()));
        match client_kind(req) {
            ClientKind::Pxe => {
                o.insert(DhcpOption::TFTPServerName(s.server_ip.to_string().into_bytes()));
                o.insert(DhcpOption::ClassIdentifier(b"PXEClient".to_vec()));
                // PXE discovery control = 8: boot the file named here, no boot-server discovery.
                o.insert(DhcpOption::VendorExtensions(vec![6, 1, 8, 255]));
            }
            // The URL is the whole answer; without the echo the firmware drops the offer.
            ClientKind::Http => {
                o.insert(DhcpOption::ClassIdentifier(b"HTTPClient".to_vec()));
            }
            ClientKind::Plain => {
                o.insert(DhcpOption::TFTPServerName(s.server_ip.to_string().into_bytes()));
            }
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use dhcproto::Decodable;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x0a];

    fn settings(proxy: bool, allow_unknown: bool) -> Settings {
        Settings {
            proxy,
            server_ip: Ipv4Addr::new(10, 20, 0, 1),
            netmask: Ipv4Addr::new(255, 255, 255, 0),
            router: Some(Ipv4Addr::new(10, 20, 0, 1)),
            dns: vec![Ipv4Addr::new(10, 20, 0, 1)],
            lease_secs: 3600,
            allow_unknown,
            public_url: "http://10.20.0.1:8080".into(),
            uefi_boot_file: "ipxe.efi".into(),
        }
    }

    fn hosts(fixed: Option<Ipv4Addr>) -> HashMap<MacAddr, KnownHost> {
        [(MacAddr(MAC), KnownHost { name: "node-a".parse().expect("name"), ip: fixed, secure_boot: false })]
            .into_iter()
            .collect()
    }

    fn request(kind: MessageType, mac: [u8; 6], opts: &[DhcpOption]) -> Message {
        let mut m = Message::default();
        m.set_opcode(Opcode::BootRequest).set_htype(HType::Eth).set_xid(0x1234).set_chaddr(&mac);
        m.opts_mut().insert(DhcpOption::MessageType(kind));
        for o in opts {
            m.opts_mut().insert(o.clone());
        }
        m
    }

    fn pxe(arch: u16) -> Vec<DhcpOption> {
        vec![
            DhcpOption::ClassIdentifier(b"PXEClient:Arch:00000:UNDI:002001".to_vec()),
            DhcpOption::ClientSystemArchitecture(arch.into()),
        ]
    }

    fn pool() -> Pool {
        Pool::new(Ipv4Addr::new(10, 20, 0, 100), Ipv4Addr::new(10, 20, 0, 199))
    }

    #[test]
    fn boot_files_by_architecture_and_ipxe_chaining() {
        let mac = MacAddr(MAC);
        let s = settings(false, false);
        let plain = KnownHost { name: "node-a".parse().expect("name"), ip: None, secure_boot: false };
        let secure = KnownHost { secure_boot: true, ..plain.clone() };
        for (arch, want, want_secure) in [
            (0u16, Some("undionly.kpxe"), Some("undionly.kpxe")),
            (7, Some("ipxe.efi"), Some("shimx64.efi")),
            (9, Some("ipxe.efi"), Some("shimx64.efi")),
            (11, Some("ipxe-arm64.efi"), Some("ipxe-arm64.efi")),
            (6, None, None),
        ] {
            let msg = request(MessageType::Discover, MAC, &pxe(arch));
            assert_eq!(boot_file(&msg, mac, Some(&plain), &s).as_deref(), want, "arch {arch}");
            assert_eq!(boot_file(&msg, mac, None, &s).as_deref(), want, "arch {arch}, unknown host");
            assert_eq!(boot_file(&msg, mac, Some(&secure), &s).as_deref(), want_secure, "arch {arch}, Secure Boot");
        }
        // snponly.efi when configured.
        let snp = Settings { uefi_boot_file: "snponly.efi".into(), ..settings(false, false) };
        let msg = request(MessageType::Discover, MAC, &pxe(7));
        assert_eq!(boot_file(&msg, mac, Some(&plain), &snp).as_deref(), Some("snponly.efi"));
        let ipxe = request(
            MessageType::Discover,
            MAC,
            &[DhcpOption::UserClass(b"iPXE".to_vec()), DhcpOption::ClientSystemArchitecture(0u16.into())],
        );
        let url = Some("http://10.20.0.1:8080/boot/52:54:00:00:00:0a.ipxe");
        assert_eq!(boot_file(&ipxe, mac, Some(&plain), &s).as_deref(), url);
        assert_eq!(boot_file(&ipxe, mac, Some(&secure), &s), None, "no iPXE for a Secure Boot host");
        assert_eq!(boot_file(&request(MessageType::Discover, MAC, &[]), mac, Some(&plain), &s), None);
    }

    /// Option 60 as firmware sends it (UEFI 2.x §24.7 for HTTP boot, PXE 2.1 for PXE).
    fn class(kind: ClientKind, arch: u16) -> Option<DhcpOption> {
        match kind {
            ClientKind::Pxe => Some(format!("PXEClient:Arch:{arch:05}:UNDI:003016")),
            ClientKind::Http => Some(format!("HTTPClient:Arch:{arch:05}:UNDI:003016")),
            ClientKind::Plain => None,
        }
        .map(|c| DhcpOption::ClassIdentifier(c.into_bytes()))
    }

    #[test]
    fn every_architecture_and_vendor_class() {
        use ClientKind::*;
        let mac = MacAddr(MAC);
        let plain = KnownHost { name: "node-a".parse().expect("name"), ip: None, secure_boot: false };
        let secure = KnownHost { secure_boot: true, ..plain.clone() };
        let url = |f: &str| format!("http://10.20.0.1:8080/boot/loaders/{f}");
        // (arch, class, plain host, Secure Boot host)
        let table: Vec<(u16, ClientKind, Option<String>, Option<String>)> = vec![
            (0, Pxe, Some("undionly.kpxe".into()), Some("undionly.kpxe".into())),
            (0, Plain, Some("undionly.kpxe".into()), Some("undionly.kpxe".into())),
            (0, Http, None, None),
            (6, Pxe, None, None),
            (6, Http, None, None),
            (7, Pxe, Some("ipxe.efi".into()), Some("shimx64.efi".into())),
            (7, Plain, Some("ipxe.efi".into()), Some("shimx64.efi".into())),
            (7, Http, Some(url("ipxe.efi")), Some(url("shimx64.efi"))),
            (9, Pxe, Some("ipxe.efi".into()), Some("shimx64.efi".into())),
            (9, Http, Some(url("ipxe.efi")), Some(url("shimx64.efi"))),
            (10, Pxe, None, None),
            (11, Pxe, Some("ipxe-arm64.efi".into()), Some("ipxe-arm64.efi".into())),
            (11, Http, Some(url("ipxe-arm64.efi")), Some(url("ipxe-arm64.efi"))),
            (15, Http, None, None),
            (16, Http, Some(url("ipxe.efi")), Some(url("shimx64.efi"))),
            // An HTTP architecture with a PXE class is not an HTTP client: no TFTP name for it.
            (16, Pxe, None, None),
            (16, Plain, None, None),
            (19, Http, Some(url("ipxe-arm64.efi")), Some(url("ipxe-arm64.efi"))),
            (19, Pxe, None, None),
            (20, Http, None, None),
            (28, Http, None, None),
        ];
        let full = settings(false, false);
        for (arch, kind, want, want_secure) in &table {
            let mut opts = vec![DhcpOption::ClientSystemArchitecture((*arch).into())];
            opts.extend(class(*kind, *arch));
            let msg = request(MessageType::Discover, MAC, &opts);
            let what = format!("arch {arch}, {kind:?}");
            assert_eq!(boot_file(&msg, mac, Some(&plain), &full), *want, "{what}");
            assert_eq!(boot_file(&msg, mac, None, &full), *want, "{what}, unknown host");
            assert_eq!(boot_file(&msg, mac, Some(&secure), &full), *want_secure, "{what}, Secure Boot");
            // The whole exchange, full and proxy: the boot file in option 67, option 60 echoed
            // as the client's kind requires, PXE's discovery control only for PXE.
            for proxy in [false, true] {
                let s = settings(proxy, false);
                let (h, mut p) = (hosts(None), pool());
                let decision = respond(&msg, &s, &h, &mut p, 0, false);
                let mode = if proxy { "proxy" } else { "full" };
                let Decision::Reply(offer, _) = decision else {
                    assert!(proxy && (want.is_none() || *kind == Plain), "{what}, {mode}: {decision:?}");
                    continue;
                };
                let file = offer.opts().get(OptionCode::BootfileName).map(|o| match o {
                    DhcpOption::BootfileName(f) => String::from_utf8_lossy(f).into_owned(),
                    _ => unreachable!(),
                });
                assert_eq!(file, *want, "{what}, {mode}");
                let echoed = match offer.opts().get(OptionCode::ClassIdentifier) {
                    Some(DhcpOption::ClassIdentifier(c)) => Some(String::from_utf8_lossy(c).into_owned()),
                    _ => None,
                };
                let want_echo = match (kind, want.is_some()) {
                    (Pxe, true) => Some("PXEClient".to_owned()),
                    (Http, true) => Some("HTTPClient".to_owned()),
                    _ => None,
                };
                assert_eq!(echoed, want_echo, "{what}, {mode}");
                let discovery = offer.opts().get(OptionCode::VendorExtensions).is_some();
                assert_eq!(discovery, *kind == Pxe && want.is_some(), "{what}, {mode}: option 43");
                assert_eq!(offer.yiaddr().is_unspecified(), proxy, "{what}, {mode}: an address only in full mode");
            }
        }
    }

    #[test]
    fn full_dora_with_boot_options() {
        let s = settings(false, false);
        let (h, mut p) = (hosts(None), pool());
        let Decision::Reply(offer, Dest::Broadcast) =
            respond(&request(MessageType::Discover, MAC, &pxe(0)), &s, &h, &mut p, 0, false)
        else {
            panic!("expected a broadcast OFFER")
        };
        assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
        let ip = offer.yiaddr();
        assert_eq!(ip, Ipv4Addr::new(10, 20, 0, 100));
        assert_eq!(offer.siaddr(), s.server_ip);
        assert_eq!(offer.fname_str().and_then(Result::ok), Some("undionly.kpxe"));
        assert_eq!(offer.opts().get(OptionCode::Hostname), Some(&DhcpOption::Hostname("node-a".into())));
        let req = request(
            MessageType::Request,
            MAC,
            &[DhcpOption::RequestedIpAddress(ip), DhcpOption::ServerIdentifier(s.server_ip)],
        );
        let Decision::Ack(ack, Dest::Broadcast, lease) = respond(&req, &s, &h, &mut p, 10, false) else {
            panic!("expected an ACK")
        };
        assert_eq!((ack.yiaddr(), lease.ip, lease.expires_at.0), (ip, ip, 3_600_010));
        assert_eq!(ack.opts().get(OptionCode::AddressLeaseTime), Some(&DhcpOption::AddressLeaseTime(3600)));
    }

    #[test]
    fn unknown_macs_wrong_servers_and_taken_addresses() {
        let s = settings(false, false);
        let (h, mut p) = (hosts(Some(Ipv4Addr::new(10, 20, 0, 11))), pool());
        let other = [0x52, 0x54, 0, 0, 0, 0xff];
        assert_eq!(
            respond(&request(MessageType::Discover, other, &pxe(0)), &s, &h, &mut p, 0, false),
            Decision::Drop("unknown MAC")
        );
        // The fixed address wins, even outside the range.
        let Decision::Reply(offer, _) = respond(&request(MessageType::Discover, MAC, &[]), &s, &h, &mut p, 0, false)
        else {
            panic!()
        };
        assert_eq!(offer.yiaddr(), Ipv4Addr::new(10, 20, 0, 11));
        // A REQUEST for an address that is not the host's gets a NAK, broadcast.
        let req = request(MessageType::Request, MAC, &[DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 20, 0, 150))]);
        let Decision::Reply(nak, Dest::Broadcast) = respond(&req, &s, &h, &mut p, 0, false) else {
            panic!("expected a NAK")
        };
        assert_eq!(nak.opts().msg_type(), Some(MessageType::Nak));
        // Choosing another server's offer releases ours, silently.
        let req = request(
            MessageType::Request,
            MAC,
            &[
                DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 20, 0, 11)),
                DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 20, 0, 2)),
            ],
        );
        assert_eq!(respond(&req, &s, &h, &mut p, 0, false), Decision::Drop("client chose another server"));
        // allow_unknown answers anyone from the range.
        let open = settings(false, true);
        let Decision::Reply(o, _) = respond(&request(MessageType::Discover, other, &[]), &open, &h, &mut p, 0, false)
        else {
            panic!()
        };
        assert_eq!(o.yiaddr(), Ipv4Addr::new(10, 20, 0, 100));
    }

    #[test]
    fn proxy_mode_gives_boot_options_only_to_pxe_clients() {
        let s = settings(true, false);
        let (h, mut p) = (hosts(None), pool());
        let Decision::Reply(offer, Dest::Broadcast) =
            respond(&request(MessageType::Discover, MAC, &pxe(9)), &s, &h, &mut p, 0, false)
        else {
            panic!("expected a proxy OFFER")
        };
        assert_eq!(offer.yiaddr(), Ipv4Addr::UNSPECIFIED, "no address from a proxy");
        assert_eq!(
            offer.opts().get(OptionCode::ClassIdentifier),
            Some(&DhcpOption::ClassIdentifier(b"PXEClient".to_vec()))
        );
        assert_eq!(offer.fname_str().and_then(Result::ok), Some("ipxe.efi"));
        assert!(offer.opts().get(OptionCode::AddressLeaseTime).is_none());
        assert_eq!(
            respond(&request(MessageType::Discover, MAC, &[]), &s, &h, &mut p, 0, false),
            Decision::Drop("proxy: not a PXE or HTTP boot client")
        );
        let mut req = request(MessageType::Request, MAC, &pxe(9));
        req.set_ciaddr(Ipv4Addr::new(10, 20, 0, 55));
        let Decision::Reply(ack, Dest::Client(c)) = respond(&req, &s, &h, &mut p, 0, true) else {
            panic!("expected a 4011 ACK")
        };
        assert_eq!((ack.opts().msg_type(), c), (Some(MessageType::Ack), Ipv4Addr::new(10, 20, 0, 55)));
        assert_eq!(respond(&req, &s, &h, &mut p, 0, false), Decision::Drop("proxy: not for us"));
    }

    #[test]
    fn a_hardware_length_past_chaddr_is_dropped_not_a_panic() {
        // The fuzzer's crash: a BOOTREQUEST with hlen 200 (chaddr holds 16 bytes).
        let mut raw = vec![1u8, 1, 200, 0];
        raw.extend_from_slice(&[0; 232]);
        raw.extend_from_slice(&[0x63, 0x82, 0x53, 0x63, 53, 1, 1, 255]);
        let msg = Message::decode(&mut dhcproto::Decoder::new(&raw)).expect("dhcproto decodes it");
        let (h, mut p) = (hosts(None), pool());
        for proxy in [false, true] {
            let d = respond(&msg, &settings(proxy, true), &h, &mut p, 0, false);
            assert_eq!(d, Decision::Drop("not an Ethernet BOOTREQUEST"));
        }
    }

    #[test]
    fn release_and_renewal() {
        let s = settings(false, false);
        let (h, mut p) = (hosts(None), pool());
        let ip = Ipv4Addr::new(10, 20, 0, 100);
        p.offer(MacAddr(MAC), None, None, 0);
        p.bind(MacAddr(MAC), ip, None, 3_600_000, 0).expect("bind");
        let mut renew = request(MessageType::Request, MAC, &[]);
        renew.set_ciaddr(ip);
        assert!(
            matches!(respond(&renew, &s, &h, &mut p, 1000, false), Decision::Ack(_, Dest::Client(c), _) if c == ip)
        );
        let mut rel = request(MessageType::Release, MAC, &[]);
        rel.set_ciaddr(ip);
        assert_eq!(respond(&rel, &s, &h, &mut p, 2000, false), Decision::Release(MacAddr(MAC)));
        assert_eq!(p.bound(MacAddr(MAC), 2000), None);
    }
}

//! The DHCP server (dhcproto): full DHCP for the provisioning subnet, or proxyDHCP beside an
//! existing server (ports 67 and 4011). It answers only on its interface (`SO_BINDTODEVICE`),
//! broadcasts to clients without an address, and acknowledges a lease only once it is
//! stored — leases decided meanwhile are written in one transaction (group commit), so
//! durability does not cost a commit per client.
//!
//! The decisions are pure ([`logic::respond`], [`pool::Pool`]); this module moves bytes.

pub mod logic;
pub mod pool;

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use dhcproto::v4::{Message, MessageType};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use nodekeeper_store::{Lease, MacAddr, Store, Timestamp};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use logic::{Decision, Dest, KnownHost, Settings};
use pool::Pool;

/// How often the host table is re-read (new hosts are answered within this time).
pub const HOSTS_REFRESH: Duration = Duration::from_secs(5);
/// Leases waiting to be stored; beyond this, requests are dropped (clients retry).
const WRITE_QUEUE: usize = 16_384;
/// Socket receive buffer: bursts of thousands of clients must not overflow it (Kea's lesson).
const RECV_BUFFER: usize = 8 << 20;

/// The server's sockets.
#[derive(Debug)]
pub struct Sockets {
    /// Port 67 (or the configured port).
    pub main: UdpSocket,
    /// Port 4011, in proxy mode.
    pub proxy: Option<UdpSocket>,
}

/// Binds `0.0.0.0:port` on `interface` only, able to broadcast; with `proxy`, also 4011.
pub fn bind(interface: &str, port: u16, proxy: bool) -> io::Result<Sockets> {
    let main = bind_one(interface, port)?;
    let proxy = if proxy { Some(bind_one(interface, 4011)?) } else { None };
    Ok(Sockets { main, proxy })
}

fn bind_one(interface: &str, port: u16) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.set_broadcast(true)?;
    s.bind_device(Some(interface.as_bytes()))
        .map_err(|e| io::Error::new(e.kind(), format!("binding to interface {interface}: {e}")))?;
    if let Err(e) = s.set_recv_buffer_size(RECV_BUFFER) {
        tracing::warn!("DHCP receive buffer: {e}");
    }
    s.set_nonblocking(true)?;
    s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())
        .map_err(|e| io::Error::new(e.kind(), format!("binding DHCP on {interface} port {port}: {e}")))?;
    UdpSocket::from_std(s.into())
}

/// Serves until `shutdown`. `range` is the dynamic range (full mode).
pub async fn serve(
    sockets: Sockets,
    settings: Settings,
    range: (Ipv4Addr, Ipv4Addr),
    store: Store,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let main = Arc::new(sockets.main);
    let proxy = sockets.proxy.map(Arc::new);
    let mut pool = Pool::new(range.0, range.1);
    match store.leases().await {
        Ok(leases) => {
            tracing::info!(leases = leases.len(), "DHCP leases loaded");
            pool.load(&leases);
        }
        Err(e) => return Err(io::Error::other(format!("loading DHCP leases: {e}"))),
    }
    let mut hosts = load_hosts(&store).await.unwrap_or_default();
    let (writer, queue) = mpsc::channel(WRITE_QUEUE);
    let writer_task = tokio::spawn(lease_writer(store.clone(), queue));
    let mut refresh = tokio::time::interval(HOSTS_REFRESH);
    refresh.tick().await;
    let mut buf = vec![0u8; 4096];
    let mut buf4011 = vec![0u8; 4096];
    loop {
        let (n, port_4011, raw) = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = refresh.tick() => {
                match load_hosts(&store).await {
                    Ok(h) => hosts = h,
                    Err(e) => tracing::warn!("DHCP: re-reading hosts: {e}"),
                }
                continue;
            }
            r = main.recv_from(&mut buf) => match r { Ok((n, _)) => (n, false, &buf), Err(e) => { tracing::debug!("DHCP recv: {e}"); continue } },
            r = recv_opt(proxy.as_deref(), &mut buf4011) => match r { Ok(n) => (n, true, &buf4011), Err(e) => { tracing::debug!("DHCP 4011 recv: {e}"); continue } },
        };
        let msg = match decode(&raw[..n]) {
            Ok(m) => m,
            Err(e) => {
                metrics.dhcp_drops.inc();
                tracing::debug!("DHCP: malformed packet dropped: {e}");
                continue;
            }
        };
        let now = Timestamp::now().0;
        let decision = logic::respond(&msg, &settings, &hosts, &mut pool, now, port_4011);
        let socket = if port_4011 { proxy.clone().unwrap_or_else(|| main.clone()) } else { main.clone() };
        match decision {
            Decision::Reply(reply, dest) => {
                count(&metrics, &reply);
                send(&socket, &reply, dest).await;
            }
            Decision::Ack(reply, dest, lease) => {
                let (done, stored) = oneshot::channel();
                if writer.try_send((lease, done)).is_err() {
                    metrics.dhcp_drops.inc();
                    tracing::warn!("DHCP: lease write queue full, request dropped");
                    continue;
                }
                let metrics = metrics.clone();
                tokio::spawn(async move {
                    // Acknowledge only what is stored: a crash never leaves a client with an
                    // address the next run would hand out again.
                    if stored.await == Ok(true) {
                        count(&metrics, &reply);
                        send(&socket, &reply, dest).await;
                    } else {
                        metrics.dhcp_drops.inc();
                    }
                });
            }
            Decision::Release(mac) => {
                let store = store.clone();
                tokio::spawn(async move {
                    if let Err(e) = store.delete_lease(mac).await {
                        tracing::warn!(%mac, "DHCP: forgetting a released lease: {e}");
                    }
                });
            }
            Decision::Drop(reason) => {
                metrics.dhcp_drops.inc();
                tracing::debug!(reason, "DHCP: no answer");
            }
        }
    }
    drop(writer);
    let _ = writer_task.await;
    Ok(())
}

/// Decodes a datagram; any failure is a malformed packet. dhcproto 0.12 can panic on hostile
/// input (a `debug_assert!` on option 94's length; found by `make fuzz`), and a packet from
/// the network must never take the server down, so a panic in the decoder counts as
/// malformed too.
pub fn decode(bytes: &[u8]) -> Result<Message, String> {
    match std::panic::catch_unwind(|| Message::decode(&mut Decoder::new(bytes))) {
        Ok(Ok(m)) => Ok(m),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the DHCP decoder panicked on this packet".into()),
    }
}

async fn recv_opt(socket: Option<&UdpSocket>, buf: &mut [u8]) -> io::Result<usize> {
    match socket {
        Some(s) => s.recv_from(buf).await.map(|(n, _)| n),
        None => std::future::pending().await,
    }
}

fn count(metrics: &Metrics, reply: &Message) {
    match reply.opts().msg_type() {
        Some(MessageType::Offer) => metrics.dhcp_offers.inc(),
        Some(MessageType::Ack) => metrics.dhcp_acks.inc(),
        Some(MessageType::Nak) => metrics.dhcp_naks.inc(),
        _ => {}
    }
}

async fn send(socket: &UdpSocket, reply: &Message, dest: Dest) {
    let mut out = Vec::with_capacity(576);
    if let Err(e) = reply.encode(&mut Encoder::new(&mut out)) {
        tracing::warn!("DHCP: encoding a reply: {e}");
        return;
    }
    // Pad to the BOOTP minimum: some PXE ROMs ignore shorter replies.
    if out.len() < 300 {
        out.resize(300, 0);
    }
    let to = match dest {
        Dest::Broadcast => SocketAddrV4::new(Ipv4Addr::BROADCAST, 68),
        Dest::Client(ip) => SocketAddrV4::new(ip, 68),
        Dest::Relay(ip) => SocketAddrV4::new(ip, 67),
    };
    if let Err(e) = socket.send_to(&out, to).await {
        tracing::debug!(%to, "DHCP send: {e}");
    }
}

/// Stores leases in batches: everything queued while the previous batch committed goes in
/// the next transaction; each waiter learns whether its lease is stored.
async fn lease_writer(store: Store, mut queue: mpsc::Receiver<(Lease, oneshot::Sender<bool>)>) {
    let mut batch = Vec::with_capacity(1024);
    while let Some(first) = queue.recv().await {
        batch.push(first);
        while batch.len() < 4096 {
            match queue.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        let leases: Vec<Lease> = batch.iter().map(|(l, _)| *l).collect();
        let ok = match store.save_leases(&leases).await {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(leases = leases.len(), "DHCP: storing leases failed, not acknowledging them: {e}");
                false
            }
        };
        for (_, done) in batch.drain(..) {
            let _ = done.send(ok);
        }
    }
}

async fn load_hosts(store: &Store) -> Result<HashMap<MacAddr, KnownHost>, nodekeeper_store::StoreError> {
    let modes = store.boot_modes().await?;
    Ok(store
        .hosts()
        .await?
        .into_iter()
        .filter_map(|h| {
            let ip = match h.ip {
                Some(std::net::IpAddr::V4(ip)) => Some(ip),
                _ => None,
            };
            let secure_boot = modes.get(&h.name) == Some(&nodekeeper_store::BootMode::UefiSecureBoot);
            h.mac.map(|mac| (mac, KnownHost { name: h.name, ip, secure_boot }))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_packets_are_malformed_not_fatal() {
        // Inputs on which dhcproto 0.12 panics, found by `make fuzz`.
        let option94 = include_bytes!("../../tests/data/dhcproto-option94-debug-assert.bin");
        let _ = decode(option94); // an Err with debug assertions, a misparse without: never a panic
        let mut hlen200 = vec![1u8, 1, 200, 0];
        hlen200.extend_from_slice(&[0; 232]);
        hlen200.extend_from_slice(&[0x63, 0x82, 0x53, 0x63, 53, 1, 1, 255]);
        assert!(decode(&hlen200).is_ok(), "it decodes; the responder drops it (logic tests)");
        assert!(decode(&[1, 2, 3]).is_err());
    }
}

//! A read-only TFTP server on tokio: RFC 1350, options (2347), blksize (2348), tsize and
//! timeout (2349), windowsize (7440). Our own rather than async-tftp, which has no
//! windowsize (the ≥ 5× speed-up of RFC 7440 is the point of serving big files over TFTP)
//! and runs its own reactor beside tokio's.
//!
//! Every transfer has its own socket (its transfer ID), connected to the client so the
//! kernel drops datagrams from anyone else. Paths are confined to the root (a leading `/` is
//! the root, as tftpd-hpa's `-s` makes it: GRUB asks for `/grub/grub.cfg`); `..` and symlinks
//! that lead out are refused with an error packet. Besides the root's files: `images/…` is
//! the images directory (GRUB loads the deploy kernel from there), and some names are made
//! when read ([`Generated`]: each host's GRUB script).

pub mod packet;

use std::collections::HashSet;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Component, Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use packet::{ClientPacket, ErrorCode};

/// Largest blksize accepted (RFC 2348).
pub const MAX_BLKSIZE: usize = 65464;
/// Largest window accepted (RFC 7440 allows 65535; more gains nothing and costs memory).
pub const MAX_WINDOW: u16 = 64;
/// Transfers served at once; more are refused with "server busy".
pub const MAX_TRANSFERS: usize = 512;
/// Retransmissions of one window before giving up.
const MAX_RETRIES: u32 = 5;
/// Longest per-packet timeout a client may negotiate (RFC 2349 allows 255 s: with the
/// retries, one silent client would hold a transfer slot for 21 minutes). A larger request
/// is left out of the OACK, and the default applies.
pub const MAX_TIMEOUT_SECS: u64 = 10;
/// Transfers one client address may have at once (a PXE ROM needs one, iPXE two; a relay or
/// NAT in front of several hosts more): one address cannot take the whole server.
pub const MAX_PER_CLIENT: usize = 32;
/// Default per-packet timeout when the client asks for none.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// File data read ahead per blocking read.
const READ_AHEAD: usize = 1 << 20;

/// Content made when a client reads it.
pub type Made<'a> = Pin<Box<dyn Future<Output = Result<Vec<u8>, String>> + Send + 'a>>;

/// Names whose content is made when read (boot scripts that depend on the host's state).
/// What is made for a client address is kept for [`MADE_TTL`] and served again to that
/// address: GRUB re-reads a file to seek back in it, and a one-time deploy token must not
/// be spent by its own loader.
pub trait Generated: Send + Sync {
    /// The content of `name` (relative, `/`-separated), or `None` when this name is not made
    /// here (then it is looked up as a file).
    fn generate<'a>(&'a self, name: &'a str) -> Option<Made<'a>>;
}

/// What the server serves.
#[derive(Clone)]
pub struct Tree {
    /// The read-only root.
    pub root: PathBuf,
    /// Served as `images/…` (the HTTP server's images directory).
    pub images: Option<PathBuf>,
    /// Names made when read.
    pub generated: Option<Arc<dyn Generated>>,
}

impl Tree {
    /// Only the files under `root`.
    pub fn root(root: PathBuf) -> Tree {
        Tree { root, images: None, generated: None }
    }
}

/// How long made content is served again to the client it was made for.
pub const MADE_TTL: Duration = Duration::from_secs(60);
/// Made contents kept at most (the oldest go first).
const MADE_KEPT: usize = 4096;

/// Made content by (client address, name), with when it was made.
type MadeCache = std::collections::HashMap<(IpAddr, String), (std::time::Instant, Arc<Vec<u8>>)>;

/// The shared part of the server.
struct Shared {
    made: Mutex<MadeCache>,
    root: PathBuf,
    images: Option<PathBuf>,
    generated: Option<Arc<dyn Generated>>,
    metrics: Arc<Metrics>,
    active: Mutex<HashSet<SocketAddr>>,
    permits: Semaphore,
}

/// Serves files under `root` on `socket` until `shutdown` is cancelled.
pub async fn serve(
    socket: UdpSocket,
    tree: Tree,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let canonical = |p: &Path, what: &str| {
        p.canonicalize().map_err(|e| io::Error::new(e.kind(), format!("TFTP {what} {}: {e}", p.display())))
    };
    let root = canonical(&tree.root, "root")?;
    let images = tree.images.as_deref().map(|p| canonical(p, "images directory")).transpose()?;
    let local_ip = socket.local_addr()?.ip();
    let shared = Arc::new(Shared {
        root,
        images,
        generated: tree.generated,
        made: Mutex::new(MadeCache::new()),
        metrics,
        active: Mutex::new(HashSet::new()),
        permits: Semaphore::new(MAX_TRANSFERS),
    });
    let mut buf = vec![0u8; 2048];
    let mut transfers = tokio::task::JoinSet::new();
    loop {
        let (n, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) => { tracing::debug!("TFTP recv: {e}"); continue; }
            },
            Some(_) = transfers.join_next(), if !transfers.is_empty() => continue,
        };
        match packet::parse(&buf[..n]) {
            Ok(ClientPacket::Read { filename, mode, options }) => {
                let admitted = shared
                    .active
                    .lock()
                    .map(|mut a| {
                        if a.contains(&peer) {
                            return Admit::Duplicate;
                        }
                        if a.iter().filter(|p| p.ip() == peer.ip()).count() >= MAX_PER_CLIENT {
                            return Admit::TooMany;
                        }
                        a.insert(peer);
                        Admit::Yes
                    })
                    .unwrap_or(Admit::Duplicate);
                match admitted {
                    Admit::Yes => {}
                    Admit::TooMany => {
                        tracing::info!(%peer, "TFTP: {MAX_PER_CLIENT} transfers to this address already; refused");
                        let _ = socket.send_to(&packet::error(ErrorCode::Undefined, "too many transfers"), peer).await;
                        continue;
                    }
                    // A retransmitted request for a transfer already under way.
                    Admit::Duplicate => continue,
                }
                let Ok(permit) = shared.permits.try_acquire() else {
                    shared.active.lock().map(|mut a| a.remove(&peer)).ok();
                    let _ = socket.send_to(&packet::error(ErrorCode::Undefined, "server busy"), peer).await;
                    continue;
                };
                permit.forget();
                let shared = shared.clone();
                let stop = shutdown.clone();
                transfers.spawn(async move {
                    let ok = tokio::select! {
                        r = transfer(&shared, local_ip, peer, &filename, &mode, &options) => r,
                        _ = stop.cancelled() => Err(io::Error::other("shutting down")),
                    };
                    match ok {
                        Ok(bytes) => {
                            shared.metrics.tftp_transfers.inc();
                            tracing::debug!(%peer, file = %filename, bytes, "TFTP transfer done");
                        }
                        Err(e) => {
                            shared.metrics.tftp_errors.inc();
                            tracing::info!(%peer, file = %filename, "TFTP transfer failed: {e}");
                        }
                    }
                    shared.active.lock().map(|mut a| a.remove(&peer)).ok();
                    shared.permits.add_permits(1);
                });
            }
            Ok(ClientPacket::Write { filename }) => {
                tracing::info!(%peer, file = %filename, "TFTP write refused");
                let _ = socket.send_to(&packet::error(ErrorCode::AccessViolation, "read-only server"), peer).await;
            }
            Ok(_) => tracing::debug!(%peer, "TFTP: stray packet on the server port"),
            Err(e) => tracing::debug!(%peer, "TFTP: malformed packet dropped: {e}"),
        }
    }
    transfers.shutdown().await;
    Ok(())
}

/// Whether a read request starts a transfer.
enum Admit {
    Yes,
    /// A retransmission of a request already being served.
    Duplicate,
    /// The client address has [`MAX_PER_CLIENT`] transfers already.
    TooMany,
}

/// Negotiated transfer parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Params {
    blksize: usize,
    window: u16,
    timeout: Duration,
    /// Options to acknowledge in an OACK (empty: none requested or accepted).
    oack: Vec<(&'static str, String)>,
}

/// Accepts what the server supports of the requested options (RFC 2347: unknown or invalid
/// ones are left out of the OACK, which the client takes as refused).
fn negotiate(options: &[(String, String)], file_len: u64) -> Params {
    let mut p = Params { blksize: 512, window: 1, timeout: DEFAULT_TIMEOUT, oack: Vec::new() };
    for (name, value) in options {
        let v: Option<u64> = value.trim().parse().ok();
        match (name.as_str(), v) {
            ("blksize", Some(b)) if b >= 8 => {
                p.blksize = usize::try_from(b).unwrap_or(MAX_BLKSIZE).min(MAX_BLKSIZE);
                p.oack.push(("blksize", p.blksize.to_string()));
            }
            ("tsize", Some(_)) => p.oack.push(("tsize", file_len.to_string())),
            ("timeout", Some(t)) if (1..=MAX_TIMEOUT_SECS).contains(&t) => {
                p.timeout = Duration::from_secs(t);
                p.oack.push(("timeout", t.to_string()));
            }
            ("windowsize", Some(w)) if (1..=65535).contains(&w) => {
                p.window = u16::try_from(w).unwrap_or(MAX_WINDOW).min(MAX_WINDOW);
                p.oack.push(("windowsize", p.window.to_string()));
            }
            _ => {}
        }
    }
    p
}

/// A request's name: `/`-separated, relative to the root (PXE ROMs and Windows clients send
/// backslashes now and then; GRUB and shim a leading `/`).
fn normalize(filename: &str) -> String {
    filename.replace('\\', "/").trim_start_matches('/').to_owned()
}

/// The file a request names, confined to `root`.
fn resolve(root: &Path, filename: &str) -> Result<PathBuf, (ErrorCode, &'static str)> {
    let name = normalize(filename);
    let rel = Path::new(&name);
    if name.contains('\0') {
        return Err((ErrorCode::AccessViolation, "NUL in the file name"));
    }
    if rel.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir)) {
        return Err((ErrorCode::AccessViolation, "paths outside the root are refused"));
    }
    let real = match root.join(rel).canonicalize() {
        Ok(p) => p,
        Err(_) => return Err((ErrorCode::FileNotFound, "file not found")),
    };
    if !real.starts_with(root) {
        return Err((ErrorCode::AccessViolation, "paths outside the root are refused"));
    }
    if !real.is_file() {
        return Err((ErrorCode::FileNotFound, "not a regular file"));
    }
    Ok(real)
}

/// Sends one file. Returns the bytes sent.
async fn transfer(
    shared: &Shared,
    local_ip: IpAddr,
    peer: SocketAddr,
    filename: &str,
    mode: &str,
    options: &[(String, String)],
) -> io::Result<u64> {
    let socket = UdpSocket::bind((local_ip, 0)).await?;
    socket.connect(peer).await?;
    let refuse = |code, message: &str| {
        let pkt = packet::error(code, message);
        let socket = &socket;
        async move {
            let _ = socket.send(&pkt).await;
        }
    };
    if mode != "octet" {
        refuse(ErrorCode::IllegalOperation, "only octet (binary) mode is supported").await;
        return Err(io::Error::other(format!("mode {mode} refused")));
    }
    let name = normalize(filename);
    let key = (peer.ip(), name.clone());
    let now = std::time::Instant::now();
    let kept =
        shared.made.lock().ok().and_then(|m| {
            m.get(&key).filter(|(at, _)| now.duration_since(*at) < MADE_TTL).map(|(_, bytes)| bytes.clone())
        });
    let made = match (kept, shared.generated.as_ref().and_then(|g| g.generate(&name))) {
        (_, None) => None,
        (Some(bytes), Some(_)) => Some(bytes),
        (None, Some(making)) => match making.await {
            Ok(bytes) => {
                let bytes = Arc::new(bytes);
                if let Ok(mut m) = shared.made.lock() {
                    m.retain(|_, (at, _)| now.duration_since(*at) < MADE_TTL);
                    if m.len() >= MADE_KEPT {
                        if let Some(oldest) = m.iter().min_by_key(|(_, (at, _))| *at).map(|(k, _)| k.clone()) {
                            m.remove(&oldest);
                        }
                    }
                    m.insert(key, (now, bytes.clone()));
                }
                Some(bytes)
            }
            Err(e) => {
                refuse(ErrorCode::Undefined, "server error: see the provisioner's log").await;
                return Err(io::Error::other(format!("{filename}: {e}")));
            }
        },
    };
    let mut reader = match made {
        Some(bytes) => ReadAhead { file: None, offset: 0, buf: bytes.to_vec() },
        None => {
            let resolved = match (name.strip_prefix("images/"), &shared.images) {
                (Some(rest), Some(images)) => resolve(images, rest),
                _ => resolve(&shared.root, filename),
            };
            let path = match resolved {
                Ok(p) => p,
                Err((code, message)) => {
                    refuse(code, message).await;
                    return Err(io::Error::other(format!("{filename}: {message}")));
                }
            };
            ReadAhead { file: Some(Arc::new(std::fs::File::open(&path)?)), offset: 0, buf: Vec::new() }
        }
    };
    let len = match &reader.file {
        Some(file) => file.metadata()?.len(),
        None => reader.buf.len() as u64,
    };
    let params = negotiate(options, len);

    let mut rx = vec![0u8; 512];
    if !params.oack.is_empty() {
        let oack = packet::oack(&params.oack);
        let mut tries = 0;
        loop {
            socket.send(&oack).await?;
            match recv_ack(&socket, &mut rx, params.timeout).await? {
                Some(0) => break,
                Some(_) => {}
                None => {
                    tries += 1;
                    if tries > MAX_RETRIES {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, "no ACK for the OACK"));
                    }
                }
            }
        }
    }

    // Blocks are counted in u64 and sent modulo 2^16 (rollover to 0, as tftp-hpa and curl expect).
    let total_blocks = len / params.blksize as u64 + 1;
    let mut acked: u64 = 0;
    let mut retries = 0;
    let mut pkt = Vec::with_capacity(4 + params.blksize);
    while acked < total_blocks {
        let last = (acked + u64::from(params.window)).min(total_blocks);
        for block in acked + 1..=last {
            let offset = (block - 1) * params.blksize as u64;
            let size = usize::try_from(len.saturating_sub(offset)).unwrap_or(usize::MAX).min(params.blksize);
            packet::data_header(&mut pkt, (block & 0xffff) as u16);
            pkt.extend_from_slice(reader.slice(offset, size).await?);
            socket.send(&pkt).await?;
        }
        loop {
            match recv_ack(&socket, &mut rx, params.timeout).await? {
                Some(n) => {
                    // The ACK names the last block received in order; map it into the window.
                    let hit = (acked..=last).rev().find(|b| (b & 0xffff) as u16 == n);
                    match hit {
                        Some(b) if b > acked => {
                            acked = b;
                            retries = 0;
                            break;
                        }
                        _ => continue, // a duplicate of an older ACK
                    }
                }
                None => {
                    retries += 1;
                    if retries > MAX_RETRIES {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, format!("no ACK after block {acked}")));
                    }
                    break; // resend the window from the first unacknowledged block
                }
            }
        }
    }
    shared.metrics.tftp_bytes.add(len);
    Ok(len)
}

/// Waits for an ACK: `Some(block)`, or `None` on timeout. A client ERROR aborts.
async fn recv_ack(socket: &UdpSocket, buf: &mut [u8], timeout: Duration) -> io::Result<Option<u16>> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let n = match tokio::time::timeout_at(deadline, socket.recv(buf)).await {
            Err(_) => return Ok(None),
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "client went away"))
            }
            Ok(r) => r?,
        };
        match packet::parse(&buf[..n]) {
            Ok(ClientPacket::Ack(b)) => return Ok(Some(b)),
            Ok(ClientPacket::Error { code, message }) => {
                return Err(io::Error::new(io::ErrorKind::ConnectionAborted, format!("client error {code}: {message}")))
            }
            _ => {} // ignore anything else from the client
        }
    }
}

/// Reads the file in 1 MiB steps on the blocking pool, so sending never waits on the disk
/// per block. Without a file, `buf` is the whole (generated) content.
struct ReadAhead {
    file: Option<Arc<std::fs::File>>,
    offset: u64,
    buf: Vec<u8>,
}

impl ReadAhead {
    async fn slice(&mut self, offset: u64, size: usize) -> io::Result<&[u8]> {
        let end = offset + size as u64;
        if offset < self.offset || end > self.offset + self.buf.len() as u64 {
            let Some(file) = self.file.clone() else {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "read past the generated content"));
            };
            let want = READ_AHEAD.max(size);
            let buf = tokio::task::spawn_blocking(move || {
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0u8; want];
                let mut filled = 0;
                while filled < want {
                    let n = file.read_at(&mut buf[filled..], offset + filled as u64)?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                buf.truncate(filled);
                Ok::<_, io::Error>(buf)
            })
            .await
            .map_err(io::Error::other)??;
            self.offset = offset;
            self.buf = buf;
        }
        let start = usize::try_from(offset - self.offset).unwrap_or(0);
        let stop = (start + size).min(self.buf.len());
        if stop - start < size {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank during the transfer"));
        }
        Ok(&self.buf[start..stop])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn options_are_negotiated_within_limits() {
        let p = negotiate(&opts(&[("blksize", "1428"), ("tsize", "0"), ("timeout", "3"), ("windowsize", "16")]), 5000);
        assert_eq!((p.blksize, p.window, p.timeout), (1428, 16, Duration::from_secs(3)));
        assert_eq!(
            p.oack,
            vec![
                ("blksize", "1428".into()),
                ("tsize", "5000".into()),
                ("timeout", "3".into()),
                ("windowsize", "16".into())
            ]
        );
        let capped = negotiate(&opts(&[("blksize", "99999"), ("windowsize", "1000")]), 1);
        assert_eq!((capped.blksize, capped.window), (MAX_BLKSIZE, MAX_WINDOW));
        // A timeout past 10 s (RFC 2349 allows 255) is not acknowledged: the default applies.
        let slow = negotiate(&opts(&[("timeout", "255")]), 1);
        assert!(slow.oack.is_empty() && slow.timeout == DEFAULT_TIMEOUT, "{slow:?}");
        let refused =
            negotiate(&opts(&[("blksize", "4"), ("timeout", "0"), ("windowsize", "x"), ("colour", "red")]), 1);
        assert!(refused.oack.is_empty());
        assert_eq!((refused.blksize, refused.window), (512, 1));
    }

    #[test]
    fn paths_are_confined_to_the_root() {
        let dir = tempfile::tempdir().expect("dir");
        let root = dir.path().join("tftp");
        std::fs::create_dir_all(root.join("efi")).expect("mkdir");
        std::fs::write(root.join("undionly.kpxe"), b"x").expect("write");
        std::fs::write(root.join("efi/ipxe.efi"), b"x").expect("write");
        std::fs::write(dir.path().join("secret"), b"x").expect("write");
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("out")).expect("link");
        let root = root.canonicalize().expect("canonical");
        assert!(resolve(&root, "undionly.kpxe").is_ok());
        assert!(resolve(&root, "efi\\ipxe.efi").is_ok());
        assert!(resolve(&root, "./efi/ipxe.efi").is_ok());
        // A leading slash is the root (GRUB's `/grub/grub.cfg`), never the machine's /.
        assert_eq!(resolve(&root, "/undionly.kpxe").ok(), Some(root.join("undionly.kpxe")));
        for (bad, code) in [
            ("/etc/passwd", ErrorCode::FileNotFound),
            ("/../secret", ErrorCode::AccessViolation),
            ("../secret", ErrorCode::AccessViolation),
            ("efi/../../secret", ErrorCode::AccessViolation),
            ("..\\secret", ErrorCode::AccessViolation),
            ("out", ErrorCode::AccessViolation),
            ("missing", ErrorCode::FileNotFound),
            ("efi", ErrorCode::FileNotFound),
        ] {
            assert_eq!(resolve(&root, bad).map_err(|e| e.0), Err(code), "{bad}");
        }
    }
}

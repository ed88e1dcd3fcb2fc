//! HTTPS for the provisioner's API (rustls with ring), and the provisioner's own small CA.
//!
//! [`TlsListener`] turns a TCP listener into one that yields finished TLS streams, so the same
//! axum router serves both listeners. Handshakes run concurrently, each bounded by
//! [`HANDSHAKE_TIMEOUT`], at most [`MAX_HANDSHAKES_PER_ADDRESS`] from one address and
//! [`MAX_HANDSHAKES`] in all at once: a client that connects and
//! says nothing, or speaks plain HTTP to the TLS port, costs one task for ten seconds and
//! stops nobody else.
//!
//! [`init`] makes what a site without its own PKI needs: a CA (kept, so nodes that trust it
//! keep working when the server certificate is issued again) and a server certificate for the
//! names nodes use. Nodes learn the CA by its sha256 (`nk.ca=` on the deploy kernel command
//! line), fetch it from `/tls/ca.pem` and check it against that digest.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

/// How long a client may take to finish its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; connections beyond are closed at once.
pub const MAX_HANDSHAKES: usize = 4096;
/// Handshakes in progress at once from one address: one client that connects and stalls
/// cannot take the slots of the guards (whose heartbeats come this way).
pub const MAX_HANDSHAKES_PER_ADDRESS: usize = 32;

/// Handshakes in progress per address; an entry leaves when its count returns to zero.
#[derive(Debug, Default)]
struct PerAddress(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

impl PerAddress {
    fn take(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<AddressSlot> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_default();
        if *n >= MAX_HANDSHAKES_PER_ADDRESS {
            return None;
        }
        *n += 1;
        Some(AddressSlot(self.clone(), ip))
    }
}

struct AddressSlot(Arc<PerAddress>, std::net::IpAddr);

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut m = self.0 .0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// What nodes are told about the HTTPS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeTls {
    /// `https://ADDRESS:PORT`.
    pub public_url: String,
    /// sha256 (hex) of the CA certificate's DER.
    pub ca_sha256: String,
    /// The CA certificate, PEM (served at `/tls/ca.pem`).
    pub ca_pem: String,
    /// The guard and deploy APIs refuse plain HTTP.
    pub require: bool,
}

impl NodeTls {
    /// Reads the CA of `[http.tls]`.
    pub fn load(tls: &TlsConfig) -> anyhow::Result<NodeTls> {
        let ca = first_cert(&tls.ca)?;
        let ca_pem = pem("CERTIFICATE", &ca);
        Ok(NodeTls { public_url: tls.public_url.clone(), ca_sha256: sha256_hex(&ca), ca_pem, require: tls.require })
    }
}

/// sha256 of `bytes`, lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: not a PEM certificate file", path.display()))?;
    anyhow::ensure!(!certs.is_empty(), "{}: no certificate in it", path.display());
    Ok(certs)
}

fn first_cert(path: &Path) -> anyhow::Result<CertificateDer<'static>> {
    Ok(certs(path)?.swap_remove(0))
}

/// The rustls server configuration of `[http.tls]`: its certificate chain and key, TLS 1.2
/// and 1.3, HTTP/1.1.
pub fn server_config(tls: &TlsConfig) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let chain = certs(&tls.cert)?;
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .with_context(|| format!("{}: not a PEM private key", tls.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .with_context(|| format!("{} and {} do not go together", tls.cert.display(), tls.key.display()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A listener whose connections are TLS streams whose handshake finished.
#[derive(Debug)]
pub struct TlsListener {
    incoming: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    accepting: tokio::task::JoinHandle<()>,
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

impl TlsListener {
    /// Accepts on `listener` and runs handshakes with `config` (in a task of its own).
    pub fn new(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> std::io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let (tx, incoming) = mpsc::channel(64);
        let accepting = tokio::spawn(accept_loop(listener, TlsAcceptor::from(config), tx));
        Ok(TlsListener { incoming, local, accepting })
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let permits = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let per_address = Arc::new(PerAddress::default());
    loop {
        let (tcp, addr) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: pause rather than spin.
                tracing::warn!(error = %e, "TLS accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(slot) = per_address.take(addr.ip()) else {
            tracing::debug!(%addr, "too many TLS handshakes in progress from this address: connection closed");
            continue;
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!(%addr, "too many TLS handshakes in progress: connection closed");
            continue;
        };
        let (acceptor, tx) = (acceptor.clone(), tx.clone());
        tokio::spawn(async move {
            let _held = (permit, slot);
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let _ = tx.send((stream, addr)).await;
                }
                Ok(Err(e)) => tracing::debug!(%addr, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%addr, "TLS handshake timed out"),
            }
        });
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.incoming.recv().await {
            Some(conn) => conn,
            // The accept loop ended (it only does when aborted): nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// What [`init`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Issued {
    /// The CA certificate.
    pub ca: std::path::PathBuf,
    /// Whether the CA was made now (nodes deployed before must be given the new one).
    pub ca_created: bool,
    /// sha256 (hex) of the CA certificate's DER.
    pub ca_sha256: String,
    /// The server certificate chain.
    pub cert: std::path::PathBuf,
    /// The server key.
    pub key: std::path::PathBuf,
    /// The names the server certificate carries.
    pub names: Vec<String>,
    /// When it expires (RFC 3339).
    pub not_after: String,
}

/// How long the CA is valid.
const CA_DAYS: i64 = 3650;
/// How long a server certificate is valid (what browsers accept, a habit worth keeping).
const SERVER_DAYS: i64 = 397;

/// Makes the server certificate of `[http.tls]` for the host of its `public_url`, the
/// address of its `listen` (unless unspecified) and `extra_names`, signed by the CA at
/// `tls.ca` (its key beside it, `.key`). The CA is made when it does not exist, or when
/// `new_ca` asks for it; an existing CA without its key is an error (its nodes trust it, and
/// nothing can be signed with it). Keys are written mode 0600, every file atomically.
pub fn init(tls: &TlsConfig, extra_names: &[String], new_ca: bool) -> anyhow::Result<Issued> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};
    let now = time::OffsetDateTime::now_utc();
    let mut names: Vec<String> = Vec::new();
    let host = tls
        .public_url
        .strip_prefix("https://")
        .and_then(|rest| rest.split(['/', ':']).next())
        .filter(|h| !h.is_empty())
        .with_context(|| format!("http.tls.public_url {:?} has no host", tls.public_url))?;
    names.push(host.trim_matches(['[', ']']).to_owned());
    if !tls.listen.ip().is_unspecified() {
        names.push(tls.listen.ip().to_string());
    }
    names.extend(extra_names.iter().cloned());
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));

    let ca_key_path = tls.ca.with_extension("key");
    let (ca_cert, ca_key, ca_created) = if tls.ca.exists() && !new_ca {
        let key_pem = std::fs::read_to_string(&ca_key_path).with_context(|| {
            format!(
                "the CA {} exists but its key {} cannot be read: pass --new-ca to make a new CA (nodes must then be reimaged to trust it)",
                tls.ca.display(),
                ca_key_path.display()
            )
        })?;
        let key = KeyPair::from_pem(&key_pem).with_context(|| format!("{}: not a key", ca_key_path.display()))?;
        let ca_pem = std::fs::read_to_string(&tls.ca).with_context(|| format!("reading {}", tls.ca.display()))?;
        let params = CertificateParams::from_ca_cert_pem(&ca_pem)
            .with_context(|| format!("{}: not a CA certificate", tls.ca.display()))?;
        // Re-signed only to sign with (same subject, same key): the file stays as it is.
        let cert = params.self_signed(&key).context("loading the CA")?;
        (cert, key, false)
    } else {
        let key = KeyPair::generate().context("making the CA key")?;
        let mut params = CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
        params.distinguished_name.push(DnType::CommonName, "nodekeeper provisioner CA");
        params.distinguished_name.push(DnType::OrganizationName, "nodekeeper");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(CA_DAYS);
        let cert = params.self_signed(&key).context("making the CA")?;
        write_atomically(&ca_key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_atomically(&tls.ca, cert.pem().as_bytes(), 0o644)?;
        (cert, key, true)
    };

    let key = KeyPair::generate().context("making the server key")?;
    let mut params = CertificateParams::new(names.clone()).context("server certificate names")?;
    params.distinguished_name.push(DnType::CommonName, names[0].clone());
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(SERVER_DAYS);
    let not_after = params.not_after.format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
    let cert = params.signed_by(&key, &ca_cert, &ca_key).context("signing the server certificate")?;
    let ca_file = first_cert(&tls.ca)?;
    let chain = format!("{}{}", cert.pem(), pem("CERTIFICATE", &ca_file));
    write_atomically(&tls.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_atomically(&tls.cert, chain.as_bytes(), 0o644)?;
    Ok(Issued {
        ca: tls.ca.clone(),
        ca_created,
        ca_sha256: sha256_hex(&ca_file),
        cert: tls.cert.clone(),
        key: tls.key.clone(),
        names,
        not_after,
    })
}

fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("nk-new");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_is_base64_in_lines_of_64() {
        let der: Vec<u8> = (0..=255u8).collect();
        let text = pem("CERTIFICATE", &der);
        let parsed = CertificateDer::from_pem_slice(text.as_bytes()).expect("parses");
        assert_eq!(parsed.as_ref(), der.as_slice());
        assert!(text.lines().all(|l| l.len() <= 64 || l.starts_with("-----")), "{text}");
        for n in [0usize, 1, 2, 3, 4, 5] {
            let der = vec![0xA5u8; n];
            let parsed = CertificateDer::from_pem_slice(pem("CERTIFICATE", &der).as_bytes());
            if n > 0 {
                assert_eq!(parsed.expect("parses").as_ref(), der.as_slice(), "{n} bytes");
            }
        }
    }

    fn config(dir: &Path) -> TlsConfig {
        TlsConfig {
            listen: "127.0.0.1:8443".parse().expect("addr"),
            public_url: "https://10.20.0.1:8443".into(),
            cert: dir.join("tls/server.pem"),
            key: dir.join("tls/server.key"),
            ca: dir.join("tls/ca.pem"),
            require: false,
        }
    }

    #[test]
    fn init_makes_a_ca_once_and_issues_server_certificates_under_it() {
        let dir = tempfile::tempdir().expect("dir");
        let tls = config(dir.path());
        let first = init(&tls, &["prov.example".into(), "10.20.0.1".into()], false).expect("init");
        assert!(first.ca_created);
        assert_eq!(first.names, ["10.20.0.1", "127.0.0.1", "prov.example"]);
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&tls.key), 0o600);
        assert_eq!(mode(&tls.ca.with_extension("key")), 0o600);
        server_config(&tls).expect("the server config loads");
        let ca_before = std::fs::read(&tls.ca).expect("ca");

        let second = init(&tls, &[], false).expect("again");
        assert!(!second.ca_created, "the CA is kept");
        assert_eq!(std::fs::read(&tls.ca).expect("ca"), ca_before);
        assert_eq!(second.ca_sha256, first.ca_sha256);
        assert_eq!(NodeTls::load(&tls).expect("load").ca_sha256, first.ca_sha256);

        std::fs::remove_file(tls.ca.with_extension("key")).expect("rm");
        let e = init(&tls, &[], false).expect_err("no CA key").to_string();
        assert!(e.contains("--new-ca"), "{e}");
        let third = init(&tls, &[], true).expect("new CA");
        assert!(third.ca_created && third.ca_sha256 != first.ca_sha256);
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let dir = tempfile::tempdir().expect("dir");
        let tls = config(dir.path());
        let e = server_config(&tls).expect_err("missing").to_string();
        assert!(e.contains("server.pem"), "{e}");
        std::fs::create_dir_all(dir.path().join("tls")).expect("mkdir");
        std::fs::write(&tls.cert, "not pem").expect("write");
        let e = server_config(&tls).expect_err("garbage").to_string();
        assert!(e.contains("no certificate") || e.contains("not a PEM"), "{e}");
        init(&tls, &[], false).expect("init");
        let other = config(&dir.path().join("other"));
        init(&other, &[], false).expect("init other");
        let mixed = TlsConfig { key: other.key.clone(), ..tls };
        let e = server_config(&mixed).expect_err("mismatched key").to_string();
        assert!(e.contains("do not go together"), "{e}");
    }
}

//! The deploy agent, as a library so its parts are testable: kernel command-line parameters,
//! a minimal HTTP/1.1 client (the provisioner is reached by IP address: no DNS) with TLS
//! (rustls) for the provisioner's HTTPS listener, and the deploy itself — stream the image to
//! the disk, hashing as it goes, compare with the server's sha256 `ETag`, report every stage.
//!
//! With TLS (`nk.server=https://…`, `nk.ca=SHA256`), the agent fetches the CA from the
//! provisioner's `/tls/ca.pem`, keeps it only if its digest is the one its command line
//! carries, and then reports over TLS and takes the image's digest over TLS; the image itself
//! streams over plain HTTP (`nk.image`) and must hash to that digest. The CA goes into the
//! config block, so the installed node's guard trusts the same CA.

use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub mod blocks;
pub mod disks;
pub mod stream;

/// The provisioner's CA, checked against `nk.ca`, and a TLS client configuration trusting
/// only it.
#[derive(Clone)]
pub struct Tls {
    config: Arc<rustls::ClientConfig>,
    /// The CA certificate (DER).
    pub ca_der: Vec<u8>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("ca_sha256", &hex_sha256(&self.ca_der)).finish()
    }
}

impl PartialEq for Tls {
    fn eq(&self, other: &Tls) -> bool {
        self.ca_der == other.ca_der
    }
}
impl Eq for Tls {}

fn hex_sha256(bytes: &[u8]) -> String {
    stream::hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

impl Tls {
    /// Trusts the first certificate of `pem` if its sha256 is `pin` (hex).
    pub fn from_pinned_pem(pem: &[u8], pin: &str) -> io::Result<Tls> {
        use rustls_pki_types::pem::PemObject;
        let ca = rustls_pki_types::CertificateDer::pem_slice_iter(pem)
            .next()
            .ok_or_else(|| io::Error::other("no certificate in the CA file"))?
            .map_err(|e| io::Error::other(format!("the CA file is not PEM: {e:?}")))?;
        let actual = hex_sha256(&ca);
        if !actual.eq_ignore_ascii_case(pin) {
            return Err(io::Error::other(format!(
                "the provisioner's CA has sha256 {actual}, the kernel command line says {pin}: refusing it"
            )));
        }
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone()).map_err(|e| io::Error::other(format!("the CA is not usable: {e}")))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| io::Error::other(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Tls { config: Arc::new(config), ca_der: ca.to_vec() })
    }
}

/// What the kernel command line carries (`nk.server=… nk.host=… nk.token=… nk.image=…`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    /// `http://ADDRESS:PORT` of the provisioner.
    pub server: String,
    /// This host's name.
    pub host: String,
    /// The one-time deploy token.
    pub token: String,
    /// URL of the image to write.
    pub image: String,
    /// The target disk (`nk.disk`); empty: chosen by [`disks::choose`] at the start of the
    /// deploy, with `root_device`.
    pub disk: String,
    /// The host's root-device hint (`nk.root_device`).
    pub root_device: Option<disks::Hint>,
    /// sha256 (hex) of the provisioner's CA (`nk.ca`), when `server` is `https://`.
    pub ca: Option<String>,
    /// The CA, once fetched and checked ([`Params::trust`]).
    pub tls: Option<Tls>,
    /// How `image` is served (`nk.format`): raw, or zstd-compressed raw (a catalogue image).
    pub format: Format,
    /// The raw image's size in bytes (`nk.size`; a compressed image's own length says
    /// nothing of it). Unset: the served length (raw).
    pub size: Option<u64>,
    /// The served file's sha256 as the image catalogue recorded it (`nk.sha256`): a file
    /// whose `ETag` differs — replaced under the same name since — is refused.
    pub sha256: Option<String>,
    /// The provisioner's repair key, `TYPE BASE64` (`nk.repair_key=TYPE:BASE64`): the node's
    /// first boot makes it the one `authorized_keys` line, limited to `nodekeeper-guard repair`.
    pub repair_key: Option<String>,
}

/// How the image is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// The raw disk image, byte for byte.
    #[default]
    Raw,
    /// The raw disk image compressed with zstd (frame checksum included).
    Zstd,
}

impl Params {
    /// Parses `/proc/cmdline`-style text.
    pub fn from_cmdline(cmdline: &str) -> Result<Params, String> {
        let get = |key: &str| {
            cmdline.split_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('=')).map(str::to_owned)
        };
        let need =
            |key: &str| get(key).filter(|v| !v.is_empty()).ok_or_else(|| format!("kernel command line has no {key}="));
        Ok(Params {
            server: need("nk.server")?,
            host: need("nk.host")?,
            token: need("nk.token")?,
            image: need("nk.image")?,
            disk: get("nk.disk").unwrap_or_default(),
            root_device: get("nk.root_device")
                .filter(|v| !v.is_empty())
                .map(|v| disks::Hint::parse(&v).map_err(|e| format!("nk.root_device: {e}")))
                .transpose()?,
            ca: get("nk.ca").filter(|v| !v.is_empty()),
            tls: None,
            format: match get("nk.format").as_deref() {
                None | Some("raw") => Format::Raw,
                Some("zstd") => Format::Zstd,
                Some(other) => return Err(format!("nk.format={other}: raw or zstd")),
            },
            size: get("nk.size")
                .map(|v| v.parse().map_err(|_| format!("nk.size={v}: a number of bytes")))
                .transpose()?,
            sha256: get("nk.sha256")
                .map(|v| {
                    let ok = v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit());
                    if ok {
                        Ok(v.to_ascii_lowercase())
                    } else {
                        Err(format!("nk.sha256={v}: 64 hex digits"))
                    }
                })
                .transpose()?,
            repair_key: get("nk.repair_key").map(|v| parse_repair_key(&v)).transpose()?,
        })
    }

    /// With an `https://` server: fetches the CA from the provisioner's plain HTTP side (the
    /// scheme and authority of `nk.image`, `/tls/ca.pem`) and keeps it only if its sha256 is
    /// `nk.ca`. A plain `http://` server needs nothing.
    pub fn trust(&mut self) -> io::Result<()> {
        if !self.server.starts_with("https://") {
            return Ok(());
        }
        let pin = self.ca.clone().ok_or_else(|| io::Error::other("nk.server is https:// but there is no nk.ca="))?;
        let url = split_url(&self.image).map_err(io::Error::other)?;
        let mut resp = request(&format!("http://{}/tls/ca.pem", url.authority), None, "GET", &[], None)?;
        if resp.status != 200 {
            return Err(io::Error::other(format!("GET /tls/ca.pem: HTTP {}", resp.status)));
        }
        let mut pem = Vec::new();
        resp.body.by_ref().take(64 << 10).read_to_end(&mut pem)?;
        self.tls = Some(Tls::from_pinned_pem(&pem, &pin)?);
        Ok(())
    }
}

/// A URL the agent can fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// `https://`.
    pub tls: bool,
    /// `HOST:PORT` (the port filled in).
    pub authority: String,
    /// The host alone (brackets of an IPv6 address removed).
    pub host: String,
    /// `/PATH`.
    pub path: String,
}

/// `http(s)://HOST[:PORT]/PATH` → its parts.
pub fn split_url(url: &str) -> Result<Url, String> {
    if !url.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!("a URL of printable ASCII without spaces is needed: {url:?}"));
    }
    let (tls, rest) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
        (Some(rest), _) => (false, rest),
        (_, Some(rest)) => (true, rest),
        _ => return Err(format!("only http:// and https:// URLs are supported: {url}")),
    };
    let (authority, path) = rest.split_once('/').map_or((rest, "/".to_owned()), |(a, p)| (a, format!("/{p}")));
    let has_port =
        authority.rsplit_once(':').is_some_and(|(h, _)| !h.ends_with(':') && (h.ends_with(']') || !h.contains(':')));
    let host = if has_port { authority.rsplit_once(':').map_or(authority, |(h, _)| h) } else { authority };
    let host = host.trim_matches(['[', ']']);
    if host.is_empty() {
        return Err(format!("no host in {url}"));
    }
    let authority = if has_port { authority.to_owned() } else { format!("{authority}:{}", if tls { 443 } else { 80 }) };
    Ok(Url { tls, authority, host: host.to_owned(), path })
}

/// A connection, plain or TLS.
pub enum Conn {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

/// A response: status, headers (names lower-cased) and the body still to read.
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// Headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: BufReader<Conn>,
}

impl Response {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request with `Connection: close` to `url`, over TLS (trusting `tls` only)
/// when it is `https://`.
pub fn request(
    url: &str,
    tls: Option<&Tls>,
    method: &str,
    extra: &[(&str, &str)],
    body: Option<&[u8]>,
) -> io::Result<Response> {
    let url = split_url(url).map_err(io::Error::other)?;
    let stream = TcpStream::connect(&url.authority)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    stream.set_write_timeout(Some(Duration::from_secs(60)))?;
    let mut conn = if url.tls {
        let tls = tls.ok_or_else(|| io::Error::other(format!("no CA to check https://{} against", url.authority)))?;
        let name = rustls_pki_types::ServerName::try_from(url.host.clone())
            .map_err(|e| io::Error::other(format!("{}: {e}", url.host)))?;
        let client = rustls::ClientConnection::new(tls.config.clone(), name).map_err(io::Error::other)?;
        Conn::Tls(Box::new(rustls::StreamOwned::new(client, stream)))
    } else {
        Conn::Plain(stream)
    };
    let mut head = format!(
        "{method} {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nUser-Agent: nodekeeper-deploy\r\n",
        url.path, url.authority
    );
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    let mut out = head.into_bytes();
    if let Some(b) = body {
        out.extend_from_slice(
            format!("Content-Type: application/json\r\nContent-Length: {}\r\n\r\n", b.len()).as_bytes(),
        );
        out.extend_from_slice(b);
    } else {
        out.extend_from_slice(b"\r\n");
    }
    conn.write_all(&out)?;
    conn.flush()?;
    let mut reader = BufReader::with_capacity(1 << 20, conn);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    Ok(Response { status, headers, body: reader })
}

/// Reports a stage to the provisioner (`POST /api/v1/hosts/{host}/deploy`). Errors are
/// returned, not fatal: the provisioner's deadline notices a silent agent.
pub fn report(p: &Params, stage: &str, error: Option<&str>, detail: Option<&str>) -> io::Result<u16> {
    let mut body = serde_json::json!({ "token": p.token, "stage": stage });
    if let Some(e) = error {
        body["error"] = e.into();
    }
    if let Some(d) = detail {
        body["detail"] = d.into();
    }
    let url = format!("{}/api/v1/hosts/{}/deploy", p.server.trim_end_matches('/'), p.host);
    let mut resp = request(&url, p.tls.as_ref(), "POST", &[], Some(body.to_string().as_bytes()))?;
    let mut sink = Vec::new();
    let _ = resp.body.read_to_end(&mut sink);
    Ok(resp.status)
}

/// [`report`], retried every 2 s while the provisioner is unreachable or answers 5xx (it may
/// be restarting: the operation waits in its database), and every 0.5 s while it answers 409
/// (the reimage has not reached the step that takes this report yet: the executor moves on
/// within a tick), up to `tries` times. Any other 4xx answer is final. Returns the last
/// status, or the last error.
pub fn report_until_heard(
    p: &Params,
    stage: &str,
    error: Option<&str>,
    detail: Option<&str>,
    tries: u32,
) -> io::Result<u16> {
    let mut last = Err(io::Error::other("not tried"));
    for attempt in 0..tries.max(1) {
        if attempt > 0 {
            let pause = if matches!(last, Ok(409)) { Duration::from_millis(500) } else { Duration::from_secs(2) };
            std::thread::sleep(pause);
        }
        last = report(p, stage, error, detail);
        if matches!(last, Ok(status) if status < 500 && status != 409) {
            break;
        }
    }
    last
}

/// How long the agent keeps trying to deliver a stage report (tries, 2 s apart).
const REPORT_TRIES: u32 = 90;

/// How a deploy ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Written and its sha256 matched.
    Verified {
        /// Bytes written.
        bytes: u64,
        /// The sha256.
        sha256: String,
    },
    /// Written, but the bytes do not match the expected sha256.
    Mismatch {
        /// The server's.
        expected: String,
        /// What was written.
        actual: String,
    },
    /// The compressed stream did not decode (corrupt data, a failed frame checksum) or
    /// decoded to another size than the raw image's.
    Corrupt {
        /// The decoder's or the size check's words.
        reason: String,
    },
}

/// The first bytes of the image are held back until it is verified: the partition table and
/// boot code (MBR, or a GPT header and its entries) live there, so a disk whose image did not
/// verify has none and is never booted.
pub const HEAD: usize = 64 << 10;

/// The config block: the last 4 KiB of the disk, written after the image verified, read by the
/// node's first boot (`images/node/firstboot`).
pub const CONFIG_BLOCK: u64 = 4096;

/// Streams the image to `disk`: the served bytes hashed as they arrive (and a broken download
/// resumed where it broke, with `Range`, as long as the `ETag` is the same), decompressed when
/// the image is zstd, and written zero-aware ([`stream::Sink`]): blocks of data are written,
/// all-zero blocks are zeroed by the device. The first [`HEAD`] bytes on the disk are zeroed
/// at once and written only by [`finish`], after the image verified. The check is the sha256
/// of the served bytes against the `ETag` (and, with TLS, against the digest taken over TLS);
/// a zstd image also passes zstd's frame checksum over the raw bytes and must decode to
/// `nk.size` bytes. `progress` is called with (served bytes so far, served total) about every
/// 10%. Returns the outcome, the held-back head and what was written.
pub fn write_image(p: &Params, mut progress: impl FnMut(u64, u64)) -> io::Result<(Outcome, Vec<u8>)> {
    write_image_counted(p, &mut progress).map(|(outcome, head, _)| (outcome, head))
}

/// [`write_image`], also returning what the sink did.
pub fn write_image_counted(
    p: &Params,
    progress: &mut dyn FnMut(u64, u64),
) -> io::Result<(Outcome, Vec<u8>, stream::Written)> {
    let trusted = trusted_digest(p)?;
    let mut download = stream::Download::start(p)?;
    if let Some(trusted) = trusted.filter(|t| *t != download.etag) {
        return Err(io::Error::other(format!(
            "the image served over plain HTTP says sha256 {}, the provisioner over TLS says {trusted}: refusing it",
            download.etag
        )));
    }
    if let Some(recorded) = p.sha256.as_deref().filter(|r| *r != download.etag) {
        return Err(io::Error::other(format!(
            "the served image has sha256 {}, the catalogue recorded {recorded}: it was replaced since the reimage \
             was requested; refusing it",
            download.etag
        )));
    }
    let expected = download.etag.clone();
    let total = download.total;
    let disk = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&p.disk)?;
    // Whatever was bootable on this disk is not any more.
    (&disk).write_all(&[0u8; HEAD])?;
    disk.sync_data()?;
    let mut sink = stream::Sink::new(&disk);
    let mut buf = vec![0u8; 1 << 20];
    let mut next_report = total / 10;
    let (started, mut disk_time) = (Instant::now(), Duration::ZERO);
    let decoded: io::Result<()> = (|| {
        let mut raw: Box<dyn Read + '_> = match p.format {
            Format::Raw => Box::new(&mut download),
            Format::Zstd => Box::new(zstd::stream::read::Decoder::new(&mut download)?),
        };
        loop {
            let n = stream::read_full(&mut *raw, &mut buf)?;
            if n == 0 {
                return Ok(());
            }
            let put = Instant::now();
            sink.put(&buf[..n]).map_err(|e| io::Error::other(Disk(e)))?;
            disk_time += put.elapsed();
            // The decoder holds `download`: progress by the raw bytes, scaled to the served.
            let done = p.size.filter(|s| *s > 0).map_or(sink.written.raw, |s| {
                (u128::from(sink.written.raw) * u128::from(total) / u128::from(s)) as u64
            });
            if total > 0 && done >= next_report {
                progress(done.min(total), total);
                next_report += (total / 10).max(1);
            }
        }
    })();
    if let Err(e) = decoded {
        if let Some(disk_error) = e.get_ref().and_then(|i| i.downcast_ref::<Disk>()) {
            return Err(io::Error::new(disk_error.0.kind(), format!("writing {}: {}", p.disk, disk_error.0)));
        }
        if stream::is_broke(&e) || p.format == Format::Raw {
            return Err(io::Error::other(format!("image download: {e}")));
        }
        let reason = format!("the zstd stream does not decode: {e}");
        return Ok((Outcome::Corrupt { reason }, std::mem::take(&mut sink.head), sink.written));
    }
    let put = Instant::now();
    sink.flush()?;
    disk_time += put.elapsed();
    let streamed = started.elapsed();
    let synced = Instant::now();
    disk.sync_all()?;
    let mut written = sink.written;
    let (net, hash) = (download.net_time, download.hash_time);
    written.times = stream::Times {
        net,
        hash,
        disk: disk_time,
        decode: streamed.saturating_sub(net + hash + disk_time),
        sync: synced.elapsed(),
    };
    let head = std::mem::take(&mut sink.head);
    let actual = download.sha256();
    let raw_size = written.raw;
    if download.received != total {
        return Err(io::Error::other(format!("image truncated: {} of {total} bytes", download.received)));
    }
    if actual != expected {
        return Ok((Outcome::Mismatch { expected, actual }, head, written));
    }
    if let Some(size) = p.size.filter(|s| *s != raw_size) {
        return Ok((
            Outcome::Corrupt { reason: format!("the image decoded to {raw_size} bytes, the catalogue says {size}") },
            head,
            written,
        ));
    }
    Ok((Outcome::Verified { bytes: raw_size, sha256: actual }, head, written))
}

/// A write to the disk failed (told apart from the stream's errors).
#[derive(Debug)]
struct Disk(io::Error);

impl std::fmt::Display for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Disk {}

/// With TLS: the image's sha256 as the provisioner's HTTPS listener gives it (`HEAD` of the
/// image's path there), the digest the plainly streamed bytes must match.
fn trusted_digest(p: &Params) -> io::Result<Option<String>> {
    let Some(tls) = &p.tls else { return Ok(None) };
    let path = split_url(&p.image).map_err(io::Error::other)?.path;
    let url = format!("{}{path}", p.server.trim_end_matches('/'));
    let resp = request(&url, Some(tls), "HEAD", &[], None)?;
    if resp.status != 200 {
        return Err(io::Error::other(format!("HEAD {url}: HTTP {}", resp.status)));
    }
    etag(&resp).map(Some).ok_or_else(|| io::Error::other(format!("HEAD {url}: no sha256 ETag")))
}

pub(crate) fn etag(resp: &Response) -> Option<String> {
    resp.header("etag").map(|e| e.trim_matches('"').to_ascii_lowercase()).filter(|e| e.len() == 64)
}

/// The text of the config block (NUL-padded to [`CONFIG_BLOCK`] on the disk): with TLS, the
/// CA's DER in base64 on a `ca=` line; with a repair key, a `repair_key=TYPE BASE64` line.
pub fn config_block(p: &Params) -> String {
    use base64::Engine;
    let mut block = format!("NODEKEEPER-CONFIG 1\nhost={}\nserver={}\ntoken={}\n", p.host, p.server, p.token);
    if let Some(tls) = &p.tls {
        block.push_str(&format!("ca={}\n", base64::engine::general_purpose::STANDARD.encode(&tls.ca_der)));
    }
    if let Some(key) = &p.repair_key {
        block.push_str(&format!("repair_key={key}\n"));
    }
    block
}

/// `nk.repair_key=TYPE:BASE64` → `TYPE BASE64`: an SSH key type and base64, nothing that a
/// shell or `authorized_keys` would read as anything else.
fn parse_repair_key(v: &str) -> Result<String, String> {
    let bad = || format!("nk.repair_key={v}: expected TYPE:BASE64 (an SSH public key)");
    let (kind, key) = v.split_once(':').ok_or_else(bad)?;
    let kind_ok = (3..=40).contains(&kind.len())
        && (kind.starts_with("ssh-") || kind.starts_with("ecdsa-") || kind.starts_with("sk-"))
        && kind.bytes().all(|b| b.is_ascii_alphanumeric() || b"-@.".contains(&b));
    let key_ok =
        (16..=1024).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b));
    if kind_ok && key_ok {
        Ok(format!("{kind} {key}"))
    } else {
        Err(bad())
    }
}

/// After the image verified: the config block at the end of the disk, then the held-back
/// head, each synced. A regular file (tests) grows to hold the block; a block device too small
/// for image and block is an error.
pub fn finish(p: &Params, image_len: u64, head: &[u8]) -> io::Result<()> {
    let mut disk = std::fs::OpenOptions::new().write(true).open(&p.disk)?;
    let mut end = disk.seek(SeekFrom::End(0))?;
    let needed = image_len.div_ceil(CONFIG_BLOCK) * CONFIG_BLOCK + CONFIG_BLOCK;
    if end < needed {
        if !disk.metadata()?.file_type().is_file() {
            return Err(io::Error::other(format!(
                "the disk ({end} bytes) is too small for the image ({image_len} bytes) and its config block"
            )));
        }
        disk.set_len(needed)?;
        end = needed;
    }
    let mut block = config_block(p).into_bytes();
    if block.len() > CONFIG_BLOCK as usize {
        return Err(io::Error::other("the config block does not fit in 4 KiB"));
    }
    block.resize(CONFIG_BLOCK as usize, 0);
    disk.seek(SeekFrom::Start((end / CONFIG_BLOCK - 1) * CONFIG_BLOCK))?;
    disk.write_all(&block)?;
    disk.sync_data()?;
    disk.seek(SeekFrom::Start(0))?;
    disk.write_all(head)?;
    disk.sync_all()
}

/// The disk to write: the image's size from a `HEAD`, the disks from `/sys/block`.
fn pick_disk(p: &Params) -> Result<disks::Disk, String> {
    let head = request(&p.image, None, "HEAD", &[], None).map_err(|e| format!("HEAD {}: {e}", p.image))?;
    if head.status != 200 {
        return Err(format!("HEAD {}: HTTP {}", p.image, head.status));
    }
    let served: u64 = head.header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    let size = p.size.unwrap_or(served);
    let seen = disks::scan(Path::new("/sys/block")).map_err(|e| format!("reading /sys/block: {e}"))?;
    // The image rounded up to whole blocks, and the config block after it (see `finish`).
    disks::choose(&seen, p.root_device.as_ref(), size.div_ceil(CONFIG_BLOCK) * CONFIG_BLOCK + CONFIG_BLOCK)
}

/// The whole deploy: booted → written → verified (or the error at its stage). Returns whether
/// the disk holds the verified image (and the node may reboot into it).
pub fn deploy(p: &mut Params, log: &mut dyn FnMut(&str)) -> bool {
    let started = Instant::now();
    // The CA first: without it nothing can be reported to an https:// provisioner. Retried
    // while the provisioner may be restarting; a CA that does not match is final.
    for attempt in 0..REPORT_TRIES {
        match p.trust() {
            Ok(()) => break,
            Err(e) if e.to_string().contains("refusing") || attempt + 1 == REPORT_TRIES => {
                log(&format!("cannot trust the provisioner: {e}"));
                return false;
            }
            Err(e) => {
                log(&format!("fetching the provisioner's CA: {e} (again in 2 s)"));
                std::thread::sleep(Duration::from_secs(2));
            }
        }
    }
    if p.disk.is_empty() {
        match pick_disk(p) {
            Ok(disk) => {
                log(&format!(
                    "target disk {} (of {})",
                    disk.dev(),
                    p.root_device.as_ref().map_or_else(
                        || "no hint: the smallest fixed disk that holds the image".to_owned(),
                        |h| format!("root-device hint {}", h.to_arg())
                    )
                ));
                p.disk = disk.dev();
            }
            Err(e) => {
                // Nothing is written: the reimage fails at agent_booted with the disks seen.
                log(&format!("no target disk: {e}"));
                let _ = report_until_heard(p, "booted", Some(&e), None, REPORT_TRIES);
                return false;
            }
        }
    }
    let p = &*p;
    if let Err(e) = report_until_heard(p, "booted", None, None, REPORT_TRIES) {
        log(&format!("reporting booted: {e}"));
    }
    log(&format!("writing {} to {}", p.image, p.disk));
    let mut report_progress = |done: u64, total: u64| {
        let detail = format!("{}% ({} of {} MiB)", done * 100 / total.max(1), done >> 20, total >> 20);
        let _ = report(p, "booted", None, Some(&detail));
    };
    let outcome = write_image_counted(p, &mut report_progress);
    match outcome {
        Err(e) => {
            log(&format!("write failed: {e}"));
            let _ = report_until_heard(p, "written", Some(&e.to_string()), None, REPORT_TRIES);
            false
        }
        Ok((Outcome::Mismatch { expected, actual }, _, _)) => {
            let reason = format!("sha256 mismatch: expected {expected}, received {actual}");
            fail_verification(p, log, &reason)
        }
        Ok((Outcome::Corrupt { reason }, _, _)) => fail_verification(p, log, &reason),
        Ok((Outcome::Verified { bytes, sha256 }, head, written)) => {
            let detail = format!(
                "{bytes} bytes in {:.1} s ({} MiB written, {} MiB zeroed by the disk; {}), sha256 {sha256}",
                started.elapsed().as_secs_f64(),
                written.data >> 20,
                written.zeroed >> 20,
                written.times,
            );
            log(&format!("verified: {detail}"));
            let _ = report_until_heard(p, "written", None, Some(&detail), REPORT_TRIES);
            if let Err(e) = finish(p, bytes, &head) {
                let reason = format!("making the disk bootable: {e}");
                log(&reason);
                let _ = report_until_heard(p, "verified", Some(&reason), None, REPORT_TRIES);
                return false;
            }
            let _ = report_until_heard(p, "verified", None, Some(&detail), REPORT_TRIES);
            true
        }
    }
}

/// The image was written but is not the one asked for: `written` without error, then
/// `verified` with the reason. The head was never written: the disk does not boot.
fn fail_verification(p: &Params, log: &mut dyn FnMut(&str), reason: &str) -> bool {
    log(reason);
    let _ = report_until_heard(p, "written", None, None, REPORT_TRIES);
    let _ = report_until_heard(p, "verified", Some(reason), None, REPORT_TRIES);
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_parameters() {
        let p = Params::from_cmdline(
            "BOOT_IMAGE=vmlinuz initrd=initrd.img nk.server=http://10.20.0.1:8080 nk.host=node-a nk.token=abc nk.image=http://10.20.0.1:8080/images/node.img console=ttyS0\n",
        )
        .expect("params");
        assert_eq!((p.host.as_str(), p.token.as_str(), p.disk.as_str()), ("node-a", "abc", ""), "chosen later");
        let p =
            Params::from_cmdline("nk.server=s nk.host=a nk.token=t nk.image=i nk.root_device=serial=AB%20C,size>=2G")
                .expect("params");
        assert_eq!(p.root_device.and_then(|h| h.serial).as_deref(), Some("AB C"));
        assert!(Params::from_cmdline("nk.server=s nk.host=a nk.token=t nk.image=i nk.root_device=colour=red")
            .expect_err("bad hint")
            .contains("nk.root_device"));
        assert!(Params::from_cmdline("nk.server=x nk.host=a nk.token= nk.image=y")
            .expect_err("empty token")
            .contains("nk.token"));
        assert!(Params::from_cmdline("quiet").is_err());
        let p =
            Params::from_cmdline(&format!("nk.server=s nk.host=a nk.token=t nk.image=i nk.sha256={}", "AB".repeat(32)))
                .expect("params");
        assert_eq!(p.sha256, Some("ab".repeat(32)));
        let with_key = Params::from_cmdline(&format!(
            "nk.server=s nk.host=a nk.token=t nk.image=i nk.repair_key=ssh-ed25519:{}",
            "AAAAC3NzaC1lZDI1NTE5AAAAI".repeat(2)
        ))
        .expect("a repair key");
        assert!(with_key.repair_key.as_deref().is_some_and(|k| k.starts_with("ssh-ed25519 AAAA")));
        assert!(config_block(&with_key).contains("\nrepair_key=ssh-ed25519 AAAA"));
        for bad in ["ssh-ed25519", "ssh-ed25519:abc", "rm:AAAAAAAAAAAAAAAAAAAA", "ssh-rsa:AAAA\"AAAAAAAAAAAAAAAAAA"] {
            let e = Params::from_cmdline(&format!("nk.server=s nk.host=a nk.token=t nk.image=i nk.repair_key={bad}"))
                .expect_err(bad);
            assert!(e.contains("nk.repair_key"), "{bad}: {e}");
        }
        assert!(Params::from_cmdline("nk.server=s nk.host=a nk.token=t nk.image=i nk.sha256=xyz")
            .expect_err("not a digest")
            .contains("nk.sha256"));
    }

    #[test]
    fn urls() {
        let parts = |u: &str| split_url(u).map(|u| (u.tls, u.authority, u.host, u.path));
        assert_eq!(
            parts("http://10.20.0.1:8080/images/a.img").expect("url"),
            (false, "10.20.0.1:8080".into(), "10.20.0.1".into(), "/images/a.img".into())
        );
        assert_eq!(
            parts("http://10.20.0.1").expect("url"),
            (false, "10.20.0.1:80".into(), "10.20.0.1".into(), "/".into())
        );
        assert_eq!(parts("https://x/").expect("url"), (true, "x:443".into(), "x".into(), "/".into()));
        assert_eq!(
            parts("https://[fd00::1]:8443/a").expect("url"),
            (true, "[fd00::1]:8443".into(), "fd00::1".into(), "/a".into())
        );
        assert_eq!(
            parts("http://[fd00::1]/").expect("url"),
            (false, "[fd00::1]:80".into(), "fd00::1".into(), "/".into())
        );
        assert!(split_url("ftp://x/").is_err());
        assert!(split_url("http:///x").is_err());
        assert!(split_url("https://[/[").is_err(), "brackets alone are no host (found by fuzzing)");
        assert!(split_url("http://a\u{0}b/").is_err(), "no control characters in a request line");
    }

    #[test]
    fn a_ca_is_trusted_only_by_its_digest() {
        // Any certificate will do to check the pinning (its use in TLS is tested against the
        // provisioner in provisioner/tests/tls.rs).
        let der: Vec<u8> = include_bytes!("../tests/data/ca.der").to_vec();
        let pem = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &der)
        );
        let pin = hex_sha256(&der);
        let tls = Tls::from_pinned_pem(pem.as_bytes(), &pin).expect("pinned");
        assert_eq!(tls.ca_der, der);
        let e = Tls::from_pinned_pem(pem.as_bytes(), &"0".repeat(64)).expect_err("other pin").to_string();
        assert!(e.contains("refusing"), "{e}");
        assert!(Tls::from_pinned_pem(b"garbage", &pin).is_err());
        let mut p = Params::from_cmdline(&format!(
            "nk.server=https://10.0.0.1:8443 nk.host=a nk.token=t nk.image=http://10.0.0.1:8080/images/x nk.ca={pin}"
        ))
        .expect("params");
        assert_eq!(p.ca.as_deref(), Some(pin.as_str()));
        p.tls = Some(tls);
        let block = config_block(&p);
        assert!(block.contains("\nserver=https://10.0.0.1:8443\n"), "{block}");
        let ca_line = block.lines().find_map(|l| l.strip_prefix("ca=")).expect("ca line");
        assert_eq!(base64::Engine::decode(&base64::engine::general_purpose::STANDARD, ca_line).expect("b64"), der);
    }
}

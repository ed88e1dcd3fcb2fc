//! The deploy agent, as a library so its parts are testable: kernel command-line parameters,
//! a minimal HTTP/1.1 client (the provisioner is reached by IP address: no DNS, no TLS in the
//! ramdisk), and the deploy itself — stream the image to the disk, hashing as it goes,
//! compare with the server's sha256 `ETag`, report every stage.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

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
    /// The target disk (`nk.disk`, default `/dev/vda`).
    pub disk: String,
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
            disk: get("nk.disk").unwrap_or_else(|| "/dev/vda".into()),
        })
    }
}

/// `http://HOST:PORT/PATH` → (`HOST:PORT`, `/PATH`).
pub fn split_url(url: &str) -> Result<(String, String), String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| format!("only http:// URLs are supported: {url}"))?;
    let (authority, path) = rest.split_once('/').map_or((rest, "/".to_owned()), |(a, p)| (a, format!("/{p}")));
    let authority = if authority.contains(':') { authority.to_owned() } else { format!("{authority}:80") };
    Ok((authority, path))
}

/// A response: status, headers (names lower-cased) and the body still to read.
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// Headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: BufReader<TcpStream>,
}

impl Response {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request with `Connection: close`.
pub fn request(method: &str, url: &str, body: Option<&[u8]>) -> io::Result<Response> {
    let (authority, path) = split_url(url).map_err(io::Error::other)?;
    let stream = TcpStream::connect(&authority)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut w = io::BufWriter::new(stream.try_clone()?);
    write!(
        w,
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nUser-Agent: nodekeeper-deploy\r\n"
    )?;
    if let Some(b) = body {
        write!(w, "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n", b.len())?;
        w.write_all(b)?;
    } else {
        write!(w, "\r\n")?;
    }
    w.flush()?;
    let mut reader = BufReader::with_capacity(1 << 20, stream);
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
    let mut resp = request("POST", &url, Some(body.to_string().as_bytes()))?;
    let mut sink = Vec::new();
    let _ = resp.body.read_to_end(&mut sink);
    Ok(resp.status)
}

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
}

/// Streams the image to `disk`, hashing as it writes; fsyncs; compares with the ETag.
/// `progress` is called with (bytes so far, total) about every 10%.
pub fn write_image(p: &Params, mut progress: impl FnMut(u64, u64)) -> io::Result<Outcome> {
    let mut resp = request("GET", &p.image, None)?;
    if resp.status != 200 {
        return Err(io::Error::other(format!("GET {}: HTTP {}", p.image, resp.status)));
    }
    let total: u64 = resp.header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    let expected = resp
        .header("etag")
        .map(|e| e.trim_matches('"').to_ascii_lowercase())
        .filter(|e| e.len() == 64)
        .ok_or_else(|| io::Error::other("the image has no sha256 ETag to verify against"))?;
    let mut disk = std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(&p.disk)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let (mut written, mut next_report) = (0u64, total / 10);
    loop {
        let n = resp.body.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        disk.write_all(&buf[..n])?;
        written += n as u64;
        if total > 0 && written >= next_report {
            progress(written, total);
            next_report += total / 10;
        }
    }
    if total > 0 && written != total {
        return Err(io::Error::other(format!("image truncated: {written} of {total} bytes")));
    }
    disk.sync_all()?;
    let actual = format!("{:x}", hasher.finalize());
    Ok(if actual == expected {
        Outcome::Verified { bytes: written, sha256: actual }
    } else {
        Outcome::Mismatch { expected, actual }
    })
}

/// The whole deploy: booted → written → verified (or the error at its stage). Returns whether
/// the disk holds the verified image (and the node may reboot into it).
pub fn deploy(p: &Params, log: &mut dyn FnMut(&str)) -> bool {
    let started = Instant::now();
    if let Err(e) = report(p, "booted", None, None) {
        log(&format!("reporting booted: {e}"));
    }
    log(&format!("writing {} to {}", p.image, p.disk));
    let outcome = write_image(p, |done, total| {
        let detail = format!("{}% ({} of {} MiB)", done * 100 / total.max(1), done >> 20, total >> 20);
        let _ = report(p, "booted", None, Some(&detail));
    });
    match outcome {
        Err(e) => {
            log(&format!("write failed: {e}"));
            let _ = report(p, "written", Some(&e.to_string()), None);
            false
        }
        Ok(Outcome::Mismatch { expected, actual }) => {
            let reason = format!("sha256 mismatch: expected {expected}, wrote {actual}");
            log(&reason);
            let _ = report(p, "written", None, None);
            let _ = report(p, "verified", Some(&reason), None);
            false
        }
        Ok(Outcome::Verified { bytes, sha256 }) => {
            let detail = format!("{bytes} bytes in {:.1} s, sha256 {sha256}", started.elapsed().as_secs_f64());
            log(&format!("verified: {detail}"));
            let _ = report(p, "written", None, Some(&detail));
            let _ = report(p, "verified", None, Some(&detail));
            true
        }
    }
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
        assert_eq!((p.host.as_str(), p.token.as_str(), p.disk.as_str()), ("node-a", "abc", "/dev/vda"));
        assert!(Params::from_cmdline("nk.server=x nk.host=a nk.token= nk.image=y")
            .expect_err("empty token")
            .contains("nk.token"));
        assert!(Params::from_cmdline("quiet").is_err());
    }

    #[test]
    fn urls() {
        assert_eq!(
            split_url("http://10.20.0.1:8080/images/a.img").expect("url"),
            ("10.20.0.1:8080".into(), "/images/a.img".into())
        );
        assert_eq!(split_url("http://10.20.0.1").expect("url"), ("10.20.0.1:80".into(), "/".into()));
        assert!(split_url("https://x/").is_err());
    }
}

//! The agent's download and write against a small HTTP server of the test's own that can cut
//! a connection in the middle of the compressed stream: the download resumes with `Range`
//! below the decompressor, corruption anywhere fails verification, the disk is the image.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use nodekeeper_deploy::{write_image_counted, Outcome, Params, HEAD};

/// Serves `body` at any path with a fixed `ETag`; honours `Range: bytes=N-`. The first
/// `cut_first` connections are closed after `cut_at` bytes of body.
fn server(body: Vec<u8>, etag: String, cut_at: usize, cut_first: usize) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/images/x.raw.zst", listener.local_addr().expect("addr"));
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().take(20) {
            let Ok(mut conn) = conn else { continue };
            let n = count.fetch_add(1, Ordering::SeqCst);
            let mut reader = BufReader::new(conn.try_clone().expect("clone"));
            let (mut line, mut from, mut head) = (String::new(), 0usize, false);
            let _ = reader.read_line(&mut line);
            head |= line.starts_with("HEAD");
            loop {
                line.clear();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                    break;
                }
                if let Some(r) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    from = r.trim().trim_end_matches('-').parse().expect("range");
                }
            }
            let status = if from > 0 { "206 Partial Content" } else { "200 OK" };
            let rest = &body[from..];
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nETag: \"{etag}\"\r\nConnection: close\r\n\r\n",
                rest.len()
            );
            if head {
                continue;
            }
            let send = if n < cut_first { &rest[..cut_at.min(rest.len())] } else { rest };
            let _ = conn.write_all(send);
        }
    });
    (url, served)
}

/// A raw disk image: a partition-table-like head, runs of random data, long zero runs.
fn image() -> Vec<u8> {
    let mut img = vec![0u8; 12 << 20];
    let mut x: u64 = 88172645463325252;
    let mut fill = |range: std::ops::Range<usize>, img: &mut Vec<u8>| {
        for b in &mut img[range] {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    };
    fill(0..2048, &mut img);
    fill(1 << 20..3 << 20, &mut img);
    fill((7 << 20) + 4096..(7 << 20) + 200_000, &mut img);
    img
}

fn sha256(bytes: &[u8]) -> String {
    nodekeeper_deploy::stream::hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

fn params(url: &str, disk: &std::path::Path, size: usize, zstd: bool) -> Params {
    let format = if zstd { format!(" nk.format=zstd nk.size={size}") } else { String::new() };
    Params::from_cmdline(&format!(
        "nk.server=http://127.0.0.1:1 nk.host=a nk.token=t nk.image={url} nk.disk={}{format}",
        disk.display()
    ))
    .expect("params")
}

/// A disk file full of old bytes.
fn old_disk(dir: &std::path::Path, len: usize) -> std::path::PathBuf {
    let path = dir.join("disk");
    std::fs::write(&path, vec![0xc3u8; len]).expect("old disk");
    path
}

#[test]
fn a_broken_connection_resumes_in_the_middle_of_the_compressed_stream() {
    let img = image();
    let compressed = zstd::bulk::compress(&img, 3).expect("compress");
    let etag = sha256(&compressed);
    // Cut the first connection half-way through the compressed bytes.
    let (url, served) = server(compressed.clone(), etag.clone(), compressed.len() / 2, 1);
    let dir = tempfile::tempdir().expect("dir");
    let disk = old_disk(dir.path(), 16 << 20);
    let p = params(&url, &disk, img.len(), true);
    let (outcome, head, written) = write_image_counted(&p, &mut |_, _| {}).expect("write");
    assert_eq!(outcome, Outcome::Verified { bytes: img.len() as u64, sha256: etag });
    assert_eq!(served.load(Ordering::SeqCst), 2, "one cut, one resume");
    assert_eq!(head, img[..HEAD]);
    let after = std::fs::read(&disk).expect("disk");
    assert_eq!(&after[HEAD..img.len()], &img[HEAD..], "the image over the old bytes, zeros included");
    assert!(after[..HEAD].iter().all(|&b| b == 0), "the head waits for finish()");
    assert!(written.data < 3 << 20, "zero blocks were not written: {written:?}");
    assert_eq!(written.data + written.zeroed + HEAD as u64, img.len() as u64);
}

#[test]
fn corruption_anywhere_in_the_compressed_stream_fails_verification() {
    let img = image();
    let good = zstd::bulk::compress(&img, 3).expect("compress");
    let etag = sha256(&good);
    let dir = tempfile::tempdir().expect("dir");
    for at in [20, good.len() / 3, good.len() / 2, good.len() - 3] {
        let mut bad = good.clone();
        bad[at] ^= 0x10;
        // The server still names the good bytes' digest (a byte rotted on its disk).
        let (url, _) = server(bad, etag.clone(), usize::MAX, 0);
        let disk = old_disk(dir.path(), 16 << 20);
        let p = params(&url, &disk, img.len(), true);
        let (outcome, _, _) = write_image_counted(&p, &mut |_, _| {}).expect("no I/O error: a verdict");
        assert!(matches!(outcome, Outcome::Corrupt { .. } | Outcome::Mismatch { .. }), "byte {at}: {outcome:?}");
        let after = std::fs::read(&disk).expect("disk");
        assert!(after[..HEAD].iter().all(|&b| b == 0), "byte {at}: the disk cannot boot");
    }
    // A stream that decodes to another size than the catalogue's.
    let (url, _) = server(good.clone(), etag, usize::MAX, 0);
    let disk = old_disk(dir.path(), 16 << 20);
    let p = params(&url, &disk, img.len() + 512, true);
    let (outcome, _, _) = write_image_counted(&p, &mut |_, _| {}).expect("verdict");
    assert!(matches!(&outcome, Outcome::Corrupt { reason } if reason.contains("decoded to")), "{outcome:?}");
}

#[test]
fn a_raw_image_is_written_zero_aware_too() {
    let img = image();
    let etag = sha256(&img);
    let (url, _) = server(img.clone(), etag.clone(), usize::MAX, 0);
    let dir = tempfile::tempdir().expect("dir");
    let disk = old_disk(dir.path(), 16 << 20);
    let p = params(&url, &disk, 0, false);
    let (outcome, _, written) = write_image_counted(&p, &mut |_, _| {}).expect("write");
    assert_eq!(outcome, Outcome::Verified { bytes: img.len() as u64, sha256: etag });
    assert!(written.zeroed > 8 << 20, "{written:?}");
    let after = std::fs::read(&disk).expect("disk");
    assert_eq!(&after[HEAD..img.len()], &img[HEAD..]);
}

#[test]
fn the_sink_reads_back_exactly_from_a_block_device() {
    // A loop device over a file of random bytes: fallocate on a real block device.
    let dir = tempfile::tempdir().expect("dir");
    let backing = dir.path().join("backing");
    let mut noise = vec![0u8; 16 << 20];
    let mut x: u64 = 1;
    for b in &mut noise {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        *b = (x >> 33) as u8;
    }
    std::fs::write(&backing, &noise).expect("backing");
    let out = std::process::Command::new("losetup").args(["-f", "--show"]).arg(&backing).output();
    let Some(dev) =
        out.ok().filter(|o| o.status.success()).map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    else {
        assert!(std::env::var_os("NODEKEEPER_REQUIRE_NETNS").is_none(), "losetup failed (root is needed)");
        eprintln!("skipped: no loop device");
        return;
    };
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup").args(["-d", &self.0]).status();
        }
    }
    let _detach = Detach(dev.clone());
    let img = image();
    let compressed = zstd::bulk::compress(&img, 3).expect("compress");
    let etag = sha256(&compressed);
    let (url, _) = server(compressed, etag, usize::MAX, 0);
    let p = params(&url, std::path::Path::new(&dev), img.len(), true);
    let (outcome, head, _) = write_image_counted(&p, &mut |_, _| {}).expect("write");
    assert!(matches!(outcome, Outcome::Verified { .. }), "{outcome:?}");
    nodekeeper_deploy::finish(&p, img.len() as u64, &head).expect("finish");
    let mut f = std::fs::File::open(&dev).expect("open device");
    let mut back = vec![0u8; img.len()];
    f.read_exact(&mut back).expect("read back");
    assert_eq!(sha256(&back), sha256(&img), "the device range is the image, over random old bytes");
}

#[test]
fn a_file_replaced_since_the_catalogue_recorded_it_is_refused_before_the_disk_is_touched() {
    let img = image();
    let recorded = sha256(&zstd::bulk::compress(&img, 3).expect("compress"));
    // Another image under the same name, with an ETag that honestly names its own bytes.
    let mut other = img.clone();
    other[(1 << 20) + 5] ^= 0xff;
    let replaced = zstd::bulk::compress(&other, 3).expect("compress");
    let (url, _) = server(replaced.clone(), sha256(&replaced), usize::MAX, 0);
    let dir = tempfile::tempdir().expect("dir");
    let disk = old_disk(dir.path(), 16 << 20);
    let mut p = params(&url, &disk, img.len(), true);
    p.sha256 = Some(recorded);
    let e = write_image_counted(&p, &mut |_, _| {}).expect_err("refused").to_string();
    assert!(e.contains("the catalogue recorded"), "{e}");
    assert!(std::fs::read(&disk).expect("disk").iter().all(|&b| b == 0xc3), "nothing written");
}

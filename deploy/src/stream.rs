//! The image's way from the network to the disk: [`Download`] (the served bytes, hashed as
//! they arrive, a broken connection resumed with `Range` where it broke — below any
//! decompressor, which never sees the break) and [`Sink`] (the raw bytes onto the disk, all-zero
//! blocks zeroed by the device instead of written, the first [`crate::HEAD`] bytes held back).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use crate::blocks::{is_zero, ZERO_BLOCK};
use crate::{etag, request, Params, Response, HEAD};

/// How many times a broken image download is resumed (2 s apart) before the deploy fails.
pub const RESUMES: u32 = 60;

/// Why the download gave up (carried inside the `io::Error` a decompressor passes on, so a
/// network failure is told from corrupt data).
#[derive(Debug)]
pub struct Broke(pub String);

impl std::fmt::Display for Broke {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Broke {}

/// Whether `e` is a [`Download`] giving up (not a decoder's complaint about the data).
pub fn is_broke(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<Broke>())
}

/// The served bytes of the image, in order, however many connections it takes: a read error or
/// an early end resumes from the last byte received with a `Range` request, as long as the
/// server's `ETag` is the one the download began with. Hashes every byte (sha256, ring: 1.6×
/// sha2's speed under QEMU's software emulation, where the deploy agent is measured).
pub struct Download<'p> {
    params: &'p Params,
    resp: Response,
    /// Bytes the server said it serves.
    pub total: u64,
    /// Bytes received so far.
    pub received: u64,
    /// The `ETag` (sha256 hex) the download began with.
    pub etag: String,
    hasher: ring::digest::Context,
    resumes: u32,
    /// Time spent waiting for the network (reads from the socket, resumes included).
    pub net_time: Duration,
    /// Time spent hashing what arrived.
    pub hash_time: Duration,
}

impl<'p> Download<'p> {
    /// Starts the download (`GET nk.image`): a 200 with a length and a sha256 `ETag`.
    pub fn start(params: &'p Params) -> io::Result<Download<'p>> {
        let resp = request(&params.image, None, "GET", &[], None)?;
        if resp.status != 200 {
            return Err(io::Error::other(format!("GET {}: HTTP {}", params.image, resp.status)));
        }
        let total = resp
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| io::Error::other(format!("GET {}: no Content-Length", params.image)))?;
        let etag = etag(&resp).ok_or_else(|| io::Error::other("the image has no sha256 ETag to verify against"))?;
        Ok(Download {
            params,
            resp,
            total,
            received: 0,
            etag,
            hasher: ring::digest::Context::new(&ring::digest::SHA256),
            resumes: 0,
            net_time: Duration::ZERO,
            hash_time: Duration::ZERO,
        })
    }

    /// The sha256 (hex) of the bytes received (call once, at the end).
    pub fn sha256(&self) -> String {
        hex(self.hasher.clone().finish().as_ref())
    }

    fn resume(&mut self, why: &io::Error) -> io::Result<()> {
        let offset = self.received;
        eprintln!("nodekeeper-deploy: download broke at {offset} bytes ({why}); resuming");
        let range = format!("bytes={offset}-");
        let mut last = String::new();
        while self.resumes < RESUMES {
            self.resumes += 1;
            std::thread::sleep(Duration::from_secs(2));
            match request(&self.params.image, None, "GET", &[("Range", &range)], None) {
                Ok(r) if r.status == 206 && etag(&r).as_deref() == Some(self.etag.as_str()) => {
                    self.resp = r;
                    return Ok(());
                }
                Ok(r) if r.status == 206 || r.status == 200 => {
                    return Err(io::Error::other(Broke("the image changed on the server during the download".into())))
                }
                Ok(r) => last = format!("HTTP {}", r.status),
                Err(e) => last = e.to_string(),
            }
        }
        Err(io::Error::other(Broke(format!(
            "image download broke at {offset} bytes ({why}) and could not be resumed: {last}"
        ))))
    }
}

impl Read for Download<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.received == self.total {
                return Ok(0);
            }
            let want = buf.len().min(usize::try_from(self.total - self.received).unwrap_or(usize::MAX));
            let started = Instant::now();
            let read = self.resp.body.read(&mut buf[..want]);
            self.net_time += started.elapsed();
            let why = match read {
                Ok(0) => io::Error::new(io::ErrorKind::UnexpectedEof, "the connection closed early"),
                Ok(n) => {
                    let started = Instant::now();
                    self.hasher.update(&buf[..n]);
                    self.hash_time += started.elapsed();
                    self.received += n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => e,
            };
            let started = Instant::now();
            let resumed = self.resume(&why);
            self.net_time += started.elapsed();
            resumed?;
        }
    }
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the sink did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Written {
    /// Raw bytes of the image.
    pub raw: u64,
    /// Bytes written to the device.
    pub data: u64,
    /// Bytes zeroed by the device (not written).
    pub zeroed: u64,
    /// Where the time went (filled by [`crate::write_image_counted`]).
    pub times: Times,
}

/// Where a deploy's write spent its time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Times {
    /// Waiting for the network.
    pub net: Duration,
    /// Hashing the served bytes.
    pub hash: Duration,
    /// Decompressing.
    pub decode: Duration,
    /// Writing and zeroing (into the page cache, and what the kernel does there).
    pub disk: Duration,
    /// The final sync to the device.
    pub sync: Duration,
}

impl std::fmt::Display for Times {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = |d: Duration| d.as_secs_f64();
        write!(
            f,
            "network {:.1} s, sha256 {:.1} s, decode {:.1} s, disk {:.1} s, sync {:.1} s",
            s(self.net),
            s(self.hash),
            s(self.decode),
            s(self.disk),
            s(self.sync)
        )
    }
}

/// The raw image onto the disk at increasing offsets: the first [`HEAD`] bytes are kept in
/// memory (the caller writes them once the image verified); every [`ZERO_BLOCK`] after that is
/// written if it holds data, or else joins a run of zeros that the device zeroes in one call
/// ([`zero_range`]) — never left holding whatever the disk held before.
pub struct Sink<'f> {
    disk: &'f File,
    /// The held-back head.
    pub head: Vec<u8>,
    /// What was done.
    pub written: Written,
    /// A run of zeros not yet zeroed: `[start, end)`.
    zeros: Option<(u64, u64)>,
}

impl<'f> Sink<'f> {
    /// A sink writing to `disk` from offset 0.
    pub fn new(disk: &'f File) -> Sink<'f> {
        Sink { disk, head: Vec::with_capacity(HEAD), written: Written::default(), zeros: None }
    }

    /// Takes the next raw bytes of the image.
    pub fn put(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        // The head, held back.
        if self.head.len() < HEAD {
            let n = (HEAD - self.head.len()).min(bytes.len());
            self.head.extend_from_slice(&bytes[..n]);
            self.written.raw += n as u64;
            bytes = &bytes[n..];
        }
        // Whole blocks (the caller hands block-aligned pieces; a short last one is fine).
        let mut data: Option<(u64, usize, usize)> = None; // (offset, from, to) within `bytes`
        let mut at = 0;
        while at < bytes.len() {
            let end = (at + ZERO_BLOCK).min(bytes.len());
            let offset = self.written.raw + at as u64;
            let block = &bytes[at..end];
            if is_zero(block) {
                if let Some((off, from, to)) = data.take() {
                    self.write_at(&bytes[from..to], off)?;
                }
                self.zeros = match self.zeros {
                    Some((s, e)) if e == offset => Some((s, offset + block.len() as u64)),
                    Some((s, e)) => {
                        self.zero(s, e)?;
                        Some((offset, offset + block.len() as u64))
                    }
                    None => Some((offset, offset + block.len() as u64)),
                };
            } else {
                if let Some((s, e)) = self.zeros.take() {
                    self.zero(s, e)?;
                }
                data = match data {
                    Some((off, from, _)) => Some((off, from, end)),
                    None => Some((offset, at, end)),
                };
            }
            at = end;
        }
        if let Some((off, from, to)) = data {
            self.write_at(&bytes[from..to], off)?;
        }
        self.written.raw += bytes.len() as u64;
        Ok(())
    }

    /// Zeroes the last run of zeros, if any.
    pub fn flush(&mut self) -> io::Result<()> {
        if let Some((s, e)) = self.zeros.take() {
            self.zero(s, e)?;
        }
        Ok(())
    }

    fn write_at(&mut self, bytes: &[u8], offset: u64) -> io::Result<()> {
        self.disk.write_all_at(bytes, offset)?;
        self.written.data += bytes.len() as u64;
        Ok(())
    }

    fn zero(&mut self, start: u64, end: u64) -> io::Result<()> {
        zero_range(self.disk, start, end - start)?;
        self.written.zeroed += end - start;
        Ok(())
    }
}

/// Makes `[offset, offset + len)` of `file` read as zeros without sending them: on a block
/// device `fallocate(PUNCH_HOLE)` is the kernel's zero-out with unmap allowed (WRITE ZEROES /
/// a discard the device guarantees to read back as zeros — Linux ≥ 4.9), and where the device
/// has no such command, `fallocate(ZERO_RANGE)` (the kernel writes zero pages itself, as
/// `BLKZEROOUT` does); on a regular file both punch or zero the range. If neither is
/// supported, or the range is not sector-aligned, zeros are written.
pub fn zero_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags};
    use std::os::fd::AsRawFd;
    if len == 0 {
        return Ok(());
    }
    let (off, n) = (i64::try_from(offset).map_err(io::Error::other)?, i64::try_from(len).map_err(io::Error::other)?);
    if offset % 512 == 0 && len % 512 == 0 {
        let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        if fallocate(file.as_raw_fd(), punch, off, n).is_ok() {
            return Ok(());
        }
        if fallocate(
            file.as_raw_fd(),
            FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            off,
            n,
        )
        .is_ok()
        {
            return Ok(());
        }
    }
    let zeros = vec![0u8; (1usize << 20).min(usize::try_from(len).unwrap_or(usize::MAX))];
    let mut f = file;
    f.seek(SeekFrom::Start(offset))?;
    let mut left = len;
    while left > 0 {
        let k = zeros.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        f.write_all(&zeros[..k])?;
        left -= k as u64;
    }
    Ok(())
}

/// Reads until `buf` is full or the stream ends.
pub fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_blocks_are_zeroed_and_data_written_over_old_bytes() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("disk");
        // The "disk" held other bytes everywhere.
        std::fs::write(&path, vec![0xa5u8; 4 << 20]).expect("old content");
        let disk = std::fs::OpenOptions::new().read(true).write(true).open(&path).expect("open");
        let mut image = vec![0u8; (3 << 20) + 4096];
        image[..10].copy_from_slice(b"bootsector");
        image[HEAD + 5] = 1; // data right after the head
        image[1 << 20] = 2;
        image[(2 << 20) + 70_000] = 3; // inside the second block of the third MiB
        let mut sink = Sink::new(&disk);
        // Pieces of odd sizes, as a decoder hands them (still covering the image in order).
        for piece in image.chunks(300_000) {
            sink.put(piece).expect("put");
        }
        sink.flush().expect("flush");
        assert_eq!(sink.head, image[..HEAD]);
        assert_eq!(sink.written.raw, image.len() as u64);
        assert!(sink.written.data < 1 << 20, "only the blocks with data: {:?}", sink.written);
        assert_eq!(sink.written.raw, HEAD as u64 + sink.written.data + sink.written.zeroed);
        let after = std::fs::read(&path).expect("read");
        assert_eq!(&after[HEAD..image.len()], &image[HEAD..], "the image, whatever was there before");
        assert!(after[image.len()..].iter().all(|&b| b == 0xa5), "beyond the image: untouched");
        assert!(after[..HEAD].iter().all(|&b| b == 0xa5), "the head is the caller's");
    }
}

//! `image add|list|show|remove`: the image catalogue's files.
//!
//! Whatever an image comes in as — raw, qcow2 (converted by `qemu-img` after `qemu-img check`:
//! a truncated qcow2 converts "successfully" into zeros), or raw compressed with zstd, gzip or
//! xz — it is stored in one served form: the raw disk image, zstd-compressed (with zstd's
//! frame checksum), under `images_dir/catalogue/`. On the way the raw bytes are hashed
//! (`sha256`, what operators compare with their build), their all-zero 64 KiB blocks counted
//! (what a zero-aware write skips), and the served bytes hashed (the `ETag` the deploy agent
//! checks).
//!
//! Nothing is half-added: the served file is written under a hidden temporary name, synced,
//! renamed to a name no other image has, and only then the row is inserted — the commit
//! point. Any failure before removes the files; a failed insert (the name was taken
//! meanwhile) removes the renamed file.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use nodekeeper_deploy::blocks::{is_zero, ZERO_BLOCK};
use nodekeeper_deploy::stream::read_full;
use nodekeeper_store::{Image, ImageFormat, NewImage, Store, StoreError};
use sha2::{Digest, Sha256};

/// The catalogue's directory under `images_dir`.
pub const DIR: &str = "catalogue";

/// The compression level `image add` uses unless told (zstd 1–19; the node image: level 3
/// gives 245 MB in 2.3 s, 6 gives 234 MB in 6 s, 12 gives 226 MB in 21 s on 2 cores).
pub const DEFAULT_LEVEL: i32 = 6;

/// Recognizes an image by its first bytes: the magic numbers of qcow2 (`QFI\xfb`), zstd,
/// gzip and xz; anything else is taken as raw (and checked as a disk when read).
pub fn detect(head: &[u8]) -> ImageFormat {
    if head.starts_with(b"QFI\xfb") {
        ImageFormat::Qcow2
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        ImageFormat::Zstd
    } else if head.starts_with(&[0x1f, 0x8b]) {
        ImageFormat::Gzip
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
        ImageFormat::Xz
    } else {
        ImageFormat::Raw
    }
}

/// Whether the first bytes of a raw image hold a partition table: a GPT header (512- or
/// 4096-byte sectors) or an MBR's boot signature. A file without one is no disk image (a file
/// system image, a tarball, a typo'd path): the deploy would write it and nothing would boot.
pub fn has_partition_table(head: &[u8]) -> bool {
    let gpt = |at: usize| head.get(at..at + 8) == Some(b"EFI PART");
    gpt(512) || gpt(4096) || head.get(510..512) == Some(&[0x55, 0xaa])
}

/// What [`build`] made: the served file (already at its final name) and the figures for the
/// catalogue row.
#[derive(Debug)]
pub struct Built {
    /// The served file's path.
    pub path: PathBuf,
    /// The row to insert.
    pub image: NewImage,
}

/// Removes its files when dropped, unless disarmed.
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Reads `source` (any supported format), checks it, and writes the served form under
/// `images_dir/catalogue/`. Blocking (minutes for large images: call from `spawn_blocking`).
pub fn build(images_dir: &Path, name: &str, source: &Path, level: i32) -> anyhow::Result<Built> {
    if !(1..=19).contains(&level) {
        bail!("zstd level {level}: 1 to 19");
    }
    let mut head = [0u8; 8];
    let n = read_full(&mut File::open(source).with_context(|| format!("opening {}", source.display()))?, &mut head)
        .with_context(|| format!("reading {}", source.display()))?;
    let format = detect(&head[..n]);
    let dir = images_dir.join(DIR);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let unique = uuid::Uuid::new_v4().simple().to_string();
    let tmp = dir.join(format!(".tmp-{name}-{unique}.raw.zst"));
    let mut cleanup = Cleanup(vec![tmp.clone()]);

    let (reader, pledged): (Box<dyn Read>, Option<u64>) = match format {
        ImageFormat::Raw => {
            let f = File::open(source).with_context(|| format!("opening {}", source.display()))?;
            let len = f.metadata()?.len();
            (Box::new(f), Some(len))
        }
        ImageFormat::Qcow2 => {
            let raw = dir.join(format!(".tmp-{name}-{unique}.raw"));
            cleanup.0.push(raw.clone());
            qcow2_to_raw(source, &raw)?;
            let f = File::open(&raw).with_context(|| format!("opening {}", raw.display()))?;
            let len = f.metadata()?.len();
            (Box::new(f), Some(len))
        }
        ImageFormat::Zstd => {
            let f = File::open(source)?;
            (Box::new(zstd::stream::read::Decoder::new(f).context("starting the zstd decoder")?), None)
        }
        ImageFormat::Gzip => {
            (Box::new(flate2::read::MultiGzDecoder::new(io::BufReader::new(File::open(source)?))), None)
        }
        ImageFormat::Xz => {
            (Box::new(liblzma::read::XzDecoder::new_multi_decoder(io::BufReader::new(File::open(source)?))), None)
        }
    };
    let out = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let figures = compress(reader, out, level, pledged).map_err(|e| match e {
        Failure::Read(e) => anyhow::anyhow!(
            "reading {} as {format}: {e} (a {format} file that is truncated or corrupt?)",
            source.display()
        ),
        Failure::Write(e) => anyhow::anyhow!("writing the served image to {}: {e}", dir.display()),
        Failure::NotADisk(why) => anyhow::anyhow!("{} is not a disk image: {why}", source.display()),
    })?;
    let path = dir.join(format!("{name}-{}.raw.zst", &unique[..12]));
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    // The rename is the last step that can fail here: from now on the caller owns the file.
    cleanup.0.retain(|p| p != &tmp);
    drop(cleanup);
    let file = format!("{DIR}/{}", path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default());
    Ok(Built {
        path,
        image: NewImage {
            name: name.to_owned(),
            source_format: format,
            file,
            raw_size: figures.raw_size,
            raw_sha256: figures.raw_sha256,
            served_size: figures.served_size,
            served_sha256: figures.served_sha256,
            data_bytes: figures.data_bytes,
        },
    })
}

/// `qemu-img info` (no backing file, not encrypted), `qemu-img check` (exit 0, or 3: leaked
/// clusters only), then `qemu-img convert` to a sparse raw file.
fn qcow2_to_raw(source: &Path, raw: &Path) -> anyhow::Result<()> {
    let run = |args: &[&std::ffi::OsStr]| -> anyhow::Result<std::process::Output> {
        Command::new("qemu-img").args(args).output().context("running qemu-img (apt-get install qemu-utils)")
    };
    let src = source.as_os_str();
    let info = run(&["info".as_ref(), "--output=json".as_ref(), "-f".as_ref(), "qcow2".as_ref(), src])?;
    if !info.status.success() {
        bail!("{} is not a readable qcow2 image: {}", source.display(), first_line(&info.stderr));
    }
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).context("reading qemu-img info's JSON")?;
    if let Some(backing) = info.get("backing-filename").and_then(|b| b.as_str()) {
        bail!("{} has a backing file ({backing}): flatten it first (qemu-img convert -O qcow2)", source.display());
    }
    if info.get("encrypted").and_then(|e| e.as_bool()) == Some(true) {
        bail!("{} is encrypted: decrypt it first", source.display());
    }
    let check = run(&["check".as_ref(), "-f".as_ref(), "qcow2".as_ref(), src])?;
    match check.status.code() {
        Some(0) | Some(3) => {}
        Some(2) => bail!(
            "{} is corrupt (truncated?): qemu-img check: {}",
            source.display(),
            first_line(if check.stderr.is_empty() { &check.stdout } else { &check.stderr })
        ),
        _ => bail!("{} cannot be checked: qemu-img check: {}", source.display(), first_line(&check.stderr)),
    }
    let convert = run(&[
        "convert".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-O".as_ref(),
        "raw".as_ref(),
        src,
        raw.as_os_str(),
    ])?;
    if !convert.status.success() {
        bail!("converting {} to raw: qemu-img convert: {}", source.display(), first_line(&convert.stderr));
    }
    Ok(())
}

fn first_line(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or("(no output)").to_owned();
    let more = lines.count();
    if more > 0 {
        format!("{first} (and {more} more lines)")
    } else {
        first
    }
}

/// Where [`compress`] failed.
#[derive(Debug)]
enum Failure {
    /// Reading (decoding) the source.
    Read(io::Error),
    /// Writing the served file.
    Write(io::Error),
    /// The raw bytes are no disk image.
    NotADisk(String),
}

/// The figures of one compression.
#[derive(Debug)]
struct Figures {
    raw_size: u64,
    raw_sha256: String,
    data_bytes: u64,
    served_size: u64,
    served_sha256: String,
}

/// Counts and hashes what passes through to the file.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The raw stream from `reader` → sha256, zero blocks counted, checked as a disk → zstd
/// (multithreaded, with its frame checksum) → `out`, synced.
fn compress(mut reader: Box<dyn Read>, out: File, level: i32, pledged: Option<u64>) -> Result<Figures, Failure> {
    let sink = HashingWriter { inner: BufWriter::with_capacity(1 << 20, out), hasher: Sha256::new(), bytes: 0 };
    let mut enc = zstd::stream::write::Encoder::new(sink, level).map_err(Failure::Write)?;
    enc.include_checksum(true).map_err(Failure::Write)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    enc.multithread(threads).map_err(Failure::Write)?;
    if let Some(size) = pledged {
        enc.set_pledged_src_size(Some(size)).map_err(Failure::Write)?;
    }
    let mut raw_hasher = Sha256::new();
    let (mut raw_size, mut data_bytes) = (0u64, 0u64);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = read_full(&mut *reader, &mut buf).map_err(Failure::Read)?;
        if n == 0 {
            break;
        }
        let chunk = &buf[..n];
        if raw_size == 0 && !has_partition_table(chunk) {
            return Err(Failure::NotADisk("no MBR or GPT partition table in its first sectors".into()));
        }
        raw_hasher.update(chunk);
        data_bytes += chunk.chunks(ZERO_BLOCK).filter(|b| !is_zero(b)).map(|b| b.len() as u64).sum::<u64>();
        enc.write_all(chunk).map_err(Failure::Write)?;
        raw_size += n as u64;
    }
    if raw_size == 0 {
        return Err(Failure::NotADisk("it is empty".into()));
    }
    if raw_size % 512 != 0 {
        return Err(Failure::NotADisk(format!("{raw_size} bytes is not a whole number of 512-byte sectors")));
    }
    let mut sink = enc.finish().map_err(Failure::Write)?;
    sink.inner.flush().map_err(Failure::Write)?;
    let file = sink.inner.into_inner().map_err(|e| Failure::Write(e.into_error()))?;
    file.sync_all().map_err(Failure::Write)?;
    Ok(Figures {
        raw_size,
        raw_sha256: format!("{:x}", raw_hasher.finalize()),
        data_bytes,
        served_size: sink.bytes,
        served_sha256: format!("{:x}", sink.hasher.finalize()),
    })
}

/// `image add NAME FILE`: builds the served file, then records it; on any failure nothing is
/// left behind (no row, no file).
pub async fn add(
    store: &Store,
    images_dir: &Path,
    name: &str,
    source: &Path,
    level: i32,
    actor: &str,
) -> anyhow::Result<Image> {
    nodekeeper_store::check_image_name(name)?;
    // Early, to spare minutes of compression; the insert checks again.
    if store.image(name).await?.is_some() {
        return Err(StoreError::ImageExists(name.to_owned()).into());
    }
    let (dir, n, src) = (images_dir.to_owned(), name.to_owned(), source.to_owned());
    let built = tokio::task::spawn_blocking(move || build(&dir, &n, &src, level)).await.context("image add")??;
    let images = crate::http::images::Images::new(images_dir)?;
    // The ETag is known: serve need not hash the file again.
    if let Err(e) = images.remember(&built.path, &built.image.served_sha256) {
        tracing::warn!(file = %built.path.display(), "recording the digest: {e}");
    }
    match store.add_image(&built.image, actor).await {
        Ok(image) => Ok(image),
        Err(e) => {
            images.forget(&built.path);
            let _ = std::fs::remove_file(&built.path);
            Err(e.into())
        }
    }
}

/// `image remove NAME`: the row first (refused while the image is used), then its file.
pub async fn remove(store: &Store, images_dir: &Path, name: &str, actor: &str) -> anyhow::Result<Image> {
    let image = store.remove_image(name, actor).await?;
    let path = images_dir.join(&image.file);
    if let Ok(images) = crate::http::images::Images::new(images_dir) {
        images.forget(&path);
    }
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(file = %path.display(), "image {name} removed from the catalogue, its file stays: {e}")
        }
    }
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_told_by_their_magic() {
        assert_eq!(detect(b"QFI\xfb\0\0\0\x03"), ImageFormat::Qcow2);
        assert_eq!(detect(&[0x28, 0xb5, 0x2f, 0xfd, 0]), ImageFormat::Zstd);
        assert_eq!(detect(&[0x1f, 0x8b, 8]), ImageFormat::Gzip);
        assert_eq!(detect(b"\xfd7zXZ\0\0"), ImageFormat::Xz);
        assert_eq!(detect(b"\xeb\x63\x90"), ImageFormat::Raw);
        assert_eq!(detect(b""), ImageFormat::Raw);
    }

    #[test]
    fn a_disk_has_a_partition_table() {
        let mut mbr = vec![0u8; 1024];
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        assert!(has_partition_table(&mbr));
        let mut gpt = vec![0u8; 1024];
        gpt[512..520].copy_from_slice(b"EFI PART");
        assert!(has_partition_table(&gpt));
        let mut gpt4k = vec![0u8; 8192];
        gpt4k[4096..4104].copy_from_slice(b"EFI PART");
        assert!(has_partition_table(&gpt4k));
        assert!(!has_partition_table(&[0u8; 1024]));
        assert!(!has_partition_table(b"short"));
    }
}

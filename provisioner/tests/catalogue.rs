//! `image add|remove` with real inputs: a small GPT disk made with sfdisk and random data,
//! converted and compressed by the real tools (qemu-img, gzip, xz, zstd); every format must
//! come out as the same raw bytes, and every refused input must leave nothing behind.

use std::path::{Path, PathBuf};
use std::process::Command;

use nodekeeper_provisioner::catalogue;
use nodekeeper_store::testing::TestDb;
use nodekeeper_store::{ImageFormat, Store};
use sha2::{Digest, Sha256};

/// A 24 MiB GPT disk: a partition table, 8 MiB of random data at 2 MiB, zeros elsewhere.
fn disk(dir: &Path) -> (PathBuf, String) {
    let path = dir.join("disk.img");
    let mut bytes = vec![0u8; 24 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in &mut bytes[2 << 20..10 << 20] {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(&path, &bytes).expect("write disk");
    let mut sfdisk = Command::new("sfdisk")
        .args(["-q", path.to_str().expect("utf-8")])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("sfdisk (apt-get install fdisk)");
    use std::io::Write;
    sfdisk.stdin.take().expect("stdin").write_all(b"label: gpt\nstart=2048, size=20480, type=L\n").expect("feed");
    assert!(sfdisk.wait().expect("sfdisk").success());
    let raw = std::fs::read(&path).expect("read back");
    (path, format!("{:x}", Sha256::digest(&raw)))
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn unpacked_sha256(file: &Path) -> String {
    let f = std::fs::File::open(file).expect("open served");
    let mut dec = zstd::stream::read::Decoder::new(f).expect("decoder");
    let mut hasher = Sha256::new();
    std::io::copy(&mut dec, &mut hasher).expect("served file decodes (checksum included)");
    format!("{:x}", hasher.finalize())
}

/// The catalogue directory's entries, hidden ones included (temporary files must not stay).
fn files(images: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(images.join(catalogue::DIR))
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

async fn store(db: &TestDb) -> Store {
    db.store().await
}

#[tokio::test]
async fn every_format_in_the_same_raw_bytes_out() {
    let db = TestDb::sqlite();
    let store = store(&db).await;
    let tmp = tempfile::tempdir().expect("dir");
    let images = tmp.path().join("images");
    let (raw, sha) = disk(tmp.path());
    let p = |ext: &str| tmp.path().join(format!("disk.{ext}"));
    let s = |p: &Path| p.to_str().expect("utf-8").to_owned();
    run("qemu-img", &["convert", "-f", "raw", "-O", "qcow2", &s(&raw), &s(&p("qcow2"))]);
    run("sh", &["-c", &format!("gzip -c {} > {}", s(&raw), s(&p("gz")))]);
    run("sh", &["-c", &format!("xz -0 -c {} > {}", s(&raw), s(&p("xz")))]);
    run("sh", &["-c", &format!("zstd -q -c {} > {}", s(&raw), s(&p("zst")))]);
    let inputs = [
        ("raw", raw.clone(), ImageFormat::Raw),
        ("qcow2", p("qcow2"), ImageFormat::Qcow2),
        ("gzip", p("gz"), ImageFormat::Gzip),
        ("xz", p("xz"), ImageFormat::Xz),
        ("zstd", p("zst"), ImageFormat::Zstd),
    ];
    for (name, file, format) in &inputs {
        let image = catalogue::add(&store, &images, name, file, 3, "test").await.expect(name);
        assert_eq!(image.source_format, *format, "{name}");
        assert_eq!((image.raw_size, image.raw_sha256.as_str()), (24 << 20, sha.as_str()), "{name}");
        assert_eq!(image.data_bytes, (8 << 20) + (64 << 10) * 2, "{name}: the random 8 MiB and the two GPT blocks");
        let served = images.join(&image.file);
        assert_eq!(std::fs::metadata(&served).expect("served file").len(), image.served_size);
        assert!(image.served_size < 9 << 20, "{name}: zeros compress away ({} bytes)", image.served_size);
        assert_eq!(unpacked_sha256(&served), sha, "{name}: the served form is the raw image");
        let etag = nodekeeper_provisioner::http::images::sha256_file(&served).expect("hash");
        assert_eq!(etag, image.served_sha256, "{name}: the recorded ETag");
    }
    assert_eq!(store.images().await.expect("list").len(), 5);
    assert_eq!(files(&images).len(), 5, "one file each, no temporaries: {:?}", files(&images));

    // Removed: row and file.
    let gone = catalogue::remove(&store, &images, "xz", "test").await.expect("remove");
    assert!(!images.join(&gone.file).exists());
    assert_eq!(files(&images).len(), 4);
}

#[tokio::test]
async fn bad_input_is_refused_and_leaves_nothing() {
    let db = TestDb::sqlite();
    let store = store(&db).await;
    let tmp = tempfile::tempdir().expect("dir");
    let images = tmp.path().join("images");
    let (raw, _) = disk(tmp.path());
    let s = |p: &Path| p.to_str().expect("utf-8").to_owned();
    let qcow2 = tmp.path().join("disk.qcow2");
    run("qemu-img", &["convert", "-f", "raw", "-O", "qcow2", &s(&raw), &s(&qcow2)]);
    let cut = |from: &Path, to: &str, len: usize| {
        let bytes = std::fs::read(from).expect("read");
        let path = tmp.path().join(to);
        std::fs::write(&path, &bytes[..len.min(bytes.len())]).expect("write");
        path
    };
    let trunc_qcow2 = cut(&qcow2, "trunc.qcow2", 1 << 20);
    let gz = tmp.path().join("disk.gz");
    run("sh", &["-c", &format!("gzip -c {} > {}", s(&raw), s(&gz))]);
    let gz_len = std::fs::metadata(&gz).expect("gz").len() as usize;
    let trunc_gz = cut(&gz, "trunc.gz", gz_len / 2);
    let mut flipped = std::fs::read(&gz).expect("gz");
    flipped[gz_len / 2] ^= 0x40;
    let corrupt_gz = tmp.path().join("corrupt.gz");
    std::fs::write(&corrupt_gz, &flipped).expect("write");
    let text = tmp.path().join("notes.txt");
    std::fs::write(&text, "not a disk\n".repeat(1000)).expect("write");
    let odd = cut(&raw, "odd.img", (1 << 20) + 100);
    let backing = tmp.path().join("overlay.qcow2");
    run("qemu-img", &["create", "-f", "qcow2", "-F", "qcow2", "-b", &s(&qcow2), &s(&backing)]);

    let cases: [(&str, &Path, &str); 8] = [
        ("trunc-qcow2", &trunc_qcow2, "is corrupt (truncated?): qemu-img check"),
        ("trunc-gz", &trunc_gz, "reading"),
        ("corrupt-gz", &corrupt_gz, "reading"),
        ("text", &text, "is not a disk image: no MBR or GPT"),
        ("odd", &odd, "not a whole number of 512-byte sectors"),
        ("overlay", &backing, "has a backing file"),
        ("missing", Path::new("/nonexistent/disk.img"), "opening /nonexistent/disk.img"),
        ("bad/name", &raw, "image name"),
    ];
    for (name, file, expect) in cases {
        let e = catalogue::add(&store, &images, name, file, 3, "test").await.expect_err(name);
        assert!(format!("{e:#}").contains(expect), "{name}: {e:#}");
    }
    assert!(store.images().await.expect("list").is_empty(), "no rows");
    assert!(files(&images).is_empty(), "no files: {:?}", files(&images));

    // A taken name: refused before any work, the first image untouched.
    let first = catalogue::add(&store, &images, "disk", &raw, 3, "test").await.expect("add");
    let e = catalogue::add(&store, &images, "disk", &qcow2, 3, "test").await.expect_err("taken");
    assert!(e.to_string().contains("already exists"), "{e}");
    assert_eq!(files(&images), [first.file.trim_start_matches("catalogue/")]);
}

/// A full disk: the images directory on a 4 MiB tmpfs (needs root to mount; the test is
/// skipped without, unless NODEKEEPER_REQUIRE_NETNS says this machine must run it).
#[tokio::test]
async fn a_full_disk_is_refused_and_leaves_nothing() {
    let tmp = tempfile::tempdir().expect("dir");
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images).expect("mkdir");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "nk-test", images.to_str().expect("utf-8")])
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        assert!(std::env::var_os("NODEKEEPER_REQUIRE_NETNS").is_none(), "cannot mount a tmpfs");
        eprintln!("skipped: cannot mount a tmpfs (not root?)");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(images.clone());
    let db = TestDb::sqlite();
    let store = store(&db).await;
    let (raw, _) = disk(tmp.path());
    // Random data does not compress: 8 MiB of it cannot fit in 4 MiB.
    let e = catalogue::add(&store, &images, "big", &raw, 1, "test").await.expect_err("full");
    let text = format!("{e:#}");
    assert!(text.contains("writing the served image") && text.contains("No space left on device"), "{text}");
    assert!(store.images().await.expect("list").is_empty());
    assert!(files(&images).is_empty(), "no files: {:?}", files(&images));
}

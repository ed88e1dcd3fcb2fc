//! `/images/{path}`: files of `images_dir`, with Range (tower-http), `Content-Length`, and a
//! sha256 `ETag` (`If-None-Match` answers 304). Paths that leave the directory — `..`,
//! hidden names, symlinks pointing out — are refused with 404.
//!
//! Digests are computed once per (file, size, mtime): kept in memory and in
//! `images_dir/.sha256/` so a restart does not rehash gigabytes; `warm` computes them at
//! start-up so the first download does not wait.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;
use std::time::UNIX_EPOCH;

use sha2::{Digest, Sha256};

/// The digest cache for one images directory.
#[derive(Debug)]
pub struct Images {
    root: PathBuf,
    canonical_root: PathBuf,
    cache: Mutex<HashMap<PathBuf, (u64, u128, String)>>,
}

/// Why a path is not served.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Leaves the directory, hidden, or not a regular file.
    NotFound,
}

impl Images {
    /// For `root` (which must exist).
    pub fn new(root: &Path) -> std::io::Result<Images> {
        let canonical_root = root.canonicalize()?;
        Ok(Images { root: root.to_owned(), canonical_root, cache: Mutex::new(HashMap::new()) })
    }

    /// The file a request path names, if it stays inside the directory and is a regular file.
    pub fn resolve(&self, request: &str) -> Result<PathBuf, Refusal> {
        let rel = Path::new(request);
        let mut clean = PathBuf::new();
        for c in rel.components() {
            match c {
                Component::Normal(part) if !part.to_string_lossy().starts_with('.') => clean.push(part),
                _ => return Err(Refusal::NotFound),
            }
        }
        if clean.as_os_str().is_empty() || request.contains('\0') {
            return Err(Refusal::NotFound);
        }
        // Symlinks are followed only while they stay inside the root.
        let real = self.root.join(&clean).canonicalize().map_err(|_| Refusal::NotFound)?;
        if !real.starts_with(&self.canonical_root) || !real.is_file() {
            return Err(Refusal::NotFound);
        }
        Ok(real)
    }

    /// The file's sha256 (hex), from the cache when its size and mtime are unchanged.
    /// Blocking: call from `spawn_blocking`.
    pub fn digest(&self, file: &Path) -> std::io::Result<String> {
        let meta = std::fs::metadata(file)?;
        let mtime = meta.modified()?.duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let key = (meta.len(), mtime);
        if let Some((len, m, hex)) = self.cache.lock().ok().and_then(|c| c.get(file).cloned()) {
            if (len, m) == key {
                return Ok(hex);
            }
        }
        let sidecar = self.sidecar(file);
        let from_sidecar = std::fs::read_to_string(&sidecar).ok().and_then(|s| {
            let mut parts = s.split_whitespace();
            let (len, m, hex) = (parts.next()?.parse().ok()?, parts.next()?.parse().ok()?, parts.next()?.to_owned());
            ((len, m) == key && hex.len() == 64).then_some(hex)
        });
        let hex = match from_sidecar {
            Some(hex) => hex,
            None => {
                let hex = sha256_file(file)?;
                let _ = write_sidecar(&sidecar, key, &hex);
                hex
            }
        };
        if let Ok(mut c) = self.cache.lock() {
            c.insert(file.to_owned(), (key.0, key.1, hex.clone()));
        }
        Ok(hex)
    }

    /// Records `hex` as the digest of `file` (inside the root), computed by whoever wrote it
    /// (`image add` hashes while it compresses), so `serve` does not read it again.
    pub fn remember(&self, file: &Path, hex: &str) -> std::io::Result<()> {
        let file = file.canonicalize()?;
        let meta = std::fs::metadata(&file)?;
        let mtime = meta.modified()?.duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        write_sidecar(&self.sidecar(&file), (meta.len(), mtime), hex)
    }

    /// Forgets `file`'s digest (it is being deleted).
    pub fn forget(&self, file: &Path) {
        let file = file.canonicalize().unwrap_or_else(|_| file.to_owned());
        let _ = std::fs::remove_file(self.sidecar(&file));
        if let Ok(mut c) = self.cache.lock() {
            c.remove(&file);
        }
    }

    fn sidecar(&self, file: &Path) -> PathBuf {
        let rel = file.strip_prefix(&self.canonical_root).unwrap_or(file);
        self.canonical_root.join(".sha256").join(rel)
    }

    /// Digests every file under the root (start-up warm-up). Blocking.
    pub fn warm(&self) {
        let mut stack = vec![self.canonical_root.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with('.') {
                    continue;
                }
                match e.file_type() {
                    Ok(t) if t.is_dir() => stack.push(e.path()),
                    Ok(t) if t.is_file() => {
                        if let Err(err) = self.digest(&e.path()) {
                            tracing::warn!(file = %e.path().display(), "digest failed: {err}");
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Writes a digest sidecar (`SIZE MTIME HEX`) through a temporary file and a rename.
fn write_sidecar(sidecar: &Path, key: (u64, u128), hex: &str) -> std::io::Result<()> {
    if let Some(dir) = sidecar.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = sidecar.with_extension("tmp");
    std::fs::write(&tmp, format!("{} {} {hex}\n", key.0, key.1))?;
    std::fs::rename(&tmp, sidecar)
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_the_root() {
        let dir = tempfile::tempdir().expect("dir");
        let root = dir.path().join("images");
        std::fs::create_dir_all(root.join("deploy")).expect("mkdir");
        std::fs::write(root.join("node.img"), b"disk").expect("write");
        std::fs::write(root.join("deploy/vmlinuz"), b"kernel").expect("write");
        std::fs::write(dir.path().join("secret"), b"no").expect("write");
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("escape")).expect("link");
        std::os::unix::fs::symlink(root.join("node.img"), root.join("alias.img")).expect("link");
        let images = Images::new(&root).expect("images");
        assert!(images.resolve("node.img").is_ok());
        assert!(images.resolve("deploy/vmlinuz").is_ok());
        assert!(images.resolve("alias.img").is_ok(), "a link inside the root is fine");
        for bad in
            ["../secret", "deploy/../../secret", "/etc/passwd", "escape", ".sha256/node.img", "deploy", "", "nope"]
        {
            assert_eq!(images.resolve(bad), Err(Refusal::NotFound), "{bad}");
        }
    }

    #[test]
    fn digests_are_cached_and_follow_changes() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("a.img"), b"abc").expect("write");
        let images = Images::new(dir.path()).expect("images");
        let file = images.resolve("a.img").expect("resolve");
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(images.digest(&file).expect("digest"), abc);
        assert!(dir.path().join(".sha256/a.img").exists(), "sidecar written");
        // A new Images (a restart) reads the sidecar.
        assert_eq!(Images::new(dir.path()).expect("images").digest(&file).expect("digest"), abc);
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(dir.path().join("a.img"), b"abcd").expect("rewrite");
        assert_ne!(images.digest(&file).expect("digest"), abc, "a changed file is rehashed");
    }
}

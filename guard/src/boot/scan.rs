//! Reading the host's libvirt state from files (libvirtd is not running yet): every `*.xml`
//! in `config_dir`, the links in `config_dir/autostart/`, and the links the guard moved
//! aside into `state_dir/blocked/`.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

use crate::domain::{parse_domain_xml, DomainMeta};

/// One parsed definition in `config_dir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalDomain {
    /// `config_dir/NAME.xml`
    pub path: PathBuf,
    /// `NAME.xml`: also the name of its autostart link.
    pub file_name: String,
    /// What the XML says.
    pub meta: DomainMeta,
    /// `config_dir/autostart/NAME.xml`, when that link exists.
    pub autostart: Option<PathBuf>,
}

/// An autostart link the guard moved aside, in `state_dir/blocked/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockedLink {
    /// `state_dir/blocked/NAME.xml`
    pub path: PathBuf,
    /// `NAME.xml`
    pub file_name: String,
}

/// A file that could not be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FileError {
    /// The file.
    pub path: PathBuf,
    /// Why.
    pub reason: String,
}

/// Everything found on disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scan {
    /// Parsed definitions, by file name.
    pub domains: Vec<LocalDomain>,
    /// Files that are not usable definitions (left in place).
    pub errors: Vec<FileError>,
    /// Autostart links previously moved aside (into `blocked/`, or blocked in place).
    pub blocked: Vec<BlockedLink>,
    /// Stale definitions an earlier run held in place (`NAME.xml.nk-held`).
    pub held: Vec<PathBuf>,
}

/// Reads `config_dir` and `blocked_dir`. A missing directory is empty, not an error (a
/// host without libvirt definitions yet, or without an `autostart/` directory).
pub fn scan(config_dir: &Path, blocked_dir: &Path) -> io::Result<Scan> {
    let mut out = Scan::default();
    let links = list_links(&config_dir.join("autostart"))?;
    let (mut files, odd_names) = list_dir_all(config_dir)?;
    out.held = files
        .iter()
        .filter(|(name, kind)| name.ends_with(&format!(".xml{}", super::execute::HELD)) && kind.is_file())
        .map(|(name, _)| config_dir.join(name))
        .collect();
    out.held.sort();
    // A `*.xml` symlink is a definition to libvirtd too (it follows links): judged like a
    // file. One that leads nowhere is reported.
    files.retain(|(name, kind)| {
        if !name.ends_with(".xml") || name.starts_with('.') {
            return false;
        }
        if kind.is_symlink() {
            return match std::fs::metadata(config_dir.join(name)) {
                Ok(m) if m.is_file() => true,
                Ok(_) => {
                    let reason = "a symlink to something that is not a file: not judged".to_owned();
                    out.errors.push(FileError { path: config_dir.join(name), reason });
                    false
                }
                Err(e) => {
                    let reason = format!("a symlink whose target cannot be read ({e}): not judged");
                    out.errors.push(FileError { path: config_dir.join(name), reason });
                    false
                }
            };
        }
        kind.is_file()
    });
    for odd in odd_names {
        out.errors.push(FileError {
            path: odd,
            reason: "a file name that is not UTF-8: not judged (libvirt names are UTF-8; rename or remove it)".into(),
        });
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    // Reading and parsing 10,000 definitions is most of a boot pass: spread it over the cores.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 8);
    let chunk = files.len().div_ceil(threads).max(1);
    let parsed: Vec<Vec<Result<LocalDomain, FileError>>> = std::thread::scope(|s| {
        let workers: Vec<_> = files
            .chunks(chunk)
            .map(|part| s.spawn(|| part.iter().map(|(name, _)| read_one(config_dir, name, &links)).collect()))
            .collect();
        workers.into_iter().map(|w| w.join().unwrap_or_default()).collect()
    });
    for result in parsed.into_iter().flatten() {
        match result {
            Ok(d) => out.domains.push(d),
            Err(e) => out.errors.push(e),
        }
    }
    let mut blocked: Vec<_> = list_links(blocked_dir)?.into_iter().collect();
    // Links blocked in place (`autostart/NAME.xml.nk-blocked`): blocked all the same.
    let suffix = format!(".xml{}", super::execute::BLOCKED_IN_PLACE);
    for (name, kind) in list_dir(&config_dir.join("autostart"))? {
        if let (true, Some(base)) = (kind.is_symlink(), name.strip_suffix(super::execute::BLOCKED_IN_PLACE)) {
            if name.ends_with(&suffix) && !blocked.iter().any(|(b, _)| b == base) {
                blocked.push((base.to_owned(), config_dir.join("autostart").join(&name)));
            }
        }
    }
    blocked.sort();
    out.blocked = blocked.into_iter().map(|(file_name, path)| BlockedLink { path, file_name }).collect();
    Ok(out)
}

fn read_one(config_dir: &Path, file_name: &str, links: &HashMap<String, PathBuf>) -> Result<LocalDomain, FileError> {
    let path = config_dir.join(file_name);
    let bytes = match read_bounded(&path) {
        Ok(b) => b,
        Err(e) => return Err(FileError { path, reason: format!("unreadable: {e}") }),
    };
    match parse_domain_xml(&bytes) {
        Ok(meta) => {
            let autostart = links.get(file_name).cloned();
            Ok(LocalDomain { path, file_name: file_name.to_owned(), meta, autostart })
        }
        Err(e) => Err(FileError { path, reason: e.to_string() }),
    }
}

/// `(file name, file type)` of each entry; empty when the directory does not exist.
fn list_dir(dir: &Path) -> io::Result<Vec<Entry>> {
    list_dir_all(dir).map(|(named, _)| named)
}

/// A directory entry with a UTF-8 name: (name, type).
type Entry = (String, std::fs::FileType);

/// [`list_dir`], and the entries whose names are not UTF-8 (shown lossily, U+FFFD: the
/// report is JSON, which holds UTF-8 only) — to be reported, never silently skipped.
fn list_dir_all(dir: &Path) -> io::Result<(Vec<Entry>, Vec<PathBuf>)> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), Vec::new())),
        Err(e) => return Err(io::Error::new(e.kind(), format!("reading {}: {e}", dir.display()))),
    };
    let (mut out, mut odd) = (Vec::new(), Vec::new());
    for entry in entries {
        let entry = entry?;
        match entry.file_name().to_str() {
            Some(name) => out.push((name.to_owned(), entry.file_type()?)),
            None => odd.push(PathBuf::from(entry.path().to_string_lossy().into_owned())),
        }
    }
    odd.sort();
    Ok((out, odd))
}

/// Symlinks named `*.xml` in `dir`, by file name. Dangling links are listed too: the caller
/// matches them by name, and libvirtd ignores an autostart link without a definition.
fn list_links(dir: &Path) -> io::Result<HashMap<String, PathBuf>> {
    Ok(list_dir(dir)?
        .into_iter()
        .filter(|(name, kind)| kind.is_symlink() && name.ends_with(".xml"))
        .map(|(name, _)| {
            let path = dir.join(&name);
            (name, path)
        })
        .collect())
}

fn read_bounded(path: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let mut bytes = Vec::new();
    // One byte past the limit is enough for the parser to refuse the file as too large.
    file.take(crate::domain::MAX_XML_BYTES as u64 + 1).read_to_end(&mut bytes)?;
    Ok(bytes)
}

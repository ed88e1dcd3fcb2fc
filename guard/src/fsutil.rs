//! Crash-safe file operations: every write goes through a temporary file in the same
//! directory, fsync, rename; every move is a rename (or, across filesystems, a durable copy
//! then a rename) so a crash leaves the old or the new state, never a torn one.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

/// Replaces `path` with `bytes` atomically and durably.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = parent(path)?;
    let tmp = dir.join(format!(".{}.tmp", file_name(path)?));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    fsync_dir(dir)
}

/// Makes the directory's entries (renames, creations, removals) durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Moves a regular file to `dest`, byte for byte, never replacing anything at `dest`.
/// Same filesystem: one atomic `renameat2(RENAME_NOREPLACE)`. Across filesystems: copy to a
/// temporary name beside `dest`, fsync, move into place (again without replacing), then
/// remove the source — at every instant at least one complete copy exists. Errors:
/// `NotFound` when `src` is missing, `AlreadyExists` when `dest` is taken. The caller fsyncs
/// the directories.
pub fn move_file(src: &Path, dest: &Path) -> io::Result<()> {
    // A symlink is moved as the bytes it leads to (a moved relative link would lead nowhere).
    let is_link = fs::symlink_metadata(src).is_ok_and(|m| m.file_type().is_symlink());
    let renamed =
        if is_link { Err(io::Error::from_raw_os_error(nix::libc::EXDEV)) } else { rename_noreplace(src, dest) };
    match renamed {
        Err(e) if e.raw_os_error() == Some(nix::libc::EXDEV) => {
            if exists(dest) {
                return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{} exists", dest.display())));
            }
            let tmp = parent(dest)?.join(format!(".{}.tmp", file_name(dest)?));
            fs::copy(src, &tmp)?;
            File::open(&tmp)?.sync_all()?;
            rename_noreplace(&tmp, dest)?;
            fsync_dir(parent(dest)?)?;
            fs::remove_file(src)
        }
        other => other,
    }
}

/// `rename` that fails with `AlreadyExists` instead of replacing `dest`. Filesystems without
/// `RENAME_NOREPLACE` get a check then a plain rename (a race there needs a second writer in
/// the guard's own directories, which nothing else writes).
fn rename_noreplace(src: &Path, dest: &Path) -> io::Result<()> {
    use nix::fcntl::{renameat2, RenameFlags};
    match renameat2(None, src, None, dest, RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EINVAL) => {
            if exists(dest) {
                return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{} exists", dest.display())));
            }
            fs::rename(src, dest)
        }
        Err(e) => Err(io::Error::from(e)),
    }
}

/// Moves a symbolic link `src` to `dest` (keeping its target), across filesystems too. If
/// `dest` already is a link (an earlier move crashed after creating it), only `src` is removed.
pub fn move_link(src: &Path, dest: &Path) -> io::Result<()> {
    if fs::symlink_metadata(dest).is_ok_and(|m| m.file_type().is_symlink()) {
        return remove_link(src);
    }
    let target = fs::read_link(src)?;
    let tmp = parent(dest)?.join(format!(".{}.tmp", file_name(dest)?));
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&target, &tmp)?;
    fs::rename(&tmp, dest)?;
    remove_link(src)
}

/// Removes `path` if it is a symbolic link; a missing path is fine; anything else is refused
/// (the guard never deletes a file).
pub fn remove_link(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => fs::remove_file(path),
        Ok(_) => Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{} is not a symbolic link", path.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether `a` and `b` hold the same bytes.
pub fn same_contents(a: &Path, b: &Path) -> io::Result<bool> {
    let (ma, mb) = (fs::metadata(a)?, fs::metadata(b)?);
    Ok(ma.len() == mb.len() && fs::read(a)? == fs::read(b)?)
}

/// Whether anything (even a dangling link) is at `path`.
pub fn exists(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

fn parent(path: &Path) -> io::Result<&Path> {
    path.parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{} has no parent", path.display())))
}

fn file_name(path: &Path) -> io::Result<String> {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{} has no file name", path.display())))
}

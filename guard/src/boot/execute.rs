//! Carrying out a [`Plan`](super::decide::Plan) on disk, crash-safely.
//!
//! Quarantines go through a journal (`state_dir/journal.json`): the intended moves are
//! written durably first, then performed, then their events recorded in the database, and
//! only then is the journal removed. A run that finds a journal finishes it first, so a crash
//! at any point loses nothing and the next run completes the job. Link moves (block, restore,
//! retire) need no journal: each intermediate state is recognised by the next decision.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};

use nodekeeper_store::InstanceId;
use serde::{Deserialize, Serialize};

use super::decide::{Action, StaleReason};
use super::scan::FileError;
use crate::fault;
use crate::fsutil;

/// The directories the guard works in.
#[derive(Debug, Clone)]
pub struct Dirs {
    /// libvirt's `config_dir`.
    pub config_dir: PathBuf,
    /// `state_dir`.
    pub state_dir: PathBuf,
}

impl Dirs {
    /// `state_dir/quarantine`: stale definitions, never deleted.
    pub fn quarantine(&self) -> PathBuf {
        self.state_dir.join("quarantine")
    }
    /// `state_dir/blocked`: autostart links moved aside.
    pub fn blocked(&self) -> PathBuf {
        self.state_dir.join("blocked")
    }
    /// `config_dir/autostart`
    pub fn autostart(&self) -> PathBuf {
        self.config_dir.join("autostart")
    }
    /// `state_dir/journal.json`: quarantines not yet fully recorded.
    pub fn journal(&self) -> PathBuf {
        self.state_dir.join("journal.json")
    }
    /// `state_dir/cache.json`: what the last run that reached the database learned.
    pub fn cache(&self) -> PathBuf {
        self.state_dir.join("cache.json")
    }

    /// Creates `state_dir` and its subdirectories (0700: they hold domain XML).
    pub fn prepare(&self) -> io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        for dir in [self.state_dir.clone(), self.quarantine(), self.blocked()] {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
        }
        Ok(())
    }
}

/// One quarantine in the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantine {
    /// The instance.
    pub uuid: InstanceId,
    /// Where the definition was.
    pub source: PathBuf,
    /// Where it goes in `quarantine/`.
    pub dest: PathBuf,
    /// Its autostart link, removed first.
    pub autostart: Option<PathBuf>,
    /// Why.
    pub reason: StaleReason,
}

/// The journal of quarantines whose events are not yet in the database.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    /// Moves decided, maybe not yet done, not yet recorded.
    pub entries: Vec<Quarantine>,
}

impl Journal {
    /// Reads the journal; none is an empty one. A corrupt journal (it is written atomically,
    /// so only a hand edit makes one) is set aside as `journal.json.corrupt` and reported.
    pub fn load(dirs: &Dirs, errors: &mut Vec<FileError>) -> Journal {
        let path = dirs.journal();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Journal::default(),
            Err(e) => {
                errors.push(FileError { path, reason: format!("unreadable journal: {e}") });
                return Journal::default();
            }
        };
        match serde_json::from_slice(&bytes) {
            Ok(j) => j,
            Err(e) => {
                let aside = dirs.state_dir.join("journal.json.corrupt");
                let _ = std::fs::rename(&path, &aside);
                errors
                    .push(FileError { path, reason: format!("corrupt journal set aside as {}: {e}", aside.display()) });
                Journal::default()
            }
        }
    }

    /// Writes the journal durably (or removes it when empty).
    pub fn store(&self, dirs: &Dirs) -> io::Result<()> {
        if self.entries.is_empty() {
            return match std::fs::remove_file(dirs.journal()) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => fsutil::fsync_dir(&dirs.state_dir),
            };
        }
        let bytes = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        fsutil::write_atomic(&dirs.journal(), &bytes)
    }
}

/// The suffix of a stale definition held in place (`config_dir/NAME.xml.nk-held`) when it
/// could not be quarantined: libvirtd loads only `*.xml`, so it is no longer defined at boot;
/// a later run moves it into `quarantine/`.
pub const HELD: &str = ".nk-held";
/// The suffix of an autostart link blocked in place (`autostart/NAME.xml.nk-blocked`) when it
/// could not be moved into `blocked/`: libvirtd ignores it; a later run restores or retires it.
pub const BLOCKED_IN_PLACE: &str = ".nk-blocked";

/// What was done.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Quarantines completed on disk (their events still to record), journal order.
    pub quarantined: Vec<Quarantine>,
    /// Stale definitions that could not be quarantined (a full or read-only state directory)
    /// and were held in place instead: renamed `NAME.xml.nk-held`, autostart link removed.
    pub held: Vec<InstanceId>,
    /// Autostart links moved aside.
    pub blocked: Vec<InstanceId>,
    /// Autostart links given back.
    pub restored: Vec<InstanceId>,
    /// What failed, per file.
    pub errors: Vec<FileError>,
}

/// Finishes the journal's moves, then carries out `actions`. Returns what was done; the
/// journal on disk now lists every completed quarantine whose event is not yet recorded
/// (the caller records them and then calls [`Journal::store`] with what remains).
pub fn execute(dirs: &Dirs, mut journal: Journal, actions: &[Action]) -> io::Result<(Outcome, Journal)> {
    let mut out = Outcome::default();

    // 1. New quarantines join the journal, which is made durable before anything moves.
    let journaled = journal.entries.len();
    let mut sources: HashSet<PathBuf> = journal.entries.iter().map(|q| q.source.clone()).collect();
    let mut dests: HashSet<PathBuf> = journal.entries.iter().map(|q| q.dest.clone()).collect();
    for action in actions {
        if let Action::Quarantine { uuid, path, autostart, reason } = action {
            if !sources.insert(path.clone()) {
                continue;
            }
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let dest = quarantine_dest(&dirs.quarantine(), Some(*uuid), &name, &dests);
            dests.insert(dest.clone());
            journal.entries.push(Quarantine {
                uuid: *uuid,
                source: path.clone(),
                dest,
                autostart: autostart.clone(),
                reason: reason.clone(),
            });
        }
    }
    if !journal.entries.is_empty() {
        if let Err(e) = journal.store(dirs) {
            // No journal, no move (a crash could lose track of one): the new ones are held
            // in place instead, which needs no space at all.
            let fresh: Vec<Quarantine> = journal.entries.split_off(journaled);
            tracing::error!(
                "the journal cannot be written ({e}): holding {} stale definition(s) in place",
                fresh.len()
            );
            out.errors.push(FileError { path: dirs.journal(), reason: format!("journal not written: {e}") });
            for q in fresh {
                hold_in_place(&q, &mut out);
            }
        } else {
            fault::point("after-journal");
        }
    }

    // 2. The moves, each idempotent: a rerun after a crash completes what is missing.
    let mut done = Vec::with_capacity(journal.entries.len());
    for q in &journal.entries {
        match quarantine_one(q) {
            Ok(()) => done.push(q.clone()),
            Err(e) => {
                out.errors.push(FileError { path: q.source.clone(), reason: format!("quarantine failed: {e}") });
                if q.source.exists() {
                    hold_in_place(q, &mut out);
                }
            }
        }
    }
    if !journal.entries.is_empty() {
        for dir in [dirs.config_dir.clone(), dirs.autostart(), dirs.quarantine()] {
            sync_or_report(&dir, &mut out);
        }
        fault::point("after-moves");
    }
    // A move that failed is reported and leaves the journal: nothing moved, so the next run
    // decides afresh from what is on disk.
    journal.entries = done.clone();
    out.quarantined = done;

    // 3. Links.
    let mut touched_links = false;
    for action in actions {
        let result = match action {
            Action::Quarantine { .. } => continue,
            Action::Block { uuid, link } => match move_link_into(link, &dirs.blocked()) {
                Ok(()) => {
                    out.blocked.push(*uuid);
                    Ok(())
                }
                // No room (or no write) in blocked/: blocked in place, by a rename in autostart/.
                Err(e) => {
                    let aside = PathBuf::from(format!("{}{BLOCKED_IN_PLACE}", link.display()));
                    match std::fs::rename(link, &aside) {
                        Ok(()) => {
                            tracing::error!("{}: blocked in place as {} ({e})", link.display(), aside.display());
                            out.blocked.push(*uuid);
                            Ok(())
                        }
                        Err(e2) => Err((link, io::Error::new(e2.kind(), format!("{e}; blocking in place: {e2}")))),
                    }
                }
            },
            Action::Restore { uuid, blocked } => ensure_dir(&dirs.autostart())
                .and_then(|()| move_link_into(blocked, &dirs.autostart()))
                .map(|()| out.restored.push(*uuid))
                .map_err(|e| (blocked, e)),
            Action::Retire { uuid, blocked } => retire(blocked, *uuid, &dirs.quarantine()).map_err(|e| (blocked, e)),
        };
        touched_links = true;
        if let Err((path, e)) = result {
            out.errors.push(FileError { path: path.clone(), reason: format!("moving link failed: {e}") });
        }
    }
    if touched_links {
        for dir in [dirs.autostart(), dirs.blocked(), dirs.quarantine()] {
            sync_or_report(&dir, &mut out);
        }
    }
    Ok((out, journal))
}

/// fsyncs `dir` (if it exists); a failure is reported, not fatal: what could be done is done.
fn sync_or_report(dir: &Path, out: &mut Outcome) {
    if dir.exists() {
        if let Err(e) = fsutil::fsync_dir(dir) {
            out.errors.push(FileError { path: dir.to_owned(), reason: format!("fsync: {e}") });
        }
    }
}

/// A stale definition that cannot be quarantined is held in place, so that libvirtd does not
/// define (nor autostart) it: its autostart link is removed and the file renamed
/// `NAME.xml.nk-held` in its own directory — steps that need no free space. Nothing is lost;
/// a later run moves it into `quarantine/`. When even that fails (a read-only `config_dir`),
/// it is reported loudly and the post-libvirt pass destroys the running copy.
fn hold_in_place(q: &Quarantine, out: &mut Outcome) {
    let held = PathBuf::from(format!("{}{HELD}", q.source.display()));
    let result = q
        .autostart
        .as_ref()
        .map_or(Ok(()), |link| fsutil::remove_link(link))
        .and_then(|()| std::fs::rename(&q.source, &held));
    match result {
        Ok(()) => {
            tracing::error!(
                "{} is stale ({}) and could not be quarantined: held in place as {}",
                q.source.display(),
                q.reason,
                held.display()
            );
            out.held.push(q.uuid);
            out.errors.push(FileError {
                path: q.source.clone(),
                reason: format!(
                    "held in place as {} (libvirtd will not define it); quarantined by a later run",
                    held.display()
                ),
            });
        }
        Err(e) => {
            tracing::error!("{} is stale ({}) and could be neither quarantined nor held in place: {e}; libvirtd may define it — the post-libvirt pass destroys it if it starts", q.source.display(), q.reason);
            out.errors
                .push(FileError { path: q.source.clone(), reason: format!("could not be held in place either: {e}") });
        }
    }
}

/// Moves definitions held in place by an earlier run (`*.xml.nk-held`, judged stale then)
/// into `quarantine/`. Returns the moves as quarantines (for their events). Idempotent; a move
/// that still fails leaves the file held and is reported.
pub fn finish_held(dirs: &Dirs, held: &[PathBuf], out: &mut Vec<FileError>) -> Vec<(PathBuf, PathBuf)> {
    let mut moved = Vec::new();
    for path in held {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let dest = quarantine_dest(&dirs.quarantine(), None, &name, &HashSet::new());
        match fsutil::move_file(path, &dest) {
            Ok(()) => moved.push((path.clone(), dest)),
            Err(e) => {
                out.push(FileError { path: path.clone(), reason: format!("held in place, still not quarantined: {e}") })
            }
        }
    }
    moved
}

/// Removes the autostart link, then moves the definition. Idempotent.
fn quarantine_one(q: &Quarantine) -> io::Result<()> {
    if let Some(link) = &q.autostart {
        fsutil::remove_link(link)?;
        fault::point("after-unlink");
    }
    match fsutil::move_file(&q.source, &q.dest) {
        Ok(()) => {}
        // The source is gone: moved before a crash, if the copy is in quarantine.
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if !fsutil::exists(&q.dest) {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{} vanished before it was quarantined", q.source.display()),
                ));
            }
        }
        // Both exist: the source was recreated after an earlier move. Same bytes: the copy
        // in quarantine preserves it, so the source may go. Different bytes: leave it.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            if !fsutil::same_contents(&q.source, &q.dest)? {
                return Err(io::Error::other(format!(
                    "{} differs from its quarantined copy {}",
                    q.source.display(),
                    q.dest.display()
                )));
            }
            std::fs::remove_file(&q.source)?;
        }
        Err(e) => return Err(e),
    }
    fault::point("after-move");
    Ok(())
}

/// `quarantine/UUID.NAME.xml`, or with a numeric suffix when that name is taken (the same
/// instance quarantined again later): the name always keeps the UUID (when known).
fn quarantine_dest(dir: &Path, uuid: Option<InstanceId>, name: &str, planned: &HashSet<PathBuf>) -> PathBuf {
    let base = match uuid {
        Some(uuid) => format!("{uuid}.{name}"),
        None => name.to_owned(),
    };
    let taken = |p: &Path| planned.contains(p) || fsutil::exists(p);
    let mut dest = dir.join(&base);
    let mut n = 1;
    while taken(&dest) {
        dest = dir.join(format!("{base}.{n}"));
        n += 1;
    }
    dest
}

/// Moves `link` into `dir` under its name (a link blocked in place loses its suffix).
fn move_link_into(link: &Path, dir: &Path) -> io::Result<()> {
    let name = link.file_name().ok_or_else(|| io::Error::other("link has no file name"))?.to_string_lossy();
    let name = name.strip_suffix(BLOCKED_IN_PLACE).unwrap_or(&name);
    fsutil::move_link(link, &dir.join(name))
}

/// A blocked link of a stale or vanished domain goes to `quarantine/` as
/// `UUID.NAME.xml.autostart` (or `NAME.xml.autostart`): inert, and kept as a record.
fn retire(blocked: &Path, uuid: Option<InstanceId>, quarantine: &Path) -> io::Result<()> {
    let name = blocked.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let base = match uuid {
        Some(u) => format!("{u}.{name}.autostart"),
        None => format!("{name}.autostart"),
    };
    let mut dest = quarantine.join(&base);
    let mut n = 1;
    while fsutil::exists(&dest) {
        dest = quarantine.join(format!("{base}.{n}"));
        n += 1;
    }
    fsutil::move_link(blocked, &dest)
}

fn ensure_dir(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)
}

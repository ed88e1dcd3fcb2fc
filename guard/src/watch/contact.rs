//! When this host last reached the database, kept across restarts of the guard
//! (`state_dir/last-contact`): the self-fence's clock. A guard that crashes and is restarted
//! (by systemd, within the hardware watchdog's timeout) while the host is cut off must go on
//! counting its isolation from the last real contact, not from its own start — or a guard
//! that crash-loops would never fence itself, while it keeps the watchdog fed.
//!
//! The time is the kernel's `CLOCK_BOOTTIME` (monotonic, counts suspend, unaffected by wall
//! clock jumps) with the boot's id: after a reboot there is no earlier contact to count from
//! (the host's HA domains did not survive the reboot, and `guard boot` blocked their autostart
//! without the database).

use std::path::Path;
use std::time::Duration;

/// This boot's id and the time since it.
fn now() -> Option<(String, Duration)> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).ok()?;
    Some((id.trim().to_owned(), Duration::new(t.tv_sec().try_into().ok()?, t.tv_nsec().try_into().ok()?)))
}

/// Records a contact now.
pub fn record(path: &Path) {
    let Some((id, t)) = now() else { return };
    // Renamed into place, not synced: a crash of the host is a reboot, which voids it anyway.
    let tmp = path.with_extension("tmp");
    let written = std::fs::write(&tmp, format!("{id} {}\n", t.as_millis())).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        tracing::warn!("recording the last contact in {}: {e}", path.display());
    }
}

/// How long ago the last recorded contact of this boot was (`None`: none this boot, or
/// unreadable).
pub fn since_last(path: &Path) -> Option<Duration> {
    let text = std::fs::read_to_string(path).ok()?;
    let (id, ms) = text.trim().split_once(' ')?;
    let (boot, t) = now()?;
    if id != boot {
        return None;
    }
    t.checked_sub(Duration::from_millis(ms.parse().ok()?))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_contact_of_this_boot_is_found_and_others_are_not() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("last-contact");
        assert_eq!(super::since_last(&path), None, "none yet");
        super::record(&path);
        let ago = super::since_last(&path).expect("recorded this boot");
        assert!(ago < std::time::Duration::from_secs(5), "{ago:?}");
        std::fs::write(&path, "00000000-0000-0000-0000-000000000000 1000\n").expect("write");
        assert_eq!(super::since_last(&path), None, "another boot's");
        std::fs::write(&path, "garbage").expect("write");
        assert_eq!(super::since_last(&path), None);
    }
}

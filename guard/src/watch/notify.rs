//! What the guard tells the machine it is alive: systemd (`sd_notify`: `READY=1`,
//! `WATCHDOG=1`) and the kernel's hardware watchdog, both fed only from the loop.

use std::path::PathBuf;
use std::time::Duration;

/// The kernel's watchdog device (`/dev/watchdog`): opening it arms the timer, each write
/// pings it, and writing the magic `V` before closing disarms it (unless the driver was loaded
/// with `nowayout`). A guard that dies without that leaves the timer running: systemd restarts
/// the guard, which opens and pings it again in time, or the host reboots. The timeout is the
/// driver's (softdog `soft_margin`, 60 s by default; i6300esb `heartbeat`, 30 s): keep it well
/// above `heartbeat_interval`.
pub struct HardwareWatchdog {
    file: std::fs::File,
    path: PathBuf,
    failing: bool,
    timeout: Option<Duration>,
    /// It takes the watchdog ioctls (a kernel watchdog).
    settable: bool,
}

/// The two watchdog ioctls of `linux/watchdog.h` — the guard's only `unsafe`: the kernel reads
/// and writes one `int` through the pointer, for the length of the call, on an open fd.
#[allow(unsafe_code)]
mod wdioc {
    use std::os::fd::AsRawFd;
    use std::time::Duration;

    nix::ioctl_readwrite!(settimeout, b'W', 6, std::ffi::c_int);
    nix::ioctl_read!(gettimeout, b'W', 7, std::ffi::c_int);

    fn seconds(secs: std::ffi::c_int) -> Option<Duration> {
        (secs > 0).then(|| Duration::from_secs(secs.unsigned_abs().into()))
    }

    /// `WDIOC_GETTIMEOUT`.
    pub(super) fn get(file: &std::fs::File) -> Result<Option<Duration>, nix::Error> {
        let mut secs: std::ffi::c_int = 0;
        // SAFETY: the fd is open for the call's length; the kernel writes one int into `secs`.
        unsafe { gettimeout(file.as_raw_fd(), &mut secs) }?;
        Ok(seconds(secs))
    }

    /// `WDIOC_SETTIMEOUT`: the timeout the driver took.
    pub(super) fn set(file: &std::fs::File, want: Duration) -> Result<Option<Duration>, nix::Error> {
        let mut secs = std::ffi::c_int::try_from(want.as_secs().max(1)).unwrap_or(std::ffi::c_int::MAX);
        // SAFETY: as above; the kernel reads `secs` and writes back the timeout it set.
        unsafe { settimeout(file.as_raw_fd(), &mut secs) }?;
        Ok(seconds(secs))
    }
}

impl HardwareWatchdog {
    /// Opens (arms) the device and reads its timeout (`WDIOC_GETTIMEOUT`); an error is logged
    /// and the guard goes on without it. A device that takes no watchdog ioctl at all (not a
    /// kernel watchdog: the tests' FIFO) is taken to have `declared` as its timeout.
    pub fn arm(path: &std::path::Path, declared: Option<Duration>) -> Option<HardwareWatchdog> {
        let file = match std::fs::OpenOptions::new().write(true).open(path) {
            Ok(file) => file,
            Err(e) => {
                tracing::error!("hardware watchdog {}: {e}: going on without it", path.display());
                return None;
            }
        };
        let (timeout, settable) = match wdioc::get(&file) {
            Ok(t) => (t, true),
            Err(nix::Error::ENOTTY) => (declared, false),
            Err(e) => {
                tracing::warn!("hardware watchdog {}: reading its timeout: {e}", path.display());
                (None, true)
            }
        };
        let dog = HardwareWatchdog { file, path: path.to_owned(), failing: false, timeout, settable };
        tracing::info!("hardware watchdog {} armed, timeout {}", path.display(), dog.describe());
        Some(dog)
    }

    /// Sets its timeout (`WDIOC_SETTIMEOUT`; the driver may round it) and reads it back.
    pub fn set_timeout(&mut self, want: Duration) {
        if !self.settable {
            return;
        }
        match wdioc::set(&self.file, want) {
            Ok(t) => self.timeout = t,
            Err(e) => tracing::warn!("hardware watchdog {}: setting its timeout: {e}", self.path.display()),
        }
        tracing::info!("hardware watchdog {}: timeout now {}", self.path.display(), self.describe());
    }

    fn describe(&self) -> String {
        self.timeout
            .map_or("unknown (no watchdog fencing for this host)".into(), |t| humantime::format_duration(t).to_string())
    }

    /// Its timeout, if known: how long after the last ping the machine resets.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// Pings it.
    pub fn ping(&mut self) {
        use std::io::Write;
        match self.file.write_all(b"p").and_then(|()| self.file.flush()) {
            Ok(()) => self.failing = false,
            Err(e) if !self.failing => {
                self.failing = true;
                tracing::error!("hardware watchdog {}: {e}", self.path.display());
            }
            Err(_) => {}
        }
    }

    /// Disarms it (a clean stop) and closes it.
    pub fn disarm(mut self) {
        use std::io::Write;
        if let Err(e) = self.file.write_all(b"V").and_then(|()| self.file.flush()) {
            tracing::error!("hardware watchdog {}: disarming: {e}", self.path.display());
        } else {
            tracing::info!("hardware watchdog {} disarmed", self.path.display());
        }
    }
}

/// sd_notify(3), without libsystemd: one datagram to `$NOTIFY_SOCKET` (nothing without it).
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else { return };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name).and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
    } else {
        sock.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = sent {
        tracing::debug!("sd_notify: {e}");
    }
}

//! What the guard tells the machine it is alive: systemd (`sd_notify`: `READY=1`,
//! `WATCHDOG=1`) and the kernel's hardware watchdog, both fed only from the loop.

use std::path::PathBuf;

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
}

impl HardwareWatchdog {
    /// Opens (arms) the device; an error is logged and the guard goes on without it.
    pub fn arm(path: &std::path::Path) -> Option<HardwareWatchdog> {
        match std::fs::OpenOptions::new().write(true).open(path) {
            Ok(file) => {
                tracing::info!("hardware watchdog {} armed", path.display());
                Some(HardwareWatchdog { file, path: path.to_owned(), failing: false })
            }
            Err(e) => {
                tracing::error!("hardware watchdog {}: {e}: going on without it", path.display());
                None
            }
        }
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

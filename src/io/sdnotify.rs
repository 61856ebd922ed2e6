//! A minimal sd_notify client: one datagram per state change to `$NOTIFY_SOCKET`, as systemd's
//! `Type=notify` and `WatchdogSec=` expect (sd_notify(3)). Paths starting with `@` name a socket
//! in the abstract namespace. No crate: the protocol is one `sendto`.

use std::ffi::OsStr;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Errors of the notify client.
#[derive(Debug, thiserror::Error)]
pub enum SdNotifyError {
    #[error("NOTIFY_SOCKET {path:?} is not a usable socket address: {source}")]
    Address { path: String, source: io::Error },
    #[error("cannot create the notify socket: {0}")]
    Socket(io::Error),
    #[error("sending {state:?} to {path:?}: {source}")]
    Send {
        state: String,
        path: String,
        source: io::Error,
    },
    #[error("notify message must not be empty")]
    Empty,
}

/// A connection-less client of systemd's notify socket.
#[derive(Debug)]
pub struct Notifier {
    sock: UnixDatagram,
    addr: SocketAddr,
    path: String,
}

impl Notifier {
    /// The notifier `$NOTIFY_SOCKET` names, or `None` when not started by systemd with
    /// `Type=notify` (or `NotifyAccess=`).
    pub fn from_env() -> Result<Option<Notifier>, SdNotifyError> {
        match std::env::var_os("NOTIFY_SOCKET") {
            Some(p) if !p.is_empty() => Notifier::new(&p).map(Some),
            _ => Ok(None),
        }
    }

    /// A notifier for `path` (`@name` for the abstract namespace).
    pub fn new(path: &OsStr) -> Result<Notifier, SdNotifyError> {
        let bytes = path.as_bytes();
        let shown = path.to_string_lossy().into_owned();
        let addr = if let Some(name) = bytes.strip_prefix(b"@") {
            SocketAddr::from_abstract_name(name)
        } else {
            SocketAddr::from_pathname(std::path::Path::new(path))
        }
        .map_err(|source| SdNotifyError::Address {
            path: shown.clone(),
            source,
        })?;
        let sock = UnixDatagram::unbound().map_err(SdNotifyError::Socket)?;
        Ok(Notifier {
            sock,
            addr,
            path: shown,
        })
    }

    /// Send `state` (newline-separated `KEY=VALUE` assignments) in one datagram.
    pub fn notify(&self, state: &str) -> Result<(), SdNotifyError> {
        if state.is_empty() {
            return Err(SdNotifyError::Empty);
        }
        let n = self
            .sock
            .send_to_addr(state.as_bytes(), &self.addr)
            .map_err(|source| SdNotifyError::Send {
                state: state.to_string(),
                path: self.path.clone(),
                source,
            })?;
        if n != state.len() {
            return Err(SdNotifyError::Send {
                state: state.to_string(),
                path: self.path.clone(),
                source: io::Error::new(io::ErrorKind::WriteZero, "short datagram"),
            });
        }
        Ok(())
    }

    /// `READY=1`: startup finished.
    pub fn ready(&self, status: &str) -> Result<(), SdNotifyError> {
        self.notify(&format!("READY=1\nSTATUS={status}"))
    }

    /// `WATCHDOG=1`: still alive.
    pub fn watchdog(&self) -> Result<(), SdNotifyError> {
        self.notify("WATCHDOG=1")
    }

    /// `STOPPING=1`: shutting down.
    pub fn stopping(&self) -> Result<(), SdNotifyError> {
        self.notify("STOPPING=1")
    }

    /// `STATUS=...`: one line shown by `systemctl status`.
    pub fn status(&self, text: &str) -> Result<(), SdNotifyError> {
        self.notify(&format!("STATUS={}", text.replace('\n', " ")))
    }
}

/// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC`, if it is set and meant for this
/// process (`$WATCHDOG_PID` absent or ours), as sd_watchdog_enabled(3) says.
pub fn watchdog_interval_from_env() -> Option<Duration> {
    watchdog_usec_from_env().map(|usec| Duration::from_micros(usec / 2))
}

/// `$WATCHDOG_USEC` (the unit's `WatchdogSec=`), if it is set, not 0 and meant for this
/// process (`$WATCHDOG_PID` absent or ours).
pub fn watchdog_usec_from_env() -> Option<u64> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then_some(usec)
}

/// The notifier and the `WATCHDOG=1` interval when systemd runs us with `WatchdogSec=`, for
/// [`crate::daemon::ha::HaLoop::spawn`]'s `watchdog` argument.
pub fn watchdog_from_env() -> Result<Option<(Notifier, Duration)>, SdNotifyError> {
    let Some(every) = watchdog_interval_from_env() else {
        return Ok(None);
    };
    Ok(Notifier::from_env()?.map(|n| (n, every)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_datagrams_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(path.as_os_str()).unwrap();
        n.ready("serving").unwrap();
        n.watchdog().unwrap();
        n.status("two\nlines").unwrap();
        let mut buf = [0u8; 256];
        let k = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..k], b"READY=1\nSTATUS=serving");
        let k = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..k], b"WATCHDOG=1");
        let k = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..k], b"STATUS=two lines");
        assert!(matches!(n.notify(""), Err(SdNotifyError::Empty)));
    }

    #[test]
    fn sends_datagrams_to_an_abstract_socket() {
        let name = format!("hapair-test-notify-{}", std::process::id());
        let server =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        let n = Notifier::new(OsStr::new(&format!("@{name}"))).unwrap();
        n.stopping().unwrap();
        let mut buf = [0u8; 64];
        let k = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..k], b"STOPPING=1");
    }

    #[test]
    fn missing_socket_is_an_error_naming_the_path() {
        let n = Notifier::new(OsStr::new("/nonexistent/hapair/notify")).unwrap();
        let e = n.watchdog().unwrap_err().to_string();
        assert!(e.contains("/nonexistent/hapair/notify"), "{e}");
    }
}

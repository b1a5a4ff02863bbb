//! systemd's notification protocol (`sd_notify(3)`): READY, STOPPING, STATUS and WATCHDOG
//! datagrams to `$NOTIFY_SOCKET`. Without that variable (not started by systemd with
//! `Type=notify`) every call is a no-op.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

#[derive(Debug)]
pub struct Notifier {
    target: Option<SocketAddr>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` from the environment.
    pub fn from_env() -> Notifier {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let target = var("NOTIFY_SOCKET").and_then(|p| {
            if let Some(name) = p.strip_prefix('@') {
                SocketAddr::from_abstract_name(name.as_bytes()).ok()
            } else {
                SocketAddr::from_pathname(p).ok()
            }
        });
        // WATCHDOG_PID, when set, names the process meant to ping; ours only if it matches.
        let for_us = var("WATCHDOG_PID").is_none_or(|p| p == std::process::id().to_string());
        let watchdog = var("WATCHDOG_USEC")
            .and_then(|u| u.parse::<u64>().ok())
            .filter(|u| *u > 0 && for_us)
            .map(Duration::from_micros);
        Notifier { target, watchdog }
    }

    /// True when systemd is listening for notifications.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// How often to send `WATCHDOG=1`: half the configured watchdog timeout.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.filter(|_| self.enabled()).map(|w| w / 2)
    }

    /// Sends `state` (e.g. `"READY=1\nSTATUS=listening"`). Errors are returned, not fatal.
    pub fn notify(&self, state: &str) -> std::io::Result<()> {
        let Some(target) = &self.target else {
            return Ok(());
        };
        let sock = UnixDatagram::unbound()?;
        sock.send_to_addr(state.as_bytes(), target)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_datagrams_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            target: Some(SocketAddr::from_pathname(&path).unwrap()),
            watchdog: Some(Duration::from_secs(30)),
        };
        n.notify("READY=1\nSTATUS=up").unwrap();
        let mut buf = [0u8; 64];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=up");
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(15)));
    }

    #[test]
    fn without_a_socket_nothing_is_sent_and_no_watchdog_runs() {
        let n = Notifier {
            target: None,
            watchdog: Some(Duration::from_secs(30)),
        };
        assert!(!n.enabled());
        assert!(n.notify("READY=1").is_ok());
        assert_eq!(n.watchdog_interval(), None);
    }
}

//! Whether a systemd unit of this node is active: the floating IP's `unit` health check.

use tokio::sync::OnceCell;

use crate::host::systemd::{Systemd, SystemdBus, SystemdError};

/// This node's systemd, connected on first use (the system bus or `[services] bus`).
#[derive(Debug)]
pub struct UnitProbe {
    bus: Option<String>,
    conn: OnceCell<SystemdBus>,
}

impl UnitProbe {
    pub fn new(bus: Option<String>) -> UnitProbe {
        UnitProbe {
            bus,
            conn: OnceCell::new(),
        }
    }

    async fn systemd(&self) -> Result<&SystemdBus, SystemdError> {
        self.conn
            .get_or_try_init(|| async {
                match &self.bus {
                    None => SystemdBus::system().await,
                    Some(addr) => zbus::connection::Builder::address(addr.as_str())
                        .build()
                        .await
                        .map(SystemdBus::with_connection)
                        .map_err(SystemdError::Bus),
                }
            })
            .await
    }

    /// `Ok` when `unit` is `active`; else why not.
    pub async fn check(&self, unit: &str) -> Result<(), String> {
        let sd = self.systemd().await.map_err(|e| e.to_string())?;
        let state = sd.state(unit).await.map_err(|e| e.to_string())?;
        if state.active == "active" {
            Ok(())
        } else {
            Err(format!("unit {unit} is {}/{}", state.active, state.sub))
        }
    }
}

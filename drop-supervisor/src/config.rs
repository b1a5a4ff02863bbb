//! The daemon's configuration file (TOML), in two phases: [`RawConfig`] mirrors the file and
//! rejects unknown keys; [`Config::from_raw`] validates it into the type the daemon uses. Every
//! error names the file and the key (serde's errors also carry line and column).

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the packaged daemon looks when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/drop/drop.toml";
/// Default state directory: node identity and, later, persisted desired state.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/drop";
/// Default control socket; `dropctl` uses the same default.
pub const DEFAULT_SOCKET: &str = "/run/drop/drop.sock";
/// Group given access to the control socket when it exists on the host.
pub const DEFAULT_SOCKET_GROUP: &str = "drop";
/// Where sysctls live; tests point this at a temporary folder.
pub const DEFAULT_SYSCTL_ROOT: &str = "/proc/sys";
/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Syntax errors, unknown keys and wrong types; the message carries key, line and column.
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config {origin}: key `{key}`: {reason}")]
    Invalid {
        origin: String,
        key: &'static str,
        reason: String,
    },
}

/// Mirror of the file. Every section and key is optional; unknown ones are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub node: RawNode,
    #[serde(default)]
    pub control: RawControl,
    #[serde(default)]
    pub tuning: RawTuning,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub runtime: RawRuntime,
    #[serde(default)]
    pub gateway: RawGateway,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRuntime {
    /// Function bundles (`image:`), one folder each. Default: `<state_dir>/images`.
    pub images_dir: Option<PathBuf>,
    /// Worker logs, one file per pool. Default: `<state_dir>/logs`.
    pub logs_dir: Option<PathBuf>,
    /// Put every pool in its own cgroup (default true; needs root).
    pub cgroups: Option<bool>,
    /// Name of the cgroup subtree (below the daemon's own cgroup) that holds the pools.
    pub cgroup_subtree: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGateway {
    /// `host:port` of the HTTP gateway, or `off`. Default: 127.0.0.1:8081.
    pub listen: Option<String>,
    /// When set, gateway requests need `Authorization: Bearer <token>`.
    pub token: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNode {
    pub name: Option<String>,
    pub state_dir: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawControl {
    pub socket: Option<PathBuf>,
    pub socket_group: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTuning {
    pub sysctl_root: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    /// A `tracing` filter such as `info` or `drop_supervisor=debug,info`.
    pub level: Option<String>,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The file it came from; `None` when the daemon runs on defaults alone.
    pub path: Option<PathBuf>,
    pub node_name: String,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub socket_group: String,
    pub sysctl_root: PathBuf,
    pub log_level: String,
    pub images_dir: PathBuf,
    pub logs_dir: PathBuf,
    pub cgroups: bool,
    pub cgroup_subtree: String,
    /// `None`: the gateway is off.
    pub gateway_listen: Option<std::net::SocketAddr>,
    pub gateway_token: Option<String>,
}

/// Default address of the HTTP gateway.
pub const DEFAULT_GATEWAY: &str = "127.0.0.1:8081";

impl Config {
    /// Loads `path`, or the defaults when `path` is `None` and the default file does not exist.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let path = match path {
            // Absolute, so that status and logs name the file unambiguously.
            Some(p) => std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()),
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => PathBuf::from(DEFAULT_CONFIG_PATH),
            None => return Config::from_raw(RawConfig::default(), None),
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        Config::parse(&text, &path)
    }

    /// Parses and validates `text`, naming `path` in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        Config::from_raw(raw, Some(path.to_path_buf()))
    }

    pub fn from_raw(raw: RawConfig, path: Option<PathBuf>) -> Result<Config, ConfigError> {
        let origin = match &path {
            Some(p) => p.display().to_string(),
            None => "(defaults)".to_string(),
        };
        let invalid = |key: &'static str, reason: String| ConfigError::Invalid {
            origin: origin.clone(),
            key,
            reason,
        };

        let node_name = match raw.node.name {
            Some(name) => name,
            None => nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "drop-node".to_string()),
        };
        validate_name(&node_name).map_err(|r| invalid("node.name", r))?;

        let state_dir = raw
            .node
            .state_dir
            .unwrap_or_else(|| DEFAULT_STATE_DIR.into());
        require_absolute(&state_dir).map_err(|r| invalid("node.state_dir", r))?;

        let socket = raw.control.socket.unwrap_or_else(|| DEFAULT_SOCKET.into());
        require_absolute(&socket).map_err(|r| invalid("control.socket", r))?;
        let len = socket.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            return Err(invalid(
                "control.socket",
                format!("path is {len} bytes; a Unix socket path holds at most {MAX_SOCKET_PATH}"),
            ));
        }

        let socket_group = raw
            .control
            .socket_group
            .unwrap_or_else(|| DEFAULT_SOCKET_GROUP.into());
        validate_name(&socket_group).map_err(|r| invalid("control.socket_group", r))?;

        let sysctl_root = raw
            .tuning
            .sysctl_root
            .unwrap_or_else(|| DEFAULT_SYSCTL_ROOT.into());
        require_absolute(&sysctl_root).map_err(|r| invalid("tuning.sysctl_root", r))?;

        let log_level = raw.log.level.unwrap_or_else(|| "info".into());
        tracing_subscriber::EnvFilter::try_new(&log_level)
            .map_err(|e| invalid("log.level", format!("not a tracing filter: {e}")))?;

        let images_dir = raw
            .runtime
            .images_dir
            .unwrap_or_else(|| state_dir.join("images"));
        require_absolute(&images_dir).map_err(|r| invalid("runtime.images_dir", r))?;
        let logs_dir = raw
            .runtime
            .logs_dir
            .unwrap_or_else(|| state_dir.join("logs"));
        require_absolute(&logs_dir).map_err(|r| invalid("runtime.logs_dir", r))?;
        let cgroups = raw.runtime.cgroups.unwrap_or(true);
        let cgroup_subtree = raw
            .runtime
            .cgroup_subtree
            .unwrap_or_else(|| "drop-pools".into());
        validate_name(&cgroup_subtree).map_err(|r| invalid("runtime.cgroup_subtree", r))?;

        let listen = raw.gateway.listen.unwrap_or_else(|| DEFAULT_GATEWAY.into());
        let gateway_listen = if listen == "off" {
            None
        } else {
            Some(listen.parse().map_err(|_| {
                invalid(
                    "gateway.listen",
                    format!("`{listen}` is not `host:port` (an IP address and a port) or `off`"),
                )
            })?)
        };
        let gateway_token = raw.gateway.token;
        if gateway_token
            .as_deref()
            .is_some_and(|t| t.len() < 16 || t.contains(char::is_whitespace))
        {
            return Err(invalid(
                "gateway.token",
                "must be at least 16 characters without spaces".into(),
            ));
        }

        Ok(Config {
            path,
            node_name,
            state_dir,
            socket,
            socket_group,
            sysctl_root,
            log_level,
            images_dir,
            logs_dir,
            cgroups,
            cgroup_subtree,
            gateway_listen,
            gateway_token,
        })
    }
}

fn require_absolute(p: &Path) -> Result<(), String> {
    if p.is_absolute() {
        Ok(())
    } else {
        Err(format!("`{}` must be an absolute path", p.display()))
    }
}

/// Node and group names: 1–63 bytes of `[A-Za-z0-9._-]`, not starting with `-` or `.`.
fn validate_name(name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty() || name.len() > 63 {
        return Err(format!("`{name}` must be 1 to 63 bytes long"));
    }
    if name.starts_with(['-', '.']) || !name.chars().all(ok_char) {
        return Err(format!(
            "`{name}` may hold only letters, digits, `.`, `_` and `-`, and must not start with `-` or `.`"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/drop/test.toml"))
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = parse("[node]\nname = \"n1\"\n").unwrap();
        assert_eq!(c.node_name, "n1");
        assert_eq!(c.state_dir, Path::new(DEFAULT_STATE_DIR));
        assert_eq!(c.socket, Path::new(DEFAULT_SOCKET));
        assert_eq!(c.socket_group, "drop");
        assert_eq!(c.sysctl_root, Path::new("/proc/sys"));
        assert_eq!(c.log_level, "info");
        assert_eq!(c.path.as_deref(), Some(Path::new("/etc/drop/test.toml")));
    }

    #[test]
    fn every_key_is_read() {
        let c = parse(
            "[node]\nname = \"a\"\nstate_dir = \"/s\"\n[control]\nsocket = \"/r/x.sock\"\n\
             socket_group = \"ops\"\n[tuning]\nsysctl_root = \"/t\"\n[log]\nlevel = \"debug\"\n",
        )
        .unwrap();
        assert_eq!(
            (
                c.state_dir.to_str(),
                c.socket.to_str(),
                c.socket_group.as_str()
            ),
            (Some("/s"), Some("/r/x.sock"), "ops")
        );
        assert_eq!(
            (c.sysctl_root.to_str(), c.log_level.as_str()),
            (Some("/t"), "debug")
        );
    }

    #[test]
    fn unknown_key_names_file_key_line_and_column() {
        let err = parse("[node]\nname = \"a\"\nstate_dri = \"/x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("/etc/drop/test.toml"), "{err}");
        assert!(err.contains("state_dri"), "{err}");
        assert!(err.contains("line 3, column 1"), "{err}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let err = parse("[control]\nsocket = 5\n").unwrap_err().to_string();
        assert!(err.contains("socket") && err.contains("line 2"), "{err}");
    }

    #[test]
    fn relative_paths_are_refused_with_the_key() {
        let err = parse("[node]\nname = \"a\"\nstate_dir = \"var/lib\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("node.state_dir") && err.contains("absolute"),
            "{err}"
        );
        let err = parse("[tuning]\nsysctl_root = \"proc\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("tuning.sysctl_root"), "{err}");
    }

    #[test]
    fn overlong_socket_path_is_refused() {
        let long = format!("/{}", "s".repeat(120));
        let err = parse(&format!("[control]\nsocket = \"{long}\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("control.socket") && err.contains("at most 107"),
            "{err}"
        );
    }

    #[test]
    fn bad_names_and_log_filters_are_refused() {
        let err = parse("[node]\nname = \"a b\"\n").unwrap_err().to_string();
        assert!(err.contains("node.name"), "{err}");
        let err = parse("[log]\nlevel = \"info,=[\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("log.level"), "{err}");
    }

    #[test]
    fn missing_file_is_a_read_error_naming_it() {
        let err = Config::load(Some(Path::new("/nonexistent/drop.toml")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/drop.toml"), "{err}");
    }
}

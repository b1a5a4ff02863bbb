//! What a service is (DESIGN §6): a name, a count, and either an installed unit file (its text
//! replicated and written on each node that runs an instance) or an inline command run as a
//! transient unit. Stored as JSON in the replicated state under `svc/<ns>/<name>`; everything
//! here is pure and checked before anything is stored.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::host::systemd::TransientSpec;

/// Longest service name (the unit name also holds the namespace and an instance number).
pub const MAX_NAME: usize = 40;
/// Most instances one service may ask for.
pub const MAX_COUNT: u32 = 1000;
/// Largest unit text accepted.
pub const MAX_UNIT_BYTES: usize = 64 * 1024;
/// Every unit DROP starts has this prefix: what a node lists to adopt its own units.
pub const UNIT_PREFIX: &str = "drop-svc.";

/// A refused service definition: the field and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid service {service:?}: `{field}`: {reason}")]
pub struct SpecError {
    pub service: String,
    pub field: &'static str,
    pub reason: String,
}

/// How the instances run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Run {
    /// An installed unit: its text, written as a template on each node.
    Unit { text: String },
    /// A command as a transient unit, with its limits.
    Exec {
        argv: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        memory_bytes: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cpu: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tasks: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        env: BTreeMap<String, String>,
        /// systemd's `Restart=` (default `on-failure`).
        restart: String,
    },
}

/// A service as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub name: String,
    pub count: u32,
    pub run: Run,
    /// Balanced on the namespace's VIP at this port (the XDP balancer, DESIGN §7).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance: Option<Balance>,
}

/// A service's port on the namespace's VIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Balance {
    pub port: u16,
    /// 6 (TCP) or 17 (UDP).
    pub proto: u8,
    /// How the VIP holder's XDP program hands frames to the backends.
    #[serde(default, skip_serializing_if = "Forward::is_mac")]
    pub forward: Forward,
}

/// How a balanced port's frames reach the nodes running its instances (DESIGN §7). Either way
/// the instances answer the client directly (direct server return).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Forward {
    /// The destination MAC becomes the backend's: every instance's node on the VIP holder's
    /// segment.
    #[default]
    Mac,
    /// IPv4-in-IPv4 to the backend's address through the holder's next hop: backends may be
    /// routed (another subnet); each takes the header off in its own XDP program.
    Ipip,
}

impl Forward {
    pub fn is_mac(&self) -> bool {
        *self == Forward::Mac
    }

    pub fn name(self) -> &'static str {
        match self {
            Forward::Mac => "mac",
            Forward::Ipip => "ipip",
        }
    }
}

/// The restart policies systemd knows.
const RESTARTS: &[&str] = &[
    "no",
    "on-success",
    "on-failure",
    "on-abnormal",
    "on-watchdog",
    "on-abort",
    "always",
];

impl ServiceSpec {
    /// Checks every field; the first problem found is the error.
    pub fn validate(&self) -> Result<(), SpecError> {
        let err = |field: &'static str, reason: String| SpecError {
            service: self.name.clone(),
            field,
            reason,
        };
        validate_name(&self.name).map_err(|r| err("name", r))?;
        if self.count > MAX_COUNT {
            return Err(err("count", format!("at most {MAX_COUNT}")));
        }
        if let Some(b) = &self.balance {
            if b.port == 0 {
                return Err(err("port", "must be 1 to 65535".into()));
            }
            if b.proto != 6 && b.proto != 17 {
                return Err(err("proto", "tcp or udp".into()));
            }
        }
        match &self.run {
            Run::Unit { text } => check_unit_text(text).map_err(|r| err("unit", r))?,
            Run::Exec {
                argv,
                cpu,
                tasks,
                user,
                env,
                restart,
                memory_bytes,
            } => {
                let Some(program) = argv.first() else {
                    return Err(err("exec", "no command".into()));
                };
                if !program.starts_with('/') {
                    return Err(err(
                        "exec",
                        format!("the program must be an absolute path, not {program:?}"),
                    ));
                }
                if argv.iter().any(|a| a.contains('\0')) {
                    return Err(err("exec", "an argument holds a NUL byte".into()));
                }
                if memory_bytes.is_some_and(|m| m < 1024 * 1024) {
                    return Err(err("memory", "at least 1M".into()));
                }
                if let Some(c) = cpu
                    && !(*c > 0.0 && *c <= 4096.0)
                {
                    return Err(err("cpu", format!("{c} is not between 0 and 4096 cores")));
                }
                if *tasks == Some(0) {
                    return Err(err("tasks", "must be at least 1".into()));
                }
                if let Some(u) = user
                    && (u.is_empty()
                        || !u
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
                {
                    return Err(err("user", format!("{u:?} is not a user name")));
                }
                for k in env.keys() {
                    let ok = !k.is_empty()
                        && !k.starts_with(|c: char| c.is_ascii_digit())
                        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                    if !ok {
                        return Err(err("env", format!("{k:?} is not a variable name")));
                    }
                }
                if env.values().any(|v| v.contains(['\0', '\n'])) {
                    return Err(err("env", "a value holds a NUL or a newline".into()));
                }
                if !RESTARTS.contains(&restart.as_str()) {
                    return Err(err(
                        "restart",
                        format!("{restart:?} is not one of {}", RESTARTS.join(", ")),
                    ));
                }
            }
        }
        Ok(())
    }

    /// A short digest of what the instances run: a running instance with another digest is
    /// replaced.
    pub fn digest(&self) -> String {
        let run = serde_json::to_vec(&self.run).unwrap_or_default();
        let hash = Sha256::digest(&run);
        hash[..6].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The unit of instance `index` in namespace `ns`.
    pub fn unit(&self, ns: &str, index: u32) -> String {
        unit_name(ns, &self.name, index)
    }

    /// The `Description=` of an instance: it carries the digest, so a node can tell after a
    /// restart whether a unit it finds runs this version.
    pub fn description(&self, ns: &str) -> String {
        format!("DROP service {ns}/{} [{}]", self.name, self.digest())
    }

    /// The transient unit of instance `index` (inline services only).
    pub fn transient(&self, ns: &str, index: u32) -> Option<TransientSpec> {
        let Run::Exec {
            argv,
            memory_bytes,
            cpu,
            tasks,
            user,
            env,
            restart,
        } = &self.run
        else {
            return None;
        };
        let mut env: Vec<(String, String)> =
            env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        env.push(("DROP_SERVICE".into(), self.name.clone()));
        env.push(("DROP_INSTANCE".into(), index.to_string()));
        env.push(("DROP_NAMESPACE".into(), ns.to_string()));
        Some(TransientSpec {
            unit: self.unit(ns, index),
            argv: argv.clone(),
            memory_max: *memory_bytes,
            cpu: *cpu,
            tasks_max: *tasks,
            user: user.clone(),
            env,
            restart: Some(restart.clone()),
            description: Some(self.description(ns)),
        })
    }

    /// The template file of an installed-unit service: the operator's text with the
    /// description DROP reads back (set after theirs, so it wins).
    pub fn template_text(&self, ns: &str) -> Option<String> {
        let Run::Unit { text } = &self.run else {
            return None;
        };
        Some(with_description(text, &self.description(ns)))
    }
}

/// The body of `PUT /v1/services/<name>` (what `dropctl service set` sends).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceRequest {
    pub count: u32,
    /// The text of an installed unit file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// A command (program and arguments) run as a transient unit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<Vec<String>>,
    /// `64M`, `1G`, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tasks: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ns: Option<String>,
    /// Balance this port of the namespace's VIP over the instances' nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// `tcp` (default) or `udp`, with `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proto: Option<String>,
    /// `mac` (default) or `ipip`, with `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward: Option<String>,
}

impl ServiceRequest {
    /// The service it describes, validated; errors name the field.
    pub fn into_spec(self, name: &str) -> Result<ServiceSpec, SpecError> {
        let err = |field: &'static str, reason: &str| SpecError {
            service: name.to_string(),
            field,
            reason: reason.to_string(),
        };
        let run = match (self.unit, self.exec) {
            (Some(_), Some(_)) => {
                return Err(err("unit", "give either a unit file or `exec`, not both"));
            }
            (None, None) => {
                return Err(err(
                    "exec",
                    "give a unit file (`unit`) or a command (`exec`)",
                ));
            }
            (Some(text), None) => {
                let extra = [
                    ("memory", self.memory.is_some()),
                    ("cpu", self.cpu.is_some()),
                    ("tasks", self.tasks.is_some()),
                    ("user", self.user.is_some()),
                    ("env", !self.env.is_empty()),
                    ("restart", self.restart.is_some()),
                ];
                if let Some((field, _)) = extra.iter().find(|(_, set)| *set) {
                    return Err(err(
                        field,
                        "only for `exec` services: an installed unit sets it in its own text",
                    ));
                }
                Run::Unit { text }
            }
            (None, Some(argv)) => Run::Exec {
                argv,
                memory_bytes: self
                    .memory
                    .as_deref()
                    .map(parse_size)
                    .transpose()
                    .map_err(|r| err("memory", &r))?,
                cpu: self.cpu,
                tasks: self.tasks,
                user: self.user,
                env: self.env,
                restart: self.restart.unwrap_or_else(|| "on-failure".into()),
            },
        };
        let balance = match (self.port, self.proto.as_deref(), self.forward.as_deref()) {
            (None, None, None) => None,
            (None, Some(_), _) => return Err(err("proto", "goes with `port`")),
            (None, _, Some(_)) => return Err(err("forward", "goes with `port`")),
            (Some(port), proto, forward) => Some(Balance {
                port,
                proto: match proto.unwrap_or("tcp") {
                    "tcp" => 6,
                    "udp" => 17,
                    other => return Err(err("proto", &format!("{other:?}: tcp or udp"))),
                },
                forward: match forward.unwrap_or("mac") {
                    "mac" => Forward::Mac,
                    "ipip" => Forward::Ipip,
                    other => return Err(err("forward", &format!("{other:?}: mac or ipip"))),
                },
            }),
        };
        let spec = ServiceSpec {
            name: name.to_string(),
            count: self.count,
            run,
            balance,
        };
        spec.validate()?;
        Ok(spec)
    }
}

/// `drop-svc.<ns>.<name>@<index>.service`.
pub fn unit_name(ns: &str, name: &str, index: u32) -> String {
    format!("{UNIT_PREFIX}{ns}.{name}@{index}.service")
}

/// The template file name of an installed-unit service.
pub fn template_name(ns: &str, name: &str) -> String {
    format!("{UNIT_PREFIX}{ns}.{name}@.service")
}

/// `(ns, name, index)` of a unit DROP named, else `None`.
pub fn parse_unit(unit: &str) -> Option<(String, String, u32)> {
    let rest = unit.strip_prefix(UNIT_PREFIX)?.strip_suffix(".service")?;
    let (head, index) = rest.rsplit_once('@')?;
    let index = index.parse().ok()?;
    // The namespace may hold dots; a service name may not.
    let (ns, name) = head.rsplit_once('.')?;
    (!ns.is_empty() && validate_name(name).is_ok())
        .then(|| (ns.to_string(), name.to_string(), index))
}

/// The digest in a description written by [`ServiceSpec::description`].
pub fn digest_of(description: &str) -> Option<&str> {
    let start = description.rfind('[')?;
    description[start + 1..].strip_suffix(']')
}

/// Lower-case letters, digits and `-`, starting with a letter.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(format!("must be 1 to {MAX_NAME} characters"));
    }
    if !name.starts_with(|c: char| c.is_ascii_lowercase())
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err(format!(
            "{name:?}: lower-case letters, digits and `-`, starting with a letter"
        ));
    }
    Ok(())
}

/// The checks every node can make of a unit text; `systemd-analyze verify` adds its own where
/// the node has it.
pub fn check_unit_text(text: &str) -> Result<(), String> {
    if text.len() > MAX_UNIT_BYTES {
        return Err(format!("{} bytes; at most {MAX_UNIT_BYTES}", text.len()));
    }
    if text.contains('\0') {
        return Err("holds a NUL byte".into());
    }
    let mut section = None;
    let mut exec_start = false;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with(['#', ';']) {
            continue;
        }
        if let Some(s) = line.strip_prefix('[') {
            let Some(name) = s.strip_suffix(']') else {
                return Err(format!("line {}: unclosed section header {line:?}", i + 1));
            };
            section = Some(name.to_string());
            continue;
        }
        if section.is_none() {
            return Err(format!("line {}: {line:?} is outside any section", i + 1));
        }
        if !line.contains('=') && !line.ends_with('\\') {
            return Err(format!("line {}: {line:?} is not `Key=value`", i + 1));
        }
        if section.as_deref() == Some("Service") && line.starts_with("ExecStart=") {
            exec_start = true;
        }
    }
    if !exec_start {
        return Err("no `ExecStart=` in a `[Service]` section".into());
    }
    Ok(())
}

/// `text` with `Description=` set (last in `[Unit]`, which is added if missing).
fn with_description(text: &str, description: &str) -> String {
    let mut out = String::with_capacity(text.len() + 64);
    let mut in_unit = false;
    let mut done = false;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            if in_unit && !done {
                out.push_str(&format!("Description={description}\n"));
                done = true;
            }
            in_unit = t == "[Unit]";
        }
        out.push_str(line);
        out.push('\n');
    }
    if in_unit && !done {
        out.push_str(&format!("Description={description}\n"));
        done = true;
    }
    if !done {
        out = format!("[Unit]\nDescription={description}\n\n{out}");
    }
    out
}

/// `64M`, `1G`, `512K` or bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (num, mul) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 1024),
        Some((i, 'M' | 'm')) => (&t[..i], 1024 * 1024),
        Some((i, 'G' | 'g')) => (&t[..i], 1024 * 1024 * 1024),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| format!("{text:?} is not a size (like 64M, 1G or bytes)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec(name: &str) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            count: 3,
            balance: None,
            run: Run::Exec {
                argv: vec!["/bin/sleep".into(), "1000".into()],
                memory_bytes: Some(64 << 20),
                cpu: Some(0.5),
                tasks: Some(16),
                user: None,
                env: BTreeMap::from([("A".into(), "1".into())]),
                restart: "on-failure".into(),
            },
        }
    }

    #[test]
    fn unit_names_round_trip_and_foreign_units_are_not_ours() {
        let s = exec("web-1");
        let unit = s.unit("prod.eu", 4);
        assert_eq!(unit, "drop-svc.prod.eu.web-1@4.service");
        assert_eq!(
            parse_unit(&unit),
            Some(("prod.eu".into(), "web-1".into(), 4))
        );
        assert_eq!(parse_unit("sshd.service"), None);
        assert_eq!(parse_unit("drop-svc.x.y@a.service"), None);
        assert_eq!(parse_unit("drop-svc.x.y@1.socket"), None);
    }

    #[test]
    fn every_bad_field_is_named() {
        let field = |s: ServiceSpec| s.validate().unwrap_err().field;
        let mut s = exec("Web");
        assert_eq!(field(s.clone()), "name");
        s.name = "web".into();
        s.count = MAX_COUNT + 1;
        assert_eq!(field(s.clone()), "count");
        s.count = 2;
        assert!(s.validate().is_ok());
        let with = |f: &dyn Fn(&mut ServiceSpec)| {
            let mut t = s.clone();
            f(&mut t);
            field(t)
        };
        assert_eq!(
            with(&|t| if let Run::Exec { argv, .. } = &mut t.run {
                argv[0] = "sleep".into()
            }),
            "exec"
        );
        assert_eq!(
            with(&|t| if let Run::Exec { cpu, .. } = &mut t.run {
                *cpu = Some(0.0)
            }),
            "cpu"
        );
        assert_eq!(
            with(&|t| if let Run::Exec { restart, .. } = &mut t.run {
                *restart = "sometimes".into()
            }),
            "restart"
        );
        assert_eq!(
            with(&|t| if let Run::Exec { env, .. } = &mut t.run {
                env.insert("1X".into(), "v".into());
            }),
            "env"
        );
        assert_eq!(
            with(&|t| if let Run::Exec { memory_bytes, .. } = &mut t.run {
                *memory_bytes = Some(10)
            }),
            "memory"
        );
        assert_eq!(
            with(&|t| t.run = Run::Unit {
                text: "[Service]\nType=simple\n".into()
            }),
            "unit"
        );
    }

    #[test]
    fn unit_text_checks_name_the_line() {
        assert!(check_unit_text("[Unit]\nDescription=x\n[Service]\nExecStart=/bin/true\n").is_ok());
        let e = check_unit_text("[Service]\nExecStart=/bin/true\nbogus\n").unwrap_err();
        assert!(e.contains("line 3"), "{e}");
        let e = check_unit_text("ExecStart=/bin/true\n").unwrap_err();
        assert!(e.contains("line 1"), "{e}");
        assert!(check_unit_text("[Unit]\nDescription=x\n").is_err());
    }

    #[test]
    fn template_carries_the_digest_and_the_digest_follows_the_spec() {
        let mut s = exec("web");
        s.run = Run::Unit {
            text: "[Unit]\nDescription=mine\n\n[Service]\nExecStart=/bin/sleep 100\n".into(),
        };
        let text = s.template_text("t").unwrap();
        let desc = s.description("t");
        // Last in [Unit], so it wins over the operator's own.
        let ours = text.find(&format!("Description={desc}\n")).unwrap();
        assert!(text.find("Description=mine").unwrap() < ours, "{text}");
        assert!(ours < text.find("[Service]").unwrap(), "{text}");
        assert_eq!(digest_of(&desc), Some(s.digest().as_str()));
        let no_unit = ServiceSpec {
            run: Run::Unit {
                text: "[Service]\nExecStart=/bin/true\n".into(),
            },
            ..s.clone()
        };
        assert!(
            no_unit
                .template_text("t")
                .unwrap()
                .starts_with("[Unit]\nDescription=DROP service t/web [")
        );
        // The count is not part of what runs.
        let mut more = s.clone();
        more.count = 9;
        assert_eq!(more.digest(), s.digest());
        assert_ne!(exec("web").digest(), s.digest());
    }

    #[test]
    fn transient_units_carry_limits_and_identity() {
        let t = exec("web").transient("t", 2).unwrap();
        assert_eq!(t.unit, "drop-svc.t.web@2.service");
        assert_eq!(t.memory_max, Some(64 << 20));
        assert!(t.env.contains(&("DROP_INSTANCE".into(), "2".into())));
        assert!(crate::host::systemd::transient_properties(&t).is_ok());
    }

    #[test]
    fn requests_become_specs_or_name_the_field() {
        let req = ServiceRequest {
            count: 2,
            exec: Some(vec!["/bin/sleep".into(), "9".into()]),
            memory: Some("64M".into()),
            ..ServiceRequest::default()
        };
        let s = req.clone().into_spec("web").unwrap();
        assert!(
            matches!(s.run, Run::Exec { memory_bytes: Some(m), ref restart, .. } if m == 64 << 20 && restart == "on-failure")
        );
        let field = |r: ServiceRequest| r.into_spec("web").unwrap_err().field;
        assert_eq!(
            field(ServiceRequest {
                memory: Some("x".into()),
                ..req.clone()
            }),
            "memory"
        );
        assert_eq!(
            field(ServiceRequest {
                exec: None,
                ..req.clone()
            }),
            "exec"
        );
        let unit = ServiceRequest {
            count: 1,
            unit: Some("[Service]\nExecStart=/bin/true\n".into()),
            ..ServiceRequest::default()
        };
        assert!(unit.clone().into_spec("web").is_ok());
        assert_eq!(
            field(ServiceRequest {
                cpu: Some(1.0),
                ..unit.clone()
            }),
            "cpu"
        );
        assert_eq!(
            field(ServiceRequest {
                exec: req.exec.clone(),
                ..unit
            }),
            "unit"
        );
        let port = |p: Option<u16>, proto: Option<&str>| ServiceRequest {
            port: p,
            proto: proto.map(str::to_string),
            ..req.clone()
        };
        assert_eq!(
            port(Some(80), None).into_spec("web").unwrap().balance,
            Some(Balance {
                port: 80,
                proto: 6,
                forward: Forward::Mac
            })
        );
        assert_eq!(
            port(Some(53), Some("udp"))
                .into_spec("web")
                .unwrap()
                .balance,
            Some(Balance {
                port: 53,
                proto: 17,
                forward: Forward::Mac
            })
        );
        assert_eq!(field(port(Some(0), None)), "port");
        assert_eq!(field(port(Some(80), Some("sctp"))), "proto");
        assert_eq!(field(port(None, Some("udp"))), "proto");
        let forward = |p: Option<u16>, f: &str| ServiceRequest {
            port: p,
            forward: Some(f.to_string()),
            ..req.clone()
        };
        let ipip = forward(Some(80), "ipip").into_spec("web").unwrap();
        assert_eq!(ipip.balance.unwrap().forward, Forward::Ipip);
        assert_eq!(field(forward(Some(80), "gre")), "forward");
        assert_eq!(field(forward(None, "ipip")), "forward");
        // Stored as before when the default is kept; IPIP round-trips.
        let mac = port(Some(80), None).into_spec("web").unwrap();
        let text = serde_json::to_string(&mac).unwrap();
        assert!(!text.contains("forward"), "{text}");
        let back: ServiceSpec =
            serde_json::from_str(&serde_json::to_string(&ipip).unwrap()).unwrap();
        assert_eq!(back, ipip);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("2k"), Ok(2048));
        assert_eq!(parse_size("100"), Ok(100));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999G").is_err());
    }
}

//! Flow files: the YAML that declares a flow's pools, parsed and validated into [`Flow`].
//!
//! Owns the flow format: files written for the original (Erlang) DROP load unchanged, and the
//! richer keys of DESIGN §3/§4 extend the same document. Every error names the file, the key
//! path (`func[0].sub[1].type`), the line and the column. This module is pure: it reads no files
//! and looks at no host state; whether a pool's `image` is installed is asked of the caller
//! through [`check_images`].
//!
//! # The format
//!
//! ```yaml
//! name: pyex            # flow id
//! priority: 0           # 0 = every node of the namespace (default), 1 = leader only
//! replicas: 3           # (new) run on N nodes; not together with `priority: 1`
//! func:
//!   - name: pyex        # pool name; suffix `_async` / `_stream` selects the mode
//!     image: pyex:0.1.0 # a bundle directory under the node's images folder
//!     cmd: /usr/bin/python3 pyex.py 1   # split like a shell would, but run WITHOUT a shell
//!     num: 2            # workers (default 1): min = max = num
//!     memory: 100       # MiB (default 100)
//!     timeout: 10000    # ms per request (default 10000); stream pools: restart after this
//!                       # long without output
//!     sub:              # this pool receives the output lines of these pools
//!       - name: other
//!         filter: "tag:matched"   # substring; "no" = no filter (default)
//!         type: one               # one|sone (default), all, done|any, dall|every
//! ```
//!
//! New pool keys, all optional: `mode` (sync|async|stream), `min`/`max` (instead of `num`),
//! `concurrency` (async only, default 16), `queue` (default 64), `cpu` (cores), `pids`, `env`,
//! `user`, `group`, `cwd`, `shell` (run `cmd` with `/bin/sh -c`), `cmd` as a list (the argv),
//! `cache` ({`ttl_ms`, `size`}), `restart` ({`backoff_initial_ms`, `backoff_max_ms`,
//! `reset_after_ms`, `intensity`, `period_ms`}), `line_max` (bytes), `envelope` (the gateway
//! sends each request as the original L7 JSON envelope). A subscription may give
//! `regex` instead of `filter`.
//!
//! # Typing
//!
//! Scalars follow the YAML 1.2 core schema: `yes`/`no`/`on`/`off` are strings (so DROP's
//! `filter: no` means "no filter"), `12` is an integer, `1.5` a float, `true` a boolean, `~` null.
//! A key whose value is null counts as absent. Fields that name things (`name`, `image`, `cmd`,
//! `filter`, `user`, ...) want a string and refuse `cmd: 123` with a hint to quote it; the two
//! places where numbers are natural text, `env` values and the items of a list-form `cmd`, take
//! any non-null scalar as written (`PORT: 8080`, `[python3, pyex.py, 1]`). Anchors and aliases are
//! resolved (merge keys, `<<`, are not: they are reported as unknown keys); tags other than
//! `!!str` and multiple documents per file are refused.

mod decode;
mod yaml;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;

/// One parsed and validated flow file.
#[derive(Debug, Clone, PartialEq)]
pub struct Flow {
    pub name: String,
    /// 0: run on every node of the namespace; 1: run on the leader only.
    pub priority: u8,
    /// Run on this many nodes of the namespace (never together with `priority: 1`).
    pub replicas: Option<u32>,
    /// At least one; names are unique within the flow.
    pub pools: Vec<PoolSpec>,
    /// The file name given to [`parse_flow`], for messages.
    pub source: Option<PathBuf>,
}

/// One pool of a flow, with every default filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSpec {
    pub name: String,
    pub mode: Mode,
    /// What to execute, already split; with `shell: true` it is `["/bin/sh", "-c", cmd]`.
    pub argv: Vec<String>,
    pub shell: bool,
    /// Fewest workers; 0 is allowed (the pool may idle down to nothing).
    pub min: u32,
    /// Most workers; at least 1 and at least `min`.
    pub max: u32,
    /// Requests in flight per worker: 1 for sync and stream, default 16 for async.
    pub concurrency: u32,
    /// Requests allowed to wait for a free worker before callers are told "overloaded".
    pub queue: u32,
    /// Per request deadline (sync, async). For a stream pool: restart a worker that has printed
    /// nothing for this long.
    pub timeout: Duration,
    /// Memory limit of the pool's cgroup (the file gives MiB).
    pub memory_bytes: u64,
    /// CPU quota in cores (0.5 = half a core).
    pub cpu: Option<f64>,
    /// Most tasks (processes and threads) in the pool's cgroup.
    pub pids: Option<u64>,
    pub env: BTreeMap<String, String>,
    pub user: Option<String>,
    pub group: Option<String>,
    /// Absolute working directory; without it the worker starts in its bundle (`/home/drop`).
    pub cwd: Option<PathBuf>,
    /// Bundle directory name under the node's images folder.
    pub image: Option<String>,
    /// Pools whose output lines this pool receives (any pool name, also of other flows).
    pub subs: Vec<Subscription>,
    /// Reply cache (never for stream pools).
    pub cache: Option<CacheSpec>,
    pub restart: RestartSpec,
    /// Longest line, in bytes, in either direction.
    pub line_max: usize,
    /// The gateway hands this pool every request as the original DROP's JSON envelope and
    /// lets the reply set the status (`gateway::envelope`).
    pub envelope: bool,
    /// Line of the flow file where this pool is defined.
    pub line: usize,
}

/// How the supervisor talks to a pool's workers (DESIGN §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One request line in, one reply line out.
    Sync,
    /// `<id>::<payload>` in, `<id>::<reply>` out, in any order.
    Async,
    /// Nothing in; every printed line is an event for subscribers.
    Stream,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Sync => "sync",
            Mode::Async => "async",
            Mode::Stream => "stream",
        }
    }

    /// The mode a pool name's suffix selects, as in the original DROP.
    pub fn from_name_suffix(name: &str) -> Option<Mode> {
        if name.ends_with("_async") {
            Some(Mode::Async)
        } else if name.ends_with("_stream") {
            Some(Mode::Stream)
        } else {
            None
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// "Pool `self` receives the output lines of pool `from` that pass `filter`."
#[derive(Debug, Clone, PartialEq)]
pub struct Subscription {
    pub from: String,
    pub filter: Filter,
    pub delivery: Delivery,
}

/// Which lines of the source pool a subscription takes.
#[derive(Debug, Clone)]
pub enum Filter {
    /// Every line (DROP's `filter: "no"`, or no `filter`).
    None,
    /// Lines containing this text (DROP's label filter, e.g. `tag:valid`).
    Substring(String),
    /// Lines the regex matches anywhere (`regex:`).
    Regex(regex::Regex),
}

impl Filter {
    pub fn matches(&self, line: &str) -> bool {
        match self {
            Filter::None => true,
            Filter::Substring(s) => line.contains(s.as_str()),
            Filter::Regex(re) => re.is_match(line),
        }
    }

    /// `no`, `substring:<text>` or `regex:<pattern>`: for listings.
    pub fn describe(&self) -> String {
        match self {
            Filter::None => "no".to_owned(),
            Filter::Substring(s) => format!("substring:{s}"),
            Filter::Regex(re) => format!("regex:{}", re.as_str()),
        }
    }
}

/// Regexes compare by their pattern text.
impl PartialEq for Filter {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Filter::None, Filter::None) => true,
            (Filter::Substring(a), Filter::Substring(b)) => a == b,
            (Filter::Regex(a), Filter::Regex(b)) => a.as_str() == b.as_str(),
            _ => false,
        }
    }
}

/// Where a subscribed line goes (DESIGN §3). DROP's names map as one|sone → `One`,
/// all → `All`, done → `Any`, dall → `Every`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Delivery {
    /// One free local worker.
    One,
    /// Every local worker.
    All,
    /// One instance of the pool anywhere in the namespace, local first.
    Any,
    /// Every instance of the pool in the namespace.
    Every,
}

impl Delivery {
    pub fn as_str(self) -> &'static str {
        match self {
            Delivery::One => "one",
            Delivery::All => "all",
            Delivery::Any => "any",
            Delivery::Every => "every",
        }
    }
}

impl fmt::Display for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Reply cache of a pool: replies keyed by request payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSpec {
    pub ttl: Duration,
    /// Most entries kept.
    pub size: usize,
}

/// Restart policy of a pool's workers (DESIGN §3 "Supervision").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartSpec {
    /// Delay before the second restart in a row (the first is immediate); doubles each time.
    pub backoff_initial: Duration,
    /// Cap of the doubling delay.
    pub backoff_max: Duration,
    /// A worker that ran this long without crashing resets the backoff.
    pub reset_after: Duration,
    /// More than `intensity` restarts within `period` put the pool into `failed`.
    pub intensity: u32,
    pub period: Duration,
}

impl Default for RestartSpec {
    fn default() -> Self {
        Self {
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_millis(30_000),
            reset_after: Duration::from_millis(60_000),
            intensity: 5,
            period: Duration::from_millis(60_000),
        }
    }
}

/// A flow file problem, positioned. Displays as `{file}:{line}:{column}: {key}: {message}`;
/// the key is left out for document-level problems (empty `key`), the column when it is not
/// known (0, see [`check_images`]). When the file has several problems, the first is this one
/// and the others are in `more`, each on a line of its own in the display.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowError {
    pub file: PathBuf,
    /// 1-based.
    pub line: usize,
    /// 1-based; 0 when only the line is known.
    pub column: usize,
    /// Key path such as `func[0].num`; empty for document-level problems.
    pub key: String,
    pub kind: FlowErrorKind,
    /// Further problems of the same file, in the order they were found.
    pub more: Vec<FlowError>,
}

impl fmt::Display for FlowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", Prefix(self), self.kind)?;
        for e in &self.more {
            write!(f, "\n{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for FlowError {}

impl FlowError {
    /// Every problem, this one first.
    pub fn all(&self) -> impl Iterator<Item = &FlowError> {
        std::iter::once(self).chain(self.more.iter())
    }

    /// One error carrying all of `errors` (the first with the others in `more`); `None` for
    /// none.
    pub fn combine(errors: Vec<FlowError>) -> Option<FlowError> {
        let mut flat = Vec::new();
        for mut e in errors {
            let more = std::mem::take(&mut e.more);
            flat.push(e);
            flat.extend(more);
        }
        let mut it = flat.into_iter();
        let mut first = it.next()?;
        first.more = it.collect();
        Some(first)
    }
}

/// `file:line:column: key: ` in front of the message.
struct Prefix<'a>(&'a FlowError);

impl fmt::Display for Prefix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let e = self.0;
        write!(f, "{}:{}:", e.file.display(), e.line)?;
        if e.column > 0 {
            write!(f, "{}:", e.column)?;
        }
        if !e.key.is_empty() {
            write!(f, " {}:", e.key)?;
        }
        f.write_str(" ")
    }
}

/// What is wrong; [`FlowError`] says where.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FlowErrorKind {
    #[error("YAML syntax error: {0}")]
    Syntax(String),
    #[error("the file holds no YAML document; a flow is a mapping with `name` and `func`")]
    Empty,
    #[error("a flow file holds exactly one YAML document; this starts a second one")]
    MultipleDocuments,
    #[error("flow files do not support {0}")]
    Unsupported(&'static str),
    #[error("unknown key{}", unknown_key_hint(suggestion, expected))]
    UnknownKey {
        /// A known key close in spelling.
        suggestion: Option<&'static str>,
        expected: &'static [&'static str],
    },
    #[error("expected {expected}, found {found}{hint}")]
    WrongType {
        expected: &'static str,
        found: &'static str,
        /// Empty or a parenthesised tip, with a leading space.
        hint: &'static str,
    },
    #[error("missing required key `{0}`")]
    Missing(&'static str),
    #[error("duplicate key (first given on line {first_line})")]
    DuplicateKey { first_line: usize },
    #[error("duplicate pool name `{name}` (first defined on line {first_line})")]
    DuplicatePool { name: String, first_line: usize },
    #[error("bad regex: {0}")]
    BadRegex(String),
    #[error("out of range: {0}")]
    OutOfRange(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("`mode: {mode}` contradicts the pool name, whose suffix `_{suffix}` selects {suffix}")]
    ModeMismatch { mode: Mode, suffix: Mode },
    #[error("a flow needs at least one pool in `func`")]
    NoPools,
    #[error("image `{0}` is not installed on this node (see `dropctl image import`)")]
    UnknownImage(String),
}

fn unknown_key_hint(suggestion: &Option<&'static str>, expected: &[&str]) -> String {
    match suggestion {
        Some(s) => format!(
            " (did you mean `{s}`? expected one of: {})",
            expected.join(", ")
        ),
        None => format!(" (expected one of: {})", expected.join(", ")),
    }
}

/// Parses and validates a flow file. `file` only names the text in errors and in
/// [`Flow::source`]; nothing is read from disk.
pub fn parse_flow(text: &str, file: &Path) -> Result<Flow, FlowError> {
    decode::flow(text, file)
}

/// Checks that every pool's `image` is installed, as told by `image_exists` (the daemon asks
/// its images folder). A missing image is an apply-time error, not a parse error: a flow may be
/// written before its bundle is imported. The error points at the pool's line (the parsed flow
/// keeps no column).
pub fn check_images(flow: &Flow, image_exists: &dyn Fn(&str) -> bool) -> Result<(), FlowError> {
    for (i, pool) in flow.pools.iter().enumerate() {
        if let Some(image) = &pool.image
            && !image_exists(image)
        {
            return Err(FlowError {
                file: flow.source.clone().unwrap_or_default(),
                line: pool.line,
                column: 0,
                key: format!("func[{i}].image"),
                kind: FlowErrorKind::UnknownImage(image.clone()),
                more: Vec::new(),
            });
        }
    }
    Ok(())
}

impl Flow {
    /// The flow as `dropctl flow show` lists it. Environment values are left out (they are where
    /// secrets end up); their names are shown.
    pub fn to_summary_json(&self) -> serde_json::Value {
        let pools: Vec<_> = self.pools.iter().map(PoolSpec::to_summary_json).collect();
        json!({
            "name": self.name,
            "priority": self.priority,
            "replicas": self.replicas,
            "source": self.source.as_ref().map(|p| p.display().to_string()),
            "pools": pools,
        })
    }
}

impl PoolSpec {
    fn to_summary_json(&self) -> serde_json::Value {
        let subs: Vec<_> = self
            .subs
            .iter()
            .map(|s| json!({"from": s.from, "filter": s.filter.describe(), "type": s.delivery}))
            .collect();
        json!({
            "name": self.name,
            "mode": self.mode,
            "argv": self.argv,
            "shell": self.shell,
            "envelope": self.envelope,
            "image": self.image,
            "min": self.min,
            "max": self.max,
            "concurrency": self.concurrency,
            "queue": self.queue,
            "timeout_ms": millis(self.timeout),
            "memory_mb": self.memory_bytes / decode::MIB,
            "cpu": self.cpu,
            "pids": self.pids,
            "env": self.env.keys().collect::<Vec<_>>(),
            "user": self.user,
            "group": self.group,
            "cwd": self.cwd.as_ref().map(|p| p.display().to_string()),
            "subs": subs,
            "cache": self.cache.map(|c| json!({"ttl_ms": millis(c.ttl), "size": c.size})),
            "restart": {
                "backoff_initial_ms": millis(self.restart.backoff_initial),
                "backoff_max_ms": millis(self.restart.backoff_max),
                "reset_after_ms": millis(self.restart.reset_after),
                "intensity": self.restart.intensity,
                "period_ms": millis(self.restart.period),
            },
            "line_max": self.line_max,
            "line": self.line,
        })
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;

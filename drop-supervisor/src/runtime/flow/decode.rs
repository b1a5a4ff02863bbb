//! From the positioned YAML tree to [`Flow`]: key checks, types, defaults and ranges, each error
//! carrying the key path and the position of the offending key or value.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::yaml::{self, Node, Pos, Typed, Value};
use super::{
    CacheSpec, Delivery, Filter, Flow, FlowError, FlowErrorKind, Mode, PoolSpec, RestartSpec,
    Subscription,
};

pub(super) const MIB: u64 = 1024 * 1024;

const FLOW_KEYS: &[&str] = &["name", "priority", "replicas", "func"];
const POOL_KEYS: &[&str] = &[
    "name",
    "mode",
    "image",
    "cmd",
    "shell",
    "num",
    "min",
    "max",
    "concurrency",
    "queue",
    "timeout",
    "memory",
    "cpu",
    "pids",
    "env",
    "user",
    "group",
    "cwd",
    "sub",
    "cache",
    "restart",
    "line_max",
    "envelope",
];
const SUB_KEYS: &[&str] = &["name", "filter", "regex", "type"];
const CACHE_KEYS: &[&str] = &["ttl_ms", "size"];
const RESTART_KEYS: &[&str] = &[
    "backoff_initial_ms",
    "backoff_max_ms",
    "reset_after_ms",
    "intensity",
    "period_ms",
];

// Defaults of the original DROP format, and of the new keys (DESIGN §3).
const DEFAULT_TIMEOUT_MS: u64 = 10_000;
const DEFAULT_MEMORY_MB: u64 = 100;
const DEFAULT_ASYNC_CONCURRENCY: u32 = 16;
const DEFAULT_QUEUE: u32 = 64;
const DEFAULT_LINE_MAX: usize = 65_536;

// Upper bounds: not policy, just "certainly a typo" and "no arithmetic overflow downstream"
// (a deadline of `now + timeout` must not overflow `Instant`).
/// Longest duration any `*_ms` key takes: seven days.
const MAX_MS: u64 = 7 * 24 * 3600 * 1000;
/// Workers of one pool on one node.
const MAX_WORKERS: u64 = 10_000;
const MAX_CONCURRENCY: u64 = 65_536;
const MAX_QUEUE: u64 = 1_000_000;
/// 16 TiB, in MiB.
const MAX_MEMORY_MB: u64 = 16 * 1024 * 1024;
const MAX_CPU: f64 = 4096.0;
/// The kernel's own ceiling for `pid_max`.
const MAX_PIDS: u64 = 4_194_304;
/// Below this not even an async request id and a short payload fit.
const MIN_LINE_MAX: u64 = 16;
const MAX_LINE_MAX: u64 = 64 * MIB;
const MAX_CACHE_ENTRIES: u64 = 10_000_000;
/// Compiled size a subscription regex may take; filters are small.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

type Result<T> = std::result::Result<T, FlowError>;

struct Cx<'a> {
    file: &'a Path,
}

impl Cx<'_> {
    fn err(&self, at: Pos, key: &str, kind: FlowErrorKind) -> FlowError {
        FlowError {
            file: self.file.to_path_buf(),
            line: at.line,
            column: at.column,
            key: key.to_owned(),
            kind,
            more: Vec::new(),
        }
    }

    fn invalid(&self, node: &Node, key: &str, message: String) -> FlowError {
        self.err(node.at, key, FlowErrorKind::Invalid(message))
    }

    fn conflict(&self, node: &Node, key: &str, message: String) -> FlowError {
        self.err(node.at, key, FlowErrorKind::Conflict(message))
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// The checked entries of one mapping: keys are known (when `allowed` is given) and unique.
struct Fields<'n> {
    path: String,
    at: Pos,
    entries: Vec<(&'n str, &'n Node, &'n Node)>,
}

impl<'n> Fields<'n> {
    fn read(
        cx: &Cx<'_>,
        node: &'n Node,
        path: &str,
        allowed: Option<&'static [&'static str]>,
        expected: &'static str,
    ) -> Result<Self> {
        let (fields, errors) = Self::read_all(cx, node, path, allowed, expected)?;
        match FlowError::combine(errors) {
            Some(e) => Err(e),
            None => Ok(fields),
        }
    }

    /// Like [`Fields::read`], but a key that is unknown, repeated or not a string is left out
    /// and reported beside the fields, so the caller can go on and find more problems. `Err`
    /// only when `node` is not a mapping at all.
    fn read_all(
        cx: &Cx<'_>,
        node: &'n Node,
        path: &str,
        allowed: Option<&'static [&'static str]>,
        expected: &'static str,
    ) -> Result<(Self, Vec<FlowError>)> {
        let Value::Map(map) = &node.value else {
            return Err(wrong_type(cx, node, path, expected));
        };
        let mut seen: HashMap<&str, usize> = HashMap::new();
        let mut entries = Vec::with_capacity(map.len());
        let mut errors = Vec::new();
        for (k, v) in map {
            let Value::Scalar(key) = &k.value else {
                errors.push(wrong_type(cx, k, path, "a key that is a string"));
                continue;
            };
            let name = key.text.as_str();
            let key_path = join(path, name);
            if let Some(&first_line) = seen.get(name) {
                errors.push(cx.err(k.at, &key_path, FlowErrorKind::DuplicateKey { first_line }));
                continue;
            }
            if let Some(expected) = allowed
                && !expected.contains(&name)
            {
                let suggestion = closest(name, expected);
                errors.push(cx.err(
                    k.at,
                    &key_path,
                    FlowErrorKind::UnknownKey {
                        suggestion,
                        expected,
                    },
                ));
                continue;
            }
            seen.insert(name, k.at.line);
            entries.push((name, k, v));
        }
        Ok((
            Self {
                path: path.to_owned(),
                at: node.at,
                entries,
            },
            errors,
        ))
    }

    /// The value of `key`; `None` when absent or null.
    fn get(&self, key: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(k, _, _)| *k == key)
            .map(|(_, _, v)| *v)
            .filter(|v| !is_null(v))
    }

    fn path(&self, key: &str) -> String {
        join(&self.path, key)
    }

    /// The value of a required key, or an error at this mapping.
    fn require(&self, cx: &Cx<'_>, key: &'static str) -> Result<&'n Node> {
        self.get(key)
            .ok_or_else(|| cx.err(self.at, &self.path(key), FlowErrorKind::Missing(key)))
    }

    fn opt_string(&self, cx: &Cx<'_>, key: &str) -> Result<Option<(&'n str, &'n Node)>> {
        self.get(key)
            .map(|n| string(cx, n, &self.path(key)).map(|s| (s, n)))
            .transpose()
    }

    fn opt_uint(&self, cx: &Cx<'_>, key: &str, min: u64, max: u64) -> Result<Option<u64>> {
        self.get(key)
            .map(|n| uint(cx, n, &self.path(key), min, max))
            .transpose()
    }

    fn opt_ms(&self, cx: &Cx<'_>, key: &str, default_ms: u64) -> Result<Duration> {
        let ms = self.opt_uint(cx, key, 1, MAX_MS)?.unwrap_or(default_ms);
        Ok(Duration::from_millis(ms))
    }
}

fn is_null(node: &Node) -> bool {
    matches!(&node.value, Value::Scalar(s) if s.typed() == Typed::Null)
}

fn describe(node: &Node) -> &'static str {
    match &node.value {
        Value::Scalar(s) => s.typed().describe(),
        Value::Seq(_) => "a list",
        Value::Map(_) => "a mapping",
    }
}

fn wrong_type(cx: &Cx<'_>, node: &Node, path: &str, expected: &'static str) -> FlowError {
    let found = describe(node);
    let hint = match &node.value {
        Value::Scalar(s)
            if expected == "a string"
                && matches!(
                    s.typed(),
                    Typed::Int(_) | Typed::BigInt | Typed::Float(_) | Typed::Bool(_)
                ) =>
        {
            " (quote it to use it as text)"
        }
        _ => "",
    };
    cx.err(
        node.at,
        path,
        FlowErrorKind::WrongType {
            expected,
            found,
            hint,
        },
    )
}

/// A string value; numbers, booleans and null are refused (see the module docs on typing).
fn string<'n>(cx: &Cx<'_>, node: &'n Node, path: &str) -> Result<&'n str> {
    match &node.value {
        Value::Scalar(s) => match s.typed() {
            Typed::Str(_) => Ok(s.text.as_str()),
            _ => Err(wrong_type(cx, node, path, "a string")),
        },
        _ => Err(wrong_type(cx, node, path, "a string")),
    }
}

/// Any non-null scalar, as written: for `env` values and list-form `cmd` items.
fn text<'n>(cx: &Cx<'_>, node: &'n Node, path: &str) -> Result<&'n str> {
    match &node.value {
        Value::Scalar(s) if s.typed() != Typed::Null => Ok(s.text.as_str()),
        _ => Err(wrong_type(cx, node, path, "a string")),
    }
}

fn uint(cx: &Cx<'_>, node: &Node, path: &str, min: u64, max: u64) -> Result<u64> {
    let value = match &node.value {
        Value::Scalar(s) => match s.typed() {
            Typed::Int(i) => i,
            Typed::BigInt => {
                return Err(cx.err(
                    node.at,
                    path,
                    FlowErrorKind::OutOfRange(format!("must be at most {max}")),
                ));
            }
            _ => return Err(wrong_type(cx, node, path, "an integer")),
        },
        _ => return Err(wrong_type(cx, node, path, "an integer")),
    };
    let range = |message: String| cx.err(node.at, path, FlowErrorKind::OutOfRange(message));
    if value < 0 {
        return Err(range(format!("must not be negative, got {value}")));
    }
    let value = value.unsigned_abs();
    if value < min {
        return Err(range(format!("must be at least {min}, got {value}")));
    }
    if value > max {
        return Err(range(format!("must be at most {max}, got {value}")));
    }
    Ok(value)
}

/// `u64` → `u32` for values already bounded below `u32::MAX`.
fn small(value: u64) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

fn float(cx: &Cx<'_>, node: &Node, path: &str) -> Result<f64> {
    match &node.value {
        Value::Scalar(s) => match s.typed() {
            // Exact for any integer a `cpu` key could sensibly hold.
            Typed::Int(i) => Ok(i as f64),
            Typed::Float(f) => Ok(f),
            _ => Err(wrong_type(cx, node, path, "a number")),
        },
        _ => Err(wrong_type(cx, node, path, "a number")),
    }
}

fn boolean(cx: &Cx<'_>, node: &Node, path: &str) -> Result<bool> {
    match &node.value {
        Value::Scalar(s) => match s.typed() {
            Typed::Bool(b) => Ok(b),
            _ => Err(wrong_type(cx, node, path, "`true` or `false`")),
        },
        _ => Err(wrong_type(cx, node, path, "`true` or `false`")),
    }
}

/// Parses and validates a whole flow file.
/// Decodes a whole flow file, reporting every problem it can find at once: each top-level key,
/// each pool (its unknown keys and its first wrong value), duplicate pool names. Problems that
/// depend on each other (inside one pool's settings) stop at the first.
pub(super) fn flow(text: &str, file: &Path) -> Result<Flow> {
    let cx = Cx { file };
    let root = match yaml::load(text) {
        Ok(Some(root)) => root,
        Ok(None) => {
            return Err(cx.err(Pos { line: 1, column: 1 }, "", FlowErrorKind::Empty));
        }
        Err(e) => return Err(cx.err(e.at, "", e.kind)),
    };
    let (f, mut errors) = Fields::read_all(
        &cx,
        &root,
        "",
        Some(FLOW_KEYS),
        "a mapping (a flow has `name` and `func`)",
    )?;
    let keep = |r: Result<()>, errors: &mut Vec<FlowError>| {
        if let Err(e) = r {
            errors.push(e);
        }
    };

    let mut name = "";
    keep(
        (|| {
            let name_node = f.require(&cx, "name")?;
            name = string(&cx, name_node, "name")?;
            check_name(&cx, name_node, "name", name)
        })(),
        &mut errors,
    );

    let mut priority = 0;
    let mut replicas = None;
    keep(
        (|| {
            priority = f.opt_uint(&cx, "priority", 0, 1)?.unwrap_or(0);
            replicas = f.opt_uint(&cx, "replicas", 1, u64::from(u32::MAX))?;
            if let (Some(_), 1) = (replicas, priority) {
                let node = f.get("replicas").unwrap_or(&root);
                return Err(cx.conflict(
                    node,
                    "replicas",
                    "`replicas` places the flow on that many nodes, `priority: 1` on the leader \
                     only: give one or the other"
                        .into(),
                ));
            }
            Ok(())
        })(),
        &mut errors,
    );

    let mut pools = Vec::new();
    let items: &[Node] = match f.get("func") {
        None => {
            errors.push(cx.err(root.at, "func", FlowErrorKind::NoPools));
            &[]
        }
        Some(func) => match &func.value {
            Value::Seq(items) if items.is_empty() => {
                errors.push(cx.err(func.at, "func", FlowErrorKind::NoPools));
                &[]
            }
            Value::Seq(items) => items,
            _ => {
                errors.push(wrong_type(&cx, func, "func", "a list of pools"));
                &[]
            }
        },
    };
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, item) in items.iter().enumerate() {
        let path = format!("func[{i}]");
        let (pool, name_at) = match pool(&cx, item, &path) {
            Ok(p) => p,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        if let Some(&first_line) = seen.get(&pool.name) {
            errors.push(cx.err(
                name_at,
                &join(&path, "name"),
                FlowErrorKind::DuplicatePool {
                    name: pool.name,
                    first_line,
                },
            ));
            continue;
        }
        seen.insert(pool.name.clone(), name_at.line);
        pools.push(pool);
    }
    // In the order of the file, as an editor shows them.
    let mut flat: Vec<FlowError> = FlowError::combine(errors)
        .map(|e| {
            let mut all = vec![FlowError {
                more: Vec::new(),
                ..e.clone()
            }];
            all.extend(e.more);
            all
        })
        .unwrap_or_default();
    flat.sort_by_key(|e| (e.line, e.column));
    if let Some(e) = FlowError::combine(flat) {
        return Err(e);
    }

    Ok(Flow {
        name: name.to_owned(),
        priority: u8::try_from(priority).unwrap_or(1),
        replicas: replicas.map(small),
        pools,
        source: Some(file.to_path_buf()),
    })
}

/// One entry of `func`; also returns where its name is written (for duplicate names).
fn pool(cx: &Cx<'_>, node: &Node, path: &str) -> Result<(PoolSpec, Pos)> {
    let (f, key_errors) = Fields::read_all(
        cx,
        node,
        path,
        Some(POOL_KEYS),
        "a mapping of pool settings",
    )?;
    // Unknown keys first, then the first wrong value among the known ones.
    let decoded = pool_settings(cx, &f, node);
    let mut errors = key_errors;
    match decoded {
        Ok(p) if errors.is_empty() => Ok(p),
        Ok(_) => Err(FlowError::combine(errors).expect("not empty")),
        Err(e) => {
            errors.push(e);
            Err(FlowError::combine(errors).expect("not empty"))
        }
    }
}

/// The known settings of one pool.
fn pool_settings(cx: &Cx<'_>, f: &Fields<'_>, node: &Node) -> Result<(PoolSpec, Pos)> {
    let name_node = f.require(cx, "name")?;
    let name = string(cx, name_node, &f.path("name"))?;
    check_name(cx, name_node, &f.path("name"), name)?;

    let suffix = Mode::from_name_suffix(name);
    let mode = match f.opt_string(cx, "mode")? {
        None => suffix.unwrap_or(Mode::Sync),
        Some((text, node)) => {
            let mode = match text {
                "sync" => Mode::Sync,
                "async" => Mode::Async,
                "stream" => Mode::Stream,
                other => {
                    return Err(cx.invalid(
                        node,
                        &f.path("mode"),
                        format!("unknown mode `{other}` (expected one of: sync, async, stream)"),
                    ));
                }
            };
            match suffix {
                Some(suffix) if suffix != mode => {
                    return Err(cx.err(
                        node.at,
                        &f.path("mode"),
                        FlowErrorKind::ModeMismatch { mode, suffix },
                    ));
                }
                _ => mode,
            }
        }
    };

    let shell = match f.get("shell") {
        Some(n) => boolean(cx, n, &f.path("shell"))?,
        None => false,
    };
    let argv = command(cx, f, shell)?;

    let image = match f.opt_string(cx, "image")? {
        Some((image, value)) => {
            check_image_name(cx, value, &f.path("image"), image)?;
            Some(image.to_owned())
        }
        None => None,
    };

    let (min, max) = workers(cx, f)?;

    let stream_refuses = |key: &str, what: &str| -> Result<()> {
        match f.get(key) {
            Some(n) if mode == Mode::Stream => Err(cx.conflict(
                n,
                &f.path(key),
                format!("a stream pool takes no input, so it {what}"),
            )),
            _ => Ok(()),
        }
    };

    let concurrency = f.opt_uint(cx, "concurrency", 1, MAX_CONCURRENCY)?;
    let concurrency = match (mode, concurrency) {
        (Mode::Async, c) => c.map_or(DEFAULT_ASYNC_CONCURRENCY, small),
        (_, None | Some(1)) => 1,
        (_, Some(_)) => {
            let n = f.get("concurrency").unwrap_or(node);
            return Err(cx.conflict(
                n,
                &f.path("concurrency"),
                format!(
                    "only async pools take more than one request per worker; this pool is {mode}"
                ),
            ));
        }
    };

    stream_refuses("queue", "has no request queue")?;
    let queue = f
        .opt_uint(cx, "queue", 0, MAX_QUEUE)?
        .map_or(DEFAULT_QUEUE, small);

    let timeout = f.opt_ms(cx, "timeout", DEFAULT_TIMEOUT_MS)?;
    let memory_mb = f
        .opt_uint(cx, "memory", 1, MAX_MEMORY_MB)?
        .unwrap_or(DEFAULT_MEMORY_MB);

    let cpu = match f.get("cpu") {
        Some(n) => {
            let cpu = float(cx, n, &f.path("cpu"))?;
            // Written so that NaN fails too.
            if !(cpu > 0.0 && cpu <= MAX_CPU) {
                return Err(cx.err(
                    n.at,
                    &f.path("cpu"),
                    FlowErrorKind::OutOfRange(format!(
                        "cores must be more than 0 and at most {MAX_CPU}, got {cpu}"
                    )),
                ));
            }
            Some(cpu)
        }
        None => None,
    };
    let pids = f.opt_uint(cx, "pids", 1, MAX_PIDS)?;

    let env = match f.get("env") {
        Some(n) => env(cx, n, &f.path("env"))?,
        None => BTreeMap::new(),
    };
    let user = account(cx, f, "user")?;
    let group = account(cx, f, "group")?;
    let cwd = match f.opt_string(cx, "cwd")? {
        Some((cwd, n)) => {
            if !cwd.starts_with('/') || cwd.contains('\0') {
                return Err(cx.invalid(
                    n,
                    &f.path("cwd"),
                    format!("`{cwd}` is not an absolute path"),
                ));
            }
            Some(PathBuf::from(cwd))
        }
        None => None,
    };

    stream_refuses("sub", "cannot subscribe to other pools")?;
    let subs = match f.get("sub") {
        Some(n) => subscriptions(cx, n, &f.path("sub"))?,
        None => Vec::new(),
    };

    stream_refuses("cache", "has no replies to cache")?;
    let cache = match f.get("cache") {
        Some(n) => Some(cache(cx, n, &f.path("cache"))?),
        None => None,
    };
    stream_refuses("envelope", "takes no requests to wrap")?;
    let envelope = match f.get("envelope") {
        Some(n) => boolean(cx, n, &f.path("envelope"))?,
        None => false,
    };
    let restart = match f.get("restart") {
        Some(n) => restart(cx, n, &f.path("restart"))?,
        None => RestartSpec::default(),
    };
    let line_max = f
        .opt_uint(cx, "line_max", MIN_LINE_MAX, MAX_LINE_MAX)?
        .map_or(DEFAULT_LINE_MAX, |v| {
            usize::try_from(v).unwrap_or(usize::MAX)
        });

    let spec = PoolSpec {
        name: name.to_owned(),
        mode,
        argv,
        shell,
        min,
        max,
        concurrency,
        queue,
        timeout,
        memory_bytes: memory_mb * MIB,
        cpu,
        pids,
        env,
        user,
        group,
        cwd,
        image,
        subs,
        cache,
        restart,
        line_max,
        envelope,
        line: node.at.line,
    };
    Ok((spec, name_node.at))
}

/// `cmd` as argv: a string split like a shell would (quotes, backslashes) but never run by
/// one; a list taken as is; with `shell: true`, one string for `/bin/sh -c`.
fn command(cx: &Cx<'_>, f: &Fields<'_>, shell: bool) -> Result<Vec<String>> {
    let node = f.require(cx, "cmd")?;
    let path = f.path("cmd");
    let argv: Vec<String> = match (&node.value, shell) {
        (Value::Seq(items), false) => items
            .iter()
            .enumerate()
            .map(|(i, item)| text(cx, item, &format!("{path}[{i}]")).map(str::to_owned))
            .collect::<Result<_>>()?,
        (Value::Seq(_), true) => {
            return Err(cx.conflict(
                node,
                &path,
                "with `shell: true`, `cmd` is one string for `/bin/sh -c`, not a list".into(),
            ));
        }
        (_, true) => {
            let script = string(cx, node, &path)?;
            if script.trim().is_empty() {
                return Err(cx.invalid(node, &path, "`cmd` is empty".into()));
            }
            vec!["/bin/sh".into(), "-c".into(), script.to_owned()]
        }
        (_, false) => {
            let line = string(cx, node, &path)?;
            shell_words::split(line).map_err(|e| {
                cx.invalid(
                    node,
                    &path,
                    format!("cannot split `cmd` into arguments: {e}"),
                )
            })?
        }
    };
    if argv.first().is_none_or(String::is_empty) {
        return Err(cx.invalid(node, &path, "`cmd` names no program".into()));
    }
    if argv.iter().any(|a| a.contains('\0')) {
        return Err(cx.invalid(node, &path, "`cmd` contains a NUL byte".into()));
    }
    Ok(argv)
}

/// `num` (DROP: min = max = num) or `min`/`max`.
fn workers(cx: &Cx<'_>, f: &Fields<'_>) -> Result<(u32, u32)> {
    let read = |key: &str, min: u64| -> Result<Option<(u64, &Node)>> {
        f.get(key)
            .map(|n| uint(cx, n, &f.path(key), min, MAX_WORKERS).map(|v| (v, n)))
            .transpose()
    };
    let num = read("num", 1)?;
    let min = read("min", 0)?;
    let max = read("max", 1)?;
    if num.is_some()
        && let Some((key, (_, node))) = [("min", min), ("max", max)]
            .into_iter()
            .find_map(|(k, v)| v.map(|v| (k, v)))
    {
        return Err(cx.conflict(
            node,
            &f.path(key),
            "`num` sets both `min` and `max`: give either `num` or `min`/`max`".into(),
        ));
    }
    let (min, max) = match (num, min, max) {
        (Some((n, _)), _, _) => (n, n),
        (None, None, None) => (1, 1),
        // Only a floor: the pool is fixed at that size (at least one worker).
        (None, Some((lo, _)), None) => (lo, lo.max(1)),
        (None, None, Some((hi, _))) => (1, hi),
        (None, Some((lo, node)), Some((hi, _))) => {
            if lo > hi {
                return Err(cx.conflict(
                    node,
                    &f.path("min"),
                    format!("`min` ({lo}) is greater than `max` ({hi})"),
                ));
            }
            (lo, hi)
        }
    };
    Ok((small(min), small(max)))
}

fn env(cx: &Cx<'_>, node: &Node, path: &str) -> Result<BTreeMap<String, String>> {
    let f = Fields::read(
        cx,
        node,
        path,
        None,
        "a mapping of variable names to values",
    )?;
    let mut env = BTreeMap::new();
    for (key, key_node, value) in &f.entries {
        let key_path = f.path(key);
        let valid = key.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(cx.invalid(
                key_node,
                &key_path,
                format!(
                    "`{key}` is not a valid environment variable name \
                     (letters, digits and `_`, not starting with a digit)"
                ),
            ));
        }
        let value = text(cx, value, &key_path)?;
        if value.contains('\0') {
            return Err(cx.invalid(key_node, &key_path, "the value contains a NUL byte".into()));
        }
        env.insert((*key).to_owned(), value.to_owned());
    }
    Ok(env)
}

/// `user` / `group`: a POSIX-style account name (`useradd`'s rules, loosely).
fn account(cx: &Cx<'_>, f: &Fields<'_>, key: &str) -> Result<Option<String>> {
    let Some((name, node)) = f.opt_string(cx, key)? else {
        return Ok(None);
    };
    let body = name.strip_suffix('$').unwrap_or(name);
    let valid = !body.is_empty()
        && name.len() <= 32
        && body.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && body
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !valid {
        return Err(cx.invalid(
            node,
            &f.path(key),
            format!("`{name}` is not a valid {key} name"),
        ));
    }
    Ok(Some(name.to_owned()))
}

fn subscriptions(cx: &Cx<'_>, node: &Node, path: &str) -> Result<Vec<Subscription>> {
    let Value::Seq(items) = &node.value else {
        return Err(wrong_type(cx, node, path, "a list of subscriptions"));
    };
    let mut subs = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let f = Fields::read(
            cx,
            item,
            &format!("{path}[{i}]"),
            Some(SUB_KEYS),
            "a mapping with `name`, `filter` and `type`",
        )?;
        let from_node = f.require(cx, "name")?;
        let from = string(cx, from_node, &f.path("name"))?;
        check_name(cx, from_node, &f.path("name"), from)?;

        let filter = f.opt_string(cx, "filter")?;
        let regex = f.opt_string(cx, "regex")?;
        let filter = match (filter, regex) {
            (Some(_), Some((_, value))) => {
                return Err(cx.conflict(
                    value,
                    &f.path("regex"),
                    "give either `filter` (a substring) or `regex`, not both".into(),
                ));
            }
            // DROP's way of saying "every line".
            (Some(("no" | "", _)), None) | (None, None) => Filter::None,
            (Some((text, _)), None) => Filter::Substring(text.to_owned()),
            (None, Some((pattern, value))) => {
                Filter::Regex(compile(cx, value, &f.path("regex"), pattern)?)
            }
        };

        let delivery = match f.opt_string(cx, "type")? {
            None => Delivery::One,
            Some((kind, value)) => match kind {
                "one" | "sone" => Delivery::One,
                "all" => Delivery::All,
                "any" | "done" => Delivery::Any,
                "every" | "dall" => Delivery::Every,
                other => {
                    return Err(cx.invalid(
                        value,
                        &f.path("type"),
                        format!(
                            "unknown subscription type `{other}` (expected one of: one, all, \
                             any, every, or DROP's sone, done, dall)"
                        ),
                    ));
                }
            },
        };
        subs.push(Subscription {
            from: from.to_owned(),
            filter,
            delivery,
        });
    }
    Ok(subs)
}

fn compile(cx: &Cx<'_>, node: &Node, path: &str, pattern: &str) -> Result<regex::Regex> {
    regex::RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| {
            // The syntax message spans several lines (pattern, caret, "error: ..."); the
            // position is already ours, keep the last line.
            let message = e.to_string();
            let message = message
                .lines()
                .rev()
                .find_map(|l| l.strip_prefix("error: "))
                .unwrap_or(message.as_str())
                .to_owned();
            cx.err(node.at, path, FlowErrorKind::BadRegex(message))
        })
}

fn cache(cx: &Cx<'_>, node: &Node, path: &str) -> Result<CacheSpec> {
    let f = Fields::read(
        cx,
        node,
        path,
        Some(CACHE_KEYS),
        "a mapping with `ttl_ms` and `size`",
    )?;
    let ttl = f.require(cx, "ttl_ms")?;
    let ttl = uint(cx, ttl, &f.path("ttl_ms"), 1, MAX_MS)?;
    let size = f.require(cx, "size")?;
    let size = uint(cx, size, &f.path("size"), 1, MAX_CACHE_ENTRIES)?;
    Ok(CacheSpec {
        ttl: Duration::from_millis(ttl),
        size: usize::try_from(size).unwrap_or(usize::MAX),
    })
}

fn restart(cx: &Cx<'_>, node: &Node, path: &str) -> Result<RestartSpec> {
    let f = Fields::read(
        cx,
        node,
        path,
        Some(RESTART_KEYS),
        "a mapping of restart settings",
    )?;
    let default = RestartSpec::default();
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let spec = RestartSpec {
        backoff_initial: f.opt_ms(cx, "backoff_initial_ms", ms(default.backoff_initial))?,
        backoff_max: f.opt_ms(cx, "backoff_max_ms", ms(default.backoff_max))?,
        reset_after: f.opt_ms(cx, "reset_after_ms", ms(default.reset_after))?,
        intensity: f
            .opt_uint(cx, "intensity", 0, MAX_QUEUE)?
            .map_or(default.intensity, small),
        period: f.opt_ms(cx, "period_ms", ms(default.period))?,
    };
    if spec.backoff_initial > spec.backoff_max {
        // Point at whichever of the two the file gives, preferring the cap.
        let (key, n) = ["backoff_max_ms", "backoff_initial_ms"]
            .into_iter()
            .find_map(|k| f.get(k).map(|n| (k, n)))
            .unwrap_or(("backoff_max_ms", node));
        return Err(cx.conflict(
            n,
            &f.path(key),
            format!(
                "`backoff_initial_ms` ({}) is greater than `backoff_max_ms` ({})",
                ms(spec.backoff_initial),
                ms(spec.backoff_max)
            ),
        ));
    }
    Ok(spec)
}

/// Flow, pool and subscription names: they appear in URLs, cgroup and file names.
fn check_name(cx: &Cx<'_>, node: &Node, path: &str, name: &str) -> Result<()> {
    let valid = (1..=128).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if valid {
        return Ok(());
    }
    Err(cx.invalid(
        node,
        path,
        format!(
            "`{name}` is not a valid name: use letters, digits, `_`, `-` and `.`, starting with \
             a letter or digit, at most 128 characters"
        ),
    ))
}

/// An image names a folder under the images directory: no `/`, no `..`.
fn check_image_name(cx: &Cx<'_>, node: &Node, path: &str, image: &str) -> Result<()> {
    let valid = (1..=255).contains(&image.len())
        && image
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'))
        && image != "."
        && !image.contains("..");
    if valid {
        return Ok(());
    }
    Err(cx.invalid(
        node,
        path,
        format!(
            "`{image}` is not a valid image name: use letters, digits, `.`, `_`, `:` and `-` \
             (no `/`, no `..`)"
        ),
    ))
}

/// A known key within edit distance 2 of `key`, for "did you mean".
fn closest(key: &str, known: &[&'static str]) -> Option<&'static str> {
    known
        .iter()
        .map(|k| (levenshtein(key, k), *k))
        .filter(|(d, k)| *d <= 2 && *d < k.len())
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = if ca == *cb {
                diagonal
            } else {
                1 + diagonal.min(above).min(row[j])
            };
            diagonal = above;
        }
    }
    row[b.len()]
}

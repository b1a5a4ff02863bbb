//! The cluster's replicated desired state: namespaces, flows, services, VIP and balancer config
//! as one map of string keys to JSON values, each versioned by a hybrid logical clock (HLC) and
//! merged last-writer-wins per key.
//!
//! This module owns the data type and its merge rules (a join: commutative, associative,
//! idempotent, so replicas that saw the same updates in any order hold the same state), the
//! digest/delta pair used by push/pull anti-entropy, and the on-disk file a node rejoins with.
//! It never talks to the network and reads no clock: physical time is a parameter (see
//! [`physical_now_ms`] for the one place that reads it). The only I/O is [`StateMap::save`] and
//! [`StateMap::load`].
//!
//! Keys carry their kind as a prefix before the first `/`: `ns/web`, `flow/pyex`, `svc/web/api`,
//! `vip/web`, `lb/web`. The map does not interpret them beyond [`StateMap::iter_prefix`].

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::host::state::{StateError, ensure_dir, write_atomic};

/// Version of the file written by [`StateMap::save`].
pub const FORMAT: u64 = 1;

/// The identity of a cluster node (its persisted UUID); breaks ties between equal clock readings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub Uuid);

impl NodeId {
    pub const fn from_u128(v: u128) -> Self {
        NodeId(Uuid::from_u128(v))
    }
}

impl From<Uuid> for NodeId {
    fn from(id: Uuid) -> Self {
        NodeId(id)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A hybrid logical clock timestamp. The derived order is total: wall time, then the logical
/// counter, then the issuing node (field order matters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Hlc {
    /// Milliseconds since the Unix epoch, never behind the issuing node's physical clock.
    pub wall_ms: u64,
    /// Orders events within one `wall_ms`.
    pub logical: u32,
    pub node: NodeId,
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}@{}", self.wall_ms, self.logical, self.node)
    }
}

/// The smallest `(wall, logical)` after `(wall, logical)`: a counter at `u32::MAX` carries into
/// the wall time rather than wrapping, so the clock stays monotonic.
fn tick(wall_ms: u64, logical: u32) -> (u64, u32) {
    match logical.checked_add(1) {
        Some(logical) => (wall_ms, logical),
        None => (wall_ms.saturating_add(1), 0),
    }
}

/// Issues the HLC timestamps of one node (Kulkarni et al., "Logical Physical Clocks", 2014).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clock {
    last: Hlc,
}

impl Clock {
    pub fn new(node: NodeId) -> Self {
        Clock {
            last: Hlc {
                wall_ms: 0,
                logical: 0,
                node,
            },
        }
    }

    pub fn node(&self) -> NodeId {
        self.last.node
    }

    /// The last timestamp issued or observed; the next [`Clock::now`] is greater.
    pub fn last(&self) -> Hlc {
        self.last
    }

    /// A timestamp for a local event, greater than every timestamp this clock issued or observed,
    /// even when `physical_ms` went backwards.
    pub fn now(&mut self, physical_ms: u64) -> Hlc {
        let (wall_ms, logical) = if physical_ms > self.last.wall_ms {
            (physical_ms, 0)
        } else {
            tick(self.last.wall_ms, self.last.logical)
        };
        self.last = Hlc {
            wall_ms,
            logical,
            node: self.last.node,
        };
        self.last
    }

    /// Takes in a timestamp received from another node, so that every later [`Clock::now`] is
    /// greater than `remote`.
    ///
    /// There is no bound on how far ahead `remote` may be: a peer with a wildly wrong clock drags
    /// this one along. Reject such peers before calling this if that matters.
    pub fn observe(&mut self, remote: Hlc, physical_ms: u64) {
        let last = self.last;
        let wall_ms = last.wall_ms.max(remote.wall_ms).max(physical_ms);
        let base = match (wall_ms == last.wall_ms, wall_ms == remote.wall_ms) {
            (true, true) => Some(last.logical.max(remote.logical)),
            (true, false) => Some(last.logical),
            (false, true) => Some(remote.logical),
            (false, false) => None,
        };
        let (wall_ms, logical) = match base {
            Some(logical) => tick(wall_ms, logical),
            None => (wall_ms, 0),
        };
        self.last = Hlc {
            wall_ms,
            logical,
            node: last.node,
        };
    }
}

/// The system clock in milliseconds since the Unix epoch (0 if it is set before 1970).
pub fn physical_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// One versioned key: a value, or a tombstone (`value: None`) that remembers a delete so an older
/// set arriving late cannot resurrect the key.
///
/// Serialized as `{"version": ..., "value": ...}`; a tombstone has no `value` field, so a JSON
/// `null` value stays distinct from a delete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub version: Hlc,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present_value"
    )]
    pub value: Option<Value>,
}

/// A present `value` field is always `Some`, even when it holds `null`.
fn present_value<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

impl Entry {
    pub fn is_tombstone(&self) -> bool {
        self.value.is_none()
    }

    /// The total order merge keeps the maximum of: the version first. Equal versions with
    /// different contents only come from a bug (a node issuing one timestamp twice), but replicas
    /// must still agree, so the tombstone wins, then the greater value in [`cmp_value`] order.
    fn merge_cmp(&self, other: &Entry) -> Ordering {
        self.version
            .cmp(&other.version)
            .then_with(|| match (&self.value, &other.value) {
                (None, None) => Ordering::Equal,
                (None, Some(_)) => Ordering::Greater,
                (Some(_), None) => Ordering::Less,
                (Some(a), Some(b)) => cmp_value(a, b),
            })
    }
}

/// A total order on JSON values that does not depend on map iteration order or serialization.
fn cmp_value(a: &Value, b: &Value) -> Ordering {
    fn rank(v: &Value) -> u8 {
        match v {
            Value::Null => 0,
            Value::Bool(_) => 1,
            Value::Number(_) => 2,
            Value::String(_) => 3,
            Value::Array(_) => 4,
            Value::Object(_) => 5,
        }
    }
    match (a, b) {
        (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
        // Display of a `Number` is exact and deterministic; only tie-breaking needs this order.
        (Value::Number(x), Value::Number(y)) => x.to_string().cmp(&y.to_string()),
        (Value::String(x), Value::String(y)) => x.cmp(y),
        (Value::Array(x), Value::Array(y)) => x
            .iter()
            .zip(y)
            .map(|(x, y)| cmp_value(x, y))
            .find(|o| o.is_ne())
            .unwrap_or_else(|| x.len().cmp(&y.len())),
        (Value::Object(x), Value::Object(y)) => {
            let mut xs: Vec<_> = x.iter().collect();
            let mut ys: Vec<_> = y.iter().collect();
            xs.sort_by(|p, q| p.0.cmp(q.0));
            ys.sort_by(|p, q| p.0.cmp(q.0));
            xs.iter()
                .zip(&ys)
                .map(|((xk, xv), (yk, yv))| xk.cmp(yk).then_with(|| cmp_value(xv, yv)))
                .find(|o| o.is_ne())
                .unwrap_or_else(|| xs.len().cmp(&ys.len()))
        }
        _ => rank(a).cmp(&rank(b)),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateMapError {
    #[error("cannot read cluster state {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Never replaced by an empty map silently: saving over it would lose the only local copy.
    #[error(
        "cluster state {path} is corrupt; move it aside to rejoin with the state held by the peers"
    )]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cluster state {path} has format {found}, this build reads format {FORMAT}")]
    UnsupportedFormat { path: PathBuf, found: u64 },
    #[error("cannot save cluster state to {path}")]
    Save {
        path: PathBuf,
        #[source]
        source: StateError,
    },
}

#[derive(Serialize)]
struct FileOut<'a> {
    format: u64,
    entries: &'a BTreeMap<String, Entry>,
}

#[derive(Deserialize)]
struct FileHeader {
    format: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileIn {
    #[allow(dead_code)] // checked through `FileHeader` first
    format: u64,
    entries: BTreeMap<String, Entry>,
}

/// The replicated desired state: a last-writer-wins map with tombstones.
///
/// Every change goes through [`StateMap::merge_entry`], which keeps the greater entry, so a local
/// write and a replicated one are the same operation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateMap {
    entries: BTreeMap<String, Entry>,
}

impl StateMap {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `key` to `value` at `version`; returns whether the map changed (false when a newer
    /// write, or a newer delete, is already known).
    pub fn set(&mut self, key: impl Into<String>, value: Value, version: Hlc) -> bool {
        self.merge_entry(
            key,
            Entry {
                version,
                value: Some(value),
            },
        )
    }

    /// Deletes `key` at `version` by writing a tombstone; returns whether the map changed.
    pub fn delete(&mut self, key: impl Into<String>, version: Hlc) -> bool {
        self.merge_entry(
            key,
            Entry {
                version,
                value: None,
            },
        )
    }

    /// The live value of `key`; `None` if it was never set or is deleted.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.entries.get(key)?.value.as_ref()
    }

    /// The entry of `key`, tombstones included.
    pub fn entry(&self, key: &str) -> Option<&Entry> {
        self.entries.get(key)
    }

    /// Keeps the greater of the held entry and `entry` (see [`Entry`] for the order); returns
    /// whether the map changed.
    pub fn merge_entry(&mut self, key: impl Into<String>, entry: Entry) -> bool {
        use std::collections::btree_map::Entry as Slot;
        match self.entries.entry(key.into()) {
            Slot::Vacant(slot) => {
                slot.insert(entry);
                true
            }
            Slot::Occupied(mut slot) => {
                let held = slot.get();
                match entry.merge_cmp(held) {
                    Ordering::Greater => {
                        if entry.version == held.version {
                            tracing::warn!(
                                key = slot.key().as_str(),
                                version = %entry.version,
                                "two different writes share one version; keeping the greater"
                            );
                        }
                        slot.insert(entry);
                        true
                    }
                    Ordering::Equal | Ordering::Less => false,
                }
            }
        }
    }

    /// Merges every entry of `other` into `self` (the join of the two maps); returns how many
    /// keys changed.
    pub fn merge(&mut self, other: &StateMap) -> usize {
        self.apply(other.entries.iter().map(|(k, e)| (k.clone(), e.clone())))
    }

    /// Merges received entries (a broadcast or a [`StateMap::delta_since`]); returns how many
    /// keys changed.
    pub fn apply(&mut self, entries: impl IntoIterator<Item = (String, Entry)>) -> usize {
        entries
            .into_iter()
            .map(|(key, entry)| self.merge_entry(key, entry))
            .filter(|changed| *changed)
            .count()
    }

    /// Every key with its version, tombstones included: what a peer needs to compute the
    /// [`StateMap::delta_since`] this side lacks.
    pub fn digest(&self) -> Vec<(String, Hlc)> {
        self.entries
            .iter()
            .map(|(k, e)| (k.clone(), e.version))
            .collect()
    }

    /// The entries the side that sent `digest` lacks or holds at an older version. One exchange
    /// each way makes two replicas equal, provided equal versions mean equal contents (true of
    /// timestamps from [`Clock`]; the digest carries no value to detect otherwise).
    pub fn delta_since(&self, digest: &[(String, Hlc)]) -> Vec<(String, Entry)> {
        let theirs: BTreeMap<&str, Hlc> = digest.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        self.entries
            .iter()
            .filter(|(k, e)| theirs.get(k.as_str()).is_none_or(|v| *v < e.version))
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect()
    }

    /// Live entries whose key starts with `prefix` (e.g. `"flow/"`), in key order.
    pub fn iter_prefix<'a>(
        &'a self,
        prefix: &'a str,
    ) -> impl Iterator<Item = (&'a str, &'a Value)> {
        self.entries
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(move |(k, _)| k.starts_with(prefix))
            .filter_map(|(k, e)| Some((k.as_str(), e.value.as_ref()?)))
    }

    /// Every entry, tombstones included, in key order.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.entries.iter().map(|(k, e)| (k.as_str(), e))
    }

    /// The greatest version held. A restarted node passes it to [`Clock::observe`] so its new
    /// writes are newer than everything it persisted, even if its physical clock went back.
    pub fn max_version(&self) -> Option<Hlc> {
        self.entries.values().map(|e| e.version).max()
    }

    /// Drops tombstones with a version below `older_than`; returns how many.
    ///
    /// Only safe once every member has seen those tombstones: a replica that has not, and still
    /// holds the older value, would otherwise spread it back. The caller (which knows the
    /// membership and what each member acknowledged) decides the bound.
    pub fn gc_tombstones(&mut self, older_than: Hlc) -> usize {
        let before = self.entries.len();
        self.entries
            .retain(|_, e| !(e.is_tombstone() && e.version < older_than));
        before - self.entries.len()
    }

    /// Writes the map (tombstones included) to `path` atomically, creating its directory.
    pub fn save(&self, path: &Path) -> Result<(), StateMapError> {
        let serr = |source| StateMapError::Save {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            ensure_dir(dir).map_err(serr)?;
        }
        let file = FileOut {
            format: FORMAT,
            entries: &self.entries,
        };
        // Cannot fail: every map key is a string and `Value` always serializes.
        let mut bytes = serde_json::to_vec_pretty(&file).expect("state map serializes to JSON");
        bytes.push(b'\n');
        write_atomic(path, &bytes).map_err(serr)
    }

    /// Reads a map written by [`StateMap::save`]. A missing file is an empty map (first start);
    /// an unreadable, corrupt or newer-format file is an error, never an empty map.
    pub fn load(path: &Path) -> Result<StateMap, StateMapError> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(StateMap::new()),
            Err(source) => {
                return Err(StateMapError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        let corrupt = |source| StateMapError::Corrupt {
            path: path.to_path_buf(),
            source,
        };
        let header: FileHeader = serde_json::from_slice(&bytes).map_err(corrupt)?;
        if header.format != FORMAT {
            return Err(StateMapError::UnsupportedFormat {
                path: path.to_path_buf(),
                found: header.format,
            });
        }
        let file: FileIn = serde_json::from_slice(&bytes).map_err(corrupt)?;
        Ok(StateMap {
            entries: file.entries,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const A: NodeId = NodeId::from_u128(1);
    const B: NodeId = NodeId::from_u128(2);

    fn hlc(wall_ms: u64, logical: u32, node: NodeId) -> Hlc {
        Hlc {
            wall_ms,
            logical,
            node,
        }
    }

    // --- clock ---

    #[test]
    fn clock_follows_physical_time_when_it_moves_forward() {
        let mut c = Clock::new(A);
        assert_eq!(c.now(100), hlc(100, 0, A));
        assert_eq!(c.now(100), hlc(100, 1, A));
        assert_eq!(c.now(250), hlc(250, 0, A));
    }

    #[test]
    fn clock_is_monotonic_when_physical_time_goes_backwards() {
        let mut c = Clock::new(A);
        let mut prev = c.now(1_000);
        for physical in [999, 500, 0, 1_000, 1_001, 3, 1_001] {
            let next = c.now(physical);
            assert!(next > prev, "{next} after {prev} (physical {physical})");
            assert!(next.wall_ms >= physical);
            prev = next;
        }
        assert_eq!(c.now(10), hlc(1_001, 3, A));
    }

    #[test]
    fn logical_overflow_carries_into_wall_time() {
        let mut c = Clock::new(A);
        c.observe(hlc(7, u32::MAX - 1, B), 0);
        assert_eq!(c.last(), hlc(7, u32::MAX, A));
        assert_eq!(c.now(0), hlc(8, 0, A));
    }

    #[test]
    fn observe_moves_clock_past_remote() {
        let mut c = Clock::new(A);
        c.now(100);
        let remote = hlc(5_000, 3, B);
        c.observe(remote, 100);
        let next = c.now(100);
        assert!(next > remote);
        assert_eq!(next, hlc(5_000, 5, A));
        // physical time catching up resets the counter
        assert_eq!(c.now(6_000), hlc(6_000, 0, A));
    }

    #[test]
    fn observe_of_a_past_timestamp_keeps_the_clock_monotonic() {
        let mut c = Clock::new(A);
        let before = c.now(1_000);
        c.observe(hlc(10, 0, B), 900);
        assert!(c.now(900) > before);
        // same wall time on both sides: the larger counter wins
        let mut c = Clock::new(A);
        c.now(50);
        c.observe(hlc(50, 9, B), 50);
        assert_eq!(c.now(50), hlc(50, 11, A));
        // physical time ahead of both
        c.observe(hlc(60, 9, B), 70);
        assert_eq!(c.last(), hlc(70, 0, A));
    }

    #[test]
    fn hlc_orders_by_wall_then_logical_then_node() {
        assert!(hlc(2, 0, A) > hlc(1, 9, B));
        assert!(hlc(1, 1, A) > hlc(1, 0, B));
        assert!(hlc(1, 0, B) > hlc(1, 0, A));
        assert_eq!(hlc(1, 0, A).cmp(&hlc(1, 0, A)), Ordering::Equal);
    }

    // --- last writer wins ---

    #[test]
    fn newer_write_wins_and_older_is_ignored() {
        let mut m = StateMap::new();
        assert!(m.set("flow/pyex", json!(1), hlc(10, 0, A)));
        assert!(m.set("flow/pyex", json!(2), hlc(20, 0, A)));
        assert!(!m.set("flow/pyex", json!(3), hlc(15, 0, B)));
        assert_eq!(m.get("flow/pyex"), Some(&json!(2)));
        // re-delivery of the same write changes nothing
        assert!(!m.set("flow/pyex", json!(2), hlc(20, 0, A)));
    }

    #[test]
    fn delete_then_late_older_set_stays_deleted_and_newer_set_resurrects() {
        let mut m = StateMap::new();
        m.set("ns/web", json!({"vip": "10.0.0.1"}), hlc(10, 0, A));
        assert!(m.delete("ns/web", hlc(20, 0, B)));
        assert_eq!(m.get("ns/web"), None);
        assert!(m.entry("ns/web").unwrap().is_tombstone());
        assert!(!m.set("ns/web", json!("late"), hlc(15, 0, A)));
        assert_eq!(m.get("ns/web"), None);
        assert!(m.set("ns/web", json!("again"), hlc(21, 0, A)));
        assert_eq!(m.get("ns/web"), Some(&json!("again")));
    }

    #[test]
    fn equal_versions_break_ties_the_same_way_on_every_replica() {
        let v = hlc(5, 0, A);
        let (x, y) = (json!({"a": 1, "b": [1, 2]}), json!({"a": 1, "b": [1, 3]}));
        let mut m1 = StateMap::new();
        m1.set("k/1", x.clone(), v);
        m1.set("k/1", y.clone(), v);
        let mut m2 = StateMap::new();
        m2.set("k/1", y.clone(), v);
        m2.set("k/1", x, v);
        assert_eq!(m1, m2);
        assert_eq!(m1.get("k/1"), Some(&y));
        // at equal versions the delete wins
        m1.delete("k/1", v);
        m2.delete("k/1", v);
        m2.set("k/1", json!(0), v);
        assert_eq!(m1, m2);
        assert_eq!(m1.get("k/1"), None);
    }

    #[test]
    fn iter_prefix_lists_live_entries_of_one_kind() {
        let mut m = StateMap::new();
        m.set("flow/a", json!(1), hlc(1, 0, A));
        m.set("flow/b", json!(2), hlc(1, 1, A));
        m.set("flow/c", json!(3), hlc(1, 2, A));
        m.delete("flow/b", hlc(2, 0, A));
        m.set("flowx/d", json!(4), hlc(1, 3, A));
        m.set("ns/web", json!(5), hlc(1, 4, A));
        let flows: Vec<_> = m.iter_prefix("flow/").collect();
        assert_eq!(flows, vec![("flow/a", &json!(1)), ("flow/c", &json!(3))]);
        assert_eq!(m.iter_prefix("vip/").count(), 0);
        assert_eq!(m.entries().count(), 5);
        assert_eq!(m.max_version(), Some(hlc(2, 0, A)));
    }

    #[test]
    fn gc_drops_only_tombstones_older_than_the_bound() {
        let mut m = StateMap::new();
        m.delete("flow/old", hlc(10, 0, A));
        m.delete("flow/new", hlc(30, 0, A));
        m.set("flow/live", json!(1), hlc(5, 0, A));
        assert_eq!(m.gc_tombstones(hlc(20, 0, A)), 1);
        assert!(m.entry("flow/old").is_none());
        assert!(m.entry("flow/new").is_some());
        assert_eq!(m.get("flow/live"), Some(&json!(1)));
    }

    #[test]
    fn digest_and_delta_repair_both_sides() {
        let mut a = StateMap::new();
        let mut b = StateMap::new();
        a.set("flow/x", json!(1), hlc(1, 0, A));
        a.set("flow/y", json!(1), hlc(5, 0, A));
        b.set("flow/y", json!(2), hlc(3, 0, B));
        b.delete("flow/z", hlc(4, 0, B));
        let to_b = a.delta_since(&b.digest());
        let to_a = b.delta_since(&a.digest());
        assert_eq!(to_b.len(), 2);
        assert_eq!(to_a.len(), 1);
        assert_eq!(b.apply(to_b), 2);
        assert_eq!(a.apply(to_a), 1);
        assert_eq!(a, b);
        assert!(a.delta_since(&b.digest()).is_empty());
    }

    // --- persistence ---

    #[test]
    fn save_and_load_round_trip_keeps_tombstones_and_null_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster/state.json");
        let mut m = StateMap::new();
        m.set(
            "flow/pyex",
            json!({"image": "py", "replicas": 3}),
            hlc(10, 2, A),
        );
        m.set("vip/web", Value::Null, hlc(11, 0, B));
        m.delete("ns/old", hlc(12, 0, A));
        m.save(&path).unwrap();
        let back = StateMap::load(&path).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.get("vip/web"), Some(&Value::Null));
        assert!(back.entry("ns/old").unwrap().is_tombstone());
        let file: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(file["format"], json!(1));
        assert!(file["entries"]["ns/old"].get("value").is_none());
        // saving again replaces the file and leaves no temporary behind
        m.set("flow/pyex", json!(null), hlc(13, 0, A));
        m.save(&path).unwrap();
        assert_eq!(StateMap::load(&path).unwrap(), m);
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
    }

    #[test]
    fn load_of_a_missing_file_is_an_empty_map() {
        let dir = tempfile::tempdir().unwrap();
        let m = StateMap::load(&dir.path().join("state.json")).unwrap();
        assert_eq!(m, StateMap::new());
    }

    #[test]
    fn load_of_a_corrupt_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        for text in [
            "{\"format\": 1, \"entries\": {\"flow/a\": {\"version\": 3}}}",
            "{\"format\": 1, \"entries\": ",
            "",
            "[]",
        ] {
            std::fs::write(&path, text).unwrap();
            let err = StateMap::load(&path).unwrap_err();
            assert!(
                matches!(err, StateMapError::Corrupt { .. }),
                "{text:?}: {err:?}"
            );
            assert!(err.to_string().contains(&path.display().to_string()));
        }
    }

    #[test]
    fn load_of_an_unknown_format_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, "{\"format\": 2, \"entries\": [1, 2]}").unwrap();
        let err = StateMap::load(&path).unwrap_err();
        assert!(
            matches!(err, StateMapError::UnsupportedFormat { found: 2, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains(&path.display().to_string()));
    }

    #[test]
    fn restarted_node_writes_newer_than_what_it_persisted() {
        let mut before = Clock::new(A);
        let mut m = StateMap::new();
        m.set("flow/a", json!(1), before.now(5_000));
        // restart with the physical clock set back
        let mut after = Clock::new(A);
        after.observe(m.max_version().unwrap(), 1_000);
        assert!(m.set("flow/a", json!(2), after.now(1_000)));
        assert_eq!(m.get("flow/a"), Some(&json!(2)));
    }

    // --- properties ---

    const NODES: [NodeId; 3] = [
        NodeId::from_u128(1),
        NodeId::from_u128(2),
        NodeId::from_u128(3),
    ];

    /// One write of a simulated node: it may first observe an earlier write (gossip arriving).
    #[derive(Debug, Clone)]
    struct Op {
        node: usize,
        key: usize,
        value: Option<u8>,
        physical_ms: u64,
        observe: Option<prop::sample::Index>,
    }

    fn op() -> impl Strategy<Value = Op> {
        (
            0..3usize,
            0..4usize,
            prop::option::of(0u8..4),
            // a small range makes equal wall times and backwards physical clocks common
            0u64..20,
            prop::option::of(any::<prop::sample::Index>()),
        )
            .prop_map(|(node, key, value, physical_ms, observe)| Op {
                node,
                key,
                value,
                physical_ms,
                observe,
            })
    }

    /// The updates three nodes issue for `ops`, each stamped by the node's own clock.
    fn history(ops: &[Op]) -> Vec<(String, Entry)> {
        let mut clocks = NODES.map(Clock::new);
        let mut out: Vec<(String, Entry)> = Vec::new();
        for op in ops {
            let clock = &mut clocks[op.node];
            if let Some(ix) = &op.observe
                && !out.is_empty()
            {
                clock.observe(out[ix.index(out.len())].1.version, op.physical_ms);
            }
            let version = clock.now(op.physical_ms);
            let kind = ["flow", "ns", "vip", "svc"][op.key % 4];
            out.push((
                format!("{kind}/k{}", op.key),
                Entry {
                    version,
                    value: op.value.map(|v| json!({ "v": v })),
                },
            ));
        }
        out
    }

    /// A replica that received the updates picked by `pick`, in the order of its sort keys.
    fn replica(updates: &[(String, Entry)], pick: &[(bool, u32)]) -> StateMap {
        let mut chosen: Vec<_> = updates
            .iter()
            .enumerate()
            .filter(|(i, _)| pick[i % pick.len()].0)
            .map(|(i, u)| (pick[i % pick.len()].1, i, u))
            .collect();
        chosen.sort_by_key(|(order, i, _)| (*order, *i));
        let mut m = StateMap::new();
        for (_, _, (key, entry)) in chosen {
            m.merge_entry(key.clone(), entry.clone());
        }
        m
    }

    /// The expected state: per key, the update with the greatest version.
    fn model(updates: &[(String, Entry)]) -> BTreeMap<String, Entry> {
        let mut want: BTreeMap<String, Entry> = BTreeMap::new();
        for (key, entry) in updates {
            if want
                .get(key)
                .is_none_or(|held| entry.version > held.version)
            {
                want.insert(key.clone(), entry.clone());
            }
        }
        want
    }

    fn joined(a: &StateMap, b: &StateMap) -> StateMap {
        let mut out = a.clone();
        out.merge(b);
        out
    }

    fn picks() -> impl Strategy<Value = Vec<(bool, u32)>> {
        prop::collection::vec(any::<(bool, u32)>(), 1..48)
    }

    /// Maps with arbitrary, possibly conflicting entries (equal versions, different values): the
    /// join laws must hold even for states no correct clock would produce.
    fn arbitrary_map() -> impl Strategy<Value = StateMap> {
        prop::collection::vec(
            (
                0..3usize,
                0u64..3,
                0u32..2,
                0..2usize,
                prop::option::of(0u8..3),
            ),
            0..12,
        )
        .prop_map(|writes| {
            let mut m = StateMap::new();
            for (key, wall_ms, logical, node, value) in writes {
                m.merge_entry(
                    format!("flow/{key}"),
                    Entry {
                        version: hlc(wall_ms, logical, NODES[node]),
                        value: value.map(|v| json!([v])),
                    },
                );
            }
            m
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn merge_is_a_join_even_for_conflicting_entries(
            a in arbitrary_map(), b in arbitrary_map(), c in arbitrary_map()
        ) {
            prop_assert_eq!(joined(&a, &b), joined(&b, &a));
            prop_assert_eq!(joined(&joined(&a, &b), &c), joined(&a, &joined(&b, &c)));
            prop_assert_eq!(joined(&a, &a), a);
        }

        #[test]
        fn merge_of_replicas_is_commutative_associative_idempotent(
            ops in prop::collection::vec(op(), 0..40),
            pa in picks(), pb in picks(), pc in picks(),
        ) {
            let updates = history(&ops);
            let (a, b, c) = (replica(&updates, &pa), replica(&updates, &pb), replica(&updates, &pc));
            prop_assert_eq!(joined(&a, &b), joined(&b, &a));
            prop_assert_eq!(joined(&joined(&a, &b), &c), joined(&a, &joined(&b, &c)));
            prop_assert_eq!(joined(&a, &a), a.clone());
            let mut again = a.clone();
            prop_assert_eq!(again.merge(&a), 0);
        }

        #[test]
        fn replicas_with_the_same_updates_in_any_order_are_identical(
            ops in prop::collection::vec(op(), 0..40),
            order1 in prop::collection::vec(any::<u32>(), 1..48),
            order2 in prop::collection::vec(any::<u32>(), 1..48),
            pa in picks(), pb in picks(),
        ) {
            let updates = history(&ops);
            let all = |order: &[u32]| -> Vec<(bool, u32)> { order.iter().map(|o| (true, *o)).collect() };
            let one = replica(&updates, &all(&order1));
            let two = replica(&updates, &all(&order2));
            prop_assert_eq!(&one, &two);
            prop_assert_eq!(&one.entries, &model(&updates));
            // partial replicas merged with the rest converge to the same state
            let partial = joined(&replica(&updates, &pa), &replica(&updates, &pb));
            prop_assert_eq!(joined(&partial, &one), one);
        }

        #[test]
        fn one_anti_entropy_exchange_each_way_converges(
            ops in prop::collection::vec(op(), 0..40),
            pa in picks(), pb in picks(),
        ) {
            let updates = history(&ops);
            let (mut a, mut b) = (replica(&updates, &pa), replica(&updates, &pb));
            let union = joined(&a, &b);
            let to_b = a.delta_since(&b.digest());
            let to_a = b.delta_since(&a.digest());
            // a delta only carries what the other side lacks: every entry in it changes the map
            prop_assert_eq!(b.apply(to_b.clone()), to_b.len());
            prop_assert_eq!(a.apply(to_a.clone()), to_a.len());
            prop_assert_eq!(&a, &b);
            prop_assert_eq!(&a, &union);
            prop_assert!(a.delta_since(&b.digest()).is_empty());
        }
    }
}

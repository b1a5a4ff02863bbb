//! The host tuning profile: parse it, compare it with a sysctl tree, apply it and read it back.
//!
//! Everything takes the sysctl root as a parameter (`/proc/sys` in production, a temporary
//! folder in tests), so the policy is tested without touching the host. `apply` mirrors
//! `sysctl -w key=value` followed by `sysctl key`, but reads back every key, because `sysctl -w`
//! exits 0 even when the kernel refused the write.

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The profile shipped with DROP (tuning/90-drop.conf), embedded at build time.
pub const BUILTIN_PROFILE: &str = include_str!("../../../tuning/90-drop.conf");

/// Capacity keys: the profile value is a floor; a host value that is already higher is kept.
pub const MINIMUM_KEYS: &[&str] = &[
    "fs.file-max",
    "net.core.somaxconn",
    "net.core.netdev_max_backlog",
    "net.ipv4.tcp_max_syn_backlog",
    "net.core.rmem_max",
    "net.core.wmem_max",
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProfileError {
    #[error("line {line}: expected `key = value`, found {text:?}")]
    Syntax { line: usize, text: String },
    #[error("line {line}: key `{key}` appears twice (first on line {first})")]
    Duplicate {
        line: usize,
        key: String,
        first: usize,
    },
    #[error("line {line}: key `{key}` is a minimum, so its value must be numbers, found {value:?}")]
    NotNumeric {
        line: usize,
        key: String,
        value: String,
    },
}

/// How a wanted value is compared with the host's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// The host value must equal the wanted one.
    Exact,
    /// The host value must be at least the wanted one (element-wise for multi-value keys).
    Minimum,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    /// Normalised: fields separated by one space.
    pub value: String,
    pub policy: Policy,
    pub line: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    pub entries: Vec<Entry>,
}

impl Profile {
    /// The embedded profile. It is checked by unit tests, so this cannot fail at run time.
    pub fn builtin() -> Profile {
        Profile::parse(BUILTIN_PROFILE).expect("the embedded tuning profile parses")
    }

    /// Parses sysctl.d syntax: `key = value`, `#`/`;` comments, blank lines. A leading `-`
    /// (sysctl.d's "ignore failure" marker) is accepted and dropped. Keys may use `.` or `/`.
    pub fn parse(text: &str) -> Result<Profile, ProfileError> {
        let mut entries: Vec<Entry> = Vec::new();
        for (idx, raw) in text.lines().enumerate() {
            let line = idx + 1;
            let trimmed = raw.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with(';') {
                continue;
            }
            let Some((key, value)) = trimmed.split_once('=') else {
                return Err(ProfileError::Syntax {
                    line,
                    text: raw.to_string(),
                });
            };
            let key = key.trim().trim_start_matches('-').replace('/', ".");
            let value = normalise(value);
            if key.is_empty() || value.is_empty() || key.contains(char::is_whitespace) {
                return Err(ProfileError::Syntax {
                    line,
                    text: raw.to_string(),
                });
            }
            if let Some(first) = entries.iter().find(|e| e.key == key) {
                return Err(ProfileError::Duplicate {
                    line,
                    key,
                    first: first.line,
                });
            }
            let policy = if MINIMUM_KEYS.contains(&key.as_str()) {
                if numbers(&value).is_none() {
                    return Err(ProfileError::NotNumeric { line, key, value });
                }
                Policy::Minimum
            } else {
                Policy::Exact
            };
            entries.push(Entry {
                key,
                value,
                policy,
                line,
            });
        }
        Ok(Profile { entries })
    }

    /// The entries whose key is in `only`; all of them when `only` is empty. Unknown keys in
    /// `only` are returned as the error.
    pub fn select(&self, only: &[String]) -> Result<Vec<&Entry>, Vec<String>> {
        let unknown: Vec<String> = only
            .iter()
            .filter(|k| !self.entries.iter().any(|e| &e.key == *k))
            .cloned()
            .collect();
        if !unknown.is_empty() {
            return Err(unknown);
        }
        let wanted: BTreeSet<&str> = only.iter().map(String::as_str).collect();
        Ok(self
            .entries
            .iter()
            .filter(|e| wanted.is_empty() || wanted.contains(e.key.as_str()))
            .collect())
    }
}

fn normalise(value: &str) -> String {
    value.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn numbers(value: &str) -> Option<Vec<u64>> {
    value.split_whitespace().map(|f| f.parse().ok()).collect()
}

/// `net.ipv4.tcp_rmem` → `<root>/net/ipv4/tcp_rmem`.
pub fn key_path(root: &Path, key: &str) -> PathBuf {
    root.join(key.replace('.', "/"))
}

/// Whether `actual` satisfies `entry`.
pub fn satisfies(entry: &Entry, actual: &str) -> bool {
    match entry.policy {
        Policy::Exact => normalise(actual) == entry.value,
        Policy::Minimum => match (numbers(&entry.value), numbers(actual)) {
            (Some(want), Some(have)) => {
                want.len() == have.len() && have.iter().zip(&want).all(|(h, w)| h >= w)
            }
            _ => false,
        },
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyState {
    Ok,
    Drift,
    /// The running kernel has no such key.
    AbsentInKernel,
    /// The key exists but could not be read.
    Unreadable,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyCheck {
    pub key: String,
    pub wanted: String,
    pub policy: Policy,
    /// `None` when absent or unreadable.
    pub actual: Option<String>,
    pub state: KeyState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReport {
    pub sysctl_root: PathBuf,
    pub keys: Vec<KeyCheck>,
}

impl CheckReport {
    pub fn count(&self, state: KeyState) -> usize {
        self.keys.iter().filter(|k| k.state == state).count()
    }
    /// True when every key present in the kernel is as wanted.
    pub fn in_tune(&self) -> bool {
        self.keys
            .iter()
            .all(|k| matches!(k.state, KeyState::Ok | KeyState::AbsentInKernel))
    }
}

fn read_key(root: &Path, key: &str) -> Result<Option<String>, std::io::Error> {
    match std::fs::read_to_string(key_path(root, key)) {
        Ok(v) => Ok(Some(normalise(&v))),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn check_entry(root: &Path, entry: &Entry) -> KeyCheck {
    let (actual, state, error) = match read_key(root, &entry.key) {
        Ok(None) => (None, KeyState::AbsentInKernel, None),
        Ok(Some(v)) if satisfies(entry, &v) => (Some(v), KeyState::Ok, None),
        Ok(Some(v)) => (Some(v), KeyState::Drift, None),
        Err(e) => (None, KeyState::Unreadable, Some(e.to_string())),
    };
    KeyCheck {
        key: entry.key.clone(),
        wanted: entry.value.clone(),
        policy: entry.policy,
        actual,
        state,
        error,
    }
}

/// Compares `entries` with the sysctl tree under `root`.
pub fn check(root: &Path, entries: &[&Entry]) -> CheckReport {
    CheckReport {
        sysctl_root: root.to_path_buf(),
        keys: entries.iter().map(|e| check_entry(root, e)).collect(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ApplyOutcome {
    /// Written and read back as wanted.
    Changed,
    /// Already as wanted (for a minimum: already at least the wanted value); not written.
    Unchanged,
    AbsentInKernel,
    /// The write was refused or the read-back differs; see `error`.
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyApply {
    pub key: String,
    pub wanted: String,
    pub before: Option<String>,
    pub after: Option<String>,
    pub outcome: ApplyOutcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyReport {
    pub sysctl_root: PathBuf,
    pub keys: Vec<KeyApply>,
}

impl ApplyReport {
    pub fn count(&self, outcome: ApplyOutcome) -> usize {
        self.keys.iter().filter(|k| k.outcome == outcome).count()
    }
}

fn apply_entry(root: &Path, entry: &Entry) -> KeyApply {
    let mut out = KeyApply {
        key: entry.key.clone(),
        wanted: entry.value.clone(),
        before: None,
        after: None,
        outcome: ApplyOutcome::Failed,
        error: None,
    };
    match read_key(root, &entry.key) {
        Ok(None) => {
            out.outcome = ApplyOutcome::AbsentInKernel;
            return out;
        }
        Ok(Some(v)) => out.before = Some(v),
        Err(e) => {
            out.error = Some(format!("read: {e}"));
            return out;
        }
    }
    if out.before.as_deref().is_some_and(|v| satisfies(entry, v)) {
        out.after = out.before.clone();
        out.outcome = ApplyOutcome::Unchanged;
        return out;
    }
    // Write without O_CREAT: a sysctl file that vanished must not be created as a plain file.
    let path = key_path(root, &entry.key);
    let write = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .and_then(|mut f| {
            std::io::Write::write_all(&mut f, format!("{}\n", entry.value).as_bytes())
        });
    if let Err(e) = write {
        out.error = Some(format!("write: {e}"));
        out.after = read_key(root, &entry.key).ok().flatten();
        return out;
    }
    match read_key(root, &entry.key) {
        Ok(Some(v)) if satisfies(entry, &v) => {
            out.after = Some(v);
            out.outcome = ApplyOutcome::Changed;
        }
        Ok(v) => {
            out.error = Some(format!(
                "read back {:?} after writing {:?}",
                v.as_deref().unwrap_or(""),
                entry.value
            ));
            out.after = v;
        }
        Err(e) => out.error = Some(format!("read back: {e}")),
    }
    out
}

/// Applies `entries` to the sysctl tree under `root` and reads every key back.
pub fn apply(root: &Path, entries: &[&Entry]) -> ApplyReport {
    ApplyReport {
        sysctl_root: root.to_path_buf(),
        keys: entries.iter().map(|e| apply_entry(root, e)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake sysctl tree with every profile key at `value_for(key)`.
    fn tree(value_for: impl Fn(&str) -> Option<String>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for e in Profile::builtin().entries {
            if let Some(v) = value_for(&e.key) {
                let p = key_path(dir.path(), &e.key);
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(p, format!("{v}\n")).unwrap();
            }
        }
        dir
    }

    fn all(p: &Profile) -> Vec<&Entry> {
        p.select(&[]).unwrap()
    }

    #[test]
    fn builtin_profile_has_every_documented_key_and_no_tw_recycle() {
        let p = Profile::builtin();
        assert_eq!(p.entries.len(), 27);
        let get = |k: &str| {
            p.entries
                .iter()
                .find(|e| e.key == k)
                .map(|e| e.value.as_str())
        };
        assert_eq!(get("vm.swappiness"), Some("10"));
        assert_eq!(get("net.ipv4.tcp_rmem"), Some("4096 8388608 16777216"));
        assert_eq!(get("net.core.wmem_default"), Some("4194394"));
        assert_eq!(get("net.ipv4.conf.all.arp_ignore"), Some("1"));
        assert_eq!(get("net.ipv4.conf.all.arp_announce"), Some("2"));
        assert_eq!(get("net.ipv4.tcp_tw_recycle"), None);
        for k in MINIMUM_KEYS {
            let e = p
                .entries
                .iter()
                .find(|e| e.key == *k)
                .unwrap_or_else(|| panic!("{k} missing"));
            assert_eq!(e.policy, Policy::Minimum, "{k}");
        }
        assert_eq!(
            p.entries
                .iter()
                .filter(|e| e.policy == Policy::Minimum)
                .count(),
            MINIMUM_KEYS.len()
        );
    }

    #[test]
    fn every_profile_key_is_documented_in_the_readme() {
        let readme = include_str!("../../../tuning/README.md");
        for e in Profile::builtin().entries {
            assert!(
                readme.contains(&format!("| `{}` |", e.key)),
                "{} has no line in tuning/README.md",
                e.key
            );
        }
    }

    #[test]
    fn parse_accepts_sysctl_d_forms_and_rejects_junk() {
        let p = Profile::parse("; c\n# c\n-net/core/somaxconn =  100 \nkernel.panic=1\n").unwrap();
        assert_eq!(p.entries[0].key, "net.core.somaxconn");
        assert_eq!(p.entries[0].value, "100");
        assert_eq!(p.entries[1].line, 4);
        assert_eq!(
            Profile::parse("a.b 1\n").unwrap_err(),
            ProfileError::Syntax {
                line: 1,
                text: "a.b 1".into()
            }
        );
        assert!(matches!(
            Profile::parse("a=1\na=2\n"),
            Err(ProfileError::Duplicate {
                line: 2,
                first: 1,
                ..
            })
        ));
        assert!(matches!(
            Profile::parse("fs.file-max = lots\n"),
            Err(ProfileError::NotNumeric { .. })
        ));
    }

    #[test]
    fn minimum_accepts_higher_and_exact_needs_equal() {
        let p = Profile::parse("net.core.somaxconn = 100\nnet.ipv4.tcp_rmem = 1 2 3\n").unwrap();
        let (min, exact) = (&p.entries[0], &p.entries[1]);
        assert!(satisfies(min, "100") && satisfies(min, "4096") && !satisfies(min, "99"));
        assert!(satisfies(exact, "1\t2   3") && !satisfies(exact, "1 2 4"));
    }

    #[test]
    fn check_reports_ok_drift_and_absent_per_key() {
        let dir = tree(|k| match k {
            "vm.swappiness" => Some("60".into()),
            "fs.file-max" => Some("9223372036854775807".into()),
            "net.core.somaxconn" => Some("4096".into()),
            "kernel.panic" => None,
            _ => Some(
                Profile::builtin()
                    .entries
                    .iter()
                    .find(|e| e.key == k)
                    .unwrap()
                    .value
                    .clone(),
            ),
        });
        let p = Profile::builtin();
        let report = check(dir.path(), &all(&p));
        let state = |k: &str| report.keys.iter().find(|c| c.key == k).unwrap().state;
        assert_eq!(state("vm.swappiness"), KeyState::Drift);
        assert_eq!(
            state("fs.file-max"),
            KeyState::Ok,
            "a higher capacity value is fine"
        );
        assert_eq!(
            state("net.core.somaxconn"),
            KeyState::Drift,
            "a lower capacity value drifts"
        );
        assert_eq!(state("kernel.panic"), KeyState::AbsentInKernel);
        assert_eq!(report.count(KeyState::Ok), 24);
        assert!(!report.in_tune());
    }

    #[test]
    fn apply_writes_reads_back_and_never_lowers_a_minimum() {
        let dir = tree(|k| match k {
            "fs.file-max" => Some("9223372036854775807".into()),
            "net.ipv4.tcp_rmem" => Some("4096\t131072\t6291456".into()),
            "kernel.panic" => None,
            _ => Some("0".into()),
        });
        let p = Profile::builtin();
        let report = apply(dir.path(), &all(&p));
        let get = |k: &str| report.keys.iter().find(|c| c.key == k).unwrap().clone();
        let file_max = get("fs.file-max");
        assert_eq!(file_max.outcome, ApplyOutcome::Unchanged);
        assert_eq!(
            std::fs::read_to_string(key_path(dir.path(), "fs.file-max")).unwrap(),
            "9223372036854775807\n"
        );
        let rmem = get("net.ipv4.tcp_rmem");
        assert_eq!(rmem.outcome, ApplyOutcome::Changed);
        assert_eq!(rmem.before.as_deref(), Some("4096 131072 6291456"));
        assert_eq!(rmem.after.as_deref(), Some("4096 8388608 16777216"));
        assert_eq!(get("kernel.panic").outcome, ApplyOutcome::AbsentInKernel);
        assert!(
            !key_path(dir.path(), "kernel.panic").exists(),
            "apply must not create missing keys"
        );
        assert_eq!(report.count(ApplyOutcome::Changed), 25);
        // Second apply changes nothing and the tree is in tune.
        let again = apply(dir.path(), &all(&p));
        assert_eq!(again.count(ApplyOutcome::Changed), 0);
        assert_eq!(again.count(ApplyOutcome::Unchanged), 26);
        assert!(check(dir.path(), &all(&p)).in_tune());
    }

    #[test]
    fn apply_reports_an_unreadable_key_with_its_reason() {
        // A directory where the key file should be: reading fails even for root. (A write the
        // kernel refuses is tested for real in a network namespace: tests/privileged/tune.rs.)
        let dir = tree(|k| (k != "vm.swappiness").then(|| "0".into()));
        std::fs::create_dir_all(key_path(dir.path(), "vm.swappiness")).unwrap();
        let profile = Profile::builtin();
        let report = apply(
            dir.path(),
            &profile.select(&["vm.swappiness".into()]).unwrap(),
        );
        let k = &report.keys[0];
        assert_eq!(k.outcome, ApplyOutcome::Failed);
        assert!(k.error.as_deref().unwrap().starts_with("read:"), "{k:?}");
        let checked = check(
            dir.path(),
            &profile.select(&["vm.swappiness".into()]).unwrap(),
        );
        assert_eq!(checked.keys[0].state, KeyState::Unreadable);
    }

    #[test]
    fn select_names_unknown_keys() {
        let p = Profile::builtin();
        assert_eq!(p.select(&["vm.swappiness".into()]).unwrap().len(), 1);
        assert_eq!(
            p.select(&["vm.nope".into(), "vm.swappiness".into()])
                .unwrap_err(),
            vec!["vm.nope".to_string()]
        );
    }
}

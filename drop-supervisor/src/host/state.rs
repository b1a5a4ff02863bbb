//! The node's state directory and its identity: a UUID created once and kept for the node's life.
//!
//! Files are written atomically (temporary file, fsync, rename, fsync of the directory), so a
//! crash at any point leaves either the old or the new content, never a torn file.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use uuid::Uuid;

/// File under the state directory that holds the node id.
pub const NODE_ID_FILE: &str = "node-id";

/// File under the state directory that exists while the node is drained (it holds the Unix
/// time in ms when the drain began), so a restart in the middle of a rollout stays drained.
pub const DRAINING_FILE: &str = "draining";

/// Since when the node has been draining, if it is.
pub fn draining_since(state_dir: &Path) -> Option<u64> {
    let text = fs::read_to_string(state_dir.join(DRAINING_FILE)).ok()?;
    Some(text.trim().parse().unwrap_or(0))
}

/// Records (`Some(since)`) or ends (`None`) the drain.
pub fn set_draining(state_dir: &Path, since: Option<u64>) -> Result<(), StateError> {
    let path = state_dir.join(DRAINING_FILE);
    match since {
        Some(ms) => write_atomic(&path, format!("{ms}\n").as_bytes()),
        None => match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError::Write { path, source }),
        },
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot create state directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A damaged identity is never replaced silently: the node would rejoin as a stranger.
    #[error(
        "{path} does not hold a node id (a UUID): {content:?}; restore it or remove it to create a new identity"
    )]
    Corrupt { path: PathBuf, content: String },
}

/// Creates `dir` (and parents) with mode 0750 if missing.
pub fn ensure_dir(dir: &Path) -> Result<(), StateError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(dir)
        .map_err(|source| StateError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })
}

/// Reads the node id from `state_dir`, creating and persisting a new one on first start.
/// Returns the id and whether it was just created.
pub fn load_or_create_node_id(state_dir: &Path) -> Result<(Uuid, bool), StateError> {
    ensure_dir(state_dir)?;
    let path = state_dir.join(NODE_ID_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => {
            let id = Uuid::parse_str(text.trim()).map_err(|_| StateError::Corrupt {
                path: path.clone(),
                content: text.clone(),
            })?;
            Ok((id, false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = Uuid::new_v4();
            write_atomic(&path, format!("{id}\n").as_bytes())?;
            Ok((id, true))
        }
        Err(source) => Err(StateError::Read { path, source }),
    }
}

/// Replaces `path` with `data` atomically and durably.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), StateError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp.{}", std::process::id()));
    let werr = |source| StateError::Write {
        path: path.to_path_buf(),
        source,
    };
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o640)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(werr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("a/b");
        let (first, created) = load_or_create_node_id(&state).unwrap();
        assert!(created);
        let (again, created) = load_or_create_node_id(&state).unwrap();
        assert!(!created);
        assert_eq!(first, again);
        let text = fs::read_to_string(state.join(NODE_ID_FILE)).unwrap();
        assert_eq!(text, format!("{first}\n"));
        // no temporary file left behind
        assert_eq!(fs::read_dir(&state).unwrap().count(), 1);
    }

    #[test]
    fn corrupt_node_id_is_an_error_not_a_new_identity() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(NODE_ID_FILE), "garbage\n").unwrap();
        let err = load_or_create_node_id(dir.path()).unwrap_err().to_string();
        assert!(err.contains("does not hold a node id"), "{err}");
        assert_eq!(
            fs::read_to_string(dir.path().join(NODE_ID_FILE)).unwrap(),
            "garbage\n"
        );
    }

    #[test]
    fn state_dir_gets_mode_0750() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        load_or_create_node_id(&state).unwrap();
        let mode = fs::metadata(&state).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o750);
    }
}

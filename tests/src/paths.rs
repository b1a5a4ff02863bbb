//! Where the artefacts under test are: the workspace, the built binaries, the XDP object.

use std::path::PathBuf;

/// The workspace root (parent of this crate).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A binary of the workspace: `$DROP_BIN_DIR/<name>` (set by `cargo xtask test`), else
/// `target/debug/<name>`.
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("DROP_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/debug"));
    dir.join(name)
}

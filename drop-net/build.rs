//! Embeds the XDP object built by `cargo xtask build-ebpf` into the library.
//!
//! The object comes from `drop-ebpf/target/bpfel-unknown-none/release/drop-xdp`, or from the path
//! in `DROP_XDP_OBJ`. When it has not been built, an empty file is embedded instead, so that an
//! unprivileged stable `cargo build` works without nightly or bpf-linker; loading then fails
//! with an error that says to run `cargo xtask build-ebpf`.

use std::path::{Path, PathBuf};
use std::{env, fs};

const OVERRIDE: &str = "DROP_XDP_OBJ";

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo")).join("drop-xdp.o");
    println!("cargo::rerun-if-env-changed={OVERRIDE}");

    let (object, explicit) = match env::var_os(OVERRIDE) {
        Some(path) => (PathBuf::from(path), true),
        None => (
            manifest_dir.join("../drop-ebpf/target/bpfel-unknown-none/release/drop-xdp"),
            false,
        ),
    };

    let bytes = if object.is_file() {
        println!("cargo::rerun-if-changed={}", object.display());
        fs::read(&object).unwrap_or_else(|e| panic!("reading {}: {e}", object.display()))
    } else if explicit {
        panic!("{OVERRIDE}={} is not a file", object.display());
    } else {
        // Watch the nearest folder that exists, so that building the object later re-runs this
        // script (cargo re-runs it forever for a watched path that does not exist).
        let watched = object
            .ancestors()
            .skip(1)
            .find(|dir| dir.is_dir())
            .unwrap_or(&manifest_dir);
        println!("cargo::rerun-if-changed={}", watched.display());
        println!(
            "cargo::warning=XDP object not built ({}); embedding an empty one, run `cargo xtask build-ebpf` to get a loadable drop-net",
            object.display()
        );
        Vec::new()
    };
    write_if_changed(&out, &bytes);
}

/// Writes only when the content differs, so an unchanged object does not recompile the crate.
fn write_if_changed(path: &Path, bytes: &[u8]) {
    if fs::read(path).is_ok_and(|old| old == bytes) {
        return;
    }
    fs::write(path, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

//! `cargo xtask build-ebpf`: the XDP program is its own workspace (drop-ebpf), built for the
//! bpfel target with the pinned nightly, `-Z build-std=core` and bpf-linker.

use std::path::PathBuf;
use std::process::Command;

use anyhow::bail;

use crate::setup::Tools;
use crate::{root, run_cmd, step};

/// Where the object lands; drop-net's build script embeds it from here.
pub fn object_path() -> PathBuf {
    root().join("drop-ebpf/target/bpfel-unknown-none/release/drop-xdp")
}

pub fn build(tools: &Tools) -> anyhow::Result<PathBuf> {
    step("build-ebpf: drop-xdp object", || {
        let mut cmd = Command::new("rustup");
        cmd.current_dir(root().join("drop-ebpf"))
            .args([
                "run",
                &tools.nightly,
                "cargo",
                "build",
                "--locked",
                "--release",
            ])
            .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"]);
        // The same flags aya-build passes: the arch cfg aya-ebpf needs, full debuginfo, and
        // `--btf` so bpf-linker emits .BTF/.BTF.ext.
        let arch = std::env::consts::ARCH;
        let flags = [
            format!("--cfg=bpf_target_arch=\"{arch}\""),
            "-Cdebuginfo=2".into(),
            "-Clink-arg=--btf".into(),
        ];
        cmd.env("CARGO_ENCODED_RUSTFLAGS", flags.join("\x1f"));
        // The outer (stable) cargo's settings must not leak into the nightly build.
        for k in [
            "RUSTC",
            "RUSTC_WRAPPER",
            "RUSTC_WORKSPACE_WRAPPER",
            "RUSTUP_TOOLCHAIN",
            "CARGO",
            "RUSTFLAGS",
            "CARGO_TARGET_DIR",
            "CARGO_BUILD_TARGET_DIR",
        ] {
            cmd.env_remove(k);
        }
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs = vec![tools.bpf_linker_dir.clone()];
        dirs.extend(std::env::split_paths(&path));
        cmd.env("PATH", std::env::join_paths(dirs)?);
        run_cmd(&mut cmd)?;
        let obj = object_path();
        if !obj.is_file() {
            bail!("the build succeeded but {} is missing", obj.display());
        }
        println!(
            "    {} ({} bytes)",
            obj.display(),
            std::fs::metadata(&obj)?.len()
        );
        Ok(obj)
    })
}

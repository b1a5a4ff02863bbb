//! `cargo xtask run`: a single-node DROP in the foreground, for trying it out. All state lives
//! under target/drop-dev/; nothing is written to /etc or /var.

use std::process::Command;

use anyhow::Context as _;

use crate::{cargo, ebpf, root, run_cmd, setup, step};

pub fn run() -> anyhow::Result<()> {
    let tools = setup::setup()?;
    ebpf::build(&tools)?;
    step("build: workspace (debug)", || {
        run_cmd(cargo().args(["build", "--locked", "--workspace", "--bins"]))
    })?;

    let dev = root().join("target/drop-dev");
    let state = dev.join("state");
    std::fs::create_dir_all(&state).with_context(|| format!("cannot create {}", dev.display()))?;
    let socket = dev.join("drop.sock");
    let config = dev.join("drop.toml");
    // Regenerated every run so it follows the checkout; the node id in state/ is kept.
    let text = format!(
        "# Development config written by `cargo xtask run`; regenerated on every run.\n\
         [node]\nname = \"dev\"\nstate_dir = \"{}\"\n\n\
         [control]\nsocket = \"{}\"\n\n\
         [tuning]\n# The host's real sysctls: `tune check` only reads; `tune apply` would write them.\n\
         sysctl_root = \"/proc/sys\"\n\n\
         [log]\nlevel = \"info\"\n",
        state.display(),
        socket.display()
    );
    std::fs::write(&config, text).with_context(|| format!("cannot write {}", config.display()))?;

    let bin = root().join("target/debug");
    println!();
    println!("DROP (single node) starting in the foreground; Ctrl-C stops it.");
    println!("  config  {}", config.display());
    println!("  socket  {}", socket.display());
    println!();
    println!("From another shell:");
    println!("  export DROP_SOCKET={}", socket.display());
    println!("  {}/dropctl status", bin.display());
    println!("  {}/dropctl tune check", bin.display());
    println!("  {}/dropctl --json status", bin.display());
    println!();
    // Ctrl-C reaches the daemon too (same process group); it removes its socket and exits.
    let status = Command::new(bin.join("drop-supervisor"))
        .arg("--config")
        .arg(&config)
        .status()
        .context("cannot start drop-supervisor")?;
    if !status.success() && status.code().is_some() {
        anyhow::bail!("drop-supervisor exited with {status}");
    }
    Ok(())
}

//! `cargo xtask run`: a single-node DROP in the foreground with the example flows applied, for
//! trying it out. All state lives under target/drop-dev/; nothing is written to /etc or /var.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::{cargo, ebpf, root, run_cmd, setup, step};

/// Example flows applied by `run`, in order (examples/flows/).
const EXAMPLE_FLOWS: &[&str] = &[
    "rustecho", "pyecho", "bashecho", "pipeline", "asyncpy", "stream", "pingpong", "users",
];

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    run_cmd(Command::new("cp").arg("-a").arg(from).arg(to))
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        // SIGTERM, then wait: the daemon stops its pools and removes its socket.
        // SAFETY: kill with a pid we own; no memory is involved.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

pub fn run() -> anyhow::Result<()> {
    let tools = setup::setup()?;
    ebpf::build(&tools)?;
    step("build: workspace (debug)", || {
        run_cmd(cargo().args(["build", "--locked", "--workspace", "--bins"]))
    })?;

    let dev = root().join("target/drop-dev");
    let (state, images, flows) = (dev.join("state"), dev.join("images"), dev.join("flows"));
    let bin = root().join("target/debug");
    step("run: example images and flows", || {
        std::fs::create_dir_all(&state)?;
        let _ = std::fs::remove_dir_all(&images);
        let _ = std::fs::remove_dir_all(&flows);
        std::fs::create_dir_all(&images)?;
        std::fs::create_dir_all(&flows)?;
        for entry in std::fs::read_dir(root().join("examples/images"))? {
            let entry = entry?;
            copy_dir(&entry.path(), &images.join(entry.file_name()))?;
        }
        for name in EXAMPLE_FLOWS {
            let text = std::fs::read_to_string(root().join(format!("examples/flows/{name}.yaml")))?;
            // The Rust echo worker is not installed on PATH in a checkout: point at the build.
            let text = text.replace(
                "cmd: drop-echo-worker",
                &format!("cmd: {}", bin.join("drop-echo-worker").display()),
            );
            std::fs::write(flows.join(format!("{name}.yaml")), text)?;
        }
        Ok(())
    })?;

    let socket = dev.join("drop.sock");
    let config = dev.join("drop.toml");
    let cgroups = setup::is_root();
    // Workers run as the package's `drop-fn` when this machine has it, else as `nobody`.
    let worker_user = if Command::new("getent")
        .args(["passwd", "drop-fn"])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        "drop-fn"
    } else {
        "nobody"
    };
    // Regenerated every run so it follows the checkout; the node id in state/ is kept.
    let text = format!(
        "# Development config written by `cargo xtask run`; regenerated on every run.\n\
         [node]\nname = \"dev\"\nstate_dir = \"{state}\"\n\n\
         [control]\nsocket = \"{socket}\"\n\n\
         [tuning]\n# The host's real sysctls: `tune check` only reads; `tune apply` would write them.\n\
         sysctl_root = \"/proc/sys\"\n\n\
         [runtime]\nimages_dir = \"{images}\"\nlogs_dir = \"{logs}\"\ncgroups = {cgroups}\n\
         worker_user = \"{worker_user}\"\n\n\
         [gateway]\nlisten = \"127.0.0.1:8081\"\n\n\
         [log]\nlevel = \"info\"\n",
        state = state.display(),
        socket = socket.display(),
        images = images.display(),
        logs = dev.join("logs").display(),
    );
    std::fs::write(&config, text).with_context(|| format!("cannot write {}", config.display()))?;

    println!();
    println!("DROP (single node) starting; Ctrl-C stops it. Workers run as `{worker_user}`.");
    let daemon = Daemon(
        Command::new(bin.join("drop-supervisor"))
            .arg("--config")
            .arg(&config)
            .spawn()
            .context("cannot start drop-supervisor")?,
    );
    let until = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        if Instant::now() > until {
            bail!(
                "drop-supervisor did not open {} within 20 s",
                socket.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let dropctl = bin.join("dropctl");
    for name in EXAMPLE_FLOWS {
        let file: PathBuf = flows.join(format!("{name}.yaml"));
        let out = Command::new(&dropctl)
            .arg("--socket")
            .arg(&socket)
            .arg("flow")
            .arg("apply")
            .arg(&file)
            .output()?;
        if out.status.success() {
            println!("  applied example flow {name}");
        } else {
            println!(
                "  example flow {name} not applied: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    println!();
    println!("  config   {}", config.display());
    println!("  socket   {}", socket.display());
    println!("  gateway  http://127.0.0.1:8081/api/v1/<pool>");
    println!();
    println!("From another shell:");
    println!("  export DROP_SOCKET={}", socket.display());
    println!("  {} status", dropctl.display());
    println!("  {} pool ls", dropctl.display());
    println!("  {} call pyecho 'hello'", dropctl.display());
    println!("  curl -s -d 'hello' http://127.0.0.1:8081/api/v1/rustecho");
    println!("  {} logs ping -f", dropctl.display());
    println!("  {} tune check", dropctl.display());
    println!();
    // The daemon is in our process group: Ctrl-C reaches it too; wait for it to finish.
    let mut daemon = daemon;
    let status = daemon.0.wait()?;
    std::mem::forget(daemon);
    if !status.success() && status.code().is_some() {
        bail!("drop-supervisor exited with {status}");
    }
    Ok(())
}

//! `cargo xtask ansible-lint`: the role and playbooks of packaging/ansible checked by
//! `ansible-lint` (production profile, warnings fail) and `ansible-playbook --syntax-check`.
//!
//! The Ansible it uses is packaging/ansible/requirements.txt (every package pinned), installed
//! with Debian's /usr/bin/python3 (not a pyenv shim) into a venv under the cache, once per
//! machine and per version of that file; later runs find it in milliseconds. Ansible keeps its
//! own files under target/ansible (ANSIBLE_HOME, temp folders, ansible-lint's cache), never in
//! ~/.ansible.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;

use crate::{output, root, run_cmd, setup, step};

/// The folder of the role and playbooks, relative to the workspace root.
const DIR: &str = "packaging/ansible";
/// The playbooks `--syntax-check` parses (with the example inventory).
const PLAYBOOKS: &[&str] = &["site.yml", "rollout.yml"];
/// Debian's Python 3.11: the pyenv shim on PATH forks several times and may name another one.
const PYTHON: &str = "/usr/bin/python3";
/// Written last into a complete venv: the requirements it was built from.
const MARKER: &str = ".drop-requirements";

/// A venv with the pinned Ansible.
#[derive(Debug, Clone)]
pub struct Ansible {
    pub venv: PathBuf,
}

impl Ansible {
    /// `program` of the venv (ansible-playbook, ansible-lint, …) with the venv first on PATH,
    /// Ansible's files under target/ansible and /usr/bin/python3 as the default interpreter
    /// (an inventory's `ansible_python_interpreter` still wins).
    pub fn command(&self, program: &str) -> Command {
        let bin = self.venv.join("bin");
        let work = root().join("target/ansible");
        let mut cmd = Command::new(bin.join(program));
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![bin];
        paths.extend(std::env::split_paths(&path));
        cmd.env(
            "PATH",
            std::env::join_paths(paths).expect("PATH entries hold no separator"),
        )
        .env("VIRTUAL_ENV", &self.venv)
        .env("ANSIBLE_HOME", work.join("home"))
        .env("ANSIBLE_LOCAL_TEMP", work.join("tmp"))
        .env("ANSIBLE_REMOTE_TEMP", work.join("tmp"))
        .env("ANSIBLE_PYTHON_INTERPRETER", PYTHON)
        .env("XDG_CACHE_HOME", work.join("cache"))
        .env("ANSIBLE_NOCOLOR", "1")
        .env("PY_COLORS", "0")
        .env_remove("PYTHONPATH")
        .env_remove("ANSIBLE_CONFIG");
        cmd
    }
}

/// FNV-1a, enough to tell versions of the requirements file apart in a folder name.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The venv for the current requirements file, built when it is missing or incomplete.
pub fn venv() -> anyhow::Result<Ansible> {
    let requirements_path = root().join(DIR).join("requirements.txt");
    let requirements = std::fs::read_to_string(&requirements_path)
        .with_context(|| format!("reading {}", requirements_path.display()))?;
    // The interpreter's version is part of the key: a venv belongs to one Python.
    let python = output(Command::new(PYTHON).arg("--version"))
        .with_context(|| format!("{PYTHON} (Debian's python3) is needed for Ansible"))?;
    let key = fnv1a(format!("{}\n{requirements}", python.trim()).as_bytes());
    let cache = setup::cache_dir();
    let venv = cache.join(format!("ansible-venv-{key:016x}"));
    let ansible = Ansible { venv: venv.clone() };
    let marker = venv.join(MARKER);
    if std::fs::read_to_string(&marker).is_ok_and(|m| m == requirements) {
        println!("    cached at {}", venv.display());
        return Ok(ansible);
    }
    // `python3 -m venv` needs Debian's python3-venv (ensurepip).
    setup::apt_install(&["python3-venv"])?;
    if venv.exists() {
        std::fs::remove_dir_all(&venv)
            .with_context(|| format!("removing the incomplete {}", venv.display()))?;
    }
    remove_stale_venvs(&cache, &venv);
    println!(
        "    building {} from {} ({}; once per machine)",
        venv.display(),
        requirements_path.display(),
        python.trim()
    );
    run_cmd(Command::new(PYTHON).args(["-m", "venv"]).arg(&venv))?;
    let pip = || {
        let mut cmd = Command::new(venv.join("bin/python"));
        cmd.args(["-m", "pip", "--disable-pip-version-check", "--no-input"]);
        cmd
    };
    // Exactly the pinned set: --no-deps, and `pip check` proves it is complete and consistent.
    run_cmd(
        pip()
            .args(["install", "--quiet", "--no-deps", "-r"])
            .arg(&requirements_path),
    )
    .context("installing the pinned Ansible from PyPI")?;
    run_cmd(pip().arg("check")).context(
        "packaging/ansible/requirements.txt misses a dependency or pins incompatible versions",
    )?;
    std::fs::write(&marker, &requirements)?;
    Ok(ansible)
}

/// Venvs built from earlier versions of the requirements file.
fn remove_stale_venvs(cache: &Path, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(cache) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let ours = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with("ansible-venv-"));
        if ours && path != keep {
            println!("    removing the old {}", path.display());
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

/// ansible-lint (production profile, `--strict`) and `--syntax-check` of the playbooks.
pub fn lint() -> anyhow::Result<()> {
    let ansible = step(
        "setup: Ansible venv (packaging/ansible/requirements.txt)",
        venv,
    )?;
    let dir = root().join(DIR);
    for sub in ["home", "tmp", "cache"] {
        std::fs::create_dir_all(root().join("target/ansible").join(sub))?;
    }
    step("lint: ansible-playbook --syntax-check", || {
        run_cmd(
            ansible
                .command("ansible-playbook")
                .current_dir(&dir)
                .args(["-i", "inventory.example.yml", "--syntax-check"])
                .args(PLAYBOOKS),
        )
    })?;
    step("lint: ansible-lint (production profile)", || {
        run_cmd(
            ansible
                .command("ansible-lint")
                .current_dir(&dir)
                .args(["--strict", "--offline"]),
        )
        .with_context(|| format!("ansible-lint found problems in {DIR} (listed above)"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_tells_requirement_files_apart() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_ne!(
            fnv1a(b"ansible-core==2.19.14\n"),
            fnv1a(b"ansible-core==2.19.13\n")
        );
    }
}

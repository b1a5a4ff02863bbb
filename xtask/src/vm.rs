//! The cgroup v2 guest of `cargo xtask test`: Debian's stock kernel under qemu (TCG: a KVM
//! guest hangs on these machines), a busybox initramfs that mounts the host's file system
//! read-only over 9p, mounts cgroup2 and runs the privileged test binary there on the tests
//! that touch cgroups and worker privileges. This host is hybrid cgroup v1; the distributions
//! our users run are v2 only, so both are tested for real. Recipe: PLATFORM.md, "A real cgroup
//! v2 kernel".

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::{cargo, output, root, run_cmd, setup};

/// The tests run in the guest: everything that reads or writes pool cgroups or checks what a
/// worker may do (`runtime_` and the network tests need veth/bridge modules the initramfs does
/// not load; the v1 tests have their own host).
pub const GUEST_FILTERS: &[&str] = &["cgroup_v2_", "image_", "workers_", "faults_"];
/// Left out of the host run: they need v2, the guest runs them.
pub const HOST_EXCLUDE: &str = "--exclude=cgroup_v2_";
/// The guest's whole run may take this long (TCG is several times slower than the host).
const GUEST_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// Loaded in this order so that 9p works (the package ships no modules.dep).
const MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "netfs",
    "fscache",
    "9pnet",
    "9pnet_virtio",
    "9p",
];

const INIT: &str = r#"#!/bin/busybox sh
# PID 1 of the cgroup v2 guest (written by xtask/src/vm.rs).
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in MODULES; do insmod /modules/$m.ko || echo "guest: insmod $m failed"; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro host /host || echo "guest: no host share"
mount -t proc proc /host/proc
mount -t sysfs sys /host/sys
mount -t devtmpfs dev /host/dev
mount -t tmpfs tmp /host/tmp
mount -t tmpfs run /host/run
mount -t cgroup2 none /host/sys/fs/cgroup
mkdir -p /host/tmp/out
mount -t 9p -o trans=virtio,version=9p2000.L out /host/tmp/out || echo "guest: no out share"
ip link set lo up
echo "guest: kernel $(uname -r), cgroup controllers: $(cat /host/sys/fs/cgroup/cgroup.controllers)"
chroot /host /bin/sh /tmp/out/run.sh > /host/tmp/out/log 2>&1
echo "exit $?" >> /host/tmp/out/log
sync
echo o > /proc/sysrq-trigger
sleep 10
"#;

/// Where the kernel package is unpacked; kept between runs.
fn cache_dir() -> PathBuf {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cargo/drop-cache/vm-kernel")
}

/// The newest `linux-image-6.1.0-N-amd64` apt knows, unpacked into the cache: (vmlinuz, modules dir).
fn kernel() -> anyhow::Result<(PathBuf, PathBuf)> {
    let dir = cache_dir();
    let unpacked = dir.join("root");
    if let Some(found) = find_kernel(&unpacked) {
        return Ok(found);
    }
    let list = output(Command::new("apt-cache").args([
        "search",
        "--names-only",
        r"^linux-image-6\.1\.0-[0-9]+-amd64$",
    ]))?;
    let mut names: Vec<(u32, String)> = list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|n| {
            let abi = n
                .strip_prefix("linux-image-6.1.0-")?
                .strip_suffix("-amd64")?;
            Some((abi.parse().ok()?, n.to_string()))
        })
        .collect();
    names.sort();
    let (_, package) = names
        .pop()
        .context("apt knows no linux-image-6.1.0-N-amd64 (Debian 12's kernel)")?;
    std::fs::create_dir_all(&dir)?;
    run_cmd(
        Command::new("apt-get")
            .arg("download")
            .arg(&package)
            .current_dir(&dir),
    )?;
    let deb = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
    run_cmd(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    let _ = std::fs::remove_file(&deb);
    find_kernel(&unpacked).context("the kernel package holds no vmlinuz")
}

fn find_kernel(unpacked: &Path) -> Option<(PathBuf, PathBuf)> {
    let vmlinuz = std::fs::read_dir(unpacked.join("boot"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })?;
    let modules = std::fs::read_dir(unpacked.join("lib/modules"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .next()?;
    Some((vmlinuz, modules))
}

fn find_module(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = find_module(&path, name) {
                return Some(found);
            }
        } else if path
            .file_name()
            .is_some_and(|n| *n == *format!("{name}.ko"))
        {
            return Some(path);
        }
    }
    None
}

/// Writes `target/vm/initramfs.gz`: busybox, the 9p modules and the init above.
fn initramfs(modules: &Path, work: &Path) -> anyhow::Result<PathBuf> {
    let tree = work.join("initramfs");
    let _ = std::fs::remove_dir_all(&tree);
    for d in ["bin", "proc", "sys", "dev", "modules", "host"] {
        std::fs::create_dir_all(tree.join(d))?;
    }
    std::fs::copy("/bin/busybox", tree.join("bin/busybox")).context("copying /bin/busybox")?;
    for m in MODULES {
        let path = find_module(modules, m)
            .with_context(|| format!("module {m} not in the kernel package"))?;
        std::fs::copy(&path, tree.join("modules").join(format!("{m}.ko")))?;
    }
    let init = tree.join("init");
    std::fs::write(&init, INIT.replace("MODULES", &MODULES.join(" ")))?;
    std::fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let image = work.join("initramfs.gz");
    let status = Command::new("sh")
        .arg("-c")
        .arg("find . | busybox cpio -o -H newc 2>/dev/null | gzip -1 > \"$1\"")
        .arg("sh")
        .arg(&image)
        .current_dir(&tree)
        .status()?;
    if !status.success() {
        bail!("building the initramfs failed ({status})");
    }
    Ok(image)
}

/// The privileged test binary (built if needed).
fn privileged_binary() -> anyhow::Result<PathBuf> {
    let out = output(cargo().args([
        "test",
        "--locked",
        "-p",
        "drop-tests",
        "--test",
        "privileged",
        "--no-run",
        "--message-format=json",
    ]))?;
    out.lines()
        .filter(|l| l.contains("\"compiler-artifact\"") && l.contains("\"privileged\""))
        .find_map(|l| {
            let start = l.find("\"executable\":\"")? + 14;
            let end = l[start..].find('"')? + start;
            Some(PathBuf::from(&l[start..end]))
        })
        .context("cannot find the privileged test binary in cargo's output")
}

/// What the guest printed: its lines (the test binary's output, then `exit N`).
pub fn run(strict: bool) -> anyhow::Result<Vec<String>> {
    setup::apt_install(&["qemu-system-x86", "busybox-static"])?;
    let (vmlinuz, modules) = kernel()?;
    let work = root().join("target/vm");
    std::fs::create_dir_all(&work)?;
    let image = initramfs(&modules, &work)?;
    let bin = privileged_binary()?;
    let out = work.join("out");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    let script = format!(
        "cd {root}\nexport DROP_BIN_DIR={root}/target/debug\n{strict}exec {bin} {filters}\n",
        root = root().display(),
        strict = if strict {
            "export DROP_TEST_STRICT=1\n"
        } else {
            ""
        },
        bin = bin.display(),
        filters = GUEST_FILTERS.join(" "),
    );
    std::fs::write(out.join("run.sh"), script)?;
    let started = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-m",
            "2048",
            "-smp",
            "2",
            "-nographic",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&vmlinuz)
        .arg("-initrd")
        .arg(&image)
        .args(["-append", "console=ttyS0,115200 panic=-1 quiet"])
        .args([
            "-virtfs",
            "local,path=/,mount_tag=host,security_model=passthrough,readonly=on,multidevs=remap",
        ])
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag=out,security_model=passthrough",
            out.display()
        ))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(work.join("console.log"))?)
        .stderr(Stdio::null())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                bail!(
                    "qemu exited with {status}; see {}",
                    work.join("console.log").display()
                );
            }
            break;
        }
        if started.elapsed() > GUEST_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the guest did not power off within {GUEST_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = std::fs::read_to_string(out.join("log")).with_context(|| {
        format!(
            "the guest wrote no log; see {}",
            work.join("console.log").display()
        )
    })?;
    println!("    guest ran {:.0} s", started.elapsed().as_secs_f64());
    Ok(log.lines().map(str::to_string).collect())
}

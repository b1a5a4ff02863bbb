//! The container view of a worker with an `image` (DESIGN §4): a private mount namespace in which
//! the image's bundle directory appears at `/home/drop` (the working directory) and the rest of
//! the host file system is read-only, so `cmd: ./validator` works as it did inside DROP's docker
//! containers.
//!
//! [`ImageMount::new`] checks and prepares everything in the daemon (all allocation happens
//! there); [`ImageMount::enter`] runs in the forked child between fork and exec and makes only
//! raw system calls on that data. Roughly what the child does, in shell terms:
//!
//! ```text
//! unshare --mount                                  # a mount namespace of its own
//! mount --make-rprivate /                          # nothing propagates back to the host
//! open_tree(bundle, OPEN_TREE_CLONE|AT_RECURSIVE)  # a detached copy of the bundle mount
//! mount -t tmpfs -o mode=755,size=1m drop-home /home && mkdir /home/drop
//! move_mount(bundle copy → /home/drop)
//! mount -t tmpfs -o mode=1777,size=64m drop-tmp /tmp       # and /dev/shm, like docker
//! mount -o remount,bind,ro --recursive /           # mount_setattr(AT_RECURSIVE, RDONLY)
//! (and nosuid,nodev on /home/drop)
//! (clear RDONLY again on /tmp and /dev/shm only)
//! cd /home/drop
//! ```
//!
//! Decisions:
//! - **The bundle is read-only** like the rest of the host: an image is shared by every worker
//!   of every pool that names it, so one worker must not change what the next one runs.
//!   Functions write to `/tmp` (a private tmpfs per worker, mode 1777, 64 MiB by default,
//!   charged to the pool's memory cgroup) or `/dev/shm` (the same, as docker gives).
//! - **`/home` is always a fresh tmpfs** holding only `drop`, whether or not the host has a
//!   `/home/drop`: the view does not depend on the host, nothing is ever created on the host, and
//!   other users' homes are hidden as they were inside a container. (The bundle is cloned with
//!   `open_tree` before `/home` and `/tmp` are covered, so an images folder below either works.)
//! - The bind keeps the bundle's own owners and modes; imported bundles are world-readable
//!   (`images::import` preserves modes), so a worker that drops to an unprivileged user after
//!   [`ImageMount::enter`] can still read and execute its files.
//! - Needs Linux ≥ 5.12 (`mount_setattr`); checked once in [`ImageMount::new`].

use std::ffi::{CStr, CString};
use std::io;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

use crate::runtime::images::ImageError;

/// Where the bundle appears inside the worker's mount namespace.
pub const MOUNT_POINT: &str = "/home/drop";
/// Size of the private `/tmp` (and `/dev/shm`) unless [`ImageMount::with_tmp_size_mib`] says.
pub const DEFAULT_TMP_MIB: u32 = 64;

// From <linux/mount.h>; the libc crate defines these for Android only.
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
/// CAP_SYS_ADMIN, needed for `unshare(CLONE_NEWNS)` and every mount below.
const CAP_SYS_ADMIN: u32 = 21;

/// `struct mount_attr` from <linux/mount.h> (MOUNT_ATTR_SIZE_VER0 = 32 bytes).
#[repr(C)]
#[derive(Debug, Default)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Prepared before fork (all allocation happens here), consumed in the child by [`Self::enter`].
#[derive(Debug, Clone)]
pub struct ImageMount {
    /// The bundle directory on the host (absolute).
    bundle: CString,
    /// The working directory inside the namespace (default `/home/drop`).
    workdir: CString,
    /// tmpfs options for `/tmp` and `/dev/shm` (`mode=1777,size=<n>m`).
    tmp_options: CString,
    /// Whether the host has a `/dev/shm` to cover with a private tmpfs.
    dev_shm: bool,
    /// For messages and [`Self::bundle`].
    bundle_path: PathBuf,
}

impl ImageMount {
    /// Checks that `bundle` is an existing directory given by an absolute path, that the host
    /// has `/home` and `/tmp` to mount over, that this process may create mount namespaces and
    /// that the kernel has `mount_setattr` (Linux ≥ 5.12).
    pub fn new(bundle: &Path) -> Result<ImageMount, ImageError> {
        if !bundle.is_absolute() {
            return Err(ImageError::NotAbsolute(bundle.to_path_buf()));
        }
        match std::fs::metadata(bundle) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(ImageError::NotADirectory(bundle.to_path_buf())),
            Err(source) => {
                return Err(ImageError::Io {
                    action: "reading the bundle",
                    path: bundle.to_path_buf(),
                    source,
                });
            }
        }
        for needed in ["/home", "/tmp"] {
            if !Path::new(needed).is_dir() {
                return Err(ImageError::Unsupported(format!(
                    "the host has no {needed} directory to mount over"
                )));
            }
        }
        if !has_sys_admin() {
            return Err(ImageError::Unsupported(
                "a private mount namespace needs CAP_SYS_ADMIN (run the supervisor as root)".into(),
            ));
        }
        if !kernel_has_mount_setattr() {
            return Err(ImageError::Unsupported(
                "the kernel lacks mount_setattr(2) (Linux 5.12 or later is needed)".into(),
            ));
        }
        Ok(ImageMount {
            bundle: cstring(bundle)?,
            workdir: cstring(Path::new(MOUNT_POINT))?,
            tmp_options: tmp_options(DEFAULT_TMP_MIB),
            dev_shm: Path::new("/dev/shm").is_dir(),
            bundle_path: bundle.to_path_buf(),
        })
    }

    /// The working directory inside the namespace: absolute, or relative to `/home/drop`
    /// (a pool's `cwd`). It must exist in the worker's view, else the worker fails to start.
    pub fn with_workdir(mut self, dir: &Path) -> Result<ImageMount, ImageError> {
        self.workdir = cstring(&Path::new(MOUNT_POINT).join(dir))?;
        Ok(self)
    }

    /// Size of the private `/tmp` and `/dev/shm` in MiB (each; tmpfs pages are charged to the
    /// memory cgroup of the worker that writes them).
    pub fn with_tmp_size_mib(mut self, mib: u32) -> ImageMount {
        self.tmp_options = tmp_options(mib.max(1));
        self
    }

    /// The bundle directory on the host.
    pub fn bundle(&self) -> &Path {
        &self.bundle_path
    }

    /// Builds the view; in the child (`pre_exec`), as a process with CAP_SYS_ADMIN.
    ///
    /// Call it after the child wrote itself into its cgroups (those files become read-only
    /// here) and before it drops privileges. It also changes the working directory, so a
    /// `Command::current_dir` set by the caller is overridden (use [`Self::with_workdir`]).
    /// Only raw system calls on pre-built data: no allocation, no locks. On failure the errno
    /// is all that reaches the parent (std passes only that through its exec pipe).
    pub fn enter(&self) -> io::Result<()> {
        let null = std::ptr::null::<libc::c_char>();
        // SAFETY: unshare with a flag; affects only this (single-threaded, forked) process.
        check(unsafe { libc::unshare(libc::CLONE_NEWNS) })?;
        // `mount --make-rprivate /`: from here on no mount event reaches the host's namespace.
        // SAFETY: valid NUL-terminated strings or null, as mount(2) allows for a propagation change.
        check(unsafe {
            libc::mount(
                null,
                c"/".as_ptr(),
                null,
                libc::MS_REC | libc::MS_PRIVATE,
                null.cast(),
            )
        })?;
        // A detached recursive copy of the bundle, taken before /home and /tmp are covered.
        // SAFETY: raw syscall with a valid path string; returns a new descriptor or -1.
        let tree = unsafe {
            libc::syscall(
                libc::SYS_open_tree,
                libc::AT_FDCWD,
                self.bundle.as_ptr(),
                OPEN_TREE_CLONE
                    | libc::O_CLOEXEC as libc::c_uint
                    | libc::AT_RECURSIVE as libc::c_uint,
            )
        };
        if tree < 0 {
            return Err(io::Error::last_os_error());
        }
        // open_tree returns an int descriptor; the syscall wrapper widens it to c_long.
        let tree = tree as libc::c_int;
        let attached = attach(tree);
        // SAFETY: closes the descriptor opened above (the mount stays where it was moved).
        unsafe { libc::close(tree) };
        attached?;
        mount_tmpfs(c"/tmp", &self.tmp_options)?;
        if self.dev_shm {
            mount_tmpfs(c"/dev/shm", &self.tmp_options)?;
        }
        // `mount -o remount,bind,ro` on every mount of the tree, atomically.
        set_attr(c"/", libc::AT_RECURSIVE, MOUNT_ATTR_RDONLY, 0)?;
        // The bundle is data from an import: no device nodes or set-uid programs act from it.
        set_attr(
            c"/home/drop",
            libc::AT_RECURSIVE,
            MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
            0,
        )?;
        set_attr(c"/tmp", 0, 0, MOUNT_ATTR_RDONLY)?;
        if self.dev_shm {
            set_attr(c"/dev/shm", 0, 0, MOUNT_ATTR_RDONLY)?;
        }
        // SAFETY: a valid NUL-terminated path.
        check(unsafe { libc::chdir(self.workdir.as_ptr()) })
    }
}

/// A fresh tmpfs on /home with an empty `drop` in it, and the bundle copy moved onto that.
fn attach(tree: libc::c_int) -> io::Result<()> {
    // SAFETY: valid NUL-terminated strings.
    check(unsafe {
        libc::mount(
            c"drop-home".as_ptr(),
            c"/home".as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            c"mode=755,size=1m,nr_inodes=64".as_ptr().cast(),
        )
    })?;
    // SAFETY: a valid NUL-terminated path.
    check(unsafe { libc::mkdir(c"/home/drop".as_ptr(), 0o755) })?;
    // SAFETY: raw syscall with a descriptor we own and valid NUL-terminated strings
    // (the empty source path together with MOVE_MOUNT_F_EMPTY_PATH means "the descriptor").
    check_long(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree,
            c"".as_ptr(),
            libc::AT_FDCWD,
            c"/home/drop".as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    })
}

/// A private tmpfs at `target` (nosuid, nodev), as docker mounts /dev/shm.
fn mount_tmpfs(target: &CStr, options: &CStr) -> io::Result<()> {
    // SAFETY: valid NUL-terminated strings.
    check(unsafe {
        libc::mount(
            c"drop-tmp".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            options.as_ptr().cast(),
        )
    })
}

/// `mount_setattr(AT_FDCWD, path, flags, {set, clr})`.
fn set_attr(path: &CStr, flags: libc::c_int, set: u64, clr: u64) -> io::Result<()> {
    let attr = MountAttr {
        attr_set: set,
        attr_clr: clr,
        ..MountAttr::default()
    };
    // SAFETY: raw syscall; `attr` is a valid struct mount_attr of the size passed, alive for
    // the call, and `path` a valid NUL-terminated string.
    check_long(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            flags as libc::c_uint,
            &raw const attr,
            size_of::<MountAttr>(),
        )
    })
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn check_long(rc: libc::c_long) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn cstring(path: &Path) -> Result<CString, ImageError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| ImageError::Nul(path.to_path_buf()))
}

fn tmp_options(mib: u32) -> CString {
    CString::new(format!("mode=1777,size={mib}m")).expect("no NUL in a formatted number")
}

/// Whether the effective capability set holds CAP_SYS_ADMIN (`CapEff` in /proc/self/status).
fn has_sys_admin() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let hex = status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))?
                .trim()
                .to_owned();
            u64::from_str_radix(&hex, 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_ADMIN) != 0)
}

/// Probes `mount_setattr` with a too-small attribute size: EINVAL when the call exists,
/// ENOSYS when it does not. Changes nothing.
fn kernel_has_mount_setattr() -> bool {
    // SAFETY: the kernel rejects the size (0) before it reads either pointer.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            c"/".as_ptr(),
            0,
            std::ptr::null::<MountAttr>(),
            0usize,
        )
    };
    rc == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ENOSYS)
}

#[cfg(test)]
mod tests {
    //! What needs no root. The view itself (namespace, mounts, workdir, credentials) is tested
    //! as root by the privileged suite: `tests/privileged/images.rs` and `workers.rs`.

    use super::*;

    #[test]
    fn new_refuses_relative_and_missing_bundles() {
        assert!(matches!(
            ImageMount::new(Path::new("rel/dir")),
            Err(ImageError::NotAbsolute(_))
        ));
        let dir = tempfile::tempdir().expect("temp dir");
        let missing = dir.path().join("missing");
        assert!(matches!(
            ImageMount::new(&missing),
            Err(ImageError::Io { .. })
        ));
        let file = dir.path().join("file");
        std::fs::write(&file, "x").expect("write");
        assert!(matches!(
            ImageMount::new(&file),
            Err(ImageError::NotADirectory(_))
        ));
    }
}

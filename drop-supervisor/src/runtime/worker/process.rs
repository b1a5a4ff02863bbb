//! Starting one worker process: argv (no shell), pipes for stdin/stdout, stderr to the pool's
//! log, and — between fork and exec, before any user code runs — a session of its own, placement
//! into the pool's cgroups, the image view, the worker's user with exactly its one group, every
//! capability gone (bounding, ambient, inheritable, permitted, effective) and `no_new_privs`.
//!
//! The order inside the child matters: the cgroup files belong to root, so the child writes
//! itself into them before it drops to the worker's user. (std's `Command::uid` would drop
//! privileges before `pre_exec` runs, so user and group are set here by hand.)

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

/// PATH given to workers unless their flow sets one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("empty argv")]
    EmptyArgv,
    #[error("argument or environment holds a NUL byte: {0:?}")]
    Nul(String),
    #[error("cannot create a pipe")]
    Pipe(#[source] std::io::Error),
    #[error("cannot start {program}: {source}")]
    Exec {
        program: String,
        #[source]
        source: std::io::Error,
    },
    /// A bare program name that no directory of the worker's PATH holds.
    #[error(
        "`{program}` was not found in the worker's PATH ({path}): give its full path in `cmd`, \
         install it, or set PATH in the pool's `env`"
    )]
    NotFound { program: String, path: String },
}

/// Who a worker runs as; resolved from names when the pool is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
}

/// Everything needed to start one worker.
#[derive(Debug, Clone)]
pub struct Launch {
    pub argv: Vec<String>,
    /// Complete environment of the worker (nothing is inherited from the daemon).
    pub env: BTreeMap<String, String>,
    pub cwd: Option<PathBuf>,
    pub credentials: Option<Credentials>,
    /// `cgroup.procs` files the child writes `0` into before exec (one per hierarchy).
    pub cgroup_procs: Vec<PathBuf>,
    /// The function's bundle, mounted at `/home/drop` in a private mount namespace with the
    /// rest of the host read-only (the working directory then is `/home/drop`).
    pub image: Option<super::image::ImageMount>,
}

/// A started worker: its pid, the parent's ends of stdin/stdout (blocking files, used directly
/// by the calling thread), and the process handle to wait on.
#[derive(Debug)]
pub struct Started {
    pub pid: u32,
    pub stdin: File,
    pub stdout: File,
    pub child: tokio::process::Child,
}

fn cstring(s: &[u8]) -> Result<CString, SpawnError> {
    CString::new(s).map_err(|_| SpawnError::Nul(String::from_utf8_lossy(s).into_owned()))
}

fn pipe() -> Result<(OwnedFd, OwnedFd), SpawnError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| SpawnError::Pipe(e.into()))
}

/// The base environment of a worker: PATH and LANG, the pool's own variables on top, and who
/// it is (`DROP_POOL`, `DROP_WORKER`).
pub fn environment(
    pool: &str,
    worker: u64,
    own: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    env.insert("PATH".to_string(), DEFAULT_PATH.to_string());
    env.insert("LANG".to_string(), "C.UTF-8".to_string());
    env.extend(own.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.insert("DROP_POOL".to_string(), pool.to_string());
    env.insert("DROP_WORKER".to_string(), worker.to_string());
    env
}

/// Starts a worker. `stderr` receives its standard error (the write end of the log pipe).
/// Must be called inside a tokio runtime (the child is reaped by it).
pub fn spawn(launch: &Launch, stderr: OwnedFd) -> Result<Started, SpawnError> {
    let program = launch.argv.first().ok_or(SpawnError::EmptyArgv)?;
    for part in launch
        .argv
        .iter()
        .chain(launch.env.keys())
        .chain(launch.env.values())
    {
        if part.as_bytes().contains(&0) {
            return Err(SpawnError::Nul(part.clone()));
        }
    }
    let procs: Vec<CString> = launch
        .cgroup_procs
        .iter()
        .map(|p| cstring(p.as_os_str().as_bytes()))
        .collect::<Result<_, _>>()?;
    let (child_stdin, parent_stdin) = pipe()?;
    let (parent_stdout, child_stdout) = pipe()?;

    let mut cmd = tokio::process::Command::new(program);
    cmd.args(&launch.argv[1..])
        .env_clear()
        .envs(&launch.env)
        .stdin(Stdio::from(child_stdin))
        .stdout(Stdio::from(child_stdout))
        .stderr(Stdio::from(stderr))
        .kill_on_drop(true);
    if let Some(cwd) = &launch.cwd
        && launch.image.is_none()
    {
        cmd.current_dir(cwd);
    }
    let credentials = launch.credentials;
    let image = launch.image.clone();
    // SAFETY: the closure runs in the forked child before exec and only makes raw system calls
    // (setsid, open, write, close, unshare, mount, mount_setattr, chdir, prctl, setgroups,
    // setgid, setuid, capset) on data prepared before the fork; it allocates nothing and takes
    // no locks.
    unsafe {
        cmd.pre_exec(move || child_setup(&procs, image.as_ref(), credentials));
    }
    let child = cmd.spawn().map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound && !program.contains('/') {
            SpawnError::NotFound {
                program: program.clone(),
                path: launch.env.get("PATH").cloned().unwrap_or_default(),
            }
        } else {
            SpawnError::Exec {
                program: program.clone(),
                source,
            }
        }
    })?;
    let pid = child.id().unwrap_or(0);
    Ok(Started {
        pid,
        stdin: File::from(parent_stdin),
        stdout: File::from(parent_stdout),
        child,
    })
}

/// Runs in the child between fork and exec. Async-signal-safe system calls only.
fn child_setup(
    procs: &[CString],
    image: Option<&super::image::ImageMount>,
    credentials: Option<Credentials>,
) -> std::io::Result<()> {
    use std::io::Error;
    // A session (and process group) of its own: a timeout kills the whole group.
    // SAFETY: setsid has no memory-safety preconditions.
    if unsafe { libc::setsid() } < 0 {
        return Err(Error::last_os_error());
    }
    for path in procs {
        // SAFETY: `path` is a valid NUL-terminated string that outlives the call.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(Error::last_os_error());
        }
        // "0" moves the writing process itself.
        // SAFETY: writes one byte from a static buffer to a descriptor we own.
        let written = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
        let err = Error::last_os_error();
        // SAFETY: closes the descriptor opened above.
        unsafe { libc::close(fd) };
        if written != 1 {
            return Err(err);
        }
    }
    // Still root here: the mount namespace needs CAP_SYS_ADMIN.
    if let Some(image) = image {
        image.enter()?;
    }
    // The bounding set first, while CAP_SETPCAP is still ours: nothing the worker runs can
    // regain a capability through a file capability or a setuid binary (`no_new_privs` below
    // closes the latter too). The loop ends at the first number the kernel does not know.
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } < 0 {
            match Error::last_os_error().raw_os_error() {
                Some(libc::EINVAL) => break,
                // A daemon run as a plain user has nothing to drop. A root daemon without
                // CAP_SETPCAP (a unit that left it out) would start workers that keep the
                // bounding set: refuse instead.
                // SAFETY: geteuid has no preconditions.
                Some(libc::EPERM) if unsafe { libc::geteuid() } != 0 => break,
                _ => return Err(Error::last_os_error()),
            }
        }
    }
    // SAFETY: prctl with integer arguments.
    if unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    } < 0
    {
        return Err(Error::last_os_error());
    }
    if let Some(c) = credentials {
        // Exactly the worker's group: nothing inherited from the daemon's supplementary groups.
        let groups = [c.gid];
        // SAFETY: a one-element array that outlives the call.
        if unsafe { libc::setgroups(1, groups.as_ptr()) } < 0 {
            return Err(Error::last_os_error());
        }
        // SAFETY: plain system calls on integers.
        if unsafe { libc::setgid(c.gid) } < 0 || unsafe { libc::setuid(c.uid) } < 0 {
            return Err(Error::last_os_error());
        }
    }
    // Empty permitted, effective and inheritable sets: setuid to a non-root user clears the
    // first two but not the inheritable one, and a root worker (where the node allows them)
    // keeps uid 0 without any capability.
    drop_all_capabilities()?;
    // No privilege gain through setuid binaries or file capabilities, for the worker and all it runs.
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } < 0 {
        return Err(Error::last_os_error());
    }
    Ok(())
}

/// `capset(2)` with every set empty (`capsh --drop=all`). Async-signal-safe.
fn drop_all_capabilities() -> std::io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    // Version 3 takes two of these: capabilities 0–31 and 32–63.
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: both pointers are valid for the call and laid out as the kernel's
    // `__user_cap_header_struct` and two `__user_cap_data_struct`s.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Bytes readable on `file` without blocking (`ioctl(FIONREAD)`).
pub fn readable_bytes(file: &File) -> std::io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer, which is valid for the call.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::FIONREAD, &mut n) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(usize::try_from(n).unwrap_or(0))
}

/// SIGKILL to the worker's whole process group (it leads its own session).
pub fn kill_group(pid: u32) {
    if let Ok(pid) = i32::try_from(pid)
        && pid > 0
    {
        // SAFETY: kill with a negative pid signals that process group; no memory involved.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
    }
}

/// Resolves user and group names to ids. The group defaults to the user's primary group.
pub fn resolve_credentials(
    user: Option<&str>,
    group: Option<&str>,
) -> Result<Option<Credentials>, String> {
    if user.is_none() && group.is_none() {
        return Ok(None);
    }
    let u = match user {
        Some(name) => Some(
            nix::unistd::User::from_name(name)
                .map_err(|e| format!("looking up user {name}: {e}"))?
                .ok_or_else(|| format!("no such user: {name}"))?,
        ),
        None => None,
    };
    let gid = match group {
        Some(name) => {
            nix::unistd::Group::from_name(name)
                .map_err(|e| format!("looking up group {name}: {e}"))?
                .ok_or_else(|| format!("no such group: {name}"))?
                .gid
        }
        None => u
            .as_ref()
            .map(|u| u.gid)
            .unwrap_or_else(nix::unistd::getgid),
    };
    let uid = u.map(|u| u.uid).unwrap_or_else(nix::unistd::getuid);
    Ok(Some(Credentials {
        uid: uid.as_raw(),
        gid: gid.as_raw(),
    }))
}

/// Whether `path` exists and is executable by someone (a quick check before spawning).
pub fn looks_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

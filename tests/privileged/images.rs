//! Image bundles, as root: a worker sees its bundle at /home/drop on a read-only host with a
//! private /tmp, its mount namespace leaves nothing behind in the host's, and every example
//! bundle (imported as `dropctl image import` does, from a folder or a tarball) answers DROP's
//! line protocol inside that view as an unprivileged user.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use drop_supervisor::runtime::images::{self, ImageError};
use drop_supervisor::runtime::worker::image::ImageMount;
use drop_tests::{Outcome, Test, paths, require_root, unique_name};

pub const TESTS: &[Test] = &[
    Test {
        name: "image_view_bundle_at_home_drop_host_read_only",
        run: view,
    },
    Test {
        name: "image_namespaces_leave_no_mounts_in_the_host",
        run: no_leak,
    },
    Test {
        name: "image_examples_answer_inside_the_view",
        run: examples,
    },
    Test {
        name: "image_tarball_import_runs_like_a_directory",
        run: tarball,
    },
    Test {
        name: "image_workdir_under_home_drop_tmp_size_and_a_missing_workdir_fails",
        run: workdir,
    },
];

/// uid/gid of `nobody`: workers usually drop to an unprivileged user after entering the view.
const NOBODY: (u32, u32) = (65534, 65534);
/// How long one worker may take to answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

fn mountinfo() -> anyhow::Result<String> {
    std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")
}

/// `Err(skip)` unless root on a kernel with everything an image mount needs.
fn image_mount(bundle: &Path) -> anyhow::Result<Result<ImageMount, Outcome>> {
    if let Some(skip) = require_root() {
        return Ok(Err(skip));
    }
    match ImageMount::new(bundle) {
        Ok(img) => Ok(Ok(img)),
        Err(ImageError::Unsupported(reason)) => Ok(Err(Outcome::Skip(reason))),
        Err(e) => Err(e.into()),
    }
}

/// A worker started inside an image view; killed and reaped on drop (any exit path).
struct Worker {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Worker {
    /// Starts `argv` in the view of `img` with stdin/stdout piped, as `user` after entering.
    fn start(img: &ImageMount, argv: &[&str], user: Option<(u32, u32)>) -> anyhow::Result<Worker> {
        let img = img.clone();
        let mut cmd = Command::new(argv[0]);
        cmd.args(&argv[1..])
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("LANG", "C.UTF-8")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // SAFETY: runs between fork and exec; enter() and the credential calls are raw system
        // calls on data prepared before the fork; nothing allocates or takes a lock.
        unsafe {
            cmd.pre_exec(move || {
                img.enter()?;
                if let Some((uid, gid)) = user {
                    let groups = [gid];
                    if libc::setgroups(1, groups.as_ptr()) < 0
                        || libc::setgid(gid) < 0
                        || libc::setuid(uid) < 0
                        || libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {argv:?} in the view"))?;
        let stdout = child.stdout.take().context("no stdout pipe")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Worker { child, lines })
    }

    fn send(&mut self, input: &str) -> anyhow::Result<()> {
        let stdin = self.child.stdin.as_mut().context("stdin closed")?;
        stdin.write_all(input.as_bytes())?;
        stdin.flush()?;
        Ok(())
    }

    /// The next `n` lines, each within [`REPLY_TIMEOUT`].
    fn read(&self, n: usize) -> anyhow::Result<Vec<String>> {
        (0..n)
            .map(|i| {
                self.lines
                    .recv_timeout(REPLY_TIMEOUT)
                    .with_context(|| format!("no line {} within {REPLY_TIMEOUT:?}", i + 1))
            })
            .collect()
    }

    /// Sends `input` and returns the `n` lines that come back.
    fn exchange(&mut self, input: &str, n: usize) -> anyhow::Result<Vec<String>> {
        self.send(input)?;
        self.read(n)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `/bin/sh -c script` in the view as root; returns its stdout.
fn shell(img: &ImageMount, script: &str) -> anyhow::Result<String> {
    let mut w = Worker::start(img, &["/bin/sh", "-c", script], None)?;
    drop(w.child.stdin.take());
    let mut out = Vec::new();
    while let Ok(line) = w.lines.recv_timeout(REPLY_TIMEOUT) {
        out.push(line);
    }
    let status = w.child.wait()?;
    ensure!(status.success(), "script failed ({status}): {out:?}");
    Ok(out.join("\n") + "\n")
}

/// A bundle under /tmp (the view covers /tmp, so this also checks the bundle is taken first).
fn scratch_bundle() -> anyhow::Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("hello.txt"), "from the bundle\n")?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    Ok(dir)
}

fn view() -> anyhow::Result<Outcome> {
    let bundle = scratch_bundle()?;
    let img = match image_mount(bundle.path())? {
        Ok(img) => img,
        Err(skip) => return Ok(skip),
    };
    let marker = unique_name("drop-image-");
    let before = mountinfo()?;
    let script = format!(
        r#"
        echo "pwd=$(pwd)"
        echo "read=$(cat hello.txt)"
        for d in /home/drop /etc /usr /var /; do
            err=$( {{ : > "$d/.{marker}"; }} 2>&1 ) && echo "write $d=ok" || echo "write $d=$err"
        done
        echo private > /tmp/{marker} && echo "tmp=$(cat /tmp/{marker})"
        echo "tmpmode=$(stat -c %a /tmp)"
        echo "home=$(ls /home)"
        echo "mount=$(awk '$5 == "/home/drop" {{ print $6 }}' /proc/self/mountinfo)"
        "#
    );
    let out = shell(&img, &script)?;
    ensure!(out.contains("pwd=/home/drop\n"), "working directory: {out}");
    ensure!(out.contains("read=from the bundle\n"), "bundle file: {out}");
    for d in ["/home/drop", "/etc", "/usr", "/var", "/"] {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("write {d}=")))
            .with_context(|| format!("no write line for {d}: {out}"))?;
        ensure!(line.contains("Read-only file system"), "{line}");
    }
    ensure!(out.contains("tmp=private\n"), "/tmp: {out}");
    ensure!(out.contains("tmpmode=1777\n"), "/tmp mode: {out}");
    ensure!(out.contains("home=drop\n"), "/home: {out}");
    let opts = out
        .lines()
        .find_map(|l| l.strip_prefix("mount="))
        .unwrap_or("");
    for opt in ["ro", "nosuid", "nodev"] {
        ensure!(
            opts.split(',').any(|o| o == opt),
            "/home/drop mount options {opts:?} lack {opt}"
        );
    }
    ensure!(
        !Path::new("/tmp").join(&marker).exists(),
        "the private /tmp leaked into the host's"
    );
    ensure!(
        !bundle.path().join(format!(".{marker}")).exists(),
        "the bundle was written"
    );
    ensure!(before == mountinfo()?, "the host mount table changed");
    Ok(Outcome::Pass)
}

fn workdir() -> anyhow::Result<Outcome> {
    let bundle = scratch_bundle()?;
    std::fs::create_dir(bundle.path().join("sub"))?;
    let img = match image_mount(bundle.path())? {
        Ok(img) => img,
        Err(skip) => return Ok(skip),
    };
    // A relative workdir is inside the bundle, an absolute one is taken as it is.
    let out = shell(&img.clone().with_workdir(Path::new("sub"))?, "pwd")?;
    ensure!(out == "/home/drop/sub\n", "relative workdir: {out:?}");
    let out = shell(&img.clone().with_workdir(Path::new("/tmp"))?, "pwd")?;
    ensure!(out == "/tmp\n", "absolute workdir: {out:?}");
    // The private /tmp has the size asked for.
    let out = shell(
        &img.clone().with_tmp_size_mib(8),
        "awk '$5 == \"/tmp\" { print $NF }' /proc/self/mountinfo",
    )?;
    ensure!(out.contains("size=8192k"), "/tmp options: {out:?}");
    // A workdir the bundle does not have fails the spawn itself (before any user code runs).
    let missing = img.with_workdir(Path::new("no-such-dir"))?;
    let mut cmd = Command::new("/bin/true");
    // SAFETY: enter() makes raw system calls only, on data prepared before the fork.
    unsafe {
        cmd.pre_exec(move || missing.enter());
    }
    match cmd.status() {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(Outcome::Pass),
        other => bail!("a missing workdir should fail the spawn with ENOENT, got {other:?}"),
    }
}

fn no_leak() -> anyhow::Result<Outcome> {
    let bundle = scratch_bundle()?;
    let img = match image_mount(bundle.path())? {
        Ok(img) => img,
        Err(skip) => return Ok(skip),
    };
    let host_ns = std::fs::read_link("/proc/self/ns/mnt")?;
    let before = mountinfo()?;
    // Several live workers at once, each in a namespace of its own.
    let mut workers = (0..8)
        .map(|_| Worker::start(&img, &["/bin/cat"], Some(NOBODY)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut seen = Vec::new();
    for w in &mut workers {
        ensure!(w.exchange("ping\n", 1)? == ["ping"], "cat did not answer");
        let pid = w.child.id();
        let ns = std::fs::read_link(format!("/proc/{pid}/ns/mnt"))?;
        ensure!(
            ns != host_ns,
            "worker {pid} shares the host's mount namespace"
        );
        ensure!(!seen.contains(&ns), "two workers share a mount namespace");
        seen.push(ns);
        let theirs = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))?;
        ensure!(
            theirs
                .lines()
                .any(|l| l.split(' ').nth(4) == Some("/home/drop")),
            "worker {pid} has no /home/drop mount"
        );
    }
    ensure!(
        before == mountinfo()?,
        "the host mount table changed while workers ran"
    );
    ensure!(
        !before
            .lines()
            .any(|l| l.split(' ').nth(4) == Some("/home/drop")),
        "/home/drop is mounted in the host"
    );
    drop(workers);
    ensure!(
        before == mountinfo()?,
        "the host mount table changed after the workers exited"
    );
    ensure!(host_ns == std::fs::read_link("/proc/self/ns/mnt")?);
    Ok(Outcome::Pass)
}

/// One function of an example bundle and what it must answer.
struct Case {
    image: &'static str,
    argv: &'static [&'static str],
    input: &'static str,
    expect: &'static [&'static str],
}

const CASES: &[Case] = &[
    Case {
        image: "pyecho:0.1.0",
        argv: &["/usr/bin/python3", "echo.py"],
        input: "a\tncm\tb\nhello\n",
        expect: &["a\tncm\tb", "hello"],
    },
    Case {
        image: "bashecho:0.1.0",
        argv: &["/bin/bash", "echo.sh"],
        input: "a\tncm\tb\n  spaced  \n",
        expect: &["a\tncm\tb", "  spaced  "],
    },
    Case {
        image: "pingpong:0.1.0",
        argv: &["/usr/bin/python3", "ping.py"],
        input: "start\npong 1\npong 5\ngame over after 5 rounds\n",
        expect: &["ping 1", "ping 2", "game over after 5 rounds", ""],
    },
    Case {
        image: "pingpong:0.1.0",
        argv: &["/usr/bin/python3", "pong.py"],
        input: "ping 3\ngame over after 5 rounds\n",
        expect: &["pong 3", ""],
    },
    Case {
        image: "pipeline:0.1.0",
        argv: &["./validator"],
        input: "{\"id\":1}\noops\n",
        expect: &["tag:valid {\"id\":1}", "tag:invalid oops"],
    },
    Case {
        image: "pipeline:0.1.0",
        argv: &["./store"],
        input: "tag:valid {\"id\":1}\ntag:valid {\"id\":2}\n",
        expect: &[
            "stored {\"id\":1} (1 so far)",
            "stored {\"id\":2} (2 so far)",
        ],
    },
    Case {
        image: "pipeline:0.1.0",
        argv: &["./report"],
        input: "tag:invalid oops\n",
        expect: &["rejected oops"],
    },
];

fn import_examples(images_dir: &Path) -> anyhow::Result<()> {
    let source = paths::workspace_root().join("examples/images");
    for entry in std::fs::read_dir(&source).with_context(|| format!("{}", source.display()))? {
        let entry = entry?;
        if !entry.file_type()?.is_dir() {
            continue;
        }
        let name = entry
            .file_name()
            .into_string()
            .map_err(|n| anyhow::anyhow!("{n:?}"))?;
        images::import(images_dir, &name, &entry.path(), false)
            .with_context(|| format!("importing {name}"))?;
    }
    Ok(())
}

fn examples() -> anyhow::Result<Outcome> {
    let store = tempfile::tempdir()?;
    let images_dir = store.path().join("images");
    import_examples(&images_dir)?;
    let probe = images::resolve(&images_dir, "pyecho:0.1.0")?;
    if let Err(skip) = image_mount(&probe)? {
        return Ok(skip);
    }
    if !Path::new("/usr/bin/python3").is_file() || !Path::new("/bin/bash").is_file() {
        return Ok(Outcome::Skip(
            "the examples need /usr/bin/python3 and /bin/bash".into(),
        ));
    }
    let mount = |image: &str| -> anyhow::Result<ImageMount> {
        Ok(ImageMount::new(&images::resolve(&images_dir, image)?)?)
    };

    for case in CASES {
        let mut w = Worker::start(&mount(case.image)?, case.argv, Some(NOBODY))?;
        let got = w
            .exchange(case.input, case.expect.len())
            .with_context(|| format!("{} {:?}", case.image, case.argv))?;
        ensure!(
            got == case.expect,
            "{} {:?}: expected {:?}, got {got:?}",
            case.image,
            case.argv,
            case.expect
        );
    }

    // async: every id answered once, in whatever order.
    let mut w = Worker::start(
        &mount("asyncpy:0.1.0")?,
        &["/usr/bin/python3", "slow.py"],
        Some(NOBODY),
    )?;
    let mut got = w.exchange("1::a\n2::b\n3::c\n4::d::e\n", 4)?;
    got.sort();
    let ids: Vec<&str> = got
        .iter()
        .map(|l| l.split_once(" after ").map_or(l.as_str(), |(head, _)| head))
        .collect();
    ensure!(
        ids == ["1::a", "2::b", "3::c", "4::d::e"],
        "async replies {got:?}"
    );

    // stream: ticks about a second apart, then the subscriber that logs them.
    let ticker = mount("ticker:0.1.0")?;
    let w = Worker::start(&ticker, &["/usr/bin/python3", "ticker.py"], Some(NOBODY))?;
    let started = Instant::now();
    let ticks = w.read(2)?;
    ensure!(
        ticks[0].starts_with("tick 1 ") && ticks[1].starts_with("tick 2 "),
        "ticks {ticks:?}"
    );
    ensure!(
        started.elapsed() >= Duration::from_millis(800),
        "two ticks within {:?}",
        started.elapsed()
    );
    let mut log = Worker::start(&ticker, &["/usr/bin/python3", "log.py"], Some(NOBODY))?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    let got = log.exchange(&format!("tick 7 {}\n", now.as_secs()), 1)?;
    ensure!(got == ["logged tick 7"], "log.py answered {got:?}");
    Ok(Outcome::Pass)
}

fn tarball() -> anyhow::Result<Outcome> {
    let store = tempfile::tempdir()?;
    let source = paths::workspace_root().join("examples/images/pyecho:0.1.0");
    let archive: PathBuf = store.path().join("pyecho.tgz");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&source)
        .arg("-czf")
        .arg(&archive)
        .arg(".")
        .status()
        .context("running tar")?;
    ensure!(status.success(), "tar -czf failed: {status}");
    let images_dir = store.path().join("images");
    let report = images::import(&images_dir, "pyecho:0.1.0", &archive, false)?;
    ensure!(report.files >= 1, "nothing imported: {report:?}");
    let img = match image_mount(&report.path)? {
        Ok(img) => img,
        Err(skip) => return Ok(skip),
    };
    if !Path::new("/usr/bin/python3").is_file() {
        return Ok(Outcome::Skip("the example needs /usr/bin/python3".into()));
    }
    let mut w = Worker::start(&img, &["/usr/bin/python3", "echo.py"], Some(NOBODY))?;
    let got = w.exchange("from a tarball\n", 1)?;
    ensure!(got == ["from a tarball"], "echo.py answered {got:?}");
    drop(w);

    // A second import of the same name is refused; with replace it swaps.
    match images::import(&images_dir, "pyecho:0.1.0", &archive, false) {
        Err(ImageError::Exists { .. }) => {}
        other => bail!("second import: expected Exists, got {other:?}"),
    }
    let again = images::import(&images_dir, "pyecho:0.1.0", &source, true)?;
    ensure!(again.replaced, "replace did not report replacing");
    let names: Vec<String> = images::list(&images_dir)?
        .into_iter()
        .map(|i| i.name)
        .collect();
    ensure!(names == ["pyecho:0.1.0"], "images after replace: {names:?}");
    images::remove(&images_dir, "pyecho:0.1.0")?;
    ensure!(
        images::list(&images_dir)?.is_empty(),
        "remove left the image"
    );
    Ok(Outcome::Pass)
}

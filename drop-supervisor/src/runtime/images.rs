//! The node's images: bundle directories under the images folder (`<images>/<name>/`), the
//! stand-in for the docker images of the original DROP (DESIGN §4). A flow's `image: pyex:0.1.0`
//! names `<images>/pyex:0.1.0/`, which a worker sees at `/home/drop` (see `worker::image`).
//!
//! `dropctl image import NAME DIR|TARBALL` lands in [`import`]: the bundle is built in a staging
//! folder next to the images (`.import-<name>-<pid>-<n>`, same file system) and renamed into
//! place, so a half-copied image is never visible; replacing swaps the two folders atomically
//! (`renameat2(RENAME_EXCHANGE)`). Names starting with `.` are never images, so staging folders
//! are invisible to [`list`].
//!
//! A bundle holds only directories, regular files and symbolic links (copied as links, modes
//! preserved, owned by whoever imports). Tarballs are unpacked by the system `tar` (GNU tar:
//! `tar -x --no-same-owner -f FILE -C STAGING`) after their member list has been checked for
//! absolute names and `..`; afterwards every member is checked to lie inside the staging folder.
//! Device nodes, fifos and sockets are refused either way.

use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
use serde::Serialize;

use crate::error::ApiError;

/// Longest image name accepted.
pub const NAME_MAX: usize = 128;

/// Errors of the image store and of preparing an image's mount (`worker::image`).
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("invalid image name {name:?}: {reason}")]
    BadName { name: String, reason: &'static str },
    #[error("image {name} not found (no folder {path})")]
    NotFound { name: String, path: PathBuf },
    #[error("image {name} already exists at {path} (replace it explicitly)")]
    Exists { name: String, path: PathBuf },
    #[error("{0} is not an absolute path")]
    NotAbsolute(PathBuf),
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("path holds a NUL byte: {0:?}")]
    Nul(PathBuf),
    #[error("{0} is neither a directory nor a .tar, .tar.gz or .tgz file")]
    UnknownSource(PathBuf),
    #[error("{0} is not a directory, regular file or symbolic link")]
    UnsupportedFile(PathBuf),
    #[error(
        "tarball {path} has an unsafe member {member:?} (absolute, `..` or outside the bundle)"
    )]
    UnsafeMember { path: PathBuf, member: String },
    #[error("tar failed on {path}: {detail}")]
    Tar { path: PathBuf, detail: String },
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image mounts are not available: {0}")]
    Unsupported(String),
}

/// An image error as the API answers it: the caller's mistake (400/404/409) or ours (500).
impl From<&ImageError> for ApiError {
    fn from(e: &ImageError) -> ApiError {
        let msg = format!("{e:#}");
        match e {
            ImageError::NotFound { .. } => ApiError::new(404, "unknown_image", msg),
            ImageError::Exists { .. } => ApiError::new(409, "conflict", msg),
            ImageError::Io { .. } => ApiError::internal(msg),
            _ => ApiError::new(400, "invalid_image", msg),
        }
    }
}

/// What [`import`] installed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImportReport {
    pub name: String,
    pub path: PathBuf,
    /// Sum of the regular files' sizes.
    pub bytes: u64,
    /// Number of regular files.
    pub files: u64,
    /// Whether an older image of that name was replaced.
    pub replaced: bool,
}

/// One installed image, as [`list`] finds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageInfo {
    pub name: String,
    pub path: PathBuf,
    /// Sum of the regular files' sizes.
    pub bytes: u64,
    /// Number of regular files.
    pub files: u64,
}

/// `[A-Za-z0-9._:-]+`, at most [`NAME_MAX`] bytes, not starting with `.`, without `..`:
/// a docker-style `name:tag` that is also a safe single path component.
pub fn validate_name(name: &str) -> Result<(), ImageError> {
    let bad = |reason| {
        Err(ImageError::BadName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > NAME_MAX {
        return bad("longer than 128 bytes");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
    {
        return bad("only letters, digits, `.`, `_`, `:` and `-` are allowed");
    }
    if name.starts_with('.') {
        return bad("must not start with `.`");
    }
    if name.contains("..") {
        return bad("must not contain `..`");
    }
    Ok(())
}

/// The folder of image `name`, which must exist (a flow naming a missing image is refused).
pub fn resolve(images_dir: &Path, name: &str) -> Result<PathBuf, ImageError> {
    validate_name(name)?;
    let path = images_dir.join(name);
    if path.is_dir() {
        Ok(path)
    } else {
        Err(ImageError::NotFound {
            name: name.to_owned(),
            path,
        })
    }
}

/// Installs `source` (a directory, or a `.tar`/`.tar.gz`/`.tgz` whose members are relative to
/// the bundle root, as `tar -C DIR -czf x.tgz .` makes) as image `name`. An existing image is
/// refused unless `replace`, which swaps the new folder in atomically and then deletes the old
/// one (workers started from it keep running on its open files, but see an empty `/home/drop`).
pub fn import(
    images_dir: &Path,
    name: &str,
    source: &Path,
    replace: bool,
) -> Result<ImportReport, ImageError> {
    validate_name(name)?;
    std::fs::create_dir_all(images_dir).map_err(io("creating the images folder", images_dir))?;
    let target = images_dir.join(name);
    let meta = std::fs::metadata(source).map_err(io("reading the image source", source))?;

    if !meta.is_dir() {
        return match tarball_kind(source) {
            Some(gzip) => import_tarball(images_dir, name, source, gzip, replace),
            None => Err(ImageError::UnknownSource(source.to_path_buf())),
        };
    }
    let staging = Staging::create(images_dir, "import", name)?;
    copy_tree(source, &staging.0)?;
    // The bundle root takes the source folder's mode (create_dir gave it the default).
    let mode = meta.permissions().mode() & 0o7777;
    std::fs::set_permissions(&staging.0, std::fs::Permissions::from_mode(mode))
        .map_err(io("setting the mode of", &staging.0))?;
    finish(&staging, &target, name, replace)
}

/// Imports the tarball `tarball` (gzip-compressed when `gzip`) as image `name`: what the
/// control API does with a bundle a client sent (the daemon's own upload file, never a path a
/// client named).
pub fn import_tarball(
    images_dir: &Path,
    name: &str,
    tarball: &Path,
    gzip: bool,
    replace: bool,
) -> Result<ImportReport, ImageError> {
    validate_name(name)?;
    std::fs::create_dir_all(images_dir).map_err(io("creating the images folder", images_dir))?;
    let staging = Staging::create(images_dir, "import", name)?;
    unpack(tarball, gzip, &staging.0)?;
    finish(&staging, &images_dir.join(name), name, replace)
}

fn finish(
    staging: &Staging,
    target: &Path,
    name: &str,
    replace: bool,
) -> Result<ImportReport, ImageError> {
    let (bytes, files) = measure(&staging.0)?;
    let replaced = install(staging, target, name, replace)?;
    Ok(ImportReport {
        name: name.to_owned(),
        path: target.to_path_buf(),
        bytes,
        files,
        replaced,
    })
}

/// Where an uploaded bundle is received: a hidden file next to the images (never listed),
/// removed when the returned guard is dropped.
pub fn upload_file(images_dir: &Path, name: &str) -> Result<Upload, ImageError> {
    validate_name(name)?;
    std::fs::create_dir_all(images_dir).map_err(io("creating the images folder", images_dir))?;
    Ok(Upload(staging_path(images_dir, "upload", name)))
}

/// An upload file, deleted on drop.
#[derive(Debug)]
pub struct Upload(pub PathBuf);

impl Drop for Upload {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Bytes of every installed image together (for the total quota).
pub fn total_bytes(images_dir: &Path) -> Result<u64, ImageError> {
    Ok(list(images_dir)?.iter().map(|i| i.bytes).sum())
}

/// The installed images, sorted by name. A missing images folder holds none.
pub fn list(images_dir: &Path) -> Result<Vec<ImageInfo>, ImageError> {
    let entries = match std::fs::read_dir(images_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io("listing the images folder", images_dir)(e)),
    };
    let mut images = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io("listing the images folder", images_dir))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        // Staging and doomed folders start with `.`; stray files are not images.
        if validate_name(&name).is_err() {
            continue;
        }
        let path = entry.path();
        if !entry.file_type().map_err(io("reading", &path))?.is_dir() {
            continue;
        }
        let (bytes, files) = measure(&path)?;
        images.push(ImageInfo {
            name,
            path,
            bytes,
            files,
        });
    }
    images.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(images)
}

/// Deletes image `name`: first renamed aside (so it vanishes from [`list`] and [`resolve`] at
/// once), then removed.
pub fn remove(images_dir: &Path, name: &str) -> Result<(), ImageError> {
    let path = resolve(images_dir, name)?;
    let doomed = staging_path(images_dir, "remove", name);
    std::fs::rename(&path, &doomed).map_err(io("moving aside", &path))?;
    std::fs::remove_dir_all(&doomed).map_err(io("deleting", &doomed))
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ImageError + 'a {
    move |source| ImageError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

fn staging_path(images_dir: &Path, what: &str, name: &str) -> PathBuf {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    images_dir.join(format!(".{what}-{name}-{}-{n}", std::process::id()))
}

/// A folder under the images folder, deleted on drop (also after a successful swap, when it
/// holds the replaced image); after a plain rename into place it no longer exists.
struct Staging(PathBuf);

impl Staging {
    fn create(images_dir: &Path, what: &str, name: &str) -> Result<Staging, ImageError> {
        let path = staging_path(images_dir, what, name);
        std::fs::create_dir(&path).map_err(io("creating the staging folder", &path))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .map_err(io("setting the mode of", &path))?;
        Ok(Staging(path))
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        match std::fs::remove_dir_all(&self.0) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %self.0.display(), error = %e, "cannot delete staging folder")
            }
        }
    }
}

/// Renames the staged bundle to `target`. Returns whether an old image was replaced.
fn install(
    staging: &Staging,
    target: &Path,
    name: &str,
    replace: bool,
) -> Result<bool, ImageError> {
    let exists = || ImageError::Exists {
        name: name.to_owned(),
        path: target.to_path_buf(),
    };
    if replace {
        // Swap both folders in one step; the staging guard then deletes the old image.
        match renameat2(
            AT_FDCWD,
            &staging.0,
            AT_FDCWD,
            target,
            RenameFlags::RENAME_EXCHANGE,
        ) {
            Ok(()) => return Ok(true),
            Err(Errno::ENOENT) => {} // nothing to replace: a plain install below
            Err(Errno::EINVAL | Errno::ENOSYS) if target.exists() => {
                // No RENAME_EXCHANGE on this file system: move the old one aside first.
                let old = Staging(staging_path(
                    target.parent().unwrap_or(Path::new(".")),
                    "old",
                    name,
                ));
                std::fs::rename(target, &old.0).map_err(io("moving aside", target))?;
                std::fs::rename(&staging.0, target).map_err(io("installing", target))?;
                return Ok(true);
            }
            Err(Errno::EINVAL | Errno::ENOSYS) => {}
            Err(e) => return Err(io("replacing", target)(e.into())),
        }
    }
    match renameat2(
        AT_FDCWD,
        &staging.0,
        AT_FDCWD,
        target,
        RenameFlags::RENAME_NOREPLACE,
    ) {
        Ok(()) => Ok(false),
        Err(Errno::EEXIST | Errno::ENOTEMPTY) => Err(exists()),
        Err(Errno::EINVAL | Errno::ENOSYS) => {
            // No RENAME_NOREPLACE here; rename(2) would silently replace an empty folder.
            if target.symlink_metadata().is_ok() {
                return Err(exists());
            }
            std::fs::rename(&staging.0, target).map_err(io("installing", target))?;
            Ok(false)
        }
        Err(e) => Err(io("installing", target)(e.into())),
    }
}

/// Recursive copy: directories, regular files (with their modes) and symbolic links (as links).
fn copy_tree(from: &Path, to: &Path) -> Result<(), ImageError> {
    for entry in std::fs::read_dir(from).map_err(io("reading", from))? {
        let entry = entry.map_err(io("reading", from))?;
        let src = entry.path();
        let dst = to.join(entry.file_name());
        let meta = src.symlink_metadata().map_err(io("reading", &src))?;
        let kind = meta.file_type();
        if kind.is_dir() {
            std::fs::create_dir(&dst).map_err(io("creating", &dst))?;
            copy_tree(&src, &dst)?;
            // After the contents, so that a read-only folder can be filled first.
            std::fs::set_permissions(&dst, meta.permissions())
                .map_err(io("setting the mode of", &dst))?;
        } else if kind.is_file() {
            // std::fs::copy also copies the permission bits.
            std::fs::copy(&src, &dst).map_err(io("copying", &src))?;
        } else if kind.is_symlink() {
            let link = std::fs::read_link(&src).map_err(io("reading the link", &src))?;
            std::os::unix::fs::symlink(&link, &dst).map_err(io("creating the link", &dst))?;
        } else {
            return Err(ImageError::UnsupportedFile(src));
        }
    }
    Ok(())
}

/// `Some(gzip?)` for a name ending in `.tar`, `.tar.gz` or `.tgz`.
fn tarball_kind(path: &Path) -> Option<bool> {
    let name = path.file_name()?.to_str()?;
    if name.ends_with(".tar.gz") || name.ends_with(".tgz") {
        Some(true)
    } else if name.ends_with(".tar") {
        Some(false)
    } else {
        None
    }
}

fn tar(args: &[&str], gzip: bool, tarball: &Path) -> Result<String, ImageError> {
    let mut cmd = Command::new("tar");
    cmd.args(args).env("LC_ALL", "C").stdin(Stdio::null());
    if gzip {
        cmd.arg("-z");
    }
    cmd.arg("-f").arg(tarball);
    let out = cmd.output().map_err(io("running tar on", tarball))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(ImageError::Tar {
            path: tarball.to_path_buf(),
            detail: format!("{}: {}", out.status, stderr.trim()),
        });
    }
    String::from_utf8(out.stdout).map_err(|_| ImageError::Tar {
        path: tarball.to_path_buf(),
        detail: "member names are not UTF-8".into(),
    })
}

/// Whether a tar member name stays inside the folder it is extracted into, whatever the folder:
/// relative, and without a `..` component. (Links are checked after extraction.)
pub fn member_is_safe(member: &str) -> bool {
    !Path::new(member).components().any(|c| {
        matches!(
            c,
            Component::RootDir | Component::ParentDir | Component::Prefix(_)
        )
    })
}

/// Lists the members (refusing absolute names and `..`), extracts into `into`, then checks
/// that every member landed inside it and that nothing but folders, files and links came out.
fn unpack(tarball: &Path, gzip: bool, into: &Path) -> Result<(), ImageError> {
    let unsafe_member = |member: &str| ImageError::UnsafeMember {
        path: tarball.to_path_buf(),
        member: member.to_owned(),
    };
    let listing = tar(&["-t"], gzip, tarball)?;
    let members: Vec<&str> = listing.lines().filter(|m| !m.is_empty()).collect();
    if let Some(member) = members.iter().find(|m| !member_is_safe(m)) {
        return Err(unsafe_member(member));
    }
    let into_arg = into
        .to_str()
        .ok_or_else(|| ImageError::Nul(into.to_path_buf()))?;
    tar(&["-x", "--no-same-owner", "-C", into_arg], gzip, tarball)?;

    // GNU tar already refuses `..` and defers links pointing outside; check anyway that no
    // member was written through a link to somewhere else.
    let root = into.canonicalize().map_err(io("resolving", into))?;
    for member in &members {
        // `./a/` and `a` are the same member; `./` is the root itself.
        let relative: PathBuf = Path::new(member)
            .components()
            .filter(|c| matches!(c, Component::Normal(_)))
            .collect();
        if relative.as_os_str().is_empty() {
            continue;
        }
        let path = into.join(relative);
        let parent = path.parent().unwrap_or(into);
        match parent.canonicalize() {
            Ok(real) if real.starts_with(&root) => {}
            Ok(_) => return Err(unsafe_member(member)),
            Err(e) if e.kind() == ErrorKind::NotFound => return Err(unsafe_member(member)),
            Err(e) => return Err(io("resolving", parent)(e)),
        }
    }
    check_kinds(into)
}

/// Refuses anything but folders, regular files and links below `dir`.
fn check_kinds(dir: &Path) -> Result<(), ImageError> {
    for entry in std::fs::read_dir(dir).map_err(io("reading", dir))? {
        let entry = entry.map_err(io("reading", dir))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(io("reading", &path))?;
        if kind.is_dir() {
            check_kinds(&path)?;
        } else if !kind.is_file() && !kind.is_symlink() {
            return Err(ImageError::UnsupportedFile(path));
        }
    }
    Ok(())
}

/// (bytes, files) of the regular files below `dir`; links are not followed.
fn measure(dir: &Path) -> Result<(u64, u64), ImageError> {
    let (mut bytes, mut files) = (0, 0);
    for entry in std::fs::read_dir(dir).map_err(io("reading", dir))? {
        let entry = entry.map_err(io("reading", dir))?;
        let path = entry.path();
        let meta = path.symlink_metadata().map_err(io("reading", &path))?;
        if meta.is_dir() {
            let (b, f) = measure(&path)?;
            bytes += b;
            files += f;
        } else if meta.is_file() {
            bytes += meta.len();
            files += 1;
        }
    }
    Ok((bytes, files))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        path.symlink_metadata()
            .expect("metadata")
            .permissions()
            .mode()
            & 0o7777
    }

    /// A small bundle: a script (0755), a data file (0640), a sub folder and a relative link.
    fn source_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        let p = dir.path();
        std::fs::write(p.join("run.sh"), "#!/bin/sh\necho hi\n").expect("write");
        std::fs::set_permissions(p.join("run.sh"), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        std::fs::create_dir(p.join("data")).expect("mkdir");
        std::fs::write(p.join("data/table.csv"), "a,b\n1,2\n").expect("write");
        std::fs::set_permissions(
            p.join("data/table.csv"),
            std::fs::Permissions::from_mode(0o640),
        )
        .expect("chmod");
        std::os::unix::fs::symlink("data/table.csv", p.join("table")).expect("symlink");
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        dir
    }

    fn sh(script: &str, cwd: &Path) {
        let st = Command::new("/bin/sh")
            .arg("-c")
            .arg(script)
            .current_dir(cwd)
            .status()
            .expect("sh");
        assert!(st.success(), "{script}");
    }

    fn only_images(images: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(images)
            .expect("read images")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
            .collect();
        names.sort();
        names
    }

    #[test]
    fn names() {
        for ok in ["pyecho:0.1.0", "a", "A-b_c.d:1", &"x".repeat(128)] {
            validate_name(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "",
            ".hidden",
            "a/b",
            "a..b",
            "..",
            "a b",
            "é",
            "a\0b",
            &"x".repeat(129),
            "/abs",
        ] {
            assert!(
                matches!(validate_name(bad), Err(ImageError::BadName { .. })),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn import_directory_keeps_modes_and_links() {
        let src = source_dir();
        let images = tempfile::tempdir().expect("temp dir");
        let report = import(images.path(), "demo:1", src.path(), false).expect("import");
        let root = images.path().join("demo:1");
        assert_eq!(report.path, root);
        assert_eq!(
            (report.files, report.bytes, report.replaced),
            (2, 18 + 8, false)
        );
        assert_eq!(
            std::fs::read_to_string(root.join("data/table.csv")).expect("read"),
            "a,b\n1,2\n"
        );
        assert_eq!(mode(&root.join("run.sh")), 0o755);
        assert_eq!(mode(&root.join("data/table.csv")), 0o640);
        assert_eq!(mode(&root), 0o755);
        assert_eq!(
            std::fs::read_link(root.join("table")).expect("link"),
            Path::new("data/table.csv")
        );
        assert_eq!(
            only_images(images.path()),
            ["demo:1"],
            "staging folder left behind"
        );
    }

    #[test]
    fn import_refuses_existing_unless_replace() {
        let src = source_dir();
        let images = tempfile::tempdir().expect("temp dir");
        import(images.path(), "demo", src.path(), false).expect("first import");
        let err = import(images.path(), "demo", src.path(), false).expect_err("second import");
        assert!(matches!(err, ImageError::Exists { .. }), "{err}");

        std::fs::write(src.path().join("new.txt"), "new").expect("write");
        std::fs::remove_file(src.path().join("run.sh")).expect("rm");
        let report = import(images.path(), "demo", src.path(), true).expect("replace");
        assert!(report.replaced);
        let root = images.path().join("demo");
        assert!(root.join("new.txt").is_file());
        assert!(
            !root.join("run.sh").exists(),
            "old content survived the replace"
        );
        assert_eq!(
            only_images(images.path()),
            ["demo"],
            "old image or staging left behind"
        );

        // Replace of an image that does not exist is a plain install.
        let report = import(images.path(), "other", src.path(), true).expect("replace new");
        assert!(!report.replaced);
    }

    #[test]
    fn import_tarballs() {
        let src = source_dir();
        let work = tempfile::tempdir().expect("temp dir");
        let dir = work.path();
        let s = src.path().display();
        sh(
            &format!(
                "tar -C '{s}' -cf plain.tar . && tar -C '{s}' -czf packed.tgz . && cp packed.tgz packed.tar.gz"
            ),
            dir,
        );
        let images = dir.join("images");
        for (name, file) in [
            ("t1", "plain.tar"),
            ("t2", "packed.tgz"),
            ("t3", "packed.tar.gz"),
        ] {
            let report = import(&images, name, &dir.join(file), false).expect(file);
            assert_eq!((report.files, report.bytes), (2, 26), "{file}");
            let root = images.join(name);
            assert_eq!(mode(&root.join("run.sh")), 0o755, "{file}");
            assert_eq!(mode(&root.join("data/table.csv")), 0o640, "{file}");
            assert_eq!(
                std::fs::read_link(root.join("table")).expect("link"),
                Path::new("data/table.csv")
            );
        }
        assert_eq!(only_images(&images), ["t1", "t2", "t3"]);

        std::fs::write(dir.join("notes.txt"), "x").expect("write");
        let err = import(&images, "t4", &dir.join("notes.txt"), false).expect_err("not a tarball");
        assert!(matches!(err, ImageError::UnknownSource(_)), "{err}");
        std::fs::write(dir.join("broken.tar"), "not a tar at all").expect("write");
        let err =
            import(&images, "t5", &dir.join("broken.tar"), false).expect_err("broken tarball");
        assert!(matches!(err, ImageError::Tar { .. }), "{err}");
        assert_eq!(
            only_images(&images),
            ["t1", "t2", "t3"],
            "failed imports left something"
        );
    }

    #[test]
    fn malicious_tarballs_are_refused() {
        let work = tempfile::tempdir().expect("temp dir");
        let dir = work.path();
        // `../x` and an absolute member (GNU tar keeps them only with -P).
        sh(
            "mkdir -p in/sub && echo pwned > in/x && cd in/sub && tar -cPf ../../dotdot.tar ../x",
            dir,
        );
        let abs = dir.join("in/x");
        sh(&format!("tar -cPf abs.tar '{}'", abs.display()), dir);
        // A link to outside, then a file written through it.
        sh(
            "mkdir -p outside a b/link && ln -s \"$PWD/outside\" a/link && echo pwned > b/link/f \
             && tar -cf link.tar -C a link -C ../b link/f",
            dir,
        );
        let images = dir.join("images");
        std::fs::create_dir(&images).expect("mkdir");
        for file in ["dotdot.tar", "abs.tar", "link.tar"] {
            let err = import(&images, "evil", &dir.join(file), false).expect_err(file);
            assert!(
                matches!(
                    err,
                    ImageError::UnsafeMember { .. } | ImageError::Tar { .. }
                ),
                "{file}: {err}"
            );
            assert!(
                only_images(&images).is_empty(),
                "{file}: left {:?}",
                only_images(&images)
            );
        }
        assert!(!dir.join("x").exists() && !images.parent().expect("parent").join("x").exists());
        assert_eq!(
            std::fs::read_dir(dir.join("outside"))
                .expect("outside")
                .count(),
            0,
            "wrote outside"
        );
    }

    #[test]
    fn list_resolve_and_remove() {
        let src = source_dir();
        let images = tempfile::tempdir().expect("temp dir");
        assert!(
            list(&images.path().join("missing"))
                .expect("list")
                .is_empty()
        );
        import(images.path(), "b:2", src.path(), false).expect("import");
        import(images.path(), "a:1", src.path(), false).expect("import");
        std::fs::create_dir(images.path().join(".import-c-1-0")).expect("stray staging");
        std::fs::write(images.path().join("stray-file"), "x").expect("stray file");
        let found = list(images.path()).expect("list");
        let names: Vec<&str> = found.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["a:1", "b:2"]);
        assert_eq!((found[0].bytes, found[0].files), (26, 2));
        assert_eq!(found[0].path, images.path().join("a:1"));

        assert_eq!(
            resolve(images.path(), "a:1").expect("resolve"),
            images.path().join("a:1")
        );
        assert!(matches!(
            resolve(images.path(), "zz"),
            Err(ImageError::NotFound { .. })
        ));
        assert!(matches!(
            resolve(images.path(), "../a:1"),
            Err(ImageError::BadName { .. })
        ));

        remove(images.path(), "a:1").expect("remove");
        assert!(matches!(
            remove(images.path(), "a:1"),
            Err(ImageError::NotFound { .. })
        ));
        assert!(matches!(
            remove(images.path(), ".import-c-1-0"),
            Err(ImageError::BadName { .. })
        ));
        assert_eq!(
            only_images(images.path()),
            [".import-c-1-0", "b:2", "stray-file"]
        );
    }

    #[test]
    fn import_refuses_bad_names_and_special_files() {
        let src = source_dir();
        let images = tempfile::tempdir().expect("temp dir");
        let err = import(images.path(), "../escape", src.path(), false).expect_err("bad name");
        assert!(matches!(err, ImageError::BadName { .. }), "{err}");
        nix::unistd::mkfifo(
            &src.path().join("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .expect("mkfifo");
        let err = import(images.path(), "fifo", src.path(), false).expect_err("fifo");
        assert!(matches!(err, ImageError::UnsupportedFile(_)), "{err}");
        assert!(only_images(images.path()).is_empty());
        let err = import(images.path(), "gone", &images.path().join("missing"), false)
            .expect_err("missing");
        assert!(matches!(err, ImageError::Io { .. }), "{err}");
    }
}

//! Worker stderr, captured per pool into `<logs>/<pool>.log` with size-bounded rotation:
//! when the file passes its limit it becomes `<pool>.log.1` (older ones shift up to `.N`) and
//! a new file starts. Nothing is ever truncated in place (the original DROP emptied its logs
//! every minute).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::io::AsyncReadExt;

/// Size at which a log file is rotated.
pub const DEFAULT_MAX_BYTES: u64 = 8 * 1024 * 1024;
/// Rotated files kept (`.1` … `.N`).
pub const DEFAULT_KEEP: u32 = 3;

#[derive(Debug)]
pub struct PoolLog {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    file: Mutex<(File, u64)>,
}

impl PoolLog {
    pub fn open(path: PathBuf, max_bytes: u64, keep: u32) -> std::io::Result<Arc<PoolLog>> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let len = file.metadata()?.len();
        Ok(Arc::new(PoolLog {
            path,
            max_bytes,
            keep,
            file: Mutex::new((file, len)),
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `bytes`, rotating first when the file would pass its limit.
    pub fn append(&self, bytes: &[u8]) {
        let mut guard = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if guard.1 > 0
            && guard.1 + bytes.len() as u64 > self.max_bytes
            && let Ok(fresh) = self.rotate()
        {
            *guard = (fresh, 0);
        }
        if guard.0.write_all(bytes).is_ok() {
            guard.1 += bytes.len() as u64;
        }
    }

    fn rotated(&self, n: u32) -> PathBuf {
        let mut name = self.path.clone().into_os_string();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    }

    fn rotate(&self) -> std::io::Result<File> {
        let _ = std::fs::remove_file(self.rotated(self.keep));
        for n in (1..self.keep).rev() {
            let _ = std::fs::rename(self.rotated(n), self.rotated(n + 1));
        }
        std::fs::rename(&self.path, self.rotated(1))?;
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
    }

    /// A new pipe whose write end becomes a worker's stderr; what arrives is appended to this
    /// log by a task on the current tokio runtime, prefixed with the worker's id.
    pub fn pipe(self: &Arc<Self>, worker_tag: String) -> std::io::Result<OwnedFd> {
        let (read, write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)?;
        let mut rx = tokio::net::unix::pipe::Receiver::from_owned_fd(read)?;
        let log = self.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            let mut line_start = true;
            loop {
                let n = match rx.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut out = Vec::with_capacity(n + 32);
                for &b in &buf[..n] {
                    if line_start {
                        out.extend_from_slice(worker_tag.as_bytes());
                        line_start = false;
                    }
                    out.push(b);
                    if b == b'\n' {
                        line_start = true;
                    }
                }
                log.append(&out);
            }
        });
        Ok(write)
    }

    /// Up to `max` bytes of the current file from `offset` (for `dropctl logs -f`), and the
    /// offset to ask for next. An offset past the end (the file rotated) starts over at 0.
    pub fn read_from(&self, offset: u64, max: usize) -> std::io::Result<(Vec<u8>, u64)> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = File::open(&self.path)?;
        let len = f.metadata()?.len();
        let start = if offset > len { 0 } else { offset };
        f.seek(SeekFrom::Start(start))?;
        let mut out = Vec::new();
        f.take(max as u64).read_to_end(&mut out)?;
        let next = start + out.len() as u64;
        Ok((out, next))
    }

    /// The last `max` bytes of the current file, starting at a line boundary.
    pub fn tail(&self, max: usize) -> std::io::Result<(Vec<u8>, u64)> {
        let len = std::fs::metadata(&self.path)?.len();
        let start = len.saturating_sub(max as u64);
        let (mut bytes, next) = self.read_from(start, max)?;
        if start > 0
            && let Some(pos) = bytes.iter().position(|b| *b == b'\n')
        {
            bytes.drain(..=pos);
        }
        Ok((bytes, next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_by_size_and_keeps_n_files() {
        let dir = tempfile::tempdir().unwrap();
        let log = PoolLog::open(dir.path().join("p.log"), 100, 2).unwrap();
        for i in 0..30 {
            log.append(format!("line {i:03} of the log\n").as_bytes());
        }
        let names: Vec<String> = {
            let mut v: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names, ["p.log", "p.log.1", "p.log.2"]);
        for n in &names {
            assert!(
                std::fs::metadata(dir.path().join(n)).unwrap().len() <= 100,
                "{n}"
            );
        }
        let current = std::fs::read_to_string(dir.path().join("p.log")).unwrap();
        assert!(current.ends_with("line 029 of the log\n"), "{current}");
        let (tail, next) = log.tail(30).unwrap();
        assert_eq!(tail, b"line 029 of the log\n");
        let (more, again) = log.read_from(next, 100).unwrap();
        assert!(more.is_empty());
        assert_eq!(again, next);
    }
}

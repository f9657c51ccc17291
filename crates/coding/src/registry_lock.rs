//! The registry's lock file: created exclusively, holding `pid host` of its writer, removed when
//! the writer is done. A writer that crashed (killed, power cut) leaves its lock behind; the
//! next writer on the same host finds that process gone and takes the lock over instead of
//! waiting for a file that nobody will ever remove.
//!
//! Taking over is a rename of the stale file to a name of our own followed by a check that what
//! was moved is still the stale lock that was judged (a live writer may have replaced it in
//! between): if it is not, it is linked back into place. A lock of another host is never taken
//! over, since its process cannot be seen from here; nor one whose owner cannot be read.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::CodingError;

/// How long a writer waits for a live lock before giving up.
pub(crate) const LOCK_WAIT: Duration = Duration::from_secs(10);

/// Who holds a lock: as written in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LockOwner {
    pub pid: u32,
    /// `None` in locks written before the host was recorded (a bare pid): taken as this host.
    pub host: Option<String>,
}

impl LockOwner {
    fn current() -> Self {
        Self {
            pid: std::process::id(),
            host: Some(host_name()),
        }
    }

    fn parse(text: &str) -> Option<Self> {
        let mut words = text.split_whitespace();
        let pid = words.next()?.parse().ok()?;
        let host = words.next().map(str::to_string);
        Some(Self { pid, host })
    }

    fn line(&self) -> String {
        match &self.host {
            Some(host) => format!("{} {host}\n", self.pid),
            None => format!("{}\n", self.pid),
        }
    }

    /// Whether the owner is known to be gone: a process of this host that no longer runs.
    fn is_dead(&self) -> bool {
        let here = self.host.as_deref().is_none_or(|h| h == host_name());
        here && self.pid != std::process::id() && process_is_gone(self.pid)
    }
}

/// This machine's name (`/proc/sys/kernel/hostname`, else `$HOSTNAME`, else `unknown`).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty() && !h.contains(char::is_whitespace))
        .unwrap_or_else(|| "unknown".into())
}

/// Whether no process `pid` runs here. Where that cannot be told, a process is taken as alive
/// (its lock is then only ever waited for, as before).
fn process_is_gone(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        return !Path::new(&format!("/proc/{pid}")).exists();
    }
    if cfg!(unix) {
        // `kill -0` tests for the process without signalling it.
        return std::process::Command::new("kill")
            .args(["-0", &pid.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| !s.success());
    }
    false
}

/// Holds the lock file while alive; removes it when dropped.
#[derive(Debug)]
pub(crate) struct LockGuard(PathBuf);

impl LockGuard {
    /// Takes the lock at `path`, waiting up to `wait` for a live holder, and taking over a
    /// holder's lock at once when it is known to be dead.
    pub(crate) fn acquire(path: &Path, wait: Duration) -> Result<Self, CodingError> {
        let started = Instant::now();
        let me = LockOwner::current();
        loop {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
            {
                Ok(mut file) => {
                    file.write_all(me.line().as_bytes())?;
                    file.sync_all()?;
                    return Ok(Self(path.to_path_buf()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    if take_over_if_stale(path)? {
                        continue;
                    }
                    if started.elapsed() > wait {
                        let owner = std::fs::read_to_string(path)
                            .ok()
                            .and_then(|t| LockOwner::parse(&t));
                        let by = match owner {
                            Some(LockOwner {
                                pid,
                                host: Some(host),
                            }) => format!("process {pid} on {host}"),
                            Some(LockOwner { pid, host: None }) => format!("process {pid}"),
                            None => "another medcoder".into(),
                        };
                        return Err(CodingError::Invalid(format!(
                            "the model registry is locked by {by} ({}); if that process is not \
                             running, delete the file",
                            path.display()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Removes the lock at `path` if its owner is dead; `true` when it did (or when the lock went
/// away meanwhile), so the caller tries to take it again at once.
fn take_over_if_stale(path: &Path) -> Result<bool, CodingError> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(!path.exists());
    };
    let Some(owner) = LockOwner::parse(&text) else {
        // Empty: a writer between creating and writing it (or one that died right there).
        return Ok(false);
    };
    if !owner.is_dead() {
        return Ok(false);
    }
    let aside = path.with_extension(format!("lock.stale-{}", std::process::id()));
    match std::fs::rename(path, &aside) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(true),
        Err(e) => return Err(e.into()),
    }
    let moved = std::fs::read_to_string(&aside).unwrap_or_default();
    if moved != text {
        // A live writer's fresh lock was moved: put it back (unless the place is taken again).
        let _ = std::fs::hard_link(&aside, path);
    } else {
        tracing::warn!(
            lock = %path.display(),
            pid = owner.pid,
            "took over the lock of a registry writer that no longer runs"
        );
    }
    let _ = std::fs::remove_file(&aside);
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pid that no process has: a child that has exited and been reaped.
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    #[test]
    fn owner_line_round_trips_and_bare_pids_read_as_this_host() {
        let me = LockOwner::current();
        assert_eq!(LockOwner::parse(&me.line()), Some(me.clone()));
        assert_eq!(
            LockOwner::parse("123\n"),
            Some(LockOwner {
                pid: 123,
                host: None
            })
        );
        assert_eq!(LockOwner::parse(""), None);
        assert!(!me.is_dead(), "our own lock is never stale");
    }

    #[cfg(unix)]
    #[test]
    fn a_crashed_writers_lock_is_taken_over_at_once() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("registry.lock");
        let dead = LockOwner {
            pid: dead_pid(),
            host: Some(host_name()),
        };
        std::fs::write(&path, dead.line()).unwrap();
        let started = Instant::now();
        let guard = LockGuard::acquire(&path, Duration::from_secs(30)).unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        let owner = LockOwner::parse(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(owner, LockOwner::current());
        drop(guard);
        assert!(!path.exists());
        // Nothing left aside.
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_live_or_foreign_or_unreadable_lock_is_waited_for_and_named() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("registry.lock");
        for (content, named) in [
            // This very process: alive.
            (LockOwner::current().line(), std::process::id().to_string()),
            // A dead pid of another host: its process cannot be seen from here.
            (
                format!("{} another-host.example\n", dead_pid()),
                "on another-host.example".to_string(),
            ),
            (String::new(), "another medcoder".to_string()),
        ] {
            std::fs::write(&path, &content).unwrap();
            let err = LockGuard::acquire(&path, Duration::from_millis(200)).unwrap_err();
            assert!(err.to_string().contains(&named), "{err}");
            assert_eq!(std::fs::read_to_string(&path).unwrap(), content);
        }
    }
}

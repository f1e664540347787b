//! systemd socket activation: listening sockets passed in by the service
//! manager (`LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES`, descriptors from
//! 3 on), each served by the export whose socket path or name it matches.
//!
//! A socket passed in is systemd's: the export serves it as it is and
//! leaves the file alone (no stale-file removal, no unlink on exit).
//!
//! A `spindle serve` handing its sockets to a new one (handover.rs) uses
//! the same variables, except that it cannot know the new process's pid
//! before it starts: it sets [`HANDOVER_FROM`] to its own pid instead of
//! `LISTEN_PID`, and the sockets are taken by its direct child only.

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The first descriptor systemd passes.
const FIRST_FD: i32 = 3;
/// At most this many are taken (systemd's own limit is far higher; a
/// value past it is an error in the environment, not a request).
pub const MAX_FDS: usize = 1024;

/// One socket passed in.
struct Passed {
    name: Option<String>,
    path: Option<PathBuf>,
    listener: UnixListener,
}

static PASSED: Mutex<Vec<Passed>> = Mutex::new(Vec::new());

/// Set instead of `LISTEN_PID` by a `spindle serve` handing its sockets
/// over: its pid, which must be this process's parent.
pub const HANDOVER_FROM: &str = "SPINDLE_HANDOVER_FROM";

/// Whether the variables are meant for this process: `LISTEN_PID` is its
/// pid, or (no `LISTEN_PID`) [`HANDOVER_FROM`] is its parent's.
fn meant_for_me(pid: Option<&str>, from: Option<&str>) -> bool {
    let num = |s: &str| s.trim().parse::<u32>().ok();
    match (pid, from) {
        (Some(pid), _) => num(pid) == Some(std::process::id()),
        (None, Some(from)) => num(from) == Some(std::os::unix::process::parent_id()),
        (None, None) => false,
    }
}

/// Takes the sockets systemd passed to this process, if any, and clears
/// the variables so that no child process takes them too. Call once, at
/// start-up, before any other thread opens files. Returns how many.
pub fn take_from_env() -> Result<usize, String> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").ok();
    let from = std::env::var(HANDOVER_FROM).ok();
    for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", HANDOVER_FROM] {
        std::env::remove_var(v);
    }
    let Some(fds) = fds else {
        return Ok(0);
    };
    if !meant_for_me(pid.as_deref(), from.as_deref()) {
        // Meant for another process (a parent that did not clear them).
        return Ok(0);
    }
    let n: usize = fds
        .trim()
        .parse()
        .map_err(|_| format!("LISTEN_FDS={fds} is not a number"))?;
    if n > MAX_FDS {
        return Err(format!("LISTEN_FDS={n}: more than {MAX_FDS} sockets"));
    }
    let names: Vec<&str> = names.as_deref().map_or(Vec::new(), |s| s.split(':').collect());
    let mut passed = Vec::new();
    for i in 0..n {
        let fd = FIRST_FD + i as i32;
        // SAFETY: fcntl on a descriptor number, no memory passed; a closed
        // number fails with EBADF, checked below.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
            return Err(format!("LISTEN_FDS={n}: descriptor {fd} is not open"));
        }
        // SAFETY: systemd hands this process descriptors 3 to 3+n-1 and
        // nothing else here owns them (this runs once, at start-up).
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let listener = UnixListener::from(owned);
        let path = listener
            .local_addr()
            .map_err(|e| format!("passed descriptor {fd} is not a unix socket: {e}"))?
            .as_pathname()
            .map(|p| canonical(&spindle_io::published_path(p)));
        let name = names.get(i).filter(|s| !s.is_empty()).map(|s| s.to_string());
        passed.push(Passed { name, path, listener });
    }
    let count = passed.len();
    if let Ok(mut p) = PASSED.lock() {
        *p = passed;
    }
    Ok(count)
}

/// `path` with its directory resolved, as exports spell their sockets.
fn canonical(path: &Path) -> PathBuf {
    match (path.parent().map(Path::canonicalize), path.file_name()) {
        (Some(Ok(dir)), Some(file)) => dir.join(file),
        _ => path.to_owned(),
    }
}

/// The passed socket for the export `name` on `socket`: the one bound at
/// that path, else the one systemd named `name` (`FileDescriptorName=`);
/// with the path it is bound at (which the export then shows and uses).
pub fn claim(name: &str, socket: &Path) -> Option<(UnixListener, PathBuf)> {
    let mut p = PASSED.lock().ok()?;
    let socket = canonical(socket);
    let i = p
        .iter()
        .position(|s| s.path.as_deref() == Some(socket.as_path()))
        .or_else(|| p.iter().position(|s| s.name.as_deref() == Some(name)))?;
    let s = p.remove(i);
    Some((s.listener, s.path.unwrap_or(socket)))
}

/// The passed socket bound at `path` (the control socket), if any.
pub fn claim_path(path: &Path) -> Option<UnixListener> {
    let mut p = PASSED.lock().ok()?;
    let path = canonical(path);
    let i = p.iter().position(|s| s.path.as_deref() == Some(path.as_path()))?;
    Some(p.remove(i).listener)
}

/// Makes `listener` (bound at `path`) a socket to be claimed again, as if
/// passed in: a handover that failed gives its sockets back this way.
pub fn give_back(listener: UnixListener, path: &Path) {
    if let Ok(mut p) = PASSED.lock() {
        p.push(Passed {
            name: None,
            path: Some(canonical(path)),
            listener,
        });
    }
}

/// Sockets passed in that no export claimed (name or path, for a warning).
pub fn unclaimed() -> Vec<String> {
    PASSED.lock().map_or(Vec::new(), |p| {
        p.iter()
            .map(|s| {
                s.name
                    .clone()
                    .or_else(|| s.path.as_ref().map(|p| p.display().to_string()))
                    .unwrap_or_else(|| "an unnamed socket".into())
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_variables_are_taken_only_by_the_process_they_name() {
        let me = std::process::id().to_string();
        let parent = std::os::unix::process::parent_id().to_string();
        assert!(meant_for_me(Some(&me), None));
        assert!(meant_for_me(Some(&format!(" {me}\n")), None));
        assert!(!meant_for_me(Some("1"), None));
        // A handover: the parent named itself.
        assert!(meant_for_me(None, Some(&parent)));
        assert!(!meant_for_me(None, Some(&me)));
        assert!(!meant_for_me(None, Some("x")));
        // LISTEN_PID, when set, decides.
        assert!(!meant_for_me(Some("1"), Some(&parent)));
        assert!(!meant_for_me(None, None));
    }
}

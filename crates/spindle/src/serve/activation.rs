//! systemd socket activation: listening sockets passed in by the service
//! manager (`LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES`, descriptors from
//! 3 on), each served by the export whose socket path or name it matches.
//!
//! A socket passed in is systemd's: the export serves it as it is and
//! leaves the file alone (no stale-file removal, no unlink on exit).

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The first descriptor systemd passes.
const FIRST_FD: i32 = 3;
/// At most this many are taken (systemd's own limit is far higher; a
/// value past it is an error in the environment, not a request).
const MAX_FDS: usize = 1024;

/// One socket passed in.
struct Passed {
    name: Option<String>,
    path: Option<PathBuf>,
    listener: UnixListener,
}

static PASSED: Mutex<Vec<Passed>> = Mutex::new(Vec::new());

/// Takes the sockets systemd passed to this process, if any, and clears
/// the variables so that no child process takes them too. Call once, at
/// start-up, before any other thread opens files. Returns how many.
pub fn take_from_env() -> Result<usize, String> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").ok();
    for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(v);
    }
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(0);
    };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
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
            .map(canonical);
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

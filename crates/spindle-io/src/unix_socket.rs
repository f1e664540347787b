//! Unix listening sockets whose path appears only once they accept.
//!
//! `bind(2)` makes the socket file before `listen(2)` makes it accept: a
//! client that waits for the file (a test, a QEMU started by a script, a
//! management tool) and connects in between gets `ECONNREFUSED`. Binding
//! under a temporary name beside the path and renaming it into place
//! closes that window: whoever sees the path can connect.

use std::io;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The suffix of the temporary name: `.PID.SEQ.tmp`.
fn temporary_suffix(seq: u64) -> String {
    format!(".{}.{seq}.tmp", std::process::id())
}

/// The path a socket bound by [`listen_unix`] was published at, from the
/// name the kernel reports for it (`getsockname` gives the temporary name
/// it was bound under): a socket handed to another process is known by
/// its published path. Other names come back as they are.
pub fn published_path(bound: &Path) -> PathBuf {
    let Some(name) = bound.file_name().and_then(|n| n.to_str()) else {
        return bound.to_owned();
    };
    let mut parts = name.rsplitn(4, '.');
    let (tmp, seq, pid, stem) = (parts.next(), parts.next(), parts.next(), parts.next());
    let digits = |s: Option<&str>| s.is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()));
    match (tmp, stem) {
        (Some("tmp"), Some(stem)) if digits(seq) && digits(pid) && !stem.is_empty() => bound.with_file_name(stem),
        _ => bound.to_owned(),
    }
}

/// Longest socket path the kernel takes (`sun_path` less its NUL).
const SUN_PATH_MAX: usize = 107;

/// Binds and listens at `path`; the path appears only once the socket
/// accepts connections. Whatever is at `path` is replaced: a caller that
/// must not take over a live socket checks that first. Where a temporary
/// name beside `path` would be too long for a socket address, binds at
/// `path` directly (with the window).
pub fn listen_unix(path: &Path) -> io::Result<UnixListener> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(temporary_suffix(SEQ.fetch_add(1, Ordering::Relaxed)));
    let tmp = PathBuf::from(tmp);
    if tmp.as_os_str().len() > SUN_PATH_MAX {
        return UnixListener::bind(path);
    }
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn the_path_accepts_as_soon_as_it_exists_and_nothing_else_is_left() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("s.sock");
        std::fs::write(&path, b"stale").unwrap();
        let l = listen_unix(&path).unwrap();
        UnixStream::connect(&path).unwrap();
        assert!(l.accept().is_ok());
        let bound = l.local_addr().unwrap().as_pathname().unwrap().to_owned();
        assert_ne!(bound, path, "bound under a temporary name");
        assert_eq!(published_path(&bound), path);
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["s.sock"]);
    }

    #[test]
    fn other_names_are_their_own_published_path() {
        for p in [
            "/run/a.sock",
            "/run/a.1.tmp",
            "/run/a.x.1.tmp",
            "/run/.1.2.tmp",
            "/run/a.1.2.tmpx",
            "/",
        ] {
            assert_eq!(published_path(Path::new(p)), Path::new(p), "{p}");
        }
        assert_eq!(published_path(Path::new("/run/a.b.7.0.tmp")), Path::new("/run/a.b"));
    }

    #[test]
    fn a_path_too_long_for_a_temporary_name_is_bound_directly() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().as_os_str().len() + 1;
        let path = d.path().join("x".repeat(SUN_PATH_MAX - base));
        assert_eq!(path.as_os_str().len(), SUN_PATH_MAX);
        let _l = listen_unix(&path).unwrap();
        UnixStream::connect(&path).unwrap();
    }

    #[test]
    fn a_missing_directory_fails_and_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let err = listen_unix(&d.path().join("no/s.sock")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }
}

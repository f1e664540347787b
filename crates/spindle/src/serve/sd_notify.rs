//! sd_notify(3): how `spindle serve` tells systemd (or anything else that
//! sets `NOTIFY_SOCKET`) where it stands, for `Type=notify` units
//! (contrib/systemd, docs/operations.md "systemd").
//!
//! - `READY=1` once every export (and the control socket) listens, with
//!   `STATUS=` saying how many exports it serves;
//! - `STOPPING=1` at SIGINT or SIGTERM;
//! - a planned handover (SIGUSR2, handover.rs) is a reload whose new
//!   process becomes the main one: the old process says `RELOADING=1`
//!   when it starts; the new one, once it serves and before it tells the
//!   old one so, says `MAINPID=<its pid>` and `READY=1` (accepted with
//!   `NotifyAccess=all`); the old one then says `MAINPID=<new pid>` and
//!   `READY=1` itself before it exits, which is all a `NotifyAccess=main`
//!   unit hears. A handover that fails ends the reload with the old
//!   process's own `MAINPID=` and `READY=1` (it may have been named main
//!   already by a new process that then failed).
//!
//! Each message is one datagram; nothing is sent without `NOTIFY_SOCKET`.
//! The variable is left set, so a new process of a handover inherits it.

use std::os::unix::net::UnixDatagram;

/// Sends `state` (newline-separated assignments) to `NOTIFY_SOCKET`, if
/// set: a path, or `@NAME` for the abstract namespace. A failure is only
/// logged.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send(&path, state) {
        let first = state.lines().next().unwrap_or_default();
        eprintln!(
            "spindle: warning: cannot notify the service manager ({first}) at {}: {e}",
            path.to_string_lossy()
        );
    }
}

fn send(path: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    let s = UnixDatagram::unbound()?;
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        s.send_to_addr(state.as_bytes(), &addr)?
    } else if bytes.first() == Some(&b'/') {
        s.send_to(state.as_bytes(), path)?
    } else {
        // systemd also knows vsock: addresses; Spindle does not.
        return Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "not an absolute path or @abstract name",
        ));
    };
    if sent != state.len() {
        return Err(std::io::Error::other("the message was cut short"));
    }
    Ok(())
}

/// `CLOCK_MONOTONIC` in microseconds (`MONOTONIC_USEC=` of a reload).
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given, which is
    // valid and writable; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

fn serving(exports: usize) -> String {
    format!("serving {exports} export(s)")
}

/// Every export listens. `handover`: this process was started by a
/// handover and is to be the main one.
pub fn ready(exports: usize, handover: bool) {
    let status = serving(exports);
    match handover {
        true => notify(&format!("MAINPID={}\nREADY=1\nSTATUS={status}", std::process::id())),
        false => notify(&format!("READY=1\nSTATUS={status}")),
    }
}

/// SIGUSR2: a handover starts.
pub fn reloading() {
    notify(&format!(
        "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=SIGUSR2: handing the sockets over to a new process",
        monotonic_usec()
    ));
}

/// The handover worked: `pid` serves now, this process exits.
pub fn handed_over(pid: u32) {
    notify(&format!("MAINPID={pid}\nREADY=1"));
}

/// The handover failed: this process serves on, as the main one.
pub fn handover_failed(exports: usize) {
    notify(&format!(
        "MAINPID={}\nREADY=1\nSTATUS={}; the last handover (SIGUSR2) failed, see the log",
        std::process::id(),
        serving(exports)
    ));
}

/// SIGINT or SIGTERM (`signal`): the exports are being stopped.
pub fn stopping(signal: &str) {
    notify(&format!(
        "STOPPING=1\nSTATUS={signal}: finishing in-flight requests, flushing, exiting"
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_a_path_and_an_abstract_socket() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("notify.sock");
        let rx = UnixDatagram::bind(&path).unwrap();
        send(path.as_os_str(), "READY=1\nSTATUS=x").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=x");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("spindle-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        send(std::ffi::OsStr::new(&format!("@{name}")), "STOPPING=1").unwrap();
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");

        assert!(send(std::ffi::OsStr::new("vsock:2:1234"), "READY=1").is_err());
        assert!(send(d.path().join("nobody-listens").as_os_str(), "READY=1").is_err());
    }

    #[test]
    fn the_monotonic_clock_is_read_in_microseconds() {
        let a = monotonic_usec();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let b = monotonic_usec();
        assert!((15_000..5_000_000).contains(&(b - a)), "{a} {b}");
    }
}

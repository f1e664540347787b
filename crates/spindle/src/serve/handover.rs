//! Planned restart: a running `spindle serve` hands its listening sockets
//! to a new `spindle serve` (SIGUSR2), for an upgrade.
//!
//! The old process starts the binary it was started from (the path is
//! resolved at start-up: after an upgrade `/proc/self/exe` names the old,
//! deleted file) with its export sockets and its control socket as
//! inherited descriptors, in socket activation's `LISTEN_FDS` /
//! `LISTEN_FDNAMES` format (activation.rs), and its current exports
//! (including those added with `ctl add`) as a config file in a memfd
//! (`--config /proc/self/fd/N`). A socket pair between the two carries
//! the steps, one line each:
//!
//! 1. new → old `ready`: the new process parsed its configuration and
//!    took the sockets. Until then nothing was stopped, so a new binary or
//!    configuration that fails costs nothing: the old one keeps serving.
//! 2. old → new `released STATES`: the old process stopped its exports
//!    as SIGTERM does (accepted requests finish, images flushed and
//!    closed, locks released), leaving the sockets open and their files in
//!    place. STATES is a letter per export of the configuration, in its
//!    order: the migration state it stopped in (`a` active, `n` incoming,
//!    `i` inactive), which the config file has too but may have changed
//!    meanwhile (a frontend that stopped its device and is disconnected
//!    hands the image over). An export that is not active is opened as
//!    `--incoming` is: a look at the image, holding only the shared lock,
//!    until its frontend starts the device. Or, when an export did not
//!    stop cleanly, `abort`: the new process exits without opening an
//!    image, and the old one serves its exports again.
//! 3. new → old `serving`: the new process opened the images and serves;
//!    the old one exits 0. If instead the new one fails or goes silent,
//!    the old one serves its exports again on the same sockets.
//!
//! The listening sockets never close, so a frontend that connects
//! meanwhile waits in the backlog and is served by the new process.

use super::activation;
use super::metrics::listen::Listening;
use super::server::{Server, STOP_TIMEOUT};
use super::spec::ExportSpec;
use serde::Serialize;
use spindle_export::device::Migration;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// In the new process: `CHANNEL,CONFIG`, the descriptors of its end of
/// the socket pair and of the config memfd.
pub const FDS_VAR: &str = "SPINDLE_HANDOVER_FDS";
/// How long the new process may take to parse its configuration.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the new process may take to open the images and serve.
pub const SERVE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the new process waits for the old one to release the images.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(STOP_TIMEOUT.as_secs() + 15);

/// How long a new process told to quit may take to exit.
const ABORT_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest step line read: the steps are single words (`released`
/// has a letter per export more).
const MAX_STEP: u64 = 64;

static EXE: OnceLock<PathBuf> = OnceLock::new();
/// A descriptor of the control socket and its path, once it listens.
static CONTROL: Mutex<Option<(OwnedFd, PathBuf)>> = Mutex::new(None);

/// Records the path the running binary was started by. Call at start-up,
/// before the binary can have been replaced (or the directory changed).
pub fn remember_exe() {
    let argv0 = std::env::args_os().next().map(PathBuf::from);
    let path = std::env::var_os("PATH");
    let found = argv0.and_then(|a| exe_path(&a, path.as_deref(), |p| p.is_file()));
    if let Some(p) = found.or_else(|| std::env::current_exe().ok()) {
        let _ = EXE.set(p);
    }
}

/// Where `argv0` names the binary: made absolute when it has a '/', else
/// the first match in `path` (as the shell found it). Symbolic links are
/// not followed, so pointing a link at a new build is an upgrade too.
fn exe_path(argv0: &Path, path: Option<&std::ffi::OsStr>, exists: impl Fn(&Path) -> bool) -> Option<PathBuf> {
    if argv0.as_os_str().is_empty() {
        return None;
    }
    if argv0.as_os_str().as_encoded_bytes().contains(&b'/') {
        return std::path::absolute(argv0).ok();
    }
    std::env::split_paths(path?)
        .filter(|d| d.is_absolute())
        .map(|d| d.join(argv0))
        .find(|p| exists(p))
}

/// Records the control socket, to be handed over with the exports.
pub fn set_control(listener: &UnixListener, path: &Path) -> std::io::Result<()> {
    let fd = OwnedFd::from(listener.try_clone()?);
    if let Ok(mut c) = CONTROL.lock() {
        *c = Some((fd, path.to_owned()));
    }
    Ok(())
}

/// The config file handed to the new process.
#[derive(Serialize)]
struct Config<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    control: Option<&'a Path>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nbd: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nbd_tls_creds: Option<&'a Path>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nbd_iothreads: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nbd_poll_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics: Option<&'a str>,
    #[serde(rename = "export")]
    exports: Vec<&'a ExportSpec>,
}

/// The listening sockets being handed over, index-aligned.
struct Sockets {
    fds: Vec<OwnedFd>,
    names: Vec<String>,
    paths: Vec<PathBuf>,
    /// The control socket's index in `fds`, if there is one.
    control: Option<usize>,
}

fn io_err(what: &str) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// A name for `LISTEN_FDNAMES` (which separates names with ':').
fn fd_name(name: &str) -> String {
    match name.contains(':') || name.is_empty() {
        true => "unknown".into(),
        false => name.into(),
    }
}

fn collect(exports: &[(ExportSpec, std::sync::Arc<spindle_vhost::Export>)]) -> Result<Sockets, String> {
    let mut s = Sockets {
        fds: Vec::new(),
        names: Vec::new(),
        paths: Vec::new(),
        control: None,
    };
    for (spec, e) in exports {
        let name = spec.name();
        let fd = e
            .clone_listener()
            .ok_or_else(|| format!("export '{name}' stopped meanwhile"))?
            .map_err(io_err(&format!("export '{name}': cannot duplicate its socket")))?;
        s.fds.push(fd);
        s.names.push(fd_name(&name));
        s.paths.push(e.socket.clone());
    }
    if let Some((fd, path)) = CONTROL.lock().ok().as_ref().and_then(|c| c.as_ref()) {
        s.control = Some(s.fds.len());
        s.fds
            .push(fd.try_clone().map_err(io_err("cannot duplicate the control socket"))?);
        s.names.push("control".into());
        s.paths.push(path.clone());
    }
    Ok(s)
}

/// A memfd holding `text`.
fn memfd(text: &str) -> Result<OwnedFd, String> {
    let mut f = spindle_io::memfd::create(c"spindle-handover", false).map_err(|e| format!("memfd_create: {e}"))?;
    f.write_all(text.as_bytes())
        .map_err(io_err("writing the configuration"))?;
    Ok(OwnedFd::from(f))
}

/// A copy of `fd` numbered `min` or higher (close-on-exec).
fn above(fd: &OwnedFd, min: RawFd) -> Result<OwnedFd, String> {
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) on an open descriptor; checked below.
    let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min) };
    if n < 0 {
        return Err(format!("dup: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: fcntl just created this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

/// Starts `exe serve` with `fds` as descriptors 3, 4, ... (nothing else
/// inherited), `sockets` of them counted in `LISTEN_FDS`.
fn spawn(exe: &Path, fds: &[&OwnedFd], s: &Sockets, delay_io: Option<&str>) -> Result<Child, String> {
    let n = s.fds.len();
    let first = 3;
    // Above every target number, so no dup2 below overwrites a source.
    let base = first + fds.len() as RawFd;
    let raised = fds.iter().map(|f| above(f, base)).collect::<Result<Vec<_>, _>>()?;
    let raw: Vec<RawFd> = raised.iter().map(AsRawFd::as_raw_fd).collect();
    let (config, channel) = (first + n as RawFd, first + n as RawFd + 1);
    let mut cmd = Command::new(exe);
    cmd.arg("serve").arg("--config").arg(format!("/proc/self/fd/{config}"));
    if let Some(plan) = delay_io {
        cmd.arg("--x-delay-io").arg(plan);
    }
    cmd.env("LISTEN_FDS", n.to_string())
        .env("LISTEN_FDNAMES", s.names.join(":"))
        .env(activation::HANDOVER_FROM, std::process::id().to_string())
        .env(FDS_VAR, format!("{channel},{config}"))
        .env_remove("LISTEN_PID")
        .stdin(Stdio::null());
    // SAFETY: the closure runs in the child between fork and exec and only
    // calls dup2 (async-signal-safe) on descriptors open in the parent
    // until spawn returns (`raised`), so open in the child too.
    unsafe {
        cmd.pre_exec(move || {
            for (i, &fd) in raw.iter().enumerate() {
                // SAFETY: dup2 on two descriptor numbers, no memory passed.
                if libc::dup2(fd, first + i as RawFd) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    drop(raised);
    Ok(child)
}

/// Reads one step line (at most [`MAX_STEP`] bytes); `None` at the end
/// (the other side is gone).
fn step(chan: &mut BufReader<UnixStream>, limit: Duration) -> Result<Option<String>, std::io::Error> {
    step_max(chan, limit, MAX_STEP)
}

/// [`step`], for a line of at most `max` bytes.
fn step_max(chan: &mut BufReader<UnixStream>, limit: Duration, max: u64) -> Result<Option<String>, std::io::Error> {
    use std::io::Read;
    chan.get_ref().set_read_timeout(Some(limit))?;
    let mut line = String::new();
    match chan.by_ref().take(max).read_line(&mut line)? {
        0 => Ok(None),
        _ => Ok(Some(line.trim_end().to_string())),
    }
}

/// Why the new process did not reach `want`: it ended, or went silent (it
/// is then killed).
fn failed(child: &mut Child, got: Result<Option<String>, std::io::Error>, want: &str, limit: Duration) -> String {
    let ended = |child: &mut Child| match child.wait() {
        Ok(st) => format!("the new process ({}) ended ({st}) before it was {want}", child.id()),
        Err(e) => format!("the new process ended before it was {want} ({e})"),
    };
    match got {
        Ok(None) => ended(child),
        Ok(Some(line)) => {
            let _ = child.kill();
            let _ = child.wait();
            format!("the new process said {line:?} instead of {want:?}; it was stopped")
        }
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            let _ = child.kill();
            let _ = child.wait();
            format!(
                "the new process ({}) was not {want} within {} s; it was stopped",
                child.id(),
                limit.as_secs()
            )
        }
        Err(e) => {
            let _ = child.kill();
            format!("{} ({e})", ended(child))
        }
    }
}

/// A migration state as a letter of the `released` step.
fn letter(m: Migration) -> char {
    match m {
        Migration::Active => 'a',
        Migration::Incoming => 'n',
        Migration::Inactive => 'i',
    }
}

/// The states of a `released` step line; `None` for a plain `released`
/// (or letters not understood: the configuration's states then hold).
fn released_states(line: &str) -> Option<Vec<Migration>> {
    let letters = line.strip_prefix("released ")?;
    letters
        .chars()
        .map(|c| match c {
            'a' => Some(Migration::Active),
            'n' => Some(Migration::Incoming),
            'i' => Some(Migration::Inactive),
            _ => None,
        })
        .collect()
}

/// Hands every export and the control socket to a new process; returns
/// its pid once it serves (the caller then exits). On an error the old
/// process serves as before and the error says what happened.
///
/// The metrics endpoint (`metrics`) is stopped when the NBD listener is,
/// before the exports are released, and the new process listens at the
/// same address; after a failed handover the caller listens again.
pub fn hand_over(server: &Server, delay_io: Option<&str>, metrics: Option<&Listening>) -> Result<u32, String> {
    let exe = EXE.get().ok_or("the path of the running binary is unknown")?.clone();
    let exports = server.close_for_handover();
    let nbd = server.nbd().map(|f| f.options());
    let prepared = prepare(&exe, &exports, (nbd, metrics.map(|m| m.addr.as_str())), delay_io);
    let (mut child, mut chan, sockets) = match prepared {
        Ok(p) => p,
        Err(e) => {
            server.reopen();
            return Err(e);
        }
    };
    // The new one is ready: stop the exports, leaving the sockets to it.
    let owned: Vec<bool> = exports.iter().map(|(_, e)| e.owns_socket_file()).collect();
    for (_, e) in &exports {
        e.leave_socket_file();
    }
    // The new process binds the NBD address once the exports are free:
    // this one's NBD clients are disconnected (they reconnect to it).
    if let Some(f) = server.nbd() {
        f.stop();
    }
    if let Some(m) = metrics {
        m.stop();
    }
    let stopped = server.remove_all();
    // The state each export stopped in. The last references to the old
    // devices go here (an export that stopped closed its image already).
    let specs: Vec<ExportSpec> = exports
        .into_iter()
        .map(|(s, e)| s.in_state(e.dev.migration()))
        .collect();
    if let Err(e) = stopped {
        // The images may still be held here: the new one must not start.
        let quit = abort(&mut child, chan);
        return Err(format!(
            "not every export stopped ({e}); {quit}; {}",
            serve_again(server, &specs, sockets, &owned)
        ));
    }
    let states: String = specs.iter().map(|s| letter(s.state())).collect();
    let _ = chan.get_mut().write_all(format!("released {states}\n").as_bytes());
    match step(&mut chan, SERVE_TIMEOUT) {
        Ok(Some(l)) if l == "serving" => Ok(child.id()),
        got => {
            let why = failed(&mut child, got, "serving", SERVE_TIMEOUT);
            Err(format!("{why}; {}", serve_again(server, &specs, sockets, &owned)))
        }
    }
}

/// Tells the new process to quit before it opened any image, and waits
/// for it (killing it if it does not go): what happened, for the log.
fn abort(child: &mut Child, mut chan: BufReader<UnixStream>) -> String {
    let _ = chan.get_mut().write_all(b"abort\n");
    let pid = child.id();
    match step(&mut chan, ABORT_TIMEOUT) {
        Ok(None) => match child.wait() {
            Ok(st) => format!("the new process ({pid}) was told to quit ({st})"),
            Err(e) => format!("the new process ({pid}) was told to quit ({e})"),
        },
        _ => {
            let _ = child.kill();
            let _ = child.wait();
            format!("the new process ({pid}) did not quit when told; it was stopped")
        }
    }
}

type Prepared = (Child, BufReader<UnixStream>, Sockets);

/// Starts the new process and waits until it is ready; nothing stopped.
fn prepare(
    exe: &Path,
    exports: &[(ExportSpec, std::sync::Arc<spindle_vhost::Export>)],
    (nbd, metrics): (Option<&super::nbd::NbdOptions>, Option<&str>),
    delay_io: Option<&str>,
) -> Result<Prepared, String> {
    if exports.is_empty() {
        return Err("there are no exports to hand over".into());
    }
    let sockets = collect(exports)?;
    let config = Config {
        control: sockets.control.map(|i| sockets.paths[i].as_path()),
        nbd: nbd.map(|o| o.addr.spelling()),
        nbd_tls_creds: nbd.and_then(|o| o.tls_creds.as_deref()),
        nbd_iothreads: nbd.map(|o| o.iothreads),
        nbd_poll_us: nbd.map(|o| o.poll_us),
        metrics,
        exports: exports.iter().map(|(s, _)| s).collect(),
    };
    let text = toml::to_string(&config).map_err(|e| format!("writing the configuration: {e}"))?;
    let config = memfd(&text)?;
    let (mine, theirs) = UnixStream::pair().map_err(io_err("socketpair"))?;
    let theirs = OwnedFd::from(theirs);
    let mut fds: Vec<&OwnedFd> = sockets.fds.iter().collect();
    fds.push(&config);
    fds.push(&theirs);
    let mut child = spawn(exe, &fds, &sockets, delay_io)?;
    // Only the new process holds its end now: its exit ends the channel.
    drop(theirs);
    let mut chan = BufReader::new(mine);
    match step(&mut chan, READY_TIMEOUT) {
        Ok(Some(l)) if l == "ready" => Ok((child, chan, sockets)),
        got => Err(failed(&mut child, got, "ready", READY_TIMEOUT)),
    }
}

/// After a failed handover: serves `specs` again on the sockets kept
/// (`owned[i]`: whether export i bound its socket file itself). The socket
/// of an export that cannot be served again is closed, and its file
/// removed as a remove would.
fn serve_again(server: &Server, specs: &[ExportSpec], sockets: Sockets, owned: &[bool]) -> String {
    server.reopen();
    let control = sockets.control;
    for (i, (fd, path)) in sockets.fds.into_iter().zip(&sockets.paths).enumerate() {
        if Some(i) != control {
            activation::give_back(UnixListener::from(fd), path);
        }
    }
    // Active exports first: an export sharing its image with another
    // (a same-daemon migration) shares the one opened for serving.
    let mut order: Vec<usize> = (0..specs.len()).collect();
    order.sort_by_key(|&i| specs[i].state() != Migration::Active);
    let mut errors = Vec::new();
    for i in order {
        let (spec, path) = (&specs[i], &sockets.paths[i]);
        let Err(e) = server.add(spec.clone()) else { continue };
        let name = spec.name();
        drop(activation::claim_path(path));
        if owned.get(i).copied().unwrap_or(false) {
            let _ = std::fs::remove_file(path);
        }
        eprintln!(
            "spindle: handover: export '{name}' cannot be served again ({e}); its socket {} is closed",
            path.display()
        );
        errors.push(format!("{name}: {e}"));
    }
    match errors.is_empty() {
        true => format!("serving the {} export(s) here again", specs.len()),
        false => format!("serving again here failed: {}", errors.join("; ")),
    }
}

/// The new process's side of a handover.
pub struct Incoming {
    chan: BufReader<UnixStream>,
    config: Option<OwnedFd>,
}

/// Takes descriptor `fd` (close-on-exec from now on).
fn take_fd(fd: RawFd) -> Result<OwnedFd, String> {
    // SAFETY: fcntl on a descriptor number, no memory passed; a closed
    // number fails with EBADF.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(format!("{FDS_VAR}: descriptor {fd} is not open"));
    }
    // SAFETY: the handing-over parent passed this descriptor for this
    // process alone (checked by the caller: not one of the sockets, not
    // taken twice), and this runs once, at start-up.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Incoming {
    /// This process's side of a handover, if its parent started it for
    /// one. Call once at start-up, before activation::take_from_env (which
    /// clears the variables checked here) and before other threads start.
    pub fn take_from_env() -> Result<Option<Incoming>, String> {
        let fds = std::env::var(FDS_VAR).ok();
        std::env::remove_var(FDS_VAR);
        let Some(fds) = fds else { return Ok(None) };
        let from = std::env::var(activation::HANDOVER_FROM).ok();
        if from.and_then(|f| f.trim().parse::<u32>().ok()) != Some(std::os::unix::process::parent_id()) {
            return Ok(None);
        }
        let sockets: RawFd = std::env::var("LISTEN_FDS")
            .ok()
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        let parsed: Vec<RawFd> = fds.split(',').filter_map(|f| f.trim().parse().ok()).collect();
        let [chan, config] = parsed[..] else {
            return Err(format!("{FDS_VAR}={fds}: want two descriptor numbers"));
        };
        if chan == config || chan.min(config) < 3 + sockets {
            return Err(format!("{FDS_VAR}={fds}: descriptors overlap the sockets"));
        }
        let chan = UnixStream::from(take_fd(chan)?);
        let config = take_fd(config)?;
        Ok(Some(Incoming {
            chan: BufReader::new(chan),
            config: Some(config),
        }))
    }

    /// Tells the old process this one is ready and waits until it released
    /// the images (or is gone). Returns the migration state each export
    /// stopped in, in the configuration's order, when the old process said
    /// them; an error when it told this one to quit (it could not release
    /// every image).
    pub fn ready_and_wait(&mut self) -> Result<Option<Vec<Migration>>, String> {
        self.config = None;
        if self.chan.get_mut().write_all(b"ready\n").is_err() {
            return Ok(None); // the old process is gone
        }
        // A letter per export: bounded by the descriptors the old one has.
        let max = MAX_STEP + activation::MAX_FDS as u64;
        match step_max(&mut self.chan, RELEASE_TIMEOUT, max) {
            Ok(Some(l)) if l == "abort" => Err("the old process could not release its exports and serves them \
                 on; exiting without opening an image"
                .into()),
            Ok(Some(l)) if l == "released" || l.starts_with("released ") => Ok(released_states(&l)),
            Ok(None) => {
                eprintln!("spindle: handover: the old process went away; serving");
                Ok(None)
            }
            Ok(Some(l)) => {
                eprintln!("spindle: handover: the old process said {l:?}; serving");
                Ok(None)
            }
            Err(e) => {
                eprintln!("spindle: handover: no word from the old process ({e}); serving");
                Ok(None)
            }
        }
    }

    /// Tells the old process this one serves.
    pub fn serving(mut self) {
        let _ = self.chan.get_mut().write_all(b"serving\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_binary_is_found_as_it_was_started() {
        let path = std::ffi::OsStr::new("/nope:relative/dir:/usr/local/bin:/usr/bin");
        let at = |want: &'static str| move |p: &Path| p == Path::new(want);
        assert_eq!(
            exe_path(Path::new("spindle"), Some(path), at("/usr/bin/spindle")),
            Some(PathBuf::from("/usr/bin/spindle"))
        );
        // A directory that is not absolute is skipped, as the kernel would.
        assert_eq!(
            exe_path(Path::new("spindle"), Some(path), at("relative/dir/spindle")),
            None
        );
        assert_eq!(exe_path(Path::new("spindle"), None, at("/usr/bin/spindle")), None);
        assert_eq!(
            exe_path(Path::new("/opt/s/spindle"), Some(path), |_| false),
            Some(PathBuf::from("/opt/s/spindle"))
        );
        let rel = exe_path(Path::new("./target/spindle"), None, |_| false).unwrap();
        assert!(rel.is_absolute() && rel.ends_with("target/spindle"), "{rel:?}");
        assert_eq!(exe_path(Path::new(""), Some(path), |_| true), None);
    }

    #[test]
    fn fd_names_never_carry_the_separator() {
        assert_eq!(fd_name("vm1"), "vm1");
        assert_eq!(fd_name("a:b"), "unknown");
        assert_eq!(fd_name(""), "unknown");
    }

    #[test]
    fn the_config_handed_over_reads_back_as_the_same_exports() {
        let spec = ExportSpec {
            image: "/x/vm1.qcow2".into(),
            socket: "/run/vm1.sock".into(),
            name: Some("vm1".into()),
            iothreads: Some(2),
            readonly: true,
            ..Default::default()
        };
        let text = toml::to_string(&Config {
            control: Some(Path::new("/run/ctl")),
            nbd: Some("unix:/run/nbd.sock".into()),
            nbd_tls_creds: None,
            nbd_iothreads: Some(2),
            nbd_poll_us: Some(7),
            metrics: Some("127.0.0.1:9177"),
            exports: vec![&spec, &spec],
        })
        .unwrap();
        let dir = std::env::temp_dir().join(format!("spindle-handover-{}", std::process::id()));
        std::fs::write(&dir, &text).unwrap();
        let back = super::super::spec::ConfigFile::load(&dir).unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(back.control.as_deref(), Some(Path::new("/run/ctl")));
        assert_eq!(
            (back.nbd.as_deref(), back.nbd_iothreads, back.nbd_poll_us),
            (Some("unix:/run/nbd.sock"), Some(2), Some(7))
        );
        assert_eq!(back.metrics.as_deref(), Some("127.0.0.1:9177"));
        assert_eq!(back.exports.len(), 2);
        let b = &back.exports[1];
        assert_eq!(
            (b.image.as_str(), b.socket.as_path()),
            ("/x/vm1.qcow2", Path::new("/run/vm1.sock"))
        );
        assert_eq!(
            (b.name.as_deref(), b.iothreads, b.readonly),
            (Some("vm1"), Some(2), true)
        );
        assert_eq!((b.cache.as_deref(), b.queue_size), (None, None));
    }

    #[test]
    fn a_step_line_ends_and_times_out() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut a = BufReader::new(a);
        b.write_all(b"ready\n").unwrap();
        assert_eq!(step(&mut a, Duration::from_secs(5)).unwrap().as_deref(), Some("ready"));
        let e = step(&mut a, Duration::from_millis(20)).unwrap_err();
        assert!(matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut));
        // A line that does not end is cut at the limit.
        b.write_all(&[b'x'; 1000]).unwrap();
        let long = step(&mut a, Duration::from_secs(5)).unwrap().unwrap();
        assert_eq!(long.len(), MAX_STEP as usize);
        drop(b);
        let rest = std::iter::from_fn(|| step(&mut a, Duration::from_secs(5)).unwrap()).count();
        assert_eq!(rest, (1000 - 64) / 64 + 1);
    }

    #[test]
    fn released_carries_a_state_per_export() {
        let all = [Migration::Active, Migration::Incoming, Migration::Inactive];
        let line = format!("released {}", all.iter().map(|&m| letter(m)).collect::<String>());
        assert_eq!(released_states(&line), Some(all.to_vec()));
        assert_eq!(released_states("released"), None);
        assert_eq!(released_states("released ax"), None);
    }

    /// An export that does not stop: the new process is told to quit
    /// (never `released`), the other export is served here again, and the
    /// socket of the one that cannot be is closed, its file removed.
    #[test]
    fn a_handover_whose_exports_do_not_all_stop_is_called_off() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        // Stands in for the new binary: says ready, writes down what it
        // is told next, and exits.
        let exe = dir.join("new-spindle");
        std::fs::write(
            &exe,
            "#!/bin/sh\nch=${SPINDLE_HANDOVER_FDS%,*}\neval \"echo ready >&$ch\"\n\
             eval \"read line <&$ch\"\necho \"$line\" > \"$0.said\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        EXE.set(exe.clone()).expect("no other test sets the binary");
        let server = Server::with_stop_timeout(Duration::from_millis(300));
        let spec = |name: &str| ExportSpec {
            image: "null:1M".into(),
            socket: dir.join(format!("{name}.sock")),
            name: Some(name.into()),
            ..Default::default()
        };
        server.add(spec("fine")).unwrap();
        server.add(spec("stuck")).unwrap();
        let gate = server.gate("stuck");
        let held = gate.lock().unwrap();
        let err = hand_over(&server, None, None).unwrap_err();
        drop(held);
        assert!(
            err.contains("not every export stopped") && err.contains("'stuck' has not stopped"),
            "{err}"
        );
        assert!(err.contains("was told to quit (exit status: 0)"), "{err}");
        let said = std::fs::read_to_string(dir.join("new-spindle.said")).unwrap();
        assert_eq!(said.trim(), "abort", "the new process must not be told {said:?}");
        assert!(
            err.contains("stuck: an export named 'stuck' is still being removed"),
            "{err}"
        );
        let running: Vec<_> = server.list().into_iter().filter(|e| e.state == "running").collect();
        assert_eq!(running.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(), ["fine"]);
        UnixStream::connect(dir.join("fine.sock")).expect("'fine' is served again");
        assert!(!dir.join("stuck.sock").exists(), "the socket file of 'stuck' is left");
        server.remove_all().unwrap();
    }
}

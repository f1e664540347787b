//! The set of exports, shared by the main thread (signals) and the control
//! socket (hot plug). This lock is control-plane only: the data path never
//! takes it, and no slow work (opening an image, binding a socket, joining
//! a thread, resizing) is done while it is held.
//!
//! A name and its socket stay taken from the moment an `add` starts until
//! the export's thread has ended, so a new export can never bind a socket
//! that an old one is still serving or about to delete.

use super::nbd::NbdFront;
use super::spec::ExportSpec;
use crate::error::{CliResult, Error};
use crate::img::{human_size, size_arg};
use serde::Serialize;
use spindle_export::device::Migration;
use spindle_export::stats::OpSummary;
use spindle_io::{Runtime, RuntimeConfig};
use spindle_vhost::Export;
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long `remove` and shutdown wait for an export to stop: the vhost
/// backend's drain of accepted requests (60 s at most) plus the final flush.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(75);
/// How long a resize waits for another resize (or a remove) of the same
/// export to finish.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Exports a sandboxed server (the fuzz harness's) accepts at once.
const SANDBOX_EXPORTS: usize = 4;

/// The thread serving an export.
type ExportThread = JoinHandle<Result<(), spindle_vhost::Error>>;

struct Running {
    export: Arc<Export>,
    spec: ExportSpec,
    thread: ExportThread,
    /// Held by a resize and by the removal: one change of an export at a
    /// time. `true` once the export is being removed.
    gate: Arc<Mutex<bool>>,
}

enum Slot {
    /// An `add` is opening the image; the name and socket are taken.
    Starting {
        socket: PathBuf,
    },
    Running(Running),
    /// Being removed; the name and socket stay taken until its thread ended.
    Stopping {
        export: Arc<Export>,
        spec: ExportSpec,
    },
}

impl Slot {
    fn socket(&self) -> &Path {
        match self {
            Slot::Starting { socket } => socket,
            Slot::Running(r) => &r.export.socket,
            Slot::Stopping { export, .. } => &export.socket,
        }
    }
}

#[derive(Default)]
struct State {
    slots: BTreeMap<String, Slot>,
    /// SIGINT or SIGTERM arrived, or a handover runs: no new exports.
    closing: bool,
    /// A planned handover runs: no export is added or removed.
    handover: bool,
}

impl State {
    /// Why no export can be added now, if none can.
    fn refusal(&self) -> Option<Error> {
        match (self.handover, self.closing) {
            (true, _) => Some(refused(HANDOVER_RUNS.into())),
            (false, true) => Some(refused("the server is shutting down".into())),
            (false, false) => None,
        }
    }
}

/// The refusal of `add` and `remove` while a handover runs.
const HANDOVER_RUNS: &str = "a handover is in progress (SIGUSR2); try again once it is over";

/// The exports by name.
pub struct Server {
    state: Arc<Mutex<State>>,
    /// The NBD front end (`--nbd`), once it listens.
    nbd: OnceLock<Arc<NbdFront>>,
    stop_timeout: Duration,
    /// Only `null:` images, sockets inside this directory (fuzz harness).
    sandbox: Option<PathBuf>,
    /// Named throttle groups.
    throttles: super::throttle::Groups,
}

impl Default for Server {
    fn default() -> Server {
        Server {
            state: Arc::default(),
            nbd: OnceLock::new(),
            stop_timeout: STOP_TIMEOUT,
            sandbox: None,
            throttles: Default::default(),
        }
    }
}

/// What `list` reports of an export.
#[derive(Debug, Serialize)]
pub struct ExportInfo {
    /// Name.
    pub name: String,
    /// `running`, or `stopping` while a remove waits for it.
    pub state: &'static str,
    /// Image.
    pub image: String,
    /// Format.
    pub format: &'static str,
    /// Guest-visible size in bytes.
    pub size: u64,
    /// vhost-user socket.
    pub socket: String,
    /// A frontend is connected.
    pub connected: bool,
    /// Connections served so far.
    pub connections: u64,
    /// Writes refused.
    pub readonly: bool,
    /// The serial the guest reads (virtio-blk GET_ID).
    pub serial: String,
    /// I/O threads.
    pub iothreads: usize,
    /// Request queues offered.
    pub num_queues: u16,
    /// The guest's write cache is on (CONFIG_WCE); off means write-through.
    pub write_cache: bool,
    /// Offered over NBD (`--nbd`): its URI.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbd: Option<String>,
    /// NBD clients connected now.
    pub nbd_connections: usize,
    /// Live migration: `active`, `incoming` (a destination not started
    /// yet) or `inactive` (stopped for a migration, image handed over).
    pub migration: &'static str,
    /// Its throttle group and limits.
    pub throttle: serde_json::Value,
}

/// What `stats` reports of an export: every front end's requests.
#[derive(Debug, Serialize)]
pub struct Stats {
    /// Per operation, summed over vhost-user queues and NBD connections.
    pub stats: Vec<OpSummary>,
    /// Requests finished per vhost-user queue.
    pub queue_requests: Vec<u64>,
    /// Requests finished for NBD clients.
    pub nbd_requests: u64,
    /// NBD clients connected now.
    pub nbd_connections: usize,
    /// The export's throttle group, limits and throttled requests.
    pub throttle: serde_json::Value,
}

/// What makes two exports' images one image: a file's device and inode
/// (whatever path names it), or an RBD image's cluster (its monitors or
/// configuration file), pool, namespace, name and snapshot. `null:` and
/// NBD images are never one.
#[derive(Debug, PartialEq, Eq)]
enum ImageIdentity {
    File(u64, u64),
    Rbd(
        Option<String>,
        Option<PathBuf>,
        String,
        Option<String>,
        String,
        Option<String>,
    ),
}

fn image_identity(image: &str) -> Option<ImageIdentity> {
    use spindle_block::protocols::rbd::{is_rbd_spec, RbdSpec};
    use std::os::unix::fs::MetadataExt;
    if is_rbd_spec(image) {
        let s = RbdSpec::parse(image).ok()?;
        let conf = s.conf.map(|c| c.canonicalize().unwrap_or(c));
        return Some(ImageIdentity::Rbd(
            s.mon_host,
            conf,
            s.pool,
            s.namespace,
            s.image,
            s.snapshot,
        ));
    }
    if image.starts_with("null:") || spindle_block::protocols::nbd::is_nbd_spec(image) {
        return None;
    }
    std::fs::metadata(image)
        .ok()
        .map(|m| ImageIdentity::File(m.dev(), m.ino()))
}

fn refused(msg: String) -> Error {
    Error::Refused(msg)
}

/// Locks `m`; a panic elsewhere never leaves these maps half-changed, so a
/// poisoned lock is still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Server {
    /// A server that waits at most `stop_timeout` for an export to stop.
    pub fn with_stop_timeout(stop_timeout: Duration) -> Server {
        Server {
            stop_timeout,
            ..Server::default()
        }
    }

    /// A server for the fuzz harness: `add` accepts only `null:` images,
    /// at most a few at once, with relative socket paths taken inside `dir`.
    #[doc(hidden)]
    pub fn sandboxed(dir: &Path) -> Server {
        Server {
            sandbox: Some(dir.to_owned()),
            ..Server::with_stop_timeout(Duration::from_secs(10))
        }
    }

    fn confine(&self, mut spec: ExportSpec) -> CliResult<ExportSpec> {
        let Some(dir) = &self.sandbox else { return Ok(spec) };
        if !spec.image.starts_with("null:") {
            return Err(refused("sandbox: only null: images".into()));
        }
        if !spec.socket.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(refused(
                "sandbox: the socket must be a relative path without '..'".into(),
            ));
        }
        if lock(&self.state).slots.len() >= SANDBOX_EXPORTS {
            return Err(refused(format!("sandbox: at most {SANDBOX_EXPORTS} exports")));
        }
        spec.socket = dir.join(&spec.socket);
        Ok(spec)
    }

    /// Serves the exports over NBD too, from now on (set once, before
    /// the first `add`).
    pub fn set_nbd(&self, front: Arc<NbdFront>) {
        let _ = self.nbd.set(front);
    }

    /// The named throttle groups.
    pub fn throttles(&self) -> &super::throttle::Groups {
        &self.throttles
    }

    /// Sets the limits of `name`'s throttle group (its own, or the named
    /// group it is in); they apply from its next request.
    pub fn set_throttle(&self, name: &str, limits: &str) -> CliResult<serde_json::Value> {
        let (e, _) = self.running(name)?;
        let l = super::throttle::parse(&format!("export '{name}'"), limits)?;
        e.dev.throttle_group().set_limits(l);
        Ok(super::throttle::describe(&e.dev))
    }

    /// The NBD front end, if the daemon has one that listens.
    pub fn nbd(&self) -> Option<&Arc<NbdFront>> {
        self.nbd.get().filter(|f| f.is_listening())
    }

    /// Opens and starts serving `spec`.
    pub fn add(&self, spec: ExportSpec) -> CliResult<Arc<Export>> {
        let spec = spec.resolved()?;
        let limits = super::throttle::Groups::check(&spec)?;
        if spec.nbd == Some(true) && self.nbd().is_none() {
            return Err(refused(
                "this daemon serves no NBD (start it with --nbd ADDR, or nbd = \"ADDR\" in its config file)".into(),
            ));
        }
        let mut spec = self.confine(spec)?;
        // One spelling per socket, so two exports cannot share one.
        spec.socket = canonical(&spec.socket);
        let name = spec.name();
        self.reserve(&name, &spec.socket)?;
        let sibling = self.serving(&spec.image);
        if let (Some(other), Migration::Active) = (&sibling, spec.state()) {
            lock(&self.state).slots.remove(&name);
            return Err(refused(format!(
                "{}: image is in use: it is already served by export '{}'; a second export of one image \
                 must be a live migration's destination (--incoming, or incoming = true)",
                spec.image, other.dev.cfg.name
            )));
        }
        let started = start(&name, &spec, sibling.as_deref());
        let mut st = lock(&self.state);
        let (export, thread) = match started {
            Ok(s) if !st.closing => s,
            Ok((export, thread)) => {
                // Shutdown (or a handover) began while the image was
                // opening: close it again, then free the name (shutdown
                // waits for that).
                let why = st.refusal();
                drop(st);
                export.stop();
                let _ = thread.join();
                lock(&self.state).slots.remove(&name);
                return Err(why.unwrap_or_else(|| refused("the server is shutting down".into())));
            }
            Err(e) => {
                st.slots.remove(&name);
                return Err(e);
            }
        };
        if let Err(e) = self.throttles.apply(&spec, limits, &export.dev) {
            drop(st);
            export.stop();
            let _ = thread.join();
            lock(&self.state).slots.remove(&name);
            return Err(e);
        }
        if let (Some(front), false) = (self.nbd(), spec.nbd == Some(false)) {
            if let Err(e) = front.offer(&export.dev, &spec.image) {
                drop(st);
                export.stop();
                let _ = thread.join();
                lock(&self.state).slots.remove(&name);
                return Err(e);
            }
        }
        let running = Running {
            export: export.clone(),
            spec,
            thread,
            gate: Arc::default(),
        };
        st.slots.insert(name, Slot::Running(running));
        Ok(export)
    }

    /// The running export of the image `image` (a file, or an RBD image),
    /// if any.
    fn serving(&self, image: &str) -> Option<Arc<Export>> {
        let want = image_identity(image)?;
        lock(&self.state).slots.values().find_map(|s| match s {
            Slot::Running(r) if image_identity(&r.spec.image).as_ref() == Some(&want) => Some(r.export.clone()),
            _ => None,
        })
    }

    /// Takes `name` and `socket` for an export being added.
    fn reserve(&self, name: &str, socket: &Path) -> CliResult<()> {
        let mut st = lock(&self.state);
        if let Some(e) = st.refusal() {
            return Err(e);
        }
        match st.slots.get(name) {
            Some(Slot::Running(_)) => return Err(refused(format!("an export named '{name}' already exists"))),
            Some(Slot::Starting { .. }) => return Err(refused(format!("an export named '{name}' is being added"))),
            Some(Slot::Stopping { .. }) => {
                return Err(refused(format!(
                    "an export named '{name}' is still being removed; try again once it is gone"
                )))
            }
            None => {}
        }
        if let Some((other, _)) = st.slots.iter().find(|(_, s)| s.socket() == socket) {
            return Err(refused(format!(
                "socket {} is already used by export '{other}'",
                socket.display()
            )));
        }
        st.slots.insert(
            name.to_string(),
            Slot::Starting {
                socket: socket.to_owned(),
            },
        );
        Ok(())
    }

    /// Stops serving `name`: in-flight requests finish, the image is
    /// flushed and closed. Gives up waiting after the stop timeout; the
    /// export then stays listed as `stopping` until its thread ends.
    pub fn remove(&self, name: &str) -> CliResult<()> {
        let done = {
            let mut st = lock(&self.state);
            if st.handover {
                return Err(refused(HANDOVER_RUNS.into()));
            }
            match st.slots.remove(name) {
                Some(Slot::Running(r)) => self.begin_stop(&mut st, name, r),
                other => {
                    let msg = match &other {
                        Some(Slot::Starting { .. }) => format!("export '{name}' is still being added"),
                        Some(Slot::Stopping { .. }) => format!("export '{name}' is already being removed"),
                        _ => format!("no export named '{name}'"),
                    };
                    if let Some(s) = other {
                        st.slots.insert(name.to_string(), s);
                    }
                    return Err(refused(msg));
                }
            }
        };
        match done.recv_timeout(self.stop_timeout) {
            Ok(res) => res,
            Err(_) => Err(refused(format!(
                "export '{name}' has not stopped after {} s; it stays listed as stopping until it does",
                self.stop_timeout.as_secs()
            ))),
        }
    }

    /// Marks `r` stopping and stops it on a thread of its own, which ends
    /// by freeing the name. The receiver gets the result.
    fn begin_stop(&self, st: &mut State, name: &str, r: Running) -> mpsc::Receiver<CliResult<()>> {
        let (tx, rx) = mpsc::channel();
        let stopping = Slot::Stopping {
            export: r.export.clone(),
            spec: r.spec.clone(),
        };
        // Taken back if the thread cannot start.
        let cell = Arc::new(Mutex::new(Some(r)));
        let (state, label, mine) = (self.state.clone(), name.to_string(), cell.clone());
        let nbd = self.nbd().cloned();
        let spawned = std::thread::Builder::new().name(format!("stop-{name}")).spawn(move || {
            let Some(r) = lock(&mine).take() else { return };
            // NBD clients first: they finish their requests and go, then
            // the vhost-user side drains and the image closes.
            if let Some(front) = nbd {
                front.withdraw(&label);
            }
            let res = stop(r);
            lock(&state).slots.remove(&label);
            let _ = tx.send(res);
        });
        match spawned {
            Ok(_) => {
                st.slots.insert(name.to_string(), stopping);
            }
            Err(e) => {
                if let Some(r) = lock(&cell).take() {
                    st.slots.insert(name.to_string(), Slot::Running(r));
                }
                let (tx, rx) = mpsc::channel();
                let _ = tx.send(Err(refused(format!("cannot start a thread to stop '{name}': {e}"))));
                return rx;
            }
        }
        rx
    }

    /// Stops every export (SIGINT, SIGTERM) and waits until they have
    /// stopped, at most the stop timeout. The error names every export
    /// that failed to stop cleanly or is still running then.
    pub fn remove_all(&self) -> CliResult<()> {
        let deadline = Instant::now() + self.stop_timeout;
        let pending: Vec<_> = {
            let mut st = lock(&self.state);
            st.closing = true;
            let names: Vec<String> = st
                .slots
                .iter()
                .filter(|(_, s)| matches!(s, Slot::Running(_)))
                .map(|(n, _)| n.clone())
                .collect();
            names
                .into_iter()
                .filter_map(|n| match st.slots.remove(&n) {
                    Some(Slot::Running(r)) => Some(self.begin_stop(&mut st, &n, r)),
                    _ => None,
                })
                .collect()
        };
        let mut errors = Vec::new();
        for rx in pending {
            let left = deadline.saturating_duration_since(Instant::now());
            // One still stopping at the deadline stays in the map: below.
            if let Ok(Err(e)) = rx.recv_timeout(left) {
                errors.push(e.to_string());
            }
        }
        // Adds that were opening an image stop their export themselves;
        // earlier removes may still be waiting for theirs.
        while !lock(&self.state).slots.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        // What is left did not stop (or finish its add) in time.
        for (name, slot) in lock(&self.state).slots.iter() {
            let what = match slot {
                Slot::Starting { .. } => "is still being added",
                _ => "has not stopped",
            };
            errors.push(format!(
                "export '{name}' {what} after {} s; exiting without closing it",
                self.stop_timeout.as_secs()
            ));
        }
        match errors.is_empty() {
            true => Ok(()),
            false => Err(refused(errors.join("; "))),
        }
    }

    /// Refuses to add or remove exports from now on (a handover) and
    /// returns the running ones, each with its spec as of now (its
    /// migration state included). [`Server::reopen`] undoes it.
    pub fn close_for_handover(&self) -> Vec<(ExportSpec, Arc<Export>)> {
        let mut st = lock(&self.state);
        st.closing = true;
        st.handover = true;
        st.slots
            .values()
            .filter_map(|s| match s {
                Slot::Running(r) => Some((r.spec.clone().in_state(r.export.dev.migration()), r.export.clone())),
                _ => None,
            })
            .collect()
    }

    /// Accepts new exports (and removes) again, after a handover that
    /// failed.
    pub fn reopen(&self) {
        let mut st = lock(&self.state);
        st.closing = false;
        st.handover = false;
    }

    /// The gate of the running export `name`: held, its stop waits (as
    /// behind a resize that does not finish).
    #[cfg(test)]
    pub(super) fn gate(&self, name: &str) -> Arc<Mutex<bool>> {
        self.running(name).expect("a running export").1
    }

    /// The running exports, each with its spec.
    pub(crate) fn exports(&self) -> Vec<(ExportSpec, Arc<Export>)> {
        lock(&self.state)
            .slots
            .values()
            .filter_map(|s| match s {
                Slot::Running(r) => Some((r.spec.clone(), r.export.clone())),
                _ => None,
            })
            .collect()
    }

    /// The exports, running and stopping.
    pub fn list(&self) -> Vec<ExportInfo> {
        let st = lock(&self.state);
        st.slots
            .values()
            .filter_map(|s| match s {
                Slot::Starting { .. } => None,
                Slot::Running(r) => Some(info(&r.export, &r.spec, "running", self.nbd())),
                Slot::Stopping { export, spec } => Some(info(export, spec, "stopping", self.nbd())),
            })
            .collect()
    }

    /// The running export `name` and its change gate (held by a resize, a
    /// snapshot and the removal).
    pub(crate) fn running(&self, name: &str) -> CliResult<(Arc<Export>, Arc<Mutex<bool>>)> {
        match lock(&self.state).slots.get(name) {
            Some(Slot::Running(r)) => Ok((r.export.clone(), r.gate.clone())),
            Some(Slot::Starting { .. }) => Err(refused(format!("export '{name}' is still being added"))),
            Some(Slot::Stopping { .. }) => Err(refused(format!("export '{name}' is being removed"))),
            None => Err(refused(format!("no export named '{name}'"))),
        }
    }

    /// Records that the running export `name` serves `image` (of
    /// `format`) from now on, for `list` and a handover: a live overlay or
    /// the end of a job changed its chain (serve/jobs). Usable from a
    /// job's thread.
    pub(crate) fn image_setter(&self, name: &str) -> impl Fn(&str, &str) + Send + 'static {
        let (state, name) = (self.state.clone(), name.to_string());
        move |image: &str, format: &str| {
            if let Some(Slot::Running(r)) = lock(&state).slots.get_mut(&name) {
                r.spec.image = image.to_string();
                r.spec.format = Some(format.to_string());
            }
        }
    }

    /// Request statistics of `name`.
    pub fn stats(&self, name: &str) -> CliResult<Stats> {
        let (e, _) = self.running(name)?;
        Ok(Stats {
            throttle: super::throttle::describe(&e.dev),
            stats: e.dev.stats(),
            queue_requests: e.dev.queue_requests(),
            nbd_requests: e.dev.lane_requests(),
            nbd_connections: self.nbd().and_then(|f| f.connections(name)).unwrap_or(0),
        })
    }

    /// Grows (or, with `shrink`, shrinks) `name` to `size`, publishes the
    /// new capacity in the configuration space and tells the connected
    /// frontend (returns whether one was told). One resize of an export
    /// runs at a time; a remove waits for it.
    pub fn resize(&self, name: &str, size: &str, shrink: bool) -> CliResult<(u64, bool)> {
        let (export, gate) = self.running(name)?;
        let dev = &export.dev;
        if dev.cfg.read_only {
            return Err(refused(format!("export '{name}' is read-only")));
        }
        let new = size_arg(size)?;
        if new == 0 || new % 512 != 0 {
            return Err(refused(format!("size {new} must be a positive multiple of 512")));
        }
        let Some(removed) = lock_within(&gate, BUSY_TIMEOUT) else {
            return Err(refused(format!(
                "export '{name}' is busy: another resize has not finished in {} s",
                BUSY_TIMEOUT.as_secs()
            )));
        };
        if *removed {
            return Err(refused(format!("export '{name}' is being removed")));
        }
        if new < dev.capacity() && !shrink {
            return Err(refused(format!(
                "shrinking '{name}' from {} to {} loses data; pass shrink to confirm",
                human_size(dev.capacity()),
                human_size(new)
            )));
        }
        let rt = Runtime::new(RuntimeConfig {
            engine: dev.cfg.engine.engine,
            ..Default::default()
        })?;
        let node = dev.open_node()?;
        rt.block_on(async move { node.resize(new, shrink).await })?;
        dev.set_capacity(new);
        let notified = export.notify_config_change().map_err(|e| {
            refused(format!(
                "'{name}' is now {} but the frontend was not told: {e}",
                human_size(new)
            ))
        })?;
        Ok((new, notified))
    }
}

fn info(e: &Export, spec: &ExportSpec, state: &'static str, nbd: Option<&Arc<NbdFront>>) -> ExportInfo {
    let d = &e.dev;
    let clients = nbd.and_then(|f| f.connections(&d.cfg.name));
    ExportInfo {
        nbd: clients.and(nbd).map(|f| f.uri(&d.cfg.name)),
        nbd_connections: clients.unwrap_or(0),
        name: d.cfg.name.clone(),
        state,
        image: spec.image.clone(),
        format: d.slot.info().format,
        migration: d.migration().name(),
        size: d.capacity(),
        socket: e.socket.display().to_string(),
        connected: e.is_connected(),
        connections: e.connections(),
        readonly: d.cfg.read_only,
        serial: d.cfg.serial.clone(),
        iothreads: d.cfg.iothreads,
        num_queues: d.cfg.num_queues,
        write_cache: d.writeback(),
        throttle: super::throttle::describe(d),
    }
}

/// `path` with its directory resolved (symbolic links, `.`, `..`), when
/// that directory exists.
fn canonical(path: &Path) -> PathBuf {
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    match (path.parent().map(Path::canonicalize), path.file_name()) {
        (Some(Ok(dir)), Some(file)) => dir.join(file),
        _ => path,
    }
}

/// Whether something accepts connections on the socket at `path`; binding
/// there would take it away from that process.
pub fn socket_in_use(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
        && std::os::unix::net::UnixStream::connect(path).is_ok()
}

/// Opens the image (or shares the one `sibling` serves), binds the socket
/// and starts the export's thread.
fn start(name: &str, spec: &ExportSpec, sibling: Option<&Export>) -> CliResult<(Arc<Export>, ExportThread)> {
    // A socket the service manager passed in (socket activation) is served
    // as it is; any other is bound here.
    let passed = super::activation::claim(name, &spec.socket);
    if passed.is_none() && socket_in_use(&spec.socket) {
        return Err(refused(format!(
            "socket {} is in use by another process",
            spec.socket.display()
        )));
    }
    let dev = Arc::new(match sibling {
        Some(other) => spec.open_shared(&other.dev)?,
        None => super::restart::open_waiting(spec, super::restart::LOCK_WAIT)?,
    });
    let export = match passed {
        Some((listener, path)) => Export::adopt(dev, &path, listener).map_err(|e| refused(e.to_string()))?,
        None => Export::bind(dev, &spec.socket).map_err(|e| refused(e.to_string()))?,
    };
    let runner = export.clone();
    let thread = std::thread::Builder::new()
        .name(format!("export-{name}"))
        .spawn(move || runner.run())
        .map_err(|e| refused(format!("cannot start a thread for export '{name}': {e}")))?;
    Ok((export, thread))
}

/// Locks `m`, waiting at most `timeout` for it.
pub(crate) fn lock_within<T>(m: &Mutex<T>, timeout: Duration) -> Option<MutexGuard<'_, T>> {
    let deadline = Instant::now() + timeout;
    loop {
        match m.try_lock() {
            Ok(g) => return Some(g),
            Err(std::sync::TryLockError::Poisoned(e)) => return Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(std::sync::TryLockError::WouldBlock) => return None,
        }
    }
}

/// Waits for a resize of `r` to finish, marks it removed, stops it and
/// joins its thread (which flushes and closes the image).
fn stop(r: Running) -> CliResult<()> {
    let mut removed = lock(&r.gate);
    *removed = true;
    r.export.stop();
    let name = r.export.dev.cfg.name.clone();
    let res = match r.thread.join() {
        Ok(res) => res.map_err(|e| refused(e.to_string())),
        Err(_) => Err(refused(format!("export '{name}': its thread panicked"))),
    };
    drop(removed);
    res
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;

//! The set of running exports, shared by the main thread (signals) and the
//! control socket (hot plug). This lock is control-plane only: the data
//! path never takes it.

use super::spec::ExportSpec;
use crate::img::{human_size, size_arg};
use serde::Serialize;
use spindle_block::BlockError;
use spindle_io::{Runtime, RuntimeConfig};
use spindle_vhost::stats::OpSummary;
use spindle_vhost::Export;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

struct Running {
    export: Arc<Export>,
    spec: ExportSpec,
    thread: JoinHandle<Result<(), spindle_vhost::Error>>,
}

/// Running exports by name.
#[derive(Default)]
pub struct Server {
    exports: Mutex<BTreeMap<String, Running>>,
}

/// What `list` reports of an export.
#[derive(Debug, Serialize)]
pub struct ExportInfo {
    /// Name.
    pub name: String,
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
    /// I/O threads.
    pub iothreads: usize,
    /// Request queues offered.
    pub num_queues: u16,
    /// The guest's write cache is on (CONFIG_WCE); off means write-through.
    pub write_cache: bool,
}

fn invalid(msg: String) -> BlockError {
    BlockError::Invalid(msg)
}

impl Server {
    /// Opens and starts serving `spec`. Returns the export's name.
    pub fn add(&self, spec: ExportSpec) -> Result<Arc<Export>, BlockError> {
        let name = spec.name();
        let mut exports = self
            .exports
            .lock()
            .map_err(|_| invalid("server state poisoned".into()))?;
        if exports.contains_key(&name) {
            return Err(invalid(format!("an export named '{name}' already exists")));
        }
        if let Some(other) = exports.values().find(|r| r.export.socket == spec.socket) {
            return Err(invalid(format!(
                "socket {} is already used by export '{}'",
                spec.socket.display(),
                other.export.dev.cfg.name
            )));
        }
        let dev = Arc::new(spec.open()?);
        let export = Export::bind(dev, &spec.socket).map_err(|e| invalid(e.to_string()))?;
        let runner = export.clone();
        let thread = std::thread::Builder::new()
            .name(format!("export-{name}"))
            .spawn(move || runner.run())
            .map_err(|e| invalid(format!("cannot start a thread for export '{name}': {e}")))?;
        exports.insert(
            name,
            Running {
                export: export.clone(),
                spec,
                thread,
            },
        );
        Ok(export)
    }

    /// Stops serving `name`: in-flight requests finish, the image is
    /// flushed and closed.
    pub fn remove(&self, name: &str) -> Result<(), BlockError> {
        let running = self
            .exports
            .lock()
            .map_err(|_| invalid("server state poisoned".into()))?
            .remove(name)
            .ok_or_else(|| invalid(format!("no export named '{name}'")))?;
        stop(running)
    }

    /// Stops every export (SIGINT, SIGTERM). Returns the first error.
    pub fn remove_all(&self) -> Result<(), BlockError> {
        let all = match self.exports.lock() {
            Ok(mut e) => std::mem::take(&mut *e),
            Err(_) => return Err(invalid("server state poisoned".into())),
        };
        for r in all.values() {
            r.export.stop();
        }
        let mut first = Ok(());
        for (_, r) in all {
            if let Err(e) = stop(r) {
                eprintln!("spindle: {e}");
                first = first.and(Err(e));
            }
        }
        first
    }

    /// The running exports.
    pub fn list(&self) -> Vec<ExportInfo> {
        let Ok(exports) = self.exports.lock() else {
            return Vec::new();
        };
        exports
            .values()
            .map(|r| {
                let d = &r.export.dev;
                ExportInfo {
                    name: d.cfg.name.clone(),
                    image: r.spec.image.clone(),
                    format: d.node.info().format,
                    size: d.capacity(),
                    socket: r.export.socket.display().to_string(),
                    connected: r.export.is_connected(),
                    connections: r.export.connections(),
                    readonly: d.cfg.read_only,
                    iothreads: d.cfg.iothreads,
                    num_queues: d.cfg.num_queues,
                    write_cache: d.writeback(),
                }
            })
            .collect()
    }

    fn export(&self, name: &str) -> Result<Arc<Export>, BlockError> {
        self.exports
            .lock()
            .map_err(|_| invalid("server state poisoned".into()))?
            .get(name)
            .map(|r| r.export.clone())
            .ok_or_else(|| invalid(format!("no export named '{name}'")))
    }

    /// Request statistics of `name`.
    pub fn stats(&self, name: &str) -> Result<(Vec<OpSummary>, Vec<u64>), BlockError> {
        let e = self.export(name)?;
        Ok((e.dev.stats(), e.dev.queue_requests()))
    }

    /// Grows (or, with `shrink`, shrinks) `name` to `size`, publishes the
    /// new capacity in the configuration space and tells the connected
    /// frontend (returns whether one was told).
    pub fn resize(&self, name: &str, size: &str, shrink: bool) -> Result<(u64, bool), BlockError> {
        let export = self.export(name)?;
        let dev = &export.dev;
        if dev.cfg.read_only {
            return Err(invalid(format!("export '{name}' is read-only")));
        }
        let new = size_arg(size)?;
        if new % 512 != 0 {
            return Err(invalid(format!("size {new} is not a multiple of 512")));
        }
        if new < dev.capacity() && !shrink {
            return Err(invalid(format!(
                "shrinking '{name}' from {} to {} loses data; pass shrink to confirm",
                human_size(dev.capacity()),
                human_size(new)
            )));
        }
        let rt = Runtime::new(RuntimeConfig {
            engine: dev.cfg.engine.engine,
            ..Default::default()
        })?;
        let node = dev.node.clone();
        rt.block_on(async move { node.resize(new, shrink).await })?;
        dev.set_capacity(new);
        let notified = export.notify_config_change().map_err(|e| {
            invalid(format!(
                "'{name}' is now {} but the frontend was not told: {e}",
                human_size(new)
            ))
        })?;
        Ok((new, notified))
    }
}

fn stop(r: Running) -> Result<(), BlockError> {
    r.export.stop();
    let name = r.export.dev.cfg.name.clone();
    match r.thread.join() {
        Ok(res) => res.map_err(|e| invalid(e.to_string())),
        Err(_) => Err(invalid(format!("export '{name}': its thread panicked"))),
    }
}

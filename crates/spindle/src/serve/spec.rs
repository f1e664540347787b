//! What one export is made of, as the command line, a `--config` file and
//! the control socket's `add` describe it; and turning that into a device.

use crate::error::{CliResult, Error};
use serde::{Deserialize, Serialize};
use spindle_block::{open_image, BlockError, Format, Node, OpenConfig, Sharing};
use spindle_export::device::opt_io;
use spindle_export::device::Migration;
use spindle_export::slot::{NodeSlot, Reopen};
use spindle_export::{Device, DeviceConfig};
use spindle_io::{CacheMode, EngineKind, RuntimeConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Polling window when none is given, chosen with `bench/vhost.py` (see
/// docs/serve.md).
pub const DEFAULT_POLL_US: u64 = 64;
/// Request queues offered when none is given. A frontend uses as many as
/// it sets up; QEMU refuses to start when it wants more than offered.
pub const DEFAULT_NUM_QUEUES: u16 = 16;

/// An RBD image named by keys (`[export.rbd]` in a config file, `rbd`
/// in the control socket's `add`), as an `rbd:` spec spells them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RbdKeys {
    /// The pool.
    pub pool: String,
    /// The image.
    pub image: String,
    /// A namespace of the pool.
    pub namespace: Option<String>,
    /// A snapshot, served read-only.
    pub snapshot: Option<String>,
    /// A ceph.conf.
    pub conf: Option<PathBuf>,
    /// The client id, without `client.`.
    pub user: Option<String>,
    /// A keyring file.
    pub keyring: Option<PathBuf>,
    /// Monitor addresses, overriding the conf's.
    pub mon_host: Option<String>,
}

impl RbdKeys {
    /// The `rbd:` spec these keys stand for.
    pub fn to_spec(&self) -> String {
        spindle_block::protocols::rbd::RbdSpec {
            pool: self.pool.clone(),
            namespace: self.namespace.clone().filter(|n| !n.is_empty()),
            image: self.image.clone(),
            snapshot: self.snapshot.clone(),
            conf: self.conf.clone(),
            user: self.user.clone(),
            keyring: self.keyring.clone(),
            mon_host: self.mon_host.clone(),
            options: Vec::new(),
        }
        .to_spec()
    }
}

/// One export. Every field but the image (`image`, or `rbd`) and
/// `socket` has a default.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportSpec {
    /// Image path, `null:SIZE`, an NBD URI or an `rbd:` spec.
    #[serde(default)]
    pub image: String,
    /// An RBD image by keys, instead of `image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rbd: Option<RbdKeys>,
    /// vhost-user socket path.
    pub socket: PathBuf,
    /// Name for `spindle ctl` (default: the image's file stem).
    pub name: Option<String>,
    /// `raw` or `qcow2` (default: probed).
    pub format: Option<String>,
    /// Cache mode (default: none, or writeback where O_DIRECT is refused).
    pub cache: Option<String>,
    /// I/O engine: io_uring (default), native, threads.
    pub aio: Option<String>,
    /// Worker threads of the `threads` engine.
    pub aio_threads: Option<usize>,
    /// I/O threads (default 1).
    pub iothreads: Option<usize>,
    /// Request queues offered (default 16).
    pub num_queues: Option<u16>,
    /// Largest virtqueue (default 256).
    pub queue_size: Option<u16>,
    /// Refuse writes.
    #[serde(default)]
    pub readonly: bool,
    /// GET_ID string (default: the name).
    pub serial: Option<String>,
    /// Polling window in microseconds (0 = off).
    pub poll_us: Option<u64>,
    /// A live migration's destination: the image is not trusted (nor, in
    /// a daemon of its own, opened for writing) until the frontend starts
    /// the device. In a daemon that already serves the image, the export
    /// shares the open image instead.
    #[serde(default)]
    pub incoming: bool,
    /// A live migration's source that handed its image over (its frontend
    /// stopped the device): opened as `incoming` is, shown `inactive`. A
    /// planned handover writes it for such exports.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub inactive: bool,
    /// Offered over NBD: unset, when the daemon has an NBD listener
    /// (`--nbd`); `true` requires one (`ctl add --nbd`); `false` never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd: Option<bool>,
    /// I/O limits (QEMU's names): of the export's own group, or of its
    /// `throttle_group` when it names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle: Option<String>,
    /// A named throttle group whose limits the export shares.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle_group: Option<String>,
}

fn invalid(msg: String) -> Error {
    Error::Usage(msg)
}

impl ExportSpec {
    /// The spec with its `rbd` keys turned into `image` (exactly one of
    /// the two is given).
    pub fn resolved(mut self) -> CliResult<ExportSpec> {
        match (self.rbd.take(), self.image.is_empty()) {
            (Some(_), false) => Err(invalid(format!(
                "export '{}': give either image or rbd keys, not both",
                self.image
            ))),
            (Some(k), true) => {
                let spec = k.to_spec();
                // Checked now, so the error names the keys' problem.
                spindle_block::protocols::rbd::RbdSpec::parse(&spec)?;
                self.image = spec;
                Ok(self)
            }
            (None, true) => Err(invalid(
                "an export needs an image (a path, null:SIZE, an NBD URI or rbd:POOL/IMAGE) or rbd keys".into(),
            )),
            (None, false) => Ok(self),
        }
    }

    /// The export's name.
    pub fn name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            if self.image.starts_with("null:") {
                return "null".to_string();
            }
            if let Ok(r) = spindle_block::protocols::rbd::RbdSpec::parse(&self.image) {
                return r.image;
            }
            let p = Path::new(&self.image);
            p.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| self.image.replace(':', "-"))
        })
    }

    /// The migration state the export starts in.
    pub fn state(&self) -> Migration {
        match (self.incoming, self.inactive) {
            (_, true) => Migration::Inactive,
            (true, false) => Migration::Incoming,
            (false, false) => Migration::Active,
        }
    }

    /// This export starting in `state` (a planned handover carries it).
    pub fn in_state(mut self, state: Migration) -> ExportSpec {
        self.incoming = state == Migration::Incoming;
        self.inactive = state == Migration::Inactive;
        self
    }

    /// Checks every setting and opens the image: for serving, or (when
    /// `incoming` or `inactive`) inactive, holding only a shared lock on it.
    pub fn open(&self) -> CliResult<Device> {
        let (cfg, open_cfg) = self.settings()?;
        let engine = cfg.engine;
        let state = self.state();
        let look = state != Migration::Active;
        let (node, reopen) = self.open_node(open_cfg, look)?;
        let (size, opt) = (node.size(), opt_io(&node));
        if look {
            let slot = NodeSlot::inactive(node, Box::new(reopen), engine);
            return Ok(Device::with_slot_in(Arc::new(slot), cfg, size, opt, state));
        }
        let mut cfg = cfg;
        cfg.read_only |= node.is_read_only();
        let slot = NodeSlot::active(node, Box::new(reopen), engine);
        Ok(Device::with_slot(Arc::new(slot), cfg, size, opt, false))
    }

    /// A second export of the image `other` serves in this daemon, as a
    /// live migration's destination (or a source that handed the image
    /// over): it shares `other`'s open image.
    pub fn open_shared(&self, other: &Device) -> CliResult<Device> {
        let (mut cfg, _) = self.settings()?;
        cfg.read_only |= other.cfg.read_only;
        let state = match self.state() {
            Migration::Active => Migration::Incoming,
            s => s,
        };
        let opt = other.opt_io();
        Ok(Device::with_slot_in(
            other.slot.clone(),
            cfg,
            other.capacity(),
            opt,
            state,
        ))
    }

    /// Opens the image as `cfg` says (writable, or with `look` a read-only
    /// look sharing everything), falling back to the page cache where
    /// O_DIRECT is refused; and how to open it again.
    fn open_node(&self, mut cfg: OpenConfig, look: bool) -> CliResult<(Node, SpecReopen)> {
        check_file_type(&self.image)?;
        let first = if look { SpecReopen::look(&cfg) } else { cfg.clone() };
        let node = match open_image(&self.image, &first) {
            // tmpfs and some FUSE file systems refuse O_DIRECT.
            Err(e) if self.cache.is_none() && crate::img::direct_refused(&e) => {
                tracing::warn!(
                    "{}: the file system refuses O_DIRECT; serving with cache=writeback",
                    self.image
                );
                cfg.cache = CacheMode::Writeback;
                let first = if look { SpecReopen::look(&cfg) } else { cfg.clone() };
                open_image(&self.image, &first)?
            }
            other => other?,
        };
        if node.size() < 512 {
            return Err(invalid(format!(
                "the image is {} bytes; a disk needs at least 512",
                node.size()
            )));
        }
        if node.is_single_threaded() {
            // Every I/O thread of an export (and the NBD server's) needs
            // a connection of its own.
            return Err(invalid(format!(
                "{}: the NBD server offers no multi-conn, which serving it needs (one connection per I/O thread)",
                self.image
            )));
        }
        Ok((
            node,
            SpecReopen {
                image: self.image.clone(),
                cfg,
            },
        ))
    }

    /// How this export opens images (its settings), with the format
    /// probed and `cache` as the open image's: for a new chain a live
    /// overlay or a job puts under the export (serve/jobs).
    pub(crate) fn open_config(&self, cache: CacheMode) -> CliResult<OpenConfig> {
        let (_, mut cfg) = self.settings()?;
        cfg.format = None;
        cfg.cache = cache;
        Ok(cfg)
    }

    /// How to open `image` again with `cfg` (from [`ExportSpec::open_config`]),
    /// once it is the top of the export's chain.
    pub(crate) fn reopen_at(image: &str, cfg: &OpenConfig) -> Box<dyn Reopen> {
        let cfg = OpenConfig {
            inherit_locks: Vec::new(),
            ..cfg.clone()
        };
        Box::new(SpecReopen {
            image: image.to_string(),
            cfg,
        })
    }

    /// Checks every setting: the device's and the image's.
    fn settings(&self) -> CliResult<(DeviceConfig, OpenConfig)> {
        let name = self.name();
        if name.is_empty() || name.len() > 64 || name.chars().any(|c| c.is_control() || c == '/') {
            return Err(invalid(format!(
                "export name '{name}': use 1 to 64 printable characters, no '/'"
            )));
        }
        let iothreads = self.iothreads.unwrap_or(1);
        if !(1..=64).contains(&iothreads) {
            return Err(invalid(format!("{name}: iothreads {iothreads} must be from 1 to 64")));
        }
        let num_queues = self.num_queues.unwrap_or(DEFAULT_NUM_QUEUES.max(iothreads as u16));
        if !(1..=64).contains(&num_queues) {
            return Err(invalid(format!("{name}: num-queues {num_queues} must be from 1 to 64")));
        }
        let queue_size = self.queue_size.unwrap_or(256);
        if !queue_size.is_power_of_two() || !(2..=32768).contains(&queue_size) {
            return Err(invalid(format!(
                "{name}: queue-size {queue_size} must be a power of two from 2 to 32768"
            )));
        }
        let poll_us = self.poll_us.unwrap_or(DEFAULT_POLL_US);
        if poll_us > 1_000_000 {
            return Err(invalid(format!(
                "{name}: poll-us {poll_us} must be at most 1000000 (1 s)"
            )));
        }
        let aio_threads = self.aio_threads.unwrap_or(8);
        if !(1..=256).contains(&aio_threads) {
            return Err(invalid(format!(
                "{name}: aio-threads {aio_threads} must be from 1 to 256"
            )));
        }
        let engine: EngineKind = self.aio.as_deref().unwrap_or("io_uring").parse()?;
        let serial = self.serial.clone().unwrap_or_else(|| name.clone());
        if serial.len() > 20 {
            return Err(invalid(format!("{name}: serial '{serial}' is longer than 20 bytes")));
        }
        let format: Option<Format> = self.format.as_deref().map(str::parse).transpose()?;
        let cache: CacheMode = self.cache.as_deref().unwrap_or("none").parse()?;
        let open_cfg = OpenConfig {
            format,
            cache,
            read_only: self.readonly,
            ..Default::default()
        };
        let cfg = DeviceConfig {
            name,
            serial,
            num_queues,
            iothreads,
            queue_size,
            poll_ns: poll_us * 1000,
            engine: RuntimeConfig {
                engine,
                depth: 256,
                threads: aio_threads,
            },
            read_only: self.readonly,
        };
        Ok((cfg, open_cfg))
    }
}

/// Opens an export's image again, after a migration handed it over.
struct SpecReopen {
    image: String,
    cfg: OpenConfig,
}

impl SpecReopen {
    /// A read-only look at the image that shares everything: QEMU's shared
    /// "consistent read" lock only, so the source of a migration keeps
    /// writing meanwhile.
    fn look(cfg: &OpenConfig) -> OpenConfig {
        OpenConfig {
            read_only: true,
            sharing: Sharing::All,
            ..cfg.clone()
        }
    }
}

impl Reopen for SpecReopen {
    fn open_active(&self) -> Result<Node, BlockError> {
        // One try: the slot's activation thread tries again (and logs,
        // rate-limited) while the source of a migration holds the lock.
        open_image(&self.image, &self.cfg)
    }

    fn open_inactive(&self) -> Result<Node, BlockError> {
        open_image(&self.image, &SpecReopen::look(&self.cfg))
    }
}

/// Refuses what is neither a regular file nor a block device: opening a
/// FIFO can block forever, and a character device (`/dev/null`,
/// `/dev/zero`) is no disk.
fn check_file_type(image: &str) -> CliResult<()> {
    use std::os::unix::fs::FileTypeExt;
    if image.starts_with("null:") {
        return Ok(());
    }
    let Ok(meta) = std::fs::metadata(image) else {
        return Ok(()); // opening it names the problem
    };
    let t = meta.file_type();
    let what = if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_dir() {
        "a directory"
    } else {
        return Ok(());
    };
    Err(invalid(format!(
        "{image} is {what}; serve a regular file or a block device"
    )))
}

/// A `--config` file: an optional control socket and the exports.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Control socket path.
    pub control: Option<PathBuf>,
    /// NBD listening address (as `--nbd`).
    pub nbd: Option<String>,
    /// Metrics endpoint address (as `--metrics`).
    pub metrics: Option<String>,
    /// TLS credentials directory for NBD (as `--nbd-tls-creds`).
    pub nbd_tls_creds: Option<PathBuf>,
    /// I/O threads of the NBD server (as `--nbd-iothreads`).
    pub nbd_iothreads: Option<usize>,
    /// How long the NBD I/O threads poll before they sleep (as `--nbd-poll-us`).
    pub nbd_poll_us: Option<u64>,
    /// Named throttle groups: `NAME = "LIMITS"` (QEMU's names).
    #[serde(default)]
    pub throttle_group: std::collections::BTreeMap<String, String>,
    /// Exports.
    #[serde(default, rename = "export")]
    pub exports: Vec<ExportSpec>,
}

impl ConfigFile {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> CliResult<ConfigFile> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| invalid(format!("cannot read config file {}: {e}", path.display())))?;
        let cfg: ConfigFile = toml::from_str(&text)
            .map_err(|e| invalid(format!("config file {}: {}", path.display(), e.to_string().trim_end())))?;
        if cfg.exports.is_empty() {
            return Err(invalid(format!(
                "config file {}: no [[export]] tables (each needs image and socket)",
                path.display()
            )));
        }
        Ok(cfg)
    }
}

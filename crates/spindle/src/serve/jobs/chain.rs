//! What overlay, stream and commit share: the export they work on, its
//! chain of images, copying ranges, and the switch of the export to a new
//! chain while its guest runs.
//!
//! The switch (`pivot`): the export is paused (`Export::pause`: no
//! request in flight, new ones wait on the rings), the old chain's top is
//! closed clean (metadata written back; it stays usable, so a failure
//! from here on leaves the export serving it unchanged), the new chain is
//! opened, the slot serves it (`NodeSlot::replace`), the export resumes,
//! and only then is the old chain dropped. Images both chains use are
//! opened by the new one with the old one's locks inherited
//! (`OpenConfig::inherit_locks`), so no image is ever left unlocked and the
//! export is not refused by its own old open.

use super::super::server::{lock_within, Server, BUSY_TIMEOUT};
use super::super::spec::ExportSpec;
use crate::error::{CliResult, Error};
use spindle_block::{open_image, Node, OpenConfig, SgList};
use spindle_io::{CacheMode, Runtime, RuntimeConfig};
use spindle_vhost::Export;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// How long a switch waits for the requests in flight.
pub const PAUSE_DRAIN: Duration = Duration::from_secs(30);
/// Bytes copied at a time.
pub const CHUNK: u64 = 1 << 20;

pub fn refused(msg: String) -> Error {
    Error::Refused(msg)
}

/// Records the image (and format) an export serves after a switch.
pub type SetImage = Box<dyn Fn(&str, &str) + Send>;

/// The export a request works on.
pub struct Ctx {
    pub name: String,
    pub export: Arc<Export>,
    /// The export's change gate (resize, snapshots, removal).
    pub gate: Arc<Mutex<bool>>,
    pub spec: ExportSpec,
    pub set_image: SetImage,
}

impl Ctx {
    /// The running, writable, active export `name`.
    pub fn of(server: &Server, name: &str) -> CliResult<Ctx> {
        let (export, gate) = server.running(name)?;
        let spec = server
            .exports()
            .into_iter()
            .find(|(_, e)| Arc::ptr_eq(e, &export))
            .map(|(s, _)| s)
            .ok_or_else(|| refused(format!("no export named '{name}'")))?;
        if export.dev.cfg.read_only {
            return Err(refused(format!("export '{name}' is read-only")));
        }
        export.dev.open_node()?;
        Ok(Ctx {
            name: name.to_string(),
            set_image: Box::new(server.image_setter(name)),
            export,
            gate,
            spec,
        })
    }

    /// The open chain; fails once the export stopped or its chain was
    /// switched by someone else than `expected`.
    pub fn node(&self, expected: Option<&Arc<Node>>) -> CliResult<Arc<Node>> {
        let node = self.export.dev.open_node()?;
        match expected {
            Some(e) if !Arc::ptr_eq(e, &node) => Err(refused(format!(
                "export '{}': its image changed under the job",
                self.name
            ))),
            _ => Ok(node),
        }
    }

    /// Holds the export's change gate (no resize, snapshot or removal
    /// meanwhile); refused once the export is being removed.
    pub fn change_lock(&self) -> CliResult<MutexGuard<'_, bool>> {
        let Some(removed) = lock_within(&self.gate, BUSY_TIMEOUT) else {
            return Err(refused(format!(
                "export '{}' is busy (a resize or a snapshot)",
                self.name
            )));
        };
        if *removed {
            return Err(refused(format!("export '{}' is being removed", self.name)));
        }
        Ok(removed)
    }

    /// A runtime of the export's engine, for this thread.
    pub fn runtime(&self) -> CliResult<Runtime> {
        Ok(Runtime::new(RuntimeConfig {
            engine: self.export.dev.cfg.engine.engine,
            ..Default::default()
        })?)
    }

    /// How the export opens images, with `inherit` (canonical paths)
    /// taken over from the chain it serves now.
    pub fn open_config(&self, node: &Node, inherit: Vec<PathBuf>) -> CliResult<OpenConfig> {
        let cache = node.file().map_or(CacheMode::Writeback, |f| f.cache());
        Ok(OpenConfig {
            inherit_locks: inherit,
            ..self.spec.open_config(cache)?
        })
    }

    /// Switches the export to the chain `open` returns, as the module's
    /// documentation says; `before` runs on the old chain while paused
    /// (the last copy of a job). The export then serves `image`.
    pub fn pivot<B, F>(
        &self,
        rt: &Runtime,
        before: B,
        open: impl FnOnce() -> CliResult<Node>,
        image: &str,
        cfg: &OpenConfig,
    ) -> CliResult<()>
    where
        B: FnOnce(Arc<Node>) -> F,
        F: Future<Output = CliResult<()>>,
    {
        let pause = self.export.pause(PAUSE_DRAIN).map_err(refused)?;
        let old = self.export.dev.open_node()?;
        rt.block_on(before(old.clone()))?;
        // Everything on disk: the new chain reads its metadata afresh.
        let closing = old.clone();
        rt.block_on(async move { closing.close().await })?;
        let new = open()?;
        if new.size() != old.size() {
            return Err(refused(format!(
                "{image}: the new chain is {} bytes, the export {}",
                new.size(),
                old.size()
            )));
        }
        let format = new.info().format;
        self.export
            .dev
            .slot
            .replace(new, Some(ExportSpec::reopen_at(image, cfg)))?;
        drop(pause);
        // Its files close, and their locks go, with this last reference.
        drop(old);
        (self.set_image)(image, format);
        tracing::info!(export = %self.name, image, "the export serves a new chain");
        Ok(())
    }
}

/// Opens `image` with `cfg`: the new chain of a switch.
pub fn open_chain(image: &Path, cfg: &OpenConfig) -> CliResult<Node> {
    let spec = image
        .to_str()
        .ok_or_else(|| refused(format!("{}: not a UTF-8 path", image.display())))?;
    Ok(open_image(spec, cfg)?)
}

/// The images of `node`'s chain, top first.
pub fn layers(node: &Node) -> Vec<&Node> {
    std::iter::successors(Some(node), |n| n.backing()).collect()
}

/// `path` made absolute with symbolic links resolved (as far as it
/// exists).
pub fn canonical(path: &Path) -> PathBuf {
    path.canonicalize()
        .unwrap_or_else(|_| std::path::absolute(path).unwrap_or_else(|_| path.to_owned()))
}

/// The depth of `path` in `node`'s chain (0: the top).
pub fn depth_of(node: &Node, path: &Path, name: &str) -> CliResult<usize> {
    let want = canonical(path);
    layers(node)
        .iter()
        .position(|l| canonical(l.path()) == want)
        .ok_or_else(|| {
            refused(format!(
                "export '{name}': {} is not in its backing chain",
                path.display()
            ))
        })
}

/// How far the range at `pos` (at most `len` long) is defined in a layer
/// of `node`'s chain above depth `limit`: `(defined, run length)`.
pub async fn defined_above(node: &Node, pos: u64, len: u64, limit: usize) -> CliResult<(bool, u64)> {
    let e = node.map_extent(pos, len).await?;
    Ok((e.present && (e.depth as usize) < limit, e.len.max(1)))
}

/// Copies `len` bytes at `pos` as `src` reads them into `dst` (zeroes as
/// write-zeroes, so a sparse target stays sparse). Returns the bytes.
pub async fn copy_range(src: &Node, dst: &Node, pos: u64, len: u64) -> CliResult<u64> {
    let len = len
        .min(src.size().saturating_sub(pos))
        .min(dst.size().saturating_sub(pos));
    if len == 0 {
        return Ok(0);
    }
    let buf = SgList::zeroed(len as usize);
    src.read(pos, &buf).await?;
    if buf.is_zero() {
        dst.write_zeroes(pos, len, false).await?;
    } else {
        dst.write(pos, &buf, false).await?;
    }
    Ok(len)
}

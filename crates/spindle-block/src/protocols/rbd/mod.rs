//! The RBD client: a Ceph RBD image as a storage, opened from an `rbd:`
//! spec ([`spec`]) through librbd (`spindle-rbd`).
//!
//! Data I/O is asynchronous on the I/O threads: each runtime that uses
//! the image gets its own `spindle_rbd::EventQueue` (made on first use,
//! [`local`]), whose eventfd that runtime watches, and whose completions
//! come back to it; guest memory goes to librbd's vectored
//! calls as it is (zero-copy). Metadata work that librbd only does
//! synchronously and that can be slow (allocation through
//! `rbd_diff_iterate2`) runs on a helper thread, so no I/O thread waits
//! on the network. Opening connects with a timeout and fails with the
//! cluster, pool and image named.
//!
//! A writable open takes the image's exclusive lock (when the image has
//! the feature) in librbd's manual mode: another client, another host,
//! cannot take it over while Spindle writes, and Spindle's open fails
//! while another holds it. Closing (or a migration's handover, which
//! reopens the source read-only) releases it.

mod local;
pub mod spec;

pub use spec::{is_rbd_spec, RbdSpec};

use crate::error::{BlockError, Result};
use crate::status::Allocation;
use spindle_io::{CacheMode, SgList};
use spindle_rbd::{features, Cluster, ClusterOptions, Image, Snapshot};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Longest range one allocation query asks librbd about; its answer is
/// kept for the queries that follow while nothing is written.
const ALLOCATION_WINDOW: u64 = 1 << 30;
/// Longest discard or write-zeroes request handed to librbd at once.
const MAX_RANGE: u64 = 1 << 30;
/// How long a writable open waits for another client to release the
/// exclusive lock (a live migration's source handing the image over).
const LOCK_WAIT: Duration = Duration::from_secs(10);
/// A qcow2 image on RBD grows its image in steps this large (each is a
/// blocking `rbd_resize`).
const GROW_STEP: u64 = 1 << 30;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// How to open an RBD image.
#[derive(Debug, Clone, Default)]
pub struct RbdOpenOptions {
    /// Open read-only (a snapshot always is).
    pub read_only: bool,
    /// The cache mode: `none` and `directsync` turn librbd's cache off,
    /// as QEMU's rbd driver does.
    pub cache: Option<CacheMode>,
    /// Connecting fails after this long (default 30 s).
    pub connect_timeout: Option<Duration>,
}

/// What the allocation queries learnt, valid while `generation` holds.
struct AllocationCache {
    generation: u64,
    start: u64,
    end: u64,
    data: Vec<spindle_rbd::Extent>,
}

/// An open RBD image.
pub struct Rbd {
    id: u64,
    spec: PathBuf,
    name: String,
    image: Arc<Image>,
    read_only: Option<&'static str>,
    size: AtomicU64,
    /// Whether this handle took the exclusive lock.
    locked: bool,
    /// The cache mode: write-through modes flush each write, `unsafe`
    /// drops flushes.
    cache: CacheMode,
    /// Bumped at each write's start and end: an allocation answer is only
    /// used while it is unchanged.
    generation: AtomicU64,
    allocation: Mutex<Option<AllocationCache>>,
    /// Held while open: the threads' queues of it go once it is gone.
    alive: Arc<()>,
    _cluster: Cluster,
}

impl std::fmt::Debug for Rbd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Rbd({})", self.name)
    }
}

/// An error of librbd about `spec`, as the block layer's.
pub(crate) fn rbd_err(spec: &Path) -> impl Fn(spindle_rbd::Error) -> BlockError + '_ {
    move |e| BlockError::Remote {
        uri: spec.display().to_string(),
        errno: e.errno().unwrap_or(libc::EIO),
        msg: e.to_string(),
    }
}

/// The cluster connection a spec asks for.
pub fn cluster_options(s: &RbdSpec, cache: Option<CacheMode>, connect_timeout: Option<Duration>) -> ClusterOptions {
    let mut options = Vec::new();
    if let Some(cache) = cache {
        let on = !cache.direct();
        options.push(("rbd_cache".to_owned(), on.to_string()));
    }
    options.extend(s.options.iter().cloned());
    ClusterOptions {
        conf: s.conf.clone(),
        mon_host: s.mon_host.clone(),
        user: s.user.clone(),
        keyring: s.keyring.clone(),
        connect_timeout: connect_timeout.or(Some(spindle_rbd::DEFAULT_CONNECT_TIMEOUT)),
        op_timeout: None,
        options,
    }
}

/// Connects to the spec's cluster and opens its pool.
pub fn connect(spec: &str, s: &RbdSpec, opts: &RbdOpenOptions) -> Result<(Cluster, spindle_rbd::Pool)> {
    let p = Path::new(spec);
    let cluster = Cluster::connect(&cluster_options(s, opts.cache, opts.connect_timeout)).map_err(rbd_err(p))?;
    let pool = cluster.pool(&s.pool, s.namespace.as_deref()).map_err(rbd_err(p))?;
    Ok((cluster, pool))
}

/// Creates the image a spec names, `size` bytes (raw; a format goes on
/// top). Refused if it exists.
pub fn create(spec: &str, size: u64) -> Result<()> {
    let s = RbdSpec::parse(spec)?;
    if s.snapshot.is_some() {
        return Err(BlockError::Invalid(format!(
            "{spec}: a snapshot cannot be created as an image"
        )));
    }
    let (_cluster, pool) = connect(spec, &s, &RbdOpenOptions::default())?;
    pool.create_image(&s.image, size, &Default::default())
        .map_err(rbd_err(Path::new(spec)))
}

impl Rbd {
    /// Connects and opens the image a spec names.
    pub fn open(spec: &str, opts: &RbdOpenOptions) -> Result<Rbd> {
        let s = RbdSpec::parse(spec)?;
        let p = Path::new(spec);
        let (cluster, pool) = connect(spec, &s, opts)?;
        let read_only = if s.snapshot.is_some() {
            Some("a snapshot")
        } else if opts.read_only {
            Some("opened read-only")
        } else {
            None
        };
        let image = if read_only.is_some() {
            pool.open_read_only(&s.image, s.snapshot.as_deref())
        } else {
            pool.open(&s.image)
        }
        .map_err(rbd_err(p))?;
        let size = image.size().map_err(rbd_err(p))?;
        let locked = read_only.is_none() && image.features().map_err(rbd_err(p))? & features::EXCLUSIVE_LOCK != 0;
        if locked {
            take_lock(&image, p)?;
        }
        Ok(Rbd {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            spec: spec.into(),
            name: s.display_name(),
            image: Arc::new(image),
            read_only,
            size: AtomicU64::new(size),
            locked,
            cache: opts.cache.unwrap_or(CacheMode::Writeback),
            generation: AtomicU64::new(0),
            allocation: Mutex::new(None),
            alive: Arc::new(()),
            _cluster: cluster,
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// The spec it was opened from.
    pub fn path(&self) -> &Path {
        &self.spec
    }

    /// `POOL[/NAMESPACE]/IMAGE[@SNAP]`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether writes are refused.
    pub fn is_read_only(&self) -> bool {
        self.read_only.is_some()
    }

    /// Whether this open holds the image's exclusive lock.
    pub fn holds_lock(&self) -> bool {
        self.locked
    }

    /// Refuses writes to a read-only image, saying why.
    pub fn check_writable(&self) -> Result<()> {
        crate::error::writable(&self.spec, self.read_only)
    }

    /// The image's snapshots (for `info`).
    pub fn snapshots(&self) -> Result<Vec<Snapshot>> {
        self.image.snapshots().map_err(rbd_err(&self.spec))
    }

    /// Object size and count, features (for `info`).
    pub fn stat(&self) -> Result<(spindle_rbd::Stat, u64)> {
        let e = rbd_err(&self.spec);
        Ok((self.image.stat().map_err(&e)?, self.image.features().map_err(&e)?))
    }

    fn err(&self) -> impl Fn(spindle_rbd::Error) -> BlockError + '_ {
        rbd_err(&self.spec)
    }

    fn wrote(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Reads `buf.len()` bytes at `offset`, in range (the caller checked).
    pub async fn read(&self, offset: u64, buf: &SgList) -> Result<()> {
        let n = self.local()?.readv(offset, buf).await.map_err(self.err())?;
        if n < buf.len() {
            // The image shrank meanwhile: the rest reads as zeroes.
            buf.slice(n, buf.len() - n).fill_zero();
        }
        Ok(())
    }

    /// Writes all of `buf` at `offset` (in range); with `fua`, flushed.
    pub async fn write(&self, offset: u64, buf: &SgList, fua: bool) -> Result<()> {
        self.check_writable()?;
        let local = self.local()?;
        self.wrote();
        let r = local.writev(offset, buf).await;
        self.wrote();
        r.map_err(self.err())?;
        if fua || self.cache.write_through() {
            local.flush().await.map_err(self.err())?;
        }
        Ok(())
    }

    /// Makes completed writes durable.
    pub async fn flush(&self) -> Result<()> {
        if self.read_only.is_some() || self.cache.ignore_flush() {
            return Ok(());
        }
        self.local()?.flush().await.map(drop).map_err(self.err())
    }

    /// Discards a range (it reads as zeroes after).
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.ranges(offset, len, |l, o, n| Box::pin(l.discard(o, n))).await
    }

    /// Zeroes a range; `may_unmap` lets librbd deallocate it.
    pub async fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.ranges(offset, len, |l, o, n| Box::pin(l.write_zeroes(o, n, !may_unmap)))
            .await
    }

    async fn ranges<F>(&self, offset: u64, len: u64, op: F) -> Result<()>
    where
        F: Fn(
            &local::Local,
            u64,
            u64,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = spindle_rbd::Result<usize>> + '_>>,
    {
        self.check_writable()?;
        let local = self.local()?;
        let mut pos = 0;
        self.wrote();
        let mut r = Ok(());
        while pos < len {
            let n = (len - pos).min(MAX_RANGE);
            if let Err(e) = op(&local, offset + pos, n).await {
                r = Err(self.err()(e));
                break;
            }
            pos += n;
        }
        self.wrote();
        r
    }

    /// Whether `[offset, offset + len)` starts with data or a hole, and
    /// how far that goes. Answers come from `rbd_diff_iterate2` (whole
    /// objects) on a helper thread, a window at a time.
    pub async fn allocation(&self, offset: u64, len: u64) -> Result<(Allocation, u64)> {
        let size = self.size();
        if offset >= size {
            return Ok((
                Allocation {
                    data: false,
                    zero: true,
                },
                len,
            ));
        }
        let len = len.min(size - offset);
        let gen = self.generation.load(Ordering::Acquire);
        if let Some(ans) = self.cached_allocation(gen, offset, len) {
            return Ok(ans);
        }
        let end = offset.saturating_add(ALLOCATION_WINDOW.max(len)).min(size);
        let image = self.image.clone();
        let (tx, rx) = futures::channel::oneshot::channel();
        std::thread::Builder::new()
            .name("rbd-diff".into())
            .spawn(move || {
                let _ = tx.send(image.allocated(offset, end - offset, true));
            })
            .map_err(|source| BlockError::Io {
                path: self.spec.clone(),
                context: "cannot start a thread for an allocation query",
                source,
            })?;
        let data = rx
            .await
            .map_err(|_| BlockError::Invalid(format!("{}: the allocation query thread died", self.name)))?
            .map_err(self.err())?;
        let cache = AllocationCache {
            generation: gen,
            start: offset,
            end,
            data,
        };
        let ans = answer(&cache, offset, len);
        *self.allocation.lock().unwrap_or_else(|p| p.into_inner()) = Some(cache);
        Ok(ans)
    }

    fn cached_allocation(&self, gen: u64, offset: u64, len: u64) -> Option<(Allocation, u64)> {
        let c = self.allocation.lock().unwrap_or_else(|p| p.into_inner());
        let c = c.as_ref()?;
        (c.generation == gen && offset >= c.start && offset < c.end).then(|| answer(c, offset, len))
    }

    /// Changes the size (blocking: `rbd_resize`).
    pub fn resize(&self, size: u64) -> Result<()> {
        self.check_writable()?;
        self.image.resize(size).map_err(self.err())?;
        self.size.store(size, Ordering::Release);
        *self.allocation.lock().unwrap_or_else(|p| p.into_inner()) = None;
        Ok(())
    }

    /// Grows to at least `size` (a format allocating past the end), in
    /// steps of [`GROW_STEP`] so the blocking resize is rare.
    pub fn grow_to(&self, size: u64) -> Result<()> {
        if size <= self.size() {
            return Ok(());
        }
        self.resize(size.div_ceil(GROW_STEP) * GROW_STEP)
    }

    /// Setup-time read that blocks the thread (probing, opening a format):
    /// `buf` is in range (the caller checked).
    pub fn read_blocking(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let n = self.image.read_blocking(offset, buf).map_err(self.err())?;
        buf[n..].fill(0);
        Ok(())
    }
}

/// The cached window's answer for `offset` (inside it).
fn answer(c: &AllocationCache, offset: u64, len: u64) -> (Allocation, u64) {
    let limit = (offset + len).min(c.end);
    for e in &c.data {
        let e_end = e.offset + e.length;
        if e_end <= offset {
            continue;
        }
        if e.offset <= offset {
            return (
                Allocation {
                    data: true,
                    zero: false,
                },
                e_end.min(limit) - offset,
            );
        }
        return (
            Allocation {
                data: false,
                zero: true,
            },
            e.offset.min(limit) - offset,
        );
    }
    (
        Allocation {
            data: false,
            zero: true,
        },
        limit - offset,
    )
}

/// Takes the exclusive lock, waiting a little for another client that is
/// letting go of it (a migration's source).
fn take_lock(image: &Image, p: &Path) -> Result<()> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match image.lock_acquire() {
            Ok(()) => return Ok(()),
            Err(e) if matches!(e.errno(), Some(libc::EROFS) | Some(libc::EBUSY)) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) if matches!(e.errno(), Some(libc::EROFS) | Some(libc::EBUSY)) => {
                let owners = image.lock_owners().unwrap_or_default().join(", ");
                return Err(BlockError::Remote {
                    uri: p.display().to_string(),
                    errno: libc::EBUSY,
                    msg: format!(
                        "image {} is in use: another client holds its exclusive lock ({owners}); \
                         Spindle does not write an image another host writes",
                        image.spec()
                    ),
                });
            }
            Err(e) => return Err(rbd_err(p)(e)),
        }
    }
}

impl Drop for Rbd {
    fn drop(&mut self) {
        // The threads' queues let go of the image when they next look
        // (or with their threads); the lock goes now.
        if self.locked {
            if let Err(e) = self.image.lock_release() {
                tracing::warn!("{}: cannot release the exclusive lock: {e}", self.name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spindle_rbd::Extent;

    #[test]
    fn cached_windows_answer_runs_of_data_and_holes() {
        let c = AllocationCache {
            generation: 0,
            start: 0,
            end: 100,
            data: vec![Extent { offset: 10, length: 20 }, Extent { offset: 50, length: 10 }],
        };
        let d = Allocation {
            data: true,
            zero: false,
        };
        let h = Allocation {
            data: false,
            zero: true,
        };
        assert_eq!(answer(&c, 0, 100), (h, 10));
        assert_eq!(answer(&c, 10, 100), (d, 20));
        assert_eq!(answer(&c, 15, 5), (d, 5));
        assert_eq!(answer(&c, 30, 100), (h, 20));
        assert_eq!(answer(&c, 55, 100), (d, 5));
        assert_eq!(answer(&c, 60, 100), (h, 40));
        assert_eq!(answer(&c, 60, 10), (h, 10));
    }
}

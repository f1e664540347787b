//! An open RBD image: its metadata, snapshots, allocation and exclusive
//! lock. Data I/O goes through [`crate::EventQueue`]s, one per thread,
//! which share the image.

use std::ffi::CStr;
use std::ptr;
use std::sync::Arc;

use libc::{c_int, c_void, size_t};
use spindle_rbd_sys as sys;

use crate::cluster::PoolInner;
use crate::error::{Error, Result};

/// What [`crate::Pool::create_image`] sets; `None` takes the
/// configuration's `rbd_default_features` / `rbd_default_order`.
#[derive(Debug, Clone, Copy, Default)]
pub struct CreateOptions {
    /// `RBD_FEATURE_*` bits (see [`crate::features`]).
    pub features: Option<u64>,
    /// log2 of the object size (12..=26; Ceph's default 22, 4 MiB).
    pub order: Option<u8>,
}

/// What `rbd_stat` says of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// Size in bytes.
    pub size: u64,
    /// Object size in bytes.
    pub object_size: u64,
    /// Number of objects.
    pub objects: u64,
    /// log2 of the object size.
    pub order: u32,
}

/// One snapshot of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Its id.
    pub id: u64,
    /// Its name.
    pub name: String,
    /// The image's size when it was taken.
    pub size: u64,
}

/// A byte range of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Start, in bytes.
    pub offset: u64,
    /// Length, in bytes.
    pub length: u64,
}

/// An open image. Closing (drop) flushes.
pub struct Image {
    handle: sys::rbd_image_t,
    /// Keeps the ioctx and the cluster alive as long as the image is open.
    pool: Arc<PoolInner>,
    /// The image name, with `@SNAP` if opened at a snapshot.
    name: String,
    read_only: bool,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("spec", &self.spec())
            .field("read_only", &self.read_only)
            .finish()
    }
}

// SAFETY: librbd image handles are not tied to the thread that opened
// them (librbd runs their I/O on its own threads); the handle is closed
// once, in Drop.
unsafe impl Send for Image {}
// SAFETY: librbd's C API may be called on one image from several threads
// at once: every call goes through the image context's own locks (its
// owner, image and snapshot locks; the asynchronous calls queue under
// them), which is how QEMU's rbd driver submits from several iothreads.
// The handle itself is never changed after open.
unsafe impl Sync for Image {}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: opened by rbd_open*, closed once; no request is in flight
        // (requests only go through EventQueues, each of which holds an
        // Arc of the image and drains before dropping it).
        unsafe { sys::rbd_close(self.handle) };
    }
}

/// `rbd_diff_iterate2`'s callback: appends the extents that hold data.
unsafe extern "C" fn collect_extent(off: u64, len: size_t, exists: c_int, arg: *mut c_void) -> c_int {
    if exists != 0 {
        // SAFETY: `arg` is the `&mut Vec<Extent>` that `allocated` passed,
        // alive and not otherwise borrowed for the whole synchronous
        // rbd_diff_iterate2 call that runs this callback.
        let out = unsafe { &mut *arg.cast::<Vec<Extent>>() };
        let length = len as u64;
        match out.last_mut() {
            Some(last) if last.offset + last.length == off => last.length += length,
            _ => out.push(Extent { offset: off, length }),
        }
    }
    0
}

impl Image {
    pub(crate) fn from_raw(handle: sys::rbd_image_t, pool: Arc<PoolInner>, name: String, read_only: bool) -> Image {
        Image {
            handle,
            pool,
            name,
            read_only,
        }
    }

    pub(crate) fn raw(&self) -> sys::rbd_image_t {
        self.handle
    }

    /// `POOL[/NAMESPACE]/IMAGE[@SNAP]`.
    pub fn spec(&self) -> String {
        format!("{}/{}", self.pool.display, self.name)
    }

    /// Whether it was opened read-only (or at a snapshot).
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    pub(crate) fn error(&self, op: &str, r: i64) -> Error {
        let errno = i32::try_from(-r).unwrap_or(libc::EIO);
        Error::Image {
            cluster: self.pool.cluster.name.clone(),
            pool: self.pool.display.clone(),
            image: self.name.clone(),
            op: op.to_owned(),
            errno,
        }
    }

    fn check(&self, op: &str, r: c_int) -> Result<c_int> {
        if r < 0 {
            Err(self.error(op, i64::from(r)))
        } else {
            Ok(r)
        }
    }

    /// Size in bytes.
    pub fn size(&self) -> Result<u64> {
        let mut size = 0u64;
        // SAFETY: open handle, valid out-pointer.
        self.check("get size", unsafe { sys::rbd_get_size(self.handle, &mut size) })?;
        Ok(size)
    }

    /// Size and object layout.
    pub fn stat(&self) -> Result<Stat> {
        let mut info = std::mem::MaybeUninit::<sys::rbd_image_info_t>::zeroed();
        let len = std::mem::size_of::<sys::rbd_image_info_t>();
        // SAFETY: open handle; `info` is writable for `len` bytes.
        self.check("stat", unsafe { sys::rbd_stat(self.handle, info.as_mut_ptr(), len) })?;
        // SAFETY: zero-initialised (valid for this plain-data struct) and
        // filled by rbd_stat.
        let info = unsafe { info.assume_init() };
        Ok(Stat {
            size: info.size,
            object_size: info.obj_size,
            objects: info.num_objs,
            order: u32::try_from(info.order).unwrap_or(0),
        })
    }

    /// Resizes to `size` bytes (growing or shrinking).
    pub fn resize(&self, size: u64) -> Result<()> {
        // SAFETY: open handle.
        let r = unsafe { sys::rbd_resize(self.handle, size) };
        self.check("resize", r).map(drop)
    }

    /// The `RBD_FEATURE_*` bits.
    pub fn features(&self) -> Result<u64> {
        let mut f = 0u64;
        // SAFETY: open handle, valid out-pointer.
        self.check("get features", unsafe { sys::rbd_get_features(self.handle, &mut f) })?;
        Ok(f)
    }

    /// Flushes written data (blocking; the I/O thread uses
    /// [`crate::EventQueue::flush`]).
    pub fn flush(&self) -> Result<()> {
        // SAFETY: open handle.
        self.check("flush", unsafe { sys::rbd_flush(self.handle) }).map(drop)
    }

    /// Reads `buf.len()` bytes at `offset` (blocking: for setup, e.g.
    /// probing a format; I/O threads use [`crate::EventQueue`]). Returns
    /// the bytes read, fewer only past the end.
    pub fn read_blocking(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            let rest = &mut buf[done..];
            // SAFETY: open handle; `rest` is valid for writes of its length
            // for the whole synchronous call.
            let r = unsafe { sys::rbd_read(self.handle, offset + done as u64, rest.len(), rest.as_mut_ptr().cast()) };
            if r < 0 {
                return Err(self.error(&format!("read at {}", offset + done as u64), r as i64));
            }
            if r == 0 {
                break;
            }
            done += r as usize;
        }
        Ok(done)
    }

    /// The image's snapshots, oldest first.
    pub fn snapshots(&self) -> Result<Vec<Snapshot>> {
        let mut max: c_int = 16;
        loop {
            let zero = sys::rbd_snap_info_t {
                id: 0,
                size: 0,
                name: ptr::null(),
            };
            let mut snaps = vec![zero; max as usize];
            // SAFETY: open handle; `snaps` has `max` entries.
            let r = unsafe { sys::rbd_snap_list(self.handle, snaps.as_mut_ptr(), &mut max) };
            if r == -libc::ERANGE {
                continue; // `max` now says how many entries it needs.
            }
            let n = self.check("list snapshots", r)? as usize;
            let list = snaps[..n]
                .iter()
                .map(|s| Snapshot {
                    id: s.id,
                    size: s.size,
                    // SAFETY: rbd_snap_list filled the first `n` entries
                    // with NUL-terminated names, freed only below.
                    name: unsafe { CStr::from_ptr(s.name) }.to_string_lossy().into_owned(),
                })
                .collect();
            // SAFETY: the array rbd_snap_list filled, with its NULL-named
            // end marker after the `n` entries; frees the names once.
            unsafe { sys::rbd_snap_list_end(snaps.as_mut_ptr()) };
            return Ok(list);
        }
    }

    /// The extents of `[offset, offset + length)` that hold data
    /// (`rbd_diff_iterate2` since the image's creation, parent included),
    /// merged where adjacent. `whole_object` reports whole objects, which
    /// is much faster with the fast-diff feature; without it every
    /// object's allocation is listed from the OSDs.
    pub fn allocated(&self, offset: u64, length: u64, whole_object: bool) -> Result<Vec<Extent>> {
        let mut out: Vec<Extent> = Vec::new();
        // SAFETY: open handle; NULL from-snapshot; the callback only runs
        // during this call and gets `&mut out`, alive and unborrowed
        // throughout.
        let r = unsafe {
            sys::rbd_diff_iterate2(
                self.handle,
                ptr::null(),
                offset,
                length,
                1,
                u8::from(whole_object),
                Some(collect_extent),
                (&mut out as *mut Vec<Extent>).cast(),
            )
        };
        self.check("diff iterate", r)?;
        Ok(out)
    }

    /// Takes the exclusive lock (the image needs the exclusive-lock
    /// feature, else `EINVAL`). From then on this handle does not hand the
    /// lock over when another client asks (librbd's manual lock policy),
    /// so another handle's acquire fails (`EROFS`) until
    /// [`Image::lock_release`].
    pub fn lock_acquire(&self) -> Result<()> {
        // SAFETY: open handle.
        let r = unsafe { sys::rbd_lock_acquire(self.handle, sys::RBD_LOCK_MODE_EXCLUSIVE) };
        self.check("acquire exclusive lock", r).map(drop)
    }

    /// Releases the exclusive lock.
    pub fn lock_release(&self) -> Result<()> {
        // SAFETY: open handle.
        self.check("release exclusive lock", unsafe { sys::rbd_lock_release(self.handle) })
            .map(drop)
    }

    /// Whether this handle owns the exclusive lock.
    pub fn is_lock_owner(&self) -> Result<bool> {
        let mut owner: c_int = 0;
        // SAFETY: open handle, valid out-pointer.
        self.check("query exclusive lock", unsafe {
            sys::rbd_is_exclusive_lock_owner(self.handle, &mut owner)
        })?;
        Ok(owner != 0)
    }

    /// The clients holding the lock (librbd's owner strings), empty if
    /// none.
    pub fn lock_owners(&self) -> Result<Vec<String>> {
        let mut max: size_t = 4;
        loop {
            let mut owners: Vec<*mut libc::c_char> = vec![ptr::null_mut(); max];
            let mut mode: sys::rbd_lock_mode_t = 0;
            // SAFETY: open handle; `owners` has `max` entries.
            let r = unsafe { sys::rbd_lock_get_owners(self.handle, &mut mode, owners.as_mut_ptr(), &mut max) };
            match r {
                r if r == -libc::ENOENT => return Ok(Vec::new()),
                r if r == -libc::ERANGE => continue, // `max` is now the count.
                r => self.check("list lock owners", r)?,
            };
            let list = owners[..max]
                .iter()
                // SAFETY: the first `max` entries are strdup'd
                // NUL-terminated strings, freed only below.
                .map(|&p| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
                .collect();
            // SAFETY: frees the `max` strings rbd_lock_get_owners returned,
            // once.
            unsafe { sys::rbd_lock_get_owners_cleanup(owners.as_mut_ptr(), max) };
            return Ok(list);
        }
    }
}

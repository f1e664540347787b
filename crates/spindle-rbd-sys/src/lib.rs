//! Raw declarations for the part of librbd and librados that Spindle uses,
//! written by hand from Ceph 16.2's `rbd/librbd.h` (LIBRBD_VER 1.16.0),
//! `rbd/features.h` and `rados/librados.h` (Debian 12's `librbd-dev` and
//! `librados-dev`). Every function returns a negative errno on failure
//! unless said otherwise; see the headers for the full contracts.
//!
//! Nothing here is safe to call without reading the C contract: the safe
//! layer is the `spindle-rbd` crate.
//!
//! The libraries are loaded at run time ([`load`], `dlopen` of
//! `librados.so.2` and `librbd.so.1`), as QEMU loads its rbd driver as a
//! module: Spindle builds without Ceph's development packages and runs
//! without Ceph installed; only opening an RBD image needs the client
//! libraries (Debian: `librbd1`, which `ceph-common` pulls in). Each
//! function below calls the symbol of the same name and C signature;
//! [`load`] must have succeeded first (the safe layer loads before it
//! connects, and every other call needs a handle that only exists after).
#![deny(missing_docs)]
#![allow(non_camel_case_types)]

use libc::{c_char, c_int, c_void, iovec, size_t, ssize_t};
use std::sync::OnceLock;

/// Declares a library's functions: a table of pointers resolved once by
/// name, and an `unsafe fn` per function that calls through it.
macro_rules! dynamic {
    (
        $(#[$ldoc:meta])*
        $api:ident, $cell:ident, $file:literal, $package:literal;
        $( $(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)?; )*
    ) => {
        $(#[$ldoc])*
        #[allow(non_snake_case)]
        struct $api {
            $( $name: unsafe extern "C" fn($($ty),*) $(-> $ret)?, )*
            /// Kept loaded for the process' life (the table is static).
            _lib: libloading::Library,
        }

        static $cell: OnceLock<Result<$api, String>> = OnceLock::new();

        impl $api {
            fn open() -> Result<$api, String> {
                let fail = |e: libloading::Error| {
                    format!(concat!("cannot load ", $file, " (install Ceph's client library: apt-get install ", $package, "): {}"), e)
                };
                // SAFETY: loading a system library runs its initialisers,
                // which Ceph's libraries are written to have run in any
                // process that links them.
                let lib = unsafe { libloading::Library::new($file) }.map_err(fail)?;
                Ok($api {
                    $(
                        // SAFETY: the symbol is the C function of this
                        // name, declared with the signature of Ceph 16.2's
                        // headers; the library stays loaded in `_lib`.
                        $name: *unsafe { lib.get::<unsafe extern "C" fn($($ty),*) $(-> $ret)?>(concat!(stringify!($name), "\0").as_bytes()) }.map_err(fail)?,
                    )*
                    _lib: lib,
                })
            }

            fn get() -> &'static $api {
                match $cell.get() {
                    Some(Ok(api)) => api,
                    _ => panic!(concat!("spindle-rbd-sys: ", $file, " is not loaded: load() first (a bug)")),
                }
            }
        }

        $(
            $(#[$doc])*
            ///
            /// # Safety
            /// The C function's contract (Ceph's headers); [`load`] must
            /// have succeeded.
            #[allow(clippy::too_many_arguments)] // The C signature's.
            pub unsafe fn $name($($arg: $ty),*) $(-> $ret)? {
                // SAFETY: the pointer was resolved for exactly this C
                // signature; the caller keeps the C contract.
                unsafe { ($api::get().$name)($($arg),*) }
            }
        )*
    };
}

/// Loads librados and librbd (once; later calls return the first
/// outcome). An error names the library and the package to install.
pub fn load() -> Result<(), String> {
    RADOS.get_or_init(Rados::open).as_ref().map_err(Clone::clone)?;
    RBD.get_or_init(Rbd::open).as_ref().map_err(Clone::clone)?;
    Ok(())
}

/// A librados cluster handle (`rados_t`).
pub type rados_t = *mut c_void;
/// A librados I/O context: a pool, and a namespace in it (`rados_ioctx_t`).
pub type rados_ioctx_t = *mut c_void;
/// An open RBD image (`rbd_image_t`).
pub type rbd_image_t = *mut c_void;
/// A set of image-creation options (`rbd_image_options_t`).
pub type rbd_image_options_t = *mut c_void;
/// An asynchronous request's completion (`rbd_completion_t`).
pub type rbd_completion_t = *mut c_void;
/// The callback a completion runs when its request finishes, on a librbd
/// thread (`rbd_callback_t`).
pub type rbd_callback_t = Option<unsafe extern "C" fn(cb: rbd_completion_t, arg: *mut c_void)>;
/// `rbd_diff_iterate2`'s callback: offset, length, whether the extent holds
/// data (1) or is known to read as zeroes (0), and the caller's argument; a
/// negative return stops the iteration with that error.
pub type rbd_diff_cb_t = Option<unsafe extern "C" fn(off: u64, len: size_t, exists: c_int, arg: *mut c_void) -> c_int>;

/// `rbd_set_image_notification` type: `fd` is a pipe.
pub const EVENT_TYPE_PIPE: c_int = 1;
/// `rbd_set_image_notification` type: `fd` is an eventfd.
pub const EVENT_TYPE_EVENTFD: c_int = 2;

/// `rbd_lock_mode_t`: the exclusive lock.
pub const RBD_LOCK_MODE_EXCLUSIVE: rbd_lock_mode_t = 0;
/// `rbd_lock_mode_t`: a shared lock.
pub const RBD_LOCK_MODE_SHARED: rbd_lock_mode_t = 1;
/// `rbd_lock_mode_t` (a C enum, `int`-sized).
pub type rbd_lock_mode_t = c_int;

/// `RBD_IMAGE_OPTION_FORMAT` (uint64: 1 or 2).
pub const RBD_IMAGE_OPTION_FORMAT: c_int = 0;
/// `RBD_IMAGE_OPTION_FEATURES` (uint64: `RBD_FEATURE_*` bits).
pub const RBD_IMAGE_OPTION_FEATURES: c_int = 1;
/// `RBD_IMAGE_OPTION_ORDER` (uint64: log2 of the object size).
pub const RBD_IMAGE_OPTION_ORDER: c_int = 2;

/// `RBD_FEATURE_LAYERING`.
pub const RBD_FEATURE_LAYERING: u64 = 1 << 0;
/// `RBD_FEATURE_STRIPINGV2`.
pub const RBD_FEATURE_STRIPINGV2: u64 = 1 << 1;
/// `RBD_FEATURE_EXCLUSIVE_LOCK`.
pub const RBD_FEATURE_EXCLUSIVE_LOCK: u64 = 1 << 2;
/// `RBD_FEATURE_OBJECT_MAP` (needs the exclusive lock).
pub const RBD_FEATURE_OBJECT_MAP: u64 = 1 << 3;
/// `RBD_FEATURE_FAST_DIFF` (needs the object map).
pub const RBD_FEATURE_FAST_DIFF: u64 = 1 << 4;
/// `RBD_FEATURE_DEEP_FLATTEN`.
pub const RBD_FEATURE_DEEP_FLATTEN: u64 = 1 << 5;
/// `RBD_FEATURE_JOURNALING`.
pub const RBD_FEATURE_JOURNALING: u64 = 1 << 6;
/// `RBD_FEATURE_DATA_POOL`.
pub const RBD_FEATURE_DATA_POOL: u64 = 1 << 7;

/// `RBD_MAX_BLOCK_NAME_SIZE`.
pub const RBD_MAX_BLOCK_NAME_SIZE: usize = 24;
/// `RBD_MAX_IMAGE_NAME_SIZE`.
pub const RBD_MAX_IMAGE_NAME_SIZE: usize = 96;

/// `rbd_image_info_t`, filled by `rbd_stat`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct rbd_image_info_t {
    /// Image size in bytes.
    pub size: u64,
    /// Object size in bytes.
    pub obj_size: u64,
    /// Number of objects the image spans.
    pub num_objs: u64,
    /// log2 of the object size.
    pub order: c_int,
    /// Deprecated.
    pub block_name_prefix: [c_char; RBD_MAX_BLOCK_NAME_SIZE],
    /// Deprecated.
    pub parent_pool: i64,
    /// Deprecated.
    pub parent_name: [c_char; RBD_MAX_IMAGE_NAME_SIZE],
}

/// `rbd_snap_info_t`, filled by `rbd_snap_list` (names freed by
/// `rbd_snap_list_end`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct rbd_snap_info_t {
    /// Snapshot id.
    pub id: u64,
    /// Image size at the snapshot.
    pub size: u64,
    /// NUL-terminated name; NULL in the entry after the last.
    pub name: *const c_char,
}

dynamic! {
    /// librados, `librados.so.2`.
    Rados, RADOS, "librados.so.2", "librados2";
    /// Creates a cluster handle for `clustername` (usually "ceph") and the
    /// entity `name` ("client.ID"); `flags` must be 0.
    fn rados_create2(pcluster: *mut rados_t, clustername: *const c_char, name: *const c_char, flags: u64) -> c_int;
    /// Reads a ceph.conf; `path` NULL searches the default places.
    fn rados_conf_read_file(cluster: rados_t, path: *const c_char) -> c_int;
    /// Sets one configuration option (before `rados_connect` for most).
    fn rados_conf_set(cluster: rados_t, option: *const c_char, value: *const c_char) -> c_int;
    /// Connects to the monitors (bounded by `client_mount_timeout`).
    fn rados_connect(cluster: rados_t) -> c_int;
    /// Disconnects and frees the handle (all I/O contexts must be gone).
    fn rados_shutdown(cluster: rados_t);
    /// Opens an I/O context on the pool `pool_name`.
    fn rados_ioctx_create(cluster: rados_t, pool_name: *const c_char, ioctx: *mut rados_ioctx_t) -> c_int;
    /// Frees an I/O context.
    fn rados_ioctx_destroy(io: rados_ioctx_t);
    /// Sets the namespace for later operations (NULL or "" is the default).
    fn rados_ioctx_set_namespace(io: rados_ioctx_t, nspace: *const c_char);
}

dynamic! {
    /// librbd, `librbd.so.1`.
    Rbd, RBD, "librbd.so.1", "librbd1";
    /// librbd's version.
    fn rbd_version(major: *mut c_int, minor: *mut c_int, extra: *mut c_int);
    /// Allocates an empty option set.
    fn rbd_image_options_create(opts: *mut rbd_image_options_t);
    /// Frees an option set.
    fn rbd_image_options_destroy(opts: rbd_image_options_t);
    /// Sets a uint64 option (`RBD_IMAGE_OPTION_*`).
    fn rbd_image_options_set_uint64(opts: rbd_image_options_t, optname: c_int, optval: u64) -> c_int;
    /// Creates an image with the options (unset ones take the
    /// configuration's `rbd_default_*`).
    fn rbd_create4(io: rados_ioctx_t, name: *const c_char, size: u64, opts: rbd_image_options_t) -> c_int;
    /// Removes an image (-EBUSY while it is open with watchers,
    /// -ENOTEMPTY with snapshots).
    fn rbd_remove(io: rados_ioctx_t, name: *const c_char) -> c_int;
    /// Opens an image read-write, at the head or (read-only then) at
    /// `snap_name` (NULL for the head).
    fn rbd_open(io: rados_ioctx_t, name: *const c_char, image: *mut rbd_image_t, snap_name: *const c_char) -> c_int;
    /// Opens an image read-only, at `snap_name` or the head (NULL).
    fn rbd_open_read_only(io: rados_ioctx_t, name: *const c_char, image: *mut rbd_image_t, snap_name: *const c_char) -> c_int;
    /// Closes an image (flushes; all its requests must be complete).
    fn rbd_close(image: rbd_image_t) -> c_int;
    /// Resizes (growing or shrinking). (Not `rbd_resize2`: its C wrapper
    /// calls the progress callback without checking for NULL.)
    fn rbd_resize(image: rbd_image_t, size: u64) -> c_int;
    /// Fills `info` (`infosize` = its size).
    fn rbd_stat(image: rbd_image_t, info: *mut rbd_image_info_t, infosize: size_t) -> c_int;
    /// The image's size in bytes (of the snapshot, if opened at one).
    fn rbd_get_size(image: rbd_image_t, size: *mut u64) -> c_int;
    /// The image's `RBD_FEATURE_*` bits.
    fn rbd_get_features(image: rbd_image_t, features: *mut u64) -> c_int;
    /// Flushes written data (synchronous).
    fn rbd_flush(image: rbd_image_t) -> c_int;
    /// Reads `len` bytes at `ofs` into `buf` (synchronous): the bytes
    /// read, or a negative errno.
    fn rbd_read(image: rbd_image_t, ofs: u64, len: size_t, buf: *mut c_char) -> ssize_t;
    /// Lists snapshots into `snaps`, `*max_snaps` entries long: returns the
    /// count, or -ERANGE with `*max_snaps` set to the entries needed (the
    /// count plus one for the NULL-named end marker).
    fn rbd_snap_list(image: rbd_image_t, snaps: *mut rbd_snap_info_t, max_snaps: *mut c_int) -> c_int;
    /// Frees the names `rbd_snap_list` filled in.
    fn rbd_snap_list_end(snaps: *mut rbd_snap_info_t);
    /// Calls `cb` for each extent of `[ofs, ofs+len)` that changed since
    /// `fromsnapname` (NULL: since creation, i.e. allocated extents);
    /// `whole_object` reports whole objects (faster with fast-diff).
    fn rbd_diff_iterate2(image: rbd_image_t, fromsnapname: *const c_char, ofs: u64, len: u64, include_parent: u8, whole_object: u8, cb: rbd_diff_cb_t, arg: *mut c_void) -> c_int;
    /// Makes completions of later requests queue for `rbd_poll_io_events`
    /// and signal `fd` (`EVENT_TYPE_EVENTFD` or `EVENT_TYPE_PIPE`).
    fn rbd_set_image_notification(image: rbd_image_t, fd: c_int, type_: c_int) -> c_int;
    /// Takes up to `numcomp` queued completions into `comps`; returns how
    /// many.
    fn rbd_poll_io_events(image: rbd_image_t, comps: *mut rbd_completion_t, numcomp: c_int) -> c_int;
    /// Whether this handle owns the exclusive lock.
    fn rbd_is_exclusive_lock_owner(image: rbd_image_t, is_owner: *mut c_int) -> c_int;
    /// Acquires the managed lock (`RBD_LOCK_MODE_EXCLUSIVE` needs the
    /// exclusive-lock feature) and stops handing it over on request.
    fn rbd_lock_acquire(image: rbd_image_t, lock_mode: rbd_lock_mode_t) -> c_int;
    /// Releases the managed lock.
    fn rbd_lock_release(image: rbd_image_t) -> c_int;
    /// Lists the lock's owners into `lock_owners` (`*max_lock_owners`
    /// long; -ERANGE with the count needed), -ENOENT if none.
    fn rbd_lock_get_owners(image: rbd_image_t, lock_mode: *mut rbd_lock_mode_t, lock_owners: *mut *mut c_char, max_lock_owners: *mut size_t) -> c_int;
    /// Frees the strings `rbd_lock_get_owners` filled in.
    fn rbd_lock_get_owners_cleanup(lock_owners: *mut *mut c_char, lock_owner_count: size_t);
    /// Creates a completion whose `complete_cb(c, cb_arg)` runs when the
    /// request it is given to finishes.
    fn rbd_aio_create_completion(cb_arg: *mut c_void, complete_cb: rbd_callback_t, c: *mut rbd_completion_t) -> c_int;
    /// The finished request's result: bytes for reads and writes, 0, or a
    /// negative errno.
    fn rbd_aio_get_return_value(c: rbd_completion_t) -> ssize_t;
    /// The `cb_arg` the completion was created with.
    fn rbd_aio_get_arg(c: rbd_completion_t) -> *mut c_void;
    /// Drops the caller's reference to a completion.
    fn rbd_aio_release(c: rbd_completion_t);
    /// Reads into the buffers of `iov` (the array and the buffers must
    /// stay valid until the completion).
    fn rbd_aio_readv(image: rbd_image_t, iov: *const iovec, iovcnt: c_int, off: u64, c: rbd_completion_t) -> c_int;
    /// Writes the buffers of `iov` (zero-copy: the buffers must stay valid
    /// until the completion).
    fn rbd_aio_writev(image: rbd_image_t, iov: *const iovec, iovcnt: c_int, off: u64, c: rbd_completion_t) -> c_int;
    /// Discards a range.
    fn rbd_aio_discard(image: rbd_image_t, off: u64, len: u64, c: rbd_completion_t) -> c_int;
    /// Writes zeroes to a range (`zero_flags`, `op_flags`: 0).
    fn rbd_aio_write_zeroes(image: rbd_image_t, off: u64, len: size_t, c: rbd_completion_t, zero_flags: c_int, op_flags: c_int) -> c_int;
    /// Flushes earlier writes.
    fn rbd_aio_flush(image: rbd_image_t, c: rbd_completion_t) -> c_int;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_c_headers() {
        // x86-64 / aarch64 LP64: u64 size, obj_size, num_objs; int order
        // (+4 padding after the 24-byte prefix); int64 parent_pool;
        // 96-byte parent_name.
        assert_eq!(std::mem::size_of::<rbd_image_info_t>(), 8 * 3 + 4 + 24 + 4 + 8 + 96);
        assert_eq!(std::mem::offset_of!(rbd_image_info_t, parent_pool), 56);
        assert_eq!(std::mem::size_of::<rbd_snap_info_t>(), 24);
    }

    #[test]
    fn loads_librbd_1_16_or_later() {
        load().unwrap();
        let (mut major, mut minor, mut extra) = (0, 0, 0);
        // SAFETY: rbd_version only writes the three ints it is given.
        unsafe { rbd_version(&mut major, &mut minor, &mut extra) };
        assert_eq!(major, 1);
        assert!(minor >= 16, "librbd {major}.{minor}.{extra}");
    }
}

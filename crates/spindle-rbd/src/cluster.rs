//! The cluster connection and pools (I/O contexts).

use std::ffi::CString;
use std::path::PathBuf;
use std::ptr;
use std::sync::Arc;
use std::time::Duration;

use spindle_rbd_sys as sys;

use crate::error::{cstring, Error, Result};
use crate::image::{CreateOptions, Image};

/// How to reach and authenticate to a cluster, as QEMU's `rbd:` options
/// spell them (`conf`, `id`, `keyring`, `mon_host`) plus timeouts.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// A ceph.conf to read. `None`: the default places
    /// (`$CEPH_CONF`, /etc/ceph/ceph.conf, ~/.ceph/config, ./ceph.conf),
    /// none of which need exist.
    pub conf: Option<PathBuf>,
    /// Monitor addresses (`mon_host`), overriding the conf's.
    pub mon_host: Option<String>,
    /// The client id, without `client.` (default `admin`).
    pub user: Option<String>,
    /// A keyring file, overriding the conf's.
    pub keyring: Option<PathBuf>,
    /// How long connecting may take before it fails
    /// (`client_mount_timeout`; Ceph's default is 300 s). Default 30 s.
    pub connect_timeout: Option<Duration>,
    /// How long one OSD or monitor request may take before it fails with
    /// `ETIMEDOUT` (`rados_osd_op_timeout`, `rados_mon_op_timeout`).
    /// `None` keeps Ceph's default, 0: requests wait for the cluster for
    /// as long as it takes (what a guest wants through a short outage).
    pub op_timeout: Option<Duration>,
    /// Further configuration options, set last (`name`, `value`).
    pub options: Vec<(String, String)>,
}

/// The default [`ClusterOptions::connect_timeout`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Ceph's duration options take whole seconds: round up, at least 1.
fn secs(d: Duration) -> String {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    s.max(1).to_string()
}

pub(crate) struct ClusterInner {
    handle: sys::rados_t,
    /// How errors name this cluster.
    pub(crate) name: String,
}

// SAFETY: a rados_t is used from any thread by librados' own design (its
// calls lock internally); the handle is only freed in Drop, once.
unsafe impl Send for ClusterInner {}
// SAFETY: as above: librados' cluster calls are thread-safe.
unsafe impl Sync for ClusterInner {}

impl Drop for ClusterInner {
    fn drop(&mut self) {
        // SAFETY: the handle came from rados_create2 and is shut down once;
        // every Pool and Image holds an Arc to this, so none is left.
        unsafe { sys::rados_shutdown(self.handle) };
    }
}

/// A connection to a Ceph cluster (a librados handle). Cheap to clone;
/// pools and images keep it alive.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<ClusterInner>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("name", &self.inner.name).finish()
    }
}

impl Cluster {
    /// Creates a handle, reads the configuration, sets the options and
    /// connects. A cluster that cannot be reached fails after
    /// `connect_timeout` with `ETIMEDOUT`.
    pub fn connect(opts: &ClusterOptions) -> Result<Cluster> {
        sys::load().map_err(Error::Library)?;
        let name = match (&opts.mon_host, &opts.conf) {
            (Some(mon), _) => mon.clone(),
            (None, Some(conf)) => conf.display().to_string(),
            (None, None) => "(default ceph.conf)".to_owned(),
        };
        let fail = |op: &str, r: i32| Error::Cluster {
            cluster: name.clone(),
            op: op.to_owned(),
            errno: -r,
        };
        let entity = format!("client.{}", opts.user.as_deref().unwrap_or("admin"));
        let entity_c = cstring("user", &entity)?;
        let mut handle: sys::rados_t = ptr::null_mut();
        // SAFETY: `handle` is a valid out-pointer; the strings are
        // NUL-terminated and outlive the call; flags must be 0.
        let r = unsafe { sys::rados_create2(&mut handle, c"ceph".as_ptr(), entity_c.as_ptr(), 0) };
        if r < 0 {
            return Err(fail("create handle", r));
        }
        // From here the handle is shut down by ClusterInner's Drop on any
        // error return.
        let inner = ClusterInner {
            handle,
            name: name.clone(),
        };

        match &opts.conf {
            Some(path) => {
                let p = cstring("conf path", &path.to_string_lossy())?;
                // SAFETY: valid handle, NUL-terminated path.
                let r = unsafe { sys::rados_conf_read_file(inner.handle, p.as_ptr()) };
                if r < 0 {
                    return Err(fail(&format!("read {}", path.display()), r));
                }
            }
            None => {
                // As QEMU does: the default places, whose absence is fine.
                // SAFETY: valid handle; NULL asks for the default search.
                let _ = unsafe { sys::rados_conf_read_file(inner.handle, ptr::null()) };
            }
        }

        let mut settings: Vec<(String, String)> = Vec::new();
        if let Some(mon) = &opts.mon_host {
            settings.push(("mon_host".into(), mon.clone()));
        }
        if let Some(keyring) = &opts.keyring {
            settings.push(("keyring".into(), keyring.to_string_lossy().into_owned()));
        }
        let connect = opts.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        settings.push(("client_mount_timeout".into(), secs(connect)));
        if let Some(op) = opts.op_timeout {
            settings.push(("rados_osd_op_timeout".into(), secs(op)));
            settings.push(("rados_mon_op_timeout".into(), secs(op)));
        }
        settings.extend(opts.options.iter().cloned());
        for (key, value) in &settings {
            let k = cstring("option name", key)?;
            let v = cstring("option value", value)?;
            // SAFETY: valid, not yet connected handle; both strings are
            // NUL-terminated and outlive the call (librados copies them).
            let r = unsafe { sys::rados_conf_set(inner.handle, k.as_ptr(), v.as_ptr()) };
            if r < 0 {
                return Err(fail(&format!("set {key}={value}"), r));
            }
        }

        // SAFETY: valid, configured handle; rados_connect blocks for at
        // most client_mount_timeout.
        let r = unsafe { sys::rados_connect(inner.handle) };
        if r < 0 {
            return Err(fail("connect", r));
        }
        Ok(Cluster { inner: Arc::new(inner) })
    }

    /// How errors name this cluster.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Opens the pool `name`, in `namespace` (`None` or `""`: the default
    /// namespace).
    pub fn pool(&self, name: &str, namespace: Option<&str>) -> Result<Pool> {
        let namespace = namespace.filter(|ns| !ns.is_empty()).map(str::to_owned);
        let display = match &namespace {
            Some(ns) => format!("{name}/{ns}"),
            None => name.to_owned(),
        };
        let name_c = cstring("pool", name)?;
        let ns_c = namespace.as_deref().map(|ns| cstring("namespace", ns)).transpose()?;
        let mut ioctx: sys::rados_ioctx_t = ptr::null_mut();
        // SAFETY: connected handle (kept alive by self.inner), a
        // NUL-terminated name and a valid out-pointer.
        let r = unsafe { sys::rados_ioctx_create(self.inner.handle, name_c.as_ptr(), &mut ioctx) };
        if r == -libc::ENOENT {
            return Err(Error::PoolNotFound {
                cluster: self.inner.name.clone(),
                pool: name.to_owned(),
            });
        }
        if r < 0 {
            return Err(Error::Pool {
                cluster: self.inner.name.clone(),
                pool: display,
                op: "open".into(),
                errno: -r,
            });
        }
        if let Some(ns) = &ns_c {
            // SAFETY: the ioctx was just created; librados copies the name.
            unsafe { sys::rados_ioctx_set_namespace(ioctx, ns.as_ptr()) };
        }
        Ok(Pool {
            inner: Arc::new(PoolInner {
                ioctx,
                cluster: self.inner.clone(),
                display,
            }),
        })
    }
}

pub(crate) struct PoolInner {
    pub(crate) ioctx: sys::rados_ioctx_t,
    /// Keeps the cluster handle alive while the ioctx exists.
    pub(crate) cluster: Arc<ClusterInner>,
    /// `POOL` or `POOL/NAMESPACE`.
    pub(crate) display: String,
}

// SAFETY: librados I/O contexts may be used from any thread; the only
// call that changes one (set_namespace) is made before it is shared.
unsafe impl Send for PoolInner {}
// SAFETY: as above; librbd's open/create/remove only read the ioctx (they
// duplicate it for the image).
unsafe impl Sync for PoolInner {}

impl Drop for PoolInner {
    fn drop(&mut self) {
        // SAFETY: created by rados_ioctx_create, destroyed once, before the
        // cluster handle (which `self.cluster` still holds). Images hold
        // an Arc to this, so none is open on it.
        unsafe { sys::rados_ioctx_destroy(self.ioctx) };
    }
}

/// A pool (and namespace) to create, remove and open images in.
#[derive(Clone)]
pub struct Pool {
    pub(crate) inner: Arc<PoolInner>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("pool", &self.inner.display).finish()
    }
}

impl Pool {
    /// `POOL` or `POOL/NAMESPACE`.
    pub fn name(&self) -> &str {
        &self.inner.display
    }

    fn error(&self, op: &str, image: &str, r: i32) -> Error {
        if r == -libc::ENOENT {
            return Error::ImageNotFound {
                cluster: self.inner.cluster.name.clone(),
                pool: self.inner.display.clone(),
                image: image.to_owned(),
            };
        }
        Error::Pool {
            cluster: self.inner.cluster.name.clone(),
            pool: self.inner.display.clone(),
            op: format!("{op} image {image}"),
            errno: -r,
        }
    }

    /// Creates an image of `size` bytes (format 2; features and object
    /// size from `opts`, else the configuration's defaults).
    pub fn create_image(&self, name: &str, size: u64, opts: &CreateOptions) -> Result<()> {
        let name_c = cstring("image", name)?;
        let mut o: sys::rbd_image_options_t = ptr::null_mut();
        // SAFETY: valid out-pointer; the set is destroyed below.
        unsafe { sys::rbd_image_options_create(&mut o) };
        let set = |opt: libc::c_int, v: u64| {
            // SAFETY: `o` is a live option set; the option takes a uint64.
            unsafe { sys::rbd_image_options_set_uint64(o, opt, v) }
        };
        let mut r = 0;
        if let Some(features) = opts.features {
            r = set(sys::RBD_IMAGE_OPTION_FEATURES, features);
        }
        if let (0, Some(order)) = (r, opts.order) {
            r = set(sys::RBD_IMAGE_OPTION_ORDER, u64::from(order));
        }
        if r == 0 {
            // SAFETY: live ioctx (held by self), NUL-terminated name, live
            // option set.
            r = unsafe { sys::rbd_create4(self.inner.ioctx, name_c.as_ptr(), size, o) };
        }
        // SAFETY: created above, destroyed once.
        unsafe { sys::rbd_image_options_destroy(o) };
        if r < 0 {
            // ENOENT from create means something else than a missing image.
            return Err(Error::Pool {
                cluster: self.inner.cluster.name.clone(),
                pool: self.inner.display.clone(),
                op: format!("create image {name}"),
                errno: -r,
            });
        }
        Ok(())
    }

    /// Removes an image (it must have no snapshots and not be open).
    pub fn remove_image(&self, name: &str) -> Result<()> {
        let name_c = cstring("image", name)?;
        // SAFETY: live ioctx, NUL-terminated name.
        let r = unsafe { sys::rbd_remove(self.inner.ioctx, name_c.as_ptr()) };
        if r < 0 {
            return Err(self.error("remove", name, r));
        }
        Ok(())
    }

    /// Opens an image read-write at its head.
    pub fn open(&self, name: &str) -> Result<Image> {
        self.open_with(name, None, false)
    }

    /// Opens an image read-only, at `snapshot` or its head.
    pub fn open_read_only(&self, name: &str, snapshot: Option<&str>) -> Result<Image> {
        self.open_with(name, snapshot, true)
    }

    fn open_with(&self, name: &str, snapshot: Option<&str>, read_only: bool) -> Result<Image> {
        let shown = match snapshot {
            Some(s) => format!("{name}@{s}"),
            None => name.to_owned(),
        };
        let name_c = cstring("image", name)?;
        let snap_c: Option<CString> = snapshot.map(|s| cstring("snapshot", s)).transpose()?;
        let snap_p = snap_c.as_ref().map_or(ptr::null(), |s| s.as_ptr());
        let mut image: sys::rbd_image_t = ptr::null_mut();
        // SAFETY: live ioctx, NUL-terminated name, snapshot name or NULL,
        // valid out-pointer.
        let r = unsafe {
            if read_only {
                sys::rbd_open_read_only(self.inner.ioctx, name_c.as_ptr(), &mut image, snap_p)
            } else {
                sys::rbd_open(self.inner.ioctx, name_c.as_ptr(), &mut image, snap_p)
            }
        };
        if r < 0 {
            return Err(self.error("open", &shown, r));
        }
        Ok(Image::from_raw(image, self.inner.clone(), shown, read_only))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_round_up_to_whole_seconds() {
        assert_eq!(secs(Duration::from_millis(1)), "1");
        assert_eq!(secs(Duration::from_millis(2500)), "3");
        assert_eq!(secs(Duration::from_secs(30)), "30");
        assert_eq!(secs(Duration::ZERO), "1");
    }
}

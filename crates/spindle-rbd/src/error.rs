//! One error type for the crate: which cluster, pool or image, which
//! operation, and librbd's errno.

/// A failure of a librados/librbd call, naming what it was about.
///
/// `pool` is spelled as rbd does, `POOL` or `POOL/NAMESPACE`, so an image
/// reads `POOL[/NAMESPACE]/IMAGE`. `cluster` is the monitor address or the
/// configuration file the connection came from.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Creating, configuring or connecting the cluster handle failed.
    #[error("cluster {cluster}: {op}: {}", errno_text(*errno))]
    Cluster {
        /// The cluster (monitor address or conf path).
        cluster: String,
        /// What was done.
        op: String,
        /// The positive errno.
        errno: i32,
    },
    /// Ceph's client libraries cannot be loaded (not installed).
    #[error("{0}")]
    Library(String),
    /// The pool does not exist.
    #[error("pool {pool} not found on cluster {cluster}")]
    PoolNotFound {
        /// The cluster.
        cluster: String,
        /// The pool.
        pool: String,
    },
    /// A pool operation (open, create or remove an image) failed.
    #[error("pool {pool} on cluster {cluster}: {op}: {}", errno_text(*errno))]
    Pool {
        /// The cluster.
        cluster: String,
        /// The pool (and namespace).
        pool: String,
        /// What was done.
        op: String,
        /// The positive errno.
        errno: i32,
    },
    /// The image (or the snapshot it was opened at) does not exist.
    #[error("image {pool}/{image} not found")]
    ImageNotFound {
        /// The cluster.
        cluster: String,
        /// The pool (and namespace).
        pool: String,
        /// The image, with `@SNAP` if opened at a snapshot.
        image: String,
    },
    /// An operation on an open image failed.
    #[error("image {pool}/{image} on cluster {cluster}: {op}: {}", errno_text(*errno))]
    Image {
        /// The cluster.
        cluster: String,
        /// The pool (and namespace).
        pool: String,
        /// The image.
        image: String,
        /// What was done.
        op: String,
        /// The positive errno.
        errno: i32,
    },
    /// A name or option given to librados/librbd holds a NUL byte.
    #[error("{what} {value:?} contains a NUL byte")]
    Nul {
        /// Which argument.
        what: &'static str,
        /// Its value.
        value: String,
    },
}

impl Error {
    /// The errno (positive) of the failed call, if one failed; not-found
    /// errors give `ENOENT`.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Cluster { errno, .. } | Error::Pool { errno, .. } | Error::Image { errno, .. } => Some(*errno),
            Error::PoolNotFound { .. } | Error::ImageNotFound { .. } => Some(libc::ENOENT),
            Error::Nul { .. } => None,
            Error::Library(_) => Some(libc::ENOSYS),
        }
    }
}

/// `strerror` text with the negative errno librbd returned, e.g.
/// "Read-only file system (-30)".
fn errno_text(errno: i32) -> String {
    let text = std::io::Error::from_raw_os_error(errno).to_string();
    let text = match text.rfind(" (os error") {
        Some(at) => &text[..at],
        None => &text,
    };
    format!("{text} (-{errno})")
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

/// A `CString` for a librados/librbd argument, or [`Error::Nul`].
pub(crate) fn cstring(what: &'static str, value: &str) -> Result<std::ffi::CString> {
    std::ffi::CString::new(value).map_err(|_| Error::Nul {
        what,
        value: value.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_pool_and_image() {
        let e = Error::ImageNotFound {
            cluster: "c".into(),
            pool: "vms".into(),
            image: "disk1".into(),
        };
        assert_eq!(e.to_string(), "image vms/disk1 not found");
        let e = Error::Image {
            cluster: "127.0.0.1:3300".into(),
            pool: "vms/ns".into(),
            image: "disk1".into(),
            op: "resize".into(),
            errno: libc::EROFS,
        };
        assert_eq!(
            e.to_string(),
            "image vms/ns/disk1 on cluster 127.0.0.1:3300: resize: Read-only file system (-30)"
        );
        assert_eq!(e.errno(), Some(libc::EROFS));
    }
}

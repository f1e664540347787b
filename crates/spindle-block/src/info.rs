//! What `info` reports about an image.

/// What `info` reports about one image.
#[derive(Debug, Clone, Default)]
pub struct ImageInfo {
    /// Format name (`raw`, `qcow2`, `null`).
    pub format: &'static str,
    /// Guest-visible size.
    pub virtual_size: u64,
    /// Cluster size (qcow2).
    pub cluster_size: Option<u64>,
    /// Backing file name as stored.
    pub backing_file: Option<String>,
    /// Backing format as stored.
    pub backing_format: Option<String>,
    /// Whether the dirty bit is set (qcow2 v3).
    pub dirty: bool,
    /// qcow2 specifics.
    pub qcow2: Option<Qcow2Info>,
}

/// qcow2-specific facts for `info`.
#[derive(Debug, Clone)]
pub struct Qcow2Info {
    /// "0.10" (v2) or "1.1" (v3).
    pub compat: &'static str,
    /// Lazy refcounts enabled.
    pub lazy_refcounts: bool,
    /// Refcount width.
    pub refcount_bits: u32,
    /// Corrupt bit set.
    pub corrupt: bool,
    /// Extended L2 entries.
    pub extended_l2: bool,
    /// "zlib" or "zstd".
    pub compression_type: &'static str,
    /// Internal snapshots.
    pub snapshots: u32,
}

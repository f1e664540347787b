//! Size estimates for `measure`, with QEMU's arithmetic.

/// Bytes of refcount table and blocks needed to count `clusters` clusters
/// (including the refcount structures themselves): the fixed point.
pub fn refcount_metadata_size(clusters: u64, cluster_size: u64, refcount_order: u32) -> u64 {
    let per_table_cluster = cluster_size / 8;
    let per_block = (cluster_size * 8) >> refcount_order;
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters + blocks + table;
        if n == last {
            return (blocks + table) * cluster_size;
        }
    }
}

/// File size of a fully preallocated image of `size` bytes.
pub fn fully_allocated_size(size: u64, cluster_size: u64, refcount_order: u32, extended_l2: bool) -> u64 {
    let aligned = size.div_ceil(cluster_size) * cluster_size;
    let l2e = if extended_l2 { 16 } else { 8 };
    let mut meta = cluster_size; // header
    let nl2e = (aligned / cluster_size).div_ceil(cluster_size / l2e) * (cluster_size / l2e);
    meta += nl2e * l2e;
    let nl1e = (nl2e * l2e / cluster_size).div_ceil(cluster_size / 8) * (cluster_size / 8);
    meta += nl1e * 8;
    meta += refcount_metadata_size((meta + aligned) / cluster_size, cluster_size, refcount_order);
    meta + aligned
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Figures printed by `qemu-img measure --size 1G -O qcow2 [-o ...]`.
    #[test]
    fn matches_qemu_img() {
        assert_eq!(fully_allocated_size(1 << 30, 65536, 4, false), 1_074_135_040);
        assert_eq!(fully_allocated_size(1 << 30, 4096, 0, false), 1_075_888_128);
    }
}

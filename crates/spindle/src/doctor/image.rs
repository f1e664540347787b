//! Image checks: what the image is on (a file system, a whole block
//! device or LVM volume, RBD), what its format costs (qcow2 cluster size,
//! L2 cache coverage, preallocation, lazy refcounts, backing chain,
//! fragmentation, leaks), and what the I/O engine and cache mode make of
//! it.

use super::{read, Finding, Severity, Target};
use crate::img::human_size;
use spindle_block::formats::qcow2::{self, CheckMode};
use spindle_block::{open_image, Node, OpenConfig, Sharing};
use std::os::unix::fs::{FileTypeExt, MetadataExt};

/// Deeper backing chains than this cost every read of unallocated data.
const DEEP_CHAIN: usize = 4;
/// The L2 cache `spindle serve` gives a qcow2 image at most by default.
const DEFAULT_L2_CACHE: u64 = 32 << 20;

pub(super) fn check(t: &Target) -> Vec<Finding> {
    let mut out = Vec::new();
    if t.image.starts_with("null:") {
        return out;
    }
    if !(t.image.starts_with("rbd:") || t.image.starts_with("nbd")) {
        match std::fs::metadata(&t.image) {
            Err(e) => {
                out.push(Finding::new(
                    Severity::Error,
                    "image",
                    &t.image,
                    format!("cannot be read: {e}"),
                ));
                return out;
            }
            Ok(meta) if meta.file_type().is_block_device() => block_device(t, &meta, &mut out),
            Ok(_) => file_system(t, &mut out),
        }
    }
    let cfg = OpenConfig {
        format: t.format.as_deref().map(str::parse).transpose().ok().flatten(),
        read_only: true,
        sharing: Sharing::All,
        metadata_only: true,
        ..Default::default()
    };
    let rt = match spindle_io::Runtime::new(Default::default()) {
        Ok(rt) => rt,
        Err(e) => {
            out.push(Finding::new(
                Severity::Error,
                "image",
                &t.image,
                format!("no I/O runtime: {e}"),
            ));
            return out;
        }
    };
    match open_image(&t.image, &cfg) {
        Err(e) => out.push(Finding::new(
            Severity::Error,
            "image",
            &t.image,
            format!("cannot be opened: {e}"),
        )),
        Ok(node) => rt.block_on(format(t, &node, &mut out)),
    }
    out
}

fn statfs_type(path: &str) -> Option<i64> {
    let c = std::ffi::CString::new(path).ok()?;
    // SAFETY: statfs is plain old data, valid all-zero.
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a writable statfs struct.
    (unsafe { libc::statfs(c.as_ptr(), &mut s) } == 0).then_some(s.f_type as i64)
}

fn file_system(t: &Target, out: &mut Vec<Finding>) {
    const TMPFS: i64 = 0x0102_1994;
    const BTRFS: i64 = 0x9123_683e;
    const NFS: i64 = 0x6969;
    const OVERLAY: i64 = 0x794c_7630;
    const EXT4: i64 = 0xef53;
    const XFS: i64 = 0x5846_5342;
    let Some(fs) = statfs_type(&t.image) else { return };
    let evidence = format!("statfs f_type {fs:#x}");
    let direct = !matches!(t.cache.as_deref(), Some("writeback" | "writethrough" | "unsafe"));
    let f = match fs {
        TMPFS | OVERLAY => Finding::new(
            Severity::Warning,
            "filesystem",
            &t.image,
            format!(
                "on {}: O_DIRECT is refused, so cache=none falls back to writeback (guest data is cached twice, in the guest and in host RAM), and native AIO runs synchronously",
                if fs == TMPFS { "tmpfs" } else { "overlayfs" }
            ),
        )
        .fix("move the image to a disk file system (ext4, xfs), or serve it with --cache writeback --aio io_uring knowingly"),
        BTRFS => Finding::new(
            Severity::Warning,
            "filesystem",
            &t.image,
            "on btrfs: copy-on-write fragments an image under random writes, and O_DIRECT writes on CoW files are slow",
        )
        .fix(format!("chattr +C on the image's directory before creating images there (nodatacow), then copy the image anew: spindle img convert -O {} IMAGE NEW", t.format.as_deref().unwrap_or("raw"))),
        NFS => Finding::new(
            Severity::Info,
            "filesystem",
            &t.image,
            "on NFS: serve with --cache none (the default) so both hosts of a migration see the same data",
        ),
        EXT4 | XFS => Finding::new(
            Severity::Ok,
            "filesystem",
            &t.image,
            if fs == EXT4 { "on ext4" } else { "on xfs" },
        ),
        _ => Finding::new(Severity::Info, "filesystem", &t.image, "on a file system doctor has no rules for"),
    };
    out.push(f.evidence(evidence));
    if t.aio == "native" && !direct {
        out.push(
            Finding::new(
                Severity::Warning,
                "aio",
                &t.image,
                "--aio native without O_DIRECT (this cache mode) runs each request synchronously in io_submit, stalling the I/O thread",
            )
            .fix("serve it with --aio io_uring (the default), or --cache none"),
        );
    }
}

fn block_device(t: &Target, meta: &std::fs::Metadata, out: &mut Vec<Finding>) {
    let (major, minor) = (libc::major(meta.rdev()), libc::minor(meta.rdev()));
    let sys = format!("/sys/dev/block/{major}:{minor}");
    let lvm = read(format!("{sys}/dm/uuid")).is_some_and(|u| u.starts_with("LVM-"));
    let what = if lvm {
        format!("an LVM volume ({})", read(format!("{sys}/dm/name")).unwrap_or_default())
    } else if std::path::Path::new(&format!("{sys}/partition")).exists() {
        "a partition".to_owned()
    } else {
        "a whole block device".to_owned()
    };
    out.push(
        Finding::new(
            Severity::Info,
            "block-device",
            &t.image,
            format!(
                "{what}: served with no file system in between. Passthrough (virtio-scsi LUN with -device scsi-block, VFIO or NVMe assignment) would give the guest the device's own commands (SCSI UNMAP, persistent reservations, NVMe namespaces) and skip the host's block layer, but the device could not be shared, snapshotted, throttled or live-migrated without shared storage; Spindle keeps all of those"
            ),
        )
        .evidence(format!("block device {major}:{minor}{}", if lvm { ", dm uuid LVM-…" } else { "" })),
    );
}

async fn format(t: &Target, node: &Node, out: &mut Vec<Finding>) {
    if let spindle_block::Storage::Rbd(r) = node.storage() {
        rbd(t, r, out);
    }
    match node {
        Node::Raw(_) => raw(t, node, out),
        Node::Qcow2(q) => qcow2_image(t, node, q, out).await,
    }
}

fn rbd(t: &Target, r: &spindle_block::protocols::rbd::Rbd, out: &mut Vec<Finding>) {
    let Ok((stat, features)) = r.stat() else { return };
    let lock = features & spindle_rbd::features::EXCLUSIVE_LOCK != 0;
    let f = if lock {
        Finding::new(
            Severity::Ok,
            "rbd-lock",
            &t.image,
            "has the exclusive-lock feature: Spindle's writable open keeps other writers out",
        )
    } else {
        Finding::new(
            Severity::Warning,
            "rbd-lock",
            &t.image,
            "has no exclusive-lock feature: nothing keeps two hosts from writing it at once",
        )
        .fix(format!("rbd feature enable {} exclusive-lock", r.name()))
    };
    out.push(f.evidence(format!(
        "features {features:#x}, object size {}",
        human_size(stat.object_size)
    )));
}

fn raw(t: &Target, node: &Node, out: &mut Vec<Finding>) {
    let (Some(file), size) = (node.file(), node.size()) else {
        return;
    };
    if file.is_block_device() {
        return;
    }
    let Some(used) = node.storage().allocated_bytes() else {
        return;
    };
    let evidence = format!("{} of {} allocated", human_size(used), human_size(size));
    if used >= size {
        out.push(Finding::new(Severity::Ok, "raw-allocation", &t.image, "raw, preallocated").evidence(evidence));
        return;
    }
    let native = t.aio == "native";
    out.push(
        Finding::new(
            if native { Severity::Warning } else { Severity::Info },
            "raw-allocation",
            &t.image,
            if native {
                "sparse raw under --aio native: every write into a hole allocates blocks synchronously in io_submit, stalling the I/O thread"
            } else {
                "sparse raw: thin, but each first write into a hole costs the file system an allocation"
            },
        )
        .evidence(evidence)
        .fix(format!(
            "fallocate -l {size} {}  # preallocate (keeps the data){}",
            t.image,
            if native { "; or serve with --aio io_uring" } else { "" }
        )),
    );
}

async fn qcow2_image(t: &Target, node: &Node, q: &qcow2::Qcow2, out: &mut Vec<Finding>) {
    let info = node.info();
    let cs = q.cluster_size();
    let size = node.size();
    let entry = if info.qcow2.as_ref().is_some_and(|i| i.extended_l2) {
        16
    } else {
        8
    };
    let covered = DEFAULT_L2_CACHE / entry * cs;
    let evidence = format!("cluster size {}, virtual size {}", human_size(cs), human_size(size));
    if cs < 64 << 10 {
        out.push(
            Finding::new(
                Severity::Warning,
                "qcow2-cluster-size",
                &t.image,
                format!("{} clusters: more metadata per GiB and more allocations; 64 KiB is QEMU's default, larger suits large disks", human_size(cs)),
            )
            .evidence(evidence.clone())
            .fix(format!("spindle img convert -O qcow2 -o cluster_size=64k {} NEW.qcow2", t.image)),
        );
    }
    if size > covered {
        out.push(
            Finding::new(
                Severity::Warning,
                "qcow2-l2-cache",
                &t.image,
                format!(
                    "the default L2 cache ({}) maps {} of the {} disk: random I/O beyond that reads L2 tables from disk",
                    human_size(DEFAULT_L2_CACHE),
                    human_size(covered),
                    human_size(size)
                ),
            )
            .evidence(evidence.clone())
            .fix(format!(
                "spindle img convert -O qcow2 -o cluster_size={} {} NEW.qcow2  # 8 MiB of L2 cache maps 1 TiB with 1 MiB clusters",
                if size > 4 * covered { "2M" } else { "1M" },
                t.image
            )),
        );
    } else {
        out.push(
            Finding::new(
                Severity::Ok,
                "qcow2-l2-cache",
                &t.image,
                "the L2 cache maps the whole disk",
            )
            .evidence(evidence),
        );
    }
    if info.qcow2.as_ref().is_some_and(|i| i.lazy_refcounts) {
        out.push(Finding::new(
            Severity::Info,
            "qcow2-lazy-refcounts",
            &t.image,
            "lazy refcounts: allocating writes skip a refcount update; after a crash the image needs a repair, which Spindle runs when it opens it",
        ));
    }
    if info.dirty || info.qcow2.as_ref().is_some_and(|i| i.corrupt) {
        out.push(
            Finding::new(
                Severity::Error,
                "qcow2-state",
                &t.image,
                "marked dirty or corrupt: it needs a check and repair",
            )
            .fix(format!("spindle img check -r all {}", t.image)),
        );
    }
    let mut depth = 0;
    let mut b = node.backing();
    while let Some(n) = b {
        depth += 1;
        b = n.backing();
    }
    if depth > DEEP_CHAIN {
        out.push(
            Finding::new(
                Severity::Warning,
                "backing-chain",
                &t.image,
                format!("a backing chain {depth} images deep: a read of data the top image lacks goes down the chain"),
            )
            .fix(format!(
                "spindle img commit (offline), or spindle ctl stream NAME (live) to flatten {}",
                t.image
            )),
        );
    } else if depth > 0 {
        out.push(Finding::new(
            Severity::Ok,
            "backing-chain",
            &t.image,
            format!("backing chain of {depth}"),
        ));
    }
    let Ok(r) = qcow2::check(q, CheckMode::Report).await else {
        return;
    };
    let evidence = format!(
        "check: {} of {} clusters allocated, {} fragmented, {} compressed, {} leaked, {} corruptions",
        r.allocated_clusters, r.total_clusters, r.fragmented_clusters, r.compressed_clusters, r.leaks, r.corruptions
    );
    if r.corruptions > 0 {
        out.push(
            Finding::new(Severity::Error, "qcow2-check", &t.image, "metadata is inconsistent")
                .evidence(evidence.clone())
                .fix(format!("spindle img check -r all {}", t.image)),
        );
    } else if r.leaks > 0 {
        out.push(
            Finding::new(
                Severity::Info,
                "qcow2-check",
                &t.image,
                format!("{} leaked clusters (space only; a crash leaves them)", r.leaks),
            )
            .evidence(evidence.clone())
            .fix(format!("spindle img check -r leaks {}", t.image)),
        );
    }
    if r.allocated_clusters >= 64 && r.fragmented_clusters * 2 > r.allocated_clusters {
        out.push(
            Finding::new(
                Severity::Info,
                "qcow2-fragmentation",
                &t.image,
                format!(
                    "{}% of its clusters are out of order: sequential guest reads become random reads",
                    r.fragmented_clusters * 100 / r.allocated_clusters
                ),
            )
            .evidence(evidence.clone())
            .fix(format!(
                "spindle img convert -O qcow2 {} NEW.qcow2  # rewrites it in order",
                t.image
            )),
        );
    }
    if r.allocated_clusters < r.total_clusters && node.backing().is_none() {
        out.push(
            Finding::new(
                Severity::Info,
                "qcow2-preallocation",
                &t.image,
                "not preallocated: each first write to a cluster also writes L2 and refcount metadata; preallocation=metadata removes that cost (the file grows by about 1/8000 of the disk per 64 KiB cluster, data stays thin)",
            )
            .evidence(evidence)
            .fix(format!("spindle img convert -O qcow2 -o preallocation=metadata {} NEW.qcow2", t.image)),
        );
    }
}

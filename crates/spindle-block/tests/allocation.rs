//! Cluster allocation: freed clusters are reused, new ones are appended.

use spindle_block::formats::qcow2::{create, CreateOptions};
use spindle_block::{open_image, BlockStatus, Format, OpenConfig};
use spindle_io::{Runtime, RuntimeConfig};

async fn host_of(node: &spindle_block::Node, off: u64) -> u64 {
    match node.block_status(off, 65536).await.unwrap().0 {
        BlockStatus::Data { offset: Some(h), .. } => h,
        other => panic!("offset {off} is not plain data: {other:?}"),
    }
}

#[test]
fn freed_clusters_are_reused_before_the_file_grows() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = dir.path().join("a.qcow2");
    let rt = Runtime::new(RuntimeConfig::default()).unwrap();
    rt.block_on(async {
        create(
            &path,
            &CreateOptions {
                size: 64 << 20,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let cfg = OpenConfig {
            format: Some(Format::Qcow2),
            ..Default::default()
        };
        let node = open_image(path.to_str().unwrap(), &cfg).unwrap();
        let b = vec![7u8; 65536];
        for i in 0..8u64 {
            node.write_from(i * 65536, &b, false).await.unwrap();
        }
        let hosts: Vec<u64> = {
            let mut v = Vec::new();
            for i in 0..8u64 {
                v.push(host_of(&node, i * 65536).await);
            }
            v
        };
        // Free two clusters in the middle (no backing file: discard unmaps).
        node.discard(2 * 65536, 65536).await.unwrap();
        node.discard(5 * 65536, 65536).await.unwrap();
        // Freed clusters become reusable once the unmapping is durable.
        node.flush().await.unwrap();
        let end_before = std::fs::metadata(&path).unwrap().len();
        // Two new single-cluster writes take exactly the freed clusters...
        node.write_from(20 * 65536, &b, false).await.unwrap();
        node.write_from(21 * 65536, &b, false).await.unwrap();
        let mut got = vec![host_of(&node, 20 * 65536).await, host_of(&node, 21 * 65536).await];
        got.sort_unstable();
        assert_eq!(got, vec![hosts[2], hosts[5]], "freed clusters are reused");
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            end_before,
            "no growth while holes remain"
        );
        // ...and the next one is appended after everything else.
        node.write_from(22 * 65536, &b, false).await.unwrap();
        assert!(host_of(&node, 22 * 65536).await > *hosts.iter().max().unwrap());
        // A two-cluster request does not fit a one-cluster hole: it is appended.
        node.discard(3 * 65536, 65536).await.unwrap();
        node.flush().await.unwrap();
        let two = vec![9u8; 2 * 65536];
        node.write_from(30 * 65536, &two, false).await.unwrap();
        assert!(host_of(&node, 30 * 65536).await > hosts[7]);
        // The hole is still found by a later single-cluster write.
        node.write_from(40 * 65536, &b, false).await.unwrap();
        assert_eq!(host_of(&node, 40 * 65536).await, hosts[3]);
        node.close().await.unwrap();
    });
}

/// Write-zeroes without may-unmap keeps clusters allocated (zero clusters
/// with a host offset); with may-unmap it frees them. Both read as zeroes.
#[test]
fn write_zeroes_keeps_allocation_unless_unmap_is_allowed() {
    for ext in [false, true] {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("z.qcow2");
        let rt = Runtime::new(RuntimeConfig::default()).unwrap();
        rt.block_on(async {
            let opts = CreateOptions {
                size: 4 << 20,
                extended_l2: ext,
                ..Default::default()
            };
            create(&path, &opts).await.unwrap();
            let cfg = OpenConfig {
                format: Some(Format::Qcow2),
                ..Default::default()
            };
            let node = open_image(path.to_str().unwrap(), &cfg).unwrap();
            let b = vec![9u8; 4 * 65536];
            node.write_from(0, &b, false).await.unwrap();
            let kept = host_of(&node, 0).await;
            node.write_zeroes(0, 2 * 65536, false).await.unwrap();
            node.write_zeroes(2 * 65536, 2 * 65536, true).await.unwrap();
            let mut r = vec![1u8; 4 * 65536];
            node.read_into(0, &mut r).await.unwrap();
            assert!(r.iter().all(|&x| x == 0), "ext_l2={ext}: zeroes read back");
            assert_eq!(node.block_status(0, 65536).await.unwrap().0, BlockStatus::Zero);
            node.close().await.unwrap();
            drop(node);
            // Kept: still referenced (the file's cluster count shows it); a new
            // write elsewhere must not reuse it, while the unmapped ones are free.
            let node = open_image(path.to_str().unwrap(), &cfg).unwrap();
            let c = vec![5u8; 65536];
            node.write_from(40 * 65536, &c, false).await.unwrap();
            assert_ne!(
                host_of(&node, 40 * 65536).await,
                kept,
                "ext_l2={ext}: a kept cluster was reused"
            );
            node.close().await.unwrap();
        });
        let o = std::process::Command::new("qemu-img")
            .args(["check", path.to_str().unwrap()])
            .output()
            .unwrap();
        assert_eq!(
            o.status.code(),
            Some(0),
            "ext_l2={ext}: {}",
            String::from_utf8_lossy(&o.stdout)
        );
    }
}

/// A stream's copy-on-read write (`write_unallocated`) fills only clusters
/// still unallocated: it never overwrites data or a zero cluster the guest
/// wrote first, and a range it skips is left as it was.
#[test]
fn write_unallocated_leaves_written_clusters_alone() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = dir.path().join("a.qcow2");
    let rt = Runtime::new(RuntimeConfig::default()).unwrap();
    rt.block_on(async {
        let opts = CreateOptions {
            size: 4 << 20,
            ..Default::default()
        };
        create(&path, &opts).await.unwrap();
        let cfg = OpenConfig {
            format: Some(Format::Qcow2),
            ..Default::default()
        };
        let node = open_image(path.to_str().unwrap(), &cfg).unwrap();
        let spindle_block::Node::Qcow2(q) = &node else {
            unreachable!()
        };
        let cs = 65536u64;
        node.write_from(cs, &vec![1u8; cs as usize], false).await.unwrap();
        node.write_zeroes(3 * cs, cs, false).await.unwrap();
        let copy = spindle_block::SgList::copy_of(&vec![9u8; 4 * cs as usize]);
        assert!(
            !q.write_unallocated(0, &copy).await.unwrap(),
            "a range with written clusters is skipped"
        );
        assert!(q.write_unallocated(0, &copy.slice(0, cs as usize)).await.unwrap());
        assert!(q.write_unallocated(2 * cs, &copy.slice(0, cs as usize)).await.unwrap());
        assert!(!q.write_unallocated(3 * cs, &copy.slice(0, cs as usize)).await.unwrap());
        let mut got = vec![0u8; 4 * cs as usize];
        node.read_into(0, &mut got).await.unwrap();
        let want: Vec<u8> = [9u8, 1, 9, 0].iter().flat_map(|&b| vec![b; cs as usize]).collect();
        assert!(got == want, "the guest's data and zeroes stay; the holes are filled");
        node.close().await.unwrap();
    });
}

/// A raw file whose blocks cover it has no holes to look for until a
/// discard, a zeroing or a grow may make some; a sparse one may have some.
#[test]
fn a_dense_raw_file_has_no_holes_until_something_may_punch_one() {
    let dir = tempfile::tempdir().unwrap();
    let dense = dir.path().join("dense.raw");
    let sparse = dir.path().join("sparse.raw");
    std::fs::write(&dense, vec![7u8; 1 << 20]).unwrap();
    std::fs::File::create(&sparse).unwrap().set_len(1 << 20).unwrap();
    let cfg = OpenConfig {
        format: Some(Format::Raw),
        ..Default::default()
    };
    let rt = Runtime::new(RuntimeConfig::default()).unwrap();
    rt.block_on(async {
        let s = open_image(sparse.to_str().unwrap(), &cfg).unwrap();
        assert!(s.may_have_holes());
        for step in 0..3 {
            let d = open_image(dense.to_str().unwrap(), &cfg).unwrap();
            assert!(!d.may_have_holes(), "step {step}: a dense file");
            match step {
                0 => d.discard(0, 4096).await.unwrap(),
                1 => d.write_zeroes(4096, 4096, false).await.unwrap(),
                _ => d.resize(2 << 20, false).await.unwrap(),
            }
            assert!(d.may_have_holes(), "step {step}");
            d.close().await.unwrap();
            // Back to dense for the next step.
            std::fs::write(&dense, vec![7u8; 1 << 20]).unwrap();
        }
    });
}

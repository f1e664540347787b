//! Cluster allocation: freed clusters are reused, new ones are appended.

use spindle_block::formats::qcow2::{create, CreateOptions};
use spindle_block::{open_image, BlockStatus, Format, OpenConfig, SgList};
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
        let mut b = vec![7u8; 65536];
        for i in 0..8u64 {
            node.write(i * 65536, &SgList::new(&mut b), false).await.unwrap();
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
        let end_before = std::fs::metadata(&path).unwrap().len();
        // Two new single-cluster writes take exactly the freed clusters...
        node.write(20 * 65536, &SgList::new(&mut b), false).await.unwrap();
        node.write(21 * 65536, &SgList::new(&mut b), false).await.unwrap();
        let mut got = vec![host_of(&node, 20 * 65536).await, host_of(&node, 21 * 65536).await];
        got.sort_unstable();
        assert_eq!(got, vec![hosts[2], hosts[5]], "freed clusters are reused");
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            end_before,
            "no growth while holes remain"
        );
        // ...and the next one is appended after everything else.
        node.write(22 * 65536, &SgList::new(&mut b), false).await.unwrap();
        assert!(host_of(&node, 22 * 65536).await > *hosts.iter().max().unwrap());
        // A two-cluster request does not fit a one-cluster hole: it is appended.
        node.discard(3 * 65536, 65536).await.unwrap();
        let mut two = vec![9u8; 2 * 65536];
        node.write(30 * 65536, &SgList::new(&mut two), false).await.unwrap();
        assert!(host_of(&node, 30 * 65536).await > hosts[7]);
        // The hole is still found by a later single-cluster write.
        node.write(40 * 65536, &SgList::new(&mut b), false).await.unwrap();
        assert_eq!(host_of(&node, 40 * 65536).await, hosts[3]);
        node.close().await.unwrap();
    });
}

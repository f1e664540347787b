//! Resizing an open qcow2 image: a refused size changes nothing, so the
//! same open image (as a daemon holds it) resizes normally afterwards.

use spindle_block::formats::qcow2::{create, CreateOptions};
use spindle_block::{open_image, Format, OpenConfig};
use spindle_io::{Runtime, RuntimeConfig};
use std::sync::mpsc;
use std::time::Duration;

#[test]
fn a_refused_resize_leaves_the_open_image_usable() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = dir.path().join("r.qcow2");
    let (tx, rx) = mpsc::channel();
    let p = path.clone();
    // A wedge would hang, not fail: run under a watchdog.
    std::thread::spawn(move || {
        let rt = Runtime::new(RuntimeConfig::default()).unwrap();
        rt.block_on(async {
            let opts = CreateOptions {
                size: 64 << 20,
                ..Default::default()
            };
            create(&p, &opts).await.unwrap();
            let cfg = OpenConfig {
                format: Some(Format::Qcow2),
                ..Default::default()
            };
            let node = open_image(p.to_str().unwrap(), &cfg).unwrap();
            let data = vec![0x5au8; 65536];
            node.write_from(32 << 20, &data, false).await.unwrap();
            let err = node.resize(1 << 60, false).await.unwrap_err().to_string();
            assert!(err.contains("32 MiB"), "{err}");
            assert_eq!(node.size(), 64 << 20, "a refused resize must not change the size");
            let err = node.resize((64 << 20) + 100, false).await.unwrap_err().to_string();
            assert!(err.contains("multiple of 512"), "{err}");
            node.resize(128 << 20, false).await.unwrap();
            assert_eq!(node.size(), 128 << 20);
            node.resize(48 << 20, true).await.unwrap();
            let mut back = vec![0u8; 65536];
            node.read_into(32 << 20, &mut back).await.unwrap();
            assert_eq!(back, data, "data below the new end survives");
            node.close().await.unwrap();
        });
        tx.send(()).unwrap();
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("resizing after a refused resize did not finish within 60 s");
    let out = std::process::Command::new("qemu-img")
        .args(["check", path.to_str().unwrap()])
        .output()
        .expect("qemu-img is required for this test: install it with `apt-get install -y qemu-utils`");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
    let out = std::process::Command::new("qemu-img")
        .args(["info", "--output", "json", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"virtual-size\": 50331648"));
}

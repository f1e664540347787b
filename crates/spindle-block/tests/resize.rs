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
            let node = created(
                &p,
                CreateOptions {
                    size: 64 << 20,
                    ..Default::default()
                },
            )
            .await;
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

/// A qcow2 image created with `opts` at `path`, opened.
async fn created(path: &std::path::Path, opts: CreateOptions) -> spindle_block::Node {
    create(path, &opts).await.unwrap();
    let cfg = OpenConfig {
        format: Some(Format::Qcow2),
        ..Default::default()
    };
    open_image(path.to_str().unwrap(), &cfg).unwrap()
}

/// Runs `f` on a fresh runtime under a watchdog.
fn run<F: std::future::Future<Output = ()>>(f: impl FnOnce() -> F + Send + 'static) {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let rt = Runtime::new(RuntimeConfig::default()).unwrap();
        rt.block_on(f());
        tx.send(()).unwrap();
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("did not finish within 60 s");
}

fn qemu_img(args: &[&str]) {
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is required for this test: install it with `apt-get install -y qemu-utils`");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Found by the qcow2_ops fuzz target: a shrink to inside a cluster and a
/// grow showed the old data of the rest of that cluster again.
#[test]
fn space_a_grow_adds_reads_as_zeroes_after_a_shrink_into_a_cluster() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = dir.path().join("g.qcow2");
    run(move || async move {
        let node = created(
            &path,
            CreateOptions {
                size: 1 << 20,
                cluster_size: 4096,
                ..Default::default()
            },
        )
        .await;
        node.write_from(0, &[0x41u8; 32768], false).await.unwrap();
        node.resize(512, true).await.unwrap();
        node.resize(8 << 20, false).await.unwrap();
        let mut back = vec![0xffu8; 32768];
        node.read_into(0, &mut back).await.unwrap();
        assert_eq!(&back[..512], &[0x41u8; 512][..], "data below the shrunk end survives");
        assert!(
            back[512..].iter().all(|&b| b == 0),
            "the grown space must read as zeroes"
        );
        node.close().await.unwrap();
    });
}

/// QEMU zeroes what a longer backing file would show in the grown space.
#[test]
fn a_longer_backing_file_does_not_show_through_the_space_a_grow_adds() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let (base, top) = (dir.path().join("base.raw"), dir.path().join("top.qcow2"));
    std::fs::write(&base, vec![0x55u8; 1 << 20]).unwrap();
    let (b, t) = (base.to_str().unwrap().to_owned(), top.to_str().unwrap().to_owned());
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", &b, "-F", "raw", &t, "512K"]);
    let t2 = t.clone();
    run(move || async move {
        let node = open_image(&t2, &OpenConfig::default()).unwrap();
        node.resize(2 << 20, false).await.unwrap();
        let mut back = vec![0xffu8; 2 << 20];
        node.read_into(0, &mut back).await.unwrap();
        assert!(
            back[..512 << 10].iter().all(|&b| b == 0x55),
            "the backing file still shows below the old end"
        );
        assert!(
            back[512 << 10..].iter().all(|&b| b == 0),
            "the grown space must read as zeroes"
        );
        node.close().await.unwrap();
    });
    qemu_img(&["check", &t]);
}

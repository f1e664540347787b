//! Malformed and hostile qcow2 images never crash Spindle: each run of the
//! fuzz harness over a mutated image must return (errors are fine).

mod common;
use common::*;
use rand::{Rng, SeedableRng};

fn seed_images(d: &tempfile::TempDir) -> Vec<Vec<u8>> {
    need("qemu-img");
    need("qemu-io");
    let mut out = Vec::new();
    for (i, o) in [
        "cluster_size=512",
        "cluster_size=4k,refcount_bits=8",
        "extended_l2=on,cluster_size=16k",
        "compat=0.10,cluster_size=1k",
    ]
    .iter()
    .enumerate()
    {
        let img = at(d, &format!("seed{i}.qcow2"));
        ok("qemu-img", &["create", "-q", "-f", "qcow2", "-o", o, p(&img), "4M"]);
        qemu_io(&img, &["write -P 1 0 100k", "write -c -P 2 1M 64k", "write -z 2M 64k"]);
        ok("qemu-img", &["snapshot", "-c", "s1", p(&img)]);
        qemu_io(&img, &["write -P 3 50k 10k"]);
        out.push(std::fs::read(&img).unwrap());
    }
    out
}

#[test]
fn mutated_images_never_crash() {
    let d = scratch();
    let seeds = seed_images(&d);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let work = scratch();
    let mut runs = 0;
    for seed in &seeds {
        for _ in 0..150 {
            let mut img = seed.clone();
            let limit = img.len().min(24 << 10); // header and tables live at the start
            for _ in 0..rng.gen_range(1..8) {
                let i = rng.gen_range(0..limit);
                match rng.gen_range(0..3) {
                    0 => img[i] ^= 1 << rng.gen_range(0..8),
                    1 => img[i] = rng.gen(),
                    _ => img[i] = 0xff,
                }
            }
            spindle_block::fuzzing::qcow2_bytes(&img, work.path());
            runs += 1;
        }
        // Truncations.
        for cut in [0, 1, 71, 104, 512, 4096, seed.len() / 2] {
            spindle_block::fuzzing::qcow2_bytes(&seed[..cut.min(seed.len())], work.path());
            runs += 1;
        }
    }
    eprintln!("hostile: {runs} mutated images handled without a crash");
}

/// One clear line, a non-zero exit, never a panic, for bad images and bad arguments.
#[test]
fn bad_input_gets_one_clear_line() {
    let d = scratch();
    let bad_header = at(&d, "bad.qcow2");
    let mut h = vec![0u8; 4096];
    h[..4].copy_from_slice(b"QFI\xfb");
    h[4..8].copy_from_slice(&3u32.to_be_bytes());
    h[20..24].copy_from_slice(&40u32.to_be_bytes());
    std::fs::write(&bad_header, &h).unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["img", "info", "/nonexistent/x.qcow2"], "/nonexistent/x.qcow2"),
        (vec!["img", "info", p(&bad_header)], "cluster_bits 40"),
        (
            vec![
                "img",
                "create",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=3000",
                "/tmp/never.qcow2",
                "1G",
            ],
            "cluster size 3000",
        ),
        (
            vec![
                "img",
                "create",
                "-f",
                "qcow2",
                "-o",
                "refcount_bits=3",
                "/tmp/never.qcow2",
                "1G",
            ],
            "refcount_bits 3",
        ),
        (
            vec!["img", "create", "-f", "vmdk", "/tmp/never.img", "1G"],
            "unknown format 'vmdk'",
        ),
        (
            vec!["img", "create", "-f", "raw", "/tmp/never.img", "12Q"],
            "invalid size '12Q'",
        ),
        (
            vec!["img", "convert", "-t", "fast", "/dev/null", "/tmp/never.img"],
            "unknown cache mode 'fast'",
        ),
        (
            vec!["img", "--aio", "magic", "info", "/dev/null"],
            "unknown aio engine 'magic'",
        ),
        (vec!["img", "bench", "-s", "1G", "null:1M"], "does not fit"),
        (vec!["img", "check", "-r", "some", p(&bad_header)], "-r takes"),
    ];
    for (args, want) in cases {
        let o = run("spindle", &args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} should fail");
        assert_ne!(o.status.code(), Some(101), "{args:?} panicked: {err}");
        assert!(err.contains(want), "{args:?}: expected '{want}' in: {err}");
        assert!(
            !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
            "{args:?}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: one line expected, got: {err}");
    }
}

/// A probed raw image refuses a write that would forge a qcow2 header.
#[test]
fn probed_raw_refuses_a_forged_header() {
    let d = scratch();
    let raw = at(&d, "disk.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let node = spindle_block::open_image(p(&raw), &Default::default()).unwrap();
    let rt = spindle_io::Runtime::new(Default::default()).unwrap();
    rt.block_on(async move {
        let mut forged = vec![0u8; 512];
        forged[..4].copy_from_slice(b"QFI\xfb");
        let e = node
            .write(0, &spindle_block::SgList::copy_of(&forged), false)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("sector 0"), "{e}");
        // Elsewhere, or with the format stated, it is allowed.
        node.write(4096, &spindle_block::SgList::copy_of(&forged), false)
            .await
            .unwrap();
        // Closed first: a second writable open would be refused (image locks).
        node.close().await.unwrap();
        drop(node);
        let cfg = spindle_block::OpenConfig {
            format: Some(spindle_block::Format::Raw),
            ..Default::default()
        };
        let stated = spindle_block::open_image(p(&raw), &cfg).unwrap();
        stated
            .write(0, &spindle_block::SgList::copy_of(&forged), false)
            .await
            .unwrap();
    });
}

/// An image marked corrupt opens read-only with a message saying why and how
/// to repair; `check -r all` clears the bit once the image is consistent.
#[test]
fn corrupt_bit_opens_read_only_until_repaired() {
    need("qemu-img");
    let d = scratch();
    let img = at(&d, "c.qcow2");
    qcow2_create(&img, &[], Some("8M"));
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(&2u64.to_be_bytes(), 72).unwrap(); // incompatible: corrupt
    }
    ok("spindle", &["img", "info", p(&img)]);
    let o = run("spindle", &["img", "bench", "-w", "-c", "1", p(&img)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "writing a corrupt image must fail");
    assert!(err.contains("marked corrupt") && err.contains("check -r all"), "{err}");
    ok("spindle", &["img", "check", "-r", "all", p(&img)]);
    let info = ok("qemu-img", &["info", "--output", "json", p(&img)]);
    assert!(info.contains("\"corrupt\": false"), "{info}");
    assert_clean(&img);
    ok("spindle", &["img", "bench", "-w", "-c", "1", p(&img)]);
}

/// Inputs the fuzzer found that once hung or crashed Spindle; each must now
/// finish quickly.
#[test]
fn fuzzer_regressions_finish_quickly() {
    let work = scratch();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fuzz");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).expect("tests/data/fuzz") {
        let path = e.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let t = std::time::Instant::now();
        spindle_block::fuzzing::qcow2_bytes(&data, work.path());
        assert!(t.elapsed().as_secs() < 5, "{} took {:?}", path.display(), t.elapsed());
        n += 1;
    }
    assert!(n > 0, "no regression inputs found in {}", dir.display());
}

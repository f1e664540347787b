//! qcow2 compatibility with QEMU's own tools, both ways.

mod common;
use common::*;

/// Every image Spindle writes is clean for `qemu-img check` and identical to
/// the data written, for each creation option qemu-img has.
#[test]
fn spindle_written_images_are_clean_and_identical() {
    need("qemu-img");
    let d = scratch();
    let src = at(&d, "src.raw");
    mixed_data(&src, 24 << 20, 1);
    let cases: &[&[&str]] = &[
        &[],
        &["-o", "cluster_size=512"],
        &["-o", "cluster_size=4k"],
        &["-o", "cluster_size=2M"],
        &["-o", "compat=0.10"],
        &["-o", "refcount_bits=1"],
        &["-o", "refcount_bits=2"],
        &["-o", "refcount_bits=8"],
        &["-o", "refcount_bits=32"],
        &["-o", "refcount_bits=64"],
        &["-o", "lazy_refcounts=on"],
        &["-o", "extended_l2=on,cluster_size=64k"],
        &["-o", "compression_type=zstd"],
        &["-o", "preallocation=metadata"],
        &["-o", "preallocation=falloc"],
        &["-o", "preallocation=full"],
        &["-c"],
        &["-c", "-o", "compression_type=zstd"],
        &["-c", "-o", "cluster_size=4k"],
        &["-W", "-m", "16"],
        &["-t", "none", "-T", "none", "-W", "-m", "8"],
        &["-S", "0"],
    ];
    let mut judged = 0;
    for (i, extra) in cases.iter().enumerate() {
        let out = at(&d, &format!("out{i}.qcow2"));
        let mut args = vec!["img", "convert", "-q", "-f", "raw", "-O", "qcow2"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[p(&src), p(&out)]);
        ok("spindle", &args);
        assert_clean(&out);
        assert_same(&src, &out);
        // Spindle reads back its own image too.
        let back = at(&d, &format!("back{i}.raw"));
        ok(
            "spindle",
            &["img", "convert", "-f", "qcow2", "-O", "raw", p(&out), p(&back)],
        );
        assert_eq!(
            std::fs::read(&back).unwrap(),
            std::fs::read(&src).unwrap(),
            "case {extra:?}"
        );
        judged += 1;
    }
    // raw output too
    let raw = at(&d, "out.raw");
    ok("spindle", &["img", "convert", "-O", "raw", p(&src), p(&raw)]);
    assert_same(&src, &raw);
    eprintln!("interop: {judged} Spindle-written qcow2 images judged clean and identical by qemu-img");
}

/// Every image that qemu-img and qemu-io write, with each option, reads back
/// identically in Spindle.
#[test]
fn qemu_written_images_read_identically() {
    need("qemu-img");
    need("qemu-io");
    let d = scratch();
    let opts = [
        "cluster_size=512",
        "cluster_size=4k",
        "cluster_size=64k",
        "cluster_size=2M",
        "compat=0.10",
        "compat=0.10,cluster_size=4k",
        "refcount_bits=1",
        "refcount_bits=4",
        "refcount_bits=64",
        "lazy_refcounts=on",
        "extended_l2=on,cluster_size=128k",
        "extended_l2=on,cluster_size=16k",
        "compression_type=zstd",
        "preallocation=metadata",
    ];
    let mut count = 0;
    for (i, o) in opts.iter().enumerate() {
        let img = at(&d, &format!("q{i}.qcow2"));
        ok("qemu-img", &["create", "-q", "-f", "qcow2", "-o", o, p(&img), "40M"]);
        let ops = [
            "write -P 0x11 0 3M",
            "write -z 1M 192k",
            "write -P 0x22 5000 7000",
            "discard 2M 512k",
            "write -c -P 0x33 8M 2M",
            "write -P 0x44 39M 1M",
            "write -z -u 20M 1M",
        ];
        let mut args = vec![];
        // QEMU writes compressed clusters only where nothing is allocated.
        for op in ops
            .iter()
            .filter(|op| !(op.contains("-c") && o.contains("preallocation")))
        {
            args.push("-c");
            args.push(op);
        }
        args.extend_from_slice(&["-f", "qcow2", p(&img)]);
        ok("qemu-io", &args);
        let theirs = at(&d, &format!("q{i}.ref"));
        let ours = at(&d, &format!("q{i}.ours"));
        ok("qemu-img", &["convert", "-O", "raw", p(&img), p(&theirs)]);
        ok(
            "spindle",
            &["img", "convert", "-f", "qcow2", "-O", "raw", p(&img), p(&ours)],
        );
        assert_eq!(
            std::fs::read(&theirs).unwrap(),
            std::fs::read(&ours).unwrap(),
            "options {o}"
        );
        // Spindle's compare agrees, and qemu-img's info fields match ours.
        ok("spindle", &["img", "compare", "-q", p(&img), p(&theirs)]);
        count += 1;
    }
    // Compressed images made by qemu-img convert -c.
    let src = at(&d, "mixed.raw");
    mixed_data(&src, 8 << 20, 2);
    for ct in ["zlib", "zstd"] {
        let img = at(&d, &format!("c-{ct}.qcow2"));
        ok(
            "qemu-img",
            &[
                "convert",
                "-c",
                "-O",
                "qcow2",
                "-o",
                &format!("compression_type={ct}"),
                p(&src),
                p(&img),
            ],
        );
        ok("spindle", &["img", "compare", "-q", p(&src), p(&img)]);
        count += 1;
    }
    eprintln!("interop: {count} QEMU-written images read identically by Spindle");
}

/// Backing chains of any mix read like QEMU reads them; writes copy-on-write
/// from the backing file and leave a clean image.
#[test]
fn backing_chains_read_and_copy_on_write() {
    need("qemu-img");
    need("qemu-io");
    let d = scratch();
    let base = at(&d, "base.raw");
    mixed_data(&base, 16 << 20, 3);
    let mid = at(&d, "mid.qcow2");
    let top = at(&d, "top.qcow2");
    qcow2_create(&mid, &["-b", "base.raw", "-F", "raw"], None);
    qemu_io(&mid, &["write -P 0x33 100k 300k", "write -z 4M 1M"]);
    qcow2_create(&top, &["-o", "cluster_size=4k", "-b", "mid.qcow2", "-F", "qcow2"], None);
    qemu_io(&top, &["write -P 0x44 200k 64k", "discard 1M 64k"]);
    let theirs = at(&d, "ref.raw");
    ok("qemu-img", &["convert", "-O", "raw", p(&top), p(&theirs)]);
    ok("spindle", &["img", "compare", "-q", p(&theirs), p(&top)]);
    // Unaligned writes through Spindle: COW from two levels down.
    ok(
        "spindle",
        &[
            "img",
            "bench",
            "-w",
            "-c",
            "200",
            "-d",
            "8",
            "-s",
            "5000",
            "-S",
            "77777",
            "--pattern",
            "90",
            p(&top),
        ],
    );
    assert_clean(&top);
    let mut model = std::fs::read(&theirs).unwrap();
    let span = model.len() as u64 - 5000 + 1;
    for i in 0..200u64 {
        let o = ((i * 77777) % span) as usize;
        model[o..o + 5000].fill(90);
    }
    let after = at(&d, "after.raw");
    ok("qemu-img", &["convert", "-O", "raw", p(&top), p(&after)]);
    assert!(
        std::fs::read(&after).unwrap() == model,
        "top image content differs from the model after COW writes"
    );
    // Spindle creates overlays too, with the size and format taken from the backing file.
    let ov = at(&d, "ov.qcow2");
    ok(
        "spindle",
        &["img", "create", "-q", "-f", "qcow2", "-b", "top.qcow2", p(&ov)],
    );
    let info = ok("qemu-img", &["info", "--output", "json", p(&ov)]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["backing-filename-format"], "qcow2");
    assert_eq!(v["virtual-size"], 16 << 20);
    assert_same(&after, &ov);
}

/// `map` reports the same ranges as qemu-img map.
#[test]
fn map_matches_qemu_img() {
    need("qemu-img");
    need("qemu-io");
    let d = scratch();
    let base = at(&d, "base.raw");
    mixed_data(&base, 8 << 20, 4);
    let img = at(&d, "m.qcow2");
    qcow2_create(&img, &["-b", "base.raw", "-F", "raw"], None);
    qemu_io(
        &img,
        &["write 0 192k", "write -z 1M 128k", "write 3M 64k", "write -c 5M 64k"],
    );
    for target in [&img, &base] {
        let q: serde_json::Value =
            serde_json::from_str(&ok("qemu-img", &["map", "--output", "json", p(target)])).unwrap();
        let s: serde_json::Value =
            serde_json::from_str(&ok("spindle", &["img", "map", "--output", "json", p(target)])).unwrap();
        let pick = |v: &serde_json::Value| -> Vec<Vec<serde_json::Value>> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|e| {
                    ["start", "length", "depth", "present", "zero", "data", "offset"]
                        .iter()
                        .map(|k| e[*k].clone())
                        .collect()
                })
                .collect()
        };
        assert_eq!(pick(&q), pick(&s), "map of {}", target.display());
    }
}

/// A lazy-refcount image left dirty by a crash is repaired; leaks are repaired.
#[test]
fn dirty_and_leaky_images_are_repaired() {
    need("qemu-img");
    need("qemu-io");
    let d = scratch();
    let img = at(&d, "lazy.qcow2");
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", p(&img), "64M"],
    );
    let o = run(
        "qemu-io",
        &["-c", "write -P 0x55 0 4M", "-c", "abort", "-f", "qcow2", p(&img)],
    );
    assert!(!o.status.success(), "qemu-io abort should kill it");
    assert_eq!(
        run("spindle", &["img", "check", p(&img)]).status.code(),
        Some(2),
        "stale refcounts are errors"
    );
    ok("spindle", &["img", "check", "-r", "all", p(&img)]);
    assert_clean(&img);
    qemu_io(&img, &["read -P 0x55 0 4M"]);
    // A writable open of a dirty image repairs before allocating.
    let img2 = at(&d, "lazy2.qcow2");
    qcow2_create(&img2, &["-o", "lazy_refcounts=on"], Some("64M"));
    let _ = run(
        "qemu-io",
        &["-c", "write -P 0x66 0 4M", "-c", "abort", "-f", "qcow2", p(&img2)],
    );
    ok(
        "spindle",
        &["img", "bench", "-w", "-c", "64", "-s", "64k", "-o", "8M", p(&img2)],
    );
    assert_clean(&img2);
    qemu_io(&img2, &["read -P 0x66 0 4M", "read -P 0xa5 8M 4M"]);

    // Leaks: two clusters past the end with refcount 1, referenced by nothing.
    let leaky = at(&d, "leak.qcow2");
    qcow2_create(&leaky, &[], Some("64M"));
    qemu_io(&leaky, &["write 0 64k"]);
    add_leaks(&leaky, 2);
    assert_eq!(run("qemu-img", &["check", p(&leaky)]).status.code(), Some(3));
    assert_eq!(run("spindle", &["img", "check", p(&leaky)]).status.code(), Some(3));
    ok("spindle", &["img", "check", "-r", "leaks", p(&leaky)]);
    assert_clean(&leaky);
}

/// Appends `n` clusters whose refcount is 1 but that nothing references.
fn add_leaks(img: &std::path::Path, n: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(img).unwrap();
    let mut h = [0u8; 72];
    f.read_exact_at(&mut h, 0).unwrap();
    let rt = u64::from_be_bytes(h[48..56].try_into().unwrap());
    let mut e = [0u8; 8];
    f.read_exact_at(&mut e, rt).unwrap();
    let rb = u64::from_be_bytes(e);
    let end = f.metadata().unwrap().len();
    let c0 = end / 65536;
    f.set_len(end + n * 65536).unwrap();
    for c in c0..c0 + n {
        f.write_all_at(&1u16.to_be_bytes(), rb + 2 * c).unwrap();
    }
}

/// A sparse source whose holes sit at different offsets in each 2 MiB chunk:
/// a chunk buffer reused by a worker must not leak old bytes into holes.
#[test]
fn convert_of_sparse_sources_keeps_holes_zero() {
    need("qemu-img");
    let d = scratch();
    let src = at(&d, "holes.raw");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(40 << 20).unwrap();
        for k in 0..20u64 {
            let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8 + 1).collect();
            f.write_all_at(&data, k * (2 << 20) + (k * 97_000) % (1 << 20)).unwrap();
        }
    }
    for extra in [&["-c"][..], &[][..], &["-m", "1"][..]] {
        let out = at(&d, "out.qcow2");
        let _ = std::fs::remove_file(&out);
        let mut args = vec!["img", "convert", "-O", "qcow2"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[p(&src), p(&out)]);
        ok("spindle", &args);
        assert_clean(&out);
        assert_same(&src, &out);
    }
}

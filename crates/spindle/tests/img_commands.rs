//! measure, amend, rebase, commit, dd, resize, info: judged against qemu-img.

mod common;
use common::*;
use serde_json::Value;

fn json(cmd: &str, args: &[&str]) -> Value {
    serde_json::from_str(&ok(cmd, args)).unwrap_or_else(|e| panic!("{cmd} {args:?}: bad json: {e}"))
}

#[test]
fn measure_matches_qemu_img() {
    need("qemu-img");
    let d = scratch();
    let src = at(&d, "src.raw");
    mixed_data(&src, 9 << 20, 5);
    let q = at(&d, "src.qcow2");
    ok(
        "qemu-img",
        &["convert", "-O", "qcow2", "-o", "cluster_size=4k", p(&src), p(&q)],
    );
    let cases: Vec<Vec<&str>> = vec![
        vec!["--size", "1G", "-O", "qcow2"],
        vec!["--size", "100G", "-O", "qcow2", "-o", "cluster_size=4k,refcount_bits=1"],
        vec!["--size", "7T", "-O", "qcow2", "-o", "extended_l2=on,cluster_size=2M"],
        vec!["--size", "1G", "-O", "raw"],
        vec!["-O", "qcow2", p(&src)],
        vec!["-O", "raw", p(&src)],
        vec!["-O", "qcow2", "-o", "cluster_size=512", p(&q)],
        vec!["-O", "qcow2", "-o", "preallocation=full", p(&q)],
    ];
    for c in cases {
        let mut a = vec!["measure", "--output", "json"];
        a.extend_from_slice(&c);
        let mut s = vec!["img"];
        s.extend_from_slice(&a);
        assert_eq!(json("qemu-img", &a), json("spindle", &s), "measure {c:?}");
    }
}

#[test]
fn amend_changes_compat_and_lazy_refcounts() {
    need("qemu-img");
    need("qemu-io");
    let d = scratch();
    let img = at(&d, "a.qcow2");
    let base = at(&d, "base.raw");
    mixed_data(&base, 4 << 20, 6);
    qcow2_create(&img, &["-b", "base.raw", "-F", "raw"], None);
    // Zero clusters over a backing file, with and without a host cluster.
    qemu_io(&img, &["write -P 7 0 1M", "write -z 0 128k", "write -z 2M 128k"]);
    let before = at(&d, "before.raw");
    ok("qemu-img", &["convert", "-O", "raw", p(&img), p(&before)]);
    ok("spindle", &["img", "amend", "-o", "lazy_refcounts=on", p(&img)]);
    assert_eq!(
        json("qemu-img", &["info", "--output", "json", p(&img)])["format-specific"]["data"]["lazy-refcounts"],
        true
    );
    ok("spindle", &["img", "amend", "-o", "compat=0.10", p(&img)]);
    let info = json("qemu-img", &["info", "--output", "json", p(&img)]);
    assert_eq!(info["format-specific"]["data"]["compat"], "0.10");
    assert_clean(&img);
    assert_same(&before, &img);
    ok("spindle", &["img", "amend", "-o", "compat=1.1", p(&img)]);
    assert_eq!(
        json("qemu-img", &["info", "--output", "json", p(&img)])["format-specific"]["data"]["compat"],
        "1.1"
    );
    assert_clean(&img);
    assert_same(&before, &img);
    let o = run("spindle", &["img", "amend", "-o", "cluster_size=4k", p(&img)]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("cannot change"));
}

#[test]
fn rebase_safe_and_unsafe() {
    need("qemu-img");
    need("qemu-io");
    let d = scratch();
    let (a, b) = (at(&d, "a.raw"), at(&d, "b.raw"));
    mixed_data(&a, 4 << 20, 7);
    mixed_data(&b, 4 << 20, 8);
    let top = at(&d, "top.qcow2");
    qcow2_create(&top, &["-b", "a.raw", "-F", "raw"], None);
    qemu_io(&top, &["write -P 9 1M 100k"]);
    let view = at(&d, "view.raw");
    ok("qemu-img", &["convert", "-O", "raw", p(&top), p(&view)]);
    // Safe: the guest's view is unchanged on the new backing file.
    ok("spindle", &["img", "rebase", "-b", "b.raw", "-F", "raw", p(&top)]);
    let info = json("qemu-img", &["info", "--output", "json", p(&top)]);
    assert_eq!(info["backing-filename"], "b.raw");
    assert_clean(&top);
    assert_same(&view, &top);
    // Safe rebase onto nothing keeps the view too.
    ok("spindle", &["img", "rebase", "-b", "", p(&top)]);
    assert!(json("qemu-img", &["info", "--output", "json", p(&top)])
        .get("backing-filename")
        .is_none());
    assert_same(&view, &top);
    // Unsafe: header only.
    ok("spindle", &["img", "rebase", "-u", "-b", "a.raw", "-F", "raw", p(&top)]);
    assert_eq!(
        json("qemu-img", &["info", "--output", "json", p(&top)])["backing-filename"],
        "a.raw"
    );
    assert_clean(&top);
}

#[test]
fn commit_writes_into_the_backing_file() {
    need("qemu-img");
    need("qemu-io");
    let d = scratch();
    let base = at(&d, "base.qcow2");
    let src = at(&d, "src.raw");
    mixed_data(&src, 6 << 20, 9);
    ok("qemu-img", &["convert", "-O", "qcow2", p(&src), p(&base)]);
    let top = at(&d, "top.qcow2");
    qcow2_create(&top, &["-b", "base.qcow2", "-F", "qcow2"], None);
    qemu_io(&top, &["write -P 3 100k 1M", "write -z 4M 64k"]);
    let view = at(&d, "view.raw");
    ok("qemu-img", &["convert", "-O", "raw", p(&top), p(&view)]);
    ok("spindle", &["img", "commit", p(&top)]);
    assert_clean(&base);
    assert_clean(&top);
    assert_same(&view, &base);
    assert_same(&view, &top);
    let m = json("qemu-img", &["map", "--output", "json", p(&top)]);
    assert!(
        m.as_array().unwrap().iter().all(|e| e["depth"] != 0),
        "top is empty after commit: {m}"
    );
}

#[test]
fn dd_resize_info() {
    need("qemu-img");
    let d = scratch();
    let src = at(&d, "src.raw");
    mixed_data(&src, 3 << 20, 10);
    let out = at(&d, "out.qcow2");
    ok(
        "spindle",
        &[
            "img",
            "dd",
            "-O",
            "qcow2",
            "bs=64k",
            "skip=2",
            "count=20",
            &format!("if={}", p(&src)),
            &format!("of={}", p(&out)),
        ],
    );
    let want = &std::fs::read(&src).unwrap()[128 << 10..(128 + 20 * 64) << 10];
    let got = at(&d, "got.raw");
    ok("qemu-img", &["convert", "-O", "raw", p(&out), p(&got)]);
    assert_eq!(&std::fs::read(&got).unwrap()[..], want);
    assert_clean(&out);

    ok("spindle", &["img", "resize", p(&out), "+1G"]);
    assert_eq!(
        json("qemu-img", &["info", "--output", "json", p(&out)])["virtual-size"],
        (1u64 << 30) + 20 * 65536
    );
    assert_clean(&out);
    let o = run("spindle", &["img", "resize", p(&out), "64k"]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--shrink"),
        "shrinking needs --shrink"
    );
    ok("spindle", &["img", "resize", "--shrink", p(&out), "640k"]);
    assert_clean(&out);
    ok("qemu-img", &["convert", "-O", "raw", p(&out), p(&got)]);
    assert_eq!(&std::fs::read(&got).unwrap()[..], &want[..640 << 10]);

    // info agrees with qemu-img on the fields both report.
    let q = json("qemu-img", &["info", "--output", "json", p(&out)]);
    let s = json("spindle", &["img", "info", "--output", "json", p(&out)]);
    for k in [
        "virtual-size",
        "cluster-size",
        "format",
        "dirty-flag",
        "format-specific",
    ] {
        assert_eq!(q[k], s[k], "info field {k}");
    }
}

/// check --output json reports the same figures as qemu-img for clean,
/// compressed, fragmented and leaky images.
#[test]
fn check_json_matches_qemu_img() {
    need("qemu-img");
    need("qemu-io");
    let d = scratch();
    let src = at(&d, "src.raw");
    mixed_data(&src, 6 << 20, 11);
    let plain = at(&d, "plain.qcow2");
    ok("qemu-img", &["convert", "-O", "qcow2", p(&src), p(&plain)]);
    let comp = at(&d, "comp.qcow2");
    ok("qemu-img", &["convert", "-c", "-O", "qcow2", p(&src), p(&comp)]);
    let frag = at(&d, "frag.qcow2");
    qcow2_create(&frag, &["-o", "cluster_size=4k"], Some("8M"));
    qemu_io(
        &frag,
        &["write 4M 64k", "write 0 64k", "write -z 1M 8k", "write 2M 12k"],
    );
    let empty = at(&d, "empty.qcow2");
    qcow2_create(&empty, &[], Some("1M"));
    let leaky = at(&d, "leaky.qcow2");
    qcow2_create(&leaky, &[], Some("64M"));
    qemu_io(&leaky, &["write 0 64k"]);
    add_leak(&leaky);
    for img in [&plain, &comp, &frag, &empty, &leaky] {
        let q = json_allow_fail("qemu-img", &["check", "--output", "json", p(img)]);
        let s = json_allow_fail("spindle", &["img", "check", "--output", "json", p(img)]);
        for k in [
            "image-end-offset",
            "total-clusters",
            "allocated-clusters",
            "fragmented-clusters",
            "compressed-clusters",
            "leaks",
            "corruptions",
            "check-errors",
        ] {
            assert_eq!(q[k], s[k], "{}: check field {k}", img.display());
        }
    }
}

fn json_allow_fail(cmd: &str, args: &[&str]) -> Value {
    let o = run(cmd, args);
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{cmd} {args:?}: bad json: {e}"))
}

/// Appends one cluster whose refcount is 1 but that nothing references.
fn add_leak(img: &std::path::Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(img).unwrap();
    let mut h = [0u8; 72];
    f.read_exact_at(&mut h, 0).unwrap();
    let mut e = [0u8; 8];
    f.read_exact_at(&mut e, u64::from_be_bytes(h[48..56].try_into().unwrap()))
        .unwrap();
    let end = f.metadata().unwrap().len();
    f.set_len(end + 65536).unwrap();
    f.write_all_at(&1u16.to_be_bytes(), u64::from_be_bytes(e) + 2 * (end / 65536))
        .unwrap();
}

/// convert -p prints qemu-img's progress lines when not on a terminal.
#[test]
fn convert_progress_off_a_terminal() {
    let d = scratch();
    let src = at(&d, "src.raw");
    mixed_data(&src, 6 << 20, 12);
    let out = at(&d, "out.qcow2");
    let o = ok("spindle", &["img", "convert", "-p", "-O", "qcow2", p(&src), p(&out)]);
    let steps: Vec<&str> = o.split(['\r', '\n']).filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(steps.first().map(|s| s.trim()), Some("(0.00/100%)"), "{o:?}");
    assert_eq!(steps.last().map(|s| s.trim()), Some("(100.00/100%)"), "{o:?}");
    assert!(steps.len() >= 3, "{o:?}");
}

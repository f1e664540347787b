//! Error injection at every metadata write point (QEMU's iotest 026, with
//! Spindle's `--x-inject-error`, the analogue of blkdebug): for each
//! mutating operation and each kind of write (data, L2, refcount block,
//! refcount table, L1, header, snapshot table, flush), the Nth write fails
//! once, for every N the operation reaches. And `any:N:dead` fails every
//! write from the Nth on, which is a crash just before that write. After
//! each run, `qemu-img check` must find at most leaks and what was there
//! before (flushed) must read back as it was; the operation itself either
//! happened or not.

mod common;
use common::*;
use std::path::{Path, PathBuf};

/// What an operation may leave in the image, as raw contents: the guest
/// view must equal one of `active`, and each listed snapshot (by name)
/// its contents, if it still exists.
struct Expect {
    active: Vec<Vec<u8>>,
    /// Judge the guest view per block of this size (each block as in one
    /// of `active`) instead of as a whole.
    block: Option<usize>,
    snapshots: Vec<(String, Vec<u8>)>,
    /// A snapshot the operation creates (it may or may not exist after).
    created: Option<(String, Vec<u8>)>,
}

struct Case {
    name: &'static str,
    /// Files copied into a fresh directory for each run; the first is the
    /// image the command works on.
    files: Vec<PathBuf>,
    args: Vec<String>,
    expect: Expect,
}

/// qemu-img's view of `img` (or one of its snapshots) as raw bytes.
fn contents(img: &Path, snapshot: Option<&str>, dir: &Path) -> Vec<u8> {
    let out = dir.join("view.raw");
    let _ = std::fs::remove_file(&out);
    let mut args = vec!["convert", "-U", "-O", "raw"];
    let l;
    if let Some(s) = snapshot {
        l = format!("snapshot.name={s}");
        args.extend(["-l", &l]);
    }
    args.extend([p(img), p(&out)]);
    ok("qemu-img", &args);
    std::fs::read(&out).unwrap()
}

fn snapshot_names(img: &Path) -> Vec<String> {
    let out = ok("qemu-img", &["info", "-U", "--output", "json", p(img)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["snapshots"]
        .as_array()
        .map(|a| a.iter().map(|s| s["name"].as_str().unwrap_or("").to_string()).collect())
        .unwrap_or_default()
}

/// Runs the case once with `plan`; returns whether the plan fired.
fn run_once(case: &Case, plan: &str, work: &Path) -> bool {
    let dir = work.join(format!("{}-{}", case.name, plan.replace(':', "-")));
    std::fs::create_dir_all(&dir).unwrap();
    for f in &case.files {
        std::fs::copy(f, dir.join(f.file_name().unwrap())).unwrap();
    }
    let img = dir.join(case.files[0].file_name().unwrap());
    let mut args: Vec<String> = vec!["img".into(), "--x-inject-error".into(), plan.into()];
    args.extend(
        case.args
            .iter()
            .map(|a| if a == "IMG" { p(&img).to_string() } else { a.clone() }),
    );
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = run("spindle", &argv);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !err.contains("panicked") && o.status.code() != Some(101),
        "{} with {plan}: spindle panicked: {err}",
        case.name
    );
    let fired = err.contains("injected error");
    wait_unlocked(&img);
    let check = run("qemu-img", &["check", p(&img)]);
    assert!(
        matches!(check.status.code(), Some(0) | Some(3)),
        "{} with {plan}: qemu-img check exit {:?}:\n{}{}\nspindle said: {err}",
        case.name,
        check.status.code(),
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let view = contents(&img, None, &dir);
    let alternatives = &case.expect.active;
    let good = match case.expect.block {
        None => alternatives.contains(&view),
        Some(b) => {
            alternatives.iter().all(|a| a.len() == view.len())
                && (0..view.len().div_ceil(b)).all(|i| {
                    let r = i * b..((i + 1) * b).min(view.len());
                    alternatives.iter().any(|a| a[r.clone()] == view[r.clone()])
                })
        }
    };
    assert!(
        good,
        "{} with {plan}: the guest view is neither the old nor the new contents ({err})",
        case.name
    );
    let names = snapshot_names(&img);
    // qemu-img shows a snapshot at the image's current size: compare what
    // the snapshot had, and zeroes past it.
    let same = |got: Vec<u8>, want: &[u8]| {
        got.len() >= want.len() && got[..want.len()] == *want && got[want.len()..].iter().all(|&b| b == 0)
    };
    for (name, want) in &case.expect.snapshots {
        if names.contains(name) {
            assert!(
                same(contents(&img, Some(name), &dir), want),
                "{} with {plan}: snapshot {name} changed",
                case.name
            );
        }
    }
    if let Some((name, want)) = &case.expect.created {
        if names.contains(name) {
            assert!(
                contents(&img, Some(name), &dir) == *want,
                "{} with {plan}: the new snapshot {name} is wrong",
                case.name
            );
        }
    }
    // Leaks are repairable and the image stays usable.
    if check.status.code() == Some(3) {
        ok("spindle", &["img", "check", "-r", "all", p(&img)]);
        assert_clean(&img);
    }
    let _ = std::fs::remove_dir_all(&dir);
    fired
}

/// Every N the operation reaches, densely at first, then sparser.
fn sweep(case: &Case, kind: &str, mode: &str, work: &Path) -> u64 {
    let mut n = 1u64;
    let mut runs = 0;
    while run_once(case, &format!("{kind}:{n}:{mode}"), work) {
        runs += 1;
        n += if n < 12 { 1 } else { n / 3 };
    }
    runs
}

const KINDS: [&str; 8] = [
    "data",
    "l2",
    "refblock",
    "reftable",
    "l1",
    "header",
    "snapshot_table",
    "flush",
];

/// A qcow2 image with data, two snapshots that differ from it and each
/// other, and its expected contents. Small clusters make many tables.
fn snapshot_image(d: &Path, name: &str, opts: &str) -> (PathBuf, Vec<u8>, Vec<u8>, Vec<u8>) {
    let img = d.join(name);
    qcow2_create(&img, &["-o", opts], Some("6M"));
    qemu_io(&img, &["write -P 1 0 5M", "write -c -P 7 5M 64k", "write -z 5248k 64k"]);
    ok("qemu-img", &["snapshot", "-c", "s1", p(&img)]);
    qemu_io(&img, &["write -P 2 1M 2M", "discard 4M 512k"]);
    ok("qemu-img", &["snapshot", "-c", "s2", p(&img)]);
    qemu_io(&img, &["write -P 3 0 512k", "write -P 4 3M 1M"]);
    let s1 = contents(&img, Some("s1"), d);
    let s2 = contents(&img, Some("s2"), d);
    let active = contents(&img, None, d);
    (img, active, s1, s2)
}

fn cases(d: &Path) -> Vec<Case> {
    let mut out = Vec::new();
    for (tag, opts) in [("512", "cluster_size=512"), ("64k", "cluster_size=64k")] {
        let (img, active, s1, s2) = snapshot_image(d, &format!("snap-{tag}.qcow2"), opts);
        let snaps = vec![("s1".to_string(), s1.clone()), ("s2".to_string(), s2.clone())];
        out.push(Case {
            name: if tag == "512" {
                "snapshot-create-512"
            } else {
                "snapshot-create-64k"
            },
            files: vec![img.clone()],
            args: vec!["snapshot".into(), "-c".into(), "new".into(), "IMG".into()],
            expect: Expect {
                block: None,
                active: vec![active.clone()],
                snapshots: snaps.clone(),
                created: Some(("new".into(), active.clone())),
            },
        });
        out.push(Case {
            name: if tag == "512" {
                "snapshot-delete-512"
            } else {
                "snapshot-delete-64k"
            },
            files: vec![img.clone()],
            args: vec!["snapshot".into(), "-d".into(), "s1".into(), "IMG".into()],
            expect: Expect {
                block: None,
                active: vec![active.clone()],
                snapshots: snaps.clone(),
                created: None,
            },
        });
        out.push(Case {
            name: if tag == "512" {
                "snapshot-apply-512"
            } else {
                "snapshot-apply-64k"
            },
            files: vec![img.clone()],
            args: vec!["snapshot".into(), "-a".into(), "s1".into(), "IMG".into()],
            expect: Expect {
                block: None,
                active: vec![active.clone(), s1.clone()],
                snapshots: snaps.clone(),
                created: None,
            },
        });
        // Growing past the L1 table (a new L1), with snapshots present.
        let mut grown = active.clone();
        grown.resize(grown.len() + (64 << 20), 0);
        out.push(Case {
            name: if tag == "512" { "resize-512" } else { "resize-64k" },
            files: vec![img.clone()],
            args: vec!["resize".into(), "IMG".into(), "+64M".into()],
            expect: Expect {
                block: None,
                active: vec![active.clone(), grown],
                snapshots: snaps.clone(),
                created: None,
            },
        });
    }
    // Allocating writes: a fresh image, small clusters (new L2 tables and
    // refcount blocks on the way). bench writes 0xa5; every 4k block ends
    // up old or new, checked by `alloc_expect`.
    let alloc = d.join("alloc.qcow2");
    qcow2_create(&alloc, &["-o", "cluster_size=512"], Some("8M"));
    qemu_io(&alloc, &["write -P 1 0 1M"]);
    out.push(Case {
        name: "allocating-write",
        files: vec![alloc.clone()],
        args: [
            "bench", "-w", "-c", "24", "-d", "4", "-s", "3k", "-S", "333333", "-o", "512k", "IMG",
        ]
        .map(String::from)
        .to_vec(),
        expect: Expect {
            block: Some(512),
            active: Vec::new(), // filled in by fill_alloc_expectations
            snapshots: Vec::new(),
            created: None,
        },
    });
    // Commit into a qcow2 backing file, then empty the top.
    let base = d.join("base.qcow2");
    qcow2_create(&base, &["-o", "cluster_size=4k"], Some("4M"));
    qemu_io(&base, &["write -P 1 0 4M"]);
    let top = d.join("top.qcow2");
    qcow2_create(
        &top,
        &["-o", "cluster_size=4k", "-b", p(&base), "-F", "qcow2"],
        Some("4M"),
    );
    qemu_io(&top, &["write -P 2 1M 1M", "write -z 3M 64k"]);
    let view = contents(&top, None, d);
    out.push(Case {
        name: "commit",
        files: vec![top.clone(), base.clone()],
        args: vec!["commit".into(), "IMG".into()],
        expect: Expect {
            block: None,
            active: vec![view],
            snapshots: Vec::new(),
            created: None,
        },
    });
    // Downgrade with zero clusters to turn into real zeroes.
    let am = d.join("amend.qcow2");
    qcow2_create(&am, &["-o", "cluster_size=4k"], Some("4M"));
    qemu_io(&am, &["write -P 1 0 2M", "write -z 512k 256k", "write -z 3M 64k"]);
    let view = contents(&am, None, d);
    out.push(Case {
        name: "amend",
        files: vec![am.clone()],
        args: vec!["amend".into(), "-o".into(), "compat=0.10".into(), "IMG".into()],
        expect: Expect {
            block: None,
            active: vec![view],
            snapshots: Vec::new(),
            created: None,
        },
    });
    out
}

/// The allocating-write case: each cluster is the old contents or 0xa5.
fn fill_alloc_expectations(case: &mut Case, d: &Path) {
    let old = contents(&case.files[0], None, d);
    // bench writes 3k requests at 512k + i*333333 (mod the span); any mix
    // of old and written clusters is acceptable.
    let mut new = old.clone();
    let span = old.len() as u64 - (512 << 10) - 3072 + 1;
    for i in 0..24u64 {
        let off = (512 << 10) + (i * 333333) % span;
        new[off as usize..off as usize + 3072].fill(0xa5);
    }
    case.expect.active = vec![old, new];
}

#[test]
fn every_metadata_write_can_fail_and_the_image_stays_consistent() {
    need("qemu-img");
    need("qemu-io");
    let d = scratch();
    let work = scratch();
    let mut cases = cases(d.path());
    for c in cases.iter_mut().filter(|c| c.name == "allocating-write") {
        fill_alloc_expectations(c, d.path());
    }
    let results: Vec<(String, u64)> = std::thread::scope(|s| {
        let handles: Vec<_> = cases
            .iter()
            .map(|case| {
                let work = work.path();
                s.spawn(move || {
                    let mut runs = 0;
                    for kind in KINDS {
                        runs += sweep(case, kind, "once", work);
                    }
                    runs += sweep(case, "any", "dead", work);
                    (case.name.to_string(), runs)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let total: u64 = results.iter().map(|r| r.1).sum();
    eprintln!("fault injection: {total} injected faults: {results:?}");
    for (name, runs) in &results {
        assert!(*runs > 0, "{name}: no fault ever fired (is --x-inject-error wired up?)");
    }
}

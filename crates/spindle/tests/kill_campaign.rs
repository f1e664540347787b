//! `kill -9` during every mutating `spindle img` command, 30 times each at
//! delays spread over the command's run time: `qemu-img check` must find
//! the image clean or leaking only, and what the image held before (all of
//! it flushed) must read as before, or as the command's finished result.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const KILLS: usize = 30;

/// qemu-img's view of `img` (or a snapshot of it) as raw bytes.
fn view(img: &Path, snapshot: Option<&str>) -> Vec<u8> {
    let out = img.with_extension("view");
    let _ = std::fs::remove_file(&out);
    let mut args = vec!["convert".to_string(), "-U".into(), "-O".into(), "raw".into()];
    if let Some(s) = snapshot {
        args.extend(["-l".into(), format!("snapshot.name={s}")]);
    }
    args.extend([p(img).to_string(), p(&out).to_string()]);
    ok("qemu-img", &args.iter().map(String::as_str).collect::<Vec<_>>());
    let v = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    v
}

fn has_snapshot(img: &Path, name: &str) -> bool {
    let out = ok("qemu-img", &["snapshot", "-U", "-l", p(img)]);
    out.lines().any(|l| l.split_whitespace().nth(1) == Some(name))
}

fn assert_leaks_at_most(img: &Path, what: &str) -> Option<i32> {
    // A killed process's image locks can outlive it for a moment: the
    // kernel tears its io_uring down asynchronously, and the files its
    // requests still held (with their OFD locks) close only then.
    let mut o = run("qemu-img", &["check", p(img)]);
    for _ in 0..50 {
        if !String::from_utf8_lossy(&o.stderr).contains("Failed to get") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        o = run("qemu-img", &["check", p(img)]);
    }
    let code = o.status.code();
    assert!(
        matches!(code, Some(0) | Some(3)),
        "{what}: qemu-img check {} exit {code:?}:\n{}{}",
        img.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    code
}

/// Starts `spindle ARGS`, kills it after `delay`, and waits until the
/// kernel lets go of `img`'s locks (io_uring keeps a killed process's
/// files open for a moment); returns whether it had already finished
/// (successfully) by then.
fn kill_after(args: &[&str], delay: Duration, img: &Path) -> bool {
    let mut child = Command::new(env!("CARGO_BIN_EXE_spindle"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn spindle");
    std::thread::sleep(delay);
    let finished = matches!(child.try_wait(), Ok(Some(s)) if s.success());
    let _ = child.kill();
    let _ = child.wait();
    if img.exists() {
        wait_unlocked(img);
    }
    finished
}

/// How long `args` takes when left alone (on a scratch copy made by `prepare`).
fn duration(prepare: &dyn Fn(), args: &[&str]) -> Duration {
    prepare();
    let t = Instant::now();
    ok("spindle", args);
    t.elapsed()
}

/// Delay of kill `i` of `KILLS`: from 0 to a little past the run time.
fn delay(i: usize, full: Duration) -> Duration {
    full.mul_f64(1.2 * i as f64 / KILLS as f64)
}

struct Tally {
    name: &'static str,
    mid_way: usize,
    leaky: usize,
}

fn report(t: &Tally) {
    eprintln!(
        "kill campaign {}: {KILLS} kills, {} before the command finished, {} left leaks",
        t.name, t.mid_way, t.leaky
    );
}

/// A qcow2 image with 512-byte clusters (so many L2 tables and refcount
/// blocks that a snapshot operation takes a while), data, and one snapshot
/// `base`.
fn data_image(d: &tempfile::TempDir, name: &str) -> PathBuf {
    let img = at(d, name);
    qcow2_create(&img, &["-o", "cluster_size=512"], Some("24M"));
    qemu_io(&img, &["write -P 1 0 20M", "write -z 20M 1M"]);
    ok("qemu-img", &["snapshot", "-c", "base", p(&img)]);
    qemu_io(&img, &["write -P 2 4M 8M"]);
    img
}

#[test]
fn kill_during_snapshot_create_delete_and_apply() {
    need("qemu-img");
    need("qemu-io");
    let d = scratch();
    let img = data_image(&d, "snap.qcow2");
    let base = view(&img, Some("base"));
    let active = view(&img, None);
    // Create: the active view and `base` never change; the new snapshot,
    // if it exists, holds the active view.
    let full = duration(&|| (), &["img", "snapshot", "-c", "timing", p(&img)]);
    ok("spindle", &["img", "snapshot", "-d", "timing", p(&img)]);
    let mut t = Tally {
        name: "snapshot -c",
        mid_way: 0,
        leaky: 0,
    };
    for i in 0..KILLS {
        let name = format!("k{i}");
        t.mid_way += !kill_after(&["img", "snapshot", "-c", &name, p(&img)], delay(i, full), &img) as usize;
        t.leaky += (assert_leaks_at_most(&img, &format!("create killed at {:?}", delay(i, full))) == Some(3)) as usize;
        assert!(view(&img, None) == active, "create: the active view changed");
        if has_snapshot(&img, &name) {
            assert!(view(&img, Some(&name)) == active, "create: the new snapshot is wrong");
            ok("qemu-img", &["snapshot", "-d", &name, p(&img)]);
        }
    }
    assert!(view(&img, Some("base")) == base, "create: snapshot base changed");
    report(&t);

    // Delete: the active view and the other snapshot never change.
    let mut t = Tally {
        name: "snapshot -d",
        mid_way: 0,
        leaky: 0,
    };
    ok("qemu-img", &["snapshot", "-c", "victim", p(&img)]);
    let full = duration(&|| (), &["img", "snapshot", "-d", "victim", p(&img)]);
    for i in 0..KILLS {
        ok("qemu-img", &["snapshot", "-c", "victim", p(&img)]);
        qemu_io(&img, &[&format!("write -P {} {}M 1M", 10 + i, i % 20)]);
        let active = view(&img, None);
        t.mid_way += !kill_after(&["img", "snapshot", "-d", "victim", p(&img)], delay(i, full), &img) as usize;
        t.leaky += (assert_leaks_at_most(&img, "delete") == Some(3)) as usize;
        assert!(view(&img, None) == active, "delete: the active view changed");
        if has_snapshot(&img, "victim") {
            ok("qemu-img", &["snapshot", "-d", "victim", p(&img)]);
        }
    }
    assert!(view(&img, Some("base")) == base, "delete: snapshot base changed");
    report(&t);

    // Apply: the active view is the old one or base's; base never changes.
    let mut t = Tally {
        name: "snapshot -a",
        mid_way: 0,
        leaky: 0,
    };
    let full = duration(&|| (), &["img", "snapshot", "-a", "base", p(&img)]);
    for i in 0..KILLS {
        qemu_io(&img, &[&format!("write -P {} {}M 2M", 40 + i, i % 20)]);
        let before = view(&img, None);
        t.mid_way += !kill_after(&["img", "snapshot", "-a", "base", p(&img)], delay(i, full), &img) as usize;
        t.leaky += (assert_leaks_at_most(&img, "apply") == Some(3)) as usize;
        let now = view(&img, None);
        assert!(
            now == before || now == base,
            "apply: the active view is neither the old one nor base's"
        );
    }
    assert!(view(&img, Some("base")) == base, "apply: snapshot base changed");
    report(&t);
}

#[test]
fn kill_during_every_other_mutating_command() {
    need("qemu-img");
    need("qemu-io");
    let d = scratch();
    let src = at(&d, "src.qcow2");
    qcow2_create(&src, &["-o", "cluster_size=4k"], Some("64M"));
    qemu_io(&src, &["write -P 1 0 48M", "write -z 48M 4M"]);
    let src_view = view(&src, None);

    // Each: (name, how to set the work image up, command, what the guest
    // view may be afterwards).
    type Allowed = Box<dyn Fn(&[u8]) -> bool>;
    struct Cmd {
        name: &'static str,
        args: Vec<String>,
        setup: Box<dyn Fn()>,
        image: PathBuf,
        allowed: Allowed,
    }
    let work = at(&d, "work.qcow2");
    let top = at(&d, "top.qcow2");
    let dst = at(&d, "dst.qcow2");
    let w = work.clone();
    let s = src.clone();
    let copy_src = move || {
        std::fs::copy(&s, &w).unwrap();
    };
    let sv = src_view.clone();
    let same_as_src = move |v: &[u8]| v == sv.as_slice();
    let mut cmds: Vec<Cmd> = Vec::new();
    cmds.push(Cmd {
        name: "convert",
        args: vec![
            "img".into(),
            "convert".into(),
            "-O".into(),
            "qcow2".into(),
            p(&src).into(),
            p(&dst).into(),
        ],
        setup: Box::new(|| ()),
        image: dst.clone(),
        allowed: Box::new(|_| true), // a half-written copy is no one's acknowledged data
    });
    let (sv1, sv2) = (src_view.clone(), src_view.clone());
    cmds.push(Cmd {
        name: "amend compat=0.10",
        args: vec![
            "img".into(),
            "amend".into(),
            "-o".into(),
            "compat=0.10".into(),
            p(&work).into(),
        ],
        setup: Box::new(copy_src.clone()),
        image: work.clone(),
        allowed: Box::new(move |v| v == sv1.as_slice()),
    });
    let mut grown = src_view.clone();
    grown.resize(grown.len() + (1 << 30), 0);
    cmds.push(Cmd {
        name: "resize",
        args: vec!["img".into(), "resize".into(), p(&work).into(), "+1G".into()],
        setup: Box::new(copy_src.clone()),
        image: work.clone(),
        allowed: Box::new(move |v| v == sv2.as_slice() || v == grown.as_slice()),
    });
    let (s2, t2, w2) = (src.clone(), top.clone(), work.clone());
    let top_setup = move || {
        std::fs::copy(&s2, &w2).unwrap();
        let _ = std::fs::remove_file(&t2);
        ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=4k",
                "-b",
                p(&w2),
                "-F",
                "qcow2",
                p(&t2),
            ],
        );
        qemu_io(&t2, &["write -P 9 4M 20M", "write -z 30M 2M"]);
    };
    top_setup();
    let top_view = view(&top, None);
    let tv = top_view.clone();
    cmds.push(Cmd {
        name: "commit",
        args: vec!["img".into(), "commit".into(), p(&top).into()],
        setup: Box::new(top_setup.clone()),
        image: top.clone(),
        allowed: Box::new(move |v| v == tv.as_slice()),
    });
    let tv = top_view.clone();
    cmds.push(Cmd {
        name: "rebase (safe)",
        args: vec!["img".into(), "rebase".into(), "-b".into(), "".into(), p(&top).into()],
        setup: Box::new(top_setup.clone()),
        image: top.clone(),
        allowed: Box::new(move |v| v == tv.as_slice()),
    });
    cmds.push(Cmd {
        name: "dd",
        args: vec![
            "img".into(),
            "dd".into(),
            "-O".into(),
            "qcow2".into(),
            format!("if={}", p(&src)),
            format!("of={}", p(&dst)),
            "bs=1M".into(),
        ],
        setup: Box::new(|| ()),
        image: dst.clone(),
        allowed: Box::new(|_| true),
    });
    // check -r all on an image that leaks: repairing must never make it worse.
    let (s3, w3) = (src.clone(), work.clone());
    cmds.push(Cmd {
        name: "check -r all",
        args: vec!["img".into(), "check".into(), "-r".into(), "all".into(), p(&work).into()],
        setup: Box::new(move || {
            std::fs::copy(&s3, &w3).unwrap();
            // Leak clusters: 100 unused clusters past the data get a
            // refcount of one.
            let cs = 4096u64;
            let len = std::fs::metadata(&w3).unwrap().len();
            let first = len.div_ceil(cs);
            std::fs::OpenOptions::new()
                .write(true)
                .open(&w3)
                .unwrap()
                .set_len((first + 100) * cs)
                .unwrap();
            let rt = common::qcow2::refcount_table(&w3);
            let block = common::qcow2::be64(&w3, rt + first / 2048 * 8);
            assert!(block != 0 && first % 2048 + 100 < 2048, "test setup: no room for leaks");
            for c in first..first + 100 {
                common::qcow2::poke(&w3, block + (c % 2048) * 2, &1u16.to_be_bytes());
            }
            assert_eq!(
                run("qemu-img", &["check", p(&w3)]).status.code(),
                Some(3),
                "test setup: leaks only"
            );
        }),
        image: work.clone(),
        allowed: Box::new(same_as_src.clone()),
    });

    for c in &cmds {
        let argv: Vec<&str> = c.args.iter().map(String::as_str).collect();
        let _ = std::fs::remove_file(&dst);
        let full = duration(&*c.setup, &argv);
        let mut t = Tally {
            name: c.name,
            mid_way: 0,
            leaky: 0,
        };
        for i in 0..KILLS {
            let _ = std::fs::remove_file(&dst);
            (c.setup)();
            t.mid_way += !kill_after(&argv, delay(i, full), &c.image) as usize;
            if !c.image.exists() || std::fs::metadata(&c.image).unwrap().len() < 512 {
                continue; // killed before the output existed
            }
            let info = run("qemu-img", &["info", "-U", "--output", "json", p(&c.image)]);
            if info.status.success() && String::from_utf8_lossy(&info.stdout).contains("\"format\": \"qcow2\"") {
                t.leaky += (assert_leaks_at_most(&c.image, c.name) == Some(3)) as usize;
                assert!((c.allowed)(&view(&c.image, None)), "{}: the guest view changed", c.name);
            } else {
                // Only an output being created may be unreadable or no
                // qcow2 yet (killed before its header, written last).
                assert!(
                    matches!(c.name, "convert" | "dd"),
                    "{}: the image no longer opens",
                    c.name
                );
            }
        }
        report(&t);
    }
}

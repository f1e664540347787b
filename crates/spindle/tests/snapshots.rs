//! Internal snapshots and VM state, against qemu-img both ways.

mod common;
use common::*;
use rand::{Rng, SeedableRng};
use spindle_block::{open_image, Format, Node, OpenConfig};
use spindle_io::{CacheMode, Runtime, RuntimeConfig};
use std::collections::BTreeMap;
use std::path::Path;

/// (id, tag, vm size) rows of `snapshot -l`, from either tool.
fn rows(out: &str) -> Vec<(String, String, String)> {
    out.lines()
        .skip(2)
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].to_string(), f[1].to_string(), format!("{} {}", f[2], f[3]))
        })
        .collect()
}

fn content(img: &Path, d: &tempfile::TempDir, tag: &str) -> Vec<u8> {
    let out = at(d, &format!("view-{tag}.raw"));
    ok("qemu-img", &["convert", "-O", "raw", p(img), p(&out)]);
    std::fs::read(&out).unwrap()
}

#[test]
fn snapshots_interoperate_with_qemu_img() {
    need("qemu-img");
    need("qemu-io");
    let d = scratch();
    let base = at(&d, "base.raw");
    mixed_data(&base, 8 << 20, 21);
    let img = at(&d, "s.qcow2");
    qcow2_create(&img, &["-o", "cluster_size=4k", "-b", "base.raw", "-F", "raw"], None);
    qemu_io(&img, &["write -P 1 0 1M", "write -z 2M 64k", "write -c -P 5 4M 64k"]);
    let mut saved = BTreeMap::new();

    ok("spindle", &["img", "snapshot", "-c", "one", p(&img)]);
    assert_clean(&img);
    saved.insert("one", content(&img, &d, "one"));
    qemu_io(&img, &["write -P 2 512k 1M", "discard 4M 64k"]);
    ok("qemu-img", &["snapshot", "-c", "two", p(&img)]);
    saved.insert("two", content(&img, &d, "two"));
    ok(
        "spindle",
        &[
            "img",
            "bench",
            "-w",
            "-c",
            "300",
            "-s",
            "3000",
            "-S",
            "22222",
            "--pattern",
            "3",
            p(&img),
        ],
    );
    assert_clean(&img);
    ok("spindle", &["img", "snapshot", "-c", "three", p(&img)]);
    assert_clean(&img);
    let now = content(&img, &d, "three");
    saved.insert("three", now.clone());

    assert_eq!(
        rows(&ok("spindle", &["img", "snapshot", "-l", p(&img)])),
        rows(&ok("qemu-img", &["snapshot", "-l", p(&img)]))
    );
    // info reports the same snapshots.
    let q: serde_json::Value = serde_json::from_str(&ok("qemu-img", &["info", "--output", "json", p(&img)])).unwrap();
    let sp: serde_json::Value =
        serde_json::from_str(&ok("spindle", &["img", "info", "--output", "json", p(&img)])).unwrap();
    for k in [
        "id",
        "name",
        "vm-state-size",
        "date-sec",
        "date-nsec",
        "vm-clock-sec",
        "vm-clock-nsec",
    ] {
        let pick = |v: &serde_json::Value| {
            v["snapshots"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e[k].clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(pick(&q), pick(&sp), "info snapshots field {k}");
    }
    assert!(ok("spindle", &["img", "info", p(&img)]).contains("Snapshot list:"));
    // Apply each with the other tool than the one that made it.
    for (tag, tool) in [
        ("one", "qemu-img"),
        ("two", "spindle"),
        ("three", "qemu-img"),
        ("one", "spindle"),
    ] {
        if tool == "spindle" {
            ok("spindle", &["img", "snapshot", "-a", tag, p(&img)]);
        } else {
            ok("qemu-img", &["snapshot", "-a", tag, p(&img)]);
        }
        assert_clean(&img);
        assert!(
            content(&img, &d, "now") == saved[tag],
            "{tool} applied '{tag}': content differs"
        );
    }
    // Writes after apply copy on write; the snapshot stays intact.
    ok(
        "spindle",
        &[
            "img",
            "bench",
            "-w",
            "-c",
            "100",
            "-s",
            "4096",
            "-S",
            "65536",
            "--pattern",
            "9",
            p(&img),
        ],
    );
    assert_clean(&img);
    ok("qemu-img", &["snapshot", "-a", "one", p(&img)]);
    assert!(
        content(&img, &d, "now") == saved["one"],
        "snapshot 'one' changed by later writes"
    );
    // Delete with both tools; the rest survive.
    ok("spindle", &["img", "snapshot", "-d", "two", p(&img)]);
    assert_clean(&img);
    ok("qemu-img", &["snapshot", "-d", "one", p(&img)]);
    assert_clean(&img);
    ok("spindle", &["img", "snapshot", "-a", "three", p(&img)]);
    assert!(content(&img, &d, "now") == saved["three"]);
    ok("spindle", &["img", "snapshot", "-d", "3", p(&img)]); // by id
    assert_clean(&img);
    assert!(rows(&ok("qemu-img", &["snapshot", "-l", p(&img)])).is_empty());
    let o = run("spindle", &["img", "snapshot", "-a", "nope", p(&img)]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("no snapshot with id or name 'nope'"));
}

/// Random create/apply/delete/write sequences against a model, with
/// qemu-img check after every step.
#[test]
fn random_snapshot_sequences_match_model() {
    need("qemu-img");
    let d = scratch();
    let size = 4u64 << 20;
    let img = at(&d, "r.qcow2");
    qcow2_create(&img, &["-o", "cluster_size=4k,refcount_bits=8"], Some("4M"));
    let rt = Runtime::new(RuntimeConfig::default()).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(31);
    let mut model = vec![0u8; size as usize];
    let mut snaps: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let cfg = OpenConfig {
        format: Some(Format::Qcow2),
        cache: CacheMode::None,
        ..Default::default()
    };
    for step in 0..60 {
        let node = open_image(p(&img), &cfg).unwrap();
        let Node::Qcow2(q) = &node else { unreachable!() };
        let op = rng.gen_range(0..10);
        let what = rt.block_on(async {
            match op {
                0..=3 => {
                    for _ in 0..rng.gen_range(1..6) {
                        let len = rng.gen_range(1..200_000u64);
                        let off = rng.gen_range(0..size - len);
                        let v: u8 = rng.gen();
                        let b = vec![v; len as usize];
                        node.write_from(off, &b, false).await.unwrap();
                        model[off as usize..(off + len) as usize].fill(v);
                    }
                    "write".to_string()
                }
                4..=5 => {
                    let name = format!("s{step}");
                    q.snapshot_create(&name, 0, 0).await.unwrap();
                    snaps.insert(name.clone(), model.clone());
                    format!("create {name}")
                }
                6..=7 if !snaps.is_empty() => {
                    let name = snaps.keys().nth(rng.gen_range(0..snaps.len())).unwrap().clone();
                    q.snapshot_apply(&name).await.unwrap();
                    model = snaps[&name].clone();
                    format!("apply {name}")
                }
                8..=9 if !snaps.is_empty() => {
                    let name = snaps.keys().nth(rng.gen_range(0..snaps.len())).unwrap().clone();
                    q.snapshot_delete(&name).await.unwrap();
                    snaps.remove(&name);
                    format!("delete {name}")
                }
                _ => "nothing".to_string(),
            }
        });
        rt.block_on(async {
            let mut all = vec![0u8; size as usize];
            node.read_into(0, &mut all).await.unwrap();
            assert!(all == model, "step {step} ({what}): content differs from the model");
            node.close().await.unwrap();
        });
        drop(node);
        let o = run("qemu-img", &["check", p(&img)]);
        assert_eq!(
            o.status.code(),
            Some(0),
            "step {step} ({what}): {}",
            String::from_utf8_lossy(&o.stdout)
        );
    }
    // Every snapshot still holds what it held.
    for (name, want) in &snaps {
        ok("qemu-img", &["snapshot", "-a", name, p(&img)]);
        assert!(&content(&img, &d, "now") == want, "snapshot {name} lost data");
    }
}

/// VM state in from a file, stdin or a unix socket; out to a file or
/// stdout; byte for byte, and dropped from the active L1 after the snapshot.
#[test]
fn vmstate_round_trips_through_files_pipes_and_sockets() {
    need("qemu-img");
    let d = scratch();
    let img = at(&d, "vm.qcow2");
    qcow2_create(&img, &[], Some("100M"));
    let state = at(&d, "state.bin");
    mixed_data(&state, 21 << 20, 41); // not a multiple of the chunk
    let want = std::fs::read(&state).unwrap();
    ok(
        "spindle",
        &["img", "snapshot", "-c", "file", "--vmstate", p(&state), p(&img)],
    );
    assert_clean(&img);
    let out = at(&d, "out.bin");
    ok(
        "spindle",
        &["img", "snapshot", "-x", "file", "--vmstate", p(&out), p(&img)],
    );
    assert!(std::fs::read(&out).unwrap() == want, "VM state from a file differs");
    // stdin -> snapshot -> stdout, with small chunks and depth 1 for variety
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_spindle"))
        .args([
            "img",
            "snapshot",
            "-c",
            "pipe",
            "--vmstate",
            "-",
            "--vmstate-chunk",
            "65536",
            "--vmstate-depth",
            "1",
            p(&img),
        ])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut child = child;
        child.stdin.take().unwrap().write_all(&want).unwrap();
        assert!(child.wait().unwrap().success());
    }
    let o = run("spindle", &["img", "snapshot", "-x", "pipe", "--vmstate", "-", p(&img)]);
    assert!(o.status.success() && o.stdout == want, "VM state through pipes differs");
    // unix socket: Spindle listens, a writer connects (as QEMU's migrate does).
    let sock = at(&d, "mig.sock");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_spindle"))
        .args([
            "img",
            "snapshot",
            "-c",
            "sock",
            "--vmstate",
            &format!("unix:{}", p(&sock)),
            p(&img),
        ])
        .spawn()
        .unwrap();
    let mut conn = None;
    for _ in 0..200 {
        if let Ok(c) = std::os::unix::net::UnixStream::connect(&sock) {
            conn = Some(c);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    {
        use std::io::Write;
        let mut c = conn.expect("spindle listens on the socket");
        c.write_all(&want).unwrap();
    }
    let mut child = child;
    assert!(child.wait().unwrap().success());
    let o = run("spindle", &["img", "snapshot", "-x", "sock", "--vmstate", "-", p(&img)]);
    assert!(o.stdout == want, "VM state through a socket differs");
    assert_clean(&img);
    // qemu-img sees the sizes; the active L1 holds no VM state: dropping
    // every snapshot leaves just the (empty) disk's metadata.
    let list = ok("qemu-img", &["snapshot", "-l", p(&img)]);
    assert_eq!(list.matches("21 MiB").count(), 3, "{list}");
    for s in ["file", "pipe", "sock"] {
        ok("qemu-img", &["snapshot", "-d", s, p(&img)]);
    }
    assert_clean(&img);
    let v: serde_json::Value = serde_json::from_str(&ok("qemu-img", &["check", "--output", "json", p(&img)])).unwrap();
    assert!(
        v.get("allocated-clusters").is_none(),
        "VM state left behind in the active L1: {v}"
    );
}

/// Killing Spindle while it saves VM state leaves leaks at most, and the
/// snapshots taken before are intact.
#[test]
fn kill_during_snapshot_create_leaves_leaks_at_most() {
    need("qemu-img");
    let d = scratch();
    let img = at(&d, "k.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&img), "64M"]);
    ok("qemu-img", &["snapshot", "-c", "before", p(&img)]);
    let before = content(&img, &d, "before");
    let state = at(&d, "big.bin");
    mixed_data(&state, 200 << 20, 51);
    let mut codes = Vec::new();
    for (i, ms) in [15u64, 40, 90, 160, 300].iter().enumerate() {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_spindle"))
            .args([
                "img",
                "snapshot",
                "-c",
                &format!("k{i}"),
                "--vmstate",
                p(&state),
                p(&img),
            ])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(*ms));
        let _ = child.kill();
        let _ = child.wait();
        wait_unlocked(&img);
        let code = run("qemu-img", &["check", p(&img)]).status.code();
        assert!(
            matches!(code, Some(0) | Some(3)),
            "kill at {ms} ms: qemu-img check exit {code:?}"
        );
        codes.push(code);
        ok("spindle", &["img", "check", "-r", "all", p(&img)]);
        assert_clean(&img);
    }
    ok("qemu-img", &["snapshot", "-a", "before", p(&img)]);
    assert!(content(&img, &d, "after") == before, "the earlier snapshot changed");
    eprintln!("snapshot kill: qemu-img check exit codes {codes:?}");
}

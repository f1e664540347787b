//! `kill -9` of `spindle serve` during live jobs (docs/jobs.md, "Failures
//! and crashes"): for overlay, stream, active and intermediate commit on a
//! served qcow2 chain base ← mid ← top, with data in every layer and more
//! written through vhost-user (`spindle bench`, libblkio) and flushed
//! before the job starts. Each job is rate-limited so that the kill finds
//! it mid-way (checked). Afterwards every image `qemu-img check`s clean
//! or leaks-only, and the chain the export served when it died reads the
//! data written before: the top's chain until a commit completed, the
//! commit's base once it had.

mod common;
/// bench's block contents (block number, generation), to know what it wrote.
#[path = "../src/bench/pattern.rs"]
mod pattern;

use common::jobs::{job, start_job, view, wait_job, Chain, NAME};
use common::serve::Serve;
use common::{p, run, scratch, wait_unlocked};
use serde_json::{json, Value};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// bench's request size and the region it writes, from offset 0.
const BS: u64 = 64 << 10;
const REGION: u64 = 2 << 20;

/// A served chain with the bench's data written, and the view to expect.
struct Case {
    ch: Chain,
    s: Serve,
    want: Vec<u8>,
    /// What the last block bench wrote held before: that write was not
    /// followed by a flush, so the block may read as before or after it.
    loose: Vec<u8>,
}

/// One pass of bench over the region at queue depth 1, a flush after
/// every write but the last: cursor order is blocks 1, 2, …, then 0, each
/// at generation 1 (so a second pass writes the same data again).
fn bench_pass(sock: &Path) {
    let blocks = (REGION / BS).to_string();
    let o = run(
        "spindle",
        &[
            "bench",
            p(sock),
            "--rw",
            "write",
            "--bs",
            "64k",
            "--size",
            "2M",
            "--iodepth",
            "1",
            "--flush-every",
            "1",
            "--number-ios",
            &blocks,
            "--verify",
            "--output",
            "json",
        ],
    );
    assert!(o.status.success(), "bench: {}", String::from_utf8_lossy(&o.stdout));
}

fn case(dir: &Path, prefix: &str) -> Case {
    let ch = Chain::create(dir, prefix, "qcow2");
    let old = view(&ch.top);
    let s = ch.serve();
    bench_pass(&ch.sock);
    let mut want = old.clone();
    for (b, block) in want[..REGION as usize].chunks_exact_mut(BS as usize).enumerate() {
        pattern::fill(block, b as u64, 1);
    }
    let c = Case {
        ch,
        s,
        want,
        loose: old[..BS as usize].to_vec(),
    };
    // Flushed writes are on disk, metadata and all (read beside the server).
    reads_as_written(&c, &c.ch.top, "after bench");
    c
}

/// `qemu-img check` finds `img` clean (0) or leaking only (3).
fn leaks_at_most(img: &Path, what: &str) -> i32 {
    let o = run("qemu-img", &["check", p(img)]);
    let code = o.status.code().unwrap_or(-1);
    assert!(
        code == 0 || code == 3,
        "{what}: qemu-img check {} exit {code}:\n{}{}",
        img.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    code
}

/// `img`'s chain reads what `c` wrote.
fn reads_as_written(c: &Case, img: &Path, what: &str) {
    let got = view(img);
    let n = BS as usize;
    assert_eq!(got.len(), c.want.len(), "{what}: {} has the wrong size", img.display());
    let loose_ok = got[..n] == c.want[..n] || got[..n] == c.loose[..];
    let rest_ok = got[n..] == c.want[n..];
    if !(loose_ok && rest_ok) {
        let bad: Vec<usize> = (0..got.len() >> 20)
            .filter(|&m| got[m << 20..(m + 1) << 20] != c.want[m << 20..(m + 1) << 20])
            .collect();
        panic!(
            "{what}: {} reads differently (MiB {bad:?}; the last block bench wrote {})",
            img.display(),
            if loose_ok { "reads right" } else { "does not" }
        );
    }
}

/// Kills the server and waits until the kernel let go of the images.
fn kill(c: &mut Case) {
    c.s.kill();
    for img in [&c.ch.base, &c.ch.mid, &c.ch.top] {
        wait_unlocked(img);
    }
}

fn check_images(c: &Case, what: &str) -> Vec<i32> {
    [&c.ch.base, &c.ch.mid, &c.ch.top]
        .iter()
        .map(|img| leaks_at_most(img, what))
        .collect()
}

/// Starts the job `req`, kills the server after `delay`, and checks the
/// images and the top's chain; whether the job was still running just
/// before the kill.
fn kill_during(c: &mut Case, req: Value, delay: Duration, what: &str) -> Value {
    let id = start_job(&c.s, req);
    std::thread::sleep(delay);
    // Guest writes during the job (recorded by an active commit) and the
    // flushes that put what the job did so far on disk.
    bench_pass(&c.ch.sock);
    let before_kill = job(&c.s, id);
    kill(c);
    assert_eq!(before_kill["state"], "running", "{what}: not mid-way: {before_kill}");
    let codes = check_images(c, what);
    reads_as_written(c, &c.ch.top, what);
    eprintln!("{what}: killed at {before_kill}, qemu-img check exits {codes:?}");
    before_kill
}

const DELAYS: [u64; 3] = [100, 900, 2000];

/// Three kills during the job `req` makes, each on a fresh chain.
fn campaign(prefix: &str, kind: &str, req: impl Fn(&Case) -> Value) -> tempfile::TempDir {
    let d = scratch();
    for (i, ms) in DELAYS.into_iter().enumerate() {
        let mut c = case(d.path(), &format!("{prefix}{i}"));
        let what = format!("{kind}, kill at {ms} ms");
        let r = req(&c);
        kill_during(&mut c, r, Duration::from_millis(ms), &what);
    }
    d
}

#[test]
fn kill_during_stream() {
    // 26 MiB to copy from mid and base at 4 MiB/s.
    campaign(
        "s",
        "stream",
        |_| json!({"cmd": "stream", "name": NAME, "speed": 4 << 20}),
    );
}

#[test]
fn kill_during_intermediate_commit() {
    // 9 MiB to copy from mid into base at 2 MiB/s.
    campaign(
        "i",
        "intermediate commit",
        |c| json!({"cmd": "commit", "name": NAME, "top": c.ch.mid, "speed": 2 << 20}),
    );
}

#[test]
fn kill_during_active_commit() {
    // 5 MiB to copy from top into mid at 1 MiB/s.
    let d = campaign(
        "a",
        "active commit",
        |_| json!({"cmd": "commit", "name": NAME, "speed": 1 << 20}),
    );
    // Killed after the switch: the export served mid, which must hold it all.
    let mut c = case(d.path(), "a-done");
    let id = start_job(&c.s, json!({"cmd": "commit", "name": NAME}));
    assert_eq!(wait_job(&c.s, id)["state"], "completed");
    kill(&mut c);
    check_images(&c, "active commit, kill after the switch");
    reads_as_written(&c, &c.ch.mid, "active commit, kill after the switch");
    reads_as_written(&c, &c.ch.top, "active commit, kill after the switch (old top)");
}

/// An overlay request sent without waiting for the reply.
fn send_overlay(ctl: &Path, image: &Path) -> UnixStream {
    let mut s = UnixStream::connect(ctl).unwrap();
    writeln!(s, "{}", json!({"cmd": "overlay", "name": NAME, "image": image})).unwrap();
    s
}

#[test]
fn kill_during_overlay() {
    let d = scratch();
    for (i, us) in [0u64, 500, 3000].into_iter().enumerate() {
        let what = format!("overlay, kill at {us} µs");
        let mut c = case(d.path(), &format!("o{i}"));
        let ov = c.ch.dir.join(format!("o{i}-ov.qcow2"));
        let _conn = send_overlay(&c.ch.ctl, &ov);
        std::thread::sleep(Duration::from_micros(us));
        kill(&mut c);
        check_images(&c, &what);
        reads_as_written(&c, &c.ch.top, &what);
        // A half-made overlay is no qcow2 image yet, or a whole one.
        let state = if !ov.exists() {
            "absent".to_string()
        } else if !run("qemu-img", &["info", "-U", "-f", "qcow2", p(&ov)]).status.success() {
            format!("no qcow2 image yet ({} bytes)", std::fs::metadata(&ov).unwrap().len())
        } else if view(&ov).is_empty() {
            // Created, not yet grown to the disk's size.
            leaks_at_most(&ov, &what);
            "a qcow2 image of size 0".to_string()
        } else {
            leaks_at_most(&ov, &what);
            reads_as_written(&c, &ov, &what);
            "whole".to_string()
        };
        eprintln!("{what}: the overlay file is {state}");
    }
    // Killed after the overlay took over and bench wrote into it.
    let mut c = case(d.path(), "o-done");
    let ov = c.ch.dir.join("o-done-ov.qcow2");
    let r = c.s.ctl(&json!({"cmd": "overlay", "name": NAME, "image": ov}));
    assert_eq!(r["ok"], true, "{r}");
    kill(&mut c);
    wait_unlocked(&ov);
    leaks_at_most(&ov, "overlay done");
    check_images(&c, "overlay done");
    reads_as_written(&c, &ov, "overlay done");
}

//! Live external snapshots, commit and stream under a running guest
//! (docs/jobs.md). A TCG guest runs gio (tests/guest/gio.c: O_DIRECT
//! writers with generation patterns, discards, racing readers) on a qcow2
//! disk over a raw backing file, served by Spindle. While it runs: an
//! overlay goes on top, is committed back down (active commit), a stream
//! with a rate limit is cancelled, and a stream then copies the raw
//! backing file into the qcow2 image and drops the link. The guest must
//! see no error and no wrong data; afterwards `qemu-img check` is clean,
//! the image stands alone, and it holds what gio last wrote. Refused
//! requests name the problem.

mod common;

use common::gio::{self, Layout};
use common::serve::{config_text, Serve};
use common::vm::{self, Vm};
use common::{assert_clean, ok, p, scratch};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

const LAYOUT: Layout = Layout {
    writers: 4,
    region_mib: 2,
    hold_mib: 4,
};
const DISK: u64 = 32 << 20;

/// Waits until job `id` is over; its last `jobs` entry.
fn wait_job(s: &Serve, id: u64) -> Value {
    let start = Instant::now();
    loop {
        let r = s.ctl(&json!({"cmd": "jobs"}));
        let job = r["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["id"] == id)
            .cloned()
            .unwrap();
        if job["state"] != "running" {
            return job;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "job {id} still running: {job}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn image_of(s: &Serve, name: &str) -> String {
    let l = s.ctl(&json!({"cmd": "list"}));
    let e = l["exports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap();
    e["image"].as_str().unwrap().to_string()
}

/// The backing file qemu-img sees (`-U`: the image is served).
fn backing(img: &Path) -> Option<String> {
    let v: Value = serde_json::from_str(&ok("qemu-img", &["info", "-U", "--output=json", p(img)])).unwrap();
    v["backing-filename"].as_str().map(str::to_string)
}

fn progress(guest: &Vm, n: usize) {
    for _ in 0..n {
        let mark = guest.mark();
        guest.wait_line(mark, "GIO-PROGRESS", Duration::from_secs(60));
    }
}

#[test]
fn overlay_commit_and_stream_under_a_running_guest() {
    let _one = vm::one_at_a_time();
    let d = scratch();
    let dir = d.path();
    let base = dir.join("base.raw");
    LAYOUT.prefill(&base, DISK, 1);
    let q = dir.join("q.qcow2");
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-F", "raw", "-b", p(&base), p(&q)],
    );
    let scratch_raw = dir.join("scratch.raw");
    std::fs::write(&scratch_raw, vec![0u8; 1 << 20]).unwrap();
    let (sock, rsock, ctl) = (dir.join("q.sock"), dir.join("r.sock"), dir.join("ctl.sock"));
    let config = config_text(
        Some(&ctl),
        &[("q", &q, &sock, ""), ("r", &scratch_raw, &rsock, "format = \"raw\"\n")],
    );
    std::fs::write(dir.join("spindle.toml"), config).unwrap();
    let mut s = Serve::start(dir, &["--config", "spindle.toml", "--iothreads", "2"], &[&sock, &rsock]);
    s.use_control(&ctl);
    let script = format!(
        "exec /gio {} --readers 2 --discard --base-gen 1 /dev/vda\n",
        LAYOUT.args()
    );
    let initrd = vm::initrd(dir, &script, true);
    let mut guest = Vm::start(dir, "guest", &initrd, &[(&sock, 2)], None);
    guest.wait_line(0, "GIO-RUNNING", Duration::from_secs(120));
    progress(&guest, 1);

    // Refusals name the problem.
    let err = |r: Value| r["error"].as_str().unwrap_or_default().to_string();
    let ov = dir.join("ov.qcow2");
    let r = s.ctl(&json!({"cmd": "overlay", "name": "nope", "image": ov}));
    assert!(err(r).contains("no export named 'nope'"));
    let r = s.ctl(&json!({"cmd": "overlay", "name": "q", "image": base}));
    assert!(err(r).contains("exists already"), "overlay onto an existing file");
    let r = s.ctl(&json!({"cmd": "stream", "name": "r"}));
    assert!(err(r.clone()).contains("serves a raw image"), "{r}");
    let r = s.ctl(&json!({"cmd": "commit", "name": "r"}));
    assert!(err(r.clone()).contains("has no backing file below it"), "{r}");
    let r = s.ctl(&json!({"cmd": "job_cancel", "id": 4242}));
    assert!(err(r).contains("no job 4242"));

    // Overlay: the guest's writes go to ov.qcow2 over q.qcow2 from now on.
    let r = s.ctl(&json!({"cmd": "overlay", "name": "q", "image": ov}));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(image_of(&s, "q"), p(&ov));
    assert_eq!(backing(&ov).as_deref(), Some(p(&q)));
    progress(&guest, 2);

    // Active commit of ov.qcow2 into q.qcow2: the export serves q.qcow2.
    let r = s.ctl(&json!({"cmd": "commit", "name": "q"}));
    assert_eq!(r["ok"], true, "{r}");
    let job = wait_job(&s, r["job"].as_u64().unwrap());
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(image_of(&s, "q"), p(&q));
    progress(&guest, 2);

    // A stream held back by its rate limit, cancelled: the chain stays.
    let r = s.ctl(&json!({"cmd": "stream", "name": "q", "speed": 1}));
    assert_eq!(r["ok"], true, "{r}");
    let id = r["job"].as_u64().unwrap();
    let again = s.ctl(&json!({"cmd": "commit", "name": "q"}));
    assert!(err(again).contains("has a stream job running"), "one job per export");
    std::thread::sleep(Duration::from_millis(300));
    let r = s.ctl(&json!({"cmd": "job_cancel", "id": id}));
    assert_eq!(r["ok"], true, "{r}");
    let job = wait_job(&s, id);
    assert_eq!(job["state"], "cancelled", "{job}");
    assert_eq!(
        backing(&q).as_deref(),
        Some(p(&base)),
        "a cancelled stream keeps the backing file"
    );
    progress(&guest, 1);

    // Stream the raw backing file into q.qcow2; the link goes.
    let r = s.ctl(&json!({"cmd": "stream", "name": "q"}));
    assert_eq!(r["ok"], true, "{r}");
    let job = wait_job(&s, r["job"].as_u64().unwrap());
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(job["done"], job["total"], "{job}");
    assert_eq!(backing(&q), None, "the streamed image stands alone");
    progress(&guest, 2);

    guest.send("S");
    guest.wait_exit(Duration::from_secs(180));
    let console = guest.console();
    let summary = gio::assert_clean(&console);
    assert!(summary["gens"] >= 8, "too little work: {summary:?}");
    assert!(s.stop().success(), "spindle serve did not exit 0");

    assert_clean(&q);
    assert_eq!(backing(&q), None);
    let finals = gio::finals(&console);
    let last = &finals["vda"];
    let bad = LAYOUT.check(&LAYOUT.read(&q, dir), 1, |w, g| {
        let (gen, synced) = last[w as usize];
        synced && g == gen
    });
    assert!(bad.is_empty(), "the final image differs from what gio wrote: {bad:#?}");
    // The overlay left behind by the commit is a clean image too.
    assert_clean(&ov);
}

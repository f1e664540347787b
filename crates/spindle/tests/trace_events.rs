//! Named trace events switched on and off through the control socket
//! while `spindle serve` runs (`spindle ctl trace`): a target that is on
//! logs its events for the I/O that follows, one that is off logs
//! nothing, and a flood is limited per call site.

mod common;

use common::nbd::need_tool;
use common::serve::Serve;
use common::{ok, p, scratch};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

/// The target a log line names (`DEBUG spindle::qcow2::alloc: …`), if any.
fn target_of(line: &str) -> Option<&str> {
    let (head, _) = line.split_once(": ")?;
    head.split_whitespace().last().filter(|t| t.starts_with("spindle::"))
}

/// The daemon's log lines of named target `target` or those below it.
fn lines<'a>(log: &'a str, target: &str) -> Vec<&'a str> {
    let below = format!("{target}::");
    log.lines()
        .filter(|l| target_of(l).is_some_and(|t| t == target || t.starts_with(&below)))
        .collect()
}

/// Every line of a named target (`spindle::…`).
fn traced(log: &str) -> usize {
    lines(log, "spindle").len()
}

fn bench(sock: &Path, rw: &str, ios: &str, extra: &[&str]) -> Value {
    let mut args = vec![
        "bench",
        p(sock),
        "--rw",
        rw,
        "--bs",
        "4k",
        "--iodepth",
        "4",
        "--number-ios",
        ios,
        "--size",
        "32M",
        "--runtime",
        "30",
        "--output",
        "json",
    ];
    args.extend_from_slice(extra);
    let v: Value = serde_json::from_str(ok("spindle", &args).trim()).unwrap();
    assert_eq!(v["errors"], json!(0), "{v}");
    v
}

/// qemu-io commands on the NBD export.
fn nbd_io(nsock: &Path, cmds: &[&str]) {
    let uri = format!("nbd+unix:///disk?socket={}", p(nsock));
    let mut args = vec!["-f", "raw", &uri];
    for c in cmds {
        args.extend(["-c", c]);
    }
    ok("qemu-io", &args);
}

fn nbd_write(nsock: &Path, offset: u64) {
    nbd_io(nsock, &[&format!("write -P 0x5a {offset} 64k"), "flush"]);
}

/// Waits until `want` holds for the log, or fails with the log.
fn wait_log(s: &Serve, what: &str, want: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    loop {
        let log = s.log_text();
        if want(&log) {
            return log;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{what}:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn trace_targets_switch_on_and_off_at_run_time() {
    need_tool("qemu-io");
    let dir = scratch();
    let d = dir.path();
    let img = d.join("disk.qcow2");
    ok("spindle", &["img", "create", "-f", "qcow2", p(&img), "64M"]);
    let (sock, ctl, nsock) = (d.join("disk.sock"), d.join("ctl.sock"), d.join("nbd.sock"));
    let nbd = format!("unix:{}", p(&nsock));
    let s = Serve::start(
        d,
        &[p(&img), "--vhost-user", p(&sock), "--control", p(&ctl), "--nbd", &nbd],
        &[&sock, &nsock],
    );

    // Nothing is traced before a target is on. (Reads: the image stays
    // empty, so the writes below allocate and miss the L2 cache.)
    bench(&sock, "randread", "40", &[]);
    nbd_io(&nsock, &["read 0 64k", "flush"]);
    assert_eq!(traced(&s.log_text()), 0, "{}", s.log_text());

    // The filter, and the named targets.
    let r = s.ctl(&json!({"cmd": "trace"}));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(
        (r["filter"].as_str(), r["trace"].as_str()),
        (Some("info"), Some("")),
        "{r}"
    );
    let targets: Vec<&str> = r["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["target"].as_str().unwrap())
        .collect();
    for t in [
        "spindle::qcow2::alloc",
        "spindle::qcow2::l2_miss",
        "spindle::qcow2::flush",
        "spindle::vhost::submit",
    ] {
        assert!(targets.contains(&t), "{r}");
    }

    // A bad filter is refused, naming it, and changes nothing.
    let r = s.ctl(&json!({"cmd": "trace", "filter": "spindle::qcow2=loud"}));
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("bad filter"), "{r}");

    // qcow2 and vhost-user on: a fresh image's writes allocate clusters and
    // L2 tables, miss the L2 cache, and flush.
    let r = s.ctl(&json!({"cmd": "trace", "filter": "spindle::qcow2=debug,spindle::vhost=debug"}));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["filter"], "info,spindle::qcow2=debug,spindle::vhost=debug", "{r}");
    bench(&sock, "randwrite", "40", &["--flush-every", "10"]);
    let log = wait_log(&s, "no vhost-user completions traced", |l| {
        lines(l, "spindle::vhost::complete").len() >= 40 && !lines(l, "spindle::qcow2::flush").is_empty()
    });
    let submit = lines(&log, "spindle::vhost::submit");
    assert!(submit.len() >= 40, "{log}");
    assert!(
        submit
            .iter()
            .any(|l| l.contains("export=disk") && l.contains("op=write") && l.contains("bytes=4096")),
        "{submit:?}"
    );
    let complete = lines(&log, "spindle::vhost::complete");
    assert!(
        complete.iter().all(|l| l.contains("status=") && l.contains("us=")),
        "{complete:?}"
    );
    assert!(
        complete
            .iter()
            .any(|l| l.contains("op=flush") && l.contains("status=ok")),
        "{complete:?}"
    );
    let alloc = lines(&log, "spindle::qcow2::alloc");
    assert!(
        alloc
            .iter()
            .any(|l| l.contains("data clusters allocated") && l.contains("host_offset=")),
        "{alloc:?}"
    );
    assert!(
        lines(&log, "spindle::qcow2::l2_miss")
            .iter()
            .any(|l| l.contains("slice_offset=")),
        "{log}"
    );
    assert!(
        lines(&log, "spindle::qcow2::flush")
            .iter()
            .any(|l| l.contains("l2_slices=")),
        "{log}"
    );
    assert!(lines(&log, "spindle::nbd").is_empty(), "NBD is not on:\n{log}");
    // Every line is DEBUG, one event per line, no colour.
    assert!(!log.contains('\x1b'), "{log}");
    assert!(
        alloc
            .iter()
            .all(|l| l.trim_start().starts_with("DEBUG spindle::qcow2::alloc: ")),
        "{alloc:?}"
    );

    // NBD instead: what `trace` adds replaces what it added before.
    let r = s.ctl(&json!({"cmd": "trace", "filter": "spindle::nbd=debug"}));
    assert_eq!(r["filter"], "info,spindle::nbd=debug", "{r}");
    let before = s.log_text();
    let vhost_before = lines(&before, "spindle::vhost").len();
    bench(&sock, "randwrite", "20", &[]);
    nbd_write(&nsock, 1 << 20);
    let log = wait_log(&s, "no NBD completions traced", |l| {
        lines(l, "spindle::nbd::complete").len() >= 2
    });
    assert_eq!(
        lines(&log, "spindle::vhost").len(),
        vhost_before,
        "vhost-user is off again:\n{log}"
    );
    let nbd = lines(&log, "spindle::nbd::submit");
    assert!(
        nbd.iter().any(|l| l.contains("op=write") && l.contains("len=65536")),
        "{nbd:?}"
    );
    assert!(
        lines(&log, "spindle::nbd::complete")
            .iter()
            .any(|l| l.contains("op=flush") && l.contains("ok=true")),
        "{log}"
    );

    // A flood is limited per call site: at most 200 lines a second, and
    // the first line of the next second counts what was left out.
    s.ctl(&json!({"cmd": "trace", "filter": "spindle::vhost::submit=debug"}));
    let before = lines(&s.log_text(), "spindle::vhost::submit").len();
    let t = Instant::now();
    bench(&sock, "randread", "3000", &[]);
    let secs = t.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(1100));
    bench(&sock, "randread", "1", &[]);
    let log = wait_log(&s, "no line after the flood", |l| {
        lines(l, "spindle::vhost::submit").len() > before
    });
    let flood = &lines(&log, "spindle::vhost::submit")[before..];
    let most = 200 * (secs.ceil() as usize + 2);
    assert!(flood.len() <= most, "{} lines in {secs:.1} s", flood.len());
    if secs < 10.0 {
        // 3000 requests in under 15 s: some were left out, and said so.
        assert!(flood.len() < 3000, "{} lines in {secs:.1} s", flood.len());
        assert!(
            flood.iter().any(|l| l.contains("suppressed=")),
            "{:?}",
            &flood[flood.len().saturating_sub(3)..]
        );
    }

    // Off: nothing more, whatever the I/O.
    let r = s.ctl(&json!({"cmd": "trace", "filter": "off"}));
    assert_eq!(
        (r["filter"].as_str(), r["trace"].as_str()),
        (Some("info"), Some("")),
        "{r}"
    );
    let n = traced(&s.log_text());
    bench(&sock, "randwrite", "40", &["--flush-every", "5"]);
    nbd_write(&nsock, 2 << 20);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(traced(&s.log_text()), n, "lines after `trace off`:\n{}", s.log_text());
    assert!(s.stop().success());
}

//! The metrics endpoint (`spindle serve --metrics`, `metrics =` in the
//! config file): scraped while `spindle bench` (libblkio) runs against a
//! qcow2 and a null export and qemu-io talks NBD, every scrape parsed by
//! the Python `prometheus_client` parsers (Prometheus text and
//! OpenMetrics), and the counters checked against the clients' own
//! counts: exact for requests and bytes, the histograms' counts too, and
//! the same numbers as `spindle ctl stats`. Then hostile clients
//! (garbage, huge heads, slowloris, floods) against the endpoint, which
//! must keep answering.

mod common;

use common::serve::Serve;
use common::{ok, p, run, scratch};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const PY: &str = "/usr/bin/python3";

/// Fails (never skips) without Debian's prometheus_client.
fn need_parser() {
    let has = std::process::Command::new(PY)
        .args([
            "-c",
            "import prometheus_client.parser, prometheus_client.openmetrics.parser",
        ])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has,
        "python3-prometheus-client is required for this test: install it with `apt-get install -y python3-prometheus-client`"
    );
}

/// Where the endpoint listens.
enum Endpoint {
    Tcp(String),
    Unix(PathBuf),
}

/// One HTTP exchange: sends `req`, reads until the server closes.
fn exchange(at: &Endpoint, req: &[u8]) -> Vec<u8> {
    fn go(mut s: impl Read + Write, req: &[u8]) -> Vec<u8> {
        let _ = s.write_all(req);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out
    }
    match at {
        Endpoint::Tcp(a) => {
            let s = TcpStream::connect(a).expect("connect to the metrics endpoint");
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            go(s, req)
        }
        Endpoint::Unix(p) => {
            let s = UnixStream::connect(p).expect("connect to the metrics endpoint");
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            go(s, req)
        }
    }
}

/// Status, headers and body of a reply.
fn split(reply: &[u8]) -> (u16, String, String) {
    let text = String::from_utf8(reply.to_vec()).expect("a UTF-8 reply");
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no head end in {text:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, head.to_string(), body.to_string())
}

/// GET /metrics; the body, checked against its Content-Length.
fn scrape(at: &Endpoint, openmetrics: bool) -> String {
    let accept = if openmetrics {
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    } else {
        "text/plain"
    };
    let req = format!("GET /metrics HTTP/1.1\r\nHost: spindle\r\nAccept: {accept}\r\n\r\n");
    let (status, head, body) = split(&exchange(at, req.as_bytes()));
    assert_eq!(status, 200, "{head}\n{body}");
    let want = if openmetrics {
        "application/openmetrics-text"
    } else {
        "text/plain; version=0.0.4"
    };
    assert!(head.contains(want), "{head}");
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|n| n.trim().parse().ok())
        .expect("Content-Length");
    assert_eq!(len, body.len(), "Content-Length against the body");
    body
}

/// Parses every file with the parser of its format (`.om`: OpenMetrics,
/// else Prometheus text) and returns the samples of the last one, as
/// (name, labels, value).
fn parse_all(files: &[PathBuf]) -> Vec<(String, BTreeMap<String, String>, f64)> {
    const SCRIPT: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families as prom
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om
out = []
for path in sys.argv[1:]:
    text = open(path).read()
    fams = list((om if path.endswith('.om') else prom)(text))
    assert fams, path
    out = [[s.name, s.labels, s.value] for f in fams for s in f.samples]
print(json.dumps(out))
"#;
    let mut args = vec!["-c", SCRIPT];
    args.extend(files.iter().map(|f| p(f)));
    let out = ok(PY, &args);
    let v: Vec<(String, BTreeMap<String, String>, f64)> = serde_json::from_str(&out).expect("parser output");
    assert!(!v.is_empty());
    v
}

/// Sums the samples named `name` whose labels include every `(k, v)`.
fn sum(samples: &[(String, BTreeMap<String, String>, f64)], name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut found = false;
    let total = samples
        .iter()
        .filter(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(v)))
        .map(|(_, _, v)| {
            found = true;
            *v
        })
        .sum();
    assert!(found, "no sample {name} {labels:?}");
    total
}

fn bench(sock: &Path, args: &[&str]) -> Value {
    let mut a = vec!["bench", p(sock), "--output", "json"];
    a.extend_from_slice(args);
    let o = run("spindle", &a);
    let v: Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("bench printed no JSON ({e}): {}", String::from_utf8_lossy(&o.stderr)));
    assert_eq!(v["errors"], json!(0), "{v}");
    v
}

/// Waits for the line the daemon prints for its metrics endpoint.
fn endpoint(s: &Serve) -> String {
    let start = Instant::now();
    loop {
        if let Some(l) = s
            .log_text()
            .lines()
            .find_map(|l| l.strip_prefix("spindle: metrics on "))
        {
            return l.to_string();
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no metrics line:\n{}",
            s.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sums a ctl stats figure over the queues of `frontend`.
fn ctl_sum(st: &Value, frontend: &str, op: &str, field: &str) -> u64 {
    st["queues"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|q| q["frontend"] == json!(frontend))
        .map(|q| q[op][field].as_u64().unwrap())
        .sum()
}

#[test]
fn scrapes_during_a_bench_count_exactly_what_the_clients_did() {
    need_parser();
    common::need("qemu-io");
    let d = scratch();
    let dir = d.path();
    let img = dir.join("disk.qcow2");
    ok("spindle", &["img", "create", "-f", "qcow2", p(&img), "256M"]);
    let (disk_sock, null_sock) = (dir.join("disk.sock"), dir.join("zero.sock"));
    std::fs::write(
        dir.join("s.toml"),
        format!(
            "control = \"ctl.sock\"\nmetrics = \"unix:metrics.sock\"\nnbd = \"unix:{}\"\n\
             [[export]]\nname = \"disk\"\nimage = \"{}\"\nsocket = \"{}\"\nnum_queues = 2\niothreads = 2\n\
             [[export]]\nname = \"zero\"\nimage = \"null:1G\"\nsocket = \"{}\"\n",
            dir.join("nbd.sock").display(),
            img.display(),
            disk_sock.display(),
            null_sock.display()
        ),
    )
    .unwrap();
    let mut s = Serve::start(dir, &["--config", "s.toml"], &[&disk_sock, &null_sock]);
    s.use_control(&dir.join("ctl.sock"));
    let ep = endpoint(&s);
    assert!(ep.contains("metrics.sock"), "{ep}");
    let at = Endpoint::Unix(dir.join("metrics.sock"));

    // Two clients at once: a fixed number of requests on the qcow2 disk
    // (two queues, flushes among the writes), a timed run on the null one.
    let disk = {
        let sock = disk_sock.clone();
        std::thread::spawn(move || {
            bench(
                &sock,
                &[
                    "--rw",
                    "randrw",
                    "--bs",
                    "16k",
                    "--iodepth",
                    "8",
                    "--queues",
                    "2",
                    "--number-ios",
                    "3000",
                    "--flush-every",
                    "40",
                ],
            )
        })
    };
    let zero = {
        let sock = null_sock.clone();
        std::thread::spawn(move || {
            bench(
                &sock,
                &["--rw", "randrw", "--bs", "4k", "--iodepth", "4", "--runtime", "3"],
            )
        })
    };
    let mut files = Vec::new();
    let mut connected_seen = false;
    let mut busy_live = false;
    let mut last_reads = 0.0;
    let mut i = 0;
    while !(disk.is_finished() && zero.is_finished()) {
        let om = i % 2 == 1;
        let text = scrape(&at, om);
        let f = dir.join(format!("scrape-{i}.{}", if om { "om" } else { "txt" }));
        std::fs::write(&f, &text).unwrap();
        // Counters only grow.
        let reads: f64 = text
            .lines()
            .filter(|l| l.starts_with("spindle_disk_reads_completed_total{export=\"zero\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert!(reads >= last_reads, "reads went back from {last_reads} to {reads}");
        last_reads = reads;
        // A connected frontend's I/O thread: its time so far, read live.
        busy_live |= text
            .lines()
            .filter(|l| l.starts_with(r#"spindle_iothread_busy_seconds_total{export="zero""#))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .any(|v| v > 0.0);
        connected_seen |= text
            .lines()
            .any(|l| l == r#"spindle_frontends_connected{export="zero",image="null:1G",frontend="vhost-user"} 1"#);
        files.push(f);
        i += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(i >= 5, "only {i} scrapes while the benches ran");
    assert!(connected_seen, "no scrape saw the null export's frontend connected");
    assert!(
        busy_live,
        "no scrape saw the null export's I/O thread busy while it ran"
    );
    let (disk, zero) = (disk.join().unwrap(), zero.join().unwrap());
    println!("disk bench: {disk}\nnull bench: {zero}");

    // NBD: qemu-io's own requests (and the flush it sends as it closes).
    let nbd = format!("nbd+unix:///zero?socket={}", dir.join("nbd.sock").display());
    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &nbd,
            "-c",
            "write -P 7 0 64k",
            "-c",
            "write -z 1M 128k",
            "-c",
            "discard 2M 64k",
            "-c",
            "read 0 192k",
            "-c",
            "flush",
        ],
    );

    let last = dir.join("final.om");
    std::fs::write(&last, scrape(&at, true)).unwrap();
    let prom = dir.join("final.txt");
    std::fs::write(&prom, scrape(&at, false)).unwrap();
    parse_all(&files);
    let om = parse_all(std::slice::from_ref(&last));
    let samples = parse_all(std::slice::from_ref(&prom));
    let u = |v: &Value| v.as_u64().unwrap() as f64;
    for (name, b, frontend) in [("disk", &disk, "vhost-user"), ("zero", &zero, "vhost-user")] {
        let l = [("export", name), ("frontend", frontend)];
        let got = |m: &str| sum(&samples, m, &l);
        assert_eq!(
            got("spindle_disk_reads_completed_total"),
            u(&b["reads"]),
            "{name} reads"
        );
        assert_eq!(
            got("spindle_disk_read_bytes_total"),
            u(&b["read_bytes"]),
            "{name} read bytes"
        );
        assert_eq!(
            got("spindle_disk_writes_completed_total"),
            u(&b["writes"]),
            "{name} writes"
        );
        assert_eq!(
            got("spindle_disk_written_bytes_total"),
            u(&b["written_bytes"]),
            "{name} written bytes"
        );
        assert_eq!(
            got("spindle_disk_flush_requests_total"),
            u(&b["flushes"]),
            "{name} flushes"
        );
        assert_eq!(got("spindle_disk_errors_total"), 0.0, "{name} errors");
        assert_eq!(got("spindle_disk_io_now"), 0.0, "{name} in flight after the run");
        assert!(got("spindle_disk_read_time_seconds_total") > 0.0);
        assert!(got("spindle_iothread_busy_seconds_total") > 0.0, "{name} busy time");
        assert!(got("spindle_iothread_idle_seconds_total") > 0.0, "{name} idle time");
    }
    assert!(u(&disk["flushes"]) > 0.0 && u(&disk["writes"]) > 0.0 && u(&disk["reads"]) > 0.0);
    // Both queues and both I/O threads of the disk did work.
    for q in ["0", "1"] {
        assert!(
            sum(
                &samples,
                "spindle_disk_reads_completed_total",
                &[("export", "disk"), ("queue", q)]
            ) > 0.0
        );
    }
    for t in ["0", "1"] {
        assert!(
            sum(
                &samples,
                "spindle_iothread_busy_seconds_total",
                &[("export", "disk"), ("thread", t)]
            ) > 0.0,
            "thread {t}"
        );
    }
    // NBD, exactly what qemu-io sent: one of each, and its flushes.
    let n = |m: &str| sum(&samples, m, &[("export", "zero"), ("frontend", "nbd")]);
    assert_eq!(n("spindle_disk_reads_completed_total"), 1.0);
    assert_eq!(n("spindle_disk_read_bytes_total"), 192.0 * 1024.0);
    assert_eq!(n("spindle_disk_writes_completed_total"), 1.0);
    assert_eq!(n("spindle_disk_written_bytes_total"), 64.0 * 1024.0);
    assert_eq!(n("spindle_disk_write_zeroes_completed_total"), 1.0);
    assert_eq!(n("spindle_disk_write_zeroes_bytes_total"), 128.0 * 1024.0);
    assert_eq!(n("spindle_disk_discards_completed_total"), 1.0);
    assert_eq!(n("spindle_disk_discarded_bytes_total"), 64.0 * 1024.0);
    assert!(n("spindle_disk_flush_requests_total") >= 1.0);
    assert!(sum(&samples, "spindle_iothread_idle_seconds_total", &[("frontend", "nbd")]) > 0.0);

    // The histograms hold every request: per export and kind, the +Inf
    // bucket and the count are the requests of every queue and lane.
    for name in ["disk", "zero"] {
        for (op, counter) in [
            ("read", "spindle_disk_reads_completed_total"),
            ("write", "spindle_disk_writes_completed_total"),
            ("flush", "spindle_disk_flush_requests_total"),
            ("discard", "spindle_disk_discards_completed_total"),
            ("write_zeroes", "spindle_disk_write_zeroes_completed_total"),
        ] {
            let e = [("export", name), ("op", op)];
            let requests = sum(&samples, counter, &[("export", name)]);
            let count = sum(&samples, "spindle_disk_request_duration_seconds_count", &e);
            let inf = sum(
                &samples,
                "spindle_disk_request_duration_seconds_bucket",
                &[("export", name), ("op", op), ("le", "+Inf")],
            );
            assert_eq!((count, inf), (requests, requests), "{name} {op}");
            // Cumulative: never decreasing with the bound.
            let mut buckets: Vec<(f64, f64)> = samples
                .iter()
                .filter(|(n, l, _)| {
                    n == "spindle_disk_request_duration_seconds_bucket"
                        && l.get("export").map(String::as_str) == Some(name)
                        && l.get("op").map(String::as_str) == Some(op)
                })
                .map(|(_, l, v)| (l["le"].parse::<f64>().unwrap(), *v))
                .collect();
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            assert_eq!(buckets.len(), 29, "{name} {op}");
            assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "{name} {op}: {buckets:?}");
            let time = sum(
                &samples,
                &format!("spindle_disk_{}_time_seconds_total", time_name(op)),
                &[("export", name)],
            );
            let hsum = sum(&samples, "spindle_disk_request_duration_seconds_sum", &e);
            assert!((time - hsum).abs() < 1e-6, "{name} {op}: {time} against {hsum}");
        }
    }
    // The OpenMetrics scrape says the same.
    for name in ["disk", "zero"] {
        for m in ["spindle_disk_reads_completed_total", "spindle_disk_written_bytes_total"] {
            assert_eq!(
                sum(&om, m, &[("export", name)]),
                sum(&samples, m, &[("export", name)]),
                "{m}"
            );
        }
    }
    // qcow2: writes to a fresh image allocated clusters; its caches were used.
    let q = |m: &str, cache: &str| sum(&samples, m, &[("export", "disk"), ("cache", cache)]);
    assert!(sum(&samples, "spindle_qcow2_allocations_total", &[("export", "disk")]) > 0.0);
    let alloc = sum(&samples, "spindle_qcow2_allocated_bytes_total", &[("export", "disk")]);
    assert!(alloc >= 65536.0, "{alloc}");
    assert!(q("spindle_qcow2_cache_hits_total", "thread") > 0.0);
    assert!(q("spindle_qcow2_cache_misses_total", "thread") > 0.0);
    assert!(q("spindle_qcow2_cache_hits_total", "l2") > 0.0);
    assert!(!samples
        .iter()
        .any(|(n, l, _)| n.starts_with("spindle_qcow2") && l["export"] == "zero"));
    let size = sum(&samples, "spindle_disk_size_bytes", &[("export", "disk")]);
    assert_eq!(size, 256.0 * 1048576.0);

    // ctl stats: the same numbers, from the same counters.
    let st = s.ctl(&json!({"cmd": "stats", "name": "disk"}));
    assert_eq!(st["ok"], json!(true), "{st}");
    for (op, m) in [
        ("read", "spindle_disk_reads_completed_total"),
        ("write", "spindle_disk_writes_completed_total"),
        ("flush", "spindle_disk_flush_requests_total"),
    ] {
        assert_eq!(
            ctl_sum(&st, "vhost-user", op, "requests") as f64,
            sum(&samples, m, &[("export", "disk")]),
            "{op}"
        );
    }
    assert_eq!(
        ctl_sum(&st, "vhost-user", "write", "bytes"),
        disk["written_bytes"].as_u64().unwrap()
    );
    let lat = st["latency"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["op"] == json!("read"))
        .unwrap();
    assert_eq!(lat["count"], disk["reads"], "{lat}");
    let q2 = &st["qcow2"];
    assert_eq!(q2["allocated_bytes"].as_u64().unwrap() as f64, alloc, "{q2}");
    assert_eq!(st["iothreads"].as_array().unwrap().len(), 2, "{st}");
    let zst = s.ctl(&json!({"cmd": "stats", "name": "zero"}));
    assert_eq!(ctl_sum(&zst, "nbd", "read", "bytes"), 192 * 1024, "{zst}");
    assert_eq!(zst["qcow2"], Value::Null);
    assert!(s.stop().success());
    assert!(!dir.join("metrics.sock").exists(), "the metrics socket stays behind");
}

/// The time counter's word for `op` (node_exporter's names).
fn time_name(op: &str) -> &str {
    match op {
        "flush" => "flush_requests",
        other => other,
    }
}

/// A connection that sends `bytes` one at a time, `gap` apart, then
/// waits for the reply; returns its status (0: none) and how long it took.
fn trickle(addr: &str, bytes: &'static [u8], gap: Duration) -> std::thread::JoinHandle<(u16, Duration)> {
    let addr = addr.to_string();
    std::thread::spawn(move || {
        let t = Instant::now();
        let mut s = TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        for b in bytes {
            if s.write_all(&[*b]).is_err() {
                break;
            }
            std::thread::sleep(gap);
        }
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let status = if out.is_empty() { 0 } else { split(&out).0 };
        (status, t.elapsed())
    })
}

#[test]
fn the_endpoint_survives_hostile_clients() {
    need_parser();
    let d = scratch();
    let dir = d.path();
    let sock = dir.join("n.sock");
    let s = Serve::start(
        dir,
        &["null:1G", "--vhost-user", p(&sock), "--metrics", "127.0.0.1:0"],
        &[&sock],
    );
    let ep = endpoint(&s);
    let addr = ep
        .strip_prefix("http://")
        .and_then(|a| a.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("{ep}"))
        .to_string();
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    let at = Endpoint::Tcp(addr.clone());
    let status = |req: &[u8]| split(&exchange(&at, req)).0;

    // Malformed requests get their status and the connection is closed.
    assert_eq!(status(b"\x00\xff\xfegarbage\r\n\r\n"), 400);
    assert_eq!(status(b"GET /metrics\r\n\r\n"), 400);
    assert_eq!(status(b"GET /metrics HTTP/9.9\r\n\r\n"), 400);
    assert_eq!(status(b"GET /metrics HTTP/1.1\r\nno-colon\r\n\r\n"), 400);
    assert_eq!(status(b"GET / HTTP/1.1\r\n\r\n"), 404);
    assert_eq!(status(b"GET /../../etc/passwd HTTP/1.1\r\n\r\n"), 404);
    assert_eq!(status(b"POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"), 405);
    let (st, _, body) = split(&exchange(&at, b"HEAD /metrics HTTP/1.0\r\n\r\n"));
    assert_eq!((st, body.as_str()), (200, ""));
    // A head past 8 KiB: 431, without waiting for the rest of it.
    let mut huge = b"GET /metrics HTTP/1.1\r\nX-Big: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 1 << 20));
    let t = Instant::now();
    let reply = exchange(&at, &huge);
    assert_eq!(split(&reply).0, 431);
    assert!(t.elapsed() < Duration::from_secs(5));
    // Clients that go away early.
    for partial in [&b""[..], b"GET /met", b"GET /metrics HTTP/1.1\r\n"] {
        let mut c = TcpStream::connect(&addr).unwrap();
        c.write_all(partial).unwrap();
        drop(c);
    }

    // The connections above finish (their threads free their slots).
    std::thread::sleep(Duration::from_secs(1));
    // Slowloris: connections trickling a head that never ends hold every
    // slot; a scrape meanwhile gets 503 at once instead of waiting, and
    // the tricklers are cut off (408) once the head deadline (5 s) passes
    // whatever they send, after which scrapes work again.
    let slow: Vec<_> = (0..10)
        .map(|_| {
            trickle(
                &addr,
                b"GET /metrics HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                Duration::from_millis(300),
            )
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    let busy = status(b"GET /metrics HTTP/1.1\r\n\r\n");
    if busy != 503 {
        let r: Vec<_> = slow.into_iter().map(|h| h.join().unwrap()).collect();
        panic!("a scrape got {busy} while slow clients should hold every slot: {r:?}");
    }
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "a busy endpoint must answer at once"
    );
    let results: Vec<(u16, Duration)> = slow.into_iter().map(|h| h.join().unwrap()).collect();
    let cut = results.iter().filter(|(st, _)| *st == 408).count();
    assert_eq!(cut, 8, "one slot each: {results:?}");
    for (st, took) in &results {
        // Cut at the deadline (5 s, then at most 2 s reading what else
        // it sends, so the reply is not lost to a reset) rather than
        // after the 16 s the head would take.
        assert!(
            *st == 503 || (*st == 408 && *took < Duration::from_secs(10)),
            "{results:?}"
        );
    }

    // A flood of scrapes: every one answered, 200 or 503, none hangs.
    let flood: Vec<_> = (0..40)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || split(&exchange(&Endpoint::Tcp(addr), b"GET /metrics HTTP/1.1\r\n\r\n")).0)
        })
        .collect();
    let codes: Vec<u16> = flood.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(codes.iter().all(|c| *c == 200 || *c == 503), "{codes:?}");
    assert!(codes.contains(&200), "{codes:?}");

    // Still serving: metrics parse, the disk answers, the daemon stops cleanly.
    let f = dir.join("after.txt");
    std::fs::write(&f, scrape(&at, false)).unwrap();
    let samples = parse_all(&[f]);
    let b = bench(
        &sock,
        &[
            "--rw",
            "randread",
            "--bs",
            "4k",
            "--iodepth",
            "2",
            "--number-ios",
            "100",
        ],
    );
    let f = dir.join("after2.om");
    std::fs::write(&f, scrape(&at, true)).unwrap();
    let after = parse_all(&[f]);
    assert_eq!(sum(&samples, "spindle_disk_reads_completed_total", &[]), 0.0);
    assert_eq!(
        sum(&after, "spindle_disk_reads_completed_total", &[]),
        b["reads"].as_u64().unwrap() as f64
    );
    assert!(s.stop().success());
}

/// A non-loopback address is served, with a warning; a bad one is
/// refused before anything is opened.
#[test]
fn addresses_off_loopback_warn_and_bad_ones_are_refused() {
    let d = scratch();
    let dir = d.path();
    let sock = dir.join("n.sock");
    let o = run(
        "spindle",
        &[
            "serve",
            "null:1G",
            "--vhost-user",
            p(&sock),
            "--metrics",
            "127.0.0.1:notaport",
        ],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--metrics 127.0.0.1:notaport"),
        "{o:?}"
    );
    assert!(!sock.exists(), "the export was started before the address was checked");
    let s = Serve::start(
        dir,
        &["null:1G", "--vhost-user", p(&sock), "--metrics", "0.0.0.0:0"],
        &[&sock],
    );
    let ep = endpoint(&s);
    assert!(s.log_text().contains("listens on every interface"), "{}", s.log_text());
    let port = ep.rsplit(':').next().unwrap().trim_end_matches("/metrics");
    let body = scrape(&Endpoint::Tcp(format!("127.0.0.1:{port}")), false);
    assert!(body.contains("spindle_disk_reads_completed_total"));
    assert!(s.stop().success());
}

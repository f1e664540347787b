//! The daemon's figures, read at one moment: what `spindle ctl stats`
//! shows (JSON) and what `--metrics ADDR` exports (Prometheus text
//! exposition, through the `prometheus-client` crate). Both read the
//! same counters ([`spindle_export::stats`], [`spindle_io::ThreadTimes`],
//! [`spindle_block::Node::qcow2_counters`]) through [`ExportMetrics`],
//! so they cannot disagree. Names and labels are in docs/operations.md,
//! "Metrics".

pub mod http;
pub mod listen;

use super::server::Server;
use super::spec::ExportSpec;
use crate::error::{CliResult, Error};
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use serde::Serialize;
use spindle_export::stats::{Latency, Op, QueueSnapshot, LATENCY_BOUNDS_NS};
use spindle_io::ThreadTimesSnapshot;
use spindle_vhost::Export;

/// The `frontend` label of vhost-user queues and threads.
pub const VHOST_USER: &str = "vhost-user";
/// The `frontend` label of NBD lanes and threads.
pub const NBD: &str = "nbd";

/// Which front end talks to the image.
#[derive(Debug, Clone, Serialize)]
pub struct Frontends {
    /// A vhost-user frontend (QEMU) is connected now.
    pub vhost_user_connected: bool,
    /// vhost-user connections served since the export started.
    pub vhost_user_connections: u64,
    /// NBD clients connected now.
    pub nbd_connections: usize,
}

/// One queue's (vhost-user) or lane's (NBD I/O thread) counters.
#[derive(Debug, Clone, Serialize)]
pub struct QueueMetrics {
    /// `vhost-user` or `nbd`.
    pub frontend: &'static str,
    /// The virtqueue, or the NBD I/O thread.
    pub queue: usize,
    /// Its counters.
    #[serde(flatten)]
    pub counts: QueueSnapshot,
}

/// Where one I/O thread's time went, in nanoseconds.
#[derive(Debug, Clone, Serialize)]
pub struct ThreadMetrics {
    /// `vhost-user` (the export's own threads) or `nbd` (the daemon's
    /// NBD threads, shared by every export).
    pub frontend: &'static str,
    /// Its number.
    pub thread: usize,
    /// Running.
    pub busy_ns: u64,
    /// Asleep, waiting for work.
    pub idle_ns: u64,
    /// Spinning for work before sleeping.
    pub poll_ns: u64,
}

impl ThreadMetrics {
    fn new(frontend: &'static str, thread: usize, t: ThreadTimesSnapshot) -> ThreadMetrics {
        ThreadMetrics {
            frontend,
            thread,
            busy_ns: t.busy_ns,
            idle_ns: t.idle_ns,
            poll_ns: t.poll_ns,
        }
    }
}

/// A qcow2 image's metadata caches and allocator, since it was opened
/// (the active layer only).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Qcow2Metrics {
    /// Guest clusters mapped from an I/O thread's own L2 entry cache.
    pub thread_cache_hits: u64,
    /// Requests that cache could not map wholly (the metadata lock taken).
    pub thread_cache_misses: u64,
    /// L2 slices found in the L2 cache.
    pub l2_cache_hits: u64,
    /// L2 slices read from the image.
    pub l2_cache_misses: u64,
    /// Refcount blocks found in the refcount cache.
    pub refcount_cache_hits: u64,
    /// Refcount blocks read from the image.
    pub refcount_cache_misses: u64,
    /// Runs of host clusters allocated.
    pub allocations: u64,
    /// Bytes of host clusters allocated.
    pub allocated_bytes: u64,
}

impl From<spindle_block::formats::qcow2::Qcow2Counters> for Qcow2Metrics {
    fn from(c: spindle_block::formats::qcow2::Qcow2Counters) -> Self {
        Qcow2Metrics {
            thread_cache_hits: c.thread_cache_hits,
            thread_cache_misses: c.thread_cache_misses,
            l2_cache_hits: c.l2_cache_hits,
            l2_cache_misses: c.l2_cache_misses,
            refcount_cache_hits: c.refcount_cache_hits,
            refcount_cache_misses: c.refcount_cache_misses,
            allocations: c.allocations,
            allocated_bytes: c.allocated_bytes,
        }
    }
}

/// Every figure of one export.
#[derive(Debug, Clone, Serialize)]
pub struct ExportMetrics {
    /// Export name.
    pub name: String,
    /// Its image, as served now.
    pub image: String,
    /// `raw` or `qcow2`.
    pub format: &'static str,
    /// Guest-visible size in bytes.
    pub size: u64,
    /// Who is connected.
    pub frontends: Frontends,
    /// Per vhost-user queue, then per NBD lane (when offered over NBD).
    pub queues: Vec<QueueMetrics>,
    /// Latency histograms per kind of request, over every queue and lane:
    /// cumulative counts below each of [`LATENCY_BOUNDS_NS`].
    pub latency: Vec<Latency>,
    /// The export's vhost-user I/O threads.
    pub iothreads: Vec<ThreadMetrics>,
    /// qcow2 caches and allocations; `None` for raw images (or while the
    /// image is closed for a migration).
    pub qcow2: Option<Qcow2Metrics>,
}

/// Every figure of the daemon.
#[derive(Debug, Clone)]
pub struct Scrape {
    /// Each running export.
    pub exports: Vec<ExportMetrics>,
    /// The NBD server's I/O threads (daemon-wide).
    pub nbd_iothreads: Vec<ThreadMetrics>,
}

/// The NBD server's I/O threads' times (none without `--nbd`).
pub fn nbd_iothreads(server: &Server) -> Vec<ThreadMetrics> {
    server.nbd().map_or_else(Vec::new, |f| {
        f.thread_times()
            .into_iter()
            .enumerate()
            .map(|(i, t)| ThreadMetrics::new(NBD, i, t))
            .collect()
    })
}

fn of(server: &Server, spec: &ExportSpec, e: &Export) -> ExportMetrics {
    let d = &e.dev;
    let name = &d.cfg.name;
    let nbd = server.nbd().and_then(|f| f.connections(name).map(|c| (f, c)));
    let mut queues: Vec<QueueMetrics> = d
        .queue_snapshots()
        .into_iter()
        .enumerate()
        .map(|(queue, counts)| QueueMetrics {
            frontend: VHOST_USER,
            queue,
            counts,
        })
        .collect();
    if let Some((front, _)) = nbd {
        queues.extend(
            d.lane_snapshots(front.options().iothreads)
                .into_iter()
                .enumerate()
                .map(|(queue, counts)| QueueMetrics {
                    frontend: NBD,
                    queue,
                    counts,
                }),
        );
    }
    ExportMetrics {
        name: name.clone(),
        image: spec.image.clone(),
        format: d.slot.info().format,
        size: d.capacity(),
        frontends: Frontends {
            vhost_user_connected: e.is_connected(),
            vhost_user_connections: e.connections(),
            nbd_connections: nbd.map_or(0, |(_, c)| c),
        },
        queues,
        latency: d.latencies(),
        iothreads: d
            .threads()
            .iter()
            .enumerate()
            .map(|(i, t)| ThreadMetrics::new(VHOST_USER, i, t.snapshot()))
            .collect(),
        qcow2: d.node().and_then(|n| n.qcow2_counters()).map(Into::into),
    }
}

/// The figures of the running export `name`.
pub fn export(server: &Server, name: &str) -> CliResult<ExportMetrics> {
    let (e, _) = server.running(name)?;
    let spec = server
        .exports()
        .into_iter()
        .find(|(_, x)| std::sync::Arc::ptr_eq(x, &e))
        .map(|(s, _)| s)
        .ok_or_else(|| Error::Refused(format!("export '{name}' is being removed")))?;
    Ok(of(server, &spec, &e))
}

/// Every running export's figures, and the NBD threads'.
pub fn gather(server: &Server) -> Scrape {
    let mut exports: Vec<ExportMetrics> = server.exports().iter().map(|(s, e)| of(server, s, e)).collect();
    exports.sort_by(|a, b| a.name.cmp(&b.name));
    Scrape {
        exports,
        nbd_iothreads: nbd_iothreads(server),
    }
}

/// What `ctl stats` adds to its reply: the export's figures, and the
/// daemon's NBD threads.
pub fn stats_json(server: &Server, name: &str) -> CliResult<serde_json::Map<String, serde_json::Value>> {
    let m = export(server, name)?;
    let mut v = match serde_json::to_value(&m) {
        Ok(serde_json::Value::Object(o)) => o,
        _ => serde_json::Map::new(),
    };
    v.remove("name");
    v.insert("latency_bounds_ns".into(), serde_json::json!(LATENCY_BOUNDS_NS));
    v.insert("nbd_iothreads".into(), serde_json::json!(nbd_iothreads(server)));
    Ok(v)
}

/// Exposition formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text format 0.0.4.
    Prometheus,
    /// OpenMetrics 1.0 text.
    OpenMetrics,
}

impl Format {
    /// The HTTP Content-Type.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// `scrape` in `format`.
pub fn encode(scrape: Scrape, format: Format) -> String {
    let mut r = Registry::default();
    r.register_collector(Box::new(scrape));
    let mut out = String::new();
    let res = match format {
        Format::Prometheus => prometheus_client::encoding::prometheus_text::encode(&mut out, &r),
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &r),
    };
    if res.is_err() {
        // Writing to a String does not fail; say so rather than send half.
        out = "# encoding failed\n".into();
    }
    out
}

type Labels = Vec<(&'static str, String)>;

fn export_labels(e: &ExportMetrics) -> Labels {
    vec![("export", e.name.clone()), ("image", e.image.clone())]
}

fn with(mut l: Labels, k: &'static str, v: impl ToString) -> Labels {
    l.push((k, v.to_string()));
    l
}

/// A value of a sample.
#[derive(Clone, Copy)]
enum V {
    U(u64),
    F(f64),
}

fn secs(ns: u64) -> V {
    V::F(ns as f64 / 1e9)
}

/// One metric family: its descriptor, then each sample.
fn family(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    ty: MetricType,
    samples: &[(Labels, V)],
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, unit.as_ref(), ty)?;
    for (labels, v) in samples {
        let fam = m.encode_family(labels)?;
        sample(fam, ty, *v)?;
    }
    Ok(())
}

fn sample(m: MetricEncoder, ty: MetricType, v: V) -> std::fmt::Result {
    match (ty, v) {
        (MetricType::Counter, V::U(n)) => ConstCounter::new(n).encode(m),
        (MetricType::Counter, V::F(x)) => ConstCounter::new(x).encode(m),
        (_, V::U(n)) => ConstGauge::new(n as i64).encode(m),
        (_, V::F(x)) => ConstGauge::new(x).encode(m),
    }
}

/// The per-queue counters: name (before its unit and `_total`), help,
/// unit, and the figure.
type QueueFigure = (
    &'static str,
    &'static str,
    Option<fn() -> Unit>,
    fn(&QueueSnapshot) -> V,
);

const QUEUE_COUNTERS: &[QueueFigure] = &[
    (
        "spindle_disk_reads_completed",
        "Reads finished (failed ones too).",
        None,
        |q| V::U(q.read.requests),
    ),
    (
        "spindle_disk_read",
        "Bytes read by reads that succeeded.",
        Some(|| Unit::Bytes),
        |q| V::U(q.read.bytes),
    ),
    (
        "spindle_disk_read_time",
        "Latency of every read, summed (throttled time excluded).",
        Some(|| Unit::Seconds),
        |q| secs(q.read.time_ns),
    ),
    (
        "spindle_disk_writes_completed",
        "Writes finished (failed ones too).",
        None,
        |q| V::U(q.write.requests),
    ),
    (
        "spindle_disk_written",
        "Bytes written by writes that succeeded.",
        Some(|| Unit::Bytes),
        |q| V::U(q.write.bytes),
    ),
    (
        "spindle_disk_write_time",
        "Latency of every write, summed (throttled time excluded).",
        Some(|| Unit::Seconds),
        |q| secs(q.write.time_ns),
    ),
    (
        "spindle_disk_flush_requests",
        "Flushes finished (failed ones too).",
        None,
        |q| V::U(q.flush.requests),
    ),
    (
        "spindle_disk_flush_requests_time",
        "Latency of every flush, summed.",
        Some(|| Unit::Seconds),
        |q| secs(q.flush.time_ns),
    ),
    (
        "spindle_disk_discards_completed",
        "Discards finished (failed ones too).",
        None,
        |q| V::U(q.discard.requests),
    ),
    (
        "spindle_disk_discarded",
        "Bytes of the discards that succeeded.",
        Some(|| Unit::Bytes),
        |q| V::U(q.discard.bytes),
    ),
    (
        "spindle_disk_discard_time",
        "Latency of every discard, summed (throttled time excluded).",
        Some(|| Unit::Seconds),
        |q| secs(q.discard.time_ns),
    ),
    (
        "spindle_disk_write_zeroes_completed",
        "Write-zeroes finished (failed ones too).",
        None,
        |q| V::U(q.write_zeroes.requests),
    ),
    (
        "spindle_disk_write_zeroes",
        "Bytes of the write-zeroes that succeeded.",
        Some(|| Unit::Bytes),
        |q| V::U(q.write_zeroes.bytes),
    ),
    (
        "spindle_disk_write_zeroes_time",
        "Latency of every write-zeroes, summed (throttled time excluded).",
        Some(|| Unit::Seconds),
        |q| secs(q.write_zeroes.time_ns),
    ),
    (
        "spindle_disk_other_requests",
        "Other requests finished: GET_ID, NBD block status, requests refused before they reached the image.",
        None,
        |q| V::U(q.other.requests),
    ),
    (
        "spindle_disk_throttled_requests",
        "Requests that waited for the export's throttle.",
        None,
        |q| V::U(q.throttled_requests),
    ),
    (
        "spindle_disk_throttled_time",
        "Time requests waited for the throttle, summed.",
        Some(|| Unit::Seconds),
        |q| secs(q.throttled_ns),
    ),
];

impl prometheus_client::collector::Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let queue_labels = |e: &ExportMetrics, q: &QueueMetrics| {
            with(with(export_labels(e), "frontend", q.frontend), "queue", q.queue)
        };
        for &(name, help, unit, f) in QUEUE_COUNTERS {
            let samples: Vec<(Labels, V)> = self
                .exports
                .iter()
                .flat_map(|e| e.queues.iter().map(move |q| (queue_labels(e, q), f(&q.counts))))
                .collect();
            family(&mut enc, name, help, unit.map(|u| u()), MetricType::Counter, &samples)?;
        }
        let errors: Vec<(Labels, V)> = self
            .exports
            .iter()
            .flat_map(|e| {
                e.queues.iter().flat_map(move |q| {
                    Op::ALL
                        .iter()
                        .map(move |&op| (with(queue_labels(e, q), "op", op.name()), V::U(q.counts.op(op).errors)))
                })
            })
            .collect();
        family(
            &mut enc,
            "spindle_disk_errors",
            "Requests that failed, by kind.",
            None,
            MetricType::Counter,
            &errors,
        )?;
        let now: Vec<(Labels, V)> = self
            .exports
            .iter()
            .flat_map(|e| {
                e.queues
                    .iter()
                    .map(move |q| (queue_labels(e, q), V::U(q.counts.in_flight)))
            })
            .collect();
        family(
            &mut enc,
            "spindle_disk_io_now",
            "Requests in flight now.",
            None,
            MetricType::Gauge,
            &now,
        )?;

        // Latency histograms, per export and kind of request.
        let mut m = enc.encode_descriptor(
            "spindle_disk_request_duration",
            "Request latency from pop (vhost-user) or gate pass (NBD) to completion, throttled time excluded.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for e in &self.exports {
            for l in &e.latency {
                let labels = with(export_labels(e), "op", l.op);
                let mut buckets = Vec::with_capacity(l.buckets.len() + 1);
                let mut below = 0;
                for (&bound, &cum) in LATENCY_BOUNDS_NS.iter().zip(&l.buckets) {
                    buckets.push((bound as f64 / 1e9, cum - below));
                    below = cum;
                }
                buckets.push((f64::INFINITY, l.count - below));
                m.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
                    l.sum_ns as f64 / 1e9,
                    l.count,
                    &buckets,
                    None,
                )?;
            }
        }

        let per_export = |f: fn(&ExportMetrics) -> V| -> Vec<(Labels, V)> {
            self.exports.iter().map(|e| (export_labels(e), f(e))).collect()
        };
        family(
            &mut enc,
            "spindle_disk_size",
            "Guest-visible size.",
            Some(Unit::Bytes),
            MetricType::Gauge,
            &per_export(|e| V::U(e.size)),
        )?;
        let connected: Vec<(Labels, V)> = self
            .exports
            .iter()
            .flat_map(|e| {
                [
                    (
                        with(export_labels(e), "frontend", VHOST_USER),
                        V::U(e.frontends.vhost_user_connected.into()),
                    ),
                    (
                        with(export_labels(e), "frontend", NBD),
                        V::U(e.frontends.nbd_connections as u64),
                    ),
                ]
            })
            .collect();
        family(
            &mut enc,
            "spindle_frontends_connected",
            "Frontends connected now (vhost-user: 0 or 1; NBD: clients).",
            None,
            MetricType::Gauge,
            &connected,
        )?;
        let conns: Vec<(Labels, V)> = self
            .exports
            .iter()
            .map(|e| {
                (
                    with(export_labels(e), "frontend", VHOST_USER),
                    V::U(e.frontends.vhost_user_connections),
                )
            })
            .collect();
        family(
            &mut enc,
            "spindle_frontend_connections",
            "vhost-user frontend connections served since the export started.",
            None,
            MetricType::Counter,
            &conns,
        )?;

        // qcow2 caches and allocator.
        let qcow2: Vec<(&ExportMetrics, Qcow2Metrics)> =
            self.exports.iter().filter_map(|e| e.qcow2.map(|q| (e, q))).collect();
        let caches = |hits: bool| -> Vec<(Labels, V)> {
            qcow2
                .iter()
                .flat_map(|(e, q)| {
                    let v = if hits {
                        [q.thread_cache_hits, q.l2_cache_hits, q.refcount_cache_hits]
                    } else {
                        [q.thread_cache_misses, q.l2_cache_misses, q.refcount_cache_misses]
                    };
                    ["thread", "l2", "refcount"]
                        .into_iter()
                        .zip(v)
                        .map(|(c, n)| (with(export_labels(e), "cache", c), V::U(n)))
                })
                .collect()
        };
        family(&mut enc, "spindle_qcow2_cache_hits", "qcow2 metadata cache hits: thread = guest clusters mapped from an I/O thread's own L2 entry cache; l2 = L2 slices, refcount = refcount blocks found in the image's caches.", None, MetricType::Counter, &caches(true))?;
        family(&mut enc, "spindle_qcow2_cache_misses", "qcow2 metadata cache misses: thread = requests that took the metadata lock; l2, refcount = pieces read from the image.", None, MetricType::Counter, &caches(false))?;
        let alloc = |f: fn(&Qcow2Metrics) -> u64| -> Vec<(Labels, V)> {
            qcow2.iter().map(|(e, q)| (export_labels(e), V::U(f(q)))).collect()
        };
        family(
            &mut enc,
            "spindle_qcow2_allocations",
            "Runs of host clusters the qcow2 allocator handed out.",
            None,
            MetricType::Counter,
            &alloc(|q| q.allocations),
        )?;
        family(
            &mut enc,
            "spindle_qcow2_allocated",
            "Bytes of host clusters the qcow2 allocator handed out.",
            Some(Unit::Bytes),
            MetricType::Counter,
            &alloc(|q| q.allocated_bytes),
        )?;

        // I/O threads: the exports' vhost-user ones, and the NBD server's.
        let threads = |f: fn(&ThreadMetrics) -> u64| -> Vec<(Labels, V)> {
            let vhost = self.exports.iter().flat_map(|e| {
                e.iothreads.iter().map(move |t| {
                    (
                        with(with(export_labels(e), "frontend", t.frontend), "thread", t.thread),
                        secs(f(t)),
                    )
                })
            });
            let nbd = self.nbd_iothreads.iter().map(|t| {
                (
                    with(vec![("frontend", t.frontend.to_string())], "thread", t.thread),
                    secs(f(t)),
                )
            });
            vhost.chain(nbd).collect()
        };
        family(
            &mut enc,
            "spindle_iothread_busy",
            "Time an I/O thread ran (requests, submissions, completions).",
            Some(Unit::Seconds),
            MetricType::Counter,
            &threads(|t| t.busy_ns),
        )?;
        family(
            &mut enc,
            "spindle_iothread_idle",
            "Time an I/O thread slept waiting for work.",
            Some(Unit::Seconds),
            MetricType::Counter,
            &threads(|t| t.idle_ns),
        )?;
        family(
            &mut enc,
            "spindle_iothread_polling",
            "Time an I/O thread spun for work before sleeping.",
            Some(Unit::Seconds),
            MetricType::Counter,
            &threads(|t| t.poll_ns),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spindle_export::stats::QueueStats;

    fn scrape() -> Scrape {
        let q = QueueStats::default();
        for ns in [300, 5_000, 5_000, 70_000] {
            q.start();
            q.record(Op::Read, 4096, true, ns);
        }
        q.start();
        q.record(Op::Write, 512, false, 1_000);
        q.start();
        let counts = q.snapshot();
        Scrape {
            exports: vec![ExportMetrics {
                name: "vm1".into(),
                image: "/var/lib/a \"b\".qcow2".into(),
                format: "qcow2",
                size: 1 << 30,
                frontends: Frontends {
                    vhost_user_connected: true,
                    vhost_user_connections: 2,
                    nbd_connections: 0,
                },
                queues: vec![QueueMetrics {
                    frontend: VHOST_USER,
                    queue: 0,
                    counts,
                }],
                latency: spindle_export::stats::latencies(&[&q]),
                iothreads: vec![ThreadMetrics::new(
                    VHOST_USER,
                    0,
                    ThreadTimesSnapshot {
                        busy_ns: 1_500_000_000,
                        idle_ns: 2,
                        poll_ns: 3,
                    },
                )],
                qcow2: Some(Qcow2Metrics {
                    thread_cache_hits: 7,
                    thread_cache_misses: 1,
                    l2_cache_hits: 5,
                    l2_cache_misses: 2,
                    refcount_cache_hits: 0,
                    refcount_cache_misses: 1,
                    allocations: 3,
                    allocated_bytes: 3 << 16,
                }),
            }],
            nbd_iothreads: vec![ThreadMetrics::new(NBD, 0, ThreadTimesSnapshot::default())],
        }
    }

    #[test]
    fn the_exposition_has_every_figure_under_its_name() {
        let text = encode(scrape(), Format::Prometheus);
        let l = r#"export="vm1",image="/var/lib/a \"b\".qcow2""#;
        let q = format!(r#"{l},frontend="vhost-user",queue="0""#);
        for line in [
            format!("spindle_disk_reads_completed_total{{{q}}} 4"),
            format!("spindle_disk_read_bytes_total{{{q}}} 16384"),
            format!("spindle_disk_read_time_seconds_total{{{q}}} 0.0000803"),
            format!("spindle_disk_writes_completed_total{{{q}}} 1"),
            format!("spindle_disk_written_bytes_total{{{q}}} 0"),
            format!(r#"spindle_disk_errors_total{{{q},op="write"}} 1"#),
            format!("spindle_disk_io_now{{{q}}} 1"),
            format!(r#"spindle_disk_request_duration_seconds_bucket{{{l},op="read",le="2.56e-07"}} 0"#),
            format!(r#"spindle_disk_request_duration_seconds_bucket{{{l},op="read",le="5.12e-07"}} 1"#),
            format!(r#"spindle_disk_request_duration_seconds_bucket{{{l},op="read",le="8.192e-06"}} 3"#),
            format!(r#"spindle_disk_request_duration_seconds_bucket{{{l},op="read",le="0.000131072"}} 4"#),
            format!(r#"spindle_disk_request_duration_seconds_bucket{{{l},op="read",le="+Inf"}} 4"#),
            format!(r#"spindle_disk_request_duration_seconds_count{{{l},op="read"}} 4"#),
            format!("spindle_disk_size_bytes{{{l}}} 1073741824"),
            format!(r#"spindle_frontends_connected{{{l},frontend="vhost-user"}} 1"#),
            format!(r#"spindle_frontend_connections_total{{{l},frontend="vhost-user"}} 2"#),
            format!(r#"spindle_qcow2_cache_hits_total{{{l},cache="thread"}} 7"#),
            format!(r#"spindle_qcow2_cache_misses_total{{{l},cache="l2"}} 2"#),
            format!("spindle_qcow2_allocated_bytes_total{{{l}}} 196608"),
            format!(r#"spindle_iothread_busy_seconds_total{{{l},frontend="vhost-user",thread="0"}} 1.5"#),
            r#"spindle_iothread_idle_seconds_total{frontend="nbd",thread="0"} 0.0"#.to_string(),
        ] {
            assert!(text.lines().any(|x| x == line), "missing {line}\n{text}");
        }
        // One TYPE line per family, every family's samples together.
        let types: Vec<&str> = text.lines().filter(|x| x.starts_with("# TYPE")).collect();
        let mut uniq = types.clone();
        uniq.dedup();
        assert_eq!(types.len(), uniq.len());
        let om = encode(scrape(), Format::OpenMetrics);
        assert!(om.ends_with("# EOF\n"));
        assert!(om.contains("# UNIT spindle_disk_read_bytes bytes\n"), "{om}");
    }
}

#!/usr/bin/env python3
"""Ceph RBD (issue 14): spindle serve vs qemu-storage-daemon's rbd driver
vs fio's rbd engine, on the same cluster and the same image.

The script boots a single-node memstore cluster (tests/ceph/cluster.sh) in
a temporary directory under DIR, creates one image, fills it with a
sequential write (so reads hit data) and stops the cluster at the end.
Spindle (`spindle serve rbd:…`, one I/O thread, one queue) and
qemu-storage-daemon (driver=rbd, one iothread) export the image over
vhost-user-blk and are driven by the same client, `spindle bench`
(libblkio); fio's rbd engine (one job, librbd in the client's own
process, no vhost-user hop) is the client-side limit. All three use
librbd with its cache off (cache=none: Spindle and QEMU turn rbd_cache
off themselves; fio reads it from the conf written here).

For each row the three run one after another, in an order that rotates
per repetition, each on a freshly started server. The table shows each
one's median of REPS and, for Spindle against qsd and against fio, the
mean of the per-repetition ratios with its 95% confidence interval
(Student's t). CPU per request: the server process's user+system time
during the client's run (from /proc/PID/stat; librbd's threads live in
it) over the requests done, for Spindle and qsd. The client's own CPU
(RUSAGE_CHILDREN around its run) is reported in the second table: for
fio that is its whole cost (fio + librbd in one process), for the
others it is `spindle bench` alone, so client+server is the comparable
total. The OSD's CPU per request is there too (the cluster's side, the
same work for all three). Everything also goes to DIR/results.json.

  bench/rbd.py [DIR]   (default /var/tmp/spindle-bench-rbd)
  env: REPS=5 RUNTIME=5 SIZE_MB=1024 ROWS=substring SPINDLE=path
       CACHE=none|writeback (writeback: librbd's cache on for all three)
       SERVE="extra spindle serve options" (e.g. SERVE="--poll-us 0")
"""
import atexit, ctypes, json, os, resource, shutil, signal, statistics, subprocess, sys, tempfile, time

import vhost
from vhost import ci95

DIR = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "/var/tmp/spindle-bench-rbd")
REPS = int(os.environ.get("REPS", "5"))
RUNTIME = os.environ.get("RUNTIME", "5")
SIZE_MB = int(os.environ.get("SIZE_MB", "1024"))
ROWS = os.environ.get("ROWS", "")
CACHE = os.environ.get("CACHE", "none")
SERVE = os.environ.get("SERVE", "").split()
SP = os.environ.get("SPINDLE", vhost.SPINDLE)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER_SH = os.path.join(ROOT, "tests/ceph/cluster.sh")
SOCK = os.path.join(DIR, "rbd.sock")
POOL, IMAGE = "rbd", "bench"
KINDS = ["spindle", "qsd", "fio"]
NAMES = {"spindle": "Spindle", "qsd": "qsd driver=rbd", "fio": "fio rbd engine"}

# Set by main: the cluster's directory and the conf the clients use.
CLUSTER = None
CONF = None
LIVE = set()  # servers running now (Popen)
DONE = False  # a clean end: the cluster's directory goes too


def sh(*args, env=None):
    return subprocess.run(args, check=True, capture_output=True, text=True, env=env).stdout


def die_with_parent():
    """In the child before exec: die when this script does, even by SIGKILL."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def cpu_s(pid):
    return vhost.cpu_s(pid)


def osd_pid():
    with open(os.path.join(CLUSTER, "run", "osd.0.pid")) as f:
        return int(f.read())


def children_cpu_s():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def watchers():
    """The image's watchers (each open client has one)."""
    out = sh("rbd", "-c", CONF, "status", f"{POOL}/{IMAGE}", "--format", "json")
    return json.loads(out).get("watchers", [])


def wait_image_free(timeout=45):
    """Waits until no client has the image open: a server killed without
    closing leaves its watch (and perhaps the exclusive lock) until the
    OSD times it out (30 s), and the next writer would wait for it."""
    deadline = time.monotonic() + timeout
    while watchers():
        if time.monotonic() > deadline:
            sys.exit(f"image {POOL}/{IMAGE} still has watchers after {timeout} s: {watchers()}")
        time.sleep(0.2)


def start(kind, n):
    """Serves the image with `kind` ("spindle" or "qsd") on SOCK."""
    wait_image_free()
    if os.path.exists(SOCK):
        os.unlink(SOCK)
    if kind == "spindle":
        args = [SP, "serve", f"rbd:{POOL}/{IMAGE}:conf={CONF}", "--vhost-user", SOCK, "--format", "raw",
                "--iothreads", "1", "--num-queues", "1", "--cache", CACHE, *SERVE]
    else:
        direct = "on" if CACHE == "none" else "off"
        args = ["qemu-storage-daemon",
                "--blockdev", f"driver=rbd,node-name=disk,pool={POOL},image={IMAGE},conf={CONF},"
                              f"cache.direct={direct}",
                "--object", "iothread,id=iot0",
                "--export", f"type=vhost-user-blk,id=e0,node-name=disk,addr.type=unix,addr.path={SOCK},"
                            "writable=on,iothread=iot0"]
    log = open(os.path.join(DIR, "log", f"{kind}.{n}.log"), "w")
    p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                         preexec_fn=die_with_parent)
    log.close()
    LIVE.add(p)
    deadline = time.monotonic() + 60
    while not os.path.exists(SOCK):
        if p.poll() is not None:
            LIVE.discard(p)
            sys.exit(f"{kind} exited early ({p.returncode}): {' '.join(args)}\n{tail(kind, n)}")
        if time.monotonic() > deadline:
            sys.exit(f"{kind}: no socket after 60 s: {' '.join(args)}\n{tail(kind, n)}")
        time.sleep(0.01)
    return p


def tail(kind, n):
    with open(os.path.join(DIR, "log", f"{kind}.{n}.log")) as f:
        return "".join(f.readlines()[-20:])


def stop(p, timeout=15):
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # qemu-storage-daemon 7.2 sometimes ignores SIGTERM after its
            # client left; the next start waits for its watch to expire.
            p.kill()
            p.wait()
    LIVE.discard(p)


def timed(args, env=None):
    """Runs a client; its stdout and its own CPU seconds."""
    before = children_cpu_s()
    out = subprocess.run(args, check=True, capture_output=True, text=True, env=env, preexec_fn=die_with_parent)
    return out.stdout, children_cpu_s() - before


def spindle_bench(rw, bs, qd):
    out, cpu = timed([SP, "bench", SOCK, "--rw", rw, "--bs", bs, "--iodepth", str(qd), "--runtime", RUNTIME,
                      "--output", "json"])
    r = json.loads(out)
    assert r["errors"] == 0, r
    return {"ios": r["ios"], "iops": r["iops"], "mib_s": r["bw_bytes"] / (1 << 20),
            "p50_us": r["lat_us"]["p50"], "p99_us": r["lat_us"]["p99"], "client_cpu_s": cpu}


def fio_args(rw, bs, qd, extra=()):
    return ["fio", "--name=rbd", "--ioengine=rbd", "--clientname=admin", f"--pool={POOL}", f"--rbdname={IMAGE}",
            f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}", "--output-format=json", *extra]


def fio_env():
    return dict(os.environ, CEPH_CONF=CONF)


def fio(rw, bs, qd):
    out, cpu = timed(fio_args(rw, bs, qd, ["--time_based", f"--runtime={RUNTIME}"]), env=fio_env())
    j = json.loads(out[out.index("{"):])["jobs"][0]
    assert j["error"] == 0, j
    side = j["read"] if "read" in rw else j["write"]
    pct = side["clat_ns"].get("percentile", {})
    return {"ios": side["total_ios"], "iops": side["iops"], "mib_s": side["bw_bytes"] / (1 << 20),
            "p50_us": pct.get("50.000000", 0) / 1000, "p99_us": pct.get("99.000000", 0) / 1000,
            "client_cpu_s": cpu}


def run(kind, rw, bs, qd, n):
    """One measurement of `kind`; adds the server's and the OSD's CPU."""
    osd = osd_pid()
    if kind == "fio":
        wait_image_free()
        o0 = cpu_s(osd)
        r = fio(rw, bs, qd)
        r["server_cpu_s"] = None
        r["osd_cpu_s"] = cpu_s(osd) - o0
        return r
    p = start(kind, n)
    try:
        s0, o0 = cpu_s(p.pid), cpu_s(osd)
        r = spindle_bench(rw, bs, qd)
        r["server_cpu_s"] = cpu_s(p.pid) - s0
        r["osd_cpu_s"] = cpu_s(osd) - o0
    finally:
        stop(p)
    return r


def rows():
    """(label, rw, bs, iodepth, unit)."""
    all_rows = [
        ("4k randread QD1", "randread", "4k", 1, "IOPS"),
        ("4k randread QD32", "randread", "4k", 32, "IOPS"),
        ("4k randwrite QD1", "randwrite", "4k", 1, "IOPS"),
        ("4k randwrite QD32", "randwrite", "4k", 32, "IOPS"),
        ("1M read QD4", "read", "1M", 4, "MiB/s"),
        ("1M write QD4", "write", "1M", 4, "MiB/s"),
    ]
    return [r for r in all_rows if ROWS in r[0]]


def cleanup():
    for p in list(LIVE):
        stop(p, timeout=3)
    if os.path.exists(SOCK):
        os.unlink(SOCK)
    if CLUSTER:
        subprocess.run([CLUSTER_SH, "stop", CLUSTER], stdout=subprocess.DEVNULL)
        if DONE:
            shutil.rmtree(CLUSTER, ignore_errors=True)
        else:
            print(f"cluster logs left in {CLUSTER}/log", file=sys.stderr)


def start_cluster():
    global CLUSTER, CONF
    CLUSTER = tempfile.mkdtemp(prefix="ceph-", dir=DIR)
    conf = sh(CLUSTER_SH, "start", CLUSTER, "--owner", str(os.getpid())).strip().splitlines()[-1]
    # The clients' conf: the cluster's, with librbd's cache set as CACHE
    # says (fio's rbd engine takes it from here; Spindle and QEMU set it
    # from their cache mode anyway).
    rbd_cache = "false" if CACHE == "none" else "true"
    with open(conf) as f:
        text = f.read()
    CONF = os.path.join(CLUSTER, "bench.conf")
    with open(CONF, "w") as f:
        f.write(text.replace("[client]\n", f"[client]\nrbd cache = {rbd_cache}\n", 1))


def prefill():
    """Creates the image and writes all of it sequentially (fio's random
    buffers), so reads hit data on the OSD."""
    sh("rbd", "-c", CONF, "create", f"{POOL}/{IMAGE}", "--size", f"{SIZE_MB}M")
    t = time.monotonic()
    out = sh(*fio_args("write", "4M", 8, ["--size=100%"]), env=fio_env())
    j = json.loads(out[out.index("{"):])["jobs"][0]
    assert j["error"] == 0 and j["write"]["io_bytes"] >= SIZE_MB << 20, j["write"]
    return time.monotonic() - t


def median_of(xs):
    return statistics.median(xs) if xs else float("nan")


def main():
    for tool, pkg in (("qemu-storage-daemon", "qemu-system-x86"), ("fio", "fio"), ("rbd", "ceph-common"),
                      ("ceph-osd", "ceph-osd"), ("ceph-mon", "ceph-mon")):
        if not shutil.which(tool):
            sys.exit(f"{tool} missing: apt-get install -y {pkg} (and qemu-block-extra for qsd's rbd driver)")
    if not os.access(SP, os.X_OK):
        sys.exit(f"{SP} missing: cargo build --release (or set SPINDLE)")
    if "rbd" not in subprocess.run(["fio", "--enghelp"], capture_output=True, text=True).stdout.split():
        sys.exit("this fio has no rbd engine")
    if CACHE not in ("none", "writeback"):
        sys.exit(f"CACHE={CACHE}: use none or writeback")
    os.makedirs(os.path.join(DIR, "log"), exist_ok=True)
    atexit.register(cleanup)
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, lambda sig, _f: sys.exit(128 + sig))

    start_cluster()
    fill_s = prefill()
    print(f"cluster {CLUSTER}; image {POOL}/{IMAGE} {SIZE_MB} MiB prefilled in {fill_s:.1f} s; "
          f"{REPS} reps x {RUNTIME} s; cache={CACHE}; spindle serve options: {' '.join(SERVE) or '(defaults)'}; load average {os.getloadavg()[0]:.2f}", flush=True)
    print()
    print(f"| row ({REPS} reps, median) | Spindle | qsd driver=rbd | fio rbd engine | Spindle / qsd (mean ± 95% CI) "
          f"| Spindle / fio (mean ± 95% CI) | Spindle server CPU us/req | qsd server CPU us/req |")
    print("|---|---|---|---|---|---|---|---|")
    results = []
    n = 0
    for label, rw, bs, qd, unit in rows():
        got = {k: [] for k in KINDS}
        for rep in range(REPS):
            order = KINDS[rep % len(KINDS):] + KINDS[:rep % len(KINDS)]
            for kind in order:
                n += 1
                got[kind].append(run(kind, rw, bs, qd, n))
        key = "iops" if unit == "IOPS" else "mib_s"
        fig = {k: [r[key] for r in v] for k, v in got.items()}
        per_req = lambda r, what: r[what] * 1e6 / max(r["ios"], 1)
        summary = {
            "row": label, "rw": rw, "bs": bs, "iodepth": qd, "unit": unit,
            "median": {k: median_of(v) for k, v in fig.items()},
            "ratio_qsd": [a / b for a, b in zip(fig["spindle"], fig["qsd"])],
            "ratio_fio": [a / b for a, b in zip(fig["spindle"], fig["fio"])],
            "server_cpu_us_per_req": {k: median_of([per_req(r, "server_cpu_s") for r in got[k]])
                                      for k in ("spindle", "qsd")},
            "client_cpu_us_per_req": {k: median_of([per_req(r, "client_cpu_s") for r in got[k]]) for k in KINDS},
            "total_cpu_us_per_req": {k: median_of([per_req(r, "client_cpu_s") + per_req(r, "server_cpu_s")
                                                   for r in got[k]]) for k in ("spindle", "qsd")},
            "osd_cpu_us_per_req": {k: median_of([per_req(r, "osd_cpu_s") for r in got[k]]) for k in KINDS},
            "p50_us": {k: median_of([r["p50_us"] for r in got[k]]) for k in KINDS},
            "p99_us": {k: median_of([r["p99_us"] for r in got[k]]) for k in KINDS},
            "runs": got,
        }
        summary["total_cpu_us_per_req"]["fio"] = summary["client_cpu_us_per_req"]["fio"]
        results.append(summary)
        m = summary["median"]
        rq, rf = summary["ratio_qsd"], summary["ratio_fio"]
        cpu = summary["server_cpu_us_per_req"]
        print(f"| {label} | " + " | ".join(f"{m[k]:,.0f} {unit}" for k in KINDS)
              + f" | {statistics.mean(rq):.2f}x ± {ci95(rq):.2f} | {statistics.mean(rf):.2f}x ± {ci95(rf):.2f}"
              + f" | {cpu['spindle']:.1f} | {cpu['qsd']:.1f} |", flush=True)
        with open(os.path.join(DIR, "results.json"), "w") as f:
            json.dump({"reps": REPS, "runtime_s": float(RUNTIME), "size_mb": SIZE_MB, "cache": CACHE, "serve_options": SERVE,
                       "prefill_s": fill_s, "rows": results}, f, indent=1)

    print()
    print("| row: CPU us/req (median) and latency | Spindle bench + Spindle | bench + qsd | fio + librbd (one process) "
          "| client alone: bench (Spindle run) / bench (qsd run) | OSD: Spindle / qsd / fio "
          "| p50 us: Spindle / qsd / fio | p99 us: Spindle / qsd / fio |")
    print("|---|---|---|---|---|---|---|---|")
    for s in results:
        t, c, o = s["total_cpu_us_per_req"], s["client_cpu_us_per_req"], s["osd_cpu_us_per_req"]
        p50, p99 = s["p50_us"], s["p99_us"]
        print(f"| {s['row']} | {t['spindle']:.1f} | {t['qsd']:.1f} | {t['fio']:.1f} | {c['spindle']:.1f} / {c['qsd']:.1f} "
              f"| {o['spindle']:.1f} / {o['qsd']:.1f} / {o['fio']:.1f} "
              f"| {p50['spindle']:.0f} / {p50['qsd']:.0f} / {p50['fio']:.0f} "
              f"| {p99['spindle']:.0f} / {p99['qsd']:.0f} / {p99['fio']:.0f} |")
    print(f"\nresults: {os.path.join(DIR, 'results.json')}")
    global DONE
    DONE = True


if __name__ == "__main__":
    main()

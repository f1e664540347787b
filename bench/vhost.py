#!/usr/bin/env python3
"""spindle serve vs qemu-storage-daemon, vhost-user-blk, same client.

Both servers serve the same image with the same options (O_DIRECT,
io_uring, one I/O thread, one queue); `spindle bench` (libblkio's
virtio-blk-vhost-user driver) drives both. Runs alternate between the two
servers; each figure is the median of REPS runs, and the paired column is
the mean of the per-pair ratios with its 95% confidence interval. fio on
the raw file gives the device's limit. The CPU columns are the server
process's user+system time during the client's run divided by the
requests done (polling included), median over the runs.
Usage: bench/vhost.py [DIR]
  env: REPS=3 RUNTIME=5 ROWS=substring CLIENT="extra spindle bench options"
  (CLIENT=--batch-submit gives the client's batching mode, CLIENT=--poll a
  client that busy-polls instead of waiting for interrupts)
"""
import json, math, os, shutil, statistics, subprocess, sys, time

DIR = sys.argv[1] if len(sys.argv) > 1 else "/var/tmp/spindle-bench"
REPS = int(os.environ.get("REPS", "3"))
RUNTIME = os.environ.get("RUNTIME", "5")
ROWS = os.environ.get("ROWS", "")
CLIENT = os.environ.get("CLIENT", "").split()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPINDLE = os.path.join(ROOT, "target/release/spindle")
SOCK = os.path.join(DIR, "bench.sock")
SIZE = 1 << 30


def sh(*args, **kw):
    return subprocess.run(args, check=True, **kw)


def wait_sock(proc):
    for _ in range(500):
        if os.path.exists(SOCK):
            return
        if proc.poll() is not None:
            sys.exit(f"server exited early: {proc.args}")
        time.sleep(0.01)
    sys.exit("socket never appeared")


def start(kind, target, fmt, binary=SPINDLE):
    """Serve target with qemu-storage-daemon (kind "qsd") or with the
    spindle binary given (any other kind)."""
    if os.path.exists(SOCK):
        os.unlink(SOCK)
    if kind != "qsd":
        args = [binary, "serve", target, "--vhost-user", SOCK, "--iothreads", "1", "--num-queues", "1"]
        if not target.startswith("null:"):
            args += ["--format", fmt, "--cache", "none", "--aio", "io_uring"]
    else:
        args = ["qemu-storage-daemon"]
        if target.startswith("null:"):
            args += ["--blockdev", f"driver=null-co,node-name=d0,size={SIZE}"]
        else:
            args += ["--blockdev", f"driver=file,node-name=f0,filename={target},cache.direct=on,aio=io_uring",
                     "--blockdev", f"driver={fmt},node-name=d0,file=f0"]
        args += ["--object", "iothread,id=iot0", "--export",
                 f"type=vhost-user-blk,id=e0,addr.type=unix,addr.path={SOCK},node-name=d0,writable=on,iothread=iot0"]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_sock(p)
    return p


def stop(p):
    p.terminate()
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        # qemu-storage-daemon 7.2 sometimes ignores SIGTERM after its
        # client left; do not let that hang the benchmark.
        p.kill()
        p.wait()


def cpu_s(pid):
    """User + system CPU seconds of a process so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def client(rw, qd, server):
    before = cpu_s(server.pid)
    out = subprocess.run([SPINDLE, "bench", SOCK, "--rw", rw, "--bs", "4k", "--iodepth", str(qd),
                          "--runtime", RUNTIME, "--output", "json", *CLIENT], check=True, capture_output=True, text=True)
    r = json.loads(out.stdout)
    assert r["errors"] == 0, r
    r["cpu_us"] = (cpu_s(server.pid) - before) * 1e6 / max(r["ios"], 1)
    return r


def direct(path, rw, qd):
    """The same client on the file itself (blkio's io_uring driver, O_DIRECT;
    a file has no poll queues, so `--poll` is left out here)."""
    opts = [o for o in CLIENT if o != "--poll"]
    out = subprocess.run([SPINDLE, "bench", path, "--rw", rw, "--bs", "4k", "--iodepth", str(qd),
                          "--runtime", RUNTIME, "--output", "json", *opts], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)["iops"]


def drop_caches():
    """Syncs, then drops the page cache (needs root; skipped without), so
    a run starts with nothing dirty and nothing of its image cached."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
    except OSError:
        pass


def ci95(xs):
    """Half-width of the 95% confidence interval of the mean of xs
    (Student's t, as the runs are few)."""
    if len(xs) < 2:
        return 0
    t = [12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23, 2.20, 2.18, 2.16, 2.14, 2.13,
         2.12, 2.11, 2.10, 2.09, 2.09, 2.08, 2.07, 2.07, 2.06, 2.06, 2.06, 2.05, 2.05, 2.05, 2.04]
    q = t[len(xs) - 2] if len(xs) - 1 <= len(t) else 1.96
    return q * statistics.stdev(xs) / math.sqrt(len(xs))


def fio(path, qd):
    out = subprocess.run(["fio", "--name=dev", f"--filename={path}", "--rw=randread", "--bs=4k", "--direct=1",
                          "--ioengine=io_uring", f"--iodepth={qd}", f"--runtime={RUNTIME}", "--time_based",
                          "--output-format=json"], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)["jobs"][0]["read"]["iops"]


def images():
    """The raw and qcow2 images the rows serve (made once, kept in DIR)."""
    os.makedirs(DIR, exist_ok=True)
    raw, q = os.path.join(DIR, "bench.raw"), os.path.join(DIR, "bench.qcow2")
    if not os.path.exists(raw):
        sh("dd", "if=/dev/urandom", f"of={raw}", "bs=1M", f"count={SIZE >> 20}", "status=none")
    if not os.path.exists(q):
        sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, q)
    return raw, q


def rows(raw, q):
    """(name, target, format, rw, iodepth) of each row ROWS selects."""
    all_rows = [
        ("null 4k randread QD32", f"null:{SIZE}", "raw", "randread", 32),
        ("null 4k randread QD1", f"null:{SIZE}", "raw", "randread", 1),
        ("raw O_DIRECT 4k randread QD32", raw, "raw", "randread", 32),
        ("raw O_DIRECT 4k randread QD1", raw, "raw", "randread", 1),
        ("qcow2 allocated 4k randread QD32", q, "qcow2", "randread", 32),
        ("qcow2 allocated 4k randwrite QD32", q, "qcow2", "randwrite", 32),
    ]
    return [r for r in all_rows if ROWS in r[0]]


def main():
    for tool in ("qemu-storage-daemon", "qemu-img", "fio"):
        if not shutil.which(tool):
            sys.exit(f"{tool} missing: apt-get install -y qemu-system-x86 qemu-utils fio")
    raw, q = images()
    print("| row | qsd IOPS | spindle IOPS | spindle/qsd | paired ratio (95% CI) | spindle p99 us | qsd p99 us "
          "| spindle CPU us/req | qsd CPU us/req |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = []
    limits = {}
    for name, target, fmt, rw, qd in rows(raw, q):
        figs = {"spindle": [], "qsd": []}
        lim = {"fio": [], "direct": []}
        for _ in range(REPS):
            for kind in ("spindle", "qsd"):
                p = start(kind, target, fmt)
                try:
                    figs[kind].append(client(rw, qd, p))
                finally:
                    stop(p)
            if target == raw:
                lim["fio"].append(fio(raw, qd))
                lim["direct"].append(direct(raw, rw, qd))
        if target == raw:
            limits[name] = {k: statistics.median(v) for k, v in lim.items()}
        med = {k: sorted(v, key=lambda r: r["iops"])[len(v) // 2] for k, v in figs.items()}
        s, qs = med["spindle"], med["qsd"]
        ratios = [a["iops"] / b["iops"] for a, b in zip(figs["spindle"], figs["qsd"])]
        ci = ci95(ratios)
        print(f"| {name} | {qs['iops']:.0f} | {s['iops']:.0f} | {s['iops'] / qs['iops']:.2f}x | "
              f"{statistics.mean(ratios):.2f}x ± {ci:.2f} | "
              f"{s['lat_us']['p99']:.0f} | {qs['lat_us']['p99']:.0f} | "
              f"{statistics.median(r['cpu_us'] for r in figs['spindle']):.2f} | "
              f"{statistics.median(r['cpu_us'] for r in figs['qsd']):.2f} |", flush=True)
        results.append((name, s, qs))
    print()
    print("| device limit (same runs, interleaved) | fio IOPS | spindle bench on the file IOPS | spindle serve / fio | spindle serve / same client on the file |")
    print("|---|---|---|---|---|")
    for name, s, _ in results:
        if name in limits:
            l = limits[name]
            print(f"| {name} | {l['fio']:.0f} | {l['direct']:.0f} | {100 * s['iops'] / l['fio']:.0f}% | "
                  f"{100 * s['iops'] / l['direct']:.0f}% |")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""NBD servers side by side: `spindle nbd` against qemu-nbd 7.2, each with
--cache=none --aio=io_uring and with its defaults (both: writeback
cache; Spindle with multi-conn, qemu-nbd -e 1 without), and nbdkit 1.32
(file plugin on raw, memory plugin for the null rows).

One run, one machine. Clients: fio's nbd engine (one process, --iodepth)
and nbdcopy of a whole image out of and into each server. For each row
the servers run one after another in an order that rotates per repetition;
each run starts with the page cache synced and dropped; the table shows
each server's median of REPS and, for Spindle against
qemu-nbd in each setting, the mean of the per-repetition ratios with its
95% confidence interval (Student's t). Servers listen on a unix socket.

  bench/nbd.py [DIR]   env: REPS=5 RUNTIME=5 SIZE_MB=1024 SPINDLE=path ROWS=substring
"""
import json, os, statistics, subprocess, sys, time

import vhost
from vhost import ci95

DIR = sys.argv[1] if len(sys.argv) > 1 else "/var/tmp/spindle-bench-nbd"
REPS = int(os.environ.get("REPS", "5"))
RUNTIME = os.environ.get("RUNTIME", "5")
SIZE_MB = int(os.environ.get("SIZE_MB", "1024"))
ROWS = os.environ.get("ROWS", "")
SP = os.environ.get("SPINDLE", vhost.SPINDLE)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOCK = os.path.join(DIR, "nbd.sock")
URI = f"nbd+unix:///?socket={SOCK}"


def sh(*args):
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def server(kind, img, fmt):
    """Starts server `kind` on `img` (null: a zero-reading device)."""
    if os.path.exists(SOCK):
        os.remove(SOCK)
    null = img == "null"
    if kind.startswith("spindle"):
        target = f"null:{SIZE_MB}M" if null else img
        args = [SP, "nbd", "-t", "-k", SOCK, target]
        if not null:
            args += ["-f", fmt]
            if kind == "spindle":
                args += ["--cache", "none", "--aio", "io_uring"]
    elif kind.startswith("qemu-nbd"):
        # Tuned: as many clients as Spindle takes (and multi-conn for
        # them); defaults: qemu-nbd's -e 1, no multi-conn.
        args = ["qemu-nbd", "-t", "-k", SOCK] + (["-e", "8"] if kind == "qemu-nbd" else [])
        if null:
            args += ["--image-opts", f"driver=null-co,size={SIZE_MB}M,read-zeroes=on"]
        else:
            args += ["-f", fmt]
            if kind == "qemu-nbd":
                args += ["--cache=none", "--aio=io_uring"]
            args += [img]
    else:  # nbdkit
        args = ["nbdkit", "-f", "-U", SOCK]
        args += ["memory", f"size={SIZE_MB}M"] if null else ["file", f"file={img}", "cache=none"]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(500):
        if os.path.exists(SOCK):
            return p
        if p.poll() is not None:
            sys.exit(f"server exited early: {args}")
        time.sleep(0.01)
    sys.exit(f"no socket from {args}")


def stop(p):
    p.terminate()
    try:
        p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def fio(rw, bs, qd):
    out = sh("fio", "--name=nbd", "--ioengine=nbd", f"--uri={URI}", f"--rw={rw}", f"--bs={bs}",
             f"--iodepth={qd}", "--time_based", f"--runtime={RUNTIME}", "--ramp_time=1",
             "--output-format=json")
    # fio's nbd engine prints "fio: connected to NBD server" before the JSON.
    j = json.loads(out[out.index("{"):])["jobs"][0]
    side = j["read"] if "read" in rw else j["write"]
    return side["iops"] if bs == "4k" else side["bw_bytes"] / (1 << 20)


def nbdcopy(direction, conns, img_raw):
    """Seconds for nbdcopy of the whole export out (to /dev/null) or in
    (from a raw file)."""
    t = time.monotonic()
    if direction == "out":
        sh("nbdcopy", f"--connections={conns}", URI, "null:")
    else:
        sh("nbdcopy", f"--connections={conns}", img_raw, URI)
    return time.monotonic() - t


def images():
    os.makedirs(DIR, exist_ok=True)
    raw = os.path.join(DIR, "data.raw")
    if not os.path.exists(raw) or os.path.getsize(raw) != SIZE_MB << 20:
        with open(raw, "wb") as f:
            for _ in range(SIZE_MB):
                f.write(os.urandom(1 << 20))
    q = os.path.join(DIR, "data.qcow2")
    if not os.path.exists(q):
        sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, q)
    return raw, q


def rows(raw, q):
    """(label, image, format, measure, unit, servers)."""
    all3 = ["spindle", "qemu-nbd", "spindle-defaults", "qemu-nbd-defaults", "nbdkit"]
    qonly = ["spindle", "qemu-nbd", "spindle-defaults", "qemu-nbd-defaults"]
    f = lambda rw, bs, qd: (lambda: fio(rw, bs, qd))
    return [
        ("4k randread QD1, null", "null", "raw", f("randread", "4k", 1), "IOPS", all3),
        ("4k randread QD32, null", "null", "raw", f("randread", "4k", 32), "IOPS", all3),
        ("4k randread QD1, raw", raw, "raw", f("randread", "4k", 1), "IOPS", all3),
        ("4k randread QD32, raw", raw, "raw", f("randread", "4k", 32), "IOPS", all3),
        ("4k randread QD32, qcow2", q, "qcow2", f("randread", "4k", 32), "IOPS", qonly),
        ("4k randwrite QD32, qcow2", q, "qcow2", f("randwrite", "4k", 32), "IOPS", qonly),
        ("1M read QD8, raw", raw, "raw", f("read", "1M", 8), "MiB/s", all3),
        ("1M write QD8, raw", raw, "raw", f("write", "1M", 8), "MiB/s", all3),
        ("nbdcopy out, 1 connection, raw", raw, "raw", lambda: nbdcopy("out", 1, raw), "s", all3),
        ("nbdcopy out, 4 connections, raw", raw, "raw", lambda: nbdcopy("out", 4, raw), "s", all3),
        ("nbdcopy in, 4 connections, qcow2", q, "qcow2", lambda: nbdcopy("in", 4, raw), "s", qonly),
    ]


def main():
    if "SPINDLE" not in os.environ:
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "spindle"], cwd=ROOT, check=True)
    raw, q = images()
    names = {"spindle": "Spindle none/io_uring", "qemu-nbd": "qemu-nbd none/io_uring",
             "spindle-defaults": "Spindle defaults", "qemu-nbd-defaults": "qemu-nbd defaults",
             "nbdkit": "nbdkit"}
    cols = ["spindle", "qemu-nbd", "spindle-defaults", "qemu-nbd-defaults", "nbdkit"]
    print(f"| {SIZE_MB} MiB, {REPS} reps, median | " + " | ".join(names[c] for c in cols)
          + " | none/io_uring: Spindle / qemu-nbd (mean ± 95% CI) | defaults: Spindle / qemu-nbd |")
    print("|---|" + "---|" * (len(cols) + 2))
    for label, img, fmt, measure, unit, servers in rows(raw, q):
        if ROWS and ROWS not in label:
            continue
        got = {s: [] for s in servers}
        for r in range(REPS):
            order = servers[r % len(servers):] + servers[:r % len(servers)]
            for s in order:
                vhost.drop_caches()
                p = server(s, img, fmt)
                try:
                    got[s].append(measure())
                finally:
                    stop(p)
        # Times: lower is better, so the ratio is qemu-nbd's over Spindle's.
        def paired(sp, q):
            if unit == "s":
                r = [b / a for a, b in zip(got[sp], got[q])]
            else:
                r = [a / b for a, b in zip(got[sp], got[q])]
            return f"{statistics.mean(r):.2f}x ± {ci95(r):.2f}"
        cells = []
        for c in cols:
            if c not in got:
                cells.append("–")
                continue
            m = statistics.median(got[c])
            cells.append(f"{m:.2f} s" if unit == "s" else f"{m:,.0f} {unit}")
        print(f"| {label} | " + " | ".join(cells)
              + f" | {paired('spindle', 'qemu-nbd')} | {paired('spindle-defaults', 'qemu-nbd-defaults')} |",
              flush=True)


if __name__ == "__main__":
    main()

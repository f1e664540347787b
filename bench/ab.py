#!/usr/bin/env python3
"""Two builds of spindle serve against each other, same client.

OLD and NEW (default: this tree's target/release/spindle) serve the rows
of bench/vhost.py, plus a qcow2 row that allocates (a fresh 8 GiB image
for every run, so most 4k writes allocate a cluster). The client is always
NEW's `spindle bench`. Each pair runs both builds back to back, the order
alternating from pair to pair. Server CPU is `perf stat -e task-clock -p`
on the server during the client's run (all its threads, polling included)
divided by the requests the client completed. Paired columns: mean of the
per-pair NEW/OLD ratios with the 95% confidence interval (Student's t).
Usage: OLD=/path/to/old/spindle bench/ab.py [DIR]
  env: REPS=5 RUNTIME=5 ROWS=substring CLIENT="extra spindle bench options"
"""
import os, signal, statistics, subprocess, sys, tempfile, time

import vhost
from vhost import ci95, client, start, stop

OLD = os.environ.get("OLD") or sys.exit("OLD=/path/to/the/other/spindle is required")
NEW = os.environ.get("NEW", vhost.SPINDLE)


def measure(binary, target, fmt, rw, qd):
    """One run: IOPS, p99 and the server's CPU us per request."""
    if target.endswith("alloc.qcow2"):
        vhost.sh("qemu-img", "create", "-q", "-f", "qcow2", target, "8G")
    p = start("spindle", target, fmt, binary)
    with tempfile.NamedTemporaryFile("r", suffix=".perf") as out:
        perf = subprocess.Popen(["perf", "stat", "-e", "task-clock", "-x", ",", "-p", str(p.pid), "-o", out.name])
        time.sleep(0.3)  # perf attaches to the server before the client connects
        try:
            r = client(rw, qd, p)
        finally:
            perf.send_signal(signal.SIGINT)
            perf.wait()
            stop(p)
        msec = next(float(l.split(",")[0]) for l in out if "task-clock" in l)
    r["cpu_us"] = msec * 1e3 / r["ios"]
    return r


def main():
    raw, q = vhost.images()
    rows = vhost.rows(raw, q) + [
        r for r in [("qcow2 empty 4k randwrite QD32 (allocating)", os.path.join(vhost.DIR, "alloc.qcow2"),
                     "qcow2", "randwrite", 32)] if vhost.ROWS in r[0]]
    print(f"OLD={OLD}\nNEW={NEW}\nREPS={vhost.REPS} RUNTIME={vhost.RUNTIME} CLIENT={' '.join(vhost.CLIENT)}\n")
    print("| row | OLD IOPS | NEW IOPS | IOPS NEW/OLD (95% CI) | OLD CPU us/req | NEW CPU us/req "
          "| CPU/req NEW/OLD (95% CI) | OLD p99 us | NEW p99 us |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, target, fmt, rw, qd in rows:
        figs = {"old": [], "new": []}
        for i in range(vhost.REPS):
            order = ("new", "old") if i % 2 == 0 else ("old", "new")
            for kind in order:
                figs[kind].append(measure(NEW if kind == "new" else OLD, target, fmt, rw, qd))
        iops = [n["iops"] / o["iops"] for n, o in zip(figs["new"], figs["old"])]
        cpu = [n["cpu_us"] / o["cpu_us"] for n, o in zip(figs["new"], figs["old"])]
        med = {k: {f: statistics.median(r[f] if f != "p99" else r["lat_us"]["p99"] for r in v)
                   for f in ("iops", "cpu_us", "p99")} for k, v in figs.items()}
        o, n = med["old"], med["new"]
        print(f"| {name} | {o['iops']:.0f} | {n['iops']:.0f} | {statistics.mean(iops):.3f} ± {ci95(iops):.3f} | "
              f"{o['cpu_us']:.2f} | {n['cpu_us']:.2f} | {statistics.mean(cpu):.3f} ± {ci95(cpu):.3f} | "
              f"{o['p99']:.0f} | {n['p99']:.0f} |", flush=True)
        print("  raw pairs (NEW/OLD IOPS, CPU):", " ".join(f"{a:.3f},{b:.3f}" for a, b in zip(iops, cpu)),
              file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()

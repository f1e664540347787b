#!/usr/bin/env python3
"""What dirty logging costs the data path (issue 11's benchmark).

Three servers per row, same client (this tree's `spindle bench`):
  BASE  the build before live migration and inflight tracking (OLD=…)
  OFF   this tree, logging off (what every guest runs when not migrating)
  ON    this tree with the hidden `--x-dirty-log`: every connection logs
        every guest page it writes into a private log, as during a
        migration (QEMU's log is a shared memfd just like it)
Rows: null and raw O_DIRECT 4k randread QD32.

Per row and configuration: instructions per request of the server under
callgrind (bench/callgrind.sh; timing-free, repeatable on a loaded host),
then REPS alternating runs for IOPS with paired ratios OFF/BASE and
ON/OFF, mean with the 95% confidence interval (Student's t).
Usage: OLD=/path/to/base/spindle bench/dirtylog.py [DIR]
  env: REPS=5 RUNTIME=5 CALLGRIND=1 (0: skip the callgrind column)
"""
import os, statistics, subprocess, sys

import vhost
from vhost import ci95, client, stop

OLD = os.environ.get("OLD") or sys.exit("OLD=/path/to/the/base/spindle is required")
NEW = os.environ.get("NEW", vhost.SPINDLE)
CALLGRIND = os.environ.get("CALLGRIND", "1") != "0"
CONFIGS = [("BASE", OLD, []), ("OFF", NEW, []), ("ON", NEW, ["--x-dirty-log"])]


def serve(binary, target, extra):
    if os.path.exists(vhost.SOCK):
        os.unlink(vhost.SOCK)
    args = [binary, "serve", target, "--vhost-user", vhost.SOCK, "--iothreads", "1", "--num-queues", "1"]
    if not target.startswith("null:"):
        args += ["--format", "raw", "--cache", "none", "--aio", "io_uring"]
    p = subprocess.Popen(args + extra, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    vhost.wait_sock(p)
    return p


def instructions(binary, target, extra):
    opts = [] if target.startswith("null:") else ["--format", "raw", "--cache", "none", "--aio", "io_uring"]
    out = subprocess.run(["bench/callgrind.sh", binary, target, "randread", "32", *opts, *extra],
                         cwd=vhost.ROOT, check=True, capture_output=True, text=True,
                         env={**os.environ, "DIR": vhost.DIR}).stdout
    return int(out.split("Ir/io=")[1].split()[0])


def main():
    raw, _ = vhost.images()
    rows = [("null 4k randread QD32", f"null:{vhost.SIZE}"), ("raw O_DIRECT 4k randread QD32", raw)]
    print(f"BASE={OLD}\nNEW={NEW}\nREPS={vhost.REPS} RUNTIME={vhost.RUNTIME}\n")
    print("| row | BASE Ir/req | OFF Ir/req | ON Ir/req | BASE IOPS | OFF IOPS | ON IOPS "
          "| OFF/BASE IOPS (95% CI) | ON/OFF IOPS (95% CI) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, target in rows:
        ir = {c: instructions(b, target, x) if CALLGRIND else 0 for c, b, x in CONFIGS}
        figs = {c: [] for c, _, _ in CONFIGS}
        for i in range(vhost.REPS):
            order = CONFIGS if i % 2 == 0 else CONFIGS[::-1]
            for c, b, x in order:
                p = serve(b, target, x)
                try:
                    figs[c].append(client("randread", 32, p)["iops"])
                finally:
                    stop(p)
        off_base = [o / b for o, b in zip(figs["OFF"], figs["BASE"])]
        on_off = [n / o for n, o in zip(figs["ON"], figs["OFF"])]
        med = {c: statistics.median(v) for c, v in figs.items()}
        print(f"| {name} | {ir['BASE']} | {ir['OFF']} | {ir['ON']} | {med['BASE']:.0f} | {med['OFF']:.0f} "
              f"| {med['ON']:.0f} | {statistics.mean(off_base):.3f} ± {ci95(off_base):.3f} "
              f"| {statistics.mean(on_off):.3f} ± {ci95(on_off):.3f} |", flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Live migration time and downtime of a 512 MiB TCG guest under write load:
Spindle against qemu-storage-daemon, same guest, same image.

Each run boots the test guest (tests/guest/build.sh, one vCPU: see
crates/spindle/tests/common/migrate.rs) on a raw image, runs gio's O_DIRECT
writers (tests/guest/gio.c) for a few seconds, migrates it live over a unix
socket at unlimited bandwidth to a second QEMU started with -incoming, and
reads query-migrate's total-time and downtime. The destination's disk is a
second `spindle serve IMAGE --vhost-user SOCK --incoming` (Spindle) or a
second export of the same node in the same qemu-storage-daemon. Pairs run
both back to back, the order alternating. Paired column: mean of the
per-pair Spindle/qsd ratios with the 95% confidence interval (Student's t).
Only times are measured: QEMU 7.2 under TCG may corrupt a busy guest's
memory during a live RAM copy, whatever the disk (see migrate.rs).
Usage: bench/migrate.py [DIR]   env: REPS=5 SETTLE=4 SPINDLE=path
"""
import json, os, shutil, socket, statistics, subprocess, sys, tempfile, time

import vhost
from vhost import ci95

SPINDLE = os.environ.get("SPINDLE", vhost.SPINDLE)
REPS = int(os.environ.get("REPS", "5"))
SETTLE = float(os.environ.get("SETTLE", "4"))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Qmp:
    def __init__(self, path):
        for _ in range(600):
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                time.sleep(0.05)
        self.f = self.s.makefile("rw")
        self.f.readline()
        self.ex("qmp_capabilities")

    def ex(self, cmd, **args):
        self.f.write(json.dumps({"execute": cmd, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            v = json.loads(self.f.readline())
            if "event" in v:
                continue
            if "error" in v:
                raise RuntimeError(f"{cmd}: {v}")
            return v["return"]


def wait_path(p, proc):
    end = time.time() + 20
    while not os.path.exists(p):
        if proc.poll() is not None or time.time() > end:
            sys.exit(f"{p} never appeared")
        time.sleep(0.02)


def prepare(d):
    guest = os.path.join(d, "guest")
    subprocess.run(["sh", os.path.join(ROOT, "tests/guest/build.sh"), guest], check=True)
    t = os.path.join(d, "rd")
    os.makedirs(t, exist_ok=True)
    subprocess.run(["gcc", "-static", "-O2", "-pthread", "-o", os.path.join(t, "gio"),
                    os.path.join(ROOT, "tests/guest/gio.c")], check=True)
    with open(os.path.join(t, "test.sh"), "w") as f:
        f.write("exec /gio --writers 4 --region-mib 4 --readers 1 --max-seconds 600 /dev/vda\n")
    cp = subprocess.run('printf "test.sh\\ngio\\n" | cpio -o -H newc 2>/dev/null | gzip', shell=True, cwd=t,
                        capture_output=True, check=True)
    rd = os.path.join(d, "initrd.gz")
    with open(rd, "wb") as f:
        f.write(open(os.path.join(guest, "base.cpio.gz"), "rb").read() + cp.stdout)
    return os.path.join(guest, "vmlinuz"), rd


def backends(kind, d, img):
    """Starts the disk's servers; returns (processes, source socket, destination socket)."""
    a, b = os.path.join(d, "a.sock"), os.path.join(d, "b.sock")
    log = open(os.path.join(d, f"{kind}.log"), "a")
    if kind == "spindle":
        ps = [subprocess.Popen([SPINDLE, "serve", img, "--vhost-user", a], stdout=log, stderr=log)]
        wait_path(a, ps[0])
        ps.append(subprocess.Popen([SPINDLE, "serve", img, "--vhost-user", b, "--incoming"], stdout=log, stderr=log))
        wait_path(b, ps[1])
        return ps, a, b
    args = ["qemu-storage-daemon", "--blockdev",
            f"driver=file,node-name=f0,filename={img},cache.direct=on,aio=io_uring",
            "--blockdev", "driver=raw,node-name=d0,file=f0", "--object", "iothread,id=iot0"]
    for i, s in enumerate((a, b)):
        args += ["--export", f"type=vhost-user-blk,id=e{i},addr.type=unix,addr.path={s},node-name=d0,"
                 "writable=on,iothread=iot0"]
    p = subprocess.Popen(args, stdout=log, stderr=log)
    wait_path(b, p)
    return [p], a, b


def qemu(d, name, kernel, rd, sock, incoming=None):
    qmp = os.path.join(d, f"{name}.qmp")
    args = ["qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-smp", "1", "-display", "none", "-nodefaults",
            "-serial", "stdio", "-no-reboot", "-object", "memory-backend-memfd,id=mem,size=512M,share=on",
            "-numa", "node,memdev=mem", "-append", "console=ttyS0 quiet panic=-1", "-kernel", kernel,
            "-initrd", rd, "-qmp", f"unix:{qmp},server=on,wait=off",
            "-chardev", f"socket,id=c0,path={sock}", "-device", "vhost-user-blk-pci,chardev=c0,num-queues=1"]
    if incoming:
        args += ["-incoming", incoming]
    out = open(os.path.join(d, f"{name}.console"), "w")
    p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT)
    return p, Qmp(qmp), os.path.join(d, f"{name}.console")


def run(kind, base, kernel, rd):
    d = tempfile.mkdtemp(dir=base)
    img = os.path.join(d, "disk.raw")
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    procs = []
    try:
        ps, a, b = backends(kind, d, img)
        procs += ps
        src, q, console = qemu(d, "src", kernel, rd, a)
        procs.append(src)
        end = time.time() + 120
        while "GIO-RUNNING" not in open(console).read():
            if time.time() > end:
                sys.exit(f"{kind}: the guest did not start gio: {console}")
            time.sleep(0.1)
        time.sleep(SETTLE)
        uri = "unix:" + os.path.join(d, "mig.sock")
        dst, q2, _ = qemu(d, "dst", kernel, rd, b, uri)
        procs.append(dst)
        q.ex("migrate-set-parameters", **{"max-bandwidth": 100_000_000_000})
        q.ex("migrate", uri=uri)
        while True:
            st = q.ex("query-migrate")
            if st["status"] in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.02)
        if st["status"] != "completed":
            sys.exit(f"{kind}: migration {st['status']}: {st}")
        return st["total-time"], st["downtime"]
    finally:
        for p in reversed(procs):
            p.kill()
            p.wait()
        shutil.rmtree(d, ignore_errors=True)


def main():
    base = sys.argv[1] if len(sys.argv) > 1 else "/var/tmp"
    os.makedirs(base, exist_ok=True)
    work = tempfile.mkdtemp(prefix="bench-migrate-", dir=base)
    kernel, rd = prepare(work)
    res = {"spindle": [], "qsd": []}
    for i in range(REPS):
        for kind in (("spindle", "qsd") if i % 2 == 0 else ("qsd", "spindle")):
            res[kind].append(run(kind, work, kernel, rd))
            print(f"pair {i + 1} {kind}: total {res[kind][-1][0]} ms, downtime {res[kind][-1][1]} ms", flush=True)
    print(f"\n{REPS} pairs, 512 MiB guest, 4 O_DIRECT writers, unlimited bandwidth, TCG, one vCPU")
    print(f"{'':10} {'total-time ms':>18} {'downtime ms':>16}  restart without loss")
    for kind, restart in (("spindle", "yes (inflight tracking)"), ("qsd", "no (no inflight tracking)")):
        t = [r[0] for r in res[kind]]
        dt = [r[1] for r in res[kind]]
        print(f"{kind:10} {statistics.mean(t):10.0f} ± {ci95(t):5.0f} {statistics.mean(dt):8.0f} ± {ci95(dt):5.0f}  {restart}")
    for col, name in ((0, "total-time"), (1, "downtime")):
        r = [s[col] / max(q[col], 1) for s, q in zip(res["spindle"], res["qsd"])]
        print(f"spindle/qsd {name}: {statistics.mean(r):.3f} ± {ci95(r):.3f} (paired, 95% CI)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

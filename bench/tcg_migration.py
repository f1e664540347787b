#!/usr/bin/env python3
"""QEMU alone, no Spindle: does a live migration of the test guest under TCG
come back intact? The control experiment of docs/snapshots.md, "Limits".

The guest of crates/spindle/tests/vm_restore.rs (tests/guest/build.sh's
kernel and initramfs, the counter script read from
crates/spindle/tests/common/vmsnap.rs, 1 vCPU, 512 MiB memfd RAM), or with
--gio a busy one (tests/guest/gio.c on vdb: one writer, two holders). Its
disks are qcow2 files on QEMU's own virtio-blk. It is migrated live to a
file (`migrate exec:cat > FILE`, with pause-before-switchover and the
downtime-limit `spindle vm snapshot` sets for --max-pause 100, doubled every
5 s as Spindle does), a new QEMU loads it (`-incoming exec:cat FILE`), and
the restored guest is checked: the counter goes on from the switch-over and
both disks read back, or gio's held buffers check out and it stops cleanly;
a kernel BUG, Oops, panic or WARNING fails the run. --paused stops the
guest before the migration (the stop-copy control).

  bench/tcg_migration.py OUTDIR RUNS [--downtime MS] [--gio] [--paused]

Needs qemu-system-x86_64, qemu-img, cpio, and the test guest built into
target/tmp/guest (any guest test builds it; gio by vm_migration or
vm_restart). One line per run and a total in OUTDIR/summary; each run's
consoles in OUTDIR/N/.
"""
import argparse, os, re, shutil, struct, subprocess, sys, threading, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp import Qmp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST = f"{ROOT}/target/tmp/guest"
BAD = ["BUG", "Oops", "corruption", "panic", "general protection", "WARNING",
       "GIO-HOLD-FAIL", "GIO-VERIFY-FAIL", "GIO-ERROR"]
GIO = ("exec /gio --writers 1 --region-mib 1 --hold-mib 16 --readers 0 "
       "--hold-threads 2 --pool-mib 32 --base-gen 1 /dev/vdb\n")
GIO_BLOCKS = 17 * 256  # the writer's 1 MiB and the 16 MiB hold region

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("runs", type=int)
ap.add_argument("--downtime", type=int, default=25, help="ms (default 25: --max-pause 100)")
ap.add_argument("--gio", action="store_true")
ap.add_argument("--paused", action="store_true")
a = ap.parse_args()
a.out = os.path.abspath(a.out)
os.makedirs(a.out, exist_ok=True)

M64 = (1 << 64) - 1


def mix64(z):
    z = ((z ^ (z >> 30)) * 0xbf58476d1ce4e5b9) & M64
    z = ((z ^ (z >> 27)) * 0x94d049bb133111eb) & M64
    return z ^ (z >> 31)


def prefill(path):
    """gio's generation-1 pattern on its blocks (common/gio.rs's fill_block)."""
    with open(path, "wb") as f:
        for b in range(GIO_BLOCKS):
            seed = ((b * 0xd1b54a32d192ed03) ^ 0x9e3779b97f4a7c15) & M64
            w = [0x4f49474c444e5053, b, 1, (~b ^ (1 << 32)) & M64]
            w += [mix64((seed + i * 0x9e3779b97f4a7c15) & M64) for i in range(4, 512)]
            f.write(struct.pack("<512Q", *w))
        f.truncate(64 << 20)


def counter_script():
    text = open(f"{ROOT}/crates/spindle/tests/common/vmsnap.rs").read()
    return re.search(r'pub const SCRIPT: &str = r#"\n(.*?)"#;', text, re.S).group(1)


def initrd(d):
    t = f"{d}/rd"
    os.makedirs(t)
    open(f"{t}/test.sh", "w").write(GIO if a.gio else counter_script())
    files = "test.sh\n"
    if a.gio:
        shutil.copy(f"{GUEST}/gio", f"{t}/gio")
        files += "gio\n"
    cpio = subprocess.run("cpio -o -H newc 2>/dev/null | gzip", shell=True, cwd=t, input=files.encode(),
                          capture_output=True, check=True).stdout
    with open(f"{d}/initrd.gz", "wb") as f:
        f.write(open(f"{GUEST}/base.cpio.gz", "rb").read() + cpio)
    return f"{d}/initrd.gz"


class Vm:
    def __init__(self, d, name, rd, disks, incoming=None):
        self.name = name
        qmp = f"{d}/{name}.qmp"
        args = ["qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-smp", "1", "-display", "none",
                "-nodefaults", "-serial", "stdio", "-no-reboot",
                "-object", "memory-backend-memfd,id=mem,size=512M,share=on", "-numa", "node,memdev=mem",
                "-append", "console=ttyS0 quiet panic=-1", "-kernel", f"{GUEST}/vmlinuz", "-initrd", rd,
                "-qmp", f"unix:{qmp},server=on,wait=off"]
        for img in disks:
            args += ["-drive", f"file={img},format=qcow2,if=virtio,cache=none,aio=native"]
        if incoming:
            args += ["-incoming", incoming]
        self.p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=open(f"{d}/{name}.stderr", "w"))
        self.lines, self.closed, self.cv = [], False, threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self.q = Qmp(qmp, self.p)

    def _read(self):
        for l in self.p.stdout:
            with self.cv:
                self.lines.append(l.decode(errors="replace").replace("\r", "").rstrip("\n"))
                self.cv.notify_all()
        with self.cv:
            self.closed = True
            self.cv.notify_all()

    def send(self, line):
        self.p.stdin.write((line + "\n").encode())
        self.p.stdin.flush()

    def mark(self):
        with self.cv:
            return len(self.lines)

    def wait(self, frm, pat, limit=60):
        """The first console line from `frm` on with `pat`."""
        end = time.time() + limit
        with self.cv:
            while True:
                hit = next((l for l in self.lines[frm:] if pat in l), None)
                if hit is not None:
                    return hit
                if self.closed or time.time() > end:
                    raise TimeoutError(f"{self.name}: no console line with {pat!r}")
                self.cv.wait(max(0.01, end - time.time()))

    def counts(self, frm=0):
        with self.cv:
            return [int(m.group(1)) for l in self.lines[frm:] if (m := re.fullmatch(r"\s*COUNT (\d+)\s*", l))]

    def wait_count(self, n):
        end = time.time() + 60
        while not any(c >= n for c in self.counts()):
            if time.time() > end or self.closed:
                raise TimeoutError(f"{self.name}: the counter never reached {n}")
            time.sleep(0.05)

    def console(self):
        with self.cv:
            return "\n".join(self.lines)

    def kill(self):
        self.p.kill()
        self.p.wait()


def settle(vm, n):
    for _ in range(n):
        vm.wait(vm.mark(), "GIO-PROGRESS")


def migrate(src, state):
    """Live (or, --paused, stop-copy) migration into `state`, as `spindle vm
    snapshot --live` drives it; QEMU's final query-migrate."""
    src.q.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40, "downtime-limit": a.downtime})
    src.q.cmd("migrate-set-capabilities", capabilities=[{"capability": "pause-before-switchover", "state": True}])
    if a.paused:
        src.q.cmd("stop")
    src.q.cmd("migrate", uri=f"exec:cat > {state}")
    t0, limit, doubles_at = time.time(), a.downtime, 5.0
    while True:
        if time.time() - t0 > doubles_at and limit < 60000:
            limit, doubles_at = min(limit * 2, 60000), doubles_at + 5.0
            src.q.cmd("migrate-set-parameters", **{"downtime-limit": limit})
        m = src.q.cmd("query-migrate")
        if m.get("status") == "pre-switchover":
            src.q.cmd("migrate-continue", state="pre-switchover")
        elif m.get("status") == "completed":
            return m
        elif m.get("status") in ("failed", "cancelled"):
            raise RuntimeError(f"migration {m['status']}: {m}")
        time.sleep(0.005)


def check(dst, before, at_end):
    """What is wrong with the restored guest ('' when nothing is)."""
    if a.gio:
        m = dst.mark()
        dst.send("V1")
        held = dst.wait(m, "GIO-HELD-CHECKED n=1")
        settle(dst, 3)
        m = dst.mark()
        dst.send("S")
        dst.wait(m, "GIO-SUMMARY", 120)
        return "" if held.endswith("hold_failures=0") else held
    dst.wait(0, "COUNT ")
    resumed = dst.counts()[0]
    if not before <= resumed <= at_end + 3:
        return f"the counter resumed at {resumed}; the switch-over was between {before} and {at_end}"
    dst.wait_count(resumed + 25)
    m = dst.mark()
    dst.send("V")
    disks = dst.wait(m, "DISK vda") + " / " + dst.wait(m, "DISK vdb")
    if "TAG-vda-v1" not in disks or "TAG-vdb-v1" not in disks:
        return f"disks: {disks}"
    m = dst.mark()
    dst.send("W2")
    dst.wait(m, "WROTE v2")
    return ""


def run(i, base):
    d = f"{a.out}/{i}"
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    rd = initrd(d)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", f"{d}/a.qcow2", "64M"], check=True)
    if base:
        shutil.copy(base, f"{d}/base.raw")
    else:
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", f"{d}/base.raw", "64M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", f"{d}/base.raw",
                    f"{d}/b.qcow2"], check=True)
    disks = [f"{d}/a.qcow2", f"{d}/b.qcow2"]
    src = Vm(d, "src", rd, disks)
    if a.gio:
        src.wait(0, "GIO-PROGRESS", 180)
        settle(src, 4)
    else:
        src.wait(0, "WROTE v1", 180)
        src.wait_count(10)
    before = (src.counts() or [0])[-1]
    state = f"{d}/state"
    m = migrate(src, state)
    at_end = (src.counts() or [0])[-1]
    open(f"{d}/src-console.txt", "w").write(src.console())
    src.kill()
    dst = Vm(d, "dst", rd, disks, incoming=f"exec:cat {state}")
    if a.paused:
        # The guest stays paused after an incoming stop-copy migration.
        while dst.q.cmd("query-status")["status"] != "paused":
            time.sleep(0.1)
        dst.q.cmd("cont")
    try:
        why = check(dst, before, at_end)
    except TimeoutError as e:
        why = str(e)
    console = dst.console()
    open(f"{d}/dst-console.txt", "w").write(console)
    dst.kill()
    trouble = [l for l in console.splitlines() if any(b in l for b in BAD)]
    if trouble:
        why = f"{why} kernel: {trouble[0].strip()}".strip()
    os.remove(state)
    line = (f"{i} {'FAIL' if why else 'ok'} dirty-syncs={m['ram']['dirty-sync-count']} "
            f"downtime={m.get('downtime')}ms state={m['ram']['transferred']} {why}").rstrip()
    print(line, flush=True)
    with open(f"{a.out}/summary", "a") as f:
        f.write(line + "\n")
    return not why


base = None
if a.gio:
    base = f"{a.out}/gio-base.raw"
    if not os.path.exists(base):
        prefill(base)
fails = sum(not run(i, base) for i in range(1, a.runs + 1))
line = f"TOTAL runs={a.runs} fail={fails}"
print(line)
with open(f"{a.out}/summary", "a") as f:
    f.write(line + "\n")

#!/usr/bin/env python3
"""VM snapshots of a running QEMU: `spindle vm snapshot` / `restore` against
QEMU 7.2's HMP savevm / loadvm of the same guest, and the `--live` pause.

One run, one file system, REPS pairs, the order alternating within a pair.
The guest: RAM_MB of random RAM (a file in /dev/shm, off the device), TCG,
vCPUs stopped (-S) for the stop-copy rows, as bench/vmstate.py. QEMU's run
has a qcow2 disk opened by QEMU itself (cache=none, aio=native); Spindle's
has the same kind of qcow2 served by `spindle serve` as a vhost-user-blk
disk, the VM state going into it. `vm restore` goes into a new QEMU started
with -S -incoming defer. The live row runs the guest (firmware idling, no
boot disk: an idle guest) and reads the pause `vm snapshot --live` reports.
A second table does the same with a booted guest (the test guest's
kernel and initramfs from tests/guest/build.sh, 256 MiB of random data in
its tmpfs, then idle): savevm against `vm snapshot`, each one's pause, and
the `--live` pause. Paired column: the mean of the per-pair QEMU/Spindle
time ratios, with its 95% confidence interval (Student's t). Device figures: fio 1 MiB QD8
O_DIRECT. Needs root (drop caches), fio, qemu-system-x86_64, qemu-img.

  bench/vmsnap.py [DIR]   env: RAM_MB=2048 REPS=3 SPINDLE=path BOOTED=1
"""
import atexit, json, os, re, socket, statistics, subprocess, sys, time

import vhost
from qmp import Qmp
from vhost import ci95

DIR = sys.argv[1] if len(sys.argv) > 1 else "/var/tmp/spindle-bench-vmsnap"
RAM_MB = int(os.environ.get("RAM_MB", "2048"))
REPS = int(os.environ.get("REPS", "3"))
SP = os.environ.get("SPINDLE", vhost.SPINDLE)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAM = f"/dev/shm/spindle-bench-ram-{RAM_MB}.bin"
DISK = "1G"
PROCS = []  # every QEMU and daemon started, ended at exit (also on an error)


@atexit.register
def _cleanup():
    for p in PROCS:
        if p.poll() is None:
            p.kill()


def sh(*args):
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(args)}: exit {r.returncode}\n{r.stdout}{r.stderr}")
    return r.stdout


def wait_path(p, proc, what):
    end = time.time() + 60
    while not os.path.exists(p):
        if proc.poll() is not None or time.time() > end:
            sys.exit(f"{what}: {p} never appeared")
        time.sleep(0.02)


class Qemu:
    """A TCG QEMU with RAM from `mem` and one disk (`disk` args)."""

    def __init__(self, name, mem, disk, extra=()):
        self.sock = os.path.join(DIR, name + ".qmp")
        # QEMU serves one client per QMP socket: one for `spindle vm`.
        self.vmsock = os.path.join(DIR, name + "-spindle.qmp")
        for p in (self.sock, self.vmsock):
            if os.path.exists(p):
                os.remove(p)
        args = ["qemu-system-x86_64", "-accel", "tcg", "-nodefaults", "-display", "none",
                "-m", f"{RAM_MB}M", "-object", mem, "-numa", "node,memdev=ram0",
                "-qmp", f"unix:{self.sock},server=on,wait=off",
                "-qmp", f"unix:{self.vmsock},server=on,wait=off", *disk, *extra]
        self.p = subprocess.Popen(args, stderr=open(os.path.join(DIR, name + ".err"), "w"))
        PROCS.append(self.p)
        self.q = Qmp(self.sock, self.p)
        self.cmd, self.hmp = self.q.cmd, self.q.hmp

    def quit(self):
        try:
            self.cmd("quit")
        except Exception:
            pass
        self.p.wait(timeout=60)


def file_ram(share):
    return f"memory-backend-file,id=ram0,size={RAM_MB}M,mem-path={RAM},share={share}"


MEMFD = f"memory-backend-memfd,id=ram0,size={RAM_MB}M,share=on"
# The same, its pages allocated when QEMU starts (before the timing), not
# on first touch while the VM state loads.
MEMFD_PREALLOC = MEMFD + ",prealloc=on"
STATE = f"/dev/shm/spindle-bench-state-{RAM_MB}.bin"


def timed(fn):
    vhost.drop_caches()
    t = time.monotonic()
    fn()
    os.sync()
    return time.monotonic() - t


def qemu_pair(n):
    img = os.path.join(DIR, f"qemu{n}.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", img, DISK)
    q = Qemu(f"q{n}", file_ram("off"),
             ["-drive", f"file={img},format=qcow2,if=none,id=d0,cache=none,aio=native",
              "-device", "virtio-blk-pci,drive=d0"], ["-S"])
    save = timed(lambda: q.hmp("savevm s1"))
    load = timed(lambda: q.hmp("loadvm s1"))
    q.quit()
    size = json.loads(sh("qemu-img", "info", "--output", "json", img))["snapshots"][0]["vm-state-size"]
    os.remove(img)
    return save, load, size


class Serve:
    def __init__(self, n):
        self.img = os.path.join(DIR, f"sp{n}.qcow2")
        sh("qemu-img", "create", "-q", "-f", "qcow2", self.img, DISK)
        self.vsock = os.path.join(DIR, f"sp{n}.sock")
        self.ctl = os.path.join(DIR, f"ctl{n}.sock")
        for p in (self.vsock, self.ctl):
            if os.path.exists(p):
                os.remove(p)
        cfg = os.path.join(DIR, f"sp{n}.toml")
        with open(cfg, "w") as f:
            f.write(f'control = "{self.ctl}"\n[[export]]\nname = "d0"\nimage = "{self.img}"\n'
                    f'socket = "{self.vsock}"\n')
        self.p = subprocess.Popen([SP, "serve", "--config", cfg], stdout=subprocess.DEVNULL,
                                  stderr=open(os.path.join(DIR, f"sp{n}.log"), "w"))
        PROCS.append(self.p)
        wait_path(self.vsock, self.p, "spindle serve")
        wait_path(self.ctl, self.p, "spindle serve")

    def disk(self):
        return ["-chardev", f"socket,id=c0,path={self.vsock}",
                "-device", "vhost-user-blk-pci,chardev=c0,num-queues=1"]

    def vm(self, qmp, *args):
        return sh(SP, "vm", "--qmp", qmp, "-c", self.ctl, *args)

    def ctl_json(self, req):
        c = socket.socket(socket.AF_UNIX)
        c.connect(self.ctl)
        c.sendall((json.dumps(req) + "\n").encode())
        line = c.makefile().readline()
        c.close()
        return json.loads(line)

    def wait_disk(self, q):
        """Until the daemon sees QEMU `q` on the export."""
        end = time.time() + 60
        while time.time() < end:
            if self.ctl_json({"cmd": "vm_disks", "pid": q.p.pid}).get("disks"):
                return
            time.sleep(0.05)
        sys.exit("the QEMU never connected to spindle serve")

    def stop(self):
        self.p.terminate()
        self.p.wait(timeout=60)
        sh("qemu-img", "check", self.img)
        os.remove(self.img)


def spindle_pair(n):
    s = Serve(n)
    q = Qemu(f"s{n}", file_ram("on"), s.disk(), ["-S"])
    s.wait_disk(q)
    save = timed(lambda: s.vm(q.vmsock, "snapshot", "s1"))
    q.quit()
    q = Qemu(f"r{n}", MEMFD, s.disk(), ["-S", "-incoming", "defer"])
    s.wait_disk(q)
    load = timed(lambda: s.vm(q.vmsock, "restore", "--paused", "s1"))
    q.quit()
    q = Qemu(f"o{n}", MEMFD, s.disk(), ["-S", "-incoming", "defer"])
    s.wait_disk(q)
    load_off = timed(lambda: s.vm(q.vmsock, "restore", "--paused", "--prealloc", "off", "s1"))
    q.quit()
    q = Qemu(f"p{n}", MEMFD_PREALLOC, s.disk(), ["-S", "-incoming", "defer"])
    s.wait_disk(q)
    load_pre = timed(lambda: s.vm(q.vmsock, "restore", "--paused", "s1"))
    q.quit()
    size = json.loads(sh("qemu-img", "info", "-U", "--output", "json", s.img))["snapshots"][0]["vm-state-size"]
    s.stop()
    return save, load, load_off, load_pre, size


def save_state():
    """QEMU's own migration stream of the guest, in tmpfs (for the ceiling)."""
    q = Qemu("st", file_ram("off"), [], ["-S"])
    q.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
    q.cmd("migrate", uri=f"exec:cat > {STATE}")
    while q.cmd("query-migrate").get("status") not in ("completed", "failed"):
        time.sleep(0.01)
    q.quit()
    return os.path.getsize(STATE)


def qemu_ingest(n, mem):
    """How long QEMU takes the stream from tmpfs over a unix socket (what
    `vm restore` sends it over): the ceiling of any restore into it."""
    import threading
    q = Qemu(f"i{n}", mem, [], ["-S", "-incoming", "defer"])
    sock = os.path.join(DIR, f"i{n}.sock")
    if os.path.exists(sock):
        os.remove(sock)

    def feed():
        end = time.time() + 30
        while True:
            try:
                c = socket.socket(socket.AF_UNIX)
                c.connect(sock)
                break
            except OSError:
                if time.time() > end:
                    raise
                time.sleep(0.002)
        with open(STATE, "rb") as f:
            off, size = 0, os.path.getsize(STATE)
            while off < size:
                off += os.sendfile(c.fileno(), f.fileno(), off, size - off)
        c.close()

    t = time.monotonic()
    q.cmd("migrate-incoming", uri=f"unix:{sock}")
    feeder = threading.Thread(target=feed)
    feeder.start()
    while q.cmd("query-status")["status"] == "inmigrate":
        time.sleep(0.002)
    dt = time.monotonic() - t
    feeder.join()
    q.quit()
    return dt


def live_pause(n):
    """The pause of a live snapshot of the running (idle) guest, in s."""
    s = Serve(n)
    q = Qemu(f"l{n}", file_ram("on"), s.disk())
    s.wait_disk(q)
    time.sleep(2)
    out = s.vm(q.vmsock, "snapshot", "--live", "s1")
    q.quit()
    s.stop()
    m = re.search(r"guest paused ([0-9.]+) s", out)
    if not m:
        sys.exit(f"no pause time in: {out}")
    return float(m.group(1))


# The booted guest fills 256 MiB of its RAM (tmpfs) and idles.
GUEST_SCRIPT = "dd if=/dev/urandom of=/tmp/fill bs=1M count=256 2>/dev/null; echo FILLED; while :; do sleep 1; done\n"


def guest_files():
    """The test guest (tests/guest/build.sh) with GUEST_SCRIPT as its test."""
    g = os.path.join(DIR, "guest")
    sh("sh", os.path.join(ROOT, "tests", "guest", "build.sh"), g)
    t = os.path.join(DIR, "guest-test")
    os.makedirs(t, exist_ok=True)
    with open(os.path.join(t, "test.sh"), "w") as f:
        f.write(GUEST_SCRIPT)
    extra = subprocess.run("echo test.sh | cpio -o -H newc 2>/dev/null | gzip", shell=True, cwd=t,
                           check=True, capture_output=True).stdout
    initrd = os.path.join(DIR, "booted-initrd.gz")
    with open(os.path.join(g, "base.cpio.gz"), "rb") as f, open(initrd, "wb") as o:
        o.write(f.read() + extra)
    return os.path.join(g, "vmlinuz"), initrd


def booted(name, disk, kernel, initrd):
    """A booted test guest; returns once its RAM is filled."""
    log = os.path.join(DIR, name + ".console")
    q = Qemu(name, MEMFD, disk, ["-kernel", kernel, "-initrd", initrd, "-append",
                                 "console=ttyS0 quiet panic=-1", "-serial", f"file:{log}", "-no-reboot"])
    end = time.time() + 120
    while time.time() < end:
        if os.path.exists(log) and "FILLED" in open(log, errors="replace").read():
            return q
        if q.p.poll() is not None:
            sys.exit(f"the booted guest {name} exited:\n{open(log, errors='replace').read()}")
        time.sleep(0.2)
    sys.exit(f"the booted guest {name} did not fill its RAM in 120 s")


def booted_qemu(n, kernel, initrd):
    """HMP savevm of the running booted guest: its time is its pause."""
    img = os.path.join(DIR, f"bq{n}.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", img, DISK)
    q = booted(f"bq{n}", ["-drive", f"file={img},format=qcow2,if=none,id=d0,cache=none,aio=native",
                          "-device", "virtio-blk-pci,drive=d0"], kernel, initrd)
    t = timed(lambda: q.hmp("savevm s1"))
    q.quit()
    size = json.loads(sh("qemu-img", "info", "--output", "json", img))["snapshots"][0]["vm-state-size"]
    os.remove(img)
    return t, size


def paused_of(out):
    m = re.search(r"guest paused ([0-9.]+) s", out)
    if not m:
        sys.exit(f"no pause time in: {out}")
    return float(m.group(1))


def booted_spindle(n, kernel, initrd, live):
    """`vm snapshot` (or `--live`) of the running booted guest: total time and pause."""
    s = Serve(500 + 2 * n + live)
    q = booted(f"bs{n}{'l' if live else ''}", s.disk(), kernel, initrd)
    s.wait_disk(q)
    args = ["snapshot", "--live", "s1"] if live else ["snapshot", "s1"]
    out = []
    t = timed(lambda: out.append(s.vm(q.vmsock, *args)))
    q.quit()
    s.stop()
    return t, paused_of(out[0])


def booted_table():
    kernel, initrd = guest_files()
    r = {"q": [], "s": [], "sp": [], "lp": [], "lt": []}
    size = 0
    for n in range(REPS):
        order = ["qemu", "spindle"] if n % 2 == 0 else ["spindle", "qemu"]
        for who in order:
            if who == "qemu":
                t, size = booted_qemu(n, kernel, initrd)
                r["q"].append(t)
            else:
                t, pause = booted_spindle(n, kernel, initrd, False)
                r["s"].append(t)
                r["sp"].append(pause)
        t, pause = booted_spindle(n, kernel, initrd, True)
        r["lt"].append(t)
        r["lp"].append(pause)
        print(f"booted pair {n + 1}: savevm {r['q'][-1]:.2f} s, vm snapshot {r['s'][-1]:.2f} s "
              f"(paused {r['sp'][-1]:.3f} s), --live {r['lt'][-1]:.2f} s (paused {r['lp'][-1]:.3f} s)",
              file=sys.stderr)
    mean = statistics.mean
    rs = [a / b for a, b in zip(r["q"], r["s"])]
    ps = [a / b for a, b in zip(r["q"], r["sp"])]
    print()
    print(f"| booted {RAM_MB} MiB guest (256 MiB filled), {REPS} pairs | time s (mean) | guest pause s (mean ± 95% CI) | QEMU/Spindle |")
    print("|---|---|---|---|")
    print(f"| QEMU 7.2 HMP savevm ({size >> 20} MiB state) | {mean(r['q']):.2f} | {mean(r['q']):.3f} ± {ci95(r['q']):.3f} | |")
    print(f"| `spindle vm snapshot` | {mean(r['s']):.2f} | {mean(r['sp']):.3f} ± {ci95(r['sp']):.3f} | time {mean(rs):.1f}x ± {ci95(rs):.1f}, pause {mean(ps):.1f}x ± {ci95(ps):.1f} |")
    print(f"| `spindle vm snapshot --live` | {mean(r['lt']):.2f} | {mean(r['lp']):.3f} ± {ci95(r['lp']):.3f} | |")


def fio(rw, path):
    out = sh("fio", "--name=dev", f"--filename={path}", f"--rw={rw}", "--bs=1M", "--iodepth=8",
             "--direct=1", "--ioengine=io_uring", f"--size={RAM_MB}M", "--output-format=json")
    j = json.loads(out)["jobs"][0]["write" if rw == "write" else "read"]
    return j["bw_bytes"] / (1 << 20)


def main():
    os.makedirs(DIR, exist_ok=True)
    if "SPINDLE" not in os.environ:
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "spindle"], cwd=ROOT, check=True)
    if not os.path.exists(RAM) or os.path.getsize(RAM) != RAM_MB << 20:
        with open(RAM, "wb") as f:
            for _ in range(RAM_MB):
                f.write(os.urandom(1 << 20))
    scratch = os.path.join(DIR, "fio.bin")
    dev_w = fio("write", scratch)
    vhost.drop_caches()
    dev_r = fio("read", scratch)
    os.remove(scratch)

    state = save_state()
    res = {"qs": [], "ql": [], "ss": [], "sl": [], "so": [], "sp": [], "ci": [], "cp": []}
    sizes = {}
    for n in range(REPS):
        order = ["qemu", "spindle"] if n % 2 == 0 else ["spindle", "qemu"]
        for who in order:
            if who == "qemu":
                a, b, sizes["qemu"] = qemu_pair(n)
                res["qs"].append(a)
                res["ql"].append(b)
            else:
                a, b, c, d, sizes["spindle"] = spindle_pair(n)
                res["ss"].append(a)
                res["sl"].append(b)
                res["so"].append(c)
                res["sp"].append(d)
        res["ci"].append(qemu_ingest(n, MEMFD))
        res["cp"].append(qemu_ingest(100 + n, MEMFD_PREALLOC))
        print(f"pair {n + 1}: savevm {res['qs'][-1]:.2f} s, loadvm {res['ql'][-1]:.2f} s, "
              f"vm snapshot {res['ss'][-1]:.2f} s, vm restore {res['sl'][-1]:.2f} s "
              f"(--prealloc off {res['so'][-1]:.2f} s, into prealloc=on {res['sp'][-1]:.2f} s), QEMU ingest {res['ci'][-1]:.2f} s "
              f"(prealloc {res['cp'][-1]:.2f} s)", file=sys.stderr)
    pauses = [live_pause(100 + n) for n in range(REPS)]

    mib = lambda size, t: size / t / (1 << 20)
    mean = statistics.mean

    def ratio(q, s):
        rs = [a / b for a, b in zip(res[q], res[s])]
        return f"{mean(rs):.1f}x ± {ci95(rs):.1f}"

    qs, ss = sizes["qemu"], sizes["spindle"]
    print(f"| {RAM_MB} MiB guest, {REPS} pairs | time s (mean) | MiB/s | of device | QEMU/Spindle time |")
    print("|---|---|---|---|---|")
    print(f"| device sequential write (fio 1M QD8 O_DIRECT) | | {dev_w:.0f} | 100% | |")
    print(f"| device sequential read (fio 1M QD8 O_DIRECT) | | {dev_r:.0f} | 100% | |")
    for label, key, size, dev in [
        (f"QEMU 7.2 HMP savevm, cache=none ({qs >> 20} MiB state)", "qs", qs, dev_w),
        (f"`spindle vm snapshot` ({ss >> 20} MiB state)", "ss", ss, dev_w),
        ("QEMU 7.2 HMP loadvm, cache=none", "ql", qs, dev_r),
        ("`spindle vm restore --paused` into a new QEMU (it preallocates the RAM)", "sl", ss, dev_r),
        ("`spindle vm restore --paused --prealloc off`", "so", ss, dev_r),
        ("`spindle vm restore --paused`, new QEMU's RAM `prealloc=on` at its start", "sp", ss, dev_r),
        (f"ceiling: QEMU taking its own stream from tmpfs ({state >> 20} MiB, unix socket)", "ci", state, dev_r),
        ("ceiling, RAM `prealloc=on`", "cp", state, dev_r),
    ]:
        t = mean(res[key])
        pair = ratio("qs", "ss") if key == "ss" else ratio("ql", key) if key in ("sl", "so", "sp") else ""
        print(f"| {label} | {t:.2f} | {mib(size, t):.0f} | {mib(size, t) / dev:.0%} | {pair} |")
    print(f"| `spindle vm snapshot --live`, guest pause (idle guest) | {mean(pauses):.3f} ± {ci95(pauses):.3f} | | | |")
    if os.environ.get("BOOTED", "1") != "0":
        booted_table()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""VM state save/load: the device, QEMU 7.2 savevm/loadvm, and Spindle.

One run, one file system. Prints a markdown table. Needs root (drop caches),
fio, qemu-system-x86_64, qemu-img, and ~10 GiB free in the bench dir.

  bench/vmstate.py [DIR]      (default /var/tmp/spindle-bench-vm; SIZE_MB=2048)
"""
import json, os, subprocess, sys, time

from qmp import Qmp

DIR = sys.argv[1] if len(sys.argv) > 1 else "/var/tmp/spindle-bench-vm"
SIZE_MB = int(os.environ.get("SIZE_MB", "2048"))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SP = os.path.join(ROOT, "target/release/spindle")
SHM = "/dev/shm/spindle-bench-stream.bin"  # the stream lives in RAM, off the device


def sh(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw).stdout


def drop():
    os.sync()
    try:
        open("/proc/sys/vm/drop_caches", "w").write("3")
    except OSError:
        pass


def timed(fn):
    drop()
    t = time.monotonic()
    fn()
    os.sync()
    return time.monotonic() - t


class Qemu:
    def __init__(self, name, ram, drive=None):
        self.sock = os.path.join(DIR, name + ".qmp")
        args = ["qemu-system-x86_64", "-accel", "tcg", "-S", "-nodefaults", "-display", "none",
                "-m", f"{SIZE_MB}M", "-object",
                f"memory-backend-file,id=ram0,size={SIZE_MB}M,mem-path={ram},share=off",
                "-machine", "pc,memory-backend=ram0", "-qmp", f"unix:{self.sock},server=on,wait=off"]
        if drive:
            args += ["-drive", f"file={drive},format=qcow2,if=none,id=d0,cache=none,aio=native"]
        self.p = subprocess.Popen(args)
        self.q = Qmp(self.sock, self.p)
        self.cmd, self.hmp = self.q.cmd, self.q.hmp

    def quit(self):
        try:
            self.cmd("quit")
        except Exception:
            pass
        self.p.wait(timeout=60)


def fio(rw, path):
    out = sh("fio", "--name=dev", f"--filename={path}", f"--rw={rw}", "--bs=1M", "--iodepth=8",
             "--direct=1", "--ioengine=io_uring", f"--size={SIZE_MB}M", "--output-format=json")
    j = json.loads(out)["jobs"][0]["write" if rw == "write" else "read"]
    return j["bw_bytes"] / (1 << 20)


def main():
    os.makedirs(DIR, exist_ok=True)
    subprocess.run(["cargo", "build", "--release", "-q"], cwd=ROOT, check=True)
    ram = os.path.join(DIR, "ram.bin")
    if not os.path.exists(ram) or os.path.getsize(ram) != SIZE_MB << 20:
        with open(ram, "wb") as f:
            for _ in range(SIZE_MB):
                f.write(os.urandom(1 << 20))
    # Read a cold file written long before (reading back what fio just wrote
    # hits caches below the guest), then write a scratch file.
    drop()
    dev_r = fio("read", ram)
    scratch = os.path.join(DIR, "fio.bin")
    dev_w = fio("write", scratch)
    os.remove(scratch)

    # QEMU savevm / loadvm, cache=none.
    img = os.path.join(DIR, "qemu.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", img, "1G")
    q = Qemu("q", ram, img)
    t_savevm = timed(lambda: q.hmp("savevm s1"))
    t_loadvm = timed(lambda: q.hmp("loadvm s1"))
    q.quit()
    state_bytes = json.loads(sh("qemu-img", "info", "--output", "json", img))["snapshots"][0]["vm-state-size"]

    # The same RAM as a migration stream, captured into RAM-backed /dev/shm.
    m = Qemu("m", ram)
    m.cmd("migrate-set-parameters", **{"max-bandwidth": 100_000_000_000})
    m.cmd("migrate", uri=f"exec:cat > {SHM}")
    while m.cmd("query-migrate")["status"] not in ("completed", "failed"):
        time.sleep(0.05)
    m.quit()
    stream = os.path.getsize(SHM)

    img2 = os.path.join(DIR, "spindle.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", img2, "1G")
    t_save = timed(lambda: sh(SP, "img", "snapshot", "-c", "s1", "--vmstate", SHM, img2))
    t_load = timed(lambda: sh(SP, "img", "snapshot", "-x", "s1", "--vmstate", "/dev/null", img2))
    sh("qemu-img", "check", img2)
    os.remove(SHM)

    mib = lambda b, t: b / t / (1 << 20)
    print(f"| {SIZE_MB} MiB random guest RAM | time s | MiB/s | of device |")
    print("|---|---|---|---|")
    print(f"| device sequential write (fio 1M QD8 O_DIRECT) | | {dev_w:.0f} | 100% |")
    print(f"| device sequential read (fio 1M QD8 O_DIRECT) | | {dev_r:.0f} | 100% |")
    print(f"| QEMU savevm, cache=none ({state_bytes >> 20} MiB state) | {t_savevm:.2f} | {mib(state_bytes, t_savevm):.0f} | {mib(state_bytes, t_savevm) / dev_w:.0%} |")
    print(f"| QEMU loadvm, cache=none | {t_loadvm:.2f} | {mib(state_bytes, t_loadvm):.0f} | {mib(state_bytes, t_loadvm) / dev_r:.0%} |")
    print(f"| Spindle save ({stream >> 20} MiB migration stream) | {t_save:.2f} | {mib(stream, t_save):.0f} | {mib(stream, t_save) / dev_w:.0%} |")
    print(f"| Spindle extract | {t_load:.2f} | {mib(stream, t_load):.0f} | {mib(stream, t_load) / dev_r:.0%} |")
    print(f"| speed-up save / load vs QEMU | {t_savevm / t_save:.1f}x / {t_loadvm / t_load:.1f}x | | |")


if __name__ == "__main__":
    main()

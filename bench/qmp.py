"""A QMP client for the benchmarks: one connection, commands in order,
events skipped."""
import json, os, socket, sys, time


class Qmp:
    def __init__(self, path, proc=None, wait=60):
        end = time.time() + wait
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                if (proc is not None and proc.poll() is not None) or time.time() > end:
                    sys.exit(f"QMP socket {path} never accepted a connection")
                time.sleep(0.05)
        self.f = self.s.makefile("rw")
        self.f.readline()
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "event" not in r:
                if "error" in r:
                    raise RuntimeError(f"{name}: {r}")
                return r["return"]

    def hmp(self, line):
        """An HMP command that must print nothing (HMP reports errors as text)."""
        out = self.cmd("human-monitor-command", **{"command-line": line})
        if out.strip():
            raise RuntimeError(f"{line}: {out}")

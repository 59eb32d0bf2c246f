"""Output throughput through `ctr run`: our shim (io.containerd.pyrunc.v2) against the Go shim, same run.

    python bench/io_bench.py [--pipe-mib 512] [--tty-mib 128] [--reps 3] [--json out.json]

Needs root, containerd, ctr, runc, containerd-shim-runc-v2 and busybox-static. A private containerd
(tools/stack.PrivateContainerd) runs a one-layer busybox image built with tools/stack's helpers; every
repetition runs the Go shim and ours one after the other (alternating which goes first), so drift on the
machine hits both alike.

Cases, each ``ctr run --rm`` of ``dd if=/dev/zero bs=64k`` in the container:

* stdout: dd writes to its stdout; ctr's stdout is a pipe this process reads;
* stderr: dd writes to its stderr (``of=/proc/self/fd/3 3>&2``); ctr's stderr is the pipe read;
* tty: ``ctr run -t``, dd writes to its terminal; ctr runs on a pty of ours whose master we read.

Reported per case (medians over the repetitions): MB/s over the transfer (first byte to last byte as
this process receives them, so container start and teardown are left out), MB/s over the whole
``ctr run`` (start to exit), the ratio ours/Go of the transfer rate (above 1: ours is faster), and the
peak RSS of the largest shim process serving the run (sampled every 50 ms; it must not grow with the
amount of output). The byte count is checked: a run
that delivers less than it should is reported as an error, not as a rate.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.stack import (  # noqa: E402
    PYRUNC,
    RUNC_V2,
    PrivateContainerd,
    build_busybox_rootfs,
    build_oci_image_tar,
    missing_tools,
)

IMAGE = "localhost/pyrunc-bench/busybox:io"
MIB = 1 << 20
RUNTIMES = {"go": RUNC_V2, "pyrunc": PYRUNC}
BS = 64 * 1024


@dataclass
class Sample:
    bytes: int
    transfer_s: float
    wall_s: float
    rss_kib: int


@dataclass
class Case:
    name: str
    size: int
    samples: dict[str, list[Sample]] = field(default_factory=lambda: {rt: [] for rt in RUNTIMES})
    errors: dict[str, list[str]] = field(default_factory=lambda: {rt: [] for rt in RUNTIMES})

    def rate(self, rt: str, kind: str = "transfer") -> float | None:
        values = [s.bytes / getattr(s, f"{kind}_s") / 1e6 for s in self.samples[rt] if getattr(s, f"{kind}_s") > 0]
        return statistics.median(values) if values else None

    def rss_mib(self, rt: str) -> float | None:
        values = [s.rss_kib / 1024 for s in self.samples[rt] if s.rss_kib]
        return max(values) if values else None


# -- measuring -----------------------------------------------------------------------------------------
class Receiver:
    """Reads an fd to EOF (or EIO, for a pty master) in a thread, timing the first and last byte."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.bytes = 0
        self.first = self.last = 0.0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        buf = bytearray(MIB)
        while True:
            try:
                n = os.readv(self.fd, [buf])
            except OSError:  # EIO on a pty master: the last slave fd closed
                break
            if not n:
                break
            now = time.perf_counter()
            if not self.bytes:
                self.first = now
            self.last = now
            self.bytes += n

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)


class ShimMemory:
    """Peak RSS of the largest shim process serving our containerd, sampled in a thread."""

    def __init__(self, stack: PrivateContainerd) -> None:
        self.stack = stack
        self.peak_kib = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for pid in self.stack.shim_pids():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            self.peak_kib = max(self.peak_kib, int(line.split()[1]))

    def stop(self) -> int:
        self._stop.set()
        self.thread.join(5)
        return self.peak_kib


def _ctr(stack: PrivateContainerd, *args: str) -> list[str]:
    return ["ctr", "--address", stack.address, "--namespace", stack.namespace, *args]


def run_pipe(stack: PrivateContainerd, runtime: str, stream: str, size: int) -> Sample:
    count = size // BS
    dd = f"dd if=/dev/zero bs={BS} count={count}"
    script = f"{dd} 2>/dev/null" if stream == "stdout" else f"{dd} of=/proc/self/fd/3 3>&2 2>/dev/null"
    r, w = os.pipe()
    fcntl.fcntl(r, fcntl.F_SETPIPE_SZ, MIB)
    sink = os.open(os.devnull, os.O_WRONLY)
    out, err = (w, sink) if stream == "stdout" else (sink, w)
    mem = ShimMemory(stack)
    t0 = time.perf_counter()
    proc = subprocess.Popen(_ctr(stack, "run", "--rm", "--runtime", runtime, IMAGE, f"io-{uuid.uuid4().hex[:8]}",
                                 "sh", "-c", script), stdin=subprocess.DEVNULL, stdout=out, stderr=err)
    os.close(w)
    os.close(sink)
    return _collect(proc, r, mem, t0, size, "ctr")


def run_tty(stack: PrivateContainerd, runtime: str, size: int) -> Sample:
    count = size // BS
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    mem = ShimMemory(stack)
    t0 = time.perf_counter()
    proc = subprocess.Popen(_ctr(stack, "run", "-t", "--rm", "--runtime", runtime, IMAGE,
                                 f"io-{uuid.uuid4().hex[:8]}", "sh", "-c", f"dd if=/dev/zero bs={BS} count={count} "
                                 "2>/dev/null"), stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    return _collect(proc, master, mem, t0, size, "ctr -t")


def _collect(proc: subprocess.Popen, fd: int, mem: ShimMemory, t0: float, size: int, what: str) -> Sample:
    """Read ``fd`` (ctr's output) to the end, wait for ctr, and close ``fd``; ctr is killed on failure."""
    recv = Receiver(fd)
    try:
        rc = proc.wait(600)
        wall = time.perf_counter() - t0
        recv.join(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        rss = mem.stop()
        os.close(fd)
    if rc != 0 or recv.bytes != size:
        raise RuntimeError(f"{what} exited {rc} after {recv.bytes} of {size} bytes")
    return Sample(recv.bytes, recv.last - recv.first, wall, rss)


# -- reporting -----------------------------------------------------------------------------------------
def _fmt(x: float | None, digits: int = 0) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def table(cases: list[Case]) -> str:
    rows = ["| case | size | Go MB/s | pyrunc MB/s | pyrunc/Go | Go MB/s (whole run) | pyrunc MB/s (whole run) "
            "| Go shim RSS MiB | pyrunc shim RSS MiB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cases:
        go, py = c.rate("go"), c.rate("pyrunc")
        ratio = py / go if go and py else None
        rows.append(f"| {c.name} | {c.size // MIB} MiB | {_fmt(go)} | {_fmt(py)} | {_fmt(ratio, 2)} "
                    f"| {_fmt(c.rate('go', 'wall'))} | {_fmt(c.rate('pyrunc', 'wall'))} "
                    f"| {_fmt(c.rss_mib('go'), 1)} | {_fmt(c.rss_mib('pyrunc'), 1)} |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipe-mib", type=int, default=512, help="bytes per stdout/stderr run, in MiB")
    ap.add_argument("--tty-mib", type=int, default=128, help="bytes per tty run, in MiB")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cases", default="stdout,stderr,tty")
    ap.add_argument("--json", type=Path, help="also write the samples here")
    args = ap.parse_args()
    if os.geteuid() != 0 or missing_tools():
        print(f"needs root and {', '.join(missing_tools()) or 'nothing else'}", file=sys.stderr)
        return 2

    cases = [Case(name, (args.tty_mib if name == "tty" else args.pipe_mib) * MIB) for name in args.cases.split(",")]
    stack = PrivateContainerd(namespace="io-bench")
    workdir = Path(tempfile.mkdtemp(prefix="io-bench-"))
    try:
        stack.start()
        rootfs = build_busybox_rootfs(workdir / "rootfs")
        tar = build_oci_image_tar(rootfs, workdir / "image.tar", IMAGE)
        stack.ctr("image", "import", "--no-unpack", str(tar))
        stack.ctr("image", "unpack", "--snapshotter", "overlayfs", IMAGE, check=False)  # ctr run unpacks anyway
        for rt in RUNTIMES.values():  # warm-up: page cache, snapshot, first shim start
            stack.ctr("run", "--rm", "--runtime", rt, IMAGE, f"warm-{uuid.uuid4().hex[:6]}", "true")
        for rep in range(args.reps):
            for case in cases:
                order = list(RUNTIMES) if rep % 2 == 0 else list(reversed(RUNTIMES))
                for tag in order:
                    try:
                        if case.name == "tty":
                            sample = run_tty(stack, RUNTIMES[tag], case.size)
                        else:
                            sample = run_pipe(stack, RUNTIMES[tag], case.name, case.size)
                        case.samples[tag].append(sample)
                        print(f"rep {rep + 1} {case.name:6} {tag:6} {sample.bytes / sample.transfer_s / 1e6:8.0f} MB/s "
                              f"({sample.wall_s:.2f} s run, shim RSS {sample.rss_kib / 1024:.1f} MiB)", flush=True)
                    except Exception as e:  # noqa: BLE001 - reported, the bench goes on
                        case.errors[tag].append(str(e))
                        print(f"rep {rep + 1} {case.name:6} {tag:6} ERROR {e}", flush=True)
    finally:
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(f"{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"kernel {platform.release()}, {args.reps} repetitions (medians; RSS: max)")
    print()
    print(table(cases))
    for c in cases:
        for tag, errs in c.errors.items():
            for e in errs:
                print(f"error: {c.name} {tag}: {e}")
    if args.json:
        report = {c.name: {"size": c.size, "errors": c.errors,
                           "samples": {tag: [s.__dict__ for s in ss] for tag, ss in c.samples.items()}} for c in cases}
        args.json.write_text(json.dumps({"python": platform.python_version(), "cpus": os.cpu_count(),
                                         "kernel": platform.release(), "cases": report}, indent=2))
    return 1 if any(e for c in cases for e in c.errors.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

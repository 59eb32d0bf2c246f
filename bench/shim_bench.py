"""Our shim (io.containerd.pyrunc.v2) against containerd's Go shim (io.containerd.runc.v2), same run.

    python bench/shim_bench.py [--quick] [--json out.json] [--md out.md]

Needs root, containerd, ctr, runc, containerd-shim-runc-v2 and busybox-static. A private containerd
(tools/stack.PrivateContainerd: own root/state/socket under /tmp, our shim first on its PATH) runs a
one-layer busybox image; both runtimes drive the same containerd, image and snapshotter, and every step
alternates between them (go, pyrunc, then pyrunc, go, ...), so drift on the machine hits both alike.

Measured (medians unless said otherwise; every time is wall time of a ``ctr`` command as the bench sees
it, so it includes ctr's own start-up and containerd's work, the same for both runtimes):

* ``ctr run --rm <image> <id> true``;
* detached start: ``ctr run -d ... sleep 1000`` per container, for 10 (and 100) containers, each
  container its own shim (ungrouped) and all containers of a runtime in one shim (grouped: annotation
  ``io.containerd.runc.v2.group``; the group names differ per runtime, ``bench-go`` / ``bench-pyrunc``,
  since both shims name a group's socket by the same hash and would otherwise share one server);
* exec: ``ctr task exec --exec-id X <id> true``, the first in each container and repeats;
* memory: PSS and RSS (``/proc/<pid>/smaps_rollup``) summed over the shim processes that serve the set
  plus their descendants in our pid namespace (helpers; container processes live in their own pid
  namespace and are not counted), divided by the number of containers; after starts and one exec each;
* delete: ``ctr task kill -s KILL``, wait for the ``/tasks/exit`` event, then the time of
  ``ctr task delete`` (containerd's Delete + Shutdown to the shim, and the shim binary's ``delete``
  action where containerd runs it), for every container of every set;
* stdout: ``ctr run --rm <image> <id> head -c N /dev/zero`` with ctr's stdout on /dev/null, N / wall time
  (container start and teardown included; a 1 MiB run through a pipe checks that the bytes arrive);
* exit -> event: the bench SIGKILLs a container's init directly (host pid from ``ctr task ls``, not via
  the shim) and times until ``ctr events`` (a subscriber started at the beginning) prints its
  ``/tasks/exit``: the shim's reaping + publishing + containerd's fan-out + ctr's printing, all on one
  clock (CLOCK_REALTIME). The JSON splits it with the event's own ``exited_at`` (shim reaped the exit)
  and envelope timestamp (shim published it);
* ttrpc: ``containerd.task.v2.Task/State`` round trips straight to a running container's shim socket
  (``bundle/address``) with ``shim.ttrpc.Client`` from this process, 1 and 16 callers on one
  connection, windows alternating between the shims.

``--quick`` (about 1 minute): fewer repetitions, 10 containers only. The full run (a few minutes) adds
the 100-container sets. Failures are reported per metric and runtime; the run goes on. Everything is
cleaned up by tools/stack's stop(), also on errors and Ctrl-C. containerd runs at log level debug (as
tools/stack configures it), so both shims get ``-debug``.
"""

from __future__ import annotations

import argparse
import asyncio
import calendar
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tools.stack import (  # noqa: E402
    PYRUNC,
    RUNC_V2,
    SHIM_NAME,
    PrivateContainerd,
    build_busybox_rootfs,
    build_oci_image_tar,
    missing_tools,
    shim_binary,
)

IMAGE = "localhost/shim-bench/busybox:latest"
NAMESPACE = "shim-bench"
GROUP_ANNOTATION = "io.containerd.runc.v2.group"
RUNTIMES = {"go": RUNC_V2, "pyrunc": PYRUNC}
RTS = tuple(RUNTIMES)
TASK_SERVICE = "containerd.task.v2.Task"
MIB = 1 << 20


@dataclass
class Profile:
    run_rm_reps: int
    sets: tuple[int, ...]
    exec_rounds: int  # on the ungrouped 10-container set; the other sets get one
    ttrpc_rounds: int
    ttrpc_seconds: float
    stdout_bytes: int
    stdout_reps: int
    exit_event_reps: int


QUICK = Profile(run_rm_reps=6, sets=(10,), exec_rounds=2, ttrpc_rounds=2, ttrpc_seconds=1.0,
                stdout_bytes=128 * MIB, stdout_reps=1, exit_event_reps=6)
FULL = Profile(run_rm_reps=20, sets=(10, 100), exec_rounds=3, ttrpc_rounds=3, ttrpc_seconds=2.0,
               stdout_bytes=256 * MIB, stdout_reps=3, exit_event_reps=20)


# -- results --------------------------------------------------------------------------------------


@dataclass
class Metric:
    key: str
    label: str
    unit: str
    better: str  # "lower" or "higher"
    digits: int = 1
    show: bool = True  # in the markdown table (always in the JSON)
    samples: dict[str, list[float]] = field(default_factory=lambda: {rt: [] for rt in RTS})
    fixed: dict[str, float] = field(default_factory=dict)  # a value that is not a median of samples
    errors: dict[str, str] = field(default_factory=dict)
    extra: dict[str, dict] = field(default_factory=lambda: {rt: {} for rt in RTS})

    def ok(self, rt: str) -> bool:
        return rt not in self.errors

    def fail(self, rt: str, error: str) -> None:
        self.errors.setdefault(rt, error)

    def value(self, rt: str) -> float | None:
        if rt in self.fixed:
            return self.fixed[rt]
        return statistics.median(self.samples[rt]) if self.samples[rt] else None

    def ratio(self) -> float | None:
        go, ours = self.value("go"), self.value("pyrunc")
        if go is None or ours is None or go == 0:
            return None
        return ours / go

    def as_json(self) -> dict:
        out = {"key": self.key, "label": self.label, "unit": self.unit, "better": self.better,
               "ratio_ours_over_go": _round(self.ratio(), 3)}
        for rt in RTS:
            out[rt] = {"value": _round(self.value(rt), 4), "n": len(self.samples[rt]),
                       "samples": [_round(s, 4) for s in self.samples[rt]], "error": self.errors.get(rt),
                       **self.extra[rt]}
        return out


def _round(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


class Results:
    def __init__(self) -> None:
        self.metrics: dict[str, Metric] = {}

    def metric(self, key: str, label: str, unit: str, better: str = "lower", digits: int = 1,
               show: bool = True) -> Metric:
        if key not in self.metrics:
            self.metrics[key] = Metric(key, label, unit, better, digits, show)
        return self.metrics[key]

    def table(self) -> str:
        lines = ["| metric | go | pyrunc | ratio pyrunc/go | better |", "|---|---:|---:|---:|---|"]
        for m in self.metrics.values():
            if not m.show:
                continue
            cells = []
            for rt in RTS:
                v = m.value(rt)
                if not m.ok(rt):
                    cell = "FAIL" + (f" after {len(m.samples[rt])}" if m.samples[rt] else "")
                else:
                    cell = "–" if v is None else f"{v:,.{m.digits}f}"
                cells.append(cell)
            r = m.ratio()
            lines.append(f"| {m.label} ({m.unit}) | {cells[0]} | {cells[1]} | "
                         f"{'–' if r is None else f'{r:.2f}'} | {m.better} |")
        return "\n".join(lines)

    def failures(self) -> list[str]:
        return [f"{m.label} [{rt}]: {err}" for m in self.metrics.values() for rt, err in m.errors.items()]


# -- helpers --------------------------------------------------------------------------------------


def _short(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    if isinstance(e, subprocess.TimeoutExpired):
        text = f"timed out after {e.timeout:g}s: {' '.join(map(str, e.cmd[5:]))}"
    return " ".join(text.split())[-300:]


def _go_time_ns(date: str, clock: str, offset: str) -> int:
    """Go's time.Time.String() ("2006-01-02 15:04:05.999999999 -0700") as ns since the epoch."""
    hms, _, frac = clock.partition(".")
    y, mo, d = map(int, date.split("-"))
    h, mi, s = map(int, hms.split(":"))
    sign = -1 if offset.startswith("-") else 1
    off = sign * (int(offset[1:3]) * 3600 + int(offset[3:5]) * 60)
    return (calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0)) - off) * 10**9 + int((frac + "000000000")[:9])


def _rfc3339_ns(text: str) -> int:
    date, _, rest = text.partition("T")
    if rest.endswith("Z"):
        clock, offset = rest[:-1], "+0000"
    else:
        clock, offset = rest[:-6], rest[-6:].replace(":", "")
    return _go_time_ns(date, clock, offset)


@dataclass
class ExitEvent:
    recv_ns: int  # when this process read the line from ctr events
    published_ns: int  # the envelope's timestamp (set by the shim's publisher)
    exited_ns: int  # exited_at (set by the shim when it reaped the process)
    status: int


class EventStream:
    """``ctr events`` in the background; remembers every /tasks/exit by (container id, process id)."""

    def __init__(self, stack: PrivateContainerd) -> None:
        self.proc = stack.ctr_popen("events", stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL)
        self.exits: dict[tuple[str, str], ExitEvent] = {}
        self.cond = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd, buf = self.proc.stdout.fileno(), b""
        try:
            while chunk := os.read(fd, 1 << 16):
                now = time.time_ns()
                *lines, buf = (buf + chunk).split(b"\n")
                for line in lines:
                    self._line(line, now)
        finally:
            with self.cond:
                self.closed = True
                self.cond.notify_all()

    def _line(self, line: bytes, now: int) -> None:
        parts = line.decode(errors="replace").split(" ", 6)
        if len(parts) < 7 or parts[5] != "/tasks/exit":
            return
        try:
            data = json.loads(parts[6])
            event = ExitEvent(now, _go_time_ns(parts[0], parts[1], parts[2]), _rfc3339_ns(data["exited_at"]),
                              int(data.get("exit_status", 0)))
        except (ValueError, KeyError):
            return
        with self.cond:
            self.exits[(data.get("container_id", ""), data.get("id", ""))] = event
            self.cond.notify_all()

    def wait_exit(self, cid: str, process_id: str | None = None, timeout: float = 20) -> ExitEvent:
        key = (cid, process_id or cid)
        deadline = time.monotonic() + timeout
        with self.cond:
            while key not in self.exits:
                left = deadline - time.monotonic()
                if self.closed or left <= 0:
                    raise TimeoutError(f"no /tasks/exit for {cid} from ctr events within {timeout:g}s")
                self.cond.wait(left)
            return self.exits[key]

    def alive(self) -> bool:
        return not self.closed and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.thread.join(3)


def _mem_kb(pid: int) -> dict[str, int]:
    """Pss, Rss and the private part (USS: Private_Clean + Private_Dirty) in kB, from smaps_rollup."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("Pss", "Rss", "Private_Clean", "Private_Dirty"):
            fields[name] = int(rest.split()[0])
    return {"pss": fields.get("Pss", 0), "rss": fields.get("Rss", 0),
            "uss": fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)}


def _proc_table() -> dict[int, tuple[int, bool, list[bytes]]]:
    """pid -> (ppid, in our pid namespace, argv) for every process."""
    my_ns = os.readlink("/proc/self/ns/pid")
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            same_ns = os.readlink(f"/proc/{entry}/ns/pid") == my_ns
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        table[int(entry)] = (ppid, same_ns, argv)
    return table


def _shim_runtime(argv: list[bytes]) -> str:
    """Ours runs as ``python3 .../containerd-shim-pyrunc-v2 ...`` (or the console script itself)."""
    return "pyrunc" if any(os.path.basename(a) == SHIM_NAME.encode() for a in argv[:2]) else "go"


def _shim_id(argv: list[bytes]) -> str:
    for flag in (b"-id", b"--id"):
        if flag in argv[:-1]:
            return argv[argv.index(flag) + 1].decode(errors="replace")
    return ""


def _snapshot_shim(dest: Path) -> Path:
    """A frozen copy of the checkout's shim (shim/ + the cmd/ launcher) with its bytecode compiled.

    What ``pip install`` leaves behind: without it, and with PYTHONDONTWRITEBYTECODE set (as in this
    dev environment; containerd passes its environment on to the shims), every shim process compiles
    all of its modules from source. The copy also keeps concurrent edits of the checkout out of the run.
    """
    shutil.copytree(REPO / "shim", dest / "shim", ignore=shutil.ignore_patterns("__pycache__"))
    (dest / "cmd").mkdir(parents=True)
    shutil.copy2(REPO / "cmd" / SHIM_NAME, dest / "cmd" / SHIM_NAME)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(dest / "shim")], check=True,
                   capture_output=True, timeout=300)
    return dest / "cmd" / SHIM_NAME


# -- the bench --------------------------------------------------------------------------------------


class ShimBench:
    def __init__(self, stack: PrivateContainerd, profile: Profile, precompile: bool = True, log=print) -> None:
        self.stack = stack
        self.p = profile
        self.precompile = precompile
        self.shim_source = ""
        self.res = Results()
        self.events: EventStream | None = None
        self.log = log
        self.notes: list[str] = []

    # plumbing

    def order(self, i: int) -> tuple[str, ...]:
        return RTS if i % 2 == 0 else RTS[::-1]

    def ctr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        res = self.stack.ctr(*args, check=False, timeout=timeout)
        if res.returncode != 0:
            msg = " ".join((res.stderr or res.stdout or f"exit status {res.returncode}").split())[-300:]
            raise RuntimeError(f"ctr {args[0]} {args[1] if len(args) > 1 else ''}: {msg}")
        return res

    def timed_ctr(self, *args: str, timeout: float = 60) -> float:
        t0 = time.perf_counter()
        self.ctr(*args, timeout=timeout)
        return (time.perf_counter() - t0) * 1e3

    def attempt(self, metric: Metric, rt: str, fn, record: bool = True):
        """Run fn for rt unless rt already failed this metric; a failure is recorded, not raised."""
        if not metric.ok(rt):
            return None
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001 - any failure of a young shim is a result, not a crash
            metric.fail(rt, _short(e))
            return None
        if record and value is not None:
            metric.samples[rt].append(value)
        return value

    def phase(self, name: str, fn, *metrics_on_crash: Metric) -> None:
        """A phase that crashes outright (not one runtime's step) fails its metrics for both runtimes."""
        self.log(f"# {name}")
        t0 = time.monotonic()
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            self.notes.append(f"phase {name!r} crashed: {_short(e)}")
            for m in metrics_on_crash:
                for rt in RTS:
                    m.fail(rt, f"phase crashed: {_short(e)}")
        self.log(f"  ({time.monotonic() - t0:.1f}s)")

    def bundle(self, cid: str) -> Path:
        return self.stack.state / "io.containerd.runtime.v2.task" / self.stack.namespace / cid

    def task_pids(self) -> dict[str, tuple[int, str]]:
        out = {}
        for line in self.ctr("task", "ls").stdout.splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 3 and parts[1].isdigit():
                out[parts[0]] = (int(parts[1]), parts[2])
        return out

    def wait_stopped(self, cid: str, timeout: float = 20) -> None:
        if self.events is not None and self.events.alive():
            self.events.wait_exit(cid, timeout=timeout)
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.task_pids().get(cid, (0, "STOPPED"))[1] == "STOPPED":
                return
            time.sleep(0.02)
        raise TimeoutError(f"{cid} not stopped after {timeout:g}s")

    def remove(self, cid: str) -> None:
        """Best effort: the task (forced) and the container, whatever state they are in."""
        self.stack.ctr("task", "kill", "-s", "KILL", cid, check=False, timeout=20)
        self.stack.ctr("task", "delete", "-f", cid, check=False, timeout=20)
        self.stack.ctr("container", "delete", cid, check=False, timeout=20)

    def _remove_all(self, ids: dict[str, list[str]]) -> None:
        for rt in RTS:
            for cid in ids[rt]:
                self.remove(cid)

    def run_detached(self, rt: str, cid: str, group: str | None = None) -> float:
        args = ["run", "-d", "--runtime", RUNTIMES[rt]]
        if group:
            args += ["--annotation", f"{GROUP_ANNOTATION}={group}"]
        try:
            return self.timed_ctr(*args, IMAGE, cid, "sleep", "1000")
        except Exception:
            self.remove(cid)
            raise

    # setup

    def setup(self) -> None:
        link = self.stack.bin / SHIM_NAME
        if self.precompile and Path(shim_binary()) == REPO / "cmd" / SHIM_NAME:
            link.unlink()
            link.symlink_to(_snapshot_shim(self.stack.dir / "shim-copy"))
            self.shim_source = "copy of the checkout, bytecode compiled"
        else:
            flag = os.environ.get("PYTHONDONTWRITEBYTECODE")
            self.shim_source = f"{shim_binary()} as is, PYTHONDONTWRITEBYTECODE={flag or 'unset'}"
            if self.precompile:
                # What pip does at install time. An editable install runs the checkout's files: one edited
                # since its bytecode was compiled is compiled again by every shim process that imports it
                # while PYTHONDONTWRITEBYTECODE is set (~8 ms per start for shim/zygote.py).
                import shim

                subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(shim.__file__).parent)],
                               check=False, capture_output=True, timeout=300)
                self.shim_source += ", bytecode compiled"
        work = self.stack.dir / "bench-image"
        work.mkdir()
        rootfs = build_busybox_rootfs(work / "rootfs")
        tar = build_oci_image_tar(rootfs, work / "busybox.tar", IMAGE)
        self.ctr("image", "import", "--no-unpack", str(tar))
        try:
            self.events = EventStream(self.stack)
        except OSError as e:
            self.notes.append(f"ctr events did not start: {_short(e)}")
        # The first run unpacks the image into the snapshotter and warms the page cache: not measured.
        for rt in RTS:
            try:
                self.ctr("run", "--rm", "--runtime", RUNTIMES[rt], IMAGE, f"warmup-{rt}", "true")
            except Exception as e:  # noqa: BLE001
                self.notes.append(f"warm-up run failed for {rt}: {_short(e)}")

    # metrics

    def run_rm(self) -> None:
        m = self.res.metric("run_rm", "`ctr run --rm` true", "ms")
        for i in range(self.p.run_rm_reps):
            for rt in self.order(i):
                cid = f"rm-{rt}-{i}"

                def once(rt=rt, cid=cid) -> float:
                    try:
                        return self.timed_ctr("run", "--rm", "--runtime", RUNTIMES[rt], IMAGE, cid, "true")
                    except Exception:
                        self.remove(cid)
                        raise

                self.attempt(m, rt, once)

    def container_set(self, n: int, grouped: bool, exec_rounds: int, ttrpc: bool) -> None:
        tag = f"{n}{'g' if grouped else ''}"
        kind = "grouped, 1 shim" if grouped else "1 shim each"
        main = n == 10 and not grouped
        m_start = self.res.metric(f"start_{tag}", f"detached start per container, {n} containers, {kind}", "ms")
        ids: dict[str, list[str]] = {rt: [] for rt in RTS}
        total = dict.fromkeys(RTS, 0.0)
        try:
            self.log(f"  start {n} x {len(RTS)}")
            for i in range(n):
                for rt in self.order(i):
                    cid = f"c{tag}-{rt}-{i}"
                    dt = self.attempt(m_start, rt, lambda rt=rt, cid=cid: self.run_detached(
                        rt, cid, f"bench-{rt}" if grouped else None))
                    if dt is not None:
                        ids[rt].append(cid)
                        total[rt] += dt
            for rt in RTS:
                if ids[rt]:
                    m_start.extra[rt]["mean_ms"] = round(total[rt] / len(ids[rt]), 2)

            self.log(f"  exec x {exec_rounds}")
            for r in range(exec_rounds):
                which = "first in container" if r == 0 else "repeated"
                m_exec = self.res.metric(f"exec_{tag}_{'first' if r == 0 else 'again'}",
                                         f"exec `true`, {which} ({n} containers, {kind})", "ms", show=main)
                for rt in RTS:
                    if not ids[rt]:
                        m_exec.fail(rt, "no container started")
                for i in range(n):
                    for rt in self.order(i):
                        if i < len(ids[rt]):
                            self.attempt(m_exec, rt, lambda cid=ids[rt][i], r=r: self.timed_ctr(
                                "task", "exec", "--exec-id", f"x{r}", cid, "true"))

            time.sleep(0.5)  # let the shims settle (exec processes reaped, buffers released)
            self.memory(tag, n, kind, ids)
            if ttrpc:
                self.ttrpc_state({rt: ids[rt][0] for rt in RTS if ids[rt]})
        except (KeyboardInterrupt, SystemExit):
            raise  # no measured teardown: PrivateContainerd.stop() removes everything
        except BaseException:
            self.delete_all(tag, n, kind, ids)
            raise
        self.log(f"  kill + delete {n} x {len(RTS)}")
        self.delete_all(tag, n, kind, ids)

    def memory(self, tag: str, n: int, kind: str, ids: dict[str, list[str]]) -> None:
        m_pss = self.res.metric(f"pss_{tag}", f"PSS per container, {n} containers, {kind}", "MiB", digits=2)
        m_rss = self.res.metric(f"rss_{tag}", f"RSS per container, {n} containers, {kind}", "MiB", digits=2)
        table = _proc_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        shims = [pid for pid in self.stack.shim_pids() if pid in table]
        for rt in RTS:
            if not ids[rt]:
                for m in (m_pss, m_rss):
                    m.fail(rt, "no container started")
                continue
            wanted = set(ids[rt])
            mine = [pid for pid in shims if _shim_runtime(table[pid][2]) == rt and _shim_id(table[pid][2]) in wanted]
            helpers, stack_ = [], list(mine)
            while stack_:
                for child in children.get(stack_.pop(), []):
                    if table[child][1]:  # our pid namespace: not a container process
                        helpers.append(child)
                        stack_.append(child)
            if RUNTIMES[rt] == PYRUNC:
                # the warm zygote our shims fork from (shim/zygote.py) is part of their cost
                helpers += [pid for pid in self.stack.zygote_pids() if pid in table]
            total = {"pss": 0, "rss": 0, "uss": 0}
            for pid in mine + helpers:
                with contextlib.suppress(OSError):
                    for k, v in _mem_kb(pid).items():
                        total[k] += v
            pss, rss = total["pss"], total["rss"]
            if not mine:
                for m in (m_pss, m_rss):
                    m.fail(rt, "no shim process found")
                continue
            m_pss.fixed[rt] = pss / 1024 / len(ids[rt])
            m_rss.fixed[rt] = rss / 1024 / len(ids[rt])
            info = {"containers": len(ids[rt]), "shims": len(mine), "helpers": len(helpers),
                    "helper_argv": sorted({b" ".join(table[h][2][:3]).decode(errors="replace") for h in helpers}),
                    "pss_total_mib": round(pss / 1024, 2), "rss_total_mib": round(rss / 1024, 2),
                    "uss_total_mib": round(total["uss"] / 1024, 2),
                    "uss_per_container_mib": round(total["uss"] / 1024 / len(ids[rt]), 3)}
            m_pss.extra[rt].update(info)
            m_rss.extra[rt].update(info)
            self.log(f"  {rt}: {len(mine)} shim(s) + {len(helpers)} helper(s), PSS {pss / 1024:.1f} MiB, "
                     f"RSS {rss / 1024:.1f} MiB, USS {total['uss'] / 1024:.1f} MiB for {len(ids[rt])} containers")

    def delete_all(self, tag: str, n: int, kind: str, ids: dict[str, list[str]]) -> None:
        m_del = self.res.metric(f"delete_{tag}", f"`ctr task delete` after KILL, {n} containers, {kind}", "ms")
        for rt in RTS:
            if not ids[rt]:
                m_del.fail(rt, "no container started")
        kill_to_exit: dict[str, list[float]] = {rt: [] for rt in RTS}
        for i in range(max((len(v) for v in ids.values()), default=0)):
            for rt in self.order(i):
                if i >= len(ids[rt]):
                    continue
                cid = ids[rt][i]

                def once(cid=cid, rt=rt) -> float:
                    t0 = time.perf_counter()
                    self.ctr("task", "kill", "-s", "KILL", cid)
                    self.wait_stopped(cid)
                    kill_to_exit[rt].append((time.perf_counter() - t0) * 1e3)
                    for attempt in range(5):
                        try:
                            return self.timed_ctr("task", "delete", cid)
                        except RuntimeError as e:  # an exit seen by containerd a moment before the shim...
                            if "stopped" not in str(e) or attempt == 4:
                                raise
                            time.sleep(0.05)
                    raise AssertionError("unreachable")

                if self.attempt(m_del, rt, once) is None:
                    self.remove(cid)
                else:
                    self.stack.ctr("container", "delete", cid, check=False, timeout=20)
        for rt in RTS:
            if kill_to_exit[rt]:
                m_del.extra[rt]["kill_to_exit_event_ms_median"] = round(statistics.median(kill_to_exit[rt]), 2)
        # Every shim of the set should be gone once its containers are deleted.
        time.sleep(0.5)
        table = _proc_table()
        for rt in RTS:
            wanted = set(ids[rt])
            left = [pid for pid in self.stack.shim_pids()
                    if pid in table and _shim_runtime(table[pid][2]) == rt and _shim_id(table[pid][2]) in wanted]
            m_del.extra[rt]["shims_left_after_delete"] = len(left)
            if left:
                self.notes.append(f"{rt}: {len(left)} shim(s) of set {tag} still running after delete: {left}")
                for pid in left:  # ours to stop: started by this run's containerd for this set
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)

    def ttrpc_state(self, cids: dict[str, str]) -> None:
        metrics = {c: self.res.metric(f"ttrpc_state_{c}", f"ttrpc State round trips, {c} caller{'s' if c > 1 else ''}",
                                      "calls/s", better="higher", digits=0) for c in (1, 16)}
        m_p50 = self.res.metric("ttrpc_state_p50", "ttrpc State p50 latency, 1 caller", "µs", digits=0)
        for rt in RTS:
            if rt not in cids:
                for m in (*metrics.values(), m_p50):
                    m.fail(rt, "no running container")
        self.log("  ttrpc State")
        for c, m in metrics.items():
            calls = dict.fromkeys(RTS, 0)
            secs = dict.fromkeys(RTS, 0.0)
            lat: dict[str, list[int]] = {rt: [] for rt in RTS}
            for r in range(self.p.ttrpc_rounds):
                for rt in self.order(r):
                    if rt not in cids:
                        continue
                    cid = cids[rt]
                    sock = (self.bundle(cid) / "address").read_text().strip().removeprefix("unix://")
                    out = self.attempt(m, rt, lambda sock=sock, cid=cid, c=c: asyncio.run(
                        _state_window(sock, cid, c, self.p.ttrpc_seconds)), record=False)
                    if out is not None:
                        calls[rt] += len(out[0])
                        secs[rt] += out[1]
                        lat[rt] += out[0]
            for rt in RTS:
                if m.ok(rt) and secs[rt]:
                    m.fixed[rt] = calls[rt] / secs[rt]
                    m.extra[rt]["calls"] = calls[rt]
                    if c == 1:
                        m_p50.fixed[rt] = statistics.median(lat[rt]) / 1e3
                elif c == 1:
                    m_p50.fail(rt, m.errors.get(rt, "no calls"))

    def stdout_throughput(self) -> None:
        size = self.p.stdout_bytes
        m = self.res.metric("stdout", f"stdout through `ctr run`, head -c {size // MIB}M /dev/zero", "MiB/s",
                            better="higher")
        base = ["ctr", "--address", self.stack.address, "--namespace", self.stack.namespace, "run", "--rm"]

        def check(rt: str) -> None:  # the bytes must really arrive, not just the exit status be 0
            cid = f"outcheck-{rt}"
            proc = subprocess.run([*base, "--runtime", RUNTIMES[rt], IMAGE, cid, "head", "-c", str(MIB), "/dev/zero"],
                                  capture_output=True, timeout=60)
            if proc.returncode != 0 or len(proc.stdout) != MIB:
                self.remove(cid)
                raise RuntimeError(f"1 MiB check: status {proc.returncode}, {len(proc.stdout)} bytes received; "
                                   f"{proc.stderr.decode(errors='replace').strip()[-200:]}")

        def once(rt: str, cid: str) -> float:
            t0 = time.perf_counter()
            proc = subprocess.run([*base, "--runtime", RUNTIMES[rt], IMAGE, cid, "head", "-c", str(size), "/dev/zero"],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  timeout=max(60, size / MIB / 5))
            dt = time.perf_counter() - t0
            if proc.returncode != 0:
                self.remove(cid)
                raise RuntimeError(f"status {proc.returncode}: {proc.stderr.decode(errors='replace').strip()[-200:]}")
            return size / MIB / dt

        for rt in RTS:
            self.attempt(m, rt, lambda rt=rt: check(rt), record=False)
        for i in range(self.p.stdout_reps):
            for rt in self.order(i):
                self.attempt(m, rt, lambda rt=rt, i=i: once(rt, f"out-{rt}-{i}"))

    def exit_to_event(self) -> None:
        m = self.res.metric("exit_event", "exit -> `/tasks/exit` seen by `ctr events` (direct SIGKILL)", "ms", digits=2)
        if self.events is None or not self.events.alive():
            for rt in RTS:
                m.fail(rt, "ctr events is not running")
            return
        reps = self.p.exit_event_reps
        ids: dict[str, list[str]] = {rt: [] for rt in RTS}
        parts: dict[str, dict[str, list[float]]] = {rt: {"reap": [], "publish": [], "deliver": []} for rt in RTS}
        try:
            for i in range(reps):
                for rt in self.order(i):
                    cid = f"ev-{rt}-{i}"
                    if self.attempt(m, rt, lambda rt=rt, cid=cid: self.run_detached(rt, cid), record=False) is not None:
                        ids[rt].append(cid)
            pids = self.task_pids()
            time.sleep(0.3)  # idle shims: nothing else in flight when the kill lands
            for i in range(reps):
                for rt in self.order(i):
                    if i >= len(ids[rt]):
                        continue
                    cid = ids[rt][i]

                    def once(cid=cid, rt=rt) -> float:
                        pid = pids[cid][0]
                        t0 = time.time_ns()
                        os.kill(pid, signal.SIGKILL)
                        ev = self.events.wait_exit(cid)
                        parts[rt]["reap"].append((ev.exited_ns - t0) / 1e6)
                        parts[rt]["publish"].append((ev.published_ns - ev.exited_ns) / 1e6)
                        parts[rt]["deliver"].append((ev.recv_ns - ev.published_ns) / 1e6)
                        return (ev.recv_ns - t0) / 1e6

                    self.attempt(m, rt, once)
                    time.sleep(0.05)
        except (KeyboardInterrupt, SystemExit):
            raise  # PrivateContainerd.stop() removes everything
        except BaseException:
            self._remove_all(ids)
            raise
        self._remove_all(ids)
        for rt in RTS:
            for k, v in parts[rt].items():
                if v:
                    m.extra[rt][f"{k}_ms_median"] = round(statistics.median(v), 3)

    def run(self) -> None:
        self.phase("setup", self.setup)
        self.phase("ctr run --rm", self.run_rm, self.res.metric("run_rm", "`ctr run --rm` true", "ms"))
        for n in self.p.sets:
            for grouped in (False, True):
                main = n == 10 and not grouped
                self.phase(f"{n} containers, {'grouped' if grouped else 'one shim each'}",
                           lambda n=n, g=grouped, main=main: self.container_set(
                               n, g, self.p.exec_rounds if main else 1, ttrpc=main))
        self.phase("stdout throughput", self.stdout_throughput)
        self.phase("exit -> event", self.exit_to_event)


async def _state_window(sock: str, cid: str, concurrency: int, seconds: float) -> tuple[list[int], float]:
    """``concurrency`` callers loop State on one connection for ``seconds`` (after 0.2 s of warm-up)."""
    from shim.api.containerd.task.v2 import shim_pb2 as api
    from shim.ttrpc import Client

    request = api.StateRequest(id=cid).SerializeToString()
    client = await Client.connect(sock)
    try:
        first = api.StateResponse.FromString(await client.call(TASK_SERVICE, "State", request, timeout=10))
        if first.id != cid or first.pid <= 0:
            raise RuntimeError(f"State answered id={first.id!r} pid={first.pid}")
        clock = time.perf_counter_ns
        latencies: list[int] = []

        async def caller(end: int, record) -> None:
            while True:
                t0 = clock()
                await client.call(TASK_SERVICE, "State", request, timeout=10)
                t1 = clock()
                record(t1 - t0)
                if t1 >= end:
                    return

        warm_end = clock() + 200_000_000
        await asyncio.gather(*(caller(warm_end, lambda _: None) for _ in range(concurrency)))
        start = clock()
        end = start + int(seconds * 1e9)
        await asyncio.gather(*(caller(end, latencies.append) for _ in range(concurrency)))
        return latencies, (clock() - start) / 1e9
    finally:
        await client.aclose()


# -- main -----------------------------------------------------------------------------------------------


def _version(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "?"


def _git_rev() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "shim", "cmd"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return rev + (" + uncommitted shim changes" if dirty else "")


def _meta(args: argparse.Namespace, profile: Profile, seconds: float, bench: ShimBench,
          load_before: tuple[float, ...]) -> dict:
    return {
        "mode": "quick" if args.quick else "full",
        "profile": profile.__dict__,
        "seconds": round(seconds, 1),
        "shim": bench.shim_source,
        "git": _git_rev(),
        "containerd": _version(["containerd", "--version"]),
        "runc": _version(["runc", "--version"]),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions, 10 containers only (~1 min)")
    p.add_argument("--json", metavar="FILE", help="also write every sample and detail as JSON")
    p.add_argument("--md", metavar="FILE", help="also write the markdown table to a file")
    p.add_argument("--png", metavar="FILE", help="also draw the ratios as a chart (needs matplotlib: .[bench])")
    p.add_argument("--no-precompile", action="store_true",
                   help="run the shim as it is: no bytecode-compiled copy of the checkout, no compiling "
                        "of the installed package's stale bytecode")
    args = p.parse_args(argv)

    if os.geteuid() != 0:
        print("needs root (containerd, runc and overlay mounts)", file=sys.stderr)
        return 2
    missing = missing_tools()
    if missing:
        print(f"missing {', '.join(missing)}: apt-get install containerd runc busybox-static", file=sys.stderr)
        return 2

    profile = QUICK if args.quick else FULL
    signal.signal(signal.SIGTERM, _raise_exit)
    signal.signal(signal.SIGHUP, _raise_exit)
    t_start, load_before = time.monotonic(), os.getloadavg()
    stack = PrivateContainerd(namespace=NAMESPACE)
    bench = ShimBench(stack, profile, precompile=not args.no_precompile, log=lambda s: print(s, flush=True))
    interrupted = False
    try:
        stack.start()
        bench.run()
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: cleaning up, then what was measured so far", file=sys.stderr)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a second Ctrl-C must not cut the cleanup
            signal.signal(sig, signal.SIG_IGN)
        if bench.events is not None:
            bench.events.stop()
        stack.stop()

    meta = _meta(args, profile, time.monotonic() - t_start, bench, load_before)
    load = max(meta["loadavg_before"][0], meta["loadavg_after"][0])
    header = "\n".join([
        f"pyrunc vs Go shim, {meta['mode']} run ({meta['seconds']:.0f} s), pyrunc at {meta['git']} "
        f"({meta['shim']}).",
        f"{meta['containerd']}; {meta['runc']}; Python {meta['python']}; {meta['cpus']} CPUs; "
        f"load average {meta['loadavg_before'][0]:.1f} before, {meta['loadavg_after'][0]:.1f} after"
        + (" (BUSY MACHINE: absolute figures are inflated, compare the ratios)" if load > (meta["cpus"] or 1) else "")
        + ".",
        "Medians; ratio = pyrunc / go (for 'lower' metrics below 1 means pyrunc is better, for 'higher' above 1).",
    ])
    lines = [header, "", bench.res.table()]
    problems = bench.res.failures() + bench.notes
    if problems:
        lines += ["", "Failures and notes:", *(f"- {x}" for x in problems)]
    text = "\n".join(lines)
    print()
    print(text)
    if args.md:
        Path(args.md).write_text(text + "\n")
    results = {"meta": meta, "notes": bench.notes, "metrics": [m.as_json() for m in bench.res.metrics.values()]}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.png:
        from chart import render  # bench/ is on sys.path as this script's directory

        render(results, args.png)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())

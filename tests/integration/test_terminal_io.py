"""Terminals, log URIs and bulk output under real containerd, differential with the Go shim.

``ctr run -t`` / ``ctr task exec -t`` run under a pseudo-terminal of ours (ctr insists on one): ctr
gets the slave as stdin/stdout/stderr and controlling terminal, we read the master. Resizing our pty
makes the kernel send ctr SIGWINCH, which ctr forwards as ResizePty.

containerd 1.6's ctr closes its FIFOs as soon as it learns of the exit (Task.Delete closes its IO
before waiting for the copy), so what is still in a FIFO then is lost. pyrunc reports an exit only
after the client read its FIFOs empty; the Go shim does not, and may lose a tail of the output: where
that race shows, the differential tests let the process linger a moment before exiting, and the
fast-exit tests hold pyrunc to completeness and the Go shim only to its output being a prefix.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import re
import select
import struct
import subprocess
import termios
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from shim.api.containerd.task.v2 import shim_pb2 as api
from shim.ttrpc import Client, Code, TTRPCError
from tests.integration.test_shim import both, cleanup, same, uid
from tools.stack import PYRUNC

TASK = "containerd.task.v2.Task"
MIB = 1 << 20


@pytest.fixture
def stack(containerd, busybox_image):
    return containerd


# -- running ctr under a pty ------------------------------------------------------------------------
def ctr_in_pty(stack, args: list[str], *, rows: int = 24, cols: int = 80, timeout: float = 60,
               on_output: Callable[[bytes, int], None] | None = None) -> tuple[int, bytes]:
    """Run ctr with a pty slave as its terminal; return its exit status and all it wrote there.

    ``on_output(output_so_far, master)`` is called after each read (to resize when a marker shows).
    """
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    cmd = ["ctr", "--address", stack.address, "--namespace", stack.namespace, *args]
    # a session of its own with our pty as controlling terminal: resizes then reach it as SIGWINCH
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not select.select([master], [], [], 0.1)[0]:
                continue
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:  # EIO: ctr exited and the last slave fd is closed, all output read
                break
            if not chunk:
                break
            out += chunk
            if on_output is not None:
                on_output(bytes(out), master)
        else:
            proc.kill()
        return proc.wait(10), bytes(out)
    finally:
        os.close(master)


def resize_when(marker: bytes, rows: int, cols: int) -> Callable[[bytes, int], None]:
    done = []

    def on_output(out: bytes, master: int) -> None:
        if marker in out and not done:
            done.append(True)
            fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    return on_output


# The size ctr sends right after Start may reach the shim after the process looked: wait for it.
SIZE_THEN_WINCH = (
    # (busybox's stty size may fail, or print nothing, while the size is 0x0)
    'tty; until s=$(stty size 2>/dev/null) && [ -n "$s" ] && [ "$s" != "0 0" ]; do sleep 0.02; done; echo "$s"; '

    "trap 'stty size; exit 7' WINCH; echo READY; while :; do sleep 0.02; done"
)


def test_run_t_has_a_terminal_of_the_right_size_and_follows_resizes(stack, busybox_image):
    def scenario(runtime, tag):
        cid = uid(tag)
        try:
            rc, out = ctr_in_pty(stack, ["run", "-t", "--rm", "--runtime", runtime, busybox_image, cid,
                                         "sh", "-c", SIZE_THEN_WINCH], on_output=resize_when(b"READY", 50, 132))
        finally:
            cleanup(stack, cid)
        return rc, out.replace(b"\r", b"").decode()

    rc, out = same(both(scenario))
    assert (rc, out) == (7, "/dev/pts/0\n24 80\nREADY\n50 132\n")


def test_exec_t_has_its_own_terminal_and_follows_resizes(stack, busybox_image):
    def scenario(runtime, tag):
        cid = uid(tag)
        stack.ctr("run", "-d", "--runtime", runtime, busybox_image, cid, "sleep", "1000")
        try:
            rc, out = ctr_in_pty(stack, ["task", "exec", "-t", "--exec-id", "sh1", cid, "sh", "-c",
                                         SIZE_THEN_WINCH], rows=30, cols=100, on_output=resize_when(b"READY", 40, 90))
            # the same exec id again after it exited: the first one was cleaned up completely
            # (lingering: ctr's first resize must not race the exit, which Go answers with an error)
            again = ctr_in_pty(stack, ["task", "exec", "-t", "--exec-id", "sh1", cid, "sh", "-c", "tty; sleep 0.5"])
        finally:
            cleanup(stack, cid)
        return rc, out.replace(b"\r", b"").decode(), again[0], again[1].replace(b"\r", b"").decode()

    results = both(scenario)
    # The Go shim closes an exec's pty master only once the client closed its stdin FIFO, so the
    # second exec may get another pty; pyrunc closes it on Delete, and the number is reused.
    assert results["py"][3] == "/dev/pts/0\n"
    rc, out, rc2, out2 = same({k: (*v[:3], re.sub(r"/dev/pts/\d+", "/dev/pts/N", v[3])) for k, v in results.items()})
    assert (rc, out) == (7, "/dev/pts/0\n30 100\nREADY\n40 90\n")
    assert (rc2, out2) == (0, "/dev/pts/N\n")


def test_run_t_input_is_relayed_and_output_of_a_fast_exit_is_complete(stack, busybox_image):
    n = 100000
    expected = "".join(f"{i}\n" for i in range(1, n + 1))

    def scenario(runtime, tag):
        cid = uid(tag)
        typed = []

        def type_when_ready(out: bytes, master: int) -> None:
            if b"ready>" in out and not typed:
                typed.append(True)
                os.write(master, b"go\r")  # ctr put our terminal in raw mode: this is Enter

        try:
            rc, out = ctr_in_pty(stack, ["run", "-t", "--rm", "--runtime", runtime, busybox_image, cid, "sh",
                                         "-c", f"printf 'ready>'; read answer; echo \"got $answer\"; seq 1 {n}"],
                                 on_output=type_when_ready)
        finally:
            cleanup(stack, cid)
        return rc, out.replace(b"\r", b"").decode()

    results = both(scenario)
    for tag, (rc, out) in results.items():
        assert rc == 0 and out.startswith("ready>go\ngot go\n"), (tag, out[:100])
    assert results["py"][1] == f"ready>go\ngot go\n{expected}", "pyrunc lost output at exit"
    assert expected.startswith(results["go"][1][len("ready>go\ngot go\n"):])


# -- the Task API directly: ResizePty, CloseIO on a terminal ---------------------------------------
def _detached(stack, image: str) -> tuple[str, Path, str]:
    cid = f"tty-{uuid.uuid4().hex[:8]}"
    stack.ctr("run", "-d", "--runtime", PYRUNC, image, cid, "sleep", "1000")
    bundle = stack.state / "io.containerd.runtime.v2.task" / stack.namespace / cid
    return cid, bundle, (bundle / "address").read_text().strip().removeprefix("unix://")


def _tty_spec(bundle: Path, args: list[str]) -> any_pb2.Any:
    process = json.loads((bundle / "config.json").read_text())["process"]
    process.update(args=args, terminal=True)
    return any_pb2.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/Process",
                       value=json.dumps(process).encode())


def test_resize_pty_and_closeio_hang_up_through_the_task_api(stack, busybox_image, tmp_path):
    cid, bundle, sock = _detached(stack, busybox_image)
    stdin, stdout = tmp_path / "in", tmp_path / "out"
    os.mkfifo(stdin)
    os.mkfifo(stdout)
    reader = os.open(stdout, os.O_RDONLY | os.O_NONBLOCK)
    # (a trapped signal would interrupt a `read`: the resize is done before reading input)
    script = ("trap 'stty size; touch /tmp/resized' WINCH; echo READY; "
              "until [ -e /tmp/resized ]; do sleep 0.02; done; trap - WINCH; echo GO; "
              "while read line; do echo \"line: $line\"; done; echo never-reached-by-a-hangup")

    def read_until(marker: bytes, timeout: float = 10) -> bytes:
        out, deadline = b"", time.monotonic() + timeout
        while marker not in out and time.monotonic() < deadline:
            if select.select([reader], [], [], 0.1)[0]:
                out += os.read(reader, 65536)
        assert marker in out, out
        return out

    async def main():
        async with await Client.connect(sock) as client:
            async def call(method, req, resp=None):
                return await client.call(TASK, method, req, resp, timeout=20)

            with pytest.raises(TTRPCError) as e:
                await call("ResizePty", api.ResizePtyRequest(id=cid, width=80, height=24))
            assert e.value.code == Code.FAILED_PRECONDITION  # the init has no terminal
            await call("Exec", api.ExecProcessRequest(id=cid, exec_id="t1", terminal=True, stdin=str(stdin),
                                                      stdout=str(stdout), spec=_tty_spec(bundle, ["sh", "-c", script])))
            await call("Start", api.StartRequest(id=cid, exec_id="t1"), api.StartResponse)
            await asyncio.to_thread(read_until, b"READY")
            await call("ResizePty", api.ResizePtyRequest(id=cid, exec_id="t1", width=123, height=45))
            await asyncio.to_thread(read_until, b"GO")
            client_fd = os.open(stdin, os.O_WRONLY)
            os.write(client_fd, b"hello\n")
            await asyncio.to_thread(read_until, b"line: hello")
            os.write(client_fd, b"bye\n")
            await call("CloseIO", api.CloseIORequest(id=cid, exec_id="t1", stdin=True))
            waited = await call("Wait", api.WaitRequest(id=cid, exec_id="t1"), api.WaitResponse)
            os.close(client_fd)
            state = await call("State", api.StateRequest(id=cid, exec_id="t1"), api.StateResponse)
            await call("Delete", api.DeleteRequest(id=cid, exec_id="t1"), api.DeleteResponse)
            return waited.exit_status, state.terminal

    try:
        status, terminal = asyncio.run(main())
        rest = b""
        while select.select([reader], [], [], 0.5)[0] and (chunk := os.read(reader, 65536)):
            rest += chunk
        # The Go shim closes the pty master when the input ends: the session is hung up (SIGHUP)
        assert status == 128 + 1 and terminal
        assert b"line: bye" in rest and b"never-reached" not in rest
        assert not list(Path(os.environ.get("XDG_RUNTIME_DIR") or "/tmp").glob("pty*/pty.sock")), \
            "console sockets are removed"
    finally:
        os.close(reader)
        cleanup(stack, cid)


# -- bulk output -------------------------------------------------------------------------------------
def _run_to_files(stack, runtime: str, image: str, cid: str, script: str, tmp_path: Path) -> tuple[int, Path, Path]:
    out, err = tmp_path / f"{cid}.out", tmp_path / f"{cid}.err"
    with open(out, "wb") as o, open(err, "wb") as e:
        rc = subprocess.run(["ctr", "--address", stack.address, "--namespace", stack.namespace, "run", "--rm",
                             "--runtime", runtime, image, cid, "sh", "-c", script], stdout=o, stderr=e,
                            timeout=120).returncode
    return rc, out, err


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MIB):
            h.update(chunk)
    return h.hexdigest()


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_64_mib_of_random_bytes_arrive_intact(stack, busybox_image, tmp_path, stream):
    """The container sends 64 MiB of /dev/urandom on one stream and, once tee wrote every byte of it,
    the sha256 of exactly those bytes (computed inside, from tee's copy) on the other stream."""
    data, other = ("", ">&2") if stream == "stdout" else (">&2", "")
    script = (f"mkfifo /tmp/sum; sha256sum < /tmp/sum {other} & "
              f"head -c {64 * MIB} /dev/urandom | tee /tmp/sum {data}; wait; sleep 0.5")

    def scenario(runtime, tag):
        rc, out, err = _run_to_files(stack, runtime, busybox_image, uid(tag), script, tmp_path)
        data_file, sum_file = (out, err) if stream == "stdout" else (err, out)
        inside = sum_file.read_text().split()[0]
        return rc, data_file.stat().st_size, _sha256(data_file) == inside

    assert same(both(scenario)) == (0, 64 * MIB, True)


def test_interleaved_output_of_a_fast_exit_loses_nothing(stack, busybox_image, tmp_path):
    n = 30000
    script = f'i=0; while [ $i -lt {n} ]; do i=$((i+1)); echo "out $i"; echo "err $i" >&2; done'

    def scenario(runtime, tag):
        rc, out, err = _run_to_files(stack, runtime, busybox_image, uid(tag), script, tmp_path)
        return rc, out.read_text(), err.read_text()

    results = both(scenario)
    for kind in ("out", "err"):
        expected = "".join(f"{kind} {i}\n" for i in range(1, n + 1))
        col = 1 if kind == "out" else 2
        assert results["py"][col] == expected, f"pyrunc lost {kind} at exit"
        assert expected.startswith(results["go"][col])
    assert results["py"][0] == results["go"][0] == 0


# -- log URIs ------------------------------------------------------------------------------------------
LOGGER = """#!/bin/sh
# A containerd logging binary: fd 3 the process's stdout, fd 4 its stderr, fd 5 closed when ready.
out={dir}/$CONTAINER_ID
echo "$CONTAINER_NAMESPACE $CONTAINER_ID $*" > $out.meta
exec 5>&-
trap '' TERM  # stopped at delete: finish copying what is left
while IFS= read -r line; do echo "out: $line"; done <&3 >> $out.log &
while IFS= read -r line; do echo "err: $line"; done <&4 >> $out.log
wait
echo done >> $out.meta
"""


def test_binary_log_uri_records_every_line(stack, busybox_image, tmp_path):
    logger = tmp_path / "logger"
    logger.write_text(LOGGER.format(dir=tmp_path))
    logger.chmod(0o755)
    n = 2000

    def scenario(runtime, tag):
        cid = uid(tag)
        r = stack.ctr("run", "--rm", "--runtime", runtime, "--log-uri", f"binary://{logger}?tag=t-{tag}",
                      busybox_image, cid, "sh", "-c", f"seq 1 {n}; seq 1 {n} >&2; exit 3", check=False)
        meta = tmp_path / f"{cid}.meta"
        deadline = time.monotonic() + 20
        while "done" not in (meta.read_text() if meta.exists() else "") and time.monotonic() < deadline:
            time.sleep(0.05)
        lines = (tmp_path / f"{cid}.log").read_text().splitlines()
        return (r.returncode, r.stdout, meta.read_text().replace(cid, "ID").replace(f"t-{tag}", "TAG"),
                sorted(lines, key=lambda s: (s[:4], int(s.split()[1]))))

    rc, stdout, meta, lines = same(both(scenario))
    assert (rc, stdout) == (3, "")
    assert meta == f"{stack.namespace} ID tag TAG\ndone\n"
    assert lines == [f"err: {i}" for i in range(1, n + 1)] + [f"out: {i}" for i in range(1, n + 1)]


def test_file_log_uri_appends_and_makes_its_directory(stack, busybox_image, tmp_path):
    def scenario(runtime, tag):
        log = tmp_path / tag / "sub" / "c.log"
        log.parent.mkdir(parents=True)
        log.write_text("already there\n")
        fresh = tmp_path / tag / "new-dir" / "d.log"
        for i in range(2):
            stack.ctr("run", "--rm", "--runtime", runtime, "--log-uri", f"file://{log}", busybox_image, uid(tag),
                      "sh", "-c", f"echo out {i}; echo err {i} >&2")
        stack.ctr("run", "--rm", "--runtime", runtime, "--log-uri", f"file://{fresh}", busybox_image, uid(tag),
                  "echo", "fresh")
        lines = log.read_text().splitlines()
        return (lines[0], sorted(lines[1:]), fresh.read_text(), oct(fresh.stat().st_mode & 0o777),
                oct(fresh.parent.stat().st_mode & 0o777))

    results = both(scenario)
    expected = ("already there", ["err 0", "err 1", "out 0", "out 1"], "fresh\n", "0o644", "0o755")
    assert results["py"] == expected
    # The Go shim's copy to the file races its exit and now and then loses a last line: a subset there.
    go = results["go"]
    assert (go[0], *go[2:]) == (expected[0], *expected[2:]) and set(go[1]) <= set(expected[1])


@pytest.mark.parametrize("uri, fragments", [
    ("binary:///no/such/logger", ["failed to create init process I/O",
                                  "failed to start binary process: fork/exec /no/such/logger: "
                                  "no such file or directory"]),
    ("file:///proc/no-such-dir/c.log", ["failed to create init process I/O",
                                        "mkdir /proc/no-such-dir: no such file or directory"]),
    ("foo:///x", ["failed to create init process I/O: unknown STDIO scheme foo"]),
])
def test_log_uris_that_cannot_work_fail_create_clearly(stack, busybox_image, uri, fragments):
    def scenario(runtime, tag):
        cid = uid(tag)
        t0 = time.monotonic()
        r = stack.ctr("run", "--rm", "--runtime", runtime, "--log-uri", uri, busybox_image, cid, "true",
                      check=False, timeout=30)
        took = time.monotonic() - t0
        cleanup(stack, cid)
        text = re.sub(r"\s+", " ", r.stderr)
        return r.returncode, [f in text for f in fragments], took < 10, text.rstrip().endswith(": unknown")

    assert same(both(scenario)) == (1, [True] * len(fragments), True, True)

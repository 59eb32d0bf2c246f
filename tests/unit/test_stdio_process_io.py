"""ProcessIO end to end without runc: we play runc (console socket) and the process (its fds)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import socket
import stat
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from shim.process import Stdio
from shim.reaper import Reaper
from shim.stdio import ProcessIO, fifo, process_io
from shim.stdio.console import window_size
from shim.ttrpc import Code, TTRPCError


def run(test: Callable[[Reaper], Awaitable[None]]) -> None:
    before = open_fds()

    async def main() -> None:
        reaper = Reaper()
        reaper.install()
        try:
            await asyncio.wait_for(test(reaper), 30)
        finally:
            reaper.close()

    asyncio.run(main())
    leaked = open_fds() - before
    assert not leaked, f"fds leaked: {[_describe(fd) for fd in leaked]}"


def _describe(fd: int) -> str:
    try:
        return f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}"
    except OSError:
        return str(fd)


def open_fds() -> set[int]:
    return {int(x) for x in os.listdir("/proc/self/fd")} - {x for x in range(3)}


async def open_io(reaper: Reaper, stdio: Stdio, **kw) -> ProcessIO:
    return await ProcessIO.open(stdio, reaper=reaper, namespace="ns", process_id="c1", **kw)


def fifos(tmp_path: Path, *names: str) -> list[str]:
    paths = []
    for name in names:
        os.mkfifo(tmp_path / name)
        paths.append(str(tmp_path / name))
    return paths


class FifoReader:
    """containerd's side of an output FIFO: reads it in a thread until EOF, once :meth:`start`ed
    (a FIFO without any writer yet reads as EOF)."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        os.set_blocking(self.fd, True)
        self.data = bytearray()
        self.thread = threading.Thread(target=self._read, daemon=True)

    def start(self) -> FifoReader:
        self.thread.start()
        return self

    def _read(self) -> None:
        while chunk := os.read(self.fd, 65536):
            self.data.extend(chunk)

    def result(self, timeout: float = 5) -> bytes:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "no EOF on the FIFO"
        os.close(self.fd)
        return bytes(self.data)


async def process_fds(pio: ProcessIO, *used: int) -> list[int]:
    """What runc gives the process: copies of child_fds (start() closes ours); only those of the
    ``used`` positions are kept, for the test to act as the process and close."""
    return [os.dup(fd) if i in used else -1 for i, fd in enumerate(pio.child_fds)]


async def wrote_and_exited(reaper: Reaper, stdout: str, data: bytes) -> ProcessIO:
    """Started stdio to ``stdout`` whose process wrote ``data`` and closed its end (as at its exit)."""
    pio = await open_io(reaper, Stdio("", stdout, ""))
    _, p_out, _ = await process_fds(pio, 1)
    await pio.start()
    os.write(p_out, data)
    os.close(p_out)
    return pio


def test_pipes_stdout_direct_stderr_relayed_stdin_until_closeio(tmp_path):
    stdin, stdout, stderr = fifos(tmp_path, "in", "out", "err")

    async def main(reaper: Reaper) -> None:
        out, err = FifoReader(stdout), FifoReader(stderr)
        pio = await open_io(reaper, Stdio(stdin, stdout, stderr))
        out.start(), err.start()
        assert set(pio.runc_io()) == {"stdin", "stdout", "stderr"}
        p_in, p_out, p_err = await process_fds(pio, 0, 1, 2)
        await pio.start()
        assert pio.child_fds == []
        client = os.open(stdin, os.O_WRONLY)
        os.write(client, b"typed\n")
        os.set_blocking(p_in, True)
        assert await asyncio.to_thread(os.read, p_in, 100) == b"typed\n"
        os.write(client, b"last line before CloseIO\n")
        pio.close_stdin()
        got = b""
        while chunk := await asyncio.to_thread(os.read, p_in, 100):
            got += chunk
        assert got == b"last line before CloseIO\n", "input relayed, then EOF although the client holds on"
        os.write(p_out, b"to stdout\n" * 10000)
        os.write(p_err, b"to stderr\n" * 10000)
        for fd in (p_in, p_out, p_err):  # the process exits
            os.close(fd)
        await pio.drain(2)
        pio.close()
        os.close(client)
        assert out.result() == b"to stdout\n" * 10000
        assert err.result() == b"to stderr\n" * 10000

    run(main)


def test_same_fifo_for_both_keeps_the_process_end_blocking(tmp_path):
    (both,) = fifos(tmp_path, "both")

    async def main(reaper: Reaper) -> None:
        reader = FifoReader(both)
        pio = await open_io(reaper, Stdio("", both, both))
        reader.start()
        _, p_out, p_err = await process_fds(pio, 1, 2)
        await pio.start()
        # the relay's own end is non-blocking; the process's ends are other file descriptions
        assert os.get_blocking(p_out) and os.get_blocking(p_err)
        os.write(p_out, b"o")
        os.write(p_err, b"e")
        os.close(p_out)
        os.close(p_err)
        await pio.drain(2)
        pio.close()
        assert sorted(reader.result()) == sorted(b"oe")

    run(main)


def test_exit_waits_while_the_client_reads_the_fifo(tmp_path, monkeypatch):
    """A slow reader still gets everything before the exit is told; one not reading is not waited for."""
    (stdout,) = fifos(tmp_path, "out")
    monkeypatch.setattr(process_io, "FIFO_STALL", 0.3)

    async def main(reaper: Reaper) -> None:
        keep_open = os.open(stdout, os.O_RDONLY | os.O_NONBLOCK)  # a reader that reads nothing
        pio = await wrote_and_exited(reaper, stdout, b"z" * 500000)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await pio.drain(2)
        assert 0.25 < loop.time() - t0 < 1.5, "nobody reads: give up after the stall time"
        slow = threading.Thread(target=lambda: [(os.read(keep_open, 10000), threading.Event().wait(0.01))
                                                for _ in range(50)], daemon=True)
        pio2 = await open_io(reaper, Stdio("", stdout, ""))
        _, p_out, _ = await process_fds(pio2, 1)
        await pio2.start()
        slow.start()
        t0 = loop.time()
        await pio2.drain(2)
        assert loop.time() - t0 >= 0.4, "a reader making progress is waited for"
        slow.join()
        os.close(p_out)
        pio.close()
        pio2.close()
        os.close(keep_open)

    run(main)


def test_the_wait_for_a_slow_reader_ends_with_the_callers_timeout(tmp_path):
    """A reader making steady progress is waited for, but only within drain's timeout: an exec's exit
    held longer could come after its init's, which waits for the execs only so long."""
    (stdout,) = fifos(tmp_path, "out")

    async def main(reaper: Reaper) -> None:
        reader = os.open(stdout, os.O_RDONLY | os.O_NONBLOCK)
        pio = await wrote_and_exited(reaper, stdout, b"z" * 500000)
        stop = threading.Event()

        def slow_read() -> None:  # about 100 kB/s: five seconds for all of it
            while not stop.is_set():
                with contextlib.suppress(BlockingIOError):
                    os.read(reader, 1000)
                stop.wait(0.01)

        slow = threading.Thread(target=slow_read, daemon=True)
        slow.start()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await pio.drain(0.5)
        elapsed = loop.time() - t0
        stop.set()
        slow.join(5)
        assert 0.4 < elapsed < 1.2, f"drained for {elapsed:.2f}s"
        pio.close()
        os.close(reader)

    run(main)


def test_file_uri_appends_both_streams(tmp_path):
    log = tmp_path / "new" / "dir" / "c.log"

    async def main(reaper: Reaper) -> None:
        uri = f"file://{log}"
        for round in range(2):
            pio = await open_io(reaper, Stdio("", uri, uri))
            _, p_out, p_err = await process_fds(pio, 1, 2)
            await pio.start()
            os.write(p_out, b"out %d\n" % round)
            os.close(p_out)
            await asyncio.sleep(0.05)
            os.write(p_err, b"err %d\n" % round)
            os.close(p_err)
            await pio.drain(2)
            pio.close()

    run(main)
    assert log.read_bytes() == b"out 0\nerr 0\nout 1\nerr 1\n"
    assert oct(log.stat().st_mode & 0o777) == oct(0o644) and oct(log.parent.stat().st_mode & 0o777) == oct(0o755)


def test_binary_uri_feeds_the_logger(tmp_path):
    logger = tmp_path / "logger"
    logger.write_text(f"#!/bin/sh\nexec 5>&-\ncat <&3 > {tmp_path}/out & cat <&4 > {tmp_path}/err\nwait\n")
    logger.chmod(0o755)

    async def main(reaper: Reaper) -> None:
        uri = f"binary://{logger}?x=1"
        pio = await open_io(reaper, Stdio("", uri, uri))
        _, p_out, p_err = await process_fds(pio, 1, 2)
        await pio.start()
        os.write(p_out, b"hello out\n")
        os.write(p_err, b"hello err\n")
        os.close(p_out)
        os.close(p_err)
        await pio.drain(2)
        assert pio._logger is not None
        assert await asyncio.wait_for(pio._logger.child.wait(), 5) == 0  # EOF on both: it ended
        await pio.aclose()

    run(main)
    assert (tmp_path / "out").read_bytes() == b"hello out\n"
    assert (tmp_path / "err").read_bytes() == b"hello err\n"


@pytest.mark.parametrize("stdout, message", [
    ("foo:///x", "failed to create init process I/O: unknown STDIO scheme foo"),
    ("file:///proc/nope/x.log", "failed to create init process I/O: mkdir /proc/nope: no such file or directory"),
    ("binary:///no/such/logger", "failed to create init process I/O: failed to start binary process: "
                                 "fork/exec /no/such/logger: no such file or directory"),
    ("/no/such/fifo", "failed to create init process I/O: open /no/such/fifo: no such file or directory"),
])
def test_destinations_that_cannot_be_opened(stdout, message):
    async def main(reaper: Reaper) -> None:
        with pytest.raises(TTRPCError) as e:
            await open_io(reaper, Stdio("", stdout, stdout))
        assert (e.value.code, e.value.message) == (Code.UNKNOWN, message)

    run(main)


def send_master(path: str, master: int) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        socket.send_fds(s, [b"/dev/pts/x"], [master])


def test_terminal_relays_resizes_and_hangs_up_on_closeio(tmp_path):
    stdin, stdout = fifos(tmp_path, "in", "out")

    async def main(reaper: Reaper) -> None:
        out = FifoReader(stdout)
        pio = await open_io(reaper, Stdio(stdin, stdout, "", terminal=True))
        out.start()
        sock = pio.runc_io()["console_socket"]
        assert pio.runc_io() == {"console_socket": sock} and os.path.exists(sock)
        master, slave = os.openpty()
        await asyncio.to_thread(send_master, sock, master)  # runc
        os.close(master)
        await pio.start()
        assert not os.path.exists(os.path.dirname(sock)), "console socket and its dir removed"
        os.write(slave, b"prompt$ ")
        pio.resize(100, 30)
        assert window_size(slave) == (100, 30)
        client = os.open(stdin, os.O_WRONLY)
        os.write(client, b"ls\n")
        assert await asyncio.to_thread(os.read, slave, 100) == b"ls\n"
        os.write(client, b"exit\n")
        pio.close_stdin()  # the Go shim closes the master when its stdin copy ends
        assert await asyncio.to_thread(os.read, slave, 100) == b"exit\n"
        await asyncio.sleep(0.1)
        with pytest.raises(OSError) as e:
            os.write(slave, b"too late")
        assert e.value.errno == errno.EIO, "the terminal is hung up"
        with pytest.raises(TTRPCError) as te:
            pio.resize(1, 1)
        assert te.value.code == Code.FAILED_PRECONDITION
        assert b"prompt$ " in out.result() and b"ls\r\n" in out.data  # echo of the input, by the tty
        os.close(slave)
        await pio.drain(2)
        pio.close()
        os.close(client)

    run(main)


def test_terminal_output_is_drained_at_exit_then_ended(tmp_path):
    (stdout,) = fifos(tmp_path, "out")
    data = b"".join(b"%d\n" % i for i in range(30000))

    async def main(reaper: Reaper) -> None:
        out = FifoReader(stdout)
        pio = await open_io(reaper, Stdio("", stdout, "", terminal=True), is_init=False)
        out.start()
        master, slave = os.openpty()
        await asyncio.to_thread(send_master, pio.runc_io()["console_socket"], master)
        os.close(master)
        await pio.start()
        await asyncio.to_thread(os.write, slave, data)  # may not all fit in the pty: needs the relay
        os.close(slave)  # exit
        await pio.drain(2)
        assert out.result() == data.replace(b"\n", b"\r\n"), "everything, then EOF"
        with pytest.raises(TTRPCError) as e:
            pio.resize(80, 24)
        assert (e.value.code, e.value.message) == (Code.UNKNOWN, "cannot resize a stopped container")  # Go's
        pio.close()
        with pytest.raises(TTRPCError) as e:
            ProcessIO(Stdio(), "exec e1").resize(80, 24)
        assert e.value.code == Code.FAILED_PRECONDITION

    run(main)


def test_no_console_from_runc_is_an_error_and_cleans_up(monkeypatch):
    monkeypatch.setattr(process_io, "CONSOLE_TIMEOUT", 0.2)

    async def main(reaper: Reaper) -> None:
        pio = await open_io(reaper, Stdio("", "", "", terminal=True))
        sock = pio.runc_io()["console_socket"]
        with pytest.raises(TTRPCError, match="failed to retrieve console master: nothing received"):
            await pio.start()
        for _ in range(100):  # removed once the cancelled accept has let go of the socket
            if not os.path.exists(os.path.dirname(sock)):
                break
            await asyncio.sleep(0.01)
        assert not os.path.exists(os.path.dirname(sock))
        pio.close()
        pio2 = await open_io(reaper, Stdio("", "", "", terminal=True))  # closed before runc ran
        pio2.close()

    run(main)


def test_open_output_does_not_block_on_a_path_that_became_a_fifo_nobody_reads(tmp_path, monkeypatch):
    """A file when first looked at, a FIFO without a reader right after: whatever the shim does
    first with the path, opening it must not block (it runs on the event loop)."""
    path = tmp_path / "out"
    path.write_bytes(b"")
    swapped: list[bool] = []

    def swapping(real):
        def call(p, *args, **kwargs):
            result = real(p, *args, **kwargs)
            if os.fspath(p) == str(path) and not swapped:
                swapped.append(True)
                os.unlink(path)
                os.mkfifo(path)
            return result
        return call

    monkeypatch.setattr(fifo.os, "stat", swapping(os.stat))
    monkeypatch.setattr(fifo.os, "open", swapping(os.open))
    keep: dict[str, int] = {}
    opened: list[int] = []
    opener = threading.Thread(target=lambda: opened.append(fifo.open_output(str(path), keep)), daemon=True)
    opener.start()
    opener.join(2)
    monkeypatch.undo()
    if opener.is_alive():  # a reader lets the blocked open go, so that the test can end
        reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        opener.join(2)
        os.close(reader)
        os.close(opened[0])
        pytest.fail("open_output blocked on a FIFO nobody reads")
    (fd,) = opened
    assert swapped and stat.S_ISREG(os.fstat(fd).st_mode), "what was opened is what is written to"
    assert os.get_blocking(fd) and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND
    assert keep == {}
    os.close(fd)


def test_open_output_keeps_a_reader_on_a_fifo_nobody_reads_yet(tmp_path):
    (path,) = fifos(tmp_path, "out")
    keep: dict[str, int] = {}
    fd = fifo.open_output(path, keep)
    again = fifo.open_output(path, keep)
    assert list(keep) == [path] and os.get_blocking(fd) and not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND
    os.write(again, b"kept")
    assert os.read(keep[path], 100) == b"kept"
    for x in (fd, again, keep[path]):
        os.close(x)


def test_exit_is_not_held_by_a_writer_outpacing_the_reader(tmp_path):
    """Something left behind keeps the FIFO full while the client reads slowly: no new low, no wait."""
    (path,) = fifos(tmp_path, "out")

    async def main(reaper: Reaper) -> None:
        keeper = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        writer = os.open(path, os.O_WRONLY)
        stop = threading.Event()

        def flood() -> None:
            while not stop.is_set():
                os.write(writer, b"x" * 4096)

        def slow_read() -> None:
            while not stop.is_set():
                with contextlib.suppress(BlockingIOError):
                    os.read(keeper, 1024)
                stop.wait(0.01)

        threads = [threading.Thread(target=f, daemon=True) for f in (flood, slow_read)]
        for t in threads:
            t.start()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await fifo.read_by_client([keeper], stall=0.2, cap=5)
        assert loop.time() - t0 < 1.5
        stop.set()
        os.read(keeper, 1 << 20)  # let the flooder's last write finish
        for t in threads:
            t.join(5)
        os.close(writer)
        os.close(keeper)

    run(main)

"""The console socket: a pty master received over SCM_RIGHTS as runc sends it; window sizes."""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket

import pytest

from shim.stdio.console import ConsoleSocket, input_consumed, set_window_size, window_size


def send_like_runc(path: str, fds: list[int], name: bytes = b"/dev/pts/7") -> None:
    """What runc does with --console-socket: connect, send the pty's name with the master attached."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        socket.send_fds(s, [name], fds)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_receives_the_master_then_removes_socket_and_dir():
    master, slave = os.openpty()

    async def main():
        cs = ConsoleSocket()
        assert os.stat(cs.dir).st_mode & 0o777 == 0o700
        receiving = asyncio.ensure_future(cs.receive())
        await asyncio.sleep(0.05)
        assert not receiving.done(), "waits for runc without blocking the loop"
        await asyncio.get_running_loop().run_in_executor(None, send_like_runc, cs.path, [master])
        got = await receiving
        cs.close()
        assert not os.path.exists(cs.dir)
        return got

    got = run(main())
    try:
        assert os.isatty(got) and got != master
        assert not os.get_blocking(got) and not os.get_inheritable(got)
        assert fcntl.fcntl(got, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        os.write(slave, b"via the received master\n")
        assert os.read(got, 100) == b"via the received master\r\n"
    finally:
        for fd in (got, master, slave):
            os.close(fd)


def test_sent_before_we_accept_is_still_received():
    master, slave = os.openpty()

    async def main():
        cs = ConsoleSocket()
        send_like_runc(cs.path, [master])  # runc has exited by the time we look: the kernel queued it
        try:
            return await cs.receive()
        finally:
            cs.close()

    got = run(main())
    assert os.isatty(got)
    for fd in (got, master, slave):
        os.close(fd)


@pytest.mark.parametrize("what, message", [("none", "expected one fd"), ("two", "truncated|expected one fd"),
                                           ("not-a-tty", "not a terminal")])
def test_refuses_what_runc_would_not_send(what, message):
    r, w = os.pipe()
    fds = {"none": [], "two": [r, w], "not-a-tty": [r]}[what]

    async def main():
        cs = ConsoleSocket()
        try:
            send_like_runc(cs.path, fds)
            await cs.receive()
        finally:
            cs.close()

    with pytest.raises(OSError, match=message):
        run(main())
    before = set(os.listdir("/proc/self/fd"))
    os.close(r)
    os.close(w)
    assert len(before) - len(set(os.listdir("/proc/self/fd"))) == 2, "no received fd leaked"


def test_window_size_set_on_the_master_is_seen_on_the_slave():
    master, slave = os.openpty()
    try:
        set_window_size(master, width=132, height=43)
        assert window_size(slave) == (132, 43)
        set_window_size(master, width=0x1_0050, height=24)  # Go's uint16() truncation
        assert window_size(slave) == (80, 24)
    finally:
        os.close(master)
        os.close(slave)


def test_input_consumed_waits_for_the_slave_to_read_its_input():
    master, slave = os.openpty()

    async def main():
        loop = asyncio.get_running_loop()
        os.write(master, b"a line\n")
        t0 = loop.time()
        await input_consumed(master, timeout=0.2)  # nobody reads: bounded
        assert 0.15 < loop.time() - t0 < 1
        loop.call_later(0.1, os.read, slave, 100)
        t0 = loop.time()
        await input_consumed(master, timeout=5)
        assert 0.05 < loop.time() - t0 < 1
        os.write(master, b"partial, no newline")  # not readable in canonical mode: nothing to wait for
        t0 = loop.time()
        await input_consumed(master, timeout=5)
        assert loop.time() - t0 < 0.2

    try:
        run(main())
        assert os.ttyname(slave), "the slave is still usable: our peek did not take it"
    finally:
        os.close(master)
        os.close(slave)

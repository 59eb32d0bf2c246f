"""The fd → fd relay: splice and its read/write fallback, back-pressure, EOF, draining, ptys."""

from __future__ import annotations

import asyncio
import fcntl
import os
import threading
import time
from collections.abc import Awaitable, Callable

import pytest

from shim.stdio import relay as relay_mod
from shim.stdio.relay import CHUNK, Relay, pending_bytes


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 30))


def reader_thread(fd: int, out: bytearray, delay: float = 0.0) -> threading.Thread:
    """Reads ``fd`` (blocking) to EOF in a thread: the consumer on the other side of a relay."""
    def read() -> None:
        if delay:
            threading.Event().wait(delay)
        os.set_blocking(fd, True)
        while chunk := os.read(fd, 1 << 16):
            out.extend(chunk)
        os.close(fd)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    return t


def writer_thread(fd: int, data: bytes, close: bool = True) -> threading.Thread:
    def write() -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if close:
            os.close(fd)

    t = threading.Thread(target=write, daemon=True)
    t.start()
    return t


async def until(cond: Callable[[], bool], timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("splice", [True, False])
def test_moves_everything_until_eof_then_closes_both(splice):
    data = os.urandom(3 * 1024 * 1024 + 17)

    async def main():
        src_r, src_w = os.pipe()
        dst_r, dst_w = os.pipe()
        ended = []
        out = bytearray()
        r = Relay(src_r, dst_w, name="t", splice=splice, on_end=lambda: ended.append(True))
        r.start()
        reader = reader_thread(dst_r, out)
        writer_thread(src_w, data)
        await until(lambda: r.closed)
        reader.join(5)
        assert bytes(out) == data and ended == [True] and r.moved == len(data)
        for fd in (src_r, dst_w):
            with pytest.raises(OSError):
                os.fstat(fd)

    run(main)


def test_append_file_cannot_be_spliced_so_it_is_copied(tmp_path):
    path = tmp_path / "log"
    path.write_bytes(b"before\n")

    async def main():
        src_r, src_w = os.pipe()
        dst = os.open(path, os.O_WRONLY | os.O_APPEND)
        r = Relay(src_r, dst, name="t")
        r.start()
        writer_thread(src_w, b"after\n" * 1000)
        await until(lambda: r.closed)
        assert r._splice is False  # EINVAL from splice into an O_APPEND file switched it to copying

    run(main)
    assert path.read_bytes() == b"before\n" + b"after\n" * 1000


def test_a_slow_file_is_written_off_the_loop_in_order_one_chunk_at_a_time(tmp_path, monkeypatch):
    """A regular file's writes may block on the disk whatever O_NONBLOCK says: a thread does them, the
    loop keeps turning, at most one chunk is held and src is read again only once it is written."""
    path = tmp_path / "log"
    data = os.urandom(16 * CHUNK)
    real_write = os.write
    writers: set[str] = set()
    in_flight = [0, 0]  # now, at most

    async def main():
        src_r, src_w = os.pipe()
        dst = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)

        def slow_disk(fd, buf):
            if fd != dst:
                return real_write(fd, buf)
            writers.add(threading.current_thread().name)
            in_flight[0] += 1
            in_flight[1] = max(in_flight)
            time.sleep(0.05)
            in_flight[0] -= 1
            return real_write(fd, buf)

        monkeypatch.setattr(relay_mod.os, "write", slow_disk)
        r = Relay(src_r, dst, name="t")
        r.start()
        writer = writer_thread(src_w, data)
        loop = asyncio.get_running_loop()
        longest_turn = 0.0
        while not r.closed:
            t0 = loop.time()
            await asyncio.sleep(0.005)
            longest_turn = max(longest_turn, loop.time() - t0)
            assert r._buf is None or len(r._buf) <= CHUNK
        writer.join(5)
        monkeypatch.undo()
        assert longest_turn < 0.04, f"the loop was held {longest_turn:.3f}s"
        with pytest.raises(OSError):
            os.fstat(dst)  # closed once its last write returned

    run(main)
    assert path.read_bytes() == data
    assert writers and threading.main_thread().name not in writers
    assert in_flight[1] == 1


def test_close_during_a_file_write_closes_the_file_after_it(tmp_path, monkeypatch):
    path = tmp_path / "log"
    started, release = threading.Event(), threading.Event()
    real_write = os.write

    async def main():
        src_r, src_w = os.pipe()
        dst = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)

        def held_write(fd, buf):
            if fd == dst:
                started.set()
                release.wait(5)
            return real_write(fd, buf)

        os.write(src_w, b"last words\n")
        monkeypatch.setattr(relay_mod.os, "write", held_write)
        r = Relay(src_r, dst, name="t")
        r.start()
        await asyncio.to_thread(started.wait, 5)
        r.close()
        os.fstat(dst)  # still open: the thread is writing to it
        release.set()
        await until(lambda: r._file_write is None)
        monkeypatch.undo()
        with pytest.raises(OSError):
            os.fstat(dst)
        os.close(src_w)

    run(main)
    assert path.read_bytes() == b"last words\n"


@pytest.mark.parametrize("splice", [True, False])
def test_back_pressure_partial_writes_and_bounded_memory(splice):
    """dst holds 4 KiB and nobody reads it: the relay stops reading src (the producer blocks in the
    kernel), holds at most one chunk, and moves everything once the reader comes."""
    data = os.urandom(2 * 1024 * 1024)

    async def main():
        src_r, src_w = os.pipe()
        dst_r, dst_w = os.pipe()
        fcntl.fcntl(dst_w, fcntl.F_SETPIPE_SZ, 4096)
        r = Relay(src_r, dst_w, name="t", splice=splice)
        r.start()
        writer = writer_thread(src_w, data)
        await until(lambda: pending_bytes(dst_r) == 4096 and pending_bytes(src_r) > 0)
        await asyncio.sleep(0.1)
        moved = r.moved
        await asyncio.sleep(0.1)
        assert r.moved == moved, "nothing moves while dst is full"
        assert r._writing and not r._reading, "waiting for dst, not reading src"
        assert r._buf is None or len(r._buf) <= CHUNK
        assert writer.is_alive(), "the producer is held back by the kernel, not buffered by us"
        out = bytearray()
        reader = reader_thread(dst_r, out)
        await until(lambda: r.closed)
        reader.join(5)
        assert bytes(out) == data

    run(main)


def test_a_write_cut_short_keeps_the_rest_for_later(monkeypatch):
    written: list[int] = []
    real_write = os.write

    def short_write(fd, data):  # the first write takes 3 bytes, the next one says EAGAIN
        if not written:
            written.append(3)
            return real_write(fd, bytes(data[:3]))
        if len(written) == 1:
            written.append(0)
            raise BlockingIOError
        return real_write(fd, data)

    async def main():
        src_r, src_w = os.pipe()
        dst_r, dst_w = os.pipe()
        r = Relay(src_r, dst_w, name="t", splice=False)
        os.write(src_w, b"0123456789")
        os.close(src_w)
        monkeypatch.setattr(relay_mod.os, "write", short_write)
        r.start()
        await until(lambda: r.closed)
        monkeypatch.undo()
        assert written == [3, 0]
        assert os.read(dst_r, 100) == b"0123456789"

    run(main)


def test_drain_moves_what_is_pending_without_waiting_for_eof():
    async def main():
        src_r, src_w = os.pipe()
        dst_r, dst_w = os.pipe()
        fcntl.fcntl(dst_w, fcntl.F_SETPIPE_SZ, 1 << 20)
        r = Relay(src_r, dst_w, name="t")
        r.start()
        loop = asyncio.get_running_loop()
        loop.remove_reader(src_r)  # as if the loop had not yet run the relay's callback
        r._reading = False
        os.write(src_w, b"x" * 50000)
        await r.drain(timeout=2)
        assert pending_bytes(dst_r) == 50000 and pending_bytes(src_r) == 0
        assert not r.closed, "a writer may still hold src: drain does not end the relay"
        r.close()
        os.close(src_w)

    run(main)


def test_drain_gives_up_when_dst_is_not_read():
    async def main():
        src_r, src_w = os.pipe()
        dst_r, dst_w = os.pipe()
        fcntl.fcntl(dst_w, fcntl.F_SETPIPE_SZ, 4096)
        r = Relay(src_r, dst_w, name="t")
        r.start()
        os.write(src_w, b"y" * 20000)
        t0 = asyncio.get_running_loop().time()
        await r.drain(timeout=0.2)
        assert 0.15 < asyncio.get_running_loop().time() - t0 < 2
        assert pending_bytes(dst_r) == 4096
        r.close()

    run(main)


def test_end_when_empty_finishes_a_fifo_that_never_reaches_eof(tmp_path):
    fifo = tmp_path / "stdin"
    os.mkfifo(fifo)

    async def main():
        src = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # as the shim opens stdin: never at EOF
        client = os.open(fifo, os.O_WRONLY)
        dst_r, dst_w = os.pipe()
        ended = []
        r = Relay(src, dst_w, name="t", on_end=lambda: ended.append(True))
        r.start()
        os.write(client, b"last words\n")
        r.end_when_empty()
        await until(lambda: r.closed)
        assert ended == [True]
        assert os.read(dst_r, 100) == b"last words\n"
        assert os.read(dst_r, 100) == b""  # dst closed: the process reads EOF
        os.close(client)

    run(main)


def test_pty_master_eio_is_eof_and_every_byte_arrives():
    data = b"".join(b"line %d\n" % i for i in range(20000))

    async def main():
        master, slave = os.openpty()
        dst_r, dst_w = os.pipe()
        out = bytearray()
        reader = reader_thread(dst_r, out)
        r = Relay(master, dst_w, name="console", close_src=False)
        r.start()
        writer_thread(slave, data)  # closes the slave when done: the master then reads EIO
        await until(lambda: r.closed)
        reader.join(5)
        assert bytes(out) == data.replace(b"\n", b"\r\n")  # the pty's ONLCR
        os.fstat(master)  # not ours to close
        os.close(master)

    run(main)


def test_pty_drain_settles_while_the_slave_is_still_open():
    async def main():
        master, slave = os.openpty()
        dst_r, dst_w = os.pipe()
        r = Relay(master, dst_w, name="console", close_src=False)
        r.start()
        os.write(slave, b"hello\n")
        t0 = asyncio.get_running_loop().time()
        await r.drain(timeout=2, settle=0.1)
        assert 0.09 < asyncio.get_running_loop().time() - t0 < 1
        assert os.read(dst_r, 100) == b"hello\r\n"
        r.close()
        os.close(slave)
        os.close(master)

    run(main)

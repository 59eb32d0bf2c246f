"""logrus-style lines, and a log FIFO that never blocks the shim."""

from __future__ import annotations

import calendar
import fcntl
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim import log

F_SETPIPE_SZ = 1031
T0 = calendar.timegm((2026, 11, 21, 23, 24, 2)) + 0.123456


def record(msg: str = "hello", level: int = logging.INFO, args: tuple[object, ...] = (),
           fields: dict[str, object] | None = None, exc_info: object = None) -> logging.LogRecord:
    rec = logging.LogRecord("pyrunc", level, __file__, 1, msg, args, exc_info)  # type: ignore[arg-type]
    rec.created = T0
    if fields is not None:
        rec.fields = fields
    return rec


def test_line_layout() -> None:
    assert log.format_line(record()) == 'time="2026-11-21T23:24:02.123456000Z" level=info msg=hello'


def test_time_is_utc_with_nine_digits() -> None:
    rec = record()
    rec.created = 0.5
    assert log.format_line(rec).startswith('time="1970-01-01T00:00:00.500000000Z" ')
    assert log.rfc3339_nano(1_234_567_890_000_000_001) == "2009-02-13T23:31:30.000000001Z"


@pytest.mark.parametrize(("level", "name"), [
    (5, "trace"), (logging.DEBUG, "debug"), (logging.INFO, "info"), (logging.WARNING, "warning"),
    (logging.ERROR, "error"), (logging.CRITICAL, "fatal"),
])
def test_levels(level: int, name: str) -> None:
    assert f" level={name} " in log.format_line(record(level=level))


@pytest.mark.parametrize(("msg", "shown"), [
    ("plain", "plain"),
    ("a-b.c_d/e@f^g+h", "a-b.c_d/e@f^g+h"),  # what logrus leaves bare
    ("two words", '"two words"'),
    ('say "hi"', '"say \\"hi\\""'),
    ("k=v", '"k=v"'),
    ("back\\slash", '"back\\\\slash"'),
    ("line\nnext\ttab\r", '"line\\nnext\\ttab\\r"'),
    ("bell\x07 nul\x00 del\x7f", '"bell\\a nul\\x00 del\\x7f"'),
    ("café", '"café"'),
    ("\u2028", '"\\u2028"'),
    ("", ""),
])
def test_quoting(msg: str, shown: str) -> None:
    assert log.format_line(record(msg)).endswith(f" msg={shown}")


def test_message_arguments() -> None:
    assert log.format_line(record("exit %d of %s", args=(3, "c1"))).endswith(' msg="exit 3 of c1"')


def test_fields_sorted_and_quoted() -> None:
    line = log.format_line(record(fields={"pid": 42, "namespace": "k8s.io", "path": "/run/a b", "ok": True,
                                          "none": None, "err": 'x="y"'}))
    assert line.endswith(' msg=hello err="x=\\"y\\"" namespace=k8s.io none="<nil>" ok=true path="/run/a b" pid=42')


def test_exception_becomes_error_field() -> None:
    try:
        raise ValueError("boom here")
    except ValueError:
        line = log.format_line(record("failed", level=logging.ERROR, fields={"id": "c1"}, exc_info=sys.exc_info()))
    assert "\n" not in line
    assert line.startswith('time="2026-11-21T23:24:02.123456000Z" level=error msg=failed error="Traceback (most')
    assert line.endswith('ValueError: boom here" id=c1')


def test_extra_fields_from_the_handler() -> None:
    assert log.format_line(record(fields={"a": 1}), {"dropped_log_lines": 3}).endswith(" a=1 dropped_log_lines=3")


def test_format_entry_for_callers_without_records() -> None:
    assert log.format_entry(0, "warning", "cleanup failed", {"error": "EBUSY"}) == \
        'time="1970-01-01T00:00:00.000000000Z" level=warning msg="cleanup failed" error=EBUSY'


# -- the handler and the FIFO ---------------------------------------------------------------------

@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    root.setLevel(level)


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[int]:
    """The bundle's log FIFO, held open read-write as containerd holds it; yields the read end."""
    os.mkfifo(tmp_path / "log")
    fd = os.open(tmp_path / "log", os.O_RDWR | os.O_NONBLOCK)
    yield fd
    os.close(fd)


def ours() -> list[log.FifoHandler]:
    return [h for h in logging.getLogger().handlers if isinstance(h, log.FifoHandler)]


def drain(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return b"".join(chunks)
        chunks.append(chunk)


def test_setup_writes_lines_to_the_fifo(tmp_path: Path, fifo: int) -> None:
    log.setup(str(tmp_path), debug=False)
    logger = logging.getLogger("pyrunc.test")
    logger.debug("not shown")
    logger.info("shim serving", extra={"fields": {"pid": 7}})
    lines = drain(fifo).decode().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith('time="') and lines[0].endswith('level=info msg="shim serving" pid=7')


def test_setup_again_replaces_the_handler(tmp_path: Path, fifo: int) -> None:
    log.setup(str(tmp_path), debug=False)
    first = ours()
    log.setup(str(tmp_path), debug=True)
    assert len(ours()) == 1 and ours() != first and first[0].fd == -1  # the old one is closed
    logging.getLogger("pyrunc.test").debug("now shown")
    assert b"level=debug msg=\"now shown\"" in drain(fifo)
    assert logging.getLogger().level == logging.DEBUG


def test_fifo_is_written_without_blocking(tmp_path: Path, fifo: int) -> None:
    log.setup(str(tmp_path), debug=False)
    (handler,) = ours()
    assert fcntl.fcntl(handler.fd, fcntl.F_GETFL) & os.O_NONBLOCK


def test_without_a_fifo_logs_go_to_stderr(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    log.setup(str(tmp_path), debug=False)
    (handler,) = ours()
    assert (handler.fd, handler.owns_fd) == (2, False)
    logging.getLogger("pyrunc.test").warning("no fifo")
    assert capfd.readouterr().err.endswith('level=warning msg="no fifo"\n')


def test_full_fifo_drops_and_counts(tmp_path: Path, fifo: int) -> None:
    fcntl.fcntl(fifo, F_SETPIPE_SZ, 4096)
    log.setup(str(tmp_path), debug=False)
    (handler,) = ours()
    logger = logging.getLogger("pyrunc.test")
    began = time.monotonic()
    for i in range(200):
        logger.info("line %d %s", i, "x" * 60)
    assert time.monotonic() - began < 5  # nothing waited for a reader
    dropped = handler.dropped
    assert dropped > 0
    written = drain(fifo).decode().splitlines()
    assert len(written) + dropped == 200
    assert all(line.startswith('time="') and line.endswith("x" * 60 + '"') for line in written)
    logger.info("after")
    assert drain(fifo).decode().endswith(f'msg=after dropped_log_lines={dropped}\n')
    assert handler.dropped == 0


def test_a_line_cut_short_is_finished_first(tmp_path: Path, fifo: int) -> None:
    """Past PIPE_BUF a non-blocking write may be partial: the rest must go out before any other line."""
    fcntl.fcntl(fifo, F_SETPIPE_SZ, 4096)
    log.setup(str(tmp_path), debug=False)
    (handler,) = ours()
    logger = logging.getLogger("pyrunc.test")
    logger.info("big %s", "y" * 6000)
    logger.info("dropped while the big one is pending")
    assert handler.dropped == 1
    first = drain(fifo)
    logger.info("next")  # finishes the big line: the pipe is empty now
    lines = (first + drain(fifo)).decode().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("y" * 6000 + '"')
    assert lines[1].endswith("msg=next dropped_log_lines=1")


def test_nobody_reading_is_not_an_error(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "log")
    reader = os.open(tmp_path / "log", os.O_RDONLY | os.O_NONBLOCK)
    log.setup(str(tmp_path), debug=False)
    os.close(reader)  # now writes fail with EPIPE
    logging.getLogger("pyrunc.test").error("into the void")
    (handler,) = ours()
    assert handler.dropped == 1

"""binary:// loggers: fds 3/4/5, environment, arguments, readiness, exec failures, stopping."""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from shim.reaper import Reaper
from shim.stdio import logger as logger_mod
from shim.stdio.logger import BinaryLogger, LoggerError

# Records its arguments, environment and open fds, says it is ready by closing fd 5, then copies
# fd 3 and fd 4 into files until both reach EOF.
LOGGER = """#!/bin/sh
out={out}
echo "$@" > $out/args
env > $out/env
{ready}
cat <&3 > $out/stdout &
cat <&4 > $out/stderr
wait
echo done > $out/done
"""


def write_logger(tmp_path: Path, ready: str = "exec 5>&-", name: str = "logger") -> Path:
    script = tmp_path / name
    script.write_text(LOGGER.format(out=tmp_path, ready=ready))
    script.chmod(0o755)
    return script


def run(test: Callable[[Reaper], Awaitable[None]]) -> None:
    async def main() -> None:
        reaper = Reaper()
        reaper.install()
        try:
            await asyncio.wait_for(test(reaper), 30)
        finally:
            reaper.close()

    asyncio.run(main())


async def start(reaper: Reaper, path: Path | str, args: tuple[str, ...] = (), **kw) -> BinaryLogger:
    return await BinaryLogger.start(reaper, str(path), args, process_id="c1", namespace="ns1", **kw)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


@pytest.mark.parametrize("ready", ["exec 5>&-", "printf r >&5"])
def test_logger_gets_fds_env_args_and_every_byte(tmp_path, ready):
    script = write_logger(tmp_path, ready)

    async def main(reaper: Reaper) -> None:
        lg = await start(reaper, script, ("--id", "abc", "flag", ""))
        assert lg.stdout_w is not None and lg.stderr_w is not None
        out, err = os.dup(lg.stdout_w), os.dup(lg.stderr_w)  # the process's ends
        lg.release()
        write_all(out, b"o" * 300000)
        write_all(err, b"e\n" * 1000)
        os.close(out)
        os.close(err)
        assert await asyncio.wait_for(lg.child.wait(), 10) == 0  # EOF on 3 and 4 ends it

    run(main)
    assert (tmp_path / "done").exists()
    assert (tmp_path / "stdout").read_bytes() == b"o" * 300000
    assert (tmp_path / "stderr").read_bytes() == b"e\n" * 1000
    assert (tmp_path / "args").read_text() == "--id abc flag \n"
    env = dict(line.split("=", 1) for line in (tmp_path / "env").read_text().splitlines() if "=" in line)
    assert (env["CONTAINER_ID"], env["CONTAINER_NAMESPACE"]) == ("c1", "ns1")
    assert "HOME" not in env and "PYTEST_CURRENT_TEST" not in env, "only the two variables Go sets"


def test_logger_has_fds_3_4_5_and_nothing_of_ours(tmp_path):
    script = tmp_path / "fds-logger"
    script.write_text(f"""#!{sys.executable} -I
import os, stat
fds = {{}}
for x in os.listdir("/proc/self/fd"):
    try:
        fds[int(x)] = os.readlink("/proc/self/fd/" + x)
    except OSError:  # listdir's own fd, closed by now
        pass
kinds = {{fd: stat.S_ISFIFO(os.fstat(fd).st_mode) for fd in (3, 4, 5)}}
with open({str(tmp_path / "fds")!r}, "w") as f:
    f.write(repr((fds, kinds)))
""")
    script.chmod(0o755)
    inherited = {int(x) for x in os.listdir("/proc/self/fd") if _inheritable(int(x))}

    async def main(reaper: Reaper) -> None:
        lg = await start(reaper, script)  # exits at once: its fd 5 closes, which is readiness too
        await asyncio.wait_for(lg.child.wait(), 10)
        lg.release()

    run(main)
    fds, kinds = eval((tmp_path / "fds").read_text())
    assert kinds == {3: True, 4: True, 5: True}
    extra = set(fds) - {0, 1, 2, 3, 4, 5} - inherited
    assert not extra, f"leaked into the logger: {fds}"


def _inheritable(fd: int) -> bool:
    try:
        return os.get_inheritable(fd)
    except OSError:
        return False


def test_missing_or_unrunnable_binary_is_an_error_like_gos(tmp_path):
    not_exec = tmp_path / "not-exec"
    not_exec.write_text("#!/bin/sh\n")
    not_exec.chmod(stat.S_IRUSR)

    async def main(reaper: Reaper) -> None:
        with pytest.raises(LoggerError) as e:
            await start(reaper, "/no/such/logger")
        assert str(e.value) == "failed to start binary process: fork/exec /no/such/logger: " \
                               "no such file or directory"
        with pytest.raises(LoggerError, match="fork/exec .*not-exec: permission denied"):
            await start(reaper, not_exec)

    run(main)  # even root cannot exec a file without any x bit


def test_missing_binary_as_root_too(tmp_path):
    async def main(reaper: Reaper) -> None:
        with pytest.raises(LoggerError, match="fork/exec /no/such/logger: no such file or directory"):
            await start(reaper, "/no/such/logger")
        no_shebang = tmp_path / "garbage"
        no_shebang.write_bytes(b"\x7fELF garbage")
        no_shebang.chmod(0o755)
        with pytest.raises(LoggerError, match="exec format error"):
            await start(reaper, no_shebang)

    run(main)


def test_a_logger_that_never_gets_ready_is_killed_and_reaped(tmp_path):
    script = write_logger(tmp_path, ready="sleep 60")

    async def main(reaper: Reaper) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        spawned: list = []
        real_spawn = reaper.spawn

        def spawn(*a, **kw):
            spawned.append(real_spawn(*a, **kw))
            return spawned[-1]

        reaper.spawn = spawn  # type: ignore[method-assign]
        with pytest.raises(LoggerError, match="did not signal readiness on fd 5 within 0.3s"):
            await start(reaper, script, ready_timeout=0.3)
        assert loop.time() - t0 < 5
        assert await asyncio.wait_for(spawned[0].wait(), 5) == 137  # SIGKILLed, reaped by the reaper

    run(main)


def test_stop_terms_then_kills(tmp_path, monkeypatch):
    stubborn = tmp_path / "stubborn"
    stubborn.write_text("#!/bin/sh\ntrap '' TERM\nexec 5>&-\nwhile :; do sleep 0.05; done\n")
    stubborn.chmod(0o755)
    polite = write_logger(tmp_path)
    monkeypatch.setattr(logger_mod, "STOP_TIMEOUT", 0.5)

    async def main(reaper: Reaper) -> None:
        lg = await start(reaper, polite)
        await lg.stop()
        assert lg.child.returncode == 128 + 15
        lg = await start(reaper, stubborn)
        await lg.stop()
        assert lg.child.returncode == 128 + 9
        assert lg.stdout_w is None and lg.stderr_w is None

    run(main)

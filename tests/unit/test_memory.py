"""shim/memory.py and shim/first_use.py: the zygote's memory steps do what they say and leave nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """In a fresh interpreter: these steps change process-wide state (sys.modules, the environment)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env={**(env or os.environ), "PYTHONPATH": str(ROOT)})


def test_set_environ_reaches_the_process_environment():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PSS_KEEP="same", PSS_CHANGE="old", PSS_DROP="x")
    res = _run("""
        import os, subprocess
        from shim import memory
        wanted = {k: v for k, v in os.environ.items() if k not in ("PSS_DROP", "PYTHONPATH")}
        wanted.update(PSS_CHANGE="new", PSS_ADD="é=1")
        memory.set_environ(wanted)
        assert dict(os.environ) == wanted, "os.environ"
        seen = subprocess.run(["env", "-0"], capture_output=True, check=True).stdout  # the C environ
        seen = dict(item.split(b"=", 1) for item in seen.split(b"\\0") if item)
        assert seen == {os.fsencode(k): os.fsencode(v) for k, v in wanted.items()}, "execve environment"
        memory.set_environ(dict(wanted))  # unchanged: nothing to do
        assert dict(os.environ) == wanted
    """, env)
    assert res.returncode == 0, res.stderr


def test_zygote_steps_leave_no_fds_threads_or_loop_and_skip_optional_modules():
    res = _run("""
        import gc, os, sys
        from shim import memory
        memory.before_imports()
        import asyncio
        from shim import cli, serve  # noqa: F401 - what the zygote imports
        import shutil  # noqa: F401 - imports bz2 and lzma where it can
        loaded = {"ssl", "_ssl", "_bz2", "_lzma"} & {m for m, v in sys.modules.items() if v}
        assert not loaded, loaded
        fds = sorted(os.listdir("/proc/self/fd"))
        unpacked = serve._serve.__code__
        import tempfile
        warm = os.path.join(tempfile.mkdtemp(prefix="mem-", dir="/tmp"), "warm.sock")
        memory.before_freeze(warm)
        assert not os.path.exists(warm), "the warm-up socket is removed"
        os.rmdir(os.path.dirname(warm))
        gc.collect()
        gc.freeze()
        memory.after_freeze()
        assert "shim.zygote" in sys.modules
        assert serve._serve.__code__ is not unpacked, "the code servers run is not packed"
        if sys.version_info[:2] == (3, 12):  # first_use ran: a function servers run has its version
            import ctypes
            from shim import first_use
            from shim.stdio.relay import Relay
            offset = first_use._fresh_version()[0]
            assert ctypes.c_uint32.from_address(id(Relay._pump) + offset).value, "no version"
        assert sorted(os.listdir("/proc/self/fd")) == fds, "fds left open"
        assert os.listdir("/proc/self/task") == [str(os.getpid())], "threads"
        assert asyncio.events._get_running_loop() is None
        if sys.implementation.name == "cpython":
            assert memory._FILLERS and memory._HELD, "nothing filled or drained"
        if memory.immortal_refcounts_work():
            assert sys.getrefcount(asyncio.run) >= 0xFFFFFFFF, "the modules' objects are not immortal"
        # a server still runs an event loop, in the same process
        async def main():
            await asyncio.sleep(0)
            return 7
        assert asyncio.run(main()) == 7
    """)
    assert res.returncode == 0, res.stderr


def test_warm_up_failure_is_swallowed(monkeypatch):
    from shim import memory

    def boom(path):
        raise RuntimeError("no")

    monkeypatch.setattr(memory, "_warm_up", boom)
    memory.warm_up("/nonexistent/warm.sock")


def test_immortalized_module_objects_keep_their_counts_and_still_work():
    res = _run("""
        import asyncio, sys
        from shim import memory, serve  # noqa: F401 - what the zygote holds
        if not memory.immortal_refcounts_work():
            assert memory.immortalize_modules() == 0
            print("SKIP immortal objects need CPython 3.12+ (GIL build), this is", sys.version)
            raise SystemExit(0)
        assert memory.immortalize_modules() > 10_000
        run, state = asyncio.run, serve.__dict__
        before = sys.getrefcount(run), sys.getrefcount(state)
        held = [run] * 1000 + [state] * 1000
        assert (sys.getrefcount(run), sys.getrefcount(state)) == before, "a count moved"
        del held
        fresh = object()
        assert sys.getrefcount(fresh) == 2, "new objects stay mortal"
        async def main():
            await asyncio.sleep(0)
            return 7
        assert asyncio.run(main()) == 7
        assert memory.immortalize_modules() < 1000, "a second pass finds little new"
    """)
    assert res.returncode == 0, res.stderr
    if res.stdout.startswith("SKIP"):
        pytest.skip(res.stdout.removeprefix("SKIP ").strip())


def test_tag_types_looks_up_plainly_and_survives_odd_objects():
    res = _run("""
        import weakref
        from shim import first_use
        calls = []
        class Meta(type):
            def __getattr__(cls, name):
                calls.append(name)
                raise AttributeError(name)
        class Odd(metaclass=Meta):
            x = 1
        proxy = weakref.proxy(Odd)  # claims to be a type: isinstance(proxy, type) is True
        first_use.tag_types()
        assert calls == [], calls
        assert Odd.x == 1 and proxy.x == 1
    """)
    assert res.returncode == 0, res.stderr


def test_tag_module_dicts_leaves_every_module_as_it_was():
    res = _run("""
        import sys, types
        from shim import first_use, serve  # noqa: F401 - what the zygote holds
        before = {name: dict(vars(m)) for name, m in list(sys.modules.items()) if type(m) is types.ModuleType}
        first_use.tag_module_dicts()
        after = {name: dict(vars(m)) for name, m in list(sys.modules.items()) if type(m) is types.ModuleType}
        assert before.keys() == after.keys(), "a module came or went"
        changed = [n for n in before if n != "__main__" and before[n].keys() != after[n].keys()
                   or any(before[n][k] is not after[n][k] for k in before[n])]
        assert not changed, changed
    """)
    assert res.returncode == 0, res.stderr


def test_fill_instance_keys_runs_no_class_code():
    res = _run("""
        from shim import first_use
        calls = []
        class Plain:
            def __init__(self, a):
                calls.append("init")
                self.a = a
                self.b = 2
        class Guarded:
            def __init__(self):
                self.x = 1
            def __setattr__(self, name, value):
                calls.append("setattr")
                object.__setattr__(self, name, value)
        class Finalised:
            def __init__(self):
                self.y = 1
            def __del__(self):
                calls.append("del")
        class WithSetter:
            def __init__(self):
                self.z = 1
            @property
            def z(self):
                return 0
            @z.setter
            def z(self, value):
                calls.append("setter")
        class Made:
            def __new__(cls):
                calls.append("new")
                return super().__new__(cls)
            def __init__(self):
                self.w = 1
        assert first_use._init_attributes(Plain.__init__) == ["a", "b"]
        first_use.fill_instance_keys()
        assert calls == [], calls
        import ctypes, sys
        region = sys.getsizeof(Plain)  # 3.12: the class, then its shared keys
        before = ctypes.string_at(id(Plain), region)
        p = Plain(1)
        after = ctypes.string_at(id(Plain), region)
        if sys.version_info[:2] == (3, 12):  # only the class's reference count moved
            assert [i for i in range(8, region) if before[i] != after[i]] == []
        assert (p.a, p.b, vars(p)) == (1, 2, {"a": 1, "b": 2})
        assert Guarded().x == 1 and Finalised().y == 1 and Made().w == 1
    """)
    assert res.returncode == 0, res.stderr


def test_version_functions_numbers_what_servers_run_and_calls_still_work():
    res = _run("""
        import ctypes, sys
        from shim import first_use, serve, zygote  # noqa: F401 - what the zygote holds
        if sys.version_info[:2] != (3, 12):
            assert first_use.version_functions() == 0
            print("SKIP function versions are handed out on CPython 3.12 only, this is", sys.version)
            raise SystemExit(0)
        offset, first = first_use._fresh_version()
        again, second = first_use._fresh_version()
        assert offset == again and 0 < first < second, (offset, again, first, second)
        unpack = zygote._unpack  # in the profile: servers run it
        unpack.__code__ = unpack.__code__  # as code_layout.pack does: that resets the version
        field = ctypes.c_uint32.from_address(id(unpack) + offset)
        assert field.value == 0
        assert first_use.version_functions() >= 1
        assert field.value > second, "a fresh number"
        data = zygote._pack([b"a", b"bc"])
        assert [unpack(data) for _ in range(6)] == [[b"a", b"bc"]] * 6  # through a specialised call
        assert field.value > second, "a call keeps it"
    """)
    assert res.returncode == 0, res.stderr
    if res.stdout.startswith("SKIP"):
        pytest.skip(res.stdout.removeprefix("SKIP ").strip())

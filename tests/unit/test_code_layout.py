"""shim/code_layout.py: packing keeps every function working, the profile still names real code, and
recording writes what ran."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SAMPLE = '''
import functools

def plain(x):
    return x + 1

def outer(n):
    def inner(k):
        return k * n
    return inner

def gen_user(xs):
    return sum(x * 2 for x in xs)

def deco(f):
    @functools.wraps(f)
    def wrapped(*a):
        return ("wrapped", f(*a))
    return wrapped

@deco
def decorated(x):
    return x

class Thing:
    def method(self):
        return plain(41)

    @property
    def prop(self):
        return "p"

cold_closure = outer(3)
'''


def _run(code: str, tmp_path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "sample_mod.py").write_text(SAMPLE)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path,
                          env={**(env or os.environ), "PYTHONPATH": f"{ROOT}:{tmp_path}"})


def test_pack_recreates_hot_code_and_everything_still_works(tmp_path):
    res = _run("""
        import sample_mod as m
        from shim import code_layout
        before = {n: getattr(m, n).__code__ for n in ("plain", "outer", "gen_user")}
        before["method"] = m.Thing.method.__code__
        before["wrapped"] = m.decorated.__code__
        before["cold_closure"] = m.cold_closure.__code__
        before["prop"] = m.Thing.prop.fget.__code__
        assert code_layout.key(m.plain.__code__) == "sample_mod.py:plain"
        hot = ["sample_mod.py:Thing.method", "sample_mod.py:outer.<locals>.inner", "sample_mod.py:plain",
               "sample_mod.py:gen_user.<locals>.<genexpr>", "sample_mod.py:deco.<locals>.wrapped",
               "nowhere.py:gone"]
        n = code_layout.pack(hot)
        # plain, method, inner + its parent outer, the genexpr + gen_user, wrapped + deco
        assert n == 8, n
        assert m.plain.__code__ is not before["plain"]
        assert m.Thing.method.__code__ is not before["method"]
        assert m.outer.__code__ is not before["outer"], "a parent of hot code is re-created"
        assert m.gen_user.__code__ is not before["gen_user"]
        assert m.decorated.__code__ is not before["wrapped"], "a function made at import"
        assert m.cold_closure.__code__ is not before["cold_closure"], "a closure made before the pack"
        assert m.Thing.prop.fget.__code__ is before["prop"], "cold code stays"
        inner_const = [c for c in m.outer.__code__.co_consts if hasattr(c, "co_code")][0]
        assert m.outer(2).__code__ is inner_const, "closures made later get the new nested code"
        assert m.outer(2)(5) == 10 and m.cold_closure(5) == 15
        assert m.plain(1) == 2 and m.Thing().method() == 42 and m.Thing().prop == "p"
        assert m.gen_user([1, 2, 3]) == 12
        assert m.decorated(9) == ("wrapped", 9)
        assert code_layout.pack([]) == 0
        print("ok")
    """, tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_profile_names_code_that_exists():
    """Every pyrunc entry of shim/_hot_code.py is code the zygote holds; if not, rerun tools/hot_code.py."""
    res = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import gc, sys, types
        from shim import memory
        memory.before_imports()
        from shim import cli, serve, zygote, code_layout  # noqa: F401 - what the zygote holds
        profile = code_layout.load_profile()
        assert len(profile) > 100, len(profile)
        assert len(set(profile)) == len(profile), "an entry twice"
        keys, todo = set(), [o.__code__ for o in gc.get_objects() if type(o) is types.FunctionType]
        while todo:
            code = todo.pop()
            keys.add(code_layout.key(code))
            todo += [c for c in code.co_consts if isinstance(c, types.CodeType)]
        ours = [k for k in profile if k.startswith("shim/")]
        missing = [k for k in ours if k not in keys]
        assert not missing, f"stale: rerun tools/hot_code.py; gone: {missing}"
        print(len(ours))
    """)], capture_output=True, text=True, timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr
    assert int(res.stdout) > 50


def test_record_writes_each_started_code_once(tmp_path):
    if not hasattr(sys, "monitoring"):
        pytest.skip(f"recording needs sys.monitoring (CPython 3.12+), this is {sys.version.split()[0]}")
    res = _run(f"""
        import os, sample_mod as m
        from shim import code_layout
        assert code_layout.record({str(tmp_path)!r})
        for _ in range(3):
            m.plain(1)
        m.outer(2)(3)
        rows = [line.split("\\t") for line in open(os.path.join({str(tmp_path)!r}, f"{{os.getpid()}}.txt"))]
        lines = [r[0] for r in rows]
        assert lines.count("sample_mod.py:plain") == 1, lines
        assert lines[0] == "<string>:<module>", "the running code first"
        row = rows[lines.index("sample_mod.py:plain")]
        assert int(row[1]) == id(m.plain.__code__) and int(row[2]) == len(m.plain.__code__.co_code)
        assert lines.index("sample_mod.py:outer") < lines.index("sample_mod.py:outer.<locals>.inner")
        assert not code_layout.record({str(tmp_path)!r}), "the tool id is taken"
        print("ok")
    """, tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"

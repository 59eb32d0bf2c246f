"""The demo's preflight messages (tools/try.py): one line each, saying what to do."""

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("try_demo", Path(__file__).resolve().parents[2] / "tools" / "try.py")
demo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo)


def test_containerd_versions():
    assert demo.containerd_problem("containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1") is None
    assert demo.containerd_problem("containerd containerd.io 2.1.4 abc") is None
    old = demo.containerd_problem("containerd github.com/containerd/containerd 1.5.9")
    assert "too old" in old and "apt-get install containerd" in old and "\n" not in old
    assert "cannot tell" in demo.containerd_problem("")


def test_cgroup_modes(tmp_path):
    assert "no cgroup" in demo.cgroup_problem(str(tmp_path))
    (tmp_path / "memory").mkdir()
    assert demo.cgroup_problem(str(tmp_path)) is None
    (tmp_path / "memory").rmdir()
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    assert demo.cgroup_problem(str(tmp_path)) is None

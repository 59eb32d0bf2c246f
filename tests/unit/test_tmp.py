"""shim/tmp.py: new names under go-runc's temp dir."""

from __future__ import annotations

import os

from shim import tmp


def test_runtime_dir_is_xdg_then_tmpdir_then_tmp(monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/0")
    monkeypatch.setenv("TMPDIR", "/var/tmp")
    assert tmp.runtime_dir() == "/run/user/0"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert tmp.runtime_dir() == "/var/tmp"
    monkeypatch.delenv("TMPDIR")
    assert tmp.runtime_dir() == "/tmp"


def test_create_tries_another_name_when_one_exists(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    tried = []

    def make(path: str) -> int:
        tried.append(path)
        if len(tried) == 1:
            raise FileExistsError(path)
        os.mkdir(path, 0o700)
        return 7

    path, made = tmp.create("pty", ".d", make)
    assert made == 7 and path == tried[1] != tried[0]
    assert os.path.dirname(path) == str(tmp_path)
    assert os.path.basename(path).startswith("pty") and path.endswith(".d")
    assert os.stat(path).st_mode & 0o777 == 0o700

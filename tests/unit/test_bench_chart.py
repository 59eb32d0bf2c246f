"""bench/chart.py: the README's chart, drawn from a shim_bench JSON result."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from chart import render  # noqa: E402


def metric(key: str, ratio: float, better: str) -> dict:
    return {"key": key, "label": key, "unit": "ms", "better": better, "ratio_ours_over_go": ratio}


def test_chart_is_a_png_of_every_measured_ratio(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the chart is an optional extra: pip install -e .[bench]")
    results = {"meta": {"mode": "quick", "git": "abc1234", "python": "3.11.7", "cpus": 2,
                        "containerd": "containerd github.com/containerd/containerd 1.6.20"},
               "metrics": [metric("start", 1.1, "lower"), metric("stdout", 1.3, "higher"),
                           metric("failed", None, "lower")]}
    out = tmp_path / "chart.png"
    render(results, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000

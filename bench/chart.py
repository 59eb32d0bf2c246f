"""A PNG of shim_bench's ratios (pyrunc / Go shim), for the README.

    python bench/chart.py results.json chart.png     # from a saved `shim_bench.py --json` run
    python bench/shim_bench.py --quick --png chart.png

Needs matplotlib (`pip install -e .[bench]`); nothing else in the project does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def render(results: dict, path: str | Path) -> None:
    """One bar per metric: pyrunc's value over the Go shim's, green where pyrunc does as well or better."""
    try:
        import matplotlib
    except ImportError as e:
        raise SystemExit("the chart needs matplotlib: pip install -e .[bench]") from e
    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    rows = [m for m in results["metrics"] if m.get("ratio_ours_over_go")]
    labels = [f"{m['label']} ({m['unit']}, {m['better']} is better)" for m in rows]
    ratios = [m["ratio_ours_over_go"] for m in rows]
    good = [(r <= 1.0) if m["better"] == "lower" else (r >= 1.0) for m, r in zip(rows, ratios, strict=True)]
    height = 0.42 * len(rows) + 1.4
    fig, ax = plt.subplots(figsize=(11, height))
    y = range(len(rows))[::-1]
    ax.barh(list(y), ratios, color=["#3a923a" if g else "#c0392b" for g in good])
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.set_xlabel("pyrunc / Go shim (1.0 = same)")
    for yi, r in zip(y, ratios, strict=True):
        ax.text(r, yi, f" {r:.2f}", va="center", fontsize=8)
    meta = results.get("meta", {})
    containerd = meta.get("containerd", "").split()[-1] if meta.get("containerd") else "?"
    ax.set_title(f"pyrunc vs containerd's Go shim, {meta.get('mode', '')} run at {meta.get('git', '?')}\n"
                 f"containerd {containerd}, Python {meta.get('python', '?')}, {meta.get('cpus', '?')} CPUs",
                 fontsize=9)
    ax.set_xlim(0, max(ratios + [1.0]) * 1.15)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    render(json.loads(Path(argv[0]).read_text()), argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

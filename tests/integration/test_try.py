"""README's first command: tools/try runs a container through pyrunc and shows its events."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_try_runs_a_container_and_shows_events(stack_available):
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "try.py"), "sh", "-c", "echo hello from try; exit 3"],
                       capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert r.returncode == 3, r.stderr
    assert "hello from try" in r.stdout
    for topic in ("/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"):
        assert topic in r.stdout
    assert "# exit status 3" in r.stdout

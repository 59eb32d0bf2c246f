"""The Dockerfile installs pyrunc with exactly the steps the tests and CI use (no engine runs here)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [tuple(line.split(None, 1)) for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_dockerfile_uses_the_tested_setup_and_demo():
    steps = instructions()
    assert steps[0] == ("FROM", "debian:bookworm-slim")  # Python 3.11, containerd 1.6: what CI runs on
    runs = [arg for op, arg in steps if op == "RUN"]
    assert any("bash tools/setup.sh" in r for r in runs), "the image must install through tools/setup.sh"
    assert ("ENTRYPOINT", '["bash", "tools/try"]') in steps


def test_setup_script_installs_what_the_tests_need():
    setup = (ROOT / "tools" / "setup.sh").read_text()
    for package in ("containerd", "runc", "busybox-static"):
        assert package in setup
    assert "pip install" in setup and "-e" in setup
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash tools/setup.sh test" in ci

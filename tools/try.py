"""Run a container through pyrunc in a throwaway containerd; see tools/try. Cleans up, also on Ctrl-C."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.stack import PYRUNC, PrivateContainerd, build_busybox_rootfs, build_oci_image_tar  # noqa: E402

IMAGE = "localhost/pyrunc-try/busybox:latest"


def containerd_problem(version_output: str) -> str | None:
    """`containerd --version` → a one-line message with the fix, or None when it will do."""
    m = re.search(r"\b(\d+)\.(\d+)\.\d+", version_output)
    if not m:
        return f"cannot tell containerd's version from {version_output.strip()!r}: apt-get install containerd"
    major, minor = int(m.group(1)), int(m.group(2))
    if (major, minor) < (1, 6):
        return f"containerd {major}.{minor} is too old: pyrunc needs 1.6 or newer (apt-get install containerd)"
    if major > 2:
        return f"containerd {major}.{minor} is newer than pyrunc knows (1.6 to 2.x): expect surprises"
    return None


def cgroup_problem(root: str = "/sys/fs/cgroup") -> str | None:
    """Neither a unified (v2) nor a v1 memory hierarchy: containers cannot be limited or measured."""
    if os.path.exists(os.path.join(root, "cgroup.controllers")) or os.path.isdir(os.path.join(root, "memory")):
        return None
    return f"no cgroup v1 memory or cgroup v2 hierarchy at {root}: mount cgroups (a systemd host has them)"


def main(argv: list[str]) -> int:
    command = argv or ["sh", "-c", "echo hello from a container run by pyrunc; uname -sr; id; ls /"]
    work = Path(tempfile.mkdtemp(prefix="pyrunc-try-"))
    for problem in (containerd_problem(subprocess.run(["containerd", "--version"], capture_output=True,
                                                          text=True).stdout), cgroup_problem()):
        if problem:
            print(f"try: {problem}", file=sys.stderr)
            if "too old" in problem or "cgroup" in problem:
                return 1
    stack = PrivateContainerd(namespace="pyrunc-try")
    try:
        print(f"# throwaway containerd in {stack.dir}")
        stack.start()
        tar = build_oci_image_tar(build_busybox_rootfs(work / "rootfs"), work / "busybox.tar", IMAGE)
        stack.ctr("image", "import", str(tar))
        events_file = stack.dir / "events.txt"
        events = stack.ctr_popen("events", stdout=open(events_file, "wb"), stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        print(f"$ ctr run --rm --runtime {PYRUNC} {IMAGE} demo {' '.join(command)}", flush=True)
        run = subprocess.run(["ctr", "--address", stack.address, "--namespace", stack.namespace, "run", "--rm",
                              "--runtime", PYRUNC, IMAGE, "demo", *command])
        time.sleep(0.5)
        events.kill()
        events.wait()
        print(f"# exit status {run.returncode}; task events:")
        for line in events_file.read_text().splitlines():
            if "/tasks/" in line:
                print("  " + line)
        return run.returncode
    except KeyboardInterrupt:
        print("\n# interrupted; cleaning up")
        return 130
    finally:
        stack.stop()
        subprocess.run(["rm", "-rf", str(work)])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Run a container through pyrunc in a throwaway containerd; see tools/try. Cleans up, also on Ctrl-C."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.stack import PYRUNC, PrivateContainerd, build_busybox_rootfs, build_oci_image_tar  # noqa: E402

IMAGE = "localhost/pyrunc-try/busybox:latest"


def main(argv: list[str]) -> int:
    command = argv or ["sh", "-c", "echo hello from a container run by pyrunc; uname -sr; id; ls /"]
    work = Path(tempfile.mkdtemp(prefix="pyrunc-try-"))
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

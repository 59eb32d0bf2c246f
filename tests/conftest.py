import sys
from pathlib import Path

# tests and benchmarks share the harness in tools/
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The fixtures of the stack (containerd, busybox_rootfs, busybox_image, runtimes, stack_available) and
# --runtime/--oracle come from the plugin other shims' authors use too. pytest honours pytest_plugins
# only in a conftest it loads first (the top one), hence here rather than in tests/integration/.
pytest_plugins = ["shim.testing.plugin"]

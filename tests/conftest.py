import os
import sys
from pathlib import Path

# tests and benchmarks share the harness in tools/
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The fixtures of the stack (containerd, busybox_rootfs, busybox_image, runtimes, stack_available) and
# --runtime/--oracle come from the plugin other shims' authors use too. pytest honours pytest_plugins
# only in a conftest it loads first (the top one), hence here rather than in tests/integration/.
pytest_plugins = ["shim.testing.plugin"]

# grpcio (the CRI tests' client) restarts its pollers in every child this process forks, and the one in a
# subprocess child logs "epoll_wait error: Bad file descriptor" to the child's stderr once the child closed
# its fds: into a test's pty, before exec. Nothing here forks to use gRPC in the child.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

"""A throwaway containerd for tests, benchmarks, the demo and other shims' conformance runs: own root,
state and socket in a temp dir.

Our shim is put on containerd's PATH; every other shim (the Go shim, Debian's containerd-shim-runc-v2,
the oracle; a shim under test) is found on the caller's PATH, as a system containerd would find it.
Everything started here is stopped by pid and every mount under the temp dir is unmounted on
:meth:`PrivateContainerd.stop`.

Imports only the standard library: pytest plugins and benchmarks load it without the shim's runtime.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

SHIM_NAME = "containerd-shim-pyrunc-v2"
PYRUNC = "io.containerd.pyrunc.v2"
RUNC_V2 = "io.containerd.runc.v2"
BUSYBOX = "/bin/busybox"
SHIM_SOCKET_DIR = "/run/containerd/s"  # where containerd's shims (ours and Go's) put their sockets

# The checkout this package runs from (tests, bench/, tools/try, an editable install), or None when it
# is installed: only a checkout has the cmd/ launcher.
_ROOT = Path(__file__).resolve().parents[2]
REPO: Path | None = _ROOT if (_ROOT / "cmd" / SHIM_NAME).is_file() else None


def shim_binary() -> str:
    """Our shim: the console script next to this Python (pip install), else the checkout's cmd/ launcher,
    else the one on PATH (pip install --user puts scripts elsewhere); "" when there is none."""
    found = shutil.which(SHIM_NAME, path=os.path.dirname(sys.executable))
    if found:
        return found
    if REPO is not None:
        return str(REPO / "cmd" / SHIM_NAME)
    return shutil.which(SHIM_NAME) or ""


def shim_binary_name(runtime: str) -> str:
    """The binary containerd execs for a runtime type (containerd's shim.BinaryName):
    io.containerd.<name>.<version> → containerd-shim-<name>-<version>; "" for an invalid name."""
    parts = runtime.split(".")
    return f"containerd-shim-{parts[-2]}-{parts[-1]}" if len(parts) >= 2 else ""


def missing_tools() -> list[str]:
    return [t for t in ("containerd", "ctr", "runc", "containerd-shim-runc-v2") if shutil.which(t) is None] + (
        [] if os.path.exists(BUSYBOX) else [BUSYBOX]
    )


def build_busybox_rootfs(dest: Path) -> Path:
    """A minimal rootfs: static busybox and its applet links, plus the dirs runc expects."""
    for d in ("bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "root", "usr/bin"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, dest / "bin" / "busybox")
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for name in applets:
        link = dest / "bin" / name
        if not link.exists():
            link.symlink_to("busybox")
    (dest / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (dest / "etc" / "group").write_text("root:x:0:\n")
    return dest


def build_oci_image_tar(rootfs: Path, out: Path, ref: str) -> Path:
    """An OCI image archive with one layer holding ``rootfs``, for ``ctr image import``."""
    import hashlib

    layer_buf = io.BytesIO()
    with tarfile.open(fileobj=layer_buf, mode="w") as tar:
        for path in sorted(rootfs.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(rootfs)), recursive=False)
    layer = layer_buf.getvalue()

    def blob(data: bytes) -> tuple[str, bytes]:
        return "sha256:" + hashlib.sha256(data).hexdigest(), data

    layer_digest, _ = blob(layer)
    config = json.dumps(
        {
            "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine),
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin:/sbin:/usr/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        }
    ).encode()
    config_digest, _ = blob(config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                       "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest,
                        "size": len(layer)}],
        }
    ).encode()
    manifest_digest, _ = blob(manifest)
    index = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
                           "size": len(manifest), "annotations": {"org.opencontainers.image.ref.name": ref}}],
        }
    ).encode()
    with tarfile.open(out, "w") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add("index.json", index)
        for digest, data in ((layer_digest, layer), (config_digest, config), (manifest_digest, manifest)):
            add("blobs/sha256/" + digest.split(":")[1], data)
    return out


def _listdir(directory: str) -> list[str]:
    try:
        return os.listdir(directory)
    except OSError:
        return []


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class PrivateContainerd:
    """containerd with its own root/state/socket under a short temp dir (socket paths are limited)."""

    def __init__(self, namespace: str = "pyrunc-test", extra_config: str = "", disable_cri: bool = True) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="pyrunc-", dir="/tmp"))
        self.root, self.state = self.dir / "root", self.dir / "state"
        self.address = str(self.dir / "c.sock")
        self.ttrpc_address = self.address + ".ttrpc"
        self.namespace = namespace
        self.log_path = self.dir / "containerd.log"
        self.bin = self.dir / "bin"
        self.extra_config = extra_config
        self.disable_cri = disable_cri
        self.proc: subprocess.Popen[bytes] | None = None
        self._namespaces = {namespace}
        self._sockets_before: set[str] | None = None

    def start(self) -> PrivateContainerd:
        """Start containerd (again, after :meth:`stop_daemon`: same root, state and sockets). A containerd
        already running is kept: starting a second one would leave the first nobody's to stop."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        if self._sockets_before is None:
            self._sockets_before = set(_listdir(SHIM_SOCKET_DIR))
        if not self.bin.exists():
            self.bin.mkdir()
            ours = shim_binary()
            if ours:  # an installed pyrunc may lack its script; then only shims on PATH can serve
                (self.bin / SHIM_NAME).symlink_to(ours)
        disabled = '"io.containerd.grpc.v1.cri"' if self.disable_cri else ""
        cfg = self.dir / "config.toml"
        cfg.write_text(
            f'version = 2\nroot = "{self.root}"\nstate = "{self.state}"\n'
            f"disabled_plugins = [{disabled}]\n"
            f'[grpc]\n  address = "{self.address}"\n[debug]\n  level = "debug"\n' + self.extra_config
        )
        self.proc = subprocess.Popen(
            ["containerd", "--config", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.log_path, "ab"),  # noqa: SIM115 - lives as long as containerd
            env=self.environ(),
            start_new_session=True,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited: {self.log_path.read_text()[-3000:]}")
            if os.path.exists(self.address) and self.ctr("version", check=False).returncode == 0:
                return self
            time.sleep(0.05)
        raise RuntimeError("containerd did not come up in 20s")

    def environ(self) -> dict[str, str]:
        """containerd's environment. PATH: our shim's link first; this Python's dir next (the checkout's
        launcher runs the ``python3`` it finds there); then the caller's PATH, where containerd finds every
        other shim, as a system containerd finds them on its own PATH."""
        return dict(os.environ, PATH=f"{self.bin}:{os.path.dirname(sys.executable)}:{os.environ.get('PATH', '')}")

    def resolve_runtime(self, runtime: str) -> str | None:
        """The binary this containerd execs for ``runtime``, looked up as containerd 1.6 does
        (runtime/v2/manager.go, resolveRuntimePath), or None: a runtime that cannot be found fails only at
        the first ``ctr run``, with an error that does not say where containerd looked."""
        if os.path.isabs(runtime):
            return runtime if os.path.isfile(runtime) else None
        name = shim_binary_name(runtime)
        if not name:
            return None
        # first beside the runtime name taken as a path: relative to containerd's cwd, which is ours
        beside = os.path.abspath(os.path.join(os.path.dirname(runtime), name))
        if os.path.isfile(beside):
            return beside
        found = shutil.which(name, path=self.environ()["PATH"])
        if found:
            return found
        # last, the directory of containerd's own executable
        daemon = shutil.which("containerd")
        beside_daemon = os.path.join(os.path.dirname(os.path.realpath(daemon)), name) if daemon else ""
        return beside_daemon if beside_daemon and os.access(beside_daemon, os.X_OK) else None

    def ctr(self, *args: str, check: bool = True, timeout: float = 60, input: bytes | None = None,
            namespace: str | None = None) -> subprocess.CompletedProcess[str]:
        self._namespaces.add(namespace or self.namespace)
        cmd = ["ctr", "--address", self.address, "--namespace", namespace or self.namespace, *args]
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout, input=input)
        res = subprocess.CompletedProcess(cmd, proc.returncode, proc.stdout.decode(errors="replace"),
                                          proc.stderr.decode(errors="replace"))
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {res.returncode}: {res.stderr.strip()}")
        return res

    def ctr_popen(self, *args: str, **kw) -> subprocess.Popen[bytes]:
        cmd = ["ctr", "--address", self.address, "--namespace", self.namespace, *args]
        return subprocess.Popen(cmd, start_new_session=True, **kw)

    def stop_daemon(self) -> None:
        """Stop containerd alone, as an upgrade or a crash would: its shims and containers keep running."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(20)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def shim_pids(self) -> list[int]:
        """Shim processes (ours or Go's) serving this containerd, found by their -address argument."""
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(a.endswith(b"-v2") and b"containerd-shim" in a for a in argv[:3]) and self.address.encode() in argv:
                pids.append(int(entry))
        return pids

    def zygote_pids(self) -> list[int]:
        """pyrunc's warm parents for this containerd (shim/zygote.py), found by their arguments."""
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if b"shim.zygote" in argv and self.address.encode() in argv:
                    pids.append(int(entry))
        return pids

    def stop(self) -> None:
        """Remove what is left in our namespace, stop containerd and its shims, unmount, delete."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                for line in self.ctr("task", "ls", "-q", check=False, timeout=10).stdout.split():
                    self.ctr("task", "kill", "-s", "KILL", line, check=False, timeout=10)
                    self.ctr("task", "delete", "-f", line, check=False, timeout=10)
                for line in self.ctr("container", "ls", "-q", check=False, timeout=10).stdout.split():
                    self.ctr("container", "delete", line, check=False, timeout=10)
        shims = self.shim_pids()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        zygotes = self.zygote_pids()
        for pid in zygotes:  # SIGTERM first: a zygote removes its socket and lock files on the way out
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 2
        while any(_running(pid) for pid in zygotes) and time.monotonic() < deadline:
            time.sleep(0.02)
        for pid in shims + zygotes:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.unmount_all()
        self.remove_namespace_cgroups()
        self.remove_dead_sockets()
        shutil.rmtree(self.dir, ignore_errors=True)

    def remove_dead_sockets(self, directory: str = SHIM_SOCKET_DIR) -> None:
        """Shim sockets that appeared while we ran and that nothing serves any more: a shim killed on
        purpose leaves its socket (the Go shim's delete does not remove it). Under the lock ``start``
        holds from bind to listen, so a socket another start is just setting up is never taken."""
        from shim import cli

        new = set(_listdir(directory)) - (self._sockets_before or set())
        if not new:
            return
        lock = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            cli._flock(lock)
            for name in new:
                path = os.path.join(directory, name)
                with contextlib.suppress(OSError):
                    if stat.S_ISSOCK(os.lstat(path).st_mode) and not cli._is_served(path):
                        os.unlink(path)
        finally:
            os.close(lock)

    def remove_namespace_cgroups(self, root: str = "/sys/fs/cgroup") -> None:
        """runc puts containers in ``<hierarchy>/<namespace>/<id>`` and leaves the namespace's cgroup behind
        (so does the Go shim): remove those that are empty. rmdir refuses a cgroup still in use."""
        for hierarchy in [root, *(os.path.join(root, d) for d in os.listdir(root))] if os.path.isdir(root) else []:
            for namespace in self._namespaces:
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.join(hierarchy, namespace))

    def unmount_all(self) -> None:
        prefix = str(self.dir) + "/"
        mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
        for target in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
            subprocess.run(["umount", "-l", target], capture_output=True)

    def __enter__(self) -> PrivateContainerd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

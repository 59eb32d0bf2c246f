"""A private containerd with its CRI plugin, runtime handlers `runc` and `pyrunc`, and pods to test with.

The containerd config is the one tests/integration/cri/README.md documents: what a user puts in
config.toml to run pods through pyrunc (a RuntimeClass with handler `pyrunc`). Everything CRI keeps —
its root and state dirs, runc's state, the shims' bundles, pod logs — lives under the private
containerd's temp dir, which PrivateContainerd.stop() unmounts and removes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import tarfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from tests.integration.cri.client import CRIClient
from tools.stack import PYRUNC, RUNC_V2, PrivateContainerd, build_oci_image_tar

K8S_NAMESPACE = "k8s.io"  # the containerd namespace CRI works in
HANDLERS = ("runc", "pyrunc")
BUSYBOX = "localhost/pyrunc-test/busybox:latest"
PAUSE = "localhost/pyrunc-test/pause:latest"
CRI_PLUGIN = "io.containerd.grpc.v1.cri"
CGROUP_ROOT = Path("/sys/fs/cgroup")


def cri_config(base: Path) -> str:
    """The CRI part of config.toml (containerd 1.6, config version 2), paths under ``base``.

    - runtime `runc` is the stock Go shim; `pyrunc` ours. For any runtime type but runc.v2, CRI
      decodes `options` into runtimeoptions.v1.Options, whose ConfigPath names pyrunc's TOML file.
    - Both get their own runc `root` so runc's state lives in the temp dir, not beside the host
      containerd's /run/containerd/runc/k8s.io (the tests check it is empty after a pod is removed).
    - CNI dirs point into the temp dir: pods use the host network and need no CNI, but CRI's CNI
      config watcher creates its conf_dir, which must not be the host's /etc/cni/net.d.
    - the stream server binds an ephemeral port so parallel runs do not collide.
    - AppArmor off: CRI would otherwise load its own profile into the host's kernel.
    - restrict_oom_score_adj only where containerd cannot lower an oom_score_adj (no CAP_SYS_RESOURCE,
      as in a container): CRI gives sandboxes -998, which runc then fails to set ("can't get final
      child's PID from pipe: EOF"). A machine with full root privileges gets CRI's default.
    """
    p = f'plugins."{CRI_PLUGIN}"'
    restrict = "true" if not has_cap_sys_resource() else "false"
    return f"""
[{p}]
  sandbox_image = "{PAUSE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_apparmor = true
  restrict_oom_score_adj = {restrict}
[{p}.cni]
  bin_dir = "{base}/cni/bin"
  conf_dir = "{base}/cni/net.d"
[{p}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[{p}.containerd.runtimes.runc]
  runtime_type = "{RUNC_V2}"
[{p}.containerd.runtimes.runc.options]
  Root = "{base}/runc-root"
[{p}.containerd.runtimes.pyrunc]
  runtime_type = "{PYRUNC}"
[{p}.containerd.runtimes.pyrunc.options]
  ConfigPath = "{base}/pyrunc.toml"
"""


def has_cap_sys_resource() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> 24 & 1)  # CAP_SYS_RESOURCE is capability 24
    return False


def pyrunc_toml(base: Path) -> str:
    return f'binary_name = "runc"\nroot = "{base}/pyrunc-root"\nsystemd_cgroup = false\n'


def runc_roots(stack: PrivateContainerd) -> dict[str, Path]:
    """handler → runc's state dir for the k8s.io namespace, as set in cri_config/pyrunc_toml."""
    return {"runc": stack.dir / "runc-root" / K8S_NAMESPACE, "pyrunc": stack.dir / "pyrunc-root" / K8S_NAMESPACE}


def with_entrypoint(image_tar: Path, out: Path, ref: str, entrypoint: list[str]) -> Path:
    """A copy of an OCI archive from build_oci_image_tar under another ref, its config's Entrypoint set.

    The pause-like sandbox image: CRI runs the image's entrypoint as the sandbox's process, which
    must live as long as the pod (busybox's default `/bin/sh` would exit at once on /dev/null).
    """
    with tarfile.open(image_tar) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}

    def blob(digest: str) -> dict:
        return json.loads(files["blobs/sha256/" + digest.split(":")[1]])

    def put(data: bytes) -> tuple[str, int]:
        digest = hashlib.sha256(data).hexdigest()
        files["blobs/sha256/" + digest] = data
        return "sha256:" + digest, len(data)

    index = json.loads(files["index.json"])
    manifest = blob(index["manifests"][0]["digest"])
    config = blob(manifest["config"]["digest"])
    config["config"].update(Entrypoint=entrypoint, Cmd=None)
    manifest["config"]["digest"], manifest["config"]["size"] = put(json.dumps(config).encode())
    desc = index["manifests"][0]
    desc["digest"], desc["size"] = put(json.dumps(manifest).encode())
    desc["annotations"]["org.opencontainers.image.ref.name"] = ref
    files["index.json"] = json.dumps(index).encode()
    with tarfile.open(out, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


def cri_plugin_status(stack: PrivateContainerd) -> str | None:
    """The CRI plugin's status in `ctr plugins ls` ("ok", "error", "skip"), None if not built in."""
    for line in stack.ctr("plugins", "ls").stdout.splitlines():
        parts = line.split()
        if parts[:2] == ["io.containerd.grpc.v1", "cri"]:
            return parts[-1]
    return None


def wait_cri_ready(client: CRIClient, timeout: float = 20) -> object:
    """CRI registers its gRPC service at once but answers only after its own init; poll Version."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.Version(client.pb.VersionRequest(version="v1"), timeout=2)
        except grpc.RpcError as e:
            if time.monotonic() > deadline:
                raise AssertionError(f"CRI did not become ready: {e.code()} {e.details()}") from e
            time.sleep(0.1)


def rmdir_cgroups(relative: str) -> None:
    """Remove ``relative`` (e.g. "/pyrunc-cri-xxxx") in every cgroup hierarchy, deepest first.

    runc removes a container's own cgroup but not the parents it created for the pod's cgroup_parent
    (the kubelet owns those in a real node); empty cgroup dirs go with rmdir, not unlink.
    """
    for hierarchy in CGROUP_ROOT.iterdir():
        top = hierarchy / relative.lstrip("/")
        if not top.is_dir():
            continue
        for dirpath, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)


@dataclass
class CRIStack:
    containerd: PrivateContainerd
    client: CRIClient
    cgroup_root: str  # this session's parent of every pod cgroup, removed after each test

    @property
    def pb(self):
        return self.client.pb

    def bundle(self, cid: str) -> Path:
        return self.containerd.state / "io.containerd.runtime.v2.task" / K8S_NAMESPACE / cid

    def log_size(self) -> int:
        return self.containerd.log_path.stat().st_size

    def log_since(self, offset: int, limit: int = 60) -> str:
        """containerd's log from ``offset`` on, for assertion messages: it holds the shims' own log lines
        too (which carry no container id, hence a window rather than a grep), minus CRI's spec dumps."""
        with open(self.containerd.log_path, "rb") as f:
            f.seek(offset)
            lines = f.read().decode(errors="replace").splitlines()
        kept = [line[:400] for line in lines if "(*specs.Spec)" not in line]
        return "\n".join(kept[-limit:])


@pytest.fixture(scope="session")
def cri(stack_available, busybox_rootfs, tmp_path_factory):
    stack = PrivateContainerd(namespace=K8S_NAMESPACE, disable_cri=False)
    # The config names paths under the stack's own temp dir, known only once it exists.
    stack.extra_config = cri_config(stack.dir)
    (stack.dir / "pyrunc.toml").write_text(pyrunc_toml(stack.dir))
    client = None
    try:
        stack.start()
        status = cri_plugin_status(stack)
        if status is None:
            pytest.skip(f"this containerd build has no CRI plugin ({CRI_PLUGIN} not in `ctr plugins ls`)")
        assert status == "ok", f"CRI plugin {status}: {stack.log()[-3000:]}"
        client = CRIClient(stack.address)
        version = wait_cri_ready(client)
        assert version.runtime_api_version == "v1", version
        # CRI's own dirs follow containerd's root and state: nothing of it outside the temp dir
        # (it logs them once, in its "Start cri plugin with config" line, and creates them lazily).
        dirs = re.search(r" RootDir:(\S+) StateDir:(\S+)}", stack.log())
        assert dirs and dirs.groups() == (str(stack.root / CRI_PLUGIN), str(stack.state / CRI_PLUGIN)), dirs

        images = tmp_path_factory.mktemp("cri-images")
        busybox = build_oci_image_tar(busybox_rootfs, images / "busybox.tar", BUSYBOX)
        pause = with_entrypoint(busybox, images / "pause.tar", PAUSE, ["/bin/sleep", "infinity"])
        for tar in (busybox, pause):
            stack.ctr("image", "import", str(tar), namespace=K8S_NAMESPACE)
        # CRI learns of imported images from containerd's events: wait until it serves both.
        deadline = time.monotonic() + 10
        for ref in (BUSYBOX, PAUSE):
            while not client.ImageStatus(client.pb.ImageStatusRequest(image=client.pb.ImageSpec(image=ref))).image.id:
                assert time.monotonic() < deadline, f"CRI does not see imported image {ref}"
                time.sleep(0.1)
        yield CRIStack(stack, client, f"/pyrunc-cri-{uuid.uuid4().hex[:8]}")
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                remove_all_pods(client)
            client.close()
        stack.stop()


@contextlib.contextmanager
def explained(what: str, log):
    """An RPC error as a test failure that shows containerd's and the shims' log lines around it."""
    try:
        yield
    except grpc.RpcError as e:
        raise AssertionError(f"{what}: {e.code().name} {e.details()}\n--- containerd log ---\n{log()}") from e


def remove_all_pods(client: CRIClient) -> None:
    for pod in client.ListPodSandbox(client.pb.ListPodSandboxRequest()).items:
        client.StopPodSandbox(client.pb.StopPodSandboxRequest(pod_sandbox_id=pod.id))
        client.RemovePodSandbox(client.pb.RemovePodSandboxRequest(pod_sandbox_id=pod.id))


@pytest.fixture(params=HANDLERS)
def handler(request) -> str:
    return request.param


@dataclass
class Pod:
    """A pod as the kubelet would run it: host network, own pid namespaces, a cgroup parent."""

    cri: CRIStack
    handler: str
    name: str
    config: object
    id: str = ""
    removed: bool = False
    log_offset: int = 0
    containers: dict[str, str] = field(default_factory=dict)  # name → id

    def add(self, name: str, *command: str, memory: int = 0, cpu_quota: int = 0, cpu_shares: int = 0,
            start: bool = True) -> str:
        pb = self.cri.pb
        resources = pb.LinuxContainerResources(memory_limit_in_bytes=memory, cpu_shares=cpu_shares,
                                               cpu_quota=cpu_quota, cpu_period=100_000 if cpu_quota else 0)
        config = pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name=name), image=pb.ImageSpec(image=BUSYBOX), command=list(command),
            log_path=f"{name}.log",
            # as the kubelet does: the pod's namespace choices repeated for each container
            linux=pb.LinuxContainerConfig(resources=resources, security_context=pb.LinuxContainerSecurityContext(
                namespace_options=self.config.linux.security_context.namespace_options)),
        )
        with explained(f"CreateContainer {name}", self.log):
            cid = self.cri.client.CreateContainer(pb.CreateContainerRequest(
                pod_sandbox_id=self.id, config=config, sandbox_config=self.config)).container_id
        self.containers[name] = cid
        if start:
            with explained(f"StartContainer {name}", self.log):
                self.cri.client.StartContainer(pb.StartContainerRequest(container_id=cid))
        return cid

    def status(self, cid: str):
        return self.cri.client.ContainerStatus(self.cri.pb.ContainerStatusRequest(container_id=cid, verbose=True))

    def pid(self, cid: str) -> int:
        return json.loads(self.status(cid).info["info"])["pid"]

    def exec(self, cid: str, *cmd: str, timeout: int = 10):
        return self.cri.client.ExecSync(self.cri.pb.ExecSyncRequest(container_id=cid, cmd=list(cmd),
                                                                    timeout=timeout), timeout=timeout + 10)

    def wait_exited(self, cid: str, timeout: float = 20):
        deadline = time.monotonic() + timeout
        while True:
            st = self.status(cid).status
            if st.state == self.cri.pb.CONTAINER_EXITED or time.monotonic() > deadline:
                return st
            time.sleep(0.1)

    def log_of(self, name: str) -> str:
        return (Path(self.config.log_directory) / f"{name}.log").read_text(errors="replace")

    def log(self) -> str:
        """containerd's (and the shims') log since this pod was created."""
        return self.cri.log_since(self.log_offset)

    def stop_and_remove(self) -> None:
        pb = self.cri.pb
        self.cri.client.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=self.id))
        self.cri.client.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=self.id))
        self.removed = True


@pytest.fixture
def pods(cri, handler):
    """``pods()`` runs a new pod through ``handler``; every pod is stopped and removed afterwards,
    its cgroup parent too — also when the test failed half-way."""
    made: list[Pod] = []

    def run(name: str = "") -> Pod:
        pb = cri.pb
        uid = uuid.uuid4().hex
        name = name or f"pod-{uid[:6]}"
        config = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, uid=uid, namespace="pyrunc-test"),
            log_directory=str(cri.containerd.dir / "pods" / f"{name}_{uid}"),
            labels={"pyrunc-test/handler": handler},
            linux=pb.LinuxPodSandboxConfig(
                cgroup_parent=f"{cri.cgroup_root}/pod{uid}",
                security_context=pb.LinuxSandboxSecurityContext(namespace_options=pb.NamespaceOption(
                    network=pb.NODE, pid=pb.CONTAINER, ipc=pb.POD)),
            ),
        )
        Path(config.log_directory).mkdir(parents=True)  # the kubelet creates it before RunPodSandbox
        pod = Pod(cri, handler, name, config, log_offset=cri.log_size())
        made.append(pod)
        with explained(f"RunPodSandbox with handler {handler}", pod.log):
            pod.id = cri.client.RunPodSandbox(pb.RunPodSandboxRequest(config=config, runtime_handler=handler)
                                              ).pod_sandbox_id
        return pod

    yield run
    errors = []
    for pod in made:
        if pod.id and not pod.removed:
            try:
                pod.stop_and_remove()
            except grpc.RpcError as e:
                errors.append(f"{pod.name}: {e.code()} {e.details()}")
        rmdir_cgroups(pod.config.linux.cgroup_parent)
    rmdir_cgroups(cri.cgroup_root)
    assert not errors, f"pods could not be removed: {errors}"

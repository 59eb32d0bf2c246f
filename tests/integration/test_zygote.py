"""The warm zygote against a real containerd: once it runs, every start is served by a server it forked
(from its waiting spare, or forked on the spot in a burst), at normal CPU priority."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from shim.api.containerd.task.v2 import shim_pb2 as api
from shim.testing.helpers import uid, wait_until
from shim.ttrpc import Client
from tests.integration.test_races import remove
from tools.stack import PYRUNC

TASK = "containerd.task.v2.Task"


def served_by_zygote(stack) -> int:
    return sum(1 for line in stack.log().splitlines() if "pyrunc shim serving" in line and "zygote=true" in line)


async def shim_pid(address: str) -> int:
    client = await Client.connect(address)
    try:
        return (await client.call(TASK, "Connect", api.ConnectRequest(), api.ConnectResponse, timeout=5)).shim_pid
    finally:
        await client.aclose()


def test_every_start_after_the_first_is_a_zygote_server_at_normal_priority(containerd, busybox_image):
    containerd.ctr("run", "--rm", "--runtime", PYRUNC, busybox_image, uid("zy"), "true")
    assert wait_until(lambda: len(containerd.zygote_pids()) >= 2), "a zygote and its spare"
    before = served_by_zygote(containerd)
    cids = [uid(f"zy-{i}") for i in range(8)]
    try:
        containerd.ctr("run", "-d", "--runtime", PYRUNC, busybox_image, cids[0], "sleep", "100")  # the spare
        with ThreadPoolExecutor(7) as pool:  # a burst: spares forked on the spot
            list(pool.map(lambda c: containerd.ctr("run", "-d", "--runtime", PYRUNC, busybox_image, c,
                                                   "sleep", "100"), cids[1:]))
        assert wait_until(lambda: served_by_zygote(containerd) - before == len(cids)), containerd.log()[-3000:]
        for cid in cids:
            bundle = containerd.state / "io.containerd.runtime.v2.task" / containerd.namespace / cid
            pid = asyncio.run(shim_pid((bundle / "address").read_text().strip().removeprefix("unix://")))
            stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            assert int(stat[16]) == 0, f"shim {pid} runs at nice {stat[16]}"  # proc(5) field 19: nice
            assert open(f"/proc/{pid}/cmdline", "rb").read().startswith(b"containerd-shim-pyrunc-v2\0")
    finally:
        for cid in cids:
            remove(containerd, cid)

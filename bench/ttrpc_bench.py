"""Small unary round trips over a unix socket: our ttrpc against grpcio.

    python bench/ttrpc_bench.py [--seconds N] [--json out.json]

For each implementation a server process is started (an echo of the request bytes), then a client
process (one asyncio loop, one connection) runs a warm-up and a measured window for each concurrency
(number of callers looping on that one connection). The orchestrating process only starts, waits for
and stops the children: each server and each client has a process (and GIL) of its own, and the two
implementations never run at the same time. Reported: calls/s, p50/p99 latency in microseconds and
the ratio ours/grpc, as a markdown table; ``--json`` also writes the numbers to a file.

* ttrpc: ``shim.ttrpc.Server`` with a raw-bytes handler, ``shim.ttrpc.Client.call``.
* grpc: ``grpc.aio`` server on ``unix:<path>`` with a generic handler
  (``grpc.method_handlers_generic_handler`` + ``grpc.unary_unary_rpc_method_handler``, no generated
  code, identity serializers: bytes pass through as they are), called through a ``grpc.aio`` channel.

Every child is stopped by its pid when the run ends, also on errors and Ctrl-C, and the temp dir holding
the sockets is removed. Children also exit by themselves should the orchestrator disappear.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SERVICE = "bench.Echo"
METHOD = "Echo"
GRPC_METHOD = f"/{SERVICE}/{METHOD}"
PAYLOAD = bytes(range(100))  # ~100-byte request, echoed back
IMPLS = ("ttrpc", "grpc")
TMP_PREFIX = "ttrpc-bench-"


# -- children ---------------------------------------------------------------------------------------


def _orphaned(args: argparse.Namespace) -> bool:
    return os.getppid() != args.parent


def _exit_orphaned(args: argparse.Namespace) -> None:
    """The orchestrator went away without stopping us (it was SIGKILLed): clean up its temp dir, exit."""
    tmp = os.path.dirname(args.socket)
    if os.path.basename(tmp).startswith(TMP_PREFIX):
        shutil.rmtree(tmp, ignore_errors=True)
    os._exit(3)


async def _watch_parent(args: argparse.Namespace) -> None:
    while True:
        await asyncio.sleep(0.5)
        if _orphaned(args):
            _exit_orphaned(args)


async def _serve_ttrpc(path: str) -> None:
    sys.path.insert(0, str(REPO))
    from shim.ttrpc import Server

    async def echo(ctx: object, req: bytes) -> bytes:
        return req

    server = Server()
    server.register(SERVICE, {METHOD: echo})
    await server.listen(path)
    await asyncio.Event().wait()  # until SIGTERM


async def _serve_grpc(path: str) -> None:
    import grpc

    async def echo(request: bytes, context: object) -> bytes:
        return request

    # No (de)serializer is grpc's identity on bytes: the handler gets and returns the raw message.
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {METHOD: grpc.unary_unary_rpc_method_handler(echo, request_deserializer=None, response_serializer=None)},
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    await server.wait_for_termination()  # until SIGTERM


async def _connect(impl: str, path: str):
    """A connected client and an ``async call(payload) -> bytes`` for it, and a closer."""
    if impl == "ttrpc":
        sys.path.insert(0, str(REPO))
        from shim.ttrpc import Client

        client = await Client.connect(path)

        async def call(payload: bytes) -> bytes:
            return await client.call(SERVICE, METHOD, payload)

        return call, client.aclose

    import grpc

    channel = grpc.aio.insecure_channel(f"unix:{path}")
    await asyncio.wait_for(channel.channel_ready(), 10)
    stub = channel.unary_unary(GRPC_METHOD, request_serializer=None, response_deserializer=None)

    async def call(payload: bytes) -> bytes:
        return await stub(payload)

    return call, channel.close


async def _run_cell(call, concurrency: int, seconds: float) -> tuple[list[int], float]:
    """``concurrency`` callers loop for ``seconds``; returns every latency (ns) and the elapsed time."""
    latencies: list[int] = []
    record = latencies.append
    clock = time.perf_counter_ns
    end = clock() + int(seconds * 1e9)

    async def caller() -> None:
        while True:  # at least one call each, so there is always something to report
            t0 = clock()
            await call(PAYLOAD)
            t1 = clock()
            record(t1 - t0)
            if t1 >= end:
                return

    start = clock()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return latencies, (clock() - start) / 1e9


def _percentile(sorted_ns: list[int], q: float) -> float:
    i = min(len(sorted_ns) - 1, max(0, round(q * (len(sorted_ns) - 1))))
    return sorted_ns[i] / 1e3


async def _client(impl: str, path: str, concurrencies: list[int], seconds: float, warmup: float) -> list[dict]:
    call, close = await _connect(impl, path)
    try:
        if await call(PAYLOAD) != PAYLOAD:
            raise RuntimeError(f"{impl}: echo returned something else")
        results = []
        for concurrency in concurrencies:
            await _run_cell(call, concurrency, warmup)
            latencies, elapsed = await _run_cell(call, concurrency, seconds)
            latencies.sort()
            results.append(
                {
                    "impl": impl,
                    "concurrency": concurrency,
                    "calls": len(latencies),
                    "seconds": round(elapsed, 3),
                    "calls_per_s": round(len(latencies) / elapsed, 1),
                    "p50_us": round(_percentile(latencies, 0.50), 1),
                    "p99_us": round(_percentile(latencies, 0.99), 1),
                    "mean_us": round(sum(latencies) / len(latencies) / 1e3, 1),
                }
            )
        return results
    finally:
        await close()


async def _child_main(args: argparse.Namespace) -> None:
    watcher = asyncio.get_running_loop().create_task(_watch_parent(args))
    try:
        if args.role == "server":
            await (_serve_ttrpc if args.impl == "ttrpc" else _serve_grpc)(args.socket)
        else:
            concurrencies = [int(c) for c in args.concurrency.split(",")]
            results = await _client(args.impl, args.socket, concurrencies, args.seconds, args.warmup)
            Path(args.out).write_text(json.dumps(results))
    except Exception:
        if _orphaned(args):  # our server went first; no traceback for that
            _exit_orphaned(args)
        raise
    finally:
        watcher.cancel()


# -- orchestrator -----------------------------------------------------------------------------------


class _Children:
    """Child processes, each stopped by its own pid (SIGTERM, then SIGKILL)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def spawn(self, *argv: str) -> subprocess.Popen:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *argv, "--parent", str(os.getpid())]
        # A session of its own: Ctrl-C reaches only us, and we stop the child ourselves.
        proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGTERM)
                proc.wait(3)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
            except ProcessLookupError:
                pass
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):  # clients before the servers they talk to
            self.stop(proc)


def _wait_listening(proc: subprocess.Popen, path: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with status {proc.returncode}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(path)
                return
            except OSError:
                time.sleep(0.05)
    raise RuntimeError(f"server not listening on {path} after {timeout:.0f}s")


def _bench_impl(children: _Children, tmp: str, impl: str, args: argparse.Namespace) -> list[dict]:
    path = os.path.join(tmp, f"{impl}.sock")
    out = os.path.join(tmp, f"{impl}.json")
    server = children.spawn("--role", "server", "--impl", impl, "--socket", path)
    try:
        _wait_listening(server, path)
        client = children.spawn(
            *("--role", "client", "--impl", impl, "--socket", path, "--out", out),
            *("--concurrency", args.concurrency, "--seconds", str(args.seconds), "--warmup", str(args.warmup)),
        )
        cells = len(args.concurrency.split(","))
        status = client.wait(timeout=cells * (args.seconds + args.warmup) + 60)
        if status != 0:
            raise RuntimeError(f"{impl} client failed with status {status}")
        return json.loads(Path(out).read_text())
    finally:
        children.stop_all()  # the client (if still running) first, then the server


def _ratios(results: list[dict]) -> list[dict]:
    by = {(r["impl"], r["concurrency"]): r for r in results}
    ratios = []
    for (impl, concurrency), ours in by.items():
        theirs = by.get(("grpc", concurrency))
        if impl != "ttrpc" or theirs is None:
            continue
        ratios.append(
            {
                "concurrency": concurrency,
                "calls_per_s": round(ours["calls_per_s"] / theirs["calls_per_s"], 2),
                "p50": round(ours["p50_us"] / theirs["p50_us"], 2),
            }
        )
    return ratios


def _table(results: list[dict], ratios: list[dict]) -> str:
    ratio = {r["concurrency"]: r for r in ratios}
    lines = [
        "| impl | callers | calls/s | p50 (µs) | p99 (µs) | calls/s ours/grpc | p50 ours/grpc |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(results, key=lambda r: (r["concurrency"], IMPLS.index(r["impl"]))):
        rr = ratio.get(r["concurrency"]) if r["impl"] == "ttrpc" else None
        r_calls, r_p50 = (f"{rr['calls_per_s']:.2f}", f"{rr['p50']:.2f}") if rr else ("", "")
        lines.append(
            f"| {r['impl']} | {r['concurrency']} | {r['calls_per_s']:,.0f} | {r['p50_us']:,.0f} | {r['p99_us']:,.0f} "
            f"| {r_calls} | {r_p50} |"
        )
    return "\n".join(lines)


def _meta(args: argparse.Namespace) -> dict:
    try:
        import grpc

        grpc_version = grpc.__version__
    except ImportError:
        grpc_version = None
    return {
        "python": platform.python_version(),
        "grpcio": grpc_version,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "payload_bytes": len(PAYLOAD),
        "seconds_per_cell": args.seconds,
        "warmup_per_cell": args.warmup,
    }


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=3.0, help="measured seconds per cell (default 3)")
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per cell (default 1)")
    p.add_argument("--concurrency", default="1,32", help="comma-separated caller counts (default 1,32)")
    p.add_argument("--impl", default=",".join(IMPLS), help="comma-separated: ttrpc,grpc (default both)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    # internal: the server and client children
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--role", choices=("server", "client"), help=argparse.SUPPRESS)
    p.add_argument("--socket", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--parent", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        asyncio.run(_child_main(args))
        return 0

    impls = [i for i in args.impl.split(",") if i]
    try:
        if not all(int(c) > 0 for c in args.concurrency.split(",")):
            raise ValueError
    except ValueError:
        p.error("--concurrency: comma-separated positive integers")
    if args.seconds <= 0 or args.warmup < 0:
        p.error("--seconds must be > 0 and --warmup >= 0")
    if not set(impls) <= set(IMPLS):
        p.error(f"--impl: choose from {', '.join(IMPLS)}")
    if "grpc" in impls:
        try:
            import grpc  # noqa: F401
        except ImportError:
            print("grpcio is not installed (pip install grpcio, or pyrunc[dev]); or use --impl ttrpc", file=sys.stderr)
            return 2

    signal.signal(signal.SIGTERM, _raise_exit)
    signal.signal(signal.SIGHUP, _raise_exit)
    children = _Children()
    tmp = tempfile.mkdtemp(prefix=TMP_PREFIX)
    try:
        results: list[dict] = []
        for impl in impls:
            print(f"# {impl}: {args.concurrency} callers, {args.warmup:g}s warm-up + {args.seconds:g}s", flush=True)
            results += _bench_impl(children, tmp, impl, args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a second Ctrl-C must not cut the cleanup
            signal.signal(sig, signal.SIG_IGN)
        children.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)

    ratios = _ratios(results)
    meta = _meta(args)
    print()
    print(
        f"unary echo, {meta['payload_bytes']}-byte payload, unix socket; Python {meta['python']}, "
        f"grpcio {meta['grpcio']}, {meta['cpus']} CPUs"
    )
    print()
    print(_table(results, ratios))
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results, "ratios": ratios}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

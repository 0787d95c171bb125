"""gRPC Python's floor for coordinator_load.py's cycle: the same three calls per cycle (unary, unary,
unary: Lease, Heartbeat, CompleteInline; with --stream the third is a client stream of two messages,
as Complete) from 16 grpc.aio clients to a grpc.aio server in its own process whose handlers do
nothing. What it measures is the cost of gRPC Python alone, the part of a cycle no coordinator
change can remove; compare its CPU per cycle with coordinator_load.py's (with the same --stream).

    python benchmarks/grpc_floor.py [--clients 16] [--duration 10] [--stream] [--json PATH]

JSON keys: cycles_per_s, server_cpu_ms_per_cycle, client_cpu_ms_per_cycle, load_average_1m.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path


def _same(b: bytes) -> bytes:
    return b


async def _serve(port_q, stop) -> None:
    import grpc

    async def unary(request, context):
        return b"x" * 40

    async def stream(request_iterator, context):
        async for _ in request_iterator:
            pass
        return b"ok"

    handler = grpc.method_handlers_generic_handler("floor.Floor", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, _same, _same),
        "Stream": grpc.stream_unary_rpc_method_handler(stream, _same, _same)})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port_q.put(server.add_insecure_port("127.0.0.1:0"))
    await server.start()
    while not stop.is_set():
        await asyncio.sleep(0.1)
    await server.stop(0)


def _server_main(port_q, stop) -> None:
    asyncio.run(_serve(port_q, stop))


async def _clients(port: int, n: int, duration: float, streamed: bool) -> int:
    import grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        unary = ch.unary_unary("/floor.Floor/Unary", _same, _same)
        stream = ch.stream_unary("/floor.Floor/Stream", _same, _same)
        end, cycles = time.monotonic() + duration, 0

        async def one():
            nonlocal cycles
            while time.monotonic() < end:
                await unary(b"l" * 60)   # Lease
                await unary(b"h" * 80)   # Heartbeat
                if streamed:
                    await stream(iter([b"c" * 150, b"d" * 256]))  # Complete: header, then the result
                else:
                    await unary(b"c" * 406)  # CompleteInline: both in one message
                cycles += 1

        await asyncio.gather(*(one() for _ in range(n)))
        return cycles


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--stream", action="store_true", help="the third call is a two-message client stream (Complete)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    ctx = mp.get_context("spawn")
    port_q, stop = ctx.Queue(), ctx.Event()
    server = ctx.Process(target=_server_main, args=(port_q, stop))
    server.start()
    try:
        port = port_q.get(timeout=60)
        load = os.getloadavg()[0]
        s0, c0, t0 = _cpu_s(server.pid), time.process_time(), time.monotonic()
        cycles = asyncio.run(_clients(port, args.clients, args.duration, args.stream))
        wall = time.monotonic() - t0
        res = {"cycles_per_s": cycles / wall,
               "server_cpu_ms_per_cycle": (_cpu_s(server.pid) - s0) * 1e3 / max(cycles, 1),
               "client_cpu_ms_per_cycle": (time.process_time() - c0) * 1e3 / max(cycles, 1),
               "load_average_1m": load, "stream": args.stream, "clients": args.clients,
               "duration_s": args.duration, "cpus": os.cpu_count()}
    finally:
        stop.set()
        server.join(timeout=30)
    print(f"gRPC floor ({args.clients} clients, handlers doing nothing, {args.duration:g} s, {os.cpu_count()} CPUs)")
    print(f"{'metric':<26}{'value':>12}")
    for key in ("cycles_per_s", "server_cpu_ms_per_cycle", "client_cpu_ms_per_cycle", "load_average_1m"):
        print(f"{key:<26}{res[key]:>12.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

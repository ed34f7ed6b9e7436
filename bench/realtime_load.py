"""Paced load on ``GET /ticks/realtime``: a fixed request rate over keep-alive connections.

Raw HTTP/1.1 over asyncio streams (an HTTP client library would cost more CPU than the server
on a 2-core box). Request ``i`` is due at ``start + i / rate``; each connection sends its share
in turn. Latency is measured from the moment a request is written to the moment its body is
read (client side, loopback). If the server sends ``Server-Timing: app;dur=<ms>`` that figure is
collected too. The key comes from ``BENCH_KEY``. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import orjson


def quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    values = sorted(values)

    def q(p: float) -> float:
        return round(values[min(len(values) - 1, int(p * len(values)))], 3)

    return {"p50": q(0.50), "p99": q(0.99), "p999": q(0.999), "max": round(values[-1], 3)}


async def connection(
    j: int, args: argparse.Namespace, request: bytes, out: dict[str, list[float]]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", args.port)
    loop = asyncio.get_running_loop()
    start = loop.time() + max(0.0, (args.start_ns - time.time_ns()) / 1e9)
    period = args.conns / args.rate
    k = 0
    try:
        while True:
            due = start + (j + k * args.conns) / args.rate
            if due - start >= args.duration:
                return
            k += 1
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif -delay > period:
                out["late"].append(-delay * 1000)
            t0 = time.perf_counter_ns()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            server_ms = None
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"server-timing":
                    for part in value.split(b";"):
                        if part.strip().startswith(b"dur="):
                            server_ms = float(part.strip()[4:])
            body = await reader.readexactly(length)
            t1 = time.perf_counter_ns()
            if status == 200 and body.startswith(b'{"server_time"'):
                out["client_ms"].append((t1 - t0) / 1e6)
                if server_ms is not None:
                    out["server_ms"].append(server_ms)
            else:
                out["errors"].append(float(status))
    finally:
        writer.close()


async def run(args: argparse.Namespace) -> dict[str, object]:
    request = (
        f"GET /ticks/realtime?symbols={args.symbols} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{args.port}\r\nAuthorization: Bearer {args.key}\r\n\r\n"
    ).encode()
    out: dict[str, list[float]] = {"client_ms": [], "server_ms": [], "errors": [], "late": []}
    results = await asyncio.gather(
        *(connection(j, args, request, out) for j in range(args.conns)), return_exceptions=True
    )
    failures = [repr(r)[:200] for r in results if isinstance(r, BaseException)]
    return {
        "requests": len(out["client_ms"]) + len(out["errors"]),
        "ok": len(out["client_ms"]),
        "errors": len(out["errors"]),
        "rate": round((len(out["client_ms"]) + len(out["errors"])) / args.duration, 1),
        "late_sends": len(out["late"]),
        "client_ms": quantiles(out["client_ms"]),
        "server_ms": quantiles(out["server_ms"]),
        "failures": failures[:3],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--symbols", required=True)
    p.add_argument("--rate", type=float, default=1000.0)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--conns", type=int, default=8)
    p.add_argument("--start-ns", type=int, default=0)
    args = p.parse_args()
    args.key = os.environ["BENCH_KEY"]  # not on the command line, where ps would show it
    import uvloop

    print(orjson.dumps(uvloop.run(run(args))).decode(), flush=True)


if __name__ == "__main__":
    main()

"""The web process's TCP connections (``server/api/transport.py``): a peer that sends a request
head too slowly, or never reads what is queued for it, loses its connection in bounded time."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import httpx
import psutil
import websockets

from tests.harness import TLS, WAIT_S, Stack, eventually, send


def server_peers(stack: Stack) -> set[int]:
    """Client ports of the web process' established TCP connections on its port."""
    assert stack.web.proc is not None
    return {
        c.raddr.port
        for c in psutil.Process(stack.web.proc.pid).net_connections("tcp")
        if c.raddr and c.laddr.port == stack.port and c.status == psutil.CONN_ESTABLISHED
    }


async def test_a_slow_consumer_that_never_reads_loses_its_tcp_connection(own_stack) -> None:
    s: Stack = own_stack(
        feed_rate=5000, max_buffer_bytes=100_000, conflate_bytes=25_000, slow_close_timeout_s=1
    )
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", s.port))
    port = sock.getsockname()[1]
    ws = await websockets.connect(
        s.ws_url, sock=sock, max_queue=1, close_timeout=0.5,
        additional_headers={"Authorization": f"Bearer {s.key('sleeper')}"},
    )  # fmt: skip
    await send(ws, op="subscribe", symbols=["*"])  # and never read again
    assert port in server_peers(s)
    await eventually(s.web.output, lambda log: "slow_consumer" in log, 40)
    # The close frame cannot reach a peer that does not read: after slow_close_timeout_s for
    # the last frames and as long again for the close, the server drops the TCP connection.
    await eventually(lambda: server_peers(s), lambda peers: port not in peers, 10)
    with contextlib.suppress(Exception):
        await ws.close()


RESET = b"<connection reset>"


async def test_request_heads_that_never_finish_get_408_and_are_closed(own_stack) -> None:
    s: Stack = own_stack(feed=False, request_head_timeout_s=1)

    async def partial(head: bytes, trickle: bool) -> bytes:
        """Send part of a request head (then, if ``trickle``, a byte of a header value every
        0.2 s); returns all the server answers."""
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        writer.write(head)

        async def drip() -> None:
            with contextlib.suppress(OSError):
                while trickle:
                    await asyncio.sleep(0.2)
                    writer.write(b"x")

        dripping = asyncio.create_task(drip())
        try:
            return await asyncio.wait_for(reader.read(), WAIT_S)  # to EOF: the server hung up
        except ConnectionResetError:
            # A peer still writing when the server closes gets a reset, which may arrive
            # before it reads the 408: the connection was closed all the same.
            assert trickle, "only a peer that keeps writing may see a reset"
            return RESET
        finally:
            dripping.cancel()
            writer.close()

    heads = [  # nothing at all, part of a request line, part of the headers, a header forever
        (b"", False),
        (b"GET /hea", False),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\n", False),
        (b"GET /ws HTTP/1.1\r\nHost: x\r\nX-Slow: ", True),
    ]
    answers = asyncio.gather(*(partial(*heads[i % 4]) for i in range(40)))
    # meanwhile, all is well
    async with httpx.AsyncClient(base_url=s.base, timeout=WAIT_S, verify=TLS) as http:
        assert (await http.get("/healthz")).status_code == 200
    for answer in await answers:
        if answer == RESET:
            continue
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert b"request line and headers did not arrive within 1s" in answer

    # A kept-alive connection: the first request is answered, the unfinished second one is not.
    reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHo")
    data = await asyncio.wait_for(reader.read(), WAIT_S)
    writer.close()
    assert data.startswith(b"HTTP/1.1 200 ") and b"HTTP/1.1 408 " in data

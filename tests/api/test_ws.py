"""The WebSocket of plexichat.api over a real uvicorn server on 127.0.0.1:
sequence order, resume without gap or duplicate, slow consumers, auth."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from plexichat.api.app import CLOSE_SLOW
from plexichat.api.server import HttpServer

PATH = "/channels/live/ws"


@contextlib.asynccontextmanager
async def served(app: FastAPI) -> AsyncIterator[str]:
    """*app* on a free 127.0.0.1 port: its ``host:port``."""
    server = HttpServer(app, "127.0.0.1", 0, stop_timeout=2)
    port = await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop()


async def post(api, n: int, start: int = 0, size: int = 0) -> list[int]:
    seqs = []
    for i in range(start, start + n):
        text = f"m{i}" + "x" * size
        r = await api.http.post(
            "/channels/live/messages", json={"text": text}, headers=api.auth()
        )
        assert r.status_code == 201, r.text
        seqs.append(r.json()["seq"])
    return seqs


async def receive(ws: ClientConnection, count: int, timeout: float = 10) -> list[int]:
    """The seqs of the next *count* messages."""
    seqs = []
    async with asyncio.timeout(timeout):
        while len(seqs) < count:
            message = json.loads(await ws.recv())
            seqs.append(message["seq"])
    return seqs


def test_backlog_then_live_in_order_and_resume(tmp_path, run, api_cluster):
    async def scenario() -> None:
        async with api_cluster(tmp_path) as api, served(api.app) as address:
            token = api.cluster.credentials.token(7)
            headers = {"Authorization": f"Bearer {token}"}
            await post(api, 5)
            url = f"ws://{address}{PATH}?after=2"
            async with connect(url, additional_headers=headers) as ws:
                assert await receive(ws, 3) == [3, 4, 5]  # the backlog
                writer = asyncio.create_task(post(api, 20, 5))
                assert await receive(ws, 20) == list(range(6, 26))  # live
                await writer
                with pytest.raises(TimeoutError):  # nothing twice
                    await asyncio.wait_for(ws.recv(), 0.3)
            # resume where a client left off (the token in the query works too)
            url = f"ws://{address}{PATH}?after=21&token={token}"
            async with connect(url) as ws:
                assert await receive(ws, 4) == [22, 23, 24, 25]
                await post(api, 1, 25)
                assert await receive(ws, 1) == [26]

    run(scenario())


def test_resume_while_writing_has_no_gap_and_no_duplicate(tmp_path, run, api_cluster):
    """Connect while messages are being acknowledged: the backlog FETCH and
    the live DELIVERs overlap, each seq still arrives once and in order."""

    async def scenario() -> None:
        async with api_cluster(tmp_path) as api, served(api.app) as address:
            headers = {"Authorization": f"Bearer {api.cluster.credentials.token(7)}"}
            await post(api, 10)
            writer = asyncio.create_task(post(api, 60, 10))
            streams = []
            for after in (0, 4, 9):
                await asyncio.sleep(0.05)
                ws = await connect(
                    f"ws://{address}{PATH}?after={after}", additional_headers=headers
                )
                streams.append((after, ws))
            await writer
            for after, ws in streams:
                got = await receive(ws, 70 - after)
                assert got == list(range(after + 1, 71)), after
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(ws.recv(), 0.2)
                await ws.close()

    run(scenario(), timeout=90)


def test_slow_consumer_is_closed_and_resumes(tmp_path, run, api_cluster):
    """A client that stops reading: the server's buffer of live records fills,
    the client is closed with 4008 naming the seq to resume after; it then
    resumes from there and misses nothing."""

    async def scenario() -> None:
        api_options = {"ws_queue": 8, "ws_send_timeout": 0.5}
        async with (
            api_cluster(tmp_path, api=api_options) as api,
            served(api.app) as address,
        ):
            headers = {"Authorization": f"Bearer {api.cluster.credentials.token(7)}"}
            url = f"ws://{address}{PATH}"
            size = 64 * 1024

            async def closed_slow() -> float:
                text = (await api.http.get("/metrics")).text
                line = f'plexichat_ws_closed_total{{code="{CLOSE_SLOW}"}} '
                found = [x for x in text.splitlines() if x.startswith(line)]
                return float(found[0].split()[-1]) if found else 0.0

            # a small receive buffer (no autotuning): the server feels it soon
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
            host, port = address.split(":")
            sock.connect((host, int(port)))
            sock.setblocking(False)
            async with connect(
                url,
                sock=sock,
                additional_headers=headers,
                max_queue=1,
                max_size=None,
                compression=None,  # (the messages would compress to nothing)
            ) as slow:
                # write, never read, until the server gives up on this client
                total = 0
                while not await closed_slow():
                    total += len(await post(api, 10, total, size=size))
                    assert total < 600, "the slow client was never closed"
                got = []

                async def read_all() -> None:
                    async with asyncio.timeout(20):
                        while True:
                            got.append(json.loads(await slow.recv())["seq"])

                with pytest.raises(ConnectionClosed) as closed:
                    await read_all()
            frame = closed.value.rcvd
            assert frame is not None
            assert frame.code == CLOSE_SLOW
            assert got == list(range(1, len(got) + 1))
            assert len(got) < total
            assert frame.reason.endswith(f"after={len(got)}")
            async with connect(
                f"{url}?after={len(got)}", additional_headers=headers, max_size=None
            ) as ws:
                rest = await receive(ws, total - len(got))
            assert rest == list(range(len(got) + 1, total + 1))
            metrics = (await api.http.get("/metrics")).text
            assert f'plexichat_ws_closed_total{{code="{CLOSE_SLOW}"}} 1.0' in metrics

    run(scenario(), timeout=120)


def test_websocket_authentication(tmp_path, run, api_cluster):
    async def scenario() -> None:
        async with api_cluster(tmp_path) as api, served(api.app) as address:
            for suffix, headers in (
                ("", {}),
                ("?token=a.b.c", {}),
                ("", {"Authorization": "Bearer nope"}),
            ):
                with pytest.raises(InvalidStatus) as refused:
                    await connect(
                        f"ws://{address}{PATH}{suffix}", additional_headers=headers
                    )
                assert refused.value.response.status_code == 401
            with pytest.raises(InvalidStatus) as refused:
                await connect(f"ws://{address}{PATH}?after=-1")
            assert refused.value.response.status_code == 403  # (a bad query)
            # the same server answers plain HTTP on 127.0.0.1
            async with httpx.AsyncClient(base_url=f"http://{address}") as http:
                assert (await http.get("/health")).status_code == 200

    run(scenario())


def test_websocket_of_an_unavailable_channel_is_503(tmp_path, run, api_cluster):
    async def scenario() -> None:
        async with (
            api_cluster(tmp_path, size=1, replicas=2) as api,
            served(api.app) as address,
        ):
            token = api.cluster.credentials.token(7)
            with pytest.raises(InvalidStatus) as refused:
                await connect(f"ws://{address}{PATH}?token={token}")
            assert refused.value.response.status_code == 503
            assert refused.value.response.headers["Retry-After"] == "1"

    run(scenario())


def test_owner_leaves_stream_closes_1012_and_resumes_in_order(
    tmp_path, run, api_cluster
):
    """The channel's owner leaves the cluster: the WebSocket is closed with
    1012 naming the seq to resume after; a client that reconnects with it
    (while the new owner takes over) gets every seq once, in order."""
    from plexichat.routing import key_of

    async def scenario() -> None:
        async with api_cluster(tmp_path) as api, served(api.app) as address:
            token = api.cluster.credentials.token(7)
            name = next(
                f"room{i}"
                for i in range(1000)
                if api.cluster.owners(key_of(f"room{i}"))[0] != "n0"
            )
            owner = api.cluster.owners(key_of(name))[0]
            url = f"/channels/{name}/messages"
            auth = {"Authorization": f"Bearer {token}"}

            async def send(i: int) -> int:
                """POST until acknowledged (the same key on every retry)."""
                async with asyncio.timeout(30):
                    while True:
                        r = await api.http.post(
                            url,
                            json={"text": f"m{i}"},
                            headers={**auth, "Idempotency-Key": f"k{i}"},
                        )
                        if r.status_code == 201:
                            return int(r.json()["seq"])
                        assert r.status_code == 503, r.text
                        await asyncio.sleep(0.1)

            for i in range(5):
                await send(i)
            ws_url = f"ws://{address}/channels/{name}/ws?token={token}"
            got: list[int] = []
            async with connect(ws_url) as ws:
                got += await receive(ws, 5)
                await api.cluster.stop_node(owner)  # leaves the ring

                async def read_all() -> None:
                    async with asyncio.timeout(10):
                        while True:
                            got.append(json.loads(await ws.recv())["seq"])

                with pytest.raises(ConnectionClosed) as closed:
                    await read_all()
            frame = closed.value.rcvd
            assert frame is not None
            assert frame.code == 1012
            assert frame.reason.endswith(f"after={got[-1]}")
            writer = asyncio.gather(*(send(i) for i in range(5, 15)))
            async with asyncio.timeout(30):
                while True:  # until the new owner serves the channel
                    try:
                        ws = await connect(f"{ws_url}&after={got[-1]}")
                        break
                    except InvalidStatus as exc:
                        refused = exc.response.status_code
                    assert refused == 503
                    await asyncio.sleep(0.1)
            async with ws:
                seqs = await writer
                assert sorted(seqs) == list(range(6, 16))
                got += await receive(ws, 15 - len(got), timeout=20)
            assert got == list(range(1, 16))

    run(scenario(), timeout=90)

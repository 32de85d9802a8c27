"""The sidecar with real processes: app process, sidecar process, Valkey, writer and a router.

Readiness flips reach the router's snapshot in milliseconds; a blocked app reads as not ready;
a full pod refuses politely and the router re-picks; SIGTERM drains with a stream in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from fastproxy.config import RouterConfig
from fastproxy.proxy import ClientConnection
from fastproxy.router import Router
from statesync.connect import connect
from statesync.embedded import EmbeddedValkey
from statesync.schema import PodState, Route, RouteChanged, WeightedRevision
from statesync.subscriber import ReportForwarder, StateFollower
from statesync.writer import Writer, submit
from tests.conftest import next_pod_address, wait_for

PY = sys.executable


async def spawn(*args: str) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        PY, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
    assert line.startswith("listening "), line
    return proc, line.split()[1]


class PodUnderTest:
    def __init__(self, app: asyncio.subprocess.Process, app_addr: str, sidecar: asyncio.subprocess.Process,
                 uid: str) -> None:  # fmt: skip
        self.app, self.app_addr, self.sidecar, self.uid = app, app_addr, sidecar, uid

    async def control(self, path: str) -> None:
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"http://{self.app_addr}{path}", timeout=10)).status_code == 200


class System:
    def __init__(self) -> None:
        self.valkey = EmbeddedValkey().start()
        self.procs: list[asyncio.subprocess.Process] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> System:
        loop = asyncio.get_running_loop()
        self.writer = Writer(connect(self.valkey.url), writer_id="w", lease_ttl=2)
        self.router = Router(RouterConfig(sidecar_protocol=True, queue_timeout=10), loop)
        self.follower = StateFollower(self.router, self.valkey.url)
        self.tasks += [
            asyncio.create_task(self.writer.run()),
            asyncio.create_task(self.follower.run()),
            asyncio.create_task(ReportForwarder(self.router, self.valkey.url).run()),
        ]
        server = await loop.create_server(lambda: ClientConnection(self.router), "127.0.0.1", 0)
        self.server = server
        self.port = server.sockets[0].getsockname()[1]
        await submit(connect(self.valkey.url), [RouteChanged(route=Route(
            service="chat", revisions=(WeightedRevision(revision="chat-v1", weight=100),)))])  # fmt: skip
        return self

    async def pod(self, uid: str, concurrency: int = 1) -> PodUnderTest:
        ip = next_pod_address()
        app, app_addr = await spawn("-m", "fastproxy.devtools.upstream", "--listen", f"{ip}:0",
                                    "--concurrency", str(concurrency))  # fmt: skip
        sidecar, _ = await spawn(
            "-m", "fastproxy.cli", "sidecar", "--listen", f"{ip}:0", "--admin", f"{ip}:0", "--app", app_addr,
            "--concurrency", str(concurrency), "--readiness-path", "/ready", "--valkey", self.valkey.url,
            "--pod-uid", uid, "--pod-ip", ip, "--revision", "chat-v1", "--log-level", "warning",
        )  # fmt: skip
        self.procs += [app, sidecar]
        pod = PodUnderTest(app, app_addr, sidecar, uid)
        await wait_for(
            lambda: self.state(uid) is PodState.READY, timeout=20, what=f"{uid} ready in the router"
        )
        return pod

    def state(self, uid: str) -> PodState | None:
        record = self.router.snapshot.pods.get(uid)
        return record.state if record else None

    async def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        self.follower.stop()
        self.writer.stop()
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(BaseException):
                await task
        self.server.close()
        for conn in list(self.router.connections):
            conn.abort()
        self.router.pool.close_all()
        self.valkey.close()


@pytest.fixture
async def system() -> AsyncIterator[System]:
    s = await System().start()
    try:
        yield s
    finally:
        await s.close()


async def test_readiness_flip_reaches_the_router_in_milliseconds(system: System) -> None:
    pod = await system.pod("pod-a")
    flips = []
    for _ in range(5):
        await pod.control("/control/ready/0")
        started = time.perf_counter()  # the app has flipped: from here the sidecar must notice
        await wait_for(lambda: system.state("pod-a") is PodState.NOT_READY, timeout=5, what="not ready")
        flips.append(time.perf_counter() - started)
        await pod.control("/control/ready/1")
        started = time.perf_counter()
        await wait_for(lambda: system.state("pod-a") is PodState.READY, timeout=5, what="ready again")
        flips.append(time.perf_counter() - started)
    print(f"\nreadiness flip -> router snapshot: median {sorted(flips)[len(flips) // 2] * 1000:.1f} ms, "
          f"max {max(flips) * 1000:.1f} ms (probe interval 50 ms included)")  # fmt: skip
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{system.port}") as client:
        assert (await client.get("/")).status_code == 200


async def test_blocked_app_reads_not_ready_then_recovers(system: System) -> None:
    pod = await system.pod("pod-b")
    blocker = asyncio.create_task(pod.control("/control/block/1500"))
    await wait_for(
        lambda: system.state("pod-b") is PodState.NOT_READY, timeout=5, what="blocked -> not ready"
    )
    await blocker
    await wait_for(lambda: system.state("pod-b") is PodState.READY, timeout=5, what="unblocked -> ready")


async def test_full_pod_refuses_politely_and_router_repicks(system: System) -> None:
    first = await system.pod("pod-c")
    second = await system.pod("pod-d")
    # A slow request occupies one pod; further requests must all land on the other, no errors.
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{system.port}", timeout=20) as client:
        results = await asyncio.gather(*(client.post("/delay/300", content=b"x" * 100) for _ in range(6)))
    assert [r.status_code for r in results] == [200] * 6
    del first, second


async def test_sigterm_drains_with_a_stream_in_flight(system: System) -> None:
    pod = await system.pod("pod-e")
    other = await system.pod("pod-f")
    reader, writer = await asyncio.open_connection("127.0.0.1", system.port)
    writer.write(b"GET /sse/10/200 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    await asyncio.wait_for(reader.readuntil(b"data: 0\n\n"), 10)
    streaming = [p for p in (pod, other) if system.router.slots.pods[p.uid].inflight == 1]
    assert len(streaming) == 1
    streaming[0].sidecar.send_signal(signal.SIGTERM)
    await wait_for(lambda: system.state(streaming[0].uid) is PodState.DRAINING, timeout=10, what="draining")
    rest = await asyncio.wait_for(reader.read(-1), 20)
    assert rest.endswith(b"data: 9\n\n\r\n0\r\n\r\n")  # the in-flight stream completed
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{system.port}") as client:
        statuses = [(await client.get("/")).status_code for _ in range(5)]
    assert statuses == [200] * 5
    assert await asyncio.wait_for(streaming[0].sidecar.wait(), 20) == 0

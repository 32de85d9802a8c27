"""The sidecar with real processes: app process, sidecar process, Valkey, writer and a router.

Readiness flips reach the router's snapshot in milliseconds; a blocked app reads as not ready;
a full pod refuses politely and the router re-picks, however often (busy refusals are never client
errors while the queue deadline holds); a request that has waited is parked at a full sidecar and
served the moment the app is free; SIGTERM drains with a stream in flight. And a pod answering
``Connection: close`` never gets another request on that connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from fastproxy.config import RouterConfig
from fastproxy.proxy import ClientConnection
from fastproxy.router import Router
from fastproxy.snapshot import RoutingSnapshot
from statesync.connect import connect
from statesync.embedded import EmbeddedValkey
from statesync.schema import PodState, Route, RouteChanged, WeightedRevision
from statesync.subscriber import ReportForwarder, StateFollower
from statesync.writer import Writer, submit
from tests.conftest import next_pod_address, pod_record, status_of, wait_for

PY = sys.executable
ADMIN_TOKEN = "sidecar-test-token"


async def spawn(*args: str) -> tuple[asyncio.subprocess.Process, str, str]:
    """A child process and the (listen, admin) addresses it prints when it is up."""
    proc = await asyncio.create_subprocess_exec(
        PY, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        env=dict(os.environ, FASTPROXY_ADMIN_TOKEN=ADMIN_TOKEN),
    )  # fmt: skip
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
    assert line.startswith("listening "), line
    words = line.split()
    return proc, words[1], words[3] if len(words) > 3 else ""


class PodUnderTest:
    def __init__(self, app: asyncio.subprocess.Process, app_addr: str, sidecar: asyncio.subprocess.Process,
                 uid: str, sidecar_addr: str = "", sidecar_admin: str = "") -> None:  # fmt: skip
        self.app, self.app_addr, self.sidecar, self.uid = app, app_addr, sidecar, uid
        self.sidecar_addr, self.sidecar_admin = sidecar_addr, sidecar_admin

    async def parked(self) -> int:
        """Requests parked at the sidecar now (its admin API)."""
        async with httpx.AsyncClient() as client:
            response = await client.get(
                f"http://{self.sidecar_admin}/v1/revisions",
                headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
            )
            return sum(revision["queued"] for revision in response.json())

    async def control(self, path: str) -> None:
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"http://{self.app_addr}{path}", timeout=10)).status_code == 200

    async def stats(self) -> dict[str, int]:
        async with httpx.AsyncClient() as client:
            stats: dict[str, int] = (
                await client.get(f"http://{self.app_addr}/control/stats", timeout=10)
            ).json()
            return stats

    async def to_sidecar(self, request: bytes) -> bytes:
        """One request straight to the sidecar (as another router would send it); the whole answer."""
        host, _, port = self.sidecar_addr.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(request)
        try:
            return await asyncio.wait_for(reader.read(-1), 20)
        finally:
            writer.close()


class System:
    def __init__(self, **router_config: object) -> None:
        self.router_config = router_config
        self.valkey = EmbeddedValkey().start()
        self.procs: list[asyncio.subprocess.Process] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> System:
        loop = asyncio.get_running_loop()
        self.writer = Writer(connect(self.valkey.url), writer_id="w", lease_ttl=2)
        config = {"sidecar_protocol": True, "queue_timeout": 10.0} | self.router_config
        self.router = Router(RouterConfig(**config), loop)  # type: ignore[arg-type]
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

    async def pod(self, uid: str, concurrency: int = 1, *sidecar_args: str) -> PodUnderTest:
        ip = next_pod_address()
        app, app_addr, _ = await spawn("-m", "fastproxy.devtools.upstream", "--listen", f"{ip}:0",
                                    "--concurrency", str(concurrency))  # fmt: skip
        sidecar, sidecar_addr, sidecar_admin = await spawn(
            "-m", "fastproxy.cli", "sidecar", "--listen", f"{ip}:0", "--admin", f"{ip}:0", "--app", app_addr,
            "--concurrency", str(concurrency), "--readiness-path", "/ready", "--valkey", self.valkey.url,
            "--pod-uid", uid, "--pod-ip", ip, "--revision", "chat-v1", "--log-level", "warning", *sidecar_args,
        )  # fmt: skip
        self.procs += [app, sidecar]
        pod = PodUnderTest(app, app_addr, sidecar, uid, sidecar_addr, sidecar_admin)
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


async def test_busy_refusals_beyond_max_attempts_are_not_client_errors() -> None:
    """The 502s of the first load benchmark: each busy refusal counted as an attempt, so a request
    refused max_attempts times was answered 502 although no pod ever saw it. Refusals are not
    attempts; only the queue deadline ends the retries."""
    system = await System(max_attempts=1, busy_backoff_seconds=0.02).start()
    try:
        pod = await system.pod("pod-g", 1, "--park", "0")  # no parking: every try is refused
        # Another router's request holds the only slot; this router's table thinks the pod is free.
        hog = asyncio.create_task(
            pod.to_sidecar(b"GET /delay/600 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        )
        await wait_for_app_busy(pod)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{system.port}", timeout=20) as client:
            response = await client.post("/echo", content=b"hello")
        assert response.status_code == 200 and response.content == b"hello"
        assert system.router.stats.busy_refusals > 1  # more refusals than max_attempts allows attempts
        assert status_of(await hog) == 200
        stats = await pod.stats()
        assert stats["violations"] == 0 and stats["max_concurrent_seen"] == 1
    finally:
        await system.close()


async def wait_for_app_busy(pod: PodUnderTest) -> None:
    deadline = asyncio.get_running_loop().time() + 10
    while sum(server["active"] for server in (await pod.stats())["servers"]) < 1:  # type: ignore[attr-defined]
        assert asyncio.get_running_loop().time() < deadline, "the app never got the hog request"
        await asyncio.sleep(0.01)


async def wait_for_async(count: Callable[[], Awaitable[int]], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + 5
    while await count() < 1:
        assert asyncio.get_running_loop().time() < deadline, f"{what} not met within 5s"
        await asyncio.sleep(0.01)


async def test_full_sidecar_parks_a_request_that_waited_and_refuses_a_fresh_one(system: System) -> None:
    pod = await system.pod("pod-h", 1, "--park-timeout", "0.9")
    hog = asyncio.create_task(
        pod.to_sidecar(b"GET /delay/400 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    )
    await wait_for_app_busy(pod)
    fresh = await pod.to_sidecar(
        b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx"
    )
    assert status_of(fresh) == 503 and b"x-fastproxy-busy: 1" in fresh.lower()  # refused at once
    parked = await pod.to_sidecar(
        b"POST /echo HTTP/1.1\r\nHost: a\r\nx-fastproxy-park: 1\r\nContent-Length: 5\r\n"
        b"Connection: close\r\n\r\nhello"
    )
    assert status_of(parked) == 200 and parked.endswith(b"hello")  # served once the app was free
    assert status_of(await hog) == 200
    stats = await pod.stats()
    assert stats["violations"] == 0 and stats["max_concurrent_seen"] == 1


async def test_full_sidecar_parks_three_requests_that_waited_by_default_and_refuses_a_fourth(
    system: System,
) -> None:
    """Three parked by default: each of 4 routers counts one request per free slot in its own view,
    so a CC=1 pod can be sent 4 at once; with fewer parking places every retry of a full pod is
    refused (the load benchmark: 19k refusals in 20 s with one place, ~100 with three), and the
    CPU those refusals cost the routers and sidecars lengthened the idle gaps."""
    # The three must be seen parked together while the hog runs: 0.9 s for that (it took over the
    # 0.5 s this had on a loaded 2-core machine), within the park deadline (which must be < 1 s).
    pod = await system.pod("pod-k", 1, "--park-timeout", "0.95")
    hog = asyncio.create_task(
        pod.to_sidecar(b"GET /delay/900 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    )
    await wait_for_app_busy(pod)
    park = b"GET /%d HTTP/1.1\r\nHost: a\r\nx-fastproxy-park: 1\r\nConnection: close\r\n\r\n"
    parked = [asyncio.create_task(pod.to_sidecar(park % i)) for i in range(3)]

    async def all_parked() -> int:
        return int(await pod.parked() == 3)

    await wait_for_async(all_parked, what="three requests parked")
    fourth = await pod.to_sidecar(park % 3)
    assert status_of(fourth) == 503 and b"x-fastproxy-busy: 1" in fourth.lower()  # refused at once
    assert status_of(await hog) == 200
    assert [status_of(await answer) for answer in parked] == [200, 200, 200]  # served in turn
    stats = await pod.stats()
    assert stats["violations"] == 0 and stats["max_concurrent_seen"] == 1 and stats["work_count"] == 4


async def test_parked_request_is_refused_at_its_deadline_or_when_the_app_turns_not_ready(
    system: System,
) -> None:
    pod = await system.pod("pod-i", 1, "--park-timeout", "0.9")
    park = b"GET / HTTP/1.1\r\nHost: a\r\nx-fastproxy-park: 1\r\nConnection: close\r\n\r\n"
    hog = asyncio.create_task(
        pod.to_sidecar(b"GET /delay/5000 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    )
    await wait_for_app_busy(pod)
    late = await pod.to_sidecar(park)  # the app stays busy for 5 s: refused at the park deadline
    assert status_of(late) == 503 and b"x-fastproxy-busy: 1" in late.lower()
    parked = asyncio.create_task(pod.to_sidecar(park.replace(b"GET / ", b"GET /x ")))
    await wait_for_async(lambda: pod.parked(), what="one request parked")
    await pod.control("/control/ready/0")
    answer = await parked
    assert await pod.parked() == 0
    assert status_of(answer) == 503 and b"x-fastproxy-busy: 1" in answer.lower()
    hog.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await hog
    stats = await pod.stats()
    assert stats["violations"] == 0 and stats["work_count"] == 1  # only the hog ever reached the app


async def test_pod_answering_connection_close_is_not_sent_another_request() -> None:
    """A pod that says ``Connection: close`` will not read another request on that connection, even
    before its FIN arrives. Reusing it lost the next request (a 502 that could not be retried)."""
    connections: list[list[bytes]] = []

    async def pod(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received: list[bytes] = []
        connections.append(received)
        received.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        # A slow close (the FIN comes late): whatever arrives meanwhile is not read as a request.
        with contextlib.suppress(TimeoutError):
            received.append(await asyncio.wait_for(reader.read(65536), 0.5))
        writer.close()

    ip = next_pod_address()
    server = await asyncio.start_server(pod, ip, 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    router = Router(RouterConfig(), loop)
    route = Route(service="chat", revisions=(WeightedRevision(revision="chat-v1", weight=100),))
    router.install(RoutingSnapshot.build(0, 1, [pod_record("p1", (ip, port))], [route]))
    proxy = await loop.create_server(lambda: ClientConnection(router), "127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{proxy.sockets[0].getsockname()[1]}"
        ) as client:
            statuses = [
                (await client.get("/", headers={"x-fastproxy-service": "chat"})).status_code for _ in range(2)
            ]
        assert statuses == [200, 200]
        assert len(connections) == 2
        assert connections[0][1:] in ([], [b""])  # nothing was written after the "close" answer
    finally:
        proxy.close()
        for conn in list(router.connections):
            conn.abort()
        router.pool.close_all()
        server.close()


async def test_app_that_dies_reads_not_ready_although_the_probe_connection_is_kept_alive(
    system: System,
) -> None:
    pod = await system.pod("pod-j")
    pod.app.kill()  # the kept-alive probe connection ends with it; a new one is refused
    await pod.app.wait()
    await wait_for(
        lambda: system.state("pod-j") is PodState.NOT_READY, timeout=5, what="dead app -> not ready"
    )

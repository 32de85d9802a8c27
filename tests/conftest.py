"""Shared test fixtures: uvloop as the loop, an in-process router on a real socket, app pods.

Everything here is real: the router's own listener and protocols, the pods are ``AppServer``
instances listening on their own loopback addresses, and clients speak raw bytes or httpx.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvloop

from fastproxy.config import RouterConfig
from fastproxy.devtools.upstream import AppServer
from fastproxy.proxy import ClientConnection
from fastproxy.router import Router
from fastproxy.snapshot import RoutingSnapshot
from statesync.schema import PodRecord, PodState, Route, WeightedRevision


@pytest.fixture(scope="session")
def event_loop_policy() -> uvloop.EventLoopPolicy:
    return uvloop.EventLoopPolicy()


_addresses = itertools.count(10)


def next_pod_address() -> str:
    """A fresh loopback address per pod (all of 127.0.0.0/8 is local)."""
    n = next(_addresses)
    return f"127.0.{n // 250 + 1}.{n % 250 + 1}"


def pod_record(
    uid: str, address: tuple[str, int], revision: str = "chat-v1", concurrency: int = 1, generation: int = 1
) -> PodRecord:
    return PodRecord(
        uid=uid,
        namespace="ml",
        revision=revision,
        ip=address[0],
        port=address[1],
        concurrency=concurrency,
        state=PodState.READY,
        generation=generation,
        ready=True,
    )


def chat_route(*revisions: tuple[str, int], hosts: tuple[str, ...] = ()) -> Route:
    revisions = revisions or (("chat-v1", 100),)
    return Route(
        service="chat",
        hosts=hosts,
        revisions=tuple(WeightedRevision(revision=r, weight=w) for r, w in revisions),
    )


class RouterHarness:
    def __init__(self) -> None:
        self.apps: list[AppServer] = []
        self.servers: list[Any] = []
        self.routers: list[Router] = []

    async def app(self, **kwargs: Any) -> AppServer:
        app = AppServer(**kwargs)
        await app.start(next_pod_address(), 0)
        self.apps.append(app)
        return app

    async def router(
        self, pods: list[PodRecord], routes: list[Route] | None = None, **config: Any
    ) -> tuple[Router, int]:
        loop = asyncio.get_running_loop()
        router = Router(RouterConfig(**config), loop)
        router.install(RoutingSnapshot.build(1, 1, pods, routes if routes is not None else [chat_route()]))
        server = await loop.create_server(lambda: ClientConnection(router), "127.0.0.1", 0)
        self.servers.append(server)
        self.routers.append(router)
        return router, server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for router in self.routers:
            for conn in list(router.connections):
                conn.abort()
            router.pool.close_all()
        for app in self.apps:
            await app.close()
        assert all(not app.errors for app in self.apps), [app.errors for app in self.apps]


@pytest.fixture
async def harness() -> AsyncIterator[RouterHarness]:
    h = RouterHarness()
    try:
        yield h
    finally:
        await h.close()


async def exchange(port: int, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the router closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        async with asyncio.timeout(timeout):
            return await reader.read(-1)
    finally:
        writer.close()


async def wait_for(predicate: Any, timeout: float = 5.0, what: str = "condition") -> None:
    """Poll a condition that has no event to wait on, with a deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        await asyncio.sleep(0.005)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])

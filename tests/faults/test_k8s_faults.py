"""Kubernetes faults, end to end: the API's watch expires (410) or goes silent while pods change.

The chain is real from the API to the routers: kmock serves a stateful Kubernetes API
(``tests.k8s.conftest.FakeKube``: resourceVersions, a watch cache that compacts, silent streams), the
official ``kubernetes`` client runs in the ``Informer`` the writer runs with ``--kubernetes``, its
events go through a real valkey-server to a real ``Writer`` (leader), and two ``Router`` +
``StateFollower`` pairs follow it as ``fastproxy router --valkey`` does. The informer gets short
timeouts (the test's settings) so a silent watch is noticed in a second, not in 90.

Invariants after each scenario: every change made in the API while the watch was broken reaches
every router (routing state converged to the truth), pods present throughout are never removed
and re-added (a relist is a diff, never an empty state), and no router ever held an empty snapshot
once it had pods.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from fastproxy.config import RouterConfig
from fastproxy.router import Router
from statesync.connect import connect
from statesync.embedded import EmbeddedValkey
from statesync.informer import Informer, InformerSettings, KubeApi
from statesync.schema import Event, PodState, Route, RouteChanged, WeightedRevision
from statesync.subscriber import StateFollower
from statesync.writer import Writer, submit
from tests.conftest import wait_for
from tests.faults.conftest import FaultReport
from tests.k8s.conftest import FakeKube, api_config, endpoint, endpoint_slice, fake_kube, pod

__all__ = ["fake_kube"]  # the fixture, imported for this module

SETTINGS = InformerSettings(
    namespace="ml",
    watch_timeout=30,
    read_timeout=1.0,
    connect_timeout=2.0,
    list_timeout=5.0,
    backoff_initial=0.05,
)


class K8sSystem:
    """Valkey, a writer leading it, the informer feeding it, and two routers following it."""

    def __init__(self, valkey: EmbeddedValkey, kmock: Any) -> None:
        self.valkey = valkey
        self.client = connect(valkey.url)
        self.writer = Writer(connect(valkey.url), writer_id="w1", lease_ttl=2)
        self.routers: list[Router] = []
        self.followers: list[StateFollower] = []
        self.empty_after_pods: list[str] = []  # routers seen with no pods after having some
        self.tasks: list[asyncio.Task[Any]] = []
        self.kmock = kmock
        self.informer: Informer | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await self.writer.ensure_group()
        self.tasks.append(asyncio.create_task(self.writer.run()))
        await wait_for(lambda: self.writer.leader, 10, "writer leading")
        route = Route(service="chat", revisions=(WeightedRevision(revision="chat", weight=100),))
        await submit(self.client, [RouteChanged(route=route)])

        async def to_stream(events: list[Event]) -> None:
            await submit(self.client, events)

        term = lambda: self.writer.epoch if self.writer.leader else None  # noqa: E731
        self.informer = Informer(KubeApi(lambda: api_config(self.kmock)), to_stream, SETTINGS, active=term)
        self.tasks.append(asyncio.create_task(self.informer.run()))
        for i in range(2):
            router = Router(RouterConfig(instance=f"router-{i}"), loop)
            follower = StateFollower(router, self.valkey.url, heartbeat_timeout=3.0, retry_delay=0.05)
            self.routers.append(router)
            self.followers.append(follower)
            self.tasks.append(asyncio.create_task(follower.run()))
        self.tasks.append(asyncio.create_task(self._watch_for_empty()))

    async def _watch_for_empty(self) -> None:
        had_pods = [False] * len(self.routers)
        while True:
            for i, router in enumerate(self.routers):
                n = len(router.snapshot.pods)
                if n:
                    had_pods[i] = True
                elif had_pods[i] and f"router-{i}" not in self.empty_after_pods:
                    self.empty_after_pods.append(f"router-{i}")
            await asyncio.sleep(0.002)

    def states(self, router: Router) -> dict[str, PodState]:
        return {uid: p.state for uid, p in router.snapshot.pods.items()}

    async def converged(self, want: dict[str, PodState], timeout: float = 15.0) -> None:
        await wait_for(
            lambda: all(self.states(r) == want for r in self.routers),
            timeout,
            f"every router at {want}",
        )

    async def close(self) -> None:
        self.writer.stop()
        for follower in self.followers:
            follower.stop()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.client.aclose()


@contextlib.asynccontextmanager
async def k8s_system(kmock: Any) -> AsyncIterator[K8sSystem]:
    with EmbeddedValkey() as valkey:
        valkey.start()
        system = K8sSystem(valkey, kmock)
        try:
            await system.start()
            yield system
        finally:
            await system.close()


def seed(fake: FakeKube) -> None:
    for i in range(1, 5):
        fake.put("pods", pod(f"p{i}", f"u{i}"))
    fake.put(
        "endpointslices",
        endpoint_slice(
            "chat-a", "chat", [endpoint("p1", "u1", "127.0.9.1"), endpoint("p2", "u2", "127.0.9.2")]
        ),
    )
    fake.put("endpointslices", endpoint_slice("chat-b", "chat", [endpoint("p3", "u3", "127.0.9.3")]))


READY = PodState.READY


@pytest.mark.timeout(90)
async def test_watch_410_during_changes_converges_without_emptying(
    fake_kube: FakeKube, kmock: Any, fault_report: FaultReport
) -> None:
    seed(fake_kube)
    async with k8s_system(kmock) as system:
        await system.converged({"u1": READY, "u2": READY, "u3": READY})
        relists = system.informer.slices.stats["relists"]  # type: ignore[union-attr]
        # Changes the watch never delivers (the history is compacted: only a relist shows them).
        fake_kube.put(
            "endpointslices",
            endpoint_slice("chat-a", "chat", [endpoint("p1", "u1", "127.0.9.1", ready=False)]),
            notify=False,
        )
        fake_kube.put(
            "endpointslices",
            endpoint_slice(
                "chat-b", "chat", [endpoint("p3", "u3", "127.0.9.3"), endpoint("p4", "u4", "127.0.9.4")]
            ),
            notify=False,
        )
        fake_kube.expire()  # every open watch: ERROR 410 Expired
        problems: list[str] = []
        try:
            await system.converged({"u1": PodState.NOT_READY, "u3": READY, "u4": READY})
        except AssertionError as exc:
            problems.append(str(exc))
        if system.informer.slices.stats["relists"] <= relists:  # type: ignore[union-attr]
            problems.append("no relist after the 410")
        problems += [f"{name} held an empty snapshot after having pods" for name in system.empty_after_pods]
        fault_report.add(
            "k8s watch 410 (expired) during changes", 4, {}, len(problems), "relisted, diffed, converged"
        )
        assert problems == []


@pytest.mark.timeout(90)
async def test_silent_watch_drop_is_noticed_and_changes_arrive(
    fake_kube: FakeKube, kmock: Any, fault_report: FaultReport
) -> None:
    seed(fake_kube)
    async with k8s_system(kmock) as system:
        await system.converged({"u1": READY, "u2": READY, "u3": READY})
        timeouts = system.informer.slices.stats["read_timeouts"]  # type: ignore[union-attr]
        fake_kube.go_silent("endpointslices")  # the next slice watch: open, and nothing ever arrives
        fake_kube.end_watches()  # the current one ends; the informer watches again, silently
        await asyncio.sleep(0.1)
        fake_kube.put(
            "endpointslices",
            endpoint_slice(
                "chat-a", "chat", [endpoint("p1", "u1", "127.0.9.1"), endpoint("p4", "u4", "127.0.9.4")]
            ),
        )  # p2 gone, p4 in: sent only to the silent watch
        problems: list[str] = []
        try:
            await system.converged({"u1": READY, "u3": READY, "u4": READY})
        except AssertionError as exc:
            problems.append(str(exc))
        if system.informer.slices.stats["read_timeouts"] <= timeouts:  # type: ignore[union-attr]
            problems.append("the silent watch was not ended by the read timeout")
        problems += [f"{name} held an empty snapshot after having pods" for name in system.empty_after_pods]
        fault_report.add(
            "k8s watch silently dropped", 3, {}, len(problems), "read timeout, resumed, converged"
        )
        assert problems == []

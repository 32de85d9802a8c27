"""The EndpointSlice informer: the pure cache, then the real kubernetes client against kmock.

The network tests run ``Informer`` with the official ``kubernetes`` client against ``FakeKube`` (a
kmock reaction with resourceVersions, history, bookmarks, 410 and silent streams: see conftest.py)
and collect what it would submit. The last test runs ``fastproxy writer --kubernetes`` as a process
with a kubeconfig pointing at kmock and a real valkey-server, and reads the writer's committed pods.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from statesync.informer import (
    API_CALLS,
    Informer,
    InformerSettings,
    KubeApi,
    PodMeta,
    SliceCache,
    parse_slice,
)
from statesync.schema import DrainStarted, PodDiscovered, PodRemoved, ReadinessChanged, Source
from tests.k8s.conftest import Collected, FakeKube, api_config, endpoint, endpoint_slice, eventually, pod

# ---- the pure cache ------------------------------------------------------------------------------


def _cache_with(
    *slices: dict[str, Any], pods: list[dict[str, Any]] | None = None
) -> tuple[SliceCache, list[Any]]:
    cache = SliceCache(clock=lambda: 1.0)
    events = cache.pods_listed(pods or []) + cache.slices_listed(list(slices))
    return cache, events


def _meta(obj: dict[str, Any], rv: str) -> dict[str, Any]:
    obj["metadata"]["resourceVersion"] = rv
    return obj


def test_cache_list_emits_discovered_with_pod_metadata() -> None:
    cache, events = _cache_with(
        _meta(
            endpoint_slice(
                "chat-a",
                "chat",
                [endpoint("p1", "u1", "10.0.0.1"), endpoint("p2", "u2", "10.0.0.2", ready=False)],
            ),
            "1",
        ),
        pods=[pod("p1", "u1", concurrency=4), pod("p2", "u2", revision=None)],
    )
    assert events == [
        PodDiscovered(
            uid="u1",
            source=Source.INFORMER,
            at=1.0,
            namespace="ml",
            revision="chat-v1",
            ip="10.0.0.1",
            port=8012,
            concurrency=4,
            ready=True,
        ),
        # no revision label on the pod or the slice: the Service's name
        PodDiscovered(
            uid="u2",
            source=Source.INFORMER,
            at=1.0,
            namespace="ml",
            revision="chat",
            ip="10.0.0.2",
            port=8012,
            concurrency=1,
            ready=False,
        ),
    ]
    assert cache.views["u1"].node == "node-a"


def test_cache_relist_is_a_diff_never_an_empty_state() -> None:
    a = _meta(
        endpoint_slice(
            "chat-a", "chat", [endpoint("p1", "u1", "10.0.0.1"), endpoint("p2", "u2", "10.0.0.2")]
        ),
        "1",
    )
    b = _meta(endpoint_slice("chat-b", "chat", [endpoint("p3", "u3", "10.0.0.3")]), "2")
    cache, _ = _cache_with(a, b, pods=[pod(f"p{i}", f"u{i}") for i in range(1, 5)])
    a2 = _meta(endpoint_slice("chat-a", "chat", [endpoint("p1", "u1", "10.0.0.1", ready=False)]), "5")
    c = _meta(endpoint_slice("chat-c", "chat", [endpoint("p4", "u4", "10.0.0.4")]), "6")
    events = cache.slices_listed([a2, b, c])
    assert [(type(e).__name__, e.uid) for e in events] == [
        ("ReadinessChanged", "u1"),
        ("PodRemoved", "u2"),
        ("PodDiscovered", "u4"),
    ]
    assert set(cache.views) == {"u1", "u3", "u4"}


def test_cache_conditions_follow_the_api_semantics() -> None:
    entry = parse_slice(
        {
            "metadata": {"name": "s", "namespace": "ml", "labels": {"kubernetes.io/service-name": "chat"}},
            "addressType": "IPv4",
            "ports": [{"name": "metrics", "port": 9091}, {"name": "http", "port": 8012}],
            "endpoints": [
                {
                    "addresses": ["10.0.0.1"],
                    "targetRef": {"kind": "Pod", "name": "p1", "uid": "u1"},
                },  # unset: ready
                {
                    "addresses": ["10.0.0.2"],
                    "conditions": {"ready": False, "serving": True, "terminating": True},
                    "targetRef": {"kind": "Pod", "name": "p2", "uid": "u2"},
                },
                {
                    "addresses": ["10.0.0.3"],
                    "targetRef": {"kind": "Node", "name": "n", "uid": "u3"},
                },  # not a pod
                {"addresses": ["10.0.0.4"]},  # no targetRef: no UID
            ],
        },
        port_name="http",
    )
    assert set(entry.endpoints) == {"u1", "u2"}
    assert entry.endpoints["u1"].ready and entry.endpoints["u1"].port == 8012
    p2 = entry.endpoints["u2"]
    assert (p2.ready, p2.serving, p2.terminating) == (False, True, True)
    fqdn = parse_slice(
        {
            "metadata": {"name": "f"},
            "addressType": "FQDN",
            "ports": [{"port": 80}],
            "endpoints": [{"addresses": ["a.example"], "targetRef": {"uid": "u9"}}],
        }
    )
    assert fqdn.endpoints == {}


def test_cache_holds_an_endpoint_until_its_pod_is_known() -> None:
    cache, events = _cache_with(_meta(endpoint_slice("s", "chat", [endpoint("p1", "u1", "10.0.0.1")]), "1"))
    assert events == [] and cache.missing == {"u1": ("ml", "p1")}
    events = cache.pod_event("ADDED", pod("p1", "u1", concurrency=2))
    assert [type(e) for e in events] == [PodDiscovered] and events[0].concurrency == 2  # type: ignore[union-attr]
    assert cache.missing == {}
    # a pod that cannot be read: the slice's labels and the defaults
    events = cache.slice_event(
        "MODIFIED",
        _meta(
            endpoint_slice(
                "s",
                "chat",
                [endpoint("p1", "u1", "10.0.0.1"), endpoint("p5", "u5", "10.0.0.5")],
                labels={"serving.knative.dev/revision": "chat-00002"},
            ),
            "2",
        ),
    )
    assert events == [] and "u5" in cache.missing
    events = cache.pod_unavailable("u5")
    assert [(e.uid, e.revision, e.concurrency) for e in events] == [("u5", "chat-00002", 1)]  # type: ignore[union-attr]
    assert cache.pod_known("u5", PodMeta(revision=None, concurrency=3))[0].concurrency == 3  # type: ignore[union-attr]


def test_cache_resync_repeats_the_view_and_recent_removals() -> None:
    cache, _ = _cache_with(
        _meta(
            endpoint_slice(
                "s",
                "chat",
                [
                    endpoint("p1", "u1", "10.0.0.1"),
                    endpoint("p2", "u2", "10.0.0.2", ready=False, terminating=True),
                ],
            ),
            "1",
        ),
        pods=[pod("p1", "u1"), pod("p2", "u2"), pod("p3", "u3")],
    )
    cache.slice_event("ADDED", _meta(endpoint_slice("t", "chat", [endpoint("p3", "u3", "10.0.0.3")]), "2"))
    cache.slice_event("DELETED", _meta(endpoint_slice("t", "chat", []), "3"))
    assert [(type(e).__name__, e.uid) for e in cache.resync()] == [
        ("PodDiscovered", "u1"),
        ("PodDiscovered", "u2"),
        ("DrainStarted", "u2"),
        ("PodRemoved", "u3"),
    ]


# ---- against the API server (kmock) --------------------------------------------------------------

FAST = InformerSettings(
    namespace="ml",
    watch_timeout=30,
    read_timeout=1.0,
    connect_timeout=2.0,
    list_timeout=5.0,
    backoff_initial=0.05,
    backoff_max=0.3,
    pod_sync_timeout=2.0,
    pod_fetch_delay=0.2,
    resync_interval=0,
)


@contextlib.asynccontextmanager
async def running(
    kmock: Any, settings: InformerSettings = FAST, loader: Callable[[], Any] | None = None
) -> AsyncIterator[tuple[Informer, Collected]]:
    collected = Collected()
    informer = Informer(KubeApi(loader or (lambda: api_config(kmock))), collected, settings)
    task = asyncio.create_task(informer.run())
    try:
        yield informer, collected
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _assert_calls_are_granted(fake: FakeKube) -> None:
    groups = {"endpointslices": "discovery.k8s.io", "pods": ""}
    made = {(groups[r["resource"]], r["resource"], r["verb"]) for r in fake.requests}
    assert made <= API_CALLS, made - API_CALLS


async def test_initial_list(fake_kube: FakeKube, kmock: Any) -> None:
    fake_kube.put("pods", pod("p1", "u1", concurrency=4))
    fake_kube.put("pods", pod("p2", "u2"))
    fake_kube.put("pods", pod("p4", "u4", revision=None))
    fake_kube.put("pods", pod("p3", "u3", namespace="other"))
    fake_kube.put(
        "endpointslices",
        endpoint_slice(
            "chat-a",
            "chat",
            [endpoint("p1", "u1", "10.0.0.1"), endpoint("p2", "u2", "10.0.0.2", ready=False)],
        ),
    )
    fake_kube.put(
        "endpointslices",
        endpoint_slice(
            "embed-a",
            "embed",
            [endpoint("p4", "u4", "10.0.0.4")],
            labels={"serving.knative.dev/revision": "embed-00001"},
        ),
    )
    fake_kube.put(
        "endpointslices",
        endpoint_slice("other-svc", "other", [endpoint("p9", "u9", "10.0.0.9")], managed=False),
    )
    fake_kube.put(
        "endpointslices",
        endpoint_slice("chat-x", "chat", [endpoint("p3", "u3", "10.1.0.3")], namespace="other"),
    )
    settings = InformerSettings(**{**FAST.__dict__, "page_size": 1})
    async with running(kmock, settings) as (informer, got):
        await eventually(lambda: len(got.events) == 3, what="three pods discovered")
        await eventually(lambda: len(fake_kube.watch_requests("endpointslices")) >= 1, what="slices watched")
        await asyncio.sleep(0.2)
    by_uid = {e.uid: e for e in got.events}
    assert all(isinstance(e, PodDiscovered) and e.source is Source.INFORMER for e in got.events)
    assert (by_uid["u1"].ready, by_uid["u1"].concurrency, by_uid["u1"].revision) == (True, 4, "chat-v1")
    assert (by_uid["u2"].ready, by_uid["u2"].concurrency, by_uid["u2"].ip) == (False, 1, "10.0.0.2")
    assert (by_uid["u4"].revision, by_uid["u4"].port) == ("embed-00001", 8012)
    # paginated list of the namespace, with the label selector; pods were listed first
    lists = fake_kube.list_requests("endpointslices")
    assert [r["params"].get("limit") for r in lists] == ["1", "1"] and "continue" in lists[1]["params"]
    assert all(
        r["namespace"] == "ml" and r["params"]["labelSelector"] == "fastproxy.io/managed=true" for r in lists
    )
    assert fake_kube.requests.index(fake_kube.list_requests("pods")[0]) < fake_kube.requests.index(lists[0])
    # the watch starts at the list's resourceVersion, with bookmarks and a server-side timeout
    watch = fake_kube.watch_requests("endpointslices")[0]["params"]
    assert watch["resourceVersion"] == lists[0]["rv"] == lists[1]["rv"] == str(fake_kube.rv)
    assert watch["allowWatchBookmarks"] == "true" and 30 <= int(watch["timeoutSeconds"]) <= 33
    assert informer.slices.stats["lists"] == 1
    _assert_calls_are_granted(fake_kube)


async def test_adds_updates_deletes(fake_kube: FakeKube, kmock: Any) -> None:
    async with running(kmock) as (informer, got):
        await eventually(lambda: informer.slices.synced.is_set(), what="synced")
        fake_kube.put("pods", pod("p1", "u1", concurrency=2))
        fake_kube.put(
            "endpointslices",
            endpoint_slice("chat-a", "chat", [endpoint("p1", "u1", "10.0.0.1", ready=False)]),
        )
        await eventually(lambda: len(got.events) == 1, what="discovered")
        fake_kube.put("endpointslices", endpoint_slice("chat-a", "chat", [endpoint("p1", "u1", "10.0.0.1")]))
        await eventually(lambda: len(got.events) == 2, what="ready")
        fake_kube.put("pods", pod("p1", "u1", concurrency=3))
        await eventually(lambda: len(got.events) == 3, what="concurrency")
        fake_kube.put("pods", pod("p2", "u2"))
        fake_kube.put(
            "endpointslices",
            endpoint_slice(
                "chat-a", "chat", [endpoint("p1", "u1", "10.0.0.1"), endpoint("p2", "u2", "10.0.0.2")]
            ),
        )
        await eventually(lambda: len(got.events) == 4, what="second pod")
        fake_kube.put("endpointslices", endpoint_slice("chat-a", "chat", [endpoint("p2", "u2", "10.0.0.2")]))
        await eventually(lambda: len(got.events) == 5, what="first pod removed")
        fake_kube.delete("endpointslices", "chat-a")
        await eventually(lambda: len(got.events) == 6, what="slice deleted")
        await asyncio.sleep(0.1)
    assert [(type(e).__name__, e.uid) for e in got.events] == [
        ("PodDiscovered", "u1"),
        ("ReadinessChanged", "u1"),
        ("PodDiscovered", "u1"),
        ("PodDiscovered", "u2"),
        ("PodRemoved", "u1"),
        ("PodRemoved", "u2"),
    ]
    first, ready, resized = got.events[:3]
    assert isinstance(first, PodDiscovered) and not first.ready and first.concurrency == 2
    assert isinstance(ready, ReadinessChanged) and ready.ready
    assert isinstance(resized, PodDiscovered) and resized.concurrency == 3 and resized.ready
    assert informer.slices.stats["lists"] == 1
    _assert_calls_are_granted(fake_kube)


async def test_watch_that_ends_reconnects_from_the_last_resource_version(
    fake_kube: FakeKube, kmock: Any
) -> None:
    fake_kube.put("pods", pod("p1", "u1"))
    fake_kube.put("pods", pod("p2", "u2"))
    fake_kube.put("endpointslices", endpoint_slice("chat-a", "chat", [endpoint("p1", "u1", "10.0.0.1")]))
    async with running(kmock, InformerSettings(**{**FAST.__dict__, "read_timeout": 5.0})) as (informer, got):
        await eventually(lambda: len(got.events) == 1, what="discovered")
        fake_kube.put(
            "endpointslices",
            endpoint_slice("chat-b", "chat", [endpoint("p9", "u9", "10.0.0.9")], managed=False),
        )  # not ours, but the RV moves
        fake_kube.put(
            "endpointslices",
            endpoint_slice("chat-a", "chat", [endpoint("p1", "u1", "10.0.0.1", ready=False)]),
        )
        await eventually(lambda: len(got.events) == 2, what="readiness change")
        seen = informer.slices.resource_version
        watches = len(fake_kube.watch_requests("endpointslices"))
        fake_kube.end_watches()
        # changes while the informer reconnects are in the server's history after `seen`
        fake_kube.put(
            "endpointslices",
            endpoint_slice(
                "chat-a",
                "chat",
                [endpoint("p1", "u1", "10.0.0.1", ready=False), endpoint("p2", "u2", "10.0.0.2")],
            ),
        )
        await eventually(lambda: len(got.events) == 3, what="change made during the reconnect")
    assert isinstance(got.events[2], PodDiscovered) and got.events[2].uid == "u2"
    again = fake_kube.watch_requests("endpointslices")[watches]["params"]
    assert again["resourceVersion"] == seen != fake_kube.list_requests("endpointslices")[0]["rv"]
    assert len(fake_kube.list_requests("endpointslices")) == 1  # reconnected, not relisted


async def test_410_relists_and_diffs_without_emptying(fake_kube: FakeKube, kmock: Any) -> None:
    for i in range(1, 5):
        fake_kube.put("pods", pod(f"p{i}", f"u{i}"))
    fake_kube.put(
        "endpointslices",
        endpoint_slice(
            "chat-a", "chat", [endpoint("p1", "u1", "10.0.0.1"), endpoint("p2", "u2", "10.0.0.2")]
        ),
    )
    fake_kube.put("endpointslices", endpoint_slice("chat-b", "chat", [endpoint("p3", "u3", "10.0.0.3")]))
    async with running(kmock) as (informer, got):
        await eventually(lambda: len(got.events) == 3, what="discovered")
        got.clear()
        # changes that fall out of the watch cache: only a relist can show them
        fake_kube.put(
            "endpointslices",
            endpoint_slice("chat-a", "chat", [endpoint("p1", "u1", "10.0.0.1", ready=False)]),
            notify=False,
        )
        fake_kube.put(
            "endpointslices",
            endpoint_slice(
                "chat-b", "chat", [endpoint("p3", "u3", "10.0.0.3"), endpoint("p4", "u4", "10.0.0.4")]
            ),
            notify=False,
        )
        fake_kube.expire()
        await eventually(lambda: len(got.events) == 3, what="the relist's diff")
        await eventually(lambda: informer.slices.stats["watches"] >= 2, what="watching again")
        await asyncio.sleep(0.2)
    assert informer.slices.stats["relists"] >= 1 and informer.slices.stats["lists"] == 2
    assert sorted((type(e).__name__, e.uid) for e in got.events) == [
        ("PodDiscovered", "u4"),
        ("PodRemoved", "u2"),
        ("ReadinessChanged", "u1"),
    ]
    # u1 and u3 were present throughout: never removed, never rediscovered
    assert not [e for e in got.events if e.uid in ("u1", "u3") and not isinstance(e, ReadinessChanged)]
    assert set(informer.cache.views) == {"u1", "u3", "u4"}


async def test_silent_watch_is_recovered_by_the_read_timeout(fake_kube: FakeKube, kmock: Any) -> None:
    fake_kube.put("pods", pod("p1", "u1"))
    fake_kube.put("pods", pod("p2", "u2"))
    fake_kube.put("endpointslices", endpoint_slice("chat-a", "chat", [endpoint("p1", "u1", "10.0.0.1")]))
    fake_kube.go_silent("endpointslices")  # the first slice watch: open, and nothing ever arrives
    async with running(kmock) as (informer, got):
        await eventually(lambda: len(got.events) == 1, what="discovered by the list")
        fake_kube.put(
            "endpointslices",
            endpoint_slice(
                "chat-a", "chat", [endpoint("p1", "u1", "10.0.0.1"), endpoint("p2", "u2", "10.0.0.2")]
            ),
        )
        await eventually(lambda: len(got.events) == 2, what="change seen after the read timeout")
    assert informer.slices.stats["read_timeouts"] >= 1
    assert informer.slices.stats["lists"] == 1  # resumed from the last resourceVersion, no relist
    first, second = fake_kube.watch_requests("endpointslices")[:2]
    assert first["params"]["resourceVersion"] == second["params"]["resourceVersion"]


async def test_bookmarks_advance_the_resource_version(fake_kube: FakeKube, kmock: Any) -> None:
    fake_kube.put("pods", pod("p1", "u1"))
    fake_kube.put("endpointslices", endpoint_slice("chat-a", "chat", [endpoint("p1", "u1", "10.0.0.1")]))
    settings = InformerSettings(**{**FAST.__dict__, "read_timeout": 5.0})
    async with running(kmock, settings) as (informer, got):
        await eventually(lambda: len(got.events) == 1, what="discovered")
        await eventually(
            lambda: any(w.plural == "endpointslices" for w in fake_kube.watchers), what="watching"
        )
        before = informer.slices.resource_version
        bookmark = fake_kube.bookmark()
        await eventually(lambda: informer.slices.resource_version == bookmark, what="bookmark taken")
        assert int(bookmark) > int(before or 0)
        watches = len(fake_kube.watch_requests("endpointslices"))
        fake_kube.end_watches()
        await eventually(lambda: len(fake_kube.watch_requests("endpointslices")) > watches, what="rewatch")
    assert fake_kube.watch_requests("endpointslices")[watches]["params"]["resourceVersion"] == bookmark
    assert informer.slices.stats["bookmarks"] >= 1 and len(got.events) == 1  # a bookmark is not a change
    assert informer.slices.stats["lists"] == 1


async def test_endpoints_in_several_slices_are_one_pod(fake_kube: FakeKube, kmock: Any) -> None:
    fake_kube.put("pods", pod("p1", "u1"))
    fake_kube.put("pods", pod("p2", "u2"))
    fake_kube.put("endpointslices", endpoint_slice("chat-a", "chat", [endpoint("p1", "u1", "10.0.0.1")]))
    fake_kube.put(
        "endpointslices",
        endpoint_slice(
            "chat-b", "chat", [endpoint("p1", "u1", "10.0.0.1"), endpoint("p2", "u2", "10.0.0.2")]
        ),
    )
    async with running(kmock) as (_, got):
        await eventually(lambda: len(got.events) == 2, what="two pods")
        # the newest slice speaks for the pod
        fake_kube.put(
            "endpointslices",
            endpoint_slice(
                "chat-b",
                "chat",
                [endpoint("p1", "u1", "10.0.0.1", ready=False), endpoint("p2", "u2", "10.0.0.2")],
            ),
        )
        await eventually(lambda: len(got.events) == 3, what="readiness from the newest slice")
        # leaving one slice while another still lists it is not a removal
        fake_kube.put("endpointslices", endpoint_slice("chat-a", "chat", []))
        await asyncio.sleep(0.3)
        assert len(got.events) == 3
        fake_kube.put("endpointslices", endpoint_slice("chat-b", "chat", [endpoint("p2", "u2", "10.0.0.2")]))
        await eventually(lambda: len(got.events) == 4, what="removed from the last slice")
    assert [(type(e).__name__, e.uid) for e in got.events] == [
        ("PodDiscovered", "u1"),
        ("PodDiscovered", "u2"),
        ("ReadinessChanged", "u1"),
        ("PodRemoved", "u1"),
    ]


async def test_terminating_endpoints_drain(fake_kube: FakeKube, kmock: Any) -> None:
    fake_kube.put("pods", pod("p1", "u1"))
    fake_kube.put("pods", pod("p2", "u2"))
    fake_kube.put("endpointslices", endpoint_slice("chat-a", "chat", [endpoint("p1", "u1", "10.0.0.1")]))
    async with running(kmock) as (_, got):
        await eventually(lambda: len(got.events) == 1, what="discovered")
        fake_kube.put(
            "endpointslices",
            endpoint_slice(
                "chat-a",
                "chat",
                [
                    endpoint("p1", "u1", "10.0.0.1", ready=False, serving=True, terminating=True),
                    endpoint("p2", "u2", "10.0.0.2", ready=False, serving=False, terminating=True),
                ],
            ),
        )
        await eventually(lambda: len(got.events) == 4, what="drains")
        fake_kube.put(
            "endpointslices",
            endpoint_slice(
                "chat-a",
                "chat",
                [endpoint("p1", "u1", "10.0.0.1", ready=False, serving=False, terminating=True)],
            ),
        )
        await eventually(lambda: len(got.events) == 5, what="p2 gone")
        fake_kube.put("endpointslices", endpoint_slice("chat-a", "chat", []))
        await eventually(lambda: len(got.events) == 6, what="p1 gone")
    assert [(type(e).__name__, e.uid) for e in got.events] == [
        ("PodDiscovered", "u1"),
        ("DrainStarted", "u1"),  # serving while terminating: drain, no readiness
        ("PodDiscovered", "u2"),
        ("DrainStarted", "u2"),  # first seen terminating: discovered, then drained
        ("PodRemoved", "u2"),
        ("PodRemoved", "u1"),  # no longer serving changes nothing for a draining pod
    ]
    assert isinstance(got.events[1], DrainStarted) and "serving" in got.events[1].reason
    assert isinstance(got.events[2], PodDiscovered) and not got.events[2].ready


async def test_unauthorized_reloads_credentials(fake_kube: FakeKube, kmock: Any) -> None:
    fake_kube.put("pods", pod("p1", "u1"))
    fake_kube.put("endpointslices", endpoint_slice("chat-a", "chat", [endpoint("p1", "u1", "10.0.0.1")]))
    tokens = iter(["expired-token", "expired-token", "good-token"])
    loads: list[str] = []

    def loader() -> Any:
        token = next(tokens, "good-token")
        loads.append(token)
        return api_config(kmock, token)

    async with running(kmock, loader=loader) as (informer, got):
        await eventually(lambda: len(got.events) == 1, what="discovered with fresh credentials")
    assert loads[:3] == ["expired-token", "expired-token", "good-token"]
    assert any(r["status"] == 401 for r in fake_kube.requests)
    assert informer.pods.stats["reloads"] + informer.slices.stats["reloads"] >= 2


async def test_a_pod_outside_the_pod_watch_is_read_by_get(fake_kube: FakeKube, kmock: Any) -> None:
    fake_kube.put("pods", pod("p1", "u1", concurrency=8))  # not matched by the pod label selector
    fake_kube.put(
        "endpointslices",
        endpoint_slice(
            "chat-a", "chat", [endpoint("p1", "u1", "10.0.0.1"), endpoint("gone", "u7", "10.0.0.7")]
        ),
    )
    settings = InformerSettings(**{**FAST.__dict__, "pod_label_selector": "fastproxy.io/watched=true"})
    async with running(kmock, settings) as (informer, got):
        await eventually(lambda: len(got.events) == 2, what="both pods, one read by GET, one unreadable")
    by_uid = {e.uid: e for e in got.events}
    assert by_uid["u1"].concurrency == 8 and by_uid["u1"].revision == "chat-v1"
    assert by_uid["u7"].concurrency == 1 and by_uid["u7"].revision == "chat"  # 404: slice labels, defaults
    assert sorted(r["status"] for r in fake_kube.requests if r["verb"] == "get") == [200, 404]
    assert informer.stats["pod_gets"] == 2
    _assert_calls_are_granted(fake_kube)


async def test_only_the_leader_submits_and_each_new_term_resubmits_the_view(
    fake_kube: FakeKube, kmock: Any
) -> None:
    for i in (1, 2, 3):
        fake_kube.put("pods", pod(f"p{i}", f"u{i}"))
    fake_kube.put(
        "endpointslices",
        endpoint_slice(
            "chat-a", "chat", [endpoint("p1", "u1", "10.0.0.1"), endpoint("p2", "u2", "10.0.0.2")]
        ),
    )
    term: list[int | None] = [None]  # a standby
    got = Collected()
    informer = Informer(KubeApi(lambda: api_config(kmock)), got, FAST, active=lambda: term[0])
    task = asyncio.create_task(informer.run())
    try:
        await eventually(lambda: len(informer.cache.views) == 2, what="the standby's cache is warm")
        fake_kube.put("endpointslices", endpoint_slice("chat-a", "chat", [endpoint("p1", "u1", "10.0.0.1")]))
        await eventually(lambda: "u2" not in informer.cache.views, what="p2 gone while standing by")
        await asyncio.sleep(0.6)
        assert got.events == []  # a standby says nothing
        term[0] = 7  # leader, epoch 7: the whole view, and the removal it saw while standing by
        await eventually(lambda: len(got.events) == 2, what="the view submitted")
        assert sorted((type(e).__name__, e.uid) for e in got.events) == [
            ("PodDiscovered", "u1"),
            ("PodRemoved", "u2"),
        ]
        got.clear()
        fake_kube.put(
            "endpointslices",
            endpoint_slice(
                "chat-a", "chat", [endpoint("p1", "u1", "10.0.0.1"), endpoint("p3", "u3", "10.0.0.3")]
            ),
        )
        await eventually(lambda: len(got.events) == 1, what="a change, as it happens")
        term[0] = 8  # a new term (say Valkey restarted empty): everything again
        await eventually(lambda: len(got.events) == 4, what="the view submitted again")
        assert [(type(e).__name__, e.uid) for e in got.events[1:]] == [
            ("PodDiscovered", "u1"),
            ("PodDiscovered", "u3"),
            ("PodRemoved", "u2"),
        ]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_failed_submit_is_retried_with_the_current_view(fake_kube: FakeKube, kmock: Any) -> None:
    fake_kube.put("pods", pod("p1", "u1"))
    fake_kube.put("pods", pod("p2", "u2"))
    fake_kube.put("endpointslices", endpoint_slice("chat-a", "chat", [endpoint("p1", "u1", "10.0.0.1")]))
    got = Collected()
    failures = [2]

    async def flaky(events: list[Any]) -> None:
        if failures[0]:
            failures[0] -= 1
            raise ConnectionError("Valkey is restarting")
        await got(events)

    informer = Informer(KubeApi(lambda: api_config(kmock)), flaky, FAST)
    task = asyncio.create_task(informer.run())
    try:
        await eventually(lambda: informer.stats["submit_errors"] == 2, what="two failures")
        fake_kube.put("endpointslices", endpoint_slice("chat-a", "chat", [endpoint("p2", "u2", "10.0.0.2")]))
        await eventually(lambda: {e.uid for e in got.events} == {"u1", "u2"}, what="delivered after all")
        await eventually(lambda: informer.cache.views.keys() == {"u2"}, what="p1 gone")
        await eventually(lambda: any(isinstance(e, PodRemoved) for e in got.events), what="its removal")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    removed = [e.uid for e in got.events if isinstance(e, PodRemoved)]
    assert "u1" in removed and "u2" not in removed


# ---- end to end: fastproxy writer --kubernetes -----------------------------------------------------


def _kubeconfig(path: Path, server: str) -> Path:
    path.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: test\n"
        f"clusters:\n- name: kmock\n  cluster:\n    server: {server}\n"
        "users:\n- name: informer\n  user:\n    token: good-token\n"
        "contexts:\n- name: test\n  context:\n    cluster: kmock\n    user: informer\n    namespace: ml\n"
    )
    return path


@pytest.mark.timeout(60)
async def test_writer_with_kubernetes_commits_the_pods(
    fake_kube: FakeKube, kmock: Any, tmp_path: Path
) -> None:
    from statesync.connect import connect
    from statesync.embedded import EmbeddedValkey
    from statesync.keys import Keys
    from statesync.schema import PodState, decode_pod

    fake_kube.put("pods", pod("p1", "u1", concurrency=2))
    fake_kube.put("pods", pod("p2", "u2"))
    fake_kube.put(
        "endpointslices",
        endpoint_slice(
            "chat-a",
            "chat",
            [endpoint("p1", "u1", "127.0.9.1"), endpoint("p2", "u2", "127.0.9.2", ready=False)],
        ),
    )
    kubeconfig = _kubeconfig(tmp_path / "kubeconfig", str(kmock.url).rstrip("/"))
    with EmbeddedValkey() as valkey:
        valkey.start()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fastproxy.cli",
                "writer",
                "--valkey",
                valkey.url,
                "--lease-ttl",
                "1",
                "--kubernetes",
                "--kube-namespace",
                "ml",
                "--kubeconfig",
                str(kubeconfig),
                "--log-level",
                "warning",
            ],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stderr=subprocess.PIPE,
        )
        client = connect(valkey.url)
        keys = Keys()

        async def pods() -> dict[str, Any]:
            raw = await client.hgetall(keys.pods)
            return {k.decode(): decode_pod(v) for k, v in raw.items()}

        try:
            state: dict[str, Any] = {}

            async def committed(want: Callable[[dict[str, Any]], bool]) -> None:
                nonlocal state
                deadline = asyncio.get_running_loop().time() + 30
                while asyncio.get_running_loop().time() < deadline:
                    state = await pods()
                    if want(state):
                        return
                    assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                    await asyncio.sleep(0.05)
                raise AssertionError(f"writer state: {state}")

            await committed(lambda s: set(s) == {"u1", "u2"})
            assert state["u1"].state is PodState.READY and state["u1"].concurrency == 2
            assert state["u2"].state is PodState.PENDING and state["u1"].source is Source.INFORMER
            fake_kube.put(
                "endpointslices", endpoint_slice("chat-a", "chat", [endpoint("p2", "u2", "127.0.9.2")])
            )
            await committed(lambda s: s["u1"].state is PodState.REMOVED and s["u2"].state is PodState.READY)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            await client.aclose()
        assert proc.returncode == 0, proc.stderr.read().decode() if proc.stderr else ""

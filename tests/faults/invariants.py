"""The invariants every fault scenario ends with; each check returns a list of violations.

Theory of operation
-------------------
A scenario runs load through a ``SystemUnderTest``, injects its fault, lets the system recover,
then calls ``check_all``. Each check reads the real system (the pods' id files and control stats,
the routers' admin API and ``/proc/<pid>/fd``, Valkey's committed state) and returns human-readable
violation strings; the scenario reports their number in the fault table and then asserts there are
none. The waiting checks (drained, fds, convergence) wait for their condition under a deadline and
only then report what is still wrong: "back to where they started" is allowed to take a moment.

- concurrency:   no pod ever had more requests in flight than its concurrency (``violations`` in
                 each pod's stats, live pods now and killed pods as saved just before the kill)
- executed once: no ``x-request-id`` appears twice across all pods' executed-id files; every
                 request a client saw succeed was executed (a 2xx no pod executed is a response
                 from nowhere, or someone else's)
- client view:   no truncated body presented as complete, no wrong id, no request left hanging
                 (``loadgen.VIOLATION_KINDS``)
- drained:       every live router's in-flight and queued counts back to 0, no client connection
- fds:           every live router's open fds back to at most its count before the scenario (and
                 its asyncio tasks, when its admin API reports ``tasks`` in ``/v1/state``)
- converged:     every live router's snapshot (epoch, version) equals Valkey's committed one and
                 its pods' states equal the stored records, which match the expected truth
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import httpx

from statesync.schema import decode_pod
from tests.faults.harness import KEYS, Router, SystemUnderTest
from tests.faults.loadgen import LoadGenerator


async def _settle(check: Callable[[], Any], timeout: float) -> list[str]:
    """Re-run ``check`` (returning violations) until it returns none or the deadline passes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            problems: list[str] = await check()
        except (httpx.HTTPError, OSError) as exc:
            problems = [f"check failed: {exc!r}"]
        if not problems or loop.time() > deadline:
            return problems
        await asyncio.sleep(0.05)


async def concurrency_violations(sut: SystemUnderTest) -> list[str]:
    out = []
    for pod in sut.pods:
        stats = pod.last_stats
        if pod.proc is not None and pod.proc.alive:
            with contextlib.suppress(httpx.HTTPError):  # stopped: the saved figures are what we have
                stats = await pod.stats()
        if stats.get("violations"):
            out.append(f"{pod.uid}: {stats['violations']} times over its concurrency {pod.concurrency}")
    return out


def executed_once(sut: SystemUnderTest, loads: Iterable[LoadGenerator]) -> list[str]:
    executed = Counter(rid for pod in sut.pods for rid in pod.executed_ids())
    out = [f"request {rid} executed {n} times" for rid, n in executed.items() if n > 1]
    for load in loads:
        missing = [rid for rid in load.ids("ok") if rid not in executed]
        out += [f"request {rid} succeeded but no pod executed it" for rid in missing]
        out += load.violations()
    return out


async def _router_busy(router: Router) -> list[str]:
    revisions = await router.get("/v1/revisions")
    state = await router.get("/v1/state")
    out = [
        f"{router.name}: {r['revision']} inflight={r['inflight']} queued={r['queued']}"
        for r in revisions
        if r["inflight"] or r["queued"]
    ]
    out += [
        f"{router.name}: pod {p['uid']} inflight={p['inflight']}"
        for p in await router.get("/v1/pods")
        if p["inflight"]
    ]
    if state["connections"]:
        out.append(f"{router.name}: {state['connections']} client connections still open")
    return out


async def routers_drained(sut: SystemUnderTest, timeout: float = 10.0) -> list[str]:
    async def check() -> list[str]:
        out: list[str] = []
        for router in sut.routers:
            if router.proc.alive:
                out += await _router_busy(router)
        return out

    return await _settle(check, timeout)


async def fds_back(sut: SystemUnderTest, baseline: dict[str, int], timeout: float = 15.0) -> list[str]:
    """Pooled upstream connections close after the pool's idle timeout (2 s), so this may wait."""

    async def check() -> list[str]:
        return [
            f"{r.name}: {r.fds(sut.valkey.port)} fds open, {baseline[r.name]} before"
            for r in sut.routers
            if r.proc.alive and r.name in baseline and r.fds(sut.valkey.port) > baseline[r.name]
        ]

    return await _settle(check, timeout)


def fd_baseline(sut: SystemUnderTest) -> dict[str, int]:
    return {r.name: r.fds(sut.valkey.port) for r in sut.routers if r.proc.alive}


async def tasks_back(sut: SystemUnderTest, baseline: dict[str, int], timeout: float = 10.0) -> list[str]:
    async def check() -> list[str]:
        out = []
        for name, tasks in (await sut.router_tasks()).items():
            if name in baseline and tasks > baseline[name]:
                out.append(f"{name}: {tasks} asyncio tasks, {baseline[name]} before")
        return out

    return await _settle(check, timeout)


async def converged(
    sut: SystemUnderTest, expected: dict[str, set[str]] | None = None, timeout: float = 20.0
) -> list[str]:
    """Routers == Valkey's committed state, and Valkey's pod states within ``expected`` (uid -> states)."""
    assert sut.client is not None
    client = sut.client

    async def check() -> list[str]:
        version = int(await client.get(KEYS.version) or 0)
        epoch = int(await client.get(KEYS.state_epoch) or 0)
        stored = {k.decode(): decode_pod(v) for k, v in (await client.hgetall(KEYS.pods)).items()}
        out = []
        for uid, states in (expected or {}).items():
            state = stored[uid].state.value if uid in stored else "absent"
            if state not in states:
                out.append(f"valkey: {uid} is {state}, expected one of {sorted(states)}")
        for router in sut.routers:
            if not router.proc.alive:
                continue
            view = await router.get("/v1/state")
            if (view["epoch"], view["version"]) != (epoch, version):
                out.append(
                    f"{router.name}: at epoch {view['epoch']} v{view['version']}, valkey at {epoch} v{version}"
                )
            pods = {p["uid"]: p["state"] for p in await router.get("/v1/pods")}
            truth = {uid: pod.state.value for uid, pod in stored.items()}
            if pods != truth:
                out.append(f"{router.name}: pods {pods} != valkey {truth}")
        return out

    return await _settle(check, timeout)


async def check_all(
    sut: SystemUnderTest,
    loads: Iterable[LoadGenerator],
    baseline: dict[str, int],
    expected: dict[str, set[str]] | None = None,
    converge_within: float = 20.0,
) -> list[str]:
    loads = list(loads)
    return [
        *await concurrency_violations(sut),
        *executed_once(sut, loads),
        *await routers_drained(sut),
        *await fds_back(sut, baseline),
        *await tasks_back(sut, sut.tasks_at_start),
        *await converged(sut, expected, converge_within),
    ]


def error_kinds(*loads: LoadGenerator) -> dict[str, int]:
    total: Counter[str] = Counter()
    for load in loads:
        total.update(load.errors())
    return dict(total)

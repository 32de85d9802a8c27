"""The whole system as real processes, for the fault scenarios.

Theory of operation
-------------------
``SystemUnderTest`` (an async context manager) starts, as child processes of the test:

- one valkey-server (``EmbeddedValkey``: pause = SIGSTOP, resume, restart empty on the same port),
- two ``fastproxy writer`` processes (leader + standby, lease ttl 1 s),
- N pods: ``python -m fastproxy.devtools.upstream --ids-file ...``, each on its own loopback
  address, each appending the ``x-request-id`` of every request it executes to its own file (the
  record survives a SIGKILL of the pod). Several routers can only respect a pod's concurrency if
  the pod side refuses when full, so by default the app plays the sidecar's refusal
  (``--sidecar-busy``) and routers speak the sidecar protocol; with ``sidecars=True`` a real
  ``fastproxy sidecar`` process fronts each app (and reports its readiness to the writer),
  optionally ``fault_proxies=True`` puts a ``FaultProxy`` in front of each pod,
- M ``fastproxy router --valkey`` processes with admin listeners (bearer token from a file).

It then plays the informer: it appends ``RouteChanged`` and ``PodDiscovered`` events to the
writers' stream and waits (under a deadline) until every router routes to every pod. Handles:
``pods[i].kill()/stop()/cont()/restart()``, ``routers[i]``, ``writers``, ``valkey`` and
``leader()``. ``__aexit__`` kills every child, reaps it, and asserts none is left behind (no pid
of ours alive, no new child of the test process).

Every child's stdout and stderr are drained into ``lines`` by a task, so a full pipe never blocks
a child and a failing test can print what each process said.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import valkey.asyncio as avalkey

from statesync.connect import connect
from statesync.embedded import EmbeddedValkey
from statesync.keys import Keys
from statesync.schema import PodDiscovered, Route, RouteChanged, Source, WeightedRevision
from statesync.writer import submit
from tests.faults.faultproxy import FaultProxy
from tests.procs import START, Proc

FASTPROXY = [sys.executable, "-m", "fastproxy.cli"]
UPSTREAM = [sys.executable, "-m", "fastproxy.devtools.upstream"]
KEYS = Keys()
TOKEN = "fault-harness-token"
T = TypeVar("T")


async def poll(check: Callable[[], Awaitable[T]], timeout: float, what: str, interval: float = 0.02) -> T:
    """``check()`` until truthy (returned) under a deadline; there is no event to wait on."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = await check()
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s (last: {result!r})")
        await asyncio.sleep(interval)


def _children_of(pid: int) -> set[int]:
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.add(int(entry))
    return out


class Pod:
    """One inference pod: an app-server process on its own loopback address."""

    def __init__(
        self,
        uid: str,
        ip: str,
        concurrency: int,
        ids_file: Path,
        sidecar_busy: bool,
        sidecar_of: str | None = None,
    ) -> None:
        self.sidecar_busy = sidecar_busy
        # With a Valkey URL here, a real ``fastproxy sidecar`` process fronts the app and reports it.
        self.sidecar_of = sidecar_of
        self.sidecar: Proc | None = None
        self.sidecar_port = 0
        self.revision = "chat-v1"
        self.uid = uid
        self.ip = ip
        self.port = 0
        self.concurrency = concurrency
        self.ids_file = ids_file
        self.proc: Proc | None = None
        self.last_stats: dict[str, Any] = {}  # kept from before a kill: the counters die with it
        self.incarnations: list[Proc] = []
        self.proxy: FaultProxy | None = None  # when set, routers reach the pod through it

    @property
    def advertised(self) -> tuple[str, int]:
        """The address the routers are told: the fault proxy's, or the sidecar's, or the app's."""
        if self.proxy is not None and self.proxy.address is not None:
            return self.proxy.address
        if self.sidecar is not None:
            return self.ip, self.sidecar_port
        return self.ip, self.port

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"

    async def start(self) -> None:
        self.proc = await Proc.start(
            f"pod {self.uid}", *UPSTREAM, "--listen", f"{self.ip}:{self.port}",
            "--concurrency", str(self.concurrency), "--ids-file", str(self.ids_file),
            *(("--sidecar-busy",) if self.sidecar_busy else ()),
        )  # fmt: skip
        self.incarnations.append(self.proc)
        words = await self.proc.listening()
        self.port = int(words[1].rsplit(":", 1)[1])
        if self.sidecar_of is not None:
            self.sidecar = await Proc.start(
                f"sidecar {self.uid}", *FASTPROXY, "sidecar", "--listen", f"{self.ip}:{self.sidecar_port}",
                "--admin", f"{self.ip}:0", "--app", self.address, "--concurrency", str(self.concurrency),
                "--readiness-path", "/ready", "--valkey", self.sidecar_of, "--pod-uid", self.uid,
                "--pod-ip", self.ip, "--revision", self.revision, "--namespace", "ml",
                "--report-interval", "2", "--log-level", "warning",
            )  # fmt: skip
            self.incarnations.append(self.sidecar)
            words = await self.sidecar.listening()
            self.sidecar_port = int(words[1].rsplit(":", 1)[1])

    async def stats(self, timeout: float = 5.0) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=timeout) as http:
            stats: dict[str, Any] = (await http.get(f"http://{self.address}/control/stats")).json()
        return stats

    async def save_stats(self) -> None:
        with contextlib.suppress(httpx.HTTPError):
            self.last_stats = await self.stats(timeout=2.0)

    async def kill(self) -> None:
        """The whole pod dies: its app and, if it has one, its sidecar."""
        assert self.proc is not None
        await self.save_stats()
        await self.proc.kill()
        if self.sidecar is not None:
            await self.sidecar.kill()

    def stop(self) -> None:
        """SIGSTOP the app (a sidecar, if any, keeps running and sees its probes time out)."""
        assert self.proc is not None
        self.proc.stop()

    def cont(self) -> None:
        assert self.proc is not None
        self.proc.cont()

    async def restart(self) -> None:
        """A new process on the same address (the pod's container restarted)."""
        if self.proc is not None and (self.proc.alive or (self.sidecar is not None and self.sidecar.alive)):
            await self.kill()
        await self.start()

    def executed_ids(self) -> list[str]:
        try:
            return self.ids_file.read_text().split()
        except FileNotFoundError:
            return []


class Router:
    def __init__(self, name: str, proc: Proc, port: int, admin_port: int) -> None:
        self.name = name
        self.proc = proc
        self.port = port
        self.admin = f"http://127.0.0.1:{admin_port}"

    async def get(self, path: str) -> Any:
        async with httpx.AsyncClient(timeout=5) as http:
            response = await http.get(self.admin + path, headers={"Authorization": f"Bearer {TOKEN}"})
            response.raise_for_status()
            return response.json()

    def fds(self, exclude_port: int | None = None) -> int:
        """Open fds, not counting TCP sockets to ``exclude_port`` (the Valkey clients, which the
        state follower and report forwarder open lazily and re-open by design)."""
        pid = self.proc.pid
        links = []
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        if exclude_port is None:
            return len(links)
        excluded = set()
        with open(f"/proc/{pid}/net/tcp") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[2].rsplit(":", 1)[1], 16) == exclude_port:
                    excluded.add(f"socket:[{fields[9]}]")
        return sum(1 for link in links if link not in excluded)


def pod_addresses(n: int) -> list[str]:
    """Distinct loopback addresses away from those other tests hand out (127.0.1-99.x)."""
    picked: set[str] = set()
    while len(picked) < n:
        picked.add(f"127.1{random.randint(10, 99)}.{random.randint(0, 255)}.{random.randint(2, 250)}")
    return sorted(picked)


class SystemUnderTest:
    def __init__(
        self,
        *,
        pods: int = 3,
        pod_concurrency: int = 1,
        routers: int = 2,
        revision: str = "chat-v1",
        router_args: tuple[str, ...] = (),
        sidecar_busy: bool = True,
        fault_proxies: bool = False,
        sidecars: bool = False,
    ) -> None:
        self.fault_proxies = fault_proxies
        self.sidecars = sidecars
        self.n_pods = pods
        self.n_routers = routers
        self.pod_concurrency = pod_concurrency
        self.revision = revision
        # Pods refuse at the head when full (the sidecar's protocol, played by the app) and routers
        # speak it: with several routers, only the pod side can hold the authoritative count.
        self.sidecar_busy = sidecar_busy and not sidecars  # real sidecars do the refusing
        self.router_args = (*(("--sidecar-protocol",) if sidecar_busy or sidecars else ()), *router_args)
        self.valkey = EmbeddedValkey()
        self._dir = tempfile.TemporaryDirectory(prefix="fastproxy-faults-")
        self.dir = Path(self._dir.name)
        self.pods: list[Pod] = []
        self.routers: list[Router] = []
        self.writers: dict[str, Proc] = {}
        self.procs: list[Proc] = []
        self.client: avalkey.Valkey | None = None
        self._children_before: set[int] = set()
        self.tasks_at_start: dict[str, int] = {}  # routers' asyncio tasks once routing (when reported)

    # -- lifecycle -------------------------------------------------------------------------------

    async def __aenter__(self) -> SystemUnderTest:
        self._children_before = _children_of(os.getpid())
        try:
            await asyncio.to_thread(self.valkey.start)
            self.client = connect(self.valkey.url)
            for wid in ("wa", "wb"):
                proc = await Proc.start(
                    wid, *FASTPROXY, "writer", "--valkey", self.valkey.url, "--id", wid, "--lease-ttl", "1"
                )
                self.writers[wid] = proc
                self.procs.append(proc)
            # Everything starts at once: each Python process spends ~1 s importing on this box.
            self.pods = [
                Pod(f"pod-{i}", ip, self.pod_concurrency, self.dir / f"ids-pod-{i}", self.sidecar_busy,
                    self.valkey.url if self.sidecars else None)
                for i, ip in enumerate(pod_addresses(self.n_pods))
            ]  # fmt: skip
            token = self.dir / "token"
            token.write_text(TOKEN)
            await asyncio.gather(
                *(pod.start() for pod in self.pods),
                *(self.start_router(f"router-{i}", token) for i in range(self.n_routers)),
            )
            self.routers.sort(key=lambda r: r.name)
            for pod in self.pods:
                if self.fault_proxies:
                    pod.proxy = FaultProxy((pod.ip, pod.port))
                    await pod.proxy.start(pod_addresses(1)[0], 0)
            await self.register()
            await self.wait_routed()
            self.tasks_at_start = await self.router_tasks()
        except BaseException:
            await self.close()
            raise
        return self

    async def start_router(self, name: str, token: Path) -> Router:
        proc = await Proc.start(
            name, *FASTPROXY, "router", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
            "--valkey", self.valkey.url, "--admin-token-file", str(token), "--instance", name,
            "--log-level", "warning", *self.router_args,
        )  # fmt: skip
        self.procs.append(proc)
        words = await proc.listening()
        router = Router(name, proc, int(words[1].rsplit(":", 1)[1]), int(words[3].rsplit(":", 1)[1]))
        self.routers.append(router)
        return router

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        all_procs = [*self.procs, *(p for pod in self.pods for p in pod.incarnations)]
        await asyncio.gather(*(p.close() for p in all_procs), return_exceptions=True)
        for pod in self.pods:
            if pod.proxy is not None:
                await pod.proxy.close()
        if self.client is not None:
            await self.client.aclose()
        await asyncio.to_thread(self.valkey.close)
        self._dir.cleanup()
        alive = [p.name for p in all_procs if p.alive]
        assert not alive, f"child processes not reaped: {alive}"
        leaked = _children_of(os.getpid()) - self._children_before
        assert not leaked, f"child processes left behind: {sorted(leaked)}"

    # -- state -----------------------------------------------------------------------------------

    def route(self) -> Route:
        return Route(service="chat", revisions=(WeightedRevision(revision=self.revision, weight=100),))

    def discovered(self, pod: Pod) -> PodDiscovered:
        return PodDiscovered(
            uid=pod.uid, source=Source.INFORMER, at=time.time(), namespace="ml", revision=self.revision,
            ip=pod.advertised[0], port=pod.advertised[1], concurrency=pod.concurrency, ready=True,
        )  # fmt: skip

    async def register(self) -> None:
        """What the informer does: the route and every pod, through the writers' event stream."""
        assert self.client is not None
        await submit(self.client, [RouteChanged(route=self.route(), at=time.time()),
                                   *(self.discovered(p) for p in self.pods)])  # fmt: skip

    async def router_pods(self, router: Router) -> dict[str, dict[str, Any]]:
        return {p["uid"]: p for p in await router.get("/v1/pods")}

    async def wait_routed(self, timeout: float = START) -> None:
        """Every router has every pod Ready and not excluded."""
        uids = {p.uid for p in self.pods}

        async def all_routed() -> bool:
            for router in self.routers:
                try:
                    pods = await self.router_pods(router)
                except httpx.HTTPError:
                    return False
                if not all(
                    u in pods and pods[u]["state"] == "ready" and not pods[u]["excluded"] for u in uids
                ):
                    return False
            return True

        try:
            await poll(all_routed, timeout, "every router routing to every pod")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.outputs()}") from None

    async def router_tasks(self) -> dict[str, int]:
        """Each live router's asyncio task count, where its admin API reports one (``tasks`` in
        ``/v1/state``; routers that do not report it are left out)."""
        out = {}
        for router in self.routers:
            if router.proc.alive:
                state = await router.get("/v1/state")
                if "tasks" in state:
                    out[router.name] = int(state["tasks"])
        return out

    async def leader(self) -> str | None:
        assert self.client is not None
        raw = await self.client.get(KEYS.lease)
        return raw.decode().rpartition(":")[0] if raw is not None else None

    def outputs(self) -> str:
        return "\n".join(p.output for p in self.procs)

    @property
    def ports(self) -> list[int]:
        return [r.port for r in self.routers if r.proc.alive]

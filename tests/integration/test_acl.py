"""Valkey ACL users per role (``statesync.acl``) against a real valkey-server and the real components.

The real writer, StateFollower, ReportForwarder, node agent (its Valkey side: a stand-in probe, as
the kernel part is not what is tested) and sidecar process run under their own users and do their
whole job; then each user is shown to be refused (NOPERM) for everything its role must not do.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shlex
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import valkey
import valkey.asyncio as avalkey
from valkey.exceptions import NoPermissionError

from fastproxy.config import RouterConfig
from fastproxy.router import Router
from probes.agent import Agent
from statesync.acl import ROLES, apply_users, default_username, glob_escape, role_rules, setuser_args
from statesync.connect import connect
from statesync.embedded import EmbeddedValkey
from statesync.keys import EVENTS_GROUP, Keys
from statesync.schema import (
    ConnectFailed,
    ConnectFailureKind,
    PodState,
    Route,
    RouteChanged,
    Source,
    WeightedRevision,
    decode_delta,
    decode_event,
)
from statesync.subscriber import ReportForwarder, StateFollower
from statesync.writer import Writer, submit
from tests.conftest import next_pod_address, wait_for

PASSWORDS = {role: f"pw-{role}-{i}" for i, role in enumerate(ROLES)}
KEYS = Keys("fpacl")


class AclValkey:
    """A real server with the four role users; the default user stays the test's admin."""

    def __init__(self) -> None:
        self.server = EmbeddedValkey().start()
        self.admin = valkey.Valkey(host=self.server.host, port=self.server.port)

    def url(self, role: str) -> str:
        user = default_username(role, KEYS)
        return f"valkey://{user}:{PASSWORDS[role]}@{self.server.host}:{self.server.port}/0"

    def sync_client(self, role: str) -> valkey.Valkey:
        return valkey.Valkey(
            host=self.server.host,
            port=self.server.port,
            username=default_username(role, KEYS),
            password=PASSWORDS[role],
        )


@pytest.fixture
async def acl() -> AsyncIterator[AclValkey]:
    setup = AclValkey()
    try:
        admin = avalkey.Valkey(host=setup.server.host, port=setup.server.port)
        await apply_users(admin, PASSWORDS, KEYS)
        await admin.aclose()
        yield setup
    finally:
        setup.admin.close()
        setup.server.close()


class StandInProbe:
    """The agent's kernel side is not under test here: only its Valkey traffic is."""

    bpf = None
    attached = False
    load_seconds = 0.0

    def __init__(self) -> None:
        self.watching: dict[bytes, int] = {}

    def set_watch(self, wanted: dict[bytes, int]) -> tuple[int, int]:
        self.watching = dict(wanted)
        return len(wanted), 0


def agent_args(url: str) -> argparse.Namespace:
    return argparse.Namespace(
        namespace=KEYS.ns, node="node-acl", watch=None, threshold=1, window=1.0, abort_min=0.2,
        early_warning=0, refresh=0.2, sweep=1.0, valkey=url, ready_file=None,
    )  # fmt: skip


async def spawn(*args: str) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
    assert line.startswith("listening "), line
    return proc, line.split()[1]


async def test_every_component_does_its_job_under_its_own_user(acl: AclValkey) -> None:
    loop = asyncio.get_running_loop()
    writer = Writer(connect(acl.url("writer")), keys=KEYS, writer_id="w-acl", lease_ttl=2)
    router = Router(RouterConfig(instance="router-acl"), loop)
    follower = StateFollower(router, acl.url("router"), keys=KEYS)
    forwarder = ReportForwarder(router, acl.url("router"), keys=KEYS)
    agent = Agent(agent_args(acl.url("agent")), probe=StandInProbe())  # type: ignore[arg-type]
    agent.client = connect(acl.url("agent"))
    tasks = [asyncio.create_task(t) for t in (writer.run(), follower.run(), forwarder.run())]
    procs: list[asyncio.subprocess.Process] = []
    try:
        # The informer / --routes path of the writer process appends under the writer's user.
        route = Route(service="chat", revisions=(WeightedRevision(revision="chat-v1", weight=100),))
        await submit(writer.client, [RouteChanged(route=route, at=time.time())], KEYS)
        await wait_for(lambda: "chat" in router.snapshot.routes, timeout=10, what="route reached the router")
        assert not router.stale

        # A real sidecar process pushes its pod's readiness under the sidecar user.
        ip = next_pod_address()
        app, app_addr = await spawn("-m", "fastproxy.devtools.upstream", "--listen", f"{ip}:0")
        procs.append(app)
        sidecar, _ = await spawn(
            "-m", "fastproxy.cli", "sidecar", "--listen", f"{ip}:0", "--admin", f"{ip}:0", "--app", app_addr,
            "--readiness-path", "/ready", "--valkey", acl.url("sidecar"), "--namespace-prefix", KEYS.ns,
            "--pod-uid", "pod-acl", "--pod-ip", ip, "--revision", "chat-v1", "--log-level", "warning",
        )  # fmt: skip
        procs.append(sidecar)

        def state() -> PodState | None:
            record = router.snapshot.pods.get("pod-acl")
            return record.state if record else None

        await wait_for(
            lambda: state() is PodState.READY, timeout=20, what="sidecar's pod ready in the router"
        )

        # The agent bootstraps its watch list from pods and follows deltas, under the agent user.
        await agent.full_read()
        assert "pod-acl" in agent.index.records
        follow = asyncio.create_task(agent.follow())
        flush = asyncio.create_task(agent.flush_loop())
        tasks += [follow, flush]
        pod = router.snapshot.pods["pod-acl"]

        # A router's exclusion goes through ReportForwarder; the writer quarantines; the router sees it.
        router.exclude_pod(pod, "refused", "acl test")
        await wait_for(lambda: forwarder.sent == 1, timeout=10, what="router report appended")
        # The writer quarantines, and its recovery check (its own XADD) brings the pod back at
        # once; the change log (read as the router, as gap filling does) shows both commits.
        router_client = acl.sync_client("router")

        def states_logged() -> list[PodState]:
            deltas = [decode_delta(f[b"d"]) for _, f in router_client.xrange(KEYS.changes)]
            return [p.state for d in deltas for p in d.pods if p.uid == "pod-acl"]

        await wait_for(lambda: states_logged()[-2:] == [PodState.QUARANTINED, PodState.READY], timeout=10,
                       what="quarantined by the writer, then recovered")  # fmt: skip
        router_client.close()
        await wait_for(
            lambda: state() is PodState.READY and not router.stale, timeout=10, what="router follows"
        )
        await wait_for(
            lambda: agent.index.version == router.snapshot.version, timeout=10, what="agent follows"
        )

        # The agent appends its ConnectFailed; the writer reads it (the admin checks the stream).
        event = ConnectFailed(uid="pod-acl", source=Source.AGENT, at=time.time(), generation=pod.generation,
                              failure=ConnectFailureKind.TIMEOUT, observer="node-acl")  # fmt: skip
        agent._outbox.append((event, time.monotonic_ns()))
        agent._wake.set()
        await wait_for(lambda: agent.submitted["timeout"] == 1, timeout=10, what="agent event appended")
        assert agent.submit_errors == 0
        sources = [decode_event(f[b"e"]).source for _, f in acl.admin.xrange(KEYS.events)]
        assert Source.AGENT in sources and Source.ROUTER in sources and Source.SIDECAR in sources
        assert writer.stats["bad"] == 0 and writer.leader
    finally:
        follower.stop()
        writer.stop()
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        router.pool.close_all()
        with contextlib.suppress(Exception):
            await agent.client.aclose()


# What each role must not do: (description, command). Every one must be refused with NOPERM.
def forbidden(role: str) -> list[tuple[str, tuple[Any, ...]]]:
    k = KEYS
    other = Keys("other-fleet")
    everyone = [
        ("flush the server", ("FLUSHALL",)),
        ("list keys", ("KEYS", "*")),
        ("reconfigure the server", ("CONFIG", "SET", "maxmemory", "1")),
        ("change ACLs", ("ACL", "SETUSER", "intruder", "on", "nopass", "+@all", "~*")),
        ("read another fleet's pods", ("HGETALL", other.pods)),
        ("append to another fleet's events", ("XADD", other.events, "*", "e", "x")),
        ("switch database", ("SELECT", "1")),
        ("delete another fleet's state", ("DEL", other.pods)),
    ]
    not_writer = [
        ("delete the events stream", ("DEL", k.events)),
        ("write a pod record", ("HSET", k.pods, "pod-x", "x")),
        ("write a route", ("HSET", k.routes, "chat", "x")),
        ("bump the version", ("SET", k.version, "999")),
        ("take the lease", ("SET", k.lease, "me:99", "NX", "PX", "3000")),
        ("publish a forged delta", ("PUBLISH", k.channel, b"Dforged")),
        ("run a script", ("EVAL", "return 1", "0")),
        ("append to the change log", ("XADD", k.changes, "*", "d", "x")),
        ("read the events stream", ("XRANGE", k.events, "-", "+")),
        ("read as the writers' group", ("XREADGROUP", "GROUP", EVENTS_GROUP, "x", "STREAMS", k.events, ">")),
        ("acknowledge events", ("XACK", k.events, EVENTS_GROUP, "0-1")),
        ("trim the events stream", ("XTRIM", k.events, "MAXLEN", "0")),
        ("read the lease", ("GET", k.lease)),
        ("read the applied set", ("ZRANGE", k.applied, "0", "-1")),
    ]
    if role == "writer":
        return [
            *everyone,
            ("touch a key outside its namespace", ("SET", other.version, "1")),
            ("publish on another channel", ("PUBLISH", other.channel, b"x")),
        ]
    if role == "router":
        return everyone + not_writer
    if role == "agent":
        return (
            everyone
            + not_writer
            + [
                ("read routes", ("HGETALL", k.routes)),
                ("read the change log", ("XRANGE", k.changes, "-", "+")),
            ]
        )
    assert role == "sidecar"
    return (
        everyone
        + not_writer
        + [
            ("read pods", ("HGETALL", k.pods)),
            ("read the version", ("GET", k.version)),
            ("read routes", ("HGETALL", k.routes)),
            ("read the change log", ("XRANGE", k.changes, "-", "+")),
        ]
    )


def first_pubsub_reply(client: valkey.Valkey, channel: str) -> str:
    pubsub = client.pubsub()
    try:
        pubsub.subscribe(channel)
        message = pubsub.get_message(timeout=2)
        assert message is not None, "no reply to SUBSCRIBE"
        return str(message["type"])
    finally:
        pubsub.close()


@pytest.mark.parametrize("role", ROLES)
def test_each_role_is_refused_what_it_must_not_do(acl: AclValkey, role: str) -> None:
    acl.admin.xgroup_create(KEYS.events, EVENTS_GROUP, id="0", mkstream=True)
    client = acl.sync_client(role)
    allowed = []
    for what, command in forbidden(role):
        try:
            client.execute_command(*command)
        except NoPermissionError:
            continue
        allowed.append(what)
    assert allowed == [], f"{role} may {allowed}"
    # Channels: only the writer publishes; the sidecar cannot even listen to the deltas.
    if role == "sidecar":
        with pytest.raises(NoPermissionError):
            first_pubsub_reply(client, KEYS.channel)
    else:
        assert first_pubsub_reply(client, KEYS.channel) == "subscribe"
        with pytest.raises(NoPermissionError):
            first_pubsub_reply(client, Keys("other-fleet").channel)
    # And what it must do is allowed: every role appends to the events stream.
    assert client.xadd(KEYS.events, {"e": b"x"})
    assert acl.admin.xlen(KEYS.events) == 1
    client.close()


async def test_a_router_user_cannot_lead_or_commit(acl: AclValkey) -> None:
    """The real writer code under the router's user: refused at its first step, nothing changed."""
    writer = Writer(connect(acl.url("router")), keys=KEYS, writer_id="impostor", lease_ttl=2)
    with pytest.raises(NoPermissionError):
        await writer.try_acquire()
    with pytest.raises(NoPermissionError):
        await writer._write((), (), applied=["1-0"])  # the fenced commit script itself
    assert acl.admin.keys("*") == []
    await writer.client.aclose()


def test_cli_lines_are_what_apply_users_sets(acl: AclValkey) -> None:
    env = {f"FASTPROXY_ACL_{r.upper()}_PASSWORD": PASSWORDS[r] for r in ROLES if r != "sidecar"}
    result = subprocess.run(
        [sys.executable, "-m", "statesync.acl", "--namespace", KEYS.ns, "--password", f"sidecar={PASSWORDS['sidecar']}"],
        capture_output=True, text=True, env={**env, "PATH": "/usr/bin:/bin"}, check=True,
    )  # fmt: skip
    lines = result.stdout.splitlines()
    assert len(lines) == len(ROLES)
    before = {r: acl.admin.execute_command("ACL", "GETUSER", default_username(r, KEYS)) for r in ROLES}
    for line in lines:
        assert acl.admin.execute_command(*shlex.split(line)) in (b"OK", "OK", True)
    after = {r: acl.admin.execute_command("ACL", "GETUSER", default_username(r, KEYS)) for r in ROLES}
    assert after == before
    hashed = subprocess.run(
        [sys.executable, "-m", "statesync.acl", "--namespace", KEYS.ns, "--role", "router", "--hashed",
         "--password", "router=s3cret"], capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "s3cret" not in hashed and " #" in hashed
    missing = subprocess.run(
        [sys.executable, "-m", "statesync.acl", "--role", "agent"], capture_output=True, text=True,
        env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert missing.returncode == 2 and "FASTPROXY_ACL_AGENT_PASSWORD" in missing.stderr


def test_rules_follow_keys_and_escape_globs() -> None:
    rules = role_rules("router", Keys("team[a]*"))
    assert r"%R~team\[a\]\*:pods" in rules.tokens() and r"&team\[a\]\*:deltas" in rules.tokens()
    assert glob_escape("a?b\\c") == "a\\?b\\\\c"
    assert all(Keys("x").pods not in t for t in role_rules("writer", Keys("y")).tokens())
    with pytest.raises(ValueError, match="empty password"):
        setuser_args("router", "u", "")
    with pytest.raises(ValueError, match="unknown role"):
        role_rules("admin")


def test_escaped_namespace_works_on_the_real_server(acl: AclValkey) -> None:
    odd = Keys("team[a]*")
    acl.admin.execute_command(*setuser_args("sidecar", "odd-sidecar", "pw", odd))
    client = valkey.Valkey(host=acl.server.host, port=acl.server.port, username="odd-sidecar", password="pw")
    assert client.xadd(odd.events, {"e": b"x"})
    with pytest.raises(NoPermissionError):  # the unescaped glob would have matched this one
        client.xadd("teamax:events", {"e": b"x"})
    client.close()

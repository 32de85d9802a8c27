"""The pod simulator: thousands of simulated inference pods in one process, on one event loop.

Theory of operation
-------------------
A scenario (YAML, decoded and validated by msgspec; see ``Scenario``) lists revisions; each has a
pod count, a per-pod concurrency, a latency model, a model-loading time and churn rates. Every pod
is a ``SimulatedApp`` (an ``AppServer`` subclass, so it inherits the concurrency accounting that
counts violations) listening on *its own loopback address* (``127.20.x.y`` by default, port 8000):
a dead pod has no listener, so connecting to it is refused by the kernel, for real. Thousands of
listeners need thousands of descriptors: ``raise_fd_limit`` lifts the soft RLIMIT_NOFILE to the
hard one and fails with a clear message when even that is too low.

Each simulated pod stands for the app *and* its sidecar. Like the sidecar (``fastproxy.sidecar``)
it refuses work politely with ``503`` + ``x-fastproxy-busy: 1`` before the app sees anything when
its slots are full or it cannot serve (loading, not ready, draining), so a router speaking the
sidecar protocol re-picks another pod and nothing is lost; and it reports every readiness change
to the writer's event stream (``ReadinessChanged``/``DrainStarted``/``PodRemoved``/``PodDiscovered``,
source ``sidecar``), batched into one pipeline per loop turn through ``statesync.writer.submit``;
like the sidecar it re-sends every pod's full ``PodDiscovered`` every ``report_interval_s``
(anti-entropy: a Valkey that restarted empty gets the fleet back).

Work requests (anything but ``/ready`` and ``/control/*``) are answered by the revision's latency
model: ``fixed`` (a constant), ``lognormal`` (median and sigma), or ``sse`` (token streaming: a
``text/event-stream`` of ``tokens`` events, one every ``ms_per_token``, after ``first_token_ms``).

A revision with a ``kv_cache`` is an LLM server with a prefix cache (as vLLM's automatic prefix
caching or SGLang's radix cache): each pod keeps an LRU of prompt blocks (``block_bytes`` each,
every block's hash chained to the one before, so a block is cached only with its whole prefix).
A request's prompt (``messages``, else ``prompt``, as sent: ``fastproxy.llm``) costs
``prefill_ms_per_block`` for each block after its longest cached prefix, then the first token
(``first_token_ms``); the response head and first token go out together (time to first token),
then the other tokens. As a real server does (vLLM and SGLang cache the blocks of generated
tokens too), a pod then caches the conversation continued by its answer: with ``reply_bytes``, the
answer is ``sim_reply(prompt)`` (a seeded text of that size, a function of the prompt alone), and
the blocks of the prompt followed by that answer as the next turn will resend it (an assistant
message) go into the LRU. Each pod counts hit and total blocks and its busy time (the time-averaged
in-flight count, for load spread). ``SharedPrefixWorkload`` makes the requests such a fleet sees:
conversations that share one of a few system prompts and grow turn by turn, each turn resending the
answers the server gave (``sim_reply``), as a chat client does.

The life of a pod (``Phase``), and what each churn event does:

- LOADING: on start and after every restart the pod listens but loads its model for ``load_s``:
  ``/ready`` answers 503 and work is refused as busy (never a user error), then it reports ready.
- SERVING: reported ready; answers work.
- NOT_READY (a readiness flap): reported not ready for ``flap_s``, work refused as busy, then ready.
- a stall (orthogonal to the phase): the app stops answering for ``stall_ms`` while its socket still
  accepts; requests (and readiness probes) wait. A stall longer than the sidecar's probe timeout
  is reported as not ready, and as ready again when it ends.
- DEAD (death): the listener and every connection close; connections are refused until the restart
  ``restart_after_s`` later, which is a new generation (and loads again). The sidecar notices after
  one probe interval and reports not ready. ``death_mode: idle`` kills a pod between two requests
  (a crash that cuts a response is visible to any proxy; ``crash`` does that, and counts the
  requests it cut).
- DRAINING (preemption): reports ``DrainStarted``, refuses new work, lets in-flight requests finish,
  closes, reports ``PodRemoved``; ``replace_after_s`` later a replacement pod with a new UID (and a
  new generation) comes up on the same address, as a rescheduled pod would reuse an IP.

WebSocket sessions: every pod accepts RFC 6455 handshakes on ``/ws/echo`` and
``/ws/tokens/<n>/<ms>`` (``devtools.wsapp``), refused as busy like any work when it cannot serve; a
session holds one of the pod's slots until it ends, so it counts in ``in_flight`` and in the
violation accounting. A revision with ``hosts`` of its own is a service of its own (route service
= the revision's name): the default scenario's ``realtime-v1`` is the WebSocket revision that
``fastproxy dev`` opens sessions to (``load.websocket_sessions``).

Churn events arrive as Poisson processes at the scenario's rates (events per second per revision),
from a seeded RNG; at most ``max_unavailable`` of a revision's pods are out (dead, draining,
loading, not ready) at once, so a scenario cannot starve the load by accident.

CLI: ``python -m fastproxy.devtools.simulator --scenario FILE --valkey URL [--duration S]``: serves
the pods, submits the scenario's route, runs its churn, and prints its figures as JSON at the end
(or on SIGTERM), so other processes (fault suites, benchmarks) can use it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import enum
import errno
import ipaddress
import json
import logging
import math
import random
import resource
import signal
import sys
import time
import zlib
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec
import yaml

from fastproxy.devtools.upstream import AppServer, _AppConnection, _Job
from fastproxy.llm import body_decoder, prompt_of
from statesync.schema import (
    DrainStarted,
    Event,
    PodDiscovered,
    PodRemoved,
    ReadinessChanged,
    Route,
    RouteChanged,
    Source,
    WeightedRevision,
)
from statesync.writer import submit

log = logging.getLogger("fastproxy.simulator")

__all__ = [
    "KvCache",
    "Phase",
    "PodSimulator",
    "Scenario",
    "ScenarioError",
    "SharedPrefixWorkload",
    "SimPod",
    "decode_scenario",
    "default_scenario_path",
    "load_scenario",
    "raise_fd_limit",
]

# ---- the scenario ---------------------------------------------------------------------------------

NonNegative = Annotated[float, msgspec.Meta(ge=0)]
Positive = Annotated[float, msgspec.Meta(gt=0)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")]


class Fixed(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="model", tag="fixed"):
    ms: NonNegative = 20.0

    def sample(self, rng: random.Random) -> float:
        return self.ms / 1000


class LogNormal(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="model", tag="lognormal"):
    median_ms: Positive = 20.0
    sigma: Annotated[float, msgspec.Meta(ge=0, le=4)] = 0.5

    def sample(self, rng: random.Random) -> float:
        return self.median_ms * math.exp(self.sigma * rng.gauss(0.0, 1.0)) / 1000


class Sse(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="model", tag="sse"):
    tokens: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 16
    ms_per_token: NonNegative = 5.0
    first_token_ms: NonNegative = 0.0

    def sample(self, rng: random.Random) -> float:
        return (self.first_token_ms + self.tokens * self.ms_per_token) / 1000


Latency = Fixed | LogNormal | Sse


class KvCache(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A pod's prefix cache: an LRU of ``blocks`` prompt blocks of ``block_bytes``; time to first
    token = ``first_token_ms`` + ``prefill_ms_per_block`` per uncached block; then ``tokens``
    more tokens, ``ms_per_token`` apart."""

    blocks: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 512
    block_bytes: Annotated[int, msgspec.Meta(ge=16, le=1 << 20)] = 256
    prefill_ms_per_block: NonNegative = 6.0
    first_token_ms: NonNegative = 20.0
    tokens: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 20
    ms_per_token: NonNegative = 8.0
    # The answer's size in bytes; its blocks are cached with the prompt's (0: answers are not cached).
    reply_bytes: Annotated[int, msgspec.Meta(ge=0, le=1 << 20)] = 0

    def prefill(self, cache: collections.OrderedDict[int, None], prompt: Any) -> tuple[int, int]:
        """Look the prompt's blocks up in ``cache`` (and put them in, most recent last); returns
        (blocks of the longest cached prefix, all blocks)."""
        size = self.block_bytes
        view = memoryview(prompt)
        chained = 0
        hit = 0
        total = 0
        cached_so_far = True
        for start in range(0, len(view), size):
            chained = zlib.crc32(view[start : start + size], chained) | (total << 32)
            total += 1
            if cached_so_far and chained in cache:
                hit += 1
                cache.move_to_end(chained)
            else:
                cached_so_far = False
                cache[chained] = None
        while len(cache) > self.blocks:
            cache.popitem(last=False)
        return hit, total

    def remember(self, cache: collections.OrderedDict[int, None], data: bytes) -> None:
        """Cache every block of ``data`` (a prompt continued by its answer), most recent last."""
        size = self.block_bytes
        view = memoryview(data)
        chained = 0
        for index, start in enumerate(range(0, len(view), size)):
            chained = zlib.crc32(view[start : start + size], chained) | (index << 32)
            cache[chained] = None
            cache.move_to_end(chained)
        while len(cache) > self.blocks:
            cache.popitem(last=False)


def sim_reply(prompt: bytes, size: int) -> str:
    """The simulated server's answer to ``prompt`` (its messages as sent): seeded by the prompt,
    so the workload knows what a real client would resend next turn without parsing the stream."""
    return _text(random.Random(zlib.crc32(prompt)), size, "Answer: ")


def continued(prompt: bytes, reply: str) -> bytes:
    """``prompt`` (a JSON array of messages) as the next turn resends it: the answer appended as
    an assistant message, without the array's closing bracket (the next user message follows)."""
    return prompt[:-1] + b"," + _assistant(reply)


def _assistant(reply: str) -> bytes:
    return msgspec.json.encode({"role": "assistant", "content": reply})


class Churn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Rates are events per second over the whole revision (Poisson arrivals)."""

    deaths_per_s: NonNegative = 0.0
    flaps_per_s: NonNegative = 0.0
    stalls_per_s: NonNegative = 0.0
    drains_per_s: NonNegative = 0.0
    death_mode: Literal["idle", "crash"] = "idle"
    restart_after_s: NonNegative = 2.0
    flap_s: NonNegative = 1.0
    stall_ms: NonNegative = 300.0
    replace_after_s: NonNegative = 1.0
    drain_grace_s: Positive = 30.0
    max_unavailable: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.3


class RevisionSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: Name
    pods: Annotated[int, msgspec.Meta(ge=1, le=60_000)]
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 1
    weight: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 100
    latency: Latency = Fixed()
    kv_cache: KvCache | None = None  # an LLM server with a prefix cache (replaces ``latency``)
    load_s: NonNegative = 0.0  # model loading time on every start
    churn: Churn = Churn()
    # Hosts of its own: this revision is a service of its own (named after it) instead of a weighted
    # share of the scenario's service; e.g. a WebSocket revision on its own hostname.
    hosts: tuple[str, ...] = ()


class LoadSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What ``fastproxy dev`` drives through the router: ``concurrency`` closed-loop clients, or
    (``rate`` > 0) an open loop at that many requests per second."""

    concurrency: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 16
    rate: NonNegative = 0.0
    path: str = "/v1/completions"
    max_connections: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 512
    # WebSocket clients, each opening one session after another: ``websocket_messages`` echoed
    # messages ``websocket_interval_ms`` apart on ``websocket_path`` at ``websocket_host``.
    websocket_sessions: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 0
    websocket_host: str = "realtime.local"
    websocket_path: str = "/ws/echo"
    websocket_messages: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 20
    websocket_interval_ms: NonNegative = 50.0


class Scenario(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    revisions: Annotated[list[RevisionSpec], msgspec.Meta(min_length=1)]
    service: Name = "chat"
    hosts: tuple[str, ...] = ("chat.local",)
    namespace: Name = "sim"
    load: LoadSpec = LoadSpec()
    # Pods take consecutive addresses from here; keep clear of the tests' 127.0.x.y.
    first_address: str = "127.20.0.1"
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 8000
    probe_interval_s: Positive = 0.05  # how soon the (simulated) sidecar notices a dead app
    probe_timeout_s: Positive = 0.2  # a stall longer than this is reported as not ready
    # Every pod's full report again this often (the sidecar's anti-entropy: Valkey restarted
    # empty, an event lost); 0: never.
    report_interval_s: NonNegative = 10.0
    seed: int = 7

    def __post_init__(self) -> None:
        names = [r.name for r in self.revisions]
        if len(set(names)) != len(names):
            raise ValueError(f"revision names must be unique, got {names}")
        if not self.shared_revisions():
            raise ValueError(f"every revision has hosts of its own: none left for service {self.service!r}")
        try:
            first = ipaddress.IPv4Address(self.first_address)
        except ValueError:
            raise ValueError(f"first_address: {self.first_address!r} is not an IPv4 address") from None
        last = first + self.pod_count() * 2  # room for addresses skipped (.0/.255)
        if not (first.is_loopback and last.is_loopback):
            raise ValueError(f"first_address: {self.pod_count()} pods from {first} leave 127.0.0.0/8")

    def pod_count(self) -> int:
        return sum(r.pods for r in self.revisions)

    def shared_revisions(self) -> list[RevisionSpec]:
        """The weighted revisions of the scenario's service (those without hosts of their own)."""
        return [r for r in self.revisions if not r.hosts]

    def routes(self) -> list[Route]:
        shared = Route(service=self.service, hosts=self.hosts, revisions=tuple(
            WeightedRevision(revision=r.name, weight=r.weight) for r in self.shared_revisions()))  # fmt: skip
        own = [
            Route(service=r.name, hosts=r.hosts, revisions=(WeightedRevision(revision=r.name, weight=100),))
            for r in self.revisions
            if r.hosts
        ]
        return [shared, *own]


class ScenarioError(ValueError):
    """A scenario file that cannot be used; the text names the file and the bad field."""


def load_scenario(path: str | Path) -> Scenario:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{path}: not YAML: {exc}") from None
    return decode_scenario(raw, str(path))


def decode_scenario(raw: Any, origin: str = "scenario") -> Scenario:
    try:
        return msgspec.convert(raw, Scenario)
    except msgspec.ValidationError as exc:
        raise ScenarioError(f"{origin}: {exc}") from None


def default_scenario_path(name: str = "default") -> Path:
    return Path(str(resources.files("fastproxy.devtools") / "scenarios" / f"{name}.yaml"))


# ---- descriptors ------------------------------------------------------------------------------------


def raise_fd_limit(needed: int) -> int:
    """Lift the soft descriptor limit to the hard one; raise if ``needed`` still does not fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, needed, 1 << 20)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if needed > target:
        raise RuntimeError(
            f"{needed} file descriptors are needed but RLIMIT_NOFILE allows {target} (hard limit): "
            f"raise it (ulimit -Hn, or LimitNOFILE= for a service) or simulate fewer pods"
        )
    return target


def descriptors_needed(scenario: Scenario, *, with_router: bool) -> int:
    """Listeners, plus pod-side connections, plus the router's side of them when it is in-process."""
    per_pod = sum(r.pods * (1 + r.concurrency * (2 if with_router else 1)) for r in scenario.revisions)
    return per_pod + 2 * scenario.load.max_connections + 256


# ---- one pod ------------------------------------------------------------------------------------------


class Phase(enum.StrEnum):
    LOADING = "loading"
    SERVING = "serving"
    NOT_READY = "not_ready"
    DRAINING = "draining"
    DEAD = "dead"


_BUSY_HEAD: Final = b"HTTP/1.1 503 Service Unavailable\r\nx-fastproxy-busy: 1\r\ncontent-length: 0\r\n"
_WORK_BODY: Final = b'{"id":"sim","choices":[{"text":"ok"}]}'


class _PodConnection(_AppConnection):
    """An ``AppServer`` connection whose work follows the pod's latency model and life."""

    __slots__ = ()

    def _answer_now(self, job: _Job) -> bool:
        pod: SimPod = self._server.pod  # type: ignore[attr-defined]
        if job.control:
            return False if pod.stalled() else super()._answer_now(job)
        if pod.phase is not Phase.SERVING:
            # The sidecar's refusal: the app sees nothing, the router re-picks another pod.
            pod.refused += 1
            rid = job.req.header(b"x-request-id")
            head = _BUSY_HEAD + (b"x-request-id: " + rid + b"\r\n" if rid is not None else b"")
            if job.req.keep_alive:
                self._write(head + b"\r\n")
            else:
                self._write(head + b"connection: close\r\n\r\n")
                self._close()
            return True
        return False  # work always waits: it goes to _answer_later through the connection's task

    def _open_websocket(self, job: _Job) -> None:
        pod: SimPod = self._server.pod  # type: ignore[attr-defined]
        if pod.phase is not Phase.SERVING:
            pod.refused += 1  # the sidecar's refusal, as for any work
            self._write(_BUSY_HEAD + b"connection: close\r\n\r\n")
            self._close()
            if job.reserved:
                self._server._end()
            return
        pod.sessions += 1
        super()._open_websocket(job)

    async def _answer_later(self, job: _Job) -> None:
        pod: SimPod = self._server.pod  # type: ignore[attr-defined]
        loop = self._loop
        if pod.stall_until > loop.time():  # checked inline: the common case costs no coroutine
            await pod.sit_out_stall()
        if job.control:
            super()._answer_now(job)
            return
        kv = pod.spec.kv_cache
        if kv is not None:
            await self._answer_llm(pod, job, kv)
            pod.served += 1
            return
        model = pod.spec.latency
        if isinstance(model, Sse):
            await self._stream_tokens(pod, job, model)
        else:
            delay = model.sample(pod.sim.rng)
            if delay > 0:
                await asyncio.sleep(delay)
            if pod.stall_until > loop.time():
                await pod.sit_out_stall()
            self._simple(job.req, 200, _WORK_BODY, b"application/json")
        pod.served += 1

    async def _answer_llm(self, pod: SimPod, job: _Job, kv: KvCache) -> None:
        """Prefill what the pod's cache lacks, then the first token with the head, then the rest."""
        loop = self._loop
        started = loop.time()
        try:
            prompt = prompt_of(_llm_body.decode(job.req.body))
        except (msgspec.ValidationError, msgspec.DecodeError):
            prompt = job.req.body
        if pod.kv is None:
            pod.kv = collections.OrderedDict()
        hit, total = kv.prefill(pod.kv, prompt)
        pod.kv_hit_blocks += hit
        pod.kv_blocks += total
        await asyncio.sleep((kv.first_token_ms + (total - hit) * kv.prefill_ms_per_block) / 1000)
        if self._closing:
            return
        head, close = self._head(job.req, 200, ctype=b"text/event-stream", chunked=True,
                                 extra=b"x-sim-kv-hit: %d/%d\r\n" % (hit, total))  # fmt: skip
        self._write(head + _token_chunk(0))
        rest = (kv.tokens - 1) * kv.ms_per_token / 1000
        if rest > 0:
            await asyncio.sleep(rest)
        if not self._closing:
            self._write(b"".join(_token_chunk(i) for i in range(1, kv.tokens)) + _SSE_DONE)
            if close:
                self._close()
            if kv.reply_bytes and pod.kv is not None:
                sent = bytes(prompt)
                if sent.endswith(b"]"):  # a chat prompt (messages): the next turn resends the answer
                    kv.remember(pod.kv, continued(sent, sim_reply(sent, kv.reply_bytes)))
        pod.busy_s += loop.time() - started

    async def _stream_tokens(self, pod: SimPod, job: _Job, model: Sse) -> None:
        """Tokens from a chain of timer callbacks (no coroutine wake-up per token: the simulator must
        stay cheaper than what it feeds), on an absolute schedule: a late timer sends every token
        that is due at once. Tokens are tiny, so they are written without waiting for a slow reader."""
        head, close = self._head(job.req, 200, ctype=b"text/event-stream", chunked=True,
                                 extra=b"cache-control: no-cache\r\n")  # fmt: skip
        self._write(head)
        loop = self._loop
        finished: asyncio.Future[bool] = loop.create_future()
        start = loop.time() + model.first_token_ms / 1000
        step = model.ms_per_token / 1000
        tokens = model.tokens
        sent = 0
        handle: asyncio.TimerHandle | None = None

        def emit() -> None:
            nonlocal sent, handle
            if finished.done():
                return
            if self._closing:
                finished.set_result(False)
                return
            now = loop.time()
            if pod.stall_until > now:
                handle = loop.call_at(pod.stall_until, emit)
                return
            # (a hair of tolerance: a timer may fire a clock tick before its time)
            due = min(tokens, int((now - start + 1e-4) / step) + 1 if step > 0 else tokens)
            if due > sent:
                self._write(b"".join(_token_chunk(i) for i in range(sent, due)))
                sent = due
            if sent >= tokens:
                finished.set_result(True)
            else:
                handle = loop.call_at(start + sent * step, emit)

        handle = loop.call_at(start, emit)
        try:
            if not await finished:
                return  # the connection went; connection_lost released the slot's bookkeeping
        finally:
            if handle is not None:
                handle.cancel()
        self._write(_SSE_DONE)
        if close:
            self._close()


def _token_chunk(i: int) -> bytes:
    event = b'data: {"token":%d}\n\n' % i
    return b"%x\r\n%b\r\n" % (len(event), event)


_SSE_DONE: Final = b"%x\r\ndata: [DONE]\n\n\r\n0\r\n\r\n" % len(b"data: [DONE]\n\n")
_llm_body: Final = body_decoder()


class SharedPrefixWorkload(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Chat conversations as an LLM fleet sees them: each starts with one of ``system_prompts``
    shared system prompts (``system_bytes`` each) and runs ``turns`` turns; turn ``t`` sends the
    whole conversation so far (system, then user/assistant pairs, then the new user message), so
    consecutive turns share all but their last ``user_bytes + reply_bytes``. Text is seeded."""

    system_prompts: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 8
    system_bytes: Annotated[int, msgspec.Meta(ge=0, le=1 << 20)] = 4096
    turns: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 6
    user_bytes: Annotated[int, msgspec.Meta(ge=1, le=1 << 20)] = 512
    reply_bytes: Annotated[int, msgspec.Meta(ge=0, le=1 << 20)] = 512
    model: str = "llama-3.1-8b-instruct"
    seed: int = 11

    def systems(self) -> list[str]:
        rng = random.Random(self.seed)
        return [_text(rng, self.system_bytes, f"You are assistant {i}. ") for i in range(self.system_prompts)]

    def conversation(self, rng: random.Random, systems: list[str]) -> list[bytes]:
        """The request bodies of one conversation, turn by turn; each turn resends the server's
        answers (``sim_reply``, what a pod with ``reply_bytes`` answers and caches)."""
        messages: list[dict[str, str]] = [{"role": "system", "content": rng.choice(systems)}]
        bodies = []
        for turn in range(self.turns):
            messages.append({"role": "user", "content": _text(rng, self.user_bytes, f"Question {turn}: ")})
            bodies.append(msgspec.json.encode({"model": self.model, "messages": messages, "stream": True}))
            reply = sim_reply(msgspec.json.encode(messages), self.reply_bytes)
            messages.append({"role": "assistant", "content": reply})
        return bodies


_WORDS: Final = ("alpha", "tensor", "cache", "prompt", "token", "model", "router", "batch", "layer",
                 "vector", "query", "answer", "kernel", "memory", "latency", "stream")  # fmt: skip


def _text(rng: random.Random, size: int, start: str) -> str:
    words = [start]
    length = len(start)
    while length < size:
        word = rng.choice(_WORDS)
        words.append(word)
        length += len(word) + 1
    return " ".join(words)[:size]


class SimulatedApp(AppServer):
    """One pod's listening socket and accounting; its behaviour comes from ``pod``."""

    def __init__(self, pod: SimPod) -> None:
        super().__init__(concurrency_limit=pod.spec.concurrency, sidecar_busy=True, record=False)
        self.pod = pod
        self.ready = False  # /ready answers 503 until the model is loaded

    def _make_connection(self) -> _AppConnection:
        conn_id = self._next_conn_id
        self._next_conn_id += 1
        return _PodConnection(self, conn_id)


class SimPod:
    """One simulated pod slot: an address that successive pods (generations) occupy."""

    __slots__ = (
        "app",
        "busy_s",
        "cut",
        "deaths",
        "drains",
        "flaps",
        "generation",
        "index",
        "ip",
        "kv",
        "kv_blocks",
        "kv_hit_blocks",
        "phase",
        "port",
        "refused",
        "reported_ready",
        "restarts",
        "served",
        "sessions",
        "sim",
        "spec",
        "stall_seen",
        "stall_until",
        "stalls",
        "uid",
        "violations_before",
        "work_before",
    )

    def __init__(self, sim: PodSimulator, spec: RevisionSpec, index: int, ip: str, port: int) -> None:
        self.sim = sim
        self.spec = spec
        self.index = index
        self.ip = ip
        self.port = port
        self.generation = 0
        self.uid = ""
        self.phase = Phase.DEAD
        self.app: SimulatedApp | None = None
        self.stall_until = 0.0
        self.stall_seen = False  # the sidecar's probe has timed out during the current stall
        self.reported_ready: bool | None = None
        self.served = 0
        self.sessions = 0  # WebSocket sessions opened
        self.refused = 0
        self.cut = 0  # requests in flight when a crash killed the pod
        self.deaths = self.drains = self.flaps = self.stalls = self.restarts = 0
        # Accounting of earlier generations' apps (each generation is a new AppServer).
        self.violations_before = 0
        self.work_before = 0
        # The KV-cache model (a revision with kv_cache): its LRU of block hashes, made on first use
        # and lost with the pod's generation; hit and total blocks; seconds spent serving.
        self.kv: collections.OrderedDict[int, None] | None = None
        self.kv_blocks = self.kv_hit_blocks = 0
        self.busy_s = 0.0

    @property
    def violations(self) -> int:
        return self.violations_before + (self.app.violations if self.app is not None else 0)

    @property
    def active(self) -> int:
        return self.app.active if self.app is not None else 0

    def stalled(self) -> bool:
        return self.stall_until > self.sim.loop.time()

    async def sit_out_stall(self) -> None:
        loop = self.sim.loop
        while (left := self.stall_until - loop.time()) > 0:
            await asyncio.sleep(left)

    def wants_ready(self) -> bool:
        """What the sidecar's probe would conclude right now."""
        return self.phase is Phase.SERVING and not self.stall_seen


# ---- the simulator ---------------------------------------------------------------------------------


class PodSimulator:
    """Every pod of a scenario, their churn, and their reports to the writer's stream."""

    def __init__(self, scenario: Scenario, valkey: Any | None, *, with_router: bool = False) -> None:
        self.scenario = scenario
        self.client = valkey  # a valkey-py asyncio client, or None: nothing is reported
        self.rng = random.Random(scenario.seed)
        self.loop = asyncio.get_running_loop()
        self.pods: list[SimPod] = []
        self.by_revision: dict[str, list[SimPod]] = {}
        self.events: list[str] = []  # recent churn, for a dashboard
        self.died_uids: set[str] = set()  # every UID that died or drained: errors naming it are churn's
        self.reports = 0
        self.report_errors = 0
        self._outbox: list[Event] = []
        self._outbox_ready = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.fd_limit = raise_fd_limit(descriptors_needed(scenario, with_router=with_router))
        first = int(ipaddress.IPv4Address(scenario.first_address))
        addresses = self._addresses(first, scenario.pod_count())
        for spec in scenario.revisions:
            members = self.by_revision[spec.name] = []
            for i in range(spec.pods):
                pod = SimPod(self, spec, i, next(addresses), scenario.port)
                members.append(pod)
                self.pods.append(pod)

    @staticmethod
    def _addresses(first: int, count: int) -> Any:
        n = first
        for _ in range(count):
            while n & 0xFF in (0, 255):  # network-looking and broadcast-looking addresses are skipped
                n += 1
            yield str(ipaddress.IPv4Address(n))
            n += 1

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self, *, churn: bool = True, route: bool = True) -> None:
        """Bind every pod (loading), report them, and start the churn."""
        self._spawn(self._report_loop())
        if self.scenario.report_interval_s > 0:
            self._spawn(self._anti_entropy(self.scenario.report_interval_s))
        if route:
            for one in self.scenario.routes():
                self._report(RouteChanged(at=time.time(), route=one))
        for pod in self.pods:
            await self._bring_up(pod, new_uid=True)
        if churn:
            await self.start_churn()

    async def start_churn(self) -> None:
        """The scenario's churn processes (``start`` without churn, then this once everyone sees the pods)."""
        for spec in self.scenario.revisions:
            c = spec.churn
            for rate, action in ((c.deaths_per_s, self.kill), (c.flaps_per_s, self.flap),
                                 (c.stalls_per_s, self.stall), (c.drains_per_s, self.drain)):  # fmt: skip
                if rate > 0:
                    self._spawn(self._churn(spec, rate, action))

    async def wait_serving(self, timeout: float) -> None:
        """Until every pod is SERVING and every report is in the stream."""
        deadline = self.loop.time() + timeout
        while any(p.phase is not Phase.SERVING for p in self.pods) or self._outbox:
            if self.loop.time() > deadline:
                waiting = sum(p.phase is not Phase.SERVING for p in self.pods)
                raise TimeoutError(f"{waiting} pods not serving after {timeout}s")
            await asyncio.sleep(0.02)  # loading timers and the report loop have no shared event

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        for pod in self.pods:
            await self._close_app(pod)

    async def flush(self, timeout: float = 2.0) -> None:
        deadline = self.loop.time() + timeout
        while self._outbox and self.loop.time() < deadline:
            await asyncio.sleep(0.01)  # the report loop empties the outbox; no event to wait on

    # -- churn actions (public: tests and fault suites call them directly) --------------------------

    async def kill(self, pod: SimPod, mode: str | None = None) -> bool:
        """Death: the listener and connections go; refused until the restart (a new generation)."""
        if pod.app is None or pod.phase is Phase.DRAINING:
            return False
        churn = pod.spec.churn
        mode = mode or churn.death_mode
        generation = pod.generation
        if mode == "idle":
            app = pod.app
            with contextlib.suppress(TimeoutError):
                await app.wait_until(lambda: app.active == 0, timeout=churn.drain_grace_s)
            if pod.app is not app or pod.generation != generation:
                return False
        pod.cut += pod.active
        pod.deaths += 1
        self.died_uids.add(pod.uid)
        pod.phase = Phase.DEAD
        await self._close_app(pod)
        self._note(f"{pod.uid} died ({mode})")
        # The sidecar outlives its app: its next probe fails and it says so.
        self.loop.call_later(self.scenario.probe_interval_s, self._sync_readiness, pod, "app exited")
        if churn.restart_after_s >= 0:
            self.loop.call_later(churn.restart_after_s, self._spawn_restart, pod, generation)
        return True

    async def restart(self, pod: SimPod) -> None:
        """A new generation of the same pod (same UID: a container restart), loading first."""
        if pod.app is not None:
            return
        await self._bring_up(pod, new_uid=False)
        pod.restarts += 1
        self._note(f"{pod.uid} restarted (generation {pod.generation})")

    def flap(self, pod: SimPod) -> bool:
        """Readiness goes away for ``flap_s`` and comes back; in-flight work continues."""
        if pod.phase is not Phase.SERVING:
            return False
        pod.phase = Phase.NOT_READY
        pod.flaps += 1
        assert pod.app is not None
        pod.app.ready = False
        self._sync_readiness(pod, "readiness flap")
        self._note(f"{pod.uid} not ready for {pod.spec.churn.flap_s:g}s")
        self.loop.call_later(pod.spec.churn.flap_s, self._end_flap, pod, pod.generation)
        return True

    def stall(self, pod: SimPod, ms: float | None = None) -> bool:
        """The app stops answering for ``ms`` while its socket still accepts connections."""
        if pod.app is None:
            return False
        ms = pod.spec.churn.stall_ms if ms is None else ms
        pod.stall_until = max(pod.stall_until, self.loop.time() + ms / 1000)
        pod.stalls += 1
        self._note(f"{pod.uid} stalled {ms:g} ms")
        if ms / 1000 > self.scenario.probe_timeout_s:
            self.loop.call_later(self.scenario.probe_timeout_s, self._stall_probed, pod)
        return True

    def _stall_probed(self, pod: SimPod) -> None:
        """The sidecar's probe timed out (or, re-armed at the stall's end, answers again)."""
        stalled = pod.stalled()
        if stalled != pod.stall_seen:
            pod.stall_seen = stalled
            self._sync_readiness(pod, "probe timed out (app blocked)" if stalled else "probe ok")
        if stalled:
            self.loop.call_at(pod.stall_until + 0.001, self._stall_probed, pod)

    async def drain(self, pod: SimPod) -> bool:
        """Preemption: DrainStarted, refuse new work, finish in-flight, exit; later a replacement."""
        if pod.app is None or pod.phase in (Phase.DRAINING, Phase.DEAD):
            return False
        app = pod.app
        pod.phase = Phase.DRAINING
        pod.drains += 1
        app.ready = False
        self._report(DrainStarted(uid=pod.uid, source=Source.SIDECAR, at=time.time(), reason="preempted"))
        self._note(f"{pod.uid} draining ({app.active} in flight)")
        with contextlib.suppress(TimeoutError):
            await app.wait_until(lambda: app.active == 0, timeout=pod.spec.churn.drain_grace_s)
        pod.cut += app.active  # past the grace period: cut, as the kubelet would
        self.died_uids.add(pod.uid)
        await self._close_app(pod)
        pod.phase = Phase.DEAD
        pod.reported_ready = None
        self._report(PodRemoved(uid=pod.uid, source=Source.SIDECAR, at=time.time(), reason="preempted"))
        self._note(f"{pod.uid} drained and removed")
        delay = pod.spec.churn.replace_after_s
        self.loop.call_later(delay, lambda: self._spawn(self._bring_up(pod, new_uid=True)))
        return True

    # -- internals ---------------------------------------------------------------------------------

    async def _bring_up(self, pod: SimPod, *, new_uid: bool) -> None:
        pod.generation += 1
        pod.kv = None  # a restarted server's KV cache is empty
        if new_uid:
            pod.uid = f"{pod.spec.name}-{pod.index:05d}" + (
                f"-g{pod.generation}" if pod.generation > 1 else ""
            )
            pod.reported_ready = None
        pod.stall_until = 0.0
        pod.stall_seen = False
        app = SimulatedApp(pod)
        try:
            await app.start(pod.ip, pod.port)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise RuntimeError(
                f"{pod.ip}:{pod.port} is in use: is another simulator (or fastproxy dev) running? "
                f"Give this one other addresses (the scenario's first_address, dev's --first-address)"
            ) from None
        pod.app = app
        pod.phase = Phase.LOADING
        if new_uid:
            pod.reported_ready = False
            self._report(self._discovered(pod))
        if pod.spec.load_s > 0:
            self.loop.call_later(pod.spec.load_s, self._loaded, pod, pod.generation)
        else:
            self._loaded(pod, pod.generation)

    def _loaded(self, pod: SimPod, generation: int) -> None:
        if pod.generation != generation or pod.phase is not Phase.LOADING or pod.app is None:
            return
        pod.phase = Phase.SERVING
        pod.app.ready = True
        self._sync_readiness(pod, "model loaded")

    def _end_flap(self, pod: SimPod, generation: int) -> None:
        if pod.generation != generation or pod.phase is not Phase.NOT_READY or pod.app is None:
            return
        pod.phase = Phase.SERVING
        pod.app.ready = True
        self._sync_readiness(pod, "probe ok")

    def _sync_readiness(self, pod: SimPod, reason: str) -> None:
        if pod.phase is Phase.DRAINING or (pod.phase is Phase.DEAD and pod.reported_ready is None):
            return  # draining is one-way; a removed pod says nothing more
        ready = pod.wants_ready()
        if ready != pod.reported_ready:
            pod.reported_ready = ready
            self._report(ReadinessChanged(uid=pod.uid, source=Source.SIDECAR, at=time.time(), ready=ready,
                                          reason=reason))  # fmt: skip

    def _spawn_restart(self, pod: SimPod, generation: int) -> None:
        if pod.generation == generation and pod.app is None:
            self._spawn(self.restart(pod))

    async def _close_app(self, pod: SimPod) -> None:
        app, pod.app = pod.app, None
        if app is not None:
            pod.violations_before += app.violations
            pod.work_before += app.work_count
            pod.refused += app.refused  # the app's own full-slot refusals, kept past its generation
            try:
                async with asyncio.timeout(2.0):
                    await app.close()
            except TimeoutError:
                # A connection accepted while closing (its connection_made ran after the abort
                # sweep) keeps wait_closed waiting: abort what is left, the listener is gone.
                for conn in list(app._conns):
                    if conn._transport is not None:
                        conn._transport.abort()
                log.warning("pod %s: connections still open 2 s after close; aborted", pod.uid)

    def _unavailable(self, spec: RevisionSpec) -> int:
        return sum(p.phase is not Phase.SERVING for p in self.by_revision[spec.name])

    async def _churn(self, spec: RevisionSpec, rate: float, action: Callable[[SimPod], Any]) -> None:
        members = self.by_revision[spec.name]
        cap = math.floor(spec.churn.max_unavailable * len(members))
        while True:
            await asyncio.sleep(self.rng.expovariate(rate))
            pod = self.rng.choice(members)
            if pod.phase is not Phase.SERVING:
                continue
            if action is not self.stall and self._unavailable(spec) >= cap:
                continue
            result = action(pod)
            if asyncio.iscoroutine(result):
                self._spawn(result)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("simulator task failed", exc_info=task.exception())

    def _note(self, text: str) -> None:
        self.events.append(f"{time.strftime('%H:%M:%S')} {text}")
        del self.events[:-50]

    def _report(self, event: Event) -> None:
        if self.client is None:
            return
        self._outbox.append(event)
        self._outbox_ready.set()

    def _discovered(self, pod: SimPod) -> PodDiscovered:
        return PodDiscovered(uid=pod.uid, source=Source.SIDECAR, at=time.time(), namespace=self.scenario.namespace,
                             revision=pod.spec.name, ip=pod.ip, port=pod.port, concurrency=pod.spec.concurrency,
                             ready=bool(pod.reported_ready))  # fmt: skip

    async def _anti_entropy(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            for pod in self.pods:
                # Draining is one-way and a drained pod is gone: neither is re-announced.
                if pod.reported_ready is not None and pod.phase is not Phase.DRAINING:
                    self._report(self._discovered(pod))

    async def _report_loop(self) -> None:
        """One pipeline per batch: thousands of pods reporting at once cost a few round trips."""
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            batch, self._outbox = self._outbox, []
            try:
                await submit(self.client, batch)
                self.reports += len(batch)
            except Exception as exc:  # Valkey trouble: keep the events (in order) and retry
                self.report_errors += 1
                log.warning("cannot reach Valkey (%s); %d events waiting", exc, len(batch))
                self._outbox[:0] = batch
                await asyncio.sleep(0.2)
                self._outbox_ready.set()

    # -- figures -----------------------------------------------------------------------------------

    def revision_stats(self, spec: RevisionSpec) -> dict[str, Any]:
        members = self.by_revision[spec.name]
        phases = {phase.value: 0 for phase in Phase}
        for pod in members:
            phases[pod.phase.value] += 1
        return {
            "pods": len(members),
            "phases": phases,
            "stalled": sum(p.stalled() for p in members),
            "in_flight": sum(p.active for p in members),
            "served": sum(p.served for p in members),
            "websocket_sessions": sum(p.sessions for p in members),
            "refused_busy": sum(p.refused + (p.app.refused if p.app else 0) for p in members),
            "violations": sum(p.violations for p in members),
            "cut_by_crash": sum(p.cut for p in members),
            "deaths": sum(p.deaths for p in members),
            "restarts": sum(p.restarts for p in members),
            "flaps": sum(p.flaps for p in members),
            "stalls": sum(p.stalls for p in members),
            "drains": sum(p.drains for p in members),
            "kv_hit_blocks": sum(p.kv_hit_blocks for p in members),
            "kv_blocks": sum(p.kv_blocks for p in members),
        }

    def stats(self) -> dict[str, Any]:
        revisions = {spec.name: self.revision_stats(spec) for spec in self.scenario.revisions}
        totals = {
            key: sum(r[key] for r in revisions.values())
            for key in ("pods", "served", "violations", "cut_by_crash", "deaths", "restarts", "flaps", "stalls",
                        "drains", "refused_busy")
        }  # fmt: skip
        return {"revisions": revisions, **totals, "reports": self.reports, "fd_limit": self.fd_limit}


# ---- CLI -------------------------------------------------------------------------------------------


async def _serve(args: argparse.Namespace) -> dict[str, Any]:
    from statesync.connect import connect

    scenario = load_scenario(args.scenario)
    client = connect(args.valkey)
    sim = PodSimulator(scenario, client)
    try:
        await sim.start(churn=not args.no_churn, route=not args.no_route)
        await sim.wait_serving(timeout=60 + max(r.load_s for r in scenario.revisions))
        print(f"serving {len(sim.pods)} pods from {sim.pods[0].ip}:{scenario.port} to "
              f"{sim.pods[-1].ip}:{scenario.port}", flush=True)  # fmt: skip
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            sim.loop.add_signal_handler(sig, stop.set)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(args.duration or None):
                await stop.wait()
        await sim.flush()
        return sim.stats()
    finally:
        await sim.stop()
        await client.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastproxy.devtools.simulator",
                                     description="Thousands of simulated inference pods in one process.")  # fmt: skip
    parser.add_argument("--scenario", default=str(default_scenario_path()), help="scenario YAML file")
    parser.add_argument("--valkey", required=True, help="Valkey URL of the writer's stream")
    parser.add_argument("--duration", type=float, default=0, help="seconds to run (0: until SIGTERM)")
    parser.add_argument("--no-churn", action="store_true", help="pods only: no deaths, flaps, stalls, drains")
    parser.add_argument("--no-route", action="store_true", help="do not submit the scenario's route")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvloop

    try:
        stats = uvloop.run(_serve(args))
    except (ScenarioError, RuntimeError) as exc:
        print(f"simulator: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(stats), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

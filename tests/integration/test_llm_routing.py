"""LLM routes over real sockets: model routing by the JSON body, bodies forwarded unchanged, clear
refusals, prefix affinity that two routers agree on, adapter affinity, the body's deadline, and
the bounded wait for busy affine pods (off by default, bounded, deadline kept, never two requests
on a CC=1 pod; per route, over the router's flag; each wait's outcome in /metrics)."""

from __future__ import annotations

import asyncio

import httpx
import msgspec
import pytest

from fastproxy.admin import start_admin
from fastproxy.affinity import WAIT_CANDIDATES, maglev_of
from fastproxy.devtools.upstream import AppServer
from fastproxy.llm import prefix_key
from fastproxy.proxy import Exchange
from fastproxy.router import Router
from statesync.schema import Route, WeightedRevision
from tests.conftest import RouterHarness, exchange, pod_record, status_of, wait_for


def llm_route(service: str = "chat", revision: str = "chat-v1", **llm: object) -> Route:
    return msgspec.convert(
        {"service": service, "hosts": ["api.local"] if service == "chat" else ["other.local"],
         "revisions": [{"revision": revision}], "llm": llm},
        Route,
    )  # fmt: skip


def plain_route(service: str, revision: str) -> Route:
    return Route(
        service=service, hosts=(f"{service}.local",), revisions=(WeightedRevision(revision=revision),)
    )


def chat_body(model: str, system: str, user: str, **extra: object) -> bytes:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    return msgspec.json.encode({"model": model, "messages": messages, **extra})


async def post(port: int, body: bytes, path: str = "/v1/chat/completions", **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        return await client.post(path, content=body, headers={"host": "api.local", **headers})


async def test_model_field_picks_the_service_and_the_body_reaches_the_pod_unchanged(
    harness: RouterHarness,
) -> None:
    llama, mistral, default = await harness.app(), await harness.app(), await harness.app()
    pods = [pod_record("l1", llama.address, "llama-v1"), pod_record("m1", mistral.address, "mistral-v1"),
            pod_record("d1", default.address, "chat-v1")]  # fmt: skip
    routes = [
        llm_route(models={"llama-3": "llama", "mistral-7b": "mistral"}),
        plain_route("llama", "llama-v1"),
        plain_route("mistral", "mistral-v1"),
    ]
    _, port = await harness.router(pods, routes)
    # key order, spacing and unicode as the client sent them: nothing is re-encoded
    body = b'{ "messages": [{"role":"user","content":"h\\u00e9llo \xc3\xa9"}],\n  "model" : "mistral-7b", "x": 1}'
    r = await post(port, body)
    assert r.status_code == 200
    assert [req.body for req in mistral.requests] == [body] and not llama.requests
    r = await post(port, chat_body("llama-3", "sys", "hi"))
    assert r.status_code == 200 and len(llama.requests) == 1
    r = await post(port, chat_body("some-adapter", "sys", "hi"))  # not in models: the route's own
    assert r.status_code == 200 and len(default.requests) == 1

    async def chunks():
        for piece in (body[:10], body[10:50], body[50:]):
            yield piece

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        r = await client.post("/v1/chat/completions", content=chunks(), headers={"host": "api.local"})
    assert r.status_code == 200 and mistral.requests[-1].body == body


async def test_unroutable_bodies_get_a_clear_400_or_413_and_the_pod_sees_nothing(
    harness: RouterHarness,
) -> None:
    app = await harness.app()
    _, port = await harness.router([pod_record("p1", app.address)], [llm_route(max_body_bytes=1024)])
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", headers={"host": "api.local"}
    ) as client:
        for body, text in (
            (b"model=llama", b"not JSON"),
            (b'["model"]', b"not a JSON object"),
            (b'{"messages": []}', b"no 'model' field"),
            (b'{"model": 1}', b"Expected `str | null`, got `int`"),
            (b"", b"empty"),
        ):
            r = await client.post("/v1/chat/completions", content=body)
            assert r.status_code == 400 and text in r.content, (body, r.content)
        # the connection survived every 400 (the body was read to its end); a GET has no body
        r = await client.get("/v1/models")
        assert r.status_code == 400 and b"empty" in r.content
        r = await client.post("/v1/chat/completions", content=chat_body("m", "s" * 2000, "u"))
        assert r.status_code == 413 and b"up to 1024 bytes" in r.content
    assert app.requests == []


async def test_require_model_false_sends_unroutable_bodies_to_the_route_itself(
    harness: RouterHarness,
) -> None:
    app = await harness.app()
    _, port = await harness.router(
        [pod_record("p1", app.address)], [llm_route(require_model=False, max_body_bytes=300)]
    )
    for body in (b"not json", b'{"messages": []}', chat_body("m", "s" * 1000, "u")):
        r = await post(port, body)
        assert r.status_code == 200
    assert [req.body for req in app.requests][-1] == chat_body("m", "s" * 1000, "u")


async def test_expect_continue_is_answered_by_the_router_and_the_body_forwarded(
    harness: RouterHarness,
) -> None:
    app = await harness.app()
    _, port = await harness.router([pod_record("p1", app.address)], [llm_route()])
    body = chat_body("m", "sys", "hi")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.local\r\nExpect: 100-continue\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body))  # fmt: skip
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    writer.write(body)
    final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert status_of(final) == 200
    writer.close()
    assert app.requests[0].body == body


async def test_a_trickled_body_times_out_with_408_holding_no_pod(harness: RouterHarness) -> None:
    app = await harness.app()
    router, port = await harness.router([pod_record("p1", app.address)], [llm_route()], header_timeout=0.3)
    response = await exchange(
        port,
        b'POST /v1/completions HTTP/1.1\r\nHost: api.local\r\nContent-Length: 100\r\n\r\n{"model"',
        timeout=5,
    )
    assert status_of(response) == 408 and b"request body not received within 0.3s" in response
    assert router.slots.revisions["chat-v1"].inflight_total == 0 and app.requests == []


async def test_prefix_affinity_keeps_a_conversation_on_one_pod_and_two_routers_agree(
    harness: RouterHarness,
) -> None:
    apps = [await harness.app() for _ in range(6)]
    pods = [pod_record(f"p{i}", app.address, concurrency=4) for i, app in enumerate(apps)]
    routes = [llm_route(policy="prefix", prefix_bytes=200)]
    _, port_a = await harness.router(pods, routes)
    _, port_b = await harness.router(list(reversed(pods)), routes)

    def served_by(count_before: list[int]) -> int:
        (index,) = [i for i, app in enumerate(apps) if len(app.requests) > count_before[i]]
        return index

    homes = {}
    for conversation in range(8):
        system = f"You are assistant number {conversation}. " * 8  # > 200 bytes: the key is the system prompt
        seen = set()
        for turn in range(4):
            before = [len(app.requests) for app in apps]
            port = port_a if turn % 2 == 0 else port_b
            r = await post(port, chat_body("m", system, f"turn {turn}"))
            assert r.status_code == 200
            seen.add(served_by(before))
        assert len(seen) == 1, f"conversation {conversation} moved between pods: {seen}"
        homes[conversation] = seen.pop()
    assert len(set(homes.values())) > 1  # different prompts spread over pods


async def test_adapter_requests_prefer_pods_that_advertise_it(harness: RouterHarness) -> None:
    apps = [await harness.app() for _ in range(4)]
    pods = [pod_record(f"p{i}", app.address) for i, app in enumerate(apps)]
    pods[2] = msgspec.structs.replace(pods[2], adapters=("sql-lora",))
    _, port = await harness.router(pods, [llm_route()])
    for _ in range(5):
        assert (await post(port, chat_body("sql-lora", "s", "u"))).status_code == 200
    assert [len(app.requests) for app in apps] == [0, 0, 5, 0]


async def test_a_least_inflight_route_on_pods_without_adapters_builds_no_table(
    harness: RouterHarness,
) -> None:
    apps = [await harness.app() for _ in range(3)]
    pods = [pod_record(f"p{i}", app.address, concurrency=2) for i, app in enumerate(apps)]
    router, port = await harness.router(pods, [llm_route()])
    for _ in range(6):  # every request names its model, which the pick takes for an adapter
        assert (await post(port, chat_body("llama-3", "s", "u"))).status_code == 200
    assert sorted(len(app.requests) for app in apps) == [2, 2, 2]
    index = router.slots.revisions["chat-v1"].ring
    assert index is not None and not index.built and index.entries == []  # type: ignore[attr-defined]


async def test_service_named_by_models_without_a_route_is_503(harness: RouterHarness) -> None:
    app = await harness.app()
    _, port = await harness.router([pod_record("p1", app.address)], [llm_route(models={"m": "nowhere"})])
    r = await post(port, chat_body("m", "s", "u"))
    assert r.status_code == 503 and b"served by service 'nowhere', which has no route" in r.content
    assert app.requests == []


# ---- the bounded wait for the affine pods (--affinity-wait-ms) ------------------------------------


async def three_pods_and_a_busy_key(
    harness: RouterHarness, route_wait_ms: int | None = None, **config: object
) -> tuple[Router, int, list[AppServer], dict[str, AppServer], str, list[str]]:
    """Three CC=1 pods on a prefix route keyed by a session header (with ``affinity_wait_ms:
    route_wait_ms`` unless None), and a session whose two affine pods (the candidates a request
    may wait for) are distinct."""
    apps = [await harness.app(concurrency_limit=1) for _ in range(3)]
    by_uid = {f"p{i}": app for i, app in enumerate(apps)}
    pods = [pod_record(uid, app.address) for uid, app in by_uid.items()]
    wait = {} if route_wait_ms is None else {"affinity_wait_ms": route_wait_ms}
    routes = [llm_route(policy="prefix", session_header="x-session", **wait), plain_route("plain", "chat-v1")]
    router, port = await harness.router(pods, routes, **config)
    router.slots.materialize_pending(100)  # (as a first request would: the table needs the pods)
    maglev = maglev_of(router.slots.revisions["chat-v1"])
    for n in range(100):
        session = f"conversation-{n}"
        at = prefix_key(session.encode(), 1024) % maglev.size
        candidates = [maglev.entries[(at + i) % maglev.size].uid for i in range(WAIT_CANDIDATES)]
        if len(set(candidates)) == len(candidates):
            return router, port, apps, by_uid, session, candidates
    raise AssertionError("no session with distinct candidates")


async def timed_post(port: int, session: str, path: str = "/v1/chat/completions", host: str = "api.local"):
    loop = asyncio.get_running_loop()
    began = loop.time()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        r = await client.post(path, content=chat_body("m", "sys", "hi"),
                              headers={"host": host, "x-session": session})  # fmt: skip
    return r, loop.time() - began


async def occupy(
    port: int,
    session: str,
    by_uid: dict[str, AppServer],
    uid: str,
    path: str = "/hang",
    host: str = "api.local",
) -> asyncio.Task:
    """A request of ``session`` that holds pod ``uid`` (``/hang``: until ``release`` cancels it;
    a timed hold could end while a loaded machine starves the test); it must land there."""
    app = by_uid[uid]
    before = app.request_count
    task = asyncio.create_task(timed_post(port, session, path, host))
    await app.wait_until(lambda: app.request_count > before, timeout=5)
    return task


async def release(holds: list[asyncio.Task], apps: list[AppServer]) -> None:
    """End held requests: their pods' apps stop (dropping the hung connections; the router answers
    those requests 502 and gets its slots back)."""
    for app in apps:
        await app.close()
    await asyncio.gather(*holds, return_exceptions=True)


def served(by_uid: dict[str, AppServer], path: str = "/v1/chat/completions") -> list[str]:
    return [uid for uid, app in by_uid.items() for req in app.requests if req.target == path.encode()]


async def test_affinity_wait_is_off_by_default_a_busy_affine_pod_spills_at_once(
    harness: RouterHarness,
) -> None:
    router, port, apps, by_uid, session, candidates = await three_pods_and_a_busy_key(harness)
    assert router.config.affinity_wait_ms == 0
    holds = [await occupy(port, session, by_uid, uid) for uid in candidates]
    r, _ = await timed_post(port, session)
    assert r.status_code == 200  # (waiting for a hung pod would never end)
    (other,) = set(by_uid) - set(candidates)
    assert served(by_uid) == [other]
    await release(holds, apps)
    assert all(app.violations == 0 and app.max_concurrent_seen <= 1 for app in apps)


async def test_affinity_wait_hands_the_first_freed_affine_pod_over_and_never_double_books(
    harness: RouterHarness,
) -> None:
    router, port, apps, by_uid, session, candidates = await three_pods_and_a_busy_key(
        harness, affinity_wait_ms=8000
    )
    revision = router.slots.revisions["chat-v1"]
    first = await occupy(port, session, by_uid, candidates[0], "/delay/300")
    hung = await occupy(port, session, by_uid, candidates[1])
    r, elapsed = await timed_post(port, session)
    # it waited for the first candidate (the free third pod was not taken) and got its slot
    assert r.status_code == 200 and 0.2 < elapsed < 7.0
    assert served(by_uid) == [candidates[0]]
    assert revision.affine_queued == 0 and not revision.affine
    await first
    await release([hung], apps)
    await wait_for(lambda: revision.inflight_total == 0, what="every slot back")
    assert all(app.violations == 0 and app.max_concurrent_seen <= 1 for app in apps)


async def test_affinity_wait_is_bounded_then_any_free_pod_at_once(harness: RouterHarness) -> None:
    router, port, apps, by_uid, session, candidates = await three_pods_and_a_busy_key(
        harness, affinity_wait_ms=300
    )
    holds = [await occupy(port, session, by_uid, uid) for uid in candidates]
    (other,) = set(by_uid) - set(candidates)
    for turn in (1, 2):  # each request waits once, for its own bound
        r, elapsed = await timed_post(port, session)
        assert r.status_code == 200 and served(by_uid) == [other] * turn
        # the bound (not the hung pods, not the 10 s queue timeout); the upper end allows for
        # a loaded machine
        assert 0.28 < elapsed < 5.0
    await release(holds, apps)
    revision = router.slots.revisions["chat-v1"]
    assert revision.affine_queued == 0 and not revision.affine
    assert all(app.violations == 0 and app.max_concurrent_seen <= 1 for app in apps)


async def test_affinity_wait_keeps_the_queue_deadline(harness: RouterHarness) -> None:
    # a wait longer than queue_timeout is cut to it; then, no pod free, the FIFO and its deadline
    router, port, apps, by_uid, session, candidates = await three_pods_and_a_busy_key(
        harness, affinity_wait_ms=30_000, queue_timeout=1.5
    )
    holds = [await occupy(port, session, by_uid, uid) for uid in candidates]
    r, elapsed = await timed_post(port, session)
    assert r.status_code == 200 and 1.45 < elapsed < 10.0
    (other,) = set(by_uid) - set(candidates)
    assert served(by_uid) == [other]
    # the third pod taken by a plain request meanwhile: the wait ends, no pod is free -> 503
    waiting = asyncio.create_task(timed_post(port, session))
    revision = router.slots.revisions["chat-v1"]
    await wait_for(lambda: revision.affine_queued == 1, what="the affine wait")
    holds.append(await occupy(port, "", by_uid, other, host="plain.local"))  # (least-in-flight: the free pod)
    r, elapsed = await waiting
    assert r.status_code == 503 and b"no free slot in revision chat-v1 within 1.5s" in r.content
    assert 2.9 < elapsed < 10.0  # the wait (1.5 s), then the FIFO's own deadline (1.5 s)
    assert revision.affine_queued == 0 and revision.queued == 0
    await release(holds, apps)
    assert all(app.violations == 0 for app in apps)


async def test_a_client_leaving_during_an_affinity_wait_frees_everything(harness: RouterHarness) -> None:
    router, port, apps, by_uid, session, candidates = await three_pods_and_a_busy_key(
        harness, affinity_wait_ms=8000
    )
    revision = router.slots.revisions["chat-v1"]
    holds = [await occupy(port, session, by_uid, uid) for uid in candidates]
    body = chat_body("m", "sys", "hi")
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.local\r\nx-session: %s\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (session.encode(), len(body), body))  # fmt: skip
    await wait_for(lambda: revision.affine_queued == 1, what="the affine wait")
    writer.close()
    await wait_for(lambda: revision.affine_queued == 0 and not revision.affine, what="the wait's end")
    assert revision.queued_bytes == 0
    await release(holds, apps)
    await wait_for(lambda: revision.inflight_total == 0, what="every slot back")
    assert served(by_uid) == [] and all(app.violations == 0 for app in apps)


async def test_affinity_wait_under_load_never_double_books_a_cc1_pod(harness: RouterHarness) -> None:
    apps = [await harness.app(concurrency_limit=1) for _ in range(3)]
    pods = [pod_record(f"p{i}", app.address) for i, app in enumerate(apps)]
    router, port = await harness.router(
        pods, [llm_route(policy="prefix", session_header="x-session")], affinity_wait_ms=100
    )
    results = await asyncio.gather(*(timed_post(port, f"s{i % 3}", "/delay/20") for i in range(24)))
    assert [r.status_code for r, _ in results] == [200] * 24
    assert all(app.violations == 0 and app.max_concurrent_seen <= 1 for app in apps)
    revision = router.slots.revisions["chat-v1"]
    assert revision.inflight_total == 0 and revision.affine_queued == 0 and revision.queued == 0


def exchange_on(router: Router, uid: str) -> Exchange:
    (found,) = [c.exchange for c in router.connections if c.exchange is not None and c.exchange.pod
                is not None and c.exchange.pod.uid == uid]  # fmt: skip
    return found


def waiting_exchange(router: Router) -> Exchange:
    (found,) = [c.exchange for c in router.connections if c.exchange is not None and c.exchange._waiter]
    return found


@pytest.mark.parametrize("kind", ["affine", "fifo"])
async def test_a_slot_handed_to_a_waiter_whose_client_leaves_at_once_goes_back(
    harness: RouterHarness, kind: str
) -> None:
    """The hand-over and the client's leaving in one loop iteration (before the waiter's callback
    ran): the handed slot goes back, for an affine and for a FIFO waiter (it leaked before: the
    pod stayed full in this router's count for ever)."""
    router, port, apps, by_uid, session, candidates = await three_pods_and_a_busy_key(
        harness, affinity_wait_ms=8000
    )
    revision = router.slots.revisions["chat-v1"]
    holds = [await occupy(port, session, by_uid, uid) for uid in candidates]
    if kind == "fifo":  # every pod full: the request queues in the revision's FIFO
        (other,) = set(by_uid) - set(candidates)
        holds.append(await occupy(port, "", by_uid, other, host="plain.local"))
    request = asyncio.create_task(timed_post(port, session))
    await wait_for(lambda: revision.affine_queued + revision.queued == 1, what=f"the {kind} wait")
    assert (revision.affine_queued, revision.queued) == ((1, 0) if kind == "affine" else (0, 1))
    holder, waiter = exchange_on(router, candidates[0]), waiting_exchange(router)
    holder._give_back_slot()  # (as its response's end would) -> handed to the waiter
    assert waiter._waiter is not None and waiter._waiter.done()
    waiter.client_gone()  # ... whose client leaves before its callback runs
    assert router.slots.pods[candidates[0]].inflight == 0
    assert revision.affine_queued == 0 and revision.queued == 0 and revision.queued_bytes == 0
    waiter.client.abort()  # (and its connection goes, as it would have)
    await asyncio.gather(request, return_exceptions=True)
    await release(holds, apps)
    await wait_for(lambda: revision.inflight_total == 0, what="every slot back")


# ---- the wait per route (LLMRouting.affinity_wait_ms) and its metrics --------------------------


async def admin_get(router: Router, path: str) -> httpx.Response:
    """``path`` from the router's real admin listener (bearer token), over a socket."""
    admin = await start_admin(router, "127.0.0.1", 0, "t0ken")
    try:
        base = f"http://127.0.0.1:{admin.sockets[0].getsockname()[1]}"
        async with httpx.AsyncClient(base_url=base, headers={"authorization": "Bearer t0ken"}) as client:
            return await client.get(path)
    finally:
        admin.close()


def wait_counts(router: Router) -> dict[str, int]:
    return {outcome: hist.count for outcome, hist in router.stats.affinity_waits()}


NO_WAITS = {"affine": 0, "other_pod": 0, "queue": 0, "abandoned": 0}


async def test_a_routes_affinity_wait_is_used_when_the_router_flag_is_off(harness: RouterHarness) -> None:
    router, port, apps, by_uid, session, candidates = await three_pods_and_a_busy_key(
        harness, route_wait_ms=8000
    )
    assert router.config.affinity_wait_ms == 0  # the router's flag: off
    revision = router.slots.revisions["chat-v1"]
    first = await occupy(port, session, by_uid, candidates[0], "/delay/500")
    hung = await occupy(port, session, by_uid, candidates[1])
    r, elapsed = await timed_post(port, session)
    # it waited for its first candidate (the free third pod was not taken) and got its slot
    assert r.status_code == 200 and 0.3 < elapsed < 7.0
    assert served(by_uid) == [candidates[0]]
    assert wait_counts(router) == {**NO_WAITS, "affine": 1}
    assert 0.3 < router.stats.affinity_wait_affine.sum < 7.0
    (chat, _) = (await admin_get(router, "/v1/routes")).json()
    assert chat["route"]["llm"]["affinity_wait_ms"] == 8000
    assert (chat["affinity_wait_ms"], chat["affinity_wait_from"]) == (8000, "route")
    await first
    await release([hung], apps)
    await wait_for(lambda: revision.inflight_total == 0, what="every slot back")
    assert all(app.violations == 0 and app.max_concurrent_seen <= 1 for app in apps)


async def test_a_routes_affinity_wait_of_0_overrides_the_router_flag(harness: RouterHarness) -> None:
    apps = [await harness.app(concurrency_limit=1) for _ in range(3)]
    pods = [pod_record(f"p{i}", app.address) for i, app in enumerate(apps)]
    routes = [llm_route(policy="prefix", session_header="x-session", affinity_wait_ms=0),
              llm_route("other", policy="prefix", session_header="x-session")]  # fmt: skip
    router, _ = await harness.router(pods, routes, affinity_wait_ms=8000)
    by_service = router.snapshot.route_table.by_service
    chat, other = by_service["chat"].llm, by_service["other"].llm
    assert chat is not None and other is not None
    assert (chat.affinity_wait, other.affinity_wait) == (0.0, -1.0)  # -1: the router's flag holds
    views = {view["route"]["service"]: view for view in (await admin_get(router, "/v1/routes")).json()}
    assert (views["chat"]["affinity_wait_ms"], views["chat"]["affinity_wait_from"]) == (0, "route")
    assert (views["other"]["affinity_wait_ms"], views["other"]["affinity_wait_from"]) == (8000, "router")
    # A router flag of 8 s, but this route says 0: a busy affine pair spills to the free pod at once.
    router, port, apps, by_uid, session, candidates = await three_pods_and_a_busy_key(
        harness, route_wait_ms=0, affinity_wait_ms=8000
    )
    holds = [await occupy(port, session, by_uid, uid) for uid in candidates]
    r, elapsed = await timed_post(port, session)
    assert r.status_code == 200 and elapsed < 4.0  # (waiting would take 8 s: the pods hang)
    (free,) = set(by_uid) - set(candidates)
    assert served(by_uid) == [free]
    assert wait_counts(router) == NO_WAITS
    await release(holds, apps)
    assert all(app.violations == 0 and app.max_concurrent_seen <= 1 for app in apps)


@pytest.mark.parametrize("outcome", ["affine", "other_pod", "queue", "abandoned"])
async def test_each_affinity_wait_is_counted_by_how_it_ended(harness: RouterHarness, outcome: str) -> None:
    """One wait of a route with affinity_wait_ms (300 ms; 8 s to be handed a pod busy for 1 s; 3 s
    for the free pod to be taken meanwhile)
    on a router without the flag, ending each way: handed its affine pod; expired, then the free
    pod; expired with no pod free (the FIFO, then its deadline); the client gone. /metrics counts
    it under that outcome, with its time."""
    # "queue" takes the free pod while the request waits: its wait is 3 s (queue deadline 4 s), so
    # a slow machine cannot let the wait expire onto the free pod before the test has taken it.
    wait_ms = {"affine": 8000, "queue": 3000}.get(outcome, 300)
    router, port, apps, by_uid, session, candidates = await three_pods_and_a_busy_key(
        harness, route_wait_ms=wait_ms, queue_timeout=4.0 if outcome == "queue" else 1.0
    )
    revision = router.slots.revisions["chat-v1"]
    (free,) = set(by_uid) - set(candidates)
    holds = [await occupy(port, session, by_uid, candidates[0], "/delay/1000" if outcome == "affine" else "/hang"),
             await occupy(port, session, by_uid, candidates[1])]  # fmt: skip
    if outcome == "abandoned":
        body = chat_body("m", "sys", "hi")
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.local\r\nx-session: %s\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (session.encode(), len(body), body))  # fmt: skip
        await wait_for(lambda: revision.affine_queued == 1, what="the affine wait")
        writer.close()
        await wait_for(lambda: revision.affine_queued == 0, what="the wait's end")
    else:
        waiting = asyncio.create_task(timed_post(port, session))
        await wait_for(lambda: revision.affine_queued == 1, what="the affine wait")
        if outcome == "queue":  # the free pod taken meanwhile: the wait ends with no pod free
            holds.append(await occupy(port, "", by_uid, free, host="plain.local"))
        r, _ = await waiting
        expected = {"affine": (200, [candidates[0]]), "other_pod": (200, [free]), "queue": (503, [])}
        assert (r.status_code, served(by_uid)) == expected[outcome]
    assert wait_counts(router) == {**NO_WAITS, outcome: 1}
    waited = dict(router.stats.affinity_waits())[outcome].sum
    assert waited < 5.0 and (outcome in ("affine", "abandoned") or waited >= 0.29)  # (the bound: 300 ms)
    metrics = (await admin_get(router, "/metrics")).text
    for name in NO_WAITS:
        count = 1 if name == outcome else 0
        assert f'fastproxy_affinity_waits_total{{outcome="{name}"}} {count}.0' in metrics
        assert f'fastproxy_affinity_wait_seconds_count{{outcome="{name}"}} {count}.0' in metrics
    assert f'fastproxy_affinity_wait_seconds_bucket{{le="+Inf",outcome="{outcome}"}} 1.0' in metrics
    await release(holds, apps)
    await wait_for(lambda: revision.inflight_total == 0, what="every slot back")
    assert revision.affine_queued == 0 and revision.queued == 0 and revision.queued_bytes == 0
    assert all(app.violations == 0 and app.max_concurrent_seen <= 1 for app in apps)

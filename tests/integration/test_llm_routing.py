"""LLM routes over real sockets: model routing by the JSON body, bodies forwarded unchanged, clear
refusals, prefix affinity that two routers agree on, adapter affinity, the body's deadline."""

from __future__ import annotations

import asyncio

import httpx
import msgspec

from statesync.schema import Route, WeightedRevision
from tests.conftest import RouterHarness, exchange, pod_record, status_of


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

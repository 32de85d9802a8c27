"""Prefix affinity (Maglev hashing with bounded loads) on the slot table, and the body peek."""

from __future__ import annotations

import asyncio
import collections
import importlib.util
import pathlib
import random
import time

import msgspec
import pytest

from fastproxy import affinity
from fastproxy.affinity import Maglev, maglev_of, prefix_affinity
from fastproxy.config import ConfigError, RouterConfig, load_routes_file
from fastproxy.errors import BadBody, PayloadTooLarge
from fastproxy.exchange import RequestHead
from fastproxy.llm import LLMRoute, prefix_key
from fastproxy.router import Router
from fastproxy.slots import SlotTable
from statesync.schema import AffinityPolicy, LLMRouting, PodRecord, PodState, Route, WeightedRevision


def pod(
    uid: str, cc: int = 1, state: PodState = PodState.READY, gen: int = 1, adapters: tuple[str, ...] = ()
) -> PodRecord:
    return PodRecord(uid=uid, namespace="ml", revision="r", ip="127.0.0.3", port=9000, concurrency=cc,
                     state=state, generation=gen, adapters=adapters)  # fmt: skip


def table_of(records: list[PodRecord], seed: int = 0) -> SlotTable:
    table = SlotTable(seed=seed)
    table.update(records)
    return table


def keys(n: int, seed: int = 1) -> list[int]:
    rng = random.Random(seed)
    return [rng.getrandbits(64) for _ in range(n)]


def affine_pod(table: SlotTable, key: int) -> str:
    """Where ``key`` goes on an idle table (and give the slot back)."""
    lease = affinity.pick(table, "r", key, None, 0.25)
    assert lease is not None
    lease[0]()
    return lease[1].uid


def test_same_key_same_pod_and_routers_agree_whatever_the_order_they_learned_pods_in() -> None:
    uids = [f"p{i}" for i in range(20)]
    one = table_of([pod(u) for u in uids], seed=1)
    shuffled = uids[:]
    random.Random(5).shuffle(shuffled)
    other = table_of([pod(u) for u in shuffled], seed=99)
    for key in keys(200):
        first = affine_pod(one, key)
        assert affine_pod(one, key) == first
        assert affine_pod(other, key) == first
    # and keys spread over the pods
    spread = collections.Counter(affine_pod(one, key) for key in keys(2000, seed=3))
    assert len(spread) == 20


def test_keys_are_shared_evenly_whatever_the_uids() -> None:
    """Maglev: every pod owns size // pods or one more entries (a ring's shares varied ~1.9x)."""
    table = table_of([pod(f"pod-{i:04x}-{i * 7919:x}") for i in range(16)])
    maglev = maglev_of(table.revisions["r"])
    assert maglev.size == 4099 and len(maglev.entries) == 4099
    owned = collections.Counter(p.uid for p in maglev.entries)
    assert len(owned) == 16 and max(owned.values()) - min(owned.values()) <= 1
    picked = collections.Counter(affine_pod(table, key) for key in keys(16_000, seed=4))
    assert max(picked.values()) / min(picked.values()) < 1.15  # (sampling noise of 1000 per pod)


def test_table_after_changes_equals_a_table_built_from_scratch() -> None:
    table = table_of([pod(f"p{i}") for i in range(30)])
    revision = table.revisions["r"]
    first = maglev_of(revision)
    table.update(
        [pod("p3", state=PodState.REMOVED), pod("new-1"), pod("p7", state=PodState.NOT_READY, gen=2)]
    )
    table.update([pod("new-2", adapters=("lora-a",)), pod("p8", adapters=("lora-a", "lora-b"), gen=2)])
    assert first.due and not first.stale  # 4 changes > 30 >> 3: the sweep's, not a pick's
    affine_pod(table, 1)
    assert revision.ring is first
    assert affinity.rebuild_due(table) == first.size
    now = revision.ring
    assert isinstance(now, Maglev) and now is not first and not now.due and not now.stale
    fresh = Maglev(revision.members.values())
    assert [p.uid for p in now.entries] == [p.uid for p in fresh.entries]
    assert "p3" not in {p.uid for p in now.entries} and "p7" in {p.uid for p in now.entries}
    assert sorted(now.adapters) == sorted(fresh.adapters) == ["lora-a", "lora-b"]
    for name in fresh.adapters:
        assert [p.uid for p in now.adapters[name].entries] == [p.uid for p in fresh.adapters[name].entries]
    assert now.adapter_pods == 2
    table.update([pod("p8", gen=3)])  # unloaded both adapters
    assert now.adapter_pods == 1 and now.changes == 1
    table.update([pod("p9", gen=2)])  # a change that is no join, leave or adapter change
    assert now.changes == 1 and affinity.rebuild_due(table) == 0


def test_a_pick_rebuilds_only_a_table_that_is_absent_or_badly_out_of_date() -> None:
    table = table_of([pod(f"p{i}") for i in range(600)])  # due after 600 >> 3 = 75, stale after 300
    revision = table.revisions["r"]
    first = maglev_of(revision)
    gone = first.entries[keys(1)[0] % first.size].uid
    table.update([pod(gone, state=PodState.REMOVED)])
    for key in keys(300):
        assert affine_pod(table, key) != gone  # skipped until the rebuild
    table.update([pod(f"new-{i}") for i in range(75)])
    assert first.due and not first.stale
    for key in keys(50):
        affine_pod(table, key)
    assert revision.ring is first  # a few pending changes: no pick pays for a rebuild
    table.update([pod(f"more-{i}") for i in range(225)])  # 301 changes: more than half the pods
    assert first.stale
    affine_pod(table, 1)
    assert revision.ring is not first and revision.ring.pods == 899  # type: ignore[union-attr]
    assert affinity.rebuild_due(table) == 0


def test_the_sweep_rebuilds_within_its_budget_and_never_puts_a_large_table_off() -> None:
    table = SlotTable(seed=0)
    table.update([msgspec.structs.replace(pod(f"{r}-{i}"), revision=r) for r in "abc" for i in range(10)])
    for name in "abc":
        assert affinity.pick(table, name, 5, None, 0.25) is not None
    table.update([msgspec.structs.replace(pod(f"{r}-new{i}"), revision=r) for r in "abc" for i in range(2)])
    assert affinity.rebuild_due(table, budget=1) == 4099  # one table a tick, however small the budget
    assert affinity.rebuild_due(table, budget=2 * 4099) == 2 * 4099
    assert affinity.rebuild_due(table, budget=1) == 0
    assert all(revision.ring.pods == 12 for revision in table.revisions.values())  # type: ignore[union-attr]


def test_the_routers_periodic_sweep_rebuilds_a_due_table_without_a_pick() -> None:
    loop = asyncio.new_event_loop()
    try:
        router = Router(RouterConfig(), loop)
        router.slots.update([pod(f"p{i}") for i in range(40)])
        assert affinity.pick(router.slots, "r", 1, None, 0.25) is not None
        revision = router.slots.revisions["r"]
        first = revision.ring
        router.slots.update([pod(f"new-{i}") for i in range(6)])  # 6 > 40 >> 3
        assert first.due  # type: ignore[union-attr]
        deadline = time.monotonic() + 10
        while revision.ring is first:  # (the sweep, driven as its timer would)
            assert time.monotonic() < deadline, "the sweep never rebuilt the due table"
            router.sweep_timeouts()
        assert revision.ring.pods == 46 and not revision.ring.due  # type: ignore[union-attr]
    finally:
        loop.close()


def test_no_table_is_built_for_an_adapter_when_no_pod_advertises_one() -> None:
    table = table_of([pod(f"p{i}", cc=2) for i in range(20)])
    revision = table.revisions["r"]
    for _ in range(10):
        assert affinity.pick(table, "r", None, "llama-3", 0.25) is not None
    index = revision.ring
    assert isinstance(index, Maglev) and not index.built and index.size == 0 and index.entries == []
    table.update([pod("lora-pod", adapters=("sql",))])
    assert index.adapter_pods == 1
    lease = affinity.pick(table, "r", None, "sql", 0.25)
    assert lease is not None and lease[1].uid == "lora-pod"
    assert isinstance(revision.ring, Maglev) and revision.ring.built and revision.ring.adapter_pods == 1
    table.update([pod("lora-pod", adapters=(), gen=2)])
    assert revision.ring.adapter_pods == 0


def uid_shares(maglev: Maglev, sample: list[int]) -> list[str]:
    return [maglev.entries[key % maglev.size].uid for key in sample]


@pytest.mark.parametrize("pods", [16, 200])
def test_a_pod_leaving_or_joining_moves_mostly_its_own_keys(pods: int) -> None:
    """Maglev is not minimally disruptive (a ring is): measured, the keys that move when one pod
    leaves are ~1.2x its own at 16 pods and ~5x at 200 (~7x at 1000; tables of 16+ entries a pod)."""
    table = table_of([pod(f"p{i}") for i in range(pods)])
    members = list(table.revisions["r"].members.values())
    sample = keys(20_000, seed=2)
    before = uid_shares(Maglev(members), sample)
    gone = members[pods // 3]
    after = uid_shares(Maglev([m for m in members if m is not gone]), sample)
    own = sum(uid == gone.uid for uid in before)
    moved = sum(a != b for a, b in zip(before, after, strict=True))
    assert own > 0 and gone.uid not in after
    assert moved <= (1.5 if pods == 16 else 6.0) * own
    assert moved <= 0.1 * len(sample) if pods == 16 else moved <= 0.03 * len(sample)
    # a pod joining takes its share, mostly from where it lands
    table.update([pod("newcomer")])
    joined = uid_shares(Maglev(table.revisions["r"].members.values()), sample)
    taken = sum(uid == "newcomer" for uid in joined)
    moved = sum(a != b for a, b in zip(before, joined, strict=True))
    assert 0.5 / (pods + 1) < taken / len(sample) < 2 / (pods + 1)
    assert moved <= (1.5 if pods == 16 else 6.0) * taken


def test_the_compiled_and_the_pure_table_are_the_same() -> None:
    """Routers agree only if every build computes the same table (the compiled fill is a C loop)."""
    source = pathlib.Path(affinity.__file__).with_name("affinity.py")
    spec = importlib.util.spec_from_file_location("affinity_pure_copy", source)
    assert spec is not None and spec.loader is not None
    pure = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pure)
    table = table_of([pod(f"p{i}", adapters=("sql",) if i % 3 == 0 else ()) for i in range(40)])
    members = list(table.revisions["r"].members.values())
    loaded, interpreted = Maglev(members), pure.Maglev(members)
    assert [p.uid for p in loaded.entries] == [p.uid for p in interpreted.entries]
    sql, sql_pure = loaded.adapters["sql"], interpreted.adapters["sql"]
    assert [p.uid for p in sql.entries] == [p.uid for p in sql_pure.entries]


# word_hash of the first n bytes of _COUNTING for a few n, and of a prompt: the values every router must
# compute. A change here sends every key to another pod (a rolling upgrade moves them once).
_COUNTING = bytes(range(256)) * 4
GOLDEN_HASHES = {0: 0x1ECEECEA7E170282, 1: 0x4DC1262558BBC246, 7: 0xD0D5FF9EB5423B33, 8: 0xBEC423FAE944C03A,
                 9: 0x2837385916360CDC, 64: 0x0704FE2D78A47722, 1000: 0xA8F8924CF60AA762}  # fmt: skip
GOLDEN_PROMPT = (b'[{"role":"system","content":"You are a helpful assistant."}]', 0xA7DC1C3E8A72A06C)


def test_prompt_hash_is_the_same_in_the_compiled_and_the_pure_form_and_fixed() -> None:
    """Routers agree only if every router hashes a prompt to the same key (the compiled hash reads
    the words from memory, the pure one unpacks them): both forms, every tail length, pinned values."""
    from fastproxy import llm

    source = pathlib.Path(llm.__file__).with_name("llm.py")
    spec = importlib.util.spec_from_file_location("llm_pure_copy", source)
    assert spec is not None and spec.loader is not None
    pure = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pure)
    rng = random.Random(5)
    for n in [*range(0, 80), 1000, 1023, 4096, 5003]:
        data = rng.randbytes(n)
        for cut in {n, n // 2, max(0, n - 1)}:
            assert llm.word_hash(data, cut) == pure.word_hash(data, cut), (n, cut)
    assert {n: llm.word_hash(_COUNTING, n) for n in GOLDEN_HASHES} == GOLDEN_HASHES
    assert {n: pure.word_hash(_COUNTING, n) for n in GOLDEN_HASHES} == GOLDEN_HASHES
    prompt, value = GOLDEN_PROMPT
    assert llm.prefix_key(msgspec.Raw(prompt), 1024) == pure.prefix_key(prompt, 1024) == value
    with pytest.raises(ValueError, match="word_hash of 9 bytes of 8"):
        llm.word_hash(b"12345678", 9)  # (the compiled form would read past the end)


def test_prefix_key_hashes_only_the_first_prefix_bytes() -> None:
    base = b'[{"role":"system","content":"' + b"x" * 100
    assert (
        prefix_key(msgspec.Raw(base + b"A"), 64) == prefix_key(base + b"B", 64) == prefix_key(base[:64], 64)
    )
    assert prefix_key(base + b"A", 1024) != prefix_key(base + b"B", 1024)
    assert prefix_key(b"ab", 1024) != prefix_key(b"ab\0", 1024)  # (the length is hashed too)
    # one byte changed anywhere in the prefix changes the key
    keys_seen = {prefix_key(base[:i] + b"!" + base[i + 1 :], 1024) for i in range(len(base))}
    assert len(keys_seen) == len(base)


def test_busy_affine_pod_spills_to_the_next_and_never_double_books() -> None:
    table = table_of([pod(f"p{i}") for i in range(4)])
    key = keys(1)[0]
    leases = [affinity.pick(table, "r", key, None, 0.25) for _ in range(4)]
    assert all(lease is not None for lease in leases)
    assert len({lease[1].uid for lease in leases if lease}) == 4  # CC=1: four different pods
    assert affinity.pick(table, "r", key, None, 0.25) is None  # full: nobody is booked twice
    revision = table.revisions["r"]
    assert revision.inflight_total == 4
    leases[2][0]()  # type: ignore[index]
    again = affinity.pick(table, "r", key, None, 0.25)
    assert again is not None and again[1].uid == leases[2][1].uid  # type: ignore[index]


def test_bounded_load_keeps_a_hot_key_within_one_plus_epsilon_of_average() -> None:
    table = table_of([pod(f"p{i}", cc=8) for i in range(4)])
    hot = keys(1)[0]
    for _ in range(16):  # half the fleet's slots, all for one key
        assert affinity.pick(table, "r", hot, None, 0.25) is not None
    loads = sorted(p.inflight for p in table.pods.values())
    # average 4 per pod; an affine pod takes at most ceil(1.25 * average so far) -> <= 5 here
    assert max(loads) <= 5 and sum(loads) == 16
    revision = table.revisions["r"]
    assert revision.capacity == 32 and revision.inflight_total == 16


def test_counters_follow_enter_leave_exclude_and_release() -> None:
    table = table_of([pod("a", cc=2), pod("b", cc=3)])
    revision = table.revisions["r"]
    assert revision.capacity == 5
    lease = table.pick("r")
    assert lease is not None and revision.inflight_total == 1
    table.update([pod("b", cc=3, state=PodState.NOT_READY, gen=2)])
    assert revision.capacity == 2
    table.exclude("a")
    assert revision.capacity == 0
    lease[0]()
    assert revision.inflight_total == 0
    table.readmit("a")
    table.update([pod("b", cc=4, gen=3)])
    assert revision.capacity == 6


def test_pending_revision_is_materialized_before_its_table() -> None:
    table = SlotTable(seed=0)
    table.replace_all([pod(f"p{i}", cc=2) for i in range(5)])
    assert table.revisions["r"].pending is not None
    lease = affinity.pick(table, "r", keys(1)[0], None, 0.25)
    assert lease is not None and table.revisions["r"].capacity == 10
    assert maglev_of(table.revisions["r"]).pods == 5


def test_adapter_pods_are_preferred_while_free_then_any_pod() -> None:
    table = table_of([pod(f"p{i}") for i in range(6)] + [pod("lora-1", adapters=("sql",)),
                                                         pod("lora-2", adapters=("sql", "chat"))])  # fmt: skip
    revision = table.revisions["r"]
    got = [prefix_affinity(revision, key, "sql") for key in keys(2)]
    assert {lease[1].uid for lease in got if lease} == {"lora-1", "lora-2"}
    third = prefix_affinity(revision, keys(1, seed=9)[0], "sql")
    assert third is not None and third[1].uid.startswith("p")  # both busy: any free pod
    # an adapter nobody advertises is no preference (and grows nothing)
    assert prefix_affinity(revision, keys(1)[0], "unknown") is not None
    assert "unknown" not in maglev_of(revision).adapters


def test_no_free_pod_is_none_and_unroutable_pods_are_skipped() -> None:
    table = table_of([pod("a", state=PodState.NOT_READY), pod("b", state=PodState.DRAINING)])
    assert affinity.pick(table, "r", 1, None, 0.25) is None
    table.update([pod("c")])
    for key in keys(20):
        assert affine_pod(table, key) == "c"


# ---- the body peek ----------------------------------------------------------------------------------


def head(session: bytes | None = None) -> RequestHead:
    h = RequestHead()
    if session is not None:
        h.headers = [(b"x-session", session)]
    return h


def route(**config: object) -> LLMRoute:
    return LLMRoute("chat", msgspec.convert(config, LLMRouting))  # as a routes file or Valkey gives it


def body(**fields: object) -> bytes:
    return msgspec.json.encode(fields)


def test_peek_reads_model_adapter_and_prompt_key() -> None:
    llm = route(policy="prefix", models={"llama": "llama-svc"}, prefix_bytes=32)
    request = llm.begin()
    messages = [{"role": "system", "content": "You are terse." * 10}, {"role": "user", "content": "hi"}]
    llm.read(request, body(model="llama", messages=messages, stream=True), True, head())
    assert (request.model, request.service, request.adapter) == ("llama", "llama-svc", "llama")
    assert request.key == prefix_key(msgspec.json.encode(messages), 32)
    # same first 32 bytes of the prompt, different turn: same key
    later = llm.begin()
    llm.read(
        later, body(messages=[*messages, {"role": "user", "content": "more"}], model="other"), True, head()
    )
    assert later.key == request.key and later.service is None  # not in models: the route's own


def test_peek_session_header_beats_the_prompt_and_completions_prompt_is_used() -> None:
    llm = route(policy="prefix", session_header="x-session")
    a, b = llm.begin(), llm.begin()
    llm.read(a, body(model="m", prompt="one"), True, head(b"s-1"))
    llm.read(b, body(model="m", prompt="two"), True, head(b"s-1"))
    assert a.key == b.key == prefix_key(b"s-1", 1024)
    c = llm.begin()
    llm.read(c, body(model="m", prompt="one"), True, head())
    assert c.key == prefix_key(b'"one"', 1024)


def test_least_inflight_route_has_no_key_and_adapter_key_is_read() -> None:
    llm = route(adapter_key="lora")
    request = llm.begin()
    llm.read(request, body(model="base", lora="sql", messages=[]), True, head())
    assert request.key is None and request.adapter == "sql"


@pytest.mark.parametrize(
    ("data", "complete", "error", "text"),
    [
        (b"not json", True, BadBody, "not JSON"),
        (b"", True, BadBody, "empty"),
        (b"[1, 2]", True, BadBody, "not a JSON object"),
        (b'{"messages": []}', True, BadBody, "no 'model' field"),
        (b'{"model": 7}', True, BadBody, "Expected `str | null`, got `int` - at `$.model`"),
        (b'{"model": "x", "messages": [', False, PayloadTooLarge, "up to 1048576 bytes"),
    ],
)
def test_unroutable_bodies_are_refused_clearly_or_go_to_the_default(
    data: bytes, complete: bool, error: type[Exception], text: str
) -> None:
    strict = route()
    with pytest.raises(error, match=None) as caught:
        strict.read(strict.begin(), data, complete, head())
    assert text in str(caught.value)
    lenient = route(require_model=False, policy="prefix")
    request = lenient.begin()
    lenient.read(request, data, complete, head())
    assert request.service is None and request.key is None and request.model is None


@pytest.mark.parametrize(
    ("config", "text"),
    [
        ({"model_key": "messages"}, "is a prompt field"),
        ({"adapter_key": "model"}, "must differ from model_key"),
        ({"session_header": "X-Session"}, "lower-case header name"),
        ({"session_header": "x-session"}, "only by policy: prefix"),
        ({"policy": "round-robin"}, "Invalid enum value 'round-robin'"),
        ({"epsilon": 0}, "Expected `float` > 0"),
        ({"max_body_bytes": 10}, "Expected `int` >= 256"),
        ({"unknown": 1}, "unknown field `unknown`"),
        ({"affinity_wait_ms": 50}, "affinity_wait_ms is used only by policy: prefix"),
        (
            {"affinity_wait_ms": 0, "policy": "least-inflight"},
            "affinity_wait_ms is used only by policy: prefix",
        ),
        (
            {"affinity_wait_ms": 10_001, "policy": "prefix"},
            "Expected `int` <= 10000 - at `$.llm.affinity_wait_ms`",
        ),
        ({"affinity_wait_ms": -1, "policy": "prefix"}, "Expected `int` >= 0 - at `$.llm.affinity_wait_ms`"),
        ({"affinity_wait_ms": 2.5, "policy": "prefix"}, "Expected `int | null`, got `float`"),
    ],
)
def test_route_config_is_validated_with_the_field_named(config: dict[str, object], text: str) -> None:
    raw = {"service": "chat", "revisions": [{"revision": "v1"}], "llm": config}
    with pytest.raises(msgspec.ValidationError) as caught:
        msgspec.convert(raw, Route)
    assert text in str(caught.value) and "$.llm" in str(caught.value)


def test_route_with_llm_round_trips_and_old_routes_read() -> None:
    llm = LLMRouting(policy=AffinityPolicy.PREFIX, models={"a": "b"})
    r = Route(service="chat", revisions=(WeightedRevision(revision="v1"),), llm=llm)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(r), type=Route) == r
    old = msgspec.msgpack.encode({"service": "chat", "revisions": [{"revision": "v1"}]})
    assert msgspec.msgpack.decode(old, type=Route).llm is None


def test_routes_file_takes_the_llm_section_and_names_a_bad_field(tmp_path: pathlib.Path) -> None:
    good = tmp_path / "routes.yaml"
    good.write_text(
        "routes:\n- service: chat\n  revisions: [{revision: v1}]\n"
        "  llm: {policy: prefix, models: {llama-3: llama}, session_header: x-session-id, prefix_bytes: 512}\n"
    )
    (route_,) = load_routes_file(good).routes
    assert route_.llm is not None and route_.llm.policy is AffinityPolicy.PREFIX
    assert route_.llm.models == {"llama-3": "llama"} and route_.llm.prefix_bytes == 512
    bad = tmp_path / "bad.yaml"
    bad.write_text("routes:\n- service: chat\n  revisions: [{revision: v1}]\n  llm: {prefix_bytes: 4}\n")
    with pytest.raises(ConfigError, match=r"Expected `int` >= 16 - at `\$.routes\[0\].llm.prefix_bytes`"):
        load_routes_file(bad)


def test_route_affinity_wait_reaches_the_llm_route_and_unset_means_the_routers() -> None:
    assert route(policy="prefix", affinity_wait_ms=250).affinity_wait == 0.25
    assert route(policy="prefix", affinity_wait_ms=0).affinity_wait == 0.0  # never, whatever the router says
    assert route(policy="prefix").affinity_wait == -1.0  # unset: the router's --affinity-wait-ms
    assert route(policy="prefix", affinity_wait_ms=10_000).affinity_wait == 10.0
    # through the writer's wire form (msgpack), as a router decodes it from Valkey
    llm = LLMRouting(policy=AffinityPolicy.PREFIX, affinity_wait_ms=40)
    r = Route(service="chat", revisions=(WeightedRevision(revision="v1"),), llm=llm)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(r), type=Route).llm == llm


def test_an_llm_section_encodes_only_the_fields_it_sets() -> None:
    """A router that predates affinity_wait_ms refuses unknown fields: a section that leaves it
    unset must not carry it, so a new writer can serve routers not yet upgraded."""
    older = msgspec.defstruct(
        "OlderLLMRouting",
        [(f.name, f.type, f.default if f.default is not msgspec.NODEFAULT else msgspec.field(
            default_factory=f.default_factory)) for f in msgspec.structs.fields(LLMRouting) if f.name != "affinity_wait_ms"],
        kw_only=True, forbid_unknown_fields=True,
    )  # fmt: skip
    unset = LLMRouting(policy=AffinityPolicy.PREFIX, session_header="x-session")
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(unset), type=older).session_header == "x-session"
    assert msgspec.json.decode(msgspec.json.encode(unset)) == {
        "policy": "prefix",
        "session_header": "x-session",
    }
    with pytest.raises(msgspec.ValidationError, match="unknown field `affinity_wait_ms`"):
        msgspec.msgpack.decode(
            msgspec.msgpack.encode(LLMRouting(policy=AffinityPolicy.PREFIX, affinity_wait_ms=0)), type=older
        )


def test_routes_file_takes_affinity_wait_ms_and_names_it_when_wrong(tmp_path: pathlib.Path) -> None:
    good = tmp_path / "routes.yaml"
    good.write_text(
        "routes:\n- service: chat\n  revisions: [{revision: v1}]\n  llm: {policy: prefix, affinity_wait_ms: 30}\n"
    )
    (route_,) = load_routes_file(good).routes
    assert route_.llm is not None and route_.llm.affinity_wait_ms == 30
    bad = tmp_path / "bad.yaml"
    bad.write_text("routes:\n- service: chat\n  revisions: [{revision: v1}]\n  llm: {affinity_wait_ms: 30}\n")
    with pytest.raises(
        ConfigError, match=r"routes file .*bad.yaml: affinity_wait_ms is used only by policy: prefix"
    ):
        load_routes_file(bad)


def test_routes_file_pods_are_written_as_maps(tmp_path: pathlib.Path) -> None:
    """A person writes a pod as a map of its fields (records are arrays on the wire)."""
    path = tmp_path / "routes.json"
    path.write_text(
        '{"routes": [{"service": "chat", "revisions": [{"revision": "v1"}]}],'
        ' "pods": [{"uid": "p1", "namespace": "ml", "revision": "v1", "ip": "127.0.0.9", "port": 8000,'
        ' "adapters": ["sql"]}]}'
    )
    (pod_,) = load_routes_file(path).pods
    assert (pod_.uid, pod_.port, pod_.adapters, pod_.state) == ("p1", 8000, ("sql",), PodState.READY)
    path.write_text(
        '{"routes": [], "pods": [{"uid": "p1", "namespace": "ml", "revision": "v1", "ip": "127.0.0.9"}]}'
    )
    with pytest.raises(ConfigError, match=r"pods\[0\]: Object missing required field `port`"):
        load_routes_file(path)


def test_a_model_name_no_pod_advertises_leaves_least_inflight_as_it_is() -> None:
    """A least-in-flight LLM route names its model in every request; no pod advertises it as an
    adapter, so the picks balance as least-in-flight does (a constant ring key piled them up)."""
    table = table_of([pod(f"p{i}", cc=4) for i in range(8)])
    request = route().begin()
    route().read(request, body(model="llama-3", messages=[]), True, head())
    assert request.key is None and request.adapter == "llama-3"
    for _ in range(16):
        assert request.pick(table, "r") is not None
    assert sorted(p.inflight for p in table.pods.values()) == [2] * 8
    index = table.revisions["r"].ring  # (and no table was built to look for the adapter)
    assert isinstance(index, Maglev) and not index.built and index.entries == []


# ---- the bounded wait for the affine pods (--affinity-wait-ms) ------------------------------------


def busy_key_table(pods: int = 4, cc: int = 1) -> tuple[SlotTable, int, list[str]]:
    """A table and a key whose first WAIT_CANDIDATES pods are full (every other pod is free)."""
    table = table_of([pod(f"p{i}", cc=cc) for i in range(pods)])
    maglev = maglev_of(table.revisions["r"])
    for key in keys(100):  # (one whose candidates are distinct pods)
        candidates = [maglev.entries[(key + i) % maglev.size].uid for i in range(affinity.WAIT_CANDIDATES)]
        if len(set(candidates)) == len(candidates):
            break
    for uid in candidates:
        slots = table.pods[uid]
        for _ in range(cc):
            affinity.take(slots)
    return table, key, candidates


def test_pick_or_wait_takes_a_free_affine_pod_and_never_waits_for_one_merely_over_the_bound() -> None:
    table = table_of([pod(f"p{i}") for i in range(4)])
    key = keys(1)[0]
    lease = affinity.pick_or_wait(table, "r", key, None, 0.25)
    assert isinstance(lease, tuple) and lease[1].uid == affine_pod_after(table, lease, key)
    # CC=8 pods: the affine one is over the bound (not full) -> the walk spills, nobody waits
    table = table_of([pod(f"p{i}", cc=8) for i in range(4)])
    got = [affinity.pick_or_wait(table, "r", key, None, 0.25) for _ in range(16)]
    assert all(isinstance(lease, tuple) for lease in got)
    assert max(p.inflight for p in table.pods.values()) <= 5


def affine_pod_after(table: SlotTable, lease: tuple, key: int) -> str:
    lease[0]()
    return affine_pod(table, key)


def test_pick_or_wait_names_the_full_affine_pods_only_while_another_pod_is_free() -> None:
    table, key, candidates = busy_key_table()
    found = affinity.pick_or_wait(table, "r", key, None, 0.25)
    assert isinstance(found, list) and [p.uid for p in found] == candidates
    revision = table.revisions["r"]
    assert revision.inflight_total == len(candidates)  # (naming them took no slot)
    # the other pods busy too: nothing to choose between -> None, the revision's FIFO
    while affinity.least_inflight(revision) is not None:
        pass
    assert affinity.pick_or_wait(table, "r", key, None, 0.25) is None
    # an unroutable full candidate is not waited for
    table, key, candidates = busy_key_table()
    for uid in candidates:
        table.exclude(uid)
    lease = affinity.pick_or_wait(table, "r", key, None, 0.25)
    assert isinstance(lease, tuple) and lease[1].uid not in candidates


async def test_a_freed_affine_slot_is_handed_over_exactly_fifo_waiters_first() -> None:
    loop = asyncio.get_running_loop()
    table, key, candidates = busy_key_table(pods=4)
    revision = table.revisions["r"]
    found = affinity.pick_or_wait(table, "r", key, None, 0.25)
    assert isinstance(found, list)
    waiter = table.wait_for_pods("r", found, 100, loop)
    assert waiter is not None and revision.affine_queued == 1 and revision.queued_bytes == 100
    # a second waiter for a CC=1 pod would wait longer than a whole request: refused (None)
    assert table.wait_for_pods("r", found, 100, loop) is None
    # another request takes a free pod meanwhile; the affine pods' slots are not touched
    other = table.pick("r")
    assert other is not None and other[1].uid not in candidates
    first = table.pods[candidates[0]]
    first.release()
    assert waiter.done() and waiter.result()[1].uid == candidates[0]
    assert first.inflight == 1  # handed over: still taken, by the waiter now (never two)
    table.leave_queue("r", waiter, 100)
    assert revision.affine_queued == 0 and revision.queued_bytes == 0 and not revision.affine
    # a FIFO waiter (it found no free pod at all) comes before an affine one
    table2, _, candidates2 = busy_key_table(pods=2)
    rev2 = table2.revisions["r"]
    fifo = table2.enqueue("r", 0, loop)
    affine_waiter = table2.wait_for_pods("r", [table2.pods[candidates2[0]]], 0, loop)
    assert affine_waiter is not None
    table2.pods[candidates2[0]].release()
    assert fifo.done() and not affine_waiter.done()
    table2.leave_queue("r", fifo, 0)
    table2.leave_queue("r", affine_waiter, 0)
    assert rev2.affine_queued == 0 and rev2.queued == 0 and affine_waiter.cancelled()
    assert table2.pods[candidates2[0]].inflight == 1 and rev2.inflight_total == 2


async def test_an_affine_wait_is_unlisted_everywhere_when_it_ends_and_counts_towards_max_queued() -> None:
    loop = asyncio.get_running_loop()
    table, _, candidates = busy_key_table(pods=6)
    pods = [table.pods[uid] for uid in candidates]
    revision = table.revisions["r"]
    waiter = table.wait_for_pods("r", pods, 10, loop)
    assert waiter is not None and all(len(revision.affine[p]) == 1 for p in pods)
    pods[1].release()  # the second candidate frees first: it is the one handed over
    assert waiter.result()[1].uid == candidates[1]
    pods[0].release()  # the other one's list still names the served waiter: skipped, not handed twice
    assert pods[0].inflight == 0 and pods[1].inflight == 1
    table.leave_queue("r", waiter, 10)
    assert not revision.affine and not revision.affine_of and revision.affine_queued == 0
    # a waiter that times out (or whose client leaves) is cancelled and unlisted
    affinity.take(pods[0])
    waiter = table.wait_for_pods("r", pods[:1], 0, loop)
    assert waiter is not None
    table.leave_queue("r", waiter, 0)
    assert waiter.cancelled() and revision.affine_queued == 0 and not revision.affine
    pods[0].release()
    assert pods[0].inflight == 0  # nobody waits: back to its level
    # an affine wait counts towards the revision's max_queued and max_queue_bytes (a FIFO waiter
    # is never refused for affine ones: they end within their bound)
    small = SlotTable(seed=0, max_queued=1, max_queue_bytes=100)
    small.update([pod(f"p{i}") for i in range(4)])
    for uid in ("p0", "p1"):
        affinity.take(small.pods[uid])
    first = small.wait_for_pods("r", [small.pods["p0"]], 0, loop)
    assert first is not None
    assert small.wait_for_pods("r", [small.pods["p1"]], 0, loop) is None  # max_queued
    small.leave_queue("r", first, 0)
    assert small.wait_for_pods("r", [small.pods["p1"]], 101, loop) is None  # max_queue_bytes
    fifo = small.enqueue("r", 0, loop)
    assert small.wait_for_pods("r", [small.pods["p1"]], 0, loop) is None
    small.leave_queue("r", fifo, 0)


def _router_args(extra: list[str]) -> object:
    from fastproxy.cli import build_parser

    argv = ["router", "--routes", "routes.yaml", *extra]
    return build_parser(argv).parse_args(argv)


def test_router_flag_affinity_wait_is_off_by_default_and_validated() -> None:
    from fastproxy.router import _config_from_args

    assert RouterConfig().affinity_wait_ms == 0
    assert _config_from_args(_router_args([])).affinity_wait_ms == 0  # type: ignore[arg-type]
    assert _config_from_args(_router_args(["--affinity-wait-ms", "25"])).affinity_wait_ms == 25  # type: ignore[arg-type]
    for bad in (["--affinity-wait-ms", "-1"], ["--affinity-wait-ms", "3000", "--queue-timeout", "2"]):
        with pytest.raises(ConfigError, match="--affinity-wait-ms must be between 0"):
            _config_from_args(_router_args(bad))  # type: ignore[arg-type]

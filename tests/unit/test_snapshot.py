"""RoutingSnapshot: immutability, delta application by version, structural sharing, routes."""

from __future__ import annotations

import random

import pytest

from fastproxy.snapshot import RouteTable, RoutingSnapshot, SnapshotBuilder, VersionGap
from statesync.keys import POD_CHUNKS, pod_chunk
from statesync.schema import Delta, PodRecord, PodState, Route, WeightedRevision


def pod(uid: str, revision: str = "llama-v1", state: PodState = PodState.READY, gen: int = 1) -> PodRecord:
    return PodRecord(
        uid=uid, namespace="ml", revision=revision, ip="127.0.0.2", port=8000, state=state, generation=gen
    )


def route(service: str, *revisions: tuple[str, int], hosts: tuple[str, ...] = (), prefix: str = "/") -> Route:
    return Route(
        service=service,
        revisions=tuple(WeightedRevision(revision=r, weight=w) for r, w in revisions),
        hosts=hosts,
        path_prefix=prefix,
    )


def test_apply_returns_new_snapshot_and_leaves_old_untouched() -> None:
    base = RoutingSnapshot.build(1, 10, [pod("a"), pod("b")])
    after = base.apply(Delta(epoch=1, version=11, pods=(pod("a", state=PodState.NOT_READY, gen=2),)))
    assert base.pods["a"].state is PodState.READY
    assert after.pods["a"].state is PodState.NOT_READY
    assert after.version == 11
    assert after.revision_pods("llama-v1")["a"].state is PodState.NOT_READY
    assert base.revision_pods("llama-v1")["a"].state is PodState.READY


def test_untouched_chunks_are_shared_not_copied() -> None:
    records = [pod(f"p{i}", f"r{i % 7}") for i in range(2_000)]
    base = RoutingSnapshot.build(1, 1, records)
    changed = pod("p5", "r5", PodState.NOT_READY, 2)
    after = base.apply(Delta(epoch=1, version=2, pods=(changed,)))
    old_chunks = [leaf for inner in base.pods._outer for leaf in inner]
    new_chunks = [leaf for inner in after.pods._outer for leaf in inner]
    copied = [i for i, (a, b) in enumerate(zip(old_chunks, new_chunks, strict=True)) if a is not b]
    assert copied == [pod_chunk("p5")]
    assert sum(a is not b for a, b in zip(base.pods._outer, after.pods._outer, strict=True)) == 1
    assert after.route_table is base.route_table
    assert base.pods["p5"].state is PodState.READY and after.pods["p5"] is changed


def test_pod_table_behaves_like_a_dict_under_changes() -> None:
    """Random sets, replacements and removals, checked against a plain dict after every delta."""
    rng = random.Random(7)
    model: dict[str, PodRecord] = {}
    snap = RoutingSnapshot.empty()
    for version in range(1, 200):
        changes = []
        for _ in range(rng.randrange(1, 30)):
            uid = f"u{rng.randrange(300)}"
            state = rng.choice([PodState.READY, PodState.NOT_READY, PodState.REMOVED])
            record = pod(
                uid, f"r{rng.randrange(5)}" if uid not in model else model[uid].revision, state, version
            )
            changes.append(record)
        previous = dict(snap.pods.items())
        before = snap
        snap = snap.apply(Delta(epoch=1, version=version, pods=tuple(changes)))
        for record in changes:
            if record.state is PodState.REMOVED:
                model.pop(record.uid, None)
            else:
                model[record.uid] = record
        assert dict(snap.pods.items()) == model and len(snap.pods) == len(model)
        assert dict(before.pods.items()) == previous  # the old snapshot never changes
        for uid in ("u1", "u299", "nope"):
            assert snap.pods.get(uid) == model.get(uid) and (uid in snap.pods) == (uid in model)
        grouped: dict[str, dict[str, PodRecord]] = {}
        for uid, record in model.items():
            grouped.setdefault(record.revision, {})[uid] = record
        assert {r: dict(m) for r, m in snap.revisions.items()} == grouped
    with pytest.raises(KeyError):
        snap.pods["nope"]


def test_chunks_as_the_writer_packs_them_become_the_table_and_the_revision_groups() -> None:
    records = [pod(f"p{i}", f"r{i % 3}") for i in range(100)]
    by_chunk: dict[int, list[PodRecord]] = {}
    for record in records:
        by_chunk.setdefault(pod_chunk(record.uid), []).append(record)
    builder = SnapshotBuilder()
    for number, chunk in by_chunk.items():
        builder.add_chunk(number, chunk)
    snap = builder.finish(1, 4)
    assert dict(snap.pods.items()) == {r.uid: r for r in records}
    assert {r: sorted(p.uid for p in members) for r, members in builder.by_revision.items()} == {
        f"r{k}": sorted(f"p{i}" for i in range(100) if i % 3 == k) for k in range(3)
    }
    # a chunk holding a tombstone (not what the writer stores) or sent twice: still consistent
    odd = SnapshotBuilder()
    first = next(iter(by_chunk))
    odd.add_chunk(first, [*by_chunk[first], pod("zz", "r0", PodState.REMOVED)])
    odd.add_chunk(first, [pod(by_chunk[first][0].uid, "r0", PodState.NOT_READY, 9)])
    table = odd.finish(1, 1).pods
    assert len(table) == len(by_chunk[first]) and "zz" not in table
    assert table[by_chunk[first][0].uid].generation == 9
    assert sum(len(m) for m in odd.by_revision.values()) == len(table)
    with pytest.raises(ValueError, match="outside"):
        odd.add_chunk(POD_CHUNKS, [])


@pytest.mark.parametrize(("epoch", "version"), [(1, 5), (1, 7), (1, 3), (0, 6)])
def test_delta_out_of_order_or_older_epoch_is_a_gap(epoch: int, version: int) -> None:
    base = RoutingSnapshot.build(1, 5, [pod("a")])
    with pytest.raises(VersionGap):
        base.apply(Delta(epoch=epoch, version=version))


def test_removed_pod_is_forgotten_and_empty_revision_dropped() -> None:
    base = RoutingSnapshot.build(1, 1, [pod("a", "r1"), pod("b", "r2")])
    after = base.apply(Delta(epoch=1, version=2, pods=(pod("a", "r1", PodState.REMOVED, 2),)))
    assert "a" not in after.pods
    assert "r1" not in after.revisions
    assert "b" in after.pods


def test_build_skips_tombstones() -> None:
    snap = RoutingSnapshot.build(1, 1, [pod("a"), pod("gone", state=PodState.REMOVED)])
    assert set(snap.pods.keys()) == {"a"}


def test_has_prospects() -> None:
    snap = RoutingSnapshot.build(1, 1, [pod("a", "r1", PodState.PENDING), pod("b", "r2", PodState.DRAINING)])
    assert snap.has_prospects("r1")
    assert not snap.has_prospects("r2")
    assert not snap.has_prospects("nope")


def test_route_changes_recompile_table() -> None:
    base = RoutingSnapshot.build(1, 1, [], [route("chat", ("chat-v1", 100), hosts=("chat.example.com",))])
    assert base.route_table.match("chat.example.com", "/") is not None
    after = base.apply(Delta(epoch=1, version=2, routes=(Route(service="chat", revisions=(), removed=True),)))
    assert after.route_table.match("chat.example.com", "/") is None
    assert base.route_table.match("chat.example.com", "/") is not None


def test_route_matching_exact_wildcard_prefix_and_any_host() -> None:
    table = RouteTable(
        [
            route("exact", ("e", 1), hosts=("api.example.com",)),
            route("exact-v2", ("e2", 1), hosts=("api.example.com",), prefix="/v2"),
            route("wild", ("w", 1), hosts=("*.example.com",)),
            route("deep", ("d", 1), hosts=("*.eu.example.com",)),
            route("fallback", ("f", 1), prefix="/models"),
        ]
    )

    def service(host: str, path: str) -> str | None:
        found = table.match(host, path)
        return found.service if found else None

    assert service("api.example.com", "/v1/chat") == "exact"
    assert service("api.example.com", "/v2/chat") == "exact-v2"
    assert service("api.example.com", "/v2") == "exact-v2"
    assert service("api.example.com", "/v20") == "exact"  # prefix matches whole segments
    assert service("x.example.com", "/") == "wild"
    assert service("a.b.eu.example.com", "/") == "deep"
    assert service("example.com", "/") is None  # "*.example.com" needs a label before it
    assert service("other.org", "/models/llama") == "fallback"
    assert service("other.org", "/") is None
    assert table.by_service["wild"].service == "wild"


def test_weighted_revision_choice_follows_weights() -> None:
    table = RouteTable([route("chat", ("stable", 90), ("canary", 10), ("off", 0))])
    compiled = table.by_service["chat"]
    draws = [i / 1000 for i in range(1000)]
    chosen = [compiled.choose_revision(d) for d in draws]
    assert chosen.count("canary") == 100
    assert chosen.count("stable") == 900
    assert "off" not in chosen


def test_pick_revision_draws_by_weight_and_a_single_revision_is_always_it() -> None:
    table = RouteTable([route("chat", ("stable", 90), ("canary", 10), ("off", 0)), route("one", ("only", 5))])
    picked = [table.by_service["chat"].pick_revision() for _ in range(2000)]
    assert set(picked) == {"stable", "canary"}  # (P(no canary in 2000) = 0.9**2000)
    assert 100 < picked.count("canary") < 320  # 200 expected; 8 standard deviations either side
    assert {table.by_service["one"].pick_revision() for _ in range(10)} == {"only"}


def test_builder_in_slices_equals_one_build() -> None:
    records = [pod(f"p{i}", f"r{i % 3}", PodState.READY if i % 2 else PodState.NOT_READY) for i in range(30)]
    records.append(pod("gone", "r0", PodState.REMOVED))
    whole = RoutingSnapshot.build(2, 7, records, [route("s", ("r0", 1))])
    builder = SnapshotBuilder()
    for start in range(0, len(records), 4):
        builder.add(records[start : start + 4])
    assert len(builder) == 30
    sliced = builder.finish(2, 7, [route("s", ("r0", 1))])
    assert (sliced.epoch, sliced.version) == (2, 7)
    assert dict(sliced.pods.items()) == dict(whole.pods.items())
    assert "gone" not in sliced.pods
    assert {r: dict(m.items()) for r, m in sliced.revisions.items()} == {
        r: dict(m.items()) for r, m in whole.revisions.items()
    }
    assert sliced.route_table.by_service.keys() == {"s"}
    # and it takes deltas like any snapshot
    after = sliced.apply(Delta(epoch=2, version=8, pods=(pod("p1", "r1", PodState.REMOVED, 2),)))
    assert "p1" not in after.pods and "p1" not in after.revision_pods("r1")

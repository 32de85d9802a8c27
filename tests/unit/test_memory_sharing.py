"""Issue 15 (a router holding 50k pods in <= 60 MB): what many records have in common is held once,
whichever way they arrive (chunks, single records, deltas, a static routes file), and the values
read are the values written."""

from __future__ import annotations

import pathlib

import msgspec
import pytest

from bench.conftest import make_pods
from fastproxy.config import ConfigError, RoutesFile, load_routes_file
from fastproxy.heap import release_free_memory, resident_mb
from fastproxy.snapshot import ReadChunk, SnapshotBuilder, chunk_digest
from statesync.schema import Delta, PodRecord, PodState, decode_delta, decode_pod, decode_pods, encode


def _fresh(text: str) -> str:
    """An equal string that is a different object (as a decoder makes one)."""
    return (text + "\0")[:-1]


def _assert_shared(records: list[PodRecord]) -> None:
    first = records[0]
    for record in records[1:]:
        assert record.namespace is first.namespace
        assert record.revision is first.revision
        assert record.reason is first.reason
        assert record.port is first.port
        assert record.readiness_at is first.readiness_at


def test_decoded_chunks_records_and_deltas_share_common_values_and_equal_what_was_written() -> None:
    pods = make_pods(40, 1)
    chunk = decode_pods(msgspec.msgpack.encode(pods))
    assert chunk == pods
    _assert_shared(chunk)
    singles = [decode_pod(encode(p)) for p in pods[:3]]
    assert singles == pods[:3]
    _assert_shared(singles)
    delta = decode_delta(encode(Delta(epoch=1, version=2, pods=tuple(pods[:5]))))
    assert list(delta.pods) == pods[:5]
    _assert_shared([*delta.pods, *singles, *chunk])
    # (unequal values stay apart: a shared port is never another pod's)
    other = decode_pod(encode(msgspec.structs.replace(pods[0], port=9000, revision=_fresh("other"))))
    assert (other.port, other.revision) == (9000, "other")


def test_a_static_file_in_either_pod_form_reads_the_same_records_sharing_their_values(
    tmp_path: pathlib.Path,
) -> None:
    pods = make_pods(30, 2)
    as_arrays = tmp_path / "arrays.json"
    as_arrays.write_bytes(msgspec.json.encode(RoutesFile(routes=[], pods=pods)))
    as_maps = tmp_path / "maps.json"
    as_maps.write_bytes(
        msgspec.json.encode({"routes": [], "pods": [msgspec.structs.asdict(p) for p in pods]})
    )
    as_yaml = tmp_path / "maps.yaml"
    as_yaml.write_bytes(
        msgspec.yaml.encode({"routes": [], "pods": [msgspec.structs.asdict(p) for p in pods]})
    )
    for path in (as_arrays, as_maps, as_yaml):
        read = load_routes_file(path).pods
        assert read == pods, path.name
        _assert_shared(read[0::2])  # (one revision in two)


def test_a_static_pod_without_a_state_serves_and_a_bad_pod_is_named(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "routes.json"
    pod = '{"uid": "p1", "namespace": "ml", "revision": "v1", "ip": "127.0.0.9", "port": 8000}'
    path.write_text(f'{{"routes": [], "pods": [ {pod} ]}}')
    (read,) = load_routes_file(path).pods
    assert (read.state, read.generation) == (PodState.READY, 1)
    path.write_text(f'{{"routes": [], "pods": [{pod}, 7]}}')
    with pytest.raises(ConfigError, match=r"pods\[1\]: Expected a map of the pod's fields"):
        load_routes_file(path)
    path.write_text(f'{{"routes": [], "pods": [{pod}, {pod}]}}')
    with pytest.raises(ConfigError, match=r"pods\[1\]: duplicate pod uid 'p1'"):
        load_routes_file(path)
    path.write_text('{"routes": [], "pods": [["p1", "ml", "v1", "127.0.0.9", "x"]]}')
    with pytest.raises(ConfigError, match=r"pods\[0\]: Expected `int`, got `str`"):
        load_routes_file(path)


def test_a_read_chunk_is_known_by_its_digest_not_its_bytes() -> None:
    pods = make_pods(12, 1)
    raw = msgspec.msgpack.encode(pods)
    builder = SnapshotBuilder()
    builder.add_chunk(3, decode_pods(raw), raw)
    table = builder.finish(1, 1).pods
    leaf = table.same_as_read(3, raw)
    assert type(leaf) is ReadChunk and leaf == pods
    assert leaf.digest == chunk_digest(raw) and not hasattr(leaf, "raw")
    # other bytes for the chunk (one pod changed) are not the chunk as read
    changed = msgspec.msgpack.encode([*pods[:11], msgspec.structs.replace(pods[11], port=9000)])
    assert table.same_as_read(3, changed) is None


def test_freed_heap_memory_goes_back_to_the_os() -> None:
    # Small blocks (glibc's heap, not mmap) kept one in 16: the free ones are in the heap's middle.
    blocks = [bytes(1000) + bytes([i % 251]) for i in range(40_000)]
    kept = blocks[::16]
    del blocks
    before = resident_mb()
    released = release_free_memory("a test's blocks")
    assert released > 10 and resident_mb() < before - 10, (before, released)
    assert len(kept) == 2500

"""The data model in Valkey: every key, who writes it, who reads it.

Theory of operation
-------------------
One writer (the leader) mutates; everyone else appends events or reads. All values are msgpack
(``statesync.schema``). A namespace prefix lets several fleets share one Valkey.

============================  =========  ========================================  ==================
key                           type       written by                                read by
============================  =========  ========================================  ==================
``{ns}:events``               stream     routers, sidecars, agents, informer       writer (group)
                                         (XADD ``e`` = encoded event)
``{ns}:lease``                string+TTL writer: SET NX PX, renewed while leader   writers
``{ns}:epoch``                counter    writer: INCR when it becomes leader       writers
``{ns}:version``              int        writer (commit script only)               routers, writers
``{ns}:state-epoch``          int        writer (commit script only)               routers
``{ns}:applied``              zset       writer (commit script): ids of the last    writers (replay)
                                         APPLIED_CAP entries applied
``{ns}:pods``                 hash       writer (commit script): uid -> PodRecord  routers, writers
``{ns}:routes``               hash       writer (commit script): service -> Route  routers, writers
``{ns}:pod-chunks``           hash       writer (commit script): chunk number ->   routers (bootstrap)
                                         msgpack array of the chunk's live records;
                                         ``r:``revision -> array of its chunks;
                                         ``@index`` -> the version of that index
``{ns}:chunks-version``       int        writer (commit script, repack): the       routers (bootstrap)
                                         version pod-chunks is at
``{ns}:changes``              stream     writer (commit script): id = version-0,   routers (gap fill)
                                         ``d`` = encoded Delta; capped
``{ns}:deltas``               pub/sub    writer: ``D``+Delta on commit,            routers
                                         ``H``+Heartbeat every second
============================  =========  ========================================  ==================

The commit script checks the lease token (the fencing epoch) and the expected previous version
before it writes anything, so a deposed or paused leader cannot write, and a batch is applied
entirely or not at all.

Two views of the pods, written by the same commit: ``pods`` holds every record (tombstones too)
one field per pod, for the writer and for point reads; ``pod-chunks`` holds the live (not REMOVED)
records packed for a router's bootstrap. A pod's chunk is ``pod_chunk(uid)`` (CRC-32 of the uid,
``POD_CHUNKS`` chunks); a chunk's value is one msgpack array of the records' own encodings (the
bytes stored in ``pods``), so a router reads the whole fleet as a few thousand fields and decodes
each chunk with one decoder call, instead of 50k fields and 50k calls. A commit rewrites only the
chunks its records fall in (the leader keeps every chunk's members' bytes in memory; it never
re-encodes), and deletes a chunk that became empty. ``chunks-version`` is set to the version in the
same step; a router uses the chunks only when it equals ``version`` (otherwise, e.g. after a writer
that predates the chunks committed, it reads ``pods``), and a new leader repacks every chunk,
fenced, when it finds them behind.

The same hash holds a revision index: field ``r:<revision>`` lists the chunks that hold the
revision's live pods, and ``@index`` names the version the index is at (every commit that changes
anything sets it, and rewrites a revision's field only when its set of chunks changed -- a pod
joining or leaving, not a readiness flip). With it, a starting router keeps the chunks as read,
undecoded, and decodes a revision's chunks when the revision is first used (or when its background
warm-up gets there): it routes from the moment the read is done. A router uses the index only when
``@index`` equals ``version`` (a writer that predates it would leave it behind), and decodes every
chunk otherwise.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

EVENTS_GROUP = "writers"
CHANGES_CAP = 10_000  # deltas kept for gap filling; beyond this a router re-reads everything
APPLIED_CAP = 100_000  # applied entry ids remembered, to recognise replays and late claims
# Pod chunks: ~12 records (3 kB) each at 50k pods. Fewer would mean less to read at bootstrap but
# more bytes rewritten per commit (a chunk is rewritten whole when one of its pods changes).
POD_CHUNKS = 4096
# Beside the chunks, in the same hash: per revision, the chunks holding its live pods (a msgpack array
# of chunk numbers), and the version that index is at (a writer that predates it leaves it behind).
REVISION_FIELD_PREFIX = b"r:"
INDEX_MARKER_FIELD = b"@index"


def chunk_fields(fields: dict[bytes, bytes]) -> dict[int, bytes]:
    """The chunks of a ``pod-chunks`` hash as read (number -> packed records), without the index."""
    return {int(field): value for field, value in fields.items() if field.isdigit()}


def revision_index_fields(fields: dict[bytes, bytes]) -> dict[str, bytes]:
    """The revision index of a ``pod-chunks`` hash as read (revision -> packed chunk numbers)."""
    skip = len(REVISION_FIELD_PREFIX)
    return {
        field[skip:].decode(): value
        for field, value in fields.items()
        if field.startswith(REVISION_FIELD_PREFIX)
    }


def pod_chunk(uid: str) -> int:
    """The chunk a pod's record is packed in (stable across processes and versions)."""
    return zlib.crc32(uid.encode()) & (POD_CHUNKS - 1)


@dataclass(frozen=True)
class Keys:
    ns: str = "fastproxy"

    @property
    def events(self) -> str:
        return f"{self.ns}:events"

    @property
    def lease(self) -> str:
        return f"{self.ns}:lease"

    @property
    def epoch(self) -> str:
        return f"{self.ns}:epoch"

    @property
    def version(self) -> str:
        return f"{self.ns}:version"

    @property
    def state_epoch(self) -> str:
        return f"{self.ns}:state-epoch"

    @property
    def applied(self) -> str:
        return f"{self.ns}:applied"

    @property
    def pods(self) -> str:
        return f"{self.ns}:pods"

    @property
    def routes(self) -> str:
        return f"{self.ns}:routes"

    @property
    def pod_chunks(self) -> str:
        return f"{self.ns}:pod-chunks"

    @property
    def chunks_version(self) -> str:
        return f"{self.ns}:chunks-version"

    @property
    def changes(self) -> str:
        return f"{self.ns}:changes"

    @property
    def channel(self) -> str:
        return f"{self.ns}:deltas"


DELTA_PREFIX = b"D"
HEARTBEAT_PREFIX = b"H"


def stream_id_key(stream_id: bytes | str) -> tuple[int, int]:
    """Order stream ids numerically ("1700000000000-3")."""
    text = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
    ms, _, seq = text.partition("-")
    return (int(ms), int(seq or 0))

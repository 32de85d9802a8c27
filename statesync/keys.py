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
``{ns}:changes``              stream     writer (commit script): id = version-0,   routers (gap fill)
                                         ``d`` = encoded Delta; capped
``{ns}:deltas``               pub/sub    writer: ``D``+Delta on commit,            routers
                                         ``H``+Heartbeat every second
============================  =========  ========================================  ==================

The commit script checks the lease token (the fencing epoch) and the expected previous version
before it writes anything, so a deposed or paused leader cannot write, and a batch is applied
entirely or not at all.
"""

from __future__ import annotations

from dataclasses import dataclass

EVENTS_GROUP = "writers"
CHANGES_CAP = 10_000  # deltas kept for gap filling; beyond this a router re-reads everything
APPLIED_CAP = 100_000  # applied entry ids remembered, to recognise replays and late claims


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

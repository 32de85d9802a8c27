"""Shared fixtures for the benchmark suites: realistic routing states at several scales."""

from __future__ import annotations

from statesync.schema import PodRecord, PodState, Route, WeightedRevision

REVISIONS = 1000


def make_pods(n_pods: int, n_revisions: int = REVISIONS) -> list[PodRecord]:
    """n_pods spread over n_revisions, each on its own loopback address, mostly CC=1."""
    pods = []
    for i in range(n_pods):
        pods.append(
            PodRecord(
                uid=f"6f1c2d3e-{i:08x}-4a5b-9c8d-{i * 7919 % 0xFFFFFFFFFFFF:012x}",
                namespace="inference",
                revision=f"model-{i % n_revisions:04d}-00001",
                ip=f"127.{1 + i // 65536 % 254}.{i // 256 % 256}.{i % 256}",
                port=8012,
                concurrency=1 if i % 4 else 4,
                state=PodState.READY,
                reason="sidecar probe ok",
                source="sidecar",
                since=1_764_000_000.0 + i,
                generation=3,
                ready=True,
            )
        )
    return pods


def make_routes(n_revisions: int = REVISIONS) -> list[Route]:
    return [
        Route(
            service=f"model-{r:04d}",
            hosts=(f"model-{r:04d}.inference.example.com",),
            revisions=(WeightedRevision(revision=f"model-{r:04d}-00001", weight=100),),
        )
        for r in range(n_revisions)
    ]

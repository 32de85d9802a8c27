"""A sidecar drained (SIGTERM) while its app streams a 30 s SSE response, under steady traffic.

Theory of operation
-------------------
Real processes on loopback: Valkey, the writer and a router following it (``System`` of
``tests/integration/test_sidecar.py``: the in-process ``Router`` with its ``StateFollower`` and
report forwarder, exactly what ``fastproxy router --valkey --sidecar-protocol`` runs), and two pods,
each an app process (``fastproxy.devtools.upstream``, concurrency 1) behind a ``fastproxy sidecar``
process with a 60 s grace period.

A client opens ``GET /sse/300/100`` through the router: 300 events 100 ms apart, 30 s. As soon as
the first event arrives, the sidecar of the pod serving it gets SIGTERM. From then until the stream
ends, a second client sends one request every 50 ms through the router (POSTs with a small body and
GETs, alternating). What must hold:

- the stream completes: every event 0..299 in order, then the chunked terminator;
- no new request reaches the draining pod's app (its work count stays at the stream alone), and
  every request sent meanwhile is answered 200 by the other pod: not one client error;
- the sidecar is still running while its stream flows and exits 0 once it is done.

The scenario takes ~35 s, so it is ``faults_long`` (``make faults``); the 2 s version is in
``tests/integration/test_sidecar.py``. One row goes to the fault report.
"""

from __future__ import annotations

import asyncio
import re
import signal

import httpx
import pytest

from tests.faults.conftest import FaultReport
from tests.integration.test_sidecar import System

EVENTS = 300
INTERVAL_MS = 100


@pytest.mark.faults_long
@pytest.mark.timeout(150)
async def test_sidecar_sigterm_during_a_30s_sse_stream(fault_report: FaultReport) -> None:
    system = await System().start()
    try:
        pods = [await system.pod(uid, 1, "--grace-period", "60") for uid in ("drain-a", "drain-b")]
        reader, writer = await asyncio.open_connection("127.0.0.1", system.port)
        writer.write(
            b"GET /sse/%d/%d HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n" % (EVENTS, INTERVAL_MS)
        )
        first = await asyncio.wait_for(reader.readuntil(b"data: 0\n\n"), 10)
        (draining,) = [p for p in pods if system.router.slots.pods[p.uid].inflight == 1]
        (other,) = [p for p in pods if p is not draining]
        draining_work = (await draining.stats())["work_count"]
        other_work = (await other.stats())["work_count"]
        draining.sidecar.send_signal(signal.SIGTERM)

        rest_task = asyncio.create_task(asyncio.wait_for(reader.read(-1), EVENTS * INTERVAL_MS / 1000 + 30))
        statuses: dict[str, int] = {}
        sent = 0
        exited_while_streaming = False
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{system.port}", timeout=20) as client:
            while not rest_task.done():
                exited_while_streaming |= draining.sidecar.returncode is not None
                try:
                    if sent % 2:
                        response = await client.post("/echo", content=b"x" * 32)
                        ok = response.status_code == 200 and response.content == b"x" * 32
                    else:
                        response = await client.get("/")
                        ok = response.status_code == 200
                    key = "200" if ok else str(response.status_code)
                except httpx.HTTPError as exc:
                    key = type(exc).__name__
                statuses[key] = statuses.get(key, 0) + 1
                sent += 1
                await asyncio.sleep(0.05)  # the traffic's pace, not a synchronisation
        stream = first + await rest_task
        writer.close()
        exit_code = await asyncio.wait_for(draining.sidecar.wait(), 30)

        events = [int(n) for n in re.findall(rb"data: (\d+)\n\n", stream)]
        stream_complete = events == list(range(EVENTS)) and stream.endswith(b"\r\n0\r\n\r\n")
        reached_draining = (await draining.stats())["work_count"] - draining_work
        served_by_other = (await other.stats())["work_count"] - other_work
        errors = {k: v for k, v in statuses.items() if k != "200"}
        violations = (
            (not stream_complete)
            + reached_draining
            + (exit_code != 0)
            + exited_while_streaming
            + sum(errors.values())
        )
        fault_report.add(
            "sidecar SIGTERM during a 30 s SSE stream",
            requests=sent + 1,
            errors=errors,
            violations=violations,
            notes=(
                f"stream {len(events)}/{EVENTS} events{' complete' if stream_complete else ' INCOMPLETE'}; "
                f"new requests to the draining app {reached_draining}, to the other {served_by_other}; "
                f"sidecar exit {exit_code}"
            ),
        )
        assert stream_complete, (events[:3], events[-3:], stream[-80:])
        assert not exited_while_streaming
        assert reached_draining == 0  # no new request reached the draining pod's app
        assert errors == {} and statuses.get("200", 0) == sent and sent > 400
        assert served_by_other == sent  # every one of them went to the other pod
        assert exit_code == 0
    finally:
        await system.close()

"""A WebSocket session of 1000 messages that lasts 60 s, through the router (``make faults``).

The session's client (``websockets``) sends one message every 60 ms to a ``websockets`` echo pod
behind an in-process router; every message must come back in order and the session must hold its
pod's slot for the whole minute, then free it. The 3 s version runs in ``make test``
(``tests/integration/test_websocket.py``). One row goes to the fault report.
"""

from __future__ import annotations

import pytest

from tests.conftest import RouterHarness
from tests.faults.conftest import FaultReport
from tests.integration.test_websocket import WsPod, long_session, ws_pods  # noqa: F401  (fixture)


@pytest.mark.faults_long
@pytest.mark.timeout(120)
async def test_websocket_session_of_1000_messages_over_60s(
    harness: RouterHarness,
    ws_pods: list[WsPod],  # noqa: F811
    fault_report: FaultReport,
) -> None:
    seen = await long_session(harness, ws_pods, 60.0)
    view = seen["view"]
    fault_report.add(
        "websocket session, 1000 messages over 60 s",
        requests=1000,
        violations=1000 - seen["echoed"],
        notes=(
            f"{seen['echoed']}/1000 echoed in order in {seen['seconds']:.1f} s; slot held throughout; "
            f"{view.bytes_from_clients} B in, {view.bytes_from_pods} B out"
        ),
    )
    assert seen["echoed"] == 1000

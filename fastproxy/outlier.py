"""Which lost upstream connections take a pod out of this router's rotation.

Theory of operation
-------------------
A connection to a pod can end badly in two ways that say different things about the pod:

- *connect evidence*: the connect was refused or timed out (handled before any byte was sent, in
  ``Exchange._unavailable``), or a fresh connection was reset before one byte of the response
  came back. A socket closed with unread data sends a RST, so that reset means the pod's app never
  read the request: nothing there takes work. The pod is excluded at once, as it always was.
- *a broken exchange*: an EOF, or a reset on a reused connection or after the response began. The
  app may have read the request and crashed on it, or cut one stream; it says nothing about the
  next connection. The request in flight still fails (502, or a cut response), but the pod stays
  in rotation: one bad response must not make a one-pod revision unavailable for seconds. Only
  ``consecutive`` such failures in a row (no complete response between them) exclude it: the
  outlier detection of Envoy's ``consecutive_gateway_failure``, default 5.

The data path only reports (``Router.upstream_lost``, ``OutlierDetector.succeeded``); the router
decides with ``classify`` and ``OutlierDetector.failed``. ``failing`` holds only pods with a streak
in progress, so the success report is one truthiness test per response while nothing is failing,
and the table is bounded by the pods that are failing (entries go on success, removal, exclusion).

An exclusion on connect evidence is checked actively: every ``recheck_interval`` the router opens a
TCP connection to the pod (``connect_ok``), at most ``MAX_RECHECKS`` at a time; one that connects
lifts the exclusion early, since what excluded the pod was a failure to connect. An outlier
exclusion is not re-checked (the pod accepted connections all along) and lasts its full time.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum

MAX_RECHECKS = 256  # re-check connects in flight per router: a mass failure must not become a storm


class Evidence(enum.Enum):
    CONNECT = "connect"  # refused, connect timeout, reset of a fresh connection before any byte
    EXCHANGE = "exchange"  # lost after the request may have reached the app


def classify(reset: bool, fresh_connection: bool, response_started: bool) -> Evidence:
    """What a connection lost mid-exchange says about the pod."""
    if reset and fresh_connection and not response_started:
        return Evidence.CONNECT
    return Evidence.EXCHANGE


class OutlierDetector:
    """Consecutive broken exchanges per pod; ``failed`` says when the streak reaches the bound."""

    __slots__ = ("consecutive", "failing")

    def __init__(self, consecutive: int) -> None:
        if consecutive < 1:
            raise ValueError(f"outlier detection needs at least 1 consecutive failure, got {consecutive}")
        self.consecutive = consecutive
        self.failing: dict[str, int] = {}

    def failed(self, uid: str) -> int:
        """Count one broken exchange; returns the streak (the pod is an outlier at ``consecutive``)."""
        streak = self.failing.get(uid, 0) + 1
        if streak >= self.consecutive:
            self.failing.pop(uid, None)  # excluded now: the next streak starts from zero
        else:
            self.failing[uid] = streak
        return streak

    def succeeded(self, uid: str) -> None:
        self.failing.pop(uid, None)

    def forget(self, uid: str) -> None:
        self.failing.pop(uid, None)


async def connect_ok(ip: str, port: int, timeout: float) -> bool:
    """Does the pod accept a TCP connection within ``timeout``? (Closed at once, nothing sent.)"""
    loop = asyncio.get_running_loop()
    try:
        transport, _ = await asyncio.wait_for(loop.create_connection(asyncio.Protocol, ip, port), timeout)
    except (OSError, TimeoutError):
        return False
    with contextlib.suppress(Exception):
        transport.abort()
    return True

"""The upstream pool's check of an idle connection before reuse, on uvloop and on asyncio's loop.

``UpstreamConnection.peer_closed`` asks the kernel for the TCP state (TCP_INFO) of a pooled
connection before a request goes out on it: a pod's FIN that the loop has not seen yet must keep the
request off that connection. On uvloop the connection wraps the transport's fd once (uvloop's
PseudoSocket would build a socket object per question) and must detach, not close, that wrapper when
the connection ends: the fd is the transport's.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import time
import warnings
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from fastproxy.exchange import DEFAULT_LIMITS
from fastproxy.proxy import UpstreamConnection, UpstreamPool
from tests.conftest import next_pod_address

RUNNERS: dict[str, Callable[[Coroutine[Any, Any, None]], None]] = {
    "uvloop": uvloop.run,
    "asyncio": asyncio.run,
}


async def pooled_connection_to(listener: socket.socket) -> tuple[UpstreamConnection, socket.socket]:
    """A pool's connection to ``listener`` and the pod side of it (a plain blocking socket)."""
    loop = asyncio.get_running_loop()
    pool = UpstreamPool(loop, DEFAULT_LIMITS)
    host, port = listener.getsockname()
    _, conn = await loop.create_connection(lambda: UpstreamConnection(pool, "pod-0", 1), host, port)
    pod_side, _ = listener.accept()  # the kernel completed the handshake: no waiting on the loop
    return conn, pod_side


def until(predicate: Callable[[], bool], seconds: float) -> bool:
    """Ask ``predicate`` without yielding to the loop (which must not see the FIN first)."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
    return True


@pytest.mark.parametrize("loop_kind", RUNNERS)
def test_a_fin_the_loop_has_not_seen_makes_the_connection_unfit(loop_kind: str) -> None:
    async def scenario() -> None:
        with socket.create_server((next_pod_address(), 0)) as listener:
            conn, pod_side = await pooled_connection_to(listener)
            assert conn.usable and not conn.peer_closed()
            assert not conn.peer_closed()  # asked again: the same answer (nothing consumed)
            pod_side.close()  # the pod's idle timeout; the loop does not run until the check
            assert until(conn.peer_closed, 2.0), "the FIN in the socket was not seen by peer_closed"
            assert not conn.closed  # the loop has not processed the EOF: only the check saw it
            conn.close()

    RUNNERS[loop_kind](scenario())


@pytest.mark.parametrize("loop_kind", RUNNERS)
def test_the_wrapped_socket_is_detached_not_closed_when_the_connection_ends(loop_kind: str) -> None:
    async def scenario() -> None:
        with socket.create_server((next_pod_address(), 0)) as listener:
            conn, pod_side = await pooled_connection_to(listener)
            wrapper = conn.socket
            host, port = conn.transport.get_extra_info("sockname")[:2]
            conn.close()
            deadline = asyncio.get_running_loop().time() + 5
            while not conn.closed:  # connection_lost has run
                assert asyncio.get_running_loop().time() < deadline, "connection_lost never came"
                await asyncio.sleep(0.001)
            assert conn.socket is None and not conn.socket_wrapped
            if loop_kind == "uvloop":
                assert isinstance(wrapper, socket.socket) and wrapper.fileno() == -1  # detached
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                del wrapper
                gc.collect()
            # a wrapper dropped without detach would close an fd number someone else may own now
            ours = f"laddr=('{host}', {port})"
            assert not [w for w in caught if ours in str(w.message)], [str(w.message) for w in caught]
            pod_side.close()

    RUNNERS[loop_kind](scenario())

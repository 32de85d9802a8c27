"""Valkey connections from a URL: ``valkey://``, ``valkeys://`` (TLS), ``user:password@`` (ACL),
and ``valkey+sentinel://host:port[,host:port]/service`` for Sentinel-managed HA.

Timeouts are explicit: valkey-py's asyncio default socket timeout (5 s) would make an idle
``listen()`` raise, and a frozen server is invisible without an application heartbeat anyway.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlparse

import valkey.asyncio as avalkey


def connect(url: str, *, socket_timeout: float | None = 5.0, **kwargs: Any) -> avalkey.Valkey:
    parsed = urlparse(url)
    if parsed.scheme == "valkey+sentinel":
        from valkey.asyncio.sentinel import Sentinel

        hosts = []
        for part in parsed.netloc.rpartition("@")[2].split(","):
            host, _, port = part.partition(":")
            hosts.append((host, int(port or 26379)))
        service = parsed.path.strip("/") or "mymaster"
        sentinel = Sentinel(
            hosts,
            socket_timeout=socket_timeout,
            username=unquote(parsed.username) if parsed.username else None,
            password=unquote(parsed.password) if parsed.password else None,
        )
        master: avalkey.Valkey = sentinel.master_for(service, socket_timeout=socket_timeout, **kwargs)
        return master
    if parsed.scheme not in ("valkey", "valkeys", "redis", "rediss"):
        raise ValueError(f"unsupported Valkey URL scheme {parsed.scheme!r} in {url!r}")
    client: avalkey.Valkey = avalkey.from_url(
        url, socket_timeout=socket_timeout, socket_connect_timeout=2.0, **kwargs
    )
    return client

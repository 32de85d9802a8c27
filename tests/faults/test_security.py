"""Security at the edges: the admin API's token, the proxy port's reach, forwarding headers, Host.

Invariants checked, each on real sockets against the in-process router and ``AppServer`` pods:

- the admin API answers its protected paths only with the right bearer token (401 otherwise, and
  always with no token configured); only /healthz and /readyz answer without one;
- no request on the proxy port ever reaches the admin listener or gets an admin answer, whatever
  the Host, target form (absolute, ``//``, percent-encoded) or path; the pod sees only requests a
  route sends it;
- X-Forwarded-For / -Proto / Forwarded from an untrusted peer never reach the pod; from a trusted
  hop they are kept and the peer appended;
- a Host (or absolute-form authority) naming an internal address never becomes a connect target:
  listeners on such loopback addresses see no connection, and the router's only upstream is the pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry

from fastproxy.admin import AdminConnection, start_admin
from fastproxy.metrics import RouterCollector
from fastproxy.router import Router
from tests.conftest import RouterHarness, chat_route, exchange, pod_record, status_of
from tests.faults.conftest import FaultReport

TOKEN = "s3cret-admin-token"
PROTECTED = ("/metrics", "/v1/pods", "/v1/revisions", "/v1/routes", "/v1/state")
ADMIN_MARKERS = (b"fastproxy_", b'"uid"', b'"revision"', b'"epoch"', b"missing or wrong bearer token",
                 b"no such admin path", b"www-authenticate", b"not ready:")  # fmt: skip
ADMIN_PROBE_BODIES = (b"ok\n", b"ready\n", b"ready (stale)\n")


class CountingAdmin:
    """The real admin listener, with a count of the connections it accepted."""

    def __init__(self) -> None:
        self.accepted = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self, router: Router, token: str | None) -> CountingAdmin:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(RouterCollector(router))

        def factory() -> AdminConnection:
            self.accepted += 1
            return AdminConnection(router, token, registry)

        self.server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def get(port: int, target: str, host: str = "a", headers: str = "") -> bytes:
    return await exchange(
        port, f"GET {target} HTTP/1.1\r\nHost: {host}\r\n{headers}Connection: close\r\n\r\n".encode()
    )


async def test_admin_api_needs_the_right_bearer_token(
    harness: RouterHarness, fault_report: FaultReport
) -> None:
    app = await harness.app()
    router, _ = await harness.router([pod_record("p1", app.address)])
    admin = await start_admin(router, "127.0.0.1", 0, TOKEN)
    untokened = await start_admin(router, "127.0.0.1", 0, None)
    port = admin.sockets[0].getsockname()[1]
    bare_port = untokened.sockets[0].getsockname()[1]
    wrong = ("", "Authorization: Bearer nope\r\n", f"Authorization: Bearer {TOKEN}x\r\n",
             f"Authorization: Bearer {TOKEN[:-1]}\r\n", f"Authorization: Basic {TOKEN}\r\n",
             f"Authorization: {TOKEN}\r\n", "Authorization: Bearer \r\n", f"X-Authorization: Bearer {TOKEN}\r\n",
             f"Authorization: Bearer {TOKEN.upper()}\r\n")  # fmt: skip
    statuses: dict[str, int] = {}
    violations = []
    requests = 0
    try:
        for path in PROTECTED:
            for headers in wrong:
                requests += 1
                response = await get(port, path, headers=headers)
                statuses[str(status_of(response))] = statuses.get(str(status_of(response)), 0) + 1
                if status_of(response) != 401 or b"www-authenticate: bearer" not in response.lower():
                    violations.append(f"{path} with {headers.strip()!r}: {response[:40]!r}")
            # Near-miss paths never answer more than 404 without a token.
            for variant in (path + "?x=1", path + "/", path.upper(), "/." + path, path + "%00"):
                requests += 1
                response = await get(port, variant)
                if status_of(response) not in (400, 401, 404):
                    violations.append(f"{variant}: {status_of(response)}")
            requests += 1
            right = await get(port, path, headers=f"Authorization: Bearer {TOKEN}\r\n")
            if status_of(right) != 200:
                violations.append(f"{path} with the right token: {status_of(right)}")
            requests += 1
            scheme_case = await get(port, path, headers=f"Authorization: bearer {TOKEN}\r\n")
            if status_of(scheme_case) != 200:  # the auth scheme is case-insensitive (RFC 9110 11.1)
                violations.append(f"{path} with 'bearer': {status_of(scheme_case)}")
            # No token configured: nothing but the probes answers, whatever is sent.
            for headers in (f"Authorization: Bearer {TOKEN}\r\n", "Authorization: Bearer \r\n"):
                requests += 1
                if status_of(await get(bare_port, path, headers=headers)) != 401:
                    violations.append(f"{path} on the token-less admin answered")
        for probe in ("/healthz", "/readyz"):
            requests += 1
            if status_of(await get(port, probe)) != 200:
                violations.append(f"{probe} needs no token but was refused")
        requests += 1
        post = await exchange(
            port, b"POST /v1/pods HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        if status_of(post) != 405:
            violations.append(f"POST /v1/pods: {status_of(post)}")
    finally:
        admin.close()
        untokened.close()
    fault_report.add(
        "security: admin token", requests, statuses, len(violations), "401 unless the right bearer"
    )
    assert violations == []
    assert app.requests == []


# Targets and Hosts that name the admin API in every way a client might try, through the proxy port.
def admin_variants(admin_port: int) -> list[tuple[str, str]]:
    hosts = [f"127.0.0.1:{admin_port}", f"localhost:{admin_port}", f"[::1]:{admin_port}", "127.0.0.1",
             "localhost"]  # fmt: skip
    paths = ["/metrics", "/v1/pods", "/v1/state", "/v1/revisions", "/healthz", "/readyz", "//v1/pods",
             "/%2Fv1%2Fpods", "/v1%2Fpods", "/./v1/pods", "/x/../v1/pods", "/%76%31/pods"]  # fmt: skip
    variants = [(path, host) for host in hosts for path in paths]
    for path in ("/v1/pods", "/metrics", "//v1/pods"):
        variants.append((f"http://127.0.0.1:{admin_port}{path}", "chat.example.com"))
        variants.append((f"http://localhost:{admin_port}{path}", "chat.example.com"))
        variants.append((f"HTTP://127.0.0.1:{admin_port}{path}", f"127.0.0.1:{admin_port}"))
    return variants


@pytest.mark.parametrize("catch_all", [False, True], ids=["host-routed", "catch-all-route"])
async def test_admin_paths_unreachable_through_the_proxy_port(
    harness: RouterHarness, fault_report: FaultReport, catch_all: bool
) -> None:
    app = await harness.app()
    routes = [chat_route()] if catch_all else [chat_route(hosts=("chat.example.com",))]
    router, port = await harness.router([pod_record("p1", app.address)], routes)
    admin = await CountingAdmin().start(router, TOKEN)
    statuses: dict[str, int] = {}
    violations = []
    variants = admin_variants(admin.port)
    try:
        for target, host in variants:
            response = await get(port, target, host, headers=f"Authorization: Bearer {TOKEN}\r\n")
            status = status_of(response)
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            body = response.partition(b"\r\n\r\n")[2]
            if any(marker in response for marker in ADMIN_MARKERS) or body in ADMIN_PROBE_BODIES:
                violations.append(f"admin-looking answer to {target} Host {host}: {response[:80]!r}")
            if not catch_all and status != 404:
                violations.append(f"{target} Host {host}: {status}, expected 404 (no route)")
            if catch_all and status != 200:
                violations.append(f"{target} Host {host}: {status}, expected the pod's 200")
    finally:
        admin.close()
    if admin.accepted:
        violations.append(f"the admin listener accepted {admin.accepted} connections from the proxy path")
    # The pod saw exactly what a route sent it: nothing when host-routed; with a catch-all route,
    # one request per variant, in origin-form, its Host the authority the client named.
    expected = len(variants) if catch_all else 0
    if len(app.requests) != expected:
        violations.append(f"the pod saw {len(app.requests)} requests, expected {expected}")
    if any(not r.target.startswith(b"/") for r in app.requests):
        violations.append("an absolute-form target reached the pod")
    if any(r.header(b"x-forwarded-for") != b"127.0.0.1" for r in app.requests):
        violations.append("a pod request lacks the router's own X-Forwarded-For")
    name = "security: admin via proxy port" + (" (catch-all)" if catch_all else "")
    fault_report.add(name, len(variants), statuses, len(violations), "admin listener never reached")
    assert violations == []


SPOOFS = (
    b"X-Forwarded-For: 6.6.6.6\r\nx-forwarded-for: 7.7.7.7, 8.8.8.8\r\nX-FORWARDED-PROTO: https\r\n"
    b'Forwarded: for=6.6.6.6;proto=https\r\nforwarded: for="[2001:db8::1]"\r\n'
)


async def test_spoofed_forwarding_headers_dropped_from_untrusted_kept_from_trusted(
    harness: RouterHarness, fault_report: FaultReport
) -> None:
    untrusted_app = await harness.app()
    trusted_app = await harness.app()
    _, untrusted_port = await harness.router([pod_record("u", untrusted_app.address)])
    _, trusted_port = await harness.router(
        [pod_record("t", trusted_app.address)], trusted_proxies=("127.0.0.0/8",)
    )
    head = b"GET / HTTP/1.1\r\nHost: a\r\n" + SPOOFS + b"Connection: close\r\n\r\n"
    violations = []
    assert status_of(await exchange(untrusted_port, head)) == 200
    assert status_of(await exchange(trusted_port, head)) == 200
    (seen,) = untrusted_app.requests
    names = [name for name, _ in seen.headers]
    if seen.header(b"x-forwarded-for") != b"127.0.0.1" or names.count(b"x-forwarded-for") != 1:
        violations.append(f"untrusted X-Forwarded-For reached the pod: {seen.headers}")
    if seen.header(b"x-forwarded-proto") != b"http" or names.count(b"x-forwarded-proto") != 1:
        violations.append("untrusted X-Forwarded-Proto reached the pod")
    if b"forwarded" in names:
        violations.append("untrusted Forwarded reached the pod")
    if b"6.6.6.6" in bytes(next(iter(untrusted_app.raw.values()))):
        violations.append("a spoofed address is somewhere in the pod's bytes")
    (hop,) = trusted_app.requests
    if hop.header(b"x-forwarded-for") != b"6.6.6.6, 7.7.7.7, 8.8.8.8, 127.0.0.1":
        violations.append(f"trusted hop's chain not kept and extended: {hop.header(b'x-forwarded-for')!r}")
    if hop.header(b"x-forwarded-proto") != b"https":
        violations.append("trusted hop's X-Forwarded-Proto not kept")
    if [v for n, v in hop.headers if n == b"forwarded"] != [
        b"for=6.6.6.6;proto=https",
        b'for="[2001:db8::1]"',
    ]:
        violations.append(f"trusted hop's Forwarded not kept: {hop.headers}")
    fault_report.add(
        "security: spoofed X-Forwarded-*", 2, {}, len(violations), "dropped untrusted, kept trusted"
    )
    assert violations == []


async def test_other_client_address_headers_dropped_from_untrusted(harness: RouterHarness) -> None:
    app = await harness.app()
    _, port = await harness.router([pod_record("u", app.address)])
    await exchange(
        port,
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-Host: admin.internal\r\nX-Real-IP: 6.6.6.6\r\n"
        b"Connection: close\r\n\r\n",
    )
    (seen,) = app.requests
    assert seen.header(b"x-forwarded-host") is None and seen.header(b"x-real-ip") is None


def ipv6_loopback() -> bool:
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET6) as sock:
        sock.bind(("::1", 0))
        return True
    return False


class Tripwire:
    """A listener on an address that must never be connected to; counts what it accepts."""

    def __init__(self) -> None:
        self.accepted = 0
        self.servers: list[asyncio.Server] = []

    async def listen(self, host: str, port: int = 0) -> int:
        def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.accepted += 1
            writer.close()

        server = await asyncio.start_server(accept, host, port)
        self.servers.append(server)
        bound: int = server.sockets[0].getsockname()[1]
        return bound

    def close(self) -> None:
        for server in self.servers:
            server.close()


@pytest.fixture
async def tripwire() -> AsyncIterator[Tripwire]:
    wire = Tripwire()
    try:
        yield wire
    finally:
        wire.close()


@pytest.mark.parametrize("catch_all", [False, True], ids=["host-routed", "catch-all-route"])
async def test_internal_hosts_never_become_connect_targets(
    harness: RouterHarness, tripwire: Tripwire, fault_report: FaultReport, catch_all: bool
) -> None:
    app = await harness.app()
    routes = [chat_route()] if catch_all else [chat_route(hosts=("chat.example.com",))]
    router, port = await harness.router([pod_record("p1", app.address)], routes)
    local = await tripwire.listen("127.0.0.1")
    other = await tripwire.listen("127.0.0.2")
    hosts = [f"127.0.0.1:{local}", f"localhost:{local}", f"127.0.0.2:{other}", "169.254.169.254",
             "169.254.169.254:80", "10.0.0.1", "10.0.0.1:8080", "metadata.google.internal", "0.0.0.0:" + str(local),
             f"127.1:{local}", f"2130706433:{local}", f"0x7f000001:{local}", "[::ffff:127.0.0.1]:" + str(local)]  # fmt: skip
    if ipv6_loopback():
        six = await tripwire.listen("::1")
        hosts += [f"[::1]:{six}", f"[::1]:{local}"]
    requests: list[tuple[str, str]] = [("/", host) for host in hosts]
    requests += [(f"http://{host}/", "chat.example.com") for host in hosts]
    statuses: dict[str, int] = {}
    violations = []
    for target, host in requests:
        response = await get(port, target, host)
        status = status_of(response)
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        if status not in ((200,) if catch_all else (400, 404)):
            violations.append(f"{target} Host {host}: {status}")
    if tripwire.accepted:
        violations.append(f"{tripwire.accepted} connections reached addresses named only by Host")
    served = statuses.get("200", 0)
    if len(app.requests) != served:
        violations.append(f"the pod saw {len(app.requests)} requests, the clients got {served} answers")
    if router.stats.local_exclusions or router.reports:
        violations.append("a connect failure happened: the router tried an address not in its snapshot")
    name = "security: Host as connect target" + (" (catch-all)" if catch_all else "")
    fault_report.add(name, len(requests), statuses, len(violations), "tripwires accepted 0")
    assert violations == []


async def test_early_answer_on_a_closing_connection_raises_nothing(harness: RouterHarness) -> None:
    loop = asyncio.get_running_loop()
    errors: list[object] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context.get("exception")))
    try:
        app = await harness.app()
        _, port = await harness.router(
            [pod_record("p1", app.address)], [chat_route(hosts=("chat.example.com",))]
        )
        for request in (
            b"GET / HTTP/1.1\r\nHost: elsewhere\r\nConnection: close\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: elsewhere\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
        ):
            assert status_of(await exchange(port, request)) == 404
        assert errors == []
    finally:
        loop.set_exception_handler(None)

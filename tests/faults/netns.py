"""Network namespaces the fault tests create (and always delete), and sockets inside them.

Theory of operation
-------------------
``NetNS`` wraps ``ip netns``: a unique name per test (pid + counter), ``lo`` brought up (all of
127.0.0.0/8 is local there too), iptables rules applied inside it, child processes started in it
with ``ip netns exec`` (which execs the command: the child's pid is the process itself, so killing
it by pid is exact), and deletion at the end.

The test process itself stays in the host's namespace, but can create a socket *inside* a
namespace: a thread may switch its own network namespace with ``setns(2)`` (Python 3.11 has no
``os.setns``, hence ctypes), and a socket belongs for life to the namespace it was created in. So
``NetNS.socket()`` switches the calling thread in, creates the socket, and switches back at once,
with no ``await`` in between (nothing else can run in the namespace meanwhile). That gives:

- ``open_connection``: a client connection from inside the namespace (to a router or pod there);
- ``bridge``: a listener inside the namespace whose connections are relayed to an address in the
  host's namespace; a router in a partitioned namespace reaches Valkey through it, over loopback
  only, with no veth and no address outside 127.0.0.0/8.

``netns_problems()`` says why this machine cannot run these tests (not root, no ``ip`` or
``iptables``, namespaces or nf_tables unavailable); the tests skip with those reasons.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import itertools
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_names = itertools.count(1)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=20)


@functools.cache
def netns_problems() -> tuple[str, ...]:
    """Why network-namespace tests cannot run here (empty: they can)."""
    if os.geteuid() != 0:
        return ("not root: creating network namespaces and iptables rules needs root",)
    missing = [tool for tool in ("ip", "iptables") if shutil.which(tool) is None]
    if missing:
        return (
            f"{' and '.join(missing)} not installed (Debian: iproute2, iptables; make test installs them as root)",
        )
    name = f"fpt-probe-{os.getpid()}"
    made = _run("ip", "netns", "add", name)
    if made.returncode != 0:
        return (f"ip netns add failed: {made.stderr.strip()}",)
    try:
        rule = _run("ip", "netns", "exec", name, "iptables", "-A", "OUTPUT", "-p", "tcp", "--syn",
                    "-d", "127.0.0.2", "-j", "DROP")  # fmt: skip
        if rule.returncode != 0:
            return (f"iptables inside a namespace failed: {rule.stderr.strip()}",)
        try:
            own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
            target = os.open(f"/run/netns/{name}", os.O_RDONLY)
            try:
                _setns(target)
                _setns(own)
            finally:
                os.close(own)
                os.close(target)
        except OSError as exc:
            return (f"setns into a namespace failed: {exc}",)
    finally:
        _run("ip", "netns", "del", name)
    return ()


class NetNS:
    """One network namespace, created on ``create()`` and removed on ``delete()``."""

    def __init__(self, prefix: str = "fpt") -> None:
        self.name = f"{prefix}-{os.getpid()}-{next(_names)}"
        self.created = False

    def create(self) -> NetNS:
        for argv in (("ip", "netns", "add", self.name), ("ip", "-n", self.name, "link", "set", "lo", "up")):
            result = _run(*argv)
            if result.returncode != 0:
                self.delete()
                raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip()}")
            self.created = True
        return self

    def delete(self) -> None:
        if self.created:
            _run("ip", "netns", "del", self.name)
            self.created = False

    def cmd(self, *argv: str) -> list[str]:
        """``argv`` run inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def iptables(self, *rule: str) -> None:
        result = _run(*self.cmd("iptables", *rule))
        if result.returncode != 0:
            raise RuntimeError(f"iptables {' '.join(rule)} in {self.name}: {result.stderr.strip()}")

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """The calling thread inside this namespace; back in its own on exit. Never await inside."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(own)
            os.close(target)

    def socket(self, family: int = socket.AF_INET) -> socket.socket:
        with self.entered():
            sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        return sock

    async def open_connection(
        self, host: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sock = self.socket()
        try:
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)

    async def bridge(self, target: tuple[str, int], host: str = "127.0.0.1") -> tuple[asyncio.Server, int]:
        """A listener in this namespace relaying each connection to ``target`` in the host's."""
        listener = self.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, 0))
        listener.listen(128)

        async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()

        async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection(*target)
            except OSError:
                writer.close()
                return
            await asyncio.gather(pump(reader, upstream_writer), pump(upstream_reader, writer))

        server = await asyncio.start_server(relay, sock=listener)
        return server, listener.getsockname()[1]


async def http_request(
    connect: tuple[NetNS | None, str, int], target: str, headers: str = "", timeout: float = 10.0
) -> tuple[int, bytes]:
    """One ``Connection: close`` GET; (status, body). ``connect``: (namespace or None, host, port)."""
    ns, host, port = connect
    if ns is None:
        reader, writer = await asyncio.open_connection(host, port)
    else:
        reader, writer = await ns.open_connection(host, port)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: a\r\n{headers}Connection: close\r\n\r\n".encode())
        async with asyncio.timeout(timeout):
            response = await reader.read(-1)
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body

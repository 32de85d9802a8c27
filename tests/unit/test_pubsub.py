"""statesync.pubsub: the RESP parsing driven by bytes, then subscriptions to a real valkey-server
(password, ACL user, refusals, db, TLS through a real TLS terminator, Sentinel)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import valkey
from valkey.exceptions import AuthenticationError, NoPermissionError

from statesync.connect import connect
from statesync.embedded import EmbeddedValkey, free_port, valkey_binary
from statesync.pubsub import PubSubProtocolError, SubscriberProtocol, encode_command, subscribe
from tests.conftest import wait_for


class Recorder:
    """The sink: what the protocol handed on, in order."""

    def __init__(self, raise_on: bytes | None = None) -> None:
        self.messages: list[bytes] = []
        self.reads: list[int] = []  # messages handed on before each ``received()``
        self.confirmations: list[int] = []
        self.ended: list[BaseException | None] = []
        self.raise_on = raise_on

    def message(self, payload: bytes) -> None:
        if payload == self.raise_on:
            raise ValueError("sink refused")
        self.messages.append(payload)

    def received(self) -> None:
        self.reads.append(len(self.messages) - sum(self.reads))

    def subscribed(self, count: int) -> None:
        self.confirmations.append(count)

    def lost(self, exc: BaseException | None) -> None:
        self.ended.append(exc)


class FakeTransport:
    """Just enough transport for bytes-driven tests: records writes and the abort."""

    def __init__(self) -> None:
        self.written = b""
        self.aborted = False

    def get_extra_info(self, name: str) -> Any:
        return None

    def write(self, data: bytes) -> None:
        self.written += data

    def abort(self) -> None:
        self.aborted = True


def message(payload: bytes, channel: bytes = b"fastproxy:deltas") -> bytes:
    return b"*3\r\n$7\r\nmessage\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
        len(channel),
        channel,
        len(payload),
        payload,
    )


def confirmation(channel: bytes = b"fastproxy:deltas", count: int = 1) -> bytes:
    return b"*3\r\n$9\r\nsubscribe\r\n$%d\r\n%s\r\n:%d\r\n" % (len(channel), channel, count)


_CHANNEL_KNOWN = [False]


@pytest.fixture(params=["any-channel", "channel-known"])
def parse_path(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every bytes-driven test twice: the general frame parser, and the fast path for the one
    channel subscribed to (which ``subscribe`` always uses)."""
    _CHANNEL_KNOWN[0] = request.param == "channel-known"
    yield
    _CHANNEL_KNOWN[0] = False


def protocol(sink: Recorder, oks: int = 0) -> tuple[SubscriberProtocol, FakeTransport]:
    channel = b"fastproxy:deltas" if _CHANNEL_KNOWN[0] else None
    proto = SubscriberProtocol(sink, encode_command("SUBSCRIBE", "fastproxy:deltas"), oks, channel)
    transport = FakeTransport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    return proto, transport


# ---- bytes in, callbacks out -----------------------------------------------------------------------


@pytest.mark.usefixtures("parse_path")
def test_handshake_is_written_on_connect() -> None:
    _, transport = protocol(Recorder())
    assert transport.written == b"*2\r\n$9\r\nSUBSCRIBE\r\n$16\r\nfastproxy:deltas\r\n"
    assert (
        encode_command("AUTH", "router", "pä ss")
        == b"*3\r\n$4\r\nAUTH\r\n$6\r\nrouter\r\n$6\r\np\xc3\xa4 ss\r\n"
    )


@pytest.mark.usefixtures("parse_path")
def test_oks_confirmation_and_messages_in_one_read() -> None:
    sink = Recorder()
    proto, _ = protocol(sink, oks=2)
    payloads = [b"D" + bytes(range(256)), b"", b"H\r\n$3\r\n*3\r\n"]  # binary, empty, RESP-looking
    proto.data_received(b"+OK\r\n+OK\r\n" + confirmation() + b"".join(message(p) for p in payloads))
    assert sink.confirmations == [1]
    assert sink.messages == payloads
    assert sink.ended == []


@pytest.mark.usefixtures("parse_path")
@pytest.mark.parametrize("step", [1, 2, 3, 7, 64])
def test_frames_split_anywhere_are_reassembled(step: int) -> None:
    payloads = [b"D" * 10, b"H" * 3000, b"D" + b"\r\n" * 50, b"x"]
    stream = confirmation() + b"".join(message(p) for p in payloads)
    sink = Recorder()
    proto, _ = protocol(sink)
    for i in range(0, len(stream), step):
        proto.data_received(stream[i : i + step])
    assert sink.confirmations == [1]
    assert sink.messages == payloads
    assert sink.ended == []


@pytest.mark.usefixtures("parse_path")
def test_error_reply_ends_the_subscription_with_valkeys_exception() -> None:
    sink = Recorder()
    proto, transport = protocol(sink, oks=1)
    proto.data_received(b"-WRONGPASS invalid username-password pair or user is disabled.\r\n")
    assert len(sink.ended) == 1 and isinstance(sink.ended[0], AuthenticationError)
    assert transport.aborted and proto.closed
    proto.data_received(message(b"late"))  # nothing after the end
    assert sink.messages == []

    sink = Recorder()
    proto, _ = protocol(sink)
    proto.data_received(b"-NOPERM User router has no permissions to access the 'x' channel\r\n")
    assert isinstance(sink.ended[0], NoPermissionError)


@pytest.mark.usefixtures("parse_path")
def test_unexpected_frames_and_sink_errors_end_the_subscription() -> None:
    sink = Recorder()
    proto, _ = protocol(sink)
    proto.data_received(b"*3\r\n$11\r\nunsubscribe\r\n$1\r\nx\r\n:0\r\n")
    assert isinstance(sink.ended[0], PubSubProtocolError)

    sink = Recorder(raise_on=b"bad")
    proto, transport = protocol(sink)
    proto.data_received(message(b"ok") + message(b"bad") + message(b"never"))
    assert sink.messages == [b"ok"]
    assert isinstance(sink.ended[0], ValueError) and transport.aborted

    sink = Recorder()
    proto, _ = protocol(sink)
    proto.connection_lost(None)
    proto.close()  # ends once
    assert len(sink.ended) == 1 and isinstance(sink.ended[0], valkey.ConnectionError)


# ---- a real valkey-server ---------------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[EmbeddedValkey]:
    with EmbeddedValkey(password="s3cret") as s:
        yield s


async def received(url: str, publish_url: str, channel: str = "fastproxy:deltas") -> Recorder:
    """Subscribe through ``url``, publish three payloads through ``publish_url``, return what came."""
    sink = Recorder()
    sub_client = connect(url)
    proto = await subscribe(sub_client, channel, sink)
    try:
        await wait_for(lambda: sink.confirmations or sink.ended, what="subscribe confirmation")
        if sink.ended:
            return sink
        publisher = connect(publish_url)
        big = b"D" + b"\x00\xff" * 300_000  # many TCP segments
        for payload in (b"D1", big, b"H2"):
            await publisher.publish(channel, payload)
        await wait_for(lambda: len(sink.messages) == 3 or sink.ended, what="3 messages")
        assert sink.messages == [b"D1", big, b"H2"]
        await publisher.aclose()
    finally:
        proto.close()
        await sub_client.aclose()
    return sink


async def test_password_and_db(server: EmbeddedValkey) -> None:
    url = f"valkey://:s3cret@127.0.0.1:{server.port}/3"
    sink = await received(url, url)
    assert sink.confirmations == [1]
    # A publish on db 0 reaches db 3's subscriber (pub/sub ignores the db), but the SELECT was sent
    # and accepted: a refused one would have ended the subscription.
    wrong = await received(f"valkey://:nope@127.0.0.1:{server.port}/0", url)
    assert isinstance(wrong.ended[0], AuthenticationError)


async def test_acl_user_may_subscribe_only_its_channel(server: EmbeddedValkey) -> None:
    admin = connect(server.url)
    await admin.execute_command("ACL", "SETUSER", "reader", "on", ">pw", "+subscribe", "&fastproxy:deltas")
    reader = f"valkey://reader:pw@127.0.0.1:{server.port}/0"
    sink = await received(reader, server.url)
    assert sink.confirmations == [1] and sink.ended[-1] is None
    refused = await received(reader, server.url, channel="other:deltas")
    assert isinstance(refused.ended[0], NoPermissionError)
    await admin.aclose()


@contextlib.asynccontextmanager
async def tls_terminator(target_port: int, cert: Path, key: Path) -> AsyncIterator[int]:
    """A real TLS server on loopback that pipes the decrypted bytes to valkey-server and back."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pipe(client_r, server_w), pipe(server_r, client_w))

    tls = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    try:
        yield tls.sockets[0].getsockname()[1]
    finally:
        tls.close()


async def test_tls_uses_the_clients_ssl_options(server: EmbeddedValkey, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    async with tls_terminator(server.port, cert, key) as port:
        url = f"valkeys://:s3cret@127.0.0.1:{port}/0?ssl_ca_certs={cert}"
        sink = await received(url, server.url)
        assert sink.confirmations == [1]
        # Without the CA the certificate is refused: the URL's ssl options are what is used.
        with pytest.raises(ssl.SSLCertVerificationError):
            await received(f"valkeys://:s3cret@127.0.0.1:{port}/0", server.url)


async def test_sentinel_finds_the_master(server: EmbeddedValkey, tmp_path: Path) -> None:
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor fleet 127.0.0.1 {server.port} 1\nsentinel auth-pass fleet s3cret\n"
    )
    process = subprocess.Popen(
        [str(valkey_binary()), str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        probe = valkey.Valkey("127.0.0.1", port)
        deadline = time.monotonic() + 10
        while True:
            try:
                if probe.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "fleet"):
                    break
            except valkey.ConnectionError:
                pass
            assert time.monotonic() < deadline, "sentinel did not come up"
            await asyncio.sleep(0.05)  # the sentinel is still starting; nothing to wait on
        probe.close()
        url = f"valkey+sentinel://:s3cret@127.0.0.1:{port}/fleet"
        sink = await received(url, server.url)
        assert sink.confirmations == [1]
    finally:
        process.kill()
        process.wait(5)


@pytest.mark.usefixtures("parse_path")
def test_received_is_called_once_per_read_after_its_messages() -> None:
    sink = Recorder()
    proto, _ = protocol(sink)
    proto.data_received(confirmation() + message(b"D1") + message(b"D2"))
    proto.data_received(message(b"D3")[:10])  # incomplete: nothing handed on, nothing to act on
    proto.data_received(message(b"D3")[10:] + message(b"D4"))
    assert sink.messages == [b"D1", b"D2", b"D3", b"D4"]
    assert [n for n in sink.reads if n] == [2, 2]


def test_a_message_of_another_channel_takes_the_general_parser() -> None:
    sink = Recorder()
    proto = SubscriberProtocol(sink, b"", 0, b"fastproxy:deltas")
    proto.connection_made(FakeTransport())  # type: ignore[arg-type]
    proto.data_received(message(b"D1") + message(b"X", channel=b"other") + message(b"D2"))
    assert sink.messages == [b"D1", b"X", b"D2"] and sink.ended == []

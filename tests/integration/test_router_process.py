"""``fastproxy router`` and ``fastproxy status`` as real processes: CLI, admin API, SIGTERM drain."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import msgspec

import fastproxy
from fastproxy.compiled import describe as describe_form
from fastproxy.config import RoutesFile
from fastproxy.devtools.upstream import AppServer
from tests.conftest import chat_route, next_pod_address, pod_record

FASTPROXY = [sys.executable, "-m", "fastproxy.cli"]


async def start_router(
    tmp_path: Path, apps: list[AppServer], *extra: str
) -> tuple[asyncio.subprocess.Process, int, int]:
    routes = RoutesFile(
        routes=[chat_route()], pods=[pod_record(f"p{i}", a.address) for i, a in enumerate(apps)]
    )
    routes_path = tmp_path / "routes.json"
    routes_path.write_bytes(msgspec.json.encode(routes))
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    proc = await asyncio.create_subprocess_exec(
        *FASTPROXY, "router", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
        "--routes", str(routes_path), "--admin-token-file", str(token), *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 20)
    assert line.startswith(b"listening "), line
    _, listen, _, admin = line.decode().split()
    return proc, int(listen.rsplit(":", 1)[1]), int(admin.rsplit(":", 1)[1])


async def test_admin_api_auth_metrics_and_tables(tmp_path: Path) -> None:
    app = AppServer()
    await app.start(next_pod_address())
    proc, port, admin = await start_router(tmp_path, [app])
    try:
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"http://127.0.0.1:{port}/")).status_code == 200
            base = f"http://127.0.0.1:{admin}"
            assert (await client.get(f"{base}/healthz")).status_code == 200
            assert (await client.get(f"{base}/readyz")).status_code == 200
            for path in ("/metrics", "/v1/pods", "/v1/revisions"):
                assert (await client.get(base + path)).status_code == 401
                wrong = await client.get(base + path, headers={"Authorization": "Bearer nope"})
                assert wrong.status_code == 401
            auth = {"Authorization": "Bearer s3cret"}
            metrics = (await client.get(f"{base}/metrics", headers=auth)).text
            assert 'fastproxy_responses_total{status="200"} 1.0' in metrics
            assert "fastproxy_added_latency_seconds_bucket" in metrics
            # issue 18: 10.25%-apart edges in the exposition (bounded), the real figures beside them
            assert 100 < metrics.count("fastproxy_added_latency_seconds_bucket{") < 150
            p50 = next(line for line in metrics.splitlines()
                       if line.startswith('fastproxy_added_latency_quantile_seconds{quantile="0.5"}'))  # fmt: skip
            assert 0 < float(p50.split()[-1]) < 1
            assert 'fastproxy_inflight{revision="chat-v1"} 0.0' in metrics
            # the collector's pauses (the routes file's load ended with one full, timed collection)
            # and what that load froze out of its sight
            gc_figures = dict(
                line.rsplit(" ", 1) for line in metrics.splitlines() if line.startswith("fastproxy_gc_")
            )
            assert float(gc_figures['fastproxy_gc_pause_seconds_count{generation="2"}']) >= 1
            assert float(gc_figures['fastproxy_gc_pause_seconds_sum{generation="2"}']) > 0
            assert float(gc_figures["fastproxy_gc_frozen_objects"]) > 1000
            pods = (await client.get(f"{base}/v1/pods", headers=auth)).json()
            assert pods[0]["uid"] == "p0" and pods[0]["state"] == "ready"
        status = await asyncio.create_subprocess_exec(
            *FASTPROXY, "status", "--admin", f"127.0.0.1:{admin}", "--json",
            env={**os.environ, "FASTPROXY_ADMIN_TOKEN": "s3cret"}, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(status.communicate(), 20)
        assert status.returncode == 0
        report = json.loads(out)
        assert report["revisions"][0]["revision"] == "chat-v1" and report["state"]["requests"] == 1
        denied = await asyncio.create_subprocess_exec(
            *FASTPROXY, "status", "--admin", f"127.0.0.1:{admin}", stderr=asyncio.subprocess.PIPE,
            env={k: v for k, v in os.environ.items() if k != "FASTPROXY_ADMIN_TOKEN"},
        )  # fmt: skip
        _, err = await asyncio.wait_for(denied.communicate(), 20)
        assert denied.returncode == 1 and b"401" in err
        proc.terminate()
        assert proc.stderr is not None
        log = (await asyncio.wait_for(proc.stderr.read(), 20)).decode()
        # the start line says which form of the data path this process runs
        assert f"admin on 127.0.0.1:{admin}; {describe_form()}" in log, log
    finally:
        if proc.returncode is None:
            proc.terminate()
        await asyncio.wait_for(proc.wait(), 20)
        await app.close()


async def test_sigterm_lets_in_flight_stream_finish_and_stops_accepting(tmp_path: Path) -> None:
    app = AppServer()
    await app.start(next_pod_address())
    proc, port, _ = await start_router(tmp_path, [app], "--grace-period", "10")
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /sse/5/200 HTTP/1.1\r\nHost: a\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"data: 0\n\n"), 10)
        proc.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(reader.read(-1), 15)  # the router closes after the stream
        assert rest.endswith(b"data: 4\n\n\r\n0\r\n\r\n")
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        try:
            _, w2 = await asyncio.open_connection("127.0.0.1", port)
            w2.close()
            raise AssertionError("router still accepts after SIGTERM")
        except OSError:
            pass
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await app.close()


def test_cli_help_version_and_bad_routes_file(tmp_path: Path) -> None:
    out = subprocess.run([*FASTPROXY, "--version"], capture_output=True, text=True, check=True).stdout
    # the form this test process runs in (make test: compiled, then pure) is the child's too
    assert out == f"fastproxy {fastproxy.__version__}, {describe_form()}\n"
    pure = {**os.environ, "FASTPROXY_PURE": "1"}
    out = subprocess.run(
        [*FASTPROXY, "--version"], capture_output=True, text=True, check=True, env=pure
    ).stdout
    assert out == f"fastproxy {fastproxy.__version__}, data path pure Python (FASTPROXY_PURE=1)\n"
    helptext = subprocess.run(
        [*FASTPROXY, "router", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--routes" in helptext and "--sidecar-protocol" in helptext
    bad = tmp_path / "routes.json"
    bad.write_text('{"routes": [{"service": "x", "revisions": []}], "pods": [{"uid": "a", "port": 0}]}')
    result = subprocess.run([*FASTPROXY, "router", "--routes", str(bad)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "routes file" in result.stderr and "$.routes[0]" in result.stderr

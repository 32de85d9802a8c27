"""``fastproxy status``: the router's tables for a person (rich) or a script (--json).

Reads the admin API (/v1/state, /v1/revisions, /v1/pods) with the bearer token.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any


def fetch(base: str, path: str, token: str | None, timeout: float = 3.0) -> Any:
    request = urllib.request.Request(base.rstrip("/") + path)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def run(args: argparse.Namespace) -> int:
    token = None
    if args.token_file:
        with open(args.token_file) as handle:
            token = handle.read().strip()
    token = token or os.environ.get("FASTPROXY_ADMIN_TOKEN")
    base = args.admin if "://" in args.admin else f"http://{args.admin}"
    try:
        state = fetch(base, "/v1/state", token)
        revisions = fetch(base, "/v1/revisions", token)
        pods = fetch(base, "/v1/pods", token)
    except urllib.error.HTTPError as exc:
        hint = " (pass --token-file or set FASTPROXY_ADMIN_TOKEN)" if exc.code == 401 else ""
        print(f"fastproxy status: {base} answered {exc.code} {exc.reason}{hint}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"fastproxy status: cannot reach the admin API at {base}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        json.dump({"state": state, "revisions": revisions, "pods": pods}, sys.stdout, indent=2)
        print()
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(
        f"[bold]{state['instance']}[/]  epoch {state['epoch']} version {state['version']}"
        f"{' [red](stale)[/]' if state['stale'] else ''}  pods {state['pods']}  "
        f"requests {state['requests']}  added latency p50/p90/p99 "
        f"{state['added_latency_p50'] * 1e6:.0f}/{state['added_latency_p90'] * 1e6:.0f}/"
        f"{state['added_latency_p99'] * 1e6:.0f} us"
    )
    table = Table(title="revisions")
    for column in ("revision", "pods by state", "in flight", "queued", "free slots", "websocket sessions"):
        table.add_column(column)
    for rev in revisions:
        by_state = ", ".join(f"{k} {v}" for k, v in sorted(rev["pods"].items()))
        ws = rev.get("websocket") or {}
        table.add_row(
            rev["revision"], by_state, str(rev["inflight"]), str(rev["queued"]), str(rev["free_slots"]),
            f"{ws.get('open', 0)} open / {ws.get('opened', 0)}",
        )  # fmt: skip
    console.print(table)
    table = Table(title=f"pods (first {args.limit})")
    for column in ("uid", "revision", "address", "state", "reason", "source", "in flight", "excluded"):
        table.add_column(column)
    for pod in pods[: args.limit]:
        table.add_row(
            pod["uid"], pod["revision"], pod["address"], pod["state"], pod["reason"], pod["source"],
            f"{pod['inflight']}/{pod['concurrency']}", "yes" if pod["excluded"] else "",
        )  # fmt: skip
    console.print(table)
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "status",
        help="show a router's revisions and pods (from its admin API)",
        description="Print a router's routing state: revisions (pods by state, in flight, queued) and pods.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--admin", default="127.0.0.1:9090", help="the router's admin HOST:PORT or URL")
    parser.add_argument("--token-file", help="bearer token file (else $FASTPROXY_ADMIN_TOKEN)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--limit", type=int, default=50, help="pods to list")
    parser.set_defaults(func=run)

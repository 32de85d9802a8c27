"""The ``fastproxy`` command line: one console script, one subcommand per process role.

Theory of operation
-------------------
Each subcommand lives in the module that owns the role and registers itself here through
``SUBCOMMANDS`` (name -> "module:register" where ``register(subparsers)`` adds its parser and sets
``func``). Modules are imported lazily so a role's heavy imports (bcc, kubernetes) never load for
another role: when the command line names a subcommand, only that subcommand's module is imported
(a router process does not carry the simulator, the writer or the agent: ~9 MB of its resident set);
only ``fastproxy --help`` (or no or an unknown subcommand) imports them all, to list them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from fastproxy import __version__

# Subcommands appear here as the issues that implement them land.
SUBCOMMANDS: dict[str, str] = {
    "router": "fastproxy.router:register",
    "status": "fastproxy.status:register",
    "writer": "statesync.writer:register",
    "dev": "fastproxy.devtools.dev:register",
    "sidecar": "fastproxy.sidecar:register",
    "agent": "probes.agent:register",
}


class _VersionAction(argparse.Action):
    """``--version``: the form is found by importing the data path, so only when asked."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from fastproxy.compiled import describe

        sys.stdout.write(f"fastproxy {__version__}, {describe()}\n")
        parser.exit()


def _named_subcommand(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names, if any (its first word that is not an option)."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in SUBCOMMANDS else None
    return None


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The command line's parser; given ``argv`` that names a subcommand, with that one only."""
    parser = argparse.ArgumentParser(
        prog="fastproxy",
        description=(
            "fastproxy: an ingress router for real-time AI inference on Kubernetes. It sends each "
            "request straight to a pod that can serve it now, learns readiness in milliseconds, and "
            "turns transport failures into quarantine + retry elsewhere instead of user errors."
        ),
    )
    parser.add_argument(
        "--version",
        action=_VersionAction,
        help="print the version and the data path's form (compiled or pure), then exit",
    )
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    named = None if argv is None else _named_subcommand(argv)
    for name, target in SUBCOMMANDS.items():
        if named is not None and name != named:
            continue
        module_name, _, function = target.partition(":")
        getattr(importlib.import_module(module_name), function)(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    result = func(args)
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

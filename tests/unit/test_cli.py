"""The command line imports only the role it runs (a router's resident set is the issue-15 target)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fastproxy.cli import SUBCOMMANDS, build_parser

# Modules owned by other roles: heavy (the simulator, the Kubernetes informer), never a router's.
OTHER_ROLES = ("fastproxy.devtools.simulator", "fastproxy.devtools.dev", "statesync.writer", "probes.agent")


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"import sys\n{code}\nprint(' '.join(sys.modules))"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return set(out.stdout.split())


def test_a_router_command_line_imports_no_other_role() -> None:
    loaded = _modules_after(
        "from fastproxy.cli import build_parser\n"
        "args = build_parser(['router', '--listen', '127.0.0.1:0']).parse_args(['router', '--listen', '127.0.0.1:0'])\n"
        "assert args.func is not None"
    )
    assert "fastproxy.router" in loaded
    assert not loaded & set(OTHER_ROLES), sorted(loaded & set(OTHER_ROLES))


def test_the_top_level_help_still_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser(["--help"]).parse_args(["--help"])
    listed = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in listed


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_each_subcommand_parses_with_only_its_module(name: str) -> None:
    parser = build_parser([name])
    choices = next(a.choices for a in parser._actions if isinstance(getattr(a, "choices", None), dict))
    assert list(choices) == [name]


def test_an_unknown_subcommand_is_refused_naming_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser(["rooter"]).parse_args(["rooter"])
    assert "invalid choice: 'rooter'" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["router-a", "edge-1.us-east:2", "r_0", "A" * 64])
def test_an_instance_name_safe_in_headers_and_labels_is_taken(name: str) -> None:
    args = build_parser(["router"]).parse_args(["router", "--instance", name])
    assert args.instance == name


@pytest.mark.parametrize("name", ['say "hi"', "two\nlines", "with space", "", "-leading", "é", "A" * 65])
def test_an_instance_name_that_would_break_request_ids_is_refused(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # It prefixes the X-Request-Id sent to pods: a quote or a newline there made every proxied
    # request a 400 from the pod instead of an error at start.
    with pytest.raises(SystemExit) as exit_info:
        build_parser(["router"]).parse_args(["router", f"--instance={name}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--instance" in err and "is not an instance name" in err


def test_the_delta_coalescing_window_reaches_the_config_and_is_bounded() -> None:
    from fastproxy.config import ConfigError
    from fastproxy.router import MAX_DELTA_COALESCE_MS, _config_from_args

    parse = build_parser(["router"]).parse_args
    assert _config_from_args(parse(["router"])).delta_coalesce_ms == 0  # off unless asked for
    assert _config_from_args(parse(["router", "--delta-coalesce-ms", "10"])).delta_coalesce_ms == 10
    for bad in (-1, MAX_DELTA_COALESCE_MS + 1):
        with pytest.raises(ConfigError, match="--delta-coalesce-ms must be between 0"):
            _config_from_args(parse(["router", f"--delta-coalesce-ms={bad}"]))

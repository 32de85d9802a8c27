"""The README's examples work as written: its static routes file loads and means what it says."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest

from fastproxy.config import ConfigError, load_routes_file
from statesync.schema import LLMRouting, PodState

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_block(first_line: str) -> str:
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), flags=re.S)
    found = [b for b in blocks if b.startswith(first_line)]
    assert len(found) == 1, f"README has {len(found)} yaml blocks starting {first_line!r}"
    return found[0]


def test_the_readme_routes_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(readme_block("# routes.yaml"))
    loaded = load_routes_file(path)
    chat, llm = loaded.routes
    assert chat.service == "chat" and chat.hosts == ("chat.example.com",)
    assert [(r.revision, r.weight) for r in chat.revisions] == [("chat-v1", 90), ("chat-v2", 10)]
    assert llm.llm is not None and llm.llm.prefix_bytes == 4096
    pods = {p.uid: p for p in loaded.pods}
    assert sorted(pods) == ["chat-1", "chat-2", "chat-3", "llama-1"]
    assert pods["llama-1"].concurrency == 8 and pods["chat-3"].concurrency == 1  # the default
    assert all(p.state is PodState.READY for p in pods.values())  # routable as listed


def test_a_wrong_field_in_the_readme_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(readme_block("# routes.yaml").replace("port: 8012}", "port: http}", 1))
    with pytest.raises(ConfigError, match=r"pods\[2\]: .*\$\.port"):
        load_routes_file(path)


def test_the_readme_llm_table_lists_every_field_with_its_default() -> None:
    """The routes-file reference for ``llm:`` is the schema's: every field, in order, no other."""
    text = README.read_text()
    table = text[text.index("| field | default | what it does |") :]
    table = table[: table.index("\n\n")]
    rows = [line.split(" | ")[:2] for line in table.splitlines()[2:]]
    names = [row[0].strip("| `") for row in rows]
    assert names == [f.name for f in msgspec.structs.fields(LLMRouting)]
    defaults = {row[0].strip("| `"): row[1] for row in rows}
    assert defaults["affinity_wait_ms"] == "unset"
    assert defaults["prefix_bytes"] == str(LLMRouting().prefix_bytes)

"""The fault suite's report: one row per scenario, printed as a table at the end of the run.

Theory of operation
-------------------
Each scenario test asks for the ``fault_report`` fixture and, once it has checked its invariants,
adds one row: the scenario's name, how many requests the load generator sent, the errors clients
saw grouped by kind (``"502"``, ``"503"``, ``"reset"``, ``"truncated"``, ...), and the number of
invariant violations it found. Rows are kept for the whole session and printed by
``pytest_terminal_summary`` (so ``make test`` and ``make faults`` both end with the table), and, when
``FAULTS_REPORT`` names a file, written there as JSON for the closing note and the README.

A row is added even when the scenario fails its assertions (``add`` is called before asserting
``violations == 0``), so the table shows what went wrong, not only that something did.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import pytest


@dataclass(slots=True)
class ScenarioRow:
    scenario: str
    requests: int
    errors: dict[str, int] = field(default_factory=dict)
    violations: int = 0
    notes: str = ""


class FaultReport:
    __slots__ = ("rows",)

    def __init__(self) -> None:
        self.rows: list[ScenarioRow] = []

    def add(
        self,
        scenario: str,
        requests: int,
        errors: dict[str, int] | None = None,
        violations: int = 0,
        notes: str = "",
    ) -> ScenarioRow:
        row = ScenarioRow(scenario, requests, dict(sorted((errors or {}).items())), violations, notes)
        self.rows.append(row)
        return row

    def table(self) -> str:
        header = ("scenario", "requests", "errors by kind", "violations", "notes")
        body = [
            (
                r.scenario,
                str(r.requests),
                ", ".join(f"{k}={v}" for k, v in r.errors.items()) or "-",
                str(r.violations),
                r.notes,
            )
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in (header, *body)) for i in range(len(header))]
        lines = [
            " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in (header, *body)
        ]
        lines.insert(1, "-+-".join("-" * w for w in widths))
        return "\n".join(lines)


_REPORT = FaultReport()


@pytest.fixture
def fault_report() -> Iterator[FaultReport]:
    yield _REPORT


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _REPORT.rows:
        return
    terminalreporter.section("fault scenarios")
    terminalreporter.write_line(_REPORT.table())
    total = sum(r.violations for r in _REPORT.rows)
    terminalreporter.write_line(f"invariant violations in total: {total}")
    path = os.environ.get("FAULTS_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump([asdict(r) for r in _REPORT.rows], f, indent=2)


LONG = os.environ.get("FAULTS_LONG") == "1"


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    """``faults_long`` scenarios run only in ``make faults``; ``make test`` deselects them."""
    if LONG:
        return
    long_ones = [item for item in items if item.get_closest_marker("faults_long")]
    if long_ones:
        config.hook.pytest_deselected(items=long_ones)
        items[:] = [item for item in items if not item.get_closest_marker("faults_long")]

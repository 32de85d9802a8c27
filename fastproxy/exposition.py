"""Prometheus text exposition (format 0.0.4) without prometheus_client.

Theory of operation
-------------------
The router renders /metrics itself: importing prometheus_client costs a router ~4.7 MB of RSS (it
pulls in http.server, wsgiref, email and urllib.request) and the router only ever used its three
custom-collector families and ``generate_latest``. This module keeps that surface: the
``CounterMetricFamily``, ``GaugeMetricFamily`` and ``HistogramMetricFamily`` constructors and
``add_metric`` as prometheus_client has them (``value=`` or ``labels=``; ``buckets=`` and
``sum_value=``), and ``render(families)``, which writes the bytes ``generate_latest`` writes for
the same families, line for line (tests/unit/test_exposition.py compares the two):

- ``# HELP`` (backslash and newline escaped) and ``# TYPE`` lines per family; a counter is named
  with ``_total`` (a ``_total`` given in its name is dropped first, as prometheus_client does);
- a sample's labels sorted by name (a histogram's ``le`` included), values escaped for ``\\``,
  ``"`` and newline;
- values as prometheus_client's ``floatToGoString``: ``+Inf``, ``-Inf``, ``NaN``, ints as floats
  (``3.0``), Python's repr otherwise, except that positive values of 1e6 and more take Go's
  exponent form (``1.5e+06``);
- a histogram writes ``_bucket`` per edge, then ``_count`` (the ``+Inf`` bucket) and ``_sum``, the
  last two only when a sum is given and the first edge is not negative.

Families are built and rendered at scrape time only; nothing here runs per request. A name that is
not a legal metric or label name, or label values that do not match the label names, raise
``ValueError`` when the family is built rather than producing a scrape Prometheus rejects.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Protocol

_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_INF = float("inf")

# (sample name, labels sorted by name as (name, escaped value), value)
Sample = tuple[str, tuple[tuple[str, str], ...], float]


def format_value(value: float) -> str:
    """A sample value (or ``le``) as prometheus_client's ``floatToGoString`` writes it."""
    number = float(value)
    if number == _INF:
        return "+Inf"
    if number == -_INF:
        return "-Inf"
    if math.isnan(number):
        return "NaN"
    text = repr(number)
    dot = text.find(".")
    # Go switches to exponents sooner than Python; only positive values (edges, counts) need it.
    if number > 0 and dot > 6:
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


class MetricFamily:
    """One metric family: its name, help, type and samples, ready for ``render``."""

    __slots__ = ("_label_names", "documentation", "name", "samples", "type")

    def __init__(self, name: str, documentation: str, kind: str, labels: Sequence[str] | None) -> None:
        if not _METRIC_NAME.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        names = tuple(labels or ())
        for label in names:
            if not _LABEL_NAME.match(label) or label.startswith("__"):
                raise ValueError(f"invalid label name {label!r} in metric {name!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate label names {names!r} in metric {name!r}")
        self.name = name
        self.documentation = documentation
        self.type = kind
        self._label_names = names
        self.samples: list[Sample] = []

    def _labels(
        self, values: Sequence[str], extra: tuple[str, str] | None = None
    ) -> tuple[tuple[str, str], ...]:
        if len(values) != len(self._label_names):
            raise ValueError(
                f"metric {self.name!r} has labels {self._label_names!r}, got values {tuple(values)!r}"
            )
        pairs = [
            (label, escape_label_value(value)) for label, value in zip(self._label_names, values, strict=True)
        ]
        if extra is not None:
            pairs.append(extra)
        pairs.sort()
        return tuple(pairs)


def _value_or_labels(name: str, value: float | None, labels: Sequence[str] | None) -> None:
    if labels is not None and value is not None:
        raise ValueError(f"metric {name!r}: give value or labels, not both")


class CounterMetricFamily(MetricFamily):
    __slots__ = ()

    def __init__(
        self, name: str, documentation: str, value: float | None = None, labels: Sequence[str] | None = None
    ) -> None:
        _value_or_labels(name, value, labels)
        super().__init__(name.removesuffix("_total"), documentation, "counter", labels)
        if value is not None:
            self.add_metric([], value)

    def add_metric(self, labels: Sequence[str], value: float) -> None:
        self.samples.append((self.name + "_total", self._labels(labels), value))


class GaugeMetricFamily(MetricFamily):
    __slots__ = ()

    def __init__(
        self, name: str, documentation: str, value: float | None = None, labels: Sequence[str] | None = None
    ) -> None:
        _value_or_labels(name, value, labels)
        super().__init__(name, documentation, "gauge", labels)
        if value is not None:
            self.add_metric([], value)

    def add_metric(self, labels: Sequence[str], value: float) -> None:
        self.samples.append((self.name, self._labels(labels), value))


class HistogramMetricFamily(MetricFamily):
    __slots__ = ()

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: Sequence[tuple[str, float]] | None = None,
        sum_value: float | None = None,
        labels: Sequence[str] | None = None,
    ) -> None:
        if sum_value is not None and buckets is None:
            raise ValueError(f"metric {name!r}: a sum needs buckets")
        if labels is not None and buckets is not None:
            raise ValueError(f"metric {name!r}: give buckets or labels, not both")
        super().__init__(name, documentation, "histogram", labels)
        if buckets is not None:
            self.add_metric([], buckets, sum_value)

    def add_metric(
        self, labels: Sequence[str], buckets: Sequence[tuple[str, float]], sum_value: float | None
    ) -> None:
        """``buckets`` are (le, cumulative count) in increasing order, ``+Inf`` last."""
        if not buckets or buckets[-1][0] != "+Inf":
            raise ValueError(f"metric {self.name!r}: buckets must end with +Inf, got {list(buckets)[-1:]!r}")
        bucket_name = self.name + "_bucket"
        for le, count in buckets:
            self.samples.append((bucket_name, self._labels(labels, ("le", escape_label_value(le))), count))
        # As prometheus_client: no count and sum beside negative edges (the sum would not be a sum).
        if sum_value is not None and float(buckets[0][0]) >= 0:
            plain = self._labels(labels)
            self.samples.append((self.name + "_count", plain, buckets[-1][1]))
            self.samples.append((self.name + "_sum", plain, sum_value))


class MetricSource(Protocol):
    """What /metrics reads: a collector (or a prometheus_client registry holding ours)."""

    def collect(self) -> Iterable[MetricFamily]: ...


def render(families: Iterable[MetricFamily]) -> bytes:
    """The Prometheus text format 0.0.4 of ``families``, byte for byte as ``generate_latest``."""
    out: list[str] = []
    append = out.append
    for family in families:
        exposed = family.name + "_total" if family.type == "counter" else family.name
        append(f"# HELP {exposed} {escape_help(family.documentation)}\n# TYPE {exposed} {family.type}\n")
        for sample_name, labels, value in family.samples:
            if labels:
                pairs = ",".join([f'{label}="{escaped}"' for label, escaped in labels])
                append(f"{sample_name}{{{pairs}}} {format_value(value)}\n")
            else:
                append(f"{sample_name} {format_value(value)}\n")
    return "".join(out).encode("utf-8")

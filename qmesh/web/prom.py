"""Prometheus metrics in the text exposition format (version 0.0.4).

For: a :class:`Registry` of metric families — :class:`Counter`,
:class:`Gauge`, :class:`Histogram`, each with labels — cheap to update on
a request path (a dict lookup and an add; a histogram adds a bisect; a
caller that updates the same labels each time keeps the series' handle,
:meth:`Counter.cell`, :meth:`Histogram.series`, and skips the lookup), and
collectors: callbacks that produce whole families at scrape time from
state that already exists elsewhere (an inventory, a router's counters),
so nothing is copied on the hot path. :meth:`Registry.render` writes the
text format: ``# HELP``/``# TYPE`` once per family, label values escaped,
histograms as cumulative ``_bucket`` series with ``+Inf``, ``_sum`` and
``_count``.

One Trio thread updates and renders, so there are no locks.

Not for: what qmesh measures (:mod:`qmesh.ops.metrics`) or serving it
(:mod:`qmesh.web.http`).
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Final

import attrs

__all__ = [
    "CONTENT_TYPE",
    "Counter",
    "CounterCell",
    "Family",
    "Gauge",
    "Histogram",
    "HistogramSeries",
    "Registry",
    "Sample",
    "gauge_family",
]

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
_NAME_RE: Final = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_RE: Final = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
TYPES: Final = ("counter", "gauge", "histogram", "untyped")


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


@attrs.frozen
class Sample:
    suffix: str
    """Appended to the family's name (``""``, ``_bucket``, ``_sum``, ``_count``)."""
    labels: tuple[tuple[str, str], ...]
    value: float


@attrs.frozen
class Family:
    """One metric family as it is written out."""

    name: str
    kind: str
    help: str
    samples: Sequence[Sample]

    def render(self, out: list[str]) -> None:
        out.append(f"# HELP {self.name} {_escape_help(self.help)}")
        out.append(f"# TYPE {self.name} {self.kind}")
        for sample in self.samples:
            if sample.labels:
                pairs = ",".join(f'{k}="{_escape_label(v)}"' for k, v in sample.labels)
                out.append(f"{self.name}{sample.suffix}{{{pairs}}} {_number(sample.value)}")
            else:
                out.append(f"{self.name}{sample.suffix} {_number(sample.value)}")


def _check(name: str, labels: Sequence[str]) -> None:
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"bad metric name {name!r}")
    for label in labels:
        if not _LABEL_RE.fullmatch(label) or label.startswith("__") or label == "le":
            raise ValueError(f"bad label name {label!r} for {name}")


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        _check(name, labels)
        self.name = name
        self.help = help_text
        self.labels = tuple(labels)

    def _key(self, values: Sequence[str]) -> tuple[str, ...]:
        if len(values) != len(self.labels):
            raise ValueError(f"{self.name} takes labels {self.labels}, got {tuple(values)}")
        return tuple(values)

    def family(self) -> Family:
        raise NotImplementedError


class CounterCell:
    """One series of a :class:`Counter`, for a caller that updates the same
    labels on every request: :meth:`inc` here skips the lookup of the
    labels (a fifth of the cost of :meth:`Counter.inc`)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("a counter cannot go down")
        self.value += amount


class Counter(_Metric):
    """Only goes up (:meth:`inc` refuses negative amounts)."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        if not name.endswith("_total"):
            raise ValueError(f"a counter's name ends in _total: {name!r}")
        super().__init__(name, help_text, labels)
        self._cells: dict[tuple[str, ...], CounterCell] = {}

    def cell(self, *labels: str) -> CounterCell:
        """The series of these labels, made on first use."""
        key = labels if len(labels) == len(self.labels) else self._key(labels)
        cell = self._cells.get(key)
        if cell is None:
            cell = self._cells[key] = CounterCell()
        return cell

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        if amount < 0:  # before the series exists: a refused amount leaves none
            raise ValueError("a counter cannot go down")
        self.cell(*labels).value += amount

    def value(self, *labels: str) -> float:
        cell = self._cells.get(tuple(labels))
        return 0.0 if cell is None else cell.value

    def total(self) -> float:
        return sum(cell.value for cell in self._cells.values())

    def family(self) -> Family:
        # The exposition names the family without _total for a counter.
        return Family(
            self.name.removesuffix("_total"),
            self.kind,
            self.help,
            [
                Sample("_total", tuple(zip(self.labels, key, strict=True)), cell.value)
                for key, cell in sorted(self._cells.items())
            ],
        )


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self._values: dict[tuple[str, ...], float] = {}

    def set(self, value: float, *labels: str) -> None:
        self._values[self._key(labels)] = float(value)

    def clear(self) -> None:
        self._values.clear()

    def family(self) -> Family:
        return Family(
            self.name,
            self.kind,
            self.help,
            [
                Sample("", tuple(zip(self.labels, key, strict=True)), value)
                for key, value in sorted(self._values.items())
            ],
        )


class HistogramSeries:
    """One series of a :class:`Histogram` (as :class:`CounterCell` is of a
    counter): counts per bucket, not cumulative, ``+Inf`` last; their sum."""

    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self._bounds, value)] += 1
        self.sum += value


class Histogram(_Metric):
    """Observations counted into cumulative buckets (upper bounds, ``le``)."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        help_text: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        super().__init__(name, help_text, labels)
        bounds = sorted(float(b) for b in buckets if not math.isinf(b))
        if not bounds or len(set(bounds)) != len(bounds):
            raise ValueError("buckets must be distinct finite numbers")
        self.bounds = tuple(bounds)
        self._series: dict[tuple[str, ...], HistogramSeries] = {}

    def series(self, *labels: str) -> HistogramSeries:
        """The series of these labels, made on first use."""
        key = labels if len(labels) == len(self.labels) else self._key(labels)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = HistogramSeries(self.bounds)
        return series

    def observe(self, value: float, *labels: str) -> None:
        self.series(*labels).observe(value)

    def count(self, *labels: str) -> int:
        series = self._series.get(tuple(labels))
        return 0 if series is None else sum(series.counts)

    def family(self) -> Family:
        samples: list[Sample] = []
        for key, series in sorted(self._series.items()):
            base = tuple(zip(self.labels, key, strict=True))
            running = 0
            for bound, count in zip((*self.bounds, math.inf), series.counts, strict=True):
                running += count
                samples.append(Sample("_bucket", (*base, ("le", _number(bound))), running))
            samples.append(Sample("_sum", base, series.sum))
            samples.append(Sample("_count", base, running))
        return Family(self.name, self.kind, self.help, samples)


Collector = Callable[[], Iterable[Family]]


class Registry:
    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._collectors: list[Collector] = []

    def _add(self, metric: _Metric) -> None:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} registered twice")
        self._metrics[metric.name] = metric

    def counter(self, name: str, help_text: str, labels: Sequence[str] = ()) -> Counter:
        metric = Counter(name, help_text, labels)
        self._add(metric)
        return metric

    def gauge(self, name: str, help_text: str, labels: Sequence[str] = ()) -> Gauge:
        metric = Gauge(name, help_text, labels)
        self._add(metric)
        return metric

    def histogram(
        self,
        name: str,
        help_text: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> Histogram:
        metric = Histogram(name, help_text, labels, buckets)
        self._add(metric)
        return metric

    def collector(self, collect: Collector) -> None:
        """``collect()`` is called at every scrape and returns whole families."""
        self._collectors.append(collect)

    def families(self) -> list[Family]:
        out = [m.family() for m in self._metrics.values()]
        for collect in self._collectors:
            out.extend(collect())
        return out

    def render(self) -> str:
        lines: list[str] = []
        seen: set[str] = set()
        for family in self.families():
            if family.name in seen:
                raise ValueError(f"metric family {family.name} produced twice")
            seen.add(family.name)
            family.render(lines)
        lines.append("")
        return "\n".join(lines)


def gauge_family(
    name: str,
    help_text: str,
    rows: Iterable[tuple[dict[str, str], float]],
    *,
    kind: str = "gauge",
) -> Family:
    """A family from ``(labels, value)`` rows, for collectors. ``kind``
    ``counter`` names the samples ``NAME_total`` (``name`` without it)."""
    assert kind in TYPES
    suffix = "_total" if kind == "counter" else ""
    base = name.removesuffix("_total") if kind == "counter" else name
    _check(base, ())
    samples = [Sample(suffix, tuple(labels.items()), float(value)) for labels, value in rows]
    return Family(base, kind, help_text, samples)

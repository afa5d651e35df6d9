"""Metrics: typed counters, gauges and histograms with unit-bearing names, read through snapshots.

Theory of operation
-------------------
Every node (a broker, a peer, a simulated peer) owns one `Metrics` set. Each metric is declared
once, with a name that says its unit (`segments_received_total`, `bytes_served_total`,
`request_seconds`, `peers_live`) and a help text, and optional label names (`source`). Only the
thread that owns the node's sockets updates its metrics, so updates take no lock; other threads
read them through `snapshot()`, which the owner takes (the API reaches it with `call()`), or
through a snapshot the owner published. A snapshot is plain data: {name: {labels: value}}, with
histograms as `HistogramValue`. The stats ops, the CLI, the benchmarks and the Prometheus
exposition all read the same snapshot, so a figure means the same thing everywhere.

Names follow Prometheus conventions (snake case, a unit suffix, `_total` for counters) so that
they can be exposed as they are.
"""

from __future__ import annotations

import bisect
import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

Labels = tuple[str, ...]
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
# A name must say what it counts or measures: its last word is a unit, or `_total` for counters.
_UNITS = ("total", "bytes", "seconds", "segments", "ratio", "peers", "files", "requests", "info",
          "connections", "messages", "bps", "downloads", "count")  # fmt: skip

DEFAULT_SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _check_name(name: str, counter: bool) -> None:
    if not _NAME.fullmatch(name):
        raise ValueError(f"metric name {name!r} is not snake case")
    if counter and not name.endswith("_total"):
        raise ValueError(f"counter {name!r} must end in _total")
    if name.rsplit("_", 1)[-1] not in _UNITS:
        raise ValueError(f"metric name {name!r} does not end in a unit ({', '.join(_UNITS)})")


class Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        _check_name(name, self.kind == "counter")
        self.name, self.help, self.label_names = name, help, tuple(labels)

    def _key(self, values: Sequence[str]) -> Labels:
        if len(values) != len(self.label_names):
            raise ValueError(f"{self.name}: expected labels {self.label_names}, got {tuple(values)}")
        return tuple(values)

    def values(self) -> dict[Labels, Any]:
        raise NotImplementedError


class Counter(Metric):
    """A count that only grows (messages, segments, bytes)."""

    kind = "counter"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help, labels)
        self._values: dict[Labels, float] = {}
        if not labels:
            self._values[()] = 0

    def inc(self, amount: float = 1, labels: Sequence[str] = ()) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter cannot go down")
        key = tuple(labels) if labels else ()
        self._values[key] = self._values.get(key, 0) + amount

    def get(self, labels: Sequence[str] = ()) -> float:
        return self._values.get(tuple(labels), 0)

    def values(self) -> dict[Labels, Any]:
        return dict(self._values)


class Gauge(Metric):
    """A value that goes up and down (live peers, downloads running, bytes in flight)."""

    kind = "gauge"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help, labels)
        self._values: dict[Labels, float] = {}
        if not labels:
            self._values[()] = 0

    def set(self, value: float, labels: Sequence[str] = ()) -> None:
        self._values[tuple(labels)] = value

    def inc(self, amount: float = 1, labels: Sequence[str] = ()) -> None:
        key = tuple(labels)
        self._values[key] = self._values.get(key, 0) + amount

    def get(self, labels: Sequence[str] = ()) -> float:
        return self._values.get(tuple(labels), 0)

    def clear(self) -> None:
        """Forget every labelled value (e.g. per-source gauges of a download that ended)."""
        self._values = {} if self.label_names else {(): 0}

    def values(self) -> dict[Labels, Any]:
        return dict(self._values)


@dataclass(frozen=True, slots=True)
class HistogramValue:
    buckets: tuple[float, ...]  # upper bounds; +Inf is implied
    counts: tuple[int, ...]  # per bucket (not cumulative); len(buckets) + 1
    sum: float
    count: int

    def quantile(self, q: float) -> float:
        """An estimate: the upper bound of the bucket holding the q-quantile (inf past the last)."""
        if not self.count:
            return 0.0
        rank, seen = q * self.count, 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts, strict=True):
            seen += n
            if seen >= rank:
                return bound
        return float("inf")


class Histogram(Metric):
    """A distribution (reply times, plan times): counts per bucket, sum and count."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        help: str,
        buckets: Iterable[float] = DEFAULT_SECONDS_BUCKETS,
        labels: Sequence[str] = (),
    ) -> None:
        super().__init__(name, help, labels)
        self.buckets = tuple(sorted(buckets))
        self._counts: dict[Labels, list[int]] = {}
        self._sums: dict[Labels, float] = {}

    def observe(self, value: float, labels: Sequence[str] = ()) -> None:
        key = tuple(labels)
        counts = self._counts.get(key)
        if counts is None:
            counts = self._counts[key] = [0] * (len(self.buckets) + 1)
            self._sums[key] = 0.0
        counts[bisect.bisect_left(self.buckets, value)] += 1
        self._sums[key] += value

    def values(self) -> dict[Labels, Any]:
        return {
            key: HistogramValue(self.buckets, tuple(counts), self._sums[key], sum(counts))
            for key, counts in self._counts.items()
        }


class Metrics:
    """The metric set of one node. Declare each metric once; update from the owning thread."""

    def __init__(self, namespace: str = "zswarm") -> None:
        self.namespace = namespace
        self._metrics: dict[str, Metric] = {}

    def _add(self, metric: Metric) -> Any:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} declared twice")
        self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help: str, labels: Sequence[str] = ()) -> Counter:
        result: Counter = self._add(Counter(name, help, labels))
        return result

    def gauge(self, name: str, help: str, labels: Sequence[str] = ()) -> Gauge:
        result: Gauge = self._add(Gauge(name, help, labels))
        return result

    def histogram(
        self,
        name: str,
        help: str,
        buckets: Iterable[float] = DEFAULT_SECONDS_BUCKETS,
        labels: Sequence[str] = (),
    ) -> Histogram:
        result: Histogram = self._add(Histogram(name, help, buckets, labels))
        return result

    def __iter__(self) -> Any:
        return iter(self._metrics.values())

    def snapshot(self) -> Snapshot:
        """A copy of every value: safe to hand to another thread."""
        return Snapshot(
            {m.name: m.values() for m in self._metrics.values()},
            {m.name: (m.kind, m.help, m.label_names) for m in self._metrics.values()},
        )


class Snapshot:
    """Metric values at one moment, plain data. `flat()` gives a JSON-friendly map."""

    def __init__(
        self,
        values: dict[str, dict[Labels, Any]],
        meta: dict[str, tuple[str, str, Labels]],
    ) -> None:
        self.values = values
        self.meta = meta

    def get(self, name: str, labels: Sequence[str] = ()) -> Any:
        return self.values.get(name, {}).get(tuple(labels), 0)

    def total(self, name: str) -> float:
        """The sum over every label set of a counter or gauge."""
        return float(sum(v for v in self.values.get(name, {}).values() if isinstance(v, int | float)))

    def flat(self) -> dict[str, Any]:
        """{name: value} for unlabelled metrics, {name: {"a,b": value}} for labelled ones;
        histograms as {count, sum, p50, p99}."""
        out: dict[str, Any] = {}
        for name, by_labels in self.values.items():
            labelled = bool(self.meta[name][2])

            def plain(value: Any) -> Any:
                if isinstance(value, HistogramValue):
                    return {
                        "count": value.count,
                        "sum": round(value.sum, 6),
                        "p50": value.quantile(0.5),
                        "p99": value.quantile(0.99),
                    }
                return value

            if labelled:
                out[name] = {",".join(k): plain(v) for k, v in by_labels.items()}
            else:
                out[name] = plain(by_labels.get((), 0))
        return out


class PeakRate:
    """The highest rate of a growing total between consecutive samples, over a recent window:
    fed (now, total) at each heartbeat, it tells what an uplink managed at its busiest moment
    lately (a peer's own figure of its upload capacity, as seen when it was loaded)."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._samples: list[tuple[float, float]] = []

    def sample(self, now: float, total: float) -> float:
        samples = self._samples
        samples.append((now, total))
        while samples and now - samples[0][0] > self.window_s:
            samples.pop(0)
        best = 0.0
        for (t0, v0), (t1, v1) in itertools.pairwise(samples):
            if t1 > t0:
                best = max(best, (v1 - v0) / (t1 - t0))
        return best

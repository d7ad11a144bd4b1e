"""Figures, the issue's targets, the printed table and the JSON written for comparisons."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of unsorted samples; NaN when there are none."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Figure:
    """One measured thing: throughput (median of its rounds) and latency percentiles (of all
    samples of all rounds, in milliseconds)."""

    name: str
    unit: str = "ops/s"
    rate: float = math.nan
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    samples: int = 0
    cpu_us: float = math.nan  # broker CPU time per call, all threads
    rounds: list[float] = field(default_factory=list)
    ratio: float = math.nan  # rate / the reference's rate
    reference: str = ""
    target: str = ""
    verdict: str = ""  # PASS, MISS or "" (no target)
    note: str = ""

    @classmethod
    def measured(
        cls, name: str, rounds: Sequence[float], latencies: Sequence[float], unit: str = "ops/s"
    ) -> Figure:
        return cls(
            name=name,
            unit=unit,
            rate=statistics.median(rounds) if rounds else math.nan,
            p50_ms=percentile(latencies, 50) * 1e3,
            p99_ms=percentile(latencies, 99) * 1e3,
            samples=len(latencies),
            rounds=list(rounds),
        )

    def against(self, reference: Figure) -> Figure:
        self.ratio = self.rate / reference.rate if reference.rate else math.nan
        self.reference = reference.name
        return self

    def judge(self, target: str, met: bool) -> Figure:
        self.target = target
        self.verdict = "PASS" if met else "MISS"
        return self


def shortfall(measured: float, target: float) -> str:
    """How far `measured` is from a floor `target` ("needs 1.6× more"), or "met"."""
    if math.isnan(measured) or math.isnan(target):
        return "not measured"
    if measured >= target:
        return f"met ({measured:.2f}× against {target:.2f}×)"
    return f"missed: needs {target / measured:.2f}× more ({measured:.2f}× against {target:.2f}×)"


def excess(measured: float, ceiling: float) -> str:
    """How far `measured` is above a ceiling ("needs 2.3× less"), or "met"."""
    if math.isnan(measured) or math.isnan(ceiling):
        return "not measured"
    if measured <= ceiling:
        return f"met ({measured:.2f}× against at most {ceiling:.2f}×)"
    return f"missed: needs {measured / ceiling:.2f}× less ({measured:.2f}× against {ceiling:.2f}×)"


def _num(value: float, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:,.{digits}f}"


def table(figures: Sequence[Figure], header: Sequence[str]) -> str:
    rows = [("figure", "rate", "unit", "p50 ms", "p99 ms", "cpu µs", "ratio", "target", "result")]
    for f in figures:
        rows.append(
            (
                f.name,
                _num(f.rate),
                f.unit,
                _num(f.p50_ms, 2),
                _num(f.p99_ms, 2),
                _num(f.cpu_us),
                _num(f.ratio, 2) + ("×" if not math.isnan(f.ratio) else ""),
                f.target,
                f.verdict,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = {1, 3, 4, 5, 6}
    lines = list(header)
    for n, row in enumerate(rows):
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    notes = [f"  {f.name}: {f.note}" for f in figures if f.note]
    if notes:
        lines += ["", "notes:", *notes]
    return "\n".join(lines)


def write_json(path: Path, figures: Sequence[Figure], meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"meta": meta, "figures": [_clean(asdict(f)) for f in figures]}
    path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")


def _clean(value: Any) -> Any:
    """NaN is not JSON: write null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value

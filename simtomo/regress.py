"""Regression checks of alignment accuracy against a committed baseline.

A baseline is a JSON file (``simtomo.baseline/1``) holding, per (aligner,
setting), the median over seeds of chosen metrics of a results table, and per
metric the direction that is better and the tolerated worsening::

    {
      "format": "simtomo.baseline/1",
      "experiment": "quickstart",
      "code_version": "0.1.0+src.0123456789ab",
      "seeds": [0, 1, 2],
      "metrics": {
        "alignment_error_rms_px": {"better": "lower", "rel_tol": 0.25, "abs_tol": 0.02},
        "resolution_A": {"better": "lower", "rel_tol": 0.05, "abs_tol": 1.0},
        "ok_fraction": {"better": "higher", "rel_tol": 0.0, "abs_tol": 0.0}
      },
      "entries": [
        {"aligner": "fiducial", "setting": "base", "n": 3,
         "values": {"alignment_error_rms_px": 0.21, "resolution_A": 31.5, "ok_fraction": 1.0}}
      ]
    }

``ok_fraction`` is the fraction of the cells that did not fail; every other
metric is the median over the cells that succeeded. A value may be ``null``
(not measured: no comparison) or the string ``"inf"`` (e.g. a resolution
where nothing was resolved). The tolerance of a metric is
``max(abs_tol, rel_tol * |baseline|)``: a value worse than the baseline by
more than that is a regression, better by more than that an improvement
(reported, passes). A baseline entry missing from the results is a
regression too (nothing can vouch for it); results without a baseline entry
are reported as new. Edit the tolerances in the file as the noise of each
metric requires; results of a fixed code version are deterministic, so the
tolerances bound how much worse a code change may make them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from simtomo.errors import ConfigError, FileFormatError
from simtomo.io._json import load_json, write_text_atomic
from simtomo.runner import load_results

__all__ = [
    "BASELINE_FORMAT",
    "DEFAULT_METRICS",
    "Metric",
    "Comparison",
    "RegressionReport",
    "make_baseline",
    "write_baseline",
    "read_baseline",
    "compare",
    "compare_with_baseline",
]

BASELINE_FORMAT = "simtomo.baseline/1"


@dataclass(frozen=True)
class Metric:
    """How one metric is compared: which direction is better and how much worse is tolerated."""

    better: str = "lower"
    rel_tol: float = 0.0
    abs_tol: float = 0.0

    def tolerance(self, baseline: float) -> float:
        return max(self.abs_tol, self.rel_tol * abs(baseline)) if math.isfinite(baseline) else 0.0


#: Metrics written into a new baseline (those present in the results).
DEFAULT_METRICS: dict[str, Metric] = {
    "alignment_error_rms_px": Metric("lower", rel_tol=0.25, abs_tol=0.02),
    "resolution_A": Metric("lower", rel_tol=0.05, abs_tol=1.0),
    "ok_fraction": Metric("higher", rel_tol=0.0, abs_tol=0.0),
}


@dataclass(frozen=True)
class Comparison:
    """One metric of one (aligner, setting): ``status`` is regressed | improved | within | missing | new | n/a."""

    metric: str
    aligner: str
    setting: str
    baseline: float
    now: float
    tolerance: float
    status: str

    def format(self) -> str:
        return (
            f"{self.status.upper():<10} {self.metric}  aligner={self.aligner}  setting={self.setting}  "
            f"baseline={_show(self.baseline)}  now={_show(self.now)}  tolerance={_show(self.tolerance)}"
        )


@dataclass(frozen=True)
class RegressionReport:
    """Every comparison of a results table with a baseline."""

    comparisons: tuple[Comparison, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def regressions(self) -> list[Comparison]:
        return [c for c in self.comparisons if c.status in ("regressed", "missing")]

    @property
    def improvements(self) -> list[Comparison]:
        return [c for c in self.comparisons if c.status == "improved"]

    def format(self) -> str:
        """Regressions first, then improvements and new entries, then a one-line summary."""
        lines = [*self.notes]
        lines += [c.format() for c in self.regressions]
        lines += [c.format() for c in self.improvements]
        lines += [c.format() for c in self.comparisons if c.status == "new"]
        counts = {s: sum(c.status == s for c in self.comparisons) for s in ("regressed", "missing", "improved", "within", "new", "n/a")}
        verdict = "FAIL" if self.regressions else "PASS"
        lines.append(
            f"{verdict}: {counts['regressed']} regressed, {counts['missing']} missing, {counts['improved']} improved, "
            f"{counts['within']} within tolerance, {counts['new']} new, {counts['n/a']} not comparable"
        )
        return "\n".join(lines)


def _show(v: float) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"


def _encode(v: float) -> Any:
    if v is None or math.isnan(v):
        return None
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return float(v)


def _decode(v: Any, where: str) -> float:
    if v is None:
        return math.nan
    if v in ("inf", "-inf"):
        return float(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise FileFormatError(f"{where}: expected a number, null or \"inf\", got {v!r}")
    return float(v)


def _medians(df, metrics: dict[str, Metric]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (aligner, setting): the number of cells and each metric's value."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    if df.empty:
        return out
    ordered = df.sort_values(["aligner_order", "setting_index"], kind="stable")
    for (aligner, setting), rows in ordered.groupby(["aligner", "setting"], sort=False):
        ok = rows[rows["status"] == "ok"]
        values: dict[str, float] = {}
        for name in metrics:
            if name == "ok_fraction":
                values[name] = len(ok) / len(rows)
            elif name in rows.columns:
                v = np.asarray(ok[name], dtype=float)
                v = v[~np.isnan(v)]
                values[name] = float(np.median(v)) if v.size else math.nan
            else:
                values[name] = math.nan
        out[(str(aligner), str(setting))] = {"n": int(len(rows)), "values": values}
    return out


def make_baseline(df, *, experiment: str = "", code_version: str = "", metrics: dict[str, Metric] | None = None) -> dict[str, Any]:
    """A baseline document from a results table (the metrics of ``metrics`` that the table has)."""
    metrics = dict(DEFAULT_METRICS if metrics is None else metrics)
    # a metric is kept when the table measured it somewhere (inf counts: a resolution where nothing resolved)
    metrics = {m: spec for m, spec in metrics.items() if m == "ok_fraction" or (m in df.columns and (~np.isnan(np.asarray(df[m], dtype=float))).any())}
    entries = [
        {"aligner": a, "setting": s, "n": v["n"], "values": {m: _encode(x) for m, x in v["values"].items()}}
        for (a, s), v in _medians(df, metrics).items()
    ]
    return {
        "format": BASELINE_FORMAT,
        "experiment": experiment,
        "code_version": code_version,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seeds": sorted(int(s) for s in set(df["seed"])) if "seed" in df.columns else [],
        "metrics": {m: {"better": s.better, "rel_tol": s.rel_tol, "abs_tol": s.abs_tol} for m, s in metrics.items()},
        "entries": entries,
    }


def write_baseline(out_dir: str | Path, path: str | Path) -> Path:
    """Write the baseline of the results in ``out_dir`` to ``path`` (JSON); returns the path."""
    from simtomo.runner import load_run_info

    df = load_results(out_dir)
    info = load_run_info(out_dir)
    document = make_baseline(df, experiment=info["experiment"].get("name", ""), code_version=info.get("code_version", ""))
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(target, json.dumps(document, indent=1, allow_nan=False) + "\n")
    return target


def read_baseline(path: str | Path) -> dict[str, Any]:
    """Read and check a baseline file; every problem a FileFormatError naming the file and key."""
    name = str(path)
    data = load_json(name)
    if not isinstance(data, dict) or data.get("format") != BASELINE_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise FileFormatError(f"{name}: key 'format': found {found!r}, expected {BASELINE_FORMAT!r}")
    for key in ("metrics", "entries"):
        if key not in data:
            raise FileFormatError(f"{name}: missing key {key!r}")
    if not isinstance(data["metrics"], dict):
        raise FileFormatError(f"{name}: key 'metrics': expected an object of metric -> {{better, rel_tol, abs_tol}}")
    metrics: dict[str, Metric] = {}
    for m, spec in data["metrics"].items():
        where = f"{name}: metrics.{m}"
        if not isinstance(spec, dict) or spec.get("better") not in ("lower", "higher"):
            raise FileFormatError(f"{where}.better: expected \"lower\" or \"higher\"")
        tols = {}
        for t in ("rel_tol", "abs_tol"):
            v = spec.get(t, 0.0)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise FileFormatError(f"{where}.{t}: expected a number >= 0, got {v!r}")
            tols[t] = float(v)
        metrics[m] = Metric(spec["better"], **tols)
    if not isinstance(data["entries"], list):
        raise FileFormatError(f"{name}: key 'entries': expected a list")
    entries = []
    for i, e in enumerate(data["entries"]):
        where = f"{name}: entries[{i}]"
        if not isinstance(e, dict) or not isinstance(e.get("aligner"), str) or not isinstance(e.get("setting"), str):
            raise FileFormatError(f"{where}: expected an object with 'aligner' and 'setting' strings and 'values'")
        values = e.get("values")
        if not isinstance(values, dict):
            raise FileFormatError(f"{where}.values: expected an object of metric -> value")
        entries.append(
            {"aligner": e["aligner"], "setting": e["setting"], "values": {m: _decode(v, f"{where}.values.{m}") for m, v in values.items()}}
        )
    return {**data, "metrics": metrics, "entries": entries}


def compare(df, baseline: dict[str, Any]) -> RegressionReport:
    """Compare a results table with a baseline read by :func:`read_baseline`."""
    metrics: dict[str, Metric] = baseline["metrics"]
    now = _medians(df, metrics)
    notes = []
    seeds = baseline.get("seeds")
    if seeds and "seed" in df.columns and sorted(int(s) for s in set(df["seed"])) != sorted(seeds):
        notes.append(f"note: the baseline has seeds {seeds}, the results {sorted(int(s) for s in set(df['seed']))}")
    out: list[Comparison] = []
    seen = set()
    for entry in baseline["entries"]:
        key = (entry["aligner"], entry["setting"])
        seen.add(key)
        for metric, spec in metrics.items():
            base = entry["values"].get(metric, math.nan)
            tol = spec.tolerance(base)
            if key not in now:
                out.append(Comparison(metric, *key, base, math.nan, tol, "missing"))
                continue
            value = now[key]["values"].get(metric, math.nan)
            if math.isnan(base):
                status = "n/a"
            elif math.isnan(value):
                status = "regressed"  # it was measured and now is not: the cells failed
            else:
                sign = 1.0 if spec.better == "lower" else -1.0
                if base == value:
                    status = "within"
                else:
                    worse = sign * (value - base)  # > 0: worse; inf - inf is handled by the equality above
                    status = "regressed" if worse > tol else "improved" if -worse > tol else "within"
            out.append(Comparison(metric, *key, base, value, tol, status))
    for key, v in now.items():
        if key not in seen:
            for metric in metrics:
                out.append(Comparison(metric, *key, math.nan, v["values"].get(metric, math.nan), math.nan, "new"))
    return RegressionReport(tuple(out), tuple(notes))


def compare_with_baseline(out_dir: str | Path, baseline_path: str | Path) -> RegressionReport:
    """``simtomo regress DIR --baseline FILE``: compare DIR's results with the baseline file."""
    if not Path(baseline_path).exists():
        raise ConfigError(f"{baseline_path}: no such baseline file; write one with --write-baseline")
    baseline = read_baseline(baseline_path)
    return compare(load_results(out_dir), baseline)

"""The report of an experiment run: ``DIR/report.md`` with figures (PNG and SVG) and tables.

:func:`write_report` reads ``DIR/results.parquet`` and ``DIR/run.json`` (as
written by :func:`simtomo.runner.run_experiment`) and writes:

- alignment error (and resolution) against each swept parameter, per aligner,
  median over seeds with the min-max spread;
- the aligner's own residual against its true alignment error, with y = x
  (a small residual with a large error is overfitting);
- resolution against alignment error, with the true-geometry resolution and the
  theory curve (:func:`predicted_resolution_A`);
- per-view alignment error against tilt angle, per aligner, median over seeds;
- runtime and peak memory per aligner;
- summary tables: median and spread per aligner and setting, and the failures.

Figures use :class:`matplotlib.figure.Figure` directly (no pyplot state).

Theory of the resolution curve
------------------------------
A random per-view misregistration of standard deviation ``sigma`` per axis
multiplies the Fourier components of the reconstruction by the coherent
transfer ``T(k) = exp(-2 pi^2 sigma^2 k^2)`` (DESIGN.md section 5) while, to
first order, leaving the power in each shell unchanged (each displaced view
keeps its power; at high frequency the central sections of different views do
not overlap, at low frequency the phase errors are small). The FSC against the
phantom is a normalised cross term, so it scales by the same factor:
``FSC_est(k) ~ T(k) FSC_true(k)``. With the alignment error ``e`` a 2-D RMS,
``sigma = e / sqrt(2)`` and ``T(k) = exp(-pi^2 e^2 k^2)``. The predicted
resolution at error ``e`` is where ``exp(-pi^2 e^2 k^2) FSC_true(k)`` falls
below 0.5, with ``FSC_true`` the measured true-geometry FSC of the same setting
(median over seeds), evaluated by the same crossing rule as the measurement
(:func:`simtomo.resolution.resolution_A`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter, NullLocator
from matplotlib.transforms import blended_transform_factory

from simtomo.config import SimulationConfig
from simtomo.io._json import write_text_atomic
from simtomo.runner import load_results, load_run_info

__all__ = [
    "write_report",
    "predicted_resolution_A",
    "error_vs_parameter_figure",
    "error_by_aligner_figure",
    "residual_vs_error_figure",
    "resolution_vs_error_figure",
    "per_view_error_figure",
    "runtime_figure",
    "summary_table",
    "failure_table",
    "save_figure",
]

log = logging.getLogger(__name__)

_MAX_PANELS = 6
_MAX_LINES = 8


# --------------------------------------------------------------------------- helpers


def save_figure(fig: Figure, stem: Path) -> list[Path]:
    """Write ``stem.png`` and ``stem.svg``; returns the paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in ("png", "svg"):
        path = stem.with_suffix("." + fmt)
        # no date in the SVG: the same results give the same file
        fig.savefig(path, dpi=130, bbox_inches="tight", metadata={"Date": None} if fmt == "svg" else None)
        paths.append(path)
    return paths


def _colors(labels: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {label: cmap(i % 10) for i, label in enumerate(labels)}


def _aligner_order(df) -> list[str]:
    if df.empty:
        return []
    order = df.sort_values("aligner_order", kind="stable")["aligner"]
    return list(dict.fromkeys(order))


def _finite(values) -> np.ndarray:
    a = np.asarray(values, dtype=float)
    return a[np.isfinite(a)]


def _has(df, column: str) -> bool:
    return column in df.columns and np.isfinite(np.asarray(df[column], dtype=float)).any()


def _ok(df):
    return df[df["status"] == "ok"] if "status" in df.columns else df


def _numeric(values: Sequence[Any]) -> bool:
    return all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)) for v in values)


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if math.isnan(f):
        return "–"
    if math.isinf(f):
        return "∞" if f > 0 else "-∞"
    if 1e3 <= abs(f) < 1e7:
        return f"{f:.0f}"  # 2003, not 2e+03
    return f"{f:.{digits}g}"


def _spread(values) -> str:
    a = np.asarray(values, dtype=float)
    a = a[~np.isnan(a)]
    if a.size == 0:
        return "–"
    med = float(np.median(a))
    if a.size == 1:
        return _fmt(med)
    return f"{_fmt(med)} [{_fmt(a.min())}–{_fmt(a.max())}]"


def _log_scale_ok(values, ratio: float = 20.0) -> bool:
    a = _finite(values)
    return a.size > 1 and bool(np.all(a > 0)) and a.max() / a.min() >= ratio


def _log_axis(ax, which: str, values) -> None:
    """A log axis labelled with plain numbers (0.5, 2, 10), minor ticks labelled at 2 and 5 only when it spans under two decades."""
    v = _finite(values)
    v = v[v > 0]
    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    axis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    narrow = v.size and np.log10(v.max() / v.min()) < 2
    if narrow:
        def minor(x, _):
            mantissa = round(x / 10 ** math.floor(math.log10(x) + 1e-9), 6)
            return f"{x:g}" if mantissa in (2.0, 5.0) else ""

        axis.set_minor_formatter(FuncFormatter(minor))
    else:
        axis.set_minor_formatter(NullFormatter())


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _unit(path: str) -> str:
    """The unit of a ``section.field`` parameter from the config's field metadata."""
    section, _, name = path.partition(".")
    sec = getattr(SimulationConfig(), section, None)
    if sec is None:
        return ""
    for f in dataclasses.fields(sec):
        if f.name == name:
            return f.metadata.get("unit", "")
    return ""


def _axis_label(path: str) -> str:
    unit = "px" if path.endswith("_px") else _unit(path)
    return f"{path} ({unit})" if unit else path


_METRICS = {
    "alignment_error_rms_px": "alignment error, RMS (px)",
    "resolution_A": "resolution, FSC 0.5 vs phantom (Å)",
}


# --------------------------------------------------------------------------- figures


def error_vs_parameter_figure(df, column: str, *, group: str = "aligner", title: str = "") -> Figure | None:
    """Median (min-max over seeds) of the alignment error, and of the resolution when measured, against ``column``.

    One line per value of ``group`` (the aligner label, or the aligner entry
    for a swept aligner parameter); settings that differ in other swept
    parameters are pooled. A cross at the bottom marks a value where every
    cell of that aligner failed.
    """
    if column not in df.columns or df.empty:
        return None
    data = df[df[column].notna()] if df[column].dtype != object else df[[v is not None for v in df[column]]]
    if data.empty:
        return None
    xs = list(dict.fromkeys(data[column].map(lambda v: tuple(v) if isinstance(v, (list, np.ndarray)) else v)))
    numeric = _numeric(xs)
    if numeric:
        xs = sorted(xs)
    position = {x: (float(x) if numeric else i) for i, x in enumerate(xs)}
    metrics = [m for m in _METRICS if _has(_ok(data), m)]
    if not metrics:
        return None
    fig = Figure(figsize=(6.8, 3.6 * len(metrics)))
    axes = fig.subplots(len(metrics), 1, squeeze=False)[:, 0]
    groups = list(dict.fromkeys(data.sort_values("aligner_order", kind="stable")[group]))
    colors = _colors(groups)
    failed_label_done = unresolved_label_done = False
    for ax, metric in zip(axes, metrics):
        for g in groups:
            sub = data[data[group] == g]
            px, med, lo, hi, dead, unresolved = [], [], [], [], [], []
            for x in xs:
                at = sub[[(tuple(v) if isinstance(v, (list, np.ndarray)) else v) == x for v in sub[column]]]
                if at.empty:
                    continue
                values = np.asarray(_ok(at)[metric], dtype=float)
                if np.isposinf(values).any():
                    unresolved.append(position[x])
                ok = values[np.isfinite(values)]
                if ok.size == 0:
                    if (at["status"] != "ok").any():
                        dead.append(position[x])
                    continue
                px.append(position[x])
                med.append(np.median(ok))
                lo.append(np.median(ok) - ok.min())
                hi.append(ok.max() - np.median(ok))
            if px:
                ax.errorbar(px, med, yerr=[lo, hi], fmt="o-", ms=4, capsize=3, color=colors[g], label=g)
            if dead:
                trans = blended_transform_factory(ax.transData, ax.transAxes)
                ax.plot(
                    dead,
                    [0.03] * len(dead),
                    "x",
                    ms=9,
                    mew=2,
                    color=colors[g],
                    transform=trans,
                    clip_on=False,
                    label=None if failed_label_done else "all seeds failed",
                )
                failed_label_done = True
            if unresolved:
                trans = blended_transform_factory(ax.transData, ax.transAxes)
                ax.plot(
                    unresolved,
                    [0.97] * len(unresolved),
                    "^",
                    ms=8,
                    color=colors[g],
                    transform=trans,
                    clip_on=False,
                    label=None if unresolved_label_done else "some seeds not resolved (∞)",
                )
                unresolved_label_done = True
        ax.set_ylabel(_METRICS[metric])
        vals = _finite(_ok(data)[metric])
        if _log_scale_ok(vals, ratio=8.0):
            _log_axis(ax, "y", vals)
        # sweeps are often doublings (dose 30..240, sigma 0.25..4): a log axis spaces them evenly
        if numeric and _log_scale_ok([position[x] for x in xs], ratio=8.0):
            _log_axis(ax, "x", [position[x] for x in xs])
            ax.set_xticks([position[x] for x in xs], [f"{x:g}" for x in xs])
            ax.xaxis.set_minor_locator(NullLocator())
        elif not numeric:
            ax.set_xticks(list(position.values()), [str(x) for x in xs])
        ax.grid(True, alpha=0.3)
        ax.legend(frameon=False, fontsize="small")
    axes[-1].set_xlabel(_axis_label(column.removeprefix("aligner.")))
    what = f"aligner parameter {column.removeprefix('aligner.')}" if column.startswith("aligner.") else column
    axes[0].set_title(title or f"{_METRICS[metrics[0]].split(',')[0].capitalize()} against {what}\n(median and min–max over seeds)")
    fig.tight_layout()
    return fig


def error_by_aligner_figure(df) -> Figure | None:
    """Alignment error of each aligner: one point per seed (and setting), the median as a bar."""
    ok = _ok(df)
    if not _has(ok, "alignment_error_rms_px"):
        return None
    labels = _aligner_order(df)
    colors = _colors(labels)
    fig = Figure(figsize=(6.8, 0.5 * len(labels) + 1.8))
    ax = fig.add_subplot()
    rng = np.random.default_rng(0)  # fixed jitter: the same table gives the same figure
    for i, label in enumerate(labels):
        v = _finite(ok[ok["aligner"] == label]["alignment_error_rms_px"])
        n_failed = int((df[df["aligner"] == label]["status"] != "ok").sum())
        if v.size:
            ax.plot(v, i + rng.uniform(-0.15, 0.15, v.size), "o", color=colors[label], alpha=0.8)
            ax.plot([np.median(v)] * 2, [i - 0.3, i + 0.3], "-", color="k", lw=2)
        if n_failed:
            ax.annotate(f"{n_failed} failed", (1.0, i), xycoords=("axes fraction", "data"), xytext=(4, 0),
                        textcoords="offset points", va="center", fontsize="small", color="firebrick")
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    if _log_scale_ok(ok["alignment_error_rms_px"]):
        _log_axis(ax, "x", ok["alignment_error_rms_px"])
    ax.set_xlabel("alignment error, RMS (px)")
    ax.set_title("Alignment error per aligner (dots: seeds; bar: median)")
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def residual_vs_error_figure(df) -> Figure | None:
    """Each aligner's own residual against its true alignment error, with the line y = x.

    Points far below the line are alignments that fit their own measurements
    better than they match the truth: overfitting, or a wrong model.
    """
    ok = _ok(df)
    if not (_has(ok, "residual_rms_px") and _has(ok, "alignment_error_rms_px")):
        return None
    data = ok[np.isfinite(ok["residual_rms_px"].astype(float)) & np.isfinite(ok["alignment_error_rms_px"].astype(float))]
    data = data[(data["residual_rms_px"] > 0) & (data["alignment_error_rms_px"] > 0)]
    if data.empty:
        return None
    labels = _aligner_order(data)
    colors = _colors(_aligner_order(df))
    fig = Figure(figsize=(5.8, 5.2))
    ax = fig.add_subplot()
    for label in labels:
        sub = data[data["aligner"] == label]
        ax.plot(sub["alignment_error_rms_px"], sub["residual_rms_px"], "o", color=colors[label], alpha=0.8, label=label)
    both = np.concatenate([_finite(data["alignment_error_rms_px"]), _finite(data["residual_rms_px"])])
    lo, hi = both.min() / 1.5, both.max() * 1.5
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="residual = error")
    _log_axis(ax, "x", [lo, hi])
    _log_axis(ax, "y", [lo, hi])
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("true alignment error, RMS (px)")
    ax.set_ylabel("aligner's own residual, RMS (px)")
    ax.set_title("Residual against true error\n(below the line: the aligner thinks it did better than it did)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(frameon=False, fontsize="small")
    fig.tight_layout()
    return fig


def predicted_resolution_A(
    error_rms_px,
    frequency_per_px,
    fsc_true,
    n_voxels,
    nyquist_per_px: float,
    pixel_size_A: float,
) -> np.ndarray:
    """Resolution predicted for alignment errors ``error_rms_px`` from a true-geometry FSC.

    The period (Å) where ``exp(-pi^2 e^2 k^2) * FSC_true(k)`` falls below 0.5
    (see the module docstring), found by :func:`simtomo.resolution.resolution_A`.

    Parameters
    ----------
    error_rms_px : float or array
        Alignment errors (2-D RMS, px).
    frequency_per_px, fsc_true, n_voxels : arrays
        The true-geometry FSC curve (shell centres in 1/px, values, samples per shell).
    nyquist_per_px : float
        Nyquist frequency of the reconstruction, 1/px.
    pixel_size_A : float
    """
    from simtomo.resolution import ShellCurve, resolution_A

    k = np.asarray(frequency_per_px, dtype=float)
    f = np.asarray(fsc_true, dtype=float)
    n = np.asarray(n_voxels)
    errors = np.atleast_1d(np.asarray(error_rms_px, dtype=float))
    out = np.empty(errors.shape)
    for i, e in enumerate(errors):
        curve = ShellCurve(k, np.exp(-(math.pi**2) * e**2 * k**2) * f, n, nyquist_per_px)
        out[i] = resolution_A(curve, pixel_size_A)
    return out


def _median_curve(rows, column: str) -> np.ndarray | None:
    curves = [np.asarray(v, dtype=float) for v in rows[column] if v is not None and len(v)]
    if not curves or len({c.size for c in curves}) != 1:
        return None
    with np.errstate(all="ignore"):
        return np.nanmedian(np.vstack(curves), axis=0) if len(curves) > 1 else curves[0]


def _theory(rows, errors: np.ndarray) -> np.ndarray | None:
    needed = ("fsc_frequency_per_px", "fsc_true_geometry_values", "fsc_n_voxels", "fsc_nyquist_per_px", "detector.pixel_size_A")
    if rows.empty or any(c not in rows.columns for c in needed):
        return None
    k = _median_curve(rows, "fsc_frequency_per_px")
    f = _median_curve(rows, "fsc_true_geometry_values")
    n = _median_curve(rows, "fsc_n_voxels")
    if k is None or f is None or n is None or not (k.size == f.size == n.size):
        return None
    nyq = float(np.nanmedian(np.asarray(rows["fsc_nyquist_per_px"], dtype=float)))
    px = float(np.asarray(rows["detector.pixel_size_A"], dtype=float)[0])
    return predicted_resolution_A(errors, k, f, n.astype(np.int64), nyq, px)


def resolution_vs_error_figure(df) -> Figure | None:
    """Resolution against alignment error per setting: measured points, true-geometry line, theory curve."""
    ok = _ok(df)
    if not (_has(ok, "resolution_A") and _has(ok, "alignment_error_rms_px")):
        return None
    settings = list(dict.fromkeys(ok.sort_values("setting_index", kind="stable")["setting"]))
    shown = settings[:_MAX_PANELS]
    ncols = min(3, len(shown))
    nrows = math.ceil(len(shown) / ncols)
    fig = Figure(figsize=(5.6 * ncols, 4.4 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colors = _colors(_aligner_order(df))
    for ax, setting in zip(axes, shown):
        rows = ok[ok["setting"] == setting]
        err = np.asarray(rows["alignment_error_rms_px"], dtype=float)
        res = np.asarray(rows["resolution_A"], dtype=float)
        finite_res = res[np.isfinite(res)]
        positive = err[np.isfinite(err) & (err > 0)]
        if positive.size == 0:
            ax.set_visible(False)
            continue
        e_lo, e_hi = positive.min() / 2, positive.max() * 2
        true_res = _finite(rows["resolution_true_geometry_A"]) if "resolution_true_geometry_A" in rows.columns else np.array([])
        top = max([*finite_res, *true_res, 1.0]) * 1.15
        for label in _aligner_order(rows):
            sub = rows[rows["aligner"] == label]
            e = np.asarray(sub["alignment_error_rms_px"], dtype=float)
            r = np.asarray(sub["resolution_A"], dtype=float)
            good = np.isfinite(r) & (e > 0)
            ax.plot(e[good], r[good], "o", color=colors[label], alpha=0.85, label=label)
            unresolved = np.isinf(r) & (e > 0)
            if unresolved.any():
                ax.plot(e[unresolved], [top] * int(unresolved.sum()), "^", color=colors[label], ms=8, clip_on=False)
        grid = np.geomspace(e_lo, e_hi, 80)
        theory = _theory(rows, grid)
        if theory is not None:
            shown_theory = np.where(np.isfinite(theory), theory, np.nan)
            ax.plot(grid, shown_theory, "k-", lw=1.5, label="theory: exp(-π²e²k²)·FSC_true crosses 0.5")
        if true_res.size:
            ax.axhline(np.median(true_res), color="0.3", ls="--", lw=1, label="true geometry (median)")
        if "crowther_limit_A" in rows.columns and _has(rows, "crowther_limit_A"):
            crowther = float(np.median(_finite(rows["crowther_limit_A"])))
            if crowther < top:
                ax.axhline(crowther, color="0.6", ls=":", lw=1, label="Crowther limit")
        if (np.isinf(res)).any():
            ax.plot([], [], "^", color="0.4", label="not resolved (drawn at the top)")
        _log_axis(ax, "x", [e_lo, e_hi])
        ax.set_xlim(e_lo, e_hi)
        ax.set_ylim(0, top * 1.02)
        ax.set_xlabel("alignment error, RMS (px)")
        ax.set_ylabel("resolution, FSC 0.5 vs phantom (Å)")
        ax.set_title(setting if len(settings) > 1 else "Resolution against alignment error", fontsize="medium")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(frameon=False, fontsize="x-small", loc="upper left")
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    if len(settings) > 1:
        fig.suptitle("Resolution against alignment error")
    fig.tight_layout()
    return fig


def per_view_error_figure(df) -> Figure | None:
    """Per-view alignment error against nominal tilt, one panel per aligner, median over seeds."""
    ok = _ok(df)
    if ok.empty or "alignment_error_per_view_px" not in ok.columns or "tilt_deg" not in ok.columns:
        return None
    groups = list(dict.fromkeys(ok.sort_values("aligner_order", kind="stable")["aligner_group"]))
    if not groups:
        return None
    ncols = min(3, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig = Figure(figsize=(5.0 * ncols, 3.6 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, group in zip(axes, groups):
        rows = ok[ok["aligner_group"] == group]
        combos = list(dict.fromkeys(zip(rows["aligner"], rows["setting"])))
        pooled = len(combos) > _MAX_LINES
        keys = list(dict.fromkeys(rows["aligner"])) if pooled else combos
        colors = _colors([str(k) for k in keys])
        for key in keys:
            if pooled:
                sub = rows[rows["aligner"] == key]
                name = f"{key} (median over settings)"
            else:
                label, setting = key
                sub = rows[(rows["aligner"] == label) & (rows["setting"] == setting)]
                variant = label.removeprefix(group).strip() if label != group else ""
                parts = [p for p in (variant, setting if setting != "base" else "") if p]
                name = ", ".join(parts) or group
            tilts = _median_curve(sub, "tilt_deg")
            errs = _median_curve(sub, "alignment_error_per_view_px")
            if tilts is None or errs is None or tilts.size != errs.size:
                continue
            order = np.argsort(tilts)
            ax.plot(tilts[order], errs[order], "o-", ms=2.5, lw=1, color=colors[str(key)], label=name)
        ax.set_title(group, fontsize="medium")
        ax.set_xlabel("nominal tilt (°)")
        ax.set_ylabel("alignment error in view (px)")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0] and (len(keys) > 1 or pooled):
            ax.legend(frameon=False, fontsize="x-small")
    for ax in axes[len(groups):]:
        ax.set_visible(False)
    fig.suptitle("Per-view alignment error against tilt (median over seeds)")
    fig.tight_layout()
    return fig


def runtime_figure(df) -> Figure | None:
    """Aligner runtime and peak memory per aligner: every cell a dot, the median a bar."""
    if df.empty or not _has(df, "seconds_align"):
        return None
    labels = _aligner_order(df)
    colors = _colors(labels)
    panels = [("seconds_align", "aligner runtime (s)")]
    if _has(df, "peak_rss_mb"):
        panels.append(("peak_rss_mb", "peak memory of align + score (MB)"))
    fig = Figure(figsize=(5.2 * len(panels), 0.5 * len(labels) + 1.8))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    rng = np.random.default_rng(0)
    for ax, (column, xlabel) in zip(axes, panels):
        for i, label in enumerate(labels):
            v = _finite(df[df["aligner"] == label][column])
            if v.size:
                ax.plot(v, i + rng.uniform(-0.15, 0.15, v.size), "o", color=colors[label], alpha=0.8)
                ax.plot([np.median(v)] * 2, [i - 0.3, i + 0.3], "-", color="k", lw=2)
        ax.set_yticks(range(len(labels)), labels if ax is axes[0] else [""] * len(labels))
        ax.invert_yaxis()
        vals = _finite(df[column])
        if column == "seconds_align" and _log_scale_ok(vals[vals > 0]):
            _log_axis(ax, "x", vals[vals > 0])
        ax.set_xlabel(xlabel)
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle("Runtime and memory per aligner (dots: cells; bar: median)")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- tables


def summary_table(df) -> str:
    """Markdown table: per aligner and setting, the cells that succeeded and median [min–max] of each score."""
    if df.empty:
        return "_no results_\n"
    columns = [
        ("alignment_error_rms_px", "alignment error (px)"),
        ("alignment_error_max_view_px", "worst view (px)"),
        ("residual_rms_px", "residual (px)"),
        ("resolution_A", "resolution (Å)"),
        ("resolution_loss_A", "resolution loss (Å)"),
        ("bead_fwhm_increase_px_z", "bead FWHM z increase (px)"),
        ("seconds_align", "runtime (s)"),
        ("peak_rss_mb", "peak memory (MB)"),
    ]
    columns = [(c, name) for c, name in columns if _has(df, c)]
    header = ["aligner", "setting", "ok"] + [name for _, name in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    order = df.sort_values(["aligner_order", "setting_index"], kind="stable")
    for (label, setting), rows in order.groupby(["aligner", "setting"], sort=False):
        ok = _ok(rows)
        cells = [_md_escape(label), _md_escape(setting), f"{len(ok)}/{len(rows)}"]
        for c, _ in columns:
            source = rows if c in ("seconds_align", "peak_rss_mb") else ok
            cells.append(_spread(source[c]) if c in source.columns else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def failure_table(df, *, limit: int = 40) -> str:
    """Markdown table of the failed cells (stage and error text)."""
    failed = df[df["status"] != "ok"] if "status" in df.columns else df.iloc[0:0]
    if failed.empty:
        return "No cell failed.\n"
    lines = ["| aligner | setting | seed | stage | error |", "|---|---|---|---|---|"]
    for _, row in failed.head(limit).iterrows():
        error = str(row.get("error", ""))
        error = error if len(error) <= 200 else error[:197] + "..."
        lines.append(
            f"| {_md_escape(row['aligner'])} | {_md_escape(row['setting'])} | {row['seed']} | "
            f"{_md_escape(row.get('error_stage', ''))} | {_md_escape(error)} |"
        )
    if len(failed) > limit:
        lines.append(f"\n... and {len(failed) - limit} more (see results.csv).")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the report


def _figure_md(out: Path, stem: str, fig: Figure | None, caption: str) -> str:
    if fig is None:
        return ""
    save_figure(fig, out / "figures" / stem)
    return f"![{caption}](figures/{stem}.png)\n\n[SVG](figures/{stem}.svg)\n\n"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def write_report(out_dir: str | os.PathLike) -> Path:
    """Write ``DIR/report.md`` and ``DIR/figures/*.png|svg`` from a run's results; returns the report path."""
    out = Path(out_dir)
    info = load_run_info(out)
    df = load_results(out)
    exp = info["experiment"]
    for old in (out / "figures").glob("*") if (out / "figures").is_dir() else []:
        if old.suffix in (".png", ".svg"):
            old.unlink()  # a figure the new report does not make would not belong to it

    n_ok = int((df["status"] == "ok").sum()) if not df.empty else 0
    n_total_grid = info.get("counts", {}).get("cells", len(df))
    git = info.get("git") or {}
    commit = git.get("commit") or "unknown"
    if git.get("dirty"):
        commit += " (with uncommitted changes)"
    parts: list[str] = [f"# Experiment `{exp['name']}`\n"]
    if exp.get("description"):
        parts.append(exp["description"].strip() + "\n")
    opts = exp.get("score", {})
    scoring = (
        f"with images (reconstructions by {opts.get('method', 'wbp')} at binning {opts.get('binning', 2)})"
        if opts.get("with_images")
        else "alignment error only (no reconstructions)"
    )
    parts.append(
        "\n".join(
            [
                f"- workload: preset `{exp['preset']}`"
                + ("".join(f", `{k} = {v}`" for k, v in exp.get("overrides", {}).items())),
                f"- sweep ({exp.get('mode', 'product')}): "
                + ("; ".join(f"`{a['path']}` = {', '.join(str(v) for v in a['values'])}" for a in exp["axes"]) or "none"),
                f"- aligners: {', '.join('`' + a['label'] + '`' + (' (yardstick)' if a.get('yardstick') else '') for a in exp['aligners'])}",
                f"- seeds: {', '.join(str(s) for s in exp['seeds'])}; scoring {scoring}",
                f"- cells: {len(df)} of {n_total_grid} finished, {n_ok} ok, {len(df) - n_ok} failed",
                f"- code: simtomo {info.get('code_version', '?')}, git {commit}; run {info.get('started', '?')} on "
                f"{info.get('host', '?')} ({info.get('executor', '?')})",
                f"- reproduce: `simtomo run {exp.get('source', 'EXPERIMENT.toml')} --out DIR"
                + "".join(f" {o}" for o in exp.get("cli_overrides", []))
                + "`",
            ]
        )
        + "\n"
    )
    if df.empty:
        parts.append("\nNo cell has finished yet.\n")
        path = out / "report.md"
        write_text_atomic(path, "\n".join(parts))
        return path

    parts.append("\n## Summary\n\nMedian [min–max] over seeds; `ok` counts the cells that did not fail.\n")
    parts.append(summary_table(df))

    parts.append("\n## Alignment error\n")
    figures = []
    for axis in exp["axes"]:
        path = axis["path"]
        fig = error_vs_parameter_figure(df, path)
        figures.append(_figure_md(out, f"error_vs_{_safe(path)}", fig, f"alignment error against {path}"))
    swept_aligner_params = sorted({s[0] for a in exp["aligners"] for s in a.get("swept", [])})
    for param in swept_aligner_params:
        column = f"aligner.{param}"
        fig = error_vs_parameter_figure(df, column, group="aligner_group")
        figures.append(_figure_md(out, f"error_vs_aligner_{_safe(param)}", fig, f"alignment error against aligner parameter {param}"))
    figures.append(_figure_md(out, "error_by_aligner", error_by_aligner_figure(df), "alignment error per aligner"))
    parts.append(
        "The alignment error is the gauge-free RMS misregistration of a grid of specimen points "
        "(DESIGN.md section 5), in pixels.\n\n" + "".join(figures)
    )

    fig = residual_vs_error_figure(df)
    parts.append("\n## Residual against true error\n")
    if fig is None:
        parts.append("No aligner of this experiment reports residuals.\n")
    else:
        parts.append(
            "Each aligner's own reprojection residual against its true alignment error. The residual includes "
            "the localisation noise of the aligner's measurements, so a sound alignment sits near or above the "
            "line; points far below it fit their own measurements better than they match the truth "
            "(overfitting, or a model that absorbs real errors).\n\n"
        )
        parts.append(_figure_md(out, "residual_vs_error", fig, "residual against true error"))

    fig = resolution_vs_error_figure(df)
    if fig is not None:
        parts.append("\n## Resolution against alignment error\n")
        parts.append(
            "Resolution is the period where the FSC of the reconstruction against the noise-free phantom "
            "(measured wedge) crosses 0.5; the dashed line is the same with the true geometry, from the same images. "
            "Theory (black curve): a random per-view misregistration of sigma per axis multiplies every Fourier "
            "component of the reconstruction by T(k) = exp(-2π²σ²k²) and leaves the shell power unchanged to first "
            "order, so FSC_est(k) ≈ T(k)·FSC_true(k). With the alignment error e a 2-D RMS (σ = e/√2) the predicted "
            "resolution is where exp(-π²e²k²)·FSC_true(k) falls below 0.5, FSC_true being the measured "
            "true-geometry FSC of the setting (median over seeds). Points above the curve lose more than random "
            "jitter of the same RMS would; the curve assumes the error is spread evenly over views and field.\n\n"
        )
        parts.append(_figure_md(out, "resolution_vs_error", fig, "resolution against alignment error"))

    fig = per_view_error_figure(df)
    if fig is not None:
        parts.append("\n## Per-view error against tilt\n")
        parts.append(_figure_md(out, "per_view_error", fig, "per-view alignment error against tilt"))

    fig = runtime_figure(df)
    if fig is not None:
        parts.append("\n## Runtime and memory\n")
        parts.append(
            "Runtime is the aligner's `align` call alone; peak memory is the resident-set high-water mark "
            "of the process during alignment and scoring of the cell (the simulated series included).\n\n"
        )
        parts.append(_figure_md(out, "runtime", fig, "runtime and memory per aligner"))

    parts.append("\n## Failures\n\n")
    parts.append(failure_table(df))
    parts.append(
        f"\n---\nGenerated {datetime.now(timezone.utc).isoformat(timespec='seconds')} by `simtomo report` from "
        "`results.parquet` (every column is documented in `simtomo/runner.py`).\n"
    )
    path = out / "report.md"
    write_text_atomic(path, "\n".join(p.rstrip("\n") + "\n" for p in parts))
    log.info("wrote %s and %d figures", path, len(list((out / "figures").glob("*.png"))))
    return path

"""Figures of a scored alignment: transfer against theory, FSC curves, per-view error against tilt.

Built on ``matplotlib.figure.Figure`` directly (no pyplot state), so library
code never opens a window or touches global figure registries.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from simtomo.resolution import predicted_transfer

__all__ = ["transfer_figure", "fsc_figure", "per_view_error_figure", "save"]


def save(fig: Figure, path: str | os.PathLike, *, formats: tuple[str, ...] = ("png",)) -> list[Path]:
    """Write ``fig`` as ``path`` with each suffix in ``formats``; returns the files."""
    out = []
    base = Path(path)
    for fmt in formats:
        target = base.with_suffix("." + fmt)
        fig.savefig(target, dpi=120, bbox_inches="tight")
        out.append(target)
    return out


def transfer_figure(scores) -> Figure | None:
    """Measured coherent transfer T(k) with the theory exp(-2 pi^2 sigma^2 k^2) of the measured alignment error."""
    if scores.transfer is None:
        return None
    k = scores.transfer.frequency_per_px
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.add_subplot()
    ax.plot(k, scores.transfer.values, "o-", ms=3, label="measured T(k)")
    ax.plot(k, predicted_transfer(k, scores.transfer_sigma_px), "k--", label=f"theory, σ = {scores.transfer_sigma_px:.2f} px")
    ax.axhline(0, color="0.8", lw=0.8)
    ax.set_xlabel("spatial frequency (1/px)")
    ax.set_ylabel("transfer, estimated vs true geometry")
    ax.set_ylim(-0.2, 1.1)
    ax.set_title(f"{scores.aligner or 'alignment'}: error {scores.alignment_error_rms_px:.2f} px RMS")
    ax.legend(frameon=False)
    _top_axis_in_A(ax, scores.pixel_size_A)
    return fig


def fsc_figure(scores) -> Figure | None:
    """FSC against the noise-free phantom, estimated and true geometry, with the 0.5 threshold."""
    if scores.fsc is None:
        return None
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.add_subplot()
    for curve, label in ((scores.fsc_true_geometry, "true geometry"), (scores.fsc, "estimated geometry")):
        ax.plot(curve.frequency_per_px, curve.values, "-", label=label)
    ax.axhline(0.5, color="k", ls=":", lw=0.8)
    ax.set_xlabel("spatial frequency (1/px)")
    ax.set_ylabel("FSC vs phantom (measured wedge)")
    ax.set_ylim(-0.1, 1.05)
    ax.set_title(
        f"resolution {scores.resolution_A:.1f} Å (true geometry {scores.resolution_true_geometry_A:.1f} Å)"
    )
    ax.legend(frameon=False)
    _top_axis_in_A(ax, scores.pixel_size_A)
    return fig


def per_view_error_figure(scores) -> Figure:
    """Per-view alignment error (and the aligner's residual, when it has one) against tilt angle."""
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.add_subplot()
    order = np.argsort(scores.tilt_deg)
    ax.plot(scores.tilt_deg[order], scores.alignment_error_per_view_px[order], "o-", ms=3, label="alignment error")
    if scores.residual_per_view_px is not None:
        ax.plot(scores.tilt_deg[order], scores.residual_per_view_px[order], "s--", ms=3, label="aligner's residual")
    ax.set_xlabel("tilt angle (°)")
    ax.set_ylabel("px")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{scores.aligner or 'alignment'}: {scores.alignment_error_rms_px:.3f} px RMS")
    ax.legend(frameon=False)
    return fig


def _top_axis_in_A(ax, pixel_size_A: float) -> None:
    """A top axis marking round periods in Å at their frequencies (a reciprocal scale has no good automatic ticks)."""
    if not np.isfinite(pixel_size_A):
        return
    k_max = ax.get_xlim()[1]
    periods = [p for p in (1000, 500, 200, 100, 50, 30, 20, 15, 10, 8, 6, 5, 4, 3, 2) if 0.12 * k_max <= pixel_size_A / p <= k_max]
    top = ax.secondary_xaxis("top")
    top.set_xticks([pixel_size_A / p for p in periods])
    top.set_xticklabels([f"{p:g}" for p in periods])
    top.set_xlabel("period (Å)")

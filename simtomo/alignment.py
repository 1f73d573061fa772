"""What an aligner returns, and the protocol every aligner follows (DESIGN.md section 4).

An aligner takes an :class:`~simtomo.observation.Observation` (images and
microscope metadata, never the truth) and returns an :class:`AlignmentResult`:
the estimated :class:`~simtomo.geometry.Geometry`, its own
:class:`ResidualReport` and, where it has them, 3-D marker positions. Only
scoring joins a result with the truth.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from simtomo.geometry import Geometry
from simtomo.observation import Observation

__all__ = ["ResidualReport", "AlignmentResult", "Aligner"]


def _frozen(values, dtype=float, ndim=1) -> np.ndarray:
    arr = np.array(values, dtype=dtype, ndmin=ndim)
    arr.flags.writeable = False
    return arr


@dataclass(frozen=True, eq=False)
class ResidualReport:
    """An aligner's own account of how well its model explains its measurements.

    Residuals are the distances, in pixels, between each measured point (a
    bead centre, a patch position) and the model's reprojection of it.

    Parameters
    ----------
    per_view_rms_px, per_view_mean_px : (n,) arrays
        RMS and mean residual length of the points in each view (NaN for a
        view with no points).
    per_track_rms_px : (m,) array
        RMS residual length along each track (bead or patch).
    rms_px, mean_px : float
        Over all points that were kept.
    n_points : int
        Points that entered the final fit.
    rejected : (k, 2) int array
        ``(view, track)`` of the points the robust fit rejected.
    """

    per_view_rms_px: np.ndarray
    per_view_mean_px: np.ndarray
    per_track_rms_px: np.ndarray
    rms_px: float
    mean_px: float
    n_points: int
    rejected: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=int))

    def __post_init__(self) -> None:
        object.__setattr__(self, "per_view_rms_px", _frozen(self.per_view_rms_px))
        object.__setattr__(self, "per_view_mean_px", _frozen(self.per_view_mean_px))
        object.__setattr__(self, "per_track_rms_px", _frozen(self.per_track_rms_px))
        rejected = np.array(self.rejected, dtype=int).reshape(-1, 2)
        rejected.flags.writeable = False
        object.__setattr__(self, "rejected", rejected)
        object.__setattr__(self, "rms_px", float(self.rms_px))
        object.__setattr__(self, "mean_px", float(self.mean_px))
        object.__setattr__(self, "n_points", int(self.n_points))

    @classmethod
    def from_residuals(cls, residual_xy: np.ndarray, kept: np.ndarray, rejected: np.ndarray | None = None) -> ResidualReport:
        """Summarise residual vectors ``(n_views, n_tracks, 2)`` over the points where ``kept`` is true.

        ``rejected`` (same shape as ``kept``) marks points the fit threw out;
        they are listed but enter no average.
        """
        r = np.asarray(residual_xy, dtype=float)
        kept = np.asarray(kept, dtype=bool)
        length2 = np.where(kept, np.sum(r**2, axis=-1), 0.0)
        length = np.sqrt(length2)
        with np.errstate(invalid="ignore", divide="ignore"):
            n_view = kept.sum(axis=1)
            n_track = kept.sum(axis=0)
            per_view_rms = np.sqrt(length2.sum(axis=1) / n_view)
            per_view_mean = length.sum(axis=1) / n_view
            per_track_rms = np.sqrt(length2.sum(axis=0) / n_track)
        n = int(kept.sum())
        bad = np.zeros_like(kept) if rejected is None else np.asarray(rejected, dtype=bool)
        return cls(
            per_view_rms_px=per_view_rms,
            per_view_mean_px=per_view_mean,
            per_track_rms_px=per_track_rms,
            rms_px=float(np.sqrt(length2.sum() / n)) if n else float("nan"),
            mean_px=float(length.sum() / n) if n else float("nan"),
            n_points=n,
            rejected=np.argwhere(bad),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (NaN becomes None)."""

        def clean(a):
            return [None if not np.isfinite(v) else float(v) for v in np.asarray(a, dtype=float).ravel()]

        return {
            "rms_px": None if not np.isfinite(self.rms_px) else self.rms_px,
            "mean_px": None if not np.isfinite(self.mean_px) else self.mean_px,
            "n_points": self.n_points,
            "per_view_rms_px": clean(self.per_view_rms_px),
            "per_view_mean_px": clean(self.per_view_mean_px),
            "per_track_rms_px": clean(self.per_track_rms_px),
            "rejected": self.rejected.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ResidualReport:
        def arr(key):
            return np.array([np.nan if v is None else v for v in data[key]], dtype=float)

        return cls(
            per_view_rms_px=arr("per_view_rms_px"),
            per_view_mean_px=arr("per_view_mean_px"),
            per_track_rms_px=arr("per_track_rms_px"),
            rms_px=np.nan if data["rms_px"] is None else data["rms_px"],
            mean_px=np.nan if data["mean_px"] is None else data["mean_px"],
            n_points=data["n_points"],
            rejected=np.array(data.get("rejected", []), dtype=int).reshape(-1, 2),
        )


@dataclass(frozen=True, eq=False)
class AlignmentResult:
    """The output of an aligner.

    Parameters
    ----------
    geometry : Geometry
        The estimated geometry, in the stack's view order.
    residuals : ResidualReport, optional
        The aligner's own residuals; None for aligners without a point model.
    markers_px : (m, 3) array, optional
        3-D positions of the tracked markers in the aligner's own gauge.
    info : dict
        Anything else worth recording (aligner name, parameters, iterations,
        convergence history), JSON-able.
    """

    geometry: Geometry
    residuals: ResidualReport | None = None
    markers_px: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Aligner(Protocol):
    """An alignment method.

    ``name`` is the registry name; ``params`` a dataclass of documented
    parameters with defaults; ``align`` never sees the truth.
    """

    name: str
    params: Any

    def align(self, observation: Observation) -> AlignmentResult: ...

"""Alignments on disk: ``NAME.geometry.json`` with the aligner's own report, and a residual table.

An alignment file is a geometry file (DESIGN.md section 3) with these keys added,
all optional for readers, so any geometry file is also an alignment:

``aligner``, ``params``
    The registry name of the aligner and its parameters.
``residuals``
    The aligner's :class:`~simtomo.alignment.ResidualReport` (null without one).
``markers_px``
    (m, 3) 3-D marker positions in the aligner's gauge (null without).
``info``
    Anything else the aligner recorded.
"""

from __future__ import annotations

import csv
import io
import os
from typing import Any

import numpy as np

from simtomo.alignment import AlignmentResult, ResidualReport
from simtomo.errors import FileFormatError
from simtomo.io._json import load_json, write_text_atomic
from simtomo.io.geometry_json import geometry_from_dict, write_geometry

__all__ = ["write_alignment", "read_alignment", "write_residual_table"]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    return value


def write_alignment(
    path: str | os.PathLike, result: AlignmentResult, *, aligner: str = "", params: dict[str, Any] | None = None
) -> None:
    """Write an alignment result as a geometry file with the aligner's report, atomically."""
    write_geometry(
        path,
        result.geometry,
        aligner=aligner,
        params=_jsonable(params or {}),
        residuals=None if result.residuals is None else result.residuals.to_dict(),
        markers_px=None if result.markers_px is None else _jsonable(np.asarray(result.markers_px)),
        info=_jsonable(result.info),
    )


def read_alignment(path: str | os.PathLike) -> AlignmentResult:
    """Read a geometry or alignment file into an :class:`AlignmentResult`."""
    name = os.fspath(path)
    data = load_json(name)
    geometry = geometry_from_dict(data, source=name)
    residuals = None
    if isinstance(data, dict) and data.get("residuals") is not None:
        try:
            residuals = ResidualReport.from_dict(data["residuals"])
        except (KeyError, TypeError, ValueError) as exc:
            raise FileFormatError(f"{name}: key 'residuals': not a residual report ({exc})") from None
        if residuals.per_view_rms_px.shape != (geometry.n_views,):
            raise FileFormatError(
                f"{name}: key 'residuals': {residuals.per_view_rms_px.size} per-view values for {geometry.n_views} views"
            )
    markers = data.get("markers_px") if isinstance(data, dict) else None
    if markers is not None:
        markers = np.asarray(markers, dtype=float).reshape(-1, 3)
    info = data.get("info") or {} if isinstance(data, dict) else {}
    if isinstance(data, dict) and data.get("aligner"):
        info = {"aligner": data["aligner"], **info}
    return AlignmentResult(geometry=geometry, residuals=residuals, markers_px=markers, info=info)


def write_residual_table(path: str | os.PathLike, result: AlignmentResult) -> None:
    """Per-view residuals as CSV: ``view, tilt_deg, rot_deg, mag, shift_x_px, shift_y_px, residual_rms_px, residual_mean_px``."""
    g = result.geometry
    r = result.residuals
    nan = np.full(g.n_views, np.nan)
    rms = nan if r is None else r.per_view_rms_px
    mean = nan if r is None else r.per_view_mean_px
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(["view", "tilt_deg", "rot_deg", "mag", "shift_x_px", "shift_y_px", "residual_rms_px", "residual_mean_px"])
    for i in range(g.n_views):
        out.writerow(
            [i]
            + [f"{v:.6g}" for v in (g.tilt_deg[i], g.rot_deg[i], g.mag[i], g.shift_px[i, 0], g.shift_px[i, 1])]
            + ["" if not np.isfinite(v) else f"{v:.6g}" for v in (rms[i], mean[i])]
        )
    write_text_atomic(path, buf.getvalue())

"""Fiducial alignment: gold beads found, tracked and bundle-adjusted (IMOD beadtrack + tiltalign style).

1. Coarse alignment by stretched cross-correlation (and the tilt axis from the
   data), so that beads move little from view to view.
2. Beads detected in the view nearest zero tilt with a matched filter at the
   bead size (nominal from the log, or found by a scale search); well-separated
   ones spread over the field are chosen as seeds.
3. Each bead tracked outwards in both tilt directions, its next position
   predicted by a running fit of its 3-D position; refined to sub-pixel.
4. Bundle adjustment of all views and beads (robust, gauge fixed, tilt offset
   levelled), then re-tracking where the refined model says a bead should be,
   and a final bundle adjustment.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from aligners.beads import choose_seeds, detect_beads, estimate_bead_diameter, retrack, track_beads
from aligners.bundle import BundleOptions, VariableModel, solve
from aligners.coarse import coarse_align, find_tilt_axis
from simtomo.alignment import AlignmentResult
from simtomo.errors import AlignmentError, ConfigError
from simtomo.imaging import log_intensity
from simtomo.observation import Observation

__all__ = ["FiducialAligner", "FiducialParams"]

log = logging.getLogger(__name__)

_MODES = ("fixed", "global", "blocks", "per-view")


@dataclass(frozen=True)
class FiducialParams:
    """Parameters of the fiducial aligner.

    Parameters
    ----------
    n_beads : int
        Most beads to track (the strongest well-separated ones); 0 tracks every bead found.
    bead_diameter_px : float or None
        Bead diameter in pixels; None takes the log's nominal size, or searches the scale.
    rotation : str
        Per-view in-plane rotation model: fixed | global | blocks | per-view.
    magnification : str
        Magnification model: fixed | global | blocks | per-view.
    tilt : str
        Tilt-angle model: fixed | global | blocks | per-view.
    block_size : int
        Views per block for models set to "blocks".
    tilt_gauge : str
        "level" adds the offset that makes the bead layer level (IMOD tiltalign's advice), "reference" keeps the zero-tilt view's nominal tilt.
    robust : bool
        Down-weight and reject mistracked points.
    search_tilt_axis : bool
        Find the tilt-axis angle from the images before tracking (else use the nominal value).
    retrack : bool
        After the first bundle adjustment, look again for beads where the model predicts them.
    """

    n_beads: int = 25
    bead_diameter_px: float | None = None
    rotation: str = "per-view"
    magnification: str = "per-view"
    tilt: str = "per-view"
    block_size: int = 5
    tilt_gauge: str = "level"
    robust: bool = True
    search_tilt_axis: bool = True
    retrack: bool = True

    def __post_init__(self) -> None:
        for key in ("rotation", "magnification", "tilt"):
            if getattr(self, key) not in _MODES:
                raise ConfigError(f"fiducial.{key}: expected one of {', '.join(_MODES)}, got {getattr(self, key)!r}")
        if self.n_beads < 0:
            raise ConfigError(f"fiducial.n_beads: expected >= 0, got {self.n_beads}")
        if self.bead_diameter_px is not None and not self.bead_diameter_px > 0:
            raise ConfigError(f"fiducial.bead_diameter_px: expected a positive size, got {self.bead_diameter_px}")
        if self.tilt_gauge not in ("level", "reference"):
            raise ConfigError(f"fiducial.tilt_gauge: expected level or reference, got {self.tilt_gauge!r}")


class FiducialAligner:
    """Gold-bead tracking and bundle adjustment, IMOD style."""

    name = "fiducial"
    Params = FiducialParams

    def __init__(self, params: FiducialParams | None = None) -> None:
        self.params = params or FiducialParams()

    def _options(self) -> BundleOptions:
        p = self.params
        model = lambda mode: VariableModel(mode=mode, block_size=p.block_size)  # noqa: E731
        return BundleOptions(
            rotation=model(p.rotation),
            magnification=model(p.magnification),
            tilt=model(p.tilt),
            tilt_gauge=p.tilt_gauge,
            robust=p.robust,
        )

    def _diameter_px(self, observation: Observation, start_image: np.ndarray) -> float:
        if self.params.bead_diameter_px is not None:
            return float(self.params.bead_diameter_px)
        if observation.bead_diameter_nm:
            return observation.bead_diameter_nm * 10.0 / observation.pixel_size_A
        return estimate_bead_diameter(start_image)

    def align(self, observation: Observation) -> AlignmentResult:
        start = time.perf_counter()
        p = self.params
        tilt = observation.tilt_deg
        images = log_intensity(observation.stack)
        ref = int(np.argmin(np.abs(tilt)))
        # beads first: a series without gold fails in a second, not after the coarse alignment
        diameter = self._diameter_px(observation, images[ref])
        found = detect_beads(images[ref], diameter)
        if len(found.xy) < 3:
            raise AlignmentError(
                f"fiducial: found {len(found.xy)} gold beads in the zero-tilt view; bundle adjustment needs at least 3"
            )
        axis = observation.tilt_axis_deg
        if p.search_tilt_axis:
            axis = find_tilt_axis(observation.stack, tilt, start_deg=axis).angle_deg
        elif axis is None:
            raise AlignmentError("fiducial: the observation has no nominal tilt axis; set search_tilt_axis=true")
        coarse = coarse_align(observation.stack, tilt, axis)
        seeds = choose_seeds(found, observation.image_shape, p.n_beads or len(found.xy), min_separation_px=2 * diameter)
        tracks = track_beads(images, tilt, coarse.geometry, found.xy[seeds], start_view=ref, diameter_px=diameter)
        log.info(
            "fiducial: %d beads (diameter %.1f px), %d of %d track points found",
            len(seeds), diameter, int(np.isfinite(tracks.xy[..., 0]).sum()), tracks.xy.shape[0] * tracks.xy.shape[1],
        )
        options = self._options()
        solution = solve(tracks.xy, coarse.geometry, options=options, reference_view=ref,
                         acquisition_order=observation.acquisition_order)
        if p.retrack:
            tracks = retrack(images, tilt, solution.geometry, solution.points_xyz, tracks, diameter_px=diameter)
            solution = solve(tracks.xy, solution.geometry, options=options, reference_view=ref,
                             acquisition_order=observation.acquisition_order, initial_points=solution.points_xyz)
        seconds = time.perf_counter() - start
        log.info(
            "fiducial: residual %.3f px RMS over %d points, %d rejected, in %.1f s",
            solution.report.rms_px, solution.report.n_points, len(solution.report.rejected), seconds,
        )
        return AlignmentResult(
            geometry=solution.geometry,
            residuals=solution.report,
            markers_px=solution.points_xyz,
            info={
                "aligner": self.name,
                "bead_diameter_px": float(diameter),
                "beads_tracked": int(len(seeds)),
                "tilt_axis_start_deg": None if axis is None else float(axis),
                "robust_sigma_px": float(np.mean(solution.sigma_px)),
                "converged": bool(solution.converged),
                "seconds": seconds,
            },
        )

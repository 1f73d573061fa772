"""The cross-correlation baseline: tilt axis from the data, then shifts by stretched correlation.

What IMOD's ``tiltxcorr`` gives before any fiducial or patch model: one tilt
axis for the whole series, nominal tilt angles, unit magnification and a shift
per view. Its alignment error is the floor the model-based aligners must beat.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np

from aligners.coarse import binned_line_integrals, coarse_align, find_tilt_axis
from aligners.imageops import auto_binning
from simtomo.alignment import AlignmentResult
from simtomo.errors import AlignmentError, ConfigError
from simtomo.observation import Observation

__all__ = ["XcorrAligner", "XcorrParams"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class XcorrParams:
    """Parameters of the cross-correlation aligner.

    Parameters
    ----------
    search_tilt_axis : bool
        Estimate the tilt-axis angle from the images (depth parallax of local patches) before the shifts.
    tilt_axis_deg : float or None
        Tilt-axis angle to start the search from (or to use when not searching); None takes the observation's nominal value.
    axis_search_deg : float
        Half-width of the tilt-axis search around the start, degrees (a full 180-degree search without any start).
    binning : int or None
        Binning of the shift correlations; None bins the larger side to about ``target_size``.
    target_size : int
        View size, px, aimed at by the automatic binning of the shift correlations.
    lowpass : float
        Low-pass edge of the shift correlations, cycles per binned pixel.
    highpass : float
        Sigma of the Gaussian high-pass of the shift correlations, cycles per binned pixel.
    local_patch_size : int
        Side (binned px) of the local patches whose median shift refines each view pair; 0 uses the whole-image peak only.
    min_significance : float
        A correlation peak must stand this many robust standard deviations above its map to count.
    """

    search_tilt_axis: bool = True
    tilt_axis_deg: float | None = None
    axis_search_deg: float = 10.0
    binning: int | None = None
    target_size: int = 512
    lowpass: float = 0.25
    highpass: float = 0.03
    local_patch_size: int = 48
    min_significance: float = 8.0

    def __post_init__(self) -> None:
        if self.tilt_axis_deg is not None and not np.isfinite(self.tilt_axis_deg):
            raise ConfigError(f"xcorr.tilt_axis_deg: expected a finite angle or None, got {self.tilt_axis_deg!r}")
        if not 0 < self.axis_search_deg <= 90:
            raise ConfigError(f"xcorr.axis_search_deg: expected a half-width in (0, 90] degrees, got {self.axis_search_deg!r}")
        if self.binning is not None and (isinstance(self.binning, bool) or self.binning < 1):
            raise ConfigError(f"xcorr.binning: expected an integer >= 1 or None, got {self.binning!r}")
        if self.target_size < 16:
            raise ConfigError(f"xcorr.target_size: expected at least 16 px, got {self.target_size!r}")
        if not 0 < self.lowpass <= 0.5:
            raise ConfigError(f"xcorr.lowpass: expected a cut-off in (0, 0.5] cycles/px, got {self.lowpass!r}")
        if not 0 < self.highpass < 0.5:
            raise ConfigError(f"xcorr.highpass: expected a sigma in (0, 0.5) cycles/px, got {self.highpass!r}")
        if self.local_patch_size < 0:
            raise ConfigError(f"xcorr.local_patch_size: expected 0 (off) or a patch side in px, got {self.local_patch_size!r}")
        if not self.min_significance > 0:
            raise ConfigError(f"xcorr.min_significance: expected a positive number, got {self.min_significance!r}")


def _json_floats(values: np.ndarray) -> list[float | None]:
    return [float(v) if np.isfinite(v) else None for v in np.asarray(values, dtype=float).ravel()]


class XcorrAligner:
    """Tilt axis from depth parallax, then shifts by stretched cross-correlation of neighbouring views."""

    name = "xcorr"
    Params = XcorrParams

    def __init__(self, params: XcorrParams | None = None) -> None:
        self.params = params or XcorrParams()

    def align(self, observation: Observation) -> AlignmentResult:
        """Estimate the tilt axis (optionally) and the per-view shifts of ``observation``.

        Raises
        ------
        AlignmentError
            When the views do not correlate (e.g. pure noise).
        """
        p = self.params
        tilt = observation.tilt_deg
        start = p.tilt_axis_deg if p.tilt_axis_deg is not None else observation.tilt_axis_deg
        binning = p.binning or auto_binning(observation.image_shape, p.target_size)
        binned = binned_line_integrals(observation.stack, binning)
        info: dict = {"aligner": self.name, "params": asdict(p), "tilt_axis_start_deg": start}

        axis = start if start is not None else 0.0
        if p.search_tilt_axis:
            try:
                found = find_tilt_axis(
                    binned, tilt, start_deg=start, search_deg=p.axis_search_deg, min_significance=p.min_significance
                )
            except AlignmentError as exc:
                if start is None:
                    raise
                # The shifts may still be measurable with the nominal axis; the
                # shift correlation below decides whether the views hold any signal.
                log.warning("xcorr: tilt-axis search failed (%s); keeping %.2f deg", exc, start)
                info["tilt_axis_search_error"] = str(exc)
            else:
                axis = found.angle_deg
                info.update(
                    tilt_axis_uncertainty_deg=found.uncertainty_deg if np.isfinite(found.uncertainty_deg) else None,
                    tilt_axis_passes=found.passes,
                    tilt_axis_pairs=found.n_pairs,
                    tilt_axis_patches=found.n_patches,
                )
        coarse = coarse_align(
            binned,
            tilt,
            axis,
            pixel_size_A=observation.pixel_size_A,
            lowpass=p.lowpass,
            highpass=p.highpass,
            local_patch_size=p.local_patch_size,
            min_significance=p.min_significance,
        )
        info.update(
            tilt_axis_deg=float(axis),
            tilt_axis_searched=bool(p.search_tilt_axis and "tilt_axis_search_error" not in info),
            binning=coarse.binning,
            reference_view=coarse.reference_view,
            peak_correlation=_json_floats(coarse.peak_correlation),
            significance=_json_floats(coarse.significance),
            unreliable_views=[int(i) for i in np.flatnonzero(~coarse.reliable)],
        )
        log.info("xcorr: tilt axis %.3f deg, %d views, %d unreliable", axis, observation.n_views, len(info["unreliable_views"]))
        return AlignmentResult(geometry=coarse.geometry, info=info)

"""Scoring: what an alignment error costs (DESIGN.md section 5).

:func:`score` joins an aligner's result with the ground truth. Without images
it gives the gauge-free alignment error and the aligner's own residuals side by
side; with the stack it also reconstructs the same images with the estimated
geometry (brought into the truth's frame by the fitted gauge) and with the true
geometry, and measures what the difference costs: bead blur, the coherent
transfer against its theory, and the resolution against the noise-free phantom.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from simtomo.alignment import AlignmentResult
from simtomo.alignment_error import alignment_error
from simtomo.beadfit import fit_beads
from simtomo.errors import ConfigError
from simtomo.geometry import Geometry
from simtomo.io.truth import Truth
from simtomo.reconstruct import log_intensity, reconstruct
from simtomo.resolution import (
    ShellCurve,
    crowther_limit_A,
    fsc,
    fsc_xy,
    measured_wedge,
    resolution_A,
    soft_mask,
    transfer,
)
from simtomo.simulate import truth_phantom

__all__ = ["Scores", "ScoringReference", "score", "scoring_reference", "thickness_px"]

log = logging.getLogger(__name__)


def _nan3() -> np.ndarray:
    return np.full(3, np.nan)


@dataclass(frozen=True, eq=False)
class Scores:
    """Every figure of merit of one alignment of one series.

    Lengths are in (unbinned) pixels unless the name says Å. Fields that need
    the images are NaN (or None for curves) when :func:`score` had no stack.
    ``to_row()`` flattens the scalars (and the per-view error) into one
    table row; ``to_dict()`` keeps everything, curves included, for JSON.
    """

    name: str
    aligner: str
    n_views: int
    alignment_error_rms_px: float
    alignment_error_along_axis_px: float
    alignment_error_across_axis_px: float
    alignment_error_max_view_px: float
    alignment_error_per_view_px: np.ndarray
    tilt_deg: np.ndarray
    residual_rms_px: float = math.nan
    residual_mean_px: float = math.nan
    residual_per_view_px: np.ndarray | None = None
    binning: int = 0
    resolution_A: float = math.nan
    resolution_true_geometry_A: float = math.nan
    resolution_loss_A: float = math.nan
    resolution_xy_A: float = math.nan
    resolution_xy_true_geometry_A: float = math.nan
    crowther_limit_A: float = math.nan
    bead_fwhm_px: np.ndarray = field(default_factory=_nan3)
    bead_fwhm_true_geometry_px: np.ndarray = field(default_factory=_nan3)
    bead_fwhm_increase_px: np.ndarray = field(default_factory=_nan3)
    beads_fitted: int = 0
    transfer_sigma_px: float = math.nan
    transfer: ShellCurve | None = None
    fsc: ShellCurve | None = None
    fsc_true_geometry: ShellCurve | None = None
    pixel_size_A: float = math.nan
    seconds: float = math.nan

    def to_row(self) -> dict[str, Any]:
        """One flat table row: scalars, xyz vectors as ``_x/_y/_z`` columns, the per-view error as a list."""
        row: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, ShellCurve) or value is None:
                continue
            if f.name in ("tilt_deg", "residual_per_view_px"):
                continue
            if isinstance(value, np.ndarray):
                if value.shape == (3,):
                    for axis, v in zip("xyz", value):
                        row[f"{f.name}_{axis}"] = float(v)
                else:
                    row[f.name] = [float(v) for v in value]
            else:
                row[f.name] = value
        return row

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-able (NaN and inf become None)."""

        def clean(value: Any) -> Any:
            if isinstance(value, ShellCurve):
                return {
                    "frequency_per_px": clean(value.frequency_per_px),
                    "values": clean(value.values),
                    "n_voxels": [int(v) for v in value.n_voxels],
                }
            if isinstance(value, np.ndarray):
                return [clean(float(v)) for v in value.ravel()]
            if isinstance(value, (float, np.floating)):
                return float(value) if math.isfinite(value) else None
            if isinstance(value, np.integer):
                return int(value)
            return value

        return {f.name: clean(getattr(self, f.name)) for f in fields(self)}


def thickness_px(truth: Truth) -> float:
    """Specimen thickness in pixels, from the truth's configuration."""
    try:
        return float(truth.config["specimen"]["thickness_nm"]) * 10.0 / float(truth.config["detector"]["pixel_size_A"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError("truth config: needs specimen.thickness_nm and detector.pixel_size_A") from None


def _check(truth: Truth, geometry: Geometry, stack: np.ndarray | None) -> None:
    t = truth.geometry
    if geometry.n_views != t.n_views:
        raise ConfigError(f"score: the geometry has {geometry.n_views} views, the truth {t.n_views}")
    if geometry.image_shape != t.image_shape:
        raise ConfigError(f"score: the geometry is for images of {geometry.image_shape}, the truth for {t.image_shape}")
    if stack is not None:
        if stack.ndim != 3 or stack.shape[0] != t.n_views:
            raise ConfigError(f"score: the stack has shape {stack.shape}, the truth has {t.n_views} views")
        if tuple(stack.shape[1:]) != t.image_shape:
            raise ConfigError(f"score: the stack's images are {tuple(stack.shape[1:])}, the truth's {t.image_shape}")


def score(
    truth: Truth,
    result: AlignmentResult | Geometry,
    stack: np.ndarray | None = None,
    *,
    binning: int = 2,
    method: str = "wbp",
    name: str = "",
    reference: ScoringReference | None = None,
) -> Scores:
    """Score an alignment against the ground truth.

    Parameters
    ----------
    truth : Truth or TiltSeries
        The ground truth (``NAME.truth.json``, or a simulated series in memory).
    result : AlignmentResult or Geometry
        What the aligner returned.
    stack : (n, h, w) array, optional
        The images the aligner saw (electron counts). With it the blur,
        transfer and resolution figures are measured; without, only the
        alignment error and the residuals.
    binning : int
        Voxel size of the reconstructions in pixels (2 for ``standard``
        reconstructs 512 x 512 x ~130 voxels).
    method : {"wbp", "sirt"}
        Reconstruction method.
    name : str
        A label for the row.
    reference : ScoringReference, optional
        The alignment-independent part of image scoring from
        :func:`scoring_reference`, reused when several alignments of one
        series are scored (``binning`` and ``method`` are then the reference's).

    Returns
    -------
    Scores
    """
    start = time.perf_counter()
    if hasattr(truth, "truth") and callable(truth.truth):  # a TiltSeries
        truth = truth.truth()
    if not isinstance(truth, Truth):
        raise ConfigError(f"score: truth must be a Truth or a TiltSeries, got {type(truth).__name__}")
    if isinstance(result, Geometry):
        result = AlignmentResult(geometry=result)
    if not isinstance(result, AlignmentResult):
        raise ConfigError(f"score: result must be an AlignmentResult or a Geometry, got {type(result).__name__}")
    if stack is not None:
        stack = np.asarray(stack)
    _check(truth, result.geometry, stack)
    _check_binning(binning)
    if reference is not None and stack is not None and reference.stack_shape != stack.shape:
        raise ConfigError(f"score: the reference was built from a stack of {reference.stack_shape}, this stack is {stack.shape}")

    true_geometry = truth.geometry
    err = alignment_error(result.geometry, true_geometry, thickness_px=thickness_px(truth))
    res = result.residuals
    values: dict[str, Any] = dict(
        name=name or str(truth.config.get("name", "")),
        aligner=str(result.info.get("aligner", "")),
        n_views=true_geometry.n_views,
        alignment_error_rms_px=err.rms_px,
        alignment_error_along_axis_px=err.along_rms_px,
        alignment_error_across_axis_px=err.across_rms_px,
        alignment_error_max_view_px=float(err.per_view_px.max()),
        alignment_error_per_view_px=err.per_view_px,
        tilt_deg=true_geometry.tilt_deg,
        pixel_size_A=true_geometry.pixel_size_A,
        residual_rms_px=math.nan if res is None else res.rms_px,
        residual_mean_px=math.nan if res is None else res.mean_px,
        residual_per_view_px=None if res is None else res.per_view_rms_px,
    )
    if stack is not None:
        if reference is None:
            reference = scoring_reference(truth, stack, binning=binning, method=method)
        values.update(_image_scores(truth, result.geometry, err.gauge, reference, err.rms_px))
    values["seconds"] = time.perf_counter() - start
    log.info(
        "scored %s: alignment error %.3f px RMS%s in %.1f s",
        values["name"] or "series",
        err.rms_px,
        f", resolution {values['resolution_A']:.1f} Å (true geometry {values['resolution_true_geometry_A']:.1f} Å)"
        if stack is not None
        else "",
        values["seconds"],
    )
    return Scores(**values)


@dataclass(frozen=True, eq=False)
class ScoringReference:
    """What scoring needs from the truth and the images, independent of the alignment.

    Every alignment of one series is compared with the same phantom and the
    same true-geometry reconstruction; build this once with
    :func:`scoring_reference` and pass it to :func:`score` for each aligner.
    """

    binning: int
    method: str
    projections: np.ndarray
    phantom: np.ndarray
    volume_true: np.ndarray
    region: np.ndarray
    mask: np.ndarray
    fsc_true: ShellCurve
    fsc_xy_true: ShellCurve
    bead_fits_true: Any
    stack_shape: tuple[int, ...]


def scoring_reference(truth: Truth, stack: np.ndarray, *, binning: int = 2, method: str = "wbp") -> ScoringReference:
    """The alignment-independent half of image-based scoring: phantom, true-geometry reconstruction, its FSC and bead fits."""
    if hasattr(truth, "truth") and callable(truth.truth):
        truth = truth.truth()
    stack = np.asarray(stack)
    _check(truth, truth.geometry, stack)
    _check_binning(binning)
    # room above and below the slab: the beads sit on its surfaces, and the mask's taper must fall in empty ice
    phantom = truth_phantom(truth, binning=binning, z_margin_px=8 * binning + _bead_diameter_px(truth))
    shape = phantom.shape
    projections = log_intensity(stack)
    t0 = time.perf_counter()
    volume_true = reconstruct(projections, truth.geometry, shape, voxel_size_px=binning, method=method)
    log.info("reconstructed with the true geometry (%s, bin %d, %d x %d x %d) in %.1f s", method, binning, *shape, time.perf_counter() - t0)
    region = measured_wedge(shape, truth.geometry.tilt_deg)
    mask = soft_mask(shape)
    return ScoringReference(
        binning=int(binning),
        method=method,
        projections=projections,
        phantom=phantom,
        volume_true=volume_true,
        region=region,
        mask=mask,
        fsc_true=fsc(volume_true, phantom, voxel_size_px=binning, region=region, mask=mask),
        fsc_xy_true=fsc_xy(volume_true, phantom, voxel_size_px=binning, mask=mask),
        bead_fits_true=fit_beads(volume_true, truth.beads_px, voxel_size_px=binning) if len(truth.beads_px) else None,
        stack_shape=tuple(stack.shape),
    )


def _image_scores(truth: Truth, geometry: Geometry, gauge, ref: ScoringReference, error_rms_px: float) -> dict[str, Any]:
    px = truth.geometry.pixel_size_A
    b = ref.binning
    t0 = time.perf_counter()
    vol_est = reconstruct(ref.projections, geometry, ref.phantom.shape, voxel_size_px=b, method=ref.method, gauge=gauge)
    log.info("reconstructed with the estimated geometry in %.1f s", time.perf_counter() - t0)
    fsc_est = fsc(vol_est, ref.phantom, voxel_size_px=b, region=ref.region, mask=ref.mask)
    xy_est = fsc_xy(vol_est, ref.phantom, voxel_size_px=b, mask=ref.mask)
    res_est = float(resolution_A(fsc_est, px))
    res_true = float(resolution_A(ref.fsc_true, px))
    out: dict[str, Any] = dict(
        binning=b,
        resolution_A=res_est,
        resolution_true_geometry_A=res_true,
        resolution_loss_A=res_est - res_true,
        resolution_xy_A=float(resolution_A(xy_est, px)),
        resolution_xy_true_geometry_A=float(resolution_A(ref.fsc_xy_true, px)),
        crowther_limit_A=float(crowther_limit_A(_tilt_step_deg(truth.nominal_tilt_deg), thickness_px(truth), px)),
        transfer=transfer(vol_est, ref.volume_true, voxel_size_px=b, region=ref.region, mask=ref.mask),
        # a 2-D RMS misregistration r is sigma = r / sqrt(2) per axis (DESIGN.md section 5)
        transfer_sigma_px=error_rms_px / math.sqrt(2.0),
        fsc=fsc_est,
        fsc_true_geometry=ref.fsc_true,
    )
    if ref.bead_fits_true is not None:
        fit_est = fit_beads(vol_est, truth.beads_px, voxel_size_px=b)
        fit_true = ref.bead_fits_true
        both = fit_est.ok & fit_true.ok
        if both.any():
            fw_est = np.median(fit_est.fwhm_px[both], axis=0)
            fw_true = np.median(fit_true.fwhm_px[both], axis=0)
            out.update(
                bead_fwhm_px=fw_est,
                bead_fwhm_true_geometry_px=fw_true,
                bead_fwhm_increase_px=fw_est - fw_true,
                beads_fitted=int(both.sum()),
            )
    return out


def _bead_diameter_px(truth: Truth) -> float:
    try:
        return float(truth.config["beads"]["diameter_nm"]) * 10.0 / truth.geometry.pixel_size_A
    except (KeyError, TypeError, ValueError):
        return 0.0


def _check_binning(binning) -> None:
    if isinstance(binning, bool) or not isinstance(binning, (int, np.integer)) or binning < 1:
        raise ConfigError(f"score: binning must be an integer >= 1, got {binning!r}")


def _tilt_step_deg(tilt_deg: np.ndarray) -> float:
    t = np.sort(np.asarray(tilt_deg, dtype=float))
    return float(np.median(np.diff(t))) if t.size > 1 else 180.0

"""Along-axis shifts from the specimen's projection onto the tilt axis (the common line).

Why. The rotation of a tilt series is about the tilt axis, so the specimen's
projection *onto that axis* is the same in every view: integrate an aligned
view across the axis, over a fixed band of the specimen, and the profile left
along the axis does not depend on the tilt. Each view's profile, correlated
with the mean profile, therefore measures that view's along-axis shift
absolutely, with no chain through its neighbours.

Projection matching cannot do this for smooth patterns: its reference for a
view is a reprojection made, at the frequencies that carry sub-pixel
precision, from the few neighbouring views, which share a smooth error; a
shift pattern like ``c sin(theta)`` along the axis passes almost unseen (it
is no gauge freedom either: a specimen translation moves views along the
axis by one constant). Coarse alignment, cumulated from pair to pair, leaves
exactly such random-walk patterns behind.

The band is ``|x| <= strip`` in specimen coordinates; in a view at tilt
``theta`` it covers ``|u| <= strip cos(theta)`` of the aligned frame, up to
the parallax ``z sin(theta)`` of content at depth ``z``, which makes the band
edges soft (tapered here). The profiles differ by that edge content and by
noise, about 0.4 px per view on ``standard`` at binning 4; a low-order polynomial in tilt
keeps the smooth pattern that matching cannot see and leaves the rest to it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from aligners import imageops
from simtomo.errors import ConfigError
from simtomo.geometry import Geometry

__all__ = ["AxisProfileResult", "along_axis_shifts", "apply_along_axis_shifts", "axis_profiles"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AxisProfileResult:
    """Along-axis shifts of each view measured from its tilt-axis profile.

    Attributes
    ----------
    shift_px : (n,) array
        Correction to add to each view's along-axis shift (aligned frame,
        unbinned px), mean-free; smoothed in tilt when a degree was given.
    measured_px : (n,) array
        The raw per-view measurements (NaN where the view was not used).
    correlation : (n,) array
        Normalised correlation of each view's profile with the mean profile.
    used : (n,) bool array
        Views whose correlation reached the threshold.
    """

    shift_px: np.ndarray
    measured_px: np.ndarray
    correlation: np.ndarray
    used: np.ndarray


def axis_profiles(images: np.ndarray, binning: int, geometry: Geometry, *, strip_px: float, half_length_px: float,
                  taper_px: float = 20.0, highpass_px: float = 80.0) -> np.ndarray:
    """Profiles along the tilt axis of every view, integrated across a fixed band of the specimen.

    Parameters
    ----------
    images : (n, hb, wb) array
        Line-integral views binned by ``binning``.
    binning : int
    geometry : Geometry
        Current geometry, unbinned px.
    strip_px : float
        Half-width of the specimen band, unbinned px (``|x| <= strip_px``).
    half_length_px : float
        The profiles run over ``|v| <= half_length_px`` along the axis, unbinned px.
    taper_px, highpass_px : float
        Width of the band's soft edge; length of the running mean removed from
        each profile (it varies with the depth of specimen the band crosses).

    Returns
    -------
    (n, 2 * half_length_px / binning + 1) array
        One profile per view, binned px along the axis; NaN where less than
        half of the band's weight fell inside the view.
    """
    b = float(binning)
    n, hb, wb = images.shape
    nv = 2 * int(half_length_px / b) + 1
    taper = max(taper_px / b, 1.0)
    a = geometry.inplane_matrices()
    shift = geometry.shift_px / b
    out = np.full((n, nv), np.nan)
    for i in range(n):
        half = strip_px / b * abs(np.cos(np.deg2rad(geometry.tilt_deg[i])))
        nu = 2 * int(np.ceil(half + taper)) + 1
        u = np.arange(nu) - (nu - 1) / 2.0
        w = np.clip((half + taper - np.abs(u)) / taper, 0.0, 1.0)
        band = imageops.affine_resample(images[i], a[i], shift[i], (nv, nu), cval=np.nan)
        inside = np.isfinite(band)
        weight = (inside * w).sum(axis=1)
        prof = np.where(inside, band, 0.0) @ w
        out[i] = np.where(weight > 0.5 * w.sum(), prof / np.maximum(weight, 1e-12), np.nan)
    size = max(5, int(highpass_px / b)) | 1
    finite = np.isfinite(out)
    filled = np.where(finite, out, 0.0)
    trend = ndimage.uniform_filter1d(filled, size, axis=1, mode="nearest") / np.maximum(
        ndimage.uniform_filter1d(finite.astype(float), size, axis=1, mode="nearest"), 1e-12)
    return np.where(finite, out - trend, np.nan)


def _profile_shifts(profiles: np.ndarray, refs: np.ndarray, max_shift: int) -> tuple[np.ndarray, np.ndarray]:
    """Shift (binned px) and normalised peak of each profile against its reference: parabolic sub-pixel peak."""
    nv = profiles.shape[1]
    window = np.hanning(nv)
    p = np.nan_to_num(profiles) * window
    r = np.nan_to_num(refs) * window
    size = 2 * nv
    cc = np.fft.irfft(np.fft.rfft(p, size) * np.conj(np.fft.rfft(r, size)), size)
    cc = np.roll(cc, max_shift, axis=1)[:, : 2 * max_shift + 1]  # lags -max_shift..max_shift
    k = np.clip(np.argmax(cc, axis=1), 1, 2 * max_shift - 1)
    rows = np.arange(len(cc))
    y0, y1, y2 = cc[rows, k - 1], cc[rows, k], cc[rows, k + 1]
    denom = y0 - 2.0 * y1 + y2
    frac = np.where(denom < 0, 0.5 * (y0 - y2) / np.where(denom < 0, denom, -1.0), 0.0)
    norm = np.sqrt(np.sum(p**2, axis=1) * np.sum(r**2, axis=1)) + 1e-30
    return k - max_shift + frac, y1 / norm


def _leave_one_out_means(profiles: np.ndarray, shift: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """For each view, the weighted mean of the *other* views' profiles, each moved back by its shift.

    Leaving the view out keeps its own noise out of its reference: pure noise
    then correlates with nothing instead of with itself.
    """
    nv = profiles.shape[1]
    v = np.arange(nv) - (nv - 1) / 2.0
    moved = np.array([np.interp(v, v - d, np.nan_to_num(p)) for p, d in zip(profiles, shift)])
    total = weight @ moved
    count = weight.sum() - weight
    return (total[None, :] - weight[:, None] * moved) / np.maximum(count, 1e-12)[:, None]


def along_axis_shifts(images: np.ndarray, binning: int, geometry: Geometry, *, strip_fraction: float = 0.35,
                      length_fraction: float = 0.43, degree: int | None = 4, max_shift_px: float = 20.0,
                      min_correlation: float = 0.3, min_used_fraction: float = 0.5,
                      iterations: int = 3) -> AxisProfileResult:
    """Measure every view's along-axis shift against the mean tilt-axis profile.

    Parameters
    ----------
    images : (n, hb, wb) array
        Line-integral views binned by ``binning``.
    binning : int
    geometry : Geometry
        Current geometry, unbinned px.
    strip_fraction : float
        Half-width of the specimen band as a fraction of the image width.
    length_fraction : float
        Half-length of the profiles as a fraction of the image height.
    degree : int or None
        Degree of the polynomial in tilt fitted to the measurements (None: raw).
    max_shift_px : float
        Largest shift searched, unbinned px.
    min_correlation : float
        Views whose profile correlates less with the mean are left out of the
        fit (and so are views below twice the correlation chance gives).
    min_used_fraction : float
        Fewest views (fraction) that must correlate for any correction.
    iterations : int
        Re-centrings of the mean profile on the measured shifts.

    Returns
    -------
    AxisProfileResult

    Raises
    ------
    ConfigError
        For fractions outside (0, 0.5] or a stack too small for a profile.
    """
    for name, value in (("strip_fraction", strip_fraction), ("length_fraction", length_fraction)):
        if not 0 < value <= 0.5:
            raise ConfigError(f"along_axis_shifts.{name}: expected a fraction in (0, 0.5], got {value!r}")
    h, w = geometry.image_shape
    b = float(binning)
    max_lag = max(2, int(round(max_shift_px / b)))
    profiles = axis_profiles(images, binning, geometry, strip_px=strip_fraction * w, half_length_px=length_fraction * h)
    nv = profiles.shape[1]
    if nv < 4 * max_lag:
        raise ConfigError(f"along_axis_shifts: profiles of {nv} binned px are too short for shifts up to {max_lag} px")
    tilt = geometry.tilt_deg
    complete = np.mean(np.isfinite(profiles), axis=1) >= 0.8
    # the first reference: views within 10 degrees of the middle of the series (at least three)
    distance = np.abs(tilt - np.median(tilt))
    weight = (complete & (distance <= max(10.0, np.sort(distance)[min(2, len(tilt) - 1)]))).astype(float)
    shift = np.zeros(len(tilt))
    refs = _leave_one_out_means(profiles, shift, weight)
    # What correlation does chance give? The same search against the mirrored
    # reference, which has the same spectrum but nothing in register. Decided
    # before any re-centring: aligning noise to its own mean invents a common line.
    _, chance = _profile_shifts(profiles, refs[:, ::-1], max_lag)
    threshold = max(min_correlation, 2.0 * float(np.median(chance)))
    for it in range(iterations + 1):
        if it:  # re-centre the references on the views that matched
            refs = _leave_one_out_means(profiles, shift, used.astype(float))
        shift, corr = _profile_shifts(profiles, refs, max_lag)
        used = complete & (corr >= threshold)
        if not used.any():
            break
    measured = np.where(used, shift * b, np.nan)
    correction = np.zeros(len(tilt))
    need = max(1 if degree is None else degree + 3, int(np.ceil(min_used_fraction * len(tilt))))
    if used.sum() >= need:
        measured -= np.nanmean(measured)
        if degree is None:
            correction = np.where(used, measured, 0.0)
        else:
            th = np.deg2rad(tilt)
            coef = np.polynomial.polynomial.polyfit(th[used], measured[used], degree)
            # no extrapolation beyond the measured tilts, no more than was searched
            inside = np.clip(th, th[used].min(), th[used].max())
            correction = np.clip(np.polynomial.polynomial.polyval(inside, coef), -max_shift_px, max_shift_px)
            correction -= correction.mean()
    else:
        log.warning("along-axis profiles: only %d of %d views correlate >= %.2f with the mean (chance gives %.2f); "
                    "no correction", int(used.sum()), len(tilt), threshold, float(np.median(chance)))
    return AxisProfileResult(shift_px=correction, measured_px=measured, correlation=corr, used=used)


def apply_along_axis_shifts(geometry: Geometry, shift_px: np.ndarray) -> Geometry:
    """Move each view's origin by ``shift_px`` along its tilt axis (aligned-frame y, unbinned px)."""
    d = np.stack([np.zeros_like(shift_px), shift_px], axis=1)
    return geometry.replace(shift_px=geometry.shift_px + np.einsum("nij,nj->ni", geometry.inplane_matrices(), d))

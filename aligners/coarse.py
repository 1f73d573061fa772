"""Coarse alignment by cross-correlation of neighbouring views, and the tilt-axis angle from the data.

Two reusable steps that the other aligners (fiducial, patch tracking,
projection matching) start from, in the spirit of IMOD's ``tiltxcorr``:

:func:`coarse_align`
    Each view is cross-correlated with its neighbour toward zero tilt, after
    both are brought into the aligned frame (tilt axis vertical) and the
    higher-tilt one is stretched across the axis by
    ``cos(theta_neighbour) / cos(theta_view)``; the pairwise shifts are
    cumulated outward from the reference view (the one nearest zero tilt).

:func:`find_tilt_axis`
    The in-plane direction of the tilt axis, from the parallax of the
    specimen's depth: between two views at different tilts, content at
    different heights moves *across* the axis by different amounts and never
    along it. Local patch displacements between views are measured and the
    axis is the direction along which they show no depth-dependent spread.

Geometry convention (DESIGN.md section 3): ``p_i(X) = s_i R(phi_i) P R_y(theta_i) X + t_i``.
The aligned frame of view ``i`` is ``q = P R_y(theta_i) X``; a raw view and
its aligned image are related by ``raw(p) = aligned(R(phi)^-1 (p - t_i))``.

Gauge of the returned shifts. The reference view's shift is 0: the specimen
origin is the point that projects to the centre of the reference view, at the
depth whose content dominates the correlations. Adding one constant to every
``t_i`` is *not* a gauge freedom (a specimen translation moves the views'
origins by ``R(phi) (T_x cos theta_i + T_z sin theta_i, T_y)``, which varies
with tilt), so the shifts are not re-centred on their mean.

Limits. Coarse alignment models only shifts: tilt angles stay nominal, the
tilt axis is one angle for the series, magnification 1. Per-pair errors
accumulate outward from the reference like a random walk; with a thick
specimen the pairwise peak also depends on which depth dominates each pair.
Strong anisotropic features (membranes, filaments) can pull a whole-image
correlation peak along themselves; the median of local patch shifts
(``local_patch_size``) is used against that.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from aligners import imageops
from simtomo.errors import AlignmentError, ConfigError
from simtomo.geometry import Geometry, rotation_2d
from simtomo.imaging import log_intensity

__all__ = [
    "BinnedStack",
    "CoarseResult",
    "TiltAxisResult",
    "binned_line_integrals",
    "coarse_align",
    "find_tilt_axis",
]

log = logging.getLogger(__name__)

#: Local patches whose correlation peak stands less than this many robust sd
#: above its map are ignored by the local refinement of :func:`coarse_align`.
LOCAL_MIN_SIGNIFICANCE = 3.0


@dataclass(frozen=True, eq=False)
class BinnedStack:
    """Line-integral images of a tilt series, Fourier-binned, ready for correlation.

    Parameters
    ----------
    images : (n, hb, wb) float32 array
        ``-log(counts / mean)`` of each view (:func:`simtomo.imaging.log_intensity`),
        binned by ``binning`` with the image centre preserved.
    binning : int
        Binning factor relative to the detector pixels.
    image_shape : (h, w)
        Shape of the unbinned views.
    """

    images: np.ndarray
    binning: int
    image_shape: tuple[int, int]

    def __post_init__(self) -> None:
        images = np.asarray(self.images, dtype=np.float32)
        if images.ndim != 3 or images.shape[0] == 0 or min(images.shape[1:]) < 8:
            raise ConfigError(f"BinnedStack.images: expected an (n_views, h, w) array with h, w >= 8, got shape {images.shape}")
        if isinstance(self.binning, bool) or not float(self.binning).is_integer() or self.binning < 1:
            raise ConfigError(f"BinnedStack.binning: expected an integer >= 1, got {self.binning!r}")
        shape = tuple(int(v) for v in self.image_shape)
        if len(shape) != 2 or min(shape) < 1:
            raise ConfigError(f"BinnedStack.image_shape: expected (h, w), got {self.image_shape!r}")
        object.__setattr__(self, "images", images)
        object.__setattr__(self, "binning", int(self.binning))
        object.__setattr__(self, "image_shape", shape)

    def rebin(self, factor: int) -> BinnedStack:
        """Bin further by an integer ``factor`` (the result is binned ``binning * factor``)."""
        if factor == 1:
            return self
        return BinnedStack(imageops.fourier_bin(self.images, factor), self.binning * int(factor), self.image_shape)


def binned_line_integrals(stack: np.ndarray, binning: int) -> BinnedStack:
    """Convert a stack of counts to line integrals and Fourier-bin it, one view at a time (bounded memory).

    Parameters
    ----------
    stack : (n, h, w) array
        Electron counts, views in any order.
    binning : int
        Integer binning factor >= 1.

    Raises
    ------
    ConfigError
        For a malformed stack (see :func:`simtomo.imaging.log_intensity`) or binning.
    """
    arr = _check_stack(stack)
    n, h, w = arr.shape
    out = None
    for i in range(n):
        view = imageops.fourier_bin(log_intensity(np.asarray(arr[i : i + 1]), first_view=i), binning)[0]
        if out is None:
            out = np.empty((n,) + view.shape, dtype=np.float32)
        out[i] = view
    return BinnedStack(out, int(binning), (h, w))


def _check_stack(stack) -> np.ndarray:
    if isinstance(stack, BinnedStack):
        return stack.images
    arr = stack if isinstance(stack, np.ndarray) else np.asarray(stack)
    if arr.ndim != 3 or arr.shape[0] == 0 or min(arr.shape[1:]) < 8:
        raise ConfigError(f"stack: expected an (n_views, h, w) array with n_views >= 1 and h, w >= 8, got shape {arr.shape}")
    return arr


def _check_tilts(tilt_deg, n: int) -> np.ndarray:
    tilt = np.asarray(tilt_deg, dtype=float)
    if tilt.shape != (n,):
        raise ConfigError(f"tilt_deg: expected {n} tilt angles (one per view), got shape {tilt.shape}")
    if not np.all(np.isfinite(tilt)) or np.any(np.abs(tilt) >= 89.0):
        raise ConfigError("tilt_deg: expected finite tilt angles strictly within +-89 degrees")
    return tilt


def _check_angle(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected an angle in degrees, got {value!r}") from None
    if not np.isfinite(v):
        raise ConfigError(f"{name}: expected a finite angle in degrees, got {value!r}")
    return v


def _prepare(stack, binning: int | None, target_size: int) -> BinnedStack:
    """A BinnedStack at the requested (or automatic) binning, from counts or from an already binned stack."""
    if binning is not None and (isinstance(binning, bool) or not float(binning).is_integer() or binning < 1):
        raise ConfigError(f"binning: expected an integer >= 1 or None (automatic), got {binning!r}")
    if isinstance(stack, BinnedStack):
        if binning is None:
            factor = imageops.auto_binning(stack.images.shape[1:], target_size)
        else:
            if int(binning) % stack.binning:
                raise ConfigError(f"binning: {binning} is not a multiple of the stack's binning {stack.binning}")
            factor = int(binning) // stack.binning
        return stack.rebin(factor)
    arr = _check_stack(stack)
    b = imageops.auto_binning(arr.shape[1:], target_size) if binning is None else int(binning)
    return binned_line_integrals(arr, b)


def _pretaper(images: np.ndarray, fraction: float) -> np.ndarray:
    """Each view minus its mean, times a cosine edge window: zero at the raw-frame borders."""
    n, h, w = images.shape
    win = imageops.taper_window((h, w), _taper_width((h, w), fraction))
    out = images - images.mean(axis=(1, 2), dtype=np.float64, keepdims=True).astype(np.float32)
    out *= win
    return out


def _taper_width(shape: tuple[int, int], fraction: float) -> float:
    return fraction * min(shape)


@dataclass(frozen=True)
class _Frame:
    """The aligned frame of a pair: rotation ``phi``, box shape, and where the untapered raw data lies.

    ``raw_shape`` is the binned view's shape and ``margin`` the width of its
    edge taper: a point of the aligned frame carries full-weight data when its
    raw position lies at least ``margin`` inside the raw borders.
    """

    phi: float
    shape: tuple[int, int]
    raw_shape: tuple[int, int]
    margin: float

    @classmethod
    def for_pair(cls, raw_shape: tuple[int, int], phi: float, stretch: float, fraction: float) -> _Frame:
        return cls(float(phi), _aligned_shape(raw_shape, phi, max(stretch, 1.0)), tuple(raw_shape), _taper_width(raw_shape, fraction))

    def matrix(self, stretch: float) -> np.ndarray:
        """Aligned (stretched) to raw coordinates: ``p = R(phi) diag(1 / stretch, 1) q``."""
        return rotation_2d(self.phi) @ np.diag([1.0 / stretch, 1.0])

    def resample(self, image: np.ndarray, stretch: float) -> np.ndarray:
        """``out(q) = image(R(phi) diag(1/stretch, 1) q)``: the aligned frame, stretched across the axis.

        With a Geometry of rotation ``phi``, unit magnification and zero shift
        this is :func:`simtomo.transforms.view_to_aligned` followed by the
        stretch, in one (bilinear) interpolation.
        """
        return imageops.affine_resample(image, self.matrix(stretch), np.zeros(2), self.shape, order=1, cval=0.0)

    def inside(self, corners_rc: np.ndarray, size: int, stretch: float) -> np.ndarray:
        """Whether each ``size`` patch at top-left ``corners_rc`` lies wholly on untapered raw data."""
        ho, wo = self.shape
        h, w = self.raw_shape
        x0 = corners_rc[:, 1] - (wo - 1) / 2.0
        y0 = corners_rc[:, 0] - (ho - 1) / 2.0
        m = self.matrix(stretch)
        ok = np.ones(len(corners_rc), dtype=bool)
        for dx in (0.0, size - 1.0):
            for dy in (0.0, size - 1.0):
                px = m[0, 0] * (x0 + dx) + m[0, 1] * (y0 + dy)
                py = m[1, 0] * (x0 + dx) + m[1, 1] * (y0 + dy)
                ok &= (np.abs(px) <= (w - 1) / 2.0 - self.margin) & (np.abs(py) <= (h - 1) / 2.0 - self.margin)
        return ok


def _aligned_shape(shape: tuple[int, int], phi_deg: float, stretch: float) -> tuple[int, int]:
    """The aligned-frame box holding a whole raw view rotated by ``phi`` and stretched across the axis."""
    h, w = shape
    c, s = abs(np.cos(np.deg2rad(phi_deg))), abs(np.sin(np.deg2rad(phi_deg)))
    wa = stretch * (w * c + h * s)
    ha = w * s + h * c
    return (int(np.ceil(ha / 2.0)) * 2, int(np.ceil(wa / 2.0)) * 2)


def _grid_corners(shape: tuple[int, int], size: int, step: int) -> np.ndarray:
    """Top-left corners (row, col) of a grid of patches centred in the box."""
    h, w = shape
    nr = (h - size) // step + 1
    nc = (w - size) // step + 1
    r0 = (h - size - (nr - 1) * step) // 2
    c0 = (w - size - (nc - 1) * step) // 2
    r, c = np.meshgrid(r0 + step * np.arange(nr), c0 + step * np.arange(nc), indexing="ij")
    return np.stack([r.ravel(), c.ravel()], axis=1)


def _patch_pairs(
    ref: np.ndarray,
    tgt: np.ndarray,
    offset_xy: np.ndarray,
    size: int,
    step: int,
    frame: _Frame,
    k_ref: float,
    k_tgt: float,
    fraction_xy: np.ndarray | None = None,
):
    """Grid patches of ``ref`` and the patches of ``tgt`` displaced by the integer ``offset_xy``.

    Only patch pairs lying wholly on untapered data in both images are kept:
    a patch that straddles the taper sees the data's edge, a feature that is
    not part of the specimen. With ``fraction_xy`` the target patches are
    moved back by that sub-pixel offset (before tapering), so that content
    displaced by ``offset_xy + fraction_xy`` is found at zero shift: the
    correlation of two tapered windows pulls a peak toward zero shift in
    proportion to its distance from it.

    Returns (patches_ref, patches_tgt, centres_xy (m, 2) in centred coordinates of ``ref``), float32,
    each patch mean-free and tapered.
    """
    h, w = ref.shape
    ca = _grid_corners((h, w), size, step)
    cb = ca + np.array([offset_xy[1], offset_xy[0]], dtype=int)
    keep = (cb.min(axis=1) >= 0) & (cb[:, 0] + size <= h) & (cb[:, 1] + size <= w)
    keep &= frame.inside(ca, size, k_ref) & frame.inside(cb, size, k_tgt)
    ca, cb = ca[keep], cb[keep]
    window = imageops.taper_window((size, size), size / 4.0)
    pa = imageops.extract_patches(ref, ca, size)
    pb = imageops.extract_patches(tgt, cb, size)
    if fraction_xy is not None and len(pb) and np.any(fraction_xy != 0):
        pb = imageops.fourier_shift(pb, -np.asarray(fraction_xy, dtype=float)).astype(np.float32)
    pa -= pa.mean(axis=(1, 2), keepdims=True)
    pb -= pb.mean(axis=(1, 2), keepdims=True)
    pa *= window
    pb *= window
    centres = np.stack([ca[:, 1] + (size - 1) / 2.0 - (w - 1) / 2.0, ca[:, 0] + (size - 1) / 2.0 - (h - 1) / 2.0], axis=1)
    return pa, pb, centres


# --------------------------------------------------------------------------- #
# Coarse alignment
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, eq=False)
class CoarseResult:
    """The outcome of :func:`coarse_align`.

    Parameters
    ----------
    geometry : Geometry
        Nominal tilts, ``rot_deg`` = the tilt-axis angle used, magnification 1,
        and the cumulated shifts (reference view at 0, see the module notes on the gauge).
    peak_correlation : (n,) array
        Normalised peak height (correlation coefficient of the band-passed,
        stretched images) of each view's correlation with its neighbour; NaN
        for the reference view.
    significance : (n,) array
        Each peak's height over the robust spread of its correlation map; NaN for the reference.
    shift_pairwise : (n, 2) array
        Raw-frame shift of each view relative to its neighbour, ``t_i - t_neighbour``,
        unbinned pixels; 0 for the reference.
    neighbour : (n,) int array
        The view each view was correlated with (-1 for the reference).
    reliable : (n,) bool array
        Whether the view's correlation passed the significance test (True for
        the reference). An unreliable view keeps its neighbour's shift.
    reference_view : int
        The view whose shift is 0.
    binning : int
        Binning at which the correlations were computed.
    """

    geometry: Geometry
    peak_correlation: np.ndarray
    significance: np.ndarray
    shift_pairwise: np.ndarray
    neighbour: np.ndarray
    reliable: np.ndarray
    reference_view: int
    binning: int


def coarse_align(
    stack,
    tilt_deg: np.ndarray,
    tilt_axis_deg: float,
    *,
    pixel_size_A: float = 1.0,
    binning: int | None = None,
    target_size: int = 512,
    lowpass: float = 0.25,
    highpass: float = 0.03,
    taper_fraction: float = 0.1,
    max_shift_fraction: float = 0.25,
    local_patch_size: int = 48,
    local_max_shift: int = 8,
    reference_view: int | None = None,
    min_significance: float = 8.0,
    min_reliable_fraction: float = 0.5,
) -> CoarseResult:
    """Shifts of every view by stretched cross-correlation with its neighbour toward zero tilt.

    Views are processed in tilt order, outward from the reference view. Both
    views of a pair are resampled into the aligned frame (tilt axis vertical,
    rotation ``tilt_axis_deg``), the higher-tilt one stretched across the axis
    by ``cos(theta_neighbour) / cos(theta_view)`` so that a thin specimen looks
    the same in both; the band-passed images are correlated and the peak is
    refined to sub-pixel precision. The whole-image peak locates the pair to
    within a few pixels; with ``local_patch_size`` the pair's shift is then the
    median of the shifts of overlapping patches around it (robust against a
    few strong features dominating the whole-image peak). If the aligned-frame
    shifts are ``u = R(phi)^-1 t``, the measured displacement is
    ``d = (k u_i,x - u_j,x, u_i,y - u_j,y)`` with ``k`` the stretch, so
    ``u_i = ((d_x + u_j,x) / k, d_y + u_j,y)``, cumulated outward.

    Parameters
    ----------
    stack : (n, h, w) array of counts, or BinnedStack
        The views (any order; the tilt angles give the order).
    tilt_deg : (n,) array
        Nominal tilt of each view, degrees.
    tilt_axis_deg : float
        In-plane tilt-axis angle ``phi`` (DESIGN.md section 3), degrees.
    pixel_size_A : float
        Written into the returned Geometry.
    binning : int, optional
        Binning of the correlations; default: the factor bringing the larger side
        closest to ``target_size``.
    target_size : int
        Size aimed at by the automatic binning, px.
    lowpass : float
        Pass-band edge, cycles per binned pixel (Gaussian roll-off of 0.05 above).
    highpass : float
        Sigma of the Gaussian high-pass, cycles per binned pixel.
    taper_fraction : float
        Width of the cosine edge taper as a fraction of the binned view's smaller side.
    max_shift_fraction : float
        Largest shift between neighbouring views searched, as a fraction of the
        aligned frame's larger side.
    local_patch_size : int
        Side of the local patches (binned px, half-overlapping, wholly on
        untapered data) whose median shift refines each pair; 0 disables.
    local_max_shift : int
        Search radius of the patch correlations around the whole-image peak, binned px.
    reference_view : int, optional
        Index of the view whose shift is 0; default the view of smallest |tilt|.
    min_significance : float
        A pair is reliable when its peak stands this many robust standard
        deviations above its correlation map (unrelated images stay below ~6).
    min_reliable_fraction : float
        Fewest reliable pairs, as a fraction of all pairs, for a result.

    Returns
    -------
    CoarseResult

    Raises
    ------
    AlignmentError
        "correlation too low" when fewer than ``min_reliable_fraction`` of the
        pairs correlate significantly (e.g. a stack of pure noise).
    ConfigError
        For malformed input.
    """
    prepared = _prepare(stack, binning, target_size)
    images = prepared.images
    n, hb, wb = images.shape
    tilt = _check_tilts(tilt_deg, n)
    phi = _check_angle("tilt_axis_deg", tilt_axis_deg)
    _check_positive("pixel_size_A", pixel_size_A)
    _check_fraction("taper_fraction", taper_fraction, upper=0.5)
    _check_fraction("max_shift_fraction", max_shift_fraction, upper=1.0)
    _check_fraction("min_reliable_fraction", min_reliable_fraction, upper=1.0, allow_zero=True)
    if local_patch_size != 0 and not 16 <= local_patch_size <= min(hb, wb):
        raise ConfigError(f"local_patch_size: expected 0 (off) or 16..{min(hb, wb)} binned px, got {local_patch_size!r}")
    if local_max_shift < 1:
        raise ConfigError(f"local_max_shift: expected >= 1 binned px, got {local_max_shift!r}")
    order = np.argsort(tilt, kind="stable")
    if reference_view is None:
        ref = int(np.argmin(np.abs(tilt)))
    else:
        if isinstance(reference_view, bool) or not float(reference_view).is_integer() or not 0 <= reference_view < n:
            raise ConfigError(f"reference_view: expected a view index in [0, {n - 1}], got {reference_view!r}")
        ref = int(reference_view)
    rank = int(np.flatnonzero(order == ref)[0])
    cos_t = np.cos(np.deg2rad(tilt))
    pre = _pretaper(images, taper_fraction)

    settings = dict(
        phi=phi, lowpass=lowpass, highpass=highpass, max_shift_fraction=max_shift_fraction, taper_fraction=taper_fraction,
        local_patch_size=local_patch_size, local_max_shift=local_max_shift, min_significance=min_significance,
    )
    # Each view with its neighbour toward the reference, walking outward.
    pairs = [(order[r], order[r - 1]) for r in range(rank + 1, n)] + [(order[r], order[r + 1]) for r in range(rank - 1, -1, -1)]
    u = np.zeros((n, 2))  # aligned-frame shifts, binned px
    peak = np.full(n, np.nan)
    signif = np.full(n, np.nan)
    neighbour = np.full(n, -1, dtype=int)
    reliable = np.ones(n, dtype=bool)
    for i, j in pairs:
        meas = _measure_pair(pre, cos_t, i, j, **settings)
        neighbour[i] = j
        peak[i], signif[i], reliable[i] = meas.peak, meas.significance, meas.reliable
        if meas.reliable:
            u[i] = ((meas.shift[0] + u[j, 0]) / meas.stretch, meas.shift[1] + u[j, 1])
        else:  # no trustworthy measurement: assume the view did not move relative to its neighbour
            u[i] = u[j]
    n_pairs = len(pairs)
    n_ok = int(reliable[[i for i, _ in pairs]].sum()) if pairs else 0
    if n_pairs and n_ok < max(1, int(np.ceil(min_reliable_fraction * n_pairs))):
        med = float(np.nanmedian(signif)) if np.any(np.isfinite(signif)) else float("nan")
        raise AlignmentError(
            f"correlation too low: only {n_ok} of {n_pairs} neighbouring view pairs correlate significantly "
            f"(peak >= {min_significance:g} robust sd above its map; median {med:.1f}); "
            "the views share no structure at this binning and band-pass"
        )
    if n_ok < n_pairs:
        log.warning("coarse_align: %d of %d neighbouring view pairs did not correlate significantly; "
                    "those views keep their neighbour's shift", n_pairs - n_ok, n_pairs)
    b = prepared.binning
    rot = rotation_2d(phi)
    shift = (u * b) @ rot.T
    pairwise = np.zeros((n, 2))
    for i, j in pairs:
        pairwise[i] = shift[i] - shift[j]
    geometry = Geometry.nominal(tilt, prepared.image_shape, pixel_size_A, rot_deg=phi).replace(shift_px=shift)
    return CoarseResult(
        geometry=geometry,
        peak_correlation=peak,
        significance=signif,
        shift_pairwise=pairwise,
        neighbour=neighbour,
        reliable=reliable,
        reference_view=ref,
        binning=b,
    )


@dataclass(frozen=True)
class _PairMeasurement:
    shift: np.ndarray  # (dx, dy) of the stretched view relative to the other, aligned frame, binned px
    stretch: float
    peak: float
    significance: float
    reliable: bool


def _measure_pair(
    pre: np.ndarray,
    cos_t: np.ndarray,
    i: int,
    j: int,
    *,
    phi: float,
    lowpass: float,
    highpass: float,
    max_shift_fraction: float,
    taper_fraction: float,
    local_patch_size: int,
    local_max_shift: int,
    min_significance: float,
) -> _PairMeasurement:
    """Correlate view ``i`` (stretched by ``cos_j / cos_i``) with view ``j`` in the aligned frame."""
    k = float(cos_t[j] / cos_t[i])
    frame = _Frame.for_pair(pre.shape[1:], phi, k, taper_fraction)
    ref_img = frame.resample(pre[j], 1.0)
    tgt_img = frame.resample(pre[i], k)
    max_shift = max(2.0, max_shift_fraction * max(frame.shape))
    local = local_patch_size > 0
    glob = imageops.correlate_stack(
        ref_img[None], tgt_img[None], max_shift=max_shift, lowpass=lowpass, highpass=highpass,
        subpixel="parabolic" if local else "dft",
    )
    if not glob.valid[0]:
        return _PairMeasurement(np.zeros(2), k, float("nan"), float("nan"), False)
    d = glob.shift[0]
    sig = float(glob.significance[0])
    reliable = sig >= min_significance
    if reliable and local:
        refined = _local_median_shift(ref_img, tgt_img, d, frame, k, local_patch_size, local_max_shift, lowpass, highpass)
        if refined is None:  # too few patches: the whole-image peak, refined properly
            d = imageops.correlate_stack(
                ref_img[None], tgt_img[None], max_shift=max_shift, lowpass=lowpass, highpass=highpass, subpixel="dft"
            ).shift[0]
        else:
            d = refined
    return _PairMeasurement(np.asarray(d, dtype=float), k, float(glob.peak[0]), sig, bool(reliable))


def _local_median_shift(
    ref_img: np.ndarray,
    tgt_img: np.ndarray,
    d: np.ndarray,
    frame: _Frame,
    stretch: float,
    size: int,
    max_shift: int,
    lowpass: float,
    highpass: float,
) -> np.ndarray | None:
    """Median shift of half-overlapping patches around the whole-image shift ``d``; None if too few correlate.

    The target patches are cut at ``d`` to sub-pixel precision (the tapered
    windows pull each peak toward the offset they were cut at, in proportion
    to the remaining distance). On a synthetic thin specimen this brings the
    pairwise error from ~0.1 px (cut at the nearest integer) to < 0.01 px.
    """
    offset = np.round(d).astype(int)
    fraction = np.asarray(d, dtype=float) - offset
    pa, pb, _ = _patch_pairs(ref_img, tgt_img, offset, size, max(size // 2, 1), frame, 1.0, stretch, fraction)
    if len(pa) < 3:
        return None
    res = imageops.correlate_stack(pa, pb, max_shift=max_shift, lowpass=lowpass, highpass=highpass, subpixel="dft")
    # A patch counts when its peak stands out of the noise and lies inside the search window.
    good = res.valid & (res.significance >= LOCAL_MIN_SIGNIFICANCE) & np.all(np.abs(res.shift) < max_shift - 1, axis=1)
    if good.sum() < max(3, int(np.ceil(len(pa) / 3.0))):
        return None
    return np.median(res.shift[good], axis=0) + offset + fraction


def _check_positive(name: str, value) -> None:
    if not (isinstance(value, (int, float, np.floating, np.integer)) and np.isfinite(value) and value > 0):
        raise ConfigError(f"{name}: expected a positive number, got {value!r}")


def _check_fraction(name: str, value, *, upper: float, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float, np.floating, np.integer)) and np.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0) and value <= upper
    if not ok:
        raise ConfigError(f"{name}: expected a number in {'[' if allow_zero else '('}0, {upper}], got {value!r}")


# --------------------------------------------------------------------------- #
# Tilt-axis angle
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, eq=False)
class TiltAxisResult:
    """The outcome of :func:`find_tilt_axis`.

    Parameters
    ----------
    angle_deg : float
        Estimated in-plane tilt-axis angle ``phi`` (DESIGN.md section 3), within
        ``search_deg`` of the start (in (-90, 90] without a start).
    score_curve : (k, 2) array
        ``(trial angle, misfit)`` of the last pass: the robust misfit of the
        patch displacements' components along the trial axis (lower is better);
        its minimum is the estimate.
    uncertainty_deg : float
        Approximate standard error from the misfit's curvature at the minimum,
        as if patch errors were independent and Gaussian (NaN when the minimum
        is not a clean parabola). Content that is not point-like (filaments,
        membranes) adds errors it does not count.
    n_pairs : int
        View pairs that entered the final fit.
    n_patches : int
        Patch displacements that entered the final fit.
    passes : int
        Measurement passes made (each re-measures at the previous estimate).
    binning : int
        Binning at which patches were correlated.
    """

    angle_deg: float
    score_curve: np.ndarray
    uncertainty_deg: float
    n_pairs: int
    n_patches: int
    passes: int
    binning: int


#: Cauchy loss scale of the axis fit, in robust standard deviations of the
#: along-axis residuals (2.4 keeps ~95 % efficiency for Gaussian errors while
#: a wrong patch match counts as little as a few ordinary ones).
AXIS_CAUCHY_SCALE = 2.4

#: Patches whose band-passed content is more line-like than this
#: (:func:`aligners.imageops.spectral_anisotropy`) are left out of the axis fit.
AXIS_MAX_ANISOTROPY = 0.3


def _axis_pairs(tilt: np.ndarray, separation, max_abs_tilt: float | None) -> list[tuple[int, int]]:
    """Pairs (reference, other) about ``separation`` degrees apart (one value or several); the reference has the smaller |tilt|."""
    if np.ndim(separation) > 0:
        return [p for sep in separation for p in _axis_pairs(tilt, float(sep), max_abs_tilt)]
    order = np.argsort(tilt, kind="stable")
    ts = tilt[order]
    pairs = []
    for a in range(len(ts)):
        target = ts[a] + separation
        b = int(np.argmin(np.abs(ts - target)))
        if b == a or abs(ts[b] - target) > 0.5 * separation:
            continue
        if max_abs_tilt is not None and max(abs(ts[a]), abs(ts[b])) > max_abs_tilt:
            continue
        i, j = int(order[a]), int(order[b])
        pairs.append((i, j) if abs(tilt[i]) <= abs(tilt[j]) else (j, i))
    return pairs


@dataclass(frozen=True, eq=False)
class _PatchData:
    """Patch displacements of every pair, padded to a common length."""

    pos: np.ndarray  # (p, m, 2) patch centres, centred aligned-frame coordinates
    disp: np.ndarray  # (p, m, 2) displacements
    present: np.ndarray  # (p, m) bool


def _measure_axis_data(
    pre: np.ndarray,
    tilt: np.ndarray,
    pairs: list[tuple[int, int]],
    phi0: float,
    *,
    stretch: bool,
    patch_size: int,
    patch_step: int,
    patch_max_shift: int,
    lowpass: float,
    highpass: float,
    taper_fraction: float,
    min_significance: float,
) -> tuple[_PatchData, int]:
    """Correlate every pair in the ``phi0`` aligned frame, then its point-like patches around the whole-image shift.

    Returns the patch data of the pairs with enough usable patches and the
    number of pairs whose whole-image correlation was significant.
    """
    cos_t = np.cos(np.deg2rad(tilt))
    ks = [float(cos_t[j] / cos_t[i]) if stretch else 1.0 for j, i in pairs]  # i has the higher |tilt|: k >= 1
    frame = _Frame.for_pair(pre.shape[1:], phi0, max(ks), taper_fraction)
    refs = np.stack([frame.resample(pre[j], 1.0) for j, _ in pairs])
    tgts = np.stack([frame.resample(pre[i], k) for (_, i), k in zip(pairs, ks)])
    glob = imageops.correlate_stack(
        refs, tgts, max_shift=max(frame.shape) / 3.0, lowpass=lowpass, highpass=highpass, subpixel="none", chunk=16
    )
    significant = glob.valid & (glob.significance >= min_significance)
    pa_all, pb_all, pos_all, owner, offsets = [], [], [], [], []
    for p in np.flatnonzero(significant):
        off = np.round(glob.shift[p]).astype(int)
        pa, pb, centres = _patch_pairs(refs[p], tgts[p], off, patch_size, patch_step, frame, 1.0, ks[p])
        if len(pa) == 0:
            continue
        # Line-like content (filaments, membranes) fixes a shift only across the line; where it
        # dominates a patch, the peak slides along the line by an amount tied to the parallax,
        # which biases the fit. Keep the point-like patches.
        point_like = np.maximum(
            imageops.spectral_anisotropy(pa, lowpass=lowpass, highpass=highpass),
            imageops.spectral_anisotropy(pb, lowpass=lowpass, highpass=highpass),
        ) <= AXIS_MAX_ANISOTROPY
        pa_all.append(pa[point_like])
        pb_all.append(pb[point_like])
        pos_all.append(centres[point_like])
        owner.append(np.full(int(point_like.sum()), p))
        offsets.append(np.broadcast_to(off, (int(point_like.sum()), 2)))
    n_patches = sum(len(x) for x in pa_all)
    if n_patches == 0:
        return _PatchData(np.zeros((0, 0, 2)), np.zeros((0, 0, 2)), np.zeros((0, 0), dtype=bool)), int(significant.sum())
    res = imageops.correlate_stack(
        np.concatenate(pa_all), np.concatenate(pb_all), max_shift=patch_max_shift,
        lowpass=lowpass, highpass=highpass, subpixel="dft",
    )
    owner_a = np.concatenate(owner)
    pos_a = np.concatenate(pos_all)
    disp_a = res.shift + np.concatenate(offsets)
    good = res.valid & (res.significance >= 5.0) & np.all(np.abs(res.shift) < patch_max_shift - 1, axis=1)
    groups = [np.flatnonzero(good & (owner_a == p)) for p in np.unique(owner_a)]
    groups = [g for g in groups if len(g) >= 6]  # a pair needs more points than its 3 nuisance terms
    m = max((len(g) for g in groups), default=0)
    pos = np.zeros((len(groups), m, 2))
    disp = np.zeros((len(groups), m, 2))
    present = np.zeros((len(groups), m), dtype=bool)
    for r, g in enumerate(groups):
        pos[r, : len(g)] = pos_a[g]
        disp[r, : len(g)] = disp_a[g]
        present[r, : len(g)] = True
    return _PatchData(pos, disp, present), int(significant.sum())


def _axis_design(data: _PatchData) -> np.ndarray:
    """Per-pair nuisance terms of the along-axis component: 1, x / 100, y / 100 (p, m, 3)."""
    pos = data.pos
    return np.stack([np.ones(pos.shape[:2]), pos[..., 0] / 100.0, pos[..., 1] / 100.0], axis=-1)


def _fit_nuisance(x: np.ndarray, y: np.ndarray, wts: np.ndarray) -> np.ndarray:
    """Residuals of the per-pair weighted least-squares fit of ``y`` on the design ``x``."""
    a = np.einsum("pm,pmi,pmj->pij", wts, x, x) + 1e-9 * np.eye(3)
    coef = np.linalg.solve(a, np.einsum("pm,pmi,pm->pi", wts, x, y)[..., None])[..., 0]
    return y - np.einsum("pmi,pi->pm", x, coef)


def _axis_misfit(data: _PatchData, deltas_deg: np.ndarray, scale: float, iterations: int = 6) -> np.ndarray:
    """Robust misfit of the displacement components along trial axes ``phi0 + delta``.

    Per pair, the component along the axis is explained by a constant (the
    pair's shift), a term linear in the position across the axis (relative
    rotation of the two views, or a stretch applied along a slightly wrong
    direction) and one linear in the position along it (relative
    magnification); what remains is summed as Cauchy losses
    ``log(1 + (r / c)^2)`` with ``c = AXIS_CAUCHY_SCALE * scale``, fitted by
    iteratively reweighted least squares.
    """
    x = _axis_design(data)
    w0 = data.present.astype(float)
    c2 = (AXIS_CAUCHY_SCALE * scale) ** 2
    out = np.empty(len(deltas_deg))
    for t, delta in enumerate(np.deg2rad(deltas_deg)):
        y = data.disp[..., 1] * np.cos(delta) - data.disp[..., 0] * np.sin(delta)  # component along the trial axis
        wts = w0
        for _ in range(iterations):
            u2 = w0 * _fit_nuisance(x, y, wts) ** 2 / c2
            wts = w0 / (1.0 + u2)
        out[t] = float(np.sum(np.log1p(u2)))
    return out


def _plain_scale(data: _PatchData) -> float:
    """Robust spread (1.4826 MAD) of the along-axis residuals at ``delta = 0``: the noise yardstick."""
    r = _fit_nuisance(_axis_design(data), data.disp[..., 1], data.present.astype(float))[data.present]
    mad = 1.4826 * float(np.median(np.abs(r - np.median(r)))) if r.size else 0.0
    return max(mad, 0.02)


def _minimise_curve(deltas: np.ndarray, cost: np.ndarray) -> tuple[float, float]:
    """Minimum of a sampled cost: the grid minimum refined by a parabola through its neighbours.

    Returns (delta at the minimum, curvature d2cost/ddelta2 there, or NaN).
    """
    k = int(np.argmin(cost))
    lo, hi = max(k - 3, 0), min(k + 4, len(deltas))
    if hi - lo < 3:
        return float(deltas[k]), float("nan")
    a, b, _ = np.polyfit(deltas[lo:hi] - deltas[k], cost[lo:hi], 2)
    if a <= 0:
        return float(deltas[k]), float("nan")
    vertex = -b / (2.0 * a)
    step = deltas[1] - deltas[0]
    if abs(vertex) > 1.5 * step:
        return float(deltas[k]), 2.0 * a
    return float(deltas[k] + vertex), 2.0 * a


def find_tilt_axis(
    stack,
    tilt_deg: np.ndarray,
    *,
    start_deg: float | None = None,
    search_deg: float = 10.0,
    binning: int | None = None,
    target_size: int = 256,
    pair_separation_deg: float | tuple[float, ...] = (16.0, 24.0),
    patch_size: int = 48,
    patch_step: int = 24,
    patch_max_shift: int = 24,
    lowpass: float = 0.3,
    highpass: float = 0.03,
    taper_fraction: float = 0.1,
    grid_step_deg: float = 0.25,
    max_passes: int = 3,
    tolerance_deg: float = 0.05,
    min_significance: float = 8.0,
    min_reliable_fraction: float = 0.5,
) -> TiltAxisResult:
    """Estimate the in-plane tilt-axis angle from the parallax of the specimen's depth.

    Tilting moves content at different depths *across* the axis by different
    amounts and never along it. For view pairs about ``pair_separation_deg``
    apart, brought into the aligned frame of a trial angle (the higher tilt
    stretched across the axis), the displacements of local point-like patches
    are measured; at the right angle they spread along one direction,
    perpendicular to the axis, and agree along it. For each trial angle the
    displacement components along the trial axis are fitted per pair by a
    shift plus terms linear in position (which absorb per-view rotation and
    magnification drift and a stretch along a slightly wrong direction); the
    robust misfit over all pairs is minimised on a grid of trial angles and
    refined by a parabola. The patches are re-measured at the estimate until
    it moves less than ``tolerance_deg``.

    Limits: the estimate needs depth, i.e. content spread over a specimen
    thickness of tens of pixels; for a thin specimen the axis cannot be told
    from per-view rotation and the reported uncertainty grows. Line-like
    patches are excluded (see :data:`AXIS_MAX_ANISOTROPY`), but a specimen
    dominated by filaments or membranes leaves few patches. On the
    ``standard-nobeads`` workload (seeds 0-3) the error is a few tenths of a
    degree (see tests/test_coarse.py and the benchmarks).

    Parameters
    ----------
    stack : (n, h, w) array of counts, or BinnedStack
    tilt_deg : (n,) array
        Nominal tilts, degrees.
    start_deg : float, optional
        Starting angle (e.g. the microscope's nominal value); the answer lies
        within ``search_deg`` of it. None: a first pass searches all 180 degrees
        on views within +-40 degrees of zero tilt, without stretching.
    search_deg : float
        Half-width of the searched range around the start, degrees (<= 90).
    binning : int, optional
        Binning of the patch correlations; default brings the larger side near ``target_size``.
    target_size : int
        Size aimed at by the automatic binning, px.
    pair_separation_deg : float
        Tilt difference of the paired views (larger: more parallax, less similar images).
    patch_size, patch_step, patch_max_shift : int
        Patch side, grid step and search radius, binned px.
    lowpass, highpass : float
        Band-pass of the correlations, cycles per binned pixel.
    taper_fraction : float
        Cosine edge taper of the views, fraction of the smaller side.
    grid_step_deg : float
        Spacing of the trial angles.
    max_passes : int
        Most measurement passes.
    tolerance_deg : float
        A pass whose estimate moves less than this ends the iteration.
    min_significance : float
        Whole-image correlation significance for a pair to be used.
    min_reliable_fraction : float
        Fewest significant pairs, as a fraction of all pairs, for a result.

    Returns
    -------
    TiltAxisResult

    Raises
    ------
    AlignmentError
        "correlation too low" when too few pairs correlate (e.g. pure noise),
        or when too few patches are left to fit.
    ConfigError
        For malformed input.
    """
    prepared = _prepare(stack, binning, target_size)
    images = prepared.images
    n = images.shape[0]
    tilt = _check_tilts(tilt_deg, n)
    if start_deg is not None:
        start_deg = _check_angle("start_deg", start_deg)
    if not (isinstance(search_deg, (int, float, np.integer, np.floating)) and 0 < search_deg <= 90):
        raise ConfigError(f"search_deg: expected a half-width in (0, 90] degrees, got {search_deg!r}")
    seps = np.atleast_1d(np.asarray(pair_separation_deg, dtype=float))
    if seps.ndim != 1 or seps.size == 0 or not np.all(np.isfinite(seps) & (seps > 0)):
        raise ConfigError(f"pair_separation_deg: expected one or more positive tilt differences, got {pair_separation_deg!r}")
    _check_positive("grid_step_deg", grid_step_deg)
    _check_fraction("taper_fraction", taper_fraction, upper=0.5)
    _check_fraction("min_reliable_fraction", min_reliable_fraction, upper=1.0, allow_zero=True)
    if isinstance(max_passes, bool) or not isinstance(max_passes, (int, np.integer)) or max_passes < 1:
        raise ConfigError(f"max_passes: expected an integer >= 1, got {max_passes!r}")
    if not (8 <= patch_size <= min(images.shape[1:]) and 1 <= patch_step and 1 <= patch_max_shift):
        raise ConfigError(
            f"patch_size / patch_step / patch_max_shift: expected 8 <= size <= {min(images.shape[1:])} (binned view), "
            f"step >= 1 and max shift >= 1, got {patch_size}, {patch_step}, {patch_max_shift}"
        )
    sep_text = "/".join(f"{v:g}" for v in seps)
    pre = _pretaper(images, taper_fraction)
    measure = dict(
        patch_size=patch_size, patch_step=patch_step, patch_max_shift=patch_max_shift,
        lowpass=lowpass, highpass=highpass, taper_fraction=taper_fraction, min_significance=min_significance,
    )

    def run_pass(phi0: float, pairs, stretch: bool, deltas: np.ndarray):
        data, n_sig = _measure_axis_data(pre, tilt, pairs, phi0, stretch=stretch, **measure)
        need = max(2, int(np.ceil(min_reliable_fraction * len(pairs))))
        if n_sig < need:
            raise AlignmentError(
                f"correlation too low: only {n_sig} of {len(pairs)} view pairs {sep_text} degrees apart "
                f"correlate significantly (>= {min_significance:g} robust sd); cannot find the tilt axis"
            )
        n_patches = int(data.present.sum())
        if data.present.shape[0] < 2 or n_patches < 30:
            raise AlignmentError(
                f"correlation too low: only {n_patches} point-like patches in {data.present.shape[0]} view pairs "
                "correlate; cannot find the tilt axis"
            )
        cost = _axis_misfit(data, deltas, _plain_scale(data))
        delta, curvature = _minimise_curve(deltas, cost)
        sigma = float(np.sqrt(2.0 / curvature) / AXIS_CAUCHY_SCALE) if np.isfinite(curvature) and curvature > 0 else float("nan")
        curve = np.stack([phi0 + deltas, cost], axis=1)
        return phi0 + delta, sigma, curve, data.present.shape[0], n_patches

    passes = 0
    if start_deg is None:
        # Without a start the stretch direction is unknown: a first pass at phi0 = 0
        # without stretching, on low tilts where the cosine stretch is small.
        pairs0 = _axis_pairs(tilt, pair_separation_deg, 40.0)
        if len(pairs0) < 2:
            pairs0 = _axis_pairs(tilt, pair_separation_deg, None)
        phi, _, _, _, _ = run_pass(0.0, pairs0, False, np.arange(-90.0, 90.0, 1.0))
        passes += 1
        start = _wrap_half_turn(phi)
    else:
        start = float(start_deg)
    search = float(search_deg)
    pairs = _axis_pairs(tilt, pair_separation_deg, None)
    if len(pairs) < 2:
        raise ConfigError(
            f"pair_separation_deg: {pair_separation_deg:g} degrees leaves fewer than 2 view pairs in the tilt range "
            f"{tilt.min():.1f}..{tilt.max():.1f}"
        )
    phi0 = start
    for _ in range(max_passes):
        # Trial angles stay within the search range around the start.
        lo = max(start - search, phi0 - search) - phi0
        hi = min(start + search, phi0 + search) - phi0
        deltas = np.arange(np.floor(lo / grid_step_deg), np.ceil(hi / grid_step_deg) + 1) * grid_step_deg
        phi, sigma, curve, n_pairs, n_patches = run_pass(phi0, pairs, True, deltas)
        passes += 1
        moved = abs(phi - phi0)
        log.info("find_tilt_axis: pass %d at %.3f deg -> %.3f deg (+- %.3f)", passes, phi0, phi, sigma)
        phi0 = phi
        if moved < tolerance_deg:
            break
    angle = float(np.clip(phi0, start - search, start + search))
    if start_deg is None:
        angle = _wrap_half_turn(angle)
    return TiltAxisResult(
        angle_deg=angle,
        score_curve=curve,
        uncertainty_deg=sigma,
        n_pairs=n_pairs,
        n_patches=n_patches,
        passes=passes,
        binning=prepared.binning,
    )


def _wrap_half_turn(angle: float) -> float:
    """The equivalent axis direction in (-90, 90] (an axis and its reverse differ by a tilt-sign flip)."""
    a = (angle + 90.0) % 180.0 - 90.0
    return 90.0 if a == -90.0 else a

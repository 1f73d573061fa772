"""Gold beads: detection, sub-pixel localisation and tracking through a tilt series.

The building blocks of the fiducial aligner, in the spirit of IMOD's beadtrack.
Everything works on line-integral images ``L = -log(counts / mean)`` (see
:func:`log_intensity`), where a gold bead is a POSITIVE blob: the projection
of a uniform sphere of radius ``r`` is ``a * 2 sqrt(r^2 - d^2)`` plus the
background. Coordinates are centred pixel coordinates throughout
(``x = col - (w-1)/2``, ``y = row - (h-1)/2``, DESIGN.md section 3).

- :func:`detect_beads` finds beads with a matched filter: normalised
  cross-correlation (NCC) with :func:`bead_template`, computed with FFTs. A
  candidate must be a local maximum of the filter amplitude that stands out
  from the robust spread of the whole response (median + k * MAD) AND look
  like a bead (NCC above a floor): cellular content reaches neither.
- :func:`refine_center` fits the exact pixel-averaged sphere projection plus
  a linear background (centre, radius, amplitude, background plane) by
  Levenberg-Marquardt, with a closed-form Jacobian. The model is the
  projector's own (to quadrature accuracy), so there is no sampling bias
  (noise-free error ~0.001 px), and under Poisson noise the scatter is within
  ~15 % of the Cramér-Rao bound of the sphere; pixels near other known beads
  are masked.
- :func:`track_beads` follows seed beads from the start view outwards with a
  per-bead 3-D motion model in the aligned frame of a coarse geometry, a
  per-view correction (shift, rotation, scale, tilt) that follows the
  coarse alignment's errors, a local matched-filter search and the sub-pixel
  fit; :func:`retrack` re-finds points where a refined geometry predicts them.

Aligners see images and metadata only: nothing here takes a truth.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numba
import numpy as np
from scipy import fft, ndimage

from simtomo.errors import AlignmentError, ConfigError
from simtomo.geometry import Geometry
from simtomo.imaging import log_intensity

__all__ = [
    "Detections",
    "BeadFit",
    "Tracks",
    "bead_template",
    "ncc_map",
    "detect_beads",
    "estimate_bead_diameter",
    "fit_beads",
    "refine_center",
    "track_beads",
    "retrack",
    "choose_seeds",
]

log = logging.getLogger(__name__)

# Gauss-Legendre nodes on [0, 1] for the x-integration of the sphere model between
# breakpoints (where the integrand is smooth): 5 nodes keep the model within
# 1e-4 of the exact pixel average, far below the effect of photon noise.
_GL = np.polynomial.legendre.leggauss(5)
_NODES = np.ascontiguousarray(_GL[0] / 2.0 + 0.5)
_WEIGHTS = np.ascontiguousarray(_GL[1] / 2.0)

# The fit stops when the centre moves less than this (px): far below photon noise
# (>= 0.03 px at the `standard` dose), and twice as fast as iterating to 1e-4.
_FIT_TOL_PX = 1e-3

# Robust z-score (median + k * 1.4826 MAD of the matched-filter amplitude) a
# bead must exceed, and the NCC floor. On `standard` beads reach z 40-60 and NCC
# ~0.9, cellular content z <= 17 with NCC <= 0.6.
DEFAULT_Z_THRESHOLD = 10.0
DEFAULT_MIN_NCC = 0.7


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True, eq=False)
class Detections:
    """Beads found in one image, strongest first.

    Attributes
    ----------
    xy : (k, 2) array
        Centred image coordinates (x, y), sub-pixel (parabolic peak of the filter).
    score : (k,) array
        Normalised cross-correlation with the bead template at the peak (<= 1).
    amplitude : (k,) array
        Robust z-score of the matched-filter amplitude (how far above the
        image's filter response the bead stands).
    """

    xy: np.ndarray
    score: np.ndarray
    amplitude: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        xy = np.asarray(self.xy, dtype=float).reshape(-1, 2)
        score = np.asarray(self.score, dtype=float).reshape(-1)
        amp = np.full(score.shape, np.nan) if self.amplitude is None else np.asarray(self.amplitude, float).reshape(-1)
        if score.shape[0] != xy.shape[0] or amp.shape != score.shape:
            raise ConfigError(
                f"Detections: {xy.shape[0]} positions but {score.shape[0]} scores / {amp.shape[0]} amplitudes"
            )
        object.__setattr__(self, "xy", xy)
        object.__setattr__(self, "score", score)
        object.__setattr__(self, "amplitude", amp)

    def __len__(self) -> int:
        return self.xy.shape[0]


@dataclass(frozen=True, eq=False)
class BeadFit:
    """Result of the sphere-model fit of :func:`fit_beads`, one entry per bead.

    Attributes
    ----------
    xy : (k, 2) array
        Fitted centres, centred image coordinates (the guess where the fit failed).
    ok : (k,) bool array
        Converged, inside its box, radius and amplitude plausible.
    radius : (k,) array
        Fitted projected radius, pixels.
    amplitude : (k,) array
        Line integral per pixel of path through the bead (peak = 2 * radius * amplitude).
    rms : (k,) array
        RMS residual of the fit over the pixels used.
    sigma_xy : (k, 2) array
        Standard error of the centre from the fit's residual and Jacobian.
    """

    xy: np.ndarray
    ok: np.ndarray
    radius: np.ndarray
    amplitude: np.ndarray
    rms: np.ndarray
    sigma_xy: np.ndarray


@dataclass(frozen=True, eq=False)
class Tracks:
    """Bead positions through a tilt series.

    Attributes
    ----------
    xy : (n, m, 2) array
        Centred image coordinates of bead ``j`` in view ``i``; NaN where not found.
    score : (n, m) array
        NCC with the bead template where found, 0 elsewhere.
    view_offset_px : (n, 2) array
        Per-view shift the tracker found between the coarse geometry's
        prediction and the beads (a by-product: the residual error of the
        coarse alignment, relative to the start view). Zero for :func:`retrack`.
    """

    xy: np.ndarray
    score: np.ndarray
    view_offset_px: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        xy = np.asarray(self.xy, dtype=float)
        if xy.ndim != 3 or xy.shape[2] != 2:
            raise ConfigError(f"Tracks.xy: expected shape (n_views, n_beads, 2), got {xy.shape}")
        score = np.asarray(self.score, dtype=float)
        if score.shape != xy.shape[:2]:
            raise ConfigError(f"Tracks.score: expected shape {xy.shape[:2]}, got {score.shape}")
        off = np.zeros((xy.shape[0], 2)) if self.view_offset_px is None else np.asarray(self.view_offset_px, float)
        if off.shape != (xy.shape[0], 2):
            raise ConfigError(f"Tracks.view_offset_px: expected shape {(xy.shape[0], 2)}, got {off.shape}")
        object.__setattr__(self, "xy", xy)
        object.__setattr__(self, "score", score)
        object.__setattr__(self, "view_offset_px", off)

    @property
    def found(self) -> np.ndarray:
        """(n, m) bool: where a position was found."""
        return np.isfinite(self.xy[..., 0])

    @property
    def n_views(self) -> int:
        return self.xy.shape[0]

    @property
    def n_beads(self) -> int:
        return self.xy.shape[1]


# ----------------------------------------------------------------------------- checks


def _check_diameter(diameter_px: float) -> float:
    try:
        d = float(diameter_px)
    except (TypeError, ValueError):
        raise ConfigError(f"diameter_px: expected a positive number of pixels, got {diameter_px!r}") from None
    if not (math.isfinite(d) and d > 0):
        raise ConfigError(f"diameter_px: expected a positive number of pixels, got {diameter_px!r}")
    return d


def _check_image(image, name: str = "image") -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 2 or min(arr.shape) < 3:
        raise ConfigError(f"{name}: expected a 2-D image of at least 3x3 pixels, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ConfigError(f"{name}: expected a real-valued image, got dtype {arr.dtype}")
    if not np.all(np.isfinite(arr)):
        raise ConfigError(f"{name}: contains NaN or infinite pixels; expected a finite line-integral image")
    return arr


def _check_stack(images, name: str = "images") -> np.ndarray:
    arr = np.asarray(images)
    if arr.ndim != 3 or arr.shape[0] == 0 or min(arr.shape[1:]) < 3:
        raise ConfigError(f"{name}: expected a stack (n_views, h, w), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ConfigError(f"{name}: expected real-valued images, got dtype {arr.dtype}")
    for i in range(arr.shape[0]):
        if not np.all(np.isfinite(arr[i])):
            raise ConfigError(f"{name}: view {i} contains NaN or infinite pixels; expected finite line-integral images")
    return arr


def _check_points(xy, name: str) -> np.ndarray:
    arr = np.asarray(xy, dtype=float)
    if arr.ndim == 1 and arr.size == 2:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ConfigError(f"{name}: expected an (k, 2) array of (x, y) positions, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ConfigError(f"{name}: contains NaN or infinite positions")
    return arr


def _positive(value, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected a positive number, got {value!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise ConfigError(f"{name}: expected a positive number, got {value!r}")
    return v


# ----------------------------------------------------------------------------- images and templates


def _box_half(diameter_px: float) -> int:
    """Half-size of the fit box: the bead plus a ring of background for the plane."""
    return int(math.ceil(diameter_px / 2.0 + max(3.0, 0.25 * diameter_px)))


def bead_template(diameter_px: float, *, blur_px: float = 0.5, size: int | None = None) -> np.ndarray:
    """The projected image of a gold sphere, a positive blob with peak ~1.

    Parameters
    ----------
    diameter_px : float
        Projected bead diameter in pixels.
    blur_px : float
        Sigma of a Gaussian blur (pixels) applied after pixel averaging; a
        little blur makes the matched filter tolerant of sub-pixel offsets.
    size : int, optional
        Odd side of the template; default ``2 * ceil(r + 2) + 1`` (the bead
        and a background ring two pixels wide).

    Returns
    -------
    (size, size) array
        Pixel-averaged ``2 sqrt(r^2 - d^2) / diameter`` centred on the middle pixel.
    """
    d = _check_diameter(diameter_px)
    if blur_px < 0 or not math.isfinite(blur_px):
        raise ConfigError(f"blur_px: expected a blur >= 0 pixels, got {blur_px!r}")
    r = d / 2.0
    if size is None:
        size = 2 * int(math.ceil(r + 2.0)) + 1
    if int(size) != size or size < 3 or size % 2 == 0:
        raise ConfigError(f"size: expected an odd template side >= 3, got {size!r}")
    size = int(size)
    sub = 8
    u = (np.arange(size * sub) + 0.5) / sub - size / 2.0
    xx, yy = np.meshgrid(u, u)
    chord = 2.0 * np.sqrt(np.maximum(r * r - xx * xx - yy * yy, 0.0))
    tpl = chord.reshape(size, sub, size, sub).mean(axis=(1, 3)) / d
    if blur_px > 0:
        tpl = ndimage.gaussian_filter(tpl, blur_px, mode="constant")
    return tpl


def _corr_valid(patches: np.ndarray, template: np.ndarray) -> np.ndarray:
    """Least-squares amplitude of ``template`` (over a constant) at every 'valid' placement in each patch.

    ``patches`` (..., P, Q); result (..., P - s + 1, Q - s + 1), entry [i, j]
    for the template centred on patch pixel [i + s//2, j + s//2].
    """
    s = template.shape[0]
    t0 = template - template.mean()
    energy = float(np.sum(t0 * t0))
    P, Q = patches.shape[-2:]
    shape = (fft.next_fast_len(P, real=True), fft.next_fast_len(Q, real=True))
    spec = fft.rfft2(patches, s=shape, axes=(-2, -1))
    kern = fft.rfft2(t0[::-1, ::-1], s=shape)
    full = fft.irfft2(spec * kern, s=shape, axes=(-2, -1))
    return full[..., s - 1 : P, s - 1 : Q] / energy


def _ncc_at(patches: np.ndarray, template: np.ndarray, r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """NCC of ``template`` with window [r, c] (top-left, template-sized) of each patch (k, P, Q)."""
    s = template.shape[0]
    k = patches.shape[0]
    win = np.lib.stride_tricks.sliding_window_view(patches, (s, s), axis=(1, 2))[np.arange(k), r, c]
    t0 = (template - template.mean()).ravel()
    win = win.reshape(k, -1)
    win = win - win.mean(axis=1, keepdims=True)
    den = np.sqrt(np.sum(win * win, axis=1) * float(t0 @ t0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, win @ t0 / den, 0.0)


def _image_spectrum(img: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    shape = (fft.next_fast_len(img.shape[0], real=True), fft.next_fast_len(img.shape[1], real=True))
    return fft.rfft2(img, s=shape), shape


def _ncc_full(img: np.ndarray, spectrum, template: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NCC and amplitude maps over a whole image from its (padded) spectrum; invalid border left as is."""
    s = template.shape[0]
    k = s // 2
    spec, shape = spectrum
    t0 = template - template.mean()
    energy = float(np.sum(t0 * t0))
    # template centred on the origin: the product gives the correlation at each centre pixel
    kern = np.zeros(shape)
    kern[:s, :s] = t0
    kern = np.roll(kern, (-k, -k), axis=(0, 1))
    h, w = img.shape
    corr = fft.irfft2(spec * np.conj(fft.rfft2(kern)), s=shape)[:h, :w]
    n = s * s
    s1 = ndimage.uniform_filter(img, s, mode="constant") * n
    s2 = ndimage.uniform_filter(img * img, s, mode="constant") * n
    var = np.maximum(s2 - s1 * s1 / n, 1e-12 * n)
    return corr / np.sqrt(var * energy), corr / energy


def ncc_map(image: np.ndarray, template: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalised cross-correlation and matched-filter amplitude of ``template`` over ``image``.

    Returns two arrays of the image's shape: the NCC (in [-1, 1]) and the
    least-squares amplitude of the template over a constant background, for
    the template centred on each pixel; within ``size // 2`` of the border,
    where the template does not fit, both are 0.
    """
    img = _check_image(image).astype(np.float64, copy=False)
    tpl = np.asarray(template, dtype=np.float64)
    if tpl.ndim != 2 or tpl.shape[0] != tpl.shape[1] or tpl.shape[0] % 2 == 0 or not np.all(np.isfinite(tpl)):
        raise ConfigError(f"template: expected a finite square template of odd side, got shape {tpl.shape}")
    s = tpl.shape[0]
    h, w = img.shape
    if h < s or w < s:
        return np.zeros((h, w)), np.zeros((h, w))
    ncc, amp = _ncc_full(img, _image_spectrum(img), tpl)
    k = s // 2
    for a in (ncc, amp):
        a[:k] = a[h - k :] = 0.0
        a[:, :k] = a[:, w - k :] = 0.0
    return ncc, amp


def _parabolic(f: np.ndarray, r: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel offsets of 3-point parabola peaks around integer maxima (r, c).

    ``f`` is one map (h, w) with any number of peaks, or a batch (k, h, w)
    with one peak per map.
    """
    h, w = f.shape[-2:]
    r1 = np.clip(r, 1, h - 2)
    c1 = np.clip(c, 1, w - 2)
    if f.ndim == 3:
        b = np.arange(f.shape[0])

        def at(dr, dc):
            return f[b, r1 + dr, c1 + dc]
    else:

        def at(dr, dc):
            return f[r1 + dr, c1 + dc]

    fm = at(0, 0)
    up, down, left, right = at(-1, 0), at(1, 0), at(0, -1), at(0, 1)
    dy_den = up - 2 * fm + down
    dx_den = left - 2 * fm + right
    with np.errstate(divide="ignore", invalid="ignore"):
        dy = np.where(dy_den < 0, 0.5 * (up - down) / dy_den, 0.0)
        dx = np.where(dx_den < 0, 0.5 * (left - right) / dx_den, 0.0)
    return np.clip(dx, -0.5, 0.5), np.clip(dy, -0.5, 0.5)


def _robust_z(amp: np.ndarray) -> np.ndarray:
    """(amp - median) / (1.4826 MAD): the robust z-score of a filter response."""
    v = amp.ravel()
    # a regular subsample gives the same median and MAD to well within what a threshold needs
    if v.size > 400_000:
        v = v[:: v.size // 200_000]
    med = float(np.median(v))
    mad = 1.4826 * float(np.median(np.abs(v - med)))
    if not mad > 0:
        mad = float(np.std(v)) or 1.0
    return (amp - med) / mad


def _candidates(image, diameter_px, *, z_threshold, min_ncc, edge_px, spectrum=None):
    """Local maxima of the matched filter passing the thresholds: rows of (row, col, dx, dy, ncc, z)."""
    tpl = bead_template(diameter_px)
    img = np.asarray(image, dtype=np.float64)
    h, w = img.shape
    e = max(int(math.ceil(edge_px)), tpl.shape[0] // 2 + 1)
    if h <= 2 * e or w <= 2 * e:
        return np.zeros((0, 6))
    ncc, amp = _ncc_full(img, spectrum or _image_spectrum(img), tpl)
    k = tpl.shape[0] // 2
    z = _robust_z(amp[k : h - k, k : w - k])
    zi = z[e - k : h - e - k, e - k : w - e - k]  # the pixels at least e from the border
    r, c = np.nonzero((zi >= z_threshold) & (ncc[e : h - e, e : w - e] >= min_ncc))
    r, c = r + e, c + e
    # local maxima of the amplitude, checked only where the thresholds pass (few pixels)
    peak = np.ones(r.size, dtype=bool)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            if dr or dc:
                peak &= amp[r, c] >= amp[r + dr, c + dc]
    r, c = r[peak], c[peak]
    dx, dy = _parabolic(amp, r, c)
    return np.column_stack([r, c, dx, dy, ncc[r, c], z[r - k, c - k]])


def _separate(xy: np.ndarray, order: np.ndarray, min_sep: float) -> np.ndarray:
    """Greedy selection in ``order``: drop any point closer than ``min_sep`` to one already kept."""
    kept: list[int] = []
    for i in order:
        if kept:
            d = np.hypot(*(xy[kept] - xy[i]).T)
            if np.any(d < min_sep):
                continue
        kept.append(int(i))
    return np.asarray(kept, dtype=int)


def detect_beads(
    image: np.ndarray,
    diameter_px: float,
    *,
    max_beads: int | None = None,
    min_separation_px: float | None = None,
    threshold: float | None = None,
    min_ncc: float = DEFAULT_MIN_NCC,
) -> Detections:
    """Find gold beads in a line-integral image with a matched filter.

    Parameters
    ----------
    image : (h, w) array
        Line-integral image (beads positive), e.g. from :func:`log_intensity`.
    diameter_px : float
        Projected bead diameter, pixels.
    max_beads : int, optional
        Keep at most this many (the highest scores).
    min_separation_px : float, optional
        Beads closer than this to a stronger one are dropped; default
        1.5 diameters (two beads that close already touch each other's fit box).
    threshold : float, optional
        Robust z-score the matched-filter amplitude must reach: median + k *
        1.4826 MAD of the response over the image; default 10.
    min_ncc : float
        NCC with the bead template a candidate must reach (shape test).

    Returns
    -------
    Detections
        Sorted by score (NCC), strongest first. Beads closer to the border than
        the sub-pixel fit box are dropped.
    """
    img = _check_image(image)
    d = _check_diameter(diameter_px)
    k_thr = DEFAULT_Z_THRESHOLD if threshold is None else _positive(threshold, "threshold")
    min_sep = 1.5 * d if min_separation_px is None else float(min_separation_px)
    if not (math.isfinite(min_sep) and min_sep >= 0):
        raise ConfigError(f"min_separation_px: expected a distance >= 0, got {min_separation_px!r}")
    if max_beads is not None and (int(max_beads) != max_beads or max_beads < 0):
        raise ConfigError(f"max_beads: expected a count >= 0, got {max_beads!r}")
    cand = _candidates(img, d, z_threshold=k_thr, min_ncc=min_ncc, edge_px=_box_half(d) + 1)
    h, w = img.shape
    xy = np.column_stack([cand[:, 1] + cand[:, 2] - (w - 1) / 2.0, cand[:, 0] + cand[:, 3] - (h - 1) / 2.0])
    # strongest amplitude wins a crowded spot; the survivors are then sorted by score
    keep = _separate(xy, np.argsort(-cand[:, 5], kind="stable"), min_sep)
    keep = keep[np.argsort(-cand[keep, 4], kind="stable")]
    if max_beads is not None:
        keep = keep[: int(max_beads)]
    log.debug("detect_beads: %d candidates, %d kept (diameter %.2f px)", len(cand), len(keep), d)
    return Detections(xy[keep], cand[keep, 4], cand[keep, 5])


def estimate_bead_diameter(
    image: np.ndarray, *, search_px: tuple[float, float] = (4.0, 40.0), n_beads: int = 30
) -> float:
    """Estimate the projected bead diameter when the nominal size is unknown.

    A scale search (diameters a factor 1.2 apart, large ones on a binned
    image) picks the template diameter whose best matches have the highest
    NCC; the strongest beads (at most ``n_beads``) at that scale are then
    fitted with the sphere model, radius free, and the median fitted diameter
    is returned.

    Raises
    ------
    AlignmentError
        When nothing in the image looks like a bead at any scale.
    """
    img = _check_image(image)
    try:
        lo, hi = (float(v) for v in search_px)
    except (TypeError, ValueError):
        raise ConfigError(f"search_px: expected (min, max) diameters in pixels, got {search_px!r}") from None
    if not (0 < lo < hi and math.isfinite(hi)):
        raise ConfigError(f"search_px: expected 0 < min < max, got {search_px!r}")
    scales = np.exp(np.arange(math.log(lo), math.log(hi) + 1e-9, math.log(1.2)))
    quality = np.full(scales.size, -np.inf)
    binned: dict[int, tuple] = {}
    for i, d in enumerate(scales):
        # large scales are searched on a binned image (a bead of >= 6 binned pixels
        # is still well matched): the search costs about as much as a few detections
        b = max(1, int(d / 6.0))
        if b not in binned:
            h, w = (v // b * b for v in img.shape)
            small = np.asarray(img[:h, :w], dtype=np.float64).reshape(h // b, b, w // b, b).mean(axis=(1, 3))
            binned[b] = (small, _image_spectrum(small))
        small, spectrum = binned[b]
        db = d / b
        if _box_half(db) * 2 + 3 > min(small.shape):
            continue
        cand = _candidates(
            small,
            db,
            z_threshold=DEFAULT_Z_THRESHOLD,
            min_ncc=DEFAULT_MIN_NCC,
            edge_px=_box_half(db) + 1,
            spectrum=spectrum,
        )
        if len(cand):
            top = np.sort(cand[:, 4])[::-1][:10]
            quality[i] = top.mean() * min(1.0, len(cand) / 3.0)
    if not np.isfinite(quality).any():
        raise AlignmentError(f"estimate_bead_diameter: no bead-like blobs between {lo} and {hi} px in the image")
    best = int(np.argmax(quality))
    d0 = float(scales[best])
    det = detect_beads(img, d0, max_beads=n_beads)
    if len(det) == 0:
        return d0
    fit = fit_beads(img, det.xy, d0)
    if not fit.ok.any():
        return d0
    d = float(np.median(2.0 * fit.radius[fit.ok]))
    log.debug("estimate_bead_diameter: scale search %.2f px, fitted %.2f px from %d beads", d0, d, int(fit.ok.sum()))
    return d


# ----------------------------------------------------------------------------- sphere-model fit (numba)


@numba.njit(cache=True, nogil=True)
def _chord_int(a2, y0, y1):
    """Integral over [y0, y1] of 2 sqrt(a2 - y^2)_+ dy (closed form)."""
    if a2 <= 0.0:
        return 0.0
    a = math.sqrt(a2)
    lo = max(y0, -a)
    hi = min(y1, a)
    if hi <= lo:
        return 0.0
    ul = min(max(lo / a, -1.0), 1.0)
    uh = min(max(hi / a, -1.0), 1.0)
    return (hi * math.sqrt(max(a2 - hi * hi, 0.0)) + a2 * math.asin(uh)) - (
        lo * math.sqrt(max(a2 - lo * lo, 0.0)) + a2 * math.asin(ul)
    )


@numba.njit(cache=True, nogil=True)
def _chord_int_dr(a2, r, y0, y1):
    """d/dr of :func:`_chord_int` with ``a2 = r^2 - x^2``: integral of 2 r / sqrt(a2 - y^2)."""
    if a2 <= 0.0:
        return 0.0
    a = math.sqrt(a2)
    lo = max(y0, -a)
    hi = min(y1, a)
    if hi <= lo:
        return 0.0
    ul = min(max(lo / a, -1.0), 1.0)
    uh = min(max(hi / a, -1.0), 1.0)
    return 2.0 * r * (math.asin(uh) - math.asin(ul))


@numba.njit(cache=True, nogil=True)
def _pixel(dx, dy, r, nodes, wts, want_dr, bp):
    """Average over the pixel [dx -+ 1/2] x [dy -+ 1/2] of 2 sqrt(r^2 - x^2 - y^2)_+, and its d/dr.

    The y-integral is closed-form; the x-integral is Gauss-Legendre between
    the breakpoints where the integrand has kinks (disk edge, start of the
    clipping of the chord by the pixel's y-edges), so it is smooth on each piece.
    """
    x0 = dx - 0.5
    x1 = dx + 0.5
    y0 = dy - 0.5
    y1 = dy + 0.5
    r2 = r * r
    nx = 0.0 if x0 <= 0.0 <= x1 else min(abs(x0), abs(x1))
    ny = 0.0 if y0 <= 0.0 <= y1 else min(abs(y0), abs(y1))
    if nx * nx + ny * ny >= r2:
        return 0.0, 0.0
    nb = 0
    bp[nb] = x0
    nb += 1
    for yy in (y0, y1):
        q = r2 - yy * yy
        if q > 0.0:
            s = math.sqrt(q)
            if x0 < -s < x1:
                bp[nb] = -s
                nb += 1
            if x0 < s < x1:
                bp[nb] = s
                nb += 1
    if x0 < -r < x1:
        bp[nb] = -r
        nb += 1
    if x0 < r < x1:
        bp[nb] = r
        nb += 1
    bp[nb] = x1
    nb += 1
    for k in range(1, nb):
        v = bp[k]
        m = k - 1
        while m >= 0 and bp[m] > v:
            bp[m + 1] = bp[m]
            m -= 1
        bp[m + 1] = v
    val = 0.0
    dval = 0.0
    for k in range(nb - 1):
        a = bp[k]
        b = bp[k + 1]
        h = b - a
        if h <= 0.0 or a >= r or b <= -r:
            continue
        for j in range(nodes.size):
            x = a + h * nodes[j]
            a2 = r2 - x * x
            val += h * wts[j] * _chord_int(a2, y0, y1)
            if want_dr:
                dval += h * wts[j] * _chord_int_dr(a2, r, y0, y1)
    return val, dval


@numba.njit(cache=True, nogil=True)
def _solve_spd(a, b, out):
    """Solve a small symmetric positive-definite system by Cholesky; False when not SPD."""
    n = b.size
    L = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1):
            s = a[i, j]
            for k in range(j):
                s -= L[i, k] * L[j, k]
            if i == j:
                if s <= 0.0:
                    return False
                L[i, i] = math.sqrt(s)
            else:
                L[i, j] = s / L[j, j]
    y = np.zeros(n)
    for i in range(n):
        s = b[i]
        for k in range(i):
            s -= L[i, k] * y[k]
        y[i] = s / L[i, i]
    for i in range(n - 1, -1, -1):
        s = y[i]
        for k in range(i + 1, n):
            s -= L[k, i] * out[k]
        out[i] = s / L[i, i]
    return True


@numba.njit(cache=True, nogil=True)
def _model(dxs, dys, r, nodes, wts, mask, M, dMr, Hv, Vh, want_jac, bp):
    """Sphere model of a box (pixel averages M, d/dr) and, for the Jacobian, its edge integrals.

    d M / d cx of a pixel is the chord integral along its left edge minus its
    right edge (and likewise in y), exactly; Hv and Vh hold those edge
    integrals. Masked-out pixels are skipped.
    """
    nb = dxs.size
    for i in range(nb):
        for j in range(nb):
            if mask[i, j] == 0.0:
                M[i, j] = 0.0
                dMr[i, j] = 0.0
                continue
            v, dv = _pixel(dxs[j], dys[i], r, nodes, wts, want_jac, bp)
            M[i, j] = v
            dMr[i, j] = dv
    if want_jac:
        r2 = r * r
        for i in range(nb):
            for e in range(nb + 1):
                xe = dxs[0] - 0.5 + e
                Hv[i, e] = _chord_int(r2 - xe * xe, dys[i] - 0.5, dys[i] + 0.5)
        for e in range(nb + 1):
            ye = dys[0] - 0.5 + e
            for j in range(nb):
                Vh[e, j] = _chord_int(r2 - ye * ye, dxs[j] - 0.5, dxs[j] + 0.5)


@numba.njit(cache=True, nogil=True)
def _offsets(x0c, y0c, cx, cy, dxs, dys):
    for j in range(dxs.size):
        dxs[j] = x0c + j - cx
    for i in range(dys.size):
        dys[i] = y0c + i - cy


@numba.njit(cache=True, nogil=True)
def _cost(patch, mask, M, p):
    """Masked sum of squared residuals of the model with parameters ``p``."""
    nb = patch.shape[0]
    half = (nb - 1) / 2.0
    c = 0.0
    for i in range(nb):
        for j in range(nb):
            w = mask[i, j]
            if w != 0.0:
                res = patch[i, j] - (p[3] * M[i, j] + p[4] + p[5] * (j - half) + p[6] * (i - half))
                c += w * res * res
    return c


@numba.njit(cache=True, nogil=True)
def _normal(patch, mask, M, dMr, Hv, Vh, p, n_lin_only, JTJ, JTr):
    """Gauss-Newton normal equations; with ``n_lin_only`` only for the 4 linear parameters."""
    nb = patch.shape[0]
    half = (nb - 1) / 2.0
    npar = JTr.size
    for a in range(npar):
        JTr[a] = 0.0
        for b in range(npar):
            JTJ[a, b] = 0.0
    J = np.zeros(7)
    for i in range(nb):
        for j in range(nb):
            w = mask[i, j]
            if w == 0.0:
                continue
            if n_lin_only:
                J[0] = M[i, j]
                J[1] = 1.0
                J[2] = j - half
                J[3] = i - half
                res = patch[i, j]
            else:
                res = patch[i, j] - (p[3] * M[i, j] + p[4] + p[5] * (j - half) + p[6] * (i - half))
                J[0] = p[3] * (Hv[i, j] - Hv[i, j + 1])
                J[1] = p[3] * (Vh[i, j] - Vh[i + 1, j])
                J[2] = p[3] * dMr[i, j]
                J[3] = M[i, j]
                J[4] = 1.0
                J[5] = j - half
                J[6] = i - half
            for a in range(npar):
                JTr[a] += w * J[a] * res
                for b in range(a + 1):
                    JTJ[a, b] += w * J[a] * J[b]
    for a in range(npar):
        for b in range(a):
            JTJ[b, a] = JTJ[a, b]


@numba.njit(cache=True, nogil=True)
def _fit_one(patch, mask, x0c, y0c, cx, cy, r, nodes, wts, max_iter, tol, out):
    """Levenberg-Marquardt fit of ``A * sphere(cx, cy, r) + B0 + Bx x + By y`` to one box.

    ``patch[i, j]`` is the pixel centred at (x0c + j, y0c + i) (the plane is
    relative to the box centre). Writes (cx, cy, r, A, B0, Bx, By, var_cx,
    var_cy, rms, converged) into ``out``. Each iteration evaluates the model
    and its Jacobian once, at the trial point; a rejected trial only raises
    the damping.
    """
    nb = patch.shape[0]
    M = np.zeros((nb, nb))
    dMr = np.zeros((nb, nb))
    Hv = np.zeros((nb, nb + 1))
    Vh = np.zeros((nb + 1, nb))
    dxs = np.empty(nb)
    dys = np.empty(nb)
    bp = np.empty(8)
    npar = 7
    p = np.zeros(npar)
    p[0] = cx
    p[1] = cy
    p[2] = r
    for a in range(out.size):
        out[a] = np.nan
    out[10] = 0.0
    nw = 0.0
    for i in range(nb):
        for j in range(nb):
            nw += mask[i, j]
    if nw < npar + 2:
        return
    # the linear parameters at the starting centre and radius
    _offsets(x0c, y0c, p[0], p[1], dxs, dys)
    _model(dxs, dys, p[2], nodes, wts, mask, M, dMr, Hv, Vh, True, bp)
    A4 = np.zeros((4, 4))
    b4 = np.zeros(4)
    _normal(patch, mask, M, dMr, Hv, Vh, p, True, A4, b4)
    lin = np.zeros(4)
    if not _solve_spd(A4, b4, lin):
        return
    for a in range(4):
        p[3 + a] = lin[a]
    JTJ = np.zeros((npar, npar))
    JTr = np.zeros(npar)
    _normal(patch, mask, M, dMr, Hv, Vh, p, False, JTJ, JTr)
    cost = _cost(patch, mask, M, p)
    A = np.zeros((npar, npar))
    d = np.zeros(npar)
    newp = np.zeros(npar)
    lam = 1e-3
    converged = False
    rejected = 0
    for _it in range(max_iter):
        for a in range(npar):
            for b in range(npar):
                A[a, b] = JTJ[a, b]
            A[a, a] *= 1.0 + lam
        if not _solve_spd(A, JTr, d):
            lam *= 10.0
            rejected += 1
            if rejected > 8:
                break
            continue
        for a in range(npar):
            newp[a] = p[a] + d[a]
        if newp[2] <= 0.25 * r or newp[2] >= 4.0 * r:
            lam *= 10.0
            rejected += 1
            if rejected > 8:
                break
            continue
        _offsets(x0c, y0c, newp[0], newp[1], dxs, dys)
        _model(dxs, dys, newp[2], nodes, wts, mask, M, dMr, Hv, Vh, True, bp)
        c2 = _cost(patch, mask, M, newp)
        if c2 <= cost * (1.0 + 1e-12):
            step = math.hypot(d[0], d[1])
            for a in range(npar):
                p[a] = newp[a]
            cost = c2
            _normal(patch, mask, M, dMr, Hv, Vh, p, False, JTJ, JTr)
            lam = max(lam * 0.1, 1e-9)
            rejected = 0
            if step < tol:
                converged = True
                break
        else:
            lam *= 10.0
            rejected += 1
            if rejected > 8:
                # no step lowers the cost: at the minimum to numerical precision
                converged = True
                break
    for a in range(npar):
        out[a] = p[a]
    s2 = cost / max(nw - npar, 1.0)
    e0 = np.zeros(npar)
    col = np.zeros(npar)
    for a in range(2):
        for b in range(npar):
            e0[b] = 0.0
        e0[a] = 1.0
        if _solve_spd(JTJ, e0, col):
            out[7 + a] = s2 * col[a]
    out[9] = math.sqrt(cost / nw)
    out[10] = 1.0 if converged else 0.0


@numba.njit(cache=True, nogil=True, parallel=True)
def _fit_many(patches, masks, x0c, y0c, guess, r0, nodes, wts, max_iter, tol):
    k = patches.shape[0]
    out = np.empty((k, 11))
    for b in numba.prange(k):
        _fit_one(patches[b], masks[b], x0c[b], y0c[b], guess[b, 0], guess[b, 1], r0, nodes, wts, max_iter, tol, out[b])
    return out


def _extract(image: np.ndarray, rows: np.ndarray, cols: np.ndarray, half: int) -> tuple[np.ndarray, np.ndarray]:
    """Boxes of side 2 half + 1 centred on integer pixels (rows, cols), and whether each lies inside.

    Boxes crossing the border repeat the edge pixels.
    """
    h, w = image.shape
    n = 2 * half + 1
    ok = (rows - half >= 0) & (rows + half < h) & (cols - half >= 0) & (cols + half < w)
    boxes = np.empty((rows.shape[0], n, n))
    if h >= n and w >= n and ok.any():
        win = np.lib.stride_tricks.sliding_window_view(image, (n, n))
        boxes[ok] = win[rows[ok] - half, cols[ok] - half]
    if not ok.all():
        off = np.arange(-half, half + 1)
        rr = np.clip(rows[~ok, None] + off, 0, h - 1)
        cc = np.clip(cols[~ok, None] + off, 0, w - 1)
        boxes[~ok] = image[rr[:, :, None], cc[:, None, :]]
    return boxes, ok


def fit_beads(
    image: np.ndarray,
    xy_guess: np.ndarray,
    diameter_px: float,
    *,
    box: int | None = None,
    avoid_xy: np.ndarray | None = None,
    max_shift_px: float | None = None,
) -> BeadFit:
    """Fit the pixel-averaged sphere projection plus a background plane to each bead.

    Parameters
    ----------
    image : (h, w) array
        Line-integral image (beads positive).
    xy_guess : (k, 2) array
        Starting centres, centred coordinates, within ~1/3 diameter of the bead.
    diameter_px : float
        Nominal projected diameter: sets the box and the starting radius (the
        radius is then fitted).
    box : int, optional
        Side of the square fit box (odd); default about 1.5 diameters + 6 px.
    avoid_xy : (j, 2) array, optional
        Other beads to mask out; the guesses mask each other too. Pixels
        within ``radius + 1.5`` px of another bead do not enter a fit.
    max_shift_px : float, optional
        A fit ending farther than this from its guess is not ok; default
        0.4 diameter.

    Returns
    -------
    BeadFit
    """
    img = _check_image(image)
    d = _check_diameter(diameter_px)
    guess = _check_points(xy_guess, "xy_guess")
    r0 = d / 2.0
    if box is None:
        half = _box_half(d)
    else:
        if int(box) != box or box < 5:
            raise ConfigError(f"box: expected a box side of at least 5 pixels, got {box!r}")
        half = int(box) // 2
    if half < r0 + 1:
        raise ConfigError(f"box: a box of {2 * half + 1} px cannot hold a {d:.3g} px bead and its background")
    max_shift = 0.4 * d if max_shift_px is None else _positive(max_shift_px, "max_shift_px")
    avoid = None if avoid_xy is None else _check_points(avoid_xy, "avoid_xy")
    return _fit(np.asarray(img), guess, d, half, avoid, max_shift)


def _fit(img, guess, d, half, avoid, max_shift) -> BeadFit:
    """:func:`fit_beads` on checked input; ``half`` is the half-side of the box."""
    k = guess.shape[0]
    r0 = d / 2.0
    empty = np.zeros(0)
    if k == 0:
        return BeadFit(np.zeros((0, 2)), np.zeros(0, bool), empty, empty, empty, np.zeros((0, 2)))
    h, w = img.shape
    col = np.rint(guess[:, 0] + (w - 1) / 2.0).astype(np.int64)
    row = np.rint(guess[:, 1] + (h - 1) / 2.0).astype(np.int64)
    inside = (row - half >= 0) & (row + half < h) & (col - half >= 0) & (col + half < w)
    col = np.clip(col, half, w - 1 - half)
    row = np.clip(row, half, h - 1 - half)
    patches, _ = _extract(img, row, col, half)
    x0c = (col - half) - (w - 1) / 2.0
    y0c = (row - half) - (h - 1) / 2.0
    off = np.arange(-half, half + 1, dtype=float)
    # a round window: the corners of the box hold mostly unrelated content
    disk = (off[None, :] ** 2 + off[:, None] ** 2) <= (half + 0.5) ** 2
    masks = np.broadcast_to(disk, (k, 2 * half + 1, 2 * half + 1)).astype(np.float64)
    others = guess if avoid is None else np.vstack([guess, avoid])
    if others.shape[0] > 1:
        px = x0c[:, None] + (half + off)[None, :]  # (k, nb) pixel x of each box column
        py = y0c[:, None] + (half + off)[None, :]
        near = np.hypot(*(others[None, :, :] - guess[:, None, :]).transpose(2, 0, 1)) < 2 * half + d
        near[np.arange(k), np.arange(k)] = False
        for b, j in zip(*np.nonzero(near)):
            dx2 = (px[b] - others[j, 0]) ** 2
            dy2 = (py[b] - others[j, 1]) ** 2
            masks[b][dy2[:, None] + dx2[None, :] < (r0 + 1.5) ** 2] = 0.0
    res = _fit_many(patches, masks, x0c, y0c, guess, r0, _NODES, _WEIGHTS, 40, _FIT_TOL_PX)
    xy = res[:, :2].copy()
    radius, amp = res[:, 2], res[:, 3]
    sigma = np.sqrt(np.maximum(res[:, 7:9], 0.0))
    finite = np.all(np.isfinite(res[:, :10]), axis=1)
    with np.errstate(invalid="ignore"):
        ok = (
            inside
            & finite
            & (res[:, 10] > 0)
            & (amp > 0)
            & (radius > 0.6 * r0)
            & (radius < 1.6 * r0)
            & (np.hypot(*(xy - guess).T) <= max_shift)
            & (np.abs(xy[:, 0] - (x0c + half)) <= half - radius)
            & (np.abs(xy[:, 1] - (y0c + half)) <= half - radius)
        )
    xy[~ok] = guess[~ok]
    return BeadFit(xy, ok, radius, amp, res[:, 9], sigma)


def refine_center(
    image: np.ndarray, xy_guess: np.ndarray, diameter_px: float, *, box: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel bead centres: the sphere-model fit of :func:`fit_beads`.

    On noise-free analytic beads the error is below 0.002 px; under Poisson
    noise the scatter is at the Cramér-Rao bound of the sphere model.

    Returns
    -------
    xy : (k, 2) array
        Refined centres (the guess where the fit failed).
    ok : (k,) bool array
    """
    fit = fit_beads(image, xy_guess, diameter_px, box=box)
    return fit.xy, fit.ok


# ----------------------------------------------------------------------------- seeds


def choose_seeds(
    detections: Detections, image_shape: tuple[int, int], n_beads: int, *, min_separation_px: float
) -> np.ndarray:
    """Pick well-separated seed beads spread over the field, strongest first.

    The field is divided into a grid of about ``n_beads`` cells; cells take
    turns (the cell with the strongest remaining bead first) giving their
    strongest bead, so the seeds cover the field before any region gets a
    second one. Candidates closer than ``min_separation_px`` to a chosen seed
    are skipped.

    Returns
    -------
    (k,) int array
        Indices into ``detections``, ``k <= n_beads``, by decreasing score.
    """
    if int(n_beads) != n_beads or n_beads < 0:
        raise ConfigError(f"n_beads: expected a count >= 0, got {n_beads!r}")
    min_sep = float(min_separation_px)
    if not (math.isfinite(min_sep) and min_sep >= 0):
        raise ConfigError(f"min_separation_px: expected a distance >= 0, got {min_separation_px!r}")
    h, w = (int(v) for v in image_shape)
    n = len(detections)
    if n == 0 or n_beads == 0:
        return np.zeros(0, dtype=int)
    g = max(1, int(math.ceil(math.sqrt(n_beads))))
    xy = detections.xy
    cx = np.clip(((xy[:, 0] + w / 2.0) / w * g).astype(int), 0, g - 1)
    cy = np.clip(((xy[:, 1] + h / 2.0) / h * g).astype(int), 0, g - 1)
    cell = cy * g + cx
    order = np.argsort(-detections.score, kind="stable")
    queues: dict[int, list[int]] = {}
    for i in order:
        queues.setdefault(int(cell[i]), []).append(int(i))
    chosen: list[int] = []
    while len(chosen) < n_beads and any(queues.values()):
        # one bead per cell per round, cells visited by the score of their best remaining bead
        heads = sorted((q[0] for q in queues.values() if q), key=lambda i: -detections.score[i])
        for i in heads:
            queues[int(cell[i])].pop(0)
            if chosen and np.min(np.hypot(*(xy[chosen] - xy[i]).T)) < min_sep:
                continue
            chosen.append(i)
            if len(chosen) == n_beads:
                break
    idx = np.asarray(chosen, dtype=int)
    return idx[np.argsort(-detections.score[idx], kind="stable")]


# ----------------------------------------------------------------------------- tracking


def _search(image, centers, radius, template):
    """Matched-filter peak within ``radius`` px of each centre (vectorised over beads).

    Returns the sub-pixel peak positions (k, 2), the NCC there (k,), and
    whether a peak was found (a local maximum of the filter amplitude whose
    template window lies inside the image). ``radius`` is a scalar or (k,).
    """
    h, w = image.shape
    k = centers.shape[0]
    radius = np.broadcast_to(np.asarray(radius, dtype=float), (k,))
    if k == 0:
        return np.zeros((0, 2)), np.zeros(0), np.zeros(0, dtype=bool)
    R = int(math.ceil(radius.max())) + 1
    s = template.shape[0]
    ht = s // 2
    col = np.rint(centers[:, 0] + (w - 1) / 2.0).astype(np.int64)
    row = np.rint(centers[:, 1] + (h - 1) / 2.0).astype(np.int64)
    boxes, _ = _extract(image, row, col, R + ht)
    amp = _corr_valid(boxes, template)  # (k, 2R+1, 2R+1), entry [R, R] at (row, col)
    off = np.arange(-R, R + 1)
    fx = centers[:, 0] + (w - 1) / 2.0 - col
    fy = centers[:, 1] + (h - 1) / 2.0 - row
    dist2 = (off[None, None, :] - fx[:, None, None]) ** 2 + (off[None, :, None] - fy[:, None, None]) ** 2
    rr = row[:, None] + off
    cc = col[:, None] + off
    in_r = (rr >= ht) & (rr <= h - 1 - ht)
    in_c = (cc >= ht) & (cc <= w - 1 - ht)
    # local maxima of the amplitude only: a window edge cutting a bead's flank is no peak
    local = amp == ndimage.maximum_filter(amp, size=(1, 3, 3), mode="nearest")
    allowed = (dist2 <= radius[:, None, None] ** 2) & local & in_r[:, :, None] & in_c[:, None, :]
    cand = np.where(allowed, amp, -np.inf)
    flat = cand.reshape(k, -1).argmax(axis=1)
    pr, pc = np.unravel_index(flat, (2 * R + 1, 2 * R + 1))
    b = np.arange(k)
    found = np.isfinite(cand[b, pr, pc])
    score = np.where(found, _ncc_at(boxes, template, pr, pc), -1.0)
    dx, dy = _parabolic(amp, pr, pc)
    xy = np.column_stack([col + pc - R + dx - (w - 1) / 2.0, row + pr - R + dy - (h - 1) / 2.0])
    return xy, score, found


def _consensus_shift(image, centers, radius, template, min_support: int = 3):
    """Common shift of all beads: the peak of the sum of their matched-filter maps around ``centers``.

    Each bead's map is scaled to a peak of 1 so that no single box (a bead
    overlapping another, a dense patch of content) dominates the sum. The
    shift is trusted only when at least ``min_support`` beads, and half of
    those looked at, have a strong response there (half their own peak);
    otherwise None.
    """
    h, w = image.shape
    R = int(math.ceil(radius))
    s = template.shape[0]
    half = R + s // 2
    col = np.rint(centers[:, 0] + (w - 1) / 2.0).astype(np.int64)
    row = np.rint(centers[:, 1] + (h - 1) / 2.0).astype(np.int64)
    boxes, inside = _extract(image, row, col, half)
    if inside.sum() < min_support:
        return None
    amp = _corr_valid(boxes[inside], template)
    peak = amp.reshape(amp.shape[0], -1).max(axis=1)
    use = peak > 0
    if use.sum() < min_support:
        return None
    maps = amp[use] / peak[use, None, None]
    total = maps.sum(axis=0)
    r, c = np.unravel_index(int(np.argmax(total)), total.shape)
    if not (0 < r < total.shape[0] - 1 and 0 < c < total.shape[1] - 1):
        return None
    support = int(np.sum(maps[:, r - 1 : r + 2, c - 1 : c + 2].max(axis=(1, 2)) >= 0.5))
    if support < max(min_support, 0.5 * maps.shape[0]):
        return None
    dx, dy = _parabolic(total, np.array([r]), np.array([c]))
    # the boxes are centred on rounded positions: the shift is relative to those
    return np.array([c - R + dx[0], r - R + dy[0]])


def _view_order(n: int, start: int) -> list[tuple[int, int]]:
    """(view, previous view on the same side) from the start outwards, alternating sides."""
    order = []
    for k in range(1, n):
        for v, prev in ((start + k, start + k - 1), (start - k, start - k + 1)):
            if 0 <= v < n:
                order.append((v, prev))
    return order


def _crowded(pred: np.ndarray, known: np.ndarray, limit: float) -> np.ndarray:
    """True for predicted positions within ``limit`` of another known bead's prediction."""
    m = pred.shape[0]
    if m < 2:
        return np.zeros(m, dtype=bool)
    d = np.hypot(*(pred[:, None, :] - pred[None, :, :]).transpose(2, 0, 1))
    d[~known[None, :].repeat(m, 0)] = np.inf
    np.fill_diagonal(d, np.inf)
    return d.min(axis=1) < limit


def _consistent_fits(fit: BeadFit, ok: np.ndarray) -> np.ndarray:
    """False for fits unlike the view's others: a bead overlapping an untracked bead or debris.

    Needs 5 good fits to judge; the radius must lie within 15 % of their
    median and the residual RMS below twice theirs.
    """
    keep = np.ones(ok.shape, dtype=bool)
    if ok.sum() < 5:
        return keep
    r_med = np.median(fit.radius[ok])
    rms_med = np.median(fit.rms[ok])
    with np.errstate(invalid="ignore"):
        keep &= np.abs(fit.radius - r_med) <= 0.15 * r_med
        keep &= fit.rms <= 2.0 * rms_med
    return keep


def _correction_basis(raw: np.ndarray, centre: np.ndarray, tilt_dir: np.ndarray) -> np.ndarray:
    """Displacement fields (k, 2, 5) of the per-view correction: shift x, shift y, rotation, scale, tilt.

    Rotation and scale act about ``centre`` (where the specimen origin
    projects); ``tilt_dir`` (k, 2) is each bead's motion per radian of extra tilt.
    """
    rel = raw - centre
    k = raw.shape[0]
    basis = np.zeros((k, 2, 5))
    basis[:, 0, 0] = 1.0
    basis[:, 1, 1] = 1.0
    basis[:, 0, 2] = -rel[:, 1]
    basis[:, 1, 2] = rel[:, 0]
    basis[:, :, 3] = rel
    basis[:, :, 4] = tilt_dir
    return basis


def _fit_correction(basis: np.ndarray, residual: np.ndarray, min_points: int = 6) -> np.ndarray:
    """Per-view correction parameters (5,) from bead residuals (found - predicted), robustly.

    With fewer than ``min_points`` beads, or a rotation/scale/tilt too large for
    a coarse alignment's residual error (> 2 %), only the shift (median) is fitted.
    """
    k = residual.shape[0]
    params = np.zeros(5)
    if k == 0:
        return params
    med = np.median(residual, axis=0)
    params[:2] = med
    if k < min_points:
        return params
    dev = np.hypot(*(residual - med).T)
    keep = dev < max(3.0, 3.0 * 1.4826 * np.median(dev))
    a = basis.transpose(0, 1, 2).reshape(2 * k, 5)
    b = residual.reshape(2 * k)
    # the columns differ in scale by the field size: normalise for conditioning
    norm = np.sqrt(np.sum(a * a, axis=0)) + 1e-12
    for _ in range(2):
        rows = np.repeat(keep, 2)
        if keep.sum() < min_points:
            return params
        coef, *_ = np.linalg.lstsq(a[rows] / norm, b[rows], rcond=None)
        coef = coef / norm
        res = np.hypot(*(b - a @ coef).reshape(k, 2).T)
        keep = res < max(1.0, 3.0 * 1.4826 * np.median(res[keep]))
    if np.any(np.abs(coef[2:]) > 0.02):
        return params
    return coef


def track_beads(
    images: np.ndarray,
    tilt_deg: np.ndarray,
    initial: Geometry,
    seeds_xy: np.ndarray,
    *,
    start_view: int,
    diameter_px: float,
    search_px: float | None = None,
    min_score: float = 0.6,
    max_gap: int = 4,
) -> Tracks:
    """Follow seed beads through a tilt series.

    From the start view outwards (alternating tilt directions) each bead's
    position in the next view is predicted with a running 3-D fit in the
    aligned frame of ``initial``: a bead at (X, Y, Z) appears at
    ``q = (X cos(theta) + Z sin(theta), Y)``, i.e. at ``p = A_i q + t_i`` in
    view i, with X, Z and Y fitted by least squares to the views tracked so
    far. A per-view correction ``C_i`` (shift, rotation and scale about the
    projected origin, and a tilt change that moves each bead by
    ``A_i (dq/dtheta)``) follows the coarse alignment's errors: its shift is
    found first from all beads at once (the peak of their summed
    matched-filter maps within ``search_px``, or twice that with 8 or more
    beads, of the previous view's correction), then ``C_i`` is fitted, robustly,
    to the beads found (the shift alone, as their median offset, when fewer
    than 6 are found). Each bead is searched for around its corrected
    prediction within a radius set by the spread of its prediction, refined
    with the sphere fit, and accepted when its NCC reaches ``min_score``, it
    lies where the correction puts it and its fit (radius, residual) is like
    the other beads' in the view. A bead not found leaves a gap and is
    searched for again in the next view with a wider window; after
    ``max_gap`` consecutive gaps it stops in that direction. A bead whose
    prediction comes within 1.25 diameters of another tracked bead's is
    skipped in that view (no gap): overlapping beads cannot be localised
    without bias.

    Parameters
    ----------
    images : (n, h, w) array
        Line-integral images (beads positive), views sorted by tilt.
    tilt_deg : (n,) array
        Tilt angles for the motion model (the nominal ones will do: a constant
        offset is absorbed by the fit).
    initial : Geometry
        Coarse geometry supplying the in-plane transforms ``A_i`` and shifts
        ``t_i``, good to a few pixels (its tilt angles are not used).
    seeds_xy : (m, 2) array
        Bead positions in the start view, centred coordinates.
    start_view : int
        Index of the view the seeds are from (normally the smallest |tilt|).
    diameter_px : float
        Projected bead diameter, pixels.
    search_px : float, optional
        Largest change of the coarse alignment's error from one view to the
        next that the tracker follows (twice this with 8 or more beads); also
        the widest bead search window. Default max(12, 1.2 diameters).
    min_score : float
        NCC with the bead template a found bead must reach.
    max_gap : int
        Consecutive views a bead may be missing before it stops.

    Returns
    -------
    Tracks
        ``view_offset_px`` holds the shift part of ``C_i`` relative to the
        start view (the coarse geometry's shift error, with the opposite sign),
        with the terms that only move the origin of the bead coordinates
        (``A_i (c1 cos(theta_i) + c2 sin(theta_i), 0)``) removed.
    """
    stack = _check_stack(images)
    d = _check_diameter(diameter_px)
    n, h, w = stack.shape
    tilt = np.asarray(tilt_deg, dtype=float)
    if tilt.shape != (n,) or not np.all(np.isfinite(tilt)):
        raise ConfigError(f"tilt_deg: expected {n} finite tilt angles (one per view), got shape {tilt.shape}")
    if not isinstance(initial, Geometry) or initial.n_views != n:
        raise ConfigError(f"initial: expected a Geometry of {n} views, got {type(initial).__name__}")
    if tuple(initial.image_shape) != (h, w):
        raise ConfigError(f"initial: image_shape {initial.image_shape} does not match the images ({h}, {w})")
    seeds = _check_points(seeds_xy, "seeds_xy")
    if isinstance(start_view, bool) or int(start_view) != start_view or not 0 <= start_view < n:
        raise ConfigError(f"start_view: expected a view index in [0, {n}), got {start_view!r}")
    start = int(start_view)
    search = max(12.0, 1.2 * d) if search_px is None else _positive(search_px, "search_px")
    min_score = float(min_score)
    if int(max_gap) != max_gap or max_gap < 0:
        raise ConfigError(f"max_gap: expected a count >= 0, got {max_gap!r}")

    m = seeds.shape[0]
    xy = np.full((n, m, 2), np.nan)
    score = np.zeros((n, m))
    corr = np.zeros((n, 5))  # per-view correction: shift x, y, rotation, scale, tilt (radians)
    if m == 0:
        return Tracks(xy, score, corr[:, :2])
    template = bead_template(d)
    half_fit = _box_half(d)
    local_r = max(2.0, 0.2 * d)
    a_mat = initial.inplane_matrices()
    a_inv = np.linalg.inv(a_mat)
    shift = initial.shift_px
    th = np.deg2rad(tilt)
    cth, sth = np.cos(th), np.sin(th)

    img = np.asarray(stack[start], dtype=np.float64)
    fit = _fit(img, seeds, d, half_fit, None, 0.4 * d)
    _, s0, _ = _search(img, fit.xy, 1.5, template)
    good = fit.ok & (s0 >= min_score)
    xy[start, good] = fit.xy[good]
    score[start, good] = s0[good]

    # Normal equations of the running fit u = X cos + Z sin, in units of the
    # localisation-plus-model error sigma_q; a weak prior (Z within a quarter of
    # the field) keeps Z finite until the tilts constrain it, and the posterior
    # spread of each prediction sets its search radius.
    sigma_q = 0.3
    z_prior = (sigma_q / (0.25 * max(h, w))) ** 2
    nuu = np.zeros((m, 2, 2))
    nub = np.zeros((m, 2))
    vsum = np.zeros(m)
    cnt = np.zeros(m)

    def add(view: int, beads: np.ndarray) -> None:
        # Only the shift and rotation of the correction are taken out of the data
        # the model learns from: scale and tilt corrections are degenerate with the
        # model (a stretch along u is a change of tilt), and feeding them back
        # would drive the two apart.
        o, rot = corr[view, :2], corr[view, 2]
        p = xy[view, beads] - o
        rel = p - shift[view]
        rel = rel - rot * np.column_stack([-rel[:, 1], rel[:, 0]])
        q = rel @ a_inv[view].T
        c, s = cth[view], sth[view]
        nuu[beads] += np.array([[c * c, c * s], [c * s, s * s]])
        nub[beads] += q[:, :1] * np.array([c, s])
        vsum[beads] += q[:, 1]
        cnt[beads] += 1

    add(start, np.nonzero(good)[0])
    gaps = {+1: np.where(good, 0, max_gap + 1), -1: np.where(good, 0, max_gap + 1)}

    for v, prev in _view_order(n, start):
        side = 1 if v > start else -1
        est = cnt > 0
        reg = nuu + np.array([[0.0, 0.0], [0.0, z_prior]])
        cov = np.zeros((m, 2, 2))
        cov[est] = np.linalg.inv(reg[est])
        xz = np.einsum("kij,kj->ki", cov, nub)
        yy = np.where(est, vsum / np.maximum(cnt, 1), 0.0)
        gv = np.array([cth[v], sth[v]])
        sd_pred = sigma_q * np.sqrt(np.einsum("i,kij,j->k", gv, cov, gv) + 1.0)
        raw = np.column_stack([xz @ gv, yy]) @ a_mat[v].T + shift[v]
        du = xz @ np.array([-sth[v], cth[v]])  # du / dtheta
        basis = _correction_basis(raw, shift[v], np.column_stack([du, np.zeros(m)]) @ a_mat[v].T)
        active = est & (gaps[side] <= max_gap)
        if not active.any():
            continue
        img = np.asarray(stack[v], dtype=np.float64)
        crowded = _crowded(raw, est, 1.25 * d)
        usable = active & ~crowded
        idx = np.nonzero(usable)[0]
        if idx.size == 0:
            continue
        widen = 1.0 + 0.5 * np.minimum(gaps[side][idx], max_gap)
        radius = np.minimum((local_r + 3.0 * sd_pred[idx]) * widen, search)
        # 1. the coarse alignment's error in this view: the previous view's
        # correction (tilt jitter is not carried over), then the consensus of all
        # beads' NCC maps
        params = corr[prev].copy()
        params[4] = 0.0
        guess = raw + basis @ params
        # (the sum over many beads is robust enough to look twice as far as one
        # bead; over one or two it is no better than each bead's own search)
        if idx.size >= 3:
            cons = None
            if idx.size >= 8:
                cons = _consensus_shift(img, guess[idx], 2.0 * search, template)
            if cons is None:
                cons = _consensus_shift(img, guess[idx], search, template)
            if cons is not None:
                params[:2] += cons
        # 2. each bead near its prediction, and the view's correction from those found
        found1, s1, in1 = _search(img, raw[idx] + basis[idx] @ params, radius, template)
        good1 = in1 & (s1 >= min_score)
        if good1.any():
            params = _fit_correction(basis[idx[good1]], found1[good1] - raw[idx[good1]])
        pred = raw + basis @ params
        # 3. search again around the corrected predictions, refine, accept
        found2, s2, in2 = _search(img, pred[idx], radius, template)
        others = pred[est & ~usable]
        fit = _fit(img, found2, d, half_fit, others if len(others) else None, 0.4 * d)
        ok = in2 & (s2 >= min_score) & fit.ok & (np.hypot(*(fit.xy - found2).T) <= 1.5)
        ok &= np.hypot(*(fit.xy - pred[idx]).T) <= radius + 0.5
        ok &= _consistent_fits(fit, ok)
        # a view where nothing was found keeps the previous view's correction
        corr[v] = _fit_correction(basis[idx[ok]], fit.xy[ok] - raw[idx[ok]]) if ok.any() else corr[prev]
        acc = idx[ok]
        xy[v, acc] = fit.xy[ok]
        score[v, acc] = s2[ok]
        add(v, acc)
        # a bead skipped for crowding was not looked for: no gap
        g = gaps[side]
        g[idx] += 1
        g[acc] = 0
    off = corr[:, :2]
    # The origin of the bead coordinates is free: a common change of X or Z moves
    # view i by A_i ((cos(theta_i) - cos(theta_s)) dX + (sin(theta_i) - sin(theta_s)) dZ, 0)
    # relative to the start view s. Take those terms out of the reported shifts.
    basis = np.stack([a_mat[:, :, 0] * (cth - cth[start])[:, None], a_mat[:, :, 0] * (sth - sth[start])[:, None]], -1)
    design = basis.transpose(0, 1, 2).reshape(2 * n, 2)
    if np.linalg.matrix_rank(design) == 2:
        coef, *_ = np.linalg.lstsq(design, off.reshape(2 * n), rcond=None)
        off = off - (design @ coef).reshape(n, 2)
    log.debug("track_beads: %d of %d points found", int(np.isfinite(xy[..., 0]).sum()), n * m)
    return Tracks(xy, score, off)


def retrack(
    images: np.ndarray,
    tilt_deg: np.ndarray,
    geometry: Geometry,
    points_xyz: np.ndarray,
    tracks: Tracks,
    *,
    diameter_px: float,
    search_px: float | None = None,
    min_score: float = 0.6,
) -> Tracks:
    """Re-find every bead where a refined geometry predicts it (fills gaps, fixes strays).

    ``geometry.project(points_xyz)`` gives the predictions; each bead is
    looked for within ``search_px`` (default max(2.5, diameter / 4)) of its
    prediction, or of its old position in ``tracks`` when that lies closer
    than ``search_px`` to the prediction, and refined with the sphere fit;
    it is accepted with the tests of :func:`track_beads` (NCC, distance, a
    fit like the view's others). Beads whose predictions overlap (closer than
    1.25 diameters) are left out of that view. Points that cannot be
    re-found are NaN, whether or not ``tracks`` had them.

    Parameters
    ----------
    images : (n, h, w) array
        Line-integral images.
    tilt_deg : (n,) array
        Tilt angles (only checked for shape; the geometry carries the tilts).
    geometry : Geometry
        The refined geometry, in the same gauge as ``points_xyz``.
    points_xyz : (m, 3) array
        Bead positions (rows of NaN for beads without a position).
    tracks : Tracks
        The tracks being refreshed, (n, m) points.
    diameter_px : float
        Projected bead diameter, pixels.
    search_px : float, optional
        Search radius around each prediction.
    min_score : float
        NCC a point must reach.
    """
    stack = _check_stack(images)
    d = _check_diameter(diameter_px)
    n, h, w = stack.shape
    tilt = np.asarray(tilt_deg, dtype=float)
    if tilt.shape != (n,):
        raise ConfigError(f"tilt_deg: expected {n} tilt angles (one per view), got shape {tilt.shape}")
    if not isinstance(geometry, Geometry) or geometry.n_views != n or tuple(geometry.image_shape) != (h, w):
        raise ConfigError(f"geometry: expected a Geometry of {n} views of shape ({h}, {w})")
    pts = np.asarray(points_xyz, dtype=float)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ConfigError(f"points_xyz: expected an (m, 3) array, got shape {pts.shape}")
    m = pts.shape[0]
    if not isinstance(tracks, Tracks):
        raise ConfigError(f"tracks: expected a Tracks, got {type(tracks).__name__}")
    if tracks.xy.shape != (n, m, 2):
        raise ConfigError(f"tracks: expected positions of shape {(n, m, 2)}, got {tracks.xy.shape}")
    search = max(2.5, 0.25 * d) if search_px is None else _positive(search_px, "search_px")
    finite_pts = np.all(np.isfinite(pts), axis=1)
    pred = geometry.project(np.where(finite_pts[:, None], pts, 0.0))
    template = bead_template(d)
    half_fit = _box_half(d)
    xy = np.full((n, m, 2), np.nan)
    score = np.zeros((n, m))
    for v in range(n):
        crowded = _crowded(pred[v], finite_pts, 1.25 * d)
        idx = np.nonzero(finite_pts & ~crowded)[0]
        if idx.size == 0:
            continue
        centre = pred[v, idx].copy()
        old = tracks.xy[v, idx]
        use_old = np.all(np.isfinite(old), axis=1) & (np.hypot(*(old - centre).T) < search)
        centre[use_old] = old[use_old]
        img = np.asarray(stack[v], dtype=np.float64)
        found_xy, s, inside = _search(img, centre, search, template)
        others = pred[v, finite_pts & crowded]
        fit = _fit(img, found_xy, d, half_fit, others if len(others) else None, 0.4 * d)
        ok = inside & (s >= min_score) & fit.ok & (np.hypot(*(fit.xy - pred[v, idx]).T) <= search + 1.0)
        ok &= _consistent_fits(fit, ok)
        xy[v, idx[ok]] = fit.xy[ok]
        score[v, idx[ok]] = s[ok]
    return Tracks(xy, score)

"""Small image operations shared by the aligners: line integrals, binning, filtering, correlation.

Conventions (DESIGN.md section 3): an image ``img[row, col]`` of shape (h, w)
has its pixel centres at ``x = col - (w - 1) / 2``, ``y = row - (h - 1) / 2``.
Every function here keeps that centre: binning by ``b`` maps the centred
coordinate ``x`` to ``x / b`` with no half-pixel offset, and resampling works
in centred coordinates.

Shifts follow one rule throughout: ``cross_correlate(a, b)`` returns ``d``
with ``b(p) ~ a(p - d)``, i.e. ``d`` is how far ``b``'s content sits from
``a``'s, in pixels ``(dx, dy)``.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numba
import numpy as np
from scipy import fft, ndimage

from simtomo.errors import ConfigError

__all__ = [
    "fourier_bin",
    "auto_binning",
    "frequency_radius",
    "bandpass_filter",
    "bandpass",
    "taper_window",
    "edge_taper",
    "affine_resample",
    "extract_patches",
    "spectral_anisotropy",
    "Correlation",
    "StackCorrelation",
    "cross_correlate",
    "correlate_stack",
    "subpixel_peak",
    "parabolic_peak",
    "fourier_shift",
]

log = logging.getLogger(__name__)

def _workers() -> int:
    return -1


def auto_binning(shape: tuple[int, int], target_px: int) -> int:
    """The integer binning that brings the larger side of ``shape`` closest to ``target_px`` (at least 1)."""
    if target_px < 1:
        raise ConfigError(f"target size: expected a positive number of pixels, got {target_px}")
    return max(1, int(round(max(shape) / float(target_px))))


def _binned_size(n: int, factor: int) -> int:
    return n // factor


def fourier_bin(image: np.ndarray, factor: int) -> np.ndarray:
    """Downsample by an integer factor by cropping the Fourier transform (an ideal anti-alias filter).

    The centred coordinates are preserved: the content at ``x`` in the input
    appears at ``x / factor`` in the output (no half-pixel shift), and the mean
    value is unchanged. A side that is not a multiple of ``factor`` loses its
    last ``size % factor`` pixels' worth of field, symmetrically.

    Parameters
    ----------
    image : (..., h, w) array
        One image or a stack; binned over the last two axes.
    factor : int
        Binning factor, >= 1; 1 returns a float copy.

    Returns
    -------
    (..., h // factor, w // factor) float32 array
    """
    if isinstance(factor, bool) or not float(factor).is_integer() or factor < 1:
        raise ConfigError(f"binning factor: expected an integer >= 1, got {factor!r}")
    factor = int(factor)
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim < 2:
        raise ConfigError(f"image: expected at least 2 dimensions, got shape {arr.shape}")
    h, w = arr.shape[-2:]
    hb, wb = _binned_size(h, factor), _binned_size(w, factor)
    if hb < 2 or wb < 2:
        raise ConfigError(f"binning factor {factor}: image of shape {(h, w)} would shrink below 2 px")
    if factor == 1:
        return arr.copy()
    # Crop to a multiple of the factor so the output spacing is exactly ``factor``.
    rh, rw = h - hb * factor, w - wb * factor
    r0, c0 = rh // 2, rw // 2
    crop = arr[..., r0 : r0 + hb * factor, c0 : c0 + wb * factor]
    hc, wc = crop.shape[-2:]
    spec = fft.rfft2(crop, workers=_workers())
    # Keep frequencies |k| < Nyquist of the output; drop the output Nyquist row/column,
    # whose sign is ambiguous for a real image.
    ky = np.concatenate([np.arange(0, (hb + 1) // 2), np.arange(hc - (hb - 1) // 2, hc)])
    small = np.zeros(arr.shape[:-2] + (hb, wb // 2 + 1), dtype=spec.dtype)
    rows = np.concatenate([np.arange(0, (hb + 1) // 2), np.arange(hb - (hb - 1) // 2, hb)])
    ncol = (wb + 1) // 2  # columns 0 .. below the output Nyquist
    small[..., rows, :ncol] = spec[..., ky, :ncol]
    # Output pixel j must sample cropped-index position  b*j + delta  with delta chosen so the
    # centred coordinates agree; a Fourier phase ramp applies the sub-pixel part.
    dy = ((h - 1) / 2.0 - r0 - factor * (hb - 1) / 2.0) / factor
    dx = ((w - 1) / 2.0 - c0 - factor * (wb - 1) / 2.0) / factor
    fy = fft.fftfreq(hb)[:, None]
    fx = fft.rfftfreq(wb)[None, :]
    small *= np.exp(2j * np.pi * (fy * dy + fx * dx)).astype(small.dtype)
    out = fft.irfft2(small, s=(hb, wb), workers=_workers())
    out *= 1.0 / (factor * factor)
    return out.astype(np.float32, copy=False)


def frequency_radius(shape: tuple[int, int], *, real: bool = True) -> np.ndarray:
    """Spatial frequency magnitude in cycles per pixel on the (r)fft2 grid of an image of ``shape``."""
    h, w = shape
    fy = fft.fftfreq(h)[:, None]
    fx = (fft.rfftfreq(w) if real else fft.fftfreq(w))[None, :]
    return np.sqrt(fx * fx + fy * fy)


def bandpass_filter(
    shape: tuple[int, int],
    *,
    lowpass: float | None = None,
    lowpass_rolloff: float = 0.05,
    highpass: float | None = None,
) -> np.ndarray:
    """A radial band-pass on the ``rfft2`` grid of an image of ``shape`` (values in [0, 1]).

    Parameters
    ----------
    shape : (h, w)
        Image shape (of the padded image, when the filter is applied after padding).
    lowpass : float, optional
        Pass-band edge in cycles per pixel (0 < lowpass <= 0.5): 1 below it,
        Gaussian fall-off with ``lowpass_rolloff`` sigma above it. None: no low-pass.
    lowpass_rolloff : float
        Sigma of the Gaussian edge of the low-pass, cycles per pixel (> 0).
    highpass : float, optional
        Sigma of the Gaussian high-pass ``1 - exp(-k^2 / (2 sigma^2))``,
        cycles per pixel (> 0). None: no high-pass (the mean is kept).

    Returns
    -------
    (h, w // 2 + 1) float32 array
    """
    if lowpass is not None and not (0 < lowpass <= 0.5):
        raise ConfigError(f"lowpass: expected a cut-off in (0, 0.5] cycles/px, got {lowpass!r}")
    if not lowpass_rolloff > 0:
        raise ConfigError(f"lowpass_rolloff: expected a positive width in cycles/px, got {lowpass_rolloff!r}")
    if highpass is not None and not (0 < highpass < 0.5):
        raise ConfigError(f"highpass: expected a sigma in (0, 0.5) cycles/px, got {highpass!r}")
    key = (int(shape[0]), int(shape[1]), None if lowpass is None else float(lowpass), float(lowpass_rolloff),
           None if highpass is None else float(highpass))
    return _cached_filter(*key)


@functools.lru_cache(maxsize=64)
def _cached_filter(h: int, w: int, lowpass: float | None, rolloff: float, highpass: float | None) -> np.ndarray:
    """The filter of :func:`bandpass_filter`, computed once per shape and band (read-only)."""
    k = frequency_radius((h, w))
    filt = np.ones_like(k)
    if lowpass is not None:
        over = np.maximum(k - lowpass, 0.0)
        filt *= np.exp(-(over * over) / (2.0 * rolloff**2))
    if highpass is not None:
        filt *= -np.expm1(-(k * k) / (2.0 * highpass**2))
    out = filt.astype(np.float32)
    out.flags.writeable = False
    return out


def bandpass(image: np.ndarray, *, lowpass: float | None = None, lowpass_rolloff: float = 0.05, highpass: float | None = None) -> np.ndarray:
    """Apply :func:`bandpass_filter` to an image (periodic boundary: taper first)."""
    arr = np.asarray(image, dtype=np.float32)
    filt = bandpass_filter(arr.shape[-2:], lowpass=lowpass, lowpass_rolloff=lowpass_rolloff, highpass=highpass)
    return fft.irfft2(fft.rfft2(arr, workers=_workers()) * filt, s=arr.shape[-2:], workers=_workers()).astype(np.float32)


def taper_window(shape: tuple[int, int], width_px: float) -> np.ndarray:
    """A separable window: 1 inside, a cosine edge falling to 0 over ``width_px`` at each border.

    The outermost pixels are exactly 0, so an image tapered to its mean can be
    padded with that mean without a step.
    """
    h, w = shape
    if not width_px >= 0:
        raise ConfigError(f"taper width: expected >= 0 px, got {width_px!r}")

    def edge(n: int) -> np.ndarray:
        width = min(float(width_px), n / 2.0)
        if width <= 0:
            return np.ones(n, dtype=np.float32)
        d = np.minimum(np.arange(n), np.arange(n)[::-1]).astype(float)  # distance to the nearest border
        ramp = 0.5 - 0.5 * np.cos(np.pi * np.clip(d / width, 0.0, 1.0))
        return ramp.astype(np.float32)

    return edge(h)[:, None] * edge(w)[None, :]


def edge_taper(image: np.ndarray, width_px: float, *, mean: float | None = None) -> np.ndarray:
    """Blend an image into its mean near the borders: ``mean + (image - mean) * window``.

    Parameters
    ----------
    image : (h, w) array
    width_px : float
        Width of the cosine edge.
    mean : float, optional
        The value to taper to; defaults to the image mean.
    """
    arr = np.asarray(image, dtype=np.float32)
    m = float(arr.mean(dtype=np.float64)) if mean is None else float(mean)
    return (m + (arr - m) * taper_window(arr.shape, width_px)).astype(np.float32)


@numba.njit(cache=True, nogil=True)
def _bilinear_affine(image, m_rc, off_rc, ho, wo, cval):  # pragma: no cover - compiled
    """``out[r, c] = image at (m_rc @ (r, c) + off_rc)`` by bilinear interpolation; ``cval`` outside ``[0, n - 1]``.

    The same rule as scipy's ``mode="constant"``: no interpolation toward
    ``cval`` beyond the last pixel centre.
    """
    h, w = image.shape
    out = np.empty((ho, wo), dtype=np.float32)
    for r in range(ho):
        y0 = m_rc[0, 0] * r + off_rc[0]
        x0 = m_rc[1, 0] * r + off_rc[1]
        for c in range(wo):
            y = y0 + m_rc[0, 1] * c
            x = x0 + m_rc[1, 1] * c
            if y < -1e-9 or y > h - 1 + 1e-9 or x < -1e-9 or x > w - 1 + 1e-9:
                out[r, c] = cval
                continue
            y = min(max(y, 0.0), h - 1.0)
            x = min(max(x, 0.0), w - 1.0)
            iy = int(np.floor(y))
            ix = int(np.floor(x))
            fy = y - iy
            fx = x - ix
            acc = 0.0
            for dy in range(2):
                yy = iy + dy
                wy = fy if dy else 1.0 - fy
                for dx in range(2):
                    xx = ix + dx
                    wx = fx if dx else 1.0 - fx
                    if wy * wx != 0.0:
                        acc += wy * wx * image[yy, xx]
            out[r, c] = acc
    return out


def affine_resample(
    image: np.ndarray,
    matrix: np.ndarray,
    offset: np.ndarray,
    output_shape: tuple[int, int] | None = None,
    *,
    order: int = 1,
    cval: float = 0.0,
) -> np.ndarray:
    """Resample ``out(q) = image(matrix @ q + offset)`` in centred pixel coordinates.

    ``q`` and ``matrix @ q + offset`` are ``(x, y)`` coordinates centred on the
    output and input image respectively (DESIGN.md section 3); e.g. with
    ``matrix = s R(phi)`` and ``offset = t`` this is
    :func:`simtomo.transforms.view_to_aligned`, with the freedom of any linear
    part (a stretch) and one interpolation pass.

    Parameters
    ----------
    image : (h, w) array
    matrix : (2, 2) array
    offset : (2,) array
    output_shape : (ho, wo), optional
        Defaults to the input shape.
    order : int
        Spline order: 1 (bilinear, compiled) or higher (scipy splines).
    cval : float
        Value where ``matrix @ q + offset`` falls outside the input's pixel centres.

    Returns
    -------
    (ho, wo) float32 array
    """
    arr = np.ascontiguousarray(image, dtype=np.float32)
    if arr.ndim != 2:
        raise ConfigError(f"affine_resample: expected a 2-D image, got shape {arr.shape}")
    h, w = arr.shape
    ho, wo = (int(v) for v in (output_shape or (h, w)))
    m = np.asarray(matrix, dtype=float)
    t = np.asarray(offset, dtype=float)
    # In (row, col) order: input_rc = M_rc @ output_rc + off_rc.
    m_rc = np.array([[m[1, 1], m[1, 0]], [m[0, 1], m[0, 0]]])
    centre_in = np.array([(h - 1) / 2.0, (w - 1) / 2.0])
    centre_out = np.array([(ho - 1) / 2.0, (wo - 1) / 2.0])
    off_rc = np.array([t[1], t[0]]) + centre_in - m_rc @ centre_out
    if order == 1:
        return _bilinear_affine(arr, m_rc, off_rc, ho, wo, float(cval))
    return ndimage.affine_transform(
        arr, m_rc, offset=off_rc, output_shape=(ho, wo), order=order, mode="constant", cval=cval, prefilter=order > 1
    ).astype(np.float32, copy=False)


def fourier_shift(image: np.ndarray, shift_xy) -> np.ndarray:
    """Translate by a sub-pixel ``(dx, dy)`` with a Fourier phase ramp (periodic): ``out(p) = image(p - d)``.

    Parameters
    ----------
    image : (h, w) or (m, h, w) array
    shift_xy : (2,) or (m, 2) array
        One shift, or one per image of a stack.

    Returns
    -------
    float64 array of the input's shape
    """
    arr = np.asarray(image, dtype=float)
    h, w = arr.shape[-2:]
    d = np.asarray(shift_xy, dtype=float)
    if d.shape[-1:] != (2,) or (d.ndim == 2 and (arr.ndim != 3 or d.shape[0] != arr.shape[0])) or d.ndim > 2:
        raise ConfigError(f"fourier_shift: expected a (2,) shift or one (m, 2) row per image, got shape {d.shape} for {arr.shape}")
    fy = fft.fftfreq(h)[:, None]
    fx = fft.rfftfreq(w)[None, :]
    dx = d[..., 0, None, None] if d.ndim == 2 else d[0]
    dy = d[..., 1, None, None] if d.ndim == 2 else d[1]
    ramp = np.exp(-2j * np.pi * (fx * dx + fy * dy))
    # The Nyquist row/column of a real signal cannot carry an odd phase; keep it real.
    if w % 2 == 0:
        ramp[..., :, -1] = ramp[..., :, -1].real
    if h % 2 == 0:
        ramp[..., h // 2, :] = ramp[..., h // 2, :].real
    return fft.irfft2(fft.rfft2(arr, workers=_workers()) * ramp, s=(h, w), workers=_workers())


def extract_patches(image: np.ndarray, corners_rc: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Copy square (or ``(ph, pw)``) patches whose top-left pixels are ``corners_rc`` (m, 2) ``(row, col)``.

    Every patch must lie inside the image.

    Returns
    -------
    (m, ph, pw) float32 array
    """
    arr = np.asarray(image, dtype=np.float32)
    ph, pw = (size, size) if np.isscalar(size) else tuple(size)
    rc = np.asarray(corners_rc, dtype=int).reshape(-1, 2)
    h, w = arr.shape
    if rc.size and (rc.min() < 0 or np.any(rc[:, 0] + ph > h) or np.any(rc[:, 1] + pw > w)):
        raise ConfigError(f"extract_patches: a {ph}x{pw} patch reaches outside the {h}x{w} image")
    rows = rc[:, 0, None, None] + np.arange(ph)[None, :, None]
    cols = rc[:, 1, None, None] + np.arange(pw)[None, None, :]
    return arr[rows, cols]


def spectral_anisotropy(
    images: np.ndarray, *, lowpass: float | None = None, lowpass_rolloff: float = 0.05, highpass: float | None = None
) -> np.ndarray:
    """How line-like each image is: ``(l1 - l2) / (l1 + l2)`` of its band-passed structure tensor.

    The structure tensor is taken from the power spectrum,
    ``J = sum_k |F(k)|^2 k k^T`` (the Fourier form of the summed gradient
    outer products). A patch of isotropic blobs gives a value near 0, a patch
    dominated by one straight edge or filament a value near 1; such patches
    locate a shift only across the line (the aperture problem).

    Parameters
    ----------
    images : (m, h, w) or (h, w) array
        Mean-free, tapered images (e.g. patches).
    lowpass, lowpass_rolloff, highpass : float, optional
        Band-pass of :func:`bandpass_filter`, cycles per pixel.

    Returns
    -------
    (m,) or scalar float array, in [0, 1] (0 for an image without signal)
    """
    arr = np.asarray(images, dtype=np.float32)
    single = arr.ndim == 2
    if single:
        arr = arr[None]
    h, w = arr.shape[-2:]
    spec = fft.rfft2(arr, workers=_workers())
    filt = bandpass_filter((h, w), lowpass=lowpass, lowpass_rolloff=lowpass_rolloff, highpass=highpass)
    power = (spec.real**2 + spec.imag**2) * (filt * filt * _hermitian_weights(w)[None, :])
    ky = fft.fftfreq(h)[:, None]
    kx = fft.rfftfreq(w)[None, :]
    jxx = np.einsum("kij,ij->k", power, kx * kx, dtype=np.float64)
    jyy = np.einsum("kij,ij->k", power, np.broadcast_to(ky * ky, power.shape[1:]), dtype=np.float64)
    jxy = np.einsum("kij,ij->k", power, kx * ky, dtype=np.float64)
    tr = jxx + jyy
    disc = np.sqrt(np.maximum((jxx - jyy) ** 2 + 4.0 * jxy**2, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(tr > 0, disc / tr, 0.0)
    return out[0] if single else out


@dataclass(frozen=True, eq=False)
class Correlation:
    """A normalised cross-correlation of two images and its peak.

    Parameters
    ----------
    shift : (2,) array
        ``(dx, dy)`` with ``b(p) ~ a(p - shift)``, sub-pixel.
    peak : float
        Correlation coefficient at the integer peak: the band-passed images'
        normalised inner product at that shift, in [-1, 1].
    significance : float
        ``(peak - median) / (1.4826 MAD)`` of the searched map: how far the
        peak stands out of the map's own fluctuations (see :func:`correlate_stack`).
    cc_map : (2 sy + 1, 2 sx + 1) array
        The normalised map over the searched shifts, zero shift at the centre.
    """

    shift: np.ndarray
    peak: float
    significance: float
    cc_map: np.ndarray


@dataclass(frozen=True, eq=False)
class StackCorrelation:
    """Normalised cross-correlations of pairs of images (patches), one row per pair.

    Parameters
    ----------
    shift : (m, 2) array
        ``(dx, dy)`` of each pair, ``b_k(p) ~ a_k(p - shift_k)``; NaN where invalid.
    peak : (m,) array
        Correlation coefficient at each integer peak; NaN where invalid.
    significance : (m,) array
        Peak height over the robust spread of its map; NaN where invalid.
    valid : (m,) bool array
        False for a pair in which either image has no signal in the pass band.
    curvature : (m, 3) array
        Second differences ``(c_xx, c_xy, c_yy)`` of the map at the integer
        peak (correlation units per px^2; negative definite at a clean peak).
        ``(-H)^-1`` with ``H = [[c_xx, c_xy], [c_xy, c_yy]]`` is proportional to
        the covariance of the peak position: large along a ridge.
    energy : (m, 2) array
        Band-passed energy (sum of squares) of ``a[k]`` and ``b[k]``: their contrast in the pass band.
    """

    shift: np.ndarray
    peak: np.ndarray
    significance: np.ndarray
    valid: np.ndarray
    curvature: np.ndarray
    energy: np.ndarray


def _max_shift(max_shift, shape: tuple[int, int]) -> tuple[int, int]:
    h, w = shape
    if max_shift is None:
        return (max(w // 2, 1), max(h // 2, 1))
    ms = np.broadcast_to(np.asarray(max_shift, dtype=float), (2,))
    if not np.all(np.isfinite(ms)) or not np.all(ms >= 1):
        raise ConfigError(f"max_shift: expected >= 1 px per axis, got {max_shift!r}")
    return (int(min(np.ceil(ms[0]), w - 1)), int(min(np.ceil(ms[1]), h - 1)))


def _hermitian_weights(width: int, dtype=np.float32) -> np.ndarray:
    """Weights of the ``rfft`` half-spectrum columns in a Parseval sum over the full spectrum."""
    wts = np.full(width // 2 + 1, 2.0, dtype=dtype)
    wts[0] = 1.0
    if width % 2 == 0:
        wts[-1] = 1.0
    return wts


@numba.njit(cache=True, nogil=True)
def _dft_contract(cross, xs, ys, h, w):  # pragma: no cover - compiled
    """``sum_{ky,kx} wt(kx) cross[k, ky, kx] exp(2 pi i (ky y / h + kx x / w))`` (real part) on per-map grids.

    A compiled loop rather than BLAS: the products are small and many, and a
    threaded BLAS on a busy machine spends more time waiting than computing.
    """
    m, hh, wr = cross.shape
    ny = ys.shape[1]
    nx = xs.shape[1]
    out = np.zeros((m, ny, nx))
    tr = np.empty((ny, wr))
    ti = np.empty((ny, wr))
    for k in range(m):
        tr[:] = 0.0
        ti[:] = 0.0
        for r in range(hh):
            kyv = r if r <= (h - 1) // 2 else r - h  # fftfreq order
            for a in range(ny):
                ph = 2.0 * np.pi * ((kyv * ys[k, a]) % h) / h
                er = np.cos(ph)
                ei = np.sin(ph)
                for c in range(wr):
                    z = cross[k, r, c]
                    tr[a, c] += er * z.real - ei * z.imag
                    ti[a, c] += er * z.imag + ei * z.real
        for b in range(nx):
            for c in range(wr):
                ph = 2.0 * np.pi * ((c * xs[k, b]) % w) / w
                wt = 1.0 if (c == 0 or (w % 2 == 0 and c == w // 2)) else 2.0
                cr = wt * np.cos(ph)
                ci = wt * np.sin(ph)
                for a in range(ny):
                    out[k, a, b] += tr[a, c] * cr - ti[a, c] * ci
    return out


def _dft_eval(cross: np.ndarray, shape: tuple[int, int], xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Evaluate the inverse DFT of half-spectra ``cross`` (m, H, W//2+1) at per-map shifts.

    ``xs`` (m, nx) and ``ys`` (m, ny) are shifts in pixels; returns (m, ny, nx),
    unnormalised (a common positive factor does not move a maximum).
    """
    h, w = shape
    return _dft_contract(np.ascontiguousarray(cross), np.ascontiguousarray(xs, dtype=float),
                         np.ascontiguousarray(ys, dtype=float), int(h), int(w))


def _parabola_offsets(maps: np.ndarray, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
    """Per-map 3-point parabolic offsets ``(dx, dy)`` of integer maxima, clipped to +-0.5 (0 at a border)."""
    m, h, w = maps.shape
    idx = np.arange(m)
    out = np.zeros((m, 2))
    for axis, (i, n) in enumerate(((ix, w), (iy, h))):
        inner = (i > 0) & (i < n - 1)
        lo_i, hi_i = np.clip(i - 1, 0, n - 1), np.clip(i + 1, 0, n - 1)
        if axis == 0:
            lo, mid, hi = maps[idx, iy, lo_i], maps[idx, iy, ix], maps[idx, iy, hi_i]
        else:
            lo, mid, hi = maps[idx, lo_i, ix], maps[idx, iy, ix], maps[idx, hi_i, ix]
        den = lo - 2.0 * mid + hi
        ok = inner & (den < 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            off = np.where(ok, 0.5 * (lo - hi) / np.where(ok, den, -1.0), 0.0)
        out[:, axis] = np.clip(off, -0.5, 0.5)
    return out


def parabolic_peak(cc: np.ndarray, peak_index: tuple[int, int]) -> np.ndarray:
    """Sub-pixel offset ``(dx, dy)`` of a peak from a 3-point parabola per axis (0 at a border)."""
    iy, ix = peak_index
    return _parabola_offsets(np.asarray(cc, dtype=float)[None], np.array([iy]), np.array([ix]))[0]


def _refine_dft(cross: np.ndarray, shape: tuple[int, int], start: np.ndarray, upsample: int) -> np.ndarray:
    """Refine shifts ``start`` (m, 2) on the band-limited maps by Newton steps on exact samples.

    Each step samples the map (a matrix DFT of the cross-power spectrum) on a
    3 x 3 stencil of spacing ``1 / upsample`` px around the current estimate
    and moves to the vertex of the per-axis parabolas. With a stencil this
    small the parabola is exact to far below 0.01 px, so two or three steps
    from a parabolic start converge; steps are capped at one stencil radius
    of 0.5 px.
    """
    spacing = 1.0 / float(upsample)
    offs = np.array([-spacing, 0.0, spacing])
    cur = np.array(start, dtype=float)
    for _ in range(4):
        vals = _dft_eval(cross, shape, cur[:, :1] + offs[None, :], cur[:, 1:] + offs[None, :])
        c = vals[:, 1, 1]
        dxx = vals[:, 1, 2] + vals[:, 1, 0] - 2.0 * c
        dyy = vals[:, 2, 1] + vals[:, 0, 1] - 2.0 * c
        gx = 0.5 * (vals[:, 1, 2] - vals[:, 1, 0])
        gy = 0.5 * (vals[:, 2, 1] - vals[:, 0, 1])
        with np.errstate(divide="ignore", invalid="ignore"):
            step_x = np.where(dxx < 0, -gx / dxx, np.sign(gx)) * spacing
            step_y = np.where(dyy < 0, -gy / dyy, np.sign(gy)) * spacing
        step = np.clip(np.stack([step_x, step_y], axis=1), -0.5, 0.5)
        cur = cur + step
        if np.all(np.abs(step) < 1e-3):
            break
    return cur


def subpixel_peak(cross: np.ndarray, shape: tuple[int, int], integer_shift: np.ndarray, *, upsample: int = 20) -> np.ndarray:
    """Refine an integer correlation peak on the band-limited map (no pull toward pixel centres).

    The map is the inverse DFT of the (filtered) cross-power spectrum
    ``cross`` (``rfft2`` layout of the padded ``shape``). It is evaluated
    exactly (a matrix DFT) on a grid of spacing ``1 / upsample`` px around the
    peak, and the grid maximum is polished by a parabola. Unlike a parabola on
    the integer samples, this is unbiased for any peak shape.

    Parameters
    ----------
    cross : (H, W // 2 + 1) complex array
    shape : (H, W)
    integer_shift : (2,) array
        ``(dx, dy)`` near the peak (within ~0.5 px).
    upsample : int
        Grid points per pixel (>= 2).

    Returns
    -------
    (2,) array, the refined ``(dx, dy)``.
    """
    if upsample < 2:
        raise ConfigError(f"upsample: expected >= 2, got {upsample!r}")
    x0, y0 = float(integer_shift[0]), float(integer_shift[1])
    offs = np.array([-1.0, 0.0, 1.0])
    vals = _dft_eval(np.asarray(cross)[None], shape, (x0 + offs)[None], (y0 + offs)[None])
    start = np.array([[x0, y0]]) + _parabola_offsets(vals, np.array([1]), np.array([1]))
    return _refine_dft(np.asarray(cross)[None], shape, start, upsample)[0]


def _peak_curvature(maps: np.ndarray, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
    """Second differences ``(c_xx, c_xy, c_yy)`` at each integer maximum (NaN on a border)."""
    m, h, w = maps.shape
    out = np.full((m, 3), np.nan)
    inner = (iy > 0) & (iy < h - 1) & (ix > 0) & (ix < w - 1)
    k, y, x = np.arange(m)[inner], iy[inner], ix[inner]
    c = maps[k, y, x].astype(float)
    out[inner, 0] = maps[k, y, x + 1] + maps[k, y, x - 1] - 2.0 * c
    out[inner, 2] = maps[k, y + 1, x] + maps[k, y - 1, x] - 2.0 * c
    out[inner, 1] = 0.25 * (maps[k, y + 1, x + 1] + maps[k, y - 1, x - 1] - maps[k, y + 1, x - 1] - maps[k, y - 1, x + 1])
    return out


def _robust_significance(maps: np.ndarray, peaks: np.ndarray) -> np.ndarray:
    flat = maps.reshape(len(maps), -1)
    # a few thousand values fix a median and a MAD to within a few per cent
    step = max(1, flat.shape[1] // 4096)
    flat = flat[:, ::step]
    med = np.median(flat, axis=1)
    mad = np.median(np.abs(flat - med[:, None]), axis=1) * 1.4826
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(mad > 0, (peaks - med) / mad, np.where(peaks > med, np.inf, 0.0))


def correlate_stack(
    a: np.ndarray,
    b: np.ndarray,
    *,
    max_shift: float | tuple[float, float] | None = None,
    lowpass: float | None = None,
    lowpass_rolloff: float = 0.05,
    highpass: float | None = None,
    subpixel: str = "dft",
    upsample: int = 20,
    chunk: int = 128,
    return_maps: bool = False,
):
    """Normalised cross-correlation of each pair ``(a[k], b[k])`` of equally shaped images.

    Each image has its mean removed (it should already be tapered toward its
    mean at the borders, see :func:`edge_taper`) and is zero padded by
    ``max_shift`` so that no shift within the search wraps around; the
    cross-power spectrum is band-passed and normalised by the band-passed
    energies, so a perfect match peaks at 1.

    The significance of a peak is ``(peak - median) / (1.4826 MAD)`` over the
    whole searched map: the correlation of unrelated images is a smooth random
    field whose maximum over the search region rarely exceeds ~5-6 robust
    standard deviations, while a real match stands far above it.

    Parameters
    ----------
    a, b : (m, h, w) arrays
    max_shift : float or (sx, sy), optional
        Largest shift searched per axis in pixels, and the zero padding; default
        half of each side.
    lowpass, lowpass_rolloff, highpass : float, optional
        Band-pass of :func:`bandpass_filter`, cycles per pixel.
    subpixel : {"dft", "parabolic", "none"}
        Peak refinement: evaluation of the band-limited map on a fine grid
        (unbiased, :func:`subpixel_peak`), a 3-point parabola per axis (biased
        toward pixel centres by up to a few hundredths of a pixel), or none.
    upsample : int
        Grid points per pixel of the ``"dft"`` refinement.
    chunk : int
        Pairs transformed at once (bounds memory).
    return_maps : bool
        Also return the normalised maps (m, 2 sy + 1, 2 sx + 1), zero shift at the centre.

    Returns
    -------
    StackCorrelation, or (StackCorrelation, maps) when ``return_maps``.
    """
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    if a.shape != b.shape or a.ndim != 3 or a.shape[0] == 0:
        raise ConfigError(f"correlate_stack: expected two (m, h, w) stacks of equal shape, got {a.shape} and {b.shape}")
    if subpixel not in ("dft", "parabolic", "none"):
        raise ConfigError(f"subpixel: expected 'dft', 'parabolic' or 'none', got {subpixel!r}")
    if subpixel == "dft" and upsample < 2:
        raise ConfigError(f"upsample: expected >= 2, got {upsample!r}")
    m, h, w = a.shape
    ms = _max_shift(max_shift, (h, w))
    shape = (
        fft.next_fast_len(int(h + ms[1]), real=True),
        fft.next_fast_len(int(w + ms[0]), real=True),
    )
    filt = bandpass_filter(shape, lowpass=lowpass, lowpass_rolloff=lowpass_rolloff, highpass=highpass)
    wts = _hermitian_weights(shape[1])
    shift = np.full((m, 2), np.nan)
    peak = np.full(m, np.nan)
    signif = np.full(m, np.nan)
    valid = np.zeros(m, dtype=bool)
    curv = np.full((m, 3), np.nan)
    energy = np.zeros((m, 2))
    maps_out = np.zeros((m, 2 * ms[1] + 1, 2 * ms[0] + 1), dtype=np.float32) if return_maps else None
    for lo in range(0, m, chunk):
        sl = slice(lo, min(lo + chunk, m))
        ca = a[sl] - a[sl].mean(axis=(1, 2), dtype=np.float64, keepdims=True).astype(np.float32)
        cb = b[sl] - b[sl].mean(axis=(1, 2), dtype=np.float64, keepdims=True).astype(np.float32)
        fa = fft.rfft2(ca, s=shape, workers=_workers())
        fb = fft.rfft2(cb, s=shape, workers=_workers())
        ea = np.einsum("kij,j->k", (fa.real**2 + fa.imag**2) * filt, wts, dtype=np.float64)
        eb = np.einsum("kij,j->k", (fb.real**2 + fb.imag**2) * filt, wts, dtype=np.float64)
        norm = np.sqrt(ea * eb)
        ok = norm > 0
        energy[sl, 0], energy[sl, 1] = ea / (shape[0] * shape[1]), eb / (shape[0] * shape[1])
        cross = np.conj(fa)
        cross *= fb
        cross *= filt
        cc = fft.irfft2(cross, s=shape, workers=_workers())
        scale = np.where(ok, (shape[0] * shape[1]) / np.where(ok, norm, 1.0), 0.0).astype(np.float32)
        cc *= scale[:, None, None]
        cc = np.roll(cc, (ms[1], ms[0]), axis=(1, 2))[:, : 2 * ms[1] + 1, : 2 * ms[0] + 1]
        flat = cc.reshape(len(cc), -1).argmax(axis=1)
        iy, ix = np.unravel_index(flat, cc.shape[1:])
        pk = cc[np.arange(len(cc)), iy, ix].astype(float)
        sh = np.stack([ix - ms[0], iy - ms[1]], axis=1).astype(float)
        if subpixel == "parabolic":
            sh = sh + _parabola_offsets(cc, iy, ix)
        elif subpixel == "dft":
            start = sh + _parabola_offsets(cc, iy, ix)
            sh = _refine_dft(cross, shape, start, upsample)
        sig = _robust_significance(cc, pk)
        idx = np.arange(sl.start, sl.stop)[ok]
        shift[idx] = sh[ok]
        peak[idx] = pk[ok]
        signif[idx] = sig[ok]
        valid[idx] = True
        curv[idx] = _peak_curvature(cc, iy, ix)[ok]
        if maps_out is not None:
            maps_out[sl] = cc
    result = StackCorrelation(shift=shift, peak=peak, significance=signif, valid=valid, curvature=curv, energy=energy)
    return (result, maps_out) if return_maps else result


def cross_correlate(
    a: np.ndarray,
    b: np.ndarray,
    *,
    max_shift: float | tuple[float, float] | None = None,
    lowpass: float | None = None,
    lowpass_rolloff: float = 0.05,
    highpass: float | None = None,
    subpixel: str = "dft",
    upsample: int = 20,
) -> Correlation:
    """Normalised cross-correlation of two equally shaped images; see :func:`correlate_stack`.

    Returns
    -------
    Correlation
        ``shift`` with ``b(p) ~ a(p - shift)``, the peak's correlation
        coefficient and significance, and the searched map.

    Raises
    ------
    ConfigError
        For images of different shapes, or an image with no signal in the pass band.
    """
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    if a.shape != b.shape or a.ndim != 2:
        raise ConfigError(f"cross_correlate: expected two 2-D images of equal shape, got {a.shape} and {b.shape}")
    res, maps = correlate_stack(
        a[None], b[None], max_shift=max_shift, lowpass=lowpass, lowpass_rolloff=lowpass_rolloff,
        highpass=highpass, subpixel=subpixel, upsample=upsample, return_maps=True,
    )
    if not res.valid[0]:
        raise ConfigError("cross_correlate: an image has no signal in the pass band (a constant image?)")
    return Correlation(shift=res.shift[0], peak=float(res.peak[0]), significance=float(res.significance[0]), cc_map=maps[0])

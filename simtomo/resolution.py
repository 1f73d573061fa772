"""Fourier-shell metrics of reconstructions: FSC, coherent transfer, resolution (DESIGN.md section 5).

Shells
------
Volumes are ``vol[z, y, x]`` with the same voxel edge on every axis, so the
physical spatial frequency of a Fourier sample is ``|k|`` with each component
on its own axis grid (``k_i`` in multiples of ``1 / n_i`` cycles per voxel).
Anisotropic volumes (a 64 x 256 x 256 slab) are therefore shelled correctly.
Shell ``i`` holds the samples with ``i w <= |k| < (i + 1) w``, ``w = 0.5 / n_shells``
cycles per voxel; the shells cover ``[0, Nyquist)``, so samples at or beyond
Nyquist (the corners of the cube and the ``-1/2`` planes of even axes) are not
used. By default ``n_shells = max(min(shape) // 2, 16)``: the shell width is the
Fourier spacing of the shortest axis, the finest width for which every shell
receives samples from every direction. Frequencies are reported at the shell
centres ``(i + 1/2) w`` in cycles per *unbinned specimen pixel*: per voxel
divided by ``voxel_size_px``.

Sums run over the half-space of ``rfftn`` with weights 2 for the interior
``kx`` columns and 1 for ``kx = 0`` and the ``kx`` Nyquist column (which hold
their own Hermitian partners), so every sum, and ``n_voxels``, equals the sum
over the full Fourier space.

Memory and time: the two spectra are computed in float64 (float32 FFTs lose
the weak high-frequency shells of a volume with a large mean) and reduced
plane by plane with :func:`numpy.bincount`; a 128 x 512 x 512 pair needs about
0.9 GB and a few seconds on two cores.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import scipy.fft

from simtomo.errors import ConfigError

__all__ = [
    "ShellCurve",
    "measured_wedge",
    "soft_mask",
    "fsc",
    "fsc_xy",
    "transfer",
    "predicted_transfer",
    "resolution_A",
    "crowther_limit_A",
    "DEFAULT_MIN_SHELL_VOXELS",
]

log = logging.getLogger(__name__)

# A shell with fewer Fourier samples has an FSC standard error above ~0.14
# (1/sqrt(n)); resolution_A does not let such a shell decide a crossing.
DEFAULT_MIN_SHELL_VOXELS = 50

# Fourier planes reduced per step: bounds the temporaries to a few MB per plane.
_PLANES_PER_CHUNK = 8

# Angular slack (degrees) so that samples exactly on a wedge boundary count as measured.
_ANGLE_TOL_DEG = 1e-9


@dataclass(frozen=True, eq=False)
class ShellCurve:
    """A quantity per Fourier shell.

    Attributes
    ----------
    frequency_per_px : (k,) float
        Shell centres in cycles per unbinned specimen pixel.
    values : (k,) float
        The quantity per shell (NaN where a shell has no samples or no power).
    n_voxels : (k,) int
        Fourier samples per shell, counted over the full (not half) Fourier space
        and inside the region the curve was restricted to.
    nyquist_per_px : float or None
        Nyquist frequency of the sampling in cycles per unbinned pixel
        (``0.5 / voxel_size_px``); derived from the shell spacing when None.
    """

    frequency_per_px: np.ndarray
    values: np.ndarray
    n_voxels: np.ndarray
    nyquist_per_px: float | None = field(default=None)

    def __post_init__(self) -> None:
        freq = np.asarray(self.frequency_per_px, dtype=np.float64).reshape(-1)
        vals = np.asarray(self.values, dtype=np.float64).reshape(-1)
        nvox = np.asarray(self.n_voxels).reshape(-1).astype(np.int64)
        if not (freq.size == vals.size == nvox.size):
            raise ConfigError(
                "ShellCurve: frequency_per_px, values and n_voxels must have equal lengths, "
                f"got {freq.size}, {vals.size}, {nvox.size}"
            )
        if freq.size and (not np.all(np.isfinite(freq)) or np.any(np.diff(freq) <= 0)):
            raise ConfigError("ShellCurve.frequency_per_px: expected finite, increasing frequencies")
        nyq = self.nyquist_per_px
        if nyq is None and freq.size >= 2:
            nyq = float(freq[-1] + 0.5 * (freq[-1] - freq[-2]))
        elif nyq is None and freq.size == 1:
            nyq = float(2.0 * freq[0])
        for name, arr in (("frequency_per_px", freq), ("values", vals), ("n_voxels", nvox)):
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        object.__setattr__(self, "nyquist_per_px", None if nyq is None else float(nyq))

    def __len__(self) -> int:
        return self.frequency_per_px.size

    def frequency_per_A(self, pixel_size_A: float) -> np.ndarray:
        """Shell centres in cycles per Ångström for a pixel of ``pixel_size_A``."""
        return self.frequency_per_px / _positive(pixel_size_A, "pixel_size_A")


# --------------------------------------------------------------------------- validation


def _positive(value, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected a positive number, got {value!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise ConfigError(f"{name}: expected a positive finite number, got {value!r}")
    return v


def _shape3(shape, name: str = "shape") -> tuple[int, int, int]:
    try:
        dims = tuple(int(s) for s in shape)
        ok = len(dims) == 3 and all(d >= 1 and d == s for d, s in zip(dims, shape))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"{name}: expected three positive integers (nz, ny, nx), got {shape!r}")
    return dims


def _volume(a, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 3 or arr.size == 0:
        raise ConfigError(f"{name}: expected a non-empty 3-D volume vol[z, y, x], got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ConfigError(f"{name}: expected a real-valued volume, got dtype {arr.dtype}")
    if not np.isfinite(arr).all():
        raise ConfigError(f"{name}: the volume contains NaN or infinite values")
    return arr


def _rfft_shape(shape: tuple[int, int, int]) -> tuple[int, int, int]:
    return (shape[0], shape[1], shape[2] // 2 + 1)


def _region(region, shape: tuple[int, int, int]) -> np.ndarray | None:
    if region is None:
        return None
    r = np.asarray(region)
    if r.dtype != np.bool_:
        raise ConfigError(f"region: expected a boolean mask on the rfftn grid, got dtype {r.dtype}")
    want = _rfft_shape(shape)
    try:
        return np.broadcast_to(r, want)
    except ValueError:
        raise ConfigError(
            f"region: expected a boolean mask of the rfftn grid shape {want} for volumes of shape {shape}, "
            f"got shape {r.shape}"
        ) from None


def _mask(mask, shape: tuple[int, int, int]):
    if mask is None:
        return None
    m = np.asarray(mask)
    if not (np.issubdtype(m.dtype, np.floating) or np.issubdtype(m.dtype, np.integer) or m.dtype == np.bool_):
        raise ConfigError(f"mask: expected a real-valued real-space mask, got dtype {m.dtype}")
    try:
        fits = np.broadcast_shapes(m.shape, shape) == shape
    except ValueError:
        fits = False
    if not fits:
        raise ConfigError(f"mask: expected a real-space mask of shape {shape}, got shape {m.shape}")
    if not np.isfinite(m).all():
        raise ConfigError("mask: contains NaN or infinite values")
    return m


def _n_shells(n_shells, default: int) -> int:
    if n_shells is None:
        return default
    if isinstance(n_shells, bool) or not isinstance(n_shells, (int, np.integer)) or n_shells < 1:
        raise ConfigError(f"n_shells: expected a positive integer, got {n_shells!r}")
    return int(n_shells)


# --------------------------------------------------------------------------- masks


def measured_wedge(shape, tilt_deg, *, margin_deg: float = 0.0) -> np.ndarray:
    """The Fourier samples measured by a single-axis tilt series about the y axis.

    A view at tilt ``theta`` looks along the beam ``d = R_y(theta)^T e_z =
    (-sin theta, 0, cos theta)`` in specimen coordinates and, by the
    central-slice theorem, measures the central plane ``k . d = 0``, i.e. the
    plane spanned by ``e_y`` and ``(cos theta, 0, sin theta)``: the samples
    whose direction in the (kx, kz) plane makes the angle
    ``alpha = atan(kz / kx) = theta`` (mod 180 degrees): a positive tilt
    measures samples whose kx and kz have the same sign. The union over the
    tilt range is the double wedge ``alpha in [min(tilt), max(tilt)]`` (mod 180);
    for an asymmetric range (a tilt offset) the sign matters. The ky axis
    (``kx = kz = 0``) lies in every plane.

    Parameters
    ----------
    shape : (nz, ny, nx)
        Real-space shape of the volume.
    tilt_deg : float or array
        The (true) tilt angles in degrees; only their minimum and maximum
        matter (the gaps between views are not excluded).
    margin_deg : float
        Widens (positive) or narrows (negative) the range on both sides.

    Returns
    -------
    (nz, ny, nx // 2 + 1) bool array
        True where measured, on the grid of ``scipy.fft.rfftn`` (frequencies
        ``fftfreq(nz)``, ``fftfreq(ny)``, ``rfftfreq(nx)`` per voxel).

    Raises
    ------
    ConfigError
        For a shape that is not three positive integers, no or non-finite
        tilt angles, or a margin that leaves no range.
    """
    nz, ny, nx = _shape3(shape)
    t = np.asarray(tilt_deg, dtype=np.float64).reshape(-1)
    if t.size == 0 or not np.all(np.isfinite(t)):
        raise ConfigError(f"tilt_deg: expected one or more finite angles in degrees, got {tilt_deg!r}")
    try:
        margin = float(margin_deg)
    except (TypeError, ValueError):
        margin = math.nan
    if not math.isfinite(margin):
        raise ConfigError(f"margin_deg: expected a finite angle in degrees, got {margin_deg!r}")
    lo, hi = float(t.min()) - margin, float(t.max()) + margin
    if hi < lo:
        raise ConfigError(f"margin_deg: {margin_deg} narrows the tilt range [{t.min()}, {t.max()}] to nothing")
    kz = scipy.fft.fftfreq(nz)[:, None]
    kx = scipy.fft.rfftfreq(nx)[None, :]
    if hi - lo >= 180.0:
        zx = np.ones((nz, kx.size), dtype=bool)
    else:
        alpha = np.degrees(np.arctan2(kz, kx))  # kx >= 0: alpha in [-90, 90]
        rel = np.mod(alpha - lo, 180.0)
        zx = (rel <= hi - lo + _ANGLE_TOL_DEG) | (rel >= 180.0 - _ANGLE_TOL_DEG)
        zx[0, 0] = True  # kx = kz = 0: the ky axis, common to all planes
    return np.ascontiguousarray(np.broadcast_to(zx[:, None, :], (nz, ny, kx.size)))


def soft_mask(shape, *, edge_voxels: float = 8) -> np.ndarray:
    """A real-space mask that is 1 inside and falls to 0 at the faces with a raised cosine.

    The taper along each axis is ``(1 - cos(pi u / e)) / 2`` at distance ``u``
    (voxel centre to the outer face of the edge voxel) for ``u < e``, with
    ``e = min(edge_voxels, n / 2)`` so that a short axis still reaches 1 at its
    centre. The mask is the product of the three tapers.

    Parameters
    ----------
    shape : (nz, ny, nx)
    edge_voxels : float
        Width of the taper in voxels; 0 gives a mask of ones.

    Returns
    -------
    float32 array of ``shape``
    """
    dims = _shape3(shape)
    try:
        e = float(edge_voxels)
    except (TypeError, ValueError):
        e = math.nan
    if not (math.isfinite(e) and e >= 0):
        raise ConfigError(f"edge_voxels: expected a finite width >= 0, got {edge_voxels!r}")
    tapers = []
    for n in dims:
        i = np.arange(n, dtype=np.float64)
        u = np.minimum(i, n - 1 - i) + 0.5
        ea = min(e, n / 2.0)
        w = np.ones(n) if ea == 0 else np.where(u < ea, 0.5 * (1.0 - np.cos(np.pi * u / ea)), 1.0)
        tapers.append(w)
    return (tapers[0][:, None, None] * tapers[1][None, :, None] * tapers[2][None, None, :]).astype(np.float32)


# --------------------------------------------------------------------------- shell sums


def _spectrum(vol: np.ndarray, mask) -> np.ndarray:
    x = np.array(vol, dtype=np.float64, copy=True) if mask is not None else np.asarray(vol, dtype=np.float64)
    if mask is not None:
        x *= mask
    return scipy.fft.rfftn(x, workers=-1)


def _shell_sums(
    a,
    b,
    *,
    voxel_size_px,
    region,
    mask,
    n_shells,
    default_shells=None,
    kz_max=None,
    need_aa=True,
    names=("a", "b"),
):
    """Per-shell sums ``Re F_a conj F_b``, ``|F_a|^2``, ``|F_b|^2`` and sample counts (full-space weights)."""
    a_in = a
    a = _volume(a_in, names[0])
    b = a if b is a_in else _volume(b, names[1])
    if a.shape != b.shape:
        raise ConfigError(
            f"volumes {names[0]} and {names[1]}: expected equal shapes, got {a.shape} and {b.shape}"
        )
    shape = a.shape
    b_px = _positive(voxel_size_px, "voxel_size_px")
    reg = _region(region, shape)
    m = _mask(mask, shape)
    ns = _n_shells(n_shells, default_shells if default_shells is not None else max(min(shape) // 2, 16))
    width = 0.5 / ns

    fa = _spectrum(a, m)
    fb = fa if b is a else _spectrum(b, m)

    nz, ny, nx = shape
    kz2 = scipy.fft.fftfreq(nz) ** 2
    ky2 = scipy.fft.fftfreq(ny)[None, :, None] ** 2
    kx = scipy.fft.rfftfreq(nx)
    kx2 = kx[None, None, :] ** 2
    # rfft half-space: columns other than kx = 0 and the even-nx Nyquist stand for two samples
    herm = np.full(kx.size, 2.0)
    herm[0] = 1.0
    if nx % 2 == 0:
        herm[-1] = 1.0
    herm = herm[None, None, :]
    keep_z = np.ones(nz, dtype=bool) if kz_max is None else np.abs(scipy.fft.fftfreq(nz)) <= kz_max

    s_ab = np.zeros(ns + 1)
    s_aa = np.zeros(ns + 1)
    s_bb = np.zeros(ns + 1)
    count = np.zeros(ns + 1)
    for z0 in range(0, nz, _PLANES_PER_CHUNK):
        z1 = min(z0 + _PLANES_PER_CHUNK, nz)
        zsel = keep_z[z0:z1]
        if not zsel.any():
            continue
        k = np.sqrt(kz2[z0:z1, None, None] + ky2 + kx2)
        shell = np.floor(k / width).astype(np.int64)
        np.minimum(shell, ns, out=shell)  # bin ns collects everything at or beyond Nyquist
        if reg is not None:
            shell[~reg[z0:z1]] = ns
        shell[~zsel] = ns
        idx = shell.reshape(-1)
        wgt = np.broadcast_to(herm, shell.shape).reshape(-1)
        ca, cb = fa[z0:z1].reshape(-1), fb[z0:z1].reshape(-1)
        count += np.bincount(idx, weights=wgt, minlength=ns + 1)
        s_ab += np.bincount(idx, weights=(ca.real * cb.real + ca.imag * cb.imag) * wgt, minlength=ns + 1)
        s_bb += np.bincount(idx, weights=(cb.real * cb.real + cb.imag * cb.imag) * wgt, minlength=ns + 1)
        if need_aa:
            s_aa += np.bincount(idx, weights=(ca.real * ca.real + ca.imag * ca.imag) * wgt, minlength=ns + 1)
    freq = (np.arange(ns) + 0.5) * width / b_px
    return freq, np.rint(count[:ns]).astype(np.int64), s_ab[:ns], s_aa[:ns], s_bb[:ns], 0.5 / b_px


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


# --------------------------------------------------------------------------- public metrics


def fsc(a, b, *, voxel_size_px: float = 1, region=None, mask=None, n_shells: int | None = None) -> ShellCurve:
    """Fourier shell correlation of two volumes.

    ``FSC(k) = Re sum F_a conj(F_b) / sqrt(sum |F_a|^2 sum |F_b|^2)`` over the
    Fourier samples of each shell (see the module notes for the shells).

    Parameters
    ----------
    a, b : (nz, ny, nx) arrays
        Volumes of equal shape and voxel size.
    voxel_size_px : float
        Voxel edge in unbinned specimen pixels; frequencies are reported per pixel.
    region : bool array on the rfftn grid, optional
        Only samples where True are used (e.g. :func:`measured_wedge`).
    mask : real-space array, optional
        Multiplied into both volumes before the transform (e.g. :func:`soft_mask`).
    n_shells : int, optional
        Number of shells from 0 to Nyquist; default ``max(min(shape) // 2, 16)``.

    Returns
    -------
    ShellCurve
        NaN in shells without samples or power.

    Raises
    ------
    ConfigError
        For volumes that are not 3-D, differ in shape or hold NaN; a voxel
        size that is not positive; a region or mask of the wrong shape or type;
        ``n_shells < 1``.

    Notes
    -----
    Against a noise-free reference the 0.5 threshold of this FSC corresponds
    to the 0.143 threshold of a half-map FSC (Rosenthal & Henderson 2003,
    J. Mol. Biol. 333, 721-745, doi:10.1016/j.jmb.2003.07.013).
    """
    freq, n, s_ab, s_aa, s_bb, nyq = _shell_sums(
        a, b, voxel_size_px=voxel_size_px, region=region, mask=mask, n_shells=n_shells
    )
    return ShellCurve(freq, _ratio(s_ab, np.sqrt(s_aa * s_bb)), n, nyq)


def fsc_xy(
    a,
    b,
    *,
    voxel_size_px: float = 1,
    region=None,
    mask=None,
    n_shells: int | None = None,
    kz_max: float | None = None,
) -> ShellCurve:
    """FSC over the Fourier slab around ``kz = 0`` (the plane every tilt series measures at zero tilt).

    Parameters
    ----------
    a, b, voxel_size_px, region, mask
        As for :func:`fsc`.
    n_shells : int, optional
        Default ``max(min(ny, nx) // 2, 16)``: shells as fine as the in-plane Fourier spacing.
    kz_max : float, optional
        Half-thickness of the slab in cycles per voxel; default ``1 / nz``, the
        planes ``kz = 0`` and ``kz = +-1 / nz``.
    """
    shape = np.shape(a)
    if len(shape) != 3:
        _volume(a, "a")  # raises with the standard message
    nz, ny, nx = shape
    if kz_max is None:
        kz_lim = 1.0 / nz
    else:
        try:
            kz_lim = float(kz_max)
        except (TypeError, ValueError):
            kz_lim = math.nan
        if not (math.isfinite(kz_lim) and kz_lim >= 0):
            raise ConfigError(f"kz_max: expected a finite half-thickness >= 0 in cycles per voxel, got {kz_max!r}")
    freq, n, s_ab, s_aa, s_bb, nyq = _shell_sums(
        a,
        b,
        voxel_size_px=voxel_size_px,
        region=region,
        mask=mask,
        n_shells=n_shells,
        default_shells=max(min(ny, nx) // 2, 16),
        kz_max=kz_lim * (1.0 + 1e-9),
    )
    return ShellCurve(freq, _ratio(s_ab, np.sqrt(s_aa * s_bb)), n, nyq)


def transfer(
    estimated, true, *, voxel_size_px: float = 1, region=None, mask=None, n_shells: int | None = None
) -> ShellCurve:
    """Shell-averaged coherent transfer ``T(k) = Re sum F_est conj(F_true) / sum |F_true|^2``.

    Unlike the FSC this keeps the per-shell scale: a Gaussian blur of
    ``sigma`` pixels gives ``exp(-2 pi^2 sigma^2 k^2)``, a random per-view
    displacement of ``sigma`` per axis the same envelope (DESIGN.md section 5).
    Restrict it to the measured wedge with ``region``; arguments as for :func:`fsc`.
    """
    freq, n, s_ab, _, s_bb, nyq = _shell_sums(
        estimated,
        true,
        voxel_size_px=voxel_size_px,
        region=region,
        mask=mask,
        n_shells=n_shells,
        need_aa=False,
        names=("estimated", "true"),
    )
    return ShellCurve(freq, _ratio(s_ab, s_bb), n, nyq)


def predicted_transfer(frequency_per_px, sigma_px) -> np.ndarray:
    """The Debye–Waller envelope ``exp(-2 pi^2 sigma^2 k^2)`` of a Gaussian misregistration.

    Parameters
    ----------
    frequency_per_px : array
        Frequencies in cycles per pixel.
    sigma_px : float or array
        Displacement standard deviation per axis, pixels (broadcast against the frequencies).
    """
    k = np.asarray(frequency_per_px, dtype=np.float64)
    s = np.asarray(sigma_px, dtype=np.float64)
    if not np.all(np.isfinite(k)):
        raise ConfigError("frequency_per_px: expected finite frequencies")
    if not (np.all(np.isfinite(s)) and np.all(s >= 0)):
        raise ConfigError(f"sigma_px: expected finite values >= 0, got {sigma_px!r}")
    return np.exp(-2.0 * np.pi**2 * s**2 * k**2)


def resolution_A(
    curve: ShellCurve,
    pixel_size_A: float,
    threshold: float = 0.5,
    *,
    min_voxels: int = DEFAULT_MIN_SHELL_VOXELS,
) -> float:
    """The period in Å at which ``curve`` first falls below ``threshold``.

    Shells with fewer than ``min_voxels`` samples or a NaN value are skipped.
    Between the last shell at or above the threshold and the first below it the
    crossing frequency is interpolated linearly; the result is ``pixel_size_A / k``.

    Returns
    -------
    float
        The crossing period; the Nyquist period ``2 * voxel_size_px *
        pixel_size_A`` when the curve never falls below the threshold (the data
        are resolved at least to the sampling limit); ``inf`` when the first
        usable shell is already below it (nothing is resolved) or no shell is usable.
    """
    if not isinstance(curve, ShellCurve):
        raise ConfigError(f"curve: expected a ShellCurve, got {type(curve).__name__}")
    px = _positive(pixel_size_A, "pixel_size_A")
    try:
        thr = float(threshold)
    except (TypeError, ValueError):
        thr = math.nan
    if not math.isfinite(thr):
        raise ConfigError(f"threshold: expected a finite number, got {threshold!r}")
    if isinstance(min_voxels, bool) or not isinstance(min_voxels, (int, np.integer)) or min_voxels < 0:
        raise ConfigError(f"min_voxels: expected an integer >= 0, got {min_voxels!r}")
    use = (curve.n_voxels >= min_voxels) & np.isfinite(curve.values)
    k = curve.frequency_per_px[use]
    v = curve.values[use]
    if k.size == 0 or v[0] < thr:
        return math.inf
    below = np.flatnonzero(v < thr)
    if below.size == 0:
        if curve.nyquist_per_px is None:
            raise ConfigError("curve: has no Nyquist frequency (nyquist_per_px) to report")
        return px / curve.nyquist_per_px
    j = int(below[0])
    k0, k1, v0, v1 = k[j - 1], k[j], v[j - 1], v[j]
    k_cross = k0 + (v0 - thr) / (v0 - v1) * (k1 - k0)
    return px / k_cross


def crowther_limit_A(tilt_step_deg: float, diameter_px: float, pixel_size_A: float) -> float:
    """The Crowther resolution limit ``d = D * delta_theta`` of a tilt scheme, in Å.

    ``N`` views evenly spread over 180 degrees recover an object of diameter
    ``D`` to ``d = pi D / N``, i.e. ``D`` times the angular step in radians
    (Crowther, DeRosier & Klug 1970, Proc. R. Soc. Lond. A 317, 319-340,
    doi:10.1098/rspa.1970.0119). For a slab specimen ``D`` is taken as its
    thickness (the extent the beam crosses at zero tilt), the usual
    convention in tomography. Below the Crowther frequency neighbouring
    central sections overlap (each is blurred by ``1 / D``) and fill the
    measured wedge; above it gaps open between them.

    Parameters
    ----------
    tilt_step_deg : float
        Angular increment between views, degrees.
    diameter_px : float
        Object diameter (slab thickness), unbinned pixels.
    pixel_size_A : float
        Pixel size in Å.
    """
    step = _positive(tilt_step_deg, "tilt_step_deg")
    d = _positive(diameter_px, "diameter_px")
    px = _positive(pixel_size_A, "pixel_size_A")
    return d * math.radians(step) * px

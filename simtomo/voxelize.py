"""The noise-free phantom volume: the specimen sampled on the reconstruction grid.

Scoring compares reconstructions with this volume. Its values are what a
reconstruction of ``-log(I / I0)`` estimates when the CTF is off: gold
attenuation per pixel plus twice the phase shift per pixel of the content
(see :mod:`simtomo.imaging`). Each voxel holds the mean over its volume: exact
(erf products) for Gaussians, by sub-voxel sampling at the rims of spheres and
shells. The grid covers the field of view laterally and the slab in depth, with
voxels of ``binning`` pixels, centred as DESIGN.md section 3 prescribes.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from scipy import ndimage

from simtomo.config import SimulationConfig
from simtomo.errors import ConfigError
from simtomo.imaging import phase_per_px
from simtomo.projector import GAUSSIAN_CUTOFF_SIGMA, _erf_weights
from simtomo.specimen import Gaussians, Shells, Specimen, VoxelPhantom

__all__ = ["phantom_volume", "phantom_shape", "voxelize_gaussians", "voxelize_shells"]


@numba.njit(cache=True, nogil=True)
def _voxelize_gaussians(vol, cx, cy, cz, sigma, weight, cutoff):
    nz, ny, nx = vol.shape
    n_buf = 3
    for k in range(cx.size):
        n_buf = max(n_buf, int(2 * (cutoff * sigma[k] + 1.0)) + 3)
    wx, wy, wz = np.empty(n_buf), np.empty(n_buf), np.empty(n_buf)
    for k in range(cx.size):
        half = cutoff * sigma[k] + 1.0
        i_lo, i_hi = max(int(math.floor(cx[k] - half)), 0), min(int(math.ceil(cx[k] + half)), nx - 1)
        j_lo, j_hi = max(int(math.floor(cy[k] - half)), 0), min(int(math.ceil(cy[k] + half)), ny - 1)
        l_lo, l_hi = max(int(math.floor(cz[k] - half)), 0), min(int(math.ceil(cz[k] + half)), nz - 1)
        if i_lo > i_hi or j_lo > j_hi or l_lo > l_hi:
            continue
        _erf_weights(cx[k], sigma[k], i_lo, i_hi, wx)
        _erf_weights(cy[k], sigma[k], j_lo, j_hi, wy)
        _erf_weights(cz[k], sigma[k], l_lo, l_hi, wz)
        for l in range(l_lo, l_hi + 1):
            a = weight[k] * wz[l - l_lo]
            for j in range(j_lo, j_hi + 1):
                b = a * wy[j - j_lo]
                for i in range(i_lo, i_hi + 1):
                    vol[l, j, i] += b * wx[i - i_lo]


@numba.njit(cache=True, nogil=True)
def _voxelize_shells(vol, cx, cy, cz, r_in, r_out, density, n_sub):
    """Add shells (index units) to ``vol``; rim voxels get the fraction of n_sub^3 sub-samples inside."""
    nz, ny, nx = vol.shape
    rim = math.sqrt(3.0) / 2.0
    offsets = (np.arange(n_sub) + 0.5) / n_sub - 0.5
    inv = 1.0 / n_sub**3
    for k in range(cx.size):
        ro, ri = r_out[k], r_in[k]
        ro2, ri2 = ro * ro, ri * ri
        i_lo, i_hi = max(int(math.floor(cx[k] - ro - 1)), 0), min(int(math.ceil(cx[k] + ro + 1)), nx - 1)
        j_lo, j_hi = max(int(math.floor(cy[k] - ro - 1)), 0), min(int(math.ceil(cy[k] + ro + 1)), ny - 1)
        l_lo, l_hi = max(int(math.floor(cz[k] - ro - 1)), 0), min(int(math.ceil(cz[k] + ro + 1)), nz - 1)
        for l in range(l_lo, l_hi + 1):
            dz = l - cz[k]
            for j in range(j_lo, j_hi + 1):
                dy = j - cy[k]
                for i in range(i_lo, i_hi + 1):
                    dx = i - cx[k]
                    d = math.sqrt(dx * dx + dy * dy + dz * dz)
                    if d > ro + rim or d < ri - rim:
                        continue
                    if d < ro - rim and d > ri + rim:
                        vol[l, j, i] += density[k]
                        continue
                    hits = 0
                    for a in offsets:
                        for b in offsets:
                            for c in offsets:
                                d2 = (dx + c) ** 2 + (dy + b) ** 2 + (dz + a) ** 2
                                if ri2 <= d2 <= ro2:
                                    hits += 1
                    vol[l, j, i] += density[k] * hits * inv


def _index_units(centers_px: np.ndarray, shape: tuple[int, int, int], binning: int):
    nz, ny, nx = shape
    c = centers_px / binning
    return c[:, 0] + (nx - 1) / 2.0, c[:, 1] + (ny - 1) / 2.0, c[:, 2] + (nz - 1) / 2.0


def voxelize_gaussians(vol: np.ndarray, gaussians: Gaussians, *, binning: int = 1, scale: float = 1.0) -> None:
    """Add the voxel means of ``scale`` times each Gaussian to ``vol[z, y, x]`` (voxels of ``binning`` px)."""
    if len(gaussians) == 0:
        return
    cx, cy, cz = _index_units(gaussians.centers_px, vol.shape, binning)
    _voxelize_gaussians(
        vol, cx, cy, cz, gaussians.sigma_px / binning, scale * gaussians.mass / binning**3, GAUSSIAN_CUTOFF_SIGMA
    )


def voxelize_shells(vol: np.ndarray, shells: Shells, *, binning: int = 1, scale: float = 1.0, n_sub: int = 6) -> None:
    """Add the voxel means of ``scale`` times each shell's density to ``vol[z, y, x]``."""
    if len(shells) == 0:
        return
    cx, cy, cz = _index_units(shells.centers_px, vol.shape, binning)
    _voxelize_shells(
        vol, cx, cy, cz, shells.r_inner_px / binning, shells.r_outer_px / binning, scale * shells.density, n_sub
    )


def phantom_shape(
    specimen: Specimen, config: SimulationConfig, binning: int = 1, *, z_margin_px: float = 0.0
) -> tuple[int, int, int]:
    """Shape ``(nz, ny, nx)`` of the phantom grid: field of view by slab depth, in voxels of ``binning`` px.

    ``z_margin_px`` adds empty ice above and below the slab (scoring wants room
    for the beads on the surfaces and for the taper of its mask).
    """
    h, w = config.detector.image_shape
    n = np.abs(specimen.slab_normal)
    depth = (specimen.thickness_px + n[0] * w + n[1] * h) / n[2]
    margin = 2 * int(math.ceil(z_margin_px / binning))
    return (int(math.ceil(depth / binning)) + 2 + margin, int(math.ceil(h / binning)), int(math.ceil(w / binning)))


def phantom_volume(
    specimen: Specimen, config: SimulationConfig, *, binning: int = 1, z_margin_px: float = 0.0, dtype=np.float32
) -> np.ndarray:
    """Noise-free volume ``vol[z, y, x]`` of the specimen over the field of view.

    Parameters
    ----------
    specimen : Specimen
    config : SimulationConfig
        Supplies the field of view and the phase shift per nm.
    binning : int
        Voxel edge in pixels (the volume is ``binning`` times smaller per axis).
    z_margin_px : float
        Empty ice added above and below the slab, pixels.

    Returns
    -------
    array
        Attenuation per pixel of path: gold plus ``2 * phase_per_px`` times the
        content density (voxel means).
    """
    if isinstance(binning, bool) or not isinstance(binning, (int, np.integer)) or binning < 1:
        raise ConfigError(f"phantom binning: expected an integer >= 1, got {binning!r}")
    shape = phantom_shape(specimen, config, binning, z_margin_px=z_margin_px)
    vol = np.zeros(shape, dtype=dtype)
    phase = 2.0 * phase_per_px(config)  # the weak-phase image is exp(-2 phi c), simtomo.imaging
    voxelize_shells(vol, specimen.gold, binning=binning)
    voxelize_shells(vol, specimen.shells, binning=binning, scale=phase)
    voxelize_gaussians(vol, specimen.gaussians, binning=binning, scale=phase)
    if specimen.voxels is not None:
        vol += (phase * _resample(specimen.voxels, shape, binning)).astype(dtype)
    return vol


def _resample(phantom: VoxelPhantom, shape: tuple[int, int, int], binning: int) -> np.ndarray:
    """A voxel phantom interpolated onto the centred phantom grid."""
    src = np.asarray(phantom.volume, dtype=np.float32)
    step = binning / phantom.voxel_size_px  # source voxels per output voxel
    out_c = (np.array(shape) - 1) / 2.0
    src_c = (np.array(src.shape) - 1) / 2.0
    return ndimage.affine_transform(src, np.full(3, step), offset=src_c - step * out_c, output_shape=shape, order=1)

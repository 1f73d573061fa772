"""Resampling a view between its raw frame and the aligned frame.

The aligned frame of view ``i`` is the projection ``P R_y(theta_i) X`` before
the in-plane transform: tilt axis along +y, unit magnification, no shift.
A raw view and its aligned image are related by ``p = A_i q + t_i`` with
``A_i = s_i R(phi_i)`` (DESIGN.md section 3), so

    aligned(q) = raw(A_i q + t_i)          raw(p) = aligned(A_i^-1 (p - t_i))

Both directions use scipy's spline interpolation; points outside the source
take ``cval``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from simtomo.geometry import Geometry, pixel_coordinates

__all__ = ["aligned_to_view", "view_to_aligned"]


def _sample(image: np.ndarray, x: np.ndarray, y: np.ndarray, order: int, cval: float) -> np.ndarray:
    """Sample ``image`` at centred coordinates (x, y)."""
    h, w = image.shape
    coords = np.stack([y + (h - 1) / 2.0, x + (w - 1) / 2.0])
    return ndimage.map_coordinates(image, coords, order=order, mode="constant", cval=cval, prefilter=order > 1)


def aligned_to_view(
    aligned: np.ndarray,
    geometry: Geometry,
    view: int,
    *,
    spacing_px: float = 1.0,
    output_shape: tuple[int, int] | None = None,
    order: int = 3,
    cval: float = 0.0,
) -> np.ndarray:
    """Resample an aligned-frame image into the raw frame of ``view``.

    Parameters
    ----------
    aligned : (ha, wa) array
        Image in the aligned frame, centred, sampled every ``spacing_px`` pixels.
    geometry : Geometry
        Supplies ``A_i`` and ``t_i`` of the view.
    view : int
        View index.
    spacing_px : float
        Sampling interval of ``aligned`` in specimen pixels (a voxel projection
        at voxel size 2 px has spacing 2).
    output_shape : (h, w), optional
        Defaults to ``geometry.image_shape``.
    order : int
        Spline order of the interpolation.
    cval : float
        Value for raw pixels whose source lies outside ``aligned``.
    """
    shape = tuple(output_shape or geometry.image_shape)
    x, y = pixel_coordinates(shape)
    px, py = np.meshgrid(x, y)
    a_inv = np.linalg.inv(geometry.inplane_matrices()[view])
    t = geometry.shift_px[view]
    qx = (a_inv[0, 0] * (px - t[0]) + a_inv[0, 1] * (py - t[1])) / spacing_px
    qy = (a_inv[1, 0] * (px - t[0]) + a_inv[1, 1] * (py - t[1])) / spacing_px
    return _sample(np.asarray(aligned, dtype=float), qx, qy, order, cval)


def view_to_aligned(
    image: np.ndarray,
    geometry: Geometry,
    view: int,
    *,
    output_shape: tuple[int, int] | None = None,
    order: int = 3,
    cval: float = 0.0,
) -> np.ndarray:
    """Resample raw view ``view`` into its aligned frame (tilt axis along +y, no shift, unit magnification).

    ``output_shape`` defaults to the raw image shape.
    """
    shape = tuple(output_shape or image.shape)
    x, y = pixel_coordinates(shape)
    qx, qy = np.meshgrid(x, y)
    a = geometry.inplane_matrices()[view]
    t = geometry.shift_px[view]
    px = a[0, 0] * qx + a[0, 1] * qy + t[0]
    py = a[1, 0] * qx + a[1, 1] * qy + t[1]
    return _sample(np.asarray(image, dtype=float), px, py, order, cval)

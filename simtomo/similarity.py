"""3-D similarity transforms of the specimen: the gauge of a tilt-series alignment.

An alignment is defined only up to a moved, rotated and scaled specimen
(DESIGN.md section 3): the geometry ``p_i`` and the geometry ``X -> p_i(G X)``
explain the same images. Scoring removes that freedom by fitting ``G``;
reconstruction and reprojection accept a ``G`` so that a volume computed with
an estimated geometry lands in the frame of the truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

from simtomo.geometry import Geometry

__all__ = ["Similarity", "projection_model"]


@dataclass(frozen=True, eq=False)
class Similarity:
    """The map ``X -> scale * R @ X + translation`` of specimen coordinates (pixels).

    Parameters
    ----------
    scale : float
        Isotropic scale factor (> 0).
    rotation : (3, 3) array
        Proper rotation matrix.
    translation : (3,) array
        Translation in pixels.
    """

    scale: float = 1.0
    rotation: np.ndarray = None  # type: ignore[assignment]
    translation: np.ndarray = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        rot = np.eye(3) if self.rotation is None else np.array(self.rotation, dtype=float)
        shift = np.zeros(3) if self.translation is None else np.array(self.translation, dtype=float)
        if rot.shape != (3, 3) or shift.shape != (3,):
            raise ValueError(f"Similarity: rotation must be (3, 3) and translation (3,), got {rot.shape}, {shift.shape}")
        if not (np.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"Similarity.scale: expected a positive number, got {self.scale}")
        if not np.allclose(rot @ rot.T, np.eye(3), atol=1e-9) or np.linalg.det(rot) < 0:
            raise ValueError("Similarity.rotation: expected a proper rotation matrix")
        for arr in (rot, shift):
            arr.flags.writeable = False
        object.__setattr__(self, "scale", float(self.scale))
        object.__setattr__(self, "rotation", rot)
        object.__setattr__(self, "translation", shift)

    @classmethod
    def identity(cls) -> Similarity:
        return cls()

    @classmethod
    def from_params(cls, params: np.ndarray) -> Similarity:
        """From the 7-vector ``(rotation vector (3, radians), translation (3), log scale)``."""
        p = np.asarray(params, dtype=float)
        return cls(scale=float(np.exp(p[6])), rotation=Rotation.from_rotvec(p[:3]).as_matrix(), translation=p[3:6])

    def to_params(self) -> np.ndarray:
        """The 7-vector of :meth:`from_params`."""
        return np.concatenate([Rotation.from_matrix(self.rotation).as_rotvec(), self.translation, [np.log(self.scale)]])

    @property
    def matrix(self) -> np.ndarray:
        """The linear part ``scale * R`` (3, 3)."""
        return self.scale * self.rotation

    def apply(self, points_xyz: np.ndarray) -> np.ndarray:
        """Map points (m, 3) to ``scale * R @ X + translation``."""
        pts = np.asarray(points_xyz, dtype=float)
        return pts @ self.matrix.T + self.translation

    def inverse(self) -> Similarity:
        rt = self.rotation.T
        return Similarity(scale=1.0 / self.scale, rotation=rt, translation=-(rt @ self.translation) / self.scale)

    def compose(self, inner: Similarity) -> Similarity:
        """``self o inner``: first ``inner``, then ``self``."""
        return Similarity(
            scale=self.scale * inner.scale,
            rotation=self.rotation @ inner.rotation,
            translation=self.matrix @ inner.translation + self.translation,
        )


def projection_model(geometry: Geometry, gauge: Similarity | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The affine projection ``p_i(G X) = M_i X + c_i`` of every view.

    Returns ``M (n, 2, 3)`` and ``c (n, 2)``: with ``G`` the identity,
    ``M_i = s_i R(phi_i) P R_y(theta_i)`` and ``c_i = t_i``.
    """
    m = geometry.projection_matrices()
    c = geometry.shift_px.copy()
    if gauge is None:
        return m, c
    return m @ gauge.matrix, np.einsum("nij,j->ni", m, gauge.translation) + c

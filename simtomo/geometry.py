"""The projection geometry of a tilt series (DESIGN.md section 3).

A specimen point ``X = (x, y, z)`` in pixels, relative to the volume centre,
lands in view ``i`` at

    p_i(X) = s_i * R(phi_i) @ P @ R_y(theta_i) @ X + t_i

where ``R_y`` tilts about the y axis, ``P`` drops z, ``R(phi)`` rotates the
image plane counter-clockwise (x toward y), ``s_i`` is the magnification and
``t_i`` the shift in pixels. Image coordinates are centred:
``x = col - (w - 1) / 2``, ``y = row - (h - 1) / 2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simtomo.errors import ConfigError

__all__ = [
    "Geometry",
    "rotation_y",
    "rotation_2d",
    "pixel_coordinates",
]


def rotation_y(theta_deg: np.ndarray | float) -> np.ndarray:
    """Tilt matrices ``R_y(theta)`` (..., 3, 3) for tilt angles in degrees.

    ``R_y = [[cos, 0, sin], [0, 1, 0], [-sin, 0, cos]]``: a positive tilt moves
    a point at positive z toward positive x.
    """
    t = np.deg2rad(np.asarray(theta_deg, dtype=float))
    c, s = np.cos(t), np.sin(t)
    zero, one = np.zeros_like(t), np.ones_like(t)
    return np.stack(
        [
            np.stack([c, zero, s], axis=-1),
            np.stack([zero, one, zero], axis=-1),
            np.stack([-s, zero, c], axis=-1),
        ],
        axis=-2,
    )


def rotation_2d(phi_deg: np.ndarray | float) -> np.ndarray:
    """In-plane rotations ``R(phi)`` (..., 2, 2) acting on (x, y), angles in degrees."""
    p = np.deg2rad(np.asarray(phi_deg, dtype=float))
    c, s = np.cos(p), np.sin(p)
    return np.stack([np.stack([c, -s], axis=-1), np.stack([s, c], axis=-1)], axis=-2)


def pixel_coordinates(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Centred pixel coordinates ``(x (w,), y (h,))`` of an image of shape (h, w)."""
    h, w = shape
    return np.arange(w) - (w - 1) / 2.0, np.arange(h) - (h - 1) / 2.0


@dataclass(frozen=True, eq=False)
class Geometry:
    """Per-view projection parameters of a tilt series, in the stack's view order.

    Parameters
    ----------
    tilt_deg : (n,) array
        Tilt angle ``theta_i`` about the specimen y axis, degrees.
    rot_deg : (n,) array
        In-plane direction ``phi_i`` of the tilt axis, degrees: the axis appears
        along ``R(phi_i) @ (0, 1)`` in the image.
    mag : (n,) array
        Magnification ``s_i`` (1 = nominal pixel size).
    shift_px : (n, 2) array
        Image shift ``t_i = (tx, ty)`` in pixels, added after rotation and scaling.
    image_shape : (h, w)
        Shape of each view in pixels.
    pixel_size_A : float
        Nominal pixel size in Ångström (specimen pixels are this size).
    """

    tilt_deg: np.ndarray
    rot_deg: np.ndarray
    mag: np.ndarray
    shift_px: np.ndarray
    image_shape: tuple[int, int]
    pixel_size_A: float

    def __post_init__(self) -> None:
        tilt = np.array(self.tilt_deg, dtype=float, ndmin=1)
        n = tilt.shape[0]
        rot = np.array(self.rot_deg, dtype=float, ndmin=1)
        mag = np.array(self.mag, dtype=float, ndmin=1)
        shift = np.array(self.shift_px, dtype=float)
        if tilt.ndim != 1 or n == 0:
            raise ConfigError(f"Geometry.tilt_deg: expected a non-empty 1-D array, got shape {tilt.shape}")
        for name, arr, want in (("rot_deg", rot, (n,)), ("mag", mag, (n,)), ("shift_px", shift, (n, 2))):
            if arr.shape != want:
                raise ConfigError(
                    f"Geometry.{name}: expected shape {want} for {n} views, got {arr.shape}"
                )
        for name, arr in (("tilt_deg", tilt), ("rot_deg", rot), ("mag", mag), ("shift_px", shift)):
            if not np.all(np.isfinite(arr)):
                raise ConfigError(f"Geometry.{name}: contains NaN or infinite values")
        if np.any(mag <= 0):
            raise ConfigError(f"Geometry.mag: magnifications must be positive, got min {mag.min()}")
        shape = tuple(int(v) for v in self.image_shape)
        if len(shape) != 2 or min(shape) <= 0:
            raise ConfigError(f"Geometry.image_shape: expected (h, w) > 0, got {self.image_shape}")
        if not (np.isfinite(self.pixel_size_A) and self.pixel_size_A > 0):
            raise ConfigError(f"Geometry.pixel_size_A: expected a positive number, got {self.pixel_size_A}")
        for arr in (tilt, rot, mag, shift):
            arr.flags.writeable = False
        object.__setattr__(self, "tilt_deg", tilt)
        object.__setattr__(self, "rot_deg", rot)
        object.__setattr__(self, "mag", mag)
        object.__setattr__(self, "shift_px", shift)
        object.__setattr__(self, "image_shape", shape)
        object.__setattr__(self, "pixel_size_A", float(self.pixel_size_A))

    @property
    def n_views(self) -> int:
        """Number of views."""
        return int(self.tilt_deg.shape[0])

    def inplane_matrices(self) -> np.ndarray:
        """Matrices ``A_i = s_i R(phi_i)`` (n, 2, 2): aligned-frame to view coordinates, before the shift."""
        return self.mag[:, None, None] * rotation_2d(self.rot_deg)

    def projection_matrices(self) -> np.ndarray:
        """Matrices ``s_i R(phi_i) P R_y(theta_i)`` (n, 2, 3) mapping specimen to view coordinates."""
        return self.inplane_matrices() @ rotation_y(self.tilt_deg)[:, :2, :]

    def project(self, points_xyz: np.ndarray) -> np.ndarray:
        """Project specimen points into every view.

        Parameters
        ----------
        points_xyz : (m, 3) array
            Points in pixels, relative to the volume centre (DESIGN.md section 3).

        Returns
        -------
        (n, m, 2) array
            Centred image coordinates ``(x, y)`` of each point in each view.
        """
        pts = np.asarray(points_xyz, dtype=float)
        if pts.ndim != 2 or pts.shape[1] != 3:
            raise ValueError(f"points_xyz: expected shape (m, 3), got {pts.shape}")
        return np.einsum("nij,mj->nmi", self.projection_matrices(), pts) + self.shift_px[:, None, :]

    def select(self, views: np.ndarray | slice | list[int]) -> Geometry:
        """The geometry of a subset of views, in the given order."""
        return Geometry(
            tilt_deg=self.tilt_deg[views],
            rot_deg=self.rot_deg[views],
            mag=self.mag[views],
            shift_px=self.shift_px[views],
            image_shape=self.image_shape,
            pixel_size_A=self.pixel_size_A,
        )

    def replace(self, **changes) -> Geometry:
        """A copy with some fields replaced (``tilt_deg``, ``shift_px``, ...)."""
        fields = dict(
            tilt_deg=self.tilt_deg,
            rot_deg=self.rot_deg,
            mag=self.mag,
            shift_px=self.shift_px,
            image_shape=self.image_shape,
            pixel_size_A=self.pixel_size_A,
        )
        unknown = set(changes) - set(fields)
        if unknown:
            raise TypeError(f"Geometry.replace: unknown fields {sorted(unknown)}")
        fields.update(changes)
        return Geometry(**fields)

    @classmethod
    def nominal(
        cls,
        tilt_deg: np.ndarray,
        image_shape: tuple[int, int],
        pixel_size_A: float,
        *,
        rot_deg: float = 0.0,
    ) -> Geometry:
        """The geometry a perfect microscope would give: no shift, unit magnification."""
        tilt = np.asarray(tilt_deg, dtype=float)
        n = tilt.shape[0]
        return cls(
            tilt_deg=tilt,
            rot_deg=np.full(n, float(rot_deg)),
            mag=np.ones(n),
            shift_px=np.zeros((n, 2)),
            image_shape=image_shape,
            pixel_size_A=pixel_size_A,
        )

    def equals(self, other: Geometry) -> bool:
        """True when every field is bit-identical."""
        return (
            self.image_shape == other.image_shape
            and self.pixel_size_A == other.pixel_size_A
            and all(
                np.array_equal(getattr(self, k), getattr(other, k))
                for k in ("tilt_deg", "rot_deg", "mag", "shift_px")
            )
        )

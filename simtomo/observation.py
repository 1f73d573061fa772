"""What an aligner is given: images and microscope metadata, never the truth (DESIGN.md section 4)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simtomo.errors import ConfigError

__all__ = ["Observation"]


@dataclass(frozen=True, eq=False)
class Observation:
    """A tilt series as a microscope and its log deliver it.

    Parameters
    ----------
    stack : (n, h, w) array
        Views sorted by nominal tilt angle.
    tilt_deg : (n,) array
        Nominal tilt angles in degrees, in the stack's view order.
    pixel_size_A : float
        Nominal pixel size in Å.
    acquisition_order : (n,) int array, optional
        View indices in the order they were acquired.
    dose_e_per_A2 : (n,) array, optional
        Electron dose of each view.
    tilt_axis_deg : float, optional
        Nominal in-plane tilt-axis angle from the microscope log, degrees, in
        the convention of DESIGN.md section 3 (axis along ``R(phi) @ (0, 1)``).
    bead_diameter_nm : float, optional
        Nominal size of the gold the user applied, when known.
    name : str
        A label for messages and output files.
    """

    stack: np.ndarray
    tilt_deg: np.ndarray
    pixel_size_A: float
    acquisition_order: np.ndarray | None = None
    dose_e_per_A2: np.ndarray | None = None
    tilt_axis_deg: float | None = None
    bead_diameter_nm: float | None = None
    name: str = ""

    def __post_init__(self) -> None:
        label = f"observation {self.name!r}" if self.name else "observation"
        if self.stack.ndim != 3 or self.stack.shape[0] == 0:
            raise ConfigError(f"{label}: stack must have shape (n_views, h, w) with n_views >= 1, got {self.stack.shape}")
        n = self.stack.shape[0]
        tilt = np.asarray(self.tilt_deg, dtype=float)
        if tilt.shape != (n,):
            raise ConfigError(f"{label}: {tilt.size} tilt angles for a stack of {n} views")
        object.__setattr__(self, "tilt_deg", tilt)
        if self.acquisition_order is not None:
            order = np.asarray(self.acquisition_order, dtype=int)
            if order.shape != (n,) or not np.array_equal(np.sort(order), np.arange(n)):
                raise ConfigError(f"{label}: acquisition_order must be a permutation of the {n} view indices")
            object.__setattr__(self, "acquisition_order", order)
        if self.dose_e_per_A2 is not None:
            dose = np.asarray(self.dose_e_per_A2, dtype=float)
            if dose.shape != (n,):
                raise ConfigError(f"{label}: {dose.size} doses for a stack of {n} views")
            object.__setattr__(self, "dose_e_per_A2", dose)
        if not self.pixel_size_A > 0:
            raise ConfigError(f"{label}: pixel_size_A must be positive, got {self.pixel_size_A}")

    @property
    def n_views(self) -> int:
        return int(self.stack.shape[0])

    @property
    def image_shape(self) -> tuple[int, int]:
        return (int(self.stack.shape[1]), int(self.stack.shape[2]))

"""The baseline: what the microscope log says, with no correction at all."""

from __future__ import annotations

from dataclasses import dataclass

from simtomo.alignment import AlignmentResult
from simtomo.geometry import Geometry
from simtomo.observation import Observation

__all__ = ["NominalAligner", "NominalParams"]


@dataclass(frozen=True)
class NominalParams:
    """Parameters of the nominal aligner.

    Parameters
    ----------
    tilt_axis_deg : float or None
        In-plane tilt-axis angle to assume; None takes the observation's
        nominal value (or 0 when the log has none).
    """

    tilt_axis_deg: float | None = None


class NominalAligner:
    """Nominal tilts and tilt axis, no shifts: the error of doing nothing."""

    name = "nominal"
    Params = NominalParams

    def __init__(self, params: NominalParams | None = None) -> None:
        self.params = params or NominalParams()

    def align(self, observation: Observation) -> AlignmentResult:
        axis = self.params.tilt_axis_deg
        if axis is None:
            axis = observation.tilt_axis_deg or 0.0
        geometry = Geometry.nominal(
            observation.tilt_deg, observation.image_shape, observation.pixel_size_A, rot_deg=axis
        )
        return AlignmentResult(geometry=geometry, info={"aligner": self.name, "tilt_axis_deg": float(axis)})

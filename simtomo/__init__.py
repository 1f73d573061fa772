"""simtomo: a testbed for cryo-electron-tomography tilt-series alignment.

Simulate tilt series with known geometry errors, run aligners on what a
microscope would deliver, and score them against the truth.

>>> import simtomo
>>> series = simtomo.simulate("tiny", seed=0)
>>> obs = series.observation()          # what an aligner may see
>>> series.geometry.project([[0, 0, 0]]).shape
(41, 1, 2)
"""

__version__ = "0.1.0"

from simtomo.config import SimulationConfig, load_config, preset
from simtomo.errors import ConfigError, FileFormatError, SimtomoError
from simtomo.geometry import Geometry
from simtomo.observation import Observation
from simtomo.simulate import TiltSeries, simulate, simulate_to_files

__all__ = [
    "__version__",
    "simulate",
    "simulate_to_files",
    "TiltSeries",
    "Observation",
    "Geometry",
    "SimulationConfig",
    "load_config",
    "preset",
    "SimtomoError",
    "ConfigError",
    "FileFormatError",
]

import numpy as np
import pytest

import simtomo
from simtomo.geometry import Geometry


@pytest.fixture(scope="session")
def tiny_series():
    """The `tiny` workload at seed 0, simulated once per test session."""
    return simtomo.simulate("tiny", seed=0)


def random_geometry(rng: np.random.Generator, n: int, shape=(96, 112), *, shift=60.0, max_tilt=70.0) -> Geometry:
    """A geometry far from nominal: any rotation, +-20 % magnification, large shifts and tilts."""
    return Geometry(
        tilt_deg=rng.uniform(-max_tilt, max_tilt, n),
        rot_deg=rng.uniform(-180, 180, n),
        mag=rng.uniform(0.8, 1.2, n),
        shift_px=rng.uniform(-shift, shift, (n, 2)),
        image_shape=shape,
        pixel_size_A=8.0,
    )


def centroid(image: np.ndarray) -> np.ndarray:
    """Intensity-weighted centre (x, y) of an image in centred pixel coordinates."""
    h, w = image.shape
    x = np.arange(w) - (w - 1) / 2.0
    y = np.arange(h) - (h - 1) / 2.0
    m = image.sum()
    return np.array([(image.sum(axis=0) * x).sum() / m, (image.sum(axis=1) * y).sum() / m])


@pytest.fixture(scope="session")
def standard_series():
    """The `standard` workload at seed 0 (61 views of 1024^2 px), simulated once per test session."""
    return simtomo.simulate("standard", seed=0)


@pytest.fixture(scope="session")
def standard_nobeads_series():
    """`standard-nobeads` at seed 0, simulated once per test session."""
    return simtomo.simulate("standard-nobeads", seed=0)

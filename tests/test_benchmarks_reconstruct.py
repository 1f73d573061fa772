"""Speed benchmarks of simtomo.reconstruct (pytest-benchmark).

Every test here is marked ``benchmark`` and so left out of the default run; run them with::

    python -m pytest -m benchmark --benchmark-enable tests/test_benchmarks_reconstruct.py

Peak memory is measured by ``benchmarks/reconstruct.py`` (one child process
per case); here only time. Each benchmark also checks what it timed: a fast
wrong answer is no result. The baseline for the compiled back-projector is
``simtomo.reconstruct._reference_backproject``: the same filtered images
interpolated with ``scipy.ndimage.map_coordinates`` per view and z slice.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_reconstruct import blob_centre

from simtomo import reconstruct as rec
from simtomo import simulate
from simtomo.reconstruct import log_intensity, reconstruct, reproject

pytestmark = pytest.mark.benchmark

SHAPE = (128, 512, 512)  # standard at bin 2: the field of view by the slab
BINNING = 2


@pytest.fixture(scope="module")
def standard():
    series = simulate("standard", seed=0)
    return series, log_intensity(series.stack)


@pytest.fixture(scope="module")
def standard_wbp(standard):
    series, proj = standard
    return reconstruct(proj, series.geometry, SHAPE, voxel_size_px=BINNING)


def _bead_errors(vol: np.ndarray, beads: np.ndarray) -> np.ndarray:
    """Distance (px) of each bead's fitted centre in ``vol`` from the truth."""
    return np.array([np.linalg.norm(blob_centre(vol, c, BINNING, 3) - c) for c in beads])


def test_wbp_standard_bin2(benchmark, standard):
    """Target: under 10 s on 2 cores (DESIGN.md section 6 workload)."""
    series, proj = standard
    benchmark.group = "wbp standard bin 2 (61 x 1024^2 -> 128 x 512 x 512)"
    vol = benchmark.pedantic(reconstruct, args=(proj, series.geometry, SHAPE), kwargs={"voxel_size_px": BINNING}, rounds=3, iterations=1)
    err = _bead_errors(vol, series.beads_px)
    # the 25 gold beads sit on the slab faces; measured median 0.05 px, max 0.4 px
    assert np.median(err) < 0.1 and err.max() < 0.5


@pytest.fixture(scope="module")
def tiny_case(tiny_series):
    proj = log_intensity(tiny_series.stack)
    shape = tiny_series.phantom(binning=2).shape
    setup = rec._setup(proj, tiny_series.geometry, shape, BINNING, None)
    with rec._numba_threads(None) as threads:
        filtered = rec._wbp_filtered(setup, "ramp", 10, threads)
    return setup, filtered


def test_backproject_tiny_numba(benchmark, tiny_case):
    setup, filtered = tiny_case
    benchmark.group = "back-projection, tiny bin 2 (41 views)"

    def run():
        vol = np.zeros(setup.shape, dtype=np.float32)
        rec._backproject(filtered, setup.frame, np.ones(setup.geometry.n_views), vol)
        return vol

    vol = benchmark(run)
    ref = rec._reference_backproject(filtered, setup.frame, np.ones(setup.geometry.n_views), setup.shape)
    np.testing.assert_allclose(vol, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_backproject_tiny_reference(benchmark, tiny_case):
    setup, filtered = tiny_case
    benchmark.group = "back-projection, tiny bin 2 (41 views)"
    vol = benchmark.pedantic(
        rec._reference_backproject, args=(filtered, setup.frame, np.ones(setup.geometry.n_views), setup.shape), rounds=3, iterations=1
    )
    assert np.isfinite(vol).all() and np.abs(vol).max() > 0


def test_reproject_standard_bin2(benchmark, standard, standard_wbp):
    series, proj = standard
    benchmark.group = "reproject standard bin 2 (128 x 512 x 512 -> 61 x 1024^2)"
    images = benchmark.pedantic(reproject, args=(standard_wbp, series.geometry), kwargs={"voxel_size_px": BINNING}, rounds=1, iterations=1)
    assert images.shape == proj.shape
    # the reprojection of the reconstruction resembles the data it came from (measured ~0.6 per view)
    corr = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(images[::10], proj[::10])]
    assert min(corr) > 0.4


def test_sirt_iteration_standard_bin2(benchmark, standard, standard_wbp):
    series, proj = standard
    benchmark.group = "one SIRT iteration, standard bin 2"
    system = rec._sirt_system(rec._setup(proj, series.geometry, SHAPE, BINNING, None))
    residual = np.empty_like(system.data)
    update = np.empty(SHAPE, dtype=np.float32)
    x = standard_wbp.copy()
    norms = []

    def step():
        norms.append(rec._sirt_step(system, x, residual, update, first=False))

    benchmark.pedantic(step, rounds=3, iterations=1)
    # started from the WBP volume, every step lowers the weighted residual
    assert np.all(np.diff(norms) < 0)

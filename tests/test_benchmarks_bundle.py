"""Speed benchmarks of the bundle adjustment (aligners.bundle), pytest-benchmark.

Marked ``benchmark`` and so left out of the default run; run them with::

    python -m pytest -m benchmark --benchmark-enable tests/test_benchmarks_bundle.py

Each benchmark also checks what it timed: the alignment error of the result is
compared with the Cramér-Rao bound for the same layout, so a fast wrong answer
fails.
"""

from __future__ import annotations

import numpy as np
import pytest

from aligners.bundle import BundleOptions, crlb_alignment_error, solve
from simtomo.alignment_error import alignment_error
from simtomo.config import MisalignmentConfig, TiltConfig
from simtomo.geometry import Geometry
from simtomo.misalignment import simulate_misalignment
from simtomo.tiltscheme import make_tilt_scheme

pytestmark = pytest.mark.benchmark

SHAPE = (1024, 1024)
THICKNESS = 250.0
SIGMA = 0.5


def _case(step_deg: float, n_beads: int, seed: int = 0):
    """Standard misalignment over -60..60 at ``step_deg``, beads on both slab surfaces, sigma 0.5 px."""
    scheme = make_tilt_scheme(TiltConfig(step_deg=step_deg))
    rng = np.random.default_rng(seed)
    truth = simulate_misalignment(MisalignmentConfig(), scheme, image_shape=SHAPE, pixel_size_A=8.0, rng=rng).geometry
    z = np.where(np.arange(n_beads) % 2 == 0, 1.0, -1.0) * (THICKNESS / 2 - 6.25)
    beads = np.column_stack([rng.uniform(-450, 450, (n_beads, 2)), z])
    xy = truth.project(beads) + SIGMA * rng.standard_normal((truth.n_views, n_beads, 2))
    start = Geometry.nominal(scheme.tilt_deg, SHAPE, 8.0, rot_deg=85.0)
    return truth, beads, xy, start


def _check(solution, truth, beads) -> None:
    error = alignment_error(solution.geometry, truth, thickness_px=THICKNESS).rms_px
    bound = crlb_alignment_error(truth, beads, np.ones(solution.kept.shape, bool), SIGMA, thickness_px=THICKNESS)
    assert solution.converged
    assert error < 1.5 * bound  # one noise realisation: ~1.0 +- 0.15 of the bound


@pytest.mark.parametrize("robust", [True, False], ids=["robust", "least-squares"])
def test_solve_25_tracks_61_views(benchmark, robust):
    truth, beads, xy, start = _case(2.0, 25)
    solve(xy, start)  # numba kernels: load from cache outside the timing
    benchmark.group = "bundle 25 tracks x 61 views, per-view rotation/magnification/tilt"
    solution = benchmark.pedantic(
        solve, args=(xy, start), kwargs={"options": BundleOptions(robust=robust)}, rounds=5, iterations=1
    )
    _check(solution, truth, beads)


@pytest.mark.parametrize("robust", [True, False], ids=["robust", "least-squares"])
def test_solve_100_tracks_121_views(benchmark, robust):
    truth, beads, xy, start = _case(1.0, 100)
    solve(xy, start)
    benchmark.group = "bundle 100 tracks x 121 views, per-view rotation/magnification/tilt"
    solution = benchmark.pedantic(
        solve, args=(xy, start), kwargs={"options": BundleOptions(robust=robust)}, rounds=3, iterations=1
    )
    _check(solution, truth, beads)


def test_crlb_25_tracks_61_views(benchmark):
    truth, beads, _, _ = _case(2.0, 25)
    benchmark.group = "bundle CRLB"
    observed = np.ones((truth.n_views, beads.shape[0]), bool)
    bound = benchmark(crlb_alignment_error, truth, beads, observed, SIGMA, thickness_px=THICKNESS)
    assert 0.1 < bound < 0.5

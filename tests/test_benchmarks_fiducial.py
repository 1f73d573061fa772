"""Fiducial alignment of `standard`, seeds 0-4: accuracy beside residual, time and memory.

    python -m pytest -m benchmark --benchmark-enable tests/test_benchmarks_fiducial.py -s
"""

import resource
import time

import pytest

import simtomo
from aligners.fiducial import FiducialAligner
from simtomo.score import score

pytestmark = pytest.mark.benchmark


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_fiducial_standard_seeds(seed):
    series = simtomo.simulate("standard", seed=seed)
    start, cpu = time.perf_counter(), time.process_time()
    result = FiducialAligner().align(series.observation())
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    s = score(series, result)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"\nseed {seed}: error {s.alignment_error_rms_px:.4f} px (along {s.alignment_error_along_axis_px:.4f}, "
        f"across {s.alignment_error_across_axis_px:.4f}), residual {s.residual_rms_px:.4f} px, "
        f"{len(result.markers_px)} beads, {wall:.1f} s wall, {cpu:.1f} s CPU, peak RSS {peak_mb:.0f} MB"
    )
    assert s.alignment_error_rms_px < 0.15

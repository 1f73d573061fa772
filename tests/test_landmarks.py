"""Layered landmarks (aligners/landmarks.py): layers, windows and grid; the refinement runs in tests/test_projmatch.py."""

from __future__ import annotations

import numpy as np
import pytest

from aligners.landmarks import LandmarkOptions, landmark_grid, layer_centres, layer_weights
from simtomo.errors import ConfigError


@pytest.mark.parametrize("thickness, layer, n", [(60.0, 12.0, 5), (62.5, 12.0, 5), (10.0, 12.0, 1), (100.0, 30.0, 3)])
def test_layer_centres_tile_the_thickness_symmetrically(thickness, layer, n):
    z = layer_centres(thickness, layer)
    assert len(z) == n
    np.testing.assert_allclose(z, -z[::-1], atol=1e-12)
    # equal layers whose edges meet at +-thickness / 2
    np.testing.assert_allclose(np.diff(z), thickness / n)
    assert z[-1] + thickness / n / 2 == pytest.approx(thickness / 2)


def test_layer_weights_are_one_inside_and_fall_linearly():
    w = layer_weights(21, centre=2.0, half=3.0, edge=2.0)  # depths -10 .. 10
    z = np.arange(21) - 10.0
    np.testing.assert_array_equal(w[np.abs(z - 2) <= 3], 1.0)
    np.testing.assert_allclose(w[z == 6.0], 0.5)  # 1 px into the 2 px fall-off
    np.testing.assert_array_equal(w[np.abs(z - 2) >= 5], 0.0)
    # the layers of a tiling leave no depth of the specimen out
    z = np.arange(41) - 20.0
    centres = layer_centres(30.0, 6.0)
    cover = np.max([layer_weights(41, c, 3.0, 1.0) for c in centres], axis=0)
    np.testing.assert_array_equal(cover[np.abs(z) <= 15], 1.0)


def test_landmark_grid_stays_a_window_inside_the_volume_across_the_axis():
    depths = np.array([-6.0, 6.0])
    pts = landmark_grid((40, 100, 160), window=32, spacing=16.0, depths=depths)
    assert pts.shape[1] == 3
    assert set(np.unique(pts[:, 2])) == {-6.0, 6.0}
    per_layer = pts[pts[:, 2] == -6.0]
    assert np.abs(per_layer[:, 0]).max() <= 160 / 2 - 32
    assert np.abs(per_layer[:, 1]).max() <= 100 / 2 - 16
    np.testing.assert_allclose(np.unique(np.diff(np.unique(per_layer[:, 0]))), 16.0)
    np.testing.assert_allclose(per_layer.mean(axis=0)[:2], 0.0, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, word",
    [({"window": 8}, "window"), ({"max_shift": 20.0}, "max_shift"), ({"layer_px": 0.0}, "layer_px"), ({"folds": 1}, "folds"),
     ({"tilt_anchor_weight": -1.0}, "tilt_anchor_weight"), ({"tilt_anchor_weight": float("nan")}, "tilt_anchor_weight")],
)
def test_bad_options_are_named(kwargs, word):
    with pytest.raises(ConfigError, match=word):
        LandmarkOptions(**kwargs)

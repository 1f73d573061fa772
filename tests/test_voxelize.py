import numpy as np
import pytest

import simtomo
from simtomo.errors import ConfigError
from simtomo.specimen import Gaussians, Shells, solid_spheres
from simtomo.voxelize import phantom_shape, voxelize_gaussians, voxelize_shells


def volume_centroid(vol, binning=1):
    coords = [binning * (np.arange(n) - (n - 1) / 2.0) for n in vol.shape]
    m = vol.sum()
    z = (vol.sum(axis=(1, 2)) * coords[0]).sum() / m
    y = (vol.sum(axis=(0, 2)) * coords[1]).sum() / m
    x = (vol.sum(axis=(0, 1)) * coords[2]).sum() / m
    return np.array([x, y, z])


@pytest.mark.parametrize("binning", [1, 2])
def test_voxelized_gaussian_keeps_mass_and_centre(binning):
    g = Gaussians(np.array([[3.3, -2.2, 1.7]]), [3.0], [2.0])
    n = 48 // binning  # room for the 5-sigma reach on every side
    vol = np.zeros((n, n, n))
    voxelize_gaussians(vol, g, binning=binning)
    assert vol.sum() * binning**3 == pytest.approx(g.mass[0], rel=1e-6)
    np.testing.assert_allclose(volume_centroid(vol, binning), g.centers_px[0], atol=1e-6)


def test_voxelized_sphere_and_shell_volumes():
    vol = np.zeros((40, 40, 40))
    voxelize_shells(vol, solid_spheres(np.array([[0.4, -0.3, 0.2]]), [8.0], [1.0]))
    assert vol.sum() == pytest.approx(4 / 3 * np.pi * 512, rel=2e-3)
    np.testing.assert_allclose(volume_centroid(vol), [0.4, -0.3, 0.2], atol=0.01)
    assert vol.max() == 1.0 and vol.min() == 0.0
    shell = np.zeros((40, 40, 40))
    voxelize_shells(shell, Shells(np.zeros((1, 3)), [10.0], [13.0], [0.5]))
    assert shell.sum() == pytest.approx(0.5 * 4 / 3 * np.pi * (13**3 - 10**3), rel=2e-3)
    assert shell[20, 20, 20] == 0.0  # hollow


def test_phantom_volume_puts_beads_where_the_truth_says(tiny_series):
    vol = tiny_series.phantom(binning=1)
    assert vol.shape == phantom_shape(tiny_series.specimen, tiny_series.config)
    assert vol.shape[1:] == (128, 128)
    bead = tiny_series.beads_px[np.argmin(np.abs(tiny_series.beads_px[:, :2]).max(axis=1))]  # most central
    # a box around the bead, clipped to the volume (surface beads touch the slab faces)
    centre_index = bead + (np.array(vol.shape[::-1]) - 1) / 2.0
    lo = np.maximum(np.floor(centre_index - 9).astype(int), 0)
    hi = np.minimum(np.ceil(centre_index + 10).astype(int), vol.shape[::-1])
    box = np.zeros_like(vol, dtype=float)
    box[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]] = vol[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]]
    # gold is far denser in attenuation than the content around it
    gold = np.where(box > 0.5 * box.max(), box, 0.0)
    np.testing.assert_allclose(volume_centroid(gold), bead, atol=0.05)


def test_phantom_binning_is_validated(tiny_series):
    with pytest.raises(ConfigError, match="phantom binning"):
        tiny_series.phantom(binning=0)
    assert tiny_series.phantom(binning=4).shape[1:] == (32, 32)


def test_z_margin_adds_empty_ice_around_the_same_volume(tiny_series):
    plain = tiny_series.phantom(binning=2)
    from simtomo.voxelize import phantom_volume

    padded = phantom_volume(tiny_series.specimen, tiny_series.config, binning=2, z_margin_px=10)
    assert padded.shape == (plain.shape[0] + 10, *plain.shape[1:])
    np.testing.assert_allclose(padded[5:-5], plain, atol=1e-6)
    assert np.abs(padded[:5]).max() < 1e-3 * np.abs(plain).max()

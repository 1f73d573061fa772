"""The projectors put every primitive where Geometry.project says (DESIGN.md section 3)."""

import numpy as np
import pytest
from conftest import centroid, random_geometry

from simtomo.projector import project_gaussians, project_shells, project_voxels
from simtomo.specimen import Gaussians, Shells, VoxelPhantom, solid_spheres
from simtomo.voxelize import voxelize_shells

BEAD_RADIUS_PX = 6.25  # a 10 nm bead at 8 Å/px


@pytest.mark.parametrize("seed", range(3))
def test_analytic_bead_centre_matches_geometry(seed):
    rng = np.random.default_rng(seed)
    g = random_geometry(rng, 15, shift=40.0)
    bead = rng.uniform(-8, 8, (1, 3))
    predicted = g.project(bead)[:, 0]
    spheres = solid_spheres(bead, [BEAD_RADIUS_PX], [1.0])
    for i in range(g.n_views):
        err = np.linalg.norm(centroid(project_shells(spheres, g, i)) - predicted[i])
        assert err < 0.01, f"view {i}: bead centre off by {err:.4f} px"


def test_analytic_gaussian_centre_and_mass_are_exact():
    rng = np.random.default_rng(5)
    g = random_geometry(rng, 10, shift=30.0)
    blob = Gaussians(rng.uniform(-5, 5, (1, 3)), [2.5], [1.0])
    predicted = g.project(blob.centers_px)[:, 0]
    for i in range(g.n_views):
        image = project_gaussians(blob, g, i)
        assert np.linalg.norm(centroid(image) - predicted[i]) < 1e-5
        # the image integrates the line integrals: mass times the area scale s^2
        assert image.sum() == pytest.approx(blob.mass[0] * g.mag[i] ** 2, rel=1e-5)


def test_sphere_mass_and_central_chord():
    g = random_geometry(np.random.default_rng(1), 4, shape=(80, 80), shift=10.0)
    sphere = solid_spheres(np.zeros((1, 3)), [10.0], [1.0])
    for i in range(4):
        image = project_shells(sphere, g, i)
        assert image.sum() == pytest.approx(4 / 3 * np.pi * 1000 * g.mag[i] ** 2, rel=2e-4)
        # no pixel exceeds the diameter (path through the centre)
        assert image.max() <= 20.0 + 1e-9


def test_shell_is_outer_sphere_minus_inner_sphere():
    g = random_geometry(np.random.default_rng(2), 3, shape=(80, 80), shift=5.0)
    centre = np.array([[1.3, -2.1, 0.4]])
    shell = Shells(centre, [6.0], [9.0], [0.7])
    for i in range(3):
        diff = project_shells(solid_spheres(centre, [9.0], [0.7]), g, i) - project_shells(solid_spheres(centre, [6.0], [0.7]), g, i)
        np.testing.assert_allclose(project_shells(shell, g, i), diff, atol=2e-3)


def test_primitives_outside_the_view_are_skipped():
    g = random_geometry(np.random.default_rng(3), 1, shift=0.0)
    far = np.array([[5000.0, 0.0, 0.0]])
    assert not project_shells(solid_spheres(far, [5.0], [1.0]), g, 0).any()
    assert not project_gaussians(Gaussians(far, [2.0], [1.0]), g, 0).any()


@pytest.mark.parametrize("seed", range(2))
def test_voxel_bead_centre_matches_geometry(seed):
    rng = np.random.default_rng(10 + seed)
    g = random_geometry(rng, 12, shift=40.0)
    bead = rng.uniform(-6, 6, (1, 3))
    volume = np.zeros((40, 64, 64))
    voxelize_shells(volume, solid_spheres(bead, [BEAD_RADIUS_PX], [1.0]))
    phantom = VoxelPhantom(volume, voxel_size_px=1.0)
    predicted = g.project(bead)[:, 0]
    for i in range(g.n_views):
        err = np.linalg.norm(centroid(project_voxels(phantom, g, i)) - predicted[i])
        assert err < 0.01, f"view {i} (tilt {g.tilt_deg[i]:.1f}): voxel bead off by {err:.4f} px"


def test_voxel_projection_approximates_analytic_projection():
    rng = np.random.default_rng(4)
    g = random_geometry(rng, 4, shape=(80, 80), shift=10.0)
    blob = Gaussians(np.array([[2.0, -3.0, 1.0]]), [3.0], [1.0])
    volume = np.zeros((40, 48, 48))
    from simtomo.voxelize import voxelize_gaussians

    voxelize_gaussians(volume, blob)
    for i in range(4):
        analytic = project_gaussians(blob, g, i)
        voxel = project_voxels(VoxelPhantom(volume), g, i)
        assert np.abs(voxel - analytic).max() < 0.02 * analytic.max()


def test_voxel_size_scales_the_projection():
    # The same blob sampled on 2-px voxels projects to the same image as on 1-px voxels.
    g = random_geometry(np.random.default_rng(6), 2, shape=(64, 64), shift=5.0)
    from simtomo.voxelize import voxelize_gaussians

    blob = Gaussians(np.zeros((1, 3)), [4.0], [1.0])
    fine = np.zeros((48, 48, 48))
    coarse = np.zeros((24, 24, 24))
    voxelize_gaussians(fine, blob, binning=1)
    voxelize_gaussians(coarse, blob, binning=2)
    for i in range(2):
        a = project_voxels(VoxelPhantom(fine, 1.0), g, i)
        b = project_voxels(VoxelPhantom(coarse, 2.0), g, i)
        assert a.sum() == pytest.approx(b.sum(), rel=0.01)
        assert np.linalg.norm(centroid(a) - centroid(b)) < 0.01

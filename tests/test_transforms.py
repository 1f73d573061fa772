import numpy as np
from conftest import centroid, random_geometry

from simtomo.geometry import pixel_coordinates
from simtomo.projector import project_gaussians
from simtomo.specimen import Gaussians
from simtomo.transforms import aligned_to_view, view_to_aligned


def gaussian_image(shape, centre, sigma):
    x, y = pixel_coordinates(shape)
    return np.exp(-((x[None, :] - centre[0]) ** 2 + (y[:, None] - centre[1]) ** 2) / (2 * sigma**2))


def test_aligned_to_view_lands_where_project_says():
    rng = np.random.default_rng(0)
    g = random_geometry(rng, 6, shape=(96, 96), shift=20.0)
    point = np.array([[4.0, -6.0, 9.0]])
    for i in range(g.n_views):
        # the aligned frame is P R_y(theta) X: the projection before the in-plane transform
        q = g.select([i]).replace(rot_deg=[0.0], mag=[1.0], shift_px=[[0.0, 0.0]]).project(point)[0, 0]
        raw = aligned_to_view(gaussian_image((96, 96), q, 3.0), g, i)
        assert np.linalg.norm(centroid(raw) - g.project(point)[i, 0]) < 0.01


def test_view_to_aligned_inverts_aligned_to_view():
    rng = np.random.default_rng(1)
    g = random_geometry(rng, 3, shape=(96, 96), shift=8.0)
    aligned = gaussian_image((96, 96), (3.0, -2.0), 6.0)
    for i in range(3):
        back = view_to_aligned(aligned_to_view(aligned, g, i), g, i)
        np.testing.assert_allclose(back[24:72, 24:72], aligned[24:72, 24:72], atol=2e-3)


def test_view_to_aligned_undoes_the_view_transform_of_a_projection():
    # A projected blob, brought into the aligned frame, sits at P R_y X for every view.
    rng = np.random.default_rng(2)
    g = random_geometry(rng, 4, shape=(96, 96), shift=15.0)
    blob = Gaussians(np.array([[5.0, 3.0, -7.0]]), [2.5], [1.0])
    for i in range(4):
        aligned = view_to_aligned(project_gaussians(blob, g, i), g, i)
        expected = g.select([i]).replace(rot_deg=[0.0], mag=[1.0], shift_px=[[0.0, 0.0]]).project(blob.centers_px)[0, 0]
        assert np.linalg.norm(centroid(aligned) - expected) < 0.01

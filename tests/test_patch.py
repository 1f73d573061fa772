"""Tests of the patch-tracking aligner (aligners.patch)."""

import numpy as np
import pytest
from scipy import ndimage

from aligners.coarse import binned_line_integrals, coarse_align
from aligners.imageops import affine_resample
from aligners.patch import PatchAligner, PatchParams, patch_grid, split_tracks, track_patches
from simtomo.alignment_error import alignment_error
from simtomo.errors import AlignmentError, ConfigError
from simtomo.geometry import Geometry
from simtomo.io.geometry_json import geometry_from_dict
from simtomo.observation import Observation
from simtomo.score import thickness_px

# --------------------------------------------------------------------------- #
# Parameters and small pure functions
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "bad",
    [
        {"rotation": "wobbly"},
        {"tilt_gauge": "tilted"},
        {"patch_size": 8},
        {"overlap": 1.0},
        {"lowpass": 0.7},
        {"passes": 0},
        {"segment_views": 2},
        {"binning": 0},
        {"min_track_views": 2},
        {"particle_rounds": -1},
        {"particle_size_nm": 0.0},
        {"particle_binning": 0},
    ],
)
def test_params_reject_bad_values_by_name(bad):
    key = next(iter(bad))
    with pytest.raises(ConfigError, match=f"patch.{key}"):
        PatchParams(**bad)


def test_patch_grid_is_symmetric_inside_the_view_and_spaced_by_the_overlap():
    shape, binning, size, margin = (1024, 768), 4, 64, 10
    centres = patch_grid(shape, binning, size, 0.75, margin=margin)
    xs, ys = np.unique(centres[:, 0]), np.unique(centres[:, 1])
    assert np.allclose(xs, -xs[::-1]) and np.allclose(ys, -ys[::-1])
    assert np.allclose(np.diff(xs), 16 * binning) and np.allclose(np.diff(ys), 16 * binning)
    assert len(centres) == len(xs) * len(ys)
    # every patch plus the search margin stays within the binned view
    hb, wb = shape[0] // binning, shape[1] // binning
    assert np.all(np.abs(centres[:, 0] / binning) + (size - 1) / 2 + margin <= (wb - 1) / 2)
    assert np.all(np.abs(centres[:, 1] / binning) + (size - 1) / 2 + margin <= (hb - 1) / 2)
    # and the grid reaches to within one step of that limit
    assert (wb - 1) / 2 - (xs.max() / binning + (size - 1) / 2 + margin) < 16


def test_patch_grid_rejects_a_patch_larger_than_the_view():
    with pytest.raises(ConfigError, match="patch_size"):
        patch_grid((128, 128), 2, 96, 0.5)


def test_split_tracks_cuts_overlapping_segments_in_tilt_order():
    n = 21
    tilt = np.linspace(-40, 40, n)[::-1].copy()  # stored in descending order: segments must follow tilt order
    xy = np.full((n, 2, 2), np.nan)
    xy[:, 0] = np.arange(n)[:, None] * [1.0, 2.0]  # seen everywhere
    xy[:5, 1] = 7.0  # too short for min_views=6
    out = split_tracks(xy, tilt, segment_views=8, min_views=6)
    order = np.argsort(tilt)
    rank = np.empty(n, int)
    rank[order] = np.arange(n)
    segments = [np.sort(rank[np.isfinite(out[:, k, 0])]) for k in range(out.shape[1])]
    assert all(len(s) == 8 for s in segments)
    assert all(np.array_equal(s, np.arange(s[0], s[0] + 8)) for s in segments)  # consecutive in tilt
    starts = [s[0] for s in segments]
    assert starts == [0, 4, 8, 12, 13]  # half-overlapping, the last one flush with the end
    covered = np.unique(np.concatenate(segments))
    assert np.array_equal(covered, np.arange(n))
    # values are copied, not moved
    k = 1
    views = np.flatnonzero(np.isfinite(out[:, k, 0]))
    assert np.array_equal(out[views, k], xy[views, 0])
    # segment_views = 0 keeps whole tracks, dropping the short one
    whole = split_tracks(xy, tilt, 0, 6)
    assert whole.shape == (n, 1, 2)


# --------------------------------------------------------------------------- #
# Tracking on an exactly planar scene: tracks are projections of 3-D points
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def planar_series():
    """A noise-free series of a flat textured sheet at z = 0 under drifting rotation, magnification and shifts.

    Each view is the texture resampled through the exact projection of the plane
    (``p = M_xy (x, y) + t``), so a patch of any view is the same piece of sheet,
    foreshortened: the only thing tracking can get wrong is its own arithmetic.
    """
    rng = np.random.default_rng(3)
    n, shape = 31, (256, 256)
    tilt = np.linspace(-60, 60, n)
    geometry = Geometry(
        tilt_deg=tilt + rng.normal(0, 0.2, n),
        rot_deg=84.0 + rng.normal(0, 0.3, n),
        mag=1.0 + rng.normal(0, 0.003, n),
        shift_px=rng.normal(0, 4.0, (n, 2)),
        image_shape=shape,
        pixel_size_A=8.0,
    )
    texture = ndimage.gaussian_filter(rng.normal(0.0, 1.0, (1024, 1024)), 2.5)
    texture *= 0.2 / texture.std()
    m = geometry.projection_matrices()
    views = []
    for i in range(n):
        inv = np.linalg.inv(m[i][:, :2])  # image -> sheet coordinates
        views.append(affine_resample(texture, inv, -inv @ geometry.shift_px[i], shape, order=3))
    counts = 1000.0 * np.exp(-np.stack(views))
    return geometry, counts.astype(np.float32)


def test_tracks_on_a_planar_scene_are_projections_of_3d_points(planar_series):
    geometry, counts = planar_series
    images = binned_line_integrals(counts, 1)
    start = int(np.argmin(np.abs(geometry.tilt_deg)))
    centres = patch_grid(geometry.image_shape, 1, 48, 0.5, margin=10)
    tracks = track_patches(images, geometry.tilt_deg, geometry, centres, start, patch_size=48, max_shift=8)
    xy = tracks.xy
    seen = np.isfinite(xy[..., 0])
    assert np.all(seen[start])
    assert seen.sum(axis=0).min() >= 20  # tracks run far out in tilt
    m = geometry.projection_matrices()
    t = geometry.shift_px
    rms = []
    for j in range(xy.shape[1]):
        v = np.flatnonzero(seen[:, j])
        a = m[v].reshape(-1, 3)
        b = (xy[v, j] - t[v]).ravel()
        x = np.linalg.lstsq(a, b, rcond=None)[0]
        assert abs(x[2]) < 0.5  # the patch's point lies in the plane of the blobs
        rms.append(np.sqrt(np.mean((a @ x - b) ** 2)))
    assert np.max(rms) < 0.05  # px: consistent with one 3-D point through every view


def test_tracking_from_a_shifted_model_finds_the_same_points(planar_series):
    # The model only predicts where to search: px errors in the shifts change nothing.
    geometry, counts = planar_series
    images = binned_line_integrals(counts, 1)
    start = int(np.argmin(np.abs(geometry.tilt_deg)))
    centres = patch_grid(geometry.image_shape, 1, 48, 0.5, margin=10)
    kwargs = dict(patch_size=48, max_shift=8)
    exact = track_patches(images, geometry.tilt_deg, geometry, centres, start, **kwargs)
    rng = np.random.default_rng(1)
    off = geometry.replace(shift_px=geometry.shift_px + rng.uniform(-1.5, 1.5, geometry.shift_px.shape))
    rough = track_patches(images, geometry.tilt_deg, off, centres, start, **kwargs)
    both = np.isfinite(exact.xy[..., 0]) & np.isfinite(rough.xy[..., 0])
    assert both.sum() >= 0.95 * np.isfinite(exact.xy[..., 0]).sum()
    assert np.max(np.abs(exact.xy[both] - rough.xy[both])) < 0.05


# --------------------------------------------------------------------------- #
# Failure on content-free input
# --------------------------------------------------------------------------- #


def test_pure_noise_is_reported_as_too_little_correlation():
    rng = np.random.default_rng(0)
    stack = rng.poisson(200.0, (31, 256, 256)).astype(np.float32)
    obs = Observation(stack=stack, tilt_deg=np.linspace(-60, 60, 31), pixel_size_A=8.0, tilt_axis_deg=85.0)
    with pytest.raises(AlignmentError, match="correlation too low"):
        PatchAligner(PatchParams()).align(obs)


# --------------------------------------------------------------------------- #
# The real workload
# --------------------------------------------------------------------------- #


def test_patch_on_standard_nobeads_meets_the_target(standard_nobeads_series):
    """Patch tracks, then particle tracks, on the standard workload (seed 0).

    Measured: coarse start 2.15 px, patch tracks 1.12 px, after the particle rounds 0.20 px.
    """
    series = standard_nobeads_series
    obs = series.observation()
    result = PatchAligner(PatchParams()).align(obs)
    thick = thickness_px(series.truth())
    err = alignment_error(result.geometry, series.geometry, thickness_px=thick)
    tracked = geometry_from_dict(result.info["patch_track_geometry"], source="patch info")
    err_tracked = alignment_error(tracked, series.geometry, thickness_px=thick)
    # The shift-only coarse alignment the aligner starts from (same tilt axis, same binning).
    coarse = coarse_align(obs.stack, obs.tilt_deg, result.info["tilt_axis_start_deg"], binning=result.info["binning"])
    err_coarse = alignment_error(coarse.geometry, series.geometry, thickness_px=thick)
    # Patch tracking clearly improves on it, and the particle tracks take it under the 0.5 px.
    assert err_tracked.rms_px < 0.6 * err_coarse.rms_px
    assert err.rms_px < 0.5, (err_coarse.rms_px, err_tracked.rms_px, err.rms_px)
    assert [r["round"] for r in result.info["particles"]["passes"]] == [1, 1, 1, 2, 2, 2]
    report = result.residuals
    assert report.per_view_rms_px.shape == (obs.stack.shape[0],)
    assert report.n_points > 1000
    assert np.isfinite(report.rms_px) and report.rms_px > 0
    assert result.markers_px.shape[1] == 3
    assert result.info["aligner"] == "patch"

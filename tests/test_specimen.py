import numpy as np
import pytest

import simtomo
from simtomo.config import apply_overrides
from simtomo.errors import ConfigError
from simtomo.specimen import GAUSSIAN_SIGMA_PER_RADIUS, Gaussians, _filament, content_region_px, make_specimen


def specimen(overrides, seed=0, preset="tiny"):
    return make_specimen(apply_overrides(simtomo.preset(preset), overrides), np.random.SeedSequence(seed), 41)


def test_beads_keep_their_spacing_and_stay_in_the_field():
    s = specimen({"beads": {"count": 12, "min_spacing_nm": 20.0}})
    xy = s.bead_centers_px[:, :2]
    d = np.linalg.norm(xy[:, None] - xy[None], axis=-1) + np.eye(12) * 1e9
    assert d.min() >= 20.0 * 10 / 8.0
    assert np.all(np.abs(xy) <= 0.45 * 128)


@pytest.mark.parametrize("placement, sign", [("top", 1), ("bottom", -1)])
def test_bead_placement_on_one_surface(placement, sign):
    s = specimen({"beads": {"placement": placement}})
    zmax = s.thickness_px / 2 - 6.25
    np.testing.assert_allclose(s.bead_centers_px[:, 2], sign * zmax)


def test_beads_throughout_and_on_both_surfaces():
    both = specimen({"beads": {"count": 20, "min_spacing_nm": 5.0}}).bead_centers_px[:, 2]
    assert set(np.round(np.abs(both), 9)) == {round(100 / 2 - 6.25, 9)} and (both > 0).any() and (both < 0).any()
    inside = specimen({"beads": {"placement": "throughout", "count": 20, "min_spacing_nm": 5.0}}).bead_centers_px[:, 2]
    assert np.all(np.abs(inside) <= 100 / 2 - 6.25) and len(np.unique(inside)) == 20


def test_content_stays_in_the_slab_and_fills_the_visible_region():
    cfg = simtomo.preset("tiny")
    s = make_specimen(cfg, np.random.SeedSequence(0), 41)
    half_z = s.thickness_px / 2
    assert np.all(np.abs(s.gaussians.centers_px[:, 2]) + s.gaussians.sigma_px <= half_z + 1e-9)
    assert np.all(np.abs(s.shells.centers_px[:, 2]) + s.shells.r_outer_px <= half_z + 1e-9)
    hx, hy = content_region_px(cfg, 41)
    # proteins are spread over the whole region that tilted views see, not only the zero-tilt field
    assert np.abs(s.gaussians.centers_px[:, 0]).max() > 0.8 * hx
    assert hx > hy > 64


def test_region_depends_on_config_not_on_drawn_shifts():
    a = content_region_px(simtomo.preset("standard"), 61)
    b = content_region_px(apply_overrides(simtomo.preset("standard"), {"misalignment": {"backlash_nm": 0.0}}), 61)
    assert a[0] > b[0]  # larger stage errors, larger region
    assert a == content_region_px(simtomo.preset("standard"), 61)


def helix_axis(centres):
    """Centre and direction of a straight filament's axis: mean and principal direction of its subunits."""
    centre = centres.mean(axis=0)
    direction = np.linalg.svd(centres - centre)[2][0]
    return centre, direction


def distance_from_axis(centres, centre, direction):
    rel = centres - centre
    return np.linalg.norm(rel - np.outer(rel @ direction, direction), axis=1)


def test_actin_geometry_rise_and_radius():
    centres = _filament(
        np.random.default_rng(0), np.zeros(3), 200.0, 0.0, rise=2.75, radius=2.0, twist_rad=np.deg2rad(-166.7), n_strands=1, strand_stagger=0.0
    )
    centre, axis = helix_axis(centres)
    np.testing.assert_allclose(np.abs(np.diff(centres, axis=0) @ axis), 2.75, atol=0.02)
    np.testing.assert_allclose(distance_from_axis(centres, centre, axis), 2.0, atol=0.05)


def test_microtubule_has_13_protofilaments_on_its_radius():
    c = _filament(np.random.default_rng(1), np.zeros(3), 80.0, 0.0, rise=4.0, radius=11.5, twist_rad=0.0, n_strands=13, strand_stagger=12 / 13)
    assert len(c) == 20 * 13
    # one protofilament steps along the axis; a ring's 13 evenly spaced subunits average onto it
    axis = (c[13] - c[0]) / np.linalg.norm(c[13] - c[0])
    np.testing.assert_allclose(distance_from_axis(c, c[:13].mean(axis=0), axis), 11.5, atol=1e-9)
    # protofilament p of ring j sits 4 j + 12 p / 13 along the axis: a 3-start lattice
    along = (c - c[0]) @ axis * np.sign((c[1] - c[0]) @ axis)
    np.testing.assert_allclose(along[:13], 12 / 13 * np.arange(13), atol=1e-9)


def test_protein_gaussian_has_the_mass_of_a_unit_ball():
    g = Gaussians(np.zeros((1, 3)), [GAUSSIAN_SIGMA_PER_RADIUS * 4.0], [1.0])
    assert g.mass[0] == pytest.approx(4 / 3 * np.pi * 4.0**3, rel=1e-12)


def test_too_many_beads_is_a_clear_error():
    with pytest.raises(ConfigError, match="could not place 40 beads 30.0 nm apart"):
        specimen({"beads": {"count": 40, "min_spacing_nm": 30.0}})


def content_set(spec, scale=1.0):
    """Content positions in nm-like units, as a set of rounded tuples."""
    return {tuple(np.round(c * scale, 6)) for c in spec.gaussians.centers_px}


def test_beads_do_not_change_the_cells():
    seq = np.random.SeedSequence(4)
    with_beads = make_specimen(simtomo.preset("standard"), seq, 61)
    without = make_specimen(simtomo.preset("standard-nobeads"), seq, 61)
    assert len(with_beads.gold) == 25 and len(without.gold) == 0
    np.testing.assert_array_equal(with_beads.gaussians.centers_px, without.gaussians.centers_px)
    np.testing.assert_array_equal(with_beads.shells.r_outer_px, without.shells.r_outer_px)


def test_larger_stage_errors_draw_more_cells_of_the_same_specimen():
    seq = np.random.SeedSequence(5)
    small = make_specimen(apply_overrides(simtomo.preset("tiny"), {"misalignment": {"backlash_nm": 0.0}}), seq, 41)
    large = make_specimen(apply_overrides(simtomo.preset("tiny"), {"misalignment": {"backlash_nm": 40.0}}), seq, 41)
    assert len(large.gaussians) > len(small.gaussians)
    assert content_set(small) <= content_set(large)
    np.testing.assert_array_equal(small.gold.centers_px, large.gold.centers_px)


def test_large_images_the_cells_of_standard_at_finer_sampling():
    seq = np.random.SeedSequence(6)
    std = make_specimen(simtomo.preset("standard"), seq, 61)
    big = make_specimen(simtomo.preset("large"), seq, 61)
    # the same objects in nm: positions scale with the pixel size (8 A vs 2 A)
    in_std = content_set(std, 0.8)
    assert len(in_std) > 1000 and in_std <= content_set(big, 0.2)

import hashlib
import json
import sys

import mrcfile
import numpy as np
import pytest
from conftest import centroid

import simtomo
from simtomo.config import apply_overrides
from simtomo.errors import ConfigError, FileFormatError
from simtomo.io import read_stack, read_truth, read_volume, write_volume
from simtomo.projector import project_voxels
from simtomo.specimen import VoxelPhantom

EMPTY_CONTENT = {"vesicles": 0, "actin_filaments": 0, "microtubules": 0, "proteins": 0}


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_preset_matches_design(tiny_series):
    s = tiny_series
    assert s.stack.shape == (41, 128, 128)
    np.testing.assert_array_equal(s.scheme.tilt_deg, np.arange(-60, 61, 3.0))
    assert s.beads_px.shape == (10, 3)
    assert np.all(np.isfinite(s.stack)) and s.stack.min() >= 0


def test_same_seed_same_bytes_other_seed_other_noise(tmp_path):
    config = simtomo.preset("tiny")
    a, _ = simtomo.simulate_to_files(config, 7, tmp_path / "a", "ts", workers=1)
    b, _ = simtomo.simulate_to_files(config, 7, tmp_path / "b", "ts", workers=3)
    for suffix in ("mrc", "rawtlt", "truth.json", "config.toml"):
        assert digest(tmp_path / "a" / f"ts.{suffix}") == digest(tmp_path / "b" / f"ts.{suffix}"), suffix
    c = simtomo.simulate(config, 8)
    assert not np.array_equal(a.stack, c.stack)
    assert not a.geometry.equals(c.geometry)


def test_content_changes_leave_geometry_and_beads_unchanged():
    # Each part of the simulation draws from its own stream.
    base = simtomo.preset("tiny")
    a = simtomo.simulate(base, 3)
    b = simtomo.simulate(apply_overrides(base, {"content": {"proteins": 0}}), 3)
    assert a.geometry.equals(b.geometry)
    np.testing.assert_array_equal(a.beads_px, b.beads_px)


def test_files_hold_what_design_section_4_says(tmp_path):
    series, paths = simtomo.simulate_to_files("tiny", 0, tmp_path, phantom_bin=2)
    stack, pixel = read_stack(paths["stack"])
    np.testing.assert_array_equal(stack, series.stack)
    assert pixel == 8.0
    rawtlt = np.loadtxt(paths["rawtlt"])
    np.testing.assert_array_equal(rawtlt, series.scheme.tilt_deg)
    truth = read_truth(paths["truth"])
    assert truth.geometry.equals(series.geometry)
    np.testing.assert_array_equal(truth.beads_px, series.beads_px)
    np.testing.assert_array_equal(truth.acquisition_order, series.scheme.acquisition_order)
    assert truth.seed == 0 and truth.config["detector"]["image_shape"] == [128, 128]
    assert json.loads(paths["truth"].read_text())["format"] == "simtomo.geometry/1"
    # the written config reproduces the run
    again = simtomo.simulate(simtomo.load_config(config_file=paths["config"]), 0)
    np.testing.assert_array_equal(again.stack, series.stack)
    vol, voxel = read_volume(paths["phantom"])
    assert voxel == 16.0 and vol.shape[1:] == (64, 64)


def test_in_memory_and_streamed_series_are_identical(tmp_path, tiny_series):
    streamed, _ = simtomo.simulate_to_files("tiny", 0, tmp_path)
    np.testing.assert_array_equal(streamed.stack, tiny_series.stack)


def test_observation_carries_no_truth(tiny_series):
    obs = tiny_series.observation()
    fields = set(vars(obs))
    assert fields == {"stack", "tilt_deg", "pixel_size_A", "acquisition_order", "dose_e_per_A2", "tilt_axis_deg", "bead_diameter_nm", "name"}
    np.testing.assert_array_equal(obs.tilt_deg, tiny_series.scheme.tilt_deg)
    assert not np.allclose(obs.tilt_deg, tiny_series.geometry.tilt_deg)
    assert obs.tilt_axis_deg == tiny_series.config.misalignment.nominal_tilt_axis_deg
    # the aligner gets a read-only view: it cannot alter the images scoring reconstructs
    assert obs.stack is not tiny_series.stack and not obs.stack.flags.writeable
    with pytest.raises(ValueError):
        obs.stack[0, 0, 0] = 0.0


def test_observation_of_a_streamed_series_is_a_plain_read_only_array(tmp_path):
    series, _ = simtomo.simulate_to_files("tiny", 0, tmp_path)
    obs = series.observation()
    assert type(obs.stack) is np.ndarray and not obs.stack.flags.writeable


def test_a_failed_run_leaves_earlier_results_intact(tmp_path, monkeypatch):
    simtomo.simulate_to_files("tiny", 0, tmp_path)
    before = {p.name: digest(p) for p in tmp_path.iterdir()}

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sys.modules["simtomo.simulate"], "write_truth", broken)
    with pytest.raises(OSError, match="No space left"):
        simtomo.simulate_to_files("tiny", 1, tmp_path)
    assert {p.name: digest(p) for p in tmp_path.iterdir()} == before  # no staging folder left either


def test_outputs_of_a_run_are_exactly_that_runs(tmp_path):
    simtomo.simulate_to_files("tiny", 0, tmp_path, phantom_bin=4)
    assert (tmp_path / "tiny.phantom.mrc").exists()
    simtomo.simulate_to_files("tiny", 1, tmp_path)  # no phantom this time
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.config.toml", "tiny.mrc", "tiny.rawtlt", "tiny.truth.json"]


@pytest.mark.parametrize("name", ["a/b", ".hidden", "..", "x\\y"])
def test_output_names_must_be_plain_file_names(tmp_path, name):
    with pytest.raises(ConfigError, match="output name: expected a plain file name"):
        simtomo.simulate_to_files("tiny", 0, tmp_path, name)
    # the default name is the config's: an empty one is refused, not written as hidden files
    with pytest.raises(ConfigError, match="output name: expected a plain file name .* got ''"):
        simtomo.simulate_to_files(apply_overrides(simtomo.preset("tiny"), {"name": ""}), 0, tmp_path)


def test_phantom_binning_is_checked_before_simulating(tmp_path):
    with pytest.raises(ConfigError, match="phantom binning: expected an integer >= 1, got 0"):
        simtomo.simulate_to_files("tiny", 0, tmp_path, phantom_bin=0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"optics": {"ctf": True}},
        {"tilt": {"scheme": "bidirectional", "start_deg": -21.0}},
        {"misalignment": {"motion_blur_nm": 2.0}, "detector": {"mtf_sigma_px": 0.6}},
        {"specimen": {"slab_tilt_x_deg": 8.0, "slab_tilt_y_deg": -12.0}, "beads": {"placement": "throughout"}},
    ],
    ids=["default", "ctf", "bidirectional", "blur-mtf", "tilted-slab"],
)
def test_beads_in_noise_free_images_land_on_the_true_projection(variant):
    """End to end: simulated misalignment, storage order, imaging; centres within 0.01 px."""
    overrides = {
        "detector": {"poisson_noise": False, "image_shape": (192, 192)},
        "content": EMPTY_CONTENT,
        "beads": {"count": 6, "min_spacing_nm": 40.0},
        "misalignment": {"initial_offset_nm": 12.0, "shift_walk_nm": 4.0, "backlash_nm": 8.0},
    }
    for section, values in variant.items():
        overrides[section] = {**overrides.get(section, {}), **values}
    series = simtomo.simulate(apply_overrides(simtomo.preset("tiny"), overrides), 1)
    predicted = series.geometry.project(series.beads_px)
    h, w = series.geometry.image_shape
    checked = 0
    for i in range(series.geometry.n_views):
        # gold exponent image: -log(I / flat background)
        attenuation = -np.log(series.stack[i].astype(float) / np.median(series.stack[i]))
        for b, p in enumerate(predicted[i]):
            others = np.delete(predicted[i], b, axis=0)
            if np.min(np.linalg.norm(others - p, axis=1)) < 22 or not (14 < p[0] + (w - 1) / 2 < w - 15 and 14 < p[1] + (h - 1) / 2 < h - 15):
                continue
            col, row = int(round(p[0] + (w - 1) / 2)), int(round(p[1] + (h - 1) / 2))
            box = attenuation[row - 10 : row + 11, col - 10 : col + 11]
            found = centroid(box) + [col - (w - 1) / 2, row - (h - 1) / 2]
            assert np.linalg.norm(found - p) < 0.01, f"view {i} bead {b}: {np.linalg.norm(found - p):.4f} px"
            checked += 1
    assert checked > 100


def test_phantom_volume_reprojects_to_the_noise_free_images():
    """The phantom is what the images show: its projection equals -log(I / I0) of each view."""
    config = apply_overrides(simtomo.preset("tiny"), {"detector": {"poisson_noise": False}})
    series = simtomo.simulate(config, 2)
    phantom = VoxelPhantom(series.phantom(binning=1))
    cfg = series.config
    ice = series.specimen.ice_path_px(series.geometry.tilt_deg) * cfg.detector.pixel_size_A / 10.0
    for i in (20, 25):  # near zero tilt the field of view covers the phantom's whole slab
        flux = series.scheme.dose_e_per_A2[i] * (cfg.detector.pixel_size_A / series.geometry.mag[i]) ** 2 * np.exp(-ice[i] / cfg.optics.ice_mean_free_path_nm)
        measured = -np.log(series.stack[i] / flux)
        reprojected = project_voxels(phantom, series.geometry, i)
        inner = (slice(24, -24), slice(24, -24))  # away from content outside the phantom's field
        diff = measured[inner] - reprojected[inner]
        assert np.sqrt(np.mean(diff**2)) < 0.05 * np.sqrt(np.mean(measured[inner] ** 2)), i


def test_voxel_phantom_from_mrc_is_projected_where_geometry_says(tmp_path):
    vol = np.zeros((32, 48, 48), dtype=np.float32)
    from simtomo.specimen import Gaussians
    from simtomo.voxelize import voxelize_gaussians

    blob = Gaussians(np.array([[6.0, -4.0, 3.0]]), [2.5], [20.0])
    voxelize_gaussians(vol, blob)
    write_volume(tmp_path / "blob.mrc", vol, 8.0)
    config = apply_overrides(
        simtomo.preset("tiny"),
        {"specimen": {"phantom_mrc": str(tmp_path / "blob.mrc")}, "beads": {"count": 0}, "detector": {"poisson_noise": False}},
    )
    series = simtomo.simulate(config, 0)
    predicted = series.geometry.project(blob.centers_px)[:, 0]
    for i in (0, 20, 40):
        deficit = np.median(series.stack[i]) - series.stack[i].astype(float)
        assert np.linalg.norm(centroid(np.clip(deficit, 0, None)) - predicted[i]) < 0.05


def test_top_placement_puts_beads_under_the_top_surface():
    config = apply_overrides(simtomo.preset("tiny"), {"beads": {"placement": "top"}, "content": EMPTY_CONTENT})
    s = simtomo.simulate(config, 0)
    z_top = s.specimen.thickness_px / 2 - 0.5 * 10.0 * 10 / 8.0
    np.testing.assert_allclose(s.beads_px[:, 2], z_top)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: simtomo.simulate("huge", 0), ConfigError, "unknown preset 'huge'; available presets: standard, standard-nobeads, tiny, large"),
        (lambda: simtomo.load_config("tiny", assignments=["tilt.total_dose_e_per_A2=-5"]), ConfigError, r"tilt.total_dose_e_per_A2: expected a dose > 0 and <= 1e6, got -5.0"),
        (lambda: simtomo.load_config("tiny", assignments=["beads.cont=3"]), ConfigError, r"unknown key beads.cont \(did you mean 'count'\?\)"),
        (lambda: simtomo.load_config("tiny", assignments=["tilt.max_deg=95"]), ConfigError, "tilt.max_deg: expected a tilt strictly between -90 and 90"),
        (lambda: simtomo.load_config("tiny", assignments=["tilt.max_deg=88.5"]), ConfigError, "within ±89 degrees after the tilt offset"),
        (lambda: simtomo.simulate("tiny", -1), ConfigError, "seed must be a non-negative integer"),
        (lambda: simtomo.load_config("tiny", assignments=["beads.count=500"]) and simtomo.simulate(simtomo.load_config("tiny", assignments=["beads.count=500"]), 0), ConfigError, "could not place 500 beads"),
    ],
)
def test_bad_input_gets_a_clear_error(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_unreadable_mrc_phantom_names_the_key_and_the_file(tmp_path):
    bad = tmp_path / "phantom.mrc"
    bad.write_bytes(b"not an mrc file at all" * 100)
    config = simtomo.load_config("tiny", assignments=[f"specimen.phantom_mrc='{bad}'"])
    with pytest.raises(FileFormatError, match="specimen.phantom_mrc: .*phantom.mrc"):
        simtomo.simulate(config, 0)
    with pytest.raises(FileFormatError, match="specimen.phantom_mrc: .*missing.mrc"):
        simtomo.simulate(simtomo.load_config("tiny", assignments=[f"specimen.phantom_mrc='{tmp_path / 'missing.mrc'}'"]), 0)


def test_phantom_path_in_a_config_file_is_relative_to_that_file(tmp_path):
    (tmp_path / "sub").mkdir()
    write_volume(tmp_path / "sub" / "cell.mrc", np.zeros((8, 16, 16), dtype=np.float32), 8.0)
    (tmp_path / "sub" / "run.toml").write_text('preset = "tiny"\n[specimen]\nphantom_mrc = "cell.mrc"\n')
    config = simtomo.load_config(config_file=tmp_path / "sub" / "run.toml")
    assert config.specimen.phantom_mrc == str(tmp_path / "sub" / "cell.mrc")
    simtomo.simulate(config, 0)


def test_large_preset_is_standard_at_finer_sampling():
    large, standard = simtomo.preset("large"), simtomo.preset("standard")
    assert large.detector.image_shape == (4096, 4096) and large.detector.pixel_size_A == 2.0
    assert large.tilt == standard.tilt and large.specimen == standard.specimen and large.misalignment == standard.misalignment
    assert simtomo.preset("standard-nobeads").beads.count == 0

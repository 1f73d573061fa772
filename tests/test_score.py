"""Scoring: alignment error, residuals, transfer against theory, resolution, CLI."""

import json

import numpy as np
import pytest
from scipy import fft

import simtomo
from simtomo.alignment import AlignmentResult, ResidualReport
from simtomo.cli import main
from simtomo.errors import ConfigError
from simtomo.imaging import frequency_grid
from simtomo.io import read_volume, write_alignment
from simtomo.reconstruct import reconstruct
from simtomo.resolution import predicted_transfer, transfer
from simtomo.score import score, scoring_reference


@pytest.fixture(scope="module")
def noise_free_standard():
    cfg = simtomo.load_config("standard", None, ["detector.poisson_noise=false"])
    series = simtomo.simulate(cfg, seed=0)
    return series, scoring_reference(series.truth(), series.stack, binning=2)


def _below(curve, fraction):
    return curve.frequency_per_px < fraction * curve.nyquist_per_px


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_expected_transfer_of_random_shifts_is_the_gaussian_envelope(noise_free_standard, sigma):
    # Averaged over random per-view shifts of sigma per axis, each view is its image convolved with a 2-D
    # Gaussian; its central slice then carries exp(-2 pi^2 sigma^2 k^2) exactly. Reconstructing the blurred
    # views checks the reconstruction, the wedge restriction and the shell sums against the theory.
    series, ref = noise_free_standard
    kx, ky = frequency_grid(series.geometry.image_shape)
    envelope = np.exp(-2 * np.pi**2 * sigma**2 * (kx**2 + ky**2))
    blurred = fft.irfft2(fft.rfft2(ref.projections) * envelope, s=series.geometry.image_shape).astype(np.float32)
    vol = reconstruct(blurred, series.geometry, ref.phantom.shape, voxel_size_px=2)
    t = transfer(vol, ref.volume_true, voxel_size_px=2, region=ref.region, mask=ref.mask)
    theory = predicted_transfer(t.frequency_per_px, sigma)
    # near the binned Nyquist frequency the 2 x 2 binning aliases, and does so differently for blurred views
    use = (theory > 0.1) & _below(t, 0.75)
    assert use.sum() >= 10
    np.testing.assert_array_less(np.abs(t.values[use] / theory[use] - 1), 0.10)


def _low_discrepancy_shifts(n: int, sigma: float) -> np.ndarray:
    """Per-view shifts whose radii follow the 2-D Gaussian's quantiles (van der Corput order) and directions the golden angle."""
    u = np.array([int(format(i, "b")[::-1], 2) / 2 ** len(format(i, "b")) if i else 0.0 for i in range(n)]) + 0.5 / n
    r = sigma * np.sqrt(-2 * np.log(1 - u))
    a = np.arange(n) * np.pi * (3 - np.sqrt(5))
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


def test_misaligned_geometry_transfer_follows_theory(noise_free_standard):
    # one realisation: each shell averages cos(2 pi k.d) over ~61 views, a scatter of about
    # 0.7 / sqrt(61) ~ 0.09 where the envelope is small, so the comparison is absolute
    series, ref = noise_free_standard
    truth = series.truth()
    order = np.argsort(truth.geometry.tilt_deg)
    for sigma in (0.5, 1.0, 2.0):
        d = np.empty((truth.n_views, 2))
        d[order] = _low_discrepancy_shifts(truth.n_views, sigma)
        s = score(truth, truth.geometry.replace(shift_px=truth.geometry.shift_px + d), series.stack, reference=ref)
        assert s.alignment_error_rms_px == pytest.approx(np.sqrt(2) * sigma, rel=0.1)
        t = s.transfer
        theory = predicted_transfer(t.frequency_per_px, s.transfer_sigma_px)
        use = (theory > 0.1) & _below(t, 0.75)
        np.testing.assert_array_less(np.abs(t.values[use] - theory[use]), 0.1)
        assert s.resolution_loss_A >= 0


def test_true_geometry_scores_perfectly(tiny_series):
    s = score(tiny_series, tiny_series.geometry, tiny_series.stack, binning=1)
    assert s.alignment_error_rms_px < 1e-9
    assert s.resolution_loss_A == 0
    np.testing.assert_allclose(s.transfer.values, 1.0, atol=1e-6)
    np.testing.assert_array_equal(s.bead_fwhm_increase_px, 0.0)
    assert s.beads_fitted >= 5
    row = s.to_row()
    assert row["alignment_error_rms_px"] < 1e-9 and len(row["alignment_error_per_view_px"]) == tiny_series.geometry.n_views
    assert {"bead_fwhm_px_x", "bead_fwhm_px_z", "resolution_A", "crowther_limit_A"} <= set(row)


def test_misalignment_costs_resolution_and_blurs_beads(tiny_series):
    rng = np.random.default_rng(5)
    g = tiny_series.geometry
    bad = g.replace(shift_px=g.shift_px + rng.normal(0, 2.0, (g.n_views, 2)))
    s = score(tiny_series, bad, tiny_series.stack, binning=1)
    assert 2.2 < s.alignment_error_rms_px < 3.4
    assert s.resolution_loss_A > 5
    # along the tilt axis (y) a view's shift moves its whole contribution: measured +0.68 px for sigma 2 px;
    # across it (x, z) the streaks of the back-projection share the blur (+0.15, +0.75)
    assert s.bead_fwhm_increase_px[1] > 0.3
    assert np.all(s.bead_fwhm_increase_px > 0) and s.bead_fwhm_increase_px.sum() > 0.8


def test_residuals_are_carried_beside_the_error(tiny_series):
    g = tiny_series.geometry
    report = ResidualReport.from_residuals(np.full((g.n_views, 4, 2), 0.3), np.ones((g.n_views, 4), bool))
    s = score(tiny_series, AlignmentResult(g, report, info={"aligner": "mine"}))
    assert s.residual_rms_px == pytest.approx(0.3 * np.sqrt(2))
    assert s.aligner == "mine" and np.isnan(s.resolution_A)


def test_bad_input_is_named(tiny_series):
    g = tiny_series.geometry
    with pytest.raises(ConfigError, match="geometry has 40 views, the truth 41"):
        score(tiny_series, g.select(slice(0, 40)))
    with pytest.raises(ConfigError, match="images of \\(64, 64\\)"):
        score(tiny_series, g.replace(image_shape=(64, 64)))
    with pytest.raises(ConfigError, match="stack has shape \\(40, 128, 128\\)"):
        score(tiny_series, g, tiny_series.stack[:40])
    with pytest.raises(ConfigError, match="binning"):
        score(tiny_series, g, tiny_series.stack, binning=0)


def test_score_and_reconstruct_commands(tiny_series, tmp_path):
    paths = tiny_series.write(tmp_path, "t")
    rng = np.random.default_rng(1)
    g = tiny_series.geometry
    est = AlignmentResult(g.replace(shift_px=g.shift_px + rng.normal(0, 0.5, (g.n_views, 2))), info={"aligner": "test"})
    write_alignment(tmp_path / "t.geometry.json", est, aligner="test")
    out = tmp_path / "scores"
    assert main(["-q", "score", str(paths["truth"]), str(tmp_path / "t.geometry.json"), "--stack", str(paths["stack"]), "--out", str(out), "--bin", "1"]) == 0
    doc = json.loads((out / "scores.json").read_text())
    for key in ("alignment_error_rms_px", "alignment_error_per_view_px", "resolution_A", "resolution_true_geometry_A", "resolution_loss_A", "bead_fwhm_px"):
        assert key in doc
    assert 0.4 < doc["alignment_error_rms_px"] < 1.0 and len(doc["alignment_error_per_view_px"]) == 41
    for stem in ("per_view_error", "transfer", "fsc"):
        assert (out / f"{stem}.png").stat().st_size > 5000 and (out / f"{stem}.svg").exists()
    vol_path = tmp_path / "t.rec.mrc"
    assert main(["-q", "reconstruct", str(paths["stack"]), str(paths["truth"]), "--out", str(vol_path), "--bin", "2", "--thickness", "100"]) == 0
    vol, voxel = read_volume(vol_path)
    assert vol.shape == (50, 64, 64) and voxel == pytest.approx(16.0)
    # a geometry for another stack is refused with both counts
    est_short = AlignmentResult(g.select(slice(0, 30)))
    write_alignment(tmp_path / "short.geometry.json", est_short)
    assert main(["-q", "reconstruct", str(paths["stack"]), str(tmp_path / "short.geometry.json"), "--out", str(vol_path)]) == 2

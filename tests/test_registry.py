"""The aligner registry, the result types and the alignment files."""

import json

import numpy as np
import pytest

import aligners
from simtomo.alignment import AlignmentResult, ResidualReport
from simtomo.errors import ConfigError, FileFormatError
from simtomo.geometry import Geometry
from simtomo.io import read_alignment, write_alignment, write_residual_table, write_geometry
from simtomo.registry import parse_param


def test_nominal_is_registered_through_entry_points():
    assert "nominal" in aligners.available()
    assert "nominal" in aligners.describe("nominal")


def test_nominal_aligner_uses_metadata_only(tiny_series):
    obs = tiny_series.observation()
    result = aligners.get("nominal").align(obs)
    np.testing.assert_array_equal(result.geometry.tilt_deg, obs.tilt_deg)
    assert np.all(result.geometry.rot_deg == obs.tilt_axis_deg)
    assert np.all(result.geometry.shift_px == 0) and np.all(result.geometry.mag == 1)
    assert aligners.get("nominal", tilt_axis_deg="80.5").align(obs).geometry.rot_deg[0] == 80.5


def test_unknown_aligner_and_parameter_are_named():
    with pytest.raises(ConfigError, match="unknown aligner 'nominl' \\(did you mean 'nominal'\\?\\)"):
        aligners.get("nominl")
    with pytest.raises(ConfigError, match="unknown parameter 'tilt_axis' \\(did you mean 'tilt_axis_deg'\\?\\)"):
        aligners.get("nominal", tilt_axis=3)
    with pytest.raises(ConfigError, match="tilt_axis_deg: expected float, got 'abc'"):
        aligners.get("nominal", tilt_axis_deg="abc")


@pytest.mark.parametrize(
    "text, kind, value",
    [("3", int, 3), ("2.5", float, 2.5), ("yes", bool, True), ("off", bool, False), ("none", float | None, None),
     ("4,2,1", tuple[int, ...], (4, 2, 1)), ("wbp", str, "wbp")],
)
def test_command_line_values_take_the_field_type(text, kind, value):
    assert parse_param("p", text, kind) == value


def test_residual_report_summarises_kept_points():
    r = np.zeros((3, 2, 2))
    r[0, 0] = (3.0, 4.0)  # length 5
    r[1, 1] = (0.0, 1.0)  # length 1
    r[2, 0] = (100.0, 0.0)  # rejected
    kept = np.array([[True, True], [True, True], [False, True]])
    rejected = ~kept
    rep = ResidualReport.from_residuals(r, kept, rejected)
    np.testing.assert_allclose(rep.per_view_rms_px, [np.sqrt(25 / 2), np.sqrt(1 / 2), 0.0])
    np.testing.assert_allclose(rep.per_view_mean_px, [2.5, 0.5, 0.0])
    np.testing.assert_allclose(rep.per_track_rms_px, [np.sqrt(25 / 2), np.sqrt(1 / 3)])
    assert rep.rms_px == pytest.approx(np.sqrt(26 / 5)) and rep.mean_px == pytest.approx(6 / 5)
    assert rep.n_points == 5 and rep.rejected.tolist() == [[2, 0]]


def test_alignment_file_round_trip(tmp_path):
    g = Geometry.nominal(np.linspace(-60, 60, 5), (64, 48), 8.0, rot_deg=85.0).replace(shift_px=np.arange(10.0).reshape(5, 2))
    rep = ResidualReport.from_residuals(np.full((5, 3, 2), 0.1), np.ones((5, 3), bool))
    result = AlignmentResult(g, rep, markers_px=np.ones((3, 3)), info={"aligner": "x", "iterations": 4})
    path = tmp_path / "a.geometry.json"
    write_alignment(path, result, aligner="x", params={"n": 3})
    back = read_alignment(path)
    assert back.geometry.equals(g)
    np.testing.assert_allclose(back.residuals.per_view_rms_px, rep.per_view_rms_px)
    np.testing.assert_allclose(back.markers_px, np.ones((3, 3)))
    assert back.info["aligner"] == "x" and back.info["iterations"] == 4
    write_residual_table(tmp_path / "r.csv", result)
    lines = (tmp_path / "r.csv").read_text().splitlines()
    assert len(lines) == 6 and lines[0].startswith("view,tilt_deg") and lines[1].endswith("0.141421,0.141421")
    # a plain geometry file is an alignment without a report
    write_geometry(tmp_path / "g.geometry.json", g)
    assert read_alignment(tmp_path / "g.geometry.json").residuals is None


def test_alignment_file_with_a_bad_report_is_named(tmp_path):
    g = Geometry.nominal(np.zeros(3), (8, 8), 8.0)
    path = tmp_path / "bad.geometry.json"
    write_geometry(path, g, residuals={"rms_px": 1.0})
    with pytest.raises(FileFormatError, match="bad.geometry.json: key 'residuals'"):
        read_alignment(path)

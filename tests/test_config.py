from dataclasses import fields

import pytest

import simtomo
from simtomo.config import (
    PRESETS,
    SECTIONS,
    SimulationConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    config_to_toml,
    describe_parameters,
    load_config,
    parse_assignments,
)
from simtomo.errors import ConfigError


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips_through_toml_and_dict(tmp_path, name):
    config = simtomo.preset(name)
    path = tmp_path / "c.toml"
    path.write_text(config_to_toml(config))
    assert load_config(config_file=path) == config
    assert config_from_dict(config_to_dict(config)) == config


def test_standard_preset_matches_design_section_6():
    c = simtomo.preset("standard")
    assert (c.tilt.min_deg, c.tilt.max_deg, c.tilt.step_deg, c.tilt.scheme) == (-60.0, 60.0, 2.0, "dose-symmetric")
    assert c.detector.image_shape == (1024, 1024) and c.detector.pixel_size_A == 8.0
    assert c.specimen.thickness_nm == 200.0 and c.beads.count == 25 and c.beads.diameter_nm == 10.0
    assert c.tilt.total_dose_e_per_A2 == 120.0 and c.detector.poisson_noise
    m = c.misalignment
    assert abs(m.tilt_axis_deg - 85.0) < 1 and m.rot_drift_deg == 0.2 and m.mag_drift == 0.003
    assert m.tilt_offset_deg == 1.5 and m.tilt_jitter_deg == 0.2


def test_precedence_preset_then_file_then_set(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('preset = "tiny"\n[beads]\ncount = 4\ndiameter_nm = 5.0\n')
    c = load_config(config_file=path, assignments=["beads.count=6"])
    assert c.name == "tiny" and c.detector.image_shape == (128, 128)
    assert (c.beads.count, c.beads.diameter_nm) == (6, 5.0)
    assert load_config("standard", path).detector.image_shape == (1024, 1024)


def test_parse_assignments_types():
    parsed = parse_assignments(["a.b=3", "a.c=2.5", "a.d=true", "a.e=[1, 2]", "a.f=surfaces", "a.g='x y'"])
    assert parsed == {"a": {"b": 3, "c": 2.5, "d": True, "e": [1, 2], "f": "surfaces", "g": "x y"}}
    with pytest.raises(ConfigError, match="expected section.field=value"):
        parse_assignments(["count=3"])


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"tilts": {"step_deg": 1}}, r"unknown section 'tilts' \(did you mean 'tilt'\?\)"),
        ({"beads": {"count": 2.5}}, "beads.count: expected an integer, got 2.5"),
        ({"beads": {"count": "many"}}, "beads.count: expected an integer"),
        ({"detector": {"image_shape": [128]}}, r"detector.image_shape: expected a list of 2 values"),
        ({"detector": {"poisson_noise": 1}}, "expected true or false"),
        ({"tilt": {"scheme": "random"}}, "tilt.scheme: expected one of 'unidirectional'"),
        ({"tilt": {"min_deg": 10.0, "max_deg": 0.0}}, r"tilt.min_deg: expected <= tilt.max_deg"),
        ({"optics": {"defocus_um": float("nan")}}, "expected a finite number"),
        ({"beads": 3}, r"\[beads\] must be a table"),
    ],
)
def test_bad_overrides_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(SimulationConfig(), overrides, source="test.toml")


def test_bad_toml_file_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[beads\ncount = 3\n")
    with pytest.raises(ConfigError, match="broken.toml: not valid TOML"):
        load_config(config_file=path)
    with pytest.raises(ConfigError, match="nothere.toml: cannot read config file"):
        load_config(config_file=tmp_path / "nothere.toml")
    path.write_text("[beads]\ncuont = 3\n")
    with pytest.raises(ConfigError, match=r"broken.toml: unknown key beads.cuont \(did you mean 'count'\?\)"):
        load_config(config_file=path)


def test_help_lists_every_parameter_with_its_unit():
    text = describe_parameters()
    for section in SECTIONS:
        for f in fields(getattr(SimulationConfig(), section)):
            line = next(line for line in text.splitlines() if line.strip().startswith(f"{section}.{f.name} ="))
            if f.metadata["unit"]:
                assert f"[{f.metadata['unit']}]" in line
            assert f.metadata["help"] in line


@pytest.mark.parametrize(
    "assignments, match",
    [
        (["tilt.min_deg=10", "tilt.max_deg=10"], r"tilt.step_deg: expected a step giving at least 2 views"),
        (["tilt.step_deg=200"], r"tilt.step_deg: expected a step giving at least 2 views"),
        (["tilt.total_dose_e_per_A2=0"], r"tilt.total_dose_e_per_A2: expected a dose > 0"),
        (["tilt.total_dose_e_per_A2=1e30"], r"tilt.total_dose_e_per_A2: expected a dose > 0 and <= 1e6"),
        (["specimen.thickness_nm=5"], r"beads.diameter_nm: expected beads no larger than the ice \(specimen.thickness_nm = 5.0\)"),
        (["specimen.thickness_nm=8", "beads.count=0"], r"content.protein_radius_nm: expected proteins no larger than the ice"),
    ],
)
def test_degenerate_configurations_are_rejected(assignments, match):
    with pytest.raises(ConfigError, match=match):
        load_config("tiny", assignments=assignments)


def test_configs_built_in_python_are_checked_too():
    from simtomo.config import BeadConfig, DetectorConfig, MisalignmentConfig

    with pytest.raises(ConfigError, match=r"detector.image_shape\[0\]: expected an integer, got 100.5"):
        DetectorConfig(image_shape=(100.5, 100))
    with pytest.raises(ConfigError, match="beads.count: expected an integer, got 2.5"):
        BeadConfig(count=2.5)
    with pytest.raises(ConfigError, match="misalignment.tilt_axis_deg: expected a finite number"):
        MisalignmentConfig(tilt_axis_deg=float("nan"))
    with pytest.raises(ConfigError, match="beads: expected a BeadConfig"):
        SimulationConfig(beads={"count": 3})
    # integral floats are accepted for integer fields, lists for tuples
    assert BeadConfig(count=3.0).count == 3 and DetectorConfig(image_shape=[64, 64]).image_shape == (64, 64)

"""Experiment files: validation before anything runs, grid expansion, cell keys."""

from pathlib import Path

import pytest

from simtomo import registry
from simtomo.config import config_to_dict
from simtomo.errors import ConfigError
from simtomo.experiment import cell_key, code_version, load_experiment, parse_experiment

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"

BASE = """
name = "t"
seeds = [0, 1, 2]
[workload]
preset = "tiny"
[workload.overrides]
"beads.count" = 6
[sweep.axes]
"tilt.total_dose_e_per_A2" = [30, 60, 120, 240]
specimen.thickness_nm = {start = 60, stop = 100, step = 20}
[[aligners]]
name = "nominal"
[[aligners]]
name = "perturbed-truth"
sweep = {sigma_px = [0.5, 1, 2]}
[score]
with_images = false
"""


def write(tmp_path, text, name="exp.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_product_grid_counts_and_canonical_values(tmp_path):
    exp = load_experiment(write(tmp_path, BASE))
    assert len(exp.settings) == 4 * 3
    assert [a.label for a in exp.aligners] == [
        "nominal",
        "perturbed-truth sigma_px=0.5",
        "perturbed-truth sigma_px=1",
        "perturbed-truth sigma_px=2",
    ]
    assert exp.n_cells == 12 * 3 * 4
    cells = exp.cells("v")
    assert len(cells) == exp.n_cells
    assert len({c.key for c in cells}) == exp.n_cells
    # values take the field's type; the range runs to its stop inclusive
    assert exp.axes[0].values == (30.0, 60.0, 120.0, 240.0)
    assert exp.axes[1].values == (60.0, 80.0, 100.0)
    assert exp.settings[5].config.tilt.total_dose_e_per_A2 == 60.0
    assert exp.settings[5].config.specimen.thickness_nm == 100.0
    assert all(s.config.beads.count == 6 for s in exp.settings)
    # seed-major units: the first seed covers every setting first
    units = exp.units("v")
    assert [u.seed for u in units[:12]] == [0] * 12 and units[12].seed == 1


def test_zip_mode_pairs_axes_and_requires_equal_lengths(tmp_path):
    text = BASE.replace("[sweep.axes]", '[sweep]\nmode = "zip"\n[sweep.axes]').replace(
        "{start = 60, stop = 100, step = 20}", "{start = 60, stop = 120, num = 4}"
    )
    exp = load_experiment(write(tmp_path, text))
    assert [dict(s.values) for s in exp.settings] == [
        {"tilt.total_dose_e_per_A2": d, "specimen.thickness_nm": t}
        for d, t in zip((30.0, 60.0, 120.0, 240.0), (60.0, 80.0, 100.0, 120.0))
    ]
    bad = text.replace("num = 4", "num = 3")
    with pytest.raises(ConfigError, match=r"exp\.toml: sweep\.axes: zip mode needs axes of equal length"):
        load_experiment(write(tmp_path, bad))


def test_log_range_and_all_aligners(tmp_path):
    text = """
seeds = [4]
aligners = "all"
[workload]
preset = "tiny"
[sweep.axes]
"tilt.total_dose_e_per_A2" = {start = 10, stop = 1000, num = 3, log = true}
"""
    exp = load_experiment(write(tmp_path, text))
    assert exp.name == "exp"  # from the file name
    assert exp.axes[0].values == (10.0, 100.0, 1000.0)
    assert [a.name for a in exp.aligners] == registry.available()


def test_cell_keys_are_stable_and_change_with_every_input(tmp_path):
    a = load_experiment(write(tmp_path, BASE)).cells("v1")
    b = load_experiment(write(tmp_path, BASE, "copy.toml")).cells("v1")
    assert [c.key for c in a] == [c.key for c in b]  # same content, other file: same keys

    cell = a[0]
    config = config_to_dict(cell.setting.config)
    score = load_experiment(write(tmp_path, BASE)).score
    key = cell_key(config, cell.seed, cell.aligner, score, "v1")
    assert key == cell.key
    changed_config = {**config, "beads": {**config["beads"], "diameter_nm": 9.0}}
    variants = [
        cell_key(changed_config, cell.seed, cell.aligner, score, "v1"),
        cell_key(config, cell.seed + 1, cell.aligner, score, "v1"),
        cell_key(config, cell.seed, a[1].aligner, score, "v1"),
        cell_key(config, cell.seed, cell.aligner, type(score)(with_images=True), "v1"),
        cell_key(config, cell.seed, cell.aligner, score, "v2"),
    ]
    assert len({key, *variants}) == 6
    # a default-valued parameter spelled out is the same aligner: same key
    spelled = BASE.replace('name = "nominal"', 'name = "nominal"\nparams = {tilt_axis_deg = 85.0}')
    explicit = load_experiment(write(tmp_path, spelled)).cells("v1")
    assert explicit[0].key != a[0].key  # 85.0 is not the default (None): a different aligner
    assert explicit[1].key == a[1].key


def test_code_version_is_the_package_version_plus_a_source_digest(monkeypatch):
    import simtomo

    monkeypatch.delenv("SIMTOMO_CODE_VERSION", raising=False)
    v = code_version()
    assert v.startswith(simtomo.__version__ + "+src.") and len(v.split(".")[-1]) == 12
    monkeypatch.setenv("SIMTOMO_CODE_VERSION", "pinned")
    assert code_version() == "pinned"


@pytest.mark.parametrize(
    "edit, message",
    [
        (("seeds = [0, 1, 2]", "seed = [0, 1, 2]"), r"unknown key 'seed' \(did you mean 'seeds'\?\)"),
        (("seeds = [0, 1, 2]", "seeds = []"), r"seeds: empty list"),
        (("seeds = [0, 1, 2]", "seeds = [0, -1]"), r"seeds\[1\]: expected a non-negative integer, got -1"),
        (("seeds = [0, 1, 2]", "seeds = [1, 1]"), r"seeds: seed 1 appears twice"),
        (("seeds = [0, 1, 2]", 'seeds = "0"'), r"seeds: expected a list"),
        (('"tilt.total_dose_e_per_A2"', '"tilt.total_dose"'), r"sweep\.axes: unknown parameter 'tilt\.total_dose' \(did you mean 'tilt\.total_dose_e_per_A2'\?\)"),
        (("[30, 60, 120, 240]", "[]"), r"sweep\.axes\.tilt\.total_dose_e_per_A2: empty list"),
        (("[30, 60, 120, 240]", "[30, -5]"), r"sweep point 4 \(tilt\.total_dose_e_per_A2=-5, specimen\.thickness_nm=60\): tilt\.total_dose_e_per_A2: expected a dose > 0"),
        (("step = 20", "step = -20"), r"sweep\.axes\.specimen\.thickness_nm: empty range"),
        (("step = 20", "step = 20, num = 3"), r"sweep\.axes\.specimen\.thickness_nm: a range needs exactly one of 'num' or 'step'"),
        (("stop = 100", "stpo = 100"), r"unknown key 'sweep\.axes\.specimen\.thickness_nm\.stpo' \(did you mean 'stop'\?\)"),
        (('"beads.count" = 6', '"beads.cont" = 6'), r"workload\.overrides: unknown parameter 'beads\.cont' \(did you mean 'beads\.count'\?\)"),
        (('preset = "tiny"', 'preset = "tinny"'), r"workload\.preset: unknown preset 'tinny' \(did you mean 'tiny'\?\)"),
        (('name = "nominal"', 'name = "nominl"'), r"aligners\[0\]: unknown aligner 'nominl' \(did you mean 'nominal'\?\); registered: .*nominal"),
        (('name = "nominal"', 'name = "nominal"\nparams = {tilt_axis = 3}'), r"aligners\[0\]: aligner 'nominal': unknown parameter 'tilt_axis' \(did you mean 'tilt_axis_deg'\?\)"),
        (("sigma_px = [0.5, 1, 2]", "sigma = [0.5]"), r"aligners\[1\]\.params: unknown parameter 'sigma' of the perturbed-truth yardstick"),
        (("sigma_px = [0.5, 1, 2]", "sigma_px = [-1]"), r"aligners\[1\]\.params\.sigma_px: expected a value >= 0"),
        (("with_images = false", "with_image = false"), r"unknown key 'score\.with_image' \(did you mean 'with_images'\?\)"),
        (("with_images = false", "binning = 0"), r"score\.binning: expected an integer >= 1, got 0"),
    ],
)
def test_validation_errors_name_the_file_and_the_key(tmp_path, edit, message):
    old, new = edit
    assert old in BASE
    path = write(tmp_path, BASE.replace(old, new, 1))
    with pytest.raises(ConfigError, match=message) as exc:
        load_experiment(path)
    assert str(exc.value).startswith(str(path) + ":")


def test_duplicate_labels_are_rejected(tmp_path):
    text = BASE + '[[aligners]]\nname = "nominal"\n'
    with pytest.raises(ConfigError, match=r"exp\.toml: aligners: label 'nominal' is used twice"):
        load_experiment(write(tmp_path, text))


def test_unreadable_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match=r"missing\.toml: cannot read experiment file"):
        load_experiment(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        load_experiment(write(tmp_path, "seeds = [0,", "bad.toml"))
    with pytest.raises(ConfigError, match=r"x\.toml: missing key 'aligners'"):
        parse_experiment({"seeds": [0]}, "x.toml")
    with pytest.raises(ConfigError, match=r"x\.toml: missing key 'seeds'"):
        parse_experiment({"aligners": "all"}, "x.toml")


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_experiments_are_valid(path):
    exp = load_experiment(path, check_registry=False)
    assert exp.name == path.stem
    assert exp.description and len(exp.seeds) == 3 and exp.aligners
    named = {a.name for a in exp.aligners}
    missing = named - set(registry.available()) - {"perturbed-truth"}
    if not missing:  # every aligner installed: the full check, parameters included
        assert load_experiment(path).n_cells == exp.n_cells
    else:
        with pytest.raises(ConfigError, match="unknown aligner"):
            load_experiment(path)


def test_shipped_grids():
    dose = load_experiment(EXPERIMENTS / "dose.toml", check_registry=False)
    assert dose.axes[0].path == "tilt.total_dose_e_per_A2" and dose.axes[0].values == (30.0, 60.0, 120.0, 240.0)
    fid = load_experiment(EXPERIMENTS / "fiducials.toml", check_registry=False)
    assert fid.axes[0].values == (0, 5, 10, 25, 50) and [a.name for a in fid.aligners] == ["fiducial"]
    yard = load_experiment(EXPERIMENTS / "misalignment-vs-resolution.toml")
    assert [a.resolved_params["sigma_px"] for a in yard.aligners] == [0.25, 0.5, 1.0, 2.0, 4.0]
    assert yard.settings[0].config.name == "standard" and yard.score.with_images
    quick = load_experiment(EXPERIMENTS / "quickstart.toml")
    assert [a.name for a in quick.aligners] == registry.available()


def test_cli_run_dry_run_bad_file_and_report(tmp_path, capsys, monkeypatch):
    from simtomo.cli import main

    monkeypatch.setenv("SIMTOMO_CODE_VERSION", "cli-test")
    path = write(tmp_path, BASE)
    assert main(["run", str(path), "--out", str(tmp_path / "x"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "12 settings x 3 seeds x 4 aligners = 144 cells in 36 simulations" in out
    assert "yardstick perturbed-truth sigma_px=0.5: perturbed-truth (sigma_px=0.5)" in out
    assert not (tmp_path / "x").exists()  # a dry run writes nothing

    bad = write(tmp_path, BASE.replace('"tilt.total_dose_e_per_A2"', '"tilt.dose"'), "bad.toml")
    assert main(["run", str(bad), "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.toml: sweep.axes: unknown parameter 'tilt.dose'" in err
    assert not (tmp_path / "y").exists()  # validated before anything runs

    small = write(tmp_path, 'seeds = [0]\naligners = ["nominal"]\n[workload]\npreset = "tiny"\n[score]\nwith_images = false\n', "small.toml")
    assert main(["-q", "run", str(small), "--out", str(tmp_path / "z"), "--workers", "0"]) == 0
    report = (tmp_path / "z" / "report.md").read_text()
    assert "# Experiment `small`" in report and "| nominal | base | 1/1 |" in report
    assert main(["report", str(tmp_path / "z")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "z" / "report.md")

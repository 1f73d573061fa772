"""Regression checks: a worse table fails and lists each regression, an equal one passes."""

import json

import pandas as pd
import pytest

from simtomo.cli import main
from simtomo.experiment import load_experiment
from simtomo.regress import compare, make_baseline, read_baseline
from simtomo.runner import load_results, run_experiment

EXPERIMENT = """
seeds = [0, 1, 2]
[workload]
preset = "tiny"
[sweep.axes]
"beads.count" = [4, 8]
[[aligners]]
name = "nominal"
[[aligners]]
name = "perturbed-truth"
sweep = {sigma_px = [1.0]}
[score]
with_images = false
"""


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("regress")
    path = tmp / "regress-test.toml"
    path.write_text(EXPERIMENT)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SIMTOMO_CODE_VERSION", "regress-test")
        run_experiment(load_experiment(path), tmp / "out", workers=0)
    assert main(["-q", "regress", str(tmp / "out"), "--write-baseline", str(tmp / "baseline.json")]) == 0
    return tmp / "out", tmp / "baseline.json"


def replace_table(out, df):
    df.to_parquet(out / "results.parquet", index=False)


def test_baseline_holds_the_medians_over_seeds(results):
    out, baseline_path = results
    df = load_results(out)
    doc = json.loads(baseline_path.read_text())
    assert doc["format"] == "simtomo.baseline/1" and doc["experiment"] == "regress-test" and doc["seeds"] == [0, 1, 2]
    assert set(doc["metrics"]) == {"alignment_error_rms_px", "ok_fraction"}  # no images: no resolution
    assert len(doc["entries"]) == 2 * 2
    entry = next(e for e in doc["entries"] if e["aligner"] == "nominal" and e["setting"] == "beads.count=8")
    rows = df[(df["aligner"] == "nominal") & (df["setting"] == "beads.count=8")]
    assert entry["values"]["alignment_error_rms_px"] == rows["alignment_error_rms_px"].median()
    assert entry["values"]["ok_fraction"] == 1.0 and entry["n"] == 3


def test_the_same_results_pass(results, capsys):
    out, baseline_path = results
    assert main(["regress", str(out), "--baseline", str(baseline_path)]) == 0
    assert capsys.readouterr().out.strip().endswith("PASS: 0 regressed, 0 missing, 0 improved, 8 within tolerance, 0 new, 0 not comparable")


def test_worse_accuracy_fails_and_lists_each_regression(results, tmp_path, capsys):
    out, baseline_path = results
    df = load_results(out)
    work = tmp_path / "worse"
    work.mkdir()
    (work / "run.json").write_text((out / "run.json").read_text())
    base = df[(df["aligner"] == "perturbed-truth sigma_px=1") & (df["setting"] == "beads.count=4")]["alignment_error_rms_px"].median()
    tolerance = max(0.02, 0.25 * base)
    worse = df.copy()
    sel = (worse["aligner"] == "perturbed-truth sigma_px=1") & (worse["setting"] == "beads.count=4")
    worse.loc[sel, "alignment_error_rms_px"] += 1.01 * tolerance  # just beyond the tolerance
    within = (worse["aligner"] == "nominal") & (worse["setting"] == "beads.count=4")
    worse.loc[within, "alignment_error_rms_px"] *= 1.2  # 20 % worse: within the 25 % tolerance
    better = (worse["aligner"] == "nominal") & (worse["setting"] == "beads.count=8")
    worse.loc[better, "alignment_error_rms_px"] *= 0.5  # improvements pass
    replace_table(work, worse)
    assert main(["regress", str(work), "--baseline", str(baseline_path)]) == 1
    text = capsys.readouterr().out
    regressed = [line for line in text.splitlines() if line.startswith("REGRESSED")]
    assert len(regressed) == 1
    line = regressed[0]
    for part in ("alignment_error_rms_px", "aligner=perturbed-truth sigma_px=1", "setting=beads.count=4",
                 f"baseline={base:.4g}", f"now={base + 1.01 * tolerance:.4g}", f"tolerance={tolerance:.4g}"):
        assert part in line
    assert sum(line.startswith("IMPROVED") for line in text.splitlines()) == 1
    assert "FAIL: 1 regressed, 0 missing, 1 improved, 6 within tolerance" in text


def test_failed_cells_and_missing_entries_are_regressions(results, tmp_path):
    out, baseline_path = results
    df = load_results(out)
    failed = df.copy()
    sel = (failed["aligner"] == "nominal") & (failed["setting"] == "beads.count=4") & (failed["seed"] == 1)
    failed.loc[sel, "status"] = "failed"
    failed.loc[sel, "alignment_error_rms_px"] = float("nan")
    failed = failed[~((failed["aligner"] == "nominal") & (failed["setting"] == "beads.count=8"))]
    report = compare(failed, read_baseline(baseline_path))
    found = {(c.metric, c.aligner, c.setting, c.status) for c in report.regressions}
    assert ("ok_fraction", "nominal", "beads.count=4", "regressed") in found
    assert ("alignment_error_rms_px", "nominal", "beads.count=8", "missing") in found
    assert ("ok_fraction", "nominal", "beads.count=8", "missing") in found
    assert len(found) == 3
    ok_fraction = next(c for c in report.comparisons if c.metric == "ok_fraction" and c.setting == "beads.count=4" and c.aligner == "nominal")
    assert ok_fraction.now == pytest.approx(2 / 3) and ok_fraction.baseline == 1.0


def test_infinite_resolution_round_trips(tmp_path):
    df = pd.DataFrame(
        {
            "aligner": ["a", "a"],
            "aligner_order": [0, 0],
            "setting": ["base", "base"],
            "setting_index": [0, 0],
            "seed": [0, 1],
            "status": ["ok", "ok"],
            "resolution_A": [float("inf"), float("inf")],
        }
    )
    doc = make_baseline(df)
    assert doc["entries"][0]["values"]["resolution_A"] == "inf"
    path = tmp_path / "b.json"
    path.write_text(json.dumps(doc))
    report = compare(df, read_baseline(path))
    assert not report.regressions
    df.loc[0:1, "resolution_A"] = 40.0
    improved = compare(df, read_baseline(path))
    assert [c.status for c in improved.comparisons if c.metric == "resolution_A"] == ["improved"]


@pytest.mark.parametrize(
    "document, message",
    [
        ({"format": "other"}, r"b\.json: key 'format': found 'other', expected 'simtomo\.baseline/1'"),
        ({"format": "simtomo.baseline/1", "entries": []}, r"b\.json: missing key 'metrics'"),
        ({"format": "simtomo.baseline/1", "entries": [], "metrics": {"x": {"better": "up"}}}, r"b\.json: metrics\.x\.better: expected \"lower\" or \"higher\""),
        ({"format": "simtomo.baseline/1", "entries": [], "metrics": {"x": {"better": "lower", "rel_tol": -1}}}, r"metrics\.x\.rel_tol: expected a number >= 0"),
        ({"format": "simtomo.baseline/1", "metrics": {}, "entries": [{"aligner": "a", "setting": "s", "values": {"x": "big"}}]}, r"entries\[0\]\.values\.x: expected a number"),
    ],
)
def test_bad_baselines_exit_2_naming_file_and_key(results, tmp_path, capsys, document, message):
    out, _ = results
    path = tmp_path / "b.json"
    path.write_text(json.dumps(document))
    assert main(["regress", str(out), "--baseline", str(path)]) == 2
    err = capsys.readouterr().err
    assert pytest.importorskip("re").search(message, err) and "Traceback" not in err

"""The runner: rows per cell, failures as rows, kill and resume, local pool against dask."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

import simtomo
from simtomo import registry
from simtomo.alignment_error import alignment_error
from simtomo.errors import AlignmentError, ConfigError
from simtomo.experiment import load_experiment
from simtomo.runner import TIMING_COLUMNS, Progress, load_results, perturbed_truth, run_experiment
from simtomo.score import score, thickness_px

TINY = """
name = "{name}"
description = "test"
seeds = {seeds}
[workload]
preset = "tiny"
{sweep}
[[aligners]]
name = "nominal"
[[aligners]]
name = "perturbed-truth"
sweep = {{sigma_px = [1.0]}}
[score]
{score}
"""


def experiment_file(tmp_path, *, name="t", seeds=(0, 1), sweep="", score="with_images = false", extra=""):
    path = tmp_path / f"{name}.toml"
    path.write_text(TINY.format(name=name, seeds=list(seeds), sweep=sweep, score=score) + extra)
    return path


def test_perturbed_truth_error_is_sqrt2_sigma(tiny_series):
    """E[e^2] = 2 sigma^2 (1 - 1/n): the gauge absorbs the mean shift (2 of 2n degrees of freedom)."""
    truth = tiny_series.truth()
    geometry = tiny_series.geometry
    n = geometry.n_views
    t = thickness_px(truth)
    ratios = [alignment_error(perturbed_truth(geometry, 1.0, seed).geometry, geometry, thickness_px=t).rms_px ** 2 / 2 for seed in range(100)]
    # per seed the ratio has sd ~0.15, so the mean of 100 is within 0.045 (3 standard errors)
    assert abs(np.mean(ratios) - (1 - 1 / n)) < 0.045
    # one seed, one pattern: the error scales exactly with sigma
    e1 = alignment_error(perturbed_truth(geometry, 1.0, 7).geometry, geometry, thickness_px=t).rms_px
    e3 = alignment_error(perturbed_truth(geometry, 3.0, 7).geometry, geometry, thickness_px=t).rms_px
    assert e3 / e1 == pytest.approx(3.0, rel=1e-9)
    # the yardstick reads the truth but leaves it alone
    assert np.array_equal(perturbed_truth(geometry, 0.0, 7).geometry.shift_px, geometry.shift_px)


def test_inline_run_rows_match_direct_scoring(tmp_path, tiny_series, monkeypatch):
    monkeypatch.setenv("SIMTOMO_CODE_VERSION", "inline-test")
    exp = load_experiment(experiment_file(tmp_path, seeds=(0,)))
    summary = run_experiment(exp, tmp_path / "out", workers=0)
    assert (summary.total, summary.computed, summary.failed, summary.remaining) == (2, 2, 0, 0)
    df = load_results(tmp_path / "out")
    assert list(df["aligner"]) == ["nominal", "perturbed-truth sigma_px=1"]
    assert list(df["status"]) == ["ok", "ok"]
    direct = score(tiny_series.truth(), registry.get("nominal").align(tiny_series.observation()))
    assert df["alignment_error_rms_px"][0] == direct.alignment_error_rms_px
    assert list(df["alignment_error_per_view_px"][0]) == list(direct.alignment_error_per_view_px)
    yard = score(tiny_series.truth(), perturbed_truth(tiny_series.geometry, 1.0, 0))
    assert df["alignment_error_rms_px"][1] == yard.alignment_error_rms_px
    assert df["aligner.sigma_px"][1] == 1.0 and np.isnan(df["aligner.sigma_px"][0])
    # every simulation parameter is a column; timing and memory are measured
    assert df["tilt.step_deg"][0] == 3.0 and df["detector.image_shape"][0].tolist() == [128, 128]
    assert np.all(df["seconds_align"] >= 0) and np.all(df["peak_rss_mb"] > 10)
    csv = pd.read_csv(tmp_path / "out" / "results.csv")
    assert list(csv["key"]) == list(df["key"])
    assert json.loads(csv["alignment_error_per_view_px"][0]) == pytest.approx(list(direct.alignment_error_per_view_px), rel=1e-15)
    info = json.loads((tmp_path / "out" / "run.json").read_text())
    assert info["code_version"] == "inline-test" and info["status"] == "complete"
    assert (tmp_path / "out" / "experiment.toml").read_text() == exp.text


def test_failing_aligner_is_a_failed_row_and_the_sweep_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("SIMTOMO_CODE_VERSION", "fail-test")
    extra = '[[aligners]]\nname = "nominal"\nlabel = "explodes"\nparams = {tilt_axis_deg = 13.0}\n'
    exp = load_experiment(experiment_file(tmp_path, seeds=(0, 1), extra=extra))
    real_get = registry.get

    class Exploding:
        name = "exploding"

        def align(self, observation):
            raise AlignmentError("no beads to track")

    def get(name, **params):
        return Exploding() if params.get("tilt_axis_deg") == 13.0 else real_get(name, **params)

    monkeypatch.setattr(registry, "get", get)
    summary = run_experiment(exp, tmp_path / "out", workers=0)
    assert (summary.computed, summary.failed) == (6, 2)
    df = load_results(tmp_path / "out")
    failed = df[df["status"] == "failed"]
    assert list(failed["aligner"]) == ["explodes", "explodes"] and list(failed["seed"]) == [0, 1]
    assert set(failed["error"]) == {"AlignmentError: no beads to track"}
    assert set(failed["error_stage"]) == {"align"}
    assert failed["alignment_error_rms_px"].isna().all()
    assert (df[df["aligner"] != "explodes"]["status"] == "ok").all()
    cell = json.loads((tmp_path / "out" / "cells" / f"{failed['key'].iloc[0]}.json").read_text())
    assert "raise AlignmentError" in cell["row"]["traceback"]

    # failed cells are results: the same command skips them ...
    again = run_experiment(exp, tmp_path / "out", workers=0)
    assert (again.skipped, again.computed) == (6, 0)
    # ... unless asked to retry; with the aligner fixed they now succeed
    monkeypatch.setattr(registry, "get", real_get)
    retry = run_experiment(exp, tmp_path / "out", workers=0, retry_failed=True)
    assert (retry.skipped, retry.computed, retry.failed) == (4, 2, 0)
    assert (load_results(tmp_path / "out")["status"] == "ok").all()


@pytest.mark.skipif("fiducial" not in registry.available(), reason="the fiducial aligner is not registered")
def test_fiducial_aligner_without_beads_fails_cleanly(tmp_path, monkeypatch):
    monkeypatch.setenv("SIMTOMO_CODE_VERSION", "fid-test")
    path = tmp_path / "fid.toml"
    path.write_text(
        'seeds = [0]\naligners = ["fiducial"]\n[workload]\npreset = "tiny"\n'
        '[sweep.axes]\n"beads.count" = [0]\n[score]\nwith_images = false\n'
    )
    run_experiment(load_experiment(path), tmp_path / "out", workers=0)
    row = load_results(tmp_path / "out").iloc[0]
    assert row["status"] == "failed" and row["error"].startswith("AlignmentError")


def test_limit_resume_and_foreign_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("SIMTOMO_CODE_VERSION", "limit-test")
    exp = load_experiment(experiment_file(tmp_path, seeds=(0, 1, 2)))
    first = run_experiment(exp, tmp_path / "out", workers=0, limit=1)
    assert (first.computed, first.remaining) == (2, 4) and not first.complete
    assert len(load_results(tmp_path / "out")) == 2
    info = json.loads((tmp_path / "out" / "run.json").read_text())
    assert info["status"] == "partial"
    second = run_experiment(exp, tmp_path / "out", workers=0)
    assert (second.skipped, second.computed, second.remaining) == (2, 4, 0)
    df = load_results(tmp_path / "out")
    assert sorted(df["key"]) == sorted(c.key for c in exp.cells("limit-test"))
    assert [r["status"] for r in json.loads((tmp_path / "out" / "run.json").read_text())["runs"]] == ["partial", "complete"]

    other = load_experiment(experiment_file(tmp_path, name="other"))
    with pytest.raises(ConfigError, match=r"out: holds results of experiment 't', not 'other'"):
        run_experiment(other, tmp_path / "out", workers=0)


def test_progress_line_counts_and_eta():
    p = Progress(total=12, done=2, failed=1, planned=10)
    p.start -= 30.0  # 30 s ago
    line = p.advance([{"status": "ok"}, {"status": "failed"}])
    assert "4/12 cells, 2 failed, 8 remaining" in line
    assert "this run 2/10 in 30s, ETA 2m00s" in line  # 15 s per cell, 8 to go
    assert line.startswith("[########----------------]")


def test_killed_run_resumes_without_loss_or_duplicates(tmp_path):
    """SIGKILL the runner mid-sweep, run it again: complete table, no duplicate, finished cells kept."""
    path = experiment_file(
        tmp_path, name="kill", seeds=tuple(range(6)), sweep='[sweep.axes]\n"tilt.total_dose_e_per_A2" = [60, 120]'
    )
    out = tmp_path / "out"
    env = {**os.environ, "SIMTOMO_CODE_VERSION": "kill-test"}
    cmd = [sys.executable, "-m", "simtomo.cli", "-q", "run", str(path), "--out", str(out), "--no-report"]
    proc = subprocess.Popen([*cmd, "--workers", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    cells = out / "cells"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        if cells.is_dir() and len(list(cells.glob("*.json"))) >= 2:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"the runner ended before it was killed: {err.decode()}"
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in cells.glob("*.json")}
    total = 12 * 2
    assert 2 <= len(before) < total

    done = subprocess.run([*cmd, "--workers", "2"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    expected = [c.key for c in load_experiment(path).cells("kill-test")]
    df = pd.read_parquet(out / "results.parquet")
    assert len(df) == total and df["key"].is_unique and sorted(df["key"]) == sorted(expected)
    assert (df["status"] == "ok").all()
    assert len(pd.read_csv(out / "results.csv")) == total
    # the cells finished before the kill were not recomputed
    for name, (mtime, content) in before.items():
        assert (cells / name).stat().st_mtime_ns == mtime and (cells / name).read_bytes() == content
    counts = json.loads((out / "run.json").read_text())["counts"]
    assert counts == {"cells": total, "skipped": len(before), "computed": total - len(before), "failed": 0, "remaining": 0}


def test_local_pool_and_dask_give_identical_tables(tmp_path, monkeypatch):
    distributed = pytest.importorskip("distributed")
    monkeypatch.setenv("SIMTOMO_CODE_VERSION", "dask-test")
    exp = load_experiment(experiment_file(tmp_path, seeds=(0, 1), score="with_images = true\nbinning = 4"))
    run_experiment(exp, tmp_path / "pool", workers=2)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        run_experiment(exp, tmp_path / "dask", scheduler=cluster.scheduler_address)
    pool = load_results(tmp_path / "pool")
    dask = load_results(tmp_path / "dask")
    assert len(pool) == 4 and (pool["status"] == "ok").all()
    assert np.isfinite(pool[pool["aligner_name"] == "perturbed-truth"]["resolution_A"]).all()  # the images were scored
    pd.testing.assert_frame_equal(pool.drop(columns=list(TIMING_COLUMNS)), dask.drop(columns=list(TIMING_COLUMNS)))


def test_unreachable_scheduler_is_a_clear_error(tmp_path, monkeypatch):
    pytest.importorskip("distributed")
    monkeypatch.setenv("SIMTOMO_CODE_VERSION", "dask-test")
    exp = load_experiment(experiment_file(tmp_path, seeds=(0,)))
    with pytest.raises(simtomo.SimtomoError, match=r"cannot connect to the dask scheduler at 'tcp://127\.0\.0\.1:9'"):
        run_experiment(exp, tmp_path / "out", scheduler="tcp://127.0.0.1:9", connect_timeout_s=1.0)


def _crash_on_seed_1(task):
    """A stand-in for run_unit (module level, so spawned workers can import it): seed 1 kills its worker."""
    if task.seed == 1:
        os._exit(3)
    return [{"key": cell.key, "status": "ok"} for cell in task.cells]


def test_a_unit_that_kills_its_worker_becomes_failed_rows(tmp_path):
    from simtomo.runner import _pool_results, _task

    exp = load_experiment(experiment_file(tmp_path, seeds=(0, 1, 2, 3)))
    tasks = [_task(exp, unit, "crash-test", 1) for unit in exp.units("crash-test")]
    results = dict((task.seed, rows) for task, rows in _pool_results(tasks, 2, fn=_crash_on_seed_1))
    assert sorted(results) == [0, 1, 2, 3]  # every unit is answered once
    for seed in (0, 2, 3):
        assert [r["status"] for r in results[seed]] == ["ok", "ok"]
    dead = results[1]
    assert [r["status"] for r in dead] == ["failed", "failed"] and {r["error_stage"] for r in dead} == {"worker"}
    assert "worker process died" in dead[0]["error"]
    assert [r["key"] for r in dead] == [c.key for c in tasks[1].cells]

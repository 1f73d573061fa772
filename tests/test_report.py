"""The report: figures (PNG and SVG) that exist and say what they show, tables, the theory curve."""

import math
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from matplotlib.image import imread

from simtomo import registry
from simtomo.alignment import AlignmentResult, ResidualReport
from simtomo.errors import AlignmentError
from simtomo.experiment import load_experiment
from simtomo.geometry import Geometry
from simtomo.report import predicted_resolution_A, summary_table, write_report
from simtomo.resolution import ShellCurve, resolution_A
from simtomo.runner import load_results, run_experiment

EXPERIMENT = """
name = "report-test"
description = "A small sweep for the report tests."
seeds = [0, 1]
[workload]
preset = "tiny"
[sweep.axes]
"tilt.total_dose_e_per_A2" = [60, 120]
[[aligners]]
name = "nominal"
[[aligners]]
name = "perturbed-truth"
sweep = {sigma_px = [0.5, 2.0]}
[[aligners]]
name = "nominal"
label = "self-assured"
params = {tilt_axis_deg = 11.0}
[[aligners]]
name = "nominal"
label = "explodes"
params = {tilt_axis_deg = 13.0}
[score]
with_images = true
binning = 4
"""

RESIDUAL_PX = 0.3


class SelfAssured:
    """A test double: the nominal geometry with a small residual it claims for itself (overfitting)."""

    name = "self-assured"

    def align(self, observation):
        geometry = Geometry.nominal(observation.tilt_deg, observation.image_shape, observation.pixel_size_A, rot_deg=85.0)
        n = len(observation.tilt_deg)
        residual = np.zeros((n, 4, 2))
        residual[..., 0] = RESIDUAL_PX
        return AlignmentResult(geometry, residuals=ResidualReport.from_residuals(residual, np.ones((n, 4), bool)))


class Explodes:
    name = "explodes"

    def align(self, observation):
        raise AlignmentError("no beads to track")


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    path = tmp / "report-test.toml"
    path.write_text(EXPERIMENT)
    real_get = registry.get

    def get(name, **params):
        doubles = {11.0: SelfAssured, 13.0: Explodes}
        return doubles[params["tilt_axis_deg"]]() if params.get("tilt_axis_deg") in doubles else real_get(name, **params)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SIMTOMO_CODE_VERSION", "report-test")
        experiment = load_experiment(path)
        mp.setattr(registry, "get", get)
        run_experiment(experiment, tmp / "out", workers=0)
    # a figure of an earlier report that this one does not make must not survive
    (tmp / "out" / "figures").mkdir()
    (tmp / "out" / "figures" / "old_figure.png").write_bytes(b"x")
    write_report(tmp / "out")
    return tmp / "out"


FIGURES = (
    "error_vs_tilt_total_dose_e_per_A2",
    "error_vs_aligner_sigma_px",
    "error_by_aligner",
    "residual_vs_error",
    "resolution_vs_error",
    "per_view_error",
    "runtime",
)


def test_every_figure_is_written_as_png_and_svg_and_referenced(report_dir):
    text = (report_dir / "report.md").read_text()
    for stem in FIGURES:
        png = report_dir / "figures" / f"{stem}.png"
        svg = report_dir / "figures" / f"{stem}.svg"
        assert f"](figures/{stem}.png)" in text and f"](figures/{stem}.svg)" in text
        image = imread(png)
        assert image.shape[0] > 300 and image.shape[1] > 500
        # not blank: a few percent of the pixels are ink, in more than one colour
        ink = image[..., :3].min(axis=-1) < 0.8
        assert 0.01 < ink.mean() < 0.6
        assert np.ptp(image[..., :3][ink], axis=0).max() > 0.3
        root = ET.parse(svg).getroot()
        assert root.tag.endswith("svg")
    # every link of the report points at a file that exists
    for link in re.findall(r"\]\((figures/[^)]+)\)", text):
        assert (report_dir / link).is_file()


def test_figures_carry_axis_labels_with_units(report_dir):
    def svg_text(stem):
        return (report_dir / "figures" / f"{stem}.svg").read_text()

    # matplotlib writes text as glyph paths with the string in a comment
    assert "alignment error, RMS (px)" in svg_text("error_vs_tilt_total_dose_e_per_A2")
    assert "tilt.total_dose_e_per_A2 (e/Å²)" in svg_text("error_vs_tilt_total_dose_e_per_A2")
    assert "resolution, FSC 0.5 vs phantom (Å)" in svg_text("resolution_vs_error")
    assert "aligner's own residual, RMS (px)" in svg_text("residual_vs_error")
    assert "nominal tilt (°)" in svg_text("per_view_error")
    assert "aligner runtime (s)" in svg_text("runtime")


def test_report_text_and_tables(report_dir):
    text = (report_dir / "report.md").read_text()
    df = load_results(report_dir)
    assert text.startswith("# Experiment `report-test`")
    assert "cells: 20 of 20 finished, 16 ok, 4 failed" in text
    # one summary row per aligner and setting, with the counts of ok cells
    rows = [line for line in text.splitlines() if line.startswith("| ") and "tilt.total_dose_e_per_A2=" in line and "AlignmentError" not in line]
    assert len(rows) == 5 * 2
    assert "| explodes | tilt.total_dose_e_per_A2=60 | 0/2 |" in text
    assert "| nominal | tilt.total_dose_e_per_A2=120 | 2/2 |" in text
    # the median [min–max] over seeds is what the table says
    sub = df[(df["aligner"] == "perturbed-truth sigma_px=2") & (df["setting"] == "tilt.total_dose_e_per_A2=60")]
    e = np.sort(sub["alignment_error_rms_px"].to_numpy())
    assert f"{np.median(e):.3g} [{e[0]:.3g}–{e[1]:.3g}]" in summary_table(df)
    # the self-assured double's claimed residual is in its row
    assert re.search(r"\| self-assured \| tilt.total_dose_e_per_A2=60 \| 2/2 \| [^|]+\| [^|]+\| 0\.3 \[0\.3–0\.3\] \|", text)
    # failures are listed with their error text
    assert text.count("| explodes | tilt.total_dose_e_per_A2=") == 2 + 4  # summary rows + failure rows
    assert "| align | AlignmentError: no beads to track |" in text
    assert "exp(-π²e²k²)" in text or "exp(-π²e²k²)·FSC_true" in text


def test_report_leaves_no_stale_figures(report_dir):
    assert sorted(p.name for p in (report_dir / "figures").iterdir()) == sorted(f"{s}.{x}" for s in FIGURES for x in ("png", "svg"))


def test_theory_at_zero_error_is_the_true_geometry_resolution():
    k = np.linspace(0.01, 0.24, 24)
    fsc = 1.0 / (1.0 + np.exp((k - 0.12) / 0.02))  # a falling FSC, crossing 0.5 at k = 0.12
    n = np.full(k.size, 1000)
    nyq = 0.25
    base = resolution_A(ShellCurve(k, fsc, n, nyq), 8.0)
    assert predicted_resolution_A(0.0, k, fsc, n, nyq, 8.0)[0] == base
    errors = np.array([0.0, 0.5, 1.0, 2.0, 4.0])
    pred = predicted_resolution_A(errors, k, fsc, n, nyq, 8.0)
    assert np.all(np.diff(pred) > 0)  # more error, coarser resolution
    assert pred[0] == pytest.approx(8.0 / 0.12, rel=1e-3)


def test_theory_with_perfect_true_fsc_is_the_envelope_crossing():
    """FSC_true = 1: the crossing is where exp(-pi^2 e^2 k^2) = 1/2, k = sqrt(ln 2) / (pi e)."""
    k = np.linspace(0.0025, 0.4975, 100)
    n = np.full(k.size, 10_000)
    for e in (1.0, 2.0, 3.0):
        k_half = math.sqrt(math.log(2.0)) / (math.pi * e)
        pred = predicted_resolution_A(e, k, np.ones_like(k), n, 0.5, 10.0)[0]
        # linear interpolation between shells 0.005 apart: within 0.5 % of the exact crossing
        assert pred == pytest.approx(10.0 / k_half, rel=5e-3)

"""The yardstick experiment: what a known misalignment costs a reconstruction.

On `standard`, replace the true geometry by the truth plus random per-view
shifts of known standard deviation sigma per axis, reconstruct the same images,
and compare the measured transfer and resolution with the theory
exp(-2 pi^2 sigma^2 k^2) of DESIGN.md section 5.

    python scripts/yardstick.py --out reports/yardstick [--preset standard] [--seed 0]

Writes yardstick.md, yardstick.csv, transfer.png/svg, resolution.png/svg.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter, ScalarFormatter

import simtomo
from simtomo.figures import save
from simtomo.report import predicted_resolution_A
from simtomo.resolution import predicted_transfer
from simtomo.score import score, scoring_reference

log = logging.getLogger("yardstick")

SIGMAS_PX = (0.25, 0.5, 1.0, 2.0, 4.0)


def run(preset: str, seed: int, sigmas: tuple[float, ...], binning: int):
    series = simtomo.simulate(preset, seed=seed)
    truth = series.truth()
    rng = np.random.default_rng(seed + 1000)
    reference = scoring_reference(truth, series.stack, binning=binning)
    results = []
    for sigma in sigmas:
        start = time.perf_counter()
        shifts = rng.normal(0.0, sigma, (truth.n_views, 2))
        estimate = truth.geometry.replace(shift_px=truth.geometry.shift_px + shifts)
        s = score(truth, estimate, series.stack, reference=reference, name=f"sigma {sigma} px")
        results.append((sigma, float(np.sqrt(np.mean(shifts**2))), s))
        log.info("sigma %.2f px: error %.3f px, resolution %.1f A, %.1f s", sigma, s.alignment_error_rms_px, s.resolution_A, time.perf_counter() - start)
    return series, results


def transfer_figure(results) -> Figure:
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.add_subplot()
    colors = ["C0", "C1", "C2", "C3", "C4", "C5"]
    for (sigma, _, s), color in zip(results, colors):
        k = s.transfer.frequency_per_px
        ax.plot(k, s.transfer.values, "o", ms=2.5, color=color, label=f"σ = {sigma:g} px: measured")
        ax.plot(k, predicted_transfer(k, s.transfer_sigma_px), "-", color=color, lw=1, label=f"theory (σ from error = {s.transfer_sigma_px:.2f})")
    ax.axhline(0, color="0.8", lw=0.8)
    ax.set_xlabel("spatial frequency (1/px)")
    ax.set_ylabel("transfer T(k), perturbed vs true geometry")
    ax.set_ylim(-0.15, 1.08)
    ax.set_title("Coherent transfer against exp(−2π²σ²k²)")
    ax.legend(frameon=False, fontsize=7, ncol=2)
    return fig


def resolution_figure(results, pixel_size_A: float) -> Figure:
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.add_subplot()
    err = np.array([s.alignment_error_rms_px for _, _, s in results])
    res = np.array([s.resolution_A for _, _, s in results])
    ref = results[0][2].fsc_true_geometry
    true_res = results[0][2].resolution_true_geometry_A
    ax.plot(err, res, "o", label="measured (FSC 0.5 vs phantom)")
    ax.axhline(true_res, color="k", ls=":", label=f"true geometry: {true_res:.1f} Å")
    # theory: the true-geometry FSC times the alignment envelope exp(-pi^2 e^2 k^2) crossing 0.5
    e = np.geomspace(0.1, err.max() * 1.3, 80)
    theory = predicted_resolution_A(e, ref.frequency_per_px, ref.values, ref.n_voxels, ref.nyquist_per_px, pixel_size_A)
    ax.plot(e, theory, "--", color="0.4", label="theory: FSC_true(k) exp(−π²e²k²) = 0.5")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks([0.1, 0.25, 0.5, 1, 2, 4, 8])
    ax.set_xlabel("alignment error e (px RMS)")
    ax.set_ylabel("resolution (Å)")
    ax.set_title("Resolution against alignment error")
    ax.legend(frameon=False, fontsize=8)
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("reports/yardstick"))
    parser.add_argument("--preset", default="standard")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bin", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    started = time.perf_counter()
    series, results = run(args.preset, args.seed, SIGMAS_PX, args.bin)
    args.out.mkdir(parents=True, exist_ok=True)
    px = series.config.detector.pixel_size_A
    rows = []
    for sigma, realised, s in results:
        t = s.transfer
        theory = predicted_transfer(t.frequency_per_px, s.transfer_sigma_px)
        ok = theory > 0.1
        dev = np.max(np.abs(t.values[ok] - theory[ok])) if ok.any() else math.nan
        rows.append({
            "sigma_px": sigma,
            "realised_shift_rms_per_axis_px": realised,
            "alignment_error_rms_px": s.alignment_error_rms_px,
            "transfer_sigma_px": s.transfer_sigma_px,
            "max_abs_transfer_deviation_where_theory_gt_0.1": dev,
            "resolution_A": s.resolution_A,
            "resolution_true_geometry_A": s.resolution_true_geometry_A,
            "resolution_loss_A": s.resolution_loss_A,
            "bead_fwhm_x_px": s.bead_fwhm_px[0],
            "bead_fwhm_y_px": s.bead_fwhm_px[1],
            "bead_fwhm_z_px": s.bead_fwhm_px[2],
            "bead_fwhm_true_x_px": s.bead_fwhm_true_geometry_px[0],
        })
    table = pd.DataFrame(rows)
    table.to_csv(args.out / "yardstick.csv", index=False, float_format="%.4g")
    save(transfer_figure(results), args.out / "transfer", formats=("png", "svg"))
    save(resolution_figure(results, px), args.out / "resolution", formats=("png", "svg"))
    s0 = results[0][2]
    md = [
        "# Yardstick: what a known misalignment costs",
        "",
        f"Workload `{args.preset}`, seed {args.seed}; reconstructions by weighted back-projection at bin {args.bin} "
        f"({px * args.bin:g} Å voxels). The true geometry plus random per-view shifts of standard deviation σ per axis "
        "replaces the alignment; the same images are reconstructed with it and with the true geometry. "
        f"Crowther limit of the tilt scheme for the {series.config.specimen.thickness_nm:g} nm slab: {s0.crowther_limit_A:.0f} Å.",
        "",
        "![transfer](transfer.png)",
        "",
        "![resolution](resolution.png)",
        "",
        _markdown_table(rows, s0),
        "",
        "Reading it: the alignment error is the gauge-free error of DESIGN.md section 5, a 2-D RMS, so about √2 σ; "
        "the transfer theory uses σ = error/√2. Resolution is the period where the FSC against the noise-free "
        "phantom, inside the measured wedge, crosses 0.5; the theory curve is the true-geometry FSC times the "
        "envelope exp(−π²e²k²). The measured transfer follows the envelope; two things make it differ. "
        "(1) One realisation: each shell averages cos(2πk·d) over only 61 views, a scatter of about 0.7/√61 ≈ 0.09 "
        "where the envelope is small (the |T − theory| column). Averaged over realisations — views blurred by the "
        "Gaussian the shifts average to — it agrees within 10 % below 0.75 × Nyquist (tests/test_score.py). "
        "(2) Near the binned Nyquist frequency the estimate loses a few per cent more than theory: views resampled "
        "at random sub-pixel offsets are low-passed by the interpolation. Sub-pixel errors cost little here because "
        "the true-geometry resolution is set by the tilt increment (Crowther) and the dose, not by alignment; from "
        "about 1 px RMS on, alignment error dominates.",
        "",
        f"Made by `python scripts/yardstick.py --out {args.out}` in {time.perf_counter() - started:.0f} s (simtomo {simtomo.__version__}).",
    ]
    (args.out / "yardstick.md").write_text("\n".join(md) + "\n")


def _markdown_table(rows, reference) -> str:
    fw = reference.bead_fwhm_true_geometry_px
    lines = [
        "| σ per axis (px) | alignment error (px RMS) | resolution (Å) | loss (Å) | bead FWHM x, y, z (px) | max abs(T − theory) where theory > 0.1 |",
        "|---:|---:|---:|---:|---|---:|",
        f"| 0 (true geometry) | 0 | {reference.resolution_true_geometry_A:.1f} | 0 | {fw[0]:.2f}, {fw[1]:.2f}, {fw[2]:.2f} | – |",
    ]
    for r in rows:
        lines.append(
            f"| {r['sigma_px']:g} | {r['alignment_error_rms_px']:.3f} | {r['resolution_A']:.1f} | {r['resolution_loss_A']:.1f} | "
            f"{r['bead_fwhm_x_px']:.2f}, {r['bead_fwhm_y_px']:.2f}, {r['bead_fwhm_z_px']:.2f} | "
            f"{r['max_abs_transfer_deviation_where_theory_gt_0.1']:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()

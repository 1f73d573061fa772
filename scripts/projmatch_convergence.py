"""Convergence of the projection-matching aligner, scored against the truth at every iteration.

On `standard-nobeads`, for each seed: simulate, run `projmatch` with its default
parameters, rebuild the geometry recorded after every iteration (iteration 0 is
the start, the coarse alignment; then come the matching iterations and the
particle passes, in rounds with the particles detected again for each round,
numbered on; landmark passes, off by default, when they ran) and measure its
gauge-free alignment error against the true geometry. The scoring happens here,
never inside the aligner.

    python scripts/projmatch_convergence.py --out reports/projmatch-convergence [--seeds 0 1 2]

Writes convergence.png/svg, convergence.csv, summary.json, config.json, README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, MaxNLocator, NullFormatter

import simtomo
from aligners.projmatch import geometry_from_dict
from simtomo import registry
from simtomo.alignment_error import alignment_error
from simtomo.config import config_to_dict
from simtomo.report import save_figure

log = logging.getLogger("projmatch_convergence")

PRESET = "standard-nobeads"

STAGE_NAMES = {"matching": "matching", "landmarks": "landmark passes", "particles": "particle passes"}


def run_seed(seed: int) -> tuple[list[dict], dict, dict]:
    """Simulate one seed, align it, score every recorded iteration; returns (csv rows, summary, context)."""
    series = simtomo.simulate(PRESET, seed=seed)
    true = series.geometry
    thickness_px = series.config.specimen.thickness_nm * 10 / series.config.detector.pixel_size_A
    aligner = registry.get("projmatch")
    result = aligner.align(series.observation())
    info = result.info
    params = aligner.params
    finest = min(info["binnings"])
    records = [{"geometry": info["start_geometry"]}] + list(info["iterations"])
    rows = []
    for k, rec in enumerate(records):
        err = alignment_error(geometry_from_dict(rec["geometry"], like=true), true, thickness_px=thickness_px)
        b, stage = rec.get("binning"), rec.get("stage", "matching") if k else "start"
        rows.append({
            "seed": seed, "iteration": k, "stage": stage, "kind": rec.get("kind", ""),
            "round": rec.get("round", np.nan),
            # a pass's number within its round (particles) or kind (landmarks); a matching
            # iteration's own number is the same as its place in the table
            "pass": rec.get("iteration", np.nan) if stage in ("particles", "landmarks") else np.nan,
            "binning": b,
            "alignment_error_rms_px": err.rms_px,
            "max_update_px": rec.get("max_update_px", np.nan),
            "rms_update_px": rec.get("rms_update_px", np.nan),
            "particles": rec.get("particles", np.nan),
            "residual_rms_px": rec.get("residual_rms_px", np.nan),
            "seconds": rec.get("seconds", np.nan),
            "tolerance_px": params.tolerance_px * b / finest if stage == "matching" else np.nan,
        })
    final = alignment_error(result.geometry, true, thickness_px=thickness_px).rms_px
    errs = np.array([r["alignment_error_rms_px"] for r in rows])
    particles = [r for r in rows if r["stage"] == "particles"]
    landmarks = [r for r in rows if r["stage"] == "landmarks"]
    summary = {
        "start_error_rms_px": float(errs[0]),
        "final_error_rms_px": float(final),
        "min_error_rms_px": float(errs.min()),
        "min_error_iteration": int(errs.argmin()),
        "min_error_phase": _phase_name(rows[int(errs.argmin())]),
        "iterations": len(records) - 1,
        "matching_iterations": sum(r["stage"] == "matching" for r in rows),
        "particle_passes": len(particles),
        "particle_rounds": len({r["round"] for r in particles}),
        "error_after_matching_px": _last_error(rows, lambda r: r["stage"] == "matching"),
        "error_after_round_1_px": _last_error(rows, lambda r: r["stage"] == "particles" and r["round"] == 1),
        "last_pass_max_update_px": float(rows[-1]["max_update_px"]) if particles or landmarks else None,
        # the aligner returns the last pass's geometry; a mean of passes (landmarks) would not match it
        "returned_is_last_iteration": bool(abs(final - errs[-1]) < 1e-6),
        "converged": bool(info["converged"]),
        "error_increases": [[k, float(errs[k] - errs[k - 1])] for k in range(1, len(errs)) if errs[k] > errs[k - 1]],
        "wall_seconds": float(info["wall_seconds"]),
        "cpu_seconds": float(info["cpu_seconds"]),
    }
    if landmarks:
        summary["landmark_passes"] = len(landmarks)
        summary["fine_landmark_passes"] = sum(r["kind"] == "fine" for r in landmarks)
    context = {"config": config_to_dict(series.config), "params": dataclasses.asdict(params), "thickness_px": thickness_px}
    return rows, summary, context


def _last_error(rows: list[dict], keep) -> float | None:
    """Alignment error of the last row that ``keep`` accepts; None when there is none."""
    return next((float(r["alignment_error_rms_px"]) for r in reversed(rows) if keep(r)), None)


def _phase(row) -> tuple[str, str]:
    """(stage, sub-phase) of a row: the landmark kind or the particle round; the start counts as matching."""
    stage = "matching" if row["stage"] == "start" else row["stage"]
    if stage == "landmarks":
        return stage, row["kind"]
    if stage == "particles":
        return stage, f"round {int(row['round'])}"
    return stage, ""


def _phase_name(row) -> str:
    """Readable name of a row's phase, e.g. 'particle round 2' or 'fine landmark passes'."""
    if row["stage"] == "start":
        return "start"
    stage, sub = _phase(row)
    if stage == "particles":
        return f"particle {sub}"
    if stage == "landmarks":
        return f"{sub} landmark passes"
    return "matching"


def _boundary_label(before: tuple[str, str], after: tuple[str, str]) -> str:
    """Legend label of the separator between two phases."""
    if before[0] != after[0]:
        return f"{STAGE_NAMES[before[0]]} | {STAGE_NAMES[after[0]]}"
    if before[0] == "landmarks":
        return f"{before[1]} | {after[1]} landmark passes"
    return f"particle {before[1]} | {after[1]}"


def _boundaries(table: pd.DataFrame) -> dict[str, list[int]]:
    """Where the phase changes: separator label -> iterations after which it changes, over all seeds."""
    edges: dict[str, set[int]] = {}
    for _, rows in table.groupby("seed", sort=True):
        phases = [_phase(r) for _, r in rows.iterrows()]
        for (a, b), it in zip(zip(phases, phases[1:]), rows.iteration.iloc[:-1]):
            if a != b:
                edges.setdefault(_boundary_label(a, b), set()).add(int(it))
    return {label: sorted(its) for label, its in edges.items()}


def _returned_label(table: pd.DataFrame, summary: dict[int, dict]) -> str:
    """What the star stands for: the last recorded iteration's kind when that is the returned geometry in every seed."""
    last = {rows.stage.iloc[-1] for _, rows in table.groupby("seed")}
    if len(last) == 1 and all(s["returned_is_last_iteration"] for s in summary.values()):
        (stage,) = last
        name = {"matching": "matching iteration", "landmarks": "landmark pass", "particles": "particle pass"}.get(stage)
        if name:
            return f"returned geometry (the last {name})"
    return "returned geometry"


def convergence_figure(table: pd.DataFrame, summary: dict[int, dict]) -> Figure:
    """Left: alignment error against iteration; right: largest per-view update (log) with the stop tolerance."""
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    ax_err, ax_upd = fig.subplots(1, 2)
    stop_labelled = {}
    styles = itertools.cycle([":", "-.", (0, (5, 2, 1, 2, 1, 2)), (0, (1, 3))])
    for (label, edges), ls in zip(_boundaries(table).items(), styles):
        for j, edge in enumerate(edges):
            for ax in (ax_err, ax_upd):
                ax.axvline(edge + 0.5, color="0.5", ls=ls, lw=1, label=None if j else label)
    returned = _returned_label(table, summary)
    for i, (seed, rows) in enumerate(table.groupby("seed", sort=True)):
        color = f"C{i}"
        ax_err.plot(rows.iteration, rows.alignment_error_rms_px, "o-", ms=3.5, color=color, label=f"seed {seed}")
        upd = rows[rows.iteration > 0]
        ax_upd.plot(upd.iteration, upd.max_update_px, "o-", ms=3.5, color=color, label=f"seed {seed}")
        # the stop rule belongs to the matching stage: mark where that stage ended
        matching = rows[rows.stage == "matching"]
        last = matching.iloc[-1] if len(matching) else rows.iloc[-1]
        stop = "matching stop rule fired (update < tolerance)" if summary[seed]["converged"] else "matching max_iterations reached"
        marker = "o" if summary[seed]["converged"] else "X"
        for ax, y in ((ax_err, last.alignment_error_rms_px), (ax_upd, last.max_update_px)):
            ax.plot(last.iteration, y, marker, ms=11, mfc="none", mec="k", mew=1.2,
                    label=stop if (ax, stop) not in stop_labelled else None)
            stop_labelled[(ax, stop)] = True
        # on the last iteration when that is what the aligner returns, else beside it
        x = rows.iteration.max() + (0 if summary[seed]["returned_is_last_iteration"] else 0.4)
        ax_err.plot(x, summary[seed]["final_error_rms_px"], "*", ms=12, color=color,
                    mec="k", mew=0.6, label=None if i else returned)
    # drawn over the matching iterations only: the passes after them run a fixed number of times
    for tol in sorted(table.tolerance_px.dropna().unique()):
        its = table.iteration[table.tolerance_px == tol]
        ax_upd.hlines(tol, its.min() - 0.5, its.max() + 0.5, color="k", ls="--", lw=1,
                      label=f"matching stop tolerance {tol:g} px")
    ax_err.set_xlabel("iteration (0 = coarse-alignment start)")
    ax_err.set_ylabel("alignment error vs truth (px RMS)")
    ax_err.set_ylim(bottom=0)
    ax_err.set_title("Alignment error")
    ax_upd.set_yscale("log")
    ticks = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20)
    ax_upd.set_yticks([t for t in ticks if table.max_update_px.min() / 2 < t < table.max_update_px.max() * 2])
    ax_upd.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax_upd.yaxis.set_minor_formatter(NullFormatter())
    stages = [STAGE_NAMES[s] for s in STAGE_NAMES if (table.stage == s).any()]
    ax_upd.set_xlabel("iteration (" + ", then ".join(stages) + ")")
    ax_upd.set_ylabel("largest per-view update (px, unbinned)")
    ax_upd.set_title("Largest per-view update and stop rule")
    for ax in (ax_err, ax_upd):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        order = sorted(range(len(labels)), key=lambda i: (not labels[i].startswith("seed"), i))
        ax.legend([handles[i] for i in order], [labels[i] for i in order], frameon=False, fontsize=8)
    fig.suptitle(f"projmatch convergence on {PRESET} (default parameters)")
    return fig


def main() -> None:
    """Run projmatch on several seeds and write the convergence report.

    Parameters
    ----------
    None; command-line options ``--out`` (output directory) and ``--seeds``
    (simulation seeds, default 0 1 2).

    Returns
    -------
    None. Writes convergence.png/svg, convergence.csv, summary.json,
    config.json and README.md into ``--out``.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("reports/projmatch-convergence"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    started = time.perf_counter()
    rows: list[dict] = []
    summary: dict[int, dict] = {}
    context: dict = {}
    for n, seed in enumerate(args.seeds, 1):
        t0 = time.perf_counter()
        seed_rows, summary[seed], context = run_seed(seed)
        rows += seed_rows
        s = summary[seed]
        log.info("seed %d (%d/%d): %d iterations, error %.3f -> %.3f px, converged %s, %.1f s",
                 seed, n, len(args.seeds), s["iterations"], s["start_error_rms_px"], s["final_error_rms_px"],
                 s["converged"], time.perf_counter() - t0)
    args.out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows)
    columns = ["seed", "iteration", "stage", "kind", "round", "pass", "binning", "alignment_error_rms_px",
               "max_update_px", "rms_update_px", "particles", "residual_rms_px", "seconds"]
    table[columns].to_csv(args.out / "convergence.csv", index=False, float_format="%.4g")
    (args.out / "summary.json").write_text(json.dumps({str(k): v for k, v in summary.items()}, indent=1) + "\n")
    command = "python scripts/projmatch_convergence.py --out " + str(args.out) + " --seeds " + " ".join(map(str, args.seeds))
    config = {"command": command, "preset": PRESET, "seeds": args.seeds, "aligner": "projmatch",
              "projmatch_params": context["params"], "thickness_px": context["thickness_px"],
              "simtomo_version": simtomo.__version__, "numpy_version": np.__version__,
              "simulation_config": context["config"]}
    (args.out / "config.json").write_text(json.dumps(config, indent=1, default=str) + "\n")
    save_figure(convergence_figure(table, summary), args.out / "convergence")
    (args.out / "README.md").write_text(readme(command, table, summary, time.perf_counter() - started))
    log.info("wrote %s (%d seeds, %d rows) in %.0f s", args.out, len(summary), len(table), time.perf_counter() - started)


def readme(command: str, table: pd.DataFrame, summary: dict[int, dict], seconds: float) -> str:
    """The Markdown report: command, per-seed table, and what the figure shows in measured numbers."""
    lines = [
        "# projmatch convergence", "",
        f"Projection matching (`projmatch`, default parameters) on `{PRESET}`; after every iteration the recorded "
        "geometry is scored against the truth by the gauge-free alignment error (`simtomo.alignment_error`). "
        + " ".join(_pipeline(table, summary))
        + " Numbers: `convergence.csv`, `summary.json`; settings: `config.json`.", "",
        f"Made by `{command}` in {seconds:.0f} s (simtomo {simtomo.__version__}).", "",
        "![convergence](convergence.png)", "", "[SVG](convergence.svg)", "",
        "| seed | start error (px RMS) | after matching (px RMS) | after particle round 1 (px RMS) "
        "| final error (px RMS) | lowest error (px RMS, iteration) | iterations (matching + passes) | converged "
        "| aligner wall time (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]

    def px(value: float | None) -> str:
        return "–" if value is None else f"{value:.3f}"

    for seed, s in summary.items():
        passes = s["iterations"] - s["matching_iterations"]
        lines.append(f"| {seed} | {px(s['start_error_rms_px'])} | {px(s['error_after_matching_px'])} | "
                     f"{px(s['error_after_round_1_px'])} | {px(s['final_error_rms_px'])} | "
                     f"{s['min_error_rms_px']:.3f} ({s['min_error_iteration']}) | "
                     f"{s['iterations']} ({s['matching_iterations']} + {passes}) | "
                     f"{'yes' if s['converged'] else 'no'} | {s['wall_seconds']:.0f} |")
    lines += ["", "What the figure shows: " + " ".join(_findings(table, summary)), ""]
    return "\n".join(lines)


def _span(values: list, fmt: str = ".2f") -> str:
    """'lo–hi' of the values in ``fmt``, or one value when both read the same."""
    lo, hi = min(values), max(values)
    return f"{lo:{fmt}}" if f"{lo:{fmt}}" == f"{hi:{fmt}}" else f"{lo:{fmt}}–{hi:{fmt}}"


def _pipeline(table: pd.DataFrame, summary: dict[int, dict]) -> list[str]:
    """What the iterations are, in the order they ran; counts from the run, not from the defaults."""
    s = list(summary.values())
    particles = table[table.stage == "particles"]
    landmarks = table[table.stage == "landmarks"]
    matching = table[table.stage == "matching"]
    steps = [f"the projection-matching iterations (binning {_span(list(matching.binning), 'g')})"]
    if len(landmarks):
        steps.append("the landmark passes (bundle adjustment of layered landmarks; plain passes, then fine ones, "
                     "with the other layers subtracted from each view and anchored per-view tilts)")
    if len(particles):
        per_round = particles.groupby(["seed", "round"]).size()
        steps.append(f"the particle passes ({_span([x['particle_rounds'] for x in s], 'd')} rounds of "
                     f"{_span(list(per_round), 'd')} passes at binning {_span(list(particles.binning), 'g')})")
    out = ["Iteration 0 is the start (coarse alignment); then come " + ", then ".join(steps) + ", numbered on."]
    if len(particles):
        out.append("Each particle round detects dense particles in a reconstruction made with the current geometry "
                   "(detected again, with the improved geometry, for every round after the first); each pass looks "
                   "for every particle's blob near its projection in every view, with no template from the "
                   "reconstruction, and solves a bundle adjustment of those tracks (per-view shift, rotation, "
                   "magnification, and per-view tilts anchored to the nominal ones).")
    if len(particles) or len(landmarks):
        kind = "particle or landmark pass" if len(particles) and len(landmarks) else \
            "particle pass" if len(particles) else "landmark pass"
        out.append(f"The updates are measured differently: a {kind} by the gauge-free change of the geometry, "
                   "a matching iteration by the RMS displacement over the field of view; only the matching stage "
                   "has the stop rule.")
    star = _returned_label(table, summary)
    out.append("A star marks the geometry the aligner returns"
               + (f", {star.removeprefix('returned geometry (').removesuffix(')')}." if star.endswith(")") else "."))
    return out


def _findings(table: pd.DataFrame, summary: dict[int, dict]) -> list[str]:
    """Plain statements derived from the measured numbers only."""
    s = list(summary.values())

    def span(key: str, fmt: str = ".2f") -> str:
        return _span([x[key] for x in s], fmt)

    seeds = f"{len(s)} seed" + ("s" if len(s) > 1 else "")
    out = [f"Over {seeds} the alignment error goes from {span('start_error_rms_px')} px RMS at the start to "
           f"{span('final_error_rms_px')} px after {span('iterations', 'd')} iterations."]
    if all(x["error_after_matching_px"] is not None for x in s):
        steps = [f"The matching stage ends at {span('error_after_matching_px')} px after "
                 f"{span('matching_iterations', 'd')} iterations"]
        if all(x.get("landmark_passes") for x in s):
            steps.append(f"the {span('landmark_passes', 'd')} landmark passes "
                         f"({span('fine_landmark_passes', 'd')} of them fine) follow")
        if all(x["error_after_round_1_px"] is not None for x in s) and all(x["particle_rounds"] > 1 for x in s):
            later = "the second (particles detected again)" if all(x["particle_rounds"] == 2 for x in s) else \
                "the later rounds (particles detected again for each)"
            steps.append(f"the first particle round takes it to {span('error_after_round_1_px')} px "
                         f"and {later} to the final value")
        elif all(x["particle_passes"] for x in s):
            steps.append("the particle passes take it to the final value")
        out.append("; ".join(steps) + ".")
    if all(x["last_pass_max_update_px"] is not None for x in s):
        out.append(f"The last pass moves a view by up to {span('last_pass_max_update_px', '.3f')} px.")
    skipped = [seed for seed, x in summary.items() if not x["particle_passes"]]
    if skipped:
        out.append("Seed " + ", ".join(map(str, skipped)) + " has no particle passes: the aligner skipped the "
                   "particle refinement (its log says why) and returned the result before it.")
    rise = {seed: x["final_error_rms_px"] - x["min_error_rms_px"] for seed, x in summary.items()}
    below = [seed for seed, r in rise.items() if r < -1e-6]
    if below:
        out.append("The returned geometry is below every recorded iteration in seed "
                   + ", ".join(f"{seed} ({-rise[seed]:.3f} px below the lowest)" for seed in below) + ".")
    not_last = [seed for seed, x in summary.items() if not x["returned_is_last_iteration"]]
    if not not_last:
        out.append("In every seed the returned geometry is the last recorded iteration.")
    else:
        out.append("The returned geometry is not the last recorded iteration in seed "
                   + ", ".join(map(str, not_last)) + ".")
    worse = {seed: r for seed, r in rise.items() if r >= 0.01}
    if not worse:
        out.append("No seed ends more than 0.01 px above its lowest recorded error.")
    else:
        out.append("The returned geometry is not the best one recorded: "
                   + ", ".join(f"seed {seed} is lowest at iteration {summary[seed]['min_error_iteration']} "
                               f"({summary[seed]['min_error_phase']}, {summary[seed]['min_error_rms_px']:.3f} px) "
                               f"and returns {r:.3f} px more"
                               for seed, r in worse.items())
                   + ".")
    n_conv = sum(x["converged"] for x in s)
    tol = table.tolerance_px.dropna().unique()
    out.append(f"The stop rule (largest matching update below {', '.join(f'{t:g}' for t in tol)} px) fired in {n_conv} of {len(s)} seeds"
               + ("." if n_conv == len(s) else "; the others stopped at max_iterations."))
    return out


if __name__ == "__main__":
    main()

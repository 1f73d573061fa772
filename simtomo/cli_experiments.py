"""Command line of experiments: ``simtomo run``, ``simtomo report``, ``simtomo regress``.

A thin layer over :mod:`simtomo.experiment`, :mod:`simtomo.runner`,
:mod:`simtomo.report` and :mod:`simtomo.regress`; registered on the main
parser by :func:`add_subcommands`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from simtomo.config import PRESETS
from simtomo.errors import ConfigError

__all__ = ["add_subcommands"]

log = logging.getLogger("simtomo")


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated non-negative integers, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"expected comma-separated non-negative integers, got {text!r}")
    return seeds


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _positive(text: str) -> int:
    value = _non_negative(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _run(args: argparse.Namespace) -> int:
    from simtomo.experiment import load_experiment
    from simtomo.runner import describe_grid, run_experiment

    experiment = load_experiment(args.experiment, preset_override=args.preset, seeds_override=args.seeds)
    if args.dry_run:
        print(describe_grid(experiment))
        return 0
    if args.workers is not None and args.scheduler:
        raise ConfigError("--workers and --scheduler exclude each other: the cluster decides its workers")
    summary = run_experiment(
        experiment,
        args.out,
        workers=args.workers,
        scheduler=args.scheduler,
        limit=args.limit,
        retry_failed=args.retry_failed,
    )
    if not args.no_report:
        from simtomo.report import write_report

        path = write_report(args.out)
        log.info("report: %s", path)
    if summary.remaining:
        log.info("%d cells remain; run the same command again to continue", summary.remaining)
    return 0


def _report(args: argparse.Namespace) -> int:
    from simtomo.report import write_report

    path = write_report(args.dir)
    print(path)
    return 0


def _regress(args: argparse.Namespace) -> int:
    from simtomo.regress import compare_with_baseline, write_baseline

    if args.write_baseline is not None:
        path = write_baseline(args.dir, args.write_baseline)
        print(f"baseline written: {path}")
        return 0
    report = compare_with_baseline(args.dir, args.baseline)
    print(report.format())
    return 1 if report.regressions else 0


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``run``, ``report`` and ``regress`` on the ``simtomo`` parser's subcommands."""
    run = subparsers.add_parser(
        "run",
        help="run an experiment: a sweep of simulations, aligners and seeds",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Expand the grid of EXPERIMENT (a TOML file, see experiments/), simulate each setting and seed once,\n"
            "align with each aligner, score, and write one row per cell to DIR/results.parquet and DIR/results.csv,\n"
            "then the report DIR/report.md. Each finished cell is saved at once (DIR/cells/); running the same\n"
            "command again skips finished cells, so an interrupted sweep continues where it stopped."
        ),
    )
    run.add_argument("experiment", type=Path, help="experiment file (experiments/NAME.toml)")
    run.add_argument("--out", required=True, type=Path, metavar="DIR", help="results directory")
    run.add_argument("--workers", type=_non_negative, default=None, metavar="N", help="local worker processes (default: every core; 0: run in this process)")
    run.add_argument("--scheduler", default=None, metavar="ADDRESS", help="run on a dask.distributed scheduler, e.g. tcp://host:8786")
    run.add_argument("--limit", type=_positive, default=None, metavar="K", help="run at most K simulations now (the rest stay pending)")
    run.add_argument("--retry-failed", action="store_true", help="recompute cells that failed before")
    run.add_argument("--preset", choices=sorted(PRESETS), default=None, help="replace the experiment's workload preset (smoke runs)")
    run.add_argument("--seeds", type=_seed_list, default=None, metavar="S,S,...", help="replace the experiment's seeds")
    run.add_argument("--no-report", action="store_true", help="do not write DIR/report.md at the end")
    run.add_argument("--dry-run", action="store_true", help="validate the experiment, print its grid and exit")
    run.set_defaults(func=_run)

    rep = subparsers.add_parser(
        "report",
        help="write the Markdown report and figures of a results directory",
        description="Write DIR/report.md with figures (PNG and SVG) in DIR/figures from DIR/results.parquet.",
    )
    rep.add_argument("dir", type=Path, help="results directory of `simtomo run`")
    rep.set_defaults(func=_report)

    reg = subparsers.add_parser(
        "regress",
        help="compare a results table with a baseline; exit 1 when accuracy got worse",
        description=(
            "Compare the per (aligner, setting) medians of DIR/results.parquet with a baseline file under its "
            "per-metric tolerances. Exit status 1 lists each regression; improvements are reported and pass. "
            "--write-baseline FILE writes a baseline from DIR instead."
        ),
    )
    reg.add_argument("dir", type=Path, help="results directory of `simtomo run`")
    mode = reg.add_mutually_exclusive_group(required=True)
    mode.add_argument("--baseline", type=Path, help="baseline file to compare with (JSON)")
    mode.add_argument("--write-baseline", type=Path, metavar="FILE", help="write a baseline from DIR to FILE")
    reg.set_defaults(func=_regress)

"""Command line: ``simtomo simulate | ...``, a thin layer over the Python API."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from simtomo.config import PRESETS, describe_parameters, load_config
from simtomo.errors import SimtomoError

__all__ = ["main"]

log = logging.getLogger("simtomo")


def _simulate(args: argparse.Namespace) -> int:
    from simtomo.simulate import simulate_to_files

    config = load_config(args.preset, args.config, args.set)
    start = time.perf_counter()
    series, paths = simulate_to_files(
        config, args.seed, args.out, args.name, phantom_bin=args.phantom_bin, workers=args.workers
    )
    log.info(
        "simulated %s: %d views of %dx%d px in %.1f s",
        config.name,
        series.geometry.n_views,
        *series.geometry.image_shape,
        time.perf_counter() - start,
    )
    for kind, path in paths.items():
        log.info("  %-8s %s", kind, path)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="simtomo",
        description="Simulate cryo-ET tilt series with known geometry, align them, and score the alignment.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sim = sub.add_parser(
        "simulate",
        help="simulate a tilt series with ground truth",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Simulate a tilt series and write NAME.mrc (stack, pixel size in the header), NAME.rawtlt\n"
            "(nominal tilts), NAME.truth.json (true geometry, bead positions, config and seed) and\n"
            "NAME.config.toml (reusable with --config). Parameters come from a preset, then a TOML\n"
            "file of [section] tables, then --set section.field=value options."
        ),
        epilog="parameters (section.field = default [unit]):\n" + describe_parameters(),
    )
    sim.add_argument("--preset", choices=sorted(PRESETS), default=None, help="named workload (default: standard, or the config file's preset)")
    sim.add_argument("--out", required=True, type=Path, help="output directory")
    sim.add_argument("--seed", type=int, default=0, help="random seed: same seed, same bytes (default 0)")
    sim.add_argument("--config", type=Path, default=None, help="TOML file overriding the preset field by field")
    sim.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override one parameter (repeatable)")
    sim.add_argument("--name", default=None, help="base name of the output files (default: the preset name)")
    sim.add_argument("--phantom-bin", type=int, default=None, metavar="N", help="also write NAME.phantom.mrc, the noise-free volume at binning N")
    sim.add_argument("--workers", type=int, default=None, help="threads rendering views (default: cores, at most 4)")
    sim.set_defaults(func=_simulate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``simtomo`` command; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    try:
        return args.func(args)
    except SimtomoError as exc:
        print(f"simtomo {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, permission denied: not a bug, say what and where
        print(f"simtomo {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"simtomo {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

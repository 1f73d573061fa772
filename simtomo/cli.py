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


def _reconstruct(args: argparse.Namespace) -> int:
    from simtomo.io import read_geometry, read_stack, write_volume
    from simtomo.reconstruct import log_intensity, reconstruct

    stack, pixel_size_A = read_stack(args.stack)
    geometry = read_geometry(args.geometry)
    if geometry.n_views != stack.shape[0]:
        raise SimtomoError(f"{args.geometry}: {geometry.n_views} views, but {args.stack} holds {stack.shape[0]}")
    h, w = geometry.image_shape
    b = args.bin
    thickness = args.thickness if args.thickness is not None else min(h, w) // 4
    shape = (max(1, round(thickness / b)), -(-h // b), -(-w // b))
    projections = stack if args.no_log else log_intensity(stack)
    start = time.perf_counter()
    volume = reconstruct(projections, geometry, shape, voxel_size_px=b, method=args.method)
    write_volume(args.out, volume, pixel_size_A * b)
    log.info("reconstructed %s (%s, bin %d): %d x %d x %d voxels in %.1f s -> %s", args.stack, args.method, b, *shape, time.perf_counter() - start, args.out)
    return 0


def _score(args: argparse.Namespace) -> int:
    import json

    from simtomo.figures import fsc_figure, per_view_error_figure, save, transfer_figure
    from simtomo.io import read_alignment, read_stack, read_truth
    from simtomo.io._json import write_text_atomic
    from simtomo.score import score

    truth = read_truth(args.truth)
    result = read_alignment(args.geometry)
    stack = read_stack(args.stack)[0] if args.stack else None
    scores = score(truth, result, stack, binning=args.bin)
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "scores.json", json.dumps(scores.to_dict(), indent=1) + "\n")
    for stem, fig in (("per_view_error", per_view_error_figure(scores)), ("transfer", transfer_figure(scores)), ("fsc", fsc_figure(scores))):
        if fig is not None:
            save(fig, args.out / stem, formats=("png", "svg"))
    log.info("alignment error %.3f px RMS; scores in %s", scores.alignment_error_rms_px, args.out / "scores.json")
    return 0


def _align(args: argparse.Namespace) -> int:
    from simtomo.io import read_rawtlt, read_stack, write_alignment, write_residual_table
    from simtomo.observation import Observation
    from simtomo.registry import get

    params = dict(_key_value(item) for item in args.param)
    aligner = get(args.aligner, **params)
    stack, pixel_size_A = read_stack(args.stack, mmap=True)
    rawtlt = args.rawtlt or args.stack.with_suffix(".rawtlt")
    tilt = read_rawtlt(rawtlt, n_views=stack.shape[0])
    name = args.stack.name.removesuffix(".mrc")
    observation = Observation(
        stack=stack,
        tilt_deg=tilt,
        pixel_size_A=pixel_size_A,
        tilt_axis_deg=args.tilt_axis,
        bead_diameter_nm=args.bead_nm,
        name=name,
    )
    start = time.perf_counter()
    result = aligner.align(observation)
    seconds = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{name}.geometry.json"
    write_alignment(path, result, aligner=args.aligner, params=_params_dict(aligner.params))
    write_residual_table(args.out / f"{name}.residuals.csv", result)
    residual = "" if result.residuals is None else f", residual {result.residuals.rms_px:.3f} px RMS"
    log.info("aligned %s with %s in %.1f s%s -> %s", args.stack, args.aligner, seconds, residual, path)
    return 0


def _key_value(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise SimtomoError(f"--param: expected key=value, got {item!r}")
    return key.strip(), value.strip()


def _params_dict(params) -> dict:
    import dataclasses

    return dataclasses.asdict(params) if dataclasses.is_dataclass(params) else {}


def _aligners(args: argparse.Namespace) -> int:
    from simtomo.registry import available, describe

    for name in available():
        print(describe(name))
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

    rec = sub.add_parser(
        "reconstruct",
        help="reconstruct a tilt series with a geometry (weighted back-projection or SIRT)",
        description="Reconstruct STACK with the geometry in GEOMETRY.json into the specimen frame of DESIGN.md section 3. "
        "Counts are converted to -log(I/I0) first unless --no-log.",
    )
    rec.add_argument("stack", type=Path, help="tilt series (MRC)")
    rec.add_argument("geometry", type=Path, help="geometry or alignment file (*.geometry.json, *.truth.json)")
    rec.add_argument("--out", required=True, type=Path, help="output volume (MRC)")
    rec.add_argument("--bin", type=int, default=1, metavar="N", help="voxel size in pixels (default 1)")
    rec.add_argument("--method", choices=("wbp", "sirt"), default="wbp", help="reconstruction method (default wbp)")
    rec.add_argument("--thickness", type=int, default=None, metavar="PX", help="volume thickness in unbinned pixels (default: a quarter of the image width)")
    rec.add_argument("--no-log", action="store_true", help="the stack already holds line integrals; do not take -log(I/I0)")
    rec.set_defaults(func=_reconstruct)

    sco = sub.add_parser(
        "score",
        help="score an alignment against the ground truth",
        description="Write DIR/scores.json (alignment error, residuals, and with --stack the blur, transfer and resolution) and figures.",
    )
    sco.add_argument("truth", type=Path, help="NAME.truth.json of the simulated series")
    sco.add_argument("geometry", type=Path, help="the alignment to score (*.geometry.json)")
    sco.add_argument("--stack", type=Path, default=None, help="the stack the aligner saw; enables reconstruction-based scores")
    sco.add_argument("--out", required=True, type=Path, help="output directory")
    sco.add_argument("--bin", type=int, default=2, metavar="N", help="voxel size of the reconstructions in pixels (default 2)")
    sco.set_defaults(func=_score)

    ali = sub.add_parser(
        "align",
        help="align a tilt series with a registered aligner",
        description="Align STACK and write DIR/NAME.geometry.json (with the aligner's residual report) and DIR/NAME.residuals.csv.",
    )
    ali.add_argument("stack", type=Path, help="tilt series (MRC)")
    ali.add_argument("--aligner", required=True, help="registered aligner name (see `simtomo aligners`)")
    ali.add_argument("--rawtlt", type=Path, default=None, help="nominal tilt angles (default: STACK with .rawtlt)")
    ali.add_argument("--tilt-axis", type=float, default=None, metavar="DEG", help="nominal tilt-axis angle from the microscope log")
    ali.add_argument("--bead-nm", type=float, default=None, help="nominal gold bead diameter in nm")
    ali.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="aligner parameter (repeatable)")
    ali.add_argument("--out", required=True, type=Path, help="output directory")
    ali.set_defaults(func=_align)

    lst = sub.add_parser("aligners", help="list the registered aligners and their parameters")
    lst.set_defaults(func=_aligners)
    from simtomo.cli_experiments import add_subcommands
    add_subcommands(sub)
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

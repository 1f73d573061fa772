"""Time and peak memory of reconstruction on the ``standard`` workload at bin 2.

How to run (from the repository root, in the project's virtual environment)::

    python benchmarks/reconstruct.py                      # every case
    python benchmarks/reconstruct.py --cases wbp reproject
    python benchmarks/reconstruct.py --skip-reference     # without the slow NumPy/SciPy reference

The series is ``simulate("standard", seed=0)``: 61 views of 1024 x 1024 px;
the line integrals are :func:`simtomo.reconstruct.log_intensity` of its counts
and the geometry is the true one. Every case reconstructs (or reprojects) the
grid ``(128, 512, 512)`` at voxel size 2 px:

- ``wbp``: :func:`simtomo.reconstruct.reconstruct`, weighted back-projection
  (numba kernels);
- ``wbp-reference``: the same filtered images back-projected by the plain
  NumPy/SciPy reference (``scipy.ndimage.map_coordinates`` per view and z
  slice, single-threaded), which the tests check the kernels against;
- ``reproject``: :func:`simtomo.reconstruct.reproject` of the ``wbp`` volume
  into all 61 raw views;
- ``sirt``: two SIRT iterations; the table gives the set-up (resampling, row
  and column sums, first iteration) and one further iteration, from the
  module's log records.

Each case runs in a child process of its own (this script with ``--child``),
so its peak memory is its own. The child loads the line integrals from a
``.npy`` file, resets the kernel's high-water mark (``/proc/self/clear_refs``)
and reports ``VmHWM`` after the call: ``peak RSS (call)`` is the peak while
the call ran, input stack (256 MB) included; ``peak RSS (process)`` includes
the loading too. Before the measured children, one child runs every kernel
once on a small case so that numba's on-disk cache is compiled and no
measured call pays for compilation (its time is the ``warm-up`` row).

Targets, on 2 cores: ``wbp`` under 10 s and well under 1.5 GB. The machine
may be shared: the load average before and after is printed, and CPU time is
given beside wall time. The exit status is 1 if a child failed, else 0 (a
missed target is reported, never an error).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPE = (128, 512, 512)
BINNING = 2
WBP_TARGET_S = 10.0
RSS_TARGET_MB = 1500.0
CASES = ("wbp", "wbp-reference", "reproject", "sirt")


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class _Timed:
    """Wall and CPU seconds of a block."""

    def __enter__(self):
        self.wall0, self.cpu0 = time.perf_counter(), _cpu_s()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall0
        self.cpu = _cpu_s() - self.cpu0


def _child(case: str, data: Path, workers: int | None) -> dict:
    """Run one case in this process and return its measurements."""
    from simtomo import reconstruct as rec
    from simtomo.io.geometry_json import read_geometry

    geometry = read_geometry(data / "standard.geometry.json")
    if case == "warm-up":
        with _Timed() as t:
            proj = np.load(data / "standard.log.npy", mmap_mode="r")[:, :256, :256]
            small = geometry.replace(image_shape=(256, 256))
            proj = np.ascontiguousarray(proj)
            rec.reconstruct(proj, small, (8, 32, 32), voxel_size_px=BINNING, workers=workers)
            rec.reconstruct(proj, small, (8, 32, 32), voxel_size_px=BINNING, method="sirt", iterations=2, workers=workers)
            rec.reproject(np.ones((8, 32, 32), dtype=np.float32), small, voxel_size_px=BINNING, views=[0], workers=workers)
        return {"wall_s": t.wall, "cpu_s": t.cpu}

    proj = np.load(data / "standard.log.npy")
    volume = np.load(data / "wbp.npy") if case == "reproject" else None
    process_before = _status_kb("VmHWM")
    reset = _reset_peak()
    out: dict = {}

    def peaks() -> None:
        # read before any checking below allocates more
        hwm = _status_kb("VmHWM") or 0
        out["peak_call_mb"] = hwm / 1024 if reset else None
        out["peak_process_mb"] = max(hwm, process_before or 0) / 1024

    if case == "wbp":
        with _Timed() as t:
            vol = rec.reconstruct(proj, geometry, SHAPE, voxel_size_px=BINNING, workers=workers)
        peaks()
        np.save(data / "wbp.npy", vol)
    elif case == "wbp-reference":
        with _Timed() as t:
            vol = rec._reference_wbp(proj, geometry, SHAPE, voxel_size_px=BINNING)
        peaks()
        wbp_path = data / "wbp.npy"
        if wbp_path.exists():
            fast = np.load(wbp_path)
            out["max_rel_diff"] = float(np.abs(vol - fast).max() / np.abs(vol).max())
    elif case == "reproject":
        with _Timed() as t:
            images = rec.reproject(volume, geometry, voxel_size_px=BINNING, workers=workers)
        peaks()
        out["correlation_with_data"] = float(np.mean([np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(images, proj)]))
    elif case == "sirt":
        stamps: list[float] = []

        class Stamp(logging.Handler):
            def emit(self, record):
                if record.getMessage().startswith("SIRT iteration"):
                    stamps.append(time.perf_counter())

        logger = logging.getLogger("simtomo.reconstruct")
        logger.setLevel(logging.INFO)
        logger.addHandler(Stamp())
        with _Timed() as t:
            rec.reconstruct(proj, geometry, SHAPE, voxel_size_px=BINNING, method="sirt", iterations=2, workers=workers)
        peaks()
        out["setup_and_first_s"] = stamps[0] - t.wall0
        out["iteration_s"] = stamps[1] - stamps[0]
    else:
        raise SystemExit(f"unknown case {case!r}")
    out.update(wall_s=t.wall, cpu_s=t.cpu)
    return out


def _run_child(case: str, data: Path, workers: int | None) -> dict:
    cmd = [sys.executable, __file__, "--child", case, "--data", str(data)]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"case {case} failed (exit {proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _prepare(data: Path) -> None:
    """Simulate ``standard`` and store its line integrals and true geometry in ``data``."""
    import simtomo
    from simtomo.io.geometry_json import write_geometry
    from simtomo.reconstruct import log_intensity

    series = simtomo.simulate("standard", seed=0)
    np.save(data / "standard.log.npy", log_intensity(series.stack))
    write_geometry(data / "standard.geometry.json", series.geometry)


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="cases to run (default: all)")
    parser.add_argument("--skip-reference", action="store_true", help="leave out wbp-reference (about 1.5 s per view)")
    parser.add_argument("--workers", type=int, default=None, help="threads for the numba kernels (default: all cores)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child is not None:
        print(json.dumps(_child(args.child, args.data, args.workers)))
        return 0

    cases = [c for c in args.cases if not (args.skip_reference and c == "wbp-reference")]
    if "reproject" in cases and "wbp" not in cases:
        cases.insert(0, "wbp")  # reproject projects the wbp volume
    results: dict[str, dict] = {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="simtomo-recon-bench-") as tmp:
        data = Path(tmp)
        print("simulating standard ...", file=sys.stderr, flush=True)
        _prepare(data)
        try:
            for case in ["warm-up", *cases]:
                print(f"running {case} ...", file=sys.stderr, flush=True)
                results[case] = _run_child(case, data, args.workers)
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            return 1
    load_after = os.getloadavg()

    ref = results.get("wbp-reference")
    print(
        f"simtomo.reconstruct, standard (61 x 1024^2) -> {SHAPE} at voxel size {BINNING} px, "
        f"{os.cpu_count()} cores, workers={args.workers or 'all'}; "
        f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after\n"
    )
    head = ["case", "wall s", "CPU s", "peak RSS (call) MB", "peak RSS (process) MB", "reference / this", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for case, r in results.items():
        notes = []
        ratio = "-"
        if case == "warm-up":
            notes.append("first calls on a small case: numba cache load or compile")
        if case == "wbp":
            missed = []
            if r["wall_s"] >= WBP_TARGET_S:
                missed.append(f"time >= {WBP_TARGET_S:g} s")
            if r["peak_call_mb"] is not None and r["peak_call_mb"] >= RSS_TARGET_MB:
                missed.append(f"RSS >= {RSS_TARGET_MB:g} MB")
            notes.append("target " + (f"MISSED ({', '.join(missed)})" if missed else "ok"))
            if ref is not None:
                ratio = f"{ref['wall_s'] / r['wall_s']:.1f}x wall, {ref['cpu_s'] / r['cpu_s']:.1f}x CPU"
        if case == "wbp-reference" and "max_rel_diff" in r:
            notes.append(f"max |ref - wbp| / max |ref| = {r['max_rel_diff']:.1e}")
        if case == "reproject":
            notes.append(f"mean per-view correlation with the data {r['correlation_with_data']:.3f}")
        if case == "sirt":
            notes.append(f"set-up + first iteration {r['setup_and_first_s']:.2f} s, one more iteration {r['iteration_s']:.2f} s")
        row = [case, _fmt(r["wall_s"]), _fmt(r["cpu_s"]), _fmt(r.get("peak_call_mb"), ".0f"), _fmt(r.get("peak_process_mb"), ".0f"), ratio, "; ".join(notes)]
        lines.append("| " + " | ".join(row) + " |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

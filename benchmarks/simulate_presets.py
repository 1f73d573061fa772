"""Wall time, peak memory and output size of ``simtomo simulate`` for the named presets.

How to run (from the repository root, in the project's virtual environment)::

    python benchmarks/simulate_presets.py                        # tiny and standard
    python benchmarks/simulate_presets.py --presets large        # the scale test (~4 GB written)
    python benchmarks/simulate_presets.py --phantom-bin 4 --out /tmp/sims   # keep the files

Each preset is simulated by the real command line, ``python -m simtomo.cli
simulate --preset P --out DIR/P``, in a child process of its own, so the time
includes start-up and writing and the memory is that of one simulation. The
``tiny`` preset is run once beforehand, unmeasured, so that numba's on-disk
cache is compiled and no measured run pays for compilation. The script prints
a Markdown table to stdout.

Peak memory is the child's peak resident set size: from ``/usr/bin/time -v``
where it exists (exact), else from polling ``VmHWM`` in ``/proc/PID/status``
every 10 ms (the kernel keeps VmHWM as the high-water mark, so polling can only
miss growth in the child's last few milliseconds). ``getrusage(RUSAGE_CHILDREN)``
is not used: it reports the largest of all children so far, not this one's.

Targets (DESIGN.md section 6 and pyproject's numba note), on a 2-core machine:

- ``standard`` (61 x 1024 x 1024): under 10 s and under 2 GB peak RSS;
- ``large`` (61 x 4096 x 4096, ~4 GB of output): must complete within 24 GB,
  which it can only do by streaming views to disk (``simulate_to_files``).

The ``target`` column says whether a preset with a target met it. The exit
status is 1 if any simulation failed, else 0 (a missed target is reported, not
an error: speed is measured here, never asserted).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import mrcfile

TIME_BIN = "/usr/bin/time"

# preset: (max wall time s, max peak RSS GB); None where only completion counts
TARGETS: dict[str, tuple[float | None, float]] = {
    "standard": (10.0, 2.0),
    "standard-nobeads": (10.0, 2.0),
    "large": (None, 24.0),
}


@dataclass
class Run:
    """One measured simulation."""

    preset: str
    views: int
    height: int
    width: int
    wall_s: float
    peak_rss_bytes: int | None
    output_bytes: int

    def target(self) -> str:
        """``ok``, ``MISSED (...)`` or ``-`` (no target for this preset)."""
        if self.preset not in TARGETS:
            return "-"
        max_s, max_gb = TARGETS[self.preset]
        missed = []
        if max_s is not None and self.wall_s >= max_s:
            missed.append(f"time >= {max_s:g} s")
        if self.peak_rss_bytes is not None and self.peak_rss_bytes >= max_gb * 1e9:
            missed.append(f"RSS >= {max_gb:g} GB")
        return f"MISSED ({', '.join(missed)})" if missed else "ok"


def _simulate_command(preset: str, out: Path, phantom_bin: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "simtomo.cli", "-q", "simulate", "--preset", preset, "--out", str(out)]
    if phantom_bin is not None:
        cmd += ["--phantom-bin", str(phantom_bin)]
    return cmd


def _poll_vmhwm(pid: int, result: list[int], stop: threading.Event) -> None:
    """Keep the last ``VmHWM`` (bytes) of ``pid`` in ``result[0]`` until ``stop`` is set or the process is gone."""
    path = f"/proc/{pid}/status"
    while not stop.is_set():
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        result[0] = int(line.split()[1]) * 1024  # reported in kB
                        break
        except (FileNotFoundError, ProcessLookupError):
            return
        stop.wait(0.01)


def _run_child(cmd: list[str]) -> tuple[float, int | None, str]:
    """Run ``cmd``; return wall time, peak RSS of the child in bytes (None if unknown), and its stderr.

    Raises
    ------
    subprocess.CalledProcessError
        If the child exits non-zero.
    """
    if os.access(TIME_BIN, os.X_OK):
        with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
            # -o keeps time's report out of the child's stderr
            start = time.perf_counter()
            proc = subprocess.run([TIME_BIN, "-v", "-o", report.name, *cmd], capture_output=True, text=True)
            wall = time.perf_counter() - start
            peak = None
            for line in Path(report.name).read_text().splitlines():
                if "Maximum resident set size" in line:
                    peak = int(line.rsplit(":", 1)[1]) * 1024  # GNU time reports kB
    else:
        start = time.perf_counter()
        proc_p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        hwm = [0]
        stop = threading.Event()
        poller = threading.Thread(target=_poll_vmhwm, args=(proc_p.pid, hwm, stop), daemon=True)
        poller.start()
        stdout, stderr = proc_p.communicate()
        wall = time.perf_counter() - start
        stop.set()
        poller.join()
        proc = subprocess.CompletedProcess(cmd, proc_p.returncode, stdout, stderr)
        peak = hwm[0] or None
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd, proc.stdout, proc.stderr)
    return wall, peak, proc.stderr


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(preset: str, out_root: Path, phantom_bin: int | None) -> Run:
    """Simulate ``preset`` into ``out_root / preset`` in a child process and measure it."""
    out = out_root / preset
    if out.exists():
        shutil.rmtree(out)  # so the size column counts this run's files only
    wall, peak, _ = _run_child(_simulate_command(preset, out, phantom_bin))
    # Shape from the written stack's header: what was produced, not what was asked for.
    with mrcfile.open(out / f"{preset}.mrc", header_only=True, permissive=True) as mrc:
        nx, ny, nz = (int(mrc.header[k]) for k in ("nx", "ny", "nz"))
    return Run(preset, nz, ny, nx, wall, peak, _dir_bytes(out))


def markdown_table(runs: list[Run], phantom_bin: int | None) -> str:
    """The runs as a Markdown table (a phantom-bin column only when a phantom was written)."""
    head = ["preset", "views", "image size", "wall time s", "peak RSS MB", "output MB"]
    if phantom_bin is not None:
        head.append("phantom bin")
    head.append("target")
    rows = []
    for r in runs:
        rss = f"{r.peak_rss_bytes / 1e6:.0f}" if r.peak_rss_bytes is not None else "n/a"
        row = [r.preset, str(r.views), f"{r.width} x {r.height}", f"{r.wall_s:.2f}", rss, f"{r.output_bytes / 1e6:.1f}"]
        if phantom_bin is not None:
            row.append(str(phantom_bin))
        row.append(r.target())
        rows.append(row)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Measure the presets and print the table; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "standard"], metavar="P", help="presets to measure (default: tiny standard)")
    parser.add_argument("--out", type=Path, default=None, help="keep the outputs in DIR/PRESET (default: a temporary directory, removed)")
    parser.add_argument("--phantom-bin", type=int, default=None, metavar="N", help="also write the phantom at binning N (adds a column)")
    args = parser.parse_args(argv)

    out_root = args.out or Path(tempfile.mkdtemp(prefix="simtomo-bench-"))
    out_root.mkdir(parents=True, exist_ok=True)
    try:
        # Warm numba's on-disk cache so no measured run includes compilation.
        _run_child(_simulate_command("tiny", out_root / "_warmup", args.phantom_bin))
        shutil.rmtree(out_root / "_warmup", ignore_errors=True)
        runs = []
        for p in args.presets:
            print(f"simulating {p} ...", file=sys.stderr, flush=True)
            runs.append(measure(p, out_root, args.phantom_bin))
    except subprocess.CalledProcessError as exc:
        print(f"simulate failed (exit {exc.returncode}): {' '.join(exc.cmd)}\n{exc.stderr}", file=sys.stderr)
        return 1
    finally:
        if args.out is None:
            shutil.rmtree(out_root, ignore_errors=True)
    print(f"simtomo simulate, {os.cpu_count()} cores, peak RSS from {'/usr/bin/time -v' if os.access(TIME_BIN, os.X_OK) else '/proc VmHWM polling'}\n")
    print(markdown_table(runs, args.phantom_bin))
    return 0


if __name__ == "__main__":
    sys.exit(main())

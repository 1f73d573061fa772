"""Running an experiment: parallel, resumable, loss-free.

:func:`run_experiment` expands an :class:`~simtomo.experiment.Experiment`
into units of work, one per (setting, seed): :func:`run_unit` simulates the
series once, aligns it with each aligner and scores each alignment, giving one
row per (setting, seed, aligner) *cell*. A failing aligner (any exception) is
a row with ``status = "failed"`` and the error text; the sweep goes on.

Results directory ``DIR``::

    DIR/cells/<key>.json    one finished cell, written atomically when its unit completes
    DIR/results.parquet     the table of every finished cell of the grid (and DIR/results.csv),
                            rebuilt atomically at most every ``table_interval_s`` and at the end
    DIR/experiment.toml     a copy of the experiment file
    DIR/run.json            experiment, resolved settings, versions, executor, counts

Cell keys (:func:`simtomo.experiment.cell_key`) hash the full configuration of
a cell and the code version, so running the same command again skips every
finished cell (failed ones too, unless ``retry_failed``); killing the runner
loses at most the units in flight.

Executors: ``workers = 0`` runs the units in this process (debugging);
otherwise a local pool of ``workers`` processes started with the ``spawn``
method (no fork after threads), at most ``workers`` units in flight; a unit
whose worker process dies (out of memory, crash) is rerun alone and, if its
worker dies again, recorded as failed. ``scheduler = ADDRESS`` submits the
same :func:`run_unit` to a dask.distributed scheduler.

Columns of the results table (one row per cell)
-----------------------------------------------
``key`` (the cell key), ``experiment``, ``setting_index``, ``setting`` (label,
``"base"`` without sweep), ``seed``, ``aligner`` (the variant's label),
``aligner_name``, ``aligner_group`` (the experiment entry), ``aligner_order``,
``status`` (``ok`` | ``failed``), ``error_stage`` (``simulate`` | ``align`` |
``score`` | ``worker``), ``error`` (exception type and message); one column
per swept parameter (``section.field``) and swept aligner parameter
(``aligner.NAME``); ``aligner_params`` (JSON, defaults included),
``with_images``, ``preset``; every score of
:meth:`simtomo.score.Scores.to_row` (``alignment_error_rms_px``,
``residual_rms_px``, ``resolution_A``, ... and the list
``alignment_error_per_view_px``) with ``seconds_score``; the lists ``tilt_deg``
(nominal, per view), ``residual_per_view_px`` and, with images, the curves
``fsc_frequency_per_px``, ``fsc_n_voxels``, ``fsc_nyquist_per_px``,
``fsc_values``, ``fsc_true_geometry_values``, ``transfer_values``;
``seconds_simulate``, ``seconds_align`` (the ``align`` call alone),
``peak_rss_simulate_mb``, ``peak_rss_mb``, ``peak_rss_scope``; every
simulation parameter as ``section.field``; ``code_version``, ``host``,
``pid``, ``finished_at``. In the CSV, list columns are JSON text. A cell file
also keeps the ``traceback`` of a failure.

Peak memory (``peak_rss_mb``) is the resident-set high-water mark of the
process running the unit, reset before each step on Linux
(``/proc/self/clear_refs``): the simulation for ``peak_rss_simulate_mb``,
alignment plus scoring of each cell (the series in memory included) for
``peak_rss_mb``. Where the reset is not possible ``peak_rss_scope`` says
``process`` (the lifetime peak of the worker). Units sharing a process
(dask threads) share the mark.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import multiprocessing
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import traceback
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

import simtomo
from simtomo.errors import ConfigError, SimtomoError
from simtomo.experiment import YARDSTICKS, Experiment, Unit, code_version, setting_label
from simtomo.io._json import write_text_atomic

__all__ = [
    "CellTask",
    "UnitTask",
    "RunSummary",
    "TIMING_COLUMNS",
    "run_experiment",
    "run_unit",
    "describe_grid",
    "perturbed_truth",
    "load_results",
    "load_run_info",
    "write_table",
    "Progress",
]

log = logging.getLogger(__name__)

CELL_FORMAT = "simtomo.cell/1"
RUN_FORMAT = "simtomo.run/1"

#: Columns that differ between two runs of the same cells (time, memory, where and when).
TIMING_COLUMNS = (
    "seconds_simulate",
    "seconds_align",
    "seconds_score",
    "peak_rss_mb",
    "peak_rss_simulate_mb",
    "peak_rss_scope",
    "host",
    "pid",
    "finished_at",
)

# Column order of the results table; the rest follow in first-seen order.
_FRONT = (
    "key",
    "experiment",
    "setting_index",
    "setting",
    "seed",
    "aligner",
    "aligner_name",
    "aligner_group",
    "aligner_order",
    "status",
    "error_stage",
    "error",
)
_SCORE_DROP = ("name", "aligner", "seconds")  # of Scores.to_row(): the cell has its own
_PERTURB_STREAM = 0x5EED_7A6E  # a fixed stream id: the yardstick's shifts never share draws with the simulation


# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class CellTask:
    """What a worker needs to compute one cell (plain data, picklable)."""

    key: str
    label: str
    name: str
    params: dict[str, Any]
    resolved_params: dict[str, Any]
    group: str
    swept: tuple[tuple[str, Any], ...]
    order: int


@dataclass(frozen=True)
class UnitTask:
    """One simulation and the cells computed on it (plain data, picklable)."""

    experiment: str
    setting_index: int
    setting: str
    swept: tuple[tuple[str, Any], ...]
    config: dict[str, Any]
    seed: int
    score: dict[str, Any]
    cells: tuple[CellTask, ...]
    version: str
    threads: int | None = None


def _task(experiment: Experiment, unit: Unit, version: str, threads: int | None, keys: set[str] | None = None) -> UnitTask:
    from simtomo.config import config_to_dict

    cells = tuple(
        CellTask(
            key=c.key,
            label=c.aligner.label,
            name=c.aligner.name,
            params=dict(c.aligner.params),
            resolved_params=dict(c.aligner.resolved_params),
            group=c.aligner.group,
            swept=c.aligner.swept,
            order=c.aligner.order,
        )
        for c in unit.cells
        if keys is None or c.key in keys
    )
    return UnitTask(
        experiment=experiment.name,
        setting_index=unit.setting.index,
        setting=unit.setting.label,
        swept=unit.setting.values,
        config=config_to_dict(unit.setting.config),
        seed=unit.seed,
        score=experiment.score.to_dict(),
        cells=cells,
        version=version,
        threads=threads,
    )


# --------------------------------------------------------------------------- the unit of work


def perturbed_truth(geometry, sigma_px: float, seed: int):
    """The yardstick: the TRUE geometry plus random per-view shifts of ``sigma_px`` per axis.

    Not an aligner (it reads the truth). The shift pattern depends on the seed
    only, so the sigmas of one seed are the same pattern scaled. Its
    gauge-free alignment error is close to ``sqrt(2) * sigma_px``.

    Returns
    -------
    AlignmentResult
    """
    from simtomo.alignment import AlignmentResult

    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _PERTURB_STREAM]))
    shifts = rng.standard_normal((geometry.n_views, 2)) * float(sigma_px)
    return AlignmentResult(
        geometry=geometry.replace(shift_px=geometry.shift_px + shifts),
        info={"aligner": "perturbed-truth", "sigma_px": float(sigma_px)},
    )


def _reset_peak() -> str:
    """Reset the RSS high-water mark; return the scope the next reading covers."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "step"
    except OSError:
        return "process"


def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 1024.0 / (1024.0 if sys.platform == "darwin" else 1.0)
    except (ImportError, OSError):  # pragma: no cover - no resource module
        return math.nan


def _plain(value: Any) -> Any:
    """numpy scalars and arrays to Python values."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


def _limit_threads(threads: int) -> None:
    # n worker processes on n cores: each uses its share, not every core
    try:
        import numba

        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    except (ImportError, ValueError):  # pragma: no cover
        pass


def _score_columns(scores, observation, result) -> dict[str, Any]:
    row = {k: v for k, v in scores.to_row().items() if k not in _SCORE_DROP}
    row["seconds_score"] = scores.seconds
    row["tilt_deg"] = observation.tilt_deg
    residuals = getattr(result, "residuals", None)
    row["residual_per_view_px"] = None if residuals is None else residuals.per_view_rms_px
    curves = {"fsc": scores.fsc, "fsc_true_geometry": scores.fsc_true_geometry, "transfer": scores.transfer}
    if scores.fsc is not None:
        row["fsc_frequency_per_px"] = scores.fsc.frequency_per_px
        row["fsc_n_voxels"] = scores.fsc.n_voxels
        row["fsc_nyquist_per_px"] = scores.fsc.nyquist_per_px
    for name, curve in curves.items():
        if curve is not None:
            row[f"{name}_values"] = curve.values
    return _plain(row)


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= 2000 else text[:1997] + "..."


def _base_row(task: UnitTask, cell: CellTask) -> dict[str, Any]:
    row: dict[str, Any] = {
        "key": cell.key,
        "experiment": task.experiment,
        "setting_index": task.setting_index,
        "setting": task.setting,
        "seed": task.seed,
        "aligner": cell.label,
        "aligner_name": cell.name,
        "aligner_group": cell.group,
        "aligner_order": cell.order,
        "status": "ok",
        "error_stage": "",
        "error": "",
    }
    for path, value in task.swept:
        row[path] = value
    for param, value in cell.swept:
        row[f"aligner.{param}"] = value
    row["aligner_params"] = json.dumps(cell.resolved_params, sort_keys=True)
    row["with_images"] = bool(task.score.get("with_images"))
    row["preset"] = task.config.get("name", "")
    for section, values in task.config.items():
        if isinstance(values, dict):
            for name, value in values.items():
                row.setdefault(f"{section}.{name}", value)
    row["code_version"] = task.version
    return row


def _finish(row: dict[str, Any]) -> dict[str, Any]:
    row["host"] = socket.gethostname()
    row["pid"] = os.getpid()
    row["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return row


def _failed(row: dict[str, Any], stage: str, exc: BaseException) -> dict[str, Any]:
    row.update(
        status="failed",
        error_stage=stage,
        error=_error_text(exc),
        traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-8000:],
    )
    return row


def run_unit(task: UnitTask) -> list[dict[str, Any]]:
    """Simulate one (setting, seed), align with each aligner of its cells, score each.

    Never raises for a problem of a cell: a failing simulation, aligner or
    scoring gives failed rows (``status``, ``error_stage``, ``error``,
    ``traceback``). This is the function the local pool and dask run.

    Returns
    -------
    list of dict
        One JSON-ready row per cell, in the order of ``task.cells``.
    """
    # imported here, not at module level, so that a pool worker sets its thread count first;
    # a failure to import is a broken installation, not a result of the cell: it propagates
    from simtomo import registry
    from simtomo.config import config_from_dict
    from simtomo.score import score, scoring_reference
    from simtomo.simulate import simulate

    if task.threads:
        _limit_threads(task.threads)
    scope = _reset_peak()
    start = time.perf_counter()
    try:
        config = config_from_dict(task.config, source=f"setting {task.setting}")
        series = simulate(config, task.seed, workers=task.threads)
    except Exception as exc:  # any failure of the simulation fails every cell of the unit
        return [_finish(_failed(_base_row(task, cell), "simulate", exc)) for cell in task.cells]
    seconds_simulate = time.perf_counter() - start
    peak_simulate = _peak_rss_mb()
    observation = series.observation()
    truth = series.truth()
    options = task.score
    reference = None  # phantom and true-geometry reconstruction: built once, shared by the unit's cells
    rows = []
    for cell in task.cells:
        row = _base_row(task, cell)
        row["seconds_simulate"] = seconds_simulate
        row["peak_rss_simulate_mb"] = peak_simulate
        scope = _reset_peak()
        stage = "align"
        try:
            t0 = time.perf_counter()
            if cell.name in YARDSTICKS:
                result = perturbed_truth(series.geometry, cell.resolved_params["sigma_px"], task.seed)
            else:
                result = registry.get(cell.name, **cell.params).align(observation)
            row["seconds_align"] = time.perf_counter() - t0
            stage = "score"
            binning, method = int(options.get("binning", 2)), str(options.get("method", "wbp"))
            if options.get("with_images") and reference is None:
                reference = scoring_reference(truth, series.stack, binning=binning, method=method)
            scores = score(
                truth,
                result,
                series.stack if options.get("with_images") else None,
                binning=binning,
                method=method,
                name=task.setting,
                reference=reference,
            )
            row.update(_score_columns(scores, observation, result))
        except Exception as exc:  # an aligner may fail in any way; the sweep goes on
            _failed(row, stage, exc)
        row["peak_rss_mb"] = _peak_rss_mb()
        row["peak_rss_scope"] = scope
        rows.append(_finish(row))
    return rows


def _dead_rows(task: UnitTask, message: str) -> list[dict[str, Any]]:
    rows = []
    for cell in task.cells:
        row = _failed(_base_row(task, cell), "worker", RuntimeError(message))
        row["traceback"] = ""
        rows.append(_finish(row))
    return rows


# --------------------------------------------------------------------------- executors


def _worker_init() -> None:
    """Pool worker setup: die with the runner, leave Ctrl-C to it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: a killed runner leaves no busy orphans
    if os.getppid() == 1:  # the runner died before prctl took effect
        os._exit(1)


def _new_pool(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init
    )


def _kill_pool(pool: ProcessPoolExecutor) -> None:
    # shutdown() would wait for the units in flight; on an interrupt they are abandoned
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        with contextlib.suppress(Exception):
            proc.kill()
    pool.shutdown(wait=False, cancel_futures=True)


def _inline_results(tasks: Iterable[UnitTask]) -> Iterator[tuple[UnitTask, list[dict]]]:
    for task in tasks:
        yield task, run_unit(task)


def _run_alone(task: UnitTask, fn=run_unit) -> list[dict]:
    pool = _new_pool(1)
    try:
        return pool.submit(fn, task).result()
    except BrokenProcessPool:
        log.warning("unit %s seed %d: its worker process died again; recording its cells as failed", task.setting, task.seed)
        return _dead_rows(task, "the worker process died while running this unit (killed by the system, e.g. out of memory, or crashed)")
    finally:
        pool.shutdown(wait=True)


def _pool_results(tasks: Iterable[UnitTask], workers: int, fn=run_unit) -> Iterator[tuple[UnitTask, list[dict]]]:
    """Run ``fn`` (:func:`run_unit`; tests pass a stand-in) on each task in a pool of spawned processes."""
    pending = deque(tasks)
    while pending:
        pool = _new_pool(workers)
        in_flight: dict[Any, UnitTask] = {}
        broken: list[UnitTask] = []
        clean = False
        try:
            while pending or in_flight:
                while pending and len(in_flight) < workers and not broken:
                    task = pending.popleft()
                    in_flight[pool.submit(fn, task)] = task
                if not in_flight:
                    break
                done, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
                for fut in done:
                    task = in_flight.pop(fut)
                    try:
                        rows = fut.result()
                    except BrokenProcessPool:
                        broken.append(task)
                        continue
                    yield task, rows
                if broken:
                    for fut, task in list(in_flight.items()):
                        try:
                            rows = fut.result()
                        except BrokenProcessPool:
                            broken.append(task)
                            continue
                        yield task, rows
                    in_flight.clear()
                    break
            clean = True
        finally:
            if clean:
                pool.shutdown(wait=True)
            else:
                _kill_pool(pool)
        # Units in flight when a worker died: rerun each alone to find the one that kills its worker.
        for task in broken:
            log.warning("a worker process died; rerunning unit %s seed %d alone", task.setting, task.seed)
            yield task, _run_alone(task, fn)


def _dask_results(tasks: Iterable[UnitTask], address: str, timeout_s: float) -> Iterator[tuple[UnitTask, list[dict]]]:
    try:
        from distributed import Client, as_completed
        from distributed.scheduler import KilledWorker
    except ImportError:
        raise SimtomoError("--scheduler needs dask.distributed; install it with: pip install 'simtomo[dask]'") from None
    try:
        client = Client(address, timeout=f"{timeout_s}s", set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        raise SimtomoError(f"cannot connect to the dask scheduler at {address!r}: {exc}") from None
    try:
        capacity = 2 * max(1, sum(client.nthreads().values()))
        pending = deque(tasks)
        by_key: dict[str, UnitTask] = {}

        def submit():
            task = pending.popleft()
            fut = client.submit(run_unit, task, pure=False, key=f"simtomo-unit-{task.cells[0].key}-{uuid.uuid4().hex[:8]}")
            by_key[fut.key] = task
            return fut

        if not pending:
            return
        # the client's loop: without it as_completed looks for a global default client (set_as_default=False)
        queue = as_completed([submit() for _ in range(min(capacity, len(pending)))], loop=client.loop)
        for fut in queue:
            task = by_key.pop(fut.key)
            try:
                rows = fut.result()
            except KilledWorker:
                rows = _dead_rows(task, "dask workers died repeatedly while running this unit (out of memory, or crashed)")
            except Exception as exc:
                raise SimtomoError(
                    f"dask scheduler {address}: unit {task.setting} seed {task.seed} could not run on the cluster "
                    f"(is simtomo installed on the workers?): {type(exc).__name__}: {exc}"
                ) from exc
            finally:
                fut.release()
            yield task, rows
            if pending:
                queue.add(submit())
    finally:
        client.close()


# --------------------------------------------------------------------------- progress


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """A line-based progress bar: cells done, failed, remaining and ETA, one log line per update.

    Parameters
    ----------
    total : int
        Cells in the grid.
    done, failed : int
        Cells already finished before this run (and how many of those failed).
    planned : int
        Cells this run will compute.
    """

    def __init__(self, total: int, done: int, failed: int, planned: int, *, width: int = 24) -> None:
        self.total = total
        self.done = done
        self.failed = failed
        self.planned = planned
        self.computed = 0
        self.width = width
        self.start = time.monotonic()

    def advance(self, rows: list[dict[str, Any]]) -> str:
        """Count a finished unit's rows; return (and log) the progress line."""
        self.computed += len(rows)
        self.done += len(rows)
        self.failed += sum(r.get("status") != "ok" for r in rows)
        line = self.line()
        log.info("%s", line)
        return line

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        left = max(self.planned - self.computed, 0)
        eta = elapsed / self.computed * left if self.computed else math.nan
        filled = int(round(self.width * self.done / self.total)) if self.total else self.width
        bar = "#" * filled + "-" * (self.width - filled)
        return (
            f"[{bar}] {self.done}/{self.total} cells, {self.failed} failed, {self.total - self.done} remaining"
            f" | this run {self.computed}/{self.planned} in {_duration(elapsed)}, ETA {_duration(eta) if left else '0s'}"
        )


# --------------------------------------------------------------------------- results table


def _json_default(value: Any) -> Any:
    plain = _plain(value)
    if plain is value:
        raise TypeError(f"{type(value).__name__} is not JSON-able")
    return plain


def _write_cell(cells_dir: Path, row: dict[str, Any]) -> None:
    document = {"format": CELL_FORMAT, "key": row["key"], "row": row}
    # NaN and Infinity are written as Python's json does (a resolution of inf means nothing resolved)
    write_text_atomic(cells_dir / f"{row['key']}.json", json.dumps(document, default=_json_default) + "\n")


def _read_cell(path: Path, key: str) -> dict[str, Any] | None:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        if document.get("format") != CELL_FORMAT or document.get("key") != key or document["row"].get("key") != key:
            raise ValueError("not a cell of this key")
        return document["row"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
        log.warning("%s: unreadable cell (%s); it will be recomputed", path, exc)
        return None


def _frame(rows: list[dict[str, Any]]):
    import pandas as pd

    rows = [{k: v for k, v in r.items() if k != "traceback"} for r in rows]
    df = pd.DataFrame.from_records(rows)
    if df.empty:
        return df
    front = [c for c in _FRONT if c in df.columns]
    df = df[front + [c for c in df.columns if c not in front]]
    for col in df.columns:
        if df[col].dtype == object and any(isinstance(v, (list, tuple, np.ndarray)) for v in df[col]):
            # a failed row has no curve: None, not NaN, so the column stays a list column
            df[col] = [list(v) if isinstance(v, (list, tuple, np.ndarray)) else None for v in df[col]]
        elif df[col].dtype == object and len({type(v) for v in df[col] if v is not None and v == v}) > 1:
            # e.g. a parameter of the same name swept as numbers by one aligner and as words by another
            df[col] = [None if v is None or v != v else str(v) for v in df[col]]
    return df.sort_values(["setting_index", "seed", "aligner_order"], kind="stable").reset_index(drop=True)


def write_table(rows: list[dict[str, Any]], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``results.parquet`` and ``results.csv`` (list columns as JSON) atomically.

    Returns
    -------
    (parquet path, csv path)
    """
    from simtomo.io._json import temporary_path

    out = Path(out_dir)
    df = _frame(rows)
    paths = (out / "results.parquet", out / "results.csv")
    for path in paths:
        tmp = temporary_path(path)
        try:
            if path.suffix == ".parquet":
                df.to_parquet(tmp, index=False)
            else:
                csv = df.copy()
                for col in csv.columns:
                    if csv[col].dtype == object and any(isinstance(v, list) for v in csv[col]):
                        csv[col] = [json.dumps(v) if isinstance(v, list) else "" for v in csv[col]]
                csv.to_csv(tmp, index=False)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    return paths


def load_results(out_dir: str | Path):
    """The results table of a run directory as a pandas DataFrame.

    Raises
    ------
    FileFormatError
        When ``DIR/results.parquet`` is missing or unreadable.
    """
    import pandas as pd

    from simtomo.errors import FileFormatError

    path = Path(out_dir) / "results.parquet"
    if not path.is_file():
        raise FileFormatError(f"{path}: no results table; run `simtomo run EXPERIMENT --out {out_dir}` first")
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises its own types for a damaged file
        raise FileFormatError(f"{path}: cannot read the results table: {type(exc).__name__}: {exc}") from None


def load_run_info(out_dir: str | Path) -> dict[str, Any]:
    """``DIR/run.json``: the experiment, its settings, versions and counts of the last run."""
    from simtomo.errors import FileFormatError
    from simtomo.io._json import load_json

    path = Path(out_dir) / "run.json"
    data = load_json(str(path))
    if not isinstance(data, dict) or data.get("format") != RUN_FORMAT or "experiment" not in data:
        raise FileFormatError(f"{path}: expected a run file with format {RUN_FORMAT!r} and an 'experiment' key")
    return data


# --------------------------------------------------------------------------- provenance


def _git_commit() -> dict[str, Any]:
    root = Path(simtomo.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout
        return {"commit": commit, "dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("simtomo", "numpy", "scipy", "numba", "pandas", "pyarrow", "matplotlib", "dask", "distributed"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def _experiment_info(experiment: Experiment) -> dict[str, Any]:
    from simtomo.config import config_to_dict

    return _plain(
        {
            "name": experiment.name,
            "description": experiment.description,
            "source": experiment.source,
            "cli_overrides": list(experiment.cli_overrides),
            "seeds": list(experiment.seeds),
            "preset": experiment.preset,
            "overrides": dict(experiment.overrides),
            "mode": experiment.mode,
            "axes": [{"path": a.path, "values": list(a.values)} for a in experiment.axes],
            "aligners": [
                {
                    "label": a.label,
                    "name": a.name,
                    "group": a.group,
                    "params": a.params,
                    "resolved_params": a.resolved_params,
                    "swept": [list(s) for s in a.swept],
                    "provider": a.provider,
                    "yardstick": a.is_yardstick,
                }
                for a in experiment.aligners
            ],
            "score": experiment.score.to_dict(),
            "settings": [
                {"index": s.index, "label": s.label, "values": dict(s.values), "config": config_to_dict(s.config)}
                for s in experiment.settings
            ],
        }
    )


# --------------------------------------------------------------------------- the runner


@dataclass(frozen=True)
class RunSummary:
    """What a call of :func:`run_experiment` did."""

    out_dir: Path
    total: int
    skipped: int
    computed: int
    failed: int
    remaining: int
    interrupted: bool = False

    @property
    def complete(self) -> bool:
        return self.remaining == 0 and not self.interrupted


def _check_out_dir(out: Path, experiment: Experiment) -> dict[str, Any] | None:
    path = out / "run.json"
    if not path.exists():
        return None
    try:
        previous = load_run_info(out)
    except SimtomoError as exc:
        raise ConfigError(f"{out}: holds a run.json this runner cannot read ({exc}); choose another --out") from None
    name = previous["experiment"].get("name")
    if name != experiment.name:
        raise ConfigError(
            f"{out}: holds results of experiment {name!r}, not {experiment.name!r}; choose another --out"
        )
    return previous


def run_experiment(
    experiment: Experiment,
    out_dir: str | Path,
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    limit: int | None = None,
    retry_failed: bool = False,
    table_interval_s: float = 10.0,
    connect_timeout_s: float = 20.0,
) -> RunSummary:
    """Run every unfinished cell of ``experiment`` and write the results to ``out_dir``.

    Parameters
    ----------
    experiment : Experiment
        From :func:`simtomo.experiment.load_experiment`.
    out_dir : path
        Results directory (created); see the module docstring for its layout.
    workers : int, optional
        Local worker processes (default: every core); 0 runs in this process.
    scheduler : str, optional
        Address of a dask.distributed scheduler; the units run there instead.
    limit : int, optional
        Run at most this many units (simulations) now; the rest stay pending.
    retry_failed : bool
        Recompute cells that finished with status "failed".
    table_interval_s : float
        Rebuild the results table at most this often while running (and at the end).
    connect_timeout_s : float
        How long to try to reach the dask scheduler.

    Returns
    -------
    RunSummary
    """
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise ConfigError(f"workers: expected an integer >= 0, got {workers!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit: expected an integer >= 1, got {limit!r}")
    out = Path(out_dir)
    cells_dir = out / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    previous = _check_out_dir(out, experiment)
    for tmp in cells_dir.glob(".*.tmp"):  # a runner killed while writing a cell leaves its temporary file
        with contextlib.suppress(OSError):
            tmp.unlink()

    version = code_version()
    units = experiment.units(version)
    cells = [c for u in units for c in u.cells]
    rows: dict[str, dict[str, Any]] = {}
    for cell in cells:
        row = _read_cell(cells_dir / f"{cell.key}.json", cell.key)
        if row is not None and not (retry_failed and row.get("status") != "ok"):
            rows[cell.key] = row
    skipped = len(rows)
    stale = len({p.stem for p in cells_dir.glob("*.json")} - {c.key for c in cells})
    if stale:
        log.info("%s: %d cells belong to another grid or code version; kept, not tabulated", cells_dir, stale)

    n_cpu = os.cpu_count() or 1
    n_workers = n_cpu if workers is None else workers
    if scheduler:
        executor, threads = f"dask scheduler {scheduler}", None
    elif n_workers == 0:
        executor, threads = "inline (this process)", None
    else:
        executor, threads = f"local pool of {n_workers} spawned processes", max(1, n_cpu // n_workers)
    todo = []
    for unit in units:
        keys = {c.key for c in unit.cells if c.key not in rows}
        if keys:
            todo.append(_task(experiment, unit, version, threads, keys))
    if limit is not None:
        todo = todo[:limit]
    planned = sum(len(t.cells) for t in todo)

    if experiment.text:
        write_text_atomic(out / "experiment.toml", experiment.text)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    info: dict[str, Any] = {
        "format": RUN_FORMAT,
        "experiment": _experiment_info(experiment),
        "code_version": version,
        "git": _git_commit(),
        "versions": _versions(),
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "cpu_count": n_cpu,
        "executor": executor,
        "started": started,
        "status": "running",
        "runs": (previous or {}).get("runs", []),
    }
    write_text_atomic(out / "run.json", json.dumps(info, indent=1, default=_json_default) + "\n")

    total = len(cells)
    progress = Progress(total, skipped, sum(r.get("status") != "ok" for r in rows.values()), planned)
    log.info(
        "%s: %d settings x %d seeds x %d aligners = %d cells; %d finished before, %d to compute in %d units (%s)",
        experiment.name,
        len(experiment.settings),
        len(experiment.seeds),
        len(experiment.aligners),
        total,
        skipped,
        planned,
        len(todo),
        executor,
    )

    def tabulate() -> None:
        write_table([rows[c.key] for c in cells if c.key in rows], out)

    if scheduler:
        results = _dask_results(todo, scheduler, connect_timeout_s)
    elif n_workers == 0:
        results = _inline_results(todo)
    else:
        results = _pool_results(todo, min(n_workers, max(1, len(todo))))

    computed = failed = 0
    interrupted = True
    last_table = time.monotonic()
    try:
        for _task_done, unit_rows in results:
            for row in unit_rows:
                _write_cell(cells_dir, row)
                rows[row["key"]] = row
            computed += len(unit_rows)
            failed += sum(r["status"] != "ok" for r in unit_rows)
            progress.advance(unit_rows)
            if time.monotonic() - last_table >= table_interval_s:
                tabulate()
                last_table = time.monotonic()
        interrupted = False
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()  # stops the executor (its finally) before the table is written
        tabulate()
        remaining = total - sum(1 for c in cells if c.key in rows)
        info.update(
            status="interrupted" if interrupted else ("complete" if remaining == 0 else "partial"),
            finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            counts={"cells": total, "skipped": skipped, "computed": computed, "failed": failed, "remaining": remaining},
        )
        info["runs"] = info["runs"] + [
            {
                "started": started,
                "finished": info["finished"],
                "executor": executor,
                "code_version": version,
                "computed": computed,
                "failed": failed,
                "status": info["status"],
            }
        ]
        write_text_atomic(out / "run.json", json.dumps(info, indent=1, default=_json_default) + "\n")
    log.info(
        "%s: %d cells computed (%d failed), %d skipped, %d remaining; table %s",
        experiment.name,
        computed,
        failed,
        skipped,
        remaining,
        out / "results.parquet",
    )
    return RunSummary(out, total, skipped, computed, failed, remaining, interrupted=False)


def describe_grid(experiment: Experiment) -> str:
    """A few lines describing the grid (for ``simtomo run --dry-run``)."""
    lines = [
        f"experiment {experiment.name}: {len(experiment.settings)} settings x {len(experiment.seeds)} seeds "
        f"x {len(experiment.aligners)} aligners = {experiment.n_cells} cells in {len(experiment.settings) * len(experiment.seeds)} simulations",
        f"  workload: preset {experiment.preset}"
        + (f" with {setting_label(experiment.overrides)}" if experiment.overrides else ""),
    ]
    for axis in experiment.axes:
        lines.append(f"  sweep {axis.path}: {', '.join(str(v) for v in axis.values)}")
    if experiment.axes:
        lines.append(f"  mode: {experiment.mode}")
    for a in experiment.aligners:
        kind = "yardstick" if a.is_yardstick else "aligner"
        params = ", ".join(f"{k}={v}" for k, v in a.params.items())
        lines.append(f"  {kind} {a.label}: {a.name}" + (f" ({params})" if params else ""))
    lines.append(f"  seeds: {', '.join(str(s) for s in experiment.seeds)}")
    opts = experiment.score
    lines.append(
        f"  scoring: {'with images (reconstructions at binning ' + str(opts.binning) + ', ' + opts.method + ')' if opts.with_images else 'alignment error only'}"
    )
    return "\n".join(lines)


"""Experiment files: a declarative sweep of simulations, aligners and seeds.

An experiment file ``experiments/NAME.toml`` holds::

    name = "dose"                       # defaults to the file name
    description = "Alignment accuracy against total dose."
    seeds = [0, 1, 2]                   # one simulation per (setting, seed)

    [workload]
    preset = "standard"                 # tiny | standard | standard-nobeads | large
    [workload.overrides]                # any "section.field" of the simulation config
    "beads.count" = 25                  #   (quoted dotted keys or nested tables)

    [sweep]
    mode = "product"                    # product (default) or zip
    [sweep.axes]
    "tilt.total_dose_e_per_A2" = [30, 60, 120, 240]
    "specimen.thickness_nm" = {start = 100, stop = 300, num = 3}   # ranges: num | step, log

    [[aligners]]                        # or, above the first [table]: aligners = "all" | ["nominal", ...]
    name = "fiducial"
    label = "fiducial, 20 beads"        # optional; unique per experiment
    params = {n_beads = 20}
    sweep = {n_beads = [5, 10, 20]}     # optional: one aligner variant per value

    [score]
    with_images = true                  # reconstruct and measure blur and resolution (slower)
    binning = 2
    method = "wbp"

Everything is checked by :func:`load_experiment` before anything runs:
unknown keys (with the nearest valid one), unregistered aligners and their
parameters (through the registry), values out of range for every grid point,
empty grids and bad seeds all raise :class:`~simtomo.errors.ConfigError`
naming the file and the key.

Ranges: ``{start, stop, num}`` gives ``num`` values from ``start`` to ``stop``
inclusive (geometrically spaced with ``log = true``); ``{start, stop, step}``
gives ``start, start + step, ...`` up to and including ``stop``.

The yardstick ``perturbed-truth``
---------------------------------
Besides registered aligners an experiment may list ``perturbed-truth`` with a
parameter ``sigma_px``: the TRUE geometry with independent random per-view
shifts of standard deviation ``sigma_px`` per axis added (the same shift pattern
for every sigma of a seed, scaled). It reads the ground truth, so it is not an
aligner and is never registered: it is a ruler of known misalignment, used to
measure what a given alignment error costs in resolution. Its gauge-free
alignment error is close to ``sqrt(2) * sigma_px`` (a 2-D RMS).

Cells and their keys
--------------------
The grid is settings (sweep points) x seeds x aligner variants; one *cell* is
one (setting, seed, aligner). Its key (:func:`cell_key`) is a hash of the
resolved simulation configuration, the seed, the aligner's name and full
parameters (defaults included) and provider, the score options and the code
version (:func:`code_version`): the same cell computed by the same code has the
same key on every machine; any change of any of these gives a new key, so a
resumed run never reuses a stale result.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import math
import os
import sys
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from importlib.util import find_spec
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import simtomo
from simtomo import registry
from simtomo.config import (
    PRESETS,
    SECTIONS,
    SimulationConfig,
    apply_overrides,
    config_to_dict,
    preset,
)
from simtomo.errors import ConfigError

__all__ = [
    "YARDSTICKS",
    "ScoreOptions",
    "Axis",
    "AlignerSpec",
    "Setting",
    "Cell",
    "Unit",
    "Experiment",
    "load_experiment",
    "parse_experiment",
    "parameter_paths",
    "cell_key",
    "code_version",
    "setting_label",
]

#: Pseudo-aligners the runner computes from the truth: name -> {parameter: (type, help)}.
#: They are yardsticks of known misalignment, never registered as aligners.
YARDSTICKS: dict[str, dict[str, tuple[type, str]]] = {
    "perturbed-truth": {
        "sigma_px": (float, "standard deviation per axis of the random per-view shifts added to the true geometry, px"),
    },
}

_TOP_KEYS = ("name", "description", "seeds", "workload", "sweep", "aligners", "score")
_WORKLOAD_KEYS = ("preset", "overrides")
_SWEEP_KEYS = ("mode", "axes")
_ALIGNER_KEYS = ("name", "label", "params", "sweep")
_SCORE_KEYS = ("with_images", "binning", "method")
_RANGE_KEYS = ("start", "stop", "num", "step", "log")
_MODES = ("product", "zip")
_METHODS = ("wbp", "sirt")

# Modules that only present results (tables, figures, command line): editing them
# does not change any number a cell holds, so they do not enter the code version.
_PRESENTATION_MODULES = frozenset(
    {"simtomo/report.py", "simtomo/regress.py", "simtomo/cli.py", "simtomo/cli_experiments.py", "simtomo/figures.py"}
)


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class ScoreOptions:
    """How each cell is scored: with the images (reconstructions) or alignment error only."""

    with_images: bool = True
    binning: int = 2
    method: str = "wbp"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Axis:
    """One sweep axis: a simulation parameter ``section.field`` and its values (canonical types)."""

    path: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class AlignerSpec:
    """One aligner variant of an experiment.

    Attributes
    ----------
    name : str
        Registry name, or a yardstick name (:data:`YARDSTICKS`).
    label : str
        Unique label of this variant: the ``aligner`` column of the results.
    params : dict
        The parameters as written in the experiment (passed to the registry).
    resolved_params : dict
        Every parameter of the aligner, defaults included, JSON-ready (enters the cell key).
    group : str
        The label of the experiment entry this variant came from (equal to
        ``label`` unless the entry sweeps a parameter).
    swept : tuple of (parameter, value)
        The entry's swept aligner parameters and this variant's values.
    provider : str
        Where the aligner comes from (entry point and distribution version).
    order : int
        Position in the experiment's aligner list.
    """

    name: str
    label: str
    params: dict[str, Any] = field(hash=False, compare=True)
    resolved_params: dict[str, Any] = field(hash=False, compare=True)
    group: str = ""
    swept: tuple[tuple[str, Any], ...] = ()
    provider: str = ""
    order: int = 0

    @property
    def is_yardstick(self) -> bool:
        return self.name in YARDSTICKS


@dataclass(frozen=True)
class Setting:
    """One point of the sweep: the swept values and the resolved simulation configuration."""

    index: int
    values: tuple[tuple[str, Any], ...]
    config: SimulationConfig

    @property
    def label(self) -> str:
        return setting_label(self.values)


@dataclass(frozen=True)
class Cell:
    """One (setting, seed, aligner): one row of the results."""

    key: str
    setting: Setting
    seed: int
    aligner: AlignerSpec


@dataclass(frozen=True)
class Unit:
    """The unit of work: one simulation (setting, seed), aligned by each aligner of its cells."""

    setting: Setting
    seed: int
    cells: tuple[Cell, ...]


@dataclass(frozen=True)
class Experiment:
    """A validated experiment; see the module docstring for the file format.

    Use :func:`load_experiment` to read one from a file.
    """

    name: str
    description: str
    source: str
    text: str
    seeds: tuple[int, ...]
    preset: str
    overrides: tuple[tuple[str, Any], ...]
    mode: str
    axes: tuple[Axis, ...]
    aligners: tuple[AlignerSpec, ...]
    score: ScoreOptions
    settings: tuple[Setting, ...]
    cli_overrides: tuple[str, ...] = ()

    @property
    def n_cells(self) -> int:
        return len(self.settings) * len(self.seeds) * len(self.aligners)

    @property
    def swept_paths(self) -> tuple[str, ...]:
        return tuple(a.path for a in self.axes)

    def cells(self, version: str | None = None) -> list[Cell]:
        """Every cell of the grid, in the order of :meth:`units`."""
        return [c for u in self.units(version) for c in u.cells]

    def units(self, version: str | None = None) -> list[Unit]:
        """The units of work, seed-major: every setting of the first seed comes first,
        so a partial run (``--limit``) already covers the whole sweep once."""
        version = code_version() if version is None else version
        units = []
        for seed in self.seeds:
            for setting in self.settings:
                config = config_to_dict(setting.config)
                cells = tuple(
                    Cell(cell_key(config, seed, a, self.score, version), setting, seed, a) for a in self.aligners
                )
                units.append(Unit(setting, seed, cells))
        return units


# --------------------------------------------------------------------------- helpers


def setting_label(values: tuple[tuple[str, Any], ...] | dict[str, Any]) -> str:
    """``"beads.count=10, tilt.step_deg=2.0"``; ``"base"`` for an experiment without sweep."""
    items = values.items() if isinstance(values, dict) else values
    parts = [f"{k}={_show(v)}" for k, v in items]
    return ", ".join(parts) if parts else "base"


def _show(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_show(x) for x in v) + "]"
    return str(v)


def _hint(key: str, valid: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_keys(table: dict[str, Any], valid: tuple[str, ...], where: str, src: str) -> None:
    for key in table:
        if key not in valid:
            misplaced = (
                f"; '{key}' is a top-level key: in TOML a key after a [table] header belongs to that table, "
                "so write it above the first [table]"
                if where and key in _TOP_KEYS
                else ""
            )
            raise ConfigError(
                f"{src}: unknown key '{where}{key}'{_hint(key, valid)}; valid keys: {', '.join(valid)}{misplaced}"
            )


def parameter_paths() -> list[str]:
    """Every simulation parameter as ``section.field``."""
    base = SimulationConfig()
    return [f"{s}.{f.name}" for s in SECTIONS for f in dataclasses.fields(getattr(base, s))]


def _flatten_paths(table: Any, where: str, src: str) -> dict[str, Any]:
    """``{"beads.count": v}`` or ``{"beads": {"count": v}}`` -> ``{"beads.count": v}``, every path checked."""
    if not isinstance(table, dict):
        raise ConfigError(f"{src}: {where} must be a table of \"section.field\" = value, got {table!r}")
    valid = parameter_paths()
    out: dict[str, Any] = {}

    def add(path: str, value: Any) -> None:
        if path not in valid:
            raise ConfigError(
                f"{src}: {where}: unknown parameter {path!r}{_hint(path, valid)}; "
                "parameters are section.field, see `simtomo simulate --help`"
            )
        if path in out:
            raise ConfigError(f"{src}: {where}: parameter {path!r} is given twice")
        out[path] = value

    for key, value in table.items():
        if "." in key:
            add(key, value)
        elif key in SECTIONS and isinstance(value, dict):
            for name, v in value.items():
                add(f"{key}.{name}", v)
        else:
            valid_sections = list(SECTIONS)
            raise ConfigError(
                f"{src}: {where}: unknown parameter {key!r}{_hint(key, valid + valid_sections)}; "
                "expected \"section.field\" keys or [section] tables"
            )
    return out


def _nest(paths: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for path, value in paths.items():
        section, name = path.split(".", 1)
        out.setdefault(section, {})[name] = value
    return out


def _number(value: Any, where: str, src: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{src}: {where}: expected a finite number, got {value!r}")
    return float(value)


def _clean_float(v: float) -> float | int:
    # 0.1 + 0.2 style noise would make 0.30000000000000004 a separate setting label
    r = float(f"{v:.12g}")
    return int(r) if r.is_integer() and abs(r) < 2**53 else r


def _range_values(spec: dict[str, Any], where: str, src: str) -> list[Any]:
    _check_keys(spec, _RANGE_KEYS, f"{where}.", src)
    for req in ("start", "stop"):
        if req not in spec:
            raise ConfigError(f"{src}: {where}: a range needs 'start' and 'stop' and one of 'num' or 'step'; '{req}' is missing")
    start = _number(spec["start"], f"{where}.start", src)
    stop = _number(spec["stop"], f"{where}.stop", src)
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{src}: {where}.log: expected true or false, got {log!r}")
    if ("num" in spec) == ("step" in spec):
        raise ConfigError(f"{src}: {where}: a range needs exactly one of 'num' or 'step'")
    if "num" in spec:
        num = spec["num"]
        if isinstance(num, bool) or not isinstance(num, int) or num < 1:
            raise ConfigError(f"{src}: {where}.num: expected an integer >= 1, got {num!r}")
        if num == 1:
            return [_clean_float(start)]
        if log:
            if not (start > 0 and stop > 0):
                raise ConfigError(f"{src}: {where}: a log range needs start and stop > 0, got {start}, {stop}")
            vals = [start * (stop / start) ** (i / (num - 1)) for i in range(num)]
        else:
            vals = [start + (stop - start) * i / (num - 1) for i in range(num)]
        return [_clean_float(v) for v in vals]
    if log:
        raise ConfigError(f"{src}: {where}.log: only with 'num' (a log range has no constant step)")
    step = _number(spec["step"], f"{where}.step", src)
    if step == 0:
        raise ConfigError(f"{src}: {where}.step: expected a non-zero step")
    n = math.floor((stop - start) / step + 1e-9) + 1
    if n < 1:
        raise ConfigError(
            f"{src}: {where}: empty range: step {step:g} never goes from start {start:g} to stop {stop:g}"
        )
    if n > 100_000:
        raise ConfigError(f"{src}: {where}: the range has {n} values; expected at most 100000")
    return [_clean_float(start + i * step) for i in range(n)]


def _axis_values(spec: Any, where: str, src: str) -> list[Any]:
    if isinstance(spec, dict):
        return _range_values(spec, where, src)
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"{src}: {where}: empty list: the sweep grid would be empty; expected at least one value")
        return list(spec)
    raise ConfigError(f"{src}: {where}: expected a list of values or a range {{start, stop, num | step}}, got {spec!r}")


def _canonical(config: SimulationConfig, path: str) -> Any:
    section, name = path.split(".", 1)
    return config_to_dict(config)[section][name]


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


# --------------------------------------------------------------------------- code version and keys


def _package_dir(name: str) -> Path | None:
    spec = find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def code_version() -> str:
    """``simtomo.__version__`` plus a digest of the source of the ``simtomo`` and ``aligners`` packages.

    The digest covers every ``.py`` file of both packages except the modules
    that only present results (report, regress, figures, command line), so an
    edited but uncommitted aligner or scorer changes every cell key, while a
    git commit that does not touch the computation does not. (A git commit id
    would miss uncommitted edits and invalidate results on unrelated commits;
    the commit is recorded in ``run.json`` for provenance instead.)
    Third-party aligners enter each cell key through their distribution version.

    The environment variable ``SIMTOMO_CODE_VERSION``, when set, replaces the
    computed version: tests pin it, and a user may reuse results across an
    edit known not to change them (at their own risk).
    """
    pinned = os.environ.get("SIMTOMO_CODE_VERSION")
    if pinned:
        return pinned
    digest = hashlib.sha256()
    for package in ("simtomo", "aligners"):
        root = _package_dir(package)
        if root is None:
            continue
        for path in sorted(root.rglob("*.py")):
            rel = f"{package}/{path.relative_to(root).as_posix()}"
            if rel in _PRESENTATION_MODULES:
                continue
            digest.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return f"{simtomo.__version__}+src.{digest.hexdigest()[:12]}"


def cell_key(config: dict[str, Any], seed: int, aligner: AlignerSpec, score: ScoreOptions, version: str) -> str:
    """A hash of everything that determines a cell's result (see the module docstring)."""
    document = {
        "config": _jsonable(config),
        "seed": int(seed),
        "aligner": {"name": aligner.name, "params": _jsonable(aligner.resolved_params), "provider": aligner.provider},
        "score": score.to_dict(),
        "code": version,
    }
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


# --------------------------------------------------------------------------- aligners


def _provider(name: str) -> str:
    for ep in entry_points(group=registry.GROUP):
        if ep.name == name:
            dist = getattr(ep, "dist", None)
            version = f" ({dist.name} {dist.version})" if dist is not None else ""
            return f"{ep.value}{version}"
    return ""


def _resolve_aligner(name: str, params: dict[str, Any], where: str, src: str, check_registry: bool) -> tuple[dict, str]:
    """Validate ``params`` for aligner ``name``; return every parameter (defaults included) and the provider."""
    if name in YARDSTICKS:
        spec = YARDSTICKS[name]
        for key in params:
            if key not in spec:
                raise ConfigError(
                    f"{src}: {where}.params: unknown parameter {key!r} of the {name} yardstick{_hint(key, list(spec))}; "
                    f"known: {', '.join(spec)}"
                )
        out = {}
        for key, (kind, _help) in spec.items():
            if key not in params:
                raise ConfigError(f"{src}: {where}.params.{key}: the {name} yardstick needs {key} ({_help})")
            value = _number(params[key], f"{where}.params.{key}", src)
            if value < 0:
                raise ConfigError(f"{src}: {where}.params.{key}: expected a value >= 0, got {value!r}")
            out[key] = kind(value)
        return out, f"simtomo {simtomo.__version__} (yardstick)"
    if not check_registry:
        return dict(params), ""
    try:
        instance = registry.get(name, **params)
    except ConfigError as exc:
        extra = f" (yardsticks: {', '.join(YARDSTICKS)})" if "unknown aligner" in str(exc) else ""
        raise ConfigError(f"{src}: {where}: {exc}{extra}") from None
    resolved = dataclasses.asdict(instance.params) if dataclasses.is_dataclass(instance.params) else dict(params)
    return _jsonable(resolved), _provider(name)


def _aligner_entries(raw: Any, src: str, check_registry: bool) -> list[dict[str, Any]]:
    """Normalise ``aligners`` to a list of entry tables, expanding ``"all"``."""
    if raw is None:
        raise ConfigError(f"{src}: missing key 'aligners': list the aligners to run, or aligners = \"all\"")
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        raise ConfigError(f"{src}: aligners: empty list: the grid would be empty; list at least one aligner")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = "aligners" if not isinstance(raw, list) else f"aligners[{i}]"
        if item == "all":
            names = registry.available()
            if not names:
                raise ConfigError(f"{src}: {where}: \"all\" but no aligner is registered")
            out.extend({"name": n, "_where": f"{where} (all: {n})"} for n in names)
        elif isinstance(item, str):
            out.append({"name": item, "_where": where})
        elif isinstance(item, dict):
            _check_keys(item, _ALIGNER_KEYS, f"{where}.", src)
            if "name" not in item or not isinstance(item["name"], str):
                raise ConfigError(f"{src}: {where}.name: expected the aligner's name (a string), got {item.get('name')!r}")
            out.append({**item, "_where": where})
        else:
            raise ConfigError(
                f"{src}: {where}: expected an aligner name, \"all\" or a table {{name, label, params, sweep}}, got {item!r}"
            )
    return out


def _aligner_specs(raw: Any, src: str, check_registry: bool) -> tuple[AlignerSpec, ...]:
    specs: list[AlignerSpec] = []
    for entry in _aligner_entries(raw, src, check_registry):
        where = entry["_where"]
        name = entry["name"]
        params = entry.get("params", {})
        if not isinstance(params, dict):
            raise ConfigError(f"{src}: {where}.params: expected a table of parameter = value, got {params!r}")
        label = entry.get("label", name)
        if not isinstance(label, str) or not label.strip():
            raise ConfigError(f"{src}: {where}.label: expected a non-empty string, got {label!r}")
        sweep = entry.get("sweep", {})
        if not isinstance(sweep, dict):
            raise ConfigError(f"{src}: {where}.sweep: expected a table of parameter = [values], got {sweep!r}")
        swept_values = []
        for key, spec in sweep.items():
            if key in params:
                raise ConfigError(f"{src}: {where}.sweep.{key}: also set in {where}.params; give it in one place")
            swept_values.append([(key, v) for v in _axis_values(spec, f"{where}.sweep.{key}", src)])
        for combo in itertools.product(*swept_values):
            p = {**params, **dict(combo)}
            resolved, provider = _resolve_aligner(name, p, where, src, check_registry)
            variant = label if not combo else f"{label} " + ", ".join(f"{k}={_show(v)}" for k, v in combo)
            specs.append(
                AlignerSpec(
                    name=name,
                    label=variant,
                    params=p,
                    resolved_params=resolved,
                    group=label,
                    swept=tuple(combo),
                    provider=provider,
                    order=len(specs),
                )
            )
    seen: dict[str, int] = {}
    for s in specs:
        if s.label in seen:
            raise ConfigError(
                f"{src}: aligners: label {s.label!r} is used twice; give each entry of the same aligner its own label"
            )
        seen[s.label] = 1
    return tuple(specs)


# --------------------------------------------------------------------------- parsing


def _seeds(raw: Any, src: str) -> tuple[int, ...]:
    if raw is None:
        raise ConfigError(f"{src}: missing key 'seeds': expected a list of non-negative integers, e.g. seeds = [0, 1, 2]")
    if not isinstance(raw, list):
        raise ConfigError(f"{src}: seeds: expected a list of non-negative integers, got {raw!r}")
    if not raw:
        raise ConfigError(f"{src}: seeds: empty list: the grid would be empty; expected at least one seed")
    for i, s in enumerate(raw):
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ConfigError(f"{src}: seeds[{i}]: expected a non-negative integer, got {s!r}")
    if len(set(raw)) != len(raw):
        dup = sorted({s for s in raw if raw.count(s) > 1})
        raise ConfigError(f"{src}: seeds: seed {dup[0]} appears twice; each seed once")
    return tuple(raw)


def _score_options(raw: Any, src: str) -> ScoreOptions:
    if raw is None:
        return ScoreOptions()
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: score: expected a table {{with_images, binning, method}}, got {raw!r}")
    _check_keys(raw, _SCORE_KEYS, "score.", src)
    opts = ScoreOptions()
    with_images = raw.get("with_images", opts.with_images)
    if not isinstance(with_images, bool):
        raise ConfigError(f"{src}: score.with_images: expected true or false, got {with_images!r}")
    binning = raw.get("binning", opts.binning)
    if isinstance(binning, bool) or not isinstance(binning, int) or binning < 1:
        raise ConfigError(f"{src}: score.binning: expected an integer >= 1, got {binning!r}")
    method = raw.get("method", opts.method)
    if method not in _METHODS:
        raise ConfigError(f"{src}: score.method: expected one of {', '.join(_METHODS)}, got {method!r}")
    return ScoreOptions(with_images=with_images, binning=binning, method=method)


def _sweep(raw: Any, src: str) -> tuple[str, list[tuple[str, list[Any]]]]:
    if raw is None:
        return "product", []
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: sweep: expected a table {{mode, axes}}, got {raw!r}")
    _check_keys(raw, _SWEEP_KEYS, "sweep.", src)
    mode = raw.get("mode", "product")
    if mode not in _MODES:
        raise ConfigError(f"{src}: sweep.mode: expected one of {', '.join(_MODES)}, got {mode!r}{_hint(str(mode), _MODES)}")
    axes_raw = raw.get("axes", {})
    axes = [
        (path, _axis_values(spec, f"sweep.axes.{path}", src))
        for path, spec in _flatten_paths(axes_raw, "sweep.axes", src).items()
    ]
    if mode == "zip" and axes:
        lengths = {path: len(v) for path, v in axes}
        if len(set(lengths.values())) > 1:
            raise ConfigError(
                f"{src}: sweep.axes: zip mode needs axes of equal length, got "
                + ", ".join(f"{p}: {n}" for p, n in lengths.items())
            )
    return mode, axes


def parse_experiment(
    data: dict[str, Any],
    source: str,
    *,
    text: str = "",
    check_registry: bool = True,
    preset_override: str | None = None,
    seeds_override: list[int] | None = None,
) -> Experiment:
    """Validate a parsed experiment table and expand its grid.

    Parameters
    ----------
    data : dict
        The TOML document.
    source : str
        The file name, used in every error message.
    text : str
        The file's text (copied next to the results).
    check_registry : bool
        Resolve aligners through the registry (False: check the structure only,
        e.g. to read the experiment of an old results directory).
    preset_override, seeds_override
        Replace the workload preset or the seeds (smoke runs on a smaller grid).

    Raises
    ------
    ConfigError
        Naming ``source`` and the key, for any problem.
    """
    src = source
    if not isinstance(data, dict):
        raise ConfigError(f"{src}: expected a TOML table")
    _check_keys(data, _TOP_KEYS, "", src)
    name = data.get("name", Path(source).stem)
    if not isinstance(name, str) or not name or any(c in name for c in "/\\\0"):
        raise ConfigError(f"{src}: name: expected a plain name, got {name!r}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise ConfigError(f"{src}: description: expected a string, got {description!r}")
    seeds = _seeds(seeds_override if seeds_override is not None else data.get("seeds"), src)

    workload = data.get("workload", {})
    if not isinstance(workload, dict):
        raise ConfigError(f"{src}: workload: expected a table {{preset, overrides}}, got {workload!r}")
    _check_keys(workload, _WORKLOAD_KEYS, "workload.", src)
    preset_name = preset_override or workload.get("preset", "standard")
    if preset_name not in PRESETS:
        raise ConfigError(
            f"{src}: workload.preset: unknown preset {preset_name!r}{_hint(str(preset_name), list(PRESETS))}; "
            f"available: {', '.join(PRESETS)}"
        )
    overrides = _flatten_paths(workload.get("overrides", {}), "workload.overrides", src)
    base = apply_overrides(preset(preset_name), _nest(overrides), source=f"{src}: workload.overrides")

    mode, axes_raw = _sweep(data.get("sweep"), src)
    for path, _ in axes_raw:
        if path in overrides:
            raise ConfigError(f"{src}: sweep.axes.{path}: also set in workload.overrides; give it in one place")
    if mode == "zip":
        points = list(zip(*[[(p, v) for v in vals] for p, vals in axes_raw])) if axes_raw else [()]
    else:
        points = list(itertools.product(*[[(p, v) for v in vals] for p, vals in axes_raw]))

    settings: list[Setting] = []
    seen: dict[str, int] = {}
    for i, point in enumerate(points):
        where = f"{src}: sweep point {i + 1} ({setting_label(point)})"
        config = apply_overrides(base, _nest(dict(point)), source=where)
        canonical = tuple((p, _canonical(config, p)) for p, _ in point)
        label = setting_label(canonical)
        if label in seen:
            raise ConfigError(f"{src}: sweep.axes: the grid holds {label} twice (points {seen[label] + 1} and {i + 1})")
        seen[label] = i
        settings.append(Setting(index=i, values=canonical, config=config))
    axes = tuple(Axis(p, tuple(dict.fromkeys(_canonical(s.config, p) for s in settings))) for p, _ in axes_raw)

    aligners = _aligner_specs(data.get("aligners"), src, check_registry)
    score = _score_options(data.get("score"), src)
    return Experiment(
        name=name,
        description=description.strip(),
        source=src,
        text=text,
        seeds=seeds,
        preset=preset_name,
        overrides=tuple((p, _canonical(base, p)) for p in overrides),
        mode=mode,
        axes=axes,
        aligners=aligners,
        score=score,
        settings=tuple(settings),
        cli_overrides=tuple(
            ([f"--preset {preset_override}"] if preset_override else [])
            + ([f"--seeds {','.join(str(x) for x in seeds)}"] if seeds_override is not None else [])
        ),
    )


def load_experiment(
    path: str | Path,
    *,
    check_registry: bool = True,
    preset_override: str | None = None,
    seeds_override: list[int] | None = None,
) -> Experiment:
    """Read and validate ``experiments/NAME.toml``; see :func:`parse_experiment`."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read experiment file ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text, expected an experiment TOML file") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML ({exc})") from None
    return parse_experiment(
        data,
        str(p),
        text=text,
        check_registry=check_registry,
        preset_override=preset_override,
        seeds_override=seeds_override,
    )

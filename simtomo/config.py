"""Simulation parameters: sections of typed fields with units, presets and overrides.

A configuration is a :class:`SimulationConfig` of frozen sections. It is built
from a preset (DESIGN.md section 6), then overridden field by field from a TOML
file and from ``section.field=value`` strings; every key and value is checked,
and an unknown key is answered with the valid ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from simtomo.errors import ConfigError

__all__ = [
    "TiltConfig",
    "DetectorConfig",
    "OpticsConfig",
    "SpecimenConfig",
    "BeadConfig",
    "ContentConfig",
    "MisalignmentConfig",
    "SimulationConfig",
    "PRESETS",
    "preset",
    "load_config",
    "apply_overrides",
    "parse_assignments",
    "config_to_dict",
    "config_from_dict",
    "describe_parameters",
    "config_to_toml",
]


def param(default: Any, unit: str, help: str) -> Any:
    """A dataclass field carrying its unit and one-line help for ``--help``."""
    return field(default=default, metadata={"unit": unit, "help": help})


def _require(cond: bool, key: str, expected: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, key, "one of " + ", ".join(repr(c) for c in choices), value)


class _Section:
    """Base of the config sections: checks every field against its annotation."""

    _name = ""

    def _check_types(self) -> None:
        hints = get_type_hints(type(self))
        for f in fields(self):  # type: ignore[arg-type]
            value = _coerce(getattr(self, f.name), hints[f.name], f"{self._name}.{f.name}")
            object.__setattr__(self, f.name, value)


@dataclass(frozen=True)
class TiltConfig(_Section):
    """Tilt scheme and electron dose."""

    _name = "tilt"

    scheme: str = param("dose-symmetric", "", "unidirectional | bidirectional | dose-symmetric")
    min_deg: float = param(-60.0, "deg", "lowest nominal tilt angle")
    max_deg: float = param(60.0, "deg", "highest nominal tilt angle")
    step_deg: float = param(2.0, "deg", "nominal tilt increment")
    start_deg: float = param(0.0, "deg", "bidirectional: tilt of the first view")
    first_branch: str = param("positive", "", "bidirectional: branch taken first, positive | negative")
    group_size: int = param(2, "views", "dose-symmetric: views per group on one side (Hagen scheme)")
    total_dose_e_per_A2: float = param(120.0, "e/Å²", "total electron dose over the series")
    dose_weighting: str = param("constant", "", "constant | cos (dose per view proportional to 1/cos(tilt))")

    def __post_init__(self) -> None:
        self._check_types()
        _choice("tilt.scheme", self.scheme, ("unidirectional", "bidirectional", "dose-symmetric"))
        _choice("tilt.first_branch", self.first_branch, ("positive", "negative"))
        _choice("tilt.dose_weighting", self.dose_weighting, ("constant", "cos"))
        for key in ("min_deg", "max_deg", "start_deg"):
            v = getattr(self, key)
            _require(-90.0 < v < 90.0, f"tilt.{key}", "a tilt strictly between -90 and 90 degrees", v)
        _require(self.min_deg <= self.max_deg, "tilt.min_deg", f"<= tilt.max_deg ({self.max_deg})", self.min_deg)
        _require(self.step_deg > 0, "tilt.step_deg", "a positive increment", self.step_deg)
        if self.scheme == "bidirectional":
            _require(
                self.min_deg <= self.start_deg <= self.max_deg,
                "tilt.start_deg",
                f"a start within [{self.min_deg}, {self.max_deg}]",
                self.start_deg,
            )
        _require(self.group_size >= 1, "tilt.group_size", "at least 1", self.group_size)
        n_views = math.floor((self.max_deg - self.min_deg) / self.step_deg + 1e-6) + 1
        _require(
            n_views >= 2,
            "tilt.step_deg",
            f"a step giving at least 2 views from tilt.min_deg {self.min_deg} to tilt.max_deg {self.max_deg}",
            self.step_deg,
        )
        _require(
            0 < self.total_dose_e_per_A2 <= 1e6,
            "tilt.total_dose_e_per_A2",
            "a dose > 0 and <= 1e6",
            self.total_dose_e_per_A2,
        )


@dataclass(frozen=True)
class DetectorConfig(_Section):
    """Detector size, sampling and noise."""

    _name = "detector"

    image_shape: tuple[int, int] = param((1024, 1024), "px", "view size (height, width)")
    pixel_size_A: float = param(8.0, "Å", "pixel size at the specimen")
    poisson_noise: bool = param(True, "", "draw shot noise; false writes expected counts")
    read_noise_e: float = param(0.0, "e/px", "standard deviation of Gaussian read noise")
    mtf_sigma_px: float = param(0.0, "px", "detector point-spread: Gaussian sigma (0 = ideal)")

    def __post_init__(self) -> None:
        self._check_types()
        _require(
            len(self.image_shape) == 2 and all(int(v) >= 8 for v in self.image_shape),
            "detector.image_shape",
            "two sizes >= 8 px",
            self.image_shape,
        )
        _require(self.pixel_size_A > 0, "detector.pixel_size_A", "a positive size", self.pixel_size_A)
        _require(self.read_noise_e >= 0, "detector.read_noise_e", "a value >= 0", self.read_noise_e)
        _require(self.mtf_sigma_px >= 0, "detector.mtf_sigma_px", "a value >= 0", self.mtf_sigma_px)


@dataclass(frozen=True)
class OpticsConfig(_Section):
    """Contrast transfer and attenuation."""

    _name = "optics"

    ctf: bool = param(False, "", "apply the phase contrast transfer function to specimen content")
    voltage_kV: float = param(300.0, "kV", "acceleration voltage")
    defocus_um: float = param(3.0, "µm", "defocus, underfocus positive")
    cs_mm: float = param(2.7, "mm", "spherical aberration")
    amplitude_contrast: float = param(0.07, "", "amplitude contrast fraction")
    ice_mean_free_path_nm: float = param(350.0, "nm", "inelastic mean free path; ice attenuates as exp(-path/mfp)")

    def __post_init__(self) -> None:
        self._check_types()
        _require(self.voltage_kV > 0, "optics.voltage_kV", "a positive voltage", self.voltage_kV)
        _require(self.cs_mm >= 0, "optics.cs_mm", "a value >= 0", self.cs_mm)
        _require(0 <= self.amplitude_contrast < 1, "optics.amplitude_contrast", "a fraction in [0, 1)", self.amplitude_contrast)
        _require(self.ice_mean_free_path_nm > 0, "optics.ice_mean_free_path_nm", "a positive length", self.ice_mean_free_path_nm)


@dataclass(frozen=True)
class SpecimenConfig(_Section):
    """The ice slab and the contrast of its content."""

    _name = "specimen"

    thickness_nm: float = param(200.0, "nm", "ice slab thickness")
    slab_tilt_x_deg: float = param(0.0, "deg", "tilt of the slab about the x axis")
    slab_tilt_y_deg: float = param(0.0, "deg", "tilt of the slab about the y (tilt) axis")
    phase_per_nm: float = param(0.0065, "rad/nm", "phase shift per nm of protein-density path")
    phantom_mrc: str = param("", "", "MRC volume used as cellular content instead of the analytic content")

    def __post_init__(self) -> None:
        self._check_types()
        _require(self.thickness_nm > 0, "specimen.thickness_nm", "a positive thickness", self.thickness_nm)
        for key in ("slab_tilt_x_deg", "slab_tilt_y_deg"):
            v = getattr(self, key)
            _require(abs(v) < 45, f"specimen.{key}", "an angle within ±45 degrees", v)
        _require(self.phase_per_nm >= 0, "specimen.phase_per_nm", "a value >= 0", self.phase_per_nm)


@dataclass(frozen=True)
class BeadConfig(_Section):
    """Gold fiducial beads."""

    _name = "beads"

    count: int = param(25, "", "number of beads in the field of view")
    diameter_nm: float = param(10.0, "nm", "bead diameter")
    placement: str = param("surfaces", "", "surfaces | top | bottom | throughout")
    min_spacing_nm: float = param(40.0, "nm", "smallest lateral distance between bead centres")
    attenuation_per_nm: float = param(0.15, "1/nm", "gold attenuation: intensity falls as exp(-value * path)")

    def __post_init__(self) -> None:
        self._check_types()
        _require(self.count >= 0, "beads.count", "a count >= 0", self.count)
        _require(self.diameter_nm > 0, "beads.diameter_nm", "a positive diameter", self.diameter_nm)
        _choice("beads.placement", self.placement, ("surfaces", "top", "bottom", "throughout"))
        _require(self.min_spacing_nm >= 0, "beads.min_spacing_nm", "a value >= 0", self.min_spacing_nm)
        _require(self.attenuation_per_nm >= 0, "beads.attenuation_per_nm", "a value >= 0", self.attenuation_per_nm)


@dataclass(frozen=True)
class ContentConfig(_Section):
    """Cellular content: mean counts per field of view, drawn over every region a view can see."""

    _name = "content"

    vesicles: int = param(6, "", "membrane vesicles (bilayer shells)")
    vesicle_radius_nm: tuple[float, float] = param((20.0, 80.0), "nm", "range of vesicle radii")
    membrane_thickness_nm: float = param(4.0, "nm", "bilayer thickness (two leaflets)")
    actin_filaments: int = param(6, "", "actin-like filaments (7 nm, helical subunits)")
    microtubules: int = param(2, "", "microtubule-like tubes (25 nm, 13 protofilaments)")
    filament_length_nm: tuple[float, float] = param((300.0, 900.0), "nm", "range of filament lengths")
    filament_curvature_per_um: float = param(2.0, "1/µm", "largest filament curvature (0 = all straight)")
    proteins: int = param(2000, "", "protein-sized Gaussian densities")
    protein_radius_nm: tuple[float, float] = param((2.0, 6.0), "nm", "range of protein radii")

    def __post_init__(self) -> None:
        self._check_types()
        for key in ("vesicles", "actin_filaments", "microtubules", "proteins"):
            _require(getattr(self, key) >= 0, f"content.{key}", "a count >= 0", getattr(self, key))
        for key in ("vesicle_radius_nm", "filament_length_nm", "protein_radius_nm"):
            lo, hi = getattr(self, key)
            _require(0 < lo <= hi, f"content.{key}", "a range (low, high) with 0 < low <= high", (lo, hi))
        _require(self.membrane_thickness_nm > 0, "content.membrane_thickness_nm", "a positive thickness", self.membrane_thickness_nm)
        _require(self.filament_curvature_per_um >= 0, "content.filament_curvature_per_um", "a value >= 0", self.filament_curvature_per_um)


@dataclass(frozen=True)
class MisalignmentConfig(_Section):
    """Geometry errors of the acquisition: what the aligners must recover."""

    _name = "misalignment"

    initial_offset_nm: float = param(40.0, "nm", "sd per axis of the stage offset of the first acquired view")
    shift_walk_nm: float = param(12.0, "nm", "sd per axis of the random-walk step between successive acquisitions")
    backlash_nm: float = param(48.0, "nm", "stage jump at each reversal of tilt direction")
    tilt_axis_deg: float = param(85.3, "deg", "true in-plane angle of the tilt axis (from the image y axis, counter-clockwise)")
    nominal_tilt_axis_deg: float = param(85.0, "deg", "tilt-axis angle the microscope log reports")
    rot_drift_deg: float = param(0.2, "deg", "RMS of the per-view rotation drift (random walk over acquisitions)")
    mag_drift: float = param(0.003, "", "RMS relative magnification drift (random walk over acquisitions)")
    tilt_offset_deg: float = param(1.5, "deg", "offset of every true tilt from its nominal value")
    tilt_jitter_deg: float = param(0.2, "deg", "sd of independent per-view tilt errors")
    motion_blur_nm: float = param(0.0, "nm", "RMS length of linear specimen drift during each exposure")

    def __post_init__(self) -> None:
        self._check_types()
        for key in ("initial_offset_nm", "shift_walk_nm", "backlash_nm", "rot_drift_deg", "mag_drift", "tilt_jitter_deg", "motion_blur_nm"):
            _require(getattr(self, key) >= 0, f"misalignment.{key}", "a value >= 0", getattr(self, key))
        _require(self.mag_drift < 0.2, "misalignment.mag_drift", "a relative drift below 0.2", self.mag_drift)
        _require(abs(self.tilt_offset_deg) < 30, "misalignment.tilt_offset_deg", "an offset within ±30 degrees", self.tilt_offset_deg)


@dataclass(frozen=True)
class SimulationConfig:
    """Everything a simulation needs besides the seed."""

    name: str = "standard"
    tilt: TiltConfig = field(default_factory=TiltConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    optics: OpticsConfig = field(default_factory=OpticsConfig)
    specimen: SpecimenConfig = field(default_factory=SpecimenConfig)
    beads: BeadConfig = field(default_factory=BeadConfig)
    content: ContentConfig = field(default_factory=ContentConfig)
    misalignment: MisalignmentConfig = field(default_factory=MisalignmentConfig)

    def __post_init__(self) -> None:
        _require(isinstance(self.name, str), "name", "a string", self.name)
        hints = get_type_hints(type(self))
        for section in SECTIONS:
            if not isinstance(getattr(self, section), hints[section]):
                raise ConfigError(f"{section}: expected a {hints[section].__name__}, got {getattr(self, section)!r}")
        thickness = self.specimen.thickness_nm
        if self.beads.count > 0:
            _require(
                self.beads.diameter_nm <= thickness,
                "beads.diameter_nm",
                f"beads no larger than the ice (specimen.thickness_nm = {thickness})",
                self.beads.diameter_nm,
            )
        _require(
            2 * self.content.protein_radius_nm[1] <= thickness,
            "content.protein_radius_nm",
            f"proteins no larger than the ice (specimen.thickness_nm = {thickness})",
            self.content.protein_radius_nm,
        )
        true_tilts = (
            self.tilt.min_deg + self.misalignment.tilt_offset_deg - 4 * self.misalignment.tilt_jitter_deg,
            self.tilt.max_deg + self.misalignment.tilt_offset_deg + 4 * self.misalignment.tilt_jitter_deg,
        )
        _require(
            all(abs(t) < 89.0 for t in true_tilts),
            "tilt.min_deg/max_deg",
            "a range that stays within ±89 degrees after the tilt offset and jitter",
            (self.tilt.min_deg, self.tilt.max_deg),
        )


SECTIONS: tuple[str, ...] = tuple(f.name for f in fields(SimulationConfig) if f.name != "name")

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # standard: 61 views, dose-symmetric, 1024 px at 8 Å, 200 nm slab, 25 beads of
    # 10 nm, 120 e/Å². Shifts: offset 50 px, walk 15 px/view, backlash 60 px.
    "standard": {},
    "standard-nobeads": {"beads": {"count": 0}},
    "tiny": {
        "tilt": {"step_deg": 3.0},
        "detector": {"image_shape": (128, 128)},
        "specimen": {"thickness_nm": 80.0},
        "beads": {"count": 10, "min_spacing_nm": 18.0},
        "content": {
            "vesicles": 1,
            "vesicle_radius_nm": (15.0, 25.0),
            "actin_filaments": 1,
            "microtubules": 0,
            "filament_length_nm": (60.0, 100.0),
            "proteins": 40,
        },
        "misalignment": {"initial_offset_nm": 4.0, "shift_walk_nm": 1.6, "backlash_nm": 3.2},
    },
    "large": {"detector": {"image_shape": (4096, 4096), "pixel_size_A": 2.0}},
}


def preset(name: str) -> SimulationConfig:
    """The named workload of DESIGN.md section 6 (``tiny``, ``standard``, ``standard-nobeads``, ``large``)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available presets: {', '.join(PRESETS)}")
    return apply_overrides(SimulationConfig(name=name), PRESETS[name], source=f"preset {name!r}")


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{hint}; valid keys: {', '.join(valid)}"


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check a TOML or command-line value against a field's type."""
    origin = get_origin(tp)
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported field type {tp!r} for {key}")  # pragma: no cover


def apply_overrides(config: SimulationConfig, overrides: dict[str, Any], *, source: str = "overrides") -> SimulationConfig:
    """Return ``config`` with fields replaced from a nested mapping ``{section: {field: value}}``.

    Raises
    ------
    ConfigError
        Naming ``source`` and the key for an unknown section or field, a value
        of the wrong type, or a value out of range.
    """
    changes: dict[str, Any] = {}
    for section, values in overrides.items():
        if section == "name":
            changes["name"] = _coerce(values, str, f"{source}: name")
            continue
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section {section!r}" + _suggest(section, list(SECTIONS) + ["name"]))
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{section}] must be a table of fields, got {values!r}")
        current = getattr(config, section)
        names = [f.name for f in fields(current)]
        for key in values:
            if key not in names:
                raise ConfigError(f"{source}: unknown key {section}.{key}" + _suggest(key, names))
        try:
            changes[section] = dataclasses.replace(current, **values)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    try:
        return dataclasses.replace(config, **changes)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def parse_assignments(assignments: list[str]) -> dict[str, dict[str, Any]]:
    """Parse ``section.field=value`` strings (TOML values; bare words are strings)."""
    out: dict[str, dict[str, Any]] = {}
    for text in assignments:
        key, sep, raw = text.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"--set {text!r}: expected section.field=value, for example tilt.step_deg=3")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        out.setdefault(section, {})[name] = value
    return out


def load_config(
    preset_name: str | None = None,
    config_file: str | Path | None = None,
    assignments: list[str] | None = None,
) -> SimulationConfig:
    """Build a configuration: a preset, then a TOML file, then ``section.field=value`` overrides.

    A TOML file may name its own base with a top-level ``preset = "NAME"``; an
    explicit ``preset_name`` wins. Without either the base is ``standard``.
    """
    file_overrides: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        try:
            file_overrides = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
        phantom = file_overrides.get("specimen", {}).get("phantom_mrc") if isinstance(file_overrides.get("specimen"), dict) else None
        if isinstance(phantom, str) and phantom and not Path(phantom).is_absolute():
            # a path in a config file is relative to that file, not to where simtomo runs
            file_overrides["specimen"]["phantom_mrc"] = str(path.parent / phantom)
        file_preset = file_overrides.pop("preset", None)
        if preset_name is None and file_preset is not None:
            preset_name = _coerce(file_preset, str, f"{path}: preset")
    config = preset(preset_name or "standard")
    if file_overrides:
        config = apply_overrides(config, file_overrides, source=str(config_file))
    if assignments:
        config = apply_overrides(config, parse_assignments(assignments), source="--set")
    return config


def config_to_dict(config: SimulationConfig) -> dict[str, Any]:
    """A JSON- and TOML-ready nested dict (tuples become lists)."""

    def plain(v: Any) -> Any:
        return list(v) if isinstance(v, tuple) else v

    out: dict[str, Any] = {"name": config.name}
    for section in SECTIONS:
        sec = getattr(config, section)
        out[section] = {f.name: plain(getattr(sec, f.name)) for f in fields(sec)}
    return out


def config_from_dict(data: dict[str, Any], *, source: str = "config") -> SimulationConfig:
    """Inverse of :func:`config_to_dict`; every key is checked."""
    return apply_overrides(SimulationConfig(), data, source=source)


def describe_parameters() -> str:
    """One line per parameter, ``section.field = default [unit]  help``, for ``--help``."""
    lines = []
    for section in SECTIONS:
        sec = getattr(SimulationConfig(), section)
        lines.append(f"[{section}]  {type(sec).__doc__.strip()}")
        for f in fields(sec):
            default = getattr(sec, f.name)
            unit = f" [{f.metadata['unit']}]" if f.metadata.get("unit") else ""
            lines.append(f"  {section}.{f.name} = {default!r}{unit}  {f.metadata.get('help', '')}")
    return "\n".join(lines)


def config_to_toml(config: SimulationConfig) -> str:
    """The configuration as TOML that :func:`load_config` reads back to an equal configuration."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return repr(v)

    data = config_to_dict(config)
    lines = [f"name = {value(data.pop('name'))}"]
    for section, values in data.items():
        lines.append(f"\n[{section}]")
        lines.extend(f"{key} = {value(v)}" for key, v in values.items())
    return "\n".join(lines) + "\n"

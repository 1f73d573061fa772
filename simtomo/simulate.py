"""Simulating a tilt series with known geometry: ``simulate(config, seed) -> TiltSeries``.

Randomness comes from one seed split into independent streams (geometry errors,
specimen, and one noise stream per view), so the same seed gives the same bytes
whatever the number of threads, and changing one part of the configuration does
not reshuffle the others' draws.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

import simtomo
from simtomo.config import SimulationConfig, config_from_dict, config_to_dict, config_to_toml, preset
from simtomo.errors import ConfigError, FileFormatError
from simtomo.geometry import Geometry
from simtomo.imaging import add_noise, ctf, expected_counts, phase_per_px
from simtomo.io import StackWriter, Truth, read_stack, read_volume, write_rawtlt, write_stack, write_truth, write_volume
from simtomo.misalignment import simulate_misalignment
from simtomo.observation import Observation
from simtomo.projector import project_gaussians, project_shells, project_voxels
from simtomo.specimen import Specimen, VoxelPhantom, make_specimen
from simtomo.tiltscheme import TiltScheme, make_tilt_scheme
from simtomo.voxelize import phantom_volume

__all__ = ["TiltSeries", "simulate", "simulate_to_files", "truth_phantom"]

log = logging.getLogger(__name__)


@dataclass(eq=False)
class TiltSeries:
    """A simulated tilt series together with its ground truth.

    Attributes
    ----------
    stack : (n, h, w) float32 array
        Detector counts, views sorted by nominal tilt (may be a read-only memory map).
    geometry : Geometry
        The TRUE geometry. Aligners must not see it: give them :meth:`observation`.
    scheme : TiltScheme
        Nominal tilts, acquisition order and dose per view.
    specimen : Specimen
        The primitives that were imaged (bead centres included).
    motion_px : (n, 2) array
        Specimen drift during each exposure.
    config : SimulationConfig
    seed : int
    """

    stack: np.ndarray
    geometry: Geometry
    scheme: TiltScheme
    specimen: Specimen
    motion_px: np.ndarray
    config: SimulationConfig
    seed: int

    @property
    def beads_px(self) -> np.ndarray:
        """(m, 3) true bead centres, specimen pixels, volume-centred."""
        return self.specimen.bead_centers_px

    def observation(self) -> Observation:
        """The images and microscope metadata an aligner may use (no ground truth).

        The stack is a read-only view: an aligner cannot alter the images that
        scoring later reconstructs.
        """
        stack = np.asarray(self.stack).view()
        stack.flags.writeable = False
        return Observation(
            stack=stack,
            tilt_deg=self.scheme.tilt_deg,
            pixel_size_A=self.config.detector.pixel_size_A,
            acquisition_order=self.scheme.acquisition_order,
            dose_e_per_A2=self.scheme.dose_e_per_A2,
            tilt_axis_deg=self.config.misalignment.nominal_tilt_axis_deg,
            bead_diameter_nm=self.config.beads.diameter_nm if self.config.beads.count > 0 else None,
            name=self.config.name,
        )

    def truth(self) -> Truth:
        """The ground truth as written to ``NAME.truth.json``."""
        return Truth(
            geometry=self.geometry,
            beads_px=self.beads_px,
            nominal_tilt_deg=self.scheme.tilt_deg,
            acquisition_order=self.scheme.acquisition_order,
            dose_e_per_A2=self.scheme.dose_e_per_A2,
            nominal_tilt_axis_deg=self.config.misalignment.nominal_tilt_axis_deg,
            seed=self.seed,
            config=config_to_dict(self.config),
            simtomo_version=simtomo.__version__,
        )

    def phantom(self, *, binning: int = 1) -> np.ndarray:
        """The noise-free specimen over the field of view as a volume ``vol[z, y, x]``; see :func:`phantom_volume`."""
        return phantom_volume(self.specimen, self.config, binning=binning)

    def write(self, out_dir: str | Path, name: str | None = None, *, phantom_bin: int | None = None) -> dict[str, Path]:
        """Write ``NAME.mrc``, ``NAME.rawtlt``, ``NAME.truth.json``, ``NAME.config.toml``
        (and ``NAME.phantom.mrc`` when ``phantom_bin`` is given) to ``out_dir``.

        Files are written to a staging folder and moved into place together, so
        a failure leaves any earlier files of the same name as they were.
        """
        _check_phantom_bin(phantom_bin)
        with _staged(out_dir, name or self.config.name) as (staging, final):
            write_stack(staging["stack"], self.stack, self.config.detector.pixel_size_A)
            _write_metadata(self, staging, phantom_bin)
        return final


_SUFFIXES = {"stack": ".mrc", "rawtlt": ".rawtlt", "truth": ".truth.json", "config": ".config.toml", "phantom": ".phantom.mrc"}


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name or name.startswith(".") or any(c in name for c in "/\\\0"):
        raise ConfigError(f"output name: expected a plain file name (no path, not starting with '.'), got {name!r}")
    return name


def _check_phantom_bin(phantom_bin: int | None) -> None:
    if phantom_bin is not None and (isinstance(phantom_bin, bool) or not isinstance(phantom_bin, (int, np.integer)) or phantom_bin < 1):
        raise ConfigError(f"phantom binning: expected an integer >= 1, got {phantom_bin!r}")


@contextmanager
def _staged(out_dir: str | Path, name: str):
    """Yield (staging paths, final paths); on success move what was written into place."""
    _check_name(name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    staging_dir = Path(tempfile.mkdtemp(prefix=f".{name}.staging-", dir=out))
    staging = {k: staging_dir / f"{name}{v}" for k, v in _SUFFIXES.items()}
    final: dict[str, Path] = {}
    try:
        yield staging, final
        for kind, path in staging.items():
            target = out / path.name
            if path.exists():
                os.replace(path, target)
                final[kind] = target
            else:
                # an output of an earlier run that this run did not make would not belong to it
                target.unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging_dir, ignore_errors=True)


def _write_metadata(series: TiltSeries, paths: dict[str, Path], phantom_bin: int | None) -> None:
    write_rawtlt(paths["rawtlt"], series.scheme.tilt_deg)
    write_truth(paths["truth"], series.truth())
    paths["config"].write_text(f"# simtomo {simtomo.__version__}, seed {series.seed}\n" + config_to_toml(series.config))
    if phantom_bin is not None:
        vol = series.phantom(binning=phantom_bin)
        write_volume(paths["phantom"], vol.astype(np.float32), series.config.detector.pixel_size_A * phantom_bin)


def _ordered_map(fn: Callable[[int], np.ndarray], n: int, workers: int):
    """Yield ``(i, fn(i))`` in order, with at most ``2 * workers`` views in flight (bounded memory)."""
    if workers <= 1:
        for i in range(n):
            yield i, fn(i)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for i in range(n):
            pending.append((i, pool.submit(fn, i)))
            if len(pending) >= 2 * workers:
                j, fut = pending.popleft()
                yield j, fut.result()
        while pending:
            j, fut = pending.popleft()
            yield j, fut.result()


def _load_voxels(cfg: SimulationConfig) -> VoxelPhantom | None:
    path = cfg.specimen.phantom_mrc
    if not path:
        return None
    try:
        vol, voxel_A = read_volume(path)
    except FileFormatError as exc:
        raise FileFormatError(f"specimen.phantom_mrc: {exc}") from None
    if float(vol.min()) < 0:
        log.warning(
            "specimen.phantom_mrc: %s has negative values (min %.3g); simtomo reads it as protein density "
            "(0 = ice, 1 = protein), so negative voxels brighten the image",
            path,
            float(vol.min()),
        )
    return VoxelPhantom(vol, voxel_size_px=voxel_A / cfg.detector.pixel_size_A)


def _prepare(config: SimulationConfig | str, seed: int):
    cfg = preset(config) if isinstance(config, str) else config
    if not isinstance(cfg, SimulationConfig):
        raise ConfigError(f"simulate: expected a SimulationConfig or a preset name, got {type(config).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"simulate: seed must be a non-negative integer, got {seed!r}")
    geom_seq, specimen_seq, noise_seq = _seed_streams(seed)
    scheme = make_tilt_scheme(cfg.tilt)
    mis = simulate_misalignment(
        cfg.misalignment,
        scheme,
        image_shape=cfg.detector.image_shape,
        pixel_size_A=cfg.detector.pixel_size_A,
        rng=np.random.default_rng(geom_seq),
    )
    specimen = make_specimen(cfg, specimen_seq, scheme.tilt_deg.size, voxels=_load_voxels(cfg))
    return cfg, scheme, mis, specimen, noise_seq.spawn(scheme.tilt_deg.size)


def _seed_streams(seed: int) -> list[np.random.SeedSequence]:
    """The independent streams of a simulation: geometry, specimen, noise."""
    return np.random.SeedSequence(int(seed)).spawn(3)


def truth_phantom(truth: Truth, *, binning: int = 1, z_margin_px: float = 0.0) -> np.ndarray:
    """The noise-free phantom volume of a simulated series, rebuilt from its truth file's config and seed.

    Scoring uses it as the reference of the FSC; it is the volume
    ``TiltSeries.phantom(binning=binning)`` gave when the series was made.
    """
    cfg = config_from_dict(truth.config, source="truth config")
    specimen = make_specimen(cfg, _seed_streams(truth.seed)[1], truth.n_views, voxels=_load_voxels(cfg))
    return phantom_volume(specimen, cfg, binning=binning, z_margin_px=z_margin_px)


def _render_views(cfg, scheme, mis, specimen, view_seeds, sink, workers: int | None) -> None:
    """Render every view and hand ``(i, image)`` to ``sink`` in view order, logging progress."""
    geometry = mis.geometry
    n = geometry.n_views
    ice = specimen.ice_path_px(geometry.tilt_deg)
    phase = phase_per_px(cfg)
    transfer = ctf(cfg.detector.image_shape, cfg.detector.pixel_size_A, cfg.optics) if cfg.optics.ctf else None

    def render(i: int) -> np.ndarray:
        gold = project_shells(specimen.gold, geometry, i)
        content = project_shells(specimen.shells, geometry, i)
        project_gaussians(specimen.gaussians, geometry, i, out=content)
        if specimen.voxels is not None:
            project_voxels(specimen.voxels, geometry, i, out=content)
        counts = expected_counts(
            gold,
            content,
            dose_e_per_A2=float(scheme.dose_e_per_A2[i]),
            mag=float(geometry.mag[i]),
            ice_path_px=float(ice[i]),
            phase_per_px=phase,
            detector=cfg.detector,
            optics=cfg.optics,
            motion_px=mis.motion_px[i],
            ctf_transfer=transfer,
        )
        return add_noise(counts, cfg.detector, np.random.default_rng(view_seeds[i]))

    workers = workers or min(4, os.cpu_count() or 1)
    start = time.perf_counter()
    report_every = max(1, math.ceil(n / 10))
    for i, image in _ordered_map(render, n, workers):
        sink(i, image)
        done = i + 1
        if done % report_every == 0 or done == n:
            elapsed = time.perf_counter() - start
            log.info("views %d/%d, %.1f s elapsed, about %.1f s left", done, n, elapsed, elapsed / done * (n - done))


def simulate(config: SimulationConfig | str = "standard", seed: int = 0, *, workers: int | None = None) -> TiltSeries:
    """Simulate a tilt series in memory.

    Parameters
    ----------
    config : SimulationConfig or str
        A configuration, or the name of a preset (``tiny``, ``standard``,
        ``standard-nobeads``, ``large``).
    seed : int
        The only source of randomness: same seed, same bytes.
    workers : int, optional
        Threads that render views (default: the number of cores, at most 4).

    Returns
    -------
    TiltSeries
        Images plus ground truth; ``.observation()`` is what aligners get.

    Examples
    --------
    >>> series = simulate("tiny", seed=0)
    >>> series.stack.shape
    (41, 128, 128)
    """
    cfg, scheme, mis, specimen, view_seeds = _prepare(config, seed)
    h, w = cfg.detector.image_shape
    stack = np.empty((scheme.tilt_deg.size, h, w), dtype=np.float32)

    def sink(i: int, image: np.ndarray) -> None:
        stack[i] = image

    _render_views(cfg, scheme, mis, specimen, view_seeds, sink, workers)
    return TiltSeries(stack, mis.geometry, scheme, specimen, mis.motion_px, cfg, int(seed))


def simulate_to_files(
    config: SimulationConfig | str,
    seed: int,
    out_dir: str | Path,
    name: str | None = None,
    *,
    phantom_bin: int | None = None,
    workers: int | None = None,
) -> tuple[TiltSeries, dict[str, Path]]:
    """Simulate straight to disk, one view at a time, so a series larger than memory can be made.

    Writes the files of :meth:`TiltSeries.write`; the returned series holds the
    stack as a read-only memory map of ``NAME.mrc``.
    """
    _check_phantom_bin(phantom_bin)
    cfg, scheme, mis, specimen, view_seeds = _prepare(config, seed)
    with _staged(out_dir, name or cfg.name) as (staging, final):
        shape = cfg.detector.image_shape
        with StackWriter(staging["stack"], scheme.tilt_deg.size, shape, cfg.detector.pixel_size_A) as writer:

            def sink(i: int, image: np.ndarray) -> None:
                writer[i] = image

            _render_views(cfg, scheme, mis, specimen, view_seeds, sink, workers)
        series = TiltSeries(None, mis.geometry, scheme, specimen, mis.motion_px, cfg, int(seed))
        _write_metadata(series, staging, phantom_bin)
    series.stack, _ = read_stack(final["stack"], mmap=True)
    return series, final

"""The specimen: analytic primitives in an ice slab, and their generation.

Every object is a sum of primitives whose line integrals are known in closed
form under any view geometry: uniform solid spheres (gold beads), uniform
spherical shells (membrane leaflets) and isotropic 3-D Gaussians (proteins and
filament subunits). Positions are in specimen pixels relative to the volume
centre (DESIGN.md section 3). Gold is kept apart from the cellular content
because it forms amplitude contrast, the content phase contrast.

Content densities are in protein units (1 = protein); gold densities are
attenuation per pixel of path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from simtomo.config import SimulationConfig
from simtomo.errors import ConfigError
from simtomo.geometry import rotation_y

__all__ = [
    "solid_spheres",
    "Shells",
    "Gaussians",
    "VoxelPhantom",
    "Specimen",
    "make_specimen",
    "content_region_px",
    "GAUSSIAN_SIGMA_PER_RADIUS",
]

log = logging.getLogger(__name__)

# A Gaussian of unit peak density with sigma = 0.643 r has the mass of a uniform
# unit-density ball of radius r: (2 pi)^(3/2) sigma^3 = 4/3 pi r^3.
GAUSSIAN_SIGMA_PER_RADIUS = (4.0 / 3.0 * np.pi / (2.0 * np.pi) ** 1.5) ** (1.0 / 3.0)


def _f64(a, shape_tail: tuple[int, ...] = ()) -> np.ndarray:
    arr = np.ascontiguousarray(a, dtype=np.float64)
    return arr.reshape((-1,) + shape_tail)


@dataclass(frozen=True)
class Shells:
    """Uniform spherical shells ``r_inner <= |X - c| <= r_outer`` (a solid sphere has ``r_inner = 0``).

    Parameters
    ----------
    centers_px : (m, 3)
        Centres (x, y, z), specimen pixels, volume-centred.
    r_inner_px, r_outer_px : (m,)
        Inner and outer radii, pixels.
    density : (m,)
        Density inside the shell.
    """

    centers_px: np.ndarray
    r_inner_px: np.ndarray
    r_outer_px: np.ndarray
    density: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "centers_px", _f64(self.centers_px, (3,)))
        m = self.centers_px.shape[0]
        for name in ("r_inner_px", "r_outer_px", "density"):
            arr = _f64(getattr(self, name))
            if arr.shape != (m,):
                raise ValueError(f"Shells.{name}: expected shape ({m},), got {arr.shape}")
            object.__setattr__(self, name, arr)
        if np.any(self.r_inner_px < 0) or np.any(self.r_outer_px <= self.r_inner_px):
            raise ValueError("Shells: radii must satisfy 0 <= r_inner < r_outer")

    def __len__(self) -> int:
        return self.centers_px.shape[0]

    @classmethod
    def empty(cls) -> Shells:
        return cls(np.zeros((0, 3)), np.zeros(0), np.ones(0), np.zeros(0))

    @classmethod
    def concat(cls, parts: list[Shells]) -> Shells:
        parts = [p for p in parts if len(p)] or [cls.empty()]
        return cls(*(np.concatenate([getattr(p, k) for p in parts]) for k in ("centers_px", "r_inner_px", "r_outer_px", "density")))


def solid_spheres(centers_px: np.ndarray, radius_px: np.ndarray, density: np.ndarray) -> Shells:
    """Uniform solid spheres: shells with zero inner radius."""
    radius = _f64(radius_px)
    return Shells(centers_px, np.zeros_like(radius), radius, density)


@dataclass(frozen=True)
class Gaussians:
    """Isotropic 3-D Gaussians ``peak * exp(-|X - c|^2 / (2 sigma^2))``.

    Parameters
    ----------
    centers_px : (m, 3)
        Centres, specimen pixels, volume-centred.
    sigma_px : (m,)
        Standard deviations, pixels.
    peak : (m,)
        Peak densities.
    """

    centers_px: np.ndarray
    sigma_px: np.ndarray
    peak: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "centers_px", _f64(self.centers_px, (3,)))
        m = self.centers_px.shape[0]
        for name in ("sigma_px", "peak"):
            arr = _f64(getattr(self, name))
            if arr.shape != (m,):
                raise ValueError(f"Gaussians.{name}: expected shape ({m},), got {arr.shape}")
            object.__setattr__(self, name, arr)
        if np.any(self.sigma_px <= 0):
            raise ValueError("Gaussians.sigma_px: must be positive")

    def __len__(self) -> int:
        return self.centers_px.shape[0]

    @property
    def mass(self) -> np.ndarray:
        """Integral of each Gaussian over space."""
        return self.peak * (2.0 * np.pi) ** 1.5 * self.sigma_px**3

    @classmethod
    def empty(cls) -> Gaussians:
        return cls(np.zeros((0, 3)), np.ones(0), np.zeros(0))

    @classmethod
    def concat(cls, parts: list[Gaussians]) -> Gaussians:
        parts = [p for p in parts if len(p)] or [cls.empty()]
        return cls(*(np.concatenate([getattr(p, k) for p in parts]) for k in ("centers_px", "sigma_px", "peak")))


@dataclass(frozen=True)
class VoxelPhantom:
    """A density volume ``vol[z, y, x]`` centred on the specimen origin.

    ``voxel_size_px`` is the voxel edge in specimen pixels (voxel size in Å
    divided by the pixel size in Å).
    """

    volume: np.ndarray
    voxel_size_px: float = 1.0

    def __post_init__(self) -> None:
        vol = np.ascontiguousarray(self.volume, dtype=np.float32)
        if vol.ndim != 3 or vol.size == 0:
            raise ValueError(f"VoxelPhantom.volume: expected a non-empty 3-D array, got shape {vol.shape}")
        if not self.voxel_size_px > 0:
            raise ValueError(f"VoxelPhantom.voxel_size_px: expected a positive size, got {self.voxel_size_px}")
        object.__setattr__(self, "volume", vol)


@dataclass(frozen=True)
class Specimen:
    """Everything in the beam: gold, cellular content and the ice slab.

    Attributes
    ----------
    gold : Shells
        Gold beads; density is attenuation per pixel of path through gold.
    shells, gaussians : Shells, Gaussians
        Cellular content in protein-density units.
    voxels : VoxelPhantom or None
        Content given as a volume instead of (or besides) the primitives.
    thickness_px : float
        Ice thickness along the slab normal.
    slab_normal : (3,)
        Unit normal of the slab in specimen coordinates.
    """

    gold: Shells
    shells: Shells
    gaussians: Gaussians
    thickness_px: float
    slab_normal: np.ndarray = field(default_factory=lambda: np.array([0.0, 0.0, 1.0]))
    voxels: VoxelPhantom | None = None

    @property
    def bead_centers_px(self) -> np.ndarray:
        """(m, 3) centres of the gold beads."""
        return self.gold.centers_px

    def ice_path_px(self, tilt_deg: np.ndarray) -> np.ndarray:
        """Path length through the ice slab along the beam of each view, pixels.

        The beam runs along ``R_y(theta)^T e_z`` in specimen coordinates, so
        the path is ``thickness / |n . d|``: it grows as 1/cos(tilt) for a flat slab.
        """
        beam = rotation_y(np.asarray(tilt_deg, dtype=float))[..., 2, :]  # R_y^T e_z is row 2 of R_y
        return self.thickness_px / np.abs(beam @ self.slab_normal)


def _slab_rotation(cfg: SimulationConfig) -> np.ndarray:
    ax = np.deg2rad(cfg.specimen.slab_tilt_x_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    return rotation_y(cfg.specimen.slab_tilt_y_deg) @ rx


def _stage_excursion_px(cfg: SimulationConfig, n_views: int) -> float:
    """A generous bound on the stage shifts, from the configuration alone.

    The content region must not depend on the drawn shifts, so that a sweep over
    shift magnitude images the same specimen.
    """
    m = cfg.misalignment
    nm = (m.initial_offset_nm + m.shift_walk_nm * np.sqrt(n_views) + m.backlash_nm) * 2.0
    return nm * 10.0 / cfg.detector.pixel_size_A


def content_region_px(cfg: SimulationConfig, n_views: int) -> tuple[float, float]:
    """Half-extents (x, y), pixels, of the slab region that any view can see.

    A view at tilt theta sees specimen x up to ``(rho + d_z sin theta) / cos theta``,
    where rho is the view's half-diagonal plus the stage excursion.
    """
    h, w = cfg.detector.image_shape
    rho = 0.5 * np.hypot(h, w) + _stage_excursion_px(cfg, n_views)
    theta = np.deg2rad(max(abs(cfg.tilt.min_deg), abs(cfg.tilt.max_deg)) + abs(cfg.misalignment.tilt_offset_deg) + 1.0)
    half_z = 0.5 * cfg.specimen.thickness_nm * 10.0 / cfg.detector.pixel_size_A
    half_x = (rho + half_z * np.sin(theta)) / np.cos(theta)
    return float(half_x), float(rho)


CELL_NM = 200.0
"""Edge of the square cells of the slab in which content is drawn, nm.

Each cell's content comes from its own random stream keyed by (seed, kind,
cell), so the specimen depends only on the seed and the content settings: the
same cells appear whatever the bead count, the misalignment (which sets how
large a region is drawn) or the pixel size (``large`` images the cells of
``standard``)."""

_BEADS, _VESICLES, _ACTIN, _MICROTUBULES, _PROTEINS = range(5)


def _zigzag(i: int) -> int:
    """Map an integer to a non-negative one, one to one (0, -1, 1, -2, ... -> 0, 1, 2, 3, ...)."""
    return 2 * i if i >= 0 else -2 * i - 1


def _stream(seq: np.random.SeedSequence, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seq.entropy, spawn_key=tuple(seq.spawn_key) + key))


def _cells(seq: np.random.SeedSequence, kind: int, half: tuple[float, float], cell_px: float):
    """Yield ``(x0, y0, rng)`` for every cell overlapping ``|x| <= half[0], |y| <= half[1]``."""
    ix = range(int(np.floor(-half[0] / cell_px)), int(np.floor(half[0] / cell_px)) + 1)
    iy = range(int(np.floor(-half[1] / cell_px)), int(np.floor(half[1] / cell_px)) + 1)
    for i in ix:
        for j in iy:
            yield i * cell_px, j * cell_px, _stream(seq, kind, _zigzag(i), _zigzag(j))


def _in_cell(rng: np.random.Generator, k: int, x0: float, y0: float, cell_px: float, half_z) -> np.ndarray:
    """k uniform points in a cell of the slab frame, |z| <= half_z (scalar or per point)."""
    x = x0 + rng.uniform(0.0, cell_px, k)
    y = y0 + rng.uniform(0.0, cell_px, k)
    z = rng.uniform(-1.0, 1.0, k) * np.maximum(half_z, 0.0)
    return np.stack([x, y, z], axis=-1)


def _place_beads(cfg: SimulationConfig, rng: np.random.Generator, half_z: float, px_per_nm: float) -> np.ndarray:
    """Bead centres in the slab frame, inside the zero-tilt field of view, with minimum spacing."""
    b = cfg.beads
    if b.count == 0:
        return np.zeros((0, 3))
    radius = 0.5 * b.diameter_nm * px_per_nm
    h, w = cfg.detector.image_shape
    lim = np.array([0.45 * w - radius, 0.45 * h - radius])
    if np.any(lim <= 0):
        raise ConfigError(f"beads.diameter_nm: {b.diameter_nm} nm beads do not fit in a {w}x{h} px view")
    spacing = b.min_spacing_nm * px_per_nm
    zmax = max(half_z - radius, 0.0)
    found: list[np.ndarray] = []
    for _attempt in range(200 * b.count):
        xy = rng.uniform(-lim, lim)
        if spacing > 0 and found and np.min(np.hypot(*(np.array(found)[:, :2] - xy).T)) < spacing:
            continue
        if b.placement == "throughout":
            z = rng.uniform(-zmax, zmax)
        elif b.placement == "top":
            z = zmax
        elif b.placement == "bottom":
            z = -zmax
        else:
            z = zmax if rng.random() < 0.5 else -zmax
        found.append(np.array([xy[0], xy[1], z]))
        if len(found) == b.count:
            return np.array(found)
    raise ConfigError(
        f"beads: could not place {b.count} beads {b.min_spacing_nm} nm apart in the "
        f"{w}x{h} px field of view; lower beads.count or beads.min_spacing_nm"
    )


def _vesicles(cfg: SimulationConfig, rng: np.random.Generator, k: int, x0, y0, cell_px, half_z, px_per_nm) -> Shells:
    """Bilayer vesicles in one cell: two dense leaflets around a lighter hydrophobic core."""
    c = cfg.content
    if k == 0:
        return Shells.empty()
    w = c.membrane_thickness_nm * px_per_nm
    radius = rng.uniform(*c.vesicle_radius_nm, k) * px_per_nm
    # a vesicle larger than the ice is flattened in reality; here it shrinks to fit
    radius = np.minimum(radius, max(half_z - 1.0, 2 * w))
    centers = _in_cell(rng, k, x0, y0, cell_px, half_z - radius)
    # (inner fraction, outer fraction, density) of the membrane, outside in
    layers = ((0.7, 1.0, 1.0), (0.3, 0.7, 0.4), (0.0, 0.3, 1.0))
    return Shells.concat([Shells(centers, radius - w + lo * w, radius - w + hi * w, np.full(k, d)) for lo, hi, d in layers])


def _filament(
    rng: np.random.Generator,
    start: np.ndarray,
    length: float,
    curvature: float,
    *,
    rise: float,
    radius: float,
    twist_rad: float,
    n_strands: int,
    strand_stagger: float,
) -> np.ndarray:
    """Subunit centres of a helical filament along a circular arc (straight when curvature is 0).

    The axis is ``c(s) = c0 + t0 sin(ks)/k + n0 (1 - cos(ks))/k``; subunit j of
    strand p sits at arc length ``j rise + p stagger`` and azimuth
    ``j twist + 2 pi p / n_strands`` around the axis.
    """
    az = rng.uniform(0, 2 * np.pi)
    el = rng.normal(0.0, np.deg2rad(4.0))
    t0 = np.array([np.cos(az) * np.cos(el), np.sin(az) * np.cos(el), np.sin(el)])
    ref = np.array([0.0, 0.0, 1.0]) if abs(t0[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    n0 = np.cross(t0, ref)
    n0 /= np.linalg.norm(n0)
    b0 = np.cross(t0, n0)
    bend = rng.uniform(0, 2 * np.pi)  # which way the arc bends, around the tangent
    n0, b0 = np.cos(bend) * n0 + np.sin(bend) * b0, -np.sin(bend) * n0 + np.cos(bend) * b0
    j = np.arange(int(length / rise))
    p = np.arange(n_strands)
    s = (j[:, None] * rise + p[None, :] * strand_stagger).ravel()
    psi = (j[:, None] * twist_rad + 2 * np.pi * p[None, :] / n_strands).ravel()
    if curvature > 1e-12:
        ks = curvature * s
        axis = start + np.outer(np.sin(ks) / curvature, t0) + np.outer((1 - np.cos(ks)) / curvature, n0)
        normal = -np.outer(np.sin(ks), t0) + np.outer(np.cos(ks), n0)
    else:
        axis = start + np.outer(s, t0)
        normal = np.tile(n0, (s.size, 1))
    return axis + radius * (np.cos(psi)[:, None] * normal + np.sin(psi)[:, None] * b0)


# (rise nm, helix radius nm, twist deg, strands, stagger nm, subunit radius nm)
_FILAMENT_KINDS = {
    _ACTIN: (2.75, 2.0, -166.7, 1, 0.0, 2.5),
    _MICROTUBULES: (4.0, 11.5, 0.0, 13, 12.0 / 13.0, 2.6),
}


def _filaments(cfg: SimulationConfig, rng: np.random.Generator, k: int, x0, y0, cell_px, half_z, px_per_nm, kind: int) -> Gaussians:
    """k actin-like or microtubule-like filaments starting in one cell."""
    c = cfg.content
    kappa_max = c.filament_curvature_per_um / 1000.0 / px_per_nm
    rise, rad, twist, strands, stagger, sub_r = _FILAMENT_KINDS[kind]
    sigma = GAUSSIAN_SIGMA_PER_RADIUS * sub_r * px_per_nm
    parts = []
    for _ in range(k):
        length = rng.uniform(*c.filament_length_nm) * px_per_nm
        start = _in_cell(rng, 1, x0, y0, cell_px, half_z - sigma)[0]
        centers = _filament(
            rng,
            start,
            length,
            rng.uniform(0.0, kappa_max),
            rise=rise * px_per_nm,
            radius=rad * px_per_nm,
            twist_rad=np.deg2rad(twist),
            n_strands=strands,
            strand_stagger=stagger * px_per_nm,
        )
        # a filament ends where it meets the ice surface
        inside = np.abs(centers[:, 2]) <= half_z - sigma
        parts.append(Gaussians(centers[inside], np.full(inside.sum(), sigma), np.ones(inside.sum())))
    return Gaussians.concat(parts)


def _proteins(cfg: SimulationConfig, rng: np.random.Generator, k: int, x0, y0, cell_px, half_z, px_per_nm) -> Gaussians:
    """k protein-sized Gaussians in one cell, radii log-uniform in the configured range."""
    lo, hi = cfg.content.protein_radius_nm
    radius = np.exp(rng.uniform(np.log(lo), np.log(hi), k)) * px_per_nm
    centers = _in_cell(rng, k, x0, y0, cell_px, half_z - radius)
    return Gaussians(centers, GAUSSIAN_SIGMA_PER_RADIUS * radius, np.ones(k))


def make_specimen(
    cfg: SimulationConfig, seed: np.random.SeedSequence, n_views: int, voxels: VoxelPhantom | None = None
) -> Specimen:
    """Draw a specimen for a configuration.

    Content counts in ``cfg.content`` are mean numbers per field of view. The
    slab region that the tilted, shifted views can see is tiled with square
    cells of :data:`CELL_NM`; each cell draws a Poisson number of each kind of
    object from its own stream, so the specimen is the same wherever two
    configurations overlap. Gold beads, from a stream of their own, are placed
    inside the zero-tilt field of view. ``voxels``, when given, replaces the
    analytic cellular content.

    Parameters
    ----------
    cfg : SimulationConfig
    seed : numpy.random.SeedSequence
        The specimen's seed; every stream is derived from it.
    n_views : int
        Number of views (sets the stage-excursion margin of the region drawn).
    voxels : VoxelPhantom, optional
    """
    px_per_nm = 10.0 / cfg.detector.pixel_size_A
    half_z = 0.5 * cfg.specimen.thickness_nm * px_per_nm
    half = content_region_px(cfg, n_views)
    h, w = cfg.detector.image_shape
    cell_px = CELL_NM * px_per_nm
    per_cell = cell_px**2 / float(h * w)  # expected objects per cell for one per field of view
    rot = _slab_rotation(cfg)

    beads = _place_beads(cfg, _stream(seed, _BEADS), half_z, px_per_nm)
    radius = 0.5 * cfg.beads.diameter_nm * px_per_nm
    gold = solid_spheres(beads @ rot.T, np.full(len(beads), radius), np.full(len(beads), cfg.beads.attenuation_per_nm / px_per_nm))

    c = cfg.content
    shells, gauss = [], []
    if voxels is None:
        args = (half_z, px_per_nm)
        for kind, count in ((_VESICLES, c.vesicles), (_ACTIN, c.actin_filaments), (_MICROTUBULES, c.microtubules), (_PROTEINS, c.proteins)):
            if count == 0:
                continue
            for x0, y0, rng in _cells(seed, kind, half, cell_px):
                k = int(rng.poisson(count * per_cell))
                if kind == _VESICLES:
                    shells.append(_vesicles(cfg, rng, k, x0, y0, cell_px, *args))
                elif kind == _PROTEINS:
                    gauss.append(_proteins(cfg, rng, k, x0, y0, cell_px, *args))
                else:
                    gauss.append(_filaments(cfg, rng, k, x0, y0, cell_px, *args, kind=kind))
    shells_all, gauss_all = Shells.concat(shells), Gaussians.concat(gauss)
    log.info(
        "specimen: %d beads; %d shells and %d Gaussians of content over %.0f x %.0f px",
        len(beads), len(shells_all), len(gauss_all), 2 * half[0], 2 * half[1],
    )
    return Specimen(
        gold=gold,
        shells=Shells(shells_all.centers_px @ rot.T, shells_all.r_inner_px, shells_all.r_outer_px, shells_all.density),
        gaussians=Gaussians(gauss_all.centers_px @ rot.T, gauss_all.sigma_px, gauss_all.peak),
        thickness_px=2 * half_z,
        slab_normal=rot @ np.array([0.0, 0.0, 1.0]),
        voxels=voxels,
    )

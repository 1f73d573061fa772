"""Tilt series and volumes as MRC files (MRC2014, float32, mode 2).

A tilt series is an image stack ``stack[view, row, col]`` of shape (n, h, w),
views sorted by nominal tilt (DESIGN.md section 3); a volume is
``vol[z, y, x]``. The pixel (voxel) size in Ångström lives in the header as
``cella / (mx, my, mz)``.

Readers are strict (``mrcfile`` with ``permissive=False``) and raise
:class:`~simtomo.errors.FileFormatError` naming the file, the field, what was
found and what was expected. Writers go through a temporary file beside the
target that is renamed into place only when complete, and write no
timestamps, so the same data gives the same bytes.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import os
import warnings
from pathlib import Path
from types import TracebackType

import mrcfile
import numpy as np

from simtomo.errors import FileFormatError
from simtomo.io._json import check_file, temporary_path

__all__ = [
    "read_stack",
    "read_volume",
    "write_stack",
    "write_volume",
    "StackWriter",
]

logger = logging.getLogger(__name__)

#: The single header label simtomo writes. mrcfile's default label carries the
#: creation time, which would make two writes of the same data differ.
HEADER_LABEL = "Created by simtomo"

_HEADER_NBYTES = 1024
_MODE_NAMES = {0: "int8", 1: "int16", 2: "float32", 3: "complex int16", 4: "complex64", 6: "uint16", 12: "float16"}


# ----------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------


def read_stack(
    path: str | os.PathLike,
    *,
    mmap: bool = False,
    pixel_size_A: float | None = None,
) -> tuple[np.ndarray, float]:
    """Read a tilt series.

    Parameters
    ----------
    path : path-like
        The MRC file.
    mmap : bool, optional
        Memory-map the data instead of reading it. The returned array is then a
        read-only ``numpy.memmap`` when the file is native-endian float32; any
        other mode is converted to float32 in memory.
    pixel_size_A : float, optional
        Pixel size in Å to use instead of the header's, e.g. for files written
        without one. When omitted the header must hold a positive, square pixel.

    Returns
    -------
    stack : (n, h, w) float32 array
        ``stack[view, row, col]``, views in file order (sorted by nominal tilt,
        DESIGN.md section 3).
    pixel_size_A : float
        Pixel size in Å (``cella.x / mx``, rounded to 6 significant digits to
        undo the float32 header storage, so 1.35 reads back as 1.35).

    Raises
    ------
    FileFormatError
        If the file is missing, not an MRC file, truncated, a single image
        (2-D) or a volume stack (4-D), holds 0 views, complex data, NaN or
        infinite values, or has no usable pixel size.
    """
    return _read_mrc(path, mmap=mmap, what="tilt series", override_A=pixel_size_A)


def read_volume(
    path: str | os.PathLike,
    *,
    mmap: bool = False,
    voxel_size_A: float | None = None,
) -> tuple[np.ndarray, float]:
    """Read a volume ``vol[z, y, x]``.

    Parameters
    ----------
    path : path-like
        The MRC file.
    mmap : bool, optional
        Memory-map the data (see :func:`read_stack`).
    voxel_size_A : float, optional
        Voxel size in Å to use instead of the header's, e.g. for files written
        without one. When omitted the header must hold a positive, cubic voxel.

    Returns
    -------
    volume : (d, h, w) float32 array
        ``vol[z, y, x]``, centred as in DESIGN.md section 3.
    voxel_size_A : float
        Voxel size in Å (``cella / (mx, my, mz)``, rounded to 6 significant
        digits).

    Raises
    ------
    FileFormatError
        As :func:`read_stack`; a 2-D image, an empty volume or non-cubic
        voxels (all three sizes are given) are rejected.
    """
    return _read_mrc(path, mmap=mmap, what="volume", override_A=voxel_size_A)


def _read_mrc(
    path: str | os.PathLike, *, mmap: bool, what: str, override_A: float | None
) -> tuple[np.ndarray, float]:
    name = os.fspath(path)
    check_file(name, "an MRC file")
    opener = mrcfile.mmap if mmap else mrcfile.open
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with opener(name, mode="r", permissive=False) as mrc:
                header = mrc.header.copy()
                data = mrc.data
        except (ValueError, OSError) as err:
            raise FileFormatError(f"{name}: {_diagnose(name)}: {err}") from None
    for w in caught:
        message = str(w.message)
        if "larger than expected" in message:
            # A file longer than its header says usually means the header's
            # dimensions are wrong, so the data would be read with the wrong shape.
            raise FileFormatError(
                f"{name}: {message} from its header "
                f"(nx={int(header.nx)}, ny={int(header.ny)}, nz={int(header.nz)}, mode={int(header.mode)}); "
                "expected the file size to match the header"
            )
        logger.warning("%s: mrcfile: %s", name, message)

    mode = int(header.mode)
    if np.iscomplexobj(data):
        raise FileFormatError(
            f"{name}: header field mode: found {mode} ({_MODE_NAMES.get(mode, '?')}), expected real data (mode 2, float32)"
        )
    if data.ndim == 2:
        raise FileFormatError(
            f"{name}: found a single 2-D image of shape {data.shape} (nz=1), expected a 3-D {what}"
            + ("; a single image is not a tilt series" if what == "tilt series" else "")
        )
    if data.ndim != 3:
        raise FileFormatError(
            f"{name}: found a {data.ndim}-D volume stack of shape {data.shape} (ispg={int(header.ispg)}), expected a 3-D {what}"
        )
    sections = "views" if what == "tilt series" else "sections"
    if data.shape[0] == 0:
        raise FileFormatError(f"{name}: header field nz: found 0 {sections}, expected at least 1 (empty {what})")
    if data.shape[1] == 0 or data.shape[2] == 0:
        raise FileFormatError(f"{name}: header fields ny, nx: found {data.shape[1:]}, expected positive image dimensions")

    if mmap and data.dtype == np.dtype(np.float32):
        out = data
    else:
        if mmap:
            logger.info("%s: mode %d is not native float32; converting in memory despite mmap=True", name, mode)
        out = np.array(data, dtype=np.float32)
    # Checked one section at a time so a memory-mapped 4 GB file needs no
    # 4 GB temporary.
    for i in range(out.shape[0]):
        if not np.all(np.isfinite(out[i])):
            kind = "NaN" if np.isnan(out[i]).any() else "infinite"
            raise FileFormatError(
                f"{name}: {what} {sections[:-1]} {i} (0-based) contains {kind} values; expected finite data"
            )
    return out, _pixel_size(name, header, override_A, volume=what == "volume")


def _pixel_size(name: str, header: np.recarray, override_A: float | None, *, volume: bool) -> float:
    """Pixel size from the header, or the caller's override.

    A tilt series needs square pixels (its z cell size is the view spacing and
    is not read); a volume needs cubic voxels.
    """
    argument = "voxel_size_A" if volume else "pixel_size_A"
    if override_A is not None:
        value = float(override_A)
        if not (np.isfinite(value) and value > 0):
            raise ValueError(f"{argument}: expected a positive number, got {override_A!r}")
        return value
    axes = (("x", header.cella.x, header.mx), ("y", header.cella.y, header.my), ("z", header.cella.z, header.mz))
    sizes = []
    for axis, cell, n in axes[: 3 if volume else 2]:
        n = int(n)
        cell = float(cell)
        size = cell / n if n > 0 else 0.0
        if not (np.isfinite(size) and size > 0):
            raise FileFormatError(
                f"{name}: header voxel_size.{axis} (cella.{axis} / m{axis} = {cell!r} / {n}): found {size!r}, "
                "expected a positive pixel size in Å. The pixel size is unset; set it in the file "
                f"(mrcfile: mrc.voxel_size = 8.0; IMOD: alterheader -del 8,8,8) or pass {argument}=..."
            )
        # cella is float32: rounding to 6 significant digits recovers the
        # decimal value that was written (float32 holds ~7.2 digits).
        sizes.append(float(f"{size:.6g}"))
    if volume and not sizes[0] == sizes[1] == sizes[2]:
        x, y, z = sizes
        raise FileFormatError(
            f"{name}: header voxel size x={x:g}, y={y:g}, z={z:g} Å; expected cubic voxels; "
            "pass voxel_size_A=... to override"
        )
    if sizes[0] != sizes[1]:
        raise FileFormatError(
            f"{name}: header voxel_size: found x = {sizes[0]} Å, y = {sizes[1]} Å, expected square pixels; "
            "pass pixel_size_A=... to override"
        )
    return sizes[0]


def _diagnose(name: str) -> str:
    """A short cause for an MRC file mrcfile refused, found from its size and header."""
    try:
        size = os.path.getsize(name)
    except OSError:
        return "cannot read the file"
    if size < _HEADER_NBYTES:
        return f"not an MRC file (file is {size} bytes, shorter than the {_HEADER_NBYTES}-byte MRC header)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(name, mode="r", permissive=False, header_only=True) as mrc:
                h = mrc.header
                nx, ny, nz, mode, nsymbt = int(h.nx), int(h.ny), int(h.nz), int(h.mode), int(h.nsymbt)
    except (ValueError, OSError):
        return "not an MRC file or corrupt header"
    try:
        itemsize = mrcfile.utils.dtype_from_mode(mode).itemsize
    except ValueError:
        return f"header field mode: unsupported MRC mode {mode}"
    expected = nx * ny * nz * itemsize
    found = size - _HEADER_NBYTES - nsymbt
    if found < expected:
        return (
            f"truncated MRC file: header says {nz} x {ny} x {nx} {_MODE_NAMES.get(mode, f'mode {mode}')} "
            f"= {expected} bytes of data, file holds {max(found, 0)}"
        )
    return "unreadable MRC file"


# ----------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------


class _MrcWriter:
    """Section-by-section float32 MRC writer behind :class:`StackWriter`, write_stack and write_volume."""

    def __init__(
        self,
        path: str | os.PathLike,
        shape: tuple[int, int, int],
        size_A: float,
        *,
        image_stack: bool,
        size_argument: str,
    ) -> None:
        self._noun = "view" if image_stack else "section"
        n, h, w = (int(v) for v in shape)
        if h <= 0 or w <= 0:
            raise ValueError(f"image_shape: expected (h, w) > 0, got {(h, w)}")
        if image_stack and n < 2:
            raise ValueError(
                f"n_views: expected at least 2 views, got {n}; a one-view MRC stack reads back as a "
                "single image, which is not a tilt series"
            )
        if n < 1:
            raise ValueError(f"shape: expected at least 1 section, got {n}")
        try:
            size = float(size_A)
        except (TypeError, ValueError):
            size = np.nan
        if not (np.isfinite(size) and size > 0):
            raise ValueError(f"{size_argument}: expected a positive number of Å, got {size_A!r}")
        self.path = Path(path)
        self.shape = (n, h, w)
        self._tmp = temporary_path(self.path)
        self._written = np.zeros(n, dtype=bool)
        # Per-section statistics, combined in index order at close so that the
        # header does not depend on the order the sections were written in.
        self._min = np.zeros(n)
        self._max = np.zeros(n)
        self._mean = np.zeros(n)
        self._m2 = np.zeros(n)
        self._closed = False
        self._mrc = None
        try:
            self._mrc = mrcfile.new_mmap(str(self._tmp), shape=self.shape, mrc_mode=2, overwrite=False)
            if image_stack:
                self._mrc.set_image_stack()
            else:
                self._mrc.set_volume()
            self._mrc.voxel_size = size
            self._mrc.header.label[0] = HEADER_LABEL
            self._mrc.header.nlabl = 1
        except BaseException:
            self.abort()
            raise

    def __setitem__(self, index: int, section: np.ndarray) -> None:
        if self._closed:
            raise ValueError(f"{self.path}: writer is closed")
        n = self.shape[0]
        try:
            i = operator.index(index)
        except TypeError:
            i = None
        if i is None or isinstance(index, bool) or not 0 <= i < n:
            raise IndexError(f"{self.path}: {self._noun} index: expected an integer in [0, {n}), got {index!r}")
        arr = np.asarray(section)
        if arr.shape != self.shape[1:]:
            raise ValueError(f"{self.path}: {self._noun} {i}: expected shape {self.shape[1:]}, got {arr.shape}")
        if np.iscomplexobj(arr) or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise ValueError(f"{self.path}: {self._noun} {i}: expected real numbers, got dtype {arr.dtype}")
        arr32 = np.asarray(arr, dtype=np.float32)
        if not np.all(np.isfinite(arr32)):
            kind = "NaN" if np.isnan(arr32).any() else "infinite (or beyond float32 range)"
            raise ValueError(f"{self.path}: {self._noun} {i}: contains {kind} values; expected finite data")
        self._mrc.data[i] = arr32
        self._min[i] = float(arr32.min())
        self._max[i] = float(arr32.max())
        mean = float(arr32.mean(dtype=np.float64))
        self._mean[i] = mean
        self._m2[i] = float(np.sum(np.square(arr32.astype(np.float64) - mean)))
        self._written[i] = True

    def close(self) -> None:
        """Write the header statistics and rename the finished file into place."""
        if self._closed:
            return
        missing = np.flatnonzero(~self._written)
        if missing.size:
            self.abort()
            shown = ", ".join(str(int(v)) for v in missing[:10]) + (", ..." if missing.size > 10 else "")
            raise ValueError(
                f"{self.path}: {missing.size} of {self.shape[0]} {self._noun}s never written ({shown}); "
                "nothing was written"
            )
        try:
            per_section = self.shape[1] * self.shape[2]
            mean = float(np.mean(self._mean))
            # Chan et al.'s pairwise combination of per-section moments: exact
            # in float64 where a running sum of squares would cancel.
            m2 = float(np.sum(self._m2) + per_section * np.sum(np.square(self._mean - mean)))
            header = self._mrc.header
            header.dmin = np.float32(self._min.min())
            header.dmax = np.float32(self._max.max())
            header.dmean = np.float32(mean)
            header.rms = np.float32(np.sqrt(m2 / (per_section * self.shape[0])))
            self._mrc.close()
            # Flushed to disk before the rename so a crash cannot leave a
            # complete-looking name over incomplete data.
            fd = os.open(self._tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        logger.debug("wrote %s %s", self.path, self.shape)

    def abort(self) -> None:
        """Discard the temporary file; the target is left untouched."""
        self._closed = True
        if self._mrc is not None:
            # Already closed or half-open: the file is removed anyway.
            with contextlib.suppress(Exception):
                self._mrc.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp)


class StackWriter:
    """Write a tilt series view by view without holding it in memory.

    The views go into a memory-mapped temporary file beside ``path``; on a
    clean exit the header statistics (dmin, dmax, dmean, rms, accumulated per
    view as written) are set and the file is renamed into place. On an
    exception the temporary file is removed and ``path`` is untouched. The
    result is byte-identical to :func:`write_stack` of the same views.

    Parameters
    ----------
    path : path-like
        Target MRC file (replaced if it exists).
    n_views : int
        Number of views (at least 2).
    image_shape : (h, w)
        Shape of each view.
    pixel_size_A : float
        Pixel size in Å, stored in the header.

    Examples
    --------
    >>> with StackWriter("series.mrc", 41, (128, 128), 8.0) as writer:  # doctest: +SKIP
    ...     for i in range(41):
    ...         writer[i] = simulate_view(i)
    """

    def __init__(
        self,
        path: str | os.PathLike,
        n_views: int,
        image_shape: tuple[int, int],
        pixel_size_A: float,
    ) -> None:
        shape = tuple(int(v) for v in image_shape)
        if len(shape) != 2:
            raise ValueError(f"image_shape: expected (h, w), got {image_shape!r}")
        self._writer = _MrcWriter(
            path, (int(n_views), *shape), pixel_size_A, image_stack=True, size_argument="pixel_size_A"
        )

    @property
    def path(self) -> Path:
        """The target file."""
        return self._writer.path

    @property
    def shape(self) -> tuple[int, int, int]:
        """(n_views, h, w)."""
        return self._writer.shape

    def __setitem__(self, index: int, view: np.ndarray) -> None:
        """Write view ``index`` (0-based), an (h, w) array of finite real values."""
        self._writer[index] = view

    def close(self) -> None:
        """Finish the file (as a clean ``with`` exit does). Raises if a view is missing."""
        self._writer.close()

    def abort(self) -> None:
        """Discard everything written so far."""
        self._writer.abort()

    def __enter__(self) -> StackWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _write_sections(
    path: str | os.PathLike, data: np.ndarray, size_A: float, *, image_stack: bool, size_argument: str
) -> None:
    arr = np.asarray(data)
    what = "tilt series (n, h, w)" if image_stack else "volume (d, h, w)"
    if arr.ndim != 3:
        raise ValueError(f"data: expected a 3-D {what}, got shape {arr.shape}")
    writer = _MrcWriter(path, arr.shape, size_A, image_stack=image_stack, size_argument=size_argument)
    try:
        for i in range(arr.shape[0]):
            writer[i] = arr[i]
    except BaseException:
        writer.abort()
        raise
    writer.close()


def write_stack(path: str | os.PathLike, data: np.ndarray, pixel_size_A: float) -> None:
    """Write a tilt series as a float32 MRC image stack (mode 2, ispg 0).

    Parameters
    ----------
    path : path-like
        Target file, replaced atomically.
    data : (n, h, w) array
        ``stack[view, row, col]``, n >= 2, finite real values (stored as float32).
    pixel_size_A : float
        Pixel size in Å, stored as the header voxel size.

    Raises
    ------
    ValueError
        If the data are not 3-D, hold fewer than 2 views, or contain NaN or
        infinite values (the first bad view is named).
    """
    _write_sections(path, data, pixel_size_A, image_stack=True, size_argument="pixel_size_A")


def write_volume(path: str | os.PathLike, data: np.ndarray, voxel_size_A: float) -> None:
    """Write a volume ``vol[z, y, x]`` as a float32 MRC volume (mode 2, ispg 1).

    Parameters
    ----------
    path : path-like
        Target file, replaced atomically.
    data : (d, h, w) array
        Finite real values (stored as float32).
    voxel_size_A : float
        Voxel size in Å (cubic voxels).

    Raises
    ------
    ValueError
        If the data are not 3-D or contain NaN or infinite values.
    """
    _write_sections(path, data, voxel_size_A, image_stack=False, size_argument="voxel_size_A")

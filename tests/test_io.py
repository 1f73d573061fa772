"""File formats: exact round trips, deterministic bytes and strict, specific rejection."""

from __future__ import annotations

import json
import os
import re
import struct
import warnings

import mrcfile
import numpy as np
import pytest

from simtomo.errors import FileFormatError
from simtomo.geometry import Geometry
from simtomo.io import (
    StackWriter,
    Truth,
    geometry_from_dict,
    geometry_to_dict,
    read_geometry,
    read_rawtlt,
    read_stack,
    read_truth,
    read_volume,
    write_geometry,
    write_rawtlt,
    write_stack,
    write_truth,
    write_volume,
)

# ---------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------


@pytest.fixture
def stack() -> np.ndarray:
    rng = np.random.default_rng(7)
    # A large offset makes a naive sum-of-squares rms visibly wrong.
    return (1000.0 + rng.normal(0.0, 3.0, size=(5, 12, 9))).astype(np.float32)


@pytest.fixture
def geometry() -> Geometry:
    rng = np.random.default_rng(3)
    n = 7
    return Geometry(
        tilt_deg=np.linspace(-60, 60, n) + rng.normal(0, 0.2, n),
        rot_deg=85.0 + rng.normal(0, 0.2, n),
        mag=1.0 + rng.normal(0, 0.003, n),
        shift_px=rng.normal(0, 50, (n, 2)),
        image_shape=(128, 96),
        pixel_size_A=1.35,
    )


@pytest.fixture
def truth(geometry: Geometry) -> Truth:
    n = geometry.n_views
    rng = np.random.default_rng(11)
    return Truth(
        geometry=geometry,
        beads_px=rng.normal(0, 30, (4, 3)),
        nominal_tilt_deg=np.linspace(-60, 60, n),
        acquisition_order=np.array([3, 4, 2, 5, 1, 6, 0]),
        dose_e_per_A2=np.full(n, 120.0 / n),
        nominal_tilt_axis_deg=85.0,
        seed=1234,
        config={"name": "tiny", "detector": {"image_shape": [128, 96], "pixel_size_A": 1.35}, "noise": None},
        simtomo_version="0.1.0",
    )


def _write_raw_mrc(path, data: np.ndarray, *, voxel_size: float = 1.0, image_stack: bool = True) -> None:
    """An MRC written by mrcfile directly, bypassing simtomo's checks."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mrcfile warns about NaN in header stats
        with mrcfile.new(str(path), overwrite=True) as mrc:
            mrc.set_data(data)
            if image_stack and data.ndim == 3:
                mrc.set_image_stack()
            mrc.voxel_size = voxel_size


def _json_file(path, document) -> str:
    path.write_text(json.dumps(document))
    return str(path)


# ---------------------------------------------------------------------------
# MRC
# ---------------------------------------------------------------------------


def test_stack_round_trip_is_bit_exact(tmp_path, stack):
    path = tmp_path / "s.mrc"
    write_stack(path, stack, 1.35)
    data, pixel = read_stack(path)
    assert data.dtype == np.float32 and data.shape == stack.shape
    assert np.array_equal(data, stack)
    assert pixel == 1.35
    with mrcfile.open(path) as mrc:
        assert int(mrc.header.mode) == 2
        assert int(mrc.header.ispg) == 0  # image stack
    mapped, pixel = read_stack(path, mmap=True)
    assert np.array_equal(mapped, stack) and pixel == 1.35
    # No temporary files left beside the target.
    assert sorted(os.listdir(tmp_path)) == ["s.mrc"]


def test_volume_round_trip_is_bit_exact(tmp_path, stack):
    path = tmp_path / "v.mrc"
    write_volume(path, stack, 16.0)
    data, voxel = read_volume(path)
    assert np.array_equal(data, stack) and voxel == 16.0
    with mrcfile.open(path) as mrc:
        assert int(mrc.header.ispg) == 1
        assert tuple(mrc.voxel_size.item()) == (16.0, 16.0, 16.0)


def test_same_data_gives_same_bytes(tmp_path, stack):
    write_stack(tmp_path / "a.mrc", stack, 8.0)
    write_stack(tmp_path / "b.mrc", stack, 8.0)
    assert (tmp_path / "a.mrc").read_bytes() == (tmp_path / "b.mrc").read_bytes()
    # Two writes within one second would match even with a timestamp label.
    assert not re.search(rb"\d\d:\d\d:\d\d", (tmp_path / "a.mrc").read_bytes()[:1024])
    write_volume(tmp_path / "c.mrc", stack, 8.0)
    write_volume(tmp_path / "d.mrc", stack, 8.0)
    assert (tmp_path / "c.mrc").read_bytes() == (tmp_path / "d.mrc").read_bytes()


def test_stack_writer_matches_write_stack_and_header_stats(tmp_path, stack):
    write_stack(tmp_path / "whole.mrc", stack, 8.0)
    with StackWriter(tmp_path / "views.mrc", stack.shape[0], stack.shape[1:], 8.0) as writer:
        for i in (3, 0, 4, 1, 2):  # order of writing must not matter
            writer[i] = stack[i]
    assert (tmp_path / "views.mrc").read_bytes() == (tmp_path / "whole.mrc").read_bytes()
    with mrcfile.open(tmp_path / "views.mrc") as mrc:
        h = mrc.header
        assert float(h.dmin) == stack.min()
        assert float(h.dmax) == stack.max()
        ref = stack.astype(np.float64)
        assert float(h.dmean) == pytest.approx(ref.mean(), rel=2e-7)
        assert float(h.rms) == pytest.approx(ref.std(), rel=2e-6)
        assert float(h.rms) == pytest.approx(float(stack.std()), rel=1e-5)


def test_stack_writer_rejects_bad_views_and_cleans_up(tmp_path, stack):
    target = tmp_path / "s.mrc"
    with pytest.raises(ValueError, match=r"view 2: expected shape \(12, 9\), got \(12, 8\)"):
        with StackWriter(target, 5, (12, 9), 8.0) as writer:
            writer[2] = stack[2][:, :8]
    bad = stack[1].copy()
    bad[4, 4] = np.nan
    with pytest.raises(ValueError, match="view 1: contains NaN"):
        with StackWriter(target, 5, (12, 9), 8.0) as writer:
            writer[1] = bad
    with pytest.raises(ValueError, match=r"2 of 5 views never written \(3, 4\)"):
        with StackWriter(target, 5, (12, 9), 8.0) as writer:
            for i in range(3):
                writer[i] = stack[i]
    with pytest.raises(IndexError, match=r"\[0, 5\)"):
        with StackWriter(target, 5, (12, 9), 8.0) as writer:
            writer[5] = stack[0]
    assert os.listdir(tmp_path) == []  # no target, no temporary file


def test_failed_write_keeps_previous_file(tmp_path, stack):
    target = tmp_path / "s.mrc"
    write_stack(target, stack, 8.0)
    before = target.read_bytes()
    with pytest.raises(RuntimeError):
        with StackWriter(target, 5, (12, 9), 8.0) as writer:
            writer[0] = stack[0] + 1
            raise RuntimeError("simulation failed")
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["s.mrc"]


def test_write_stack_rejects_nan_naming_the_view(tmp_path, stack):
    stack[3, 0, 0] = np.inf
    with pytest.raises(ValueError, match="view 3: contains infinite"):
        write_stack(tmp_path / "s.mrc", stack, 8.0)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("mmap", [False, True])
def test_truncated_mrc_rejected(tmp_path, stack, mmap):
    path = tmp_path / "cut.mrc"
    write_stack(path, stack, 8.0)
    raw = path.read_bytes()
    path.write_bytes(raw[:-100])
    n = stack.size * 4
    with pytest.raises(FileFormatError, match=rf"cut\.mrc: truncated MRC file: .*= {n} bytes of data, file holds {n - 100}"):
        read_stack(path, mmap=mmap)


def test_garbage_and_short_files_rejected(tmp_path):
    garbage = tmp_path / "garbage.mrc"
    garbage.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(FileFormatError, match=r"garbage\.mrc: not an MRC file or corrupt header.*Map ID"):
        read_stack(garbage)
    short = tmp_path / "short.mrc"
    short.write_bytes(b"MAP ")
    with pytest.raises(FileFormatError, match=r"short\.mrc: not an MRC file \(file is 4 bytes"):
        read_stack(short)
    with pytest.raises(FileFormatError, match=r"missing\.mrc: no such file"):
        read_stack(tmp_path / "missing.mrc")


def test_file_longer_than_header_says_rejected(tmp_path, stack):
    path = tmp_path / "long.mrc"
    write_stack(path, stack, 8.0)
    path.write_bytes(path.read_bytes() + b"\0" * 8)
    with pytest.raises(FileFormatError, match=r"long\.mrc: MRC file is 8 bytes larger than expected"):
        read_stack(path)


def test_single_image_is_not_a_tilt_series(tmp_path, stack):
    path = tmp_path / "image.mrc"
    _write_raw_mrc(path, stack[0])
    with pytest.raises(FileFormatError, match=r"image\.mrc: found a single 2-D image of shape \(12, 9\).*not a tilt series"):
        read_stack(path)
    with pytest.raises(FileFormatError, match=r"image\.mrc: found a single 2-D image .*expected a 3-D volume"):
        read_volume(path)


def test_nan_stack_names_the_first_bad_view(tmp_path, stack):
    stack[2, 5, 5] = np.nan
    stack[4, 0, 0] = np.nan
    path = tmp_path / "nan.mrc"
    _write_raw_mrc(path, stack)
    with pytest.raises(FileFormatError, match=r"nan\.mrc: tilt series view 2 \(0-based\) contains NaN"):
        read_stack(path)
    with pytest.raises(FileFormatError, match=r"nan\.mrc: volume section 2 \(0-based\) contains NaN"):
        read_volume(path)


def test_zero_view_stack_rejected(tmp_path, stack):
    path = tmp_path / "empty.mrc"
    _write_raw_mrc(path, stack)
    header = bytearray(path.read_bytes()[:1024])
    header[8:12] = struct.pack("<i", 0)  # nz = 0, and no data block
    path.write_bytes(bytes(header))
    with pytest.raises(FileFormatError, match=r"empty\.mrc: header field nz: found 0 views"):
        read_stack(path)


def test_unset_pixel_size_rejected_unless_given(tmp_path, stack):
    path = tmp_path / "nopix.mrc"
    _write_raw_mrc(path, stack, voxel_size=0.0)
    with pytest.raises(FileFormatError, match=r"nopix\.mrc: header voxel_size\.x .*found 0\.0.*pixel_size_A="):
        read_stack(path)
    data, pixel = read_stack(path, pixel_size_A=4.2)
    assert pixel == 4.2 and np.array_equal(data, stack)


def test_non_cubic_volume_rejected_unless_voxel_size_given(tmp_path, stack):
    path = tmp_path / "aniso.mrc"
    _write_raw_mrc(path, stack, voxel_size=(8.0, 8.0, 16.0), image_stack=False)
    with pytest.raises(
        FileFormatError, match=r"aniso\.mrc: header voxel size x=8, y=8, z=16 Å; expected cubic voxels"
    ):
        read_volume(path)
    data, voxel = read_volume(path, voxel_size_A=8.0)
    assert voxel == 8.0 and np.array_equal(data, stack)


@pytest.mark.parametrize("z_cell_A", [0.0, 1.0, 123.4, 1e6])
def test_stack_z_cell_size_is_not_checked(tmp_path, stack, z_cell_A):
    path = tmp_path / "s.mrc"
    _write_raw_mrc(path, stack, voxel_size=1.35)
    with mrcfile.open(path, mode="r+") as mrc:
        mrc.header.cella.z = z_cell_A  # the view spacing of a stack: not a pixel size
    data, pixel = read_stack(path)
    assert pixel == 1.35 and np.array_equal(data, stack)


def test_writers_reject_bad_input(tmp_path, stack):
    with pytest.raises(ValueError, match=r"data: expected a 3-D tilt series"):
        write_stack(tmp_path / "a.mrc", stack[0], 8.0)
    with pytest.raises(ValueError, match=r"n_views: expected at least 2 views, got 1"):
        write_stack(tmp_path / "a.mrc", stack[:1], 8.0)
    with pytest.raises(ValueError, match=r"pixel_size_A: expected a positive number"):
        write_stack(tmp_path / "a.mrc", stack, 0.0)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------
# rawtlt
# ---------------------------------------------------------------------------


def test_rawtlt_round_trip_is_exact(tmp_path):
    tilts = np.array([-60.0, -1.5, 0.0, 0.333, 1 / 3, 0.1 + 0.2, 59.99999999999])
    path = tmp_path / "t.rawtlt"
    write_rawtlt(path, tilts)
    assert path.read_text().splitlines()[:4] == ["-60", "-1.5", "0", "0.333"]
    back = read_rawtlt(path, n_views=tilts.size)
    assert back.dtype == np.float64 and np.array_equal(back, tilts)


def test_rawtlt_ignores_blank_lines(tmp_path):
    path = tmp_path / "t.rawtlt"
    path.write_text("\n  -3.00\n\n0\n 3 \n\n")
    assert np.array_equal(read_rawtlt(path), [-3.0, 0.0, 3.0])


def test_rawtlt_wrong_length_names_both_lengths(tmp_path):
    path = tmp_path / "tilts.rawtlt"
    write_rawtlt(path, np.arange(-60, 60, 3.0))
    with pytest.raises(FileFormatError, match=r"tilts\.rawtlt: 40 tilt angles, but the stack has 41 views"):
        read_rawtlt(path, n_views=41)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("-3\n0\nthree\n", r"line 3: found 'three', expected one tilt angle"),
        ("-3\n\n0 1\n", r"line 3: found '0 1'"),
        ("-3\nnan\n", r"line 2: found 'nan', expected a finite tilt angle"),
        ("-90\n0\n", r"line 1: found tilt angle -90, expected \|angle\| < 90"),
        ("\n\n", r"no tilt angles found"),
    ],
)
def test_rawtlt_bad_content_rejected(tmp_path, text, pattern):
    path = tmp_path / "bad.rawtlt"
    path.write_text(text)
    with pytest.raises(FileFormatError, match=r"bad\.rawtlt: " + pattern):
        read_rawtlt(path)


def test_rawtlt_missing_file(tmp_path):
    with pytest.raises(FileFormatError, match=r"none\.rawtlt: no such file"):
        read_rawtlt(tmp_path / "none.rawtlt")


# ---------------------------------------------------------------------------
# geometry JSON
# ---------------------------------------------------------------------------


def test_geometry_round_trip_is_exact(tmp_path, geometry):
    path = tmp_path / "a.geometry.json"
    write_geometry(path, geometry, aligner="fiducial", settings={"robust": True})
    back = read_geometry(path)
    assert back.equals(geometry)
    document = json.loads(path.read_text())
    assert list(document)[:7] == ["format", "image_shape", "pixel_size_A", "tilt_deg", "rot_deg", "mag", "shift_px"]
    assert document["aligner"] == "fiducial" and document["settings"] == {"robust": True}
    assert geometry_from_dict(geometry_to_dict(geometry), source="memory").equals(geometry)
    assert os.listdir(tmp_path) == ["a.geometry.json"]


def test_geometry_write_is_deterministic(tmp_path, geometry):
    write_geometry(tmp_path / "a.json", geometry)
    write_geometry(tmp_path / "b.json", geometry)
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_geometry_write_rejects_bad_extra(tmp_path, geometry):
    with pytest.raises(ValueError, match=r"collide"):
        write_geometry(tmp_path / "a.json", geometry, mag=[1.0])
    with pytest.raises(ValueError, match=r"settings\['x'\]: int64"):
        write_geometry(tmp_path / "a.json", geometry, settings={"x": np.int64(3)})
    assert os.listdir(tmp_path) == []


def _corrupt(geometry: Geometry, change) -> dict:
    document = geometry_to_dict(geometry)
    change(document)
    return document


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        (lambda d: d.update(format="simtomo.geometry/2"),
         r"key 'format': found \"simtomo.geometry/2\", expected \"simtomo.geometry/1\""),
        (lambda d: d.pop("format"), r"missing keys 'format' of a geometry file"),
        (lambda d: (d.pop("mag"), d.pop("shift_px")), r"missing keys 'mag', 'shift_px'"),
        (lambda d: d["rot_deg"].pop(), r"key 'rot_deg': 6 entries, but 'tilt_deg' has 7"),
        (lambda d: (d["mag"].append(1.0), d["shift_px"].pop()),
         r"2 problems: key 'mag': 8 entries, but 'tilt_deg' has 7.*key 'shift_px': 6 entries, but 'tilt_deg' has 7"),
        (lambda d: d["tilt_deg"].__setitem__(2, float("nan")), r"key 'tilt_deg': entry 2 is NaN"),
        (lambda d: d["mag"].__setitem__(1, "1.0"), r"key 'mag': entry 1 is \"1.0\" \(a string\), expected a number"),
        (lambda d: d["mag"].__setitem__(1, 0.0), r"key 'mag': entry 1 is 0.0, expected a positive number"),
        (lambda d: d["shift_px"].__setitem__(4, [1.0]), r"key 'shift_px': entry 4 is a list of 1 \[1.0\], expected \[tx, ty\] pair"),
        (lambda d: d.update(image_shape=[128, 0]), r"key 'image_shape': found \[128, 0\], expected \[h, w\]"),
        (lambda d: d.update(image_shape=[128.0, 96]), r"key 'image_shape'"),
        (lambda d: d.update(pixel_size_A=-1.0), r"key 'pixel_size_A': found -1.0, expected a positive number"),
        (lambda d: d.update(tilt_deg=[]), r"key 'tilt_deg': empty list"),
    ],
)
def test_malformed_geometry_rejected(tmp_path, geometry, change, pattern):
    path = _json_file(tmp_path / "bad.geometry.json", _corrupt(geometry, change))
    with pytest.raises(FileFormatError, match=re.escape(path) + ": " + pattern):
        read_geometry(path)


def test_invalid_json_gives_line_and_column(tmp_path, geometry):
    path = tmp_path / "broken.geometry.json"
    write_geometry(path, geometry)
    lines = path.read_text().splitlines()
    row = next(i for i, line in enumerate(lines) if '"tilt_deg"' in line)
    lines[row] = lines[row].replace("[", "", 1)
    path.write_text("\n".join(lines))
    with pytest.raises(FileFormatError, match=rf"broken\.geometry\.json: invalid JSON at line {row + 1}, column \d+"):
        read_geometry(path)


def test_json_top_level_and_duplicates_rejected(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(FileFormatError, match=r"list\.json: top level is a list, expected a JSON object"):
        read_geometry(path)
    path.write_text('{"format": "simtomo.geometry/1", "format": "x"}')
    with pytest.raises(FileFormatError, match=r"list\.json: key 'format' appears twice"):
        read_geometry(path)
    with pytest.raises(FileFormatError, match=r"nothing\.json: no such file"):
        read_geometry(tmp_path / "nothing.json")


# ---------------------------------------------------------------------------
# truth
# ---------------------------------------------------------------------------


def test_truth_round_trip_is_exact(tmp_path, truth):
    path = tmp_path / "s.truth.json"
    write_truth(path, truth)
    back = read_truth(path)
    assert back.equals(truth)
    assert back.acquisition_order.dtype == np.int64
    assert back.config == truth.config
    # A truth file is a geometry file holding the true geometry.
    assert read_geometry(path).equals(truth.geometry)


def test_truth_without_beads(tmp_path, truth):
    empty = Truth(**{**truth.__dict__, "beads_px": np.zeros((0, 3))})
    write_truth(tmp_path / "t.json", empty)
    back = read_truth(tmp_path / "t.json")
    assert back.beads_px.shape == (0, 3) and back.equals(empty)


def test_geometry_file_read_as_truth_names_missing_keys(tmp_path, geometry):
    path = tmp_path / "a.geometry.json"
    write_geometry(path, geometry)
    with pytest.raises(
        FileFormatError,
        match=r"a\.geometry\.json: is a geometry file, not a truth file: missing keys 'beads_px', "
        r"'nominal_tilt_deg', 'acquisition_order', 'dose_e_per_A2', 'nominal_tilt_axis_deg', 'seed', "
        r"'simtomo_version', 'config'",
    ):
        read_truth(path)


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        (lambda d: (d.pop("seed"), d.pop("config")), r"missing keys 'seed', 'config' of a truth file"),
        (lambda d: d.update(acquisition_order=[0, 1, 2, 3, 4, 5, 5]),
         r"key 'acquisition_order': view index 5 appears twice, expected a permutation of range\(7\)"),
        (lambda d: d.update(acquisition_order=[0, 1, 2]), r"key 'acquisition_order': 3 entries, but 'tilt_deg' has 7"),
        (lambda d: d["beads_px"].__setitem__(1, [1.0, 2.0]), r"key 'beads_px': entry 1 is a list of 2"),
        (lambda d: d["dose_e_per_A2"].__setitem__(0, float("nan")), r"key 'dose_e_per_A2': entry 0 is NaN"),
        (lambda d: d.update(seed=1.5), r"key 'seed': found 1.5 \(a number\), expected a non-negative integer"),
        (lambda d: (d.update(config=[]), d["nominal_tilt_deg"].pop()),
         r"2 problems: key 'nominal_tilt_deg': 6 entries.*key 'config': found a list, expected an object"),
    ],
)
def test_malformed_truth_rejected(tmp_path, truth, change, pattern):
    path = tmp_path / "s.truth.json"
    write_truth(path, truth)
    document = json.loads(path.read_text())
    change(document)
    _json_file(path, document)
    with pytest.raises(FileFormatError, match=re.escape(str(path)) + ": " + pattern):
        read_truth(path)


def test_write_truth_rejects_numpy_in_config(tmp_path, truth):
    bad = Truth(**{**truth.__dict__, "config": {"detector": {"pixel_size_A": np.float32(1.0)}}})
    with pytest.raises(ValueError, match=r"Truth\.config\['detector'\]\['pixel_size_A'\]: float32"):
        write_truth(tmp_path / "t.json", bad)
    assert os.listdir(tmp_path) == []

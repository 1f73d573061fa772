"""Private helpers shared by the readers and writers of :mod:`simtomo.io`.

Strict JSON loading and validation (problems are collected as
``"key 'name': found ..., expected ..."`` strings and raised together by
:func:`raise_problems`), file checks that name the file, and atomic writes
(a temporary file beside the target, then a rename).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from simtomo.errors import FileFormatError

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------


def check_file(name: str, expected: str) -> None:
    """Refuse a missing path or a directory, saying what was ``expected``."""
    if not os.path.exists(name):
        raise FileFormatError(f"{name}: no such file, expected {expected}")
    if os.path.isdir(name):
        raise FileFormatError(f"{name}: is a directory, expected {expected}")


def read_text(name: str, expected: str, *, expected_text: str | None = None) -> str:
    """The UTF-8 text of a file; every failure a FileFormatError naming the file.

    ``expected`` describes the file, ``expected_text`` (default ``expected``)
    its content, for the message on bytes that are not UTF-8.
    """
    check_file(name, expected)
    try:
        return Path(name).read_bytes().decode("utf-8")
    except OSError as err:
        raise FileFormatError(f"{name}: cannot read: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise FileFormatError(
            f"{name}: not UTF-8 text (byte {err.start}), expected {expected_text or expected}"
        ) from None


def temporary_path(target: Path) -> Path:
    """A fresh hidden name beside ``target``, so os.replace stays on one file system."""
    return target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place."""
    target = Path(path)
    tmp = temporary_path(target)
    try:
        with open(tmp, "x", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            # On disk before the rename, so a crash leaves either the old file
            # or the complete new one.
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    logger.debug("wrote %s", target)


# ----------------------------------------------------------------------------
# reading JSON
# ----------------------------------------------------------------------------


class _DuplicateKey(Exception):
    pass


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json keeps the last of two equal keys silently; a hand-edited file with a
    # key twice is ambiguous, so it is refused.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def load_json(name: str) -> Any:
    """Parse a JSON file, turning every failure into a FileFormatError naming the file."""
    text = read_text(name, "a JSON file")
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicates)
    except json.JSONDecodeError as err:
        raise FileFormatError(f"{name}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    except _DuplicateKey as err:
        raise FileFormatError(f"{name}: key {err.args[0]!r} appears twice in one JSON object, expected once") from None
    except RecursionError:
        raise FileFormatError(f"{name}: invalid JSON: nested too deeply") from None


def json_type(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number"


def show(value: Any) -> str:
    """A value as it appears in the file, cut short."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def is_int(value: Any) -> bool:
    """A JSON integer (``true`` and ``false`` are not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def raise_problems(source: str, problems: list[str]) -> None:
    if len(problems) == 1:
        raise FileFormatError(f"{source}: {problems[0]}")
    if problems:
        raise FileFormatError(f"{source}: {len(problems)} problems: " + "; ".join(problems))


def bad_number(value: Any, *, positive: bool = False) -> str | None:
    """Why a JSON value is not a finite (positive) number, or None if it is one."""
    if not (is_int(value) or isinstance(value, float)):
        return f"{show(value)} ({json_type(value)}), expected a number"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{show(value)}, expected a finite number"
    if positive and not value > 0:
        return f"{show(value)}, expected a positive number"
    return None


def _check_length(key: str, value: list, n: int | None, problems: list[str]) -> bool:
    if n is not None and len(value) != n:
        problems.append(f"key {key!r}: {len(value)} entries, but 'tilt_deg' has {n} (expected one per view)")
        return False
    return True


def number_list(
    data: Mapping[str, Any], key: str, problems: list[str], *, n: int | None = None, positive: bool = False
) -> np.ndarray | None:
    """A list of finite numbers as float64, or None after recording what is wrong.

    ``n``, when given, is the number of views (the length of ``tilt_deg``).
    """
    value = data[key]
    if not isinstance(value, list):
        problems.append(f"key {key!r}: found {json_type(value)} {show(value)}, expected a list of numbers")
        return None
    ok = _check_length(key, value, n, problems)
    for i, item in enumerate(value):
        why = bad_number(item, positive=positive)
        if why is not None:
            problems.append(f"key {key!r}: entry {i} is {why}")
            return None
    return np.array(value, dtype=float) if ok else None


def row_list(
    data: Mapping[str, Any], key: str, problems: list[str], *, width: int, what: str, n: int | None = None
) -> np.ndarray | None:
    """A list of length-``width`` lists of finite numbers as an (m, width) float64 array."""
    value = data[key]
    if not isinstance(value, list):
        problems.append(f"key {key!r}: found {json_type(value)} {show(value)}, expected a list of {what}")
        return None
    ok = _check_length(key, value, n, problems)
    for i, row in enumerate(value):
        if not isinstance(row, list) or len(row) != width:
            found = f"a list of {len(row)}" if isinstance(row, list) else json_type(row)
            problems.append(f"key {key!r}: entry {i} is {found} {show(row)}, expected {what[:-1]}")
            return None
        for j, item in enumerate(row):
            why = bad_number(item)
            if why is not None:
                problems.append(f"key {key!r}: entry {i}[{j}] is {why}")
                return None
    return np.array(value, dtype=float).reshape(len(value), width) if ok else None


# ----------------------------------------------------------------------------
# writing JSON
# ----------------------------------------------------------------------------


def check_json_value(value: Any, where: str) -> None:
    """Refuse what json would write lossily or not at all, naming its location."""
    if value is None or isinstance(value, (bool, str, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: {value!r} is not a finite number; JSON cannot hold it")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_json_value(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where}: key {key!r} is {type(key).__name__}, expected str (JSON keys are strings)")
            check_json_value(item, f"{where}[{key!r}]")
        return
    raise ValueError(
        f"{where}: {type(value).__name__} {show(value)} is not a JSON value "
        "(expected str, int, float, bool, None, list or dict; convert numpy values with .tolist())"
    )


def dumps_document(document: Mapping[str, Any]) -> str:
    """One top-level key per line; lists kept on their line, objects indented."""
    lines = []
    for key, value in document.items():
        if isinstance(value, dict) and value:
            text = json.dumps(value, indent=2, allow_nan=False).replace("\n", "\n  ")
        else:
            text = json.dumps(value, allow_nan=False)
        lines.append(f"  {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(lines) + "\n}\n"

"""File formats of simtomo (DESIGN.md sections 3 and 4).

- ``NAME.mrc``: the tilt series (float32 MRC image stack, pixel size in the header);
  volumes likewise. :func:`read_stack`, :func:`write_stack`, :class:`StackWriter`,
  :func:`read_volume`, :func:`write_volume`.
- ``NAME.rawtlt``: nominal tilt angles, one per line. :func:`read_rawtlt`, :func:`write_rawtlt`.
- ``NAME.geometry.json``: a geometry (an alignment, or the truth's). :func:`read_geometry`,
  :func:`write_geometry`, :func:`geometry_to_dict`, :func:`geometry_from_dict`.
- alignments: a geometry file plus the aligner's report. :func:`read_alignment`,
  :func:`write_alignment`, :func:`write_residual_table`.
- ``NAME.truth.json``: the ground truth of a simulated series. :class:`Truth`,
  :func:`read_truth`, :func:`write_truth`.

Readers are strict and raise :class:`simtomo.errors.FileFormatError` with the file path,
the field or key, what was found and what was expected. Writers replace the target
atomically (temporary file beside it, then rename) and are deterministic.
"""

from simtomo.io.alignment_json import read_alignment, write_alignment, write_residual_table
from simtomo.io.geometry_json import (
    GEOMETRY_FORMAT,
    geometry_from_dict,
    geometry_to_dict,
    read_geometry,
    write_geometry,
)
from simtomo.io.mrc import StackWriter, read_stack, read_volume, write_stack, write_volume
from simtomo.io.rawtlt import read_rawtlt, write_rawtlt
from simtomo.io.truth import Truth, read_truth, write_truth

__all__ = [
    "GEOMETRY_FORMAT",
    "StackWriter",
    "Truth",
    "geometry_from_dict",
    "geometry_to_dict",
    "read_alignment",
    "read_geometry",
    "read_rawtlt",
    "read_stack",
    "read_truth",
    "read_volume",
    "write_alignment",
    "write_geometry",
    "write_rawtlt",
    "write_stack",
    "write_truth",
    "write_residual_table",
    "write_volume",
]

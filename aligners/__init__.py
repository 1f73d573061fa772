"""Alignment methods under test, found through the ``simtomo.aligners`` entry points.

>>> import aligners
>>> "nominal" in aligners.available()
True
>>> aligner = aligners.get("nominal")

Every aligner takes an :class:`simtomo.Observation` and returns an
:class:`simtomo.alignment.AlignmentResult`; third-party packages register
theirs under the same entry-point group (see :mod:`simtomo.registry`).
"""

from simtomo.registry import available, describe, get

__all__ = ["available", "get", "describe"]

"""Alignment methods under test.

Each aligner is one module here and registers through the ``simtomo.aligners``
entry-point group, exactly as a third-party package would. The registry and the
first aligners arrive with the fiducial-alignment work.
"""

__all__: list[str] = []

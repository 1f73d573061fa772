"""Exceptions raised for bad input: each names the file or field and what was expected."""

from __future__ import annotations


class SimtomoError(Exception):
    """Base class of every error simtomo raises on purpose for bad input."""


class ConfigError(SimtomoError, ValueError):
    """A configuration value, key or preset is invalid."""


class FileFormatError(SimtomoError, ValueError):
    """A file is missing, unreadable, or does not hold what its format requires."""


class AlignmentError(SimtomoError):
    """An aligner cannot produce a trustworthy geometry from these images (too few beads, no correlation)."""

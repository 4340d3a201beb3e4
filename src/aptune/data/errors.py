"""Error types raised by the data layer.

Every error carries a one-line message that names the file, line, field or label at fault, so a
command-line front end can print ``str(error)`` and exit without a traceback.
"""

from __future__ import annotations


class DataError(ValueError):
    """A data file or data set cannot be used (bad format, missing field, unknown label, ...)."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data file that was asked for does not exist.

    It is both a :class:`DataError` and a :class:`FileNotFoundError`, so callers may catch either.
    """

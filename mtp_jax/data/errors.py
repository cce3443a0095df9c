"""The one exception type of the data package."""

from __future__ import annotations


class DataError(ValueError):
    """Bad or missing training data: the message names the path and what to do about it."""

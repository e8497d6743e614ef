"""The library's one exception type."""

from __future__ import annotations


class ErtaCacheError(ValueError):
    """Raised for bad input, a policy that does not fit, or a failed calibration.

    Subclasses :class:`ValueError` so that callers catching ``ValueError`` for bad
    arguments keep working. Every message says what was received and what to do.
    """


class PolicyMismatchError(ErtaCacheError):
    """A policy is used with a model or sampler settings it was not calibrated for."""

"""Values as strict JSON can hold them."""

from __future__ import annotations

import math

__all__ = ["json_float"]


def json_float(value: float | None) -> float | str | None:
    """`value`, or "nan"/"inf"/"-inf" as a string: JSON has no NaN or infinity, and a string
    keeps the report loadable by strict parsers."""
    if value is None or math.isfinite(value):
        return value
    return str(value)

"""The worst of several measurements, where a NaN measurement stays NaN.

Python's ``max`` keeps its first argument when a comparison with NaN is false, so a NaN
deviation would vanish (or win) depending on its position; a measurement that failed must show.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def worst(values: Iterable[float], default: float = 0.0) -> float:
    """The largest value, NaN if any value is NaN, ``default`` when there are none."""
    values = list(values)
    if any(math.isnan(value) for value in values):
        return math.nan
    return max(values, default=default)

"""Reading numbers from config values and data fields (no morelora imports: config and data both use it)."""

from __future__ import annotations

from typing import Any

__all__ = ["as_float"]


def as_float(value: Any) -> float | None:
    """Numbers and numeric strings ("1e-3": YAML 1.1 reads it as a string) as float; None for anything else."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None

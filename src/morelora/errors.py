"""The exceptions that mean bad input (no heavy imports, so the CLI can catch them before torch loads)."""

from __future__ import annotations

__all__ = ["CheckpointError", "MoreLoraError", "UnknownTaskError"]


class MoreLoraError(ValueError):
    """Bad input to morelora: the message says what is wrong and what to do."""


class UnknownTaskError(MoreLoraError, KeyError):
    """A task name that the model does not know."""

    def __str__(self) -> str:  # KeyError would add quotes
        return str(self.args[0])


class CheckpointError(MoreLoraError):
    """A checkpoint that is missing, corrupt, or made for another base model or method."""

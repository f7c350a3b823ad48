"""User-facing errors: each one prints as a single line and exits non-zero in the CLI."""

from __future__ import annotations


class A2atsError(Exception):
    """Base class for errors caused by the user's input or environment (never a bug)."""


class UnsupportedModelError(A2atsError):
    """The model is not a RoPE decoder this tool can serve."""


class DataError(A2atsError):
    """Calibration or evaluation data is missing, empty or unreadable."""


class ArtifactError(A2atsError):
    """An artifact on disk is missing, incomplete, of another schema, or does not match the model."""


class CapturedStateError(A2atsError):
    """Captured activations contain NaN or Inf."""


class Interrupted(Exception):
    """Ctrl-C stopped a command (raised by the CLI once the command's own cleanup has run)."""

    def __init__(self, command: str):
        super().__init__(f"a2ats {command} stopped; nothing partial was kept")
        self.command = command

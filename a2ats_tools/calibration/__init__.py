"""Stage 1: run the model over calibration text and record pre-RoPE keys and WRoPE query statistics.

Python API: :func:`calibrate` writes a calibration directory; :class:`CalibrationSet` reads one.
"""

from .format import CalibrationSet, LayerStats
from .recipe import Recipe, load_recipe
from .run import calibrate, parse_positions

__all__ = ["CalibrationSet", "LayerStats", "Recipe", "calibrate", "load_recipe", "parse_positions"]

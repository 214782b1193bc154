"""amos_fused: the Amos optimizer family for PyTorch (see README.md and docs/)."""
from . import schedules
from .optimizer import Amos
from .defaults import DEFAULT_LR, TotalStepsLR

__all__ = ["Amos", "DEFAULT_LR", "TotalStepsLR", "schedules"]
__version__ = "0.1.0"

"""amos_fused: the Amos optimizer family for PyTorch (see ALGORITHM.md and README.md)."""
from . import schedules
from .optimizer import Amos
from .options import DEFAULT_LR

__all__ = ["Amos", "DEFAULT_LR", "schedules"]
__version__ = "0.1.0"

"""minillava: a minimal, readable LLaVA (Visual Instruction Tuning) in PyTorch."""
from .constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from .llava import LLaVA, LLaVAConfig

__all__ = ["LLaVA", "LLaVAConfig", "IMAGE_TOKEN_INDEX", "IGNORE_INDEX"]

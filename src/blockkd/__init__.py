"""blockkd: Block-wise Logit Distillation (Block-KD) and a knowledge-distillation toolkit."""
from . import models, methods
from .blocks import Blocks, split

__all__ = ["Blocks", "split", "models", "methods"]
__version__ = "0.1.0"

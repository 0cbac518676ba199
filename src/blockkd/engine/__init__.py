"""The training engine: ``train(cfg)`` runs a recipe; ``evaluate``/``evaluate_checkpoint`` measure models.

Layout: ``trainer`` (the loop), ``checkpoint`` (atomic safetensors + JSON folders), ``logger`` (progress,
TensorBoard, CSV/JSONL, summary), ``plots`` (curves.png), ``schedule`` (per-step lr), ``runtime``
(device, AMP, seeding, determinism, ranks), ``build`` (student/teacher from their checkpoints).
"""
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .schedule import build_scheduler, lr_factor
from .trainer import evaluate, evaluate_checkpoint, train

__all__ = ["Checkpoint", "build_scheduler", "evaluate", "evaluate_checkpoint", "load_checkpoint", "lr_factor",
           "save_checkpoint", "train"]

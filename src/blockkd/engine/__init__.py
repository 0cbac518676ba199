"""The training engine: ``train(cfg)`` runs a validated recipe; ``evaluate``/``evaluate_checkpoint`` measure models.

Layout, one job per module: ``trainer`` (the loop and ``train_step``), ``evaluation`` (top-1/top-5 of a
model or of every head of a distiller), ``guards`` (non-finite losses, out of memory), ``run_folder``
(creating, resuming and repairing a run folder), ``checkpoint`` (atomic safetensors + JSON folders),
``logger`` (progress, TensorBoard, CSV/JSONL, summary), ``plots`` (curves.png), ``runtime`` (device,
AMP, seeding, determinism, ranks), ``build`` (student, teacher and distiller from their checkpoints).
"""
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .evaluation import evaluate, evaluate_checkpoint
from .trainer import train, train_step

__all__ = ["Checkpoint", "evaluate", "evaluate_checkpoint", "load_checkpoint", "save_checkpoint", "train",
           "train_step"]

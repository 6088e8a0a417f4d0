"""Reading and writing checkpoints (this package's format and others)."""

from hooked_attnres.loading.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]

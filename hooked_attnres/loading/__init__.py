"""Reading and writing checkpoints (this package's format and others)."""

from hooked_attnres._atomic import CheckpointConflictError
from hooked_attnres.loading.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

__all__ = ["CheckpointConflictError", "CheckpointError", "load_checkpoint", "save_checkpoint"]

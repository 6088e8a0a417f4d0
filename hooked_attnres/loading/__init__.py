"""Reading and writing checkpoints (this package's format and others)."""

from hooked_attnres._atomic import CheckpointConflictError, DirectoryBusyError
from hooked_attnres.loading.checkpoint import (
    CheckpointError,
    CheckpointIntegrityError,
    load_checkpoint,
    save_checkpoint,
)

__all__ = [
    "CheckpointConflictError",
    "CheckpointError",
    "CheckpointIntegrityError",
    "DirectoryBusyError",
    "load_checkpoint",
    "save_checkpoint",
]

"""Interventions on depth routing, as TransformerLens hook lists."""

from hooked_attnres.interventions.routing import (
    commit_hook_name,
    mask_logits,
    mask_sources,
    patch_committed,
    patch_sources,
    set_weights,
)
from hooked_attnres.interventions.selection import (
    BAND_NAMES,
    check_routers,
    depth_bands,
    resolve_layers,
    resolve_routers,
    resolve_sources,
)

__all__ = ["BAND_NAMES", "check_routers", "commit_hook_name", "depth_bands", "mask_logits", "mask_sources",
           "patch_committed", "patch_sources", "resolve_layers", "resolve_routers", "resolve_sources",
           "set_weights"]

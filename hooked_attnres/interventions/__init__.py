"""Interventions on depth routing, as TransformerLens hook lists.

*Where*: `select_sites` (router types, layers, depth bands, or explicit `RouterSite` s)
and `source_indices` (families, labels, indices). *What*: `Ablation` (mask-and-
renormalise; `mask_sources`), `set_weights`, `patch_sources`, `patch_committed`.
"""

from hooked_attnres.interventions.routing import (
    Ablation,
    batched_mask_hooks,
    commit_hook_name,
    mask_hook,
    mask_logits,
    mask_sources,
    patch_committed,
    patch_sources,
    resolve_value,
    set_weights,
)
from hooked_attnres.interventions.selection import (
    BAND_NAMES,
    check_routers,
    depth_bands,
    position_index,
    resolve_layers,
    resolve_routers,
    resolve_sources,
    select_sites,
    source_indices,
)

__all__ = [
    "BAND_NAMES",
    "Ablation",
    "batched_mask_hooks",
    "check_routers",
    "commit_hook_name",
    "depth_bands",
    "mask_hook",
    "mask_logits",
    "mask_sources",
    "patch_committed",
    "patch_sources",
    "position_index",
    "resolve_layers",
    "resolve_routers",
    "resolve_sources",
    "resolve_value",
    "select_sites",
    "set_weights",
    "source_indices",
]

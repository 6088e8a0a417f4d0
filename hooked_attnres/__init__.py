"""hooked_attnres: TransformerLens-style interpretability for Block Attention Residuals.

Quick start::

    from hooked_attnres import HookedAttnRes, HookedAttnResConfig

    cfg = HookedAttnResConfig(d_model=64, n_layers=4, n_heads=4, d_vocab=100,
                              attnres_layout="cumulative", attnres_num_blocks=2, seed=0)
    model = HookedAttnRes(cfg)
    logits, cache = model.run_with_cache(tokens)
    cache["weights", 3, "attn_res"]      # [batch, pos, n_sources] routing weights
    model.source_labels(3, "attn_res")   # ["embedding", "block_1", "current"]

The names below are imported on first use, so ``import hooked_attnres`` (and the
command line's ``--help``) does not load torch or TransformerLens until they are needed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hooked_attnres._lazy import lazy_names
from hooked_attnres._version import __version__

_LAZY = {
    "AmbiguousIndexError": "hooked_attnres._validation",
    "AttnResActivationCache": "hooked_attnres.model.cache",
    "RoutedResidualPatchWarning": "hooked_attnres.model.hooked_root",
    "UnfoldedNormWarning": "hooked_attnres.model.cache",
    "UncachedHookError": "hooked_attnres.model.cache",
    "HookKeyError": "hooked_attnres.model.cache",
    "UnknownCacheKeyError": "hooked_attnres.model.cache",
    "RunCacheDict": "hooked_attnres.model.cache",
    "HookedAttnResConfig": "hooked_attnres.config",
    "CheckpointError": "hooked_attnres.loading.io",
    "CheckpointIntegrityError": "hooked_attnres.loading.io",
    "CheckpointConflictError": "hooked_attnres.loading",
    "DirectoryBusyError": "hooked_attnres.loading",
    "ConcurrentUseError": "hooked_attnres.model.hooked_root",
    "HookOutputError": "hooked_attnres.model.hooked_root",
    "FAMILIES": "hooked_attnres.model.depth",
    "ROUTERS": "hooked_attnres.model.depth",
    "DepthState": "hooked_attnres.model.depth",
    "RouterSite": "hooked_attnres.model.depth",
    "RoutingLayout": "hooked_attnres.model.depth",
    "DepthRouter": "hooked_attnres.model.routing",
    "KeyValueCache": "hooked_attnres.model.attention",
    "HookedAttnRes": "hooked_attnres.model.hooked_attnres",
    "Output": "hooked_attnres.model.hooked_attnres",
    "UnknownHookError": "hooked_attnres.model.hooked_root",
    "LeftPaddingWithoutMaskWarning": "hooked_attnres.model.tokenization",
    "QKNormWarning": "hooked_attnres.model.weights",
}

if TYPE_CHECKING:
    from hooked_attnres._validation import AmbiguousIndexError
    from hooked_attnres.config import HookedAttnResConfig
    from hooked_attnres.loading import CheckpointConflictError, DirectoryBusyError
    from hooked_attnres.loading.io import CheckpointError, CheckpointIntegrityError
    from hooked_attnres.model.attention import KeyValueCache
    from hooked_attnres.model.cache import (
        AttnResActivationCache,
        HookKeyError,
        RunCacheDict,
        UncachedHookError,
        UnfoldedNormWarning,
        UnknownCacheKeyError,
    )
    from hooked_attnres.model.depth import FAMILIES, ROUTERS, DepthState, RouterSite, RoutingLayout
    from hooked_attnres.model.hooked_attnres import HookedAttnRes, Output
    from hooked_attnres.model.hooked_root import (
        ConcurrentUseError,
        HookOutputError,
        RoutedResidualPatchWarning,
        UnknownHookError,
    )
    from hooked_attnres.model.routing import DepthRouter
    from hooked_attnres.model.tokenization import LeftPaddingWithoutMaskWarning
    from hooked_attnres.model.weights import QKNormWarning


if not TYPE_CHECKING:  # hidden from type checkers, so that they flag a misspelt name
    __getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())


__all__ = [
    "AmbiguousIndexError",
    "AttnResActivationCache",
    "FAMILIES",
    "ROUTERS",
    "CheckpointConflictError",
    "CheckpointError",
    "CheckpointIntegrityError",
    "ConcurrentUseError",
    "DepthRouter",
    "DepthState",
    "DirectoryBusyError",
    "HookedAttnRes",
    "HookKeyError",
    "HookOutputError",
    "HookedAttnResConfig",
    "KeyValueCache",
    "LeftPaddingWithoutMaskWarning",
    "Output",
    "QKNormWarning",
    "RoutedResidualPatchWarning",
    "RouterSite",
    "RoutingLayout",
    "RunCacheDict",
    "UncachedHookError",
    "UnfoldedNormWarning",
    "UnknownCacheKeyError",
    "UnknownHookError",
    "__version__",
]

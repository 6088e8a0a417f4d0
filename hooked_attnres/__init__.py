"""hooked_attnres: TransformerLens-style interpretability for Block Attention Residuals.

Quick start::

    from hooked_attnres import HookedAttnRes, HookedAttnResConfig

    cfg = HookedAttnResConfig(d_model=64, n_layers=4, n_heads=4, d_vocab=100,
                              attnres_layout="cumulative", attnres_num_blocks=2, seed=0)
    model = HookedAttnRes(cfg)
    logits, cache = model.run_with_cache(tokens)
    cache["weights", 3, "attn_res"]      # [batch, pos, n_sources] routing weights
    model.source_labels(3, "attn_res")   # ["embedding", "block_1", "current"]
"""

from hooked_attnres._version import __version__
from hooked_attnres.config import HookedAttnResConfig
from hooked_attnres.loading import CheckpointConflictError, CheckpointError
from hooked_attnres.model import (
    FAMILIES,
    ROUTERS,
    ConcurrentUseError,
    DepthRouter,
    DepthState,
    HookedAttnRes,
    HookOutputError,
    Output,
    RoutingLayout,
    UnknownHookError,
)

__all__ = [
    "FAMILIES",
    "ROUTERS",
    "CheckpointConflictError",
    "CheckpointError",
    "ConcurrentUseError",
    "DepthRouter",
    "DepthState",
    "HookedAttnRes",
    "HookOutputError",
    "HookedAttnResConfig",
    "Output",
    "RoutingLayout",
    "UnknownHookError",
    "__version__",
]

"""The model: config-driven Qwen3 blocks threaded by an explicit depth state."""

from hooked_attnres.model.attention import KeyValueCache
from hooked_attnres.model.cache import (
    AttnResActivationCache,
    HookKeyError,
    UncachedHookError,
    UnfoldedNormWarning,
    UnknownCacheKeyError,
)
from hooked_attnres.model.depth import FAMILIES, ROUTERS, DepthState, RoutingLayout
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

__all__ = [
    "AttnResActivationCache",
    "FAMILIES",
    "ROUTERS",
    "ConcurrentUseError",
    "DepthRouter",
    "DepthState",
    "HookKeyError",
    "HookOutputError",
    "HookedAttnRes",
    "KeyValueCache",
    "LeftPaddingWithoutMaskWarning",
    "Output",
    "QKNormWarning",
    "RoutedResidualPatchWarning",
    "RoutingLayout",
    "UncachedHookError",
    "UnfoldedNormWarning",
    "UnknownCacheKeyError",
    "UnknownHookError",
]

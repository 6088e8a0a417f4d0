"""The TransformerLens names this package builds on, imported in one place.

TransformerLens 4.x removed ``HookedTransformer`` but keeps ``HookedRootModule``,
``HookPoint``, ``ActivationCache`` and ``get_act_name``; 3.x has them at the same
paths (with deprecation warnings on the old ones). Everything else in the package
imports these names from here, so a future move in TransformerLens is a one-file fix.
"""

from __future__ import annotations

from transformer_lens import ActivationCache, HookedRootModule
from transformer_lens.hook_points import HookPoint
from transformer_lens.utilities import Slice, get_act_name

try:  # 4.x only
    from transformer_lens.model_protocol import TransformerLensModel
except ImportError:  # pragma: no cover - TransformerLens 3.x
    TransformerLensModel = None  # type: ignore[assignment,misc]

__all__ = [
    "ActivationCache",
    "HookPoint",
    "HookedRootModule",
    "Slice",
    "TransformerLensModel",
    "get_act_name",
]

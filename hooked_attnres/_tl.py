"""The TransformerLens names this package builds on, imported in one place.

TransformerLens 4.x removed ``HookedTransformer`` but keeps ``HookedRootModule``,
``HookPoint``, ``ActivationCache``, ``FactoredMatrix`` and the ``utilities`` helpers.
Every module of the package imports TransformerLens names from here (a test checks it),
so a future move in TransformerLens is a one-file fix. Only TransformerLens 4.x is
supported (``pyproject.toml``).
"""

from __future__ import annotations

from transformer_lens import ActivationCache, FactoredMatrix, HookedRootModule
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge.composition_scores import CompositionScores
from transformer_lens.utilities import Slice, composition_scores, get_act_name, remove_batch_dim


def as_slice(value) -> Slice:
    """``value`` as a TransformerLens ``Slice`` (a ``Slice`` as is: ``Slice(Slice(...))``
    raises), for the ``pos_slice`` / ``batch_slice`` arguments TransformerLens takes."""
    return value if isinstance(value, Slice) else Slice(value)


__all__ = [
    "ActivationCache",
    "CompositionScores",
    "FactoredMatrix",
    "HookPoint",
    "HookedRootModule",
    "Slice",
    "as_slice",
    "composition_scores",
    "get_act_name",
    "remove_batch_dim",
]

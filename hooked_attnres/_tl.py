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


def as_slice(value, name: str) -> Slice:
    """``value`` as a TransformerLens ``Slice`` (a ``Slice`` as is: ``Slice(Slice(...))``
    raises), for the ``pos_slice`` / ``batch_slice`` arguments TransformerLens takes;
    anything else (a float, a string, a generator, or a ``bool``: ``Slice(True)`` is
    index 1) is refused as ``ValueError`` naming ``name``, the caller's argument
    (TransformerLens said "Invalid input_slice 2.5")."""
    if isinstance(value, Slice):
        return value
    if not isinstance(value, bool):
        try:
            return Slice(value)
        except ValueError:
            pass
    raise ValueError(
        f"{name} must be None, an int, a (start, stop[, step]) tuple, a list, array or tensor "
        f"of indices, or a Slice, got {value!r}"
    )


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

"""TransformerLens model methods with no AttnRes meaning: the optional-hook flags
(``set_use_attn_result``, ``set_use_split_qkv_input``, ``set_use_hook_mlp_in``; and
``set_use_attn_in``, which refuses),
``tl_parameters`` (what ``SVDInterpreter`` reads) and ``all_head_labels``."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Optional

from torch import Tensor

from hooked_attnres._validation import require_bool
from hooked_attnres.model.attention import Attention
from hooked_attnres.model.hooked_root import UnknownHookError
from hooked_attnres.model.mlp import GatedMLP
from hooked_attnres.model.norms import has_module_hooks

if TYPE_CHECKING:
    from hooked_attnres.config import HookedAttnResConfig
    from hooked_attnres.model.depth import RoutingLayout

# optional hook (leaf name) -> the method that creates it
OPTIONAL_HOOKS: dict[str, str] = {
    "hook_result": "set_use_attn_result",
    "hook_q_input": "set_use_split_qkv_input",
    "hook_k_input": "set_use_split_qkv_input",
    "hook_v_input": "set_use_split_qkv_input",
    "hook_mlp_in": "set_use_hook_mlp_in",
}


def optional_hook_method(name: str) -> Optional[str]:
    """The ``set_use_*`` method that creates the hook point ``name`` (a full name such as
    ``blocks.0.attn.hook_result``), or ``None`` for a hook that always exists or no hook."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in OPTIONAL_HOOKS and re.fullmatch(r"blocks\.\d+\.(attn\.)?hook_\w+", name):
        return OPTIONAL_HOOKS[leaf]
    return None


class HeadLabels(list):
    """``["L0H0", "L0H1", ...]``; also callable, because TransformerLens's
    ``HookedTransformer.all_head_labels`` is a method and ``TransformerBridge``'s a
    property."""

    def __call__(self) -> list[str]:
        return list(self)


class TLMethodsMixin:
    """See the module docstring. The optional hooks exist only while their flag is on:
    a hook function added to one while it is off would never run, so that is refused
    with the name of the flag instead."""

    if TYPE_CHECKING:  # provided by HookedAttnRes
        blocks: Any
        hook_dict: dict
        routing_layout: RoutingLayout
        W_U: Tensor
        b_U: Tensor

        @property
        def cfg(self) -> HookedAttnResConfig: ...

        def setup(self) -> None: ...

        def named_parameters(self, *args, **kwargs) -> Any: ...

        def named_modules(self, *args, **kwargs) -> Any: ...

    # --- optional hooks ---------------------------------------------------------------
    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Create (``True``) or remove ``blocks.{l}.attn.hook_result``
        ``[batch, pos, n_heads, d_model]``: each head's output ``z[h] @ W_O[h]``. The
        attention output is then computed as its sum over heads (equal to the usual
        output to float rounding), so editing a head's result edits the output."""
        enabled = require_bool("use_attn_result", use_attn_result)
        self._refuse_dropping_hooks("set_use_attn_result", enabled)
        for block in self.blocks:
            block.attn.set_attn_result(enabled)
        self._refresh_hooks("use_attn_result", enabled)

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """Create (``True``) or remove ``blocks.{l}.hook_q_input`` ``[batch, pos, n_heads,
        d_model]`` and ``hook_k_input`` / ``hook_v_input`` ``[batch, pos, n_kv, d_model]``
        (and the same three under ``blocks.{l}.attn.``, TransformerLens 4.x's names, which
        fire right after on the same tensors): one copy of the attention input per head,
        each normalised with ``ln1``'s gain on its own, so that a head's query, key or value
        input can be patched alone (``transformer_lens.patching.get_act_patch_direct_path``).
        While on, ``ln1``'s hooks still fire once per layer on the shared input (as in
        TransformerBridge; ``HookedTransformer`` fired them once per copy); the heads do
        not read them, so a hook that edits them raises ``ValueError`` during the pass:
        patch the per-head inputs instead.

        Raises:
            ValueError: in a routed layout: there the attention input is a router's mix of
                depth sources, not the residual stream, so TransformerLens's direct-path
                patching (which adds a head's write to this input) would be silently wrong.
        """
        enabled = require_bool("use_split_qkv_input", use_split_qkv_input)
        if enabled:
            self._refuse_split_qkv_when_routed()
        self._refuse_dropping_hooks("set_use_split_qkv_input", enabled)
        for block in self.blocks:
            block.set_split_qkv_input(enabled)
        self._refresh_hooks("use_split_qkv_input", enabled)

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """Create (``True``) or remove ``blocks.{l}.hook_mlp_in`` ``[batch, pos, d_model]``:
        a copy of the MLP input before ``ln2`` (the residual stream in layout ``none``,
        the ``mlp_res`` router's output in routed layouts); editing it edits only what
        the MLP reads."""
        enabled = require_bool("use_hook_mlp_in", use_hook_mlp_in)
        self._refuse_dropping_hooks("set_use_hook_mlp_in", enabled)
        for block in self.blocks:
            block.set_hook_mlp_in(enabled)
        self._refresh_hooks("use_hook_mlp_in", enabled)

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        """TransformerBridge's per-head copies of the attention input (``hook_attn_in``
        ``[batch, pos, n_heads, d_model]``) are not implemented: ``True`` raises
        ``NotImplementedError`` naming what to use instead; ``False`` (the state of every
        model here) does nothing, so TransformerLens code that restores the flag runs.

        Raises:
            NotImplementedError: for ``True``.
        """
        if require_bool("use_attn_in", use_attn_in):
            raise NotImplementedError(
                "set_use_attn_in(True) (hook_attn_in) is not implemented by HookedAttnRes. "
                "For one input per head use set_use_split_qkv_input(True) (layout 'none'): "
                "hook_q_input / hook_k_input / hook_v_input hold each head's query, key and "
                "value input; in routed layouts patch the attention router's hook_out"
            )

    def _refuse_dropping_hooks(self, method: str, enabled: bool) -> None:
        """Raise ``ValueError`` before ``method(False)`` removes a hook point that holds
        hooks: they would be gone silently, also after ``method(True)`` (TransformerLens
        keeps its hook points, so there they fire again)."""
        if enabled:
            return
        held = [
            name
            for name, point in self.hook_dict.items()
            if OPTIONAL_HOOKS.get(name.rsplit(".", 1)[-1]) == method and has_module_hooks(point)
        ]
        if held:
            raise ValueError(
                f"{method}(False) would remove hook points that hold hooks ({', '.join(held)}); "
                "they would not come back with "
                f"{method}(True). Remove them first (model.reset_hooks(), with "
                "including_permanent=True for permanent ones)"
            )

    def _refuse_split_qkv_when_routed(self) -> None:
        if self.routing_layout.has_routers:
            raise ValueError(
                "set_use_split_qkv_input(True) is refused in the "
                f"{self.cfg.attnres_layout!r} layout: the attention input is a router's mix "
                "of depth sources, not the residual stream, so TransformerLens's direct-path "
                "patching (which adds a head's write to it) would give wrong numbers. Patch "
                "the attention router's hook_sources or hook_out instead; layout 'none' "
                "supports split inputs"
            )

    def _create_optional_hooks(self) -> None:
        """The optional hooks that the config's flags ask for (before ``setup()``)."""
        cfg = self.cfg
        for flag in ("use_attn_in", "use_hook_tokens"):
            if getattr(cfg, flag):
                raise ValueError(f"{flag}=True is not supported by HookedAttnRes")
        if cfg.use_split_qkv_input:
            self._refuse_split_qkv_when_routed()
        for block in self.blocks:
            block.attn.set_attn_result(cfg.use_attn_result)
            block.set_split_qkv_input(cfg.use_split_qkv_input)
            block.set_hook_mlp_in(cfg.use_hook_mlp_in)

    def _refresh_hooks(self, flag: str, enabled: bool) -> None:
        setattr(self.cfg, flag, enabled)
        self.setup()  # rebuild hook_dict / mod_dict and hook names

    def check_hook_name(self, name: str) -> None:
        """As `HookedModule.check_hook_name`, naming the ``set_use_*`` flag for an
        optional hook that is switched off."""
        if name not in self.hook_dict:
            method = optional_hook_method(name)
            if method is not None:
                flag = method.removeprefix("set_")
                assigned = (
                    f"; model.cfg.{flag} is True, assigned directly, which creates no hook "
                    f"(TransformerLens 2.x read the flag during the pass): call "
                    f"model.{method}(True)"
                    if getattr(self.cfg, flag, False)
                    else ""
                )
                raise UnknownHookError(
                    name,
                    f"{name!r} exists only while model.{method}(True) is on "
                    f"(TransformerLens's optional hooks){assigned}",
                )
        super().check_hook_name(name)  # type: ignore[misc]

    # --- weights and labels -----------------------------------------------------------
    def tl_parameters(self) -> dict[str, Tensor]:
        """Every parameter under its TransformerLens name, plus the TransformerLens views
        that are not parameters here: ``blocks.{l}.attn.W_K`` / ``W_V`` (repeated to
        ``n_heads`` for grouped-query attention; ``attn._W_K`` / ``_W_V`` are the
        ``n_kv`` heads), the zero biases ``b_Q, b_K, b_V, b_O, mlp.b_in, mlp.b_out``,
        ``unembed.W_U`` (``embed.W_E.T`` when tied) and ``unembed.b_U``.

        ``transformer_lens.SVDInterpreter`` reads this (as it does on
        ``TransformerBridge``). Norm gains are separate parameters (``ln1.w``,
        ``ln2.w``, ``ln_final.w``), as with ``fold_ln=False``. Views are fresh tensors
        (edits do not reach the model) where a parameter had to be repeated or created.
        """
        params: dict[str, Tensor] = dict(self.named_parameters())
        views = {Attention: ("W_K", "W_V", "b_Q", "b_K", "b_V", "b_O"), GatedMLP: ("b_in", "b_out")}
        for path, module in self.named_modules():  # TransformerLens names are module paths
            for name in views.get(type(module), ()):
                params[f"{path}.{name}"] = getattr(module, name)
        params["unembed.W_U"] = self.W_U
        params["unembed.b_U"] = self.b_U
        return params

    def tl_named_parameters(self):
        """`tl_parameters` as ``(name, tensor)`` pairs."""
        return iter(self.tl_parameters().items())

    @property
    def all_head_labels(self) -> HeadLabels:
        """``["L0H0", "L0H1", ..., f"L{n_layers-1}H{n_heads-1}"]`` (a list; calling it,
        ``model.all_head_labels()``, works too)."""
        cfg = self.cfg
        return HeadLabels(
            f"L{layer}H{head}" for layer in range(cfg.n_layers) for head in range(cfg.n_heads)
        )

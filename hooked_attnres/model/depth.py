"""The depth state and the layout rules that say which sources each router reads.

Every layout keeps the same explicit state between sublayers (`DepthState`):

* ``blocks``: the committed sources, oldest first;
* ``current``: the running source (the last source every router reads);
* ``current_is_committed``: the current source is a finished block that the next
  sublayer output pushes into ``blocks`` (partial-sum layouts only).

A router always reads ``blocks + [current]``. The layouts differ only in what a
sublayer write and a commit do (``docs/architecture.md`` has worked examples):

============  ============================  ===============================  ==========
layout        sublayer write                commit (at a block boundary)     final router
============  ============================  ===============================  ==========
cumulative    ``current += out``            append a snapshot of ``current``  no
kimi          ``current += out``, or start  mark ``current`` finished: the    yes
              a new block with ``out``      next write pushes it to blocks
full          like kimi; every sublayer     like kimi                        yes
              ends a block
none          ``current += out``            never                            no
============  ============================  ===============================  ==========

`RoutingLayout` holds these rules without tensors, so that source labels, families
and counts come from exactly the schedule the forward pass runs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Generic, Literal, Optional, TypeVar, Union

import torch
from torch import Tensor

from hooked_attnres._validation import is_integer, require_choice

if TYPE_CHECKING:
    from hooked_attnres.config import HookedAttnResConfig

Router = Literal["attn_res", "mlp_res", "final_res"]
ROUTERS: tuple[str, ...] = ("attn_res", "mlp_res", "final_res")
SUBLAYER_ROUTERS: tuple[str, ...] = ("attn_res", "mlp_res")
FAMILIES: tuple[str, ...] = ("embedding", "older", "prev_completed", "current")
# the hooks of every router: RouterSite.hook(name) -> module path of the HookPoint
ROUTER_HOOKS: dict[str, str] = {
    "sources": "hook_sources",
    "scale": "key_norm.hook_scale",
    "logits": "hook_logits",
    "weights": "hook_weights",
    "out": "hook_out",
}
# the hook where a block is committed, by the sublayer that ends it (AttnResBlock creates them)
COMMIT_HOOKS: dict[str, str] = {"attn": "hook_committed_mid", "mlp": "hook_committed_block"}


def sublayer_index(layer: int, sublayer: str) -> int:
    """The forward-order index of ``layer``'s ``sublayer`` (``"attn"`` or ``"mlp"``):
    ``2 * layer`` and ``2 * layer + 1`` (``2 * n_layers`` is what the final norm reads).
    The index of `DepthState` read points, `RouterSite.sublayer` and ``forward_from``."""
    sublayer = require_choice("sublayer", sublayer, tuple(COMMIT_HOOKS))
    return 2 * layer + (sublayer == "mlp")


def layer_index(layer: Any, n_layers: int, where: str = "") -> int:
    """``layer`` as an index in ``[0, n_layers)``: an integer (`is_integer`: a bool, a float,
    a string are refused) in ``[-n_layers, n_layers)``, a negative one counted from the end;
    otherwise ``ValueError("layer must be an integer in [-L, L){where}, got ...")``. The one
    layer rule: `RoutingLayout.site` (through `RoutingLayout.layer_index`) and the layer
    selections of the interventions (`resolve_layers`, custom bands and groups) read a
    layer with it, and so does a cache key's integer layer (``cache["resid_pre", -1]``,
    refused with TransformerLens's ``KeyError``)."""
    if not is_integer(layer) or not -n_layers <= layer < n_layers:
        raise ValueError(
            f"layer must be an integer in [-{n_layers}, {n_layers}){where}, got {layer!r}"
        )
    return int(layer) % n_layers


def router_kind(kind: Any) -> str:
    """``kind`` checked to be a router type of `ROUTERS` (`require_choice`: a NumPy string
    is the ``str`` it holds; anything else, an array too, raises ``ValueError("router must
    be one of ('attn_res', 'mlp_res', 'final_res'), got ...")``)."""
    return require_choice("router", kind, ROUTERS)


def router_hook_key(name: Any) -> str:
    """The key of `ROUTER_HOOKS` that ``name`` names: ``"weights"`` or ``"hook_weights"``
    (and so for ``"sources"``, ``"scale"``, ``"logits"``, ``"out"``) -> ``"weights"``;
    anything else, a non-string too, raises ``ValueError("hook must be one of (...),
    got ...")`` (`require_choice`)."""
    names = tuple(ROUTER_HOOKS) + tuple(f"hook_{key}" for key in ROUTER_HOOKS)
    return require_choice("hook", name, names).removeprefix("hook_")


# the axis (counted from the end) along which each router hook holds its sources
SOURCE_AXIS: dict[str, Optional[int]] = {
    "sources": -2,
    "scale": -2,
    "logits": -1,
    "weights": -1,
    "out": None,
}
NO_ROUTERS = (
    "this model has attnres_layout='none' and therefore no routers (no routing to edit or "
    "read): its one residual stream is edited through its TransformerLens hooks, hook_embed "
    "and blocks.{l}.hook_resid_pre / hook_attn_out / hook_mlp_out, with run_with_hooks "
    "(transformer_lens.patching patches them)"
)


def source_axis(hook_name: str) -> Optional[int]:
    """The axis (from the end) that counts sources in a router hook's activation, from the
    hook's name; ``None`` for other hooks (and ``hook_out``)."""
    for key, leaf in ROUTER_HOOKS.items():
        if hook_name.endswith("_res." + leaf):
            return SOURCE_AXIS[key]
    return None


_KINDS = "|".join(ROUTERS)
_KEYS = "|".join(ROUTER_HOOKS)
# RouterSite.alias: "blocks.{l}.hook_{kind}_{hook}" / "hook_final_res_{hook}"
_ALIAS = re.compile(r"(?:blocks\.(\d+)\.)?hook_(" + _KINDS + ")_(" + _KEYS + ")")
# a router hook's full name (RouterSite.hook) and the names that spell it with another path
# below the router (the modules of ROUTER_HOOKS' leaves, "key_norm."): get_act_name("scale",
# 3, "attn_res") and cache["scale", 3, "attn_res"] build "blocks.3.attn_res.hook_scale" for
# "blocks.3.attn_res.key_norm.hook_scale", and get_act_name("scale", None, "final_res")
# "ln_final.final_res.hook_scale" (TransformerLens puts "ln_final." before a layerless scale)
_BELOW = "|".join(
    sorted({re.escape(leaf.rpartition(".")[0]) for leaf in ROUTER_HOOKS.values()} - {""})
)
_ROUTER_HOOK = re.compile(
    r"(?:blocks\.(\d+)\.|ln_final\.)?("
    + _KINDS
    + r")\.(?:(?:"
    + _BELOW
    + r")\.)?hook_("
    + _KEYS
    + ")"
)
# a commit hook's (COMMIT_HOOKS)
_COMMIT_HOOK = re.compile(r"blocks\.(\d+)\.(" + "|".join(COMMIT_HOOKS.values()) + ")")


@dataclass(frozen=True)
class RouterSite:
    """Where one router sits: ``(layer, kind)``, ``layer=None`` for the final router.

    Get sites from the layout (``model.sites()``, ``model.site(3, "attn_res")``), which
    checks them; every other module takes sites instead of formatting hook names.

    Attributes:
        layer: the decoder layer, or ``None`` for the final router.
        kind: ``"attn_res"``, ``"mlp_res"`` or ``"final_res"``.
        sublayer: the sublayer the router feeds, in forward order: ``2 * layer``
            (attention), ``2 * layer + 1`` (MLP), ``2 * n_layers`` (final router, before
            the unembedding); the index of `HookedAttnRes.depth_states` /
            `HookedAttnRes.forward_from` where an intervention on this router starts.
    """

    layer: Optional[int]
    kind: str
    sublayer: int

    @property
    def is_final(self) -> bool:
        return self.layer is None

    @property
    def prefix(self) -> str:
        """Module path of the router: ``"blocks.3.attn_res"`` or ``"final_res"``."""
        return self.kind if self.layer is None else f"blocks.{self.layer}.{self.kind}"

    def hook(self, name: str) -> str:
        """The name of one of the router's hooks: ``"sources"``, ``"scale"``,
        ``"logits"``, ``"weights"`` or ``"out"`` (``"hook_weights"`` also works), e.g.
        ``"blocks.3.attn_res.hook_weights"``; another name raises ``ValueError``
        (`router_hook_key`)."""
        return f"{self.prefix}.{ROUTER_HOOKS[router_hook_key(name)]}"

    def alias(self, name: str) -> str:
        """A second name of one of the router's hooks that TransformerLens's
        ``get_act_name`` can produce: ``"blocks.3.hook_attn_res_weights"`` (``get_act_name(
        "attn_res_weights", 3)``) or ``"hook_final_res_weights"``. The model's hook
        functions and its `ActivationCache` accept it, so that
        ``transformer_lens.patching.generic_activation_patch(..., activation_name=
        "attn_res_weights", index_axis_names=("layer", "pos"))`` patches router hooks."""
        key = router_hook_key(name)
        if self.layer is None:
            return f"hook_{self.kind}_{key}"
        return f"blocks.{self.layer}.hook_{self.kind}_{key}"

    @staticmethod
    def activation_name(kind: str, name: str) -> str:
        """The ``get_act_name`` shorthand of a router hook: ``("attn_res", "weights") ->
        "attn_res_weights"`` (``get_act_name("attn_res_weights", 3)`` is `alias`); an
        unknown router or hook name raises ``ValueError`` (`router_kind`,
        `router_hook_key`)."""
        return f"{router_kind(kind)}_{router_hook_key(name)}"

    @property
    def table_layer(self) -> int:
        """The layer as an integer column of a table: ``-1`` for the final router."""
        return -1 if self.layer is None else self.layer

    def __str__(self) -> str:
        return self.kind if self.layer is None else f"{self.kind} layer {self.layer}"


SiteLike = Union[RouterSite, tuple]

Payload = TypeVar("Payload")


class _Unrecorded:
    """The type of `UNRECORDED`: one instance, which ``copy`` / ``copy.deepcopy``,
    ``pickle`` and ``torch.save`` keep (so a copied hand-built state is still one)."""

    def __repr__(self) -> str:
        return "UNRECORDED"

    def __reduce__(self) -> str:
        return "UNRECORDED"  # the module attribute: copies and unpickling return it


# the padding of a DepthState built by hand: not known (None means "no padding")
UNRECORDED: Any = _Unrecorded()


@dataclass
class DepthState(Generic[Payload]):
    """The depth sources between two sublayers.

    With tensors, every source is ``[batch, pos, d_model]``. The same class with string
    payloads is used to derive source labels. A forward pass never mutates a state it
    was given: `RoutingLayout.write` and `RoutingLayout.commit` return new states, so a
    cached state can start any number of forward passes (``start_at_layer``).

    Attributes:
        blocks: committed sources, oldest first (the embedding is ``blocks[0]`` once
            committed).
        current: the running source, read last by every router.
        current_is_committed: ``current`` is a finished block (kimi / full layouts).
        entering_sublayer: (keyword) the sublayer index the state enters, recorded by
            `HookedAttnRes.depth_states` / ``stop_at_layer``; ``None``: not recorded.
        padding: (keyword) ``[batch, pos]`` bool, True at real tokens, of the pass that
            made the state where its ``attention_mask`` marked padding; ``None`` for a
            pass without padding; `UNRECORDED` (the default) for a state built by hand,
            which resumes only with an explicit ``attention_mask=``. Both records survive
            ``dataclasses.replace`` and `gather_positions`.
        continues: (keyword) for a state returned by ``stop_at_layer`` of a pass that
            caching hooks recorded: that pass's `PassInput` maker and its sources as they
            were (each tensor with its version counter), so that a pass started from the
            unchanged state counts as the same pass for the caches (`RunCacheDict.stale`);
            ``None`` otherwise.
    """

    blocks: list[Payload]
    current: Payload
    current_is_committed: bool = False
    entering_sublayer: Optional[int] = field(default=None, kw_only=True, compare=False, repr=False)
    padding: Any = field(default=UNRECORDED, kw_only=True, compare=False, repr=False)
    continues: Any = field(default=None, kw_only=True, compare=False, repr=False)

    @property
    def sources(self) -> list[Payload]:
        """What a router reads: ``blocks + [current]``."""
        return [*self.blocks, self.current]

    @property
    def n_sources(self) -> int:
        return len(self.blocks) + 1


@dataclass(frozen=True)
class RoutingLayout:
    """The tensor-free rules of one model's depth routing.

    Args:
        layout: ``"cumulative"``, ``"kimi"``, ``"full"`` or ``"none"``.
        n_layers: number of decoder layers ``L``.
        layers_per_block: ``S = ceil(L / N)``; unused without routers and with a block
            per sublayer (`from_config` gives 1 there).
        mode: ``"block"`` or ``"full"`` (cumulative layout only).
    """

    layout: str
    n_layers: int
    layers_per_block: int
    mode: str = "block"
    _walk_cache: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_config(cls, cfg: HookedAttnResConfig) -> RoutingLayout:
        """The routing of ``cfg``. Where ``attnres_num_blocks`` is unused (no routers, or a
        block per sublayer) its ``layers_per_block`` is 1, so that two such models compare
        equal whatever number their config holds (a plain model loaded with
        ``from_hf_qwen3(wrap="none")`` holds ``min(8, n_layers)``: a cache of it was
        refused for the same model built with another number, "its sources are not this
        model's sources")."""
        layout = cls(cfg.attnres_layout, cfg.n_layers, 1, cfg.attnres_mode)
        if layout.layer_blocks is None:  # no layer spans blocks: S is unused
            return layout
        return cls(cfg.attnres_layout, cfg.n_layers, cfg.layers_per_block, cfg.attnres_mode)

    # --- the schedule -----------------------------------------------------------------
    @property
    def has_routers(self) -> bool:
        """Whether the model routes at all (every layout but ``"none"``)."""
        return self.layout != "none"

    @property
    def has_final_router(self) -> bool:
        """Whether a final router mixes the sources before ``ln_final`` (partial-sum
        layouts: ``"kimi"`` and ``"full"``). The only place this is decided."""
        return self.layout in ("kimi", "full")

    @property
    def last_attention_sublayer(self) -> int:
        """The sublayer index (as `RouterSite.sublayer`) of the last layer's attention,
        ``2 * n_layers - 2``: every sublayer after it (the last MLP, the final router,
        the unembedding) acts on each position alone, so a pass that needs logits at one
        position per prompt (``logit_positions``) runs them, and the routers in front of
        them, at that position only."""
        return 2 * self.n_layers - 2

    def require_routers(self) -> None:
        """Raise ``ValueError`` on a layout without routers (``"none"``)."""
        if not self.has_routers:
            raise ValueError(NO_ROUTERS)

    @property
    def snapshots(self) -> bool:
        """Committed blocks are copies of a never-reset stream (cumulative layout)."""
        return self.layout == "cumulative"

    @property
    def layer_blocks(self) -> Optional[int]:
        """How many blocks of ``layers_per_block`` layers the model has,
        ``ceil(n_layers / layers_per_block)``, which can be fewer than
        ``attnres_num_blocks`` when that does not divide ``n_layers`` (5 layers, ``N = 4``:
        3 blocks of 2, 2 and 1 layers; 7 layers, ``N = 3``: 3 blocks of 3, 3 and 1);
        ``None`` where ``attnres_num_blocks`` is not used: no routers (``"none"``), or a
        block per sublayer (``"full"``, cumulative ``mode="full"``)."""
        if not self.has_routers or self.commits_after_attn(0):
            return None
        return -(-self.n_layers // self.layers_per_block)

    def blocks_text(self) -> str:
        """The blocks the model has, in words: ``"no routers"``, ``"a block per
        sublayer"``, or ``"3 blocks of 2 layers (the last of 1)"`` (`layer_blocks` of
        ``layers_per_block`` layers; the config's ``attnres_num_blocks`` may exceed the
        count, 5 layers, 4 asked, 3 blocks)."""
        n_blocks, size = self.layer_blocks, self.layers_per_block
        if not self.has_routers:
            return "no routers"
        if n_blocks is None:
            return "a block per sublayer"
        last = self.n_layers - size * (n_blocks - 1)
        return f"{n_blocks} block{'s' if n_blocks != 1 else ''} of {size} layer" + (
            f"{'s' if size != 1 else ''}" + (f" (the last of {last})" if last != size else "")
        )

    def commits_after_attn(self, layer: int) -> bool:
        """Whether the attention sublayer of ``layer`` ends a block."""
        return self.layout == "full" or (self.layout == "cumulative" and self.mode == "full")

    def commits_after_mlp(self, layer: int) -> bool:
        """Whether the MLP sublayer of ``layer`` ends a block."""
        if self.layout == "none":
            return False
        if self.commits_after_attn(layer):
            return True
        return (layer + 1) % self.layers_per_block == 0

    def initial_state(self, embedding: Payload, current: Optional[Payload] = None) -> DepthState:
        """The state before layer 0.

        Snapshot layouts start with ``blocks=[embedding]`` and ``current`` equal to the
        embedding (pass a separate copy as ``current`` so that in-place edits of the
        stream do not reach the committed embedding). Partial-sum layouts start with the
        embedding as a finished current block.
        """
        current = embedding if current is None else current
        if self.snapshots:
            return DepthState([embedding], current, False)
        if self.layout == "none":
            return DepthState([], current, False)
        return DepthState([], current, True)

    def write(self, state: DepthState, output, add) -> DepthState:
        """The state after a sublayer writes ``output``; ``add(a, b)`` adds payloads."""
        if state.current_is_committed:
            return DepthState([*state.blocks, state.current], output, False)
        return DepthState(list(state.blocks), add(state.current, output), False)

    def commit(self, state: DepthState, committed) -> DepthState:
        """The state after a block boundary; ``committed`` is the (hooked) block value.

        Snapshot layouts append ``committed`` and keep ``current``; partial-sum layouts
        replace ``current`` by ``committed`` and mark it finished.
        """
        if self.snapshots:
            return DepthState([*state.blocks, committed], state.current, False)
        return DepthState(list(state.blocks), committed, True)

    # --- router sites -------------------------------------------------------------------
    def site(self, layer: Optional[int], kind: str) -> RouterSite:
        """The checked `RouterSite` of ``(layer, kind)``; negative layers count from the end;
        the final router is ``(None, "final_res")``.

        Raises:
            ValueError: on layout ``"none"``, an unknown kind, a layer out of range, or
                ``"final_res"`` on a layout without a final router, naming what is valid.
        """
        self.require_routers()
        kind = router_kind(kind)
        if kind == "final_res":
            if not self.has_final_router:
                raise ValueError(
                    f"the {self.layout!r} layout has no final router; routers are 'attn_res' "
                    "and 'mlp_res'"
                )
            # n_layers too (the sublayer it reads at is 2 * n_layers), as an integer only:
            # 2.0 was the final router while 1.0 is no attn_res layer (audit 162)
            if layer is not None and not (is_integer(layer) and layer == self.n_layers):
                raise ValueError(f"the final router has no layer; pass layer=None, got {layer!r}")
            return RouterSite(None, kind, 2 * self.n_layers)
        layer = self.layer_index(layer, f" for router {kind!r}")
        return RouterSite(
            layer, kind, sublayer_index(layer, "mlp" if kind == "mlp_res" else "attn")
        )

    def layer_index(self, layer: Any, where: str = "") -> int:
        """`layer_index` of this layout's ``n_layers``: the layer rule of `site`, and of every
        layer argument that names no router (``depth_state_name`` in layout ``"none"``)."""
        return layer_index(layer, self.n_layers, where)

    def _named_site(self, match: re.Match) -> RouterSite:
        """The router that a name matched by `_ALIAS` or `_ROUTER_HOOK` (group 1 the layer,
        group 2 the router) points at, by `site`'s rules: its ``ValueError`` for a router
        this layout lacks (layout ``"none"``, the final router of ``"cumulative"``, a layer
        out of range, a final router given a layer, a sublayer router given none)."""
        layer = match.group(1)
        return self.site(None if layer is None else int(layer), match.group(2))

    def resolve_alias(self, name: str) -> Optional[str]:
        """The hook name behind a `RouterSite.alias` of this model, else ``None``."""
        match = _ALIAS.fullmatch(name)
        if match is None or not self.has_routers:
            return None
        if (match.group(1) is None) != (match.group(2) == "final_res"):
            return None  # the alias of a final router has no layer, a sublayer router's one
        try:
            site = self._named_site(match)
        except ValueError:
            return None
        return site.hook(match.group(3))

    def router_hook_spelling(self, name: str) -> Optional[str]:
        """Where a router hook that ``name`` spells with another path below the router is:
        ``"blocks.3.attn_res.hook_scale"`` (what ``get_act_name("scale", 3, "attn_res")``
        and ``cache["scale", 3, "attn_res"]`` build, as ``cache["weights", 3, "attn_res"]``
        builds ``hook_weights``) names the key norm's ``"blocks.3.attn_res.key_norm.hook_scale"``,
        and ``"ln_final.final_res.hook_scale"`` (``cache["scale", None, "final_res"]``) the
        final router's, so the text says that name and its alias (`RouterSite.alias`);
        ``None`` for any other name, for a hook's own name and for a router this layout
        lacks (`absent_hook`)."""
        match = _ROUTER_HOOK.fullmatch(name)
        if match is None:
            return None
        try:
            site = self._named_site(match)
        except ValueError:
            return None  # absent_hook says why
        key = match.group(3)
        if site.hook(key) == name:
            return None
        shorthand = RouterSite.activation_name(site.kind, key)
        key_text = f"[{shorthand!r}]" if site.layer is None else f"[{shorthand!r}, {site.layer}]"
        where = (
            "final router" if site.layer is None else f"{site.kind} router of layer {site.layer}"
        )
        return (
            f"the {key} hook of the {where} is {site.hook(key)!r} (or its alias "
            f"{site.alias(key)!r}: cache{key_text}, get_act_name({shorthand!r}"
            f"{'' if site.layer is None else f', {site.layer}'}))"
        )

    def absent_hook(self, name: str) -> Optional[str]:
        """Why this layout has no hook ``name`` where ``name`` is a router hook
        (`RouterSite.hook`, `RouterSite.alias` or `router_hook_spelling` spelling) or a
        commit hook (`COMMIT_HOOKS`) that another layout or layer has: `site`'s refusal
        (``"this model has attnres_layout='none' and therefore no routers"``, ``"the
        'cumulative' layout has no final router; ..."``, a layer out of range, ``"the final
        router has no layer; ..."``), or the sublayer that ends no block here; ``None`` for
        any other name (and for one this layout has)."""
        router = _ROUTER_HOOK.fullmatch(name) or _ALIAS.fullmatch(name)
        if router is not None:
            try:
                self._named_site(router)
            except ValueError as refused:
                return str(refused)
            return None
        commit = _COMMIT_HOOK.fullmatch(name)
        if commit is None:
            return None
        if not self.has_routers:
            return NO_ROUTERS
        try:
            layer_ = self.layer_index(int(commit.group(1)), " for a commit hook")
        except ValueError as refused:
            return str(refused)
        sublayer = next(key for key, leaf in COMMIT_HOOKS.items() if leaf == commit.group(2))
        if self.commit_hook(layer_, sublayer) is not None:
            return None
        return (
            f"no block ends after layer {layer_}'s {sublayer} in the {self.layout!r} layout "
            f"({self.blocks_text()}); model.routing_layout.commit_hooks() names the commit hooks"
        )

    def check(self, site: Union[SiteLike, int, None], kind: Optional[str] = None) -> RouterSite:
        """A `RouterSite` of this layout from a site, a ``(layer, kind)`` pair, or
        ``(layer, kind=...)``; raises ``ValueError`` if this layout has no such router
        (`site`'s message: ``(True, "attn_res")`` and ``(True, kind="attn_res")`` alike) or
        for a site or pair given with another ``kind`` than its own (the ``kind`` was
        dropped, so ``model.source_labels((0, "attn_res"), "mlp_res")`` gave the attention
        router's labels), and ``TypeError`` for anything else without a ``kind``. A site or
        pair given with its own router (`router_kind`'s reading: ``((0, "attn_res"),
        "attn_res")``) is that site."""
        if kind is not None:
            if isinstance(site, (RouterSite, tuple)):
                checked = self.check(site)
                if router_kind(kind) != checked.kind:
                    raise ValueError(
                        f"{site!r} names its router, and router={kind!r} was given too; pass "
                        "the site alone, or (layer, router)"
                    )
                return checked
            return self.site(site, kind)
        if isinstance(site, RouterSite):
            checked = self.site(site.layer, site.kind)
            if checked != site:
                raise ValueError(f"{site!r} is not a router site of this model ({checked!r} is)")
            return checked
        if isinstance(site, tuple) and len(site) == 2:
            return self.site(*site)
        raise TypeError(f"expected a RouterSite or a (layer, router) pair, got {site!r}")

    def sites(self, kinds: Union[None, str, Sequence[str]] = None) -> list[RouterSite]:
        """Every router site in forward order (the final router last), optionally only
        those of some kinds; ``[]`` on layout ``"none"``.

        Raises:
            ValueError: an unknown kind, or ``"final_res"`` asked for by name on a layout
                without a final router.
        """
        if not self.has_routers:
            return []
        wanted = (
            ROUTERS if kinds is None else ((kinds,) if isinstance(kinds, str) else tuple(kinds))
        )
        wanted = tuple(router_kind(kind) for kind in wanted)
        if kinds is not None and "final_res" in wanted:
            self.site(None, "final_res")  # raises on a layout without a final router
        out = [
            self.site(layer, kind)
            for layer in range(self.n_layers)
            for kind in SUBLAYER_ROUTERS
            if kind in wanted
        ]
        if self.has_final_router and "final_res" in wanted:
            out.append(self.site(None, "final_res"))
        return out

    # --- the schedule with symbolic payloads ---------------------------------------------
    def commits_after(self, layer: int, sublayer: str) -> bool:
        """Whether ``sublayer`` (``"attn"`` / ``"mlp"``) of ``layer`` ends a block."""
        if sublayer == "attn":
            return self.commits_after_attn(layer)
        return self.commits_after_mlp(layer)

    def trace(
        self,
        embedding: Payload,
        output: Callable[[int, str], Payload],
        add: Callable[[Payload, Payload], Payload],
        committed: Callable[[DepthState, int, str], Payload],
        enter: Optional[Callable[[Payload, int], Payload]] = None,
    ) -> tuple[list[DepthState], dict[tuple[int, str], Payload]]:
        """Run the schedule on symbolic payloads (the tensor-free twin of
        ``HookedAttnRes.depth_states(tokens, sublayers=True)``).

        Args:
            embedding: the payload of the embedding.
            output: ``(layer, "attn" | "mlp") -> payload`` of a sublayer's output.
            add: ``(current, output) -> payload``, what ``current += output`` means.
            committed: ``(state, layer, sublayer) -> payload`` of the block committed there
                (``state`` is the state after the write).
            enter: optional ``(current, layer) -> payload``, what ``current`` becomes as
                ``layer`` starts (the forward runs it through ``hook_resid_pre`` there);
                ``None``: unchanged.

        Returns:
            ``(states, commits)``: the ``2 * n_layers + 1`` states entering every sublayer
            (index ``2 * layer`` attention, ``2 * layer + 1`` MLP, ``2 * n_layers`` the
            final readout) and ``{(layer, sublayer): committed payload}``.
        """
        states: list[DepthState] = []
        commits: dict[tuple[int, str], Payload] = {}
        state = self.initial_state(embedding)
        for layer in range(self.n_layers):
            if enter is not None:  # as Block.attn_sublayer
                state = replace(state, current=enter(state.current, layer))
            for sublayer in ("attn", "mlp"):
                states.append(state)
                state = self.write(state, output(layer, sublayer), add)
                if self.commits_after(layer, sublayer):
                    value = committed(state, layer, sublayer)
                    commits[(layer, sublayer)] = value
                    state = self.commit(state, value)
        states.append(state)
        return states, commits

    # --- labels and families ----------------------------------------------------------
    def _walk(self) -> dict:
        """Run the schedule once with string payloads (memoised).

        Returns ``{"labels": {(layer, router): [label, ...]}, "signatures": {sublayer:
        (n_blocks, current_is_committed)}, "commits": {(layer, sublayer): label},
        "components": {sublayer: [components of each source]}, "stored": {sublayer: [hook
        holding each source]}}`` (`source_hooks`) where a signature
        describes the state entering sublayer ``2 * layer`` (attention) or ``2 * layer + 1``
        (MLP); ``2 * n_layers`` is the state after the last layer.
        """
        if self._walk_cache:
            return self._walk_cache
        block_index = 0

        def read(state: DepthState) -> list[str]:
            names = state.sources
            if len(names) > 1:
                names[-1] = "current"
            return names

        def name_block(state: DepthState, layer: int, sublayer: str) -> str:
            nonlocal block_index
            if self.commits_after_attn(layer):
                return f"{sublayer}_{layer}"
            block_index += 1
            return f"block_{block_index}"

        states, commits = self.trace(
            "embedding", lambda layer, sublayer: f"{sublayer}_{layer}", lambda a, _b: a, name_block
        )
        labels: dict[tuple[Optional[int], str], list[str]] = {}
        for sublayer, state in enumerate(states[:-1]):
            labels[(sublayer // 2, SUBLAYER_ROUTERS[sublayer % 2])] = read(state)
        if self.has_final_router:
            labels[(None, "final_res")] = read(states[-1])
        signatures = {
            sublayer: (len(state.blocks), state.current_is_committed)
            for sublayer, state in enumerate(states)
        }

        def output(layer: int, sublayer: str) -> tuple[str, ...]:
            return (f"{layer}_{sublayer}_out",)

        def concat(a: tuple[str, ...], b: tuple[str, ...]) -> tuple[str, ...]:
            return a + b

        embed: tuple[str, ...] = ("embed",)
        parts, _ = self.trace(embed, output, concat, lambda state, _layer, _sublayer: state.current)
        components = {
            sublayer: [list(source) for source in state.sources]
            for sublayer, state in enumerate(parts)
        }
        if not self.has_final_router:  # ln_final reads the current source only
            components[2 * self.n_layers] = [list(parts[-1].current)]

        # what each source holds unchanged: a committed source (its commit hook's value),
        # or None for a sum with sublayer outputs since
        def no_label(*_args: Any) -> Optional[str]:
            return None

        def commit_label(_state: DepthState, layer: int, sublayer: str) -> Optional[str]:
            return commits[(layer, sublayer)]

        first: Optional[str] = "embedding"
        held_states, _ = self.trace(first, no_label, no_label, commit_label)
        held: dict[tuple[Optional[int], str], list[Optional[str]]] = {
            (sublayer // 2, SUBLAYER_ROUTERS[sublayer % 2]): state.sources
            for sublayer, state in enumerate(held_states[:-1])
        }
        if self.has_final_router:
            held[(None, "final_res")] = held_states[-1].sources
        self._walk_cache.update(
            held=held,
            labels=labels,
            signatures=signatures,
            commits=commits,
            components=components,
            stored=self._stored_walk(),
        )
        return self._walk_cache

    def _stored_walk(self) -> dict[int, list[str]]:
        """`trace` with hook names as payloads, each the hook the forward pass last ran it
        through (``hook_resid_pre`` as a layer starts, ``hook_resid_mid`` / ``_post``
        after a write, the commit hook at a block boundary): ``{sublayer: [the hook whose
        output the state holds as each source]}`` (see `source_hooks`)."""
        resid = {"attn": "hook_resid_mid", "mlp": "hook_resid_post"}
        states, _ = self.trace(
            "hook_embed",
            lambda layer, sublayer: f"blocks.{layer}.{resid[sublayer]}",
            lambda _current, written: written,  # current is then what hook_resid_* returned
            lambda _state, layer, sublayer: f"blocks.{layer}.{COMMIT_HOOKS[sublayer]}",
            enter=lambda _current, layer: f"blocks.{layer}.hook_resid_pre",
        )
        return {sublayer: state.sources for sublayer, state in enumerate(states)}

    def source_hooks(self, sublayer: int) -> list[str]:
        """For each source of the depth state entering ``sublayer`` (read points as in
        `components`; the order of the reading router's ``hook_sources``), the hook whose
        cached output is that source as the state stores it, i.e. as every later reader
        sees it: ``hook_embed``, a commit hook, or a ``hook_resid_*``.

        Not always the commit hook (`commit_hook`, through which an edit of a block
        reaches every later reader): in the partial-sum layouts (``kimi``, ``full``) a
        committed block stays ``current`` until the next sublayer writes, so the hook
        that runs on ``current`` in between, ``blocks.{l+1}.hook_resid_pre`` after a block
        committed at layer ``l``'s MLP (``blocks.0.hook_resid_pre`` for the embedding),
        edits the stored block too; and the source read last after a commit is the commit
        hook's output, not ``hook_resid_*``'s. In the ``cumulative`` layout blocks are
        snapshots: the commit hooks (``hook_embed``) hold them."""
        n = 2 * self.n_layers
        if not is_integer(sublayer) or not 0 <= sublayer <= n:
            raise ValueError(f"sublayer must be an integer in [0, {n}], got {sublayer!r}")
        return list(self._walk()["stored"][sublayer])

    def components(self, sublayer: int) -> list[list[str]]:
        """What each source read at ``sublayer`` is a sum of, in TransformerLens's
        ``decompose_resid`` labels (``"embed"``, ``"{l}_attn_out"``, ``"{l}_mlp_out"``).

        ``sublayer`` indexes the read points as in `trace`: ``2 * layer`` is the input
        of layer ``layer``'s attention (its ``attn_res`` router, or ``hook_resid_pre`` in
        layout ``"none"``), ``2 * layer + 1`` its MLP, ``2 * n_layers`` what ``ln_final``
        reads (the final router's sources, or the current source without a final router).
        Example (cumulative, 2 layers, 1 block per layer, the MLP of layer 1):
        ``[["embed"], ["embed", "0_attn_out", "0_mlp_out"], ["embed", "0_attn_out",
        "0_mlp_out", "1_attn_out"]]``.
        """
        n = 2 * self.n_layers
        if not is_integer(sublayer) or not 0 <= sublayer <= n:
            raise ValueError(f"sublayer must be an integer in [0, {n}], got {sublayer!r}")
        return [list(source) for source in self._walk()["components"][sublayer]]

    def reader(self, sublayer: int) -> Optional[RouterSite]:
        """The router that reads at ``sublayer`` (see `components`), or ``None`` where the
        norm reads the current source directly (layout ``"none"``, and the final readout
        of layouts without a final router)."""
        if not self.has_routers:
            return None
        if sublayer == 2 * self.n_layers:
            return self.site(None, "final_res") if self.has_final_router else None
        return self.site(sublayer // 2, SUBLAYER_ROUTERS[sublayer % 2])

    def committed_label(self, layer: int, sublayer: str) -> Optional[str]:
        """The label of the block committed after ``sublayer`` (``"attn"`` / ``"mlp"``) of
        ``layer``, or ``None`` if nothing is committed there."""
        return self._walk()["commits"].get((layer, sublayer))

    def commit_hook(self, layer: int, sublayer: str) -> Optional[str]:
        """The hook through which every later reader sees the block committed after
        ``sublayer`` (``"attn"`` / ``"mlp"``) of ``layer``: ``blocks.{l}.hook_committed_mid``
        or ``blocks.{l}.hook_committed_block``; ``None`` if nothing is committed there."""
        if sublayer not in COMMIT_HOOKS:
            raise ValueError(f"sublayer must be one of {tuple(COMMIT_HOOKS)}, got {sublayer!r}")
        if self.committed_label(layer, sublayer) is None:
            return None
        return f"blocks.{layer}.{COMMIT_HOOKS[sublayer]}"

    def commit_hooks(self) -> dict[str, str]:
        """``{committed source label: the hook that commits it}``, ``"embedding"`` included
        (``hook_embed``)."""
        out = {"embedding": "hook_embed"} if self.has_routers else {}
        for (layer, sublayer), label in self._walk()["commits"].items():
            out[label] = f"blocks.{layer}.{COMMIT_HOOKS[sublayer]}"
        return out

    def held_sources(self, site: SiteLike) -> list[Optional[str]]:
        """For each source a router reads (`labels` order): the committed source
        (``"embedding"`` or a committed block's label, `commit_hooks`) whose value it holds
        unchanged, so that patching that commit hook replaces it; ``None`` for a sum with
        sublayer outputs since. E.g. kimi, the router right after a commit: the committed
        block as its ``"current"`` source; cumulative, layer 0's attention: ``["embedding",
        "embedding"]`` (the stream starts as the embedding)."""
        site = self.check(site)
        return list(self._walk()["held"][(site.layer, site.kind)])

    def commit_readers(self, label: str) -> list[RouterSite]:
        """The routers that read the committed source ``label`` through its commit hook
        (`commit_hooks`), where `held_sources` names it: every router after the commit (in
        the partial-sum layouts the next one as its current source, the later ones as a
        block); every router for ``"embedding"``; none for the cumulative layout's block
        committed after the last layer."""
        return [site for site in self.sites() if label in self.held_sources(site)]

    def state_signature(self, layer: int, sublayer: str = "attn") -> tuple[int, bool]:
        """``(len(blocks), current_is_committed)`` of the state entering ``layer``
        (``0 <= layer <= n_layers``), or with ``sublayer="mlp"`` the state entering its
        MLP sublayer."""
        return self._walk()["signatures"][sublayer_index(layer, sublayer)]

    def labels(self, site: SiteLike) -> list[str]:
        """Names of the sources a router reads, in order (``hook_sources`` axis 2).

        ``"embedding"`` first, ``"current"`` last; in between ``"block_{n}"`` (the n-th
        committed block) or, where every sublayer commits, ``"attn_{l}"`` / ``"mlp_{l}"``.
        A router with a single source (layer-0 attention in the kimi and full layouts)
        reads only ``["embedding"]``.
        """
        site = self.check(site)
        return list(self._walk()["labels"][(site.layer, site.kind)])

    def n_sources(self, site: SiteLike, kind: Optional[str] = None) -> int:
        """How many sources a router reads (``hook_weights``' last axis)."""
        return len(self.labels(self.check(site, kind)))

    def families(self, site: SiteLike) -> dict[str, list[int]]:
        """The seed paper's families as source indices (they partition the sources).

        For sources ``[s_0, ..., s_k]``: ``embedding=[0]``, ``current=[k]`` (k >= 1),
        ``prev_completed=[k-1]`` (k >= 2), ``older=[1, ..., k-2]``. Families that do not
        exist at a router map to ``[]``.
        """
        k = self.n_sources(site) - 1
        return {
            "embedding": [0],
            "older": list(range(1, k - 1)),
            "prev_completed": [k - 1] if k >= 2 else [],
            "current": [k] if k >= 1 else [],
        }

    # ``(layer, router)`` spellings of the same (kept: they are public API)
    def source_labels(self, layer: Optional[int], router: str) -> list[str]:
        """`labels` of ``(layer, router)``."""
        return self.labels(self.site(layer, router))

    def source_families(self, layer: Optional[int], router: str) -> dict[str, list[int]]:
        """`families` of ``(layer, router)``."""
        return self.families(self.site(layer, router))

    def routers(self) -> list[tuple[Optional[int], str]]:
        """Every ``(layer, router)`` in forward order (``(None, "final_res")`` last)."""
        return [(site.layer, site.kind) for site in self.sites()]


def gather_positions(state: DepthState, positions: Tensor) -> DepthState:
    """The state at one position per prompt: every source ``[batch, pos, d_model]`` becomes
    ``[batch, 1, d_model]`` (``positions`` is ``[batch]``); its recorded padding becomes
    that of the gathered positions (``None`` where they are all real tokens)."""
    rows = torch.arange(state.current.shape[0], device=state.current.device)
    positions = positions.to(state.current.device)

    def gather(source: Tensor) -> Tensor:
        return source[rows, positions].unsqueeze(1)

    padding = state.padding
    if isinstance(padding, Tensor):
        padding = padding[rows, positions.to(padding.device)].unsqueeze(1)
        padding = None if bool(padding.all()) else padding
    return DepthState(
        [gather(block) for block in state.blocks],
        gather(state.current),
        state.current_is_committed,
        entering_sublayer=state.entering_sublayer,
        padding=padding,
    )


def router_hook_prefix(layer: Optional[int], router: str) -> str:
    """Deprecated: use ``RouterSite.prefix`` (``model.site(layer, router).prefix``)."""
    import warnings

    warnings.warn(
        "router_hook_prefix is deprecated; use model.site(layer, router).prefix",
        DeprecationWarning,
        stacklevel=2,
    )
    return "final_res" if router == "final_res" else f"blocks.{layer}.{router}"

"""`HookedRootModule` with what TransformerLens leaves to subclasses.

1. Unknown hook names fail with the closest real names instead of a bare ``KeyError``
   (in ``add_hook``, ``hooks``, ``run_with_hooks``, ``run_with_cache(names_filter=...)``
   and ``add_caching_hooks``, which attaches through ``add_hook``).
2. ``run_with_cache(pos_slice=...)`` slices each hook's own position axis
   (``HookPoint.pos_dim``, counted from the end), so 4-d tensors such as
   ``hook_sources [batch, pos, n_sources, d_model]`` are sliced on ``pos``.
   TransformerLens 4.3 guesses the axis from the hook name.
3. ``run_with_cache`` returns a TransformerLens ``ActivationCache`` (the base class
   returns a plain dict), like ``HookedTransformer`` did: an `AttnResActivationCache`,
   whose residual-stream analyses are exact in every layout or refuse.
4. A hook function must return ``None`` or a tensor of its activation's shape: anything
   else raises `HookOutputError` naming the hook and both shapes (for a router hook, the
   two source counts) where TransformerLens would pass it on (hooks added through
   ``add_hook``, ``hooks``, ``run_with_hooks`` and ``run_with_cache``; raw PyTorch hooks
   on a hook point are not checked).
5. Hooks are per model, not per thread (as in TransformerLens). Instead of leaking one
   thread's hooks into another thread's forward pass, a model refuses with
   `ConcurrentUseError`: attaching hooks while another thread runs the model or holds
   hooks, or running it while another thread holds hooks. Plain forward passes of
   several threads without hooks run side by side. Use one model per thread
   (``copy.deepcopy(model)``) to run hooked passes in parallel.

Also: router hooks answer to their ``get_act_name`` aliases (`RouterSite.alias`,
``"blocks.3.hook_attn_res_weights"``), so TransformerLens's ``generic_activation_patch``
can target them; and in routed layouts a hook that edits ``hook_resid_pre/mid/post``
(what TransformerLens's ``get_act_patch_resid_*`` do) triggers one
`RoutedResidualPatchWarning` per model, since those hooks hold only the current source
(not the last layer's ``hook_resid_post`` in a layout without a final router, the
cumulative one: ``ln_final`` reads that stream alone).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, Optional, TypeVar, Union

import torch
from torch import Tensor

from hooked_attnres._tl import (
    HookedRootModule,
    HookPoint,
    Slice,
    get_act_name,
    require_slice_in_range,
    slice_input,
)
from hooked_attnres._tl import remove_batch_dim as drop_batch_dim
from hooked_attnres._validation import require_bool, require_bools, require_choice
from hooked_attnres.model.cache import (
    AttnResActivationCache,
    HookKeyError,
    RunCacheDict,
    served_padding,
)
from hooked_attnres.model.depth import source_axis
from hooked_attnres.model.norms import forward_hooks_attached
from hooked_attnres.model.passes import (
    left_padded_rows,
    pass_input,
    pass_mask,
    pass_n_past,
    require_whole_sequence,
    same_padding,
)

NamesFilter = Union[None, str, Sequence[str], Callable[[str], bool]]


class UnknownHookError(HookKeyError):
    """A hook name that the model does not have: a `HookKeyError` (``KeyError(name)``, as
    TransformerLens's ``mod_dict[name]``) whose message says why (`check_hook_name`)."""


class RoutedResidualPatchWarning(UserWarning):
    """A hook edited ``hook_resid_pre/mid/post`` of a routed model, where those hooks hold
    only the current depth source (see ``docs/hooks.md``)."""


RESID_HOOKS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")


class HookOutputError(ValueError):
    """A hook function returned something other than ``None`` or a tensor of its
    activation's shape."""


class ConcurrentUseError(RuntimeError):
    """Two threads used one model while hooks were attached (see the module docstring)."""


def _describe_shape_change(name: str, expected: tuple, found: tuple) -> str:
    axis = source_axis(name)
    message = (
        f"the hook function on {name} returned shape {found} for an activation of shape "
        f"{expected}; a hook must return None or a tensor of its activation's shape"
    )
    if (
        axis is not None
        and len(found) == len(expected)
        and found[axis] != expected[axis]
        and [d for i, d in enumerate(found) if i != len(found) + axis]
        == [d for i, d in enumerate(expected) if i != len(expected) + axis]
    ):
        message += (
            f" (it has {found[axis]} sources; this router reads {expected[axis]}, see "
            "model.source_labels)"
        )
    return message


def padding_checked(fn: Callable) -> Callable:
    """``fn``, a hook; if it is one of TransformerLens's activation-patching hooks
    (``generic_activation_patch`` and the ``get_act_patch_*`` built on it: a ``partial``
    holding ``clean_activation=clean_cache[name]``) whose clean activation comes from a
    cache that records left padding (`served_padding`), wrapped to raise ``ValueError`` in
    a pass run without that padding: TransformerLens runs ``model(corrupted_tokens)``
    with no ``attention_mask``, so the padding was attended and the rotary positions
    shifted, and every cell was off (0.45 on cells up to 0.57, a 3-layer kimi model; audit
    199). Right padding changes no real token of a causal pass and is not refused; nor is
    a cache that records no padding (one made without the mask: the runs agree)."""
    if not isinstance(fn, partial):
        return fn
    clean = fn.keywords.get("clean_activation")
    if not isinstance(clean, Tensor) or getattr(fn.func, "__module__", "") != (
        "transformer_lens.patching"
    ):
        return fn
    real = served_padding(clean)
    left = left_padded_rows(real)
    if not left:
        return fn

    def checked(tensor, hook):
        if not same_padding(pass_mask(), real):
            raise ValueError(
                f"TransformerLens's activation patching patched {hook.name} from a cache "
                f"whose attention_mask records left padding (prompts {left[:4]}) into a pass "
                "run without that mask (generic_activation_patch and its get_act_patch_* "
                "functions pass none): the padding would be attended as real tokens and "
                "shift the rotary positions, every cell off (docs/analysis.md). Use "
                "hooked_attnres.patching's sweeps, which take the mask: "
                "get_act_patch_routing_weights(_by_pos), "
                "get_act_patch_committed_blocks_by_pos or get_act_patch_depth_state(_by_pos) "
                "with attention_mask=mask; for another hook, patch it in "
                "model.run_with_hooks(corrupted_tokens, attention_mask=mask, fwd_hooks=...)"
            )
        return fn(tensor, hook=hook)

    with contextlib.suppress(AttributeError, TypeError):
        functools.update_wrapper(checked, fn)
    checked._user_hook = user_hook_of(fn)  # type: ignore[attr-defined]
    return checked


def shape_checked(fn: Callable) -> Callable:
    """``fn`` as a hook that raises `HookOutputError` if it changes its activation's shape."""
    if getattr(fn, "_shape_checked", False):
        return fn

    def checked(tensor, hook):
        out = fn(tensor, hook=hook)
        if out is None or not isinstance(tensor, Tensor):
            return out
        if not isinstance(out, Tensor):
            raise HookOutputError(
                f"the hook function on {hook.name} returned a {type(out).__name__}; a hook "
                f"must return None or a tensor of its activation's shape {tuple(tensor.shape)}"
            )
        if out.shape != tensor.shape:
            raise HookOutputError(
                _describe_shape_change(str(hook.name), tuple(tensor.shape), tuple(out.shape))
            )
        if tensor.is_floating_point() and not out.is_floating_point():
            raise HookOutputError(
                f"the hook function on {hook.name} returned dtype {out.dtype} for a "
                f"{tensor.dtype} activation; return a floating-point tensor"
            )
        return out

    with contextlib.suppress(AttributeError, TypeError):
        functools.update_wrapper(checked, fn)
    checked._shape_checked = True  # type: ignore[attr-defined]
    checked._user_hook = user_hook_of(fn)  # type: ignore[attr-defined]
    return checked


def user_hook_of(fn: Callable) -> Callable:
    """The function a caller passed, behind this module's wrappers of it (`shape_checked`,
    the residual-edit watch)."""
    return getattr(fn, "_user_hook", fn)


def restore_user_hooks(points) -> None:
    """Make each handle's ``user_hook`` on ``points`` (hook points) the function the caller
    passed, as TransformerLens's ``LensHandle.user_hook`` (``list_hooks()``) is, rather
    than this module's wrapper of it."""
    for point in points:
        for handles in (point.fwd_hooks, point.bwd_hooks):
            for handle in handles:
                if handle.user_hook is not None:
                    handle.user_hook = user_hook_of(handle.user_hook)


class _UseGuard:
    """Which thread holds hooks on a model and which threads are running it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.hook_owner: Optional[int] = None
        self.running: dict[int, int] = {}

    def _refuse_others(self, action: str) -> None:
        me = threading.get_ident()
        if self.hook_owner not in (None, me):
            raise ConcurrentUseError(
                f"cannot {action}: another thread has hooks attached to this model, which "
                "would apply to this thread's pass too (a model is not thread-safe while "
                "hooked, as in TransformerLens); give each thread its own copy "
                "(copy.deepcopy(model))"
            )
        if action != "run the model" and any(t != me for t in self.running):
            raise ConcurrentUseError(
                f"cannot {action}: another thread is running this model, and the hooks would "
                "apply to its pass too (a model is not thread-safe while hooked, as in "
                "TransformerLens); give each thread its own copy (copy.deepcopy(model))"
            )

    def release_if_unhooked(self, points) -> None:
        """Give up this thread's claim on the model if no hook but permanent ones is
        attached to ``points`` (its hook points, or all of them that may hold one: a call
        that claimed it attached nothing, or the hooks were removed)."""
        if self.hook_owner != threading.get_ident():
            return
        for point in points:
            for handles in (point.fwd_hooks, point.bwd_hooks):
                for handle in handles:
                    if not handle.is_permanent:
                        return
        self.hook_owner = None

    def claim_hooks(self, permanent: bool = False) -> None:
        with self.lock:
            self._refuse_others("attach hooks")
            if not permanent:
                self.hook_owner = threading.get_ident()

    @contextlib.contextmanager
    def running_pass(self) -> Iterator[None]:
        me = threading.get_ident()
        with self.lock:
            self._refuse_others("run the model")
            self.running[me] = self.running.get(me, 0) + 1
        try:
            yield
        finally:
            with self.lock:
                self.running[me] -= 1
                if not self.running[me]:
                    del self.running[me]


_GUARDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_GUARDS_LOCK = threading.Lock()


def use_guard(model) -> _UseGuard:
    with _GUARDS_LOCK:
        guard = _GUARDS.get(model)
        if guard is None:
            guard = _GUARDS[model] = _UseGuard()
        return guard


F = TypeVar("F", bound=Callable[..., Any])


def guarded_pass(method: F) -> F:
    """Decorate a forward-pass method: refuse while another thread holds hooks."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with use_guard(self).running_pass():
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class HookedModule(HookedRootModule):
    """Base class of `HookedAttnRes`; see the module docstring."""

    # --- hook-name validation ---------------------------------------------------------
    def resolve_hook_name(self, name: str) -> str:
        """``name``, or the hook behind a router alias (`RouterSite.alias`)."""
        if name in self.hook_dict:
            return name
        layout = getattr(self, "routing_layout", None)
        real = None if layout is None else layout.resolve_alias(name)
        return name if real is None else real

    def check_hook_name(self, name: str) -> None:
        """Raise `UnknownHookError` of ``name`` if it is unknown: for a router or commit hook
        that this layout lacks, saying what the layout has (`RoutingLayout.absent_hook`),
        else naming the closest hook names."""
        if self.resolve_hook_name(name) in self.hook_dict:
            return
        layout = getattr(self, "routing_layout", None)
        absent = None if layout is None else layout.absent_hook(name)
        if absent is not None:
            raise UnknownHookError(name, f"{name!r} is not a hook of this model: {absent}")
        spelling = None if layout is None else layout.router_hook_spelling(name)
        if spelling is not None:
            raise UnknownHookError(name, f"unknown hook name {name!r}: {spelling}.")
        close = difflib.get_close_matches(name, list(self.hook_dict), n=3, cutoff=0.6)
        hint = f" Did you mean {close}?" if close else ""
        if name in self.mod_dict:
            raise UnknownHookError(
                name,
                f"{name!r} is a module, not a hook point.{hint} All hook names: model.hook_dict.",
            )
        raise UnknownHookError(
            name,
            f"unknown hook name {name!r}.{hint} All {len(self.hook_dict)} hook names are in "
            "model.hook_dict; a name can also be a predicate such as "
            "lambda name: name.endswith('hook_weights').",
        )

    def _check_hook_list(self, hooks: list) -> None:
        for entry in hooks:
            if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
                raise TypeError(f"hooks must be (name_or_predicate, hook_fn) pairs, got {entry!r}")
            name, fn = entry
            if isinstance(name, str):
                self.check_hook_name(name)
            elif not callable(name):
                raise TypeError(f"a hook name must be a string or a predicate, got {name!r}")
            if not callable(fn):
                raise TypeError(f"the hook function for {name!r} is not callable: {fn!r}")

    def add_hook(
        self, name, hook, dir="fwd", is_permanent=False, level=None, prepend=False
    ) -> None:
        if isinstance(name, str):
            self.check_hook_name(name)
            name = self.resolve_hook_name(name)
        if not callable(hook):
            raise TypeError(f"the hook function for {name!r} is not callable: {hook!r}")
        # checked before the model is claimed: a hook point takes one direction
        dir = require_choice("dir", dir, ("fwd", "bwd"))
        guard = use_guard(self)
        guard.claim_hooks(permanent=is_permanent)
        if dir == "fwd":
            hook = self._forward_hook(name, hook)
        try:
            super().add_hook(
                name,
                shape_checked(hook),
                dir=dir,
                is_permanent=is_permanent,
                level=level,
                prepend=prepend,
            )
        finally:
            if isinstance(name, str):
                restore_user_hooks([self.hook_dict[name]])
            else:  # a predicate may have matched no hook point: then nothing holds the model
                restore_user_hooks(self.hook_points())
                guard.release_if_unhooked(self.hook_points())

    def remove_all_hook_fns(self, direction="both", including_permanent=False, level=None) -> None:
        """TransformerLens semantics; hook points without hooks are skipped (a model has
        hundreds, and ``hooks()`` / ``run_with_hooks`` call this after every pass)."""
        direction = require_choice("direction", direction, ("fwd", "bwd", "both"))
        guard = use_guard(self)
        if guard.hook_owner is not None:
            with guard.lock:
                guard._refuse_others("remove hooks")
        hooked = [point for point in self.hook_points() if point.fwd_hooks or point.bwd_hooks]
        for point in hooked:
            point.remove_hooks(direction, including_permanent=including_permanent, level=level)
        guard.release_if_unhooked(hooked)  # the others held no hook before, and hold none

    def clear_contexts(self) -> None:
        for point in self.hook_points():
            if point.ctx:
                point.clear_context()

    @contextlib.contextmanager
    def hooks(self, fwd_hooks=[], bwd_hooks=[], reset_hooks_end=True, clear_contexts=False):
        """Context manager adding temporary hooks (TransformerLens semantics), names checked
        first, hook outputs checked (`HookOutputError`), refused while another thread uses
        the model (`ConcurrentUseError`); router aliases resolved, residual edits watched.
        ``reset_hooks_end`` and ``clear_contexts`` are True or False (`require_bool`, as
        `run_with_cache`'s flags; ``run_with_hooks`` and ``run_with_cache`` pass theirs here):
        ``reset_hooks_end="no"`` removed the hooks it meant to keep."""
        reset_hooks_end = require_bool("reset_hooks_end", reset_hooks_end)
        clear_contexts = require_bool("clear_contexts", clear_contexts)
        fwd_hooks, bwd_hooks = list(fwd_hooks), list(bwd_hooks)
        self._check_hook_list(fwd_hooks)
        self._check_hook_list(bwd_hooks)
        fwd_hooks = [
            (self._resolved(name), self._forward_hook(self._resolved(name), fn))
            for name, fn in fwd_hooks
        ]
        bwd_hooks = [(self._resolved(name), fn) for name, fn in bwd_hooks]
        if fwd_hooks or bwd_hooks:
            use_guard(self).claim_hooks()
        with super().hooks(
            [(name, shape_checked(fn)) for name, fn in fwd_hooks],
            [(name, shape_checked(fn)) for name, fn in bwd_hooks],
            reset_hooks_end,
            clear_contexts,
        ) as model:
            named = [name for name, _ in (*fwd_hooks, *bwd_hooks)]
            if all(isinstance(name, str) for name in named):
                # only the hook points just hooked: this runs around every sweep's pass
                restore_user_hooks(dict.fromkeys(self.hook_dict[name] for name in named))
            else:
                restore_user_hooks(self.hook_points())
                # predicates that matched nothing attached nothing: then nothing holds it
                use_guard(self).release_if_unhooked(self.hook_points())
            yield model

    def _resolved(self, name):
        return self.resolve_hook_name(name) if isinstance(name, str) else name

    def _forward_hook(self, name, fn: Callable) -> Callable:
        """A forward hook ``fn`` at ``name`` as the model attaches it (`add_hook` and
        `hooks` alike): refused in a pass without the left padding of the cache it patches
        from (`padding_checked`) and watched for edits of ``hook_resid_*``
        (`_watch_resid_edits`)."""
        return self._watch_resid_edits(name, padding_checked(fn))

    def _watch_resid_edits(self, name, fn: Callable) -> Callable:
        """``fn``, wrapped to warn once if it edits ``hook_resid_*`` in a routed layout."""
        layout = getattr(self, "routing_layout", None)
        if (
            layout is None
            or not layout.has_routers
            or getattr(fn, "_caches_only", False)
            or getattr(fn, "_state_patch", False)  # a depth-state sweep's own patch
        ):
            return fn
        if isinstance(name, str) and not name.endswith(RESID_HOOKS):
            return fn

        n_layers = layout.n_layers
        # the final stream where no router reads it (the cumulative layout's last
        # hook_resid_post): ln_final reads it alone, so an edit there reaches everything
        whole = None if layout.reader(2 * n_layers) else get_act_name("resid_post", n_layers - 1)

        def watched(activation, hook):
            out = fn(activation, hook=hook)
            edited = str(hook.name)
            if out is not None and edited.endswith(RESID_HOOKS) and edited != whole:
                self._warn_resid_edit(edited)
            return out

        watched._user_hook = user_hook_of(fn)  # type: ignore[attr-defined]
        return watched

    def _warn_resid_edit(self, name: str) -> None:
        if getattr(self, "_resid_edit_warned", False):
            return
        self._resid_edit_warned = True
        layout = getattr(self, "routing_layout", None)
        warnings.warn(
            f"a hook edited {name} in the {getattr(layout, 'layout', '?')!r} layout, where "
            "hook_resid_pre/mid/post hold only the current depth source: the committed blocks "
            "(and the embedding) that later routers read are separate tensors this edit does "
            "not reach, so transformer_lens.patching.get_act_patch_resid_* patch less than "
            "the layer's input. To patch every source that routers at and after a layer "
            "read, use hooked_attnres.patching.get_act_patch_depth_state (or _by_pos). "
            "Warned once per model; silence with warnings.filterwarnings('ignore', "
            "category=hooked_attnres.RoutedResidualPatchWarning).",
            RoutedResidualPatchWarning,
            stacklevel=2,
        )

    def _names_predicate(self, names_filter: NamesFilter) -> Callable[[str], bool]:
        if names_filter is None:
            return lambda name: True
        if isinstance(names_filter, str):
            self.check_hook_name(names_filter)
            real = self.resolve_hook_name(names_filter)
            return lambda name: name == real
        if isinstance(names_filter, (list, tuple, set)):
            for name in names_filter:
                self.check_hook_name(name)
            wanted = {self.resolve_hook_name(name) for name in names_filter}
            return lambda name: name in wanted
        if callable(names_filter):
            return names_filter
        raise ValueError("names_filter must be None, a string, a list of strings, or a function")

    # --- caching ----------------------------------------------------------------------
    def get_caching_hooks(
        self,
        names_filter: NamesFilter = None,
        incl_bwd: bool = False,
        device=None,
        remove_batch_dim: bool = False,
        cache: Optional[dict] = None,
        pos_slice=None,
    ) -> tuple[dict, list, list]:
        """Like TransformerLens's, but ``pos_slice`` (checked by `slice_input`, as the
        cache's methods check theirs) uses each hook's ``pos_dim``, and
        ``remove_batch_dim=True`` refuses (``ValueError``) a batch of more than one prompt
        whatever the input (TransformerLens checks only a token tensor passed first).
        Without a ``cache`` it returns a `RunCacheDict`, which records the extent of the
        pass that last filled it: ``n_past`` (the positions a key-value cache held before
        it, so that a cache of a cached pass is refused as a patching value, as
        ``run_with_cache``'s is), ``attention_mask`` (``None`` without padding) and
        which hooks an earlier pass with another record filled last (``stale``). A
        ``cache`` given as a plain ``dict`` records nothing, and the interventions and
        sweeps refuse it (give a `RunCacheDict` to have it recorded)."""
        incl_bwd, remove_batch_dim = require_bools(
            incl_bwd=incl_bwd, remove_batch_dim=remove_batch_dim
        )
        cache = RunCacheDict() if cache is None else cache
        # checked as the cache's methods check it (`slice_input`): unchecked, an unsigned
        # index array was a mask, [2.5] position 2 and a 0-d bool an added axis, silently
        pos_slice = Slice.unwrap(slice_input(pos_slice, "pos_slice"))
        # what the record keeps of it (`RunCacheDict.pos_slice`): None where it cuts nothing
        recorded_slice = None if pos_slice.mode == "identity" else pos_slice
        wanted = self._names_predicate(names_filter)
        self.is_caching = True
        # every forward hook records the extent of its pass (n_past, mask), as the cache
        # holds the last pass's tensors: caching hooks kept over several passes
        # (add_caching_hooks, a hooks() context around generate) refill it on each
        record = cache if isinstance(cache, RunCacheDict) else None
        keeps_all: dict[tuple[int, Any], bool] = {}  # (n_pos, device): pos_slice keeps all

        def reorders(n_pos: int, device: Any) -> bool:
            """Whether ``pos_slice`` drops or reorders some of ``n_pos`` positions (the
            positions it keeps, in order, are the pass's only if it keeps all of them)."""
            if (n_pos, device) not in keeps_all:
                where = f"this run has {n_pos} tokens"
                n_past = pass_n_past()
                if n_past:  # generate, or a chunk after a prefill: not the sequence's
                    where += (
                        f", after the {n_past} its key-value cache holds: pos_slice counts "
                        "the run's own positions, as the hooks see them"
                    )
                require_slice_in_range(pos_slice, n_pos, "pos_slice", where)
                every = torch.arange(n_pos, device=device)
                kept = pos_slice.apply(every, dim=0)
                keeps_all[n_pos, device] = kept.shape == every.shape and bool((kept == every).all())
            return not keeps_all[n_pos, device]

        def save_hook(tensor: Tensor, hook: HookPoint, is_backward: bool) -> None:
            stored = tensor.detach().to(device)
            if remove_batch_dim:
                if stored.dim() == 0 or stored.shape[0] != 1:
                    # TransformerLens asserts this for a token tensor only: a list of
                    # strings or input=... kept the batch axis of a cache that says it has none
                    raise ValueError(
                        f"remove_batch_dim=True needs a batch of one prompt, but {hook.name} "
                        f"has shape {tuple(stored.shape)}; run one prompt at a time or keep "
                        "the batch axis (remove_batch_dim=False)"
                    )
                stored = drop_batch_dim(stored)
            pos_dim = hook.pos_dim if hook.pos_dim is not None else -2
            sliced = False
            if recorded_slice is not None and stored.dim() >= -pos_dim:
                # a logit_positions pass runs its last layer at one position per prompt:
                # cut there and at the sequence's positions before, every hook would hold
                # as many positions, which are not the same positions, and the residual
                # analyses' check (`require_one_position_axis`) could not tell them
                require_whole_sequence(
                    stored.shape[pos_dim],
                    "a caching hook's pos_slice (run_with_cache / get_caching_hooks(..., "
                    "pos_slice=...))",
                    cached_ok=True,
                    instead="cache without pos_slice (and index the answer positions yourself)",
                )
            if pos_slice is not None and stored.dim() >= -pos_dim:
                sliced = reorders(stored.shape[pos_dim], stored.device)
                stored = pos_slice.apply(stored, dim=pos_dim)
            if record is not None and not is_backward:
                mask = pass_mask()
                mask = None if mask is None else mask.to(device)
                record.note_pass(
                    str(hook.name), pass_n_past(), mask, sliced, recorded_slice, pass_input()
                )
            cache[f"{hook.name}_grad" if is_backward else str(hook.name)] = stored

        fwd_hooks, bwd_hooks = [], []
        forward = partial(save_hook, is_backward=False)
        backward = partial(save_hook, is_backward=True)
        forward._caches_only = True  # type: ignore[attr-defined]  # never edits
        for name in self.hook_dict:
            if wanted(name):
                fwd_hooks.append((name, forward))
                if incl_bwd:
                    bwd_hooks.append((name, backward))
        return cache, fwd_hooks, bwd_hooks

    def add_caching_hooks(
        self,
        names_filter: NamesFilter = None,
        incl_bwd: bool = False,
        device=None,
        remove_batch_dim: bool = False,
        cache: Optional[dict] = None,
    ) -> dict:
        """TransformerLens's ``add_caching_hooks`` (also behind ``cache_all`` /
        ``cache_some``): hooks that store every matching activation (``name + "_grad"`` for
        gradients) in ``cache`` (a new `RunCacheDict` by default, which records the
        ``n_past`` and ``attention_mask`` of the last pass that filled it) on every later
        pass, until ``reset_hooks()``. Made by `get_caching_hooks` and attached with
        `add_hook`, so the names, router aliases, ``remove_batch_dim`` and the thread guard
        are those of ``run_with_cache``. TransformerLens's own version attaches to the hook points
        directly: an alias or a misspelt name cached nothing, ``remove_batch_dim=True``
        kept a batch axis, and another thread's pass ran with the hooks and overwrote the
        cache with its activations."""
        cache, fwd_hooks, bwd_hooks = self.get_caching_hooks(
            names_filter, incl_bwd, device, remove_batch_dim, cache
        )
        for name, fn in fwd_hooks:
            self.add_hook(name, fn, dir="fwd")
        for name, fn in bwd_hooks:
            self.add_hook(name, fn, dir="bwd")
        return cache

    def run_with_cache(
        self,
        *model_args: Any,
        return_cache_object: bool = True,
        remove_batch_dim: bool = False,
        **kwargs: Any,
    ):
        """Run the model and cache activations.

        Accepts every argument of TransformerLens's ``HookedRootModule.run_with_cache``
        (``names_filter``, ``device``, ``incl_bwd``, ``reset_hooks_end``,
        ``clear_contexts``, ``pos_slice``) plus the model's forward arguments.

        Returns:
            ``(model_output, cache)`` where ``cache`` is an `AttnResActivationCache` (a
            TransformerLens ``ActivationCache``; with ``return_cache_object=False`` a
            `RunCacheDict`, a ``dict``). Its ``n_past`` is the number of positions
            the key-value cache held before this pass (0 without one): its position 0
            is the sequence's position ``n_past``. Its ``attention_mask`` is the pass's
            ``[batch, pos]`` mask (bool) where it marks padding, ``None`` otherwise: the
            patching sweeps refuse a clean cache made with another mask than theirs.
            Its ``other_hooks_attached`` says whether a forward hook or pre-hook was
            attached to the model when the pass began (besides the caching hooks it adds;
            such a hook may have edited activations; backward hooks cannot and do not
            count): the residual decompositions of a cache whose ``names_filter`` dropped
            the hooks that check them then refuse.
        """
        # a forward hook on the model before the caching hooks are added (TransformerLens's
        # or a raw PyTorch one, or a global module hook) may edit what the pass caches
        hooked = forward_hooks_attached(self)
        # flags read by truthiness: "no" returned the cache object, dropped the batch axis
        return_cache_object = require_bool("return_cache_object", return_cache_object)
        remove_batch_dim = require_bool("remove_batch_dim", remove_batch_dim)
        if "incl_bwd" in kwargs:
            kwargs["incl_bwd"] = require_bool("incl_bwd", kwargs["incl_bwd"])
        if "pos_slice" in kwargs:  # before TransformerLens' Slice.unwrap reads True as [True]
            kwargs["pos_slice"] = slice_input(kwargs["pos_slice"], "pos_slice")
        if remove_batch_dim and model_args and isinstance(model_args[0], Tensor):
            # TransformerLens asserts a batch of one for a token tensor passed first, from
            # its first axis (an AssertionError, and a [pos] prompt read as pos prompts);
            # passed by name, the caching hooks refuse a batch (ValueError) as for any input
            bound = inspect.signature(self.forward).bind_partial(*model_args).arguments
            twice = [name for name in bound if name in kwargs]
            if twice:  # as Python refuses the call without remove_batch_dim
                raise TypeError(f"forward() got multiple values for argument {twice[0]!r}")
            kwargs.update(bound)
            model_args = ()
        out, cache_dict = super().run_with_cache(
            *model_args, remove_batch_dim=remove_batch_dim, **kwargs
        )
        # made by get_caching_hooks, whose hooks recorded the pass's n_past and mask
        assert isinstance(cache_dict, RunCacheDict)
        cache_dict.other_hooks_attached = hooked
        if not return_cache_object:
            return out, cache_dict
        # the cache object takes the dict's record (n_past, attention_mask)
        return out, AttnResActivationCache(cache_dict, self, has_batch_dim=not remove_batch_dim)

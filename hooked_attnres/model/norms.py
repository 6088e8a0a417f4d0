"""RMSNorm with TransformerLens hooks (``hook_scale``, ``hook_normalized``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional, Union

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from hooked_attnres._precision import stat_dtype
from hooked_attnres._tl import HookPoint
from hooked_attnres.model.passes import padding_of, padding_rows, padding_rows_of


def make_hook(pos_dim: int = -2) -> HookPoint:
    """A `HookPoint` whose position axis (counted from the end) is ``pos_dim``.

    ``run_with_cache(pos_slice=...)`` slices that axis, so layouts such as
    ``[batch, pos, head, d_head]`` (``pos_dim=-3``) are sliced correctly.
    """
    hook = HookPoint()
    hook.pos_dim = pos_dim
    return hook


def toggle_hook(owner: nn.Module, name: str, enabled: bool, pos_dim: int = -2) -> None:
    """Add the `HookPoint` ``owner.<name>`` (``pos_dim`` as in `make_hook`) if ``enabled``,
    keeping an existing one, or remove it. For TransformerLens's optional hooks, which
    exist only while their ``set_use_*`` flag is on; the root model must call ``setup()``
    afterwards to refresh its hook dictionary. A new hook point takes ``owner``'s
    train / eval mode, as if it had existed when ``model.eval()`` was called
    (TransformerLens's patching refuses a model with any submodule in train mode)."""
    if enabled and name not in owner._modules:
        owner.add_module(name, make_hook(pos_dim).train(owner.training))
    elif not enabled and name in owner._modules:
        delattr(owner, name)


def _module_hook_dicts(module: nn.Module) -> tuple[dict, ...]:
    """The raw PyTorch hooks (forward, forward-pre, backward, backward-pre) on ``module``
    itself (TransformerLens's hooks are registered as such hooks too)."""
    return (
        module._forward_hooks,
        module._forward_pre_hooks,
        module._backward_hooks,
        module._backward_pre_hooks,
    )


def _global_hook_dicts() -> tuple[dict, ...]:
    """The hooks registered for every module (``register_module_forward_hook`` and the
    like): they would fire at every `HookPoint` that is called."""
    hooks = torch.nn.modules.module
    return (
        hooks._global_forward_hooks,
        hooks._global_forward_pre_hooks,
        hooks._global_backward_hooks,
        hooks._global_backward_pre_hooks,
    )


# The two predicates below test the same dictionaries as `_module_hook_dicts` /
# `_global_hook_dicts`, spelled out: they run for every module of every pass
# (`modules_if_unhooked`), where building the tuple costs 19 % of the walk.
def has_module_hooks(module: nn.Module) -> bool:
    """Whether a raw PyTorch hook is on ``module`` itself (`_module_hook_dicts`)."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    )


def global_hooks_attached() -> bool:
    """Whether a hook registered for every module exists (`_global_hook_dicts`)."""
    hooks = torch.nn.modules.module
    return bool(
        hooks._global_forward_hooks
        or hooks._global_forward_pre_hooks
        or hooks._global_backward_hooks
        or hooks._global_backward_pre_hooks
    )


def is_observed(hook: HookPoint) -> bool:
    """Whether anything would see or edit what ``hook`` is called with: a forward or
    backward hook or pre-hook on it (TransformerLens or raw PyTorch), or a global module
    hook. A path that skips an unobserved hook point gives the same numbers."""
    if hook.fwd_hooks or hook.bwd_hooks or has_module_hooks(hook):
        return True
    return global_hooks_attached()


def any_hook_attached(model: nn.Module) -> bool:
    """Whether any hook is attached to ``model`` or any of its submodules (hook points or
    not), or a global module hook exists: while none is, nothing but the model's own code
    runs during its forward pass."""
    return modules_if_unhooked(model) is None


def hook_signature(model: nn.Module) -> tuple:
    """What is attached to ``model`` now: for every submodule with hooks, its name and
    the identities of its forward / backward hooks and pre-hooks, plus the global module
    hooks; ``()`` when nothing is attached. Two equal signatures mean the same hook
    functions at the same places (to compare the conditions of two runs)."""

    def identities(dicts: tuple[dict, ...]) -> tuple[int, ...]:
        return tuple(id(hook) for attached in dicts for hook in attached.values())

    found = [("<global>", identities(_global_hook_dicts()))] if global_hooks_attached() else []
    for name, module in model.named_modules():
        if has_module_hooks(module):
            found.append((name, identities(_module_hook_dicts(module))))
    return tuple(found)


def backward_hook_places(model: nn.Module) -> list[str]:
    """Where a backward hook or backward pre-hook is attached to ``model`` (TransformerLens
    ``bwd_hooks`` are such hooks): the names of those submodules, and ``"<global>"`` for a
    global module backward hook; ``[]`` when none is. A backward hook that returns a
    tensor replaces the gradient flowing through its module."""
    found = ["<global>"] if any(_global_hook_dicts()[2:]) else []  # backward, backward-pre
    for name, module in model.named_modules():
        if any(_module_hook_dicts(module)[2:]):
            found.append(name or "<model>")
    return found


def forward_hooks_attached(model: nn.Module) -> bool:
    """Whether a forward hook or forward pre-hook is attached to ``model`` or a submodule
    (TransformerLens ``fwd_hooks`` or raw PyTorch ones), or a global module forward hook
    exists: what may edit what a module reads or returns in a forward pass. Backward
    hooks (`backward_hook_places`) do not count: they see and replace gradients only."""
    if any(_global_hook_dicts()[:2]):  # forward, forward-pre
        return True
    return any(any(_module_hook_dicts(module)[:2]) for module in model.modules())


def modules_if_unhooked(model: nn.Module) -> Optional[list[nn.Module]]:
    """Every module of ``model`` (itself included, each once, in no fixed order), or
    ``None`` as soon as a hook is found: a raw PyTorch or TransformerLens hook on any of
    them, or a global module hook. One walk over the ``_modules`` dictionaries, about 1.7x
    faster than ``model.modules()``, which builds every submodule's name."""
    if global_hooks_attached():
        return None
    found: list[nn.Module] = []
    seen: set[int] = set()
    stack: list[Optional[nn.Module]] = [model]
    while stack:
        module = stack.pop()
        if module is None or id(module) in seen:  # a None submodule, or one met before
            continue
        if has_module_hooks(module):
            return None
        seen.add(id(module))
        found.append(module)
        stack.extend(module._modules.values())
    return found


Eps = Union[float, Tensor]
"""A norm's eps: a number, or `padding_eps`'s per-row answer (kept by a hand-written
backward, whose second derivative runs after the pass, when its padding is not known)."""


def padding_eps(
    eps: Eps, x: Float[Tensor, "batch pos *rest"], real: Optional[Bool[Tensor, "*lead"]] = None
) -> Eps:
    """The eps of a norm of ``x`` over its last axis in the running forward pass: ``eps``,
    except with ``eps == 0`` in a pass whose ``attention_mask`` marks padding among ``x``'s
    leading ``[batch, pos]`` (`real_tokens`): then ``[batch, pos, 1, ...]`` (``x.ndim``
    axes, `stat_dtype`; `padding_rows`, one tensor per pass), 0 at real tokens (``mean +
    0`` is the same bits) and 1 at padding. A padding row can be all zero there (a padding
    query's zero attention output, a zero pad-token embedding), whose ``0 / 0`` made the
    padding position nan, and the backward's ``0 * nan`` every parameter gradient of the
    pass (a padding position reaches no real one, so its numbers are arbitrary; now they
    are finite). An ``eps`` that is a tensor is this function's earlier answer and is
    returned as it is.

    ``real``: for a tensor normalised outside its pass (a cache's, `DepthRouter.mix`,
    `RMSNorm.unhooked`), the padding of the pass that made it, instead of the running
    pass's: a bool ``[*lead]`` mask (`passes.padding_of`, True at real tokens) of the axes
    of ``x`` just before its last (``[batch, pos]`` of ``[..., batch, pos, d]``, ``[pos]``
    of a cache without a batch axis). The answer is then ``[*lead, 1]``, 1 at padding
    (`passes.padding_rows_of`, the same rule); a ``real`` of other axes than ``x``'s is
    ignored (``eps``), as the running pass's padding is for a tensor of other positions."""
    if isinstance(eps, Tensor) or eps != 0:
        return eps
    if real is not None:
        if real.ndim >= x.ndim or tuple(x.shape[x.ndim - 1 - real.ndim : -1]) != real.shape:
            return eps
        return padding_rows_of(real, real.ndim + 1, stat_dtype(x.dtype), x.device)
    if x.ndim < 3:
        return eps
    rows = padding_rows(x.shape[0], x.shape[1], x.ndim, stat_dtype(x.dtype), x.device)
    return eps if rows is None else rows  # None: an unpadded pass, or none


def squared_norm(x: Float[Tensor, "... d"]) -> Float[Tensor, "... 1"]:
    """``sum(x**2)`` over the last axis, in `stat_dtype`: ``vector_norm(x) ** 2`` (one pass
    over ``x``). Where a gradient is needed its derivative is ``2 x`` (`_SquaredNorm`):
    autograd's derivative of `vector_norm` divides by the norm, which is ``0 / 0`` at an
    all-zero row (a padding position, an ablated source) in a second derivative."""
    dtype = stat_dtype(x.dtype)
    if torch.is_grad_enabled() and x.requires_grad:
        return _SquaredNorm.apply(x, dtype)
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=dtype).square()


def squared_norms(xs: Sequence[Float[Tensor, "... d"]]) -> Float[Tensor, "n ..."]:
    """`squared_norm` of each of the ``n`` tensors ``xs`` (one shape), the same bits,
    stacked without the kept axis. Without a gradient, one square of the stacked norms:
    a square (and a squeeze) per tensor made a no-grad router's source scales about 1.5x
    slower at small shapes (5 sources ``[2, 8, 32]``: 25 us against 16 us)."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in xs):
        return torch.stack([squared_norm(x).squeeze(-1) for x in xs])
    dtype = stat_dtype(xs[0].dtype)
    return torch.stack([torch.linalg.vector_norm(x, dim=-1, dtype=dtype) for x in xs]).square()


class _SquaredNorm(torch.autograd.Function):
    """`squared_norm` with the gradient ``2 x g``, in plain operations of the saved input,
    so a second derivative follows it exactly. Written with ``setup_context`` and a
    generated vmap rule, so ``torch.func`` transforms (``grad``, ``vmap``, ``jacrev``)
    accept it, as they accept the `vector_norm` it replaced."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, dtype: torch.dtype) -> Tensor:
        return torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=dtype).square()

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: Tensor) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        return (2 * grad * x).to(x.dtype), None


def zero_row_eps(row_eps: Eps, mean_square: Float[Tensor, "*rows"]) -> Eps:
    """`padding_eps`'s answer kept only at rows whose ``mean_square`` (what the scale adds
    eps to, broadcasting with it) is exactly 0, the rows whose ``0 / 0`` it is for (a sum of
    squares that is not 0 can underflow to 0 when divided by ``d``): a tensor the norm is
    given in a hook of a padded pass, another run's say, is normalised exactly at every
    row whose mean square is not 0, whatever this pass's padding."""
    return row_eps * (mean_square == 0) if isinstance(row_eps, Tensor) else row_eps


def rms_scale(x: Float[Tensor, "... d"], eps: Eps) -> Float[Tensor, "... 1"]:
    """``sqrt(mean(x**2) + eps)`` over the last axis, in `stat_dtype` (one pass over ``x``),
    with `padding_eps` at padding rows whose mean square is 0, all zero or underflowing
    (`zero_row_eps`; the same bits outside a padded pass of an ``eps = 0`` model)."""
    mean_square = squared_norm(x) / x.shape[-1]
    return (mean_square + zero_row_eps(padding_eps(eps, x), mean_square)).sqrt()


def rms_normalize(x: Float[Tensor, "... d"], eps: Eps) -> Float[Tensor, "... d"]:
    """``x / rms_scale(x)`` before any gain: the normalisation of `RMSNorm`, bit for bit,
    without its hooks (statistics in `stat_dtype`, result in ``x``'s dtype)."""
    x_stat = x.to(stat_dtype(x.dtype))  # one conversion in bf16 / fp16, shared by both uses
    return _divide_by_scale(x, x_stat, rms_scale(x_stat, eps)).to(x.dtype)


def _divide_by_scale(
    x: Float[Tensor, "... d"], x_stat: Float[Tensor, "... d"], scale: Float[Tensor, "... 1"]
) -> Float[Tensor, "... d"]:
    """``x_stat * scale.reciprocal()``, where ``x_stat`` is ``x`` in `stat_dtype`: in place
    when ``x_stat`` is a conversion made for this norm alone (bf16 / fp16 input) that no
    gradient needs, the same bits without a fresh ``[..., d]`` float32 tensor (about
    1 % of a bfloat16 pass at the 0.6B shape, `docs/benchmarks.md`)."""
    if x_stat is not x and not x_stat.requires_grad:
        return x_stat.mul_(scale.reciprocal())
    return x_stat * scale.reciprocal()


class RMSNorm(nn.Module):
    """Qwen3 RMSNorm: ``w * x / sqrt(mean(x**2) + eps)``, normalised in float32 (float64
    in a float64 model).

    Hooks (``...`` is ``batch pos`` for the sublayer norms and ``batch pos head`` for
    ``attn.q_norm`` / ``attn.k_norm``):
        hook_scale: ``[..., 1]`` float32, the RMS ``sqrt(mean(x**2) + eps)``.
        hook_normalized: ``[..., length]``, ``x / scale`` before the gain ``w``.

    Args:
        length: size of the normalised (last) axis.
        eps: added to the mean square.
        pos_dim: position axis of the input counted from the end (for ``pos_slice``).
    """

    def __init__(self, length: int, eps: float, pos_dim: int = -2):
        super().__init__()
        self.eps = eps
        self.w = nn.Parameter(torch.ones(length))
        self.hook_scale = make_hook(pos_dim)
        self.hook_normalized = make_hook(pos_dim)

    def forward(self, x: Float[Tensor, "... length"]) -> Float[Tensor, "... length"]:
        if (
            x.dtype == stat_dtype(x.dtype)
            and torch.is_grad_enabled()
            and (x.requires_grad or self.w.requires_grad)
            and not is_observed(self.hook_scale)
            and not is_observed(self.hook_normalized)
        ):
            # a gradient is needed and nothing watches: the same forward operations with a
            # hand-written backward (fewer memory passes than autograd's)
            return _FusedRMSNorm.apply(x, self.w, self.eps)
        return self.normalize(x)[0]

    def normalize(
        self, x: Float[Tensor, "... length"], stat_buffer: Optional[Tensor] = None
    ) -> tuple[Float[Tensor, "... length"], Float[Tensor, "... 1"]]:
        """``(forward(x), scale)`` on the hooked path (the hooks fire), with the RMS
        ``scale`` (``hook_scale``'s tensor): a row of ``x`` that is not finite makes its
        scale inf or nan, so one reduction of ``[..., 1]`` tests the whole input.

        ``stat_buffer``: optional, a tensor shaped like ``x`` in `stat_dtype` that the
        caller gives up (it is overwritten), to hold ``x``'s conversion to that dtype
        instead of a fresh tensor; only for a bf16 / fp16 ``x`` without a gradient."""
        if stat_buffer is not None:
            if not (
                x.dtype != stat_dtype(x.dtype)
                and stat_buffer.dtype == stat_dtype(x.dtype)
                and stat_buffer.shape == x.shape
                and not (x.requires_grad or stat_buffer.requires_grad)
            ):
                raise ValueError(
                    "stat_buffer must be shaped like a bf16 / fp16 input without a "
                    f"gradient and in {stat_dtype(x.dtype)}; got {tuple(stat_buffer.shape)} "
                    f"{stat_buffer.dtype} for an input {tuple(x.shape)} {x.dtype}"
                )
            x_stat = stat_buffer.copy_(x)
        else:
            x_stat = x.to(stat_dtype(x.dtype))  # as in rms_normalize
        scale = self.hook_scale(rms_scale(x_stat, self.eps))
        # decided before the hook runs: a hook that removes itself still holds the tensor
        gain_in_place = not (torch.is_grad_enabled() or is_observed(self.hook_normalized))
        normalized = self.hook_normalized(_divide_by_scale(x, x_stat, scale).to(x.dtype))
        if gain_in_place and self.w.dtype == normalized.dtype:
            return normalized.mul_(self.w), scale  # nothing holds it: the same bits in place
        return normalized * self.w, scale

    def unhooked(
        self,
        x: Float[Tensor, "... length"],
        attention_mask: Optional[Int[Tensor, "*lead"]] = None,
    ) -> Float[Tensor, "... length"]:
        """The same normalisation, bit for bit, without firing the hooks (for the per-head
        copies of split q/k/v inputs, and for tensors of a cache).

        ``attention_mask``: for ``x`` made in another pass (a cache's), that pass's mask
        of the axes before ``x``'s last (``[batch, pos]``, ``cache.real_rows()``: the
        cache's ``attention_mask`` at the positions it holds; 1 / True at real tokens):
        with ``eps = 0`` an all-zero row at its padding is then finite, as in the pass
        (`padding_eps`), where it would be ``0 / 0``; every other row is the same bits."""
        if attention_mask is None:
            return rms_normalize(x, self.eps) * self.w
        return rms_normalize(x, padding_eps(self.eps, x, padding_of(attention_mask))) * self.w


class _FusedRMSNorm(torch.autograd.Function):
    """`RMSNorm` of a float32/float64 input, unobserved, with a hand-written backward.

    With ``n = x / s`` (``s = sqrt(mean(x**2) + eps)``) and ``y = n * w``::

        dL/dw = sum over rows of g * n
        dL/dx = (g * w - n * mean(g * w * n)) / s

    Under ``create_graph=True`` the backward is `differentiable_backward` of
    ``rms_normalize(x) * w`` (the same function), so second derivatives are exact.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, eps: float) -> Tensor:
        # the pass's eps, kept for the second derivative (taken after the pass)
        ctx.eps = padding_eps(eps, x)
        inverse = rms_scale(x, ctx.eps).reciprocal()
        normalized = x * inverse
        # x rather than normalized (the same size; the backward remakes normalized with the
        # same operation, the same bits): a second derivative needs x in the graph
        ctx.save_for_backward(x, inverse, w)
        return normalized * w

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, inverse, w = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            grad_x, grad_w = differentiable_backward(
                lambda x, w: rms_normalize(x, ctx.eps) * w, (x, w), ctx.needs_input_grad[:2], grad
            )
            return grad_x, grad_w, None
        grad_x = grad_w = None
        normalized = x * inverse  # the forward's operation: the same bits
        product = grad * normalized
        if ctx.needs_input_grad[1]:
            grad_w = product.flatten(0, -2).sum(0)
        if ctx.needs_input_grad[0]:
            mean = (product @ w).unsqueeze(-1).div_(-w.shape[0])  # -mean(g * w * n)
            grad_x = grad * w
            grad_x.addcmul_(normalized, mean).mul_(inverse)
        return grad_x, grad_w, None


def differentiable_backward(
    formula: Callable[..., Tensor],
    inputs: Sequence[Optional[Tensor]],
    needs_input_grad: Sequence[bool],
    grad_out: Tensor,
) -> tuple[Optional[Tensor], ...]:
    """The backward of a hand-written `torch.autograd.Function` under
    ``create_graph=True`` (grad mode is on inside its ``backward`` exactly then): the
    gradients of ``formula(*inputs)`` (the same function as its forward, in plain autograd
    operations) with respect to the ``inputs`` whose ``needs_input_grad`` is true (one
    flag per input), ``None`` for the others, as a graph that a second derivative
    follows. The hand-written backward reads tensors that its forward made (scales,
    weights), which are not in the graph, so differentiating it would silently drop every
    path through them; ``inputs`` must be the function's saved inputs, which are."""
    # a fresh view of each input: the gradient with respect to an input itself would also
    # count the paths through another input made from it (a router reading a source and
    # an earlier router's output of it), which the outer backward counts again
    views = [None if x is None else x.view_as(x) for x in inputs]
    wanted = [x for x, need in zip(views, needs_input_grad, strict=True) if need and x is not None]
    assert len(wanted) == sum(needs_input_grad)
    grads = iter(torch.autograd.grad(formula(*views), wanted, grad_out, create_graph=True))
    return tuple(next(grads) if need else None for need in needs_input_grad)


class KeyNorm(nn.Module):
    """The key RMSNorm of a router, applied implicitly (see `DepthRouter`).

    Parameters: ``w`` ``[d_model]``, the gain. Hook: ``hook_scale``
    ``[batch, pos, n_sources, 1]`` float32, the RMS of each source. The normalised keys
    ``sources / scale`` are never materialised; the router folds the gain into its
    query instead.
    """

    def __init__(self, length: int, eps: float):
        super().__init__()
        self.eps = eps
        self.w = nn.Parameter(torch.ones(length))
        self.hook_scale = make_hook(-3)

    def forward(self, x: Float[Tensor, "... length"]) -> Float[Tensor, "... 1"]:
        """The hooked RMS ``sqrt(mean(x**2) + eps)``, float32."""
        return self.hook_scale(rms_scale(x, self.eps))

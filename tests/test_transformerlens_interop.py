"""HookedAttnRes next to TransformerLens 4.x: protocol, cache, patching, hooks API."""

from __future__ import annotations

import threading

import pytest
import torch
import transformer_lens.patching as tl_patching
from helpers import hf_qwen3, randomize_routing, tiny_model
from transformer_lens import ActivationCache
from transformer_lens.model_protocol import TransformerLensModel
from transformer_lens.utilities import get_act_name

from hooked_attnres import (
    ConcurrentUseError,
    DepthState,
    HookedAttnRes,
    QKNormWarning,
    UnknownHookError,
)

REQUIRED_PER_LAYER = [
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_attn_out",
    "hook_mlp_out",
    "ln1.hook_scale",
    "ln1.hook_normalized",
    "ln2.hook_scale",
    "ln2.hook_normalized",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_rot_q",
    "attn.hook_rot_k",
    "attn.hook_attn_scores",
    "attn.hook_pattern",
    "attn.hook_z",
    "mlp.hook_pre",
    "mlp.hook_pre_linear",
    "mlp.hook_post",
]
ROUTER_HOOKS = ["hook_sources", "hook_logits", "hook_weights", "hook_out"]


def test_satisfies_transformerlens_protocol():
    model = tiny_model()
    assert isinstance(model, TransformerLensModel)
    assert model.cfg.n_layers == 4 and model.cfg.device == "cpu"


def test_every_required_hook_exists_and_fires(layout, tokens):
    model = tiny_model(attnres_layout=layout)
    expected = {"hook_embed", "ln_final.hook_scale", "ln_final.hook_normalized"}
    for layer in range(model.cfg.n_layers):
        expected |= {f"blocks.{layer}.{name}" for name in REQUIRED_PER_LAYER}
        if layout != "none":
            expected |= {
                f"blocks.{layer}.{r}.{h}" for r in ("attn_res", "mlp_res") for h in ROUTER_HOOKS
            }
    if layout in ("kimi", "full"):
        expected |= {f"final_res.{h}" for h in ROUTER_HOOKS}
    assert expected <= set(model.hook_dict)
    _, cache = model.run_with_cache(tokens)
    # every hook point fires (no dead names in hook_dict)
    assert set(cache.keys()) == set(model.hook_dict)


def test_hook_shapes(tokens):
    model = tiny_model(attnres_layout="kimi", n_layers=4, attnres_num_blocks=2)
    _, cache = model.run_with_cache(tokens)
    b, p = tokens.shape
    cfg = model.cfg
    assert cache["hook_embed"].shape == (b, p, cfg.d_model)
    assert cache["resid_pre", 1].shape == (b, p, cfg.d_model)
    assert cache["q", 1].shape == (b, p, cfg.n_heads, cfg.d_head)
    assert cache["k", 1].shape == (b, p, cfg.n_key_value_heads, cfg.d_head)
    assert cache["rot_k", 1].shape == (b, p, cfg.n_key_value_heads, cfg.d_head)
    assert cache["z", 1].shape == (b, p, cfg.n_heads, cfg.d_head)
    assert cache["pattern", 1].shape == (b, cfg.n_heads, p, p)
    assert cache["attn_scores", 1].shape == (b, cfg.n_heads, p, p)
    assert cache["blocks.1.attn.q_norm.hook_scale"].shape == (b, p, cfg.n_heads, 1)
    assert cache["pre", 1].shape == cache["pre_linear", 1].shape == (b, p, cfg.d_mlp)
    assert cache["scale", 1, "ln1"].shape == (b, p, 1)
    assert cache["weights", 3, "attn_res"].shape == (b, p, 3)
    assert cache["sources", 3, "attn_res"].shape == (b, p, 3, cfg.d_model)
    assert cache["blocks.3.mlp_res.key_norm.hook_scale"].shape == (b, p, 3, 1)
    assert cache["out", 3, "mlp_res"].shape == (b, p, cfg.d_model)
    assert cache["final_res.hook_weights"].shape == (b, p, 3)
    assert cache["committed_block", 1].shape == (b, p, cfg.d_model)


def test_run_with_cache_returns_activation_cache_and_matches_forward(tokens):
    model = randomize_routing(tiny_model())
    logits, cache = model.run_with_cache(tokens)
    assert isinstance(cache, ActivationCache)
    # the cached run materialises attention patterns; the plain run uses fused attention
    assert torch.allclose(logits, model(tokens), atol=1e-6)
    assert torch.equal(cache["weights", 3, "attn_res"], cache["blocks.3.attn_res.hook_weights"])
    assert get_act_name("weights", 3, "attn_res") == "blocks.3.attn_res.hook_weights"
    _, as_dict = model.run_with_cache(tokens, return_cache_object=False)
    assert isinstance(as_dict, dict) and set(as_dict) == set(cache.keys())


def _pos_axis(name: str, cache) -> int:
    """Position axis written from the documented layouts (not read from the model)."""
    if name.endswith(
        (
            "hook_q",
            "hook_k",
            "hook_v",
            "hook_z",
            "hook_rot_q",
            "hook_rot_k",
            "hook_sources",
            "q_norm.hook_scale",
            "k_norm.hook_scale",
            "q_norm.hook_normalized",
            "k_norm.hook_normalized",
            "key_norm.hook_scale",
        )
    ):
        return 1
    if name.endswith(("hook_pattern", "hook_attn_scores")):
        return 2  # query position
    return 1


@pytest.mark.parametrize("pos_slice", [-1, [0, 2], (1, 4)])
def test_pos_slice_slices_the_position_axis_of_every_hook(pos_slice, tokens):
    model = randomize_routing(tiny_model(attnres_layout="full"))
    _, full = model.run_with_cache(tokens)
    _, sliced = model.run_with_cache(tokens, pos_slice=pos_slice)
    if isinstance(pos_slice, int):
        index = torch.tensor([pos_slice % tokens.shape[1]])
    elif isinstance(pos_slice, tuple):
        index = torch.arange(*pos_slice)
    else:
        index = torch.tensor(pos_slice)
    assert set(sliced.keys()) == set(full.keys())
    for name in full.keys():
        axis = _pos_axis(name, full)
        expected = full[name].index_select(axis, index)
        got = sliced[name]  # TL keeps the position axis for an integer pos_slice
        assert got.shape == expected.shape, name
        assert torch.equal(got, expected), name


def test_remove_batch_dim(tokens):
    model = tiny_model()
    _, cache = model.run_with_cache(tokens[:1], remove_batch_dim=True)
    assert cache["sources", 2, "attn_res"].shape == (9, 3, 32)
    assert cache["pattern", 0].shape == (4, 9, 9)


def test_remove_batch_dim_refuses_a_batch_however_it_is_passed(tokens, word_tokenizer):
    """Audit finding: TransformerLens asserts batch size 1 only for a token tensor passed
    first; a list of strings or ``input=tokens`` gave a cache with ``has_batch_dim=False``
    holding ``[2, pos, ...]`` tensors (TransformerBridge 4.3 refuses both)."""
    model = tiny_model()
    model.set_tokenizer(word_tokenizer)
    for args, kwargs in (((), {"input": tokens}), ((["w1 w2", "w3 w4"],), {})):
        with pytest.raises(ValueError, match=r"remove_batch_dim=True needs a batch of one"):
            model.run_with_cache(*args, remove_batch_dim=True, **kwargs)
        assert not any(point.fwd_hooks for point in model.hook_points())  # hooks removed
    _, cache = model.run_with_cache(input=tokens[:1], remove_batch_dim=True)
    assert cache["resid_post", 1].shape == (9, 32)


def test_remove_batch_dim_refuses_a_token_tensor_first_as_any_input_and_takes_one_pos_prompt(
    tokens,
):
    """Audit finding: a token tensor passed first met TransformerLens's assert instead
    (``AssertionError``, where docs/hooks.md says ``ValueError`` however the input is
    passed), and the assert read the first axis of a ``[pos]`` prompt, which the model
    runs as one prompt, as its batch: ``Cannot remove batch dimension from cache with
    batch size 9``."""
    model = tiny_model()
    with pytest.raises(ValueError, match=r"remove_batch_dim=True needs a batch of one"):
        model.run_with_cache(tokens, remove_batch_dim=True)
    assert not any(point.fwd_hooks for point in model.hook_points())
    _, batched = model.run_with_cache(tokens[:1])
    for prompt in (tokens[0], tokens[:1]):
        _, cache = model.run_with_cache(prompt, remove_batch_dim=True)
        assert torch.equal(cache["resid_post", 1], batched["resid_post", 1][0])


def test_remove_batch_dim_refuses_an_input_given_twice(tokens):
    """Audit finding: with remove_batch_dim=True a token tensor passed first is moved to a
    keyword argument, which silently replaced an ``input=`` given too (the positional
    prompt ran); without remove_batch_dim Python refuses the call. Both refuse it now."""
    model = tiny_model()
    for remove in (False, True):
        with pytest.raises(TypeError, match="multiple values for argument 'input'"):
            model.run_with_cache(tokens[:1], remove_batch_dim=remove, input=tokens[1:2])


def test_add_caching_hooks_caches_what_run_with_cache_does_and_refuses_the_same(tokens):
    """Audit finding: TransformerLens's ``add_caching_hooks`` (behind ``cache_all`` /
    ``cache_some``) attached to the hook points directly: a router alias or a misspelt
    name cached nothing, ``remove_batch_dim=True`` kept the batch axis of a batch of 3,
    and another thread's pass ran with the hooks and overwrote the cache with its own
    activations."""
    model = randomize_routing(tiny_model(attnres_layout="kimi"))
    alias, real = "blocks.1.hook_attn_res_weights", "blocks.1.attn_res.hook_weights"
    _, expected = model.run_with_cache(
        tokens, return_type="loss", incl_bwd=True, names_filter=[real, "hook_embed"]
    )
    cache = model.add_caching_hooks(names_filter=[alias, "hook_embed"], incl_bwd=True)
    model(tokens, return_type="loss").backward()
    model.reset_hooks()
    assert sorted(cache) == sorted([real, "hook_embed", real + "_grad", "hook_embed_grad"])
    for name in cache:
        assert torch.equal(cache[name], expected[name]), name
    with pytest.raises(UnknownHookError, match="Did you mean"):
        model.add_caching_hooks(names_filter=["blocks.1.attn_res.hook_weightz"])
    model.add_caching_hooks(names_filter="hook_embed", remove_batch_dim=True)
    with pytest.raises(ValueError, match="remove_batch_dim=True needs a batch of one"):
        model(tokens)
    model.reset_hooks()
    cache = model.add_caching_hooks(names_filter="hook_embed")
    errors: list = []

    def other_thread() -> None:
        try:
            model(tokens[:1, :4])
        except Exception as error:  # noqa: BLE001 - recorded and asserted below
            errors.append(error)

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    model.reset_hooks()
    assert len(errors) == 1 and isinstance(errors[0], ConcurrentUseError), errors
    assert cache == {}  # the other thread's pass stored nothing


def test_unknown_hook_names_fail_with_suggestions(tokens):
    model = tiny_model()
    with pytest.raises(UnknownHookError, match=r"Did you mean \['blocks.0.attn_res.hook_weights'"):
        model.run_with_hooks(
            tokens, fwd_hooks=[("blocks.0.attn_res.hook_weight", lambda x, hook: x)]
        )
    with pytest.raises(KeyError, match="unknown hook name 'nonsense'"):
        model.add_hook("nonsense", lambda x, hook: x)
    with pytest.raises(UnknownHookError, match="is a module, not a hook point"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn", lambda x, hook: x)])
    with pytest.raises(UnknownHookError, match="blocks.9.hook_resid_pre"):
        model.run_with_cache(
            tokens, names_filter=["blocks.0.hook_resid_pre", "blocks.9.hook_resid_pre"]
        )
    with pytest.raises(TypeError, match="not callable"):
        model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", 3)])
    # nothing was left attached by the failed calls
    assert not any(hp.fwd_hooks for hp in model.hook_points())


def test_predicate_hooks_and_permanent_hooks(tokens):
    model = tiny_model()
    seen = []
    model.run_with_hooks(
        tokens,
        fwd_hooks=[(lambda n: n.endswith("hook_weights"), lambda x, hook: seen.append(hook.name))],
    )
    assert len(seen) == 2 * model.cfg.n_layers
    model.add_perma_hook("hook_embed", lambda x, hook: torch.zeros_like(x))
    zeroed = model(tokens)
    model.reset_hooks()  # keeps permanent hooks
    assert torch.equal(model(tokens), zeroed)
    model.reset_hooks(including_permanent=True)
    assert not torch.equal(model(tokens), zeroed)


def test_hook_contexts_remove_exactly_their_own_hooks(tokens):
    """`hooks()` only visits hook points that hold hooks when it cleans up; the semantics
    stay TransformerLens's: nested contexts, permanent hooks and backward hooks."""
    model = tiny_model()
    model.add_perma_hook("blocks.1.hook_mlp_out", lambda x, hook: x)
    model.add_hook("blocks.0.hook_attn_out", lambda x, hook: x)  # added outside any context
    outer = [("blocks.2.hook_resid_post", lambda x, hook: x)]
    inner = [("hook_embed", lambda x, hook: x), ("blocks.2.hook_resid_post", lambda x, hook: x)]
    with model.hooks(fwd_hooks=outer, bwd_hooks=[("blocks.3.hook_mlp_out", lambda g, hook: None)]):
        with model.hooks(fwd_hooks=inner):
            assert len(model.hook_dict["blocks.2.hook_resid_post"].fwd_hooks) == 2
        assert len(model.hook_dict["blocks.2.hook_resid_post"].fwd_hooks) == 1
        assert not model.hook_dict["hook_embed"].fwd_hooks
        assert model.hook_dict["blocks.3.hook_mlp_out"].bwd_hooks
    held = {name for name, hp in model.hook_dict.items() if hp.fwd_hooks or hp.bwd_hooks}
    assert held == {"blocks.1.hook_mlp_out", "blocks.0.hook_attn_out"}
    model.reset_hooks()
    held = {name for name, hp in model.hook_dict.items() if hp.fwd_hooks or hp.bwd_hooks}
    assert held == {"blocks.1.hook_mlp_out"}
    with pytest.raises(
        ValueError, match=r"^direction must be one of \(.fwd., .bwd., .both.\), got .sideways.$"
    ):
        model.reset_hooks(direction="sideways")


def _other_thread_runs(model, tokens) -> list:
    """What a pass of ``model`` on another thread returns (or the error it raises)."""
    result: list = []

    def run() -> None:
        try:
            result.append(model(tokens))
        except Exception as error:  # noqa: BLE001 - returned and asserted by the caller
            result.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return result


def test_an_add_hook_that_attaches_nothing_leaves_other_threads_free(tokens):
    """Audit 118: ``add_hook(..., dir="both")`` (TransformerLens's ``ValueError``: a hook
    point takes "fwd" or "bwd") and a predicate that matches no hook point attached
    nothing but claimed the model for the thread: another thread's plain pass was then
    refused with ``ConcurrentUseError`` ("another thread has hooks attached") until
    ``reset_hooks()``. As ``hooks()`` with ``reset_hooks_end=False`` and such a predicate."""
    model = tiny_model()
    expected = model(tokens)
    with pytest.raises(ValueError, match=r"dir must be one of \('fwd', 'bwd'\), got 'both'"):
        model.add_hook("hook_embed", lambda x, hook: None, dir="both")
    assert not model.list_hooks()
    (out,) = _other_thread_runs(model, tokens)
    assert isinstance(out, torch.Tensor) and torch.equal(out, expected), out
    model.add_hook(lambda name: False, lambda x, hook: None)
    (out,) = _other_thread_runs(model, tokens)
    assert isinstance(out, torch.Tensor) and torch.equal(out, expected), out
    with model.hooks(fwd_hooks=[(lambda name: False, lambda x, hook: None)], reset_hooks_end=False):
        (out,) = _other_thread_runs(model, tokens)
    assert isinstance(out, torch.Tensor) and torch.equal(out, expected), out
    # a hook that is attached still holds the model, until it is removed
    model.add_hook(lambda name: name == "hook_embed", lambda x, hook: None)
    (out,) = _other_thread_runs(model, tokens)
    assert isinstance(out, ConcurrentUseError)
    model.reset_hooks()
    (out,) = _other_thread_runs(model, tokens)
    assert isinstance(out, torch.Tensor) and torch.equal(out, expected), out


@pytest.mark.parametrize("layout", ["kimi", "none"])
def test_list_hooks_gives_the_hook_functions_passed(layout, tokens):
    """Audit 118: TransformerLens's ``LensHandle.user_hook`` (``list_hooks()``, and each
    hook point's ``fwd_hooks`` / ``bwd_hooks``) is the function passed to ``add_hook``;
    here it was the wrapper that checks the hook's output (`shape_checked`) and, on a
    routed model's ``hook_resid_*``, watches for edits."""
    model = tiny_model(attnres_layout=layout)
    perm, added, back, ctx, ctx_back, pred = (lambda x, hook: None for _ in range(6))
    model.add_perma_hook("blocks.1.hook_resid_pre", perm)
    model.add_hook("hook_embed", added, prepend=True)
    model.add_hook("blocks.0.hook_attn_out", back, dir="bwd")
    with model.hooks(
        fwd_hooks=[("blocks.2.hook_resid_post", ctx), (lambda n: n.endswith("hook_scale"), pred)],
        bwd_hooks=[("blocks.0.hook_mlp_out", ctx_back)],
    ):
        hooks = model.list_hooks()
        assert [h.user_hook for h in hooks["blocks.1.hook_resid_pre"]] == [perm]
        assert [h.user_hook for h in hooks["hook_embed"]] == [added]
        assert [h.user_hook for h in hooks["blocks.0.hook_attn_out"]] == [back]
        assert [h.user_hook for h in hooks["blocks.2.hook_resid_post"]] == [ctx]
        assert [h.user_hook for h in hooks["blocks.0.hook_mlp_out"]] == [ctx_back]
        assert [h.user_hook for h in hooks["ln_final.hook_scale"]] == [pred]
        assert model.hook_dict["hook_embed"].fwd_hooks[0].user_hook is added
        model(tokens)  # the wrappers still run
    model.reset_hooks(including_permanent=True)
    assert not model.list_hooks()


class _CountingList(list):
    """A hook point's (empty) handle list that counts how often it is walked."""

    walks = 0

    def __iter__(self):
        _CountingList.walks += 1
        return super().__iter__()


def test_hooks_and_add_hook_by_name_read_only_the_hook_points_they_hook(tokens):
    """Audit 119: audit 118 set each handle's ``user_hook`` back to the function passed,
    and checked whether the thread still held hooks, by walking every hook point's handle
    lists on each ``hooks()`` entry, ``run_with_hooks``, ``run_with_cache`` and
    ``reset_hooks``: about 35 microseconds per context (2.6 % of a tiny model's pass,
    2.2 % of `ablation_effects`). A named hook reads only its own hook point's list."""
    model = tiny_model()
    hooked = "blocks.1.hook_resid_pre"
    for name, point in model.hook_dict.items():
        if name != hooked:
            point.fwd_hooks, point.bwd_hooks = _CountingList(), _CountingList()
    _CountingList.walks = 0
    f = lambda x, hook: None  # noqa: E731
    with model.hooks(fwd_hooks=[(hooked, f)], bwd_hooks=[(hooked, f)]):
        assert [h.user_hook for h in model.list_hooks()[hooked]] == [f, f]
        _CountingList.walks = 0  # (list_hooks walks them all, as it should)
        model(tokens)
    model.run_with_hooks(tokens, fwd_hooks=[(hooked, f)])
    model.run_with_cache(tokens, names_filter=hooked)
    model.add_hook(hooked, f, dir="bwd")
    model.reset_hooks()
    assert _CountingList.walks == 0
    assert not model.hook_dict[hooked].fwd_hooks and not model.hook_dict[hooked].bwd_hooks


def test_backward_hooks_of_a_reset_run_with_hooks_still_act_on_its_output(tokens):
    """Audit 119: docs/hooks.md said that ``run_with_hooks(bwd_hooks=...)`` with the
    default ``reset_hooks_end=True`` removes the backward hooks so that they never fire.
    They are removed from the model, but PyTorch takes a module's backward hooks when its
    forward runs: a ``backward()`` of that pass's output runs them (here a hook zeroing
    the gradient at ``hook_embed`` zeroes ``W_E``'s); later passes do not have them."""
    model = tiny_model(dtype=torch.float64)
    model(tokens).sum().backward()
    assert model.embed.W_E.grad.abs().sum() > 0  # the gradient the hook takes away
    model.zero_grad()
    fired = []

    def zero(grad, hook):
        fired.append(hook.name)
        return grad * 0

    out = model.run_with_hooks(tokens, bwd_hooks=[("hook_embed", zero)])
    assert not model.list_hooks() and not fired
    out.sum().backward()
    assert fired == ["hook_embed"]
    assert model.embed.W_E.grad.abs().sum() == 0
    model.zero_grad()
    model(tokens).sum().backward()  # a later pass runs without it
    assert fired == ["hook_embed"] and model.embed.W_E.grad.abs().sum() > 0


@pytest.mark.filterwarnings("ignore::hooked_attnres.RoutedResidualPatchWarning")
def test_backward_hooks_and_incl_bwd_give_the_autograd_gradient(layout, tokens):
    """``run_with_cache(incl_bwd=True)`` and ``add_hook(..., dir="bwd")`` give, at every hook
    that reaches the loss, the gradient ``torch.autograd.grad`` finds for a zero added
    there; ``pos_slice`` and ``remove_batch_dim`` slice the gradients as the activations."""
    model = randomize_routing(tiny_model(attnres_layout=layout))
    deltas: dict = {}

    def add_zero(x, hook):
        deltas[hook.name] = torch.zeros_like(x, requires_grad=True)
        return x + deltas[hook.name]

    loss = model.run_with_hooks(tokens, return_type="loss", fwd_hooks=[(lambda n: True, add_zero)])
    names = list(deltas)
    grads = torch.autograd.grad(loss, [deltas[name] for name in names], allow_unused=True)
    expected = {name: grad for name, grad in zip(names, grads, strict=True) if grad is not None}
    assert set(names) == set(model.hook_dict) and len(expected) >= len(names) - 1
    _, cache = model.run_with_cache(tokens, return_type="loss", incl_bwd=True)
    _, sliced = model.run_with_cache(tokens, return_type="loss", incl_bwd=True, pos_slice=[1, 3])
    assert {name[: -len("_grad")] for name in cache.keys() if name.endswith("_grad")} == set(
        expected
    )
    for name, grad in expected.items():
        assert torch.allclose(cache[f"{name}_grad"], grad, atol=1e-7), name
        axis = grad.dim() + (model.hook_dict[name].pos_dim or -2)
        assert torch.equal(
            sliced[f"{name}_grad"], cache[f"{name}_grad"][(slice(None),) * axis + ([1, 3],)]
        )
    name = "blocks.2.attn.hook_pattern"
    loss = model.run_with_hooks(tokens, return_type="loss", fwd_hooks=[(name, add_zero)])
    (alone,) = torch.autograd.grad(loss, [deltas[name]])  # the other hook points unwatched
    seen: list = []
    model.add_hook(name, lambda grad, hook: seen.append(grad), dir="bwd")
    model(tokens, return_type="loss").backward()
    model.reset_hooks()
    assert len(seen) == 1 and torch.equal(seen[0], alone)
    _, one = model.run_with_cache(
        tokens[:1], return_type="loss", incl_bwd=True, remove_batch_dim=True, names_filter=name
    )
    _, batched = model.run_with_cache(
        tokens[:1], return_type="loss", incl_bwd=True, names_filter=name
    )
    assert torch.equal(one[f"{name}_grad"], batched[f"{name}_grad"][0])


def test_start_and_stop_at_layer_split_the_forward_pass(layout, tokens):
    model = randomize_routing(tiny_model(attnres_layout=layout, n_layers=5, attnres_num_blocks=2))
    full = model(tokens)
    for layer in range(model.cfg.n_layers + 1):
        state = model(tokens, stop_at_layer=layer)
        assert isinstance(state, DepthState)
        snapshot = [t.clone() for t in state.sources]
        assert torch.allclose(model(state, start_at_layer=layer), full, atol=1e-6)
        # not mutated
        assert all(torch.equal(a, b) for a, b in zip(snapshot, state.sources, strict=True))
    middle = model(tokens, stop_at_layer=-2)
    assert len(middle.sources) == len(model(tokens, stop_at_layer=3).sources)
    loss = model(
        model(tokens, stop_at_layer=2), start_at_layer=2, tokens=tokens, return_type="loss"
    )
    assert torch.allclose(loss, model(tokens, return_type="loss"))
    if layout != "none":  # in layout "none" every state looks alike (one tensor)
        with pytest.raises(ValueError, match="cannot enter layer 4"):
            model(model(tokens, stop_at_layer=1), start_at_layer=4)


def test_state_for_the_wrong_layer_is_refused(tokens):
    model = tiny_model(attnres_layout="cumulative", n_layers=4, attnres_num_blocks=2)
    state = model(tokens, stop_at_layer=1)
    with pytest.raises(ValueError, match="cannot enter layer 3"):
        model(state, start_at_layer=3)
    with pytest.raises(TypeError, match="needs a DepthState"):
        model(tokens, start_at_layer=2)
    with pytest.raises(TypeError, match="needs start_at_layer"):
        model(state)
    with pytest.raises(ValueError, match="a loss needs the token ids"):
        model(state, start_at_layer=1, return_type="loss")


def _metric(clean_logits, corrupted_logits, answer):
    clean = clean_logits[:, -1, answer].mean()
    corrupt = corrupted_logits[:, -1, answer].mean()

    def metric(logits):
        return (logits[:, -1, answer].mean() - corrupt) / (clean - corrupt)

    return metric


def test_transformerlens_patching_functions_run_with_documented_shapes():
    model = randomize_routing(tiny_model(attnres_layout="cumulative", n_layers=3))
    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 50, (2, 6), generator=generator)
    corrupted = clean.clone()
    corrupted[:, 2] = (corrupted[:, 2] + 7) % 50
    clean_logits, clean_cache = model.run_with_cache(clean)
    metric = _metric(clean_logits, model(corrupted), answer=5)
    n_layers, n_heads, n_pos = 3, model.cfg.n_heads, 6

    resid = tl_patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric)
    assert resid.shape == (n_layers, n_pos)
    assert tl_patching.get_act_patch_attn_out(model, corrupted, clean_cache, metric).shape == (
        n_layers,
        n_pos,
    )
    assert tl_patching.get_act_patch_mlp_out(model, corrupted, clean_cache, metric).shape == (
        n_layers,
        n_pos,
    )
    by_pos = tl_patching.get_act_patch_attn_head_out_by_pos(model, corrupted, clean_cache, metric)
    assert by_pos.shape == (n_layers, n_pos, n_heads)
    all_pos = tl_patching.get_act_patch_attn_head_out_all_pos(model, corrupted, clean_cache, metric)
    assert all_pos.shape == (n_layers, n_heads)
    k_all = tl_patching.get_act_patch_attn_head_k_all_pos(model, corrupted, clean_cache, metric)
    assert k_all.shape == (n_layers, model.cfg.n_key_value_heads)
    assert tl_patching.get_act_patch_block_every(model, corrupted, clean_cache, metric).shape == (
        3,
        n_layers,
        n_pos,
    )
    # positions before the corrupted token see identical inputs: no effect there
    assert torch.allclose(resid[:, :2], torch.zeros(n_layers, 2), atol=1e-6)

    # one cell, recomputed by hand with run_with_hooks
    def patch(act, hook):
        act[:, 4] = clean_cache["resid_pre", 1][:, 4]
        return act

    by_hand = metric(
        model.run_with_hooks(corrupted, fwd_hooks=[("blocks.1.hook_resid_pre", patch)])
    )
    assert torch.allclose(resid[1, 4], by_hand, atol=1e-6)


def test_patching_refuses_training_mode():
    model = tiny_model()
    tokens = torch.randint(0, 50, (2, 4))
    _, cache = model.run_with_cache(tokens)
    model.train()
    with pytest.raises(ValueError, match="evaluation mode"):
        tl_patching.get_act_patch_resid_pre(model, tokens, cache, lambda logits: logits.sum())


def test_activation_cache_helpers_on_plain_residual_model():
    hf = hf_qwen3()
    model = HookedAttnRes.from_hf_qwen3(hf, wrap="none")
    tokens = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(2))
    logits, cache = model.run_with_cache(tokens)
    components = cache.decompose_resid(return_labels=False)
    assert torch.allclose(components.sum(0), cache["resid_post", -1], atol=1e-5)
    accumulated = cache.accumulated_resid(apply_ln=True)
    assert accumulated.shape == (model.cfg.n_layers + 1, 2, 6, model.cfg.d_model)
    assert cache.stack_activation("pattern").shape == (
        model.cfg.n_layers,
        2,
        model.cfg.n_heads,
        6,
        6,
    )
    # direct logit attribution: the components' attributions sum to the answer logit
    # (tokens_to_residual_directions folds the ln_final gain, as TL's fold_ln does)
    answer = tokens[:, -1]
    attrs = cache.logit_attrs(cache.decompose_resid(pos_slice=-1), tokens=answer, pos_slice=-1)
    assert attrs.shape == (2 * model.cfg.n_layers + 1, 2)
    expected = logits[torch.arange(2), -1, answer]
    assert torch.allclose(attrs.sum(0), expected, atol=1e-4)


@pytest.mark.filterwarnings("ignore::hooked_attnres.QKNormWarning")
def test_weights_have_transformerlens_layouts_and_meaning(tokens):
    model = tiny_model(attnres_layout="none")
    cfg = model.cfg
    L, h, kv, d, dh, m = (
        cfg.n_layers,
        cfg.n_heads,
        cfg.n_key_value_heads,
        cfg.d_model,
        cfg.d_head,
        cfg.d_mlp,
    )
    assert model.W_E.shape == (cfg.d_vocab, d) and model.W_U.shape == (d, cfg.d_vocab)
    assert model.W_Q.shape == (L, h, d, dh) and model.W_O.shape == (L, h, dh, d)
    assert model.W_K.shape == model.W_V.shape == (L, h, d, dh)  # GQA repeated to n_heads
    assert model.blocks[0].attn._W_K.shape == (kv, d, dh)  # the stored KV heads
    assert model.W_in.shape == model.W_gate.shape == (L, d, m) and model.W_out.shape == (L, m, d)
    assert model.b_U.shape == (cfg.d_vocab,) and not model.b_U.any()
    assert model.QK.shape == (L, h, d, d) and model.OV.shape == (L, h, d, d)
    _, cache = model.run_with_cache(tokens)
    x = cache["normalized", 1, "ln1"] * model.blocks[1].ln1.w
    assert torch.allclose(cache["q", 1], torch.einsum("bpd,hdk->bphk", x, model.W_Q[1]), atol=1e-6)
    assert torch.allclose(
        cache["k", 1], torch.einsum("bpd,hdk->bphk", x, model.blocks[1].attn._W_K), atol=1e-6
    )
    expanded = model.W_K[1]
    assert torch.equal(expanded[0], expanded[1]) and not torch.equal(expanded[0], expanded[2])
    z_out = torch.einsum("bphk,hkd->bpd", cache["z", 1], model.W_O[1])
    assert torch.allclose(cache["attn_out", 1], z_out, atol=1e-6)
    mlp_in = cache["normalized", 1, "ln2"] * model.blocks[1].ln2.w
    assert torch.allclose(cache["pre", 1], mlp_in @ model.W_gate[1], atol=1e-6)
    assert torch.allclose(cache["pre_linear", 1], mlp_in @ model.W_in[1], atol=1e-6)
    assert torch.allclose(cache["mlp_out", 1], cache["post", 1] @ model.W_out[1], atol=1e-6)
    tied = tiny_model(tie_word_embeddings=True)
    assert torch.equal(tied.W_U, tied.W_E.T) and "unembed.W_U" not in tied.state_dict()
    with torch.no_grad():
        tied.ln_final.w.mul_(2.0)
    directions = tied.tokens_to_residual_directions(torch.tensor([[3, 4]]))
    assert directions.shape == (1, 2, d) and torch.allclose(directions[0, 1], 2 * tied.W_E[4])


def _bridge(hf):
    # imported here: the Bridge's modules take seconds to import
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    return build_bridge_from_module(hf, "Qwen3ForCausalLM", hf_config=hf.config, tokenizer=None)


def test_qk_warns_once_that_it_is_not_the_scores_bilinear_form():
    """``model.QK`` is TransformerLens's ``W_Q @ W_K^T``; Qwen3 normalises each head's query
    and key (with gains) before the rotary embedding, so it warns once per model. The
    warning's formula is checked against the scores the model computes: at a query's own
    position (the rotation cancels) the score is ``x W_Q diag(g_q * g_k) W_K^T x /
    (rms(x W_Q) rms(x W_K) sqrt(d_head))``, float64 (its rotary tables are float32)."""
    model = HookedAttnRes.from_hf_qwen3(hf_qwen3(), wrap="none", dtype=torch.float64)
    with pytest.warns(QKNormWarning, match=r"diag\(q_norm.w \* k_norm.w\)"):
        assert model.QK.AB.shape[0] == model.cfg.n_layers
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qk = model.QK  # once per model
    tokens = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(0))
    layer = 1
    attn = model.blocks[layer].attn
    with torch.no_grad():
        attn.q_norm.w.uniform_(0.5, 1.5)  # gains that matter
        attn.k_norm.w.uniform_(0.5, 1.5)
    _, cache = model.run_with_cache(tokens)
    x = cache[f"blocks.{layer}.ln1.hook_normalized"] * model.blocks[layer].ln1.w
    q = torch.einsum("bpd,hdk->bphk", x, model.W_Q[layer])
    k = torch.einsum("bpd,hdk->bphk", x, model.W_K[layer])
    rms_q = (q.pow(2).mean(-1) + attn.q_norm.eps).sqrt()
    rms_k = (k.pow(2).mean(-1) + attn.k_norm.eps).sqrt()
    bilinear = model.W_Q[layer] * (attn.q_norm.w * attn.k_norm.w) @ model.W_K[layer].mT
    own = torch.einsum("bpd,hde,bpe->bhp", x, bilinear, x) / (
        rms_q * rms_k * attn.d_head**0.5
    ).transpose(1, 2)
    scores = cache[f"blocks.{layer}.attn.hook_attn_scores"].diagonal(dim1=-2, dim2=-1)
    # to the rotary tables' float32 rounding (cos**2 + sin**2 is 1 to about 1e-7)
    torch.testing.assert_close(own, scores, atol=1e-6, rtol=0)
    plain = torch.einsum("bpd,hde,bpe->bhp", x, qk.AB[layer], x) / (
        rms_q * rms_k * attn.d_head**0.5
    ).transpose(1, 2)
    assert float((plain - scores).abs().max()) > 1e-2  # QK itself misses the gains


@pytest.mark.filterwarnings("ignore::hooked_attnres.QKNormWarning")
def test_weight_accessors_and_processing_match_transformer_bridge():
    """Layout ``none`` against TransformerLens 4.3's ``TransformerBridge`` on the same tiny
    Qwen3 (GQA: 4 query heads, 2 key-value heads; norm gains away from 1). The Bridge's
    model-level and per-block ``W_K`` / ``W_V`` hold the ``n_kv`` heads; here they are
    repeated to ``n_heads`` (``repeat_interleave``: query head ``h`` reads key-value head
    ``h // 2``), which is what the Bridge's ``QK``, ``OV`` and ``tl_parameters`` use, and
    ``attn._W_K`` / ``_W_V`` are the Bridge's per-block tensors. ``process_weights`` with
    TransformerLens's defaults gives the Bridge's processed weights bit for bit."""
    bridge = _bridge(hf_qwen3())
    model = HookedAttnRes.from_hf_qwen3(hf_qwen3(), wrap="none")
    cfg = model.cfg
    group = cfg.n_heads // cfg.n_key_value_heads
    tokens = torch.randint(0, cfg.d_vocab, (2, 5), generator=torch.Generator().manual_seed(0))

    def check_weights():
        for name in ("W_E", "W_U", "W_Q", "W_O", "W_in", "W_gate", "W_out"):
            assert torch.equal(getattr(model, name), getattr(bridge, name)), name
        for name in ("W_K", "W_V"):
            grouped = getattr(bridge, name)  # [n_layers, n_kv, d_model, d_head]
            assert grouped.shape[1] == cfg.n_key_value_heads
            assert torch.equal(getattr(model, name), grouped.repeat_interleave(group, dim=1))
            for layer, block in enumerate(model.blocks):
                assert torch.equal(getattr(block.attn, f"_{name}"), grouped[layer])
        for name in ("QK", "OV"):
            assert torch.equal(getattr(model, name).AB, getattr(bridge, name).AB), name
        with torch.no_grad():
            assert torch.allclose(model(tokens), bridge(tokens), atol=1e-5)

    check_weights()
    assert list(model.all_head_labels) == bridge.all_head_labels
    for layer in range(cfg.n_layers):
        assert torch.equal(model.accumulated_bias(layer), bridge.accumulated_bias(layer))
    params = bridge.tl_parameters()
    assert torch.equal(model.tl_parameters()["blocks.1.attn.W_K"], params["blocks.1.attn.W_K"])
    # the ln_final gain is folded into the direction here; the Bridge needs process_weights
    ours = model.tokens_to_residual_directions(torch.tensor([3, 4]))
    folded = _bridge(hf_qwen3())
    folded.process_weights(center_unembed=False)
    assert torch.allclose(ours, folded.tokens_to_residual_directions(torch.tensor([3, 4])))

    bridge.process_weights()  # TransformerLens's defaults: fold_ln, centring
    model.process_weights(center_unembed=True)  # off by default here
    check_weights()

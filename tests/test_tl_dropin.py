"""TransformerLens drop-in: every TL analysis is exact or refuses, in every layout.

Each model case (the four layouts, and the three ``from_hf_qwen3`` wraps of a random Hugging
Face Qwen3) runs TransformerLens's own functions and compares them with an independent
computation (cells recomputed by a plain ``run_with_hooks``, decompositions summed and read
out through the model's own logits, logit differences from the logits) or asserts the
documented refusal.
"""

from __future__ import annotations

import itertools
import pickle
import re
import warnings

import pytest
import torch
import transformer_lens.patching as tlp
from helpers import hf_qwen3, randomize_routing, tiny_model
from reference_attnres import model_router_params, reference_route
from transformer_lens import ActivationCache
from transformer_lens.tools.analysis import attribution_patch, direct_logit_attribution
from transformer_lens.tools.analysis.logit_lens import logit_lens as tl_logit_lens
from transformer_lens.utilities import Slice, get_act_name

from hooked_attnres import (
    AttnResActivationCache,
    DepthState,
    HookedAttnRes,
    HookKeyError,
    RoutedResidualPatchWarning,
    UnfoldedNormWarning,
    UnknownCacheKeyError,
)
from hooked_attnres.analysis import routing_lens
from hooked_attnres.patching import (
    get_act_patch_depth_state,
    get_act_patch_depth_state_by_pos,
    get_act_patch_routing_weights_by_pos,
    router_patch_index,
)

CASES = ("none", "cumulative", "kimi", "full", "wrap_recency", "wrap_exact", "wrap_none")
ANSWER, WRONG = 3, 7
ATOL = 1e-4


def _perturb_gains(model: HookedAttnRes, seed: int) -> HookedAttnRes:
    """Norm gains away from 1, so that unfolded gains would show up in every check."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("ln1.w") or name.endswith("ln2.w") or name.endswith("ln_final.w"):
                param.mul_(1 + 0.4 * torch.randn(param.shape, generator=generator))
    return model


def build(case: str) -> HookedAttnRes:
    if case.startswith("wrap_"):
        # perturbed norm gains; the exact wrap's uniform routing is kept (its queries are 0)
        return HookedAttnRes.from_hf_qwen3(hf_qwen3(seed=1), wrap=case.removeprefix("wrap_"))
    model = tiny_model(attnres_layout=case, n_layers=3, attnres_num_blocks=2)
    if case != "none":
        randomize_routing(model, seed=2)
    return _perturb_gains(model, seed=3)


class Case:
    def __init__(self, name: str):
        self.name = name
        self.model = build(name)
        vocab = self.model.cfg.d_vocab
        generator = torch.Generator().manual_seed(4)
        self.clean = torch.randint(10, vocab, (2, 4), generator=generator)
        self.corrupted = self.clean.clone()
        self.corrupted[:, 1] = (self.corrupted[:, 1] + 5) % vocab
        self.logits, self.cache = self.model.run_with_cache(self.clean)
        self.corrupted_logits = self.model(self.corrupted)
        self.clean_diff = self.logit_diff(self.logits)
        self.corrupted_diff = self.logit_diff(self.corrupted_logits)
        self.layout = self.model.cfg.attnres_layout

    @staticmethod
    def logit_diff(logits: torch.Tensor) -> torch.Tensor:
        return (logits[:, -1, ANSWER] - logits[:, -1, WRONG]).mean()

    def metric(self, logits: torch.Tensor) -> torch.Tensor:
        """Normalised: 0 on the corrupted run, 1 on the clean run."""
        return (self.logit_diff(logits) - self.corrupted_diff) / (
            self.clean_diff - self.corrupted_diff
        )

    def by_hand(self, name: str, index) -> torch.Tensor:
        """The metric with ``clean[index]`` written into ``name``, by a plain run_with_hooks."""
        clean = self.cache[name]

        def patch(activation, hook):
            activation = activation.clone()
            activation[index] = clean[index]
            return activation

        return self.metric(self.model.run_with_hooks(self.corrupted, fwd_hooks=[(name, patch)]))

    @property
    def routed_final(self) -> bool:
        return self.model.routing_layout.has_final_router


_CASES: dict[str, Case] = {}


@pytest.fixture(params=CASES)
def case(request) -> Case:
    if request.param not in _CASES:
        _CASES[request.param] = Case(request.param)
    return _CASES[request.param]


def test_the_cache_is_a_transformerlens_activation_cache(case):
    assert isinstance(case.cache, ActivationCache)
    assert isinstance(case.cache, AttnResActivationCache)
    assert case.layout == {"wrap_recency": "cumulative", "wrap_exact": "kimi"}.get(
        case.name, case.name.removeprefix("wrap_")
    )


# --- TransformerLens's patching functions ------------------------------------------------
POS_FUNCTIONS = {  # function: (activation, index of cell (layer, pos) in the hook)
    "get_act_patch_resid_pre": "resid_pre",
    "get_act_patch_resid_mid": "resid_mid",
    "get_act_patch_attn_out": "attn_out",
    "get_act_patch_mlp_out": "mlp_out",
}
HEAD_FUNCTIONS = {  # (layer, head) cells, all positions
    "get_act_patch_attn_head_out_all_pos": "z",
    "get_act_patch_attn_head_q_all_pos": "q",
    "get_act_patch_attn_head_k_all_pos": "k",
    "get_act_patch_attn_head_v_all_pos": "v",
}
HEAD_POS_FUNCTIONS = {  # (layer, pos, head) cells
    "get_act_patch_attn_head_out_by_pos": "z",
    "get_act_patch_attn_head_q_by_pos": "q",
    "get_act_patch_attn_head_k_by_pos": "k",
    "get_act_patch_attn_head_v_by_pos": "v",
}


def _run_tl(case: Case, name: str) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RoutedResidualPatchWarning)
        return getattr(tlp, name)(case.model, case.corrupted, case.cache, case.metric)


def test_transformerlens_patching_family_matches_run_with_hooks(case):
    model = case.model
    n_layers, n_pos = model.cfg.n_layers, case.clean.shape[1]
    cells = [(0, 1), (n_layers - 1, n_pos - 1), (1, 2)]
    for function, activation in POS_FUNCTIONS.items():
        result = _run_tl(case, function)
        assert result.shape == (n_layers, n_pos)
        for layer, pos in cells:
            expected = case.by_hand(get_act_name(activation, layer), (slice(None), pos))
            assert torch.allclose(result[layer, pos], expected, atol=ATOL), (function, layer, pos)
        # positions before the corrupted token see identical inputs
        assert torch.allclose(result[:, 0], torch.zeros(n_layers), atol=ATOL)
    for function, activation in HEAD_FUNCTIONS.items():
        result = _run_tl(case, function)
        n_heads = model.cfg.n_key_value_heads if activation in "kv" else model.cfg.n_heads
        assert result.shape == (n_layers, n_heads)
        for layer, head in [(0, 1), (n_layers - 1, n_heads - 1)]:
            expected = case.by_hand(
                get_act_name(activation, layer), (slice(None), slice(None), head)
            )
            assert torch.allclose(result[layer, head], expected, atol=ATOL), function
    pattern = _run_tl(case, "get_act_patch_attn_head_pattern_all_pos")
    expected = case.by_hand(get_act_name("pattern", 1), (slice(None), 2))
    assert torch.allclose(pattern[1, 2], expected, atol=ATOL)
    block = _run_tl(case, "get_act_patch_block_every")
    assert block.shape == (3, n_layers, n_pos)
    assert torch.allclose(block[0], _run_tl(case, "get_act_patch_resid_pre"), atol=ATOL)


@pytest.mark.parametrize("name", ["wrap_exact", "full"])
def test_transformerlens_by_pos_head_patching_matches_run_with_hooks(name):
    case = _CASES.setdefault(name, Case(name))
    for function, activation in HEAD_POS_FUNCTIONS.items():
        result = _run_tl(case, function)
        layer, pos = case.model.cfg.n_layers - 1, 2
        expected = case.by_hand(get_act_name(activation, layer), (slice(None), pos, 1))
        assert torch.allclose(result[layer, pos, 1], expected, atol=ATOL), function
    by_pos = _run_tl(case, "get_act_patch_attn_head_pattern_by_pos")  # [layer, head, dest]
    expected = case.by_hand(get_act_name("pattern", 0), (slice(None), 1, 3))
    assert torch.allclose(by_pos[0, 1, 3], expected, atol=ATOL)


def test_the_every_stacks_pad_key_value_heads_with_zeros():
    """TransformerLens's documented convention with grouped-query attention (docs/hooks.md):
    the k / v rows of ``get_act_patch_attn_head_all_pos_every`` hold the key-value heads
    in their first columns and zeros after them, not one cell per query head."""
    case = _CASES.setdefault("kimi", Case("kimi"))
    n_kv = case.model.cfg.n_key_value_heads
    assert n_kv < case.model.cfg.n_heads
    every = _run_tl(case, "get_act_patch_attn_head_all_pos_every")
    for row, name in (
        (2, "get_act_patch_attn_head_k_all_pos"),
        (3, "get_act_patch_attn_head_v_all_pos"),
    ):
        assert torch.equal(every[row, :, :n_kv], _run_tl(case, name))
        assert not every[row, :, n_kv:].any()


@pytest.mark.parametrize("layout", ["kimi", "cumulative"])
def test_transformerlens_patching_is_the_run_with_hooks_patch_bit_for_bit_in_float64(layout):
    """Every cell of TransformerLens's (layer, pos) and all-position head sweeps equals the
    plain run_with_hooks patch of a float64 model exactly, once rounded to float32 (TL's
    result tensors are float32 whatever the model's dtype; docs/hooks.md)."""
    model = randomize_routing(
        tiny_model(attnres_layout=layout, n_layers=3, attnres_num_blocks=2, dtype=torch.float64),
        seed=2,
    )
    generator = torch.Generator().manual_seed(4)
    clean = torch.randint(10, model.cfg.d_vocab, (2, 4), generator=generator)
    corrupted = clean.clone()
    corrupted[:, 1] = (corrupted[:, 1] + 5) % model.cfg.d_vocab
    _, cache = model.run_with_cache(clean)

    def metric(logits):
        return (logits[:, -1, ANSWER] - logits[:, -1, WRONG]).mean()

    functions = {**POS_FUNCTIONS, **HEAD_FUNCTIONS}
    for function, activation in functions.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RoutedResidualPatchWarning)
            result = getattr(tlp, function)(model, corrupted, cache, metric)
        assert result.dtype == torch.float32
        expected = torch.empty_like(result)
        for layer, cell in itertools.product(*map(range, result.shape)):
            index = (
                (slice(None), cell)
                if activation in POS_FUNCTIONS.values()
                else (slice(None), slice(None), cell)
            )
            name = get_act_name(activation, layer)

            def patch(x, hook, index=index, name=name):
                x = x.clone()
                x[index] = cache[name][index]
                return x

            expected[layer, cell] = metric(
                model.run_with_hooks(corrupted, fwd_hooks=[(name, patch)])
            )
        assert torch.equal(result, expected), (function, (result - expected).abs().max())
        assert expected.abs().max() > 1e-3


def test_residual_patching_warns_once_in_routed_layouts_only(case):
    model = case.model
    model._resid_edit_warned = False  # a fresh model would not have warned yet
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tlp.get_act_patch_resid_pre(model, case.corrupted, case.cache, case.metric)
        tlp.get_act_patch_resid_mid(model, case.corrupted, case.cache, case.metric)
    ours = [w for w in caught if issubclass(w.category, RoutedResidualPatchWarning)]
    if case.layout == "none":
        assert not ours
        return
    assert len(ours) == 1
    message = str(ours[0].message)
    assert "get_act_patch_depth_state" in message and repr(case.layout) in message
    assert "filterwarnings" in message
    # caching, reading hooks and other hooks never warn
    model._resid_edit_warned = False
    with warnings.catch_warnings():
        warnings.simplefilter("error", RoutedResidualPatchWarning)
        model.run_with_cache(case.clean)
        model.run_with_hooks(
            case.clean, fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: None)]
        )
        tlp.get_act_patch_attn_out(model, case.corrupted, case.cache, case.metric)


def test_generic_activation_patch_targets_router_hooks(case):
    model = case.model
    if case.layout == "none":
        with pytest.raises(ValueError, match="no routers"):
            router_patch_index(model, "attn_res", "weights")
        return
    reference = get_act_patch_routing_weights_by_pos(model, case.corrupted, case.cache, case.metric)
    for row, router in enumerate(("attn_res", "mlp_res")):
        result = tlp.generic_activation_patch(
            model,
            case.corrupted,
            case.cache,
            case.metric,
            tlp.layer_pos_patch_setter,
            **router_patch_index(model, router, "weights"),
        )
        assert torch.allclose(result, reference[row], atol=ATOL), router
    # a source axis: one row per (layer, source) that exists
    index = router_patch_index(model, "mlp_res", "sources", ("layer", "source"))
    frame = index["index_df"]
    assert len(frame) == sum(model.routing_layout.n_sources(s) for s in model.sites("mlp_res"))

    def source_setter(corrupted, idx, clean):
        corrupted[..., idx[1], :] = clean[..., idx[1], :]
        return corrupted

    values = tlp.generic_activation_patch(
        model, case.corrupted, case.cache, case.metric, source_setter, **index
    )
    layer, source = (int(v) for v in frame.iloc[-1])
    expected = case.by_hand(
        model.site(layer, "mlp_res").hook("sources"), (..., source, slice(None))
    )
    assert torch.allclose(values[-1], expected, atol=ATOL)
    # the aliases read the same tensors
    assert torch.equal(
        case.cache["attn_res_weights", 1], case.cache[model.site(1, "attn_res").hook("weights")]
    )


OPTIONAL_HOOK_PATCHES = {  # set_use_* method: (activation, cells (layer, pos[, head]))
    "set_use_attn_result": ("result", [(0, 1, 0), (1, 2, 3), (2, 3, 1)]),
    "set_use_hook_mlp_in": ("mlp_in", [(0, 1), (1, 2), (2, 3)]),
    "set_use_split_qkv_input": ("q_input", [(0, 1, 2), (2, 3, 0)]),
}


def test_patching_optional_hooks_switched_on_after_eval_matches_run_with_hooks(case):
    """A hook point made by ``set_use_*`` after ``model.eval()`` was in train mode, so
    TransformerLens's patching refused the eval-mode model ("found training mode at
    blocks.0.attn.hook_result ... Call model.eval()"). Now it takes the model's mode, and
    patching a head's result, the MLP input or a head's query input is the plain
    run_with_hooks patch, cell by cell."""
    import pandas as pd

    model = case.model
    assert not model.training
    for method, (activation, cells) in OPTIONAL_HOOK_PATCHES.items():
        if method == "set_use_split_qkv_input" and model.routing_layout.has_routers:
            with pytest.raises(ValueError, match="refused in the .* layout"):
                getattr(model, method)(True)
            continue
        getattr(model, method)(True)
        try:
            assert not any(module.training for module in model.modules())
            _, cache = model.run_with_cache(case.clean)
            axes = ["layer", "pos", "head"][: len(cells[0])]
            setter = (
                tlp.layer_pos_head_vector_patch_setter
                if len(axes) == 3
                else tlp.layer_pos_patch_setter
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RoutedResidualPatchWarning)
                result = tlp.generic_activation_patch(
                    model,
                    case.corrupted,
                    cache,
                    case.metric,
                    setter,
                    activation,
                    index_df=pd.DataFrame(cells, columns=axes),
                )
            for value, (layer, *cell) in zip(result, cells, strict=True):
                name = get_act_name(activation, layer)
                clean = cache[name]

                def patch(x, hook, cell=tuple(cell), clean=clean):
                    x = x.clone()
                    x[(slice(None), *cell)] = clean[(slice(None), *cell)]
                    return x

                expected = case.metric(
                    model.run_with_hooks(case.corrupted, fwd_hooks=[(name, patch)])
                )
                assert torch.allclose(value, expected, atol=ATOL), (method, layer, cell)
            assert result.abs().max() > 1e-3  # the cells move the metric
        finally:
            getattr(model, method)(False)
    # a model in train mode stays so: its new hook points are in train mode too
    model.train()
    try:
        model.set_use_attn_result(True)
        assert model.blocks[0].attn.hook_result.training
    finally:
        model.set_use_attn_result(False)
        model.eval()


def test_patching_an_optional_hook_that_is_off_names_its_set_use_call():
    """TransformerLens's patching reads ``clean_cache[name]`` first: for an optional hook
    that was off during the clean run this was a bare ``KeyError('blocks.0.attn.hook_result')``;
    it now names the ``set_use_*`` call (the model's own hook check already did)."""
    case = _CASES.setdefault("kimi", Case("kimi"))
    for method, (activation, _) in OPTIONAL_HOOK_PATCHES.items():
        setter = tlp.layer_pos_patch_setter
        with pytest.raises(KeyError, match=rf"hook_{activation}.*model\.{method}\(True\)"):
            tlp.generic_activation_patch(
                case.model,
                case.corrupted,
                case.cache,
                case.metric,
                setter,
                activation,
                ["layer", "pos"],
            )
        with pytest.raises(KeyError, match=rf"model\.{method}\(True\)"):
            case.cache[activation, -1]
    # others: the model's suggestions (audit 138; TransformerLens's bare KeyError of the name)
    with pytest.raises(KeyError, match="blocks.0.hook_nonexistent' is not in this cache: unkn"):
        case.cache["blocks.0.hook_nonexistent"]


# --- decompositions, DLA and the lens ---------------------------------------------------
def _refuses(call, layout: str):
    with pytest.raises(
        ValueError, match=rf"assumes one residual stream.*'{layout}' layout.*routed=True"
    ):
        call()


def test_the_unrouted_refusal_counts_the_sources_and_claims_no_sum():
    """The refusal counts the router's sources as written ("1 depth source", not "mixes 1
    depth sources") and says the unweighted components *need* not sum to the norm's input:
    at a router of one source (kimi / full layer 0's attention router, weight 1) they do,
    and the refusal is the conservative rule, not a measured failure."""
    model = tiny_model(attnres_layout="kimi")
    _, cache = model.run_with_cache(torch.randint(0, 50, (2, 5)))
    with pytest.raises(ValueError, match=r"reads 1 depth source \(.*need not sum"):
        cache.decompose_resid(0)
    torch.testing.assert_close(  # the single source, weight 1: the embedding itself
        cache.decompose_resid(0, routed=True).sum(0), cache["blocks.0.attn_res.hook_out"]
    )
    with pytest.raises(ValueError, match=r"reads 2 depth sources \(.*need not sum"):
        cache.decompose_resid(2)


def _final_norm_input(case: Case) -> torch.Tensor:
    """What ln_final normalises, from its own hooks (scale * normalized)."""
    return case.cache["ln_final.hook_normalized"] * case.cache["ln_final.hook_scale"]


def test_decompose_resid_and_logit_attrs_are_exact_or_refuse(case):
    cache, model = case.cache, case.model
    answers = torch.tensor([ANSWER, ANSWER])
    wrongs = torch.tensor([WRONG, WRONG])
    true_diff = case.logits[:, -1, ANSWER] - case.logits[:, -1, WRONG]
    routed = {"routed": True} if case.routed_final else {}
    if case.routed_final:
        _refuses(lambda: cache.decompose_resid(), case.layout)
        _refuses(lambda: cache.logit_attrs(torch.zeros(1, 2, 32), answers), case.layout)
        _refuses(lambda: cache.get_full_resid_decomposition(), case.layout)
        _refuses(lambda: cache.stack_head_results(), case.layout)
        _refuses(lambda: cache.stack_neuron_results(model.cfg.n_layers), case.layout)
        _refuses(
            lambda: cache.apply_ln_to_stack(torch.zeros(1, 2, 4, model.cfg.d_model)), case.layout
        )
    stack = cache.decompose_resid(pos_slice=-1, **routed)
    assert torch.allclose(stack.sum(0), _final_norm_input(case)[:, -1], atol=ATOL)
    attrs = cache.logit_attrs(stack, answers, wrongs, pos_slice=-1, **routed)
    assert torch.allclose(attrs.sum(0), true_diff, atol=ATOL)
    full, labels = cache.get_full_resid_decomposition(return_labels=True, **routed)
    assert labels[-2:] == ["embed", "bias"]
    assert torch.allclose(full.sum(0), _final_norm_input(case), atol=ATOL)
    # every component readout sums to the logits (ln_final applied with the cached scale)
    scaled = cache.apply_ln_to_stack(full, **routed) * model.ln_final.w
    assert torch.allclose((scaled.sum(0) @ model.W_U), case.logits, atol=ATOL)
    heads = cache.stack_head_results(incl_remainder=True, **routed)
    assert torch.allclose(heads.sum(0), _final_norm_input(case), atol=ATOL)


def test_a_stack_sliced_unlike_the_call_is_refused(case):
    """Audit 43: a stack made without ``pos_slice`` (``[n, batch, pos, d_model]``) passed
    to ``logit_attrs`` / ``apply_ln_to_stack`` with ``pos_slice=-1`` (or the other way
    round) was divided by the RMS of other positions, broadcast by TransformerLens: one
    prompt's stack came back ``[n, 1, pos]`` with every position scaled by the last
    position's RMS (up to 0.62 off the logit difference at earlier positions, kimi), and a stack
    of 3 prompts of 3 positions came back ``[n, 3, 3]`` scaled position by prompt. Both
    refuse now, naming the two shapes; the matching call stays exact."""
    model = case.model
    routed = {"routed": True} if case.routed_final else {}
    logits, cache = model.run_with_cache(case.clean[:1])
    true_diff = logits[0, :, ANSWER] - logits[0, :, WRONG]  # [pos]
    whole = cache.decompose_resid(**routed)  # [n, 1, pos, d_model]
    last = cache.decompose_resid(pos_slice=-1, **routed)  # [n, 1, d_model]
    mismatch = r"stack.*\(1, 4\).*pos_slice=-1.*\(1,\).*same pos_slice"
    with pytest.raises(ValueError, match=mismatch):
        cache.logit_attrs(whole, ANSWER, WRONG, pos_slice=-1, **routed)
    with pytest.raises(ValueError, match=mismatch):
        cache.apply_ln_to_stack(whole, pos_slice=-1, **routed)
    with pytest.raises(ValueError, match=r"stack.*\(1,\).*pos_slice=None.*\(1, 4\)"):
        cache.logit_attrs(last, ANSWER, WRONG, **routed)
    # the matching calls are exact
    attrs = cache.logit_attrs(whole, ANSWER, WRONG, **routed)
    assert torch.allclose(attrs.sum(0)[0], true_diff, atol=ATOL)
    attrs = cache.logit_attrs(last, ANSWER, WRONG, pos_slice=-1, **routed)
    assert torch.allclose(attrs.sum(0)[0], true_diff[-1], atol=ATOL)
    # a layer's input (routed=True wherever a router reads there), and a cache without a
    # batch axis
    layer_routed = {"routed": True} if case.layout != "none" else {}
    inputs = cache.decompose_resid(layer=1, **layer_routed)
    with pytest.raises(ValueError, match=r"stack.*\(1, 4\).*pos_slice=-1.*\(1,\)"):
        cache.apply_ln_to_stack(inputs, layer=1, pos_slice=-1, **layer_routed)
    cache.remove_batch_dim()
    whole = cache.decompose_resid(**routed)  # [n, pos, d_model]
    with pytest.raises(ValueError, match=r"stack.*\(4,\).*pos_slice=-1.*\(\)"):
        cache.logit_attrs(whole, ANSWER, WRONG, pos_slice=-1, **routed)
    attrs = cache.logit_attrs(whole, ANSWER, WRONG, **routed)
    assert torch.allclose(attrs.sum(0), true_diff, atol=ATOL)


def test_logit_attrs_refuses_tokens_of_other_rows_than_the_stack(case):
    """Audit 43: answer tokens of the whole batch with a ``batch_slice`` of one prompt
    broadcast the prompt's components against every prompt's answer direction:
    ``[n, 2]`` came back where the prompt has ``[n, 1]``, its second column neither
    prompt's logit difference (-0.194 against 0.214 and 0.098 with ``batch_slice=[0]``,
    4-layer kimi). Refused now; the tokens of the selected rows are exact."""
    routed = {"routed": True} if case.routed_final else {}
    cache, logits = case.cache, case.logits
    answers, wrongs = torch.tensor([ANSWER, 11]), torch.tensor([WRONG, 12])
    stack = cache.decompose_resid(pos_slice=-1, **routed)
    with pytest.raises(ValueError, match=r"tokens.*\(2,\).*stack.*\(1,\).*batch_slice"):
        cache.logit_attrs(stack, answers, wrongs, pos_slice=-1, batch_slice=Slice([1]), **routed)
    attrs = cache.logit_attrs(
        stack, answers[1:], wrongs[1:], pos_slice=-1, batch_slice=Slice([1]), **routed
    )
    assert attrs.shape == (stack.shape[0], 1)
    assert torch.allclose(attrs.sum(0)[0], logits[1, -1, 11] - logits[1, -1, 12], atol=ATOL)


def test_logit_attrs_refuses_answers_that_broadcast_along_positions(case):
    """Audit 46: with as many answers as positions, a ``[batch]`` answer tensor that is
    not the stack's rows broadcast along the *position* axis, keeping the stack's shape:
    the whole batch's answers with ``batch_slice=[0]`` (2 prompts of 2 positions) gave
    prompt 0's position 1 prompt 1's answer (-0.0017 for -0.0011, 4-layer kimi; 0.090
    for 0.175 in layout none), which the shape check after the call let through. The
    answers' shape is checked against the stack's rows and positions now; the forms
    TransformerLens documents stay exact."""
    routed = {"routed": True} if case.routed_final else {}
    logits, cache = case.model.run_with_cache(case.clean[:, :2])  # 2 prompts, 2 positions
    stack = cache.decompose_resid(**routed)  # [n, 2, 2, d_model]
    answers, wrongs = torch.tensor([ANSWER, 11]), torch.tensor([WRONG, 12])
    with pytest.raises(ValueError, match=r"tokens of shape \(2,\).*\(1, 2\).*\[batch\]"):
        cache.logit_attrs(stack, answers, wrongs, batch_slice=[0], **routed)
    # the same numbers for one prompt: [batch] answers of its row, or [batch, pos] ones
    true = logits[0, :, ANSWER] - logits[0, :, WRONG]
    attrs = cache.logit_attrs(stack, answers[:1], wrongs[:1], batch_slice=[0], **routed)
    assert torch.allclose(attrs.sum(0), true[None], atol=ATOL)
    attrs = cache.logit_attrs(
        stack,
        answers[:1, None].expand(1, 2),
        wrongs[:1, None].expand(1, 2),
        batch_slice=[0],
        **routed,
    )
    assert torch.allclose(attrs.sum(0), true[None], atol=ATOL)
    # [batch] answers of every row, at every position (TransformerLens's unsqueeze)
    attrs = cache.logit_attrs(stack, answers, wrongs, **routed)
    rows = torch.arange(2)[:, None]
    by_hand = logits[rows, :, answers[:, None]] - logits[rows, :, wrongs[:, None]]
    assert torch.allclose(attrs.sum(0), by_hand[:, 0], atol=ATOL)
    # one prompt's answers per position is [1, pos], not [pos] (which reads as [batch])
    with pytest.raises(ValueError, match=r"tokens of shape \(2,\).*\[1, pos\]"):
        cache.logit_attrs(stack, answers, wrongs, batch_slice=[1], **routed)


def test_a_stack_without_batch_axis_of_a_one_prompt_cache_is_exact(case):
    """Audit 46: one prompt's stack without its batch axis (``stack[:, 0]``, passed with
    ``has_batch_dim=False``) on a cache that kept its batch axis of 1: TransformerLens
    divides ``[n, pos, d_model]`` by the ``[1, pos, 1]`` RMS, which is exact; it was
    refused as a stack sliced unlike the call. With several prompts it still needs the
    prompt's index as ``batch_slice`` (the refusal says so)."""
    routed = {"routed": True} if case.routed_final else {}
    logits, cache = case.model.run_with_cache(case.clean[:1])
    stack = cache.decompose_resid(**routed)[:, 0]  # [n, pos, d_model]
    attrs = cache.logit_attrs(stack, ANSWER, WRONG, has_batch_dim=False, **routed)
    assert torch.allclose(attrs.sum(0), logits[0, :, ANSWER] - logits[0, :, WRONG], atol=ATOL)
    scaled = cache.apply_ln_to_stack(stack, has_batch_dim=False, **routed)
    assert torch.allclose(scaled, stack / cache["ln_final.hook_scale"][0], atol=1e-6)
    stack = case.cache.decompose_resid(**routed)[:, 1]  # prompt 1 of 2
    with pytest.raises(ValueError, match=r"has_batch_dim=False.*int batch_slice"):
        case.cache.logit_attrs(stack, ANSWER, WRONG, has_batch_dim=False, **routed)
    attrs = case.cache.logit_attrs(
        stack, ANSWER, WRONG, batch_slice=1, has_batch_dim=False, **routed
    )
    by_hand = case.logits[1, :, ANSWER] - case.logits[1, :, WRONG]
    assert torch.allclose(attrs.sum(0), by_hand, atol=ATOL)


def test_logit_attrs_refuses_the_whole_batchs_answers_with_an_int_batch_slice(case):
    """Audit 48: with an int ``batch_slice`` (or a one-prompt stack, ``has_batch_dim=False``)
    the stack has no batch axis, and the whole batch's answers (2 prompts of 2 positions)
    were dotted along the positions, prompt ``p``'s answer at position ``p``, keeping the
    stack's shape: prompt 0's position 1 read 0.038 for -0.143 (3-layer kimi), -0.156 for
    -0.040 (layout none), unrefused. Refused now; one prompt's answers at each position as
    ``[1, pos]`` (what the refusal asks for; it was refused too) or ``[pos]`` are exact."""
    routed = {"routed": True} if case.routed_final else {}
    logits, cache = case.model.run_with_cache(case.clean[:, :2])  # 2 prompts, 2 positions
    stack = cache.decompose_resid(**routed)  # [n, 2, 2, d_model]
    answers, wrongs = torch.tensor([ANSWER, 11]), torch.tensor([WRONG, 12])
    true = logits[0, :, ANSWER] - logits[0, :, WRONG]
    for kwargs in ({"batch_slice": 0}, {"batch_slice": 0, "has_batch_dim": False}):
        one = stack[:, 0] if "has_batch_dim" in kwargs else stack
        with pytest.raises(ValueError, match=r"shape \(2,\).*whole batch.*\[1, pos\]"):
            cache.logit_attrs(one, answers, wrongs, **kwargs, **routed)
        at_each = cache.logit_attrs(one, answers[None], wrongs[None], **kwargs, **routed)
        assert torch.allclose(
            at_each.sum(0), logits[0, [0, 1], answers] - logits[0, [0, 1], wrongs], atol=ATOL
        )
        pair = torch.tensor([[ANSWER, ANSWER]]), torch.tensor([[WRONG, WRONG]])
        assert torch.allclose(
            cache.logit_attrs(one, *pair, **kwargs, **routed).sum(0), true, atol=ATOL
        )
    # with 4 positions [pos] answers are no batch's: exact with an int batch_slice
    stack = case.cache.decompose_resid(**routed)  # [n, 2, 4, d_model]
    answers, wrongs = torch.tensor([ANSWER, 11, 13, 14]), torch.tensor([WRONG, 12, 15, 16])
    attrs = case.cache.logit_attrs(stack, answers, wrongs, batch_slice=1, **routed)
    by_hand = case.logits[1, range(4), answers] - case.logits[1, range(4), wrongs]
    assert torch.allclose(attrs.sum(0), by_hand, atol=ATOL)


def test_logit_attrs_takes_answers_shared_by_the_rows_at_each_position(case):
    """Audit 48: a ``[pos]`` answer tensor whose length is not the batch's selects one
    token per position for every prompt (TransformerLens documents it, and it is exact);
    audit 46 refused it along with the whole batch's answers. Taken again, as are one
    token in a ``[1]`` tensor for a stack without batch and position axes; the ambiguous
    ``[pos]`` of the batch's length with a ``batch_slice`` stays refused (above)."""
    routed = {"routed": True} if case.routed_final else {}
    stack = case.cache.decompose_resid(**routed)  # [n, 2, 4, d_model]
    answers, wrongs = torch.tensor([ANSWER, 11, 13, 14]), torch.tensor([WRONG, 12, 15, 16])
    attrs = case.cache.logit_attrs(stack, answers, wrongs, **routed)
    by_hand = case.logits[:, range(4), answers] - case.logits[:, range(4), wrongs]
    assert torch.allclose(attrs.sum(0), by_hand, atol=ATOL)
    attrs = case.cache.logit_attrs(stack, answers, wrongs, batch_slice=[1], **routed)
    assert torch.allclose(attrs.sum(0), by_hand[1:], atol=ATOL)
    last = case.cache.decompose_resid(pos_slice=-1, **routed)  # [n, 2, d_model]
    attrs = case.cache.logit_attrs(
        last, torch.tensor([11]), torch.tensor([12]), pos_slice=-1, batch_slice=1, **routed
    )
    assert torch.allclose(attrs.sum(0), case.logits[1, -1, 11] - case.logits[1, -1, 12], atol=ATOL)


def test_a_cache_that_stopped_early_is_refused_naming_stop_at_layer(case):
    """Audit 43: ``run_with_cache(tokens, stop_at_layer=2)`` holds no hook of layer 2 on;
    the routed ``accumulated_resid(layer=2)`` needs ``blocks.2.hook_resid_pre`` and said
    only to run without a ``names_filter``, which this cache never had. The analyses up to
    the layers the pass reached stay exact (equal to a full run's)."""
    model = case.model
    layer_routed = {"routed": True} if case.layout != "none" else {}
    _, partial = model.run_with_cache(case.clean, stop_at_layer=2)
    _, whole = model.run_with_cache(case.clean)
    early = partial.decompose_resid(layer=1, mlp_input=True, **layer_routed)
    assert torch.equal(early, whole.decompose_resid(layer=1, mlp_input=True, **layer_routed))
    if case.routed_final:
        with pytest.raises(KeyError, match=r"blocks\.2\.hook_resid_pre.*stop_at_layer"):
            partial.accumulated_resid(layer=2, routed=True)
    # TransformerLens computes every layer's head results, whichever layer is asked for:
    # it raised a bare KeyError 'blocks.2.attn.hook_z'; now the refusal says why
    head_calls = (
        lambda: partial.stack_head_results(layer=1, **layer_routed),
        lambda: partial.get_full_resid_decomposition(layer=1, **layer_routed),
        partial.compute_head_results,
    )
    for call in head_calls:
        with pytest.raises(KeyError, match=r"every layer's head results.*blocks\.2\.attn\.hook_z"):
            call()


@pytest.mark.parametrize("layout", ["none", "cumulative"])
def test_an_uncached_hook_read_by_an_analysis_is_refused_saying_why(layout):
    """Audit 159: where an analysis reads a hook the cache does not hold without checking
    first (layout ``none`` / ``cumulative``'s ``accumulated_resid`` of a ``stop_at_layer``
    cache; a decomposition of a ``names_filter`` cache of an unhooked pass, whose sum
    check is skipped; ``get_neuron_results``, ``stack_activation``), it raised
    TransformerLens's bare ``KeyError: 'blocks.2.hook_resid_pre'``, naming neither why nor
    what to do. It is still a ``KeyError`` of the name (``args[0]``), now saying both."""
    model = tiny_model(attnres_layout=layout)
    tokens = torch.tensor([[1, 2, 3, 4]])
    _, partial = model.run_with_cache(tokens, stop_at_layer=2)
    _, filtered = model.run_with_cache(
        tokens, names_filter=lambda name: "attn_out" not in name and "post" not in name
    )
    assert filtered.other_hooks_attached is False  # so the decompositions skip their check
    calls = [
        ("blocks.2.hook_resid_pre", lambda: partial.accumulated_resid(layer=2)),
        ("blocks.0.hook_attn_out", lambda: filtered.decompose_resid(layer=2, routed=True)),
        ("blocks.1.mlp.hook_post", lambda: filtered.get_neuron_results(1)),
        ("blocks.0.hook_attn_out", lambda: filtered.stack_activation("attn_out", 2)),
    ]
    for name, call in calls:
        with pytest.raises(KeyError, match=re.escape(f"'{name}' is not in this cache")) as caught:
            call()
        assert caught.value.args[0] == name
        assert "names_filter" in str(caught.value) and "stop_at_layer" in str(caught.value)


def test_an_uncached_optional_hook_whose_flag_is_on_names_every_reason():
    """Review of audit 159: an optional hook (``set_use_attn_result``) the cache lacks while
    its flag is on was always refused as ``switch it on before run_with_cache``, though it
    was on and a ``names_filter`` (or ``stop_at_layer``) had dropped it; and its ``args[0]``
    was that message, not the name. It is an `UncachedHookError` of the name naming the
    filter, the early stop and the flag (which may have been off in that pass)."""
    model = tiny_model()  # 4 layers
    tokens = torch.tensor([[1, 2, 3]])
    model.set_use_attn_result(False)
    _, without_flag = model.run_with_cache(tokens)
    model.set_use_attn_result(True)
    _, filtered = model.run_with_cache(tokens, names_filter=lambda name: "result" not in name)
    _, partial = model.run_with_cache(tokens, stop_at_layer=1)
    assert "blocks.2.attn.hook_result" in model.run_with_cache(tokens)[1].cache_dict
    for cache in (filtered, partial, without_flag):
        with pytest.raises(KeyError) as caught:
            cache["result", 2]
        assert caught.value.args[0] == "blocks.2.attn.hook_result"
        message = str(caught.value)
        assert "switch it on" not in message
        for reason in ("names_filter", "stop_at_layer", r"model.set_use_attn_result(True)"):
            assert reason in message, (reason, message)
    model.set_use_attn_result(False)  # off now: the flag is the reason
    with pytest.raises(KeyError, match=r"exists only while model\.set_use_attn_result\(True\)"):
        filtered["result", 2]


def test_transformerlens_unweighted_decomposition_is_wrong_where_we_refuse():
    """The reason for refusing: TransformerLens's own class on the exact wrap reads the DLA
    n_sources times too large (each source is averaged in, the components are not)."""
    case = _CASES.setdefault("wrap_exact", Case("wrap_exact"))
    plain = ActivationCache(case.cache.cache_dict, case.model)
    stack = plain.decompose_resid(pos_slice=-1)
    attrs = plain.logit_attrs(stack, torch.tensor([ANSWER, ANSWER]), pos_slice=-1)
    n_sources = len(case.model.source_labels(None, "final_res"))
    assert torch.allclose(attrs.sum(0), n_sources * case.logits[:, -1, ANSWER], atol=ATOL)
    assert n_sources > 1


def test_decompositions_of_every_sublayer_input(case):
    """At every read point the (routed) decomposition sums to the norm's input, recovered
    from that norm's own hooks."""
    cache, model = case.cache, case.model
    for layer in range(model.cfg.n_layers):
        for mlp_input, norm in ((False, "ln1"), (True, "ln2")):
            target = (
                cache[f"blocks.{layer}.{norm}.hook_normalized"]
                * cache[f"blocks.{layer}.{norm}.hook_scale"]
            )
            if case.layout != "none":
                _refuses(
                    lambda layer=layer, mlp_input=mlp_input: cache.decompose_resid(
                        layer, mlp_input
                    ),
                    case.layout,
                )
            routed = case.layout != "none"
            stack = cache.decompose_resid(layer, mlp_input, routed=routed)
            assert torch.allclose(stack.sum(0), target, atol=ATOL), (layer, mlp_input)
            full = cache.get_full_resid_decomposition(
                layer, mlp_input, expand_neurons=False, routed=routed
            )
            assert torch.allclose(full.sum(0), target, atol=ATOL), (layer, mlp_input)
            normalized = cache.apply_ln_to_stack(stack, layer, mlp_input, routed=routed).sum(0)
            assert torch.allclose(
                normalized, cache[f"blocks.{layer}.{norm}.hook_normalized"], atol=ATOL
            )


def test_the_remainder_at_layer_0_is_the_first_attention_input(case):
    """At layer 0 no head or neuron has written yet, so the remainder is all of what ln1
    reads. TransformerLens reads ``cache["resid_post", layer - 1]`` there, which its
    negative layer index turns into the last layer's output: layout none returned the whole
    model's final stream (0.027 off an input of 0.050, float32; 0.063 in the none wrap), the
    routed layouts refused."""
    warnings.simplefilter("ignore", UnfoldedNormWarning)  # the hand computation divides too
    cache, model = case.cache, case.model
    prefix = "blocks.0.ln1"
    target = cache[f"{prefix}.hook_normalized"] * cache[f"{prefix}.hook_scale"]
    direction = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(7))
    for pos_slice in (None, -1):
        want = Slice(pos_slice).apply(target, dim=-2)
        scale = Slice(pos_slice).apply(cache[f"{prefix}.hook_scale"], dim=-2)
        heads, labels = cache.stack_head_results(
            0, return_labels=True, incl_remainder=True, pos_slice=pos_slice, routed=True
        )
        assert labels == ["remainder"]
        assert torch.allclose(heads, want[None], atol=ATOL)
        normalized = cache.stack_head_results(
            0, incl_remainder=True, pos_slice=pos_slice, apply_ln=True, routed=True
        )
        assert torch.allclose(normalized, (want / scale)[None], atol=ATOL)
        for apply_ln in (False, True):
            neurons, labels = cache.stack_neuron_results(
                0,
                pos_slice=pos_slice,
                return_labels=True,
                incl_remainder=True,
                apply_ln=apply_ln,
                project_output_onto=direction,
                routed=True,
            )
            assert labels == ["remainder"]
            projected = (want / scale if apply_ln else want) @ direction
            assert torch.allclose(neurons, projected[None], atol=ATOL)


def test_a_decomposition_with_no_component_is_an_empty_stack(case):
    """Before layer 0's attention with ``incl_embeds=False`` (or before its MLP with
    ``mode="mlp"``) nothing has written: an empty stack, as ``stack_head_results(0)``
    gives, where TransformerLens's ``torch.stack`` of nothing raised a bare
    ``RuntimeError``."""
    cache, model = case.cache, case.model
    for mlp_input, mode in ((False, "all"), (False, "attn"), (True, "mlp")):
        # a Slice too, as TransformerLens takes (audit 15: Slice(Slice(-1)) raised 'Invalid
        # input_slice')
        for pos_slice in (None, -1, Slice(-1), Slice([0, 2])):
            stack, labels = cache.decompose_resid(
                0,
                mlp_input,
                mode,
                pos_slice=pos_slice,
                incl_embeds=False,
                return_labels=True,
                routed=True,
            )
            positions = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
            batch_pos = positions.apply(case.logits, dim=-2).shape[:-1]
            assert labels == [] and stack.shape == (0, *batch_pos, model.cfg.d_model)
            assert stack.dtype == cache["hook_embed"].dtype


def test_accumulated_resid_and_logit_lens_are_exact_or_refuse(case):
    cache, model = case.cache, case.model
    if case.routed_final:
        with pytest.raises(ValueError, match=rf"'{case.layout}' layout.*routing_lens"):
            cache.accumulated_resid()
        with pytest.raises(ValueError, match=rf"'{case.layout}' layout.*routing_lens"):
            cache.logit_lens()
        with pytest.raises(ValueError, match="single-stream"):  # TransformerLens's own check
            tl_logit_lens(model, case.clean)
    else:
        accumulated = cache.accumulated_resid(apply_ln=True)
        assert torch.allclose(accumulated[-1] @ model.W_U, case.logits, atol=ATOL)
        for result in (
            cache.logit_lens(positions=None),
            tl_logit_lens(model, case.clean, positions=None),
        ):
            assert torch.allclose(result.values[-1], case.logits, atol=ATOL)
        # every entry is ln_final of the stream entering that layer
        lens = routing_lens(model, cache)
        assert torch.allclose(lens.logits, result.values, atol=ATOL)
    if case.layout != "none":
        with pytest.raises(ValueError, match="ln1 RMS"):
            cache.accumulated_resid(layer=1, apply_ln=True, routed=True)


def _stop_here_readout_input(model: HookedAttnRes, cache, point: int) -> torch.Tensor:
    """What ln_final would read if the model stopped at read point ``point``, from what
    the router there read (its ``hook_sources``; the norm's own hooks where none reads):
    the final router (by the reference formula) over those sources, or the current one."""
    layout = model.routing_layout
    site = layout.reader(point)
    if site is None:
        layer, is_mlp = divmod(point, 2)
        prefix = "ln_final" if layer == model.cfg.n_layers else f"blocks.{layer}.ln{1 + is_mlp}"
        return cache[f"{prefix}.hook_normalized"] * cache[f"{prefix}.hook_scale"]
    sources = list(cache[site.hook("sources")].unbind(-2))
    if not layout.has_final_router:
        return sources[-1]
    params = model_router_params(model)("final_res")
    return reference_route(sources, params, model.cfg.eps)[0]


def test_accumulated_resid_reads_each_state_as_stored_under_stream_edits(case):
    """Audit finding: in the partial-sum layouts a committed block stays the current
    source until the next sublayer writes, so an edit of the next layer's hook_resid_pre
    (or of hook_committed_mid, read as the current source by the MLP router) changes the
    stored block, and the commit hook (hook_embed for the embedding) no longer holds it.
    accumulated_resid(routed=True) and the routing lens read the commit hooks and were
    off silently (float64: 0.039 per entry with blocks.0.hook_resid_pre halved, kimi and
    full; 1.2 after ln_final with blocks.1.hook_resid_pre halved, full; 0.73 wrap_exact).
    Each entry must be what the router at that point read, mixed by the final router."""
    model = build(case.name).double()
    layout = model.routing_layout
    n_layers = model.cfg.n_layers
    edits = [get_act_name("resid_pre", layer) for layer in range(n_layers)]
    edits += [get_act_name("resid_mid", 0), *layout.commit_hooks().values()]
    for name in dict.fromkeys(edits):
        with warnings.catch_warnings(), model.hooks(fwd_hooks=[(name, lambda a, hook: a * 0.5)]):
            warnings.simplefilter("ignore", RoutedResidualPatchWarning)
            logits, cache = model.run_with_cache(case.clean)
        stack, labels = cache.accumulated_resid(incl_mid=True, return_labels=True, routed=True)
        for entry, label in zip(stack, labels, strict=True):
            layer, kind = label.split("_")
            point = 2 * n_layers if label == "final_post" else 2 * int(layer) + (kind == "mid")
            expected = _stop_here_readout_input(model, cache, point)
            torch.testing.assert_close(entry, expected, atol=1e-12, rtol=0, msg=(name, label))
        lens = routing_lens(model, cache, incl_mid=True)
        expected = model.ln_final(stack) @ model.W_U
        torch.testing.assert_close(lens.logits, expected, atol=1e-12, rtol=0)
        torch.testing.assert_close(lens.logits[-1], logits, atol=1e-12, rtol=0)


def test_the_logit_lens_of_a_cache_does_not_fire_ln_final_hooks(case):
    """Audit finding: accumulated_resid(apply_ln=True) and apply_ln_to_stack(recompute_ln=True)
    applied ln_final by calling the module, so hooks attached while analysing (a
    TransformerLens "freeze the final scale" hook, here returning the run's cached
    ln_final scale) were applied to every lens entry: each was divided by the final
    stream's RMS instead of its own (float32, 0.5 off in layout none to 50 in full, on
    entries of about 5), and caching hooks got the lens's vectors. The lens is ln_final applied by
    hand to each entry, whatever is attached (as routing_lens computes it)."""
    model, cache = case.model, case.cache
    frozen = cache["ln_final.hook_scale"]
    calls = []
    hooks = [
        ("ln_final.hook_scale", lambda act, hook: frozen),
        ("ln_final.hook_normalized", lambda act, hook: calls.append(hook.name)),
    ]
    stack = cache.accumulated_resid(incl_mid=True, routed=True)
    rms = (stack.pow(2).mean(-1, keepdim=True) + model.cfg.eps).sqrt()
    expected = stack / rms * model.ln_final.w
    with model.hooks(fwd_hooks=hooks):
        lens = cache.accumulated_resid(incl_mid=True, apply_ln=True, routed=True)
        recomputed = cache.apply_ln_to_stack(stack, recompute_ln=True)
        sliced = cache.apply_ln_to_stack(stack, recompute_ln=True, batch_slice=1)
        if not case.routed_final:  # TransformerLens's lens tool on this cache (audit 13:
            # it called ln_final per entry: 0.03 off on logits of 0.37, float64, none)
            tool = cache.logit_lens(positions=None, incl_mid=True).values
            torch.testing.assert_close(tool, expected @ model.W_U, atol=1e-5, rtol=1e-5)
    assert not calls
    for got in (lens, recomputed):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sliced, expected[:, 1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lens[-1] @ model.W_U, case.logits, atol=ATOL, rtol=0)
    assert (stack[0] / frozen - stack[0] / rms[0]).abs().max() > 1e-2  # the hook matters
    if case.layout == "none":  # below the unembedding: the cached RMS, warning as elsewhere
        model._unfolded_warned = False
        with pytest.warns(UnfoldedNormWarning, match="ln2"):
            lens = cache.accumulated_resid(1, apply_ln=True, mlp_input=True)
        torch.testing.assert_close(lens[-1], cache["blocks.1.ln2.hook_normalized"])


def test_routing_lens_is_exact_at_the_last_layer_and_reads_each_state(case):
    model = case.model
    lens = routing_lens(model, case.clean)
    n_layers = model.cfg.n_layers
    assert lens.labels == [f"{layer}_pre" for layer in range(n_layers)] + ["final_post"]
    assert lens.logits.shape == (n_layers + 1, *case.logits.shape)
    assert torch.allclose(lens.logits[-1], case.logits, atol=1e-5)
    from_cache = routing_lens(model, case.cache, incl_mid=True, positions=-1)
    assert from_cache.logits.shape == (2 * n_layers + 1, 2, model.cfg.d_vocab)
    assert torch.allclose(from_cache.logits[-1], case.logits[:, -1], atol=1e-5)
    assert torch.allclose(from_cache.logits[::2], lens.logits[:, :, -1], atol=1e-5)
    assert [str(s) for s in lens.sites] == lens.router_labels
    assert len(lens.sites) == len(model.sites())
    # independent: the state entering layer l from stop_at_layer, read out by the model's
    # own modules (the final router where there is one)
    for layer in range(n_layers + 1):
        state = model(case.clean, stop_at_layer=layer)
        stream = model.final_res(state.sources) if case.routed_final else state.current
        expected = model.ln_final(stream) @ model.W_U
        assert torch.allclose(lens.logits[layer], expected, atol=1e-5), layer
    if case.routed_final:
        assert torch.allclose(lens.router_logits[-1], case.logits, atol=1e-5)
    for site, logits in zip(lens.sites, lens.router_logits, strict=True):
        expected = model.ln_final(case.cache[site.hook("out")]) @ model.W_U
        assert torch.allclose(logits, expected, atol=1e-5)


def test_routing_lens_of_a_cache_without_a_batch_axis_reads_each_prompt_as_the_batched_lens(
    case,
):
    """``run_with_cache(remove_batch_dim=True)`` caches ``[pos, d_model]`` tensors. The
    final router's recency bias was broadcast for ``[n_sources, batch, pos]`` logits only:
    on ``[n_sources, pos]`` it made an ``[n_sources, n_sources, pos]`` softmax, and the
    lens crashed in the kimi and full layouts (a stack of ``[1, pos, d]`` and
    ``[2, pos, d]`` mixtures). Each entry must be that prompt's entry of the batched lens,
    whose every state is checked against ``stop_at_layer`` above."""
    model = case.model
    batched = routing_lens(model, case.clean, incl_mid=True)
    for row in range(case.clean.shape[0]):
        _, cache = model.run_with_cache(case.clean[row : row + 1], remove_batch_dim=True)
        lens = routing_lens(model, cache, incl_mid=True)
        assert lens.labels == batched.labels
        assert lens.logits.shape == batched.logits[:, row].shape
        torch.testing.assert_close(lens.logits, batched.logits[:, row], atol=1e-5, rtol=0)
        torch.testing.assert_close(
            lens.router_logits, batched.router_logits[:, row], atol=1e-5, rtol=0
        )


def test_routing_lens_of_left_padded_tokens_takes_their_attention_mask(case):
    """Each prompt's lens at its real positions equals the lens of that prompt run alone,
    unpadded (rows are independent). Before, token ids could not come with a mask: the
    lens attended the padding; now ``attention_mask=`` goes to the lens's run, and a
    cache (which carries its run's mask) refuses one."""
    model = case.model
    tokens = case.clean.clone()
    pad = 2  # the second prompt is 2 tokens long, left-padded
    tokens[1, :pad] = 0
    mask = torch.ones_like(tokens)
    mask[1, :pad] = 0
    padded = routing_lens(model, tokens, incl_mid=True, attention_mask=mask)
    for row, start in ((0, 0), (1, pad)):
        alone = routing_lens(model, tokens[row : row + 1, start:], incl_mid=True)
        torch.testing.assert_close(
            padded.logits[:, row, start:], alone.logits[:, 0], atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            padded.router_logits[:, row, start:], alone.router_logits[:, 0], atol=1e-5, rtol=0
        )
    unmasked = routing_lens(model, tokens, incl_mid=True)
    assert (unmasked.logits[:, 1, pad:] - padded.logits[:, 1, pad:]).abs().max() > 1e-3
    _, cache = model.run_with_cache(tokens, attention_mask=mask)
    torch.testing.assert_close(routing_lens(model, cache, incl_mid=True).logits, padded.logits)
    with pytest.raises(ValueError, match="attention_mask cannot change that run"):
        routing_lens(model, cache, attention_mask=mask)


def test_routing_lens_reads_the_stored_states_under_a_local_patch_and_refuses_partial_caches(
    case,
):
    """A local patch_sources edits one router's copy of its sources, not the depth state:
    the lens reads the states as stored (as stop_at_layer returns them) in every layout;
    a cache of a logit_positions run is refused, not read at mixed positions."""
    from hooked_attnres.analysis import lens_hook_names
    from hooked_attnres.interventions import patch_sources

    model = case.model
    if not model.routing_layout.has_routers:
        with pytest.raises(ValueError, match="no routers"):
            patch_sources(model, "embedding", "zero", routers="attn_res", layers=2)
        return
    local = patch_sources(model, "embedding", "zero", routers="attn_res", layers=2)
    with model.hooks(fwd_hooks=local):
        _, cache = model.run_with_cache(case.clean)
        lens = routing_lens(model, cache)
        for layer in range(1, model.cfg.n_layers + 1):
            state = model(case.clean, stop_at_layer=layer)
            stream = model.final_res(state.sources) if case.routed_final else state.current
            expected = model.ln_final(stream) @ model.W_U
            assert torch.allclose(lens.logits[layer], expected, atol=1e-5), layer
        # the router did read the patched copy: the patch changed the run
        assert not torch.allclose(lens.logits[-1], case.logits, atol=1e-3)
    names = lens_hook_names(model)
    _, partial = model.run_with_cache(
        case.clean, names_filter=names, logit_positions=torch.tensor([3, 1])
    )
    with pytest.raises(ValueError, match="cover different numbers of positions.*logit_positions"):
        routing_lens(model, partial)


def test_routing_lens_names_the_hooks_a_cache_lacks(case):
    """Audit finding: a cache without a hook the lens reads raised a bare
    ``KeyError('blocks.0.hook_resid_mid')`` in the none and cumulative layouts (the kimi and
    full layouts named the hooks and what to do). A cache without the routers' inputs still
    serves ``routers=False``, which does not read them."""
    from hooked_attnres.analysis import lens_hook_names

    model = case.model
    _, cache = model.run_with_cache(case.clean, names_filter=lens_hook_names(model))
    with pytest.raises(KeyError, match=r"routing_lens's cache lacks \['blocks\.\d\.hook_"):
        routing_lens(model, cache, incl_mid=True)
    inputs = {site.hook("out") for site in model.sites() if not site.is_final}
    names = [name for name in lens_hook_names(model) if name not in inputs]
    _, cache = model.run_with_cache(case.clean, names_filter=names)
    lens = routing_lens(model, cache, routers=False)
    assert torch.allclose(lens.logits, routing_lens(model, case.cache).logits, atol=1e-5)
    if inputs:  # layouts with routers: routers=True reads them
        with pytest.raises(KeyError, match="routing_lens's cache lacks"):
            routing_lens(model, cache)


def test_a_logit_positions_run_refuses_a_pos_slice(case):
    """Audit 57: with a ``pos_slice`` every hook of a ``logit_positions`` run had the same
    number of positions (``pos_slice=-1``: one), so the refusal below, which compares
    them, let it through: the early layers' position was the sequence's last, the last
    layer's the answer position. A DLA of right-padded prompts (answer at position 3 of
    6) summed to 0.0094 for a logit difference of -0.2425 (3-layer kimi), 0.0183 for
    -0.0911 (layout none), the decomposition check passing on the padding it leaves out.
    ``run_with_cache`` refuses the pair (its caching hooks, in the pass: audit 60); either
    alone is taken."""
    model = case.model
    positions = torch.tensor([1, 3])
    for pos_slice in (-1, [0], (2, 4), Slice(-1)):
        with pytest.raises(ValueError, match=r"pos_slice.*logit_positions.*without pos_slice"):
            model.run_with_cache(case.clean, logit_positions=positions, pos_slice=pos_slice)
    logits, _ = model.run_with_cache(case.clean, logit_positions=positions, pos_slice=None)
    assert torch.allclose(logits, model(case.clean, logit_positions=positions), atol=1e-6)
    _, cut = model.run_with_cache(case.clean, pos_slice=-1)
    assert torch.equal(cut["ln_final.hook_scale"], case.cache["ln_final.hook_scale"][:, -1:])


def test_caching_hooks_with_a_pos_slice_refuse_a_logit_positions_pass(case):
    """Audit 60: the refusal of ``pos_slice`` with ``logit_positions`` (audit 57) read
    ``run_with_cache``'s arguments, so the same caching hooks made by
    ``get_caching_hooks(pos_slice=-1)`` around a ``logit_positions`` pass (``hooks()`` or
    ``run_with_hooks``) still cut the early layers at the sequence's last position and the
    last layer at the answer position: every hook one position, so the analyses took the
    cache. A DLA of right-padded prompts (answers at positions 1 and 3 of 6) summed to
    0.0109 for a logit difference of -0.0528 (3-layer kimi), -0.0153 for 0.0203 (none).
    The caching hook refuses a cut of a hook that does not see the whole sequence."""
    model = case.model
    tokens = torch.cat([case.clean, case.clean], dim=1)[:, :6]
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
    positions = torch.tensor([1, 3])
    for pos_slice in (-1, [0], (2, 4), Slice(-1)):
        cache, fwd, _ = model.get_caching_hooks(pos_slice=pos_slice)
        with pytest.raises(ValueError, match=r"pos_slice.*logit_positions.*without pos_slice"):
            with model.hooks(fwd_hooks=fwd):
                model(tokens, attention_mask=mask, logit_positions=positions)
        with pytest.raises(ValueError, match=r"pos_slice.*logit_positions.*without pos_slice"):
            model.run_with_hooks(
                tokens, attention_mask=mask, logit_positions=positions, fwd_hooks=fwd
            )
    # the model runs as before, and the same hooks cache a full pass as run_with_cache does
    logits = model(tokens, attention_mask=mask, logit_positions=positions)
    full = model(tokens, attention_mask=mask)
    torch.testing.assert_close(logits[:, 0], full[torch.arange(2), positions])
    cache, fwd, _ = model.get_caching_hooks(pos_slice=-1)
    with model.hooks(fwd_hooks=fwd):
        model(tokens, attention_mask=mask)
    _, expected = model.run_with_cache(tokens, attention_mask=mask, pos_slice=-1)
    assert cache.keys() == expected.cache_dict.keys()
    assert all(torch.equal(cache[name], expected[name]) for name in cache)
    # hooks before the last attention all see the whole sequence: taken
    _, early = model.run_with_cache(
        tokens,
        attention_mask=mask,
        logit_positions=positions,
        pos_slice=-1,
        names_filter="blocks.0.hook_resid_pre",
    )
    assert torch.equal(early["blocks.0.hook_resid_pre"], expected["blocks.0.hook_resid_pre"])


def test_residual_analyses_refuse_a_logit_positions_cache(case):
    """A logit_positions run caches its last layer at one position per prompt: stacking it
    with the earlier layers (pos_slice=-1 reads their last position, the last layer's
    answer position) gave a DLA that missed the logit difference of every prompt whose
    answer is not at the last position (0.09 vs -0.03 in layout none, float64). Every
    residual analysis refuses such a cache; the same prompts from a full run are exact."""
    model, cache = case.model, case.cache
    positions = torch.tensor([1, 3])
    _, partial = model.run_with_cache(case.clean, logit_positions=positions)
    answers, wrongs = torch.tensor([ANSWER, ANSWER]), torch.tensor([WRONG, WRONG])
    stack = cache.decompose_resid(pos_slice=-1, routed=True)
    calls = {
        "decompose_resid": lambda: partial.decompose_resid(pos_slice=-1, routed=True),
        "stack_head_results": lambda: partial.stack_head_results(pos_slice=-1, routed=True),
        "stack_neuron_results": lambda: partial.stack_neuron_results(
            model.cfg.n_layers, pos_slice=-1, routed=True
        ),
        "get_full_resid_decomposition": lambda: partial.get_full_resid_decomposition(
            pos_slice=-1, routed=True
        ),
        "apply_ln_to_stack": lambda: partial.apply_ln_to_stack(stack, pos_slice=-1, routed=True),
        "logit_attrs": lambda: partial.logit_attrs(
            stack, answers, wrongs, pos_slice=-1, routed=True
        ),
        "accumulated_resid": lambda: partial.accumulated_resid(pos_slice=-1, routed=True),
        "logit_lens": lambda: partial.logit_lens(),
        # the stacking helpers (the message blamed n_sources before)
        "stack_activation": lambda: partial.stack_activation("resid_post"),
    }
    if model.sites("mlp_res"):
        calls["stack_router_activation"] = lambda: partial.stack_router_activation(
            "weights", "mlp_res"
        )
    for method, call in calls.items():
        with pytest.raises(ValueError, match=rf"different numbers of positions.*cache\.{method}"):
            call()
    # the full run's numbers at the same answer positions are exact
    rows = torch.arange(2)
    full_stack = cache.decompose_resid(routed=True)[:, rows, positions]
    direction = model.tokens_to_residual_directions(answers) - model.tokens_to_residual_directions(
        wrongs
    )
    scale = cache["ln_final.hook_scale"][rows, positions]
    attrs = ((full_stack / scale) * direction).sum(-1)
    true = case.logits[rows, positions, ANSWER] - case.logits[rows, positions, WRONG]
    assert torch.allclose(attrs.sum(0), true, atol=ATOL)


def test_decompositions_refuse_a_cache_of_an_edited_run(case):
    """When the run edited a depth source (here hook_resid_pre of layer 1 halved) or a
    router's copy of its sources (patch_sources), the components weighted by the routing
    weights no longer sum to what the norm read; the decompositions gave such sums
    silently (kimi, final-router embedding source zeroed, float64: DLA 1.85 vs the true
    logit difference -0.017 on this kimi case's second prompt, audit 141). They refuse where the
    identity fails and stay exact where
    the edit did not reach (a local patch at layer 2 leaves the unembedding exact)."""
    model = case.model
    answers, wrongs = torch.tensor([ANSWER, ANSWER]), torch.tensor([WRONG, WRONG])
    halve = [("blocks.1.hook_resid_pre", lambda act, hook: act * 0.5)]
    with warnings.catch_warnings(), model.hooks(fwd_hooks=halve):
        warnings.simplefilter("ignore", RoutedResidualPatchWarning)
        _, edited = model.run_with_cache(case.clean)
    stack = case.cache.decompose_resid(pos_slice=-1, routed=True)
    for method, call in {
        "decompose_resid": lambda: edited.decompose_resid(routed=True),
        "stack_head_results": lambda: edited.stack_head_results(routed=True),
        "stack_neuron_results": lambda: edited.stack_neuron_results(
            model.cfg.n_layers, routed=True
        ),
        "get_full_resid_decomposition": lambda: edited.get_full_resid_decomposition(routed=True),
        "logit_attrs": lambda: edited.logit_attrs(
            stack, answers, wrongs, pos_slice=-1, routed=True
        ),
    }.items():
        with pytest.raises(ValueError, match=rf"cache\.{method}: .*do not sum.*edited"):
            call()
    if not model.routing_layout.has_routers:
        return
    from hooked_attnres.interventions import patch_sources

    local = patch_sources(model, "embedding", "zero", routers="attn_res", layers=2)
    with model.hooks(fwd_hooks=local):
        logits, patched = model.run_with_cache(case.clean)
    with pytest.raises(ValueError, match="layer 2's attention input.*do not sum"):
        patched.decompose_resid(2, routed=True)
    stack = patched.decompose_resid(pos_slice=-1, routed=True)
    attrs = patched.logit_attrs(stack, answers, wrongs, pos_slice=-1, routed=True)
    true = logits[:, -1, ANSWER] - logits[:, -1, WRONG]
    assert torch.allclose(attrs.sum(0), true, atol=ATOL)


def _cached_rms_analyses(cache, layer, mlp_input: bool, stack) -> dict:
    """The cache's analyses that divide by the cached RMS of the norm at ``(layer,
    mlp_input)`` (``layer=None``: ``ln_final``), by name; ``stack`` is a decomposition at
    position -1 there."""
    at = cache.model.cfg.n_layers if layer is None else layer
    answers, wrongs = torch.tensor([ANSWER, ANSWER]), torch.tensor([WRONG, WRONG])
    calls = {
        "decompose_resid": lambda: cache.decompose_resid(
            layer, mlp_input, apply_ln=True, routed=True
        ),
        "get_full_resid_decomposition": lambda: cache.get_full_resid_decomposition(
            layer, mlp_input, apply_ln=True, routed=True
        ),
        "stack_neuron_results": lambda: cache.stack_neuron_results(
            at, mlp_input=mlp_input, apply_ln=True, routed=True
        ),
        "apply_ln_to_stack": lambda: cache.apply_ln_to_stack(
            stack, layer, mlp_input, pos_slice=-1, routed=True
        ),
    }
    if not mlp_input:
        calls["stack_head_results"] = lambda: cache.stack_head_results(
            at, apply_ln=True, routed=True
        )
    if layer is None:
        calls["logit_attrs"] = lambda: cache.logit_attrs(
            stack, answers, wrongs, pos_slice=-1, routed=True
        )
    return calls


def test_analyses_dividing_by_a_cached_rms_refuse_a_cache_whose_norm_output_was_edited(case):
    """Audit 78 (property search over edited runs): a run that edited a norm's output
    (``hook_normalized``, here doubled) fed the unembedding (or the sublayer) another
    vector than the norm's input divided by its cached RMS, but the analyses that divide
    by that RMS did not look: ``logit_attrs`` summed to half the run's logit difference in
    every layout (kimi, float64: 0.24 off a difference of 0.48), and ``apply_ln=True``
    stacks summed to 2.4-3.1 away from what the norm output (a sum check of the stack
    passes: it reads the norm's input). They refuse now, as for an edit of the stream
    (`test_decompositions_refuse_a_cache_of_an_edited_run`); an edit of the RMS itself
    (``hook_scale``), which the norm divides by, leaves them exact."""
    model = case.model
    n_layers = model.cfg.n_layers
    direction = (model.W_U[:, ANSWER] - model.W_U[:, WRONG]) * model.ln_final.w
    for norm, layer in (("ln_final", None), ("blocks.1.ln1", 1), ("blocks.1.ln2", 1)):
        mlp_input = norm.endswith("ln2")
        point = 2 * n_layers if layer is None else 2 * layer + mlp_input
        double = [(f"{norm}.hook_normalized", lambda x, hook: 2 * x)]
        with model.hooks(fwd_hooks=double):
            logits, edited = model.run_with_cache(case.clean)
        # the stack still sums to what the norm read: the edit is after it
        stack = edited.decompose_resid(layer, mlp_input, pos_slice=-1, routed=True)
        target = edited.norm_input(point)[:, -1]
        assert torch.allclose(stack.sum(0), target, atol=ATOL)
        # by hand: the input over the cached RMS is not what the norm output
        scale = edited[f"{norm}.hook_scale"][:, -1]
        normalized = edited[f"{norm}.hook_normalized"][:, -1]
        assert (target / scale - normalized).abs().max() > 0.1
        if layer is None:  # the DLA of the stack is not the run's own logit difference
            true = logits[:, -1, ANSWER] - logits[:, -1, WRONG]
            assert not torch.allclose(((stack / scale) * direction).sum(-1).sum(0), true)
        for method, call in _cached_rms_analyses(edited, layer, mlp_input, stack).items():
            refusal = rf"cache\.{method}: .*{norm}\.hook_normalized"
            with warnings.catch_warnings(), pytest.raises(ValueError, match=refusal):
                warnings.simplefilter("ignore", UnfoldedNormWarning)
                call()
    # an edit of the RMS: the norm divides by the edited scale, so the DLA stays exact
    with model.hooks(fwd_hooks=[("ln_final.hook_scale", lambda x, hook: 2 * x)]):
        logits, rescaled = model.run_with_cache(case.clean)
    stack = rescaled.decompose_resid(pos_slice=-1, routed=True)
    attrs = _cached_rms_analyses(rescaled, None, False, stack)["logit_attrs"]()
    true = logits[:, -1, ANSWER] - logits[:, -1, WRONG]
    assert torch.allclose(attrs.sum(0), true, atol=ATOL)


def _runs_that_edited_ln_final(case):
    """``(hook, cache)`` of ``case.clean`` run with ``ln_final.hook_scale`` x1.5, then with
    ``ln_final.hook_normalized`` negated (``hook``: the fwd_hooks list), each checked by
    hand: ``ln_final`` applied to what it read is far from what the run unembedded."""
    model = case.model
    final = 2 * model.cfg.n_layers
    for name, factor in (("ln_final.hook_scale", 1.5), ("ln_final.hook_normalized", -1.0)):
        hook = [(name, lambda x, hook, factor=factor: factor * x)]
        with model.hooks(fwd_hooks=hook):
            logits, edited = model.run_with_cache(case.clean)
        by_hand = model.ln_final(edited.norm_input(final)) @ model.W_U + model.b_U
        assert (by_hand - logits).abs().max() > 0.3 * logits.abs().max()
        yield hook, edited


def test_readouts_that_apply_ln_final_refuse_a_run_that_edited_it(case):
    """Audit 82: the routing lens, ``accumulated_resid(apply_ln=True)`` at the unembedding
    and ``cache.logit_lens`` apply ``ln_final`` to the cached stream themselves (its RMS
    recomputed, its hooks not fired), so when the cached run edited ``ln_final`` their last
    entry was not that run's logits, silently, in every layout and wrap: with
    ``hook_scale`` times 1.5 the last entry was 1.5 times the logits (0.5 of their max
    off), with ``hook_normalized`` negated 2 times their max off; also for a lens of token
    ids run with such a hook attached. They refuse now (`_require_norm_output` with the
    RMS recomputed), naming the edit; the stream below ``ln_final``, which the message
    offers instead, is the unedited run's. A hook that only reads ``ln_final`` changes
    nothing."""
    from hooked_attnres.analysis import lens_hook_names

    model = case.model
    for hook, edited in _runs_that_edited_ln_final(case):
        # the stream below ln_final is the unedited run's (what the message offers)
        torch.testing.assert_close(
            edited.accumulated_resid(incl_mid=True, routed=True),
            case.cache.accumulated_resid(incl_mid=True, routed=True),
        )
        refusals = {
            "routing_lens": lambda cache=edited: routing_lens(model, cache),
            "cache.accumulated_resid(apply_ln=True)": lambda cache=edited: cache.accumulated_resid(
                apply_ln=True, routed=True
            ),
        }
        if not case.routed_final:  # refused in kimi / full anyway
            refusals["cache.logit_lens"] = lambda cache=edited: cache.logit_lens(positions=None)
        for label, call in refusals.items():
            match = rf"{re.escape(label)}: .*ln_final\.hook_normalized.*edited"
            with pytest.raises(ValueError, match=match):
                call()
        with model.hooks(fwd_hooks=hook), pytest.raises(ValueError, match="routing_lens: "):
            routing_lens(model, case.clean)  # its own pass, with the hook attached
        # a cache that cannot show the edit is refused by name
        names = [n for n in lens_hook_names(model) if n != "ln_final.hook_normalized"]
        with model.hooks(fwd_hooks=hook):
            _, partial = model.run_with_cache(case.clean, names_filter=names)
        with pytest.raises(KeyError, match=r"routing_lens.*ln_final\.hook_normalized"):
            routing_lens(model, partial)
    # without the edit: a pass with no other hook needs no ln_final hook in its cache
    _, plain = model.run_with_cache(case.clean, names_filter=names)
    torch.testing.assert_close(
        routing_lens(model, plain).logits[-1], case.logits, atol=ATOL, rtol=0
    )
    # a hook that reads ln_final: exact, the last entry is the plain run's logits
    seen = []
    watch = [("ln_final.hook_normalized", lambda x, hook: seen.append(hook.name))]
    with model.hooks(fwd_hooks=watch):
        lens = routing_lens(model, case.clean)
        _, watched = model.run_with_cache(case.clean)
    assert seen
    stack = watched.accumulated_resid(apply_ln=True, routed=True)
    for got in (lens.logits[-1], stack[-1] @ model.W_U + model.b_U):
        torch.testing.assert_close(got, case.logits, atol=ATOL, rtol=0)
    if not case.routed_final:
        tool = watched.logit_lens(positions=None).values[-1]
        torch.testing.assert_close(tool, case.logits, atol=ATOL, rtol=0)


def test_transformerlens_logit_lens_tool_refuses_a_cache_that_shows_an_edited_ln_final(case):
    """Audit 91: TransformerLens's ``logit_lens`` tool reads ``accumulated_resid(apply_ln=
    False)`` through the cache's ``apply_ln_to_stack(recompute_ln=True)``, which did not
    check, so ``logit_lens(model, cache=...)`` of a run that edited ``ln_final`` gave the
    unedited readout as its last entry (0.097 off logits of 0.19 with ``hook_scale`` x1.5,
    layout ``none``), silently. A cache that holds ``ln_final``'s hooks and shows the edit
    is refused now; an unedited run's last entry is its logits. Where a final router mixes
    the sources (kimi / full / the exact wrap) the tool refuses by its own single-stream
    check, and the same refusal of an edited run is that of the cache's
    ``apply_ln_to_stack(accumulated_resid(routed=True), recompute_ln=True)`` (audit 92)."""
    model = case.model
    routed = case.routed_final  # a final router mixes the sources before ln_final

    def readout(cache):  # the cache's own stack through the call the tool makes
        stack = cache.accumulated_resid(routed=routed)
        return cache.apply_ln_to_stack(stack, recompute_ln=True, routed=routed)[-1]

    if routed:
        with pytest.raises(ValueError, match="single-stream"):  # the tool's own check
            tl_logit_lens(model, cache=case.cache, positions=None)
    match = r"cache\.apply_ln_to_stack: .*ln_final\.hook_normalized.*edited"
    for _, edited in _runs_that_edited_ln_final(case):
        with pytest.raises(ValueError, match=match):
            readout(edited)
        if not routed:
            with pytest.raises(ValueError, match=match):
                tl_logit_lens(model, cache=edited, positions=None)
    torch.testing.assert_close(
        readout(case.cache) @ model.W_U + model.b_U, case.logits, atol=ATOL, rtol=0
    )
    if not routed:
        tool = tl_logit_lens(model, cache=case.cache, positions=None).values[-1]
        torch.testing.assert_close(tool, case.logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mlp_input", [False, True])
def test_accumulated_resid_below_the_unembedding_names_itself_refusing_an_edited_norm(mlp_input):
    """Audit 85: ``accumulated_resid(layer, apply_ln=True)`` below the unembedding (layout
    ``none``) divides every entry by that layer's cached ``ln1`` (``ln2``) RMS, so its
    last entry stands for what the norm output; with that norm's ``hook_normalized``
    edited it was refused by the `apply_ln_to_stack` it calls, naming
    ``cache.apply_ln_to_stack``, which the caller never called. It names itself now; an
    edit of the other norm of that layer is not read and leaves it exact."""
    model = _perturb_gains(tiny_model(attnres_layout="none", n_layers=3), seed=5)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 5), generator=torch.Generator().manual_seed(1))
    read, other = ("ln2", "ln1") if mlp_input else ("ln1", "ln2")
    with model.hooks(fwd_hooks=[(f"blocks.2.{read}.hook_normalized", lambda x, hook: 2 * x)]):
        _, edited = model.run_with_cache(tokens)
    match = rf"^cache\.accumulated_resid\(apply_ln=True\): .*blocks\.2\.{read}\.hook_normalized"
    with warnings.catch_warnings(), pytest.raises(ValueError, match=match):
        warnings.simplefilter("ignore", UnfoldedNormWarning)
        edited.accumulated_resid(2, apply_ln=True, mlp_input=mlp_input)
    with model.hooks(fwd_hooks=[(f"blocks.2.{other}.hook_normalized", lambda x, hook: 2 * x)]):
        _, unread = model.run_with_cache(tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnfoldedNormWarning)
        got = unread.accumulated_resid(2, apply_ln=True, mlp_input=mlp_input)
    stack = unread.accumulated_resid(2, mlp_input=mlp_input)  # by hand: over the cached RMS
    torch.testing.assert_close(got, stack / unread[f"blocks.2.{read}.hook_scale"])


@pytest.mark.parametrize("layout", ["none", "kimi"])
def test_readouts_of_an_unedited_run_whose_final_stream_overflowed_are_not_refused(layout):
    """Audit 85: in a float16 run whose last MLP overflowed, ``ln_final``'s input is inf at
    some real positions, so the norm output nan there (``inf / inf``), as the check's own
    input over RMS does; the check's max error was nan and the routing lens, ``logit_lens``
    and ``accumulated_resid(apply_ln=True)`` refused the unedited run, saying it edited
    ``ln_final`` (before b013ada the lens returned, its earlier
    entries finite, its last nan where the logits are: the lens is how one finds where a
    run overflows). A nan where both the run's output and the input over the RMS are nan is
    what the run read; a nan an edit wrote at a finite position is still refused."""
    model = tiny_model(attnres_layout=layout, n_layers=3, dtype=torch.float16)
    fp16_close = dict(atol=1e-3, rtol=0)  # float16 rounding of logits below 0.4
    with torch.no_grad():
        for param in model.blocks[2].mlp.parameters():
            param.mul_(450)
    tokens = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    logits, cache = model.run_with_cache(tokens)
    final = cache.norm_input(2 * model.cfg.n_layers)
    assert not final.isfinite().all() and not logits.isfinite().all()  # it overflowed
    assert cache["blocks.2.hook_resid_pre"].isfinite().all()  # below the last MLP: finite
    lens = routing_lens(model, tokens)
    torch.testing.assert_close(lens.logits[-1], logits, equal_nan=True, **fp16_close)
    # by hand: ln_final (its hooked forward, nothing attached) of each state below
    states = cache.accumulated_resid(routed=True)
    for entry, state in zip(lens.logits[:-1], states[:-1], strict=True):
        by_hand = model.ln_final(state) @ model.W_U + model.b_U
        assert entry.isfinite().all()
        torch.testing.assert_close(entry, by_hand, **fp16_close)
    stack = cache.accumulated_resid(apply_ln=True, routed=True)
    torch.testing.assert_close(stack[-1], model.ln_final(final), equal_nan=True, **fp16_close)
    if layout == "none":
        tool = cache.logit_lens(positions=None).values
        torch.testing.assert_close(tool[-1], logits, equal_nan=True, **fp16_close)
    # a nan written by an edit where the input is finite is refused
    real = final[..., 0].isfinite()
    nan_at_real = [
        ("ln_final.hook_normalized", lambda x, hook: x.masked_fill(real[..., None], float("nan")))
    ]
    with model.hooks(fwd_hooks=nan_at_real):
        _, edited = model.run_with_cache(tokens)
    with pytest.raises(ValueError, match=r"routing_lens: .*ln_final\.hook_normalized.*nan"):
        routing_lens(model, edited)


def test_analyses_dividing_by_ln_final_rms_name_it_when_a_names_filter_dropped_it(case):
    """Audit 85: a cache of a pass without other hooks whose ``names_filter`` dropped
    ``ln_final``'s hooks skips the norm-output check (it cannot have been edited), but
    ``logit_attrs`` and the ``apply_ln=True`` stacks at the unembedding divide by
    ``ln_final.hook_scale``: TransformerLens's lookup raised ``IndexError: index 3 is out
    of range`` (``blocks[n_layers]``), naming nothing. They name the hook now."""
    model = case.model
    _, cache = model.run_with_cache(case.clean, names_filter=lambda name: "ln_final" not in name)
    stack = cache.decompose_resid(pos_slice=-1, routed=True)
    answers, wrongs = torch.tensor([ANSWER, ANSWER]), torch.tensor([WRONG, WRONG])
    calls = {
        "logit_attrs": lambda: cache.logit_attrs(stack, answers, wrongs, pos_slice=-1, routed=True),
        "decompose_resid": lambda: cache.decompose_resid(apply_ln=True, routed=True),
        "apply_ln_to_stack": lambda: cache.apply_ln_to_stack(stack, pos_slice=-1, routed=True),
    }
    for method, call in calls.items():
        match = (
            rf"cache\.{method} \(it divides by the cached RMS\) lacks \['ln_final\.hook_scale'\]"
        )
        with pytest.raises(KeyError, match=match):
            call()


def test_head_and_neuron_stacks_refuse_a_cache_whose_sublayer_output_was_edited(case):
    """Audit finding: TransformerLens's head and neuron stacks read hook_z (or hook_result)
    and hook_post, not the sublayer output; a run that zero-ablated hook_attn_out or
    hook_mlp_out (the usual TransformerLens ablation) left the sum check of
    `test_decompositions_refuse_a_cache_of_an_edited_run` satisfied (it reads the sublayer
    outputs), and the stacks were returned silently: float64, get_full_resid_decomposition
    summed 0.045 away from what ln_final read (inputs of 0.078, recency wrap) with layer 1's
    attention output zeroed, up to 0.0022 with layer 0's MLP output zeroed, in every layout
    (re-measured in audit 141). They
    refuse now; the sublayer decompositions stay exact."""
    model = case.model
    target = _final_norm_input(case)
    n_layers = model.cfg.n_layers
    zero = [("blocks.0.hook_mlp_out", lambda act, hook: act * 0.0)]
    with warnings.catch_warnings(), model.hooks(fwd_hooks=zero):
        warnings.simplefilter("ignore", RoutedResidualPatchWarning)
        _, mlp_zeroed = model.run_with_cache(case.clean)
    neurons = r"layer 0's per-neuron results \(hook_post \* W_out\) do not sum to its "
    neurons += r"blocks\.0\.hook_mlp_out.*edited.*decompose_resid"
    for call in (
        lambda: mlp_zeroed.get_full_resid_decomposition(routed=True),
        lambda: mlp_zeroed.stack_neuron_results(n_layers, routed=True, neuron_slice=3),
        lambda: mlp_zeroed.stack_neuron_results(1, mlp_input=True, routed=True),
    ):
        with pytest.raises(ValueError, match=neurons):
            call()
    read = mlp_zeroed["ln_final.hook_normalized"] * mlp_zeroed["ln_final.hook_scale"]
    for stack in (
        mlp_zeroed.get_full_resid_decomposition(routed=True, expand_neurons=False),
        mlp_zeroed.decompose_resid(routed=True),
        mlp_zeroed.stack_head_results(routed=True, incl_remainder=True),
    ):
        assert torch.allclose(stack.sum(0), read, atol=ATOL)
    assert not torch.allclose(read, target, atol=ATOL)  # the ablation mattered
    model.set_use_attn_result(True)  # per-head results cached as hook_result
    try:
        zero = [("blocks.1.hook_attn_out", lambda act, hook: act * 0.0)]
        with warnings.catch_warnings(), model.hooks(fwd_hooks=zero):
            warnings.simplefilter("ignore", RoutedResidualPatchWarning)
            _, attn_zeroed = model.run_with_cache(case.clean)
    finally:
        model.set_use_attn_result(False)
    del attn_zeroed.cache_dict["blocks.0.attn.hook_result"]  # layer 0 from hook_z @ W_O
    heads = r"layer 1's per-head results \(hook_result\) do not sum to its "
    heads += r"blocks\.1\.hook_attn_out.*hook_z / hook_result"
    for call in (
        lambda: attn_zeroed.stack_head_results(routed=True),
        lambda: attn_zeroed.stack_head_results(2, routed=True, apply_ln=True),
        lambda: attn_zeroed.get_full_resid_decomposition(routed=True, expand_neurons=False),
        lambda: attn_zeroed.get_full_resid_decomposition(1, mlp_input=True, routed=True),
    ):
        with pytest.raises(ValueError, match=heads):
            call()
    assert attn_zeroed.stack_head_results(1, routed=True).shape[0] == model.cfg.n_heads
    read = attn_zeroed["ln_final.hook_normalized"] * attn_zeroed["ln_final.hook_scale"]
    assert torch.allclose(attn_zeroed.decompose_resid(routed=True).sum(0), read, atol=ATOL)
    # the weights changed after the run: an unedited cache's neurons are stale
    with torch.no_grad():
        model.blocks[1].mlp.W_out.mul_(2.0)
    try:
        with pytest.raises(ValueError, match="layer 1's per-neuron results.*weights changed"):
            case.cache.stack_neuron_results(n_layers, routed=True)
    finally:
        with torch.no_grad():
            model.blocks[1].mlp.W_out.div_(2.0)
    full = case.cache.get_full_resid_decomposition(routed=True)
    assert torch.allclose(full.sum(0), target, atol=ATOL)


def _norm_inputs(cache, model) -> dict:
    """What every norm normalises (read point -> scale * normalized), from its own hooks."""
    out = {}
    for layer in range(model.cfg.n_layers):
        for mlp_input, norm in ((False, "ln1"), (True, "ln2")):
            prefix = f"blocks.{layer}.{norm}"
            out[(layer, mlp_input)] = (
                cache[f"{prefix}.hook_normalized"] * cache[f"{prefix}.hook_scale"]
            )
    out[(None, False)] = cache["ln_final.hook_normalized"] * cache["ln_final.hook_scale"]
    return out


def test_a_filtered_cache_of_an_edited_run_is_exact_or_refused(case):
    """A names_filter that keeps the components but drops the norm's input skipped the
    check of `test_decompositions_refuse_a_cache_of_an_edited_run`: layout none, 3 layers,
    hook_resid_pre of layer 1 halved, float32: decompose_resid(2) summed to 0.028 away
    from what ln1 read (and 1.0 away after hook_resid_mid + 1), silently. Now a cache of
    a pass in which other hooks ran refuses when it cannot check; a cache of an unhooked
    pass stays exact. Left padding included."""
    model = case.model
    mask = torch.ones_like(case.clean)
    mask[1, :1] = 0
    halve = [("blocks.1.hook_resid_pre", lambda act, hook: act * 0.5)]

    def kept(name: str) -> bool:
        return name == "hook_embed" or name.endswith(("attn_out", "mlp_out", "hook_weights"))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RoutedResidualPatchWarning)
        with model.hooks(fwd_hooks=halve):
            _, full = model.run_with_cache(case.clean, attention_mask=mask)
        with model.hooks(fwd_hooks=halve):
            _, filtered = model.run_with_cache(case.clean, attention_mask=mask, names_filter=kept)
    _, unhooked = model.run_with_cache(case.clean, attention_mask=mask, names_filter=kept)
    assert filtered.other_hooks_attached and unhooked.other_hooks_attached is False
    edited_inputs = _norm_inputs(full, model)
    _, plain = model.run_with_cache(case.clean, attention_mask=mask)
    plain_inputs = _norm_inputs(plain, model)
    n_exact = 0
    n_layers = model.cfg.n_layers
    for (layer, mlp_input), target in edited_inputs.items():
        at = n_layers if layer is None else layer
        with pytest.raises(KeyError, match="other hooks than the caching ones were attached"):
            filtered.decompose_resid(layer, mlp_input, routed=True)
        with pytest.raises(KeyError, match="other hooks than the caching ones were attached"):
            filtered.stack_head_results(at, routed=True)
        if model.routing_layout.reader(2 * at + mlp_input) is None:
            # where no router reads, the unhooked cache needs nothing it dropped
            stack = unhooked.decompose_resid(layer, mlp_input, routed=True)
            assert torch.allclose(stack.sum(0), plain_inputs[(layer, mlp_input)], atol=ATOL)
            n_exact += 1
        try:  # the unfiltered cache of the edited run: exact or refused
            stack = full.decompose_resid(layer, mlp_input, routed=True)
        except ValueError as error:
            assert "do not sum" in str(error)
        else:
            assert torch.allclose(stack.sum(0), target, atol=ATOL)
    assert n_exact > 0 or model.routing_layout.has_final_router
    # TransformerLens leaves the embedding out of a cache without hook_embed
    _, no_embed = model.run_with_cache(
        case.clean, attention_mask=mask, names_filter=lambda name: name != "hook_embed"
    )
    for call in (
        lambda: no_embed.decompose_resid(routed=True),
        lambda: no_embed.get_full_resid_decomposition(routed=True),
    ):
        with pytest.raises(KeyError, match=r"sums the embedding\) lacks \['hook_embed'\]"):
            call()
    without, labels = no_embed.decompose_resid(routed=True, incl_embeds=False, return_labels=True)
    reference = plain.decompose_resid(routed=True, incl_embeds=False)
    assert "embed" not in labels and torch.allclose(without, reference)


# --- TransformerLens 4.3's analysis tools -----------------------------------------------
def test_transformerlens_direct_logit_attribution_tool_is_exact_or_refuses(case):
    """``transformer_lens.tools.analysis.direct_logit_attribution`` calls the cache's
    ``decompose_resid`` / ``stack_head_results`` / ``accumulated_resid`` / ``logit_attrs``
    without ``routed``: its attributions sum to the logit difference (``unit="layer"``: its
    last entry, the final stream, is it) where no final router mixes sources, and it raises
    the cache's refusal where one does."""
    answers, wrongs = torch.tensor([ANSWER, ANSWER]), torch.tensor([WRONG, WRONG])
    true_diff = case.logits[:, -1, ANSWER] - case.logits[:, -1, WRONG]
    for unit in ("component", "head", "layer"):

        def call(unit=unit):
            return direct_logit_attribution(case.model, case.clean, answers, wrongs, unit=unit)

        if case.routed_final and unit == "layer":
            with pytest.raises(ValueError, match=rf"'{case.layout}' layout.*routed=True"):
                call()
        elif case.routed_final:
            _refuses(call, case.layout)
        elif unit == "layer":
            assert torch.allclose(call().attribution[-1], true_diff, atol=ATOL)
        else:
            assert torch.allclose(call().attribution.sum(0), true_diff, atol=ATOL)


@pytest.mark.parametrize("layout", ["none", "kimi", "full"])
def test_transformerlens_node_attribution_patching_is_the_gradient_estimate(layout):
    """``attribution_patch`` (node granularity) scores each writer by ``(clean - corrupt) .
    d metric / d activation`` from backward hooks: equal to the same estimate from
    ``retain_grad`` on the hooked activations, in routed layouts too (float64)."""
    model = build(layout).double()
    clean = torch.randint(10, model.cfg.d_vocab, (1, 4), generator=torch.Generator().manual_seed(4))
    corrupt = clean.clone()
    corrupt[:, 1] = (corrupt[:, 1] + 5) % model.cfg.d_vocab

    def metric(logits):
        return logits[0, -1, ANSWER] - logits[0, -1, WRONG]

    scores = attribution_patch(model, clean, corrupt, metric).node_scores
    names = ["hook_embed"] + [
        get_act_name(name, layer)
        for layer in range(model.cfg.n_layers)
        for name in ("z", "mlp_out")
    ]
    _, clean_cache = model.run_with_cache(clean)
    acts = {}

    def keep(activation, hook):
        activation.retain_grad()
        acts[hook.name] = activation

    metric(model.run_with_hooks(corrupt, fwd_hooks=[(n, keep) for n in names])).backward()
    assert len(scores) == clean.shape[1] * (1 + model.cfg.n_layers * (model.cfg.n_heads + 1))
    for node, score in scores.items():
        act = acts[node.hook_name]
        effect = (clean_cache[node.hook_name] - act.detach()) * act.grad
        at = (0, node.position) if node.head is None else (0, node.position, node.head)
        assert abs(score - float(effect[at].sum())) < 1e-12, node


# --- depth-state patching ---------------------------------------------------------------
def test_depth_state_patching(case):
    model = case.model
    n_layers, n_pos = model.cfg.n_layers, case.clean.shape[1]
    for sublayer in ("attn", "mlp"):
        whole = get_act_patch_depth_state(
            model, case.corrupted, case.cache, case.metric, sublayer=sublayer
        )
        assert whole.shape == (n_layers,)
        assert torch.allclose(whole, torch.ones(n_layers), atol=1e-4), sublayer
    clean_metric = case.metric(case.logits)
    same = get_act_patch_depth_state_by_pos(model, case.clean, case.cache, case.metric)
    assert same.shape == (n_layers, n_pos)
    assert torch.allclose(same, torch.full((n_layers, n_pos), float(clean_metric)), atol=1e-4)
    by_pos = get_act_patch_depth_state_by_pos(
        model, case.corrupted, case.cache, case.metric, sublayer="mlp"
    )
    # independent: the states of both runs from depth_states, one position swapped by hand
    clean_states = model.depth_states(case.clean, sublayers=True)
    corrupted_states = model.depth_states(case.corrupted, sublayers=True)
    layer, pos = n_layers - 1, 1
    start = 2 * layer + 1
    sources = []
    pairs = zip(clean_states[start].sources, corrupted_states[start].sources, strict=True)
    for clean, corrupted in pairs:
        patched = corrupted.clone()
        patched[:, pos] = clean[:, pos]
        sources.append(patched)
    # a state built by hand resumes with an explicit mask (all ones: no padding here)
    state = DepthState(sources[:-1], sources[-1], corrupted_states[start].current_is_committed)
    ones = torch.ones_like(case.corrupted)
    expected = case.metric(model.forward_from(state, start, attention_mask=ones))
    assert torch.allclose(by_pos[layer, pos], expected, atol=1e-4)
    if case.layout == "none":  # the depth state is the residual stream
        resid = _run_tl(case, "get_act_patch_resid_pre")
        attn = get_act_patch_depth_state_by_pos(model, case.corrupted, case.cache, case.metric)
        assert torch.allclose(attn, resid, atol=1e-4)


# --- router hooks in TransformerLens helpers ----------------------------------------------
def test_stack_activation_on_router_hooks(case):
    cache, model = case.cache, case.model
    assert cache.stack_activation("resid_pre").shape == (
        model.cfg.n_layers,
        2,
        4,
        model.cfg.d_model,
    )
    # the layers below 0: none (TransformerLens's torch.stack of nothing raised)
    for name, sublayer in (("resid_pre", None), ("pattern", None), ("scale", "ln1")):
        empty = cache.stack_activation(name, 0, sublayer)
        assert empty.shape == (0, *cache[name, 0, sublayer].shape)
    if case.layout == "none":
        with pytest.raises(ValueError, match="no routers"):
            cache.stack_router_activation("weights")
        return
    counts = [model.routing_layout.n_sources(s) for s in model.sites("attn_res")]
    if len(set(counts)) > 1:
        with pytest.raises(ValueError, match="stack_router_activation"):
            cache.stack_activation("weights", sublayer_type="attn_res")
    for hook in ("weights", "sources", "scale", "logits"):
        stacked, mask = cache.stack_router_activation(hook, "attn_res", pad_value=-5.0)
        assert mask.tolist() == [[i < n for i in range(max(counts))] for n in counts]
        for layer, n in enumerate(counts):
            value = cache[model.site(layer, "attn_res").hook(hook)]
            axis = -1 if hook in ("weights", "logits") else -2
            assert torch.equal(stacked[layer].narrow(axis, 0, n), value)
            assert (stacked[layer].narrow(axis, n, max(counts) - n) == -5.0).all()
    out, _ = cache.stack_router_activation("out", "mlp_res")
    assert out.shape == (model.cfg.n_layers, 2, 4, model.cfg.d_model)


# --- fold_ln ----------------------------------------------------------------------------
def test_process_weights_keeps_logits_and_makes_scale_only_readouts_exact(case):
    _check_folding(build(case.name), case.clean)


@pytest.mark.parametrize("layout", ["none", "cumulative", "kimi", "full"])
def test_process_weights_unties_tied_embeddings(layout):
    model = tiny_model(attnres_layout=layout, n_layers=3, tie_word_embeddings=True)
    if layout != "none":
        randomize_routing(model, seed=6)
    _check_folding(_perturb_gains(model, seed=5), torch.randint(0, 50, (2, 4)))


def _check_folding(model: HookedAttnRes, tokens: torch.Tensor) -> None:
    before = model(tokens)
    routed = {"routed": True} if model.routing_layout.has_final_router else {}
    _, cache = model.run_with_cache(tokens)
    stack = cache.decompose_resid(**routed)
    model._unfolded_warned = False
    with pytest.warns(UnfoldedNormWarning, match="process_weights"):
        unfolded = cache.apply_ln_to_stack(stack, **routed).sum(0) @ model.W_U
    assert (unfolded - before).abs().max() > 1e-2  # the gain is missing before folding
    model.process_weights()
    assert model.cfg.layer_norm_folding and not model.cfg.tie_word_embeddings
    after = model(tokens)
    assert torch.allclose(after, before, atol=1e-5)
    for name, param in model.named_parameters():
        if name.endswith(("ln1.w", "ln2.w", "ln_final.w", "key_norm.w")):
            assert torch.equal(param, torch.ones_like(param)), name
    _, cache = model.run_with_cache(tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnfoldedNormWarning)
        scale_only = cache.apply_ln_to_stack(cache.decompose_resid(**routed), **routed)
    assert torch.allclose(scale_only.sum(0) @ model.W_U, before, atol=1e-4)
    model.process_weights()  # idempotent
    assert torch.allclose(model(tokens), before, atol=1e-5)


@pytest.mark.parametrize("name", CASES)
def test_process_weights_is_exact_in_float64_for_activations_and_analyses(name):
    """Folding is exact arithmetic reordered: in float64 every hook of the run (routing
    logits and weights, each router's key-norm RMS of the raw sources, q/k/v, the
    pre-gain ``hook_normalized``, the logits) agrees before and after to 1e-12, in every
    layout and wrap; folding a block's gain must not reach what its routers read. After
    folding, the scale-only readouts times the matrix that reads them give that matrix's
    output (``hook_q``, ``hook_pre``, ``hook_pre_linear``, the logits), and direct logit
    attribution and the routing lens stay exact."""
    model = build(name).to(torch.float64)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 6), generator=torch.Generator().manual_seed(7))
    logits, before = model.run_with_cache(tokens)
    model.process_weights()
    folded, after = model.run_with_cache(tokens)
    assert torch.allclose(folded, logits, rtol=0, atol=1e-12)
    assert sorted(after.keys()) == sorted(before.keys())
    for key in before.keys():
        assert torch.allclose(after[key], before[key], rtol=0, atol=1e-12), key
    # the scale-only readouts of the folded model are what each matrix reads
    routed = {"routed": True} if model.routing_layout.has_routers else {}
    for layer in range(model.cfg.n_layers):
        for mlp_input in (False, True):
            where = {"layer": layer, "mlp_input": mlp_input, **routed}
            read = after.apply_ln_to_stack(after.decompose_resid(**where), **where).sum(0)
            if mlp_input:
                pairs = [(read @ model.W_gate[layer], after["pre", layer])]
                pairs.append((read @ model.W_in[layer], after["pre_linear", layer]))
            else:
                pairs = [(torch.einsum("bpd,hde->bphe", read, model.W_Q[layer]), after["q", layer])]
            for got, expected in pairs:
                assert torch.allclose(got, expected, rtol=0, atol=1e-12), (layer, mlp_input)
    stack = after.decompose_resid(pos_slice=-1, **routed)
    readout = after.apply_ln_to_stack(stack, pos_slice=-1, **routed).sum(0) @ model.W_U
    assert torch.allclose(readout, logits[:, -1], rtol=0, atol=1e-12)
    answer, wrong = tokens[:, 0], tokens[:, 1]
    attrs = after.logit_attrs(stack, answer, wrong, pos_slice=-1, **routed)
    rows = torch.arange(2)
    expected = logits[rows, -1, answer] - logits[rows, -1, wrong]
    assert torch.allclose(attrs.sum(0), expected, rtol=0, atol=1e-12)
    assert torch.allclose(routing_lens(model, after).logits[-1], logits, rtol=0, atol=1e-12)


def test_process_weights_options():
    model = tiny_model(n_layers=2)
    with pytest.raises(ValueError, match="rotary"):
        model.process_weights(refactor_factored_attn_matrices=True)
    with pytest.raises(ValueError, match="LayerNorm"):
        model.fold_layer_norm(fold_biases=True)
    tokens = torch.randint(0, 50, (1, 5))
    before = model(tokens).log_softmax(-1)
    model.process_weights(center_unembed=True)
    assert torch.allclose(model.W_U.mean(-1), torch.zeros(model.cfg.d_model), atol=1e-6)
    assert torch.allclose(model(tokens).log_softmax(-1), before, atol=1e-5)
    tied = tiny_model(n_layers=2, tie_word_embeddings=True)
    assert torch.equal(tied.unembed(tied.embed.W_E[:1]), tied.embed.W_E[:1] @ tied.embed.W_E.T)
    with pytest.raises(ValueError, match="tied"):
        tied.process_weights(fold_ln=False, center_unembed=True)


# --- the pieces, and bad calls ------------------------------------------------------------
def test_layout_components_follow_the_schedule():
    layout = tiny_model(
        attnres_layout="cumulative", n_layers=2, attnres_num_blocks=2
    ).routing_layout
    assert layout.components(3) == [
        ["embed"],
        ["embed", "0_attn_out", "0_mlp_out"],
        ["embed", "0_attn_out", "0_mlp_out", "1_attn_out"],
    ]
    assert layout.reader(4) is None  # ln_final reads the stream itself
    kimi = tiny_model(attnres_layout="kimi", n_layers=2, attnres_num_blocks=1).routing_layout
    assert kimi.components(0) == [["embed"]]
    assert kimi.components(4) == [["embed"], ["0_attn_out", "0_mlp_out", "1_attn_out", "1_mlp_out"]]
    assert kimi.reader(4) == kimi.site(None, "final_res")
    with pytest.raises(ValueError, match=r"sublayer must be an integer in \[0, 4\]"):
        kimi.components(5)


def test_router_aliases_work_wherever_hook_names_do():
    model = randomize_routing(tiny_model(attnres_layout="kimi", n_layers=2))
    tokens = torch.randint(0, 50, (1, 5))
    alias = model.site(1, "mlp_res").alias("weights")
    assert alias == get_act_name("mlp_res_weights", 1) == "blocks.1.hook_mlp_res_weights"
    assert model.site(None, "final_res").alias("out") == "hook_final_res_out"
    seen = []
    model.run_with_hooks(tokens, fwd_hooks=[(alias, lambda x, hook: seen.append(hook.name))])
    assert seen == ["blocks.1.mlp_res.hook_weights"]
    _, cache = model.run_with_cache(tokens, names_filter=[alias, "hook_final_res_out"])
    assert set(cache.keys()) == {"blocks.1.mlp_res.hook_weights", "final_res.hook_out"}
    assert torch.equal(cache["final_res_out"], cache["final_res.hook_out"])
    with pytest.raises(KeyError):
        model.run_with_cache(tokens, names_filter="blocks.7.hook_mlp_res_weights")


def test_bad_calls_name_what_to_do():
    model = randomize_routing(tiny_model(attnres_layout="full", n_layers=2))
    tokens = torch.randint(0, 50, (2, 4))
    logits, cache = model.run_with_cache(tokens)

    def metric(logits):
        return logits[:, -1, 0].mean()

    with pytest.raises(
        ValueError, match=r"^sublayer must be one of \('attn', 'mlp'\), got 'final'$"
    ):
        get_act_patch_depth_state(model, tokens, cache, metric, sublayer="final")
    with pytest.raises(ValueError, match=r"\[batch, pos\]"):
        get_act_patch_depth_state(model, tokens[0], cache, metric)
    _, partial = model.run_with_cache(tokens, names_filter="hook_embed")
    with pytest.raises(KeyError, match="hook_sources"):
        get_act_patch_depth_state(model, tokens, partial, metric)
    with pytest.raises(ValueError, match="final router has none"):
        router_patch_index(model, "final_res")
    with pytest.raises(ValueError, match="n_pos"):
        router_patch_index(model, "attn_res", "weights", ("layer", "pos", "source"))
    with pytest.raises(ValueError, match="start with 'layer'"):
        router_patch_index(model, "attn_res", "weights", ("pos",))
    # an axis twice made a redundant axis (a [layer, pos, pos] grid, or index_df rows
    # with a repeated source column) silently
    with pytest.raises(ValueError, match=r"index_axis_names repeats \['pos'\]"):
        router_patch_index(model, "attn_res", "weights", ("layer", "pos", "pos"))
    with pytest.raises(ValueError, match=r"index_axis_names repeats \['source'\]"):
        router_patch_index(model, "attn_res", "weights", ("layer", "source", "source"))
    with pytest.raises(ValueError, match="index_axis_names is empty"):
        router_patch_index(model, "attn_res", "weights", ())
    with pytest.raises(ValueError, match=r"hook must be one of \(.*'hook_out'\), got 'bogus'"):
        cache.stack_router_activation("bogus")
    with pytest.raises(ValueError, match="router must be one of"):
        cache.stack_router_activation("weights", "final_res")
    with pytest.raises(ValueError, match="mlp_input=True needs a layer below"):
        cache.decompose_resid(layer=None, mlp_input=True, routed=True)
    with pytest.raises(KeyError, match="final_res.hook_weights"):
        partial.decompose_resid(routed=True)
    with pytest.raises(ValueError, match="another model"):
        routing_lens(tiny_model(attnres_layout="full", n_layers=2), cache)
    model.train()
    with pytest.raises(ValueError, match="eval mode"):
        get_act_patch_depth_state(model, tokens, cache, metric)


@pytest.mark.parametrize("layout", ["cumulative", "kimi", "full"])
def test_head_results_from_set_use_attn_result_decompose_exactly(layout):
    """With ``set_use_attn_result`` the cache holds ``hook_result``, which TransformerLens's
    head stacks read: the routed decomposition weights it like ``hook_z``."""
    model = randomize_routing(tiny_model(attnres_layout=layout))
    tokens = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    routed = layout != "cumulative"
    stacks = []
    for flag in (False, True):
        model.set_use_attn_result(flag)
        _, cache = model.run_with_cache(tokens)
        assert ("blocks.0.attn.hook_result" in cache) is flag
        full = cache.get_full_resid_decomposition(expand_neurons=False, routed=routed)
        target = cache["ln_final.hook_normalized"] * cache["ln_final.hook_scale"]
        assert torch.allclose(full.sum(0), target, atol=ATOL)
        stacks.append(cache.stack_head_results(layer=-1, routed=routed))
    model.set_use_attn_result(False)
    assert torch.allclose(stacks[0], stacks[1], atol=ATOL)


def test_a_folded_model_saves_and_loads_as_folded(tmp_path):
    model = randomize_routing(tiny_model(attnres_layout="kimi"))
    tokens = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(3))
    before = model(tokens)
    model.process_weights()
    model.save_pretrained(tmp_path / "folded")
    loaded = type(model).from_pretrained(tmp_path / "folded")
    assert loaded.cfg.layer_norm_folding is True
    assert torch.allclose(loaded(tokens), before, atol=1e-5)


@pytest.mark.parametrize("layout", ["kimi", "full", "cumulative", "none"])
def test_a_float16_cache_of_an_edited_run_is_refused_at_float16_rounding(layout):
    """Audit finding (low precision): `_require_decomposable` allowed 5e-2 of the norm
    input's largest entry in bfloat16 and float16 alike, about 50 times float16's rounding of a
    4-layer model's partial sums, so a float16 cache of a run that nudged what ln_final
    reads by 2 % was decomposed silently (the components missed the norm input by 2 %).
    The float16 tolerance now grows with float16's eps and the number of components."""
    model = tiny_model(attnres_layout=layout)
    if layout != "none":
        randomize_routing(model, seed=1)
    model = model.eval().to(torch.float16)
    tokens = torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(0))
    noise = torch.randn(3, 9, model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    noise = noise / noise.abs().max()
    point = 2 * model.cfg.n_layers  # the unembedding
    read = "final_res.hook_out" if layout in ("kimi", "full") else "blocks.3.hook_resid_post"

    def nudge(act, hook):  # 2 % of the largest entry of what ln_final reads
        return act + (0.02 * act.abs().max() * noise).to(act.dtype)

    def miss(cache) -> float:  # float64, from the public routed coefficients
        target = cache.norm_input(point).double()
        total = torch.zeros_like(target)
        for label, c in cache.routed_coefficients(point).items():
            name = "hook_embed" if label == "embed" else "blocks." + label.replace("_", ".hook_", 1)
            weight = c.double()[..., None] if isinstance(c, torch.Tensor) else c
            total += weight * cache[name].double()
        return float((total - target).abs().max() / target.abs().max())

    _, clean = model.run_with_cache(tokens)
    with warnings.catch_warnings(), model.hooks(fwd_hooks=[(read, nudge)]):
        warnings.simplefilter("ignore", RoutedResidualPatchWarning)
        _, edited = model.run_with_cache(tokens)
    assert miss(clean) < 2e-3  # float16 rounding of the unedited run
    assert 10 * miss(clean) < miss(edited) < 5e-2  # under the old tolerance
    clean.decompose_resid(routed=True)
    with pytest.raises(ValueError, match=r"cache\.decompose_resid: .*do not sum.*edited"):
        edited.decompose_resid(routed=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["kimi", "full", "cumulative", "none", "wrap_exact"])
@torch.no_grad()
def test_half_precision_decompositions_add_no_rounding_of_their_own(case, dtype):
    """Audit finding (low precision): in a bfloat16 / float16 model the routed views
    multiplied every cached component by its routing coefficient in the model's dtype
    (the float32 weights rounded to 8 bits, then the product), `logit_attrs` dotted with
    ``W_U[:, t] * ln_final.w`` rounded to 8 bits, the head stacks' remainder and the
    projected neuron stacks were computed in bfloat16: routed ``decompose_resid(apply_ln)``
    1.3e-2 off on entries of 3.4 (full; 1.1e-2 of the model's own 1.8e-2 in the exact wrap),
    ``logit_attrs`` 4.3e-3 on 1.1 (exact wrap). They now widen the cached activations and
    the weights (exact) and compute in float32: against the same cache post-processed by
    hand in float64, the error is float32's."""
    model = build(case).to(dtype).eval()
    warnings.simplefilter("ignore", UnfoldedNormWarning)  # the hand computation divides too
    tokens = torch.randint(
        10, model.cfg.d_vocab, (3, 7), generator=torch.Generator().manual_seed(5)
    )
    answers = torch.tensor([11, 12, 13])
    _, cache = model.run_with_cache(tokens)
    point = 2 * model.cfg.n_layers  # the unembedding
    coefficients = cache.routed_coefficients(point)
    n_heads = model.cfg.n_heads

    def weighted(label: str, value: torch.Tensor) -> torch.Tensor:  # float64, by hand
        c = coefficients[label]
        c = (
            c.double().reshape(*c.shape, *([1] * (value.ndim - c.ndim)))
            if torch.is_tensor(c)
            else c
        )
        return c * value

    checked = []

    def close(ours: torch.Tensor, hand: torch.Tensor) -> None:
        checked.append((float((ours.double() - hand).abs().max() / hand.abs().max()), ours.dtype))

    scale = cache["ln_final.hook_scale"].double()
    stack, labels = cache.decompose_resid(routed=True, return_labels=True)
    hand = torch.stack([weighted(lab, cache[_tl_name(lab)].double()) for lab in labels])
    close(stack, hand)
    close(cache.decompose_resid(routed=True, apply_ln=True), hand / scale)
    directions = (model.W_U.double()[:, answers] * model.ln_final.w.double()[:, None]).T[:, None]
    close(cache.logit_attrs(stack, answers, routed=True), (hand / scale * directions).sum(-1))
    heads = []
    for layer in range(model.cfg.n_layers):
        w_o = model.blocks[layer].attn.W_O.double()
        result = torch.einsum("bphd,hdm->bphm", cache["z", layer].double(), w_o)
        heads.append(weighted(f"{layer}_attn_out", result).movedim(-2, 0))
    heads = torch.cat(heads)
    remainder = cache.norm_input(point).double() - heads.sum(0)
    close(
        cache.stack_head_results(routed=True, incl_remainder=True),
        torch.cat([heads, remainder[None]]),
    )
    onto = directions[0, 0].to(dtype)  # a projection in the model's dtype
    neurons = []
    for layer in range(model.cfg.n_layers):
        w_out = model.blocks[layer].mlp.W_out.double() @ onto.double()  # [d_mlp]
        neurons.append(
            weighted(f"{layer}_mlp_out", cache["post", layer].double() * w_out).movedim(-1, 0)
        )
    projected = cache.stack_neuron_results(
        model.cfg.n_layers,
        apply_ln=True,
        project_output_onto=onto,
        routed=True,
    )
    close(projected, torch.cat(neurons) / scale.squeeze(-1))
    full = cache.get_full_resid_decomposition(
        routed=True, expand_neurons=False, project_output_onto=onto
    )
    assert max(error for error, _ in checked) < 1e-5  # float32 rounding (was 8 / 11 bits)
    assert {dtype for _, dtype in checked} == {torch.float32}
    assert full.dtype == torch.float32
    assert full.shape[0] == n_heads * model.cfg.n_layers + model.cfg.n_layers + 2


def _tl_name(label: str) -> str:
    """The hook of a ``decompose_resid`` label (``embed``, ``{l}_attn_out``, ``{l}_mlp_out``)."""
    if label == "embed":
        return "hook_embed"
    layer, name = label.split("_", 1)
    return get_act_name(name, int(layer))


@pytest.mark.parametrize("raw", [False, True])
def test_a_backward_hook_does_not_count_as_another_hook(raw):
    """A backward hook (a TransformerLens ``bwd`` hook, e.g. for gradient caching, or a raw
    ``register_full_backward_hook``) cannot change a forward pass, but counted as another
    hook attached: every decomposition of a filtered cache of an unedited pass refused
    with KeyError while it was attached. It does not count now, and the filtered cache's
    decompositions equal those of a full cache of the same pass."""
    model = randomize_routing(tiny_model(attnres_layout="none", n_layers=3)).double().eval()
    tokens = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))

    def kept(name: str) -> bool:
        return name == "hook_embed" or name.endswith(("attn_out", "mlp_out", "hook_z"))

    point = model.blocks[1].hook_resid_pre
    if raw:
        handle = point.register_full_backward_hook(lambda module, grad_in, grad_out: None)
    else:
        model.add_hook(point.name, lambda grad, hook: None, dir="bwd")
    try:
        _, filtered = model.run_with_cache(tokens, names_filter=kept)
    finally:
        handle.remove() if raw else model.reset_hooks()
    _, full = model.run_with_cache(tokens)
    assert filtered.other_hooks_attached is False
    for got, expected in (
        (filtered.decompose_resid(2), full.decompose_resid(2)),
        (filtered.stack_head_results(2), full.stack_head_results(2)),
    ):  # the hooked path ran with the hook attached: float64 rounding apart
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("pre_hook", [False, True])
def test_a_raw_pytorch_hook_counts_as_another_hook(pre_hook):
    """A forward hook attached with ``register_forward_hook`` (not ``add_hook``) edits the
    stream unseen by a first version that counted TransformerLens hook calls: the record
    said no other hook and the filtered cache's decompose_resid(2) summed 0.039 away from
    what ln1 read (layout none, float64) with blocks.1.hook_resid_pre halved."""
    model = randomize_routing(tiny_model(attnres_layout="none", n_layers=3)).double().eval()
    tokens = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))

    def kept(name: str) -> bool:
        return name == "hook_embed" or name.endswith(("attn_out", "mlp_out"))

    point = model.blocks[1].hook_resid_pre
    if pre_hook:
        handle = point.register_forward_pre_hook(lambda module, args: (args[0] * 0.5,))
    else:
        handle = point.register_forward_hook(lambda module, args, out: out * 0.5)
    try:
        _, full = model.run_with_cache(tokens)
        _, filtered = model.run_with_cache(tokens, names_filter=kept)
    finally:
        handle.remove()
    read = full["blocks.2.ln1.hook_normalized"] * full["blocks.2.ln1.hook_scale"]
    unedited = model.run_with_cache(tokens, names_filter=kept)[1]
    assert unedited.other_hooks_attached is False  # TransformerLens hooks of the cache only
    assert (unedited.decompose_resid(2).sum(0) - read).abs().max() > 1e-3  # the edit matters
    assert filtered.other_hooks_attached is True
    with pytest.raises(KeyError, match="other hooks than the caching ones were attached"):
        filtered.decompose_resid(2)


def test_logit_attrs_reads_pos_answers_per_position_unless_of_the_batch_length(case):
    """A 1-D answer tensor is read per prompt where its length is the stack's rows (also
    where rows equal positions, as TransformerLens reads it) and per position otherwise
    (TransformerLens's documented form), except where its length is the cache's batch
    against a stack that does not hold all its rows: those may be the whole batch's
    answers, and are refused naming ``[1, pos]``. Audit 57 had refused every ``[pos]`` no
    longer than the batch (2 answers with ``batch_slice=[0]``, 3 prompts of 2 positions),
    which also refused the documented form for any batch of at least as many prompts as
    positions; those are read per position again, checked against the logits."""
    routed = {"routed": True} if case.routed_final else {}
    three = torch.cat([case.clean, case.corrupted[:1]])[:, :3]  # 3 prompts, 3 positions
    logits, cache = case.model.run_with_cache(three)
    stack = cache.decompose_resid(**routed)  # [n, 3, 3, d_model]
    answers, wrongs = torch.tensor([ANSWER, 11, 13]), torch.tensor([WRONG, 12, 14])
    refusal = r"tokens of shape \(3,\).*the cache's batch \(3\).*\[1, pos\]"
    for kwargs in ({"batch_slice": [0]}, {"batch_slice": 0}, {"batch_slice": (1, 3)}):
        with pytest.raises(ValueError, match=refusal):
            cache.logit_attrs(stack, answers, wrongs, **kwargs, **routed)
    with pytest.raises(ValueError, match=refusal):  # one prompt's stack, no batch axis
        cache.logit_attrs(
            stack[:, 0], answers, wrongs, batch_slice=0, has_batch_dim=False, **routed
        )
    per_pos = logits[:, range(3), answers] - logits[:, range(3), wrongs]  # [batch, pos]
    attrs = cache.logit_attrs(stack, answers[None], wrongs[None], batch_slice=[0], **routed)
    assert torch.allclose(attrs.sum(0), per_pos[:1], atol=ATOL)
    # the whole batch's stack: 3 answers are its rows' (per prompt, at every position)
    attrs = cache.logit_attrs(stack, answers, wrongs, **routed)
    rows = torch.arange(3)[:, None]
    by_hand = logits[rows, :, answers[:, None]] - logits[rows, :, wrongs[:, None]]
    assert torch.allclose(attrs.sum(0), by_hand[:, 0], atol=ATOL)
    # 2 positions, fewer than the batch's 3 prompts: [pos] is per position, every row
    two = stack[:, :, :2]
    attrs = cache.logit_attrs(two, answers[:2], wrongs[:2], pos_slice=(0, 2), **routed)
    assert torch.allclose(attrs.sum(0), per_pos[:, :2], atol=ATOL)
    attrs = cache.logit_attrs(
        two[:, :1], answers[:2], wrongs[:2], batch_slice=[0], pos_slice=(0, 2), **routed
    )
    assert torch.allclose(attrs.sum(0), per_pos[:1, :2], atol=ATOL)
    # 2 rows with 2 answers: per prompt, as TransformerLens reads rows == positions
    attrs = cache.logit_attrs(
        two[:, :2], answers[:2], wrongs[:2], batch_slice=[0, 1], pos_slice=(0, 2), **routed
    )
    assert torch.allclose(attrs.sum(0), by_hand[:2, 0, :2], atol=ATOL)


def test_logit_attrs_takes_lists_and_strings_for_both_token_arguments(case):
    """Audit 57: TransformerLens 4.3 crashed on list ``tokens`` with ``incorrect_tokens``
    (``AttributeError: 'list' object has no attribute 'shape'``, in its shape check).
    Lists (and tuples, NumPy integers, and a string of one token, as TransformerLens takes)
    are read as the tensors they hold, for both arguments; a list of strings is refused
    naming ``to_single_token``."""
    import numpy as np

    routed = {"routed": True} if case.routed_final else {}
    logits, cache = case.logits, case.cache  # 2 prompts, 4 positions
    stack = cache.decompose_resid(**routed)  # [n, 2, 4, d_model]
    rows = torch.arange(2)[:, None]
    answers, wrongs = [ANSWER, 11], [WRONG, 12]
    by_hand = logits[rows, :, torch.tensor(answers)[:, None]]
    by_hand = by_hand - logits[rows, :, torch.tensor(wrongs)[:, None]]  # [2, 1, pos]
    for pair in (
        (answers, wrongs),
        (tuple(answers), tuple(wrongs)),
        (answers, torch.tensor(wrongs)),
    ):
        attrs = cache.logit_attrs(stack, *pair, **routed)
        assert torch.allclose(attrs.sum(0), by_hand[:, 0], atol=ATOL)
    attrs = cache.logit_attrs(stack, answers, **routed)  # no incorrect tokens
    assert torch.allclose(
        attrs.sum(0), logits[rows, :, torch.tensor(answers)[:, None]][:, 0], atol=ATOL
    )
    per_pos = [[ANSWER, 11, 13, 14]], [[WRONG, 12, 15, 16]]  # [1, pos]
    attrs = cache.logit_attrs(stack, *per_pos, **routed)
    by_pos = logits[:, range(4), per_pos[0][0]] - logits[:, range(4), per_pos[1][0]]
    assert torch.allclose(attrs.sum(0), by_pos, atol=ATOL)
    attrs = cache.logit_attrs(stack, np.int64(ANSWER), np.int64(WRONG), **routed)
    assert torch.allclose(attrs.sum(0), logits[..., ANSWER] - logits[..., WRONG], atol=ATOL)
    with pytest.raises(TypeError, match=r"tokens.*to_single_token"):
        cache.logit_attrs(stack, ["a", "b"], **routed)


def test_cache_keys_and_layers_out_of_range_are_refused_saying_why():
    """Audit 138: ``cache["resid_pre", -99]`` failed with TransformerLens's ``KeyError:
    'blocks.-95.hook_resid_pre'``, a misspelt name with a bare ``KeyError`` of the name,
    and ``accumulated_resid(layer=99)`` / ``layer="1"`` with ``KeyError:
    'blocks.5.hook_resid_pre'`` / a bare ``AssertionError``."""
    model = tiny_model()  # 4 layers
    _, cache = model.run_with_cache(torch.tensor([[1, 2, 3]]))
    for layer in (99, -99, 4, -5):
        with pytest.raises(HookKeyError, match=rf"layer {layer} of .* is not in \[-4, 4\)") as info:
            cache["resid_pre", layer]
        # TransformerLens's name of the key as args[0], as every refused hook name (it was
        # the whole message, printed in quotes)
        assert info.value.args == (f"blocks.{layer}.hook_resid_pre",)
    assert torch.equal(cache["resid_pre", -1], cache["blocks.3.hook_resid_pre"])  # control
    with pytest.raises(KeyError, match=r"is not in this cache: .*Did you mean \['blocks.0.hook_r"):
        cache["blocks.0.hook_resid_pree"]
    with pytest.raises(KeyError, match=r"Did you mean \['blocks.2.attn_res.hook_weights'"):
        cache["weights", 2, "attn"]
    for layer in (99, "1", -2):
        with pytest.raises(ValueError, match=r"^layer must be an integer in \[0, 4\] \(or -1 / "):
            cache.accumulated_resid(layer=layer)


def test_a_missing_cache_key_writes_its_suggestions_only_when_shown(monkeypatch):
    """Review of audit 138: a misspelt key's "Did you mean" ran difflib over every hook
    name at the raise, so code that tests membership by catching the KeyError (TransformerLens
    code trying ``cache["hook_pos_embed"]``, or a router alias on layout "none") paid it on
    every miss: 3 ms on the tiny model, 10 to 40 ms on a 28-layer one (964 hook names), where
    the bare KeyError took microseconds. The suggestions are now written when the message is
    read; the exception is still a KeyError with the same message."""
    model = tiny_model(attnres_layout="none")
    _, cache = model.run_with_cache(torch.tensor([[1, 2, 3]]))
    calls = []
    check = model.check_hook_name
    monkeypatch.setattr(model, "check_hook_name", lambda name: calls.append(name) or check(name))
    for key in ("hook_pos_embed", "blocks.0.hook_resid_pree", ("attn_res_weights", 1)):
        try:
            cache[key]
        except KeyError:
            pass
    assert calls == []  # no suggestions computed for a miss nobody reads
    with pytest.raises(KeyError) as caught:
        cache["blocks.0.hook_resid_pree"]
    assert caught.value.args == ("blocks.0.hook_resid_pree",)  # the name, as TransformerLens's
    assert calls == []
    assert re.search(r"is not in this cache: .*Did you mean \['blocks.0.hook_r", str(caught.value))
    assert calls == ["blocks.0.hook_resid_pree"]
    sent = pickle.loads(pickle.dumps(caught.value))  # to another process: no model
    # the name and the message (a KeyError of the message until audit 174), its class
    # kept (a HookKeyError until review 181: ``except UnknownCacheKeyError`` missed it)
    assert type(sent) is UnknownCacheKeyError and sent.args == ("blocks.0.hook_resid_pree",)
    assert str(sent) == str(caught.value) == sent.message and sent.model is None
    assert isinstance(sent, HookKeyError)
    # a hook the cache lacks (names_filter): no suggestions, a KeyError of the name that
    # says why it is missing (the bare KeyError until audit 159)
    _, some = model.run_with_cache(
        torch.tensor([[1, 2, 3]]), names_filter="blocks.0.hook_resid_post"
    )
    before = list(calls)
    with pytest.raises(
        KeyError, match=r"^'blocks.1.hook_resid_pre' is not in this cache: the pass"
    ):
        some["resid_pre", 1]
    assert calls == before  # no suggestions computed


def test_every_error_and_warning_of_the_model_is_exported():
    """Review 170: `UncachedHookError` (audit 159) and `UnknownCacheKeyError` (audit 138),
    the cache's ``KeyError`` subclasses, were the only exception classes of
    ``hooked_attnres.model`` not exported from ``hooked_attnres`` (as `UnknownHookError`
    and `UnfoldedNormWarning` are), so code could not ``except`` them by import. Every
    exception or warning class defined in a module of ``hooked_attnres.model`` is in both
    ``__all__``s, and the class a miss raises is the exported one."""
    import importlib
    import inspect
    import pkgutil

    import hooked_attnres
    import hooked_attnres.model as model_package

    defined = set()
    for info in pkgutil.iter_modules(model_package.__path__):
        module = importlib.import_module(f"hooked_attnres.model.{info.name}")
        for name, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == module.__name__
            ):
                defined.add(name)
    assert {"UncachedHookError", "UnknownCacheKeyError"} <= defined
    for package in (hooked_attnres, model_package):
        assert defined <= set(package.__all__), defined - set(package.__all__)
        assert all(getattr(package, name) is not None for name in defined)
    model = tiny_model()
    _, some = model.run_with_cache(
        torch.tensor([[1, 2, 3]]), names_filter="blocks.0.hook_resid_post"
    )
    with pytest.raises(hooked_attnres.UncachedHookError):
        some["resid_pre", 1]
    with pytest.raises(hooked_attnres.UnknownCacheKeyError):
        some["blocks.0.hook_resid_pree"]


def test_a_hook_an_analysis_lacks_is_one_uncached_hook_error():
    """Review 170: a hook a cache lacks was refused in two wordings of one remedy, by two
    types: `UncachedHookError` (audit 159: ``cache[name]`` and TransformerLens's methods,
    a ``KeyError`` of the name) and `require_cached` (routing_lens, the decompositions'
    checks, patching's clean cache: a plain ``KeyError`` whose ``args[0]`` was its message,
    "... lacks [...]; run model.run_with_cache(tokens) without a names_filter that drops
    them ..."). Both are now `UncachedHookError`: ``args[0]`` the (first) name, one
    sentence of cause and remedy, the reader named where an analysis refuses; it survives
    pickling (another process) with its message."""
    from hooked_attnres import UncachedHookError

    model = tiny_model()
    _, some = model.run_with_cache(
        torch.tensor([[1, 2, 3]]), names_filter="blocks.0.hook_resid_post"
    )
    with pytest.raises(UncachedHookError) as indexed:
        some["resid_pre", 1]
    with pytest.raises(UncachedHookError) as analysed:
        routing_lens(model, some)
    lens = analysed.value
    assert lens.args[0] == lens.missing[0] and lens.args[0] not in some.cache_dict
    assert all(name in model.hook_dict and name not in some.cache_dict for name in lens.missing)
    cause = (
        ": the pass that made it did not cache {} (a names_filter dropped {}, or a "
        "stop_at_layer stopped before {}). Run model.run_with_cache(tokens) without them"
    )
    assert str(indexed.value) == "'blocks.1.hook_resid_pre' is not in this cache" + (
        cause.format("that hook", "it", "it")
    )
    assert str(lens) == f"routing_lens's cache lacks {lens.missing[:3]} ..." + cause.format(
        "those hooks", "them", "them"
    )
    for error in (indexed.value, lens):
        sent = pickle.loads(pickle.dumps(error))
        assert type(sent) is UncachedHookError and str(sent) == str(error)
        assert error.message == sent.message == str(error)  # None until review 181
        assert sent.args == error.args

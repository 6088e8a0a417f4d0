"""The TransformerLens model methods beyond hooks and caches: generate (with a key-value
cache), left padding and attention masks, the optional hooks (set_use_*), tokenizer
helpers, tl_parameters / SVDInterpreter, detect_head, test_prompt, cfg.dtype / cfg.device.

Every number is checked against an independent computation (full forward passes, the
unpadded prompt, TransformerLens's own functions, an SVD or attention score computed
here) or the error is asserted by message."""

from __future__ import annotations

import itertools
import math
import re
import warnings
from typing import Optional

import numpy as np
import pytest
import torch
import transformer_lens.patching as tl_patching
from helpers import (
    LAYOUTS,
    build_word_tokenizer,
    hf_qwen3,
    randomize_routing,
    tiny_model,
    transformer_bridge_pair,
)
from transformer_lens import SVDInterpreter
from transformer_lens import evals as tl_evals
from transformer_lens.head_detector import detect_head
from transformer_lens.utilities import sample_logits as tl_sample_logits
from transformer_lens.utilities import test_prompt as tl_test_prompt

from hooked_attnres import (
    HookedAttnRes,
    HookKeyError,
    KeyValueCache,
    LeftPaddingWithoutMaskWarning,
    UnknownHookError,
)
from hooked_attnres.model.depth import ROUTER_HOOKS, ROUTERS
from hooked_attnres.model.generation import sample_logits, sampling_probabilities

WRAPS = ("recency", "exact", "none")


def wrapped_qwen3(wrap: str, **kwargs) -> HookedAttnRes:
    """A tiny Qwen3 through ``wrap``, with 2 blocks where the wrap has blocks (``"none"``
    has none and refuses ``num_blocks``)."""
    blocks = {} if wrap == "none" else {"num_blocks": 2}
    return HookedAttnRes.from_hf_qwen3(hf_qwen3(), wrap=wrap, **blocks, **kwargs)


WORDS = [f"w{i}" for i in range(40)]


def routed_model(layout: str, **overrides) -> HookedAttnRes:
    """A tiny model with content-dependent routing and weights large enough to matter."""
    model = randomize_routing(tiny_model(attnres_layout=layout, initializer_range=0.1, **overrides))
    model.set_tokenizer(build_word_tokenizer(WORDS))
    return model


def every_model():
    """The four layouts and the three from_hf_qwen3 wraps."""
    for layout in LAYOUTS:
        yield layout, routed_model(layout)
    for wrap in WRAPS:
        model = wrapped_qwen3(wrap)
        model.set_tokenizer(build_word_tokenizer(WORDS))
        yield f"wrap={wrap}", model


# --- left padding and attention masks -------------------------------------------------
def test_padding_on_either_side_gives_the_unpadded_logits_in_every_layout():
    texts = ["w1 w2 w3 w4 w5 w6", "w7 w8", "w9 w10 w11"]
    for name, model in every_model():
        alone = [model(text)[0] for text in texts]
        for side in ("left", "right"):
            tokens, mask = model.to_tokens_and_mask(texts, padding_side=side)
            assert (mask.sum(1).tolist(), side) == ([6, 2, 3], side)
            if side == "left":
                assert mask[1].tolist() == [0, 0, 0, 0, 1, 1]
            for run in (
                model(texts, padding_side=side),  # strings: the mask comes with them
                model(tokens, attention_mask=mask),
                model.run_with_cache(tokens, attention_mask=mask)[0],  # hooked attention
            ):
                assert torch.isfinite(run).all()
                for row, expected in enumerate(alone):
                    error = (run[row, mask[row].bool()] - expected).abs().max().item()
                    assert error <= 1e-5, (name, side, row, error)
        # the test has teeth: the same left-padded tokens without their mask differ
        tokens, mask = model.to_tokens_and_mask(texts, padding_side="left")
        unmasked = model(tokens)[1, mask[1].bool()]
        assert (unmasked - alone[1]).abs().max().item() > 1e-3, name


def test_left_padding_keeps_depth_states_and_routing_per_position(routed_layout):
    model = routed_model(routed_layout)
    tokens, mask = model.to_tokens_and_mask(["w1 w2 w3 w4 w5", "w6 w7"], padding_side="left")
    alone = model.to_tokens("w6 w7")
    padded_states = model.depth_states(tokens, attention_mask=mask)
    alone_states = model.depth_states(alone)
    for padded, single in zip(padded_states, alone_states, strict=True):
        for a, b in zip(padded.sources, single.sources, strict=True):
            assert torch.allclose(a[1, 3:], b[0], atol=1e-5)
    site = model.site(2, "mlp_res")
    _, cache = model.run_with_cache(tokens, attention_mask=mask)
    _, single_cache = model.run_with_cache(alone)
    weights = cache[site.hook("weights")]
    assert torch.allclose(weights[1, 3:], single_cache[site.hook("weights")][0], atol=1e-5)
    # a pass started from a cached padded state finishes like the full padded pass
    middle = model(padded_states[2], start_at_layer=2, attention_mask=mask)
    assert torch.allclose(middle, model(tokens, attention_mask=mask), atol=1e-6)
    sub_states = model.depth_states(tokens, sublayers=True, attention_mask=mask)
    from_mlp = model.forward_from(sub_states[3], 3, attention_mask=mask)
    assert torch.allclose(from_mlp, model(tokens, attention_mask=mask), atol=1e-6)


def test_a_gap_in_the_mask_equals_dropping_that_token(layout):
    model = routed_model(layout)
    tokens = torch.tensor([[3, 9, 4, 7, 12, 5]])
    mask = torch.tensor([[1, 1, 0, 1, 0, 1]])
    logits = model(tokens, attention_mask=mask)
    dropped = model(tokens[:, mask[0].bool()])
    assert torch.allclose(logits[0, mask[0].bool()], dropped[0], atol=1e-5)


def test_padding_queries_have_zero_pattern_and_no_nan(layout):
    model = routed_model(layout)
    tokens, mask = model.to_tokens_and_mask(["w1 w2 w3 w4", "w5"], padding_side="left")
    _, cache = model.run_with_cache(tokens, attention_mask=mask)
    for name in cache.keys():
        if name.endswith("hook_attn_scores"):  # -inf where masked, never NaN
            assert not torch.isnan(cache[name]).any(), name
        else:
            assert torch.isfinite(cache[name]).all(), name
    pattern = cache["pattern", 1]
    assert torch.all(pattern[1, :, :3] == 0)  # the three padding queries of prompt 1
    assert torch.all(pattern[1, :, 3:, :3] == 0)  # its real query never sees padding
    assert torch.allclose(pattern[1, :, 3, 3], torch.ones(model.cfg.n_heads))
    assert torch.all(cache["z", 1][1, :3] == 0)


@pytest.mark.parametrize("side", ["left", "right", "mixed"])
def test_padding_query_scores_are_zero_at_every_key_they_see(side):
    """docs/hooks.md: a padding query's query is zeroed before the scores (any ``eps``),
    so its ``hook_attn_scores`` row is 0 at every key it sees and ``-inf`` elsewhere: its
    own key and the real keys before it; in a batch where no real query follows a padding
    key (right padding only) only the causal mask applies, so also the padding keys before
    it. ``mixed``: one prompt padded on the right, one on the left (the docs said "every
    key up to its own with right padding", which such a batch contradicts)."""
    model = routed_model("kimi")
    texts = ["w1 w2 w3 w4", "w5"]
    tokens, mask = model.to_tokens_and_mask(
        texts, padding_side="left" if side == "left" else "right"
    )
    if side == "mixed":  # and a third prompt, "w6" padded on the left
        left, left_mask = model.to_tokens_and_mask(["w1 w2 w3 w4", "w6"], padding_side="left")
        tokens, mask = torch.cat([tokens, left[1:]]), torch.cat([mask, left_mask[1:]])
    row = 1
    _, cache = model.run_with_cache(tokens, attention_mask=mask)
    pads = (~mask[row].bool()).nonzero()[:, 0].tolist()
    assert len(pads) == 3
    for layer in range(model.cfg.n_layers):
        scores = cache["attn_scores", layer][row]  # [head, query, key]
        for query in pads:
            seen = {
                "left": [query],
                "right": list(range(query + 1)),
                "mixed": [key for key in range(query + 1) if mask[row, key] or key == query],
            }[side]
            blocked = [key for key in range(scores.shape[-1]) if key not in seen]
            assert torch.all(scores[:, query, seen] == 0), (layer, query)
            assert torch.all(scores[:, query, blocked] == float("-inf")), (layer, query)


def test_loss_with_padding_is_the_loss_of_the_real_tokens():
    model = routed_model("kimi")
    texts = ["w1 w2 w3 w4 w5", "w6 w7 w8"]
    for side in ("left", "right"):
        loss = model(texts, return_type="loss", padding_side=side)
        sums = [model(text, return_type="loss") * (len(text.split()) - 1) for text in texts]
        assert torch.allclose(loss, sum(sums) / 6, atol=1e-5), side
        per_token = model(texts, return_type="loss", loss_per_token=True, padding_side=side)
        assert per_token.shape == (2, 4) and int((per_token != 0).sum()) == 6


def test_a_key_value_chunk_with_no_new_token_for_a_prompt_runs_as_the_whole_pass(layout):
    """With a key-value cache the attention_mask covers the new positions only. A chunk in
    which a prompt has no new token (its row all padding) was refused with "a prompt needs
    at least one real token (drop empty prompts from the batch)", although the prompt's
    real tokens are in the cache and a batched cache cannot drop a prompt. It now runs:
    every chunk's logits equal the whole pass with the concatenated mask (float64), as
    right padding and gaps do in a whole pass. A row with no real token in the cache
    either is still refused."""
    from hooked_attnres import KeyValueCache

    model = tiny_model(attnres_layout=layout)
    if layout != "none":
        randomize_routing(model)
    model = model.double().eval()
    tokens = torch.randint(0, 50, (3, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    mask[1, 5:8] = 0  # prompt 1: no new token in the second chunk
    mask[2, :2] = 0  # prompt 2: left padding
    whole = model(tokens, attention_mask=mask)
    kv = KeyValueCache.init_cache(model.cfg)
    chunks = [
        model(tokens[:, start:stop], attention_mask=mask[:, start:stop], past_kv_cache=kv)
        for start, stop in ((0, 5), (5, 8), (8, 11))
    ]
    torch.testing.assert_close(torch.cat(chunks, dim=1), whole, rtol=0, atol=1e-12)
    fresh = KeyValueCache.init_cache(model.cfg)
    with pytest.raises(ValueError, match=r"attention_mask row\(s\) \[1\] are all zero"):
        model(tokens[:, 5:8], attention_mask=mask[:, 5:8], past_kv_cache=fresh)
    # the first chunk of a left-padded prompt, all padding: the prompt is not empty, so the
    # message no longer says only to drop empty prompts (it said just that)
    with pytest.raises(ValueError, match=r"\[2\] are all zero.*end the first chunk after its"):
        model(tokens[:, :2], attention_mask=mask[:, :2], past_kv_cache=fresh)


def test_a_pos_mask_beside_pos_tokens_is_refused_naming_its_shape_and_the_remedy():
    """Audit 151 (left undone by audit 149): tokens ``[pos]`` with a mask ``[pos]`` were
    refused as "must have the shape of the tokens (1, 3), got (3,)", a shape the caller
    never passed, and no remedy; the message says that ``[pos]`` tokens are one prompt
    and to pass ``attention_mask[None]``, which gives the logits of the ``[1, pos]`` call."""
    model = routed_model("kimi")
    tokens, mask = torch.tensor([5, 6, 7]), torch.tensor([0, 1, 1])
    remedy = re.escape("(tokens [pos] are read as one prompt, [1, pos]), got (3,): pass ")
    for call in (
        lambda m: model(tokens, attention_mask=m),
        lambda m: model.generate(tokens, attention_mask=m, max_new_tokens=1, verbose=False),
    ):
        with pytest.raises(ValueError, match=remedy + re.escape("attention_mask[None]")):
            call(mask)
    with pytest.raises(ValueError, match=re.escape("[1, pos]), got (2,)") + "$"):
        model(tokens, attention_mask=mask[1:])
    expected = model(tokens[None], attention_mask=mask[None])
    assert torch.equal(model(tokens, attention_mask=mask[None]), expected)


def test_an_empty_prompt_in_a_batch_of_strings_is_refused_by_name():
    """Audit 151 (left undone by audit 149): ``generate(["w1 w2", ""])`` and
    ``model(["w1 w2", ""])`` were refused as "attention_mask row(s) [1] are all zero", a
    mask the caller never passed; the message names the empty prompt."""
    model = routed_model("none")
    texts = ["w1 w2", "", "w3"]
    empty = re.escape("prompt(s) [1] [''] tokenise to no tokens")
    with pytest.raises(ValueError, match=rf"^generate: {empty}"):
        model.generate(texts, max_new_tokens=1, stop_at_eos=False, verbose=False)
    with pytest.raises(ValueError, match=rf"^forward: {empty}"):
        model(texts, prepend_bos=False)
    with pytest.raises(ValueError, match=rf"^forward: {empty}"):
        model.run_with_cache(texts)


def test_bad_masks_and_empty_losses_are_refused():
    model = routed_model("cumulative")
    tokens = torch.randint(0, 50, (2, 5))
    with pytest.raises(ValueError, match=r"attention_mask row\(s\) \[1\] are all zero"):
        model(tokens, attention_mask=torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="only 0 .padding. and 1"):
        model(tokens, attention_mask=torch.full((2, 5), 2))
    with pytest.raises(ValueError, match=r"shape of the tokens \(2, 5\), got \(2, 4\)"):
        model(tokens, attention_mask=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="0/1 integers or booleans, got torch.float32"):
        model(tokens, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="at least two positions, got 1"):
        model(tokens[:, :1], return_type="loss")
    with pytest.raises(ValueError, match="at least two positions"):
        model(tokens[:, :1], return_type="both", loss_per_token=True)
    lonely = torch.tensor([[1, 0, 0, 0, 0], [0, 0, 0, 0, 1]])
    with pytest.raises(ValueError, match="no valid prediction: no prompt has two consecutive"):
        model(tokens, return_type="loss", attention_mask=lonely)
    assert torch.isfinite(model(tokens, attention_mask=lonely)).all()  # logits are fine
    with pytest.raises(ValueError, match=r"logit_positions point at padding .* \[1\]"):
        model(tokens, attention_mask=lonely, logit_positions=torch.tensor([0, 2]))


def test_logit_positions_with_left_padding():
    model = routed_model("full")
    tokens, mask = model.to_tokens_and_mask(["w1 w2 w3 w4", "w5 w6"], padding_side="left")
    full = model(tokens, attention_mask=mask)
    positions = torch.tensor([2, 3])
    one = model(tokens, attention_mask=mask, logit_positions=positions)
    assert torch.allclose(one[:, 0], full[torch.arange(2), positions], atol=1e-5)


def test_default_padding_side_is_read_from_the_config():
    model = routed_model("none", default_padding_side="left")
    tokens, mask = model.to_tokens_and_mask(["w1 w2 w3", "w4"])
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert model.tokenizer.padding_side == "left"


def test_the_tokenizers_padding_side_is_the_default_as_in_transformerlens():
    """Audit finding: TransformerLens pads on ``model.tokenizer.padding_side`` (Bridge 4.3
    and HookedTransformer); we read only the config, so after
    ``model.tokenizer.padding_side = "left"`` the short prompt's ``logits[:, -1]`` was a
    padding position (0.37 off the Bridge's, another argmax)."""
    texts = ["w1 w2 w3 w4 w5", "w6 w7"]
    model = routed_model("none")
    alone = model(texts[1])[0, -1]
    model.tokenizer.padding_side = "left"
    tokens, mask = model.to_tokens_and_mask(texts)
    assert mask.tolist() == [[1] * 5, [0, 0, 0, 1, 1]]
    assert model.to_tokens(texts).tolist() == tokens.tolist()
    assert torch.allclose(model(texts)[1, -1], alone, atol=1e-5)
    assert model.to_tokens_and_mask(texts, padding_side="right")[1][1].tolist() == [1, 1, 0, 0, 0]
    # a config changed after the tokenizer was attached still counts (the tokenizer was not)
    model = routed_model("none")
    model.cfg.default_padding_side = "left"
    assert model.to_tokens_and_mask(texts)[1][1].tolist() == [0, 0, 0, 1, 1]
    assert model.default_padding_side == "left"


def test_left_padded_tokens_without_a_mask_warn_once():
    """Left-padded token ids passed without their mask are attended as real tokens (no
    guessing, as in TransformerBridge), so the short prompt's last logits differ from its
    own; HookedTransformer guessed the mask. Warned once per model, not for the mask,
    strings, unpadded tokens or right padding."""
    texts = ["w1 w2 w3 w4 w5", "w6 w7"]
    model = routed_model("none")
    model.tokenizer.padding_side = "left"
    tokens, mask = model.to_tokens_and_mask(texts)
    alone = model(texts[1])[0, -1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.allclose(model(tokens, attention_mask=mask)[1, -1], alone, atol=1e-5)
        model(texts)
        model(tokens[:1])  # the long prompt alone is not padded
    with pytest.warns(LeftPaddingWithoutMaskWarning, match=r"prompt\(s\) \[1\] start with"):
        unmasked = model(tokens)
    assert not torch.allclose(unmasked[1, -1], alone, atol=1e-3)  # what the warning is about
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(tokens)  # once per model
    right = routed_model("none")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        right(right.to_tokens(texts))  # right padding: the real positions see no padding


def test_left_padded_tokens_without_a_mask_warn_in_cached_generation_too():
    """generate's default (cached) path starts a key-value cache with the whole prompt,
    and the forward pass skipped the warning for every cached pass, so the attended
    padding changed the continuation without a word (the uncached path warned)."""
    texts = ["w1 w2 w3 w4 w5", "w6 w7"]
    options = dict(max_new_tokens=3, do_sample=False, stop_at_eos=False, verbose=False)
    for cached in (True, False):
        model = routed_model("none")
        model.tokenizer.padding_side = "left"
        tokens, mask = model.to_tokens_and_mask(texts)
        with pytest.warns(LeftPaddingWithoutMaskWarning, match=r"prompt\(s\) \[1\] start with"):
            unmasked = model.generate(tokens, use_past_kv_cache=cached, **options)
        masked = model.generate(tokens, attention_mask=mask, use_past_kv_cache=cached, **options)
        assert not torch.equal(unmasked, masked)  # what the warning is about
        fresh = routed_model("none")
        fresh.tokenizer.padding_side = "left"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a masked prompt, then its continuation: silent
            fresh.generate(tokens, attention_mask=mask, use_past_kv_cache=cached, **options)


# --- key-value cache and generate -----------------------------------------------------
def test_cached_forward_in_chunks_equals_one_forward(layout):
    # float64 first, so that the comparison tests the cache and not float32 rounding (the
    # chunked attention sums in another order; in float32 the gap is about 1e-5)
    model = routed_model(layout).to(torch.float64)
    tokens = torch.randint(0, 50, (2, 11), generator=torch.Generator().manual_seed(3))
    cache = KeyValueCache.init_cache(model.cfg.n_layers)
    chunks = [model(tokens[:, a:b], past_kv_cache=cache) for a, b in ((0, 4), (4, 5), (5, 11))]
    assert cache.n_past == 11
    assert torch.allclose(torch.cat(chunks, dim=1), model(tokens), rtol=0, atol=1e-10)
    # with a left-padded first chunk
    tokens, mask = model.to_tokens_and_mask(["w1 w2 w3 w4", "w5 w6"], padding_side="left")
    following = torch.tensor([[7, 8], [9, 10]])
    cache = KeyValueCache.init_cache(model.cfg.n_layers)
    model(tokens, attention_mask=mask, past_kv_cache=cache)
    step = model(following, past_kv_cache=cache)
    whole = model(
        torch.cat((tokens, following), 1),
        attention_mask=torch.cat((mask, torch.ones(2, 2)), 1).long(),
    )
    assert torch.allclose(step, whole[:, -2:], rtol=0, atol=1e-10)
    # hooks see the new positions only (TransformerLens semantics)
    _, step_cache = model.run_with_cache(torch.tensor([[1], [2]]), past_kv_cache=cache)
    assert step_cache["pattern", 0].shape == (2, model.cfg.n_heads, 1, 7)
    assert step_cache["resid_pre", 0].shape == (2, 1, model.cfg.d_model)


def test_every_hook_of_a_chunked_pass_equals_the_full_forward_at_the_same_positions():
    """Prefill 5 positions, then one at a time, with left padding and its mask: the logits
    and every hook (router weights, logits and sources included; the pattern's key axis
    up to the chunk's end) equal the full forward's at the same absolute positions, in
    every layout and HF wrap (float64)."""
    tokens = torch.randint(3, 50, (3, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(tokens)
    mask[1, :2], mask[2, :4] = 0, 0
    for name, model in every_model():
        model = model.to(torch.float64)
        for attention_mask in (None, mask):
            logits, full = model.run_with_cache(tokens, attention_mask=attention_mask)
            cache = KeyValueCache.init_cache(model.cfg)
            for start, stop in ((0, 5), *((i, i + 1) for i in range(5, 9))):
                chunk_mask = None if attention_mask is None else attention_mask[:, start:stop]
                got, chunk = model.run_with_cache(
                    tokens[:, start:stop], attention_mask=chunk_mask, past_kv_cache=cache
                )
                at = (name, attention_mask is not None, start)
                torch.testing.assert_close(got, logits[:, start:stop], rtol=0, atol=1e-10)
                assert sorted(chunk.keys()) == sorted(full.keys()), at
                for hook in full.keys():
                    expected = full[hook]
                    if hook.endswith(("hook_pattern", "hook_attn_scores")):
                        expected = expected[:, :, start:stop, :stop]
                    else:
                        expected = expected[:, start:stop]
                    torch.testing.assert_close(
                        chunk[hook], expected, rtol=0, atol=1e-10, msg=f"{at} {hook}"
                    )


def test_interventions_under_generate_give_the_same_steps_with_and_without_the_cache():
    """Routing interventions over every position (mask, set, local and global patching,
    the mean over the real prompts) under generate, left-padded: the key-value cached loop
    draws the same tokens from the same logits at every step as the loop that reruns the
    whole sequence."""
    from hooked_attnres.interventions import (
        mask_sources,
        patch_committed,
        patch_sources,
        set_weights,
    )

    prompt = torch.randint(3, 50, (3, 5), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(prompt)
    mask[1, :2], mask[2, :1] = 0, 0
    for name, model in every_model():
        if not model.routing_layout.has_routers:
            continue
        model = model.to(torch.float64)
        last = model.cfg.n_layers - 1
        interventions = {
            "mask": mask_sources(model, "current", routers="mlp_res", layers=last),
            "uniform": set_weights(model, "uniform"),
            "local mean": patch_sources(model, "embedding", "mean"),
            "global mean": patch_committed(model, "embedding", "mean"),
        }
        for what, hooks in interventions.items():
            steps = {}
            for cached in (True, False):
                logits: list = []
                handle = model.register_forward_hook(
                    lambda module, args, out, logits=logits: logits.append(out[:, -1])
                )
                with model.hooks(fwd_hooks=hooks):
                    out = model.generate(
                        prompt,
                        attention_mask=mask,
                        max_new_tokens=4,
                        do_sample=False,
                        stop_at_eos=False,
                        use_past_kv_cache=cached,
                        verbose=False,
                    )
                handle.remove()
                steps[cached] = out, torch.stack(logits)
            assert torch.equal(steps[True][0], steps[False][0]), (name, what)
            torch.testing.assert_close(
                steps[True][1], steps[False][1], rtol=0, atol=1e-10, msg=f"{name} {what}"
            )


def test_generate_under_hooks_equals_a_step_by_step_recompute_with_them():
    """generate inside model.hooks() (a routing intervention and a plain hook) gives, with
    and without the cache, the tokens of a loop that reruns the whole left-padded sequence
    through run_with_hooks and takes the argmax; the hooks change the tokens."""
    from hooked_attnres.interventions import set_weights

    model = routed_model("kimi").to(torch.float64)
    prompt = torch.randint(3, 50, (2, 5), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0
    hooks = set_weights(model, "uniform") + [("blocks.1.hook_mlp_out", lambda x, hook: x * 0.3)]
    expected, running = prompt, mask
    for _ in range(5):
        logits = model.run_with_hooks(expected, attention_mask=running, fwd_hooks=hooks)
        expected = torch.cat((expected, logits[:, -1].argmax(-1, keepdim=True)), 1)
        running = torch.cat((running, torch.ones_like(running[:, :1])), 1)
    options = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, stop_at_eos=False)
    for cached in (True, False):
        with model.hooks(fwd_hooks=hooks):
            out = model.generate(prompt, use_past_kv_cache=cached, verbose=False, **options)
        assert torch.equal(out, expected), cached
    assert not torch.equal(model.generate(prompt, verbose=False, **options), expected)


def test_hooks_in_cached_passes_see_the_new_positions_and_can_find_their_offset(layout):
    """In a key-value cached pass hooks see the new positions only, so ``pos_slice`` of
    ``run_with_cache`` and a hook's own indices count from the pass's first position, the
    sequence's position ``n_past`` (``cache.n_past``; inside a hook, ``pass_n_past()``):
    a negative index is the same in both readings. A hook that edits an absolute position
    through ``pass_n_past()`` generates the same tokens with and without the cache."""
    from hooked_attnres.model.passes import pass_n_past

    model = routed_model(layout).to(torch.float64)
    tokens = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(4))
    name = "blocks.2.hook_mlp_out"
    _, full = model.run_with_cache(tokens, names_filter=name)
    for pos_slice, positions in ((0, [5]), ((1, 3), [6, 7]), (-1, [8]), ([-3, -1], [6, 8])):
        kv = KeyValueCache.init_cache(model.cfg)
        model(tokens[:, :5], past_kv_cache=kv)
        _, chunk = model.run_with_cache(
            tokens[:, 5:], past_kv_cache=kv, names_filter=name, pos_slice=pos_slice
        )
        assert chunk.n_past == 5
        torch.testing.assert_close(chunk[name], full[name][:, positions], rtol=0, atol=1e-10)
    seen = []

    def zero_position_2(embedding, hook):
        seen.append(pass_n_past())
        index = 2 - pass_n_past()  # the sequence's position 2 in this pass
        if 0 <= index < embedding.shape[1]:
            embedding = embedding.clone()
            embedding[:, index] = 0
        return embedding

    options = dict(max_new_tokens=4, do_sample=False, stop_at_eos=False, verbose=False)
    with model.hooks(fwd_hooks=[("hook_embed", zero_position_2)]):
        cached = model.generate(tokens[:, :5], **options)
        assert seen == [0, 5, 6, 7] and pass_n_past() == 0
        uncached = model.generate(tokens[:, :5], use_past_kv_cache=False, **options)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, model.generate(tokens[:, :5], **options))  # it edits


def test_a_string_continuing_a_cache_is_refused_a_default_bos_in_mid_sequence():
    """Audit 228: with ``cfg.default_prepend_bos=True`` a string that continues a
    key-value cache (``model(" w4 w5", past_kv_cache=kv)``) got the default BOS token
    prepended, so the cached sequence held a BOS in its middle and the continuation's
    logits were off the whole text's forward pass (1.85 in a float64 kimi model),
    silently. Now refused unless ``prepend_bos`` is given: ``False`` continues the text
    (the whole pass's logits), ``True`` puts a BOS there as asked. A pass that starts
    the cache still prepends it."""
    for name, model in every_model():
        model = model.to(torch.float64)
        model.cfg.default_prepend_bos = True
        whole = model("w1 w2 w3 w4 w5")  # [bos, w1, ..., w5]
        kv = KeyValueCache.init_cache(model.cfg)
        first = model("w1 w2 w3", past_kv_cache=kv)  # starts the cache: BOS prepended
        assert kv.n_past == 4, name
        with pytest.raises(ValueError, match=r"continues a key-value cache \(4 cached posi"):
            model(" w4 w5", past_kv_cache=kv)
        with pytest.raises(ValueError, match="prepend_bos=False to continue"):
            model.run_with_cache(["w4 w5"], past_kv_cache=kv)
        assert kv.n_past == 4, name  # the refused passes left the cache as it was
        rest = model(" w4 w5", past_kv_cache=kv, prepend_bos=False)
        got = torch.cat((first, rest), dim=1)
        torch.testing.assert_close(got, whole, rtol=0, atol=1e-12, msg=name)
        model(" w6", past_kv_cache=kv, prepend_bos=True)  # asked for: a BOS there
        assert kv.n_past == 8, name


def test_a_state_of_padded_text_names_the_mask_that_resumes_it():
    """Audit 228: a state stopped from texts of several lengths (padded by the tokenizer)
    is refused without its mask, and the message said to pass "the attention_mask= of the
    ... call that made the state", which a text call never passed; it now names
    to_tokens_and_mask, whose mask resumes the state to the text's logits."""
    texts = ["w1 w2 w3", "w4"]
    for name, model in every_model():
        model = model.to(torch.float64)
        full = model(texts, padding_side="left")
        state = model(texts, padding_side="left", stop_at_layer=2)
        with pytest.raises(ValueError, match=r"model\.to_tokens_and_mask\(texts\) with the sa"):
            model(state, start_at_layer=2)
        _, mask = model.to_tokens_and_mask(texts, padding_side="left")
        torch.testing.assert_close(
            model(state, start_at_layer=2, attention_mask=mask), full, rtol=0, atol=1e-12, msg=name
        )


def test_a_string_batch_continuing_a_cache_may_add_nothing_to_a_prompt():
    """Audit 228: texts continuing a key-value cache where one prompt adds no token
    (``model(["w5", ""], past_kv_cache=kv)``) were refused as "tokenise to no tokens ...
    drop empty prompts from the batch", a remedy a batched cache cannot take, though
    token ids with that prompt's row all padding run. They run now, on either padding
    side: each prompt's real positions equal that prompt's text run alone (float64, every
    layout and wrap). An empty prompt that starts a cache is still refused."""
    for name, model in every_model():
        model = model.to(torch.float64)
        for side in ("left", "right"):
            kv = KeyValueCache.init_cache(model.cfg)
            chunks = [
                model(texts, past_kv_cache=kv, padding_side=side)
                for texts in (["w1 w2", "w3"], ["w5", ""], ["w6", "w7 w8"])
            ]
            got, real = torch.cat(chunks, dim=1), kv.attention_mask
            assert real.sum(-1).tolist() == [4, 3], (name, side)
            for row, text in enumerate(("w1 w2 w5 w6", "w3 w7 w8")):
                torch.testing.assert_close(
                    got[row, real[row]], model(text)[0], rtol=0, atol=1e-12, msg=(name, side)
                )
        with pytest.raises(ValueError, match=r"prompt\(s\) \[1\] \[''\] tokenise to no tokens"):
            model(["w5", ""], past_kv_cache=KeyValueCache.init_cache(model.cfg))


def test_cache_misuse_is_refused():
    model = routed_model("kimi")
    with pytest.raises(ValueError, match="past_kv_cache holds 3 prompts, the input has 2"):
        model(
            torch.randint(0, 50, (2, 4)),
            past_kv_cache=KeyValueCache.init_cache(model.cfg, "cpu", 3),
        )
    cache = KeyValueCache.init_cache(model.cfg)
    model(torch.randint(0, 50, (2, 4)), past_kv_cache=cache)
    with pytest.raises(ValueError, match="past_kv_cache holds 2 prompts, the input has 3"):
        model(torch.randint(0, 50, (3, 1)), past_kv_cache=cache)
    with pytest.raises(ValueError, match="cannot be combined with start_at_layer, stop_at"):
        model(torch.randint(0, 50, (2, 1)), past_kv_cache=cache, stop_at_layer=1)
    with pytest.raises(ValueError, match="sequence length 29 after 4 cached positions exceeds"):
        model(torch.randint(0, 50, (2, 29)), past_kv_cache=cache)
    with pytest.raises(TypeError, match="past_kv_cache must be a hooked_attnres.KeyValueCache"):
        model(torch.randint(0, 50, (2, 1)), past_kv_cache={})
    with pytest.raises(ValueError, match="past_kv_cache has 2 layers, the model 4"):
        model(torch.randint(0, 50, (2, 1)), past_kv_cache=KeyValueCache.init_cache(2))


def test_a_pass_that_raises_leaves_the_cache_as_it_was():
    """A cached pass extends the layers one by one: a hook that raises half-way (here
    KeyboardInterrupt at layer 2, an intervention that refuses, a loss that is refused
    after the layers ran) used to leave layers 0-1 one chunk longer than layers 2-3 and
    n_past advanced, and the retry was 0.0087 logits off the full forward (kimi, float64),
    silently. Now the cache is put back; the retry equals one forward pass. A cache whose
    layers disagree with n_past (edited by hand) is refused."""
    from hooked_attnres.interventions import mask_sources

    model = routed_model("kimi").to(torch.float64)
    tokens = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    full = model(tokens)

    def interrupt(x, hook):
        raise KeyboardInterrupt

    at_zero = mask_sources(model, "current", routers="mlp_res", layers=3, positions=0)
    cache = KeyValueCache.init_cache(model.cfg)
    model(tokens[:, :5], past_kv_cache=cache)
    with pytest.raises(KeyboardInterrupt):
        model.run_with_hooks(
            tokens[:, 5:6], past_kv_cache=cache, fwd_hooks=[("blocks.2.hook_resid_pre", interrupt)]
        )
    with pytest.raises(ValueError, match="its position 0 is the sequence's position 5"):
        model.run_with_hooks(tokens[:, 5:6], past_kv_cache=cache, fwd_hooks=at_zero)
    with pytest.raises(ValueError, match="a next-token loss needs at least two positions"):
        model(tokens[:, 5:6], past_kv_cache=cache, return_type="loss")
    assert cache.n_past == 5 and cache.batch_size == 2
    assert [layer.keys.shape[1] for layer in cache.layers] == [5] * model.cfg.n_layers
    assert [layer.values.shape[1] for layer in cache.layers] == [5] * model.cfg.n_layers
    rest = model(tokens[:, 5:], past_kv_cache=cache)
    torch.testing.assert_close(rest, full[:, 5:], atol=1e-10, rtol=0)
    # a padded first chunk: the mask is put back too
    mask = torch.ones_like(tokens)
    mask[1, :2] = 0
    cache = KeyValueCache.init_cache(model.cfg)
    model(tokens[:, :5], attention_mask=mask[:, :5], past_kv_cache=cache)
    with pytest.raises(KeyboardInterrupt):
        model.run_with_hooks(
            tokens[:, 5:], past_kv_cache=cache, fwd_hooks=[("blocks.3.hook_mlp_out", interrupt)]
        )
    assert cache.attention_mask is not None and cache.attention_mask.shape == (2, 5)
    padded = model(tokens, attention_mask=mask)
    torch.testing.assert_close(
        model(tokens[:, 5:], past_kv_cache=cache), padded[:, 5:], atol=1e-10, rtol=0
    )
    # edited by hand: refused
    cache.layers[1].keys = cache.layers[1].keys[:, :-1]
    with pytest.raises(ValueError, match="n_past=8 but layer 1 holds keys and values of"):
        model(tokens[:, :1], past_kv_cache=cache)


def test_a_cache_filled_by_another_model_is_refused():
    """Two models of one shape (here the same layout, other weights): continuing one
    model's cache with the other used to read the first model's keys and values
    silently. The other model now refuses it; the filling model continues it, also after
    a pass that raised before it extended the cache."""
    tokens = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(3))
    first, second = routed_model("kimi"), routed_model("kimi")
    with torch.no_grad():
        second.embed.W_E.mul_(2)
    cache = KeyValueCache.init_cache(first.cfg)
    first(tokens[:, :4], past_kv_cache=cache)
    with pytest.raises(ValueError, match="holds 4 positions computed by another model"):
        second(tokens[:, 4:], past_kv_cache=cache)
    with pytest.raises(ValueError, match="holds 4 positions computed by another model"):
        second.run_with_cache(tokens[:, 4:], past_kv_cache=cache)
    assert cache.n_past == 4
    torch.testing.assert_close(
        first(tokens[:, 4:], past_kv_cache=cache), first(tokens)[:, 4:], atol=1e-5, rtol=0
    )
    # an empty cache may go to either model; the first pass that completes decides
    empty = KeyValueCache.init_cache(first.cfg)

    def interrupt(x, hook):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        first.run_with_hooks(
            tokens[:, :4], past_kv_cache=empty, fwd_hooks=[("blocks.1.hook_resid_pre", interrupt)]
        )
    second(tokens[:, :4], past_kv_cache=empty)
    with pytest.raises(ValueError, match="computed by another model"):
        first(tokens[:, 4:], past_kv_cache=empty)


def test_a_cache_can_be_pickled_and_copied_and_a_loaded_one_names_no_model():
    """A weak reference cannot be pickled, so torch.save of a filled cache raised
    ``TypeError: cannot pickle 'weakref.ReferenceType' object``. A loaded cache names
    no model and is refused until the caller says which model filled it; copies (deep
    or shallow) stay in the process and keep the filling model."""
    import copy
    import io

    tokens = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(3))
    model = routed_model("kimi")
    cache = KeyValueCache.init_cache(model.cfg)
    with torch.no_grad():
        model(tokens[:, :4], past_kv_cache=cache)
        full = model(tokens)[:, 4:]
        buffer = io.BytesIO()
        torch.save(cache, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        assert cache.check_filled_by(model) is None  # saving kept the original's model
        with pytest.raises(ValueError, match="holds 4 positions of no recorded model"):
            model(tokens[:, 4:], past_kv_cache=loaded)
        loaded.mark_filled_by(model)
        torch.testing.assert_close(
            model(tokens[:, 4:], past_kv_cache=loaded), full, atol=1e-5, rtol=0
        )
        for copied in (copy.deepcopy(cache), copy.copy(cache)):
            torch.testing.assert_close(
                model(tokens[:, 4:], past_kv_cache=copied), full, atol=1e-5, rtol=0
            )
            with pytest.raises(ValueError, match="computed by another model"):
                routed_model("kimi")(tokens[:, 4:], past_kv_cache=copied)
    # docs/hooks.md: filled with gradients enabled, its keys carry their graph, and a deep
    # copy is torch's refusal of non-leaf tensors (a shallow one works)
    with_graph = KeyValueCache.init_cache(model.cfg)
    model(tokens[:, :4], past_kv_cache=with_graph)
    with pytest.raises(RuntimeError, match="graph leaves"):
        copy.deepcopy(with_graph)
    assert copy.copy(with_graph).check_filled_by(model) is None


@pytest.mark.parametrize(
    ("filled", "continued"),
    [
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float64),
    ],
)
def test_a_cache_filled_before_the_model_was_converted_is_refused(filled, continued):
    """``model.to(dtype)`` after filling: torch.cat promoted the old keys, so bfloat16 keys
    were read by a float32 model silently (0.064 logits off its full forward in this
    model), and float32 keys with a bfloat16 model failed inside attention with a message
    about its inputs. Refused by name (the weights changed, `WeightsSignature`), also
    after converting back (a round trip through bfloat16 rounds the weights). A cache
    whose model is declared its filler anyway (``mark_filled_by``) is still refused by
    the dtype of its keys; the cache is untouched."""
    tokens = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(3))
    model = routed_model("kimi").to(filled)
    cache = KeyValueCache.init_cache(model.cfg)
    with torch.no_grad():
        model(tokens[:, :4], past_kv_cache=cache)
        model.to(continued)
        converted = f"embed.W_E was converted from {filled} on cpu to {continued} on cpu"
        with pytest.raises(ValueError, match=re.escape(converted)):
            model(tokens[:, 4:], past_kv_cache=cache)
        cache.mark_filled_by(model)
        with pytest.raises(ValueError, match=f"holds keys in {filled} on cpu, this pass comp"):
            model(tokens[:, 4:], past_kv_cache=cache)
        assert cache.n_past == 4 and cache.layers[0].keys.shape[1] == 4
        model.to(filled)
        with pytest.raises(ValueError, match="computed with other weights of this model"):
            model(tokens[:, 4:], past_kv_cache=cache)


def _scale_values(model):
    with torch.no_grad():
        model.blocks[1].attn._W_V.mul_(1.5)


def _load_other(model):
    other = routed_model("kimi").to(model.embed.W_E.dtype)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(0.05)
    model.load_state_dict(other.state_dict())


def _replace_values(model):
    attn = model.blocks[1].attn
    attn._W_V = torch.nn.Parameter(attn._W_V.detach() * 1.5)


def _round_trip(model):
    model.to(torch.bfloat16).to(torch.float64)


def _scale_router(model):
    with torch.no_grad():
        model.blocks[2].attn_res.query.mul_(3)


def _optimizer_step(model):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randint(0, 50, (2, 6)), return_type="loss").backward()
    optimizer.step()


# how each edit changes the weights (part of the message), and how far a continuation of
# the old cache was from the full forward of the new weights before it was refused
# (float64, kimi, 5 cached positions + 3)
WEIGHT_EDITS = {
    "in place": (_scale_values, "blocks.1.attn._W_V was edited in place"),  # 1.1
    "load_state_dict": (_load_other, "embed.W_E was edited in place"),  # 0.16
    "new Parameter": (_replace_values, r"blocks.1.attn._W_V was replaced \(new memory\)"),  # 1.1
    "to(bf16).to(f64)": (_round_trip, r"embed.W_E was replaced \(new memory\)"),  # 0.048
    "process_weights": (
        lambda m: m.process_weights(),
        "attn_res.query was edited in place",
    ),  # 5e-15
    "router query": (_scale_router, "blocks.2.attn_res.query was edited in place"),  # 0.11
    "optimizer step": (_optimizer_step, "embed.W_E was edited in place"),  # 1.7
}


@pytest.mark.parametrize("edit", list(WEIGHT_EDITS))
def test_a_cache_filled_before_the_weights_changed_is_refused(edit):
    """Editing the weights after filling a cache used to go unnoticed: the continuation
    read keys and values of the old weights next to the new ones' (up to 1.7 logits off a
    full forward of the new weights, see WEIGHT_EDITS; ``process_weights`` changes the
    weights but not the function, and is refused too: the cache cannot tell). Now
    ``model(rest, past_kv_cache=kv)`` and ``run_with_cache`` refuse the cache, naming the
    parameter; the cache is untouched, and a new cache gives the full forward exactly."""
    change, message = WEIGHT_EDITS[edit]
    tokens = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(3))
    model = routed_model("kimi").to(torch.float64)
    cache = KeyValueCache.init_cache(model.cfg)
    with torch.no_grad():
        model(tokens[:, :5], past_kv_cache=cache)
    change(model)
    model.eval()
    with torch.no_grad():
        full = model(tokens)
        for run in (model, model.run_with_cache):
            with pytest.raises(ValueError, match="5 positions computed with other weights"):
                run(tokens[:, 5:], past_kv_cache=cache)
            with pytest.raises(ValueError, match=message):
                run(tokens[:, 5:], past_kv_cache=cache)
        assert cache.n_past == 5 and cache.layers[0].keys.shape[1] == 5
        fresh = KeyValueCache.init_cache(model.cfg)
        model(tokens[:, :5], past_kv_cache=fresh)
        torch.testing.assert_close(
            model(tokens[:, 5:], past_kv_cache=fresh), full[:, 5:], atol=1e-12, rtol=0
        )


def test_a_cache_is_refused_by_a_copy_of_its_model_until_the_copy_is_declared_its_filler():
    """A ``copy.deepcopy`` of the model has the same weights in other memory: one cache per
    model object (a copy is then edited independently, and nothing cheap tells whether it
    was); ``cache.mark_filled_by(copy)`` declares it, after which the copy continues the
    cache exactly and the original is refused."""
    import copy

    tokens = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(3))
    model = routed_model("kimi").to(torch.float64)
    twin = copy.deepcopy(model)
    cache = KeyValueCache.init_cache(model.cfg)
    with torch.no_grad():
        model(tokens[:, :5], past_kv_cache=cache)
        with pytest.raises(ValueError, match="holds 5 positions computed by another model"):
            twin(tokens[:, 5:], past_kv_cache=cache)
        cache.mark_filled_by(twin)
        torch.testing.assert_close(
            twin(tokens[:, 5:], past_kv_cache=cache), model(tokens)[:, 5:], atol=1e-12, rtol=0
        )
        with pytest.raises(ValueError, match="holds 8 positions computed by another model"):
            model(tokens[:, :1], past_kv_cache=cache)


def test_a_model_built_under_inference_mode_continues_its_cache():
    """Parameters made under ``torch.inference_mode()`` are inference tensors, which have
    no version counter: every cached pass (generate with its key-value cache) crashed with
    RuntimeError 'Inference tensors do not track version counter'. Now the cache is
    continued, equal to the full forward, and a replaced parameter is still refused."""
    tokens = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        model = routed_model("kimi").to(torch.float64).eval()
        cache = KeyValueCache.init_cache(model.cfg)
        model(tokens[:, :5], past_kv_cache=cache)
        torch.testing.assert_close(
            model(tokens[:, 5:7], past_kv_cache=cache),
            model(tokens[:, :7])[:, 5:],
            atol=1e-12,
            rtol=0,
        )
        model.blocks[1].attn._W_V = torch.nn.Parameter(model.blocks[1].attn._W_V * 1.5)
        with pytest.raises(ValueError, match=r"blocks.1.attn._W_V was replaced \(new memory\)"):
            model(tokens[:, 7:], past_kv_cache=cache)


def test_weights_signature_tells_a_replaced_parameter_from_the_same_one():
    """The address and version of a parameter could repeat after it was replaced (the
    allocator reuses the freed memory, the version counter stays with the Parameter on
    ``param.data = ...``); the signature's weak reference to the storage tells them apart.
    Pickled, a signature matches no model; copies are the signature itself."""
    import copy
    import pickle

    from hooked_attnres.model.weights import WeightsSignature

    model = routed_model("kimi")
    signature = WeightsSignature(model)
    assert signature.change(model) is None
    assert copy.deepcopy(signature) is signature
    assert "loaded from a file" in pickle.loads(pickle.dumps(signature)).change(model)
    param = model.blocks[0].attn._W_V
    # the same address after replacement, simulated: the old storage dies, the new data
    # is written where the old was read from
    old = param.data
    param.data = old.clone()
    del old
    forged = WeightsSignature.__new__(WeightsSignature)
    forged.names, forged._storages = signature.names, signature._storages
    forged.entries = tuple(
        entry if name != "blocks.0.attn._W_V" else (*entry[:2], param.data_ptr(), entry[3])
        for name, entry in zip(signature.names, signature.entries, strict=True)
    )
    assert forged.change(model) == "blocks.0.attn._W_V was replaced (new memory)"


@pytest.mark.parametrize("name", [*LAYOUTS, *(f"wrap={wrap}" for wrap in WRAPS)])
def test_greedy_generation_is_repeated_argmax_of_full_forwards(name):
    if name.startswith("wrap"):
        model = wrapped_qwen3(name[5:])
    else:
        model = routed_model(name)
    vocab = model.cfg.d_vocab
    prompt = torch.randint(0, vocab, (2, 4), generator=torch.Generator().manual_seed(5))
    expected = prompt
    for _ in range(6):
        expected = torch.cat((expected, model(expected)[:, -1].argmax(-1, keepdim=True)), 1)
    for cached in (True, False):
        out = model.generate(
            prompt,
            max_new_tokens=6,
            do_sample=False,
            stop_at_eos=False,
            use_past_kv_cache=cached,
            verbose=False,
        )
        assert torch.equal(out, expected), (name, cached)


def test_batched_string_generation_equals_one_prompt_at_a_time():
    model = routed_model("cumulative")
    prompts = ["w1 w2 w3 w4 w5", "w6 w7", "w8 w9 w10"]
    options = dict(max_new_tokens=5, do_sample=False, stop_at_eos=False, verbose=False)
    batched = model.generate(prompts, **options)
    singles = [model.generate(p, **options) for p in prompts]
    assert isinstance(batched, list) and isinstance(singles[0], str) and batched == singles
    tokens = model.generate(prompts, return_type="tokens", **options)
    assert tokens.shape == (3, 10) and tokens[1, :3].tolist() == [1, 1, 1]  # left padding
    uncached = model.generate(prompts, return_type="tokens", use_past_kv_cache=False, **options)
    assert torch.equal(uncached, tokens)
    for row, prompt in enumerate(prompts):
        alone = model.generate(model.to_tokens(prompt), **options)
        assert torch.equal(tokens[row, 5 - len(prompt.split()) :], alone[0])


def test_the_penalties_of_a_left_padded_batch_do_not_count_its_padding():
    """Documented (docs/hooks.md), untested until audit 101: a prompt of a left-padded
    batch continues as it does alone under a repetition penalty, also when the pad token
    is the likeliest next token (its logit made the top one here), which a penalty
    counting the padding would divide by 3. Greedily (do_sample=False) and through the
    sampling path at temperature 0, with and without the cache."""
    model = routed_model("kimi")
    prompts = ["w1 w2 w3 w4 w5", "w6"]
    with torch.no_grad():
        top = int(model(model.to_tokens(prompts[1]))[0, -1].argmax())
        model.unembed.W_U[:, model.tokenizer.pad_token_id] = model.unembed.W_U[:, top] * 1.01
    options = dict(max_new_tokens=4, stop_at_eos=False, verbose=False, repetition_penalty=3.0)
    for greedy in (dict(do_sample=False), dict(temperature=0.0)):
        alone = model.generate(model.to_tokens(prompts[1]), **greedy, **options)
        assert alone[0, 1] == model.tokenizer.pad_token_id  # the pad token is chosen
        for cached in (True, False):
            batched = model.generate(
                prompts, return_type="tokens", use_past_kv_cache=cached, **greedy, **options
            )
            assert torch.equal(batched[1, -alone.shape[1] :], alone[0]), (greedy, cached)


def test_padding_without_a_pad_token_is_refused_where_it_would_be_read_as_text():
    """Audit 101: with a tokenizer that has no pad token (nor an end token, which
    set_tokenizer takes for it), to_tokens padded with token 0, a real token ("w0" here),
    and generate(["w1 w2 w3", "w4"]) returned "w0 w0 w4 w30 w19 w35" for the short prompt:
    its padding read as text. TransformerLens's tokenizer refuses to pad there; so do
    to_tokens and generate. The mask of to_tokens_and_mask marks the padding, so it and
    string forward passes still pad, and generate takes its tokens with that mask."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = routed_model("kimi")
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    model.set_tokenizer(PreTrainedTokenizerFast(tokenizer_object=backend))
    assert model.tokenizer.pad_token_id is None and model.to_single_token("w0") == 0
    prompts = ["w1 w2 w3", "w4"]
    options = dict(max_new_tokens=3, do_sample=False, stop_at_eos=False, verbose=False)
    with pytest.raises(ValueError, match="generate pads prompts of different lengths, and the"):
        model.generate(prompts, **options)
    for side in ("left", "right"):
        with pytest.raises(ValueError, match="the tokenizer has no pad token"):
            model.to_tokens(prompts, padding_side=side)
    assert model.to_tokens(["w1 w2", "w3 w4"]).tolist() == [[1, 2], [3, 4]]  # no padding
    tokens, mask = model.to_tokens_and_mask(prompts, padding_side="left")
    alone = model.generate(model.to_tokens(prompts[1]), **options)
    assert torch.equal(model.generate(tokens, attention_mask=mask, **options)[1, 2:], alone[0])
    torch.testing.assert_close(model(prompts)[1, :1], model(prompts[1])[0])


def test_padding_refusal_names_set_tokenizer_for_a_tokenizer_with_an_end_token():
    """Audit 104: a tokenizer with an end token but no pad token, attached without
    set_tokenizer (model.tokenizer = ..., which the trainer's message suggests), is refused
    padding too, and the message said it had "no pad token (nor an end token, which
    set_tokenizer takes for it)": false, and without the remedy that fits. It names the
    end token and set_tokenizer, which pads with it (tested: the batch then pads with it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = routed_model("kimi")
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    model.tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="w39")
    prompts = ["w1 w2 w3", "w4"]
    message = r"no pad token, and its end token 'w39' is not taken for it: attach it with"
    with pytest.raises(ValueError, match=message):
        model.to_tokens(prompts)
    with pytest.raises(ValueError, match=message):
        model.generate(prompts, max_new_tokens=1, verbose=False)
    model.set_tokenizer(model.tokenizer)  # the remedy named
    assert model.to_tokens(prompts, padding_side="right").tolist() == [[1, 2, 3], [4, 39, 39]]


def test_the_strings_of_masked_token_prompts_leave_their_padding_out():
    """Audit 101: generate(tokens, attention_mask=mask, return_type="str") decoded every
    token, so padding of an id that is not a special token of the tokenizer (here w2, as
    a pad id 0 is a real token of many vocabularies) was read as text: "w2 w2 w4 ..."
    for the short prompt (TransformerBridge decodes it too). Each string is now decoded
    from its prompt's real tokens and the continuation: the string of the prompt alone."""
    model = routed_model("kimi")
    options = dict(max_new_tokens=3, do_sample=False, stop_at_eos=False, verbose=False)
    tokens, mask = model.to_tokens_and_mask(["w1 w2 w3", "w4"], padding_side="left")
    tokens = tokens.masked_fill(mask == 0, model.to_single_token("w2"))
    texts = model.generate(tokens, attention_mask=mask, return_type="str", **options)
    alone = model.generate(model.to_tokens("w4"), return_type="str", **options)
    assert texts[1] == alone and texts[1].startswith("w4 ")
    assert texts[0] == model.generate(tokens[:1], return_type="str", **options)


def test_left_padded_tokens_with_padding_side_generate_as_with_their_mask():
    """TransformerLens 4.x's generate(tokens, padding_side="left") reads the mask off the
    leading pad tokens; padding_side was ignored here, so the padding was attended and the
    short prompt's continuation differed from the masked (and the unpadded) one."""
    model = routed_model("kimi")
    options = dict(max_new_tokens=4, do_sample=False, stop_at_eos=False, verbose=False)
    prompts = ["w1 w2 w3 w4", "w5 w6"]
    for pad_is_bos in (False, True):
        if pad_is_bos:  # the last leading pad token is then the BOS, a real token
            model.tokenizer.pad_token = "<bos>"
        tokens, mask = model.to_tokens_and_mask(
            prompts, prepend_bos=pad_is_bos, padding_side="left"
        )
        masked = model.generate(tokens, attention_mask=mask, **options)
        read = model.generate(tokens, padding_side="left", prepend_bos=pad_is_bos, **options)
        assert torch.equal(read, masked), pad_is_bos
        alone = model.generate(model.to_tokens(prompts[1], prepend_bos=pad_is_bos), **options)
        assert torch.equal(read[1, -alone.shape[1] :], alone[0])
    model.set_tokenizer(None)
    with pytest.raises(ValueError, match="reads the padding off the pad token"):
        model.generate(tokens, padding_side="left", **options)


class NumpyPadTokenizer:
    """A tokenizer whose ``pad_token_id`` is a NumPy integer (as a wrapper around another
    tokenizer library may give); everything else is the wrapped tokenizer's."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __len__(self):
        return len(self._inner)

    def __call__(self, *args, **kwargs):
        return self._inner(*args, **kwargs)

    @property
    def pad_token_id(self):
        return np.int64(self._inner.pad_token_id)


def test_the_pad_token_is_read_the_same_way_everywhere():
    """Audit finding: the left-padding warning took a NumPy pad id and generate(tokens,
    padding_side="left") refused it, saying no tokenizer with a pad token was attached;
    both now read it through one helper, and padding_side="left" gives the masked tokens."""
    model = routed_model("kimi")
    model.set_tokenizer(NumpyPadTokenizer(model.tokenizer))
    options = dict(max_new_tokens=4, do_sample=False, stop_at_eos=False, verbose=False)
    tokens, mask = model.to_tokens_and_mask(["w1 w2 w3 w4", "w5 w6"], padding_side="left")
    pad = model.tokenizer._inner.pad_token_id
    assert tokens[1, :2].tolist() == [pad, pad]
    masked = model.generate(tokens, attention_mask=mask, **options)
    assert torch.equal(model.generate(tokens, padding_side="left", **options), masked)
    model.tokenizer.padding_side = "left"  # the warning is for a model that pads on the left
    with pytest.warns(LeftPaddingWithoutMaskWarning, match=f"start with the pad token {pad} "):
        model(tokens)


def test_a_string_prompt_longer_than_n_ctx_is_refused_not_truncated():
    """generate tokenised strings with to_tokens's truncation to n_ctx, so a 35-word prompt
    (n_ctx=32) was cut to its first 32 tokens and continued from there, returning a
    different prompt; TransformerLens 4.x's generate does not truncate."""
    model = routed_model("none")
    prompt = " ".join(WORDS[:35])
    for prompts in (prompt, [prompt, "w1"]):
        with pytest.raises(ValueError, match="sequence length 35 exceeds n_ctx=32"):
            model.generate(
                prompts, max_new_tokens=1, do_sample=False, stop_at_eos=False, verbose=False
            )


def test_sampling_is_reproducible_with_a_generator():
    model = routed_model("kimi")
    prompt = torch.randint(0, 50, (3, 3), generator=torch.Generator().manual_seed(0))

    def run(seed, **kwargs):
        return model.generate(
            prompt,
            max_new_tokens=8,
            stop_at_eos=False,
            verbose=False,
            generator=torch.Generator().manual_seed(seed),
            **kwargs,
        )

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
    # the cache changes nothing about which tokens are drawn
    assert torch.equal(run(4, top_k=5), run(4, top_k=5, use_past_kv_cache=False))
    # the global RNG (TransformerLens's convention) is reproducible too
    torch.manual_seed(7)
    first = model.generate(prompt, max_new_tokens=5, stop_at_eos=False, verbose=False)
    torch.manual_seed(7)
    assert torch.equal(
        first, model.generate(prompt, max_new_tokens=5, stop_at_eos=False, verbose=False)
    )


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"temperature": 0.7},
        {"top_k": 3},
        {"top_k": 1000},
        {"top_p": 0.6},
        {"freq_penalty": 1.5},
        {"repetition_penalty": 1.8, "temperature": 0.5},
        {"temperature": 0.0, "repetition_penalty": 2.0},
    ],
)
def test_sampling_draws_what_transformerlens_draws(options):
    """In float32 and float64 (TransformerLens filters in the logits' dtype, as here;
    bfloat16 logits are filtered in float32 here and in bfloat16 there, documented)."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 30, generator=generator) * 2
    tokens = torch.randint(0, 30, (4, 6), generator=generator)
    for seed, dtype in itertools.product(range(5), (torch.float32, torch.float64)):
        torch.manual_seed(seed)
        ours = sample_logits(logits.to(dtype), tokens=tokens, **options)
        torch.manual_seed(seed)
        theirs = tl_sample_logits(logits.to(dtype), tokens=tokens, **options)
        assert torch.equal(ours, theirs), (options, seed, dtype)


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(2000, 1)
    generator = torch.Generator().manual_seed(0)
    assert set(sample_logits(logits, top_k=2, generator=generator).tolist()) == {0, 1}
    probs = logits[0].softmax(-1)  # 0.64, 0.23, 0.09, ...: top_p=0.8 keeps the first two
    assert probs[0] < 0.8 < probs[:2].sum()
    assert set(sample_logits(logits, top_p=0.8, generator=generator).tolist()) == {0, 1}
    drawn = sample_logits(logits, generator=generator)
    frequency = torch.bincount(drawn, minlength=5) / 2000
    assert torch.allclose(frequency, probs, atol=0.04)


# --- the sampling distribution, exactly (audit 25) ------------------------------------
def reference_distribution(logits, tokens, top_k, top_p, temperature, freq, repetition):
    """TransformerLens's documented sample_logits rules in plain Python floats (float64),
    one row: repetition penalty on the tokens seen (divide a positive logit, multiply a
    negative one), divide by the temperature, subtract freq * count, keep the top_k largest
    (ties with the k-th kept) or every token whose more likely tokens have mass <= top_p."""
    values = [float(v) for v in logits]
    counts = [tokens.count(i) for i in range(len(values))]
    values = [
        (v / repetition if v > 0 else v * repetition) if c else v
        for v, c in zip(values, counts, strict=True)
    ]
    values = [v / temperature - freq * c for v, c in zip(values, counts, strict=True)]
    keep = [True] * len(values)
    if top_k is not None:
        kth = sorted(values, reverse=True)[min(top_k, len(values)) - 1]
        keep = [v >= kth for v in values]
    elif top_p is not None:
        total = sum(math.exp(v) for v in values)
        mass_before = 0.0
        for index in sorted(range(len(values)), key=lambda i: -values[i]):
            keep[index] = mass_before <= top_p
            mass_before += math.exp(values[index]) / total
    weights = [math.exp(v) if k else 0.0 for v, k in zip(values, keep, strict=True)]
    return [w / sum(weights) for w in weights]


def test_sampling_probabilities_follow_the_documented_rules():
    """sampling_probabilities (what sample_logits draws from) equals the rules computed
    independently, for every combination of temperature, top_k, top_p and the penalties,
    on logits with ties at the top-k boundary and negative logits of seen tokens; and
    equals Hugging Face's logits processors where the two agree (not freq_penalty, a
    TransformerLens option, nor the top_p boundary, below)."""
    import transformers.generation.logits_process as hf

    logits = torch.tensor([[2.0, 1.0, 1.0, -0.5, -2.0, 0.35], [0.1, -1.0, 3.0, 3.0, -0.2, 0.0]])
    tokens = torch.tensor([[1, 4, 4, 0], [3, 1, 1, 5]])  # seen: a positive and negative logit
    grid = itertools.product(
        (0.5, 1.0, 2.5),
        [(None, None), (1, None), (2, None), (3, None), (99, None)]
        + [(None, p) for p in (0.2, 0.6, 0.9, 1.0)],
        (0.0, 0.7),
        (1.0, 1.6, 0.8),
    )
    for temperature, (top_k, top_p), freq, repetition in grid:
        options = dict(
            top_k=top_k,
            top_p=top_p,
            temperature=temperature,
            freq_penalty=freq,
            repetition_penalty=repetition,
            tokens=tokens,
        )
        probs = sampling_probabilities(logits, **options)
        for row in range(2):
            expected = reference_distribution(
                logits[row].tolist(),
                tokens[row].tolist(),
                top_k,
                top_p,
                temperature,
                freq,
                repetition,
            )
            assert probs[row].tolist() == pytest.approx(expected, abs=1e-6), options
        if freq == 0:  # without ties: at a top_p boundary HF keeps the other one (below)
            untied = logits + 1e-3 * torch.arange(6.0)
            processors = [hf.RepetitionPenaltyLogitsProcessor(repetition)]
            processors.append(hf.TemperatureLogitsWarper(temperature))
            if top_k is not None:
                processors.append(hf.TopKLogitsWarper(top_k))
            if top_p is not None and top_p < 1:
                processors.append(hf.TopPLogitsWarper(top_p))
            scores = untied.clone()
            for processor in processors:
                scores = processor(tokens, scores)
            ours = sampling_probabilities(untied, **options)
            torch.testing.assert_close(ours, scores.softmax(-1), rtol=0, atol=1e-6)
    # temperature 0: one-hot at the argmax of the penalised logits (token 2 ties 3 in row 1
    # before the penalty; 3 was seen, so 2 wins)
    greedy = sampling_probabilities(logits, temperature=0.0, repetition_penalty=1.5, tokens=tokens)
    assert greedy.argmax(-1).tolist() == [0, 2] and greedy.sum(-1).tolist() == [1.0, 1.0]
    # the draws follow the distribution (a chi-square bound at 6 - 1 degrees of freedom)
    options = dict(top_p=0.9, temperature=1.3, freq_penalty=0.4, repetition_penalty=1.2)
    many = logits[:1].repeat(20000, 1)
    drawn = sample_logits(
        many,
        tokens=tokens[:1].repeat(20000, 1),
        generator=torch.Generator().manual_seed(3),
        **options,
    )
    expected = sampling_probabilities(logits[:1], tokens=tokens[:1], **options)[0] * 20000
    observed = torch.bincount(drawn, minlength=6).double()
    support = expected > 0
    assert (observed[~support] == 0).all()
    chi2 = ((observed[support] - expected[support]) ** 2 / expected[support]).sum()
    assert chi2 < 20.5  # the 0.999 quantile of chi2 with 5 degrees of freedom


def top_p_support(logits: list[float], top_p: float) -> list[bool]:
    """The tokens top_p keeps, by its rule in plain Python floats (float64): every token
    whose more likely tokens have a mass of at most top_p."""
    total = sum(math.exp(v) for v in logits)
    keep, mass_before = [True] * len(logits), 0.0
    for index in sorted(range(len(logits)), key=lambda i: -logits[i]):
        keep[index] = mass_before <= top_p
        mass_before += math.exp(logits[index]) / total
    return keep


def test_top_p_follows_its_rule_over_a_large_vocabulary():
    """Audit 101: the mass before each token was summed in float32 (as TransformerLens
    does), which over a large vocabulary drifts by up to 2e-5. So top_p=1.0, which
    TransformerLens documents as "sample from all tokens", dropped 575 to 960 of these
    1000 tokens (131305 of 151936 on Qwen3-sized logits), and top_p=0.999 kept 1 to 3
    tokens of 20000 that its rule drops. Compared with the rule in plain Python."""
    generator = torch.Generator().manual_seed(0)
    wide = torch.randn(4, 20000, generator=generator) * 3
    logits = torch.randn(4, 1000, generator=generator) * 8
    assert torch.equal(sampling_probabilities(logits, top_p=1.0), sampling_probabilities(logits))
    for top_p in (0.9, 0.999):
        kept = sampling_probabilities(wide, top_p=top_p) > 0
        for row in range(4):
            assert kept[row].tolist() == top_p_support(wide[row].tolist(), top_p), (top_p, row)


def test_top_p_keeps_one_token_more_than_hugging_face_at_an_exact_boundary():
    """Documented differences: when the tokens before one reach top_p exactly, that token
    is kept (TransformerLens's rule) where Hugging Face stops; of tokens tied at the
    boundary, the lower id is kept (a stable sort; Hugging Face keeps the higher)."""
    import transformers.generation.logits_process as hf

    logits = torch.zeros(1, 4)  # probabilities 1/4 each, exact: masses before 0, 1/4, 1/2, 3/4
    probs = sampling_probabilities(logits, top_p=0.5)
    assert probs[0].tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0], abs=1e-7)
    theirs = hf.TopPLogitsWarper(0.5)(torch.zeros(1, 1, dtype=torch.long), logits).softmax(-1)
    assert theirs[0].tolist() == [0.0, 0.0, 0.5, 0.5]
    torch.manual_seed(0)
    drawn = tl_sample_logits(logits.repeat(400, 1), top_p=0.5)
    assert set(drawn.tolist()) == {0, 1, 2}  # TransformerLens keeps the third too
    # audit 101: the float32 logits log(0.5, 0.25, 0.125, 0.125) give token 0 a mass of
    # 0.5000000007 > top_p = 0.5, so the rule keeps token 0 alone; the mass summed in
    # float32 (TransformerLens) rounds to 0.5 and keeps token 1 too
    logits = torch.tensor([[0.5, 0.25, 0.125, 0.125]]).log()
    assert top_p_support(logits[0].tolist(), 0.5) == [True, False, False, False]
    assert sampling_probabilities(logits, top_p=0.5)[0].tolist() == [1.0, 0.0, 0.0, 0.0]
    drawn = tl_sample_logits(logits.repeat(400, 1), top_p=0.5)
    assert set(drawn.tolist()) == {0, 1}
    # of tied tokens at the boundary the lower id is kept (Hugging Face keeps the higher)
    tied = torch.tensor([[0.0, 1.0, 1.0, -1.0]])
    assert sampling_probabilities(tied, top_p=0.3)[0].tolist() == [0.0, 1.0, 0.0, 0.0]
    theirs = hf.TopPLogitsWarper(0.3)(torch.zeros(1, 1, dtype=torch.long), tied).softmax(-1)
    assert theirs[0].tolist() == [0.0, 0.0, 1.0, 0.0]


def test_float64_logits_are_penalised_and_filtered_in_float64():
    """Audit finding: sample_logits rounded the logits to float32 before the penalties and
    filters, so in a float64 model two logits 1e-12 apart tied: greedy decoding with a
    repetition penalty (on another token) chose token 0 where TransformerLens and the same
    call without the penalty choose 1, and top_k=1 sampled token 0 in about half of the
    draws."""
    logits = torch.tensor([[1.0, 1.0 + 1e-12, -5.0]], dtype=torch.float64)
    seen = torch.tensor([[2]])
    assert logits.argmax(-1).item() == 1
    options = dict(temperature=0.0, repetition_penalty=1.5, tokens=seen)
    assert sample_logits(logits, **options).item() == 1
    assert tl_sample_logits(logits, **options).item() == 1
    many = logits.repeat(200, 1)
    drawn = sample_logits(many, top_k=1, generator=torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {1}
    drawn = sample_logits(
        many,
        top_k=1,
        repetition_penalty=1.5,
        tokens=seen.repeat(200, 1),
        generator=torch.Generator().manual_seed(0),
    )
    assert set(drawn.tolist()) == {1}


def test_bad_sampling_arguments_and_non_finite_logits_are_refused():
    """Audit findings: freq_penalty=nan was skipped silently (the draw was that of no
    penalty); a NaN temperature or repetition penalty, an infinite freq_penalty, a
    temperature of 1e-39 (logits / temperature overflows) and NaN logits crashed in
    torch.multinomial ("probability tensor contains either inf, nan or element < 0"), and
    greedy decoding of NaN logits returned a token; top_k with top_p ignored top_p
    silently (Hugging Face applies both); generate(do_sample=False) did not check top_k,
    top_p or temperature, and read stop_at_eos="no" as True."""
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    seen = torch.tensor([[0, 1]])
    for name, value in (
        ("freq_penalty", float("nan")),
        ("freq_penalty", float("inf")),
        ("repetition_penalty", float("nan")),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("temperature", True),
    ):
        with pytest.raises(ValueError, match=f"{name} must be a finite number, got {value}"):
            sample_logits(logits, tokens=seen, **{name: value})
    with pytest.raises(ValueError, match=r"top_k=2 and top_p=0.5 were both given"):
        sample_logits(logits, top_k=2, top_p=0.5)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\] or None, got True"):
        sample_logits(logits, top_p=True)
    with pytest.raises(ValueError, match=r"temperature=1e-39 overflow float32 .* use temperat"):
        sample_logits(logits, temperature=1e-39)
    for bad_logit in (float("nan"), float("inf")):
        broken = torch.tensor([[1.0, bad_logit, 0.0], [1.0, 2.0, 0.0]])
        with pytest.raises(ValueError, match=r"row\(s\) \[0\]: .* the model's logits"):
            sample_logits(broken)
    with pytest.raises(ValueError, match=r"row\(s\) \[0\]: .* the model's logits"):
        sample_logits(torch.tensor([[1.0, float("nan"), 0.0]]), temperature=0.0)
    with pytest.raises(ValueError, match=r"row\(s\) \[0\]: .* no finite value"):
        sample_logits(torch.full((1, 3), float("-inf")))
    # -inf logits (a hook banning tokens) are fine: never drawn
    banned = torch.tensor([[1.0, float("-inf"), 0.0]]).repeat(500, 1)
    assert 1 not in sample_logits(banned, generator=torch.Generator().manual_seed(0)).tolist()
    model = routed_model("kimi")
    prompt = torch.randint(0, 50, (1, 3), generator=torch.Generator().manual_seed(0))
    greedy = dict(do_sample=False, stop_at_eos=False, verbose=False)
    for options, message in (
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": 0}, "top_k must be an integer >= 1"),
        ({"temperature": -0.5}, "temperature must be >= 0"),
        ({"freq_penalty": float("nan")}, "freq_penalty must be a finite number"),
    ):
        with pytest.raises(ValueError, match=message):
            model.generate(prompt, **options, **greedy)
    for flag in ("stop_at_eos", "do_sample", "use_past_kv_cache", "verbose"):
        with pytest.raises(TypeError, match=f"{flag} must be True or False, got 'no'"):
            model.generate(prompt, **{**greedy, flag: "no"})
    # greedy ignores them when valid, as TransformerLens does
    plain = model.generate(prompt, **greedy)
    assert torch.equal(model.generate(prompt, top_k=3, temperature=0.5, **greedy), plain)


def test_greedy_decoding_refuses_a_row_with_every_token_banned():
    """Audit finding: a row whose logits are all -inf (a hook on the unembedding banning
    every token) has no token to choose; sampling refused it, but greedy decoding
    (do_sample=False, temperature=0) returned token 0 silently, the argmax of a row of
    ties. A row with a +inf logit still has its argmax."""
    banned_row0 = torch.tensor([[float("-inf")] * 4, [0.0, 2.0, float("-inf"), 1.0]])
    message = r"row\(s\) \[0\]: .*no finite value"
    for temperature in (0.0, 1.0):
        with pytest.raises(ValueError, match=message):
            sample_logits(banned_row0, temperature=temperature)
        with pytest.raises(ValueError, match=message):
            sampling_probabilities(banned_row0, temperature=temperature)
    plus_inf = torch.tensor([[float("-inf"), float("inf"), float("-inf")]])
    assert sample_logits(plus_inf, temperature=0.0).tolist() == [1]
    model = routed_model("kimi")
    prompt = torch.randint(3, 50, (2, 3), generator=torch.Generator().manual_seed(0))

    def ban_everything_for_prompt_0(module, args, logits):
        return torch.cat((torch.full_like(logits[:1], float("-inf")), logits[1:]))

    handle = model.unembed.register_forward_hook(ban_everything_for_prompt_0)
    try:
        for cached in (True, False):
            with pytest.raises(ValueError, match=message):
                model.generate(
                    prompt,
                    do_sample=False,
                    stop_at_eos=False,
                    use_past_kv_cache=cached,
                    verbose=False,
                )
    finally:
        handle.remove()


def test_penalty_tokens_of_another_shape_than_the_logits_are_refused():
    """Audit finding: sample_logits / sampling_probabilities with tokens of one prompt for
    logits of two penalised the first prompt only (scatter_add fills the rows it is
    given), so the second was drawn from its unpenalised distribution, silently; [pos]
    tokens, float tokens, ids outside [0, d_vocab) and a token_mask of another shape than
    the tokens crashed in torch.scatter_add_ with messages about an index tensor."""
    logits = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    seen = torch.tensor([[0, 1], [0, 1]])
    penalised = sampling_probabilities(logits, repetition_penalty=3.0, tokens=seen)
    # each row penalised alone (an independent computation: one row, its own tokens)
    for row in range(2):
        alone = sampling_probabilities(
            logits[row : row + 1], repetition_penalty=3.0, tokens=seen[row : row + 1]
        )
        torch.testing.assert_close(penalised[row : row + 1], alone, rtol=0, atol=0)
    cases = [
        (
            dict(tokens=seen[:1]),
            ValueError,
            r"tokens must be \[batch, pos\] = \[2, pos\].*got shape \(1, 2\)",
        ),
        (
            dict(tokens=seen[0]),
            ValueError,
            r"tokens must be \[batch, pos\] = \[2, pos\].*got shape \(2,\)",
        ),
        (dict(tokens=seen.float()), TypeError, "token ids must be an integer tensor"),
        (dict(tokens=seen + 2), ValueError, r"token ids must be in \[0, 3\)"),
        (
            dict(tokens=seen, token_mask=seen[:, :1].bool()),
            ValueError,
            r"token_mask must have the shape of the tokens \(2, 2\), got \(2, 1\)",
        ),
    ]
    for kwargs, error, message in cases:
        for penalty in (dict(repetition_penalty=3.0), dict(freq_penalty=1.0)):
            for function in (sample_logits, sampling_probabilities):
                with pytest.raises(error, match=message):
                    function(logits, **penalty, **kwargs)


def test_penalty_tokens_of_any_integer_dtype_are_counted():
    """Audit finding: sample_logits / sampling_probabilities with uint8 or int16 penalty
    tokens (accepted as integer ids by the shape check) crashed in scatter_add_
    ("Expected dtype int32/int64 for index"). They count as the same ids in int64; the
    reference is TransformerLens's sample_logits's penalty rule written out per row."""
    logits = torch.tensor([[3.0, -2.0, 1.0, 0.5], [0.2, 2.0, -1.0, 1.0]], dtype=torch.float64)
    seen = torch.tensor([[0, 1, 1], [2, 3, 3]])
    penalised = logits.clone()
    for row in range(2):
        ids = seen[row].unique()
        score = logits[row, ids]
        penalised[row, ids] = torch.where(score > 0, score / 2.0, score * 2.0)
        penalised[row] -= 0.5 * torch.bincount(seen[row], minlength=4)
    expected = penalised.softmax(dim=-1).float()
    for dtype in (torch.uint8, torch.int16, torch.int32, torch.long):
        got = sampling_probabilities(
            logits, repetition_penalty=2.0, freq_penalty=0.5, tokens=seen.to(dtype)
        )
        torch.testing.assert_close(got, expected)
        draws = sample_logits(
            logits.repeat(50, 1), repetition_penalty=2.0, tokens=seen.to(dtype).repeat(50, 1)
        )
        assert draws.shape == (100,)


def test_logits_that_are_not_batch_by_vocab_are_refused_by_sampling():
    """Audit finding: sample_logits took the logits of every position ([batch, pos,
    d_vocab], model(tokens) itself) and returned a [batch, pos] argmax greedily, sampled
    crashed with "prob_dist must be 1 or 2 dim", and sampling_probabilities returned a
    [batch, pos, d_vocab] tensor; [d_vocab] logits gave a 0-d token greedily and "too
    many indices" sampled. They are the last position's logits, [batch, d_vocab]."""
    message = r"final_logits must be \[batch, d_vocab\], .*logits\[:, -1\].*got shape"
    for logits in (torch.randn(2, 3, 5), torch.randn(5)):
        for temperature in (0.0, 1.0):
            for function in (sample_logits, sampling_probabilities):
                with pytest.raises(ValueError, match=message):
                    function(logits, temperature=temperature)
    with pytest.raises(TypeError, match="final_logits must be a floating-point tensor"):
        sample_logits(torch.tensor([[3, 1, 2]]), temperature=0.0)
    logits = torch.randn(2, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_logits(logits, temperature=0.0), logits.argmax(dim=-1))


def test_top_k_with_top_p_is_refused_only_where_they_filter():
    """``top_k`` with ``top_p`` is ambiguous only when sampling (TransformerLens keeps
    ``top_k`` and drops ``top_p``, Hugging Face applies both). Greedy decoding
    (``do_sample=False``, or ``temperature=0``) takes the argmax, which neither filter
    changes in either library (TransformerLens 4.3's ``sample_logits`` returns it before
    reading them), so there the pair is accepted and changes nothing; it was refused."""
    logits = torch.randn(3, 7, generator=torch.Generator().manual_seed(0))
    both = dict(top_k=2, top_p=0.5)
    argmax = logits.argmax(dim=-1)
    assert torch.equal(sample_logits(logits, temperature=0.0, **both), argmax)
    assert torch.equal(tl_sample_logits(logits, temperature=0.0, **both), argmax)
    one_hot = torch.nn.functional.one_hot(argmax, 7).float()
    assert torch.equal(sampling_probabilities(logits, temperature=0.0, **both), one_hot)
    model = routed_model("kimi")
    prompt = torch.randint(0, 50, (1, 3), generator=torch.Generator().manual_seed(0))
    greedy = dict(do_sample=False, stop_at_eos=False, verbose=False, max_new_tokens=4)
    plain = model.generate(prompt, **greedy)
    assert torch.equal(model.generate(prompt, **both, **greedy), plain)
    sampled_at_zero = dict(greedy, do_sample=True, temperature=0.0)
    assert torch.equal(model.generate(prompt, **both, **sampled_at_zero), plain)
    # where they filter, still refused (the message says why and what to do)
    message = r"top_k=2 and top_p=0.5 were both given: .*ignores top_p.*give one of them"
    with pytest.raises(ValueError, match=message):
        sample_logits(logits, **both)
    with pytest.raises(ValueError, match=message):
        sampling_probabilities(logits, temperature=0.5, **both)
    with pytest.raises(ValueError, match=message):
        model.generate(prompt, **both, **dict(greedy, do_sample=True))


def test_top_k_with_top_p_one_samples_as_top_k_alone():
    """Audit 104: since top_p=1 keeps every token (audit 101), top_k with top_p=1.0 is
    top_k alone, in TransformerLens (which ignores top_p beside top_k) and in Hugging Face
    (whose generate adds no top_p filter at top_p=1.0; its warpers applied one after the
    other give top_k's distribution): accepted (it was refused as an ambiguous pair), the
    same distribution and, under one seed, TransformerLens's draws."""
    import transformers.generation.logits_process as hf

    logits = torch.randn(64, 30, generator=torch.Generator().manual_seed(0)) * 2
    probs = sampling_probabilities(logits, top_k=5, top_p=1.0)
    assert torch.equal(probs, sampling_probabilities(logits, top_k=5))
    ids = torch.zeros(64, 1, dtype=torch.long)
    theirs = hf.TopPLogitsWarper(1.0)(ids, hf.TopKLogitsWarper(5)(ids, logits)).softmax(-1)
    torch.testing.assert_close(probs, theirs)
    torch.manual_seed(3)
    expected = tl_sample_logits(logits, top_k=5, top_p=1.0)
    torch.manual_seed(3)
    assert torch.equal(sample_logits(logits, top_k=5, top_p=1.0), expected)
    model = routed_model("kimi")
    prompt = torch.randint(0, 50, (1, 3), generator=torch.Generator().manual_seed(0))
    options = dict(stop_at_eos=False, verbose=False, max_new_tokens=4)
    drawn = model.generate(
        prompt, top_k=3, top_p=1.0, generator=torch.Generator().manual_seed(1), **options
    )
    alone = model.generate(prompt, top_k=3, generator=torch.Generator().manual_seed(1), **options)
    assert torch.equal(drawn, alone)


def test_greedy_generation_equals_hugging_face_generate():
    """Greedy generate of the none wrap of a float64 Qwen3 equals HF's
    generate(do_sample=False) token for token: left-padded, with and without the cache,
    stopping at a list of end tokens (HF fills a finished prompt with its pad token,
    TransformerLens and we with the end token) and with a repetition penalty."""
    hf = hf_qwen3().double()
    model = HookedAttnRes.from_hf_qwen3(hf_qwen3().double(), wrap="none", dtype=torch.float64)
    real = torch.randint(3, 61, (3, 6), generator=torch.Generator().manual_seed(0))
    tokens = torch.ones_like(real)  # pad id 1
    mask = torch.zeros_like(real)
    for row, length in enumerate((6, 2, 4)):
        tokens[row, 6 - length :], mask[row, 6 - length :] = real[row, :length], 1
    ours = dict(max_new_tokens=8, do_sample=False, verbose=False)
    theirs = dict(max_new_tokens=8, do_sample=False, pad_token_id=1)
    expected = hf.generate(tokens, attention_mask=mask, eos_token_id=None, **theirs)
    for cached in (True, False):
        out = model.generate(
            tokens, attention_mask=mask, stop_at_eos=False, use_past_kv_cache=cached, **ours
        )
        assert torch.equal(out, expected), cached
    ends = [int(expected[0, 8]), int(expected[1, 7])]  # rows 0 and 1 end early
    expected = hf.generate(tokens, attention_mask=mask, eos_token_id=ends, **theirs)
    out = model.generate(tokens, attention_mask=mask, eos_token_id=ends, **ours)
    assert out.shape == expected.shape
    for row in range(3):
        new = expected[row, 6:].tolist()
        stop = next((i + 1 for i, t in enumerate(new) if t in ends), len(new))
        assert out[row, : 6 + stop].tolist() == expected[row, : 6 + stop].tolist()
        assert set(out[row, 6 + stop :].tolist()) <= {ends[0]}  # HF: its pad token
        assert set(expected[row, 6 + stop :].tolist()) <= {1}
    expected = hf.generate(real, repetition_penalty=1.7, eos_token_id=None, **theirs)
    out = model.generate(real, repetition_penalty=1.7, stop_at_eos=False, **ours)
    assert torch.equal(out, expected)


def test_seeded_sampling_draws_what_hugging_face_generate_draws():
    """Independent reference (audit 149): under one torch.manual_seed, sampling from the
    none wrap, and from the exact wrap with rms_norm_eps=0 (where it is vanilla Qwen3),
    draws the same tokens as HF's generate(do_sample=True) of the same weights: left-padded
    prompts of three lengths, with and without the cache, with a temperature, top_k or
    top_p (HF's default top_k=50 switched off)."""
    real = torch.randint(3, 61, (3, 6), generator=torch.Generator().manual_seed(0))
    tokens, mask = torch.ones_like(real), torch.zeros_like(real)  # pad id 1
    for row, length in enumerate((6, 2, 4)):
        tokens[row, 6 - length :], mask[row, 6 - length :] = real[row, :length], 1
    for wrap, eps in (("none", 1e-6), ("exact", 0.0)):
        hf = hf_qwen3(rms_norm_eps=eps)
        model = HookedAttnRes.from_hf_qwen3(hf_qwen3(rms_norm_eps=eps), wrap=wrap)
        for options in (dict(temperature=0.7), dict(top_k=5), dict(top_p=0.8)):
            theirs = dict(dict(top_k=0, top_p=1.0, temperature=1.0), **options)
            torch.manual_seed(3)
            expected = hf.generate(
                tokens, attention_mask=mask, do_sample=True, max_new_tokens=8, pad_token_id=1,
                eos_token_id=None, **theirs,
            )  # fmt: skip
            for cached in (True, False):
                torch.manual_seed(3)
                out = model.generate(
                    tokens, attention_mask=mask, do_sample=True, max_new_tokens=8,
                    stop_at_eos=False, verbose=False, use_past_kv_cache=cached, **options,
                )  # fmt: skip
                assert torch.equal(out, expected), (wrap, options, cached)


@pytest.mark.parametrize("name", [*LAYOUTS, *(f"wrap={wrap}" for wrap in WRAPS)])
def test_each_generation_step_has_the_logits_of_the_unpadded_prompt_so_far(name):
    """Independent reference (audit 149): every step of seeded sampling from left-padded
    prompts of three lengths, with and without the key-value cache, reads the logits
    (recorded by a forward hook on the model) that a full forward of that prompt alone,
    unpadded, gives for the sequence so far, to 1e-12 in float64, in every layout and wrap."""
    if name.startswith("wrap"):
        model = wrapped_qwen3(name[5:], dtype=torch.float64)
    else:
        model = routed_model(name, dtype=torch.float64)
    lengths, width, steps = (6, 1, 4), 6, 6
    real = torch.randint(
        3, model.cfg.d_vocab, (3, width), generator=torch.Generator().manual_seed(1)
    )
    tokens, mask = torch.ones_like(real), torch.zeros_like(real)
    for row, length in enumerate(lengths):
        tokens[row, width - length :], mask[row, width - length :] = real[row, :length], 1
    runs = []
    for cached in (True, False):
        seen = []
        handle = model.register_forward_hook(lambda m, a, out, seen=seen: seen.append(out[:, -1]))
        try:
            out = model.generate(
                tokens, attention_mask=mask, max_new_tokens=steps, stop_at_eos=False,
                verbose=False, use_past_kv_cache=cached, generator=torch.Generator().manual_seed(5),
            )  # fmt: skip
        finally:
            handle.remove()
        runs.append(out)
        logits = torch.stack(seen, dim=1)  # [batch, steps, d_vocab]
        for row, length in enumerate(lengths):
            alone = model(out[row, width - length :][None])[0, length - 1 : length - 1 + steps]
            assert (logits[row] - alone).abs().max() < 1e-12, (name, cached, row)
    assert torch.equal(runs[0], runs[1])


def test_generate_refuses_return_type_str_without_a_tokenizer_before_generating():
    """Audit 149 finding: return_type="str" without a tokenizer was refused only after
    every token was generated (max_new_tokens forward passes, their tokens lost); now
    before the first pass, as every other bad argument."""
    model = tiny_model()
    passes = []
    handle = model.register_forward_hook(lambda module, args, out: passes.append(1))
    try:
        with pytest.raises(ValueError, match=r"return_type='str' needs a tokenizer"):
            model.generate(
                torch.tensor([[3, 4]]), max_new_tokens=5, return_type="str", stop_at_eos=False
            )
    finally:
        handle.remove()
    assert passes == []
    # a string prompt needs the tokenizer too: the remedy is not return_type='tokens' alone
    # (which then failed in to_tokens; audit 151)
    with pytest.raises(ValueError, match=r"needs a tokenizer; none is attached: call model\.set"):
        model.generate("w1 w2", max_new_tokens=1, return_type="str", stop_at_eos=False)


def test_generation_stops_at_eos_and_pads_finished_prompts():
    model = routed_model("none")
    prompt = torch.randint(0, 50, (2, 3), generator=torch.Generator().manual_seed(2))
    free = model.generate(
        prompt, max_new_tokens=6, do_sample=False, stop_at_eos=False, verbose=False
    )
    new = free[:, 3:]
    eos = int(new[0, 1])  # prompt 0 produces it at its second step
    assert eos not in new[0, :1].tolist()
    stopped = model.generate(
        prompt, max_new_tokens=6, do_sample=False, eos_token_id=eos, verbose=False
    )
    for row in range(2):
        produced = new[row].tolist()
        end = produced.index(eos) + 1 if eos in produced else 6
        assert stopped[row, 3 : 3 + end].tolist() == produced[:end]
        assert all(t == eos for t in stopped[row, 3 + end :].tolist())
    if eos not in new[1].tolist():  # prompt 1 never ends: the loop runs to max_new_tokens
        assert stopped.shape == (2, 9)
    both = {int(new[0, 1]), int(new[1, 0])}
    early = model.generate(
        prompt, max_new_tokens=6, do_sample=False, eos_token_id=list(both), verbose=False
    )
    assert early.shape[1] <= 3 + 2  # every prompt finished after at most two steps


def test_finished_prompts_are_filled_with_transformerlens_end_token():
    """With a list of end tokens, TransformerLens fills a finished prompt with the
    tokenizer's eos_token_id (the list's first only without one); the first of the list
    was used here, so the tokens after the end differed from TransformerLens's."""
    model = routed_model("none")
    model.tokenizer.eos_token = "w39"
    tokenizer_eos = model.tokenizer.eos_token_id
    prompt = torch.randint(0, 50, (2, 3), generator=torch.Generator().manual_seed(2))
    options = dict(max_new_tokens=6, do_sample=False, verbose=False)
    new = model.generate(prompt, stop_at_eos=False, **options)[:, 3:]
    end = int(new[0, 1])  # prompt 0 ends at its second step
    other = next(t for t in range(3, 50) if t not in (end, tokenizer_eos))
    assert tokenizer_eos not in new[0, :2].tolist()
    for eos_token_id, expected_fill in (([other, end], tokenizer_eos), (end, end)):
        stopped = model.generate(prompt, eos_token_id=eos_token_id, **options)
        assert stopped[0, 3:5].tolist() == new[0, :2].tolist()
        assert stopped.shape[1] > 5 and set(stopped[0, 5:].tolist()) == {expected_fill}
    model.tokenizer.eos_token = None
    stopped = model.generate(prompt, eos_token_id=[other, end], **options)
    assert set(stopped[0, 5:].tolist()) == {other}  # no tokenizer eos: the list's first


# the Bridge's key-value cached loop continues differently from HF's own generate on this
# tiny Qwen3 (its uncached loop, HF's generate and ours agree): compare with it uncached
BRIDGE_OPTIONS = dict(use_past_kv_cache=False)


def test_generate_returns_what_transformer_bridge_returns(tmp_path):
    """Audit finding: generate(tokens of one prompt, return_type="str") returned a list of
    one string; TransformerBridge 4.3 returns the string (as for a string prompt)."""
    bridge, model = transformer_bridge_pair(tmp_path, build_word_tokenizer(WORDS))
    options = dict(max_new_tokens=4, do_sample=False, stop_at_eos=False, verbose=False)
    tokens = model.to_tokens(["w1 w2 w3 w4", "w5"], padding_side="left")
    calls = [
        (tokens[:1], {"return_type": "str"}),
        (tokens, {"return_type": "str"}),
        (tokens[1:], {"return_type": "str", "padding_side": "left"}),
        (tokens, {"padding_side": "left"}),
        ("w1 w2", {}),
        (["w1 w2 w3", "w4"], {"prepend_bos": True}),
    ]
    for prompt, kwargs in calls:
        ours = model.generate(prompt, **kwargs, **options)
        theirs = bridge.generate(prompt, **kwargs, **options, **BRIDGE_OPTIONS)
        assert type(ours) is type(theirs), kwargs
        assert torch.equal(ours, theirs) if isinstance(ours, torch.Tensor) else ours == theirs
    # a [pos] prompt (which the Bridge fails on) is one prompt too
    one_row = model.generate(tokens[:1], return_type="str", **options)
    assert isinstance(one_row, str)
    assert model.generate(tokens[0], return_type="str", **options) == one_row
    # documented difference: a list of one string stays a list (the Bridge returns a str)
    theirs = bridge.generate(["w5 w6"], **options, **BRIDGE_OPTIONS)
    assert model.generate(["w5 w6"], **options) == [theirs]


def test_stop_at_eos_reads_the_end_token_as_transformer_bridge_does(tmp_path):
    """TransformerBridge 4.3 reads the end token from eos_token_id=, else cfg.eos_token_id
    (which no adapter sets for Qwen3), else the tokenizer, and refuses stop_at_eos without
    one (an AssertionError); so does generate here (a ValueError). Audit finding: a NumPy
    eos_token_id (as NumPy pad ids are taken elsewhere) crashed with "'numpy.int64'
    object is not iterable", a 0-d tensor with "iteration over a 0-d tensor"."""
    tokenizer = build_word_tokenizer(WORDS)
    bridge, model = transformer_bridge_pair(tmp_path, tokenizer)
    assert getattr(bridge.cfg, "eos_token_id", None) is None
    options = dict(max_new_tokens=5, do_sample=False, verbose=False, padding_side="left")
    tokens = model.to_tokens(["w1 w2 w3 w4", "w5"], padding_side="left")
    free = model.generate(tokens, stop_at_eos=False, **options)
    end = int(free[0, tokens.shape[1] + 1])  # prompt 0 ends at its second new token
    for side in (bridge, model):
        side.tokenizer.eos_token = model.tokenizer.convert_ids_to_tokens(end)
    ours = model.generate(tokens, **options)
    theirs = bridge.generate(tokens, **options, **BRIDGE_OPTIONS)
    assert torch.equal(ours, theirs)
    assert (ours[0, tokens.shape[1] + 2 :] == end).all()  # finished: filled with the end
    for given in (np.int64(end), [np.int64(end)], (end,)):
        assert torch.equal(model.generate(tokens, eos_token_id=given, **options), ours)
    with pytest.raises(ValueError, match=r"eos_token_id must be a token id or a list"):
        model.generate(tokens, eos_token_id=torch.tensor(end), **options)
    for side in (bridge, model):
        side.tokenizer.eos_token = None
    with pytest.raises(AssertionError, match="Must pass eos_token_id if stop_at_eos is True"):
        bridge.generate(tokens, **options, **BRIDGE_OPTIONS)
    with pytest.raises(ValueError, match="stop_at_eos=True needs an end-of-sequence token"):
        model.generate(tokens, **options)
    model.set_tokenizer(None)  # no tokenizer: the same refusal, and eos_token_id= works
    with pytest.raises(ValueError, match="stop_at_eos=True needs an end-of-sequence token"):
        model.generate(tokens, **dict(options, padding_side=None))
    no_tokenizer = model.generate(tokens, eos_token_id=end, **dict(options, padding_side=None))
    assert torch.equal(no_tokenizer[0], ours[0])  # prompt 0 has no padding to mask


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")  # HF's
def test_transformer_bridge_puts_the_default_bos_in_a_continuation_ours_refuses(tmp_path):
    """Audit 232: docs/hooks.md says TransformerLens prepends the default BOS to text that
    continues a key-value cache, silently, where ours refuses it: TransformerBridge 4.3
    with ``default_prepend_bos=True`` embeds ``[bos, w4, w5]`` after ``[bos, w1, w2, w3]``
    (its ``to_tokens`` reads the default, as HookedTransformer's forward did)."""
    bridge, model = transformer_bridge_pair(tmp_path, build_word_tokenizer(WORDS))
    bridge.cfg.default_prepend_bos = model.cfg.default_prepend_bos = True
    bos = model.tokenizer.bos_token_id
    ids = model.to_tokens("w1 w2 w3 w4 w5", prepend_bos=False)[0].tolist()
    embedded: list = []
    embed = bridge.original_model.model.embed_tokens
    handle = embed.register_forward_hook(lambda _m, args, _o: embedded.append(args[0].tolist()))
    try:
        _, hf_cache = bridge("w1 w2 w3", return_type="logits_and_cache")
        bridge(" w4 w5", past_key_values=hf_cache)  # no error
    finally:
        handle.remove()
    assert embedded == [[[bos, *ids[:3]]], [[bos, *ids[3:]]]]
    kv = KeyValueCache.init_cache(model.cfg)
    model("w1 w2 w3", past_kv_cache=kv)
    with pytest.raises(ValueError, match="would put a BOS token in the middle of the seq"):
        model(" w4 w5", past_kv_cache=kv)


def test_max_new_tokens_follows_the_integer_rule():
    """max_new_tokens is checked by require_integer, as top_k and every integer argument
    (one wording, ValueError): it had its own check and messages ("must be an integer", a
    TypeError, beside "must be at least 1"). A NumPy integer generates what the int does."""
    model = routed_model("kimi")
    prompt = torch.randint(0, 50, (1, 3), generator=torch.Generator().manual_seed(0))
    quiet = {"verbose": False, "stop_at_eos": False, "do_sample": False}
    for bad in (2.5, True, "3", torch.tensor(3), np.array([3]), None, -1):
        with pytest.raises(ValueError, match=r"^max_new_tokens must be an integer >= 1, got "):
            model.generate(prompt, max_new_tokens=bad, **quiet)
    want = model.generate(prompt, max_new_tokens=2, **quiet)
    got = model.generate(prompt, max_new_tokens=np.int64(2), **quiet)
    assert got.shape == (1, 5) and torch.equal(got, want)


def test_an_array_choice_is_refused_by_name():
    """return_type / padding_side are tested by type before equality (`require_choice`):
    ``value in choices`` compared a NumPy array elementwise, which raised NumPy's
    "truth value of an array ... is ambiguous" naming no argument, and took a 0-d
    ``np.array("str")`` as "str". A NumPy string scalar is the string it holds."""
    model = routed_model("kimi")
    prompt = torch.randint(0, 50, (1, 3), generator=torch.Generator().manual_seed(0))
    quiet = {"verbose": False, "stop_at_eos": False, "do_sample": False, "max_new_tokens": 1}
    allowed = re.escape("('input', 'str', 'tokens', None)")
    for bad in (np.array(["str", "tokens"]), np.array("tokens"), torch.tensor([1, 2]), ["str"]):
        with pytest.raises(ValueError, match=rf"^return_type must be one of {allowed}, got "):
            model.generate(prompt, return_type=bad, **quiet)
        with pytest.raises(ValueError, match=r"^padding_side must be one of \('left', 'right', "):
            model.generate(prompt, padding_side=bad, **quiet)
        with pytest.raises(ValueError, match=r"^return_type must be one of \('logits', 'loss', "):
            model(prompt, return_type=bad)
    want = model.generate(prompt, return_type="tokens", **quiet)
    assert torch.equal(model.generate(prompt, return_type=np.str_("tokens"), **quiet), want)
    torch.testing.assert_close(model(prompt, return_type=np.str_("logits")), model(prompt))


def test_bad_generation_arguments_are_refused():
    model = routed_model("kimi")
    prompt = torch.randint(0, 50, (1, 3))
    quiet = {"verbose": False}
    with pytest.raises(ValueError, match=r"^max_new_tokens must be an integer >= 1, got 0$"):
        model.generate(prompt, max_new_tokens=0, **quiet)
    with pytest.raises(ValueError, match="return_type must be one of"):
        model.generate(prompt, return_type="logits", **quiet)
    with pytest.raises(ValueError, match="stop_at_eos=True needs an end-of-sequence token"):
        model.generate(prompt, **quiet)  # the word tokenizer has no eos token
    with pytest.raises(ValueError, match="eos_token_id must be a token id"):
        model.generate(prompt, eos_token_id=99, **quiet)
    with pytest.raises(ValueError, match="padding_side='right' is not supported here"):
        model.generate(["w1", "w2 w3"], padding_side="right", stop_at_eos=False, **quiet)
    with pytest.raises(ValueError, match=r"prompt\(s\) \[0\] end in padding"):
        model.generate(
            torch.tensor([[1, 2, 0]]),
            attention_mask=torch.tensor([[1, 1, 0]]),
            stop_at_eos=False,
            **quiet,
        )
    with pytest.raises(ValueError, match="needs 33 positions, more than n_ctx=32"):
        model.generate(
            torch.zeros(1, 30, dtype=torch.long), max_new_tokens=4, stop_at_eos=False, **quiet
        )
    assert model.generate(
        prompt[:, :1].repeat(1, 30), max_new_tokens=3, stop_at_eos=False, **quiet
    ).shape == (1, 33)
    with pytest.raises(ValueError, match="no effect with do_sample=False"):
        model.generate(prompt, do_sample=False, generator=torch.Generator(), **quiet)
    # audit finding: temperature=0 decodes greedily too, and took a generator silently
    with pytest.raises(ValueError, match=r"no effect with temperature=0 \(greedy"):
        model.generate(
            prompt, temperature=0, generator=torch.Generator(), stop_at_eos=False, **quiet
        )
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        model.generate(prompt, top_p=1.5, stop_at_eos=False, **quiet)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        model.generate(prompt, temperature=-1.0, stop_at_eos=False, **quiet)
    # greedy ignores freq_penalty (as TransformerLens) but refuses a negative one as it does
    # (audit finding: it was accepted silently with do_sample=False)
    with pytest.raises(ValueError, match="freq_penalty must be >= 0"):
        model.generate(prompt, do_sample=False, freq_penalty=-1.0, stop_at_eos=False, **quiet)
    greedy = dict(do_sample=False, stop_at_eos=False, **quiet)
    assert torch.equal(
        model.generate(prompt, freq_penalty=5.0, **greedy), model.generate(prompt, **greedy)
    )
    with pytest.raises(ValueError, match="top_k must be an integer >= 1"):
        model.generate(prompt, top_k=0, stop_at_eos=False, **quiet)
    with pytest.raises(TypeError, match="token ids must be an integer tensor"):
        model.generate(torch.ones(1, 3), stop_at_eos=False, **quiet)
    # audit finding: embeddings ([batch, pos, d_model], TransformerBridge's inputs_embeds)
    # were refused only as "token ids must be an integer tensor (torch.long)"
    with pytest.raises(TypeError, match=r"does not continue embeddings .*inputs_embeds"):
        model.generate(torch.ones(1, 3, model.cfg.d_model), stop_at_eos=False, **quiet)
    with pytest.raises(ValueError, match="the input tokenises to zero tokens"):
        model.generate("", stop_at_eos=False, **quiet)
    state = model.depth_states(torch.tensor([[4, 5]]))[0]
    for not_a_prompt in (state, [], [4, 5], [[4, 5]], 3):
        with pytest.raises(TypeError, match=r"generate continues a prompt: input must be a"):
            model.generate(not_a_prompt, stop_at_eos=False, **quiet)


def test_generate_return_type_none_returns_tokens_as_transformerlens():
    """Audit finding: generate(return_type=None) was refused though the signature says
    Optional[str]; TransformerBridge 4.3 returns the token ids for it (its generate
    returns tokens for anything but "input" and "str"), also for a string prompt, where
    the default "input" gives a string. Compared with return_type="tokens" and with the
    prompt's own tokens (the same greedy continuation, the prompt included)."""
    model = routed_model("kimi")
    options = dict(max_new_tokens=3, stop_at_eos=False, do_sample=False, verbose=False)
    for prompt in ("w1 w2 w3", ["w1 w2 w3", "w4"], model.to_tokens("w1 w2 w3")):
        out = model.generate(prompt, return_type=None, **options)
        assert isinstance(out, torch.Tensor)
        assert torch.equal(out, model.generate(prompt, return_type="tokens", **options))
    out = model.generate("w1 w2 w3", return_type=None, **options)
    assert torch.equal(out[:, :3], model.to_tokens("w1 w2 w3"))
    assert isinstance(model.generate("w1 w2 w3", **options), str)  # "input": a string


def test_generate_takes_numpy_booleans_and_checks_prepend_bos_of_token_prompts():
    """Audit findings: generate's verbose (and prepend_bos) were taken by truthiness until
    session 17, when their check refused np.True_ / np.False_ (TransformerLens takes
    them); a NumPy boolean is the bool it holds, for every flag. prepend_bos="no" was
    still taken silently for a token prompt without padding_side (unused there, but
    every other argument is checked whether or not it is used)."""
    model = routed_model("kimi")
    prompt = torch.randint(3, 50, (2, 3), generator=torch.Generator().manual_seed(0))
    options = dict(max_new_tokens=3, stop_at_eos=False, do_sample=False, verbose=False)
    plain = model.generate(prompt, **options)
    for flag in ("stop_at_eos", "do_sample", "use_past_kv_cache", "verbose"):
        assert torch.equal(
            model.generate(prompt, **{**options, flag: np.bool_(options.get(flag, True))}), plain
        )
    eos = dict(options, stop_at_eos=np.True_, eos_token_id=int(plain[0, 3]))
    stopped = model.generate(prompt, **eos)
    assert torch.equal(stopped, model.generate(prompt, **dict(eos, stop_at_eos=True)))
    with pytest.raises(TypeError, match="prepend_bos must be True or False or None, got 'no'"):
        model.generate(prompt, prepend_bos="no", **options)
    with pytest.raises(TypeError, match=r"verbose must be True or False, got 0$"):
        model.generate(prompt, **{**options, "verbose": 0})
    with pytest.raises(TypeError, match=r"got tensor\(False\) \(a tensor: pass bool\(t\)\)"):
        model.generate(prompt, **{**options, "do_sample": torch.tensor(False)})


# --- optional hooks (set_use_*) --------------------------------------------------------
def test_attn_result_hooks(layout, tokens):
    # float64: in float32 the sum over heads rounds differently from one matmul (~1e-7)
    # and these random routers amplify that by a factor that depends on the CPU's kernels
    # (7.4e-5 in the full layout on one machine, under 5e-5 on another)
    model = routed_model(layout, dtype=torch.float64)
    before, before_cache = model.run_with_cache(tokens)  # the same (explicit) attention path
    plain = model(tokens)
    with pytest.raises(UnknownHookError, match=r"set_use_attn_result\(True\)"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_result", lambda x, hook: x)])
    model.set_use_attn_result(True)
    assert model.cfg.use_attn_result
    logits, cache = model.run_with_cache(tokens)
    # a wrong result would be O(0.1)
    assert torch.allclose(logits, before, atol=1e-10)
    for layer in range(model.cfg.n_layers):
        result = cache["result", layer]
        assert result.shape == (3, 9, model.cfg.n_heads, model.cfg.d_model)
        W_O = model.blocks[layer].attn.W_O
        by_hand = torch.stack([cache["z", layer][:, :, h] @ W_O[h] for h in range(4)], dim=2)
        assert torch.allclose(result, by_hand, atol=1e-12)
        assert torch.allclose(result.sum(2), cache["attn_out", layer], atol=1e-12)
    # editing one head's result = removing that head's z
    zero_result = model.run_with_hooks(
        tokens,
        fwd_hooks=[
            ("blocks.1.attn.hook_result", lambda x, hook: x.index_fill(2, torch.tensor([2]), 0))
        ],
    )
    model.set_use_attn_result(False)
    assert "blocks.1.attn.hook_result" not in model.hook_dict and not model.cfg.use_attn_result
    assert torch.equal(model(tokens), plain)
    zero_z = model.run_with_hooks(
        tokens,
        fwd_hooks=[("blocks.1.attn.hook_z", lambda x, hook: x.index_fill(2, torch.tensor([2]), 0))],
    )
    assert torch.allclose(zero_result, zero_z, atol=1e-10)
    assert not torch.allclose(zero_z, plain, atol=1e-3)


def test_split_qkv_input_hooks_on_the_residual_model(tokens):
    model = routed_model("none")
    before, _ = model.run_with_cache(tokens)
    plain = model(tokens)
    model.set_use_split_qkv_input(True)
    logits, cache = model.run_with_cache(tokens)
    assert torch.allclose(logits, before, atol=1e-6)
    assert torch.allclose(model(tokens), plain, atol=1e-6)
    n_heads, n_kv, d_model = model.cfg.n_heads, model.cfg.n_key_value_heads, model.cfg.d_model
    for layer in range(model.cfg.n_layers):
        resid = cache["resid_pre", layer]
        for name, heads in (("q_input", n_heads), ("k_input", n_kv), ("v_input", n_kv)):
            for key in (f"blocks.{layer}.hook_{name}", f"blocks.{layer}.attn.hook_{name}"):
                assert cache[key].shape == (3, 9, heads, d_model)
                assert torch.equal(cache[key], resid[:, :, None].expand(-1, -1, heads, -1))
        assert cache["scale", layer, "ln1"].shape == (3, 9, 1)  # ln1 hooks keep their shape
    # a delta in one head's query input changes that head's query only, as computed here
    delta = torch.randn(3, 9, d_model, generator=torch.Generator().manual_seed(0))

    def add(x, hook):
        x = x.clone()
        x[:, :, 2] += delta
        return x

    with model.hooks(fwd_hooks=[("blocks.2.hook_q_input", add)]):
        _, patched = model.run_with_cache(tokens, names_filter="blocks.2.attn.hook_q")
    block = model.blocks[2]
    moved = cache["resid_pre", 2] + delta
    normalised = moved / moved.pow(2).mean(-1, keepdim=True).add(model.cfg.eps).sqrt() * block.ln1.w
    q = patched["q", 2]
    assert torch.allclose(q[:, :, 2], normalised @ block.attn.W_Q[2], atol=1e-5)
    assert torch.allclose(q[:, :, [0, 1, 3]], cache["q", 2][:, :, [0, 1, 3]], atol=1e-6)
    model.set_use_split_qkv_input(False)
    assert not any("_input" in name for name in model.hook_dict)


def test_optional_hooks_change_no_number_in_every_layout_and_wrap(tokens):
    """Every flag that a model allows on (split inputs in layout none only): the logits of
    a plain, a padded and a key-value cached chunked pass equal the flags-off ones to
    float64 rounding (measured 1.1e-13 at most, full layout), the per-head results sum to
    the attention output, and hook_mlp_in holds what ln2 reads (the stream, or the
    mlp_res router's output)."""
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0  # left padding
    mask[2, 7:] = 0  # right padding
    real = mask.bool()
    models = [(layout, routed_model(layout, dtype="float64")) for layout in LAYOUTS]
    for wrap in WRAPS:
        hf = wrapped_qwen3(wrap, dtype="float64")
        models.append((f"wrap={wrap}", hf))
    for name, model in models:
        off = model(tokens), model(tokens, attention_mask=mask)
        model.set_use_attn_result(True)
        model.set_use_hook_mlp_in(True)
        if not model.routing_layout.has_routers:
            model.set_use_split_qkv_input(True)
        logits, cache = model.run_with_cache(tokens)
        assert (logits - off[0]).abs().max() < 1e-12, name
        assert (model(tokens, attention_mask=mask) - off[1])[real].abs().max() < 1e-12, name
        past = KeyValueCache.init_cache(model.cfg)
        chunks = [
            model(tokens[:, :5], past_kv_cache=past),
            model(tokens[:, 5:], past_kv_cache=past),
        ]
        assert (torch.cat(chunks, dim=1) - off[0]).abs().max() < 1e-12, name
        for layer in range(model.cfg.n_layers):
            assert torch.equal(cache["result", layer].sum(2), cache["attn_out", layer]), name
            if model.routing_layout.has_routers:
                read = cache[model.site(layer, "mlp_res").hook("out")]
            else:
                read = cache["resid_mid", layer]
            assert torch.equal(cache["mlp_in", layer], read), name


def test_editing_ln1_with_split_qkv_input_on_is_refused(tokens):
    """With split inputs the heads read their own normalised copies, not ln1's output, so
    an edit of ln1's hooks changed nothing (the zeroed hook_normalized of layer 1 moved
    the logits by 2e-16 instead of 0.23, float64); it is refused, returned or in place."""
    model = routed_model("none", dtype="float64")
    plain = model(tokens)

    def zero(x, hook):
        return torch.zeros_like(x)

    def double_in_place(x, hook):
        x.mul_(2)

    edited = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.ln1.hook_normalized", zero)])
    assert (edited - plain).abs().max() > 0.01  # the edit matters without split inputs
    model.set_use_split_qkv_input(True)
    for name, fn in (
        ("blocks.1.ln1.hook_normalized", zero),
        ("blocks.2.ln1.hook_scale", double_in_place),
    ):
        with pytest.raises(ValueError, match=r"a hook edited blocks\.\d\.ln1\.hook_normalized or"):
            model.run_with_hooks(tokens, fwd_hooks=[(name, fn)])
    # a PyTorch hook on the ln1 module itself (not its hook points) was dropped silently
    # too (0.055 logits, float64 tiny model)
    for register in ("register_forward_hook", "register_forward_pre_hook"):
        edit = (
            (lambda m, args, out: out * 1.5)
            if "pre" not in register
            else (lambda m, args: (args[0] * 1.5,))
        )
        handle = getattr(model.blocks[1].ln1, register)(edit)
        try:
            with pytest.raises(
                ValueError, match=r"a PyTorch hook edited the output of the blocks\.1\.ln1"
            ):
                model(tokens)
        finally:
            handle.remove()
    # reading ln1 (caching it, a hook that returns its input) is not an edit
    logits, cache = model.run_with_cache(tokens)
    assert torch.allclose(logits, plain, atol=1e-12)
    by_hand = cache["resid_pre", 1] / cache["scale", 1, "ln1"]
    assert torch.allclose(cache["normalized", 1, "ln1"], by_hand, atol=1e-12)
    kept = model.run_with_hooks(
        tokens, fwd_hooks=[("blocks.1.ln1.hook_normalized", lambda x, hook: x)]
    )
    assert torch.allclose(kept, plain, atol=1e-12)


def test_switching_an_optional_hook_off_refuses_to_drop_its_hooks(tokens):
    """set_use_*(False) removed the hook points with their hooks: a permanent head
    ablation on hook_result was gone after set_use_attn_result(False) then (True) (0.23
    logits, float64), where TransformerLens's hook fires again. Now refused, and the
    model (flag, hook points, hooks) is left as it was."""
    model = routed_model("none", dtype="float64")
    zero_head = lambda x, hook: x.index_fill(2, torch.tensor([1]), 0)  # noqa: E731
    ablated = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_z", zero_head)])
    assert (ablated - model(tokens)).abs().max() > 0.01
    model.set_use_attn_result(True)
    model.set_use_hook_mlp_in(True)
    model.set_use_split_qkv_input(True)
    model.add_hook("blocks.1.attn.hook_result", zero_head, is_permanent=True)
    model.add_hook("blocks.0.hook_mlp_in", lambda x, hook: None, is_permanent=True)
    with model.hooks(fwd_hooks=[("blocks.2.attn.hook_v_input", lambda x, hook: None)]):
        for method, name in (
            ("set_use_attn_result", "blocks.1.attn.hook_result"),
            ("set_use_hook_mlp_in", "blocks.0.hook_mlp_in"),
            ("set_use_split_qkv_input", "blocks.2.attn.hook_v_input"),
        ):
            with pytest.raises(ValueError, match=rf"{method}\(False\) would remove .*{name}"):
                getattr(model, method)(False)
    assert model.cfg.use_attn_result and model.cfg.use_hook_mlp_in
    assert torch.allclose(model(tokens), ablated, atol=1e-12)  # the ablation still runs
    model.set_use_split_qkv_input(False)  # its temporary hook is gone: nothing to drop
    model.reset_hooks(including_permanent=True)
    model.set_use_attn_result(False)
    model.set_use_hook_mlp_in(False)
    assert not any(
        name.endswith(("hook_result", "hook_mlp_in", "_input")) for name in model.hook_dict
    )


def _refusal_of(call):
    """The ``KeyError`` ``call()`` raises (caught as ``except KeyError`` code catches it)."""
    try:
        call()
    except KeyError as error:
        return error
    raise AssertionError("no KeyError")


def test_a_hook_the_model_lacks_is_a_key_error_of_its_name(tokens):
    """TransformerLens refuses an unknown hook name with ``KeyError(name)`` (``mod_dict[name]``
    / ``cache_dict[name]``). Here ``args[0]`` was the whole message for a hook switched off
    (``set_use_*``), a misspelt one or a module, from ``add_hook`` / ``run_with_hooks`` /
    ``names_filter`` (and a plain ``KeyError`` of the message from ``cache[name]`` of a hook
    switched off); and a router or commit hook that the layout lacks (every router hook in
    layout ``"none"``, ``final_res.*`` in ``"cumulative"``) was refused as a misspelling,
    "Did you mean ['blocks.0.attn.hook_z', ...]", not saying why. Now every one is a
    ``KeyError`` whose ``args`` are ``(name,)`` (``.key`` too) and whose ``str()`` says why:
    the flag to switch on, or what the layout has; pickled alike."""
    import pickle

    from hooked_attnres.model.tl_methods import OPTIONAL_HOOKS

    models = {layout: routed_model(layout) for layout in ("none", "cumulative", "kimi")}
    cases = []  # (layout, name, what str() must say)
    for leaf, method in OPTIONAL_HOOKS.items():
        name = f"blocks.1.{'' if leaf == 'hook_mlp_in' else 'attn.'}{leaf}"
        cases.append(("kimi", name, rf"exists only while model\.{method}\(True\) is on"))
    no_routers = r"attnres_layout='none' and therefore no routers"
    for name in [
        "blocks.0.attn_res.hook_weights",
        "blocks.1.mlp_res.key_norm.hook_scale",
        "final_res.hook_sources",
        "blocks.0.hook_attn_res_weights",  # get_act_name's alias
        "hook_final_res_logits",
    ]:
        cases.append(("none", name, no_routers))
    for name in ["final_res.hook_weights", "hook_final_res_out"]:
        cases.append(("cumulative", name, "the 'cumulative' layout has no final router"))
    cases.append(("kimi", "blocks.1.hook_committed_mid", r"no block ends after layer 1's attn"))
    cases.append(("kimi", "blocks.1.attn_res.hook_weightz", r"unknown hook name.*Did you mean"))
    cases.append(("kimi", "blocks.1.attn", "is a module, not a hook point"))
    for layout, name, says in cases:
        model = models[layout]
        _, cache = model.run_with_cache(tokens)
        calls = [
            lambda m=model, n=name: m.add_hook(n, lambda x, hook: x),
            lambda m=model, n=name: m.run_with_hooks(tokens, fwd_hooks=[(n, lambda x, hook: x)]),
            lambda m=model, n=name: m.run_with_cache(tokens, names_filter=[n]),
        ]
        if name != "blocks.1.attn":
            calls.append(lambda c=cache, n=name: c[n])
        for call in calls:
            error = _refusal_of(call)
            assert error.args == (name,) and error.key == name, (name, error.args)
            assert re.search(says, str(error)), (name, str(error))
            assert name in str(error)
            # .message is str() for every subclass (None for a cache's until review 181)
            assert isinstance(error, HookKeyError) and error.message == str(error)
            copy = pickle.loads(pickle.dumps(error))
            # its class too (a cache's UnknownCacheKeyError came back a HookKeyError)
            assert type(copy) is type(error) and copy.args == (name,), (name, copy.args)
            assert str(copy) == str(error) == copy.message
        assert not any(point.fwd_hooks for point in model.hook_dict.values())


def test_a_router_hook_spelt_below_its_router_names_the_hook(tokens):
    """``cache["weights", 3, "attn_res"]`` is ``blocks.3.attn_res.hook_weights`` (README), so a
    TransformerLens user writes ``cache["scale", 3, "attn_res"]`` (``get_act_name("scale", 3,
    "attn_res")``) for the router's RMS: ``blocks.3.attn_res.hook_scale``, whose hook is
    ``blocks.3.attn_res.key_norm.hook_scale``. Audit 215: the refusal suggested
    ``['blocks.3.attn_res.hook_sources', 'blocks.3.attn.q_norm.hook_scale', ...]``, never the
    key norm's hook, and ``final_res.hook_scale`` in the cumulative layout suggested
    ``ln_final.hook_scale`` instead of saying the layout has no final router. Now the message
    names the hook and its alias, and the layout's refusal for a router it lacks."""
    models = {layout: routed_model(layout) for layout in ("none", "cumulative", "kimi")}
    cases = [  # (layout, name, the hook the message must name, its alias)
        (
            "kimi",
            "blocks.1.attn_res.hook_scale",
            "blocks.1.attn_res.key_norm.hook_scale",
            "blocks.1.hook_attn_res_scale",
        ),
        (
            "cumulative",
            "blocks.2.mlp_res.hook_scale",
            "blocks.2.mlp_res.key_norm.hook_scale",
            "blocks.2.hook_mlp_res_scale",
        ),
        ("kimi", "final_res.hook_scale", "final_res.key_norm.hook_scale", "hook_final_res_scale"),
        (
            "kimi",
            "blocks.1.mlp_res.key_norm.hook_weights",
            "blocks.1.mlp_res.hook_weights",
            "blocks.1.hook_mlp_res_weights",
        ),
    ]
    for layout, name, hook, alias in cases:
        model = models[layout]
        _, cache = model.run_with_cache(tokens)
        for call in [
            lambda m=model, n=name: m.run_with_hooks(tokens, fwd_hooks=[(n, lambda x, hook: x)]),
            lambda c=cache, n=name: c[n],
        ]:
            error = _refusal_of(call)
            assert error.args == (name,)
            assert f"is {hook!r} (or its alias {alias!r}" in str(error), str(error)
            assert "Did you mean" not in str(error)
        assert torch.equal(cache[alias], cache[hook])  # what the message offers works
    _, cache = models["kimi"].run_with_cache(tokens)
    error = _refusal_of(lambda: cache["scale", 1, "attn_res"])
    assert "'blocks.1.attn_res.key_norm.hook_scale'" in str(error)
    for layout, name, says in [
        ("cumulative", "final_res.hook_scale", "the 'cumulative' layout has no final router"),
        ("none", "blocks.1.attn_res.hook_scale", r"attnres_layout='none' and therefore no"),
        ("kimi", "blocks.9.attn_res.hook_scale", r"layer must be an integer in \[-4, 4\)"),
    ]:
        _, cache = models[layout].run_with_cache(tokens)
        error = _refusal_of(lambda c=cache, n=name: c[n])
        assert re.search(says, str(error)) and "Did you mean" not in str(error), str(error)


def test_the_final_router_keyed_as_transformer_lens_builds_it_names_its_hook(tokens):
    """``cache["scale", None, "final_res"]`` builds ``ln_final.final_res.hook_scale``
    (``get_act_name`` puts ``ln_final.`` before a layerless ``"scale"``), and
    ``cache["weights", 0, "final_res"]`` / ``cache["weights", None, "attn_res"]`` give a
    final router a layer and a sublayer router none. Review 217: these suggested
    ``ln_final.hook_scale`` (the final norm's RMS, another tensor: 'Did you mean') or the
    ``mlp_res`` hooks of layer 0; now the final router's hook and alias, or `site`'s refusal."""
    models = {layout: routed_model(layout) for layout in ("none", "cumulative", "kimi")}
    caches = {layout: model.run_with_cache(tokens)[1] for layout, model in models.items()}
    error = _refusal_of(lambda: caches["kimi"]["scale", None, "final_res"])
    assert error.args == ("ln_final.final_res.hook_scale",)
    assert "is 'final_res.key_norm.hook_scale' (or its alias 'hook_final_res_scale'" in str(
        error
    ), str(error)
    assert "Did you mean" not in str(error)
    for layout, key, says in [
        ("cumulative", ("scale", None, "final_res"), "the 'cumulative' layout has no final"),
        ("none", ("scale", None, "final_res"), "attnres_layout='none' and therefore no routers"),
        ("kimi", ("weights", 0, "final_res"), "the final router has no layer; pass layer=None"),
        ("kimi", ("weights", None, "attn_res"), r"router 'attn_res', got None"),
    ]:
        error = _refusal_of(lambda c=caches[layout], k=key: c[k])
        assert re.search(says, str(error)) and "Did you mean" not in str(error), str(error)
    # the final router at sublayer 2 * n_layers (`site` accepts layer n_layers for it)
    name = f"blocks.{models['kimi'].cfg.n_layers}.final_res.hook_weights"
    error = _refusal_of(lambda: models["kimi"].check_hook_name(name))
    assert "is 'final_res.hook_weights' (or its alias 'hook_final_res_weights'" in str(error)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_router_hook_spelling_names_only_hooks_of_the_layout(layout):
    """Each name of the router-hook grammar (``[blocks.L.|ln_final.]<router>.[key_norm.]
    hook_<hook>``, every router, layers None, 0, last, n_layers and 9) that is no hook is
    refused with the layout's reason, never difflib's guess, and every hook name the
    message quotes is a hook of this model (or an alias of one); every real hook and alias
    is accepted."""
    model = tiny_model(attnres_layout=layout)
    n_layers = model.cfg.n_layers
    for name in model.hook_dict:
        model.check_hook_name(name)
    for site in model.sites():
        for key in ROUTER_HOOKS:
            model.check_hook_name(site.alias(key))
    checked = 0
    for kind in ROUTERS:
        for layer in (None, 0, n_layers - 1, n_layers, 9):
            for key in ROUTER_HOOKS:
                for below in ("", "key_norm.", "ln_final."):
                    prefix = ("" if layer is None else f"blocks.{layer}.") + (
                        below if below == "ln_final." else ""
                    )
                    name = f"{prefix}{kind}.{'' if below == 'ln_final.' else below}hook_{key}"
                    if name in model.hook_dict or (layer is not None and below == "ln_final."):
                        continue
                    error = _refusal_of(lambda n=name: model.check_hook_name(n))
                    assert "Did you mean" not in str(error), str(error)
                    for quoted in re.findall(r"'([\w.]+)'", str(error)):
                        if quoted != name and "hook_" in quoted and quoted != "hook_weights":
                            assert model.resolve_hook_name(quoted) in model.hook_dict, str(error)
                    checked += 1
    assert checked >= 100


def _noisy_edit(activation: torch.Tensor, hook) -> Optional[torch.Tensor]:
    """Scale and add fixed noise (the same on every call), so that an edit of router
    logits is not a shift that the softmax ignores."""
    if not activation.is_floating_point():
        return None
    noise = torch.randn(activation.shape, generator=torch.Generator().manual_seed(0))
    return (activation.float() * 1.25 + 0.01 * noise).to(activation.dtype)


def _hook_point_kinds(model: HookedAttnRes) -> list[str]:
    """One hook point of each kind, in forward order. Names alike but for the layer, the
    router (``attn_res`` / ``mlp_res`` / ``final_res``), the `RMSNorm` (``ln1`` / ``ln2``
    / ``ln_final`` / ``attn.q_norm`` / ``attn.k_norm``) and the head input (``q`` / ``k`` /
    ``v``) are one kind, whose shortcut the same code decides (`is_observed` of the hook
    point); each kind's hook point is the middle one of its names in forward order: a later
    layer's, whose routers read several sources (a single source is routed without
    logits)."""
    kinds: dict[str, list[str]] = {}
    for name in model.hook_dict:
        kind = re.sub(r"blocks\.\d+\.", "", name)
        kind = re.sub(r"^(attn_res|mlp_res|final_res)\.", "router.", kind)
        kind = re.sub(r"^(ln1|ln2|ln_final|attn\.q_norm|attn\.k_norm)\.", "norm.", kind)
        kind = re.sub(r"hook_(rot_)?[qkv]$", r"hook_\1qkv", kind)
        kinds.setdefault(kind, []).append(name)
    chosen = {names[len(names) // 2] for names in kinds.values()}
    return [name for name in model.hook_dict if name in chosen]


def _norm_hooks(model: HookedAttnRes) -> list[str]:
    """The norms' hook points of `_hook_point_kinds` (an `RMSNorm`'s and a router's
    ``key_norm.hook_scale``)."""
    return [name for name in _hook_point_kinds(model) if name.endswith(("scale", "normalized"))]


def _router_hook_points(model: HookedAttnRes) -> list[str]:
    """Where a content-free router's shortcut (`SharedSums`) decides: ``hook_weights`` of
    each router type's last router, and the stacked hooks (``hook_sources``,
    ``key_norm.hook_scale``) of the last one."""
    last = {site.kind: site for site in model.sites()}
    names = [site.hook("weights") for site in last.values()]
    final = model.sites()[-1]
    return names + [final.hook("sources"), final.hook("scale")]


def test_a_hook_added_on_a_hook_point_acts_as_one_added_through_the_model(tokens):
    """Audit 174: ``model.hook_dict[name].add_hook(fn)`` (TransformerLens's
    ``HookPoint.add_hook``) bypasses the model's ``add_hook`` (no thread claim, no output
    check). Its edit must still reach the forward pass as the model's ``add_hook``'s does,
    where the hook-free shortcuts (`SharedSums`, fused norms and attention, the routers'
    unobserved path) would skip a hook they did not see: bit-identical logits to
    ``model.add_hook(name, fn)``'s, and within 1e-9 (float64) of the pass with every
    shortcut off (a global module hook); ``model.reset_hooks()`` removes it and a
    ``hooks()`` context leaves it, as TransformerLens's do. One hook point of each kind
    (`_hook_point_kinds`) in every layout, float64, content-dependent routers and the
    content-free ``recency`` wrap (the norms' also with gradients on, where their fused
    path decides); the router hooks (`_router_hook_points`) where `SharedSums` is on:
    the content-free routers of the ``exact`` wrap (float32) and of every routed layout
    (bfloat16). Every hook point of 13 models took 6 s of CPU (12 s on the shared test
    machine); review 181 cut it to these, which fail as that did when `SharedSums`, a
    router's or the attention's shortcut decides on the thread guard (hooks attached
    through the model) instead of the hooks attached, and also when a norm's does."""
    models = [
        (layout, routed_model(layout, n_layers=2).double(), _hook_point_kinds, 1e-9, False)
        for layout in LAYOUTS
    ]
    models.append(
        ("wrap=recency", wrapped_qwen3("recency").double(), _hook_point_kinds, 1e-9, False)
    )
    # with gradients, the norms' fused path (a hand-written backward) decides too
    models.append(
        ("kimi, grad", routed_model("kimi", n_layers=2).double(), _norm_hooks, 1e-9, True)
    )
    # content-free routers, where SharedSums is on (it decides by dtype: bfloat16 apart)
    models.append(("wrap=exact float32", wrapped_qwen3("exact"), _router_hook_points, None, False))
    for layout in ("cumulative", "kimi", "full"):
        model = tiny_model(attnres_layout=layout, n_layers=2, dtype=torch.bfloat16)
        models.append((f"{layout} bfloat16", model, _router_hook_points, None, False))
    tokens = tokens[:2, :5]
    for label, model, hook_points, tolerance, grad in models:
        with torch.set_grad_enabled(grad):
            plain = model(tokens)
            for name in hook_points(model):
                point = model.hook_dict[name]
                point.add_hook(_noisy_edit)
                direct = model(tokens)
                with model.hooks():  # a context leaves it, as TransformerLens's
                    pass
                assert len(point.fwd_hooks) == 1, (label, name)
                if tolerance is not None:
                    every_path = torch.nn.modules.module.register_module_forward_hook(
                        lambda *args: None
                    )
                    try:
                        error = (direct - model(tokens)).abs().max().item()
                    finally:
                        every_path.remove()
                    assert error <= tolerance, (label, name, error)
                model.reset_hooks()
                assert not point.fwd_hooks, (label, name)
                model.add_hook(name, _noisy_edit)
                through_model = model(tokens)
                model.reset_hooks()
                assert torch.equal(direct, through_model), (label, name)
                if name.endswith(("hook_weights", "hook_resid_pre", "hook_attn_out")):
                    assert not torch.equal(direct, plain), (label, name)  # the edit counts
            assert torch.equal(model(tokens), plain), label


def test_a_flag_assigned_to_the_config_directly_is_named_when_its_hook_is_missing(tokens):
    """``model.cfg.use_attn_result = True`` (TransformerLens 2.x read the flag during the
    pass) creates no hook here; the refusal of a hook on it says so."""
    model = routed_model("none")
    model.cfg.use_attn_result = True
    with pytest.raises(
        UnknownHookError, match=r"cfg\.use_attn_result is True, assigned directly.*set_use_attn"
    ):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_result", lambda x, hook: x)])
    model.set_use_attn_result(True)
    assert model.run_with_cache(tokens)[1]["result", 1].shape == (3, 9, 4, 32)


def test_split_qkv_input_is_refused_in_routed_layouts(routed_layout):
    model = routed_model(routed_layout)
    with pytest.raises(ValueError, match="router's mix of depth sources, not the residual"):
        model.set_use_split_qkv_input(True)
    assert not model.cfg.use_split_qkv_input
    with pytest.raises(ValueError, match="set_use_split_qkv_input.True. is refused"):
        HookedAttnRes(model.cfg.replace(use_split_qkv_input=True))
    with pytest.raises(TypeError, match="use_attn_result must be True or False"):
        model.set_use_attn_result(1)


def test_hook_mlp_in(layout, tokens):
    model = routed_model(layout)
    before, _ = model.run_with_cache(tokens)
    plain = model(tokens)
    model.set_use_hook_mlp_in(True)
    logits, cache = model.run_with_cache(tokens)
    assert torch.allclose(logits, before, atol=1e-6)
    assert torch.equal(model(tokens), plain)  # the copy changes no number
    for layer in range(model.cfg.n_layers):
        source = "resid_mid" if layout == "none" else model.site(layer, "mlp_res").hook("out")
        expected = cache[source, layer] if layout == "none" else cache[source]
        assert torch.equal(cache["mlp_in", layer], expected)
    # an edit reaches the MLP only, not the stream it was copied from

    def double(x, hook):
        x *= 2
        return x

    with model.hooks(fwd_hooks=[("blocks.1.hook_mlp_in", double)]):
        _, edited = model.run_with_cache(tokens)
    assert torch.allclose(edited["resid_mid", 1], cache["resid_mid", 1], atol=1e-6)
    block = model.blocks[1]
    assert torch.allclose(
        edited["mlp_out", 1], block.mlp(block.ln2(2 * cache["mlp_in", 1])), atol=1e-5
    )


def test_optional_hooks_from_the_config_survive_a_checkpoint(tmp_path, tokens):
    model = routed_model(
        "none", use_attn_result=True, use_hook_mlp_in=True, use_split_qkv_input=True
    )
    assert {
        "blocks.0.attn.hook_result",
        "blocks.0.hook_mlp_in",
        "blocks.0.attn.hook_v_input",
    } <= set(model.hook_dict)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = HookedAttnRes.from_pretrained(tmp_path / "ckpt")
    assert set(loaded.hook_dict) == set(model.hook_dict)
    assert torch.allclose(loaded(tokens), model(tokens))
    with pytest.raises(ValueError, match="use_attn_in=True is not supported"):
        tiny_model(use_attn_in=True)


def test_set_use_attn_in_refuses_and_names_the_replacement(tokens):
    """TransformerBridge's set_use_attn_in (hook_attn_in) was an AttributeError here; now
    True refuses with what to use instead, and False, what TransformerLens's patching
    calls to restore the flag, changes nothing."""
    model = routed_model("none")
    plain = model(tokens)
    with pytest.raises(NotImplementedError, match=r"use set_use_split_qkv_input\(True\)"):
        model.set_use_attn_in(True)
    model.set_use_attn_in(False)
    assert not model.cfg.use_attn_in
    assert torch.equal(model(tokens), plain)
    with pytest.raises(UnknownHookError, match="unknown hook name 'blocks.0.hook_attn_in'"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_attn_in", lambda x, hook: x)])


def test_transformerlens_direct_path_patching_matches_a_hand_computed_edge():
    model = routed_model("none", n_layers=3, n_key_value_heads=4)
    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 50, (2, 6), generator=generator)
    corrupted = clean.clone()
    corrupted[:, 1] = (corrupted[:, 1] + 11) % 50
    _, clean_cache = model.run_with_cache(clean)
    _, corrupted_cache = model.run_with_cache(corrupted)

    def metric(logits):
        return logits[:, -1, 7].mean()

    src_layer, src_head, dst_layer, dst_head = 0, 1, 2, 3
    W_O = model.blocks[src_layer].attn.W_O[src_head]
    delta = (
        clean_cache["z", src_layer][:, :, src_head]
        - corrupted_cache["z", src_layer][:, :, src_head]
    ) @ W_O
    block = model.blocks[dst_layer]
    moved = corrupted_cache["resid_pre", dst_layer] + delta
    normalised = moved / moved.pow(2).mean(-1, keepdim=True).add(model.cfg.eps).sqrt() * block.ln1.w
    weights = {"q": block.attn.W_Q, "k": block.attn.W_K, "v": block.attn.W_V}
    for component in ("q", "k", "v"):
        result = tl_patching.get_act_patch_direct_path(
            model,
            corrupted,
            clean_cache,
            corrupted_cache,
            metric,
            src_layer,
            src_head,
            component=component,
            verbose=False,
        )
        assert result.shape == (3, 4) and torch.all(result[: src_layer + 1] == 0)

        def replace(x, hook, component=component):
            x = x.clone()
            x[:, :, dst_head] = normalised @ weights[component][dst_head]
            return x

        by_hand = metric(
            model.run_with_hooks(
                corrupted, fwd_hooks=[(f"blocks.{dst_layer}.attn.hook_{component}", replace)]
            )
        )
        assert torch.allclose(result[dst_layer, dst_head], by_hand, atol=1e-5), component
    assert not model.cfg.use_split_qkv_input  # TransformerLens restored the flag
    routed = routed_model("cumulative")
    _, cache = routed.run_with_cache(clean)
    with pytest.raises(ValueError, match="set_use_split_qkv_input.True. is refused"):
        tl_patching.get_act_patch_direct_path(
            routed, corrupted, cache, cache, metric, 0, 0, verbose=False
        )


# --- tokenizer helpers, head labels, test_prompt ---------------------------------------
def test_to_string_of_one_token_and_single_str_token():
    model = routed_model("none")
    token = model.to_single_token("w7")
    assert model.to_string(token) == "w7"
    assert model.to_string(torch.tensor(token)) == "w7"
    assert model.to_string(torch.tensor([token, token])) == "w7 w7"
    assert model.to_single_str_token(token) == "w7"
    assert model.to_single_str_token(torch.tensor(token)) == "w7"
    with pytest.raises(TypeError, match="one integer token id"):
        model.to_single_str_token("w7")
    with pytest.raises(ValueError, match=r"not in \[0, 50\)"):
        model.to_single_str_token(50)
    with pytest.raises(TypeError, match="token ids must be an integer tensor"):
        model.to_string(torch.tensor(1.0))
    # audit finding: a negative id raised the tokenizer's bare OverflowError
    for bad in (-1, [token, -1], torch.tensor([[token, 50]])):
        with pytest.raises(ValueError, match=r"token ids must be in \[0, 50\)"):
            model.to_string(bad)


def test_get_token_position():
    model = routed_model("none")
    tokens = model.to_tokens("w3 w4 w3 w5")
    w3 = model.to_single_token("w3")
    assert model.get_token_position("w3", "w3 w4 w3 w5") == 0
    assert model.get_token_position("w3", "w3 w4 w3 w5", mode="last") == 2
    assert model.get_token_position(w3, tokens, mode="last") == 2
    assert model.get_token_position(torch.tensor(w3), tokens[0]) == 0
    assert model.get_token_position("w3", "w3 w4", prepend_bos=True) == 1
    with pytest.raises(ValueError, match="does not occur in the prompt"):
        model.get_token_position("w9", tokens)
    with pytest.raises(
        ValueError, match=r"^mode must be one of \('first', 'last'\), got 'middle'$"
    ):
        model.get_token_position("w3", tokens, mode="middle")
    with pytest.raises(ValueError, match="takes one prompt"):
        model.get_token_position("w3", tokens.repeat(2, 1))
    # audit finding: int() truncated a float tensor (3.7 -> 3) and True matched token 1
    w1 = model.to_single_token("w1")
    assert model.get_token_position(np.int64(w3), tokens) == 0
    for bad in (torch.tensor(w3 + 0.7), torch.tensor(float(w3)), True, float(w3)):
        with pytest.raises(TypeError, match="integer tensor|single_token must be a token id"):
            model.get_token_position(bad, torch.tensor([w1, w3, w3]))
    for bad in (-1, torch.tensor(50)):
        with pytest.raises(ValueError, match=re.escape("token ids must be in [0, 50)")):
            model.get_token_position(bad, torch.tensor([w1, w3]))


def test_get_token_position_refuses_prompt_tokens_that_are_not_token_ids():
    """Audit 149 finding: the prompt's tokens were compared with ``==`` unchecked, so a
    boolean tensor matched token 1 (``[False, True]`` gave position 1), a float tensor
    matched ``5.0`` to token 5 beside a ``5.5`` no token has, and an id outside
    ``[0, d_vocab)`` (``-1``, ``50``) was searched as if the model could read it; they are
    refused as ``to_string`` and ``to_str_tokens`` refuse them."""
    model = routed_model("none")
    w3 = model.to_single_token("w3")
    for bad in (torch.tensor([False, True]), torch.tensor([w3 + 0.5, float(w3)])):
        with pytest.raises(TypeError, match="token ids must be an integer tensor"):
            model.get_token_position(1 if bad.dtype == torch.bool else w3, bad)
    for bad in (torch.tensor([-1, w3]), [w3, 50], np.array([[w3, -2]])):
        with pytest.raises(ValueError, match=re.escape("token ids must be in [0, 50)")):
            model.get_token_position(w3, bad)
    # valid ids as a list or a NumPy array are still searched
    assert model.get_token_position(w3, [w3 + 1, w3]) == 1
    assert model.get_token_position(w3, np.array([[w3, w3 + 1]])) == 0


def test_unsigned_token_ids_wider_than_a_byte_are_read_as_ids():
    """Audit 151 finding: the id check took torch's min / max, which torch lacks for
    uint16 / uint32 / uint64, so a NumPy ``uint16`` array of ids (as token datasets store
    them) crashed with '"min_all" not implemented for 'UInt16'', naming nothing: in
    get_token_position since audit 149 (it searched them before), and in to_string,
    to_str_tokens, tokens_to_residual_directions and the forward pass. They give what the
    same ids as int64 give; one past int64 is refused with its value."""
    model = routed_model("none")
    ids = torch.tensor([[5, 9, 7]])
    logits = model(ids)
    for dtype in (np.uint16, np.uint32, np.uint64):
        array = ids.numpy().astype(dtype)
        assert model.get_token_position(7, array) == 2
        assert model.to_string(array) == model.to_string(ids)
        assert model.to_str_tokens(array) == model.to_str_tokens(ids)
        directions = model.tokens_to_residual_directions(array)
        assert torch.equal(directions, model.tokens_to_residual_directions(ids))
        assert torch.equal(model(torch.from_numpy(array)), logits)
    big = np.array([5, 2**64 - 1], dtype=np.uint64)
    with pytest.raises(ValueError, match=re.escape(f"got values in [5, {2**64 - 1}]")):
        model.to_string(big)


def test_token_helpers_refuse_what_torch_cannot_read_as_token_ids_by_name():
    """Audit 149 finding: to_string, to_str_tokens, get_token_position and
    tokens_to_residual_directions handed their input to torch.as_tensor unchecked, so a
    ragged list of rows raised torch's "expected sequence of length 2 at dim 1 (got 1)",
    None or a set "Could not infer dtype of NoneType", naming no argument and no remedy;
    and an empty list, read by torch as float32, was refused as "got dtype torch.float32"
    (an empty long tensor decodes to "", as in the tokenizer)."""
    model = routed_model("none")
    w3 = model.to_single_token("w3")
    calls = {
        "to_string": model.to_string,
        "to_str_tokens": model.to_str_tokens,
        "get_token_position": lambda bad: model.get_token_position(w3, bad),
        "tokens_to_residual_directions": model.tokens_to_residual_directions,
    }
    for name, call in calls.items():
        for bad in (None, {w3, w3 + 1}, object()):
            with pytest.raises(TypeError, match=rf"^{name} takes token ids"):
                call(bad)
    with pytest.raises(TypeError, match=r"^to_string takes token ids.*decode each row"):
        model.to_string([[w3, w3], [w3]])
    with pytest.raises(TypeError, match=r"^get_token_position takes token ids"):
        model.get_token_position(w3, [[w3, w3], [w3]])
    assert model.to_string([]) == model.to_string(torch.tensor([], dtype=torch.long)) == ""


def test_residual_directions_refuse_ids_that_would_index_other_tokens():
    """Audit finding: ``tokens_to_residual_directions(-1)`` (and ``cache.logit_attrs``
    with ``tokens=-1``) returned the direction of token ``d_vocab - 1`` and a boolean
    tensor was used as a mask, with no error; the forward pass refuses both."""
    model = routed_model("cumulative")
    gain = model.state_dict()["ln_final.w"]
    W_U = model.state_dict()["unembed.W_U"]  # [d_model, d_vocab], untied
    ids = torch.tensor([[0, 49], [3, 3]])
    expected = torch.stack([torch.stack([gain * W_U[:, int(t)] for t in row]) for row in ids])
    assert torch.equal(model.tokens_to_residual_directions(ids), expected)  # the boundaries
    for bad in (-1, torch.tensor(-1), torch.tensor([3, -2]), 50, torch.tensor([[1, 50]])):
        with pytest.raises(ValueError, match=re.escape("token ids must be in [0, 50) (d_vocab)")):
            model.tokens_to_residual_directions(bad)
    for bad in (torch.tensor([True] + [False] * 49), True, 3.0, torch.tensor([1.0])):
        with pytest.raises(TypeError, match="token ids must be an integer tensor"):
            model.tokens_to_residual_directions(bad)
    _, cache = model.run_with_cache(torch.tensor([[1, 2, 3]]))
    stack = cache.accumulated_resid(return_labels=False)
    with pytest.raises(ValueError, match=re.escape("token ids must be in [0, 50)")):
        cache.logit_attrs(stack, tokens=-1)


def test_residual_directions_read_ids_of_every_integer_dtype_as_ids():
    """Audit 151 finding: ``tokens_to_residual_directions`` indexed ``W_U`` with the ids'
    own dtype, so a ``torch.uint8`` tensor of ``d_vocab`` ids was taken as a mask (49
    directions, of the tokens whose id is non-zero, for 50 ids: the first 0.088 off in a
    direction of norm 0.14, silently) and ``int8`` / ``int16`` ids, or ``uint8`` ones in
    ``cache.logit_attrs``, crashed in torch's indexing; ``to_string`` and the forward pass
    read ids of every integer dtype as ids."""
    model = routed_model("none")
    gain = model.state_dict()["ln_final.w"]
    W_U = model.state_dict()["unembed.W_U"]  # [d_model, d_vocab], untied
    ids = torch.arange(3, 53) % 50  # every id, 0 among them
    expected = torch.stack([gain * W_U[:, int(t)] for t in ids])
    tokens = torch.tensor([[3, 4, 5]])
    _, cache = model.run_with_cache(tokens)
    stack = cache.accumulated_resid(return_labels=False)
    attrs = cache.logit_attrs(stack, tokens=tokens)
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32):
        if dtype != torch.int8:  # int8 holds ids up to 127 only
            assert torch.equal(model.tokens_to_residual_directions(ids.to(dtype)), expected)
        assert torch.equal(model.tokens_to_residual_directions(ids[:5].to(dtype)), expected[:5])
        assert torch.equal(cache.logit_attrs(stack, tokens=tokens.to(dtype)), attrs)


def test_accumulated_bias_is_zero_where_a_stream_is_and_refuses_other_layers():
    """Audit finding: any ``layer`` (100, -3, 2.5) gave a zero bias; TransformerLens
    indexes its blocks (or asserts) there."""
    model = routed_model("none")
    for layer in range(5):  # n_layers = 4: the stream after the last layer too
        assert torch.equal(model.accumulated_bias(layer), torch.zeros(32))
    assert torch.equal(model.accumulated_bias(3, mlp_input=True), torch.zeros(32))
    for layer, mlp_input in ((5, False), (4, True)):
        with pytest.raises(
            ValueError, match=re.escape(f"layer must be in [0, {3 + (not mlp_input)}]")
        ):
            model.accumulated_bias(layer, mlp_input=mlp_input)
    for layer in (-1, 2.5, None):
        with pytest.raises(ValueError, match="layer must be an integer >= 0"):
            model.accumulated_bias(layer)


def test_all_head_labels():
    model = routed_model("kimi")
    labels = model.all_head_labels
    assert labels == [f"L{l}H{h}" for l in range(4) for h in range(4)]
    assert model.all_head_labels() == labels  # HookedTransformer called it as a method


def test_transformerlens_test_prompt_runs_and_reports_the_true_rank(capsys):
    for name, model in every_model():
        tl_test_prompt("w1 w2 w3", "w4", model, print_details=True, top_k=3)
        printed = capsys.readouterr().out
        logits = model(model.to_tokens("w1 w2 w3 w4"))[0, 2]
        answer = model.to_single_token("w4")
        rank = int((logits > logits[answer]).sum())
        assert "Tokenized prompt: ['w1', 'w2', 'w3']" in printed, name
        assert f"Rank: {rank}" in printed, name
        top = model.to_string(logits.argmax())
        assert f"Top 0th token. Logit: {logits.max().item():5.2f}" in printed, name
        assert f"|{top}|" in printed, name


def big_vocab_models():
    """Every layout and wrap with the 20000 ids ``transformer_lens.evals.induction_loss``
    draws from (``torch.randint(100, 20000)``)."""
    for layout in LAYOUTS:
        yield layout, routed_model(layout, d_vocab=20_000, n_layers=2)
    for wrap in WRAPS:
        blocks = {} if wrap == "none" else {"num_blocks": 2}
        hf = hf_qwen3(vocab_size=20_000, num_hidden_layers=2)
        yield f"wrap={wrap}", HookedAttnRes.from_hf_qwen3(hf, wrap=wrap, **blocks)


def test_transformerlens_evals_read_the_models_own_loss():
    """``transformer_lens.evals.induction_loss`` and ``evaluate_on_dataset`` read only the
    logits (``model(tokens)``), so routing needs nothing: they equal the next-token loss
    computed here from the logits, in every layout and wrap."""
    batch, half = 2, 4
    for name, model in big_vocab_models():
        torch.manual_seed(0)
        got = tl_evals.induction_loss(
            model, batch_size=batch, subseq_len=half, prepend_bos=False, device="cpu"
        )
        torch.manual_seed(0)  # the same draw
        tokens = torch.randint(100, 20_000, (batch, half)).repeat(1, 2)
        with torch.no_grad():
            log_probs = model(tokens).log_softmax(-1)[:, :-1]
        losses = -log_probs.gather(-1, tokens[:, 1:, None])[..., 0]  # [batch, pos - 1]
        assert torch.allclose(got, losses[:, half + 1 :].mean(), atol=1e-5), name
        loss = tl_evals.evaluate_on_dataset(model, [{"tokens": tokens}], device="cpu")
        assert math.isclose(loss, float(losses.mean()), abs_tol=1e-5), name


def test_induction_loss_on_a_small_vocabulary_is_refused_as_docs_architecture_quotes():
    """Audit 115: docs/architecture.md quoted the refusal of ``induction_loss``'s token ids
    (drawn in ``[100, 20000)``) on a smaller vocabulary as "token ids must be in [0,
    d_vocab)", a text no message has: the real one shows the number, then "(d_vocab)".
    The docs' quote, up to its ellipsis, is the start of the real message."""
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "architecture.md").read_text(encoding="utf-8")
    quoted = re.search(r'refuses its tokens \([^"]*"([^"]*)"\)', text)
    assert quoted is not None, "the quote of the induction_loss refusal"
    head = " ".join(quoted.group(1).split()).split("[...]")[0]
    model = routed_model("kimi")
    assert model.cfg.d_vocab == 50
    with pytest.raises(ValueError) as error:
        tl_evals.induction_loss(model, batch_size=2, subseq_len=4, prepend_bos=False, device="cpu")
    assert str(error.value).startswith(head), (head, str(error.value))


# --- weights: tl_parameters and SVDInterpreter -----------------------------------------
def aligned(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Columns equal up to the sign of each singular vector."""
    signs = torch.sign((a * b).sum(0, keepdim=True))
    return torch.allclose(a * signs, b, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_svd_interpreter_matches_an_svd_computed_here(tied):
    model = routed_model("kimi", tie_word_embeddings=tied)
    params = model.tl_parameters()
    assert params["blocks.1.attn.W_V"].shape == (4, 32, 8)  # repeated from 2 KV heads
    assert torch.equal(params["blocks.1.attn.W_V"], model.blocks[1].attn.W_V)
    assert torch.equal(params["unembed.W_U"], model.W_U)
    assert params["blocks.0.ln2.w"] is model.blocks[0].ln2.w
    assert set(dict(model.named_parameters())) <= set(params)
    assert dict(model.tl_named_parameters()).keys() == params.keys()
    check_svd_interpreter(model)


def test_svd_interpreter_in_every_layout_and_wrap():
    for _, model in every_model():
        check_svd_interpreter(model)


def check_svd_interpreter(model: HookedAttnRes) -> None:
    svd = SVDInterpreter(model)
    W_U, d_vocab = model.W_U, model.cfg.d_vocab
    ov = svd.get_singular_vectors("OV", layer_index=1, head_index=2, num_vectors=3)
    attn = model.blocks[1].attn
    _, _, Vh = torch.linalg.svd(attn.W_V[2] @ attn.W_O[2])
    assert ov.shape == (d_vocab, 1, 3) and aligned(ov[:, 0], W_U.T @ Vh[:3].T)
    w_in = svd.get_singular_vectors("w_in", layer_index=2, num_vectors=4)
    block = model.blocks[2]
    _, _, Vh = torch.linalg.svd(block.mlp.W_in.T * block.ln2.w)  # ln2's gain is not folded
    assert aligned(w_in[:, 0], W_U.T @ Vh[:4].T)
    w_out = svd.get_singular_vectors("w_out", layer_index=0, num_vectors=2)
    _, _, Vh = torch.linalg.svd(model.blocks[0].mlp.W_out)
    assert aligned(w_out[:, 0], W_U.T @ Vh[:2].T)


# --- detect_head --------------------------------------------------------------------
@pytest.mark.parametrize("measure", ["mul", "abs"])
def test_detect_head_matches_scores_from_the_cached_pattern(measure):
    text = "w1 w2 w3 w4 w1 w2 w3 w4"
    for name, model in every_model():
        _, cache = model.run_with_cache(model.to_tokens(text), remove_batch_dim=True)
        n = 8
        previous = torch.zeros(n, n)
        previous[1:, :-1] = torch.eye(n - 1)
        for kind, pattern in (("previous_token_head", previous),):
            scores = detect_head(model, text, kind, exclude_bos=True, error_measure=measure)
            for layer in range(model.cfg.n_layers):
                for head in range(model.cfg.n_heads):
                    attention = cache["pattern", layer][head].clone()
                    if measure == "mul":
                        attention[:, 0] = 0
                        expected = (attention * pattern).sum() / attention.sum()
                        assert abs(scores[layer, head] - expected) < 1e-5, (name, layer, head)
                    else:
                        diff = (attention - pattern).abs()
                        diff[:, 0] = 0
                        expected = 1 - round(diff.sum().item() / n, 3)
                        assert abs(scores[layer, head] - expected) < 1e-3, (name, layer, head)
        assert scores.shape == (model.cfg.n_layers, model.cfg.n_heads)


# --- cfg.dtype and cfg.device ----------------------------------------------------------
@pytest.mark.parametrize(
    "change,dtype",
    [
        (lambda m: m.half(), torch.float16),
        (lambda m: m.bfloat16(), torch.bfloat16),
        (lambda m: m.double(), torch.float64),
        (lambda m: m.half().float(), torch.float32),
        (lambda m: m.to(torch.float64), torch.float64),
        (lambda m: m.to("cpu", torch.bfloat16), torch.bfloat16),
        (lambda m: m.to(dtype=torch.float16), torch.float16),
        (lambda m: m.double().cpu(), torch.float64),
        (lambda m: m.type(torch.float64), torch.float64),
    ],
)
def test_cfg_dtype_follows_every_dtype_change(change, dtype, tokens):
    model = routed_model("kimi")
    assert change(model) is model
    assert model.cfg.dtype == dtype and model.cfg.device == "cpu"
    assert all(p.dtype == dtype for p in model.parameters())
    assert model(tokens).dtype == dtype


def test_cfg_device_follows_device_changes():
    model = routed_model("none")
    model.to("meta")
    assert model.cfg.device == "meta"
    model.to_empty(device="cpu")
    assert model.cfg.device == "cpu"
    # .cuda(), .cpu(), .to(), .half() ... are nn.Module's, which all call _apply
    for method in ("to", "cuda", "cpu", "half", "bfloat16", "float", "double", "type"):
        assert getattr(HookedAttnRes, method) is getattr(torch.nn.Module, method), method


# --- q_norm / k_norm hooks -----------------------------------------------------------
def test_q_and_k_norm_hooks_are_position_major(tokens):
    model = routed_model("full")
    _, cache = model.run_with_cache(tokens, pos_slice=-1)
    n_heads, n_kv, d_head = 4, 2, model.cfg.d_head
    assert cache["blocks.1.attn.q_norm.hook_scale"].shape == (3, 1, n_heads, 1)
    assert cache["blocks.1.attn.k_norm.hook_normalized"].shape == (3, 1, n_kv, d_head)
    _, cache = model.run_with_cache(tokens)
    q = cache["q", 1]
    scale = cache["blocks.1.attn.q_norm.hook_scale"]
    assert torch.allclose(scale, q.pow(2).mean(-1, keepdim=True).add(model.cfg.eps).sqrt())
    assert torch.allclose(cache["blocks.1.attn.q_norm.hook_normalized"], q / scale, atol=1e-6)


def test_unknown_optional_hook_message_is_specific():
    model = routed_model("none")
    for name, flag in (
        ("blocks.0.hook_q_input", "set_use_split_qkv_input"),
        ("blocks.0.attn.hook_k_input", "set_use_split_qkv_input"),
        ("blocks.2.hook_mlp_in", "set_use_hook_mlp_in"),
    ):
        with pytest.raises(UnknownHookError, match=re.escape(f"model.{flag}(True)")):
            model.add_hook(name, lambda x, hook: x)


def test_logit_attrs_takes_a_string_of_one_token_for_both_token_arguments():
    """Audit 57: ``tokens`` / ``incorrect_tokens`` given as strings of one token (as
    TransformerLens takes them) read the same as their ids; with a ``[1]`` list beside
    a string, the shapes differ and TransformerLens's shape check refuses."""
    model = routed_model("kimi")
    logits, cache = model.run_with_cache("w1 w2 w3")
    stack = cache.decompose_resid(routed=True)
    w3, w4 = model.to_single_token("w3"), model.to_single_token("w4")
    attrs = cache.logit_attrs(stack, "w3", "w4", routed=True)
    assert torch.allclose(attrs.sum(0), logits[..., w3] - logits[..., w4], atol=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        cache.logit_attrs(stack, "w3", [w4], routed=True)


def test_cache_method_flags_that_are_not_bools_are_refused():
    """Audit 145: the cache's methods read their flags by truthiness
    (``accumulated_resid(incl_mid="no")`` stacked 9 components, not 5, silently); each
    flag is refused by name (`require_bools`), and np.bool_ gives what the bool gives.
    So are depth_states(sublayers=), accumulated_bias, fold_layer_norm, process_weights,
    add_caching_hooks and routing_lens's flags."""
    from hooked_attnres.analysis.lens import routing_lens

    model = tiny_model()
    tokens = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    cache = model.run_with_cache(tokens)[1]
    stack = cache.accumulated_resid()
    calls = {
        "accumulated_resid": (
            cache.accumulated_resid,
            ("incl_mid", "apply_ln", "mlp_input", "return_labels", "routed"),
        ),
        "decompose_resid": (
            cache.decompose_resid,
            ("mlp_input", "apply_ln", "incl_embeds", "return_labels", "routed"),
        ),
        "stack_head_results": (
            cache.stack_head_results,
            ("return_labels", "incl_remainder", "apply_ln", "routed"),
        ),
        "stack_neuron_results": (
            lambda **k: cache.stack_neuron_results(1, **k),
            ("return_labels", "incl_remainder", "apply_ln", "mlp_input", "routed"),
        ),
        "get_full_resid_decomposition": (
            cache.get_full_resid_decomposition,
            ("mlp_input", "expand_neurons", "apply_ln", "return_labels", "routed"),
        ),
        "apply_ln_to_stack": (
            lambda **k: cache.apply_ln_to_stack(stack, **k),
            ("mlp_input", "has_batch_dim", "recompute_ln", "routed"),
        ),
        "logit_attrs": (
            lambda **k: cache.logit_attrs(stack, tokens=3, **k),
            ("has_batch_dim", "routed"),
        ),
        "depth_states": (lambda **k: model.depth_states(tokens, **k), ("sublayers",)),
        "accumulated_bias": (
            lambda **k: model.accumulated_bias(1, **k),
            ("mlp_input", "include_mlp_biases"),
        ),
        "fold_layer_norm": (model.fold_layer_norm, ("fold_biases", "center_weights")),
        "process_weights": (
            model.process_weights,
            (
                "fold_ln",
                "center_writing_weights",
                "center_unembed",
                "fold_value_biases",
                "refactor_factored_attn_matrices",
            ),
        ),
        "add_caching_hooks": (model.add_caching_hooks, ("incl_bwd", "remove_batch_dim")),
        "routing_lens": (lambda **k: routing_lens(model, cache, **k), ("incl_mid", "routers")),
    }
    for call, flags in calls.values():
        for flag in flags:
            with pytest.raises(TypeError, match=f"^{flag} must be True or False, got 'no'"):
                call(**{flag: "no"})
    assert not model.hook_dict["hook_embed"].fwd_hooks  # nothing attached by a refusal
    for flag in ("incl_mid", "apply_ln", "mlp_input"):
        expected = cache.accumulated_resid(**{flag: False})
        torch.testing.assert_close(
            cache.accumulated_resid(**{flag: np.False_}), expected, rtol=0, atol=0
        )
    assert cache.accumulated_resid(incl_mid=np.True_).shape[0] == 2 * model.cfg.n_layers + 1

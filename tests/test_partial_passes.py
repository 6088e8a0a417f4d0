"""Partial forward passes: starting at any sublayer (`forward_from`) and computing logits at
one position per prompt (``logit_positions``), checked against the full forward pass."""

from __future__ import annotations

import copy
import dataclasses
import io
import pickle
import warnings

import pytest
import torch
from helpers import build_word_tokenizer, randomize_routing, tiny_model

from hooked_attnres import DepthState, RoutedResidualPatchWarning
from hooked_attnres.model.depth import UNRECORDED, gather_positions


@pytest.fixture
def model(layout):
    model = tiny_model(
        attnres_layout=layout,
        n_layers=5,
        attnres_num_blocks=2,
        attnres_recency_bias=None if layout == "none" else 0.5,
    )
    return randomize_routing(model).eval() if layout != "none" else model.eval()


@pytest.fixture
def positions() -> torch.Tensor:
    return torch.tensor([8, 3, 0])  # one per prompt of the 3 x 9 `tokens`; not all the last


def at(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return logits[torch.arange(len(positions)), positions].unsqueeze(1)


def test_sublayer_states_extend_the_layer_states(model, tokens):
    layers = model.depth_states(tokens)
    sublayers = model.depth_states(tokens, sublayers=True)
    assert len(layers) == model.cfg.n_layers + 1 and len(sublayers) == 2 * model.cfg.n_layers + 1
    for layer, state in enumerate(layers):
        twin = sublayers[2 * layer]
        assert len(twin.blocks) == len(state.blocks)
        assert twin.current_is_committed == state.current_is_committed
        assert all(torch.equal(a, b) for a, b in zip(twin.sources, state.sources, strict=True))
    # the state entering an MLP sublayer is what its router reads
    _, cache = model.run_with_cache(
        tokens, names_filter=lambda n: n.endswith("mlp_res.hook_sources")
    )
    if model.cfg.attnres_layout != "none":
        for layer in range(model.cfg.n_layers):
            stacked = torch.stack(sublayers[2 * layer + 1].sources, dim=-2)
            assert torch.equal(stacked, cache[f"blocks.{layer}.mlp_res.hook_sources"])


def test_forward_from_every_sublayer_equals_the_full_pass(model, tokens):
    full = model(tokens)
    states = model.depth_states(tokens, sublayers=True)
    for sublayer, state in enumerate(states):
        snapshot = [t.clone() for t in state.sources]
        assert torch.equal(model.forward_from(state, sublayer), full), sublayer
        # not mutated
        assert all(torch.equal(a, b) for a, b in zip(snapshot, state.sources, strict=True))
        if sublayer % 2 == 0:
            assert torch.equal(model(state, start_at_layer=sublayer // 2), full)


def test_logit_positions_give_the_full_logits_there(model, tokens, positions):
    full = model(tokens)
    expected = at(full, positions)
    got = model(tokens, logit_positions=positions)
    assert got.shape == (3, 1, model.cfg.d_vocab)
    # the last layer's single-query attention is a different kernel call: rounding only
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    states = model.depth_states(tokens, sublayers=True)
    for sublayer, state in enumerate(states):
        torch.testing.assert_close(
            model.forward_from(state, sublayer, logit_positions=positions),
            expected,
            atol=1e-5,
            rtol=1e-5,
            msg=f"sublayer {sublayer}",
        )
    # with every query at the last position the keys need no mask
    last = torch.full((3,), tokens.shape[1] - 1)
    torch.testing.assert_close(
        model(tokens, logit_positions=last), full[:, -1:], atol=1e-5, rtol=1e-5
    )


def test_logit_positions_actually_restrict_the_last_layer(model, tokens, positions):
    """Hooks after the last attention see one position; the explicit attention (pattern
    hooked) agrees with the fused one; the future beyond each query is masked."""
    last = model.cfg.n_layers - 1
    seen = {}

    def record(x, hook):
        seen[hook.name] = tuple(x.shape)

    names = [
        f"blocks.{last}.attn.hook_q",
        f"blocks.{last}.attn.hook_k",
        f"blocks.{last}.hook_mlp_out",
        f"blocks.{last - 1}.hook_mlp_out",
        f"blocks.{last}.attn.hook_pattern",
    ]
    logits = model.run_with_hooks(
        tokens, logit_positions=positions, fwd_hooks=[(name, record) for name in names]
    )
    n_heads, n_kv = model.cfg.n_heads, model.cfg.n_key_value_heads
    assert seen[names[0]] == (3, 1, n_heads, model.cfg.d_head)
    assert seen[names[1]] == (3, 9, n_kv, model.cfg.d_head)  # keys: every position
    assert seen[names[2]] == (3, 1, model.cfg.d_model)
    assert seen[names[3]] == (3, 9, model.cfg.d_model)  # earlier layers: every position
    assert seen[names[4]] == (3, n_heads, 1, 9)
    torch.testing.assert_close(
        logits, model(tokens, logit_positions=positions), atol=1e-5, rtol=1e-5
    )
    _, cache = model.run_with_cache(
        tokens, logit_positions=positions, names_filter=f"blocks.{last}.attn.hook_pattern"
    )
    pattern = cache[f"blocks.{last}.attn.hook_pattern"][:, :, 0]  # [batch, head, key_pos]
    for prompt, position in enumerate(positions.tolist()):
        assert (pattern[prompt, :, position + 1 :] == 0).all()
        torch.testing.assert_close(pattern[prompt].sum(-1), torch.ones(n_heads))


def test_bad_partial_passes_are_refused(model, tokens, positions):
    states = model.depth_states(tokens, sublayers=True)
    n = 2 * model.cfg.n_layers
    for bad in (-1, n + 1, 1.0, True):
        with pytest.raises(ValueError, match=rf"sublayer must be an integer in \[0, {n}\]"):
            model.forward_from(states[0], bad)
    with pytest.raises(TypeError, match="needs a DepthState"):
        model.forward_from(tokens, 0)
    if model.cfg.attnres_layout != "none":  # in layout "none" every state looks alike
        with pytest.raises(ValueError, match="cannot enter the MLP sublayer of layer 3"):
            model.forward_from(states[0], 7)  # a block was committed after layer 2
    with pytest.raises(ValueError, match=r"logit_positions must be \[batch\] = \[3\]"):
        model(tokens, logit_positions=positions[:2])
    with pytest.raises(ValueError, match=r"logit_positions must be in \[0, 9\)"):
        model(tokens, logit_positions=torch.tensor([0, 9, 1]))
    with pytest.raises(ValueError, match=r"in \[0, 9\)"):
        model.forward_from(states[3], 3, logit_positions=torch.tensor([-1, 0, 1]))
    with pytest.raises(TypeError, match="integer tensor"):
        model(tokens, logit_positions=positions.float())
    with pytest.raises(TypeError, match="integer tensor"):
        model(tokens, logit_positions=[8, 3, 0])
    with pytest.raises(ValueError, match="cannot be combined with stop_at_layer or a loss"):
        model(tokens, logit_positions=positions, stop_at_layer=2)
    with pytest.raises(ValueError, match="cannot be combined with stop_at_layer or a loss"):
        model(tokens, logit_positions=positions, return_type="loss")
    assert isinstance(model(tokens, stop_at_layer=2), DepthState)


@pytest.mark.filterwarnings("ignore::hooked_attnres.RoutedResidualPatchWarning")  # meant
@pytest.mark.parametrize("start", ["start_at_layer", "forward_from"])
def test_an_in_place_hook_edit_does_not_reach_the_callers_state(model, tokens, start):
    """TransformerLens's patch setters edit in place: a hook on the first layer's
    hook_resid_pre of a run started from a cached state must leave that state as it was,
    so that it can start the next run."""
    states = model.depth_states(tokens)
    state = states[2]
    before = state.current.clone()
    clean = model(state, start_at_layer=2)

    def zero_position_3(x, hook):
        x[:, 3] = 0.0
        return x

    hooks = [("blocks.2.hook_resid_pre", zero_position_3)]
    if start == "start_at_layer":
        edited = model.run_with_hooks(state, start_at_layer=2, fwd_hooks=hooks)
    else:
        with model.hooks(fwd_hooks=hooks):
            edited = model.forward_from(state, 4)
    assert (edited - clean).abs().max() > 1e-3  # the edit took effect in that run
    assert torch.equal(state.current, before)
    assert torch.equal(model(state, start_at_layer=2), clean)


def test_models_built_from_one_config_do_not_share_it():
    from hooked_attnres import HookedAttnRes

    first = tiny_model(attnres_layout="kimi", tie_word_embeddings=True)
    second = HookedAttnRes(first.cfg)
    assert second.cfg is not first.cfg and second.cfg == first.cfg
    second.load_state_dict(first.state_dict())
    tokens = torch.randint(0, first.cfg.d_vocab, (2, 6))
    before = second(tokens)
    first.fold_layer_norm()
    first.double()
    assert second.cfg.tie_word_embeddings and not second.cfg.layer_norm_folding
    assert second.cfg.dtype == torch.float32
    second.fold_layer_norm()
    torch.testing.assert_close(second(tokens), before, atol=1e-5, rtol=0)


def test_a_loss_from_a_state_checks_its_tokens():
    """Audit finding: ``tokens`` of another shape than the state were scored silently
    (torch's gather reads the first rows / positions): 5 of 7 positions gave a loss of
    3.90, one of two prompts 3.91, instead of an error."""
    model = tiny_model(attnres_layout="cumulative")
    tokens = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    state = model(tokens, stop_at_layer=1)
    full = model(tokens, return_type="loss")
    assert torch.allclose(model(state, start_at_layer=1, tokens=tokens, return_type="loss"), full)
    for bad in (tokens[:, :5], tokens[:1], tokens[0]):
        with pytest.raises(ValueError, match=r"tokens must be the \[batch, pos\] = \(2, 7\)"):
            model(state, start_at_layer=1, tokens=bad, return_type="loss")
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 50\)"):
        model(state, start_at_layer=1, tokens=tokens + 50, return_type="loss")


def test_tokens_is_refused_with_a_token_or_text_input():
    """Audit 82: ``tokens=`` is the token ids of a `DepthState` input (for its loss); with
    token ids or text as the input the pass tokenises that input and ``tokens=`` was
    dropped silently: ``model(a, tokens=b, return_type="loss")`` was the loss of ``a``
    (3.901), not of ``b`` (3.918) nor an error (TransformerLens 4.3's Bridge drops it too,
    docs/hooks.md). It is refused by name, for every return type; from a state it is
    read as before."""
    model = tiny_model(attnres_layout="kimi")
    model.set_tokenizer(build_word_tokenizer([f"w{i}" for i in range(40)]))
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randint(3, 43, (2, 2, 6), generator=generator)
    loss_a, loss_b = model(a, return_type="loss"), model(b, return_type="loss")
    assert abs(loss_a - loss_b) > 1e-3  # the two losses differ: which one is read matters
    match = r"tokens= is the token ids of a DepthState input.*input=.*token ids or text"
    for input in (a, "w1 w2 w3", ["w1 w2", "w3"]):
        for return_type in ("loss", "both", "logits", None):
            with pytest.raises(ValueError, match=match):
                model(input, tokens=b, return_type=return_type)
        with pytest.raises(ValueError, match=match):
            model(input, tokens=b, stop_at_layer=1)
    state = model(b, stop_at_layer=1)
    from_state = model(state, start_at_layer=1, tokens=b, return_type="loss")
    assert torch.allclose(from_state, loss_b)


def test_a_hook_editing_in_place_leaves_the_given_state_unchanged(model, tokens):
    """A pass that starts at a layer fires ``hook_resid_pre`` on the given state's current
    source first; a hook that edits it in place (``act += v``, TransformerLens style) must
    edit a copy. Before, it edited the cached state: depth_states stored the state after
    the edit, so ``forward_from`` applied it twice (and again on every later start)."""

    def shift(activation, hook):
        activation[:, 1] += 0.5  # in place, returns None

    hooks = [("blocks.2.hook_resid_pre", shift)]
    with torch.no_grad():
        full = model.run_with_hooks(tokens, fwd_hooks=hooks)
        with model.hooks(fwd_hooks=hooks):
            states = model.depth_states(tokens, sublayers=True)
            snapshot = [source.clone() for source in states[4].sources]
            for _ in range(2):
                torch.testing.assert_close(model.forward_from(states[4], 4), full)
                torch.testing.assert_close(model(states[4], start_at_layer=2), full)
    assert all(torch.equal(a, b) for a, b in zip(snapshot, states[4].sources, strict=True))
    unhooked = model.depth_states(tokens, sublayers=True)  # the state entering layer 2
    assert all(torch.equal(a, b) for a, b in zip(unhooked[4].sources, snapshot, strict=True))


def test_a_state_resumes_only_with_the_padding_it_was_made_with(model, tokens):
    """A state of a left-padded pass, resumed without its mask (or a state made without
    one, resumed with it), would give other logits at the real positions: refused."""
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0  # left padding
    full = model(tokens, attention_mask=mask)
    real = mask.bool()
    padded = model.depth_states(tokens, sublayers=True, attention_mask=mask)
    unpadded = model.depth_states(tokens, sublayers=True)
    stopped = model(tokens, stop_at_layer=2, attention_mask=mask)
    # the same mask resumes exactly (float rounding only)
    torch.testing.assert_close(model.forward_from(padded[3], 3, attention_mask=mask), full)
    torch.testing.assert_close(model(stopped, start_at_layer=2, attention_mask=mask), full)
    # an all-ones mask is no padding: a state made without a mask resumes with one
    ones = torch.ones_like(tokens)
    torch.testing.assert_close(
        model.forward_from(unpadded[3], 3, attention_mask=ones), model(tokens)
    )
    # the wrong padding would change the real positions' logits (a hand-built state
    # resumed with an all-ones mask: the caller's word is taken)
    hand = DepthState(padded[3].blocks, padded[3].current, padded[3].current_is_committed)
    wrong = model.forward_from(hand, 3, attention_mask=ones)
    assert (wrong - full)[real].abs().max() > 1e-3
    for call in (
        lambda: model.forward_from(padded[3], 3),
        lambda: model(padded[2], start_at_layer=1),
        lambda: model(stopped, start_at_layer=2),
        lambda: model.forward_from(unpadded[3], 3, attention_mask=mask),
        lambda: model(unpadded[4], start_at_layer=2, attention_mask=mask),
    ):
        with pytest.raises(ValueError, match="pass the attention_mask= of the depth_states"):
            call()
    other = mask.clone()
    other[2, :1] = 0
    with pytest.raises(ValueError, match="attention_mask is a different one"):
        model.forward_from(padded[3], 3, attention_mask=other)


def test_an_edited_or_hand_built_state_keeps_its_padding_or_is_refused(model, tokens):
    """States derived from a recorded one (dataclasses.replace, gather_positions) keep its
    padding and sublayer; a state built by hand records neither and resumes only with an
    explicit attention_mask. Before, both resumed a left-padded state without its mask
    silently: up to 0.40 logits off at real positions (float64, 5 layers, full layout;
    0.36 kimi, 0.13 cumulative, 0.12 none)."""
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0  # left padding
    steer = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(1))

    def add_steer(act, hook):
        return act + steer

    # independent: the same edit as a hook on the full pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RoutedResidualPatchWarning)  # the state is edited too
        steered = model.run_with_hooks(
            tokens, attention_mask=mask, fwd_hooks=[("blocks.1.hook_resid_mid", add_steer)]
        )
    states = model.depth_states(tokens, sublayers=True, attention_mask=mask)
    edited = dataclasses.replace(states[3], current=states[3].current + steer)
    assert edited.padding is not None and edited.entering_sublayer == 3
    torch.testing.assert_close(model.forward_from(edited, 3, attention_mask=mask), steered)
    with pytest.raises(ValueError, match="pass the attention_mask= of the depth_states"):
        model.forward_from(edited, 3)
    with pytest.raises(ValueError, match="cannot enter layer 2"):
        model(dataclasses.replace(states[3]), start_at_layer=2, attention_mask=mask)

    def by_hand(state: DepthState) -> DepthState:
        return DepthState(list(state.blocks), state.current, state.current_is_committed)

    with pytest.raises(ValueError, match="built by hand.*Pass attention_mask="):
        model.forward_from(by_hand(states[3]), 3)
    with pytest.raises(ValueError, match="built by hand.*Pass attention_mask="):
        model(by_hand(states[2]), start_at_layer=1)
    full = model(tokens, attention_mask=mask)
    torch.testing.assert_close(model.forward_from(by_hand(states[3]), 3, attention_mask=mask), full)
    # gather_positions keeps the record: the padding of the gathered positions
    positions = torch.tensor([8, 3, 0])
    last = model.routing_layout.last_attention_sublayer + 1
    gathered = gather_positions(states[last], positions)
    assert gathered.entering_sublayer == last and gathered.padding is None
    at_positions = full[torch.arange(3), positions].unsqueeze(1)
    torch.testing.assert_close(model.forward_from(gathered, last), at_positions)
    on_padding = gather_positions(states[last], torch.tensor([8, 0, 0]))
    assert torch.equal(on_padding.padding, torch.tensor([[True], [False], [True]]))


def test_a_copied_or_saved_hand_built_state_still_resumes_with_its_mask(model, tokens):
    """A hand-built state stays a hand-built state through ``copy.deepcopy``, ``pickle`` and
    ``torch.save``: it resumes with an explicit mask as the pass from tokens, and without
    one is refused as built by hand. Before, the copy held a new instance of the
    `UNRECORDED` marker, which no check recognised: every resume crashed with
    ``RuntimeError: Could not infer dtype of _Unrecorded``, with or without a mask."""
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        state = model.depth_states(tokens, sublayers=True, attention_mask=mask)[3]
        full = model(tokens, attention_mask=mask)
    by_hand = DepthState(list(state.blocks), state.current, state.current_is_committed)

    def saved(value):
        buffer = io.BytesIO()
        torch.save(value, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=False)

    for copied in (
        copy.deepcopy(by_hand),
        pickle.loads(pickle.dumps(by_hand)),  # noqa: S301 (our own bytes)
        saved(by_hand),
    ):
        assert copied.padding is UNRECORDED
        torch.testing.assert_close(model.forward_from(copied, 3, attention_mask=mask), full)
        with pytest.raises(ValueError, match="built by hand.*Pass attention_mask="):
            model.forward_from(copied, 3)


def test_embed_state_records_the_padding_it_is_given(model, tokens):
    """`embed_state` is a library state: it resumes at layer 0 as the pass from tokens with
    the padding it records (none without a mask), and refuses other padding. After hand-
    built states started to be refused without a mask, embed_state's state was one: it was
    refused (test_device's meta-device pass) although the library made it."""
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        unpadded = model(model.embed_state(tokens), start_at_layer=0)
        torch.testing.assert_close(unpadded, model(tokens), rtol=0, atol=0)
        padded = model(
            model.embed_state(tokens, attention_mask=mask), start_at_layer=0, attention_mask=mask
        )
        torch.testing.assert_close(padded, model(tokens, attention_mask=mask), rtol=0, atol=0)
        with pytest.raises(ValueError, match="came from a pass without padding"):
            model(model.embed_state(tokens), start_at_layer=0, attention_mask=mask)
        with pytest.raises(ValueError, match="attention_mask is none"):
            model(model.embed_state(tokens, attention_mask=mask), start_at_layer=0)
        with pytest.raises(ValueError, match="attention_mask"):
            model.embed_state(tokens, attention_mask=mask[:, 1:])


def _cached_over(model, passes: list):
    """One `RunCacheDict` filled by caching hooks over every ``(names_filter, call)`` of
    ``passes`` (the hooks of that filter attached while ``call()`` runs)."""
    cache = None
    for names_filter, call in passes:
        cache, hooks, _ = model.get_caching_hooks(names_filter=names_filter, cache=cache)
        with model.hooks(fwd_hooks=hooks):
            call()
    return cache


def _refused(cache, why: str) -> None:
    from hooked_attnres.model.cache import record_of, require_run_positions

    with pytest.raises(ValueError, match=rf"were last filled by an earlier pass.*{why}"):
        require_run_positions(record_of(cache), "the test", list(cache))


def test_caching_hooks_over_partial_passes_take_one_input_only(model, tokens):
    """Audit 67: a `RunCacheDict` filled over two passes that start inside the model
    (``start_at_layer``, `forward_from`) from the states of other prompts, or one of them
    from token ids (or `embed_state` of other prompts), marks what the second did not refill
    stale; two passes from one state (a copy the second time) with split ``names_filter`` s
    are one pass's cache, equal to ``run_with_cache``'s of that state."""
    states = model.depth_states(tokens, sublayers=True)
    others = model.depth_states(tokens.roll(1, dims=0), sublayers=True)
    layer_1 = lambda name: name.startswith("blocks.1.")  # noqa: E731
    final = lambda name: not name.startswith("blocks.")  # noqa: E731
    mixes = {
        "a pass over another input": [
            (None, lambda: model(states[2], start_at_layer=1)),
            (layer_1, lambda: model(others[2], start_at_layer=1)),
        ],
        "another input": [
            (None, lambda: model.forward_from(states[3], 3)),
            (final, lambda: model.forward_from(others[3], 3)),
        ],
        "a pass from a DepthState and one from token ids": [
            (None, lambda: model(tokens)),
            (layer_1, lambda: model(states[2], start_at_layer=1)),
        ],
        "a pass over other token ids": [  # embed_state by itself is a pass of its own
            (None, lambda: model(tokens)),
            (None, lambda: model.embed_state(tokens.roll(1, dims=0))),
        ],
    }
    for why, passes in mixes.items():
        _refused(_cached_over(model, passes), why)

    copied = dataclasses.replace(
        states[2], blocks=[b.clone() for b in states[2].blocks], current=states[2].current.clone()
    )
    split = _cached_over(
        model,
        [
            (layer_1, lambda: model(states[2], start_at_layer=1)),
            (lambda name: not layer_1(name), lambda: model(copied, start_at_layer=1)),
        ],
    )
    _, whole = model.run_with_cache(states[2], start_at_layer=1)
    assert not split.stale and split.keys() == whole.cache_dict.keys()
    for name, tensor in split.items():  # float32: a watched hook may take another kernel
        torch.testing.assert_close(tensor, whole[name], rtol=1e-4, atol=1e-4)


def test_caching_hooks_over_key_value_passes_take_one_prefix_only(model, tokens):
    """Audit 67: two passes over the same new tokens and ``n_past`` continue key-value
    caches of other prompts: a `RunCacheDict` over both marks what the second did not
    refill stale (the record held the new tokens only); continuing a copy of the same
    cache is one pass's cache, equal to ``run_with_cache``'s."""
    from hooked_attnres import KeyValueCache

    def filled(prefix):
        kv = KeyValueCache.init_cache(model.cfg)
        with torch.no_grad():  # a cache of tensors with a graph cannot be deep-copied
            model(prefix, past_kv_cache=kv)
        return kv

    kv_a, kv_b = filled(tokens[:, :5]), filled(tokens.roll(1, dims=0)[:, :5])
    kv_a2, kv_a3 = copy.deepcopy(kv_a), copy.deepcopy(kv_a)
    new = tokens[:, 5:]
    layer_0 = lambda name: name.startswith("blocks.0.")  # noqa: E731
    mixed = _cached_over(
        model,
        [
            (None, lambda: model(new, past_kv_cache=kv_a)),
            (layer_0, lambda: model(new, past_kv_cache=kv_b)),
        ],
    )
    _refused(mixed, "other positions in its key-value cache")
    split = _cached_over(
        model,
        [
            (layer_0, lambda: model(new, past_kv_cache=kv_a2)),
            (lambda name: not layer_0(name), lambda: model(new.clone(), past_kv_cache=kv_a3)),
        ],
    )
    _, whole = model.run_with_cache(new, past_kv_cache=copy.deepcopy(filled(tokens[:, :5])))
    assert not split.stale and split.keys() == whole.cache_dict.keys()
    for name, tensor in split.items():  # float32: a watched hook may take another kernel
        torch.testing.assert_close(tensor, whole[name], rtol=1e-4, atol=1e-4)


def test_a_cache_with_its_pass_record_pickles(model, tokens):
    """Audit 70: a cache records its pass's `PassInput` (a weak reference to the model),
    which made ``pickle`` / ``torch.save`` of every ``run_with_cache`` cache raise
    TypeError. Loaded, it holds the same tensors, and a pass that fills the loaded dict
    further counts as a pass of another model (its input cannot be checked)."""
    _, cache = model.run_with_cache(tokens)
    buffer = io.BytesIO()
    torch.save(cache.cache_dict, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.source is not None and loaded.source.model is None
    assert loaded.keys() == cache.cache_dict.keys() and not loaded.stale
    assert all(torch.equal(loaded[name], cache[name]) for name in loaded)
    assert len(pickle.dumps(cache)) > 0
    _, hooks, _ = model.get_caching_hooks(names_filter="blocks.0.hook_resid_pre", cache=loaded)
    with model.hooks(fwd_hooks=hooks):
        model(tokens)
    _refused(loaded, "a pass of another model")


def test_caching_hooks_over_a_pass_split_at_stop_at_layer_take_one_pass(model, tokens):
    """Audit 70: ``model(tokens, stop_at_layer=2)`` then ``model(state, start_at_layer=2)``
    (or `forward_from`) on the state it returned is one pass split in two, the
    TransformerLens way; caching hooks over both into one `RunCacheDict` were refused as
    passes over different inputs (every hook of the first part stale). The unchanged state
    continues the pass: nothing stale, equal to ``run_with_cache(tokens)``. A state edited
    in place, or a second part with ``logit_positions``, is another pass."""
    early = lambda name: name == "hook_embed" or name.startswith(("blocks.0.", "blocks.1."))  # noqa: E731
    kept: list = []

    def first() -> None:
        kept.clear()
        kept.append(model(tokens, stop_at_layer=2))

    def split(second) -> dict:
        return _cached_over(model, [(early, first), (lambda name: not early(name), second)])

    def edited() -> None:
        with torch.no_grad():
            kept[0].current.add_(1.0)
        model(kept[0], start_at_layer=2)

    _, whole = model.run_with_cache(tokens)
    for second in (
        lambda: model(kept[0], start_at_layer=2),
        lambda: model.forward_from(kept[0], 4),
    ):
        cache = split(second)
        assert not cache.stale and cache.keys() == whole.cache_dict.keys()
        for name, tensor in cache.items():  # float32: a watched hook may take another kernel
            torch.testing.assert_close(tensor, whole[name], rtol=1e-4, atol=1e-4)
    positions = torch.tensor([1, 2, 3])
    _refused(split(edited), "another input")
    _refused(split(lambda: model(kept[0], start_at_layer=2, logit_positions=positions)), "another")
    assert model(tokens, stop_at_layer=2).continues is None  # nothing cached: nothing kept

"""Refusals name the argument the caller wrote, and a selection is read once (audit 54).

Two kinds of defect: an inner helper validated under its own parameter name
(``summarize_mass(n_bootstrap=0)`` said "n_resamples must be ..."), and a selection given
as a generator was consumed by a first pass, so the real pass saw it empty
(``attribute_routing(routers=<generator>)`` said "routers is empty").
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from helpers import randomize_routing, tiny_model
from test_attribution import random_batch

from hooked_attnres.analysis import (
    ablation_effects,
    attribute_routing,
    effect_rows,
    plan_ablations,
    routing_lens,
    routing_mass,
    run_ablations,
    summarize_mass,
    verdict_word,
)
from hooked_attnres.interventions import (
    batched_mask_hooks,
    depth_bands,
    mask_sources,
    patch_sources,
    position_index,
    set_weights,
)
from hooked_attnres.interventions.routing import Ablation, patch_committed
from hooked_attnres.study import checkpoint_dir, run_dir, seeds_found, study_condition


@pytest.fixture(scope="module")
def model():
    return randomize_routing(tiny_model(attnres_layout="cumulative")).eval()


@pytest.fixture(scope="module")
def batch():
    return random_batch(n=4)


def _bootstrap_callers(model, batch):
    plan = plan_ablations(model, families=["embedding"], routers=["attn_res"], groups="all")
    clean, ablated = run_ablations(model, batch, plan, progress=False)
    mass = routing_mass(model, batch)
    return {
        "summarize_mass": lambda **kw: summarize_mass(mass, **kw),
        "ablation_effects": lambda **kw: ablation_effects(model, batch, progress=False, **kw),
        "attribute_routing": lambda **kw: attribute_routing(model, batch, progress=False, **kw),
        "effect_rows": lambda **kw: effect_rows(plan, clean, ablated, ["logit_diff"], **kw),
        "study_condition": lambda **kw: study_condition(model, batch, progress=False, **kw),
    }


@pytest.mark.parametrize(
    "caller",
    ["summarize_mass", "ablation_effects", "attribute_routing", "effect_rows", "study_condition"],
)
@pytest.mark.parametrize("bad", [0, -1, 2.5, True, np.int64(0)])
def test_n_bootstrap_is_refused_by_its_own_name(model, batch, caller, bad):
    # they said "n_resamples must be an integer >= 1", an argument none of them takes
    with pytest.raises(
        ValueError, match=f"^n_bootstrap must be an integer >= 1, got {re.escape(repr(bad))}$"
    ):
        _bootstrap_callers(model, batch)[caller](n_bootstrap=bad)


@pytest.mark.parametrize(
    "caller",
    ["summarize_mass", "ablation_effects", "attribute_routing", "effect_rows", "study_condition"],
)
def test_n_bootstrap_past_the_bound_is_refused_before_any_forward_pass(model, batch, caller):
    """Audit 127: ``ablation_effects(..., n_bootstrap=10**12)`` ran its whole sweep and
    then failed allocating 175 TiB for the resampled means (tiny model; the study's
    ``study_condition`` and ``run_study`` refuse past `MAX_BOOTSTRAP`, the analyses did
    not). Every bootstrap refuses it when its arguments are checked, naming the bound."""
    from hooked_attnres.analysis import bootstrap_ci
    from hooked_attnres.study import MAX_BOOTSTRAP

    call = _bootstrap_callers(model, batch)[caller]
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        for too_many in (MAX_BOOTSTRAP + 1, 10**12):
            with pytest.raises(
                ValueError, match=rf"^n_bootstrap must be an integer <= {MAX_BOOTSTRAP} \(the "
            ):
                call(n_bootstrap=too_many)
    finally:
        handle.remove()
    assert calls == []
    with pytest.raises(ValueError, match=rf"^n_resamples must be an integer <= {MAX_BOOTSTRAP}"):
        bootstrap_ci([1.0, 2.0], n_resamples=10**12)


def test_a_generator_of_routers_is_read_once(model, batch):
    # check_routers consumed it and plan_ablations saw none: "routers is empty"
    kwargs = dict(n_bootstrap=10, progress=False)
    want = attribute_routing(model, batch, routers=["attn_res"], **kwargs).table
    got = attribute_routing(model, batch, routers=(r for r in ["attn_res"]), **kwargs).table
    assert len(want) > 0 and want.equals(got)


@pytest.mark.parametrize("intervene", [mask_sources, patch_sources])
def test_a_generator_of_sources_is_read_once(model, batch, intervene):
    # the first router's selection consumed it; the others said "sources is empty"
    # (mask_sources, patch_sources) before any hook was built
    want = intervene(model, ["embedding", "block_1"])
    got = intervene(model, iter(["embedding", "block_1"]))
    assert len(want) > 1 and [name for name, _ in got] == [name for name, _ in want]
    with torch.no_grad():
        expected = model.run_with_hooks(batch.tokens, fwd_hooks=want)
        actual = model.run_with_hooks(batch.tokens, fwd_hooks=got)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "call, message",
    [
        # these said "TypeError: 'int' object is not iterable" (or 'float', 'bool'), naming
        # no argument
        (lambda m, b: summarize_mass(routing_mass(m, b), by=0), r"^by must be a list .*got 0"),
        (lambda m, b: ablation_effects(m, b, metrics=0), r"^metrics must be a list .*got 0"),
        (lambda m, b: attribute_routing(m, b, method=1), r"^method must be a list .*got 1"),
        (lambda m, b: plan_ablations(m, routers=2.5), r"^routers must be a list .*got 2.5"),
        (lambda m, b: plan_ablations(m, families=2.5), r"^families must be a list .*got 2.5"),
        # these said "Could not infer dtype of generator" (RuntimeError) and, for True,
        # "IndexError: The shape of the mask [1] at index 0 does not match ..."
        (
            lambda m, b: routing_mass(m, b.tokens, positions=(p for p in [1, 2])),
            r"^positions <generator .* must be integers in \[-7, 7\) .*list\(\.\.\.\) a generator",
        ),
        (
            lambda m, b: routing_mass(m, b.tokens, positions=True),
            r"^positions True must be integers in \[-7, 7\)",
        ),
        (lambda m, b: position_index(True, 5), r"^positions True must be integers in \[-5, 5\)"),
        # depth_bands(0) gave {} and depth_bands(True) one band of layer 0
        (lambda m, b: depth_bands(0), r"^n_layers must be an integer >= 1, got 0"),
        (lambda m, b: depth_bands(True), r"^n_layers must be an integer >= 1, got True"),
    ],
)
def test_bad_selections_are_refused_by_name(model, batch, call, message):
    with pytest.raises(ValueError, match=message):
        call(model, batch)


@pytest.mark.parametrize("bad", [-1, 2.5, True, "3"])
def test_a_run_directory_seed_is_an_integer(tmp_path, bad):
    # run_dir named "attnres_seedTrue" / "_seed2.5", and checkpoint_dir said "no shipped
    # checkpoint for attnres seed True" (for "3": "seed 3", a checkpoint that exists)
    match = f"^seed must be an integer >= 0, got {re.escape(repr(bad))}$"
    with pytest.raises(ValueError, match=match):
        run_dir(tmp_path, "attnres", bad)
    with pytest.raises(ValueError, match=match):
        checkpoint_dir("attnres", bad)


def test_seeds_found_reads_conditions_once(tmp_path):
    for name in ("attnres_seed0", "attnres_seed1"):
        (tmp_path / name / "model").mkdir(parents=True)
        (tmp_path / name / "model" / "config.json").write_text("{}")
    assert seeds_found(tmp_path, (c for c in ["attnres"])) == [0, 1]
    # the message listed the generator's second read: "... for all of []"
    with pytest.raises(FileNotFoundError, match=r"for all of \['hard_vanilla_L8'\]"):
        seeds_found(tmp_path, (c for c in ["hard_vanilla_L8"]))
    with pytest.raises(ValueError, match="^conditions must be a list .*got 0"):
        seeds_found(tmp_path, 0)  # was "'int' object is not iterable"


@pytest.mark.parametrize("bad", [2.5, "3", True, (p for p in [1])])
def test_routing_lens_positions_are_refused_by_name(model, batch, bad):
    # TransformerLens' Slice said "Invalid input_slice 2.5"; True was read as position 1
    with pytest.raises(ValueError, match=r"^positions must be None, an int, .* got "):
        routing_lens(model, batch.tokens, positions=bad)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "3"])
def test_batched_mask_hooks_rows_per_copy_is_a_count(model, bad):
    # 0 and True built hooks silently; -1, 2.5 and "3" failed inside torch.zeros
    ablations = [Ablation.compile(model, "embedding", routers="attn_res")]
    with pytest.raises(ValueError, match=f"^rows_per_copy must be an integer >= 1, got {bad!r}$"):
        batched_mask_hooks(ablations, bad)


@pytest.mark.parametrize(
    "k, n, name", [(2.5, 3, "k"), (True, 3, "k"), ("3", 3, "k"), (1, 2.5, "n")]
)
def test_verdict_word_counts_are_integers(k, n, name):
    # k=2.5 was "majority", k=True "minority", k="3" a TypeError from '<='
    bad = k if name == "k" else n
    with pytest.raises(ValueError, match=f"^{name} must be an integer >= .*, got {bad!r}$"):
        verdict_word(k, n)


@pytest.mark.parametrize(
    "caller", ["summarize_mass", "ablation_effects", "effect_rows", "study_condition"]
)
def test_the_too_few_resamples_warning_names_n_bootstrap(model, batch, caller):
    # the callers take n_bootstrap; the warning named the bootstrap's own "n_resamples=10"
    with pytest.warns(RuntimeWarning, match=r"n_bootstrap=10 leaves fewer") as caught:
        _bootstrap_callers(model, batch)[caller](n_bootstrap=10)
    assert not [w for w in caught if "n_resamples" in str(w.message)]


@pytest.mark.parametrize(
    "bad",
    [[2.5], np.array([0.5, 1.7]), torch.tensor(1.7), torch.tensor([2.0]), np.array(True)]
    + [torch.tensor(True), ["2"], 2.5, True],
)
def test_float_and_bool_index_arrays_are_refused_by_name(model, batch, bad):
    # TransformerLens' Slice reads them as an index array: torch truncated [2.5] to
    # position 2 (routing_lens gave position 2's lens, silently) and a 0-d bool added an
    # axis (accumulated_resid [5, 2, 1, 7, 32]); ["2"] failed in torch's conversion; the
    # cache of a layout without a final router passed 2.5 to TransformerLens ("Invalid
    # input_slice 2.5") and read True as index 1
    with pytest.raises(ValueError, match=r"^positions must be None, an int, .* got "):
        routing_lens(model, batch.tokens, positions=bad)
    _, cache = model.run_with_cache(batch.tokens)
    with pytest.raises(ValueError, match=r"^pos_slice must be None, an int, .* got "):
        cache.accumulated_resid(pos_slice=bad)
    with pytest.raises(ValueError, match=r"^batch_slice must be None, an int, .* got "):
        cache.apply_slice_to_batch_dim(bad)


@pytest.mark.parametrize(
    "given, same",
    [
        (np.int64(2), 2),
        (torch.tensor(2), 2),
        (np.array([1, 2]), [1, 2]),
        (torch.tensor([1, 2]), [1, 2]),
        ((1, 3), [1, 2]),
        ([], []),
        (torch.tensor([], dtype=torch.long), []),
        ([False, True, True, False, False, False, False], [1, 2]),  # a mask, as in torch
        # unsigned NumPy integers are indices: torch took a uint8 array of the sequence's
        # length as a mask ([0, 1, 1, 0, 0, 0, 0]: positions 1 and 2, not 0, 1, 1, 0, 0, 0,
        # 0); a torch.uint8 tensor is refused (test_a_torch_uint8_index_is_refused_...)
        (np.array([0, 1, 1, 0, 0, 0, 0], dtype=np.uint8), [0, 1, 1, 0, 0, 0, 0]),
        (torch.tensor([0, 1, 1, 0, 0, 0, 0], dtype=torch.int16), [0, 1, 1, 0, 0, 0, 0]),
        (torch.tensor([3, 1], dtype=torch.uint32), [3, 1]),  # no mask to torch: indices
        (torch.tensor(2, dtype=torch.uint8), 2),  # 0-d: the int, as TransformerLens reads it
        (np.array([3, 1], dtype=np.uint64), [3, 1]),
    ],
)
@pytest.mark.parametrize("layout", ["cumulative", "kimi"])  # TransformerLens' path, ours
def test_integer_and_mask_slices_read_as_transformer_lens_reads_them(
    model, batch, given, same, layout
):
    if layout != "cumulative":
        model = randomize_routing(tiny_model(attnres_layout=layout)).eval()
    _, cache = model.run_with_cache(batch.tokens)
    routed = dict(routed=True) if layout == "kimi" else {}
    want = cache.accumulated_resid(pos_slice=same, **routed)
    got = cache.accumulated_resid(pos_slice=given, **routed)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    want = cache.apply_slice_to_batch_dim([1, 0])["hook_embed"]
    got = cache.apply_slice_to_batch_dim(np.array([1, 0], dtype=np.uint8))["hook_embed"]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda m, b: plan_ablations(m, families=np.array("embedding")), "families"),
        (lambda m, b: plan_ablations(m, routers=np.array("attn_res")), "routers"),
        (lambda m, b: patch_committed(m, torch.tensor(1)), "labels"),
        (lambda m, b: mask_sources(m, np.array(1)), "sources"),
        (lambda m, b: summarize_mass(routing_mass(m, b), by=np.array("family")), "by"),
        (lambda m, b: ablation_effects(m, b, metrics=np.array("logit_diff")), "metrics"),
    ],
)
def test_a_zero_d_array_is_refused_by_name(model, batch, call, name):
    # a 0-d NumPy array or tensor is an Iterable that cannot be iterated: as_items let it
    # through to list(), "TypeError: iteration over a 0-d array", naming no argument
    with pytest.raises(ValueError, match=rf"^{name} must be a list .*0-d.*\.item\(\)"):
        call(model, batch)


@pytest.mark.parametrize(
    "given, same",
    [
        (np.uint8(1), 1),
        (np.array([1, 4], dtype=np.uint8), [1, 4]),
        (np.uint64(3), 3),
        (torch.tensor([0, 2], dtype=torch.uint16), [0, 2]),
        (torch.tensor(2, dtype=torch.uint8), 2),
        (np.uint32(6), 6),
        # a list of NumPy unsigned scalars is a uint8 tensor to torch: [np.uint8(1),
        # np.uint8(4)] was refused when the hook ran ("must be integers in [-7, 7)")
        ([np.uint8(1), np.uint8(4)], [1, 4]),
        ((np.uint64(3), np.uint64(0)), [3, 0]),
    ],
)
def test_unsigned_positions_are_positions(model, batch, given, same):
    # position_index compared a uint8 index with -n_pos, which wraps to 256 - n_pos:
    # np.uint8(1) was refused as "must be integers in [-5, 5)"
    assert position_index(given, 7).tolist() == position_index(same, 7).tolist()
    want = model.run_with_hooks(batch.tokens, fwd_hooks=mask_sources(model, 0, positions=same))
    got = model.run_with_hooks(batch.tokens, fwd_hooks=mask_sources(model, 0, positions=given))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    _assert_same_mass(model, batch, given, same)


def _assert_same_mass(model, batch, given, same):
    """`routing_mass` at positions ``given`` equals it at ``same``, bit for bit."""
    torch.testing.assert_close(
        routing_mass(model, batch.tokens, positions=given).mass,
        routing_mass(model, batch.tokens, positions=same).mass,
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, np.int8, np.int16])
def test_small_signed_integer_positions_are_positions(model, batch, dtype):
    # audit 68: position_index returned an int8 / int16 tensor as it was, and torch
    # indexes with long, int, byte or bool tensors only: set_weights, patch_sources and
    # routing_mass failed with a bare "tensors used as indices must be long, int, byte or
    # bool tensors" (mask_sources worked: Ablation reads the positions as ints)
    given = np.array([1, -2], dtype=dtype) if isinstance(dtype, type) else None
    given = torch.tensor([1, -2], dtype=dtype) if given is None else given
    same = [1, -2]
    assert position_index(given, 7).dtype == torch.long
    assert position_index(given, 7).tolist() == position_index(same, 7).tolist()
    for hooks in (
        lambda positions: set_weights(model, "uniform", positions=positions),
        lambda positions: mask_sources(model, 0, positions=positions),
    ):
        want = model.run_with_hooks(batch.tokens, fwd_hooks=hooks(same))
        got = model.run_with_hooks(batch.tokens, fwd_hooks=hooks(given))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    _assert_same_mass(model, batch, given, same)


def test_an_unsigned_position_past_int64_is_refused():
    # np.uint64(2**64 - 1) cast to int64 is -1: the last position, silently
    with pytest.raises(ValueError, match=r"^positions .* must be integers in \[-5, 5\)"):
        position_index(np.array([2**64 - 1], dtype=np.uint64), 5)


@pytest.mark.parametrize("layout", ["cumulative", "kimi"])  # TransformerLens' path, ours
def test_run_with_cache_and_slice_objects_check_their_index_arrays(batch, layout):
    # slice_input checked the cache methods' bare arguments only: run_with_cache(pos_slice=)
    # took a uint8 array as a mask (2 positions cached for [0, 1, 1, 0, 0, 0, 0]), [2.5] as
    # position 2 and a 0-d bool as an added axis, silently; so did a Slice of such an array
    # in the cache's methods; stack_neuron_results' neuron_slice was not checked at all
    from transformer_lens.utilities import Slice

    model = randomize_routing(tiny_model(attnres_layout=layout)).eval()
    _, full = model.run_with_cache(batch.tokens)
    index = [0, 1, 1, 0, 0, 0, 0]
    for given in (np.array(index, dtype=np.uint8), torch.tensor(index, dtype=torch.uint16)):
        _, cut = model.run_with_cache(batch.tokens, pos_slice=given)
        for name in ("blocks.0.hook_resid_pre", "blocks.1.hook_mlp_out"):
            torch.testing.assert_close(cut[name], full[name][:, index], rtol=0, atol=0)
    for bad in ([2.5], np.array(True), True, Slice(np.array([2.5]))):
        with pytest.raises(ValueError, match=r"^pos_slice must be None, an int, .* got "):
            model.run_with_cache(batch.tokens, pos_slice=bad)
    routed = dict(routed=True) if layout == "kimi" else {}
    every = full.accumulated_resid(**routed)
    got = full.accumulated_resid(pos_slice=Slice(np.array(index, dtype=np.uint8)), **routed)
    torch.testing.assert_close(got, every[:, :, index], rtol=0, atol=0)
    rows = full.apply_slice_to_batch_dim(Slice(np.array([1, 0], dtype=np.uint8)))
    torch.testing.assert_close(rows["hook_embed"], full["hook_embed"][[1, 0]], rtol=0, atol=0)
    for bad in (Slice(np.array([2.5])), Slice(np.array(True)), Slice(torch.tensor([1.0]))):
        with pytest.raises(ValueError, match=r"^pos_slice must be None, an int, .* got Slice"):
            full.accumulated_resid(pos_slice=bad, **routed)
    want = full.stack_neuron_results(1, neuron_slice=[3, 0, 0], routed=True)
    got = full.stack_neuron_results(
        1, neuron_slice=np.array([3, 0, 0], dtype=np.uint8), routed=True
    )
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"^neuron_slice must be None, an int, .* got \[2.5\]"):
        full.stack_neuron_results(1, neuron_slice=[2.5], routed=True)


@pytest.mark.parametrize("layout", ["cumulative", "none"])
def test_get_neuron_results_checks_its_slices_as_the_cache_does(batch, layout):
    # audit 63: get_neuron_results was TransformerLens's unchecked method: a uint8
    # neuron_slice / pos_slice was a mask (neurons 1 and 2 for [0, 1, 1, 0]), [2.5] was
    # truncated to 2, and on a cache without a position axis (pos_slice=Slice(k)) a
    # pos_slice indexed its prompts
    from transformer_lens.utilities import Slice

    model = randomize_routing(tiny_model(attnres_layout=layout)).eval()
    _, cache = model.run_with_cache(batch.tokens)
    post, w_out = cache["post", 1], model.blocks[1].mlp.W_out.detach()
    neurons, positions = [0, 1, 1, 0], [0, 1, 1, 0, 0, 0, 0]
    want = post[:, positions][..., neurons, None] * w_out[neurons]  # by hand, in torch
    got = cache.get_neuron_results(
        1,
        neuron_slice=np.array(neurons, dtype=np.uint8),
        pos_slice=np.array(positions, dtype=np.uint8),
    )
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got = cache.get_neuron_results(
        1, neuron_slice=Slice(np.array(neurons, dtype=np.uint8)), pos_slice=Slice(-1)
    )
    torch.testing.assert_close(got, post[:, -1][..., neurons, None] * w_out[neurons])
    for name in ("neuron_slice", "pos_slice"):
        for bad in ([2.5], np.array(True), True, Slice(np.array([2.5]))):
            with pytest.raises(ValueError, match=rf"^{name} must be None, an int, .* got "):
                cache.get_neuron_results(1, **{name: bad})
    # a cache without a position axis: its tensors are [batch, d_mlp] at position 2
    _, at_two = model.run_with_cache(batch.tokens, pos_slice=Slice(2))
    torch.testing.assert_close(
        at_two.get_neuron_results(1), post[:, 2, :, None] * w_out, rtol=0, atol=0
    )
    with pytest.raises(ValueError, match=r"get_neuron_results: this cache has no position axis"):
        at_two.get_neuron_results(1, pos_slice=-1)


def test_a_torch_uint8_index_is_refused_at_every_entry_point(batch):
    # audit 63, one rule (_validation.refuse_uint8_index): torch reads a torch.uint8 index
    # tensor as a (deprecated) mask, and so does TransformerLens's Slice, which hands it to
    # torch; pos_slice, batch_slice, neuron_slice and positions read it as indices (here
    # [0, 1, 1, 0, 0, 0, 0], where TransformerLens caches positions 1 and 2), TaskBatch
    # refused it: now refused everywhere, a torch.bool tensor being the mask it is
    from transformer_lens.utilities import Slice

    # exported with the package's other error classes (audit 68: only the private
    # hooked_attnres._validation held it, so a caller could not catch it by name)
    from hooked_attnres import AmbiguousIndexError

    model = randomize_routing(tiny_model(attnres_layout="kimi")).eval()
    tokens = batch.tokens
    _, cache = model.run_with_cache(tokens)
    index = [0, 1, 1, 0, 0, 0, 0]
    u8 = torch.tensor(index, dtype=torch.uint8)
    every = cache.accumulated_resid(routed=True)
    entry_points = {
        "pos_slice": [
            lambda x: model.run_with_cache(tokens, pos_slice=x),
            lambda x: model.get_caching_hooks(pos_slice=x),
            lambda x: cache.accumulated_resid(pos_slice=x, routed=True),
            lambda x: cache.decompose_resid(pos_slice=x, routed=True),
            lambda x: cache.stack_head_results(1, pos_slice=x, routed=True),
            lambda x: cache.get_full_resid_decomposition(pos_slice=x, routed=True),
            lambda x: cache.get_neuron_results(1, pos_slice=x),
        ],
        "batch_slice": [
            lambda x: cache.apply_slice_to_batch_dim(x),
            lambda x: cache.apply_ln_to_stack(every, batch_slice=x, routed=True),
        ],
        "neuron_slice": [
            lambda x: cache.stack_neuron_results(1, neuron_slice=x, routed=True),
            lambda x: cache.get_neuron_results(1, neuron_slice=x),
        ],
        "positions": [
            lambda x: routing_lens(model, tokens, positions=x),
            lambda x: position_index(x, 7),
            lambda x: mask_sources(model, 0, positions=x),
            lambda x: routing_mass(model, tokens, positions=x),
        ],
    }
    for name, calls in entry_points.items():
        for call in calls:
            with pytest.raises(ValueError, match=rf"^{name} is a torch.uint8 tensor.*\.long\(\)"):
                call(u8 if name != "batch_slice" else u8[:4])
    with pytest.raises(IndexError, match=r"^index is a torch.uint8 tensor.*index\.long\(\)"):
        batch[torch.tensor([1, 0, 1, 0], dtype=torch.uint8)]
    assert issubclass(AmbiguousIndexError, ValueError) and issubclass(
        AmbiguousIndexError, IndexError
    )
    import hooked_attnres

    assert "AmbiguousIndexError" in hooked_attnres.__all__
    with pytest.raises(AmbiguousIndexError):  # the class raised is the exported one
        position_index(u8, 7)
    # a bool tensor is the mask it is, wherever masks are taken (as in torch / NumPy)
    mask = torch.tensor(index, dtype=torch.bool)
    torch.testing.assert_close(
        cache.accumulated_resid(pos_slice=mask, routed=True), every[:, :, [1, 2]], rtol=0, atol=0
    )
    _, cut = model.run_with_cache(tokens, pos_slice=mask)
    torch.testing.assert_close(cut["hook_embed"], cache["hook_embed"][:, [1, 2]], rtol=0, atol=0)
    rows = torch.tensor([True, False, True, False])
    assert torch.equal(batch[rows].tokens, tokens[[0, 2]])
    torch.testing.assert_close(
        cache.apply_slice_to_batch_dim(rows)["hook_embed"], cache["hook_embed"][[0, 2]]
    )
    # ... and refused where only integer positions are (interventions, routing_mass)
    with pytest.raises(ValueError, match=r"^positions .* must be integers"):
        mask_sources(model, 0, positions=mask)
    # a Slice holds a NumPy array (TransformerLens converts the tensor): NumPy's reading
    got = cache.accumulated_resid(pos_slice=Slice(u8), routed=True)
    torch.testing.assert_close(got, every[:, :, index], rtol=0, atol=0)


@pytest.mark.parametrize("bad", [7, -8, [0, 7], np.int64(30), torch.tensor([-8, 1])])
@pytest.mark.parametrize(
    "call, name, where",
    [
        (lambda m, c, t, p: routing_lens(m, t, positions=p), "positions", "the cache holds"),
        (lambda m, c, t, p: routing_lens(m, c, positions=p), "positions", "the cache holds"),
        (lambda m, c, t, p: c.logit_lens(positions=p), "positions", "the cache holds"),
        (lambda m, c, t, p: c.accumulated_resid(pos_slice=p), "pos_slice", "the cache holds"),
        (lambda m, c, t, p: c.decompose_resid(pos_slice=p), "pos_slice", "the cache holds"),
        (lambda m, c, t, p: c.get_neuron_results(0, pos_slice=p), "pos_slice", "the cache holds"),
        (lambda m, c, t, p: m.run_with_cache(t, pos_slice=p), "pos_slice", "this run has 7 tokens"),
        (lambda m, c, t, p: routing_mass(m, t, positions=p), "positions", "this run has 7 tokens"),
    ],
)
def test_a_position_out_of_the_run_is_refused_naming_the_range(
    model, batch, call, name, where, bad
):
    # the lens, the cache's methods and run_with_cache(pos_slice=) raised torch's bare
    # "IndexError: index 7 is out of bounds for dimension 1 with size 7" (audit 137); the
    # interventions, routing_mass and source_heatmap said this already (one check now)
    assert batch.tokens.shape[1] == 7
    _, cache = model.run_with_cache(batch.tokens)
    with pytest.raises(ValueError, match=rf"^{name} .* must be integers in \[-7, 7\) \({where}"):
        call(model, cache, batch.tokens, bad)


def test_in_range_positions_and_masks_still_read_and_a_short_mask_is_refused(model, batch):
    _, cache = model.run_with_cache(batch.tokens)
    want = cache.accumulated_resid(pos_slice=[0, 6])
    # -7 and -1 are positions 0 and 6 (counted from the end, as in Python)
    torch.testing.assert_close(cache.accumulated_resid(pos_slice=[-7, -1]), want, rtol=0, atol=0)
    got = routing_lens(model, cache, positions=[-7, -1]).logits
    torch.testing.assert_close(got, routing_lens(model, cache, positions=[0, 6]).logits)
    # a slice keeps the positions it finds, as in Python and TransformerLens
    full = cache.accumulated_resid(pos_slice=None)
    torch.testing.assert_close(cache.accumulated_resid(pos_slice=(0, 30)), full, rtol=0, atol=0)
    # a bool mask of another length than the run's: torch's "The shape of the mask [3] at
    # index 0 does not match the shape of the indexed tensor"
    with pytest.raises(ValueError, match=r"^pos_slice is a bool mask of 3 positions, but the "):
        cache.accumulated_resid(pos_slice=torch.tensor([True, False, True]))


def test_the_position_check_builds_no_hook_list_where_it_checks_nothing(model, batch, monkeypatch):
    # audit 137's check listed the residual hooks (`residual_hook_names`, ~50 us on the
    # tiny model) on every call of a cache method, pos_slice=None included: get_neuron_results
    # took 76 us for 17 (review 140). A None or (start, stop) pos_slice selects no position
    # it could miss, and a cached hook_embed gives the position extent at once
    from hooked_attnres.model import cache as cache_module

    _, cache = model.run_with_cache(batch.tokens)
    listed = []
    listing = cache_module.residual_hook_names
    monkeypatch.setattr(
        cache_module, "residual_hook_names", lambda m: listed.append(1) or listing(m)
    )
    for pos_slice in (None, (0, 30), slice(2, None), -1, [0, 6], torch.tensor([True] * 7)):
        cache._require_cached_positions(pos_slice)
    with pytest.raises(ValueError, match=r"^pos_slice \[0, 7\] must be integers in \[-7, 7\)"):
        cache._require_cached_positions([0, 7])
    assert listed == []


def test_routing_lens_on_a_cache_without_a_position_axis_names_that_not_its_batch(model, batch):
    # a cache made with pos_slice=Slice(k) holds [batch, d_model]: its axis -2 is the batch,
    # which routing_lens's range check took for the positions ("positions 5 must be
    # integers in [-4, 4) (the cache holds 4 positions ...)", a batch of 4; review 140)
    from transformer_lens.utilities import Slice

    _, cache = model.run_with_cache(batch.tokens, pos_slice=Slice(2))
    assert cache["blocks.0.hook_resid_pre"].shape[0] == len(batch.tokens) == 4
    with pytest.raises(ValueError, match=r"this cache has no position axis .* index its prompts"):
        routing_lens(model, cache, positions=5)


def test_a_pos_slice_past_a_cached_pass_says_it_counts_the_pass_positions(model, batch):
    # with a key-value cache (generate, or a chunk after a prefill) run_with_cache's
    # pos_slice indexes the pass's own positions (TransformerLens's semantics, and the
    # hooks'): pos_slice=3 after a 7-token prefill said only "this run has 1 tokens" of
    # a sequence of 8 (review 140)
    from hooked_attnres import KeyValueCache

    kv = KeyValueCache.init_cache(model.cfg.n_layers)
    model(batch.tokens, past_kv_cache=kv)
    step = batch.tokens[:, :1]
    with pytest.raises(
        ValueError,
        match=r"^pos_slice \[3\] must be integers in \[-1, 1\) \(this run has 1 tokens, after "
        r"the 7 its key-value cache holds: pos_slice counts the run's own positions",
    ):
        model.run_with_cache(step, past_kv_cache=kv, pos_slice=3)
    # and the pass's last position is its -1 (its only one), whatever the cache holds
    kv = KeyValueCache.init_cache(model.cfg.n_layers)
    model(batch.tokens, past_kv_cache=kv)
    _, cache = model.run_with_cache(step, past_kv_cache=kv, pos_slice=-1)
    assert cache["resid_pre", 0].shape == (len(step), 1, model.cfg.d_model)

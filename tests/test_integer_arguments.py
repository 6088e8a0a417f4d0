"""One rule for an integer argument (hooked_attnres/_validation.py): a Python int or a NumPy
integer scalar (what np.argsort or a pandas column gives) is accepted and kept as a Python
int; a bool, a float, a string, an array of any shape and a torch tensor are refused."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from helpers import tiny_config, tiny_model

from hooked_attnres import HookedAttnResConfig
from hooked_attnres._validation import is_integer, require_finite_number, require_integer
from hooked_attnres.interventions import resolve_layers
from hooked_attnres.study.run import find_runs
from hooked_attnres.tasks import InductionCopy, KeyValueRetrieval
from hooked_attnres.training.trainer import TrainConfig

ACCEPTED = [3, np.int64(3), np.int32(3), np.int8(3), np.uint16(3), np.intp(3)]
REFUSED = [
    True,
    np.True_,
    3.0,
    np.float64(3.0),
    "3",
    None,
    np.array(3),
    np.array([3]),
    torch.tensor(3),
    torch.tensor([3]),
]


@pytest.mark.parametrize("value", ACCEPTED, ids=lambda v: type(v).__name__)
def test_integers_are_accepted_as_python_ints(value):
    assert is_integer(value)
    out = require_integer("n", value, 1)
    assert type(out) is int and out == 3
    assert json.dumps(out) == "3"  # json.dumps(np.int64(3)) raises TypeError


@pytest.mark.parametrize("value", REFUSED, ids=lambda v: f"{type(v).__name__}-{v!r}")
def test_non_integers_are_refused_with_the_value(value):
    assert not is_integer(value)
    with pytest.raises(ValueError, match=re.escape(f"n must be an integer >= 1, got {value!r}")):
        require_integer("n", value, 1)


def test_numpy_integer_below_the_minimum_is_refused():
    with pytest.raises(ValueError, match=re.escape("n must be an integer >= 1, got np.int64(0)")):
        require_integer("n", np.int64(0), 1)


def test_optional_none_stays_none():
    assert require_integer("n", None, 1, optional=True) is None


def test_config_from_numpy_integers_is_the_config_of_ints():
    """Stored as Python ints: the JSON is written and equals that of the int config."""
    sizes = dict(d_model=32, n_layers=4, n_heads=4, d_vocab=50, n_ctx=32, d_mlp=64, seed=7)
    given = {k: np.int64(v) for k, v in sizes.items()}
    cfg = tiny_config(**given, attnres_num_blocks=np.int32(2))
    assert all(type(getattr(cfg, k)) is int for k in [*sizes, "attnres_num_blocks"])
    assert cfg.to_json() == tiny_config(**sizes, attnres_num_blocks=2).to_json()
    assert HookedAttnResConfig.from_json(cfg.to_json()) == cfg


def test_config_flags_are_read_by_require_bool_as_value_errors():
    """The config's boolean fields are checked by the one flag rule (`require_bool`), with
    the config's exception type (ValueError, as every config field): a NumPy bool is a
    flag (it was refused, unlike a NumPy integer for a size), stored as a Python bool for
    the JSON; tokenizer_prepends_bos says "True or False or None" as every optional flag."""
    from hooked_attnres._validation import require_bool

    flags = dict(tie_word_embeddings=True, default_prepend_bos=False, tokenizer_prepends_bos=False)
    cfg = tiny_config(**{name: np.bool_(value) for name, value in flags.items()})
    assert all(type(getattr(cfg, name)) is bool for name in flags)
    assert cfg.to_json() == tiny_config(**flags).to_json()
    assert HookedAttnResConfig.from_json(cfg.to_json()) == cfg
    for name, value in (("default_prepend_bos", "yes"), ("use_attn_result", 1)):
        with pytest.raises(ValueError, match=rf"^{name} must be True or False, got {value!r}$"):
            tiny_config(**{name: value})
    with pytest.raises(ValueError, match=r"^gated_mlp must be True or False, got tensor\(True\) "):
        tiny_config(gated_mlp=torch.tensor(True))
    with pytest.raises(
        ValueError, match=r"^tokenizer_prepends_bos must be True or False or None, got 'no'$"
    ):
        tiny_config(tokenizer_prepends_bos="no")
    # the rule's own exception type is unchanged for every other caller
    with pytest.raises(TypeError, match=r"^flag must be True or False, got 'no'$"):
        require_bool("flag", "no")


def test_train_config_and_tasks_keep_python_ints():
    config = TrainConfig(
        steps=np.int64(3), warmup_steps=np.int64(1), batch_size=np.int32(2), data_seed=np.int64(1)
    )
    assert json.dumps(config.to_dict()) == json.dumps(
        TrainConfig(steps=3, warmup_steps=1, batch_size=2, data_seed=1).to_dict()
    )
    task = InductionCopy(seq_len=np.int64(6), copy_len=np.int64(2), n_tokens=np.int64(12))
    assert (type(task.seq_len), type(task.copy_len), type(task.n_tokens)) == (int, int, int)
    retrieval = KeyValueRetrieval(n_pairs=np.int64(3))
    assert type(retrieval.n_pairs) is int and retrieval == KeyValueRetrieval(n_pairs=3)
    plain = InductionCopy(seq_len=6, copy_len=2, n_tokens=12)
    a, b = task.sample(np.int64(4), np.int64(5), "test"), plain.sample(4, 5, "test")
    assert torch.equal(a.tokens, b.tokens)


def test_batch_row_by_numpy_integer_keeps_the_batch_axis():
    """Before: ``batch[np.int64(1)]`` indexed every tensor with it, dropping the batch axis
    (tokens ``[pos]`` instead of ``[1, pos]``)."""
    batch = InductionCopy().sample(4, 0, "test")
    row = batch[np.int64(1)]
    assert row.tokens.shape == batch[1].tokens.shape == (1, batch.tokens.shape[1])
    assert torch.equal(row.tokens, batch.tokens[1:2])


def test_layer_arguments_take_numpy_integers():
    model = tiny_model()  # 4 layers
    tokens = torch.tensor([[1, 2, 3, 4]])
    assert resolve_layers(model, np.argsort([3, 0, 2, 1])[:2]) == [1, 3]
    assert resolve_layers(model, (np.int64(-3), np.int64(4))) == [1, 2, 3]
    assert resolve_layers(model, np.int64(-1)) == [3]
    assert all(type(v) is int for v in resolve_layers(model, np.array([2, 0])))
    partial = model(tokens, stop_at_layer=np.int64(2))
    assert torch.equal(partial.current, model(tokens, stop_at_layer=2).current)
    site = model.routing_layout.site(np.int64(-1), "attn_res")
    assert type(site.layer) is int and site == model.routing_layout.site(3, "attn_res")


def test_study_seeds_are_kept_as_python_ints():
    runs = find_runs(None, ["attnres"], [np.int64(0)])
    assert runs == [("attnres", 0)] and type(runs[0][1]) is int


def test_single_token_of_a_float_tensor_is_refused(word_tokenizer):
    """Before: ``to_single_str_token(torch.tensor(3.7))`` decoded token 3."""
    model = tiny_model()
    model.set_tokenizer(word_tokenizer)
    assert model.to_single_str_token(np.int64(3)) == model.to_single_str_token(3)
    assert model.to_single_str_token(torch.tensor(3)) == model.to_single_str_token(3)
    for bad in (torch.tensor(3.7), torch.tensor(True)):
        with pytest.raises(TypeError, match="takes one integer token id, got"):
            model.to_single_str_token(bad)


def test_source_family_and_layer_count_arguments_take_numpy_integers():
    """Audit finding: the arguments that still tested ``isinstance(x, int)`` refused or
    crashed on a NumPy integer (a source index from ``np.argsort`` of routing mass):
    ``mask_sources(model, np.int64(1))`` was refused as "not a family, a label, an index
    or a list", ``patch_committed(model, np.int64(1))`` crashed ("'numpy.int64' object is
    not iterable"), ``plan_ablations(families=np.int64(1))`` likewise,
    ``recency_schedule(np.int64(4), ...)`` was refused as no positive integer,
    ``KeyValueCache.init_cache(np.int64(4))`` crashed (read as a config), and
    ``routing_layout.check(np.int64(1), kind=...)`` raised TypeError. Each now equals
    the call with the Python int."""
    from hooked_attnres import KeyValueCache
    from hooked_attnres.analysis import plan_ablations, recency_schedule
    from hooked_attnres.interventions import mask_sources, patch_committed

    model = tiny_model(attnres_layout="kimi").eval()
    tokens = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    one = np.argsort([0.3, 0.9, 0.1])[-1]  # np.int64(1), the most massive source
    assert isinstance(one, np.integer) and one == 1
    by_int = model.run_with_hooks(tokens, fwd_hooks=mask_sources(model, 1, layers=2))
    got = model.run_with_hooks(tokens, fwd_hooks=mask_sources(model, one, layers=2))
    assert torch.equal(got, by_int)
    message = "global patching takes source labels such as 'embedding'"
    for label in (1, one):
        with pytest.raises(ValueError, match=message):
            patch_committed(model, label, "mean")
    for family in (1, one):  # an index every router must have: the same refusal
        with pytest.raises(ValueError, match=r"source index 1 is out of range for 1 sources"):
            plan_ablations(model, families=family)
    ours = recency_schedule(np.int64(4), np.int64(2), 1.0)
    assert ours.n_layers == 4 and type(ours.n_layers) is int
    assert repr(ours) == repr(recency_schedule(4, 2, 1.0))
    assert len(KeyValueCache.init_cache(np.int64(4)).layers) == 4
    with pytest.raises(ValueError, match="n_layers must be an integer >= 1, got True"):
        KeyValueCache.init_cache(True)
    layout = model.routing_layout
    assert layout.check(np.int64(1), kind="attn_res") == layout.check(1, kind="attn_res")


def test_cache_alias_keys_take_a_negative_numpy_layer():
    """``cache["attn_res_weights", -1]`` (a router alias, negative layer) counts the layer
    from the end; with ``np.int64(-1)`` (a layer from ``np.argsort``) the alias lookup kept
    the layer negative and raised ``KeyError``. Checked against the hook's own name."""
    model = tiny_model(attnres_layout="kimi")
    _, cache = model.run_with_cache(torch.tensor([[1, 2, 3]]))
    last = cache["blocks.3.attn_res.hook_weights"]
    for layer in (-1, np.int64(-1), np.int32(-1), np.int64(3)):
        assert torch.equal(cache["attn_res_weights", layer], last), type(layer)


# "A number" (eps, lr, confidence, temperature, ...): what accepts the int 3 and the float
# 0.5 accepts their NumPy scalars too, kept as Python numbers
NUMBERS = [
    np.float32(0.5),
    np.float16(0.5),
    np.float64(0.5),
    np.longdouble(0.5),  # its .item() is an np.longdouble, which JSON refuses
    np.int64(3),
    np.uint8(3),
]


@pytest.mark.parametrize("value", NUMBERS, ids=lambda v: type(v).__name__)
def test_numpy_number_scalars_are_numbers_kept_as_python_numbers(value):
    """np.float32(0.5) and np.int64(3) were refused as "not a finite number" (only
    np.float64, a float subclass, passed) although 0.5 and 3 are accepted."""
    out = require_finite_number("x", value)
    assert type(out) in (int, float) and out == value
    assert json.loads(json.dumps(out)) == value  # written to JSON and read back unchanged


@pytest.mark.parametrize(
    "value",
    [np.True_, np.float32("nan"), np.float32("inf"), np.array(0.5), torch.tensor(0.5), "0.5"],
    ids=lambda v: f"{type(v).__name__}-{v!r}",
)
def test_non_numbers_and_non_finite_numpy_scalars_are_still_refused(value):
    with pytest.raises(ValueError, match=re.escape(f"x must be a finite number, got {value!r}")):
        require_finite_number("x", value)


def test_numpy_numbers_configure_what_their_python_values_do():
    """Through the public entry points: a config, a TrainConfig, the bootstrap's
    confidence and the sampling arguments given NumPy scalars equal those given the same
    values as Python numbers (and their JSON is written)."""
    from hooked_attnres.analysis.bootstrap import bootstrap_ci_rows
    from hooked_attnres.model.generation import sample_logits

    eps, base = np.float32(1e-5), np.int64(10_000)
    cfg = tiny_config(eps=eps, rotary_base=base, initializer_range=np.float32(0.05))
    python = tiny_config(
        eps=float(eps), rotary_base=10_000, initializer_range=float(np.float32(0.05))
    )
    for name in ("eps", "rotary_base", "initializer_range"):
        assert type(getattr(cfg, name)) is type(getattr(python, name)), name
    assert cfg.to_json() == python.to_json()  # json.dumps(np.float32(...)) raises
    config = TrainConfig(lr=np.float32(1e-3), betas=(np.float32(0.9), 0.98))
    assert (
        config.to_dict()
        == TrainConfig(lr=float(np.float32(1e-3)), betas=(float(np.float32(0.9)), 0.98)).to_dict()
    )
    values = np.random.default_rng(0).normal(size=(2, 30))
    confidence = np.float32(0.9)
    assert np.array_equal(
        np.stack(bootstrap_ci_rows(values, 200, confidence, 1)),
        np.stack(bootstrap_ci_rows(values, 200, float(confidence), 1)),
    )
    logits = torch.randn(4, 9, generator=torch.Generator().manual_seed(0))

    def draw(**options):
        return sample_logits(logits, generator=torch.Generator().manual_seed(3), **options)

    assert torch.equal(
        draw(temperature=np.float32(0.5), top_p=np.float32(0.75), repetition_penalty=np.int64(1)),
        draw(temperature=0.5, top_p=0.75, repetition_penalty=1),
    )


@pytest.mark.parametrize("value", [torch.tensor(1), torch.tensor([1, 2])], ids=["0d", "1d"])
def test_layer_and_source_tensors_are_refused_by_name(value):
    """Audit 11: a torch tensor as ``layers=`` or ``sources=`` (no integer, by the rule of
    `hooked_attnres._validation`) crashed with ``TypeError: iteration over a 0-d tensor`` or
    was refused as ``layer tensor(1) is not in [-4, 4)`` / ``unknown source tensor(0)``,
    which name an in-range index as out of range; now a ``ValueError`` saying a tensor is
    not taken and what to pass (``.tolist()``). NumPy arrays stay accepted."""
    from hooked_attnres.interventions import mask_sources, select_sites, source_indices

    model = tiny_model(attnres_layout="kimi")
    site = model.site(2, "mlp_res")
    for call in (
        lambda: select_sites(model, layers=value),
        lambda: source_indices(model, site, value),
        lambda: mask_sources(model, value, layers=[1, 2]),
    ):
        with pytest.raises(ValueError, match=r"a torch tensor .*\.tolist\(\)"):
            call()
    as_list = np.array(value.tolist()).reshape(-1)
    assert select_sites(model, layers=as_list) == select_sites(model, layers=value.tolist())
    assert source_indices(model, site, as_list) == sorted(set(as_list.tolist()))


@pytest.mark.parametrize("layout", ["kimi", "none"])
def test_cache_decompositions_take_numpy_integer_layers(layout):
    """Audit 159: ``cache.decompose_resid(np.int64(1))`` raised a bare ``AssertionError``
    (TransformerLens's ``assert isinstance(layer, int)``) while every other analysis took a
    NumPy integer layer. Each now gives what the int layer gives, whose components sum to
    what the norm reads there."""
    model = tiny_model(attnres_layout=layout, dtype=torch.float64)
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]]))
    calls = {
        "decompose_resid": lambda layer, mlp: cache.decompose_resid(layer, mlp, routed=True),
        "stack_head_results": lambda layer, mlp: cache.stack_head_results(
            layer, incl_remainder=True, routed=True
        ),
        "stack_neuron_results": lambda layer, mlp: cache.stack_neuron_results(
            layer, incl_remainder=True, mlp_input=mlp, routed=True
        ),
        "get_full_resid_decomposition": lambda layer, mlp: cache.get_full_resid_decomposition(
            layer, mlp, expand_neurons=False, routed=True
        ),
    }
    for name, call in calls.items():
        for layer, mlp in ((np.int64(1), True), (np.int32(2), False), (np.int64(0), False)):
            mlp = mlp and name != "stack_head_results"  # it reads the attention input
            got = call(layer, mlp)
            assert torch.equal(got, call(int(layer), mlp)), name
            norm_input = cache.norm_input(2 * int(layer) + mlp)
            assert (got.sum(0) - norm_input).abs().max() <= 1e-12, (name, layer, mlp)
    stack = cache.decompose_resid(1, routed=True)
    assert torch.equal(
        cache.apply_ln_to_stack(stack, np.int64(1), routed=True),
        stack / cache["blocks.1.ln1.hook_scale"],
    )


@pytest.mark.parametrize("layer", [True, 2.0, -2, 5, torch.tensor(1)], ids=repr)
def test_stack_activation_refuses_a_layer_that_is_not_one(layer):
    """Audit 159: ``cache.stack_activation(name, layer)`` read ``True`` as layer 1 (the
    stack of layer 0), raised a bare ``RuntimeError: stack expects a non-empty
    TensorList`` for ``-2`` and ``TypeError`` for ``2.0``; now the rule of every integer
    argument and the decompositions' range ``[0, n_layers]`` (or -1 / None)."""
    model = tiny_model()  # 4 layers
    _, cache = model.run_with_cache(torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match=r"layer must be an integer in \[0, 4\] \(or -1 / None\)"):
        cache.stack_activation("attn_out", layer)
    expected = torch.stack([cache["attn_out", 0], cache["attn_out", 1]])
    assert torch.equal(cache.stack_activation("attn_out", np.int64(2)), expected)

"""Bad input to the model and to the config fails early, saying what to change."""

from __future__ import annotations

import enum
import math
import re

import numpy as np
import pytest
import torch
from helpers import build_word_tokenizer, tiny_config, tiny_model

from hooked_attnres import DepthState, HookedAttnRes, HookedAttnResConfig


@pytest.fixture(scope="module")
def model() -> HookedAttnRes:
    return tiny_model()  # d_vocab=50, n_ctx=32, n_layers=4, cumulative, 2 blocks


@pytest.fixture
def tok_model(word_tokenizer) -> HookedAttnRes:
    model = tiny_model()
    model.set_tokenizer(word_tokenizer)
    return model


GOOD = torch.tensor([[1, 2, 3, 4]])


# --- token ids ---------------------------------------------------------------------------


def test_valid_inputs_run(model):
    """Controls for the failures below: the boundary values are accepted."""
    logits = model(torch.tensor([[0, 49, 5]]))
    assert logits.shape == (1, 3, 50)
    assert model(torch.zeros(2, 32, dtype=torch.long)).shape == (2, 32, 50)  # exactly n_ctx
    assert torch.equal(model(torch.tensor([0, 49, 5])), logits)  # [pos] is one sequence
    assert torch.equal(model(torch.tensor([[0, 49, 5]], dtype=torch.int32)), logits)


@pytest.mark.parametrize("bad", [-1, 50, 10_000], ids=["negative", "d_vocab", "huge"])
def test_token_ids_out_of_range(model, bad):
    tokens = torch.tensor([[1, bad, 3]])
    with pytest.raises(
        ValueError, match=re.escape("token ids must be in [0, 50) (d_vocab)")
    ) as info:
        model(tokens)
    assert str(bad) in str(info.value)  # the offending value is shown


def test_sequence_longer_than_n_ctx(model):
    with pytest.raises(ValueError, match="sequence length 33 exceeds n_ctx=32"):
        model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize(
    "tokens",
    [
        torch.tensor([[1.0, 2.0]]),
        torch.tensor([[1.0, 2.0]], dtype=torch.float16),
        torch.tensor([[True, False]]),
        torch.tensor([[1 + 0j]]),
    ],
    ids=["float32", "float16", "bool", "complex"],
)
def test_non_integer_tokens(model, tokens):
    with pytest.raises(TypeError, match=f"integer tensor.*dtype {re.escape(str(tokens.dtype))}"):
        model(tokens)


def test_three_dimensional_tokens(model):
    with pytest.raises(ValueError, match=re.escape("[batch, pos]") + r".*shape \(1, 2, 3\)"):
        model(torch.zeros(1, 2, 3, dtype=torch.long))


def test_zero_dimensional_tokens(model):
    with pytest.raises(ValueError, match=r"\[batch, pos\].*shape \(\)"):
        model(torch.tensor(3))


@pytest.mark.parametrize("shape", [(0,), (1, 0), (0, 4)])
def test_empty_tokens(model, shape):
    with pytest.raises(ValueError, match="must not be empty"):
        model(torch.zeros(shape, dtype=torch.long))


def test_list_of_ints_is_refused(tok_model, model):
    for candidate in (tok_model, model):  # with and without a tokenizer: not text, not a tensor
        with pytest.raises(TypeError, match="integer tensor of token ids.*got list"):
            candidate([1, 2, 3])


def test_float64_model_runs_in_float64(tokens):
    model = tiny_model(dtype=torch.float64)
    logits, cache = model.run_with_cache(tokens)
    assert logits.dtype == torch.float64
    assert cache["weights", 2, "attn_res"].dtype == torch.float64
    reference = tiny_model()  # same seed, float32
    assert torch.allclose(logits.float(), reference(tokens), atol=1e-5)


@pytest.mark.parametrize(
    "value", [(1, 2, 3), np.array([[1, 2, 3]]), 7], ids=["tuple", "numpy", "int"]
)
def test_other_non_tensor_inputs(model, value):
    with pytest.raises(TypeError, match="integer tensor of token ids.*got " + type(value).__name__):
        model(value)


# --- forward options ---------------------------------------------------------------------


@pytest.mark.parametrize("return_type", ["probs", "Logits", ""])
def test_unknown_return_type(model, return_type):
    with pytest.raises(ValueError, match=f"return_type must be one of .*got {return_type!r}"):
        model(GOOD, return_type=return_type)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(stop_at_layer=5), "stop_at_layer"),
        (dict(stop_at_layer=-5), "stop_at_layer"),
        (dict(stop_at_layer=1.0), "stop_at_layer"),
        (dict(stop_at_layer=True), "stop_at_layer"),
    ],
)
def test_stop_at_layer_out_of_range(model, kwargs, name):
    with pytest.raises(ValueError, match=re.escape(f"{name} must be an integer in [-4, 4]")):
        model(GOOD, **kwargs)


@pytest.mark.parametrize("start", [5, -5, 2.5])
def test_start_at_layer_out_of_range(model, start):
    state = model(GOOD, stop_at_layer=2)
    with pytest.raises(ValueError, match=re.escape("start_at_layer must be an integer in [-4, 4]")):
        model(state, start_at_layer=start)


def test_start_after_stop(model):
    state = model(GOOD, stop_at_layer=3)
    with pytest.raises(ValueError, match="start_at_layer=3 is after stop_at_layer=1"):
        model(state, start_at_layer=3, stop_at_layer=1)
    with pytest.raises(ValueError, match="start_at_layer=3 is after stop_at_layer=2"):
        model(state, start_at_layer=-1, stop_at_layer=-2)  # negative values count from the end


def test_layer_range_controls(model):
    """Negative and boundary values that are allowed, and give the full forward."""
    full = model(GOOD)
    state = model(GOOD, stop_at_layer=-2)
    assert isinstance(state, DepthState)
    assert torch.equal(model(state, start_at_layer=2), full)
    assert isinstance(model(GOOD, stop_at_layer=4), DepthState)


def test_state_without_start_at_layer(model):
    state = model(GOOD, stop_at_layer=2)
    with pytest.raises(TypeError, match="DepthState input needs start_at_layer"):
        model(state)


def test_tokens_with_start_at_layer(model):
    with pytest.raises(TypeError, match="start_at_layer=2 needs a DepthState.*got Tensor"):
        model(GOOD, start_at_layer=2)


def test_state_entering_the_wrong_layer(model):
    state = model(GOOD, stop_at_layer=0)  # before any block has completed
    with pytest.raises(ValueError, match="cannot enter layer 2.*'cumulative' layout expects"):
        model(state, start_at_layer=2)


def test_loss_from_state_needs_tokens(model):
    state = model(GOOD, stop_at_layer=2)
    with pytest.raises(ValueError, match="pass tokens="):
        model(state, start_at_layer=2, return_type="loss")


# --- strings and tokenizers --------------------------------------------------------------


@pytest.mark.parametrize("text", ["w1 w2", ["w1", "w2 w3"]], ids=["str", "list"])
def test_string_without_tokenizer(model, text):
    assert model.tokenizer is None
    with pytest.raises(ValueError, match=re.escape("call model.set_tokenizer(tokenizer)")):
        model(text)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        model.to_tokens(text)


def test_the_attached_tokenizer_check_is_named_for_what_it_checks(model, tok_model):
    # audit 74: TokenizerMixin._require_tokenizer (is one attached?) shared its name with
    # _validation.require_tokenizer (is the value a tokenizer object?); renamed, unchanged
    assert not hasattr(model, "_require_tokenizer")
    with pytest.raises(ValueError, match=r"^to_string needs a tokenizer, and none is attached"):
        model._require_attached_tokenizer("to_string")
    assert tok_model._require_attached_tokenizer("to_string") is tok_model.tokenizer


def test_unknown_padding_side_is_refused(tok_model):
    # one wording for a string option (require_choice); an array was compared elementwise
    # (NumPy's "truth value of an array ... is ambiguous", naming no argument)
    allowed = re.escape("padding_side must be one of ('right', 'left', None), got ")
    with pytest.raises(ValueError, match=f"^{allowed}'up'$"):
        tok_model(["w1", "w2 w3"], padding_side="up")
    with pytest.raises(ValueError, match=f"^{allowed}'middle'$"):
        tok_model.to_tokens("w1", padding_side="middle")
    for call in (tok_model.to_tokens, tok_model.to_str_tokens):
        with pytest.raises(ValueError, match=f"^{allowed}array"):
            call("w1", padding_side=np.array(["left", "right"]))
    assert tok_model.to_tokens("w1 w2", padding_side=np.str_("left")).shape == (1, 2)
    assert tok_model.to_tokens("w1 w2", padding_side="right").shape == (1, 2)
    assert tok_model.to_tokens("w1 w2", padding_side="left").shape == (1, 2)
    sides = re.escape("default_padding_side must be one of ('right', 'left'), got ")
    with pytest.raises(ValueError, match=f"^{sides}'centre'$"):
        tiny_config(default_padding_side="centre")
    with pytest.raises(ValueError, match=f"^{sides}array"):
        tiny_config(default_padding_side=np.array(["left", "right"]))


def test_every_string_option_is_a_choice_refused_by_name_for_an_array(tok_model):
    """Audit 73: the string options below were checked with ``x in CHOICES``, which
    compared a NumPy array elementwise (NumPy's "truth value of an array ... is
    ambiguous") or hashed it (``TypeError: unhashable type``), naming no argument; now each
    is `require_choice`'s: refused by name, and a NumPy string scalar taken as its str."""
    from hooked_attnres.analysis.schedule import recency_schedule
    from hooked_attnres.interventions import Ablation
    from hooked_attnres.loading.hf_qwen3 import from_hf_qwen3
    from hooked_attnres.study.conditions import CONDITIONS, get_condition
    from hooked_attnres.tasks import make_task
    from hooked_attnres.tasks.base import rng_for

    model = tok_model
    tokens = model.to_tokens("w3 w4 w3 w5")
    calls = {
        "mode": lambda v: model.get_token_position("w3", tokens, mode=v),
        "wrap": lambda v: from_hf_qwen3(None, wrap=v, num_blocks=0),
        "mode ": lambda v: recency_schedule(4, 2, 3.0, mode=v).sources,
        "direction": lambda v: model.reset_hooks(direction=v),
        "on_full": lambda v: Ablation.compile(model, "current", on_full=v),
        "split": lambda v: rng_for(0, v).integers(1 << 30),
        "condition": get_condition,
        "task": lambda v: type(make_task(v)),
    }
    valid = {
        "mode": "last",
        "wrap": "none",
        "mode ": "full",
        "direction": "fwd",
        "on_full": "skip",
        "split": "test",
        "condition": CONDITIONS[0],
        "task": "induction",
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=rf"^{name.strip()} must be one of \(.*\), got array"):
            call(np.array([valid[name], valid[name]]))
        if name == "wrap":  # past the wrap, refused at the next argument
            with pytest.raises(ValueError, match="^num_blocks must be an integer >= 1"):
                call(np.str_(valid[name]))
            continue
        expected = call(valid[name])
        got = call(np.str_(valid[name]))
        if isinstance(got, torch.Tensor):
            assert torch.equal(got, expected), name
        elif hasattr(got, "equals"):  # recency_schedule's DataFrame
            assert got.equals(expected), name
        else:
            assert got == expected, name


def test_the_string_options_8efd353_left_are_choices_refused_by_name_for_an_array(tok_model):
    """Audit 75: 8efd353 moved string options to `require_choice`, but four kept their own
    ``x in CHOICES`` check, so an array raised NumPy's "truth value of an array ... is
    ambiguous" (``all_composition_scores``' mode, ``attribution_patch_routing_weights``'
    method, ``stack_router_activation``'s router, ``depth_state_name``'s sublayer) or
    ``TypeError: unhashable type`` (the study's ``make_task``,
    ``get_act_patch_committed_blocks_by_pos``' sublayer), naming no argument; now each is
    `require_choice`'s, and a NumPy string scalar gives what its str gives."""
    from hooked_attnres.analysis.attribution import attribution_patch_routing_weights
    from hooked_attnres.patching import depth_state_name, get_act_patch_committed_blocks_by_pos
    from hooked_attnres.study.conditions import make_task

    model = tok_model.eval()
    tokens = torch.randint(3, 40, (2, 6), generator=torch.Generator().manual_seed(0))
    _, cache = model.run_with_cache(tokens)

    def metric(logits):
        return logits[:, -1, 0].sum()

    calls = {
        "mode": (lambda v: model.all_composition_scores(v).scores, "V"),
        "method": (
            lambda v: attribution_patch_routing_weights(model, tokens, cache, metric, method=v),
            "norm",
        ),
        "router": (lambda v: cache.stack_router_activation("weights", v)[0], "mlp_res"),
        "task": (lambda v: vars(make_task(v)), "hard"),
        "sublayer": (lambda v: depth_state_name(model, 1, v), "mlp"),
        "sublayer ": (
            lambda v: get_act_patch_committed_blocks_by_pos(model, tokens, cache, metric, v),
            "mlp",
        ),
    }
    for name, (call, valid) in calls.items():
        with pytest.raises(ValueError, match=rf"^{name.strip()} must be one of \(.*\), got array"):
            call(np.array([valid, valid]))
        expected, got = call(valid), call(np.str_(valid))
        if isinstance(got, torch.Tensor):  # NaN where no block is read: equal as NaN
            torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
        else:
            assert got == expected, name


class _Side(str, enum.Enum):
    """A string option as an enum of strings (each member a ``str`` equal to its value)."""

    LEFT = "left"
    RIGHT = "right"
    LOGITS = "logits"
    TOKENS = "tokens"


def test_a_string_option_given_as_a_str_enum_member_is_its_value(tok_model):
    """Audit 71: require_choice read a ``str`` subclass by ``str()``, which for a
    ``(str, Enum)`` member is ``'_Side.LEFT'``: ``padding_side=_Side.LEFT``, equal to
    ``"left"`` and accepted before session 17's require_choice, was refused as "must be
    one of ('right', 'left', None), got <_Side.LEFT: 'left'>". It is the string it holds,
    stored as a plain ``str``."""
    texts = ["w1", "w2 w3 w4"]
    for side in (_Side.LEFT, _Side.RIGHT):
        assert torch.equal(
            tok_model.to_tokens(texts, padding_side=side),
            tok_model.to_tokens(texts, padding_side=side.value),
        )
        assert tok_model.to_str_tokens("w1 w2", padding_side=side) == tok_model.to_str_tokens(
            "w1 w2"
        )
        cfg = tiny_config(default_padding_side=side)
        assert type(cfg.default_padding_side) is str and cfg.default_padding_side == side.value
    tokens = tok_model.to_tokens("w1 w2")
    assert torch.equal(tok_model(tokens, return_type=_Side.LOGITS), tok_model(tokens))
    options = dict(max_new_tokens=2, do_sample=False, stop_at_eos=False, verbose=False)
    assert torch.equal(
        tok_model.generate(tokens, return_type=_Side.TOKENS, padding_side=_Side.LEFT, **options),
        tok_model.generate(tokens, return_type="tokens", padding_side="left", **options),
    )


def test_tokenizer_bigger_than_vocab_is_refused():
    model = tiny_model()
    tokenizer = build_word_tokenizer([f"w{i}" for i in range(60)])  # 63 tokens
    with pytest.raises(
        ValueError, match="the tokenizer has 63 tokens but the model's d_vocab is 50"
    ):
        model.set_tokenizer(tokenizer)
    assert model.tokenizer is None
    with pytest.raises(ValueError, match="63 tokens"):
        HookedAttnRes(tiny_config(), tokenizer=tokenizer)


def test_tokenizer_that_fits_exactly_is_accepted():
    model = tiny_model()
    tokenizer = build_word_tokenizer([f"w{i}" for i in range(47)])  # 50 tokens
    model.set_tokenizer(tokenizer)
    assert model.tokenizer is tokenizer
    assert model.to_tokens("w46").tolist() == [[49]]


def test_config_of_wrong_type():
    with pytest.raises(TypeError, match="HookedAttnResConfig or a dict, got str"):
        HookedAttnRes("cumulative")


# --- config validation -------------------------------------------------------------------

BASE = dict(d_model=32, n_layers=4, n_heads=4, d_vocab=50)


def make(**changes) -> HookedAttnResConfig:
    return HookedAttnResConfig(**{**BASE, **changes})


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            dict(attnres_layout="diagonal"),
            "attnres_layout='diagonal' is unknown; choose one of "
            "('cumulative', 'kimi', 'full', 'none')",
        ),
        (
            dict(attnres_num_blocks=0),
            "attnres_num_blocks=0 must be an integer between 1 and n_layers=4",
        ),
        (
            dict(attnres_num_blocks=5),
            "attnres_num_blocks=5 must be an integer between 1 and n_layers=4",
        ),
        (dict(attnres_num_blocks=2.0), "attnres_num_blocks=2.0 must be an integer"),
        (
            dict(d_model=30),
            "d_model=30 is not divisible by n_heads=4; set d_head explicitly or change n_heads",
        ),
        (dict(d_model=12), "d_head=3 must be an even integer"),
        (dict(d_head=7), "d_head=7 must be an even integer >= 2 (rotary"),
        (dict(n_key_value_heads=3), "n_heads=4 must be a multiple of n_key_value_heads=3"),
        (dict(n_key_value_heads=0), "must be a multiple of n_key_value_heads=0"),
        (
            dict(attnres_mode="full", attnres_layout="kimi"),
            "attnres_mode='full' only applies to the cumulative layout (got attnres_layout='kimi')",
        ),
        (
            dict(attnres_mode="sublayer"),
            "attnres_mode='sublayer' is unknown; choose one of ('block', 'full')",
        ),
        (
            dict(attnres_query_init="ones"),
            "attnres_query_init='ones' is unknown; choose one of ('zero', 'normal')",
        ),
        (
            dict(attnres_recency_bias=math.inf),
            "attnres_recency_bias must be a finite number or None, got inf",
        ),
        (
            dict(attnres_recency_bias=-math.inf),
            "attnres_recency_bias must be a finite number or None",
        ),
        (
            dict(attnres_recency_bias=math.nan),
            "attnres_recency_bias must be a finite number or None, got nan",
        ),
        (dict(attnres_recency_bias=True), "attnres_recency_bias must be a finite number or None"),
        (
            dict(act_fn="gelu"),
            "act_fn='gelu' is not supported: HookedAttnRes implements the Qwen3 "
            "architecture, which has act_fn='silu'",
        ),
        (
            dict(normalization_type="LN"),
            "normalization_type='LN' is not supported.*normalization_type='RMS'",
        ),
        (
            dict(positional_embedding_type="standard"),
            "positional_embedding_type='standard' is not supported",
        ),
        (dict(use_qk_norm=False), "use_qk_norm=False is not supported"),
        (dict(dtype="int8"), "dtype 'int8' is not supported; use one of"),
        (dict(dtype=torch.int64), "dtype torch.int64 is not supported; use one of"),
        (dict(dtype="float8"), "dtype 'float8' is not supported.*bfloat16"),
        (dict(eps=-1e-6), "eps must be a finite number >= 0, got -1e-06"),
        (dict(eps=math.nan), "eps must be a finite number, got nan"),
        (dict(rotary_base=0.0), "rotary_base must be a finite number > 0, got 0.0"),
        (dict(d_vocab=0), "d_vocab must be an integer >= 1, got 0"),
        (dict(n_layers=-1), "n_layers must be an integer >= 1, got -1"),
        (dict(n_ctx=0), "n_ctx must be an integer >= 1, got 0"),
        (dict(d_model=32.0), "d_model must be an integer >= 1, got 32.0"),
        (dict(n_heads=True), "n_heads must be an integer >= 1, got True"),
        (dict(d_mlp=0), "d_mlp must be an integer >= 1, got 0"),
        (dict(d_head=8.0), "d_head must be an integer or None, got 8.0"),
        (dict(d_mlp=48.5), "d_mlp must be an integer or None, got 48.5"),
        (dict(d_mlp=True), "d_mlp must be an integer or None, got True"),
        (dict(n_key_value_heads=2.0), "n_key_value_heads must be an integer or None, got 2.0"),
        (dict(seed="x"), "seed must be an integer or None, got 'x'"),
        (dict(initializer_range=-0.1), "initializer_range must be a finite number >= 0, got -0.1"),
        (dict(rotary_base=math.inf), "rotary_base must be a finite number, got inf"),
    ],
)
def test_invalid_config(changes, message):
    pattern = message if ".*" in message else re.escape(message)
    with pytest.raises(ValueError, match=pattern):
        make(**changes)


def test_valid_config_controls():
    """The fixes that the messages above suggest are accepted."""
    cfg = make(d_model=30, d_head=8)
    assert (cfg.d_head, cfg.d_mlp, cfg.n_key_value_heads) == (8, 90, 4)
    assert make(attnres_mode="full").attnres_mode == "full"
    assert make(attnres_num_blocks=4).layers_per_block == 1
    assert make(attnres_recency_bias=None).attnres_recency_bias is None
    assert make(attnres_recency_bias=2).attnres_recency_bias == 2.0
    assert make(dtype="torch.bfloat16").dtype == torch.bfloat16
    assert make(eps=0.0).eps == 0.0
    assert make().attnres_num_blocks == 4  # min(8, n_layers)


def test_from_dict_with_unknown_key():
    values = make().to_dict()
    values["n_layer"] = 4
    with pytest.raises(ValueError, match=r"unknown HookedAttnResConfig field\(s\) \['n_layer'\]"):
        HookedAttnResConfig.from_dict(values)


def test_from_dict_validates():
    values = make().to_dict()
    values["attnres_layout"] = "diagonal"
    with pytest.raises(ValueError, match="attnres_layout='diagonal' is unknown"):
        HookedAttnResConfig.from_dict(values)


def test_model_from_dict_with_unknown_key():
    with pytest.raises(ValueError, match="unknown HookedAttnResConfig field.*d_modle"):
        HookedAttnRes({**BASE, "d_modle": 32})


def test_json_round_trip(tmp_path):
    cfg = make(
        attnres_layout="kimi",
        attnres_num_blocks=2,
        attnres_recency_bias=None,
        dtype=torch.bfloat16,
        tie_word_embeddings=True,
        n_key_value_heads=2,
        d_mlp=40,
        attnres_query_init="normal",
        seed=7,
        n_ctx=64,
        rotary_base=10_000.0,
        eps=1e-5,
    )
    text = cfg.to_json()
    again = HookedAttnResConfig.from_json(text)
    assert again == cfg
    assert again.dtype is torch.bfloat16
    assert again.attnres_recency_bias is None
    assert again.to_json() == text

    path = tmp_path / "cfg.json"
    assert cfg.to_json(path) == text
    assert HookedAttnResConfig.from_json(path) == cfg
    assert HookedAttnResConfig.from_json(str(path)) == cfg
    assert HookedAttnResConfig.from_dict(cfg.to_dict()) == cfg


def test_config_refuses_a_device_this_machine_lacks_as_the_loaders_do(monkeypatch):
    """Audit 147: ``HookedAttnResConfig(device="cuda:7")`` was taken (torch parses it)
    although the loaders refuse a device the machine lacks; the model built from it failed
    in torch's words ("Torch not compiled with CUDA enabled", an ``AssertionError``). The
    config makes the loaders' check (`check_device`): one past this machine's GPUs, and on
    a machine without CUDA any ``"cuda"``, with the remedy; ``"cpu"`` and ``"meta"`` (a
    string or a ``torch.device``) still build a model there."""
    from hooked_attnres.loading import load_checkpoint

    absent = f"cuda:{torch.cuda.device_count()}"
    message = rf"^device='{absent}' is not on this machine: it has \d+ CUDA device\(s\)"
    with pytest.raises(ValueError, match=message):
        make(device=absent)
    with pytest.raises(ValueError, match=message):  # the loaders' words, the same check
        load_checkpoint("no such folder", device=absent)
    with pytest.raises(ValueError, match=message):
        make().replace(device=absent)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without CUDA
    for device in ("cuda", "cuda:0", torch.device("cuda")):
        with pytest.raises(
            ValueError, match=r"is not on this machine: it has 0 CUDA device\(s\); use device='cpu'"
        ):
            make(device=device)
    monkeypatch.undo()
    for device in ("cpu", "meta", torch.device("meta"), torch.device("cpu")):
        model = HookedAttnRes(make(device=device))
        assert next(model.parameters()).device == torch.device(device)


def test_replace_validates():
    cfg = make(attnres_num_blocks=2)
    with pytest.raises(ValueError, match="attnres_layout='diagonal' is unknown"):
        cfg.replace(attnres_layout="diagonal")
    with pytest.raises(
        ValueError, match="attnres_num_blocks=2 must be an integer between 1 and n_layers=1"
    ):
        cfg.replace(n_layers=1)
    with pytest.raises(
        ValueError, match="attnres_mode='full' only applies to the cumulative layout"
    ):
        cfg.replace(attnres_mode="full", attnres_layout="none")
    with pytest.raises(ValueError, match="act_fn='relu' is not supported"):
        cfg.replace(act_fn="relu")
    # a failed replace leaves the original alone; a valid one returns a new validated config
    assert cfg.attnres_layout == "cumulative" and cfg.n_layers == 4
    other = cfg.replace(attnres_layout="full", dtype="float16")
    assert other.attnres_layout == "full" and other.dtype == torch.float16
    assert cfg.attnres_layout == "cumulative" and cfg.dtype == torch.float32


def test_run_with_cache_and_forward_flags_are_true_or_false(model):
    """Audit 138: flags read by truthiness: ``return_cache_object="no"`` returned the cache
    object, ``remove_batch_dim="no"`` dropped the batch axis of a one-prompt run, and
    ``loss_per_token="no"`` returned the loss per token."""
    for flag in ("return_cache_object", "remove_batch_dim", "incl_bwd"):
        with pytest.raises(TypeError, match=rf"^{flag} must be True or False, got 'no'"):
            model.run_with_cache(GOOD, **{flag: "no"})
    with pytest.raises(TypeError, match=r"^loss_per_token must be True or False, got 'no'"):
        model(GOOD, return_type="loss", loss_per_token="no")
    # the controls: the flags themselves
    assert isinstance(model.run_with_cache(GOOD, return_cache_object=False)[1], dict)
    assert model(GOOD, return_type="loss", loss_per_token=True).shape == (1, 3)


def test_cache_constructor_flags_are_true_or_false(model):
    """Audit 147: ``AttnResActivationCache(..., has_batch_dim=...)`` kept its flag unchecked,
    as TransformerLens reads it, by truthiness: ``has_batch_dim="False"`` around a cache
    without a batch axis took its position axis for the batch (``apply_slice_to_batch_dim(0)``
    returned position 0, ``[d_model]`` for ``[pos, d_model]``); ``other_hooks_attached`` was
    unchecked too. Both go through `require_bool` now; the controls are the flags given as
    bools (the unbatched cache refuses a batch slice, as TransformerLens does)."""
    from hooked_attnres.model.cache import AttnResActivationCache

    _, cache = model.run_with_cache(GOOD)
    unbatched = {name: tensor[0] for name, tensor in cache.cache_dict.items()}
    for flag in ("has_batch_dim", "other_hooks_attached"):
        for bad in ("False", 0, torch.tensor(False)):
            with pytest.raises(TypeError, match=rf"^{flag} must be True or False"):
                AttnResActivationCache(unbatched, model, **{flag: bad})
    plain = AttnResActivationCache(unbatched, model, has_batch_dim=np.False_)
    assert plain.has_batch_dim is False
    with pytest.raises(AssertionError, match="without a batch dim"):
        plain.apply_slice_to_batch_dim(0)
    assert (
        AttnResActivationCache(unbatched, model, other_hooks_attached=None).other_hooks_attached
        is None
    )
    assert (
        AttnResActivationCache(
            unbatched, model, other_hooks_attached=np.False_
        ).other_hooks_attached
        is False
    )


def test_hooks_flags_are_true_or_false(model):
    """Audit 144: run_with_cache's flags were checked (audit 138) but not those it shares
    with run_with_hooks and the hooks context: ``reset_hooks_end="no"`` removed the hook
    meant to stay (the next forward pass was the plain model's, not the hooked one, 0.07
    logits apart on a tiny model), ``clear_contexts="no"`` cleared the hooks' contexts."""

    def zero(x, hook):
        return torch.zeros_like(x)

    hook = [("blocks.0.hook_attn_out", zero)]
    for flag in ("reset_hooks_end", "clear_contexts"):
        with pytest.raises(TypeError, match=rf"^{flag} must be True or False, got 'no'"):
            model.run_with_hooks(GOOD, fwd_hooks=hook, **{flag: "no"})
        with pytest.raises(TypeError, match=rf"^{flag} must be True or False, got 'no'"):
            model.run_with_cache(GOOD, **{flag: "no"})
        with pytest.raises(TypeError, match=rf"^{flag} must be True or False, got 'no'"):
            with model.hooks(hook, **{flag: "no"}):
                pass
    assert not any(point.fwd_hooks for point in model.hook_points())  # refused before
    # the control: reset_hooks_end=False keeps the hook, as a hook added by hand
    hooked = model.run_with_hooks(GOOD, fwd_hooks=hook, reset_hooks_end=False)
    try:
        torch.testing.assert_close(model(GOOD), hooked, rtol=0, atol=0)
    finally:
        model.reset_hooks()
    with model.hooks(hook):
        by_hand = model(GOOD)
    torch.testing.assert_close(hooked, by_hand, rtol=0, atol=0)
    assert not torch.equal(model(GOOD), hooked)

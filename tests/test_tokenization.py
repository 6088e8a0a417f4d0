"""TransformerLens tokenizer helpers with an attached Hugging Face tokenizer."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from helpers import (
    build_sentencepiece_style_tokenizer,
    build_word_tokenizer,
    randomize_routing,
    tiny_model,
    transformer_bridge_pair,
)


@pytest.fixture
def model(word_tokenizer):
    model = randomize_routing(tiny_model(d_vocab=50))
    model.set_tokenizer(word_tokenizer)
    return model


def test_to_tokens_and_back(model, word_tokenizer):
    tokens = model.to_tokens("w1 w2 w3")
    expected = [word_tokenizer.convert_tokens_to_ids(w) for w in ("w1", "w2", "w3")]
    assert tokens.tolist() == [expected]
    assert model.to_string(tokens[0]) == "w1 w2 w3"
    assert model.to_str_tokens("w1 w2 w3") == ["w1", "w2", "w3"]
    assert model.to_str_tokens(tokens) == ["w1", "w2", "w3"]
    assert model.to_single_token("w7") == word_tokenizer.convert_tokens_to_ids("w7")
    assert model.to_string(tokens) == ["w1 w2 w3"]


def test_prepend_bos(model, word_tokenizer):
    assert model.to_tokens("w1", prepend_bos=True).tolist() == [
        [word_tokenizer.bos_token_id, word_tokenizer.convert_tokens_to_ids("w1")]
    ]
    assert model.to_str_tokens("w1", prepend_bos=True) == ["<bos>", "w1"]
    assert model.to_tokens("w1").shape == (1, 1)  # Qwen3 default: no BOS


def test_prepend_bos_that_is_not_a_bool_is_refused(model, word_tokenizer):
    """Audit finding: prepend_bos was read by truthiness, so prepend_bos="no" (or "False")
    prepended the BOS silently, in to_tokens, to_str_tokens, get_token_position, string
    forward passes and generate (as stop_at_eos="no" was read as True before it was
    checked); 0 and 1 dropped or added it. None (the config's default), True and False
    are taken."""
    calls = {
        "to_tokens": lambda flag: model.to_tokens("w1 w2", prepend_bos=flag),
        "to_str_tokens": lambda flag: model.to_str_tokens("w1 w2", prepend_bos=flag),
        "get_token_position": lambda flag: model.get_token_position("w2", "w1 w2", "first", flag),
        "forward": lambda flag: model(["w1 w2", "w3"], prepend_bos=flag),
        "generate": lambda flag: model.generate(
            "w1 w2", prepend_bos=flag, max_new_tokens=1, stop_at_eos=False, verbose=False
        ),
    }
    tokens = model.to_tokens(["w1 w2 w3", "w4"], padding_side="left")
    calls["generate(tokens, padding_side='left')"] = lambda flag: model.generate(
        tokens,
        padding_side="left",
        prepend_bos=flag,
        max_new_tokens=1,
        verbose=False,
        stop_at_eos=False,
    )
    for call in calls.values():
        for flag in ("no", "False", 0, 1, torch.tensor(True)):
            with pytest.raises(
                TypeError,
                match=re.escape(f"prepend_bos must be True or False or None, got {flag!r}"),
            ):
                call(flag)
        for flag in (None, True, False):
            call(flag)
    bos = word_tokenizer.bos_token_id
    assert model.to_tokens("w1", prepend_bos=False)[0, 0] != bos
    assert model.to_tokens("w1", prepend_bos=True)[0, 0] == bos


def test_prepend_bos_takes_numpy_booleans_as_the_bools_they_are(model, word_tokenizer):
    """Audit finding: the check of prepend_bos refused np.True_ / np.False_ (what
    ``(array > 0).any()`` gives), which TransformerLens takes by truthiness and this
    package took before the check; a NumPy boolean is the bool it holds, as a NumPy
    integer is an int. The result equals the Python bool's, with and without the BOS."""
    bos = word_tokenizer.bos_token_id
    for value in (True, False):
        flag = np.bool_(value)
        expected = model.to_tokens("w1 w2", prepend_bos=value)
        assert (expected[0, 0] == bos) == value  # the two cases differ
        assert torch.equal(model.to_tokens("w1 w2", prepend_bos=flag), expected)
        assert model.to_str_tokens("w1 w2", prepend_bos=flag) == model.to_str_tokens(
            "w1 w2", prepend_bos=value
        )
        assert model.get_token_position("w2", "w1 w2", "first", flag) == int(value) + 1
        torch.testing.assert_close(
            model("w1 w2", prepend_bos=flag), model("w1 w2", prepend_bos=value), rtol=0, atol=0
        )
        options = dict(max_new_tokens=1, stop_at_eos=False, do_sample=False, verbose=False)
        assert torch.equal(
            model.generate("w1 w2", prepend_bos=flag, return_type="tokens", **options),
            model.generate("w1 w2", prepend_bos=value, return_type="tokens", **options),
        )


def test_to_single_token_counts_every_token_of_a_text_longer_than_n_ctx():
    """Audit finding: to_single_token tokenised with to_tokens's truncation to n_ctx, so
    with n_ctx=1 "w5 w6" was taken for the single token w5 (its id returned, silently),
    and a longer text was refused as n_ctx tokens ("'w5 w6 w7' is 2 tokens" with
    n_ctx=2)."""
    tokenizer = build_word_tokenizer([f"w{i}" for i in range(40)])
    for n_ctx in (1, 2):
        model = tiny_model(n_ctx=n_ctx)
        model.set_tokenizer(tokenizer)
        assert model.to_single_token("w5") == tokenizer.convert_tokens_to_ids("w5")
        with pytest.raises(ValueError, match=r"'w5 w6' is 2 tokens \['w5', 'w6'\], not one"):
            model.to_single_token("w5 w6")
        with pytest.raises(ValueError, match=r"'w5 w6 w7' is 3 tokens \['w5', 'w6', 'w7'\]"):
            model.to_single_token("w5 w6 w7")


def test_get_token_position_names_the_truncation_when_the_token_is_beyond_n_ctx():
    """Audit finding: a string prompt is truncated to n_ctx tokens (as in TransformerLens;
    the forward pass reads no more), and a token that occurs only after them was refused
    as "does not occur in the prompt", though it does."""
    tokenizer = build_word_tokenizer([f"w{i}" for i in range(40)])
    model = tiny_model(n_ctx=2)
    model.set_tokenizer(tokenizer)
    assert model.get_token_position("w1", "w0 w1 w2 w3") == 1
    with pytest.raises(ValueError, match=r"occurs in the prompt after its first n_ctx=2"):
        model.get_token_position("w3", "w0 w1 w2 w3")
    with pytest.raises(ValueError, match=r"token \d+ does not occur in the prompt$"):
        model.get_token_position("w9", "w0 w1 w2 w3")


def test_get_token_position_last_refuses_an_occurrence_beyond_n_ctx():
    """Audit finding: mode="last" of a string longer than n_ctx returned the last
    occurrence within its first n_ctx tokens, silently, where the token occurs again
    later in the prompt (position 0 for w1 in "w1 w2 w3 w1" with n_ctx=3; the prompt's
    last w1 is at 3). It is refused, naming both; "first" is the same either way, and
    the tokens the model reads (to_tokens) give the position within them."""
    tokenizer = build_word_tokenizer([f"w{i}" for i in range(40)])
    model = tiny_model(n_ctx=3)
    model.set_tokenizer(tokenizer)
    prompt = "w1 w2 w3 w1"
    with pytest.raises(
        ValueError,
        match=r"after its first n_ctx=3 tokens \(at position 3\).*last in them at "
        r"position 0: pass model.to_tokens\(prompt\)",
    ):
        model.get_token_position("w1", prompt, mode="last")
    assert model.get_token_position("w1", prompt, mode="first") == 0
    assert model.get_token_position("w1", model.to_tokens(prompt), mode="last") == 0
    assert model.get_token_position("w2", prompt, mode="last") == 1  # not beyond n_ctx


def test_to_single_token_refuses_multiple_tokens(model):
    with pytest.raises(ValueError, match=r"'w1 w2' is 2 tokens"):
        model.to_single_token("w1 w2")


def test_batched_strings_are_right_padded_and_match_unpadded_runs(model):
    texts = ["w1 w2 w3 w4 w5", "w6 w7"]
    tokens, mask = model.to_tokens_and_mask(texts)
    assert tokens.shape == (2, 5) and mask.tolist() == [[1] * 5, [1, 1, 0, 0, 0]]
    batched = model(texts)
    for row, text in enumerate(texts):
        alone = model(text)
        n = alone.shape[1]
        assert torch.allclose(batched[row, :n], alone[0], atol=1e-5)
    # padding is excluded from the loss
    loss = model(texts, return_type="loss", loss_per_token=True)
    assert loss.shape == (2, 4) and torch.all(loss[1, 1:] == 0)
    mean = model(texts, return_type="loss")
    expected = (model(texts[0], return_type="loss") * 4 + model(texts[1], return_type="loss")) / 5
    assert torch.allclose(mean, expected, atol=1e-5)


def test_string_input_equals_token_input(model):
    logits, loss = model("w3 w4 w5", return_type="both")
    tokens = model.to_tokens("w3 w4 w5")
    assert torch.allclose(logits, model(tokens))
    assert torch.allclose(loss, model(tokens, return_type="loss"))


def test_string_run_with_cache(model):
    _, cache = model.run_with_cache("w1 w2 w3 w4")
    assert cache["weights", 3, "attn_res"].shape == (1, 4, 3)


def test_unknown_words_map_to_unk(model, word_tokenizer):
    assert model.to_tokens("w1 zebra").tolist() == [
        [word_tokenizer.convert_tokens_to_ids("w1"), word_tokenizer.unk_token_id]
    ]


def test_to_str_tokens_takes_what_transformerlens_takes(model, word_tokenizer):
    """Audit finding: a list of token tensors (TransformerLens maps over any list) failed
    with "only integer tensors of a single element can be converted to an index", and a
    0-d tensor was refused; TransformerBridge 4.3 gives one list per item / one token."""
    ids = {w: word_tokenizer.convert_tokens_to_ids(w) for w in ("w1", "w2", "w3")}
    one, two = torch.tensor([ids["w1"], ids["w2"]]), torch.tensor([ids["w3"]])
    assert model.to_str_tokens([one, two]) == [["w1", "w2"], ["w3"]]
    assert model.to_str_tokens([one[None], "w3 w1"]) == [["w1", "w2"], ["w3", "w1"]]
    assert model.to_str_tokens([[ids["w1"]], []]) == [["w1"], []]
    assert model.to_str_tokens(torch.tensor(ids["w2"])) == ["w2"]
    assert model.to_str_tokens([ids["w1"], ids["w3"]]) == ["w1", "w3"]  # a list of ids
    # a text of no tokens is no string tokens (TransformerBridge 4.3: []); audit finding:
    # it raised "the input tokenises to zero tokens", also for a list holding one
    assert model.to_str_tokens("") == [] and model.to_str_tokens(["w1", ""]) == [["w1"], []]
    assert model.to_str_tokens("", prepend_bos=True) == ["<bos>"]
    with pytest.raises(ValueError, match="the input tokenises to zero tokens"):
        model.to_tokens("")  # no [1, 0] tensor: a forward pass of no tokens is refused
    with pytest.raises(TypeError, match="nested list holding"):
        model.to_str_tokens([[ids["w1"], [ids["w2"]]]])
    with pytest.raises(TypeError, match="integer token ids, got dtype torch.float32"):
        model.to_str_tokens(torch.tensor([1.0]))


@pytest.mark.parametrize("bos_post_processor", [False, True])
def test_tokens_equal_transformer_bridges_for_a_sentencepiece_style_tokenizer(
    tmp_path, bos_post_processor
):
    """to_tokens tokenises the text alone and puts the BOS id before it. A tokenizer that
    marks only the start of the text (Metaspace, prepend_scheme="first") tokenises
    "<s>Hello" as ["<s>", "Hello"], not ["<s>", "▁Hello"], so prepending the BOS as a
    string would give other ids; TransformerBridge 4.3 reloads the tokenizer with
    add_bos_token=True, so the tokenizer prepends the BOS itself and the ids are ours."""
    tokenizer = build_sentencepiece_style_tokenizer(bos_post_processor)
    bridge, model = transformer_bridge_pair(tmp_path, tokenizer)
    assert bridge.cfg.tokenizer_prepends_bos  # also without the post-processor, after reloading
    bos = tokenizer.bos_token_id
    as_string = tokenizer("<s>Hello world", add_special_tokens=False)["input_ids"]
    assert model.to_tokens("Hello world", prepend_bos=True)[0].tolist() != as_string
    for text in ("Hello world", ["Hello world", "world", "Hello"]):
        for prepend_bos in (True, False):
            for side in ("right", "left"):
                ours = model.to_tokens(text, prepend_bos=prepend_bos, padding_side=side)
                theirs = bridge.to_tokens(text, prepend_bos=prepend_bos, padding_side=side)
                assert torch.equal(ours, theirs), (text, prepend_bos, side)
        strings = text if isinstance(text, list) else [text]
        for prepend_bos in (True, False):
            assert model.to_str_tokens(text, prepend_bos) == bridge.to_str_tokens(text, prepend_bos)
            for string in strings:
                for mode in ("first", "last"):
                    assert model.get_token_position(
                        bos if prepend_bos else tokenizer.convert_tokens_to_ids("▁world"),
                        string + " world",
                        mode,
                        prepend_bos,
                    ) == bridge.get_token_position(
                        bos if prepend_bos else tokenizer.convert_tokens_to_ids("▁world"),
                        string + " world",
                        mode,
                        prepend_bos,
                    )
    for prepend_bos in (True, False):
        for text in ("", ["Hello", ""]):
            assert model.to_str_tokens(text, prepend_bos) == bridge.to_str_tokens(text, prepend_bos)
    tokens = model.to_tokens(["Hello world", "Hello"], prepend_bos=True, padding_side="left")
    assert model.to_string(tokens) == bridge.to_string(tokens)
    assert model.to_string(tokens[0]) == bridge.to_string(tokens[0])
    # documented difference: a text longer than n_ctx keeps its first n_ctx tokens here;
    # the Bridge truncates with the BOS and then drops it (n_ctx - 1 tokens)
    long = " ".join(["Hello world"] * 40)
    untruncated = bridge.to_tokens(long, prepend_bos=False, truncate=False)
    n_ctx = model.cfg.n_ctx
    assert untruncated.shape[1] > n_ctx
    assert torch.equal(model.to_tokens(long, prepend_bos=False), untruncated[:, :n_ctx])
    assert bridge.to_tokens(long, prepend_bos=False).shape[1] == n_ctx - 1


def test_to_str_tokens_refuses_ids_outside_the_vocabulary_as_to_string_does(model):
    """Audit 138: an id past d_vocab decoded to '' (a wrong string, silently) and a negative
    one failed in the tokenizer with "OverflowError: number too small to fit in target
    type"; `to_string` refused both (`require_token_ids`)."""
    for ids in ([3, 1000], [-1, 3]):
        with pytest.raises(ValueError, match=r"token ids must be in \[0, 50\) \(d_vocab\)"):
            model.to_string(torch.tensor(ids))
        with pytest.raises(ValueError, match=r"token ids must be in \[0, 50\) \(d_vocab\)"):
            model.to_str_tokens(torch.tensor(ids))
        with pytest.raises(ValueError, match=r"token ids must be in \[0, 50\) \(d_vocab\)"):
            model.to_str_tokens(ids)  # a list of ids


def test_a_token_id_for_text_and_text_for_token_ids_are_refused_by_name(model):
    """Audit 138: ``to_tokens(3)`` and ``to_single_token(3)`` failed with "'int' object is
    not iterable", ``to_string("w1")`` with torch's "new(): invalid data type 'str'"."""
    with pytest.raises(TypeError, match="to_tokens takes a string or a non-empty list of strin"):
        model.to_tokens(3)
    with pytest.raises(TypeError, match="to_tokens takes a string .*, got int 3"):
        model.to_single_token(3)
    with pytest.raises(TypeError, match="to_string decodes token ids, got the string 'w1'"):
        model.to_string("w1")


def test_to_tokens_flags_that_are_not_bools_are_refused(model):
    """Audit 145: to_tokens / to_tokens_and_mask read truncate and move_to_device by
    truthiness (``truncate="no"`` cut the text to n_ctx); they are refused by name, and
    np.bool_ is the bool it holds (same tokens)."""
    long_text = " ".join(["w1"] * (model.cfg.n_ctx + 3))
    for call in (model.to_tokens, model.to_tokens_and_mask):
        for flag in ("truncate", "move_to_device"):
            with pytest.raises(TypeError, match=f"^{flag} must be True or False, got 'yes'"):
                call("w1", **{flag: "yes"})
    assert model.to_tokens(long_text, truncate=np.False_).shape[1] == model.cfg.n_ctx + 3
    assert torch.equal(
        model.to_tokens(long_text, truncate=np.True_), model.to_tokens(long_text, truncate=True)
    )

"""Helpers shared by the tests: tiny random models, a word-level tokenizer, all offline.

Imported explicitly (``from helpers import tiny_model``); ``conftest.py`` holds only fixtures.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from hooked_attnres import HookedAttnRes, HookedAttnResConfig

LAYOUTS = ("cumulative", "kimi", "full", "none")


def tiny_config(**overrides) -> HookedAttnResConfig:
    """A small model config; any field can be overridden."""
    values = dict(
        d_model=32,
        n_layers=4,
        n_heads=4,
        n_key_value_heads=2,
        d_vocab=50,
        d_mlp=48,
        n_ctx=32,
        attnres_num_blocks=2,
        seed=0,
    )
    values.update(overrides)
    return HookedAttnResConfig(**values)


def eps_zero_config(layout: str, n_layers: int = 2, num_blocks: int = 1) -> HookedAttnResConfig:
    """A float64 model config with ``eps = 0`` in ``layout`` (d_model 8, 2 heads of 4):
    its padding positions' routing is ``0 / 0`` in the kimi and full layouts."""
    return HookedAttnResConfig(
        d_model=8,
        n_layers=n_layers,
        n_heads=2,
        d_head=4,
        d_vocab=17,
        n_ctx=8,
        attnres_layout=layout,
        attnres_num_blocks=num_blocks,
        eps=0.0,
        dtype=torch.float64,
        seed=0,
    )


def nan_at_padding(mask: torch.Tensor, name: str = "blocks.0.hook_attn_out") -> tuple:
    """A forward hook ``(name, fn)`` that writes nan at the padding positions (``mask ==
    0``, ``[batch, pos]``) of ``name``'s ``[batch, pos, ...]`` activation: the garbage a
    padding position may hold (with eps 0 its routing was 0 / 0 before `padding_eps` made
    it finite), to check that an analysis or the attention never lets it reach a real
    position, selecting rather than multiplying by 0."""
    padding = torch.as_tensor(mask) == 0

    def fn(x: torch.Tensor, hook) -> torch.Tensor:
        return x.masked_fill(padding.reshape(*padding.shape, *[1] * (x.ndim - 2)), float("nan"))

    return name, fn


def tiny_model(**overrides) -> HookedAttnRes:
    return HookedAttnRes(tiny_config(**overrides))


def randomize_routing(model: HookedAttnRes, seed: int = 0, scale: float = 1.0) -> HookedAttnRes:
    """Give every router a non-trivial query, gain and bias (so routing depends on content)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".query"):
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
            elif name.endswith("key_norm.w"):
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=generator))
            elif name.endswith("recency_bias"):
                param.copy_(torch.randn((), generator=generator))
    return model


# the smallest Qwen3 shape the float64 tests wrap (d_model 8, 2 heads of 4, 1 KV head)
SMALL_QWEN3 = dict(
    hidden_size=8,
    intermediate_size=12,
    head_dim=4,
    num_attention_heads=2,
    num_key_value_heads=1,
    vocab_size=17,
)


def hf_qwen3(seed: int = 0, perturb_norms: bool = True, **overrides) -> Qwen3ForCausalLM:
    """A random ``Qwen3ForCausalLM`` (norm gains perturbed so that they matter)."""
    values = dict(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**values)).eval()
    if perturb_norms:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.add_(0.3 * torch.randn_like(param))
    return model


def rms_norm_in_float64(self, hidden: torch.Tensor) -> torch.Tensor:
    """``Qwen3RMSNorm.forward`` without its float32 round trip (transformers computes the
    statistic of a float64 input in float32: 4e-8 on these logits, the only difference
    from this model in float64); patch it in with
    ``patch.object(Qwen3RMSNorm, "forward", rms_norm_in_float64)``."""
    variance = hidden.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden * torch.rsqrt(variance + self.variance_epsilon))


def real_diff(got: torch.Tensor, expected: torch.Tensor, mask) -> float:
    """max |got - expected| over the real positions of ``[batch, pos, ...]`` tensors (every
    position without a ``[batch, pos]`` mask), both finite there; a padding position may
    be nan with ``eps = 0`` (docs/hooks.md)."""
    real = torch.ones(got.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
    assert torch.isfinite(got[real]).all() and torch.isfinite(expected[real]).all()
    return (got[real] - expected[real]).abs().max().item()


def build_word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer with ``<unk>``, ``<pad>`` and ``<bos>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<pad>": 1, "<bos>": 2}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>"
    )


def build_sentencepiece_style_tokenizer(bos_post_processor: bool) -> PreTrainedTokenizerFast:
    """A tiny Unigram tokenizer with SentencePiece's ``Metaspace`` pre-tokenizer that marks
    only the start of the text (``prepend_scheme="first"``, as Llama-style tokenizers do):
    ``"Hello"`` at the start is ``"▁Hello"``, after a special token it is ``"Hello"``.
    With ``bos_post_processor`` the tokenizer prepends ``<s>`` itself."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    pieces = ["<unk>", "<pad>", "<s>", "</s>", "▁", "H", "e", "l", "o", "w", "r", "d"]
    pieces += ["▁Hello", "Hello", "▁world", "world", "ello", "▁H"]
    backend = Tokenizer(
        models.Unigram([(p, -1.0 if len(p) > 1 else -5.0) for p in pieces], unk_id=0)
    )
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    backend.decoder = decoders.Metaspace(prepend_scheme="first")
    if bos_post_processor:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 2)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )


def transformer_bridge_pair(directory, tokenizer):
    """TransformerLens 4.3's ``TransformerBridge`` over a tiny HF Qwen3 and this model's
    exact wrap of the same weights, each with ``tokenizer`` saved to ``directory`` and
    loaded from there (the Bridge reloads its tokenizer from that path, with
    ``add_bos_token=True``)."""
    tokenizer.save_pretrained(directory)
    # imported here: the Bridge's modules take seconds to import
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    hf = hf_qwen3()  # the Bridge rewires its model in place: each side gets its own copy
    bridge = build_bridge_from_module(
        hf,
        "Qwen3ForCausalLM",
        hf_config=hf.config,
        tokenizer=AutoTokenizer.from_pretrained(directory),
    )
    model = HookedAttnRes.from_hf_qwen3(hf_qwen3(), wrap="exact", num_blocks=2)
    model.set_tokenizer(AutoTokenizer.from_pretrained(directory))
    return bridge, model


def tiny_study_runs(root, condition: str, seeds, n_layers: int = 4, num_blocks: int = 2) -> None:
    """Tiny untrained kimi models saved as ``{condition}_seed{n}/model`` runs."""
    from hooked_attnres.study import get_condition, run_dir
    from hooked_attnres.tasks import task_tokenizer

    tokenizer = task_tokenizer(get_condition(condition).make_task())
    for seed in seeds:
        cfg = tiny_config(
            d_vocab=len(tokenizer),
            attnres_layout="kimi",
            n_layers=n_layers,
            attnres_num_blocks=num_blocks,
            n_ctx=64,
            seed=seed,
        )
        HookedAttnRes(cfg, tokenizer=tokenizer).save_pretrained(
            run_dir(root, condition, seed) / "model", overwrite=True
        )


def blocks_of(kind: str) -> dict:
    """``{"num_blocks": 2}`` for an ``"attnres"`` model of the tests' tiny shapes; ``{}``
    for a ``"vanilla"`` one, which has no blocks (`build_model` and `train_condition`
    refuse a ``num_blocks`` for it)."""
    return {"num_blocks": 2} if kind == "attnres" else {}


def emulate_ascii_locale(monkeypatch) -> None:
    """Make ASCII the locale's default encoding for the rest of a test: every text
    ``open`` / ``Path.read_text`` / ``Path.write_text`` given no encoding reads and writes
    ASCII (binary opens and explicit encodings are untouched), so a text file written or
    read without ``encoding="utf-8"`` fails on a character outside ASCII."""
    import builtins
    from pathlib import Path

    real_open, real_read, real_write = builtins.open, Path.read_text, Path.write_text

    def open_ascii(file, mode="r", buffering=-1, encoding=None, *args, **kwargs):
        if "b" not in mode and encoding is None:
            encoding = "ascii"
        return real_open(file, mode, buffering, encoding, *args, **kwargs)

    def read_ascii(self, encoding=None, errors=None):
        return real_read(self, encoding=encoding or "ascii", errors=errors)

    def write_ascii(self, data, encoding=None, errors=None, newline=None):
        return real_write(self, data, encoding=encoding or "ascii", errors=errors, newline=newline)

    monkeypatch.setattr(builtins, "open", open_ascii)
    monkeypatch.setattr(Path, "read_text", read_ascii)
    monkeypatch.setattr(Path, "write_text", write_ascii)


def unseal(directory) -> None:
    """Remove the completion marker of a checkpoint saved by this library: the directory is
    then one assembled by hand or by another tool, which loads unchecked against its save
    (``docs/loading.md``). The tests that edit a saved checkpoint to reach a loader's own
    checks call it after the edit (an edited checkpoint that keeps its marker is refused
    as changed after its save: ``tests/test_integrity.py``)."""
    from hooked_attnres._atomic import MARKER

    (Path(directory) / MARKER).unlink(missing_ok=True)  # a second edit finds it unsealed


def title_of(fig) -> str:
    """A figure's title as one line: `hooked_attnres.plotting` breaks a long title into
    lines with plotly's ``<br>`` (audit 219: titles of 185 characters ran off the figure)."""
    return fig.layout.title.text.replace("<br>", " ")


def subtitle_of(fig) -> str | None:
    """A figure's subtitle (its whisker line, then its blank line where it has one) as one
    line, as `title_of`; None if it has none."""
    text = fig.layout.title.subtitle.text
    return None if text is None else text.replace("<br>", " ")


# how a line of a figure's subtitle begins: the whisker line, or the line that says what
# the figure's blanks are ("blank: ...", "no bars: ...", "no effect bar: ...", "no point: ...")
_SUBTITLE_LINE = re.compile(r"(whiskers|blank|no [a-z ]+?): ")


def subtitle_lines(fig) -> list[str]:
    """A figure's subtitle as its lines (the whisker line, the blank line), each as one
    line: the ``<br>`` of a wrapped line joined by a space, the ``<br>`` before a line's
    first word kept as the break (a piece after one ending in ``;`` continues it: the
    parts of a line are joined by ``"; "``); ``[]`` if it has none."""
    text = fig.layout.title.subtitle.text
    lines: list[str] = []
    for piece in [] if text is None else text.split("<br>"):
        if lines and (lines[-1].endswith(";") or not _SUBTITLE_LINE.match(piece)):
            lines[-1] = f"{lines[-1]} {piece}"
        else:
            lines.append(piece)
    return lines

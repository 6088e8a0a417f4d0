"""A small word-level tokenizer for the probe tasks (``tokenizers`` + ``transformers``)."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<unk>", "<pad>", "<bos>")


def build_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """A whitespace-split word-level fast tokenizer.

    Ids: ``<unk>=0, <pad>=1, <bos>=2``, then ``words`` in order (duplicates dropped), so
    the same word list always gives the same ids. ``save_pretrained`` / ``AutoTokenizer``
    round-trip it.
    """
    vocab: dict[str, int] = {}
    for word in (*SPECIAL_TOKENS, *words):
        if not word or any(ch.isspace() for ch in word):
            raise ValueError(
                f"tokenizer words must be non-empty and contain no spaces, got {word!r}"
            )
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<pad>",
        clean_up_tokenization_spaces=False,
    )


def task_tokenizer(*tasks) -> PreTrainedTokenizerFast:
    """One tokenizer covering the words of several tasks (in the given order)."""
    words: list[str] = []
    for task in tasks:
        words.extend(task.words())
    return build_tokenizer(words)

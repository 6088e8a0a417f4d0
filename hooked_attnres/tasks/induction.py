"""Induction copying over a long history: a second task family with other routing needs.

Prompt (``seq_len=5``, ``copy_len=2``)::

    <bos> t8 t3 t11 t0 t6 | t8 t3          -> answer t11

A segment of distinct random tokens, a separator, and its first ``copy_len`` tokens
again; the answer is the token that followed them the first time. Retrieval needs a
key lookup at one position; induction needs the previous-token / induction-head circuit
across the whole segment, so the two tasks can show different depth routing. The
corrupted prompt replaces the answer's first occurrence by an unused token (the
contrast), which then becomes the right answer. Every copied token after the first is
supervised too (``targets``: ``copy_len`` supervised tokens per prompt, the answer last),
so training on this task is not the answer's cross-entropy alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from hooked_attnres._validation import require_integer
from hooked_attnres.tasks.base import Task

SEPARATOR = "|"


@dataclass(frozen=True)
class InductionCopy(Task):
    """Induction prompts.

    Args:
        seq_len: length of the random segment (distinct tokens).
        copy_len: tokens repeated before the answer (``1 <= copy_len < seq_len``).
        n_tokens: size of the token vocabulary ``t0 ..`` (> seq_len, for the contrast).

    Every prompt has ``prompt_length = seq_len + copy_len + 2`` tokens.
    """

    seq_len: int = 12
    copy_len: int = 4
    n_tokens: int = 32
    name: str = "induction"

    def __post_init__(self) -> None:
        self._check_name()
        for field_name in ("seq_len", "copy_len", "n_tokens"):
            value = require_integer(field_name, getattr(self, field_name), 1)
            object.__setattr__(self, field_name, value)  # a Python int (np.int64 given)
        self._check_size(self.n_tokens + 1, f"n_tokens + 1 ('|') = {self.n_tokens} + 1")
        if self.copy_len >= self.seq_len:
            raise ValueError(
                f"copy_len={self.copy_len} must be smaller than seq_len={self.seq_len} (the answer "
                "is the token after the copied prefix)"
            )
        if self.n_tokens <= self.seq_len:
            raise ValueError(
                f"n_tokens={self.n_tokens} must exceed seq_len={self.seq_len}: segment tokens are "
                "distinct and the contrast is a token not in the segment"
            )

    def words(self) -> list[str]:
        return [f"t{i}" for i in range(self.n_tokens)] + [SEPARATOR]

    def leaks_into(self, trained: Task) -> Optional[str]:
        """A training `InductionCopy` of the same ``seq_len`` with a longer ``copy_len``
        supervises each copied token, so its prompts' prefixes are this task's prompts and
        train on their answers; the split hashes whole prompts only (docs/training.md,
        known issue). Whatever the two ``n_tokens``: the segments drawn from the tokens
        both use are common to the two tasks."""
        if (
            isinstance(trained, InductionCopy)
            and trained.seq_len == self.seq_len
            and trained.copy_len > self.copy_len
        ):
            return (
                f"{self!r} is not held out from training on {trained!r}: the longer copy "
                "supervises every copied token, so each held-out prompt is the prefix of "
                "training prompts with the same segment, which train on its answer, while "
                "the split hashes whole prompts. Evaluate on the trained copy_len"
            )
        return None

    @property
    def prompt_length(self) -> int:
        return self.seq_len + self.copy_len + 2

    def _draw(self, rng: np.random.Generator, vocab: dict[str, int]):
        chosen = rng.choice(self.n_tokens, size=self.seq_len + 1, replace=False)
        segment, unused = list(chosen[:-1]), int(chosen[-1])
        answer = segment[self.copy_len]
        ids = [
            vocab["<bos>"],
            *(vocab[f"t{t}"] for t in segment),
            vocab[SEPARATOR],
            *(vocab[f"t{t}"] for t in segment[: self.copy_len]),
        ]
        corrupted = list(ids)
        corrupted[1 + self.copy_len] = vocab[f"t{unused}"]
        # every copied token after the first is predictable too
        start = self.seq_len + 2
        supervised = {start + i - 1: vocab[f"t{segment[i]}"] for i in range(1, self.copy_len)}
        return ids, vocab[f"t{answer}"], vocab[f"t{unused}"], corrupted, supervised

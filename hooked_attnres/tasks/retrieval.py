"""Key-value recall: the seed paper's synthetic retrieval probe.

Prompt (``n_pairs=3``, ``n_distractors=1``, ``n_queries=1``)::

    <bos> k7 v2 k0 v9 x3 k4 v5 ? k0        -> answer v9, contrast v2 or v5

A context of key-value pairs (keys and values distinct within a prompt), filler words
``x*`` between pairs, then ``?`` and a query key; the answer is that key's value, which
appears nowhere else in the prompt. The corrupted prompt queries another key of the
same context, so its answer is the contrast value.

With ``n_queries > 1`` the final query is preceded by answered ones
(``... ? k4 v5 ? k0``), which are supervised during training (more signal per prompt);
they never use the final query's key or the contrast's key, so neither answer leaks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hooked_attnres._validation import require_integer
from hooked_attnres.tasks.base import Task

QUERY_MARKER = "?"


@dataclass(frozen=True)
class KeyValueRetrieval(Task):
    """Key-value recall prompts.

    Args:
        n_pairs: key-value pairs per prompt (>= 2: the contrast is another pair's value).
        n_keys: size of the key vocabulary ``k0 .. k{n_keys-1}`` (>= n_pairs).
        n_values: size of the value vocabulary ``v0 ..`` (>= n_pairs; values are distinct
            within a prompt, so the answer appears once).
        n_distractors: filler tokens placed at random between pairs.
        n_filler_words: size of the filler vocabulary ``x0 ..``.
        n_queries: queries per prompt; all but the last are answered in the prompt
            (``n_queries <= n_pairs - 1``).

    Every prompt has ``prompt_length = 2 * n_pairs + n_distractors + 3 * n_queries``
    tokens.
    """

    n_pairs: int = 4
    n_keys: int = 16
    n_values: int = 16
    n_distractors: int = 0
    n_filler_words: int = 8
    n_queries: int = 1
    name: str = "retrieval"

    def __post_init__(self) -> None:
        self._check_name()
        for field_name in (
            "n_pairs",
            "n_keys",
            "n_values",
            "n_distractors",
            "n_filler_words",
            "n_queries",
        ):
            value = require_integer(field_name, getattr(self, field_name), 0)
            object.__setattr__(self, field_name, value)  # a Python int (np.int64 given)
        self._check_size(
            self.n_keys + self.n_values + self.n_filler_words + 1,
            f"n_keys + n_values + n_filler_words + 1 ('?') = {self.n_keys} + "
            f"{self.n_values} + {self.n_filler_words} + 1",
        )
        if self.n_pairs < 2:
            raise ValueError(
                f"n_pairs={self.n_pairs}: retrieval needs at least 2 pairs (the contrast "
                "answer is the value of another pair in the prompt)"
            )
        if self.n_pairs > self.n_keys:
            raise ValueError(
                f"n_pairs={self.n_pairs} is more than n_keys={self.n_keys}: keys must be "
                "distinct within a prompt; raise n_keys or lower n_pairs"
            )
        if self.n_pairs > self.n_values:
            raise ValueError(
                f"n_pairs={self.n_pairs} is more than n_values={self.n_values}: values must be "
                "distinct within a prompt so the answer appears once; raise n_values"
            )
        if self.n_distractors > 0 and self.n_filler_words < 1:
            raise ValueError("n_distractors > 0 needs n_filler_words >= 1")
        if not 1 <= self.n_queries <= self.n_pairs - 1:
            raise ValueError(
                f"n_queries={self.n_queries} must be between 1 and n_pairs - 1 = "
                f"{self.n_pairs - 1} "
                "(answered queries avoid the final query's and the contrast's keys)"
            )

    def words(self) -> list[str]:
        return (
            [f"k{i}" for i in range(self.n_keys)]
            + [f"v{i}" for i in range(self.n_values)]
            + [f"x{i}" for i in range(self.n_filler_words)]
            + [QUERY_MARKER]
        )

    @property
    def prompt_length(self) -> int:
        return 2 * self.n_pairs + self.n_distractors + 3 * self.n_queries

    def _draw(self, rng: np.random.Generator, vocab: dict[str, int]):
        keys = rng.choice(self.n_keys, size=self.n_pairs, replace=False)
        values = rng.choice(self.n_values, size=self.n_pairs, replace=False)
        order = rng.permutation(self.n_pairs)
        query, other, answered = order[0], order[1], order[2 : self.n_queries + 1]
        gaps = np.bincount(
            rng.integers(0, self.n_pairs + 1, size=self.n_distractors), minlength=self.n_pairs + 1
        )
        fillers = iter(rng.integers(0, max(self.n_filler_words, 1), size=self.n_distractors))
        ids = [vocab["<bos>"]]
        for pair in range(self.n_pairs + 1):
            ids.extend(vocab[f"x{next(fillers)}"] for _ in range(gaps[pair]))
            if pair < self.n_pairs:
                ids.extend((vocab[f"k{keys[pair]}"], vocab[f"v{values[pair]}"]))
        supervised = {}
        for pair in answered:
            ids.extend((vocab[QUERY_MARKER], vocab[f"k{keys[pair]}"]))
            supervised[len(ids) - 1] = vocab[f"v{values[pair]}"]
            ids.append(vocab[f"v{values[pair]}"])
        ids.append(vocab[QUERY_MARKER])
        clean = [*ids, vocab[f"k{keys[query]}"]]
        corrupted = [*ids, vocab[f"k{keys[other]}"]]
        return clean, vocab[f"v{values[query]}"], vocab[f"v{values[other]}"], corrupted, supervised

    def _questions(
        self, ids: list[int], supervised: dict[int, int], vocab: dict[str, int]
    ) -> list[list[int]]:
        """The context without its filler words followed by ``? key``, for the final query
        and each answered one. An answered query ``? k v`` therefore never trains on a
        held-out (context, key), whether the held-out prompt has more queries or one
        (`train`'s ``eval_tasks``), and neither does a prompt whose fillers (which do not
        decide the answer) are other words or sit elsewhere. Without fillers (every study
        task) the final question is the prompt itself."""
        fillers = {vocab[f"x{i}"] for i in range(self.n_filler_words)}
        context = [i for i in ids[: 1 + 2 * self.n_pairs + self.n_distractors] if i not in fillers]
        # ``supervised`` maps each answered query's key position to its value
        return [context + ids[-2:]] + [context + ids[p - 1 : p + 1] for p in sorted(supervised)]

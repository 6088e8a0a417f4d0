"""What every probe task produces (`TaskBatch`) and how prompts are drawn (`Task`).

A task draws prompts from a seeded generator: ``task.sample(n, seed, split)`` returns the
same prompts for the same arguments on every machine (NumPy's PCG64). The ``train`` and
``test`` splits are disjoint by construction, down to what decides an answer: every
*question* (the prompt that asks for one answer, `Task._questions`) is assigned to one
split by a hash of its tokens; a test prompt's scored question is a test question, and a
train prompt supervises train questions only. For one-question prompts without filler
words (every study task) the question is the prompt itself.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Optional

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from hooked_attnres._precision import widened
from hooked_attnres._study_limits import (
    MAX_PROMPT_LENGTH,
    MAX_TASK_WORDS,
    WHY_MAX_PROMPT_LENGTH,
    WHY_MAX_TASK_WORDS,
)
from hooked_attnres._validation import (
    is_integer,
    refuse_uint8_index,
    require_choice,
    require_integer,
    require_text,
    unsigned_as_int64,
)

SPLITS = {"train": 0, "test": 1}
TEST_FRACTION_BUCKETS = 10  # one bucket in ten of all prompts is reserved for "test"


@dataclass
class TaskBatch:
    """A batch of probe prompts with everything a metric or a patching run needs.

    Attributes:
        tokens: ``[batch, pos]`` prompt ids.
        answer_pos: ``[batch]`` position whose logits predict the answer (the last one).
        answer: ``[batch]`` the correct next token.
        contrast: ``[batch]`` a wrong answer for logit differences: the answer of the
            corrupted prompt.
        corrupted_tokens: ``[batch, pos]`` the same prompts with one token changed so that
            the correct answer becomes ``contrast`` (clean / corrupted pairs for patching).
        targets: ``[batch, pos]`` next-token targets of every supervised position (the
            answer, and any earlier in-prompt answers a task defines), ``-100`` elsewhere;
            the training loss averages over them.
        task: the name of the task that drew the batch.

    A `TaskBatch` has no attention mask: every position is a real token to the analyses
    that take one. Prompts of different lengths must be right-padded (causal attention
    keeps positions after ``answer_pos`` from reaching the metric); left padding would
    be attended to. The built-in tasks draw prompts of one length.
    """

    tokens: Int[Tensor, "batch pos"]
    answer_pos: Int[Tensor, " batch"]
    answer: Int[Tensor, " batch"]
    contrast: Int[Tensor, " batch"]
    corrupted_tokens: Int[Tensor, "batch pos"]
    targets: Int[Tensor, "batch pos"]
    task: str = ""

    def __post_init__(self) -> None:
        # a negative answer_pos would read a position counted from the end wherever the
        # logits are indexed with it, and leave no real position in a right-padded prompt
        if isinstance(self.answer_pos, Tensor) and self.answer_pos.numel():
            lowest = int(self.answer_pos.min())
            if lowest < 0:
                raise ValueError(
                    f"answer_pos must be each prompt's last real position, counted from 0 "
                    f"(prompts are right-padded), got {lowest}; for a prompt of n tokens "
                    "pass n - 1"
                )
        # a negative token id would index the vocabulary from its end: logit_diff and
        # answer_logprob read another token's logit, and correct() is silently 0
        for name in ("answer", "contrast"):
            ids = getattr(self, name)
            if isinstance(ids, Tensor) and ids.numel() and int(ids.min()) < 0:
                raise ValueError(
                    f"{name} must hold token ids >= 0, got {int(ids.min())} (a negative id "
                    "would read another token's logit, counted from the end of the vocabulary)"
                )

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index) -> TaskBatch:
        """A sub-batch (``index`` is an int, a slice, or a list / range / 1-d tensor / 1-d
        array of row numbers or of one bool per row; a list is read as NumPy reads it; a
        NumPy array of any integer dtype, ``uint8`` included, is row numbers, as in NumPy,
        and so is a tensor of any integer type but ``uint8`` (a row number past int64 is
        refused); an array of another dtype, float or str, is refused as in NumPy).
        Anything else (a 0-d tensor, ``None``, ``True``, a tuple) raises `IndexError`: it
        would drop or add an axis, leaving ``tokens`` and ``answer_pos`` / ``answer`` /
        ``contrast`` misaligned; a ``torch.uint8`` tensor (a mask to torch, rows to NumPy)
        is refused too (`refuse_uint8_index`, the package's one rule for index tensors)."""
        given = index  # named in a refusal (a list is read as an array below)
        if is_integer(index):  # a NumPy integer too: one row, never a dropped batch axis
            index, n = int(index), len(self)
            if not -n <= index < n:
                raise IndexError(f"row {index} is out of range for a batch of {n} prompts")
            index = slice(index % n, index % n + 1)
        elif isinstance(index, (list, range)):  # as NumPy reads it (a list of lists is 2-d)
            index = _list_rows(list(index))
        if not isinstance(index, (slice, Tensor, np.ndarray)) or (
            not isinstance(index, slice) and index.ndim != 1
        ):
            raise IndexError(_not_rows(given))
        refuse_uint8_index("index", index)  # AmbiguousIndexError, an IndexError
        if isinstance(index, Tensor) and index.dtype != torch.bool:
            # row numbers of any integer type (torch indexes with int32 / int64 only)
            if index.is_floating_point() or index.is_complex():
                index = index.detach().cpu().numpy()  # refused below, as NumPy refuses it
            else:
                index = torch.as_tensor(_signed_rows(index)).long()
        if isinstance(index, np.ndarray) and index.dtype.kind not in "iub":
            # torch truncates a float array to row numbers; NumPy refuses it
            raise IndexError(
                f"a TaskBatch index array must be of an integer or bool dtype, got dtype "
                f"{index.dtype}; pass index.astype(bool) for one bool per row or "
                "index.astype(int) for row numbers"
            )
        if isinstance(index, np.ndarray) and index.dtype.kind in "iu":
            # row numbers, as in NumPy: torch would read a uint8 array as a mask
            index = torch.as_tensor(_signed_rows(index).astype(np.int64))
        return self._map(lambda tensor: tensor[index])

    def to(self, device) -> TaskBatch:
        return self._map(lambda tensor: tensor.to(device))

    def _map(self, fn) -> TaskBatch:
        """A batch with ``fn`` applied to every tensor field (``task`` is kept)."""
        values: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        return TaskBatch(**{name: v if name == "task" else fn(v) for name, v in values.items()})

    def require_logits(self, logits: Any, what: str = "TaskBatch.require_logits") -> None:
        """Refuse a batch of no prompts (`require_prompts`, naming ``what``, the metric
        asked for: its value is undefined; audit 184: torch failed with "max(): Expected
        reduction dim to be specified" and `loss` was NaN), and ``logits`` that are not a
        ``[batch, pos, d_vocab]`` tensor of this batch's
        ``batch``, or whose ``d_vocab`` does not cover every token id of the batch
        (``tokens``, ``corrupted_tokens``, ``answer``, ``contrast``, ``targets``):
        ``ValueError`` naming the shapes. Such logits are of no model that read these
        prompts: an answer id past ``d_vocab`` failed in torch with a bare index error, and
        one below it but under a prompt token's id gave a silently wrong `accuracy` and
        `answer_logprob` (the argmax and softmax over a cut vocabulary: 0.457 for 0.426 of
        256 retrieval prompts with their 44-token vocabulary cut to 36 columns)."""
        require_prompts(len(self), what)
        if not isinstance(logits, Tensor) or logits.ndim != 3 or logits.shape[0] != len(self):
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(
                f"logits must be [batch={len(self)}, pos, d_vocab] for this batch, got {shape}"
            )
        highest = {
            name: int(ids.max())
            for name in ("tokens", "corrupted_tokens", "answer", "contrast", "targets")
            if (ids := getattr(self, name)).numel()
        }
        if highest and max(highest.values()) >= logits.shape[-1]:
            name = max(highest, key=highest.__getitem__)
            raise ValueError(
                f"logits have d_vocab={logits.shape[-1]} (shape {tuple(logits.shape)}), but "
                f"this batch's token ids reach {highest[name]} (in its {name}, shape "
                f"{tuple(getattr(self, name).shape)}): they are no logits over the task's "
                f"vocabulary; pass the logits of a model whose d_vocab is at least "
                f"{highest[name] + 1} (one logit per token id of the task's tokenizer)"
            )

    def answer_logits(
        self, logits: Float[Tensor, "batch pos d_vocab"], what: str = "TaskBatch.answer_logits"
    ) -> Float[Tensor, "batch d_vocab"]:
        """The logits at each prompt's answer position (``logits`` checked by
        `require_logits`; ``what``: the metric named in a refusal)."""
        self.require_logits(logits, what)
        if int(self.answer_pos.max()) >= logits.shape[1]:
            raise ValueError(
                f"logits have {logits.shape[1]} positions but an answer sits at position "
                f"{int(self.answer_pos.max())}; pass the logits of the whole prompts"
            )
        return logits[
            torch.arange(len(self), device=logits.device), self.answer_pos.to(logits.device)
        ]

    def logit_diff(self, logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, " batch"]:
        """``logit[answer] - logit[contrast]`` at the answer position, in float32 for
        bfloat16 / float16 logits (float64 for float64 ones): the two logits are widened
        (exactly) before the subtraction, which in the logits' dtype would round the
        difference to 8 (11) bits, an error of the size of the model's own rounding (up
        to 4e-3 on a logit difference of 1.5 in a tiny bfloat16 model). A prompt whose
        ``contrast`` is its ``answer`` is refused (``ValueError`` naming the prompts): its
        difference is 0 whatever the model (audit 184: a hand-made batch averaged such
        zeros into the others silently; every task's contrast is another token)."""
        at = self.answer_logits(logits, "TaskBatch.logit_diff")
        same = (self.answer == self.contrast).nonzero().flatten()
        if len(same):
            listed = same.tolist()
            raise ValueError(
                f"logit_diff: prompt(s) {listed[:8]}{' ...' if len(listed) > 8 else ''} have their "
                f"answer as contrast (token ids {self.answer[same[:8]].tolist()}): their logit "
                "difference is 0 whatever the model; give each prompt a contrast other than "
                "its answer (a task's contrast is the answer of its corrupted prompt)"
            )
        rows = torch.arange(len(self), device=at.device)
        answer = widened(at[rows, self.answer.to(at.device)])
        return answer - widened(at[rows, self.contrast.to(at.device)])

    def answer_logprob(self, logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, " batch"]:
        """Log-probability of the correct answer."""
        at = self.answer_logits(logits, "TaskBatch.answer_logprob")
        logprobs = widened(at).log_softmax(-1)
        return logprobs[
            torch.arange(len(self), device=logprobs.device), self.answer.to(logprobs.device)
        ]

    def correct(self, logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, " batch"]:
        """1.0 where the answer's logit at the answer position is the largest, alone; ``1 /
        k`` where it ties ``k - 1`` other tokens' for the largest, finite (the chance that
        a uniformly random tie-break picks the answer); 0.0 where another token's logit is
        larger; NaN where whether it is the answer is undefined: the logits there hold a
        NaN, or the answer's logit is the largest, infinite, and another token's equals it
        (an overflow tie of +inf, e.g. of a float16 pass, or a row of -inf). torch's
        argmax picks the first NaN (or the first of tied values), so a pass that
        overflowed scored 1 where the answer was that token and 0 elsewhere, a number for
        a run that computed nothing (audit 81), and a finite tie scored 1 where the
        answer's id was the lower one, 0 where it was the higher (audit 184: 3 to 5 of 512
        probe prompts of shipped models in bfloat16, none in float32); a single +inf is
        the largest, as it exceeds every finite logit, and an answer below two +inf is not
        (0.0). ``[batch]`` float32: a share ``1 / k`` is the float32 of it, exact for ``k`` a
        power of 2, 1.0e-8 above 1/3 for ``k = 3`` (docs/study.md, threshold reading)."""
        at = self.answer_logits(logits, "TaskBatch.correct")
        answer = self.answer.to(logits.device)
        own, top = at.gather(-1, answer[:, None])[:, 0], at.amax(-1)
        n_top = (at == top[:, None]).sum(-1)
        scores = torch.where(own == top, 1 / n_top.float(), 0.0)
        tied = (own == top) & top.isinf() & (n_top > 1)
        undefined = at.isnan().any(-1) | tied
        return scores.masked_fill(undefined, float("nan"))

    def accuracy(self, logits: Float[Tensor, "batch pos d_vocab"]) -> float:
        """The mean of `correct` over the prompts (a batch of none is refused), taken in
        float64: k of n prompts is ``k / n`` correctly rounded, as `evaluate` gives it
        (review 185: the float32 mean read 3 of 10 as 0.30000001192092896)."""
        require_prompts(len(self), "TaskBatch.accuracy")
        return self.correct(logits).double().mean().item()

    def loss(self, logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, ""]:
        """Mean cross-entropy over the supervised positions (the training objective);
        ``logits`` of the whole prompts (``[batch, pos, d_vocab]``, `require_logits`)."""
        self.require_logits(logits, "TaskBatch.loss")
        if logits.shape[1] != self.targets.shape[1]:
            raise ValueError(
                f"logits have {logits.shape[1]} positions (shape {tuple(logits.shape)}) but the "
                f"targets {self.targets.shape[1]} (shape {tuple(self.targets.shape)}); pass the "
                "logits of the whole prompts"
            )
        return torch.nn.functional.cross_entropy(
            widened(logits.flatten(0, 1)),
            self.targets.to(logits.device).flatten(),
            ignore_index=-100,
        )


def _not_rows(index) -> str:
    shape = f" of shape {tuple(index.shape)}" if hasattr(index, "shape") else ""
    return (
        "a TaskBatch index must select rows: an int, a slice, or a list / range / 1-d "
        f"tensor / 1-d array of rows or of one bool per row; got {type(index).__name__}"
        f"{shape} (which would drop or add the batch axis); for a 0-d tensor t pass int(t)"
    )


def prompt_bucket(ids: Sequence[int]) -> int:
    """Deterministic split bucket of a prompt (CRC32 of its ids, not Python's salted hash)."""
    return zlib.crc32(np.asarray(ids, dtype=np.int64).tobytes()) % TEST_FRACTION_BUCKETS


def in_split(ids: Sequence[int], split: str) -> bool:
    """Whether the question ``ids`` belongs to ``split`` (``"train"`` or ``"test"``; any
    other value raises ``ValueError``: it was read as ``"train"``)."""
    split = require_choice("split", split, tuple(SPLITS))
    is_test = prompt_bucket(ids) == 0
    return is_test if split == "test" else not is_test


def rng_for(seed: int, split: str, stream: int = 0) -> np.random.Generator:
    """The generator of one (seed, split, stream); streams give independent batches."""
    split = require_choice("split", split, tuple(SPLITS))
    seed = require_integer("seed", seed, 0)
    return np.random.default_rng([seed, SPLITS[split], int(stream)])


class Task:
    """Base class of probe tasks. Subclasses define `words` and `_draw` (and may define
    `prompt_length`, by default the length of a drawn prompt).

    ``_draw(rng, vocab)`` returns one prompt as ``(ids, answer, contrast, corrupted_ids,
    supervised)`` with ``answer_pos = len(ids) - 1``; ``supervised`` maps earlier
    positions to their target ids (the answer position is always supervised). Every prompt
    of a task has the same length.
    """

    name = "task"

    def _check_name(self) -> None:
        """Refuse a ``name`` that is no text (subclasses' ``__post_init__`` call it): the
        batches' ``task``, the trainer's evaluation metrics and ``metrics.json`` are keyed
        by it (``name=5`` drew batches of task 5, ``name=["a"]`` failed in the trainer
        after the run began); a NumPy string is kept as the Python ``str`` it holds."""
        name = require_text(
            "name", self.name, "the task's name, which its batches and metrics carry"
        )
        object.__setattr__(self, "name", name)  # a frozen dataclass

    def _check_size(self, n_words: int, fields: str) -> None:
        """Refuse a task whose prompts use more than `MAX_TASK_WORDS` words (``n_words``,
        counted from the fields: `words` would make the list) or that draws prompts
        longer than `MAX_PROMPT_LENGTH` (`prompt_length`): ``ValueError`` naming the
        ``fields`` that size it and the limit. Subclasses' ``__post_init__`` call it once
        their fields are integers, before anything is built."""
        if n_words > MAX_TASK_WORDS:
            raise ValueError(
                f"{fields} = {n_words} words must be <= {MAX_TASK_WORDS} ({WHY_MAX_TASK_WORDS})"
            )
        if self.prompt_length > MAX_PROMPT_LENGTH:
            raise ValueError(
                f"prompt_length = {self.prompt_length} tokens must be <= {MAX_PROMPT_LENGTH} "
                f"({WHY_MAX_PROMPT_LENGTH})"
            )

    def words(self) -> list[str]:
        """Every word the task's prompts use (for building a tokenizer)."""
        raise NotImplementedError

    @property
    def prompt_length(self) -> int:
        """The number of tokens of every prompt (``pos`` of `sample`'s ``[batch, pos]``
        tokens). By default the length of one drawn prompt, as every prompt of a task has
        one length, so a subclass that defines only `words` and `_draw` has it:
        `hooked_attnres.study.train_condition` sizes the model's context by it (review
        135: it raised a bare ``NotImplementedError`` for such a task)."""
        rng = rng_for(0, "train")
        return len(self._draw(rng, self._resolve_vocab(None))[0])

    def _draw(self, rng: np.random.Generator, vocab: dict[str, int]):
        raise NotImplementedError

    def leaks_into(self, trained: Task) -> Optional[str]:
        """Why this task's ``"test"`` split is not held out from ``trained``'s ``"train"``
        split (some held-out answer is trained on), or ``None`` when it is. `train` refuses
        an ``eval_tasks`` entry for which this is not ``None``. Default: ``None`` (the
        splits hash every question a prompt supervises, `_questions`)."""
        return None

    def _questions(
        self, ids: list[int], supervised: dict[int, int], vocab: dict[str, int]
    ) -> list[list[int]]:
        """The questions a drawn prompt asks, the scored one (its final answer) first: for
        each supervised answer, the shortest prompt of this task that asks for it. A
        prompt's split is decided by these, so that no test answer is ever trained on, not
        even inside a longer training prompt. Default: the prompt is one question."""
        return [ids]

    def _in_split(
        self, ids: list[int], supervised: dict[int, int], split: str, vocab: dict[str, int]
    ) -> bool:
        """Whether a drawn prompt belongs to ``split``: a test prompt's scored question is
        a test question; every question a train prompt supervises is a train question."""
        questions = self._questions(ids, supervised, vocab)
        if split == "test":
            return in_split(questions[0], "test")
        return all(in_split(question, "train") for question in questions)

    def sample(
        self,
        n: int,
        seed: int = 0,
        split: str = "train",
        vocab=None,
        stream: int = 0,
        max_tries_per_prompt: int = 1000,
    ) -> TaskBatch:
        """``n`` prompts of ``split``, a pure function of ``(seed, split, stream)``.

        Args:
            n: number of prompts.
            seed: the data seed.
            split: ``"train"`` or ``"test"`` (disjoint sets of prompts).
            vocab: word -> id (a tokenizer's ``get_vocab()``, or a tokenizer); default:
                `hooked_attnres.tasks.build_tokenizer` of this task's words.
            stream: independent batches of the same seed and split (e.g. the training step).
        """
        n = require_integer("n", n, 1)
        vocab = self._resolve_vocab(vocab)
        rng = rng_for(seed, split, stream)
        rows: list[tuple] = []
        tries = 0
        while len(rows) < n:
            ids, answer, contrast, corrupted, supervised = self._draw(rng, vocab)
            tries += 1
            if self._in_split(ids, supervised, split, vocab):
                rows.append((ids, answer, contrast, corrupted, supervised))
            elif tries > max_tries_per_prompt * n:
                raise RuntimeError(
                    f"could not draw {n} {split} prompts for {self!r}; the task has too few "
                    "distinct prompts for a held-out split"
                )
        tokens = torch.tensor([r[0] for r in rows], dtype=torch.long)
        targets = torch.full_like(tokens, -100)
        for row, (_, answer, _, _, supervised) in enumerate(rows):
            for position, target in supervised.items():
                targets[row, position] = target
            targets[row, -1] = answer
        return TaskBatch(
            tokens=tokens,
            answer_pos=torch.full((n,), tokens.shape[1] - 1, dtype=torch.long),
            answer=torch.tensor([r[1] for r in rows], dtype=torch.long),
            contrast=torch.tensor([r[2] for r in rows], dtype=torch.long),
            corrupted_tokens=torch.tensor([r[3] for r in rows], dtype=torch.long),
            targets=targets,
            task=self.name,
        )

    def _resolve_vocab(self, vocab) -> dict[str, int]:
        if vocab is None:
            from hooked_attnres.tasks.vocabulary import build_tokenizer

            vocab = build_tokenizer(self.words())
        if hasattr(vocab, "get_vocab"):
            vocab = vocab.get_vocab()
        missing = [w for w in ("<bos>", *self.words()) if w not in vocab]
        if missing:
            raise ValueError(
                f"the vocabulary lacks {len(missing)} word(s) this task uses, e.g. {missing[:5]}; "
                "build the tokenizer from task.words()"
            )
        return vocab


def _list_rows(rows: list) -> np.ndarray:
    """A list of row numbers or bools as NumPy reads it (an array, checked as one by
    `TaskBatch.__getitem__`; an empty list is no rows); ``IndexError`` for one NumPy
    cannot read (ragged, of tensors of several elements). Read by torch, a list of NumPy
    int8 scalars was an int8 tensor, which torch cannot index with, and one NumPy reads as
    floats crashed in torch."""
    if not rows:
        return np.zeros(0, dtype=np.int64)
    try:
        return np.asarray(rows)
    except (ValueError, TypeError, RuntimeError):
        raise IndexError(_not_rows(rows)) from None


def _signed_rows(rows: Any) -> Any:
    """``rows`` (a NumPy array or a tensor of row numbers) with unsigned integers as int64
    (`unsigned_as_int64`: a list of NumPy uint8 scalars was a uint8 tensor, refused as an
    "ambiguous torch.uint8" index; a uint64 array's ``2**64 - 1`` was cast to -1, the last
    row); ``IndexError`` for a row number past int64."""
    try:
        signed = unsigned_as_int64(rows)
    except ValueError:
        raise IndexError(
            f"TaskBatch rows must be row numbers of the batch, got {rows!r} (past int64)"
        ) from None
    return rows if signed is None else signed


def require_prompts(n_prompts: int, what: str) -> None:
    """Refuse a batch of no prompts (``batch[:0]``, ``tokens[:0]``) that ``what`` (the
    analysis) would measure: ``ValueError`` saying so. An analysis of none ran no pass and
    failed deep inside (``routing_mass``: torch's "torch.cat(): expected a non-empty list
    of Tensors"; ``ablation_effects`` and ``attribute_routing``: the bootstrap's "values
    must be [rows, n] with n >= 1")."""
    if n_prompts == 0:
        raise ValueError(
            f"the batch holds no prompts (0 rows, e.g. batch[:0]): {what} has nothing to "
            "measure; pass at least one prompt"
        )


def require_task_batch(batch: Any, what: str, example: str = "task.sample(...)") -> TaskBatch:
    """``batch`` if it is a `TaskBatch` of at least one prompt (`require_prompts`);
    otherwise ``TypeError("batch must be a TaskBatch ({example}), got ...")``: ``what``
    (the analysis) reads its metrics at the batch's answer positions, which tokens alone
    do not give. Returns the batch."""
    if not isinstance(batch, TaskBatch):
        raise TypeError(
            f"batch must be a TaskBatch ({example}), got {type(batch).__name__}; {what} "
            "reads its metrics at the batch's answer positions"
        )
    require_prompts(len(batch), what)
    return batch

"""Text generation (`GenerationMixin.generate`, TransformerLens signature) and sampling.

Incremental decoding: only attention looks across positions (routers, norms and the MLP
act on each position alone), so after the prompt every step runs the model on the new
token only, reading the earlier positions' keys and values from a `KeyValueCache`; the
new token's own depth sources are computed as it runs through the layers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from hooked_attnres._validation import is_integer, require_integer
from hooked_attnres.model.attention import KeyValueCache
from hooked_attnres.model.passes import padding_of

if TYPE_CHECKING:
    from hooked_attnres.config import HookedAttnResConfig

RETURN_TYPES = ("input", "str", "tokens")


def sample_logits(
    final_logits: Float[Tensor, "batch d_vocab"],
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    temperature: float = 1.0,
    freq_penalty: float = 0.0,
    repetition_penalty: float = 1.0,
    tokens: Optional[Int[Tensor, "batch pos"]] = None,
    token_mask: Optional[Bool[Tensor, "batch pos"]] = None,
    generator: Optional[torch.Generator] = None,
) -> Int[Tensor, " batch"]:
    """The next token of every prompt, with TransformerLens's ``sample_logits`` semantics.

    In order: the repetition penalty (a logit of a token seen in ``tokens`` is divided by
    ``repetition_penalty`` if positive, multiplied if negative); ``temperature == 0``
    returns the argmax; otherwise the logits are divided by ``temperature``, the frequency
    penalty subtracts ``freq_penalty`` times each token's count in ``tokens``, ``top_k``
    keeps the ``k`` largest logits (ties kept; ``k`` is clamped to the vocabulary) or else
    ``top_p`` keeps the smallest set of most likely tokens whose probability reaches
    ``top_p``, and a token is drawn from the softmax (float32).

    Args:
        final_logits: the logits of the last position ``[batch, d_vocab]``.
        tokens: the sequences so far ``[batch, pos]`` (for the penalties).
        token_mask: ``[batch, pos]``, real tokens of ``tokens`` (padding is not counted by
            the penalties); ``None`` counts every token.
        generator: a seeded ``torch.Generator`` for reproducible draws; ``None`` uses the
            global RNG (then the draws equal TransformerLens's under the same
            ``torch.manual_seed``).

    Returns:
        ``[batch]`` token ids.
    """
    if freq_penalty < 0:
        raise ValueError(f"freq_penalty must be >= 0, got {freq_penalty}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    top_k = require_integer("top_k", top_k, 1, optional=True)
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    if (freq_penalty > 0 or repetition_penalty != 1.0) and tokens is None:
        raise ValueError("freq_penalty and repetition_penalty need the tokens so far")
    logits = final_logits.float()
    counts = None
    if tokens is not None and (freq_penalty > 0 or repetition_penalty != 1.0):
        weights = None if token_mask is None else token_mask.to(logits.dtype)
        counts = torch.zeros_like(logits).scatter_add_(
            -1, tokens, torch.ones_like(tokens, dtype=logits.dtype) if weights is None else weights
        )
    if counts is not None and repetition_penalty != 1.0:
        seen = counts > 0
        penalised = torch.where(
            logits > 0, logits / repetition_penalty, logits * repetition_penalty
        )
        logits = torch.where(seen, penalised, logits)
    if temperature == 0.0:
        return final_logits.argmax(dim=-1) if counts is None else logits.argmax(dim=-1)
    logits = logits / temperature
    if counts is not None and freq_penalty > 0:
        logits = logits - freq_penalty * counts
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    elif top_p is not None:
        ordered, order = logits.sort(dim=-1, descending=True)
        before = ordered.softmax(dim=-1).cumsum(dim=-1)
        # drop a token once the tokens before it already reach top_p (the first is kept)
        drop = torch.zeros_like(before, dtype=torch.bool)
        drop[..., 1:] = before[..., :-1] > top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = (logits - logits.logsumexp(dim=-1, keepdim=True)).softmax(dim=-1)
    return torch.multinomial(probs, 1, replacement=True, generator=generator)[:, 0]


class GenerationMixin:
    """``generate`` for `HookedAttnRes` (needs ``forward`` with ``past_kv_cache``)."""

    if TYPE_CHECKING:  # provided by HookedAttnRes
        tokenizer: Any

        @property
        def cfg(self) -> HookedAttnResConfig: ...

        def __call__(self, *args, **kwargs) -> Any: ...

        def to_tokens_and_mask(self, *args, **kwargs) -> Any: ...

        def _validate_tokens(self, tokens, n_past: int = 0) -> Tensor: ...

        def _validate_attention_mask(self, mask, shape, device) -> Optional[Tensor]: ...

        def _pad_token_id(self) -> Optional[int]: ...

    @torch.no_grad()
    def generate(
        self,
        input: Union[str, list[str], Int[Tensor, "batch pos"], Int[Tensor, " pos"]] = "",
        max_new_tokens: int = 10,
        stop_at_eos: bool = True,
        eos_token_id: Optional[Union[int, list[int]]] = None,
        do_sample: bool = True,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        temperature: float = 1.0,
        freq_penalty: float = 0.0,
        repetition_penalty: float = 1.0,
        use_past_kv_cache: bool = True,
        prepend_bos: Optional[bool] = None,
        padding_side: Optional[str] = None,
        return_type: Optional[str] = "input",
        verbose: bool = True,
        attention_mask: Optional[Int[Tensor, "batch pos"]] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Union[str, list[str], Int[Tensor, "batch new_pos"]]:
        """Sample up to ``max_new_tokens`` tokens after the prompt(s) (TransformerLens's
        ``generate``; sampling semantics in `sample_logits`).

        Args:
            input: a string, a list of strings (padded on the left, so that every prompt
                ends in the last column), or token ids ``[batch, pos]`` / ``[pos]``.
            max_new_tokens: number of tokens to generate (at least 1).
            stop_at_eos: stop a prompt once it produced an end-of-sequence token; later
                positions of a finished prompt are filled with the end token (as in
                TransformerLens: ``eos_token_id`` if one id; for a list, the tokenizer's
                ``eos_token_id`` if it has one, else the list's first), and the loop ends
                when every prompt has finished.
            eos_token_id: the end token(s); default the tokenizer's ``eos_token_id``.
            do_sample: sample (``True``, TransformerLens's default) or take the argmax.
            top_k, top_p, temperature, freq_penalty, repetition_penalty: see
                `sample_logits` (``temperature=0`` is greedy too).
            use_past_kv_cache: decode incrementally with a `KeyValueCache` (the same tokens
                and logits to float rounding as re-running the whole sequence every step,
                and much faster).
            prepend_bos, padding_side: for string inputs, as in ``to_tokens``; batched
                prompts are always padded on the left (``padding_side="right"`` is refused).
                For a token input without ``attention_mask``, ``padding_side="left"`` reads
                the mask off the tokens (as TransformerLens 4.x does): each row's leading pad
                tokens are padding (a BOS equal to the pad token, with ``prepend_bos``, is
                kept).
            return_type: ``"input"`` (strings for string input, tokens for tokens),
                ``"str"`` or ``"tokens"`` (``[batch, pos + generated]``, the prompt
                included; special tokens such as padding are skipped in strings). With
                ``"str"``, token ids of one prompt (``[pos]`` or ``[1, pos]``) give one
                string, as in TransformerLens 4.3.
            verbose: show a progress bar.
            attention_mask: ``[batch, pos]`` for a left-padded token input (1 = real token).
            generator: a seeded ``torch.Generator`` for reproducible sampling; ``None`` uses
                the global RNG (``torch.manual_seed``, as TransformerLens does).

        Returns:
            A string (a string prompt, or token ids of one prompt), a list of strings (one
            per prompt of a list, also of a list of one, and of ``[batch > 1, pos]`` token
            ids), or ``[batch, pos + n_generated]`` token ids, per ``return_type``.
        """
        self._check_generate_args(
            max_new_tokens, return_type, do_sample, padding_side, use_past_kv_cache, generator
        )
        tokens, mask, input_type = self._generation_prompt(
            input, prepend_bos, padding_side, attention_mask
        )
        stop_tokens = self._stop_tokens(stop_at_eos, eos_token_id)
        fill = self._finished_fill(stop_tokens, eos_token_id)
        n_prompt = tokens.shape[1]
        if n_prompt + max_new_tokens - 1 > self.cfg.n_ctx:
            raise ValueError(
                f"a prompt of {n_prompt} tokens plus max_new_tokens={max_new_tokens} needs "
                f"{n_prompt + max_new_tokens - 1} positions, more than n_ctx={self.cfg.n_ctx}"
            )
        batch = tokens.shape[0]
        cache = KeyValueCache.init_cache(self.cfg) if use_past_kv_cache else None
        finished = torch.zeros(batch, dtype=torch.bool, device=tokens.device)
        step_input, step_mask = tokens, mask
        for _ in tqdm(range(max_new_tokens), disable=not verbose, desc="generate"):
            if cache is None:
                logits = self(tokens, attention_mask=mask)
            else:
                logits = self(step_input, attention_mask=step_mask, past_kv_cache=cache)
            token_mask = None if mask is None else mask.bool()
            if do_sample:
                sampled = sample_logits(
                    logits[:, -1],
                    top_k,
                    top_p,
                    temperature,
                    freq_penalty,
                    repetition_penalty,
                    tokens,
                    token_mask,
                    generator,
                )
            else:
                sampled = sample_logits(  # freq_penalty: no effect on the argmax, but checked
                    logits[:, -1],
                    temperature=0.0,
                    freq_penalty=freq_penalty,
                    repetition_penalty=repetition_penalty,
                    tokens=tokens,
                    token_mask=token_mask,
                )
            if stop_tokens:
                sampled = sampled.masked_fill(finished, fill)
                finished |= torch.isin(sampled, torch.tensor(stop_tokens, device=sampled.device))
            tokens = torch.cat((tokens, sampled[:, None]), dim=1)
            if mask is not None:
                mask = torch.cat((mask, mask.new_ones(batch, 1)), dim=1)
            step_input, step_mask = sampled[:, None], None
            if stop_tokens and bool(finished.all()):
                break
        return self._generation_output(tokens, input_type, return_type)

    def _check_generate_args(
        self, max_new_tokens, return_type, do_sample, padding_side, use_past_kv_cache, generator
    ) -> None:
        if not is_integer(max_new_tokens):
            raise TypeError(f"max_new_tokens must be an integer, got {max_new_tokens!r}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if return_type not in RETURN_TYPES:
            raise ValueError(f"return_type must be one of {RETURN_TYPES}, got {return_type!r}")
        if padding_side not in (None, "left", "right"):
            raise ValueError(f"padding_side must be 'left', 'right' or None, got {padding_side!r}")
        if padding_side == "right":
            raise ValueError(
                "generate pads batched prompts on the left, so that every prompt ends in the "
                "last column; padding_side='right' is not supported here"
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator is not None and not do_sample:
            raise ValueError("a generator seeds sampling; it has no effect with do_sample=False")
        if not isinstance(use_past_kv_cache, bool):
            raise TypeError(f"use_past_kv_cache must be a bool, got {use_past_kv_cache!r}")

    def _generation_prompt(
        self, input, prepend_bos, padding_side, attention_mask
    ) -> tuple[Int[Tensor, "batch pos"], Optional[Bool[Tensor, "batch pos"]], str]:
        """``(tokens, mask or None, input type)`` of the prompt, left-padded."""
        is_text = isinstance(input, str) or (
            isinstance(input, list) and input and all(isinstance(t, str) for t in input)
        )
        if not is_text and not isinstance(input, Tensor):
            raise TypeError(
                "generate continues a prompt: input must be a string, a non-empty list of "
                f"strings, or [batch, pos] / [pos] integer token ids, got {type(input).__name__}"
                " (a DepthState has no tokens to continue: model(state, start_at_layer=...) "
                "gives its logits; a list of token ids: torch.tensor(ids))"
            )
        if isinstance(input, str) or (isinstance(input, list) and input):
            if attention_mask is not None:
                raise ValueError(
                    "attention_mask is for token inputs; string prompts get theirs from the "
                    "tokenizer"
                )
            # not truncated (as in TransformerLens 4.x): a prompt cut to n_ctx would be
            # continued from its n_ctx-th token, not from its end
            tokens, mask = self.to_tokens_and_mask(input, prepend_bos, "left", truncate=False)
            input_type = "str" if isinstance(input, str) else "list"
        else:
            tokens = self._validate_tokens(input)
            mask = attention_mask
            if mask is None and padding_side is not None:  # "left": "right" was refused
                mask = self._mask_of_left_padding(tokens, prepend_bos)
            input_type = "tokens"
        tokens = self._validate_tokens(tokens)
        mask = self._validate_attention_mask(mask, tuple(tokens.shape), tokens.device)
        if mask is not None:
            right_padded = (~mask[:, -1]).nonzero().flatten().tolist()
            if right_padded:
                raise ValueError(
                    f"prompt(s) {right_padded} end in padding: generate continues every prompt "
                    "from the last column, so pad on the left (to_tokens(..., "
                    "padding_side='left'))"
                )
            if padding_of(mask) is None:  # an all-ones mask runs the same pass as none
                mask = None
        return tokens, mask, input_type

    def _mask_of_left_padding(
        self, tokens: Int[Tensor, "batch pos"], prepend_bos: Optional[bool]
    ) -> Int[Tensor, "batch pos"]:
        """The mask of left-padded token ids, read off the pad token as TransformerLens 4.x's
        ``generate(tokens, padding_side="left")`` does: each row's leading pad tokens are
        padding; when BOS is prepended (``prepend_bos``, default the config's) and the BOS
        token is the pad token, the last of them is the BOS, a real token."""
        pad = self._pad_token_id()
        if pad is None:
            raise ValueError(
                "generate(tokens, padding_side='left') reads the padding off the pad token, "
                "and no tokenizer with a pad token is attached; pass attention_mask=... "
                "(from model.to_tokens_and_mask) instead"
            )
        leading = torch.eq(torch.ne(tokens, pad).long().cumsum(dim=-1), 0)
        mask = ~leading
        prepend = self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
        if prepend and getattr(self.tokenizer, "bos_token_id", None) == pad:
            n_leading = leading.sum(dim=-1)
            rows = (n_leading > 0).nonzero().flatten()
            mask[rows, n_leading[rows] - 1] = True
        return mask.long()

    def _stop_tokens(self, stop_at_eos: bool, eos_token_id) -> list[int]:
        if not stop_at_eos:
            return []
        if eos_token_id is None:
            eos_token_id = getattr(self.tokenizer, "eos_token_id", None)
            if eos_token_id is None:
                raise ValueError(
                    "stop_at_eos=True needs an end-of-sequence token, and the tokenizer has "
                    "none (or no tokenizer is attached); pass eos_token_id=... or "
                    "stop_at_eos=False"
                )
        if is_integer(eos_token_id):  # NumPy integers too, as token ids elsewhere
            ids = [eos_token_id]
        else:
            try:
                ids = list(eos_token_id)
            except TypeError:  # not a sequence (a 0-d tensor, a float): refused below
                ids = []
        if not ids or not all(is_integer(i) and 0 <= i < self.cfg.d_vocab for i in ids):
            raise ValueError(
                f"eos_token_id must be a token id or a list of token ids in [0, "
                f"{self.cfg.d_vocab}), got {eos_token_id!r}"
            )
        return [int(i) for i in ids]

    def _finished_fill(self, stop_tokens: list[int], eos_token_id) -> int:
        """The token that fills a finished prompt's later positions (TransformerLens's
        rule: one given id; for a list, the tokenizer's end token if any, else the first)."""
        if not stop_tokens:
            return 0  # never used: without stop tokens no prompt finishes
        tokenizer_eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos_token_id is None or is_integer(eos_token_id) or tokenizer_eos is None:
            return stop_tokens[0]
        return int(tokenizer_eos)

    def _generation_output(self, tokens, input_type: str, return_type: Optional[str]):
        if return_type == "input":
            return_type = "tokens" if input_type == "tokens" else "str"
        if return_type == "tokens":
            return tokens
        if self.tokenizer is None:
            raise ValueError(
                "return_type='str' needs a tokenizer; none is attached (use return_type='tokens')"
            )
        texts = [self.tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in tokens]
        # as TransformerLens 4.3: one string for one prompt given as a string or as token
        # ids ([pos] / [1, pos]); a list of strings keeps its list, also of one prompt
        return texts if input_type == "list" or len(texts) > 1 else texts[0]

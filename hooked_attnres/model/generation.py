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

from hooked_attnres._precision import float64_device, widened
from hooked_attnres._validation import (
    is_finite_number,
    is_integer,
    require_bool,
    require_choice,
    require_finite_number,
    require_integer,
    require_token_ids,
    require_token_mask,
)
from hooked_attnres.model.attention import KeyValueCache
from hooked_attnres.model.passes import padding_of

if TYPE_CHECKING:
    from hooked_attnres.config import HookedAttnResConfig

# None: token ids, as in TransformerLens 4.3 (whose generate returns tokens for any
# return_type but "input" and "str")
RETURN_TYPES = ("input", "str", "tokens", None)


def check_sampling_arguments(
    top_k: Any = None,
    top_p: Any = None,
    temperature: Any = 1.0,
    freq_penalty: Any = 0.0,
    repetition_penalty: Any = 1.0,
    greedy: bool = False,
) -> Optional[int]:
    """Refuse sampling arguments that `sample_logits` cannot honour (a ``ValueError`` that
    names the argument); returns ``top_k`` as an ``int`` or ``None``.

    Every number must be finite (a NaN ``freq_penalty`` used to be skipped silently; a NaN
    temperature or repetition penalty crashed in ``torch.multinomial``), and ``top_k`` and
    ``top_p`` are not combined where they filter: TransformerLens keeps ``top_k`` and
    silently ignores ``top_p``, Hugging Face applies both, so either reading would surprise
    someone; ``top_p == 1`` filters nothing (in both), so with ``top_k`` it is accepted
    (``top_k`` alone). Greedy decoding (``greedy``, i.e. ``generate(do_sample=False)``, or
    ``temperature == 0``) takes the argmax, which neither filter changes (in both
    libraries), so there the pair is accepted."""
    for name, value in (
        ("temperature", temperature),
        ("freq_penalty", freq_penalty),
        ("repetition_penalty", repetition_penalty),
    ):
        require_finite_number(name, value)
    if freq_penalty < 0:
        raise ValueError(f"freq_penalty must be >= 0, got {freq_penalty}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    top_k = require_integer("top_k", top_k, 1, optional=True)
    if top_p is not None and not (is_finite_number(top_p) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    # top_p = 1 keeps every token: with top_k it is top_k alone (in both libraries)
    if top_k is not None and top_p is not None and top_p < 1 and not greedy and temperature != 0:
        raise ValueError(
            f"top_k={top_k} and top_p={top_p} were both given: TransformerLens's "
            "sample_logits keeps top_k and ignores top_p, Hugging Face applies both; give "
            "one of them (or decode greedily: do_sample=False or temperature=0, where "
            "neither filters)"
        )
    return top_k


def _check_penalty_tokens(
    final_logits: Float[Tensor, "batch d_vocab"],
    tokens: Optional[Int[Tensor, "batch pos"]],
    token_mask: Optional[Bool[Tensor, "batch pos"]],
) -> tuple[Optional[Int[Tensor, "batch pos"]], Optional[Bool[Tensor, "batch pos"]]]:
    """``(tokens, token_mask)`` as ``torch.long`` ids and a bool mask, after refusing
    ``tokens`` that are not ``[batch, pos]`` ids in ``[0, d_vocab)`` of the logits'
    prompts, and a ``token_mask`` that is not their ``[batch, pos]`` 0/1 mask (with the
    tokens of one prompt for two, the penalties counted the first prompt's only and drew
    the second from its unpenalised logits, silently). Any integer dtype is taken
    (``uint8`` / ``int16`` ids crashed in ``scatter_add_``, which indexes with int64)."""
    if tokens is None:
        if token_mask is not None:
            raise ValueError("token_mask marks the real tokens of tokens=, which was not given")
        return None, None
    if not isinstance(tokens, Tensor):
        raise TypeError(f"tokens must be a [batch, pos] tensor of token ids, got {tokens!r}")
    require_token_ids(tokens, final_logits.shape[-1])
    if tokens.ndim != 2 or tokens.shape[0] != final_logits.shape[0]:
        raise ValueError(
            f"tokens must be [batch, pos] = [{final_logits.shape[0]}, pos] (the sequences of "
            f"the logits' prompts), got shape {tuple(tokens.shape)}"
        )
    if token_mask is not None:
        token_mask = require_token_mask("token_mask", token_mask, tuple(tokens.shape))
    return tokens.long(), token_mask


def _refuse_non_finite(
    logits: Float[Tensor, "batch d_vocab"],
    final_logits: Float[Tensor, "batch d_vocab"],
    temperature: float,
) -> None:
    """A ``ValueError`` instead of a NaN probability (``torch.multinomial``'s "probability
    tensor contains either `inf`, `nan` or element < 0") or the argmax of a NaN (a token,
    silently). ``logits``: what `_checked_logits` filtered (float32 when sampling);
    ``temperature == 0``: NaN and a row of only ``-inf`` (every token banned: its argmax,
    token 0, was returned silently) are refused; a ``+inf`` logit is the argmax."""
    bad = torch.isnan(logits).any(dim=-1)
    has_inf = torch.eq(logits, float("inf")).any(dim=-1)
    no_finite = ~torch.isfinite(logits).any(dim=-1)
    if temperature != 0.0:  # -inf is a filtered token; a row needs a finite one, no +inf
        bad |= has_inf | no_finite
    else:  # a row of -inf has no token to choose (argmax would take token 0)
        bad |= no_finite & ~has_inf
    if not bool(bad.any()):
        return
    rows = bad.nonzero().flatten().tolist()
    if bool(torch.isfinite(final_logits[rows]).all()):
        why = (
            f"the penalties and temperature={temperature} overflow float32 (a temperature "
            "this small samples the argmax: use temperature=0 or do_sample=False)"
        )
    else:
        why = "the model's logits (or a hook's edit of them) are NaN or infinite"
    raise ValueError(
        f"cannot choose the next token of row(s) {rows}: the logits have NaN, +inf or no "
        f"finite value; {why}"
    )


def _checked_logits(
    final_logits: Float[Tensor, "batch d_vocab"],
    top_k: Optional[int],
    top_p: Optional[float],
    temperature: float,
    freq_penalty: float,
    repetition_penalty: float,
    tokens: Optional[Int[Tensor, "batch pos"]],
    token_mask: Optional[Bool[Tensor, "batch pos"]],
) -> Float[Tensor, "batch d_vocab"]:
    """The logits `sample_logits` draws from (after the penalties, the temperature and
    top-k / top-p; filtered tokens are ``-inf``), float32 (as TransformerLens: filtered in
    the logits' dtype, drawn in float32), or for ``temperature == 0`` the penalised logits
    it takes the argmax of, in the logits' dtype if at least float32, else float32
    (float64 logits stay float64, as in TransformerLens: rounding them to float32 first
    made near-ties choose another token). Checked by `_refuse_non_finite` (NaN, or
    nothing to choose: ``ValueError``)."""
    top_k = check_sampling_arguments(top_k, top_p, temperature, freq_penalty, repetition_penalty)
    if not isinstance(final_logits, Tensor) or not final_logits.is_floating_point():
        raise TypeError(
            "final_logits must be a floating-point tensor [batch, d_vocab], got "
            f"{final_logits.dtype if isinstance(final_logits, Tensor) else final_logits!r}"
        )
    if final_logits.ndim != 2:  # model(tokens)'s [batch, pos, d_vocab] gave a [batch, pos] argmax
        raise ValueError(
            "final_logits must be [batch, d_vocab], the logits of the last position "
            f"(logits[:, -1] of a forward pass), got shape {tuple(final_logits.shape)}"
        )
    tokens, token_mask = _check_penalty_tokens(final_logits, tokens, token_mask)
    if (freq_penalty > 0 or repetition_penalty != 1.0) and tokens is None:
        raise ValueError("freq_penalty and repetition_penalty need the tokens so far")
    logits = widened(final_logits)
    counts = None
    if tokens is not None and (freq_penalty > 0 or repetition_penalty != 1.0):
        weights = None if token_mask is None else token_mask.to(logits.dtype)
        counts = torch.zeros_like(logits).scatter_add_(
            -1, tokens, torch.ones_like(tokens, dtype=logits.dtype) if weights is None else weights
        )
    if counts is not None and repetition_penalty != 1.0:
        penalised = torch.where(
            logits > 0, logits / repetition_penalty, logits * repetition_penalty
        )
        logits = torch.where(counts > 0, penalised, logits)
    if temperature == 0.0:
        _refuse_non_finite(logits, final_logits, temperature)
        return logits
    logits = logits / temperature
    if counts is not None and freq_penalty > 0:
        logits = logits - freq_penalty * counts
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    elif top_p is not None and top_p < 1:  # top_p = 1 keeps every token
        ordered, order = logits.sort(dim=-1, descending=True, stable=True)  # ties: low id first
        # the mass before each token summed in float64: in float32 (TransformerLens) the sum
        # over a large vocabulary drifts by up to 2e-5, so top_p = 1 dropped most tokens of
        # a Qwen3-sized vocabulary and top_p < 1 cut at the wrong token; on the host for a
        # device without float64 (MPS)
        before = ordered.to(float64_device(ordered.device), torch.float64)
        before = before.softmax(dim=-1).cumsum(dim=-1)
        # drop a token once the tokens before it already exceed top_p (the first is kept)
        drop = torch.zeros_like(before, dtype=torch.bool)
        drop[..., 1:] = before[..., :-1] > top_p
        drop = drop.to(logits.device)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    logits = logits.float()
    _refuse_non_finite(logits, final_logits, temperature)
    return logits


def sampling_probabilities(
    final_logits: Float[Tensor, "batch d_vocab"],
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    temperature: float = 1.0,
    freq_penalty: float = 0.0,
    repetition_penalty: float = 1.0,
    tokens: Optional[Int[Tensor, "batch pos"]] = None,
    token_mask: Optional[Bool[Tensor, "batch pos"]] = None,
) -> Float[Tensor, "batch d_vocab"]:
    """The distribution `sample_logits` draws the next token from, ``[batch, d_vocab]``
    float32 (rows sum to 1; a filtered token has probability 0). For ``temperature == 0``
    it is one-hot at the token `sample_logits` returns. Arguments as `sample_logits`."""
    logits = _checked_logits(
        final_logits,
        top_k,
        top_p,
        temperature,
        freq_penalty,
        repetition_penalty,
        tokens,
        token_mask,
    )
    if temperature == 0.0:
        probs = torch.zeros(final_logits.shape, dtype=torch.float32, device=final_logits.device)
        return probs.scatter_(-1, logits.argmax(dim=-1)[:, None], 1.0)
    return (logits - logits.logsumexp(dim=-1, keepdim=True)).softmax(dim=-1)


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
    """The next token of every prompt, with TransformerLens's ``sample_logits`` semantics
    (the distribution it draws from: `sampling_probabilities`).

    In order: the repetition penalty (a logit of a token seen in ``tokens`` is divided by
    ``repetition_penalty`` if positive, multiplied if negative); ``temperature == 0``
    returns the argmax; otherwise the logits are divided by ``temperature``, the frequency
    penalty subtracts ``freq_penalty`` times each token's count in ``tokens`` (the prompt
    included), then ``top_k`` keeps the ``k`` largest logits (every token tied with the
    ``k``-th too; ``k`` is clamped to the vocabulary) or ``top_p`` keeps, in order of
    probability, every token whose more likely tokens have a total probability of at most
    ``top_p`` (TransformerLens's rule: the smallest set that reaches ``top_p``, plus one
    token when the tokens before it reach ``top_p`` exactly, where Hugging Face stops;
    that total is summed in float64, TransformerLens's in float32, and ``top_p == 1``
    keeps every token);
    ``top_k`` with ``top_p < 1`` is refused unless ``temperature == 0``. The arithmetic is in
    the logits' dtype (float32 at least), the draw from the softmax in float32. Arguments
    are checked by `check_sampling_arguments`; NaN logits, or logits that overflow
    (``temperature`` below about ``1e-37``), raise a ``ValueError``.

    Args:
        final_logits: the logits of the last position ``[batch, d_vocab]``.
        tokens: the sequences so far ``[batch, pos]`` (for the penalties).
        token_mask: ``[batch, pos]``, real tokens of ``tokens`` (padding is not counted by
            the penalties); ``None`` counts every token.
        generator: a seeded ``torch.Generator`` for reproducible draws; ``None`` uses the
            global RNG (then the draws equal TransformerLens's under the same
            ``torch.manual_seed``). A batch draws its rows from one stream, so a prompt
            sampled in a batch gets other tokens than alone under the same seed.

    Returns:
        ``[batch]`` token ids.
    """
    arguments = (top_k, top_p, temperature, freq_penalty, repetition_penalty, tokens, token_mask)
    if temperature == 0.0:
        return _checked_logits(final_logits, *arguments).argmax(dim=-1)
    probs = sampling_probabilities(final_logits, *arguments)
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

        def _refuse_padding_without_pad_token(self, mask, what: str) -> None: ...

        def _refuse_empty_prompts(self, texts, mask, what: str) -> None: ...

        def _prepend_bos(self, prepend_bos: Optional[bool]) -> bool: ...

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
                prompts are always padded on the left (``padding_side="right"`` is refused),
                with the pad token (none: ``ValueError``).
                For a token input without ``attention_mask``, ``padding_side="left"`` reads
                the mask off the tokens (as TransformerLens 4.x does): each row's leading pad
                tokens are padding (a BOS equal to the pad token, with ``prepend_bos``, is
                kept).
            return_type: ``"input"`` (strings for string input, tokens for tokens),
                ``"str"`` or ``"tokens"`` (``[batch, pos + generated]``, the prompt
                included; strings leave out the padding and special tokens);
                ``None`` is ``"tokens"``, as in TransformerLens 4.3 (not the default,
                ``"input"``). With
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
        # NumPy booleans become bools; prepend_bos is checked for token inputs too, as
        # every argument is whether or not it is used
        do_sample, stop_at_eos, use_past_kv_cache, verbose = (
            require_bool("do_sample", do_sample),
            require_bool("stop_at_eos", stop_at_eos),
            require_bool("use_past_kv_cache", use_past_kv_cache),
            require_bool("verbose", verbose),
        )
        prepend_bos = require_bool("prepend_bos", prepend_bos, optional=True)
        max_new_tokens, return_type, padding_side = self._check_generate_args(
            max_new_tokens, return_type, padding_side, generator
        )
        # checked whether or not they are used (greedy ignores top_k, top_p, temperature
        # and freq_penalty, as in TransformerLens)
        check_sampling_arguments(
            top_k, top_p, temperature, freq_penalty, repetition_penalty, greedy=not do_sample
        )
        if generator is not None and (not do_sample or temperature == 0):
            greedy = "do_sample=False" if not do_sample else "temperature=0"
            raise ValueError(
                f"a generator seeds sampling; it has no effect with {greedy} (greedy decoding)"
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
        return self._generation_output(tokens, mask, input_type, return_type)

    def _check_generate_args(
        self, max_new_tokens, return_type, padding_side, generator
    ) -> tuple[int, Optional[str], Optional[str]]:
        """Refuses a bad argument (``ValueError`` / ``TypeError`` naming it); returns
        ``(max_new_tokens, return_type, padding_side)`` as a Python ``int`` and strings
        (`require_integer`, `require_choice`)."""
        max_new_tokens = require_integer("max_new_tokens", max_new_tokens, 1)
        return_type = require_choice("return_type", return_type, RETURN_TYPES)
        padding_side = require_choice("padding_side", padding_side, ("left", "right", None))
        if padding_side == "right":
            raise ValueError(
                "generate pads batched prompts on the left, so that every prompt ends in the "
                "last column; padding_side='right' is not supported here"
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if return_type == "str":  # refused before generating, not after every step ran
            self._require_tokenizer_for_strings()
        return max_new_tokens, return_type, padding_side

    def _require_tokenizer_for_strings(self) -> None:
        if self.tokenizer is None:
            # checked before a string input is tokenised: return_type='tokens' alone is no
            # remedy for generate("text", return_type="str") (audit 151)
            raise ValueError(
                "return_type='str' needs a tokenizer; none is attached: call "
                "model.set_tokenizer(tokenizer), or pass token ids with return_type='tokens'"
            )

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
            self._refuse_padding_without_pad_token(mask, "generate")
            self._refuse_empty_prompts(input, mask, "generate")
            input_type = "str" if isinstance(input, str) else "list"
        else:
            if input.is_floating_point():
                raise TypeError(
                    f"token ids must be an integer tensor, got a {input.dtype} tensor of shape "
                    f"{tuple(input.shape)}: generate does not continue embeddings "
                    "(TransformerBridge's inputs_embeds input); pass [batch, pos] token ids"
                )
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
        if self._prepend_bos(prepend_bos) and getattr(self.tokenizer, "bos_token_id", None) == pad:
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

    def _generation_output(
        self,
        tokens: Int[Tensor, "batch pos"],
        mask: Optional[Int[Tensor, "batch pos"]],
        input_type: str,
        return_type: Optional[str],
    ):
        """What ``generate`` returns: ``tokens`` (padding included), or the strings of each
        row's real tokens (``mask``; ``None``: every token): the padding is left out
        whatever its id (TransformerLens decodes it, skipping it only when the pad token
        is a special token)."""
        if return_type == "input":
            return_type = "tokens" if input_type == "tokens" else "str"
        if return_type in ("tokens", None):
            return tokens
        self._require_tokenizer_for_strings()  # "input" of strings had one to tokenise them
        rows = (
            tokens
            if mask is None
            else [row[real.bool()] for row, real in zip(tokens, mask, strict=True)]
        )
        texts = [self.tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in rows]
        # as TransformerLens 4.3: one string for one prompt given as a string or as token
        # ids ([pos] / [1, pos]); a list of strings keeps its list, also of one prompt
        # (there TransformerLens returns the string: a difference, docs/hooks.md)
        return texts if input_type == "list" or len(texts) > 1 else texts[0]

"""TransformerLens's tokenizer helpers for a model with an attached HF tokenizer."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from hooked_attnres._validation import (
    is_integer,
    require_bool,
    require_choice,
    require_token_ids,
    require_tokenizer,
)

if TYPE_CHECKING:
    from hooked_attnres.config import HookedAttnResConfig


class LeftPaddingWithoutMaskWarning(UserWarning):
    """Token ids that look left-padded (a row starts with the tokenizer's pad token, and
    the model pads on the left) were passed without an ``attention_mask``: the padding is
    attended as real tokens (TransformerLens's HookedTransformer would guess the mask)."""


def _token_tensor(what: str, tokens: Any) -> Tensor:
    """``tokens`` (a tensor, an array, an id or a list of them) as a tensor, for
    `require_token_ids` to check. What torch cannot read is refused with a ``TypeError``
    naming ``what`` (a ragged list of rows raised torch's "expected sequence of length 2 at
    dim 1 (got 1)", ``None`` or a set "Could not infer dtype of NoneType"); an empty list,
    which torch reads as float32, is an empty ``torch.long`` tensor."""
    try:
        tensor = torch.as_tensor(tokens)
    except (TypeError, ValueError, RuntimeError) as error:
        ragged = isinstance(tokens, (list, tuple)) and any(
            isinstance(row, (list, tuple, Tensor, np.ndarray)) for row in tokens
        )
        remedy = "; rows of different lengths: decode each row alone" if ragged else ""
        raise TypeError(
            f"{what} takes token ids (an int, a tensor or array of ints, or a list of ints or "
            f"of equal-length rows), got {type(tokens).__name__} {tokens!r:.80} ({error})"
            f"{remedy}"
        ) from None
    if tensor.numel() == 0 and not isinstance(tokens, (Tensor, np.ndarray)):
        tensor = tensor.long()
    return tensor


class TokenizerMixin:
    """``to_tokens``, ``to_str_tokens``, ``to_string``, ``to_single_token``,
    ``to_single_str_token``, ``get_token_position``.

    The model keeps a Hugging Face tokenizer in ``self.tokenizer`` (or ``None``).
    Batches of unequal prompts are padded on ``padding_side`` (default: the tokenizer's
    ``padding_side``, as in TransformerLens, which `set_tokenizer` sets to
    ``cfg.default_padding_side``; see `default_padding_side`); the forward pass masks the
    padding, so either side gives the logits of the unpadded prompts at their real
    positions.
    """

    tokenizer: Any = None
    if TYPE_CHECKING:  # provided by HookedAttnRes
        ln_final: Any

        @property
        def cfg(self) -> HookedAttnResConfig: ...

        @property
        def W_U(self) -> Tensor: ...

    def set_tokenizer(self, tokenizer) -> None:
        """Attach a Hugging Face tokenizer (its vocabulary must fit in ``d_vocab``; a name
        such as ``"gpt2"`` is refused: `require_tokenizer`)."""
        require_tokenizer("tokenizer", tokenizer)
        if tokenizer is not None:
            vocab = len(tokenizer)
            if vocab > self.cfg.d_vocab:
                raise ValueError(
                    f"the tokenizer has {vocab} tokens but the model's d_vocab is "
                    f"{self.cfg.d_vocab}; ids >= d_vocab would have no embedding"
                )
            if tokenizer.pad_token is None and tokenizer.eos_token is not None:
                tokenizer.pad_token = tokenizer.eos_token
            tokenizer.padding_side = self.cfg.default_padding_side
        self.tokenizer = tokenizer
        # what set_tokenizer wrote: tells which of the two was changed since
        self._attached_padding_side = self.cfg.default_padding_side

    @property
    def default_padding_side(self) -> str:
        """The side that batches of strings are padded on when ``padding_side`` is not
        given: the attached tokenizer's ``padding_side``, as in TransformerLens
        (``model.tokenizer.padding_side = "left"`` pads on the left), which `set_tokenizer`
        sets to ``cfg.default_padding_side``. If the config field was changed after the
        tokenizer was attached (and the tokenizer's was not), the config's value is used."""
        configured = self.cfg.default_padding_side
        tokenizer_side = getattr(self.tokenizer, "padding_side", None)
        if tokenizer_side not in ("right", "left") or tokenizer_side == configured:
            return configured
        # they disagree: the one still equal to what set_tokenizer wrote was not changed
        if tokenizer_side == getattr(self, "_attached_padding_side", None):
            return configured
        return tokenizer_side

    def _warn_if_left_padded(self, tokens: Int[Tensor, "batch pos"]) -> None:
        """Warn (once per model) when ``tokens``, passed without a mask, look left-padded:
        the model pads on the left and a row starts with the pad token (which is not the
        BOS token). The numbers are not changed: token inputs are taken as unpadded
        (docs/hooks.md, padding)."""
        tokenizer = self.tokenizer
        if (
            getattr(self, "_left_padding_warned", False)
            or tokenizer is None
            or self.default_padding_side != "left"
        ):
            return
        pad = self._pad_token_id()
        if pad is None or pad == getattr(tokenizer, "bos_token_id", None):
            return
        rows = torch.eq(tokens[:, 0], pad).nonzero().flatten().tolist()
        if not rows:
            return
        self._left_padding_warned = True
        warnings.warn(
            f"the tokens of prompt(s) {rows[:4]} start with the pad token {pad} and the model "
            "pads on the left, but no attention_mask was passed: the padding is attended as "
            "real tokens and shifts the rotary positions (TransformerLens's "
            "HookedTransformer would guess the mask). Pass attention_mask= (from "
            "model.to_tokens_and_mask) or the strings themselves. Warned once per model; "
            "silence with warnings.filterwarnings('ignore', "
            "category=hooked_attnres.LeftPaddingWithoutMaskWarning).",
            LeftPaddingWithoutMaskWarning,
            stacklevel=4,
        )

    def _pad_token_id(self) -> Optional[int]:
        """The attached tokenizer's pad token id as an ``int`` (a Python or NumPy integer,
        `is_integer`), or ``None`` without a tokenizer or a pad token. The one place that
        reads it: the padding of `to_tokens`, the left-padding warning and
        ``generate(tokens, padding_side="left")`` agree on what the pad token is."""
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return int(pad) if is_integer(pad) else None

    def _require_attached_tokenizer(self, what: str):
        """The tokenizer attached to the model, else ``ValueError`` naming ``what`` (the
        method that needs it). Whether a value *is* a tokenizer object is another check,
        `hooked_attnres._validation.require_tokenizer`."""
        if self.tokenizer is None:
            raise ValueError(
                f"{what} needs a tokenizer, and none is attached; pass token ids instead or "
                "call model.set_tokenizer(tokenizer)"
            )
        return self.tokenizer

    def _prepend_bos(self, prepend_bos: Optional[bool]) -> bool:
        """``prepend_bos`` (``True`` / ``False``), or the config's default for ``None``;
        anything else is refused (``TypeError``: ``"no"`` was read as ``True``)."""
        prepend = require_bool("prepend_bos", prepend_bos, optional=True)
        return self.cfg.default_prepend_bos if prepend is None else prepend

    def _bos_id(self, prepend_bos: Optional[bool]) -> Optional[int]:
        if not self._prepend_bos(prepend_bos):
            return None
        bos = self.tokenizer.bos_token_id
        if bos is None:
            raise ValueError("prepend_bos=True but the tokenizer has no bos_token")
        return bos

    def to_tokens(
        self,
        input: Union[str, list[str]],
        prepend_bos: Optional[bool] = None,
        padding_side: Optional[str] = None,
        move_to_device: bool = True,
        truncate: bool = True,
    ) -> Int[Tensor, "batch pos"]:
        """Tokenise a string or a list of strings to ``[batch, pos]``, padded on
        ``padding_side`` (``"right"`` or ``"left"``; default `default_padding_side`: the
        tokenizer's ``padding_side``, as in TransformerLens) with the pad token (prompts of
        different lengths and a tokenizer without one: ``ValueError``).
        Pass the padding's mask to the model (`to_tokens_and_mask`) or pass the strings
        themselves."""
        tokens, mask = self.to_tokens_and_mask(
            input, prepend_bos, padding_side, move_to_device, truncate
        )
        self._refuse_padding_without_pad_token(mask, "to_tokens")
        return tokens

    def _refuse_padding_without_pad_token(self, mask: Int[Tensor, "batch pos"], what: str) -> None:
        """``ValueError`` when ``mask`` (of `to_tokens_and_mask`) has padding and the tokenizer
        has no pad token: the padding is then token 0, a real token, which tokens handed on
        without their mask cannot tell from the text (TransformerLens's tokenizer refuses
        to pad without a pad token)."""
        if self._pad_token_id() is None and not bool(mask.bool().all()):
            eos = getattr(self.tokenizer, "eos_token", None)
            remedy = (
                f"no pad token, and its end token {eos!r} is not taken for it: attach it with "
                "model.set_tokenizer(model.tokenizer), which pads with the end token, or set "
                "model.tokenizer.pad_token"
                if eos is not None  # attached as model.tokenizer = ..., not by set_tokenizer
                else "no pad token (nor an end token, which set_tokenizer takes for it): "
                "set model.tokenizer.pad_token"
            )
            raise ValueError(
                f"{what} pads prompts of different lengths, and the tokenizer has {remedy}; or "
                "take the tokens with the mask that marks their padding from "
                "model.to_tokens_and_mask. Padding with token 0, a real token, would be read "
                "as text"
            )

    def _refuse_empty_prompts(
        self, texts: Union[str, list[str]], mask: Int[Tensor, "batch pos"], what: str
    ) -> None:
        """``ValueError`` naming the prompts of ``texts`` that tokenise to no tokens (``""``
        without a BOS token): run as a batch (``mask``, of `to_tokens_and_mask`), each is a
        row of padding only, which the forward pass refuses as "attention_mask row(s) [1]
        are all zero", a mask the caller never passed (audit 151)."""
        empty = (~mask.bool().any(dim=-1)).nonzero().flatten().tolist()
        if empty:
            shown = [texts[i] for i in empty[:4]] if isinstance(texts, list) else [texts]
            raise ValueError(
                f"{what}: prompt(s) {empty} {shown!r:.80} tokenise to no tokens (and no BOS "
                "token was prepended); a prompt needs at least one: drop empty prompts from "
                "the batch"
            )

    def to_tokens_and_mask(
        self,
        input: Union[str, list[str]],
        prepend_bos: Optional[bool] = None,
        padding_side: Optional[str] = None,
        move_to_device: bool = True,
        truncate: bool = True,
    ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
        """`to_tokens` plus the attention mask ``[batch, pos]`` (1 = real token, 0 = padding)."""
        self._require_attached_tokenizer("to_tokens")
        padding_side = require_choice("padding_side", padding_side, ("right", "left", None))
        if padding_side is None:
            padding_side = self.default_padding_side
        # flags read by truthiness took "no" for True
        move_to_device = require_bool("move_to_device", move_to_device)
        truncate = require_bool("truncate", truncate)
        # a token id (to_single_token(3)) is no iterable: list(3) said "'int' object is not
        # iterable"
        texts = [input] if isinstance(input, str) else []
        if not isinstance(input, str) and isinstance(input, Iterable):
            texts = list(input)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError(
                "to_tokens takes a string or a non-empty list of strings, got "
                f"{type(input).__name__} {input!r:.80}"
            )
        ids = [self._token_ids(text, prepend_bos, truncate) for text in texts]
        width = max(len(row) for row in ids)
        if width == 0:
            raise ValueError("the input tokenises to zero tokens")
        pad = self._pad_token_id()
        tokens = torch.full((len(ids), width), 0 if pad is None else pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, row in enumerate(ids):
            columns = (
                slice(0, len(row)) if padding_side == "right" else slice(width - len(row), width)
            )
            tokens[i, columns] = torch.tensor(row, dtype=torch.long)
            mask[i, columns] = 1
        if move_to_device:
            tokens, mask = tokens.to(self.cfg.device), mask.to(self.cfg.device)
        return tokens, mask

    def _token_ids(self, text: str, prepend_bos: Optional[bool], truncate: bool) -> list[int]:
        """The ids of one text, unpadded: the text tokenised alone (no special tokens),
        after the BOS id when ``prepend_bos`` (default the config's), cut to ``n_ctx``
        when ``truncate``."""
        tokenizer = self._require_attached_tokenizer("to_tokens")
        bos = self._bos_id(prepend_bos)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if bos is not None:
            ids = [bos, *ids]
        return ids[: self.cfg.n_ctx] if truncate else ids

    def to_string(
        self,
        tokens: Union[
            int, Int[Tensor, ""], Int[Tensor, " pos"], Int[Tensor, "batch pos"], list[int]
        ],
    ) -> Union[str, list[str]]:
        """Decode one token id (an ``int`` or a 0-d tensor) or ``[pos]`` to a string, or
        ``[batch, pos]`` to a list of strings."""
        tokenizer = self._require_attached_tokenizer("to_string")
        if isinstance(tokens, str):  # torch.as_tensor said "new(): invalid data type 'str'"
            raise TypeError(
                f"to_string decodes token ids, got the string {tokens!r:.80}; to_tokens or "
                "to_str_tokens read text"
            )
        tokens = _token_tensor("to_string", tokens)
        # integer ids in [0, d_vocab): a negative id overflowed the decoder
        require_token_ids(tokens, self.cfg.d_vocab)
        if tokens.ndim == 0:
            tokens = tokens[None]
        if tokens.ndim == 2:
            return [str(self.to_string(row)) for row in tokens]
        if tokens.ndim != 1:
            raise ValueError(
                f"to_string takes a token id, [pos] or [batch, pos] tokens, got "
                f"{tuple(tokens.shape)}"
            )
        return tokenizer.decode(tokens.tolist(), clean_up_tokenization_spaces=False)

    def to_str_tokens(
        self,
        input: Union[str, list[str], Int[Tensor, " pos"], Int[Tensor, "1 pos"], list[int]],
        prepend_bos: Optional[bool] = None,
        padding_side: Optional[str] = None,
    ) -> Union[list[str], list[list[str]]]:
        """One string per token: a string, a token id or ``[pos]`` / ``[1, pos]`` tokens give
        ``list[str]``; a list of token ids too; any other list (of strings, token tensors
        or lists of ids, as in TransformerLens) gives one list per item, each tokenised
        alone, so ``padding_side``, accepted for TransformerLens's signature, changes
        nothing."""
        self._require_attached_tokenizer("to_str_tokens")
        require_choice("padding_side", padding_side, ("right", "left", None))
        if isinstance(input, (list, tuple)) and not all(is_integer(t) for t in input):
            return [self._str_tokens_one(item, prepend_bos) for item in input]
        return self._str_tokens_one(input, prepend_bos)

    def _str_tokens_one(self, input, prepend_bos: Optional[bool]) -> list[str]:
        if isinstance(input, (list, tuple)) and not input:
            return []
        if isinstance(input, str):
            return self._str_tokens_of_text(input, prepend_bos)
        if isinstance(input, (list, tuple)) and not all(is_integer(t) for t in input):
            raise TypeError(
                "to_str_tokens takes a string, token ids, or a list of those; got a nested "
                f"list holding {sorted({type(t).__name__ for t in input})}"
            )
        tokens = _token_tensor("to_str_tokens", input)
        if tokens.is_floating_point() or tokens.dtype == torch.bool:
            raise TypeError(f"to_str_tokens takes integer token ids, got dtype {tokens.dtype}")
        # ids in [0, d_vocab), as to_string: one past it decoded to '', a negative one
        # overflowed the decoder
        require_token_ids(tokens, self.cfg.d_vocab)
        if tokens.ndim == 0:
            tokens = tokens[None]
        if tokens.ndim == 2 and tokens.shape[0] == 1:
            tokens = tokens[0]
        if tokens.ndim != 1:
            raise ValueError(
                f"to_str_tokens takes [pos] or [1, pos] tokens, got {tuple(tokens.shape)}"
            )
        return self._decode_each(tokens)

    def _str_tokens_of_text(self, text: str, prepend_bos: Optional[bool]) -> list[str]:
        # a text of no tokens gives [] (as TransformerLens), where to_tokens refuses it
        return self._decode_each(self._token_ids(text, prepend_bos, True))

    def _decode_each(self, tokens: Union[Int[Tensor, " pos"], list[int]]) -> list[str]:
        tokenizer = self._require_attached_tokenizer("to_str_tokens")
        ids = tokens.tolist() if isinstance(tokens, Tensor) else tokens
        return [tokenizer.decode([t], clean_up_tokenization_spaces=False) for t in ids]

    def to_single_token(self, string: str) -> int:
        """The id of a string that is exactly one token (``ValueError`` otherwise; every
        token counts, also beyond ``n_ctx``)."""
        # not truncated: cut to n_ctx=1, "w5 w6" was the single token w5
        tokens = self.to_tokens(string, prepend_bos=False, move_to_device=False, truncate=False)[0]
        if tokens.numel() != 1:
            raise ValueError(
                f"{string!r} is {tokens.numel()} tokens {self._decode_each(tokens)}, not one"
            )
        return int(tokens.item())

    def to_single_str_token(self, int_token: int) -> str:
        """The string of one token id (TransformerLens's ``to_single_str_token``)."""
        if isinstance(int_token, Tensor) and int_token.ndim == 0:
            int_token = int_token.item()  # a float or bool tensor stays refused below
        if not is_integer(int_token):
            raise TypeError(f"to_single_str_token takes one integer token id, got {int_token!r}")
        int_token = int(int_token)  # the tokenizer decodes Python ints
        if not 0 <= int_token < self.cfg.d_vocab:
            raise ValueError(f"token id {int_token} is not in [0, {self.cfg.d_vocab}) (d_vocab)")
        return self._require_attached_tokenizer("to_single_str_token").decode(
            [int_token], clean_up_tokenization_spaces=False
        )

    def get_token_position(
        self,
        single_token: Union[str, int, Int[Tensor, ""]],
        input: Union[str, Int[Tensor, " pos"], Int[Tensor, "1 pos"]],
        mode: str = "first",
        prepend_bos: Optional[bool] = None,
        padding_side: Optional[str] = None,
    ) -> int:
        """The position of a token in a prompt (TransformerLens semantics).

        Args:
            single_token: a token id, or a string that is exactly one token.
            input: a string (tokenised with ``prepend_bos`` / ``padding_side``), or
                tokens ``[pos]`` / ``[1, pos]``.
            mode: ``"first"`` or ``"last"`` occurrence.

        Raises:
            ValueError: the token does not occur, a bad ``mode``, a batch of prompts, or a
                token id outside ``[0, d_vocab)`` (``single_token`` or in ``input``).
            TypeError: ``single_token`` is a float, a bool or a tensor of floats, or
                ``input`` tokens are not integers (a float or boolean tensor).
        """
        mode = require_choice("mode", mode, ("first", "last"))
        if isinstance(input, str):
            tokens = self.to_tokens(input, prepend_bos, padding_side, move_to_device=False)
        else:
            tokens = _token_tensor("get_token_position", input)
            # compared with ==: a boolean tensor matched token 1 (True == 1), a float one
            # 5.0 to token 5, and -1 / d_vocab were searched as ids (audit 149)
            require_token_ids(tokens, self.cfg.d_vocab)
        if tokens.ndim == 2:
            if tokens.shape[0] != 1:
                raise ValueError(
                    f"get_token_position takes one prompt: tokens [pos] or [1, pos], got "
                    f"{tuple(tokens.shape)}"
                )
            tokens = tokens[0]
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be [pos] or [1, pos], got {tuple(tokens.shape)}")
        if isinstance(single_token, str):
            single_token = self.to_single_token(single_token)
        elif isinstance(single_token, Tensor) and single_token.numel() == 1:
            require_token_ids(single_token, self.cfg.d_vocab)  # int() would truncate 3.7
            single_token = int(single_token.item())
        elif is_integer(single_token):
            require_token_ids(torch.tensor(single_token, device=tokens.device), self.cfg.d_vocab)
        else:  # a float or a bool would compare equal to other ids (True == 1)
            raise TypeError(
                "single_token must be a token id (an int or a one-element integer tensor) or "
                f"a string that is one token, got {single_token!r}"
            )
        found = (tokens == single_token).nonzero().flatten()
        truncated = len(tokens) == self.cfg.n_ctx
        if isinstance(input, str) and truncated and (found.numel() == 0 or mode == "last"):
            # the string's tokens beyond n_ctx (which to_tokens drops, as the model reads
            # no more) hold the token: "not in the prompt" and the last position kept
            # would both be wrong about the prompt as written
            whole = self.to_tokens(input, prepend_bos, padding_side, False, truncate=False)[0]
            beyond = torch.eq(whole[self.cfg.n_ctx :], single_token)
            if bool(beyond.any()):
                kept = (
                    "not at all in them"
                    if found.numel() == 0
                    else f"last in them at position {int(found[-1])}"
                )
                raise ValueError(
                    f"token {single_token} occurs in the prompt after its first "
                    f"n_ctx={self.cfg.n_ctx} tokens (at position "
                    f"{self.cfg.n_ctx + int(beyond.nonzero()[-1])}), which are all that "
                    f"to_tokens keeps of a string (and the model reads); it is {kept}: "
                    "pass model.to_tokens(prompt), the tokens the model reads, to search them"
                )
        if found.numel() == 0:
            raise ValueError(f"token {single_token} does not occur in the prompt")
        return int(found[0] if mode == "first" else found[-1])

    def tokens_to_residual_directions(
        self,
        tokens: Union[str, int, Int[Tensor, ""], Int[Tensor, ...]],
        dtype: Optional[torch.dtype] = None,
    ) -> Float[Tensor, "... d_model"]:
        """The direction that the normalised final stream is dotted with to give a
        token's logit: ``ln_final.w * W_U[:, token]`` (TransformerLens folds the gain into
        ``W_U``; this model keeps it separate, so it is folded here). ``[d_model]`` for one
        token, else ``[*tokens.shape, d_model]``. Used by ``ActivationCache.logit_attrs``.

        ``dtype``: the dtype of the product (default the model's). ``cache.logit_attrs``
        of a bfloat16 / float16 model takes it in float32, where the product of the two
        weights is exact (in the model's dtype it is rounded to 8 / 11 bits).

        Raises:
            TypeError: tokens that are not integers (a float or a boolean tensor, which
                would index ``W_U`` as a mask).
            ValueError: a token id outside ``[0, d_vocab)`` (a negative one would index
                from the end: ``-1`` gave the direction of token ``d_vocab - 1``)."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        tokens = _token_tensor("tokens_to_residual_directions", tokens)
        require_token_ids(tokens, self.cfg.d_vocab)
        # ids of any integer dtype index as ids: torch took a uint8 tensor as a mask and
        # refused int8 / int16 ones (audit 151)
        tokens = tokens.to(self.W_U.device, torch.long)
        dtype = self.W_U.dtype if dtype is None else dtype
        gain = self.ln_final.w.to(dtype).reshape(-1, *([1] * tokens.ndim))
        return (self.W_U[:, tokens].to(dtype) * gain).movedim(0, -1)

"""TransformerLens's tokenizer helpers for a model with an attached HF tokenizer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

if TYPE_CHECKING:
    from hooked_attnres.config import HookedAttnResConfig


class TokenizerMixin:
    """``to_tokens``, ``to_str_tokens``, ``to_string``, ``to_single_token``.

    The model keeps a Hugging Face tokenizer in ``self.tokenizer`` (or ``None``).
    Padding is on the right: with causal attention, real tokens never see padding, so
    batches of unequal prompts give the same logits as unpadded runs at real positions.
    """

    tokenizer: Any = None
    if TYPE_CHECKING:  # provided by HookedAttnRes
        ln_final: Any

        @property
        def cfg(self) -> HookedAttnResConfig: ...

        @property
        def W_U(self) -> Tensor: ...

    def set_tokenizer(self, tokenizer) -> None:
        """Attach a Hugging Face tokenizer (its vocabulary must fit in ``d_vocab``)."""
        if tokenizer is not None:
            vocab = len(tokenizer)
            if vocab > self.cfg.d_vocab:
                raise ValueError(
                    f"the tokenizer has {vocab} tokens but the model's d_vocab is "
                    f"{self.cfg.d_vocab}; ids >= d_vocab would have no embedding"
                )
            if tokenizer.pad_token is None and tokenizer.eos_token is not None:
                tokenizer.pad_token = tokenizer.eos_token
            tokenizer.padding_side = "right"
        self.tokenizer = tokenizer

    def _require_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise ValueError(
                f"{what} needs a tokenizer, and none is attached; pass token ids instead or "
                "call model.set_tokenizer(tokenizer)"
            )
        return self.tokenizer

    def _bos_id(self, prepend_bos: Optional[bool]) -> Optional[int]:
        prepend = self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
        if not prepend:
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
        """Tokenise a string or a list of strings (right-padded) to ``[batch, pos]``."""
        tokens, _ = self.to_tokens_and_mask(
            input, prepend_bos, padding_side, move_to_device, truncate
        )
        return tokens

    def to_tokens_and_mask(
        self,
        input: Union[str, list[str]],
        prepend_bos: Optional[bool] = None,
        padding_side: Optional[str] = None,
        move_to_device: bool = True,
        truncate: bool = True,
    ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
        """`to_tokens` plus the attention mask ``[batch, pos]`` (1 = real token, 0 = padding)."""
        tokenizer = self._require_tokenizer("to_tokens")
        if padding_side not in (None, "right"):
            raise ValueError(
                f"padding_side={padding_side!r} is not supported: HookedAttnRes pads on the right"
            )
        texts = [input] if isinstance(input, str) else list(input)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("to_tokens takes a string or a non-empty list of strings")
        bos = self._bos_id(prepend_bos)
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        if bos is not None:
            ids = [[bos, *row] for row in ids]
        if truncate:
            ids = [row[: self.cfg.n_ctx] for row in ids]
        width = max(len(row) for row in ids)
        if width == 0:
            raise ValueError("the input tokenises to zero tokens")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        tokens = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, row in enumerate(ids):
            tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        if move_to_device:
            tokens, mask = tokens.to(self.cfg.device), mask.to(self.cfg.device)
        return tokens, mask

    def to_string(
        self, tokens: Union[Int[Tensor, " pos"], Int[Tensor, "batch pos"], list[int]]
    ) -> Union[str, list[str]]:
        """Decode ``[pos]`` to a string or ``[batch, pos]`` to a list of strings."""
        tokenizer = self._require_tokenizer("to_string")
        tokens = torch.as_tensor(tokens)
        if tokens.ndim == 2:
            return [str(self.to_string(row)) for row in tokens]
        if tokens.ndim != 1:
            raise ValueError(
                f"to_string takes [pos] or [batch, pos] tokens, got {tuple(tokens.shape)}"
            )
        return tokenizer.decode(tokens.tolist(), clean_up_tokenization_spaces=False)

    def to_str_tokens(
        self,
        input: Union[str, list[str], Int[Tensor, " pos"], Int[Tensor, "1 pos"], list[int]],
        prepend_bos: Optional[bool] = None,
    ) -> Union[list[str], list[list[str]]]:
        """One string per token: a string or ``[pos]`` tokens give ``list[str]``; a list of
        strings gives one list per string."""
        self._require_tokenizer("to_str_tokens")
        if isinstance(input, list) and input and all(isinstance(t, str) for t in input):
            return [self._str_tokens_of_text(str(text), prepend_bos) for text in input]
        if isinstance(input, str):
            return self._str_tokens_of_text(input, prepend_bos)
        tokens = torch.as_tensor(input)
        if tokens.ndim == 2 and tokens.shape[0] == 1:
            tokens = tokens[0]
        if tokens.ndim != 1:
            raise ValueError(
                f"to_str_tokens takes [pos] or [1, pos] tokens, got {tuple(tokens.shape)}"
            )
        return self._decode_each(tokens)

    def _str_tokens_of_text(self, text: str, prepend_bos: Optional[bool]) -> list[str]:
        return self._decode_each(self.to_tokens(text, prepend_bos, move_to_device=False)[0])

    def _decode_each(self, tokens: Int[Tensor, " pos"]) -> list[str]:
        tokenizer = self._require_tokenizer("to_str_tokens")
        return [tokenizer.decode([t], clean_up_tokenization_spaces=False) for t in tokens.tolist()]

    def to_single_token(self, string: str) -> int:
        """The id of a string that is exactly one token (``ValueError`` otherwise)."""
        tokens = self.to_tokens(string, prepend_bos=False, move_to_device=False)[0]
        if tokens.numel() != 1:
            raise ValueError(
                f"{string!r} is {tokens.numel()} tokens {self._decode_each(tokens)}, not one"
            )
        return int(tokens.item())

    def tokens_to_residual_directions(
        self, tokens: Union[str, int, Int[Tensor, ""], Int[Tensor, ...]]
    ) -> Float[Tensor, "... d_model"]:
        """The direction that the normalised final stream is dotted with to give a
        token's logit: ``ln_final.w * W_U[:, token]`` (TransformerLens folds the gain into
        ``W_U``; this model keeps it separate, so it is folded here). ``[d_model]`` for one
        token, else ``[*tokens.shape, d_model]``. Used by ``ActivationCache.logit_attrs``."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        tokens = torch.as_tensor(tokens, device=self.W_U.device)
        return (self.W_U[:, tokens] * self.ln_final.w.reshape(-1, *([1] * tokens.ndim))).movedim(
            0, -1
        )

"""One rule for the precision of statistics, routing math and metrics (a leaf module):
float32 for bfloat16 / float16 tensors, float32 / float64 tensors as they are.

`stat_dtype` names the dtype; `widened` converts a tensor to it (exactly: every bfloat16 /
float16 value is a float32 value). Where arithmetic on a half-precision model's tensors
would round each result to 8 (11) bits -- a logit difference, a patching metric, a
log-softmax, the sampling filters -- the operands are `widened` first.

`float64_device` is where a float64 computation on a device's tensors runs: the device
itself, or the host for one without float64 (Apple's MPS).

`sum_where` sums the entries a mask keeps by selecting them, never by multiplying by a 0 /
1 mask: an entry left out may be NaN (a hook's edit at a padding position; with eps = 0
its routing was 0 / 0 before `padding_eps`), and NaN * 0 is NaN."""

from __future__ import annotations

import torch
from torch import Tensor


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of norm statistics and routing math: float32, or float64 for a float64 model."""
    return torch.promote_types(dtype, torch.float32)


def widened(values: Tensor) -> Tensor:
    """``values`` (any shape) in `stat_dtype` of its dtype: float32 for bfloat16 / float16
    (exact), unchanged for float32 / float64; the same shape."""
    return values.to(stat_dtype(values.dtype))


def sum_where(values: Tensor, keep: Tensor, dim: int, keepdim: bool = False) -> Tensor:
    """The sum over ``dim`` of the entries of ``values`` where ``keep`` (a bool tensor that
    broadcasts to ``values``) is True, the others left out whatever they hold (NaN
    included); ``values``' shape without ``dim`` (kept with ``keepdim``)."""
    kept = torch.where(keep, values, values.new_zeros(()))
    return kept.sum(dim=dim, keepdim=keepdim)


def float64_device(device: torch.device) -> torch.device:
    """Where float64 arithmetic on ``device``'s tensors is done: ``device`` itself, or the
    host (CPU) for Apple's MPS, which has no float64 ("Cannot convert a MPS Tensor to
    float64 dtype"); the caller moves the result back to ``device``."""
    return torch.device("cpu") if device.type == "mps" else device

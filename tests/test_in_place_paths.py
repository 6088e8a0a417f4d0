"""The in-place arithmetic of a pass without a gradient (RMSNorm, MLP, rotary, a router's
float32 sum reused by its norm) gives the bits of the out-of-place formulas, and never
edits a tensor a hook has been handed."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize_routing, tiny_model

from hooked_attnres.model.norms import RMSNorm
from hooked_attnres.model.rotary import apply_rotary, rotary_tables, rotate_half

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _model(layout: str, dtype: torch.dtype):
    """A tiny model whose norm gains are not 1 (an in-place gain would show)."""
    model = randomize_routing(tiny_model(attnres_layout=layout), seed=3).to(dtype).eval()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".w") and "key_norm" not in name:
                param.copy_(0.5 + torch.rand(param.shape, generator=generator))
    return model


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.float().view(torch.int32) if x.dtype != torch.float64 else x.view(torch.int64)


@pytest.mark.parametrize("layout", ["none", "cumulative", "kimi"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_pass_without_gradient_gives_the_bits_of_a_pass_with_one(layout, dtype):
    """Under ``torch.enable_grad`` with parameters that need a gradient every operation
    runs out of place; under ``inference_mode`` the norms, the MLP and the rotary
    embedding run in place: the logits are the same bits."""
    model = _model(layout, dtype)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.enable_grad():
        with_grad = model(tokens)
    assert with_grad.requires_grad  # the out-of-place path really ran
    with torch.inference_mode():
        without = model(tokens)
    assert torch.equal(_bits(without), _bits(with_grad.detach()))


HOOKS_HANDED_A_TENSOR_THEN_REUSED = (
    "blocks.1.ln1.hook_normalized",  # then times the gain
    "blocks.1.ln2.hook_normalized",
    "blocks.1.attn.q_norm.hook_normalized",
    "blocks.1.attn.k_norm.hook_normalized",
    "blocks.1.mlp.hook_pre",  # then the SiLU
    "ln_final.hook_normalized",
    # a norm's input: in a float32 model its float32 copy is the input itself
    "blocks.1.attn.hook_q",
    "blocks.1.attn.hook_k",
    "blocks.1.mlp_res.hook_out",
    "blocks.1.attn_res.hook_out",
)


@pytest.mark.parametrize("name", HOOKS_HANDED_A_TENSOR_THEN_REUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_cached_tensor_is_not_edited_after_its_hook(name, dtype):
    """A hook watching one point alone (so the tensor after it would be computed in place
    were it not watched) keeps the tensor it was handed as it was: after the pass, the
    kept reference equals a copy made when the hook ran; and ``run_with_cache`` of that
    hook alone stores the same."""
    model = _model("kimi", dtype)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 7), generator=torch.Generator().manual_seed(2))
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep(tensor, hook):
        seen.append((tensor, tensor.clone()))

    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(name, keep)])
        _, cache = model.run_with_cache(tokens, names_filter=name)
    ((kept, copy),) = seen
    assert torch.equal(_bits(kept), _bits(copy))
    assert list(cache.keys()) == [name]
    assert torch.equal(_bits(cache[name]), _bits(copy))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_prompt_tables", [False, True])
def test_rotary_without_gradient_equals_the_formula(dtype, per_prompt_tables):
    """``x * cos + rotate_half(x) * sin`` with each product rounded to ``x``'s dtype, for
    tables shared by every prompt and tables per prompt (one query position each)."""
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 2, 8, generator=generator).to(dtype)
    cos, sin = rotary_tables(5, 8, 10000.0)
    if per_prompt_tables:
        x = x[:, :1]
        cos, sin = cos[torch.tensor([[4], [0], [2]])], sin[torch.tensor([[4], [0], [2]])]
    c, s = cos.to(dtype).unsqueeze(-2), sin.to(dtype).unsqueeze(-2)
    expected = x * c + rotate_half(x) * s
    with torch.no_grad():
        got = apply_rotary(x, cos, sin)
    assert torch.equal(_bits(got), _bits(expected))
    assert got.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rmsnorm_stat_buffer_gives_the_same_bits_and_is_checked(dtype):
    generator = torch.Generator().manual_seed(6)
    norm = RMSNorm(16, 1e-6).to(dtype)
    with torch.no_grad():
        norm.w.copy_(torch.rand(16, generator=generator) + 0.5)
    x = torch.randn(2, 3, 16, generator=generator).to(dtype)
    with torch.no_grad():
        plain, plain_scale = norm.normalize(x)
        buffered, scale = norm.normalize(x, stat_buffer=torch.empty(2, 3, 16))
        assert torch.equal(_bits(buffered), _bits(plain))
        assert torch.equal(scale, plain_scale)
        with pytest.raises(ValueError, match=r"stat_buffer must be shaped like .* \(2, 3, 8\)"):
            norm.normalize(x, stat_buffer=torch.empty(2, 3, 8))
        with pytest.raises(ValueError, match="torch.float64 for an input"):
            norm.normalize(x, stat_buffer=torch.empty(2, 3, 16, dtype=torch.float64))
        with pytest.raises(ValueError, match="bf16 / fp16 input"):
            norm.float().normalize(x.float(), stat_buffer=torch.empty(2, 3, 16))


@pytest.mark.parametrize("name", ["blocks.1.ln2.hook_normalized", "blocks.1.mlp.hook_pre"])
@pytest.mark.parametrize("kind", ["torch", "transformer_lens"])
def test_a_hook_that_removes_itself_keeps_what_it_saw(name, kind):
    """Whether the tensor after a hook point may be edited in place is decided before the
    hook runs: a one-shot hook that keeps its tensor and removes itself during its own
    call (PyTorch allows it) used to find it edited afterwards (``normalized * w`` /
    ``silu(pre)`` instead of what it was handed)."""
    model = _model("kimi", torch.bfloat16)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 7), generator=torch.Generator().manual_seed(4))
    hook_point = model.hook_dict[name]
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    if kind == "torch":

        def keep_once(module, inputs, output):
            seen.append((output, output.clone()))
            handle.remove()

        handle = hook_point.register_forward_hook(keep_once)
    else:

        def keep_once_tl(tensor, hook):
            seen.append((tensor, tensor.clone()))
            hook.remove_hooks()

        hook_point.add_hook(keep_once_tl)
    with torch.no_grad():
        model(tokens)
    ((kept, copy),) = seen
    assert torch.equal(_bits(kept), _bits(copy))
    assert not hook_point._forward_hooks  # it did remove itself

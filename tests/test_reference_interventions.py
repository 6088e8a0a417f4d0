"""Interventions, patching sweeps and ablation tables against the independent reference
(``reference_attnres.py``) edited by hand (audit 44), in float64 over random tiny
configurations: every layout (kimi, cumulative block / full, full, none) and the
recency / exact wraps of a tiny Qwen3, padded batches, random routers, sources, positions,
values and several interventions composed in one pass. The model's result must be the
reference pass with the same edit written by hand (1e-10; the patching sweeps return
float32), or the model must refuse where the reference has no number."""

from __future__ import annotations

import math
import random
from unittest.mock import patch

import pytest
import torch
from helpers import SMALL_QWEN3, hf_qwen3, randomize_routing, real_diff, rms_norm_in_float64
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference_attnres import Edit, model_reference_forward
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from hooked_attnres import HookedAttnRes
from hooked_attnres.analysis import ablation_effects
from hooked_attnres.interventions import (
    depth_bands,
    mask_sources,
    patch_committed,
    patch_sources,
    set_weights,
)
from hooked_attnres.model.depth import FAMILIES
from hooked_attnres.patching import (
    get_act_patch_committed_blocks_by_pos,
    get_act_patch_depth_state_by_pos,
    get_act_patch_routing_weights_by_pos,
)
from hooked_attnres.tasks.base import TaskBatch

SETTINGS = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
TOL = 1e-10
CONFIGS = [
    ("kimi", "block"),
    ("cumulative", "block"),
    ("cumulative", "full"),
    ("full", "block"),
    ("none", "block"),
    ("wrap", "recency"),
    ("wrap", "exact"),
]


def cases(configs=CONFIGS, max_pos=5, padding=True):
    """``(hf, model, tokens, clean_tokens, mask, rng)``: a float64 tiny Qwen3, the model (a
    wrap of it, or its weights in a native layout with random routing), two token
    batches ``[batch, pos]``, ``None`` or a left / right padding mask, and the
    ``random.Random`` that drew them for the test's own draws. Hypothesis draws the seed
    only: its own draws favour the first choices (none of 30 examples patched a mean
    into a padded batch)."""
    return st.integers(0, 2**32 - 1).map(lambda seed: _case(seed, configs, max_pos, padding))


def _case(seed, configs, max_pos, padding):
    rng = random.Random(seed)
    kind, mode = rng.choice(configs)
    n_layers = rng.randint(1, 3)
    num_blocks = rng.randint(1, n_layers)
    seed = rng.randint(0, 1000)
    hf = hf_qwen3(seed=seed, num_hidden_layers=n_layers, **SMALL_QWEN3).double()
    if kind == "wrap":
        model = HookedAttnRes.from_hf_qwen3(
            hf, wrap=mode, num_blocks=num_blocks, dtype=torch.float64
        )
    else:
        wrapped = HookedAttnRes.from_hf_qwen3(
            hf, wrap="recency", num_blocks=num_blocks, dtype=torch.float64
        )
        bias = rng.choice([None, rng.uniform(-3, 3)])
        cfg = wrapped.cfg.replace(attnres_layout=kind, attnres_mode=mode, attnres_recency_bias=bias)
        model = HookedAttnRes(cfg)
        own = {k: v for k, v in wrapped.state_dict().items() if "_res." not in k}
        model.load_state_dict(own, strict=False)
        randomize_routing(model, seed=seed, scale=rng.choice([0.5, 2.0]))
    batch, n_pos = rng.choice([1, 2, 2, 3]), rng.randint(1, max_pos)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 17, (batch, n_pos), generator=generator)
    clean_tokens = torch.randint(0, 17, (batch, n_pos), generator=generator)
    mask = None
    side = rng.choice([None, "left", "right"] if padding else [None])
    if side is not None:
        pads = torch.tensor([rng.randint(0, n_pos - 1) for _ in range(batch)])
        kept = n_pos - pads
        at = torch.arange(n_pos)[None]
        mask = (at >= pads[:, None] if side == "left" else at < kept[:, None]).long()
    return hf, model.eval(), tokens, clean_tokens, mask, rng


def reference(model, hf, tokens, mask=None, edit=None):
    """The reference's logits of ``model``'s layout (float64 throughout)."""
    with torch.no_grad(), patch.object(Qwen3RMSNorm, "forward", rms_norm_in_float64):
        logits, _ = model_reference_forward(hf, model, tokens, attention_mask=mask, edit=edit)
    return logits


class Recorder(Edit):
    """Records a reference pass: commits, states, each router's sources and weights, and
    the label of each source (by identity with the embedding and the committed blocks;
    the last of several sources is ``current``)."""

    def __init__(self):
        self.seen, self.ids = {}, {}

    def embed(self, embedding):
        self.seen["embedding"], self.ids[id(embedding)] = embedding, "embedding"
        return embedding

    def commit(self, label, block):
        self.seen[label], self.ids[id(block)] = block, label
        return block

    def state(self, sublayer, sources):
        self.seen[("state", sublayer)] = list(sources)
        return sources

    def sources(self, prefix, sources):
        labels = [self.ids[id(s)] for s in sources[:-1]]
        labels.append("current" if len(sources) > 1 else self.ids[id(sources[0])])
        self.seen[(prefix, "labels")], self.seen[(prefix, "sources")] = labels, list(sources)
        return sources

    def weights(self, prefix, weights):
        self.seen[(prefix, "weights")] = weights
        return weights


def reference_families(n: int) -> dict[str, list[int]]:
    """attnres.md: the first source is the embedding, the last (of several) the current
    one, the one before it the previous completed block, the rest older."""
    if n == 1:
        return {"embedding": [0], "older": [], "prev_completed": [], "current": []}
    return {
        "embedding": [0],
        "older": list(range(1, n - 2)),
        "prev_completed": [n - 2] if n > 2 else [],
        "current": [n - 1],
    }


def _at(positions, n_pos) -> torch.Tensor:
    """``[1, pos, 1]`` bool: the positions an edit applies to."""
    chosen = torch.zeros(n_pos, dtype=torch.bool)
    chosen[list(range(n_pos)) if positions is None else [p % n_pos for p in positions]] = True
    return chosen[None, :, None]


def _mean_over_real(x, mask):
    """``x`` ``[batch, pos, d]`` replaced by its mean over the prompts real at each position
    (all prompts where none is)."""
    if mask is None:
        return x.mean(0, keepdim=True).expand_as(x)
    real = mask.bool()[..., None]
    count = real.sum(0, keepdim=True)
    mean = torch.where(real, x, 0).sum(0, keepdim=True) / count.clamp(min=1)
    return torch.where(count > 0, mean, x.mean(0, keepdim=True)).expand_as(x)


class HandEdit(Edit):
    """One intervention written by hand on the reference pass."""

    def __init__(self, kind, prefixes, indices, new, positions, n_pos):
        self.kind, self.prefixes, self.indices = kind, prefixes, indices
        self.new, self.at = new, _at(positions, n_pos)

    def embed(self, embedding):
        if self.kind == "commit" and "embedding" in self.prefixes:
            return torch.where(self.at, self.new("embedding", embedding), embedding)
        return embedding

    def commit(self, label, block):
        if self.kind == "commit" and label in self.prefixes:
            return torch.where(self.at, self.new(label, block), block)
        return block

    def sources(self, prefix, sources):
        if self.kind != "sources" or prefix not in self.prefixes:
            return sources
        out = list(sources)
        for i in self.indices(prefix, len(sources)):
            out[i] = torch.where(self.at, self.new((prefix, i), sources[i]), sources[i])
        return out

    def logits(self, prefix, logits):  # [n, batch, pos]
        if self.kind != "mask" or prefix not in self.prefixes:
            return logits
        where = torch.zeros(logits.shape[0], 1, 1, dtype=torch.bool)
        where[self.indices(prefix, logits.shape[0])] = True
        return logits.masked_fill(where & self.at[..., 0][None], float("-inf"))

    def weights(self, prefix, weights):
        if self.kind != "weights" or prefix not in self.prefixes:
            return weights
        return torch.where(self.at[..., 0][None], self.new(prefix, weights), weights)


class Composed(Edit):
    """Several edits of one pass: each hook of `Edit` passes its value (the last argument)
    through the edits in order. Every public method of `Edit` is chained (defined below
    from `Edit` itself), so none, ``state`` included (audit 186), nor one added to `Edit`
    later, is silently the unedited pass."""

    def __init__(self, edits):
        self.edits = edits


def _chained(method):
    def chain(self, *args):
        value = args[-1]
        for edit in self.edits:
            value = getattr(edit, method)(*args[:-1], value)
        return value

    chain.__name__ = method
    return chain


for _method in [name for name, f in vars(Edit).items() if callable(f) and name[0] != "_"]:
    setattr(Composed, _method, _chained(_method))


def test_composed_chains_every_edit_method():
    """`Composed` passes each hook of `Edit` (every public method, so one added to `Edit`
    later too) through its edits in order (audit 186: it did not define ``state``, so a
    composed edit of the depth state was silently the unedited pass)."""
    methods = [name for name, f in vars(Edit).items() if callable(f) and name[0] != "_"]
    assert "state" in methods and "weights" in methods

    class Tag(Edit):
        def __init__(self, tag):
            self.tag = tag

    for name in methods:
        setattr(Tag, name, lambda self, *args: args[-1] + [self.tag])
    composed = Composed([Tag("a"), Tag("b")])
    for name in methods:
        n_args = getattr(Edit, name).__code__.co_argcount - 1  # the edited value last
        assert getattr(composed, name)(*[None] * (n_args - 1), []) == ["a", "b"], name


def _intervention(rng, model, clean, clean_cache, mask, n_pos):
    """A random intervention: ``(hooks, HandEdit)``."""
    layout = model.routing_layout
    sites = layout.sites()
    kind = rng.choice(["mask", "weights", "sources", "commit"])
    positions = rng.choice(
        [None, [rng.randint(-n_pos, n_pos - 1) for _ in range(rng.randint(1, 2))]]
    )
    chosen = rng.sample(sites, rng.randint(1, min(3, len(sites))))
    prefixes = {site.prefix for site in chosen}
    spec = [rng.choice([*FAMILIES, 0, -1]) for _ in range(rng.randint(1, 3))]

    def indices(prefix, n):
        families = reference_families(n)
        return sorted({i for s in spec for i in (families[s] if isinstance(s, str) else [s % n])})

    generator = torch.Generator().manual_seed(rng.randint(0, 1000))
    d_model, batch = model.cfg.d_model, clean_cache["hook_embed"].shape[0]
    if kind == "mask":
        hooks = mask_sources(model, spec, routers=chosen, positions=positions)
        return hooks, HandEdit(kind, prefixes, indices, None, positions, n_pos)
    if kind == "weights":
        by_site = {}
        for site in chosen:
            drawn = torch.rand(batch, n_pos, layout.n_sources(site), generator=generator)
            by_site[site] = (drawn / drawn.sum(-1, keepdim=True)).double()
        value = rng.choice(["uniform", "dict", "cache"])
        given_value = {"uniform": "uniform", "dict": by_site, "cache": clean_cache}[value]

        def new_weights(prefix, weights):  # [n, batch, pos]
            if value == "uniform":
                return torch.full_like(weights, 1 / len(weights))
            if value == "cache":
                return clean[(prefix, "weights")]
            return next(w for s, w in by_site.items() if s.prefix == prefix).permute(2, 0, 1)

        hooks = set_weights(model, given_value, routers=chosen, positions=positions)
        return hooks, HandEdit(kind, prefixes, None, new_weights, positions, n_pos)
    value = rng.choice(["zero", "mean", "mean", "vector", "tensor", "cache"])
    tensor = torch.randn(batch, n_pos, d_model, generator=generator, dtype=torch.float64)
    given_value = {
        "zero": "zero",
        "mean": "mean",
        "vector": tensor[0, 0],
        "tensor": tensor,
        "cache": clean_cache,
    }[value]

    def new_value(key, current):
        if value == "zero":
            return torch.zeros_like(current)
        if value == "mean":
            return _mean_over_real(current, mask)
        if value in ("vector", "tensor"):
            return given_value.expand_as(current)
        if kind == "commit":
            return clean[key]
        prefix, i = key
        return clean[(prefix, "sources")][i]

    if kind == "sources":
        hooks = patch_sources(model, spec, given_value, routers=chosen, positions=positions)
        return hooks, HandEdit(kind, prefixes, indices, new_value, positions, n_pos)
    # not the cumulative layout's block committed after the last layer, which no router
    # reads (patch_committed refuses it: tests/test_interventions.py)
    committed = sorted(label for label in layout.commit_hooks() if layout.commit_readers(label))
    labels = rng.sample(committed, rng.randint(1, min(2, len(committed))))
    hooks = patch_committed(model, labels, given_value, positions=positions)
    return hooks, HandEdit(kind, set(labels), None, new_value, positions, n_pos)


def _first_sublayer(model, hooks) -> int:
    """The first sublayer whose hooks the list holds (-1 for ``hook_embed``)."""
    first = 2 * model.cfg.n_layers
    for name, _ in hooks:
        if name == "hook_embed":
            return -1
        if name.startswith("final_res"):
            continue
        layer, point = int(name.split(".")[1]), name.split(".")[2]
        first = min(first, 2 * layer + (point in ("mlp_res", "hook_committed_block")))
    return first


@settings(SETTINGS, max_examples=15)
@given(case=cases(configs=CONFIGS[:4] + CONFIGS[5:]))
def test_source_labels_and_families_are_the_references(case):
    """Every router's labels are the reference's sources in reading order (the embedding,
    the blocks by the label they were committed with, ``current``), its families those of
    attnres.md, and the commit hooks name blocks the reference commits."""
    hf, model, tokens, _, _, _ = case
    recorder = Recorder()
    reference(model, hf, tokens, edit=recorder)
    layout = model.routing_layout
    for site in layout.sites():
        labels = recorder.seen[(site.prefix, "labels")]
        assert layout.labels(site) == labels
        assert layout.families(site) == reference_families(len(labels))
    assert set(layout.commit_hooks()) <= {k for k in recorder.seen if isinstance(k, str)}


@settings(SETTINGS, max_examples=40)
@given(case=cases())
def test_composed_interventions_equal_the_hand_edited_reference(case):
    """1-3 random interventions (`mask_sources`, `set_weights`, `patch_sources`,
    `patch_committed`; random routers, sources, positions and values, a clean cache of
    the same padding among them) in one pass, and resumed from a depth state of the
    unedited pass before the first edited sublayer (`forward_from`), equal the reference
    pass with the same edits written by hand. Where the edits leave a router no source,
    the intervention is refused. Layout ``none`` refuses them all."""
    hf, model, tokens, clean_tokens, mask, rng = case
    if not model.routing_layout.has_routers:
        with pytest.raises(ValueError, match="none"):
            mask_sources(model, "embedding")
        return
    recorder = Recorder()
    reference(model, hf, clean_tokens, mask, recorder)
    _, clean_cache = model.run_with_cache(clean_tokens, attention_mask=mask)
    hooks, edits = [], []
    for _ in range(rng.randint(1, 3)):
        try:
            more, edit = _intervention(
                rng, model, recorder.seen, clean_cache, mask, tokens.shape[1]
            )
        except ValueError as error:  # built alone: a mask of every source of a router
            assert "would mask all" in str(error)
            return
        hooks, edits = hooks + more, edits + [edit]
    expected = reference(model, hf, tokens, mask, Composed(edits))
    if torch.isnan(expected).any():  # a router left without any source (softmax of -inf)
        with pytest.raises(ValueError, match="masks every source"):
            model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=hooks)
        return
    got = model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=hooks)
    assert real_diff(got, expected, mask) <= TOL
    start = _first_sublayer(model, hooks)
    if start >= 0:
        states = model.depth_states(tokens, sublayers=True, attention_mask=mask)
        sublayer = rng.randint(0, start)
        with model.hooks(fwd_hooks=hooks):
            resumed = model.forward_from(states[sublayer], sublayer, attention_mask=mask)
        assert real_diff(resumed, expected, mask) <= TOL


class Patch(Edit):
    """One patching cell: a router's weights, a committed block or the depth state
    entering a sublayer, replaced by the clean pass's at one position."""

    def __init__(self, clean, pos, weights=None, label=None, sublayer=None):
        self.clean, self.pos = clean, pos
        self.prefix, self.label, self.sublayer = weights, label, sublayer

    def _patched(self, current, clean, axis):
        index = [slice(None)] * current.ndim
        index[axis] = self.pos
        out = current.clone()
        out[tuple(index)] = clean[tuple(index)]
        return out

    def weights(self, prefix, weights):
        if prefix != self.prefix:
            return weights
        return self._patched(weights, self.clean[(prefix, "weights")], 2)

    def commit(self, label, block):
        return self._patched(block, self.clean[label], 1) if label == self.label else block

    def state(self, sublayer, sources):
        if sublayer != self.sublayer:
            return sources
        clean = self.clean[("state", sublayer)]
        return [self._patched(s, c, 1) for s, c in zip(sources, clean, strict=True)]


def _last_real(mask, batch, n_pos):
    return (
        torch.full((batch,), n_pos - 1) if mask is None else (mask * torch.arange(n_pos)).argmax(-1)
    )


@SETTINGS
@given(case=cases(max_pos=3))
def test_patching_sweeps_equal_the_hand_patched_reference(case):
    """Every cell of `get_act_patch_routing_weights_by_pos` (every router type),
    `get_act_patch_committed_blocks_by_pos` and `get_act_patch_depth_state_by_pos` is the
    metric of the corrupted reference pass with that one value replaced by the clean
    pass's by hand (float32 results: 1e-6 relative), with padding; layers that commit no
    block are NaN, and only they (audit 46: a NaN cell of a committing layer passed)."""
    hf, model, tokens, clean_tokens, mask, rng = case
    batch, n_pos = tokens.shape
    rows, last = torch.arange(batch), _last_real(mask, batch, n_pos)

    def metric(logits):
        return (logits[rows, last, 3] - logits[rows, last, 5]).mean()

    recorder = Recorder()
    reference(model, hf, clean_tokens, mask, recorder)
    _, clean_cache = model.run_with_cache(clean_tokens, attention_mask=mask)
    n_layers, cfg = model.cfg.n_layers, model.cfg
    S = math.ceil(n_layers / cfg.attnres_num_blocks)
    sweep = rng.choice(["weights", "committed", "state"])
    if not model.routing_layout.has_routers:
        sweep = "state"
    cells = {}  # result index -> the edit of that cell
    args = (model, tokens, clean_cache, metric)
    if sweep == "weights":
        routers = tuple(sorted({site.kind for site in model.routing_layout.sites()}))
        result = get_act_patch_routing_weights_by_pos(*args, routers, attention_mask=mask)
        for row, router in enumerate(routers):
            for layer in [0] if router == "final_res" else range(n_layers):
                prefix = "final_res" if router == "final_res" else f"blocks.{layer}.{router}"
                for pos in range(n_pos):
                    cells[(row, layer, pos)] = Patch(recorder.seen, pos, weights=prefix)
    elif sweep == "committed":
        every = cfg.attnres_layout == "full" or cfg.attnres_mode == "full"
        sublayer = rng.choice(["attn", "mlp"]) if every else "mlp"
        # the cumulative layout's block after the last layer is read by no router: NaN
        unread = cfg.attnres_layout == "cumulative" and sublayer == "mlp"
        commits = [
            layer
            for layer in range(n_layers)
            if (every or (layer + 1) % S == 0) and not (unread and layer == n_layers - 1)
        ]
        if not commits:
            with pytest.raises(ValueError, match="after the last layer: no router reads it"):
                get_act_patch_committed_blocks_by_pos(*args, sublayer, attention_mask=mask)
            return
        result = get_act_patch_committed_blocks_by_pos(*args, sublayer, attention_mask=mask)
        for layer in range(n_layers):
            if layer not in commits:
                assert result[layer].isnan().all()
                continue
            label = f"{sublayer}_{layer}" if every else f"block_{(layer + 1) // S}"
            for pos in range(n_pos):
                cells[(layer, pos)] = Patch(recorder.seen, pos, label=label)
    else:
        sublayer = rng.choice(["attn", "mlp"])
        result = get_act_patch_depth_state_by_pos(*args, sublayer, attention_mask=mask)
        for layer in range(n_layers):
            for pos in range(n_pos):
                index = 2 * layer + (sublayer == "mlp")
                cells[(layer, pos)] = Patch(recorder.seen, pos, sublayer=index)
    for index, edit in cells.items():  # the cells that have a number (NaN fails below)
        expected = metric(reference(model, hf, tokens, mask, edit)).item()
        got = result[index].item()
        assert abs(got - expected) <= 1e-6 * max(1.0, abs(expected)), (index, got, expected)


@SETTINGS
@given(case=cases(configs=CONFIGS[:4] + CONFIGS[5:], padding=False))
def test_ablation_effects_equal_the_hand_masked_reference(case):
    """Every row of `ablation_effects` (fast and slow sweeps, every group kind, families
    and labels): ``clean``, ``ablated`` and ``effect`` are the means over the prompts of
    the reference passes with that family's logits set to -inf by hand at the group's
    routers of that type (left alone where the family is every source)."""
    hf, model, tokens, _, _, rng = case
    batch, n_pos = tokens.shape
    answer_pos = torch.tensor([rng.randint(0, n_pos - 1) for _ in range(batch)])
    answer = (tokens[:, 0] + 1) % 17
    contrast = (answer + 3) % 17
    task = TaskBatch(
        tokens=tokens,
        answer_pos=answer_pos,
        answer=answer,
        contrast=contrast,
        corrupted_tokens=tokens.flip(0),
        targets=torch.full_like(tokens, -100),
    )
    rows = torch.arange(batch)

    def metrics(logits):
        read = logits[rows, answer_pos]
        return {
            "logit_diff": read[rows, answer] - read[rows, contrast],
            "logprob": read.log_softmax(-1)[rows, answer],
        }

    layout = model.routing_layout
    labels = sorted({label for site in layout.sites() for label in layout.labels(site)})
    families = rng.sample(sorted({*FAMILIES, *labels}), rng.randint(1, 2))
    routers = tuple(sorted({site.kind for site in model.routing_layout.sites()}))
    groups = rng.choice(["all", "layers", "bands"])
    table = ablation_effects(
        model,
        task,
        families=families,
        routers=routers,
        groups=groups,
        metrics=("logit_diff", "logprob"),
        n_bootstrap=40,
        fast=rng.random() < 0.75,
        progress=False,
    )
    n_layers = model.cfg.n_layers
    layers_of = {"all": {"all": list(range(n_layers))}, "layers": None, "bands": None}[groups]
    if groups == "layers":
        layers_of = {f"layer {layer}": [layer] for layer in range(n_layers)}
    elif groups == "bands":
        layers_of = depth_bands(n_layers)
    clean = metrics(reference(model, hf, tokens))
    recorder = Recorder()
    reference(model, hf, tokens, edit=recorder)

    def indices(prefix, n):
        family = row.family
        if family in FAMILIES:
            chosen = reference_families(n)[family]
        else:
            found = recorder.seen[(prefix, "labels")]
            chosen = [found.index(family)] if family in found else []
        return [] if len(chosen) == n else chosen  # every source: left alone

    passes = {}  # (router, group, family) -> metrics of the reference pass
    for _, row in table.iterrows():
        if row.router == "final_res":
            prefixes = {"final_res"}
        else:
            prefixes = {f"blocks.{layer}.{row.router}" for layer in layers_of[row.group]}
        key = (row.router, row.group, row.family)
        if key not in passes:
            edit = HandEdit("mask", prefixes, indices, None, None, n_pos)
            passes[key] = metrics(reference(model, hf, tokens, edit=edit))
        ablated = passes[key][row.metric]
        base = clean[row.metric]
        assert abs(row.clean - base.mean().item()) <= TOL
        assert abs(row.ablated - ablated.mean().item()) <= TOL
        assert abs(row.effect - (ablated - base).mean().item()) <= TOL

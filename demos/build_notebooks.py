"""Write the demo notebooks (unexecuted) from the cell sources below.

    python demos/build_notebooks.py

The notebooks run offline on the checkpoints shipped in ``hooked_attnres/data``;
``tests/test_demos.py`` executes every one of them.
"""

from __future__ import annotations

from pathlib import Path

import nbformat

HERE = Path(__file__).parent


def md(text: str):
    return nbformat.v4.new_markdown_cell(text.strip())


def code(text: str):
    return nbformat.v4.new_code_cell(text.strip())


ROUTING = [
    md("""
# Reading and steering depth routing

A Block AttnRes model replaces each residual addition with a softmax over depth sources
(the embedding, completed blocks, the current stream). `HookedAttnRes` exposes every
routing logit, weight and source as a TransformerLens `HookPoint`. This notebook uses the
AttnRes checkpoint shipped with the package (8 layers, 4 blocks, trained on key-value
retrieval) and runs offline in seconds.
"""),
    code("""
import torch
from hooked_attnres import HookedAttnRes
from hooked_attnres.study import checkpoint_dir, study_task

model = HookedAttnRes.from_pretrained(checkpoint_dir("attnres")).eval()
task = study_task()
batch = task.sample(64, seed=1, split="test", vocab=model.tokenizer.get_vocab())
print(model.to_string(batch.tokens[0]), "->", model.to_string(batch.answer[:1]))
print("accuracy:", batch.accuracy(model(batch.tokens)))
"""),
    md("## The cache is TransformerLens's own `ActivationCache`"),
    code("""
logits, cache = model.run_with_cache(batch.tokens)
print(type(cache))
layer = 5
print(model.source_labels(layer, "attn_res"))
print(model.source_families(layer, "attn_res"))
print(cache["weights", layer, "attn_res"].shape)   # [batch, pos, n_sources]
print(cache["blocks.5.attn_res.hook_sources"].shape)  # [batch, pos, n_sources, d_model]
"""),
    md("## Routing weights at the answer position, layer by source"),
    code("""
from hooked_attnres import plotting
plotting.source_heatmap(model, cache, router="mlp_res", positions=-1)
"""),
    md("""
## Interventions are lists of `(hook_name, hook_fn)`

Mask-and-renormalise the embedding source of the early MLP routers and watch the
answer's logit difference.
"""),
    code("""
from hooked_attnres.interventions import mask_sources, set_weights

hooks = mask_sources(model, "embedding", routers="mlp_res", layers="early")
print([name for name, _ in hooks])
ablated = model.run_with_hooks(batch.tokens, fwd_hooks=hooks)
print("logit diff clean  :", batch.logit_diff(logits).mean().item())
print("logit diff ablated:", batch.logit_diff(ablated).mean().item())
uniform = model.run_with_hooks(batch.tokens, fwd_hooks=set_weights(model, "uniform"))
print("logit diff, uniform routing everywhere:", batch.logit_diff(uniform).mean().item())
"""),
    md("## TransformerLens's patching functions run unchanged"),
    code("""
import transformer_lens.patching as tl_patching

def metric(patched_logits):
    return batch.logit_diff(patched_logits).mean()

_, clean_cache = model.run_with_cache(batch.tokens[:8])
resid = tl_patching.get_act_patch_resid_pre(model, batch.corrupted_tokens[:8], clean_cache,
                                            lambda l: batch[:8].logit_diff(l).mean())
print(resid.shape)  # [n_layers, pos]
"""),
]

STUDY = [
    md("""
# Routing mass versus causal effect

The seed paper's study: summarise routing mass by source family, ablate each family per
router type and depth band, and compare. Two conditions trained here on the same task:
a Block AttnRes Qwen3 and a vanilla Qwen3 loaded through the recency wrap (routing fixed
by an analytic schedule). Intervals are 95 % bootstrap intervals over prompts.
"""),
    code("""
from hooked_attnres.study import load_condition, probe_prompts
from hooked_attnres.analysis import (routing_mass, summarize_mass, ablation_effects,
                                     dissociation_report, recency_schedule, schedule_comparison)
from hooked_attnres import plotting

model = load_condition("attnres")
batch = probe_prompts(model, n_prompts=128)
mass = routing_mass(model, batch, positions="answer")       # tidy, one row per prompt/router/family
summary = summarize_mass(mass, by=("router", "family"), n_bootstrap=500)
summary
"""),
    code("""
groups = {"early": [0, 1, 2], "middle": [3, 4, 5], "late": [6, 7], "all": list(range(8))}
effects = ablation_effects(model, batch, groups=groups, n_bootstrap=500, progress=False)
effects[(effects.metric == "logit_diff") & (effects.group == "all")]
"""),
    code("""
dissociation_report(summary, effects)
"""),
    code("""
plotting.mass_effect_bars(summary, effects)
"""),
    code("""
plotting.effect_bands(effects)
"""),
    md("## The wrapped baseline routes exactly as the analytic schedule predicts"),
    code("""
wrapped = load_condition("vanilla")
wrapped_mass = routing_mass(wrapped, batch)
comparison = schedule_comparison(wrapped_mass, recency_schedule(8, 4, 3.0))
print("largest deviation:", comparison.max_abs_deviation.max())
comparison.head(8)
"""),
    md("""
## The whole study, both conditions, in one call

`run_study` writes CSV tables, a Markdown report and HTML plots (here to a temporary
directory); `hooked-attnres study --out study_out` does the same from the shell, and
`--checkpoints runs/` runs it over every trained seed.
"""),
    code("""
import tempfile
from hooked_attnres.study import run_study

result = run_study(tempfile.mkdtemp(), n_prompts=128, n_bootstrap=300, progress=False, plots=False)
print((result.out_dir / "report.md").read_text()[:1500])
"""),
]

PATCHING = [
    md("""
# Activation patching of routing

Patching functions with TransformerLens's conventions:
`(model, corrupted_tokens, clean_cache, patching_metric)`. Clean prompts query one key,
corrupted prompts another key of the same context; the metric is the clean answer's logit
difference, normalised so 0 is the corrupted run and 1 the clean run.
"""),
    code("""
import torch
from hooked_attnres.study import load_condition, probe_prompts
from hooked_attnres.patching import (get_act_patch_routing_weights,
                                     get_act_patch_routing_weights_by_pos,
                                     get_act_patch_committed_blocks_by_pos)

model = load_condition("attnres")
batch = probe_prompts(model, n_prompts=32)
clean_logits, clean_cache = model.run_with_cache(batch.tokens)
corrupted_logits = model(batch.corrupted_tokens)
clean_ld = batch.logit_diff(clean_logits).mean()
corrupted_ld = batch.logit_diff(corrupted_logits).mean()

def metric(logits):
    return (batch.logit_diff(logits).mean() - corrupted_ld) / (clean_ld - corrupted_ld)

print(f"clean {clean_ld:.2f}, corrupted {corrupted_ld:.2f}")
"""),
    code("""
by_layer = get_act_patch_routing_weights(model, batch.corrupted_tokens, clean_cache, metric)
print(by_layer.shape)   # [router (attn_res, mlp_res), layer]
by_layer
"""),
    code("""
import plotly.express as px
blocks = get_act_patch_committed_blocks_by_pos(model, batch.corrupted_tokens, clean_cache, metric)
print(blocks.shape)     # [layer, pos]; layers that commit no block are NaN
px.imshow(blocks.numpy(), labels=dict(x="position", y="layer", color="metric"),
          color_continuous_scale="RdBu", zmin=-1, zmax=1)
"""),
    code("""
by_pos = get_act_patch_routing_weights_by_pos(model, batch.corrupted_tokens, clean_cache, metric)
print(by_pos.shape)     # [router, layer, pos]
px.imshow(by_pos[0].numpy(), labels=dict(x="position", y="layer", color="metric"),
          title="attention routers", color_continuous_scale="RdBu", zmin=-1, zmax=1)
"""),
]

NOTEBOOKS = {
    "01_routing_hooks.ipynb": ROUTING,
    "02_mass_vs_effect.ipynb": STUDY,
    "03_patching.ipynb": PATCHING,
}


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        notebook = nbformat.v4.new_notebook(cells=cells)
        notebook.metadata["kernelspec"] = {
            "name": "python3",
            "display_name": "Python 3",
            "language": "python",
        }
        nbformat.write(notebook, HERE / name)
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()

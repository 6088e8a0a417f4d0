"""Write the demo notebooks (unexecuted) from the cell sources below.

    python demos/build_notebooks.py

The notebooks run offline on the checkpoints shipped in ``hooked_attnres/data``;
``tests/test_demos.py`` executes every one of them. Each starts with what it will show
and ends with what it showed, in sentences computed from its own outputs.
"""

from __future__ import annotations

from pathlib import Path

import nbformat

from hooked_attnres.analysis.motifs import claim_text

HERE = Path(__file__).parent
# the shipped Block AttnRes condition the single-model notebooks use (docs/study.md)
MAIN = "hard_cumulative_L8"


# docs/study.md's pre-registered criteria and amendment 1, quoted word for word by the
# routing and the motifs notebooks (tests/test_demos.py pins the quotes to the page)
CRITERIA = """> A motif `(f, r, band)` is *present* in a seed when all three hold:
>
> 1. harmful: `ci_high < 0` for `effect(f, r, band)` (the 95 % interval excludes 0);
> 2. large: `harm >= 0.05 * clean`, or the accuracy effect of the same ablation is at most
>    -0.02 (2 points);
> 3. localised: `band` is the band where family `f` at router type `r` does the most harm
>    (largest `harm` of `early`, `middle`, `late`; a tie counts as localised).
"""
AMENDMENT_1 = """\
> Since commit 269bd17 (2026-11-28 23:18) `motif_report` applies the 5 % test only when
> `clean > 0` (otherwise only the 2-point accuracy test can make an effect large).
"""


def md(text: str):
    return nbformat.v4.new_markdown_cell(text.strip())


def code(text: str):
    return nbformat.v4.new_code_cell(text.strip())


# the first lines of every notebook: no progress bars and no warning about them (it was the
# first output of every notebook), at most 2 torch threads
PREAMBLE = """
import os
import warnings
os.environ.setdefault("TQDM_DISABLE", "1")  # no text progress bars in the notebook
# tqdm's notebook bars need ipywidgets: without it, importing tqdm.auto (the library and
# TransformerLens do) warns "IProgress not found. Please update jupyter and ipywidgets"
warnings.filterwarnings("ignore", message="IProgress not found")
import torch
torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
""".strip()

SETUP = code(f"""
{PREAMBLE}
from hooked_attnres.study import load_condition, probe_prompts, get_condition

CONDITION = "{MAIN}"        # a shipped Block AttnRes checkpoint (hooked-attnres list)
SEED = 0                    # its model seed
model = load_condition(CONDITION, seed=SEED)
task = get_condition(CONDITION).task
batch = probe_prompts(model, n_prompts=256, task=task)  # the study's held-out prompts
print(batch.tokens.shape, batch.answer.shape)   # [batch, pos], [batch]
print(model.to_string(batch.tokens[0]), "->", model.to_string(batch.answer[0]))
""")

# the intervention cell of the routing notebook (tests/test_demos.py runs it against
# `ablation_effects`): effects per prompt, with their bootstrap interval
INTERVENTION = """
from hooked_attnres.analysis import bootstrap_ci
from hooked_attnres.analysis.motifs import printed_beside
from hooked_attnres.interventions import Ablation, set_weights

ablation = Ablation.compile(model, "embedding", routers="mlp_res", layers="early")
print([str(s) for s in ablation.sites], "start at sublayer", ablation.start_sublayer)
clean_ld = batch.logit_diff(logits)                                           # [batch]
masked_ld = batch.logit_diff(model.run_with_hooks(batch.tokens, fwd_hooks=ablation.hooks()))
uniform_ld = batch.logit_diff(
    model.run_with_hooks(batch.tokens, fwd_hooks=set_weights(model, "uniform")))
masked_effect = bootstrap_ci(masked_ld - clean_ld)     # (mean, low, high), 95 %, over prompts
uniform_effect = bootstrap_ci(uniform_ld - clean_ld)

def effect_text(effect):   # each bound with the digits that put it on its side of 0
    mean, low, high = effect
    low, high = (printed_beside(bound, 0.0, 2, "+f") for bound in (low, high))
    return f"{mean:+.2f} [{low}, {high}] logits"

print(f"clean logit difference {clean_ld.mean():.2f} ({len(batch)} prompts); change when the "
      f"embedding is masked in the early MLP routers {effect_text(masked_effect)}, with "
      f"uniform weights in every attention and MLP router {effect_text(uniform_effect)} "
      "(95 % bootstrap intervals over the prompts)")
"""

# the M1 verdict of the routing notebook's model (tests/test_demos.py runs it): the study's
# own tables for this one model and `motif_report`, never a verdict by eye
M1_VERDICT = """
from hooked_attnres.analysis import motif_report, motif_verdicts
from hooked_attnres.study import study_condition

# the study's tables of this one model: the routing mass and the ablation sweep of every
# family at every router type and depth band, 95 % bootstrap intervals over the prompts
tables = study_condition(model, batch, n_bootstrap=1000, progress=False)
motifs = motif_report(tables["mass_summary"], tables["effects"]).set_index("claim")
m1 = motifs.loc["M1"]
unmet = [name for name, met in (("1 (harmful)", m1.harmful), ("2 (large)", m1.large),
                                ("3 (localised)", m1.localised)) if not met]
m1_text = ("present: criteria 1-3 hold" if m1.present else
           f"absent: criteri{'on' if len(unmet) == 1 else 'a'} {' and '.join(unmet)} not met")
print(f"M1 by the criteria of docs/study.md: {m1_text}")
# the report's sentence, its clause named by the model's seed as in the shipped report
verdicts = motif_verdicts(motifs.reset_index().assign(seed=SEED)).set_index("claim")
print(verdicts.loc["M1"].sentence)
"""

# the routing notebook's mass-versus-effect cell (tests/test_demos.py runs it): the seed
# paper's question on this model, and the verdict of every claim, not only M1's
MASS_EFFECT = """
from hooked_attnres import plotting

# mass of each family over every router of a type (band all) beside the effect of masking it
# at all of them (group all); whiskers: 95 % bootstrap intervals over the prompts
display(plotting.mass_effect_bars(tables["mass_summary"], tables["effects"],
                                  title=f"{CONDITION} seed {SEED}: routing mass vs effect"))
held = motifs.index[motifs.present].tolist()          # claims present on this model
not_held = motifs.index[~motifs.present].tolist()
for claim in verdicts.index.drop("M1"):               # M1's sentence is printed above
    print(verdicts.loc[claim].sentence)
"""

ROUTING = [
    md(f"""
# Reading and steering depth routing

**What this notebook shows.** A Block AttnRes model replaces each residual addition with a
softmax over depth sources (the embedding, completed blocks, the current stream).
`HookedAttnRes` exposes every routing logit, weight and source as a TransformerLens
`HookPoint`. On the shipped `{MAIN}` checkpoint (seed 0) we read the routing weights from
TransformerLens's own `ActivationCache`, name every router by its `RouterSite`, ablate a
source family with a hook list (the study's M1 ablation, then decided by its pre-registered
criteria), weigh each source family's routing mass against its causal effect, look through
the routing lens, and run TransformerLens's `generate`. Everything runs offline in under a
minute, the kernel's start included: 15 s on one torch thread of a quiet machine, 42 s on 2
CPU cores shared with other jobs (the study's tables for the verdicts, one ablation sweep: 4 s
and 16 s of it). The last cell states what we found.
"""),
    SETUP,
    md("## The cache is TransformerLens's own `ActivationCache`"),
    code("""
from transformer_lens import ActivationCache

logits, cache = model.run_with_cache(batch.tokens)
print(isinstance(cache, ActivationCache), "accuracy:", batch.accuracy(logits))
site = model.site(5, "attn_res")             # the router vocabulary: RouterSite
print(site, "|", site.hook("weights"), "| feeds sublayer", site.sublayer)
print(model.source_labels(site))
print(model.source_families(site))
print(cache[site.hook("weights")].shape)       # [batch, pos, n_sources]
"""),
    md("## Routing weights at the last position (where the answer is read), mean over prompts"),
    code("""
from hooked_attnres import plotting

plotting.source_heatmap(model, cache, router="mlp_res", positions=-1)
"""),
    md("""
## Interventions are lists of `(hook_name, hook_fn)`

Mask-and-renormalise the embedding source of the early MLP routers (`Ablation`, the one
compiler behind `mask_sources` and the ablation sweep; the study's M1 ablation), then
replace the weights of every attention and MLP router by uniform ones. Each effect is the
mean per-prompt change of the logit difference with its 95 % bootstrap interval over the
prompts (the numbers `ablation_effects` gives; on these 256 prompts, the study's).
"""),
    code(INTERVENTION),
    md(f"""
## Is that the seed paper's M1 motif? The pre-registered criteria decide

M1 is the motif `(embedding, MLP routers, early)`; the criteria, quoted from
`docs/study.md`:

{CRITERIA}
{AMENDMENT_1}
The study's own tables for this model (`study_condition`, `motif_report`) decide it:
"""),
    code(M1_VERDICT),
    md("""
## Mass versus effect, and the seed paper's other claims on this model

The seed paper's question: is the family with the most routing mass the one whose masking
does the most harm? The same tables decide every pre-registered claim (M1-M3, D1-D3) on
this model; the figure and the sentences are computed from them, so they hold for any
`CONDITION` and `SEED` you set above (one seed decides nothing across seeds: the shipped
report gives every seed).
"""),
    code(MASS_EFFECT),
    md("""
## The routing lens

What the final readout would say from the sources that exist entering each layer; exact at
the last state, `final_post` (after the last layer: equal to the logits), in every layout.
"""),
    code("""
from hooked_attnres.analysis import routing_lens

lens = routing_lens(model, batch.tokens, positions=-1)
print(lens.logits.shape)   # [n_states, batch, d_vocab] (one position)
ranks = [(lens.logits[i].argsort(-1, descending=True) == batch.answer[:, None]).float().argmax(-1)
         for i in range(len(lens.labels))]   # per prompt, 0 = the answer is ranked first
for label, rank in zip(lens.labels, ranks):
    print(f"{label:>10s}: mean rank of the answer (0 = top) {rank.float().mean():5.1f}, "
          f"ranked first in {(rank == 0).float().mean():4.0%} of the prompts")
exact_last = torch.allclose(lens.logits[-1], logits[:, -1], atol=1e-4)
print("last state equals the logits:", exact_last)
first_correct = next(((label, (rank == 0).float().mean().item())
                      for label, rank in zip(lens.labels, ranks)
                      if (rank == 0).float().mean() > 0.5), None)
"""),
    md("## TransformerLens's `generate`, with a key-value cache"),
    code("""
prompt = model.to_string(batch.tokens[0])
completion = model.generate(prompt, max_new_tokens=1, do_sample=False, prepend_bos=False,
                            verbose=False)
print(completion)
"""),
    md("## What this notebook showed"),
    code("""
print(f"On {CONDITION} seed {SEED} ({len(batch)} held-out prompts, accuracy "
      f"{batch.accuracy(logits):.0%}, clean logit difference {clean_ld.mean():.2f}): "
      f"masking the embedding in the early MLP routers changes the logit difference by "
      f"{effect_text(masked_effect)} (95 % bootstrap interval over the prompts), so the "
      f"seed paper's M1 motif is {m1_text} (docs/study.md); uniform "
      f"weights in every attention and MLP router change it by {effect_text(uniform_effect)}. "
      f"Of the pre-registered claims, this model shows {', '.join(held) or 'none'} and not "
      f"{', '.join(not_held) or 'none'} (its verdicts above). "
      + (f"The routing lens first ranks the answer on top for most prompts at {first_correct[0]} "
         f"({first_correct[1]:.0%} of them)" if first_correct else
         "The routing lens ranks the answer on top for most prompts at no state")
      + f", and {'equals' if exact_last else 'does NOT equal'} the logits at the last state.")
"""),
]

# the last cell of the motifs notebook (tests/test_demos.py runs it on a synthetic study):
# the report's verdict table and its verdict sentences, in the pre-registered words
# (replicated, majority, minority, absent; single seed), written once in
# hooked_attnres.study.report
# the accuracy cell of the motifs notebook: the report's table, each row naming the model it
# scored (a vanilla condition's is its checkpoint through the recency wrap)
ACCURACY = """
import pandas as pd
from hooked_attnres.study import accuracy_table

# a vanilla condition's rows score its checkpoint through the recency wrap, the model every
# number of this notebook is measured on, not the plain Qwen3 (docs/loading.md)
with pd.option_context("display.max_colwidth", None):   # the model column in full
    display(accuracy_table(result))
"""

SUMMARY = """
from hooked_attnres.study import verdict_matrix, verdict_sentences

display(verdict_matrix(result.verdicts))   # k/n seeds and the word, per condition and claim
for sentence in verdict_sentences(result):
    print(f"* {sentence}")
"""


def both_routers(claim: str) -> str:
    """A dissociation decided per router type, in the report's words (`claim_text`)."""
    text = claim_text(f"{claim}-attn_res").split(": ", 1)[1]
    assert text == claim_text(f"{claim}-mlp_res").split(": ", 1)[1]
    return f"{text} (attention routers, MLP routers)"


MOTIFS = [
    md("""
# The seed paper's routing motifs and its mass-versus-effect dissociation

**What this notebook shows.** For every shipped condition and every seed: whether each of
the seed paper's claims holds, decided by the criteria pre-registered in `docs/study.md`
with its dated amendments 1-4 (`hooked_attnres.analysis.motif_report`), never by eye; each
criterion is quoted below, word for word, above its figures. For each motif (M1-M3) and each
dissociation (D1-D3): one figure with every seed side by side and the wrapped vanilla
baseline beside the Block AttnRes conditions, and one sentence generated from the numbers
with "k of n seeds". Effects are in percent of each model's clean logit difference, or in
logits for a task where some model's clean difference is under 1 logit (the figure titles
say which). Every whisker, on an effect or on a routing mass, is a 95 % percentile-bootstrap
interval over the held-out prompts (the prompts of each model are resampled). The last cell
states the verdicts in the words of the shipped report
(`hooked_attnres.study.verdict_sentences`). The first code cell studies all 17 shipped models
on 256 prompts each, without a progress bar: 1 to 4 minutes (66 s and 68 s on one torch
thread of a quiet machine; 190 s and 212 s on 2 CPU cores shared with other jobs); every cell
after it takes well under a second.
"""),
    code(f"""
{PREAMBLE}
import tempfile
from IPython.display import Markdown, display
from hooked_attnres.study import available, get_condition, run_study

shipped = available()                       # {{condition: [seeds]}} of the shipped checkpoints
print(shipped)
# the study's 256 prompts; the test suite runs this notebook on fewer
# (HOOKED_ATTNRES_DEMO_PROMPTS) to stay fast, and its verdicts are then not the report's
n_prompts = int(os.environ.get("HOOKED_ATTNRES_DEMO_PROMPTS", 256))
result = run_study(tempfile.mkdtemp(), n_prompts=n_prompts, n_bootstrap=1000, progress=False,
                   robustness=False)         # every shipped condition and seed
"""),
    code(ACCURACY),
    code("""
def claim(names, task, figure):
    \"\"\"The figure of one or more claims (names separated by spaces) for one task and
    the generated sentences of that task's conditions.\"\"\"
    display(result.figures[figure])
    verdicts = result.verdicts
    on_task = verdicts.condition.map(lambda c: get_condition(c).task == task)
    rows = verdicts[verdicts.claim.isin(names.split()) & on_task]
    display(Markdown("\\n".join(f"* **{r.condition}**: {r.sentence}" for r in rows.itertuples())))

tasks = sorted({name.split("_M")[0] for name in result.figures if "_M1" in name})
print("tasks:", tasks)
"""),
    md(f"""
## The pre-registered criteria (quoted from `docs/study.md`)

> Notation: `effect(f, r, g)` is the mean change of the logit difference when family `f` is
> masked (mask-and-renormalise) at the routers of type `r` in group `g`; `harm = -effect`;
> `clean` is the mean clean logit difference; `mass(f, r)` is the mean routing mass of
> family `f` over every router of type `r` (band `all`).

{CRITERIA}
Amendment 1:

{AMENDMENT_1}
Across seeds, with amendment 3:

> Each claim is reported as "present in k of n seeds" and summarised as *replicated*
> (k = n), *majority* (n/2 < k < n), *minority* (0 < k <= n/2) or *absent* (k = 0).

> With one seed, "present in 1 of 1 seed" was worded *replicated* (k = n); one seed
> replicates nothing, so it now reads *single seed*

The per-seed sentences below give the logit-difference effect, and the accuracy effect
too where it meets criterion 2's 2-point test (whether or not the 5 % test is met as well;
`result.motifs` has every number).
"""),
    md(f"## M1: {claim_text('M1')}"),
    code("""
for task in tasks:
    claim("M1", task, f"{task}_M1")
"""),
    md(f"""
## M2: {claim_text("M2")}

M2 holds in a seed when it holds at the attention routers (M2-attn) and at the MLP routers
(M2-mlp); each is also reported alone. Read it beside the recency-wrapped vanilla baselines,
whose routing is the fixed analytic schedule (the last cell checks it); `docs/study.md` on
the wrapped baselines of the `paperlike` runs:

> with the wrap's fixed schedule `current` is nearly all of the input, so M2 alone does not
> separate learned routing from a residual stream.
"""),
    code("""
for task in tasks:
    claim("M2 M2-attn M2-mlp", task, f"{task}_M2")
"""),
    md(f"## M3: {claim_text('M3')}"),
    code("""
for task in tasks:
    claim("M3", task, f"{task}_M3")
"""),
    md(f"""
## D1: {both_routers("D1")}

> **D1**, per router type: the top-mass family (largest `mass(f, r)`) is not the top-effect
> family (largest `harm`), and their effect intervals are separated (the top-effect
> family's `ci_high` is below the top-mass family's `ci_low`).

Amendment 4 (ties):

> every tied family must satisfy D1: no family is on top of both rankings, and every
> top-effect family's `ci_high` is below every top-mass family's `ci_low`
"""),
    code("""
for task in tasks:
    claim("D1-attn_res", task, f"{task}_mass_effect_attn_res")
    claim("D1-mlp_res", task, f"{task}_mass_effect_mlp_res")
"""),
    md(f"""
## D2: {claim_text("D2")}

> **D2**, MLP routers: `mass(embedding) < 0.5 * mass(current)`, and `harm(embedding) >=
> 2 * max(harm(current), 0)` with the embedding effect's interval excluding 0
> (`ci_high < 0`; without that, "twice an effect of about zero" would be met by noise).
"""),
    code("""
for task in tasks:
    claim("D2", task, f"{task}_mass_effect_mlp_res")
"""),
    md(f"""
## D3: {both_routers("D3")}

> **D3**, per router type: `mass(prev_completed) >= 0.10`, and its effect interval
> contains 0 or `|effect(prev_completed)| < 0.10 * harm(top-effect family)`.

So D3 can hold with an effect whose interval excludes 0, when that effect is under a tenth
of the top family's harm.
"""),
    code("""
for task in tasks:
    claim("D3-attn_res", task, f"{task}_mass_effect_attn_res")
    claim("D3-mlp_res", task, f"{task}_mass_effect_mlp_res")
"""),
    md("## What this notebook showed"),
    code(SUMMARY),
]

PATCHING = [
    md(f"""
# Activation patching and attribution of routing

**What this notebook shows.** Patching with TransformerLens's conventions
`(model, corrupted_tokens, clean_cache, patching_metric)` on the shipped `{MAIN}`
checkpoint: clean prompts query one key, corrupted prompts another key of the same
context; the metric is the clean answer's logit difference, normalised so 0 is the
corrupted run and 1 the clean run. We patch routing weights, whole depth states (the
routed-layout replacement for `resid_pre` patching) and committed blocks, then estimate
every ablation at once by attribution, verify the largest estimates exactly and compare
every estimate with the exact sweep. Everything runs offline in about 12 s (one torch
thread of a quiet machine, the kernel's start included). The last cell states what we found.
"""),
    SETUP,
    code("""
from hooked_attnres import plotting
from hooked_attnres.patching import (get_act_patch_committed_blocks_by_pos,
                                     get_act_patch_depth_state_by_pos,
                                     get_act_patch_routing_weights)

# 32 prompts for the patching, 128 for the attribution below; the test suite runs this
# notebook on fewer (HOOKED_ATTNRES_DEMO_PROMPTS) to stay fast
n_prompts = int(os.environ.get("HOOKED_ATTNRES_DEMO_PROMPTS", 128))
batch = batch[: min(32, n_prompts)]
clean_logits, clean_cache = model.run_with_cache(batch.tokens)
clean_ld = batch.logit_diff(clean_logits).mean()
corrupted_ld = batch.logit_diff(model(batch.corrupted_tokens)).mean()

def metric(logits):
    return (batch.logit_diff(logits).mean() - corrupted_ld) / (clean_ld - corrupted_ld)

differ = (batch.tokens != batch.corrupted_tokens).any(0).nonzero().flatten().tolist()
# the columns are positions, each the mean over every prompt; their tick labels are prompt
# 0's tokens, which the other prompts share at few positions (their keys and values differ)
POSITION_AXIS = "position (labelled with prompt 0's tokens; values: mean over the prompts)"
print(f"clean {clean_ld:.2f}, corrupted {corrupted_ld:.2f}; "
      f"clean and corrupted prompts differ at position(s) {differ}")
"""),
    code("""
weights = get_act_patch_routing_weights(model, batch.corrupted_tokens, clean_cache, metric)
print(weights.shape)   # [router (attn_res, mlp_res), layer]
plotting.patching_heatmap(weights, ["attention routers", "MLP routers"],
                          [f"layer {l}" for l in range(model.cfg.n_layers)],
                          title="Clean routing weights patched into the corrupted run",
                          x_title="layer", y_title="router")
"""),
    code("""
state = get_act_patch_depth_state_by_pos(model, batch.corrupted_tokens, clean_cache, metric)
print(state.shape)     # [layer, pos]
plotting.patching_heatmap(state, [f"layer {l}" for l in range(model.cfg.n_layers)],
                          model.to_str_tokens(batch.tokens[0]),
                          title="The whole clean depth state entering each layer, one position",
                          x_title=POSITION_AXIS)
"""),
    code("""
blocks = get_act_patch_committed_blocks_by_pos(model, batch.corrupted_tokens, clean_cache, metric)
print(blocks.shape)    # [layer, pos], NaN where the layer commits no block a router reads
plotting.patching_heatmap(blocks, [f"layer {l}" for l in range(model.cfg.n_layers)],
                          model.to_str_tokens(batch.tokens[0]),
                          title="Committed blocks patched at one position "
                                "(blank: no block, or the last one, which no router reads)",
                          x_title=POSITION_AXIS)
"""),
    md("""
## Attribution: every ablation in about two forward passes, then the exact check

`attribute_routing` estimates the effect of masking each family at each router type and
layer from one forward and one backward pass (`method="norm"`: the gradient after the
sublayer's RMSNorm times the exact change of its normalised input; `"linear"` stops at the
routing weights); `verify_top` runs the exact ablation for the cells with the largest
estimates. A first-order estimate can miss an all-or-nothing ablation entirely
(`docs/analysis.md`, "Where the linear estimate fails"), so we also run the exact sweep of
all cells (`ablation_effects`, 64 exact ablations: about 3 s here) and compare.
"""),
    code("""
from hooked_attnres.analysis import ablation_effects, attribute_routing

probe = probe_prompts(model, n_prompts, task=task)
attribution = attribute_routing(model, probe, groups="layers", method="norm",
                                n_bootstrap=200, progress=False)
checked = attribution.verify_top(5)
# every number in logits: the estimated and the exact change of the logit difference
UNITS = {"estimate": "estimate (logits)", "effect": "exact effect (logits)",
         "estimate_rank": "rank by |estimate|"}
display(checked[["router", "group", "family", "estimate", "effect"]].rename(columns=UNITS))

exact = ablation_effects(model, probe, groups="layers", metrics="logit_diff", n_bootstrap=200,
                         progress=False)
cells = ["router", "group", "family"]
compared = attribution.table[cells + ["estimate"]].merge(exact[cells + ["effect"]], on=cells)
compared["estimate_rank"] = compared.estimate.abs().rank(ascending=False, method="min").astype(int)
spearman = compared.estimate.rank().corr(compared.effect.rank())  # Spearman: Pearson of ranks
print(f"Spearman(estimate, exact effect) over {len(compared)} cells: {spearman:.2f}; "
      "the 5 largest |exact effects|, the ones the last cell counts:")
display(compared.loc[compared.effect.abs().nlargest(5).index].rename(columns=UNITS))
"""),
    md("## What this notebook showed"),
    code("""
at_last = state[:, -1]
full = [l for l in range(len(at_last)) if float(at_last[l]) >= 0.99]
elsewhere = float(state[:, :-1].abs().max())
# prompts that differ at the last position only: the earlier positions are the same in both
# runs (attention is causal), so the whole state there must recover 1 and elsewhere 0
last_only = differ == [batch.tokens.shape[1] - 1]
as_expected = len(full) == len(at_last) and elsewhere < 0.01
largest = compared.loc[compared.effect.abs().idxmax()]   # of either sign
caught = ((checked.router == largest.router) & (checked.group == largest.group)
          & (checked.family == largest.family)).any()
top5 = compared.loc[compared.effect.abs().nlargest(5).index]
rerun = top5.merge(checked[cells], on=cells)   # the 5 largest |exact effects| verify_top re-ran
missed = top5.merge(checked[cells], on=cells, how="left", indicator=True)
missed = missed[missed._merge == "left_only"]   # the others, largest |effect| first
weight_best = float(weights.nan_to_num().max())
block_layer, block_pos = divmod(int(blocks.nan_to_num(nan=-float("inf")).argmax()),
                                blocks.shape[1])       # the largest committed-block patch
weights_and_blocks = (
    f"the largest routing-weight patch recovers {weight_best:.2g}. "
    + ("The clean routing weights alone thus restore almost none of the clean run, against 1 "
       "for the whole depth state: the difference between the runs goes through the sources "
       "the routers read, not through how they weight them. "
       if weight_best < 0.01 and len(full) == len(at_last) else "")
    + (f"Patching one committed block recovers at most {float(blocks[block_layer, block_pos]):.2f} "
       f"(layer {block_layer}'s, at position {block_pos}). " if not blocks.isnan().all()
       else "")
)
print(f"On {CONDITION} (clean and corrupted prompts differ only at position(s) {differ}): "
      f"patching the whole clean depth state at the last position recovers at least 0.99 of "
      f"the clean-minus-corrupted logit difference entering {len(full)} of "
      f"{len(at_last)} layers (at every other position at most {elsewhere:.2f})"
      + ((", as it must: only the last position differs and attention is causal"
          if as_expected else ", which causality forbids: a bug") if last_only else "")
      + f"; {weights_and_blocks}"
      f"Attribution took {attribution.seconds:.1f} s for {len(attribution.plan)} cells. "
      f"The largest exact effect is {largest.family} at {largest.router} {largest.group}: "
      f"{largest.effect:+.2f} logits, estimated {largest.estimate:+.3f}"
      f"{' (the opposite sign)' if largest.estimate * largest.effect < 0 else ''} (rank "
      f"{int(largest.estimate_rank)} of {len(compared)} by |estimate|; verify_top(5) "
      f"{'re-ran' if caught else 'missed'} it); of the 5 largest exact effects, verify_top(5) "
      f"re-ran {len(rerun)} (ranks by |estimate|: "
      f"{', '.join(str(int(r)) for r in top5.estimate_rank)}); Spearman over all cells "
      f"{spearman:.2f}. "
      + ("The estimates found the largest exact effects here; still report the exact numbers."
         if missed.empty else
         f"A ranking by the estimates misses {len(missed)} of them here (the largest: "
         f"{missed.family.iloc[0]} at {missed.router.iloc[0]} {missed.group.iloc[0]}, "
         f"{missed.effect.iloc[0]:+.2f} logits): report exact numbers, from the exact sweep "
         "where it is affordable.")
      )
"""),
]

NOTEBOOKS = {
    "01_routing_hooks.ipynb": ROUTING,
    "02_motifs_and_dissociation.ipynb": MOTIFS,
    "03_patching_and_attribution.ipynb": PATCHING,
}


def main() -> None:
    for old in HERE.glob("*.ipynb"):
        if old.name not in NOTEBOOKS:
            old.unlink()
    for name, cells in NOTEBOOKS.items():
        notebook = nbformat.v4.new_notebook(cells=cells)
        for number, cell in enumerate(notebook.cells):  # stable ids: a rebuild changes no id
            cell.id = f"{name[:2]}-{number:02d}"
        notebook.metadata["kernelspec"] = {
            "name": "python3",
            "display_name": "Python 3",
            "language": "python",
        }
        nbformat.write(notebook, HERE / name)
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()

"""The study's bounds that the command line checks when it parses its arguments (this module
imports nothing, so ``hooked-attnres --help`` stays fast)."""

from __future__ import annotations

# The most probe prompts the study draws per model (`run_study`, `probe_prompts`,
# `study_condition`, ``hooked-attnres study --prompts``): 64 times the default 256.
# Drawing them is a Python loop (50 000 prompts: 21 s and 65 MB here), one forward pass
# holds every prompt's logits, and each bootstrap holds ``rows x 256 x n_prompts``
# floats at once (the study's effects: 32 rows, 64 KB per prompt, 1 GB at this bound);
# ``n_prompts=10**9`` ran for days towards a terabyte before it failed.
MAX_PROBE_PROMPTS = 16_384
WHY_MAX_PROBE_PROMPTS = (
    "the most probe prompts the study draws per model, MAX_PROBE_PROMPTS: its time and "
    "memory grow with them, each bootstrap holding 64 KB per prompt"
)

# The largest model seed (`train_condition`, ``hooked-attnres train/study --seeds``): the
# largest torch's random generators take (``torch.manual_seed``, ``Generator.manual_seed``);
# one more failed in the model's initialisation, after the run had started.
MAX_SEED = 2**64 - 1
WHY_MAX_SEED = "the largest seed torch's random generators take"

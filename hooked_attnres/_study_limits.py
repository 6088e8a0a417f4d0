"""The bounds of the study and training that the command line checks when it parses its
arguments (this module imports nothing, so ``hooked-attnres --help`` stays fast)."""

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

# The most bootstrap resamples of an interval (`run_study`, `study_condition`,
# ``hooked-attnres study --bootstrap``, and since audit 127 every analysis's bootstrap,
# `analysis.bootstrap.check_bootstrap`): 100 times the default 1000. Each bootstrap holds
# ``rows x n_bootstrap`` resampled means and resamples 256 at a time (32 rows of 256
# prompts: 26 MB and about 2 s per bootstrap at this bound, here); ``10**12`` failed after
# the first model's sweep, allocating 291 TiB, and ``10**8`` would take 25 GB and half an
# hour per bootstrap.
MAX_BOOTSTRAP = 100_000
WHY_MAX_BOOTSTRAP = (
    "the most bootstrap resamples an interval draws, MAX_BOOTSTRAP: its time and memory "
    "grow with them"
)

# The largest model seed (`train_condition`, `run_study`, ``hooked-attnres train/study
# --seeds``): the largest the study's tables hold as integers (int64). Torch's random
# generators take up to 2**64 - 1 (2**64 failed in the model's initialisation, after the
# run had started, audit 116), but a run of seed 2**63 or more trained and then failed in
# its study after the model's work (the seed column uint64: pandas' merge raised KeyError
# numpy.ulonglong) or, beside seed 0, was read as a float (2**63 and 2**63 + 1 one seed;
# audit 122).
MAX_SEED = 2**63 - 1
WHY_MAX_SEED = "the largest seed the study's tables hold, int64"

# The most torch threads (``--threads``, `TrainConfig.threads`): ``torch.set_num_threads``
# takes a C int; 2**31 failed in it with "Overflow when unpacking long".
MAX_THREADS = 2**31 - 1
WHY_MAX_THREADS = "the most torch.set_num_threads takes, a C int"

# The most words a probe task's prompts use (`KeyValueRetrieval`'s n_keys + n_values +
# n_filler_words + 1, `InductionCopy`'s n_tokens + 1; ``hooked-attnres train --task-arg``),
# and the longest prompt it draws (`Task.prompt_length`), refused in the task's
# constructor before any list of words or prompt is made. The shipped recipes use at most
# 41 words (``saturated`` / ``hard``: 16 keys, 16 values, 8 fillers, '?') and prompts of 21
# tokens (``hard``: 9 pairs). Building the tokenizer and drawing prompts is Python work per
# word and token:
# n_keys=10**6 took 10 s and 1.5 GB before any model was built, and 10**9 would exhaust
# memory; at these bounds 64 prompts are drawn in about 1 s here. 32 768 tokens is below
# Qwen3-0.6B's context of 40 960; a model's own n_ctx and d_vocab are checked when it runs.
MAX_TASK_WORDS = 65_536
WHY_MAX_TASK_WORDS = (
    "the most words a probe task's prompts use, MAX_TASK_WORDS: its tokenizer and prompts "
    "are built word by word"
)
MAX_PROMPT_LENGTH = 32_768
WHY_MAX_PROMPT_LENGTH = (
    "the longest prompt a probe task draws, MAX_PROMPT_LENGTH: its prompts are drawn token by token"
)


# The names of the study's grid of fixed recipes (`study.conditions`, which builds its grid
# from these): ``{task}_{layout}_L{depth}``, each trained at its ``depth`` only, whereas the
# original ``attnres`` and ``vanilla`` conditions can be trained at any shape. Here, beside
# the study's other bounds, so that the analyses can read a grid condition's depth from a
# table's ``condition`` label without importing the study application.
GRID_TASKS = ("saturated", "hard", "induction", "paperlike")
GRID_LAYOUTS = ("cumulative", "kimi", "vanilla")
GRID_DEPTHS = (8, 16)


def grid_condition_depth(name: object) -> int | None:
    """The depth of the grid recipe called ``name`` (e.g. 16 for ``hard_cumulative_L16``),
    or ``None`` for any other label (``attnres``, ``vanilla``, a name that is no condition,
    a label that is no text)."""
    if not isinstance(name, str):
        return None
    head, _, depth = name.rpartition("_L")
    task, _, layout = head.partition("_")
    for n_layers in GRID_DEPTHS:
        if depth == str(n_layers) and task in GRID_TASKS and layout in GRID_LAYOUTS:
            return n_layers
    return None

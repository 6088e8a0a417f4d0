"""Checkpoints shipped with the package (the study's seed-0 models), found offline.

``study_checkpoint("attnres")`` and ``study_checkpoint("vanilla")`` are the directories of
the two trained conditions; ``docs/training.md`` says how to recreate them bit for bit.
"""

from __future__ import annotations

from pathlib import Path

STUDY_DIR = Path(__file__).parent / "study"


def study_checkpoint(condition: str, seed: int = 0) -> Path:
    """The ``model`` directory of a shipped study checkpoint.

    Args:
        condition: ``"attnres"`` (this package's format) or ``"vanilla"`` (a Hugging Face
            Qwen3 directory, to be loaded with ``from_hf_qwen3``).
        seed: the model seed; only seed 0 ships (train the others with
            ``hooked-attnres train --seeds 1 2``).
    """
    if condition not in ("attnres", "vanilla"):
        raise ValueError(f"condition must be 'attnres' or 'vanilla', got {condition!r}")
    path = STUDY_DIR / f"{condition}_seed{seed}" / "model"
    if not (path / "config.json").exists():
        shipped = sorted(p.name for p in STUDY_DIR.glob("*_seed*")) if STUDY_DIR.exists() else []
        raise FileNotFoundError(
            f"no shipped checkpoint for {condition} seed {seed} (shipped: {shipped}); train it with "
            f"`hooked-attnres train --condition {condition} --seeds {seed} --out runs` and pass "
            "the runs directory to the study"
        )
    return path


def study_metrics(condition: str, seed: int = 0) -> Path:
    """The ``metrics.json`` written when the shipped checkpoint was trained."""
    return study_checkpoint(condition, seed).parent / "metrics.json"

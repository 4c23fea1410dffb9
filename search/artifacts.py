"""Where a trial's compressed model is kept in the run folder (``artifacts/<study>/trial_<n>``),
and the clean-up that keeps only the Pareto front's.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from optuna.trial import FrozenTrial, TrialState

from nas_fair.search.records import TrialRecord


def artifact_path(study: str, number: int) -> Path:
    """A trial's saved model, relative to the run folder (per study: run folders can be shared)."""
    return Path("artifacts") / study / f"trial-{number}"


def artifact_dir(run_dir: Path, study: str, number: int) -> Path | None:
    """The trial's saved-model folder inside ``run_dir``, or None if it would lie outside.

    Derived from the study name and trial number only, never from a path stored in the study:
    whoever can write the storage must not steer a delete or a copy elsewhere.
    """
    root = run_dir.resolve()
    target = root / artifact_path(study, number)
    try:
        # parent resolved (the folder itself may be a planted symlink: rmtree refuses those)
        target.parent.resolve().relative_to(root)
    except ValueError:
        return None
    return target.parent.resolve() / target.name


def drop_stale_artifacts(run_dir: Path, study: str, trials: Iterable[FrozenTrial], *,
                         keep: set[int]) -> None:
    """Delete saved models of finished trials outside ``keep`` (the Pareto front), best effort.

    A complete trial off the front never re-enters it (what dominates it stays in the study), so
    disk use stays bounded by the front; RUNNING trials are never touched. The folder comes from
    the study name and trial number (``artifact_dir``), not from the path stored in the trial.
    """
    for t in trials:
        if (TrialRecord.from_trial(t).artifact and t.number not in keep
                and t.state in (TrialState.COMPLETE, TrialState.FAIL)):
            target = artifact_dir(run_dir, study, t.number)
            if target is not None:
                shutil.rmtree(target, ignore_errors=True)  # refuses a symlink: nothing followed


# The files of an exported trial (``nas-fair export``).
RECIPE_FILE = "recipe.json"
METRICS_FILE = "metrics.json"
CLASS_RATES_FILE = "class_rates.json"  # per-class group rates, the model and the reference
CARD_FILE = "README.md"
ONNX_FILE = "model.onnx"

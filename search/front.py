"""The Pareto front of a study's trials."""

from __future__ import annotations

import numpy as np
from optuna.trial import FrozenTrial, TrialState

from nas_fair.search.fidelity import top_rung_trials
from nas_fair.search.records import TrialRecord


def pareto_front(trials: list[FrozenTrial], dirs: list[str], *,
                 feasible_only: bool = True, final_only: bool = True) -> list[FrozenTrial]:
    """Non-dominated complete trials: feasible ones only unless asked otherwise, and of a
    multi-fidelity study only top-rung results unless asked otherwise (a lower rung's
    scores are a candidate's provisional ones, after a shorter recovery)."""
    cands = [t for t in trials if t.state == TrialState.COMPLETE and t.values is not None]
    if final_only:
        cands = top_rung_trials(cands)
    if feasible_only:
        cands = [t for t in cands if TrialRecord.from_trial(t).feasible]
    if not cands:
        return []
    sign = np.array([1.0 if d == "minimize" else -1.0 for d in dirs])
    vals = np.array([t.values for t in cands], dtype=float) * sign
    front = []
    for i, v in enumerate(vals):
        dominated = np.any(np.all(vals <= v, axis=1) & np.any(vals < v, axis=1))
        if not dominated:
            front.append(cands[i])
    return front

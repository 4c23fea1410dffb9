"""Every use of Optuna's private API, in one place: an Optuna release that changes one breaks
this file only (tests/test_layout.py keeps the rest of the package off ``optuna._*`` and
``._storage``).
"""

from __future__ import annotations

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

try:
    from optuna.trial._trial import _CONSTRAINTS_KEY
except ImportError:  # pragma: no cover - the key Optuna 3-5 use
    _CONSTRAINTS_KEY = "constraints"

# ``Trial.set_constraint(name, value)`` stores "<prefix><name>" system attributes.
CONSTRAINT_PREFIX = f"{_CONSTRAINTS_KEY}:"


def compute_hypervolume(points: np.ndarray, ref: np.ndarray) -> float:
    """Optuna's exact WFG hypervolume (minimization) of ``points`` bounded by ``ref``."""
    from optuna._hypervolume import compute_hypervolume as wfg

    return float(wfg(points, ref))


def named_constraints(trial: FrozenTrial) -> dict[str, float]:
    """The constraints set by name on ``trial``, as stored ({} for older trials)."""
    return {k.split(":", 1)[1]: v for k, v in trial.system_attrs.items()
            if k.startswith(CONSTRAINT_PREFIX)}


def stored_trial(study: optuna.Study, trial: optuna.Trial) -> FrozenTrial:
    """A running trial as stored so far (its attributes, params, constraints)."""
    return study._storage.get_trial(trial._trial_id)


def fail_trial(study: optuna.Study, trial: FrozenTrial) -> bool:
    """Mark another worker's RUNNING trial FAIL; False when it was no longer running."""
    return study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)

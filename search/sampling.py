"""The sampler: NSGA-II (or TPE / random) seeded per trial, and the population size.
"""

from __future__ import annotations

import numpy as np
import optuna
from optuna.trial import FrozenTrial

from nas_fair.config import StudyConfig


def population_for(budget_trials: int | None, anchors: int = 0) -> int:
    """NSGA-II's first generation is random: keep several generations inside the budget. With
    ``anchors`` queued first, at least as many random members as anchors stay in it."""
    population = 16 if budget_trials is None else int(min(50, max(4, round(budget_trials / 4))))
    return max(population, 2 * anchors)


def trial_seeds(seed: int, number: int) -> tuple[int, int]:
    """Two 32-bit seeds for trial ``number`` of a study seeded ``seed`` (distinct streams)."""
    a, b = np.random.SeedSequence([seed & (2**64 - 1), number]).generate_state(2)
    return int(a), int(b)


class _SeededPerTrial:
    """Mixin: before each trial, the sampler's generators restart from ``trial_seeds(seed,
    trial.number)``.

    What this makes reproducible: a trial's draws depend on the seed, its number and the
    finished trials before it (NSGA-II's parents are chosen by their measured objectives,
    latency included), not on how many trials this process ran before, so one process draws
    the same recipes whether it ran in one go or was stopped and resumed, and the anchors and
    first (random) generation are the same in every run. Several processes on one storage get
    distinct trial numbers from the storage, so they draw distinct recipes; which process runs
    which number depends on timing, so a study run by several workers is not reproducible as
    a whole (docs/reproducibility.md)."""

    _trial_seed: int

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        for sampler, s in zip((self, getattr(self, "_random_sampler", None)),
                              trial_seeds(self._trial_seed, trial.number)):
            rng = getattr(sampler, "_rng", None)
            if rng is not None:  # optuna's LazyRandomState
                rng.rng.seed(s)
        super().before_trial(study, trial)  # type: ignore[misc]


class SeededNSGAIISampler(_SeededPerTrial, optuna.samplers.NSGAIISampler):
    """NSGA-II whose draws for a trial come from the study seed and the trial's number."""


class SeededTPESampler(_SeededPerTrial, optuna.samplers.TPESampler):
    """TPE whose draws for a trial come from the study seed and the trial's number."""


class SeededRandomSampler(_SeededPerTrial, optuna.samplers.RandomSampler):
    """Random search whose draws for a trial come from the study seed and the trial's number."""


def make_sampler(cfg: StudyConfig, population: int, seed: int) -> optuna.samplers.BaseSampler:
    """Samplers read each trial's constraints (``trial.set_constraint``) for feasibility; their
    draws for a trial come from ``seed`` and the trial's number (see ``_SeededPerTrial``)."""
    sampler: _SeededPerTrial
    if cfg.search.sampler == "nsga2":
        sampler = SeededNSGAIISampler(population_size=population, seed=seed)
    elif cfg.search.sampler == "tpe":
        sampler = SeededTPESampler(seed=seed, multivariate=True)
    else:
        sampler = SeededRandomSampler(seed=seed)
    sampler._trial_seed = seed
    return sampler  # type: ignore[return-value]

"""The four objectives of a trial: their names, directions, the study's limits as constraints.

A trial is scored on size, latency, accuracy and one bias metric (``[objectives] bias``);
``objective_names`` / ``directions`` say how each is stored in the study, in that order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nas_fair.config import StudyConfig
from nas_fair.data import TaskData
from nas_fair.errors import UserError
from nas_fair.objectives import ACCURACY, BIAS, get

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

OBJECTIVE_KEYS = ("size_mb", "latency_ms", "accuracy", "bias")


@dataclass
class Scores:
    """One model's measured objectives and everything recorded beside them (JSON-able)."""

    size_mb: float
    latency_ms: float
    accuracy: float
    bias: float
    attrs: dict[str, Any] = field(default_factory=dict)

    def values(self) -> list[float]:
        """The objectives in the study's order (``OBJECTIVE_KEYS``), as Optuna stores them."""
        return [getattr(self, k) for k in OBJECTIVE_KEYS]

    @classmethod
    def of_trial(cls, trial: FrozenTrial) -> Scores:
        """A stored trial's scores, each objective by name (Optuna keeps them by position)."""
        if trial.values is None or len(trial.values) != len(OBJECTIVE_KEYS):
            raise ValueError(f"trial {trial.number} has no {len(OBJECTIVE_KEYS)} objective "
                             f"values: {trial.values!r}")
        return cls(**dict(zip(OBJECTIVE_KEYS, trial.values)), attrs=dict(trial.user_attrs))


def _signed(cfg: StudyConfig) -> bool:
    """A signed gap is scored by its distance from zero: anti-bias is not the goal either."""
    bias = get(BIAS, cfg.objectives.bias, "bias")
    return not (bias.absolute or bias.direction == "maximize")


def objective_names(cfg: StudyConfig) -> list[str]:
    name = cfg.objectives.bias
    return ["size_mb", "latency_ms", cfg.objectives.accuracy, f"|{name}|" if _signed(cfg) else name]


def directions(cfg: StudyConfig) -> list[str]:
    acc = get(ACCURACY, cfg.objectives.accuracy, "accuracy")
    bias_dir = "minimize" if _signed(cfg) else BIAS[cfg.objectives.bias].direction
    return ["minimize", "minimize", acc.direction, bias_dir]


def bias_objective(cfg: StudyConfig, value: float) -> float:
    return abs(value) if _signed(cfg) else value


def limit_constraints(cfg: StudyConfig, accuracy: float, bias: float,
                      bias_ci: list[float | None] | None, reference: dict[str, Any], *,
                      max_bias_increase: float | None, min_accuracy: float | None,
                      ) -> dict[str, float]:
    """The user's limits as constraint values (<= 0 passes): one rule for the search's
    feasibility and for ``nas-fair pareto``'s filters. The bias limit is on the CI upper end."""
    cons: dict[str, float] = {}
    if max_bias_increase is not None:
        # The objective's value at the interval's worst end (for a signed metric, the end
        # farther from zero).
        ends = [bias_objective(cfg, v) for v in (bias_ci or []) if v is not None]
        hi = max(ends) if ends else bias
        # values[3], not reference["bias"]: the stored reference's "bias" key holds every
        # recorded bias metric (Scores.attrs overrides the objective value of that name).
        cons["max_bias_increase"] = hi - reference["values"][3] - max_bias_increase
    if min_accuracy is not None:
        cons["min_accuracy"] = min_accuracy - accuracy
    return cons


def check_objectives(cfg: StudyConfig, data: TaskData) -> list[str]:
    """Fail at study start, not after an hour: every metric must apply to this data."""
    from nas_fair.objectives.stats import check_metric_applicable

    get(ACCURACY, cfg.objectives.accuracy, "accuracy")
    names = [cfg.objectives.bias, *cfg.objectives.record]
    groups = data.test.groups
    facts = dict(
        has_groups=groups is not None,
        n_groups=0 if groups is None else len(set(groups.tolist())),
        has_counterfactual=data.test_counterfactual is not None,
        has_stereotype=data.test.stereotype is not None,
        has_reference=True,
        group_values=None if groups is None else set(groups.tolist()),
    )
    for name in names:
        check_metric_applicable(name, **facts)
    if cfg.objectives.record:
        return list(dict.fromkeys(names))
    recorded = [cfg.objectives.bias]
    for name in sorted(BIAS):
        try:
            check_metric_applicable(name, **facts)
        except UserError:
            continue
        recorded.append(name)
    return list(dict.fromkeys(recorded))

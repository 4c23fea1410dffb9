"""What a trial is scored on: one evaluation record, and registries of plain metric functions.

A metric is a plain function in fairlearn's style, ``f(y_true, y_pred, *, sensitive_features)``,
plus whatever extra arrays it declares in ``needs``. Adding one is one decorated function in any
module of ``objectives/``; the study, the CLI and the tests find it in the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from nas_fair.errors import UserError, did_you_mean

Direction = Literal["minimize", "maximize"]

# Names of the arrays a metric can ask for, and where they come from on an EvalRecord.
NEEDS = {
    "sensitive_features": "groups",  # the study's group column (e.g. gender)
    "y_pred_counterfactual": "y_pred_cf",  # predictions on gender-swapped inputs
    "y_pred_reference": "y_pred_ref",  # the uncompressed reference model's predictions
    "stereotype": "stereotype",  # pro/anti labels (WinoBias-style data)
    # not row-aligned: the model's own sentence embeddings (objectives/association.py)
    "encoder_probe": "probe",
}


@dataclass
class EvalRecord:
    """Predictions of one model on the held-out split, aligned row by row."""

    y_true: np.ndarray
    y_pred: np.ndarray
    groups: np.ndarray | None = None
    y_pred_cf: np.ndarray | None = None
    y_pred_ref: np.ndarray | None = None
    stereotype: np.ndarray | None = None
    n_classes: int | None = None
    # Computed from the model, not per row (association.EncoderProbe): resampling keeps it whole.
    probe: Any = None
    # Which rows of the full test split these are (None: all of them, in order): a lower rung
    # of a multi-fidelity study scores a sample, and paired metrics must align the reference.
    rows: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.y_true)

    def take(self, idx: np.ndarray) -> EvalRecord:
        """Row subset (bootstrap resample); every aligned array is indexed the same way."""

        def t(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[idx]

        return EvalRecord(
            self.y_true[idx],
            self.y_pred[idx],
            t(self.groups),
            t(self.y_pred_cf),
            t(self.y_pred_ref),
            t(self.stereotype),
            self.n_classes,
            self.probe,
            t(self.rows),
        )


@dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable[..., float]
    direction: Direction
    needs: tuple[str, ...] = ()
    # An absolute gap is >= 0 even for an unbiased model, so its bootstrap interval never holds 0:
    # such metrics also get a permutation-null p-value.
    absolute: bool = False
    description: str = ""

    def available(self, record: EvalRecord) -> bool:
        return all(getattr(record, NEEDS[n]) is not None for n in self.needs)

    def __call__(self, record: EvalRecord) -> float:
        kwargs = {n: getattr(record, NEEDS[n]) for n in self.needs}
        return float(self.fn(record.y_true, record.y_pred, **kwargs))


ACCURACY: dict[str, Metric] = {}
BIAS: dict[str, Metric] = {}


def _register(
    table: dict[str, Metric],
    name: str,
    direction: Direction,
    needs: tuple[str, ...],
    absolute: bool,
) -> Callable[[Callable[..., float]], Callable[..., float]]:
    for n in needs:
        if n not in NEEDS:
            raise ValueError(f"metric {name!r} needs {n!r}, which must be one of {sorted(NEEDS)}")

    def deco(fn: Callable[..., float]) -> Callable[..., float]:
        if name in table:
            raise ValueError(f"metric {name!r} registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        table[name] = Metric(name, fn, direction, needs, absolute, doc[0] if doc else "")
        return fn

    return deco


def accuracy_metric(name: str, direction: Direction = "maximize"):  # noqa: ANN201
    """Register a task metric ``f(y_true, y_pred) -> float``."""
    return _register(ACCURACY, name, direction, (), False)


def bias_metric(  # noqa: ANN201
    name: str,
    direction: Direction = "minimize",
    needs: tuple[str, ...] = ("sensitive_features",),
    absolute: bool = False,
):
    """Register a bias metric ``f(y_true, y_pred, *, <needs>) -> float``."""
    return _register(BIAS, name, direction, needs, absolute)


def get(table: dict[str, Metric], name: str, kind: str) -> Metric:
    if name not in table:
        raise UserError(
            f"unknown {kind} metric {name!r}{did_you_mean(name, table)}; "
            f"available: {', '.join(sorted(table))}"
        )
    return table[name]

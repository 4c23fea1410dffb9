"""Counterfactual bias: does the prediction change when only the gendered words change?

Needs no group column: each example is its own control. The counterfactual texts come from
:func:`nas_fair.swaps.gender_swap` (the core: data loading and mitigation use it too).
"""

from __future__ import annotations

import numpy as np

from nas_fair.errors import UserError
from nas_fair.objectives.base import EvalRecord, bias_metric
from nas_fair.objectives.stats import Coded, batched


def _flip_coded(y_pred: np.ndarray, other: np.ndarray) -> Coded:
    r = (np.asarray(y_pred) != np.asarray(other)).astype(np.int64)
    n = len(r)

    def reduce(counts: np.ndarray) -> np.ndarray:
        return counts[..., 0, 1] / np.maximum(counts.sum(axis=(-2, -1)), 1)

    return Coded(np.zeros(n, dtype=np.int64), r, 1, 2, reduce, has_groups=False)


@bias_metric("counterfactual_flip_rate", needs=("y_pred_counterfactual",))
def counterfactual_flip_rate(y_true, y_pred, *, y_pred_counterfactual) -> float:  # noqa: ANN001
    """Share of examples whose prediction changes when gendered words are swapped."""
    if len(y_pred) != len(y_pred_counterfactual):
        raise UserError(
            f"counterfactual predictions must align with predictions: "
            f"{len(y_pred_counterfactual)} rows vs {len(y_pred)}"
        )
    if len(y_pred) == 0:
        return float("nan")
    return float(np.mean(np.asarray(y_pred) != np.asarray(y_pred_counterfactual)))


@batched("counterfactual_flip_rate")
def _cf_enc(record: EvalRecord) -> Coded:
    return _flip_coded(record.y_pred, record.y_pred_cf)

"""Task metrics (maximized). macro F1 and balanced accuracy average over the classes present in
y_true, so a model that stops predicting some classes (a collapsed model) is scored down for
each of them, where plain accuracy on an imbalanced split would barely move.
"""

from __future__ import annotations

import numpy as np

from nas_fair.objectives.base import EvalRecord, accuracy_metric
from nas_fair.objectives.stats import Coded, batched, confusion, confusion_coded, nan_mean, safe_div


def _pooled(c: np.ndarray) -> np.ndarray:
    return c.sum(axis=-3)  # (..., G, K, K) -> (..., K, K)


def _accuracy(c: np.ndarray) -> np.ndarray:
    p = _pooled(c)
    return safe_div(np.trace(p, axis1=-2, axis2=-1), p.sum(axis=(-2, -1)))


def _macro_f1(c: np.ndarray) -> np.ndarray:
    p = _pooled(c)
    tp = np.diagonal(p, axis1=-2, axis2=-1)
    true_n = p.sum(axis=-1)
    pred_n = p.sum(axis=-2)
    # F1 = 2TP / (2TP + FP + FN) = 2TP / (true + pred); classes absent from y_true are left out.
    f1 = np.where(true_n > 0, safe_div(2 * tp, true_n + pred_n), np.nan)
    return nan_mean(f1)


def _balanced_accuracy(c: np.ndarray) -> np.ndarray:
    p = _pooled(c)
    return nan_mean(safe_div(np.diagonal(p, axis1=-2, axis2=-1), p.sum(axis=-1)))


@accuracy_metric("accuracy")
def accuracy(y_true, y_pred) -> float:  # noqa: ANN001
    """Share of correct predictions."""
    return float(_accuracy(confusion(y_true, y_pred)))


@accuracy_metric("macro_f1")
def macro_f1(y_true, y_pred) -> float:  # noqa: ANN001
    """Unweighted mean F1 over the classes present in y_true (never-predicted class: F1 0)."""
    return float(_macro_f1(confusion(y_true, y_pred)))


@accuracy_metric("balanced_accuracy")
def balanced_accuracy(y_true, y_pred) -> float:  # noqa: ANN001
    """Unweighted mean recall over the classes present in y_true."""
    return float(_balanced_accuracy(confusion(y_true, y_pred)))


def _encoder(fn):  # noqa: ANN001, ANN202
    def enc(record: EvalRecord) -> Coded:
        return confusion_coded(record.y_true, record.y_pred, None, fn, n_classes=record.n_classes)

    return enc


for _name, _fn in {
    "accuracy": _accuracy,
    "macro_f1": _macro_f1,
    "balanced_accuracy": _balanced_accuracy,
}.items():
    batched(_name)(_encoder(_fn))

"""Collapse detection: a heavily compressed model that predicts (nearly) one class looks unbiased
(every group gets the same answer) and so can sit on the Pareto front. Such trials are flagged,
so the study can reject them rather than report them as fair.

A model is flagged when any rule fires:

* few classes: it predicts at most ``min(min_classes - 1, K - 1)`` distinct classes (K = number
  of classes; with the default ``min_classes=3``: at most 2 of 12, 2 of 3, 1 of 2);
* few classes for a many-class task (K >= 4): it predicts fewer than ``min_class_coverage``
  (0.5) of the classes; a sound model may never predict one rare class, but not half of them;
* mostly one class: one class gets >= ``mostly_share`` (0.5) of all predictions and at least
  ``dominance_ratio`` (3) times its share of the true labels (seen on the default study: a pruned
  model sent most of its predictions to one of 10 balanced classes and scored a fraction of the
  reference's bias gap, so the bias objective rewarded a broken model; docs/measurements.md,
  "Figures once quoted in code comments");
* near-constant overall: one class gets >= ``overall_dominant_share`` (0.95) of all predictions
  while that class is < ``true_share_max`` (0.8) of the true labels;
* near-constant in a group: in a group of >= ``min_group_size`` rows, one class gets
  >= ``dominant_share`` (0.9) of the group's predictions while it is < ``true_share_max`` of
  that group's true labels;
* no better than a constant predictor: the lower end of the balanced accuracy's normal interval
  (level ``ci``; per-class recall variances) is <= 1/K, which is exactly what any constant
  predictor scores. Balanced accuracy, not accuracy against the majority share: on imbalanced
  labels (WinoBias as built here is mostly one class) a model with a good balanced accuracy can
  have an accuracy below the majority share and is still far from constant.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from nas_fair.errors import UserError
from nas_fair.objectives.base import EvalRecord
from nas_fair.objectives.stats import class_index, group_index


def wilson_interval(correct: int, n: int, ci: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (sound near 0 and 1, unlike the normal one)."""
    if n == 0:
        return math.nan, math.nan
    z = NormalDist().inv_cdf(0.5 + ci / 2.0)
    p = correct / n
    denom = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, mid - half), min(1.0, mid + half)


def _dominant(t: np.ndarray, p: np.ndarray, k: int) -> tuple[int, float, float]:
    """(most predicted class, its share of predictions, its share of true labels)."""
    pred = np.bincount(p, minlength=k)
    top = int(pred.argmax())
    return top, pred[top] / len(p), float(np.mean(t == top))


def collapse_report(
    record: EvalRecord,
    *,
    min_classes: int = 3,
    dominant_share: float = 0.9,
    overall_dominant_share: float = 0.95,
    true_share_max: float = 0.8,
    min_group_size: int = 20,
    ci: float = 0.95,
    min_class_coverage: float = 0.5,
    mostly_share: float = 0.5,
    dominance_ratio: float = 3.0,
) -> dict[str, object]:
    """Whether the model has collapsed, with the reasons and the numbers behind them."""
    if len(record) == 0:
        raise UserError("collapse_report needs at least one row, got an empty record")
    for name, v in (("dominant_share", dominant_share),
                    ("overall_dominant_share", overall_dominant_share),
                    ("true_share_max", true_share_max), ("ci", ci),
                    ("min_class_coverage", min_class_coverage), ("mostly_share", mostly_share)):
        if not 0.0 < v < 1.0:
            raise UserError(f"collapse_report: {name} must be in (0, 1), got {v!r}")
    (t, p), classes = class_index(record.y_true, record.y_pred, n_classes=record.n_classes)
    k = len(classes)
    reasons: list[str] = []

    n_pred = len(np.unique(p))
    limit = max(1, min(min_classes - 1, k - 1))
    if n_pred <= limit:
        reasons.append(f"predicts {n_pred} distinct class(es) of {k} (rule: <= {limit})")

    if k >= 4 and n_pred > limit and n_pred < math.ceil(min_class_coverage * k):
        reasons.append(
            f"predicts {n_pred} distinct classes of {k} (rule: fewer than "
            f"{math.ceil(min_class_coverage * k)})"
        )

    top, pred_share, true_share = _dominant(t, p, k)
    if (pred_share >= mostly_share and pred_share >= dominance_ratio * true_share
            and pred_share < overall_dominant_share):
        reasons.append(
            f"class {classes[top]!r} gets {pred_share:.0%} of predictions but is "
            f"{true_share:.0%} of labels (rule: >= {mostly_share:.0%} and >= "
            f"{dominance_ratio:g}x its share)"
        )
    if pred_share >= overall_dominant_share and true_share < true_share_max:
        reasons.append(
            f"class {classes[top]!r} gets {pred_share:.0%} of predictions but is "
            f"{true_share:.0%} of labels (rule: >= {overall_dominant_share:.0%} while "
            f"< {true_share_max:.0%})"
        )

    flagged_groups: list[object] = []
    if record.groups is not None:
        g, names = group_index(record.groups)
        for i, name in enumerate(names):
            rows = g == i
            if rows.sum() < min_group_size:
                continue
            top_g, ps, ts = _dominant(t[rows], p[rows], k)
            if ps >= dominant_share and ts < true_share_max:
                flagged_groups.append(name.item() if hasattr(name, "item") else name)
                reasons.append(
                    f"group {name!r}: class {classes[top_g]!r} gets {ps:.0%} of its predictions "
                    f"but is {ts:.0%} of its labels (rule: >= {dominant_share:.0%} while "
                    f"< {true_share_max:.0%})"
                )

    correct = int(np.sum(t == p))
    acc = correct / len(t)
    lo, hi = wilson_interval(correct, len(t), ci)
    baseline = float(np.bincount(t, minlength=k).max() / len(t))
    n_k = np.bincount(t, minlength=k)
    hit_k = np.bincount(t[t == p], minlength=k)
    present = n_k > 0
    recall = hit_k[present] / n_k[present]
    balanced = float(recall.mean())
    se = math.sqrt(float(np.sum(recall * (1 - recall) / n_k[present]))) / present.sum()
    balanced_low = balanced - NormalDist().inv_cdf(0.5 + ci / 2.0) * se
    chance = 1.0 / int(present.sum())
    if balanced_low <= chance:
        reasons.append(
            f"balanced accuracy {balanced:.3f} ({ci:.0%} interval lower end {balanced_low:.3f}) "
            f"does not beat the constant-predictor baseline 1/K = {chance:.3f}"
        )

    return {
        "collapsed": bool(reasons),
        "reason": "; ".join(reasons),
        "n_classes": k,
        "n_predicted_classes": n_pred,
        "top_class": classes[top].item() if hasattr(classes[top], "item") else classes[top],
        "top_pred_share": float(pred_share),
        "accuracy": acc,
        "accuracy_low": lo,
        "accuracy_high": hi,
        "majority_baseline": baseline,
        "balanced_accuracy": balanced,
        "balanced_accuracy_low": balanced_low,
        "flagged_groups": flagged_groups,
    }

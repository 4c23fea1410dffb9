"""Per-class group rates: each class's true-positive rate per group, the gap, and the training
share it may follow (De-Arteaga et al. 2019, "Bias in Bios").

A single bias number (the RMS of per-class TPR gaps, say) hides *which* classes carry the gap.
:func:`class_rates` keeps them apart: for every class, each group's TPR and count with a
bootstrap interval, and the gap between groups with its interval, all from the same stratified
resamples as every other metric (``stats.resamples``: same rows, same seed, counted once).
:func:`share_correlation` then asks De-Arteaga et al.'s question: is a class's TPR gap larger
where the group is a larger share of that class in the *training* data (a model amplifying the
imbalance it was trained on)?
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from nas_fair.errors import UserError
from nas_fair.objectives.group import _rates, _tpr_gaps
from nas_fair.objectives.stats import (
    class_index,
    confusion_coded,
    group_index,
    percentile_interval,
    resampled_counts,
    resamples,
)


def _name(value: Any) -> str:
    return str(value.item() if hasattr(value, "item") else value)


def class_rates(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    *,
    sensitive_features: np.ndarray,
    n_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    n: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict[str, Any]:
    """Each class's TPR per group, with counts, intervals and the gap between groups.

    ``tpr[g]`` = true examples of the class in group g predicted as the class / true examples of
    the class in g (``n[g]``; None where g has none); ``predicted[g]`` counts g's rows predicted
    as the class. ``gap`` is TPR(first sorted group) - TPR(second) with two groups (signed, the
    ``tpr_gap_signed`` convention), max - min over groups otherwise; None unless every group has
    true examples of the class. Intervals: percentile bootstrap over ``n`` resamples stratified
    by true class (``stats.resamples``, seeded); a resample where a rate is undefined is left out
    of that rate's interval.
    """
    if sensitive_features is None:
        raise UserError("class_rates needs a group column (sensitive_features); set "
                        "[data] group_column")
    groups = np.asarray(sensitive_features)
    if len(groups) != len(y_true) or len(y_pred) != len(y_true):
        raise UserError(f"class_rates needs aligned arrays; got {len(y_true)} labels, "
                        f"{len(y_pred)} predictions and {len(groups)} groups")
    coded = confusion_coded(y_true, y_pred, groups, lambda c: c, n_classes=n_classes)
    k = math.isqrt(coded.n_codes)
    _, names = group_index(groups)
    _, classes = class_index(y_true, y_pred, n_classes=n_classes)
    c = coded.counts().astype(float).reshape(coded.n_groups, k, k)
    rates = _rates(c)
    gap = _tpr_gaps(c)
    chunks = resamples(np.asarray(y_true), n, seed)
    boot = np.concatenate([b.astype(float).reshape(-1, coded.n_groups, k, k)
                           for b in resampled_counts(coded, chunks)])
    b_tpr = _rates(boot)["tpr"]  # (B, G, K)
    b_gap = _tpr_gaps(boot)  # (B, K)

    def num(x: float) -> float | None:
        return None if math.isnan(x) else float(x)

    def interval(v: np.ndarray) -> list[float | None]:
        lo, hi = percentile_interval(v, ci)
        return [num(lo), num(hi)]

    out_classes = []
    for j in range(k):
        label = classes[j]
        row: dict[str, Any] = {
            "class": _name(label),
            "name": (class_names[int(label)] if class_names is not None
                     and np.issubdtype(classes.dtype, np.integer)
                     and 0 <= int(label) < len(class_names) else _name(label)),
            "n": {_name(g): int(c[i, j].sum()) for i, g in enumerate(names)},
            "predicted": {_name(g): int(c[i, :, j].sum()) for i, g in enumerate(names)},
            "tpr": {_name(g): num(rates["tpr"][i, j]) for i, g in enumerate(names)},
            "tpr_ci": {_name(g): interval(b_tpr[:, i, j]) for i, g in enumerate(names)},
            "gap": num(gap[j]),
            "gap_ci": interval(b_gap[:, j]),
        }
        out_classes.append(row)
    return {
        "groups": [_name(g) for g in names],
        "gap_definition": (f"TPR({_name(names[0])}) - TPR({_name(names[1])})" if len(names) == 2
                else "max - min TPR over groups"),
        "bootstrap": {"n": n, "seed": seed, "ci": ci},
        "classes": out_classes,
    }


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r; NaN with fewer than three (x, y) pairs or a constant variable."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    den = math.sqrt(float((dx**2).sum() * (dy**2).sum()))
    return float((dx * dy).sum() / den) if den > 0 else math.nan


def fisher_interval(r: float, k: int, ci: float = 0.95) -> tuple[float, float]:
    """Interval for Pearson's r over ``k`` points by Fisher's z: tanh(atanh(r) +- z_q / sqrt(k-3)).

    Assumes the points are a bivariate-normal sample; NaN when k < 4 or r is undefined.
    """
    from statistics import NormalDist

    if k < 4 or math.isnan(r):
        return math.nan, math.nan
    z = math.atanh(max(min(r, 1 - 1e-12), -1 + 1e-12))
    half = NormalDist().inv_cdf(0.5 + ci / 2) / math.sqrt(k - 3)
    return math.tanh(z - half), math.tanh(z + half)


def share_correlation(
    rates: dict[str, Any], train_labels: np.ndarray, train_groups: np.ndarray, *,
    ci: float = 0.95,
) -> dict[str, Any] | None:
    """De-Arteaga et al.'s view: per class, the TPR gap against the first group's share of that
    class's *training* examples, and Pearson's r across classes with a Fisher-z interval.

    Two groups only (the gap is signed: first sorted group minus second, so a positive r means
    the model favours a group most where that group dominates the class in training); None with
    more groups. Classes without a defined gap or without training examples are left out.
    """
    groups = rates["groups"]
    if len(groups) != 2:
        return None
    labels = np.array([_name(v) for v in np.asarray(train_labels)])
    tg = np.array([_name(g) for g in np.asarray(train_groups)])
    points = []
    for row in rates["classes"]:
        in_class = labels == row["class"]
        total = int(in_class.sum())
        if row["gap"] is None or total == 0:
            continue
        share = float((tg[in_class] == groups[0]).sum() / total)
        points.append({"class": row["class"], "name": row["name"], "share": share,
                       "train_n": total, "gap": row["gap"]})
    r = pearson(np.array([p["share"] for p in points]), np.array([p["gap"] for p in points]))
    lo, hi = fisher_interval(r, len(points), ci)

    def num(x: float) -> float | None:
        return None if math.isnan(x) else float(x)

    return {"group": groups[0], "points": points, "r": num(r), "r_ci": [num(lo), num(hi)],
            "interval": f"Fisher z over {len(points)} classes"}

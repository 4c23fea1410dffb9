"""Group gaps: how differently the model treats the groups of the sensitive column.

Every metric here is a function of the confusion counts per group, ``C[..., g, true, pred]``, so
the same vectorized code computes it on one split and on a thousand bootstrap resamples at once
(see ``stats.py``). Where fairlearn defines the metric (binary demographic parity, equalized odds
and equal opportunity) the registered function calls fairlearn, and the vectorized version is
tested equal to it.

Multi-class extension (fairlearn's are binary only): one-vs-rest per class, then the worst class.
Undefined rates are left out, not counted as 0: a class's TPR gap is defined only when every group
has true examples of it (FPR: negatives of it); a group with no rows in a resample is left out of
selection rates. fairlearn instead scores an empty cell's rate as 0, so the two can differ on
splits with empty (group, class) cells.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
from fairlearn import metrics as flm

from nas_fair.errors import UserError
from nas_fair.objectives.base import EvalRecord, bias_metric
from nas_fair.objectives.stats import (
    ENCODERS,
    GROUP_RULES,
    Coded,
    GroupRule,
    batched,
    class_index,
    confusion,
    confusion_coded,
    nan_max,
    nan_mean,
    nan_min,
    safe_div,
)

# ----------------------------------------------------------------------------- rates from counts


def _rates(c: np.ndarray) -> dict[str, np.ndarray]:
    """Per-group, per-class rates from confusion counts (..., G, K, K); NaN where undefined."""
    n_g = c.sum(axis=(-2, -1))[..., None]  # (..., G, 1)
    pos = c.sum(axis=-1)  # true count per class (..., G, K)
    pred = c.sum(axis=-2)  # predicted count per class
    tp = np.diagonal(c, axis1=-2, axis2=-1)
    return {
        "sel": safe_div(pred, np.broadcast_to(n_g, pred.shape)),
        "tpr": safe_div(tp, pos),
        "fpr": safe_div(pred - tp, n_g - pos),
        "acc": safe_div(tp.sum(axis=-1), n_g[..., 0]),  # (..., G)
    }


def _spread(x: np.ndarray, *, strict: bool) -> np.ndarray:
    """max - min over groups (axis -2) per class; ``strict``: NaN unless every group is defined."""
    s = nan_max(np.moveaxis(x, -2, -1)) - nan_min(np.moveaxis(x, -2, -1))
    if strict:
        s = np.where(np.isnan(x).any(axis=-2), np.nan, s)
    return s


def _max_over_classes(x: np.ndarray) -> np.ndarray:
    return nan_max(x, axis=-1)


def _dp(c: np.ndarray) -> np.ndarray:
    return _max_over_classes(_spread(_rates(c)["sel"], strict=False))


def _eo(c: np.ndarray) -> np.ndarray:
    r = _rates(c)
    both = np.stack([_spread(r["tpr"], strict=True), _spread(r["fpr"], strict=True)], axis=-1)
    return _max_over_classes(nan_max(both, axis=-1))


def _eopp(c: np.ndarray) -> np.ndarray:
    gap = _spread(_rates(c)["tpr"], strict=True)
    if c.shape[-1] == 2:  # binary: the positive (second) class only, as fairlearn
        return gap[..., 1]
    return _max_over_classes(gap)


def _tpr_gaps(c: np.ndarray) -> np.ndarray:
    """Per-class TPR gap: group0 - group1 for two groups, else max - min; NaN unless all defined."""
    tpr = _rates(c)["tpr"]
    if tpr.shape[-2] == 2:
        return tpr[..., 0, :] - tpr[..., 1, :]
    return _spread(tpr, strict=True)


def _tpr_rms(c: np.ndarray) -> np.ndarray:
    return np.sqrt(nan_mean(_tpr_gaps(c) ** 2))


def _tpr_max(c: np.ndarray) -> np.ndarray:
    return nan_max(np.abs(_tpr_gaps(c)))


def _worst_acc(c: np.ndarray) -> np.ndarray:
    return nan_min(_rates(c)["acc"])


def _acc_gap(c: np.ndarray) -> np.ndarray:
    a = _rates(c)["acc"]
    return nan_max(a) - nan_min(a)


def _recall_by_class(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pooled over groups: (recall per class, true count per class)."""
    pooled = c.sum(axis=-3)
    count = pooled.sum(axis=-1)
    return safe_div(np.diagonal(pooled, axis1=-2, axis2=-1), count), count


def _quartile_masks(count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Masks of the minority and majority quartile among classes present in y_true.

    k = ceil(present / 4) classes each; ties go to the lower class index in both sorts, so a
    perfectly balanced split gives the same set twice (gap 0).
    """
    present = count > 0
    k = np.ceil(present.sum(axis=-1, keepdims=True) / 4.0)
    big = np.iinfo(np.int64).max
    asc = np.argsort(np.where(present, count, big), axis=-1, kind="stable")
    desc = np.argsort(np.where(present, -count, big), axis=-1, kind="stable")
    rank_asc = np.argsort(asc, axis=-1, kind="stable")
    rank_desc = np.argsort(desc, axis=-1, kind="stable")
    return present & (rank_asc < k), present & (rank_desc < k)


def _masked_mean(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return nan_mean(np.where(mask, x, np.nan))


def _minority_recall(c: np.ndarray) -> np.ndarray:
    rec, count = _recall_by_class(c)
    low, _ = _quartile_masks(count)
    return _masked_mean(rec, low)


def _minority_majority_gap(c: np.ndarray) -> np.ndarray:
    rec, count = _recall_by_class(c)
    low, high = _quartile_masks(count)
    return _masked_mean(rec, high) - _masked_mean(rec, low)


def _value(fn, y_true, y_pred, groups) -> float:  # noqa: ANN001
    return float(fn(confusion(y_true, y_pred, groups)))


def _binary01(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """0/1 arrays (second sorted label = positive, fairlearn's pos_label=1) when binary."""
    (t, p), classes = class_index(y_true, y_pred)
    return (t, p) if len(classes) == 2 else None


def _check_groups(name: str, groups: np.ndarray, lo: int = 1, hi: int | None = None) -> None:
    n = len(np.unique(np.asarray(groups)))
    if n < lo or (hi is not None and n > hi):
        want = f"exactly {lo}" if hi == lo else f"at least {lo}"
        raise UserError(f"{name} needs {want} groups in sensitive_features, got {n}")


def _fairlearn_or_fast(fl_fn, fast, y_true, y_pred, groups) -> float:  # noqa: ANN001
    """fairlearn's own function where it applies (binary labels), the multi-class encoder else."""
    b = _binary01(y_true, y_pred)
    if b is not None:
        return float(fl_fn(*b, sensitive_features=groups))
    return _value(fast, y_true, y_pred, groups)


# ----------------------------------------------------------------------------- registered metrics


@bias_metric("demographic_parity_difference", absolute=True)
def demographic_parity_difference(y_true, y_pred, *, sensitive_features) -> float:  # noqa: ANN001
    """Largest gap between groups in the share of predictions of a class (max over classes)."""
    return _fairlearn_or_fast(flm.demographic_parity_difference, _dp, y_true, y_pred, sensitive_features)


@bias_metric("equalized_odds_difference", absolute=True)
def equalized_odds_difference(y_true, y_pred, *, sensitive_features) -> float:  # noqa: ANN001
    """Largest TPR or FPR gap between groups (one-vs-rest per class, worst class)."""
    return _fairlearn_or_fast(flm.equalized_odds_difference, _eo, y_true, y_pred, sensitive_features)


@bias_metric("equal_opportunity_difference", absolute=True)
def equal_opportunity_difference(y_true, y_pred, *, sensitive_features) -> float:  # noqa: ANN001
    """TPR gap between groups: positive class if binary, worst class one-vs-rest otherwise."""
    return _fairlearn_or_fast(flm.equal_opportunity_difference, _eopp, y_true, y_pred, sensitive_features)


@bias_metric("tpr_gap_rms", absolute=True)
def tpr_gap_rms(y_true, y_pred, *, sensitive_features) -> float:  # noqa: ANN001
    """Root mean square over classes of the per-class TPR gap (De-Arteaga et al. 2019)."""
    return _value(_tpr_rms, y_true, y_pred, sensitive_features)


@bias_metric("tpr_gap_max", absolute=True)
def tpr_gap_max(y_true, y_pred, *, sensitive_features) -> float:  # noqa: ANN001
    """Largest per-class TPR gap between groups (all classes, also both classes if binary)."""
    return _value(_tpr_max, y_true, y_pred, sensitive_features)


def tpr_gap_signed_value(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    *,
    sensitive_features: np.ndarray,
    advantaged: object | None = None,
) -> float:
    """Mean over classes of TPR(advantaged) - TPR(other group); two groups only.

    ``advantaged`` defaults to the first group in sorted order ("female" before "male", "f"
    before "m"). Positive means the advantaged group's true examples are recognised more often.
    Classes without true examples in both groups are left out.
    """
    groups = np.asarray(sensitive_features)
    _check_groups("tpr_gap_signed", groups, 2, 2)
    c = confusion(y_true, y_pred, groups)
    names = np.unique(groups)
    if advantaged is not None:
        if advantaged not in set(names.tolist()):
            raise UserError(
                f"tpr_gap_signed: advantaged group must be one of {names.tolist()}, "
                f"got {advantaged!r}"
            )
        if names[1] == advantaged:
            c = c[::-1]
    return float(nan_mean(_tpr_gaps(c)))


@bias_metric("tpr_gap_signed")
def tpr_gap_signed(y_true, y_pred, *, sensitive_features) -> float:  # noqa: ANN001
    """Mean per-class TPR(first sorted group) - TPR(second group); signed, two groups only."""
    return tpr_gap_signed_value(y_true, y_pred, sensitive_features=sensitive_features)


@bias_metric("worst_group_accuracy", direction="maximize")
def worst_group_accuracy(y_true, y_pred, *, sensitive_features) -> float:  # noqa: ANN001
    """Accuracy of the group the model does worst on."""
    return _value(_worst_acc, y_true, y_pred, sensitive_features)


@bias_metric("accuracy_gap", absolute=True)
def accuracy_gap(y_true, y_pred, *, sensitive_features) -> float:  # noqa: ANN001
    """Highest minus lowest group accuracy."""
    return _value(_acc_gap, y_true, y_pred, sensitive_features)


@bias_metric("minority_recall", direction="maximize", needs=())
def minority_recall(y_true, y_pred) -> float:  # noqa: ANN001
    """Mean recall of the rarest quarter of classes (class-imbalance bias; no group column)."""
    return _value(_minority_recall, y_true, y_pred, None)


@bias_metric("minority_majority_recall_gap", needs=())
def minority_majority_recall_gap(y_true, y_pred) -> float:  # noqa: ANN001
    """Mean recall of the commonest quarter of classes minus that of the rarest quarter (signed)."""
    return _value(_minority_majority_gap, y_true, y_pred, None)


# ----------------------------------------------------------------------------- fast versions

_REDUCERS = {
    "demographic_parity_difference": _dp,
    "equalized_odds_difference": _eo,
    "equal_opportunity_difference": _eopp,
    "tpr_gap_rms": _tpr_rms,
    "tpr_gap_max": _tpr_max,
    "tpr_gap_signed": lambda c: nan_mean(_tpr_gaps(c)),
    "worst_group_accuracy": _worst_acc,
    "accuracy_gap": _acc_gap,
}


def _encoder(fn):  # noqa: ANN001, ANN202
    def enc(record: EvalRecord) -> Coded:
        return confusion_coded(
            record.y_true, record.y_pred, record.groups, fn, n_classes=record.n_classes
        )

    return enc


for _name, _fn in _REDUCERS.items():
    batched(_name)(_encoder(_fn))


def _pooled_encoder(fn):  # noqa: ANN001, ANN202
    def enc(record: EvalRecord) -> Coded:
        return confusion_coded(record.y_true, record.y_pred, None, fn, n_classes=record.n_classes)

    return enc


batched("minority_recall")(_pooled_encoder(_minority_recall))
batched("minority_majority_recall_gap")(_pooled_encoder(_minority_majority_gap))


def fast_value(name: str, y_true, y_pred, sensitive_features) -> float:  # noqa: ANN001
    """The vectorized (bootstrap) version of a group metric on one split, for tests and reports."""
    rec = EvalRecord(np.asarray(y_true), np.asarray(y_pred), np.asarray(sensitive_features))
    return ENCODERS[name](rec).value()


def _two_groups(values: Collection[object]) -> str | None:
    return None if len(set(values)) == 2 else f"needs exactly 2 groups, got {sorted(set(values))}"


GROUP_RULES["tpr_gap_signed"] = GroupRule(2, 2, _two_groups)

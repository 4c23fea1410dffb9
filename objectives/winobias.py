"""Coreference-style gender bias: WinoBias pro/anti gap, pronoun gender gap, GAP's F1 ratio.

WinoBias (Zhao et al. 2018) pairs each sentence with a pro-stereotyped and an anti-stereotyped
version; a model that leans on occupation stereotypes is more accurate on the pro half. GAP
(Webster et al. 2018) reports bias as F1(feminine) / F1(masculine); here 0 means parity.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np

from nas_fair.errors import UserError
from nas_fair.objectives.base import EvalRecord, bias_metric
from nas_fair.objectives.stats import (
    GROUP_RULES,
    Coded,
    GroupRule,
    batched,
    class_index,
    nan_mean,
    safe_div,
)

MALE = frozenset({"male", "m", "masculine", "man", "men", "he"})
FEMALE = frozenset({"female", "f", "feminine", "woman", "women", "she"})


def _stereotype_index(stereotype: np.ndarray) -> np.ndarray:
    """0 for "pro", 1 for "anti" (case-insensitive); anything else is an error."""
    s = np.char.lower(np.asarray(stereotype).astype(str))
    bad = sorted(set(s[(s != "pro") & (s != "anti")].tolist()))
    if bad:
        raise UserError(f"stereotype labels must be 'pro' or 'anti', got {bad[:5]}")
    return (s == "anti").astype(np.int64)


def _gender_index(groups: np.ndarray, metric: str) -> np.ndarray:
    """0 masculine, 1 feminine, 2 other (ignored); both genders must occur."""
    s = np.char.lower(np.char.strip(np.asarray(groups).astype(str)))
    idx = np.full(len(s), 2, dtype=np.int64)
    idx[np.isin(s, list(MALE))] = 0
    idx[np.isin(s, list(FEMALE))] = 1
    if not ((idx == 0).any() and (idx == 1).any()):
        raise UserError(
            f"{metric} needs both masculine and feminine rows in sensitive_features "
            f"(values like 'male'/'female'), got {sorted(set(s.tolist()))[:6]}"
        )
    return idx


def _acc_gap(counts: np.ndarray) -> np.ndarray:
    """counts (..., G, 2) of (wrong, right): accuracy(group 0) - accuracy(group 1)."""
    acc = safe_div(counts[..., 1], counts.sum(axis=-1))
    return acc[..., 0] - acc[..., 1]


def _correct_coded(y_true: np.ndarray, y_pred: np.ndarray, g: np.ndarray, n_groups: int) -> Coded:
    r = (np.asarray(y_true) == np.asarray(y_pred)).astype(np.int64)
    return Coded(g, r, n_groups, 2, _acc_gap)


@bias_metric("pro_anti_gap", needs=("stereotype",))
def pro_anti_gap(y_true, y_pred, *, stereotype) -> float:  # noqa: ANN001
    """Accuracy on pro-stereotyped minus anti-stereotyped examples (signed; > 0: stereotyped)."""
    g = _stereotype_index(stereotype)
    return float(_correct_coded(y_true, y_pred, g, 2).value())


@batched("pro_anti_gap")
def _pro_anti_enc(record: EvalRecord) -> Coded:
    return _correct_coded(record.y_true, record.y_pred, _stereotype_index(record.stereotype), 2)


@bias_metric("pronoun_gender_gap")
def pronoun_gender_gap(y_true, y_pred, *, sensitive_features) -> float:  # noqa: ANN001
    """Accuracy on male-pronoun minus female-pronoun examples (signed; > 0: favours male)."""
    g = _gender_index(sensitive_features, "pronoun_gender_gap")
    return float(_correct_coded(y_true, y_pred, g, 3).value())


@batched("pronoun_gender_gap")
def _pronoun_enc(record: EvalRecord) -> Coded:
    g = _gender_index(record.groups, "pronoun_gender_gap")
    return _correct_coded(record.y_true, record.y_pred, g, 3)


def _f1_ratio_bias(c: np.ndarray) -> np.ndarray:
    """|1 - F1(fem) / F1(masc)| from counts (..., 3, K, K).

    Binary: F1 of the positive (second) class. Multi-class: macro F1 over the classes with true
    examples in that gender. F1(masc) = 0 gives 0 when F1(fem) is 0 too, else inf.
    """
    k = c.shape[-1]
    tp = np.diagonal(c, axis1=-2, axis2=-1)
    true_n, pred_n = c.sum(axis=-1), c.sum(axis=-2)
    f1 = np.where(true_n + pred_n > 0, safe_div(2 * tp, true_n + pred_n), 0.0)
    if k == 2:
        per_group = f1[..., 1]
    else:
        per_group = nan_mean(np.where(true_n > 0, f1, np.nan))
    masc, fem = per_group[..., 0], per_group[..., 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.abs(1.0 - fem / masc)
    return np.where(masc > 0, ratio, np.where(fem > 0, np.inf, 0.0))


def _gap_coded(y_true, y_pred, groups, n_classes: int | None = None) -> Coded:  # noqa: ANN001
    g = _gender_index(groups, "gap_f1_ratio_bias")
    (t, p), classes = class_index(y_true, y_pred, n_classes=n_classes)
    k = len(classes)

    def reduce(counts: np.ndarray) -> np.ndarray:
        return _f1_ratio_bias(counts.reshape(*counts.shape[:-1], k, k))

    return Coded(g, t * k + p, 3, k * k, reduce)


@bias_metric("gap_f1_ratio_bias", absolute=True)
def gap_f1_ratio_bias(y_true, y_pred, *, sensitive_features) -> float:  # noqa: ANN001
    """|1 - F1(feminine) / F1(masculine)| (GAP); binary F1 of class 1, else macro F1 per gender."""
    return _gap_coded(y_true, y_pred, sensitive_features).value()


@batched("gap_f1_ratio_bias")
def _gap_enc(record: EvalRecord) -> Coded:
    return _gap_coded(record.y_true, record.y_pred, record.groups, record.n_classes)


def _genders_present(values: Collection[object]) -> str | None:
    s = {str(v).strip().lower() for v in values}
    if s & MALE and s & FEMALE:
        return None
    return f"needs masculine and feminine group values (e.g. 'male'/'female'), got {sorted(s)[:6]}"


GROUP_RULES["pronoun_gender_gap"] = GroupRule(2, None, _genders_present)
GROUP_RULES["gap_f1_ratio_bias"] = GroupRule(2, None, _genders_present)

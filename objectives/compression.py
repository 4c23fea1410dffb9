"""Who pays for compression (Hooker et al. 2020): where the compressed model's predictions
depart from the uncompressed reference's.

Top-line accuracy can stay flat while the predictions that change concentrate on one group; the
per-group flip rate shows it without needing the changes to be errors.
"""

from __future__ import annotations

import numpy as np

from nas_fair.errors import UserError
from nas_fair.objectives.base import EvalRecord, bias_metric
from nas_fair.objectives.stats import Coded, batched, group_index, nan_max, nan_min, safe_div


def _flips(y_pred: np.ndarray, y_pred_reference: np.ndarray) -> np.ndarray:
    a, b = np.asarray(y_pred), np.asarray(y_pred_reference)
    if a.shape != b.shape:
        raise UserError(
            f"reference predictions must align with predictions: {b.shape} vs {a.shape}"
        )
    return (a != b).astype(np.int64)


def _group_rates(counts: np.ndarray) -> np.ndarray:
    """counts (..., G, 2) of (same, flipped) -> flip rate per group (NaN for an empty group)."""
    return safe_div(counts[..., 1], counts.sum(axis=-1))


def _gap(counts: np.ndarray) -> np.ndarray:
    r = _group_rates(counts)
    return nan_max(r) - nan_min(r)


def _ratio(counts: np.ndarray) -> np.ndarray:
    """max / min group flip rate; 1.0 when no group has flips, inf when only the lowest has none."""
    r = _group_rates(counts)
    hi, lo = nan_max(r), nan_min(r)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = hi / lo
    return np.where(lo > 0, q, np.where(hi > 0, np.inf, np.where(np.isnan(hi), np.nan, 1.0)))


def _overall(counts: np.ndarray) -> np.ndarray:
    c = counts.sum(axis=-2)
    return safe_div(c[..., 1], c.sum(axis=-1))


def _coded(y_pred, y_pred_reference, groups, reduce) -> Coded:  # noqa: ANN001
    r = _flips(y_pred, y_pred_reference)
    if groups is None:
        return Coded(np.zeros(len(r), dtype=np.int64), r, 1, 2, reduce, has_groups=False)
    g, names = group_index(groups)
    return Coded(g, r, len(names), 2, reduce)


@bias_metric("compression_flip_rate", needs=("y_pred_reference",))
def compression_flip_rate(y_true, y_pred, *, y_pred_reference) -> float:  # noqa: ANN001
    """Share of predictions that differ from the uncompressed reference model's."""
    return _coded(y_pred, y_pred_reference, None, _overall).value()


@bias_metric(
    "compression_flip_rate_gap", needs=("sensitive_features", "y_pred_reference"), absolute=True
)
def compression_flip_rate_gap(y_true, y_pred, *, sensitive_features, y_pred_reference) -> float:  # noqa: ANN001
    """Highest minus lowest per-group share of predictions that differ from the reference's."""
    return _coded(y_pred, y_pred_reference, sensitive_features, _gap).value()


@bias_metric(
    "compression_flip_ratio", needs=("sensitive_features", "y_pred_reference"), absolute=True
)
def compression_flip_ratio(y_true, y_pred, *, sensitive_features, y_pred_reference) -> float:  # noqa: ANN001
    """Highest over lowest per-group flip rate (1 = equal; inf when the lowest group has none)."""
    return _coded(y_pred, y_pred_reference, sensitive_features, _ratio).value()


@batched("compression_flip_rate")
def _rate_enc(record: EvalRecord) -> Coded:
    return _coded(record.y_pred, record.y_pred_ref, None, _overall)


@batched("compression_flip_rate_gap")
def _gap_enc(record: EvalRecord) -> Coded:
    return _coded(record.y_pred, record.y_pred_ref, record.groups, _gap)


@batched("compression_flip_ratio")
def _ratio_enc(record: EvalRecord) -> Coded:
    return _coded(record.y_pred, record.y_pred_ref, record.groups, _ratio)


def flip_rates_by_group(record: EvalRecord) -> dict[object, float]:
    """Per-group flip rate against the reference, for reports (group value -> rate)."""
    if record.y_pred_ref is None:
        raise UserError("flip_rates_by_group needs the reference model's predictions (y_pred_ref)")
    if record.groups is None:
        raise UserError("flip_rates_by_group needs a group column; set [data] group_column")
    coded = _coded(record.y_pred, record.y_pred_ref, record.groups, _group_rates)
    _, names = group_index(record.groups)
    rates = coded.reduce(coded.counts().astype(float))
    return {n.item() if hasattr(n, "item") else n: float(v) for n, v in zip(names, rates)}

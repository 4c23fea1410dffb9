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


def disparity_by_group(record: EvalRecord) -> dict[str, dict[str, float]]:
    """Who paid for compression, per group (the report's compression-disparity view).

    For each group: its row count ``n`` and the shares of its rows whose prediction changed
    (``flipped``), went from right to wrong (``newly_wrong``) and from wrong to right
    (``newly_right``) against the reference. Flips between two wrong classes count only in
    ``flipped``. Group names are strings (JSON keys).
    """
    if record.y_pred_ref is None:
        raise UserError("disparity_by_group needs the reference model's predictions (y_pred_ref)")
    if record.groups is None:
        raise UserError("disparity_by_group needs a group column; set [data] group_column")
    y, p, r = (np.asarray(a) for a in (record.y_true, record.y_pred, record.y_pred_ref))
    g, names = group_index(record.groups)
    ref_right, now_right = r == y, p == y
    out = {}
    for k, name in enumerate(names):
        rows = g == k
        n = int(rows.sum())
        out[str(name.item() if hasattr(name, "item") else name)] = {
            "n": n,
            "flipped": float((p[rows] != r[rows]).mean()) if n else float("nan"),
            "newly_wrong": float((ref_right & ~now_right)[rows].mean()) if n else float("nan"),
            "newly_right": float((~ref_right & now_right)[rows].mean()) if n else float("nan"),
        }
    return out

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


DISPARITY_SHARES = ("flipped", "newly_wrong", "newly_right")


def permutation_chi2(outcome: np.ndarray, groups: np.ndarray, *, n: int = 1000,
                     seed: int = 0) -> dict[str, float]:
    """Do groups differ in the rate of a 0/1 ``outcome``? Pearson's chi-square of the
    (group x outcome) table and its permutation p-value, p = (1 + #{null >= observed}) /
    (1 + n) over ``n`` seeded shuffles of the outcomes across rows. A shuffle only matters
    through each group's count of ones, whose distribution is multivariate hypergeometric, so
    those counts are drawn directly: the same test, without an (n x rows) matrix. Exact for
    small counts, where the chi-square distribution is not; with two groups it is the
    two-proportion test."""
    if n < 1:
        raise UserError(f"permutation n must be >= 1, got {n!r}")
    o = np.asarray(outcome).astype(bool).ravel()
    g, names = group_index(groups)
    if len(o) != len(g):
        raise UserError(f"outcome and groups must align: {len(o)} vs {len(g)} rows")
    sizes = np.bincount(g, minlength=len(names))
    total, rows = int(o.sum()), len(o)

    def chi2(ones: np.ndarray) -> np.ndarray:
        """Pearson's chi-square from the per-group counts of ones (margins fixed)."""
        p = total / rows if rows else 0.0
        if p in (0.0, 1.0):
            return np.zeros(ones.shape[:-1])
        expected = sizes * p
        return (((ones - expected) ** 2) / (expected * (1.0 - p))).sum(axis=-1)

    observed = float(chi2(np.bincount(g[o], minlength=len(names)).astype(float)))
    rng = np.random.default_rng(seed)
    good = np.full(n, total, dtype=np.int64)
    bad = np.full(n, rows - total, dtype=np.int64)
    ones = np.empty((n, len(names)))
    for k, size in enumerate(sizes):  # each group draws its ones from what is left
        drawn = good if k == len(sizes) - 1 else rng.hypergeometric(good, bad, int(size))
        ones[:, k] = drawn
        good, bad = good - drawn, bad - (int(size) - drawn)
    hits = int(np.sum(chi2(ones) >= observed - 1e-9 * max(1.0, observed)))
    return {"chi2": observed, "p_value": (1 + hits) / (1 + n), "n_permutations": n,
            "seed": seed, "groups": len(names)}


def disparity_stats(record: EvalRecord, *, n: int = 1000, seed: int = 0,
                    ci: float = 0.95) -> dict[str, object]:
    """Uncertainty for ``disparity_by_group``: each group's shares (changed, right to wrong,
    wrong to right) with Wilson intervals, and per share a seeded permutation chi-square test
    of "the groups' shares are equal" (rows of different groups are different examples, so the
    between-group test is unpaired; each row is paired with the reference's prediction on it).
    """
    from nas_fair.objectives.collapse import wilson_interval

    by_group = disparity_by_group(record)  # checks the record's reference and groups
    y, p, r = (np.asarray(a) for a in (record.y_true, record.y_pred, record.y_pred_ref))
    outcomes = {"flipped": p != r, "newly_wrong": (r == y) & (p != y),
                "newly_right": (r != y) & (p == y)}
    g, names = group_index(record.groups)
    groups: dict[str, dict[str, list[float]]] = {}
    for k, name in enumerate(names):
        rows = g == k
        key = str(name.item() if hasattr(name, "item") else name)
        groups[key] = {s: list(wilson_interval(int(outcomes[s][rows].sum()), int(rows.sum()), ci))
                       for s in DISPARITY_SHARES}
    tests = {s: permutation_chi2(outcomes[s], record.groups, n=n, seed=seed)
             for s in DISPARITY_SHARES}
    if len(by_group) == 2:  # the difference the test is about, second group minus first
        a, b = by_group
        for s in DISPARITY_SHARES:
            tests[s]["difference"] = by_group[b][s] - by_group[a][s]
    return {"interval": f"Wilson {ci:.0%}", "groups": groups, "tests": tests,
            "test": "permutation chi-square (outcomes shuffled across rows)"}

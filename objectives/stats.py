"""Uncertainty for metric values: bootstrap intervals, permutation nulls, paired differences.

A trial's bias value on a few thousand rows is noisy, and an absolute gap (max - min over groups)
is >= 0 even for an unbiased model. So every reported value gets a percentile bootstrap interval,
absolute metrics also get a permutation p-value, and a compressed model is compared with its
reference on the *same* resampled rows.

Speed: a metric module may register an *encoder* (``@batched(name)``) that reduces each row to a
(group, code) pair such that the metric is a function of the count table ``counts[group, code]``
alone (e.g. code = true * K + pred for confusion-based metrics). Then all resamples are counted
at once with one ``np.bincount`` and reduced in a vectorized call: no fairlearn or pandas in any
loop. Metrics without an encoder fall back to calling the metric on ``record.take(idx)`` per
resample (correct, slower).

Resampling is stratified by true class (each resample keeps the class counts of the split), so
class-imbalance metrics pick the same minority classes in every resample, and group labels are
permuted *within* true class, so the null keeps each group's label mix.

Reuse: the resamples depend only on the true labels, ``n`` and the seed, and many metrics share
one coding (every confusion-based group metric counts the same (group, true * K + pred) pairs),
so resample indices, count tables and permuted groups are memoized by content (a digest of the
arrays they come from): a study's 16 metrics count each coding once, and the reference's tables,
paired with every trial, are counted once per session. The same numbers, at a fraction of the
cost (``benchmarks/metrics_cost.py``; docs/measurements.md, "Scoring a trial's metrics").
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np

from nas_fair.errors import UserError, did_you_mean
from nas_fair.objectives.base import ACCURACY, BIAS, NEEDS, EvalRecord, Metric

# Rows per resample chunk times resamples, so memory stays ~tens of MB for large splits.
_CHUNK_CELLS = 4_000_000
# Memoized resamples and count tables (see the module docstring), least recently used dropped
# beyond this many bytes: room for the reference's tables and several trials' on the default
# study (docs/measurements.md, "Figures once quoted in code comments").
_MEMO_BYTES = 256 * 2**20
_MEMO: OrderedDict[tuple[Any, ...], tuple[Any, int]] = OrderedDict()
_T = TypeVar("_T")


def _memo(key: tuple[Any, ...], make: Callable[[], _T]) -> _T:
    if key in _MEMO:
        _MEMO.move_to_end(key)
        return _MEMO[key][0]
    value = make()
    size = sum(a.nbytes for a in value) if isinstance(value, list) else 0
    if size <= _MEMO_BYTES:
        _MEMO[key] = (value, size)
        while sum(n for _, n in _MEMO.values()) > _MEMO_BYTES:
            _MEMO.popitem(last=False)
    return value


def _digest(*arrays: np.ndarray) -> str:
    """Content key of arrays (dtype, shape and bytes), so a mutated record never hits."""
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes() if a.dtype != object else repr(a.tolist()).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class Coded:
    """A record reduced to integer codes: the metric is ``reduce(counts)`` of the (G, R) table."""

    g: np.ndarray  # (n,) group index in [0, n_groups); 0 everywhere for group-free metrics
    r: np.ndarray  # (n,) code in [0, n_codes)
    n_groups: int
    n_codes: int
    reduce: Callable[[np.ndarray], np.ndarray]  # counts (..., G, R) -> values (...)
    has_groups: bool = True  # False: the metric does not depend on a group column

    def counts(self, g: np.ndarray | None = None, r: np.ndarray | None = None) -> np.ndarray:
        """Count table(s): 1-D codes give (G, R); (B, n) matrices give (B, G, R)."""
        g = self.g if g is None else g
        r = self.r if r is None else r
        m = self.n_groups * self.n_codes
        flat = g * self.n_codes + r
        if flat.ndim == 1:
            return np.bincount(flat, minlength=m).reshape(self.n_groups, self.n_codes)
        b = flat.shape[0]
        flat = flat + (np.arange(b, dtype=np.int64) * m)[:, None]
        return np.bincount(flat.ravel(), minlength=b * m).reshape(b, self.n_groups, self.n_codes)

    def value(self) -> float:
        return float(self.reduce(self.counts().astype(float)))


Encoder = Callable[[EvalRecord], Coded]
ENCODERS: dict[str, Encoder] = {}


@dataclass(frozen=True)
class GroupRule:
    """How many groups a group metric needs, and an optional check of the group values."""

    min_groups: int = 2
    max_groups: int | None = None
    # values -> error text (or None when fine), e.g. "needs 'male' and 'female' groups".
    values_check: Callable[[Collection[object]], str | None] | None = None


GROUP_RULES: dict[str, GroupRule] = {}

# Metrics computed from the model rather than from rows (e.g. the encoder's WEAT effect size):
# name -> f(record, ref_record, *, n, seed, ci) -> score_bias's row. A row bootstrap would
# leave them unchanged, so they bring their own intervals and p-value.
ModelLevel = Callable[..., dict[str, Any]]
MODEL_LEVEL: dict[str, ModelLevel] = {}


def batched(name: str) -> Callable[[Encoder], Encoder]:
    """Register the vectorized encoder of metric ``name`` (see module docstring)."""

    def deco(fn: Encoder) -> Encoder:
        if name in ENCODERS:
            raise ValueError(f"encoder for metric {name!r} registered twice")
        ENCODERS[name] = fn
        return fn

    return deco


# ----------------------------------------------------------------------------- encoding helpers


def class_index(
    *arrays: np.ndarray, n_classes: int | None = None
) -> tuple[list[np.ndarray], np.ndarray]:
    """Map labels of several aligned arrays to 0..K-1 over their sorted union (+ range(n_classes))."""
    parts = [np.asarray(a).ravel() for a in arrays]
    union = np.unique(np.concatenate(parts))
    if n_classes is not None and np.issubdtype(union.dtype, np.integer):
        union = np.union1d(union, np.arange(n_classes))
    return [np.searchsorted(union, p).astype(np.int64) for p in parts], union


def group_index(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct group values and each row's index into them."""
    names, idx = np.unique(np.asarray(groups), return_inverse=True)
    return idx.astype(np.int64).ravel(), names


def confusion_coded(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    groups: np.ndarray | None,
    reduce_confusion: Callable[[np.ndarray], np.ndarray],
    *,
    n_classes: int | None = None,
) -> Coded:
    """Code = true * K + pred; ``reduce_confusion`` gets counts shaped (..., G, K, K)."""
    (t, p), classes = class_index(y_true, y_pred, n_classes=n_classes)
    k = len(classes)
    if groups is None:
        g, n_groups, has = np.zeros(len(t), dtype=np.int64), 1, False
    else:
        g, names = group_index(groups)
        n_groups, has = len(names), True

    def reduce(counts: np.ndarray) -> np.ndarray:
        return reduce_confusion(counts.reshape(*counts.shape[:-1], k, k))

    return Coded(g, t * k + p, n_groups, k * k, reduce, has)


def confusion(y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """Float confusion counts (G, K, K) [group, true, pred] over the labels' sorted union."""
    coded = confusion_coded(y_true, y_pred, groups, lambda c: c)
    return coded.reduce(coded.counts().astype(float))


def nan_max(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Max ignoring NaN; NaN where every entry is NaN (no warning)."""
    m = np.where(np.isnan(x), -np.inf, x).max(axis=axis)
    return np.where(np.isneginf(m) & np.isnan(x).all(axis=axis), np.nan, m)


def nan_min(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return -nan_max(-x, axis=axis)


def nan_mean(x: np.ndarray, axis: int = -1) -> np.ndarray:
    ok = ~np.isnan(x)
    n = ok.sum(axis=axis)
    s = np.where(ok, x, 0.0).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, s / np.maximum(n, 1), np.nan)


def safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b with NaN where b == 0 (an undefined rate, not a zero rate)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1.0), np.nan)


# ----------------------------------------------------------------------------- resampling


def _row_metric(metric: Metric | str) -> Metric:
    """A metric that row resampling applies to (not a MODEL_LEVEL one)."""
    m = _metric(metric)
    if m.name in MODEL_LEVEL:
        raise UserError(f"metric {m.name!r} is computed from the model, not from rows: its "
                        "interval and p-value come from score_bias, not a row bootstrap")
    return m


def _metric(metric: Metric | str) -> Metric:
    if isinstance(metric, Metric):
        return metric
    if metric in BIAS:
        return BIAS[metric]
    if metric in ACCURACY:
        return ACCURACY[metric]
    names = [*BIAS, *ACCURACY]
    raise UserError(
        f"unknown metric {metric!r}{did_you_mean(metric, names)}; "
        f"available: {', '.join(sorted(names))}"
    )


def _require(metric: Metric, record: EvalRecord) -> None:
    missing = [n for n in metric.needs if getattr(record, NEEDS[n]) is None]
    if missing:
        raise UserError(
            f"metric {metric.name!r} needs {', '.join(missing)}, which this evaluation record "
            f"does not have (EvalRecord.{NEEDS[missing[0]]} is None)"
        )


def _strata(y_true: np.ndarray) -> list[np.ndarray]:
    """Row indices of each true class, in class order."""
    (t,), _ = class_index(y_true)
    order = np.argsort(t, kind="stable")
    cuts = np.flatnonzero(np.diff(t[order])) + 1
    return np.split(order, cuts)


def _resample_chunks(
    strata: Sequence[np.ndarray], n: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """(b, rows) index matrices, stratified by true class, ``n`` resamples in all."""
    rows = sum(len(s) for s in strata)
    step = max(1, _CHUNK_CELLS // max(rows, 1))
    out = []
    for start in range(0, n, step):
        b = min(step, n - start)
        out.append(
            np.concatenate([s[rng.integers(0, len(s), size=(b, len(s)))] for s in strata], axis=1)
        )
    return out


class Resamples(list):
    """:func:`_resample_chunks`' matrices with the key they were drawn from (for the memo)."""

    key: tuple[Any, ...] = ()


def resamples(y_true: np.ndarray, n: int, seed: int) -> Resamples:
    """The stratified resamples ``bootstrap`` and ``paired_difference`` draw for ``seed``."""
    key = ("resamples", _digest(np.asarray(y_true)), n, seed)

    def make() -> Resamples:
        out = Resamples(_resample_chunks(_strata(y_true), n, np.random.default_rng(seed)))
        out.key = key
        return out

    return _memo(key, make)


def _coded_key(coded: Coded) -> tuple[Any, ...]:
    return (_digest(coded.g, coded.r), coded.n_groups, coded.n_codes)


def resampled_counts(coded: Coded, chunks: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Count tables (b, G, R) of ``coded`` on each chunk of resamples, memoized when the chunks
    come from :func:`resamples` (metrics sharing a coding count it once)."""

    def tables() -> list[np.ndarray]:
        return [coded.counts(coded.g[idx], coded.r[idx]) for idx in chunks]

    key = getattr(chunks, "key", ())
    return _memo(("counts", *_coded_key(coded), *key), tables) if key else tables()


def _values(metric: Metric, record: EvalRecord, chunks: Sequence[np.ndarray]) -> np.ndarray:
    """Metric value on each resample (rows of the index matrices)."""
    enc = ENCODERS.get(metric.name)
    if enc is not None:
        coded = enc(record)
        counted = resampled_counts(coded, chunks)
        return np.concatenate([coded.reduce(c.astype(float)) for c in counted])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.array([metric(record.take(i)) for idx in chunks for i in idx], dtype=float)


def percentile_interval(values: np.ndarray, ci: float) -> tuple[float, float]:
    """Percentile interval over the defined resamples (NaN: metric undefined on that resample)."""
    v = values[~np.isnan(values)]
    if len(v) == 0:
        return math.nan, math.nan
    a = (1.0 - ci) / 2.0
    # Interpolating between two infinite values gives NaN; pick sample values then.
    method = "linear" if np.isfinite(v).all() else "inverted_cdf"
    lo, hi = np.quantile(v, [a, 1.0 - a], method=method)
    return float(lo), float(hi)


def bootstrap(
    metric: Metric | str, record: EvalRecord, *, n: int = 1000, seed: int = 0, ci: float = 0.95
) -> tuple[float, float, float]:
    """(value, low, high): point value and percentile bootstrap interval over rows.

    Resamples are stratified by true class. For an absolute gap near 0 the bootstrap
    distribution sits above the point value (max - min of noisy rates), so the interval may
    exclude it; read such metrics with ``permutation_pvalue``.
    """
    if not 0.0 < ci < 1.0:
        raise UserError(f"ci must be in (0, 1), got {ci!r}")
    if n < 1:
        raise UserError(f"bootstrap n must be >= 1, got {n!r}")
    m = _row_metric(metric)
    _require(m, record)
    value = m(record)
    lo, hi = percentile_interval(_values(m, record, resamples(record.y_true, n, seed)), ci)
    return value, lo, hi


def paired_difference(
    metric: Metric | str,
    record: EvalRecord,
    ref_record: EvalRecord,
    *,
    n: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> tuple[float, float, float]:
    """(diff, low, high) of metric(record) - metric(ref_record), same resampled rows for both.

    Pairing removes the split's sampling noise shared by both models, so the interval is much
    tighter than the two separate intervals suggest.
    """
    m = _row_metric(metric)
    _require(m, record)
    _require(m, ref_record)
    if len(record) != len(ref_record):
        raise UserError(
            f"paired records must have aligned rows; got {len(record)} and {len(ref_record)} rows"
        )
    bad = int(np.sum(np.asarray(record.y_true) != np.asarray(ref_record.y_true)))
    if bad:
        raise UserError(f"paired records must have aligned rows; y_true differs in {bad} rows")
    diff = m(record) - m(ref_record)
    chunks = resamples(record.y_true, n, seed)
    d = _values(m, record, chunks) - _values(m, ref_record, chunks)
    lo, hi = percentile_interval(d, ci)
    return diff, lo, hi


def permutation_pvalue(
    metric: Metric | str, record: EvalRecord, *, n: int = 1000, seed: int = 0
) -> float:
    """One-sided p-value of the metric under "groups do not matter".

    Group labels are shuffled within each true class; p = (1 + #{null >= observed}) / (1 + n).
    Resamples where the metric is undefined (NaN) count as not >= observed.
    """
    if n < 1:
        raise UserError(f"permutation n must be >= 1, got {n!r}")
    m = _row_metric(metric)
    _require(m, record)
    rng = np.random.default_rng(seed)
    strata = _strata(record.y_true)
    order = np.concatenate(strata)
    enc = ENCODERS.get(m.name)
    if enc is not None:
        coded = enc(record)
        if not coded.has_groups:
            raise UserError(f"permutation test needs a group column; metric {m.name!r} has none")
        observed = coded.value()
        labels = _digest(np.asarray(record.y_true))

        def permuted() -> list[np.ndarray]:
            g_blocks = [coded.g[s] for s in strata]
            step = max(1, _CHUNK_CELLS // max(len(order), 1))
            return [np.concatenate([rng.permuted(np.tile(gb, (min(step, n - start), 1)), axis=1)
                                    for gb in g_blocks], axis=1)
                    for start in range(0, n, step)]

        def tables() -> list[np.ndarray]:
            groups = _memo(("permuted", _digest(coded.g), labels, n, seed), permuted)
            r_ord = coded.r[order]
            return [coded.counts(g, np.broadcast_to(r_ord, g.shape)) for g in groups]

        counted = _memo(("null", *_coded_key(coded), labels, n, seed), tables)
        null_v = np.concatenate([coded.reduce(c.astype(float)) for c in counted])
    else:
        if "sensitive_features" not in m.needs:
            raise UserError(f"permutation test needs a group column; metric {m.name!r} has none")
        observed = m(record)
        groups = np.asarray(record.groups)
        null_v = np.empty(n)
        for i in range(n):
            shuffled = groups.copy()
            for s in strata:
                shuffled[s] = groups[rng.permutation(s)]
            null_v[i] = m(replace(record, groups=shuffled))
    if math.isnan(observed):
        return math.nan
    hits = int(np.sum(null_v >= observed - 1e-12 * max(1.0, abs(observed))))
    return (1 + hits) / (1 + n)


# ----------------------------------------------------------------------------- study-level API


def score_bias(
    names: Sequence[str],
    record: EvalRecord,
    ref_record: EvalRecord | None = None,
    *,
    n: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    skip_unavailable: bool = False,
) -> dict[str, dict[str, object]]:
    """Value, interval, p-value (absolute metrics) and paired difference to the reference.

    Keys per metric: value, ci_low, ci_high, direction, absolute, [p_value], and with a
    reference record ref_value, diff, diff_low, diff_high. A metric whose needs the record
    lacks raises UserError, or is left out when ``skip_unavailable``.
    """
    out: dict[str, dict[str, object]] = {}
    for name in names:
        m = _metric(name)
        if not m.available(record) or (ref_record is not None and not m.available(ref_record)):
            if skip_unavailable:
                continue
            _require(m, record)
            _require(m, ref_record)  # type: ignore[arg-type]
        if name in MODEL_LEVEL:
            out[name] = MODEL_LEVEL[name](record, ref_record, n=n, seed=seed, ci=ci)
            continue
        value, lo, hi = bootstrap(m, record, n=n, seed=seed, ci=ci)
        row: dict[str, object] = {
            "value": value, "ci_low": lo, "ci_high": hi,
            "direction": m.direction, "absolute": m.absolute,
        }
        if m.absolute:
            row["p_value"] = permutation_pvalue(m, record, n=n, seed=seed)
        if ref_record is not None:
            diff, dlo, dhi = paired_difference(m, record, ref_record, n=n, seed=seed, ci=ci)
            row.update(ref_value=m(ref_record), diff=diff, diff_low=dlo, diff_high=dhi)
        out[name] = row
    return out


_NEED_TEXT = {
    "sensitive_features": "a group column; set [data] group_column",
    "y_pred_counterfactual": "predictions on gender-swapped inputs (counterfactual data)",
    "y_pred_reference": "the uncompressed reference model's predictions",
    "stereotype": "pro/anti stereotype labels (WinoBias-style data)",
    "encoder_probe": "the encoder's sentence embeddings (computed by the study session)",
}


def check_metric_applicable(
    name: str,
    *,
    has_groups: bool,
    n_groups: int,
    has_counterfactual: bool,
    has_stereotype: bool,
    has_reference: bool,
    group_values: Collection[object] | None = None,
    has_probe: bool = True,
) -> None:
    """Fail at study start, with one line, when metric ``name`` cannot be computed on this data."""
    have = {
        "sensitive_features": has_groups,
        "y_pred_counterfactual": has_counterfactual,
        "stereotype": has_stereotype,
        "y_pred_reference": has_reference,
        "encoder_probe": has_probe,  # a session embeds the WEAT sentences of every model
    }
    m = _metric(name)
    pool = BIAS if name in BIAS else ACCURACY

    def usable(x: Metric) -> bool:
        if not all(have[nd] for nd in x.needs):
            return False
        if "sensitive_features" in x.needs:
            rule = GROUP_RULES.get(x.name, GroupRule())
            hi = rule.max_groups if rule.max_groups is not None else n_groups
            return rule.min_groups <= n_groups <= hi
        return True

    alternatives = ", ".join(sorted(k for k, x in pool.items() if usable(x))) or "(none)"
    for need in m.needs:
        if not have[need]:
            if need == "sensitive_features":
                raise UserError(
                    f"metric {name!r} needs a group column; set [data] group_column or pick one "
                    f"of: {alternatives}"
                )
            raise UserError(
                f"metric {name!r} needs {_NEED_TEXT[need]}, which this study does not have; "
                f"pick one of: {alternatives}"
            )
    if "sensitive_features" in m.needs:
        rule = GROUP_RULES.get(name, GroupRule())
        if n_groups < 2:
            raise UserError(
                f"metric {name!r} compares groups, but the split has a single group "
                f"(n_groups={n_groups}); pick one of: {alternatives}"
            )
        if n_groups < rule.min_groups or (rule.max_groups is not None and n_groups > rule.max_groups):
            want = (
                f"exactly {rule.min_groups}"
                if rule.max_groups == rule.min_groups
                else f"between {rule.min_groups} and {rule.max_groups or 'any number of'}"
            )
            raise UserError(
                f"metric {name!r} needs {want} groups, the split has {n_groups}; "
                f"pick one of: {alternatives}"
            )
        if group_values is not None and rule.values_check is not None:
            problem = rule.values_check(group_values)
            if problem:
                raise UserError(f"metric {name!r} {problem}")

"""Bootstrap intervals, permutation p-values, paired differences and the study-start check."""

from __future__ import annotations

import time

import numpy as np
import pytest

from nas_fair.errors import UserError
from nas_fair.objectives import BIAS, EvalRecord
from nas_fair.objectives import stats as S


def biased_record(n: int = 3000, k: int = 12, seed: int = 0, bias: float = 0.25) -> EvalRecord:
    """Group "f" gets random predictions ``bias`` more often than group "m"."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    g = rng.choice(np.array(["f", "m"]), n)
    noise = np.where(g == "f", 0.2 + bias, 0.2)
    p = np.where(rng.random(n) < noise, rng.integers(0, k, n), y)
    ref = np.where(rng.random(n) < 0.1, rng.integers(0, k, n), p)
    return EvalRecord(y, p, g, y_pred_ref=ref, y_pred_cf=ref, n_classes=k)


def test_bootstrap_contains_value_and_shrinks():
    small, big = biased_record(300), biased_record(3000)
    for name in ("tpr_gap_rms", "accuracy_gap", "worst_group_accuracy", "compression_flip_rate"):
        v, lo, hi = S.bootstrap(name, big, n=400)
        assert lo <= v <= hi, (name, v, lo, hi)
        _, lo_s, hi_s = S.bootstrap(name, small, n=400)
        assert hi - lo < hi_s - lo_s, name


def test_bootstrap_accuracy_metric_and_seed():
    rec = biased_record(500)
    a = S.bootstrap("macro_f1", rec, n=200, seed=1)
    assert a == S.bootstrap("macro_f1", rec, n=200, seed=1)
    assert a[1] <= a[0] <= a[2]


def test_fast_path_equals_slow_path():
    """The vectorized count path gives the same resampled values as calling the metric."""
    rec = biased_record(400, k=4)
    chunks = S._resample_chunks(S._strata(rec.y_true), 25, np.random.default_rng(0))
    for name in S.ENCODERS:
        m = S._metric(name)
        if not m.available(rec) or name in ("pro_anti_gap",):
            continue
        if name in ("pronoun_gender_gap", "gap_f1_ratio_bias"):
            continue  # need male/female groups; covered below
        fast = S._values(m, rec, chunks)
        slow = np.array([m(rec.take(i)) for i in chunks[0]])
        np.testing.assert_allclose(fast, slow, rtol=1e-12, atol=1e-12, err_msg=name)
        assert S.ENCODERS[name](rec).value() == pytest.approx(m(rec)), name


def test_fast_path_equals_slow_path_gender_and_stereotype():
    rng = np.random.default_rng(3)
    n = 300
    y = rng.integers(0, 2, n)
    p = np.where(rng.random(n) < 0.3, 1 - y, y)
    g = rng.choice(np.array(["male", "female"]), n)
    st = rng.choice(np.array(["pro", "anti"]), n)
    rec = EvalRecord(y, p, g, stereotype=st)
    chunks = S._resample_chunks(S._strata(y), 20, np.random.default_rng(0))
    for name in ("pronoun_gender_gap", "gap_f1_ratio_bias", "pro_anti_gap"):
        m = BIAS[name]
        fast = S._values(m, rec, chunks)
        slow = np.array([m(rec.take(i)) for i in chunks[0]])
        np.testing.assert_allclose(fast, slow, rtol=1e-12, err_msg=name)


def test_permutation_pvalue_planted_and_null():
    rec = biased_record(1500)
    assert S.permutation_pvalue("accuracy_gap", rec, n=300) < 0.01
    assert S.permutation_pvalue("tpr_gap_rms", rec, n=300) < 0.01
    null = biased_record(1500, bias=0.0, seed=5)
    rng = np.random.default_rng(7)
    null.groups = rng.choice(np.array(["f", "m"]), len(null))  # groups unrelated to anything
    assert S.permutation_pvalue("accuracy_gap", null, n=300) > 0.05
    assert S.permutation_pvalue("tpr_gap_rms", null, n=300) > 0.05


def test_permutation_needs_groups():
    rec = biased_record(200)
    with pytest.raises(UserError, match="needs a group column"):
        S.permutation_pvalue("compression_flip_rate", rec, n=10)


def test_paired_difference_self_is_zero():
    rec = biased_record(800)
    for name in ("tpr_gap_rms", "accuracy", "compression_flip_rate_gap"):
        assert S.paired_difference(name, rec, rec, n=200) == (0.0, 0.0, 0.0)


def test_paired_difference_detects_shift():
    rec = biased_record(2000, bias=0.3)
    ref = biased_record(2000, bias=0.0)  # same seed: same y_true, same groups
    d, lo, hi = S.paired_difference("accuracy_gap", rec, ref, n=300)
    assert lo <= d <= hi and lo > 0
    bad = EvalRecord(ref.y_true[::-1].copy(), ref.y_pred, ref.groups)
    with pytest.raises(UserError, match="aligned"):
        S.paired_difference("accuracy_gap", rec, bad, n=10)


def test_bootstrap_speed():
    rec = biased_record(3000)
    S.bootstrap("tpr_gap_rms", rec, n=50)  # warm caches
    for name in ("tpr_gap_rms", "equalized_odds_difference", "accuracy_gap"):
        t = time.perf_counter()
        S.bootstrap(name, rec, n=1000)
        assert time.perf_counter() - t < 2.0, name


def test_score_bias_keys():
    rec, ref = biased_record(600), biased_record(600, bias=0.0)
    out = S.score_bias(["tpr_gap_rms", "tpr_gap_signed", "minority_recall"], rec, ref, n=100)
    assert set(out["tpr_gap_rms"]) >= {"value", "ci_low", "ci_high", "p_value", "ref_value",
                                       "diff", "diff_low", "diff_high"}
    assert "p_value" not in out["tpr_gap_signed"]
    assert out["tpr_gap_rms"]["diff"] == pytest.approx(
        out["tpr_gap_rms"]["value"] - out["tpr_gap_rms"]["ref_value"])
    no_groups = EvalRecord(rec.y_true, rec.y_pred)
    with pytest.raises(UserError, match="sensitive_features"):
        S.score_bias(["tpr_gap_rms"], no_groups, n=10)
    assert set(S.score_bias(["tpr_gap_rms", "minority_recall"], no_groups, n=10,
                            skip_unavailable=True)) == {"minority_recall"}


def _check(name: str, **kw) -> None:  # noqa: ANN003
    args = dict(has_groups=True, n_groups=2, has_counterfactual=False, has_stereotype=False,
                has_reference=True)
    args.update(kw)
    S.check_metric_applicable(name, **args)


def test_check_metric_applicable():
    _check("tpr_gap_rms")
    _check("minority_recall", has_groups=False, n_groups=0)
    with pytest.raises(UserError, match="did you mean 'tpr_gap_rms'"):
        _check("tpr_gap_rsm")
    with pytest.raises(UserError, match=r"needs a group column; set \[data\] group_column") as e:
        _check("tpr_gap_rms", has_groups=False, n_groups=0)
    assert "minority_recall" in str(e.value) and "accuracy_gap," not in str(e.value)
    with pytest.raises(UserError, match="single group"):
        _check("accuracy_gap", n_groups=1)
    with pytest.raises(UserError, match="exactly 2 groups"):
        _check("tpr_gap_signed", n_groups=3)
    with pytest.raises(UserError, match="counterfactual"):
        _check("counterfactual_flip_rate")
    with pytest.raises(UserError, match="stereotype"):
        _check("pro_anti_gap")
    with pytest.raises(UserError, match="masculine and feminine"):
        _check("pronoun_gender_gap", group_values=["a", "b"])
    _check("pronoun_gender_gap", group_values=["male", "female"])
    assert "\n" not in str(pytest.raises(UserError, _check, "nope").value)


def test_memo_gives_fresh_numbers_and_follows_mutation():
    """Memoized resamples and count tables change nothing, and a record changed in place
    (same object, other predictions) is counted anew, not read from the memo."""
    rec, ref = biased_record(800, k=5), biased_record(800, k=5, seed=1)
    ref.y_true = rec.y_true
    names = ["tpr_gap_rms", "accuracy_gap", "compression_flip_rate", "counterfactual_flip_rate"]

    def fresh() -> dict:
        S._MEMO.clear()
        return S.score_bias(names, rec, ref, n=60, seed=2)

    first = fresh()
    assert S._MEMO  # the call filled it
    assert S.score_bias(names, rec, ref, n=60, seed=2) == first
    rec.y_pred[: len(rec) // 2] = rec.y_true[: len(rec) // 2]  # in place: same arrays' ids
    warm = S.score_bias(names, rec, ref, n=60, seed=2)
    assert warm != first
    assert warm == fresh()


def test_memo_stays_within_its_byte_budget(monkeypatch):
    monkeypatch.setattr(S, "_MEMO_BYTES", 200_000)
    S._MEMO.clear()
    S.score_bias(["tpr_gap_rms", "accuracy_gap"], biased_record(600, k=6), n=100, seed=0)
    assert 0 < sum(n for _, n in S._MEMO.values()) <= 200_000

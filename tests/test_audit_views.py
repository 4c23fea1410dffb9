"""The bias audit's per-class group rates (and De-Arteaga et al.'s training-share view),
and the encoder's WEAT association, checked against hand computations on small arrays."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from nas_fair.errors import UserError
from nas_fair.objectives import BIAS, EvalRecord
from nas_fair.objectives import association as A
from nas_fair.objectives.class_rates import class_rates, fisher_interval, share_correlation
from nas_fair.objectives.stats import bootstrap, resamples, score_bias

from conftest import WORDS, tiny_config

# ----------------------------------------------------------------------------- class rates

Y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
P = np.array([0, 1, 0, 0, 1, 1, 0, 1, 2, 0])
G = np.array(list("ffmmffmmfm"))


def test_class_rates_match_a_hand_count() -> None:
    r = class_rates(Y, P, sensitive_features=G, n=200, seed=1, class_names=["a", "b", "c"])
    assert r["groups"] == ["f", "m"]
    c0, c1, c2 = r["classes"]
    assert (c0["name"], c1["name"], c2["name"]) == ("a", "b", "c")
    # class 0: f rows 0,1 (pred 0,1) -> 1/2; m rows 2,3 (pred 0,0) -> 2/2
    assert c0["n"] == {"f": 2, "m": 2} and c0["tpr"] == {"f": 0.5, "m": 1.0}
    assert c0["gap"] == -0.5
    # predicted as class 0: f rows 0 -> 1; m rows 2,3,6,9 -> 4
    assert c0["predicted"] == {"f": 1, "m": 4}
    assert c1["tpr"] == {"f": 1.0, "m": 0.5} and c1["gap"] == 0.5
    assert c2["n"] == {"f": 1, "m": 1} and c2["tpr"] == {"f": 1.0, "m": 0.0}


def test_class_rate_intervals_are_the_shared_resamples_counted_by_hand() -> None:
    r = class_rates(Y, P, sensitive_features=G, n=300, seed=3)
    gaps, tpr_f = [], []
    for chunk in resamples(Y, 300, 3):
        for idx in chunk:
            y, p, g = Y[idx], P[idx], G[idx]
            rate = {}
            for grp in "fm":
                m = (y == 1) & (g == grp)
                rate[grp] = (p[m] == 1).mean() if m.any() else math.nan
            tpr_f.append(rate["f"])
            gaps.append(rate["f"] - rate["m"])
    ok = ~np.isnan(gaps)
    lo, hi = np.quantile(np.array(gaps)[ok], [0.025, 0.975])
    assert r["classes"][1]["gap_ci"] == pytest.approx([lo, hi])
    f = np.array(tpr_f)
    assert r["classes"][1]["tpr_ci"]["f"] == pytest.approx(
        list(np.quantile(f[~np.isnan(f)], [0.025, 0.975])))


def test_class_rates_with_three_groups_use_the_spread() -> None:
    g = np.array(list("abcabcabca"))
    r = class_rates(Y, P, sensitive_features=g, n=20)
    assert r["gap_definition"] == "max - min TPR over groups"
    assert share_correlation(r, Y, g) is None  # the share view needs two groups


def test_class_rates_need_groups() -> None:
    with pytest.raises(UserError, match="group column"):
        class_rates(Y, P, sensitive_features=None)


def test_training_share_view_against_hand_pearson_and_fisher() -> None:
    rng = np.random.default_rng(0)
    # 5 classes; the first group's share of each class in training rises with the class index
    share = np.array([0.1, 0.3, 0.5, 0.7, 0.9])
    train_y = np.repeat(np.arange(5), 20)
    train_g = np.array(["f" if rng.random() < share[k] else "m" for k in train_y])
    y = np.repeat(np.arange(5), 40)
    g = np.tile(np.array(["f", "m"]), 100)
    p = np.where(rng.random(200) < 0.7, y, (y + 1) % 5)
    r = class_rates(y, p, sensitive_features=g, n=50)
    view = share_correlation(r, train_y, train_g)
    shares = [float(np.mean(train_g[train_y == k] == "f")) for k in range(5)]
    gaps = [row["gap"] for row in r["classes"]]
    assert [pt["share"] for pt in view["points"]] == pytest.approx(shares)
    want = float(np.corrcoef(shares, gaps)[0, 1])
    assert view["r"] == pytest.approx(want)
    z, half = math.atanh(want), 1.959963984540054 / math.sqrt(5 - 3)
    assert view["r_ci"] == pytest.approx([math.tanh(z - half), math.tanh(z + half)])
    assert all(math.isnan(v) for v in fisher_interval(0.5, 3))  # too few classes


# ----------------------------------------------------------------------------- WEAT statistics


def test_effect_size_and_exact_pvalue_by_hand() -> None:
    a, b = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])
    x = np.array([[1.0, 0.0], [1.0, 1.0]])
    y = np.array([[0.0, 1.0], [1.0, 1.0]])
    # s(w): x -> 1, 0; y -> -1, 0; d = (0.5 + 0.5) / std([1, 0, -1, 0], ddof=1)
    assert A.effect_size(x, y, a, b) == pytest.approx(1.0 / math.sqrt(2.0 / 3.0))
    # partitions of {1, 0, -1, 0} into pairs with sum >= 1: {1, 0} twice of 6
    assert A.permutation_pvalue(x, y, a, b) == pytest.approx(2 / 6)
    assert math.isnan(A.effect_size(x[:1].repeat(2, 0), x[:1].repeat(2, 0), a, b))


def naive_effect(x, y, a, b) -> float:  # noqa: ANN001
    def cos(u, v) -> float:  # noqa: ANN001
        return float(u @ v / np.linalg.norm(u) / np.linalg.norm(v))

    def s(w) -> float:  # noqa: ANN001
        return np.mean([cos(w, t) for t in a]) - np.mean([cos(w, t) for t in b])

    sx, sy = [s(w) for w in x], [s(w) for w in y]
    return (np.mean(sx) - np.mean(sy)) / np.std(sx + sy, ddof=1)


def test_effect_size_and_word_bootstrap_match_a_loop() -> None:
    rng = np.random.default_rng(2)
    vecs = tuple(rng.normal(size=(k, 5)) for k in (6, 5, 4, 3))
    assert A.effect_size(*vecs) == pytest.approx(naive_effect(*vecs))
    idx = A._word_resamples((6, 5, 4, 3), 40, 0)
    fast = A._boot_effects(vecs, idx)
    slow = [A.effect_size(*(v[i[r]] for v, i in zip(vecs, idx))) for r in range(40)]
    assert np.allclose(fast, slow, equal_nan=True)


def test_sampled_pvalue_is_seeded_and_close_to_exact() -> None:
    rng = np.random.default_rng(5)
    vecs = tuple(rng.normal(size=(8, 4)) for _ in range(4))
    exact = A.permutation_pvalue(*vecs)
    old, A.EXACT_PARTITIONS = A.EXACT_PARTITIONS, 10
    try:
        p1 = A.permutation_pvalue(*vecs, n=4000, seed=1)
        assert p1 == A.permutation_pvalue(*vecs, n=4000, seed=1)
    finally:
        A.EXACT_PARTITIONS = old
    assert abs(p1 - exact) < 0.03


# ----------------------------------------------------------------------------- WEAT on encoders

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "this", "that", "is",
         *dict.fromkeys([w.lower() for w in A.all_words()] + list(WORDS))]


@pytest.fixture(scope="module")
def tok() -> Any:
    from transformers import BertTokenizerFast

    return BertTokenizerFast(vocab={w: i for i, w in enumerate(dict.fromkeys(VOCAB))})


def tiny(kind: str, tok: Any) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(
        tiny_config(kind, 3, len(tok))).eval()


def ctx_for(model: torch.nn.Module, tok: Any) -> Any:
    from nas_fair.spaces import CompressionContext, RecoveryData

    enc = tok(["he is a doctor", "she is a nurse", "this is the art of math"] * 8,
              padding="max_length", max_length=10, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    data = RecoveryData(ids, mask, logits.argmax(-1), logits.float(),
                        groups=["f" if i % 2 else "m" for i in range(len(ids))])
    return CompressionContext(reference=model, train=data, seed=0, batch_size=8,
                              recovery_steps=0, tokenizer=tok)


def test_probe_is_the_masked_mean_of_the_last_hidden_state(tok: Any) -> None:
    model = tiny("bert", tok)
    probe = A.encoder_probe(model, tok)
    templates, _ = A.word_lists()
    word = "algebra"
    enc = tok([t.format(word) for t in templates], padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model.bert(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    want = ((h * m).sum(1) / m.sum(1)).mean(0).double().numpy()
    assert np.allclose(probe.rows((word,))[0], want, atol=1e-5)
    assert probe.unknown == frozenset()


STRONG = {
    "pruning": {"heads": 0.5, "ffn": 0.5, "layers": 1},
    "lowrank": {"attention_rank": 0.5, "ffn_rank": 0.25},
    "sharing": {"group_size": 2},
    "quantization": {"attention_bits": 8, "ffn_bits": 4, "embedding_bits": 8},
    "vocabulary": {"others": 0.0},
}


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert"])
@pytest.mark.parametrize("family", sorted(STRONG))
def test_every_family_gives_a_finite_association(family: str, kind: str, tok: Any) -> None:
    from nas_fair.spaces import REGISTRY, compress

    model = tiny(kind, tok)
    ctx = ctx_for(model, tok)
    out = compress(model, {family: REGISTRY[family].config_class.from_dict(STRONG[family])}, ctx)
    probe = A.encoder_probe(out, tok)
    ref = A.encoder_probe(model, tok)
    assert probe.vectors.shape == ref.vectors.shape and np.isfinite(probe.vectors).all()
    assert not np.allclose(probe.vectors, ref.vectors)  # the compressed encoder is another one
    rec, ref_rec = (EvalRecord(np.zeros(2, int), np.zeros(2, int), probe=p) for p in (probe, ref))
    rows = score_bias(A.metric_names(), rec, ref_rec, n=50)
    if family == "vocabulary":  # trained on a few words: the others read as [UNK]
        assert "algebra" in rows["weat_math_arts"]["unknown_words"]
        assert "art" not in rows["weat_math_arts"]["unknown_words"]
    for row in rows.values():
        assert row["diff"] == pytest.approx(row["value"] - row["ref_value"], nan_ok=True)


def test_weat_rows_are_model_level(tok: Any) -> None:
    model = tiny("bert", tok)
    rec = EvalRecord(np.zeros(4, int), np.zeros(4, int), probe=A.encoder_probe(model, tok))
    row = score_bias(["weat_career_family"], rec, n=100, seed=0)["weat_career_family"]
    vecs = A._vectors(rec.probe, A.word_lists()[1]["career_family"])
    assert row["value"] == pytest.approx(naive_effect(*vecs))
    assert row["ci_low"] <= row["value"] <= row["ci_high"] and row["ci_low"] < row["ci_high"]
    assert row["p_value"] == A.permutation_pvalue(*vecs)
    assert BIAS["weat_career_family"](rec) == row["value"]
    with pytest.raises(UserError, match="computed from the model"):
        bootstrap("weat_career_family", rec)  # a row bootstrap would not move it


def test_unreadable_words_drop_the_test_or_fail_when_chosen() -> None:
    from transformers import BertTokenizerFast

    small = BertTokenizerFast(vocab={w: i for i, w in enumerate(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])})
    names = ["tpr_gap_rms", *A.metric_names()]
    assert A.check_vocabulary(small, names, objective="tpr_gap_rms", explicit=[]) == [
        "tpr_gap_rms"]
    with pytest.raises(UserError, match="weat_math_arts.*unknown token"):
        A.check_vocabulary(small, names, objective="weat_math_arts", explicit=[])


# ----------------------------------------------------------------------------- in a study


@pytest.fixture(scope="module")
def weat_study(tmp_path_factory: pytest.TempPathFactory, tok: Any) -> dict[str, Any]:
    """A tiny search whose bias objective is the encoder's WEAT math/arts effect size."""
    from test_search import run_cli, write_study

    tmp = tmp_path_factory.mktemp("weat")
    model = tiny("bert", tok)
    model.save_pretrained(tmp / "model")
    tok.save_pretrained(tmp / "model")
    toml = write_study(tmp, tmp / "model", name="weat", steps=0, extra="""
[space]
families = ["pruning", "quantization"]
""")
    text = toml.read_text().replace('bias = "tpr_gap_rms"', 'bias = "weat_math_arts"')
    toml.write_text(text)
    run_dir = tmp / "run"
    args = ["--config", str(toml), "--run-dir", str(run_dir)]
    assert run_cli("search", *args, "--budget", "2") == 0
    import optuna

    study = optuna.load_study(study_name="weat", storage=f"sqlite:///{run_dir / 'study.db'}")
    return {"study": study, "args": args, "tmp": tmp}


def test_weat_is_the_objective_and_rates_are_recorded(weat_study: dict[str, Any]) -> None:
    from nas_fair.search.records import ReferenceRecord, TrialRecord

    study = weat_study["study"]
    assert study.metric_names[3] == "|weat_math_arts|"
    ref = ReferenceRecord.from_study(study)
    assert ref.values[3] == pytest.approx(abs(ref.bias["weat_math_arts"]["value"]))
    assert {"weat_career_family", "weat_science_arts", "tpr_gap_rms"} <= set(ref.bias)
    assert ref.class_rates["groups"] == ["f", "m"]
    assert ref.class_rates["training_share"]["group"] == "f"
    done = [t for t in study.trials if t.values is not None]
    assert len(done) == 2
    for t in done:
        rec = TrialRecord.from_trial(t)
        row = rec.bias["weat_math_arts"]
        assert t.values[3] == pytest.approx(abs(row["value"]))
        assert row["diff"] == pytest.approx(row["value"] - row["ref_value"])
        assert 0 < row["p_value"] <= 1
        assert len(rec.class_rates["classes"]) == 3


def test_export_writes_class_rates_and_the_card_table(weat_study: dict[str, Any]) -> None:
    import json

    from test_search import run_cli

    out = weat_study["tmp"] / "export"
    assert run_cli("export", *weat_study["args"], "--trials", "1", "--out", str(out)) == 0
    folder = out / "trial-1"
    rates = json.loads((folder / "class_rates.json").read_text())
    number = 1
    from nas_fair.search.records import TrialRecord

    stored = TrialRecord.from_trial(weat_study["study"].trials[number]).class_rates
    assert rates["model"] == stored  # recomputed on the reloaded model: the search's record
    card = (folder / "README.md").read_text()
    assert "| class | TPR f (n) | TPR m (n) | gap [95% CI] | reference gap |" in card
    assert "weat_math_arts" in card


def test_report_draws_the_class_views(weat_study: dict[str, Any]) -> None:
    from test_search import run_cli

    out = weat_study["tmp"] / "report.html"
    assert run_cli("report", *weat_study["args"], "--out", str(out)) == 0
    page = out.read_text()
    assert "Per-class TPR gap" in page and "De-Arteaga" in page


def test_weat_declarations() -> None:
    for name in ("weat_career_family", "weat_math_arts", "weat_science_arts"):
        m = BIAS[name]
        assert (m.direction, m.needs, m.absolute) == ("minimize", ("encoder_probe",), False)
        assert m.description.startswith("WEAT effect size")


def test_an_unreadable_test_asked_for_in_record_fails() -> None:
    from transformers import BertTokenizerFast

    small = BertTokenizerFast(vocab={w: i for i, w in enumerate(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])})
    with pytest.raises(UserError, match="weat_career_family"):
        A.check_vocabulary(small, ["weat_career_family"], objective="tpr_gap_rms",
                           explicit=["weat_career_family"])


def test_a_weat_objective_keeps_its_words_through_vocabulary_trimming(tok: Any) -> None:
    from nas_fair.spaces import REGISTRY, compress

    model = tiny("bert", tok)
    ctx = ctx_for(model, tok)
    cfg = {"vocabulary": REGISTRY["vocabulary"].config_class.from_dict({"others": 0.0})}
    assert A.objective_token_ids(tok, "tpr_gap_rms") == []
    keep = A.objective_token_ids(tok, "weat_math_arts")
    ctx.extras["keep_token_ids"] = keep
    probe = A.encoder_probe(compress(model, cfg, ctx), tok)
    test = A.word_lists()[1]["math_arts"]
    assert not set(test.words) & probe.unknown  # every word of the objective's test is kept
    assert "executive" in probe.unknown  # another test's words are still trimmed
    rec = EvalRecord(np.zeros(2, int), np.zeros(2, int), probe=probe)
    assert math.isfinite(BIAS["weat_math_arts"](rec))

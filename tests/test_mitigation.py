"""Bias mitigation (spaces/mitigation.py) and group-aware post-processing (nas_fair/postprocess.py).

Each mitigation is checked to change the recovery data or loss exactly as it claims, on small
hand-checked cases; the off setting is the identity (also covered by the contract tests); the
post-processing offsets are fitted on validation rows only and travel with the checkpoint.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from torch import nn

from nas_fair import postprocess as pp
from nas_fair.checkpoint import load_compressed, save_compressed
from nas_fair.errors import UserError
from nas_fair.spaces import REGISTRY, CompressionContext, RecoveryData, RecoveryOptions, compress
from nas_fair.spaces.base import STAGE_SHARE, Categorical, Family, FamilyConfig
from nas_fair.spaces.mitigation import (
    CounterfactualPenalty,
    GroupGapPenalty,
    MitigationConfig,
    build_options,
    counterfactual_divergence,
    group_loss_gap,
    inverse_frequency,
    oversample_rows,
)
from nas_fair.spaces.recovery import recovery_logs

from conftest import WORDS, random_batch, tiny_config, tiny_context, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore:mitigation .* skipped")

TEXTS = [
    "she works as a nurse",  # 0 f, gendered
    "he works as a doctor",  # 1 m, gendered
    "the cook is good",  # 2 m, no gendered word
    "his wife is a lawyer",  # 3 m, gendered
    "the baker said so",  # 4 m, no gendered word
    "her husband is a clerk",  # 5 f, gendered
]
GROUPS = ["female", "male", "male", "male", "male", "female"]
LABELS = [0, 1, 2, 1, 2, 0]


def tokenizer():
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "wife", "husband"]
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})


def text_context(model: nn.Module | None = None, seed: int = 0) -> CompressionContext:
    """Six real sentences (four with gendered words), tokenized, with the model's logits."""
    from nas_fair.modeling import tokenize

    model = model or tiny_model("bert")
    tok = tokenizer()
    ids, mask = tokenize(tok, TEXTS, 12)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    data = RecoveryData(ids, mask, torch.tensor(LABELS), logits.float(), groups=list(GROUPS),
                        texts=list(TEXTS))
    return CompressionContext(reference=model, train=data, seed=seed, batch_size=4,
                              tokenizer=tok)


def cfg(**kw: Any) -> MitigationConfig:
    return MitigationConfig(**kw)


IDS, MASK = random_batch(6, 10, seed=11)


def logits_of(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


# --------------------------------------------------------------------------- data side


def test_cda_adds_a_swapped_copy_of_each_gendered_row_and_keeps_both() -> None:
    from nas_fair.modeling import tokenize

    ctx = text_context()
    base = ctx.train
    out = build_options(cfg(cda=True), ctx, base)
    data = out["data"]
    gendered = [0, 1, 3, 5]
    assert len(data) == len(base) + len(gendered)
    # the originals are untouched, in order
    assert torch.equal(data.input_ids[:6], base.input_ids)
    assert data.texts[:6] == TEXTS and data.groups[:6] == GROUPS
    assert data.texts[6:] == ["he works as a nurse", "she works as a doctor",
                              "her husband is a lawyer", "his wife is a clerk"]
    ids, mask = tokenize(ctx.tokenizer, data.texts[6:], 12)
    assert torch.equal(data.input_ids[6:], ids) and torch.equal(data.attention_mask[6:], mask)
    # the copy keeps the original's label and teacher logits (invariance), its group swaps
    assert data.labels[6:].tolist() == [LABELS[i] for i in gendered]
    assert torch.equal(data.teacher_logits[6:], base.teacher_logits[gendered])
    assert data.groups[6:] == ["male", "female", "female", "male"]
    assert out["sample_weights"] is None and out["extra_loss"] is None
    assert len(ctx.train) == 6  # the shared context is not changed


def test_oversampling_balances_cells_exactly() -> None:
    ctx = text_context()
    for by, key in (("group", lambda d, i: d.groups[i]),
                    ("class", lambda d, i: int(d.labels[i])),
                    ("group_class", lambda d, i: (d.groups[i], int(d.labels[i])))):
        out = build_options(cfg(oversample=by), ctx, ctx.train)
        data = ctx.train if out is None else out["data"]  # classes are already balanced
        counts: dict[Any, int] = {}
        for i in range(len(data)):
            counts[key(data, i)] = counts.get(key(data, i), 0) + 1
        assert len(set(counts.values())) == 1, (by, counts)
        assert torch.equal(data.input_ids[:6], ctx.train.input_ids)  # originals kept first
    # groups: 2 female vs 4 male -> 2 female rows added, copies of the female rows
    data = build_options(cfg(oversample="group"), ctx, ctx.train)["data"]
    assert len(data) == 8 and data.groups[6:] == ["female", "female"]
    assert sorted(data.texts[6:]) == sorted([TEXTS[0], TEXTS[5]])


def test_oversampling_remainder_is_seeded() -> None:
    cells = torch.tensor([0] * 7 + [1] * 3)  # 4 to add to cell 1: one full copy + 1 sampled
    a, b = oversample_rows(cells, seed=0), oversample_rows(cells, seed=0)
    assert torch.equal(a, b)
    assert torch.bincount(cells[a]).tolist() == [7, 7]
    assert sorted(a[10:13].tolist()) == [7, 8, 9]
    draws = {int(oversample_rows(cells, seed=s)[-1]) for s in range(10)}
    assert len(draws) > 1  # the seed picks the remainder


def test_weights_are_inverse_frequency() -> None:
    ctx = text_context()
    w = build_options(cfg(weighting="group"), ctx, ctx.train)["sample_weights"]
    # 2 female, 4 male, 6 rows, 2 cells: 6 / (2 * 2) and 6 / (2 * 4)
    expect = torch.tensor([1.5 if g == "female" else 0.75 for g in GROUPS])
    assert torch.allclose(w, expect)
    assert w.mean().item() == pytest.approx(1.0)
    w = build_options(cfg(weighting="class"), ctx, ctx.train)["sample_weights"]
    assert torch.allclose(w, torch.full((6,), 1.0))  # classes are balanced (2/2/2)
    cells = torch.tensor([0, 0, 0, 1])
    assert inverse_frequency(cells).tolist() == pytest.approx([4 / 6, 4 / 6, 4 / 6, 2.0])
    # after oversampling, weights are computed on the oversampled data
    out = build_options(cfg(oversample="group", weighting="group"), ctx, ctx.train)
    assert torch.allclose(out["sample_weights"], torch.ones(8))


# --------------------------------------------------------------------------- loss side


def test_group_gap_is_zero_when_equal_and_the_gap_otherwise() -> None:
    codes = torch.tensor([0, 0, 1, 1])
    assert group_loss_gap(torch.tensor([1.0, 3.0, 2.0, 2.0]), codes, 2).item() == 0.0
    assert group_loss_gap(torch.tensor([1.0, 1.0, 2.0, 4.0]), codes, 2).item() == 2.0
    assert group_loss_gap(torch.tensor([5.0, 1.0]), torch.tensor([1, 1]), 2).item() == 0.0
    three = group_loss_gap(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0, 1, 2]), 3)
    assert three.item() == 3.0


def test_group_gap_penalty_on_a_batch() -> None:
    from nas_fair.spaces.recovery import Batch

    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]], requires_grad=True)
    labels = torch.tensor([0, 1, 0, 0])  # group 1 gets one wrong -> higher mean loss
    batch = Batch(torch.tensor([0, 1, 2, 3]), IDS[:4], MASK[:4], labels, logits, None)
    pen = GroupGapPenalty(torch.tensor([0, 0, 1, 1]), 2, strength=0.5)
    value = pen(nn.Identity(), batch, logits)
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none").detach()
    assert value.item() == pytest.approx(0.5 * ((ce[2] + ce[3]) / 2 - (ce[0] + ce[1]) / 2).item())
    value.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    equal = GroupGapPenalty(torch.tensor([0, 0, 1, 1]), 2, 0.5)(
        nn.Identity(), dataclasses.replace(batch, labels=torch.tensor([0, 1, 0, 1])), logits)
    assert equal.item() == pytest.approx(0.0, abs=1e-7)


def test_counterfactual_divergence() -> None:
    a = torch.tensor([[1.0, 2.0, 0.5]])
    assert counterfactual_divergence(a, a.clone()).item() == pytest.approx(0.0, abs=1e-7)
    b = torch.tensor([[2.0, 1.0, 0.5]])
    assert counterfactual_divergence(a, b).item() > 0
    assert counterfactual_divergence(a, b).item() == pytest.approx(
        counterfactual_divergence(b, a).item())


def test_counterfactual_penalty_uses_the_swapped_text() -> None:
    from nas_fair.spaces.recovery import Batch

    ctx = text_context()
    model = ctx.reference
    out = build_options(cfg(regularizer="counterfactual", strength=1.0), ctx, ctx.train)
    assert out["data"] is None and out["sample_weights"] is None
    pen = out["extra_loss"]
    assert isinstance(pen, CounterfactualPenalty)
    assert pen.has_cf.tolist() == [True, True, False, True, False, True]
    d = ctx.train
    index = torch.arange(6)
    batch = Batch(index, d.input_ids, d.attention_mask, d.labels, d.teacher_logits, None)
    logits = model(input_ids=d.input_ids, attention_mask=d.attention_mask).logits
    value = pen(model, batch, logits)
    swapped = model(input_ids=pen.cf_ids[[0, 1, 3, 5]],
                    attention_mask=pen.cf_mask[[0, 1, 3, 5]]).logits
    assert value.item() == pytest.approx(
        counterfactual_divergence(logits[[0, 1, 3, 5]], swapped).item(), rel=1e-5)
    assert value.item() > 0
    # rows without a gendered word: nothing to compare, zero
    no_cf = Batch(torch.tensor([2, 4]), d.input_ids[[2, 4]], d.attention_mask[[2, 4]],
                  d.labels[[2, 4]], d.teacher_logits[[2, 4]], None)
    assert pen(model, no_cf, logits[[2, 4]]).item() == 0.0


def test_regularizer_gradient_changes_training_and_zero_strength_is_off() -> None:
    ref = tiny_model("bert")
    ctx = tiny_context(ref)
    plain = compress(ref, {"mitigation": cfg(regularizer="group_gap", strength=0.0)}, ctx)
    assert torch.equal(logits_of(plain), logits_of(ref))  # strength 0: nothing trains
    # the same pass with and without the regularizer (weights make the pass run in both)
    a = compress(ref, {"mitigation": cfg(weighting="class", when="after", steps=5)}, ctx)
    b = compress(ref, {"mitigation": cfg(weighting="class", strength=1.0, when="after",
                                         steps=5)}, ctx)
    assert not torch.equal(logits_of(a), logits_of(b))


# --------------------------------------------------------------------------- when, identity


def distil(steps: int = 3) -> FamilyConfig:
    return REGISTRY["distillation"].config_class(steps=steps, temperature=2.0, alpha=0.9)


def test_off_is_bit_identical_with_and_without_distillation() -> None:
    ref = tiny_model("roberta")
    ctx = tiny_context(ref)
    off = REGISTRY["mitigation"].off()
    assert torch.equal(logits_of(compress(ref, {"mitigation": off}, ctx)), logits_of(ref))
    with_off = compress(ref, {"distillation": distil(), "mitigation": off}, ctx)
    alone = compress(ref, {"distillation": distil()}, ctx)
    assert torch.equal(logits_of(with_off), logits_of(alone))


def test_during_goes_into_the_distillation_and_after_is_a_separate_pass() -> None:
    ref = tiny_model("bert")
    ctx = tiny_context(ref)
    mit = {"oversample": "group", "weighting": "class", "steps": 4}
    plain = compress(ref, {"distillation": distil()}, ctx)
    during = compress(ref, {"distillation": distil(), "mitigation": cfg(**mit)}, ctx)
    after = compress(ref, {"distillation": distil(), "mitigation": cfg(when="after", **mit)}, ctx)
    # during: one run, the distillation's; after: the distillation, then the extra pass
    assert [r["steps_budget"] for r in recovery_logs(during)] == [3]
    assert [r["steps_budget"] for r in recovery_logs(after)] == [3, 4]
    outs = [logits_of(m) for m in (plain, during, after)]
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])
    # without recovery in the trial, "during" runs the same pass as "after"
    d0 = compress(ref, {"mitigation": cfg(**mit)}, ctx)
    a0 = compress(ref, {"mitigation": cfg(when="after", **mit)}, ctx)
    assert [r["steps_budget"] for r in recovery_logs(d0)] == [4]
    assert torch.equal(logits_of(d0), logits_of(a0))
    # and distillation steps 0 counts as no recovery
    z = compress(ref, {"distillation": distil(0), "mitigation": cfg(**mit)}, ctx)
    assert torch.equal(logits_of(z), logits_of(d0))


def test_deterministic_with_a_seed_and_the_seed_matters() -> None:
    ref = tiny_model("distilbert")
    c = cfg(oversample="group_class", weighting="group", strength=0.3, steps=4)
    a = compress(ref, {"mitigation": c}, tiny_context(ref, seed=0))
    b = compress(ref, {"mitigation": c}, tiny_context(ref, seed=0))
    d = compress(ref, {"mitigation": c}, tiny_context(ref, seed=1))
    assert torch.equal(logits_of(a), logits_of(b))
    assert not torch.equal(logits_of(a), logits_of(d))


def test_cda_trains_on_the_augmented_rows() -> None:
    ctx = text_context()
    ref = ctx.reference
    seen: list[int] = []

    class Spy(Family):
        name = "spy"
        stage = STAGE_SHARE
        config_class = MitigationConfig  # any config
        params: ClassVar = {}

        def apply(self, model, config, ctx):  # noqa: ANN001, ANN201
            return model

        def recovery_options(self, config, ctx):  # noqa: ANN001, ANN201
            def extra(model, batch, logits):  # noqa: ANN001, ANN202
                seen.extend(batch.index.tolist())
                return logits.sum() * 0.0

            return {"extra_loss": extra}

    REGISTRY["spy"] = Spy
    try:
        compress(ref, {"spy": MitigationConfig(), "distillation": distil(3),
                       "mitigation": cfg(cda=True)}, ctx)
    finally:
        del REGISTRY["spy"]
    assert max(seen) >= 6  # rows past the 6 originals: the swapped copies were trained on


def test_a_new_mitigation_is_one_family_with_a_hook() -> None:
    """The extension point: a family that only asks for sample weights changes the recovery."""

    @dataclasses.dataclass
    class OnlyFirstConfig(FamilyConfig):
        on: bool = False

    class OnlyFirst(Family):
        name = "only_first"
        stage = STAGE_SHARE
        config_class = OnlyFirstConfig
        params: ClassVar = {"on": Categorical((False, True))}

        def apply(self, model, config, ctx):  # noqa: ANN001, ANN201
            return model

        def recovery_options(self, config, ctx):  # noqa: ANN001, ANN201
            if not config.on:
                return None
            w = torch.zeros(len(ctx.train))
            w[: len(w) // 2] = 1.0
            return {"sample_weights": w}

    ref = tiny_model("bert")
    ctx = tiny_context(ref)
    REGISTRY["only_first"] = OnlyFirst
    try:
        plain = compress(ref, {"distillation": distil()}, ctx)
        off = compress(ref, {"distillation": distil(), "only_first": OnlyFirstConfig()}, ctx)
        on = compress(ref, {"distillation": distil(), "only_first": OnlyFirstConfig(True)}, ctx)
    finally:
        del REGISTRY["only_first"]
    assert torch.equal(logits_of(plain), logits_of(off))
    assert not torch.equal(logits_of(plain), logits_of(on))
    assert ctx.recovery is None  # the shared context never holds a trial's options


def test_recovery_options_merge_rules() -> None:
    data = tiny_context(tiny_model("bert"), n=8).train
    opts = RecoveryOptions().merged({"sample_weights": torch.full((8,), 2.0)})
    opts = opts.merged({"sample_weights": torch.full((8,), 3.0), "extra_loss": lambda *a: 0})
    assert torch.equal(opts.sample_weights, torch.full((8,), 6.0))
    assert len(opts.extra_losses) == 1
    with pytest.raises(ValueError, match="replaced after sample weights"):
        opts.merged({"data": data})
    with pytest.raises(ValueError, match="unknown recovery option 'weights'"):
        RecoveryOptions().merged({"weights": None})
    with pytest.raises(ValueError, match=r"shape \(8,\)"):
        RecoveryOptions().merged({"data": data, "sample_weights": torch.ones(3)})


def test_invalid_values_state_the_rule() -> None:
    with pytest.raises(UserError, match="mitigation.when must be one of during, after, got 'later'"):
        MitigationConfig(when="later")
    with pytest.raises(UserError, match="mitigation.strength must be a number >= 0, got -0.1"):
        MitigationConfig(strength=-0.1)
    with pytest.raises(UserError, match="did you mean 'group'"):
        MitigationConfig(oversample="groups")


# --------------------------------------------------------------------------- post-processing


def biased_multiclass(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """3 classes; for group f the logits lean toward class 0, for m toward class 1."""
    rng = np.random.default_rng(seed)
    g = np.where(rng.random(n) < 0.4, "f", "m")
    y = rng.integers(0, 3, n)
    z = rng.normal(0, 1.0, (n, 3))
    z[np.arange(n), y] += 1.8
    z[g == "f", 0] += 1.0
    z[g == "m", 1] += 1.0
    return z, y, g


def tpr_gap(pred: np.ndarray, y: np.ndarray, g: np.ndarray) -> float:
    names = sorted(set(g))
    gi = np.array([names.index(x) for x in g])
    tp, pos = pp.tpr_table(pred, y, gi, len(names), int(y.max()) + 1)
    return float(pp._gap(tp, pos, pos >= pp.MIN_CELL))


def test_offsets_shrink_the_validation_tpr_gap() -> None:
    z, y, g = biased_multiclass(1500, seed=0)
    before = tpr_gap(z.argmax(1), y, g)
    fitted = pp.fit_group_offsets(z, y, g, weight=3.0)
    after = tpr_gap(fitted.predict(z, g), y, g)
    assert before > 0.15
    assert after < 0.4 * before
    assert fitted.stats["before"]["tpr_gap_rms"] == pytest.approx(before)
    assert fitted.stats["after"]["tpr_gap_rms"] == pytest.approx(after)
    acc = (fitted.predict(z, g) == y).mean()
    assert acc > (z.argmax(1) == y).mean() - 0.05  # not bought with a collapse
    # and the gap shrinks on fresh rows of the same distribution too
    zt, yt, gt = biased_multiclass(3000, seed=1)
    assert tpr_gap(fitted.predict(zt, gt), yt, gt) < 0.5 * tpr_gap(zt.argmax(1), yt, gt)
    # deterministic; weight 0 leaves every offset at 0
    assert pp.fit_group_offsets(z, y, g, weight=3.0).offsets == fitted.offsets
    assert not np.any(pp.fit_group_offsets(z, y, g, weight=0.0).offsets)


def test_binary_equalized_odds_close_to_fairlearn_threshold_optimizer() -> None:
    from fairlearn.metrics import equalized_odds_difference
    from fairlearn.postprocessing import ThresholdOptimizer
    from sklearn.base import BaseEstimator, ClassifierMixin

    def make(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        g = np.where(rng.random(n) < 0.35, "f", "m")
        y = (rng.random(n) < np.where(g == "f", 0.3, 0.6)).astype(int)
        s = 1.5 * (2 * y - 1) + rng.normal(0, 1.2, n) + np.where(g == "f", -0.8, 0.4)
        return np.stack([np.zeros(n), s], 1), y, g

    class Scores(BaseEstimator, ClassifierMixin):
        def fit(self, X, y):  # noqa: ANN001, ANN201, N803
            self.classes_ = np.array([0, 1])
            return self

        def decision_function(self, X):  # noqa: ANN001, ANN201, N803
            return np.asarray(X)[:, 1]

        def predict(self, X):  # noqa: ANN001, ANN201, N803
            return (self.decision_function(X) > 0).astype(int)

    zv, yv, gv = make(2000, 1)
    zt, yt, gt = make(4000, 2)
    plain = equalized_odds_difference(yt, zt.argmax(1), sensitive_features=gt)
    opt = ThresholdOptimizer(estimator=Scores().fit(zv, yv), constraints="equalized_odds",
                             prefit=True, predict_method="decision_function")
    opt.fit(zv, yv, sensitive_features=gv)
    theirs = opt.predict(zt, sensitive_features=gt, random_state=0)
    ours = pp.fit_group_offsets(zv, yv, gv, weight=3.0).predict(zt, gt)
    eod_theirs = equalized_odds_difference(yt, theirs, sensitive_features=gt)
    eod_ours = equalized_odds_difference(yt, ours, sensitive_features=gt)
    assert plain > 0.15
    assert eod_ours < 0.5 * plain
    assert eod_ours <= eod_theirs + 0.03
    assert (ours == yt).mean() >= (theirs == yt).mean() - 0.03


def test_validation_data_refuses_other_splits() -> None:
    ids, mask = random_batch(4, 6)
    with pytest.raises(UserError, match="validation split only, got split 'test'"):
        pp.ValidationData(ids, mask, torch.zeros(4, dtype=torch.long), ["f"] * 4, split="test")
    model = tiny_model("bert")
    with pytest.raises(UserError, match="ValidationData"):
        pp.fit(model, RecoveryData(ids, mask, torch.zeros(4, dtype=torch.long),  # type: ignore
                                   torch.zeros(4, 3)), weight=1.0)


def test_predict_needs_groups_and_handles_unknown_ones() -> None:
    model = tiny_model("bert")
    z = torch.tensor([[0.0, 1.0, 0.5], [1.0, 0.0, 0.9]])
    assert pp.predict(model, z).tolist() == [1, 0]  # no post-processing: argmax
    pp.attach(model, pp.GroupOffsets(["f", "m"], [[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]))
    assert pp.predict(model, z, ["f", "f"]).tolist() == [2, 2]
    assert pp.predict(model, z, ["m", "x"]).tolist() == [1, 0]  # unknown group: no offset
    with pytest.raises(UserError, match="needs each row's group"):
        pp.predict(model, z)
    pp.attach(model, None)
    assert pp.get(model) is None


def test_counterfactual_groups() -> None:
    assert pp.counterfactual_groups(["female", "male", "male"]).tolist() == [
        "male", "female", "female"]
    assert pp.counterfactual_groups(["f", "m"]).tolist() == ["m", "f"]
    assert pp.counterfactual_groups(["a", "b"]).tolist() == ["a", "b"]  # not gender: kept


def test_postprocessing_round_trips_through_the_checkpoint(tmp_path: Path) -> None:
    ref = tiny_model("bert")
    ctx = tiny_context(ref)
    ids, mask = random_batch(200, 10, seed=5)
    with torch.no_grad():
        z = ref(input_ids=ids, attention_mask=mask).logits
    groups = ["f" if i % 3 == 0 else "m" for i in range(200)]
    # labels that the model gets right far more often for "m" rows
    labels = z.argmax(-1).clone()
    for i in range(0, 200, 3):
        labels[i] = (labels[i] + 1) % 3
    for i in range(1, 200, 6):
        labels[i] = (labels[i] + 1) % 3
    ctx.extras["validation"] = pp.ValidationData(ids, mask, labels, groups)
    model = compress(ref, {"mitigation": cfg(thresholds=3.0)}, ctx)
    post = pp.get(model)
    assert post is not None and np.any(post.offsets)
    assert post.stats["after"]["tpr_gap_rms"] < post.stats["before"]["tpr_gap_rms"]
    assert torch.equal(logits_of(model), logits_of(ref))  # logits untouched, decisions not
    assert pp.get(ref) is None
    y_model = pp.predict(model, z, groups)
    assert not np.array_equal(y_model, z.argmax(-1).numpy())
    path = save_compressed(model, tmp_path / "ckpt")
    assert (path / pp.FILE).is_file()
    back = load_compressed(path)
    with torch.no_grad():
        zb = back(input_ids=ids, attention_mask=mask).logits
    assert pp.get(back).offsets == post.offsets
    assert np.array_equal(pp.predict(back, zb, groups), y_model)
    (path / pp.FILE).write_text("{not json")
    with pytest.raises(UserError, match="postprocess.json is not valid JSON"):
        load_compressed(path)


# --------------------------------------------------------------------------- with a Session


def write_biased_study(tmp: Path, ckpt: Path) -> Path:
    """A tiny study whose reference learns a gender shortcut: the cue word is often missing and
    gender then predicts the label."""
    rng = np.random.default_rng(0)
    rows = ["text,label,gender"]
    cues = ["cook", "sheriff", "clerk"]
    for _ in range(600):
        gender = "f" if rng.random() < 0.4 else "m"
        label = int(rng.choice(3, p=[0.6, 0.2, 0.2] if gender == "f" else [0.15, 0.45, 0.4]))
        pron = "she" if gender == "f" else "he"
        cue = cues[label] if rng.random() < 0.5 else "person"
        filler = " ".join(rng.choice(["the", "good", "new", "old", "my", "is"], size=2))
        rows.append(f'"{pron} works as a {cue} {filler}",{label},{gender}')
    (tmp / "data.csv").write_text("\n".join(rows) + "\n")
    toml = tmp / "biased.toml"
    toml.write_text(f"""
name = "biased"
seed = 0
[model]
path = "{ckpt}"
max_length = 16
finetune = "always"
epochs = 4
learning_rate = 3e-3
batch_size = 16
[data]
source = "file"
train = "{tmp / 'data.csv'}"
group_column = "gender"
validation_size = 0.3
counterfactual = true
[search]
batch_size = 4
seq_len = 16
recovery_steps = 3
latency_repeats = 2
bootstrap = 20
threads = 1
[objectives]
accuracy = "macro_f1"
bias = "tpr_gap_rms"
""")
    return toml


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    from transformers import AutoModelForSequenceClassification, BertTokenizerFast

    from nas_fair.config import load_study
    from nas_fair.search.session import Session

    tmp = tmp_path_factory.mktemp("mitigation")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "person"]
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_config("bert", 3, len(vocab)))
    model.save_pretrained(tmp / "model")
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(tmp / "model")
    s = Session(load_study(write_biased_study(tmp, tmp / "model")), tmp / "run", quiet=True)
    s.prepare()
    return s


THRESHOLDS = {"mitigation.thresholds": 3.0}


def test_session_fits_on_validation_only(session, monkeypatch) -> None:  # noqa: ANN001
    val = session.ctx.extras["validation"]
    assert isinstance(val, pp.ValidationData) and len(val) == len(session.data.validation)
    seen: list[tuple[np.ndarray, list[str]]] = []
    real = pp.fit_group_offsets

    def spy(logits, labels, groups, **kw):  # noqa: ANN001, ANN003, ANN202
        seen.append((np.asarray(labels).copy(), list(groups)))
        return real(logits, labels, groups, **kw)

    monkeypatch.setattr(pp, "fit_group_offsets", spy)
    first = pp.get(session.replay(THRESHOLDS))
    assert first is not None and first.stats["rows"] == len(session.data.validation)
    assert len(seen) == 1
    assert np.array_equal(seen[0][0], session.data.validation.labels)
    assert seen[0][1] == [str(g) for g in session.data.validation.groups]
    # poison the test split: the fit must not change
    test = session.data.test
    monkeypatch.setattr(test, "labels", np.random.default_rng(1).permutation(test.labels))
    monkeypatch.setattr(test, "groups", test.groups[::-1].copy())
    second = pp.get(session.replay(THRESHOLDS))
    assert second.offsets == first.offsets and second.stats == first.stats
    assert len(seen) == 2 and np.array_equal(seen[1][0], seen[0][0])


def test_session_predictions_use_the_offsets_and_survive_export(session, tmp_path: Path) -> None:  # noqa: ANN001
    from nas_fair.modeling import predict_logits

    model = session.replay(THRESHOLDS)
    post = pp.get(model)
    assert post is not None
    record = session.evaluate(model)
    logits = predict_logits(model, session.tensors["test_ids"], session.tensors["test_mask"],
                            batch_size=session.cfg.search.eval_batch_size)
    groups = session.data.test.groups
    assert np.array_equal(record.y_pred, post.predict(logits.numpy(), groups))
    assert np.any(post.offsets) and np.any(record.y_pred != logits.argmax(-1).numpy())
    assert post.stats["after"]["tpr_gap_rms"] < post.stats["before"]["tpr_gap_rms"]
    # replay is deterministic, and a saved and loaded model reproduces the recorded predictions
    again = session.evaluate(session.replay(THRESHOLDS))
    assert np.array_equal(again.y_pred, record.y_pred)
    back = load_compressed(save_compressed(model, tmp_path / "export"))
    loaded = session.evaluate(back)
    assert np.array_equal(loaded.y_pred, record.y_pred)
    assert np.array_equal(loaded.y_pred_cf, record.y_pred_cf)
    # without post-processing the same model's predictions are the plain argmax
    assert np.array_equal(session.evaluate(pp.attach(back, None)).y_pred, logits.argmax(-1).numpy())


def test_session_trial_with_every_mitigation(session) -> None:  # noqa: ANN001
    params = {"distillation.steps": 3, "mitigation.cda": True,
              "mitigation.oversample": "group_class", "mitigation.weighting": "group",
              "mitigation.regularizer": "counterfactual", "mitigation.strength": 0.3,
              "mitigation.when": "during", "mitigation.thresholds": 1.0}
    model = session.replay(params)
    assert [r["steps_budget"] for r in recovery_logs(model)] == [3]
    record = session.evaluate(model)
    assert len(record.y_pred) == len(session.data.test)
    after = session.replay({**params, "mitigation.when": "after", "mitigation.steps": 2})
    assert [r["steps_budget"] for r in recovery_logs(after)] == [3, 2]

"""Intrinsic association inside the encoder: WEAT / SEAT effect sizes of sentence embeddings.

Every other bias metric reads the classifier's predictions; these read what the (compressed)
encoder associates, before any classification head: Caliskan et al. 2017's Word Embedding
Association Test on sentence embeddings, as May et al. 2019's SEAT does. Each word of a test's
four sets is put in semantically bleached templates ("This is {}."), each sentence embedded as
the mean of the encoder's last hidden state over its attention mask, and the word's vector is
the mean of its sentences' embeddings (a word, not a sentence, is the unit that is permuted or
resampled: its templates are not independent draws). The word sets and templates are package
data (``weat_words.json``, sources cited there).

Statistics, for targets X, Y and attributes A, B (cos = cosine similarity):

* s(w, A, B) = mean_{a in A} cos(w, a) - mean_{b in B} cos(w, b)
* effect size d = (mean_{x in X} s(x) - mean_{y in Y} s(y)) / std_{w in X u Y} s(w), the sample
  standard deviation (ddof = 1); d is in [-2, 2]; positive = X nearer A (the stereotype
  direction of every shipped test); NaN when the s(w) are all equal (e.g. every word read as
  the unknown token by a vocabulary-trimmed model)
* p-value, one-sided (Caliskan et al.): the test statistic S = sum_X s(x) - sum_Y s(y); over the
  equal-size partitions (X_i, Y_i) of X u Y, p = #{i : S_i >= S} / #partitions, enumerated
  exactly when there are at most ``EXACT_PARTITIONS`` of them (the shipped 8 + 8 word sets have
  C(16, 8) = 12,870; the observed partition is one of them, so p >= 1/12,870), else from ``n``
  seeded random partitions, p = (1 + #{S_i >= S}) / (1 + n)
* interval: percentile bootstrap over words (each of X, Y, A, B resampled with replacement,
  seeded); it reflects the choice of words only, not of templates or of the encoder's training.
  The paired difference to the reference uses the same word resamples for both encoders.

The metric is computed from the model, so the session embeds the sentences once per model
(``Session.evaluate``) and carries the result on the EvalRecord (``EvalRecord.probe``); rows of
the test split play no part, and ``stats.score_bias`` scores these metrics with
:func:`association_row` instead of a row bootstrap (``stats.MODEL_LEVEL``).
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nas_fair.errors import UserError
from nas_fair.objectives.base import EvalRecord, bias_metric
from nas_fair.objectives.stats import percentile_interval

WORDS_FILE = Path(__file__).with_name("weat_words.json")
PREFIX = "weat_"  # metric names: weat_<test>
EXACT_PARTITIONS = 50_000


@dataclass(frozen=True)
class WeatTest:
    name: str
    source: str
    x: tuple[str, ...]  # targets: the stereotypically A side first
    y: tuple[str, ...]
    a: tuple[str, ...]  # attributes
    b: tuple[str, ...]
    set_names: tuple[str, str, str, str]

    @property
    def words(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*self.x, *self.y, *self.a, *self.b)))


@lru_cache(maxsize=1)
def word_lists() -> tuple[tuple[str, ...], dict[str, WeatTest]]:
    """(templates, tests by name) from the package data."""
    data = json.loads(WORDS_FILE.read_text(encoding="utf-8"))
    tests = {}
    for name, t in data["tests"].items():
        (xn, x), (yn, y) = t["targets"].items()
        (an, a), (bn, b) = t["attributes"].items()
        tests[name] = WeatTest(name, t["source"], tuple(x), tuple(y), tuple(a), tuple(b),
                               (xn, yn, an, bn))
    return tuple(data["templates"]), tests


def all_words() -> tuple[str, ...]:
    _, tests = word_lists()
    return tuple(dict.fromkeys(w for t in tests.values() for w in t.words))


# ----------------------------------------------------------------------------- embeddings


@dataclass(frozen=True)
class EncoderProbe:
    """Sentence-embedding vectors of the WEAT words for one model (not row-aligned)."""

    words: tuple[str, ...]
    vectors: np.ndarray  # (len(words), hidden) float64: mean over the word's template sentences
    unknown: frozenset[str] = frozenset()  # words the model reads only as its unknown token

    def rows(self, words: tuple[str, ...]) -> np.ndarray:
        index = {w: i for i, w in enumerate(self.words)}
        return self.vectors[[index[w] for w in words]]


def base_encoder(model: torch.nn.Module) -> torch.nn.Module:
    """The bare encoder under a classifier (and under a group-aware wrapper's ``network``)."""
    net = getattr(model, "network", model)  # postprocess.GroupAwareClassifier
    return getattr(net, "base_model", net)


@torch.inference_mode()
def sentence_embeddings(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, *,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """Mean of the encoder's last hidden state over each row's attention mask, (rows, hidden)."""
    enc = base_encoder(model)
    was_training = enc.training
    enc.eval()
    try:
        out = enc(input_ids=ids.to(device), attention_mask=mask.to(device))
    finally:
        enc.train(was_training)
    h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    m = mask.to(device=h.device, dtype=h.dtype).unsqueeze(-1)
    return ((h * m).sum(1) / m.sum(1).clamp(min=1)).float().cpu()


def _trimmed_unknown(model: torch.nn.Module, tokenizer: Any, words: tuple[str, ...]) -> set[str]:
    """Words every token of which a vocabulary-trimmed model reads as its unknown token."""
    from nas_fair.modules import RemappedEmbedding

    unk = getattr(tokenizer, "unk_token_id", None)
    remaps = [m for m in model.modules() if isinstance(m, RemappedEmbedding)]
    kept = remaps[0].kept() if remaps else None
    out = set()
    for w in words:
        ids = tokenizer(w, add_special_tokens=False)["input_ids"]
        if all(i == unk or (kept is not None and (i >= len(kept) or not bool(kept[i])))
               for i in ids):
            out.add(w)
    return out


def encoder_probe(model: torch.nn.Module, tokenizer: Any, *, words: tuple[str, ...] | None = None,
                  device: torch.device | str = "cpu", max_length: int = 32) -> EncoderProbe:
    """Embed every template sentence of ``words`` (default: all shipped tests') in one batch."""
    templates, _ = word_lists()
    words = all_words() if words is None else words
    # Words the tokenizer cannot read would all embed as the same "[UNK]" sentence: left out of
    # every set, for the reference and each trial alike (same tokenizer).
    unreadable = tokenizer_unknown(tokenizer, words)
    words = tuple(w for w in words if w not in unreadable)
    sentences = [t.format(w) for w in words for t in templates]
    enc = tokenizer(sentences, padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt")
    emb = sentence_embeddings(model, enc["input_ids"].long(), enc["attention_mask"].long(),
                              device=device).double()
    vectors = emb.reshape(len(words), len(templates), -1).mean(1).numpy()
    return EncoderProbe(tuple(words), vectors,
                        frozenset(_trimmed_unknown(model, tokenizer, words)))


def tokenizer_unknown(tokenizer: Any, words: tuple[str, ...]) -> set[str]:
    """Words the tokenizer itself can only read as its unknown token."""
    unk = getattr(tokenizer, "unk_token_id", None)
    return {w for w in words
            if all(i == unk for i in tokenizer(w, add_special_tokens=False)["input_ids"])}


# ----------------------------------------------------------------------------- statistics


def _unit(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.where(norm > 0, norm, 1.0)


def association_scores(x: np.ndarray, y: np.ndarray, a: np.ndarray, b: np.ndarray,
                       ) -> tuple[np.ndarray, np.ndarray]:
    """s(w, A, B) of each row of x and of y."""
    ua, ub = _unit(a), _unit(b)

    def s(w: np.ndarray) -> np.ndarray:
        uw = _unit(w)
        return (uw @ ua.T).mean(1) - (uw @ ub.T).mean(1)

    return s(x), s(y)


def effect_size(x: np.ndarray, y: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Caliskan et al.'s d (see the module docstring); NaN when s(w) does not vary."""
    sx, sy = association_scores(x, y, a, b)
    both = np.concatenate([sx, sy])
    sd = float(np.std(both, ddof=1)) if len(both) > 1 else 0.0
    if not sd > 1e-12 * max(1.0, float(np.abs(both).max(initial=0.0))):
        return math.nan
    return float((sx.mean() - sy.mean()) / sd)


@lru_cache(maxsize=8)
def _partitions(size: int, k: int) -> np.ndarray:
    """Every choice of k of ``size`` positions, as 0/1 rows."""
    masks = np.zeros((math.comb(size, k), size))
    for i, combo in enumerate(itertools.combinations(range(size), k)):
        masks[i, list(combo)] = 1.0
    return masks


def permutation_pvalue(x: np.ndarray, y: np.ndarray, a: np.ndarray, b: np.ndarray, *,
                       n: int = 10_000, seed: int = 0) -> float:
    """One-sided p of S = sum_X s - sum_Y s over equal-size re-partitions of X u Y (module
    docstring: exact when at most EXACT_PARTITIONS, else ``n`` seeded random ones)."""
    sx, sy = association_scores(x, y, a, b)
    s = np.concatenate([sx, sy])
    k, total = len(sx), float(s.sum())
    observed = 2 * float(sx.sum()) - total
    tol = 1e-12 * max(1.0, abs(observed))
    if math.comb(len(s), k) <= EXACT_PARTITIONS:
        stats = 2 * (_partitions(len(s), k) @ s) - total
        return float(np.mean(stats >= observed - tol))
    rng = np.random.default_rng(seed)
    perm = np.argsort(rng.random((n, len(s))), axis=1)[:, :k]
    stats = 2 * s[perm].sum(1) - total
    return float((1 + np.sum(stats >= observed - tol)) / (1 + n))


def _sets(probe: EncoderProbe, test: WeatTest) -> tuple[tuple[str, ...], ...]:
    """The test's four word sets less the words the probe left out (unknown to the tokenizer)."""
    have = set(probe.words)
    return tuple(tuple(w for w in s if w in have) for s in (test.x, test.y, test.a, test.b))


def _vectors(probe: EncoderProbe, test: WeatTest) -> tuple[np.ndarray, ...]:
    return tuple(probe.rows(s) for s in _sets(probe, test))


def _word_resamples(sizes: tuple[int, ...], n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, k, size=(n, k)) for k in sizes]


def _boot_effects(vecs: tuple[np.ndarray, ...], idx: list[np.ndarray]) -> np.ndarray:
    """The effect size on each word resample, vectorized over resamples."""
    x, y, a, b = (_unit(v) for v in vecs)
    ix, iy, ia, ib = idx
    t = np.concatenate([x, y])
    ca, cb = t @ a.T, t @ b.T  # (targets, |A|), (targets, |B|)
    s = (ca[:, ia].mean(-1) - cb[:, ib].mean(-1)).T  # (resamples, targets)
    sx = np.take_along_axis(s, ix, axis=1)
    sy = np.take_along_axis(s, iy + len(x), axis=1)
    both = np.concatenate([sx, sy], axis=1)
    sd = both.std(axis=1, ddof=1)
    scale = np.maximum(1.0, np.abs(both).max(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sd > 1e-12 * scale, (sx.mean(1) - sy.mean(1)) / sd, np.nan)


def _test_of(name: str) -> WeatTest:
    _, tests = word_lists()
    return tests[name[len(PREFIX):]]


def association_row(name: str, record: EvalRecord, ref_record: EvalRecord | None = None, *,
                    n: int = 1000, seed: int = 0, ci: float = 0.95) -> dict[str, Any]:
    """score_bias's row for a WEAT metric: value, word-bootstrap interval, the permutation
    p-value, and with a reference the paired difference (same word resamples)."""
    from nas_fair.objectives.base import BIAS

    test = _test_of(name)
    if record.probe is None:
        raise UserError(f"metric {name!r} needs the encoder's embeddings (EvalRecord.probe)")
    vecs = _vectors(record.probe, test)
    idx = _word_resamples(tuple(len(v) for v in vecs), n, seed)
    value = effect_size(*vecs)
    boot = _boot_effects(vecs, idx)
    lo, hi = percentile_interval(boot, ci)
    m = BIAS[name]

    def num(v: float) -> float | None:
        return None if math.isnan(v) else float(v)

    row: dict[str, Any] = {
        "value": value, "ci_low": lo, "ci_high": hi, "direction": m.direction,
        "absolute": m.absolute, "p_value": num(permutation_pvalue(*vecs, seed=seed))
        if not math.isnan(value) else None,
        "unknown_words": sorted(set(test.words) & record.probe.unknown),
    }
    if ref_record is not None and ref_record.probe is not None:
        ref_vecs = _vectors(ref_record.probe, test)
        ref_value = effect_size(*ref_vecs)
        dlo, dhi = percentile_interval(boot - _boot_effects(ref_vecs, idx), ci)
        row.update(ref_value=ref_value, diff=value - ref_value, diff_low=dlo, diff_high=dhi)
    return row


# ----------------------------------------------------------------------------- registration


def _register(test: WeatTest) -> None:
    name = PREFIX + test.name
    xn, yn, an, bn = test.set_names

    def metric(y_true, y_pred, *, encoder_probe) -> float:  # noqa: ANN001
        return effect_size(*_vectors(encoder_probe, test))

    metric.__doc__ = (f"WEAT effect size of the encoder's sentence embeddings: {xn} vs {yn} "
                      f"with {an} vs {bn} ({test.source.split(':')[0]}; signed, 0 = none).")
    metric.__name__ = name
    bias_metric(name, needs=("encoder_probe",))(metric)
    from nas_fair.objectives.stats import MODEL_LEVEL

    MODEL_LEVEL[name] = lambda record, ref_record, *, n, seed, ci: association_row(
        name, record, ref_record, n=n, seed=seed, ci=ci)


for _test in word_lists()[1].values():
    _register(_test)


def metric_names() -> list[str]:
    return [PREFIX + t for t in word_lists()[1]]


def objective_token_ids(tokenizer: Any, objective: str) -> list[int]:
    """The token ids of a WEAT objective's words (none for any other metric)."""
    _, tests = word_lists()
    if not objective.startswith(PREFIX) or objective[len(PREFIX):] not in tests:
        return []
    words = tests[objective[len(PREFIX):]].words
    return sorted({i for w in words for i in tokenizer(w, add_special_tokens=False)["input_ids"]})


def check_vocabulary(tokenizer: Any, recorded: list[str], *, objective: str,
                     explicit: list[str]) -> list[str]:
    """The recorded metrics less the WEAT tests this tokenizer cannot read (a set with fewer
    than 2 words it knows: the effect size would be noise or undefined). Fails when such a test
    is the study's objective or was asked for in ``[objectives] record``."""
    _, tests = word_lists()
    out = []
    for name in recorded:
        if not name.startswith(PREFIX) or name[len(PREFIX):] not in tests:
            out.append(name)
            continue
        test = tests[name[len(PREFIX):]]
        unknown = tokenizer_unknown(tokenizer, test.words)
        thin = [sn for sn, s in zip(test.set_names, (test.x, test.y, test.a, test.b))
                if len([w for w in s if w not in unknown]) < 2]
        if not thin:
            out.append(name)
        elif name == objective or name in explicit:
            raise UserError(f"metric {name!r} needs words the model's tokenizer knows, but it "
                            f"reads every word (or all but one) of the set(s) {', '.join(thin)} "
                            f"as its unknown token; pick another bias metric")
    return out

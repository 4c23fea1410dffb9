"""Focused checks of the core's arithmetic and search machinery: each fails if that core piece
is replaced by a plausible simplification (temperature ignored, random search instead of
NSGA-II, mean instead of median, unstratified bootstrap) that the end-to-end tests miss."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
import torch

from conftest import tiny_context, tiny_model

# ----------------------------------------------------------------- (a) distillation temperature


def _textbook(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, t: float,
              alpha: float) -> torch.Tensor:
    """Hinton et al.: alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1-alpha) CE,
    written out in float64."""
    s, te = student.double(), teacher.double()
    p = torch.softmax(te / t, -1)
    log_q = torch.log_softmax(s / t, -1)
    kl = (p * (torch.log(p) - log_q)).sum(-1)
    ce = -torch.log_softmax(s, -1).gather(1, labels[:, None]).squeeze(1)
    return alpha * t * t * kl + (1 - alpha) * ce


def test_distillation_loss_is_the_textbook_formula_at_each_temperature() -> None:
    from nas_fair.spaces.recovery import distillation_loss

    g = torch.Generator().manual_seed(0)
    student = torch.randn(6, 4, generator=g) * 3
    teacher = torch.randn(6, 4, generator=g) * 3
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    got = {}
    for t in (1.0, 4.0):
        for alpha in (1.0, 0.7):
            got[t, alpha] = distillation_loss(student, teacher, labels, temperature=t,
                                              alpha=alpha)
            want = _textbook(student, teacher, labels, t, alpha).float()
            torch.testing.assert_close(got[t, alpha], want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got[1.0, 1.0], got[4.0, 1.0], rtol=1e-3)


def test_the_trials_temperature_is_the_one_recovery_trains_with(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """From the family's config to every loss call: ``temperature`` is not dropped on the way."""
    import nas_fair.spaces.distillation as D
    import nas_fair.spaces.recovery as R

    seen: list[float] = []
    loss = R.distillation_loss

    def recording(*args, temperature: float, **kwargs):  # noqa: ANN002, ANN003, ANN202
        seen.append(temperature)
        return loss(*args, temperature=temperature, **kwargs)

    monkeypatch.setattr(R, "distillation_loss", recording)
    model = tiny_model()
    ctx = tiny_context(model, n=32)
    for t in (4.0, 8.0):
        seen.clear()
        D.Distillation().apply(tiny_model(), D.DistillationConfig(steps=2, temperature=t),
                               ctx)
        assert seen and set(seen) == {t}


# ----------------------------------------------------------------- (b) the sampler is NSGA-II


def _toy_objective(trial: optuna.Trial) -> list[float]:
    x = trial.suggest_float("x", 0.0, 1.0)
    y = trial.suggest_float("y", 0.0, 1.0)
    z = trial.suggest_float("z", 0.0, 1.0)
    return [x, y, 1 - x * z, abs(y - z)]


def test_the_study_searches_with_nsga2_and_the_computed_population(tmp_path: Path) -> None:
    from nas_fair.config import parse_study
    from nas_fair.search.run import Budget, open_study
    from nas_fair.search.sampling import population_for

    cfg = parse_study('name = "toy"\n')
    assert cfg.search.sampler == "nsga2"
    url = f"sqlite:///{tmp_path / 'study.db'}"
    anchors = [{"x": 0.5, "y": 0.5, "z": 0.5}] * 3
    created = open_study(cfg, url, create=True, budget=Budget(trials=12), anchors=anchors)
    population = population_for(12, len(anchors))
    assert population == 6  # two members per anchor: more than the budget's 12 / 4
    for study in (created, open_study(cfg, url, create=True, budget=Budget(trials=40))):
        assert isinstance(study.sampler, optuna.samplers.NSGAIISampler)
        assert study.sampler._population_size == population  # stored: not resized on resume


def test_nsga2_children_inherit_their_parents_values(tmp_path: Path) -> None:
    """After the random first generation, NSGA-II's children take most parameter values from
    parents (crossover; each mutated with probability 1/3 here); random search repeats none."""
    from nas_fair.config import parse_study
    from nas_fair.search.run import Budget, open_study

    cfg = parse_study('name = "toy"\n')
    study = open_study(cfg, f"sqlite:///{tmp_path / 'study.db'}", create=True,
                       budget=Budget(trials=16))
    population = study.sampler._population_size
    study.optimize(_toy_objective, n_trials=3 * population)
    seen: set[tuple[str, float]] = set()
    inherited = total = 0
    for i, t in enumerate(study.get_trials()):
        if i >= population:
            total += len(t.params)
            inherited += sum(kv in seen for kv in t.params.items())
        seen.update(t.params.items())
    assert inherited >= total // 3, (inherited, total)


# ----------------------------------------------------------------- (c) latency summary


def test_latency_summary_is_the_median_and_iqr_of_the_timed_runs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Planted run times 10, 11, 12, 13 ms and one 100 ms outlier: median 12, IQR 13 - 11 = 2
    (the mean, 29.2, would follow the outlier)."""
    import nas_fair.objectives.latency as L

    durations = [0.012, 0.010, 0.100, 0.013, 0.011]  # seconds, in the order timed
    clock = []
    t = 1000.0
    for d in durations:
        clock += [t, t + d]
        t += 1.0
    ticks = iter(clock)
    monkeypatch.setattr(L, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    out = L.measure_latency(tiny_model(), batch_size=2, seq_len=8, repeats=5, warmup=1)
    assert out["median_ms"] == pytest.approx(12.0, abs=1e-9)
    assert out["iqr_ms"] == pytest.approx(2.0, abs=1e-9)
    assert out["p10_ms"] < out["median_ms"] < out["p90_ms"]
    assert next(ticks, None) is None  # every timed run, and only those, read the clock


# ----------------------------------------------------------------- (d) stratified bootstrap


def test_every_bootstrap_resample_keeps_the_class_counts() -> None:
    from nas_fair.objectives import EvalRecord
    from nas_fair.objectives import stats as S
    from nas_fair.objectives.base import Metric

    rng = np.random.default_rng(0)
    y = rng.choice(3, size=101, p=[0.7, 0.2, 0.1])
    counts = np.bincount(y, minlength=3)
    chunks = S.resamples(y, 300, seed=5)
    rows = np.concatenate(list(chunks))
    assert rows.shape == (300, len(y))
    assert (np.stack([np.bincount(y[r], minlength=3) for r in rows]) == counts).all()
    assert len({r.tobytes() for r in rows}) > 1  # resamples, not the split 300 times
    # through bootstrap itself: a metric reading the class-2 count never varies
    share = Metric("class2_count", lambda y_true, y_pred: float((y_true == 2).sum()), "maximize")
    record = EvalRecord(y, rng.choice(3, size=len(y)), n_classes=3)
    assert S.bootstrap(share, record, n=200, seed=1) == (counts[2], counts[2], counts[2])

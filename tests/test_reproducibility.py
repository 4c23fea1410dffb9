"""What a study's seed makes reproducible: the reference, the sampler's draws, resumes."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
from test_search import run_cli, tiny_checkpoint, write_csv, write_study  # noqa: F401


def _prepared_reference(toml: Path, run_dir: Path) -> dict[str, torch.Tensor]:
    from nas_fair.config import load_study
    from nas_fair.search.session import Session

    session = Session(load_study(toml), run_dir, quiet=True)
    session.prepare()
    assert not session.reference_info.get("cached") and session.reference_info["finetuned"]
    return {k: v.clone() for k, v in session.reference.state_dict().items()}


def test_reference_is_bit_identical_from_the_seed(tmp_path: Path, tiny_checkpoint: Path) -> None:  # noqa: F811
    """Two fresh run folders, same study and seed: the same fine-tuned reference, every tensor
    equal bit for bit, whatever the global random state was before (here: different on purpose,
    as in two processes with different histories); preparing leaves that state alone."""
    toml = write_study(tmp_path, tiny_checkpoint)
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    first = _prepared_reference(toml, tmp_path / "run1")
    assert torch.equal(torch.get_rng_state(), before)
    torch.rand(17)  # another history of the global generator
    second = _prepared_reference(toml, tmp_path / "run2")
    assert first.keys() == second.keys()
    differ = [k for k in first if not torch.equal(first[k], second[k])]
    assert not differ, differ
    # the head is new (the checkpoint has 2 labels, the task 3) and was trained
    assert first["classifier.weight"].shape[0] == 3


def test_a_reused_recipe_is_judged_by_the_current_limits(tmp_path: Path,
                                                         tiny_checkpoint: Path) -> None:  # noqa: F811
    """A repeated recipe copies the earlier trial's measurements, not its feasibility: after
    --min-accuracy / --max-bias-increase change on resume, its constraints are recomputed."""
    from nas_fair.config import load_study
    from nas_fair.objectives.scores import directions, limit_constraints
    from nas_fair.search.session import Session
    from nas_fair.search.table import trial_constraints
    from nas_fair.spaces import anchor_trials

    cfg = load_study(write_study(tmp_path, tiny_checkpoint, steps=2))
    session = Session(cfg, tmp_path / "run", quiet=True)
    session.prepare()
    ref = session.score_reference()
    reference = {"values": ref.values(), "accuracy": ref.accuracy, "bias": ref.bias}
    study = optuna.create_study(directions=directions(cfg))
    recipe = anchor_trials(session.space)[0]
    study.enqueue_trial(recipe)
    study.optimize(lambda t: session.run_trial(t, reference), n_trials=1)
    first = study.trials[0]
    assert set(trial_constraints(first)) == {"collapsed", "accuracy_floor"}
    # the resumed run's limits: no model meets an accuracy of 2, every bias increase passes
    cfg.objectives.min_accuracy = 2.0
    cfg.objectives.max_bias_increase = 10.0
    study.enqueue_trial(recipe)
    study.optimize(lambda t: session.run_trial(t, reference), n_trials=1)
    second = study.trials[1]
    assert second.user_attrs["same_recipe_as"] == 0 and second.values == first.values
    cons = trial_constraints(second)
    expected = limit_constraints(cfg, first.values[2], first.values[3], first.user_attrs["bias_ci"],
                                 reference, max_bias_increase=10.0, min_accuracy=2.0)
    assert {k: cons[k] for k in expected} == expected
    assert cons["min_accuracy"] > 0 and cons["max_bias_increase"] <= 0
    assert cons["collapsed"] == trial_constraints(first)["collapsed"]
    assert second.user_attrs["constraints"] == list(cons.values())


def _toy_objective(trial: optuna.Trial) -> list[float]:
    """Four objectives that depend on the parameters only (deterministic selection)."""
    x = trial.suggest_float("x", 0.0, 1.0)
    y = trial.suggest_float("y", 0.0, 1.0)
    k = trial.suggest_categorical("k", [1, 2, 3, 4])
    return [x, y + 0.1 * k, 1 - x * y, abs(x - y)]


def _toy_study(url: str, seed: int = 0) -> optuna.Study:
    from nas_fair.config import parse_study
    from nas_fair.search.run import Budget, open_study

    cfg = parse_study(f'name = "toy"\nseed = {seed}\n')
    return open_study(cfg, url, create=True, budget=Budget(trials=8))


def _recipes(study: optuna.Study) -> list[tuple]:
    return [tuple(sorted(t.params.items())) for t in study.get_trials()]


def test_two_processes_on_one_study_draw_their_own_recipes(tmp_path: Path) -> None:
    """Two plain ``nas-fair search`` runs on one SQLite study, opened at the same moment and
    taking turns: every trial gets its own recipe (before: the second run repeated the first)."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    a, b = _toy_study(url), _toy_study(url)
    for _ in range(4):
        a.optimize(_toy_objective, n_trials=1)
        b.optimize(_toy_objective, n_trials=1)
    assert len(set(_recipes(a))) == 8


def test_one_process_draws_the_same_recipes_from_the_seed(tmp_path: Path) -> None:
    """One process: the same seed draws the same recipes, across NSGA-II generations, whether
    the study runs at once or stops and resumes; another seed draws others."""
    def run(name: str, chunks: list[int], seed: int = 0) -> list[tuple]:
        url = f"sqlite:///{tmp_path / name}"
        for n in chunks:  # each chunk is a run of its own (a resume), as the CLI opens it
            _toy_study(url, seed).optimize(_toy_objective, n_trials=n)
        return _recipes(_toy_study(url, seed))

    straight = run("a.db", [10])
    assert run("b.db", [10]) == straight
    assert run("c.db", [3, 4, 3]) == straight
    assert set(run("d.db", [10], seed=1)).isdisjoint(straight)


def test_a_ctrl_c_trial_is_run_again_on_resume(tmp_path: Path, tiny_checkpoint: Path,  # noqa: F811
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C in the middle of anchor trial 1: it is failed (and does not count against the
    budget), and the next run re-runs its recipe, so every anchor and the whole budget finish."""
    import nas_fair.search.trial as study_module  # the trial body compresses

    toml = write_study(tmp_path, tiny_checkpoint, steps=2)
    run_dir = tmp_path / "run"
    compress = study_module.compress
    calls = []

    def interrupted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return compress(*args, **kwargs)

    monkeypatch.setattr(study_module, "compress", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_cli("search", "--config", str(toml), "--budget", "6", "--run-dir", str(run_dir),
                "--quiet")
    monkeypatch.setattr(study_module, "compress", compress)
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{run_dir / 'study.db'}")
    stopped = study.trials[1]
    assert stopped.state == optuna.trial.TrialState.FAIL and stopped.user_attrs["interrupted"]
    assert stopped.user_attrs["anchor"]
    assert run_cli("search", "--config", str(toml), "--budget", "6", "--run-dir", str(run_dir),
                   "--quiet") == 0
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{run_dir / 'study.db'}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 6
    retry = [t for t in study.trials if t.user_attrs.get("retry_of") == 1]
    assert len(retry) == 1 and retry[0].state == optuna.trial.TrialState.COMPLETE
    assert retry[0].params == stopped.params and retry[0].user_attrs["anchor"]
    anchors = study.user_attrs["anchors"]
    ran = [t.params for t in complete if t.user_attrs.get("anchor")]
    assert len(ran) == len(anchors) == 5
    for a in anchors:  # every anchor ran
        assert any(all(p[k] == v for k, v in a.items()) for p in ran), a


def test_a_trial_replays_exactly_after_the_cached_reference_is_lost(
        tmp_path: Path, tiny_checkpoint: Path) -> None:  # noqa: F811
    """The reference and caches deleted after a search (a cleaned run folder): they are built
    again from the seed, and replaying a trial gives the predictions it was scored by, as
    export requires."""
    import shutil

    from nas_fair.config import load_study
    from nas_fair.search.session import Session, predictions_digest

    # noisy labels: what the fine-tuned reference predicts depends on where training started
    noisy = write_csv(tmp_path / "noisy.csv", cue_right={"f": 0.6, "m": 0.75})
    toml = write_study(tmp_path, tiny_checkpoint, steps=3, data=str(noisy))
    run_dir = tmp_path / "run"
    assert run_cli("search", "--config", str(toml), "--budget", "1", "--run-dir", str(run_dir),
                   "--quiet") == 0
    trial = optuna.load_study(study_name="tiny",
                              storage=f"sqlite:///{run_dir / 'study.db'}").trials[0]
    assert trial.user_attrs["cost"]["recovery_steps_run"] > 0  # a recovered (trained) student
    for d in ("reference", "cache"):
        shutil.rmtree(run_dir / d)
    torch.rand(5)  # whatever the process did before
    session = Session(load_study(toml), run_dir, quiet=True)
    session.prepare()
    assert not session.reference_info.get("cached")
    record = session.evaluate(session.replay(trial.params))
    assert predictions_digest(record.y_pred) == trial.user_attrs["predictions_sha256"]

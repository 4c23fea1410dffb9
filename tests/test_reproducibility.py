"""What a study's seed makes reproducible: the reference, the sampler's draws, resumes."""

from __future__ import annotations

from pathlib import Path

import torch
from test_search import run_cli, tiny_checkpoint, write_study  # noqa: F401


def _prepared_reference(toml: Path, run_dir: Path) -> dict[str, torch.Tensor]:
    from nas_fair.config import load_study
    from nas_fair.search.study import Session

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
    import optuna

    from nas_fair.config import load_study
    from nas_fair.search.study import Session, directions, limit_constraints
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

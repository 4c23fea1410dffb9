"""End-to-end multi-fidelity search on a tiny model: rungs, promotion, continuation, the front."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import optuna
import test_search
from optuna.trial import TrialState
from test_search import load, run_cli, write_csv, write_study

from nas_fair.search.fidelity import Rungs, stale_checkpoints

tiny_checkpoint = test_search.tiny_checkpoint  # the fixture, shared with test_search

FIDELITY = "fidelity_steps = [2, 4, 8]\nfidelity_eta = 2"


def _study(tmp_path: Path, ckpt: Path, extra: str = FIDELITY, anchors: bool = False) -> Path:
    toml = write_study(tmp_path, ckpt)
    text = toml.read_text().replace("threads = 1", f"threads = 1\n{extra}"
                                    + ("" if anchors else "\nanchors = false"))
    toml.write_text(text)
    return toml


def _complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.trials if t.state == TrialState.COMPLETE]


def test_candidates_are_promoted_and_continue_their_student(tmp_path: Path, tiny_checkpoint: Path,
                                                            capsys) -> None:
    toml = _study(tmp_path, tiny_checkpoint)
    # without bias mitigation's own recovery pass, every recovery step run is distillation's
    toml.write_text(toml.read_text() + '\n[space]\nfamilies = ["pruning", "lowrank", "sharing", '
                    '"distillation", "quantization"]\n')
    run_dir = tmp_path / "run"
    assert run_cli("search", "--config", str(toml), "--budget", "9", "--run-dir", str(run_dir),
                   "--json") == 0
    result = json.loads(capsys.readouterr().out)
    study = load(run_dir)
    done = _complete(study)
    assert len(done) == 9
    fid = {t.number: t.user_attrs["fidelity"] for t in done}
    assert all(f["top"] == 2 for f in fid.values())
    by_rung = Counter(f["rung"] for f in fid.values())
    assert by_rung[1] >= 1 and by_rung[2] >= 1, by_rung  # 9 results, eta 2: both rungs reached
    # one result per (candidate, rung): no promotion was run twice
    keys = Counter((f["candidate"], f["rung"]) for f in fid.values())
    assert max(keys.values()) == 1
    for t in done:
        f = fid[t.number]
        logs = t.user_attrs["cost"]
        if f["promoted_from"] is None:
            assert f["rung"] == 0 and f["steps"] == 2 and logs["recovery_steps_run"] == 2
            continue
        src = study.trials[f["promoted_from"]]
        assert t.params == src.params  # the same recipe, recovered further
        assert src.user_attrs["fidelity"]["rung"] == f["rung"] - 1
        assert f["steps"] == (2, 4, 8)[f["rung"]]
        # continued from the lower rung's checkpoint: only the extra steps were run
        assert f["resumed"] and logs["recovery_steps_run"] == f["steps"] - (2, 4, 8)[f["rung"] - 1]
        assert t.user_attrs["latency"]["copied_from"] == src.number  # same architecture
    # a lower rung records its objectives only; a final result every metric and the audit views
    for t in done:
        final = fid[t.number]["rung"] == 2
        assert ("disparity" in t.user_attrs) == final and ("class_rates" in t.user_attrs) == final
        assert (len(t.user_attrs["bias"]) > 1) == final, t.user_attrs["bias"].keys()
        # the promoted candidate ranked in its rung's top half when it was promoted
    # the front holds top-rung results only, and lower-rung trials saved no model
    top = {t.number for t in done if fid[t.number]["rung"] == 2}
    assert result["pareto"] and {row["trial"] for row in result["pareto"]} <= top
    assert result["provisional_rung"] is None
    # each trial's latency was timed interleaved with the reference; the front re-timed at the end
    assert all(t.user_attrs["latency"]["method"] == "interleaved" for t in done)
    retimed = study.user_attrs["retimed"]
    assert {row["trial"] for row in result["pareto"]} == {int(n) for n in retimed}
    for row in result["pareto"]:
        again = row["latency_retimed"]
        assert again["latency_ms"] > 0 and again["ratio"] > 0
        assert set(again["backends"]) == {"torch", "onnxruntime"}  # both, side by side
    assert result["evaluations_per_rung"] == {str(k): v for k, v in sorted(by_rung.items())}
    assert all("artifact" not in t.user_attrs for t in done if fid[t.number]["rung"] < 2)
    # the report draws lower rungs as such and counts only final results for the hypervolume
    from nas_fair.search.report import report_data

    data = report_data(study, result["directions"], result["objectives"])
    groups = {t["number"]: t["group"] for t in data["trials"]}
    assert {n for n, g in groups.items() if g == "lower rung"} == \
        {n for n in fid if fid[n]["rung"] < 2}
    assert run_cli("report", "--config", str(toml), "--run-dir", str(run_dir), "--out",
                   str(tmp_path / "r.html")) == 0
    assert "rung 0 (provisional)" in (tmp_path / "r.html").read_text()
    # a lower rung's trial is provisional: export refuses it, naming the rule
    low = min(n for n in fid if fid[n]["rung"] == 0)
    assert run_cli("export", "--config", str(toml), "--run-dir", str(run_dir), "--trials",
                   str(low), "--out", str(tmp_path / "x")) == 2
    err = capsys.readouterr().err
    assert f"trial {low}" in err and "below the top rung" in err
    assert not (tmp_path / "x").exists()
    # a promoted top-rung trial exports without its saved model: rebuilt by one recovery of 8
    # steps, it is verified to predict what the chained one (2, 4, then 8 steps from
    # checkpoints) was measured to predict
    number = min(n for n in top if fid[n]["promoted_from"] is not None)
    import shutil

    shutil.rmtree(run_dir / "artifacts" / "tiny" / f"trial-{number}")
    assert run_cli("export", "--config", str(toml), "--run-dir", str(run_dir), "--trials",
                   str(number), "--out", str(tmp_path / "out")) == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "out" / f"trial-{number}" / "metrics.json").read_text())
    assert metrics["trial"] == number


def test_no_final_result_yet_shows_the_highest_rung_as_provisional(tmp_path: Path,
                                                                   tiny_checkpoint: Path,
                                                                   capsys) -> None:
    toml = _study(tmp_path, tiny_checkpoint)
    run_dir = tmp_path / "run"
    assert run_cli("search", "--config", str(toml), "--budget", "2", "--run-dir", str(run_dir)) == 0
    out = capsys.readouterr().out
    assert "no candidate has reached the top rung yet" in out and "provisional" in out
    assert "evaluations per rung" in out


def test_a_model_without_recovery_is_final_at_once(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """The int8 anchor recovers nothing (every family before quantization is off): it is the
    same model at every rung, so its first result is final, not provisional."""
    toml = _study(tmp_path, tiny_checkpoint, anchors=True)
    run_dir = tmp_path / "run"
    assert run_cli("search", "--config", str(toml), "--budget", "5", "--run-dir", str(run_dir),
                   "--quiet") == 0
    study = load(run_dir)
    int8 = study.trials[3]
    assert int8.params["quantization.ffn_bits"] == 8 and int8.params["pruning.ffn"] == 0.0
    f = int8.user_attrs["fidelity"]
    assert f["rung"] == 2 and f["independent"] and int8.user_attrs["cost"]["recovery_steps_run"] == 0
    pruned = study.trials[0]
    assert pruned.user_attrs["fidelity"]["rung"] == 0 and "independent" not in \
        pruned.user_attrs["fidelity"]


def test_resume_reclaims_a_promotion_and_runs_it_once(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """A run stopped after a result but before its promotion was queued (here: the ticket
    deleted by hand) queues it on resume; the promotion then runs exactly once."""
    toml = _study(tmp_path, tiny_checkpoint)
    run_dir = tmp_path / "run"
    assert run_cli("search", "--config", str(toml), "--budget", "2", "--run-dir", str(run_dir),
                   "--quiet") == 0
    study = load(run_dir)
    waiting = [t for t in study.trials if t.state == TrialState.WAITING]
    assert len(waiting) == 1  # 2 results at rung 0, eta 2: the better one is promoted
    study._storage.set_trial_state_values(waiting[0]._trial_id, TrialState.FAIL)
    assert run_cli("search", "--config", str(toml), "--budget", "4", "--run-dir", str(run_dir),
                   "--quiet") == 0
    study = load(run_dir)
    done = _complete(study)
    keys = Counter((t.user_attrs["fidelity"]["candidate"], t.user_attrs["fidelity"]["rung"])
                   for t in done)
    assert max(keys.values()) == 1
    assert any(t.user_attrs["fidelity"]["rung"] == 1 for t in done)


def test_fidelity_settings_are_validated_before_anything_is_written(tmp_path: Path,
                                                                    tiny_checkpoint: Path,
                                                                    capsys) -> None:
    for extra, msg in (
        ("fidelity_steps = [4, 2]", "strictly increasing"),
        ("fidelity_steps = [0, 2]", "integers in [1,"),
        ("fidelity_steps = [2, 4]\nfidelity_eta = 1", "fidelity_eta"),
        ("fidelity_steps = [2, 4]\nfidelity_test_share = 0", "fidelity_test_share must be in"),
        ("fidelity_test_share = 0.5", "fidelity_test_share = 0.5 needs lower rungs"),
    ):
        toml = _study(tmp_path, tiny_checkpoint, extra)
        run_dir = tmp_path / "bad"
        assert run_cli("search", "--config", str(toml), "--budget", "2", "--run-dir",
                       str(run_dir)) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err
        assert not run_dir.exists()
    toml = _study(tmp_path, tiny_checkpoint, "fidelity_steps = [2, 4]")
    toml.write_text(toml.read_text() + '\n[space]\nfamilies = ["pruning", "quantization"]\n')
    assert run_cli("search", "--config", str(toml), "--budget", "2", "--run-dir",
                   str(tmp_path / "bad")) == 2
    assert "needs the distillation family" in capsys.readouterr().err


def test_stale_checkpoints_keep_what_a_promotion_may_read() -> None:
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    rungs = Rungs(steps=(2, 4, 8), eta=3)
    dirs = ["minimize", "maximize"]

    def trial(number: int, values: list[float], state: TrialState = TrialState.COMPLETE,
              **fid) -> optuna.trial.FrozenTrial:
        t = create_trial(state=state, values=values if state == TrialState.COMPLETE else None,
                         params={"x": float(number)},
                         distributions={"x": FloatDistribution(0, 100)},
                         user_attrs={"fidelity": {"rung": 0, "candidate": number,
                                                  "promoted_from": None, "top": 2, **fid}})
        t.number = number
        return t

    trials = [trial(0, [1, 0.9]), trial(1, [2, 0.5]), trial(2, [3, 0.4]), trial(3, [4, 0.3]),
              trial(4, [5, 0.2]), trial(5, [6, 0.1]), trial(6, [0, 0], TrialState.FAIL),
              # candidate 0 promoted and done at rung 1; candidate 1's ticket still waiting
              trial(7, [1, 0.95], rung=1, candidate=0, promoted_from=0),
              trial(8, [0, 0], TrialState.WAITING, rung=1, candidate=1, promoted_from=1)]
    stale = stale_checkpoints(trials, rungs, dirs)
    assert 6 in stale  # failed: no result to continue
    assert 0 in stale  # continued already by trial 7
    assert 1 not in stale  # its promotion is waiting for it
    # rung 0 ranks 0 > 1 > 2 > ... (each dominates the next): the top 2/eta are 4 of 6
    assert {4, 5} <= stale and not {2, 3, 7} & stale


def test_a_lower_rung_predicts_swapped_rows_only_when_its_objective_reads_them(
        tmp_path: Path, tiny_checkpoint: Path, monkeypatch) -> None:
    """The counterfactual pass is half of a lower rung's evaluation: it runs there only for an
    objective that reads it; a final result always records it (the audit's flip rates)."""
    from nas_fair.config import load_study
    from nas_fair.search.session import Session

    calls: list[bool] = []
    original = Session._cf_pred

    def spy(self: Session, *args):  # noqa: ANN002, ANN202
        calls.append(True)
        return original(self, *args)

    monkeypatch.setattr(Session, "_cf_pred", spy)
    for bias, share, lower_reads in (("tpr_gap_rms", 1.0, False),
                                     ("counterfactual_flip_rate", 1.0, True),
                                     ("counterfactual_flip_rate", 0.5, True)):
        # noisy cues: rows the model gets wrong, so that rows' predictions differ
        noisy = write_csv(tmp_path / "noisy.csv", n=240, seed=1, cue_right={"f": 0.6, "m": 0.8})
        toml = write_study(tmp_path, tiny_checkpoint, data=str(noisy))
        toml.write_text(toml.read_text().replace('bias = "tpr_gap_rms"', f'bias = "{bias}"')
                        .replace("threads = 1", f"threads = 1\n{FIDELITY}\n"
                                 f"fidelity_test_share = {share}"))
        session = Session(load_study(toml), tmp_path / "run", quiet=True)
        session.prepare()
        assert len(session.tensors["cf_rows"]) > 0  # the tiny texts have pronouns to swap
        model = session.replay({"pruning.ffn": 0.5})  # not the reference: predictions differ
        records = {}
        for full, expected in ((False, lower_reads), (True, True)):
            calls.clear()
            records[full] = record = session.evaluate(model, full=full)
            assert bool(calls) == expected and (record.y_pred_cf is not None) == expected
            session.metrics(record, paired=True, metrics=session.scored(full))  # scores as is
        # a lower rung's sample: the same predictions, swapped ones too, as on every row
        rows = session.lower_rows if share < 1 else slice(None)
        lower, every = records[False], records[True]
        assert (share < 1) == (len(lower) < len(every))
        assert every.rows is None and (lower.rows is None) == (share == 1)  # says which rows
        if share < 1:
            assert list(lower.rows) == list(rows) and list(lower.take([1, 0]).rows) == \
                [rows[1], rows[0]]
        assert (lower.y_pred == every.y_pred[rows]).all()
        assert (lower.y_pred_ref == every.y_pred_ref[rows]).all()
        if lower_reads:  # a swapped row's prediction put at another row's place would differ
            assert (lower.y_pred_cf == every.y_pred_cf[rows]).all()


def test_lower_rungs_score_a_sample_of_the_test_rows(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """fidelity_test_share: a lower rung is scored on the same seeded sample of every (label,
    group) cell for every candidate; a final result on every row."""
    from nas_fair.config import load_study
    from nas_fair.search.audit import decode_predictions
    from nas_fair.search.fidelity import lower_rung_rows
    from nas_fair.search.session import Session

    # the anchors make the outcome not depend on timing: the pruning ones start at rung 0, the
    # int8 one recovers nothing and is final at once
    toml = _study(tmp_path, tiny_checkpoint, FIDELITY + "\nfidelity_test_share = 0.5",
                  anchors=True)
    run_dir = tmp_path / "run"
    assert run_cli("search", "--config", str(toml), "--budget", "6", "--run-dir", str(run_dir),
                   "--quiet") == 0
    session = Session(load_study(toml), run_dir, quiet=True)
    test, rows = session.data.test, session.lower_rows
    assert rows is not None and 0 < len(rows) < len(test)
    assert set(zip(test.labels, test.groups)) == set(zip(test.labels[rows], test.groups[rows]))
    assert list(lower_rung_rows(test.labels, test.groups, 0.5, 0)) == list(rows)  # seeded
    done = _complete(load(run_dir))
    lower = [t for t in done if t.user_attrs["fidelity"]["rung"] < 2]
    final = [t for t in done if t.user_attrs["fidelity"]["rung"] == 2]
    assert lower and final
    for t in lower:
        assert t.user_attrs["fidelity"]["test_rows"] == len(rows)
        assert len(decode_predictions(t.user_attrs["test_predictions"])) == len(rows)
    for t in final:
        assert "test_rows" not in t.user_attrs["fidelity"]
        assert len(decode_predictions(t.user_attrs["test_predictions"])) == len(test)

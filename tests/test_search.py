"""End-to-end: nas-fair search on a tiny BERT checkpoint and a CSV, resume, crash, replay."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest

from nas_fair.search.cli import main

from conftest import WORDS, tiny_config

CUES = ["cook", "sheriff", "clerk"]


def write_csv(path: Path, n: int = 150, seed: int = 0, *,
              cue_right: dict[str, float] | None = None) -> Path:
    """Sentences whose cue word names the label. ``cue_right`` (per gender) is the chance the
    cue is the right one (else a random cue): noisy data gives imperfect accuracy, and unequal
    chances a real group gap."""
    rng = np.random.default_rng(seed)
    rows = ["text,label,gender"]
    for i in range(n):
        label = i % 3
        gender = "f" if rng.random() < 0.4 else "m"
        cue = CUES[label]
        if cue_right is not None and not rng.random() < cue_right[gender]:
            cue = CUES[int(rng.integers(3))]
        pron = "she" if gender == "f" else "he"
        filler = " ".join(rng.choice(["the", "good", "new", "old", "my", "is"], size=3))
        rows.append(f'"{pron} works as a {cue} {filler}",{label},{gender}')
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny, untrained BERT saved as a Hugging Face checkpoint folder with its tokenizer."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt"))


def write_checkpoint(d: Path) -> Path:
    import torch
    from transformers import AutoModelForSequenceClassification, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_config("bert", 2, len(vocab)))
    model.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    return d / "model"


def write_study(tmp: Path, ckpt: Path, *, name: str = "tiny", steps: int = 4,
                extra: str = "", data: str | None = None) -> Path:
    csv = write_csv(tmp / "data.csv") if data is None else Path(data)
    text = f"""
name = "{name}"
seed = 0
[model]
path = "{ckpt}"
max_length = 16
epochs = 20
learning_rate = 3e-3
batch_size = 16
[data]
source = "file"
train = "{csv}"
group_column = "gender"
[search]
batch_size = 4
seq_len = 16
recovery_steps = {steps}
latency_repeats = 2
bootstrap = 50
threads = 1
[objectives]
accuracy = "macro_f1"
bias = "tpr_gap_rms"
{extra}
"""
    path = tmp / f"{name}.toml"
    path.write_text(text)
    return path


def run_cli(*args: str) -> int:
    return main(list(args))


def load(run_dir: Path, name: str = "tiny") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{run_dir / 'study.db'}")


def test_search_runs_and_resumes(tmp_path: Path, tiny_checkpoint: Path, capsys) -> None:
    toml = write_study(tmp_path, tiny_checkpoint)
    run_dir = tmp_path / "run"
    assert run_cli("search", "--config", str(toml), "--budget", "3", "--run-dir", str(run_dir)) == 0
    out = capsys.readouterr().out
    assert "Pareto front" in out and "ref " in out and "trial   0" in out
    study = load(run_dir)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 3
    assert study.metric_names == ["size_mb", "latency_ms", "macro_f1", "tpr_gap_rms"]
    assert [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE", "MAXIMIZE", "MINIMIZE"]
    ref = study.user_attrs["reference"]
    assert len(ref["values"]) == 4 and ref["size_mb"] > 0
    # every parameter is suggested in every trial (NSGA-II samples the rest at random)
    keys = {frozenset(t.params) for t in complete}
    assert len(keys) == 1
    assert {k.split(".")[0] for k in next(iter(keys))} >= {"pruning", "quantization"}
    for t in complete:
        assert len(t.values) == 4 and all(np.isfinite(t.values))
        assert set(t.user_attrs["cost"]) >= {"compress_s", "recover_s", "evaluate_s", "latency_s"}
        assert "tpr_gap_rms" in t.user_attrs["bias"]
    stamp = run_dir / "reference" / "nas_fair_reference.json"
    mtime = stamp.stat().st_mtime_ns
    cached = {p: p.stat().st_mtime_ns for d in ("reference", "cache")
              for p in (run_dir / d).rglob("*") if p.is_file()}
    assert any(p.parent.name == "cache" for p in cached)  # e.g. pruning's importance scores
    # same budget: nothing more to do; larger budget continues to exactly that many
    assert run_cli("search", "--config", str(toml), "--budget", "3", "--run-dir", str(run_dir)) == 0
    assert "budget met" in capsys.readouterr().out
    assert run_cli("search", "--config", str(toml), "--budget", "5", "--run-dir", str(run_dir),
                   "--json") == 0
    import json

    result = json.loads(capsys.readouterr().out)
    assert result["completed_trials"] == 5 and result["pareto"]
    assert stamp.stat().st_mtime_ns == mtime  # the reference was reused, not fine-tuned again
    # the resumed trials recomputed nothing an earlier run cached (logits, importance scores)
    assert {p: p.stat().st_mtime_ns for p in cached} == cached
    study = load(run_dir)
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) == 5
    # the first trials are the families' anchors, queued once (not again on resume), and the
    # first generation keeps as many random members as anchors
    anchors = study.user_attrs["anchors"]
    # one each for pruning, low-rank, sharing, quantization (distillation and mitigation: none),
    # then the combined one (FFN pruned 25% and int8 together)
    assert len(anchors) == 5
    assert study.user_attrs["population_size"] == max(4, 2 * len(anchors))
    queued = [t for t in study.trials if t.user_attrs.get("anchor")]
    assert [t.number for t in queued] == [0, 1, 2, 3, 4]
    assert [{k: t.params[k] for k in a} for t, a in zip(queued, anchors)] == anchors
    int8 = queued[3]
    assert int8.params["quantization.ffn_bits"] == 8 and int8.params["pruning.ffn"] == 0.0
    both = anchors[4]
    assert (both["pruning.ffn"], both["pruning.heads"], both["quantization.ffn_bits"],
            both["lowrank.ffn_rank"]) == (0.25, 0.0, 8, 1.0)
    # its student equals the reference until quantization: recovery is skipped, not run
    assert int8.user_attrs["cost"]["recovery_steps_run"] == 0
    assert queued[0].user_attrs["cost"]["recovery_steps_run"] > 0


def test_anchors_can_be_turned_off(tmp_path: Path, tiny_checkpoint: Path) -> None:
    toml = write_study(tmp_path, tiny_checkpoint)
    toml.write_text(toml.read_text().replace("threads = 1", "threads = 1\nanchors = false"))
    run_dir = tmp_path / "run"
    assert run_cli("search", "--config", str(toml), "--budget", "2", "--run-dir", str(run_dir),
                   "--quiet") == 0
    study = load(run_dir)
    assert study.user_attrs["anchors"] == [] and study.user_attrs["population_size"] == 4
    assert not any(t.user_attrs.get("anchor") for t in study.trials)


def test_pareto_command(tmp_path: Path, tiny_checkpoint: Path, capsys) -> None:
    toml = write_study(tmp_path, tiny_checkpoint)
    run_dir = tmp_path / "run"
    assert run_cli("pareto", "--config", str(toml), "--run-dir", str(run_dir)) == 2
    assert "has not been run yet" in capsys.readouterr().err
    assert run_cli("search", "--config", str(toml), "--budget", "2", "--run-dir", str(run_dir),
                   "--quiet") == 0
    capsys.readouterr()
    assert run_cli("pareto", "--config", str(toml), "--run-dir", str(run_dir)) == 0
    assert "Pareto front of study 'tiny'" in capsys.readouterr().out
    assert run_cli("report", "--config", str(toml), "--run-dir", str(run_dir)) == 0
    page = (run_dir / "report.html").read_text()
    assert "<script src=" not in page  # plotly.js is embedded: the page opens offline
    # + the compression-disparity view, the per-class gaps and the training-share scatter
    assert page.count("Plotly.newPlot") == 6


def test_hypervolume_matches_hand_computation() -> None:
    from nas_fair.search.report import hypervolume

    pts = np.array([[1.0, 0.5], [0.5, 1.0], [3.0, 0.1]])  # the last lies outside the box
    # union of [1,2]x[0.5,2] and [0.5,2]x[1,2]: 1*1.5 + 0.5*1 = 2.0
    assert hypervolume(pts, np.array([2.0, 2.0])) == pytest.approx(2.0)
    assert hypervolume(pts[2:], np.array([2.0, 2.0])) == 0.0


def test_replay_reproduces_recorded_metrics(tmp_path: Path, tiny_checkpoint: Path) -> None:
    from nas_fair.config import load_study
    from nas_fair.objectives import ACCURACY
    from nas_fair.search.session import Session

    toml = write_study(tmp_path, tiny_checkpoint)
    run_dir = tmp_path / "run"
    assert run_cli("search", "--config", str(toml), "--budget", "2", "--run-dir", str(run_dir),
                   "--quiet") == 0
    study = load(run_dir)
    session = Session(load_study(toml), run_dir, quiet=True)
    session.prepare()
    for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        model = session.replay(t.params)
        record = session.evaluate(model)
        assert ACCURACY["macro_f1"](record) == pytest.approx(t.values[2], abs=1e-12)
        assert t.user_attrs["bias"]["tpr_gap_rms"]["value"] == pytest.approx(
            session.score(model, record, paired=False).attrs["bias"]["tpr_gap_rms"]["value"])


def _query(url: str, sql: str) -> tuple | None:
    """One row of ``sql`` on the study's database (SQLite or PostgreSQL), None if not there yet."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url.replace("postgresql://", "postgresql+psycopg2://"))
    try:
        with engine.connect() as con:
            return con.exec_driver_sql(sql).fetchone()
    except sqlalchemy.exc.SQLAlchemyError:
        return None
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_killed_trial_is_failed_and_retried(tmp_path: Path, tiny_checkpoint: Path, backend: str,
                                            request: pytest.FixtureRequest) -> None:
    """SIGKILL mid-trial, after one trial completed: the resume fails and retries the killed
    trial, keeps the completed one as it was, and finishes the budget exactly."""
    from nas_fair.search.storage import make_storage

    toml = write_study(tmp_path, tiny_checkpoint, steps=60)
    # anchors queued ahead of the retry would fill the budget first: this test is about the retry
    toml.write_text(toml.read_text().replace("threads = 1", "threads = 1\nanchors = false"))
    run_dir = tmp_path / "run"
    if backend == "sqlite":
        url, storage = f"sqlite:///{run_dir / 'study.db'}", []
    else:
        url = request.getfixturevalue("postgres_server").new_database()
        storage = ["--storage", url]
    cmd = [sys.executable, "-m", "nas_fair.search.cli", "search", "--config", str(toml),
           "--budget", "3", "--run-dir", str(run_dir), "--quiet", *storage]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    running = None
    while time.monotonic() < deadline and proc.poll() is None:
        # a second trial running, far enough to have recorded its worker (host, pid)
        row = _query(url, "select t.number from trials t join trial_user_attributes a "
                          "on a.trial_id = t.trial_id where t.state = 'RUNNING' "
                          "and a.key = 'worker' and t.number > 0")
        if row is not None:
            running = row[0]
            break
        time.sleep(0.05)
    assert running is not None, proc.stderr.read().decode() if proc.poll() is not None else ""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    study = optuna.load_study(study_name="tiny", storage=make_storage(url))
    assert study.trials[running].state == optuna.trial.TrialState.RUNNING
    killed_params = study.trials[running].params
    before = {t.number: t.values for t in study.trials
              if t.state == optuna.trial.TrialState.COMPLETE}
    assert before  # something was complete when the worker died
    assert run_cli("search", "--config", str(toml), "--budget", "3", "--run-dir", str(run_dir),
                   "--quiet", *storage) == 0
    study = optuna.load_study(study_name="tiny", storage=make_storage(url))
    states = [t.state for t in study.trials]
    assert states[running] == optuna.trial.TrialState.FAIL
    assert states.count(optuna.trial.TrialState.COMPLETE) == 3
    assert {n: study.trials[n].values for n in before} == before  # nothing complete was lost
    retry = [t for t in study.trials if t.user_attrs.get("retry_of") == running]
    assert len(retry) == 1 and retry[0].params == killed_params
    assert retry[0].state == optuna.trial.TrialState.COMPLETE
    if backend == "sqlite":  # the file survived the kill intact
        assert _query(url, "pragma integrity_check") == ("ok",)


# ------------------------------------------------------------------ bad input: exit 2, one line


def _bad(capsys, *args: str) -> str:
    code = run_cli(*args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_budget(tmp_path: Path, tiny_checkpoint: Path, capsys) -> None:
    toml = write_study(tmp_path, tiny_checkpoint)
    run_dir = tmp_path / "run"
    for budget in ("0", "-3", "abc", "0m"):
        err = _bad(capsys, "search", "--config", str(toml), "--budget", budget,
                   "--run-dir", str(run_dir))
        assert "--budget" in err
    assert not run_dir.exists()


def test_unknown_study_and_malformed_toml(tmp_path: Path, capsys) -> None:
    err = _bad(capsys, "search", "--study", "bois", "--budget", "1")
    assert "unknown study 'bois'" in err and "did you mean 'bios'" in err
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[model\npath = 1\n')
    assert "not valid TOML" in _bad(capsys, "search", "--config", str(bad), "--budget", "1")
    typo = tmp_path / "typo.toml"
    typo.write_text('name = "x"\n[search]\nsampeler = "nsga2"\n')
    assert "did you mean 'sampler'" in _bad(capsys, "search", "--config", str(typo), "--budget", "1")
    wrong_type = tmp_path / "type.toml"
    wrong_type.write_text('name = "x"\n[search]\nrecovery_steps = "many"\n')
    assert "must be int" in _bad(capsys, "search", "--config", str(wrong_type), "--budget", "1")
    assert "does not exist" in _bad(capsys, "search", "--config", str(tmp_path / "no.toml"),
                                    "--budget", "1")


def test_unknown_sampler(tmp_path: Path, tiny_checkpoint: Path, capsys) -> None:
    toml = write_study(tmp_path, tiny_checkpoint, extra="")
    err = _bad(capsys, "search", "--config", str(toml), "--budget", "1", "--sampler", "nsga3",
               "--run-dir", str(tmp_path / "r"))
    assert "--sampler must be one of nsga2, random, tpe" in err
    text = toml.read_text().replace("[search]\n", '[search]\nsampler = "cmaes"\n')
    toml.write_text(text)
    assert "[search] sampler must be one of" in _bad(
        capsys, "search", "--config", str(toml), "--budget", "1", "--run-dir", str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()


def test_missing_model_path(tmp_path: Path, capsys) -> None:
    toml = write_study(tmp_path, tmp_path / "no-such-model")
    err = _bad(capsys, "search", "--config", str(toml), "--budget", "1",
               "--run-dir", str(tmp_path / "r"))
    assert "[model] path" in err and "does not exist" in err
    assert not (tmp_path / "r").exists()


def test_missing_column_and_empty_split(tmp_path: Path, tiny_checkpoint: Path, capsys) -> None:
    csv = tmp_path / "cols.csv"
    csv.write_text("sentence,label,gender\nhe is a cook,0,m\nshe is a clerk,1,f\n")
    toml = write_study(tmp_path, tiny_checkpoint, data=str(csv))
    err = _bad(capsys, "search", "--config", str(toml), "--budget", "1",
               "--run-dir", str(tmp_path / "r"))
    assert "no column 'text'" in err
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label,gender\n")
    toml = write_study(tmp_path, tiny_checkpoint, data=str(empty))
    err = _bad(capsys, "search", "--config", str(toml), "--budget", "1",
               "--run-dir", str(tmp_path / "r"))
    assert "empty" in err
    assert not (tmp_path / "r").exists()


def test_metric_needing_groups_fails_at_start(tmp_path: Path, tiny_checkpoint: Path,
                                              capsys) -> None:
    toml = write_study(tmp_path, tiny_checkpoint)
    toml.write_text(toml.read_text().replace('group_column = "gender"\n', ""))
    err = _bad(capsys, "search", "--config", str(toml), "--budget", "1",
               "--run-dir", str(tmp_path / "r"))
    assert "group" in err
    assert not (tmp_path / "r").exists()


def test_degraded_and_collapsed_trials_are_infeasible() -> None:
    """A model keeping < half the reference's accuracy metric cannot win on bias."""
    from types import SimpleNamespace

    from nas_fair.config import parse_study
    from nas_fair.objectives.scores import Scores
    from nas_fair.search.session import Session

    cfg = parse_study('name = "x"\n')
    fake = SimpleNamespace(cfg=cfg)
    ref = {"accuracy": 0.62, "bias": 0.26}

    def cons(acc: float, collapsed: bool = False) -> dict[str, float]:
        s = Scores(10.0, 50.0, acc, 0.05, {"collapse": {"collapsed": collapsed},
                                           "bias_ci": [0.03, 0.08]})
        return Session.constraints(fake, s, ref)

    assert all(v <= 0 for v in cons(0.45).values())
    assert cons(0.13)["accuracy_floor"] > 0  # trial 2 of the default study: macro-F1 0.13
    assert cons(0.45, collapsed=True)["collapsed"] > 0
    cfg.objectives.min_accuracy_ratio = 0.0
    assert "accuracy_floor" not in cons(0.13)


def test_a_recipe_already_run_is_scored_from_its_trial(tmp_path: Path,
                                                       tiny_checkpoint: Path) -> None:
    """NSGA-II proposes recipes it has already run; recovery is deterministic for a recipe and
    thread count, so the second is scored from the first instead of being built again."""
    import torch

    from nas_fair.config import load_study
    from nas_fair.objectives.scores import directions
    from nas_fair.search.session import Session, predictions_digest
    from nas_fair.spaces import anchor_trials

    cfg = load_study(write_study(tmp_path, tiny_checkpoint, steps=20))
    session = Session(cfg, tmp_path / "run", quiet=True)
    session.prepare()
    ref = session.score_reference()
    reference = {"values": ref.values(), "accuracy": ref.accuracy, "bias": ref.bias}
    study = optuna.create_study(directions=directions(cfg))
    pruned = anchor_trials(session.space)[0]
    assert pruned["pruning.heads"] > 0
    for _ in range(2):
        study.enqueue_trial(pruned)
    study.optimize(lambda t: session.run_trial(t, reference), n_trials=2)
    first, second = study.trials
    assert first.params == second.params
    assert "same_recipe_as" not in first.user_attrs
    assert second.user_attrs["same_recipe_as"] == 0
    assert second.values == first.values
    assert second.constraints == first.constraints
    for key in ("predictions_sha256", "bias_ci", "collapse", "size_bytes"):
        assert second.user_attrs[key] == first.user_attrs[key]
    assert second.user_attrs["cost"]["recovery_steps_run"] == 0
    assert first.user_attrs["cost"]["recovery_steps_run"] > 0
    assert "artifact" in first.user_attrs and "artifact" not in second.user_attrs
    # the reuse is sound: building the recipe again gives the predictions it was scored by
    record = session.evaluate(session.replay(second.params))
    assert predictions_digest(record.y_pred) == second.user_attrs["predictions_sha256"]
    # with another thread count the kernels differ: that trial is run, not reused
    threads = torch.get_num_threads()
    study.enqueue_trial(pruned)
    try:
        torch.set_num_threads(threads + 1)
        study.optimize(lambda t: session.run_trial(t, reference), n_trials=1)
    finally:
        torch.set_num_threads(threads)
    third = study.trials[2]
    assert third.params == first.params and "same_recipe_as" not in third.user_attrs
    assert third.user_attrs["cost"]["recovery_steps_run"] > 0


def test_a_stored_trials_scores_are_read_by_name() -> None:
    """Optuna keeps the objectives by position; everything else reads them by name."""
    from nas_fair.objectives.scores import OBJECTIVE_KEYS, Scores

    trial = optuna.trial.create_trial(values=[1.0, 2.0, 3.0, 4.0],
                                      user_attrs={"bias_ci": [3.5, 4.5]})
    scores = Scores.of_trial(trial)
    assert [getattr(scores, k) for k in OBJECTIVE_KEYS] == [1.0, 2.0, 3.0, 4.0]
    assert (scores.accuracy, scores.bias) == (3.0, 4.0)
    assert scores.values() == list(trial.values) and scores.attrs == {"bias_ci": [3.5, 4.5]}
    with pytest.raises(ValueError, match="no 4 objective values"):
        Scores.of_trial(optuna.trial.create_trial(value=1.0))

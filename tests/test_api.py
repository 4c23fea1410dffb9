"""The Python API (nas_fair.optimize / pareto / export / load): quiet, returns objects, agrees
with the CLI and raises the CLI's messages; ``python -m nas_fair`` is the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_search import run_cli, write_checkpoint, write_study

import nas_fair
from nas_fair.config import load_study
from nas_fair.errors import UserError

# The first search runs in a fresh process: its stdout and stderr are all it printed (an
# in-process capture misses handlers that libraries bound to the streams at import).
FIRST_RUN = """
import json, sys
import nas_fair
r = nas_fair.optimize(sys.argv[1], budget=2, run_dir=sys.argv[2])
with open(sys.argv[3], "w") as f:
    json.dump({"type": type(r).__name__, "study_name": r.study_name, "storage": r.storage,
               "run_dir": str(r.run_dir), "n_trials": r.n_trials,
               "completed_trials": r.completed_trials, "optuna": type(r.study).__name__,
               "front": [m.to_dict() for m in r.front], "messages": r.messages}, f)
"""


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("api")
    toml = write_study(tmp, write_checkpoint(tmp / "ckpt"), steps=2)
    run_dir = tmp / "run"
    summary = tmp / "summary.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", FIRST_RUN, str(toml), str(run_dir),
                           str(summary)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return {"toml": toml, "run_dir": run_dir, "tmp": tmp, "stdout": proc.stdout,
            "stderr": proc.stderr, "result": json.loads(summary.read_text())}


def test_optimize_is_quiet_and_returns_the_front(done: dict[str, Any]) -> None:
    assert done["stdout"] == "" and done["stderr"] == ""
    r = done["result"]
    assert r["type"] == "SearchResult" and r["optuna"] == "Study"
    assert r["study_name"] == "tiny" and r["n_trials"] == 2 and r["completed_trials"] == 2
    assert Path(r["run_dir"]) == done["run_dir"].resolve()
    assert r["storage"] == f"sqlite:///{done['run_dir'].resolve() / 'study.db'}"
    assert r["front"] and all(m["on_front"] or not m["feasible"] for m in r["front"])
    row = r["front"][0]
    assert {"trial", "size_mb", "latency_ms", "accuracy", "bias", "size_mb_ratio",
            "pruning.ffn"} <= set(row)
    # what the CLI would have printed is kept, not printed
    assert any(m.startswith("prepared in") for m in r["messages"])


def test_resume_counts_this_calls_trials_and_prints_nothing(done: dict[str, Any],
                                                           capsys) -> None:
    r = nas_fair.optimize(done["toml"], budget=3, run_dir=done["run_dir"])
    assert capsys.readouterr() == ("", "")
    assert r.n_trials == 1 and r.completed_trials == 3
    assert len(r.study.trials) >= 3 and r.front
    assert isinstance(r.front[0], nas_fair.FrontModel)
    # progress=True prints what the CLI prints, less the final table
    again = nas_fair.optimize(done["toml"], budget=3, run_dir=done["run_dir"], progress=True)
    out = capsys.readouterr().out
    assert "budget met: 3 completed trials" in out and "Pareto front" not in out
    assert again.n_trials == 0 and any("budget met" in m for m in again.messages)


def test_pareto_matches_the_cli_table(done: dict[str, Any], capsys) -> None:
    where = ["--config", str(done["toml"]), "--run-dir", str(done["run_dir"])]
    for options, kwargs in (([], {}),
                            (["--sort", "latency", "--min-accuracy", "0.5"],
                             {"sort": "latency", "min_accuracy": 0.5})):
        capsys.readouterr()
        assert run_cli("pareto", *where, *options, "--json") == 0
        table = json.loads(capsys.readouterr().out)["pareto"]
        front = nas_fair.pareto(done["toml"], run_dir=done["run_dir"], **kwargs)
        assert capsys.readouterr() == ("", "")
        # a StudyConfig names the same study
        assert nas_fair.pareto(load_study(done["toml"]), run_dir=done["run_dir"], **kwargs) == front
        assert [m.trial for m in front] == [row["trial"] for row in table]
        for m, row in zip(front, table):
            assert (m.size_mb, m.latency_ms, m.accuracy, m.bias) == tuple(
                row[k]["value"] for k in ("size_mb", "latency_ms", "accuracy", "bias"))
            assert (m.on_front, m.feasible, m.note, m.params) == (
                row["on_front"], row["feasible"], row["note"], row["recipe"])
            assert m.objectives["macro_f1"] == m.accuracy


def test_export_writes_folders_that_load_loads(done: dict[str, Any], capsys) -> None:
    import torch
    from transformers import AutoTokenizer

    front = nas_fair.pareto(done["toml"], run_dir=done["run_dir"])
    out = done["tmp"] / "models"
    paths = nas_fair.export(done["toml"], front[:1], out=out, run_dir=done["run_dir"])
    assert capsys.readouterr() == ("", "")
    assert paths == [out / f"trial-{front[0].trial}"]
    model = nas_fair.load(paths[0])
    tok = AutoTokenizer.from_pretrained(paths[0])
    with torch.no_grad():
        logits = model(**tok(["she works as a cook"], return_tensors="pt")).logits
    assert logits.shape == (1, 3)  # the CSV has three labels
    recipe = json.loads((paths[0] / "recipe.json").read_text())
    assert recipe["params"] == front[0].params
    # load() reads it back through every family's config
    assert model.nas_fair_recipe.to_dict() == recipe
    assert model.nas_fair_recipe.params == front[0].params
    # the same folder again is refused unless force=True, as the CLI does
    with pytest.raises(UserError, match="not empty"):
        nas_fair.export(done["toml"], front[0].trial, out=out, run_dir=done["run_dir"])


def _cli_error(capsys, *argv: str) -> str:
    capsys.readouterr()
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nas-fair: error: ") and len(err.splitlines()) == 1, err
    return err.removeprefix("nas-fair: error: ")


def test_bad_arguments_raise_the_cli_message(done: dict[str, Any], capsys) -> None:
    toml, run_dir, tmp = done["toml"], done["run_dir"], done["tmp"]
    fresh = tmp / "never-created"
    where = ["--config", str(toml), "--run-dir", str(run_dir)]
    new = ["--config", str(toml), "--run-dir", str(fresh)]
    out = str(tmp / "out")
    cases = [
        (lambda: nas_fair.optimize(toml, budget="0", run_dir=fresh),
         ["search", *new, "--budget", "0"]),
        (lambda: nas_fair.optimize(toml, budget=2, run_dir=fresh, sampler="nsga3"),
         ["search", *new, "--budget", "2", "--sampler", "nsga3"]),
        (lambda: nas_fair.optimize(toml, budget=2, run_dir=fresh, min_accuracy=1.5),
         ["search", *new, "--budget", "2", "--min-accuracy", "1.5"]),
        (lambda: nas_fair.optimize(toml, budget=2, run_dir=fresh, jobs=0),
         ["search", *new, "--budget", "2", "--jobs", "0"]),
        (lambda: nas_fair.optimize("no-such-study", budget=2, run_dir=fresh),
         ["search", "--study", "no-such-study", "--run-dir", str(fresh), "--budget", "2"]),
        # the budget is checked before the study is looked up, as the CLI does
        (lambda: nas_fair.optimize("no-such-study", budget="0", run_dir=fresh),
         ["search", "--study", "no-such-study", "--run-dir", str(fresh), "--budget", "0"]),
        (lambda: nas_fair.optimize(load_study(toml), budget=2, run_dir=fresh,
                                   max_bias_increase=-1),
         ["search", *new, "--budget", "2", "--max-bias-increase", "-1"]),
        (lambda: nas_fair.optimize(toml, budget=2, run_dir=""),
         ["search", "--config", str(toml), "--run-dir", "", "--budget", "2"]),
        (lambda: nas_fair.pareto(toml, run_dir=run_dir, sort="sizee"),
         ["pareto", *where, "--sort", "sizee"]),
        (lambda: nas_fair.pareto(toml, run_dir=run_dir, min_accuracy=float("inf")),
         ["pareto", *where, "--min-accuracy", "inf"]),
        (lambda: nas_fair.pareto(toml, run_dir=fresh), ["pareto", *new]),
        (lambda: nas_fair.export(toml, "3,x", out=out, run_dir=run_dir),
         ["export", *where, "--trials", "3,x", "--out", out]),
        (lambda: nas_fair.export(toml, [999], out=out, run_dir=run_dir),
         ["export", *where, "--trials", "999", "--out", out]),
    ]
    for call, argv in cases:
        with pytest.raises(UserError) as info:
            call()
        assert isinstance(info.value, ValueError)
        assert str(info.value) == _cli_error(capsys, *argv), argv
    # arguments the CLI's parser would have refused: the same kind of one-line UserError
    for call, needle in (
            (lambda: nas_fair.optimize(toml, budget=2.5, run_dir=fresh), "--budget must be"),
            (lambda: nas_fair.optimize(toml, budget=2, run_dir=5), "--run-dir must be a path"),
            (lambda: nas_fair.optimize(toml, budget=2, run_dir=fresh, min_accuracy="0.5"),
             "--min-accuracy must be a number"),
            (lambda: nas_fair.export(toml, 0, out=None, run_dir=run_dir), "--out is required"),
            (lambda: nas_fair.optimize(3, budget=2, run_dir=fresh), "study must be")):
        with pytest.raises(UserError, match=needle):
            call()
    assert not fresh.exists() and not Path(out).exists()  # nothing written before the checks


def test_python_m_nas_fair_is_the_cli_and_import_is_light() -> None:
    proc = subprocess.run([sys.executable, "-m", "nas_fair", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: nas-fair") and "export" in proc.stdout
    code = ("import sys, nas_fair; heavy = [m for m in ('torch', 'optuna', 'transformers', "
            "'nas_fair.api', 'nas_fair.search') if m in sys.modules]; print(heavy)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.stdout.strip() == "[]", proc.stderr
    assert callable(nas_fair.optimize) and set(nas_fair.__all__) <= set(dir(nas_fair))

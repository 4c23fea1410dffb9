"""nas-fair compress: an exported trial's recipe (or its flat params) re-applied to the study's
reference rebuilds the same model; bad recipes are one line, exit 2, nothing written."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import optuna
import pytest
from test_search import run_cli, write_checkpoint, write_study

import nas_fair
from nas_fair.errors import UserError

# FFN pruning forced on, so recovery has something to do; 4 recovery steps.
SPACE = """
[space]
families = ["pruning", "distillation", "quantization"]
[space.pruning]
heads = [0.0]
ffn = [0.5, 0.5]
layers = [0, 0]
[space.distillation]
temperature = [2.0]
alpha = [0.7, 0.7]
[space.quantization]
attention_bits = [32]
ffn_bits = [8]
embedding_bits = [32]
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A one-trial study, searched and its trial 0 exported."""
    tmp = tmp_path_factory.mktemp("compress")
    ckpt = write_checkpoint(tmp)
    toml = write_study(tmp, ckpt, name="comp", steps=4, extra=SPACE)
    run_dir = tmp / "run"
    assert run_cli("search", "--config", str(toml), "--budget", "1", "--run-dir", str(run_dir),
                   "--quiet") == 0
    exported = tmp / "exported"
    assert run_cli("export", "--config", str(toml), "--run-dir", str(run_dir), "--trials", "0",
                   "--out", str(exported)) == 0
    return {"tmp": tmp, "toml": toml, "run_dir": run_dir, "folder": exported / "trial-0"}


def compress(world: dict[str, Any], recipe: str | Path, out: Path, *args: str,
             run_dir: Path | None = None) -> int:
    return run_cli("compress", "--config", str(world["toml"]), "--run-dir",
                   str(run_dir or world["run_dir"]), "--recipe", str(recipe), "--out", str(out),
                   *args)


def metrics(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "metrics.json").read_text())


def recipe(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "recipe.json").read_text())


def snapshot(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in path.rglob("*")}


def same_model(a: Path, b: Path) -> None:
    """Same test predictions, accuracy, bias and stored size."""
    ma, mb = metrics(a), metrics(b)
    assert ma["predictions_sha256"] == mb["predictions_sha256"]
    for name in ("size_mb", "macro_f1", "tpr_gap_rms"):
        assert ma["objectives"][name]["value"] == mb["objectives"][name]["value"], name
    assert ma["bias"] == mb["bias"]
    assert recipe(a)["families"] == recipe(b)["families"]


def test_recipe_rebuilds_the_exported_model(world: dict[str, Any], capsys: Any) -> None:
    out = world["tmp"] / "rebuilt"
    before = snapshot(world["run_dir"])
    assert compress(world, world["folder"] / "recipe.json", out) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)
    same_model(world["folder"], out)
    # the reference's figures are the study's stored ones (same test predictions), its
    # latency too (not measured again)
    for name in ("macro_f1", "latency_ms"):
        assert metrics(out)["objectives"][name]["reference"] == \
            metrics(world["folder"])["objectives"][name]["reference"]
    # the same files as export writes, in --out itself
    assert {p.name for p in world["folder"].iterdir()} == {p.name for p in out.iterdir()}
    assert nas_fair.load(out).nas_fair_recipe.study == "comp-recipe"
    card = (out / "README.md").read_text()
    assert "nas-fair compress --config" in card and "nas-fair export" not in card
    # no search made it: the card says so, and claims no place on a front
    assert "a recipe applied by `nas-fair compress`" in card and "Pareto front" not in card
    assert f"--out {out.name}-rebuilt" in card
    # the real study and its saved models are untouched: no trial, no artifact added
    study = optuna.load_study(study_name="comp",
                              storage=f"sqlite:///{world['run_dir'] / 'study.db'}")
    assert len(study.trials) == 1
    assert [s.study_name for s in optuna.get_all_study_summaries(
        f"sqlite:///{world['run_dir'] / 'study.db'}")] == ["comp"]
    after = snapshot(world["run_dir"])
    assert not [p for p in after if p.startswith("artifacts/comp-recipe")]
    assert {p: t for p, t in after.items() if p in before and not p.endswith(".lock")} == \
        {p: t for p, t in before.items() if not p.endswith(".lock")}
    # the written recipe is a recipe again: applying it rebuilds the same model once more
    again = world["tmp"] / "again"
    assert compress(world, out, again) == 0
    same_model(out, again)


def test_flat_params_through_the_api(world: dict[str, Any]) -> None:
    params = recipe(world["folder"])["params"]
    path = world["tmp"] / "flat.json"
    path.write_text(json.dumps(params))
    out = world["tmp"] / "flat"
    got = nas_fair.compress(world["toml"], path, out=out, run_dir=world["run_dir"])
    assert got == out
    same_model(world["folder"], out)
    # a mapping works as well, and a non-empty --out is refused without force
    with pytest.raises(UserError, match="not empty.*--force"):
        nas_fair.compress(world["toml"], params, out=out, run_dir=world["run_dir"])


def test_steps_override_the_recovery(world: dict[str, Any]) -> None:
    out = world["tmp"] / "steps"
    assert compress(world, world["folder"] / "recipe.json", out, "--steps", "2") == 0
    assert recipe(world["folder"])["families"]["distillation"]["steps"] == 4
    assert recipe(out)["families"]["distillation"]["steps"] == 2
    assert recipe(out)["params"]["distillation.steps"] == 2
    assert recipe(out)["study_config"]["search"]["fidelity_steps"] == []


def _edited(world: dict[str, Any], change: Any) -> str:
    data = recipe(world["folder"])
    change(data)
    return json.dumps(data)


BAD: dict[str, tuple[Any, str]] = {
    "version": (lambda d: d.update(nas_fair_version="0.0.1"),
                "written by nas-fair 0.0.1, this is"),
    "key": (lambda d: d.update(colour="red"), "unknown key 'colour'"),
    "family": (lambda d: d["families"].update(squash={}), "unknown compression family 'squash'"),
    "range": (lambda d: (d["families"]["pruning"].update(ffn=1.5),
                         d["params"].update({"pruning.ffn": 1.5})),
              "pruning.ffn must be in [0, 1), got 1.5"),
    "param": (lambda d: d["families"]["pruning"].update(neurons=0.1),
              "unknown parameter 'neurons'"),
    "flat-family": ('{"prunning.ffn": 0.25}', "unknown compression family 'prunning'"),
    "flat-range": ('{"pruning.ffn": -0.25}', "pruning.ffn must be in [0, 1), got -0.25"),
    "flat-key": ('{"ffn": 0.25}', "neither a recipe.json key nor a 'family.parameter'"),
    "not-json": ("{pruning.ffn: 0.25", "is not valid JSON"),
    "list": ("[1, 2]", "must hold a JSON object"),
    "missing": (None, "no such file"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_recipe_is_one_line_and_writes_nothing(world: dict[str, Any], case: str,
                                                   capsys: Any) -> None:
    change, message = BAD[case]
    path = world["tmp"] / f"bad-{case}.json"
    if change is not None:
        path.write_text(change if isinstance(change, str) else _edited(world, change))
    out = world["tmp"] / f"out-{case}"
    fresh = world["tmp"] / f"fresh-run-{case}"  # a run folder that does not exist yet
    assert compress(world, path, out, run_dir=fresh) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nas-fair: error: ") and "\n" not in err, err
    assert message in err
    assert not out.exists() and not fresh.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_steps_without_distillation_and_bad_steps(world: dict[str, Any], capsys: Any) -> None:
    path = world["tmp"] / "int8.json"
    path.write_text('{"quantization.ffn_bits": 8}')
    out = world["tmp"] / "out-steps"
    assert compress(world, path, out, "--steps", "3") == 2
    assert "no distillation family" in capsys.readouterr().err
    assert compress(world, world["folder"] / "recipe.json", out, "--steps", "-1") == 2
    assert "distillation.steps must be an integer" in capsys.readouterr().err
    assert not out.exists()


def test_out_not_empty_refused(world: dict[str, Any], capsys: Any) -> None:
    out = world["tmp"] / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert compress(world, world["folder"] / "recipe.json", out) == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and "--force" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_force_replaces_and_a_new_run_folder_is_prepared(world: dict[str, Any]) -> None:
    """--force replaces a non-empty --out; a study never searched gets its reference built in
    its run folder (the recipe is all it needs), which then holds no study."""
    out = world["tmp"] / "forced"
    out.mkdir()
    (out / "old.txt").write_text("old")
    fresh = world["tmp"] / "never-searched"
    assert compress(world, world["folder"] / "recipe.json", out, "--force", run_dir=fresh) == 0
    assert not (out / "old.txt").exists()
    same_model(world["folder"], out)
    assert (fresh / "reference").is_dir() and not (fresh / "study.db").exists()
    assert not (fresh / "artifacts").exists()
    shutil.rmtree(fresh)
    assert os.path.isdir(out)


def test_unusable_storage_is_refused_before_work(world: dict[str, Any], capsys: Any) -> None:
    out = world["tmp"] / "out-storage"
    fresh = world["tmp"] / "fresh-storage-run"
    assert compress(world, world["folder"] / "recipe.json", out, "--storage", "nosuchdb://x/y",
                    run_dir=fresh) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot open storage" in err and "\n" not in err
    assert not out.exists() and not fresh.exists()


def test_other_recovery_settings_are_a_warning(world: dict[str, Any], capsys: Any) -> None:
    data = recipe(world["folder"])
    data["study_config"]["search"]["recovery_lr"] = 0.5
    data["runtime"]["threads"] = 7
    path = world["tmp"] / "other-lr.json"
    path.write_text(json.dumps(data))
    out = world["tmp"] / "other-lr"
    assert compress(world, path, out) == 0
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if line.startswith("warning: the recipe")]
    assert len(warning) == 1 and "recovery_lr 0.5 -> 0.0001" in warning[0]
    assert "torch threads 7 -> 1" in warning[0]
    same_model(world["folder"], out)  # recovered with this study's settings, as before

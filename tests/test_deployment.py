"""What a user deploys is what was measured: a small study with every family on is exported,
each front model is reloaded in a fresh process with ``nas_fair.load`` and predicts the test
split at batch size 1 and at the study's batching; every recorded objective and bias metric is
recomputed from those predictions and must equal what the study stored. Also: a model with
group-aware offsets refuses to predict without groups, and is marked wherever it is listed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from test_export import study_toml
from test_search import run_cli, write_checkpoint, write_csv

from nas_fair.errors import UserError

EVERY_FAMILY = """
[space]
families = ["pruning", "lowrank", "sharing", "distillation", "quantization", "mitigation"]
[space.pruning]
heads = [0.25]
ffn = [0.25, 0.25]
layers = [0, 0]
[space.lowrank]
attention_rank = [0.5]
ffn_rank = [0.75]
activation_aware = [false]
[space.sharing]
group_size = [1, 2]
[space.quantization]
attention_bits = [8]
ffn_bits = [8, 4]
embedding_bits = [8]
[space.mitigation]
cda = [false]
oversample = ["none"]
weighting = ["none"]
regularizer = ["group_gap"]
strength = [0.0]
thresholds = [0.0, 1.0]
"""

# A fresh interpreter: load each folder, predict one row at a time and at the study's batch
# size (groups passed: a post-processed model needs them), recompute every recorded metric.
FRESH = r"""
import json, sys
import numpy as np, torch
torch.set_num_threads(1)
import nas_fair
from transformers import AutoTokenizer
from nas_fair.config import load_study
from nas_fair.data import load_task
from nas_fair.modeling import predict_logits, tokenize
from nas_fair.objectives import ACCURACY, EvalRecord
from nas_fair.objectives.stats import score_bias
from nas_fair.objectives.scores import check_objectives
from nas_fair.postprocess import counterfactual_groups

out = {}
for item in json.loads(sys.argv[1]):
    cfg = load_study(item["config"])
    model = nas_fair.load(item["folder"])
    tok = AutoTokenizer.from_pretrained(item["folder"])
    data = load_task(cfg).with_mask_token(tok.mask_token)
    test, L = data.test, cfg.model.max_length
    ids, mask = tokenize(tok, test.texts, L)
    preds = {bs: predict_logits(model, ids, mask, batch_size=bs, groups=test.groups)
             .argmax(-1).numpy() for bs in (1, cfg.search.eval_batch_size)}
    y = preds[cfg.search.eval_batch_size]
    y_cf = None
    if data.test_counterfactual is not None:
        y_cf = y.copy()
        rows = [i for i, (a, b) in enumerate(zip(test.texts, data.test_counterfactual)) if a != b]
        if rows:
            cf_ids, cf_mask = tokenize(tok, [data.test_counterfactual[i] for i in rows], L)
            cf_groups = list(counterfactual_groups(test.groups)[rows])
            y_cf[rows] = predict_logits(model, cf_ids, cf_mask, batch_size=1,
                                        groups=cf_groups).argmax(-1).numpy()
    rec = EvalRecord(y_true=test.labels, y_pred=y, groups=test.groups, y_pred_cf=y_cf,
                     stereotype=test.stereotype, n_classes=data.num_labels)
    bias = score_bias(check_objectives(cfg, data), rec, None, n=cfg.search.bootstrap,
                      seed=cfg.seed, skip_unavailable=True)  # the reference's own: not here
    out[item["folder"]] = {
        "same_at_batch_1": bool(np.array_equal(preds[1], y)),
        "accuracy": ACCURACY[cfg.objectives.accuracy](rec),
        "bias": {k: v["value"] for k, v in bias.items()},
        "needs_groups": bool(getattr(model, "needs_groups", False)),
    }
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("deploy")
    ckpt = write_checkpoint(tmp)
    csv = write_csv(tmp / "noisy.csv", n=240, seed=1, cue_right={"f": 0.6, "m": 0.8})
    toml = study_toml(tmp, ckpt, csv, "deploy", EVERY_FAMILY)
    run_dir = tmp / "run"
    assert run_cli("search", "--config", str(toml), "--budget", "4", "--run-dir", str(run_dir),
                   "--quiet") == 0
    out = tmp / "out"
    assert run_cli("export", "--config", str(toml), "--run-dir", str(run_dir), "--out",
                   str(out), "--all-pareto") == 0
    study = optuna.load_study(study_name="deploy", storage=f"sqlite:///{run_dir / 'study.db'}")
    folders = sorted(out.glob("trial-*"))
    assert folders
    spec = [{"config": str(toml), "folder": str(f)} for f in folders]
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", FRESH, json.dumps(spec)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"study": study, "folders": folders, "fresh": fresh, "toml": toml,
            "run_dir": run_dir}


def test_front_models_predict_as_recorded_in_a_fresh_process(front: dict[str, Any]) -> None:
    trials = {t.number: t for t in front["study"].trials}
    for folder in front["folders"]:
        trial = trials[int(folder.name.removeprefix("trial-"))]
        got = front["fresh"][str(folder)]
        assert got["same_at_batch_1"], folder.name
        assert got["accuracy"] == trial.values[2], folder.name
        recorded = {k: v["value"] for k, v in trial.user_attrs["bias"].items()}
        assert got["bias"] == {k: recorded[k] for k in got["bias"]}, folder.name
        # only metrics of agreement with the reference model need more than the model itself
        assert all("compression" in k or "ref" in k for k in set(recorded) - set(got["bias"]))
        assert "tpr_gap_rms" in got["bias"]
        assert got["needs_groups"] == bool(trial.user_attrs.get("postprocess"))


def test_every_family_was_on_and_a_post_processed_model_is_marked(front: dict[str, Any]) -> None:
    folders = front["folders"]
    recipes = [json.loads((f / "recipe.json").read_text()) for f in folders]
    assert all(not r["off"][fam] for r in recipes for fam in ("pruning", "lowrank",
                                                              "quantization"))
    for f in folders:
        card = (f / "README.md").read_text()
        has = (f / "postprocess.json").exists()
        assert ("Needs the sensitive attribute at inference" in card) == has
        assert ("disparate treatment" in card) == has


def test_a_post_processed_model_needs_groups(tmp_path: Path) -> None:
    import torch

    import nas_fair
    from nas_fair import postprocess
    from nas_fair.checkpoint import save_compressed
    from nas_fair.onnx_export import export_onnx, session_options

    from conftest import random_batch, tiny_model

    model = tiny_model("bert")
    offsets = postprocess.GroupOffsets(["f", "m"], [[0.0, 0.3, -0.2], [0.1, -0.4, 0.0]])
    postprocess.attach(model, offsets)
    save_compressed(model, tmp_path / "m")
    loaded = nas_fair.load(tmp_path / "m")
    ids, mask = random_batch(4, 8)
    with pytest.raises(UserError, match="needs the argument groups="):
        loaded(input_ids=ids, attention_mask=mask)
    with pytest.raises(UserError, match="one group per row"):
        loaded(input_ids=ids, attention_mask=mask, groups=["f"])
    groups = ["f", "m", "m", "x"]
    with torch.no_grad():
        raw = model(input_ids=ids, attention_mask=mask).logits
    want = postprocess.predict(model, raw, groups)
    assert (loaded.predict(ids, mask, groups) == want).all()
    # the ONNX export takes the group as an input and decides as the loaded model does
    import onnx
    import onnxruntime as ort

    path = tmp_path / "m.onnx"
    export_onnx(model, path, int8=True, max_length=8)
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask", "group_index"]
    names = json.loads({p.key: p.value for p in proto.metadata_props}["nas_fair.groups"])
    index = [names.index(g) if g in names else -1 for g in groups]
    sess = ort.InferenceSession(str(path), sess_options=session_options(),
                                providers=["CPUExecutionProvider"])
    (scores,) = sess.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                                      "group_index": np.array(index, dtype=np.int64)})
    assert (scores.argmax(1) == want).all()
    with torch.no_grad():
        ours = loaded(input_ids=ids, attention_mask=mask, groups=groups).logits.numpy()
    assert np.abs(scores - ours).max() <= 1e-5


def test_pareto_marks_models_that_need_the_group() -> None:
    from nas_fair.search.table import NEEDS_GROUP_NOTE, display_note, status_note

    assert display_note({"needs_group": True, "feasible": True}) == NEEDS_GROUP_NOTE
    assert display_note({"needs_group": False, "feasible": True}) == ""
    assert status_note({"needs_group": True, "feasible": True}) == ""  # feasibility only
    infeasible = {"needs_group": True, "feasible": False, "violated": ["accuracy_floor"]}
    assert display_note(infeasible) == f"infeasible: accuracy_floor; {NEEDS_GROUP_NOTE}"


def test_a_study_can_forbid_group_postprocessing(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    from test_recovery import STUDY, fingerprint_before

    from nas_fair.config import parse_study
    from nas_fair.search import session
    from nas_fair.spaces import build_space

    cfg = parse_study(STUDY.format(extra=""))
    assert cfg.search.allow_group_postprocessing is True
    off = parse_study(STUDY.format(extra="allow_group_postprocessing = false"))
    now = session.search_fingerprint(cfg)
    assert session.search_fingerprint(off) != now
    assert fingerprint_before(monkeypatch, cfg, "allow_group_postprocessing") == now
    opts = session.Session._space_options(types.SimpleNamespace(cfg=off))
    (mitigation,) = [f for f in build_space(None, opts) if f.name == "mitigation"]
    assert mitigation.space["thresholds"].choices == (0.0,)
    both = parse_study(STUDY.format(extra="allow_group_postprocessing = false")
                       + "[space.mitigation]\nthresholds = [0.0, 1.0]\n")
    with pytest.raises(UserError, match="allow_group_postprocessing = false forbids"):
        session.Session._space_options(types.SimpleNamespace(cfg=both))
    with pytest.raises(UserError, match="allow_group_postprocessing must be bool"):
        parse_study(STUDY.format(extra='allow_group_postprocessing = "no"'))


def test_report_marks_models_that_need_the_group() -> None:
    from nas_fair.search.report import _page, _summary
    from nas_fair.search.table import NEEDS_GROUP_NOTE

    def trial(number: int, needs: bool) -> dict[str, Any]:
        return {"number": number, "values": [1.0, 1.0, 0.5, 0.1], "params": {}, "group": "front",
                "collapsed": False, "feasible": True, "note": "", "bias_ci": None,
                "needs_group": needs}

    data = {"study": "s", "names": ["size_mb", "latency_ms", "macro_f1", "tpr_gap_rms"],
            "reference": [1.0, 1.0, 0.5, 0.1], "trials": [trial(0, True), trial(1, False)]}
    summary = _summary(data)
    assert f"1 marked '{NEEDS_GROUP_NOTE}'" in summary and "disparate treatment" in summary
    page = _page(data, [])
    assert page.count(NEEDS_GROUP_NOTE) == 2  # the summary and trial 0's row
    data["trials"] = [trial(1, False)]
    assert NEEDS_GROUP_NOTE not in _summary(data)

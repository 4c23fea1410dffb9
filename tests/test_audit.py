"""The bias audit (search/audit.py): computed values against hand computations, on a real tiny
study, and every error path of ``nas-fair importance``."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from test_search import load, run_cli, tiny_checkpoint, write_csv, write_study  # noqa: F401

from nas_fair.errors import UserError
from nas_fair.objectives import EvalRecord
from nas_fair.objectives.collapse import wilson_interval
from nas_fair.objectives.compression import disparity_stats, permutation_chi2
from nas_fair.search.audit import (
    compression_identified,
    decode_predictions,
    encode_predictions,
    front_summary,
    importance,
    modal_predictions,
    not_applicable,
    render_importance,
)
from nas_fair.search.session import predictions_digest

DIRS = ["minimize", "minimize", "maximize", "minimize"]
NAMES = ["size_mb", "latency_ms", "macro_f1", "tpr_gap_rms"]


# --------------------------------------------------------------------------- stored predictions


def test_predictions_round_trip_and_refuse_a_wrong_digest() -> None:
    y = np.array([0, 1, 2, 5, 2])
    stored = encode_predictions(y)
    assert stored["dtype"] == "uint8" and stored["rows"] == 5
    assert decode_predictions(stored, predictions_digest(y)).tolist() == y.tolist()
    assert encode_predictions(np.array([300, 0]))["dtype"] == "uint16"
    other = predictions_digest(np.array([0, 1, 2, 5, 1]))
    assert decode_predictions(stored, other) is None  # tampered or stale record
    assert decode_predictions({**stored, "rows": 4}) is None
    assert decode_predictions({**stored, "base64": "not base64!"}) is None
    assert decode_predictions({**stored, "dtype": "object"}) is None
    assert decode_predictions(None) is None


# --------------------------------------------------------------------------- between-group tests


def test_permutation_chi2_by_hand() -> None:
    # a: 3 of 4, b: 0 of 4. p = 3/8, E = 1.5 each; chi2 = 2 * 1.5^2 / (1.5 * 5/8) = 4.8.
    # Exact permutation p: all three ones in one group, 2 * C(4,3) / C(8,3) = 8/56.
    out = permutation_chi2(np.array([1, 1, 1, 0, 0, 0, 0, 0]), np.array(list("aaaabbbb")),
                           n=20000, seed=3)
    assert out["chi2"] == pytest.approx(4.8)
    assert out["p_value"] == pytest.approx(8 / 56, abs=0.01)
    # two groups: chi2 is the squared two-proportion z statistic
    o = np.array([1, 0, 0, 1, 1, 1, 0, 1, 1, 1])
    g = np.array(list("aaaabbbbbb"))
    p1, p2, p = 2 / 4, 5 / 6, 7 / 10
    z = (p1 - p2) / math.sqrt(p * (1 - p) * (1 / 4 + 1 / 6))
    assert permutation_chi2(o, g, n=10)["chi2"] == pytest.approx(z * z)
    # three groups: the p-value of every placement of the ones, enumerated by hand
    import itertools

    o3 = np.array([1, 1, 1, 0, 0, 0, 0, 0, 1, 0, 0])
    g3 = np.array(list("aaaabbbbccc"))
    observed = permutation_chi2(o3, g3, n=1)["chi2"]
    null = []
    for ones in itertools.combinations(range(len(o3)), int(o3.sum())):
        o = np.zeros(len(o3))
        o[list(ones)] = 1
        null.append(permutation_chi2(o, g3, n=1)["chi2"])
    exact = np.mean(np.array(null) >= observed - 1e-9)
    assert permutation_chi2(o3, g3, n=40000, seed=1)["p_value"] == pytest.approx(exact, abs=0.01)
    # nothing changed anywhere: no evidence, p = 1
    assert permutation_chi2(np.zeros(6), np.array(list("aabbcc")), n=50)["p_value"] == 1.0
    with pytest.raises(UserError, match="permutation n must be >= 1"):
        permutation_chi2(o, g, n=0)
    with pytest.raises(UserError, match="must align"):
        permutation_chi2(o[:3], g, n=5)


def test_disparity_stats_by_hand() -> None:
    y = np.array([0, 1, 2, 0, 1, 2, 1])
    ref = np.array([0, 1, 0, 0, 2, 2, 0])  # right: rows 0, 1, 3, 5
    p = np.array([1, 1, 2, 0, 0, 1, 2])
    g = np.array(["a", "a", "a", "b", "b", "b", "b"])
    # a (3 rows): changed rows 0, 2; right to wrong row 0; wrong to right row 2.
    # b (4 rows): changed rows 4, 5, 6; right to wrong row 5; wrong to right none.
    out = disparity_stats(EvalRecord(y, p, g, y_pred_ref=ref), n=200, seed=0)
    assert out["groups"]["a"]["flipped"] == pytest.approx(list(wilson_interval(2, 3)))
    assert out["groups"]["a"]["newly_wrong"] == pytest.approx(list(wilson_interval(1, 3)))
    assert out["groups"]["b"]["flipped"] == pytest.approx(list(wilson_interval(3, 4)))
    assert out["groups"]["b"]["newly_right"] == pytest.approx(list(wilson_interval(0, 4)))
    tests = out["tests"]
    assert tests["newly_right"]["difference"] == pytest.approx(0 - 1 / 3)
    assert tests["flipped"]["difference"] == pytest.approx(3 / 4 - 2 / 3)
    assert tests["newly_wrong"]["chi2"] == pytest.approx(permutation_chi2(
        np.array([1, 0, 0, 0, 0, 1, 0]), g, n=1)["chi2"])
    assert 0 < tests["newly_wrong"]["p_value"] <= 1
    with pytest.raises(UserError, match="group column"):
        disparity_stats(EvalRecord(y, p, None, y_pred_ref=ref))


# --------------------------------------------------------------------------- CIE


def test_compression_identified_examples_by_hand() -> None:
    ref = np.array([0, 1, 1, 0, 2, 2])
    preds = np.array([[1, 1, 1, 0, 2, 0],
                      [1, 0, 1, 0, 2, 0],
                      [0, 0, 2, 0, 2, 1]])
    modal, disagree = modal_predictions(preds, ref)
    assert modal.tolist() == [1, 0, 1, 0, 2, 0]
    assert disagree.tolist() == [2, 2, 1, 0, 0, 3]
    # a tie that includes the reference's class is the reference's
    tie_modal, _ = modal_predictions(np.array([[0], [1]]), np.array([1]))
    assert tie_modal.tolist() == [1]
    y = np.array([0, 0, 1, 0, 2, 1])
    g = np.array(["f", "f", "f", "m", "m", "m"])
    out = compression_identified(preds, ref, y, g, texts=[f"t{i}" for i in range(6)],
                                 label_names=["x", "y", "z"], models=[4, 7, 9], n=500)
    # CIEs: rows 0, 1 (group f), 5 (group m)
    assert out["cie"] == 3 and out["n_models"] == 3 and out["models"] == [4, 7, 9]
    f, m = out["groups"]["f"], out["groups"]["m"]
    assert (f["n"], f["cie"], f["rate"]) == (3, 2, pytest.approx(2 / 3))
    assert f["ci"] == pytest.approx(list(wilson_interval(2, 3)))
    assert (m["cie"], m["rate"]) == (1, pytest.approx(1 / 3))
    # the reference was right on row 0 only among the CIEs; the modal prediction on rows 1
    assert (f["reference_right"], f["modal_right"]) == (1, 1)
    assert (m["reference_right"], m["modal_right"]) == (0, 0)
    assert out["test"]["chi2"] == pytest.approx(permutation_chi2(
        np.array([1, 1, 0, 0, 0, 1]), g, n=1)["chi2"])
    assert [e["row"] for e in out["examples"]] == [0, 1, 5]
    assert out["examples"][0] == {"row": 0, "text": "t0", "label": "x", "group": "f",
                                  "reference": "x", "modal": "y", "disagree": 2, "models": 3}
    assert out["examples"][2]["disagree"] == 3
    # one group: rates, but no test
    assert compression_identified(preds, ref, y, None)["test"] is None


# --------------------------------------------------------------------------- the answer first


def _study_with_bias(rows: list[tuple[list[float], dict[str, Any]]],
                     ref_values: list[float] | None = None) -> optuna.Study:
    s = optuna.create_study(directions=DIRS)
    s.set_user_attr("reference", {"values": ref_values or [10.0, 100.0, 0.8, 0.2],
                                  "accuracy_ci": [0.7, 0.9]})
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for i, (values, bias) in enumerate(rows):
        s.add_trial(optuna.trial.create_trial(
            values=values, params={"x": i / 10}, distributions=dist,
            user_attrs={"bias": {"m": bias}, "accuracy_ci": [values[2] - 0.1, values[2] + 0.1]}))
    return s


def test_headline_is_the_smallest_model_not_worse() -> None:
    worse = {"value": 0.3, "diff": 0.1, "diff_low": 0.05, "diff_high": 0.15,
             "direction": "minimize"}
    reaches = {"value": 0.25, "diff": 0.05, "diff_low": -0.01, "diff_high": 0.11,
               "direction": "minimize"}
    better = {"value": 0.1, "diff": -0.1, "diff_low": -0.2, "diff_high": -0.05,
              "direction": "minimize"}
    s = _study_with_bias([([1.0, 5, 0.7, 0.3], worse), ([2.0, 5, 0.7, 0.25], reaches),
                          ([3.0, 5, 0.7, 0.1], better)])
    out = front_summary(s, s.trials, bias_metric="m", accuracy_name="acc", signed=False,
                        export_command=["nas-fair", "export", "--study", "my study"])
    assert [m["trial"] for m in out["models"]] == [0, 1, 2]  # smallest first
    assert [m["not_worse"] for m in out["models"]] == [False, True, True]
    assert out["recommended"] == 1
    assert out["headline"].startswith("Trial 1 is the smallest front model whose m is not worse")
    assert "2 MB, 0.20x the reference's size" in out["headline"]
    assert "acc 0.7 [0.6, 0.8]" in out["headline"] and "does not reach" not in out["headline"]
    assert out["models"][1]["export"] == ("nas-fair export --study 'my study' --trials 1 "
                                          "--out exports")
    assert out["models"][0]["accuracy_ci"] == pytest.approx([0.6, 0.8])
    # the smallest not-worse model lost accuracy (its interval misses the reference's
    # [0.7, 0.9]): the headline says so and names the smallest that keeps it
    lossy = _study_with_bias([([1.0, 5, 0.4, 0.3], reaches), ([2.0, 5, 0.75, 0.1], better)])
    h = front_summary(lossy, lossy.trials, bias_metric="m", accuracy_name="acc",
                      signed=False)["headline"]
    assert h.startswith("Trial 0 is the smallest")
    assert "Its acc interval does not reach the reference's (0.8 [0.7, 0.9]); the smallest " \
           "that also keeps it is trial 1: 2 MB" in h
    # none qualifies: a plain sentence
    none = front_summary(s, s.trials[:1], bias_metric="m", accuracy_name="acc", signed=False)
    assert none["recommended"] is None and "No front model" in none["headline"]
    assert "nothing to recommend" in front_summary(s, [], bias_metric="m", accuracy_name="a",
                                                   signed=False)["headline"]
    # a metric where higher is fairer: a paired interval entirely above 0 is better
    up = {"value": 0.9, "diff": 0.1, "diff_low": 0.05, "diff_high": 0.15, "direction": "maximize"}
    s2 = _study_with_bias([([1.0, 5, 0.7, 0.9], up)])
    assert front_summary(s2, s2.trials, bias_metric="m", accuracy_name="a",
                         signed=False)["recommended"] == 0
    # a signed gap below 0 on the reference: moving up (toward 0) is better
    signed = {"value": -0.1, "ref_value": -0.3, "diff": 0.2, "diff_low": 0.1, "diff_high": 0.3,
              "direction": "minimize"}
    s3 = _study_with_bias([([1.0, 5, 0.7, 0.1], signed)])
    m = front_summary(s3, s3.trials, bias_metric="m", accuracy_name="a", signed=True)["models"][0]
    assert m["not_worse"] is True and m["paired"]["worse_by"] == pytest.approx(-0.2)


def test_not_applicable_notes() -> None:
    bias = {"minority_majority_recall_gap": {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0},
            "minority_recall": {"value": 0.5, "ci_low": 0.4, "ci_high": 0.6},
            "tpr_gap_rms": {"value": 0.1, "ci_low": 0.05, "ci_high": 0.2},
            "flat": {"value": 1.0, "ci_low": 1.0, "ci_high": 1.0}}
    ref = {"flat": {"value": 1.0, "ci_low": 1.0, "ci_high": 1.0}}
    balanced = np.array([0, 1, 2] * 4)
    notes = not_applicable(balanced, bias, ref)
    assert set(notes) == {"minority_majority_recall_gap", "minority_recall", "flat"}
    assert notes["minority_recall"].startswith("not applicable: the test split's classes are "
                                               "balanced (4 rows each)")
    assert notes["flat"].startswith("not informative: 1 on the reference")
    # compared with the reference: a trial's 0 is a finding, the reference's a definition
    flips = {"compression_flip_rate": {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0}}
    assert not_applicable(balanced, flips, flips) == {}
    assert not_applicable(balanced, flips, flips, is_reference=True) == {
        "compression_flip_rate": "0 by definition: the reference compared with itself"}
    skewed = np.array([0] * 6 + [1, 2] * 3)
    assert set(not_applicable(skewed, bias, ref)) == {"flat"}
    assert "flat" not in not_applicable(skewed, bias, {"flat": {"value": 1.0, "ci_low": 0.9,
                                                                 "ci_high": 1.0}})


# --------------------------------------------------------------------------- importance


def _importance_study(n: int) -> optuna.Study:
    """Bias depends on x only, accuracy on y only (plus a sliver of the other)."""
    s = optuna.create_study(directions=DIRS)
    rng = np.random.default_rng(0)
    dist = {"x": optuna.distributions.FloatDistribution(0, 1),
            "y": optuna.distributions.FloatDistribution(0, 1)}
    for _ in range(n):
        x, y = float(rng.random()), float(rng.random())
        s.add_trial(optuna.trial.create_trial(
            values=[1.0, 1.0, y + 0.01 * x, x + 0.01 * y], params={"x": x, "y": y},
            distributions=dist))
    return s


@pytest.mark.parametrize("evaluator", ["fanova", "ped-anova"])
def test_importance_finds_the_driver(evaluator: str) -> None:
    out = importance(_importance_study(40), NAMES, DIRS, evaluator=evaluator)
    assert out["trials"] == 40 and not out["small"] and out["note"] == "40 trials"
    bias = out["objectives"]["tpr_gap_rms"]["importance"]
    acc = out["objectives"]["macro_f1"]["importance"]
    assert max(bias, key=bias.get) == "x" and max(acc, key=acc.get) == "y"
    assert sum(bias.values()) == pytest.approx(1.0)
    assert "tpr_gap_rms:" in render_importance(out)


def test_importance_on_small_studies_explains_instead_of_failing() -> None:
    out = importance(_importance_study(8), NAMES, DIRS)
    assert out["small"] and out["note"] == "small sample (8 trials): indicative only"
    assert "indicative only" in render_importance(out)
    few = importance(_importance_study(2), NAMES, DIRS)
    assert few["unavailable"] == ("parameter importance needs at least 3 trials that differ: "
                                  "2 scored, non-collapsed trials")
    assert few["unavailable"] in render_importance(few)
    empty = importance(optuna.create_study(directions=DIRS), NAMES, DIRS)
    assert "0 scored, non-collapsed trials" in empty["unavailable"]
    with pytest.raises(UserError, match="--evaluator must be one of fanova, ped-anova, got 'x'"):
        importance(_importance_study(4), NAMES, DIRS, evaluator="x")


# --------------------------------------------------------------------------- a real tiny study


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> dict[str, Any]:  # noqa: F811
    tmp = tmp_path_factory.mktemp("audit")
    csv_path = write_csv(tmp / "noisy.csv", n=240, seed=1, cue_right={"f": 0.8, "m": 0.8})
    toml = write_study(tmp, tiny_checkpoint, data=str(csv_path), steps=3)
    toml.write_text(toml.read_text().replace("seed = 0\n", "seed = 1\n"))
    run_dir = tmp / "run"
    assert run_cli("search", "--config", str(toml), "--budget", "5", "--run-dir", str(run_dir),
                   "--quiet") == 0
    return {"toml": toml, "run_dir": run_dir, "study": load(run_dir),
            "args": ["--config", str(toml), "--run-dir", str(run_dir)]}


def test_trials_store_predictions_and_disparity_intervals(study) -> None:
    from nas_fair.search.audit import reference_predictions, trial_predictions
    from nas_fair.search.records import TrialRecord

    s = study["study"]
    ref = reference_predictions(s)
    assert ref is not None
    for t in s.trials:
        if t.state.name != "COMPLETE":
            continue
        y = trial_predictions(t)
        assert y is not None and len(y) == len(ref)
        rec = TrialRecord.from_trial(t)
        assert predictions_digest(y) == rec.predictions_sha256
        stats = rec.disparity_stats
        for g, share in rec.disparity.items():
            n = share["n"]
            k = round(share["newly_wrong"] * n)
            assert stats["groups"][g]["newly_wrong"] == pytest.approx(list(wilson_interval(k, n)))
        assert 0 < stats["tests"]["flipped"]["p_value"] <= 1


def test_report_leads_with_the_answer_and_exports_the_examples(study, capsys) -> None:
    from nas_fair.api import load_config
    from nas_fair.objectives.scores import directions
    from nas_fair.search.audit import reference_predictions, trial_predictions
    from nas_fair.search.front import pareto_front
    from nas_fair.search.report import cie_file

    out = study["run_dir"] / "audit.html"
    assert run_cli("report", *study["args"], "--out", str(out)) == 0
    page = out.read_text()
    answer, plots = page.index("id='answer'"), page.index("Plotly.newPlot")
    assert answer < plots  # the answer comes first
    assert "id='headline'" in page and "nas-fair export --config" in page
    s = study["study"]
    cfg = load_config(config=str(study["toml"]))
    front = pareto_front([t for t in s.trials if t.state.name == "COMPLETE"], directions(cfg))
    assert front
    for t in front:
        assert f"--trials {t.number} --out exports" in page
    # the examples, recomputed by hand from the stored predictions
    ref = reference_predictions(s)
    preds = np.stack([trial_predictions(t) for t in sorted(front, key=lambda t: t.number)])
    rows = []
    for i in range(len(ref)):
        counts = np.bincount(preds[:, i], minlength=3)
        if counts[ref[i]] < counts.max():
            rows.append(i)
    assert f"{len(rows)} of {len(ref)} test rows over {len(front)} front models" in page
    got = list(csv.DictReader(io.StringIO(cie_file(out).read_text())))
    assert [int(r["row"]) for r in got] == rows
    for r in got:
        assert int(r["disagree"]) == int((preds[:, int(r["row"])] != ref[int(r["row"])]).sum())
        assert int(r["models"]) == len(front) and r["text"]
    assert ("id='cie-examples'" in page) == bool(rows)
    assert "Compression-identified examples" in page
    assert "What drives each objective" in page
    assert "small sample (5 trials): indicative only" in page or \
        "parameter importance needs" in page


def test_importance_cli_and_its_errors(study, capsys) -> None:
    capsys.readouterr()
    assert run_cli("importance", *study["args"]) == 0
    text = capsys.readouterr().out
    assert "Parameter importance (fanova)" in text
    assert "small sample" in text or "needs at least 3 trials" in text
    assert run_cli("importance", *study["args"], "--json", "--objective", "size,bias",
                   "--evaluator", "ped-anova") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["study"] == "tiny" and result["evaluator"] == "ped-anova"
    if "unavailable" not in result:
        assert set(result["objectives"]) == {"size_mb", "tpr_gap_rms"}

    def bad(*args: str) -> str:
        capsys.readouterr()
        assert run_cli("importance", *args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    assert bad(*study["args"], "--evaluator", "shap") == (
        "nas-fair: error: --evaluator must be one of fanova, ped-anova, got 'shap'")
    assert bad(*study["args"], "--objective", "speed") == (
        "nas-fair: error: --objective must be comma-separated names among size, latency, "
        "accuracy, bias, size_mb, latency_ms, macro_f1, tpr_gap_rms, got 'speed'")
    never = ["--config", str(study["toml"]), "--run-dir", str(study["run_dir"] / "none")]
    assert "has not been run yet" in bad(*never)
    # options are checked before the study is looked for
    assert "--evaluator must be one of" in bad(*never, "--evaluator", "x")


def test_front_cie_says_why_when_predictions_are_missing() -> None:
    from nas_fair.search.audit import front_cie

    ref = np.array([0, 1, 1, 0])
    y = np.array([0, 1, 0, 0])
    s = optuna.create_study(directions=DIRS)
    s.set_user_attr("reference", {"values": [1.0, 1.0, 0.8, 0.1]})  # an older study
    assert "reference has no stored test predictions" in front_cie(
        s, [], y_true=y, groups=None)["unavailable"]
    s.set_user_attr("reference", {"values": [1.0, 1.0, 0.8, 0.1],
                                  "test_predictions": encode_predictions(ref),
                                  "predictions_sha256": predictions_digest(ref)})
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    good, other = np.array([1, 1, 1, 0]), np.array([1, 0, 1, 0])
    attrs = [{"test_predictions": encode_predictions(good),
              "predictions_sha256": predictions_digest(good)},
             {"test_predictions": encode_predictions(other),
              "predictions_sha256": predictions_digest(good)},  # does not match its digest
             {}]  # scored before predictions were stored
    for i, a in enumerate(attrs):
        s.add_trial(optuna.trial.create_trial(values=[1.0, 1.0, 0.8, 0.1], params={"x": i / 10},
                                              distributions=dist, user_attrs=a))
    out = front_cie(s, s.trials, y_true=y, groups=np.array(list("ffmm")))
    assert out["models"] == [0] and out["missing"] == [1, 2]
    assert [e["row"] for e in out["examples"]] == [0]  # one model: its own flips
    assert "the test split loaded now has 3 rows, the study scored 4" in front_cie(
        s, s.trials, y_true=y[:3], groups=None)["unavailable"]
    assert front_cie(s, [], y_true=y, groups=None) == {
        "unavailable": "no feasible model is on the Pareto front"}
    assert "no front model has stored test predictions" in front_cie(
        s, s.trials[1:], y_true=y, groups=None)["unavailable"]


def test_export_command_names_the_study_as_typed(tmp_path: Path) -> None:
    from nas_fair.config import parse_study
    from nas_fair.search.audit import export_command

    cfg = parse_study('name = "x"\n')  # no file: named
    assert export_command(cfg, storage=None, run_dir=None) == ["nas-fair", "export", "--study",
                                                               "x"]
    toml = tmp_path / "my.toml"
    toml.write_text('name = "mine"\n')
    from nas_fair.config import load_study

    cmd = export_command(load_study(toml), storage="postgresql://u:secret@db/nas",
                         run_dir="runs/a")
    assert cmd[:4] == ["nas-fair", "export", "--config", str(toml)]
    assert cmd[4:6] == ["--run-dir", "runs/a"]
    assert cmd[6] == "--storage" and "secret" not in cmd[7] and "***" in cmd[7]


def test_a_report_without_examples_removes_a_stale_csv(tmp_path: Path) -> None:
    from nas_fair.search.report import cie_file, write_report

    s = optuna.create_study(directions=DIRS)
    s.set_user_attr("reference", {"values": [1.0, 1.0, 0.8, 0.1]})
    out = tmp_path / "r.html"
    cie_file(out).write_text("row\n1\n")
    audit = {"summary": front_summary(s, [], bias_metric="m", accuracy_name="a", signed=False),
             "notes": {"reference": {}}, "cie": {"unavailable": "why"},
             "importance": importance(s, NAMES, DIRS), "disparity": [], "metric_rows": [],
             "reference_bias": {}, "bias_metrics": []}
    page = write_report(s, DIRS, NAMES, out, audit=audit).read_text()
    assert not cie_file(out).exists()
    assert "Not available: why." in page and "nothing to recommend" in page


def test_examples_are_browsable_and_written_beside_the_report(tmp_path: Path) -> None:
    from nas_fair.search.report import cie_file, write_report

    ref = np.array([0, 1, 1, 0, 2, 2])
    preds = np.array([[1, 1, 1, 0, 2, 0], [1, 0, 1, 0, 2, 0], [0, 0, 2, 0, 2, 1]])
    texts = ["<b>she</b> nurse", "t1", "t2", "t3", "t4", 'he said "x", then']
    cie = compression_identified(preds, ref, np.array([0, 0, 1, 0, 2, 1]),
                                 np.array(list("fffmmm")), texts=texts, models=[1, 2, 3], n=100)
    s = optuna.create_study(directions=DIRS)
    s.set_user_attr("reference", {"values": [1.0, 1.0, 0.8, 0.1]})
    audit = {"summary": front_summary(s, [], bias_metric="m", accuracy_name="a", signed=False),
             "notes": {"reference": {}}, "cie": cie, "importance": importance(s, NAMES, DIRS),
             "disparity": [], "metric_rows": [], "reference_bias": {}, "bias_metrics": []}
    out = tmp_path / "r.html"
    page = write_report(s, DIRS, NAMES, out, audit=audit).read_text()
    assert "3 of 6 test rows over 3 front models (trials 1, 2, 3)" in page
    table = page[page.index("id='cie-examples'"):]
    table = table[:table.index("</table>")]
    assert table.count("<tr>") == 1 + 3  # header + the CIEs
    assert "&lt;b&gt;she&lt;/b&gt; nurse" in table and "<b>she" not in table
    assert "<td>2 of 3</td>" in table and "<td>3 of 3</td>" in table
    got = list(csv.DictReader(io.StringIO(cie_file(out).read_text())))
    assert [(r["row"], r["group"], r["reference"], r["modal"], r["disagree"]) for r in got] == [
        ("0", "f", "0", "1", "2"), ("1", "f", "1", "0", "2"), ("5", "m", "2", "0", "3")]
    assert got[0]["text"] == "<b>she</b> nurse" and got[2]["text"] == 'he said "x", then'


def test_importance_uses_top_rung_results_only() -> None:
    """A multi-fidelity study's lower-rung scores are provisional: importance ignores them,
    as the front does."""
    s = _importance_study(6)
    dist = {"x": optuna.distributions.FloatDistribution(0, 1),
            "y": optuna.distributions.FloatDistribution(0, 1)}
    for i in range(5):  # rung 0 of a two-rung schedule, and one duplicate ticket
        s.add_trial(optuna.trial.create_trial(
            values=[1.0, 1.0, 0.5, 0.5], params={"x": i / 5, "y": i / 5}, distributions=dist,
            user_attrs={"fidelity": {"rung": 0, "candidate": 100 + i, "top": 1}}))
    s.add_trial(optuna.trial.create_trial(
        values=[1.0, 1.0, 0.5, 0.5], params={"x": 0.5, "y": 0.5}, distributions=dist,
        user_attrs={"fidelity": {"rung": 1, "candidate": 100, "top": 1}, "duplicate_of": 3}))
    assert importance(s, NAMES, DIRS)["trials"] == 6

"""The bias audit behind ``nas-fair report`` and ``nas-fair importance``, computed as plain data.

* the answer first: each front model's paired bias difference to the reference, and the
  smallest model whose bias is not worse;
* compression-identified examples (Hooker et al. 2019): test rows where the front models'
  modal prediction differs from the reference's, per group with intervals and a test;
* what drives each objective: Optuna's parameter importance (fANOVA or PED-ANOVA);
* plain notes where a metric does not apply to the study's data.

Per-trial test predictions come from the trial record (``test_predictions``, a few bytes a
row, checked against ``predictions_sha256``): the report compares front models row by row
without loading a model. Studies scored before that attribute existed show why instead.
"""

from __future__ import annotations

import base64
import math
import shlex
from collections.abc import Sequence
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from nas_fair.errors import UserError, one_of
from nas_fair.search.records import ReferenceRecord, TrialRecord

# Below this many trials, importance (and any per-study statistic) is labelled indicative.
SMALL_STUDY = 30
EVALUATORS = ("fanova", "ped-anova")
PERMUTATIONS = 2000  # the report's between-group test of compression-identified examples
AUDIT_SEED = 0


# --------------------------------------------------------------------------- stored predictions


def encode_predictions(y_pred: np.ndarray) -> dict[str, Any]:
    """Test predictions as JSON: base64 of the smallest unsigned integer type that holds them."""
    y = np.asarray(y_pred, dtype=np.int64).ravel()
    top = int(y.max()) if len(y) else 0
    if len(y) and int(y.min()) < 0:
        raise ValueError("predictions must be class indices >= 0")
    dtype = "uint8" if top < 2**8 else "uint16" if top < 2**16 else "uint32"
    return {"dtype": dtype, "rows": len(y),
            "base64": base64.b64encode(y.astype(dtype).tobytes()).decode("ascii")}


def decode_predictions(stored: Any, sha256: str | None = None) -> np.ndarray | None:
    """The predictions ``encode_predictions`` stored, or None when absent, malformed or not
    matching the recorded digest (whoever can write the storage must not feed the audit)."""
    from nas_fair.search.session import predictions_digest

    if not isinstance(stored, dict) or stored.get("dtype") not in ("uint8", "uint16", "uint32"):
        return None
    try:
        raw = base64.b64decode(str(stored.get("base64", "")), validate=True)
        y = np.frombuffer(raw, dtype=stored["dtype"]).astype(np.int64)
    except (ValueError, TypeError):
        return None
    if len(y) != stored.get("rows"):
        return None
    if sha256 is not None and predictions_digest(y) != sha256:
        return None
    return y


def trial_predictions(trial: FrozenTrial) -> np.ndarray | None:
    rec = TrialRecord.from_trial(trial)
    return decode_predictions(rec.test_predictions, rec.predictions_sha256)


def reference_predictions(study: optuna.Study) -> np.ndarray | None:
    ref = ReferenceRecord.from_study(study)
    return decode_predictions(ref.test_predictions, ref.predictions_sha256)


# --------------------------------------------------------------------------- which trials count


def scored_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Complete trials the front, export and report use: top-rung results only in a
    multi-fidelity study (a lower rung's scores are provisional), never a duplicate ticket."""
    from nas_fair.search.fidelity import top_rung_trials

    return top_rung_trials(t for t in study.get_trials(deepcopy=False,
                                                       states=(TrialState.COMPLETE,))
                           if t.values is not None)


# --------------------------------------------------------------------------- the answer first


def _oriented(row: dict[str, Any], direction: str, signed: bool) -> tuple[float, float, float]:
    """(diff, low, high) turned so that > 0 means "more biased than the reference".

    A signed metric is scored by its distance from zero: moving away from 0 on the reference's
    side is worse, so the difference is flipped when the reference's value is negative."""
    d, lo, hi = (float(row[k]) if row.get(k) is not None else math.nan
                 for k in ("diff", "diff_low", "diff_high"))
    flip = direction == "maximize" or (signed and float(row.get("ref_value") or 0.0) < 0)
    return (-d, -hi, -lo) if flip else (d, lo, hi)


def front_summary(study: optuna.Study, front: Sequence[FrozenTrial], *, bias_metric: str,
                  accuracy_name: str, signed: bool, export_command: Sequence[str] | None = None,
                  ) -> dict[str, Any]:
    """Each front model's paired bias difference and accuracy interval, smallest first, and
    the headline: the smallest model whose paired interval reaches "not worse" (0 or below)."""
    ref = ReferenceRecord.from_study(study)
    models = []
    for t in sorted(front, key=lambda t: (t.values[0], t.number)):
        rec = TrialRecord.from_trial(t)
        row = (rec.bias or {}).get(bias_metric) or {}
        direction = str(row.get("direction", "minimize"))
        paired = _oriented(row, direction, signed) if "diff" in row else None
        cmd = None
        if export_command is not None:
            cmd = shlex.join([*export_command, "--trials", str(t.number), "--out", "exports"])
        models.append({
            "trial": t.number, "size_mb": t.values[0], "latency_ms": t.values[1],
            "accuracy": t.values[2], "accuracy_ci": rec.accuracy_ci,
            "bias": row.get("value"), "bias_ci": [row.get("ci_low"), row.get("ci_high")],
            "paired": None if paired is None else {
                "diff": row.get("diff"), "low": row.get("diff_low"), "high": row.get("diff_high"),
                "worse_by": paired[0], "worse_low": paired[1], "worse_high": paired[2]},
            "not_worse": None if paired is None or math.isnan(paired[1]) else paired[1] <= 0,
            "export": cmd,
        })
    ok = [m for m in models if m["not_worse"]]
    ref_size = (ref.values or [None])[0]
    ref_acc, ref_ci = (ref.values or [None] * 3)[2], ref.accuracy_ci

    def overlaps(m: dict[str, Any]) -> bool:
        ci = m["accuracy_ci"]
        return bool(ci and ref_ci and None not in (*ci[:2], *ref_ci[:2])
                    and ci[0] <= ref_ci[1] and ref_ci[0] <= ci[1])

    def describe(m: dict[str, Any]) -> str:
        p = m["paired"]
        ratio = f", {m['size_mb'] / ref_size:.2f}x the reference's size" if ref_size else ""
        ci = m["accuracy_ci"] or [math.nan, math.nan]
        return (f"{m['size_mb']:.3g} MB{ratio}, paired difference {p['diff']:+.3g} "
                f"[{p['low']:+.3g}, {p['high']:+.3g}], {accuracy_name} {m['accuracy']:.3g} "
                f"[{_fmt(ci[0])}, {_fmt(ci[1])}]")

    if ok:
        m = ok[0]
        headline = (f"Trial {m['trial']} is the smallest front model whose {bias_metric} is not "
                    f"worse than the reference's (its paired 95% interval reaches no change or "
                    f"better): {describe(m)}.")
        if not overlaps(m) and ref_ci:
            kept = [o for o in ok if overlaps(o)]
            headline += (f" Its {accuracy_name} interval does not reach the reference's "
                         f"({_fmt(ref_acc)} [{_fmt(ref_ci[0])}, {_fmt(ref_ci[1])}]); ")
            headline += (f"the smallest that also keeps it is trial {kept[0]['trial']}: "
                         f"{describe(kept[0])}." if kept else
                         "no model qualifies on both.")
    elif not models:
        headline = "No feasible model is on the Pareto front, so there is nothing to recommend."
    elif all(m["paired"] is None for m in models):
        headline = (f"The front's trials hold no paired difference for {bias_metric}, so no "
                    "model can be called not worse than the reference.")
    else:
        headline = (f"No front model's {bias_metric} is shown to be no worse than the "
                    "reference's: every paired 95% interval lies entirely on the worse side.")
    return {"metric": bias_metric, "signed": signed, "models": models, "headline": headline,
            "recommended": ok[0]["trial"] if ok else None, "reference_accuracy_ci":
            ref.accuracy_ci, "reference_accuracy": (ref.values or [None] * 3)[2]}


def _fmt(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3g}"


# --------------------------------------------------------------------------- metric notes

# Metrics over the minority and majority quartile of classes (objectives/group.py).
CLASS_BALANCE_METRICS = ("minority_recall", "minority_majority_recall_gap")


def not_applicable(y_true: np.ndarray | None, bias: dict[str, dict[str, Any]],
                   reference_bias: dict[str, dict[str, Any]] | None, *,
                   is_reference: bool = False) -> dict[str, str]:
    """metric -> a plain sentence why its number means nothing on this study's data.

    The class-balance metrics need unequal class counts (resampling keeps them, so every
    resample is as balanced); any metric whose value and interval are one constant on the
    reference and on this model carries no information either."""
    notes: dict[str, str] = {}
    if y_true is not None and len(y_true):
        counts = np.bincount(np.asarray(y_true, dtype=np.int64))
        counts = counts[counts > 0]
        if len(counts) and counts.min() == counts.max():
            for name in CLASS_BALANCE_METRICS:
                if name in bias:
                    notes[name] = (f"not applicable: the test split's classes are balanced "
                                   f"({int(counts[0])} rows each), so there is no minority "
                                   "class to protect")
    from nas_fair.objectives import BIAS

    for name, row in bias.items():
        if name in notes:
            continue
        if name in BIAS and "y_pred_reference" in BIAS[name].needs:
            # a trial's 0 here is a real "nothing changed"; the reference's is a definition
            if is_reference:
                notes[name] = "0 by definition: the reference compared with itself"
            continue
        ref = (reference_bias or {}).get(name)
        if not ref:  # one model's zero-width interval can be a true 0 (no flips at all)
            continue
        vals = [d.get(k) for d in (row, ref) for k in ("value", "ci_low", "ci_high")]
        if all(v is not None for v in vals) and len(set(vals)) == 1:
            notes[name] = (f"not informative: {vals[0]:.3g} on the reference, this model and "
                           "every resample")
    return notes


# --------------------------------------------------------------------------- CIE (Hooker et al.)


def modal_predictions(preds: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(modal class per row, how many models disagree with the reference there).

    ``preds`` is (models, rows). A tie for the mode that includes the reference's class
    counts as the reference's (a row is compression-identified only when a strict plurality
    moved away); other ties go to the lowest class index."""
    preds = np.asarray(preds, dtype=np.int64)
    reference = np.asarray(reference, dtype=np.int64)
    k = int(max(preds.max(initial=0), reference.max(initial=0))) + 1
    counts = np.zeros((preds.shape[1], k), dtype=np.int64)
    for row in preds:
        counts[np.arange(preds.shape[1]), row] += 1
    modal = counts.argmax(axis=1)
    ref_count = counts[np.arange(len(reference)), reference]
    modal = np.where(ref_count == counts.max(axis=1), reference, modal)
    return modal, (preds != reference[None, :]).sum(axis=0)


def compression_identified(preds: np.ndarray, reference: np.ndarray, y_true: np.ndarray,
                           groups: np.ndarray | None, *, texts: Sequence[str] | None = None,
                           label_names: Sequence[str] | None = None,
                           models: Sequence[int] = (), n: int = PERMUTATIONS,
                           seed: int = AUDIT_SEED) -> dict[str, Any]:
    """Compression-identified examples over a population of models (Hooker et al. 2019).

    Per group: the CIE count and rate with a Wilson 95% interval, and how many of its CIEs the
    reference had right (the harm); a seeded permutation chi-square test of "the groups' CIE
    rates are equal"; and the examples themselves."""
    from nas_fair.objectives.collapse import wilson_interval
    from nas_fair.objectives.compression import permutation_chi2

    preds = np.atleast_2d(np.asarray(preds, dtype=np.int64))
    modal, disagree = modal_predictions(preds, reference)
    y = np.asarray(y_true, dtype=np.int64)
    cie = modal != np.asarray(reference)
    g = np.asarray(groups).astype(str) if groups is not None else np.full(len(y), "all")

    def name(c: int) -> str:
        return str(label_names[c]) if label_names is not None and 0 <= c < len(label_names) \
            else str(c)

    by_group = {}
    for gv in sorted(set(g.tolist())):
        rows = g == gv
        k, m = int(cie[rows].sum()), int(rows.sum())
        by_group[gv] = {"n": m, "cie": k, "rate": k / m if m else math.nan,
                        "ci": list(wilson_interval(k, m)),
                        "reference_right": int((cie & rows & (reference == y)).sum()),
                        "modal_right": int((cie & rows & (modal == y)).sum())}
    test = permutation_chi2(cie, g, n=n, seed=seed) if len(by_group) > 1 else None
    examples = [{"row": int(i), "text": None if texts is None else str(texts[i]),
                 "label": name(int(y[i])), "group": str(g[i]),
                 "reference": name(int(reference[i])), "modal": name(int(modal[i])),
                 "disagree": int(disagree[i]), "models": int(preds.shape[0])}
                for i in np.flatnonzero(cie)]
    return {"models": list(models), "n_models": int(preds.shape[0]), "rows": len(y),
            "cie": int(cie.sum()), "groups": by_group, "test": test, "examples": examples}


def front_cie(study: optuna.Study, front: Sequence[FrozenTrial], *, y_true: np.ndarray | None,
              groups: np.ndarray | None, texts: Sequence[str] | None = None,
              label_names: Sequence[str] | None = None) -> dict[str, Any]:
    """``compression_identified`` over the front's stored predictions, or {"unavailable": why}."""
    ref = reference_predictions(study)
    if ref is None:
        return {"unavailable": "the study's reference has no stored test predictions (it was "
                               "scored by an older nas-fair); run a new study to get this view"}
    if y_true is None:
        return {"unavailable": "the test split could not be loaded to compare predictions with "
                               "labels"}
    if len(y_true) != len(ref):
        return {"unavailable": f"the test split loaded now has {len(y_true)} rows, the study "
                               f"scored {len(ref)}: the data changed since the search"}
    if not front:
        return {"unavailable": "no feasible model is on the Pareto front"}
    have = {t.number: trial_predictions(t) for t in front}
    missing = sorted(k for k, v in have.items() if v is None or len(v) != len(ref))
    got = {k: v for k, v in have.items() if k not in missing}
    if not got:
        return {"unavailable": "no front model has stored test predictions (scored by an older "
                               "nas-fair, or the record does not match its digest)"}
    numbers = sorted(got)
    out = compression_identified(np.stack([got[k] for k in numbers]), ref, y_true, groups,
                                 texts=texts, label_names=label_names, models=numbers)
    out["missing"] = missing
    return out


CIE_COLUMNS = ("row", "group", "label", "reference", "modal", "disagree", "models", "text")


def cie_csv(cie: dict[str, Any]) -> str:
    """The compression-identified examples as CSV text (one row each)."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CIE_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for e in cie.get("examples", []):
        w.writerow({**e, "text": "" if e.get("text") is None else e["text"]})
    return buf.getvalue()


# --------------------------------------------------------------------------- importance


def _evaluator(name: str, seed: int) -> Any:
    from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator

    if name not in EVALUATORS:
        raise one_of("--evaluator", name, EVALUATORS)
    return FanovaImportanceEvaluator(seed=seed) if name == "fanova" else \
        PedAnovaImportanceEvaluator()


def importance(study: optuna.Study, names: Sequence[str], dirs: Sequence[str], *,
               objectives: Sequence[int] = (3, 2), evaluator: str = "fanova",
               seed: int = AUDIT_SEED) -> dict[str, Any]:
    """Per objective (by index), each parameter's share of importance for it.

    Over the scored, non-collapsed trials (a collapsed model's bias of 0 would otherwise make
    "what collapses a model" the top driver of bias). fANOVA: share of the objective's
    variance each parameter explains (random forest, seeded). PED-ANOVA: how much a
    parameter's distribution among the best 10% of trials differs from all trials. Never
    raises for a small study: it says why there is no table instead."""
    import warnings

    ev = _evaluator(evaluator, seed)  # the name is checked before any work
    trials = [t for t in scored_trials(study) if not TrialRecord.from_trial(t).collapsed]
    out: dict[str, Any] = {"evaluator": evaluator, "trials": len(trials), "objectives": {},
                           "small": len(trials) < SMALL_STUDY}
    varying = {p for p in {k for t in trials for k in t.params}
               if len({repr(t.params.get(p)) for t in trials}) > 1}
    if len(trials) < 3 or not varying:
        why = (f"{len(trials)} scored, non-collapsed trial{'s' if len(trials) != 1 else ''}"
               if len(trials) < 3 else "no parameter took more than one value")
        out["unavailable"] = f"parameter importance needs at least 3 trials that differ: {why}"
        return out
    out["note"] = (f"small sample ({len(trials)} trials): indicative only" if out["small"]
                   else f"{len(trials)} trials")
    # A parameter that held one value in every trial explains nothing: left out, and said so.
    out["constant"] = sorted({k for t in trials for k in t.params} - varying)
    params = sorted(p for p in varying if all(p in t.params for t in trials))
    sub = optuna.create_study(directions=list(dirs))
    sub.add_trials(trials)
    for j in objectives:
        sign = -1.0 if (evaluator == "ped-anova" and dirs[j] == "maximize") else 1.0
        values = {t.values[j] for t in trials}
        if len(values) == 1:
            out["objectives"][names[j]] = {"unavailable": "every trial has the same value"}
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PED-ANOVA's "lower is better" notice: handled
            try:
                imp = optuna.importance.get_param_importances(
                    sub, evaluator=ev, params=params,
                    target=lambda t, j=j, s=sign: s * t.values[j])
            except (ValueError, RuntimeError) as exc:
                out["objectives"][names[j]] = {"unavailable": str(exc).splitlines()[0]}
                continue
        out["objectives"][names[j]] = {"importance": {k: float(v) for k, v in imp.items()}}
    return out


def render_importance(result: dict[str, Any]) -> str:
    """``nas-fair importance``'s table."""
    lines = [f"Parameter importance ({result['evaluator']}) over {result['trials']} scored, "
             "non-collapsed trials"]
    if "unavailable" in result:
        return "\n".join([*lines, result["unavailable"]])
    lines.append(result["note"])
    if result.get("constant"):
        lines.append(f"left out (one value in every trial): {', '.join(result['constant'])}")
    for name, obj in result["objectives"].items():
        lines.append("")
        lines.append(f"{name}:")
        if "unavailable" in obj:
            lines.append(f"  not computed: {obj['unavailable']}")
            continue
        width = max(len(k) for k in obj["importance"]) if obj["importance"] else 0
        for k, v in obj["importance"].items():
            lines.append(f"  {k:<{width}}  {v:6.3f}  {'#' * round(40 * v)}")
    return "\n".join(lines)


def check_objectives_arg(text: str, names: Sequence[str]) -> list[int]:
    """``--objective bias,accuracy`` -> objective indices (short names or the study's)."""
    short = {"size": 0, "latency": 1, "accuracy": 2, "bias": 3}
    known = {**short, **{n: i for i, n in enumerate(names)},
             **{n.strip("|"): i for i, n in enumerate(names)}}
    parts = [p.strip() for p in str(text).split(",")]
    bad = [p for p in parts if p not in known]
    if not parts or bad:
        raise UserError(f"--objective must be comma-separated names among "
                        f"{', '.join(dict.fromkeys([*short, *names]))}, got {text!r}")
    return list(dict.fromkeys(known[p] for p in parts))


# --------------------------------------------------------------------------- the report's audit


def export_command(cfg: Any, *, storage: str | None, run_dir: str | None) -> list[str]:
    """``nas-fair export`` naming this study as the user can type it (password masked)."""
    from pathlib import Path

    from nas_fair.config import find_study
    from nas_fair.search.storage import shown_url

    cmd = ["nas-fair", "export"]
    try:
        named = cfg.source is not None and find_study(cfg.name).resolve() == \
            Path(cfg.source).resolve()
    except UserError:
        named = False
    if cfg.source is None or named:
        cmd += ["--study", cfg.name]
    else:
        cmd += ["--config", str(cfg.source)]
    if run_dir:
        cmd += ["--run-dir", str(run_dir)]
    if storage:
        cmd += ["--storage", shown_url(storage)]
    return cmd


def audit_data(study: optuna.Study, cfg: Any, front: Sequence[FrozenTrial], *,
               export: Sequence[str] | None = None, data: Any = None) -> dict[str, Any]:
    """Everything the report's audit sections draw. ``data``: the study's TaskData (loaded
    here when None; without it the examples have no text and the class notes are skipped)."""
    from nas_fair.objectives.scores import directions, objective_names

    names, dirs = objective_names(cfg), directions(cfg)
    load_error = None
    if data is None:
        try:
            from nas_fair.data import load_task

            data = load_task(cfg)
        except (UserError, OSError) as exc:
            load_error = str(exc).splitlines()[0]
    test = None if data is None else data.test
    ref = ReferenceRecord.from_study(study)
    summary = front_summary(study, front, bias_metric=cfg.objectives.bias,
                            accuracy_name=cfg.objectives.accuracy,
                            signed=names[3] != cfg.objectives.bias, export_command=export)
    y_true = None if test is None else test.labels
    notes = {t.number: not_applicable(y_true, TrialRecord.from_trial(t).bias or {}, ref.bias)
             for t in front}
    notes["reference"] = not_applicable(y_true, ref.bias or {}, ref.bias, is_reference=True)
    cie = front_cie(study, front, y_true=y_true, groups=None if test is None else test.groups,
                    texts=None if test is None else test.texts,
                    label_names=None if data is None else data.label_names)
    if load_error and "unavailable" in cie:
        cie["unavailable"] += f" ({load_error})"
    imp = importance(study, names, dirs, objectives=(3, 2), seed=cfg.seed)
    disparity = []
    for t in sorted(front, key=lambda t: (t.values[0], t.number)):
        rec = TrialRecord.from_trial(t)
        if rec.disparity:
            disparity.append({"trial": t.number, "shares": rec.disparity,
                              "stats": rec.disparity_stats})
    return {"summary": summary, "notes": notes, "cie": cie, "importance": imp,
            "disparity": disparity,
            "metric_rows": [{"trial": t.number, "bias": TrialRecord.from_trial(t).bias or {}}
                            for t in sorted(front, key=lambda t: (t.values[0], t.number))],
            "reference_bias": ref.bias or {},
            "bias_metrics": sorted((ref.bias or {}).keys()), "data_error": load_error}

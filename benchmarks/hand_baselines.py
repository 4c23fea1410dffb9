"""Hand-made compressions vs the Pareto front nas-fair found, on nas-fair's own objectives.

Baselines, each built and scored in this run with the study's ``Session`` (same test split,
metrics, latency protocol and feasibility rules as a search):

* the reference itself;
* dynamic int8 alone (torch's fbgemm kernel on every linear layer, embeddings fp32);
* half the layers dropped then distilled, DistilBERT-style (every other layer kept);
* 50% of attention heads pruned by importance, then the same recovery;
* low-rank factorization at half rank (attention and FFN, plain SVD), then the same recovery.

Recovery is the study's (``recovery_steps`` distillation steps, T = 2, alpha = 0.9, the study's
early-stopping settings). Then, for each baseline, the models on the feasible Pareto front of a
finished study (read from its storage) that are at least as good on all four objectives: size
and latency as ratios to the reference measured in the same run (so machine load cancels),
accuracy at least the baseline's, and bias no worse than the upper end of the baseline's 95%
interval. The front's models are measured in this run too, beside the baselines: each is
loaded from the model the search kept for it (a front trial's artifact; rebuilt from its
parameters where missing, or always with ``--replay-front``), so a latency measured hours
earlier under another load never decides a match. Latency is taken last: every model (the
reference, the baselines, the front) timed in turn, ``--latency-rounds`` times, the median
kept, so all are measured at the same time under the same conditions (on the 2-core machine a
model's latency moved by up to 30% between measurements a minute apart once other work had
run in between: ``latency_after_training.py``). For a baseline no front model matches, the
front models worse on accuracy alone are listed with paired bootstrap differences of accuracy
and bias (front - baseline, the same resampled test rows): whether the shortfall is noise.
``--stored-front`` compares with the values stored by the search instead (size and latency as
ratios to the study's own reference; no pairing).

    python benchmarks/hand_baselines.py [--study bios] [--storage URL]
        [--replay-front | --stored-front]

Writes benchmarks/results/hand_baselines.json and hand_baselines.html (the front, baselines
marked) next to it.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path
from typing import Any

from _common import (
    RESULTS,
    add_study_args,
    load_cfg,
    open_session,
    paired_objectives,
    reduce_search,
    reference_dict,
    run_dir,
    shown_storage,
    table,
    write_html,
    write_json,
)
from tqdm.auto import tqdm

from nas_fair.search.records import ReferenceRecord, StudyRecord, TrialRecord

RECOVERY = {"distillation.temperature": 2.0, "distillation.alpha": 0.9}
BASELINES = {
    "int8 dynamic": {"quantization.attention_bits": 8, "quantization.ffn_bits": 8,
                     "quantization.embedding_bits": 32},
    "half layers + distil (DistilBERT-style)": "every_other_layer",
    "heads 50% + distil": {"pruning.heads": 0.5},
    "low-rank 1/2 + distil": {"lowrank.attention_rank": 0.5, "lowrank.ffn_rank": 0.5,
                              "lowrank.activation_aware": False},
}


def every_other_layer(session: Any, steps: int) -> Any:
    """DistilBERT's student initialization (layers 0, 2, 4, ...) recovered by distillation."""
    from nas_fair.encoder import encoder_layers, set_encoder_layers
    from nas_fair.spaces.recovery import recover

    model = copy.deepcopy(session.reference)
    layers = list(encoder_layers(model))
    set_encoder_layers(model, layers[::2])
    return recover(model, session.ctx, steps=steps, temperature=RECOVERY[
        "distillation.temperature"], alpha=RECOVERY["distillation.alpha"])


def build(session: Any, recipe: Any, steps: int) -> Any:
    if recipe == "every_other_layer":
        return every_other_layer(session, steps)
    params = dict(recipe)
    if not all(k.startswith("quantization.") for k in params):
        params.update({"distillation.steps": steps, **RECOVERY})
    return session.replay(params)


def measure(session: Any, model: Any, reference: dict[str, Any],
            records: dict[str, Any], key: str) -> dict[str, Any]:
    """Scores of one model; its evaluation record goes into ``records[key]`` (for pairing)."""
    from nas_fair.search.session import predictions_digest
    from nas_fair.spaces.recovery import recovery_logs

    record = records[key] = session.evaluate(model)
    scores = session.score(model, record, paired=True)
    cons = session.constraints(scores, reference)
    return {"values": scores.values(), "bias_ci": scores.attrs["bias_ci"],
            "accuracy_ci": scores.attrs["accuracy_ci"], "params": scores.attrs["params"],
            "feasible": all(v <= 0 for v in cons.values()),
            "collapsed": scores.attrs["collapse"]["collapsed"],
            "recovery_steps_run": sum(r["steps_run"] for r in recovery_logs(model)),
            "predictions_sha256": predictions_digest(record.y_pred)}


def bias_upper(cfg: Any, value: float, ci: list[float | None] | None) -> float:
    """Upper end of the bias objective's interval (for a signed metric, of |value|)."""
    from nas_fair.objectives.scores import _signed

    if not ci or ci[0] is None or ci[1] is None:
        return value
    return max(abs(ci[0]), abs(ci[1])) if _signed(cfg) else ci[1]


def bias_lower(cfg: Any, value: float, ci: list[float | None] | None) -> float:
    from nas_fair.objectives.scores import _signed

    if not ci or ci[0] is None or ci[1] is None:
        return value
    if _signed(cfg):
        return 0.0 if ci[0] <= 0 <= ci[1] else min(abs(ci[0]), abs(ci[1]))
    return ci[0]


def worse_on(cfg: Any, dirs: list[str], cand: dict[str, Any], base: dict[str, Any]
             ) -> list[int]:
    """Objectives (indices) on which ``cand`` is worse than ``base``: size, latency (ratios) and
    accuracy strictly; bias only beyond the baseline's 95% interval."""
    c, b = cand["ratios"], base["ratios"]
    worse = [j for j in range(3)
             if dirs[j] == "minimize" and c[j] > b[j] or dirs[j] == "maximize" and c[j] < b[j]]
    cv, bv = cand["values"][3], base["values"][3]
    if (cv > bias_upper(cfg, bv, base["bias_ci"]) if dirs[3] == "minimize"
            else cv < bias_lower(cfg, bv, base["bias_ci"])):
        worse.append(3)
    return worse


def at_least_as_good(cfg: Any, dirs: list[str], cand: dict[str, Any], base: dict[str, Any]
                     ) -> bool:
    return not worse_on(cfg, dirs, cand, base)


def near_misses(session: Any, dirs: list[str], names: list[str], front: list[dict[str, Any]],
                base_key: str, base: dict[str, Any], records: dict[str, Any]
                ) -> list[dict[str, Any]]:
    """Front models worse than a baseline on accuracy alone, with paired bootstrap differences
    (front - baseline, same resampled test rows) of accuracy and bias: is the shortfall noise?"""
    cfg = session.cfg
    out = []
    for f in front:
        key = f"#{f['number']}"
        if worse_on(cfg, dirs, f, base) != [2] or key not in records:
            continue
        diff = paired_objectives(cfg, records[key], records[base_key])
        out.append({"number": f["number"], "missed": names[2],
                    "accuracy_diff": diff["accuracy"], "bias_diff": diff["bias"]})
    return out


def front_model(session: Any, folder: Path, trial: Any, replay: bool) -> tuple[Any, str]:
    """A front trial's model: the one the search kept, else rebuilt from its parameters."""
    from nas_fair.checkpoint import load_compressed
    from nas_fair.errors import UserError
    from nas_fair.search.artifacts import artifact_dir

    # the folder from the trial number, never from the path stored in the study
    saved = artifact_dir(folder, session.cfg.name, trial.number)
    if (not replay and TrialRecord.from_trial(trial).artifact and saved is not None
            and saved.is_dir()):
        try:
            return load_compressed(saved), "saved model"
        except UserError as exc:
            print(f"note: trial {trial.number}'s saved model is unreadable ({exc}); rebuilding")
    return session.replay(trial.params), "replayed"


def latency_pass(session: Any, models: dict[str, Any], rounds: int) -> dict[str, float]:
    """Median over ``rounds`` of each model's latency median, the models timed in turn."""
    runs: dict[str, list[float]] = {k: [] for k in models}
    for _ in tqdm(range(rounds), desc="latency pass", leave=False):
        for key, model in models.items():
            runs[key].append(session.latency(model)["median_ms"])
    return {k: statistics.median(v) for k, v in runs.items()}


def ratios(values: list[float], reference: list[float]) -> list[float]:
    return [v / r if r else v for v, r in zip(values, reference)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_study_args(ap)
    ap.add_argument("--storage", help="the finished study's storage (default: run folder's)")
    how = ap.add_mutually_exclusive_group()
    how.add_argument("--replay-front", action="store_true",
                     help="rebuild the front's models from their parameters (slow) instead of "
                          "loading the models the search kept")
    how.add_argument("--stored-front", action="store_true",
                     help="use the front's stored values instead of measuring it in this run")
    ap.add_argument("--latency-rounds", type=int, default=3,
                    help="rounds of the final latency pass over every model (default: 3)")
    ap.add_argument("--steps", type=int, help="recovery steps (default: the study's)")
    ap.add_argument("--bootstrap", type=int, help="bootstrap resamples (default: the study's)")
    ap.add_argument("--out", default=str(RESULTS / "hand_baselines.json"))
    args = ap.parse_args()

    import optuna
    from optuna.trial import TrialState

    from nas_fair.objectives.scores import directions, objective_names
    from nas_fair.search.front import pareto_front

    cfg = load_cfg(args)
    reduced = reduce_search(cfg, steps=args.steps, bootstrap=args.bootstrap)
    folder = run_dir(args, cfg)
    session = open_session(cfg, folder, args.threads)
    session._save_artifact = lambda *a, **k: None
    dirs, names = directions(cfg), objective_names(cfg)
    steps = cfg.search.recovery_steps
    ref = reference_dict(session)
    rows: dict[str, dict[str, Any]] = {"reference": {
        "values": ref["values"], "bias_ci": ref["bias_ci"], "accuracy_ci": ref["accuracy_ci"],
        "params": ref["params"], "feasible": not ref["collapse"]["collapsed"],
        "collapsed": ref["collapse"]["collapsed"], "recovery_steps_run": 0, "build_s": 0.0}}
    models: dict[str, Any] = {"reference": session.reference}
    records: dict[str, Any] = {"reference": session.ref_record}
    for name, recipe in BASELINES.items():
        t = time.perf_counter()
        models[name] = build(session, recipe, steps)
        built = time.perf_counter() - t
        rows[name] = {**measure(session, models[name], ref, records, name), "build_s": built}
        print(f"{name}: {', '.join(f'{n} {v:.4g}' for n, v in zip(names, rows[name]['values']))}"
              f" ({built:.0f}s)", flush=True)

    url = args.storage or f"sqlite:///{(folder / 'study.db').resolve()}"
    front: list[dict[str, Any]] = []
    study_ref: list[float] | None = None
    note = ""
    try:
        study = optuna.load_study(study_name=cfg.name, storage=url)
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        study_ref = ReferenceRecord.from_study(study).values
        others = [{"number": t.number, "ratios": ratios(list(t.values), study_ref),
                   "feasible": TrialRecord.from_trial(t).feasible}
                  for t in complete]
        for tr in pareto_front(complete, dirs):
            entry = {"number": tr.number, "params": tr.params, "values": list(tr.values),
                     "bias_ci": TrialRecord.from_trial(tr).bias_ci, "source": "storage"}
            if args.stored_front:
                entry["ratios"] = ratios(entry["values"], study_ref)
            else:
                model, source = front_model(session, folder, tr, args.replay_front)
                models[f"#{tr.number}"] = model
                entry.update(measure(session, model, ref, records, f"#{tr.number}"),
                             source=source)
                # Same model as in the search? Its test predictions must be the same.
                entry["same_predictions"] = (entry["predictions_sha256"]
                                             == TrialRecord.from_trial(tr).predictions_sha256)
                if not entry["same_predictions"]:
                    print(f"note: trial {tr.number} predicts differently now than in the search "
                          f"({source}; another thread count or machine?)")
            front.append(entry)
        study_steps = ((StudyRecord.from_study(study).config or {}).get("search", {})
                       .get("recovery_steps"))
        if study_steps != steps:
            note = ("the study's trials used a different recovery budget "
                    f"({study_steps} steps) than these baselines ({steps})")
    except Exception as exc:  # no finished study here: baselines only
        others = []
        note = f"no finished study read from {url}: {str(exc).splitlines()[0]}"
    if note:
        print(f"note: {note}")
    # Latency last, every model in turn: a model's latency can move by up to 30% between
    # measurements minutes apart (latency_after_training.py), so figures taken while building,
    # each at its own time, would not compare.
    timed = latency_pass(session, models, args.latency_rounds)
    for key, ms in timed.items():
        entry = rows.get(key) or next(f for f in front if f"#{f['number']}" == key)
        entry["latency_while_built_ms"] = entry["values"][1]
        entry["values"][1] = ms
    for entry in [*rows.values(), *(f for f in front if f"#{f['number']}" in timed)]:
        entry["ratios"] = ratios(entry["values"], rows["reference"]["values"])

    matches: dict[str, list[int]] = {}
    for name, base in rows.items():
        matches[name] = [f["number"] for f in front if at_least_as_good(cfg, dirs, f, base)]
    header = ["model", *[f"{n} (x ref)" if j < 2 else n for j, n in enumerate(names)],
              "bias 95% CI", "feasible", "nas-fair front models at least as good"]
    out_rows = []
    for name, r in rows.items():
        ci = r["bias_ci"]
        ci_txt = "-" if not ci or ci[0] is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"
        found = matches[name]
        found_txt = (", ".join(f"#{n}" for n in found) if found else
                     "none" if front else "no study to compare")
        out_rows.append([name, r["ratios"][0], r["ratios"][1], r["values"][2], r["values"][3],
                         ci_txt, "yes" if r["feasible"] else "no", found_txt])
    print(table(out_rows, header))
    if front:
        print("\nfront of the finished study (" + (
            "as stored; size/latency x its reference" if args.stored_front else
            "measured in this run") + ")")
        print(table([[f"#{f['number']}", f["ratios"][0], f["ratios"][1], f["values"][2],
                      f["values"][3]] for f in front],
                    ["trial", *[f"{n} (x ref)" if j < 2 else n for j, n in enumerate(names)]]))
        for name, found in matches.items():
            if not found:
                print(f"no nas-fair front model is at least as good as '{name}' on all four "
                      "objectives")
    misses = {name: near_misses(session, dirs, names, front, name, base, records)
              for name, base in rows.items() if not matches[name]}
    for name, found in misses.items():
        for m in found:
            a, b = m["accuracy_diff"], m["bias_diff"]
            print(f"'{name}': #{m['number']} is at least as good but on {m['missed']}; paired "
                  f"differences (front - baseline): {names[2]} {a[0]:+.4f} [{a[1]:+.4f}, "
                  f"{a[2]:+.4f}], {cfg.objectives.bias} {b[0]:+.4f} [{b[1]:+.4f}, {b[2]:+.4f}]")
    out = Path(args.out)
    data = {"study": cfg.name, "threads": args.threads, "recovery_steps": steps,
            "reduced": reduced, "objectives": names, "directions": dirs,
            "reference": ref["values"], "baselines": rows, "front": front,
            "front_source": sorted({f["source"] for f in front}),
            "storage": shown_storage(url), "matches": matches, "near_misses": misses,
            "note": note,
            "rule": "size and latency as ratios to the reference of the same run, accuracy >= "
                    "the baseline's, bias <= the upper end of the baseline's 95% CI"}
    write_json(out, data)
    write_html(out.with_suffix(".html"), [figure(data, others)],
               f"{cfg.name}: nas-fair front and hand baselines")


def figure(data: dict[str, Any], others: list[dict[str, Any]]) -> Any:
    import plotly.graph_objects as go

    labels = [f"{n} / reference" for n in data["objectives"]]

    def dims(points: list[list[float]]) -> list[dict[str, Any]]:
        return [dict(label=labels[j], values=[p[j] for p in points]) for j in range(4)]

    fig = go.Figure()
    if others:
        fig.add_trace(go.Splom(dimensions=dims([o["ratios"] for o in others]), name="trials",
                               text=[f"trial {o['number']}" for o in others],
                               marker=dict(color="#c7c7c7", size=6,
                                           symbol=["circle" if o["feasible"] else "x"
                                                   for o in others]),
                               diagonal_visible=False, showupperhalf=False))
    if data["front"]:
        fig.add_trace(go.Splom(dimensions=dims([f["ratios"] for f in data["front"]]),
                               name="nas-fair front",
                               text=[f"trial {f['number']}" for f in data["front"]],
                               marker=dict(color="#1f77b4", size=9), diagonal_visible=False,
                               showupperhalf=False))
    symbols = ["star", "diamond", "square", "triangle-up", "cross", "pentagon"]
    colors = ["#d62728", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2"]
    for i, (name, b) in enumerate(data["baselines"].items()):
        fig.add_trace(go.Splom(dimensions=dims([b["ratios"]]), name=name, text=[name],
                               marker=dict(color=colors[i % 6], symbol=symbols[i % 6], size=13,
                                           line=dict(width=1, color="#333")),
                               diagonal_visible=False, showupperhalf=False))
    fig.update_layout(title="Objectives as ratios to the reference: study trials (grey, x = "
                            "infeasible), Pareto front (blue), hand baselines (marked)",
                      height=800)
    return fig


if __name__ == "__main__":
    main()

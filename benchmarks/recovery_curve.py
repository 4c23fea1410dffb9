"""Accuracy and bias of one compressed student vs recovery steps, with and without early stop.

The student is fixed (default: top 3 layers dropped, 25% of heads and 50% of FFN neurons
pruned by importance); for each step budget it is recovered by the study's distillation
(T = 2, alpha = 0.9, the study's learning rate, length-bucketed batches) and scored with the
study's ``Session``: accuracy metric and primary bias metric with their 95% intervals, plus
every recorded bias metric in the JSON. With early stopping the run is the same run cut short
(same seed, same batches, same schedule), so where it does not stop it is the same model and
is not trained twice.

With ``--precision fp32,bf16`` each budget is also run with recovery's forward passes under
bfloat16 autocast, and with ``--dropout on,off`` with and without dropout (``torch``: dropout
with torch's own Bernoulli masks instead of the random-bit ones recovery draws), so that a setting's
accuracy and bias can be set against the first setting's on the same student; ``paired`` in
the JSON holds the paired bootstrap difference (this setting - the first) of both.
``--seeds 0,1,2`` repeats everything with other recovery seeds (batch order and dropout; the
student and the test rows stay the same), so a setting's effect can be set against the spread
from the seed alone; pairs are formed within a seed.

    python benchmarks/recovery_curve.py [--steps 0,75,150,300,450,600] [--variants off,on]
        [--prune heads=0.25,ffn=0.5,layers=3] [--precision fp32] [--dropout on|off|torch]
        [--seeds 0] [--test-rows 0] [--bootstrap N]

Writes benchmarks/results/recovery_curve.json and recovery_curve.html next to it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
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
    run_dir,
    shrink_test,
    table,
    write_html,
    write_json,
)

TEMPERATURE, ALPHA = 2.0, 0.9


def parse_prune(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        out[key.strip()] = int(value) if key.strip() == "layers" else float(value)
    return out


def one_run(session: Any, student: Any, budget: int, early_stop: bool,
            tolerance: float | None, precision: str, dropout: str, seed: int,
            ) -> dict[str, Any]:
    from nas_fair.spaces.recovery import recover, recovery_log

    ctx = dataclasses.replace(session.ctx, seed=seed)

    model = copy.deepcopy(student)
    t = time.perf_counter()
    if budget > 0:
        recover(model, ctx, steps=budget, temperature=TEMPERATURE, alpha=ALPHA,
                early_stop=early_stop, tolerance=tolerance, precision=precision,
                dropout=dropout != "off", fast_masks=dropout != "torch")
    recover_s = time.perf_counter() - t
    log = recovery_log(model) if budget > 0 else None
    record = session.evaluate(model)
    scores = session.score(model, record, paired=True)
    a = scores.attrs
    return {
        "budget": budget, "early_stop": early_stop, "precision": precision,
        "dropout": dropout != "off", "masks": {"on": "bits", "torch": "torch"}.get(dropout),
        "seed": seed,
        "steps_run": log["steps_run"] if log else 0, "recover_s": recover_s,
        "accuracy": scores.accuracy, "accuracy_ci": a["accuracy_ci"],
        "bias": scores.bias, "bias_ci": a["bias_ci"], "size_mb": scores.size_mb,
        "latency_ms": scores.latency_ms, "collapsed": a["collapse"]["collapsed"],
        "bias_metrics": a["bias"], "losses": log["losses"] if log else [],
        "checks": log["checks"] if log else [],
        "_record": record,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_study_args(ap)
    ap.add_argument("--steps", default="0,75,150,300,450,600", help="step budgets")
    ap.add_argument("--variants", default="off,on", help="early stopping off, on, or both")
    ap.add_argument("--precision", default="fp32",
                    help="recovery precisions to run, comma-separated: fp32, bf16")
    ap.add_argument("--dropout", help="dropout while recovering, comma-separated: on, off, "
                                      "torch (on with torch's masks; default: the study's "
                                      "recovery_dropout)")
    ap.add_argument("--seeds", help="recovery seeds, comma-separated (default: the study's)")
    ap.add_argument("--tolerance", type=float, help="early-stop tolerance (default: the study's)")
    ap.add_argument("--prune", default="heads=0.25,ffn=0.5,layers=3",
                    help="the fixed student's pruning (heads, ffn, layers)")
    ap.add_argument("--test-rows", type=int, default=0, help="stratified test rows (0 = all)")
    ap.add_argument("--bootstrap", type=int, help="bootstrap resamples (default: the study's)")
    ap.add_argument("--out", default=str(RESULTS / "recovery_curve.json"))
    args = ap.parse_args()

    from nas_fair.objectives.scores import objective_names
    from nas_fair.spaces import compress
    from nas_fair.spaces.pruning import PruningConfig

    budgets = [int(s) for s in args.steps.split(",") if s.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    precisions = [v.strip() for v in args.precision.split(",") if v.strip()]
    if not budgets or any(b < 0 for b in budgets) or not set(variants) <= {"off", "on"}:
        raise SystemExit("--steps must be integers >= 0 and --variants a subset of off,on")
    if not precisions or not set(precisions) <= {"fp32", "bf16"}:
        raise SystemExit(f"--precision must be a subset of fp32,bf16, got {args.precision!r}")
    cfg = load_cfg(args)
    dropout = args.dropout or ("on" if cfg.search.recovery_dropout else "off")
    dropouts = [v.strip() for v in dropout.split(",") if v.strip()]
    if not dropouts or not set(dropouts) <= {"on", "off", "torch"}:
        raise SystemExit(f"--dropout must be a subset of on,off,torch, got {args.dropout!r}")
    settings = list(itertools.product(precisions, dropouts))
    try:
        seeds = [int(v) for v in (args.seeds or str(cfg.seed)).split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"--seeds takes comma-separated integers, got {args.seeds!r}") from None
    reduced = reduce_search(cfg, bootstrap=args.bootstrap)
    session = open_session(cfg, run_dir(args, cfg), args.threads)
    n_test = len(session.data.test)
    kept = shrink_test(session, args.test_rows)
    if kept != n_test:
        reduced["test_rows"] = [n_test, kept]
    tolerance = args.tolerance if args.tolerance is not None else cfg.search.recovery_tolerance
    prune = parse_prune(args.prune)
    student = compress(session.reference, {"pruning": PruningConfig(**prune)}, session.ctx)
    ref = session.score_reference()
    names = objective_names(cfg)
    rows: list[dict[str, Any]] = []
    for seed, budget, (precision, dropout) in itertools.product(seeds, budgets, settings):
        if budget == 0 and ((precision, dropout) != settings[0] or seed != seeds[0]):
            continue  # no training: the setting and seed change nothing
        done: dict[bool, dict[str, Any]] = {}
        for variant in sorted(variants, key=lambda v: v != "on"):  # "on" first: it may be "off"
            stop = variant == "on"
            prev = done.get(True)
            if not stop and prev is not None and prev["steps_run"] == budget:
                row = {**prev, "early_stop": False, "same_as_early_stop": True}
            elif budget == 0 and done:
                row = {**next(iter(done.values())), "early_stop": stop}
            else:
                row = one_run(session, student, budget, stop, tolerance, precision, dropout,
                              seed)
            row["show_seed"] = len(seeds) > 1
            done[stop] = row
            rows.append(row)
            pair_with_first(session, row, rows, settings[0])
            print(f"budget {budget:4d} {setting_label(row)} early stop {variant:>3}: "
                  f"{row['steps_run']:4d} steps "
                  f"({row['recover_s']:.0f}s)  {names[2]} {row['accuracy']:.3f} "
                  f"[{row['accuracy_ci'][0]:.3f}, {row['accuracy_ci'][1]:.3f}]  {names[3]} "
                  f"{row['bias']:.3f} [{_f(row['bias_ci'][0])}, {_f(row['bias_ci'][1])}]",
                  flush=True)
        out = Path(args.out)
        data = {"study": cfg.name, "prune": prune, "temperature": TEMPERATURE, "alpha": ALPHA,
                "lr": cfg.search.recovery_lr, "tolerance": tolerance, "threads": args.threads,
                "reduced": reduced, "objectives": names,
                "reference": {"accuracy": ref.accuracy, "accuracy_ci": ref.attrs["accuracy_ci"],
                              "bias": ref.bias, "bias_ci": ref.attrs["bias_ci"]},
                "rows": [{k: v for k, v in r.items() if k != "_record"} for r in rows]}
        write_json(out, data)  # after every budget: a long run keeps what it measured
    print(table([[r["budget"], setting_label(r), "on" if r["early_stop"] else "off",
                  r["steps_run"], r["recover_s"], r["accuracy"], _ci(r["accuracy_ci"]),
                  r["bias"], _ci(r["bias_ci"]), "yes" if r["collapsed"] else "no"]
                 for r in rows],
                ["budget", "recovery", "early stop", "steps run", "recover s", names[2],
                 "95% CI", names[3], "95% CI", "collapsed"]))
    for r in rows:
        if "paired" in r:
            p = r["paired"]
            print(f"budget {r['budget']} early stop {'on' if r['early_stop'] else 'off'}, "
                  f"{setting_label(r)} - {p['against']} (paired): {names[2]} "
                  f"{p['accuracy'][0]:+.3f} {_ci(p['accuracy'][1:])}, {names[3]} "
                  f"{p['bias'][0]:+.3f} {_ci(p['bias'][1:])}, recovery {r['recover_s']:.0f} s "
                  f"vs {p['against_recover_s']:.0f} s")
    print(f"reference: {names[2]} {ref.accuracy:.3f}, {names[3]} {ref.bias:.3f}")
    write_html(Path(args.out).with_suffix(".html"), figures(data),
               f"{cfg.name}: recovery curve of a fixed student ({args.prune})")


def dropout_mode(row: dict[str, Any]) -> str:
    """on, off or torch (rows written before the mask source was recorded: on or off)."""
    if not row.get("dropout", True):
        return "off"
    return "torch" if row.get("masks") == "torch" else "on"


def setting_label(row: dict[str, Any]) -> str:
    suffix = {"on": "", "off": " no dropout", "torch": " torch masks"}[dropout_mode(row)]
    label = f"{row['precision']}{suffix}"
    return f"{label} seed {row['seed']}" if row.get("show_seed") else label


def pair_with_first(session: Any, row: dict[str, Any], rows: list[dict[str, Any]],
                    first: tuple[str, str]) -> None:
    """This setting - the first setting, accuracy and primary bias on the same resampled rows
    (same budget and early stopping), into row["paired"]."""
    if (row["precision"], dropout_mode(row)) == first or row["budget"] == 0:
        return
    base = next((r for r in rows if (r["precision"], dropout_mode(r)) == first
                 and r["budget"] == row["budget"] and r["early_stop"] == row["early_stop"]
                 and r["seed"] == row["seed"]), None)
    if base is None:
        return
    row["paired"] = {**paired_objectives(session.cfg, row["_record"], base["_record"]),
                     "against": setting_label(base), "against_recover_s": base["recover_s"]}


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _ci(ci: list[float | None]) -> str:
    return f"[{_f(ci[0])}, {_f(ci[1])}]"


def figures(data: dict[str, Any]) -> list[Any]:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names = data["objectives"]
    fig = make_subplots(rows=1, cols=2, subplot_titles=(names[2], names[3]))
    settings = list(dict.fromkeys(setting_label(r) for r in data["rows"] if r["budget"]))
    palette = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
               "#7f7f7f")
    curves = [(stop, setting) for setting in settings for stop in (False, True)]
    for (stop, setting), color in zip(curves, itertools.cycle(palette)):
        rows = sorted((r for r in data["rows"] if r["early_stop"] == stop and (
            setting_label(r) == setting or r["budget"] == 0)), key=lambda r: r["steps_run"])
        if len(rows) <= sum(r["budget"] == 0 for r in rows):
            continue
        label = "early stop on" if stop else "early stop off (full budget)"
        if len(settings) > 1:
            label += f", {setting}"
        hover = [f"budget {r['budget']}, ran {r['steps_run']} steps" for r in rows]
        for col, key in ((1, "accuracy"), (2, "bias")):
            lo = [r[key] - (r[f"{key}_ci"][0] if r[f"{key}_ci"][0] is not None else r[key])
                  for r in rows]
            hi = [(r[f"{key}_ci"][1] if r[f"{key}_ci"][1] is not None else r[key]) - r[key]
                  for r in rows]
            fig.add_trace(go.Scatter(
                x=[r["steps_run"] for r in rows], y=[r[key] for r in rows], text=hover,
                mode="lines+markers" if not stop else "markers", name=label,
                legendgroup=label, showlegend=col == 1, marker=dict(color=color, size=9),
                error_y=dict(type="data", symmetric=False, array=hi, arrayminus=lo)),
                row=1, col=col)
            fig.add_hline(y=data["reference"][key], line_dash="dot", line_color="#555",
                          row=1, col=col)
    fig.update_xaxes(title_text="recovery steps run")
    fig.update_layout(title="Fixed student vs recovery steps (95% bootstrap intervals; dotted: "
                            "the reference)", height=500)
    figs = [fig]
    longest = max((r for r in data["rows"] if r["losses"]), key=lambda r: len(r["losses"]),
                  default=None)
    if longest is not None:
        loss = go.Figure(go.Scatter(y=longest["losses"], mode="lines", name="batch loss",
                                    line=dict(color="#c7c7c7")))
        stopped = [r for r in data["rows"] if r["early_stop"] and r["budget"] == longest["budget"]]
        checks = stopped[0]["checks"] if stopped and stopped[0]["checks"] else []
        if checks:
            loss.add_trace(go.Scatter(
                x=[c[0] for c in checks], y=[c[1] for c in checks], mode="lines+markers",
                name="early-stop checks: mean of the last window",
                text=[f"fell {100 * c[2]:.1f}% from the window before" for c in checks]))
            loss.add_vline(x=stopped[0]["steps_run"], line_dash="dash",
                           annotation_text=f"stopped at {stopped[0]['steps_run']}")
        loss.update_layout(title=f"Distillation loss, budget {longest['budget']}",
                           xaxis_title="step", yaxis_title="loss", height=400)
        figs.append(loss)
    return figs


if __name__ == "__main__":
    main()

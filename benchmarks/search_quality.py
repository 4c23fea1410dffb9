"""Does NSGA-II earn its keep? Hypervolume after N trials: NSGA-II vs random search vs TPE.

Each sampler runs the same number of trials on the same prepared study for several seeds
(``nsga2+anchors`` is NSGA-II exactly as ``nas-fair search`` configures it: the families'
anchor trials queued first, ``make_sampler`` with the population it sizes; ``nsga2`` is the same
without anchors, ``random+anchors`` random search after the same anchors; TPE is Optuna's
multivariate TPE; random is Optuna's RandomSampler).
Hypervolume is computed as ``nas-fair report`` does: the four objectives as ratios to the
reference model (``normalized``), reference point ``HV_REFERENCE_POINT`` on each, and only
feasible trials (not collapsed, above the accuracy floor) count.

To fit 3 samplers x 3 seeds in under an hour on 2 cores the study is reduced by default:
fewer recovery steps, a stratified subset of the test split, fewer bootstrap resamples and
latency repeats. The output says exactly what was reduced. A parameter set already measured in
this run is not measured again (``--no-cache`` to measure every trial). Latency is one of the
objectives: run it on an otherwise idle machine, or the runs measured under load lose volume.

    python benchmarks/search_quality.py [--trials 16] [--seeds 3] [--steps 100]
        [--test-rows 1000] [--bootstrap 200] [--latency-repeats 3] [--resume]

Writes benchmarks/results/search_quality.json (``--out``), updated after every run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from _common import (
    RESULTS,
    add_study_args,
    load_cfg,
    open_session,
    reduce_search,
    reference_dict,
    run_dir,
    shrink_test,
    table,
    write_json,
)

from nas_fair.search._optuna import named_constraints, stored_trial
from nas_fair.search.records import TrialRecord


def hv_curve(trials: list[Any], reference: list[float], dirs: list[str]) -> list[float]:
    """Hypervolume of the feasible front of the first k completed trials, for every k."""
    import numpy as np
    from optuna.trial import TrialState

    from nas_fair.search.front import pareto_front
    from nas_fair.search.report import HV_REFERENCE_POINT, hypervolume, normalized

    done = [t for t in trials if t.state == TrialState.COMPLETE]
    ref_pt = np.full(len(dirs), HV_REFERENCE_POINT)
    out = []
    for k in range(1, len(done) + 1):
        front = pareto_front(done[:k], dirs)  # feasible trials only
        if not front:
            out.append(0.0)
            continue
        pts = normalized(np.array([t.values for t in front], dtype=float), reference, dirs)
        out.append(hypervolume(pts, ref_pt))
    return out


def run_one(session: Any, reference: dict[str, Any], sampler: str, seed: int, n: int,
            cache: dict[frozenset, tuple[list[float], dict[str, float], dict[str, Any]]] | None,
            ) -> dict[str, Any]:
    import optuna

    from nas_fair.objectives.scores import directions
    from nas_fair.search.sampling import make_sampler, population_for
    from nas_fair.spaces import anchor_trials

    cfg = session.cfg
    # "<sampler>+anchors": the families' anchor trials first, as `nas-fair search` queues them
    # (population sized as it sizes it); the anchors are the same trials for every run.
    cfg.search.sampler, _, extra = sampler.partition("+")
    anchors = anchor_trials(session.space) if extra == "anchors" else []
    population = population_for(n, len(anchors))
    study = optuna.create_study(directions=directions(cfg),
                                sampler=make_sampler(cfg, population, seed))
    for params in anchors:
        study.enqueue_trial(params)
    hits = 0

    def objective(trial: optuna.Trial) -> list[float]:
        nonlocal hits
        for fam in session.space:  # the same suggestions run_trial makes (stored once)
            fam.suggest(trial)
        key = frozenset(trial.params.items())
        if cache is not None and key in cache:
            hits += 1
            values, constraints, attrs = cache[key]
            for k, v in constraints.items():
                trial.set_constraint(k, v)
            TrialRecord(constraints=list(constraints.values())).write(trial)
            attrs.write(trial)
            return values
        values = session.run_trial(trial, reference)
        if cache is not None:
            fr = stored_trial(trial.study, trial)
            # set_constraint stores "<prefix>:<name>" system attributes; replay them as set.
            cons = named_constraints(fr)
            rec = TrialRecord.from_trial(fr)
            attrs = TrialRecord(bias_ci=rec.bias_ci, accuracy_ci=rec.accuracy_ci,
                                collapse=rec.collapse, cost=rec.cost)
            cache[key] = (values, cons, attrs)
        return values

    t = time.perf_counter()
    study.optimize(objective, n_trials=n, catch=(Exception,), gc_after_trial=True)
    wall = time.perf_counter() - t
    dirs = directions(cfg)
    curve = hv_curve(study.trials, reference["values"], dirs)
    complete = [tr for tr in study.trials if tr.values is not None]
    feasible = [tr for tr in complete
                if TrialRecord.from_trial(tr).feasible]
    return {
        "sampler": sampler, "seed": seed, "hypervolume": curve[-1] if curve else 0.0,
        "hv_curve": curve, "completed": len(complete), "feasible": len(feasible),
        "failed": len(study.trials) - len(complete), "cache_hits": hits, "wall_s": wall,
        "trials": [{"number": tr.number, "values": tr.values, "params": tr.params,
                    "feasible": tr in feasible} for tr in complete],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_study_args(ap)
    ap.add_argument("--samplers", default="nsga2+anchors,nsga2,random+anchors,random,tpe",
                    help="comma-separated; '+anchors' queues the families' anchor trials first "
                         "(nas-fair's default: nsga2+anchors)")
    ap.add_argument("--trials", type=int, default=16, help="trials per run (default 16)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per sampler (default 3)")
    # At 40 steps three random bios trials out of three collapsed (no feasible front at all);
    # 100 keeps most trials feasible while 3 x 3 runs of 16 trials fit in about an hour.
    ap.add_argument("--steps", type=int, default=100,
                    help="recovery steps per trial (reduced; default 100, 0 = the study's)")
    ap.add_argument("--test-rows", type=int, default=1000,
                    help="stratified test rows kept (default 1000, 0 = all)")
    ap.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples (default 200)")
    ap.add_argument("--latency-repeats", type=int, default=3, help="default 3")
    ap.add_argument("--no-cache", action="store_true",
                    help="measure a repeated parameter set again instead of reusing it")
    ap.add_argument("--resume", action="store_true",
                    help="keep the runs already in --out (same settings) and do the rest")
    ap.add_argument("--out", default=str(RESULTS / "search_quality.json"))
    args = ap.parse_args()

    cfg = load_cfg(args)
    study_name = cfg.name
    reduced = reduce_search(cfg, steps=args.steps or None, bootstrap=args.bootstrap,
                            latency_repeats=args.latency_repeats)
    session = open_session(cfg, run_dir(args, cfg), args.threads)
    n_test = len(session.data.test)
    kept = shrink_test(session, args.test_rows)
    if kept != n_test:
        reduced["test_rows"] = [n_test, kept]
    # Saving every trial's model (for export) is no part of what is compared here.
    session._save_artifact = lambda *a, **k: None
    ref = reference_dict(session)
    settings = {"study": study_name, "trials": args.trials, "seeds": list(range(args.seeds)),
                "samplers": args.samplers.split(","), "threads": args.threads,
                "reduced": reduced, "cache": not args.no_cache,
                "hv_reference_point": 2.0, "objectives": _names(session)}
    print("reduced study: " + (", ".join(f"{k} {a} -> {b}" for k, (a, b) in reduced.items())
                               or "nothing"))
    out = Path(args.out)
    runs: list[dict[str, Any]] = []
    if args.resume and out.is_file():
        old = json.loads(out.read_text())
        if old.get("settings") == settings:
            runs = old.get("runs", [])
            print(f"resuming: {len(runs)} runs kept from {out}")
    cache: dict | None = None if args.no_cache else {}
    done = {(r["sampler"], r["seed"]) for r in runs}
    started = time.perf_counter()
    todo = [(s, seed) for seed in settings["seeds"] for s in settings["samplers"]
            if (s, seed) not in done]
    for i, (sampler, seed) in enumerate(todo):
        r = run_one(session, ref, sampler, seed, args.trials, cache)
        runs.append(r)
        spent = time.perf_counter() - started
        print(f"{sampler:>14} seed {seed}: hypervolume {r['hypervolume']:.4f} "
              f"({r['feasible']}/{r['completed']} feasible, {r['cache_hits']} cached, "
              f"{r['wall_s']:.0f}s; about {spent / (i + 1) * (len(todo) - i - 1) / 60:.0f} min "
              "left)", flush=True)
        write_json(out, {"settings": settings, "reference": ref["values"], "runs": runs,
                         "summary": summarize(runs)})
    summary = summarize(runs)
    rows = [[s, v["n"], v["mean"], v["std"], v["min"], v["max"], v["mean_feasible"]]
            for s, v in summary.items()]
    print(f"\nhypervolume after {args.trials} trials (feasible front, objectives / reference, "
          "reference point 2.0)")
    print(table(rows, ["sampler", "seeds", "mean", "std", "min", "max", "feasible"]))
    if "tpe" in settings["samplers"]:
        print("note: TPE samples its first trials at random (Optuna's n_startup_trials, 10 by "
              "default), so with the same seed its first 10 trials are random search's")
    write_json(out, {"settings": settings, "reference": ref["values"], "runs": runs,
                     "summary": summary})


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for sampler in dict.fromkeys(r["sampler"] for r in runs):
        hv = [r["hypervolume"] for r in runs if r["sampler"] == sampler]
        feas = [r["feasible"] for r in runs if r["sampler"] == sampler]
        out[sampler] = {"n": len(hv), "mean": statistics.fmean(hv),
                        "std": statistics.stdev(hv) if len(hv) > 1 else 0.0,
                        "min": min(hv), "max": max(hv), "values": hv,
                        "mean_feasible": statistics.fmean(feas)}
    return out


def _names(session: Any) -> list[str]:
    from nas_fair.objectives.scores import objective_names

    return objective_names(session.cfg)



if __name__ == "__main__":
    main()

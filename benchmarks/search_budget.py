"""Search methods at equal wall-clock: final feasible-front hypervolume, evaluations per hour.

Each method runs ``nas-fair search --budget <minutes>m`` exactly as a user would (in process:
``run_search``), into its own run folder, for each seed; the prepared reference and caches are
hard-linked from the study's run folder, so no run fine-tunes. Methods:

* ``mf``: the study as defined (the shipped ``bios`` is multi-fidelity: 75/225/675 steps, eta 3,
  NSGA-II with anchors); ``mf+tpe`` (or ``mf+random``) the same with another sampler;
* ``nsga2+anchors``: one fidelity (``fidelity_steps = []``, ``recovery_steps = 300``), NSGA-II
  with the families' anchors queued first, as before the multi-fidelity search;
* ``random``, ``tpe``: one fidelity, 300 steps, no anchors.

Hypervolume is ``nas-fair report``'s (objectives as ratios to the reference, reference point
``HV_REFERENCE_POINT``), over the feasible front of final (top-rung) results. The seed is the
sampler's (the study seed, and so the reference, stays the study's). Also printed per run:
completed evaluations per hour and whether the front holds a non-anchor model at least as good
as the combined anchor (FFN 25% + int8) on all four objectives.

    python benchmarks/search_budget.py [--minutes 30] [--seeds 0,1]
        [--methods mf,nsga2+anchors,random,tpe] [--series NAME] [--resume | --recompute]

Writes benchmarks/results/search_budget.json (``--series NAME``: search_budget_NAME.json, for
runs on another kind of machine) after every run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from _common import (
    RESULTS,
    add_study_args,
    load_cfg,
    machine,
    open_session,
    run_dir,
    table,
    write_json,
)

OUT = RESULTS / "search_budget.json"


def configure(cfg: Any, method: str) -> Any:
    cfg = copy.deepcopy(cfg)
    head, _, extra = method.partition("+")
    if head == "mf":  # the study's rungs, anchors and sampler; "mf+tpe" swaps the sampler
        if extra:
            cfg.search.sampler = extra
        return cfg
    cfg.search.fidelity_steps = []
    cfg.search.recovery_steps = 300
    cfg.search.sampler = head
    cfg.search.anchors = extra == "anchors"
    return cfg


def link_prepared(src: Path, dest: Path) -> None:
    """The prepared reference and caches, hard-linked (read-only use) into a new run folder."""
    dest.mkdir(parents=True, exist_ok=True)
    for part in ("reference", "cache"):
        if (src / part).is_dir():
            shutil.copytree(src / part, dest / part, copy_function=os.link, dirs_exist_ok=True)


def folder_for(study: str, method: str, seed: int, series: str = "") -> Path:
    tag = f"{series}-" if series else ""
    return Path("studies") / f"{study}-bench-{tag}{method.replace('+', '_')}-s{seed}"


def out_for(series: str) -> Path:
    """The series' JSON: one series per kind of machine, as runs compare only within one."""
    return RESULTS / f"search_budget_{series}.json" if series else OUT


def load(name: str, folder: Path) -> Any:
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'study.db'}")


def front_figures(study: Any, dirs: list[str], names: list[str]) -> dict[str, Any]:
    import numpy as np
    from optuna.trial import TrialState

    from nas_fair.objectives.scores import Scores
    from nas_fair.search.fidelity import fidelity_of, top_rung_trials
    from nas_fair.search.front import pareto_front
    from nas_fair.search.records import ReferenceRecord, TrialRecord
    from nas_fair.search.report import HV_REFERENCE_POINT, hypervolume, normalized

    ref = ReferenceRecord.from_study(study)
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    front = pareto_front(done, dirs)
    hv = 0.0
    if front:
        pts = normalized(np.array([t.values for t in front], dtype=float), ref.values, dirs)
        hv = hypervolume(pts, np.full(len(dirs), HV_REFERENCE_POINT))
    sign = [1.0 if d == "minimize" else -1.0 for d in dirs]
    # A promoted trial carries its candidate's number, not the anchor flag of the candidate's
    # first trial: anchors are told apart per candidate, and compared at the top rung.
    cand = {t.number: fidelity_of(t)["candidate"] for t in done}
    anchored = [t for t in done if TrialRecord.from_trial(t).anchor]
    anchors = {cand[t.number] for t in anchored}
    combined_cands = {cand[t.number] for t in anchored if t.params.get("pruning.ffn") == 0.25
                      and t.params.get("quantization.ffn_bits") == 8}
    combined = [t for t in top_rung_trials(done) if cand[t.number] in combined_cands]
    beats = [t.number for c in combined for t in front
             if cand[t.number] not in anchors and t.params != c.params
             and all(s * a <= s * b for s, a, b in zip(sign, t.values, c.values))]
    return {"hypervolume": hv, "front": [t.number for t in front],
            "front_values": {t.number: Scores.of_trial(t).values() for t in front},
            "anchor_candidates": sorted(anchors), "combined_anchor": [c.number for c in combined],
            "non_anchor_at_least_as_good": sorted(set(beats))}


def print_summary(done: list[dict[str, Any]], methods: list[str]) -> None:
    rows = []
    for method in methods:
        hvs = [r["hypervolume"] for r in done if r["method"] == method]
        rate = [r["evaluations_per_hour"] for r in done if r["method"] == method]
        if hvs:
            rows.append([method, f"{statistics.mean(hvs):.4f}",
                         f"{min(hvs):.4f}-{max(hvs):.4f}", f"{statistics.mean(rate):.0f}",
                         len(hvs)])
    print(table(rows, ["method", "mean HV", "seed range", "evaluations/h", "runs"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_study_args(ap)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--methods", default="mf,nsga2+anchors,random,tpe")
    ap.add_argument("--series", default="",
                    help="a name for a series of runs on another kind of machine: its own JSON "
                         "(search_budget_<name>.json) and run folders (default: the main one)")
    ap.add_argument("--resume", action="store_true", help="skip runs already in the JSON")
    ap.add_argument("--recompute", action="store_true",
                    help="run nothing: recompute the front figures of the runs in the JSON "
                         "from their run folders")
    args = ap.parse_args()
    import nas_fair.search.run as run
    from nas_fair.objectives.scores import directions, objective_names
    from nas_fair.search.sampling import make_sampler

    if args.series and not args.series.replace("_", "").isalnum():
        raise SystemExit(f"--series must be letters, digits and _, got {args.series!r}")
    out = out_for(args.series)
    cfg = load_cfg(args)
    settings = {"study": cfg.name, "minutes": args.minutes, "threads": args.threads}
    done: list[dict[str, Any]] = []
    if (args.resume or args.recompute) and out.is_file():
        saved = json.loads(out.read_text())
        done = saved["runs"]
        if args.recompute:  # the settings the runs were made with
            settings = saved["settings"]
    if args.recompute:
        for r in done:
            c = configure(cfg, r["method"])
            folder = folder_for(cfg.name, r["method"], r["seed"], args.series)
            r.update(front_figures(load(c.name, folder), directions(c), objective_names(c)))
        write_json(out, {"settings": settings, "runs": done})
        print_summary(done, args.methods.split(","))
        return
    here = machine()
    other = next((r["machine"] for r in done if r.get("machine", here) != here), None)
    if other is not None:
        raise SystemExit(f"--resume: {out} holds runs from another machine ({other['cpu']}, "
                         f"bf16 {other['bf16_native']}; this one: {here['cpu']}, bf16 "
                         f"{here['bf16_native']}); resume there, or move the file aside")
    if any("machine" not in r for r in done):
        print("note: runs without a recorded machine are in the JSON; compare them with these "
              "only if this is the same kind of machine", flush=True)
    base = run_dir(args, cfg)
    open_session(cfg, base, args.threads)  # prepares (fine-tunes once) in the study's folder
    seen = {(r["method"], r["seed"]) for r in done}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for method in args.methods.split(","):
            if (method, seed) in seen:
                continue
            c = configure(cfg, method)
            folder = folder_for(cfg.name, method, seed, args.series)
            shutil.rmtree(folder, ignore_errors=True)
            link_prepared(base, folder)
            # the sampler's seed is the run's; the study seed (and so the reference) stays
            run.make_sampler = lambda cf, pop, _s, seed=seed: make_sampler(cf, pop, seed)
            t = time.perf_counter()
            run.run_search(c, run.Budget(seconds=args.minutes * 60), run_dir=str(folder),
                           quiet=True, show=False)
            wall = time.perf_counter() - t
            study = load(c.name, folder)
            complete = [x for x in study.trials if x.values is not None]
            r = {"method": method, "seed": seed, "machine": here, "minutes": args.minutes,
                 "wall_s": wall,
                 "evaluations": len(complete),
                 "evaluations_per_hour": len(complete) / wall * 3600,
                 **front_figures(study, directions(c), objective_names(c))}
            done.append(r)
            print(f"{method:>14} seed {seed}: hypervolume {r['hypervolume']:.4f}, "
                  f"{r['evaluations']} evaluations ({r['evaluations_per_hour']:.0f}/h), "
                  f"non-anchor >= combined anchor: {r['non_anchor_at_least_as_good'] or 'none'}",
                  flush=True)
            write_json(out, {"settings": settings, "runs": done})
    print_summary(done, args.methods.split(","))

if __name__ == "__main__":
    main()

"""Where a trial's time goes: compress / recover / evaluate / latency / bookkeeping, trials per hour.

Reads the ``cost`` user attribute that every trial of a study stores (``--from-storage``, the
default when the study has trials), or runs ``--trials K`` trials itself with the current code
in a scratch storage (the study's own storage is never touched), reusing the run folder's
fine-tuned reference and caches. ``--replay`` runs stored trials' recipes again that way and
prints each phase now beside what was stored: the paired before/after of a code change.

    python benchmarks/trial_cost.py                          # the bios study's stored trials
    python benchmarks/trial_cost.py --trials 4 [--steps 450] [--no-early-stop]
    python benchmarks/trial_cost.py --replay 1,9,19   # the stored trials' recipes, run again
    python benchmarks/trial_cost.py --replay 1,9,19 --torch-masks   # dropout as torch draws it
    python benchmarks/trial_cost.py --config my.toml --run-dir /tmp/run --trials 2

Writes benchmarks/results/trial_cost.json (``--out`` to change).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import RESULTS, add_study_args, load_cfg, run_dir, shown_storage, table, write_json

from nas_fair.search.records import TrialRecord
from nas_fair.search.session import COST_PHASES as PHASES


def _cost(trial: Any) -> dict[str, float]:
    """The trial's "cost" record (a KeyError when it has none, as the stored dict's lookup)."""
    cost = TrialRecord.from_trial(trial).cost
    if cost is None:
        raise KeyError("cost")
    return cost


def stored_trials(storage: str, name: str) -> list[Any]:
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=name, storage=storage)
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if TrialRecord.from_trial(t).cost is not None]


def run_trials(cfg: Any, folder: Path, k: int, threads: int,
               replay: list[dict[str, Any]] | None = None) -> tuple[list[Any], str]:
    """K trials of the study run by ``nas-fair search``'s own driver into a scratch storage;
    with ``replay`` (trials' params), those recipes first, in order."""
    import torch

    from nas_fair.search.run import Budget, open_study, run_search

    torch.set_num_threads(threads)
    cfg.search.threads = threads
    scratch = Path(tempfile.mkdtemp(prefix="trial_cost-")) / "study.db"
    url = f"sqlite:///{scratch}"
    # Another name: the trials' saved models go to artifacts/<name>/ of the run folder, and must
    # not overwrite the real study's. The reference and caches are keyed without the name.
    real = cfg.name
    cfg.name = f"{real}-trial-cost"
    try:
        if replay:
            # A new study's anchors are queued to run first: the replayed recipes take their place.
            open_study(cfg, url, create=True, budget=Budget(trials=k), anchors=replay)
        run_search(cfg, Budget(trials=k), storage=url, run_dir=str(folder), quiet=True)
        return stored_trials(url, cfg.name), url
    finally:
        shutil.rmtree(folder / "artifacts" / cfg.name, ignore_errors=True)
        with contextlib.suppress(OSError):  # only if this run created it and left it empty
            (folder / "artifacts").rmdir()
        cfg.name = real


REPLAY_PHASES = ("recover_s", "mitigation_s", "evaluate_s", "total_s")


def replay_rows(before: list[Any], now: list[Any]) -> list[dict[str, Any]]:
    """Each replayed recipe's stored cost beside its cost now (the scratch study's i-th trial
    is the i-th replayed one; same params checked)."""
    rows = []
    for t in now:
        old = before[t.number]
        if t.params != old.params:
            raise RuntimeError(f"replayed trial {t.number} ran other params than trial "
                               f"{old.number}")
        a, b = _cost(old), _cost(t)
        rows.append({"stored_trial": old.number,
                     "stored": {p: a.get(p, 0.0) for p in REPLAY_PHASES},
                     "now": {p: b.get(p, 0.0) for p in REPLAY_PHASES},
                     "now_over_stored": b["total_s"] / a["total_s"],
                     "steps": {"stored": a.get("recovery_steps_run"),
                               "now": b.get("recovery_steps_run")}})
    return rows


def summarize(trials: list[Any]) -> dict[str, Any]:
    rows = []
    for t in trials:
        c = _cost(t)
        wall = None
        if t.datetime_start and t.datetime_complete:
            wall = (t.datetime_complete - t.datetime_start).total_seconds()
        # Trials from before early stopping ran their whole budget.
        steps = c.get("recovery_steps_run", t.params.get("distillation.steps"))
        recover = c.get("recover_s", 0.0) + c.get("mitigation_s", 0.0)
        rows.append({
            "trial": t.number, **{p: c.get(p, 0.0) for p in PHASES},
            "total_s": c.get("total_s"), "wall_s": wall,
            "recovery_steps_run": steps,
            "recovery_steps_budget": t.params.get("distillation.steps"),
            "s_per_recovery_step": recover / steps if steps else None,
        })
    keys = (*PHASES, "total_s", "wall_s", "recovery_steps_run", "s_per_recovery_step")
    summary: dict[str, Any] = {}
    for key in keys:
        vals = [r[key] for r in rows if r[key] is not None]
        if vals:
            summary[key] = {"mean": statistics.fmean(vals), "median": statistics.median(vals),
                            "min": min(vals), "max": max(vals)}
    wall = summary.get("wall_s", summary.get("total_s"))
    if wall:
        summary["trials_per_hour"] = 3600.0 / wall["mean"]
    # With several workers trials overlap: what the machine delivers is trials per hour over
    # the span from the first start to the last completion (one worker: about the same).
    timed = [t for t in trials if t.datetime_start and t.datetime_complete]
    if len(timed) > 1:
        span = (max(t.datetime_complete for t in timed)
                - min(t.datetime_start for t in timed)).total_seconds()
        workers = {json.dumps(TrialRecord.from_trial(t).worker, sort_keys=True) for t in timed}
        summary.update(span_s=span, span_trials=len(timed), workers=len(workers),
                       trials_per_hour_span=3600.0 * len(timed) / span,
                       seconds_per_trial_span=span / len(timed))
    return {"trials": rows, "summary": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_study_args(ap)
    ap.add_argument("--storage", help="read trials from this Optuna storage URL "
                                      "(default: the run folder's study.db)")
    ap.add_argument("--trials", type=int, default=0,
                    help="run this many trials now instead of reading stored ones")
    ap.add_argument("--steps", type=int, help="recovery step budget for --trials")
    ap.add_argument("--no-early-stop", action="store_true", help="--trials without early stop")
    ap.add_argument("--replay", help="comma-separated stored trial numbers: run their recipes "
                                     "again now, beside the stored cost")
    ap.add_argument("--torch-masks", action="store_true",
                    help="with --trials/--replay: dropout masks from torch's Bernoulli, as "
                         "before recovery drew them from random bits (a same-time baseline)")
    ap.add_argument("--out", default=str(RESULTS / "trial_cost.json"))
    args = ap.parse_args()
    if args.torch_masks:
        from nas_fair.spaces import recovery

        # recover() enters this context manager; torch's masks are what it runs without it.
        recovery.fast_dropout = lambda model: contextlib.nullcontext(False)

    cfg = load_cfg(args)
    folder = run_dir(args, cfg)
    settings: dict[str, Any] = {"study": cfg.name, "threads": args.threads}
    url = args.storage or f"sqlite:///{(folder / 'study.db').resolve()}"
    before: list[Any] = []
    if args.replay:
        try:
            wanted = [int(v) for v in args.replay.split(",")]
        except ValueError:
            sys.exit(f"--replay takes comma-separated trial numbers (e.g. 1,9,19), got "
                     f"{args.replay!r}")
        stored = {t.number: t for t in stored_trials(url, cfg.name)}
        missing = [n for n in wanted if n not in stored]
        if missing:
            sys.exit(f"--replay: no completed trial with a recorded cost numbered "
                     f"{', '.join(map(str, missing))} in {shown_storage(url)}")
        args.trials = len(wanted)
        before = [stored[n] for n in wanted]
        settings["replayed"] = wanted
    if args.trials > 0:
        if args.steps is not None:
            cfg.search.recovery_steps = args.steps
        if args.no_early_stop:
            cfg.search.recovery_early_stop = False
        cfg.validate()
        t = time.perf_counter()
        trials, url = run_trials(cfg, folder, args.trials, args.threads,
                                 [t.params for t in before] or None)
        settings.update(source="run now", storage=shown_storage(url), run_s=time.perf_counter() - t,
                        dropout_masks="torch" if args.torch_masks else "random bits",
                        recovery_steps=cfg.search.recovery_steps,
                        early_stop=cfg.search.recovery_early_stop,
                        tolerance=cfg.search.recovery_tolerance)
    else:
        if not args.storage and not (folder / "study.db").is_file():
            sys.exit(f"no study.db in {folder}: pass --storage URL or --trials K")
        trials = stored_trials(url, cfg.name)
        settings.update(source="stored trials", storage=shown_storage(url))
    if not trials:
        sys.exit("no completed trials with a recorded cost")
    result = summarize(trials)
    header = ["trial", "compress", "recover", "mitig.", "evaluate", "latency", "bookkeep",
              "total", "wall", "steps", "s/step"]
    rows = [[r["trial"], *(r[p] for p in PHASES), r["total_s"], r["wall_s"],
             r["recovery_steps_run"], r["s_per_recovery_step"]] for r in result["trials"]]
    s = result["summary"]
    rows.append(["mean", *(s.get(p, {}).get("mean") for p in PHASES),
                 s.get("total_s", {}).get("mean"), s.get("wall_s", {}).get("mean"),
                 s.get("recovery_steps_run", {}).get("mean"),
                 s.get("s_per_recovery_step", {}).get("mean")])
    print(f"{cfg.name}: {len(trials)} trials ({settings['source']}), seconds per phase")
    print(table(rows, header))
    if "trials_per_hour" in s:
        where = f", {args.threads} torch threads" if args.trials > 0 else ""
        print(f"trials per hour: {s['trials_per_hour']:.1f} (from the mean wall-clock time per "
              f"trial{where})")
    if "span_s" in s:
        print(f"over the trials' span ({s['span_trials']} trials in {s['span_s'] / 60:.1f} min, "
              f"{s['workers']} worker{'s' if s['workers'] != 1 else ''}): "
              f"{s['trials_per_hour_span']:.1f} trials per hour, one every "
              f"{s['seconds_per_trial_span']:.1f} s")
    if before:
        result["replay"] = replay_rows(before, trials)
        print("replayed: stored -> now, seconds (same recipe, same reference)")
        print(table([[r["stored_trial"], *(f"{r['stored'][p]:.1f} -> {r['now'][p]:.1f}"
                                          for p in REPLAY_PHASES), r["now_over_stored"]]
                     for r in result["replay"]],
                    ["trial", *REPLAY_PHASES, "total now/stored"]))
    write_json(Path(args.out), {**settings, **result})


if __name__ == "__main__":
    main()

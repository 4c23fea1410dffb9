"""What scoring a trial's metrics costs: accuracy and every recorded bias metric, with intervals.

A trial's predictions are scored by ``Session.metrics`` (the search's own code): the accuracy
metric's bootstrap interval, and for each of the study's recorded bias metrics a bootstrap
interval, a permutation p-value (absolute metrics) and the paired difference to the reference
(``--bootstrap`` resamples, the study's by default). ``--trials`` stand-in trials are scored in
turn: the reference's test predictions with a seeded ``--change`` share of rows (and of their
counterfactual predictions) set to random classes, so every one has other numbers.

Three ways, the same numbers (checked, then printed):

* without the memo (``objectives.stats`` as before it: resamples drawn and coding counted
  once per metric, the reference's tables recounted for every trial);
* with the memo emptied before each trial (what one metric shares with the others);
* with the memo kept across trials, as in a search (the reference's tables counted once).

    python benchmarks/metrics_cost.py [--trials 5] [--change 0.1]

Writes benchmarks/results/metrics_cost.json (``--out`` to change).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

from _common import RESULTS, add_study_args, load_cfg, open_session, run_dir, table, write_json

MODES = ("no memo (before)", "memo emptied per trial", "memo kept (a search)")


def stand_ins(session: Any, k: int, change: float) -> list[Any]:
    import numpy as np

    ref = session.ref_record
    rng = np.random.default_rng(0)
    out = []
    for _ in range(k):
        rows = rng.random(len(ref)) < change
        pred = ref.y_pred.copy()
        pred[rows] = rng.integers(0, session.data.num_labels, int(rows.sum()))
        cf = None if ref.y_pred_cf is None else ref.y_pred_cf.copy()
        if cf is not None:
            cf[rows] = pred[rows]
        out.append(dataclasses.replace(ref, y_pred=pred, y_pred_cf=cf))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_study_args(ap)
    ap.add_argument("--trials", type=int, default=5, help="stand-in trials scored per mode")
    ap.add_argument("--change", type=float, default=0.1,
                    help="share of rows whose prediction a stand-in changes")
    ap.add_argument("--bootstrap", type=int, help="resamples (default: the study's)")
    ap.add_argument("--out", default=str(RESULTS / "metrics_cost.json"))
    args = ap.parse_args()
    if args.trials < 1 or not 0 < args.change <= 1:
        raise SystemExit(f"--trials must be >= 1 and --change in (0, 1], got {args.trials}, "
                         f"{args.change}")

    from nas_fair.objectives import stats

    cfg = load_cfg(args)
    if args.bootstrap:
        cfg.search.bootstrap = args.bootstrap
    session = open_session(cfg, run_dir(args, cfg), args.threads)
    records = stand_ins(session, args.trials, args.change)
    memo = stats._memo
    seconds: dict[str, list[float]] = {}
    scores: dict[str, list[str]] = {}
    for mode in MODES:
        stats._MEMO.clear()
        if mode == MODES[0]:
            stats._memo = lambda key, make: make()  # every lookup a miss, nothing kept
        seconds[mode], scores[mode] = [], []
        try:
            for record in records:
                if mode == MODES[1]:
                    stats._MEMO.clear()
                t = time.perf_counter()
                result = session.metrics(record, paired=True)
                seconds[mode].append(time.perf_counter() - t)
                scores[mode].append(json.dumps(result, sort_keys=True, default=float))
        finally:
            stats._memo = memo
        print(f"{mode}: {' '.join(f'{s:.2f}' for s in seconds[mode])} s", flush=True)
    same = all(scores[m] == scores[MODES[0]] for m in MODES)
    base = statistics.fmean(seconds[MODES[0]])
    rows = [[m, statistics.fmean(seconds[m]), statistics.median(seconds[m]),
             statistics.fmean(seconds[m]) / base] for m in MODES]
    print(table(rows, ["mode", "mean s per trial", "median s", "mean / before"]))
    print(f"{len(session.recorded)} bias metrics, {cfg.search.bootstrap} resamples, "
          f"{len(session.ref_record)} test rows; scores identical in every mode: "
          f"{'yes' if same else 'NO'}")
    write_json(Path(args.out), {
        "study": cfg.name, "trials": args.trials, "change": args.change,
        "bootstrap": cfg.search.bootstrap, "metrics": session.recorded,
        "test_rows": len(session.ref_record), "seconds": seconds,
        "mean": {m: statistics.fmean(v) for m, v in seconds.items()}, "identical": same,
    })
    if not same:
        raise SystemExit("the modes gave different scores")


if __name__ == "__main__":
    main()

"""Do cheap rungs predict the top rung? Kendall tau per objective between each rung and the top.

Random candidates of the study's space (seeded) are each recovered through every rung of the
study's multi-fidelity schedule, continuing from the lower rung's checkpoint exactly as the
search does, and scored with the study's ``Session`` at every rung: the accuracy objective and
the bias objective (size and latency do not depend on the rung: same architecture). Then, per
objective and rung, Kendall's tau between that rung's values and the top rung's over the
candidates, with a bootstrap interval over candidates. Candidates whose student recovers
nothing (every family before quantization off) are the same model at every rung: they are
counted and left out, as they would only inflate tau.

    python benchmarks/fidelity_tau.py [--candidates 30] [--seed 0] [--time-limit 3600]
        [--steps 75,225,675]

Resumable: results go to benchmarks/results/fidelity_tau.json after every candidate, and a
second run continues with the candidates not yet done.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    RESULTS,
    add_study_args,
    load_cfg,
    open_session,
    run_dir,
    scores_along_recovery,
    table,
    write_json,
)

OUT = RESULTS / "fidelity_tau.json"
# Each scored candidate's test predictions at every rung (key c<index>_r<rung>), so that the
# rungs can be re-scored on subsets of the test rows without recovering anything again.
PREDICTIONS = RESULTS / "fidelity_tau_predictions.npz"


RESCORED = RESULTS / "fidelity_tau_rescored.json"


def rescore(cfg: Any, session: Any, shares: list[float]) -> None:
    """Kendall tau of each lower rung scored on a ``fidelity_test_share`` sample of the test
    rows (the top rung on every row), from the saved predictions; the same candidates on every
    row alongside (share 1.0)."""
    import json

    from nas_fair.objectives import ACCURACY, BIAS, EvalRecord
    from nas_fair.objectives.scores import bias_objective
    from nas_fair.search.fidelity import lower_rung_rows

    done = json.loads(OUT.read_text())
    steps = done["settings"]["steps"]
    preds = dict(np.load(PREDICTIONS))
    cands = [c for c in done["candidates"] if c["rungs"] is not None
             and all(f"c{c['index']}_r{r}" in preds for r in range(len(steps)))]
    test = session.data.test
    acc_m, bias_m = ACCURACY[cfg.objectives.accuracy], BIAS[cfg.objectives.bias]
    out: dict[str, Any] = {"candidates": [c["index"] for c in cands], "test_rows": len(test)}
    for share in [1.0, *shares]:
        rows = lower_rung_rows(test.labels, test.groups, share, cfg.seed)
        rows = np.arange(len(test)) if rows is None else rows
        values: dict[str, list[list[float]]] = {"accuracy": [], "bias": []}
        for c in cands:
            acc, bias = [], []
            for r in range(len(steps) - 1):
                rec = EvalRecord(test.labels[rows], preds[f"c{c['index']}_r{r}"][rows],
                                 groups=test.groups[rows], n_classes=session.data.num_labels)
                acc.append(acc_m(rec))
                bias.append(bias_objective(cfg, bias_m(rec)))
            values["accuracy"].append(acc)
            values["bias"].append(bias)
        if share == 1.0:  # every row: the predictions must give back the recorded values
            for obj in ("accuracy", "bias"):
                recorded = [[x[obj] for x in c["rungs"][:-1]] for c in cands]
                if not np.allclose(values[obj], recorded):
                    raise SystemExit(f"{PREDICTIONS} does not give back the recorded {obj}")
        summary = {}
        for obj in ("accuracy", "bias"):
            top = [c["rungs"][-1][obj] for c in cands]
            for r in range(len(steps) - 1):
                summary[f"{obj}/rung{r}"] = kendall([v[r] for v in values[obj]], top)
        out[str(share)] = {"rows": len(rows), "kendall": summary}
        print(f"share {share} ({len(rows)} rows): " + "  ".join(
            f"{k} {v['tau']:.2f} [{v['ci'][0]:.2f}, {v['ci'][1]:.2f}]" for k, v in summary.items()))
    write_json(RESCORED, out)


def save_predictions(index: int, preds: list[Any]) -> None:
    old = dict(np.load(PREDICTIONS)) if PREDICTIONS.is_file() else {}
    old.update({f"c{index}_r{r}": np.asarray(p, dtype=np.int8) for r, p in enumerate(preds)})
    tmp = PREDICTIONS.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **old)
    tmp.replace(PREDICTIONS)


def score_candidate(session: Any, params: dict[str, Any], steps: tuple[int, ...],
                    work: Path, predictions: list[Any]) -> list[dict[str, Any]] | None:
    """The candidate's accuracy and bias at every rung, or None if it recovers nothing."""
    from nas_fair.spaces import configs_from_params, off_configs

    configs = off_configs(session.space)
    configs.update(configs_from_params(params))
    return scores_along_recovery(session, configs, steps, work, predictions)


def kendall(a: list[float], b: list[float], *, n_boot: int = 2000, seed: int = 0,
            ) -> dict[str, Any]:
    """Kendall's tau-b of ``a`` and ``b`` with its p-value and a percentile bootstrap interval
    over the pairs (resampling candidates)."""
    from scipy.stats import kendalltau

    x, y = np.asarray(a, float), np.asarray(b, float)
    res = kendalltau(x, y)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(x), len(x))
        t = kendalltau(x[idx], y[idx]).statistic
        if np.isfinite(t):
            boots.append(t)
    lo, hi = (np.percentile(boots, [2.5, 97.5]) if boots else (np.nan, np.nan))
    return {"tau": float(res.statistic), "p": float(res.pvalue), "ci": [float(lo), float(hi)],
            "n": len(x)}


def summarize(done: list[dict[str, Any]], steps: tuple[int, ...]) -> dict[str, Any]:
    top = len(steps) - 1
    scored = [c for c in done if c["rungs"] is not None]
    summary: dict[str, Any] = {}
    for obj in ("accuracy", "bias"):
        for r in range(top):
            a = [c["rungs"][r][obj] for c in scored]
            b = [c["rungs"][top][obj] for c in scored]
            if len(a) >= 3:
                summary[f"{obj}/rung{r}"] = kendall(a, b)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_study_args(ap)
    ap.add_argument("--candidates", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-limit", type=float, default=3600.0, help="seconds (default 3600)")
    ap.add_argument("--steps", help="rung steps, e.g. 75,225,675 (default: the study's)")
    ap.add_argument("--rescore", metavar="SHARES",
                    help="recover nothing: re-score the lower rungs of the candidates done on "
                         "samples of the test rows, e.g. 0.25,0.5 (as [search] "
                         "fidelity_test_share draws them), into " + RESCORED.name)
    args = ap.parse_args()
    import optuna

    cfg = load_cfg(args)
    if args.rescore:
        rescore(cfg, open_session(cfg, run_dir(args, cfg), args.threads),
                [float(v) for v in args.rescore.split(",")])
        return
    steps = tuple(int(s) for s in args.steps.split(",")) if args.steps else \
        tuple(cfg.search.fidelity_steps)
    if len(steps) < 2:
        raise SystemExit("the study has no multi-fidelity schedule: pass --steps 75,225,675")
    cfg.search.fidelity_steps = list(steps)
    session = open_session(cfg, run_dir(args, cfg), args.threads)
    prior = {}
    if OUT.is_file():
        import json

        old = json.loads(OUT.read_text())
        if old.get("settings", {}).get("steps") == list(steps) and old["settings"]["seed"] == \
                args.seed:
            prior = {c["index"]: c for c in old["candidates"]}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.RandomSampler(seed=args.seed)
    study = optuna.create_study(directions=["minimize"] * 4, sampler=sampler)
    start = time.monotonic()
    done = []
    for i in range(args.candidates):
        trial = study.ask()
        for fam in session.space:
            fam.suggest(trial)
        params = dict(trial.params)
        study.tell(trial, [0.0] * 4)
        if i in prior:
            done.append(prior[i])
            continue
        if time.monotonic() - start > args.time_limit:
            print(f"time limit reached after {len(done)} candidates")
            break
        work = Path(tempfile.mkdtemp(prefix="nas-fair-tau-"))
        try:
            t = time.perf_counter()
            preds: list[Any] = []
            rungs = score_candidate(session, params, steps, work, preds)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        done.append({"index": i, "params": params, "rungs": rungs,
                     "seconds": round(time.perf_counter() - t, 1), "threads": args.threads})
        print(f"candidate {i}: " + ("recovers nothing (same model at every rung)" if rungs is None
              else " ".join(f"r{x['rung']} acc {x['accuracy']:.3f} bias {x['bias']:.3f}"
                            for x in rungs)), flush=True)
        if rungs is not None:
            save_predictions(i, preds)
        write_json(OUT, {"settings": {"study": cfg.name, "steps": list(steps), "seed": args.seed,
                                      "threads": args.threads},
                         "candidates": done, "kendall": summarize(done, steps)})
    summary = summarize(done, steps)
    rows = [[k, f"{v['tau']:.2f}", f"[{v['ci'][0]:.2f}, {v['ci'][1]:.2f}]", f"{v['p']:.3g}", v["n"]]
            for k, v in summary.items()]
    skipped = sum(c["rungs"] is None for c in done)
    print(f"{len(done)} candidates ({skipped} recover nothing and are left out); "
          f"rungs {list(steps)}; tau of each rung's values with the top rung's ({steps[-1]} steps)")
    print(table(rows, ["objective/rung", "tau", "95% CI", "p", "n"]))


if __name__ == "__main__":
    main()

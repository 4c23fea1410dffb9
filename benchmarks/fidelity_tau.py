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
import dataclasses
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import RESULTS, add_study_args, load_cfg, open_session, run_dir, table, write_json

OUT = RESULTS / "fidelity_tau.json"


def score_candidate(session: Any, params: dict[str, Any], steps: tuple[int, ...],
                    work: Path) -> list[dict[str, Any]] | None:
    """The candidate's accuracy and bias at every rung, or None if it recovers nothing."""
    from nas_fair.objectives.scores import bias_objective
    from nas_fair.spaces import compress, configs_from_params, off_configs
    from nas_fair.spaces.base import RecoveryRun
    from nas_fair.spaces.recovery import recovery_logs

    cfg = session.cfg
    out = []
    for r, budget in enumerate(steps):
        configs = off_configs(session.space)
        configs.update(configs_from_params(params))
        configs["distillation"] = dataclasses.replace(configs["distillation"], steps=budget)
        run = RecoveryRun(schedule_steps=steps[-1],
                          resume_from=work / f"rung-{r - 1}" if r else None,
                          save_state_to=work / f"rung-{r}" if r < len(steps) - 1 else None)
        t = time.perf_counter()
        model = compress(session.reference, configs, dataclasses.replace(session.ctx,
                                                                         recovery_run=run))
        recover_s = time.perf_counter() - t
        if r == 0 and not any(log["steps_run"] for log in recovery_logs(model)):
            return None
        record = session.evaluate(model)
        (acc, lo, hi), bias, collapse = session.metrics(record, paired=True)
        primary = bias[cfg.objectives.bias]
        out.append({"rung": r, "steps": budget, "accuracy": float(acc),
                    "accuracy_ci": [float(lo), float(hi)],
                    "bias": bias_objective(cfg, float(primary["value"])),
                    "bias_ci": [primary.get("ci_low"), primary.get("ci_high")],
                    "collapsed": bool(collapse["collapsed"]), "recover_s": round(recover_s, 1)})
        del model
    return out


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
    args = ap.parse_args()
    import optuna

    cfg = load_cfg(args)
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
            rungs = score_candidate(session, params, steps, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        done.append({"index": i, "params": params, "rungs": rungs,
                     "seconds": round(time.perf_counter() - t, 1)})
        print(f"candidate {i}: " + ("recovers nothing (same model at every rung)" if rungs is None
              else " ".join(f"r{x['rung']} acc {x['accuracy']:.3f} bias {x['bias']:.3f}"
                            for x in rungs)), flush=True)
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

"""No mitigation vs mitigation during vs after compression, at the same compression recipes.

For each fixed compression recipe below and each mitigation setting, the study's own Session
rebuilds the model (``Session.replay``, so the same code path as a search trial), evaluates it on
the held-out test split (through its post-processing, if any) and scores it: accuracy and every
recorded bias metric with 95% bootstrap intervals, plus the paired difference (same resampled
rows) to the same recipe without mitigation. Prints a table and writes JSON.

    python benchmarks/mitigation_comparison.py [--study bios | --config FILE] [--run-dir DIR]
        [--recipes NAME ...] [--settings NAME ...] [--recovery-steps N] [--mitigation-steps N]
        [--bootstrap N] [--threads N] [--out FILE]

Needs the study's fine-tuned reference (made by the first ``nas-fair search`` of the study, or
by this script on first use, which fine-tunes it). On the real model every row costs a recovery
run (minutes on 2 CPU cores). A recipe without distillation has no recovery to mitigate
"during", so there "during" runs the same separate pass as "after" (see spaces/mitigation.py).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from _common import bits

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DISTIL = {"distillation.temperature": 2.0, "distillation.alpha": 0.9}  # + the study's steps
RECIPES: dict[str, dict[str, Any]] = {
    "int8": bits(8),
    "low-rank .5/.5 + distil": {"lowrank.attention_rank": 0.5, "lowrank.ffn_rank": 0.5,
                                **DISTIL},
    "prune heads .25, ffn .5, 2 layers + distil + int8": {
        "pruning.heads": 0.25, "pruning.ffn": 0.5, "pruning.layers": 2, **DISTIL, **bits(8)},
}
TRAINING = {"mitigation.cda": True, "mitigation.oversample": "group",
            "mitigation.regularizer": "counterfactual", "mitigation.strength": 0.3}
SETTINGS: dict[str, dict[str, Any]] = {
    "none": {},
    "during": {**TRAINING, "mitigation.when": "during"},
    "after": {**TRAINING, "mitigation.when": "after"},
    "thresholds only": {"mitigation.thresholds": 1.0},
    "during + thresholds": {**TRAINING, "mitigation.when": "during",
                            "mitigation.thresholds": 1.0},
}


def _ci(row: dict[str, Any]) -> str:
    lo, hi = row.get("ci_low"), row.get("ci_high")
    if lo is None or hi is None:
        return f"{row['value']:.3f}"
    return f"{row['value']:.3f} [{lo:.3f}, {hi:.3f}]"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", default="bios")
    ap.add_argument("--config", help="a study TOML file (instead of --study)")
    ap.add_argument("--run-dir", help="the study's run folder (default studies/<name>)")
    ap.add_argument("--recipes", nargs="*", help=f"subset of: {', '.join(RECIPES)}")
    ap.add_argument("--settings", nargs="*", help=f"subset of: {', '.join(SETTINGS)}")
    ap.add_argument("--recovery-steps", type=int, help="distillation steps (default: study's)")
    ap.add_argument("--mitigation-steps", type=int, default=50,
                    help="length of the separate debiasing pass (default 50)")
    ap.add_argument("--bootstrap", type=int, help="resamples (default: the study's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="JSON output (default benchmarks/results/"
                                  "mitigation_comparison_<study>.json)")
    args = ap.parse_args(argv)

    import torch

    from nas_fair import postprocess
    from nas_fair.config import find_study, load_study
    from nas_fair.objectives import ACCURACY
    from nas_fair.objectives.stats import paired_difference
    from nas_fair.search.session import Session

    for what, chosen, known in (("recipe", args.recipes, RECIPES),
                                ("setting", args.settings, SETTINGS)):
        for name in chosen or []:
            if name not in known:
                raise SystemExit(f"unknown {what} {name!r}; known: {', '.join(known)}")
    torch.set_num_threads(args.threads)
    cfg = load_study(args.config or find_study(args.study))
    if args.bootstrap is not None:
        cfg.search.bootstrap = args.bootstrap
    steps = cfg.search.recovery_steps if args.recovery_steps is None else args.recovery_steps
    session = Session(cfg, Path(args.run_dir) if args.run_dir else Path("studies") / cfg.name,
                      quiet=True)
    session.prepare()
    n_boot = cfg.search.bootstrap
    acc_name = cfg.objectives.accuracy
    acc_metric = ACCURACY[acc_name]
    rows: list[dict[str, Any]] = []
    for recipe_name, recipe in RECIPES.items():
        if args.recipes and recipe_name not in args.recipes:
            continue
        base: dict[str, Any] = dict(recipe)
        if "distillation.temperature" in base:
            base["distillation.steps"] = steps
        base["mitigation.steps"] = args.mitigation_steps
        none_record = None
        for setting_name, setting in SETTINGS.items():
            if args.settings and setting_name not in args.settings and setting_name != "none":
                continue
            params = {**base, **setting}
            t = time.perf_counter()
            model = session.replay(params)
            build_s = time.perf_counter() - t
            record = session.evaluate(model)
            scores = session.score(model, record, paired=True)
            row: dict[str, Any] = {
                "recipe": recipe_name, "setting": setting_name, "params": params,
                "size_mb": scores.size_mb, "latency_ms": scores.latency_ms,
                "accuracy": {"metric": acc_name, "value": scores.accuracy,
                             "ci_low": scores.attrs["accuracy_ci"][0],
                             "ci_high": scores.attrs["accuracy_ci"][1]},
                "bias": scores.attrs["bias"],
                "build_s": round(build_s, 2),
            }
            post = postprocess.get(model)
            if post is not None:
                row["postprocess"] = post.to_dict()
            if none_record is None:
                none_record = record
            else:  # paired with the same recipe without mitigation: same resampled rows
                vs: dict[str, Any] = {}
                for name, metric in [(acc_name, acc_metric), *[(m, m) for m in session.recorded]]:
                    try:
                        d, lo, hi = paired_difference(metric, record, none_record, n=n_boot,
                                                      seed=cfg.seed)
                    except ValueError:
                        continue
                    vs[name] = {"diff": d, "diff_low": lo, "diff_high": hi}
                row["vs_none"] = vs
            rows.append(row)
            print(f"{recipe_name} / {setting_name}: {acc_name} {_ci(row['accuracy'])}, "
                  f"{cfg.objectives.bias} {_ci(row['bias'][cfg.objectives.bias])} "
                  f"({build_s:.0f}s)", flush=True)
    metrics = list(session.recorded)
    header = ["recipe", "setting", acc_name, *metrics]
    table = [[r["recipe"], r["setting"], _ci(r["accuracy"]),
              *[_ci(r["bias"][m]) if m in r["bias"] else "-" for m in metrics]] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table)]
    print()
    for line in [header, [("-" * w) for w in widths], *table]:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)))
    print(f"\npaired difference to the same recipe without mitigation "
          f"({acc_name}, {cfg.objectives.bias}; 95% interval):")
    for r in rows:
        if "vs_none" in r:
            parts = [f"{k} {v['diff']:+.3f} [{v['diff_low']:+.3f}, {v['diff_high']:+.3f}]"
                     for k, v in r["vs_none"].items() if k in (acc_name, cfg.objectives.bias)]
            print(f"  {r['recipe']} / {r['setting']}: " + "; ".join(parts))
    out = Path(args.out or f"benchmarks/results/mitigation_comparison_{cfg.name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "study": cfg.name, "threads": args.threads, "recovery_steps": steps,
        "mitigation_steps": args.mitigation_steps, "bootstrap": n_boot,
        "reference": {"accuracy": acc_metric(session.ref_record)}, "rows": rows,
    }, indent=2, default=float))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

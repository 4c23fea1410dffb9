"""The recovery curve of one recipe: accuracy and bias at points of its own recovery run.

The recipe (a ``recipe.json`` or flat parameters, as ``nas-fair compress`` takes them) is
applied to the study's reference with its whole pipeline (pruning, vocabulary, low-rank,
sharing, distillation, mitigation, quantization) and recovered for its ``distillation.steps``
in one schedule; at each budget of ``--steps`` the student is taken from that run (continuing
from the previous budget's checkpoint, as the search's rungs do), finished (quantized as the
recipe says) and scored with the study's ``Session``: the accuracy metric and the primary bias
metric with their 95% intervals, and whether the collapse rule fires. It shows whether the
recipe's recovery has settled.

    python benchmarks/recipe_curve.py --recipe benchmarks/results/headline_recipe.json
        [--steps 75,225,675,1000] [--out benchmarks/results/headline_curve.json]

``--steps`` defaults to the study's rungs below the recipe's steps, then the recipe's steps.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_study_args(ap)
    ap.add_argument("--recipe", required=True, help="recipe.json or flat parameters (JSON)")
    ap.add_argument("--steps", help="recovery budgets, ascending, the last = the whole run")
    ap.add_argument("--out", default=str(RESULTS / "recipe_curve.json"))
    args = ap.parse_args()
    from nas_fair.search.compress import read_recipe

    recipe = read_recipe(args.recipe)
    if "distillation" not in recipe.families or not recipe.families["distillation"].steps:
        raise SystemExit(f"{args.recipe} does not recover (no distillation.steps): no curve")
    total = recipe.families["distillation"].steps
    cfg = load_cfg(args)
    if args.steps:
        try:
            steps = tuple(int(s) for s in args.steps.split(","))
        except ValueError:
            raise SystemExit(f"--steps takes comma-separated integers, got {args.steps!r}") from None
    else:
        steps = tuple(s for s in cfg.search.fidelity_steps if s < total) + (total,)
    if any(b <= a for a, b in zip(steps, steps[1:])) or steps[0] <= 0:
        raise SystemExit(f"--steps must be positive and ascending, got {','.join(map(str, steps))}")
    session = open_session(cfg, run_dir(args, cfg), args.threads)
    ref = session.score_reference()
    work = Path(tempfile.mkdtemp(prefix="nas-fair-curve-"))
    t = time.perf_counter()
    try:
        rows = scores_along_recovery(session, dict(recipe.families), steps, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if rows is None:
        raise SystemExit(f"{args.recipe}: its student recovers nothing (no trainable cut)")
    write_json(Path(args.out), {
        "study": cfg.name, "recipe": recipe.params, "threads": args.threads, "steps": list(steps),
        "seconds": round(time.perf_counter() - t, 1),
        "reference": {"accuracy": ref.accuracy, "accuracy_ci": ref.attrs["accuracy_ci"],
                      "bias": ref.bias, "bias_ci": ref.attrs["bias_ci"]},
        "rows": rows})
    names = (cfg.objectives.accuracy, cfg.objectives.bias)
    print(table([[r["steps"], f"{r['accuracy']:.3f}",
                  f"[{r['accuracy_ci'][0]:.3f}, {r['accuracy_ci'][1]:.3f}]",
                  f"{r['accuracy'] / ref.accuracy:.1%}", f"{r['bias']:.3f}",
                  f"[{r['bias_ci'][0]:.3f}, {r['bias_ci'][1]:.3f}]",
                  "yes" if r["collapsed"] else "no"] for r in rows],
                ["steps", names[0], "95% CI", "kept", names[1], "95% CI", "collapsed"]))
    print(f"reference: {names[0]} {ref.accuracy:.3f}, {names[1]} {ref.bias:.3f}")


if __name__ == "__main__":
    main()

"""Two runs of one study, trial by trial: which trials ran the same recipe, and how their cost
per recovery step compares (the later run over the earlier one).

Recipes are compared in the two Optuna storages; the costs are the two runs' ``trial_cost.py``
outputs. With the same sampler seed NSGA-II draws the same recipes as long as the scores rank
alike, so the pairs isolate the code or the machine from the draw.

    python benchmarks/compare_runs.py --before sqlite:///studies/bios/study-old.db
        --before-cost benchmarks/results/trial_cost_old.json [--after ...] [--after-cost ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from _common import RESULTS, table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", default="bios", help="study name (default: bios)")
    ap.add_argument("--before", required=True, help="storage URL of the earlier run")
    ap.add_argument("--after", default="sqlite:///studies/bios/study.db",
                    help="storage URL of the later run (default: the bios run folder's)")
    ap.add_argument("--before-cost", required=True, help="trial_cost.py JSON of the earlier run")
    ap.add_argument("--after-cost", default=str(RESULTS / "trial_cost.json"),
                    help="trial_cost.py JSON of the later run")
    args = ap.parse_args()

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    before, after = (optuna.load_study(study_name=args.study, storage=url).trials
                     for url in (args.before, args.after))
    costs = [{r["trial"]: r for r in json.loads(Path(p).read_text())["trials"]}
             for p in (args.before_cost, args.after_cost)]
    rows, ratios = [], []
    for b, a in zip(before, after):
        same = b.params == a.params
        steps = [c.get(a.number, {}).get("s_per_recovery_step") for c in costs]
        ratio = steps[1] / steps[0] if same and all(steps) else None
        if ratio is not None:
            ratios.append(ratio)
        rows.append([a.number, "yes" if same else "no", steps[0], steps[1], ratio])
    print(table(rows, ["trial", "same recipe", "s/step before", "s/step after", "after/before"]))
    print(f"{sum(r[1] == 'yes' for r in rows)} of {len(rows)} trials ran the same recipe; "
          f"{len(ratios)} of those recovered: median cost per step after/before "
          f"{statistics.median(ratios):.2f}" if ratios else "no recovered pair")


if __name__ == "__main__":
    main()

"""Pareto tables: computed as data first, then drawn (text here, plotly in the report)."""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from nas_fair.search.study import OBJECTIVE_KEYS, pareto_front


def _ratio(value: float, ref: float) -> float | None:
    return None if not ref else value / ref


def trial_row(values: list[float], attrs: dict[str, Any], reference: dict[str, Any],
              names: list[str]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for key, name, value, ref in zip(OBJECTIVE_KEYS, names, values, reference["values"]):
        row[key] = {"name": name, "value": value, "ratio": _ratio(value, ref)}
    row["bias"]["ci"] = attrs.get("bias_ci")
    row["accuracy"]["ci"] = attrs.get("accuracy_ci")
    row["collapsed"] = bool((attrs.get("collapse") or {}).get("collapsed", False))
    row["feasible"] = all(c <= 0 for c in attrs.get("constraints", [-1]))
    row["params_count"] = attrs.get("params")
    return row


def pareto_rows(study: optuna.Study, dirs: list[str], names: list[str]) -> dict[str, Any]:
    reference = study.user_attrs["reference"]
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    front = pareto_front(trials, dirs)
    ref_row = trial_row(reference["values"], reference, reference, names)
    rows = []
    for t in sorted(front, key=lambda t: t.values[0]):
        row = trial_row(list(t.values), t.user_attrs, reference, names)
        row["trial"] = t.number
        row["recipe"] = t.params
        rows.append(row)
    costs = [t.user_attrs.get("cost", {}) for t in trials]
    keys = ("compress_s", "recover_s", "evaluate_s", "latency_s", "bookkeeping_s", "total_s")
    mean_cost = {k: sum(c.get(k, 0.0) for c in costs) / len(costs) for k in keys} if costs else {}
    return {"study": study.study_name, "objectives": names, "directions": dirs,
            "completed_trials": len(trials), "reference": ref_row, "pareto": rows,
            "mean_trial_cost_s": mean_cost}


def _cell(obj: dict[str, Any], digits: int) -> str:
    v = obj["value"]
    r = obj["ratio"]
    text = f"{v:.{digits}f}"
    return text if r is None else f"{text} ({r:.2f}x)"


def render_table(result: dict[str, Any]) -> str:
    names = result["objectives"]
    header = ["trial", f"{names[0]}", f"{names[1]}", f"{names[2]}", f"{names[3]} [95% CI]", "note"]
    lines = []

    def fmt(label: str, row: dict[str, Any], note: str) -> list[str]:
        ci = row["bias"].get("ci") or [None, None]
        ci_text = "" if ci[0] is None else f" [{ci[0]:.3f}, {ci[1]:.3f}]"
        return [label, _cell(row["size_mb"], 1), _cell(row["latency_ms"], 1),
                _cell(row["accuracy"], 3), f"{row['bias']['value']:.3f}{ci_text}", note]

    lines.append(fmt("ref", result["reference"], "reference (uncompressed)"))
    for row in result["pareto"]:
        note = "collapsed" if row["collapsed"] else ("" if row["feasible"] else "infeasible")
        lines.append(fmt(str(row["trial"]), row, note))
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    out = [f"Pareto front of study {result['study']!r} "
           f"({len(result['pareto'])} of {result['completed_trials']} completed trials; "
           "ratios are to the reference)"]
    out.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    out.append("  ".join("-" * w for w in widths))
    out.extend("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)
    cost = result.get("mean_trial_cost_s") or {}
    if cost:
        parts = ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in cost.items() if k != "total_s")
        out.append(f"mean trial cost: {cost['total_s']:.1f}s ({parts})")
    return "\n".join(out)


def format_trial_line(trial: FrozenTrial, reference: dict[str, Any], names: list[str],
                      on_front: bool) -> str:
    row = trial_row(list(trial.values), trial.user_attrs, reference, names)
    cost = trial.user_attrs.get("cost", {})
    flags = []
    if on_front:
        flags.append("on front")
    if row["collapsed"]:
        flags.append("collapsed")
    elif not row["feasible"]:
        flags.append("infeasible")
    return (
        f"trial {trial.number:>3}  {names[0]} {_cell(row['size_mb'], 1)}  "
        f"{names[1]} {_cell(row['latency_ms'], 1)}  {names[2]} {_cell(row['accuracy'], 3)}  "
        f"{names[3]} {row['bias']['value']:.3f}  {cost.get('total_s', 0):.0f}s"
        + (f"  [{', '.join(flags)}]" if flags else "")
    )

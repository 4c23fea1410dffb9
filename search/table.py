"""Pareto tables: computed as data first, then drawn (text here, plotly in the report).

The table lists the feasible Pareto front first, then the infeasible trials that no other trial
dominates (they would be on the front without the constraints), each marked with the
constraints it violates, so that a "better" model excluded for collapse or a quality floor is
visible rather than silently missing.
"""

from __future__ import annotations

import math
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from nas_fair.config import StudyConfig
from nas_fair.errors import UserError, one_of
from nas_fair.objectives.scores import OBJECTIVE_KEYS, Scores, limit_constraints
from nas_fair.postprocess import DISPARATE_TREATMENT
from nas_fair.search.fidelity import FIDELITY_ATTR, fidelity_of, top_rung_trials
from nas_fair.search.front import pareto_front
from nas_fair.search.records import ReferenceRecord, StudyRecord, TrialRecord

NEEDS_GROUP_NOTE = "needs the sensitive attribute at inference"

# --sort accepts these short names as well as the study's own objective names.
SORT_KEYS = ("size", "latency", "accuracy", "bias")


def _ratio(value: float, ref: float) -> float | None:
    return None if not ref else value / ref


def trial_constraints(trial: FrozenTrial) -> dict[str, float]:
    """Constraint values by name (<= 0 is satisfied).

    ``trial.set_constraint(name, value)`` stores them as named system attributes, which
    ``FrozenTrial.constraints`` reads back; trials from before that keep only the unnamed list in
    the ``constraints`` user attribute.
    """
    named = dict(getattr(trial, "constraints", None) or {})
    if named:
        return {k: float(v) for k, v in named.items()}
    values = TrialRecord.from_trial(trial).constraints or []
    return {f"constraint_{i}": float(v) for i, v in enumerate(values)}


def violated(constraints: dict[str, float]) -> list[str]:
    return [k for k, v in constraints.items() if v > 0]


def status_note(row: dict[str, Any]) -> str:
    """'' for a feasible trial, else 'collapsed' and/or 'infeasible: <constraints>'."""
    names = list(row.get("violated") or [])
    parts = []
    if row.get("collapsed") or "collapsed" in names:
        parts.append("collapsed")
        names = [n for n in names if n != "collapsed"]
    if names:
        parts.append("infeasible: " + ", ".join(names))
    elif not parts and not row.get("feasible", True):
        parts.append("infeasible")
    return "; ".join(parts)


def display_note(row: dict[str, Any]) -> str:
    """What the table's note column shows: the status, and whether predicting needs the
    sensitive attribute (group-aware decision offsets)."""
    note = row.get("note", status_note(row))
    if row.get("needs_group"):
        note = f"{note}; {NEEDS_GROUP_NOTE}" if note else NEEDS_GROUP_NOTE
    return note


def trial_row(values: list[float], attrs: TrialRecord | ReferenceRecord | dict[str, Any],
              reference: ReferenceRecord | dict[str, Any], names: list[str],
              constraints: dict[str, float] | None = None) -> dict[str, Any]:
    """A trial's (or the reference's) table row; records or their stored dictionaries."""
    rec = attrs if isinstance(attrs, ReferenceRecord) else TrialRecord.coerce(attrs)
    row: dict[str, Any] = {}
    ref_values = ReferenceRecord.coerce(reference).values or []
    for key, name, value, ref in zip(OBJECTIVE_KEYS, names, values, ref_values):
        row[key] = {"name": name, "value": value, "ratio": _ratio(value, ref)}
    row["bias"]["ci"] = rec.bias_ci
    row["accuracy"]["ci"] = rec.accuracy_ci
    row["collapsed"] = rec.collapsed
    if constraints is None:
        stored = rec.constraints if isinstance(rec, TrialRecord) else None
        constraints = {f"constraint_{i}": float(v) for i, v in enumerate(stored or [])}
    row["constraints"] = constraints
    row["violated"] = violated(constraints)
    row["feasible"] = not row["violated"]
    row["params_count"] = rec.params
    # group-aware decision offsets: predicting needs each row's sensitive attribute
    row["needs_group"] = isinstance(rec, TrialRecord) and bool(rec.postprocess)
    return row


def sort_choices(names: list[str]) -> dict[str, int]:
    """Every accepted --sort value and the objective it means (a signed bias also bare)."""
    choices = {k: j for j, k in enumerate(SORT_KEYS)}
    for j, name in enumerate(names):
        choices.setdefault(name, j)
        choices.setdefault(name.strip("|"), j)
    return choices


def sort_index(value: str, names: list[str]) -> int:
    choices = sort_choices(names)
    if value not in choices:
        raise one_of("--sort", value, choices)
    return choices[value]


def check_limits(max_bias_increase: float | None, min_accuracy: float | None) -> None:
    """The filters' rules, checked before the study is opened."""
    if max_bias_increase is not None and not (math.isfinite(max_bias_increase)
                                              and max_bias_increase >= 0):
        raise UserError(f"--max-bias-increase must be a finite number >= 0, "
                        f"got {max_bias_increase}")
    if min_accuracy is not None and not (math.isfinite(min_accuracy) and 0 <= min_accuracy <= 1):
        raise UserError(f"--min-accuracy must be a number in [0, 1], got {min_accuracy}")


def rung_counts(trials: list[FrozenTrial]) -> dict[int, int]:
    """Complete results per rung of a multi-fidelity study ({} for a single-fidelity one)."""
    counts: dict[int, int] = {}
    for t in trials:
        if isinstance(t.user_attrs.get(FIDELITY_ATTR), dict):
            r = fidelity_of(t)["rung"]
            counts[r] = counts.get(r, 0) + 1
    return counts


def pareto_rows(study: optuna.Study, dirs: list[str], names: list[str], *,
                sort: str = "size", cfg: StudyConfig | None = None,
                max_bias_increase: float | None = None,
                min_accuracy: float | None = None) -> dict[str, Any]:
    """The table as data: the feasible front, then the non-dominated infeasible trials.

    The filters keep trials that pass them (the same rule as the search's constraints,
    ``limit_constraints``) and the front is computed among those, as a search run with these
    limits would have it. Each group is sorted best first by the objective ``sort`` names.
    """
    check_limits(max_bias_increase, min_accuracy)
    key = sort_index(sort, names)
    filters = {k: v for k, v in (("max_bias_increase", max_bias_increase),
                                 ("min_accuracy", min_accuracy)) if v is not None}
    if filters and cfg is None:
        raise ValueError("filters need the study's configuration (the bias metric's sign)")
    ref = ReferenceRecord.from_study(study)
    reference = ref.to_attrs()  # the stored dict, as limit_constraints takes it
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    trials = [t for t in trials if t.values is not None]
    kept = trials
    if filters:
        assert cfg is not None

        def passes(t: FrozenTrial) -> bool:
            s = Scores.of_trial(t)
            cons = limit_constraints(cfg, s.accuracy, s.bias, TrialRecord.from_trial(t).bias_ci,
                                     reference, max_bias_increase=max_bias_increase,
                                     min_accuracy=min_accuracy)
            return all(v <= 0 for v in cons.values())

        kept = [t for t in trials if passes(t)]
    retimed = StudyRecord.from_study(study).retimed or {}
    rungs = rung_counts(kept)
    shown = kept
    provisional = None
    if rungs and not top_rung_trials(kept):
        # No candidate has finished its recovery yet: show the highest rung's front, as such.
        provisional = max(rungs)
        shown = [t for t in kept if fidelity_of(t)["rung"] == provisional]
    final = provisional is None
    feasible = pareto_front(shown, dirs, final_only=final)
    feasible_numbers = {t.number for t in feasible}
    infeasible = [t for t in pareto_front(shown, dirs, feasible_only=False, final_only=final)
                  if t.number not in feasible_numbers
                  and violated(trial_constraints(t))]
    sign = 1.0 if dirs[key] == "minimize" else -1.0

    def rows(group: list[FrozenTrial], on_front: bool) -> list[dict[str, Any]]:
        out = []
        for t in sorted(group, key=lambda t: (sign * t.values[key], t.number)):
            row = trial_row(list(t.values), TrialRecord.from_trial(t), ref, names,
                            trial_constraints(t))
            row["trial"] = t.number
            row["on_front"] = on_front
            row["note"] = status_note(row)
            if provisional is not None:
                row["note"] = "; ".join(filter(None, [row["note"],
                                                      f"rung {provisional}, provisional"]))
            row["recipe"] = t.params
            if str(t.number) in retimed:
                row["latency_retimed"] = retimed[str(t.number)]
            fid = TrialRecord.from_trial(t).fidelity
            if fid is not None:
                row["rung"] = fidelity_of(t)["rung"]
                row["recovery_steps"] = fid.get("steps")
            out.append(row)
        return out

    ref_row = trial_row(ref.values or [], ref, ref, names, {})
    costs = [TrialRecord.from_trial(t).cost or {} for t in trials]
    cost_keys = ("compress_s", "recover_s", "evaluate_s", "latency_s", "bookkeeping_s", "total_s")
    mean_cost = ({k: sum(c.get(k, 0.0) for c in costs) / len(costs) for k in cost_keys}
                 if costs else {})
    return {"study": study.study_name, "objectives": names, "directions": dirs,
            "sort": names[key], "filters": filters,
            "completed_trials": len(trials), "passing_filters": len(kept),
            "reference": ref_row,
            # feasible front first, then the infeasible trials no trial dominates
            "pareto": rows(feasible, True) + rows(infeasible, False),
            "feasible_on_front": len(feasible), "infeasible_not_dominated": len(infeasible),
            "mean_trial_cost_s": mean_cost,
            # multi-fidelity studies: results per rung, and the rung shown while none is final
            "evaluations_per_rung": {str(k): v for k, v in sorted(rungs.items())},
            "provisional_rung": provisional}


def _num(v: float, digits: int) -> str:
    """``digits`` decimals, but 3 significant digits where those would show too few (tiny
    models: 0.0365 MB, not 0.0)."""
    return f"{v:.{digits}f}" if v == 0 or abs(v) >= 10 ** (1 - digits) else f"{v:.3g}"


def _cell(obj: dict[str, Any], digits: int) -> str:
    r = obj["ratio"]
    text = _num(obj["value"], digits)
    return text if r is None else f"{text} ({r:.2f}x)"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _filter_text(filters: dict[str, float]) -> str:
    return " ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in filters.items())


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
        lines.append(fmt(str(row["trial"]), row, display_note(row)))
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    n_feasible = result.get("feasible_on_front", len(result["pareto"]))
    n_infeasible = result.get("infeasible_not_dominated", 0)
    filters = result.get("filters") or {}
    out = [f"Pareto front of study {result['study']!r} "
           f"({n_feasible} feasible of {result['completed_trials']} completed trials, "
           f"best {result.get('sort', names[0])} first; ratios are to the reference)"]
    out.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    out.append("  ".join("-" * w for w in widths))
    body = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    out.append(body[0])
    out.extend(body[1:1 + n_feasible])
    if n_infeasible:
        out.append("  ".join("-" * w for w in widths))
        out.extend(body[1 + n_feasible:])
    if filters and not result.get("passing_filters"):
        out.append(f"no trial passes {_filter_text(filters)} "
                   f"(0 of {result['completed_trials']} completed trials)")
    else:
        count = f"{_plural(n_feasible, 'feasible trial')} on the front"
        if n_infeasible:
            count += (f", then {_plural(n_infeasible, 'infeasible trial')} that no trial "
                      "dominates (excluded by the constraints in the note)")
        if filters:
            count += (f"; {_filter_text(filters)} kept {result['passing_filters']} of "
                      f"{result['completed_trials']} completed trials")
        out.append(count)
    if any(row.get("needs_group") for row in result["pareto"]):
        out.append(f"{NEEDS_GROUP_NOTE}: {DISPARATE_TREATMENT}")
    again = [(row["trial"], row["latency_retimed"]) for row in result["pareto"]
             if row.get("latency_retimed")]
    if again:
        out.append(f"{names[1]} re-timed side by side against the reference at the end "
                   "(ratio to the reference per backend): " + ", ".join(
                       f"trial {n} {r['latency_ms']:.1f} ("
                       + ", ".join(f"{k} {v['ratio']:.2f}x"
                                   for k, v in (r.get("backends") or {}).items()) + ")"
                       for n, r in again))
    per_rung = result.get("evaluations_per_rung") or {}
    if per_rung:
        out.append("evaluations per rung (multi-fidelity; the front holds top-rung results): "
                   + ", ".join(f"rung {k}: {v}" for k, v in per_rung.items()))
    if result.get("provisional_rung") is not None:
        out.append(f"no candidate has reached the top rung yet: this is rung "
                   f"{result['provisional_rung']}'s front, provisional (shorter recovery); "
                   "run the search longer for final results")
    cost = result.get("mean_trial_cost_s") or {}
    if cost:
        parts = ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in cost.items() if k != "total_s")
        out.append(f"mean trial cost: {cost['total_s']:.1f}s ({parts})")
    return "\n".join(out)


def format_trial_line(trial: FrozenTrial, reference: dict[str, Any], names: list[str],
                      on_front: bool) -> str:
    rec = TrialRecord.from_trial(trial)
    row = trial_row(list(trial.values), rec, reference, names, trial_constraints(trial))
    cost = rec.cost or {}
    flags = ["on front"] if on_front else []
    if rec.fidelity is not None:
        f = rec.fidelity
        flags.append("final at once: no recovery, the same model at every rung"
                     if f.get("independent") else
                     f"rung {f['rung']} of 0-{f.get('top', '?')}, {f.get('steps', '?')} steps")
    if rec.same_recipe_as is not None:
        flags.append(f"same recipe as trial {rec.same_recipe_as}: scores reused")
    note = display_note(row)
    if note:
        flags.append(note)
    return (
        f"trial {trial.number:>3}  {names[0]} {_cell(row['size_mb'], 1)}  "
        f"{names[1]} {_cell(row['latency_ms'], 1)}  {names[2]} {_cell(row['accuracy'], 3)}  "
        f"{names[3]} {row['bias']['value']:.3f}  {cost.get('total_s', 0):.0f}s"
        + (f"  [{', '.join(flags)}]" if flags else "")
    )

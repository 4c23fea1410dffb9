"""Multi-fidelity search: a rung schedule and asynchronous MO-ASHA promotion on Optuna storage.

A candidate (one recipe) is first scored after a short recovery (rung 0). Whenever results
arrive at rung ``r``, the candidates in the top ``1/eta`` of that rung by the multi-objective
order (feasible first; non-dominated sorting, then crowding distance; MO-ASHA, Schmucker et
al. 2021) that are not yet promoted get a *ticket* for rung ``r + 1``: a queued Optuna trial
with the same parameters and a ``fidelity`` user attribute ``{"rung", "candidate",
"promoted_from"}``. Optuna cannot prune multi-objective trials, so this is nas-fair's own
logic; the ranking (:func:`rank`, :func:`promotable`) is pure and needs no Optuna.

Storage invariant (safe with ``--jobs``, several PostgreSQL workers and SIGKILL anywhere):

* a ticket is created in one storage call (``enqueue_trial``: state, parameters and the
  ``fidelity`` attribute in one transaction), so no half-made claim exists;
* the *canonical* ticket of (candidate, rung) is the one with the lowest trial id among those
  that are WAITING, RUNNING or COMPLETE. Two workers may both create a ticket in a race; only
  the canonical one is run, every other one is failed as ``duplicate_of`` when a worker pops it
  (:func:`check_ticket`), and checked again before its values are written, so at most one
  result per (candidate, rung) is ever recorded;
* promotion is re-derived from storage on every pass (:func:`claim_promotions`): a ticket whose
  worker was killed is failed (``fail_dead_local_trials``) and either its retry (which keeps
  the ``fidelity`` attribute) or the next pass's fresh ticket takes its place. A promotion is
  therefore never lost (a promotable candidate without a live or complete ticket is claimed
  again) and never done twice (only the canonical ticket runs or records values).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas_fair.errors import UserError
from nas_fair.search._optuna import trial_id
from nas_fair.search.records import TrialRecord
from nas_fair.spaces.base import RecoveryRun
from nas_fair.spaces.recovery_state import JSON_FILE

if TYPE_CHECKING:  # the ranking needs no Optuna
    import optuna
    from optuna.trial import FrozenTrial

FIDELITY_ATTR = "fidelity"
DUPLICATE_ATTR = "duplicate_of"


@dataclass(frozen=True)
class Rungs:
    """Recovery steps per rung (strictly increasing, each >= 1) and the reduction factor eta:
    the top ``1/eta`` of a rung's results are promoted to the next one."""

    steps: tuple[int, ...] = (75, 150, 300, 600)
    eta: int = 3
    # Indices of the objectives promotion ranks on (None: all); e.g. without the bias objective
    # when a cheap rung's bias does not predict the top rung's.
    rank_on: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        steps = self.steps
        if not isinstance(steps, (tuple, list)) or not steps:
            raise UserError(f"fidelity steps must be a non-empty list of integers, got {steps!r}")
        for s in steps:
            if isinstance(s, bool) or not isinstance(s, int) or s < 1:
                raise UserError(f"fidelity steps must be integers >= 1, got {s!r} in {list(steps)}")
        if any(b <= a for a, b in zip(steps, steps[1:])):
            raise UserError(f"fidelity steps must be strictly increasing, got {list(steps)}")
        if isinstance(self.eta, bool) or not isinstance(self.eta, int) or self.eta < 2:
            raise UserError(f"fidelity eta must be an integer >= 2, got {self.eta!r}")
        object.__setattr__(self, "steps", tuple(steps))
        if self.rank_on is not None:
            object.__setattr__(self, "rank_on", tuple(self.rank_on))
            if not self.rank_on:
                raise UserError("fidelity rank_on must name at least one objective")

    @property
    def top(self) -> int:
        """Index of the top rung, whose results alone enter the front, export and report."""
        return len(self.steps) - 1

    def budget(self, rung: int) -> int:
        """Recovery steps of ``rung``."""
        if isinstance(rung, bool) or not isinstance(rung, int) or not 0 <= rung <= self.top:
            raise UserError(f"rung must be an integer in [0, {self.top}], got {rung!r}")
        return self.steps[rung]


@dataclass(frozen=True)
class RungResult:
    """One completed evaluation at a rung: objectives oriented for minimisation, and whether
    it met every constraint (``violation`` = sum of positive constraint values, for ordering
    infeasible results among themselves)."""

    candidate: int
    values: tuple[float, ...]
    feasible: bool = True
    violation: float = 0.0


# ------------------------------------------------------------------------------ ranking


def _dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def non_dominated_fronts(points: Sequence[Sequence[float]]) -> list[list[int]]:
    """Indices of ``points`` by non-dominated front (front 0 = the Pareto set), minimisation."""
    n = len(points)
    dominated_by = [0] * n
    dominates: list[list[int]] = [[] for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            if _dominates(points[i], points[j]):
                dominates[i].append(j)
                dominated_by[j] += 1
            elif _dominates(points[j], points[i]):
                dominates[j].append(i)
                dominated_by[i] += 1
    fronts: list[list[int]] = []
    current = [i for i in range(n) if dominated_by[i] == 0]
    while current:
        fronts.append(current)
        nxt = []
        for i in current:
            for j in dominates[i]:
                dominated_by[j] -= 1
                if dominated_by[j] == 0:
                    nxt.append(j)
        current = sorted(nxt)
    return fronts


def crowding_distance(points: Sequence[Sequence[float]]) -> list[float]:
    """NSGA-II crowding distance within one front: the extremes of each objective get inf."""
    n = len(points)
    if n <= 2:
        return [math.inf] * n
    dist = [0.0] * n
    for k in range(len(points[0])):
        order = sorted(range(n), key=lambda i: points[i][k])
        lo, hi = points[order[0]][k], points[order[-1]][k]
        dist[order[0]] = dist[order[-1]] = math.inf
        if hi == lo:
            continue
        for a, i, b in zip(order, order[1:], order[2:]):
            dist[i] += (points[b][k] - points[a][k]) / (hi - lo)
    return dist


def rank(results: Sequence[RungResult]) -> list[RungResult]:
    """``results`` best first: feasible before infeasible; feasible ones by non-dominated front,
    then larger crowding distance; infeasible ones by smaller violation; ties by candidate id,
    so the order never depends on arrival order. One result per candidate is expected."""
    for r in results:
        if any(not math.isfinite(v) for v in r.values):
            raise UserError(f"rung result of candidate {r.candidate} has a non-finite objective: "
                            f"{list(r.values)}")
    if len({len(r.values) for r in results}) > 1:
        raise UserError("rung results must all have the same number of objectives")
    feasible = sorted((r for r in results if r.feasible), key=lambda r: r.candidate)
    infeasible = sorted((r for r in results if not r.feasible),
                        key=lambda r: (r.violation, r.candidate))
    ordered: list[RungResult] = []
    points = [r.values for r in feasible]
    for front in non_dominated_fronts(points):
        cd = crowding_distance([points[i] for i in front])
        ordered += [feasible[i] for _, i in sorted(zip(cd, front), key=lambda p: (-p[0],
                                                   feasible[p[1]].candidate))]
    return ordered + infeasible


def promotable(results: Sequence[RungResult], eta: int,
               promoted: Iterable[int] = ()) -> list[int]:
    """Candidates of one rung to promote now (asynchronous ASHA): those ranked in the top
    ``floor(len(results) / eta)`` that are not in ``promoted``, best first."""
    if isinstance(eta, bool) or not isinstance(eta, int) or eta < 2:
        raise UserError(f"fidelity eta must be an integer >= 2, got {eta!r}")
    done = set(promoted)
    k = len(results) // eta
    return [r.candidate for r in rank(results)[:k] if r.candidate not in done]


# ------------------------------------------------------------------------------ storage


def fidelity_of(trial: FrozenTrial | optuna.Trial) -> dict[str, Any]:
    """{"rung", "candidate", "promoted_from"} of a trial; a trial without a ticket is rung 0 of
    its own candidate (candidate = its number, promoted_from = None)."""
    f = trial.user_attrs.get(FIDELITY_ATTR)
    if isinstance(f, dict) and "rung" in f:
        return {"rung": int(f["rung"]), "candidate": int(f["candidate"]),
                "promoted_from": f.get("promoted_from")}
    return {"rung": 0, "candidate": trial.number, "promoted_from": None}


def _live(trial: FrozenTrial) -> bool:
    from optuna.trial import TrialState

    return trial.state in (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)


def _live_tickets(trials: Iterable[FrozenTrial]) -> dict[tuple[int, int], list[FrozenTrial]]:
    """(candidate, rung) -> its live (WAITING, RUNNING, COMPLETE) tickets, canonical first."""
    out: dict[tuple[int, int], list[FrozenTrial]] = {}
    for t in trials:
        f = t.user_attrs.get(FIDELITY_ATTR)
        if isinstance(f, dict) and _live(t):
            out.setdefault((int(f["candidate"]), int(f["rung"])), []).append(t)
    for v in out.values():
        v.sort(key=trial_id)
    return out


def tickets(study: optuna.Study, candidate: int, rung: int) -> list[FrozenTrial]:
    """Live (WAITING, RUNNING, COMPLETE) tickets of (candidate, rung), canonical first."""
    return _live_tickets(study.get_trials(deepcopy=False)).get((candidate, rung), [])


def _results(trials: Iterable[FrozenTrial], rung: int) -> dict[int, FrozenTrial]:
    """candidate -> its COMPLETE, non-duplicate trial at ``rung``."""
    from optuna.trial import TrialState

    out: dict[int, FrozenTrial] = {}
    for t in trials:
        f = fidelity_of(t)
        # A trial scored as an earlier one with the same recipe is that candidate again: it
        # neither competes for promotion a second time nor has a checkpoint to continue.
        if (t.state == TrialState.COMPLETE and f["rung"] == rung and t.values is not None
                and t.user_attrs.get(DUPLICATE_ATTR) is None
                and TrialRecord.from_trial(t).same_recipe_as is None):
            out.setdefault(f["candidate"], t)
    return out


def rung_results(study: optuna.Study | Sequence[FrozenTrial], rung: int,
                 directions: Sequence[str],
                 rank_on: Sequence[int] | None = None) -> list[RungResult]:
    """COMPLETE results at ``rung`` (of a study, or of its trials) as :class:`RungResult`:
    values turned to minimisation (only the objectives ``rank_on`` indexes, if given),
    feasibility from the ``constraints`` user attribute, as the search records it. Rung 0
    holds every complete trial without a ticket."""
    trials = study if isinstance(study, Sequence) else study.get_trials(deepcopy=False)
    sign = [1.0 if d == "minimize" else -1.0 for d in directions]
    out: dict[int, RungResult] = {}
    for t in _results(trials, rung).values():
        f = fidelity_of(t)
        cons = [float(c) for c in TrialRecord.from_trial(t).constraints or []]
        values = [s * v for s, v in zip(sign, t.values)]
        out.setdefault(f["candidate"], RungResult(
            candidate=f["candidate"],
            values=tuple(values if rank_on is None else (values[i] for i in rank_on)),
            feasible=all(c <= 0 for c in cons),
            violation=sum(c for c in cons if c > 0),
        ))
    return list(out.values())


def claim_promotions(study: optuna.Study, rungs: Rungs,
                     directions: Sequence[str]) -> list[tuple[int, int]]:
    """Queue a ticket for every candidate promotable now, at every rung below the top; returns
    the (candidate, rung) pairs this call queued. Safe to call from any number of workers at
    any time (see the module docstring): a race may queue a duplicate ticket, which is never
    run (:func:`check_ticket`)."""
    queued = []
    trials = study.get_trials(deepcopy=False)  # one read per pass, not one per candidate
    live = _live_tickets(trials)
    for rung in range(rungs.top):
        sources = _results(trials, rung)
        results = rung_results(trials, rung, directions, rungs.rank_on)
        promoted = [r.candidate for r in results if (r.candidate, rung + 1) in live]
        for cand in promotable(results, rungs.eta, promoted):
            src = sources[cand]
            study.enqueue_trial(
                dict(src.params),
                user_attrs={FIDELITY_ATTR: {"rung": rung + 1, "candidate": cand,
                                            "promoted_from": src.number, "top": rungs.top}},
                skip_if_exists=False,
            )
            queued.append((cand, rung + 1))
    return queued


def check_ticket(study: optuna.Study, trial: optuna.Trial) -> int | None:
    """Call when a worker starts a promoted trial, and again just before writing its values:
    None when it is the canonical ticket (run it / record it), else the number of the canonical
    one, after marking this trial ``duplicate_of`` it (the caller then fails the trial without
    running it). A trial without a ticket (rung 0) is always canonical."""
    f = trial.user_attrs.get(FIDELITY_ATTR)
    if not isinstance(f, dict):
        return None
    live = tickets(study, int(f["candidate"]), int(f["rung"]))
    if not live or trial_id(live[0]) == trial_id(trial):
        return None
    trial.set_user_attr(DUPLICATE_ATTR, live[0].number)
    return live[0].number


def at_top(trial: FrozenTrial, rungs: Rungs | None = None) -> bool:
    """Whether ``trial`` is a final result: at the top rung of ``rungs`` (or of the schedule
    recorded on the trial); a trial of a single-fidelity study always is."""
    f = trial.user_attrs.get(FIDELITY_ATTR)
    if rungs is not None:
        return fidelity_of(trial)["rung"] == rungs.top
    if not isinstance(f, dict) or f.get("top") is None:
        return True
    return int(f["rung"]) == int(f["top"])


def top_rung_trials(trials: Iterable[FrozenTrial], rungs: Rungs | None = None,
                    ) -> list[FrozenTrial]:
    """The trials the front, export and report may use: top-rung results only (by ``rungs``,
    or by the schedule each trial records), never a duplicate ticket."""
    return [t for t in trials if t.user_attrs.get(DUPLICATE_ATTR) is None and at_top(t, rungs)]


def retry_attrs(trial: FrozenTrial) -> dict[str, Any]:
    """The attributes a retry of a stopped trial must keep so that it stays the same ticket."""
    f = trial.user_attrs.get(FIDELITY_ATTR)
    return {FIDELITY_ATTR: f} if isinstance(f, dict) else {}


def lower_rung_rows(labels: Any, groups: Any | None, share: float, seed: int) -> Any | None:
    """The test rows a lower rung is scored on (sorted indexes), or None for all of them:
    ``share`` of every (label, group) cell, at least one row of each, drawn with ``seed``, so
    every class and group stays in the sample and every candidate is scored on the same rows."""
    import numpy as np

    if share >= 1:
        return None
    _, cell = np.unique(np.asarray(labels), return_inverse=True)
    if groups is not None:
        _, group = np.unique(np.asarray(groups).astype(str), return_inverse=True)
        cell = cell * (int(group.max()) + 1) + group
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(cell):
        rows = np.flatnonzero(cell == c)
        keep.append(rng.permutation(rows)[:max(1, round(share * len(rows)))])
    return np.sort(np.concatenate(keep))


# ------------------------------------------------------------------------------ trial glue


def recovery_state_dir(run_dir: Path, study: str, number: int) -> Path | None:
    """Where trial ``number`` keeps its recovery checkpoint for a later rung, or None if that
    would lie outside ``run_dir``: derived from the study name and the number only, never from
    a path stored in the study (as the saved models are)."""
    root = run_dir.resolve()
    target = root / "recovery" / study / f"trial-{number}"
    try:
        target.parent.resolve().relative_to(root)
    except ValueError:
        return None
    return target.parent.resolve() / target.name


def stale_checkpoints(trials: Sequence[FrozenTrial], rungs: Rungs,
                      directions: Sequence[str]) -> set[int]:
    """Trials whose recovery checkpoint no promotion is expected to read: finished without a
    result, already continued (a complete ticket was promoted from them), or ranked outside
    the top ``2/eta`` of their rung. A checkpoint deleted too eagerly only costs time: a
    promoted trial without one recovers from the start (:func:`recovery_plan`)."""
    from optuna.trial import TrialState

    stale = {t.number for t in trials if t.state in (TrialState.FAIL, TrialState.PRUNED)}
    for t in trials:
        f = fidelity_of(t)
        if t.state == TrialState.COMPLETE and f["promoted_from"] is not None:
            stale.add(int(f["promoted_from"]))
    waiting = {key for key, ts in _live_tickets(trials).items()
               if any(t.state != TrialState.COMPLETE for t in ts)}
    for rung in range(rungs.top):
        sources = _results(trials, rung)
        ranked = rank(rung_results(trials, rung, directions, rungs.rank_on))
        keep = max(1, math.ceil(2 * len(ranked) / rungs.eta))
        stale.update(sources[r.candidate].number for r in ranked[keep:]
                     if (r.candidate, rung + 1) not in waiting)
    return stale


def drop_stale_checkpoints(run_dir: Path, study: str, trials: Sequence[FrozenTrial],
                           rungs: Rungs, directions: Sequence[str]) -> None:
    """Delete the recovery checkpoints of :func:`stale_checkpoints` (best effort)."""
    import shutil

    for number in stale_checkpoints(trials, rungs, directions):
        target = recovery_state_dir(run_dir, study, number)
        if target is not None:
            shutil.rmtree(target, ignore_errors=True)  # refuses a symlink: nothing followed


def recovery_plan(rungs: Rungs, trial: FrozenTrial | optuna.Trial, run_dir: Path,
                  study: str) -> tuple[int, RecoveryRun]:
    """(recovery steps, :class:`RecoveryRun`) for ``trial`` at its rung: every rung uses the
    top rung's LR schedule, so a promoted trial continues its source's run exactly; a trial
    below the top rung saves its checkpoint; a promoted one resumes from its source's when
    that is still on disk, and otherwise recovers from the start to its rung's steps, which
    gives the same student (resuming is bit-identical to one longer run), only slower."""
    f = fidelity_of(trial)
    save = resume = None
    if f["rung"] < rungs.top:
        save = recovery_state_dir(run_dir, study, trial.number)
        if save is None:
            raise UserError(f"study name {study!r} would put recovery checkpoints outside "
                            f"{run_dir}")
    if f["promoted_from"] is not None:
        resume = recovery_state_dir(run_dir, study, int(f["promoted_from"]))
        if resume is None:
            raise UserError(f"study name {study!r} would put recovery checkpoints outside "
                            f"{run_dir}")
        if not (resume / JSON_FILE).is_file():
            resume = None
    return rungs.budget(f["rung"]), RecoveryRun(schedule_steps=rungs.steps[-1],
                                                resume_from=resume, save_state_to=save)

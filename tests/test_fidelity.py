"""Multi-fidelity search: rung schedule, MO-ASHA ranking, and promotion tickets on storage."""

from __future__ import annotations

import math
import subprocess
import sys
import threading
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from nas_fair.errors import UserError
from nas_fair.search import fidelity as fd
from nas_fair.search.fidelity import RungResult, Rungs, promotable, rank
from nas_fair.search.retry import fail_dead_local_trials, worker_identity
from nas_fair.search.storage import make_storage

DIRS = ["minimize", "minimize"]


def R(cand: int, *values: float, feasible: bool = True, violation: float = 0.0) -> RungResult:  # noqa: N802
    return RungResult(cand, tuple(values), feasible, violation)


# ------------------------------------------------------------------------- schedule


def test_rungs_valid_and_budget():
    r = Rungs(steps=(75, 150, 300, 600), eta=3)
    assert r.top == 3 and r.budget(0) == 75 and r.budget(3) == 600
    with pytest.raises(UserError, match="rung must be an integer in"):
        r.budget(4)


@pytest.mark.parametrize("kw, msg", [
    ({"steps": ()}, "non-empty"),
    ({"steps": (75, 75)}, "strictly increasing"),
    ({"steps": (150, 75)}, "strictly increasing"),
    ({"steps": (0, 75)}, "integers >= 1"),
    ({"steps": (75.0, 150)}, "integers >= 1"),
    ({"eta": 1}, "eta must be an integer >= 2"),
    ({"eta": True}, "eta must be an integer >= 2"),
])
def test_rungs_rejects(kw, msg):
    with pytest.raises(UserError, match=msg):
        Rungs(**kw)


# ------------------------------------------------------------------------- ranking


def test_dominance_orders_fronts():
    # 1 and 2 are non-dominated; 3 is dominated by 1; 4 by everything.
    res = [R(4, 5, 5), R(3, 2, 3), R(2, 3, 1), R(1, 1, 2)]
    order = [r.candidate for r in rank(res)]
    assert set(order[:2]) == {1, 2} and order[2:] == [3, 4]
    assert fd.non_dominated_fronts([r.values for r in res]) == [[2, 3], [1], [0]]


def test_crowding_prefers_extremes_and_breaks_ties_by_id():
    # One front on the line x + y = 4: the two extremes (inf) first, then by crowding distance
    # (13: 1.0; 11 and 12: 0.75 each, a tie the lower id wins; 15: 0.5).
    res = [R(10, 0, 4), R(11, 1, 3), R(12, 2, 2), R(13, 3, 1), R(14, 4, 0), R(15, 1.5, 2.5)]
    cd = fd.crowding_distance([r.values for r in res])
    assert cd[0] == cd[4] == math.inf
    order = [r.candidate for r in rank(res)]
    assert set(order[:2]) == {10, 14}
    assert order[2:] == [13, 11, 12, 15]
    # Input order does not change the ranking.
    assert [r.candidate for r in rank(list(reversed(res)))] == order


def test_feasible_before_infeasible():
    res = [R(1, 0, 0, feasible=False, violation=0.5), R(2, 9, 9),
           R(3, 0, 1, feasible=False, violation=0.1)]
    assert [r.candidate for r in rank(res)] == [2, 3, 1]


def test_promotable_top_fraction_and_not_twice():
    res = [R(i, float(i), float(10 - i) ** 2) for i in range(9)]  # one front of 9
    top = promotable(res, eta=3)
    assert len(top) == 3 and top == [r.candidate for r in rank(res)][:3]
    assert promotable(res, eta=3, promoted=top[:1]) == top[1:]
    assert promotable(res[:2], eta=3) == []  # floor(2/3) = 0: nobody yet
    assert len(promotable(res, eta=4)) == 2
    with pytest.raises(UserError, match="eta"):
        promotable(res, eta=1)


def test_rank_rejects_nan():
    with pytest.raises(UserError, match="non-finite"):
        rank([R(1, math.nan, 0)])


# ------------------------------------------------------------------------- storage

DIST = {"x": FloatDistribution(0.0, 1.0)}


def _study(path: Path, name: str = "s") -> optuna.Study:
    return optuna.create_study(study_name=name, storage=make_storage(f"sqlite:///{path}"),
                               directions=DIRS, load_if_exists=True)


def _add_rung0(study: optuna.Study, n: int) -> None:
    for i in range(n):
        x = i / n
        study.add_trial(optuna.trial.create_trial(
            params={"x": x}, distributions=DIST, values=[x, (1 - x) ** 2 + 0.1 * (i % 2)],
            user_attrs={"constraints": [0.0]}))


def _run_tickets(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """A worker loop's promotion part: pop every queued ticket, run it only if canonical."""
    ran = []
    while study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        t = study.ask()
        if fd.check_ticket(study, t) is not None:
            study.tell(t, state=TrialState.FAIL)
            continue
        assert fd.check_ticket(study, t) is None  # the check before writing values
        study.tell(t, [t.suggest_float("x", 0.0, 1.0), 0.0])
        ran.append(study._storage.get_trial(t._trial_id))
    return ran


def test_claim_promotions_queues_top_third_once(tmp_path):
    study = _study(tmp_path / "s.db")
    _add_rung0(study, 9)
    rungs = Rungs(steps=(10, 20, 40), eta=3)
    queued = fd.claim_promotions(study, rungs, DIRS)
    assert len(queued) == 3 and all(r == 1 for _, r in queued)
    assert fd.claim_promotions(study, rungs, DIRS) == []  # already claimed
    ran = _run_tickets(study)
    assert sorted(fd.fidelity_of(t)["candidate"] for t in ran) == sorted(c for c, _ in queued)
    for t in ran:  # same recipe as its source, rung recorded
        f = fd.fidelity_of(t)
        assert study.trials[f["promoted_from"]].params == t.params and f["rung"] == 1
    # 3 results at rung 1 -> one goes to the top rung; the front would use only that one.
    assert [r for _, r in fd.claim_promotions(study, rungs, DIRS)] == [2]
    _run_tickets(study)
    top = fd.top_rung_trials(study.get_trials(states=(TrialState.COMPLETE,)), rungs)
    assert len(top) == 1 and fd.fidelity_of(top[0])["rung"] == 2


def test_duplicate_ticket_is_never_run(tmp_path):
    study = _study(tmp_path / "s.db")
    _add_rung0(study, 3)
    attrs = {fd.FIDELITY_ATTR: {"rung": 1, "candidate": 0, "promoted_from": 0}}
    for _ in range(2):  # what a race between two claimers leaves behind
        study.enqueue_trial({"x": 0.0}, user_attrs=attrs, skip_if_exists=False)
    second = study.ask()
    first = study.ask()
    canon = min(second, first, key=lambda t: t._trial_id)
    dup = max(second, first, key=lambda t: t._trial_id)
    assert fd.check_ticket(study, dup) == canon.number
    assert fd.check_ticket(study, canon) is None


def _claim_loop(path: Path, rungs: Rungs, barrier: threading.Barrier, out: list) -> None:
    study = optuna.load_study(study_name="s", storage=make_storage(f"sqlite:///{path}"))
    barrier.wait()
    for _ in range(5):
        out.extend(fd.claim_promotions(study, rungs, DIRS))


def test_concurrent_claims_promote_each_candidate_once(tmp_path):
    path = tmp_path / "s.db"
    study = _study(path)
    _add_rung0(study, 12)
    rungs = Rungs(steps=(10, 20), eta=3)
    barrier = threading.Barrier(3)
    outs: list[list] = [[], [], []]
    threads = [threading.Thread(target=_claim_loop, args=(path, rungs, barrier, o)) for o in outs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = set(promotable(fd.rung_results(study, 0, DIRS), 3))
    assert len(expected) == 4
    # Any duplicates a race queued are resolved when run: one result per candidate.
    ran = _run_tickets(study)
    assert sorted(fd.fidelity_of(t)["candidate"] for t in ran) == sorted(expected)
    assert fd.claim_promotions(study, rungs, DIRS) == []


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_killed_ticket_is_retried_not_duplicated(tmp_path):
    study = _study(tmp_path / "s.db")
    _add_rung0(study, 3)
    rungs = Rungs(steps=(10, 20), eta=3)
    [(cand, _)] = fd.claim_promotions(study, rungs, DIRS)
    t = study.ask()  # a worker pops the ticket and is then SIGKILLed mid-recovery
    assert fd.check_ticket(study, t) is None
    t.suggest_float("x", 0.0, 1.0)  # the search marks "worker" once the recipe is drawn
    t.set_user_attr("worker", {**worker_identity(), "pid": _dead_pid()})
    # Before the dead trial is noticed, its ticket is still live: no second claim.
    assert fd.claim_promotions(study, rungs, DIRS) == []
    assert fail_dead_local_trials(study) == [t.number]
    live = fd.tickets(study, cand, 1)
    assert len(live) == 1 and live[0].state == TrialState.WAITING
    assert live[0].user_attrs["retry_of"] == t.number
    assert fd.claim_promotions(study, rungs, DIRS) == []  # the retry is the claim
    ran = _run_tickets(study)
    assert [fd.fidelity_of(r)["candidate"] for r in ran] == [cand]


def test_lost_ticket_is_claimed_again(tmp_path):
    # The process that failed a dead ticket died before queueing its retry: the next pass
    # re-derives the promotion, so it is not lost.
    study = _study(tmp_path / "s.db")
    _add_rung0(study, 3)
    rungs = Rungs(steps=(10, 20), eta=3)
    [(cand, _)] = fd.claim_promotions(study, rungs, DIRS)
    t = study.ask()
    study.tell(t, state=TrialState.FAIL)
    assert fd.claim_promotions(study, rungs, DIRS) == [(cand, 1)]


def test_recovery_plan_chains_rungs(tmp_path):
    study = _study(tmp_path / "s.db")
    _add_rung0(study, 3)
    rungs = Rungs(steps=(10, 20, 40), eta=3)
    steps, run = fd.recovery_plan(rungs, study.trials[0], tmp_path, "s")
    assert steps == 10 and run.schedule_steps == 40
    assert run.save_state_to == (tmp_path / "recovery/s/trial-0").resolve()
    assert run.resume_from is None
    [(cand, _)] = fd.claim_promotions(study, rungs, DIRS)
    ticket = study.ask()
    # the source's checkpoint is gone (deleted as stale): recover from the start instead
    steps, run = fd.recovery_plan(rungs, ticket, tmp_path, "s")
    assert steps == 20 and run.resume_from is None
    state = tmp_path / f"recovery/s/trial-{cand}"
    state.mkdir(parents=True)
    (state / "state.json").write_text("{}")
    steps, run = fd.recovery_plan(rungs, ticket, tmp_path, "s")
    assert run.resume_from == state.resolve()
    assert run.save_state_to.name == f"trial-{ticket.number}"
    with pytest.raises(UserError, match="outside"):
        fd.recovery_plan(rungs, ticket, tmp_path, "../../x")


def test_promotion_can_rank_without_an_objective(tmp_path):
    """rank_on leaves an objective out of promotion: here the second one, which alone would
    pick a different candidate."""
    study = _study(tmp_path / "s.db")
    for a, b in [(0.1, 0.9), (0.5, 0.1), (0.9, 0.5)]:
        study.add_trial(optuna.trial.create_trial(
            params={"x": a}, distributions=DIST, values=[a, b], user_attrs={"constraints": [0.0]}))
    first = Rungs(steps=(10, 20), eta=3, rank_on=(0,))
    assert fd.claim_promotions(study, first, DIRS) == [(0, 1)]  # the smallest first objective
    other = _study(tmp_path / "o.db", "o")
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        other.add_trial(t)
    assert fd.claim_promotions(other, Rungs(steps=(10, 20), eta=3, rank_on=(1,)), DIRS) == [(1, 1)]
    with pytest.raises(UserError, match="at least one objective"):
        Rungs(steps=(10, 20), rank_on=())

"""The trial body: compress one recipe, evaluate and score it, record it on the trial.

``Session.run_trial`` / ``_reuse`` / ``_save_artifact`` call these with the session, which
holds everything trials share (reference, cached tensors, the space); overriding those methods
(tests, benchmarks) still takes effect, as the body calls back through them.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial

from nas_fair.objectives import EvalRecord
from nas_fair.objectives.scores import Scores
from nas_fair.search.artifacts import artifact_path
from nas_fair.search.fidelity import check_ticket, fidelity_of, recovery_plan
from nas_fair.search.records import TrialRecord
from nas_fair.search.retry import worker_identity
from nas_fair.search.session import (
    COST_PHASES,
    NOT_REUSED,
    Session,
    _jsonable,
    predictions_digest,
    same_recipe,
)
from nas_fair.spaces import CompressionContext, compress
from nas_fair.spaces.recovery import recovery_logs
from nas_fair.spaces.recovery_state import JSON_FILE


def run_trial(session: Session, trial: optuna.Trial, reference: dict[str, Any]) -> list[float]:
    configs = {fam.name: fam.suggest(trial) for fam in session.space}
    # Recorded once every parameter is stored, so a retry replays the whole recipe.
    # What export needs to rebuild the same model (kernels differ with the thread count).
    TrialRecord(worker=worker_identity(),
                runtime={"threads": torch.get_num_threads(), "torch": torch.__version__},
                ).write(trial)
    ctx, fidelity = session.ctx, None
    if session.rungs is not None:
        ctx, fidelity = _rung(session, trial, configs)
    t0 = time.perf_counter()
    same = same_recipe(trial)
    if same is not None:
        return session._reuse(trial, same, t0, reference)
    times: dict[str, float] = {}
    model = compress(session.reference, configs, ctx, timings=times)
    latency = None
    if fidelity is not None:
        fidelity, latency = _after_recovery(session, trial, ctx, fidelity)
    # a lower rung only ranks candidates for promotion: its objectives and constraints suffice
    full = fidelity is None or fidelity["rung"] == fidelity["top"]
    t = time.perf_counter()
    record = session.evaluate(model, full=full)
    evaluate_s = time.perf_counter() - t
    if fidelity is not None and record.rows is not None:
        fidelity = {**fidelity, "test_rows": len(record)}  # [search] fidelity_test_share
        TrialRecord(fidelity=fidelity).write(trial)
    scores = session.score(model, record, paired=True, latency=latency,
                           reference_ms=reference.get("latency_ms"), full=full)
    t = time.perf_counter()
    cost = {
        "compress_s": sum(v for k, v in times.items()
                          if k not in ("distillation", "mitigation")),
        "recover_s": times.get("distillation", 0.0),
        "mitigation_s": times.get("mitigation", 0.0),
        "evaluate_s": evaluate_s + scores.attrs["timings"]["metrics_s"],
        "latency_s": scores.attrs["timings"]["latency_s"],
    }
    TrialRecord.from_attrs(scores.attrs).without(["timings"]).write(trial)
    constraints = session.constraints(scores, reference)
    for key, value in constraints.items():
        trial.set_constraint(key, value)  # read by NSGA-II / TPE for feasibility
    TrialRecord(constraints=list(constraints.values())).write(trial)
    pp = getattr(model, "nas_fair_postprocess", None)
    if pp is not None:  # the fitted group offsets and what they did on validation
        TrialRecord(postprocess=_jsonable(pp.to_dict())).write(trial)
    _check_canonical(trial)
    if full:
        session._save_artifact(trial, model, record)  # only final results are exported
    cost["bookkeeping_s"] = time.perf_counter() - t
    cost["total_s"] = time.perf_counter() - t0
    # steps this trial ran: a promoted one continues from its source's step
    cost["recovery_steps_run"] = sum(r["steps_run"] - (r.get("resumed_from_step") or 0)
                                     for r in recovery_logs(model))
    TrialRecord(cost={k: round(v, 3) for k, v in cost.items()}).write(trial)
    return scores.values()


def _check_canonical(trial: optuna.Trial) -> None:
    """A duplicate promotion ticket is never run, nor told values (search/fidelity.py)."""
    dup = check_ticket(trial.study, trial)
    if dup is not None:
        raise optuna.TrialPruned(f"a duplicate of promotion ticket {dup}: not run")


def _rung(session: Session, trial: optuna.Trial, configs: dict[str, Any],
          ) -> tuple[CompressionContext, dict[str, Any]]:
    """The trial's rung: its recovery budget and checkpoints, recorded as ``fidelity``."""
    assert session.rungs is not None
    f = fidelity_of(trial)
    TrialRecord(fidelity={**f, "top": session.rungs.top}).write(trial)  # rung 0 has no ticket
    _check_canonical(trial)
    steps, run = recovery_plan(session.rungs, trial, session.run_dir, session.cfg.name)
    if run.save_state_to is not None and run.save_state_to.exists():
        shutil.rmtree(run.save_state_to)  # left by a deleted study of the same name
    configs["distillation"] = dataclasses.replace(configs["distillation"], steps=steps)
    fidelity = {**f, "top": session.rungs.top, "steps": steps,
                "resumed": run.resume_from is not None}
    TrialRecord(fidelity=fidelity).write(trial)
    return dataclasses.replace(session.ctx, recovery_run=run), fidelity


def _after_recovery(session: Session, trial: optuna.Trial, ctx: CompressionContext,
                    fidelity: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(fidelity, latency to reuse): a student that saved no checkpoint below the top rung had
    no recovery (every family before it was off), so it is the same model at every rung and
    this result is final; a promoted trial keeps its source's latency (same architecture)."""
    save = ctx.recovery_run.save_state_to
    if fidelity["rung"] < fidelity["top"] and save is not None and not (save / JSON_FILE).is_file():
        fidelity = {**fidelity, "rung": fidelity["top"], "independent": True}
        TrialRecord(fidelity=fidelity).write(trial)
    latency = None
    source = fidelity.get("promoted_from")
    if source is not None:
        src = trial.study.get_trials(deepcopy=False)[int(source)]
        latency = TrialRecord.from_trial(src).latency
        if latency is not None:
            latency = {**latency, "copied_from": int(source)}
    return fidelity, latency


def reuse(session: Session, trial: optuna.Trial, same: FrozenTrial, t0: float,
          reference: dict[str, Any]) -> list[float]:
    """Score ``trial`` as ``same``, a completed trial with the same recipe: compression and
    recovery are deterministic for a recipe and thread count, so it would build the same
    model (NSGA-II does propose recipes it has already run). Export rebuilds it, checked
    against the predictions' digest copied here. The measurements are copied, the
    constraints recomputed: the limits may have changed since (``--min-accuracy`` on resume)."""
    TrialRecord.from_trial(same).without(NOT_REUSED).write(trial)
    scores = Scores.of_trial(same)
    constraints = session.constraints(scores, reference)
    for key, value in constraints.items():
        trial.set_constraint(key, value)
    TrialRecord(constraints=list(constraints.values()), same_recipe_as=same.number).write(trial)
    spent = round(time.perf_counter() - t0, 3)
    TrialRecord(cost={**dict.fromkeys(COST_PHASES, 0.0), "bookkeeping_s": spent,
                      "total_s": spent, "recovery_steps_run": 0}).write(trial)
    return list(same.values)


def save_artifact(session: Session, trial: optuna.Trial, model: torch.nn.Module,
                  record: EvalRecord) -> None:
    """Keep the trial's model (safetensors + JSON) so that export copies it instead of
    recompressing; the search deletes it once the trial leaves the Pareto front. The
    predictions' digest and the thread count let export prove a copy or replay is the same
    model."""
    from nas_fair.checkpoint import save_compressed

    rel = artifact_path(session.cfg.name, trial.number)
    target = session.run_dir / rel
    if target.exists():  # left by a deleted study of the same name in this run folder
        shutil.rmtree(target)
    save_compressed(model, target, metadata={"study": session.cfg.name, "trial": trial.number,
                                             "params": trial.params})
    TrialRecord(artifact=rel.as_posix(),
                predictions_sha256=predictions_digest(record.y_pred)).write(trial)

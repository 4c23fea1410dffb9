"""Dead and interrupted trials: which worker ran a trial, failing the trials of dead local
workers, and queueing a failed or interrupted trial to run again.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from nas_fair.search._optuna import fail_trial, stored_trial
from nas_fair.search.fidelity import retry_attrs
from nas_fair.search.records import TrialRecord


def worker_identity() -> dict[str, Any]:
    """Who runs a trial: host and pid, plus the kernel boot and pid namespace where known.

    Two containers may share a host name (and their pids mean nothing to each other): a
    trial is judged dead by its pid only where boot id and pid namespace match this process.
    """
    ident: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid()}
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        ident["node"] = f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        pass
    return ident


def fail_dead_local_trials(study: optuna.Study) -> list[int]:
    """Trials left RUNNING by a killed process on this machine: fail them and queue a retry.

    Remote workers are covered by Optuna's heartbeat (grace period); a local process can be
    checked directly, so a resume right after a crash needs no waiting. Several workers may
    find the same dead trial: only the one whose FAIL lands queues the retry.
    """
    me = worker_identity()
    retried = []
    for tr in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        w = TrialRecord.from_trial(tr).worker or {}
        if w.get("host") != me["host"] or w.get("node") != me.get("node"):
            continue
        if _alive(int(w.get("pid", -1))):
            continue
        try:
            if not fail_trial(study, tr):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker failed it first (and queued the retry)
        if queue_retry(study, tr):
            retried.append(tr.number)
    return retried


def queue_retry(study: optuna.Study, trial: FrozenTrial) -> bool:
    """Queue a stopped trial's recipe to run again (after the trials already queued), marked
    ``retry_of`` (and ``anchor`` if it was one): its parameters once all were drawn (the
    ``worker`` mark is set after the last), else those it was queued with. False when it has
    neither: it drew only part of a recipe, and the next trial draws a new one."""
    rec = TrialRecord.from_trial(trial)
    params = (trial.params if rec.worker is not None
              else trial.system_attrs.get("fixed_params"))
    if not params:
        return False
    attrs: dict[str, Any] = TrialRecord(retry_of=trial.number,
                                        anchor=True if rec.anchor else None).to_attrs()
    attrs.update(retry_attrs(trial))  # a promotion ticket's retry is the same ticket
    study.enqueue_trial(params, user_attrs=attrs, skip_if_exists=False)
    return True


def requeue_interrupted(study: optuna.Study, trial: optuna.Trial) -> None:
    """A trial stopped by Ctrl-C (KeyboardInterrupt): Optuna fails it, and it is queued again
    like a dead worker's trial, so the next run finishes the anchors and the budget (a failed
    trial never counts against the budget). Call before re-raising."""
    frozen = stored_trial(study, trial)
    TrialRecord(interrupted=True).write(trial)
    TrialRecord(error="KeyboardInterrupt: interrupted; queued to run again").write(trial)
    queue_retry(study, frozen)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

"""Run or resume a study for a budget of completed trials or of wall-clock time."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from nas_fair import __version__
from nas_fair.config import StudyConfig
from nas_fair.errors import UserError, disk_full
from nas_fair.objectives.scores import directions, objective_names
from nas_fair.search.artifacts import drop_stale_artifacts
from nas_fair.search.fidelity import claim_promotions, drop_stale_checkpoints
from nas_fair.search.front import pareto_front
from nas_fair.search.records import ReferenceRecord, StudyRecord, TrialRecord
from nas_fair.search.retime import retime_front
from nas_fair.search.retry import fail_dead_local_trials, requeue_interrupted
from nas_fair.search.sampling import make_sampler, population_for
from nas_fair.search.session import Session, config_dict, predictions_digest, search_fingerprint
from nas_fair.search.storage import default_storage, make_storage, preparation_lock, shown_url
from nas_fair.search.table import format_trial_line, pareto_rows, render_table
from nas_fair.spaces import anchor_trials

# Far beyond any study that finishes (a trial takes seconds to minutes): a larger budget is a
# typo, and one of 10^23 hours would run until killed. docs/limits.md lists them.
MAX_BUDGET_TRIALS = 1_000_000
MAX_BUDGET_SECONDS = 366 * 86400


@dataclass(frozen=True)
class Budget:
    trials: int | None = None  # completed trials for the study in total
    seconds: float | None = None  # wall-clock time for this invocation

    @classmethod
    def parse(cls, text: str) -> Budget:
        text = str(text).strip().lower()
        m = re.fullmatch(r"(-?\d+(?:\.\d+)?)\s*(s|m|h)", text)
        if m:
            value = float(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)]
            if value <= 0:
                raise UserError(f"--budget must be a positive duration, got {text!r}")
            if value > MAX_BUDGET_SECONDS:
                raise UserError(f"--budget must be a duration of at most "
                                f"{MAX_BUDGET_SECONDS // 86400} days, got {text!r}")
            return cls(seconds=value)
        if re.fullmatch(r"-?\d+", text):
            if len(text.lstrip("-")) > 12:  # int() of a huge digit string is itself slow
                raise UserError(f"--budget must be at most {MAX_BUDGET_TRIALS} trials, got {text!r}")
            n = int(text)
            if n <= 0:
                raise UserError(f"--budget must be a positive number of trials, got {n}")
            if n > MAX_BUDGET_TRIALS:
                raise UserError(f"--budget must be at most {MAX_BUDGET_TRIALS} trials, got {n}")
            return cls(trials=n)
        raise UserError(
            f"--budget must be a number of trials (e.g. 8) or a duration (e.g. 45m, 2h), got {text!r}"
        )


def run_dir_for(cfg: StudyConfig, override: str | None) -> Path:
    return Path(override) if override else Path("studies") / cfg.name


def open_study(cfg: StudyConfig, storage_url: str, *, create: bool, budget: Budget | None,
               anchors: list[dict[str, Any]] | None = None) -> optuna.Study:
    """Load the study, or create it; ``anchors`` (params of trials to run first) are recorded
    on a new study only, for :func:`enqueue_anchors`, and half its first generation at most."""
    storage = make_storage(storage_url)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    exists = cfg.name in names
    if not exists and not create:
        raise UserError(f"study {cfg.name!r} has no trials in {shown_url(storage_url)} yet; "
                        f"run nas-fair search --study {cfg.name} --budget N first")
    trials = budget.trials if budget else None
    if exists:
        study = optuna.load_study(study_name=cfg.name, storage=storage)
        record = StudyRecord.from_study(study)
        stored = record.fingerprint
        if stored is not None and stored != search_fingerprint(cfg):
            raise UserError(
                f"study {cfg.name!r} in this storage was created from a different definition; "
                "restore the TOML, or give the changed study another name"
            )
        version = record.nas_fair_version
        if create and version is not None and version != __version__:
            # The reference and its caches are keyed by version: mixed workers would rebuild
            # them under each other and score trials against different references.
            raise UserError(
                f"study {cfg.name!r} was created by nas-fair {version}, this is {__version__}: "
                f"every worker of a study runs the same version (pip install nas-fair=={version})"
                ", or give the study another name"
            )
        population = int(population_for(trials) if record.population_size is None
                         else record.population_size)
        # The study seed as is: each trial's draws come from it and the trial's number, so a
        # resume, and every worker on one storage, draws its own recipes (make_sampler).
        study.sampler = make_sampler(cfg, population, cfg.seed)
        return study
    anchors = anchors or []
    population = cfg.search.population_size or population_for(trials, len(anchors))
    study = optuna.create_study(
        study_name=cfg.name, storage=storage, directions=directions(cfg),
        sampler=make_sampler(cfg, population, cfg.seed), load_if_exists=True,
    )
    study.set_metric_names(objective_names(cfg))
    StudyRecord(population_size=population, fingerprint=search_fingerprint(cfg),
                config=json.loads(json.dumps(config_dict(cfg), default=str)),
                nas_fair_version=__version__, anchors=anchors).write(study)
    return study


def enqueue_anchors(study: optuna.Study, log: Callable[[str], None]) -> None:
    """Queue a new study's anchor trials once; call under the preparation lock, so that of
    several workers creating one study together exactly one queues them."""
    record = StudyRecord.from_study(study)
    anchors = record.anchors
    if not anchors or record.anchors_queued:
        return
    for params in anchors:
        study.enqueue_trial(params, user_attrs={"anchor": True})
    StudyRecord(anchors_queued=True).write(study)
    log(f"queued {len(anchors)} anchor trials (the families' hand settings, alone and in "
        "their mild combination) to run first")


def _complete(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def available_cores() -> int:
    """CPUs this process may run on (a container's cpuset, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def worker_threads(cfg: StudyConfig, jobs: int) -> int:
    """Torch threads per worker: ``[search] threads`` if set, else the cores split evenly."""
    return cfg.search.threads or max(1, available_cores() // jobs)


def ensure_writable_dir(path: Path, what: str) -> None:
    """Fail before any work when ``path`` cannot become a writable folder (nothing created)."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UserError(f"{what} {str(path)!r} cannot be created: {str(probe)!r} is not a folder")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{what} {str(path)!r} is not writable ({str(probe)!r} is read-only)")


def make_run_dir(path: Path, what: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{what} {str(path)!r} cannot be created: {exc.strerror or exc}") from None


def shared_reference(study: optuna.Study, session: Session) -> dict[str, Any]:
    """The reference's scores, stored once on the study: the first worker scores, others read.

    Called under the run folder's preparation lock; re-reading after the write keeps every
    worker on the stored copy even where run folders (and so locks) were not shared.
    """
    reference = StudyRecord.from_study(study).reference
    if reference is None:
        ref = session.score_reference()
        reference = ReferenceRecord.from_attrs({
            "values": ref.values(), "size_mb": ref.size_mb, "latency_ms": ref.latency_ms,
            "accuracy": ref.accuracy, "bias": ref.bias, **ref.attrs,
            "predictions_sha256": predictions_digest(session.ref_pred)}).to_attrs()
        if StudyRecord.from_study(study).reference is None:
            StudyRecord(reference=reference).write(study)
        reference = StudyRecord.from_study(study).reference or reference
    return reference


def run_search(
    cfg: StudyConfig,
    budget: Budget,
    *,
    storage: str | None = None,
    run_dir: str | None = None,
    device: str | None = None,
    quiet: bool = False,
    as_json: bool = False,
    jobs: int = 1,
    show: bool = True,
    on_message: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the study until the budget is met; returns the Pareto table as data.

    ``jobs`` > 1 runs that many worker processes on this machine against the same storage,
    each with its share of the cores; preparation happens once, here, before they start.
    ``show`` prints the table at the end; ``on_message`` also gets every line logged here,
    quiet or not (the Python API keeps them instead of printing).
    """
    out = sys.stderr if as_json else sys.stdout

    def log(msg: str) -> None:
        if on_message is not None:
            on_message(msg)
        if not quiet:
            tqdm.write(msg, file=out)

    if not isinstance(jobs, int) or jobs < 1:
        raise UserError(f"--jobs must be a whole number >= 1, got {jobs!r}")
    threads = worker_threads(cfg, jobs)
    if cfg.search.threads:
        torch.set_num_threads(cfg.search.threads)
    session = Session(cfg, run_dir_for(cfg, run_dir), device=device, quiet=quiet, log=log)
    what = "--run-dir" if run_dir else "the run folder"
    ensure_writable_dir(session.run_dir, what)
    # Everything above validated input without writing; from here on the run folder is used.
    url = storage or default_storage(session.run_dir.resolve())
    if storage is None:
        make_run_dir(session.run_dir, what)
    study = open_study(cfg, url, create=True, budget=budget,
                       anchors=anchor_trials(session.space) if cfg.search.anchors else None)
    log(f"study {cfg.name!r}: {cfg.description or cfg.data.source} | storage {shown_url(url)}")
    make_run_dir(session.run_dir, what)
    t = time.perf_counter()
    with preparation_lock(session.run_dir, log):
        session.prepare()  # with every core: fine-tuning the reference is the big one-off cost
        info = session.reference_info
        how = ("loaded from the cache" if info.get("cached")
               else "fine-tuned" if info.get("finetuned") else "as loaded")
        log(f"prepared in {time.perf_counter() - t:.1f}s (reference: {how}, "
            f"cached in {session.run_dir})")
        if jobs > 1:
            torch.set_num_threads(threads)  # the reference is timed as the workers time trials
        reference = shared_reference(study, session)
        enqueue_anchors(study, log)
    if reference["collapse"]["collapsed"]:
        log("warning: the reference model itself looks collapsed ("
            f"{reference['collapse']['reason'].split(';')[0]}); fine-tune it longer "
            "([model] epochs) before trusting any bias figure")
    ref_threads = (reference.get("latency") or {}).get("threads")
    trial_threads = threads if jobs > 1 else torch.get_num_threads()
    if ref_threads is not None and ref_threads != trial_threads:
        log(f"warning: the reference's latency was measured with {ref_threads} threads, trials "
            f"here run with {trial_threads}: latency ratios are not like for like (set "
            "[search] threads to fix the count for every run)")
    retried = fail_dead_local_trials(study)
    if retried:
        log(f"trials {', '.join(map(str, retried))} were left running by a stopped process: "
            "marked failed and queued again")
    dirs = directions(cfg)
    names = objective_names(cfg)
    done = len(_complete(study))
    remaining = None if budget.trials is None else max(0, budget.trials - done)
    if remaining == 0:
        log(f"budget met: {done} completed trials (ask for a larger --budget to continue)")
    elif jobs > 1 and (remaining is None or remaining > 1):
        from nas_fair.search.workers import WorkerSpec, run_workers

        n = jobs if remaining is None else min(jobs, remaining)
        cores = available_cores()
        if n * threads > cores:
            log(f"warning: {n} workers x {threads} threads on {cores} cores: they will compete "
                "for cores (and slow each other's latency measurements)")
        log(f"starting {n} workers with {threads} torch thread{'s' * (threads != 1)} each")
        spec = WorkerSpec(cfg=cfg, budget=budget, storage=url, run_dir=str(session.run_dir),
                          device=device, quiet=quiet, as_json=as_json, threads=threads)
        codes = run_workers(spec, n)
        bad = [(i, c) for i, c in enumerate(codes, 1) if c != 0]
        if bad:
            done = len(_complete(study))
            raise UserError(
                f"{len(bad)} of {n} workers stopped with an error (worker {bad[0][0]}: exit code "
                f"{bad[0][1]}); {done} trials are complete: run the same command to go on"
            )
    else:
        _optimize(study, session, reference, budget, remaining, dirs, names, quiet, log)
    if not session.read_only and reference.get("latency_ms"):
        front = pareto_front(_complete(study), dirs)
        retime_front(study, session, front, float(reference["latency_ms"]),
                     threads=threads if jobs > 1 else None, log=log)
    result = pareto_rows(study, dirs, names)
    if show and as_json:
        print(json.dumps(result, indent=2))
    elif show:
        print(render_table(result), file=out)
    return result


def run_worker(spec: Any, index: int) -> None:
    """One ``--jobs`` worker (a spawned process): load the prepared study, run trials."""
    cfg = spec.cfg
    out = sys.stderr if spec.as_json else sys.stdout

    def log(msg: str) -> None:
        if not spec.quiet:
            print(msg, file=out, flush=True)

    torch.set_num_threads(spec.threads)
    session = Session(cfg, Path(spec.run_dir), device=spec.device, quiet=True, log=log)
    study = open_study(cfg, spec.storage, create=False, budget=spec.budget)
    session.prepare()  # cached by the parent: loads only
    with preparation_lock(session.run_dir, log):
        reference = shared_reference(study, session)
    remaining = None
    if spec.budget.trials is not None:
        remaining = max(0, spec.budget.trials - len(_complete(study)))
        if remaining == 0:
            return
    _optimize(study, session, reference, spec.budget, remaining, directions(cfg),
              objective_names(cfg), True, log, label=f"worker {index}: ")


def _over_budget(study: optuna.Study, number: int, budget: Budget) -> bool:
    """Whether trial ``number`` would exceed the budget of completed trials.

    Trials are ranked by number among those that are complete, running or queued: at most
    ``budget.trials`` of them can be ahead of a trial that runs, so several workers (or
    machines) never complete more than the budget, and a trial that fails frees its place.
    """
    if budget.trials is None:
        return False
    live = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING,
                                                    TrialState.WAITING))
    return sum(t.number < number for t in live) >= budget.trials


def promote(study: optuna.Study, session: Session, dirs: list[str], log: Callable[[str], None],
            label: str = "") -> None:
    """Queue the promotions the study's results earn now (search/fidelity.py), and drop the
    recovery checkpoints no promotion will read any more."""
    assert session.rungs is not None
    for cand, rung in claim_promotions(study, session.rungs, dirs):
        log(f"{label}candidate {cand} promoted to rung {rung} "
            f"({session.rungs.steps[rung]} recovery steps)")
    drop_stale_checkpoints(session.run_dir, session.cfg.name, study.get_trials(deepcopy=False),
                           session.rungs, dirs)


def _optimize(study: optuna.Study, session: Session, reference: dict[str, Any], budget: Budget,
              remaining: int | None, dirs: list[str], names: list[str], quiet: bool,
              log: Any, label: str = "") -> None:
    bar = tqdm(total=remaining, desc="trials", unit="trial", disable=quiet, file=sys.stderr,
               dynamic_ncols=True)
    if session.rungs is not None:  # promotions a stopped run had earned but not queued
        promote(study, session, dirs, log, label)
    stop_at = None if budget.seconds is None else time.monotonic() + budget.seconds
    failures = 0
    last_error = "?"
    full: list[BaseException] = []

    def callback(study: optuna.Study, trial: FrozenTrial) -> None:
        nonlocal failures, last_error
        if trial.state == TrialState.COMPLETE and session.rungs is not None:
            promote(study, session, dirs, log, label)
        complete = _complete(study)
        if trial.state == TrialState.COMPLETE:
            failures = 0
            bar.update(1)
            front = {t.number for t in pareto_front(complete, dirs)}
            drop_stale_artifacts(session.run_dir, session.cfg.name, complete, keep=front)
            log(label + format_trial_line(trial, reference, names, trial.number in front))
        elif trial.state == TrialState.FAIL:
            failures += 1
            last_error = TrialRecord.from_trial(trial).error or "see log above"
            drop_stale_artifacts(session.run_dir, session.cfg.name, [trial], keep=set())
            log(f"{label}trial {trial.number} failed: {last_error}")
            if failures >= 3:
                study.stop()
        if budget.trials is not None and len(complete) >= budget.trials:
            study.stop()
        if stop_at is not None and time.monotonic() >= stop_at:
            study.stop()

    def guarded(trial: optuna.Trial) -> list[float]:
        if _over_budget(study, trial.number, budget):
            # Other workers hold the remaining places: never complete, stop this worker.
            TrialRecord(skipped=f"budget of {budget.trials} trials already taken").write(trial)
            study.stop()
            raise optuna.TrialPruned("over budget")
        try:
            return session.run_trial(trial, reference)
        except KeyboardInterrupt:
            requeue_interrupted(study, trial)
            raise
        except Exception as exc:
            TrialRecord(error=f"{type(exc).__name__}: {exc}"[:500]).write(trial)
            if disk_full(exc):  # every next trial would fail the same way: stop, say so once
                full.append(exc)
                study.stop()
            raise

    try:
        study.optimize(guarded, n_trials=None, timeout=budget.seconds, callbacks=[callback],
                       catch=(Exception,), gc_after_trial=True, show_progress_bar=False)
    finally:
        bar.close()
    if full:
        raise full[0]
    if failures >= 3:
        raise UserError(f"stopped after 3 failed trials in a row; last error: {last_error}")

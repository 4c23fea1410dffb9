"""Run or resume a study for a budget of completed trials or of wall-clock time."""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from nas_fair import __version__
from nas_fair.config import StudyConfig
from nas_fair.errors import UserError
from nas_fair.search.study import (
    Session,
    config_dict,
    default_storage,
    directions,
    fail_dead_local_trials,
    make_sampler,
    make_storage,
    objective_names,
    pareto_front,
    population_for,
    search_fingerprint,
    shown_url,
)
from nas_fair.search.table import format_trial_line, pareto_rows, render_table


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
            return cls(seconds=value)
        if re.fullmatch(r"-?\d+", text):
            n = int(text)
            if n <= 0:
                raise UserError(f"--budget must be a positive number of trials, got {n}")
            return cls(trials=n)
        raise UserError(
            f"--budget must be a number of trials (e.g. 8) or a duration (e.g. 45m, 2h), got {text!r}"
        )


def run_dir_for(cfg: StudyConfig, override: str | None) -> Path:
    return Path(override) if override else Path("studies") / cfg.name


def open_study(cfg: StudyConfig, storage_url: str, *, create: bool, budget: Budget | None,
               seed_offset: int = 0) -> optuna.Study:
    storage = make_storage(storage_url)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    exists = cfg.name in names
    if not exists and not create:
        raise UserError(f"study {cfg.name!r} has no trials in {shown_url(storage_url)} yet; "
                        f"run nas-fair search --study {cfg.name} --budget N first")
    population = population_for(budget.trials if budget else None)
    if exists:
        study = optuna.load_study(study_name=cfg.name, storage=storage)
        stored = study.user_attrs.get("fingerprint")
        if stored is not None and stored != search_fingerprint(cfg):
            raise UserError(
                f"study {cfg.name!r} in this storage was created from a different definition; "
                "restore the TOML, or give the changed study another name"
            )
        population = int(study.user_attrs.get("population_size", population))
        n_done = len(study.get_trials(deepcopy=False))
        study.sampler = make_sampler(cfg, population, cfg.seed + n_done + seed_offset)
        return study
    if cfg.search.population_size:
        population = cfg.search.population_size
    study = optuna.create_study(
        study_name=cfg.name, storage=storage, directions=directions(cfg),
        sampler=make_sampler(cfg, population, cfg.seed + seed_offset), load_if_exists=True,
    )
    study.set_metric_names(objective_names(cfg))
    study.set_user_attr("population_size", population)
    study.set_user_attr("fingerprint", search_fingerprint(cfg))
    study.set_user_attr("config", json.loads(json.dumps(config_dict(cfg), default=str)))
    study.set_user_attr("nas_fair_version", __version__)
    return study


def _complete(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def run_search(
    cfg: StudyConfig,
    budget: Budget,
    *,
    storage: str | None = None,
    run_dir: str | None = None,
    device: str | None = None,
    quiet: bool = False,
    as_json: bool = False,
) -> dict[str, Any]:
    """Run (or resume) the study until the budget is met; returns the Pareto table as data."""
    out = sys.stderr if as_json else sys.stdout

    def log(msg: str) -> None:
        if not quiet:
            tqdm.write(msg, file=out)

    if cfg.search.threads:
        torch.set_num_threads(cfg.search.threads)
    session = Session(cfg, run_dir_for(cfg, run_dir), device=device, quiet=quiet, log=log)
    # Everything above validated input without writing; from here on the run folder is used.
    url = storage or default_storage(session.run_dir.resolve())
    if storage is None:
        session.run_dir.mkdir(parents=True, exist_ok=True)
    study = open_study(cfg, url, create=True, budget=budget)
    log(f"study {cfg.name!r}: {cfg.description or cfg.data.source} | storage {shown_url(url)}")
    t = time.perf_counter()
    session.prepare()
    log(f"prepared in {time.perf_counter() - t:.1f}s (reference: "
        f"{'fine-tuned' if session.reference_info.get('finetuned') else 'as loaded'}, "
        f"cached in {session.run_dir})")
    reference = study.user_attrs.get("reference")
    if reference is None:
        ref = session.score_reference()
        reference = {"values": ref.values(), "size_mb": ref.size_mb, "latency_ms": ref.latency_ms,
                     "accuracy": ref.accuracy, "bias": ref.bias, **ref.attrs}
        study.set_user_attr("reference", reference)
    if reference["collapse"]["collapsed"]:
        log("warning: the reference model itself looks collapsed ("
            f"{reference['collapse']['reason'].split(';')[0]}); fine-tune it longer "
            "([model] epochs) before trusting any bias figure")
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
    else:
        _optimize(study, session, reference, budget, remaining, dirs, names, quiet, log)
    result = pareto_rows(study, dirs, names)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print(render_table(result), file=out)
    return result


def _optimize(study: optuna.Study, session: Session, reference: dict[str, Any], budget: Budget,
              remaining: int | None, dirs: list[str], names: list[str], quiet: bool,
              log: Any) -> None:
    bar = tqdm(total=remaining, desc="trials", unit="trial", disable=quiet, file=sys.stderr,
               dynamic_ncols=True)
    stop_at = None if budget.seconds is None else time.monotonic() + budget.seconds
    failures = 0

    def callback(study: optuna.Study, trial: FrozenTrial) -> None:
        nonlocal failures
        complete = _complete(study)
        if trial.state == TrialState.COMPLETE:
            failures = 0
            bar.update(1)
            front = {t.number for t in pareto_front(complete, dirs)}
            log(format_trial_line(trial, reference, names, trial.number in front))
        elif trial.state == TrialState.FAIL:
            failures += 1
            log(f"trial {trial.number} failed: {trial.user_attrs.get('error', 'see log above')}")
            if failures >= 3:
                study.stop()
        if budget.trials is not None and len(complete) >= budget.trials:
            study.stop()
        if stop_at is not None and time.monotonic() >= stop_at:
            study.stop()

    def guarded(trial: optuna.Trial) -> list[float]:
        try:
            return session.run_trial(trial, reference)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:500])
            raise

    try:
        study.optimize(guarded, n_trials=None, timeout=budget.seconds, callbacks=[callback],
                       catch=(Exception,), gc_after_trial=True, show_progress_bar=False)
    finally:
        bar.close()
    if failures >= 3:
        raise UserError(f"stopped after 3 failed trials in a row; last error: "
                        f"{study.trials[-1].user_attrs.get('error', '?')}")

"""``nas-fair search --jobs K``: K worker processes on this machine, one study, one storage.

Workers are spawned (not forked): a forked child would inherit torch's OpenMP pool and the
parent's database connections, neither of which survives a fork. Each worker gets its share
of the cores (``OMP_NUM_THREADS`` and ``torch.set_num_threads``) so K workers do not
oversubscribe the machine, loads the study the parent prepared, and runs trials until the
study's budget is taken (see ``run._over_budget``: no duplicates, never more than the budget).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs (picklable): the study, where it lives, its thread count."""

    cfg: Any  # StudyConfig, with the command line's overrides applied
    budget: Any  # run.Budget
    storage: str
    run_dir: str
    device: str | None
    quiet: bool
    as_json: bool
    threads: int
    index: int = 0


def _worker_entry(spec: WorkerSpec) -> None:
    """Runs in the spawned process: the same quiet logging as the CLI, one error line."""
    import warnings

    import optuna

    from nas_fair.errors import UserError

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    from nas_fair.search.run import run_worker

    try:
        run_worker(spec, spec.index)
    except UserError as exc:
        print(f"nas-fair: error: worker {spec.index}: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def run_workers(spec: WorkerSpec, n: int) -> list[int]:
    """Start ``n`` workers and wait for all; returns their exit codes (0 = finished)."""
    ctx = multiprocessing.get_context("spawn")
    old = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    procs = []
    try:
        # Read by OpenMP when the worker imports torch, before set_num_threads runs.
        for k in old:
            os.environ[k] = str(spec.threads)
        for i in range(1, n + 1):
            p = ctx.Process(target=_worker_entry, args=(replace(spec, index=i),),
                            name=f"nas-fair-worker-{i}")
            p.start()
            procs.append(p)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        # Ctrl-C reached the workers too: each marks its running trial failed and exits.
        for p in procs:
            p.join(timeout=30)
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join()
        raise
    return [p.exitcode if p.exitcode is not None else 1 for p in procs]

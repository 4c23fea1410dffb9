"""Scaling out: ``--jobs`` on SQLite, workers of several "machines" on one PostgreSQL study.

Every worker here is a real process (``python -m nas_fair.search.cli search``), as a user
would start it; the checks read the study back from its storage.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import test_search
from optuna.trial import TrialState
from pg_server import PASSWORD
from test_search import write_study

from nas_fair.search.run import available_cores
from nas_fair.search.storage import make_storage

tiny_checkpoint = test_search.tiny_checkpoint  # the fixture, shared with test_search
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def search_cmd(toml: Path, run_dir: Path, budget: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "nas_fair.search.cli", "search", "--config", str(toml),
            "--budget", str(budget), "--run-dir", str(run_dir), *extra]


def trials_of(url: str, name: str = "tiny") -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=make_storage(url)).get_trials()


def check_exact_budget(trials: list[optuna.trial.FrozenTrial], n: int) -> None:
    """Exactly ``n`` complete trials, unique numbers, four finite objectives each."""
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)), numbers
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == n, [(t.number, t.state.name) for t in trials]
    for t in complete:
        assert t.values is not None and len(t.values) == 4 and np.all(np.isfinite(t.values))
    # anything else is a trial turned away because the budget was taken, or an anchor queued
    # beyond the budget that waits for a larger one; never a failure
    for t in trials:
        if t.state == TrialState.WAITING:
            assert t.user_attrs.get("anchor") and t.number >= n, t
        elif t.state != TrialState.COMPLETE:
            assert t.state == TrialState.PRUNED and "budget" in t.user_attrs["skipped"], t


def test_jobs_on_sqlite_complete_exactly_the_budget(tmp_path: Path, tiny_checkpoint: Path) -> None:
    # Trials of ~1-2 s, so that both workers take some: at 30 steps a trial took 0.2-0.3 s and
    # one worker once finished all four before the other (spawned 1.9 s later) took one.
    toml = write_study(tmp_path, tiny_checkpoint, steps=300)
    # split the cores; no anchors: the int8 anchor skips recovery and is over in a moment, so a
    # worker that starts late under load could find every place taken
    toml.write_text(toml.read_text().replace("threads = 1\n", "anchors = false\n"))
    run_dir = tmp_path / "run"
    proc = subprocess.run(search_cmd(toml, run_dir, 4, "--jobs", "2"), env=ENV,
                          capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "locked" not in output.lower() and "Traceback" not in output
    assert "starting 2 workers" in output and "Pareto front" in proc.stdout
    trials = trials_of(f"sqlite:///{run_dir / 'study.db'}")
    check_exact_budget(trials, 4)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    # two worker processes ran trials, each with its share of the cores
    assert len({t.user_attrs["worker"]["pid"] for t in complete}) == 2
    assert {t.user_attrs["runtime"]["threads"] for t in complete} == {max(1, available_cores() // 2)}


def test_three_workers_join_one_postgresql_study(tmp_path: Path, tiny_checkpoint: Path,
                                                 postgres_server) -> None:
    url = postgres_server.new_database()
    toml = write_study(tmp_path, tiny_checkpoint, steps=4)
    shared = tmp_path / "shared-run"
    procs = [subprocess.Popen(search_cmd(toml, shared, 4, "--storage", url), env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outputs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        outputs.append(out + err)
        assert p.returncode == 0, out + err
    trials = trials_of(url)
    check_exact_budget(trials, 4)
    # three workers created the study together: its 5 anchor trials were queued once (the
    # fifth, beyond the budget, waits or was turned away)
    assert [t.number for t in trials if t.user_attrs.get("anchor")] == [0, 1, 2, 3, 4]
    # the reference was fine-tuned by one worker; the others waited and loaded it
    assert sum("reference: fine-tuned" in o for o in outputs) == 1, outputs
    assert sum("reference: loaded from the cache" in o for o in outputs) == 2, outputs
    for o in outputs:
        assert PASSWORD not in o
        assert "Traceback" not in o


def test_budget_rank_rule_turns_away_the_extra_trial(tmp_path: Path) -> None:
    """Two workers racing for the last place: only the lower trial number may complete."""
    from nas_fair.search.run import Budget, _over_budget

    study = optuna.create_study(directions=["minimize"] * 2,
                                storage=f"sqlite:///{tmp_path / 's.db'}")
    done = study.ask()
    study.tell(done, [1.0, 1.0])
    a, b = study.ask(), study.ask()  # both running: places 1 and 2 of a budget of 2
    assert not _over_budget(study, a.number, Budget(trials=2))
    assert _over_budget(study, b.number, Budget(trials=2))
    study.tell(a, state=TrialState.FAIL)  # a failed: its place is free again
    assert not _over_budget(study, b.number, Budget(trials=2))
    study.enqueue_trial({})  # a queued retry (higher number) does not overtake b
    waiting = study.get_trials(states=(TrialState.WAITING,))[0]
    assert _over_budget(study, waiting.number, Budget(trials=2))
    assert not _over_budget(study, 99, Budget(seconds=60.0))  # a time budget has no count


def test_storage_password_is_never_shown(tmp_path: Path, tiny_checkpoint: Path,
                                         postgres_server, capfd) -> None:
    """search, pareto, report and export with a password in the URL: not in any output."""
    from nas_fair.search.cli import main

    url = postgres_server.new_database()
    assert PASSWORD in url
    toml = write_study(tmp_path, tiny_checkpoint, steps=4)
    common = ["--config", str(toml), "--run-dir", str(tmp_path / "run"), "--storage", url]
    assert main(["search", *common, "--budget", "1"]) == 0
    assert main(["pareto", *common]) == 0
    assert main(["pareto", *common, "--json"]) == 0
    report = tmp_path / "report.html"
    assert main(["report", *common, "--out", str(report)]) == 0
    assert main(["export", *common, "--trials", "0", "--out", str(tmp_path / "export")]) == 0
    out, err = capfd.readouterr()
    assert "postgresql://postgres:***@" in out + err  # the storage is named, masked
    assert PASSWORD not in out + err
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in
               (".html", ".json", ".md", ".txt", ".toml", ".yaml", "")]
    assert report in written
    for p in written:
        assert PASSWORD.encode() not in p.read_bytes(), p
    # a wrong password is refused in one line that does not echo it either
    wrong = postgres_server.url(url.rsplit("/", 1)[1], password="wrong-" + PASSWORD)
    assert main(["pareto", *common[:4], "--storage", wrong]) == 2
    out, err = capfd.readouterr()
    assert "password authentication failed" in err and PASSWORD not in out + err


def test_preparation_lock_makes_other_workers_wait(tmp_path: Path) -> None:
    """Another process holds the run folder's lock: we wait, say so, then get it."""
    import time

    from nas_fair.search.storage import LOCK_FILE, preparation_lock

    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time\n"
         f"f = open({str(tmp_path / LOCK_FILE)!r}, 'a+')\n"
         "fcntl.flock(f, fcntl.LOCK_EX); f.write('worker other:1'); f.flush()\n"
         "print('locked', flush=True); time.sleep(3)\n"],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    said: list[str] = []
    t = time.monotonic()
    with preparation_lock(tmp_path, said.append):
        waited = time.monotonic() - t
        with preparation_lock(tmp_path, said.append):  # reentrant: no deadlock on ourselves
            pass
    holder.wait()
    assert waited > 2.0, waited
    assert len(said) == 1 and "waiting for worker other:1" in said[0], said


def test_multi_fidelity_workers_promote_each_candidate_once(tmp_path: Path, tiny_checkpoint: Path,
                                                            postgres_server) -> None:
    """Three workers on one PostgreSQL multi-fidelity study: every (candidate, rung) has at
    most one result, promotions happened, and nothing failed."""
    from collections import Counter

    url = postgres_server.new_database()
    toml = write_study(tmp_path, tiny_checkpoint, steps=4)
    toml.write_text(toml.read_text().replace(
        "threads = 1\n", "threads = 1\nanchors = false\nfidelity_steps = [2, 4, 8]\n"
                         "fidelity_eta = 2\n"))
    shared = tmp_path / "shared-run"
    procs = [subprocess.Popen(search_cmd(toml, shared, 8, "--storage", url, "--quiet"), env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, out + err
        assert "Traceback" not in out + err
    trials = trials_of(url)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 8
    keys = Counter((t.user_attrs["fidelity"]["candidate"], t.user_attrs["fidelity"]["rung"])
                   for t in complete)
    assert max(keys.values()) == 1, keys
    assert any(rung > 0 for _, rung in keys)
    for t in trials:
        assert t.state != TrialState.FAIL, t
        if t.state == TrialState.PRUNED:  # turned away: the budget, or a duplicate ticket
            assert t.user_attrs.get("skipped") or t.user_attrs.get("duplicate_of") is not None

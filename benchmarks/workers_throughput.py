"""Trials per hour with one worker, ``--jobs 2``, and two workers on one PostgreSQL study.

Each setting runs the same study from the same prepared reference and caches (copied into a
fresh run folder, so preparation is not timed) for ``--budget`` trials; throughput is
complete trials over the span from the first trial's start to the last one's end (process
start-up excluded), and the wall time of the whole command is reported beside it. Results are
ratios to the single worker's figure. Workers split the cores (``--jobs 2`` on 2 cores: one
thread each), so on a small machine two workers gain only where one worker leaves cores idle.

    python benchmarks/workers_throughput.py [--config FILE] [--budget 8] [--postgres URL]
                                            [--out benchmarks/results/workers_throughput.json]

Without ``--config`` a tiny synthetic study (a small BERT built from a config, no download)
is used: a check that the machinery works, not a figure for a real model. Without
``--postgres`` a throwaway server is started where the PostgreSQL binaries are installed
(tests/pg_server.py); otherwise that setting is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent


def tiny_study(folder: Path, recovery_steps: int) -> Path:
    """A small BERT (4 layers, hidden 64) on a synthetic 3-class task with a gender group."""
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, BertConfig, BertTokenizerFast

    words = ("he she his her him man woman nurse doctor teacher the a is was and of to in at "
             "with works as an who cook sheriff clerk good bad new old my your their").split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(BertConfig(
        vocab_size=len(vocab), hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=256, max_position_embeddings=64, num_labels=3))
    model.save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    rng = np.random.default_rng(0)
    rows = ["text,label,gender"]
    for i in range(600):
        label, gender = i % 3, "f" if rng.random() < 0.4 else "m"
        filler = " ".join(rng.choice(["the", "good", "new", "old", "my", "is"], size=5))
        cue = ["cook", "sheriff", "clerk"][label]
        rows.append(f'"{"she" if gender == "f" else "he"} works as a {cue} {filler}",{label},'
                    f"{gender}")
    (folder / "data.csv").write_text("\n".join(rows) + "\n")
    toml = folder / "throughput.toml"
    toml.write_text(f"""name = "throughput"
seed = 0
[model]
path = "{folder / 'model'}"
max_length = 24
epochs = 3
learning_rate = 3e-3
batch_size = 32
[data]
source = "file"
train = "{folder / 'data.csv'}"
group_column = "gender"
[search]
batch_size = 8
seq_len = 24
recovery_steps = {recovery_steps}
latency_repeats = 3
bootstrap = 100
""")
    return toml


def prepare(toml: Path, warm: Path) -> None:
    """Fine-tune the reference and fill the caches once (not part of any timing)."""
    import torch

    from nas_fair.config import load_study
    from nas_fair.search.session import Session

    torch.set_num_threads(os.cpu_count() or 1)
    Session(load_study(toml), warm, quiet=True).prepare()


def fresh_run_dir(warm: Path, run_dir: Path) -> Path:
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    for part in ("reference", "cache"):
        shutil.copytree(warm / part, run_dir / part)
    return run_dir


def search(toml: Path, run_dir: Path, budget: int, *extra: str,
           env: dict[str, str] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "nas_fair.search.cli", "search", "--config", str(toml),
           "--budget", str(budget), "--run-dir", str(run_dir), "--quiet", *extra]
    return subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def measure(name: str, procs: list[subprocess.Popen], storage: str, study: str,
            started: float) -> dict[str, Any]:
    import optuna
    from optuna.trial import TrialState

    from nas_fair.search.records import TrialRecord
    from nas_fair.search.storage import make_storage

    for p in procs:
        out, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"{name}: a worker failed (exit {p.returncode}): {err[-2000:]}")
    wall = time.perf_counter() - started
    trials = optuna.load_study(study_name=study, storage=make_storage(storage)).get_trials(
        states=(TrialState.COMPLETE,))
    span = (max(t.datetime_complete for t in trials)
            - min(t.datetime_start for t in trials)).total_seconds()
    return {"setting": name, "trials": len(trials), "trial_span_s": round(span, 2),
            "wall_s": round(wall, 2), "trials_per_hour": round(3600 * len(trials) / span, 1),
            "threads": sorted({(TrialRecord.from_trial(t).runtime or {}).get("threads")
                               for t in trials}),
            "workers": len({(TrialRecord.from_trial(t).worker or {}).get("pid") for t in trials})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="a study TOML (default: a tiny synthetic study)")
    ap.add_argument("--budget", type=int, default=8, help="trials per setting")
    ap.add_argument("--recovery-steps", type=int, default=40, help="tiny study only")
    ap.add_argument("--postgres", metavar="URL", help="an empty PostgreSQL database to use")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/workers_throughput.json"))
    args = ap.parse_args()

    import warnings

    import optuna
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    from nas_fair.config import load_study
    from nas_fair.search.run import available_cores
    from nas_fair.search.storage import shown_url

    work = Path(tempfile.mkdtemp(prefix="nasfair-throughput-"))
    server = None
    try:
        toml = Path(args.config).resolve() if args.config else tiny_study(work,
                                                                          args.recovery_steps)
        name = load_study(toml).name
        warm = work / "warm"
        t = time.perf_counter()
        prepare(toml, warm)
        print(f"prepared the reference and caches once in {time.perf_counter() - t:.0f}s")
        cores = available_cores()
        results = []

        run_dir = fresh_run_dir(warm, work / "jobs1")
        t = time.perf_counter()
        results.append(measure("1 worker (SQLite)", [search(toml, run_dir, args.budget)],
                               f"sqlite:///{run_dir / 'study.db'}", name, t))
        run_dir = fresh_run_dir(warm, work / "jobs2")
        t = time.perf_counter()
        results.append(measure("--jobs 2 (SQLite)",
                               [search(toml, run_dir, args.budget, "--jobs", "2")],
                               f"sqlite:///{run_dir / 'study.db'}", name, t))
        url = args.postgres
        if url is None:
            sys.path.insert(0, str(ROOT / "tests"))
            try:
                from pg_server import find_bindir, start_server

                if find_bindir() is not None:
                    server = start_server()
                    url = server.new_database()
            except Exception as exc:  # noqa: BLE001 - the setting is optional
                print(f"no throwaway PostgreSQL server ({type(exc).__name__}: {exc})")
        if url is not None:
            run_dir = fresh_run_dir(warm, work / "pg")
            env = {"OMP_NUM_THREADS": str(max(1, cores // 2))}  # as --jobs 2 splits them
            t = time.perf_counter()
            procs = [search(toml, run_dir, args.budget, "--storage", url, env=env)
                     for _ in range(2)]
            results.append(measure("2 workers (PostgreSQL)", procs, url, name, t))
        else:
            print("2 workers (PostgreSQL): skipped (no server; pass --postgres URL)")
        base = results[0]["trials_per_hour"]
        for r in results:
            r["ratio_to_1_worker"] = round(r["trials_per_hour"] / base, 2)
            print(f"{r['setting']:<24} {r['trials']} trials, {r['trials_per_hour']:7.1f} "
                  f"trials/h ({r['ratio_to_1_worker']:.2f}x), threads {r['threads']}, "
                  f"{r['workers']} worker process(es), wall {r['wall_s']:.0f}s")
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "study": str(toml) if args.config else "tiny synthetic (BERT 4x64)",
            "budget": args.budget, "cores": cores,
            "postgres": shown_url(url) if url and args.postgres else bool(url),
            "date": time.strftime("%Y-%m-%d"), "results": results}, indent=2) + "\n")
        print(f"wrote {out}")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

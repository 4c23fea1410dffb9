"""What one step of the reference fine-tune costs in fp32 and bfloat16, with random batches and
with batches of rows of similar length.

The study's training data and its untrained model are loaded as ``Session`` loads them; each
variant (``[model] finetune_precision`` x ``finetune_batches``) fine-tunes a copy of the same
start for ``--steps`` steps on the same rows, one variant after the other, ``--rounds`` times
(A B C D A B C D ...). On a shared machine only the ratios within a round mean anything: the
table gives, per variant, the median over rounds of its time / the fp32 random-batch time of
the same round, the spread of those ratios, and the same ratio of this process's CPU time
(less moved by waiting for the cores). The timed rows are one random sample of the training
set, the same for every variant; the mean batch width over a whole epoch of each batching is
printed first.

With ``--full`` the study's reference is then fine-tuned in full with the study's settings
(``new``) and/or with the fine-tune of before (``old``: fp32, random batches) in its own run
folder, and scored as ``nas-fair search`` scores it (test macro-F1 and TPR gap, bootstrap).

    python benchmarks/finetune_speed.py [--steps 6] [--rounds 6] [--full new,old]

Writes benchmarks/results/finetune_speed.json (``--out`` to change).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time
from pathlib import Path
from typing import Any

from _common import (
    RESULTS,
    add_study_args,
    load_cfg,
    open_session,
    reference_dict,
    run_dir,
    table,
    write_json,
)

VARIANTS = (("fp32", "random"), ("bf16", "random"), ("fp32", "by_length"),
            ("bf16", "by_length"))
OLD = {"finetune_precision": "fp32", "finetune_batches": "random"}


def name(variant: tuple[str, str]) -> str:
    return f"{variant[0]}, {variant[1]}"


def widths(lengths: Any, batch_size: int, seed: int) -> dict[str, float]:
    """Mean padded width of one epoch's batches (trimmed to their longest row), per batching."""
    import torch

    from nas_fair.encoder import length_bucketed_batches

    perm = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed))
    by_length = length_bucketed_batches(lengths, batch_size, torch.Generator().manual_seed(seed))
    return {"random": statistics.fmean(float(lengths[b].max()) for b in perm.split(batch_size)),
            "by_length": statistics.fmean(float(lengths[b].max()) for b in by_length)}


def seconds_per_step(start: Any, ids: Any, mask: Any, labels: Any, cfg: Any,
                     variant: tuple[str, str], seed: int) -> tuple[float, float, float]:
    """Wall and CPU (this process) seconds per step, and the mean padded batch width."""
    from nas_fair.modeling import finetune

    model_cfg = dataclasses.replace(cfg.model, epochs=1.0, finetune_precision=variant[0],
                                    finetune_batches=variant[1])
    steps = len(ids) // model_cfg.batch_size
    model = copy.deepcopy(start)
    seen: list[int] = []
    model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["input_ids"].shape[1]), with_kwargs=True)
    t, c = time.perf_counter(), time.process_time()
    finetune(model, ids, mask, labels, model_cfg, seed=seed, quiet=True)
    return ((time.perf_counter() - t) / steps, (time.process_time() - c) / steps,
            statistics.fmean(seen))


def full_run(cfg: Any, folder: Path, threads: int, overrides: dict[str, str]) -> dict[str, Any]:
    cfg = copy.deepcopy(cfg)
    for key, value in overrides.items():
        setattr(cfg.model, key, value)
    cfg.validate()
    session = open_session(cfg, folder, threads)
    info = session.reference_info
    ref = reference_dict(session)
    return {"run_dir": str(folder), "finetune_precision": cfg.model.finetune_precision,
            "finetune_batches": cfg.model.finetune_batches,
            "resolved_precision": info.get("finetune_precision"),
            "cached": bool(info.get("cached")), "finetune_s": info.get("finetune_s"),
            # values = (size, latency, accuracy, bias): ref's attrs hold an "accuracy" table too
            "accuracy": ref["values"][2], "bias": ref["values"][3], "values": ref["values"],
            "bias_ci": ref.get("bias_ci")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_study_args(ap)
    ap.add_argument("--steps", type=int, default=6, help="fine-tuning steps per measurement")
    ap.add_argument("--rounds", type=int, default=6,
                    help="rounds over the variants (0: only --full, kept beside --out's timings)")
    ap.add_argument("--full", default="", help="full fine-tunes to run after: new, old or both")
    ap.add_argument("--out", default=str(RESULTS / "finetune_speed.json"))
    args = ap.parse_args()
    full = [f for f in args.full.split(",") if f]
    if args.steps < 1 or args.rounds < 0 or not set(full) <= {"new", "old"}:
        raise SystemExit(f"--steps must be >= 1, --rounds >= 0 and --full a subset of new,old, got "
                         f"{args.steps}, {args.rounds}, {args.full!r}")

    import tempfile

    import torch

    from nas_fair.encoder import row_lengths
    from nas_fair.modeling import bf16_native, load_for_task, tokenize
    from nas_fair.search.session import Session

    torch.set_num_threads(args.threads)
    cfg = load_cfg(args)
    if not bf16_native(torch.device("cpu")):
        print("note: this CPU has no native bfloat16; bf16 rows run emulated", flush=True)
    with tempfile.TemporaryDirectory() as tmp:  # Session's constructor writes nothing
        session = Session(cfg, Path(tmp), quiet=True)
    train = session.data.train
    ids, mask = tokenize(session.tokenizer, train.texts, cfg.model.max_length)
    labels = torch.from_numpy(train.labels)
    lengths = row_lengths(mask)
    width = widths(lengths, cfg.model.batch_size, cfg.seed)
    quantiles = {q: float(lengths.float().quantile(q / 100)) for q in (10, 50, 90, 99)}
    print(f"{len(ids)} training rows, tokens per row: mean {lengths.float().mean():.1f}, "
          + ", ".join(f"p{q} {v:.0f}" for q, v in quantiles.items())
          + f"; at max_length {cfg.model.max_length}: {(lengths >= cfg.model.max_length).sum()}; "
          f"mean batch width random {width['random']:.1f}, by length {width['by_length']:.1f}",
          flush=True)
    start, _ = load_for_task(session.model_path, cfg.model, session.data.label_names,
                             seed=cfg.seed)
    if args.rounds == 0 and Path(args.out).is_file():
        import json

        results = json.loads(Path(args.out).read_text())
        return run_full(args, cfg, full, results)
    rows = torch.randperm(len(ids), generator=torch.Generator().manual_seed(cfg.seed))
    rows = rows[: args.steps * cfg.model.batch_size]
    sub = (ids[rows], mask[rows], labels[rows])
    for v in VARIANTS:  # warm-up (kernel selection, first allocations), not kept
        seconds_per_step(start, *(t[: cfg.model.batch_size] for t in sub), cfg, v, cfg.seed)
    times: dict[str, list[float]] = {name(v): [] for v in VARIANTS}
    cpu: dict[str, list[float]] = {name(v): [] for v in VARIANTS}
    used: dict[str, float] = {}
    for r in range(args.rounds):
        for v in VARIANTS:
            wall, cpu_s, used[name(v)] = seconds_per_step(start, *sub, cfg, v, cfg.seed)
            times[name(v)].append(wall)
            cpu[name(v)].append(cpu_s)
            print(f"round {r + 1}, {name(v)}: {wall:.3f} s/step ({cpu_s:.3f} CPU s)", flush=True)

    def over_base(per: dict[str, list[float]]) -> dict[str, list[float]]:
        base = per[name(VARIANTS[0])]
        return {k: [b / t for b, t in zip(base, ts)] for k, ts in per.items()}

    ratios, cpu_ratios = over_base(times), over_base(cpu)
    rows_out = [[k, used[k], statistics.median(times[k]), statistics.median(ratios[k]),
                 min(ratios[k]), max(ratios[k]), statistics.median(cpu_ratios[k])]
                for k in times]
    print(table(rows_out, ["variant", "batch width", "s per step (median)",
                           "speed-up vs fp32 random (median)", "min", "max",
                           "CPU-time speed-up (median)"]))
    results: dict[str, Any] = {
        "study": cfg.name, "steps": args.steps, "rounds": args.rounds, "threads": args.threads,
        "bf16_native": bf16_native(torch.device("cpu")), "rows": len(ids),
        "tokens_per_row": {"mean": float(lengths.float().mean()), **{f"p{q}": v for q, v in
                                                                     quantiles.items()}},
        "mean_batch_width": width, "timed_batch_width": used, "seconds_per_step": times,
        "cpu_seconds_per_step": cpu, "speedup_vs_fp32_random": ratios,
        "cpu_speedup_vs_fp32_random": cpu_ratios,
    }
    run_full(args, cfg, full, results)


def run_full(args: argparse.Namespace, cfg: Any, full: list[str], results: dict[str, Any]) -> None:
    runs = results.setdefault("full", {})
    write_json(Path(args.out), results)  # again after each full run (each takes minutes)
    folder = run_dir(args, cfg)
    for which in full:
        runs[which] = full_run(cfg, folder if which == "new" else
                               folder.with_name(f"{folder.name}-finetune-old"), args.threads,
                               {} if which == "new" else OLD)
        print(f"full fine-tune ({which}: {runs[which]['finetune_precision']}, "
              f"{runs[which]['finetune_batches']}): {runs[which]['finetune_s']} s"
              f"{' (cached)' if runs[which]['cached'] else ''}, test accuracy "
              f"{runs[which]['accuracy']:.4f}, bias {runs[which]['bias']:.4f}", flush=True)
        write_json(Path(args.out), results)


if __name__ == "__main__":
    main()

"""What one recovery step costs with and without dropout, and with which attention kernel.

One fixed student (default: FFN pruned 25%, all layers kept) is recovered for ``--steps``
steps (early stopping off) in each variant, in turn, ``--rounds`` times (median kept):

* dropout on, masks from random bits (what recovery runs: ``nas_fair.modeling.fast_dropout``);
* dropout on, torch's masks (``nn.Dropout`` and SDPA's own dropout: Bernoulli draws);
* dropout off, math kernel (what ``recovery_dropout = false`` runs on a CPU);
* dropout off, SDPA's own choice (the fused CPU flash-attention kernel).

Then ``--steps`` dropout-on steps under the torch profiler, for each mask source, give the share
of CPU time spent drawing dropout masks (``aten::bernoulli_`` for torch's, ``aten::random_``
and the comparison that turns bits into a mask for the fast ones).

    python benchmarks/recovery_step_profile.py [--prune ffn=0.25] [--steps 40] [--rounds 2]

Writes benchmarks/results/recovery_step_profile.json (``--out`` to change).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
from pathlib import Path
from typing import Any

from _common import RESULTS, add_study_args, load_cfg, open_session, run_dir, table, write_json
from recovery_curve import parse_prune

VARIANTS = ("dropout on", "dropout on, torch masks", "dropout off, math kernel",
            "dropout off, flash kernel")
MASK_OPS = {True: ("aten::random_", "aten::ge"), False: ("aten::bernoulli_",)}


def seconds_per_step(session: Any, student: Any, variant: str, steps: int,
                     precision: str) -> float:
    from nas_fair.spaces import recovery

    kernels = recovery.attention_kernels
    if variant.endswith("flash kernel"):  # SDPA left to choose: what dropout off would pick
        recovery.attention_kernels = lambda device, dropout: contextlib.nullcontext()
    try:
        model = copy.deepcopy(student)
        t = time.perf_counter()
        recovery.recover(model, session.ctx, steps=steps, early_stop=False,
                             precision=precision, dropout=variant.startswith("dropout on"),
                             fast_masks=not variant.endswith("torch masks"))
        return (time.perf_counter() - t) / steps
    finally:
        recovery.attention_kernels = kernels


def mask_share(session: Any, student: Any, steps: int, precision: str,
               fast: bool) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    from nas_fair.spaces.recovery import recover

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        recover(copy.deepcopy(student), session.ctx, steps=steps, early_stop=False,
                precision=precision, dropout=True, fast_masks=fast)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    masks = sum(e.self_cpu_time_total for e in events if e.key in MASK_OPS[fast])
    return {"masks_s": masks / 1e6, "total_s": total / 1e6, "share": masks / total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_study_args(ap)
    ap.add_argument("--prune", default="ffn=0.25", help="the fixed student's pruning")
    ap.add_argument("--steps", type=int, default=40, help="recovery steps per measurement")
    ap.add_argument("--rounds", type=int, default=2, help="rounds over the variants")
    ap.add_argument("--out", default=str(RESULTS / "recovery_step_profile.json"))
    args = ap.parse_args()
    if args.steps < 1 or args.rounds < 1:
        raise SystemExit(f"--steps and --rounds must be >= 1, got {args.steps}, {args.rounds}")

    from nas_fair.spaces import compress
    from nas_fair.spaces.pruning import PruningConfig
    from nas_fair.spaces.recovery import resolve_precision

    cfg = load_cfg(args)
    session = open_session(cfg, run_dir(args, cfg), args.threads)
    prune = parse_prune(args.prune)
    student = compress(session.reference, {"pruning": PruningConfig(**prune)}, session.ctx)
    precision = resolve_precision(cfg.search.recovery_precision, session.device)
    seconds_per_step(session, student, VARIANTS[0], 5, precision)  # warm-up, not kept
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for v in VARIANTS:
            times[v].append(seconds_per_step(session, student, v, args.steps, precision))
            print(f"{v}: {times[v][-1]:.3f} s/step", flush=True)
    median = {v: statistics.median(t) for v, t in times.items()}
    share = {"random bits" if fast else "torch": mask_share(session, student, args.steps,
                                                            precision, fast)
             for fast in (True, False)}
    base = median[VARIANTS[0]]
    print(table([[v, median[v], median[v] / base] for v in VARIANTS],
                ["variant", "s per step (median)", "this / dropout on"]))
    for source, sh in share.items():
        print(f"dropout masks, {source}: {100 * sh['share']:.1f}% of the CPU time of "
              f"{args.steps} dropout-on steps ({' + '.join(MASK_OPS[source != 'torch'])})")
    write_json(Path(args.out), {
        "study": cfg.name, "prune": prune, "steps": args.steps, "rounds": args.rounds,
        "threads": args.threads, "precision": precision, "seconds_per_step": times,
        "median": median, "mask_share": share,
    })


if __name__ == "__main__":
    main()

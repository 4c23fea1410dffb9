"""Does training in a process change the latency measured in it afterwards?

A search measures each trial's latency in the process that just recovered the trial's student,
against a reference timed once at the study's start. This times the int8 and fp32 versions of
the study's reference in a fresh process, then again after each of a few recoveries
(``--precisions``, ``--steps`` each), all in one process.

    python benchmarks/latency_after_training.py [--study bios] [--precisions bf16,fp32]
        [--steps 40]

Writes benchmarks/results/latency_after_training.json.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

from _common import (
    RESULTS,
    add_study_args,
    load_cfg,
    open_session,
    run_dir,
    table,
    write_json,
)


def timings(session: Any, models: dict[str, Any]) -> dict[str, dict[str, float]]:
    out = {}
    for name, model in models.items():
        lat = session.latency(model)
        out[name] = {"median_ms": lat["median_ms"], "iqr_ms": lat["iqr_ms"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_study_args(ap)
    ap.add_argument("--precisions", default="bf16,fp32", help="recoveries to run, in order")
    ap.add_argument("--steps", type=int, default=40, help="steps per recovery")
    ap.add_argument("--out", default=str(RESULTS / "latency_after_training.json"))
    args = ap.parse_args()

    from nas_fair.spaces.recovery import recover

    cfg = load_cfg(args)
    session = open_session(cfg, run_dir(args, cfg), args.threads)
    models = {"int8": session.replay({"quantization.attention_bits": 8,
                                      "quantization.ffn_bits": 8,
                                      "quantization.embedding_bits": 8}),
              "fp32 reference": session.reference}
    rows = [{"after": "nothing (fresh process)", **timings(session, models)}]
    print(rows[-1], flush=True)
    for precision in [p.strip() for p in args.precisions.split(",") if p.strip()]:
        student = copy.deepcopy(session.reference)
        recover(student, session.ctx, steps=args.steps, precision=precision, early_stop=False)
        rows.append({"after": f"{args.steps} {precision} recovery steps",
                     **timings(session, models)})
        print(rows[-1], flush=True)
    print(table([[r["after"], *(f"{r[m]['median_ms']:.1f} (iqr {r[m]['iqr_ms']:.1f})"
                                for m in models)] for r in rows],
                ["latency measured after", *(f"{m} ms" for m in models)]))
    write_json(Path(args.out), {"study": cfg.name, "threads": args.threads, "steps": args.steps, "rows": rows})


if __name__ == "__main__":
    main()

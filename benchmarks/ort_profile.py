"""Where onnxruntime spends a forward pass: time per operator type, a model against the reference.

Answers "why is one backend slower for some models": the model (``--model DIR``, an exported
folder; default the study's int8 anchor built from the reference) and the study's reference
are exported as ``nas-fair export --onnx`` does and run in onnxruntime with its profiler on, at
the study's batch and length, alternating runs; the node events are summed per operator type
(milliseconds per pass, share of the pass). The same two models' torch times are printed for
scale.

    python benchmarks/ort_profile.py [--model DIR] [--runs 10]
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path
from typing import Any

from _common import (
    RESULTS,
    add_study_args,
    bits,
    load_cfg,
    open_session,
    run_dir,
    table,
    write_json,
)


def profile(model: Any, *, threads: int, batch: int, seq: int, vocab: int, runs: int,
            work: Path, name: str) -> dict[str, Any]:
    """Per-op-type milliseconds per pass of ``model``'s ONNX graph, and the pass's median."""
    import onnxruntime as ort

    from nas_fair.objectives.onnx_latency import has_int8, ort_timer
    from nas_fair.onnx_export import export_onnx, session_options

    path = work / f"{name}.onnx"
    export_onnx(model, path, int8=has_int8(model), max_length=seq)
    opts = session_options(threads=threads)
    opts.enable_profiling = True
    opts.profile_file_prefix = str(work / name)
    session = ort.InferenceSession(str(path), sess_options=opts,
                                   providers=["CPUExecutionProvider"])
    run = ort_timer(session, model, batch, seq, vocab)
    for _ in range(2):
        run()
    times = sorted(run() for _ in range(runs))
    events = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"] / 1000.0
    passes = runs + 2
    return {"median_ms": times[len(times) // 2],
            "per_op_ms": {k: v / passes for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_study_args(ap)
    ap.add_argument("--model", help="an exported model folder (default: the int8 anchor)")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--out", default=str(RESULTS / "ort_profile.json"))
    args = ap.parse_args()
    import nas_fair
    from nas_fair.objectives.interleaved import measure_latency_ratio

    cfg = load_cfg(args)
    session = open_session(cfg, run_dir(args, cfg), args.threads)
    model = nas_fair.load(args.model) if args.model else session.replay(bits(8))
    s = cfg.search
    vocab = model.config.vocab_size
    common = {"threads": args.threads, "batch": s.batch_size, "seq": s.seq_len, "vocab": vocab,
              "runs": args.runs}
    with tempfile.TemporaryDirectory(prefix="nas-fair-ortprof-") as tmp:
        out = {"model": profile(model, work=Path(tmp), name="model", **common),
               "reference": profile(session.reference, work=Path(tmp), name="reference",
                                    **common)}
    out["torch"] = measure_latency_ratio(model, session.reference, batch_size=s.batch_size,
                                         seq_len=s.seq_len, threads=args.threads, rounds=5,
                                         per_round=1, vocab_size=vocab)
    rows = []
    ops = sorted(set(out["model"]["per_op_ms"]) | set(out["reference"]["per_op_ms"]),
                 key=lambda k: -(out["model"]["per_op_ms"].get(k, 0)
                                 + out["reference"]["per_op_ms"].get(k, 0)))
    for op in ops:
        m, r = out["model"]["per_op_ms"].get(op, 0.0), out["reference"]["per_op_ms"].get(op, 0.0)
        rows.append([op, f"{m:.1f}", f"{m / sum(out['model']['per_op_ms'].values()):.0%}",
                     f"{r:.1f}", f"{r / sum(out['reference']['per_op_ms'].values()):.0%}"])
    print(f"{args.model or 'int8 anchor'} vs reference, onnxruntime, {args.threads} threads, "
          f"batch {s.batch_size} x {s.seq_len}: median pass {out['model']['median_ms']:.1f} ms "
          f"vs {out['reference']['median_ms']:.1f} ms; torch {out['torch']['candidate_ms']:.1f} "
          f"vs {out['torch']['reference_ms_now']:.1f} ms")
    print(table(rows, ["op type", "model ms", "share", "reference ms", "share"]))
    out.update(study=cfg.name, threads=args.threads, model_dir=args.model)
    write_json(Path(args.out), out)


if __name__ == "__main__":
    main()

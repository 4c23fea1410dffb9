"""Is an exported model the issue's headline: >= 8x smaller, >= 4x faster, >= 95% macro-F1, no
more biased? Checked on the folder a user deploys.

``--model DIR`` is a folder ``nas-fair compress`` (or export) wrote. Size is its weight bytes
as exported (``model.safetensors``) against the reference's; latency is the loaded folder timed
in alternating rounds with the study's reference in this process, in torch and (installed) in
onnxruntime, at the study's batch and length (both fed the same ids, valid for the trimmed
vocabulary too); accuracy, bias (paired interval of the difference to the reference), the
counterfactual flip rate and who paid per group are the folder's ``metrics.json``, which the
export checked against the model's own predictions.

    python benchmarks/headline.py --model DIR [--rounds 15] [--out benchmarks/results/headline.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from typing import Any

from _common import RESULTS, add_study_args, load_cfg, open_session, run_dir, table, write_json

TARGET = {"smaller": 8.0, "faster": 4.0, "kept": 0.95}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_study_args(ap)
    ap.add_argument("--model", required=True, help="an exported model folder")
    ap.add_argument("--rounds", type=int, default=15, help="alternating rounds (default 15)")
    ap.add_argument("--out", default=str(RESULTS / "headline.json"))
    args = ap.parse_args()
    import nas_fair
    from nas_fair.objectives.interleaved import measure_latency_ratio
    from nas_fair.objectives.onnx_latency import measure_ort_latency_ratio

    folder = Path(args.model)
    metrics = json.loads((folder / "metrics.json").read_text())
    cfg = load_cfg(args)
    session = open_session(cfg, run_dir(args, cfg), args.threads)
    model = nas_fair.load(folder)
    s = cfg.search
    common = {"batch_size": s.batch_size, "seq_len": s.seq_len, "rounds": args.rounds,
              "per_round": 1, "vocab_size": model.config.vocab_size}
    latency = {"torch": measure_latency_ratio(model, session.reference, threads=args.threads,
                                              **common)}
    if all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime")):
        latency["onnxruntime"] = measure_ort_latency_ratio(
            model, session.ort_reference(), session.reference, threads=args.threads,
            max_length=s.seq_len, **common)
    o = metrics["objectives"]
    acc, bias = o[cfg.objectives.accuracy], metrics["bias"][cfg.objectives.bias]
    size = o["size_mb"]
    smaller = size["reference_bytes"] / size["exported_weight_bytes"]
    faster = {name: 1 / rec["ratio"] for name, rec in latency.items()}
    checks = {
        f"smaller >= {TARGET['smaller']}x (exported weights)": smaller >= TARGET["smaller"],
        f"faster >= {TARGET['faster']}x (torch)": faster["torch"] >= TARGET["faster"],
        f"{cfg.objectives.accuracy} kept >= {TARGET['kept']:.0%}": acc["ratio"] >= TARGET["kept"],
        f"{cfg.objectives.bias} - reference: interval reaches 0": bias["diff_low"] <= 0,
        "not collapsed": not metrics["collapse"]["collapsed"],
    }
    cf = metrics["bias"].get("counterfactual_flip_rate")
    result: dict[str, Any] = {
        "model": str(folder), "study": cfg.name, "threads": args.threads,
        "recipe": json.loads((folder / "recipe.json").read_text())["params"],
        "smaller": smaller, "exported_weight_bytes": size["exported_weight_bytes"],
        "reference_bytes": size["reference_bytes"], "faster": faster, "latency": latency,
        "accuracy": {"value": acc["value"], "ci": acc["ci"], "reference": acc["reference"],
                     "kept": acc["ratio"]},
        "bias": bias, "counterfactual_flip_rate": cf, "who_paid": metrics.get("disparity"),
        "checks": checks, "target_met": all(checks.values()),
    }
    write_json(Path(args.out), result)
    print(f"{folder}: {smaller:.2f}x smaller; " + ", ".join(
        f"{name} {x:.2f}x faster ({latency[name]['candidate_ms']:.1f} vs "
        f"{latency[name]['reference_ms_now']:.1f} ms)" for name, x in faster.items())
        + f" at {args.threads} threads")
    print(f"{cfg.objectives.accuracy} {acc['value']:.3f} [{acc['ci'][0]:.3f}, {acc['ci'][1]:.3f}]"
          f" = {acc['ratio']:.1%} of {acc['reference']:.3f}; {cfg.objectives.bias} "
          f"{bias['value']:.3f} vs {bias['ref_value']:.3f}, difference {bias['diff']:+.3f} "
          f"[{bias['diff_low']:+.3f}, {bias['diff_high']:+.3f}]"
          + (f"; counterfactual flip rate {cf['value']:.3f} (reference {cf['ref_value']:.3f})"
             if cf else ""))
    if metrics.get("disparity"):
        print(table([[g, r["n"], f"{r['flipped']:.3f}", f"{r['newly_wrong']:.3f}",
                      f"{r['newly_right']:.3f}"] for g, r in metrics["disparity"].items()],
                    ["group", "rows", "changed", "right -> wrong", "wrong -> right"]))
    for name, ok in checks.items():
        print(f"  {'met' if ok else 'NOT met'}: {name}")


if __name__ == "__main__":
    main()

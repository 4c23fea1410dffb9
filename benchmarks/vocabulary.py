"""Vocabulary trimming on the default study: kept rows, bytes, test OOV rate and what it costs.

For each share of other tokens kept (``vocabulary.others``), on the study's fine-tuned reference
and without recovery (kept rows are unchanged, only out-of-vocabulary tokens change): kept rows,
stored bytes as the search counts them and as exported, the test split's out-of-vocabulary rate
(real tokens that now read [UNK]), overall and per group, and macro-F1, the study's bias metric,
per-group accuracy and the share of changed predictions against the reference.

    python benchmarks/vocabulary.py [--study bios] [--threads 2] [--out FILE]

Needs the study's run folder (made on first use: the reference is fine-tuned once).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

from _common import (
    RESULTS,
    add_study_args,
    fmt,
    load_cfg,
    open_session,
    paired_objectives,
    run_dir,
    table,
    write_json,
)

SHARES = (0.0, 0.1, 0.3)


def group_table(record: Any) -> dict[str, float]:
    import numpy as np

    groups = np.asarray(record.groups)
    return {str(g): float((record.y_pred[groups == g] == record.y_true[groups == g]).mean())
            for g in sorted(set(groups.tolist()))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_study_args(ap)
    ap.add_argument("--evaluate", action="store_true",
                    help="also predict the test split (fine-tunes the reference on first use)")
    ap.add_argument("--out", default=str(RESULTS / "vocabulary.json"))
    args = ap.parse_args()

    import numpy as np
    import torch

    from nas_fair.checkpoint import stored_bytes
    from nas_fair.modeling import load_for_task, tokenize
    from nas_fair.objectives import ACCURACY, BIAS
    from nas_fair.search.session import Session
    from nas_fair.spaces import CompressionContext, RecoveryData, compress
    from nas_fair.spaces.quantization import QuantizationConfig
    from nas_fair.spaces.vocabulary import VocabularyConfig, remapped, to_direct_ids

    cfg = load_cfg(args)
    torch.set_num_threads(args.threads)
    folder = run_dir(args, cfg)
    if args.evaluate:
        session = open_session(cfg, folder, args.threads)
        ref, ctx = session.reference, session.ctx
        test_ids, test_mask = session.tensors["test_ids"], session.tensors["test_mask"]
    else:  # sizes and OOV rates need the tokenizer and the data only, not the trained weights
        session = Session(cfg, folder, quiet=True)
        ref, _ = load_for_task(session.model_path, cfg.model, session.data.label_names,
                               seed=cfg.seed)
        L = cfg.model.max_length
        tr_ids, tr_mask = tokenize(session.tokenizer, session.data.train.texts, L)
        n = len(tr_ids)
        ctx = CompressionContext(reference=ref, tokenizer=session.tokenizer, train=RecoveryData(
            tr_ids, tr_mask, torch.zeros(n, dtype=torch.long), torch.zeros(n, 1),
            texts=session.data.train.texts))
        test_ids, test_mask = tokenize(session.tokenizer, session.data.test.texts, L)
    tok = session.tokenizer
    real = test_mask.bool()
    groups = np.asarray(session.data.test.groups)
    names = sorted(set(groups.tolist()))
    acc_name, bias_name = cfg.objectives.accuracy, cfg.objectives.bias
    int8_emb = {"quantization": QuantizationConfig(embedding_bits=8)}

    def by_group(values: Any, weights: Any = None) -> dict[str, float]:
        return {str(g): float(values[groups == g].sum() / (
            weights[groups == g].sum() if weights is not None else (groups == g).sum()))
            for g in names}

    rows: list[dict[str, Any]] = [{
        "others": "reference", "kept_rows": ref.config.vocab_size,
        "search_bytes": stored_bytes(ref), "exported_bytes": stored_bytes(ref),
        "exported_bytes_int8_embeddings": stored_bytes(compress(ref, int8_emb, ctx)),
        "oov_rate": 0.0, "rows_with_oov": 0.0}]
    if args.evaluate:
        rows[0].update({acc_name: ACCURACY[acc_name](session.ref_record),
                        bias_name: BIAS[bias_name](session.ref_record),
                        "group_accuracy": group_table(session.ref_record), "changed": 0.0})
    for share in SHARES:
        t = time.perf_counter()
        model = compress(ref, {"vocabulary": VocabularyConfig(share)}, ctx)
        remap = remapped(model)
        oov = real & (remap.new_ids(test_ids) == remap.unk_index) & (test_ids != tok.unk_token_id)
        exported = copy.deepcopy(model)
        to_direct_ids(exported)
        exported_q = compress(ref, {"vocabulary": VocabularyConfig(share), **int8_emb}, ctx)
        to_direct_ids(exported_q)
        row: dict[str, Any] = {
            "others": share, "kept_rows": remap.num_kept,
            "search_bytes": stored_bytes(model), "exported_bytes": stored_bytes(exported),
            "exported_bytes_int8_embeddings": stored_bytes(exported_q),
            "oov_rate": float(oov.sum() / real.sum()),
            # rows without an OOV token are predicted bit-identically: a bound on what changes
            "rows_with_oov": float(oov.any(dim=1).float().mean()),
            "oov_rate_by_group": by_group(oov.sum(dim=1).numpy(), real.sum(dim=1).numpy()),
            "rows_with_oov_by_group": by_group(oov.any(dim=1).numpy()),
        }
        if args.evaluate:
            record = session.evaluate(model)
            changed = record.y_pred != session.ref_record.y_pred
            row.update({
                acc_name: ACCURACY[acc_name](record), bias_name: BIAS[bias_name](record),
                "group_accuracy": group_table(record), "changed": float(changed.mean()),
                "changed_by_group": by_group(changed),
                "paired_vs_reference": paired_objectives(cfg, record, session.ref_record)})
        row["seconds"] = round(time.perf_counter() - t, 1)
        rows.append(row)
        print(f"others {share}: {row['kept_rows']} rows, test OOV {row['oov_rate']:.4f}, "
              f"{row['seconds']}s", flush=True)

    header = ["others", "kept rows", "search MB", "exported MB", "exported MB, int8 emb.",
              "test OOV", "rows w/ OOV", *[f"rows w/ OOV {g}" for g in names]]
    extra = [acc_name, bias_name, "changed", *[f"acc {g}" for g in names]] if args.evaluate else []
    body = []
    for r in rows:
        line = [r["others"], r["kept_rows"], fmt(r["search_bytes"] / 1e6, 3),
                fmt(r["exported_bytes"] / 1e6, 3),
                fmt(r["exported_bytes_int8_embeddings"] / 1e6, 3), fmt(r["oov_rate"], 4),
                fmt(r["rows_with_oov"], 4),
                *[fmt(r.get("rows_with_oov_by_group", {}).get(str(g), 0.0), 4) for g in names]]
        if args.evaluate:
            line += [fmt(r[acc_name], 4), fmt(r[bias_name], 4), fmt(r["changed"], 4),
                     *[fmt(r["group_accuracy"][str(g)], 4) for g in names]]
        body.append(line)
    print(table(body, header + extra))
    write_json(Path(args.out), {
        "study": cfg.name, "threads": args.threads, "test_rows": int(len(test_ids)),
        "test_tokens": int(real.sum()), "train_rows": len(ctx.train),
        "evaluated": bool(args.evaluate), "recovery": "none (kept rows are unchanged)",
        "rows": rows})


if __name__ == "__main__":
    main()

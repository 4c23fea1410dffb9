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
    ap.add_argument("--out", default=str(RESULTS / "vocabulary.json"))
    args = ap.parse_args()

    import numpy as np

    from nas_fair.checkpoint import stored_bytes
    from nas_fair.objectives import ACCURACY, BIAS
    from nas_fair.spaces import compress
    from nas_fair.spaces.vocabulary import VocabularyConfig, remapped, to_direct_ids

    cfg = load_cfg(args)
    session = open_session(cfg, run_dir(args, cfg), args.threads)
    ref = session.reference
    tok = session.tokenizer
    test_ids, test_mask = session.tensors["test_ids"], session.tensors["test_mask"]
    real = test_mask.bool()
    groups = np.asarray(session.data.test.groups)
    ref_record = session.ref_record
    acc_name, bias_name = cfg.objectives.accuracy, cfg.objectives.bias
    rows: list[dict[str, Any]] = [{
        "others": "reference", "kept_rows": ref.config.vocab_size,
        "search_bytes": stored_bytes(ref), "exported_bytes": stored_bytes(ref),
        "oov_rate": 0.0, "rows_with_oov": 0.0,
        acc_name: ACCURACY[acc_name](ref_record), bias_name: BIAS[bias_name](ref_record),
        "group_accuracy": group_table(ref_record), "changed": 0.0,
    }]
    for share in SHARES:
        t = time.perf_counter()
        model = compress(ref, {"vocabulary": VocabularyConfig(share)}, session.ctx)
        remap = remapped(model)
        new = remap.new_ids(test_ids)
        unk_row = remap.unk_index
        oov = real & (new == unk_row) & (test_ids != tok.unk_token_id)
        record = session.evaluate(model)
        changed = record.y_pred != ref_record.y_pred
        exported = copy.deepcopy(model)
        to_direct_ids(exported)
        row = {
            "others": share, "kept_rows": remap.num_kept,
            "search_bytes": stored_bytes(model), "exported_bytes": stored_bytes(exported),
            "oov_rate": float(oov.sum() / real.sum()),
            "rows_with_oov": float(oov.any(dim=1).float().mean()),
            "oov_rate_by_group": {str(g): float(oov[groups == g].sum() / real[groups == g].sum())
                                  for g in sorted(set(groups.tolist()))},
            acc_name: ACCURACY[acc_name](record), bias_name: BIAS[bias_name](record),
            "group_accuracy": group_table(record), "changed": float(changed.mean()),
            "changed_by_group": {str(g): float(changed[groups == g].mean())
                                 for g in sorted(set(groups.tolist()))},
            "paired_vs_reference": paired_objectives(cfg, record, ref_record),
            "seconds": round(time.perf_counter() - t, 1),
        }
        rows.append(row)
        print(f"others {share}: {row['kept_rows']} rows, OOV {row['oov_rate']:.4f}, "
              f"{acc_name} {row[acc_name]:.4f}, {row['seconds']}s", flush=True)

    header = ["others", "kept rows", "search MB", "exported MB", "test OOV", "rows w/ OOV",
              acc_name, bias_name, "changed", *[f"acc {g}" for g in rows[0]["group_accuracy"]]]
    print(table([[r["others"], r["kept_rows"], fmt(r["search_bytes"] / 1e6, 3),
                  fmt(r["exported_bytes"] / 1e6, 3), fmt(r["oov_rate"], 4),
                  fmt(r["rows_with_oov"], 4), fmt(r[acc_name], 4), fmt(r[bias_name], 4),
                  fmt(r["changed"], 4), *[fmt(v, 4) for v in r["group_accuracy"].values()]]
                 for r in rows], header))
    write_json(Path(args.out), {
        "study": cfg.name, "threads": args.threads, "test_rows": int(len(test_ids)),
        "test_tokens": int(real.sum()), "train_rows": len(session.ctx.train),
        "recovery": "none (kept rows are unchanged)", "rows": rows})


if __name__ == "__main__":
    main()

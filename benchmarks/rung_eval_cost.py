"""What scoring one result costs at a lower rung and at the top rung, side by side.

One compressed student (``--params``, flat trial parameters; no recovery, as scoring does not
depend on it) is evaluated and scored as ``nas-fair search`` does it: a final (top-rung)
result (every test row, the gender-swapped rows, every bias metric and the audit's views), a
lower rung on every row (the objectives only, swapped rows only when the objective reads them;
and once more with the swapped rows, as before a lower rung skipped them), and a lower rung on
each ``--shares`` sample of the rows (``[search] fidelity_test_share``).
The settings alternate within each round in one process, so load on the machine hits them
alike; the median per setting and its ratio to the final result's are printed. Latency is not
included: a lower rung times its model as a final result does.

    python benchmarks/rung_eval_cost.py [--rounds 3] [--shares 0.25,0.5]
        [--params '{"pruning.ffn": 0.5, "pruning.layers": 1}']
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from _common import RESULTS, add_study_args, load_cfg, open_session, run_dir, table, write_json


def score_once(session: Any, model: Any, *, full: bool, rows: Any, swapped: bool = False,
               ) -> float:
    """Seconds to evaluate and score ``model`` (``swapped``: plus predicting the gender-swapped
    rows, as a lower rung did before it skipped them for objectives that do not read them)."""
    from nas_fair.modeling import predict_logits

    session.lower_rows = rows
    t = time.perf_counter()
    record = session.evaluate(model, full=full)
    if swapped:
        predict_logits(model, session.tensors["cf_ids"], session.tensors["cf_mask"],
                       batch_size=session.cfg.search.eval_batch_size, device=session.device)
    session.score(model, record, paired=True, latency={"median_ms": 0.0}, full=full)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_study_args(ap)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shares", default="0.25,0.5")
    ap.add_argument("--params", default='{"pruning.ffn": 0.5, "pruning.layers": 1}')
    ap.add_argument("--out", default=str(RESULTS / "rung_eval_cost.json"))
    args = ap.parse_args()
    from nas_fair.search.fidelity import lower_rung_rows

    cfg = load_cfg(args)
    session = open_session(cfg, run_dir(args, cfg), args.threads)
    model = session.replay(json.loads(args.params))
    test = session.data.test
    settings: dict[str, tuple[bool, Any, bool]] = {
        "final (top rung)": (True, None, False),
        "lower rung, every row, with the swapped rows": (False, None, True),
        "lower rung, every row": (False, None, False)}
    for share in (float(v) for v in args.shares.split(",") if v.strip()):
        rows = lower_rung_rows(test.labels, test.groups, share, cfg.seed)
        settings[f"lower rung, share {share} ({len(rows)} rows)"] = (False, rows, False)
    times: dict[str, list[float]] = {k: [] for k in settings}
    for _ in range(args.rounds):
        for name, (full, rows, swapped) in settings.items():
            times[name].append(score_once(session, model, full=full, rows=rows, swapped=swapped))
    final = statistics.median(times["final (top rung)"])
    rows_out = [[name, f"{statistics.median(v):.2f}", f"{statistics.median(v) / final:.2f}",
                 " ".join(f"{x:.2f}" for x in v)] for name, v in times.items()]
    print(f"{cfg.name}: scoring one result ({len(test)} test rows, {args.threads} threads, "
          f"{args.rounds} alternating rounds, student {args.params})")
    print(table(rows_out, ["setting", "median s", "/ final", "rounds (s)"]))
    write_json(Path(args.out), {"study": cfg.name, "threads": args.threads, "params":
                                json.loads(args.params), "test_rows": len(test),
                                "rounds": args.rounds, "seconds": times})


if __name__ == "__main__":
    main()

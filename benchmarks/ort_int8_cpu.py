"""What ONNX Runtime's int8 session options cost and fix on this CPU: one int8 file, three ways.

The study's int8 anchor (or ``--model DIR``, an exported folder) is exported as
``nas-fair export --onnx`` does, once with int8 MatMuls and once in fp32 (``int8=False``), and
run in onnxruntime with default session options and with
``nas_fair.onnx_export.session_options()`` (which adds ``session.x64quantprecision=1`` only
where the uint8 x int8 kernel saturates, i.e. on x86 CPUs without VNNI). For each it prints
how far the test rows' logits are from the torch model's (a row's largest difference over the
largest logit: the median row and the worst; argmax agreement) and the median pass at the
study's batch and length; the passes of all configurations and the fp32 reference file are
timed in turns, one pass each per round.

    python benchmarks/ort_int8_cpu.py [--model DIR] [--rows 512] [--rounds 15]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

from _common import (
    RESULTS,
    add_study_args,
    bits,
    load_cfg,
    machine,
    open_session,
    run_dir,
    table,
    write_json,
)


def logits_of(sess: Any, ids: Any, mask: Any, chunk: int = 64) -> Any:
    import numpy as np

    return np.concatenate([sess.run(["logits"], {"input_ids": ids[i:i + chunk],
                                                 "attention_mask": mask[i:i + chunk]})[0]
                           for i in range(0, len(ids), chunk)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_study_args(ap)
    ap.add_argument("--model", help="an exported model folder (default: the int8 anchor)")
    ap.add_argument("--rows", type=int, default=512, help="test rows compared with torch")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", default=str(RESULTS / "ort_int8_cpu.json"))
    args = ap.parse_args()
    import numpy as np
    import onnxruntime as ort
    import torch

    import nas_fair
    from nas_fair.objectives.onnx_latency import ort_timer
    from nas_fair.onnx_export import PRECISE_INT8, export_onnx, ort_int8_exact, session_options

    cfg = load_cfg(args)
    session = open_session(cfg, run_dir(args, cfg), args.threads)
    model = nas_fair.load(args.model) if args.model else session.replay(bits(8))
    model.eval()
    s, max_length = cfg.search, cfg.model.max_length
    enc = session.tokenizer(session.data.test.texts[:args.rows], padding="max_length",
                            truncation=True, max_length=max_length, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
    with torch.no_grad():
        want = torch.cat([model(input_ids=torch.from_numpy(ids[i:i + 64]),
                                attention_mask=torch.from_numpy(mask[i:i + 64])).logits
                          for i in range(0, len(ids), 64)]).numpy()

    default = ort.SessionOptions()
    default.intra_op_num_threads, default.inter_op_num_threads = args.threads, 1
    out: dict[str, Any] = {"machine": machine(), "study": cfg.name, "model_dir": args.model,
                           "rows": len(ids), "threads": args.threads,
                           "uint8_x_int8_exact": ort_int8_exact(), "configs": {}}
    with tempfile.TemporaryDirectory(prefix="nas-fair-ortint8-") as tmp:
        files = {"int8": Path(tmp) / "int8.onnx", "fp32": Path(tmp) / "fp32.onnx",
                 "reference": Path(tmp) / "reference.onnx"}
        export_onnx(model, files["int8"], int8=True, max_length=max_length)
        export_onnx(model, files["fp32"], int8=False, max_length=max_length)
        export_onnx(session.reference, files["reference"], int8=False, max_length=max_length)
        configs = {"int8 file, default options": (files["int8"], default),
                   "int8 file, session_options()": (files["int8"],
                                                    session_options(threads=args.threads)),
                   "fp32 file": (files["fp32"], default)}
        sessions = {name: ort.InferenceSession(str(f), sess_options=o,
                                               providers=["CPUExecutionProvider"])
                    for name, (f, o) in configs.items()}
        ref_sess = ort.InferenceSession(str(files["reference"]), sess_options=default,
                                        providers=["CPUExecutionProvider"])
        for name, sess in sessions.items():
            got = logits_of(sess, ids, mask)
            rowmax = np.abs(got - want).max(1) / np.abs(want).max()
            out["configs"][name] = {
                "max_diff_over_max_logit": float(rowmax.max()),
                "median_row_diff_over_max_logit": float(np.median(rowmax)),
                "argmax_agreement": float((got.argmax(1) == want.argmax(1)).mean())}
        timers = {name: ort_timer(sess, model, s.batch_size, s.seq_len, None)
                  for name, sess in sessions.items()}
        timers["fp32 reference file"] = ort_timer(ref_sess, session.reference, s.batch_size,
                                                  s.seq_len, None)
        names = list(timers)
        for name in names:  # warm-up
            timers[name]()
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.rounds):  # one pass each per round, the order rotating
            for name in names[r % len(names):] + names[:r % len(names)]:
                times[name].append(timers[name]())
    for name in names:
        out["configs"].setdefault(name, {})["median_ms"] = statistics.median(times[name])
        out["configs"][name]["ratio_to_reference"] = statistics.median(
            a / b for a, b in zip(times[name], times["fp32 reference file"]))
    key, value = PRECISE_INT8
    print(f"{args.model or 'int8 anchor'}, onnxruntime, {args.threads} threads, batch "
          f"{s.batch_size} x {s.seq_len}, {out['machine']['cpu']}: uint8 x int8 exact here: "
          f"{out['uint8_x_int8_exact']} (session_options() sets {key}={value}: "
          f"{not out['uint8_x_int8_exact']})")
    rows = [[n, *(("-",) * 3 if "max_diff_over_max_logit" not in c else
                  (f"{c['median_row_diff_over_max_logit']:.2e}",
                   f"{c['max_diff_over_max_logit']:.2e}", f"{c['argmax_agreement']:.3f}")),
             f"{c['median_ms']:.1f}", f"{c['ratio_to_reference']:.2f}"]
            for n, c in out["configs"].items()]
    print(table(rows, ["configuration", "median row", "worst row",
                       f"argmax agreement ({len(ids)} test rows)", "median ms",
                       "x fp32 reference"]))
    write_json(Path(args.out), out)


if __name__ == "__main__":
    main()

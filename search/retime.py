"""Re-time the front's models side by side before the front is printed or exported.

Each trial's latency was measured when it ran, interleaved with the reference (so load then
cancels out of its ratio); the front's models are timed once more, one after the other in one
process against the same reference, so that their latencies are comparable with each other
now. The result is stored on the study (``retimed``: trial number -> record), next to the
recorded objective, which Optuna keeps as it was told.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial

from nas_fair.search.artifacts import artifact_dir
from nas_fair.search.records import StudyRecord, TrialRecord


def retime_front(study: optuna.Study, session: Any, front: Sequence[FrozenTrial],
                 reference_ms: float, *, threads: int | None = None,
                 log: Callable[[str], None] = lambda _msg: None) -> dict[str, dict[str, Any]]:
    """Time every front trial that has its saved model against the session's reference, in
    torch and (where installed) onnxruntime; store and return {trial number: {"latency_ms",
    "ratio", "ratio_iqr" (the study's backend), "backends": {name: ratios}, "recorded_ms",
    "at"}}."""
    import importlib.util

    from nas_fair.checkpoint import load_compressed
    from nas_fair.objectives.interleaved import measure_latency_ratio
    from nas_fair.objectives.onnx_latency import measure_ort_latency_ratio

    # Both backends where onnxruntime is installed: what a user ships may be either.
    ort = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))

    s = session.cfg.search
    out: dict[str, dict[str, Any]] = dict(StudyRecord.from_study(study).retimed or {})
    old = torch.get_num_threads()
    timed = 0
    try:
        for t in front:
            rec = TrialRecord.from_trial(t)
            path = artifact_dir(session.run_dir, session.cfg.name, t.number)
            if not rec.artifact or path is None or not path.is_dir():
                continue
            model = load_compressed(path)
            n = threads or rec.thread_count or torch.get_num_threads()
            common = {"batch_size": s.batch_size, "seq_len": s.seq_len, "rounds":
                      s.latency_repeats, "per_round": 1, "reference_ms": reference_ms,
                      "vocab_size": getattr(session.reference.config, "vocab_size", None)}
            both = {"torch": measure_latency_ratio(model, session.reference,
                                                   device=str(session.device), threads=n,
                                                   **common)}
            if ort:
                both["onnxruntime"] = measure_ort_latency_ratio(
                    model, session.ort_reference(), session.reference, threads=n,
                    max_length=s.seq_len, **common)
            r = both.get(s.latency_backend, both["torch"])
            out[str(t.number)] = {
                "latency_ms": r["latency_ms"], "ratio": r["ratio"], "ratio_iqr": r["ratio_iqr"],
                "backend": s.latency_backend, "recorded_ms": (rec.latency or {}).get("median_ms"),
                "backends": {k: {"ratio": v["ratio"], "ratio_iqr": v["ratio_iqr"],
                                 "candidate_ms": v["candidate_ms"],
                                 "reference_ms_now": v["reference_ms_now"]}
                             for k, v in both.items()},
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            timed += 1
    finally:
        torch.set_num_threads(old)
    if timed:
        StudyRecord(retimed=out).write(study)
        log(f"re-timed {timed} front models side by side against the reference")
    return out

"""Latency in ONNX Runtime, the backend a user who ships int8 runs.

A model is exported as ``nas-fair export --onnx`` writes it (its 8-bit linears as ORT int8
MatMuls) and timed in an ``onnxruntime.InferenceSession`` on the same seeded ids as the torch
protocol, interleaved with the reference's own ONNX graph in alternating rounds, as
:mod:`~nas_fair.objectives.interleaved` does for torch: the ratio is what is recorded.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from nas_fair.errors import UserError
from nas_fair.objectives.interleaved import interleave, ratio_record
from nas_fair.objectives.latency import _inputs

BACKENDS = ("torch", "onnxruntime")


def check_backend(backend: str) -> None:
    """Before any work: the backend is known and, for onnxruntime, installed."""
    import importlib.util

    if backend not in BACKENDS:
        raise UserError(f"latency backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if backend == "onnxruntime" and missing:
        raise UserError(f"[search] latency_backend = \"onnxruntime\" needs {' and '.join(missing)}"
                        ": pip install 'nas-fair[onnx]'")


def has_int8(model: nn.Module) -> bool:
    """Whether the model holds 8-bit linears (exported as ORT int8 MatMuls, as export does)."""
    from nas_fair.modules import RowInt8Linear

    return any(isinstance(m, RowInt8Linear) for m in model.modules())


def ort_session(model: nn.Module, *, max_length: int, threads: int) -> Any:
    """An onnxruntime session of ``model`` exported as ``nas-fair export --onnx`` does."""
    import onnxruntime as ort

    from nas_fair.onnx_export import export_onnx, session_options

    with tempfile.TemporaryDirectory(prefix="nas-fair-ort-") as tmp:
        path = Path(tmp) / "model.onnx"
        with warnings.catch_warnings():  # its advice, session_options, is taken below
            warnings.simplefilter("ignore")
            export_onnx(model, path, int8=has_int8(model), max_length=max_length)
        return ort.InferenceSession(str(path), sess_options=session_options(threads=threads),
                                    providers=["CPUExecutionProvider"])


def ort_timer(session: Any, model: nn.Module, batch_size: int, seq_len: int,
              vocab_size: int | None) -> Callable[[], float]:
    """A function timing one ORT pass in ms on the torch protocol's seeded ids."""
    import torch

    args, kwargs = _inputs(model, batch_size, seq_len, vocab_size, torch.device("cpu"))
    ids = kwargs.get("input_ids", args[0] if args else None)
    mask = kwargs.get("attention_mask", torch.ones_like(ids))
    names = [i.name for i in session.get_inputs()]
    feeds = {"input_ids": ids.numpy().astype(np.int64),
             "attention_mask": mask.numpy().astype(np.int64)}
    feeds = {k: v for k, v in feeds.items() if k in names}
    if "group_index" in names:  # group-aware offsets: any group, the cost is the same
        feeds["group_index"] = np.zeros(ids.shape[0], dtype=np.int64)

    def run() -> float:
        start = time.perf_counter()
        session.run(None, feeds)
        return (time.perf_counter() - start) * 1000.0

    return run


def measure_ort_latency_ratio(candidate: nn.Module, reference_session: Any, reference: nn.Module,
                              *, batch_size: int, seq_len: int, threads: int, max_length: int,
                              rounds: int = 15, per_round: int = 1, warmup: int = 2,
                              vocab_size: int | None = None,
                              reference_ms: float | None = None) -> dict[str, Any]:
    """The candidate's ONNX graph timed interleaved with the reference's (``reference_session``,
    built once per study with :func:`ort_session`); the record of
    :func:`~nas_fair.objectives.interleaved.measure_latency_ratio` plus ``backend``."""
    session = ort_session(candidate, max_length=max_length, threads=threads)
    time_c = ort_timer(session, candidate, batch_size, seq_len, vocab_size)
    time_r = ort_timer(reference_session, reference, batch_size, seq_len, vocab_size)
    cand_t, ref_t = interleave(time_c, time_r, rounds=rounds, per_round=per_round, warmup=warmup)
    return {**ratio_record(cand_t, ref_t, reference_ms), "rounds": rounds,
            "per_round": per_round, "threads": threads, "backend": "onnxruntime"}


def measure_ort_latency(session: Any, model: nn.Module, *, batch_size: int, seq_len: int,
                        repeats: int = 15, warmup: int = 3,
                        vocab_size: int | None = None) -> dict[str, Any]:
    """Median and spread of ``repeats`` ORT passes (the reference's, once per study)."""
    run = ort_timer(session, model, batch_size, seq_len, vocab_size)
    for _ in range(warmup):
        run()
    times = np.asarray([run() for _ in range(repeats)])
    q10, q25, q50, q75, q90 = np.percentile(times, [10, 25, 50, 75, 90])
    return {"median_ms": float(q50), "iqr_ms": float(q75 - q25), "p10_ms": float(q10),
            "p90_ms": float(q90), "repeats": repeats, "backend": "onnxruntime"}

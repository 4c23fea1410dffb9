"""Latency relative to the reference, timed interleaved, so that load on the machine cancels out.

A latency timed once under load says as much about the load as about the model: a recipe
timed while another worker trains reads slower than the same recipe timed alone. Timing the
reference and the candidate in alternating rounds within one process exposes both to the same
load, and the *ratio* of their times is what depends on the models: it is the median of the
per-round ratios, with its spread. ``reference_ms`` (the reference's time in the study's own
protocol, measured once, e.g. when the study is prepared) turns the ratio back into
milliseconds that do not move with the load: ``latency_ms = ratio * reference_ms``.

Within a round the two models take turns, one forward pass each, ``per_round`` times, and the
round's ratio is the candidate's total over the reference's: both see the same load to within
one pass, and one round spans several of the kernel scheduler's time slices instead of landing
inside or outside one. Rounds alternate who goes first, so a load that rises or falls within a
round biases half the rounds each way and the median not at all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from nas_fair.errors import UserError
from nas_fair.objectives.latency import _count_macs, _inputs, pass_timer


def _check_int(name: str, value: object, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise UserError(f"interleaved latency: {name} must be an integer >= {lo}, got {value!r}")


def measure_latency_ratio(
    candidate: nn.Module,
    reference: nn.Module,
    *,
    batch_size: int,
    seq_len: int,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    warmup: int = 2,
    rounds: int = 15,
    per_round: int = 3,
    vocab_size: int | None = None,
    reference_ms: float | None = None,
) -> dict[str, Any]:
    """Time ``candidate`` and ``reference`` (both already on ``device``) in ``rounds`` rounds
    of ``per_round`` alternating forward passes each, on the same seeded ids of shape
    (batch_size, seq_len) as :func:`~nas_fair.objectives.latency.measure_latency`.

    Returns ratio (median of per-round candidate/reference time ratios), ratio_iqr, ratio_p10,
    ratio_p90, candidate_ms and reference_ms_now (medians of this run, which do move with the
    load), rounds, per_round, threads, macs (the candidate's), and, when ``reference_ms`` is
    given, latency_ms = ratio * reference_ms.
    """
    for name, v, lo in (("batch_size", batch_size, 1), ("seq_len", seq_len, 1),
                        ("rounds", rounds, 1), ("per_round", per_round, 1),
                        ("warmup", warmup, 0)):
        _check_int(name, v, lo)
    if threads is not None:
        _check_int("threads", threads, 1)
    if reference_ms is not None and (isinstance(reference_ms, bool)
                                     or not isinstance(reference_ms, (int, float))
                                     or not reference_ms > 0):
        raise UserError(f"interleaved latency: reference_ms must be a number > 0, "
                        f"got {reference_ms!r}")
    dev = torch.device(device)
    c_args, c_kwargs = _inputs(candidate, batch_size, seq_len, vocab_size, dev)
    r_args, r_kwargs = _inputs(reference, batch_size, seq_len, vocab_size, dev)
    old_threads = torch.get_num_threads()
    n_threads = threads or old_threads
    modes = (candidate.training, reference.training)
    candidate.eval()
    reference.eval()
    try:
        torch.set_num_threads(n_threads)
        with torch.inference_mode():
            with _count_macs(candidate) as macs:
                candidate(*c_args, **c_kwargs)
            cand_t, ref_t = interleave(pass_timer(candidate, c_args, c_kwargs, dev),
                                       pass_timer(reference, r_args, r_kwargs, dev),
                                       rounds=rounds, per_round=per_round, warmup=warmup)
    finally:
        torch.set_num_threads(old_threads)
        candidate.train(modes[0])
        reference.train(modes[1])
    return {**ratio_record(cand_t, ref_t, reference_ms), "rounds": rounds,
            "per_round": per_round, "threads": n_threads, "macs": int(macs[0])}


def interleave(time_c: Callable[[], float], time_r: Callable[[], float], *, rounds: int,
               per_round: int, warmup: int) -> tuple[list[float], list[float]]:
    """Per-round mean pass times (ms) of a candidate and a reference timed in turns (see the
    module docstring); ``time_*`` time one pass each."""
    for _ in range(warmup):
        time_r()
        time_c()
    cand_t, ref_t = [], []
    for i in range(rounds):
        first, second = (time_r, time_c) if i % 2 == 0 else (time_c, time_r)
        a = b = 0.0
        for _ in range(per_round):  # one pass each in turn: both see the same load
            a += first()
            b += second()
        r, c = (a, b) if i % 2 == 0 else (b, a)
        ref_t.append(r / per_round)
        cand_t.append(c / per_round)
    return cand_t, ref_t


def ratio_record(cand_t: list[float], ref_t: list[float],
                 reference_ms: float | None = None) -> dict[str, Any]:
    """ratio (median of per-round ratios), its spread, both medians, and latency_ms when
    ``reference_ms`` is given."""
    ratios = np.asarray(cand_t) / np.maximum(np.asarray(ref_t), 1e-9)
    q10, q25, q50, q75, q90 = np.percentile(ratios, [10, 25, 50, 75, 90])
    out: dict[str, Any] = {
        "ratio": float(q50),
        "ratio_iqr": float(q75 - q25),
        "ratio_p10": float(q10),
        "ratio_p90": float(q90),
        "candidate_ms": float(np.median(cand_t)),
        "reference_ms_now": float(np.median(ref_t)),
    }
    if reference_ms is not None:
        out["latency_ms"] = float(q50) * float(reference_ms)
    return out


def retime_side_by_side(
    models: dict[Any, nn.Module], reference: nn.Module, **kwargs: Any
) -> dict[Any, dict[str, Any]]:
    """Re-time every model of a front against the same reference, one after the other in one
    process (before a front is printed or exported): each gets :func:`measure_latency_ratio`'s
    record, so the front's latencies are comparable even if the load changed since the search
    timed them. ``kwargs`` go to :func:`measure_latency_ratio`."""
    return {key: measure_latency_ratio(m, reference, **kwargs) for key, m in models.items()}

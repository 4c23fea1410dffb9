"""Latency of one forward pass at a fixed shape, plus a deterministic multiply-accumulate count.

Wall-clock time on a shared machine is noisy, so the result carries its spread (IQR, p10/p90)
and a MAC count that does not depend on the machine at all: a study can compare trials on MACs
when timings are too noisy to rank them.

MAC count (an approximation, documented so that its blind spots are known):

* every linear-like leaf module counts ``rows * in_features * out_features`` per call, where
  rows = input elements / in_features. Linear-like: ``nn.Linear``, torch.ao dynamic/static
  quantized Linear (shape from ``weight()``), and any module exposing int ``in_features`` and
  ``out_features`` without linear-like children; one that also exposes an int ``rank`` (a
  factorised low-rank layer holding raw factors) counts ``rows * rank * (in + out)``.
* self-attention adds ``2 * B * L * L * (heads * head_dim)`` per call (Q K^T and A V), with
  (B, L) from the input of the query projection (child named ``query``, ``q_lin`` or ``q_proj``,
  any module) and heads * head_dim from its output width, so pruned heads are accounted for.
* not counted: embeddings (lookups), layer norms, softmax, activations, biases, and the zeros
  of unstructured sparsity (a masked dense weight counts in full).
* calls are counted, so a layer shared across depths counts once per use.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from nas_fair.errors import UserError

_QUERY_NAMES = ("query", "q_lin", "q_proj")


def _weight_shape(m: nn.Module) -> tuple[int, int] | None:
    """(out, in) of a linear-like module, also for quantized ones whose weight is a method."""
    w = getattr(m, "weight", None)
    if callable(w) and not isinstance(w, torch.Tensor):
        try:
            w = w()
        except Exception:  # noqa: BLE001 - not a quantized linear after all
            return None
    if isinstance(w, torch.Tensor) and w.dim() == 2:
        return int(w.shape[0]), int(w.shape[1])
    out_f, in_f = getattr(m, "out_features", None), getattr(m, "in_features", None)
    if isinstance(out_f, int) and isinstance(in_f, int):
        return out_f, in_f
    return None


def _exposes_features(m: nn.Module) -> bool:
    return isinstance(getattr(m, "in_features", None), int) and isinstance(
        getattr(m, "out_features", None), int
    )


def _is_linear_like(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    if not _exposes_features(m):
        return False
    return not any(_exposes_features(c) for c in m.modules() if c is not m)


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a
    return None


@contextmanager
def _count_macs(model: nn.Module) -> Iterator[list[int]]:
    total = [0]
    handles = []

    def linear_hook(m: nn.Module, args: tuple, kwargs: dict, out: object) -> None:
        x = _first_tensor(args, kwargs)
        shape = _weight_shape(m)
        if x is None or shape is None:
            return
        out_f, in_f = shape
        rows = x.numel() // max(in_f, 1)
        rank = getattr(m, "rank", None)
        if isinstance(rank, int) and not isinstance(m, nn.Linear):
            total[0] += rows * rank * (in_f + out_f)
        else:
            total[0] += rows * in_f * out_f

    def attention_hook(m: nn.Module, args: tuple, kwargs: dict, out: object) -> None:
        # Width from the query projection's output, so any factorised/pruned query counts.
        x = _first_tensor(args, kwargs)
        if x is None or x.dim() < 3 or not isinstance(out, torch.Tensor):
            return
        b, seq = math.prod(x.shape[:-2]), x.shape[-2]
        total[0] += 2 * b * seq * seq * int(out.shape[-1])

    for mod in model.modules():
        if _is_linear_like(mod):
            handles.append(mod.register_forward_hook(linear_hook, with_kwargs=True))
        for qn in _QUERY_NAMES:
            q = getattr(mod, qn, None)
            if isinstance(q, nn.Module):
                handles.append(q.register_forward_hook(attention_hook, with_kwargs=True))
                break
    try:
        yield total
    finally:
        for h in handles:
            h.remove()


def _inputs(
    model: nn.Module, batch_size: int, seq_len: int, vocab_size: int | None, device: torch.device
) -> tuple[tuple, dict]:
    config = getattr(model, "config", None)
    vocab = vocab_size or getattr(config, "vocab_size", None)
    if not vocab:
        raise UserError(
            "measure_latency needs vocab_size: the model has no config.vocab_size; pass it"
        )
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, int(vocab), (batch_size, seq_len), generator=g)
    pad = getattr(config, "pad_token_id", None)
    if pad is not None and vocab > 1:  # no padding: a pad id would shorten RoBERTa's positions
        ids[ids == pad] = (pad + 1) % int(vocab)
    ids = ids.to(device)
    mask = torch.ones_like(ids)
    params = inspect.signature(model.forward).parameters
    if "input_ids" in params:
        kwargs = {"input_ids": ids}
        if "attention_mask" in params:
            kwargs["attention_mask"] = mask
        return (), kwargs
    return (ids,), {}


def pass_timer(model: nn.Module, args: tuple, kwargs: dict,
               dev: torch.device) -> Callable[[], float]:
    """A function timing one forward pass in ms (synchronizing a GPU before and after)."""
    cuda = dev.type == "cuda"

    def run() -> float:
        if cuda:
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        model(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize(dev)
        return (time.perf_counter() - start) * 1000.0

    return run


def measure_latency(
    model: nn.Module,
    *,
    batch_size: int,
    seq_len: int,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    warmup: int = 3,
    repeats: int = 15,
    vocab_size: int | None = None,
) -> dict[str, float | int]:
    """Time ``repeats`` forward passes on seeded random ids of shape (batch_size, seq_len).

    The model must already be on ``device``. ``threads`` fixes torch's CPU thread count for the
    measurement (default: the current count) and is restored after. Returns median_ms, iqr_ms,
    p10_ms, p90_ms, repeats, threads and macs (see module docstring).
    """
    for name, v, lo in (("batch_size", batch_size, 1), ("seq_len", seq_len, 1),
                        ("repeats", repeats, 1), ("warmup", warmup, 0)):
        if not isinstance(v, int) or v < lo:
            raise UserError(f"measure_latency: {name} must be an integer >= {lo}, got {v!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise UserError(f"measure_latency: threads must be a positive integer, got {threads!r}")
    dev = torch.device(device)
    args, kwargs = _inputs(model, batch_size, seq_len, vocab_size, dev)
    old_threads = torch.get_num_threads()
    n_threads = threads or old_threads
    was_training = model.training
    model.eval()
    try:
        torch.set_num_threads(n_threads)
        with torch.inference_mode():
            with _count_macs(model) as macs:
                model(*args, **kwargs)
            for _ in range(warmup):
                model(*args, **kwargs)
            one_pass = pass_timer(model, args, kwargs, dev)
            times = [one_pass() for _ in range(repeats)]
    finally:
        torch.set_num_threads(old_threads)
        model.train(was_training)
    t = np.asarray(times)
    q10, q25, q50, q75, q90 = np.percentile(t, [10, 25, 50, 75, 90])
    return {
        "median_ms": float(q50),
        "iqr_ms": float(q75 - q25),
        "p10_ms": float(q10),
        "p90_ms": float(q90),
        "repeats": repeats,
        "threads": n_threads,
        "macs": int(macs[0]),
    }

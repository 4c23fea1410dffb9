"""Recovery by knowledge distillation from the reference model's cached logits.

The loop lives in :func:`recover` so that other code (e.g. bias mitigation) can reuse it with an
extra loss term and per-example weights. Design choices, all for cheap and reproducible trials:

* the teacher's logits are precomputed once per study (``ctx.train.teacher_logits``), so no
  teacher forward pass is needed;
* batches are drawn by epoch-wise permutations from a ``torch.Generator`` seeded with
  ``ctx.seed``, and dropout draws from a forked RNG seeded the same way: same seed and params
  give bit-identical weights (on the same machine and thread count);
* batches are length-bucketed (rows of similar length together, batch order still shuffled)
  and each is trimmed to its longest row, so little compute goes to padding; per-row lengths
  and the teacher logits are prepared once per call, and the loss is read back to the host
  only once per early-stopping window;
* early stopping (on by default, the study's ``recovery_early_stop``) ends recovery once the
  smoothed loss has flattened. A mild student's loss flattens before its accuracy settles
  (macro-F1 was lost when it fired: docs/measurements.md, "Early stopping stops mild students
  too soon"), so the default study turns it off;
* optionally (``recovery_precision``) the forward passes run under bfloat16 autocast, faster on
  a CPU with bfloat16 instructions (docs/measurements.md, "Recovery in bfloat16"); weights,
  optimizer state and the loss stay fp32, so it is mixed precision, not a lower-precision model;
* dropout masks are drawn from random bits on a CPU (:func:`nas_fair.modeling.fast_dropout`):
  torch's Bernoulli masks were a large share of a full-width student's step, and with the bits
  a step with dropout costs about what one without it does (``benchmarks/recovery_step_profile.py``;
  docs/measurements.md, "Dropout masks from random bits");
* dropout can be turned off (``recovery_dropout = false``). The default keeps it: without it a
  full-width student was as accurate but its TPR gap came out larger in each of three seeds
  (docs/measurements.md, "Recovery without dropout"). Off, on a CPU, attention uses the math
  kernel, because the fused one's backward is slower here;
* the last layer computes only the first position, the one the classifier reads
  (:func:`nas_fair.modeling.first_token_only`): the same loss and gradients, 1/L of that
  layer's projections and feed-forward work (docs/measurements.md, "Recovery without dropout,
  and a last layer on the first token only");
* the embedding block is frozen: it is ~half of a small model's parameters, its gradients are
  sparse and costly, and compression never changes it (only quantization does, later), so the
  budget goes to the layers that were actually changed.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from nas_fair.encoder import length_bucketed_batches, row_lengths
from nas_fair.errors import UserError
from nas_fair.modeling import (  # noqa: F401 - bf16_native: its home was here
    bf16_native,
    fast_dropout,
    first_token_only,
    resolve_precision,
)
from nas_fair.spaces.base import (
    CompressionContext,
    RecoveryConfig,
)
from nas_fair.spaces.recovery_state import (
    RecoveryState,
    load_recovery_state,
    load_student_weights,
    save_recovery_state,
)

DEFAULT_LR = RecoveryConfig.lr
WARMUP_FRACTION = 0.1
WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 1.0
# Length bucketing: rows are sorted by length within chunks of this many batches.
BUCKET_BATCHES = 50
# Early stopping (see EarlyStop): defaults of the study's recovery_tolerance and of recover().
EARLY_STOP_TOLERANCE = RecoveryConfig.tolerance
EARLY_STOP_PATIENCE = 2
EARLY_STOP_MIN_FRACTION = 0.5
WINDOW_FRACTION = 0.2
MIN_WINDOW = 20
CHECK_FRACTION = 0.05
MIN_CHECK_STEPS = 5


@dataclass
class Batch:
    """One training batch, with the row indices into ``ctx.train`` (for group lookups)."""

    index: torch.Tensor  # (B,) int64 rows of ctx.train
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    teacher_logits: torch.Tensor
    weights: torch.Tensor | None  # (B,) per-example weights, when given


# extra_loss(model, batch, logits) -> scalar tensor added to the batch loss.
ExtraLoss = Callable[[nn.Module, Batch, torch.Tensor], torch.Tensor]


def distillation_loss(
    logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """Per-example loss (B,): ``alpha * T^2 * KL + (1 - alpha) * CE``."""
    t = temperature
    kl = F.kl_div(
        F.log_softmax(logits / t, dim=-1),
        F.log_softmax(teacher_logits / t, dim=-1),
        log_target=True,
        reduction="none",
    ).sum(-1)
    loss = alpha * (t * t) * kl
    if alpha < 1:
        loss = loss + (1 - alpha) * F.cross_entropy(logits, labels, reduction="none")
    return loss


def recover(
    model: nn.Module,
    ctx: CompressionContext,
    *,
    steps: int,
    temperature: float = 2.0,
    alpha: float = 0.9,
    lr: float | None = None,
    extra_loss: ExtraLoss | None = None,
    sample_weights: torch.Tensor | None = None,
    freeze_embeddings: bool = True,
    early_stop: bool | None = None,
    tolerance: float | None = None,
    patience: int = EARLY_STOP_PATIENCE,
    min_fraction: float = EARLY_STOP_MIN_FRACTION,
    bucket_batches: int = BUCKET_BATCHES,
    precision: str | None = None,
    dropout: bool | None = None,
    fast_masks: bool = True,
    schedule_steps: int | None = None,
    resume_from: str | os.PathLike[str] | None = None,
    save_state_to: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """Train ``model`` in place for up to ``steps`` AdamW steps toward the cached teacher logits.

    ``sample_weights`` (N,) weight each example's loss (normalized per batch by the weights'
    sum); ``extra_loss`` is added to every batch's loss (e.g. a fairness regularizer). ``lr``
    defaults to ``ctx.recovery_config.lr``. Returns the model in eval mode.
    Deterministic for a given ``ctx.seed``.

    Cheaper per step, same objective: batches group rows of similar length (chunks of
    ``bucket_batches`` batches sorted by length, 0 = plain random batches) so trimming to the
    longest row cuts most padding. ``early_stop`` (default ``ctx.recovery_config.early_stop``) ends training once the loss has flattened: see :class:`EarlyStop`, with
    ``tolerance`` (default ``ctx.recovery_config.tolerance``), ``patience`` and
    ``min_fraction``. The learning-rate schedule always spans the full ``steps`` budget.
    ``precision`` (default ``ctx.recovery_config.precision``): "bf16" autocasts
    forward passes to bfloat16, "auto" only where :func:`bf16_native` says the hardware has
    bfloat16 instructions. ``dropout`` (default ``ctx.recovery_config.dropout``)
    trains with the model's dropout, on a CPU with masks drawn from random bits
    (:func:`~nas_fair.modeling.fast_dropout`; ``fast_masks=False`` keeps torch's); off, the
    model stays in eval mode. While training, a BERT/RoBERTa classifier's last layer returns
    the first position only (:func:`~nas_fair.modeling.first_token_only`): an ``extra_loss``
    gets the same logits, but not per-token states of that layer. What happened (steps run,
    loss per step, precision, dropout and its masks) is appended to ``model.nas_fair_recovery``
    (see :func:`recovery_logs`).

    Continuation (multi-fidelity search, :mod:`nas_fair.spaces.recovery_state`):
    ``schedule_steps`` (default ``steps``, at least ``steps``) is the length of the LR schedule
    and of the early-stopping windows, so a run can stop at ``steps`` and later continue on the
    same schedule; ``save_state_to`` writes a checkpoint at the end; ``resume_from`` loads one
    (written with the same ``schedule_steps``) into this student and trains on from its step
    count up to ``steps`` in all.
    """
    study = ctx.recovery_config
    lr = study.lr if lr is None else lr
    early_stop = study.early_stop if early_stop is None else early_stop
    tolerance = study.tolerance if tolerance is None else tolerance
    precision = study.precision if precision is None else precision
    dropout = study.dropout if dropout is None else dropout
    if steps <= 0:
        return model.eval()
    horizon = steps if schedule_steps is None else schedule_steps
    if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < steps:
        raise UserError(f"recovery schedule_steps must be an integer >= steps ({steps}), "
                        f"got {schedule_steps!r}")
    resumed = None if resume_from is None else load_recovery_state(resume_from)
    if resumed is not None and (resumed.schedule_steps != horizon or resumed.step > steps):
        raise UserError(
            f"recovery checkpoint {resume_from} ran {resumed.step} of a {resumed.schedule_steps}-"
            f"step schedule; it cannot continue to {steps} steps of a {horizon}-step schedule"
        )
    data = ctx.train
    if data is None or len(data) == 0:
        raise UserError("distillation needs training data (ctx.train is empty)")
    n = len(data)
    if sample_weights is not None and sample_weights.shape != (n,):
        raise UserError(
            f"sample_weights must have one weight per training example ({n}), "
            f"got shape {tuple(sample_weights.shape)}"
        )
    stopper = (
        EarlyStop(horizon, tolerance=tolerance, patience=patience, min_fraction=min_fraction)
        if early_stop
        else None
    )
    device = next(model.parameters()).device
    bf16 = resolve_precision(precision, device, what="recovery precision") == "bf16"

    def amp() -> torch.autocast:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    frozen: list[nn.Parameter] = []
    if freeze_embeddings:
        emb = getattr(getattr(model, "base_model", model), "embeddings", None)
        if emb is not None:
            frozen = [p for p in emb.parameters() if p.requires_grad]
            for p in frozen:
                p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        for p in frozen:
            p.requires_grad_(True)
        raise UserError("nothing to train: the model has no trainable parameters")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": WEIGHT_DECAY},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=lr,
        # One fused kernel per step instead of a Python loop over every parameter tensor.
        fused=_fused_ok(params),
    )
    warmup = max(1, int(WARMUP_FRACTION * horizon))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (horizon - step) / max(1, horizon - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    gen = torch.Generator().manual_seed(ctx.seed)
    bs = min(ctx.batch_size, n)
    # Everything per row is computed once per call; a step only gathers its rows.
    lengths = row_lengths(data.attention_mask)
    teacher = data.teacher_logits.float()
    weights = None if sample_weights is None else sample_weights.float()
    losses = torch.zeros(steps, device=device)  # no host sync per step; read per window
    batches: list[torch.Tensor] = []
    run = start = 0
    if resumed is not None:
        load_student_weights(model, resumed)
        optimizer.load_state_dict(resumed.optimizer)
        scheduler.load_state_dict(resumed.scheduler)
        gen.set_state(resumed.generator)
        batches = list(resumed.pending)
        run = start = resumed.step
        losses[:start] = torch.tensor(resumed.losses[:start], device=device)
        if stopper is not None and resumed.stopper is not None:
            stopper.flat = int(resumed.stopper["flat"])
            stopper.history = [tuple(h) for h in resumed.stopper["history"]]
    stopped = resumed is not None and resumed.stopped_early

    try:
        with (
            torch.random.fork_rng(devices=[]),
            attention_kernels(device, dropout=dropout),
            first_token_only(model),
            fast_dropout(model) if dropout and fast_masks else contextlib.nullcontext(False)
            as fast,
        ):
            if resumed is None:
                torch.manual_seed(ctx.seed)
            else:
                torch.set_rng_state(resumed.rng)
            model.train(dropout)
            progress = tqdm(
                range(start, steps if not stopped else start), desc="recovery", leave=False,
                disable=not sys.stderr.isatty(),
            )
            for step in progress:
                if not batches:
                    batches = length_bucketed_batches(
                        lengths, bs, gen, chunk_batches=bucket_batches
                    )
                    batches.reverse()  # pop() from the end = the epoch's order
                index = batches.pop()
                width = int(lengths[index].max())
                batch = Batch(
                    index=index,
                    input_ids=data.input_ids[index, :width].to(device),
                    attention_mask=data.attention_mask[index, :width].to(device),
                    labels=data.labels[index].to(device),
                    teacher_logits=teacher[index].to(device),
                    weights=None if weights is None else weights[index].to(device),
                )
                with amp():
                    logits = model(input_ids=batch.input_ids,
                                   attention_mask=batch.attention_mask).logits
                logits = logits.float()
                per_example = distillation_loss(
                    logits,
                    batch.teacher_logits,
                    batch.labels,
                    temperature=temperature,
                    alpha=alpha,
                )
                if batch.weights is None:
                    loss = per_example.mean()
                else:
                    loss = (per_example * batch.weights).sum() / batch.weights.sum().clamp_min(
                        1e-12
                    )
                if extra_loss is not None:
                    # Under the same autocast: a penalty may run its own forward pass (the
                    # counterfactual regularizer does), which must be as cheap as the first.
                    with amp():
                        extra = extra_loss(model, batch, logits)
                    loss = loss + extra  # promoted to fp32, as the loss is
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
                optimizer.step()
                scheduler.step()
                losses[step] = loss.detach()
                run = step + 1
                if progress.disable is False:
                    progress.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
                if stopper is not None and stopper.update(losses, run):
                    stopped = True
                    break
            if save_state_to is not None:
                save_recovery_state(save_state_to, RecoveryState(
                    step=run, schedule_steps=horizon, model=model.state_dict(),
                    optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                    generator=gen.get_state(), rng=torch.get_rng_state(), pending=batches,
                    losses=losses[:run].tolist(),
                    stopper=None if stopper is None else {"flat": stopper.flat,
                                                          "history": stopper.history},
                    stopped_early=stopped,
                ))
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.eval()
    return log_recovery(model, {
        "steps_budget": steps,
        "steps_run": run,
        "stopped_early": run < steps,
        "resumed_from_step": start if resumed is not None else None,
        "schedule_steps": horizon,
        "early_stop": bool(early_stop),
        "tolerance": tolerance if early_stop else None,
        "precision": "bf16" if bf16 else "fp32",
        "dropout": bool(dropout),
        "dropout_masks": ("random bits" if fast else "bernoulli") if dropout else None,
        "losses": [round(v, 5) for v in losses[:run].tolist()],
        "checks": [] if stopper is None else stopper.history,
    })


def attention_kernels(device: torch.device, *, dropout: bool) -> contextlib.AbstractContextManager:
    """Training without dropout on a CPU: scaled-dot-product attention through its math kernel.

    Without dropout SDPA would pick torch's fused CPU flash-attention kernel, whose backward
    made a full-width MiniLM step slower than the math kernel on a CPU
    (``benchmarks/recovery_step_profile.py``; docs/measurements.md, "Dropout masks from random
    bits"). With dropout, attention on a CPU runs
    through :func:`~nas_fair.modeling.fast_dropout`'s math attention (or SDPA's math kernel
    with ``fast_masks=False``), and on a GPU the fused kernels are the fast ones, so nothing
    is forced there."""
    if dropout or device.type != "cpu":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def log_recovery(model: nn.Module, entry: dict[str, Any]) -> nn.Module:
    """Append one recovery call's log: a trial may recover more than once (a debiasing pass)."""
    calls = getattr(model, "nas_fair_recovery", None)
    model.nas_fair_recovery = [*(calls if isinstance(calls, list) else []), entry]
    return model


def recovery_logs(model: nn.Module) -> list[dict[str, Any]]:
    """What each :func:`recover` call on ``model`` did (steps run, per-step loss), in order."""
    calls = getattr(model, "nas_fair_recovery", None)
    return list(calls) if isinstance(calls, list) else []


def recovery_log(model: nn.Module) -> dict[str, Any] | None:
    """The last :func:`recover` call's log, if any."""
    calls = recovery_logs(model)
    return calls[-1] if calls else None


def _fused_ok(params: list[nn.Parameter]) -> bool | None:
    """Fused AdamW where torch has it for these tensors (floats on CUDA, or on CPU from torch
    2.4), else torch's default: one fused step over the encoder's tensors beats the per-tensor
    loop, most of all when the cores are contended (docs/measurements.md, "Figures once quoted
    in code comments")."""
    devices = {p.device.type for p in params}
    floats = all(p.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
                 for p in params)
    cpu_ok = torch.torch_version.TorchVersion(torch.__version__) >= "2.4"
    ok = floats and devices <= ({"cpu", "cuda"} if cpu_ok else {"cuda"}) and len(devices) == 1
    return True if ok else None


class EarlyStop:
    """Stop once the distillation loss has flattened, never before ``min_fraction`` of the budget.

    Every ``CHECK_FRACTION`` of the budget, the mean loss of the last window (``WINDOW_FRACTION``
    of the budget, at least ``MIN_WINDOW`` steps) is compared with the mean of the window before
    it; the check is *flat* when it fell by less than ``tolerance`` (relative). ``patience`` flat
    checks in a row stop training. Why block means of a fifth of the budget: one batch's loss
    is noisy around its trend (length-bucketed batches differ in kind), so a short window or
    an EMA of one mistakes noise for a plateau, while a window of a fifth of a long budget
    measures the trend closely (docs/measurements.md, "Figures once quoted in code comments").
    Only losses already computed are read, so the decision is as deterministic as the loss.
    """

    def __init__(self, steps: int, *, tolerance: float, patience: int, min_fraction: float) -> None:
        if isinstance(tolerance, bool) or not tolerance >= 0:
            raise UserError(f"recovery tolerance must be a number >= 0, got {tolerance!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise UserError(f"recovery patience must be an integer >= 1, got {patience!r}")
        if not 0 <= min_fraction <= 1:
            raise UserError(f"recovery min_fraction must be in [0, 1], got {min_fraction!r}")
        self.tolerance = tolerance
        self.patience = patience
        self.window = max(MIN_WINDOW, math.ceil(WINDOW_FRACTION * steps))
        self.stride = max(MIN_CHECK_STEPS, math.ceil(CHECK_FRACTION * steps))
        self.min_steps = max(math.ceil(min_fraction * steps), 2 * self.window)
        self.flat = 0
        # (step, mean loss of the last window, its relative fall from the window before)
        self.history: list[tuple[int, float, float]] = []

    def update(self, losses: torch.Tensor, run: int) -> bool:
        """Called after each step with the per-step losses so far; True = stop now."""
        if run % self.stride or run < 2 * self.window:
            return False
        w = self.window
        prev, last = losses[run - 2 * w : run].view(2, w).mean(dim=1).tolist()
        fall = (prev - last) / max(abs(prev), 1e-12)
        self.history.append((run, round(last, 5), round(fall, 5)))
        self.flat = self.flat + 1 if fall < self.tolerance else 0
        return run >= self.min_steps and self.flat >= self.patience

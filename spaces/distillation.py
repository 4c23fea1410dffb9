"""Recovery by knowledge distillation from the reference model's cached logits.

The loop lives in :func:`recover` so that other code (e.g. bias mitigation) can reuse it with an
extra loss term and per-example weights. Design choices, all for cheap and reproducible trials:

* the teacher's logits are precomputed once per study (``ctx.train.teacher_logits``), so no
  teacher forward pass is needed;
* batches are drawn by epoch-wise permutations from a ``torch.Generator`` seeded with
  ``ctx.seed``, and dropout draws from a forked RNG seeded the same way: same seed and params
  give bit-identical weights (on the same machine and thread count);
* each batch is trimmed to its longest non-pad length;
* the embedding block is frozen: it is ~half of a small model's parameters, its gradients are
  sparse and costly, and compression never changes it (only quantization does, later), so the
  budget goes to the layers that were actually changed.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from nas_fair.errors import UserError
from nas_fair.spaces._util import trim_batch
from nas_fair.spaces.base import (
    STAGE_RECOVER,
    Categorical,
    CompressionContext,
    Family,
    FamilyConfig,
    FloatRange,
    register,
)

DEFAULT_LR = 1e-4
WARMUP_FRACTION = 0.1
WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 1.0


@dataclass
class DistillationConfig(FamilyConfig):
    """``steps`` optimizer steps (0 = off); loss ``alpha * T^2 * KL(teacher/T || student/T)
    + (1 - alpha) * CE(labels)``. The learning rate is the study's, ``ctx.extras["recovery_lr"]``
    (default 1e-4), with linear warm-up and decay."""

    steps: int = 0
    temperature: float = 2.0
    alpha: float = 0.9

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise UserError(f"distillation.steps must be an integer >= 0, got {self.steps!r}")
        for name, ok, rule in (
            ("temperature", lambda v: v > 0, "a number > 0"),
            ("alpha", lambda v: 0 <= v <= 1, "a number in [0, 1]"),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
                raise UserError(f"distillation.{name} must be {rule}, got {value!r}")


@register
class Distillation(Family):
    name = "distillation"
    stage = STAGE_RECOVER
    config_class = DistillationConfig
    params: ClassVar = {
        "steps": Categorical((0,)),  # the study driver overrides this with its recovery budget
        "temperature": Categorical((1.0, 2.0, 4.0, 8.0)),
        "alpha": FloatRange(0.5, 1.0, step=0.1),
    }
    composes_with = frozenset({"pruning", "lowrank", "sharing", "quantization"})

    def apply(self, model: nn.Module, config: FamilyConfig, ctx: CompressionContext) -> nn.Module:
        assert isinstance(config, DistillationConfig)
        if config.steps == 0:
            return model
        return recover(
            model,
            ctx,
            steps=config.steps,
            temperature=config.temperature,
            alpha=config.alpha,
        )


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
) -> nn.Module:
    """Train ``model`` in place for ``steps`` AdamW steps toward the cached teacher logits.

    ``sample_weights`` (N,) weight each example's loss (normalized per batch by the weights'
    sum); ``extra_loss`` is added to every batch's loss (e.g. a fairness regularizer). ``lr``
    defaults to ``ctx.extras["recovery_lr"]``, else 1e-4. Returns the model in eval mode.
    Deterministic for a given ``ctx.seed``.
    """
    if lr is None:
        lr = float(ctx.extras.get("recovery_lr", DEFAULT_LR))
    if steps <= 0:
        return model.eval()
    data = ctx.train
    if data is None or len(data) == 0:
        raise UserError("distillation needs training data (ctx.train is empty)")
    n = len(data)
    if sample_weights is not None and sample_weights.shape != (n,):
        raise UserError(
            f"sample_weights must have one weight per training example ({n}), "
            f"got shape {tuple(sample_weights.shape)}"
        )
    device = next(model.parameters()).device
    frozen: list[nn.Parameter] = []
    if freeze_embeddings:
        emb = getattr(getattr(model, "base_model", model), "embeddings", None)
        if emb is not None:
            frozen = [p for p in emb.parameters() if p.requires_grad]
            for p in frozen:
                p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("nothing to train: the model has no trainable parameters")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": WEIGHT_DECAY},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=lr,
    )
    warmup = max(1, int(WARMUP_FRACTION * steps))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    gen = torch.Generator().manual_seed(ctx.seed)
    bs = min(ctx.batch_size, n)
    per_epoch = max(1, math.floor(n / bs))
    order = torch.empty(0, dtype=torch.long)

    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)
            model.train()
            progress = tqdm(
                range(steps), desc="recovery", leave=False, disable=not sys.stderr.isatty()
            )
            for step in progress:
                if step % per_epoch == 0:
                    order = torch.randperm(n, generator=gen)
                k = step % per_epoch
                index = order[k * bs : (k + 1) * bs]
                ids, mask = trim_batch(data.input_ids[index], data.attention_mask[index])
                batch = Batch(
                    index=index,
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    labels=data.labels[index].to(device),
                    teacher_logits=data.teacher_logits[index].to(device).float(),
                    weights=None if sample_weights is None else sample_weights[index].to(device),
                )
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
                logits = logits.logits.float()
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
                    w = batch.weights.float()
                    loss = (per_example * w).sum() / w.sum().clamp_min(1e-12)
                if extra_loss is not None:
                    loss = loss + extra_loss(model, batch, logits)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
                optimizer.step()
                scheduler.step()
                if progress.disable is False:
                    progress.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.eval()
    return model

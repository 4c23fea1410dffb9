"""Low-rank factorization: truncated SVD of the encoder's attention and FFN linear layers.

The rank ratio is the fraction of a matrix's weight parameters kept: rank
``r = floor(ratio * in*out / (in+out))``, so ratio 0.5 halves that matrix's weights whatever its
shape (a plain "fraction of full rank" would never save anything for square matrices above 0.5).
A layer is replaced only where ``r*(in+out) < in*out``; ratio 1.0 is off.

``activation_aware`` is ASVD (Yuan et al. 2023): each input channel is scaled by the square root
of its mean |activation| on ``ctx.train`` before the SVD and unscaled after, so the truncation
error is weighted toward the channels that carry signal.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from nas_fair.encoder import layer_parts, linear_slots, trim_batch, unique_layers
from nas_fair.errors import UserError
from nas_fair.modules import LowRankLinear
from nas_fair.spaces.base import (
    STAGE_LOWRANK,
    Categorical,
    CompressionContext,
    Family,
    FamilyConfig,
    register,
)

CALIBRATION_EXAMPLES = 128
ASVD_ALPHA = 0.5


@dataclass
class LowRankConfig(FamilyConfig):
    """Fractions of weight parameters kept in attention (q, k, v, output) and FFN matrices."""

    attention_rank: float = 1.0
    ffn_rank: float = 1.0
    activation_aware: bool = False

    def __post_init__(self) -> None:
        for name in ("attention_rank", "ffn_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"lowrank.{name} must be a number in (0, 1], got {value!r}")
            if not 0.0 < value <= 1.0:
                raise UserError(f"lowrank.{name} must be in (0, 1], got {value!r}")
        if not isinstance(self.activation_aware, bool):
            raise UserError(
                f"lowrank.activation_aware must be true or false, got {self.activation_aware!r}"
            )


def rank_for(in_features: int, out_features: int, ratio: float) -> int | None:
    """The factor rank for ``ratio``, or None where factorizing would not save parameters."""
    if ratio >= 1.0:
        return None
    rank = int(ratio * in_features * out_features / (in_features + out_features))
    if rank < 1 or rank * (in_features + out_features) >= in_features * out_features:
        return None
    return rank


@register
class LowRank(Family):
    name = "lowrank"
    stage = STAGE_LOWRANK
    config_class = LowRankConfig
    params: ClassVar = {
        "attention_rank": Categorical((1.0, 0.75, 0.5, 0.25)),
        "ffn_rank": Categorical((1.0, 0.75, 0.5, 0.25)),
        "activation_aware": Categorical((False, True)),
    }
    edits_layers = True
    composes_with = frozenset({"pruning", "sharing", "distillation", "quantization"})
    anchor: ClassVar = {"attention_rank": 0.75, "ffn_rank": 0.75, "activation_aware": True}

    def apply(self, model: nn.Module, config: FamilyConfig, ctx: CompressionContext) -> nn.Module:
        assert isinstance(config, LowRankConfig)
        targets: list[tuple[nn.Module, str, nn.Linear, int]] = []
        for layer in unique_layers(model):
            parts = layer_parts(layer)
            for scopes, ratio in (
                (parts.attention_scope, config.attention_rank),
                (parts.ffn_scope, config.ffn_rank),
            ):
                for scope in scopes:
                    for parent, attr, lin in linear_slots(scope):
                        rank = rank_for(lin.in_features, lin.out_features, ratio)
                        if rank is not None:
                            targets.append((parent, attr, lin, rank))
        if not targets:
            return model
        scales = None
        if config.activation_aware and ctx.train is not None and len(ctx.train):
            scales = _input_scales(model, [t[2] for t in targets], ctx)
        for i, (parent, attr, lin, rank) in enumerate(targets):
            setattr(parent, attr, factorize(lin, rank, None if scales is None else scales[i]))
        return model


@contextmanager
def single_thread() -> Iterator[None]:
    """Run LAPACK on one thread: an SVD of an encoder-sized matrix gains little from threads, and
    with 2 threads it became far *slower* when another process held a core (docs/measurements.md,
    "Figures once quoted in code comments")."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def factorize(linear: nn.Linear, rank: int, in_scale: torch.Tensor | None = None) -> LowRankLinear:
    """Truncated SVD ``W ~= (U_r S_r^1/2)(S_r^1/2 V_r^T)``, optionally of ``W diag(in_scale)``.

    The singular values are split evenly between the factors so both have similar ranges, which
    keeps later weight quantization of the factors accurate.
    """
    w = linear.weight.detach().float()  # fp32 LAPACK: faster than fp64, ample for a cut
    if in_scale is not None:
        s = in_scale.float().clamp_min(1e-6)
        w = w * s[None, :]
    with single_thread():
        u, sv, vh = torch.linalg.svd(w, full_matrices=False)
    root = sv[:rank].sqrt()
    up = u[:, :rank] * root[None, :]
    down = root[:, None] * vh[:rank]
    if in_scale is not None:
        down = down / s[None, :]
    mod = LowRankLinear(linear.in_features, linear.out_features, rank, linear.bias is not None)
    dtype = linear.weight.dtype
    with torch.no_grad():
        mod.down.weight.copy_(down.to(dtype))
        mod.up.weight.copy_(up.to(dtype))
        if linear.bias is not None:
            mod.up.bias.copy_(linear.bias.detach())
    return mod.to(linear.weight.device)


def _input_scales(
    model: nn.Module, linears: list[nn.Linear], ctx: CompressionContext
) -> list[torch.Tensor]:
    """ASVD channel scales: (mean |x_j|)^alpha of each target's input over calibration batches."""
    sums = [torch.zeros(lin.in_features, dtype=torch.float64) for lin in linears]
    counts = [0] * len(linears)

    def hook(i: int):  # noqa: ANN202
        def fn(_mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            sums[i] += x.abs().sum(0).double().cpu()
            counts[i] += x.shape[0]

        return fn

    handles = [lin.register_forward_pre_hook(hook(i)) for i, lin in enumerate(linears)]
    n = min(len(ctx.train), CALIBRATION_EXAMPLES)
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for start in range(0, n, ctx.batch_size):
                sl = slice(start, min(n, start + ctx.batch_size))
                ids, mask = trim_batch(ctx.train.input_ids[sl], ctx.train.attention_mask[sl])
                model(input_ids=ids.to(device), attention_mask=mask.to(device))
    finally:
        for h in handles:
            h.remove()
    out = []
    for s, c in zip(sums, counts, strict=True):
        mean = s / max(c, 1)
        scale = mean.pow(ASVD_ALPHA)
        out.append(scale / scale.mean().clamp_min(1e-12))
    return out

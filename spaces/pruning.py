"""Structured pruning: attention heads, FFN neurons and whole encoder layers, physically removed.

Importance is first-order Taylor (|dL/dgate| of a multiplicative gate on each head's context
output and on each FFN neuron, Michel et al. 2019 / Molchanov et al. 2019), accumulated over a
few batches of ``ctx.train`` with cross-entropy against ``ctx.train.labels``. Cross-entropy, not
KL to the teacher logits: the model being pruned *is* the teacher, where the KL gradient is 0.
It is computed once per reference model and training set (memoized in ``ctx.extras`` and cached as
safetensors in ``ctx.cache_dir`` under a content hash); with no training data it falls back to
weight magnitude.

Layers are dropped from the top: Sajjad et al. ("On the effect of dropping layers of pre-trained
transformer models", 2023) found top-layer dropping the most reliable simple strategy, and it
keeps the lower layers, whose importance estimates are taken in context, consistent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from nas_fair.encoder import (
    LayerParts,
    encoder_layers,
    layer_parts,
    model_digest,
    num_heads,
    set_encoder_layers,
    set_num_heads,
    tensor_digest,
    trim_batch,
)
from nas_fair.errors import UserError
from nas_fair.spaces.base import (
    STAGE_PRUNE,
    Categorical,
    CompressionContext,
    Family,
    FamilyConfig,
    FloatRange,
    IntRange,
    register,
)

log = logging.getLogger(__name__)

IMPORTANCE_VERSION = "taylor-v1"
IMPORTANCE_MAX_EXAMPLES = 512  # first examples of ctx.train, in order (seed-independent)


@dataclass
class PruningConfig(FamilyConfig):
    """``heads``: global fraction of attention heads removed (>= 1 head kept per layer);
    ``ffn``: fraction of FFN neurons removed in every layer; ``layers``: number of top encoder
    layers dropped, clamped to half the encoder's depth so one range fits every model."""

    heads: float = 0.0
    ffn: float = 0.0
    layers: int = 0

    def __post_init__(self) -> None:
        for name in ("heads", "ffn"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"pruning.{name} must be a number in [0, 1), got {value!r}")
            if not 0.0 <= value < 1.0:
                raise UserError(f"pruning.{name} must be in [0, 1), got {value!r}")
        if isinstance(self.layers, bool) or not isinstance(self.layers, int) or self.layers < 0:
            raise UserError(f"pruning.layers must be an integer >= 0, got {self.layers!r}")


@register
class Pruning(Family):
    name = "pruning"
    stage = STAGE_PRUNE
    config_class = PruningConfig
    params: ClassVar = {
        "heads": Categorical((0.0, 0.25, 0.5)),
        "ffn": FloatRange(0.0, 0.75, step=0.125),
        "layers": IntRange(0, 3),
    }
    edits_layers = True
    composes_with = frozenset({"lowrank", "sharing", "distillation", "quantization"})
    anchor: ClassVar = {"heads": 0.25, "ffn": 0.25, "layers": 0}
    combined_anchor: ClassVar = {"heads": 0.0, "ffn": 0.25, "layers": 0}

    def apply(self, model: nn.Module, config: FamilyConfig, ctx: CompressionContext) -> nn.Module:
        assert isinstance(config, PruningConfig)
        if config.heads == 0 and config.ffn == 0 and config.layers == 0:
            return model
        return prune(model, ctx, heads=config.heads, ffn=config.ffn, layers=config.layers)


def prune(
    model: nn.Module, ctx: CompressionContext, *, heads: float, ffn: float, layers: int
) -> nn.Module:
    """Remove heads / FFN neurons / top layers from ``model`` in place and return it."""
    all_layers = list(encoder_layers(model))
    if len({id(m) for m in all_layers}) != len(all_layers):
        raise UserError("pruning must run before layer sharing (it edits each layer separately)")
    importance = None
    if heads > 0 or ffn > 0:
        importance = head_and_ffn_importance(model, ctx)

    drop = min(layers, len(all_layers) // 2)
    if drop < layers:
        log.debug("pruning.layers=%d clamped to %d (half of %d)", layers, drop, len(all_layers))
    kept = all_layers[: len(all_layers) - drop]
    if drop:
        set_encoder_layers(model, kept)

    parts = [layer_parts(layer) for layer in kept]
    if heads > 0:
        assert importance is not None
        keep = _heads_to_keep(importance["heads"][: len(kept)], heads)
        for p, idx in zip(parts, keep, strict=True):
            _prune_heads(p, idx)
    if ffn > 0:
        assert importance is not None
        for i, p in enumerate(parts):
            scores = importance["ffn"][i]
            n_keep = max(1, scores.numel() - round(ffn * scores.numel()))
            idx = torch.topk(scores, n_keep).indices.sort().values
            _prune_ffn(p, idx)
    return model


# --------------------------------------------------------------------------- importance


def head_and_ffn_importance(model: nn.Module, ctx: CompressionContext) -> dict[str, torch.Tensor]:
    """{"heads": (layers, heads), "ffn": (layers, neurons)} importance scores, cached."""
    data = ctx.train
    n = 0 if data is None else min(len(data), IMPORTANCE_MAX_EXAMPLES)
    key = model_digest(model, extra=IMPORTANCE_VERSION)
    if n:
        key = tensor_digest(
            data.input_ids[:n],
            data.attention_mask[:n],
            data.labels[:n],
            extra=f"{key}|{n}|{ctx.batch_size}",
        )
    memo = ctx.extras.setdefault("pruning.importance", {})
    if key in memo:
        return memo[key]
    path = (
        None if ctx.cache_dir is None else ctx.cache_dir / f"pruning-importance-{key}.safetensors"
    )
    if path is not None and path.is_file():
        from safetensors.torch import load_file

        try:
            memo[key] = load_file(path)
            return memo[key]
        except Exception:  # a broken cache entry is recomputed, not fatal
            log.warning("ignoring unreadable importance cache %s", path)
    result = _taylor_importance(model, ctx, n) if n else _magnitude_importance(model)
    memo[key] = result
    from nas_fair.io import atomic_path, read_only_dir

    if path is not None and not read_only_dir(path.parent):  # read-only run folder: memory only
        from safetensors.torch import save_file

        with atomic_path(path) as tmp:  # parallel trials: each its own unique temp
            save_file({k: v.contiguous() for k, v in result.items()}, str(tmp))
    return result


def _taylor_importance(
    model: nn.Module, ctx: CompressionContext, n: int
) -> dict[str, torch.Tensor]:
    layers = list(encoder_layers(model))
    parts = [layer_parts(layer) for layer in layers]
    head_gates = [torch.ones(num_heads(p.attention), requires_grad=True) for p in parts]
    ffn_gates = [torch.ones(getattr(*p.ffn_in).out_features, requires_grad=True) for p in parts]
    head_score = [torch.zeros(g.shape) for g in head_gates]
    ffn_score = [torch.zeros(g.shape) for g in ffn_gates]

    def gate_hook(gate: torch.Tensor, repeat: int):  # noqa: ANN202
        def hook(_mod: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            g = gate.repeat_interleave(repeat) if repeat > 1 else gate
            return (args[0] * g, *args[1:])

        return hook

    handles = []
    for p, hg, fg in zip(parts, head_gates, ffn_gates, strict=True):
        size = p.attention.attention_head_size
        handles.append(getattr(*p.attn_out).register_forward_pre_hook(gate_hook(hg, size)))
        handles.append(getattr(*p.ffn_out).register_forward_pre_hook(gate_hook(fg, 1)))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gates = head_gates + ffn_gates
    try:
        with torch.enable_grad():
            for start in range(0, n, ctx.batch_size):
                sl = slice(start, min(n, start + ctx.batch_size))
                ids, mask = trim_batch(ctx.train.input_ids[sl], ctx.train.attention_mask[sl])
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                loss = F.cross_entropy(logits.float(), ctx.train.labels[sl].to(device))
                grads = torch.autograd.grad(loss, gates)
                for acc, g in zip(head_score + ffn_score, grads, strict=True):
                    acc += g.detach().abs().cpu()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {"heads": torch.stack(head_score), "ffn": torch.stack(ffn_score)}


def _magnitude_importance(model: nn.Module) -> dict[str, torch.Tensor]:
    """Fallback without data: L2 norm of each head's q/k/v rows and output columns; for FFN
    neurons, the product of input-row and output-column norms."""
    heads, ffn = [], []
    for layer in encoder_layers(model):
        p = layer_parts(layer)
        h, d = num_heads(p.attention), p.attention.attention_head_size
        sq = sum(
            getattr(*s).weight.detach().pow(2).reshape(h, d, -1).sum((1, 2))
            for s in (p.q, p.k, p.v)
        )
        out_w = getattr(*p.attn_out).weight.detach()
        sq = sq + out_w.pow(2).reshape(out_w.shape[0], h, d).sum((0, 2))
        heads.append(sq.sqrt())
        w_in = getattr(*p.ffn_in).weight.detach()
        w_out = getattr(*p.ffn_out).weight.detach()
        ffn.append(w_in.norm(dim=1) * w_out.norm(dim=0))
    return {"heads": torch.stack(heads), "ffn": torch.stack(ffn)}


def _heads_to_keep(scores: torch.Tensor, ratio: float) -> list[torch.Tensor]:
    """Global ranking of heads after per-layer L2 normalization (Michel et al.), removing
    ``round(ratio * total)`` heads but never a layer's last one."""
    n_layers, n_heads = scores.shape
    norm = scores / scores.norm(dim=1, keepdim=True).clamp_min(1e-12)
    to_remove = round(ratio * n_layers * n_heads)
    order = torch.argsort(norm.flatten(), stable=True)
    keep = torch.ones(n_layers, n_heads, dtype=torch.bool)
    left = [n_heads] * n_layers
    for flat in order.tolist():
        if to_remove == 0:
            break
        li, hi = divmod(flat, n_heads)
        if left[li] > 1:
            keep[li, hi] = False
            left[li] -= 1
            to_remove -= 1
    return [row.nonzero().flatten() for row in keep]


# --------------------------------------------------------------------------- surgery


def _linear(slot: tuple[nn.Module, str]) -> nn.Linear:
    mod = getattr(*slot)
    if type(mod) is not nn.Linear:
        raise UserError(f"pruning expects plain nn.Linear layers, found {type(mod).__name__}")
    return mod


def _slice_linear(linear: nn.Linear, idx: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping rows (dim=0, output features) or columns (dim=1) ``idx``."""
    w = linear.weight.detach().index_select(dim, idx).clone()
    bias = linear.bias
    if bias is not None and dim == 0:
        bias = bias.detach()[idx].clone()
    elif bias is not None:
        bias = bias.detach().clone()
    new = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta").to_empty(
        device=w.device
    )
    with torch.no_grad():
        new.weight.copy_(w)
        if bias is not None:
            new.bias.copy_(bias)
    new.weight.requires_grad_(linear.weight.requires_grad)
    return new


def _prune_heads(parts: LayerParts, keep: torch.Tensor) -> None:
    h = num_heads(parts.attention)
    if keep.numel() == h:
        return
    d = parts.attention.attention_head_size
    rows = (keep[:, None] * d + torch.arange(d)[None, :]).flatten()
    for slot in (parts.q, parts.k, parts.v):
        setattr(*slot, _slice_linear(_linear(slot), rows, 0))
    setattr(*parts.attn_out, _slice_linear(_linear(parts.attn_out), rows, 1))
    set_num_heads(parts.attention, int(keep.numel()))


def _prune_ffn(parts: LayerParts, keep: torch.Tensor) -> None:
    if keep.numel() == _linear(parts.ffn_in).out_features:
        return
    setattr(*parts.ffn_in, _slice_linear(_linear(parts.ffn_in), keep, 0))
    setattr(*parts.ffn_out, _slice_linear(_linear(parts.ffn_out), keep, 1))

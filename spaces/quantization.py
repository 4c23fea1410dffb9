"""Post-training weight quantization of the encoder's linear layers and the embeddings.

Per group (attention linears, FFN linears, embedding tables) a bit width from {32, 16, 8, 4}:

* 32: untouched (off).
* 16: weights stored fp16, upcast to fp32 in forward: half the bytes, **no speed-up on CPU**
  (slightly slower, for the upcast).
* 8: linears become :class:`~nas_fair.modules.RowInt8Linear`: symmetric
  per-output-channel int8 weights, each activation row (token) quantized with its own scale, an
  exact int8 matmul (fbgemm's fused kernel, or ``torch._int_mm`` where that is inexact): ~1/4 of
  the bytes, faster than fp32 on CPU, and a row's prediction does not depend on the rest of its
  batch or on padding (torch's dynamic int8 Linear, one activation scale per call, did). Embeddings: int8 rows with one scale per row.
* 4: weights packed two per byte with one fp16 scale per group of 64 inputs (~1/7.5 of the
  bytes), dequantized in forward: smaller, not faster. Embeddings: packed rows, grouped scales.

Low-rank factors are linear layers too and follow the group they sit in. The pooler / RoBERTa
classification dense / DistilBERT pre-classifier follow ``ffn_bits``; the final output projection
(hidden -> labels, tiny and the most sensitive) stays fp32. Shared layers are quantized once
(the shared object is edited, so every position sees the same quantized module).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from nas_fair.encoder import head_linears, layer_parts, linear_slots, unique_layers
from nas_fair.errors import one_of
from nas_fair.modules import (
    Fp16Linear,
    HalfEmbedding,
    Packed4Linear,
    QuantEmbedding,
    RowInt8Linear,
)
from nas_fair.spaces.base import (
    STAGE_QUANTIZE,
    Categorical,
    CompressionContext,
    Family,
    FamilyConfig,
    register,
)

BITS = (32, 16, 8, 4)


@dataclass
class QuantizationConfig(FamilyConfig):
    """Weight bit widths per group; 32 leaves the group in fp32."""

    attention_bits: int = 32
    ffn_bits: int = 32
    embedding_bits: int = 32

    def __post_init__(self) -> None:
        for name in ("attention_bits", "ffn_bits", "embedding_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or value not in BITS:
                raise one_of(f"quantization.{name}", value, BITS)


def quantize_linear(linear: nn.Linear, bits: int) -> nn.Module:
    """The ``bits``-bit replacement of one Linear (the Linear itself for 32)."""
    if bits == 32:
        return linear
    if bits == 16:
        return Fp16Linear.from_linear(linear)
    if bits == 8:
        return RowInt8Linear.from_linear(linear)
    if bits == 4:
        return Packed4Linear.from_linear(linear)
    raise one_of("bits", bits, BITS)


def quantize_embedding(emb: nn.Embedding, bits: int) -> nn.Module:
    if bits == 32:
        return emb
    if bits == 16:
        return HalfEmbedding.from_embedding(emb)
    return QuantEmbedding.from_embedding(emb, bits)


@register
class Quantization(Family):
    name = "quantization"
    stage = STAGE_QUANTIZE
    config_class = QuantizationConfig
    params: ClassVar = {
        "attention_bits": Categorical(BITS),
        "ffn_bits": Categorical(BITS),
        "embedding_bits": Categorical(BITS),
    }
    edits_layers = True
    composes_with = frozenset({"pruning", "lowrank", "sharing", "distillation"})
    # int8 everywhere: the one-call compression most users try first.
    anchor: ClassVar = {"attention_bits": 8, "ffn_bits": 8, "embedding_bits": 8}
    combined_anchor: ClassVar = anchor

    def apply(self, model: nn.Module, config: FamilyConfig, ctx: CompressionContext) -> nn.Module:
        assert isinstance(config, QuantizationConfig)
        # Collect every slot first, then replace: the encoder walk sees each shared layer once.
        todo: list[tuple[nn.Module, str, nn.Module, int]] = []
        for layer in unique_layers(model):
            parts = layer_parts(layer)
            for scopes, bits in (
                (parts.attention_scope, config.attention_bits),
                (parts.ffn_scope, config.ffn_bits),
            ):
                if bits == 32:
                    continue
                for scope in scopes:
                    todo.extend((p, a, m, bits) for p, a, m in linear_slots(scope))
        if config.ffn_bits != 32:
            linears, last = head_linears(model)
            todo.extend(
                (p, a, m, config.ffn_bits) for p, a, m in linears if m is not _get(model, last)
            )
        for parent, attr, lin, bits in todo:
            setattr(parent, attr, quantize_linear(lin, bits))

        if config.embedding_bits != 32:
            emb_root = getattr(getattr(model, "base_model", model), "embeddings", None)
            if emb_root is not None:
                for parent, attr, emb in list(linear_slots(emb_root, (nn.Embedding,))):
                    setattr(parent, attr, quantize_embedding(emb, config.embedding_bits))
        return model


def _get(model: nn.Module, path: str | None) -> nn.Module | None:
    return None if path is None else model.get_submodule(path)

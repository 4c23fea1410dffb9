"""Replacement modules used by the compression families, and how each is rebuilt from JSON.

Every module here stores its compressed form as plain tensors (state_dict / safetensors-ready)
and describes its own shape with ``spec()``; ``build_module(spec)`` makes an empty module of the
same shape, which is how ``nas_fair.checkpoint`` rebuilds a compressed architecture without
pickling anything. The int8 linear layer is :class:`RowInt8Linear` (int8 weights, each
activation row quantized with its own scale, exact int32 accumulation in fbgemm's fused kernel
or ``torch._int_mm``), so a row's output never depends on the other rows of its batch. torch's dynamic quantized Linear (one
activation scale per call) is still read from old exports, through adapter functions because its
weights live in packed params.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.nn.quantized import dynamic as nnqd

DynamicInt8Linear = nnqd.Linear

# Default group along the input dimension for 4-bit weights: one fp16 scale per 64 weights adds
# 2/64 byte per weight, so a 4-bit matrix takes ~0.53 bytes per weight (~1/7.5 of fp32).
GROUP_SIZE_4BIT = 64


@contextmanager
def quiet_quantized_deprecation() -> Iterator[None]:
    """torch 2.13 warns that qint8 tensor creation is deprecated; the kernel is still the one
    that makes int8 fast on CPU, so the warning is silenced where we create such tensors."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*quantiz.*deprecated.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao.*")
        yield


# --------------------------------------------------------------------------- low rank


class LowRankLinear(nn.Module):
    """``W ~= up @ down``: two plain Linear layers, so later stages (quantization) see linears."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.down = _empty_linear(in_features, rank, bias=False)
        self.up = _empty_linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def spec(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "bias": _has_bias(self.up),
        }

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


# --------------------------------------------------------------------------- weight-only formats


class _LinearShape:
    """``spec`` and ``logical_params`` of a linear replacement with in/out features and an
    optional ``bias``."""

    in_features: int
    out_features: int
    bias: torch.Tensor | None

    def spec(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
        }

    def logical_params(self) -> int:
        return self.in_features * self.out_features + (
            0 if self.bias is None else self.out_features
        )


class Fp16Linear(_LinearShape, nn.Module):
    """Weight stored in fp16 (half the bytes), upcast to fp32 for the matmul on every call.

    This saves storage only: on CPU there is no fp16 GEMM speed-up, and the upcast costs a little.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.float16))
        self.register_buffer("bias", torch.empty(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp16Linear:
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None)
        mod.weight.copy_(linear.weight.detach().to(torch.float16))
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach())
        return mod.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias)


def _group_layout(width: int, group_size: int) -> tuple[int, int]:
    """(group size, padded width) for packing rows of ``width`` values two per byte."""
    even = width + (width % 2)
    gs = min(group_size, even)
    gs += gs % 2
    padded = -(-width // gs) * gs
    return gs, padded


def quantize_groups(
    w: torch.Tensor, bits: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-group quantization of each row of ``w`` (rows, width).

    Returns (q, scales): q as int8 values in [-(2^(b-1)-1), 2^(b-1)-1] (padded to the group
    layout), scales as fp16 (rows, groups). The scale is rounded to fp16 *before* quantizing, so
    dequantization with the stored scale reproduces exactly what was intended.
    """
    rows, width = w.shape
    gs, padded = _group_layout(width, group_size)
    w = w.detach().float()
    if padded != width:
        w = F.pad(w, (0, padded - width))
    g = w.reshape(rows, padded // gs, gs)
    qmax = 2 ** (bits - 1) - 1
    scales = (g.abs().amax(-1) / qmax).to(torch.float16)
    safe = torch.where(scales == 0, torch.ones_like(scales), scales).float()
    q = torch.round(g / safe[..., None]).clamp(-qmax, qmax).to(torch.int8)
    return q.reshape(rows, padded), scales


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two signed 4-bit values per byte: even column in the low nibble, odd in the high one."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`, as float32 values in [-8, 7]."""
    nibbles = torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)
    return nibbles.to(torch.float32) - 8.0


class Packed4Linear(nn.Module):
    """4-bit weights packed two per byte (uint8) with one fp16 scale per group of inputs.

    The full weight is dequantized on every call, so this saves storage (~1/7.5 of fp32) but is
    not faster than fp32 on CPU; latency is whatever the benchmark measures.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group_size: int = GROUP_SIZE_4BIT,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.group_size, padded = _group_layout(in_features, group_size)
        self.register_buffer("packed", torch.empty(out_features, padded // 2, dtype=torch.uint8))
        self.register_buffer(
            "scales",
            torch.empty(out_features, padded // self.group_size, dtype=torch.float16),
        )
        self.register_buffer("bias", torch.empty(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = GROUP_SIZE_4BIT) -> Packed4Linear:
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size)
        q, scales = quantize_groups(linear.weight, 4, mod.group_size)
        mod.packed.copy_(pack_int4(q))
        mod.scales.copy_(scales)
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach())
        return mod.to(linear.weight.device)

    def dequantized_weight(self) -> torch.Tensor:
        q = unpack_int4(self.packed)
        rows, padded = q.shape
        w = (
            q.reshape(rows, padded // self.group_size, self.group_size)
            * self.scales.float()[..., None]
        )
        return w.reshape(rows, padded)[:, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)

    def spec(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "group_size": self.group_size,
        }

    def logical_params(self) -> int:
        return self.in_features * self.out_features + (
            0 if self.bias is None else self.out_features
        )


# --------------------------------------------------------------------------- embeddings


class HalfEmbedding(nn.Module):
    """Embedding table stored in fp16; only the looked-up rows are upcast to fp32."""

    def __init__(
        self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None
    ) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.register_buffer(
            "weight", torch.empty(num_embeddings, embedding_dim, dtype=torch.float16)
        )

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> HalfEmbedding:
        mod = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx)
        mod.weight.copy_(emb.weight.detach().to(torch.float16))
        return mod.to(emb.weight.device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids].float()

    def spec(self) -> dict[str, Any]:
        return {
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "padding_idx": self.padding_idx,
        }

    def logical_params(self) -> int:
        return self.num_embeddings * self.embedding_dim


class QuantEmbedding(nn.Module):
    """Embedding rows quantized to 8 bits (int8, one scale per row) or 4 bits (packed uint8, one
    scale per group of 64 values); only the looked-up rows are dequantized."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        bits: int,
        padding_idx: int | None = None,
        group_size: int | None = None,
    ) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"QuantEmbedding bits must be 4 or 8, got {bits}")
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.bits = bits
        self.padding_idx = padding_idx
        if group_size is None:
            group_size = embedding_dim if bits == 8 else GROUP_SIZE_4BIT
        self.group_size, padded = _group_layout(embedding_dim, group_size)
        if bits == 8:
            self.register_buffer("qweight", torch.empty(num_embeddings, padded, dtype=torch.int8))
        else:
            self.register_buffer(
                "qweight", torch.empty(num_embeddings, padded // 2, dtype=torch.uint8)
            )
        self.register_buffer(
            "scales", torch.empty(num_embeddings, padded // self.group_size, dtype=torch.float16)
        )

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, bits: int) -> QuantEmbedding:
        mod = cls(emb.num_embeddings, emb.embedding_dim, bits, emb.padding_idx)
        q, scales = quantize_groups(emb.weight, bits, mod.group_size)
        mod.qweight.copy_(q if bits == 8 else pack_int4(q))
        mod.scales.copy_(scales)
        return mod.to(emb.weight.device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.qweight[ids]
        q = rows.to(torch.float32) if self.bits == 8 else unpack_int4(rows)
        shape = q.shape
        g = q.reshape(*shape[:-1], shape[-1] // self.group_size, self.group_size)
        w = g * self.scales[ids].float()[..., None]
        return w.reshape(shape)[..., : self.embedding_dim]

    def spec(self) -> dict[str, Any]:
        return {
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "bits": self.bits,
            "padding_idx": self.padding_idx,
            "group_size": self.group_size,
        }

    def logical_params(self) -> int:
        return self.num_embeddings * self.embedding_dim


# --------------------------------------------------------------------------- int8, per row

# Floor of an activation row's absolute maximum before it becomes a scale: an all-zero row
# quantizes to zeros instead of dividing by zero. The ONNX export uses the same constant.
ROW_SCALE_FLOOR = 1e-8
INT8_MAX = 127.0
# A row divided by its own max |x| lies in [-1, 1]; with this fixed scale and zero point the
# fused uint8 kernel maps it to 1..255 (255 levels, as symmetric int8 with scale 1/127), the
# same for every batch, so one per-call scale still gives per-row quantization.
UNIT_SCALE = 1.0 / INT8_MAX
UNIT_ZERO_POINT = 128


def row_absmax(x: torch.Tensor) -> torch.Tensor:
    """max |x| of each row of ``x`` (rows, width), floored at :data:`ROW_SCALE_FLOOR`, (rows, 1).

    Two fast reductions and no abs copy; bit-identical to ONNX's ReduceMax(Abs(x))."""
    amax = torch.maximum(x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True).neg_())
    return amax.clamp_(min=ROW_SCALE_FLOOR)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization of each row of ``x`` (rows, width) with its own scale.

    Returns (q int8 (rows, width), row max |x| float32 (rows, 1)); q = round(x / amax * 127),
    rounding half to even (ONNX ``Round``), as the fused kernel quantizes ``x / amax`` with
    scale 1/127. Each row's result depends on that row alone, which is what makes int8
    predictions independent of batch composition and padding (a padding token is a row of its
    own). ``nas_fair.onnx_export._rowwise_int8`` repeats these ops in this order."""
    amax = row_absmax(x)
    # |x / amax| <= 1 exactly (division is correctly rounded), so no clamp is needed.
    q = (x / amax).mul_(INT8_MAX).round_().to(torch.int8)
    return q, amax


@contextmanager
def _fbgemm_engine() -> Iterator[None]:
    """Pack for fbgemm whatever the global engine (onednn / qnnpack packs lack the fused op)."""
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = "fbgemm"
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


def pack_int8_weight(q: torch.Tensor, scales: torch.Tensor) -> Any:
    """fbgemm's packed form of an (out, in) int8 weight with per-output-channel fp32 scales."""
    zero_points = torch.zeros(q.shape[0], dtype=torch.long)
    with quiet_quantized_deprecation(), _fbgemm_engine():
        qw = torch._make_per_channel_quantized_tensor(
            q.contiguous(), scales.double(), zero_points, 0
        )
        return torch.ops.quantized.linear_prepack(qw, None)


def fused_int8(rows: torch.Tensor, packed: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(``(rows / amax) @ W^T`` in int8 by fbgemm, ``amax``): the caller scales back by
    ``amax`` (fused with the bias add)."""
    amax = row_absmax(rows)
    y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
        rows / amax, UNIT_SCALE, UNIT_ZERO_POINT, packed
    )
    return y, amax


@functools.cache
def fused_int8_available() -> bool:
    """Whether fbgemm's fused int8 linear runs here and is exact on full 8-bit activations.

    CPUs without VNNI add u8 x s8 pairs in saturating int16 (why torch's dynamic Linear uses
    7-bit activations); the probe's pairs overflow int16, so such CPUs take the ``_int_mm``
    path, which is exact everywhere."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    k = 64
    try:
        packed = pack_int8_weight(torch.full((8, k), 127, dtype=torch.int8), torch.ones(8))
        y, _ = fused_int8(torch.ones(4, k), packed)
    except (RuntimeError, NotImplementedError):
        return False
    return bool(torch.equal(y, torch.full((4, 8), k * INT8_MAX)))


class RowInt8Linear(_LinearShape, nn.Module):
    """int8 Linear with one activation scale per row (token) instead of one per call.

    Weights: symmetric per-output-channel int8 (``qweight_t``, stored (in, out)) and fp32
    scales; that is all a checkpoint holds. Forward: each input row is divided by its own max
    |x| and run through fbgemm's fused int8 linear with a fixed activation scale (1/127), which
    packs the weight once (rebuilt when the buffers change) and accumulates in exact int32;
    the output row is multiplied back by its max |x|, then the bias added. Where that kernel is
    missing or inexact (:func:`fused_int8_available`), the same integers go through
    ``torch._int_mm``. Either way a row's output is bit-identical whatever else is in the batch."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("qweight_t", torch.zeros(in_features, out_features, dtype=torch.int8))
        self.register_buffer("weight_scales", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._packed: Any = None
        self._packed_key: tuple[int, ...] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> RowInt8Linear:
        w = linear.weight.detach().float()
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None)
        scales = (w.abs().amax(dim=1) / INT8_MAX).clamp(min=1e-8)
        q = torch.round(w / scales[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
        mod.qweight_t.copy_(q.t())
        mod.weight_scales.copy_(scales)
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach().float())
        return mod.to(linear.weight.device)

    def dequantized_weight(self) -> torch.Tensor:
        """The (out, in) fp32 weight the integers stand for."""
        return self.qweight_t.t().float() * self.weight_scales[:, None]

    def packed_weight(self) -> Any:
        """fbgemm's packed weight, or None where the fused kernel is not used."""
        if self.qweight_t.device.type != "cpu" or not fused_int8_available():
            return None
        key = (*_tensor_key(self.qweight_t), *_tensor_key(self.weight_scales))
        if key != self._packed_key:
            self._packed = pack_int8_weight(self.qweight_t.t(), self.weight_scales.float())
            self._packed_key = key
        return self._packed

    def int_mm(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The portable path, as :func:`fused_int8`: :func:`quantize_rows`, ``torch._int_mm``
        and the channel scales (times 1/127, the order of fbgemm's float epilogue)."""
        q, amax = quantize_rows(rows)
        y = torch._int_mm(q, self.qweight_t).to(torch.float32)
        return y.mul_(self.weight_scales.float() * UNIT_SCALE), amax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features).float()
        packed = self.packed_weight()
        y, amax = self.int_mm(rows) if packed is None else fused_int8(rows, packed)
        # one pass, in place: bias + y * amax (the bias must come after the row rescale);
        # out= refuses inputs that track gradients (a forward outside no_grad)
        if self.bias is None:
            y = y.mul_(amax)
        else:
            y = torch.addcmul(self.bias, y, amax, out=None if amax.requires_grad else y)
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._packed_key = None  # copy_ into the same storage may not change the key
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        # the packed weight is a cache of the buffers: rebuilt after copy / pickle
        state = dict(self.__dict__)
        state["_packed"], state["_packed_key"] = None, None
        return state


def _tensor_key(t: torch.Tensor) -> tuple[int, int]:
    """(storage address, in-place version) of ``t``; inference tensors have no version."""
    try:
        version = t._version
    except RuntimeError:
        version = -1
    return t.data_ptr(), version


# --------------------------------------------------------------------------- int8 (legacy kernel)


def int8_dynamic_linear(linear: nn.Linear) -> DynamicInt8Linear:
    """torch's fbgemm/x86 dynamic int8 Linear: symmetric per-output-channel int8 weights, the
    activations quantized per call (one scale for all rows) by the kernel itself. Kept for
    measurements against :class:`RowInt8Linear` and for reading old exports; the search no longer
    builds it, since its outputs depend on batch composition."""
    w = linear.weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8).double()
    zero_points = torch.zeros(w.shape[0], dtype=torch.long)
    with quiet_quantized_deprecation():
        qw = torch.quantize_per_channel(w, scales, zero_points, 0, torch.qint8)
        mod = DynamicInt8Linear(linear.in_features, linear.out_features, dtype=torch.qint8)
        bias = None if linear.bias is None else linear.bias.detach().float()
        mod.set_weight_bias(qw, bias)
    return mod


def int8_state(mod: DynamicInt8Linear) -> dict[str, torch.Tensor]:
    """The int8 Linear as plain tensors (weight, per-channel scales and zero points, bias)."""
    with quiet_quantized_deprecation():
        w = mod.weight()
        out = {
            "weight_int8": w.int_repr().contiguous(),
            "weight_scales": w.q_per_channel_scales().to(torch.float64).contiguous(),
            "weight_zero_points": w.q_per_channel_zero_points().to(torch.int64).contiguous(),
        }
        bias = mod.bias()
    if bias is not None:
        out["bias"] = bias.detach().float().contiguous()
    return out


def int8_load_state(mod: DynamicInt8Linear, state: dict[str, torch.Tensor]) -> None:
    """Rebuild the per-channel qint8 weight from plain tensors and pack it into ``mod``."""
    with quiet_quantized_deprecation():
        qw = torch._make_per_channel_quantized_tensor(
            state["weight_int8"], state["weight_scales"], state["weight_zero_points"], 0
        )
        mod.set_weight_bias(qw, state.get("bias"))


def int8_has_bias(mod: DynamicInt8Linear) -> bool:
    return mod.bias() is not None


# --------------------------------------------------------------------------- trimmed vocabulary


class RemappedEmbedding(nn.Module):
    """The kept rows of a word-embedding table, looked up by the original ids.

    ``kept_mask`` is one bit per original id (bit ``i % 8`` of byte ``i // 8``), so the map costs
    ``num_original / 8`` bytes; row ``r`` of ``inner`` is the ``r``-th kept id in ascending
    order, and an id that is not kept reads row ``unk_index`` (the unknown token). ``inner`` is
    a plain ``nn.Embedding`` until quantization replaces it (found as any other embedding).
    """

    def __init__(self, num_original: int, num_kept: int, embedding_dim: int, unk_index: int,
                 padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_original = num_original
        self.num_kept = num_kept
        self.embedding_dim = embedding_dim
        self.unk_index = unk_index
        self.inner: nn.Module = nn.Embedding(
            num_kept, embedding_dim, padding_idx=padding_idx, device="meta").to_empty(device="cpu")
        self.register_buffer("kept_mask", torch.zeros(-(-num_original // 8), dtype=torch.uint8))
        self._map: tuple[tuple[int, int], torch.Tensor] | None = None

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, kept: torch.Tensor, unk_id: int
                       ) -> RemappedEmbedding:
        kept = torch.as_tensor(kept, dtype=torch.int64).unique(sorted=True)
        index = {int(o): i for i, o in enumerate(kept.tolist())}
        pad = None if emb.padding_idx is None else index.get(int(emb.padding_idx))
        mod = cls(emb.num_embeddings, len(kept), emb.embedding_dim, index[unk_id], pad)
        bits = torch.zeros(len(mod.kept_mask) * 8, dtype=torch.uint8)
        bits[kept] = 1
        weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
        with torch.no_grad():
            mod.inner.weight.copy_(emb.weight.detach()[kept])
            mod.kept_mask.copy_((bits.reshape(-1, 8) * weights).sum(1).to(torch.uint8))
        return mod.to(emb.weight.device)

    def kept(self) -> torch.Tensor:
        """Boolean (num_original,): which original ids have a row."""
        shifts = torch.arange(8, dtype=torch.uint8, device=self.kept_mask.device)
        bits = (self.kept_mask[:, None] >> shifts) & 1
        return bits.flatten()[: self.num_original].bool()

    def kept_ids(self) -> torch.Tensor:
        """The kept original ids, ascending (row ``r`` of ``inner`` is ``kept_ids()[r]``)."""
        return self.kept().nonzero().flatten()

    def index_map(self) -> torch.Tensor:
        """Original id -> row of ``inner`` (int64, ``unk_index`` for every id not kept); the
        bits are decoded again only when ``kept_mask`` changes (a checkpoint load writes it)."""
        key = (self.kept_mask.data_ptr(), self.kept_mask._version)
        if self._map is None or self._map[0] != key:
            kept = self.kept()
            rows = torch.where(kept, kept.cumsum(0) - 1, torch.full_like(kept, self.unk_index,
                                                                         dtype=torch.int64))
            self._map = (key, rows)
        return self._map[1]

    def new_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Original ids -> rows of ``inner``."""
        return self.index_map()[ids]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.inner(self.new_ids(ids))

    def spec(self) -> dict[str, Any]:
        pad = getattr(self.inner, "padding_idx", None)
        return {"num_original": self.num_original, "num_kept": self.num_kept,
                "embedding_dim": self.embedding_dim, "unk_index": self.unk_index,
                "padding_idx": pad}

    def extra_repr(self) -> str:
        return f"{self.num_original} -> {self.num_kept} rows, unk_index={self.unk_index}"


# --------------------------------------------------------------------------- spec <-> module


def _empty_linear(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    """An nn.Linear without the (slow, pointless) random init; values are set by the caller."""
    return nn.Linear(in_features, out_features, bias=bias, device="meta").to_empty(device="cpu")


def _has_bias(linear: nn.Module) -> bool:
    if isinstance(linear, DynamicInt8Linear):
        return int8_has_bias(linear)
    return getattr(linear, "bias", None) is not None


CUSTOM_TYPES: dict[str, type[nn.Module]] = {
    "RemappedEmbedding": RemappedEmbedding,
    "LowRankLinear": LowRankLinear,
    "Fp16Linear": Fp16Linear,
    "Packed4Linear": Packed4Linear,
    "RowInt8Linear": RowInt8Linear,
    "HalfEmbedding": HalfEmbedding,
    "QuantEmbedding": QuantEmbedding,
}

# Modules whose storage is not their own parameters/buffers: serialized by adapter functions,
# and nothing below them is visited.
OPAQUE_TYPES: tuple[type[nn.Module], ...] = (DynamicInt8Linear,)


def module_spec(mod: nn.Module) -> dict[str, Any] | None:
    """JSON description of a rebuildable weight-bearing module, or None for anything else."""
    if isinstance(mod, DynamicInt8Linear):
        return {
            "type": "DynamicInt8Linear",
            "in_features": mod.in_features,
            "out_features": mod.out_features,
            "bias": int8_has_bias(mod),
        }
    for name, cls in CUSTOM_TYPES.items():
        if type(mod) is cls:
            return {"type": name, **mod.spec()}  # type: ignore[operator]
    if type(mod) is nn.Linear:
        return {
            "type": "Linear",
            "in_features": mod.in_features,
            "out_features": mod.out_features,
            "bias": mod.bias is not None,
        }
    if type(mod) is nn.Embedding:
        return {
            "type": "Embedding",
            "num_embeddings": mod.num_embeddings,
            "embedding_dim": mod.embedding_dim,
            "padding_idx": mod.padding_idx,
        }
    return None


def build_module(spec: dict[str, Any]) -> nn.Module:
    """An empty module of the described type and shape (values are loaded afterwards)."""
    kind = spec.get("type")
    args = {k: v for k, v in spec.items() if k != "type"}
    if kind == "Linear":
        return _empty_linear(args["in_features"], args["out_features"], bias=args["bias"])
    if kind == "Embedding":
        return nn.Embedding(
            args["num_embeddings"],
            args["embedding_dim"],
            padding_idx=args["padding_idx"],
            device="meta",
        ).to_empty(device="cpu")
    if kind == "DynamicInt8Linear":
        out_f, in_f = args["out_features"], args["in_features"]
        with quiet_quantized_deprecation():
            mod = DynamicInt8Linear(in_f, out_f, dtype=torch.qint8)
            qw = torch._make_per_channel_quantized_tensor(
                torch.zeros(out_f, in_f, dtype=torch.int8),
                torch.ones(out_f, dtype=torch.float64),
                torch.zeros(out_f, dtype=torch.int64),
                0,
            )
            mod.set_weight_bias(qw, torch.zeros(out_f) if args["bias"] else None)
        return mod
    if kind in CUSTOM_TYPES:
        return CUSTOM_TYPES[kind](**args)
    raise ValueError(f"unknown module type {kind!r} in structure.json")


def logical_params(mod: nn.Module) -> int | None:
    """Logical weight count of a compressed module (what it stands for), None for plain ones."""
    if isinstance(mod, DynamicInt8Linear):
        return mod.in_features * mod.out_features + (mod.out_features if int8_has_bias(mod) else 0)
    fn = getattr(mod, "logical_params", None)
    return int(fn()) if callable(fn) else None

"""measure_latency: sane timings, thread count restored, MAC count by hand."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from nas_fair.errors import UserError
from nas_fair.objectives.latency import measure_latency

from conftest import tiny_config, tiny_model

# Tiny config: hidden 32, 4 layers, 4 heads, intermediate 64, 3 labels; B=2, L=8 (16 tokens).
# per layer: q k v o 4*32*32 + ffn 2*32*64 = 8192 MACs/token -> 8192*16*4 = 524288
# attention: 2*B*L*L*32 = 8192 per layer -> 32768
# pooler (or DistilBERT pre_classifier) on the first token: 2*32*32 = 2048; classifier 2*32*3 = 192
TINY_MACS = 524288 + 32768 + 2048 + 192


def _run(model: nn.Module, **kw) -> dict:  # noqa: ANN003
    args = dict(batch_size=2, seq_len=8, warmup=1, repeats=3)
    args.update(kw)
    return measure_latency(model, **args)


def test_latency_tiny_models(any_tiny_model):
    r = _run(any_tiny_model)
    for key in ("median_ms", "iqr_ms", "p10_ms", "p90_ms"):
        assert math.isfinite(r[key]) and r[key] >= 0, key
    assert r["median_ms"] > 0 and r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
    assert r["repeats"] == 3
    assert r["macs"] == TINY_MACS


def test_threads_set_and_restored(tiny_bert):
    before = torch.get_num_threads()
    r = _run(tiny_bert, threads=2)
    assert r["threads"] == 2 and torch.get_num_threads() == before


def test_macs_fall_with_smaller_linears():
    from transformers import AutoModelForSequenceClassification

    cfg = tiny_config("bert")
    cfg.intermediate_size = 16
    small = AutoModelForSequenceClassification.from_config(cfg).eval()
    big = tiny_model("bert")
    m_small, m_big = _run(small)["macs"], _run(big)["macs"]
    # ffn 2*32*(64-16) MACs/token fewer, 16 tokens, 4 layers
    assert m_big - m_small == 2 * 32 * 48 * 16 * 4


def test_macs_follow_pruned_heads():
    model = tiny_model("bert")
    base = _run(model)["macs"]
    # Structured head pruning as a family does it: layer 0 keeps 2 of 4 heads (8 wide each), so
    # q, k, v give 16 outputs and the output projection takes 16 inputs.
    layer = model.bert.encoder.layer[0].attention
    for name in ("query", "key", "value"):
        setattr(layer.self, name, nn.Linear(32, 16))
    layer.output.dense = nn.Linear(16, 32)
    pruned = _run(model)["macs"]
    # q, k, v: 32 -> 16 outputs; o: 32 -> 16 inputs: 4*32*16 MACs/token fewer over 16 tokens,
    # attention 2*2*8*8*16 fewer in that layer
    assert base - pruned == 4 * 32 * 16 * 16 + 2 * 2 * 8 * 8 * 16


def test_macs_dynamic_quantized(tiny_bert):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            q = torch.ao.quantization.quantize_dynamic(tiny_bert, {nn.Linear}, dtype=torch.qint8)
        except (RuntimeError, AttributeError) as e:  # no quantized engine in this build
            pytest.skip(f"dynamic quantization unavailable: {e}")
        r = _run(q)
    assert r["macs"] == TINY_MACS


class LowRank(nn.Module):
    """A factorised layer holding raw factors: counts rank * (in + out) per row."""

    def __init__(self, n_in: int, n_out: int, rank: int) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = n_in, n_out, rank
        self.u = nn.Parameter(torch.randn(n_in, rank))
        self.v = nn.Parameter(torch.randn(rank, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.u @ self.v


class Plain(nn.Module):
    def __init__(self, vocab: int = 50, hidden: int = 16, rank: int | None = None) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        self.mid = LowRank(hidden, 24, rank) if rank else nn.Linear(hidden, 24)
        self.out = nn.Linear(24, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.mid(self.emb(ids)))


def test_plain_module_and_low_rank():
    full = _run(Plain(), vocab_size=50)["macs"]
    assert full == 16 * (16 * 24 + 24 * 2)
    low = _run(Plain(rank=4), vocab_size=50)["macs"]
    assert low == 16 * (4 * (16 + 24) + 24 * 2)
    with pytest.raises(UserError, match="vocab_size"):
        _run(Plain())
    with pytest.raises(UserError, match="batch_size"):
        _run(Plain(), vocab_size=50, batch_size=0)


def test_macs_factorised_query():
    """A low-rank query made of two Linears: both counted, attention width from its output."""
    model = tiny_model("bert")
    base = _run(model)["macs"]
    model.bert.encoder.layer[0].attention.self.query = nn.Sequential(
        nn.Linear(32, 4), nn.Linear(4, 32)
    )
    # 32*32 -> 32*4 + 4*32 MACs per token, 16 tokens; attention unchanged
    assert base - _run(model)["macs"] == (32 * 32 - 2 * 32 * 4) * 16

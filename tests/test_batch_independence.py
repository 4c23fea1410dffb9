"""A row's prediction is what it is alone: the same in any batch and under either padding rule
(dynamic: padded to the longest row of its batch; fixed: padded to max_length), for every
compression family, in torch and in the ONNX export.

torch's dynamic int8 Linear quantized activations with one scale per call, so a sentence's
class depended on its neighbours; the int8 linear now scales each row (token) on its own and
accumulates in integers. What remains is float rounding in the fp32 ops (softmax, GEMMs blocked
by batch size), bounded here by ``ATOL``; the argmax must be identical.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_onnx import FIXED, compressed, export, run_onnx, session
from torch import nn

from nas_fair.modules import RowInt8Linear, fused_int8_available, int8_dynamic_linear

ATOL = 1e-5  # logits of the tiny models are O(0.1-1); float rounding measured ~1e-8
MAX_LENGTH = 16
CASES = [(k, c) for k in ("bert", "distilbert", "roberta") for c in [*FIXED, "random1", "random2"]]


def varied_batch(n: int = 9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of different lengths padded to MAX_LENGTH, and each row's length."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 128, (n, MAX_LENGTH), generator=g)
    lengths = torch.randint(2, MAX_LENGTH - 2, (n,), generator=g)
    lengths[0] = MAX_LENGTH - 3  # the longest: dynamic padding stops short of MAX_LENGTH
    mask = (torch.arange(MAX_LENGTH)[None, :] < lengths[:, None]).long()
    return ids, mask, lengths


def three_ways(run, ids: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor):  # noqa: ANN001, ANN201
    """(alone without padding, batched with dynamic padding, batched with fixed padding)."""
    longest = int(lengths.max())
    alone = np.concatenate([run(ids[i : i + 1, : int(n)], mask[i : i + 1, : int(n)])
                            for i, n in enumerate(lengths)])
    dynamic = run(ids[:, :longest], mask[:, :longest])
    fixed = run(ids, mask)
    return alone, dynamic, fixed


def torch_runner(model: nn.Module):  # noqa: ANN201
    def run(ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits.numpy()

    return run


def assert_same(outs: tuple[np.ndarray, ...]) -> None:
    alone = outs[0]
    for other in outs[1:]:
        assert np.abs(other - alone).max() <= ATOL
        assert np.array_equal(other.argmax(1), alone.argmax(1))


@pytest.mark.parametrize(("kind", "case"), CASES)
def test_torch_predictions_do_not_depend_on_the_batch(kind: str, case: str) -> None:
    ids, mask, lengths = varied_batch()
    assert_same(three_ways(torch_runner(compressed(kind, case)), ids, mask, lengths))


@pytest.mark.parametrize(("kind", "case"), [("bert", "int8"), ("bert", "everything"),
                                            ("distilbert", "random1"), ("roberta", "int8")])
def test_onnx_predictions_do_not_depend_on_the_batch(kind: str, case: str,
                                                     tmp_path: Path) -> None:
    model = compressed(kind, case)
    sess = session(export(model, tmp_path, int8=True))
    ids, mask, lengths = varied_batch(seed=1)
    outs = three_ways(lambda i, m: run_onnx(sess, i, m), ids, mask, lengths)
    assert_same(outs)
    ours = torch_runner(model)(ids, mask)
    assert np.array_equal(outs[2].argmax(1), ours.argmax(1))
    assert np.abs(outs[2] - ours).max() <= 1e-2 * np.abs(ours).max()


def test_row_int8_linear_is_exact_per_row() -> None:
    """Bit-identical rows whatever the batch: the integer accumulation is exact. torch's dynamic
    int8 Linear, one scale per call, is not (a large row changes the others' scale)."""
    torch.manual_seed(0)
    lin = nn.Linear(48, 24)
    x = torch.randn(6, 48)
    x[3] *= 40  # one row with a much larger range
    ours = RowInt8Linear.from_linear(lin)
    alone = torch.cat([ours(x[i : i + 1]) for i in range(len(x))])
    assert torch.equal(ours(x), alone)
    assert (ours(x) - lin(x)).abs().max() <= 0.05 * lin(x).abs().max()
    legacy = int8_dynamic_linear(lin)
    assert not torch.equal(legacy(x), torch.cat([legacy(x[i : i + 1]) for i in range(len(x))]))


def _varied_rows(n: int, width: int) -> torch.Tensor:
    x = torch.randn(n, width) * torch.rand(n, 1) * 10
    x[1] = 0.0  # an all-zero row (e.g. a masked position after a projection)
    x[2] *= 1e4
    return x


@pytest.mark.parametrize("threads", [1, 2])
def test_fused_and_portable_int8_paths_agree_and_are_exact_per_row(threads: int) -> None:
    """The fused fbgemm path (fixed activation scale on max-normalized rows) and the _int_mm
    path quantize every row to the same integers: each is bit-identical row by row whatever
    the batch, and they differ only by float rounding in the rescale."""
    if not fused_int8_available():
        pytest.skip("fbgemm's fused int8 linear is not exact on this CPU")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        lin = nn.Linear(96, 160)
        mod = RowInt8Linear.from_linear(lin)
        assert mod.packed_weight() is not None  # the fast path is the one in use here
        x = _varied_rows(300, 96)

        def portable(t: torch.Tensor) -> torch.Tensor:
            y, amax = mod.int_mm(t)
            return y * amax + mod.bias

        with torch.no_grad():
            for run in (mod, portable):
                batch = run(x)
                assert torch.equal(batch, torch.cat([run(x[i : i + 1]) for i in range(40)]
                                                    + [run(x[40:])]))
                assert torch.equal(batch[:7], run(x[:7]))
            fused, ref = mod(x), portable(x)
            scale = ref.abs().amax(dim=1, keepdim=True)
            assert ((fused - ref).abs() <= 1e-5 * scale).all()
            assert torch.equal(fused[1], mod.bias)
            fp32 = lin(x)
            assert ((fused - fp32).abs() <= 0.05 * fp32.abs().amax(1, keepdim=True)).all()
    finally:
        torch.set_num_threads(before)


def test_row_int8_linear_runs_outside_no_grad() -> None:
    """An input that tracks gradients (a forward without no_grad, as a model card's example
    run does) gives the same values as under no_grad."""
    torch.manual_seed(0)
    mod = RowInt8Linear.from_linear(nn.Linear(32, 16))
    x = torch.randn(5, 32, requires_grad=True)
    with torch.no_grad():
        ref = mod(x)
    assert torch.equal(mod(x).detach(), ref)


def test_int8_packed_weight_follows_the_buffers() -> None:
    """The packed fbgemm weight is a cache of the stored int8 buffers: loading a state dict,
    copying into the buffers, deep copies and another global quantized engine all compute
    from the current integers."""
    import copy

    torch.manual_seed(0)
    a = RowInt8Linear.from_linear(nn.Linear(32, 16))
    b = RowInt8Linear.from_linear(nn.Linear(32, 16))
    x = torch.randn(5, 32)
    with torch.no_grad():
        first = a(x)  # packs a's weight
        a.load_state_dict(b.state_dict())
        assert torch.equal(a(x), b(x))
        c = copy.deepcopy(a)
        assert torch.equal(c(x), b(x))
        c.qweight_t.copy_(RowInt8Linear.from_linear(nn.Linear(32, 16)).qweight_t)
        assert not torch.equal(c(x), b(x))
        a.load_state_dict(RowInt8Linear.from_linear(nn.Linear(32, 16)).state_dict())
        assert not torch.equal(a(x), first)
        before = torch.backends.quantized.engine
        try:
            torch.backends.quantized.engine = "onednn"
            d = RowInt8Linear(32, 16)
            d.load_state_dict(b.state_dict())
            assert torch.equal(d(x), b(x))
        finally:
            torch.backends.quantized.engine = before


def test_old_exports_with_torch_dynamic_int8_still_load(tmp_path: Path) -> None:
    """Folders saved before the per-row scheme hold torch's dynamic int8 Linear: they load
    (and compute as they did), and their ONNX export runs the per-row graph on their integers."""
    from nas_fair.checkpoint import load_compressed, save_compressed

    from conftest import random_batch, tiny_model

    model = tiny_model("bert")
    for layer in model.bert.encoder.layer:
        layer.intermediate.dense = int8_dynamic_linear(layer.intermediate.dense)
    path = save_compressed(model, tmp_path / "old")
    back = load_compressed(path)
    ids, mask = random_batch(4, 10)
    assert np.array_equal(torch_runner(back)(ids, mask), torch_runner(model)(ids, mask))
    sess = session(export(back, tmp_path, int8=True))
    ours = torch_runner(back)(ids, mask)
    assert np.abs(run_onnx(sess, ids, mask) - ours).max() <= 0.05 * np.abs(ours).max()

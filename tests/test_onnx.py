"""ONNX export: what onnxruntime runs computes what the torch model computes, on any batch and
sequence length, and the file stores the weights in the precision the recipe chose.

Tolerances (max |onnx - torch| over the logits, relative to the largest |logit|):
* float paths (pruning, low-rank, sharing, fp16, 4-bit, quantized embeddings, and 8-bit linears
  exported with ``int8=False``, compared with their dequantized fp32 function): 1e-4
  (measured about 4e-7);
* 8-bit linears with ``int8=True``: the graph quantizes each activation row as torch's
  RowInt8Linear does and multiplies the same integers exactly, so the only differences are
  float rounding elsewhere, which may move a value across a rounding boundary: within 1% of
  torch's int8 logits (measured below 1e-6), no further from the fp32 function than 1.5x
  torch's own int8 error, and the same argmax on every one of 64 random rows.
"""

from __future__ import annotations

import os
import random
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from nas_fair.checkpoint import stored_bytes
from nas_fair.errors import UserError
from nas_fair.modules import (
    DynamicInt8Linear,
    Fp16Linear,
    HalfEmbedding,
    Packed4Linear,
    QuantEmbedding,
    RowInt8Linear,
)
from nas_fair.onnx_export import (
    PRECISE_INT8,
    _export,
    _int8_probe,
    export_onnx,
    export_view,
    ort_int8_exact,
    session_options,
)
from nas_fair.spaces import REGISTRY, compress

from conftest import RandomTrial, random_batch, tiny_context, tiny_model

FLOAT_RTOL = 1e-4
INT8_RTOL = 0.01
MAX_LENGTH = 16
SHAPES = ((8, 12, 0), (3, 21, 1), (1, 5, 2))  # (batch, sequence, seed): traced at 2 x 16

FIXED: dict[str, dict[str, dict[str, Any]]] = {
    "off": {},
    "pruning": {"pruning": {"heads": 0.5, "ffn": 0.5, "layers": 1}},
    "lowrank": {"lowrank": {"attention_rank": 0.5, "ffn_rank": 0.25, "activation_aware": True}},
    "sharing": {"sharing": {"group_size": 2}},
    "int8": {"quantization": {"attention_bits": 8, "ffn_bits": 8}},
    "fp16": {"quantization": {"attention_bits": 16, "ffn_bits": 16, "embedding_bits": 16}},
    "int4": {"quantization": {"attention_bits": 4, "ffn_bits": 4}},
    "emb8": {"quantization": {"embedding_bits": 8}},
    "emb4": {"quantization": {"embedding_bits": 4}},
    # every stored format at once: MatMulNBits and the unpacking fallback (rank-8 factors have
    # 8-wide groups), int8 attention, packed embeddings, shared pruned layers
    "everything": {
        "pruning": {"heads": 0.25, "ffn": 0.25, "layers": 0},
        "lowrank": {"attention_rank": 0.5, "ffn_rank": 0.5, "activation_aware": False},
        "sharing": {"group_size": 2},
        "quantization": {"attention_bits": 8, "ffn_bits": 4, "embedding_bits": 4},
    },
}
RANDOM_SEEDS = (1, 2, 3)
CASES = [*FIXED, *(f"random{s}" for s in RANDOM_SEEDS)]
DISTIL_OPTIONS = {"distillation": {"steps": [0, 2]}}


def configs(case: str) -> dict[str, Any]:
    if case in FIXED:
        return {n: REGISTRY[n].config_class.from_dict(v) for n, v in FIXED[case].items()}
    rng = random.Random(int(case.removeprefix("random")))
    trial = RandomTrial(rng)
    return {n: REGISTRY[n](DISTIL_OPTIONS.get(n)).suggest(trial) for n in sorted(REGISTRY)}


_MODELS: dict[tuple[str, str], nn.Module] = {}


def compressed(kind: str, case: str) -> nn.Module:
    """One compressed model per (kind, case) for the whole module; never mutated by export."""
    if (kind, case) not in _MODELS:
        ref = tiny_model(kind)
        _MODELS[kind, case] = compress(ref, configs(case), tiny_context(ref))
    return _MODELS[kind, case]


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), sess_options=session_options(),
                                providers=["CPUExecutionProvider"])


def run_onnx(sess: ort.InferenceSession, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    (out,) = sess.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    return out


def run_torch(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.numpy()


def has_int8(model: nn.Module) -> bool:
    return any(isinstance(m, (DynamicInt8Linear, RowInt8Linear)) for m in model.modules())


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def stored(proto: onnx.ModelProto) -> dict[int, set[bytes]]:
    """Contents of the file's initializers, by ONNX data type."""
    out: dict[int, set[bytes]] = {}
    for init in proto.graph.initializer:
        arr = np.ascontiguousarray(numpy_helper.to_array(init))
        out.setdefault(init.data_type, set()).add(arr.tobytes())
    return out


def both_ways(w: torch.Tensor) -> set[bytes]:
    a = w.detach().numpy()
    return {np.ascontiguousarray(a).tobytes(), np.ascontiguousarray(a.T).tobytes()}


def assert_stored_precision(model: nn.Module, path: Path, int8: bool) -> None:
    """Every compressed weight is in the file in its stored form, and never as an fp32 copy."""
    proto = onnx.load(str(path))
    inits = stored(proto)
    fp32, fp16 = (
        inits.get(onnx.TensorProto.FLOAT, set()),
        inits.get(onnx.TensorProto.FLOAT16, set()),
    )
    i8, u8 = inits.get(onnx.TensorProto.INT8, set()), inits.get(onnx.TensorProto.UINT8, set())
    nbits = sum(n.op_type == "MatMulNBits" for n in proto.graph.node)
    expected_nbits = 0
    for mod in {id(m): m for m in model.modules()}.values():
        if isinstance(mod, DynamicInt8Linear):
            w = mod.weight()
            if int8:  # the very integers torch stores, transposed for MatMul
                assert both_ways(w.int_repr()) & i8, "int8 weight missing"
                assert not both_ways(w.dequantize()) & fp32, "fp32 copy of an int8 weight"
            else:
                assert both_ways(w.dequantize()) & fp32, "dequantized int8 weight missing"
        elif type(mod) is RowInt8Linear:
            if int8:
                assert both_ways(mod.qweight_t) & i8, "int8 weight missing"
                assert not both_ways(mod.dequantized_weight()) & fp32, "fp32 copy of int8"
            else:
                assert both_ways(mod.dequantized_weight()) & fp32, "dequantized int8 missing"
        elif type(mod) is Fp16Linear:
            assert both_ways(mod.weight) & fp16, "fp16 weight missing"
            assert not both_ways(mod.weight.float()) & fp32, "fp32 copy of an fp16 weight"
        elif type(mod) is Packed4Linear:
            assert mod.packed.numpy().tobytes() in u8, "packed 4-bit weight missing"
            assert not both_ways(mod.dequantized_weight()) & fp32, "fp32 copy of a 4-bit weight"
            gs = mod.group_size
            expected_nbits += gs >= 16 and gs & (gs - 1) == 0
        elif type(mod) is HalfEmbedding:
            assert mod.weight.numpy().tobytes() in fp16
        elif type(mod) is QuantEmbedding:
            table = mod(torch.arange(mod.num_embeddings))  # int8 or not: exact either way
            assert mod.qweight.numpy().tobytes() in (u8 if mod.bits == 4 else i8)
            assert table.numpy().tobytes() not in fp32, "fp32 copy of a quantized table"
    assert nbits >= expected_nbits  # shared layers: one module, several MatMulNBits nodes


def export(model: nn.Module, tmp_path: Path, int8: bool, name: str = "model.onnx") -> Path:
    path = tmp_path / name
    export_onnx(model, path, int8=int8, max_length=MAX_LENGTH)
    return path


def check_matches(model: nn.Module, path: Path, int8: bool) -> None:
    if int8 and has_int8(model):
        fp32 = export_view(model)[0]
        ids, mask = random_batch(64, 12, seed=7)
        ours, theirs = run_onnx(session(path), ids, mask), run_torch(model, ids, mask)
        exact = run_torch(fp32, ids, mask)
        assert rel_err(ours, theirs) <= INT8_RTOL
        assert np.abs(ours - exact).max() <= 1.5 * np.abs(theirs - exact).max() + 1e-7
        assert (ours.argmax(1) == theirs.argmax(1)).all()
        return
    # a float graph of the same function: torch's own, or its dequantized fp32 view for int8
    ref = export_view(model)[0] if has_int8(model) else model
    sess = session(path)
    for n, length, seed in SHAPES:
        ids, mask = random_batch(n, length, seed=seed)
        assert rel_err(run_onnx(sess, ids, mask), run_torch(ref, ids, mask)) <= FLOAT_RTOL


# --------------------------------------------------------------------------- every family


@pytest.mark.parametrize(
    ("kind", "case"),
    [("bert", c) for c in CASES] + [("distilbert", c) for c in [*FIXED, "random1"]],
)
def test_onnx_runs_like_torch_and_keeps_stored_precision(
    kind: str, case: str, tmp_path: Path
) -> None:
    model = compressed(kind, case)
    path = export(model, tmp_path, int8=True)
    check_matches(model, path, int8=True)
    assert_stored_precision(model, path, int8=True)
    # no bigger than the torch checkpoint's tensors (5% slack for fp32 MatMulNBits scales)
    tensor_bytes = sum(len(b) for s in stored(onnx.load(str(path))).values() for b in s)
    assert tensor_bytes <= 1.05 * stored_bytes(model)
    if has_int8(model):
        float_path = export(model, tmp_path, int8=False, name="float.onnx")
        check_matches(model, float_path, int8=False)
        assert_stored_precision(model, float_path, int8=False)


@pytest.mark.parametrize("case", ["off", "int8", "everything", "random1"])
def test_roberta(case: str, tmp_path: Path) -> None:
    model = compressed("roberta", case)
    path = export(model, tmp_path, int8=True)
    check_matches(model, path, int8=True)
    assert_stored_precision(model, path, int8=True)


def test_4bit_blocks_that_do_not_divide_the_width(tmp_path: Path) -> None:
    """MatMulNBits with a partial last block (K=40, blocks of 16): the padded tail of the last
    block is zero and must not change the result."""
    ref = tiny_model("bert")
    model = compress(
        ref,
        configs("off") | {"pruning": REGISTRY["pruning"].config_class(ffn=0.375)},
        tiny_context(ref),
    )
    for layer in model.bert.encoder.layer:
        assert layer.output.dense.in_features == 40
        layer.output.dense = Packed4Linear.from_linear(layer.output.dense, group_size=16)
    path = export(model, tmp_path, int8=True)
    assert sum(n.op_type == "MatMulNBits" for n in onnx.load(str(path)).graph.node) == 4
    check_matches(model, path, int8=True)
    assert_stored_precision(model, path, int8=True)


def test_the_random_cases_cover_something() -> None:
    """The seeded random recipes are not all "off" (else they would test nothing new)."""
    off = {n: c.off() for n, c in REGISTRY.items()}
    assert sum(configs(f"random{s}") != off for s in RANDOM_SEEDS) >= 2


# --------------------------------------------------------------------------- the file itself


def test_inputs_outputs_and_dynamic_axes(tmp_path: Path) -> None:
    path = export(compressed("bert", "everything"), tmp_path, int8=True)
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in graph.output] == ["logits"]
    for tensor in graph.input:
        assert tensor.type.tensor_type.elem_type == onnx.TensorProto.INT64
        dims = tensor.type.tensor_type.shape.dim
        assert len(dims) == 2 and all(d.dim_param and not d.dim_value for d in dims)
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["nas_fair.max_length"] == str(MAX_LENGTH) and meta["nas_fair.int8"] == "true"
    # two shapes, neither the traced one, through one session
    sess = session(path)
    for n, length in ((5, 9), (2, 30)):
        ids, mask = random_batch(n, length, seed=n)
        assert run_onnx(sess, ids, mask).shape == (n, 3)


def test_int8_file_is_smaller_and_holds_int8_weights(tmp_path: Path) -> None:
    model = compressed("bert", "int8")
    small = export(model, tmp_path, int8=True, name="int8.onnx")
    big = export(model, tmp_path, int8=False, name="fp32.onnx")
    assert small.stat().st_size < big.stat().st_size

    def tensor_bytes(p: Path) -> int:
        return sum(len(b) for s in stored(onnx.load(str(p))).values() for b in s)

    # the encoder's linears dominate the tiny model's tensors (embeddings stay fp32 here)
    assert tensor_bytes(small) < 0.5 * tensor_bytes(big)
    ops = {n.op_type for n in onnx.load(str(small)).graph.node}
    assert "MatMulInteger" in ops and "MatMulInteger" not in {
        n.op_type for n in onnx.load(str(big)).graph.node
    }
    # activations go in as uint8 with zero point 128 (ORT's fast uint8 x int8 kernels), the
    # weights as int8 without one
    proto = onnx.load(str(small))
    inits = {i.name: i for i in proto.graph.initializer}
    casts = {n.output[0]: n for n in proto.graph.node if n.op_type == "Cast"}
    for node in (n for n in proto.graph.node if n.op_type == "MatMulInteger"):
        assert len(node.input) == 3
        assert casts[node.input[0]].attribute[0].i == onnx.TensorProto.UINT8
        assert inits[node.input[1]].data_type == onnx.TensorProto.INT8
        zero = inits[node.input[2]]
        assert zero.data_type == onnx.TensorProto.UINT8
        assert onnx.numpy_helper.to_array(zero) == 128


def test_sharing_stores_shared_layers_once(tmp_path: Path) -> None:
    off = export(compressed("bert", "off"), tmp_path, int8=True, name="off.onnx")
    shared = export(compressed("bert", "sharing"), tmp_path, int8=True, name="shared.onnx")

    def matrices(p: Path) -> int:
        return sum(len(i.dims) == 2 for i in onnx.load(str(p)).graph.initializer)

    # 4 layers x 6 matrices + embeddings/pooler/classifier; group_size 2 keeps 2 layers' worth
    assert matrices(off) - matrices(shared) == 2 * 6


def test_caller_model_is_untouched(tmp_path: Path) -> None:
    model = compressed("bert", "everything")
    ids, mask = random_batch(4, 10, seed=3)
    before = run_torch(model, ids, mask)
    types = [type(m) for m in model.modules()]
    export(model, tmp_path, int8=True)
    assert not model.training
    assert [type(m) for m in model.modules()] == types
    assert np.array_equal(run_torch(model, ids, mask), before)


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous export")
    with pytest.raises(UserError, match="max_length 1000 does not fit"):
        export_onnx(compressed("bert", "off"), path, int8=False, max_length=1000)
    assert path.read_bytes() == b"previous export"
    export(compressed("bert", "off"), tmp_path, int8=False)
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]
    onnx.checker.check_model(str(path))


@pytest.mark.parametrize("bad", [0, -3, True, 2.5])
def test_bad_max_length(bad: Any, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="max_length must be an integer >= 1"):
        export_onnx(compressed("bert", "off"), tmp_path / "m.onnx", int8=False, max_length=bad)


def test_missing_onnxruntime_is_a_one_line_user_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now raises ImportError
    with pytest.raises(UserError) as err:
        export_onnx(compressed("bert", "off"), tmp_path / "m.onnx", int8=True, max_length=8)
    assert str(err.value) == "--onnx needs onnx and onnxruntime: pip install 'nas-fair[onnx]'"
    assert not (tmp_path / "m.onnx").exists()


def test_dynamo_exporter_gives_the_same_model(tmp_path: Path) -> None:
    """The fallback for a torch without the TorchScript exporter works as well (slower)."""
    model = compressed("bert", "everything")
    path = tmp_path / "dynamo.onnx"
    _export(model, path, int8=True, max_length=MAX_LENGTH, exporter="dynamo")
    check_matches(model, path, int8=True)
    assert_stored_precision(model, path, int8=True)
    legacy = export(model, tmp_path, int8=True)
    ids, mask = random_batch(8, 12, seed=0)
    assert rel_err(run_onnx(session(path), ids, mask), run_onnx(session(legacy), ids, mask)) <= (
        FLOAT_RTOL
    )


def test_session_options_make_int8_exact_on_this_cpu() -> None:
    """The options every nas-fair session uses give exact int8 sums, VNNI or not."""
    assert _int8_probe(session_options())
    assert _int8_probe(session_options(threads=1))
    assert ort_int8_exact(precise=True)


@pytest.mark.parametrize("exact", [True, False])
def test_precise_option_and_export_warning_only_where_int8_saturates(
    exact: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nas_fair.onnx_export as onnx_export

    monkeypatch.setattr(onnx_export, "ort_int8_exact", lambda **_: exact)
    opts = session_options(threads=2)
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (2, 1)
    key, value = PRECISE_INT8
    if exact:
        with pytest.raises(Exception, match="does not have configuration"):
            opts.get_session_config_entry(key)
    else:
        assert opts.get_session_config_entry(key) == value
    model = compressed("bert", "int8")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_onnx(model, tmp_path / "m.onnx", int8=True, max_length=MAX_LENGTH)
        export_onnx(model, tmp_path / "f.onnx", int8=False, max_length=MAX_LENGTH)
    said = [str(w.message) for w in caught if "MatMulInteger" in str(w.message)]
    assert said == ([] if exact else [said[0]])
    assert exact or f"{key}={value}" in said[0]


def test_shared_int8_weights_stay_shared_and_load_under_the_precise_option(tmp_path: Path) -> None:
    """ORT's precise option names its uint8 copy after the weight: every MatMulInteger gets its
    own name (a folded Slice), while the file stores each shared weight once."""
    ref = tiny_model("bert")
    model = compress(ref, {n: REGISTRY[n].config_class.from_dict(v) for n, v in {
        "sharing": {"group_size": 2},
        "quantization": {"attention_bits": 8, "ffn_bits": 8}}.items()}, tiny_context(ref))
    path = export(model, tmp_path, int8=True)
    proto = onnx.load(str(path))
    weights = [n.input[1] for n in proto.graph.node if n.op_type == "MatMulInteger"]
    stored = [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(set(weights)) == len(weights) == 4 * 6 + 1  # 4 layers x 6 matrices, the pooler
    assert len(stored) == 2 * 6 + 1  # group_size 2: two layers' worth
    opts = ort.SessionOptions()
    opts.add_session_config_entry(*PRECISE_INT8)
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    ids, mask = random_batch(16, 12, seed=4)
    ours, theirs = run_onnx(sess, ids, mask), run_torch(model, ids, mask)
    assert rel_err(ours, theirs) <= INT8_RTOL
    assert (ours.argmax(1) == theirs.argmax(1)).all()

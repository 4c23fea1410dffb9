"""ONNX export of a compressed model, for ONNX Runtime (CPU).

The graph takes ``input_ids`` and ``attention_mask`` (int64, dynamic batch and sequence axes)
and returns ``logits``. torch's exporter cannot trace the int8 matmul nor the packed
4-bit modules, so the model is first turned into an *export view* (a deep copy; the caller's
model is never touched) in which every compressed linear is an ``nn.Linear`` holding exactly the
weights the compressed module computes with. That view is exported (torch's TorchScript
exporter; its dynamo exporter where the former is gone), and the stored precision is then put
back into the file by rewriting the matching weight initializers. What is kept, and what not:

* 8-bit linears (:class:`RowInt8Linear`). ``int8=True``: the same per-row scheme as torch, in
  standard ops: each activation row divided by its ``ReduceMax(Abs(x))``, ``Mul`` by 127 and
  ``Round`` to the int8 range, stored as uint8 with zero point 128 (``Add`` 128, ``Cast``),
  ``MatMulInteger`` with torch's very int8 weights (exact int32 accumulation of the same
  integers; ONNX Runtime's uint8 x int8 kernels are the fast ones, int8 x int8 is slow),
  then the per-channel weight scales (times 1/127) and the row's max. So a row's logits do not
  depend on its batch or padding, and they match torch's int8 logits up to float rounding in
  the other ops (same argmax).
  (ONNX Runtime's own dynamic quantization, ``DynamicQuantizeLinear``, takes one scale per
  tensor, i.e. per batch, so it is not used.) ``int8=False``: stored dequantized in fp32, a
  plain float graph of the same weights (four bytes a weight instead of one; the fp32 function
  of the int8 weights, not the int8 function torch runs). Old exports with torch's dynamic int8 Linear export the
  same per-row graph from their integers. The switch is for 8-bit linears only: everything
  else below is exact either way, so it is always stored compactly.
* 8-bit embeddings: int8 rows + per-row scales; only looked-up rows are dequantized (exact).
* 16-bit linears: fp16 initializers with a Cast that ORT folds once at load (fp32 compute on
  the same weights, as torch does). fp16 embeddings: fp16 table, looked-up rows cast.
* 4-bit linears: ``com.microsoft.MatMulNBits`` (ORT's 4-bit CPU kernel) on torch's packed bytes
  and scales (scales widened to fp32, which the kernel requires) where the group size is a power
  of two >= 16 (always so for widths >= 64); otherwise the packed bytes plus a small unpacking
  subgraph that ORT folds at load: 4-bit on disk, fp32 in memory, like torch's dequantizing
  forward. MatMulNBits is a contrib op: such a file runs in ONNX Runtime, not in every runtime.
  4-bit embedding tables stay packed; only looked-up rows are unpacked.
* Pruning is already physical (smaller matrices), low-rank factors are two MatMuls, and shared
  layers are stored once (identical initializers are deduplicated).

The graph is a trace: it is exact for this architecture's forward with an attention mask, any
batch size and any length up to the position embeddings. Nothing here measures ORT latency.
Run int8 files with :func:`session_options`: on x86 CPUs without VNNI it switches ONNX
Runtime to its exact uint8 x uint8 kernels, as its default uint8 x int8 one saturates there.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from nas_fair.errors import UserError
from nas_fair.io import atomic_path
from nas_fair.modules import (
    INT8_MAX,
    ROW_SCALE_FLOOR,
    UNIT_SCALE,
    DynamicInt8Linear,
    Fp16Linear,
    Packed4Linear,
    QuantEmbedding,
    RowInt8Linear,
    quiet_quantized_deprecation,
)

if TYPE_CHECKING:
    import numpy as np
    import onnx
    import onnxruntime as ort

OPSET = 17
U8_OFFSET = 128  # an int8 activation q is stored as q + 128 in uint8 (MatMulInteger zero point)
INPUT_NAMES = ("input_ids", "attention_mask")
GROUP_INPUT = "group_index"  # int64 (batch,): index into the metadata's nas_fair.groups
OUTPUT_NAME = "logits"
INSTALL_HINT = "--onnx needs onnx and onnxruntime: pip install 'nas-fair[onnx]'"


def export_onnx(model: nn.Module, path: Path, *, int8: bool, max_length: int) -> None:
    """Write ``model`` (a compressed or plain classifier) to ``path`` as an ONNX model that
    onnxruntime runs. ``int8``: the recipe's 8-bit linears run as ORT int8 MatMuls (True) or
    as fp32 MatMuls on their dequantized weights (False); everything else is the same.
    ``max_length`` is the sequence length traced with and recorded in the file's metadata;
    any length up to the model's position limit runs. A model with group-aware decision
    offsets (post-processing) gets a third input, ``group_index`` (int64, one per row: the
    position of the row's group in the metadata's ``nas_fair.groups``; -1 for a group not seen
    in fitting), and its ``logits`` output is the float64 decision scores. Open the file with
    :func:`session_options` so that int8 files compute what torch does on every CPU."""
    _export(model, Path(path), int8=int8, max_length=max_length, exporter="auto")
    if int8 and not ort_int8_exact():
        warnings.warn("ONNX Runtime's default uint8 x int8 MatMulInteger saturates on this CPU (no "
                      "VNNI): run int8 files here with the session option "
                      f"{PRECISE_INT8[0]}={PRECISE_INT8[1]} "
                      "(nas_fair.onnx_export.session_options() sets it)", stacklevel=2)


# ONNX Runtime's exact uint8 x uint8 int8 kernels (it shifts the int8 weights at load), x86 only;
# slower than its uint8 x int8 ones, so set only where those saturate
PRECISE_INT8 = ("session.x64quantprecision", "1")


def session_options(*, threads: int | None = None) -> ort.SessionOptions:
    """onnxruntime CPU session options under which an int8 file gives torch's integers:
    :data:`PRECISE_INT8` where ORT's uint8 x int8 kernel saturates (:func:`ort_int8_exact` is
    False), nothing extra elsewhere. ``threads``: intra-op threads (one inter-op thread)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if not ort_int8_exact():
        opts.add_session_config_entry(*PRECISE_INT8)
    return opts


@functools.cache
def ort_int8_exact(*, precise: bool = False) -> bool:
    """Whether ONNX Runtime's uint8 x int8 ``MatMulInteger`` accumulates exactly on this CPU
    (``precise``: with :data:`PRECISE_INT8` set).

    CPUs without VNNI add u8 x s8 pairs in saturating int16; the probe's pairs overflow int16,
    so there an int8 file run with default options differs from the torch model measured."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if precise:
        opts.add_session_config_entry(*PRECISE_INT8)
    return _int8_probe(opts)


def _int8_probe(opts: ort.SessionOptions) -> bool:
    """Whether a ``MatMulInteger`` whose u8 x s8 pairs overflow int16 is exact under ``opts``."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k = 64
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b", "zp"], ["y"])], "probe",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [4, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [4, 8])],
        [numpy_helper.from_array(np.full((k, 8), 127, dtype=np.int8), "b"),
         numpy_helper.from_array(np.array(U8_OFFSET, dtype=np.uint8), "zp")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    sess = ort.InferenceSession(model.SerializeToString(), sess_options=opts,
                                providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"a": np.full((4, k), U8_OFFSET + 127, dtype=np.uint8)})
    return bool((y == k * 127 * 127).all())


# --------------------------------------------------------------------------- export view


@dataclass
class _Tagged:
    """A compressed linear seen in the view as a plain Linear with ``weight`` (out, in)."""

    kind: str  # "int8" | "fp16" | "int4"
    module: nn.Module


class _Logits(nn.Module):
    """(input_ids, attention_mask) -> logits, the graph's whole interface; for a model with
    group-aware offsets (input_ids, attention_mask, group_index) -> float64 decision scores
    ``logits + offsets[group_index]``, the arithmetic of ``GroupAwareClassifier``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        offsets = _offsets(model)
        self.table: torch.Tensor | None = None
        if offsets is not None:
            rows = torch.tensor(offsets.offsets, dtype=torch.float64)
            # the last row (index -1 or len(groups)) is "a group not seen in fitting": no offset
            self.table = torch.cat([rows, torch.zeros(1, rows.shape[1], dtype=torch.float64)])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                group_index: torch.Tensor | None = None) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        logits = out.logits if hasattr(out, "logits") else out[0]
        if self.table is None:
            return logits
        assert group_index is not None
        return logits.to(torch.float64) + self.table[group_index]


def _offsets(model: nn.Module) -> Any:
    from nas_fair import postprocess

    return postprocess.get(model)


def input_names(model: nn.Module) -> tuple[str, ...]:
    """The graph's inputs for ``model``: with group-aware offsets, also ``group_index``."""
    return INPUT_NAMES + ((GROUP_INPUT,) if _offsets(model) is not None else ())


class _Packed4Embedding(nn.Module):
    """QuantEmbedding(bits=4) with the nibble unpacking in float arithmetic (exact for 0..255),
    since ONNX export has no bitwise ops on uint8; the packed table stays the initializer."""

    def __init__(self, emb: QuantEmbedding) -> None:
        super().__init__()
        self.embedding_dim = emb.embedding_dim
        self.group_size = emb.group_size
        self.register_buffer("qweight", emb.qweight.detach().clone())
        self.register_buffer("scales", emb.scales.detach().clone())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        p = self.qweight[ids].to(torch.float32)
        high = torch.floor(p / 16.0)
        low = p - high * 16.0
        q = torch.stack((low, high), dim=-1).flatten(-2) - 8.0
        g = q.unflatten(-1, (-1, self.group_size)) * self.scales[ids].float().unsqueeze(-1)
        return g.flatten(-2)[..., : self.embedding_dim]


def _plain_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device="meta").to_empty(device="cpu")
    with torch.no_grad():
        lin.weight.copy_(weight.float())
        if bias is not None:
            lin.bias.copy_(bias.float())
    return lin


def _view_module(mod: nn.Module, tags: dict[str, _Tagged]) -> nn.Module | None:
    """The export-view replacement of ``mod``, or None to keep it (and look inside it)."""
    if isinstance(mod, DynamicInt8Linear):
        with quiet_quantized_deprecation():
            weight, bias = mod.weight().dequantize(), mod.bias()
        lin = _plain_linear(weight, bias)
        tags[_digest(lin.weight.detach().numpy())] = _Tagged("int8", mod)
        return lin
    if type(mod) is RowInt8Linear:
        lin = _plain_linear(mod.dequantized_weight(), mod.bias)
        tags[_digest(lin.weight.detach().numpy())] = _Tagged("int8", mod)
        return lin
    if type(mod) is Fp16Linear:
        lin = _plain_linear(mod.weight.float(), mod.bias)
        tags[_digest(lin.weight.detach().numpy())] = _Tagged("fp16", mod)
        return lin
    if type(mod) is Packed4Linear:
        lin = _plain_linear(mod.dequantized_weight(), mod.bias)
        tags[_digest(lin.weight.detach().numpy())] = _Tagged("int4", mod)
        return lin
    if type(mod) is QuantEmbedding and mod.bits == 4:
        return _Packed4Embedding(mod)
    # Kept as they are: plain modules, LowRankLinear (two Linears), HalfEmbedding and 8-bit
    # QuantEmbedding (exact Gather + Cast + Mul on the stored rows).
    return None


def export_view(model: nn.Module) -> tuple[nn.Module, dict[str, _Tagged]]:
    """A float copy of ``model`` computing the same function with traceable modules, and the
    compressed linears it stands for, keyed by a digest of their (out, in) fp32 weight."""
    view = copy.deepcopy(model).to("cpu").eval()
    tags: dict[str, _Tagged] = {}
    done: dict[int, nn.Module | None] = {}
    for parent in list(view.modules()):
        if isinstance(parent, DynamicInt8Linear):
            continue
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            if id(child) not in done:  # a module placed at several positions: one replacement
                done[id(child)] = _view_module(child, tags)
            new = done[id(child)]
            if new is not None and new is not child:
                setattr(parent, name, new)
    return view.eval(), tags


# --------------------------------------------------------------------------- export


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise UserError(INSTALL_HINT) from exc


def _legacy_exporter_available() -> bool:
    return importlib.util.find_spec("torch.onnx._internal.torchscript_exporter") is not None


def _dummy_inputs(model: nn.Module, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of ``max_length`` tokens, the second half-padded, so that the traced graph
    keeps the attention-mask path (transformers may skip an all-ones mask)."""
    config = getattr(model, "config", None)
    vocab = int(getattr(config, "vocab_size", 0) or 0) or 100
    ids = (torch.arange(2 * max_length).reshape(2, max_length) % max(1, vocab - 5)) + min(
        5, vocab - 1
    )
    mask = torch.ones(2, max_length, dtype=torch.long)
    mask[1, max(1, max_length // 2) :] = 0
    return ids.long(), mask


def _torch_export(view: nn.Module, file: Path, max_length: int, exporter: str) -> None:
    wrapped = _Logits(view).eval()
    args: tuple[torch.Tensor, ...] = _dummy_inputs(view, max_length)
    names = input_names(view)
    if len(names) > len(INPUT_NAMES):
        args = (*args, torch.tensor([0, -1], dtype=torch.long))
    try:
        with torch.no_grad():
            wrapped(*args)
    except (IndexError, RuntimeError) as exc:  # e.g. longer than the position embeddings
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"max_length {max_length} does not fit this model: {first}") from exc
    use_legacy = exporter == "legacy" or (exporter == "auto" and _legacy_exporter_available())
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter, not the user's business
        if use_legacy:
            axes = {"batch": 0, "sequence": 1}
            torch.onnx.export(
                wrapped,
                args,
                str(file),
                input_names=list(names),
                output_names=[OUTPUT_NAME],
                dynamic_axes={
                    **{n: {i: a for a, i in axes.items()} for n in INPUT_NAMES},
                    **({GROUP_INPUT: {0: "batch"}} if GROUP_INPUT in names else {}),
                    OUTPUT_NAME: {0: "batch"},
                },
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        else:
            batch = torch.export.Dim("batch")
            seq = torch.export.Dim("sequence")
            program = torch.onnx.export(
                wrapped,
                args,
                input_names=list(names),
                output_names=[OUTPUT_NAME],
                dynamic_shapes={**{n: {0: batch, 1: seq} for n in INPUT_NAMES},
                                **({GROUP_INPUT: {0: batch}} if GROUP_INPUT in names else {})},
                opset_version=OPSET,
                dynamo=True,
                verbose=False,
            )
            assert program is not None
            program.save(str(file), external_data=False)


def _export(model: nn.Module, path: Path, *, int8: bool, max_length: int, exporter: str) -> None:
    _require_onnx()
    import onnx

    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise UserError(f"max_length must be an integer >= 1, got {max_length!r}")
    view, tags = export_view(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="nas-fair-onnx-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        _torch_export(view, raw, max_length, exporter)
        proto = onnx.load(str(raw))
        _name_nodes(proto)
        _inline_constant_identities(proto)
        _dedupe_initializers(proto)  # a shared layer's positions now use the same tensors
        int8_nodes = _retag_gemms(proto, tags)
        if int8 and int8_nodes:
            _rowwise_int8(proto, int8_nodes, tags)
        _compact_weights(proto, tags)
        _dedupe_initializers(proto)
        _distinct_int8_weights(proto)
        del proto.graph.value_info[:]  # stale shape hints after the rewrites; ORT infers them
        _set_metadata(proto, int8=int8, max_length=max_length, groups=(
            None if _offsets(model) is None else list(_offsets(model).groups)))
        onnx.checker.check_model(proto)
        with atomic_path(path) as out:
            onnx.save(proto, str(out))
            _smoke_test(out, view, max_length)


# --------------------------------------------------------------------------- graph rewrites


def _digest(array: np.ndarray) -> str:
    import numpy as np

    a = np.ascontiguousarray(array, dtype=np.float32)
    return hashlib.blake2b(f"{a.shape}".encode() + a.tobytes(), digest_size=16).hexdigest()


def _name_nodes(proto: onnx.ModelProto) -> None:
    """Give every node a unique name (the int8 rewrite selects nodes by name)."""
    seen: set[str] = set()
    for i, node in enumerate(proto.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}_nasfair"
        seen.add(node.name)


def _inline_constant_identities(proto: onnx.ModelProto) -> None:
    """Use initializers directly where the exporter put ``Identity`` in between (it does so
    for the second position of a shared layer), so that every rewrite below sees them."""
    graph = proto.graph
    inits = {init.name for init in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias: dict[str, str] = {}
    keep: list[onnx.NodeProto] = []
    for node in graph.node:
        source = alias.get(node.input[0], node.input[0]) if node.input else ""
        if node.op_type == "Identity" and source in inits and node.output[0] not in outputs:
            alias[node.output[0]] = source
        else:
            keep.append(node)
    for node in keep:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
    del graph.node[:]
    graph.node.extend(keep)


def _initializers(proto: onnx.ModelProto) -> dict[str, Any]:
    return {init.name: init for init in proto.graph.initializer}


def _linear_weight(
    node: onnx.NodeProto, inits: dict[str, Any], producers: dict[str, onnx.NodeProto]
) -> np.ndarray | None:
    """The (out, in) weight a MatMul/Gemm node multiplies by, when it is a constant."""
    from onnx import numpy_helper

    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
        return None
    name, transposed = node.input[1], False
    if name not in inits and name in producers and producers[name].op_type == "Transpose":
        perm = [list(a.ints) for a in producers[name].attribute if a.name == "perm"]
        if perm in ([], [[1, 0]]):
            name, transposed = producers[name].input[0], True
    if name not in inits:
        return None
    w = numpy_helper.to_array(inits[name])
    if w.ndim != 2:
        return None
    if node.op_type == "Gemm":
        trans_b = any(a.name == "transB" and a.i == 1 for a in node.attribute)
        return w.T if trans_b == transposed else w
    return w if transposed else w.T


def _retag_gemms(proto: onnx.ModelProto, tags: dict[str, _Tagged]) -> list[str]:
    """Make every tagged linear a ``MatMul(x, W^T initializer)`` (+ ``Add`` bias) and return the
    names of the int8 ones: one shape for the rewrites below."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    inits = _initializers(proto)
    producers = {o: n for n in graph.node for o in n.output}
    int8_nodes: list[str] = []
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        w = _linear_weight(node, inits, producers)
        tag = None if w is None else tags.get(_digest(w))
        if tag is None or w is None:
            new_nodes.append(node)
            continue
        if tag.kind == "int8":
            int8_nodes.append(node.name)
        if node.op_type == "MatMul" and node.input[1] in inits:
            new_nodes.append(node)  # already MatMul(x, W^T initializer)
            continue
        wt_name = f"{node.name}.weight_t"
        graph.initializer.append(numpy_helper.from_array(w.T.copy(), wt_name))
        inits[wt_name] = graph.initializer[-1]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain_gemm = (
            node.op_type == "Gemm"
            and attrs.get("alpha", 1.0) == 1.0
            and (attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0))
        )
        if node.op_type == "MatMul" or (plain_gemm and len(node.input) < 3):
            mm = helper.make_node("MatMul", [node.input[0], wt_name], [node.output[0]], node.name)
            new_nodes.append(mm)
        elif plain_gemm:
            mid = f"{node.name}.matmul_out"
            new_nodes.append(helper.make_node("MatMul", [node.input[0], wt_name], [mid], node.name))
            new_nodes.append(
                helper.make_node("Add", [mid, node.input[2]], [node.output[0]], f"{node.name}.bias")
            )
        else:  # an unusual Gemm: left as it is, in fp32
            new_nodes.append(node)
            if tag.kind == "int8":
                int8_nodes.remove(node.name)
    del graph.node[:]
    graph.node.extend(new_nodes)
    _drop_unused_initializers(proto)
    return int8_nodes


def _int8_integers(mod: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """(int8 weight (in, out), fp32 per-output-channel scales) of an 8-bit linear."""
    import numpy as np

    if isinstance(mod, RowInt8Linear):
        return mod.qweight_t.numpy().copy(), mod.weight_scales.float().numpy().copy()
    assert isinstance(mod, DynamicInt8Linear)
    with quiet_quantized_deprecation():
        w = mod.weight()
        q = w.int_repr().numpy().T.copy()
        scales = w.q_per_channel_scales().float().numpy().copy()
    return np.ascontiguousarray(q), scales


def _rowwise_int8(proto: onnx.ModelProto, nodes: list[str], tags: dict[str, _Tagged]) -> None:
    """Each named ``MatMul(x, W^T)`` becomes the per-row int8 product of
    :class:`RowInt8Linear`, op for op in the same order (see the module doc)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    inits = _initializers(proto)
    wanted = set(nodes)
    done: set[str] = set()
    const = "nasfair.int8"
    graph.initializer.extend([
        numpy_helper.from_array(np.array(ROW_SCALE_FLOOR, dtype=np.float32), f"{const}.floor"),
        numpy_helper.from_array(np.array(INT8_MAX, dtype=np.float32), f"{const}.max"),
        # the int8 row as uint8 with zero point 128: ORT's MatMulInteger kernels are fast for
        # uint8 x int8, slow for int8 x int8, and (a - 128) * w accumulates the same integers
        numpy_helper.from_array(np.array(U8_OFFSET, dtype=np.float32), f"{const}.offset"),
        numpy_helper.from_array(np.array(U8_OFFSET, dtype=np.uint8), f"{const}.zero_point"),
    ])
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.name not in wanted or node.op_type != "MatMul":
            new_nodes.append(node)
            continue
        key = _digest(numpy_helper.to_array(inits[node.input[1]]).T)
        if key not in done:
            q, scales = _int8_integers(tags[key].module)
            graph.initializer.append(numpy_helper.from_array(q, f"{key}.int8"))
            # float32 scale * float32(1/127), as torch's epilogue computes it
            unit = (scales * np.float32(UNIT_SCALE)).astype(np.float32)
            graph.initializer.append(numpy_helper.from_array(unit, f"{key}.int8_scales"))
            done.add(key)
        p = node.name

        def n(op: str, inputs: list[str], out: str, p: str = p, **attrs: Any) -> onnx.NodeProto:
            return helper.make_node(op, inputs, [out], f"{p}.{out.rsplit('.', 1)[-1]}", **attrs)

        x = node.input[0]
        new_nodes += [
            n("Abs", [x], f"{p}.abs"),
            n("ReduceMax", [f"{p}.abs"], f"{p}.amax", axes=[-1], keepdims=1),
            n("Max", [f"{p}.amax", f"{const}.floor"], f"{p}.floored"),
            n("Div", [x, f"{p}.floored"], f"{p}.normed"),
            n("Mul", [f"{p}.normed", f"{const}.max"], f"{p}.scaled"),
            n("Round", [f"{p}.scaled"], f"{p}.rounded"),
            n("Add", [f"{p}.rounded", f"{const}.offset"], f"{p}.shifted"),
            n("Cast", [f"{p}.shifted"], f"{p}.q", to=TensorProto.UINT8),
            n("MatMulInteger", [f"{p}.q", f"{key}.int8", f"{const}.zero_point"], f"{p}.acc"),
            n("Cast", [f"{p}.acc"], f"{p}.accf", to=TensorProto.FLOAT),
            n("Mul", [f"{p}.accf", f"{key}.int8_scales"], f"{p}.chan"),
            helper.make_node("Mul", [f"{p}.chan", f"{p}.floored"], [node.output[0]],
                             f"{p}.out"),
        ]
    del graph.node[:]
    graph.node.extend(new_nodes)
    _drop_unused_initializers(proto)


def _distinct_int8_weights(proto: onnx.ModelProto) -> None:
    """Give each ``MatMulInteger`` its own name for a shared int8 weight: a full ``Slice`` of it
    with a distinct end (ORT folds it at load). Under :data:`PRECISE_INT8` ORT names its uint8
    copy after the weight, and a second node on the same name fails to load."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = proto.graph
    rows = {i.name: i.dims[0] for i in graph.initializer if i.dims}
    seen: dict[str, int] = {}
    made: set[str] = set()
    new_nodes: list[onnx.NodeProto] = []
    const = "nasfair.int8"
    for node in graph.node:
        w = node.input[1] if node.op_type == "MatMulInteger" else None
        if w is not None and w in rows:
            use = seen[w] = seen.get(w, -1) + 1
            if use:
                end = f"{const}.slice_end{rows[w] + use}"
                if end not in made:
                    graph.initializer.append(
                        numpy_helper.from_array(np.array([rows[w] + use], np.int64), end))
                    made.add(end)
                node.input[1] = f"{w}.use{use}"
                new_nodes.append(helper.make_node(
                    "Slice", [w, f"{const}.slice_zero", end, f"{const}.slice_zero"],
                    [node.input[1]], f"{w}.use{use}"))
        new_nodes.append(node)
    if made:
        graph.initializer.append(
            numpy_helper.from_array(np.array([0], np.int64), f"{const}.slice_zero"))
        del graph.node[:]
        graph.node.extend(new_nodes)


def _compact_weights(proto: onnx.ModelProto, tags: dict[str, _Tagged]) -> None:
    """Put fp16 and packed 4-bit weights back where the view had them in fp32."""
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    inits = _initializers(proto)
    producers = {o: n for n in graph.node for o in n.output}
    done: dict[str, str | None] = {}  # digest -> name of the fp32 weight tensor, if decompressed
    nbits_used = False
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        w = _linear_weight(node, inits, producers) if node.op_type == "MatMul" else None
        tag = None if w is None else tags.get(_digest(w))
        if tag is None or tag.kind == "int8" or node.input[1] not in inits:
            new_nodes.append(node)
            continue
        key = _digest(w)
        mod = tag.module
        if tag.kind == "int4" and _nbits_ok(mod):
            assert isinstance(mod, Packed4Linear)
            packed, scales = f"{key}.packed4", f"{key}.scales"
            if key not in done:
                rows = mod.packed.shape[0]
                blob = mod.packed.reshape(rows, -1, mod.group_size // 2).numpy()
                graph.initializer.append(numpy_helper.from_array(blob.copy(), packed))
                s = mod.scales.float().reshape(-1).numpy()
                graph.initializer.append(numpy_helper.from_array(s.copy(), scales))
                done[key] = None
            new_nodes.append(
                helper.make_node(
                    "MatMulNBits",
                    [node.input[0], packed, scales],
                    list(node.output),
                    node.name,
                    domain="com.microsoft",
                    K=mod.in_features,
                    N=mod.out_features,
                    bits=4,
                    block_size=mod.group_size,
                )
            )
            nbits_used = True
            continue
        if key not in done:
            weight_t = f"{key}.weight_t"
            if tag.kind == "fp16":
                assert isinstance(mod, Fp16Linear)
                half = f"{key}.fp16"
                graph.initializer.append(numpy_helper.from_array(mod.weight.numpy().T.copy(), half))
                new_nodes.append(
                    helper.make_node(
                        "Cast", [half], [weight_t], f"{key}.cast", to=TensorProto.FLOAT
                    )
                )
            else:
                assert isinstance(mod, Packed4Linear)
                new_nodes.extend(_unpack4_nodes(graph, mod, key, weight_t))
            done[key] = weight_t
        name = done[key]
        assert name is not None
        node.input[1] = name
        new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    if nbits_used and not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    _drop_unused_initializers(proto)


def _nbits_ok(mod: nn.Module) -> bool:
    """MatMulNBits takes blocks of a power of two >= 16 along the input dimension."""
    gs = getattr(mod, "group_size", 0)
    return isinstance(mod, Packed4Linear) and gs >= 16 and gs & (gs - 1) == 0


def _unpack4_nodes(
    graph: onnx.GraphProto, mod: Packed4Linear, key: str, output: str
) -> list[onnx.NodeProto]:
    """Packed bytes + fp16 scales -> the fp32 (in, out) weight, exactly as
    ``Packed4Linear.dequantized_weight`` computes it; all inputs are constants, so ORT folds
    it once when the session is created."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rows, padded = mod.out_features, mod.packed.shape[1] * 2
    groups = padded // mod.group_size

    def const(name: str, value: np.ndarray) -> str:
        graph.initializer.append(numpy_helper.from_array(value, f"{key}.{name}"))
        return f"{key}.{name}"

    def n(op: str, inputs: list[str], name: str, **attrs: Any) -> onnx.NodeProto:
        return helper.make_node(op, inputs, [f"{key}.{name}"], f"{key}.{name}", **attrs)

    packed = const("packed4", mod.packed.numpy().copy())
    scales = const("scales16", mod.scales.numpy().copy())
    c16 = const("c16", np.array(16.0, dtype=np.float32))
    c8 = const("c8", np.array(8.0, dtype=np.float32))
    axis = const("axis", np.array([-1], dtype=np.int64))
    s_grouped = const("shape_g", np.array([rows, groups, mod.group_size], dtype=np.int64))
    s_flat = const("shape_f", np.array([rows, padded], dtype=np.int64))
    starts = const("starts", np.array([0], dtype=np.int64))
    ends = const("ends", np.array([mod.in_features], dtype=np.int64))
    k = key
    nodes = [
        n("Cast", [packed], "p", to=TensorProto.FLOAT),
        n("Div", [f"{k}.p", c16], "pd"),
        n("Floor", [f"{k}.pd"], "hi"),
        n("Mul", [f"{k}.hi", c16], "hi16"),
        n("Sub", [f"{k}.p", f"{k}.hi16"], "lo"),
        n("Unsqueeze", [f"{k}.lo", axis], "lo1"),
        n("Unsqueeze", [f"{k}.hi", axis], "hi1"),
        n("Concat", [f"{k}.lo1", f"{k}.hi1"], "pairs", axis=-1),
        n("Reshape", [f"{k}.pairs", s_grouped], "qg"),
        n("Sub", [f"{k}.qg", c8], "q"),
        n("Cast", [scales], "s", to=TensorProto.FLOAT),
        n("Unsqueeze", [f"{k}.s", axis], "s1"),
        n("Mul", [f"{k}.q", f"{k}.s1"], "wg"),
        n("Reshape", [f"{k}.wg", s_flat], "wp"),
        n("Slice", [f"{k}.wp", starts, ends, const("axes", np.array([1], dtype=np.int64))], "w"),
    ]
    nodes.append(helper.make_node("Transpose", [f"{k}.w"], [output], f"{k}.t", perm=[1, 0]))
    return nodes


def _drop_unused_initializers(proto: onnx.ModelProto) -> None:
    """Remove nodes nothing reads any more (e.g. a weight's Transpose after a rewrite), then
    the initializers no node reads."""
    needed = {o.name for o in proto.graph.output}
    live: list[onnx.NodeProto] = []
    for node in reversed(proto.graph.node):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(node.input)
    if len(live) != len(proto.graph.node):
        del proto.graph.node[:]
        proto.graph.node.extend(reversed(live))
    used = {i for node in proto.graph.node for i in node.input}
    used |= {o.name for o in proto.graph.output}
    keep = [init for init in proto.graph.initializer if init.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)


def _dedupe_initializers(proto: onnx.ModelProto) -> None:
    """Identical constants stored once (a shared layer's weights, repeated folded shapes)."""
    from onnx import numpy_helper

    first: dict[tuple[int, tuple[int, ...], bytes], str] = {}
    rename: dict[str, str] = {}
    for init in proto.graph.initializer:
        arr = numpy_helper.to_array(init)
        key = (init.data_type, tuple(init.dims), arr.tobytes())
        if key in first:
            rename[init.name] = first[key]
        else:
            first[key] = init.name
    if not rename:
        return
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    _drop_unused_initializers(proto)


def _set_metadata(proto: onnx.ModelProto, *, int8: bool, max_length: int,
                  groups: list[str] | None = None) -> None:
    import json

    from onnx import helper

    proto.producer_name = "nas-fair"
    props = {"nas_fair.int8": str(int8).lower(), "nas_fair.max_length": str(max_length)}
    if groups is None:
        proto.doc_string = "nas-fair compressed classifier: (input_ids, attention_mask) -> logits"
    else:
        proto.doc_string = (
            "nas-fair compressed classifier with group-aware decision offsets: (input_ids, "
            "attention_mask, group_index) -> logits (decision scores); group_index indexes "
            "nas_fair.groups, -1 for a group not seen in fitting")
        props["nas_fair.groups"] = json.dumps(groups)
    helper.set_model_props(proto, props)


def _smoke_test(file: Path, view: nn.Module, max_length: int) -> None:
    """Refuse to publish a file that onnxruntime cannot load and run."""
    import numpy as np
    import onnxruntime as ort

    ids, mask = _dummy_inputs(view, max_length)
    session = ort.InferenceSession(str(file), sess_options=session_options(),
                                   providers=["CPUExecutionProvider"])
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    if GROUP_INPUT in input_names(view):
        feed[GROUP_INPUT] = np.array([0, -1], dtype=np.int64)
    (logits,) = session.run([OUTPUT_NAME], feed)
    if logits.shape[0] != 2 or not np.isfinite(logits).all():
        raise RuntimeError(f"the exported ONNX model produced bad logits for {file}")


__all__ = ["GROUP_INPUT", "PRECISE_INT8", "export_onnx", "export_view", "input_names",
           "ort_int8_exact", "session_options"]

"""The only serialization format of compressed models: safetensors + JSON, nothing unpickled.

A checkpoint folder holds

* ``model.safetensors``: every stored tensor once (shared layers once; packed 4-bit as packed;
  int8 Linear as int8 weight (in, out) + per-channel scales + bias; old exports with torch's
  dynamic int8 Linear, int8 weight + per-channel scales / zero points + bias, still load);
* ``config.json``: nas-fair's own ``model_type`` ("nas-fair-compressed"), so plain
  ``transformers`` refuses the folder instead of building the original architecture with random
  weights; the Hugging Face config (layer count already updated by layer dropping) is nested
  under ``original_config``. Folders written before hold the plain config, and still load;
* ``structure.json``: what turns the config's skeleton into the compressed architecture: the
  encoder's layer slots (sharing ties), each layer's attention head attributes, and the type and
  shape of every weight-bearing module (Linear, LowRankLinear, RowInt8Linear, Fp16Linear,
  Packed4Linear, Embedding, HalfEmbedding, QuantEmbedding);
* ``nas_fair.json``: caller's metadata; the tokenizer's files when given;
* ``postprocess.json``, when the model has group-aware decision offsets (bias mitigation's
  post-processing, :mod:`nas_fair.postprocess`): they are part of its predictions, so
  they travel with the weights; predict with ``nas_fair.postprocess.predict``.

``stored_bytes`` and ``save_compressed`` share one traversal, so the size objective is exactly
what the file holds (tensor bytes plus the safetensors header).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import types
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nas_fair import postprocess
from nas_fair.encoder import attention_attrs, encoder_layers_path, layer_parts, num_heads
from nas_fair.errors import UserError
from nas_fair.io import default_file_mode
from nas_fair.modules import (
    OPAQUE_TYPES,
    DynamicInt8Linear,
    build_module,
    int8_load_state,
    int8_state,
    logical_params,
    module_spec,
)

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STRUCTURE_FILE = "structure.json"
METADATA_FILE = "nas_fair.json"
SAFETENSORS_METADATA = {"format": "pt"}
COMPRESSED_MODEL_TYPE = "nas-fair-compressed"

_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


# --------------------------------------------------------------------------- traversal


def _opaque_prefixes(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, OPAQUE_TYPES)]


def _walk(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Each module once (shared ones under their first name), not descending into opaque ones."""
    opaque: list[str] = []
    for name, mod in model.named_modules(remove_duplicate=True):
        if any(name.startswith(p + ".") for p in opaque):
            continue
        if isinstance(mod, OPAQUE_TYPES):
            opaque.append(name)
        yield name, mod


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _stored(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> tensor exactly as written to model.safetensors."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, mod in _walk(model):
        if isinstance(mod, DynamicInt8Linear):
            for key, t in int8_state(mod).items():
                out[_join(name, key)] = t
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                out[_join(name, pname)] = p.detach()
        for bname, b in mod.named_buffers(recurse=False):
            if b is None or bname in mod._non_persistent_buffers_set or id(b) in seen:
                continue
            seen.add(id(b))
            out[_join(name, bname)] = b.detach()
    return out


def _header_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Size of the safetensors header (8-byte length + JSON padded to 8 bytes), computed the way
    the safetensors library lays it out (tensors ordered by dtype, then name)."""
    order = sorted(
        tensors, key=lambda n: (-tensors[n].element_size(), _ST_DTYPES[tensors[n].dtype], n)
    )
    header: dict[str, Any] = {"__metadata__": SAFETENSORS_METADATA}
    offset = 0
    for n in order:
        t = tensors[n]
        size = t.numel() * t.element_size()
        header[n] = {
            "dtype": _ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":"))
    return 8 + len(text.encode()) + (-len(text.encode())) % 8


def stored_bytes(model: nn.Module) -> int:
    """Bytes of ``model.safetensors`` as :func:`save_compressed` writes it: each stored tensor
    once (shared layers once, 4-bit packed, int8 as int8) plus the header; no tokenizer/JSON."""
    tensors = _stored(model)
    return sum(t.numel() * t.element_size() for t in tensors.values()) + _header_bytes(tensors)


def param_count(model: nn.Module) -> int:
    """Logical parameter count: shared parameters once, quantized weights as the weights they
    stand for (an int8 or 4-bit matrix counts in*out + bias, not its bytes)."""
    total = 0
    seen: set[int] = set()
    for _name, mod in _walk(model):
        logical = logical_params(mod)
        if logical is not None:
            total += logical
            continue
        for p in mod.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


# --------------------------------------------------------------------------- structure


def structure_of(model: nn.Module) -> dict[str, Any]:
    """Everything needed to rebuild ``model``'s architecture from its HF config."""
    layers_path = encoder_layers_path(model)
    layers = list(model.get_submodule(layers_path))
    slot_of: dict[int, int] = {}
    slots = [slot_of.setdefault(id(layer), len(slot_of)) for layer in layers]
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=True)}
    attention = {}
    for layer in {id(m): m for m in layers}.values():
        attn = layer_parts(layer).attention
        attention[names[id(attn)]] = attention_attrs(attn)
    summary = []  # for people reading the file; the rebuild uses the entries below
    for pos, layer in enumerate(layers):
        parts = layer_parts(layer)
        summary.append(
            {
                "position": pos,
                "slot": slots[pos],
                "heads": num_heads(parts.attention),
                "ffn": int(getattr(getattr(*parts.ffn_in), "out_features", -1)),
            }
        )
    modules = []
    for name, mod in _walk(model):
        spec = module_spec(mod)
        if spec is not None and name:
            modules.append({"path": name, **spec})
    return {
        "format_version": FORMAT_VERSION,
        "architecture": type(model).__name__,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "layers": {"path": layers_path, "slots": slots, "summary": summary},
        "attention": attention,
        "modules": modules,
    }


def _apply_structure(model: nn.Module, structure: dict[str, Any]) -> None:
    layers_path = structure["layers"]["path"]
    slots = [int(s) for s in structure["layers"]["slots"]]
    skeleton = list(model.get_submodule(layers_path))
    n_unique = max(slots) + 1 if slots else 0
    if n_unique > len(skeleton):
        raise ValueError(f"{n_unique} distinct layers but the config builds {len(skeleton)}")
    owner_path, _, attr = layers_path.rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    setattr(owner, attr, nn.ModuleList([skeleton[s] for s in slots]))
    if hasattr(owner, "n_layers"):
        owner.n_layers = len(slots)
    for path, attrs in structure["attention"].items():
        attn = model.get_submodule(path)
        for key, value in attrs.items():
            setattr(attn, key, int(value))
    for entry in structure["modules"]:
        path = entry["path"]
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        spec = {k: v for k, v in entry.items() if k != "path"}
        setattr(parent, attr, build_module(spec))


# --------------------------------------------------------------------------- save / load


def save_compressed(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (and optionally its tokenizer) to ``directory``; returns the path.

    Everything is written to a temporary sibling folder which is then renamed, so an interrupted
    save leaves no half-written checkpoint. A non-empty existing ``directory`` is an error.
    """
    from safetensors.torch import save_file

    from nas_fair import __version__

    target = Path(directory)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"cannot save to {target}: it exists and is not an empty folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        tensors = {k: v.contiguous().cpu() for k, v in _stored(model).items()}
        save_file(tensors, str(tmp / MODEL_FILE), metadata=SAFETENSORS_METADATA)
        (tmp / MODEL_FILE).chmod(default_file_mode())  # safetensors writes 0600, the rest 0644
        (tmp / CONFIG_FILE).write_text(json.dumps(wrapped_config(model.config), indent=2) + "\n")
        (tmp / STRUCTURE_FILE).write_text(json.dumps(structure_of(model), indent=1) + "\n")
        meta = {"nas_fair_version": __version__, "format_version": FORMAT_VERSION}
        meta["metadata"] = metadata or {}
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=1, default=str) + "\n")
        post = postprocess.get(model)
        if post is not None:  # group decision offsets are part of the model's predictions
            (tmp / postprocess.FILE).write_text(json.dumps(post.to_dict(), indent=1) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if target.exists():
            target.rmdir()
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def wrapped_config(config: Any) -> dict[str, Any]:
    """config.json of a checkpoint: a model type plain transformers does not know (loading
    the folder with it fails loudly), the real Hugging Face config nested inside."""
    return {
        "model_type": COMPRESSED_MODEL_TYPE,
        "architectures": ["NasFairCompressedModel"],
        "nas_fair_note": "compressed by nas-fair: load with nas_fair.load(folder); plain "
                         "transformers cannot rebuild this architecture (see structure.json)",
        "original_config": config.to_dict(),
    }


def _hf_config(config_dict: dict[str, Any], src: Path) -> Any:
    """The Hugging Face config of a checkpoint, new (nested) or old (plain) config.json."""
    from transformers import CONFIG_MAPPING, AutoConfig

    if config_dict.get("model_type") != COMPRESSED_MODEL_TYPE:
        return AutoConfig.from_pretrained(str(src))  # written before the wrapped format
    inner = config_dict.get("original_config")
    if not isinstance(inner, dict) or inner.get("model_type") not in CONFIG_MAPPING:
        raise ValueError(f"{CONFIG_FILE} has no usable original_config")
    config = CONFIG_MAPPING[inner["model_type"]].from_dict(inner)
    config.name_or_path = str(src)  # as from_pretrained sets it
    return config


def _save_pretrained(self: nn.Module, save_directory: str | os.PathLike[str],
                     **kwargs: Any) -> None:
    """``save_pretrained`` of a model from :func:`load_compressed`: nas-fair's format (a folder
    ``nas_fair.load`` reloads identically); transformers' own would write unloadable weights."""
    if kwargs:
        raise UserError("save_pretrained of a nas-fair compressed model takes only the folder "
                        f"(got {', '.join(sorted(kwargs))}); it writes nas-fair's format, for "
                        "nas_fair.load; for more, use nas-fair export")
    save_compressed(self, save_directory, metadata=getattr(self, "nas_fair_metadata", None))


def load_compressed(directory: str | os.PathLike[str]) -> nn.Module:
    """Rebuild a model saved by :func:`save_compressed`; eval mode, bit-identical logits.

    Any missing or corrupted file is reported as one ``UserError`` line naming the folder.
    """
    src = Path(directory)
    try:
        return _load(src)
    except UserError:
        raise
    except Exception as exc:  # one clear line for any corruption, whatever raised it
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load compressed model from {src}: {reason}") from exc


def _load(src: Path) -> nn.Module:
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    if not src.is_dir():
        raise UserError(f"cannot load compressed model from {src}: no such folder")
    for name in (MODEL_FILE, CONFIG_FILE, STRUCTURE_FILE):
        if not (src / name).is_file():
            raise UserError(f"cannot load compressed model from {src}: {name} is missing")
    structure = _read_json(src, STRUCTURE_FILE)
    if not isinstance(structure, dict) or structure.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{STRUCTURE_FILE} is not a format-{FORMAT_VERSION} nas-fair structure")
    config_dict = _read_json(src, CONFIG_FILE)
    if not isinstance(config_dict, dict) or "model_type" not in config_dict:
        raise ValueError(f"{CONFIG_FILE} is not a Hugging Face model config (no model_type)")
    meta = None
    if (src / METADATA_FILE).exists():
        meta = _read_json(src, METADATA_FILE)  # not needed to rebuild; a damaged one is damage
    config = _hf_config(config_dict, src)
    kwargs = {}
    if structure.get("attn_implementation"):
        kwargs["attn_implementation"] = structure["attn_implementation"]
    model = AutoModelForSequenceClassification.from_config(config, **kwargs)
    _apply_structure(model, structure)
    try:
        tensors = load_file(str(src / MODEL_FILE))
    except Exception as exc:
        raise ValueError(f"{MODEL_FILE} is corrupted ({exc})") from exc
    _load_tensors(model, tensors)
    if (src / postprocess.FILE).exists():
        postprocess.attach(model, postprocess.GroupOffsets.from_dict(
            _read_json(src, postprocess.FILE)))
    model.nas_fair_metadata = (meta or {}).get("metadata") if isinstance(meta, dict) else None
    # bound to this model (a deepcopy rebinds it to the copy)
    model.save_pretrained = types.MethodType(_save_pretrained, model)
    return model.eval()


def _read_json(src: Path, name: str) -> Any:
    try:
        return json.loads((src / name).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{name} is not valid JSON ({exc})") from exc


def _load_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Strict: every expected tensor present with its exact dtype and shape, nothing extra."""
    expected = _stored(model)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
        raise ValueError(
            f"{MODEL_FILE} does not match structure.json ({what}; "
            f"{len(missing)} missing, {len(extra)} unexpected)"
        )
    for key, want in expected.items():
        got = tensors[key]
        if got.dtype != want.dtype or got.shape != want.shape:
            raise ValueError(
                f"tensor {key!r} is {got.dtype} {tuple(got.shape)}, "
                f"structure.json expects {want.dtype} {tuple(want.shape)}"
            )
    seen: set[int] = set()
    with torch.no_grad():
        for name, mod in _walk(model):
            if isinstance(mod, DynamicInt8Linear):
                prefix = _join(name, "")
                state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
                state = {k: v for k, v in state.items() if "." not in k}
                int8_load_state(mod, state)
                continue
            for pname, p in mod.named_parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    p.copy_(tensors[_join(name, pname)])
            for bname, b in mod.named_buffers(recurse=False):
                if b is None or bname in mod._non_persistent_buffers_set or id(b) in seen:
                    continue
                seen.add(id(b))
                b.copy_(tensors[_join(name, bname)])


def file_header_bytes(path: str | os.PathLike[str]) -> int:
    """Header size of a safetensors file (for checks of :func:`stored_bytes`)."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
    return 8 + n

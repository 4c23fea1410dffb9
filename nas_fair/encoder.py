"""Where things live inside BERT, RoBERTa and DistilBERT classifiers, and small shared helpers.

Families edit the encoder through these helpers only, so supporting another BERT-like
architecture means teaching :func:`layer_parts` its attribute names.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from nas_fair.errors import UserError

# Model types (config.json "model_type") whose layers :func:`layer_parts` knows: BERT-style
# (attention.self.query, intermediate, output) and DistilBERT (attention.q_lin, ffn). Families
# that edit layers (Family.edits_layers) are refused for any other before anything is trained.
LAYER_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "distilbert")


# Attributes that transformers' attention modules read their head count from.
HEAD_COUNT_ATTRS = ("num_attention_heads", "n_heads", "num_heads")


def _resolve(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def encoder_layers_path(model: nn.Module) -> str:
    """Dotted path of the ModuleList holding the encoder layers."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and (
            name.endswith("encoder.layer") or name.endswith("transformer.layer")
        ):
            return name
    raise UserError(
        f"{type(model).__name__} has no encoder layer list (encoder.layer / transformer.layer); "
        "only BERT, RoBERTa and DistilBERT-style models are supported"
    )


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    return _resolve(model, encoder_layers_path(model))  # type: ignore[return-value]


def set_encoder_layers(model: nn.Module, layers: list[nn.Module]) -> None:
    """Replace the encoder layer list and keep the config's layer count consistent with it."""
    path = encoder_layers_path(model)
    owner_path, _, attr = path.rpartition(".")
    owner = _resolve(model, owner_path)
    setattr(owner, attr, nn.ModuleList(layers))
    if hasattr(owner, "n_layers"):  # DistilBERT's Transformer
        owner.n_layers = len(layers)
    config = getattr(model, "config", None)
    if config is not None:
        if hasattr(config, "n_layers") and getattr(config, "model_type", "") == "distilbert":
            config.n_layers = len(layers)
        else:
            config.num_hidden_layers = len(layers)


def unique_layers(model: nn.Module) -> list[nn.Module]:
    """Encoder layers in order, each shared module once (sharing places one object many times)."""
    seen: set[int] = set()
    out = []
    for layer in encoder_layers(model):
        if id(layer) not in seen:
            seen.add(id(layer))
            out.append(layer)
    return out


@dataclass
class LayerParts:
    """The parts of one encoder layer that the families edit, as (parent, attribute) slots."""

    attention: nn.Module  # the module holding the head-count attributes
    q: tuple[nn.Module, str]
    k: tuple[nn.Module, str]
    v: tuple[nn.Module, str]
    attn_out: tuple[nn.Module, str]
    ffn_in: tuple[nn.Module, str]
    ffn_out: tuple[nn.Module, str]
    attention_scope: tuple[nn.Module, ...]  # every linear below these is "attention"
    ffn_scope: tuple[nn.Module, ...]  # every linear below these is "ffn"


def layer_parts(layer: nn.Module) -> LayerParts:
    attn = getattr(layer, "attention", None)
    if attn is not None and hasattr(attn, "self") and hasattr(layer, "intermediate"):
        sa = attn.self
        return LayerParts(
            attention=sa,
            q=(sa, "query"),
            k=(sa, "key"),
            v=(sa, "value"),
            attn_out=(attn.output, "dense"),
            ffn_in=(layer.intermediate, "dense"),
            ffn_out=(layer.output, "dense"),
            attention_scope=(attn,),
            ffn_scope=(layer.intermediate, layer.output),
        )
    if attn is not None and hasattr(attn, "q_lin") and hasattr(layer, "ffn"):
        return LayerParts(
            attention=attn,
            q=(attn, "q_lin"),
            k=(attn, "k_lin"),
            v=(attn, "v_lin"),
            attn_out=(attn, "out_lin"),
            ffn_in=(layer.ffn, "lin1"),
            ffn_out=(layer.ffn, "lin2"),
            attention_scope=(attn,),
            ffn_scope=(layer.ffn,),
        )
    raise UserError(
        f"unsupported encoder layer {type(layer).__name__}: expected a BERT/RoBERTa layer "
        "(attention.self, intermediate, output) or a DistilBERT block (attention.q_lin, ffn)"
    )


def num_heads(attn: nn.Module) -> int:
    for name in HEAD_COUNT_ATTRS:
        if hasattr(attn, name):
            return int(getattr(attn, name))
    raise UserError(f"{type(attn).__name__} has no head-count attribute")


def set_num_heads(attn: nn.Module, heads: int) -> None:
    """Set every head-count attribute the attention forward (or anything else) may read."""
    for name in HEAD_COUNT_ATTRS:
        if hasattr(attn, name):
            setattr(attn, name, heads)
    if hasattr(attn, "all_head_size"):
        attn.all_head_size = heads * attn.attention_head_size


def attention_attrs(attn: nn.Module) -> dict[str, int]:
    """The per-layer attributes that pruning changes, for structure.json."""
    names = (*HEAD_COUNT_ATTRS, "all_head_size", "attention_head_size")
    return {n: int(getattr(attn, n)) for n in names if hasattr(attn, n)}


def linear_slots(
    scope: nn.Module, types: tuple[type[nn.Module], ...] = (nn.Linear,)
) -> Iterator[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) for every module of ``types`` below ``scope`` (not nested in
    a module of those types), collected first so the caller may replace them while iterating."""
    found: list[tuple[nn.Module, str, nn.Module]] = []

    def walk(parent: nn.Module) -> None:
        for attr, child in parent.named_children():
            if isinstance(child, types):
                found.append((parent, attr, child))
            else:
                walk(child)

    walk(scope)
    return iter(found)


def head_linears(model: nn.Module) -> tuple[list[tuple[nn.Module, str, nn.Module]], str | None]:
    """Linear layers outside the encoder and embeddings (pooler, pre-classifier, classifier), and
    the name of the final output projection among them (the last one in module order)."""
    layers_path = encoder_layers_path(model)
    out: list[tuple[nn.Module, str, nn.Module]] = []
    last: str | None = None
    for name, mod in model.named_modules():
        if (
            name.startswith(layers_path)
            or ".embeddings" in f".{name}"
            or type(mod) is not nn.Linear
        ):
            continue
        parent_path, _, attr = name.rpartition(".")
        out.append((_resolve(model, parent_path), attr, mod))
        last = name
    return out, last


def trim_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Cut right padding down to the longest real sequence in the batch (cheaper forward)."""
    used = attention_mask.bool().any(dim=0).nonzero()
    length = int(used.max()) + 1 if used.numel() else 1
    return input_ids[:, :length], attention_mask[:, :length]


def row_lengths(attention_mask: torch.Tensor) -> torch.Tensor:
    """Per row, the position of its last real token + 1 (right padding), at least 1."""
    used = attention_mask.bool()
    positions = torch.arange(1, used.shape[1] + 1, device=used.device)
    return (used * positions).amax(dim=1).clamp_min(1) if used.numel() else used.sum(1) + 1


def length_bucketed_batches(
    lengths: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    *,
    chunk_batches: int = 50,
) -> list[torch.Tensor]:
    """One epoch of full batches (row indices) whose rows have similar lengths.

    Shuffle, cut into chunks of ``chunk_batches`` batches, sort each chunk by length, cut it into
    batches, shuffle the batch order: batches stay random draws of the data (each row at most
    once per epoch, the remainder dropped) but trimming to the longest row wastes little
    padding. ``chunk_batches <= 1`` gives plain random batches. Deterministic for a generator.
    """
    n = int(lengths.numel())
    bs = max(1, min(batch_size, n))
    per_epoch = max(1, n // bs)
    perm = torch.randperm(n, generator=generator)[: per_epoch * bs]
    if chunk_batches <= 1:
        return list(perm.split(bs))
    batches: list[torch.Tensor] = []
    for part in perm.split(chunk_batches * bs):
        order = torch.sort(lengths[part], descending=True, stable=True).indices
        batches.extend(part[order].split(bs))
    shuffle = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffle]


def tensor_digest(*tensors: torch.Tensor, extra: str = "") -> str:
    """Content hash of tensors (names of cache files for reference-only computations)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(extra.encode())
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_digest(model: nn.Module, extra: str = "") -> str:
    state = model.state_dict()
    names = sorted(state)
    return tensor_digest(*(state[n] for n in names), extra=extra + "|".join(names))

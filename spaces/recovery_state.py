"""A recovery checkpoint, so that a promoted candidate continues its student instead of
starting over (multi-fidelity search): safetensors + JSON only, nothing is ever unpickled.

A checkpoint folder holds

* ``state.safetensors``: the student's weights (each shared tensor once, its other names in
  the JSON), every tensor of the AdamW state (``exp_avg``, ``exp_avg_sq``, ``step``, ...), the
  batch generator's and torch's CPU random states (uint8 tensors), and the rows of the epoch's
  batches not drawn yet;
* ``state.json``: the step count, the LR schedule's length, the optimizer's parameter groups
  and non-tensor state, the scheduler's state, the losses so far and the early-stopping state.

The weights are loaded into a student of the same structure (the candidate's compression
re-run from its parameters, which is deterministic, or :func:`nas_fair.checkpoint.
load_compressed`); the folder does not describe the architecture. With the same seed, data
and thread count, recovering to ``2N`` steps in one call equals recovering to ``N`` (with the
schedule's length set to ``2N``), saving, loading and recovering to ``2N``: bit for bit on a CPU.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nas_fair.errors import UserError
from nas_fair.io import temp_dir_beside

TENSORS_FILE = "state.safetensors"
JSON_FILE = "state.json"
FORMAT = "nas-fair-recovery-state/1"


@dataclass
class RecoveryState:
    """Everything :func:`~nas_fair.spaces.distillation.recover` needs to continue a run."""

    step: int  # optimizer steps run so far
    schedule_steps: int  # length of the LR schedule (and early-stopping windows)
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # torch optimizer state_dict
    scheduler: dict[str, Any]  # torch LR scheduler state_dict
    generator: torch.Tensor  # batch-order generator state
    rng: torch.Tensor  # torch's CPU random state (dropout masks)
    pending: list[torch.Tensor]  # this epoch's batches not drawn yet, in draw order
    losses: list[float]
    stopper: dict[str, Any] | None = None
    stopped_early: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _dedup(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Shared tensors (tied or shared layers) once; safetensors refuses aliases."""
    seen: dict[tuple[int, int, tuple[int, ...], torch.dtype], str] = {}
    kept: dict[str, torch.Tensor] = {}
    alias: dict[str, str] = {}
    for name, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            alias[name] = seen[key]
            continue
        seen[key] = name
        kept[name] = t.detach().cpu().contiguous().clone()
    return kept, alias


def save_recovery_state(directory: str | Path, state: RecoveryState) -> Path:
    """Write ``state`` to ``directory`` (replaced whole, via a temporary folder beside it, so a
    kill mid-write leaves the old checkpoint or none, never half of one)."""
    from safetensors.torch import save_file

    dest = Path(directory)
    model, alias = _dedup(state.model)
    tensors = {f"model.{k}": v for k, v in model.items()}
    opt_state: dict[str, dict[str, Any]] = {}
    for idx, entry in state.optimizer["state"].items():
        plain = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{idx}.{key}"] = value.detach().cpu().contiguous().clone()
            else:
                plain[key] = value
        opt_state[str(idx)] = plain
    tensors["rng.generator"] = state.generator.cpu().clone()
    tensors["rng.torch"] = state.rng.cpu().clone()
    for i, rows in enumerate(state.pending):
        tensors[f"pending.{i}"] = rows.cpu().contiguous().clone()
    meta = {
        "format": FORMAT,
        "step": state.step,
        "schedule_steps": state.schedule_steps,
        "model_aliases": alias,
        "optimizer_state": opt_state,
        "optimizer_tensor_keys": sorted(k for k in tensors if k.startswith("optimizer.")),
        "param_groups": state.optimizer["param_groups"],
        "scheduler": state.scheduler,
        "pending": len(state.pending),
        "losses": state.losses,
        "stopper": state.stopper,
        "stopped_early": state.stopped_early,
        "extra": state.extra,
    }
    text = json.dumps(meta, indent=1, allow_nan=False)  # fails before anything is written
    tmp = temp_dir_beside(dest)
    try:
        save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": "pt"})
        (tmp / JSON_FILE).write_text(text, encoding="utf-8")
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def load_recovery_state(directory: str | Path) -> RecoveryState:
    """Read a folder written by :func:`save_recovery_state`."""
    from safetensors.torch import load_file

    src = Path(directory)
    if not (src / JSON_FILE).is_file() or not (src / TENSORS_FILE).is_file():
        raise UserError(f"no recovery checkpoint in {src}: expected {JSON_FILE} and {TENSORS_FILE}")
    meta = json.loads((src / JSON_FILE).read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise UserError(f"recovery checkpoint {src} has format {meta.get('format')!r}, "
                        f"this version reads {FORMAT!r}")
    tensors = load_file(str(src / TENSORS_FILE))
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    for name, target in meta["model_aliases"].items():
        model[name] = model[target]
    opt_state: dict[int, dict[str, Any]] = {int(i): dict(v)
                                            for i, v in meta["optimizer_state"].items()}
    for key in meta["optimizer_tensor_keys"]:
        _, idx, name = key.split(".", 2)
        opt_state.setdefault(int(idx), {})[name] = tensors[key]
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return RecoveryState(
        step=int(meta["step"]),
        schedule_steps=int(meta["schedule_steps"]),
        model=model,
        optimizer={"state": opt_state, "param_groups": groups},
        scheduler=meta["scheduler"],
        generator=tensors["rng.generator"],
        rng=tensors["rng.torch"],
        pending=[tensors[f"pending.{i}"] for i in range(int(meta["pending"]))],
        losses=[float(v) for v in meta["losses"]],
        stopper=meta["stopper"],
        stopped_early=bool(meta["stopped_early"]),
        extra=meta.get("extra") or {},
    )


def load_student_weights(model: nn.Module, state: RecoveryState) -> None:
    """Copy the checkpoint's weights into ``model`` (same structure), refusing any mismatch."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state.model))
    unexpected = sorted(set(state.model) - set(own))
    bad = [k for k in own if k in state.model and own[k].shape != state.model[k].shape]
    if missing or unexpected or bad:
        raise UserError(
            "recovery checkpoint does not fit this student: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}, other shape {bad[:3]}"
        )
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(state.model[k])

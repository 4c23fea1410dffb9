"""Compression families. Every module in this folder that calls ``@register`` is a family."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import pkgutil
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from nas_fair.errors import UserError, did_you_mean
from nas_fair.spaces.base import (
    REGISTRY,
    CompressionContext,
    Family,
    FamilyConfig,
    RecoveryData,
    RecoveryOptions,
    ordered,
    register,
)

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base" and not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = [
    "REGISTRY",
    "CompressionContext",
    "Family",
    "FamilyConfig",
    "RecoveryData",
    "RecoveryOptions",
    "anchor_trials",
    "build_space",
    "compress",
    "configs_from_params",
    "off_configs",
    "register",
]


def build_space(families: list[str] | None, options: Mapping[str, Mapping[str, Any]]) -> list[Family]:
    """Instantiate the study's families (all registered ones by default) in application order."""
    names = list(REGISTRY) if families is None else families
    for name in list(names) + list(options):
        if name not in REGISTRY:
            raise UserError(
                f"unknown compression family {name!r}{did_you_mean(name, REGISTRY)}; "
                f"available: {', '.join(sorted(REGISTRY))}"
            )
    return [cls(options.get(cls.name)) for cls in ordered(names)]


def off_configs(space: list[Family]) -> dict[str, FamilyConfig]:
    return {fam.name: fam.off() for fam in space}


def anchor_trials(space: list[Family]) -> list[dict[str, Any]]:
    """Flat Optuna params of one trial per family anchor (see ``Family.anchor``): that family at
    its anchor, every other at its off setting; then, where two or more families have a
    ``combined_anchor``, one trial with all of those together. A value outside the study's
    (narrowed) range is left to the sampler; an anchor outside it is dropped."""
    singles = [{fam.name: fam.anchor} for fam in space if fam.anchor is not None]
    combined = {fam.name: fam.combined_anchor for fam in space if fam.combined_anchor is not None}
    trials = [_anchor_params(space, settings) for settings in singles]
    if len(combined) >= 2:
        trials.append(_anchor_params(space, combined))
    return [t for t in trials if t is not None]


def _anchor_params(space: list[Family], settings: Mapping[str, Mapping[str, Any]],
                   ) -> dict[str, Any] | None:
    """Every family at its off setting, those in ``settings`` moved to those values; None when
    a value is outside the study's range."""
    params: dict[str, Any] = {}
    for fam in space:
        values = fam.off().to_dict()
        chosen = settings.get(fam.name, {})
        if not all(key in fam.space and fam.space[key].contains(v) for key, v in chosen.items()):
            return None
        values.update(chosen)
        params.update({f"{fam.name}.{key}": values[key] for key, spec in fam.space.items()
                       if key in values and spec.contains(values[key])})
    return params


def configs_from_params(params: Mapping[str, Any]) -> dict[str, FamilyConfig]:
    """Rebuild per-family configs from flat Optuna params ``family.param`` (replay, export)."""
    grouped: dict[str, dict[str, Any]] = {}
    for key, value in params.items():
        family, _, param = key.partition(".")
        if family not in REGISTRY:
            raise UserError(f"parameter {key!r} names no compression family")
        grouped.setdefault(family, {})[param] = value
    return {name: REGISTRY[name].config_class.from_dict(vals) for name, vals in grouped.items()}


def compress(
    reference: nn.Module,
    configs: Mapping[str, FamilyConfig],
    ctx: CompressionContext,
    *,
    timings: dict[str, float] | None = None,
) -> nn.Module:
    """A compressed private copy of ``reference``: families applied in their fixed stage order.

    First every family's ``recovery_options`` hook is collected into a per-trial copy of ``ctx``
    (``ctx.recovery``; ``ctx`` itself is not changed), then each family's ``apply`` runs in stage
    order, then each family's ``finalize`` (post-processing of the finished model).
    ``timings``, when given, receives the seconds each family took (the per-trial cost breakdown).
    """
    model = copy.deepcopy(reference)
    model.eval()
    families = [(cls(), configs[cls.name]) for cls in ordered(list(configs))]
    spent = {fam.name: 0.0 for fam, _ in families}
    trial_ctx = ctx if ctx.recovery is None else dataclasses.replace(ctx, recovery=None)
    options: RecoveryOptions | None = None
    for fam, config in families:
        torch.manual_seed(ctx.seed)
        start = time.perf_counter()
        update = fam.recovery_options(config, trial_ctx)
        if update:
            options = (options or RecoveryOptions()).merged(update)
            trial_ctx = dataclasses.replace(ctx, recovery=options)
        spent[fam.name] += time.perf_counter() - start
    changed = False
    for fam, config in families:
        torch.manual_seed(ctx.seed)
        start = time.perf_counter()
        if trial_ctx.student_changed != changed:
            trial_ctx = dataclasses.replace(trial_ctx, student_changed=changed)
        model = fam.apply(model, config, trial_ctx)
        changed = changed or config != fam.off()
        spent[fam.name] += time.perf_counter() - start
    model.eval()
    for fam, config in families:
        start = time.perf_counter()
        model = fam.finalize(model, config, trial_ctx)
        spent[fam.name] += time.perf_counter() - start
    if timings is not None:
        timings.update(spent)
    model.eval()
    return model

"""Objectives: size, latency, accuracy and a registry of bias metrics."""

from __future__ import annotations

import importlib
import pkgutil

from nas_fair.objectives.base import (
    ACCURACY,
    BIAS,
    EvalRecord,
    Metric,
    accuracy_metric,
    bias_metric,
    get,
)

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base" and not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = [
    "ACCURACY",
    "BIAS",
    "EvalRecord",
    "Metric",
    "accuracy_metric",
    "bias_metric",
    "get",
]

"""The contract every compression family implements, and the registry that finds them.

A family is one file in ``spaces/``: a config dataclass (PEFT-style, JSON round-trip), a table of
searchable parameters, and ``apply``. Dropping a new file here that calls ``@register`` is all it
takes for the search, the CLI and the contract tests to pick it up.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from nas_fair.config import MAX_STEPS as MAX_STEPS  # training steps a family may ask for
from nas_fair.config import SearchConfig
from nas_fair.encoder import LAYER_MODEL_TYPES
from nas_fair.errors import UserError, did_you_mean

# Fixed order of application: prune -> low-rank -> share -> distil (recover) -> quantize.
STAGE_PRUNE = 10
STAGE_LOWRANK = 20
STAGE_SHARE = 30
STAGE_RECOVER = 40
STAGE_MITIGATE = 45  # a separate debiasing pass after recovery, while the model can still train
STAGE_QUANTIZE = 50


@dataclass(frozen=True)
class Categorical:
    choices: tuple[Any, ...]

    def suggest(self, trial: Any, name: str) -> Any:
        return trial.suggest_categorical(name, list(self.choices))

    def contains(self, value: Any) -> bool:
        return any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in self.choices)

    def override(self, value: Any, where: str) -> Categorical:
        if not isinstance(value, list) or not value:
            raise UserError(f"{where} must be a non-empty list of choices, got {value!r}")
        for v in value:
            if isinstance(v, (list, dict)):
                raise UserError(f"{where} must be a list of plain values, got {v!r} in it")
            if isinstance(v, float) and not math.isfinite(v):
                raise UserError(f"{where} must hold finite numbers, got {v}")
        return Categorical(tuple(value))


@dataclass(frozen=True)
class FloatRange:
    low: float
    high: float
    step: float | None = None

    def suggest(self, trial: Any, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high, step=self.step)

    def contains(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if not self.low - 1e-9 <= value <= self.high + 1e-9:
            return False
        return self.step is None or abs(round((value - self.low) / self.step)
                                        - (value - self.low) / self.step) < 1e-6

    def override(self, value: Any, where: str) -> FloatRange:
        if (
            not isinstance(value, list)
            or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                       and math.isfinite(v) for v in value)
            or value[0] > value[1]
        ):
            raise UserError(f"{where} must be a range [low, high] of finite numbers with "
                            f"low <= high, got {value!r}")
        return FloatRange(float(value[0]), float(value[1]), self.step)


@dataclass(frozen=True)
class IntRange:
    low: int
    high: int
    step: int = 1

    def suggest(self, trial: Any, name: str) -> int:
        return trial.suggest_int(name, self.low, self.high, step=self.step)

    def contains(self, value: Any) -> bool:
        return (isinstance(value, int) and not isinstance(value, bool)
                and self.low <= value <= self.high and (value - self.low) % self.step == 0)

    def override(self, value: Any, where: str) -> IntRange:
        if (
            not isinstance(value, list)
            or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            or value[0] > value[1]
        ):
            raise UserError(f"{where} must be an integer range [low, high], got {value!r}")
        return IntRange(value[0], value[1], self.step)


ParamSpec = Categorical | FloatRange | IntRange


@dataclass
class FamilyConfig:
    """Base of each family's config dataclass; subclasses validate in ``__post_init__``."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FamilyConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in data if k not in names]
        if unknown:
            raise UserError(
                f"unknown parameter {unknown[0]!r} for {cls.__name__}"
                f"{did_you_mean(unknown[0], names)}; valid: {', '.join(sorted(names))}"
            )
        return cls(**data)


@dataclass
class RecoveryData:
    """Tokenized training split with the reference model's logits, computed once per study."""

    input_ids: torch.Tensor  # (N, L) int64, right-padded
    attention_mask: torch.Tensor  # (N, L)
    labels: torch.Tensor  # (N,) int64
    teacher_logits: torch.Tensor  # (N, C) float32, from the fine-tuned reference
    groups: list[str] | None = None  # sensitive attribute per example, when the data has one
    texts: list[str] | None = None  # raw texts, for data-side mitigation (counterfactuals)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


# extra_loss(model, batch, logits) -> scalar tensor added to a recovery batch's loss; ``batch`` is
# a ``nas_fair.spaces.recovery.Batch`` (its ``index`` rows point into the recovery data).
ExtraLoss = Callable[[nn.Module, Any, torch.Tensor], torch.Tensor]
RECOVERY_OPTION_KEYS = ("data", "sample_weights", "extra_loss")


@dataclass
class RecoveryOptions:
    """What families ask of one trial's recovery training: the extension point of mitigation.

    ``compress`` collects every family's :meth:`Family.recovery_options` (in stage order) into a
    per-trial copy of the context (``ctx.recovery``); the shared context is never changed. The
    family that trains (distillation) passes them to ``recover`` and sets ``used``, so a family
    can tell whether its options reached a recovery run. Merge rules: ``data`` replaces the
    recovery data (for recovery only; other families still see ``ctx.train``), ``sample_weights``
    multiply, ``extra_loss`` terms add up.
    """

    data: RecoveryData | None = None
    sample_weights: torch.Tensor | None = None
    extra_losses: list[ExtraLoss] = field(default_factory=list)
    used: bool = False

    def merged(self, update: Mapping[str, Any]) -> RecoveryOptions:
        unknown = sorted(set(update) - set(RECOVERY_OPTION_KEYS))
        if unknown:
            raise ValueError(
                f"unknown recovery option {unknown[0]!r}; valid: {', '.join(RECOVERY_OPTION_KEYS)}"
            )
        data, weights = self.data, self.sample_weights
        if update.get("data") is not None:
            if weights is not None:
                raise ValueError("recovery data replaced after sample weights were set for it")
            data = update["data"]
        new = update.get("sample_weights")
        if new is not None:
            n = len(data) if data is not None else None
            if n is not None and tuple(new.shape) != (n,):
                raise ValueError(f"sample_weights must have shape ({n},), got {tuple(new.shape)}")
            weights = new if weights is None else weights * new
        losses = list(self.extra_losses)
        if update.get("extra_loss") is not None:
            losses.append(update["extra_loss"])
        return RecoveryOptions(data, weights, losses)

    def context(self, ctx: CompressionContext) -> CompressionContext:
        """``ctx`` with the replacement recovery data as ``train`` (a copy; ``ctx`` unchanged)."""
        return ctx if self.data is None else dataclasses.replace(ctx, train=self.data)

    @property
    def extra_loss(self) -> ExtraLoss | None:
        """All extra loss terms as one callable (``None`` when there are none)."""
        terms = list(self.extra_losses)
        if not terms:
            return None
        if len(terms) == 1:
            return terms[0]

        def total(model: nn.Module, batch: Any, logits: torch.Tensor) -> torch.Tensor:
            return torch.stack([f(model, batch, logits) for f in terms]).sum()

        return total


@dataclass(frozen=True)
class RecoveryConfig:
    """The study's recovery settings (``[search] recovery_*``): the defaults of every
    :func:`~nas_fair.spaces.recovery.recover` call made with this context. The defaults are
    :class:`~nas_fair.config.SearchConfig`'s, so they are written once."""

    lr: float = SearchConfig.recovery_lr
    early_stop: bool = SearchConfig.recovery_early_stop
    tolerance: float = SearchConfig.recovery_tolerance
    precision: str = SearchConfig.recovery_precision
    dropout: bool = SearchConfig.recovery_dropout

    @classmethod
    def from_search(cls, search: SearchConfig) -> RecoveryConfig:
        return cls(lr=search.recovery_lr, early_stop=search.recovery_early_stop,
                   tolerance=search.recovery_tolerance, precision=search.recovery_precision,
                   dropout=search.recovery_dropout)


@dataclass(frozen=True)
class RecoveryRun:
    """One trial's place in a longer recovery (multi-fidelity search): the LR schedule's length,
    the checkpoint to continue from (a lower rung's student), and where to save one."""

    schedule_steps: int | None = None
    resume_from: Path | None = None
    save_state_to: Path | None = None


@dataclass
class CompressionContext:
    """Everything a family may need beyond the model; built once per study, shared by trials."""

    reference: nn.Module  # the fine-tuned uncompressed model (teacher); never mutated
    train: RecoveryData
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batch_size: int = 32
    recovery_steps: int = 0
    cache_dir: Path | None = None  # families may cache reference-only computations here
    tokenizer: Any = None
    recovery_config: RecoveryConfig = field(default_factory=RecoveryConfig)
    extras: dict[str, Any] = field(default_factory=dict)
    # Per trial, set by ``compress`` on its private copy of the context (never on the shared one).
    recovery: RecoveryOptions | None = None
    recovery_run: RecoveryRun = field(default_factory=RecoveryRun)
    # False while every family applied so far was off: the model still equals the reference
    # (recovery toward the reference's own logits would then only cost time).
    student_changed: bool = True


class Family(ABC):
    """One compression family. Subclasses set the class attributes and implement ``apply``."""

    name: ClassVar[str]
    stage: ClassVar[int]
    config_class: ClassVar[type[FamilyConfig]]
    # Parameter table: name -> default search range. Every parameter is suggested in every trial
    # (NSGA-II samples anything else at random); "off" is an ordinary value of the table.
    params: ClassVar[dict[str, ParamSpec]]
    # Names of families this one composes with (the contract tests combine exactly these).
    composes_with: ClassVar[frozenset[str]] = frozenset()
    # The setting a user would try first by hand (e.g. int8 everywhere), or None. A new study
    # runs one trial per anchor (this family at it, the others off) inside NSGA-II's first
    # generation: a random draw over ~20 parameters almost never leaves a model mild, so
    # without anchors the front starts far from the models people actually ship.
    anchor: ClassVar[Mapping[str, Any] | None] = None
    # This family's share of the one *combined* anchor, or None: the mild settings that
    # compose without costing accuracy (FFN pruned 25% + int8 with distillation kept the
    # reference's macro-F1 while much smaller and faster: docs/measurements.md, "Each
    # compression family on the default study's fine-tuned reference"). NSGA-II's offspring of
    # the single-family anchors did not reach such a mild combination within a default budget.
    combined_anchor: ClassVar[Mapping[str, Any] | None] = None
    # Whether the family edits the encoder's layers (through nas_fair/encoder.py): it then supports
    # only the architectures of ``nas_fair.encoder.LAYER_MODEL_TYPES``, checked before anything is trained.
    edits_layers: ClassVar[bool] = False

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        """``options`` is the study's ``[space.<name>]`` table: overrides of the ranges."""
        self.space: dict[str, ParamSpec] = dict(self.params)
        for key, value in (options or {}).items():
            if key not in self.space:
                raise UserError(
                    f"unknown option [space.{self.name}] {key}{did_you_mean(key, self.space)}; "
                    f"valid: {', '.join(sorted(self.space))}"
                )
            self.space[key] = self.space[key].override(value, f"[space.{self.name}] {key}")
        # Validate every corner of the range early: a bad range is a bad study, not a bad trial.
        for key, spec in self.space.items():
            corners = spec.choices if isinstance(spec, Categorical) else (spec.low, spec.high)
            for choice in corners:
                try:
                    self.config_class.from_dict({**self.off().to_dict(), key: choice})
                except UserError as exc:
                    if key not in (options or {}):
                        raise
                    raise UserError(f"[space.{self.name}] {key} = {options[key]!r}: {exc}") from None

    @classmethod
    def off(cls) -> FamilyConfig:
        """The identity setting: applying it returns logits equal to the input model's."""
        return cls.config_class()

    def suggest(self, trial: Any) -> FamilyConfig:
        values = {key: spec.suggest(trial, f"{self.name}.{key}") for key, spec in self.space.items()}
        return self.config_class.from_dict(values)

    @abstractmethod
    def apply(self, model: nn.Module, config: FamilyConfig, ctx: CompressionContext) -> nn.Module:
        """Change ``model`` (already a private copy) for real and return it."""

    def recovery_options(
        self, config: FamilyConfig, ctx: CompressionContext
    ) -> Mapping[str, Any] | None:
        """Optional hook: changes this family asks of the trial's recovery training.

        Called by ``compress`` before any family is applied, in stage order; ``ctx.recovery``
        holds what earlier families asked. Keys (see :class:`RecoveryOptions`): ``data`` (a
        replacement :class:`RecoveryData`), ``sample_weights`` (one per row of the recovery
        data), ``extra_loss``. ``None`` (the default) asks nothing; off must ask nothing.
        """
        return None

    def finalize(self, model: nn.Module, config: FamilyConfig, ctx: CompressionContext) -> nn.Module:
        """Optional hook: runs on the finished model after every family's ``apply``.

        For post-processing fitted on the final model (e.g. group decision thresholds fitted on
        ``ctx.extras["validation"]``). The default does nothing; off must do nothing.
        """
        return model


REGISTRY: dict[str, type[Family]] = {}


def register(cls: type[Family]) -> type[Family]:
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"compression family {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


def ordered(names: Sequence[str]) -> list[type[Family]]:
    return sorted((REGISTRY[n] for n in names), key=lambda c: c.stage)


def check_architecture(model_type: str, families: list[str]) -> None:
    """Refuse, in one line, families that cannot edit this architecture's layers."""
    if not model_type or model_type in LAYER_MODEL_TYPES:
        return  # "" = no readable config: loading the model reports that properly
    bad = [f for f in families if REGISTRY[f].edits_layers]
    if bad:
        keep = [f for f in families if f not in bad]
        raise UserError(
            f"{model_type} models cannot be compressed by {', '.join(bad)} (these "
            f"families edit encoder layers of {', '.join(LAYER_MODEL_TYPES)} models only); drop "
            f"{'it' if len(bad) == 1 else 'them'} from [space] families (e.g. families = "
            f"{keep!r}) or use a checkpoint of a supported architecture"
        )

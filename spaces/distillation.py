"""The distillation family: recovery steps, temperature and loss mix as search parameters.

The training loop itself is :func:`nas_fair.spaces.recovery.recover`, shared with bias
mitigation's separate pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from nas_fair.errors import UserError
from nas_fair.spaces.base import (
    MAX_STEPS,
    STAGE_RECOVER,
    Categorical,
    CompressionContext,
    Family,
    FamilyConfig,
    FloatRange,
    register,
)
from nas_fair.spaces.recovery import log_recovery, recover


@dataclass
class DistillationConfig(FamilyConfig):
    """``steps`` optimizer steps (0 = off); loss ``alpha * T^2 * KL(teacher/T || student/T)
    + (1 - alpha) * CE(labels)``. The learning rate is the study's, ``ctx.recovery_config.lr``
    (``[search] recovery_lr``), with linear warm-up and decay."""

    steps: int = 0
    temperature: float = 2.0
    alpha: float = 0.9

    def __post_init__(self) -> None:
        if (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                or not 0 <= self.steps <= MAX_STEPS):
            raise UserError(f"distillation.steps must be an integer in [0, {MAX_STEPS}], "
                            f"got {self.steps!r}")
        for name, ok, rule in (
            ("temperature", lambda v: v > 0, "a number > 0"),
            ("temperature", lambda v: v <= 100, "at most 100"),  # also inf: a typo
            ("alpha", lambda v: 0 <= v <= 1, "a number in [0, 1]"),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
                raise UserError(f"distillation.{name} must be {rule}, got {value!r}")


@register
class Distillation(Family):
    name = "distillation"
    stage = STAGE_RECOVER
    config_class = DistillationConfig
    params: ClassVar = {
        "steps": Categorical((0,)),  # the study driver overrides this with its recovery budget
        "temperature": Categorical((1.0, 2.0, 4.0, 8.0)),
        "alpha": FloatRange(0.5, 1.0, step=0.1),
    }
    composes_with = frozenset({"pruning", "lowrank", "sharing", "quantization"})

    def apply(self, model: nn.Module, config: FamilyConfig, ctx: CompressionContext) -> nn.Module:
        assert isinstance(config, DistillationConfig)
        if config.steps == 0:
            return model
        # Other families' recovery options (e.g. bias mitigation "during" recovery): replacement
        # data, per-example weights, extra loss terms. Marked used so they run only once.
        opts = ctx.recovery
        if not ctx.student_changed and opts is None:
            # Every earlier family was off: the student is the teacher, and distilling it
            # toward its own logits would spend the trial's largest cost to change nothing.
            return log_recovery(model, {"steps_budget": config.steps, "steps_run": 0,
                                        "skipped": "the student equals the reference"})
        if opts is not None:
            opts.used = True
        return recover(
            model,
            ctx if opts is None else opts.context(ctx),
            steps=config.steps,
            temperature=config.temperature,
            alpha=config.alpha,
            extra_loss=None if opts is None else opts.extra_loss,
            sample_weights=None if opts is None else opts.sample_weights,
            # Multi-fidelity search: a promoted candidate continues its lower rung's student.
            schedule_steps=ctx.recovery_run.schedule_steps,
            resume_from=ctx.recovery_run.resume_from,
            save_state_to=ctx.recovery_run.save_state_to,
        )

"""Cross-layer weight sharing (ALBERT-style): consecutive encoder layers share one module.

Groups of ``group_size`` consecutive layers are replaced by the group's first layer, placed at
every position of the group (the same Python object, so ``model.parameters()`` yields it once, the
optimizer trains it once, and the checkpoint stores it once). The first layer is the one that was
trained on the group's input distribution; averaging the group's weights is not an option once
pruning has given the layers different shapes. A trailing short group shares as well.
Recovery (distillation) then trains the shared weights on the gradients of all its positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from nas_fair.encoder import encoder_layers, set_encoder_layers
from nas_fair.errors import one_of
from nas_fair.spaces.base import (
    STAGE_SHARE,
    Categorical,
    CompressionContext,
    Family,
    FamilyConfig,
    register,
)

GROUP_SIZES = (1, 2, 3, 4, 6)


@dataclass
class SharingConfig(FamilyConfig):
    """``group_size`` consecutive layers share one set of weights; 1 is off."""

    group_size: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.group_size, bool) or self.group_size not in GROUP_SIZES:
            raise one_of("sharing.group_size", self.group_size, GROUP_SIZES)


@register
class Sharing(Family):
    name = "sharing"
    stage = STAGE_SHARE
    config_class = SharingConfig
    params: ClassVar = {"group_size": Categorical((1, 2, 3))}
    edits_layers = True
    composes_with = frozenset({"pruning", "lowrank", "distillation", "quantization"})
    anchor: ClassVar = {"group_size": 2}

    def apply(self, model: nn.Module, config: FamilyConfig, ctx: CompressionContext) -> nn.Module:
        assert isinstance(config, SharingConfig)
        if config.group_size == 1:
            return model
        layers = list(encoder_layers(model))
        g = config.group_size
        shared = [layers[(i // g) * g] for i in range(len(layers))]
        set_encoder_layers(model, shared)
        return model

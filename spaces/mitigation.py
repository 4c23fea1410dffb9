"""Bias mitigation as searched parameters: data-side, loss-side and post-processing.

Every parameter is suggested in every trial and each has an "off" value; all off is the identity.

Data side (applied to the recovery data, never to ``ctx.train`` itself):

* ``cda``: counterfactual data augmentation. Every training text with a gendered word (WinoBias
  swap list, :func:`nas_fair.swaps.gender_swap`) gets a swapped copy; both are
  kept. The copy reuses the *original* example's label and teacher logits: CDA asks for invariance
  to the swap, so the target of "she is a nurse" and "he is a nurse" is the same distribution.
  With two gender groups the copy's group is the other one (its text now describes that gender).
* ``oversample``: rows of under-represented cells (``group``, ``class`` or ``group_class``) are
  repeated (whole copies, then a seeded sample for the remainder) until every cell is as large as
  the largest. Applied after CDA.
* ``weighting``: per-example loss weights ``n / (cells * count(cell))`` (inverse frequency, mean
  1) for the same cell choices, computed on the data after CDA and oversampling; passed to
  ``recover(sample_weights=...)``.

Loss side: ``regularizer`` with ``strength`` (0 = off) adds to every recovery batch's loss either

* ``group_gap``: the gap between the groups' mean cross-entropy in the batch (max - min over the
  groups present; 0 when they are equal or only one group is present), or
* ``counterfactual``: the symmetric KL divergence between the predictions on each gendered row and
  on its gender-swapped text (one extra forward pass on those rows).

When: ``when = "during"`` hands these to the trial's distillation (via the ``recovery_options``
hook); ``"after"`` lets distillation run plain and then runs a separate debiasing pass of
``steps`` ``recover`` steps (T = 2, alpha = 0.9) before quantization. If no recovery runs in the
trial (distillation off or absent), "during" runs that same pass, so ``when`` only matters when
recovery runs and a mitigation is never silently dropped.

Post-processing: ``thresholds`` > 0 fits group-aware logit offsets for equalized odds on the
validation split (``ctx.extras["validation"]``) after every other family, with that weight on the
TPR gap against validation error (:mod:`nas_fair.postprocess`). The offsets become part of
the model and of its checkpoint; predictions then need each row's group.

What cannot apply is skipped with a warning, never faked: CDA and the counterfactual regularizer
need the raw texts and a tokenizer; group cells, the group-gap regularizer and thresholds need
groups; thresholds need validation data.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from nas_fair import postprocess
from nas_fair.errors import UserError, one_of
from nas_fair.spaces.base import (
    MAX_STEPS,
    STAGE_MITIGATE,
    Categorical,
    CompressionContext,
    Family,
    FamilyConfig,
    RecoveryData,
    RecoveryOptions,
    register,
)

CELLS = ("none", "group", "class", "group_class")
REGULARIZERS = ("group_gap", "counterfactual")
WHEN = ("during", "after")
PASS_TEMPERATURE = 2.0  # the separate debiasing pass distils like the distillation defaults
PASS_ALPHA = 0.9


@dataclass
class MitigationConfig(FamilyConfig):
    """See the module docstring; the defaults are all off."""

    cda: bool = False
    oversample: str = "none"
    weighting: str = "none"
    regularizer: str = "group_gap"
    strength: float = 0.0
    when: str = "during"
    steps: int = 50
    thresholds: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.cda, bool):
            raise UserError(f"mitigation.cda must be true or false, got {self.cda!r}")
        for name, choices in (("oversample", CELLS), ("weighting", CELLS),
                              ("regularizer", REGULARIZERS), ("when", WHEN)):
            if getattr(self, name) not in choices:
                raise one_of(f"mitigation.{name}", getattr(self, name), choices)
        for name in ("strength", "thresholds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise UserError(f"mitigation.{name} must be a number >= 0, got {value!r}")
            if not value <= 1000:  # also inf: a typo, not a setting
                raise UserError(f"mitigation.{name} must be at most 1000, got {value!r}")
        if (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                or not 0 <= self.steps <= MAX_STEPS):
            raise UserError(f"mitigation.steps must be an integer in [0, {MAX_STEPS}], "
                            f"got {self.steps!r}")

    @property
    def trains(self) -> bool:
        """Whether any data- or loss-side mitigation is on (post-processing aside)."""
        return (self.cda or self.oversample != "none" or self.weighting != "none"
                or self.strength > 0)


@register
class Mitigation(Family):
    name = "mitigation"
    stage = STAGE_MITIGATE
    config_class = MitigationConfig
    params: ClassVar = {
        "cda": Categorical((False, True)),
        "oversample": Categorical(CELLS),
        "weighting": Categorical(CELLS),
        "regularizer": Categorical(REGULARIZERS),
        "strength": Categorical((0.0, 0.1, 0.3, 1.0)),
        "when": Categorical(WHEN),
        "steps": Categorical((50,)),  # length of the separate debiasing pass
        "thresholds": Categorical((0.0, 1.0, 3.0)),
    }
    composes_with = frozenset({"pruning", "lowrank", "sharing", "distillation", "quantization"})

    def recovery_options(
        self, config: FamilyConfig, ctx: CompressionContext
    ) -> dict[str, Any] | None:
        assert isinstance(config, MitigationConfig)
        if not config.trains or config.when != "during":
            return None
        earlier = ctx.recovery.data if ctx.recovery is not None else None
        return build_options(config, ctx, ctx.train if earlier is None else earlier)

    def apply(self, model: nn.Module, config: FamilyConfig, ctx: CompressionContext) -> nn.Module:
        assert isinstance(config, MitigationConfig)
        if not config.trains or config.steps == 0:
            return model
        if config.when == "during":
            # Our options (with any other family's) went to the trial's recovery; if no
            # recovery consumed them, this pass runs them. None: nothing applied.
            opts = ctx.recovery
            if opts is None or opts.used:
                return model
        else:
            update = build_options(config, ctx, ctx.train)
            if update is None:
                return model
            opts = RecoveryOptions().merged(update)
        from nas_fair.spaces.recovery import recover

        opts.used = True
        return recover(model, opts.context(ctx), steps=config.steps, temperature=PASS_TEMPERATURE,
                       alpha=PASS_ALPHA, extra_loss=opts.extra_loss,
                       sample_weights=opts.sample_weights)

    def finalize(self, model: nn.Module, config: FamilyConfig, ctx: CompressionContext) -> nn.Module:
        assert isinstance(config, MitigationConfig)
        if config.thresholds == 0:
            return model
        validation = ctx.extras.get("validation")
        if validation is None:
            _skip("thresholds", "no validation split in the context")
            return model
        fitted = postprocess.fit(model, validation, weight=float(config.thresholds),
                                 batch_size=int(ctx.extras.get("eval_batch_size", 128)),
                                 device=ctx.device)
        if fitted is None:
            _skip("thresholds", "the validation split has no groups")
            return model
        return postprocess.attach(model, fitted)


def _skip(what: str, why: str) -> None:
    warnings.warn(f"mitigation {what} skipped: {why}", stacklevel=3)


# --------------------------------------------------------------------------- building blocks


@dataclass
class Swapped:
    """Gender-swapped versions of the rows whose text has a gendered word."""

    rows: torch.Tensor  # (k,) rows of the data that change under the swap
    input_ids: torch.Tensor  # (k, L)
    attention_mask: torch.Tensor
    texts: list[str]


def swap_rows(data: RecoveryData, tokenizer: Any) -> Swapped | None:
    """Swap gendered words in every text (WinoBias list); ``None`` without texts or tokenizer."""
    if data.texts is None or tokenizer is None:
        return None
    from nas_fair.modeling import tokenize
    from nas_fair.swaps import gender_swap, load_winobias_swaps

    pairs = load_winobias_swaps()
    swapped = [gender_swap(t, pairs) for t in data.texts]
    rows = [i for i, (a, b) in enumerate(zip(data.texts, swapped)) if a != b]
    width = int(data.input_ids.shape[1])
    if rows:
        ids, mask = tokenize(tokenizer, [swapped[i] for i in rows], width)
    else:
        ids = data.input_ids[:0].clone()
        mask = data.attention_mask[:0].clone()
    return Swapped(torch.tensor(rows, dtype=torch.long), ids, mask, [swapped[i] for i in rows])


def group_codes(groups: list[str]) -> tuple[torch.Tensor, list[str]]:
    names = sorted(set(groups))
    where = {g: i for i, g in enumerate(names)}
    return torch.tensor([where[g] for g in groups], dtype=torch.long), names


def cell_index(data: RecoveryData, by: str) -> torch.Tensor | None:
    """Each row's cell (``group``, ``class`` or ``group_class``) as 0..k-1; ``None`` for none."""
    if by == "none":
        return None
    use_group = by in ("group", "group_class")
    if use_group and data.groups is None:
        _skip(f"{by} cells", "the data has no groups")
        if by == "group":
            return None
        use_group = False
    labels = data.labels.long()
    key = labels.clone()
    if use_group:
        codes, _ = group_codes(list(data.groups or []))
        key = codes * (int(labels.max()) + 1) + (labels if by == "group_class" else 0)
    return torch.unique(key, return_inverse=True)[1]


def oversample_rows(cells: torch.Tensor, seed: int) -> torch.Tensor:
    """Row indices (all rows, then the added ones) giving every cell the largest cell's size."""
    counts = torch.bincount(cells)
    target = int(counts.max())
    gen = torch.Generator().manual_seed(seed)
    parts = [torch.arange(len(cells))]
    for k in range(len(counts)):
        members = torch.nonzero(cells == k).flatten()
        if len(members) == 0:
            continue
        reps, rest = divmod(target - len(members), len(members))
        if reps:
            parts.append(members.repeat(reps))
        if rest:
            parts.append(members[torch.randperm(len(members), generator=gen)[:rest]])
    return torch.cat(parts)


def inverse_frequency(cells: torch.Tensor) -> torch.Tensor:
    """``n / (cells * count(cell))`` per row: every cell gets the same total weight; mean 1."""
    counts = torch.bincount(cells).float()
    present = int((counts > 0).sum())
    return len(cells) / (present * counts[cells])


def subset(data: RecoveryData, rows: torch.Tensor) -> RecoveryData:
    idx = rows.tolist()
    return RecoveryData(
        data.input_ids[rows], data.attention_mask[rows], data.labels[rows],
        data.teacher_logits[rows],
        groups=None if data.groups is None else [data.groups[i] for i in idx],
        texts=None if data.texts is None else [data.texts[i] for i in idx],
    )


def group_loss_gap(losses: torch.Tensor, codes: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Max minus min over the groups present of their mean loss (0 with fewer than two)."""
    sums = torch.zeros(n_groups, dtype=losses.dtype, device=losses.device).index_add(
        0, codes, losses)
    counts = torch.bincount(codes, minlength=n_groups)
    present = counts > 0
    if int(present.sum()) < 2:
        return losses.sum() * 0.0
    means = sums[present] / counts[present].to(losses.dtype)
    return means.max() - means.min()


def counterfactual_divergence(logits: torch.Tensor, cf_logits: torch.Tensor) -> torch.Tensor:
    """Mean symmetric KL between the predicted distributions of rows and their swaps."""
    p = F.log_softmax(logits, dim=-1)
    q = F.log_softmax(cf_logits, dim=-1)
    kl_pq = F.kl_div(q, p, log_target=True, reduction="none").sum(-1)  # KL(p || q)
    kl_qp = F.kl_div(p, q, log_target=True, reduction="none").sum(-1)
    return (0.5 * (kl_pq + kl_qp)).mean()


class GroupGapPenalty:
    """``strength`` times the batch's group gap in mean cross-entropy."""

    def __init__(self, codes: torch.Tensor, n_groups: int, strength: float) -> None:
        self.codes, self.n_groups, self.strength = codes, n_groups, strength

    def __call__(self, model: nn.Module, batch: Any, logits: torch.Tensor) -> torch.Tensor:
        losses = F.cross_entropy(logits, batch.labels, reduction="none")
        codes = self.codes[batch.index.cpu()].to(logits.device)
        return self.strength * group_loss_gap(losses, codes, self.n_groups)


class CounterfactualPenalty:
    """``strength`` times the divergence between each gendered row and its swapped text."""

    def __init__(self, cf_ids: torch.Tensor, cf_mask: torch.Tensor, has_cf: torch.Tensor,
                 strength: float) -> None:
        self.cf_ids, self.cf_mask, self.has_cf, self.strength = cf_ids, cf_mask, has_cf, strength

    def __call__(self, model: nn.Module, batch: Any, logits: torch.Tensor) -> torch.Tensor:
        index = batch.index.cpu()
        sel = self.has_cf[index]
        if not bool(sel.any()):
            return logits.sum() * 0.0
        rows = index[sel]
        mask = self.cf_mask[rows]
        width = max(1, int(mask.sum(1).max()))
        out = model(input_ids=self.cf_ids[rows, :width].to(logits.device),
                    attention_mask=mask[:, :width].to(logits.device))
        return self.strength * counterfactual_divergence(logits[sel.to(logits.device)],
                                                         out.logits.float())


def build_options(config: MitigationConfig, ctx: CompressionContext,
                  base: RecoveryData) -> dict[str, Any] | None:
    """The recovery data (built from ``base``), weights and extra loss that ``config`` asks for
    (``None``: nothing applies). Deterministic for ``ctx.seed``; nothing is changed in place."""
    if base is None or len(base) == 0:
        return None
    counterfactual = config.strength > 0 and config.regularizer == "counterfactual"
    swap = None
    if config.cda or counterfactual:
        swap = swap_rows(base, ctx.tokenizer)
        if swap is None:
            _skip("cda / counterfactual regularizer", "needs the raw texts and a tokenizer")
    data = base
    cf_ids = cf_mask = has_cf = None
    if swap is not None:
        n = len(base)
        cf_ids, cf_mask = base.input_ids.clone(), base.attention_mask.clone()
        cf_ids[swap.rows], cf_mask[swap.rows] = swap.input_ids, swap.attention_mask
        has_cf = torch.zeros(n, dtype=torch.bool)
        has_cf[swap.rows] = True
        if config.cda and len(swap.rows):
            groups = None
            if base.groups is not None:
                flip = postprocess.gender_group_map(set(base.groups)) or {}
                groups = list(base.groups) + [flip.get(base.groups[i], base.groups[i])
                                              for i in swap.rows.tolist()]
            data = RecoveryData(
                torch.cat([base.input_ids, swap.input_ids]),
                torch.cat([base.attention_mask, swap.attention_mask]),
                torch.cat([base.labels, base.labels[swap.rows]]),
                torch.cat([base.teacher_logits, base.teacher_logits[swap.rows]]),
                groups=groups,
                texts=None if base.texts is None else list(base.texts) + swap.texts,
            )
            # a swapped copy's counterfactual is its original
            cf_ids = torch.cat([cf_ids, base.input_ids[swap.rows]])
            cf_mask = torch.cat([cf_mask, base.attention_mask[swap.rows]])
            has_cf = torch.cat([has_cf, torch.ones(len(swap.rows), dtype=torch.bool)])
    cells = cell_index(data, config.oversample)
    if cells is not None:
        rows = oversample_rows(cells, ctx.seed)
        if len(rows) > len(data):
            data = subset(data, rows)
            if has_cf is not None:
                cf_ids, cf_mask, has_cf = cf_ids[rows], cf_mask[rows], has_cf[rows]
    weights = None
    cells = cell_index(data, config.weighting)
    if cells is not None:
        weights = inverse_frequency(cells)
    extra = None
    if config.strength > 0 and config.regularizer == "group_gap":
        if data.groups is None:
            _skip("group_gap regularizer", "the data has no groups")
        else:
            codes, names = group_codes(list(data.groups))
            extra = GroupGapPenalty(codes, len(names), float(config.strength))
    elif counterfactual and has_cf is not None:
        extra = CounterfactualPenalty(cf_ids, cf_mask, has_cf, float(config.strength))
    if data is base and weights is None and extra is None:
        return None
    return {"data": None if data is base else data, "sample_weights": weights,
            "extra_loss": extra}

"""Post-processing for equalized odds: per-group additive logit offsets, fitted on validation data.

Hardt et al. (2016) equalize true- and false-positive rates across groups by choosing group-specific
decision thresholds. fairlearn's ``ThresholdOptimizer`` implements that for binary tasks with
*randomized* predictions; the default study has 10 classes, and a searched, exported model should
give the same prediction every time. So this module fits, deterministically, one additive offset
per (group, class) on the logits: the prediction for a row of group ``g`` is
``argmax_c(logits[c] + offsets[g, c])``. The fit is a coordinate search (each offset in turn, exact
line search over the points where a validation row's prediction changes) minimizing

    weight * RMS over classes of (max - min over groups of the class's TPR) + validation error.

For a binary task the per-class TPRs are the TPR and the TNR (= 1 - FPR), so the gap term is the
equalized-odds gap itself. Classes where fewer than two groups have ``min_cell`` validation
positives are left out of the gap (too few rows to estimate a rate).

Rules this module enforces:

* Fitting only ever sees :class:`ValidationData`, which refuses to be anything but the validation
  split, and the study driver puts only its validation split there (never the test split).
* The offsets are part of the model: ``model.nas_fair_postprocess``, saved as
  ``postprocess.json`` next to the weights by :func:`nas_fair.checkpoint.save_compressed` and
  restored by ``load_compressed``. Every prediction goes through :func:`predict`.
* Group labels must be known at prediction time (they pick the offsets); a row whose group was
  not seen in fitting gets no offset, and predicting without groups is an error for a model that
  has offsets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from nas_fair.errors import UserError

ATTR = "nas_fair_postprocess"
FILE = "postprocess.json"
KIND = "group_logit_offsets"
FORMAT_VERSION = 1
MIN_CELL = 5  # validation positives a (group, class) needs to count in the TPR gap
MAX_SWEEPS = 20
MAX_CANDIDATES = 512  # offset values tried per coordinate (quantiles beyond that)


@dataclass
class ValidationData:
    """The validation split, tokenized: the only data post-processing may be fitted on."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    groups: list[str] | None = None
    split: str = "validation"

    def __post_init__(self) -> None:
        if self.split != "validation":
            raise UserError(
                f"post-processing is fitted on the validation split only, got split {self.split!r}"
            )
        n = int(self.input_ids.shape[0])
        if self.labels.shape[0] != n or (self.groups is not None and len(self.groups) != n):
            raise UserError(
                f"validation data must be row-aligned: {n} inputs, {self.labels.shape[0]} labels, "
                f"{None if self.groups is None else len(self.groups)} groups"
            )

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class GroupOffsets:
    """Per-group additive logit offsets (rows: ``groups``, columns: classes)."""

    groups: list[str]
    offsets: list[list[float]]
    stats: dict[str, Any] = field(default_factory=dict)  # what the fit saw and achieved

    def predict(self, logits: np.ndarray, groups: Sequence[Any] | None) -> np.ndarray:
        if groups is None:
            raise UserError(
                "this model has group-aware decision thresholds (post-processing): predicting "
                "needs each row's group"
            )
        z = np.asarray(logits, dtype=np.float64)
        if len(groups) != len(z):
            raise UserError(f"groups must align with logits: {len(groups)} groups vs {len(z)} rows")
        table = np.vstack([np.asarray(self.offsets, dtype=np.float64), np.zeros(z.shape[1])])
        where = {g: i for i, g in enumerate(self.groups)}
        idx = np.array([where.get(str(g), len(self.groups)) for g in groups], dtype=np.int64)
        return _argmax(z, table[idx])

    def to_dict(self) -> dict[str, Any]:
        return {"kind": KIND, "format_version": FORMAT_VERSION, "groups": list(self.groups),
                "offsets": [[float(v) for v in row] for row in self.offsets],
                "stats": self.stats}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GroupOffsets:
        if not isinstance(data, dict) or data.get("kind") != KIND:
            raise ValueError(f"{FILE} is not a {KIND!r} post-processing state")
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{FILE} has format_version {data.get('format_version')!r}, "
                             f"expected {FORMAT_VERSION}")
        groups = [str(g) for g in data["groups"]]
        offsets = [[float(v) for v in row] for row in data["offsets"]]
        if len(offsets) != len(groups) or len({len(r) for r in offsets}) > 1:
            raise ValueError(f"{FILE}: offsets must be one row of equal length per group")
        return cls(groups, offsets, dict(data.get("stats", {})))


def _argmax(z: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The one place offsets meet logits (fitting and predicting use the same arithmetic)."""
    return np.argmax(z + offsets, axis=1).astype(np.int64)


# --------------------------------------------------------------------------- model state


def get(model: nn.Module) -> GroupOffsets | None:
    pp = getattr(model, ATTR, None)
    return pp if isinstance(pp, GroupOffsets) else None


def attach(model: nn.Module, offsets: GroupOffsets | None) -> nn.Module:
    """Make ``offsets`` part of ``model`` (``None`` removes them)."""
    if offsets is None:
        if ATTR in model.__dict__:
            del model.__dict__[ATTR]
        return model
    setattr(model, ATTR, offsets)
    return model


def predict(model: nn.Module, logits: torch.Tensor | np.ndarray,
            groups: Sequence[Any] | None = None) -> np.ndarray:
    """Class predictions of ``model`` from its ``logits``: argmax, through its offsets if any.

    ``groups`` (one per row) are needed only when the model has post-processing.
    """
    pp = get(model)
    if pp is None:
        if isinstance(logits, torch.Tensor):
            return logits.argmax(-1).cpu().numpy().astype(np.int64)
        return np.asarray(logits).argmax(-1).astype(np.int64)
    z = logits.detach().cpu().numpy() if isinstance(logits, torch.Tensor) else np.asarray(logits)
    return pp.predict(z, groups)


GROUPS_ARG = "groups"
DISPARATE_TREATMENT = (
    "its predictions need each row's sensitive attribute (group) at inference: using a "
    "protected attribute at decision time is disparate treatment in many jurisdictions "
    "(Hardt et al. 2016 discuss this cost of group-specific thresholds)"
)


class GroupAwareClassifier(nn.Module):
    """A loaded model whose predictions include group-aware decision offsets: what the study
    scored. ``nas_fair.load`` returns this for a folder with ``postprocess.json``.

    ``model(input_ids=..., attention_mask=..., groups=[...])`` returns the network's output
    with ``logits`` replaced by the decision scores ``logits + offsets[group]`` (float64), so
    ``logits.argmax(-1)`` is the scored prediction; ``groups`` (one per row) is required.
    ``raw_logits`` holds the network's own logits. ``.network`` is the bare network (its argmax
    is *not* the model that was scored)."""

    needs_groups = True

    def __init__(self, network: nn.Module, offsets: GroupOffsets) -> None:
        super().__init__()
        self.network = network
        self.offsets = offsets
        self.config = getattr(network, "config", None)

    @property
    def groups(self) -> list[str]:
        """The group names the offsets were fitted for (others get no offset)."""
        return list(self.offsets.groups)

    def forward(self, *args: Any, groups: Sequence[Any] | None = None, **kwargs: Any) -> Any:
        if groups is None:
            raise UserError(
                f"this model needs the argument {GROUPS_ARG}= (one group per row, e.g. "
                f"{self.offsets.groups[:2]}): its decisions add group-aware offsets "
                "(postprocess.json)"
            )
        out = self.network(*args, **kwargs)
        raw = out.logits if hasattr(out, "logits") else out[0]
        if isinstance(groups, (str, bytes)) or len(groups) != raw.shape[0]:
            n = 1 if isinstance(groups, (str, bytes)) else len(groups)
            raise UserError(f"{GROUPS_ARG} must give one group per row: {n} groups for "
                            f"{raw.shape[0]} rows")
        table = np.vstack([np.asarray(self.offsets.offsets, dtype=np.float64),
                           np.zeros(raw.shape[1])])
        where = {g: i for i, g in enumerate(self.offsets.groups)}
        idx = [where.get(str(g), len(self.offsets.groups)) for g in groups]
        shift = torch.from_numpy(table[idx]).to(raw.device)
        scores = raw.detach().to(torch.float64) + shift  # the arithmetic of GroupOffsets.predict
        if hasattr(out, "logits"):
            out["raw_logits"] = raw
            out["logits"] = scores
            return out
        return (scores, *out[1:])

    def predict(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                groups: Sequence[Any] | None = None) -> np.ndarray:
        """Class indices, one per row (the scored predictions)."""
        with torch.no_grad():
            logits = self(input_ids=input_ids, attention_mask=attention_mask, groups=groups).logits
        return logits.argmax(-1).cpu().numpy().astype(np.int64)


def for_inference(model: nn.Module) -> nn.Module:
    """``model`` itself, or a :class:`GroupAwareClassifier` when it has offsets."""
    pp = get(model)
    return model if pp is None else GroupAwareClassifier(model, pp).eval()


def counterfactual_groups(groups: Sequence[Any]) -> np.ndarray:
    """Groups of gender-swapped rows: with exactly two groups that are each other's swap
    (female/male, woman/man, f/m, ...), each row gets the other; otherwise unchanged."""
    arr = np.asarray([str(g) for g in groups], dtype=object)
    mapping = gender_group_map(set(arr.tolist()))
    if mapping is None:
        return arr
    return np.asarray([mapping[g] for g in arr], dtype=object)


def gender_group_map(values: set[str]) -> dict[str, str] | None:
    """{a: b, b: a} when the two group names are gender counterparts, else ``None``."""
    if len(values) != 2:
        return None
    a, b = sorted(values)
    la, lb = a.lower(), b.lower()
    if {la, lb} == {"f", "m"}:
        return {a: b, b: a}
    try:
        from nas_fair.swaps import load_winobias_swaps

        table = load_winobias_swaps()
    except UserError:
        table = {"female": "male", "male": "female", "woman": "man", "man": "woman"}
    if table.get(la) == lb and table.get(lb) == la:
        return {a: b, b: a}
    return None


# --------------------------------------------------------------------------- fitting


def tpr_table(pred: np.ndarray, labels: np.ndarray, group_index: np.ndarray, n_groups: int,
              n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(true positives, positives), each (groups, classes)."""
    tp = np.zeros((n_groups, n_classes))
    pos = np.zeros((n_groups, n_classes))
    np.add.at(pos, (group_index, labels), 1)
    hit = pred == labels
    np.add.at(tp, (group_index[hit], labels[hit]), 1)
    return tp, pos


def _gap(tp: np.ndarray, pos: np.ndarray, counted: np.ndarray) -> np.ndarray:
    """RMS over classes of the TPR range across counted groups; ``tp`` may be (..., G, C)."""
    tpr = tp / np.maximum(pos, 1)
    classes = counted.sum(0) >= 2
    if not classes.any():
        return np.zeros(tp.shape[:-2])
    hi = np.where(counted, tpr, -np.inf).max(-2)[..., classes]
    lo = np.where(counted, tpr, np.inf).min(-2)[..., classes]
    return np.sqrt(np.mean((hi - lo) ** 2, axis=-1))


def fit_group_offsets(
    logits: np.ndarray,
    labels: np.ndarray,
    groups: Sequence[Any],
    *,
    weight: float,
    min_cell: int = MIN_CELL,
    max_sweeps: int = MAX_SWEEPS,
) -> GroupOffsets:
    """Offsets minimizing ``weight * TPR-gap RMS + error`` on these rows (see the module doc).

    Deterministic. Callers pass validation rows only; :func:`fit` is the guarded entry point.
    """
    if not weight >= 0:
        raise UserError(f"the post-processing weight must be a number >= 0, got {weight!r}")
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    names = sorted({str(g) for g in groups})
    where = {g: i for i, g in enumerate(names)}
    gi = np.array([where[str(g)] for g in groups], dtype=np.int64)
    n, n_classes = z.shape
    n_groups = len(names)
    delta = np.zeros((n_groups, n_classes))
    pred = _argmax(z, delta[gi])
    tp, pos = tpr_table(pred, y, gi, n_groups, n_classes)
    counted = pos >= min_cell

    def score(tp_: np.ndarray) -> np.ndarray:
        return weight * _gap(tp_, pos, counted) + 1.0 - tp_.sum((-2, -1)) / max(n, 1)

    before = {"tpr_gap_rms": float(_gap(tp, pos, counted)), "error": float(1 - tp.sum() / n)}
    current = float(score(tp))
    sweeps = 0
    onehot = np.eye(n_classes)[y]
    while sweeps < max_sweeps and weight > 0 and n_groups > 1:
        sweeps += 1
        improved = False
        for g in range(n_groups):
            rows = np.flatnonzero(gi == g)
            zg, yg = z[rows], y[rows]
            for c in range(n_classes):
                shifted = zg + delta[g]
                others = shifted.copy()
                others[:, c] = -np.inf
                other_best = others.argmax(1)
                # the row predicts c iff delta[g, c] > t (else its best other class)
                t = others[np.arange(len(rows)), other_best] - zg[:, c]
                cand = _candidates(t, delta[g, c])
                if cand.size == 0:
                    continue
                takes_c = cand[:, None] > t[None, :]  # (K, rows)
                right_if_c = yg == c
                right_if_other = (yg != c) & (other_best == yg)
                # true positives of group g per candidate, the other groups unchanged
                tp_g = (~takes_c & right_if_other[None, :]).astype(float) @ onehot[rows]
                tp_g[:, c] = (takes_c & right_if_c[None, :]).sum(1)
                tp_all = np.broadcast_to(tp, (len(cand), *tp.shape)).copy()
                tp_all[:, g, :] = tp_g
                scores = score(tp_all)
                best = scores.min()
                if best < current - 1e-12:
                    pick = np.flatnonzero(scores <= best + 1e-12)
                    choice = cand[pick[np.argmin(np.abs(cand[pick]))]]
                    trial = delta.copy()
                    trial[g, c] = choice
                    new_pred = _argmax(z, trial[gi])
                    new_tp, _ = tpr_table(new_pred, y, gi, n_groups, n_classes)
                    new_score = float(score(new_tp))
                    if new_score < current - 1e-12:  # confirmed with the exact argmax
                        delta, pred, tp, current = trial, new_pred, new_tp, new_score
                        improved = True
        if not improved:
            break
    after = {"tpr_gap_rms": float(_gap(tp, pos, counted)), "error": float(1 - tp.sum() / n)}
    stats = {"fitted_on": "validation", "rows": int(n), "weight": float(weight),
             "min_cell": int(min_cell), "sweeps": sweeps, "before": before, "after": after}
    return GroupOffsets(names, delta.tolist(), stats)


def _candidates(t: np.ndarray, current: float) -> np.ndarray:
    """Offset values between consecutive change points (and beyond both ends), current kept."""
    u = np.unique(t[np.isfinite(t)])
    if u.size == 0:
        return np.zeros(0)
    pad = max(1e-3, 1e-3 * float(np.abs(u).max()))
    cand = np.concatenate([[u[0] - pad], (u[:-1] + u[1:]) / 2, [u[-1] + pad]])
    if cand.size > MAX_CANDIDATES:
        cand = cand[np.linspace(0, cand.size - 1, MAX_CANDIDATES).round().astype(int)]
    return np.unique(np.concatenate([cand, [current]]))


def fit(model: nn.Module, validation: ValidationData, *, weight: float, batch_size: int = 128,
        device: torch.device | str = "cpu") -> GroupOffsets | None:
    """Fit ``model``'s offsets on the validation split (``None`` when it has no groups)."""
    from nas_fair.modeling import predict_logits

    if not isinstance(validation, ValidationData):
        raise UserError(
            "post-processing is fitted on the validation split (ValidationData) only, got "
            f"{type(validation).__name__}"
        )
    if validation.groups is None or len(validation) == 0:
        return None
    logits = predict_logits(model, validation.input_ids, validation.attention_mask,
                            batch_size=batch_size, device=device)
    return fit_group_offsets(logits.numpy(), validation.labels.numpy(), validation.groups,
                             weight=weight)

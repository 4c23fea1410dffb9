"""Typed records of what a study stores: its own user attributes, a trial's, the reference's scores.

Optuna keeps both as JSON under string keys; these dataclasses name every key the search writes,
so readers use attributes instead of repeating the keys. ``to_attrs()`` gives back exactly the
stored names and JSON values; a field left at None is a key the record does not hold (older
studies lack some). Keys the record does not know, and known keys stored as JSON null, are kept
in ``extra`` so that old and future studies load and write back unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol, TypeVar


class _HasUserAttrs(Protocol):
    @property
    def user_attrs(self) -> dict[str, Any]: ...


def _split(cls: type, attrs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(known keys with a value, everything else): a known key stored as null stays in extra,
    where None would otherwise read as "absent" and drop it on the way back."""
    names = {f.name for f in fields(cls)} - {"extra"}
    known = {k: v for k, v in attrs.items() if k in names and v is not None}
    extra = {k: v for k, v in attrs.items() if k not in known}
    return known, extra


_R = TypeVar("_R", bound="_Record")


class _Record:
    """What both records share: read from a stored dictionary, write back the same one."""

    extra: dict[str, Any]

    @classmethod
    def from_attrs(cls: type[_R], attrs: Mapping[str, Any]) -> _R:
        known, extra = _split(cls, attrs)
        return cls(**known, extra=extra)

    @classmethod
    def coerce(cls: type[_R], attrs: _R | Mapping[str, Any]) -> _R:
        """A record as is, or one read from its stored dictionary."""
        return attrs if isinstance(attrs, cls) else cls.from_attrs(attrs)

    def to_attrs(self) -> dict[str, Any]:
        """The stored names and JSON values, in field order (the order the search writes)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**{k: v for k, v in out.items() if v is not None}, **self.extra}

    def write(self, target: Any) -> None:
        """Set every attribute this record holds on ``target`` (a running trial, or a study)."""
        for key, value in self.to_attrs().items():
            target.set_user_attr(key, value)


@dataclass(frozen=True)
class TrialRecord(_Record):
    """Every user attribute a trial writes (search/session.py, run.py, retry.py, fidelity.py)."""

    # Who ran it and with what (set before the trial's work, so a retry can tell).
    worker: dict[str, Any] | None = None
    runtime: dict[str, Any] | None = None  # {"threads", "torch"}: export rebuilds with these
    # Measurements (Session.score).
    size_bytes: int | None = None
    params: int | None = None
    latency: dict[str, Any] | None = None
    accuracy_ci: list[float | None] | None = None
    bias: dict[str, dict[str, Any]] | None = None  # every recorded bias metric
    bias_ci: list[float | None] | None = None  # of the study's bias objective
    collapse: dict[str, Any] | None = None
    # Per class: TPR and count per group with intervals, the gap; the training-share view.
    class_rates: dict[str, Any] | None = None
    disparity: dict[str, Any] | None = None
    disparity_stats: dict[str, Any] | None = None  # Wilson intervals, between-group tests
    test_predictions: dict[str, Any] | None = None  # search/audit.py encode_predictions
    # Feasibility, post-processing, the saved model, cost.
    constraints: list[float] | None = None
    postprocess: dict[str, Any] | None = None
    artifact: str | None = None
    predictions_sha256: str | None = None
    cost: dict[str, float] | None = None
    same_recipe_as: int | None = None
    # Queue marks (enqueue_trial) and outcomes.
    anchor: bool | None = None
    retry_of: int | None = None
    fidelity: dict[str, Any] | None = None  # a promotion ticket: {"rung", "candidate", ...}
    duplicate_of: int | None = None
    error: str | None = None
    skipped: str | None = None
    interrupted: bool | None = None
    threads: int | None = None  # studies made before "runtime" stored the thread count here
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_trial(cls, trial: _HasUserAttrs) -> TrialRecord:
        """The record of a trial (frozen or running) as stored now."""
        return cls.from_attrs(trial.user_attrs)

    def without(self, keys: Iterable[str]) -> TrialRecord:
        """This record less ``keys`` (fields or extra keys)."""
        keys = set(keys)
        names = {f.name for f in fields(self)} - {"extra"}
        return replace(self, **{k: None for k in keys & names},
                       extra={k: v for k, v in self.extra.items() if k not in keys})

    @property
    def thread_count(self) -> int | None:
        """The thread count the trial ran with ("runtime", else the older "threads" key)."""
        return (self.runtime or {}).get("threads") or self.threads

    @property
    def feasible(self) -> bool:
        """Every stored constraint <= 0 (a trial without constraints counts as feasible)."""
        return all(c <= 0 for c in (self.constraints or []))

    @property
    def collapsed(self) -> bool:
        return bool((self.collapse or {}).get("collapsed", False))


@dataclass(frozen=True)
class ReferenceRecord(_Record):
    """The reference model's scores, stored once as the study's ``reference`` user attribute.

    ``bias`` holds every recorded bias metric (the scores' attributes override the objective of
    that name); the objective itself is ``values[3]``."""

    values: list[float] | None = None
    size_mb: float | None = None
    latency_ms: float | None = None
    accuracy: float | None = None
    bias: dict[str, dict[str, Any]] | None = None
    size_bytes: int | None = None
    params: int | None = None
    latency: dict[str, Any] | None = None
    accuracy_ci: list[float | None] | None = None
    bias_ci: list[float | None] | None = None
    collapse: dict[str, Any] | None = None
    class_rates: dict[str, Any] | None = None  # as TrialRecord.class_rates
    test_predictions: dict[str, Any] | None = None
    timings: dict[str, float] | None = None
    predictions_sha256: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_study(cls, study: _HasUserAttrs) -> ReferenceRecord:
        """The study's stored reference (KeyError when none is stored yet)."""
        stored = StudyRecord.from_study(study).reference
        if stored is None:
            raise KeyError("reference")
        return cls.from_attrs(stored)

    @property
    def collapsed(self) -> bool:
        return bool((self.collapse or {}).get("collapsed", False))


@dataclass(frozen=True)
class StudyRecord(_Record):
    """Every user attribute the search writes on the study itself (search/run.py).

    Written when the study is created (``population_size`` to ``anchors``), then once each by
    the worker that queues the anchors and the one that scores the reference."""

    population_size: int | None = None  # NSGA-II's, fixed for the study's life
    fingerprint: str | None = None  # of the definition: a changed TOML is refused
    config: dict[str, Any] | None = None  # the definition, as JSON
    nas_fair_version: str | None = None  # every worker must run this one
    anchors: list[dict[str, Any]] | None = None  # params of the trials to run first
    anchors_queued: bool | None = None
    reference: dict[str, Any] | None = None  # ReferenceRecord's stored dict
    # trial number -> the front's latency re-timed side by side at the end of a run (retime.py)
    retimed: dict[str, dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_study(cls, study: _HasUserAttrs) -> StudyRecord:
        """The study's record as stored now (read from the storage on every call)."""
        return cls.from_attrs(study.user_attrs)

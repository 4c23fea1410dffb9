"""The Python API: the ``nas-fair`` commands as functions that return objects.

``optimize`` (``nas-fair search``; ``nas_fair.search`` is the package of the search driver, so
the function has another name), ``pareto``, ``export``, ``report`` and ``load`` take the CLI's
options under the same names and check them with the same code: bad input raises
:class:`nas_fair.errors.UserError` with the CLI's one-line message. They print nothing unless
``progress=True``: messages go to the ``nas_fair`` logger (silent unless logging is configured).

The core imports no plugin at import time, so this module imports only the standard library
here and ``nas_fair.search`` inside each function: ``import nas_fair`` stays cheap.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import logging
import math
import numbers
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from nas_fair.errors import UserError

if TYPE_CHECKING:
    import optuna
    import torch

    from nas_fair.config import StudyConfig

__all__ = ["FrontModel", "SearchResult", "compress", "export", "load", "optimize", "pareto",
           "report"]

logger = logging.getLogger("nas_fair")
logger.addHandler(logging.NullHandler())  # a library stays silent unless logging is configured


# --------------------------------------------------------------------------- result objects


@dataclass(frozen=True)
class FrontModel:
    """One trial of the Pareto table (the rows ``nas-fair pareto`` prints).

    ``size_mb``, ``latency_ms``, ``accuracy`` and ``bias`` are the four objectives under fixed
    names; ``objectives`` has the same values under the study's own metric names (for example
    ``macro_f1``, ``tpr_gap_rms``) and ``ratios`` each value over the reference's. ``on_front``
    is False for an infeasible trial no other trial dominates (listed after the front, as the
    table does); ``note`` is the table's note ("collapsed", "infeasible: ...").
    """

    trial: int
    params: dict[str, Any]
    size_mb: float
    latency_ms: float
    accuracy: float
    bias: float
    objectives: dict[str, float]
    ratios: dict[str, float | None]
    accuracy_ci: tuple[float, float] | None
    bias_ci: tuple[float, float] | None
    feasible: bool
    on_front: bool
    collapsed: bool
    violated: tuple[str, ...]
    note: str
    params_count: int | None

    @classmethod
    def _from_row(cls, row: Mapping[str, Any]) -> FrontModel:
        from nas_fair.objectives.scores import OBJECTIVE_KEYS

        def ci(value: Any) -> tuple[float, float] | None:
            return None if not value or value[0] is None else (float(value[0]), float(value[1]))

        return cls(
            trial=int(row["trial"]),
            params=dict(row["recipe"]),
            **{k: float(row[k]["value"]) for k in OBJECTIVE_KEYS},
            objectives={row[k]["name"]: float(row[k]["value"]) for k in OBJECTIVE_KEYS},
            ratios={k: row[k]["ratio"] for k in OBJECTIVE_KEYS},
            accuracy_ci=ci(row["accuracy"].get("ci")),
            bias_ci=ci(row["bias"].get("ci")),
            feasible=bool(row["feasible"]),
            on_front=bool(row["on_front"]),
            collapsed=bool(row["collapsed"]),
            violated=tuple(row["violated"]),
            note=str(row["note"]),
            params_count=row.get("params_count"),
        )

    def to_dict(self) -> dict[str, Any]:
        """One flat row (for ``pandas.DataFrame([m.to_dict() for m in front])``): the
        objectives, their ratios to the reference (``<name>_ratio``), the intervals, the
        status, then every parameter under its own name (``pruning.ffn``, ...)."""
        row: dict[str, Any] = {"trial": self.trial, "size_mb": self.size_mb,
                               "latency_ms": self.latency_ms, "accuracy": self.accuracy,
                               "bias": self.bias}
        row.update({f"{k}_ratio": v for k, v in self.ratios.items()})
        row.update({"accuracy_ci": self.accuracy_ci, "bias_ci": self.bias_ci,
                    "feasible": self.feasible, "on_front": self.on_front,
                    "collapsed": self.collapsed, "note": self.note,
                    "params_count": self.params_count})
        row.update(self.params)
        return row


@dataclass(frozen=True)
class SearchResult:
    """What :func:`optimize` did: the study, where it lives, and its Pareto table afterwards."""

    study_name: str
    storage: str  # the storage URL, password shown as ***
    run_dir: Path  # the run folder (reference cache, saved models, default storage)
    study: optuna.Study
    n_trials: int  # trials completed during this call (by any worker on the storage)
    completed_trials: int  # complete trials in the study now
    front: list[FrontModel]  # as pareto(): the feasible front, then infeasible non-dominated
    messages: list[str] = field(default_factory=list)  # what the CLI would have printed
    warnings: list[str] = field(default_factory=list)  # those of messages that are warnings


# --------------------------------------------------------------------------- shared plumbing


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Offline, with no transformers progress bars, optuna INFO lines or optuna experimental
    warnings, for the duration (restored after): the CLI and the API run under it."""
    # Offline by design: nothing may reach a model or data hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import warnings

    import optuna
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # per-load "Loading weights" bars are noise here
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            # Heartbeats and metric names are marked experimental; they are used on purpose.
            warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def check_not_empty(values: Mapping[str, Any]) -> None:
    """``--run-dir ""`` must not mean "here": an empty string option is refused."""
    for key, value in values.items():
        if isinstance(value, str) and not value.strip():
            raise UserError(f"--{key.replace('_', '-')} must not be empty")


def number(flag: str, text: str | None) -> float | None:
    """A finite number from the option's text (None stays None)."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{flag} must be a finite number, got {text!r}") from None
    if not math.isfinite(value):
        raise UserError(f"{flag} must be a finite number, got {text!r}")
    return value


def _real(flag: str, value: Any) -> float | None:
    """An API argument the CLI parses as a float: a number (not a bool), or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UserError(f"{flag} must be a number, got {value!r}")
    return float(value)


def _text(value: Any, flag: str) -> str | None:
    """A path-like API argument as the CLI's string (None stays None)."""
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise UserError(f"{flag} must be a path or URL string, got {value!r}")
    text = os.fspath(value)
    check_not_empty({flag.lstrip("-").replace("-", "_"): text})
    return text


def load_config(study: str | None = None, config: str | os.PathLike[str] | None = None
                ) -> StudyConfig:
    """The study definition named ``study`` (``--study``) or in the file ``config``
    (``--config``); the shipped default study when neither is given."""
    from nas_fair.config import DEFAULT_STUDY, find_study, load_study

    path = config or find_study(study or DEFAULT_STUDY)
    return load_study(path)


class _Study:
    """The API's ``study`` argument, sorted into the CLI's ``--study`` / ``--config`` (no I/O
    here: it is loaded after the other options are checked, in the CLI's order)."""

    def __init__(self, study: Any) -> None:
        from nas_fair.config import StudyConfig

        self.cfg: StudyConfig | None = None
        self.loaded: StudyConfig | None = None  # what load() last returned
        self.study: str | None = None
        self.config: str | None = None
        if isinstance(study, StudyConfig):
            self.cfg = study
            if study.source is not None:
                self.config = str(study.source)
            else:
                self.study = study.name
        elif isinstance(study, os.PathLike) or (isinstance(study, str) and (
                study.endswith(".toml") or "/" in study or os.sep in study)):
            self.config = os.fspath(study)
            check_not_empty({"config": self.config})
        elif isinstance(study, str):
            self.study = study
            check_not_empty({"study": study})
        else:
            raise UserError("study must be a study name, a path to its TOML file or a "
                            f"StudyConfig, got {study!r}")

    def load(self) -> StudyConfig:
        if self.cfg is not None:
            cfg = copy.deepcopy(self.cfg)  # the options change it; the caller's stays as given
            cfg.validate()
        else:
            cfg = load_config(study=self.study, config=self.config)
        self.loaded = cfg
        return cfg


def open_existing(cfg: StudyConfig, storage: str | None, run_dir: str | None
                  ) -> tuple[Path, str, optuna.Study]:
    """A study that has been run: (its run folder, storage URL, the optuna study)."""
    from nas_fair.io import read_only_dir
    from nas_fair.search.run import open_study, run_dir_for
    from nas_fair.search.storage import default_storage

    folder = run_dir_for(cfg, run_dir)
    if storage is None and not (folder / "study.db").is_file():
        raise UserError(f"study {cfg.name!r} has not been run yet (no {folder / 'study.db'}); "
                        f"run nas-fair search --study {cfg.name} --budget N first")
    # A shared, finished study (an archive, a group drive) is read without writing into it.
    url = storage or default_storage(folder.resolve(), read_only=read_only_dir(folder))
    return folder, url, open_study(cfg, url, create=False, budget=None)


class _Messages:
    """Collects the messages of a call and passes them to the ``nas_fair`` logger."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, msg: str) -> None:
        self.lines.append(msg)
        logger.log(logging.WARNING if self.is_warning(msg) else logging.INFO, "%s", msg)

    @staticmethod
    def is_warning(msg: str) -> bool:
        return msg.startswith("warning:")

    @property
    def warnings(self) -> list[str]:
        return [m for m in self.lines if self.is_warning(m)]


# --------------------------------------------------------------------------- optimize


def run_search_checked(load_cfg: Callable[[], StudyConfig], budget: Any, *, storage: str | None,
                       run_dir: str | None, device: str | None, sampler: str | None,
                       max_bias_increase: float | None, min_accuracy: float | None, jobs: Any,
                       quiet: bool, as_json: bool, show: bool,
                       on_message: Callable[[str], None] | None) -> dict[str, Any]:
    """``nas-fair search``'s checks, then the run; the CLI and :func:`optimize` both call it.

    ``load_cfg`` loads the study definition (a fresh copy) after the budget is checked."""
    from nas_fair.config import DEVICES, SAMPLERS
    from nas_fair.errors import one_of
    from nas_fair.search.run import Budget, run_search

    parsed = Budget.parse(budget)
    cfg = load_cfg()
    if sampler is not None:
        if sampler not in SAMPLERS:
            raise one_of("--sampler", sampler, SAMPLERS)
        cfg.search.sampler = sampler
    if device is not None and device not in DEVICES:
        raise one_of("--device", device, DEVICES)
    if max_bias_increase is not None:
        if not 0 <= max_bias_increase < float("inf"):  # also rejects nan
            raise UserError(f"--max-bias-increase must be >= 0, got {max_bias_increase}")
        cfg.objectives.max_bias_increase = max_bias_increase
    if min_accuracy is not None:
        if not 0 <= min_accuracy <= 1:
            raise UserError(f"--min-accuracy must be in [0, 1], got {min_accuracy}")
        cfg.objectives.min_accuracy = min_accuracy
    if isinstance(jobs, int) and not isinstance(jobs, bool) and jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {jobs}")
    return run_search(cfg, parsed, storage=storage, run_dir=run_dir, device=device,
                      quiet=quiet, as_json=as_json, jobs=jobs, show=show, on_message=on_message)


def optimize(
    study: str | os.PathLike[str] | StudyConfig = "bios",
    *,
    budget: int | str,
    storage: str | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    jobs: int = 1,
    device: str | None = None,
    sampler: str | None = None,
    min_accuracy: float | None = None,
    max_bias_increase: float | None = None,
    progress: bool = False,
) -> SearchResult:
    """Run or resume a study (``nas-fair search``) and return what it did and its Pareto front.

    ``study``: a name (``./studies/NAME.toml`` or a shipped study), a path to a TOML file, or a
    ``StudyConfig``. ``budget``: completed trials for the study in total (an int; a re-run
    finishes the rest, a larger number continues) or a duration for this call ("45m", "2h").
    The other options are the CLI's. Quiet unless ``progress=True`` (the CLI's output less its
    final table); messages are kept in the result either way. Bad input raises ``UserError``
    before anything is written.
    """
    import optuna
    import torch

    from nas_fair.search.storage import shown_url

    storage, folder_text = _text(storage, "--storage"), _text(run_dir, "--run-dir")
    check_not_empty({"budget": budget, "device": device, "sampler": sampler})
    if isinstance(budget, bool) or not isinstance(budget, (int, str)):
        raise UserError(f"--budget must be a number of trials (e.g. 8) or a duration (e.g. 45m, "
                        f"2h), got {budget!r}")
    limits = (_real("--max-bias-increase", max_bias_increase),
              _real("--min-accuracy", min_accuracy))
    named = _Study(study)
    messages = _Messages()
    started = datetime.datetime.now()
    threads = torch.get_num_threads()  # a study's [search] threads must not outlive the call
    try:
        with quiet_libraries():
            rows = run_search_checked(
                named.load, budget, storage=storage, run_dir=folder_text, device=device,
                sampler=sampler, max_bias_increase=limits[0], min_accuracy=limits[1], jobs=jobs,
                quiet=not progress, as_json=False, show=False, on_message=messages)
            cfg = named.loaded
            assert cfg is not None
            folder, url, opened = open_existing(cfg, storage, folder_text)
    finally:
        torch.set_num_threads(threads)
    complete = opened.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    new = sum(t.datetime_complete is not None and t.datetime_complete >= started
              for t in complete)
    return SearchResult(
        study_name=cfg.name, storage=shown_url(url), run_dir=folder.resolve(),
        study=opened, n_trials=new, completed_trials=len(complete),
        front=[FrontModel._from_row(r) for r in rows["pareto"]],
        messages=list(messages.lines), warnings=messages.warnings)


# --------------------------------------------------------------------------- pareto


def pareto_table(load_cfg: Callable[[], StudyConfig], *, storage: str | None, run_dir: str | None,
                 sort: str, max_bias_increase: str | None, min_accuracy: str | None
                 ) -> dict[str, Any]:
    """``nas-fair pareto``'s table as data; every option is checked before the study opens."""
    from nas_fair.objectives.scores import directions, objective_names
    from nas_fair.search.table import check_limits, pareto_rows, sort_index

    max_bias = number("--max-bias-increase", max_bias_increase)
    min_acc = number("--min-accuracy", min_accuracy)
    check_limits(max_bias, min_acc)
    cfg = load_cfg()
    sort_index(sort, objective_names(cfg))
    _, _, opened = open_existing(cfg, storage, run_dir)
    return pareto_rows(opened, directions(cfg), objective_names(cfg), sort=sort, cfg=cfg,
                       max_bias_increase=max_bias, min_accuracy=min_acc)


def _as_text(flag: str, value: Any) -> str | None:
    """A numeric API argument as the CLI's option text, so the CLI's parser checks it."""
    real = _real(flag, value)
    return None if real is None else repr(real)


def pareto(
    study: str | os.PathLike[str] | StudyConfig = "bios",
    *,
    storage: str | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    sort: str = "size",
    max_bias_increase: float | None = None,
    min_accuracy: float | None = None,
) -> list[FrontModel]:
    """The Pareto table of a study that has been run (``nas-fair pareto``): the feasible front,
    then the infeasible trials no trial dominates (``on_front=False``), each group best first
    by ``sort`` (size, latency, accuracy, bias or an objective's name). The filters keep
    trials within the reference's bias CI upper end + ``max_bias_increase`` and with accuracy
    at least ``min_accuracy``, and the front is computed among those."""
    storage, folder_text = _text(storage, "--storage"), _text(run_dir, "--run-dir")
    check_not_empty({"sort": sort})
    limits = (_as_text("--max-bias-increase", max_bias_increase),
              _as_text("--min-accuracy", min_accuracy))
    named = _Study(study)
    with quiet_libraries():
        rows = pareto_table(named.load, storage=storage, run_dir=folder_text, sort=sort,
                            max_bias_increase=limits[0], min_accuracy=limits[1])
    return [FrontModel._from_row(r) for r in rows["pareto"]]


# --------------------------------------------------------------------------- export, report


def export_checked(load_cfg: Callable[[], StudyConfig], numbers: list[int] | None, out: Path, *,
                   storage: str | None, run_dir: str | None, onnx: bool, force: bool,
                   study_args: list[str], reproduce_base: Path | None,
                   log: Callable[[str], None]) -> list[Any]:
    """``nas-fair export``'s checks (those that need no study first), then the export."""
    from nas_fair.search.export import check_destination, export_trials

    # A previous export killed while replacing `out` is put back first, so the check sees it.
    check_destination(out, force=force, onnx=onnx, log=log)
    cfg = load_cfg()
    folder, _, opened = open_existing(cfg, storage, run_dir)
    return export_trials(cfg, folder, opened, numbers, out, force=force, onnx=onnx,
                         study_args=study_args, reproduce_base=reproduce_base, log=log)


def export(
    study: str | os.PathLike[str] | StudyConfig = "bios",
    trials: int | str | FrontModel | Iterable[int | FrontModel] | None = None,
    *,
    out: str | os.PathLike[str],
    storage: str | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    onnx: bool = False,
    force: bool = False,
    progress: bool = False,
) -> list[Path]:
    """Write trials as model folders ``out/trial-<n>`` (``nas-fair export``); returns them.

    ``trials``: trial numbers (an int, "3,17", a list) or ``FrontModel`` objects; None exports
    every trial on the feasible Pareto front (``--all-pareto``). Each folder is checked to
    predict the test split as the search recorded before it appears; ``nas_fair.load`` reads
    it. A non-empty ``out`` is replaced only with ``force=True``; ``onnx=True`` adds
    ``model.onnx``. Quiet unless ``progress=True``.
    """
    from nas_fair.search.cli import parse_trials, reproduce_base, study_args_for

    out_text = _text(out, "--out")
    if out_text is None:
        raise UserError("--out is required: the folder to write one trial-<n> folder each into")
    storage, folder_text = _text(storage, "--storage"), _text(run_dir, "--run-dir")
    if isinstance(trials, (int, str, FrontModel)):
        trials = [trials]
    numbers = None if trials is None else parse_trials(",".join(
        str(t.trial if isinstance(t, FrontModel) else t) for t in trials))
    named = _Study(study)
    args = SimpleNamespace(study=named.study, config=named.config, run_dir=folder_text,
                           storage=storage)
    log = (lambda msg: print(msg, file=sys.stderr)) if progress else _Messages()
    with quiet_libraries():
        done = export_checked(named.load, numbers, Path(out_text), storage=storage,
                              run_dir=folder_text, onnx=bool(onnx), force=bool(force),
                              study_args=study_args_for(args),
                              reproduce_base=reproduce_base(args), log=log)
    return [item.path for item in done]


def compress_checked(load_cfg: Callable[[], StudyConfig], recipe: Any, out: Path, *,
                     storage: str | None, run_dir: str | None, steps: int | None, onnx: bool,
                     force: bool, study_args: list[str], reproduce_base: Path | None,
                     log: Callable[[str], None]) -> Path:
    """``nas-fair compress``: the recipe is read and checked, then the study loaded; the
    compression checks the output folder and the rest before it writes anything."""
    from nas_fair.search.compress import compress_recipe, read_recipe

    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)):
        raise UserError(f"--steps must be a whole number, got {steps!r}")
    parsed = read_recipe(recipe)
    return compress_recipe(load_cfg(), parsed, out, run_dir=run_dir, storage=storage,
                           steps=steps, onnx=onnx, force=force, study_args=study_args,
                           reproduce_base=reproduce_base, log=log)


def compress(
    study: str | os.PathLike[str] | StudyConfig = "bios",
    recipe: str | os.PathLike[str] | Mapping[str, Any] | Any = None,
    *,
    out: str | os.PathLike[str],
    steps: int | None = None,
    storage: str | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    onnx: bool = False,
    force: bool = False,
    progress: bool = False,
) -> Path:
    """Apply ``recipe`` to the study's reference and write the model folder ``out``
    (``nas-fair compress``); returns ``out``.

    ``recipe``: a ``recipe.json`` path (or the exported folder holding one), its JSON object,
    a ``nas_fair.search.recipe.Recipe``, or one trial's flat parameters
    (``{"pruning.ffn": 0.25, ...}``). ``steps`` replaces the recipe's recovery steps. The
    folder is what ``export`` writes for a trial (checked to predict the test split as
    measured); a non-empty ``out`` is replaced only with ``force=True``. A recipe from another
    nas-fair version, with unknown keys or families, or out of a family's range raises
    ``UserError`` before anything is written. Quiet unless ``progress=True``.
    """
    from nas_fair.search.cli import reproduce_base, study_args_for

    out_text = _text(out, "--out")
    if out_text is None:
        raise UserError("--out is required: the model folder to write")
    if recipe is None:
        raise UserError("--recipe is required: a recipe.json or one trial's parameters")
    if isinstance(recipe, (str, os.PathLike)):
        recipe = _text(recipe, "--recipe")
    storage, folder_text = _text(storage, "--storage"), _text(run_dir, "--run-dir")
    named = _Study(study)
    args = SimpleNamespace(study=named.study, config=named.config, run_dir=folder_text,
                           storage=storage)
    log = (lambda msg: print(msg, file=sys.stderr)) if progress else _Messages()
    with quiet_libraries():
        return compress_checked(named.load, recipe, Path(out_text), storage=storage,
                                run_dir=folder_text, steps=steps, onnx=bool(onnx),
                                force=bool(force), study_args=study_args_for(args),
                                reproduce_base=reproduce_base(args), log=log)


def report_checked(cfg: StudyConfig, out: str | None, *, storage: str | None,
                   run_dir: str | None) -> Path:
    """``nas-fair report``: the HTML report's path after writing it."""
    from nas_fair.io import read_only_dir
    from nas_fair.objectives.scores import directions, objective_names
    from nas_fair.search.report import write_report
    from nas_fair.search.run import ensure_writable_dir
    from nas_fair.search.storage import read_only_error

    folder, _, opened = open_existing(cfg, storage, run_dir)
    if not out and read_only_dir(folder):
        raise read_only_error(folder, "the report goes into it by default",
                              "give --out FILE outside it")
    path = Path(out) if out else folder / "report.html"
    if path.is_dir():
        raise UserError(f"--out {str(path)!r} is a folder; give a file, e.g. "
                        f"{path / 'report.html'}")
    ensure_writable_dir(path.parent, "the folder of --out")
    write_report(opened, directions(cfg), objective_names(cfg), path,
                 audit=report_audit(cfg, opened, storage=storage, run_dir=run_dir))
    return path


def report_audit(cfg: StudyConfig, opened: optuna.Study, *, storage: str | None,
                 run_dir: str | None) -> dict[str, Any]:
    """The report's bias audit over the feasible Pareto front of the scored trials."""
    from nas_fair.objectives.scores import directions
    from nas_fair.search.audit import audit_data, export_command, scored_trials
    from nas_fair.search.front import pareto_front

    front = pareto_front(scored_trials(opened), directions(cfg))
    return audit_data(opened, cfg, front,
                      export=export_command(cfg, storage=storage, run_dir=run_dir))


def importance_checked(load_cfg: Callable[[], StudyConfig], *, storage: str | None,
                       run_dir: str | None, objective: str, evaluator: str) -> dict[str, Any]:
    """``nas-fair importance``: the options are checked before the study is opened."""
    from nas_fair.errors import one_of
    from nas_fair.objectives.scores import directions, objective_names
    from nas_fair.search.audit import EVALUATORS, check_objectives_arg, importance

    if evaluator not in EVALUATORS:
        raise one_of("--evaluator", evaluator, EVALUATORS)
    cfg = load_cfg()
    names = objective_names(cfg)
    which = check_objectives_arg(objective, names)
    _, _, opened = open_existing(cfg, storage, run_dir)
    result = importance(opened, names, directions(cfg), objectives=which, evaluator=evaluator,
                        seed=cfg.seed)
    return {"study": cfg.name, **result}


def report(
    study: str | os.PathLike[str] | StudyConfig = "bios",
    *,
    out: str | os.PathLike[str] | None = None,
    storage: str | None = None,
    run_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Write the study's self-contained HTML report (``nas-fair report``; default
    ``<run folder>/report.html``) and return its path. Beside it,
    ``<name>-compression-identified.csv`` lists the test rows the front's models changed
    (docs/audit-report.md)."""
    out_text = _text(out, "--out")
    storage, folder_text = _text(storage, "--storage"), _text(run_dir, "--run-dir")
    cfg = _Study(study).load()
    with quiet_libraries():
        return report_checked(cfg, out_text, storage=storage, run_dir=folder_text)


# --------------------------------------------------------------------------- load


def load(directory: str | os.PathLike[str]) -> torch.nn.Module:
    """Load a model folder written by :func:`export` / ``nas-fair export`` (safetensors + JSON
    only, nothing unpickled), in eval mode; its tokenizer is
    ``AutoTokenizer.from_pretrained(directory)``. A missing or damaged file raises
    ``nas_fair.errors.UserError``: one line naming the file.

    A folder with ``postprocess.json`` (group-aware decision offsets, part of what the study
    scored) loads as a ``GroupAwareClassifier``: call it with ``groups=[...]`` (one per row);
    without them it raises a ``UserError`` naming the argument. Others load as the network.

    The folder's ``recipe.json``, when it has one, is read back through every family's config
    and validated first, and the result is the model's ``nas_fair_recipe`` (a
    ``nas_fair.search.recipe.Recipe``; None for a folder without one)."""
    from nas_fair.checkpoint import load_compressed
    from nas_fair.postprocess import for_inference
    from nas_fair.search.artifacts import RECIPE_FILE

    recipe = None
    if (Path(directory) / RECIPE_FILE).exists():
        from nas_fair.search.recipe import Recipe

        recipe = Recipe.read(directory)
    model = for_inference(load_compressed(directory))
    model.nas_fair_recipe = recipe
    return model

"""``nas-fair compress``: apply one recipe to a study's reference and export the result.

A recipe (the ``recipe.json`` an export writes, or one trial's flat parameters) becomes a
study whose search space is that single point: a copy of the study definition with every
parameter of the recipe's families fixed, one fidelity and no anchors. One trial of it runs
through the ordinary trial body (compression, recovery, evaluation, scoring) against the study's
reference (the run folder's cached one: its cache key does not include the study's name), in a
throwaway SQLite study and artifact folder in a temporary directory, and is exported as
``nas-fair export`` exports a trial (reloaded and checked to predict what was measured) into
``--out`` itself. Everything is validated before anything is written.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas_fair.errors import UserError, did_you_mean

if TYPE_CHECKING:
    from nas_fair.config import StudyConfig
    from nas_fair.search.recipe import Recipe

# The one-point study's name: its model card and recipe say where the model came from, and it
# never names a trial of the real study.
SUFFIX = "-recipe"
# The recovery settings a recipe's steps are trained with, besides the recipe itself: a recipe
# re-applied under other values recovers differently (a warning, not an error: a newly
# fine-tuned model may need them changed).
RECOVERY_KEYS = ("recovery_lr", "recovery_early_stop", "recovery_tolerance",
                 "recovery_precision", "recovery_dropout")


def read_recipe(source: str | os.PathLike[str] | Mapping[str, Any] | Recipe) -> Recipe:
    """A validated :class:`Recipe` from a file, a JSON object, or a Recipe.

    The object is either a ``recipe.json`` (it has ``params`` or ``families``) or one trial's
    flat parameters ``{"pruning.ffn": 0.25, ...}`` (families not named stay off; parameters
    not named take the family's off value)."""
    from nas_fair.search.recipe import Recipe

    if isinstance(source, Recipe):
        return _check_version(source, "the recipe")
    if isinstance(source, Mapping):
        return _from_object(source, "the recipe")
    if not isinstance(source, (str, os.PathLike)):
        raise UserError(f"--recipe must be a path to a JSON file, got {source!r}")
    path = Path(source)
    if path.is_dir():
        path = path / "recipe.json"  # an exported model folder
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"--recipe {str(path)!r}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"--recipe {str(path)!r} is a folder, not a JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"--recipe {str(path)!r} is not valid JSON ({exc})") from None
    except OSError as exc:
        raise UserError(f"--recipe {str(path)!r} cannot be read ({exc.strerror or exc})") from None
    return _from_object(data, str(path))


def _from_object(data: Any, where: str) -> Recipe:
    from nas_fair.search.recipe import Recipe
    from nas_fair.spaces import REGISTRY, configs_from_params

    if not isinstance(data, Mapping):
        raise UserError(f"{where} must hold a JSON object (a recipe.json or flat parameters "
                        f"like {{\"pruning.ffn\": 0.25}}), got {type(data).__name__}")
    if "params" in data or "families" in data:
        try:
            recipe = Recipe.from_dict(data)
        except UserError as exc:
            raise UserError(f"{where}: {str(exc).removeprefix('recipe.json: ')}") from None
        return _check_version(recipe, where)
    for key, value in data.items():
        family, dot, name = str(key).partition(".")
        if not dot:
            raise UserError(f"{where}: key {key!r} is neither a recipe.json key nor a "
                            "'family.parameter' name (e.g. 'pruning.ffn')")
        if family not in REGISTRY:
            raise UserError(f"{where}: unknown compression family {family!r} in {key!r}"
                            f"{did_you_mean(family, REGISTRY)}; available: "
                            f"{', '.join(sorted(REGISTRY))}")
        if name not in REGISTRY[family].params:
            raise UserError(f"{where}: {key!r} is not a parameter of {family}"
                            f"{did_you_mean(name, REGISTRY[family].params)}; valid: "
                            f"{', '.join(sorted(REGISTRY[family].params))}")
        if isinstance(value, (list, dict)) or value is None:
            raise UserError(f"{where}: {key!r} must be one value, got {value!r}")
    if not data:
        raise UserError(f"{where}: no parameters (give at least one, e.g. "
                        "{\"pruning.ffn\": 0.25})")
    try:
        configs = configs_from_params(data)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    order = sorted(configs, key=lambda n: REGISTRY[n].stage)
    return Recipe(params=dict(data), families={n: configs[n] for n in order})


def _check_version(recipe: Recipe, where: str) -> Recipe:
    from nas_fair import __version__

    v = recipe.nas_fair_version
    if v is not None and v != __version__:
        # Families' settings and their meaning change between versions: the same numbers
        # could build another model than the one the recipe measured.
        raise UserError(f"{where} was written by nas-fair {v}, this is {__version__}: a recipe "
                        f"is re-applied by the version that wrote it (pip install "
                        f"nas-fair=={v}), or give its flat params instead")
    return recipe


def one_point_config(cfg: StudyConfig, recipe: Recipe, steps: int | None) -> StudyConfig:
    """A copy of ``cfg`` whose search space is the recipe's single point (validated)."""
    from nas_fair.config import MAX_NAME
    from nas_fair.spaces import REGISTRY
    from nas_fair.spaces.base import Categorical

    families = dict(recipe.families)
    if not families:
        raise UserError("the recipe names no compression family (families is empty)")
    if steps is not None:
        if "distillation" not in families:
            raise UserError("--steps sets the recipe's recovery steps, but the recipe has no "
                            "distillation family (it recovers nothing); drop --steps")
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise UserError(f"--steps must be a whole number, got {steps!r}")
        try:
            families["distillation"] = REGISTRY["distillation"].config_class.from_dict(
                {**families["distillation"].to_dict(), "steps": steps})
        except UserError as exc:
            raise UserError(f"--steps {steps}: {exc}") from None
    point = copy.deepcopy(cfg)
    point.name = cfg.name[:MAX_NAME - len(SUFFIX)] + SUFFIX
    space: dict[str, Any] = {"families": list(families)}
    for family, config in families.items():
        values = config.to_dict()
        space[family] = {key: [values[key]] if isinstance(spec, Categorical)
                         else [values[key], values[key]]
                         for key, spec in REGISTRY[family].params.items()}
    point.space = space
    point.search.fidelity_steps = []  # one fidelity: the recipe's own steps
    point.search.anchors = False
    point.search.sampler = "random"  # one point: any sampler draws it
    try:
        point.validate()  # builds the families: every value checked against its family's rules
    except UserError as exc:
        raise UserError(f"the recipe does not fit study {cfg.name!r}: {exc}") from None
    return point


def _warn_differences(cfg: StudyConfig, recipe: Recipe, log: Callable[[str], None]) -> None:
    """Say when the recipe was measured under other recovery settings, seed or threads."""
    import torch

    stored = recipe.study_config or {}
    search = stored.get("search") or {}
    changed = [f"[search] {k} {search[k]!r} -> {getattr(cfg.search, k)!r}" for k in RECOVERY_KEYS
               if k in search and search[k] != getattr(cfg.search, k)]
    if recipe.seed is not None and recipe.seed != cfg.seed:
        changed.append(f"seed {recipe.seed} -> {cfg.seed}")
    # kernels differ with the thread count: the same recipe then differs in a few predictions
    ran = (recipe.runtime or {}).get("threads")
    now = cfg.search.threads or torch.get_num_threads()
    if ran is not None and ran != now:
        changed.append(f"torch threads {ran} -> {now}")
    if changed:
        log(f"warning: the recipe was measured in study {recipe.study!r} with other settings "
            f"({'; '.join(changed)}): its model recovers differently here")


def compress_recipe(
    cfg: StudyConfig,
    recipe: Recipe,
    out: Path,
    *,
    run_dir: str | None = None,
    storage: str | None = None,
    steps: int | None = None,
    onnx: bool = False,
    force: bool = False,
    study_args: Sequence[str] = (),
    reproduce_base: Path | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Apply ``recipe`` to the reference of study ``cfg`` and export the model into ``out``.

    ``storage`` / ``run_dir`` locate the study's run folder and stored reference scores (read
    when the study has been run, so ratios are against the search's reference measurement).
    ``study_args`` are the CLI arguments that name the study, paths relative to
    ``reproduce_base``, for the card's reproduce command. Returns ``out``.
    """
    import optuna
    import torch

    from nas_fair.io import read_only_dir
    from nas_fair.search.artifacts import RECIPE_FILE
    from nas_fair.search.card import relative
    from nas_fair.search.export import (
        _debris_path,
        _export_one,
        _move_into_place,
        check_destination,
    )
    from nas_fair.search.records import StudyRecord, TrialRecord
    from nas_fair.search.run import (
        ensure_writable_dir,
        make_run_dir,
        open_study,
        run_dir_for,
        shared_reference,
    )
    from nas_fair.search.session import Session, predictions_digest

    check_destination(out, force=force, onnx=onnx, log=log)
    point = one_point_config(cfg, recipe, steps)
    folder = run_dir_for(cfg, run_dir)  # the real study's: its cached reference is reused
    what = "--run-dir" if run_dir else "the run folder"
    session = Session(point, folder, quiet=True, log=log)
    ensure_writable_dir(out.parent, "the folder of --out")
    if not read_only_dir(folder):  # a shared, finished study is read as export reads it
        ensure_writable_dir(folder, what)
    _warn_differences(cfg, recipe, log)
    stored = _stored_reference(cfg, storage, folder, log)
    # Validated: from here on the run folder and a temporary folder are written.
    threads = torch.get_num_threads()
    if cfg.search.threads:
        torch.set_num_threads(cfg.search.threads)
    tmp = Path(tempfile.mkdtemp(prefix="nas-fair-compress-"))
    try:
        if not folder.exists():
            make_run_dir(folder, what)
        session.prepare()
        # Artifacts of the one-point study go to the temporary folder, never the run folder.
        session.run_dir = tmp
        study = open_study(point, f"sqlite:///{tmp / 'study.db'}", create=True, budget=None)
        # the search's measurement of this very reference (same test predictions), if any:
        # the ratios then share the search's denominator
        if stored is not None and stored.get("predictions_sha256") == predictions_digest(
                session.ref_pred):
            StudyRecord(reference=stored).write(study)
        reference = shared_reference(study, session)
        # One trial through optuna's loop; its error (not a "3 failed trials" summary) is the
        # command's, and it is not retried: the same point would fail the same way.
        study.optimize(lambda trial: session.run_trial(trial, reference), n_trials=1, catch=(),
                       gc_after_trial=False, show_progress_bar=False)
        frozen = study.get_trials(deepcopy=False)[0]
        if frozen.state != optuna.trial.TrialState.COMPLETE:
            raise UserError(f"the recipe's trial ended {frozen.state.name}: "
                            f"{TrialRecord.from_trial(frozen).error or 'no result'}")
        out.parent.mkdir(parents=True, exist_ok=True)
        dest = _debris_path(out, "tmp")
        base = reproduce_base or Path.cwd()
        # the folder's own recipe.json rebuilds it (the steps are in it), beside it
        again = ["nas-fair", "compress", *study_args, "--recipe",
                 relative(out / RECIPE_FILE, base), "--out",
                 relative(out.with_name(f"{out.name}-rebuilt"), base)]
        try:
            _export_one(session, study, frozen, dest, out, onnx=onnx, study_args=study_args,
                        log=log, base=base, reproduce=again + ["--onnx"] * onnx)
            _move_into_place(dest, out)
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        torch.set_num_threads(threads)
    return out


def _stored_reference(cfg: StudyConfig, storage: str | None, folder: Path,
                      log: Callable[[str], None]) -> dict[str, Any] | None:
    """The study's stored reference scores when it has been run (None otherwise); read before
    anything is written, so a storage that cannot be opened is an error up front."""
    import optuna

    from nas_fair.io import read_only_dir
    from nas_fair.search.records import StudyRecord
    from nas_fair.search.run import open_study
    from nas_fair.search.storage import default_storage, make_storage

    if storage is None and not (folder / "study.db").is_file():
        return None
    url = storage or default_storage(folder.resolve(), read_only=read_only_dir(folder))
    names = {s.study_name for s in optuna.get_all_study_summaries(
        make_storage(url), include_best_trial=False)}
    if cfg.name not in names:
        return None
    try:
        opened = open_study(cfg, url, create=False, budget=None)
    except UserError:  # the stored study was made from another definition of it
        log(f"study {cfg.name!r} in the storage was made from another definition: its "
            "reference scores are not reused (the reference is scored again)")
        return None
    return StudyRecord.from_study(opened).reference

"""``nas-fair export``: trials of a study as self-contained model folders with a model card.

One folder per trial, ``DIR/trial-<n>/``: the compressed model as nas-fair's checkpoint
(safetensors + JSON, loaded by ``nas_fair.load(dir)``, nothing unpickled), the tokenizer, the
recipe (``recipe.json``), the measured objectives and bias metrics (``metrics.json``) and a
Hugging Face style ``README.md``. The model comes from the artifact the search saved for the trial
or, when that is gone, is rebuilt from the trial's parameters; either way the written folder is
loaded back and must predict the held-out test split exactly as the search recorded (same sha256
of the predictions) before anything appears under ``DIR``: everything is written to a temporary
folder next to it and renamed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optuna.trial import FrozenTrial, TrialState

from nas_fair.errors import UserError
from nas_fair.io import dumps_json
from nas_fair.objectives.scores import Scores
from nas_fair.search._optuna import named_constraints
from nas_fair.search.artifacts import (
    CARD_FILE,
    CLASS_RATES_FILE,
    METRICS_FILE,
    ONNX_FILE,
    RECIPE_FILE,
)
from nas_fair.search.card import base_model_name, model_card
from nas_fair.search.records import ReferenceRecord, StudyRecord, TrialRecord

if TYPE_CHECKING:
    from nas_fair.search.recipe import Recipe


@dataclass
class Exported:
    number: int
    path: Path  # the final folder, DIR/trial-<n>
    source: str  # "artifact" (copied from the search) or "replay" (rebuilt from the recipe)


# --------------------------------------------------------------------------- input checks


def check_out(out: Path, *, force: bool) -> None:
    """Refuse before any work: an existing non-empty ``--out`` is only replaced with --force."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"--out {str(out)!r} exists and is not empty; choose another folder or "
                        "pass --force to replace it")


def check_destination(out: Path, *, force: bool, onnx: bool,
                      log: Callable[[str], None]) -> None:
    """Before any work: debris of a killed export cleaned (a replaced folder put back), the
    output folder usable, and --onnx available."""
    clean_debris(out, log)
    check_out(out, force=force)
    if onnx:
        check_onnx_available()


def check_onnx_available() -> None:
    """Before any work: --onnx needs nas-fair's exporter and the onnx packages."""
    import importlib.util

    try:
        from nas_fair.onnx_export import export_onnx  # noqa: F401
    except ModuleNotFoundError as exc:
        raise UserError(f"--onnx is not available in this installation ({exc})") from None
    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"--onnx needs {' and '.join(missing)}: pip install 'nas-fair[onnx]'")


def select_trials(study: Any, numbers: Sequence[int] | None, dirs: list[str]) -> list[FrozenTrial]:
    """The requested complete trials, or the feasible Pareto front when ``numbers`` is None."""
    from nas_fair.search.fidelity import at_top
    from nas_fair.search.front import pareto_front

    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if numbers is None:
        complete = [t for t in trials.values() if t.state == TrialState.COMPLETE]
        front = sorted(pareto_front(complete, dirs), key=lambda t: t.number)
        if not front:
            raise UserError(f"study {study.study_name!r} has no feasible Pareto-optimal trial to "
                            f"export ({len(complete)} complete trials)")
        return front
    chosen = []
    for n in numbers:
        if n not in trials:
            have = f"trials 0-{max(trials)}" if trials else "no trials"
            raise UserError(f"trial {n} does not exist in study {study.study_name!r} ({have})")
        t = trials[n]
        if t.state != TrialState.COMPLETE:
            raise UserError(f"trial {n} of study {study.study_name!r} is {t.state.name}, not "
                            "COMPLETE; only complete trials can be exported")
        if not at_top(t):
            f = TrialRecord.from_trial(t).fidelity or {}
            raise UserError(
                f"trial {n} of study {study.study_name!r} was scored at rung {f.get('rung')} "
                f"({f.get('steps')} recovery steps), below the top rung {f.get('top')}: its "
                "model is provisional; export a top-rung trial (nas-fair pareto lists them) "
                "or run the search longer")
        chosen.append(t)
    return chosen


# --------------------------------------------------------------------------- export


def export_trials(
    cfg: Any,
    run_dir: Path,
    study: Any,
    numbers: Sequence[int] | None,
    out: Path,
    *,
    force: bool = False,
    onnx: bool = False,
    study_args: Sequence[str] = (),
    reproduce_base: Path | None = None,
    log: Callable[[str], None] = print,
) -> list[Exported]:
    """Export the trials (``numbers``, or the feasible Pareto front when None) to ``out``.

    ``study_args`` are the CLI arguments that name the study (for the reproduce commands), with
    paths relative to ``reproduce_base`` (the study file's folder; default: the current one).
    """
    import torch

    from nas_fair.objectives.scores import directions
    from nas_fair.search.session import Session

    check_destination(out, force=force, onnx=onnx, log=log)
    trials = select_trials(study, numbers, directions(cfg))
    session = Session(cfg, run_dir, quiet=True, log=log)
    session.prepare()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _debris_path(out, "tmp")
    tmp.mkdir()
    threads = torch.get_num_threads()
    done: list[Exported] = []
    try:
        for t in trials:
            final = out / f"trial-{t.number}"
            source = _export_one(session, study, t, tmp / final.name, final, onnx=onnx,
                                 study_args=study_args, log=log,
                                 base=reproduce_base or Path.cwd())
            torch.set_num_threads(threads)
            done.append(Exported(t.number, final, source))
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads)
    return done


# Hidden folders beside --out while an export runs: ".<out>.tmp-…" (the new export being
# written) and ".<out>.old-…" (the previous one, moved aside by --force until the new one is in
# place). Their names carry the owner's pid and host, so a later export can tell the debris of
# a killed export from the folders of one still running.
LEGACY_DEBRIS_AGE_S = 3600  # names without a pid (older versions): stale after an hour


def _debris_path(out: Path, kind: str) -> Path:
    return out.parent / (f".{out.name}.{kind}-{uuid.uuid4().hex[:8]}-{os.getpid()}-"
                         f"{socket.gethostname()}")


def _owner_gone(path: Path, prefix: str) -> bool:
    """Whether the export that made ``path`` is no longer running (on this host)."""
    from nas_fair.search.retry import _alive

    parts = path.name[len(prefix):].split("-", 2)
    if len(parts) == 3 and parts[1].isdigit():
        return parts[2] == socket.gethostname() and not _alive(int(parts[1]))
    try:
        return time.time() - path.stat().st_mtime > LEGACY_DEBRIS_AGE_S
    except OSError:
        return False


def clean_debris(out: Path, log: Callable[[str], None]) -> None:
    """Tidy what a killed export into ``out`` left beside it: remove stale ``.tmp`` folders;
    put a previous export that only survives in an ``.old`` folder back at ``out`` (a kill
    during --force), or remove the ``.old`` folder once ``out`` holds the export replacing it."""
    parent = out.parent
    if not parent.is_dir():
        return
    for kind in ("tmp", "old"):
        prefix = f".{out.name}.{kind}-"
        stale = sorted((p for p in parent.iterdir() if p.name.startswith(prefix) and p.is_dir()
                        and _owner_gone(p, prefix)), key=lambda p: p.stat().st_mtime,
                       reverse=True)
        for path in stale:
            if kind == "old" and not out.exists():
                path.rename(out)
                log(f"restored the previous export {out} from {path.name}, left by an export "
                    "that was stopped while replacing it")
                continue
            shutil.rmtree(path, ignore_errors=True)
            what = "unfinished export" if kind == "tmp" else "replaced previous export"
            log(f"removed {path.name}, the {what} of an export that was stopped")


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` (empty, or --force) is moved aside first."""
    old = None
    if out.exists():
        old = _debris_path(out, "old")
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _export_one(session: Any, study: Any, trial: FrozenTrial, dest: Path, final: Path, *,
                onnx: bool, study_args: Sequence[str], log: Callable[[str], None],
                base: Path, reproduce: Sequence[str] | None = None) -> str:
    """``reproduce``: the command that rebuilds the model, for the card (default: search +
    export of this trial; nas-fair compress passes its own)."""
    import torch

    from nas_fair import postprocess
    from nas_fair.checkpoint import MODEL_FILE, load_compressed
    from nas_fair.search.recipe import Recipe
    from nas_fair.spaces.vocabulary import export_folder

    rec = TrialRecord.from_trial(trial)
    runtime = rec.runtime or {}
    # "threads" is where studies made before "runtime" recorded the count.
    want_threads = int(rec.thread_count or session.cfg.search.threads or 0)
    if want_threads:
        torch.set_num_threads(want_threads)  # the search's count: same kernels, same predictions
    source = _model_files(session, trial, dest, log)
    try:
        model = load_compressed(dest)  # what a user gets, not the object in memory
    except UserError as exc:
        if source != "artifact":
            raise
        log(f"trial {trial.number}: the saved model is damaged ({exc}); rebuilding it")
        shutil.rmtree(dest)
        source = _model_files(session, trial, dest, log, use_artifact=False)
        model = load_compressed(dest)
    record = session.evaluate(model)
    digest = _verify(session, trial, record, runtime)
    # the tokenizer beside the weights; a trimmed vocabulary rewrites both for its new ids
    model = export_folder(model, session.tokenizer, dest, texts=session.data.test.texts,
                          input_ids=session.tensors["test_ids"],
                          attention_mask=session.tensors["test_mask"],
                          max_length=session.cfg.model.max_length, groups=session.data.test.groups)
    weight_bytes = (dest / MODEL_FILE).stat().st_size
    if rec.size_bytes is None:
        raise KeyError("size_bytes")  # as reading the missing attribute did
    recorded = int(rec.size_bytes)
    if abs(weight_bytes - recorded) > 0.01 * recorded:
        raise UserError(f"trial {trial.number}: {MODEL_FILE} holds {weight_bytes} bytes but the "
                        f"search measured {recorded}; refusing to export a mismatched size")
    metrics = build_metrics(session, study, trial, weight_bytes)
    metrics["predictions_sha256"] = digest
    offsets = postprocess.get(model)  # part of the model's predictions when present
    metrics["postprocess"] = None if offsets is None else json.loads(
        json.dumps(offsets.to_dict(), default=float))
    recipe = build_recipe(session, study, trial)
    # strict JSON: a non-finite figure (a ratio to a zero reference, an undefined metric) is null
    (dest / METRICS_FILE).write_text(dumps_json(metrics, indent=1) + "\n")
    recipe.save(dest)
    if Recipe.read(dest) != recipe:  # what nas_fair.load reads must be what was written
        raise RuntimeError(f"trial {trial.number}: {RECIPE_FILE} does not read back as written")
    rates = write_class_rates(session, study, record, dest)
    q = recipe.families.get("quantization")
    int8 = q is not None and 8 in (q.attention_bits, q.ffn_bits)
    if onnx:
        from nas_fair.onnx_export import export_onnx

        export_onnx(model, dest / ONNX_FILE, int8=int8, max_length=session.cfg.model.max_length)
    budget = sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                 if t.number <= trial.number)
    (dest / CARD_FILE).write_text(model_card(session, metrics, recipe.to_dict(), final, study_args,
                                             budget=budget, onnx=onnx, onnx_int8=onnx and int8,
                                             base=base, class_rates=rates, reproduce=reproduce))
    how = "copied the search's saved model" if source == "artifact" else "rebuilt from its recipe"
    log(f"trial {trial.number}: {how}; reloaded, its test predictions match the search's "
        f"record (sha256 {digest[:12]})")
    return source


def write_class_rates(session: Any, study: Any, record: Any, dest: Path,
                      ) -> dict[str, Any] | None:
    """``class_rates.json``: the exported model's per-class group rates (recomputed on its
    verified test predictions, so equal to the search's record) beside the reference's."""
    rates = session.class_rates(record)
    if rates is None:  # no group column
        return None
    ref = ReferenceRecord.from_study(study).class_rates  # studies before it: recomputed
    out = {"model": rates, "reference": ref or session.class_rates(session.ref_record)}
    (dest / CLASS_RATES_FILE).write_text(dumps_json(out, indent=1) + "\n")
    return out


def _model_files(session: Any, trial: FrozenTrial, dest: Path, log: Callable[[str], None], *,
                 use_artifact: bool = True) -> str:
    """The checkpoint files of the trial in ``dest``: the saved artifact, else a replay."""
    from nas_fair.checkpoint import MODEL_FILE, save_compressed
    from nas_fair.search.artifacts import artifact_dir

    src = None
    if use_artifact and TrialRecord.from_trial(trial).artifact:
        src = artifact_dir(session.run_dir, session.cfg.name, trial.number)
    if src is not None and not src.is_symlink() and (src / MODEL_FILE).is_file():
        try:
            _copy_flat(src, dest)
            return "artifact"
        except OSError as exc:  # deleted meanwhile by a search still running: rebuild instead
            log(f"trial {trial.number}: cannot copy {src} ({exc}); rebuilding it")
            shutil.rmtree(dest, ignore_errors=True)
    if use_artifact:
        log(f"trial {trial.number}: no saved model in the run folder; rebuilding it from its "
            "recipe (compression and recovery run again)")
    model = session.replay(trial.params)
    save_compressed(model, dest, metadata={"study": session.cfg.name, "trial": trial.number,
                                           "params": trial.params})
    return "replay"


def _copy_flat(src: Path, dest: Path) -> None:
    """Copy the regular files of a checkpoint folder (it is flat); a symlink in it is an error,
    so nothing outside the run folder is read. Files get the umask's default mode."""
    from nas_fair.io import default_file_mode

    dest.mkdir()
    for f in sorted(src.iterdir()):
        if f.is_symlink() or not f.is_file():
            raise OSError(f"{f.name} is not a regular file")
        shutil.copyfile(f, dest / f.name, follow_symlinks=False)
        (dest / f.name).chmod(default_file_mode())


def _verify(session: Any, trial: FrozenTrial, record: Any, runtime: dict[str, Any]) -> str:
    """The reloaded folder must predict exactly what the search measured; returns the digest."""
    import torch

    from nas_fair.objectives import ACCURACY, BIAS
    from nas_fair.search.session import predictions_digest

    cfg = session.cfg
    digest = predictions_digest(record.y_pred)
    rec = TrialRecord.from_trial(trial)
    want = rec.predictions_sha256
    acc = ACCURACY[cfg.objectives.accuracy](record)
    bias = BIAS[cfg.objectives.bias](record)
    recorded_bias = (rec.bias or {}).get(cfg.objectives.bias, {}).get("value")
    problems = []
    if want is not None and digest != want:
        problems.append(f"predictions sha256 {digest[:12]} vs recorded {want[:12]}")
    recorded_acc = Scores.of_trial(trial).accuracy
    if acc != recorded_acc:
        problems.append(f"{cfg.objectives.accuracy} {acc!r} vs recorded {recorded_acc!r}")
    if recorded_bias is not None and bias != recorded_bias:
        problems.append(f"{cfg.objectives.bias} {bias!r} vs recorded {recorded_bias!r}")
    if not problems:
        return digest
    hint = ""
    now = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    if runtime and {k: runtime.get(k) for k in now} != now:
        hint = (f"; the search ran torch {runtime.get('torch')} on {runtime.get('threads')} "
                f"threads, this export torch {now['torch']} on {now['threads']}: export with the "
                "search's torch version and thread count")
    raise UserError(f"trial {trial.number}: the exported model does not reproduce the study "
                    f"on the test split ({'; '.join(problems)}){hint}; nothing was written")


# --------------------------------------------------------------------------- recipe, metrics


def build_recipe(session: Any, study: Any, trial: FrozenTrial) -> Recipe:
    """Flat parameters plus every family's full config in application order."""
    from nas_fair import __version__
    from nas_fair.search.recipe import Recipe
    from nas_fair.spaces import configs_from_params, off_configs
    from nas_fair.spaces.base import REGISTRY

    configs = off_configs(session.space)
    configs.update(configs_from_params(trial.params))
    order = sorted(configs, key=lambda n: REGISTRY[n].stage)
    stored = StudyRecord.from_study(study)
    return Recipe(
        nas_fair_version=__version__,
        study=session.cfg.name,
        trial=trial.number,
        seed=session.cfg.seed,
        params=dict(trial.params),
        families={n: configs[n] for n in order},
        base_model=base_model_name(session),
        reference_finetuned=bool(session.reference_info.get("finetuned")),
        study_fingerprint=stored.fingerprint,
        study_config=stored.config,
        runtime=TrialRecord.from_trial(trial).runtime,
    )


def _ratio(value: float | None, ref: float | None) -> float | None:
    return None if value is None or not ref else value / ref


def build_metrics(session: Any, study: Any, trial: FrozenTrial,
                  weight_bytes: int) -> dict[str, Any]:
    """The study's record of this trial and of the reference, side by side, with ratios."""
    from nas_fair.objectives.scores import directions, objective_names
    from nas_fair.search.front import pareto_front

    cfg = session.cfg
    attrs = TrialRecord.from_trial(trial)
    ref = ReferenceRecord.from_study(study)
    names = objective_names(cfg)
    dirs = directions(cfg)
    objectives: dict[str, Any] = {}
    for i, name in enumerate(names):
        value, refv = trial.values[i], (ref.values or [])[i]
        objectives[name] = {"value": value, "reference": refv, "ratio": _ratio(value, refv),
                            "direction": dirs[i]}
    size, latency, acc, bias = (objectives[n] for n in names)
    size.update(bytes=attrs.size_bytes, reference_bytes=ref.size_bytes,
                exported_weight_bytes=weight_bytes)
    latency.update(detail=attrs.latency, reference_detail=ref.latency,
                   batch_size=cfg.search.batch_size, seq_len=cfg.search.seq_len)
    acc.update(ci=attrs.accuracy_ci, reference_ci=ref.accuracy_ci)
    bias.update(metric=cfg.objectives.bias, ci=attrs.bias_ci,
                reference_ci=ref.bias_ci,
                signed=names[3] != cfg.objectives.bias)  # objective = |value| of a signed gap
    constraints = dict(sorted(named_constraints(trial).items()))
    if not constraints:
        constraints = {str(i): v for i, v in enumerate(attrs.constraints or [])}
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    front = {t.number for t in pareto_front(complete, dirs)}
    return {
        "study": cfg.name,
        "trial": trial.number,
        "objectives": objectives,
        "params": {"value": attrs.params, "reference": ref.params,
                   "ratio": _ratio(attrs.params, ref.params)},
        "bias": attrs.bias,
        "reference_bias": ref.bias,
        "collapse": attrs.collapse,
        "reference_collapse": ref.collapse,
        "disparity": attrs.disparity,
        "disparity_stats": attrs.disparity_stats,
        "constraints": constraints,
        "feasible": all(v <= 0 for v in constraints.values()),
        "on_pareto_front": trial.number in front,
        "test_rows": len(session.data.test),
        "predictions_sha256": attrs.predictions_sha256,
        "reference_predictions_sha256": ref.predictions_sha256,
        "cost_s": attrs.cost,
    }


# --------------------------------------------------------------------------- model card

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
import shlex
import shutil
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from nas_fair.errors import UserError
from nas_fair.io import dumps_json
from nas_fair.spaces.postprocess import DISPARATE_TREATMENT

RECIPE_FILE = "recipe.json"
METRICS_FILE = "metrics.json"
CARD_FILE = "README.md"
ONNX_FILE = "model.onnx"
NEEDS_GROUP_TITLE = "Needs the sensitive attribute at inference"
# The bundled package's folder holds this Hugging Face model (see nas_fair.config.BUNDLED_MODEL).
BUNDLED_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass
class Exported:
    number: int
    path: Path  # the final folder, DIR/trial-<n>
    source: str  # "artifact" (copied from the search) or "replay" (rebuilt from the recipe)


# --------------------------------------------------------------------------- the search's side


def drop_stale_artifacts(run_dir: Path, study: str, trials: Iterable[FrozenTrial], *,
                         keep: set[int]) -> None:
    """Delete saved models of finished trials outside ``keep`` (the Pareto front), best effort.

    A complete trial off the front never re-enters it (what dominates it stays in the study), so
    disk use stays bounded by the front; RUNNING trials are never touched. The folder comes from
    the study name and trial number (``artifact_dir``), not from the path stored in the trial.
    """
    from nas_fair.search.study import artifact_dir

    for t in trials:
        if (t.user_attrs.get("artifact") and t.number not in keep
                and t.state in (TrialState.COMPLETE, TrialState.FAIL)):
            target = artifact_dir(run_dir, study, t.number)
            if target is not None:
                shutil.rmtree(target, ignore_errors=True)  # refuses a symlink: nothing followed


# --------------------------------------------------------------------------- input checks


def parse_trials(text: str) -> list[int]:
    """``"3,17"`` -> [3, 17]: comma-separated trial numbers, each once."""
    parts = [p.strip() for p in str(text).split(",")]
    if not parts or not all(p.isdigit() for p in parts):
        raise UserError(f"--trials must be comma-separated trial numbers like 3,17, got {text!r}")
    return list(dict.fromkeys(int(p) for p in parts))


def check_out(out: Path, *, force: bool) -> None:
    """Refuse before any work: an existing non-empty ``--out`` is only replaced with --force."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"--out {str(out)!r} exists and is not empty; choose another folder or "
                        "pass --force to replace it")


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
    from nas_fair.search.study import pareto_front

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

    from nas_fair.search.study import Session, directions

    check_out(out, force=force)
    if onnx:
        check_onnx_available()
    trials = select_trials(study, numbers, directions(cfg))
    session = Session(cfg, run_dir, quiet=True, log=log)
    session.prepare()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
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


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` (empty, or --force) is moved aside first."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
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
                base: Path) -> str:
    import torch

    from nas_fair.checkpoint import MODEL_FILE, load_compressed
    from nas_fair.spaces import postprocess
    from nas_fair.spaces.vocabulary import export_folder

    runtime = trial.user_attrs.get("runtime") or {}
    # "threads" is where studies made before "runtime" recorded the count.
    want_threads = int(runtime.get("threads") or trial.user_attrs.get("threads")
                       or session.cfg.search.threads or 0)
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
    recorded = int(trial.user_attrs["size_bytes"])
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
    (dest / RECIPE_FILE).write_text(dumps_json(recipe, indent=1) + "\n")
    if onnx:
        from nas_fair.onnx_export import export_onnx

        q = recipe["families"].get("quantization", {})
        int8 = 8 in (q.get("attention_bits"), q.get("ffn_bits"))
        export_onnx(model, dest / ONNX_FILE, int8=int8, max_length=session.cfg.model.max_length)
    budget = sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                 if t.number <= trial.number)
    (dest / CARD_FILE).write_text(model_card(session, metrics, recipe, final, study_args,
                                             budget=budget, onnx=onnx, base=base))
    how = "copied the search's saved model" if source == "artifact" else "rebuilt from its recipe"
    log(f"trial {trial.number}: {how}; reloaded, its test predictions match the search's "
        f"record (sha256 {digest[:12]})")
    return source


def _model_files(session: Any, trial: FrozenTrial, dest: Path, log: Callable[[str], None], *,
                 use_artifact: bool = True) -> str:
    """The checkpoint files of the trial in ``dest``: the saved artifact, else a replay."""
    from nas_fair.checkpoint import MODEL_FILE, save_compressed
    from nas_fair.search.study import artifact_dir

    src = None
    if use_artifact and trial.user_attrs.get("artifact"):
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
    from nas_fair.search.study import predictions_digest

    cfg = session.cfg
    digest = predictions_digest(record.y_pred)
    want = trial.user_attrs.get("predictions_sha256")
    acc = ACCURACY[cfg.objectives.accuracy](record)
    bias = BIAS[cfg.objectives.bias](record)
    recorded_bias = (trial.user_attrs.get("bias") or {}).get(cfg.objectives.bias, {}).get("value")
    problems = []
    if want is not None and digest != want:
        problems.append(f"predictions sha256 {digest[:12]} vs recorded {want[:12]}")
    if acc != trial.values[2]:
        problems.append(f"{cfg.objectives.accuracy} {acc!r} vs recorded {trial.values[2]!r}")
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


def build_recipe(session: Any, study: Any, trial: FrozenTrial) -> dict[str, Any]:
    """Flat parameters plus every family's full config in application order."""
    from nas_fair import __version__
    from nas_fair.spaces import configs_from_params, off_configs
    from nas_fair.spaces.base import REGISTRY

    configs = off_configs(session.space)
    configs.update(configs_from_params(trial.params))
    order = sorted(configs, key=lambda n: REGISTRY[n].stage)
    return {
        "nas_fair_version": __version__,
        "study": session.cfg.name,
        "trial": trial.number,
        "seed": session.cfg.seed,
        "params": dict(trial.params),
        "order": order,
        "families": {n: configs[n].to_dict() for n in order},
        "off": {n: configs[n].to_dict() == REGISTRY[n].off().to_dict() for n in order},
        "base_model": base_model_name(session),
        "reference_finetuned": bool(session.reference_info.get("finetuned")),
        "study_fingerprint": study.user_attrs.get("fingerprint"),
        "study_config": study.user_attrs.get("config"),
        "runtime": trial.user_attrs.get("runtime"),
    }


def _ratio(value: float | None, ref: float | None) -> float | None:
    return None if value is None or not ref else value / ref


def build_metrics(session: Any, study: Any, trial: FrozenTrial,
                  weight_bytes: int) -> dict[str, Any]:
    """The study's record of this trial and of the reference, side by side, with ratios."""
    from nas_fair.search.study import directions, objective_names, pareto_front

    cfg = session.cfg
    attrs = trial.user_attrs
    ref = study.user_attrs["reference"]
    names = objective_names(cfg)
    dirs = directions(cfg)
    objectives: dict[str, Any] = {}
    for i, name in enumerate(names):
        value, refv = trial.values[i], ref["values"][i]
        objectives[name] = {"value": value, "reference": refv, "ratio": _ratio(value, refv),
                            "direction": dirs[i]}
    size, latency, acc, bias = (objectives[n] for n in names)
    size.update(bytes=attrs.get("size_bytes"), reference_bytes=ref.get("size_bytes"),
                exported_weight_bytes=weight_bytes)
    latency.update(detail=attrs.get("latency"), reference_detail=ref.get("latency"),
                   batch_size=cfg.search.batch_size, seq_len=cfg.search.seq_len)
    acc.update(ci=attrs.get("accuracy_ci"), reference_ci=ref.get("accuracy_ci"))
    bias.update(metric=cfg.objectives.bias, ci=attrs.get("bias_ci"),
                reference_ci=ref.get("bias_ci"),
                signed=names[3] != cfg.objectives.bias)  # objective = |value| of a signed gap
    constraints = {k.split(":", 1)[1]: v for k, v in sorted(trial.system_attrs.items())
                   if k.startswith("constraints:")}
    if not constraints:
        constraints = {str(i): v for i, v in enumerate(attrs.get("constraints", []))}
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    front = {t.number for t in pareto_front(complete, dirs)}
    return {
        "study": cfg.name,
        "trial": trial.number,
        "objectives": objectives,
        "params": {"value": attrs.get("params"), "reference": ref.get("params"),
                   "ratio": _ratio(attrs.get("params"), ref.get("params"))},
        "bias": attrs.get("bias"),
        "reference_bias": ref.get("bias"),
        "collapse": attrs.get("collapse"),
        "reference_collapse": ref.get("collapse"),
        "constraints": constraints,
        "feasible": all(v <= 0 for v in constraints.values()),
        "on_pareto_front": trial.number in front,
        "test_rows": len(session.data.test),
        "predictions_sha256": attrs.get("predictions_sha256"),
        "reference_predictions_sha256": ref.get("predictions_sha256"),
        "cost_s": attrs.get("cost"),
    }


# --------------------------------------------------------------------------- model card


# Data set names for the card's ``datasets`` metadata, per built-in task (nas_fair.data).
TASK_DATASETS: dict[str, list[str]] = {"bug-bios": ["BUG"], "winobias": ["wino_bias"]}


def relative(path: str | Path, base: Path) -> str:
    """``path`` relative to ``base`` (POSIX), so cards carry no absolute local path."""
    import os

    return Path(os.path.relpath(Path(path).resolve(), base.resolve())).as_posix()


def base_model_name(session: Any) -> str:
    """The base model as a card may name it: the Hub id of the bundled model, else the name of
    its folder (never the local absolute path)."""
    from nas_fair.config import BUNDLED_MODEL

    if session.cfg.model.path == BUNDLED_MODEL:
        return BUNDLED_HUB_ID
    return Path(session.model_path).name


def _datasets(cfg: Any) -> list[str]:
    if cfg.data.source == "file":
        base = cfg.source.parent if cfg.source else Path.cwd()
        return [relative(cfg.resolve(f), base) for f in
                (cfg.data.train, cfg.data.validation, cfg.data.test) if f]
    return TASK_DATASETS.get(cfg.data.source, [cfg.data.source])


def _base_licence(model_path: Path) -> str | None:
    """The ``license`` in the base checkpoint's own model card front matter, if it has one."""
    card = model_path / "README.md"
    try:
        text = card.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if not text.startswith("---"):
        return None
    import yaml

    try:
        meta = yaml.safe_load(text.split("---", 2)[1])
    except (yaml.YAMLError, IndexError):
        return None
    value = meta.get("license") if isinstance(meta, dict) else None
    return str(value) if value else None


def _data_text(session: Any) -> tuple[str, str]:
    """(what the data is, its licence) stated truthfully."""
    cfg = session.cfg
    data = session.data
    if cfg.data.source == "file":
        files = _datasets(cfg)  # relative to the study file
        noun = "file" if len(files) == 1 else "files"
        return (f"the user's {noun} {', '.join(files)}", "licence not recorded")
    licence = f"licence: {data.licence}" if data.licence else "licence not recorded"
    return (data.description or cfg.data.source, licence)


def _fmt(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _ci(ci: Any, digits: int = 3) -> str:
    if not ci or ci[0] is None or ci[1] is None:
        return ""
    return f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _x(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.2f}x"


def _setting(conf: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in conf.items())


def _yaml(value: Any) -> str:
    return json.dumps(value)  # JSON scalars are valid YAML


def model_card(session: Any, metrics: dict[str, Any], recipe: dict[str, Any], final: Path,
               study_args: Sequence[str], *, budget: int, onnx: bool = False,
               base: Path | None = None) -> str:
    """Hugging Face style card: YAML front matter, then what was done, measured, and how to
    load and reproduce it. ``budget``: completed trials the study needed to reach this one.
    Paths are relative (to ``base`` for the reproduce commands): a card is meant to be shared."""
    from nas_fair import __version__
    from nas_fair.config import BUNDLED_MODEL

    cfg = session.cfg
    n = metrics["trial"]
    names = list(metrics["objectives"])
    size, latency, acc, bias = (metrics["objectives"][k] for k in names)
    acc_name, bias_name = names[2], cfg.objectives.bias
    on = [f for f in recipe["order"] if not recipe["off"][f]]
    licence = _base_licence(session.model_path)
    bundled = cfg.model.path == BUNDLED_MODEL
    base_name = base_model_name(session)
    shown_base = f"{BUNDLED_HUB_ID} (package {BUNDLED_MODEL})" if bundled else base_name
    data_what, data_licence = _data_text(session)
    folder = final.name  # the model's name: the card sits in that folder
    reproduce_base = base or Path.cwd()
    offsets = [str(g) for g in (metrics.get("postprocess") or {}).get("groups", [])]

    front = ["---", "library_name: nas-fair", "pipeline_tag: text-classification"]
    # a compressed copy is a derivative of the base model: its licence, "unknown" if not stated
    front.append(f"license: {_yaml(licence or 'unknown')}")
    front.append(f"base_model: {_yaml(base_name)}")
    front.append("datasets:")
    front += [f"- {_yaml(d)}" for d in _datasets(cfg)]
    front.append("tags:")
    tags = ["nas-fair", "compressed", "bias-evaluation", *on]
    if offsets:
        tags.append("needs-sensitive-attribute")
    front += [f"- {_yaml(t)}" for t in tags]
    front += [
        "model-index:",
        f"- name: {_yaml(f'{cfg.name}-trial-{n}')}",
        "  results:",
        "  - task:",
        "      type: text-classification",
        "    dataset:",
        f"      name: {_yaml(data_what)}",
        f"      type: {_yaml(cfg.data.source)}",
        "      split: test",
        "    metrics:",
    ]
    for key, obj in (("accuracy", acc), ("bias", bias), ("size", size), ("latency", latency)):
        label = names[["size", "latency", "accuracy", "bias"].index(key)]
        front += [f"    - type: {_yaml(label)}", f"      value: {_yaml(obj['value'])}"]
    front.append("---")

    kept = acc["ratio"]
    summary = (
        f"Compressed from {shown_base} by nas-fair {__version__}: trial {n} of study `{cfg.name}` "
        f"(seed {cfg.seed}), a multi-objective search on size, latency, {acc_name} and "
        f"{bias_name}. Against the study's fine-tuned reference it is "
        f"**{_x(size['ratio'])} the size** and **{_x(latency['ratio'])} the latency**, keeps "
        f"**{_fmt(None if kept is None else 100 * kept, 1)}%** of its {acc_name}, and its "
        f"{bias_name} is {_fmt(bias['value'])} versus {_fmt(bias['reference'])}."
    )
    status = (f"On the study's feasible Pareto front: {'yes' if metrics['on_pareto_front'] else 'no'}"
              f". Feasible (not collapsed, within the study's limits): "
              f"{'yes' if metrics['feasible'] else 'no'}.")
    lines = [*front, "", f"# {cfg.name}, trial {n}: a compressed text classifier with its bias "
             "measured", "", summary, "", status, "", "## How it was compressed", "",
             "Applied in this order to a copy of the reference (a family at its identity setting "
             "is off):", "", "| family | setting |", "| --- | --- |"]
    for fam in recipe["order"]:
        text = "off" if recipe["off"][fam] else _setting(recipe["families"][fam])
        lines.append(f"| {fam} | {text} |")
    lat = latency.get("detail") or {}
    threads = lat.get("threads")
    lines += [
        "", "## Results versus the reference", "",
        f"Measured by the search on the held-out test split ({metrics['test_rows']} rows); "
        f"intervals are 95% bootstrap intervals ({cfg.search.bootstrap} resamples, stratified "
        "by class). Ratios are this model over the reference.", "",
        "| measure | this model | reference | ratio |", "| --- | --- | --- | --- |",
        f"| size (MB of weights as stored; {size['exported_weight_bytes']} bytes in "
        f"model.safetensors) | {_fmt(size['value'], 3)} | {_fmt(size['reference'], 3)} | "
        f"{_x(size['ratio'])} |",
        f"| parameters | {metrics['params']['value']} | {metrics['params']['reference']} | "
        f"{_x(metrics['params']['ratio'])} |",
        f"| latency (median ms per batch of {cfg.search.batch_size} x {cfg.search.seq_len} tokens"
        f"{f', {threads} threads' if threads else ''}) | {_fmt(latency['value'], 1)} | "
        f"{_fmt(latency['reference'], 1)} | {_x(latency['ratio'])} |",
        f"| {acc_name} | {_fmt(acc['value'])}{_ci(acc.get('ci'))} | "
        f"{_fmt(acc['reference'])}{_ci(acc.get('reference_ci'))} | {_x(acc['ratio'])} |",
    ]
    brow = (metrics["bias"] or {}).get(bias_name, {})
    rbrow = (metrics["reference_bias"] or {}).get(bias_name, {})
    objective_note = " (objective: its absolute value)" if bias.get("signed") else ""
    lines.append(
        f"| {bias_name}{objective_note} | {_fmt(brow.get('value'))}{_ci(bias.get('ci'))} | "
        f"{_fmt(rbrow.get('value'))}{_ci(bias.get('reference_ci'))} | {_x(bias['ratio'])} |")
    lines += ["", "Every bias metric the study recorded (p: permutation-null p-value of an "
              "absolute gap; difference: paired, same resamples as the reference):", "",
              "| metric | this model [95% CI] | p | reference | difference [95% CI] |",
              "| --- | --- | --- | --- | --- |"]
    for name, row in sorted((metrics["bias"] or {}).items()):
        diff = row.get("diff")
        lines.append(
            f"| {name} | {_fmt(row.get('value'))}{_ci([row.get('ci_low'), row.get('ci_high')])} "
            f"| {_fmt(row.get('p_value'))} | {_fmt(row.get('ref_value'))} | "
            f"{_fmt(diff)}{_ci([row.get('diff_low'), row.get('diff_high')])} |")
    collapse = metrics.get("collapse") or {}
    cons = ", ".join(f"{k} {v:.3g}" for k, v in metrics["constraints"].items())
    lines += [
        "",
        "Collapse check: " + (f"**collapsed** ({collapse.get('reason')})"
                              if collapse.get("collapsed") else "not collapsed") + ".",
        f"Constraints (<= 0 is feasible): {cons or 'none'}.",
        "", "## Data", "",
        f"Task data: {data_what}; {data_licence}. Classes: "
        f"{', '.join(session.data.label_names)}. The figures above are measured on its held-out "
        f"test split only; the test predictions' sha256 is `{metrics['predictions_sha256']}`.",
        "", "## Base model", "",
        f"{shown_base}; licence: {licence or 'not recorded in its model card'}. "
        + ("Fine-tuned for this task by nas-fair before compression."
           if recipe["reference_finetuned"] else "Used with its own classification head."),
        "", "## Use", "",
        "```python",
        "import nas_fair",
        "from transformers import AutoTokenizer",
        "",
        f"# run beside this folder ({folder}); safetensors + JSON only, nothing is unpickled",
        f"model = nas_fair.load({folder!r})",
        f"tokenizer = AutoTokenizer.from_pretrained({folder!r})",
        f"batch = tokenizer([\"some text\"], truncation=True, max_length={cfg.model.max_length}, "
        "padding=True, return_tensors=\"pt\")",
    ]
    if offsets:
        lines += [
            "# group-aware decisions (postprocess.json): each row's group is required",
            "logits = model(input_ids=batch[\"input_ids\"], "
            f"attention_mask=batch[\"attention_mask\"], groups=[{offsets[0]!r}]).logits",
            "label = model.config.id2label[int(logits.argmax(-1))]",
        ]
    else:
        lines.append("logits = model(input_ids=batch[\"input_ids\"], "
                     "attention_mask=batch[\"attention_mask\"]).logits")
        lines.append("label = model.config.id2label[int(logits.argmax(-1))]")
    lines += [
        "```",
        "",
        f"Loading needs nas-fair {__version__} (its compressed modules rebuild the architecture "
        "from structure.json); plain `transformers` cannot load this folder.",
    ]
    if offsets:
        lines += ["", f"## {NEEDS_GROUP_TITLE}", "",
                  f"Its predictions include group-aware decision offsets fitted on the "
                  f"validation split (groups: {', '.join(offsets)}): {DISPARATE_TREATMENT}. "
                  "The test figures above were computed with each row's group; "
                  "`nas_fair.load` refuses to predict without `groups=`, and the ONNX export "
                  "takes each row's group as the input `group_index`. A study can forbid "
                  "such models: `[search] allow_group_postprocessing = false`."]
    if onnx:
        inputs = "`input_ids`, `attention_mask`" + (
            ", `group_index` (position of the row's group in the metadata's `nas_fair.groups`, "
            "-1 for another group)" if offsets else "")
        lines.append(f"`{ONNX_FILE}` is the same model exported to ONNX (inputs {inputs}; "
                     "output `logits`), int8 as in torch, one activation scale per row.")
    search = ["nas-fair", "search", *study_args, "--budget", str(budget)]
    export = ["nas-fair", "export", *study_args, "--trials", str(n), "--out",
              relative(final.parent, reproduce_base)]
    if onnx:
        export.append("--onnx")
    lines += [
        "", "## Reproduce", "",
        "```bash",
        shlex.join(search),
        shlex.join(export),
        "```",
        "",
        "Run them from the folder holding the study file (paths are relative to it). "
        "The first line runs (or, with the run folder present, resumes) the study; the second "
        f"copies trial {n}'s saved model or rebuilds it from the recipe stored in the study, and "
        "writes nothing unless the result predicts the test split exactly as recorded (same "
        "sha256). `recipe.json` holds the same recipe. A fresh search follows the study's seed, "
        "but NSGA-II's later generations depend on measured latencies, so it may sample other "
        "recipes than this study did.",
        "", "## Files", "",
        "- `model.safetensors`, `config.json`, `structure.json`, `nas_fair.json`: the model "
        "(load with `nas_fair.load`)",
        "- tokenizer files (load with `AutoTokenizer.from_pretrained`)",
        "- `recipe.json`: the compression parameters and every family's config",
        "- `metrics.json`: the objectives, every bias metric with its interval, the collapse "
        "report and constraints, and the reference's values (strict JSON: `null` means not "
        "measured or not a finite number, e.g. a ratio to a zero reference or an undefined "
        "metric)",
    ]
    if offsets:
        lines.append("- `postprocess.json`: the per-group logit offsets (loaded by `nas_fair.load`)")
    return "\n".join(lines) + "\n"


def reproduce_base(args: Any) -> Path:
    """Where the card's reproduce commands run from: the study file's folder, else here."""
    return Path(args.config).resolve().parent if args.config else Path.cwd()


def study_args_for(args: Any) -> list[str]:
    """The CLI arguments naming the study as the user gave them, paths relative to
    ``reproduce_base(args)`` and the storage password masked."""
    from nas_fair.search.study import shown_url

    base = reproduce_base(args)
    out: list[str] = []
    if args.config:
        out += ["--config", relative(args.config, base)]
    elif args.study:
        out += ["--study", args.study]
    if args.run_dir:
        out += ["--run-dir", relative(args.run_dir, base)]
    if args.storage:
        out += ["--storage", shown_url(args.storage)]
    return out

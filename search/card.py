"""The model card (README.md) of an exported trial: what it is, how it was made, its scores
against the reference, how to load it and how to reproduce it.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nas_fair.postprocess import DISPARATE_TREATMENT
from nas_fair.search.artifacts import CLASS_RATES_FILE, ONNX_FILE

NEEDS_GROUP_TITLE = "Needs the sensitive attribute at inference"
# The bundled package's folder holds this Hugging Face model (see nas_fair.config.BUNDLED_MODEL).
BUNDLED_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


def relative(path: str | Path, base: Path) -> str:
    """``path`` relative to ``base`` (POSIX), so cards carry no absolute local path."""

    return Path(os.path.relpath(Path(path).resolve(), base.resolve())).as_posix()


def base_model_name(session: Any) -> str:
    """The base model as a card may name it: the Hub id of the bundled model, else the name of
    its folder (never the local absolute path)."""
    from nas_fair.config import BUNDLED_MODEL

    if session.cfg.model.path == BUNDLED_MODEL:
        return BUNDLED_HUB_ID
    return Path(session.model_path).name


# Data set names for the card's ``datasets`` metadata, per built-in task (nas_fair.data).
TASK_DATASETS: dict[str, list[str]] = {"bug-bios": ["BUG"], "winobias": ["wino_bias"]}


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


def class_rate_lines(rates: dict[str, Any] | None) -> list[str]:
    """The card's per-class table: each class's TPR per group and the gap, this model against
    the reference (``class_rates.json`` holds the intervals of each rate)."""
    if not rates:
        return []
    model, ref = rates["model"], rates.get("reference") or {}
    groups = model["groups"]
    ref_gap = {row["class"]: row["gap"] for row in ref.get("classes", [])}
    lines = ["", f"Per class (true-positive rate per group, n = the group's true examples of the "
             f"class; gap = {model['gap_definition']}, 95% bootstrap interval):", "",
             "| class | " + " | ".join(f"TPR {g} (n)" for g in groups)
             + " | gap [95% CI] | reference gap |",
             "| --- | " + " | ".join("---" for _ in groups) + " | --- | --- |"]
    for row in model["classes"]:
        cells = [f"{_fmt(row['tpr'].get(g))} ({row['n'].get(g, 0)})" for g in groups]
        lines.append(f"| {row['name']} | " + " | ".join(cells)
                     + f" | {_fmt(row['gap'])}{_ci(row['gap_ci'])} | "
                     f"{_fmt(ref_gap.get(row['class']))} |")
    view = model.get("training_share")
    if view and view.get("r") is not None:
        ref_view = ref.get("training_share") or {}
        lines += ["", f"Gap against the {view['group']} share of each class in training "
                  f"(De-Arteaga et al. 2019): Pearson r = {_fmt(view['r'])}{_ci(view['r_ci'])} "
                  f"({view['interval']}); reference r = {_fmt(ref_view.get('r'))}."]
    return lines


def disparity_lines(disparity: dict[str, Any] | None) -> list[str]:
    """Who paid for compression: per group, the shares of its test rows whose prediction
    changed against the reference, went from right to wrong, and from wrong to right."""
    if not disparity:
        return []
    lines = ["", "Who paid for compression (per group, share of its test rows against the "
             "reference's predictions):", "",
             "| group | rows | changed | right -> wrong | wrong -> right |",
             "| --- | --- | --- | --- | --- |"]
    for group, row in sorted(disparity.items()):
        lines.append(f"| {group} | {row['n']} | {_fmt(row['flipped'])} | "
                     f"{_fmt(row['newly_wrong'])} | {_fmt(row['newly_right'])} |")
    return lines


def model_card(session: Any, metrics: dict[str, Any], recipe: dict[str, Any], final: Path,
               study_args: Sequence[str], *, budget: int, onnx: bool = False,
               onnx_int8: bool = False, base: Path | None = None,
               class_rates: dict[str, Any] | None = None,
               reproduce: Sequence[str] | None = None) -> str:
    """Hugging Face style card: YAML front matter, then what was done, measured, and how to
    load and reproduce it. ``budget``: completed trials the study needed to reach this one.
    ``onnx_int8``: the ONNX file runs its 8-bit linears as ONNX Runtime int8 MatMuls.
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
    # a reproduce command is given for a recipe re-applied by `nas-fair compress`: no search
    origin = (f"trial {n} of study `{cfg.name}` (seed {cfg.seed}), a multi-objective search on "
              f"size, latency, {acc_name} and {bias_name}" if reproduce is None else
              f"a recipe applied by `nas-fair compress` (study `{cfg.name}`, seed {cfg.seed}; "
              "no search)")
    summary = (
        f"Compressed from {shown_base} by nas-fair {__version__}: {origin}. Against the "
        f"study's fine-tuned reference it is "
        f"**{_x(size['ratio'])} the size** and **{_x(latency['ratio'])} the latency**, keeps "
        f"**{_fmt(None if kept is None else 100 * kept, 1)}%** of its {acc_name}, and its "
        f"{bias_name} is {_fmt(bias['value'])} versus {_fmt(bias['reference'])}."
    )
    status = ("" if reproduce is not None else  # a one-point study's front is that point
              f"On the study's feasible Pareto front: "
              f"{'yes' if metrics['on_pareto_front'] else 'no'}. ") + (
        f"Feasible (not collapsed, within the study's limits): "
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
    lines += disparity_lines(metrics.get("disparity"))
    lines += class_rate_lines(class_rates)
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
                     "output `logits`).")
        if onnx_int8:
            from nas_fair.onnx_export import PRECISE_INT8

            key, value = PRECISE_INT8
            lines[-1] += (
                " Its 8-bit linears run as ONNX Runtime int8 MatMuls, one activation scale per "
                "row as in torch. Open it with the session options of "
                "`nas_fair.onnx_export.session_options()`, or set the session option "
                f"`{key}` to `{value}` on x86 CPUs without VNNI: there ONNX Runtime's default "
                "int8 kernel saturates and the logits differ from the model measured here.")
    search = ["nas-fair", "search", *study_args, "--budget", str(budget)]
    export = ["nas-fair", "export", *study_args, "--trials", str(n), "--out",
              relative(final.parent, reproduce_base)]
    if onnx:
        export.append("--onnx")
    # nas-fair compress passes its own command: it re-applies recipe.json
    again = None if reproduce is None else [
        "", "## Reproduce", "", "```bash", shlex.join(reproduce), "```", "",
        "Run it from the folder holding the study file (paths are relative to it): it applies "
        "`recipe.json` to the study's reference again (compression and recovery run again, "
        "deterministic for a thread count) and writes nothing unless the result predicts the "
        "test split as it measured."]
    lines += (again if again is not None else [
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
        "recipes than this study did."]) + [
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
    if class_rates is not None:
        lines.append(f"- `{CLASS_RATES_FILE}`: each class's true-positive rate and count per "
                     "group with 95% bootstrap intervals and the gap, for this model and the "
                     "reference, with the training-share view")
    if offsets:
        lines.append("- `postprocess.json`: the per-group logit offsets (loaded by `nas_fair.load`)")
    return "\n".join(lines) + "\n"

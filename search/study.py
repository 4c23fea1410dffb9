"""The study driver: prepare once (reference model, caches), then score trials on four objectives.

Data flow: study TOML -> task splits -> fine-tuned reference (cached in the run folder) ->
tokenized splits and reference logits (cached) -> Optuna study (SQLite in the run folder by
default) -> per trial: suggest every parameter -> compress (prune, low-rank, share, recover by
distillation, quantize) -> evaluate once on the held-out split -> size, latency, accuracy, bias.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from safetensors.torch import load_file, save_file

from nas_fair import __version__
from nas_fair.config import StudyConfig
from nas_fair.data import TaskData, load_task
from nas_fair.errors import UserError
from nas_fair.io import atomic_path, temp_dir_beside
from nas_fair.modeling import (
    finetune,
    load_for_task,
    load_tokenizer,
    predict_logits,
    predictions,
    resolve_model_path,
    tokenize,
)
from nas_fair.objectives import ACCURACY, BIAS, EvalRecord, get
from nas_fair.search.fidelity import retry_attrs
from nas_fair.spaces import CompressionContext, RecoveryData, build_space, compress, off_configs
from nas_fair.spaces.distillation import recovery_logs

OBJECTIVE_KEYS = ("size_mb", "latency_ms", "accuracy", "bias")


@dataclass
class Scores:
    """One model's measured objectives and everything recorded beside them (JSON-able)."""

    size_mb: float
    latency_ms: float
    accuracy: float
    bias: float
    attrs: dict[str, Any] = field(default_factory=dict)

    def values(self) -> list[float]:
        return [self.size_mb, self.latency_ms, self.accuracy, self.bias]


def predictions_digest(y_pred: np.ndarray) -> str:
    """sha256 of test-split predictions as int64: equal digests mean identical predictions."""
    return hashlib.sha256(np.ascontiguousarray(y_pred, dtype=np.int64).tobytes()).hexdigest()


def artifact_path(study: str, number: int) -> Path:
    """A trial's saved model, relative to the run folder (per study: run folders can be shared)."""
    return Path("artifacts") / study / f"trial-{number}"


def artifact_dir(run_dir: Path, study: str, number: int) -> Path | None:
    """The trial's saved-model folder inside ``run_dir``, or None if it would lie outside.

    Derived from the study name and trial number only, never from a path stored in the study:
    whoever can write the storage must not steer a delete or a copy elsewhere.
    """
    root = run_dir.resolve()
    target = root / artifact_path(study, number)
    try:
        # parent resolved (the folder itself may be a planted symlink: rmtree refuses those)
        target.parent.resolve().relative_to(root)
    except ValueError:
        return None
    return target.parent.resolve() / target.name


def _signed(cfg: StudyConfig) -> bool:
    """A signed gap is scored by its distance from zero: anti-bias is not the goal either."""
    bias = get(BIAS, cfg.objectives.bias, "bias")
    return not (bias.absolute or bias.direction == "maximize")


def objective_names(cfg: StudyConfig) -> list[str]:
    name = cfg.objectives.bias
    return ["size_mb", "latency_ms", cfg.objectives.accuracy, f"|{name}|" if _signed(cfg) else name]


def directions(cfg: StudyConfig) -> list[str]:
    acc = get(ACCURACY, cfg.objectives.accuracy, "accuracy")
    bias_dir = "minimize" if _signed(cfg) else BIAS[cfg.objectives.bias].direction
    return ["minimize", "minimize", acc.direction, bias_dir]


def bias_objective(cfg: StudyConfig, value: float) -> float:
    return abs(value) if _signed(cfg) else value


def limit_constraints(cfg: StudyConfig, accuracy: float, bias: float,
                      bias_ci: list[float | None] | None, reference: dict[str, Any], *,
                      max_bias_increase: float | None, min_accuracy: float | None,
                      ) -> dict[str, float]:
    """The user's limits as constraint values (<= 0 passes): one rule for the search's
    feasibility and for ``nas-fair pareto``'s filters. The bias limit is on the CI upper end."""
    cons: dict[str, float] = {}
    if max_bias_increase is not None:
        # The objective's value at the interval's worst end (for a signed metric, the end
        # farther from zero).
        ends = [bias_objective(cfg, v) for v in (bias_ci or []) if v is not None]
        hi = max(ends) if ends else bias
        # values[3], not reference["bias"]: the stored reference's "bias" key holds every
        # recorded bias metric (Scores.attrs overrides the objective value of that name).
        cons["max_bias_increase"] = hi - reference["values"][3] - max_bias_increase
    if min_accuracy is not None:
        cons["min_accuracy"] = min_accuracy - accuracy
    return cons


def check_objectives(cfg: StudyConfig, data: TaskData) -> list[str]:
    """Fail at study start, not after an hour: every metric must apply to this data."""
    from nas_fair.objectives.stats import check_metric_applicable

    get(ACCURACY, cfg.objectives.accuracy, "accuracy")
    names = [cfg.objectives.bias, *cfg.objectives.record]
    groups = data.test.groups
    facts = dict(
        has_groups=groups is not None,
        n_groups=0 if groups is None else len(set(groups.tolist())),
        has_counterfactual=data.test_counterfactual is not None,
        has_stereotype=data.test.stereotype is not None,
        has_reference=True,
        group_values=None if groups is None else set(groups.tolist()),
    )
    for name in names:
        check_metric_applicable(name, **facts)
    if cfg.objectives.record:
        return list(dict.fromkeys(names))
    recorded = [cfg.objectives.bias]
    for name in sorted(BIAS):
        try:
            check_metric_applicable(name, **facts)
        except UserError:
            continue
        recorded.append(name)
    return list(dict.fromkeys(recorded))


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_dict(cfg: StudyConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d.pop("source", None)
    return d


ADDED_SEARCH_FIELDS: dict[str, Any] = {"recovery_precision": "fp32", "recovery_dropout": True,
                                       "allow_group_postprocessing": True}


def search_fingerprint(cfg: StudyConfig) -> str:
    """What must not change between a study's runs (the device and thread count may)."""
    d = config_dict(cfg)
    d.pop("description", None)
    for k in ("device", "threads", "eval_batch_size"):
        d["search"].pop(k, None)
    # Fields added after studies existed: at the value that behaves as before, they leave the
    # fingerprint as it was, so those studies still resume.
    for k, old in ADDED_SEARCH_FIELDS.items():
        if d["search"].get(k) == old:
            d["search"].pop(k)
    # Limits only decide feasibility, which each trial stores with its named constraints;
    # changing them on resume (CLI flags) must not lock pareto/report/export out of the study.
    for k in ("max_bias_increase", "min_accuracy"):
        d["objectives"].pop(k, None)
    return _hash(d)


def check_lengths(model_path: Path, cfg: StudyConfig) -> None:
    """Token lengths beyond the model's position table fail at start, not in the first batch."""
    from transformers import AutoConfig

    try:
        mc = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    except Exception:  # noqa: BLE001 - loading the model reports this problem properly
        return
    positions = getattr(mc, "max_position_embeddings", None)
    if not isinstance(positions, int):
        return
    kind = str(getattr(mc, "model_type", ""))
    if "roberta" in kind or kind == "camembert":  # positions start after the padding index
        positions -= int(getattr(mc, "pad_token_id", 1) or 0) + 1
    for where, value in (("[model] max_length", cfg.model.max_length),
                         ("[search] seq_len", cfg.search.seq_len)):
        if value > positions:
            raise UserError(f"{where} must be at most {positions} (the model's positions), "
                            f"got {value}")


class Session:
    """A prepared study: everything trials share, computed once and cached in the run folder."""

    def __init__(self, cfg: StudyConfig, run_dir: Path, *, device: str | None = None,
                 quiet: bool = False, log: Any = None) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.device = torch.device(device or cfg.search.device)
        self.quiet = quiet
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.timings: dict[str, float] = {}
        if self.device.type == "cuda":
            # Not yet verified on a GPU (none was available to test it), so refuse rather than
            # report numbers from an untested path.
            raise UserError("--device cuda is not supported yet (only the CPU path is tested); "
                            "use --device cpu")
        # Validate everything that can be validated before writing anything.
        self.model_path = resolve_model_path(
            cfg.model.path, cfg.source.parent if cfg.source else None
        )
        self.tokenizer = load_tokenizer(self.model_path, cfg.model)
        check_lengths(self.model_path, cfg)
        t = time.perf_counter()
        self.data = load_task(cfg).with_mask_token(getattr(self.tokenizer, "mask_token", None))
        self.timings["load_data_s"] = time.perf_counter() - t
        self.recorded = check_objectives(cfg, self.data)
        self.space = build_space(cfg.families, self._space_options())

    def _space_options(self) -> dict[str, dict[str, Any]]:
        opts = {k: dict(v) for k, v in self.cfg.family_options.items()}
        opts.setdefault("distillation", {}).setdefault("steps", [self.cfg.search.recovery_steps])
        if self.cfg.families is not None and "distillation" not in self.cfg.families:
            opts.pop("distillation")
        if not self.cfg.search.allow_group_postprocessing:
            opts.setdefault("mitigation", {})
            thresholds = opts["mitigation"].get("thresholds", [0.0])
            thresholds = thresholds if isinstance(thresholds, list) else [thresholds]
            if any(v != 0 for v in thresholds if isinstance(v, (int, float))):
                raise UserError(
                    "[search] allow_group_postprocessing = false forbids group-aware thresholds, "
                    f"but [space.mitigation] thresholds is {thresholds}; drop it or set it to [0.0]")
            opts["mitigation"]["thresholds"] = [0.0]
            if self.cfg.families is not None and "mitigation" not in self.cfg.families:
                opts.pop("mitigation")
        return opts

    # ------------------------------------------------------------------ preparation (cached)

    def prepare(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Workers sharing the run folder (--jobs, or machines on one storage) compute the
        # reference and caches once: the first takes the lock, the others wait and then load.
        with preparation_lock(self.run_dir, self.log):
            self._prepare()

    def _prepare(self) -> None:
        self.cache_dir = self.run_dir / "cache"
        self.cache_dir.mkdir(exist_ok=True)
        t = time.perf_counter()
        self.reference = self._reference_model()
        self.timings["reference_s"] = time.perf_counter() - t
        t = time.perf_counter()
        self.tensors = self._cached_tensors()
        self.timings["cache_s"] = time.perf_counter() - t
        tr = self.data.train
        self.ctx = CompressionContext(
            reference=self.reference,
            train=RecoveryData(
                self.tensors["train_ids"], self.tensors["train_mask"],
                self.tensors["train_labels"], self.tensors["train_logits"],
                groups=None if tr.groups is None else [str(g) for g in tr.groups],
                texts=tr.texts,
            ),
            seed=self.cfg.seed,
            device=self.device,
            batch_size=self.cfg.model.batch_size,
            recovery_steps=self.cfg.search.recovery_steps,
            cache_dir=self.cache_dir,
            tokenizer=self.tokenizer,
            extras={"recovery_lr": self.cfg.search.recovery_lr,
                    "recovery_early_stop": self.cfg.search.recovery_early_stop,
                    "recovery_tolerance": self.cfg.search.recovery_tolerance,
                    "recovery_precision": self.cfg.search.recovery_precision,
                    "recovery_dropout": self.cfg.search.recovery_dropout,
                    "eval_batch_size": self.cfg.search.eval_batch_size},
        )
        val = self.data.validation
        if "val_ids" in self.tensors and val is not None and len(val):
            from nas_fair.spaces.postprocess import ValidationData

            # Post-processing (group thresholds) is fitted here, never on the test split.
            self.ctx.extras["validation"] = ValidationData(
                self.tensors["val_ids"], self.tensors["val_mask"], torch.from_numpy(val.labels),
                groups=None if val.groups is None else [str(g) for g in val.groups])
        ref_logits = self.tensors["test_logits"]
        self.ref_pred = predictions(ref_logits)
        # The reference compared with itself: compression metrics are 0 by definition.
        self.ref_record = self._record(self.ref_pred, self._cf_pred(ref_logits, self.reference),
                                       reference=self.ref_pred)

    def fingerprint(self) -> str:
        m = self.cfg.model
        return _hash([str(self.model_path), asdict(m), self.data.fingerprint(), self.cfg.seed,
                      __version__])

    def _reference_model(self) -> torch.nn.Module:
        from transformers import AutoModelForSequenceClassification

        ref_dir = self.run_dir / "reference"
        stamp = ref_dir / "nas_fair_reference.json"
        fp = self.fingerprint()
        if stamp.is_file() and json.loads(stamp.read_text()).get("fingerprint") == fp:
            try:
                # safetensors only: a cached folder is never unpickled, whoever wrote into it.
                model = AutoModelForSequenceClassification.from_pretrained(
                    ref_dir, trust_remote_code=self.cfg.model.trust_remote_code,
                    use_safetensors=True,
                )
            except Exception as exc:  # noqa: BLE001 - a broken cache is rebuilt, not fatal
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                self.log(f"warning: the cached reference in {ref_dir} is unreadable ({reason}); "
                         "building it again")
            else:
                self.reference_info = {**json.loads(stamp.read_text()), "cached": True}
                return model.eval()
        # Seeded here, not only in finetune: a new head drawn from the global random state
        # would make every fresh run fine-tune a different reference.
        model, trained = load_for_task(self.model_path, self.cfg.model, self.data.label_names,
                                       seed=self.cfg.seed)
        mode = self.cfg.model.finetune
        do_ft = mode == "always" or (mode == "auto" and not trained)
        if mode == "never" and not trained:
            self.log("warning: [model] finetune = \"never\" but the classification head is new; "
                     "the reference will be near chance")
        t = time.perf_counter()
        if do_ft and self.cfg.model.epochs > 0:
            tr = self.data.train
            ids, mask = tokenize(self.tokenizer, tr.texts, self.cfg.model.max_length)
            model = finetune(model, ids, mask, torch.from_numpy(tr.labels), self.cfg.model,
                             seed=self.cfg.seed, device=self.device, quiet=self.quiet)
        info = {"fingerprint": fp, "source": str(self.model_path), "finetuned": bool(do_ft),
                "finetune_s": round(time.perf_counter() - t, 1), "nas_fair": __version__}
        tmp = temp_dir_beside(ref_dir)  # unique name: concurrent writers, planted symlinks
        try:
            model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            (tmp / "nas_fair_reference.json").write_text(json.dumps(info, indent=2))
            shutil.rmtree(ref_dir, ignore_errors=True)
            tmp.rename(ref_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.reference_info = info
        return model.eval()

    def _cached_tensors(self) -> dict[str, torch.Tensor]:
        path = self.cache_dir / f"tensors-{self.fingerprint()}.safetensors"
        if path.is_file():
            return load_file(path)
        L = self.cfg.model.max_length
        d = self.data
        t: dict[str, torch.Tensor] = {}
        t["train_ids"], t["train_mask"] = tokenize(self.tokenizer, d.train.texts, L)
        t["train_labels"] = torch.from_numpy(d.train.labels)
        t["test_ids"], t["test_mask"] = tokenize(self.tokenizer, d.test.texts, L)
        if d.validation is not None and len(d.validation):
            t["val_ids"], t["val_mask"] = tokenize(self.tokenizer, d.validation.texts, L)
        bs = self.cfg.search.eval_batch_size
        t["train_logits"] = predict_logits(self.reference, t["train_ids"], t["train_mask"],
                                           batch_size=bs, device=self.device)
        t["test_logits"] = predict_logits(self.reference, t["test_ids"], t["test_mask"],
                                          batch_size=bs, device=self.device)
        if d.test_counterfactual is not None:
            changed = [i for i, (a, b) in enumerate(zip(d.test.texts, d.test_counterfactual))
                       if a != b]
            t["cf_rows"] = torch.tensor(changed, dtype=torch.long)
            cf_texts = [d.test_counterfactual[i] for i in changed] or [""]
            t["cf_ids"], t["cf_mask"] = tokenize(self.tokenizer, cf_texts, L)
            if not changed:
                t["cf_ids"], t["cf_mask"] = t["cf_ids"][:0], t["cf_mask"][:0]
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in t.items()}, tmp)
        return t

    # ------------------------------------------------------------------ evaluation

    def _cf_pred(self, logits: torch.Tensor, model: torch.nn.Module) -> np.ndarray | None:
        """Predictions on gender-swapped inputs; rows without gendered words keep their own.

        With group-aware post-processing a swapped row is predicted as the swapped gender's
        (with two gender groups; see ``postprocess.counterfactual_groups``)."""
        from nas_fair.spaces.postprocess import counterfactual_groups, predict

        if "cf_rows" not in self.tensors:
            return None
        groups = self.data.test.groups
        pred = predict(model, logits, groups).copy()
        rows = self.tensors["cf_rows"]
        if len(rows):
            cf_logits = predict_logits(model, self.tensors["cf_ids"], self.tensors["cf_mask"],
                                       batch_size=self.cfg.search.eval_batch_size,
                                       device=self.device)
            cf_groups = None if groups is None else counterfactual_groups(groups)[rows.numpy()]
            pred[rows.numpy()] = predict(model, cf_logits, cf_groups)
        return pred

    def _record(self, y_pred: np.ndarray, y_cf: np.ndarray | None,
                reference: np.ndarray | None) -> EvalRecord:
        test = self.data.test
        return EvalRecord(
            y_true=test.labels, y_pred=y_pred, groups=test.groups, y_pred_cf=y_cf,
            y_pred_ref=reference, stereotype=test.stereotype, n_classes=self.data.num_labels,
        )

    def evaluate(self, model: torch.nn.Module) -> EvalRecord:
        """Test-split predictions, through the model's group-aware post-processing if it has
        any (which is why the test groups are passed: they must be known at prediction time)."""
        from nas_fair.spaces.postprocess import predict

        logits = predict_logits(model, self.tensors["test_ids"], self.tensors["test_mask"],
                                batch_size=self.cfg.search.eval_batch_size, device=self.device)
        y_pred = predict(model, logits, self.data.test.groups)
        return self._record(y_pred, self._cf_pred(logits, model), self.ref_pred)

    def latency(self, model: torch.nn.Module) -> dict[str, Any]:
        """The study's latency protocol (batch, length, device, threads, repeats) on a model."""
        from nas_fair.objectives.latency import measure_latency

        s = self.cfg.search
        return measure_latency(model, batch_size=s.batch_size, seq_len=s.seq_len,
                               device=str(self.device), threads=s.threads or None,
                               repeats=s.latency_repeats,
                               vocab_size=getattr(self.reference.config, "vocab_size", None))

    def score(self, model: torch.nn.Module, record: EvalRecord, *, paired: bool) -> Scores:
        """Size, latency, accuracy and every recorded bias metric (with intervals) of one model."""
        from nas_fair.objectives.size import model_size

        times: dict[str, float] = {}
        t = time.perf_counter()
        lat = self.latency(model)
        times["latency_s"] = time.perf_counter() - t
        t = time.perf_counter()
        (acc, acc_lo, acc_hi), bias, collapse = self.metrics(record, paired=paired)
        times["metrics_s"] = time.perf_counter() - t
        size = model_size(model)
        primary = bias[self.cfg.objectives.bias]
        attrs: dict[str, Any] = {
            "size_bytes": size["bytes"],
            "params": size["params"],
            "latency": _jsonable(lat),
            "accuracy_ci": [acc_lo, acc_hi],
            "bias": _jsonable(bias),
            "bias_ci": [primary.get("ci_low"), primary.get("ci_high")],
            "collapse": _jsonable(collapse),
            "timings": times,
        }
        if paired and record.groups is not None and record.y_pred_ref is not None:
            from nas_fair.objectives.compression import disparity_by_group

            attrs["disparity"] = _jsonable(disparity_by_group(record))
        return Scores(size["bytes"] / 1e6, float(lat["median_ms"]), float(acc),
                      bias_objective(self.cfg, float(primary["value"])), attrs)

    def metrics(self, record: EvalRecord, *, paired: bool,
                ) -> tuple[tuple[float, float, float], dict[str, dict[str, Any]], dict[str, Any]]:
        """Accuracy with its interval, every recorded bias metric, and the collapse report."""
        from nas_fair.objectives.collapse import collapse_report
        from nas_fair.objectives.stats import bootstrap, score_bias

        s = self.cfg.search
        acc_metric = ACCURACY[self.cfg.objectives.accuracy]
        acc = bootstrap(acc_metric, record, n=s.bootstrap, seed=self.cfg.seed)
        # Paired differences to the reference reuse the same resamples (rows are aligned).
        ref_record = self.ref_record if paired else None
        bias = score_bias(self.recorded, record, ref_record, n=s.bootstrap, seed=self.cfg.seed)
        return acc, bias, collapse_report(record)

    def score_reference(self) -> Scores:
        return self.score(self.reference, self.ref_record, paired=False)

    def constraints(self, scores: Scores, reference: dict[str, Any]) -> dict[str, float]:
        """Optuna constraints (<= 0 is feasible): not collapsed, not degraded, the user's limits."""
        cons = {"collapsed": 1.0 if scores.attrs["collapse"]["collapsed"] else -1.0}
        o = self.cfg.objectives
        if o.min_accuracy_ratio > 0:
            cons["accuracy_floor"] = o.min_accuracy_ratio * reference["accuracy"] - scores.accuracy
        cons.update(limit_constraints(self.cfg, scores.accuracy, scores.bias,
                                      scores.attrs["bias_ci"], reference,
                                      max_bias_increase=o.max_bias_increase,
                                      min_accuracy=o.min_accuracy))
        return cons

    # ------------------------------------------------------------------ trials

    def run_trial(self, trial: optuna.Trial, reference: dict[str, Any]) -> list[float]:
        configs = {fam.name: fam.suggest(trial) for fam in self.space}
        # Recorded once every parameter is stored, so a retry replays the whole recipe.
        trial.set_user_attr("worker", worker_identity())
        # What export needs to rebuild the same model (kernels differ with the thread count).
        trial.set_user_attr("runtime", {"threads": torch.get_num_threads(),
                                        "torch": torch.__version__})
        t0 = time.perf_counter()
        same = same_recipe(trial)
        if same is not None:
            return self._reuse(trial, same, t0, reference)
        times: dict[str, float] = {}
        model = compress(self.reference, configs, self.ctx, timings=times)
        t = time.perf_counter()
        record = self.evaluate(model)
        evaluate_s = time.perf_counter() - t
        scores = self.score(model, record, paired=True)
        t = time.perf_counter()
        cost = {
            "compress_s": sum(v for k, v in times.items()
                              if k not in ("distillation", "mitigation")),
            "recover_s": times.get("distillation", 0.0),
            "mitigation_s": times.get("mitigation", 0.0),
            "evaluate_s": evaluate_s + scores.attrs["timings"]["metrics_s"],
            "latency_s": scores.attrs["timings"]["latency_s"],
        }
        for key, value in scores.attrs.items():
            if key != "timings":
                trial.set_user_attr(key, value)
        constraints = self.constraints(scores, reference)
        for key, value in constraints.items():
            trial.set_constraint(key, value)  # read by NSGA-II / TPE for feasibility
        trial.set_user_attr("constraints", list(constraints.values()))
        pp = getattr(model, "nas_fair_postprocess", None)
        if pp is not None:  # the fitted group offsets and what they did on validation
            trial.set_user_attr("postprocess", _jsonable(pp.to_dict()))
        self._save_artifact(trial, model, record)
        cost["bookkeeping_s"] = time.perf_counter() - t
        cost["total_s"] = time.perf_counter() - t0
        cost["recovery_steps_run"] = sum(r["steps_run"] for r in recovery_logs(model))
        trial.set_user_attr("cost", {k: round(v, 3) for k, v in cost.items()})
        return scores.values()

    def _reuse(self, trial: optuna.Trial, same: FrozenTrial, t0: float,
               reference: dict[str, Any]) -> list[float]:
        """Score ``trial`` as ``same``, a completed trial with the same recipe: compression and
        recovery are deterministic for a recipe and thread count, so it would build the same
        model (NSGA-II does propose recipes it has already run). Export rebuilds it, checked
        against the predictions' digest copied here. The measurements are copied, the
        constraints recomputed: the limits may have changed since (``--min-accuracy`` on resume)."""
        for key, value in same.user_attrs.items():
            if key not in NOT_REUSED:
                trial.set_user_attr(key, value)
        assert same.values is not None
        scores = Scores(*same.values, attrs=dict(same.user_attrs))
        constraints = self.constraints(scores, reference)
        for key, value in constraints.items():
            trial.set_constraint(key, value)
        trial.set_user_attr("constraints", list(constraints.values()))
        trial.set_user_attr("same_recipe_as", same.number)
        spent = round(time.perf_counter() - t0, 3)
        trial.set_user_attr("cost", {**dict.fromkeys(COST_PHASES, 0.0), "bookkeeping_s": spent,
                                     "total_s": spent, "recovery_steps_run": 0})
        return list(same.values)

    def _save_artifact(self, trial: optuna.Trial, model: torch.nn.Module,
                       record: EvalRecord) -> None:
        """Keep the trial's model (safetensors + JSON) so that export copies it instead of
        recompressing; the search deletes it once the trial leaves the Pareto front. The
        predictions' digest and the thread count let export prove a copy or replay is the same
        model."""
        from nas_fair.checkpoint import save_compressed

        rel = artifact_path(self.cfg.name, trial.number)
        target = self.run_dir / rel
        if target.exists():  # left by a deleted study of the same name in this run folder
            shutil.rmtree(target)
        save_compressed(model, target, metadata={"study": self.cfg.name, "trial": trial.number,
                                                 "params": trial.params})
        trial.set_user_attr("artifact", rel.as_posix())
        trial.set_user_attr("predictions_sha256", predictions_digest(record.y_pred))

    def replay(self, params: dict[str, Any]) -> torch.nn.Module:
        """The compressed model of a trial, rebuilt from its parameters (deterministic)."""
        from nas_fair.spaces import configs_from_params

        configs = off_configs(self.space)
        configs.update(configs_from_params(params))
        return compress(self.reference, configs, self.ctx)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return None if math.isnan(f) else f
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


# ---------------------------------------------------------------------- study storage


def default_storage(run_dir: Path) -> str:
    return f"sqlite:///{(run_dir / 'study.db').resolve()}"


_QUERY_SECRETS = frozenset({"password", "passwd", "pwd"})


def _parsed(url: str) -> Any:
    """SQLAlchemy's own reading of ``url`` (what the driver receives), or None."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url)
    except (ArgumentError, ValueError, TypeError):
        return None


def shown_url(url: str) -> str:
    """A storage URL fit to print or store: its password (and any password query parameter)
    replaced by ``***``, as SQLAlchemy parses it; an unparseable URL keeps only its scheme."""
    parsed = _parsed(url)
    if parsed is None:
        return url if "@" not in url else url.split("://", 1)[0] + "://***"
    hidden = {k: "***" for k in parsed.query if k.lower() in _QUERY_SECRETS}
    if parsed.password is None and not hidden:
        return url  # nothing secret: shown exactly as given (rendering would re-encode paths)
    if parsed.host and "@" in parsed.host:  # "u:p@ss@host": SQLAlchemy splits at the first @
        parsed = parsed.set(password=parsed.password or "", host=parsed.host.rsplit("@", 1)[1])
    if hidden:
        parsed = parsed.update_query_dict(hidden)
    return parsed.render_as_string(hide_password=True).replace("%2A%2A%2A", "***")


def _url_secrets(url: str) -> list[str]:
    """The password(s) a URL carries, as written and as decoded, to scrub them from messages."""
    from urllib.parse import quote, quote_plus

    parsed = _parsed(url)
    if parsed is None:
        return [url.split("://", 1)[1].rsplit("@", 1)[0]] if "://" in url and "@" in url else []
    found = [parsed.password] if parsed.password else []
    if parsed.host and "@" in parsed.host:
        # the user's password had an unencoded "@": its head went to the driver as the
        # password, its tail into the host name; scrub the whole and the tail, not the head alone
        tail = parsed.host.rsplit("@", 1)[0]
        found = [f"{parsed.password or ''}@{tail}", f"{tail}@"]
    for key, value in parsed.query.items():
        if key.lower() in _QUERY_SECRETS:
            found += [value] if isinstance(value, str) else list(value)
    return [s for pw in found if pw for s in {pw, quote(pw, safe=""), quote_plus(pw)}]


def scrub(text: str, url: str) -> str:
    """``text`` with exactly the credentials of ``url`` blanked (driver errors may quote them)."""
    text = text.replace(url, shown_url(url))
    for secret in sorted(_url_secrets(url), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """Optuna's RDB storage with heartbeats (dead remote workers' trials are retried).

    SQLite: WAL journal and a 60 s busy timeout, so local workers (``--jobs``) wait for each
    other's short write transactions instead of failing with "database is locked". Several
    workers creating the schema at once (PostgreSQL) is retried: one creates, the others load.
    """
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    kwargs: dict[str, Any] = {}
    sqlite = url.startswith("sqlite")
    if sqlite:
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    elif url.startswith("postgres"):
        # An unreachable host fails in seconds, not after the OS's TCP timeout; a connection
        # dropped during an hour-long trial is replaced instead of failing the trial.
        kwargs["engine_kwargs"] = {"connect_args": {"connect_timeout": 10},
                                   "pool_pre_ping": True}
    for attempt in range(5):
        try:
            storage = RDBStorage(
                _with_driver(url), heartbeat_interval=20, grace_period=120,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
                **kwargs,
            )
            break
        except Exception as exc:  # noqa: BLE001 - every failure here is one line for the user
            if _schema_race(exc) and attempt < 4:
                time.sleep(0.2 + 0.5 * attempt)
                continue
            raise UserError(_storage_error(url, exc)) from None
    if sqlite:
        _sqlite_wal(storage)
    return storage


def _with_driver(url: str) -> str:
    """``postgresql://`` means whichever driver is installed (SQLAlchemy 2.0 assumes psycopg2,
    2.1 psycopg 3): pick the one present, so either ``pip install`` works."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        return url
    import importlib.util

    for module, driver in (("psycopg2", "psycopg2"), ("psycopg", "psycopg")):
        if importlib.util.find_spec(module) is not None:
            return f"postgresql+{driver}://{rest}"
    raise UserError(f"cannot open storage {shown_url(url)!r}: no PostgreSQL driver is installed; "
                    "pip install psycopg2-binary (or nas-fair[postgres])")


def _schema_race(exc: BaseException) -> bool:
    """Another worker was creating the same tables at the same moment."""
    try:
        from sqlalchemy.exc import IntegrityError, ProgrammingError
    except ImportError:  # pragma: no cover - sqlalchemy comes with optuna
        return False
    return isinstance(exc, (IntegrityError, ProgrammingError))


def _storage_error(url: str, exc: BaseException) -> str:
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    hint = ""
    if isinstance(exc, ImportError) and url.startswith("postgres"):
        hint = "; install the driver: pip install psycopg2-binary (or nas-fair[postgres])"
    elif "://" not in url:
        hint = "; give an Optuna storage URL, e.g. sqlite:///path/study.db or postgresql://user@host/db"
    return scrub(f"cannot open storage {shown_url(url)!r}: {reason}{hint}", url)


def _sqlite_wal(storage: Any) -> None:
    """Readers no longer block the writer (persistent in the file; best effort if busy)."""
    try:
        with storage.engine.connect() as con:
            con.exec_driver_sql("PRAGMA journal_mode=WAL")
    except Exception:  # noqa: BLE001 - a busy database keeps its journal mode; still correct
        pass


# The phases of a trial's "cost" user attribute (seconds), besides total_s and
# recovery_steps_run; benchmarks/trial_cost.py reads them.
COST_PHASES = ("compress_s", "recover_s", "mitigation_s", "evaluate_s", "latency_s",
               "bookkeeping_s")

# What a trial scored from an earlier trial's recipe does not take from it: its own identity,
# cost and queue marks, and its constraints (recomputed under the current limits); the saved
# model stays the earlier trial's (export rebuilds).
NOT_REUSED = frozenset({"worker", "runtime", "cost", "artifact", "anchor", "retry_of",
                        "same_recipe_as", "constraints"})


def same_recipe(trial: optuna.Trial) -> FrozenTrial | None:
    """The first completed trial of the study with ``trial``'s parameters and thread count."""
    threads = (trial.user_attrs.get("runtime") or {}).get("threads")
    for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if (t.params == trial.params and t.values is not None
                and (t.user_attrs.get("runtime") or {}).get("threads") == threads):
            return t
    return None


def population_for(budget_trials: int | None, anchors: int = 0) -> int:
    """NSGA-II's first generation is random: keep several generations inside the budget. With
    ``anchors`` queued first, at least as many random members as anchors stay in it."""
    population = 16 if budget_trials is None else int(min(50, max(4, round(budget_trials / 4))))
    return max(population, 2 * anchors)


def trial_seeds(seed: int, number: int) -> tuple[int, int]:
    """Two 32-bit seeds for trial ``number`` of a study seeded ``seed`` (distinct streams)."""
    a, b = np.random.SeedSequence([seed & (2**64 - 1), number]).generate_state(2)
    return int(a), int(b)


class _SeededPerTrial:
    """Mixin: before each trial, the sampler's generators restart from ``trial_seeds(seed,
    trial.number)``.

    What this makes reproducible: a trial's draws depend on the seed, its number and the
    finished trials before it (NSGA-II's parents are chosen by their measured objectives,
    latency included), not on how many trials this process ran before, so one process draws
    the same recipes whether it ran in one go or was stopped and resumed, and the anchors and
    first (random) generation are the same in every run. Several processes on one storage get
    distinct trial numbers from the storage, so they draw distinct recipes; which process runs
    which number depends on timing, so a study run by several workers is not reproducible as
    a whole (docs/reproducibility.md)."""

    _trial_seed: int

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        for sampler, s in zip((self, getattr(self, "_random_sampler", None)),
                              trial_seeds(self._trial_seed, trial.number)):
            rng = getattr(sampler, "_rng", None)
            if rng is not None:  # optuna's LazyRandomState
                rng.rng.seed(s)
        super().before_trial(study, trial)  # type: ignore[misc]


class SeededNSGAIISampler(_SeededPerTrial, optuna.samplers.NSGAIISampler):
    """NSGA-II whose draws for a trial come from the study seed and the trial's number."""


class SeededTPESampler(_SeededPerTrial, optuna.samplers.TPESampler):
    """TPE whose draws for a trial come from the study seed and the trial's number."""


class SeededRandomSampler(_SeededPerTrial, optuna.samplers.RandomSampler):
    """Random search whose draws for a trial come from the study seed and the trial's number."""


def make_sampler(cfg: StudyConfig, population: int, seed: int) -> optuna.samplers.BaseSampler:
    """Samplers read each trial's constraints (``trial.set_constraint``) for feasibility; their
    draws for a trial come from ``seed`` and the trial's number (see ``_SeededPerTrial``)."""
    sampler: _SeededPerTrial
    if cfg.search.sampler == "nsga2":
        sampler = SeededNSGAIISampler(population_size=population, seed=seed)
    elif cfg.search.sampler == "tpe":
        sampler = SeededTPESampler(seed=seed, multivariate=True)
    else:
        sampler = SeededRandomSampler(seed=seed)
    sampler._trial_seed = seed
    return sampler  # type: ignore[return-value]


def worker_identity() -> dict[str, Any]:
    """Who runs a trial: host and pid, plus the kernel boot and pid namespace where known.

    Two containers may share a host name (and their pids mean nothing to each other): a
    trial is judged dead by its pid only where boot id and pid namespace match this process.
    """
    ident: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid()}
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        ident["node"] = f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        pass
    return ident


def fail_dead_local_trials(study: optuna.Study) -> list[int]:
    """Trials left RUNNING by a killed process on this machine: fail them and queue a retry.

    Remote workers are covered by Optuna's heartbeat (grace period); a local process can be
    checked directly, so a resume right after a crash needs no waiting. Several workers may
    find the same dead trial: only the one whose FAIL lands queues the retry.
    """
    me = worker_identity()
    retried = []
    for tr in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        w = tr.user_attrs.get("worker") or {}
        if w.get("host") != me["host"] or w.get("node") != me.get("node"):
            continue
        if _alive(int(w.get("pid", -1))):
            continue
        try:
            if not study._storage.set_trial_state_values(tr._trial_id, TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker failed it first (and queued the retry)
        if queue_retry(study, tr):
            retried.append(tr.number)
    return retried


def queue_retry(study: optuna.Study, trial: FrozenTrial) -> bool:
    """Queue a stopped trial's recipe to run again (after the trials already queued), marked
    ``retry_of`` (and ``anchor`` if it was one): its parameters once all were drawn (the
    ``worker`` mark is set after the last), else those it was queued with. False when it has
    neither: it drew only part of a recipe, and the next trial draws a new one."""
    params = (trial.params if "worker" in trial.user_attrs
              else trial.system_attrs.get("fixed_params"))
    if not params:
        return False
    attrs: dict[str, Any] = {"retry_of": trial.number}
    if trial.user_attrs.get("anchor"):
        attrs["anchor"] = True
    attrs.update(retry_attrs(trial))  # a promotion ticket's retry is the same ticket
    study.enqueue_trial(params, user_attrs=attrs, skip_if_exists=False)
    return True


def requeue_interrupted(study: optuna.Study, trial: optuna.Trial) -> None:
    """A trial stopped by Ctrl-C (KeyboardInterrupt): Optuna fails it, and it is queued again
    like a dead worker's trial, so the next run finishes the anchors and the budget (a failed
    trial never counts against the budget). Call before re-raising."""
    frozen = study._storage.get_trial(trial._trial_id)
    trial.set_user_attr("interrupted", True)
    trial.set_user_attr("error", "KeyboardInterrupt: interrupted; queued to run again")
    queue_retry(study, frozen)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------- shared run folder

LOCK_FILE = ".prepare.lock"
_held: set[str] = set()  # lock files this process holds: taking one again is a no-op


@contextlib.contextmanager
def preparation_lock(run_dir: Path, log: Callable[[str], None] | None = None) -> Iterator[None]:
    """Exclusive ``flock`` on ``<run_dir>/.prepare.lock`` around work done once per run folder.

    Workers of one study (``--jobs``, or machines sharing the run folder) take it around the
    reference fine-tuning, the caches and the reference's scores: one computes, the others
    print that they wait, then load. Reentrant within a process; the kernel drops it when the
    holder dies, so a killed worker never leaves it stuck. No-op where ``fcntl`` is missing.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: single-worker use only
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    key = str(path.resolve())
    if key in _held:  # flock on a second descriptor would wait for ourselves
        yield
        return
    fh = open(path, "a+")  # noqa: SIM115 - held across the yield
    try:
        waited = 0.0
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if waited >= 2.0:  # a short wait (another worker loading the cache) is silent
                    fh.seek(0)
                    holder = fh.read().strip() or "another worker"
                    (log or (lambda m: print(m, file=sys.stderr)))(
                        f"waiting for {holder} to prepare the reference model and caches "
                        f"in {run_dir}"
                    )
                    fcntl.flock(fh, fcntl.LOCK_EX)
                    break
                time.sleep(0.1)
                waited += 0.1
        fh.seek(0)
        fh.truncate()
        fh.write(f"worker {socket.gethostname()}:{os.getpid()}\n")
        fh.flush()
        _held.add(key)
        try:
            yield
        finally:
            _held.discard(key)
            fcntl.flock(fh, fcntl.LOCK_UN)
    finally:
        fh.close()


def pareto_front(trials: list[FrozenTrial], dirs: list[str], *,
                 feasible_only: bool = True) -> list[FrozenTrial]:
    """Non-dominated complete trials (feasible ones only unless asked otherwise)."""
    cands = [t for t in trials if t.state == TrialState.COMPLETE and t.values is not None]
    if feasible_only:
        cands = [t for t in cands if all(c <= 0 for c in t.user_attrs.get("constraints", [0]))]
    if not cands:
        return []
    sign = np.array([1.0 if d == "minimize" else -1.0 for d in dirs])
    vals = np.array([t.values for t in cands], dtype=float) * sign
    front = []
    for i, v in enumerate(vals):
        dominated = np.any(np.all(vals <= v, axis=1) & np.any(vals < v, axis=1))
        if not dominated:
            front.append(cands[i])
    return front

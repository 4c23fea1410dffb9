"""The study driver: prepare once (reference model, caches), then score trials on four objectives.

Data flow: study TOML -> task splits -> fine-tuned reference (cached in the run folder) ->
tokenized splits and reference logits (cached) -> Optuna study (SQLite in the run folder by
default) -> per trial: suggest every parameter -> compress (prune, low-rank, share, recover by
distillation, quantize) -> evaluate once on the held-out split -> size, latency, accuracy, bias.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import socket
import sys
import time
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
from nas_fair.spaces import CompressionContext, RecoveryData, build_space, compress, off_configs

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


def search_fingerprint(cfg: StudyConfig) -> str:
    """What must not change between a study's runs (the device and thread count may)."""
    d = config_dict(cfg)
    d.pop("description", None)
    for k in ("device", "threads", "eval_batch_size"):
        d["search"].pop(k, None)
    return _hash(d)


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
        return opts

    # ------------------------------------------------------------------ preparation (cached)

    def prepare(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
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
            extras={"recovery_lr": self.cfg.search.recovery_lr},
        )
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
            model = AutoModelForSequenceClassification.from_pretrained(
                ref_dir, trust_remote_code=self.cfg.model.trust_remote_code
            )
            self.reference_info = json.loads(stamp.read_text())
            return model.eval()
        model, trained = load_for_task(self.model_path, self.cfg.model, self.data.label_names)
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
        tmp = self.run_dir / "reference.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        (tmp / "nas_fair_reference.json").write_text(json.dumps(info, indent=2))
        shutil.rmtree(ref_dir, ignore_errors=True)
        tmp.rename(ref_dir)
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
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in t.items()}, tmp)
        tmp.rename(path)
        return t

    # ------------------------------------------------------------------ evaluation

    def _cf_pred(self, logits: torch.Tensor, model: torch.nn.Module) -> np.ndarray | None:
        """Predictions on gender-swapped inputs; rows without gendered words keep their own."""
        if "cf_rows" not in self.tensors:
            return None
        pred = predictions(logits).copy()
        rows = self.tensors["cf_rows"]
        if len(rows):
            cf_logits = predict_logits(model, self.tensors["cf_ids"], self.tensors["cf_mask"],
                                       batch_size=self.cfg.search.eval_batch_size,
                                       device=self.device)
            pred[rows.numpy()] = predictions(cf_logits)
        return pred

    def _record(self, y_pred: np.ndarray, y_cf: np.ndarray | None,
                reference: np.ndarray | None) -> EvalRecord:
        test = self.data.test
        return EvalRecord(
            y_true=test.labels, y_pred=y_pred, groups=test.groups, y_pred_cf=y_cf,
            y_pred_ref=reference, stereotype=test.stereotype, n_classes=self.data.num_labels,
        )

    def evaluate(self, model: torch.nn.Module) -> EvalRecord:
        logits = predict_logits(model, self.tensors["test_ids"], self.tensors["test_mask"],
                                batch_size=self.cfg.search.eval_batch_size, device=self.device)
        return self._record(predictions(logits), self._cf_pred(logits, model), self.ref_pred)

    def score(self, model: torch.nn.Module, record: EvalRecord, *, paired: bool) -> Scores:
        """Size, latency, accuracy and every recorded bias metric (with intervals) of one model."""
        from nas_fair.objectives.collapse import collapse_report
        from nas_fair.objectives.latency import measure_latency
        from nas_fair.objectives.size import model_size
        from nas_fair.objectives.stats import bootstrap, score_bias

        s = self.cfg.search
        times: dict[str, float] = {}
        t = time.perf_counter()
        lat = measure_latency(model, batch_size=s.batch_size, seq_len=s.seq_len,
                              device=str(self.device), threads=s.threads or None,
                              repeats=s.latency_repeats,
                              vocab_size=getattr(self.reference.config, "vocab_size", None))
        times["latency_s"] = time.perf_counter() - t
        t = time.perf_counter()
        acc_metric = ACCURACY[self.cfg.objectives.accuracy]
        acc, acc_lo, acc_hi = bootstrap(acc_metric, record, n=s.bootstrap, seed=self.cfg.seed)
        # Paired differences to the reference reuse the same resamples (rows are aligned).
        ref_record = self.ref_record if paired else None
        bias = score_bias(self.recorded, record, ref_record, n=s.bootstrap, seed=self.cfg.seed)
        collapse = collapse_report(record)
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
        return Scores(size["bytes"] / 1e6, float(lat["median_ms"]), float(acc),
                      bias_objective(self.cfg, float(primary["value"])), attrs)

    def score_reference(self) -> Scores:
        return self.score(self.reference, self.ref_record, paired=False)

    def constraints(self, scores: Scores, reference: dict[str, Any]) -> dict[str, float]:
        """Optuna constraints (<= 0 is feasible): not collapsed, not degraded, the user's limits."""
        cons = {"collapsed": 1.0 if scores.attrs["collapse"]["collapsed"] else -1.0}
        o = self.cfg.objectives
        if o.min_accuracy_ratio > 0:
            cons["accuracy_floor"] = o.min_accuracy_ratio * reference["accuracy"] - scores.accuracy
        if o.max_bias_increase is not None:
            hi = scores.attrs["bias_ci"][1]
            hi = scores.bias if hi is None else bias_objective(self.cfg, hi)
            cons["max_bias_increase"] = hi - reference["bias"] - o.max_bias_increase
        if o.min_accuracy is not None:
            cons["min_accuracy"] = o.min_accuracy - scores.accuracy
        return cons

    # ------------------------------------------------------------------ trials

    def run_trial(self, trial: optuna.Trial, reference: dict[str, Any]) -> list[float]:
        configs = {fam.name: fam.suggest(trial) for fam in self.space}
        # Recorded once every parameter is stored, so a retry replays the whole recipe.
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
        times: dict[str, float] = {}
        t0 = time.perf_counter()
        model = compress(self.reference, configs, self.ctx, timings=times)
        t = time.perf_counter()
        record = self.evaluate(model)
        evaluate_s = time.perf_counter() - t
        scores = self.score(model, record, paired=True)
        t = time.perf_counter()
        cost = {
            "compress_s": sum(v for k, v in times.items() if k != "distillation"),
            "recover_s": times.get("distillation", 0.0),
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
        cost["bookkeeping_s"] = time.perf_counter() - t
        cost["total_s"] = time.perf_counter() - t0
        trial.set_user_attr("cost", {k: round(v, 3) for k, v in cost.items()})
        return scores.values()

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


def shown_url(url: str) -> str:
    """A storage URL fit to print: credentials (before '@') are never shown."""
    return url.split("@")[-1] if "@" in url else url


def make_storage(url: str) -> optuna.storages.BaseStorage:
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    try:
        return RDBStorage(url, heartbeat_interval=20, grace_period=120,
                          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3), **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot open storage {shown_url(url)!r}: {exc}".splitlines()[0]) from None


def population_for(budget_trials: int | None) -> int:
    """NSGA-II's first generation is random: keep several generations inside the budget."""
    if budget_trials is None:
        return 16
    return int(min(50, max(4, round(budget_trials / 4))))


def make_sampler(cfg: StudyConfig, population: int, seed: int) -> optuna.samplers.BaseSampler:
    """Samplers read each trial's constraints (``trial.set_constraint``) for feasibility."""
    if cfg.search.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=population, seed=seed)
    if cfg.search.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    return optuna.samplers.RandomSampler(seed=seed)


def fail_dead_local_trials(study: optuna.Study) -> list[int]:
    """Trials left RUNNING by a killed process on this host: fail them and queue a retry.

    Remote workers are covered by Optuna's heartbeat (grace period); a local process can be
    checked directly, so a resume right after a crash needs no waiting.
    """
    host = socket.gethostname()
    retried = []
    for tr in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        w = tr.user_attrs.get("worker") or {}
        if w.get("host") != host or _alive(int(w.get("pid", -1))):
            continue
        study._storage.set_trial_state_values(tr._trial_id, TrialState.FAIL)
        study.enqueue_trial(tr.params, user_attrs={"retry_of": tr.number}, skip_if_exists=False)
        retried.append(tr.number)
    return retried


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

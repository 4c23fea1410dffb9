"""Checkpoints: safetensors + JSON only, bit-identical reloads, honest sizes, clear errors."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from nas_fair import checkpoint
from nas_fair.checkpoint import (
    file_header_bytes,
    load_compressed,
    param_count,
    save_compressed,
    stored_bytes,
)
from nas_fair.errors import UserError
from nas_fair.modules import Packed4Linear, QuantEmbedding, RowInt8Linear
from nas_fair.spaces import REGISTRY, compress

from conftest import random_batch, tiny_context, tiny_model

IDS, MASK = random_batch(6, 10, seed=5)


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


def heavy_recipe(steps: int = 2) -> dict:
    """Every family at once, with mixed bit widths, so every module type is in the file."""
    cfg = {n: REGISTRY[n].config_class for n in REGISTRY}
    return {
        "pruning": cfg["pruning"](heads=0.25, ffn=0.5, layers=1),
        "lowrank": cfg["lowrank"](attention_rank=0.5, ffn_rank=0.75, activation_aware=True),
        "sharing": cfg["sharing"](group_size=2),
        "distillation": cfg["distillation"](steps=steps, temperature=2.0, alpha=0.8),
        "quantization": cfg["quantization"](attention_bits=8, ffn_bits=4, embedding_bits=4),
    }


RECIPES = {
    "reference": {},
    "int8": {"quantization": REGISTRY["quantization"].config_class(8, 8, 8)},
    "fp16": {"quantization": REGISTRY["quantization"].config_class(16, 16, 16)},
    "packed4": {"quantization": REGISTRY["quantization"].config_class(4, 4, 4)},
    "heavy": heavy_recipe(),
}


@pytest.fixture(scope="module")
def compressed() -> dict[tuple[str, str], nn.Module]:
    out = {}
    for kind in ("bert", "roberta", "distilbert"):
        ref = tiny_model(kind)
        ctx = tiny_context(ref)
        for name, recipe in RECIPES.items():
            out[kind, name] = compress(ref, recipe, ctx) if recipe else ref
    return out


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert"])
@pytest.mark.parametrize("name", list(RECIPES))
def test_round_trip_is_bit_identical(compressed, kind: str, name: str, tmp_path: Path) -> None:  # noqa: ANN001
    model = compressed[kind, name]
    path = save_compressed(model, tmp_path / "m", metadata={"recipe": name})
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json",
        "model.safetensors",
        "nas_fair.json",
        "structure.json",
    ]
    back = load_compressed(path)
    assert not back.training
    assert torch.equal(logits(back), logits(model))
    assert type(back) is type(model)
    assert [type(m).__name__ for m in back.modules()] == [type(m).__name__ for m in model.modules()]
    # stored_bytes is the file, within 1% (in practice exactly).
    on_disk = (path / "model.safetensors").stat().st_size
    assert abs(stored_bytes(model) - on_disk) <= 0.01 * on_disk
    assert stored_bytes(back) == stored_bytes(model)
    assert param_count(back) == param_count(model)
    assert json.loads((path / "nas_fair.json").read_text())["metadata"] == {"recipe": name}


def test_stored_bytes_matches_the_header_exactly(compressed, tmp_path: Path) -> None:  # noqa: ANN001
    model = compressed["bert", "heavy"]
    path = save_compressed(model, tmp_path / "m")
    file = path / "model.safetensors"
    assert stored_bytes(model) == file.stat().st_size
    assert file_header_bytes(file) < file.stat().st_size


def test_heavy_recipe_reloads_in_a_fresh_process(compressed, tmp_path: Path) -> None:  # noqa: ANN001
    from safetensors.torch import load_file, save_file

    model = compressed["roberta", "heavy"]
    path = save_compressed(model, tmp_path / "m")
    save_file({"ids": IDS, "mask": MASK}, str(tmp_path / "inputs.safetensors"))
    script = textwrap.dedent(
        f"""
        import torch
        torch.set_num_threads(1)
        from safetensors.torch import load_file, save_file
        import nas_fair
        inputs = load_file({str(tmp_path / "inputs.safetensors")!r})
        model = nas_fair.load({str(path)!r})
        with torch.no_grad():
            out = model(input_ids=inputs["ids"], attention_mask=inputs["mask"]).logits
        save_file({{"logits": out.contiguous()}}, {str(tmp_path / "out.safetensors")!r})
        """
    )
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert res.returncode == 0, res.stderr[-2000:]
    fresh = load_file(str(tmp_path / "out.safetensors"))["logits"]
    assert torch.equal(fresh, logits(model))


def test_structure_describes_every_replacement(compressed, tmp_path: Path) -> None:  # noqa: ANN001
    model = compressed["distilbert", "heavy"]
    path = save_compressed(model, tmp_path / "m")
    structure = json.loads((path / "structure.json").read_text())
    assert structure["layers"]["slots"] == [0, 0, 1]  # 3 layers left, pairs shared
    summary = structure["layers"]["summary"]
    assert [s["ffn"] for s in summary] == [32, 32, 32]
    assert all(1 <= s["heads"] <= 4 for s in summary)
    types = {m["type"] for m in structure["modules"]}
    assert {"LowRankLinear", "RowInt8Linear", "Packed4Linear", "QuantEmbedding"} <= types
    assert all(set(v) >= {"n_heads"} for v in structure["attention"].values())
    back = load_compressed(path)
    layers = back.distilbert.transformer.layer
    assert layers[0] is layers[1] and layers[2] is not layers[0]
    assert any(isinstance(m, RowInt8Linear) for m in back.modules())
    assert any(isinstance(m, Packed4Linear) for m in back.modules())
    assert isinstance(back.distilbert.embeddings.word_embeddings, QuantEmbedding)


def test_shared_layers_are_stored_once(compressed) -> None:  # noqa: ANN001
    ref = compressed["bert", "reference"]
    shared = compress(ref, {"sharing": REGISTRY["sharing"].config_class(2)}, tiny_context(ref))
    layer_bytes = sum(p.numel() * p.element_size() for p in ref.bert.encoder.layer[1].parameters())
    saved = stored_bytes(ref) - stored_bytes(shared)
    header_saved = checkpoint._header_bytes(checkpoint._stored(ref)) - checkpoint._header_bytes(
        checkpoint._stored(shared)
    )
    assert saved - header_saved == 2 * layer_bytes  # two of four layers not stored
    assert param_count(shared) == sum(p.numel() for p in shared.parameters())


def test_param_count_is_logical_for_quantized_modules(compressed) -> None:  # noqa: ANN001
    ref = compressed["bert", "reference"]
    assert param_count(ref) == sum(p.numel() for p in ref.parameters())
    for name in ("int8", "fp16", "packed4"):
        assert param_count(compressed["bert", name]) == param_count(ref)
        assert stored_bytes(compressed["bert", name]) < stored_bytes(ref)


def test_nothing_is_unpickled(compressed, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    path = save_compressed(compressed["bert", "heavy"], tmp_path / "m")

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("unpickling during load")

    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    assert torch.equal(logits(load_compressed(path)), logits(compressed["bert", "heavy"]))
    assert "torch.load" not in Path(checkpoint.__file__).read_text()


def test_refuses_a_non_empty_target_and_accepts_an_empty_one(compressed, tmp_path: Path) -> None:  # noqa: ANN001
    model = compressed["bert", "int8"]
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="exists and is not an empty folder"):
        save_compressed(model, full)
    assert sorted(p.name for p in full.iterdir()) == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert save_compressed(model, empty) == empty
    assert (empty / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "full"]  # no temp folders


def test_a_failed_save_leaves_nothing(compressed, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    def fail(model: nn.Module) -> dict:
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint, "structure_of", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        save_compressed(compressed["bert", "int8"], tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_is_saved(compressed, tiny_tokenizer_dir: Path, tmp_path: Path) -> None:  # noqa: ANN001
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    path = save_compressed(compressed["bert", "packed4"], tmp_path / "m", tokenizer=tok)
    again = AutoTokenizer.from_pretrained(str(path))
    assert again("the nurse said")["input_ids"] == tok("the nurse said")["input_ids"]
    # The tokenizer is not part of stored_bytes.
    assert (
        stored_bytes(compressed["bert", "packed4"]) == (path / "model.safetensors").stat().st_size
    )


def _saved(compressed, tmp_path: Path) -> Path:  # noqa: ANN001
    return save_compressed(compressed["bert", "heavy"], tmp_path / "m")


def _one_line_error(path: Path) -> str:
    with pytest.raises(UserError) as err:
        load_compressed(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


def test_missing_folder_and_files(compressed, tmp_path: Path) -> None:  # noqa: ANN001
    assert "no such folder" in _one_line_error(tmp_path / "nope")
    path = _saved(compressed, tmp_path)
    (path / "structure.json").unlink()
    assert "structure.json is missing" in _one_line_error(path)


def test_truncated_tensors(compressed, tmp_path: Path) -> None:  # noqa: ANN001
    path = _saved(compressed, tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "model.safetensors" in _one_line_error(path)


def test_garbage_json(compressed, tmp_path: Path) -> None:  # noqa: ANN001
    path = _saved(compressed, tmp_path)
    (path / "structure.json").write_text("{not json")
    assert "structure.json" in _one_line_error(path)
    path2 = save_compressed(compressed["bert", "int8"], tmp_path / "m2")
    (path2 / "config.json").write_text("[]")
    _one_line_error(path2)


def test_tensor_set_must_match_structure(compressed, tmp_path: Path) -> None:  # noqa: ANN001
    from safetensors.torch import load_file, save_file

    path = _saved(compressed, tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    key = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != key}, str(path / "model.safetensors"))
    assert "missing" in _one_line_error(path)
    tensors[key] = tensors[key].flatten()[:1].clone()
    save_file(tensors, str(path / "model.safetensors"))
    assert "expects" in _one_line_error(path)


def test_structure_from_another_model_is_rejected(compressed, tmp_path: Path) -> None:  # noqa: ANN001
    a = save_compressed(compressed["bert", "heavy"], tmp_path / "a")
    b = save_compressed(compressed["bert", "int8"], tmp_path / "b")
    (a / "structure.json").write_text((b / "structure.json").read_text())
    _one_line_error(a)


@pytest.mark.parametrize("family", ["sharing", "lowrank"])
def test_plain_transformers_refuses_a_compressed_folder(family: str, tmp_path: Path) -> None:
    """Shared-layer and low-rank folders used to load in plain transformers as the original
    architecture with random weights; now the config's model type stops it, and nas_fair.load
    still reads it."""
    from transformers import AutoModelForSequenceClassification

    cfg = REGISTRY[family].config_class
    recipe = {"sharing": cfg(group_size=2)} if family == "sharing" else {
        "lowrank": cfg(attention_rank=0.5, ffn_rank=0.5, activation_aware=False)}
    ref = tiny_model("bert")
    model = compress(ref, recipe, tiny_context(ref))
    path = save_compressed(model, tmp_path / "m")
    with pytest.raises(ValueError, match="nas-fair-compressed"):
        AutoModelForSequenceClassification.from_pretrained(str(path))
    assert torch.equal(logits(load_compressed(path)), logits(model))


def test_folders_with_the_plain_config_still_load(compressed, tmp_path: Path) -> None:  # noqa: ANN001
    """Exports written before the wrapped config.json (model_type bert at top level)."""
    model = compressed["bert", "heavy"]
    path = save_compressed(model, tmp_path / "m")
    wrapped = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(wrapped["original_config"]))
    back = load_compressed(path)
    assert torch.equal(logits(back), logits(model))
    new = load_compressed(save_compressed(model, tmp_path / "new"))
    assert ({**back.config.to_dict(), "_name_or_path": ""}
            == {**new.config.to_dict(), "_name_or_path": ""})


def test_save_pretrained_of_a_loaded_model_writes_what_load_reads(compressed, tmp_path: Path,
                                                                  tiny_tokenizer_dir: Path,
                                                                  ) -> None:  # noqa: ANN001
    import copy

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    model = compressed["bert", "heavy"]
    first = load_compressed(save_compressed(model, tmp_path / "a", tokenizer=tok,
                                            metadata={"recipe": "heavy"}))
    first.save_pretrained(tmp_path / "b")
    again = load_compressed(tmp_path / "b")
    assert torch.equal(logits(again), logits(model))
    assert json.loads((tmp_path / "b" / "nas_fair.json").read_text())["metadata"] == {
        "recipe": "heavy"}
    copy.deepcopy(first).save_pretrained(tmp_path / "c")  # the copy saves itself
    assert torch.equal(logits(load_compressed(tmp_path / "c")), logits(model))
    with pytest.raises(UserError) as exc:
        first.save_pretrained(tmp_path / "d", push_to_hub=True)
    assert str(exc.value) == (
        "save_pretrained of a nas-fair compressed model takes only the folder (got "
        "push_to_hub); it writes nas-fair's format, for nas_fair.load; for more, use "
        "nas-fair export")
    # the tokenizer still loads beside the wrapped config
    assert AutoTokenizer.from_pretrained(str(tmp_path / "a"))("he")["input_ids"] == tok(
        "he")["input_ids"]


def test_every_saved_file_has_the_default_mode(compressed, tmp_path: Path,  # noqa: ANN001
                                               tiny_tokenizer_dir: Path) -> None:
    import os

    from transformers import AutoTokenizer

    from nas_fair.io import default_file_mode

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    path = save_compressed(compressed["bert", "int8"], tmp_path / "m", tokenizer=tok)
    modes = {p.name: oct(os.stat(p).st_mode & 0o777) for p in path.iterdir()}
    assert set(modes.values()) == {oct(default_file_mode())}, modes

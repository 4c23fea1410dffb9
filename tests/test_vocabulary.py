"""Vocabulary trimming: kept rows are bit-identical, the rest reads [UNK], the size drops by the
removed rows, it composes with embedding quantization, and the exported folder (trimmed table +
a plain Hugging Face tokenizer) reproduces what the search measured."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from nas_fair.checkpoint import _stored, load_compressed, save_compressed, stored_bytes
from nas_fair.errors import UserError
from nas_fair.modeling import tokenize
from nas_fair.modules import QuantEmbedding
from nas_fair.spaces import CompressionContext, RecoveryData, compress
from nas_fair.spaces.vocabulary import (
    RemappedEmbedding,
    Vocabulary,
    VocabularyConfig,
    export_folder,
    remapped,
    swap_word_ids,
)

from conftest import WORDS, tiny_model

TRAIN = ["he works as a nurse", "she said the doctor is good", "the teacher was old",
         "his lawyer did not like the cook"]
KEPT_ONLY = ["the nurse is good", "she works as a doctor", "he said the cook was old"]
WITH_OOV = ["the engineer is bad", "a sheriff and a baker", "my clerk was new"]


@pytest.fixture
def tok(tiny_tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def make(kind: str, tok: Any) -> tuple[nn.Module, CompressionContext]:
    model = tiny_model(kind)
    ids, mask = tokenize(tok, TRAIN, 12)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    data = RecoveryData(ids, mask, logits.argmax(-1), logits, texts=TRAIN)
    return model, CompressionContext(reference=model, train=data, tokenizer=tok)


def logits_of(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def trim(model: nn.Module, ctx: CompressionContext, others: float = 0.0, **more: Any
         ) -> nn.Module:
    return compress(model, {"vocabulary": VocabularyConfig(others), **more}, ctx)


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_kept_rows_are_the_training_tokens_and_logits_are_bit_identical(kind: str, tok: Any
                                                                         ) -> None:
    model, ctx = make(kind, tok)
    out = trim(model, ctx)
    remap = remapped(out)
    assert isinstance(remap, RemappedEmbedding)
    swaps = set(swap_word_ids(tok))
    assert tok.convert_tokens_to_ids("herself") in swaps  # not in TRAIN, yet kept
    want = set(ctx.train.input_ids.unique().tolist()) | set(tok.all_special_ids) | swaps
    assert set(remap.kept_ids().tolist()) == want
    assert remap.num_kept == len(want) < model.config.vocab_size
    ids, mask = tokenize(tok, KEPT_ONLY, 12)
    assert set(ids.unique().tolist()) <= want  # the premise: every token is kept
    assert torch.equal(logits_of(out, ids, mask), logits_of(model, ids, mask))


def test_out_of_vocabulary_tokens_read_unk(tok: Any) -> None:
    model, ctx = make("bert", tok)
    out = trim(model, ctx)
    kept = set(remapped(out).kept_ids().tolist())
    ids, mask = tokenize(tok, WITH_OOV, 12)
    oov = ~torch.tensor([[i in kept for i in row] for row in ids.tolist()])
    assert oov.any()
    as_unk = torch.where(oov, torch.full_like(ids, tok.unk_token_id), ids)
    assert torch.equal(logits_of(out, ids, mask), logits_of(model, as_unk, mask))
    # and the reference itself sees a difference: the OOV rows really changed
    assert not torch.equal(logits_of(model, ids, mask), logits_of(model, as_unk, mask))


def test_others_adds_the_lowest_other_ids(tok: Any) -> None:
    model, ctx = make("bert", tok)
    base = set(remapped(trim(model, ctx, 0.0)).kept_ids().tolist())
    emitted = set(tok.get_vocab().values())  # the model's other ids no tokenizer emits
    assert len(emitted) < model.config.vocab_size
    rest = sorted(emitted - base)
    half = set(remapped(trim(model, ctx, 0.5)).kept_ids().tolist())
    assert half == base | set(rest[: round(0.5 * len(rest))])
    full = trim(model, ctx, 1.0)
    assert remapped(full) is None and stored_bytes(full) == stored_bytes(model)


def test_size_falls_by_the_removed_rows(tok: Any) -> None:
    model, ctx = make("bert", tok)
    out = trim(model, ctx)
    remap = remapped(out)
    removed = model.config.vocab_size - remap.num_kept
    dim = model.config.hidden_size
    mask_bytes = remap.kept_mask.numel()
    assert mask_bytes == -(-model.config.vocab_size // 8)

    def tensor_bytes(m: nn.Module) -> int:
        return sum(t.numel() * t.element_size() for t in _stored(m).values())

    assert tensor_bytes(model) - tensor_bytes(out) == removed * dim * 4 - mask_bytes
    saved = stored_bytes(model) - stored_bytes(out)
    assert abs(saved - (removed * dim * 4 - mask_bytes)) <= 256  # the header's names only


@pytest.mark.parametrize("bits", [8, 4])
def test_composes_with_embedding_quantization(bits: int, tok: Any, tmp_path: Path) -> None:
    from nas_fair.spaces.quantization import QuantizationConfig

    model, ctx = make("bert", tok)
    quant = {"quantization": QuantizationConfig(embedding_bits=bits)}
    only_q = compress(model, quant, ctx)
    both = trim(model, ctx, **quant)
    inner = remapped(both).inner
    assert isinstance(inner, QuantEmbedding) and inner.num_embeddings == remapped(both).num_kept
    ids, mask = tokenize(tok, KEPT_ONLY, 12)
    # rows are quantized one by one, so the kept rows are those of the quantized full table
    assert torch.equal(logits_of(both, ids, mask), logits_of(only_q, ids, mask))
    assert stored_bytes(both) < stored_bytes(only_q)
    back = load_compressed(save_compressed(both, tmp_path / "ckpt"))
    oov_ids, oov_mask = tokenize(tok, WITH_OOV, 12)
    assert torch.equal(logits_of(back, oov_ids, oov_mask), logits_of(both, oov_ids, oov_mask))


def test_invalid_share_states_rule_and_value() -> None:
    with pytest.raises(UserError, match=r"vocabulary.others must be a share in \[0, 1\], got 2"):
        VocabularyConfig(2)
    assert Vocabulary.off() == VocabularyConfig(1.0)


def _search_artifact(model: nn.Module, ctx: CompressionContext, tmp_path: Path, **more: Any
                     ) -> tuple[nn.Module, Path]:
    """A trimmed trial as the search saves it (the original ids still work), loaded back."""
    out = trim(model, ctx, **more)
    folder = save_compressed(out, tmp_path / "trial", metadata={"trial": 0})
    return load_compressed(folder), folder


@pytest.mark.parametrize("bits", [32, 8])
def test_exported_folder_has_the_trimmed_table_and_a_tokenizer_that_agrees(
        bits: int, tok: Any, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    import nas_fair
    from nas_fair.spaces.quantization import QuantizationConfig

    model, ctx = make("bert", tok)
    search_model, folder = _search_artifact(
        model, ctx, tmp_path, quantization=QuantizationConfig(embedding_bits=bits))
    search_bytes = (folder / "model.safetensors").stat().st_size
    texts = KEPT_ONLY + WITH_OOV
    ids, mask = tokenize(tok, texts, 12)  # the search's tensors: the original tokenizer
    want = logits_of(search_model, ids, mask)
    expected_ids = remapped(search_model).new_ids(ids)
    kept = remapped(search_model).num_kept

    export_folder(search_model, tok, folder, texts=texts, input_ids=ids, attention_mask=mask,
                  max_length=12)

    assert not (folder / "vocab.txt").exists()
    config = json.loads((folder / "config.json").read_text())["original_config"]
    assert config["vocab_size"] == kept
    modules = json.loads((folder / "structure.json").read_text())["modules"]
    assert "RemappedEmbedding" not in {m["type"] for m in modules}
    assert json.loads((folder / "nas_fair.json").read_text())["metadata"] == {"trial": 0}
    exported = nas_fair.load(folder)
    table = exported.bert.embeddings.word_embeddings
    assert type(table) is (nn.Embedding if bits == 32 else QuantEmbedding)
    assert table.num_embeddings == kept
    plain = AutoTokenizer.from_pretrained(folder)
    new_ids, new_mask = tokenize(plain, texts, 12)
    assert torch.equal(new_ids, expected_ids) and int(new_ids.max()) < kept
    assert (new_ids == plain.unk_token_id).any()  # the OOV words
    assert plain.convert_ids_to_tokens(plain.unk_token_id) == "[UNK]"
    assert plain.pad_token_id == exported.config.pad_token_id
    assert torch.equal(logits_of(exported, new_ids, new_mask), want)
    assert (folder / "model.safetensors").stat().st_size < search_bytes  # no id map


def test_untrimmed_models_get_the_tokenizer_unchanged(tok: Any, tmp_path: Path) -> None:
    model, _ = make("bert", tok)
    folder = save_compressed(model, tmp_path / "plain")
    ids, mask = tokenize(tok, KEPT_ONLY, 12)
    back = export_folder(load_compressed(folder), tok, folder, texts=KEPT_ONLY, input_ids=ids,
                         attention_mask=mask, max_length=12)
    assert remapped(back) is None
    assert json.loads((folder / "tokenizer.json").read_text()) == json.loads(
        tok.backend_tokenizer.to_str())


def test_exported_onnx_takes_the_new_ids(tok: Any, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    import numpy as np
    import onnxruntime as ort
    from transformers import AutoTokenizer

    from nas_fair.onnx_export import export_onnx

    model, ctx = make("bert", tok)
    search_model, folder = _search_artifact(model, ctx, tmp_path)
    ids, mask = tokenize(tok, WITH_OOV, 12)
    want = logits_of(search_model, ids, mask)
    exported = export_folder(search_model, tok, folder, texts=WITH_OOV, input_ids=ids,
                             attention_mask=mask, max_length=12)
    export_onnx(exported, tmp_path / "model.onnx", int8=False, max_length=12)
    new_ids, new_mask = tokenize(AutoTokenizer.from_pretrained(folder), WITH_OOV, 12)
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"))
    (got,) = sess.run(None, {"input_ids": new_ids.numpy(), "attention_mask": new_mask.numpy()})
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)


def test_words_are_the_fixture_vocabulary() -> None:
    """The texts above use only words the fixture tokenizer knows (no accidental [UNK])."""
    words = {w for text in TRAIN + KEPT_ONLY + WITH_OOV for w in text.split()}
    assert words <= set(WORDS)


def test_augmented_recovery_data_counts_as_training_text(tok: Any) -> None:
    import dataclasses

    from nas_fair.spaces import RecoveryOptions
    from nas_fair.spaces.vocabulary import kept_token_ids

    model, ctx = make("bert", tok)
    engineer = tok.convert_tokens_to_ids("engineer")
    assert engineer not in kept_token_ids(model, ctx, 0.0).tolist()
    ids, mask = tokenize(tok, ["the engineer"], 12)
    extra = RecoveryData(ids, mask, torch.zeros(1, dtype=torch.long), torch.zeros(1, 3))
    with_aug = dataclasses.replace(ctx, recovery=RecoveryOptions(data=extra))
    assert engineer in kept_token_ids(model, with_aug, 0.0).tolist()


def test_reserved_entries_the_tokenizer_never_emits_are_not_candidates() -> None:
    from transformers import BertTokenizerFast

    from nas_fair.spaces.vocabulary import reachable_ids

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[unused0]", "nurse", "##s", "un"]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    got = reachable_ids(tok, 12).tolist()
    assert got[5] is False  # "[unused0]" tokenizes as "[", "un", ... never as itself
    assert got[6] and got[7] and got[8]
    assert got[9:] == [False] * 3  # beyond the tokenizer's vocabulary
    assert reachable_ids(None, 4).tolist() == [True] * 4


def test_a_search_checkpoint_loads_without_the_families(tok: Any, tmp_path: Path) -> None:
    """The search's checkpoint (original ids, bit mask) is rebuilt by the core alone."""
    import subprocess
    import sys

    model, ctx = make("bert", tok)
    folder = save_compressed(trim(model, ctx), tmp_path / "trial")
    ids, mask = tokenize(tok, WITH_OOV, 12)
    torch.save({"ids": ids, "mask": mask}, tmp_path / "batch.pt")
    want = logits_of(load_compressed(folder), ids, mask)
    code = ("import sys, torch; from nas_fair.checkpoint import load_compressed; "
            f"m = load_compressed({str(folder)!r}); b = torch.load({str(tmp_path / 'batch.pt')!r}); "
            "print(type(m.bert.embeddings.word_embeddings).__name__, "
            "'nas_fair.spaces' in sys.modules); "
            "torch.save(m(input_ids=b['ids'], attention_mask=b['mask']).logits.detach(), "
            f"{str(tmp_path / 'out.pt')!r})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["RemappedEmbedding", "False"]
    assert torch.equal(torch.load(tmp_path / "out.pt"), want)


def test_a_trimmed_model_times_in_onnxruntime(tok: Any) -> None:
    """The latency objective's onnxruntime backend exports the search's model as it is (ids
    remapped inside): it must export and run on the original ids."""
    pytest.importorskip("onnxruntime")
    from nas_fair.objectives.onnx_latency import ort_session, ort_timer

    model, ctx = make("bert", tok)
    trimmed = trim(model, ctx)
    sess = ort_session(trimmed, max_length=12, threads=1)
    assert ort_timer(sess, trimmed, 2, 12, None)() > 0

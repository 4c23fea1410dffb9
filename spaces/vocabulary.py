"""Vocabulary trimming: keep only the word-embedding rows of tokens the task's texts use.

The word embeddings are about half of a small BERT's weights, and most of a 30k-token vocabulary
never occurs in one task's texts (TextPruner's vocabulary pruning; Abdaoui et al. 2020, "Load
What You Need"). ``others`` is the share of the tokens *outside* the study's training texts that
is kept as well:

* 1.0: every row (off);
* 0.0: only the tokens that occur in the training split's input ids (as the model sees them,
  after truncation; with the recovery's augmented data when a family replaced it), the
  tokenizer's special tokens, the config's special ids, the words of the gender-swap list
  (both sides, so counterfactual test texts lose no word their originals keep) and any ids in
  ``ctx.extras["keep_token_ids"]`` (the words a WEAT bias objective reads from the encoder);
* in between: that plus the given share of the other tokens the tokenizer can emit
  (:func:`reachable_ids`), lowest ids first. Id order stands in for frequency: BERT's WordPiece
  files list reserved ``[unusedN]`` entries (never emitted, so skipped) and single characters
  first, then word pieces by decreasing corpus frequency; for other vocabularies it is only an
  approximation.

Every other token maps to the unknown token (``[UNK]``; without a tokenizer, the padding id).

During the search the model keeps taking ids of the **original** tokenizer (the study's
tensors are tokenized once): the table becomes a :class:`RemappedEmbedding`, the kept rows (in
ascending original id) plus one bit per original id saying which are kept (3.8 kB for a 30,522
token vocabulary), stored and counted in the size objective because the search's checkpoint
needs it. ``nas-fair export``
then writes the folder as a user gets it (:func:`export_folder`): the plain trimmed table indexed
directly by new ids, ``config.vocab_size`` = kept rows, and a tokenizer (``tokenizer.json``)
whose ids index that table. That tokenizer keeps every original token string, the removed ones
mapped to ``[UNK]``'s new id: a tokenizer holding only the kept strings would segment words
differently (WordPiece's longest match falls back to shorter kept pieces), so it would not
reproduce the predictions the search measured. Its ``get_vocab_size()`` therefore still counts
the original strings; the model's table has ``config.vocab_size`` rows.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from nas_fair.errors import UserError
from nas_fair.modules import RemappedEmbedding
from nas_fair.spaces.base import (
    STAGE_PRUNE,
    Categorical,
    CompressionContext,
    Family,
    FamilyConfig,
    register,
)

# After pruning (which leaves the embeddings alone), before recovery (which keeps the embedding
# block frozen) and before quantization (which then quantizes the trimmed table).
STAGE_VOCABULARY = STAGE_PRUNE + 5
SHARES = (1.0, 0.0, 0.1, 0.3)
# Config attributes holding token ids that the model itself reads or reports.
CONFIG_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id",
                    "cls_token_id", "unk_token_id", "mask_token_id")
# Tokenizer files that list the original ids and would contradict the trimmed tokenizer.json.
STALE_TOKENIZER_FILES = ("vocab.txt", "vocab.json")


@dataclass
class VocabularyConfig(FamilyConfig):
    """Share of the tokens outside the training texts whose embedding rows are kept; 1.0 is off."""

    others: float = 1.0

    def __post_init__(self) -> None:
        v = self.others
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise UserError(f"vocabulary.others must be a share in [0, 1], got {v!r}")
        self.others = float(v)


def word_embedding_slot(model: nn.Module) -> tuple[nn.Module, str, nn.Module]:
    """(embeddings module, attribute, table) of the word embeddings of a BERT-family model."""
    emb_root = getattr(getattr(model, "base_model", model), "embeddings", None)
    table = getattr(emb_root, "word_embeddings", None)
    if emb_root is None or table is None:
        raise UserError(f"{type(model).__name__} has no embeddings.word_embeddings; vocabulary "
                        "trimming supports BERT, RoBERTa and DistilBERT-style models")
    return emb_root, "word_embeddings", table


def unknown_id(model: nn.Module, tokenizer: Any) -> int:
    """The id out-of-vocabulary tokens map to: the tokenizer's unknown token, else padding."""
    unk = getattr(tokenizer, "unk_token_id", None) if tokenizer is not None else None
    if unk is None:
        unk = getattr(model.config, "pad_token_id", None)
    return int(unk) if unk is not None else 0


def swap_word_ids(tokenizer: Any) -> list[int]:
    """Token ids of both sides of the gender-swap list (empty where the list is not installed):
    kept, so a counterfactual test text never loses a word its original keeps, and the
    counterfactual flip rate measures the model rather than the trimming."""
    from nas_fair.swaps import load_winobias_swaps

    try:
        words = sorted({w for pair in load_winobias_swaps().items() for w in pair})
    except UserError:
        return []
    if not words:
        return []
    encoded = tokenizer(words, add_special_tokens=False)["input_ids"]
    return sorted({int(i) for ids in encoded for i in ids})


_REACHABLE: dict[int, tuple[Any, int, torch.Tensor]] = {}


def reachable_ids(tokenizer: Any, n: int) -> torch.Tensor:
    """Boolean (n,): ids the tokenizer can emit, the candidates of ``others``. With a WordPiece
    tokenizer a word-start token counts when its own text tokenizes back to it (BERT's
    ``[unusedN]`` entries do not), a continuation piece always; ids outside the tokenizer's
    vocabulary never count. Without a tokenizer every id counts. Cached per tokenizer."""
    if tokenizer is None:
        return torch.ones(n, dtype=torch.bool)
    hit = _REACHABLE.get(id(tokenizer))
    if hit is not None and hit[0] is tokenizer and hit[1] == n:
        return hit[2]
    vocab = {t: int(i) for t, i in tokenizer.get_vocab().items() if 0 <= int(i) < n}
    out = torch.zeros(n, dtype=torch.bool)
    out[list(vocab.values())] = True
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = json.loads(backend.to_str()).get("model", {}) if backend is not None else {}
    if model.get("type") == "WordPiece":
        prefix = model.get("continuing_subword_prefix") or "##"
        words = [t for t in vocab if not t.startswith(prefix)]
        encoded = tokenizer(words, add_special_tokens=False)["input_ids"] if words else []
        for word, ids in zip(words, encoded):
            if list(ids) != [vocab[word]]:
                out[vocab[word]] = False
    _REACHABLE[id(tokenizer)] = (tokenizer, n, out)
    return out


def kept_token_ids(model: nn.Module, ctx: CompressionContext, others: float) -> torch.Tensor:
    """Sorted original ids whose rows are kept (see the module docstring)."""
    n = int(word_embedding_slot(model)[2].num_embeddings)
    used = torch.zeros(n, dtype=torch.bool)
    sources = [ctx.train.input_ids]
    if ctx.recovery is not None and ctx.recovery.data is not None:  # e.g. augmented training data
        sources.append(ctx.recovery.data.input_ids)
    for ids in sources:
        used[ids[(ids >= 0) & (ids < n)].unique()] = True
    specials = [unknown_id(model, ctx.tokenizer)]
    if ctx.tokenizer is not None:
        specials += list(getattr(ctx.tokenizer, "all_special_ids", []) or [])
        specials += swap_word_ids(ctx.tokenizer)
    specials += list(ctx.extras.get("keep_token_ids", ()))  # e.g. the bias objective's words
    specials += [getattr(model.config, a, None) for a in CONFIG_TOKEN_IDS]
    for i in specials:
        if isinstance(i, int) and 0 <= i < n:
            used[i] = True
    rest = (~used & reachable_ids(ctx.tokenizer, n)).nonzero().flatten()  # lowest ids first
    extra = round(others * len(rest))
    used[rest[:extra]] = True
    return used.nonzero().flatten()


@register
class Vocabulary(Family):
    name = "vocabulary"
    stage = STAGE_VOCABULARY
    config_class = VocabularyConfig
    params: ClassVar = {"others": Categorical(SHARES)}
    composes_with = frozenset({"pruning", "lowrank", "sharing", "distillation", "quantization",
                               "mitigation"})

    def apply(self, model: nn.Module, config: FamilyConfig, ctx: CompressionContext) -> nn.Module:
        from nas_fair.checkpoint import stored_bytes

        assert isinstance(config, VocabularyConfig)
        if config.others >= 1.0:
            return model
        parent, attr, table = word_embedding_slot(model)
        if not isinstance(table, nn.Embedding):
            raise UserError(f"vocabulary trimming needs a plain nn.Embedding word table, got "
                            f"{type(table).__name__}")
        kept = kept_token_ids(model, ctx, config.others)
        if len(kept) >= table.num_embeddings:
            return model
        before = stored_bytes(model)
        setattr(parent, attr, RemappedEmbedding.from_embedding(
            table, kept, unknown_id(model, ctx.tokenizer)))
        if stored_bytes(model) >= before:  # a tiny vocabulary: the id map costs what it saves
            setattr(parent, attr, table)
        return model


# --------------------------------------------------------------------------- export


def remapped(model: nn.Module) -> RemappedEmbedding | None:
    """The model's remapped word table, or None when its vocabulary is untrimmed."""
    found = [m for m in model.modules() if isinstance(m, RemappedEmbedding)]
    return found[0] if found else None


def to_direct_ids(model: nn.Module) -> dict[int, int]:
    """Make ``model`` (in place) take the new ids: the plain kept table, ``config.vocab_size``
    and the config's special ids updated. Returns original id -> new id of the kept tokens."""
    remap = remapped(model)
    if remap is None:
        return {}
    new_of = {int(o): i for i, o in enumerate(remap.kept_ids().tolist())}
    parent, attr, _ = word_embedding_slot(model)
    setattr(parent, attr, remap.inner)
    config = model.config
    config.vocab_size = remap.num_kept
    for name in CONFIG_TOKEN_IDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            setattr(config, name, new_of.get(value, remap.unk_index))
    if isinstance(getattr(parent, "padding_idx", None), int):  # RoBERTa's position ids read it
        parent.padding_idx = new_of.get(parent.padding_idx, remap.unk_index)
    return new_of


def _remap_ids(node: Any, new_of: dict[int, int], unk: int) -> Any:
    """Token ids inside a tokenizer.json post-processor (template ``ids`` lists, the
    ``[token, id]`` pairs of Bert/RobertaProcessing), remapped."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "ids" and isinstance(value, list):
                out[key] = [new_of.get(int(i), unk) for i in value]
            elif (key in ("sep", "cls") and isinstance(value, list) and len(value) == 2
                  and isinstance(value[1], int)):
                out[key] = [value[0], new_of.get(value[1], unk)]
            else:
                out[key] = _remap_ids(value, new_of, unk)
        return out
    if isinstance(node, list):
        return [_remap_ids(v, new_of, unk) for v in node]
    return node


def trimmed_tokenizer_json(tokenizer: Any, new_of: dict[int, int], unk: int) -> str:
    """The tokenizer's ``tokenizer.json`` with ids of the trimmed table: every kept token at its
    new id, every other token string at ``unk`` (so encoding equals the search's remapping)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError("vocabulary trimming can only export a fast (tokenizers) tokenizer; "
                        f"{type(tokenizer).__name__} has no tokenizer.json")
    data = json.loads(backend.to_str())
    vocab = data.get("model", {}).get("vocab")
    if not isinstance(vocab, dict):
        kind = data.get("model", {}).get("type")
        raise UserError("vocabulary trimming exports tokenizers with a token -> id vocabulary "
                        f"(WordPiece, BPE, WordLevel), got {kind}")
    data["model"]["vocab"] = {t: new_of.get(int(i), unk) for t, i in vocab.items()}
    for added in data.get("added_tokens") or []:
        added["id"] = new_of.get(int(added["id"]), unk)
    if data.get("post_processor") is not None:
        data["post_processor"] = _remap_ids(data["post_processor"], new_of, unk)
    if isinstance(data.get("padding"), dict) and isinstance(data["padding"].get("pad_id"), int):
        data["padding"]["pad_id"] = new_of.get(data["padding"]["pad_id"], unk)
    return json.dumps(data, ensure_ascii=False)


def save_trimmed_tokenizer(tokenizer: Any, directory: Path, new_of: dict[int, int],
                           unk: int) -> None:
    """Save ``tokenizer`` into ``directory`` with the trimmed table's ids (a plain Hugging Face
    tokenizer folder: ``AutoTokenizer.from_pretrained`` reads it without nas-fair)."""
    text = trimmed_tokenizer_json(tokenizer, new_of, unk)  # validated before anything is written
    tokenizer.save_pretrained(str(directory))
    (directory / "tokenizer.json").write_text(text, encoding="utf-8")
    for name in STALE_TOKENIZER_FILES:
        (directory / name).unlink(missing_ok=True)
    config_file = directory / "tokenizer_config.json"
    if config_file.is_file():
        conf = json.loads(config_file.read_text(encoding="utf-8"))
        if isinstance(conf.get("added_tokens_decoder"), dict):
            conf["added_tokens_decoder"] = {
                str(new_of.get(int(k), unk)): v for k, v in conf["added_tokens_decoder"].items()}
            config_file.write_text(json.dumps(conf, indent=2, ensure_ascii=False) + "\n",
                                   encoding="utf-8")


def export_folder(model: nn.Module, tokenizer: Any, dest: Path, *, texts: Sequence[str],
                  input_ids: torch.Tensor, attention_mask: torch.Tensor, max_length: int,
                  groups: Sequence[Any] | None = None, check_rows: int = 64) -> nn.Module:
    """Write ``tokenizer`` next to the checkpoint in ``dest`` and return the model as saved there.

    An untrimmed model: the tokenizer as it is. A trimmed one (``model`` takes original ids,
    ``input_ids`` are ``texts`` tokenized by the original tokenizer): the checkpoint in ``dest``
    is rewritten with the trimmed table indexed directly (no id map) and the trimmed tokenizer;
    then the folder is loaded back and must tokenize every text to exactly the search's remapped
    ids, and give the search model's logits on the first ``check_rows`` rows.
    """
    from transformers import AutoTokenizer

    from nas_fair.checkpoint import load_compressed, save_compressed
    from nas_fair.modeling import predict_logits, tokenize, transformers_errors_only

    remap = remapped(model)
    if remap is None:
        tokenizer.save_pretrained(str(dest))
        return model
    trimmed_tokenizer_json(tokenizer, {}, 0)  # refuse an unsupported tokenizer before writing
    with torch.no_grad():
        expected_ids = remap.new_ids(input_ids)
    rows = slice(0, min(check_rows, len(input_ids)))
    row_groups = None if groups is None else list(groups)[rows]
    want = predict_logits(model, input_ids[rows], attention_mask[rows], groups=row_groups)
    metadata = getattr(model, "nas_fair_metadata", None)
    new_of = to_direct_ids(model)
    tmp = dest.parent / f".{dest.name}.vocabulary"
    save_compressed(model, tmp, metadata=metadata)
    save_trimmed_tokenizer(tokenizer, tmp, new_of, remap.unk_index)
    shutil.rmtree(dest)
    tmp.rename(dest)
    back = load_compressed(dest)
    # transformers warns that it reads config.json's model type "nas-fair-compressed" with a
    # generic config: expected, the tokenizer files are complete
    with transformers_errors_only():
        back_tokenizer = AutoTokenizer.from_pretrained(str(dest))
    ids, mask = tokenize(back_tokenizer, list(texts), max_length)
    if not (torch.equal(ids, expected_ids) and torch.equal(mask, attention_mask)):
        bad = int((ids != expected_ids).any(dim=1).sum()) if ids.shape == expected_ids.shape \
            else len(ids)
        raise UserError(f"the trimmed tokenizer in {dest} disagrees with the search's id map on "
                        f"{bad} of {len(texts)} test texts; nothing was exported")
    got = predict_logits(back, ids[rows], mask[rows], groups=row_groups)
    if not torch.equal(got, want):
        raise UserError(f"the trimmed model in {dest} does not reproduce the search model's "
                        "logits; nothing was exported")
    return back

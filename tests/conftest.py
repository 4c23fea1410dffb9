"""Tiny BERT-family models built from configs (seconds on 2 cores), shared by every test."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(1)

WORDS = (
    "he she his her him himself herself man woman nurse doctor teacher lawyer writer singer "
    "the a is was and of to in at with for said works as an who because did not like "
    "engineer cook sheriff clerk baker good bad new old my your their"
).split()


def tiny_config(kind: str = "bert", num_labels: int = 3, vocab_size: int = 128):
    from transformers import BertConfig, DistilBertConfig, RobertaConfig

    if kind == "bert":
        return BertConfig(
            vocab_size=vocab_size, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64, num_labels=num_labels,
        )
    if kind == "roberta":
        return RobertaConfig(
            vocab_size=vocab_size, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=72, num_labels=num_labels,
            pad_token_id=1,
        )
    if kind == "distilbert":
        return DistilBertConfig(
            vocab_size=vocab_size, dim=32, n_layers=4, n_heads=4, hidden_dim=64,
            max_position_embeddings=64, num_labels=num_labels,
        )
    raise ValueError(kind)


def tiny_model(kind: str = "bert", num_labels: int = 3, seed: int = 0):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(tiny_config(kind, num_labels))
    return model.eval()


@pytest.fixture(params=["bert", "roberta", "distilbert"])
def any_tiny_model(request):
    return tiny_model(request.param)


@pytest.fixture
def tiny_bert():
    return tiny_model("bert")


def random_batch(n: int = 8, length: int = 12, vocab: int = 128, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[: n // 2, length // 2 :] = 0  # some padding, as real batches have
    return ids, mask


def tiny_context(model, n: int = 64, length: int = 12, steps: int = 0, seed: int = 0):
    """A CompressionContext over random tokens with the model's own logits as the teacher's."""
    from nas_fair.spaces import CompressionContext, RecoveryData

    ids, mask = random_batch(n, length, seed=seed)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    labels = logits.argmax(-1)
    data = RecoveryData(ids, mask, labels, logits.float(),
                        groups=["f" if i % 3 == 0 else "m" for i in range(n)])
    return CompressionContext(reference=model, train=data, seed=seed, batch_size=16,
                              recovery_steps=steps)


@pytest.fixture
def tiny_tokenizer_dir(tmp_path: Path) -> Path:
    """A WordPiece tokenizer over WORDS, saved as a Hugging Face tokenizer folder."""
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    out = tmp_path / "tok"
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server for the session (tests/pg_server.py); skips if not installed."""
    from pg_server import start_server

    server = start_server()
    try:
        yield server
    finally:
        server.stop()


class RandomTrial:
    """Just enough of optuna's Trial to draw a family's parameters from its table (seeded)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any:
        return self.rng.choice(list(choices))

    def suggest_float(self, name: str, low: float, high: float, step: float | None = None) -> float:
        if step:
            return round(low + step * self.rng.randint(0, round((high - low) / step)), 10)
        return self.rng.uniform(low, high)

    def suggest_int(self, name: str, low: int, high: int, step: int = 1) -> int:
        return self.rng.randrange(low, high + 1, step)

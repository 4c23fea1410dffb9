"""The contract every registered compression family must keep, and what each one really does.

Generic tests run over ``REGISTRY`` (a new family file is tested without touching this one) and
over seeded random combinations of composing families, on tiny BERT, RoBERTa and DistilBERT.
"""

from __future__ import annotations

import dataclasses
import json
import random
from typing import Any

import pytest
import torch
from torch import nn

from nas_fair.checkpoint import load_compressed, param_count, save_compressed, stored_bytes
from nas_fair.encoder import encoder_layers, layer_parts, num_heads
from nas_fair.errors import UserError
from nas_fair.modules import (
    DynamicInt8Linear,
    Fp16Linear,
    HalfEmbedding,
    LowRankLinear,
    Packed4Linear,
    QuantEmbedding,
    RowInt8Linear,
    pack_int4,
    unpack_int4,
)
from nas_fair.spaces import REGISTRY, CompressionContext, RecoveryData, compress
from nas_fair.spaces.base import Categorical, FloatRange, IntRange

from conftest import RandomTrial, random_batch, tiny_context, tiny_model

KINDS = ("bert", "roberta", "distilbert")
FAMILIES = sorted(REGISTRY)

# A setting that clearly changes the model, per known family; unknown (future) families get a
# random draw from their own table instead.
STRONG: dict[str, dict[str, Any]] = {
    "pruning": {"heads": 0.5, "ffn": 0.5, "layers": 1},
    "lowrank": {"attention_rank": 0.5, "ffn_rank": 0.25, "activation_aware": True},
    "sharing": {"group_size": 2},
    "distillation": {"steps": 4, "temperature": 2.0, "alpha": 0.5},
    "quantization": {"attention_bits": 8, "ffn_bits": 4, "embedding_bits": 8},
    "vocabulary": {"others": 0.0},
}
# Small recovery budgets so that random combinations stay fast.
OPTIONS = {"distillation": {"steps": [0, 3]}}


_MODELS: dict[str, nn.Module] = {}
_CONTEXTS: dict[str, CompressionContext] = {}


def model_and_ctx(kind: str) -> tuple[nn.Module, CompressionContext]:
    """One tiny model and context per kind for the whole module (they are never mutated)."""
    if kind not in _MODELS:
        _MODELS[kind] = tiny_model(kind)
        _CONTEXTS[kind] = tiny_context(_MODELS[kind])
    return _MODELS[kind], _CONTEXTS[kind]


IDS, MASK = random_batch(6, 10, seed=11)


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


def strong_config(name: str, seed: int = 0):  # noqa: ANN201
    cls = REGISTRY[name]
    if name in STRONG:
        return cls.config_class.from_dict(STRONG[name])
    fam = cls(OPTIONS.get(name))
    rng = random.Random(seed)
    for _ in range(20):  # a draw that differs from off
        cfg = fam.suggest(RandomTrial(rng))
        if cfg != cls.off():
            return cfg
    return cfg


def random_recipe(seed: int) -> dict[str, Any]:
    """A random set of mutually composing families with random parameters from their tables."""
    rng = random.Random(seed)
    names = FAMILIES[:]
    rng.shuffle(names)
    chosen: list[str] = []
    for name in names:
        # Either side may declare the pairing, so a new family lists the old ones it composes
        # with and no existing file needs an edit.
        if all(
            name in REGISTRY[c].composes_with or c in REGISTRY[name].composes_with for c in chosen
        ):
            if not chosen or rng.random() < 0.7:
                chosen.append(name)
    trial = RandomTrial(rng)
    return {n: REGISTRY[n](OPTIONS.get(n)).suggest(trial) for n in chosen}


def check_compressed(
    ref: nn.Module, configs: dict[str, Any], ctx: CompressionContext, tmp_path
) -> nn.Module:  # noqa: ANN001
    """Everything every compressed model must satisfy; returns the compressed model."""
    out = compress(ref, configs, ctx)
    assert not out.training
    y = logits(out)
    assert y.shape == logits(ref).shape
    assert torch.isfinite(y).all()
    assert param_count(out) <= param_count(ref)
    assert stored_bytes(out) <= stored_bytes(ref)
    # Same seed and params: identical logits.
    assert torch.equal(logits(compress(ref, configs, ctx)), y)
    # Checkpoint round trip: identical logits, sizes and counts.
    path = save_compressed(out, tmp_path / "ckpt")
    back = load_compressed(path)
    assert torch.equal(logits(back), y)
    assert stored_bytes(back) == stored_bytes(out)
    assert param_count(back) == param_count(out)
    return out


# --------------------------------------------------------------------------- generic contract


def test_every_family_is_registered_with_a_complete_table() -> None:
    assert {"pruning", "lowrank", "sharing", "distillation", "quantization"} <= set(REGISTRY)
    for name, cls in REGISTRY.items():
        fields = {f.name for f in dataclasses.fields(cls.config_class)}
        assert set(cls.params) == fields, f"{name}: every config field must be in the table"
        assert cls.composes_with <= set(REGISTRY), name
        off = cls.off().to_dict()
        for key, spec in cls.params.items():  # off is an ordinary value of every range
            value = off[key]
            if isinstance(spec, Categorical):
                assert value in spec.choices, (name, key)
            elif isinstance(spec, (FloatRange, IntRange)):
                assert spec.low <= value <= spec.high, (name, key)
        assert cls.config_class.from_dict(off) == cls.off()


@pytest.mark.parametrize("name", FAMILIES)
def test_suggest_with_optuna(name: str) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    fam = REGISTRY[name]()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(3):
        cfg = fam.suggest(study.ask())
        assert isinstance(cfg, REGISTRY[name].config_class)


@pytest.mark.parametrize("name", FAMILIES)
def test_config_round_trips_through_json(name: str) -> None:
    """to_dict -> JSON -> from_dict gives the same config with the same JSON (recipe.json, the
    stored trial parameters): off, the strong setting and draws across the whole table."""
    cls = REGISTRY[name]
    fam = cls(OPTIONS.get(name))
    rng = random.Random(0)
    configs = [cls.off(), strong_config(name)] + [fam.suggest(RandomTrial(rng)) for _ in range(20)]
    for cfg in configs:
        text = json.dumps(cfg.to_dict(), allow_nan=False)
        back = cls.config_class.from_dict(json.loads(text))
        assert type(back) is cls.config_class and back == cfg, (name, cfg, back)
        assert json.dumps(back.to_dict()) == text, name  # same keys, order and value types


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", FAMILIES)
def test_off_is_identity(name: str, kind: str) -> None:
    ref, ctx = model_and_ctx(kind)
    out = compress(ref, {name: REGISTRY[name].off()}, ctx)
    assert torch.equal(logits(out), logits(ref))
    assert stored_bytes(out) == stored_bytes(ref)
    assert param_count(out) == param_count(ref)


@pytest.mark.parametrize("kind", KINDS)
def test_all_off_is_identity(kind: str) -> None:
    ref, ctx = model_and_ctx(kind)
    out = compress(ref, {n: c.off() for n, c in REGISTRY.items()}, ctx)
    assert torch.equal(logits(out), logits(ref))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", FAMILIES)
def test_family_alone(name: str, kind: str, tmp_path) -> None:  # noqa: ANN001
    ref, ctx = model_and_ctx(kind)
    cfg = strong_config(name)
    recipe, before = {name: cfg}, ref
    if name == "distillation":  # recovering an unchanged model is skipped (tested below)
        recipe = {"pruning": strong_config("pruning"), name: cfg}
        before = compress(ref, {"pruning": strong_config("pruning")}, ctx)
    out = check_compressed(ref, recipe, ctx, tmp_path)
    changed = (
        not torch.equal(logits(out), logits(before))
        or stored_bytes(out) < stored_bytes(before)
        or param_count(out) < param_count(before)
    )
    assert changed, f"{name} {cfg} changed nothing"


def test_recovery_of_an_unchanged_student_is_skipped() -> None:
    from nas_fair.spaces.recovery import recovery_logs

    ref, ctx = model_and_ctx("bert")
    cfg = strong_config("distillation")
    for recipe in ({"distillation": cfg},
                   {"pruning": REGISTRY["pruning"].off(), "distillation": cfg,
                    "quantization": strong_config("quantization")}):
        out = compress(ref, recipe, ctx)
        assert [(r["steps_run"], r.get("skipped")) for r in recovery_logs(out)] == [
            (0, "the student equals the reference")]
    assert torch.equal(logits(compress(ref, {"distillation": cfg}, ctx)), logits(ref))
    pruned = compress(ref, {"pruning": strong_config("pruning"), "distillation": cfg}, ctx)
    assert [r["steps_run"] for r in recovery_logs(pruned)] == [cfg.steps]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", range(4))
def test_random_combinations(seed: int, kind: str, tmp_path) -> None:  # noqa: ANN001
    ref, ctx = model_and_ctx(kind)
    recipe = random_recipe(seed * 7 + KINDS.index(kind))
    check_compressed(ref, recipe, ctx, tmp_path)


@pytest.mark.parametrize("kind", KINDS)
def test_everything_strong(kind: str, tmp_path) -> None:  # noqa: ANN001
    ref, ctx = model_and_ctx(kind)
    recipe = {n: strong_config(n) for n in FAMILIES}
    out = check_compressed(ref, recipe, ctx, tmp_path)
    assert stored_bytes(out) < stored_bytes(ref) / 4


def _bad_value(value: Any) -> Any:
    if isinstance(value, bool):
        return "maybe"
    if isinstance(value, (int, float)):
        return -1
    return object()


@pytest.mark.parametrize("name", FAMILIES)
def test_invalid_values_name_rule_and_value(name: str) -> None:
    cls = REGISTRY[name]
    off = cls.off().to_dict()
    for key, value in off.items():
        bad = _bad_value(value)
        with pytest.raises(ValueError) as err:
            cls.config_class.from_dict({**off, key: bad})
        msg = str(err.value)
        assert key in msg and repr(bad) in msg, msg
        assert "must" in msg, msg  # states the rule
    with pytest.raises(UserError, match="unknown parameter"):
        cls.config_class.from_dict({"no_such_param": 1})


@pytest.mark.parametrize(
    ("name", "key", "value", "rule"),
    [
        ("pruning", "heads", 1.0, "[0, 1)"),
        ("pruning", "layers", 1.5, "integer"),
        ("lowrank", "ffn_rank", 0.0, "(0, 1]"),
        ("sharing", "group_size", 5, "one of 1, 2, 3, 4, 6"),
        ("distillation", "alpha", 1.5, "[0, 1]"),
        ("distillation", "temperature", 0, "> 0"),
        ("quantization", "ffn_bits", 3, "one of 32, 16, 8, 4"),
    ],
)
def test_specific_invalid_values(name: str, key: str, value: Any, rule: str) -> None:
    with pytest.raises(UserError) as err:
        REGISTRY[name].config_class.from_dict({key: value})
    assert rule in str(err.value) and repr(value) in str(err.value)


def test_bad_option_range_is_caught_at_build_time() -> None:
    with pytest.raises(UserError, match="bits must be one of"):
        REGISTRY["quantization"]({"ffn_bits": [8, 3]})


# --------------------------------------------------------------------------- pruning


@pytest.mark.parametrize("kind", KINDS)
def test_pruning_removes_structure_physically(kind: str) -> None:
    ref, ctx = model_and_ctx(kind)
    cfg = REGISTRY["pruning"].config_class(heads=0.5, ffn=0.5, layers=1)
    out = compress(ref, {"pruning": cfg}, ctx)
    layers = encoder_layers(out)
    assert len(layers) == len(encoder_layers(ref)) - 1
    heads = [num_heads(layer_parts(m).attention) for m in layers]
    assert all(h >= 1 for h in heads)
    assert sum(heads) == round(0.5 * 4 * len(layers))
    for layer in layers:
        p = layer_parts(layer)
        d = p.attention.attention_head_size
        assert getattr(*p.q).out_features == num_heads(p.attention) * d
        assert getattr(*p.attn_out).in_features == num_heads(p.attention) * d
        assert getattr(*p.ffn_in).out_features == 32
        assert getattr(*p.ffn_out).in_features == 32
    assert param_count(out) < 0.7 * param_count(ref)


def test_pruning_keeps_a_head_per_layer_and_clamps_layers() -> None:
    ref, ctx = model_and_ctx("bert")
    cfg = REGISTRY["pruning"].config_class(heads=0.9, ffn=0.0, layers=3)
    out = compress(ref, {"pruning": cfg}, ctx)
    layers = encoder_layers(out)
    assert len(layers) == 2  # 3 clamped to half of 4
    assert [num_heads(layer_parts(m).attention) for m in layers] == [1, 1]
    assert out.config.num_hidden_layers == 2


def test_pruning_importance_is_cached(tmp_path) -> None:  # noqa: ANN001
    ref, _ = model_and_ctx("bert")
    cfg = REGISTRY["pruning"].config_class(heads=0.5, ffn=0.25)
    a = tiny_context(ref)
    a.cache_dir = tmp_path
    first = logits(compress(ref, {"pruning": cfg}, a))
    files = list(tmp_path.glob("pruning-importance-*.safetensors"))
    assert len(files) == 1
    assert len(a.extras["pruning.importance"]) == 1
    b = tiny_context(ref)  # fresh memo: must come from the file
    b.cache_dir = tmp_path
    assert torch.equal(logits(compress(ref, {"pruning": cfg}, b)), first)


def test_pruning_without_data_uses_magnitude() -> None:
    ref, _ = model_and_ctx("distilbert")
    empty = RecoveryData(
        torch.zeros(0, 4, dtype=torch.long),
        torch.zeros(0, 4, dtype=torch.long),
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, 3),
    )
    ctx = CompressionContext(reference=ref, train=empty)
    cfg = REGISTRY["pruning"].config_class(heads=0.25, ffn=0.5)
    out = compress(ref, {"pruning": cfg}, ctx)
    assert param_count(out) < param_count(ref)


def test_pruning_uses_importance_not_order() -> None:
    """Heads whose output projection columns are zeroed contribute nothing; they go first."""
    ref = tiny_model("bert")
    with torch.no_grad():
        for layer in encoder_layers(ref):
            layer.attention.output.dense.weight[:, 0:8] = 0  # head 0 of every layer is dead
    ctx = tiny_context(ref)
    out = compress(ref, {"pruning": REGISTRY["pruning"].config_class(heads=0.25)}, ctx)
    for layer in encoder_layers(out):
        assert num_heads(layer.attention.self) == 3
        assert layer.attention.output.dense.weight.abs().min(0).values.gt(0).all()


# --------------------------------------------------------------------------- low rank


def test_lowrank_replaces_only_where_it_saves() -> None:
    ref, ctx = model_and_ctx("bert")
    cfg = REGISTRY["lowrank"].config_class(attention_rank=0.5, ffn_rank=1.0)
    out = compress(ref, {"lowrank": cfg}, ctx)
    layer = encoder_layers(out)[0]
    q = layer.attention.self.query
    assert isinstance(q, LowRankLinear) and q.rank == 8  # 0.5 * 32*32 / 64
    assert type(layer.intermediate.dense) is nn.Linear
    assert param_count(out) < param_count(ref)


def test_lowrank_activation_aware_differs() -> None:
    ref, ctx = model_and_ctx("roberta")
    plain = compress(ref, {"lowrank": REGISTRY["lowrank"].config_class(0.5, 0.5, False)}, ctx)
    aware = compress(ref, {"lowrank": REGISTRY["lowrank"].config_class(0.5, 0.5, True)}, ctx)
    assert param_count(plain) == param_count(aware)
    assert not torch.equal(logits(plain), logits(aware))


# --------------------------------------------------------------------------- sharing


@pytest.mark.parametrize("kind", KINDS)
def test_sharing_ties_layers(kind: str) -> None:
    ref, ctx = model_and_ctx(kind)
    out = compress(ref, {"sharing": REGISTRY["sharing"].config_class(group_size=3)}, ctx)
    layers = list(encoder_layers(out))
    assert layers[0] is layers[1] is layers[2] and layers[3] is not layers[0]
    assert len(layers) == 4
    assert stored_bytes(out) < stored_bytes(ref)
    n_unique = sum(p.numel() for p in out.parameters())
    assert param_count(out) == n_unique < param_count(ref)


# --------------------------------------------------------------------------- distillation


def test_distillation_trains_deterministically_and_seed_matters() -> None:
    ref, _ = model_and_ctx("bert")
    cfg = REGISTRY["distillation"].config_class(steps=3, temperature=4.0, alpha=0.7)
    recipe = {"sharing": REGISTRY["sharing"].config_class(group_size=2), "distillation": cfg}
    a = compress(ref, recipe, tiny_context(ref, seed=0))
    b = compress(ref, recipe, tiny_context(ref, seed=0))
    c = compress(ref, recipe, tiny_context(ref, seed=1))
    assert torch.equal(logits(a), logits(b))
    assert not torch.equal(logits(a), logits(c))
    assert not a.training
    # Embeddings frozen during recovery, trainable again afterwards.
    emb_a = a.bert.embeddings.word_embeddings.weight
    assert torch.equal(emb_a, ref.bert.embeddings.word_embeddings.weight)
    assert all(p.requires_grad for p in a.parameters())
    assert not torch.equal(a.classifier.weight, ref.classifier.weight)


def test_recover_accepts_extra_loss_and_sample_weights() -> None:
    from nas_fair.spaces.recovery import Batch, recover

    ref, ctx = model_and_ctx("distilbert")
    calls: list[int] = []

    def extra(model: nn.Module, batch: Batch, out: torch.Tensor) -> torch.Tensor:
        calls.append(len(batch.index))
        assert out.shape == (len(batch.index), 3) and batch.weights is not None
        return out.pow(2).mean() * 0.1

    weights = torch.ones(len(ctx.train))
    weights[::2] = 0
    model = tiny_model("distilbert")
    out = recover(
        model,
        ctx,
        steps=2,
        temperature=2.0,
        alpha=0.5,
        lr=1e-3,
        extra_loss=extra,
        sample_weights=weights,
    )
    assert out is model and not out.training
    assert calls == [16, 16]
    with pytest.raises(UserError, match="one weight per training example"):
        recover(model, ctx, steps=1, temperature=2.0, alpha=0.5, sample_weights=torch.ones(3))


def test_recover_uses_the_study_learning_rate() -> None:
    from nas_fair.spaces.base import RecoveryConfig
    from nas_fair.spaces.recovery import recover

    ref, _ = model_and_ctx("bert")
    slow, fast = tiny_context(ref), tiny_context(ref)
    slow.recovery_config = RecoveryConfig(lr=1e-6)
    fast.recovery_config = RecoveryConfig(lr=1e-2)
    a = recover(tiny_model("bert"), slow, steps=2, temperature=2.0, alpha=0.9)
    b = recover(tiny_model("bert"), fast, steps=2, temperature=2.0, alpha=0.9)
    da = (a.classifier.weight - ref.classifier.weight).abs().max()
    db = (b.classifier.weight - ref.classifier.weight).abs().max()
    assert da < db


# --------------------------------------------------------------------------- quantization


def _modules(model: nn.Module, cls: type) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, cls)]


@pytest.mark.parametrize("kind", KINDS)
def test_quantization_int8_is_per_row_int8(kind: str) -> None:
    ref, ctx = model_and_ctx(kind)
    cfg = REGISTRY["quantization"].config_class(8, 8, 8)
    out = compress(ref, {"quantization": cfg}, ctx)
    int8 = _modules(out, RowInt8Linear)
    assert not _modules(out, DynamicInt8Linear)  # one activation scale per batch: not used
    assert int8[0].qweight_t.dtype == torch.int8
    assert int8[0].weight_scales.shape == (int8[0].out_features,)
    # 4 layers x (4 attention + 2 ffn) + pooler / pre-classifier / classification dense.
    assert len(int8) == 4 * 6 + 1
    assert sum(type(m) is nn.Linear for m in out.modules()) == 1  # the output projection
    assert len(_modules(out, QuantEmbedding)) >= 2
    assert param_count(out) == param_count(ref)


def test_quantization_4bit_storage_is_an_eighth() -> None:
    lin = nn.Linear(128, 64)
    q = Packed4Linear.from_linear(lin)
    weight_bytes = q.packed.numel() + q.scales.numel() * 2
    ratio = weight_bytes / (lin.weight.numel() * 4)
    assert 0.125 <= ratio <= 0.14
    x = torch.randn(5, 128)
    assert (q(x) - lin(x)).abs().max() < 0.1 * lin(x).abs().max()
    ref, ctx = model_and_ctx("bert")
    out = compress(ref, {"quantization": REGISTRY["quantization"].config_class(4, 4, 4)}, ctx)
    assert len(_modules(out, Packed4Linear)) == 4 * 6 + 1
    assert stored_bytes(out) < stored_bytes(ref) / 4


def test_pack_int4_round_trip() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (7, 10), generator=g, dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 5)
    assert torch.equal(unpack_int4(packed), q.float())


def test_quantization_16bit_and_embeddings() -> None:
    ref, ctx = model_and_ctx("roberta")
    out = compress(ref, {"quantization": REGISTRY["quantization"].config_class(16, 32, 16)}, ctx)
    fp16 = _modules(out, Fp16Linear)
    assert len(fp16) == 4 * 4 and fp16[0].weight.dtype == torch.float16
    assert len(_modules(out, HalfEmbedding)) == 3  # word, position, token type
    assert (logits(out) - logits(ref)).abs().max() < 1e-3
    out4 = compress(ref, {"quantization": REGISTRY["quantization"].config_class(32, 32, 4)}, ctx)
    emb = out4.roberta.embeddings.word_embeddings
    assert isinstance(emb, QuantEmbedding) and emb.qweight.dtype == torch.uint8


@pytest.mark.parametrize("kind", KINDS)
def test_quantization_keeps_sharing_and_quantizes_lowrank_factors(kind: str) -> None:
    ref, ctx = model_and_ctx(kind)
    recipe = {
        "lowrank": REGISTRY["lowrank"].config_class(0.5, 0.5),
        "sharing": REGISTRY["sharing"].config_class(2),
        "quantization": REGISTRY["quantization"].config_class(8, 4, 32),
    }
    out = compress(ref, recipe, ctx)
    layers = list(encoder_layers(out))
    assert layers[0] is layers[1] and layers[2] is layers[3]
    lowrank = _modules(out, LowRankLinear)
    assert len(lowrank) == 2 * 6  # two distinct layers, 6 matrices each
    kinds = {type(m.down) for m in lowrank} | {type(m.up) for m in lowrank}
    assert kinds == {RowInt8Linear, Packed4Linear}
    ids = [id(m) for m in layers[0].modules()]
    assert ids == [id(m) for m in layers[1].modules()]

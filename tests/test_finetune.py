"""The reference fine-tune: its precision and batching options, and the cached reference."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from test_search import tiny_checkpoint, write_study  # noqa: F401

from nas_fair.config import ModelConfig, load_study, parse_study
from nas_fair.errors import UserError
from nas_fair.modeling import _trim, bf16_native, finetune

from conftest import tiny_model

NO_BF16 = "this CPU has no native bfloat16 (avx512_bf16 / amx_bf16): bf16 runs emulated here"


def tiny_task(n: int = 48, width: int = 16, seed: int = 0):
    """Rows of varied length (3 to ``width`` tokens, right-padded), labels from their tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 128, (n, width), generator=g)
    lengths = torch.randint(3, width + 1, (n,), generator=g)
    mask = (torch.arange(width) < lengths[:, None]).long()
    ids = ids * mask  # padding id 0
    labels = (ids[:, 1] % 3).long()
    return ids, mask, labels


def tuned(cfg: ModelConfig, data: tuple[torch.Tensor, ...], start: dict | None = None,
          widths: list[int] | None = None, dtypes: list[torch.dtype] | None = None):
    model = tiny_model("bert")
    if start is not None:
        model.load_state_dict(start)
    if widths is not None:
        model.register_forward_pre_hook(
            lambda m, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    if dtypes is not None:
        model.classifier.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    finetune(model, *data, cfg, seed=0, quiet=True)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_finetune_options_are_validated_and_default_to_the_old_fine_tune() -> None:
    cfg = parse_study('name = "x"\n')
    assert (cfg.model.finetune_precision, cfg.model.finetune_batches) == ("fp32", "random")
    ok = parse_study('name = "x"\n[model]\nfinetune_precision = "auto"\n'
                     'finetune_batches = "by_length"\n')
    assert (ok.model.finetune_precision, ok.model.finetune_batches) == ("auto", "by_length")
    with pytest.raises(UserError, match=r"^\[model\] finetune_precision must be one of fp32, "
                                        r"bf16, auto, got 'fp16' \(did you mean 'bf16'\?\)$"):
        parse_study('name = "x"\n[model]\nfinetune_precision = "fp16"\n')
    with pytest.raises(UserError, match=r"^\[model\] finetune_batches must be one of random, "
                                        r"by_length, got 'sorted'$"):
        parse_study('name = "x"\n[model]\nfinetune_batches = "sorted"\n')


def test_the_shipped_default_study_fine_tunes_fast() -> None:
    from nas_fair.config import find_study

    cfg = load_study(find_study("bios"))
    assert (cfg.model.finetune_precision, cfg.model.finetune_batches) == ("auto", "by_length")


@pytest.mark.skipif(not bf16_native(torch.device("cpu")), reason=NO_BF16)
def test_bf16_fine_tune_is_mixed_precision_deterministic_and_trains() -> None:
    data = tiny_task()
    base = ModelConfig(epochs=5, learning_rate=3e-3, batch_size=16)
    start = {k: v.clone() for k, v in tiny_model("bert").state_dict().items()}
    fp32_dtypes: list[torch.dtype] = []
    bf16_dtypes: list[torch.dtype] = []
    fp32 = tuned(base, data, start, dtypes=fp32_dtypes)
    bf16 = tuned(dataclasses.replace(base, finetune_precision="bf16"), data, start,
                 dtypes=bf16_dtypes)
    again = tuned(dataclasses.replace(base, finetune_precision="bf16"), data, start)
    auto = tuned(dataclasses.replace(base, finetune_precision="auto"), data, start)
    assert set(fp32_dtypes) == {torch.float32} and set(bf16_dtypes) == {torch.bfloat16}
    # Weights (the saved reference) stay fp32; autocast only changes the forward arithmetic.
    assert all(v.dtype == fp32[k].dtype for k, v in bf16.items())
    assert any(not torch.equal(v, fp32[k]) for k, v in bf16.items())
    assert all(torch.equal(v, again[k]) for k, v in bf16.items())  # deterministic
    assert all(torch.equal(v, auto[k]) for k, v in bf16.items())  # auto = bf16 on this CPU
    assert any(not torch.equal(v, start[k]) for k, v in bf16.items())
    # Same objective: it trains as fp32 does (training loss down, within 10% of fp32's).
    losses = {}
    for key, weights in (("start", start), ("fp32", fp32), ("bf16", bf16)):
        model = tiny_model("bert")
        model.load_state_dict(weights)
        with torch.no_grad():
            logits = model(input_ids=data[0], attention_mask=data[1]).logits
        losses[key] = torch.nn.functional.cross_entropy(logits, data[2]).item()
    assert losses["bf16"] < 0.9 * losses["start"]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.1)


def test_auto_precision_follows_the_hardware_check(monkeypatch: pytest.MonkeyPatch) -> None:
    from nas_fair import modeling

    data = tiny_task(n=16)
    base = ModelConfig(epochs=1, batch_size=16)
    for native, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        monkeypatch.setattr(modeling, "bf16_native", lambda device, native=native: native)
        dtypes: list[torch.dtype] = []
        tuned(dataclasses.replace(base, finetune_precision="auto"), data, dtypes=dtypes)
        assert dtypes == [dtype]


def test_batches_by_length_pad_less_and_stay_deterministic() -> None:
    data = tiny_task(n=64)
    base = ModelConfig(epochs=2, learning_rate=1e-3, batch_size=8)
    random_widths: list[int] = []
    length_widths: list[int] = []
    plain = tuned(base, data, widths=random_widths)
    bucketed_cfg = dataclasses.replace(base, finetune_batches="by_length")
    bucketed = tuned(bucketed_cfg, data, widths=length_widths)
    again = tuned(bucketed_cfg, data)
    assert len(random_widths) == len(length_widths) == 16  # 2 epochs of 8 full batches
    assert sum(length_widths) < 0.85 * sum(random_widths)
    assert all(torch.equal(v, again[k]) for k, v in bucketed.items())
    assert any(not torch.equal(v, plain[k]) for k, v in bucketed.items())


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert"])
def test_trimmed_batches_predict_as_fully_padded_ones(kind: str) -> None:
    """Dropping a batch's all-padding tail changes nothing for a fixed model: padding is
    masked out of attention, so each row's logits are those of its max_length-padded form."""
    ids, mask, _ = tiny_task(n=24, width=16)
    ids = ids + (mask == 0).long() * (1 if kind == "roberta" else 0)  # the model's pad id
    model = tiny_model(kind)
    trimmed_some = False
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        order = torch.argsort(mask.sum(1))  # batches of short rows get trimmed the most
        for rows in order.split(6):
            b_ids, b_mask = _trim(ids[rows], mask[rows])
            trimmed_some |= b_ids.shape[1] < ids.shape[1]
            trimmed = model(input_ids=b_ids, attention_mask=b_mask).logits
            torch.testing.assert_close(trimmed, full[rows], atol=1e-5, rtol=1e-4)
            assert torch.equal(trimmed.argmax(-1), full[rows].argmax(-1))
    assert trimmed_some


def _with_model_lines(toml: Path, lines: str) -> Path:
    toml.write_text(toml.read_text().replace("[model]\n", f"[model]\n{lines}\n", 1))
    return toml


def test_the_cached_reference_is_rebuilt_when_the_fine_tune_changes(
        tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    from nas_fair.search import session as session_mod
    from nas_fair.search.session import Session

    def prepared(lines: str) -> tuple[dict, dict]:
        toml = _with_model_lines(write_study(tmp_path, tiny_checkpoint), lines)
        s = Session(load_study(toml), tmp_path / "run", quiet=True)
        s.prepare()
        return s.reference_info, {k: v.clone() for k, v in s.reference.state_dict().items()}

    first, weights = prepared("")
    assert not first.get("cached") and first["finetune_precision"] == "fp32"
    again, _ = prepared("")
    assert again.get("cached")
    for lines, precision in (('finetune_precision = "bf16"', "bf16"),
                             ('finetune_batches = "by_length"', "fp32")):
        info, other = prepared(lines)
        assert not info.get("cached") and info["finetune_precision"] == precision, lines
        assert info["fingerprint"] != first["fingerprint"]
        assert any(not torch.equal(v, weights[k]) for k, v in other.items()), lines
    # Explicit old values are the fine-tune of before: the same key, the cache reused.
    back, _ = prepared('finetune_precision = "fp32"\nfinetune_batches = "random"')
    assert not back.get("cached")  # the run folder holds the by_length reference now
    assert back["fingerprint"] == first["fingerprint"]
    cached, reused = prepared("")
    assert cached.get("cached") and cached["fingerprint"] == first["fingerprint"]
    assert all(torch.equal(v, weights[k]) for k, v in reused.items())

    # A study made before the fields existed keeps its reference and search fingerprints.
    cfg = load_study(write_study(tmp_path, tiny_checkpoint))
    now_search = session_mod.search_fingerprint(cfg)
    now_ref = Session(cfg, tmp_path / "run", quiet=True).fingerprint()
    real = dataclasses.asdict

    def before_the_fields(obj: object) -> dict:
        """asdict as it was before the fields: a study's "model" table, or a ModelConfig."""
        d = real(obj)
        model = d if isinstance(obj, ModelConfig) else d.get("model")
        if isinstance(model, dict):
            model.pop("finetune_precision", None)
            model.pop("finetune_batches", None)
        return d

    monkeypatch.setattr(session_mod, "asdict", before_the_fields)
    assert session_mod.search_fingerprint(cfg) == now_search
    assert Session(cfg, tmp_path / "run", quiet=True).fingerprint() == now_ref
    monkeypatch.undo()
    changed = load_study(_with_model_lines(write_study(tmp_path, tiny_checkpoint),
                                           'finetune_precision = "auto"'))
    assert session_mod.search_fingerprint(changed) != now_search

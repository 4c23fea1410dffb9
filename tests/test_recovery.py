"""Recovery (distillation) made cheaper per step: length-bucketed batches and early stopping."""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path

import pytest
import test_search
import torch
from test_search import write_study
from torch import nn

from nas_fair.config import parse_study
from nas_fair.encoder import length_bucketed_batches, row_lengths
from nas_fair.errors import UserError
from nas_fair.spaces import CompressionContext, RecoveryData
from nas_fair.spaces.recovery import Batch, EarlyStop, recover, recovery_log

from conftest import tiny_model

tiny_checkpoint = test_search.tiny_checkpoint  # the fixture, shared with test_search


def varied_context(model: nn.Module, n: int = 96, length: int = 24, seed: int = 0,
                   batch_size: int = 8, noise: float = 3.0) -> CompressionContext:
    """Right-padded rows of lengths 3..length; the teacher is the model plus ``noise``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 128, (n, length), generator=g)
    lengths = torch.randint(3, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    teacher = logits + noise * torch.randn(logits.shape, generator=g)
    data = RecoveryData(ids, mask, teacher.argmax(-1), teacher.float())
    return CompressionContext(reference=model, train=data, seed=seed, batch_size=batch_size)


def test_row_lengths() -> None:
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    assert row_lengths(mask).tolist() == [3, 1, 1, 4]


def test_bucketed_batches_are_an_epoch_of_full_disjoint_batches() -> None:
    lengths = torch.randint(1, 65, (1000,), generator=torch.Generator().manual_seed(0))
    batches = length_bucketed_batches(lengths, 32, torch.Generator().manual_seed(1),
                                      chunk_batches=5)
    assert len(batches) == 1000 // 32 and all(len(b) == 32 for b in batches)
    rows = torch.cat(batches)
    assert len(set(rows.tolist())) == len(rows)  # each row at most once per epoch
    again = length_bucketed_batches(lengths, 32, torch.Generator().manual_seed(1),
                                    chunk_batches=5)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    other = length_bucketed_batches(lengths, 32, torch.Generator().manual_seed(2),
                                    chunk_batches=5)
    assert not all(torch.equal(a, b) for a, b in zip(batches, other))


def test_bucketing_cuts_padding_but_batches_stay_shuffled() -> None:
    lengths = torch.randint(8, 65, (3200,), generator=torch.Generator().manual_seed(0))

    def mean_width(chunk: int) -> float:
        bs = length_bucketed_batches(lengths, 32, torch.Generator().manual_seed(0),
                                     chunk_batches=chunk)
        return sum(int(lengths[b].max()) for b in bs) / len(bs)

    plain, bucketed = mean_width(0), mean_width(50)
    assert plain > 60  # the max of 32 uniform draws from 8..64
    assert bucketed < 0.65 * plain  # close to the mean length (36), not to the max
    # The batch order is shuffled: widths are not sorted along the epoch.
    widths = [int(lengths[b].max()) for b in length_bucketed_batches(
        lengths, 32, torch.Generator().manual_seed(0), chunk_batches=50)]
    assert widths != sorted(widths) and widths != sorted(widths, reverse=True)


def test_early_stop_rule_on_synthetic_losses() -> None:
    steps = 400
    falling = torch.tensor([10 * 0.997**i for i in range(steps)])  # 21% per 80-step window

    def first_stop(losses: torch.Tensor, tolerance: float = 0.02) -> int | None:
        stop = EarlyStop(steps, tolerance=tolerance, patience=2, min_fraction=0.5)
        assert (stop.window, stop.stride, stop.min_steps) == (80, 20, 200)
        return next((k for k in range(1, steps + 1) if stop.update(losses, k)), None)

    assert first_stop(falling) is None
    assert first_stop(falling, tolerance=0.25) == 200  # 21% counts as flat against 25%
    # Flat from the start: stops at the minimum share of the budget.
    assert first_stop(torch.ones(steps)) == 200
    # Flat from step 160: at 300 the earlier window holds only 20 falling steps (a 0.7% fall),
    # so checks 300 and 320 are flat and 320 stops; at 280 the fall was still 3%.
    late = torch.cat([falling[:160], torch.full((240,), float(falling[159]))])
    assert first_stop(late) == 320
    # Noise around a flat level does not hide the plateau; around a falling trend it does not
    # fake one (batch losses vary by ~17% around their trend on the default study).
    g = torch.Generator().manual_seed(0)
    noise = 1 + 0.17 * torch.randn(steps, generator=g)
    assert first_stop(torch.ones(steps) * noise) is not None
    assert first_stop(falling * noise) is None
    with pytest.raises(UserError, match="tolerance must be a number >= 0"):
        EarlyStop(steps, tolerance=-1.0, patience=3, min_fraction=0.5)
    with pytest.raises(UserError, match="patience must be an integer >= 1, got 0"):
        EarlyStop(steps, tolerance=0.01, patience=0, min_fraction=0.5)


def test_recover_is_bit_identical_for_a_seed_and_trims_each_batch() -> None:
    widths: list[tuple[int, int, int]] = []

    def watch(model: nn.Module, batch: Batch, logits: torch.Tensor) -> torch.Tensor:
        widths.append((batch.input_ids.shape[1], int(batch.attention_mask[:, -1].sum()),
                       batch.input_ids.shape[0]))
        return logits.new_zeros(())

    ref = tiny_model("bert")
    ctx = varied_context(ref)
    a = recover(tiny_model("bert"), ctx, steps=30, extra_loss=watch)
    b = recover(tiny_model("bert"), ctx, steps=30)
    c = recover(tiny_model("bert"), varied_context(ref, seed=1), steps=30)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.classifier.weight, c.classifier.weight)
    # Every batch is full and cut to its longest row (the last column holds a real token).
    assert len(widths) == 30 and all(n == 8 and last > 0 for _, last, n in widths)
    assert sum(w for w, _, _ in widths) / len(widths) < 20  # random batches of 8 average ~22
    log = recovery_log(a)
    assert log is not None and log["steps_run"] == 30 and len(log["losses"]) == 30


def test_early_stop_truncates_the_same_run_and_reads_the_study_settings() -> None:
    ref = tiny_model("bert")
    # A student that starts at its teacher: only dropout noise, so the loss flattens early.
    ctx = varied_context(ref, noise=0.0)
    ctx.recovery_config = replace(ctx.recovery_config, lr=3e-3)
    stopped = recover(tiny_model("bert"), ctx, steps=120, tolerance=0.05)
    log = recovery_log(stopped)
    assert log is not None and log["stopped_early"] and 60 <= log["steps_run"] < 120
    k = log["steps_run"]
    # The same budget without early stopping passes through exactly that model at step k.
    snapshot: dict[str, torch.Tensor] = {}
    calls = 0

    def grab(model: nn.Module, batch: Batch, logits: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        if calls == k:  # before step k + 1: the weights after k steps
            snapshot.update({n: p.detach().clone() for n, p in model.named_parameters()})
        calls += 1
        return logits.new_zeros(())

    full = recover(tiny_model("bert"), ctx, steps=120, early_stop=False, extra_loss=grab)
    full_log = recovery_log(full)
    assert full_log is not None and full_log["steps_run"] == 120
    assert full_log["losses"][:k] == log["losses"]
    for name, p in stopped.named_parameters():
        assert torch.equal(p, snapshot[name]), name
    # The study's switch (ctx.recovery_config) turns it off; an explicit argument wins over it.
    ctx.recovery_config = replace(ctx.recovery_config, early_stop=False)
    off = recovery_log(recover(tiny_model("bert"), ctx, steps=120, tolerance=0.05))
    assert off is not None and off["steps_run"] == 120 and not off["stopped_early"]
    on = recovery_log(recover(tiny_model("bert"), ctx, steps=120, tolerance=0.05,
                              early_stop=True))
    assert on is not None and on["steps_run"] == k
    # A tolerance of 0 only stops on a rising loss: here it runs longer than at 0.05.
    ctx.recovery_config = replace(ctx.recovery_config, early_stop=True, tolerance=0.0)
    strict = recovery_log(recover(tiny_model("bert"), ctx, steps=120))
    assert strict is not None and strict["steps_run"] > k


STUDY = """
name = "t"
[data]
train = "x.csv"
[search]
{extra}
"""


def test_study_toml_controls_early_stopping() -> None:
    cfg = parse_study(STUDY.format(extra=""))
    assert cfg.search.recovery_early_stop is True and cfg.search.recovery_tolerance == 0.02
    cfg = parse_study(STUDY.format(extra="recovery_early_stop = false\nrecovery_tolerance = 0.002"))
    assert cfg.search.recovery_early_stop is False and cfg.search.recovery_tolerance == 0.002
    with pytest.raises(UserError, match=r"^\[search\] recovery_tolerance must be in \[0, 1\), "
                                        r"got 1.5$"):
        parse_study(STUDY.format(extra="recovery_tolerance = 1.5"))
    with pytest.raises(UserError, match="recovery_early_stop must be bool"):
        parse_study(STUDY.format(extra='recovery_early_stop = "yes"'))
    with pytest.raises(UserError, match="did you mean 'recovery_early_stop'"):
        parse_study(STUDY.format(extra="recovery_early_stopping = true"))


def test_trial_records_recovery_steps_run(tmp_path: Path, tiny_checkpoint: Path) -> None:
    import optuna

    from nas_fair.config import load_study
    from nas_fair.objectives.scores import directions
    from nas_fair.search.session import Session

    toml = write_study(tmp_path, tiny_checkpoint, steps=40,
                       extra='[space]\nfamilies = ["pruning", "distillation"]\n'
                             "[space.distillation]\ntemperature = [2.0]\nalpha = [0.9, 0.9]")
    cfg = load_study(toml)
    session = Session(cfg, tmp_path / "run", quiet=True)
    session.prepare()
    assert session.ctx.recovery_config.early_stop is True
    ref = session.score_reference()
    reference = {"values": ref.values(), "accuracy": ref.accuracy, "bias": ref.bias}
    study = optuna.create_study(directions=directions(cfg))
    study.optimize(lambda t: session.run_trial(t, reference), n_trials=1)
    cost = study.trials[0].user_attrs["cost"]
    # 40 steps is too short a budget to stop early (4 windows of 10 steps at the least).
    assert cost["recovery_steps_run"] == 40
    assert cost["recover_s"] > 0


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_bf16_recovery_is_mixed_precision_deterministic_and_logged(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from nas_fair import modeling

    ctx = varied_context(tiny_model("bert"))
    start = tiny_model("bert").state_dict()

    def run(**kw: object) -> tuple[dict[str, torch.Tensor], dict]:
        model = tiny_model("bert")
        model.load_state_dict(start)
        recover(model, ctx, steps=30, early_stop=False, **kw)
        log = recovery_log(model)
        assert log is not None
        return _weights(model), log

    fp32, fp32_log = run()
    bf16, bf16_log = run(precision="bf16")
    again, _ = run(precision="bf16")
    assert fp32_log["precision"] == "fp32" and bf16_log["precision"] == "bf16"
    # Weights (and so the saved model) stay fp32: autocast only changes the forward arithmetic.
    assert all(v.dtype == fp32[k].dtype for k, v in bf16.items())
    assert any(not torch.equal(v, fp32[k]) for k, v in bf16.items())  # it did run in bf16
    assert all(torch.equal(v, again[k]) for k, v in bf16.items())  # and deterministically
    # Same objective: it trains as fp32 does (final losses within 10%).
    assert bf16_log["losses"][-1] == pytest.approx(fp32_log["losses"][-1], rel=0.1)
    assert bf16_log["losses"][-1] < 0.9 * bf16_log["losses"][0]
    # "auto" follows the hardware check; the study's setting (ctx.recovery_config) is the default.
    monkeypatch.setattr(modeling, "bf16_native", lambda device: False)
    auto, auto_log = run(precision="auto")
    assert auto_log["precision"] == "fp32" and all(torch.equal(v, fp32[k]) for k, v in auto.items())
    monkeypatch.setattr(modeling, "bf16_native", lambda device: True)
    ctx.recovery_config = replace(ctx.recovery_config, precision="auto")
    auto, auto_log = run()
    assert auto_log["precision"] == "bf16" and all(torch.equal(v, bf16[k]) for k, v in auto.items())
    with pytest.raises(UserError, match=r"^recovery precision must be one of fp32, bf16, auto, "
                                        r"got 'fp16' \(did you mean 'bf16'\?\)$"):
        run(precision="fp16")


def test_extra_loss_runs_under_the_recovery_precision() -> None:
    """A penalty's own forward pass (the counterfactual regularizer's) is as cheap as the main
    one: under bf16 it runs inside the same autocast, and the loss it adds stays fp32."""
    ctx = varied_context(tiny_model("bert"))
    seen: list[tuple[bool, torch.dtype]] = []

    def penalty(model: nn.Module, batch: object, logits: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        seen.append((torch.is_autocast_enabled("cpu"), out.dtype))
        return 0.1 * (out.float() - logits).pow(2).mean()

    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        seen.clear()
        model = recover(tiny_model("bert"), ctx, steps=4, early_stop=False, extra_loss=penalty,
                        precision=precision)
        assert seen == [(precision == "bf16", dtype)] * 4
        log = recovery_log(model)
        assert log is not None and all(math.isfinite(v) for v in log["losses"])


def test_bf16_native_reads_the_cpu_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import builtins

    from nas_fair.spaces.recovery import bf16_native

    real_open = builtins.open

    def fake(flags: str):  # noqa: ANN202
        path = tmp_path / "cpuinfo"
        path.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        return lambda f, *a, **k: real_open(path if f == "/proc/cpuinfo" else f, *a, **k)

    monkeypatch.setattr(builtins, "open", fake("fpu sse avx2 avx512f avx512_bf16"))
    assert bf16_native(torch.device("cpu"))
    monkeypatch.setattr(builtins, "open", fake("fpu sse avx2 amx_bf16 amx_tile"))
    assert bf16_native(torch.device("cpu"))
    # avx512f alone would run bf16 emulated, slower than fp32: not native.
    monkeypatch.setattr(builtins, "open", fake("fpu sse avx2 avx512f avx512bw"))
    assert not bf16_native(torch.device("cpu"))


def fingerprint_before(monkeypatch: pytest.MonkeyPatch, cfg: object, field: str) -> str:
    """The search fingerprint of ``cfg`` as a version without the [search] ``field`` made it."""
    from nas_fair.search import session

    real = session.config_dict

    def before_the_field(c: object) -> dict:
        d = real(c)
        del d["search"][field]
        return d

    with monkeypatch.context() as m:
        m.setattr(session, "config_dict", before_the_field)
        return session.search_fingerprint(cfg)


def test_recovery_precision_in_the_study_and_its_fingerprint(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from nas_fair.search import session

    cfg = parse_study(STUDY.format(extra=""))
    assert cfg.search.recovery_precision == "fp32"
    bf16 = parse_study(STUDY.format(extra='recovery_precision = "bf16"'))
    auto = parse_study(STUDY.format(extra='recovery_precision = "auto"'))
    now = session.search_fingerprint(cfg)
    assert len({now, session.search_fingerprint(bf16), session.search_fingerprint(auto)}) == 3
    # A study made before the field existed still resumes: its stored fingerprint was taken
    # from a definition without the field, and fp32 (the old behaviour) hashes the same.
    assert fingerprint_before(monkeypatch, cfg, "recovery_precision") == now
    with pytest.raises(UserError, match=r"^\[search\] recovery_precision must be one of fp32, "
                                        r"bf16, auto, got 'fp16' \(did you mean 'bf16'\?\)$"):
        parse_study(STUDY.format(extra='recovery_precision = "fp16"'))


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert"])
def test_first_token_only_gives_the_same_logits_and_gradients(kind: str) -> None:
    """The narrowed last layer is an optimization, not another model: logits and gradients match
    the full forward pass (padded rows included), also with heads pruned and layers shared, and
    the model is restored afterwards. DistilBERT is left as it is (not narrowed)."""
    from nas_fair.modeling import first_token_only
    from nas_fair.spaces import compress
    from nas_fair.spaces.pruning import PruningConfig
    from nas_fair.spaces.sharing import SharingConfig

    from conftest import random_batch

    base = tiny_model(kind)
    ctx = CompressionContext(reference=base, train=None, seed=0)
    students = [base, compress(base, {"pruning": PruningConfig(heads=0.5, ffn=0.5),
                                      "sharing": SharingConfig(group_size=2)}, ctx)]
    ids, mask = random_batch()
    for model in students:
        before = [type(m).__name__ for m in model.modules()]
        names = list(model.state_dict())

        def grads(narrow: bool, model: nn.Module = model,
                  names: list[str] = names) -> tuple[torch.Tensor, dict]:
            model.zero_grad(set_to_none=True)
            if narrow:
                with first_token_only(model) as applied:
                    logits = model(input_ids=ids, attention_mask=mask).logits
                    assert list(model.state_dict()) == names  # same names inside
                assert applied == (kind != "distilbert")
            else:
                logits = model(input_ids=ids, attention_mask=mask).logits
            logits.pow(2).sum().backward()
            return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                     if p.grad is not None}

        full, full_grads = grads(False)
        narrow, narrow_grads = grads(True)
        torch.testing.assert_close(narrow, full, rtol=1e-5, atol=1e-5)
        assert narrow_grads.keys() == full_grads.keys()
        for name, g in full_grads.items():
            torch.testing.assert_close(narrow_grads[name], g, rtol=1e-4, atol=1e-5)
        assert [type(m).__name__ for m in model.modules()] == before


def test_first_token_only_leaves_a_dynamic_int8_last_layer_alone() -> None:
    """torch's dynamic int8 Linear (old exports) scales a linear's input by its range over the
    whole call, so narrowing would change the model's predictions: such a layer runs in full,
    and prediction gives exactly the unwrapped model's logits. The per-row int8 linear the
    search builds depends on each row alone, so narrowing applies and computes the same."""
    from nas_fair.modeling import first_token_only, predict_logits
    from nas_fair.modules import int8_dynamic_linear
    from nas_fair.spaces import compress
    from nas_fair.spaces.quantization import QuantizationConfig

    from conftest import random_batch

    base = tiny_model("bert")
    ctx = CompressionContext(reference=base, train=None, seed=0)
    legacy = copy.deepcopy(base)
    for layer in legacy.bert.encoder.layer:
        layer.intermediate.dense = int8_dynamic_linear(layer.intermediate.dense)
        layer.output.dense = int8_dynamic_linear(layer.output.dense)
    ids, mask = random_batch()
    with first_token_only(legacy) as applied:
        assert not applied
    with torch.inference_mode():
        full = legacy(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(predict_logits(legacy, ids, mask, batch_size=len(ids)), full)

    int8 = compress(base, {"quantization": QuantizationConfig(attention_bits=8, ffn_bits=8)},
                    ctx)
    with torch.inference_mode():
        full = int8(input_ids=ids, attention_mask=mask).logits
        with first_token_only(int8) as applied:
            assert applied
            narrow = int8(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(narrow.argmax(-1), full.argmax(-1))
    assert (narrow - full).abs().max() <= 1e-2 * full.abs().max()


def test_first_token_only_restores_the_layer_on_error_and_does_not_nest() -> None:
    from nas_fair.modeling import first_token_only

    model = tiny_model("bert")
    last = model.bert.encoder.layer[-1]
    with pytest.raises(RuntimeError, match="boom"), first_token_only(model):
        with first_token_only(model) as inner:
            assert inner is False  # already narrowed: the inner call leaves it alone
        raise RuntimeError("boom")
    assert model.bert.encoder.layer[-1] is last


def test_recovery_without_dropout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Off: the student trains in eval mode (no dropout anywhere) and, on a CPU, attention
    runs through the math kernel; deterministic, a different model from training with
    dropout, logged. The study's setting (ctx.recovery_config) is the default; on is the built-in one."""
    ctx = varied_context(tiny_model("bert"))
    seen: list[tuple[bool, bool]] = []

    def run(**kw: object) -> tuple[dict[str, torch.Tensor], dict]:
        seen.clear()
        model = tiny_model("bert")
        model.register_forward_pre_hook(
            lambda m, args: seen.append((m.training, torch.backends.cuda.flash_sdp_enabled())))
        recover(model, ctx, steps=6, early_stop=False, **kw)
        log = recovery_log(model)
        assert log is not None and model.training is False
        return _weights(model), log

    on, on_log = run()
    off, off_log = run(dropout=False)
    assert on_log["dropout"] is True and off_log["dropout"] is False
    assert seen == [(False, False)] * 6  # eval mode, flash attention disabled
    again, _ = run(dropout=False)
    assert all(torch.equal(v, again[k]) for k, v in off.items())
    assert any(not torch.equal(v, on[k]) for k, v in off.items())
    run()
    assert seen == [(True, True)] * 6  # the default: dropout, SDPA chooses its kernel
    ctx.recovery_config = replace(ctx.recovery_config, dropout=False)
    study_off, study_log = run()
    assert study_log["dropout"] is False
    assert all(torch.equal(v, off[k]) for k, v in study_off.items())
    assert torch.backends.cuda.flash_sdp_enabled()  # restored after recovery


def test_recovery_dropout_in_the_study_and_its_fingerprint(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from nas_fair.search import session

    cfg = parse_study(STUDY.format(extra=""))
    assert cfg.search.recovery_dropout is True
    off = parse_study(STUDY.format(extra="recovery_dropout = false"))
    assert off.search.recovery_dropout is False
    now = session.search_fingerprint(cfg)
    assert session.search_fingerprint(off) != now
    assert fingerprint_before(monkeypatch, cfg, "recovery_dropout") == now  # old ones resume
    with pytest.raises(UserError, match=r"^\[search\] recovery_dropout must be bool, got str 'no'$"):
        parse_study(STUDY.format(extra='recovery_dropout = "no"'))


def test_keep_mask_rate_scale_lanes_and_seed() -> None:
    """Each element is dropped with probability p rounded to 1/65536, from all four 16-bit
    lanes of a draw alike (a lane with a constant bit would be off by half), scaled to keep
    the expectation, and the global seed repeats it."""
    from nas_fair.modeling import keep_mask

    n = 1 << 20
    for p in (0.1, 0.5):
        torch.manual_seed(0)
        keep, scale = keep_mask((n,), p)
        drops = round(p * 65536)
        assert keep.dtype == torch.bool and scale == 65536 / (65536 - drops)
        sd = math.sqrt(p * (1 - p) / (n // 4))
        for lane in range(4):
            rate = 1 - keep[lane::4].float().mean().item()
            assert abs(rate - drops / 65536) < 5 * sd, (p, lane, rate)
        torch.manual_seed(0)
        assert torch.equal(keep_mask((n,), p)[0], keep)
    torch.manual_seed(1)
    assert not torch.equal(keep_mask((n,), 0.5)[0], keep)
    assert keep_mask((3, 5), 0.0)[0].all() and keep_mask((3, 5), 0.0)[1] == 1.0
    for bad in (1.0, -0.1):
        with pytest.raises(UserError, match=r"dropout probability must be in \[0, 1\), got"):
            keep_mask((4,), bad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fast_dropout_attention_equals_the_plain_formula_bit_for_bit(dtype: torch.dtype) -> None:
    """The fewer-pass attention (contiguous fp32 casts, in-place scaling, the mask added, masks
    through uint8) gives exactly what the textbook formula gives with the same masks: outputs
    and the gradients of queries, keys and values."""
    from nas_fair.modeling import _fast_dropout_attention, keep_mask

    b, h, n, d = 3, 2, 7, 6  # a scaling 6**-0.5 that rounds: the order of operations shows
    gen = torch.Generator().manual_seed(0)
    qkv = [torch.randn(b, n, h, d, generator=gen).to(dtype).requires_grad_() for _ in range(3)]
    mask = torch.ones(b, 1, n, n, dtype=torch.bool)
    mask[0, :, :, 5:] = False  # padding keys of the first row
    grad = torch.randn(b, n, h, d, generator=gen).to(dtype)
    module = nn.Module()

    def plain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.float() for t in (q, k, v))
        scores = torch.matmul(q * d**-0.5, k.transpose(-2, -1))
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1)
        keep, scale = keep_mask(tuple(probs.shape), 0.3)
        out = torch.matmul(probs * keep.to(probs.dtype).mul_(scale), v).to(dtype)
        return out.transpose(1, 2).contiguous()

    results = []
    for fn in (plain, lambda q, k, v: _fast_dropout_attention(module, q, k, v, mask,
                                                               dropout=0.3)[0]):
        for t in qkv:
            t.grad = None
        torch.manual_seed(1)
        out = fn(*(t.transpose(1, 2) for t in qkv))
        out.backward(grad)
        results.append([out.detach(), *(t.grad for t in qkv)])
    assert all(torch.equal(a, b) for a, b in zip(*results))
    assert results[0][0].dtype == dtype and results[0][0].is_contiguous()


def test_fast_dropout_fn_scales_kept_elements_and_their_gradient() -> None:
    from nas_fair.modeling import fast_dropout_fn

    torch.manual_seed(0)
    x = torch.randn(64, 50, requires_grad=True)
    y = fast_dropout_fn(x, 0.25)
    kept = y != 0
    assert 0.2 < 1 - kept.float().mean().item() < 0.3
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.75)
    assert fast_dropout_fn(x, 0.25, training=False) is x and fast_dropout_fn(x, 0.0) is x


def _set_dropout(model: nn.Module, p: float) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout",
                 "dropout"):
        if hasattr(model.config, name):
            setattr(model.config, name, p)


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert"])
def test_fast_dropout_swaps_masks_in_and_out_and_computes_the_same_attention(
        kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside, every dropout (hidden states and attention probabilities) draws from
    keep_mask; at a rate too small to drop anything, training-mode logits equal the eval-mode
    ones (padded rows included), so the replacement attention is SDPA's; all restored after."""
    from nas_fair import modeling
    from nas_fair.modeling import FAST_DROPOUT_ATTENTION, fast_dropout

    from conftest import random_batch

    model = tiny_model(kind)
    ids, mask = random_batch()
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
    _set_dropout(model, 1e-9)
    dropouts = [m for m in model.modules() if type(m) is nn.Dropout]
    shapes: list[tuple[int, ...]] = []
    real_keep_mask = modeling.keep_mask

    def recording(shape: tuple[int, ...], p: float, device: object = "cpu") -> object:
        shapes.append(shape)
        return real_keep_mask(shape, p, device)

    monkeypatch.setattr(modeling, "keep_mask", recording)
    model.train()
    with fast_dropout(model) as applied, torch.no_grad():
        assert applied and model.config._attn_implementation == FAST_DROPOUT_ATTENTION
        assert not any(type(m) is nn.Dropout for m in model.modules())
        trained = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(trained, plain, rtol=1e-5, atol=1e-5)
    cfg, (n, length) = model.config, ids.shape  # DistilBERT's config maps these names too
    assert (n, cfg.num_attention_heads, length, length) in shapes  # attention probabilities
    assert (n, length, cfg.hidden_size) in shapes  # hidden states
    assert model.config._attn_implementation == "sdpa"
    assert [m for m in model.modules() if type(m) is nn.Dropout] == dropouts


def test_fast_dropout_restores_on_error_and_recovery_logs_the_masks() -> None:
    from nas_fair.modeling import fast_dropout

    model = tiny_model("bert")
    dropouts = [m for m in model.modules() if type(m) is nn.Dropout]
    with pytest.raises(RuntimeError, match="boom"), fast_dropout(model):
        raise RuntimeError("boom")
    assert [m for m in model.modules() if type(m) is nn.Dropout] == dropouts
    assert model.config._attn_implementation == "sdpa"

    ctx = varied_context(tiny_model("bert"))

    def run(**kw: object) -> tuple[dict[str, torch.Tensor], dict]:
        student = tiny_model("bert")
        recover(student, ctx, steps=6, early_stop=False, **kw)
        log = recovery_log(student)
        assert log is not None
        return _weights(student), log

    fast, fast_log = run()
    again, _ = run()
    torch_masks, torch_log = run(fast_masks=False)
    off_log = run(dropout=False)[1]
    assert all(torch.equal(v, again[k]) for k, v in fast.items())  # seeded
    assert any(not torch.equal(v, torch_masks[k]) for k, v in fast.items())  # another stream
    assert (fast_log["dropout_masks"], torch_log["dropout_masks"],
            off_log["dropout_masks"]) == ("random bits", "bernoulli", None)


def test_the_studys_recovery_settings_reach_the_context() -> None:
    """One place for recovery's defaults (SearchConfig); the study's values reach recover()."""
    from nas_fair.config import SearchConfig
    from nas_fair.spaces.base import RecoveryConfig

    assert RecoveryConfig() == RecoveryConfig.from_search(SearchConfig())
    rc = RecoveryConfig.from_search(SearchConfig(recovery_lr=3e-4, recovery_early_stop=False,
                                                 recovery_tolerance=0.1,
                                                 recovery_precision="bf16",
                                                 recovery_dropout=False))
    assert rc == RecoveryConfig(lr=3e-4, early_stop=False, tolerance=0.1, precision="bf16",
                                dropout=False)

"""Recovery checkpoints: N steps, save, load, N more equals 2N in one go, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from nas_fair.errors import UserError
from nas_fair.spaces.recovery import recover, recovery_log
from nas_fair.spaces.recovery_state import JSON_FILE, TENSORS_FILE, load_recovery_state

from conftest import tiny_context, tiny_model


def _student() -> nn.Module:
    """A student unlike its teacher, with a layer used twice (shared tensors in the state)."""
    m = tiny_model("bert", seed=1)
    m.bert.encoder.layer[1] = m.bert.encoder.layer[0]
    return m


def _assert_same(a: nn.Module, b: nn.Module) -> None:
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


@pytest.mark.parametrize("dropout", [True, False])
def test_resume_is_bit_identical(tmp_path: Path, dropout: bool) -> None:
    ctx = tiny_context(tiny_model("bert"), n=64)  # 4 batches an epoch: 7 steps stop mid-epoch
    kw = {"dropout": dropout, "early_stop": True}
    whole = recover(_student(), ctx, steps=14, **kw)
    part = recover(_student(), ctx, steps=7, schedule_steps=14, save_state_to=tmp_path / "ck", **kw)
    assert recovery_log(part)["steps_run"] == 7
    on = _student()  # the structure rebuilt, as a promoted trial re-runs its compression
    resumed = recover(on, ctx, steps=14, resume_from=tmp_path / "ck", **kw)
    _assert_same(whole, resumed)
    log = recovery_log(resumed)
    assert log["resumed_from_step"] == 7 and log["steps_run"] == 14
    assert log["losses"] == recovery_log(whole)["losses"]
    # Stopping at 7 without a longer schedule is a different run (LR decays to 0 at 7).
    short = recover(_student(), ctx, steps=7, **kw)
    assert not torch.equal(short.classifier.weight, part.classifier.weight)


def test_checkpoint_is_safetensors_and_json_only(tmp_path: Path) -> None:
    ctx = tiny_context(tiny_model("bert"), n=64)
    recover(_student(), ctx, steps=5, schedule_steps=10, save_state_to=tmp_path / "ck")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [JSON_FILE, TENSORS_FILE]
    meta = json.loads((tmp_path / "ck" / JSON_FILE).read_text())
    assert meta["step"] == 5 and meta["schedule_steps"] == 10 and meta["model_aliases"]
    state = load_recovery_state(tmp_path / "ck")
    assert any(k.endswith("exp_avg_sq") for k in meta["optimizer_tensor_keys"])
    assert all(isinstance(t, torch.Tensor) for e in state.optimizer["state"].values()
               for t in e.values() if not isinstance(t, (int, float, bool)))


def test_resume_refuses_a_different_schedule_or_student(tmp_path: Path) -> None:
    ctx = tiny_context(tiny_model("bert"), n=64)
    recover(_student(), ctx, steps=5, schedule_steps=10, save_state_to=tmp_path / "ck")
    with pytest.raises(UserError, match="cannot continue to 10 steps of a 12-step schedule"):
        recover(_student(), ctx, steps=10, schedule_steps=12, resume_from=tmp_path / "ck")
    with pytest.raises(UserError, match="does not fit this student"):
        recover(tiny_model("distilbert"), ctx, steps=10, resume_from=tmp_path / "ck")
    with pytest.raises(UserError, match="schedule_steps must be an integer >= steps"):
        recover(_student(), ctx, steps=10, schedule_steps=5)
    with pytest.raises(UserError, match="no recovery checkpoint"):
        recover(_student(), ctx, steps=10, resume_from=tmp_path / "none")


def test_distillation_family_continues_through_the_context(tmp_path: Path) -> None:
    from nas_fair.spaces.base import RecoveryRun
    from nas_fair.spaces.distillation import Distillation, DistillationConfig

    ctx = tiny_context(tiny_model("bert"), n=64)
    whole = Distillation().apply(_student(), DistillationConfig(steps=12), ctx)
    ctx.recovery_run = RecoveryRun(schedule_steps=12, save_state_to=tmp_path / "ck")
    Distillation().apply(_student(), DistillationConfig(steps=6), ctx)
    ctx.recovery_run = RecoveryRun(schedule_steps=12, resume_from=tmp_path / "ck")
    resumed = Distillation().apply(_student(), DistillationConfig(steps=12), ctx)
    _assert_same(whole, resumed)
    log = recovery_log(resumed)
    assert log["resumed_from_step"] == 6 and log["schedule_steps"] == 12

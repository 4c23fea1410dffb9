"""What a study's seed makes reproducible: the reference, the sampler's draws, resumes."""

from __future__ import annotations

from pathlib import Path

import torch
from test_search import run_cli, tiny_checkpoint, write_study  # noqa: F401


def _prepared_reference(toml: Path, run_dir: Path) -> dict[str, torch.Tensor]:
    from nas_fair.config import load_study
    from nas_fair.search.study import Session

    session = Session(load_study(toml), run_dir, quiet=True)
    session.prepare()
    assert not session.reference_info.get("cached") and session.reference_info["finetuned"]
    return {k: v.clone() for k, v in session.reference.state_dict().items()}


def test_reference_is_bit_identical_from_the_seed(tmp_path: Path, tiny_checkpoint: Path) -> None:  # noqa: F811
    """Two fresh run folders, same study and seed: the same fine-tuned reference, every tensor
    equal bit for bit, whatever the global random state was before (here: different on purpose,
    as in two processes with different histories); preparing leaves that state alone."""
    toml = write_study(tmp_path, tiny_checkpoint)
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    first = _prepared_reference(toml, tmp_path / "run1")
    assert torch.equal(torch.get_rng_state(), before)
    torch.rand(17)  # another history of the global generator
    second = _prepared_reference(toml, tmp_path / "run2")
    assert first.keys() == second.keys()
    differ = [k for k in first if not torch.equal(first[k], second[k])]
    assert not differ, differ
    # the head is new (the checkpoint has 2 labels, the task 3) and was trained
    assert first["classifier.weight"].shape[0] == 3

"""search/records.py: typed trial and reference records read back exactly what Optuna stored."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import test_search
from test_search import load, run_cli, write_study

from nas_fair.search.records import ReferenceRecord, TrialRecord

tiny_checkpoint = test_search.tiny_checkpoint  # the fixture, shared with test_search


def test_records_round_trip_a_tiny_study(tmp_path: Path, tiny_checkpoint: Path) -> None:
    toml = write_study(tmp_path, tiny_checkpoint)
    run_dir = tmp_path / "run"
    assert run_cli("search", "--config", str(toml), "--budget", "3", "--run-dir", str(run_dir)) == 0
    study = load(run_dir)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete
    for t in study.trials:
        rec = TrialRecord.from_trial(t)
        assert rec.to_attrs() == t.user_attrs
        assert rec.extra == {}  # every key the search writes has a field
    for t in complete:
        rec = TrialRecord.from_trial(t)
        assert isinstance(rec.size_bytes, int) and rec.size_bytes == t.user_attrs["size_bytes"]
        assert rec.cost == t.user_attrs["cost"] and rec.thread_count == 1
        assert rec.feasible == all(c <= 0 for c in t.user_attrs["constraints"])
        assert rec.collapsed == t.user_attrs["collapse"]["collapsed"]
    stored = study.user_attrs["reference"]
    ref = ReferenceRecord.from_study(study)
    assert ref.extra == {} and ref.values == stored["values"]
    # The same keys in the same order: the stored JSON text is unchanged.
    assert json.dumps(ref.to_attrs()) == json.dumps(stored)


def test_unknown_and_null_keys_are_kept() -> None:
    attrs = {"cost": {"total_s": 1.0}, "from_the_future": [1, 2], "postprocess": None,
             "threads": 2}
    rec = TrialRecord.from_attrs(attrs)
    assert rec.extra == {"from_the_future": [1, 2], "postprocess": None}
    assert rec.postprocess is None and rec.thread_count == 2  # the older studies' key
    assert rec.to_attrs() == attrs
    assert rec.without(["cost", "from_the_future"]).to_attrs() == {"postprocess": None,
                                                                    "threads": 2}
    assert TrialRecord().to_attrs() == {} and TrialRecord().feasible
    ref = ReferenceRecord.from_attrs({"values": [1.0, 2.0, 0.5, 0.1], "new": 1})
    assert ref.to_attrs() == {"values": [1.0, 2.0, 0.5, 0.1], "new": 1}

"""search/records.py: typed study, trial and reference records read back exactly what Optuna
stored."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import test_search
from test_search import load, run_cli, write_study

from nas_fair.search.records import ReferenceRecord, StudyRecord, TrialRecord

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
    rec = StudyRecord.from_study(study)
    assert rec.extra == {}  # every key the search writes on the study has a field
    assert rec.to_attrs() == study.user_attrs
    assert {k: json.dumps(v) for k, v in rec.to_attrs().items()} == {
        k: json.dumps(v) for k, v in study.user_attrs.items()}
    assert rec.anchors_queued is True and rec.reference == stored


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


# What open_study, enqueue_anchors and shared_reference stored, key by key, before StudyRecord.
OLD_STUDY_ATTRS = {
    "population_size": 12, "fingerprint": "ab12", "config": {"name": "old", "seed": 0},
    "nas_fair_version": "0.1.0", "anchors": [{"pruning.ffn": 0.25}], "anchors_queued": True,
    "reference": {"values": [1.0, 2.0, 0.5, 0.1], "size_mb": 1.0},
}


def _stored_study(attrs: dict) -> optuna.Study:
    study = optuna.create_study(directions=["minimize", "minimize"])
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    return study


def test_a_study_written_before_reads_back_the_same() -> None:
    study = _stored_study(OLD_STUDY_ATTRS)
    rec = StudyRecord.from_study(study)
    assert (rec.population_size, rec.fingerprint, rec.nas_fair_version) == (12, "ab12", "0.1.0")
    assert rec.anchors == [{"pruning.ffn": 0.25}] and rec.anchors_queued is True
    assert rec.config == {"name": "old", "seed": 0} and rec.extra == {}
    assert rec.to_attrs() == OLD_STUDY_ATTRS
    # written back through the record, the storage holds the same values
    again = optuna.create_study(directions=["minimize", "minimize"])
    rec.write(again)
    assert again.user_attrs == study.user_attrs
    assert ReferenceRecord.from_study(study).to_attrs() == OLD_STUDY_ATTRS["reference"]


def test_unknown_and_missing_study_keys_behave_as_before() -> None:
    study = _stored_study({"fingerprint": "ab12", "from_the_future": 1, "anchors": None})
    rec = StudyRecord.from_study(study)
    assert rec.extra == {"from_the_future": 1, "anchors": None}
    assert rec.population_size is None and rec.anchors is None and rec.reference is None
    assert rec.to_attrs() == study.user_attrs
    with pytest.raises(KeyError, match="reference"):  # as reading the missing key did
        ReferenceRecord.from_study(study)
    assert StudyRecord().to_attrs() == {}


def test_anchors_are_queued_once_from_an_old_study() -> None:
    from nas_fair.search.run import enqueue_anchors

    attrs = {k: v for k, v in OLD_STUDY_ATTRS.items() if k != "anchors_queued"}
    study = _stored_study(attrs)
    logged: list[str] = []
    enqueue_anchors(study, logged.append)
    enqueue_anchors(study, logged.append)
    assert len(logged) == 1 and study.user_attrs["anchors_queued"] is True
    queued = study.get_trials(deepcopy=False)
    assert [(t.state, t.user_attrs) for t in queued] == [
        (optuna.trial.TrialState.WAITING, {"anchor": True})]

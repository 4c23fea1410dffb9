"""Study definitions parse strictly; the shipped data builders produce sound splits."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from nas_fair.config import find_study, load_study, parse_study
from nas_fair.data import MASK, _parse_winobias, load_task
from nas_fair.errors import UserError


def test_shipped_studies_parse() -> None:
    for name in ("bios", "winobias"):
        cfg = load_study(find_study(name))
        assert cfg.name == name
        assert cfg.search.sampler == "nsga2"


def test_unknown_key_suggests() -> None:
    with pytest.raises(UserError, match=r"did you mean 'recovery_steps'"):
        parse_study('name = "x"\n[search]\nrecovery_step = 3\n')
    with pytest.raises(UserError, match=r"must be int, got str"):
        parse_study('name = "x"\n[search]\nbootstrap = "3"\n')
    with pytest.raises(UserError, match=r"population_size must be 0 \(auto\) or >= 2, got 1"):
        parse_study('name = "x"\n[search]\npopulation_size = 1\n')
    with pytest.raises(UserError, match=r"finetune must be one of auto, always, never"):
        parse_study('name = "x"\n[model]\nfinetune = "yes"\n')


def test_bug_bios_splits_are_disjoint_and_masked() -> None:
    cfg = parse_study('name = "x"\n[data]\nsource = "bug-bios"\ncounterfactual = false\n')
    data = load_task(cfg)
    assert data.num_labels == 10
    assert len(set(data.train.texts) & set(data.test.texts)) == 0
    assert Counter(data.test.labels.tolist()) == {k: 250 for k in range(10)}
    assert set(data.test.groups) == {"male", "female"}
    assert all(MASK in t for t in data.test.texts[:200])
    for t, y in zip(data.test.texts[:200], data.test.labels[:200]):
        assert data.label_names[y] not in t.lower().split()  # the answer word is masked
    share = np.mean(data.train.groups == "female")
    assert 0.15 < share < 0.45  # the natural (skewed) gender ratio is kept


def test_winobias_parsing() -> None:
    occ = ["physician", "nurse", "developer", "designer"]
    text, label, gender = _parse_winobias(
        "1 [The developer] argued with the designer because [he] did not like the design.", occ)
    assert label == 0 and gender == "male" and "the developer or the designer" in text
    _, label, gender = _parse_winobias(
        "2 The developer argued with [the designer] because [her] idea cannot be implemented.", occ)
    assert label == 1 and gender == "female"
    cfg = parse_study('name = "x"\n[data]\nsource = "winobias"\ncounterfactual = false\n')
    data = load_task(cfg)
    assert set(data.test.stereotype) == {"pro", "anti"}
    assert len(data.test) > 1400


def test_unknown_source() -> None:
    cfg = parse_study('name = "x"\n[data]\nsource = "bug_bios"\n')
    with pytest.raises(UserError, match="did you mean 'bug-bios'"):
        load_task(cfg)

"""search/recipe.py: recipe.json read back through every family's config, validated in one line."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

import nas_fair
from nas_fair.checkpoint import save_compressed
from nas_fair.errors import UserError
from nas_fair.search.recipe import Recipe
from nas_fair.spaces import REGISTRY

from conftest import RandomTrial, tiny_model


def a_recipe(seed: int = 0) -> Recipe:
    """Every registered family, drawn from its own table, as export builds it."""
    rng = random.Random(seed)
    configs = {n: cls().suggest(RandomTrial(rng)) for n, cls in REGISTRY.items()}
    order = sorted(configs, key=lambda n: REGISTRY[n].stage)
    params = {f"{n}.{k}": v for n in order for k, v in configs[n].to_dict().items()}
    return Recipe(params=params, families={n: configs[n] for n in order},
                  nas_fair_version="0.1.0", study="s", trial=3, seed=0, base_model="tiny",
                  reference_finetuned=True, study_fingerprint="ab", study_config={"name": "s"},
                  runtime={"threads": 1, "torch": "2"})


@pytest.mark.parametrize("seed", range(5))
def test_every_family_round_trips_through_recipe_json(seed: int, tmp_path: Path) -> None:
    recipe = a_recipe(seed)
    data = json.loads(json.dumps(recipe.to_dict()))
    assert Recipe.from_dict(data) == recipe
    assert list(data) == ["nas_fair_version", "study", "trial", "seed", "params", "order",
                          "families", "off", "base_model", "reference_finetuned",
                          "study_fingerprint", "study_config", "runtime"]
    assert data["order"] == sorted(REGISTRY, key=lambda n: REGISTRY[n].stage)
    back = Recipe.read(recipe.save(tmp_path).parent)
    assert back == recipe
    for name, config in back.families.items():
        assert type(config) is REGISTRY[name].config_class


def _broken(**changes: Any) -> dict[str, Any]:
    data = json.loads(json.dumps(a_recipe().to_dict()))
    for path, value in changes.items():
        *parents, last = path.split("__")
        node = data
        for p in parents:
            node = node[p]
        if value is KeyError:
            del node[last]
        else:
            node[last] = value
    return data


@pytest.mark.parametrize(("changes", "message"), [
    ({"families__pruning__heads": 1.5}, "recipe.json: pruning.heads must be in [0, 1), got 1.5"),
    ({"families__quantization__ffn_bits": 3},
     "recipe.json: quantization.ffn_bits must be one of 32, 16, 8, 4, got 3"),
    ({"families__prunning": {}}, "recipe.json: unknown compression family 'prunning' in "
     "families (did you mean 'pruning'?); available: "),
    ({"families__pruning__hedas": 0.1}, "recipe.json: unknown parameter 'hedas' for "
     "PruningConfig (did you mean 'heads'?); valid: ffn, heads, layers"),
    ({"families__sharing": 2}, "recipe.json: families.sharing must be an object of "
     "parameters, got 2"),
    ({"colour": "red"}, "recipe.json: unknown key 'colour'; valid: params, families, "),
    ({"families": KeyError}, "recipe.json: families is missing"),
    ({"params__pruning.heads": 0.75}, "recipe.json: params 'pruning.heads' = 0.75 but "
     "families.pruning.heads = "),
    ({"params__pruning.depth": 1}, "recipe.json: params 'pruning.depth' is not a parameter of "
     "pruning; valid: ffn, heads, layers"),
    ({"order": ["quantization", "pruning"]}, "recipe.json: order must list the families in "
     "application order"),
    ({"trial": "three"}, "recipe.json: trial must be an integer or null, got 'three'"),
    ({"reference_finetuned": "yes"}, "recipe.json: reference_finetuned must be true or false"),
])
def test_a_bad_recipe_is_one_line_naming_key_and_value(changes: dict[str, Any],
                                                         message: str) -> None:
    with pytest.raises(UserError) as err:
        Recipe.from_dict(_broken(**changes))
    text = str(err.value)
    assert text.startswith(message) and "\n" not in text, text


def test_off_must_agree_with_the_configs() -> None:
    data = _broken()
    name = next(iter(data["off"]))
    data["off"][name] = not data["off"][name]
    with pytest.raises(UserError, match=r"^recipe.json: off must say which families"):
        Recipe.from_dict(data)
    with pytest.raises(UserError, match=r"^recipe.json: must hold a JSON object, got list"):
        Recipe.from_dict([])


def test_load_reads_and_validates_the_recipe(tmp_path: Path) -> None:
    folder = save_compressed(tiny_model("bert"), tmp_path / "m")
    assert nas_fair.load(folder).nas_fair_recipe is None  # a plain checkpoint has none
    recipe = a_recipe()
    recipe.save(folder)
    assert nas_fair.load(folder).nas_fair_recipe == recipe
    (folder / "recipe.json").write_text(json.dumps(_broken(families__pruning__heads=-1)))
    with pytest.raises(UserError, match=r"recipe.json: pruning.heads must be in \[0, 1\), got -1"):
        nas_fair.load(folder)
    (folder / "recipe.json").write_text("{not json")
    with pytest.raises(UserError, match="recipe.json is not valid JSON"):
        nas_fair.load(folder)

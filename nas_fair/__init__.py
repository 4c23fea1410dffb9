"""nas-fair: search compression settings of BERT-family classifiers with bias as an objective.

The Python API (``nas_fair.api``, re-exported here) is the CLI's commands as functions that
return objects: :func:`optimize` (``nas-fair search``), :func:`pareto`, :func:`export`,
:func:`compress`, :func:`report` and :func:`load`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["FrontModel", "SearchResult", "__version__", "compress", "export", "load", "optimize",
           "pareto", "report"]
_API = frozenset(__all__) - {"__version__"}

if TYPE_CHECKING:
    from nas_fair.api import (
        FrontModel,
        SearchResult,
        compress,
        export,
        load,
        optimize,
        pareto,
        report,
    )


def __getattr__(name: str) -> Any:
    # `import nas_fair` stays as light as a bare package; the API module loads on first use.
    if name in _API:
        from nas_fair import api

        return getattr(api, name)
    raise AttributeError(f"module 'nas_fair' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})

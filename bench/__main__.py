"""Run every benchmark module in bench/ that has a ``main()``; plugin_exec first, the rest by name."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

FIRST = ("plugin_exec",)


def discover() -> list[str]:
    names = [m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if not m.name.startswith("_")]
    return [*[n for n in FIRST if n in names], *sorted(n for n in names if n not in FIRST)]


def main() -> int:
    failures = 0
    for name in discover():
        module = importlib.import_module(f"bench.{name}")
        entry = getattr(module, "main", None)
        if not callable(entry):
            continue
        print(f"\n## bench.{name}\n", flush=True)
        try:
            status = entry()
        except Exception as exc:  # one broken benchmark must not hide the others
            print(f"bench.{name} failed: {exc!r}", file=sys.stderr)
            failures += 1
            continue
        if isinstance(status, int) and status != 0:
            failures += 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

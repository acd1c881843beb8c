"""Run every benchmark module in bench/ that has a ``main()``; plugin_exec first, the rest by name.

    .venv/bin/python -m bench [MODULE ...]

Each module reports its rows through ``bench.report.row``. Every row is printed and missed targets are listed
at the end; the exit status is non-zero only when a module could not run (a broken run), never for a missed
target. A full run (no MODULE given) that is not broken writes docs/benchmarks.md and the README's summary
table (``bench.report.publish``); a partial or broken run only prints.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
import time
import traceback
from pathlib import Path

from bench import report

FIRST = ("plugin_exec",)
NOT_BENCHMARKS = ("report",)


def discover() -> list[str]:
    names = [m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)])
             if not m.name.startswith("_") and m.name not in NOT_BENCHMARKS]
    return [*[n for n in FIRST if n in names], *sorted(n for n in names if n not in FIRST)]


def main(argv: list[str] | None = None) -> int:
    wanted = sys.argv[1:] if argv is None else argv
    available = discover()
    unknown = [n for n in wanted if n not in available]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; available: {available}", file=sys.stderr)
        return 2
    started, load_before = time.time(), "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    broken: list[str] = []
    for name in wanted or available:
        module = importlib.import_module(f"bench.{name}")
        entry = getattr(module, "main", None)
        if not callable(entry):
            continue
        print(f"\n## bench.{name}\n", flush=True)
        report.begin(name)
        try:
            status = entry([])
        except BaseException as exc:  # one broken benchmark must not hide the others
            if isinstance(exc, KeyboardInterrupt):
                raise
            traceback.print_exc()
            broken.append(f"bench.{name}: {exc!r}")
            continue
        if isinstance(status, int) and status != 0:
            broken.append(f"bench.{name}: exit status {status}")
    rows = report.rows()
    missed = [r for r in rows if r.met is False]
    print(f"\n{len(rows)} rows, {sum(r.met is True for r in rows)} targets met, {len(missed)} missed", flush=True)
    for r in missed:
        print(f"  MISSED (bench.{r.bench}): {r.name}: {r.value} (target {r.target})")
    if broken:
        print("BROKEN RUN, nothing published:\n  " + "\n  ".join(broken), file=sys.stderr)
        return 1
    if wanted:
        print("partial run: docs/benchmarks.md and README.md left as they are")
        return 0
    report.publish(rows, report.titles(), started, load_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())

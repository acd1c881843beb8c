"""bench/report.py: the one row format of the benchmarks and the one place that publishes them (docs/benchmarks.md,
the README's summary). No benchmark runs here: the rendering, the README copy, and that the committed README
table is the one of the committed docs/benchmarks.md."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

from bench import __main__ as runner
from bench import report

ROOT = Path(__file__).resolve().parents[1]


def test_rows_print_at_once_and_mark_missed_targets(capsys: pytest.CaptureFixture[str]) -> None:
    report.begin("unit")
    before = len(report.rows())
    report.header("Unit rows")
    report.row("context", "1.0 ms")
    report.row("fast enough", "2.0 ms", "<= 3 ms", True)
    report.row("too slow", "9.0 ms", "<= 3 ms", False)
    out = capsys.readouterr().out
    assert "Unit rows" in out and report.TABLE_HEAD in out
    assert "| context | 1.0 ms |  |  |" in out
    assert "| fast enough | 2.0 ms | <= 3 ms | met |" in out
    assert "| too slow | 9.0 ms | <= 3 ms | **MISSED** |" in out
    assert [r.bench for r in report.rows()[before:]] == ["unit"] * 3


def test_render_has_machine_summary_and_every_row() -> None:
    rows = [report.Row("a", "baseline", "1 ms"), report.Row("a", "ratio", "1.2x", "<= 1.35x", True),
            report.Row("b", "p99", "20 ms", "<= 15 ms", False), report.Row("b", "headline", "1.3x", summary=True)]
    info = {"cpu": "2 x Test CPU", "kernel": "6.1", "python": "3.11", "load": "1.00 1.00 1.00", "commit": "abc"}
    text = report.render(rows, {"a": "Module a"}, info, started=0.0, load_before="0.50 0.50 0.50")
    summary = report.block(text)
    assert "| ratio | 1.2x | <= 1.35x | met |" in summary and "| p99 | 20 ms | <= 15 ms | **MISSED** |" in summary
    assert "baseline" not in summary  # context rows only in the full tables
    assert "| headline | 1.3x |  |  |" in summary  # unless marked for the summary
    assert "## bench.a" in text and "Module a" in text and "| baseline | 1 ms |  |  |" in text
    assert "2 x Test CPU" in text and "commit abc" in text and "targets missed: 1 (p99)" in text


def test_sync_readme_replaces_only_the_block(tmp_path: Path) -> None:
    bench_md = tmp_path / "benchmarks.md"
    readme = tmp_path / "README.md"
    bench_md.write_text(f"# x\n{report.BEGIN}\n| new | row |\n{report.END}\nmore\n")
    readme.write_text(f"intro\n{report.BEGIN}\n| old | row |\n{report.END}\noutro\n")
    assert report.sync_readme(bench_md, readme) is True
    assert readme.read_text() == f"intro\n{report.BEGIN}\n| new | row |\n{report.END}\noutro\n"
    assert report.sync_readme(bench_md, readme) is False


def test_committed_readme_table_is_the_last_bench_run() -> None:
    assert report.block(report.README_MD.read_text()) == report.block(report.BENCHMARKS_MD.read_text()), (
        "README.md's performance table differs from docs/benchmarks.md: run `make bench` (or `make bench-readme`)")


def test_every_benchmark_module_takes_argv_and_report_is_not_one() -> None:
    names = runner.discover()
    assert "report" not in names and names[0] == "plugin_exec"
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        assert list(inspect.signature(module.main).parameters) == ["argv"], name
        source = inspect.getsource(module)
        # every result goes through report.row (so make bench's tables cover it), none is printed as a table
        assert "report.row(" in source, f"bench.{name} does not report through bench.report"
        assert 'print("|' not in source and "print(f\"|" not in source, f"bench.{name} prints its own table"

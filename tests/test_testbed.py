"""The harness itself (``testbed/``): one way to wait, netns that never outlive their test, and the layering
(tests, benchmarks and the demo import testbed; testbed imports none of them; the bundle carries none)."""

from __future__ import annotations

import ast
import time
from pathlib import Path

import pytest

from testbed import netns
from testbed.paths import REPO_ROOT
from testbed.poll import WaitTimeout, wait_for

PRODUCT = ("ambient_cni", "cli_options", "cni_plugin", "conflist", "nodeagent", "zds", "netns_threads", "zds_peer",
           "nodeimage")
HARNESS = {"tests", "testbed", "bench", "demo"}


def test_wait_for_returns_the_first_truthy_value_and_tolerates_only_what_it_is_told() -> None:
    calls = iter([None, 0, "", "done"])
    assert wait_for(lambda: next(calls), 5, interval=0) == "done"
    flaky: list[int | OSError] = [OSError("not yet"), OSError("not yet"), 7]

    def connect() -> int:
        item = flaky.pop(0)
        if isinstance(item, OSError):
            raise item
        return item

    assert wait_for(connect, 5, interval=0, tolerate=(OSError,)) == 7
    with pytest.raises(KeyError):  # not tolerated: at once, not at the deadline
        wait_for(lambda: dict[str, int]()["x"], 30, interval=0)


def test_wait_for_fails_loudly_naming_what_it_waited_for() -> None:
    started = time.monotonic()
    with pytest.raises(WaitTimeout, match=r"timed out after 0.2 s waiting for the socket \(last: ConnectionRefused"):
        wait_for(lambda: (_ for _ in ()).throw(ConnectionRefusedError()), 0.2, lambda: "the socket",
                 tolerate=(OSError,))
    assert 0.2 <= time.monotonic() - started < 2
    assert issubclass(WaitTimeout, AssertionError)  # a failed test, never a skipped or passed one


def test_a_netns_is_removed_when_the_body_fails() -> None:
    with pytest.raises(RuntimeError), netns.new_netns("actb") as made:
        assert netns.exists(made.name)
        raise RuntimeError("the test failed")
    assert not netns.exists(made.name)
    with netns.many([netns.unique_name("actb") for _ in range(3)]) as several:
        assert all(netns.exists(ns.name) for ns in several)
    assert not any(netns.exists(ns.name) for ns in several)


def _imported_packages(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", ["testbed", "bench", "demo", *PRODUCT])
def test_only_the_tests_import_the_tests(package: str) -> None:
    """bench/ and demo/ get their harness from testbed/, testbed/ stands on the product alone, and the product
    imports no harness at all."""
    forbidden = HARNESS if package in PRODUCT else {"tests"} | ({"bench", "demo"} if package == "testbed" else set())
    offenders = {str(p.relative_to(REPO_ROOT)): sorted(_imported_packages(p) & forbidden)
                 for p in (REPO_ROOT / package).rglob("*.py") if not p.name.endswith(("_pb2.py", "_pb2_grpc.py"))}
    assert not {k: v for k, v in offenders.items() if v}

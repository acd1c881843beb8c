"""The node lifecycle's decisions against the Kubernetes API: restart vs uninstall on SIGTERM, and removing the
``cni.istio.io/not-ready`` taint with an atomic JSON patch.

There is no kube-apiserver on this machine: ``testbed.fakekube`` is a fake that stands in for it (its
node-lifecycle part, ``testbed/fakekube/lifecycle.py``, answers with the real server's status codes and Status
bodies, and applies RFC 6902 JSON patches, ``test`` ops included). The code under test talks to it through the
official ``kubernetes`` client, exactly as it talks to a real server.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ambient_cni.node import decision, targeting
from ambient_cni.node.kubeapi import ApiError, LifecycleApi, observe
from ambient_cni.node.taint import remove_taint, untaint_patch
from nodeagent.clusterview.kubesource import make_api_client
from testbed.fakekube.server import FakeKube

NS, DS, NODE = "istio-system", "ambient-cni-node", "node-a"
NOT_READY = {"key": "cni.istio.io/not-ready", "value": "true", "effect": "NoSchedule"}
OTHER = {"key": "example.com/dedicated", "value": "infra", "effect": "NoSchedule"}


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeKube]:
    server = FakeKube().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def api(fake: FakeKube, tmp_path: Path) -> LifecycleApi:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(fake.kubeconfig())
    return LifecycleApi(make_api_client(str(kubeconfig)))


def _required(*terms: dict[str, Any]) -> dict[str, Any]:
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": list(terms)}}}


# ---------------------------------------------------------------------------------------------- the table
# (name, setup of the fake, expected action, words the reason must carry)
TABLE: list[tuple[str, dict[str, Any], str, str]] = [
    ("exists, targets every node", {"ds": {}}, "keep", "restart or upgrade"),
    ("exists, nodeSelector matches", {"ds": {"node_selector": {"pool": "mesh"}}, "labels": {"pool": "mesh"}},
     "keep", "targets this node"),
    ("exists, required affinity matches", {"ds": {"affinity": _required(
        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["mesh", "edge"]}]})},
        "labels": {"pool": "edge"}}, "keep", "targets this node"),
    ("being deleted", {"ds": {"deleting": True}}, "uninstall", "being deleted"),
    ("gone", {}, "uninstall", "not found"),
    ("nodeSelector no longer matches", {"ds": {"node_selector": {"pool": "mesh"}}, "labels": {"pool": "batch"}},
     "uninstall", "no longer targets"),
    ("affinity no longer matches", {"ds": {"affinity": _required(
        {"matchExpressions": [{"key": "pool", "operator": "NotIn", "values": ["batch"]}]})},
        "labels": {"pool": "batch"}}, "uninstall", "no longer targets"),
    ("affinity excludes the node by name", {"ds": {"affinity": _required(
        {"matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": [NODE]}]})}},
     "uninstall", "no longer targets"),
    ("unauthorized (service account gone)", {"ds": {}, "fail": 401}, "uninstall", "401 Unauthorized"),
    ("forbidden (RBAC gone)", {"ds": {}, "fail": 403}, "keep", "Forbidden"),
    ("API server error", {"ds": {}, "fail": 500}, "keep", "InternalError"),
    ("API server unavailable", {"ds": {}, "fail": 503}, "keep", "ServiceUnavailable"),
    ("node object missing", {"ds": {}, "no_node": True}, "keep", "cannot tell"),
]


@pytest.mark.parametrize(("name", "setup", "action", "words"), TABLE, ids=[t[0] for t in TABLE])
def test_stop_decision_table(fake: FakeKube, api: LifecycleApi, name: str, setup: dict[str, Any], action: str,
                             words: str) -> None:
    if "ds" in setup:
        fake.lifecycle.upsert_daemonset(DS, NS, **setup["ds"])
    if not setup.get("no_node"):
        fake.lifecycle.upsert_node(NODE, labels=setup.get("labels"))
    fake.lifecycle.fail(setup.get("fail"))
    observation = observe(api, NS, DS, NODE, attempts=2, retry_delay_s=0.01)
    result = decision.decide("auto", observation)
    assert result.action == action, (name, result.reason)
    assert words in result.reason, result.reason
    if setup.get("fail") not in (None, 401):
        # an answer that does not decide is asked again before keeping everything (failures are answered
        # before routing, so the fake counts none of them as a DaemonSet read)
        assert observation.outcome == "error"


def test_unreachable_api_keeps_everything(tmp_path: Path) -> None:
    fake = FakeKube()  # never started: connections are refused
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(fake.kubeconfig())
    fake.httpd.server_close()
    observation = observe(LifecycleApi(make_api_client(str(kubeconfig))), NS, DS, NODE, attempts=2,
                          retry_delay_s=0.01)
    result = decision.decide("auto", observation)
    assert result.action == "keep" and "cannot tell" in result.reason, result.reason


def test_transient_errors_are_retried_then_decide(fake: FakeKube, api: LifecycleApi) -> None:
    fake.lifecycle.upsert_node(NODE)
    fake.lifecycle.fail(503)
    calls = {"n": 0}
    original = api.get_daemonset

    def flaky(namespace: str, name: str) -> dict[str, Any]:
        calls["n"] += 1
        if calls["n"] == 2:
            fake.lifecycle.fail(None)  # the server recovers before the second attempt; the DaemonSet is gone
        return original(namespace, name)

    api.get_daemonset = flaky  # type: ignore[method-assign]
    result = decision.decide("auto", observe(api, NS, DS, NODE, attempts=3, retry_delay_s=0.01))
    assert calls["n"] == 2 and result.action == "uninstall", result.reason


def test_policies_always_and_never_need_no_api() -> None:
    assert decision.decide("always", None).uninstall
    assert not decision.decide("never", None).uninstall
    assert not decision.decide("auto", None).uninstall  # no API: the safe default
    assert decision.needs_api("auto") and not decision.needs_api("always") and not decision.needs_api("never")


# ---------------------------------------------------------------------------------------------- targeting


@pytest.mark.parametrize(
    ("requirement", "labels", "matches"),
    [
        ({"key": "a", "operator": "In", "values": ["1", "2"]}, {"a": "2"}, True),
        ({"key": "a", "operator": "In", "values": ["1"]}, {}, False),
        ({"key": "a", "operator": "NotIn", "values": ["1"]}, {}, True),
        ({"key": "a", "operator": "NotIn", "values": ["1"]}, {"a": "1"}, False),
        ({"key": "a", "operator": "Exists"}, {"a": ""}, True),
        ({"key": "a", "operator": "DoesNotExist"}, {"a": "x"}, False),
        ({"key": "a", "operator": "Gt", "values": ["5"]}, {"a": "6"}, True),
        ({"key": "a", "operator": "Gt", "values": ["5"]}, {"a": "x"}, False),
        ({"key": "a", "operator": "Lt", "values": ["5"]}, {"a": "4"}, True),
        ({"key": "a", "operator": "Lt", "values": ["5"]}, {}, False),
        ({"key": "a", "operator": "Bogus", "values": ["5"]}, {"a": "5"}, False),
    ],
)
def test_requirement_operators(requirement: dict[str, Any], labels: dict[str, str], matches: bool) -> None:
    assert targeting.requirement_matches(requirement, labels) is matches


def test_terms_are_ored_and_an_empty_term_matches_nothing() -> None:
    node = {"metadata": {"name": NODE, "labels": {"zone": "b"}}}
    either = _required({"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]},
                       {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["b"]}]})
    assert targeting.targets_node({"spec": {"template": {"spec": {"affinity": either}}}}, node)[0]
    empty = _required({})
    assert not targeting.targets_node({"spec": {"template": {"spec": {"affinity": empty}}}}, node)[0]
    assert not targeting.targets_node({"spec": {"template": {"spec": {"affinity": _required()}}}}, node)[0]
    assert targeting.targets_node({"spec": {"template": {"spec": {}}}}, node)[0]


# ---------------------------------------------------------------------------------------------- the taint


def test_untaint_patch_is_test_then_replace() -> None:
    node = {"spec": {"taints": [OTHER, NOT_READY]}}
    patch = untaint_patch(node, NOT_READY["key"])
    assert patch == [
        {"op": "test", "path": "/spec/taints", "value": [OTHER, NOT_READY]},
        {"op": "replace", "path": "/spec/taints", "value": [OTHER]},
    ]
    assert untaint_patch({"spec": {"taints": [OTHER]}}, NOT_READY["key"]) is None
    assert untaint_patch({"spec": {}}, NOT_READY["key"]) is None


def test_taint_removed_and_others_kept(fake: FakeKube, api: LifecycleApi) -> None:
    fake.lifecycle.upsert_node(NODE, taints=[OTHER, NOT_READY])
    assert remove_taint(api, NODE, NOT_READY["key"]) is True
    assert fake.lifecycle.node(NODE)["spec"]["taints"] == [OTHER]  # type: ignore[index]
    (patch,) = fake.lifecycle.node_patches
    assert patch[0]["op"] == "test"
    assert remove_taint(api, NODE, NOT_READY["key"]) is False  # absent: no second patch
    assert len(fake.lifecycle.node_patches) == 1


def test_taint_removal_retries_when_a_concurrent_writer_wins(fake: FakeKube, api: LifecycleApi) -> None:
    fake.lifecycle.upsert_node(NODE, taints=[NOT_READY])
    raced = {"done": False}

    def concurrent_writer(name: str) -> None:
        if not raced["done"]:  # another controller adds a taint between our GET and our PATCH
            raced["done"] = True
            fake.lifecycle.set_node_taints(name, [NOT_READY, OTHER])

    fake.lifecycle.before_node_patch = concurrent_writer
    assert remove_taint(api, NODE, NOT_READY["key"]) is True
    assert fake.lifecycle.node(NODE)["spec"]["taints"] == [OTHER]  # type: ignore[index]  # theirs survived
    assert len(fake.lifecycle.node_patches) == 2  # the first patch's test op failed (422), the second applied


def test_taint_removal_retries_409_and_gives_up_eventually(fake: FakeKube, api: LifecycleApi) -> None:
    fake.lifecycle.upsert_node(NODE, taints=[NOT_READY])
    fake.lifecycle.conflict_next_patches(2)
    assert remove_taint(api, NODE, NOT_READY["key"]) is True
    fake.lifecycle.upsert_node(NODE, taints=[NOT_READY])
    fake.lifecycle.conflict_next_patches(100)
    with pytest.raises(ApiError) as err:
        remove_taint(api, NODE, NOT_READY["key"], attempts=3)
    assert err.value.status == 409


def test_taint_removal_reports_other_errors(fake: FakeKube, api: LifecycleApi) -> None:
    with pytest.raises(ApiError) as err:
        remove_taint(api, "no-such-node", NOT_READY["key"])
    assert err.value.status == 404
    fake.lifecycle.fail(403)
    with pytest.raises(ApiError) as err:
        remove_taint(api, NODE, NOT_READY["key"])
    assert err.value.status == 403 and "Forbidden" in str(err.value)

"""deploy/: valid against the Kubernetes OpenAPI schemas (kubernetes-validate, pinned), one `kubectl apply -f
deploy/` away (the real kubectl reads exactly our objects, and the Kustomization file does not trip it), the
same objects through kustomize, and the security-relevant facts pinned so that changing them is deliberate.

kubectl needs an API server to map kinds to resources; none can run here, so ``testbed/fakekube/discovery.py``
(a fake serving only discovery documents) stands in for it."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from ambient_cni.node.taint import DEFAULT_TAINT
from cni_plugin import defaults
from nodeimage.build import IMAGE_NAME
from testbed.fakekube.discovery import DiscoveryServer
from testbed.paths import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
K8S_VERSION = "1.34.0"  # the schemas validated against (kubernetes-validate ships them)
KUBECTL_EXTENSIONS = (".yaml", ".yml", ".json")  # what `kubectl -f DIR` reads (non-recursive)


def _docs(paths: list[Path]) -> list[dict[str, Any]]:
    return [d for p in paths for d in yaml.safe_load_all(p.read_text()) if d]


def plain_docs() -> list[dict[str, Any]]:
    return _docs(sorted(p for p in DEPLOY.iterdir() if p.suffix in KUBECTL_EXTENSIONS))


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    (doc,) = [d for d in plain_docs() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return doc


def _key(doc: dict[str, Any]) -> tuple[str, str, str]:
    return doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"]


@pytest.fixture(scope="module")
def kubectl_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    if shutil.which("kubectl") is None:
        pytest.fail("kubectl is not installed", pytrace=False)
    server = DiscoveryServer().start()
    home = tmp_path_factory.mktemp("kubectl")
    (home / "kubeconfig").write_text(server.kubeconfig())
    try:
        yield {"PATH": os.environ["PATH"], "HOME": str(home), "KUBECONFIG": str(home / "kubeconfig")}
    finally:
        server.stop()


def _kubectl_names(env: dict[str, str], directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["kubectl", "create", "--dry-run=client", "-o", "name", "--validate=false", "-f",
                           str(directory)], capture_output=True, text=True, env=env, timeout=60, check=False)


def test_every_manifest_validates_against_the_pinned_schemas() -> None:
    docs = plain_docs()
    assert sorted(d["kind"] for d in docs) == sorted(["Namespace", "ServiceAccount", "ClusterRole",
                                                      "ClusterRoleBinding", "Role", "RoleBinding", "ConfigMap",
                                                      "DaemonSet"])
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    broken = _one("DaemonSet")
    broken["spec"]["template"]["spec"]["hostNetwrok"] = True  # the validator does catch a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_kubectl_apply_f_deploy_reads_exactly_our_objects(kubectl_env: dict[str, str], tmp_path: Path) -> None:
    res = _kubectl_names(kubectl_env, DEPLOY)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [
        "namespace/istio-system", "serviceaccount/ambient-cni-node",
        "clusterrole.rbac.authorization.k8s.io/ambient-cni-node",
        "clusterrolebinding.rbac.authorization.k8s.io/ambient-cni-node",
        "role.rbac.authorization.k8s.io/ambient-cni-node", "rolebinding.rbac.authorization.k8s.io/ambient-cni-node",
        "configmap/ambient-cni-config", "daemonset.apps/ambient-cni-node",
    ]  # in file order: the namespace first
    # why the kustomization is not named kustomization.yaml: kubectl would read it as an object and fail
    copy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copy)
    (copy / "Kustomization").rename(copy / "kustomization.yaml")
    tripped = _kubectl_names(kubectl_env, copy)
    assert tripped.returncode != 0 and 'no matches for kind "Kustomization"' in tripped.stderr


def test_kustomize_builds_the_same_objects() -> None:
    res = subprocess.run(["kubectl", "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert res.returncode == 0, res.stderr
    built = {_key(d): d for d in yaml.safe_load_all(res.stdout) if d}
    plain = {_key(d): d for d in plain_docs()}
    assert built == plain


def test_rbac_is_exactly_the_least_privilege_list() -> None:
    cluster = _one("ClusterRole")
    assert cluster["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "patch"]},
        {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]},
    ]
    role = _one("Role")
    assert role["metadata"]["namespace"] == "istio-system"
    assert role["rules"] == [{"apiGroups": ["apps"], "resources": ["daemonsets"],
                              "resourceNames": ["ambient-cni-node"], "verbs": ["get"]}]
    sa = _one("ServiceAccount")
    for binding, role_kind in ((_one("ClusterRoleBinding"), "ClusterRole"), (_one("RoleBinding"), "Role")):
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind,
                                      "name": "ambient-cni-node"}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                        "namespace": sa["metadata"]["namespace"]}]


def test_daemonset_security_facts() -> None:
    ds = _one("DaemonSet")
    assert (ds["metadata"]["name"], ds["metadata"]["namespace"]) == ("ambient-cni-node", "istio-system")
    pod = ds["spec"]["template"]["spec"]
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    assert pod["hostNetwork"] is True
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["serviceAccountName"] == "ambient-cni-node"
    assert {"key": DEFAULT_TAINT, "operator": "Exists"} in pod["tolerations"]
    assert {"operator": "Exists"} in pod["tolerations"]  # every other taint, any effect
    (container,) = pod["containers"]
    assert container["image"] == IMAGE_NAME and container["imagePullPolicy"] == "IfNotPresent"
    assert container["command"] == ["/usr/local/bin/ambient-cni", "node"]
    sc = container["securityContext"]
    assert sc["privileged"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW", "SYS_ADMIN", "SYS_PTRACE"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    env = {e["name"]: e for e in container["env"]}
    assert env["AMBIENT_CNI_NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    volumes = {v["name"]: v["hostPath"] for v in pod["volumes"]}
    mounts = {m["mountPath"]: (volumes[m["name"]]["path"], m.get("mountPropagation"), m.get("readOnly", False))
              for m in container["volumeMounts"]}
    assert mounts == {
        "/host/opt/cni/bin": ("/opt/cni/bin", None, False),
        "/host/etc/cni/net.d": ("/etc/cni/net.d", None, False),
        "/var/run/ambient-cni": ("/var/run/ambient-cni", None, False),  # same path inside and out
        "/var/lib/ambient-cni": ("/var/lib/ambient-cni", None, False),
        "/var/run/ztunnel": ("/var/run/ztunnel", None, False),
        "/var/run/netns": ("/var/run/netns", "HostToContainer", False),
        "/host/proc": ("/proc", None, True),
        "/run/xtables.lock": ("/run/xtables.lock", None, False),
    }
    # the settings that name mounted paths point into the mounts
    assert env["AMBIENT_CNI_CONF_DIR"]["value"] == "/host/etc/cni/net.d"
    assert env["AMBIENT_CNI_BIN_DIR"]["value"] == "/host/opt/cni/bin"
    assert env["AMBIENT_CNI_RUN_DIR"]["value"] == "/var/run/ambient-cni"
    assert env["AMBIENT_CNI_ZDS_SOCKET"]["value"] == "/var/run/ztunnel/ztunnel.sock"
    assert env["AMBIENT_CNI_PROC_ROOT"]["value"] == "/host/proc"
    # probes hit the health server where it listens (loopback of the node: kubelet shares hostNetwork)
    host, port = env["AMBIENT_CNI_HEALTH_ADDR"]["value"].split(":")
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        assert container[probe]["httpGet"] == {"host": host, "path": path, "port": int(port)}
    # pods are named ambient-cni-node-<hash>: the plugin's default exemption for the agent's own pods
    assert (ds["metadata"]["name"] + "-").startswith("ambient-cni-node-")
    assert ds["metadata"]["namespace"] == "istio-system"


def test_the_manifests_spell_the_products_defaults() -> None:
    """What the manifests set explicitly is the product's default (``cni_plugin.defaults``): the DaemonSet and
    its namespace are the agent-pod exemption, and the agent, the installer and the plugin agree on the rest."""
    ds = _one("DaemonSet")
    assert (ds["metadata"]["name"], ds["metadata"]["namespace"]) == (defaults.DAEMONSET_NAME,
                                                                     defaults.AGENT_POD_NAMESPACE)
    assert (defaults.DAEMONSET_NAME + "-").startswith(defaults.AGENT_POD_NAME_PREFIX)
    (container,) = ds["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert (env["AMBIENT_CNI_RUN_DIR"], env["AMBIENT_CNI_STATE_DIR"], env["AMBIENT_CNI_ZDS_SOCKET"],
            env["AMBIENT_CNI_HEALTH_ADDR"]) == (defaults.RUN_DIR, defaults.STATE_DIR, defaults.ZDS_SOCKET,
                                                defaults.HEALTH_ADDR)
    config = _one("ConfigMap")["data"]
    assert config["AMBIENT_CNI_EXCLUDE_NAMESPACES"] == ",".join(defaults.EXCLUDE_NAMESPACES)
    assert (config["AMBIENT_CNI_LOG_LEVEL"], int(config["AMBIENT_CNI_DEADLINE_MS"])) == (defaults.LOG_LEVEL,
                                                                                         defaults.DEADLINE_MS)

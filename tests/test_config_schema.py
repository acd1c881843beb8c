"""The build-time artifact (cni_plugin/_generated_schema.py) agrees with the pydantic models it comes from.

Three validators must give the same verdict and the same values on every config of the corpus: the pydantic
model ``cni_plugin.config.NetConf`` (the source of truth), ``pydantic_core.SchemaValidator`` over the generated
schema, and ``cni_plugin.minischema`` (what the frozen plugin runs). The generated file must be up to date.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pydantic
import pytest
from pydantic_core import SchemaValidator, ValidationError

from cni_plugin import minischema, schema_gen
from cni_plugin._generated_schema import NETCONF_SCHEMA
from cni_plugin.config import NetConf
from testbed.paths import FIXTURES, REPO_ROOT

BASE: dict[str, Any] = {"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "ambient-cni"}


def _with(**changes: Any) -> dict[str, Any]:
    conf = copy.deepcopy(BASE)
    for key, value in changes.items():
        key = key.replace("__", "/").replace("_dot_", ".")
        conf[key] = value
    return conf


def _without(key: str) -> dict[str, Any]:
    conf = copy.deepcopy(BASE)
    conf.pop(key)
    return conf


VALID: list[dict[str, Any]] = [
    BASE,
    _with(run_dir="/run/x", exclude_namespaces=[], agent_pod_namespace="", agent_pod_name_prefix=""),
    _with(exclude_namespaces=["a", "b"], deadline_ms=100, log_level="debug", log_file=""),
    _with(deadline_ms=120000, log_level="error", log_file=None),
    _with(log_file="/var/log/x.log", log_level="warning"),
    _with(prevResult=None, runtimeConfig=None),
    _with(prevResult={"cniVersion": "1.0.0", "ips": [], "x": {"y": [1, None]}}),
    _with(runtimeConfig={}),
    _with(runtimeConfig={"portmappings": []}),
    _with(runtimeConfig={"portmappings": [{"hostport": 0, "containerport": 65535}]}),
    _with(runtimeConfig={
        "portmappings": [{"hostport": 80, "containerport": 8080, "protocol": "udp", "hostip": "1.2.3.4", "extra": 1}],
        "bandwidth": {"x": 1},
    }),
    {**BASE, "cni.dev/valid-attachments": [{"containerID": "abc", "ifname": "eth0", "extra": True}]},
    {**BASE, "cni.dev/valid-attachments": []},
    {**BASE, "cni.dev/valid-attachments": None},
    _with(unknownKey={"anything": [1, 2]}, capabilities={"portMappings": True}, args={"cni": {}}),
]

INVALID: list[dict[str, Any]] = [
    {},
    _without("cniVersion"),
    _without("name"),
    _without("type"),
    _with(cniVersion=""),
    _with(cniVersion=1),
    _with(name=""),
    _with(name=None),
    _with(type=["ambient-cni"]),
    _with(run_dir=""),
    _with(run_dir=5),
    _with(exclude_namespaces="kube-system"),
    _with(exclude_namespaces=["a", 1]),
    _with(exclude_namespaces=None),
    _with(agent_pod_namespace=None),
    _with(agent_pod_name_prefix=3),
    _with(deadline_ms="5000"),
    _with(deadline_ms=99),
    _with(deadline_ms=120001),
    _with(deadline_ms=5000.0),
    _with(deadline_ms=True),
    _with(deadline_ms=None),
    _with(log_level="INFO"),
    _with(log_level="trace"),
    _with(log_level=None),
    _with(log_file=3),
    _with(prevResult=[]),
    _with(prevResult="x"),
    _with(runtimeConfig=[]),
    _with(runtimeConfig={"portmappings": {}}),
    _with(runtimeConfig={"portmappings": [{"hostport": 80}]}),
    _with(runtimeConfig={"portmappings": [{"hostport": "80", "containerport": 80}]}),
    _with(runtimeConfig={"portmappings": [{"hostport": 80, "containerport": 65536}]}),
    _with(runtimeConfig={"portmappings": [{"hostport": -1, "containerport": 1}]}),
    _with(runtimeConfig={"portmappings": [{"hostport": 80, "containerport": 80, "protocol": 6}]}),
    _with(runtimeConfig={"portmappings": [5]}),
    {**BASE, "cni.dev/valid-attachments": [{"containerID": "", "ifname": "eth0"}]},
    {**BASE, "cni.dev/valid-attachments": [{"containerID": "abc"}]},
    {**BASE, "cni.dev/valid-attachments": {"containerID": "abc", "ifname": "eth0"}},
    "not an object",  # type: ignore[list-item]
    [BASE],  # type: ignore[list-item]
]

FIXTURE_CONFIGS = sorted((FIXTURES / "stdin").glob("*.json"))


def _model_values(conf: Any) -> dict[str, Any]:
    model = NetConf.model_validate(conf)
    return model.model_dump(by_alias=False)


def _model_accepts(conf: Any) -> bool:
    try:
        NetConf.model_validate(conf)
    except pydantic.ValidationError:
        return False
    return True


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    """Round-trip through JSON so typed-dict output and model_dump compare as plain data."""
    return dict(json.loads(json.dumps(values)))


@pytest.fixture(scope="module")
def core_validator() -> SchemaValidator:
    # The models are strict (ConfigDict(strict=True)); the generated schema carries no config, so the core
    # validator gets strict mode the way pydantic passes a model's config. minischema is strict by design.
    # (CoreConfig strict does not reach nested fields here, so every call passes strict=True).
    return SchemaValidator(NETCONF_SCHEMA)


@pytest.mark.parametrize("conf", [*VALID, *(json.loads(p.read_text()) for p in FIXTURE_CONFIGS)],
                         ids=[f"valid-{i}" for i in range(len(VALID))] + [p.stem for p in FIXTURE_CONFIGS])
def test_valid_configs_agree(conf: dict[str, Any], core_validator: SchemaValidator) -> None:
    expected = _plain(_model_values(conf))
    assert _plain(core_validator.validate_python(copy.deepcopy(conf), strict=True)) == expected
    assert _plain(minischema.validate(NETCONF_SCHEMA, copy.deepcopy(conf))) == expected


@pytest.mark.parametrize("conf", INVALID, ids=[f"invalid-{i}" for i in range(len(INVALID))])
def test_invalid_configs_agree(conf: Any, core_validator: SchemaValidator) -> None:
    assert not _model_accepts(conf)
    with pytest.raises(ValidationError):
        core_validator.validate_python(copy.deepcopy(conf), strict=True)
    with pytest.raises(minischema.SchemaError):
        minischema.validate(NETCONF_SCHEMA, copy.deepcopy(conf))


@pytest.mark.parametrize("conf", INVALID[1:-2], ids=[f"invalid-{i}" for i in range(1, len(INVALID) - 2)])
def test_invalid_configs_name_the_same_key(conf: dict[str, Any]) -> None:
    """The plugin's code-7 message names the key pydantic names first."""
    with pytest.raises(pydantic.ValidationError) as by_model:
        NetConf.model_validate(conf)
    with pytest.raises(minischema.SchemaError) as by_mini:
        minischema.validate(NETCONF_SCHEMA, copy.deepcopy(conf))
    model_locs = [tuple(str(p) for p in err["loc"]) for err in by_model.value.errors()]
    mini_loc = tuple(str(p) for p in by_mini.value.loc)
    assert any(loc[: len(mini_loc)] == mini_loc or mini_loc[: len(loc)] == loc for loc in model_locs), (
        model_locs, mini_loc)


def test_defaults_are_the_documented_ones() -> None:
    values = _model_values(BASE)
    assert values["run_dir"] == "/var/run/ambient-cni"
    assert values["exclude_namespaces"] == ["kube-system"]
    assert values["agent_pod_namespace"] == "istio-system"
    assert values["agent_pod_name_prefix"] == "ambient-cni-node-"
    assert values["deadline_ms"] == 5000
    assert values["log_level"] == "info"
    assert values["log_file"] is None


def test_generated_file_is_up_to_date() -> None:
    current = (REPO_ROOT / "cni_plugin" / "_generated_schema.py").read_text()
    assert current == schema_gen.render(), "regenerate: make cni_plugin/_generated_schema.py"


def test_defaults_are_not_shared_between_validations() -> None:
    first = minischema.validate(NETCONF_SCHEMA, copy.deepcopy(BASE))
    first["exclude_namespaces"].append("mutated")
    second = minischema.validate(NETCONF_SCHEMA, copy.deepcopy(BASE))
    assert second["exclude_namespaces"] == ["kube-system"]

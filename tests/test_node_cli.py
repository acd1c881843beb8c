"""`ambient-cni node` takes the union of the agent's and the installer's options, taken from their shared
lists (so an option added to either list is a node option too), and an option defined in both must agree."""

from __future__ import annotations

import click
import pytest

from ambient_cni.node.cli import NODE_OPTIONS, node_cmd, union_options
from cli_options import option
from conflist.cli import install_cmd
from nodeagent.cli import AGENT_OPTIONS, agent_cmd, agent_config


def _params(command: click.Command) -> dict[str, click.Parameter]:
    return {str(p.name): p for p in command.params}


def test_node_has_every_agent_and_install_option() -> None:
    node = _params(node_cmd)
    wanted = {**_params(agent_cmd), **{k: v for k, v in _params(install_cmd).items() if k != "once"}}
    for name, param in wanted.items():
        assert name in node, name
        assert node[name].opts == param.opts and getattr(node[name], "envvar", None) == getattr(param, "envvar", None)
    assert {"uninstall_on_stop", "node_taint", "daemonset_name"} <= set(node)
    assert "once" not in node
    assert len(node) == len(wanted) + len(NODE_OPTIONS)  # each shared option once


def test_an_option_added_to_the_agent_list_reaches_node_and_the_config() -> None:
    extra = option("--reconcile-interval", type=float, default=30.0)  # same flag, same meaning: merged
    union_options(AGENT_OPTIONS, [extra])(lambda **kw: None)
    clash = option("--run-dir", default="/elsewhere")
    with pytest.raises(AssertionError, match="defined twice with different meanings"):
        union_options(AGENT_OPTIONS, [clash])
    config = agent_config({"run_dir": "/r", "exclude_namespaces": "a, b", "node_name": "n1", "proc_root": "/host/proc",
                           "not_an_agent_field": 1, "uninstall_on_stop": "auto", "dns_capture": True})
    assert (config.run_dir, config.exclude_namespaces, config.node_name, config.proc_root, config.dns_capture) == (
        "/r", ("a", "b"), "n1", "/host/proc", True)
    # node's --uninstall-on-stop (auto|always|never) is not the agent's field of the same name: the node process
    # sets that one itself, only when it decided to uninstall
    assert config.uninstall_on_stop is False

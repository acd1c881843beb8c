"""Shared test harness: real network namespaces, real /usr/lib/cni plugins, the libcni driver and the frozen
plugin. Import from here (``from tests.harness import ...``); fixtures live in ``tests/conftest.py``."""

from tests.harness.cni import ChainInfo, chain_plugins, make_bin_dir, netconf, write_conflist
from tests.harness.netns import Netns, netns_path, new_netns, unique_name
from tests.harness.paths import (
    DRIVER,
    FIXTURES,
    PLUGIN,
    REPO_ROOT,
    SYSTEM_CNI_DIR,
    require_driver,
    require_plugin,
)
from tests.harness.runners import (
    DriverResult,
    PluginResult,
    plugin_env,
    run_driver,
    run_plugin,
)

__all__ = [
    "DRIVER",
    "FIXTURES",
    "PLUGIN",
    "REPO_ROOT",
    "SYSTEM_CNI_DIR",
    "ChainInfo",
    "DriverResult",
    "Netns",
    "PluginResult",
    "chain_plugins",
    "make_bin_dir",
    "netconf",
    "netns_path",
    "new_netns",
    "plugin_env",
    "require_driver",
    "require_plugin",
    "run_driver",
    "run_plugin",
    "unique_name",
    "write_conflist",
]

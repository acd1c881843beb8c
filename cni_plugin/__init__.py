"""ambient-cni ground floor: the CNI contract, the enrollment rule, the wire protocol and the plugin.

Nothing here imports the installer (``conflist``), the agent (``nodeagent``) or click.
Modules on the plugin's hot path import only the standard library (msgpack through ``minipack``, pure Python).
"""

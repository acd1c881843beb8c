"""ambient-cni's ground floor: the chained CNI plugin and every fact its parts share (docs/architecture.md).

The CNI contract (``skel``, ``errors``, ``versions``, ``result``, ``cniargs``), the plugin's commands
(``commands``, entry ``main.run``), the enrollment rule (``enrollment``), the plugin <-> agent wire protocol
(``wire``, ``minipack``, ``agent_client``), the run dir's layout and files (``rundir``, ``files``, ``snapshot``,
``hints``, ``identity_cache``, ``plugin_log``), Kubernetes identity checks (``k8snames``), every default the parts
share (``defaults``) and the plugin's configuration (``config``, the pydantic models; ``schema_gen`` turns them into
the generated schema that ``minischema`` checks on the hot path).

Nothing here imports another package of ours (not the installer ``conflist``, the agent ``nodeagent``, ``zds`` or
``netns_threads``) or click; the installer and the agent import this package, never the other way round.

The hot path (what an exec of the plugin imports, checked by ``tests/test_plugin_imports.py`` for VERSION, ADD
and DEL, including an enrolled ADD through a real agent) uses the standard library only, and only its cheap
modules: JSON through the C scanner ``_json`` (``fastjson``), ``_socket`` instead of ``socket``, msgpack through
``minipack`` (pure Python), no ``re``, ``enum``, ``typing``, ``logging``, ``datetime``, ``inspect`` or
``dataclasses``; VERSION answers before the command modules load, and ``agent_client``/``minipack`` load only
when the agent is asked. ``config`` and ``schema_gen`` (pydantic) and ``probe`` (subprocess) are for the build
and the command-line tool only; the frozen plugin executable does not contain ``config`` or ``schema_gen``.
"""

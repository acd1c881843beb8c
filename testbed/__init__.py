"""A throwaway node made of network namespaces, for the tests, the benchmarks and the demo.

Nothing here is product code and nothing here is frozen into the bundle (``build/pyinstaller.spec`` excludes
it); ``tests/``, ``bench/`` and ``demo/`` import it, it imports none of them.

- ``paths``: where the build outputs, fixtures and the venv's Python are.
- ``poll``: ``wait_for``, the one way to wait for an event (fails loudly, naming it, on timeout).
- ``netns``: network namespaces with unique names and guaranteed removal.
- ``cni``, ``runners``: CNI material (bin dirs, conflists, stdin configs) and the libcni driver / plugin runs.
- ``pods``: a bridge "node" netns with pods attached by veth, sockets and traffic inside them.
- ``agent``, ``peer``, ``cluster``, ``node_proc``: the agent, ``zds_peer`` and ``ambient-cni node`` as real
  child processes, the agent's wire protocol as a client, and the whole chain on one node.
- ``zds``: a scripted ZDS client (a ztunnel stand-in that only acks).
- ``cri/``, ``podman/``: a real containerd / podman, each inside a netns of its own.
- ``fakekube/``: the Kubernetes API server stand-in (no kube-apiserver can run here).
"""

"""``ambient-cni node``: the installer and the node agent in one process (the DaemonSet container), with the
node's lifecycle: readiness, the ``cni.istio.io/not-ready`` taint, and restart-vs-uninstall on SIGTERM."""

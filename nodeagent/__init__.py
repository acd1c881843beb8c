"""The node agent: the other end of the plugin's socket.

Socket server, cluster view, enrollment snapshot, durable pod records, in-pod redirection (dataplane),
ZDS to ztunnel, reconcile, health and metrics. Uses ``cni_plugin``'s contract modules (wire, enrollment,
snapshot); never the other way round.
"""

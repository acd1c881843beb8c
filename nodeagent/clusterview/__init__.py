"""The agent's authoritative view of the cluster: namespaces and the pods of this node.

Two sources behind one interface (``ClusterView``): a cluster-state file (``file``) and the Kubernetes API
(``kubernetes``, list+watch).
"""

from nodeagent.clusterview.model import ClusterState, ClusterView, Namespace, Pod, ViewHolder

__all__ = ["ClusterState", "ClusterView", "Namespace", "Pod", "ViewHolder"]

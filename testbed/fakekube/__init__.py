"""A small fake Kubernetes API server for the agent's list+watch tests (there is no kube-apiserver here)."""

"""Companion installer: chain ambient-cni into the node conflist and keep it there."""

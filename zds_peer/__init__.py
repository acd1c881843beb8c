"""A ztunnel-compatible ZDS peer for tests and the demo (not a mesh proxy).

It connects to the agent's ZDS socket like ztunnel, and for each pod it is handed opens the proxy listeners
15001/15006/15008 *inside the pod's netns* from the received fd, then relays plain TCP, counting connections.
"""

"""A thread that lives inside one network namespace and creates sockets there on request.

A socket belongs to the netns of the thread that created it, for its whole life: the seed's trick that lets a
host process listen inside a pod. The worker thread joins the netns once (setns(2) via pyroute2) and never runs
anything but what it is asked to (socket creation, conntrack look-ups). The class is the agent's own
(``nodeagent.dataplane.netns.NetnsWorker``), shared so both ends enter namespaces the same way.
"""

from __future__ import annotations

from nodeagent.dataplane.netns import NetnsWorker

__all__ = ["NetnsWorker"]

"""ZDS, the protocol between the node agent and ztunnel: the one contract both ends import.

``zds.proto`` holds the messages with ztunnel's published field numbers (package ``istio.workload.zds``), so a
real ztunnel can connect; ``zds_pb2`` is generated from it (``make zds-proto``, checked by
``tests/test_dataplane_zds.py``). ``zds.protocol`` holds the rest of the contract: the transport (a UNIX
``SOCK_SEQPACKET`` socket, one protobuf per datagram, the pod's netns fd as ``SCM_RIGHTS``), the datagram limit and
the messages each side builds and reads. The agent's end is ``nodeagent/dataplane/zds_server.py``; ztunnel's end,
for tests and the demo, is ``zds_peer/`` (and the scripted client ``testbed/zds.py``).
"""

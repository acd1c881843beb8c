# Dataplane (issue 5): regenerate the ZDS protobuf module from nodeagent/dataplane/zds.proto.
.PHONY: zds-proto
zds-proto: $(VENV)/.stamp
	$(PY) -m grpc_tools.protoc -Inodeagent/dataplane --python_out=nodeagent/dataplane --pyi_out=nodeagent/dataplane nodeagent/dataplane/zds.proto

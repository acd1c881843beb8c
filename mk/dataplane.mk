# The ZDS contract (zds/): regenerate the protobuf module from zds/zds.proto (tests/test_dataplane_zds.py checks
# that the committed zds_pb2.py/.pyi equal what protoc makes now).
.PHONY: zds-proto
zds-proto: $(VENV)/.stamp
	$(PY) -m grpc_tools.protoc -Izds --python_out=zds --pyi_out=zds zds/zds.proto
